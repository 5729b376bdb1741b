//! Contrastive losses as plain functions of gathered features: each returns this rank's part of
//! the loss and the gradients for the features and the temperature, with no autograd graph,
//! so the step can exchange and back-propagate them explicitly (DESIGN.md section 2).

pub mod clip;

use tch::Tensor;

/// One rank's share of a contrastive loss over the global batch, and its gradients.
#[derive(Debug)]
pub struct LossOutput {
    /// This rank's part; the global loss is the sum over ranks. 0-dim, fp32.
    pub loss: Tensor,
    /// d loss / d image features: (N, d), non-zero beyond the owned rows.
    pub grad_image: Tensor,
    /// d loss / d text features: (N, d).
    pub grad_text: Tensor,
    /// d loss / d logit_scale (the log of the scale). 0-dim.
    pub grad_logit_scale: Tensor,
}
