//! The training step, in the order docs/training.md describes it. It is the same code for one process or
//! many: one process is a world of one behind the same collectives.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::collectives::Collectives;
use crate::config::{LossConfig, Precision};
use crate::error::{Result, TrainError};
use crate::grad_sync::GradSync;
use crate::loss::LossSpec;
use crate::model::patch_dropout::PatchDropout;
use crate::model::staged::{self, Checkpointed, Stages};
use crate::model::{Clip, Outputs};
use crate::optim::AdamW;
use crate::precision::{Autocast, GradScaler};

/// What one step hands back for logging. Tensors stay on the device, so reading them (a
/// CPU-GPU sync) is left to the logging cadence.
#[derive(Debug)]
pub struct StepOutput {
    /// Global-batch loss (summed over ranks). 0-dim.
    pub loss: Tensor,
    /// CoCa: the loss's two parts, each weighted (`loss` is their sum): the contrastive one
    /// and the captioning one over the global batch's labels. 0-dim.
    pub coca_parts: Option<(Tensor, Tensor)>,
    /// Global gradient norm before clipping, when clipping is on. 0-dim fp32.
    pub grad_norm: Option<Tensor>,
    /// Seconds the step waited for the gradient reduction after the backward pass returned
    /// (`train/comm_time`): with overlap only its tail, without it all of it.
    pub comm_secs: f64,
    /// Gradient buckets launched while the backward pass was still running.
    pub overlapped_buckets: usize,
}

/// Settings fixed when the run starts (precision is chosen once, not per step).
#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    /// The towers' autocast (`amp`: fp16, `amp_bf16`: bf16); `None`: they run in the weights'
    /// precision.
    pub autocast: Option<Autocast>,
    pub grad_clip_norm: Option<f64>,
    /// Which loss, tiled or naive, at which matmul precision.
    pub loss: LossSpec,
    /// Samples per tower forward (gradient caching); `None`: the whole local batch at once.
    pub micro_batch: Option<usize>,
    /// Patch dropout in training (`None`: every patch); its draws depend on the seed, the step
    /// number and each sample's index in the global batch alone.
    pub patch_dropout: Option<PatchDropout>,
    /// Activation checkpointing: keep only each tower stage's input, recompute the stage in
    /// the backward pass (model/staged.rs).
    pub grad_checkpointing: bool,
}

impl StepConfig {
    /// The step `precision` asks for on `device`: its autocast and the loss's products. (Its
    /// loss scale is a [`GradScaler`] the caller keeps; its bf16 weights are the VarStore's.)
    pub fn new(
        precision: Precision,
        device: tch::Device,
        loss: &LossConfig,
        grad_clip_norm: Option<f64>,
        micro_batch: Option<usize>,
    ) -> Result<Self> {
        Ok(StepConfig {
            autocast: precision.autocast().map(|dtype| Autocast::new(device, dtype)).transpose()?,
            grad_clip_norm,
            loss: LossSpec::new(loss, precision.bf16_loss_products()),
            micro_batch,
            patch_dropout: None,
            grad_checkpointing: false,
        })
    }
}

/// One optimizer update on this rank's batch `images` (n, 3, S, S) and `tokens` (n, L);
/// `grad_sync` is the gradient bucket layout over `model`'s parameters. `step` is the update's
/// number from 0 (the run's step before it), which fixes its patch dropout draws; `scaler` the
/// loss scale under `precision: amp` (`None` otherwise).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Clip,
    optimizer: &mut AdamW,
    comm: &dyn Collectives,
    grad_sync: &GradSync,
    images: &Tensor,
    tokens: &Tensor,
    lr: f64,
    step: u64,
    cfg: StepConfig,
    mut scaler: Option<&mut GradScaler>,
) -> Result<StepOutput> {
    let n = images.size()[0];
    let towers = Towers {
        model,
        images,
        tokens,
        micro: MicroBatches::new(n, cfg.micro_batch),
        autocast: cfg.autocast,
        loss_scale: scaler.as_ref().map(|s| s.scale().shallow_clone()),
        kept: kept_patches(model, cfg.patch_dropout, step, comm.rank() as u64 * n as u64, images)?,
        grad_checkpointing: cfg.grad_checkpointing,
    };

    // 1. Encode the local batch; a single micro-batch keeps what step 5 needs of it.
    let (features, caption_nll, mut kept) = towers.encode_batch();

    // 2-4. Gather the features, score this rank's rows, and keep our rows' summed gradients.
    let rows = comm.rank() as i64 * n..comm.rank() as i64 * n + n;
    let (mut global_loss, mut grads) =
        loss_and_feature_grads(model, comm, &features, cfg.loss, rows)?;
    // CoCa: the caption loss is a mean over the global batch's labels; each rank's share of
    // its gradient is its summed cross-entropy over that count.
    let coca_parts = match (cfg.loss.coca, caption_nll) {
        (Some(weights), Some(nll)) => {
            let (caption_loss, factor) =
                caption_loss(model, comm, tokens, &nll.detach(), weights.caption)?;
            grads.caption_factor = Some(factor);
            let parts = (global_loss.shallow_clone(), caption_loss.shallow_clone());
            // Not `+=`: that adds in place, into the contrastive part's tensor too.
            global_loss = &global_loss + caption_loss;
            Some(parts)
        }
        _ => None,
    };

    // 5. Back-propagate through the towers, and 6. sum parameter gradients over ranks: each
    // rank's loss is a part of the global mean, so the sum is the full-batch gradient. In
    // buckets, each launched as soon as the last backward pass has produced it (grad_sync/).
    optimizer.zero_grad();
    let count = towers.micro.len();
    for k in 0..count.saturating_sub(1) {
        towers.backward(k, kept.take(), &grads);
    }
    let reduced = grad_sync.reduce(comm, || {
        if count > 0 {
            towers.backward(count - 1, kept.take(), &grads);
        }
    })?;

    // 7. Under amp, unscale the gradients and look for inf/NaN (which skips the update and
    // backs the scale off); then clip, update, clamp the temperature: on the device, nothing
    // read back.
    let found_inf = match scaler.as_deref_mut() {
        Some(scaler) => {
            let grads: Vec<Tensor> =
                optimizer.variables().map(|(_, v)| v.grad()).filter(Tensor::defined).collect();
            let mut found = scaler.unscale(&grads)?.shallow_clone();
            // Under dist.shard each rank looked at its own part: any rank's inf skips all.
            grad_sync.sum_over_shards(comm, &mut found)?;
            let _ = found.f_clamp_max_(1.0)?;
            Some(found)
        }
        None => None,
    };
    let sum_squares = |squares: &mut Tensor| grad_sync.sum_over_shards(comm, squares);
    let over_ranks = grad_sync.is_sharded().then_some(&sum_squares as &crate::optim::SumOverRanks);
    let grad_norm =
        cfg.grad_clip_norm.map(|max| optimizer.clip_grad_norm(max, over_ranks)).transpose()?;
    optimizer.step(lr, found_inf.as_ref())?;
    if let Some(scaler) = scaler {
        scaler.update()?;
    }
    // 8. Under dist.shard each rank updated only its own part of the parameters: all-gather.
    grad_sync.gather(comm)?;
    model.clamp_logit_scale();

    Ok(StepOutput {
        loss: global_loss,
        coca_parts,
        grad_norm,
        comm_secs: reduced.exposed_secs,
        overlapped_buckets: reduced.launched_in_backward,
    })
}

/// The patches each of this rank's n `images` keeps under patch dropout, (n, keep) on their
/// device, drawn for global samples `first_sample ..` (rank r's rows are r n ..): the
/// same for a sample whatever the world size or micro-batch split. `None` when patch dropout
/// is off or the model is in eval mode (evaluation never drops).
fn kept_patches(
    model: &Clip,
    patch_dropout: Option<PatchDropout>,
    step: u64,
    first_sample: u64,
    images: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(pd) = patch_dropout.filter(|_| model.is_training()) else { return Ok(None) };
    let Some(num_patches) = model.visual.num_patches() else {
        return Err(TrainError::Config(
            "patch dropout needs an image tower whose patch tokens can be dropped; \
             this model's (a convolutional tower, or a timm trunk with relative positions) cannot"
                .into(),
        ));
    };
    pd.kept(step, first_sample, images.size()[0], num_patches, images.device()).map(Some)
}

/// The gradients step 3 hands back to the towers: this rank's rows of d loss / d features,
/// summed over ranks, and d loss / d logit_scale (and logit_bias) of this rank's part; for
/// CoCa, d loss / d (this rank's summed caption cross-entropy).
struct FeatureGrads {
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    logit_bias: Option<Tensor>,
    caption_factor: Option<Tensor>,
}

/// CoCa's weighted caption loss over the global batch, from this rank's summed cross-entropy
/// `nll` over its captions `tokens`, and the factor (weight / global label count) its gradient
/// carries. open_clip averages each rank's own mean; the global mean is the same whatever the
/// world size or micro-batch split, and equal to open_clip's on one rank.
fn caption_loss(
    model: &Clip,
    comm: &dyn Collectives,
    tokens: &Tensor,
    nll: &Tensor,
    weight: f64,
) -> Result<(Tensor, Tensor)> {
    let count = crate::model::coca::caption_label_count(tokens, model.pad_id());
    let mut sums = Tensor::stack(&[nll.to_kind(Kind::Float), count], 0);
    comm.all_reduce_sum(&mut sums)?;
    // No label at all (every caption empty): nothing to score, and no 0/0.
    let factor = weight / sums.get(1).clamp_min(1.0);
    Ok((sums.get(0) * &factor, factor))
}

/// Steps 2 to 4: the loss of the global batch and this rank's feature gradients.
fn loss_and_feature_grads(
    model: &Clip,
    comm: &dyn Collectives,
    (image_features, text_features): &(Tensor, Tensor),
    loss: LossSpec,
    rows: Range<i64>,
) -> Result<(Tensor, FeatureGrads)> {
    // 2. Gather detached features from every rank: (N, d), N = W n. In their own precision
    // (bf16 under amp_bf16, half the bytes, as open_clip exchanges them); the loss is fp32.
    let all_image = comm.all_gather(&image_features.detach())?;
    let all_text = comm.all_gather(&text_features.detach())?;

    // 3. This rank's rows of the loss, and the feature, temperature and bias gradients.
    let bias = model.logit_bias.as_ref().map(Tensor::detach);
    let out =
        loss.compute(&all_image, &all_text, &model.logit_scale.detach(), bias.as_ref(), rows)?;

    // 4. Sum the feature gradients over ranks and keep our rows; sum the loss for logging.
    let image = comm.reduce_scatter(&out.grad_image)?;
    let text = comm.reduce_scatter(&out.grad_text)?;
    let mut global_loss = out.loss;
    comm.all_reduce_sum(&mut global_loss)?;
    Ok((
        global_loss,
        FeatureGrads {
            image,
            text,
            logit_scale: out.grad_logit_scale,
            logit_bias: out.grad_logit_bias,
            caption_factor: None,
        },
    ))
}

/// The two towers over this rank's batch, a micro-batch at a time.
struct Towers<'a> {
    model: &'a Clip,
    images: &'a Tensor,
    tokens: &'a Tensor,
    micro: MicroBatches,
    autocast: Option<Autocast>,
    /// Under amp, the loss scale the backward surrogate is multiplied by.
    loss_scale: Option<Tensor>,
    /// Patch dropout's kept patches for the whole local batch, (n, keep); each micro-batch
    /// takes its rows, in every forward of it.
    kept: Option<Tensor>,
    grad_checkpointing: bool,
}

/// A micro-batch's outputs and what step 5 back-propagates through: the whole forward's
/// graph, or under activation checkpointing each tower's last stage's graph (and what the model
/// computes after it, CoCa's heads and decoder) and the inputs of the stages before it.
struct Encoded {
    outputs: Outputs,
    checkpoints: Option<(Checkpointed, Checkpointed)>,
}

impl Towers<'_> {
    /// The towers' forward passes run under this: the precision chosen for the run. Their
    /// recomputes (activation checkpointing) too, so they compute what the forward did.
    fn in_precision<T>(&self, f: impl FnOnce() -> T) -> T {
        let _autocast = self.autocast.map(Autocast::enter);
        f()
    }

    /// The rows of micro-batch `k`: images, tokens, and the patches each image keeps (patch
    /// dropout, the same in every forward of the micro-batch).
    fn rows(&self, k: usize) -> (Tensor, Tensor, Option<Tensor>) {
        let r = self.micro.range(k);
        let len = r.end - r.start;
        (
            self.images.narrow(0, r.start, len),
            self.tokens.narrow(0, r.start, len),
            self.kept.as_ref().map(|kept| kept.narrow(0, r.start, len)),
        )
    }

    /// [`Towers::rows`], with the generator set as for micro-batch `k`'s every forward.
    fn enter(&self, k: usize) -> (Tensor, Tensor, Option<Tensor>) {
        self.micro.enter(k);
        self.rows(k)
    }

    /// The model's training outputs for micro-batch `k`.
    fn encode(&self, k: usize) -> Outputs {
        let (images, tokens, kept) = self.enter(k);
        self.in_precision(|| self.model.forward_outputs(&images, &tokens, kept.as_ref()))
    }

    /// Micro-batch `k`'s outputs for step 5: with their graph, or checkpointed.
    fn encode_for_backward(&self, k: usize) -> Encoded {
        if !self.grad_checkpointing {
            return Encoded { outputs: self.encode(k), checkpoints: None };
        }
        let (images, tokens, kept) = self.enter(k);
        self.in_precision(|| {
            let image = staged::checkpointed(&self.model.image_stages(kept.as_ref()), &images);
            let text = staged::checkpointed(&self.model.text_stages(&tokens), &tokens);
            let outputs = self.model.outputs(image.output(), text.output(), &tokens);
            Encoded { outputs, checkpoints: Some((image, text)) }
        })
    }

    /// Step 1: the local batch's features and (CoCa) summed caption cross-entropy. A single
    /// micro-batch keeps what step 5 needs; several are encoded without a graph, and only
    /// their outputs are kept.
    fn encode_batch(&self) -> ((Tensor, Tensor), Option<Tensor>, Option<Encoded>) {
        if self.micro.len() == 1 {
            let encoded = self.encode_for_backward(0);
            let out = &encoded.outputs;
            let features = (out.image.shallow_clone(), out.text.shallow_clone());
            let caption = out.caption_nll.as_ref().map(Tensor::detach);
            return (features, caption, Some(encoded));
        }
        let parts: Vec<Outputs> =
            tch::no_grad(|| (0..self.micro.len()).map(|k| self.encode(k)).collect());
        let images: Vec<&Tensor> = parts.iter().map(|o| &o.image).collect();
        let texts: Vec<&Tensor> = parts.iter().map(|o| &o.text).collect();
        let caption = parts
            .iter()
            .filter_map(|o| o.caption_nll.as_ref().map(Tensor::shallow_clone))
            .reduce(|sum, nll| sum + nll);
        ((Tensor::cat(&images, 0), Tensor::cat(&texts, 0)), caption, None)
    }

    /// Step 5 for micro-batch `k`: back-propagates the surrogate whose gradient is `grads`.
    /// logit_scale (and logit_bias) enter with this rank's part of their gradient, once per
    /// step, with the last micro-batch: then every parameter gets its gradient in the last
    /// backward pass, the one the reduction overlaps. Step 6 sums the parts over ranks.
    /// `kept`: what step 1 kept of the micro-batch (a single one).
    fn backward(&self, k: usize, kept: Option<Encoded>, grads: &FeatureGrads) {
        let model = self.model;
        // One micro-batch: step 1's graph. Several: re-encode each, now with its graph and
        // the randomness of its first pass; the parameters' gradients accumulate. BatchNorm
        // counted the micro-batch in step 1, so the repeat leaves its running statistics be.
        let encoded = kept.unwrap_or_else(|| model.repeating(|| self.encode_for_backward(k)));
        let Outputs { image, text, caption_nll } = &encoded.outputs;
        let rows = self.micro.range(k);
        let len = rows.end - rows.start;
        let mut surrogate = (image.to_kind(Kind::Float) * grads.image.narrow(0, rows.start, len))
            .sum(Kind::Float)
            + (text.to_kind(Kind::Float) * grads.text.narrow(0, rows.start, len)).sum(Kind::Float);
        if let (Some(nll), Some(factor)) = (caption_nll, &grads.caption_factor) {
            surrogate = &surrogate + nll * factor;
        }
        if k + 1 == self.micro.len() {
            surrogate = match (&model.logit_bias, &grads.logit_bias) {
                (Some(bias), Some(grad)) => {
                    surrogate + &model.logit_scale * &grads.logit_scale + bias * grad
                }
                _ => surrogate + &model.logit_scale * &grads.logit_scale,
            };
        }
        if let Some(scale) = &self.loss_scale {
            // The gradient of the scaled loss: every parameter's, scaled alike.
            surrogate = &surrogate * scale;
        }
        surrogate.backward();
        // Checkpointed: the surrogate went through each tower's last stage; now the stages
        // before it, re-run as step 1 ran them. The text tower first: its parameters were
        // registered after the image tower's, so they fill the first gradient buckets.
        if let Some((image, text)) = encoded.checkpoints {
            let (_, tokens, kept) = self.rows(k);
            text.backward(&Rerun { towers: self, stages: model.text_stages(&tokens) });
            image.backward(&Rerun { towers: self, stages: model.image_stages(kept.as_ref()) });
        }
    }
}

/// A tower's stages re-run for the checkpointed backward pass as their first pass ran them:
/// in the run's precision, and with BatchNorm normalising with the batch's statistics again
/// without counting them twice.
struct Rerun<'a, S> {
    towers: &'a Towers<'a>,
    stages: S,
}

impl<S: Stages> Stages for Rerun<'_, S> {
    fn count(&self) -> usize {
        self.stages.count()
    }

    fn run(&self, i: usize, x: &Tensor) -> Tensor {
        let towers = self.towers;
        towers.model.repeating(|| towers.in_precision(|| self.stages.run(i, x)))
    }
}

/// The local batch cut into micro-batches, each with the seed its forward passes run under, so
/// that the re-forward of step 5 draws the same random numbers (dropout, if a model has it) as
/// the first. libtorch's generator state is not reachable from tch, so the step draws one seed
/// per micro-batch from the generator and re-seeds before each forward of that micro-batch;
/// with one micro-batch nothing is re-run and the generator is left alone.
struct MicroBatches {
    ranges: Vec<Range<i64>>,
    seeds: Vec<i64>,
}

impl MicroBatches {
    fn new(n: i64, micro_batch: Option<usize>) -> Self {
        let size = micro_batch.map_or(n, |m| (m as i64).clamp(1, n.max(1)));
        let ranges: Vec<Range<i64>> =
            (0..n).step_by(size.max(1) as usize).map(|s| s..(s + size).min(n)).collect();
        let seeds = if ranges.len() > 1 {
            ranges.iter().map(|_| crate::model::staged::draw_seed()).collect()
        } else {
            Vec::new()
        };
        MicroBatches { ranges, seeds }
    }

    fn len(&self) -> usize {
        self.ranges.len()
    }

    fn range(&self, k: usize) -> Range<i64> {
        self.ranges[k].clone()
    }

    /// The rows of micro-batch `k`, with the generator set as for its every forward.
    fn enter(&self, k: usize) -> Range<i64> {
        if let Some(&seed) = self.seeds.get(k) {
            tch::manual_seed(seed);
        }
        self.range(k)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use tch::{nn, Device};

    use super::*;
    use crate::collectives::tcp::TcpGroup;
    use crate::collectives::{SingleProcess, WorldEnv};
    use crate::config::{DistConfig, LossConfig, LossKind, ReduceDtype, Tiling};
    use crate::device::host_reads::{HostReads, ReadCounts};
    use crate::grad_sync::GradSync;
    use crate::loss::LossSpec;
    use crate::model::lock::{lock, Tower};
    use crate::model::ModelConfig;
    use crate::optim::AdamWConfig;
    use crate::precision::{GradScalerConfig, LowPrecision};

    /// The tiny model, or for `coca` the tiny CoCa.
    fn tiny(kind: LossKind) -> ModelConfig {
        let yaml = match kind {
            LossKind::Coca => include_str!("../../configs/models/tiny-coca.yaml"),
            _ => include_str!("../../configs/models/tiny.yaml"),
        };
        let mut cfg: ModelConfig = serde_yaml::from_str(yaml).unwrap();
        LossConfig { kind, ..LossConfig::default() }.complete_model(&mut cfg);
        cfg
    }

    fn step_config(kind: LossKind, micro_batch: Option<usize>) -> StepConfig {
        let loss = LossSpec::new(
            &LossConfig { kind, tiling: Tiling::Tile(3), ..LossConfig::default() },
            false,
        );
        StepConfig {
            autocast: None,
            grad_clip_norm: None,
            loss,
            micro_batch,
            patch_dropout: None,
            grad_checkpointing: false,
        }
    }

    /// Micro-batches of `micro` (or none), with or without activation checkpointing.
    #[derive(Debug, Clone, Copy)]
    struct Forward {
        micro: Option<usize>,
        checkpointing: bool,
    }

    impl From<Option<usize>> for Forward {
        fn from(micro: Option<usize>) -> Self {
            Forward { micro, checkpointing: false }
        }
    }

    /// One step with lr 0 from `weights` on `images`/`tokens`: the global loss and every
    /// parameter's gradient after the all-reduce.
    fn gradients(
        comm: &dyn Collectives,
        kind: LossKind,
        micro: Option<usize>,
        weights: &BTreeMap<String, Tensor>,
        images: &Tensor,
        tokens: &Tensor,
    ) -> (f64, BTreeMap<String, Tensor>) {
        let (loss, grads, _) = gradients_with(
            comm,
            kind,
            micro.into(),
            DistConfig::default(),
            weights,
            images,
            tokens,
        );
        (loss, grads)
    }

    /// [`gradients`] with the reduction `reduce`; also the step's output and its bucket count.
    fn gradients_with(
        comm: &dyn Collectives,
        kind: LossKind,
        forward: Forward,
        reduce: DistConfig,
        weights: &BTreeMap<String, Tensor>,
        images: &Tensor,
        tokens: &Tensor,
    ) -> (f64, BTreeMap<String, Tensor>, (StepOutput, usize)) {
        let cfg = tiny(kind);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                var.shallow_clone().copy_(&weights[&name]);
            }
        });
        let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config);
        let cfg = StepConfig {
            grad_checkpointing: forward.checkpointing,
            ..step_config(kind, forward.micro)
        };
        let sync = GradSync::for_var_store(&vs, &reduce).unwrap();
        let out =
            train_step(&model, &mut optimizer, comm, &sync, images, tokens, 0.0, 0, cfg, None)
                .unwrap();
        let grads =
            optimizer.variables().map(|(name, var)| (name.to_owned(), var.grad().copy())).collect();
        (out.loss.double_value(&[]), grads, (out, sync.bucket_count()))
    }

    #[test]
    fn four_ranks_compute_the_gradient_of_the_whole_batch() {
        four_ranks_match_one(LossKind::Clip);
    }

    #[test]
    fn four_ranks_compute_the_gradient_of_the_whole_batch_siglip() {
        four_ranks_match_one(LossKind::Siglip);
    }

    /// CoCa's caption loss is a mean over the global batch's labels, which the ranks hold
    /// unequally many of: four ranks still give one process's loss and gradients.
    #[test]
    fn four_ranks_compute_the_gradient_of_the_whole_batch_coca() {
        four_ranks_match_one(LossKind::Coca);
    }

    fn four_ranks_match_one(kind: LossKind) {
        tch::manual_seed(11);
        let cfg = tiny(kind);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs.root(), &cfg).unwrap();
        let weights: BTreeMap<String, Tensor> =
            vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        let images = Tensor::randn([16, 3, 32, 32], (Kind::Float, Device::Cpu));
        let tokens = Tensor::randint_low(1, 49000, [16, 32], (Kind::Int64, Device::Cpu));
        // Captions of 2 to 31 tokens, zero-padded: each rank's 4 hold a different number.
        let lengths: Vec<i64> = (0..16).map(|r| 2 + (r * 7) % 30).collect();
        let lengths = Tensor::from_slice(&lengths).view([16, 1]);
        let tokens = tokens
            * Tensor::arange(32, (Kind::Int64, Device::Cpu)).view([1, 32]).lt_tensor(&lengths);

        let (loss, whole) = gradients(&SingleProcess, kind, None, &weights, &images, &tokens);

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let weights: BTreeMap<String, Tensor> =
                    weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
                let (images, tokens) =
                    (images.narrow(0, rank * 4, 4).copy(), tokens.narrow(0, rank * 4, 4).copy());
                std::thread::spawn(move || {
                    let world = WorldEnv::on_loopback(rank as usize, 4, port);
                    let comm = TcpGroup::connect(&world, Duration::from_secs(30)).unwrap();
                    let (loss, grads) = gradients(&comm, kind, None, &weights, &images, &tokens);
                    (
                        loss,
                        grads
                            .into_iter()
                            .map(|(k, v)| (k, Vec::<f32>::try_from(v.flatten(0, -1)).unwrap()))
                            .collect::<BTreeMap<_, _>>(),
                    )
                })
            })
            .collect();
        let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

        let scale = whole.values().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        for (rank, (rank_loss, grads)) in ranks.iter().enumerate() {
            assert!(
                (rank_loss - loss).abs() <= 1e-6 * loss.abs(),
                "rank {rank}: loss {rank_loss} vs {loss}"
            );
            for (name, g) in grads {
                let reference = Vec::<f32>::try_from(whole[name].flatten(0, -1)).unwrap();
                let diff =
                    g.iter().zip(&reference).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
                assert!(
                    diff <= 1e-5 * scale,
                    "rank {rank}, {name}: gradients differ by {diff} (largest gradient {scale})"
                );
                // Every rank holds the very same summed gradient.
                assert_eq!(g, &ranks[0].1[name], "rank {rank}, {name}");
            }
        }
    }

    type RankGrads = BTreeMap<String, Vec<f32>>;

    /// One step on each of 4 ranks (threads joined by a `TcpGroup`), rank r on rows r n..(r + 1) n:
    /// per rank, the loss, the reduced gradients, the buckets launched during backward and the
    /// bucket count.
    fn on_four_ranks(
        kind: LossKind,
        forward: impl Into<Forward>,
        reduce: DistConfig,
        weights: &BTreeMap<String, Tensor>,
        images: &Tensor,
        tokens: &Tensor,
    ) -> Vec<(f64, RankGrads, usize, usize)> {
        let n = images.size()[0] / 4;
        let forward = forward.into();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..4)
            .map(|rank| {
                let weights: BTreeMap<String, Tensor> =
                    weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
                let (images, tokens) =
                    (images.narrow(0, rank * n, n).copy(), tokens.narrow(0, rank * n, n).copy());
                std::thread::spawn(move || {
                    let world = WorldEnv::on_loopback(rank as usize, 4, port);
                    let comm = TcpGroup::connect(&world, Duration::from_secs(60)).unwrap();
                    let (loss, grads, (out, buckets)) =
                        gradients_with(&comm, kind, forward, reduce, &weights, &images, &tokens);
                    let grads = grads
                        .into_iter()
                        .map(|(k, v)| (k, Vec::<f32>::try_from(v.flatten(0, -1)).unwrap()))
                        .collect();
                    (loss, grads, out.overlapped_buckets, buckets)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Weights of the tiny model and a batch of `n` samples, the same for every test thread.
    fn tiny_inputs(
        kind: LossKind,
        seed: i64,
        n: i64,
    ) -> (BTreeMap<String, Tensor>, Tensor, Tensor) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs.root(), &tiny(kind)).unwrap();
        let weights = vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        let images = Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu));
        let tokens = Tensor::randint_low(1, 49000, [n, 32], (Kind::Int64, Device::Cpu));
        (weights, images, tokens)
    }

    /// 4 ranks x 8 with the reduction overlapped with backward, in several buckets, with and
    /// without micro-batches: the gradient of 1 x 32, and bit for bit the gradient of the
    /// reduction after backward; the hooks really launched buckets during backward.
    #[test]
    fn overlapped_reduction_equals_the_reduction_after_backward() {
        let kind = LossKind::Clip;
        let (weights, images, tokens) = tiny_inputs(kind, 13, 32);
        let (loss, whole) = gradients(&SingleProcess, kind, None, &weights, &images, &tokens);
        let scale = whole.values().map(|g| g.abs().max().double_value(&[])).fold(0.0, f64::max);
        // 0.2 MB: the token embedding (12.6 MB) alone, the rest in several buckets.
        let on = DistConfig { overlap: true, bucket_mb: 0.2, ..DistConfig::default() };
        for micro in [None, Some(3)] {
            let overlapped = on_four_ranks(kind, micro, on, &weights, &images, &tokens);
            let after = on_four_ranks(
                kind,
                micro,
                DistConfig { overlap: false, ..on },
                &weights,
                &images,
                &tokens,
            );
            let worst = overlapped[0]
                .1
                .iter()
                .map(|(name, g)| {
                    let reference = Vec::<f32>::try_from(whole[name].flatten(0, -1)).unwrap();
                    g.iter().zip(&reference).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max)
                })
                .fold(0.0, f64::max);
            eprintln!("micro {micro:?}: {} buckets, {} launched during backward; 4 x 8 vs 1 x 32: largest gradient difference {:.2e} of the largest gradient", overlapped[0].3, overlapped[0].2, worst / scale);
            for (
                rank,
                ((rank_loss, grads, launched, buckets), (_, after_grads, after_launched, _)),
            ) in overlapped.iter().zip(&after).enumerate()
            {
                assert!(*buckets > 2, "{buckets} buckets");
                assert!(*launched > 0 && *after_launched == 0, "micro {micro:?} rank {rank}: {launched} of {buckets} buckets launched during backward");
                assert!(
                    (rank_loss - loss).abs() <= 1e-6 * loss.abs(),
                    "rank {rank}: loss {rank_loss} vs {loss}"
                );
                for (name, g) in grads {
                    let reference = Vec::<f32>::try_from(whole[name].flatten(0, -1)).unwrap();
                    let diff = g
                        .iter()
                        .zip(&reference)
                        .map(|(a, b)| (a - b).abs() as f64)
                        .fold(0.0, f64::max);
                    assert!(diff <= 1e-5 * scale, "micro {micro:?} rank {rank}, {name}: gradients differ by {diff} (largest gradient {scale})");
                    assert_eq!(
                        g, &after_grads[name],
                        "micro {micro:?} rank {rank}, {name}: overlapped vs after backward"
                    );
                    assert_eq!(g, &overlapped[0].1[name], "micro {micro:?} rank {rank}, {name}");
                }
            }
        }
    }

    /// bf16 reduction (DDP's bf16 compression hook): the fp32 gradients up to a bf16 rounding
    /// of the sum, not bit for bit (it does round), the same on every rank.
    #[test]
    fn bf16_reduction_rounds_the_sum_to_bf16() {
        let kind = LossKind::Siglip;
        let (weights, images, tokens) = tiny_inputs(kind, 17, 32);
        let fp32 = DistConfig { overlap: true, bucket_mb: 1.0, ..DistConfig::default() };
        let exact = on_four_ranks(kind, None, fp32, &weights, &images, &tokens);
        let bf16 = on_four_ranks(
            kind,
            None,
            DistConfig { grad_reduce_dtype: ReduceDtype::Bf16, ..fp32 },
            &weights,
            &images,
            &tokens,
        );
        // bf16 keeps 8 significant bits: each rank's part and the sum are rounded by at most
        // 2^-8 of themselves; relative to the largest gradient, as the other distributed tests.
        let largest =
            exact[0].1.values().flat_map(|g| g.iter()).fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = bf16[0]
            .1
            .iter()
            .map(|(name, g)| {
                g.iter().zip(&exact[0].1[name]).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            })
            .fold(0.0f32, f32::max);
        eprintln!(
            "bf16 vs fp32 reduction: largest difference {:.2e} of the largest gradient",
            worst / largest
        );
        let mut rounded = 0;
        for (rank, (_, grads, _, _)) in bf16.iter().enumerate() {
            for (name, g) in grads {
                let reference = &exact[rank].1[name];
                let diff = g.iter().zip(reference).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-2 * largest, "rank {rank}, {name}: bf16 differs from fp32 by {diff} (largest gradient {largest})");
                rounded += g.iter().zip(reference).filter(|(a, b)| a != b).count();
                assert_eq!(g, &bf16[0].1[name], "rank {rank}, {name}");
            }
        }
        assert!(rounded > 0, "the bf16 reduction changed no gradient");
    }

    /// Trains `steps` steps from `weights`, each on the next slice of `images`/`tokens`, with
    /// micro-batches of `micro` (or none); returns the final weights. (Weights are copied in,
    /// never re-drawn from a seed: tests share libtorch's generator across threads.)
    fn train_weights(
        kind: LossKind,
        micro: Option<usize>,
        weights: &BTreeMap<String, Tensor>,
        images: &Tensor,
        tokens: &Tensor,
        steps: usize,
    ) -> BTreeMap<String, Tensor> {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &tiny(kind)).unwrap();
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                var.shallow_clone().copy_(&weights[&name]);
            }
        });
        let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config);
        let sync = GradSync::for_var_store(&vs, &DistConfig::default()).unwrap();
        let n = images.size()[0] / steps as i64;
        for s in 0..steps as i64 {
            let (images, tokens) = (images.narrow(0, s * n, n), tokens.narrow(0, s * n, n));
            train_step(
                &model,
                &mut optimizer,
                &SingleProcess,
                &sync,
                &images,
                &tokens,
                1e-4,
                s as u64,
                step_config(kind, micro),
                None,
            )
            .unwrap();
        }
        vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect()
    }

    /// Gradient caching: 4 micro-batches of 16 (or uneven ones, 64 = 3 x 20 + 4) update the
    /// weights exactly as the batch of 64 in one, for both losses, over several steps.
    #[test]
    fn micro_batches_give_the_update_of_the_whole_batch() {
        tch::manual_seed(5);
        let images = Tensor::randn([192, 3, 32, 32], (Kind::Float, Device::Cpu));
        let tokens = Tensor::randint_low(1, 49000, [192, 32], (Kind::Int64, Device::Cpu));
        for kind in [LossKind::Clip, LossKind::Siglip] {
            let start: BTreeMap<String, Tensor> = {
                let vs = nn::VarStore::new(Device::Cpu);
                let _ = Clip::new(&vs.root(), &tiny(kind)).unwrap();
                vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect()
            };
            let whole = train_weights(kind, None, &start, &images, &tokens, 3);
            // Relative to the largest weight, as the distributed test: the features agree to
            // fp32 rounding, but Adam turns the rounding noise of gradients that are zero in
            // exact arithmetic into updates of order lr.
            let scale = whole.values().map(|w| w.abs().max().double_value(&[])).fold(0.0, f64::max);
            // Adam is blind to a constant factor in one parameter's gradient (a temperature
            // gradient counted per micro-batch would still give the same weights), so the
            // gradients of a step are compared too, each parameter on its own.
            let (images64, tokens64) = (images.narrow(0, 0, 64), tokens.narrow(0, 0, 64));
            let (loss, grads) = gradients(&SingleProcess, kind, None, &start, &images64, &tokens64);
            for micro in [16, 20] {
                let (micro_loss, micro_grads) =
                    gradients(&SingleProcess, kind, Some(micro), &start, &images64, &tokens64);
                assert!(
                    (micro_loss - loss).abs() <= 1e-6 * loss.abs(),
                    "{kind:?} micro {micro}: loss {micro_loss} vs {loss}"
                );
                for (name, g) in &grads {
                    let diff = (g - &micro_grads[name]).abs().max().double_value(&[]);
                    let largest = g.abs().max().double_value(&[]);
                    assert!(diff <= 1e-5 * largest, "{kind:?} micro {micro}, {name}: gradients differ by {diff} (largest {largest})");
                }
            }
            for micro in [16, 20] {
                let cached = train_weights(kind, Some(micro), &start, &images, &tokens, 3);
                for (name, w) in &whole {
                    let diff = (w - &cached[name]).abs().max().double_value(&[]);
                    assert!(diff <= 1e-5 * scale, "{kind:?} micro {micro}, {name}: weights differ by {diff} (largest weight {scale})");
                    let moved = (w - &start[name]).abs().max().double_value(&[]);
                    assert!(moved > 0.0, "{kind:?} {name} did not train");
                }
            }
        }
    }

    /// Three steps with clipping on, on a thread counting its reads of tensor values into host
    /// memory ([`crate::device::host_reads`]): the reads of the steps, then those of what a log
    /// step reads (the loss and the gradient norm), which shows that the count sees reads.
    fn count_reads(
        comm: &dyn Collectives,
        kind: LossKind,
        (micro, amp): (Option<usize>, bool),
        weights: &BTreeMap<String, Tensor>,
        images: &Tensor,
        tokens: &Tensor,
    ) -> (ReadCounts, ReadCounts) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &tiny(kind)).unwrap();
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                var.shallow_clone().copy_(&weights[&name]);
            }
        });
        let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config);
        let sync = GradSync::for_var_store(&vs, &DistConfig::default()).unwrap();
        let mut cfg = StepConfig { grad_clip_norm: Some(0.5), ..step_config(kind, micro) };
        let mut scaler = amp.then(|| {
            cfg.autocast = Some(Autocast::new(Device::Cpu, LowPrecision::Fp16).unwrap());
            GradScaler::new(Device::Cpu, GradScalerConfig::default())
        });
        let count = HostReads::start().unwrap();
        let mut out = None;
        for _ in 0..3 {
            let step = train_step(
                &model,
                &mut optimizer,
                comm,
                &sync,
                images,
                tokens,
                1e-3,
                0,
                cfg,
                scaler.as_mut(),
            );
            out = Some(step.unwrap());
        }
        let steps = count.finish();
        let out = out.unwrap();
        let count = HostReads::start().unwrap();
        let _ = (out.loss.double_value(&[]), out.grad_norm.unwrap().double_value(&[]));
        (steps, count.finish())
    }

    /// No host synchronisation between log steps: a step (encode, gather, loss, reduction,
    /// clipping, AdamW, clamp) reads no tensor value back to the host, for one process and for
    /// two joined by the TCP backend (each rank counted on its own thread). The TCP backend
    /// itself moves CPU tensors' bytes, which no count sees; under NCCL nothing leaves the device.
    /// With micro-batches the step reads one seed per micro-batch from libtorch's CPU generator:
    /// a CPU value in every run, never a wait for the GPU, and the one read the count finds.
    #[test]
    fn a_step_reads_nothing_back_to_the_host() {
        let kind = LossKind::Clip;
        let (weights, images, tokens) = tiny_inputs(kind, 19, 8);
        let (steps, log) =
            count_reads(&SingleProcess, kind, (None, false), &weights, &images, &tokens);
        assert_eq!(steps.syncs(), 0, "one process: {steps:?}");
        assert!(steps.in_fused_optimizer > 0, "the CPU fused kernel reads its counter: {steps:?}");
        assert_eq!(log.scalar_reads, 2, "the log step's reads are seen: {log:?}");
        let (siglip_weights, _, _) = tiny_inputs(LossKind::Siglip, 19, 8);
        let (steps, _) = count_reads(
            &SingleProcess,
            LossKind::Siglip,
            (None, false),
            &siglip_weights,
            &images,
            &tokens,
        );
        assert_eq!(steps.syncs(), 0, "one process, SigLIP: {steps:?}");
        let (steps, _) =
            count_reads(&SingleProcess, kind, (None, true), &weights, &images, &tokens);
        assert_eq!(steps.syncs(), 0, "one process, amp (fp16 autocast, loss scale): {steps:?}");
        let (steps, _) =
            count_reads(&SingleProcess, kind, (Some(4), false), &weights, &images, &tokens);
        assert_eq!(
            (steps.scalar_reads, steps.device_to_host_copies),
            (3 * 2, 0),
            "two micro-batches: a CPU seed each, per step: {steps:?}"
        );

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let weights: BTreeMap<String, Tensor> =
                    weights.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
                let (images, tokens) =
                    (images.narrow(0, rank * 4, 4).copy(), tokens.narrow(0, rank * 4, 4).copy());
                std::thread::spawn(move || {
                    let world = WorldEnv::on_loopback(rank as usize, 2, port);
                    let comm = TcpGroup::connect(&world, Duration::from_secs(60)).unwrap();
                    count_reads(&comm, kind, (None, false), &weights, &images, &tokens).0
                })
            })
            .collect();
        for (rank, handle) in ranks.into_iter().enumerate() {
            let steps = handle.join().unwrap();
            assert_eq!(steps.syncs(), 0, "rank {rank} of 2: {steps:?}");
        }
    }

    // Activation checkpointing (`grad_checkpointing`).

    /// A model, its weights (BatchNorm's statistics included) and a batch of `n`.
    struct Case {
        cfg: ModelConfig,
        kind: LossKind,
        /// Training mode: BatchNorm normalises with the batch's statistics and updates its
        /// running ones.
        train: bool,
        weights: BTreeMap<String, Tensor>,
        images: Tensor,
        tokens: Tensor,
    }

    impl Case {
        fn new(mut cfg: ModelConfig, kind: LossKind, train: bool, n: i64) -> Self {
            LossConfig { kind, ..LossConfig::default() }.complete_model(&mut cfg);
            tch::manual_seed(23);
            let vs = nn::VarStore::new(Device::Cpu);
            let _ = Clip::new(&vs.root(), &cfg).unwrap();
            let weights = vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
            let size = cfg.vision_cfg.image_size;
            let images = Tensor::randn([n, 3, size, size], (Kind::Float, Device::Cpu));
            let (vocab, context) = (cfg.text_cfg.vocab_size, cfg.text_cfg.context_length);
            let tokens = Tensor::randint_low(1, vocab, [n, context], (Kind::Int64, Device::Cpu));
            Case { cfg, kind, train, weights, images, tokens }
        }
    }

    /// What one step (lr 0) leaves: the loss, each trainable parameter's gradient, and every
    /// variable afterwards (BatchNorm's running statistics).
    struct Stepped {
        loss: Tensor,
        grads: BTreeMap<String, Tensor>,
        after: BTreeMap<String, Tensor>,
    }

    /// One step of `case` in one process, its towers frozen by `locks` (tower, groups left
    /// unlocked) first.
    fn step_case(case: &Case, forward: Forward, locks: &[(Tower, usize)]) -> Stepped {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &case.cfg).unwrap();
        tch::no_grad(|| {
            for (name, var) in vs.variables() {
                var.shallow_clone().copy_(&case.weights[&name]);
            }
        });
        for &(tower, unlocked) in locks {
            lock(&vs, &case.cfg, tower, unlocked).unwrap();
        }
        model.set_training(case.train);
        let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
        let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config);
        let sync = GradSync::for_var_store(&vs, &DistConfig::default()).unwrap();
        let cfg = StepConfig {
            grad_checkpointing: forward.checkpointing,
            ..step_config(case.kind, forward.micro)
        };
        let out = train_step(
            &model,
            &mut optimizer,
            &SingleProcess,
            &sync,
            &case.images,
            &case.tokens,
            0.0,
            0,
            cfg,
            None,
        )
        .unwrap();
        Stepped {
            loss: out.loss,
            grads: optimizer
                .variables()
                .map(|(name, var)| (name.to_owned(), var.grad().copy()))
                .collect(),
            after: vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect(),
        }
    }

    /// `a` and `b` hold the same names and, bit for bit, the same values.
    fn assert_bitwise(label: &str, a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{label}");
        for (name, x) in a {
            let y = &b[name];
            let diff = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double)).abs().max();
            assert!(x.equal(y), "{label}, {name}: differs by {}", diff.double_value(&[]));
        }
    }

    /// Checkpointing recomputes each stage from its saved input with the same kernels on the
    /// same values, and back-propagates `sum(out * grad)`, whose gradient is `grad` exactly;
    /// every parameter accumulates its gradient once per micro-batch as before. So on the CPU
    /// the loss, every gradient and BatchNorm's running statistics after the step are the
    /// same bits as without it (the acceptance bound is 1e-6 relative; nothing here needs
    /// it): for the ViT, OpenAI's ResNet (BatchNorm in training mode) and a timm SigLIP trunk,
    /// with and without micro-batches (3 + 3 + 2), and with towers locked whole or in part.
    #[test]
    fn checkpointing_leaves_every_gradient_as_it_was() {
        let resnet: ModelConfig =
            serde_json::from_str(include_str!("../../tests/fixtures/resnet/tiny-rn.json")).unwrap();
        let siglip: ModelConfig = serde_json::from_value(serde_json::json!({
            "embed_dim": 16, "custom_text": true,
            "vision_cfg": {"image_size": 32, "timm_model_name": "vit_oxtiny_patch8_siglip_32",
                           "timm_model_pretrained": false, "timm_pool": "map", "timm_proj": "linear"},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2,
                         "no_causal_mask": true, "proj_bias": true, "pool_type": "last"}
        }))
        .unwrap();
        let cases = [
            ("ViT", Case::new(tiny(LossKind::Clip), LossKind::Clip, true, 8)),
            ("ResNet", Case::new(resnet, LossKind::Clip, true, 8)),
            ("timm SigLIP", Case::new(siglip, LossKind::Siglip, true, 8)),
        ];
        for (name, case) in &cases {
            let locks: &[&[(Tower, usize)]] = match *name {
                // The image tower's last block, ln_post and proj train; the text tower not at
                // all. Then the image tower's projection alone, the text tower's last block.
                "ViT" => &[
                    &[],
                    &[(Tower::Image, 2), (Tower::Text, 0)],
                    &[(Tower::Image, 1), (Tower::Text, 2)],
                ],
                // open_clip locks a ResNet whole; its BatchNorm still follows the batch.
                "ResNet" => &[&[], &[(Tower::Image, 0)]],
                // The trunk frozen but its attention pool (and open_clip's head).
                _ => &[&[], &[(Tower::Image, 1)]],
            };
            for micro in [None, Some(3)] {
                for &locks in locks {
                    let label = format!("{name}, micro {micro:?}, locks {locks:?}");
                    let plain = step_case(case, Forward { micro, checkpointing: false }, locks);
                    let ckpt = step_case(case, Forward { micro, checkpointing: true }, locks);
                    assert!(plain.loss.equal(&ckpt.loss), "{label}: loss");
                    assert_bitwise(&format!("{label}: gradient"), &plain.grads, &ckpt.grads);
                    assert_bitwise(&format!("{label}: after the step"), &plain.after, &ckpt.after);
                    assert!(!ckpt.grads.is_empty(), "{label}");
                    if *name == "ResNet" {
                        // Each micro-batch counted once, although checkpointing runs it again.
                        let counted = &ckpt.after["visual.bn1.num_batches_tracked"]
                            - &case.weights["visual.bn1.num_batches_tracked"];
                        let expected = if micro.is_some() { 3 } else { 1 };
                        assert_eq!(counted.int64_value(&[]), expected, "{label}");
                    }
                }
            }
        }
    }

    /// The recomputed stages run in the first pass's autocast, and amp's loss scale reaches
    /// them through the surrogate: under amp (fp16, a loss scale) and amp_bf16 the gradients
    /// with checkpointing are those without it, bit for bit.
    #[test]
    fn checkpointing_composes_with_the_precisions() {
        let kind = LossKind::Clip;
        let (weights, images, tokens) = tiny_inputs(kind, 37, 8);
        for dtype in [LowPrecision::Fp16, LowPrecision::Bf16] {
            let grads = |grad_checkpointing: bool| {
                let vs = nn::VarStore::new(Device::Cpu);
                let model = Clip::new(&vs.root(), &tiny(kind)).unwrap();
                tch::no_grad(|| {
                    for (name, var) in vs.variables() {
                        var.shallow_clone().copy_(&weights[&name]);
                    }
                });
                let config = AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 };
                let mut optimizer = AdamW::new(vs.variables().into_iter().collect(), config);
                let sync = GradSync::for_var_store(&vs, &DistConfig::default()).unwrap();
                let cfg = StepConfig {
                    autocast: Some(Autocast::new(Device::Cpu, dtype).unwrap()),
                    grad_checkpointing,
                    ..step_config(kind, None)
                };
                // A scale small enough that this step's fp16 gradients stay finite (at 2^16
                // they overflow and the step is skipped: nothing to compare).
                let scaling = GradScalerConfig { init_scale: 256.0, ..GradScalerConfig::default() };
                let mut scaler =
                    (dtype == LowPrecision::Fp16).then(|| GradScaler::new(Device::Cpu, scaling));
                let (images, tokens) = (&images, &tokens);
                let comm = &SingleProcess;
                train_step(
                    &model,
                    &mut optimizer,
                    comm,
                    &sync,
                    images,
                    tokens,
                    0.0,
                    0,
                    cfg,
                    scaler.as_mut(),
                )
                .unwrap();
                if let Some(scaler) = &scaler {
                    assert_eq!(scaler.found_inf().double_value(&[]), 0.0, "a skipped step");
                }
                optimizer
                    .variables()
                    .map(|(name, var)| (name.to_owned(), var.grad().copy()))
                    .collect::<BTreeMap<_, _>>()
            };
            assert_bitwise(&format!("{dtype:?}"), &grads(false), &grads(true));
        }
    }

    /// 4 ranks (TCP backend), the reduction overlapped with the backward pass in several
    /// buckets: with checkpointing, buckets still launch during the backward pass, and the
    /// reduced gradients are bit for bit those of the reduction after the backward pass and
    /// those of the same ranks without checkpointing, with and without micro-batches.
    #[test]
    fn checkpointing_keeps_the_overlapped_reduction_exact() {
        let kind = LossKind::Clip;
        let (weights, images, tokens) = tiny_inputs(kind, 29, 32);
        let on = DistConfig { overlap: true, bucket_mb: 0.2, ..DistConfig::default() };
        let after = DistConfig { overlap: false, ..on };
        for micro in [None, Some(3)] {
            let plain = Forward { micro, checkpointing: false };
            let ckpt = Forward { micro, checkpointing: true };
            let reference = on_four_ranks(kind, plain, on, &weights, &images, &tokens);
            let overlapped = on_four_ranks(kind, ckpt, on, &weights, &images, &tokens);
            let later = on_four_ranks(kind, ckpt, after, &weights, &images, &tokens);
            for rank in 0..4 {
                let (loss, grads, launched, buckets) = &overlapped[rank];
                assert!(*buckets > 2 && *launched > 0, "micro {micro:?} rank {rank}: {launched} of {buckets} buckets launched during backward");
                assert_eq!(*loss, reference[rank].0, "micro {micro:?} rank {rank}");
                assert_eq!(
                    grads, &later[rank].1,
                    "micro {micro:?} rank {rank}: overlapped vs after backward"
                );
                assert_eq!(
                    grads, &reference[rank].1,
                    "micro {micro:?} rank {rank}: with vs without checkpointing"
                );
            }
        }
    }

    /// The reduction's hooks watch the step's last backward pass: under checkpointing (several
    /// backward calls, one per stage) each trainable parameter's hook fires exactly once in
    /// it, as without checkpointing, so a bucket is never launched before its gradients are
    /// final.
    #[test]
    fn checkpointing_fires_each_gradient_hook_once() {
        let kind = LossKind::Clip;
        let (weights, images, tokens) = tiny_inputs(kind, 31, 8);
        for micro in [None, Some(3)] {
            let counts = |grad_checkpointing: bool| {
                let vs = nn::VarStore::new(Device::Cpu);
                let model = Clip::new(&vs.root(), &tiny(kind)).unwrap();
                tch::no_grad(|| {
                    for (name, var) in vs.variables() {
                        var.shallow_clone().copy_(&weights[&name]);
                    }
                });
                let towers = Towers {
                    model: &model,
                    images: &images,
                    tokens: &tokens,
                    micro: MicroBatches::new(8, micro),
                    autocast: None,
                    loss_scale: None,
                    kept: None,
                    grad_checkpointing,
                };
                let (features, _, mut kept) = towers.encode_batch();
                // One micro-batch keeps what step 1 ran: checkpointed when asked.
                if micro.is_none() {
                    let checkpointed = kept.as_ref().is_some_and(|k| k.checkpoints.is_some());
                    assert_eq!(checkpointed, grad_checkpointing);
                }
                let spec = step_config(kind, micro).loss;
                let (_, grads) =
                    loss_and_feature_grads(&model, &SingleProcess, &features, spec, 0..8).unwrap();
                let last = towers.micro.len() - 1;
                for k in 0..last {
                    towers.backward(k, kept.take(), &grads);
                }
                let params = vs.trainable_variables();
                let counts = crate::grad_sync::hook_counts(&params, || {
                    towers.backward(last, kept.take(), &grads)
                })
                .unwrap();
                (params.len(), counts)
            };
            let (params, plain) = counts(false);
            let (_, ckpt) = counts(true);
            assert_eq!(plain, vec![1; params], "micro {micro:?}: without checkpointing");
            assert_eq!(ckpt, plain, "micro {micro:?}: with checkpointing");
        }
    }
}
