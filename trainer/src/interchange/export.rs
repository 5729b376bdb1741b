//! Writing a model for the ecosystem's loaders: a directory that open_clip or Hugging Face
//! `CLIPModel.from_pretrained` reads as is, weights plus the config file each expects.
//!
//! - open_clip: `open_clip_model.safetensors` and `open_clip_config.json`
//!   (`{"model_cfg": ..., "preprocess_cfg": ...}`, the layout open_clip's `hf-hub:` loader
//!   reads; `open_clip.create_model(name, pretrained=".../open_clip_model.safetensors")`
//!   loads the weights for a built-in architecture);
//! - Hugging Face: `model.safetensors` (with the `{"format": "pt"}` metadata transformers
//!   requires), `config.json` and `preprocessor_config.json`: a `CLIPModel` with a
//!   `CLIPImageProcessor`, or, for a model in open_clip's SigLIP form (a timm SigLIP trunk, a
//!   custom text tower, a `logit_bias`), a `SiglipModel` with a `SiglipImageProcessor`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oxclip_data_loader::{Interpolation, Preprocess, ResizeMode};
use tch::Tensor;

use super::safetensors::write_safetensors;
use super::{hf_clip, hf_siglip, pretrained};
use crate::error::{io_err, Result, TrainError};
use crate::model::config::{ModelConfig, VisionTowerKind};

/// Which loader the export is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenClip,
    HuggingFace,
}

/// Writes `weights` (open_clip names) for `format` into `out`; returns the files written.
/// `preprocess` is how the model's images are prepared (a directory's, a run's); without one,
/// the family's own (SigLIP's for the SigLIP form, else OpenAI's).
pub fn export(
    weights: BTreeMap<String, Tensor>,
    cfg: &ModelConfig,
    preprocess: Option<&Preprocess>,
    format: Format,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    if format == Format::HuggingFace && matches!(cfg.vision_cfg.tower(), VisionTowerKind::ResNet(_))
    {
        return Err(TrainError::ModelConfig(
            "a ModifiedResNet image tower (RN50, RN101, RN50x4, ...) has no Hugging Face CLIPModel counterpart \
             (transformers' CLIP vision model is a ViT); export with --format open_clip"
                .into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let size = cfg.vision_cfg.image_size as u32;
    let siglip = is_siglip_form(cfg);
    let preprocess = match preprocess {
        Some(p) => p.clone(),
        None if siglip => Preprocess::siglip(size),
        None => Preprocess::openai(size),
    };
    let written = match format {
        Format::OpenClip => {
            let model = out.join("open_clip_model.safetensors");
            write_safetensors(&weights, None, &model)?;
            let config = out.join("open_clip_config.json");
            let json = serde_json::json!({
                "model_cfg": cfg,
                "preprocess_cfg": pretrained::open_clip_preprocess_cfg(&preprocess),
            });
            write_json(&config, &json)?;
            vec![model, config]
        }
        Format::HuggingFace => {
            let (tensors, config_json) = if siglip {
                (hf_siglip::to_hf(weights)?, siglip_config(cfg)?)
            } else {
                (hf_clip::to_hf(weights)?, clip_config(cfg)?)
            };
            let model = out.join("model.safetensors");
            write_safetensors(&tensors, None, &model)?;
            let config = out.join("config.json");
            write_json(&config, &config_json)?;
            let preprocessor = out.join("preprocessor_config.json");
            write_json(&preprocessor, &hf_preprocessor(&preprocess, siglip)?)?;
            vec![model, config, preprocessor]
        }
    };
    Ok(written)
}

/// open_clip's SigLIP form, which transformers holds as a `SiglipModel`: a timm trunk, the
/// text tower under `text.`, a `logit_bias`.
pub fn is_siglip_form(cfg: &ModelConfig) -> bool {
    matches!(cfg.vision_cfg.tower(), VisionTowerKind::Timm(_))
        && cfg.custom_text
        && cfg.init_logit_bias.is_some()
}

/// The `config.json` `SiglipModel.from_pretrained` reads for `cfg`. What a SiglipModel cannot
/// hold is found by reading the result back: any difference is an error naming the keys.
pub fn siglip_config(cfg: &ModelConfig) -> Result<serde_json::Value> {
    let (t, v) = (&cfg.text_cfg, &cfg.vision_cfg);
    let name = v.timm_model_name.as_deref().unwrap_or_default();
    let trunk = crate::model::timm_vit::architectures().into_iter().find(|s| s.name == name).ok_or_else(|| {
        TrainError::ModelConfig(format!("vision_cfg.timm_model_name {name:?} is not one of the SigLIP trunks a SiglipModel holds"))
    })?;
    let approximate = |act: &Option<crate::model::config::ActKwargs>, default: bool| match act
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
            "hidden_act": approximate(&v.act_kwargs, trunk.act == crate::model::config::Activation::GeluTanh),
            "layer_norm_eps": 1e-6,
            "vision_use_head": true
        }
    });
    let back =
        pretrained::model_from_hf_config(&json).map(|(_, m)| m).map_err(TrainError::ModelConfig)?;
    let diffs = pretrained::differences(&back, cfg);
    if !diffs.is_empty() {
        return Err(TrainError::ModelConfig(format!(
            "a Hugging Face SiglipModel cannot hold this model ({}); export with --format open_clip",
            diffs.join("; ")
        )));
    }
    Ok(json)
}

/// The `config.json` of a `CLIPModel`, refused (by key) where it would read back as another
/// model: a CLIPModel has no LayerScale, pools text at argmax / first EOS, ...
fn clip_config(cfg: &ModelConfig) -> Result<serde_json::Value> {
    let json = hf_clip::hf_config(cfg);
    let back =
        pretrained::model_from_hf_config(&json).map(|(_, m)| m).map_err(TrainError::ModelConfig)?;
    let diffs = pretrained::differences(&back, cfg);
    if !diffs.is_empty() {
        return Err(TrainError::ModelConfig(format!(
            "a Hugging Face CLIPModel cannot hold this model ({}); export with --format open_clip",
            diffs.join("; ")
        )));
    }
    Ok(json)
}

/// `preprocessor_config.json`: `CLIPImageProcessor` (shortest side + centre crop) or
/// `SiglipImageProcessor` (both sides to the size).
fn hf_preprocessor(p: &Preprocess, siglip: bool) -> Result<serde_json::Value> {
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

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn exports_load_back_into_the_same_model() {
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml"))
                .unwrap();
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = crate::model::Clip::new(&vs.root(), &cfg).unwrap();
        let weights: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let dir = tempfile::tempdir().unwrap();
        for (format, file) in [
            (Format::OpenClip, "open_clip_model.safetensors"),
            (Format::HuggingFace, "model.safetensors"),
        ] {
            let out = dir.path().join(format!("{format:?}"));
            let files = export(
                weights.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect(),
                &cfg,
                None,
                format,
                &out,
            )
            .unwrap();
            assert!(files.iter().all(|f| f.is_file()));
            let other = nn::VarStore::new(Device::Cpu);
            let _ = crate::model::Clip::new(&other.root(), &cfg).unwrap();
            crate::interchange::weights::load_weights(&other, &out.join(file)).unwrap();
            for (name, t) in other.variables() {
                assert!(t.equal(&weights[&name]), "{format:?}: {name}");
            }
        }
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("HuggingFace/config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["vision_config"]["num_attention_heads"], 2);
        assert_eq!(config["text_config"]["intermediate_size"], 192);
    }

    /// A SigLIP-trained model exports to open_clip with its bias (weights and `model_cfg`),
    /// refuses Hugging Face's CLIPModel by name, and loads CLIP weights keeping its bias.
    #[test]
    fn a_sigmoid_loss_model_keeps_its_bias() {
        let mut cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml"))
                .unwrap();
        let clip_vs = nn::VarStore::new(Device::Cpu);
        let _ = crate::model::Clip::new(&clip_vs.root(), &cfg).unwrap();
        cfg.init_logit_bias = Some(-10.0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = crate::model::Clip::new(&vs.root(), &cfg).unwrap();
        let weights: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let dir = tempfile::tempdir().unwrap();
        let files = export(
            weights.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect(),
            &cfg,
            None,
            Format::OpenClip,
            dir.path(),
        )
        .unwrap();
        let saved: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(&files[0]).unwrap().into_iter().collect();
        assert_eq!(saved["logit_bias"].double_value(&[]), -10.0);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
        assert_eq!(config["model_cfg"]["init_logit_bias"], -10.0);

        let err = export(weights, &cfg, None, Format::HuggingFace, &dir.path().join("hf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("logit_bias") && err.contains("--format open_clip"), "{err}");

        // CLIP weights into the SigLIP model: everything loads, the bias keeps its start.
        let clip_file = dir.path().join("clip.safetensors");
        crate::interchange::weights::save_weights(&clip_vs, &clip_file).unwrap();
        let _ = tch::no_grad(|| model.logit_bias.as_ref().unwrap().shallow_clone().fill_(-3.0));
        crate::interchange::weights::load_weights(&vs, &clip_file).unwrap();
        assert_eq!(model.logit_bias.as_ref().unwrap().double_value(&[]), -3.0);
        assert!(vs.variables()["visual.proj"].equal(&clip_vs.variables()["visual.proj"]));
    }
}
