//! The trainer's part of a run config: what to train on, how long, how to optimise. Each
//! struct is one YAML section; `launch` gathers them with the model into the run config.
//! Defaults are open_clip's (and the CLIP paper's) unless a comment says otherwise.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::ModelConfig;
use crate::schedule::ScheduleKind;

/// `data:` — where samples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training data: shards (`dir/{00000..00099}.tar`, a directory of .tar files,
    /// `pipe:CMD`, several joined with `::`), a CSV/TSV, JSONL or image folder, or
    /// `synthetic:N` (N generated samples addressed by index). See docs/data.md.
    pub train: String,
    /// Held-out data for zero-shot evaluation: shards whose samples carry a `.cls` label.
    #[serde(default)]
    pub val: Option<String>,
    /// Name of the validation set in metric tags: `val/<val_name>-zeroshot-top1`.
    #[serde(default = "default_val_name")]
    pub val_name: String,
    /// Class names for zero-shot evaluation, one per line; line i names label i.
    #[serde(default)]
    pub classnames: Option<String>,
    /// Prompt templates, one per line with `{}` for the class name. Default: OpenAI's 80
    /// ImageNet templates.
    #[serde(default)]
    pub templates: Option<String>,
    /// Decode/augment threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// A tokenizer.json (or a Hugging Face model directory holding one) to use instead of the
    /// CLIP BPE; prepared as the model's config says (see docs/models.md), and refused when
    /// its ids exceed `text_cfg.vocab_size` or the text tower would pool at the wrong place.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Per-channel mean the images are normalised with; default the model's (OpenAI's, or
    /// 0.5 for SigLIP models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_mean: Option<[f32; 3]>,
    /// Per-channel standard deviation; default the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_std: Option<[f32; 3]>,
    /// Evaluation resize: `shortest` (shorter side, centre crop), `squash` (both sides) or
    /// `longest` (longer side, padded square); default the model's. Training always takes
    /// open_clip's random resized crop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_mode: Option<oxclip_data_loader::ResizeMode>,
    /// Evaluation resize filter: `bicubic` or `bilinear`; default the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation: Option<oxclip_data_loader::Interpolation>,
    /// Shards: samples each loader worker shuffles within (open_clip's 5000); 1 reads in order.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Shards: draw shards with replacement each epoch (open_clip's `--dataset-resampled`).
    #[serde(default)]
    pub resampled: bool,
    /// Shards, with `resampled`: a sampling weight per `::` source of `train`
    /// (open_clip's `--train-data-upsampling-factors`).
    #[serde(default)]
    pub upsampling_factors: Option<Vec<f64>>,
    /// Shards, with `resampled`: samples per virtual epoch (open_clip's `--train-num-samples`);
    /// default all samples of the shards.
    #[serde(default)]
    pub samples_per_epoch: Option<u64>,
    /// Write the keys of every training batch to `RUN/keys-rank<R>.tsv` (`step<TAB>key ...`),
    /// to audit what a run saw.
    #[serde(default)]
    pub log_keys: bool,
    /// Training augmentations (open_clip's `aug_cfg`): `scale`, `ratio`, `color_jitter`,
    /// `color_jitter_prob`, `gray_scale_prob`; the defaults are open_clip's crop alone.
    #[serde(default, skip_serializing_if = "oxclip_data_loader::augment::Augment::is_default")]
    pub augment: oxclip_data_loader::augment::Augment,
}

impl DataConfig {
    /// The model's image preprocessing ([`crate::prepare::default_preprocess`]) with this
    /// section's `image_mean`, `image_std`, `resize_mode` and `interpolation` over it.
    pub fn preprocess(&self, model: &ModelConfig) -> Result<oxclip_data_loader::Preprocess> {
        let mut p = crate::prepare::default_preprocess(model);
        if let Some(mean) = self.image_mean {
            p.mean = mean;
        }
        if let Some(std) = self.image_std {
            if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                return Err(TrainError::Config(format!("data.image_std: every value must be positive, got {std:?}")));
            }
            p.std = std;
        }
        if let Some(mode) = self.resize_mode {
            p.resize_mode = mode;
        }
        if let Some(interpolation) = self.interpolation {
            p.interpolation = interpolation;
        }
        self.augment.validate().map_err(TrainError::Config)?;
        p.augment = self.augment;
        Ok(p)
    }

    /// How the loader streams shards.
    pub fn shard_options(&self) -> oxclip_data_loader::ShardOptions {
        oxclip_data_loader::ShardOptions {
            shuffle_buffer: self.shuffle_buffer,
            resampled: self.resampled,
            upsampling_factors: self.upsampling_factors.clone(),
            samples_per_epoch: self.samples_per_epoch,
        }
    }
}

fn default_shuffle_buffer() -> usize {
    oxclip_data_loader::stream::DEFAULT_SHUFFLE_BUFFER
}

fn default_val_name() -> String {
    "val".into()
}
fn default_workers() -> usize {
    4
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Symmetric cross-entropy over the scaled similarities (CLIP).
    #[default]
    Clip,
    /// Pairwise sigmoid loss with a learnable bias (SigLIP). The model gets a `logit_bias`
    /// (init -10) and its `logit_scale` starts at ln 10, unless the model config sets
    /// `init_logit_bias` / `init_logit_scale`.
    Siglip,
}

/// `loss:` — the contrastive objective.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    #[serde(default)]
    pub kind: LossKind,
    /// Side of the similarity tiles scored at a time (0: chosen automatically, 4096): extra
    /// memory O(tile^2) per rank instead of O(n x N). See docs/large-batch.md.
    #[serde(default)]
    pub tile_size: usize,
    /// Build the whole n x N blocks at once instead (the test oracle).
    #[serde(default)]
    pub naive: bool,
}

impl LossConfig {
    /// Fills in what the loss needs from the model and the model config leaves open: for
    /// SigLIP a `logit_bias` starting at -10 and a `logit_scale` starting at ln 10.
    pub fn complete_model(&self, model: &mut ModelConfig) {
        if self.kind == LossKind::Siglip {
            model.init_logit_scale.get_or_insert(crate::loss::siglip::SIGLIP_LOGIT_SCALE_INIT);
            model.init_logit_bias.get_or_insert(crate::loss::siglip::SIGLIP_LOGIT_BIAS_INIT);
        }
    }

    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.kind == LossKind::Siglip && model.init_logit_bias.is_none() {
            return Err(TrainError::Config(
                "loss.kind siglip needs a model with a logit_bias: set model.init_logit_bias (SigLIP uses -10)".into(),
            ));
        }
        Ok(())
    }

    /// How the step computes this loss; `bf16_matmul` under amp_bf16 on CUDA.
    pub fn spec(&self, bf16_matmul: bool) -> crate::loss::LossSpec {
        crate::loss::LossSpec {
            kind: self.kind,
            tile: (!self.naive).then_some(self.tile_size as i64),
            matmul: if bf16_matmul { crate::loss::Matmul::Bf16 } else { crate::loss::Matmul::Fp32 },
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
            return err(format!("optim.weight_decay must be non-negative, got {}", self.weight_decay));
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
}

fn default_backend() -> crate::collectives::Backend {
    crate::collectives::Backend::Auto
}
fn default_timeout_s() -> u64 {
    600
}

impl Default for DistConfig {
    fn default() -> Self {
        Self { backend: default_backend(), timeout_s: default_timeout_s() }
    }
}
