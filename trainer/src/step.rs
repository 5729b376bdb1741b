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

    // 2. Gather detached features from every rank: (N, d), N = W n.
    let all_image = comm.all_gather(&image_features.detach().to_kind(Kind::Float))?;
    let all_text = comm.all_gather(&text_features.detach().to_kind(Kind::Float))?;

    // 3. This rank's rows of the loss, and the feature and temperature gradients.
    let out = loss::clip::clip_loss(&all_image, &all_text, &model.logit_scale.detach(), rank * n..rank * n + n);

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
