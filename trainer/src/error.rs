//! The trainer's error type: every message names the file, key or step it is about.

use std::path::PathBuf;

/// Everything that can go wrong while building, training, saving or evaluating a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error(transparent)]
    Data(#[from] oxclip_data_loader::DataError),

    #[error("invalid model config: {0}")]
    ModelConfig(String),

    #[error("invalid training config: {0}")]
    Config(String),

    /// An input of inference or evaluation (an image, a list of labels or texts, a data set
    /// or class list to score) cannot be used; the message names it and says why.
    #[error("{0}")]
    Input(String),

    /// The labels given to [`crate::infer::Embedder::classify`] cannot rank an image; the
    /// message names the label and says why. The caller names where the labels came from.
    #[error("labels: {0}")]
    Labels(String),

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    /// Writing the checkpoint of `step` failed before it was renamed into place (a full disk,
    /// a quota, a file size limit, an I/O error): what was being done to which file, and the
    /// OS's own words. The checkpoints before it were not touched.
    #[error(
        "checkpoint step {step}: {action} {path} failed: {source}; earlier checkpoints are \
         intact, {} and resume with --resume auto",
        what_to_do(.source)
    )]
    CheckpointWrite { step: u64, action: &'static str, path: PathBuf, source: std::io::Error },

    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },

    /// A path given for weights (`--checkpoint`, `--init`, `--resume`, `init.checkpoint`) that
    /// is none of the things weights come in.
    #[error("{path}: {message}")]
    WeightsPath { path: PathBuf, message: String },

    /// Another run holds the run folder's lock (`run_lock`).
    #[error("the run folder {path} is in use by another run ({holder}): two runs in one folder would mix their checkpoints and logs. Wait for it to end or stop it, or give this run another run_dir (--run-dir)")]
    RunFolderInUse { path: PathBuf, holder: String },

    #[error("device: {0}")]
    Device(String),

    /// A collective or the rendezvous failed: a peer died, stalled, or disagrees.
    #[error("distributed: {0}")]
    Dist(String),

    #[error("step {step}: the loss is not finite ({loss}); lower the learning rate or enable optim.grad_clip_norm")]
    NonFiniteLoss { step: u64, loss: f64 },

    /// Under `train.precision: amp`, every step for a long time had inf/NaN gradients, and
    /// the loss scale halved down to nothing.
    #[error("step {step}: the loss scale of train.precision amp fell to {scale} after {skipped} skipped steps: the gradients are inf or NaN at every scale; train with amp_bf16 or fp32, or lower the learning rate")]
    LossScale { step: u64, scale: f32, skipped: u64 },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// What a user can do about a failed checkpoint write, by its OS cause.
fn what_to_do(source: &std::io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::ENOSPC) => "free space",
        Some(libc::EDQUOT) => "free space within your quota",
        Some(libc::EFBIG) => "raise the file size limit (`ulimit -f`)",
        Some(libc::EIO) => "check the disk (it reported an I/O error)",
        _ => "fix the cause",
    }
}

/// Wraps an `std::io::Error` with the path it happened on.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
