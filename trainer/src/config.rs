//! The trainer's part of a run config: how long, how to optimise, how ranks talk. Each
//! struct is one YAML section; `launch` gathers them with the model, the data (owned by the
//! loader, `oxclip_data_loader::config`) and the loss (`crate::loss`) into the run config.
//! Defaults are open_clip's (and the CLIP paper's) unless a comment says otherwise.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::ModelConfig;
use crate::schedule::ScheduleKind;

pub use crate::loss::{LossConfig, LossKind, Tiling};
pub use oxclip_data_loader::config::DataConfig;

/// Every check a run config's sections get before anything runs, in one place: `oxclip
/// train`, `oxclip config show` and the training loop (`train::fit`) all call it, so they
/// accept and refuse the same configs with the same messages. Checks that need the sections
/// together (the cooldown against the step count, SigLIP's bias on the model, the model's
/// image statistics under `data:`) live here too.
pub fn validate(
    model: &ModelConfig,
    data: &DataConfig,
    train: &TrainConfig,
    optim: &OptimConfig,
    loss: &LossConfig,
) -> Result<()> {
    model.validate()?;
    train.validate()?;
    optim.validate(train.steps)?;
    loss.validate(model)?;
    crate::prepare::data_preprocess(data, model).map(|_| ())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// bf16 autocast for the towers on CUDA, fp32 weights, optimizer and loss. Runs as fp32
    /// on CPU.
    AmpBf16,
}

/// `eval:` — sets evaluated every `train.eval_every` steps (and at the end) besides
/// `data.val`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Each logged under `val/<name>-...`; see docs/evaluation.md.
    #[serde(default)]
    pub datasets: Vec<EvalDataset>,
}

/// One set of `eval.datasets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDataset {
    /// Names its TensorBoard tags (`val/<name>-zeroshot-top1`) and its entry in
    /// `<run_dir>/eval/<step>.json`.
    pub name: String,
    /// A set that names its own classes: `imagenet1k:DIR`, `wds:DIR` or a clip_benchmark
    /// dataset directory.
    pub spec: String,
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

/// `optim:` — AdamW and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, not applied to gains, biases, LayerNorms and logit_scale.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Linear warmup steps (open_clip's `--warmup`, default 10000).
    #[serde(default = "default_warmup_steps")]
    pub warmup_steps: u64,
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    /// For `const-cooldown`: length of the final decay.
    #[serde(default)]
    pub cooldown_steps: u64,
    /// For `const-cooldown`: 1 is linear.
    #[serde(default = "default_cooldown_power")]
    pub cooldown_power: f64,
    /// For `const-cooldown`: the learning rate at the last step.
    #[serde(default)]
    pub cooldown_end_lr: f64,
    /// Clip the global gradient norm to this value; null = no clipping.
    #[serde(default)]
    pub grad_clip_norm: Option<f64>,
}

fn default_lr() -> f64 {
    5.0e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.98]
}
fn default_eps() -> f64 {
    1.0e-6
}
fn default_weight_decay() -> f64 {
    0.2
}
fn default_warmup_steps() -> u64 {
    10_000
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_cooldown_power() -> f64 {
    1.0
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            warmup_steps: default_warmup_steps(),
            schedule: default_schedule(),
            cooldown_steps: 0,
            cooldown_power: default_cooldown_power(),
            cooldown_end_lr: 0.0,
            grad_clip_norm: None,
        }
    }
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
        crate::preempt::validate(&self.preempt_signals)?;
        crate::device::parse(&self.device).map(|_| ())
    }
}

impl OptimConfig {
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

/// `dist:` — how ranks talk to each other (the world itself comes from the environment:
/// torchrun, SLURM or `oxclip launch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// `auto` (NCCL on CUDA, else cpu), `nccl` or `cpu`.
    #[serde(default = "default_backend")]
    pub backend: crate::collectives::Backend,
    /// How long a collective or the start-up rendezvous waits for a peer before the run
    /// fails, naming the collective. Must exceed the longest pause of one rank (rank 0's
    /// zero-shot evaluation, a checkpoint write).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Sum each bucket of gradients as soon as the backward pass has produced it, while the
    /// pass goes on (PyTorch DDP's overlap); false: all of them after it.
    #[serde(default = "default_overlap")]
    pub overlap: bool,
    /// Gradient bucket size in MB (1e6 bytes, fp32): DDP's `bucket_cap_mb`.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// `fp32`, or `bf16` (DDP's bf16 compression hook: half the bytes, the sum rounded to
    /// bf16). Features are exchanged in their own precision either way.
    #[serde(default = "default_grad_reduce_dtype")]
    pub grad_reduce_dtype: crate::collectives::ReduceDtype,
}

impl DistConfig {
    /// The gradient reduction the step runs.
    pub fn reduce(&self) -> crate::collectives::ReduceConfig {
        crate::collectives::ReduceConfig {
            overlap: self.overlap,
            bucket_mb: self.bucket_mb,
            dtype: self.grad_reduce_dtype,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.reduce().validate()
    }
}

fn default_backend() -> crate::collectives::Backend {
    crate::collectives::Backend::Auto
}
fn default_timeout_s() -> u64 {
    600
}
fn default_overlap() -> bool {
    true
}
fn default_bucket_mb() -> f64 {
    25.0
}
fn default_grad_reduce_dtype() -> crate::collectives::ReduceDtype {
    crate::collectives::ReduceDtype::Fp32
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            timeout_s: default_timeout_s(),
            overlap: default_overlap(),
            bucket_mb: default_bucket_mb(),
            grad_reduce_dtype: default_grad_reduce_dtype(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_gradient_reduction_keys() {
        let dist: DistConfig = serde_yaml::from_str("backend: cpu\n").unwrap();
        let reduce = dist.reduce();
        assert!(reduce.overlap);
        assert_eq!((reduce.bucket_mb, reduce.dtype), (25.0, crate::collectives::ReduceDtype::Fp32));
        let bf16: DistConfig =
            serde_yaml::from_str("overlap: false\nbucket_mb: 0.5\ngrad_reduce_dtype: bf16\n")
                .unwrap();
        assert_eq!(
            bf16.reduce(),
            crate::collectives::ReduceConfig {
                overlap: false,
                bucket_mb: 0.5,
                dtype: crate::collectives::ReduceDtype::Bf16
            }
        );
        bf16.validate().unwrap();

        let zero: DistConfig = serde_yaml::from_str("bucket_mb: 0\n").unwrap();
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("dist.bucket_mb"), "{err}");
        let err = serde_yaml::from_str::<DistConfig>("grad_reduce_dtype: fp16\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("grad_reduce_dtype") && err.contains("fp16"), "{err}");
    }
}
