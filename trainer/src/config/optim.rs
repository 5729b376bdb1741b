//! `optim:`, AdamW and the learning-rate schedule. The defaults are open_clip's (and the CLIP
//! paper's), each written once, in the [`Default`] impl, which serde fills missing keys from.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::schedule::ScheduleKind;

/// `optim:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate. Default 5e-4.
    pub lr: f64,
    /// Default [0.9, 0.98].
    pub betas: [f64; 2],
    /// Default 1e-6.
    pub eps: f64,
    /// Decoupled weight decay, not applied to gains, biases, LayerNorms and logit_scale.
    /// Default 0.2.
    pub weight_decay: f64,
    /// Linear warmup steps (open_clip's `--warmup`). Default 10000.
    pub warmup_steps: u64,
    /// `cosine`, `const` or `const-cooldown`. Default `cosine`.
    pub schedule: ScheduleKind,
    /// For `const-cooldown`: length of the final decay. Default 0.
    pub cooldown_steps: u64,
    /// For `const-cooldown`: 1 is linear. Default 1.
    pub cooldown_power: f64,
    /// For `const-cooldown`: the learning rate at the last step. Default 0.
    pub cooldown_end_lr: f64,
    /// Clip the global gradient norm to this value; null (the default) = no clipping.
    pub grad_clip_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 5.0e-4,
            betas: [0.9, 0.98],
            eps: 1.0e-6,
            weight_decay: 0.2,
            warmup_steps: 10_000,
            schedule: ScheduleKind::Cosine,
            cooldown_steps: 0,
            cooldown_power: 1.0,
            cooldown_end_lr: 0.0,
            grad_clip_norm: None,
        }
    }
}

impl OptimConfig {
    /// AdamW's settings from this section.
    pub fn adamw(&self) -> crate::optim::AdamWConfig {
        crate::optim::AdamWConfig {
            betas: (self.betas[0], self.betas[1]),
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    pub fn validate(&self, total_steps: u64) -> Result<()> {
        let err = |m: String| Err(TrainError::Config(m));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return err(format!("optim.lr must be a non-negative number, got {}", self.lr));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return err(format!("optim.betas[{i}] must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps > 0.0) {
            return err(format!("optim.eps must be positive, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0) {
            return err(format!(
                "optim.weight_decay must be non-negative, got {}",
                self.weight_decay
            ));
        }
        if self.schedule == ScheduleKind::ConstCooldown && self.cooldown_steps > total_steps {
            return err(format!(
                "optim.cooldown_steps ({}) exceeds train.steps ({total_steps})",
                self.cooldown_steps
            ));
        }
        if let Some(c) = self.grad_clip_norm {
            if !(c > 0.0) {
                return err(format!("optim.grad_clip_norm must be positive or null, got {c}"));
            }
        }
        Ok(())
    }
}
