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
//! Modules stand on floors, each using only the floors below it (`FLOORS` in
//! `launch/tests/module_layers.rs` holds this list against the code):
//! 0. `error`, `schedule`, `fault` (faults injected by the tests, in test builds only),
//!    `json_keys` (typed keys of a JSON object);
//! 1. `bytes`, `device`, `generate` (captions from a captioning model's logits: open_clip's
//!    beam search and sampling), `metrics`, `optim`, `precision` (autocast on any device, the
//!    loss scale of fp16 training), `run_lock` (one run per run folder);
//! 2. `model` (the architectures and their configs);
//! 3. `interchange` (files in and out: safetensors, Hugging Face and open_clip layouts, model
//!    directories, export), `prepare` (a model's own tokenizer and image preprocessing);
//! 4. `config` (the run config: read, resolved, defaulted and checked in one place);
//! 5. `collectives`, `loss`, `checkpoint`, `infer`;
//! 6. `grad_sync` (the gradient buckets), `preempt` (stopping cleanly on a signal),
//!    `weights_path` (what a path given for weights is), `eval`;
//! 7. `step`;
//! 8. `train` (the loop, on all of the above), `bench`.

pub mod bench;
mod bytes;
pub mod checkpoint;
pub mod collectives;
pub mod config;
pub mod device;
pub mod error;
pub mod eval;
pub mod fault;
pub mod generate;
pub mod grad_sync;
pub mod infer;
pub mod interchange;
pub mod json_keys;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod precision;
pub mod preempt;
pub mod prepare;
pub mod run_lock;
pub mod schedule;
pub mod step;
pub mod train;
pub mod weights_path;

pub use error::{Result, TrainError};
