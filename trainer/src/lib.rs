//! The oxclip trainer: the CLIP model (open_clip's architecture and parameter names), the
//! contrastive loss written as explicit feature gradients, the collectives that make one step
//! serve one process or many, AdamW with checkpointable state, learning-rate schedules,
//! checkpoints, TensorBoard metrics, zero-shot evaluation, and the training loop.
//!
//! Where to look: the step is `step::train_step`, the loss `loss::clip`, the collectives
//! `collectives`, the loop `train::fit`. Data comes from `oxclip_data_loader`; the command
//! line lives in the `oxclip` binary, which loads a run config (`config::load`) and calls
//! `train::fit` with it.
//!
//! Modules depend one way, each only on those listed before it:
//! - `error`, `bytes`, `device`, `schedule`, `metrics`, `optim`: nothing of the others;
//! - `model` (the architectures and their configs), `collectives`;
//! - `interchange` (files in and out: safetensors, Hugging Face and open_clip layouts,
//!   model directories, export);
//! - `loss` (the losses and the `loss:` section; it completes the model config for SigLIP),
//!   `prepare` (a model's tokenizer and image preprocessing), `checkpoint`, then
//!   `weights_path` (what a path given for weights is);
//! - `config` (the trainer's sections and the one place every section is checked), `step`,
//!   `eval`, `infer`;
//! - `train` (the loop, on all of the above), `bench`.

pub mod bench;
mod bytes;
pub mod checkpoint;
pub mod collectives;
pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod grad_sync;
pub mod infer;
pub mod interchange;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod preempt;
pub mod prepare;
pub mod schedule;
pub mod step;
pub mod train;
pub mod weights_path;

pub use error::{Result, TrainError};
