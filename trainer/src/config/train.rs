//! `train:`, the loop: how long, how big a batch, where and in what precision, how often to
//! log, save and evaluate, what is frozen, which signals stop the run cleanly.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// bf16 autocast for the towers on CUDA, fp32 weights, optimizer and loss. Runs as fp32
    /// on CPU.
    AmpBf16,
}

/// `train:` — the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Samples per rank per step; the global batch is this times the world size.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Gradient caching (GradCache): run the towers this many samples at a time, so
    /// activation memory follows the micro-batch while the loss still scores the whole global
    /// batch. The update equals the one without micro-batches. Default: the whole batch at
    /// once. See docs/large-batch.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_size: Option<usize>,
    /// Activation checkpointing (open_clip's `--grad-checkpointing`): each tower keeps only
    /// the input of each stage (stem, residual block, ResNet bottleneck) and recomputes the
    /// stage in the backward pass: activation memory of about one stage instead of all of
    /// them, for about one more forward pass per step. The gradients are unchanged. Default:
    /// false. See docs/training.md.
    #[serde(default)]
    pub grad_checkpointing: bool,
    /// Optimizer steps in the whole run.
    pub steps: u64,
    /// Seeds initialisation, shuffling and augmentation.
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Save a checkpoint every this many steps (and at the end); 0 = only at the end.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept in `<run_dir>/checkpoints`; older ones are deleted.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// Write metrics every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Evaluate every this many steps (and at the end); 0 = only at the end.
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// libtorch CPU threads; default: all cores.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Freeze the image tower (LiT; open_clip's `--lock-image`), except its last
    /// `lock_image_unlocked_groups` groups.
    #[serde(default)]
    pub lock_image: bool,
    #[serde(default)]
    pub lock_image_unlocked_groups: usize,
    /// With `lock_image`: BatchNorm layers of the image tower (ModifiedResNet) normalise with
    /// their running statistics and stop updating them, as open_clip's
    /// `--lock-image-freeze-bn-stats`; otherwise they follow each batch, as in open_clip.
    #[serde(default)]
    pub lock_image_freeze_bn_stats: bool,
    /// Freeze the text tower (open_clip's `--lock-text`), except its last
    /// `lock_text_unlocked_layers` groups.
    #[serde(default)]
    pub lock_text: bool,
    #[serde(default)]
    pub lock_text_unlocked_layers: usize,
    /// Signals that stop the run cleanly: every rank checkpoints after the same step and the
    /// process exits 0, so `--resume auto` continues it (SLURM's `--signal`, its SIGTERM
    /// before a preemption kill). `[]` leaves every signal its default action.
    #[serde(default = "default_preempt_signals")]
    pub preempt_signals: Vec<String>,
}

fn default_batch_size() -> usize {
    256
}
fn default_precision() -> Precision {
    Precision::AmpBf16
}
fn default_device() -> String {
    "auto".into()
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_keep_checkpoints() -> usize {
    3
}
fn default_log_every() -> u64 {
    10
}
fn default_eval_every() -> u64 {
    1000
}
fn default_preempt_signals() -> Vec<String> {
    vec!["SIGTERM".into(), "SIGUSR1".into()]
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let err = |m: &str| Err(TrainError::Config(m.to_string()));
        if self.batch_size == 0 {
            return err("train.batch_size must be at least 1");
        }
        match self.micro_batch_size {
            Some(0) => return err("train.micro_batch_size must be at least 1 (or absent for the whole batch at once)"),
            Some(m) if m > self.batch_size => {
                return Err(TrainError::Config(format!(
                    "train.micro_batch_size ({m}) exceeds train.batch_size ({}); it splits the per-rank batch",
                    self.batch_size
                )))
            }
            _ => {}
        }
        if self.steps == 0 {
            return err("train.steps must be at least 1");
        }
        if self.log_every == 0 {
            return err("train.log_every must be at least 1");
        }
        if self.keep_checkpoints == 0 {
            return err("train.keep_checkpoints must be at least 1");
        }
        if self.threads == Some(0) {
            return err("train.threads must be at least 1 (or absent for all cores)");
        }
        validate_signals(&self.preempt_signals)?;
        crate::device::parse(&self.device).map(|_| ())
    }
}

/// The signals `train.preempt_signals` may name. SIGKILL and SIGSTOP cannot be caught.
pub const SIGNALS: [(&str, libc::c_int); 6] = [
    ("SIGTERM", libc::SIGTERM),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGINT", libc::SIGINT),
    ("SIGHUP", libc::SIGHUP),
    ("SIGQUIT", libc::SIGQUIT),
];

/// The number of a signal named `SIGTERM` (or `TERM`); `None` for a name not in the list.
pub fn signal_number(name: &str) -> Option<libc::c_int> {
    let full = if name.starts_with("SIG") { name.to_string() } else { format!("SIG{name}") };
    SIGNALS.iter().find(|(n, _)| *n == full).map(|&(_, s)| s)
}

/// Checks `train.preempt_signals`.
fn validate_signals(names: &[String]) -> Result<()> {
    for name in names {
        if signal_number(name).is_none() {
            let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            return Err(TrainError::Config(format!(
                "train.preempt_signals: unknown or uncatchable signal `{name}`; use some of {} (or [] to turn preemption handling off)",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_map_to_signals_and_unknown_ones_name_the_key() {
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("USR1"), Some(libc::SIGUSR1));
        assert_eq!(signal_number("SIGKILL"), None);
        assert!(validate_signals(&["SIGTERM".into(), "SIGUSR1".into()]).is_ok());
        assert!(validate_signals(&[]).is_ok());
        let err = validate_signals(&["SIGKILL".into()]).expect_err("uncatchable").to_string();
        assert!(err.contains("train.preempt_signals") && err.contains("SIGKILL"), "{err}");
    }
}
