//! The training step, DESIGN.md section 2 in order. It is the same code for one process or
//! many: one process is a world of one behind the same collectives.

use tch::{Kind, Tensor};

use crate::collectives::{self, Collectives};
use crate::error::Result;
use crate::loss;
use crate::model::Clip;
use crate::optim::AdamW;

/// What one step hands back for logging. Tensors stay on the device, so reading them (a
/// CPU-GPU sync) is left to the logging cadence.
#[derive(Debug)]
pub struct StepOutput {
    /// Global-batch loss (summed over ranks). 0-dim.
    pub loss: Tensor,
    /// Global gradient norm before clipping, when clipping is on.
    pub grad_norm: Option<f64>,
}

/// Settings fixed when the run starts (precision is chosen once, not per step).
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    /// Run the towers under bf16 autocast (CUDA only; a no-op on CPU).
    pub autocast_bf16: bool,
    pub grad_clip_norm: Option<f64>,
    /// Loss tile width in columns (0: automatic); `None`: the naive n x N oracle.
    pub loss_tile: Option<i64>,
}

/// One optimizer update on this rank's batch `images` (n, 3, S, S) and `tokens` (n, L).
pub fn train_step(
    model: &Clip,
    optimizer: &mut AdamW,
    comm: &dyn Collectives,
    images: &Tensor,
    tokens: &Tensor,
    lr: f64,
    cfg: StepConfig,
) -> Result<StepOutput> {
    let n = images.size()[0];
    let rank = comm.rank() as i64;

    // 1. Encode the local batch; keep the graph for step 5.
    let (image_features, text_features) = tch::autocast(cfg.autocast_bf16, || model.features(images, tokens));

    // 2. Gather detached features from every rank: (N, d), N = W n. In their own precision
    // (bf16 under amp_bf16, half the bytes, as open_clip exchanges them); the loss is fp32.
    let all_image = comm.all_gather(&image_features.detach())?;
    let all_text = comm.all_gather(&text_features.detach())?;

    // 3. This rank's rows of the loss, and the feature and temperature gradients.
    let (logit_scale, rows) = (model.logit_scale.detach(), rank * n..rank * n + n);
    let out = match cfg.loss_tile {
        Some(tile) => loss::clip::clip_loss(&all_image, &all_text, &logit_scale, rows, tile),
        None => loss::clip::clip_loss_naive(&all_image, &all_text, &logit_scale, rows),
    };

    // 4. Sum the feature gradients over ranks and keep our rows; sum the loss for logging.
    let grad_image = comm.reduce_scatter(&out.grad_image)?;
    let grad_text = comm.reduce_scatter(&out.grad_text)?;
    let mut global_loss = out.loss;
    comm.all_reduce_sum(&mut global_loss)?;

    // 5. Back-propagate through the towers with the surrogate whose gradient is the one above.
    // logit_scale enters with this rank's part of dL/dlogit_scale; step 6 sums the parts, so
    // the temperature gradient counts exactly once.
    optimizer.zero_grad();
    let surrogate = (image_features.to_kind(Kind::Float) * grad_image).sum(Kind::Float)
        + (text_features.to_kind(Kind::Float) * grad_text).sum(Kind::Float)
        + &model.logit_scale * out.grad_logit_scale;
    surrogate.backward();

    // 6. Sum parameter gradients over ranks: each rank's loss is a part of the global mean, so
    // the sum is the full-batch gradient.
    // Packed into large flat buckets: a few collectives instead of one per parameter.
    let mut grads: Vec<Tensor> = optimizer.variables().map(|(_, var)| var.grad()).filter(Tensor::defined).collect();
    collectives::all_reduce_bucketed(comm, &mut grads)?;

    // 7. Clip, update, clamp the temperature.
    let grad_norm = cfg.grad_clip_norm.map(|max_norm| optimizer.clip_grad_norm(max_norm));
    optimizer.step(lr);
    model.clamp_logit_scale();

    Ok(StepOutput { loss: global_loss, grad_norm })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use tch::{nn, Device};

    use super::*;
    use crate::collectives::tcp::TcpGroup;
    use crate::collectives::{SingleProcess, WorldEnv};
    use crate::model::ModelConfig;
    use crate::optim::AdamWConfig;

    /// One step with lr 0 from `weights` on `images`/`tokens`: the global loss and every
    /// parameter's gradient after the all-reduce.
    fn gradients(comm: &dyn Collectives, weights: &BTreeMap<String, Tensor>, images: &Tensor, tokens: &Tensor) -> (f64, BTreeMap<String, Tensor>) {
        let cfg: ModelConfig = serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml")).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                let _ = var.shallow_clone().copy_(&weights[&name]);
            }
        });
        let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config);
        let cfg = StepConfig { autocast_bf16: false, grad_clip_norm: None, loss_tile: Some(3) };
        let out = train_step(&model, &mut optimizer, comm, images, tokens, 0.0, cfg).unwrap();
        let grads = optimizer.variables().map(|(name, var)| (name.to_owned(), var.grad().copy())).collect();
        (out.loss.double_value(&[]), grads)
    }

    #[test]
    fn four_ranks_compute_the_gradient_of_the_whole_batch() {
        tch::manual_seed(11);
        let cfg: ModelConfig = serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml")).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs.root(), &cfg).unwrap();
        let weights: BTreeMap<String, Tensor> = vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        let images = Tensor::randn([16, 3, 32, 32], (Kind::Float, Device::Cpu));
        let tokens = Tensor::randint_low(1, 49000, [16, 32], (Kind::Int64, Device::Cpu));

        let (loss, whole) = gradients(&SingleProcess, &weights, &images, &tokens);

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let weights: BTreeMap<String, Tensor> = weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
                let (images, tokens) = (images.narrow(0, rank * 4, 4).copy(), tokens.narrow(0, rank * 4, 4).copy());
                std::thread::spawn(move || {
                    let world = WorldEnv {
                        rank: rank as usize,
                        world_size: 4,
                        local_rank: rank as usize,
                        local_world_size: 4,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let comm = TcpGroup::connect(&world, Duration::from_secs(30)).unwrap();
                    let (loss, grads) = gradients(&comm, &weights, &images, &tokens);
                    (loss, grads.into_iter().map(|(k, v)| (k, Vec::<f32>::try_from(v.flatten(0, -1)).unwrap())).collect::<BTreeMap<_, _>>())
                })
            })
            .collect();
        let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

        let scale = whole.values().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        for (rank, (rank_loss, grads)) in ranks.iter().enumerate() {
            assert!((rank_loss - loss).abs() <= 1e-6 * loss.abs(), "rank {rank}: loss {rank_loss} vs {loss}");
            for (name, g) in grads {
                let reference = Vec::<f32>::try_from(whole[name].flatten(0, -1)).unwrap();
                let diff = g.iter().zip(&reference).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
                assert!(diff <= 1e-5 * scale, "rank {rank}, {name}: gradients differ by {diff} (largest gradient {scale})");
                // Every rank holds the very same summed gradient.
                assert_eq!(g, &ranks[0].1[name], "rank {rank}, {name}");
            }
        }
    }
}
