//! The oxclip trainer: the CLIP model (open_clip's architecture and parameter names), the
//! contrastive loss written as explicit feature gradients, the collectives that make one step
//! serve one process or many, AdamW with checkpointable state, learning-rate schedules,
//! checkpoints, TensorBoard metrics, zero-shot evaluation, and the training loop.
//!
//! Where to look: the step is `step::train_step`, the loss `loss::clip`, the collectives
//! `collectives`, the loop `train::fit`. Data comes from `oxclip_data_loader`; the command
//! line lives in the `oxclip` binary, which builds a `train::TrainJob` and calls `fit`.

pub mod bench;
mod bytes;
pub mod checkpoint;
pub mod collectives;
pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod infer;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod prepare;
pub mod schedule;
pub mod step;
pub mod train;
pub mod weights_path;

pub use error::{Result, TrainError};
