//! `train:`, the loop: how long, how big a batch, where and in what precision, how often to
//! log, save and evaluate, what is frozen, which signals stop the run cleanly.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Result, TrainError};
use crate::model::ModelConfig;
use crate::precision::LowPrecision;

/// `train.precision`, open_clip's `--precision` of the same name (docs/training.md,
/// "Precision"). What each turns on is listed in `crate::precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// fp16 autocast for the towers, fp32 weights, gradients, optimizer and loss, and a dynamic
    /// loss scale (torch's GradScaler: skips a step with inf/NaN gradients).
    Amp,
    /// bf16 autocast for the towers (CPU and CUDA), fp32 weights, gradients and optimizer; the
    /// loss's products take bf16 inputs.
    #[serde(alias = "amp_bfloat16")]
    AmpBf16,
    /// Weights, gradients and AdamW state in bf16, no autocast (open_clip's `model.to(bf16)`);
    /// the loss in fp32 on the bf16 features.
    PureBf16,
}

impl Precision {
    /// The config value as written (`amp_bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Amp => "amp",
            Precision::AmpBf16 => "amp_bf16",
            Precision::PureBf16 => "pure_bf16",
        }
    }

    /// The precision the towers run in under autocast; `None`: no autocast (the weights').
    pub fn autocast(self) -> Option<LowPrecision> {
        match self {
            Precision::Amp => Some(LowPrecision::Fp16),
            Precision::AmpBf16 => Some(LowPrecision::Bf16),
            Precision::Fp32 | Precision::PureBf16 => None,
        }
    }

    /// Whether the loss is scaled (fp16 gradients underflow without it).
    pub fn scales_loss(self) -> bool {
        self == Precision::Amp
    }

    /// The kind of the weights, their gradients and AdamW's moments.
    pub fn weights_kind(self) -> Kind {
        match self {
            Precision::PureBf16 => Kind::BFloat16,
            _ => Kind::Float,
        }
    }

    /// Whether the loss's matrix products take bf16 inputs (as autocast runs open_clip's
    /// logits under amp_bf16).
    pub fn bf16_loss_products(self) -> bool {
        self == Precision::AmpBf16
    }

    fn uses_bf16(self) -> bool {
        matches!(self, Precision::AmpBf16 | Precision::PureBf16)
    }

    /// Whether this CPU has instructions for this precision's products: AVX512-BF16 for bf16
    /// (every CPU with AMX has it too), AVX512-FP16 for amp's fp16. fp32 needs none.
    fn cpu_has_instructions(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Precision::Fp32 => true,
                Precision::Amp => std::arch::is_x86_feature_detected!("avx512fp16"),
                Precision::AmpBf16 | Precision::PureBf16 => {
                    std::arch::is_x86_feature_detected!("avx512bf16")
                }
            }
        }
        // Elsewhere (Arm's BF16 and FP16 extensions) there is no stable check: no warning.
        #[cfg(not(target_arch = "x86_64"))]
        {
            true
        }
    }

    /// Fails, naming `setting` (`train.precision`, `--precision`), when `device` cannot run
    /// this precision: bf16 on a CUDA device older than compute capability 8.0 (Ampere), whose
    /// GEMMs have no bf16 (torch would emulate it, several times slower than fp32). fp16 runs
    /// on every CUDA device libtorch 2.11 supports, and every precision on every CPU (bf16 is
    /// fast where the CPU has AVX512-BF16 or AMX, converted through fp32 elsewhere).
    pub fn check_device(self, device: Device, setting: &str) -> Result<()> {
        if device == Device::Cpu && !self.cpu_has_instructions() {
            tracing::warn!(
                "{setting}: {}: this CPU has no {} instructions; they are emulated through fp32 \
                 and may run slower than fp32",
                self.name(),
                if self.uses_bf16() { "AVX512-BF16" } else { "AVX512-FP16" }
            );
        }
        let capability = if device.is_cuda() && self.uses_bf16() {
            let found = crate::device::cuda_compute_capability(device);
            if found.is_none() {
                tracing::warn!(
                    "{setting}: {}: the compute capability of {} is unknown (the CUDA runtime did not say); \
                     bf16 needs 8.0 or newer",
                    self.name(),
                    crate::device::name(device)
                );
            }
            found
        } else {
            None
        };
        self.check(device, capability, setting)
    }

    /// [`check_device`](Self::check_device) given the device's compute capability (`None`:
    /// not CUDA, or unknown).
    fn check(self, device: Device, capability: Option<(i32, i32)>, setting: &str) -> Result<()> {
        match capability {
            Some((major, minor)) if self.uses_bf16() && major < 8 => {
                Err(TrainError::Config(format!(
                    "{setting}: {} needs bf16, which {} (compute capability {major}.{minor}) does not \
                     run natively (bf16 needs 8.0 or newer: A100, H100, RTX 30xx and later); use amp \
                     (fp16 with a loss scale) or fp32 on this GPU",
                    self.name(),
                    crate::device::name(device)
                )))
            }
            _ => Ok(()),
        }
    }
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
    /// `fp32`, `amp` (fp16 autocast and a loss scale), `amp_bf16` (bf16 autocast) or
    /// `pure_bf16` (bf16 weights and optimizer state). Default `amp_bf16`.
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
    /// With `lock_text` on a Hugging Face text tower: its frozen layers' LayerNorms freeze
    /// too (open_clip's `--lock-text-freeze-layer-norm`); otherwise they go on training, as
    /// under open_clip's default. open_clip's own text transformer freezes them either way.
    #[serde(default)]
    pub lock_text_freeze_layer_norm: bool,
    /// Patch dropout for this run, over the model's `vision_cfg.patch_dropout` (open_clip's
    /// `--force-patch-dropout`): the fraction of patch tokens each image drops in training, in
    /// [0, 1); 0 turns it off, e.g. for a final unmasked phase resumed from a run that
    /// dropped. Towers with patch tokens only (not ResNets, ConvNeXt, `vit_relpos_*`). Default:
    /// the model's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_patch_dropout: Option<f64>,
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

impl TrainConfig {
    /// The patch dropout rate the run trains with, and the key that set it:
    /// `train.force_patch_dropout` when given, else the model's `vision_cfg.patch_dropout`.
    pub fn patch_dropout(&self, model: &ModelConfig) -> (f64, &'static str) {
        match self.force_patch_dropout {
            Some(rate) => (rate, "train.force_patch_dropout"),
            None => (model.vision_cfg.patch_dropout, "vision_cfg.patch_dropout"),
        }
    }
}

/// Checks a patch dropout rate given for `model`, named `key` in the message (the run's
/// `train.force_patch_dropout`, `oxclip bench --patch-dropout`): in [0, 1), and above 0 only for
/// an image tower whose patch tokens can be dropped (`model::patchless_tower` names the others),
/// as open_clip's `PatchDropout` asserts.
pub fn check_patch_dropout(key: &str, rate: f64, model: &ModelConfig) -> Result<()> {
    if !(0.0..1.0).contains(&rate) {
        return Err(TrainError::Config(format!(
            "{key} must be in [0, 1) (the fraction of patches dropped; 0 turns it off), got {rate}"
        )));
    }
    if let Some(tower) = crate::model::patchless_tower(&model.vision_cfg).filter(|_| rate > 0.0) {
        return Err(TrainError::Config(format!(
            "{key} ({rate}) drops patch tokens, which the model's {tower} image tower cannot drop; \
             remove it or set it to 0 (patch dropout is for ViTs)"
        )));
    }
    Ok(())
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

    #[test]
    fn precisions_read_as_open_clip_writes_them() {
        for (text, want) in [
            ("fp32", Precision::Fp32),
            ("amp", Precision::Amp),
            ("amp_bf16", Precision::AmpBf16),
            ("amp_bfloat16", Precision::AmpBf16),
            ("pure_bf16", Precision::PureBf16),
        ] {
            let got: Precision = serde_yaml::from_str(text).unwrap();
            assert_eq!(got, want, "{text}");
            if text != "amp_bfloat16" {
                assert_eq!(got.name(), text);
                assert_eq!(serde_yaml::to_string(&got).unwrap().trim(), text);
            }
        }
        // open_clip's fp16/bf16 (half weights with fp32 LayerNorms) and pure_fp16 are not ours.
        let err = serde_yaml::from_str::<Precision>("pure_fp16").unwrap_err().to_string();
        assert!(err.contains("pure_fp16") && err.contains("amp_bf16"), "{err}");
    }

    /// bf16 on a GPU without it is refused naming the setting and what to use instead; fp16
    /// runs there, and every precision on the CPU and on Ampere or newer.
    #[test]
    fn bf16_on_a_gpu_without_it_is_an_error_naming_the_setting() {
        let all = [Precision::Fp32, Precision::Amp, Precision::AmpBf16, Precision::PureBf16];
        for p in all {
            assert!(p.check(Device::Cpu, None, "train.precision").is_ok());
            assert!(p.check(Device::Cuda(0), Some((8, 0)), "train.precision").is_ok());
            assert!(p.check(Device::Cuda(0), Some((9, 0)), "train.precision").is_ok());
        }
        for p in [Precision::Fp32, Precision::Amp] {
            assert!(p.check(Device::Cuda(1), Some((7, 5)), "train.precision").is_ok());
        }
        for (p, setting) in
            [(Precision::AmpBf16, "train.precision"), (Precision::PureBf16, "--precision")]
        {
            let err = p.check(Device::Cuda(1), Some((7, 5)), setting).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{setting}: {}", p.name()))
                    && err.contains("cuda:1 (compute capability 7.5)")
                    && err.contains("use amp"),
                "{err}"
            );
        }
    }
}
