//! open_clip's hub layout: `open_clip_model.safetensors` (open_clip's own names, the canonical
//! ones) beside `open_clip_config.json`, `{"model_cfg": ..., "preprocess_cfg": ...}`, which
//! open_clip's `hf-hub:` loader reads. `model_cfg` is open_clip's schema, ours as is; this
//! file reads and writes the config around it and `preprocess_cfg` <-> [`Preprocess`].

use oxclip_data_loader::{Interpolation, Preprocess, ResizeMode, OPENAI_MEAN, OPENAI_STD};
use serde_json::Value;

use super::json::{triple, Keys, Msg};
use crate::model::config::ModelConfig;

/// `oxclip export --format open_clip`'s weights and config (open_clip's hub layout).
pub const OPEN_CLIP_WEIGHTS: &str = "open_clip_model.safetensors";
pub const OPEN_CLIP_CONFIG: &str = "open_clip_config.json";
/// The weights files of an open_clip hub directory, in open_clip's order of preference (older
/// repos hold only the pickled one).
pub const OPEN_CLIP_WEIGHTS_FILES: [&str; 2] = [OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin"];

/// `open_clip_config.json` -> its `model_cfg`, parsed (not yet validated).
pub fn model_from_open_clip_config(json: &Value) -> Msg<ModelConfig> {
    let model_cfg = json.get("model_cfg").ok_or_else(|| "no model_cfg".to_owned())?;
    serde_json::from_value(model_cfg.clone()).map_err(|e| format!("model_cfg: {e}"))
}

/// The `open_clip_config.json` open_clip reads back as `cfg`, its images prepared as
/// `preprocess`.
pub fn model_to_open_clip_config(cfg: &ModelConfig, preprocess: &Preprocess) -> Value {
    serde_json::json!({
        "model_cfg": cfg,
        "preprocess_cfg": preprocess_to_open_clip(preprocess),
    })
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
pub fn preprocess_to_open_clip(p: &Preprocess) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interchange::pretrained::{Pretrained, TOKENIZER_CONFIG, TOKENIZER_JSON};
    use crate::interchange::Source;

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
            Some(&preprocess_to_open_clip(&Preprocess::siglip(384))),
            384,
        )
        .unwrap();
        assert_eq!(back, Preprocess::siglip(384));
        let err =
            preprocess_from_open_clip(Some(&serde_json::json!({"interpolation": "lanczos"})), 224)
                .unwrap_err();
        assert!(err.contains("lanczos"), "{err}");
    }
}
