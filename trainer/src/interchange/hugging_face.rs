//! A Hugging Face model directory's JSON files, both ways: `config.json` of a transformers
//! `CLIPModel` or `SiglipModel` (which also holds the fixed-resolution SigLIP 2 checkpoints)
//! <-> the model in open_clip's schema, and `preprocessor_config.json` (`CLIPImageProcessor`,
//! `SiglipImageProcessor`) <-> [`Preprocess`]. Their tensor names are `hf_clip.rs`' and
//! `hf_siglip.rs`'. Whatever a file says that the model config cannot express is an error
//! naming the key, never a silently different model.

use oxclip_data_loader::{Interpolation, Preprocess, ResizeMode, OPENAI_MEAN, OPENAI_STD};
use serde_json::Value;

use super::json::{triple, Keys, Msg};
use super::Source;
use crate::error::{Result, TrainError};
use crate::model::config::{
    ActKwargs, Activation, ModelConfig, NormKwargs, TextConfig, TextPool, VisionConfig,
    VisionLayers,
};
use crate::model::timm_vit;

/// `oxclip export --format hf`'s weights and config (transformers' `CLIPModel` layout).
pub const HF_WEIGHTS: &str = "model.safetensors";
/// The weights files of a Hugging Face directory, in transformers' order of preference: one
/// safetensors file, a sharded one's index, the pickled file, a sharded one's index.
pub const HF_WEIGHTS_FILES: [&str; 4] = [
    HF_WEIGHTS,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];
pub const HF_CONFIG: &str = "config.json";
pub const HF_PREPROCESSOR: &str = "preprocessor_config.json";

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
        Source::HfSiglip => siglip_from_hf_config(json)?,
        _ => clip_from_hf_config(json)?,
    };
    Ok((source, model))
}

/// transformers' `CLIPConfig` defaults are those of openai/clip-vit-base-patch32.
fn clip_from_hf_config(json: &Value) -> Msg<ModelConfig> {
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
        multimodal_cfg: None,
    })
}

/// A timm SigLIP trunk open_clip's configs name, as timm builds it (checked against timm by
/// the test over tests/fixtures/hf_siglip_names.json).
/// transformers' `SiglipConfig` defaults are those of google/siglip-base-patch16-224. The
/// result is open_clip's SigLIP form: a timm trunk with a MAP head and no projection, a
/// bidirectional text tower pooled at the last token with a biased projection.
fn siglip_from_hf_config(json: &Value) -> Msg<ModelConfig> {
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
    let trunks = timm_vit::siglip_trunks();
    let found = trunks
        .iter()
        .find(|s| (s.patch, s.width, s.depth, s.heads, s.mlp_hidden, s.img_size) == arch);
    let Some(trunk) = found else {
        let (patch, width, depth, heads, mlp, image) = arch;
        return Err(format!(
            "vision_config (hidden_size {width}, num_hidden_layers {depth}, num_attention_heads {heads}, intermediate_size {mlp}, \
             patch_size {patch}, image_size {image}) is none of the timm SigLIP trunks open_clip builds ({})",
            timm_vit::SIGLIP.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
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
        timm_proj: Some("none".into()),
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
        multimodal_cfg: None,
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

/// The `config.json` `CLIPModel.from_pretrained` reads for `cfg`, with OpenAI's CLIP BPE
/// special tokens. transformers pools the text at the argmax of the ids when `eos_token_id`
/// is 2 (its legacy value) and at the first `eos_token_id` otherwise, so the pooling is
/// written as that id.
pub fn clip_to_hf_config(cfg: &ModelConfig) -> serde_json::Value {
    let act = if cfg.quick_gelu { "quick_gelu" } else { "gelu" };
    let (t, v) = (&cfg.text_cfg, &cfg.vision_cfg);
    let eos = match t.pool_type {
        TextPool::Eos => t.eos_id,
        // `last` / `first` cannot be written; export reads the file back and names the key.
        _ => 2,
    };
    serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": (t.width as f64 * t.mlp_ratio) as i64,
            "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers,
            "max_position_embeddings": t.context_length,
            "hidden_act": act,
            "layer_norm_eps": t.norm_eps(),
            "projection_dim": cfg.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": eos,
            "pad_token_id": 1
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": (v.width as f64 * v.mlp_ratio) as i64,
            "num_attention_heads": v.heads(),
            "num_hidden_layers": v.layers,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "hidden_act": act,
            "layer_norm_eps": v.norm_eps(),
            "projection_dim": cfg.embed_dim
        }
    })
}

/// The `config.json` `SiglipModel.from_pretrained` reads for `cfg`, for one of the SigLIP
/// trunks; whether a SiglipModel holds the rest is for the caller to check, by reading it back.
pub fn siglip_to_hf_config(cfg: &ModelConfig) -> Result<Value> {
    let (t, v) = (&cfg.text_cfg, &cfg.vision_cfg);
    let name = v.timm_model_name.as_deref().unwrap_or_default();
    let trunk = timm_vit::siglip_trunks().into_iter().find(|s| s.name == name).ok_or_else(|| {
        TrainError::ModelConfig(format!("vision_cfg.timm_model_name {name:?} is not one of the SigLIP trunks a SiglipModel holds"))
    })?;
    let approximate = |act: &Option<ActKwargs>, default: bool| match act
        .as_ref()
        .and_then(|a| a.approximate.as_deref())
    {
        Some("tanh") => "gelu_pytorch_tanh",
        Some(_) => "gelu",
        None if default => "gelu_pytorch_tanh",
        None => "gelu",
    };
    let json = serde_json::json!({
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "siglip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": (t.width as f64 * t.mlp_ratio) as i64,
            "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers,
            "max_position_embeddings": t.context_length,
            "hidden_act": approximate(&t.act_kwargs, false),
            "layer_norm_eps": t.norm_eps(),
            "projection_size": cfg.embed_dim,
            // The model reads none of these; written so that transformers' defaults (OpenAI's
            // 49406 / 49407) do not stand outside a small vocabulary.
            "bos_token_id": null,
            "eos_token_id": 1,
            "pad_token_id": 1
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": trunk.width,
            "intermediate_size": trunk.mlp_hidden,
            "num_attention_heads": trunk.heads,
            "num_hidden_layers": trunk.depth,
            "image_size": v.image_size,
            "patch_size": trunk.patch,
            "num_channels": 3,
            "hidden_act": approximate(&v.act_kwargs, trunk.act == Activation::GeluTanh),
            "layer_norm_eps": 1e-6,
            "vision_use_head": true
        }
    });
    Ok(json)
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

/// `preprocessor_config.json`: `CLIPImageProcessor` (shortest side + centre crop) or
/// `SiglipImageProcessor` (both sides to the size).
pub fn preprocess_to_hf(p: &Preprocess, siglip: bool) -> Result<serde_json::Value> {
    let resample = match p.interpolation {
        Interpolation::Bicubic => 3,
        Interpolation::Bilinear => 2,
    };
    let size = p.size;
    let mut json = serde_json::json!({
        "do_resize": true,
        "resample": resample,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": p.mean,
        "image_std": p.std,
        "do_convert_rgb": true
    });
    let fields = match (p.resize_mode, siglip) {
        (ResizeMode::Squash, true) => serde_json::json!({
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": size, "width": size}
        }),
        (ResizeMode::Squash, false) => serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "size": {"height": size, "width": size},
            "do_center_crop": false
        }),
        (ResizeMode::Shortest, _) => serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": size},
            "do_center_crop": true,
            "crop_size": {"height": size, "width": size}
        }),
        (ResizeMode::Longest, _) => {
            return Err(TrainError::ModelConfig(
                "resize_mode longest (pad to a square) has no Hugging Face image processor; export with --format open_clip".into(),
            ))
        }
    };
    if let (Some(json), serde_json::Value::Object(fields)) = (json.as_object_mut(), fields) {
        json.extend(fields);
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::interchange::pretrained::{differences, Pretrained};

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
}
