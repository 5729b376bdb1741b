//! The machinery of `train.precision` below the config: autocast on the calling thread for the
//! CPU or CUDA ([`autocast`]), and the dynamic loss scale of fp16 training ([`scaler`]). What
//! each precision turns on is decided once, when the run starts (`config::Precision` maps the
//! setting to these pieces); the step only holds them.
//!
//! | `train.precision` | towers | weights, gradients, AdamW state | loss | loss scale |
//! |---|---|---|---|---|
//! | `fp32` | fp32 | fp32 | fp32 | none |
//! | `amp` | fp16 autocast | fp32 | fp32 | dynamic ([`scaler::GradScaler`]) |
//! | `amp_bf16` | bf16 autocast | fp32 | bf16 products, fp32 sums | none |
//! | `pure_bf16` | bf16 (the weights') | bf16 | fp32 on the bf16 features | none |

pub mod autocast;
pub mod scaler;

pub use autocast::{Autocast, AutocastGuard, LowPrecision};
pub use scaler::{GradScaler, GradScalerConfig, GradScalerState};
