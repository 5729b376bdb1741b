//! Writing a model for the ecosystem's loaders: a directory that open_clip or Hugging Face
//! `CLIPModel.from_pretrained` reads as is, weights plus the config file each expects.
//!
//! - open_clip: `open_clip_model.safetensors` and `open_clip_config.json`
//!   (`{"model_cfg": ..., "preprocess_cfg": ...}`, the layout open_clip's `hf-hub:` loader
//!   reads; `open_clip.create_model(name, pretrained=".../open_clip_model.safetensors")`
//!   loads the weights for a built-in architecture);
//! - Hugging Face: `model.safetensors` (with the `{"format": "pt"}` metadata transformers
//!   requires), `config.json` and `preprocessor_config.json` for `CLIPImageProcessor`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oxclip_data_loader::{OPENAI_MEAN, OPENAI_STD};
use tch::Tensor;

use super::config::{ModelConfig, VisionTowerKind};
use super::{hf, write_safetensors};
use crate::error::{io_err, Result, TrainError};

/// Which loader the export is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenClip,
    HuggingFace,
}

/// Writes `weights` (open_clip names) for `format` into `out`; returns the files written.
pub fn export(weights: BTreeMap<String, Tensor>, cfg: &ModelConfig, format: Format, out: &Path) -> Result<Vec<PathBuf>> {
    if format == Format::HuggingFace && matches!(cfg.vision_cfg.tower(), VisionTowerKind::ResNet(_)) {
        return Err(TrainError::ModelConfig(
            "a ModifiedResNet image tower (RN50, RN101, RN50x4, ...) has no Hugging Face CLIPModel counterpart \
             (transformers' CLIP vision model is a ViT); export with --format open_clip"
                .into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let size = cfg.vision_cfg.image_size;
    let written = match format {
        Format::OpenClip => {
            let model = out.join("open_clip_model.safetensors");
            write_safetensors(&weights, None, &model)?;
            let config = out.join("open_clip_config.json");
            let json = serde_json::json!({
                "model_cfg": cfg,
                "preprocess_cfg": {
                    "size": size,
                    "mean": OPENAI_MEAN,
                    "std": OPENAI_STD,
                    "interpolation": "bicubic",
                    "resize_mode": "shortest"
                }
            });
            write_json(&config, &json)?;
            vec![model, config]
        }
        Format::HuggingFace => {
            let model = out.join("model.safetensors");
            write_safetensors(&hf::to_hf(weights)?, None, &model)?;
            let config = out.join("config.json");
            write_json(&config, &hf::hf_config(cfg))?;
            let preprocessor = out.join("preprocessor_config.json");
            write_json(
                &preprocessor,
                &serde_json::json!({
                    "image_processor_type": "CLIPImageProcessor",
                    "do_resize": true,
                    "size": {"shortest_edge": size},
                    "resample": 3,
                    "do_center_crop": true,
                    "crop_size": {"height": size, "width": size},
                    "do_rescale": true,
                    "rescale_factor": 1.0 / 255.0,
                    "do_normalize": true,
                    "image_mean": OPENAI_MEAN,
                    "image_std": OPENAI_STD,
                    "do_convert_rgb": true
                }),
            )?;
            vec![model, config, preprocessor]
        }
    };
    Ok(written)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn exports_load_back_into_the_same_model() {
        let cfg: ModelConfig = serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml")).unwrap();
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = super::super::Clip::new(&vs.root(), &cfg).unwrap();
        let weights: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let dir = tempfile::tempdir().unwrap();
        for (format, file) in [(Format::OpenClip, "open_clip_model.safetensors"), (Format::HuggingFace, "model.safetensors")] {
            let out = dir.path().join(format!("{format:?}"));
            let files = export(weights.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect(), &cfg, format, &out).unwrap();
            assert!(files.iter().all(|f| f.is_file()));
            let other = nn::VarStore::new(Device::Cpu);
            let _ = super::super::Clip::new(&other.root(), &cfg).unwrap();
            super::super::load_weights(&other, &out.join(file)).unwrap();
            for (name, t) in other.variables() {
                assert!(t.equal(&weights[&name]), "{format:?}: {name}");
            }
        }
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("HuggingFace/config.json")).unwrap()).unwrap();
        assert_eq!(config["vision_config"]["num_attention_heads"], 2);
        assert_eq!(config["text_config"]["intermediate_size"], 192);
    }

    /// A SigLIP-trained model exports to open_clip with its bias (weights and `model_cfg`),
    /// refuses Hugging Face's CLIPModel by name, and loads CLIP weights keeping its bias.
    #[test]
    fn a_sigmoid_loss_model_keeps_its_bias() {
        let mut cfg: ModelConfig = serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml")).unwrap();
        let clip_vs = nn::VarStore::new(Device::Cpu);
        let _ = super::super::Clip::new(&clip_vs.root(), &cfg).unwrap();
        cfg.init_logit_bias = Some(-10.0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = super::super::Clip::new(&vs.root(), &cfg).unwrap();
        let weights: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let dir = tempfile::tempdir().unwrap();
        let files = export(weights.iter().map(|(k, v)| (k.clone(), v.detach().copy())).collect(), &cfg, Format::OpenClip, dir.path()).unwrap();
        let saved: BTreeMap<String, Tensor> = Tensor::read_safetensors(&files[0]).unwrap().into_iter().collect();
        assert_eq!(saved["logit_bias"].double_value(&[]), -10.0);
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files[1]).unwrap()).unwrap();
        assert_eq!(config["model_cfg"]["init_logit_bias"], -10.0);

        let err = export(weights, &cfg, Format::HuggingFace, &dir.path().join("hf")).unwrap_err().to_string();
        assert!(err.contains("logit_bias") && err.contains("--format open_clip"), "{err}");

        // CLIP weights into the SigLIP model: everything loads, the bias keeps its start.
        let clip_file = dir.path().join("clip.safetensors");
        super::super::save_weights(&clip_vs, &clip_file).unwrap();
        let _ = tch::no_grad(|| model.logit_bias.as_ref().unwrap().shallow_clone().fill_(-3.0));
        super::super::load_weights(&vs, &clip_file).unwrap();
        assert_eq!(model.logit_bias.as_ref().unwrap().double_value(&[]), -3.0);
        assert!(vs.variables()["visual.proj"].equal(&clip_vs.variables()["visual.proj"]));
    }
}
