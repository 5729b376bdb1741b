//! PyTorch's `nn.BatchNorm2d`, for the image towers that have it (OpenAI's ModifiedResNet,
//! MobileCLIP's convolutional stems). In eval mode it normalises with its running statistics;
//! in training mode with the batch's, and folds them into the running ones (momentum 0.1,
//! unbiased variance) unless the forward repeats one already counted (gradient caching's
//! second pass, see [`BnSwitches::count_batches`]).

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::params::{buffer, param};

/// PyTorch's `nn.BatchNorm2d` defaults.
const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

/// `nn.BatchNorm2d` with its running statistics as state_dict buffers.
#[derive(Debug)]
pub struct BatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    /// Training-mode forwards counted (int64), as PyTorch keeps it.
    pub num_batches_tracked: Tensor,
}

/// How a BatchNorm normalises and whether it learns from the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnMode {
    /// Running statistics (`model.eval()`).
    Eval,
    /// Batch statistics; `update`: fold them into the running ones.
    Train { update: bool },
}

impl BatchNorm2d {
    /// `weight` starts at `gain`: 1 as PyTorch's, 0 for a block's last BatchNorm (open_clip
    /// zeroes `bn3.weight` so each residual branch starts as the identity).
    pub fn new(p: nn::Path, channels: i64, gain: f64) -> Self {
        let dims = [channels];
        BatchNorm2d {
            weight: param(&p, "weight", &dims, Init::Const(gain)),
            bias: param(&p, "bias", &dims, Init::Const(0.0)),
            running_mean: buffer(
                &p,
                "running_mean",
                || Tensor::zeros(dims, (Kind::Float, tch::Device::Cpu)),
                &dims,
                Kind::Float,
            ),
            running_var: buffer(
                &p,
                "running_var",
                || Tensor::ones(dims, (Kind::Float, tch::Device::Cpu)),
                &dims,
                Kind::Float,
            ),
            num_batches_tracked: buffer(
                &p,
                "num_batches_tracked",
                || Tensor::zeros([], (Kind::Int64, tch::Device::Cpu)),
                &[],
                Kind::Int64,
            ),
        }
    }

    pub fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let (training, running) = match mode {
            BnMode::Eval => (false, true),
            BnMode::Train { update } => (true, update),
        };
        if training && running {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        // libtorch updates the running statistics in place when they are given in training
        // mode; without them it normalises with the batch's and leaves them alone.
        let (mean, var) = if running {
            (Some(&self.running_mean), Some(&self.running_var))
        } else {
            (None, None)
        };
        Tensor::batch_norm(
            x,
            Some(&self.weight),
            Some(&self.bias),
            mean,
            var,
            training,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

/// What a tower's BatchNorms do in training mode, switched for the whole tower at once.
#[derive(Debug)]
pub struct BnSwitches {
    /// Whether training-mode forwards fold batch statistics into the running ones.
    count_batches: AtomicBool,
    /// Eval mode whatever the model's mode (a locked tower's frozen statistics).
    frozen: AtomicBool,
}

impl Default for BnSwitches {
    fn default() -> Self {
        BnSwitches { count_batches: AtomicBool::new(true), frozen: AtomicBool::new(false) }
    }
}

impl BnSwitches {
    /// Off: training-mode forwards still normalise with the batch's statistics but leave
    /// the running ones (and `num_batches_tracked`) as they are. Gradient caching turns it off
    /// for the pass that repeats each micro-batch's forward with gradients, so that every
    /// micro-batch is counted once.
    pub fn count_batches(&self, on: bool) {
        self.count_batches.store(on, Ordering::Relaxed);
    }

    /// From now on BatchNorm normalises with the running statistics and never updates them,
    /// as open_clip's `freeze_batch_norm_2d` (a locked tower with frozen statistics).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }

    /// The mode of a forward in the model's mode `train`, as the switches are now.
    pub fn mode(&self, train: bool) -> BnMode {
        if train && !self.frozen.load(Ordering::Relaxed) {
            BnMode::Train { update: self.count_batches.load(Ordering::Relaxed) }
        } else {
            BnMode::Eval
        }
    }
}
