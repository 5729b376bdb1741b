//! Weights that come with their own config: a Hugging Face model directory (`config.json` +
//! `model.safetensors`, `pytorch_model.bin` or a sharded index, for `CLIPModel` or
//! `SiglipModel`, which also holds the fixed-resolution SigLIP 2 checkpoints), an open_clip hub
//! directory (`open_clip_config.json` + `open_clip_model.safetensors` or
//! `open_clip_pytorch_model.bin`), or one of OpenAI's files, whose tensors' shapes are its
//! config. [`Pretrained::read`] tells which it is and translates the
//! directory's files into what oxclip builds from: the model in open_clip's schema, the image
//! preprocessing, and the tokenizer files with their settings. What each layout's files say is
//! read in its own file (`hugging_face.rs`, `open_clip.rs`); here are what they share: the
//! tokenizer files, and how a directory's model is compared with one given beside it.

use std::path::{Path, PathBuf};

use oxclip_data_loader::Preprocess;
use serde_json::Value;

use super::hugging_face::{
    model_from_hf_config, preprocess_from_hf, HF_CONFIG, HF_PREPROCESSOR, HF_WEIGHTS_FILES,
};
use super::json::{bad, read_json};
use super::open_clip::{
    model_from_open_clip_config, preprocess_from_open_clip, OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS_FILES,
};
use super::openai::model_from_openai_shapes;
use super::pickle::TorchFile;
use super::Source;
use crate::error::{Result, TrainError};
use crate::model::config::{ModelConfig, TokenizerKwargs};

pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

/// A model directory, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct Pretrained {
    /// The directory (for OpenAI's files, which are their own config, the file).
    pub dir: PathBuf,
    /// The architecture, in open_clip's schema (validated).
    pub model: ModelConfig,
    /// How images are prepared for it.
    pub preprocess: Preprocess,
    /// The tokenizer files beside the weights, when there are any.
    pub tokenizer: Option<TokenizerFiles>,
    /// The weights file (any `weights::read_weights` reads).
    pub weights: PathBuf,
    pub source: Source,
}

/// The tokenizer files of a model directory and what they say about padding and length.
/// The tokenizer itself is built elsewhere (the `tokenizers` crate reads `tokenizer.json`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerFiles {
    pub tokenizer_json: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub special_tokens_map: Option<PathBuf>,
    /// The padding token, from `tokenizer_config.json` (else `special_tokens_map.json`).
    pub pad_token: Option<String>,
    /// `tokenizer_config.json`'s `model_max_length` (absent when it is transformers' "no limit").
    pub model_max_length: Option<u64>,
    /// open_clip directories: `model_cfg.text_cfg.tokenizer_kwargs` (how open_clip's
    /// `HFTokenizer` cleans text); `None` for Hugging Face directories.
    pub open_clip_kwargs: Option<TokenizerKwargs>,
    /// Tokens per caption: the model's context length (padding and truncation go to it).
    pub context_length: i64,
}

impl Pretrained {
    /// Reads the directory `dir`: `open_clip_config.json` (with its weights,
    /// [`open_clip_weights_in`]) first, else `config.json` (with [`hf_weights_in`]).
    pub fn read(dir: &Path) -> Result<Self> {
        if let (true, Some(weights)) =
            (dir.join(OPEN_CLIP_CONFIG).is_file(), open_clip_weights_in(dir))
        {
            return Self::open_clip(&dir.join(OPEN_CLIP_CONFIG), &weights);
        }
        if let (true, Some(weights)) = (dir.join(HF_CONFIG).is_file(), hf_weights_in(dir)) {
            return Self::hugging_face(&dir.join(HF_CONFIG), &weights);
        }
        Err(TrainError::WeightsPath {
            path: dir.into(),
            message: format!(
                "neither {OPEN_CLIP_CONFIG} + {} (open_clip) nor {HF_CONFIG} + {} (Hugging Face)",
                OPEN_CLIP_WEIGHTS_FILES.join(" or "),
                HF_WEIGHTS_FILES.join(" or ")
            ),
        })
    }

    /// One of OpenAI's own files (`clip.load`'s TorchScript archives), which say their
    /// architecture only by their tensors' shapes ([`model_from_openai_shapes`]); images are
    /// prepared as OpenAI's, text by the CLIP BPE. Reads the archive's pickle, not its weights.
    pub fn openai(path: &Path) -> Result<Self> {
        let file = TorchFile::open(path)?;
        let shapes = file.tensor_refs()?.into_iter().map(|(name, t)| (name, t.size.clone()));
        let model = model_from_openai_shapes(&shapes.collect()).map_err(|m| bad(path, m))?;
        model.validate().map_err(|e| bad(path, e.to_string()))?;
        let preprocess = Preprocess::openai(model.vision_cfg.image_size as u32);
        Ok(Pretrained {
            dir: path.into(),
            model,
            preprocess,
            tokenizer: None,
            weights: path.into(),
            source: Source::OpenAi,
        })
    }

    /// A Hugging Face `CLIPModel` / `SiglipModel` directory: `config` is its `config.json`.
    pub fn hugging_face(config: &Path, weights: &Path) -> Result<Self> {
        let dir = parent(config);
        let json = read_json(config)?;
        let (source, model) = model_from_hf_config(&json).map_err(|m| bad(config, m))?;
        model.validate().map_err(|e| bad(config, e.to_string()))?;
        let size = model.vision_cfg.image_size;
        let preprocessor = dir.join(HF_PREPROCESSOR);
        let preprocess = if preprocessor.is_file() {
            preprocess_from_hf(&read_json(&preprocessor)?, size)
                .map_err(|m| bad(&preprocessor, m))?
        } else if source == Source::HfSiglip {
            Preprocess::siglip(size as u32)
        } else {
            Preprocess::openai(size as u32)
        };
        let tokenizer = tokenizer_files(&dir, &model, None)?;
        Ok(Pretrained { dir, model, preprocess, tokenizer, weights: weights.into(), source })
    }

    /// An open_clip hub directory: `config` is its `open_clip_config.json`.
    pub fn open_clip(config: &Path, weights: &Path) -> Result<Self> {
        let dir = parent(config);
        let json = read_json(config)?;
        let model = model_from_open_clip_config(&json).map_err(|m| bad(config, m))?;
        model.validate().map_err(|e| bad(config, e.to_string()))?;
        let preprocess =
            preprocess_from_open_clip(json.get("preprocess_cfg"), model.vision_cfg.image_size)
                .map_err(|m| bad(config, format!("preprocess_cfg: {m}")))?;
        let kwargs = model.text_cfg.tokenizer_kwargs.clone().unwrap_or_default();
        let tokenizer = tokenizer_files(&dir, &model, Some(kwargs))?;
        Ok(Pretrained {
            dir,
            model,
            preprocess,
            tokenizer,
            weights: weights.into(),
            source: Source::OpenClip,
        })
    }
}

/// The open_clip weights file of `dir`, the first of [`OPEN_CLIP_WEIGHTS_FILES`] there is.
pub fn open_clip_weights_in(dir: &Path) -> Option<PathBuf> {
    OPEN_CLIP_WEIGHTS_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

/// The Hugging Face weights file of `dir`, the first of [`HF_WEIGHTS_FILES`] there is.
pub fn hf_weights_in(dir: &Path) -> Option<PathBuf> {
    HF_WEIGHTS_FILES.iter().map(|f| dir.join(f)).find(|p| p.is_file())
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.into(),
        _ => PathBuf::from("."),
    }
}

fn tokenizer_files(
    dir: &Path,
    model: &ModelConfig,
    open_clip_kwargs: Option<TokenizerKwargs>,
) -> Result<Option<TokenizerFiles>> {
    let present = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let mut files = TokenizerFiles {
        tokenizer_json: present(TOKENIZER_JSON),
        tokenizer_config: present(TOKENIZER_CONFIG),
        special_tokens_map: present(SPECIAL_TOKENS_MAP),
        pad_token: None,
        model_max_length: None,
        open_clip_kwargs,
        context_length: model.text_cfg.context_length,
    };
    if files.tokenizer_json.is_none()
        && files.tokenizer_config.is_none()
        && files.special_tokens_map.is_none()
    {
        return Ok(None);
    }
    // A special token is a string or an AddedToken object {"content": ...}.
    let token = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    if let Some(path) = &files.tokenizer_config {
        let json = read_json(path)?;
        files.pad_token = token(json.get("pad_token"));
        // transformers writes int(1e30) for "no limit".
        files.model_max_length = json
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|&n| n < 1e18)
            .map(|n| n as u64);
    }
    if files.pad_token.is_none() {
        if let Some(path) = &files.special_tokens_map {
            files.pad_token = token(read_json(path)?.get("pad_token"));
        }
    }
    Ok(Some(files))
}

/// Keys that say how text is tokenized, not what the weights are: the directory's tokenizer
/// files decide them, so a `--model` naming the same architecture may differ there.
const TOKENIZER_KEYS: [&str; 4] = [
    "text_cfg.hf_tokenizer_name",
    "text_cfg.tokenizer_kwargs",
    "text_cfg.tokenizer_mode",
    "text_cfg.pad_id",
];
/// Starting values the weights replace.
const INIT_KEYS: [&str; 2] = ["init_logit_scale", "init_logit_bias"];

/// Where two model configs differ, as `dotted.key: a vs b` (`-` where a key is absent, i.e.
/// open_clip's default), comparing the two as JSON trees; tokenizer settings and starting
/// values of `logit_scale` / `logit_bias` are left out (the weights and tokenizer files decide).
pub fn differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) =
        (serde_json::to_value(a).unwrap_or_default(), serde_json::to_value(b).unwrap_or_default());
    diff("", Some(&a), Some(&b), &mut out);
    out
}

fn diff(key: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
    if TOKENIZER_KEYS.contains(&key) || INIT_KEYS.contains(&key) {
        return;
    }
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                diff(&sub, x.get(k), y.get(k), out);
            }
        }
        (x, y) if x == y => {}
        (x, y) => {
            let show = |v: Option<&Value>| v.map_or("-".to_owned(), Value::to_string);
            out.push(format!("{key}: {} vs {}", show(x), show(y)));
        }
    }
}

/// The error for a `--model` (or a run's `model:`) that contradicts a directory's config:
/// up to five differing keys, `dir value vs given value`.
pub fn contradiction(
    dir: &Path,
    dir_cfg: &ModelConfig,
    given_what: &str,
    given: &ModelConfig,
) -> Option<String> {
    let diffs = differences(dir_cfg, given);
    if diffs.is_empty() {
        return None;
    }
    const SHOWN: usize = 5;
    let more = if diffs.len() > SHOWN {
        format!(" ({} more)", diffs.len() - SHOWN)
    } else {
        String::new()
    };
    Some(format!(
        "{given_what} contradicts the model of {} ({} vs {given_what}): {}{more}; leave {given_what} out to use the directory's",
        dir.display(),
        dir.display(),
        diffs.into_iter().take(SHOWN).collect::<Vec<_>>().join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_dotted_keys() {
        let a: ModelConfig =
            serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml"))
                .unwrap();
        let mut b = a.clone();
        assert!(contradiction(Path::new("d"), &a, "--model", &b).is_none());
        b.quick_gelu = true;
        b.vision_cfg.width = 128;
        b.text_cfg.pad_id = 3; // a tokenizer setting: not a contradiction
        b.init_logit_bias = Some(-10.0); // a starting value: not one either
        assert_eq!(differences(&a, &b), ["quick_gelu: - vs true", "vision_cfg.width: 64 vs 128"]);
        let msg = contradiction(Path::new("d"), &a, "--model", &b).unwrap();
        assert!(
            msg.contains("--model contradicts") && msg.contains("vision_cfg.width: 64 vs 128"),
            "{msg}"
        );
    }
}
