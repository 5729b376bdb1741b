//! Weights that come with their own config: a Hugging Face model directory (`config.json` +
//! `model.safetensors` for `CLIPModel` or `SiglipModel`, which also holds the fixed-resolution
//! SigLIP 2 checkpoints) or an open_clip hub directory (`open_clip_config.json` +
//! `open_clip_model.safetensors`). [`Pretrained::read`] translates the directory's files into
//! what oxclip builds from: the model in open_clip's schema, the image preprocessing, and the
//! tokenizer files with their settings. Whatever a file says that the model config cannot
//! express is an error naming the file and key, never a silently different model.

use std::path::{Path, PathBuf};

use oxclip_data_loader::{Interpolation, Preprocess, ResizeMode, OPENAI_MEAN, OPENAI_STD};
use serde_json::{Map, Value};

use crate::error::{io_err, Result, TrainError};
use crate::model::config::{
    ActKwargs, Activation, ModelConfig, NormKwargs, TextConfig, TextPool, TokenizerKwargs,
    VisionConfig, VisionLayers,
};
use crate::model::timm_vit;

/// `oxclip export --format open_clip`'s weights and config (open_clip's hub layout).
pub const OPEN_CLIP_WEIGHTS: &str = "open_clip_model.safetensors";
pub const OPEN_CLIP_CONFIG: &str = "open_clip_config.json";
/// `oxclip export --format hf`'s weights and config (transformers' `CLIPModel` layout).
pub const HF_WEIGHTS: &str = "model.safetensors";
pub const HF_CONFIG: &str = "config.json";
pub const HF_PREPROCESSOR: &str = "preprocessor_config.json";
pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

/// Where a directory's config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// transformers' `CLIPModel`.
    HfClip,
    /// transformers' `SiglipModel`.
    HfSiglip,
    /// open_clip's hub layout.
    OpenClip,
}

/// A model directory, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct Pretrained {
    pub dir: PathBuf,
    /// The architecture, in open_clip's schema (validated).
    pub model: ModelConfig,
    /// How images are prepared for it.
    pub preprocess: Preprocess,
    /// The tokenizer files beside the weights, when there are any.
    pub tokenizer: Option<TokenizerFiles>,
    /// The safetensors file (HF or open_clip names; `load_weights` reads both).
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
    /// Reads the directory `dir`: `open_clip_config.json` (with `open_clip_model.safetensors`)
    /// first, else `config.json` (with `model.safetensors`).
    pub fn read(dir: &Path) -> Result<Self> {
        if dir.join(OPEN_CLIP_CONFIG).is_file() && dir.join(OPEN_CLIP_WEIGHTS).is_file() {
            return Self::open_clip(&dir.join(OPEN_CLIP_CONFIG), &dir.join(OPEN_CLIP_WEIGHTS));
        }
        if dir.join(HF_CONFIG).is_file() && dir.join(HF_WEIGHTS).is_file() {
            return Self::hugging_face(&dir.join(HF_CONFIG), &dir.join(HF_WEIGHTS));
        }
        Err(TrainError::WeightsPath {
            path: dir.into(),
            message: format!(
                "neither {OPEN_CLIP_CONFIG} + {OPEN_CLIP_WEIGHTS} (open_clip) nor {HF_CONFIG} + {HF_WEIGHTS} (Hugging Face)"
            ),
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
        let model_cfg = json.get("model_cfg").ok_or_else(|| bad(config, "no model_cfg".into()))?;
        let model: ModelConfig = serde_json::from_value(model_cfg.clone())
            .map_err(|e| bad(config, format!("model_cfg: {e}")))?;
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

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.into(),
        _ => PathBuf::from("."),
    }
}

fn bad(path: &Path, message: String) -> TrainError {
    TrainError::WeightsPath { path: path.into(), message }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))
}

/// Reads typed keys of one JSON object, naming `section.key` in every error. An absent key or
/// `null` takes transformers' default.
struct Keys<'a> {
    obj: Option<&'a Map<String, Value>>,
    section: &'a str,
}

type Msg<T> = std::result::Result<T, String>;

impl<'a> Keys<'a> {
    fn new(value: Option<&'a Value>, section: &'a str) -> Self {
        Keys { obj: value.and_then(Value::as_object), section }
    }
    fn name(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.section)
        }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| o.get(key)).filter(|v| !v.is_null())
    }
    fn int(&self, key: &str, default: i64) -> Msg<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_i64().ok_or_else(|| format!("{} must be an integer, got {v}", self.name(key)))
            }
        }
    }
    fn float(&self, key: &str, default: f64) -> Msg<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| format!("{} must be a number, got {v}", self.name(key)))
            }
        }
    }
    fn string(&self, key: &str, default: &str) -> Msg<String> {
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(v) => v
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{} must be a string, got {v}", self.name(key))),
        }
    }
    fn boolean(&self, key: &str, default: bool) -> Msg<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{} must be true or false, got {v}", self.name(key))),
        }
    }
    /// An image side: a number, or `[h, w]` / `{"height", "width"}` with h == w.
    fn side(&self, key: &str, default: i64) -> Msg<i64> {
        let Some(v) = self.get(key) else { return Ok(default) };
        let pair = match v {
            Value::Array(a) if a.len() == 2 => (a[0].as_i64(), a[1].as_i64()),
            Value::Object(o) => {
                (o.get("height").and_then(Value::as_i64), o.get("width").and_then(Value::as_i64))
            }
            other => (other.as_i64(), other.as_i64()),
        };
        match pair {
            (Some(h), Some(w)) if h == w => Ok(h),
            (Some(h), Some(w)) => {
                Err(format!("{} is {h}x{w}; oxclip builds square inputs only", self.name(key)))
            }
            _ => Err(format!("{} must be a number of pixels, got {v}", self.name(key))),
        }
    }
}

/// `config.json` of a transformers `CLIPModel` or `SiglipModel` -> the model in open_clip's
/// schema. Errors name the key.
pub fn model_from_hf_config(json: &Value) -> Msg<(Source, ModelConfig)> {
    let top = Keys::new(Some(json), "");
    let architectures: Vec<String> = match top.get("architectures") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Some(other) => return Err(format!("architectures must be a list of names, got {other}")),
    };
    let model_type = top.string("model_type", "")?;
    let source = match (architectures.as_slice(), model_type.as_str()) {
        ([a], _) if a == "CLIPModel" => Source::HfClip,
        ([a], _) if a == "SiglipModel" => Source::HfSiglip,
        ([], "clip") => Source::HfClip,
        ([], "siglip") => Source::HfSiglip,
        _ => {
            return Err(format!(
                "architectures {architectures:?} (model_type {model_type:?}): oxclip reads Hugging Face CLIPModel and \
                 SiglipModel directories (SigLIP 2's fixed-resolution checkpoints are SiglipModel; its NaFlex \
                 Siglip2Model is not supported)"
            ))
        }
    };
    let model = match source {
        Source::HfSiglip => siglip_config(json)?,
        _ => clip_config(json)?,
    };
    Ok((source, model))
}

/// transformers' `CLIPConfig` defaults are those of openai/clip-vit-base-patch32.
fn clip_config(json: &Value) -> Msg<ModelConfig> {
    let top = Keys::new(Some(json), "");
    let t = Keys::new(json.get("text_config"), "text_config");
    let v = Keys::new(json.get("vision_config"), "vision_config");
    channels(&v)?;
    let (t_act, v_act) =
        (t.string("hidden_act", "quick_gelu")?, v.string("hidden_act", "quick_gelu")?);
    let quick = |act: &str, key: &str| match act {
        "quick_gelu" => Ok(true),
        "gelu" => Ok(false),
        other => Err(format!(
            "{key} {other:?}: oxclip builds CLIP towers with \"quick_gelu\" or \"gelu\""
        )),
    };
    let quick_gelu = quick(&t_act, "text_config.hidden_act")?;
    if quick(&v_act, "vision_config.hidden_act")? != quick_gelu {
        return Err(format!(
            "text_config.hidden_act {t_act:?} and vision_config.hidden_act {v_act:?} differ; oxclip's CLIP has one activation for both towers"
        ));
    }
    let (width, heads) = (v.int("hidden_size", 768)?, v.int("num_attention_heads", 12)?);
    let vision_cfg = VisionConfig {
        layers: VisionLayers::Count(v.int("num_hidden_layers", 12)?),
        width,
        head_width: divide(
            width,
            heads,
            "vision_config.hidden_size",
            "vision_config.num_attention_heads",
        )?,
        mlp_ratio: mlp_ratio(width, v.int("intermediate_size", 3072)?),
        patch_size: Some(v.side("patch_size", 32)?),
        image_size: v.side("image_size", 224)?,
        norm_kwargs: eps(v.float("layer_norm_eps", 1e-5)?, 1e-5),
        ..vision_defaults()?
    };
    let vocab_size = t.int("vocab_size", 49408)?;
    // transformers pools at the argmax of the ids for the legacy eos_token_id 2 and at the
    // first eos_token_id otherwise; when that id is the vocabulary's largest the two are the
    // same position, written as open_clip's CLIP configs write it.
    let eos = match t.get("eos_token_id") {
        None => 49407,
        Some(v) => {
            v.as_i64().ok_or_else(|| format!("text_config.eos_token_id must be one id, got {v}"))?
        }
    };
    let (pool_type, eos_id) = if eos == 2 || eos == vocab_size - 1 {
        (TextPool::Argmax, 2)
    } else {
        (TextPool::Eos, eos)
    };
    let width = t.int("hidden_size", 512)?;
    let text_cfg = TextConfig {
        context_length: t.int("max_position_embeddings", 77)?,
        vocab_size,
        width,
        heads: t.int("num_attention_heads", 8)?,
        layers: t.int("num_hidden_layers", 12)?,
        mlp_ratio: mlp_ratio(width, t.int("intermediate_size", 2048)?),
        eos_id,
        pool_type,
        norm_kwargs: eps(t.float("layer_norm_eps", 1e-5)?, 1e-5),
        ..text_defaults()?
    };
    Ok(ModelConfig {
        embed_dim: top.int("projection_dim", 512)?,
        quick_gelu,
        init_logit_scale: None,
        init_logit_bias: None,
        custom_text: false,
        vision_cfg,
        text_cfg,
    })
}

/// A timm SigLIP trunk open_clip's configs name, as timm builds it (checked against timm by
/// the test over tests/fixtures/hf_siglip_names.json).
/// transformers' `SiglipConfig` defaults are those of google/siglip-base-patch16-224. The
/// result is open_clip's SigLIP form: a timm trunk with a MAP head and no projection, a
/// bidirectional text tower pooled at the last token with a biased projection.
fn siglip_config(json: &Value) -> Msg<ModelConfig> {
    let t = Keys::new(json.get("text_config"), "text_config");
    let v = Keys::new(json.get("vision_config"), "vision_config");
    channels(&v)?;
    if !v.boolean("vision_use_head", true)? {
        return Err("vision_config.vision_use_head is false; oxclip's SigLIP image tower ends in the MAP head".into());
    }
    let gelu = |key: &str, act: String| -> Msg<bool> {
        match act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" => Ok(true),
            "gelu" => Ok(false),
            other => Err(format!("{key} {other:?}: oxclip builds SigLIP towers with \"gelu_pytorch_tanh\" or \"gelu\"")),
        }
    };
    let v_tanh = gelu("vision_config.hidden_act", v.string("hidden_act", "gelu_pytorch_tanh")?)?;
    let t_tanh = gelu("text_config.hidden_act", t.string("hidden_act", "gelu_pytorch_tanh")?)?;
    let v_eps = v.float("layer_norm_eps", 1e-6)?;
    if v_eps != 1e-6 {
        return Err(format!("vision_config.layer_norm_eps {v_eps}: timm's SigLIP trunks use 1e-6"));
    }
    let arch = (
        v.int("patch_size", 16)?,
        v.int("hidden_size", 768)?,
        v.int("num_hidden_layers", 12)?,
        v.int("num_attention_heads", 12)?,
        v.int("intermediate_size", 3072)?,
        v.side("image_size", 224)?,
    );
    let trunks = timm_vit::architectures();
    let found = trunks
        .iter()
        .find(|s| (s.patch, s.width, s.depth, s.heads, s.mlp_hidden, s.img_size) == arch);
    let Some(trunk) = found else {
        let (patch, width, depth, heads, mlp, image) = arch;
        return Err(format!(
            "vision_config (hidden_size {width}, num_hidden_layers {depth}, num_attention_heads {heads}, intermediate_size {mlp}, \
             patch_size {patch}, image_size {image}) is none of the timm SigLIP trunks open_clip builds ({})",
            timm_vit::ARCHITECTURES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        ));
    };
    let width = t.int("hidden_size", 768)?;
    let projection = t.int("projection_size", width)?;
    if projection != trunk.width {
        return Err(format!(
            "text_config.projection_size {projection} differs from vision_config.hidden_size {}; open_clip's SigLIP projects \
             the text to the image tower's width",
            trunk.width
        ));
    }
    let approximate = |tanh: bool| {
        Some(ActKwargs { approximate: Some(if tanh { "tanh" } else { "none" }.into()) })
    };
    let vision_cfg = VisionConfig {
        image_size: trunk.img_size,
        timm_model_name: Some(trunk.name.into()),
        timm_pool: "map".into(),
        timm_proj: "none".into(),
        // Only where the checkpoint's activation is not the one timm builds for this name.
        act_kwargs: if v_tanh == (trunk.act == Activation::GeluTanh) {
            None
        } else {
            approximate(v_tanh)
        },
        ..vision_defaults()?
    };
    let text_cfg = TextConfig {
        context_length: t.int("max_position_embeddings", 64)?,
        vocab_size: t.int("vocab_size", 32000)?,
        width,
        heads: t.int("num_attention_heads", 12)?,
        layers: t.int("num_hidden_layers", 12)?,
        mlp_ratio: mlp_ratio(width, t.int("intermediate_size", 3072)?),
        no_causal_mask: true,
        pool_type: TextPool::Last,
        proj_bias: true,
        act_kwargs: if t_tanh { approximate(true) } else { None },
        norm_kwargs: eps(t.float("layer_norm_eps", 1e-6)?, 1e-5),
        ..text_defaults()?
    };
    Ok(ModelConfig {
        embed_dim: trunk.width,
        quick_gelu: false,
        init_logit_scale: None,
        init_logit_bias: Some(-10.0),
        custom_text: true,
        vision_cfg,
        text_cfg,
    })
}

fn channels(v: &Keys) -> Msg<()> {
    match v.int("num_channels", 3)? {
        3 => Ok(()),
        n => Err(format!("vision_config.num_channels {n}: oxclip reads RGB images (3 channels)")),
    }
}

fn divide(width: i64, heads: i64, width_key: &str, heads_key: &str) -> Msg<i64> {
    if heads <= 0 || width % heads != 0 {
        return Err(format!("{heads_key} {heads} does not divide {width_key} {width}"));
    }
    Ok(width / heads)
}

/// The ratio open_clip writes for an MLP of `hidden` units on `width` (its blocks build
/// `int(width * mlp_ratio)`): the exact quotient when it survives the round trip, else the
/// shortest 4-decimal ratio that does (1152 -> 4304 is open_clip's 3.7362).
pub fn mlp_ratio(width: i64, hidden: i64) -> f64 {
    let exact = hidden as f64 / width as f64;
    let builds = |r: f64| (width as f64 * r) as i64 == hidden;
    if builds(exact) && (exact * 1e4).fract() == 0.0 {
        return exact;
    }
    (1..=4)
        .map(|digits| {
            let scale = 10f64.powi(digits);
            (exact * scale).ceil() / scale
        })
        .find(|&r| builds(r))
        .unwrap_or(exact)
}

fn eps(value: f64, default: f64) -> Option<NormKwargs> {
    (value != default).then_some(NormKwargs { eps: value })
}

/// open_clip's `CLIPVisionCfg()` / `CLIPTextCfg()`: every key not set by a translation.
fn vision_defaults() -> Msg<VisionConfig> {
    serde_json::from_value(serde_json::json!({})).map_err(|e| e.to_string())
}

fn text_defaults() -> Msg<TextConfig> {
    serde_json::from_value(serde_json::json!({})).map_err(|e| e.to_string())
}

/// `preprocessor_config.json` of a `CLIPImageProcessor` (shortest side, centre crop) or a
/// `SiglipImageProcessor` (both sides to the size) -> [`Preprocess`]; its output size must be
/// the model's `image_size`.
pub fn preprocess_from_hf(json: &Value, image_size: i64) -> Msg<Preprocess> {
    let k = Keys::new(Some(json), "");
    let kind = match k.get("image_processor_type").or_else(|| k.get("feature_extractor_type")) {
        Some(v) => v.as_str().unwrap_or_default().to_owned(),
        None => String::new(),
    };
    if !kind.is_empty() && !kind.starts_with("CLIP") && !kind.starts_with("Siglip") {
        return Err(format!("image_processor_type {kind:?}: oxclip reads CLIPImageProcessor and SiglipImageProcessor settings"));
    }
    let resize = k.boolean("do_resize", true)?;
    let crop = k.boolean("do_center_crop", false)?;
    let shortest = k.get("size").and_then(|s| s.get("shortest_edge")).is_some();
    let (size, resize_mode) = match (resize, crop, shortest) {
        (true, true, true) => (k.side("crop_size", image_size)?, ResizeMode::Shortest),
        (true, false, false) => (k.side("size", image_size)?, ResizeMode::Squash),
        // Old CLIP feature extractors: `size: 224` (the shortest side) and `crop_size: 224`.
        (true, true, false) => (k.side("crop_size", image_size)?, ResizeMode::Shortest),
        _ => {
            return Err(format!(
                "do_resize {resize}, do_center_crop {crop}, size {}: oxclip prepares images by shortest side + centre crop \
                 (CLIPImageProcessor) or by resizing both sides (SiglipImageProcessor)",
                k.get("size").map_or("unset".into(), Value::to_string)
            ))
        }
    };
    if size != image_size {
        return Err(format!(
            "the processor's output is {size} pixels but the model's image_size is {image_size}"
        ));
    }
    if !k.boolean("do_rescale", true)?
        || (k.float("rescale_factor", 1.0 / 255.0)? * 255.0 - 1.0).abs() > 1e-6
    {
        return Err("do_rescale / rescale_factor: oxclip scales pixels by 1/255".into());
    }
    if !k.boolean("do_convert_rgb", true)? {
        return Err("do_convert_rgb is false; oxclip reads images as RGB".into());
    }
    let interpolation = match k.int("resample", 3)? {
        3 => Interpolation::Bicubic,
        2 => Interpolation::Bilinear,
        n => return Err(format!("resample {n}: oxclip resizes bicubic (3) or bilinear (2)")),
    };
    let siglip = kind.starts_with("Siglip");
    let (mean, std) = if k.boolean("do_normalize", true)? {
        let default = if siglip { ([0.5; 3], [0.5; 3]) } else { (OPENAI_MEAN, OPENAI_STD) };
        (triple(&k, "image_mean", default.0)?, triple(&k, "image_std", default.1)?)
    } else {
        ([0.0; 3], [1.0; 3])
    };
    Ok(Preprocess {
        size: size as u32,
        mean,
        std,
        interpolation,
        resize_mode,
        augment: Default::default(),
    })
}

fn triple(k: &Keys, key: &str, default: [f32; 3]) -> Msg<[f32; 3]> {
    let Some(v) = k.get(key) else { return Ok(default) };
    let values: Option<Vec<f32>> = match v {
        Value::Array(a) => a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect(),
        one => one.as_f64().map(|x| vec![x as f32; 3]),
    };
    match values.as_deref() {
        Some(&[a, b, c]) => Ok([a, b, c]),
        _ => Err(format!("{} must be three numbers (R, G, B), got {v}", k.name(key))),
    }
}

/// open_clip's `preprocess_cfg` -> [`Preprocess`]; absent keys take open_clip's
/// `PreprocessCfg` defaults (OpenAI mean/std, bicubic, shortest), the size the model's.
pub fn preprocess_from_open_clip(cfg: Option<&Value>, image_size: i64) -> Msg<Preprocess> {
    let k = Keys::new(cfg, "preprocess_cfg");
    let size = k.side("size", image_size)?;
    if size != image_size {
        return Err(format!("size {size} is not the model's image_size {image_size}"));
    }
    let mode = k.string("mode", "RGB")?;
    if mode != "RGB" {
        return Err(format!("mode {mode:?}: open_clip and oxclip read RGB"));
    }
    let interpolation = match k.string("interpolation", "bicubic")?.as_str() {
        "bicubic" => Interpolation::Bicubic,
        "bilinear" => Interpolation::Bilinear,
        other => {
            return Err(format!(
                "interpolation {other:?}: oxclip resizes \"bicubic\" or \"bilinear\""
            ))
        }
    };
    let resize_mode = match k.string("resize_mode", "shortest")?.as_str() {
        "shortest" => ResizeMode::Shortest,
        "squash" => ResizeMode::Squash,
        "longest" => ResizeMode::Longest,
        other => {
            return Err(format!("resize_mode {other:?}: \"shortest\", \"squash\" or \"longest\""))
        }
    };
    if k.int("fill_color", 0)? != 0 {
        return Err("fill_color: oxclip pads with 0 (black)".into());
    }
    Ok(Preprocess {
        size: size as u32,
        mean: triple(&k, "mean", OPENAI_MEAN)?,
        std: triple(&k, "std", OPENAI_STD)?,
        interpolation,
        resize_mode,
        augment: Default::default(),
    })
}

/// The `preprocess_cfg` open_clip reads back as `preprocess`.
pub fn open_clip_preprocess_cfg(p: &Preprocess) -> Value {
    serde_json::json!({
        "size": p.size,
        "mode": "RGB",
        "mean": p.mean,
        "std": p.std,
        "interpolation": p.interpolation,
        "resize_mode": p.resize_mode,
        "fill_color": 0
    })
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
    use crate::model::config::Activation;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    /// transformers' own google/siglip-base-patch16-224 config.json (defaults left out, as the
    /// hub file has them) and a SigLIP 2 gopt / SO400M-style one.
    #[test]
    fn siglip_configs_become_open_clips_siglip_form() {
        let base = serde_json::json!({"architectures": ["SiglipModel"], "model_type": "siglip",
            "text_config": {"model_type": "siglip_text_model"}, "vision_config": {"model_type": "siglip_vision_model"}});
        let (source, cfg) = model_from_hf_config(&base).unwrap();
        assert_eq!(source, Source::HfSiglip);
        cfg.validate().unwrap();
        // open_clip's ViT-B-16-SigLIP.json: its towers approximate the activation otherwise
        // than the checkpoint (tanh GELU in both towers), which is a real difference.
        let open_clip: ModelConfig = serde_json::from_str(
            r#"{"embed_dim": 768, "init_logit_bias": -10, "custom_text": true,
                "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224", "timm_model_pretrained": false, "timm_pool": "map", "timm_proj": "none"},
                "text_cfg": {"context_length": 64, "vocab_size": 32000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "tokenizer_kwargs": {"clean": "canonicalize"},
                             "width": 768, "heads": 12, "layers": 12, "no_causal_mask": true, "proj_bias": true, "pool_type": "last",
                             "norm_kwargs": {"eps": 1e-6}}}"#,
        )
        .unwrap();
        assert_eq!(
            differences(&cfg, &open_clip),
            [
                "text_cfg.act_kwargs: {\"approximate\":\"tanh\"} vs -",
                "vision_cfg.act_kwargs: {\"approximate\":\"tanh\"} vs -"
            ]
        );
        assert_eq!(cfg.text_cfg.activation(false).unwrap(), Activation::GeluTanh);

        let gopt = serde_json::json!({"architectures": ["SiglipModel"],
            "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                            "projection_size": 1536, "vocab_size": 256000, "max_position_embeddings": 64},
            "vision_config": {"hidden_size": 1536, "intermediate_size": 6144, "num_attention_heads": 16, "num_hidden_layers": 40,
                              "image_size": 256, "patch_size": 16}});
        let (_, cfg) = model_from_hf_config(&gopt).unwrap();
        assert_eq!(
            cfg.vision_cfg.timm_model_name.as_deref(),
            Some("vit_giantopt_patch16_siglip_256")
        );
        assert_eq!(
            (cfg.embed_dim, cfg.text_cfg.mlp_ratio, cfg.text_cfg.vocab_size),
            (1536, 3.7362, 256000)
        );
        assert!(cfg.vision_cfg.act_kwargs.is_none(), "gopt is gelu_tanh in timm too");

        let mut wrong = gopt.clone();
        wrong["text_config"]["projection_size"] = 1152.into();
        let err = model_from_hf_config(&wrong).unwrap_err();
        assert!(err.contains("text_config.projection_size 1152"), "{err}");
        wrong["vision_config"]["vision_use_head"] = false.into();
        assert!(model_from_hf_config(&wrong)
            .unwrap_err()
            .contains("vision_config.vision_use_head"));
    }

    /// Every trunk of the table is the one timm builds (hf_siglip_names.json, from timm).
    #[test]
    fn the_trunk_table_is_timms() {
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("hf_siglip_names.json")).unwrap(),
        )
        .unwrap();
        let timm = golden["timm_trunks"].as_object().unwrap();
        assert_eq!(timm.len(), timm_vit::ARCHITECTURES.len());
        for t in timm_vit::ARCHITECTURES {
            let g = &timm[t.name];
            let want = (
                g["patch"].as_i64(),
                g["width"].as_i64(),
                g["depth"].as_i64(),
                g["heads"].as_i64(),
                g["mlp"].as_i64(),
                g["image"].as_i64(),
            );
            assert_eq!(
                (
                    Some(t.patch),
                    Some(t.width),
                    Some(t.depth),
                    Some(t.heads),
                    Some(t.mlp_hidden),
                    Some(t.img_size)
                ),
                want,
                "{}",
                t.name
            );
            assert_eq!(t.act == Activation::GeluTanh, g["act"] == "GELUTanh", "{}", t.name);
            assert_eq!(g["eps"], 1e-6);
        }
    }

    #[test]
    fn mlp_ratios_build_the_files_widths() {
        assert_eq!(mlp_ratio(768, 3072), 4.0);
        assert_eq!(mlp_ratio(1152, 4304), 3.7362);
        assert_eq!(mlp_ratio(48, 96), 2.0);
        for (w, h) in [(1280, 5120), (1664, 8192), (1152, 4304), (1408, 6144), (7, 30)] {
            assert_eq!((w as f64 * mlp_ratio(w, h)) as i64, h, "{w} {h}");
        }
    }

    /// The tiny QuickGELU CLIPModel directory: the architecture, first-EOS pooling (its
    /// eos_token_id is not the largest id), and CLIPImageProcessor settings.
    #[test]
    fn clip_directory_reads_its_architecture_and_preprocessing() {
        let p = Pretrained::read(&fixtures().join("hf_clip_quickgelu_tiny")).unwrap();
        assert_eq!(p.source, Source::HfClip);
        let m = &p.model;
        assert!(m.quick_gelu && !m.custom_text);
        assert_eq!(
            (
                m.embed_dim,
                m.vision_cfg.width,
                m.vision_cfg.head_width,
                m.vision_cfg.patch_size,
                m.vision_cfg.image_size
            ),
            (32, 32, 16, Some(8), 32)
        );
        assert_eq!(
            (
                m.text_cfg.pool_type,
                m.text_cfg.eos_id,
                m.text_cfg.context_length,
                m.text_cfg.vocab_size
            ),
            (TextPool::Eos, 997, 16, 1000)
        );
        assert!(m.text_cfg.norm_kwargs.is_none());
        assert_eq!(p.preprocess, Preprocess::openai(32));
        assert!(p.tokenizer.is_none());

        // OpenAI's legacy eos_token_id 2 and an EOS that is the largest id pool at argmax.
        for eos in [2, 49407] {
            let json = serde_json::json!({"architectures": ["CLIPModel"], "text_config": {"eos_token_id": eos}});
            let (_, cfg) = model_from_hf_config(&json).unwrap();
            assert_eq!(
                (cfg.text_cfg.pool_type, cfg.quick_gelu, cfg.vision_cfg.patch_size),
                (TextPool::Argmax, true, Some(32))
            );
        }
        let json = serde_json::json!({"architectures": ["CLIPModel"], "text_config": {"hidden_act": "relu"}});
        assert!(model_from_hf_config(&json)
            .unwrap_err()
            .contains("text_config.hidden_act \"relu\""));
        let json = serde_json::json!({"architectures": ["BertModel"], "model_type": "bert"});
        let err = model_from_hf_config(&json).unwrap_err();
        assert!(
            err.contains("architectures [\"BertModel\"]") && err.contains("CLIPModel"),
            "{err}"
        );
    }

    #[test]
    fn siglip_directory_reads_its_architecture_and_preprocessing() {
        let dir = fixtures().join("hf_siglip_tiny");
        let p = Pretrained::read(&dir).unwrap();
        assert_eq!(p.source, Source::HfSiglip);
        assert_eq!(
            p.preprocess,
            Preprocess { interpolation: Interpolation::Bilinear, ..Preprocess::siglip(32) }
        );
        // The translation is the config open_clip builds the same weights with (the fixture
        // script loads them into it strict and compares the embeddings).
        let golden: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("hf_siglip_names.json")).unwrap(),
        )
        .unwrap();
        let open_clip: ModelConfig =
            serde_json::from_value(golden["open_clip_config"].clone()).unwrap();
        assert_eq!(differences(&p.model, &open_clip), Vec::<String>::new());
        assert_eq!(p.model, open_clip);
        // A vision tower no timm trunk has: the error gives the sizes and what exists.
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(HF_CONFIG)).unwrap()).unwrap();
        json["vision_config"]["hidden_size"] = 40.into();
        let err = model_from_hf_config(&json).unwrap_err();
        assert!(
            err.contains("hidden_size 40") && err.contains("vit_so400m_patch14_siglip_384"),
            "{err}"
        );
        let pre: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(HF_PREPROCESSOR)).unwrap())
                .unwrap();
        assert!(preprocess_from_hf(&pre, 224).unwrap_err().contains("image_size is 224"));
    }

    /// A fixture directory loaded with no --model gives transformers' embeddings of its
    /// `io.safetensors` inputs.
    fn directory_gives_transformers_embeddings(name: &str) {
        use tch::{Device, Tensor};
        let dir = fixtures().join(name);
        let p = Pretrained::read(&dir).unwrap();
        let io: std::collections::BTreeMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("io.safetensors")).unwrap().into_iter().collect();
        let (_vs, model) =
            crate::interchange::weights::load(&p.model, &p.weights, Device::Cpu).unwrap();
        let (i, t) = tch::no_grad(|| model.features(&io["pixel_values"], &io["input_ids"]));
        let di = (i - &io["image_embeds"]).abs().max().double_value(&[]);
        let dt = (t - &io["text_embeds"]).abs().max().double_value(&[]);
        eprintln!("{name} vs transformers: image {di:.2e}, text {dt:.2e}");
        assert!(di < 1e-5 && dt < 1e-5, "{name}: image {di}, text {dt}");
    }

    /// The QuickGELU CLIPModel directory.
    #[test]
    fn clip_quickgelu_directory_gives_transformers_embeddings() {
        directory_gives_transformers_embeddings("hf_clip_quickgelu_tiny");
    }

    /// The SigLIP directory (its trunk is oxclip's tiny `vit_oxtiny_patch8_siglip_32`).
    #[test]
    fn siglip_directory_gives_transformers_embeddings() {
        directory_gives_transformers_embeddings("hf_siglip_tiny");
    }

    /// `--format hf` of a SigLIP model writes a SiglipModel directory that reads back as the
    /// same model, preprocessing and weights (the weights go through open_clip names, so no
    /// model has to be built). The CLIP directory likewise comes back as its CLIPModel.
    /// `OXCLIP_KEEP_EXPORTS=DIR` keeps the directories, for checking them with transformers.
    #[test]
    fn exports_read_back_as_the_same_model_and_weights() {
        use crate::interchange::export::{export, Format};
        use tch::Tensor;
        let tmp = tempfile::tempdir().unwrap();
        let root =
            std::env::var_os("OXCLIP_KEEP_EXPORTS").map_or(tmp.path().to_path_buf(), PathBuf::from);
        for (name, mapping) in [("hf_siglip_tiny", true), ("hf_clip_quickgelu_tiny", false)] {
            let p = Pretrained::read(&fixtures().join(name)).unwrap();
            let hf: std::collections::BTreeMap<String, Tensor> =
                Tensor::read_safetensors(&p.weights).unwrap().into_iter().collect();
            let oc = if mapping {
                crate::interchange::hf_siglip::from_hf(hf).unwrap()
            } else {
                crate::interchange::hf_clip::from_hf(hf).unwrap()
            };
            for format in [Format::HuggingFace, Format::OpenClip] {
                let out = root.join(format!("{name}-{format:?}"));
                let copy = oc.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
                export(copy, &p.model, Some(&p.preprocess), format, &out).unwrap();
                let back = Pretrained::read(&out).unwrap();
                assert_eq!(back.model, p.model, "{name} {format:?}");
                assert_eq!(back.preprocess, p.preprocess, "{name} {format:?}");
                let mut written: std::collections::BTreeMap<String, Tensor> =
                    Tensor::read_safetensors(&back.weights).unwrap().into_iter().collect();
                if format == Format::HuggingFace {
                    written = if mapping {
                        crate::interchange::hf_siglip::from_hf(written).unwrap()
                    } else {
                        crate::interchange::hf_clip::from_hf(written).unwrap()
                    };
                    assert_eq!(
                        back.source,
                        if mapping { Source::HfSiglip } else { Source::HfClip }
                    );
                }
                assert_eq!(
                    written.keys().collect::<Vec<_>>(),
                    oc.keys().collect::<Vec<_>>(),
                    "{name} {format:?}"
                );
                for (k, v) in &oc {
                    assert!(written[k].equal(v), "{name} {format:?} {k}");
                }
            }
        }
        // A SigLIP model a SiglipModel cannot hold (causal text) is refused by key.
        let mut cfg = Pretrained::read(&fixtures().join("hf_siglip_tiny")).unwrap().model;
        cfg.text_cfg.no_causal_mask = false;
        let err = crate::interchange::export::siglip_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("text_cfg.no_causal_mask") && err.contains("--format open_clip"),
            "{err}"
        );
    }

    #[test]
    fn open_clip_directories_and_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let model = serde_json::json!({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 48, "heads": 4, "layers": 2,
                         "hf_tokenizer_name": "x/y", "tokenizer_kwargs": {"clean": "canonicalize"}}});
        let cfg = serde_json::json!({"model_cfg": model, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}});
        std::fs::write(tmp.path().join(OPEN_CLIP_CONFIG), cfg.to_string()).unwrap();
        std::fs::write(tmp.path().join(OPEN_CLIP_WEIGHTS), b"").unwrap();
        std::fs::write(tmp.path().join(TOKENIZER_JSON), b"{}").unwrap();
        std::fs::write(tmp.path().join(TOKENIZER_CONFIG), r#"{"pad_token": {"content": "<pad>"}, "model_max_length": 1000000000000000019884624838656}"#).unwrap();
        let p = Pretrained::read(tmp.path()).unwrap();
        assert_eq!(p.source, Source::OpenClip);
        assert_eq!(p.preprocess, Preprocess::siglip(32));
        let tok = p.tokenizer.unwrap();
        assert_eq!(tok.tokenizer_json, Some(tmp.path().join(TOKENIZER_JSON)));
        assert_eq!(
            (tok.pad_token.as_deref(), tok.model_max_length, tok.context_length),
            (Some("<pad>"), None, 16)
        );
        assert_eq!(tok.open_clip_kwargs.unwrap().clean.as_deref(), Some("canonicalize"));
        // An empty preprocess_cfg is open_clip's default, OpenAI's.
        assert_eq!(preprocess_from_open_clip(None, 224).unwrap(), Preprocess::openai(224));
        let back = preprocess_from_open_clip(
            Some(&open_clip_preprocess_cfg(&Preprocess::siglip(384))),
            384,
        )
        .unwrap();
        assert_eq!(back, Preprocess::siglip(384));
        let err =
            preprocess_from_open_clip(Some(&serde_json::json!({"interpolation": "lanczos"})), 224)
                .unwrap_err();
        assert!(err.contains("lanczos"), "{err}");
    }

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
