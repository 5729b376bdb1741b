//! The `data:` section of a run config: what the loader reads and how. It lives here, with
//! the loader that uses it; the trainer adds what needs the model (the image preprocessing
//! with the model's defaults, the tokenizer checked against the text tower).

use serde::{Deserialize, Serialize};

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
    pub resize_mode: Option<crate::ResizeMode>,
    /// Evaluation resize filter: `bicubic` or `bilinear`; default the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation: Option<crate::Interpolation>,
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
    /// Write the keys of every training batch to `RUN/keys-rank<R>.tsv` (`step<TAB>key ...`),
    /// to audit what a run saw.
    #[serde(default)]
    pub log_keys: bool,
    /// Training augmentations (open_clip's `aug_cfg`): `scale`, `ratio`, `color_jitter`,
    /// `color_jitter_prob`, `gray_scale_prob`; the defaults are open_clip's crop alone.
    #[serde(default, skip_serializing_if = "crate::augment::Augment::is_default")]
    pub augment: crate::augment::Augment,
}

impl DataConfig {
    /// How the loader streams shards.
    pub fn shard_options(&self) -> crate::ShardOptions {
        crate::ShardOptions {
            shuffle_buffer: self.shuffle_buffer,
            resampled: self.resampled,
            upsampling_factors: self.upsampling_factors.clone(),
            samples_per_epoch: self.samples_per_epoch,
            shard_sizes: self.shard_sizes.as_ref().map(std::path::PathBuf::from),
        }
    }
}

fn default_shuffle_buffer() -> usize {
    crate::plan::stream::DEFAULT_SHUFFLE_BUFFER
}

fn default_val_name() -> String {
    "val".into()
}
fn default_workers() -> usize {
    4
}
