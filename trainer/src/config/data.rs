//! `data:`, what the loader reads and how its samples are prepared. The loader itself never
//! sees this section: the trainer hands it the pieces it takes (`ShardOptions`, `Preprocess`,
//! a `Tokenizer`, `LoaderConfig`), built here and in `train.rs`.
//!
//! The image preprocessing keys (`image_mean`, `image_std`, `resize_mode`, `interpolation`)
//! and `tokenizer` may be left out: resolving the run config fills them from the model
//! directory or the model ([`super::resolve`]), so the resolved config names what runs.

use std::path::Path;

use oxclip_data_loader::augment::Augment;
use oxclip_data_loader::plan::stream::{ShardOptions, DEFAULT_SHUFFLE_BUFFER};
use oxclip_data_loader::sources::shards::{read_timeout, DEFAULT_READ_TIMEOUT_S};
use oxclip_data_loader::transform::{Interpolation, Preprocess, ResizeMode};
use oxclip_data_loader::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::ModelConfig;

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
    pub resize_mode: Option<ResizeMode>,
    /// Evaluation resize filter: `bicubic` or `bilinear`; default the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation: Option<Interpolation>,
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
    /// default all samples of the shards. Given, `pipe:` shards without a count are not read
    /// once to count them: each is taken to hold an equal share of it.
    #[serde(default)]
    pub samples_per_epoch: Option<u64>,
    /// Shards: a JSON file of sample counts, `{"00000.tar": n, ...}` (webdataset's
    /// `sizes.json`), for shards without an index beside them (remote `pipe:` shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_sizes: Option<String>,
    /// Shards: seconds a shard read may wait for a byte before the shard is skipped as
    /// `stalled_shard` (a `pipe:` command that hangs, a stalled object store or NFS); 0 or
    /// null: wait for ever. Generous by default, so a slow store that still delivers is never
    /// cut off.
    #[serde(default = "default_read_timeout_s")]
    pub read_timeout_s: Option<f64>,
    /// Write the keys of every training batch to `RUN/keys-rank<R>.tsv` (`step<TAB>key ...`),
    /// to audit what a run saw.
    #[serde(default)]
    pub log_keys: bool,
    /// Training augmentations (open_clip's `aug_cfg`): `scale`, `ratio`, `color_jitter`,
    /// `color_jitter_prob`, `gray_scale_prob`; the defaults are open_clip's crop alone.
    #[serde(default, skip_serializing_if = "Augment::is_default")]
    pub augment: Augment,
}

impl DataConfig {
    /// How the loader streams shards; an error names `data.read_timeout_s` when it is no
    /// number of seconds.
    pub fn shard_options(&self) -> Result<ShardOptions> {
        let read_timeout = read_timeout(self.read_timeout_s)
            .map_err(|e| TrainError::Config(format!("data.read_timeout_s: {e}")))?;
        Ok(ShardOptions {
            shuffle_buffer: self.shuffle_buffer,
            resampled: self.resampled,
            upsampling_factors: self.upsampling_factors.clone(),
            samples_per_epoch: self.samples_per_epoch,
            shard_sizes: self.shard_sizes.as_ref().map(std::path::PathBuf::from),
            read_timeout,
        })
    }

    /// The image preprocessing: the model's ([`crate::prepare::default_preprocess`]) with
    /// this section's `image_mean`, `image_std`, `resize_mode`, `interpolation` and `augment`
    /// over it. In a resolved config every one of those keys is set, so the model's defaults
    /// only matter for a `data:` section read back from an older checkpoint.
    pub fn preprocess(&self, model: &ModelConfig) -> Result<Preprocess> {
        let mut p = crate::prepare::default_preprocess(model);
        if let Some(mean) = self.image_mean {
            p.mean = mean;
        }
        if let Some(std) = self.image_std {
            if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                return Err(TrainError::Config(format!(
                    "data.image_std: every value must be positive, got {std:?}"
                )));
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

    /// `data.tokenizer` (or the CLIP BPE) for `model`, checked against its text tower
    /// ([`crate::prepare::text_tokenizer`]).
    pub fn tokenizer(&self, model: &ModelConfig) -> Result<Tokenizer> {
        crate::prepare::text_tokenizer(self.tokenizer.as_deref().map(Path::new), model).map_err(
            |e| match e {
                TrainError::Input(message) => {
                    TrainError::Config(format!("data.tokenizer: {message}"))
                }
                other => other,
            },
        )
    }
}

fn default_read_timeout_s() -> Option<f64> {
    Some(DEFAULT_READ_TIMEOUT_S)
}

fn default_shuffle_buffer() -> usize {
    DEFAULT_SHUFFLE_BUFFER
}

fn default_val_name() -> String {
    "val".into()
}
fn default_workers() -> usize {
    4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: serde_json::Value) -> ModelConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn data_keys_override_the_model_preprocessing() {
        let siglip = model(serde_json::json!({"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"vocab_size": 400, "pool_type": "last"}}));
        let data: DataConfig = serde_yaml::from_str("train: synthetic:8\nresize_mode: longest\ninterpolation: bilinear\nimage_mean: [0.1, 0.2, 0.3]\n").unwrap();
        let p = data.preprocess(&siglip).unwrap();
        assert_eq!((p.size, p.mean, p.std), (32, [0.1, 0.2, 0.3], [0.5; 3]));
        assert_eq!(
            (p.resize_mode, p.interpolation),
            (ResizeMode::Longest, Interpolation::Bilinear)
        );
        let plain: DataConfig = serde_yaml::from_str("train: synthetic:8\n").unwrap();
        assert_eq!(plain.preprocess(&siglip).unwrap(), Preprocess::siglip(32));
        let bad: DataConfig =
            serde_yaml::from_str("train: synthetic:8\nimage_std: [0.5, 0, 0.5]\n").unwrap();
        assert!(bad.preprocess(&siglip).unwrap_err().to_string().contains("data.image_std"));
        assert!(serde_yaml::from_str::<DataConfig>("train: x\nresize_mode: crop\n").is_err());
    }

    #[test]
    fn read_timeout_s_defaults_to_a_generous_deadline_and_0_or_null_waits_for_ever() {
        use std::time::Duration;
        let timeout = |yaml: &str| {
            serde_yaml::from_str::<DataConfig>(&format!("train: synthetic:8\n{yaml}"))
                .unwrap()
                .shard_options()
                .map(|o| o.read_timeout)
        };
        assert_eq!(timeout("").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(timeout("read_timeout_s: 2.5\n").unwrap(), Some(Duration::from_millis(2500)));
        assert_eq!(timeout("read_timeout_s: 0\n").unwrap(), None);
        assert_eq!(timeout("read_timeout_s: null\n").unwrap(), None);
        let err = timeout("read_timeout_s: -1\n").unwrap_err().to_string();
        assert!(err.contains("data.read_timeout_s: -1 is not a number of seconds"), "{err}");
    }

    #[test]
    fn data_augment_reaches_the_preprocessing_and_is_validated() {
        use oxclip_data_loader::augment::ColorJitter;
        let clip = model(serde_json::json!({"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"vocab_size": 400, "pool_type": "last"}}));
        let data: DataConfig = serde_yaml::from_str(
            "train: synthetic:8\naugment:\n  scale: [0.4, 1.0]\n  color_jitter: [0.4, 0.4, 0.4, 0.1]\n  color_jitter_prob: 0.8\n  gray_scale_prob: 0.2\n",
        )
        .unwrap();
        let p = data.preprocess(&clip).unwrap();
        let jitter = ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1 };
        assert_eq!(
            p.augment,
            Augment {
                scale: [0.4, 1.0],
                color_jitter: Some(jitter),
                color_jitter_prob: Some(0.8),
                gray_scale_prob: 0.2,
                ..Augment::default()
            }
        );
        // Written back (config.yaml, `config show`) only when set.
        assert!(serde_yaml::to_string(&data).unwrap().contains("gray_scale_prob: 0.2"));
        let plain: DataConfig = serde_yaml::from_str("train: synthetic:8\n").unwrap();
        assert!(!serde_yaml::to_string(&plain).unwrap().contains("augment"));
        // Refused as the config is read (so by `config show` as by `train`), naming the key.
        for (yaml, key) in [
            ("scale: [0, 1]", "data.augment.scale"),
            ("ratio: [2, 1]", "data.augment.ratio"),
            ("gray_scale_prob: 2", "data.augment.gray_scale_prob"),
            ("color_jitter: 0.4", "data.augment.color_jitter_prob"),
        ] {
            let err = serde_yaml::from_str::<DataConfig>(&format!(
                "train: synthetic:8\naugment:\n  {yaml}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
        let typo =
            serde_yaml::from_str::<DataConfig>("train: x\naugment:\n  grey_scale_prob: 0.2\n")
                .unwrap_err()
                .to_string();
        assert!(typo.contains("grey_scale_prob"), "{typo}");
    }
}
