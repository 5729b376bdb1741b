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
//!
//! An export never overwrites or removes a file it did not write: [`ExportDir`] refuses a
//! folder holding anything but an earlier oxclip export (its `.oxclip-export.json` lists what
//! it wrote), writes every file under a temporary name and renames them only once all are
//! written, so a failed export leaves the folder as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oxclip_data_loader::Preprocess;
use tch::Tensor;

use super::hugging_face::{self, HF_CONFIG, HF_PREPROCESSOR, HF_WEIGHTS};
use super::open_clip::{self, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS};
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
    let mut dir = ExportDir::open(out)?;
    export_into(&mut dir, weights, cfg, preprocess, format)?;
    dir.commit()
}

/// [`export`] into `dir`, staged: the files appear once `dir` is committed (with whatever
/// else the caller stages there, a tokenizer).
pub fn export_into(
    dir: &mut ExportDir,
    weights: BTreeMap<String, Tensor>,
    cfg: &ModelConfig,
    preprocess: Option<&Preprocess>,
    format: Format,
) -> Result<()> {
    if format == Format::HuggingFace && matches!(cfg.vision_cfg.tower(), VisionTowerKind::ResNet(_))
    {
        return Err(TrainError::ModelConfig(
            "a ModifiedResNet image tower (RN50, RN101, RN50x4, ...) has no Hugging Face CLIPModel counterpart \
             (transformers' CLIP vision model is a ViT); export with --format open_clip"
                .into(),
        ));
    }
    if format == Format::HuggingFace && cfg.is_coca() {
        return Err(TrainError::ModelConfig(
            "a CoCa model has no Hugging Face counterpart (transformers has no CoCa class to hold its \
             captioning decoder and attentional pooler); export with --format open_clip"
                .into(),
        ));
    }
    if let (Format::HuggingFace, Some(name)) = (format, &cfg.text_cfg.hf_model_name) {
        return Err(TrainError::ModelConfig(format!(
            "the Hugging Face text tower ({name}) has no place in transformers' CLIPModel or SiglipModel, \
             whose text models are CLIP's and SigLIP's own; export with --format open_clip, which open_clip \
             loads with its HFTextEncoder"
        )));
    }
    let siglip = is_siglip_form(cfg);
    if let (Format::HuggingFace, VisionTowerKind::Timm(name), false) =
        (format, cfg.vision_cfg.tower(), siglip)
    {
        return Err(TrainError::ModelConfig(format!(
            "the timm image tower {name} outside open_clip's SigLIP form has no Hugging Face counterpart \
             (transformers' CLIPModel vision tower is open_clip's own ViT); export with --format open_clip"
        )));
    }
    let size = cfg.vision_cfg.image_size as u32;
    let preprocess = match preprocess {
        Some(p) => p.clone(),
        None if siglip => Preprocess::siglip(size),
        None => Preprocess::openai(size),
    };
    match format {
        Format::OpenClip => {
            write_safetensors(&weights, None, &dir.stage(OPEN_CLIP_WEIGHTS)?)?;
            let config = open_clip::model_to_open_clip_config(cfg, &preprocess);
            write_json(&dir.stage(OPEN_CLIP_CONFIG)?, &config)?;
        }
        Format::HuggingFace => {
            let (tensors, config_json) = if siglip {
                (hf_siglip::to_hf(weights)?, siglip_config(cfg)?)
            } else {
                (hf_clip::to_hf(weights)?, clip_config(cfg)?)
            };
            write_safetensors(&tensors, None, &dir.stage(HF_WEIGHTS)?)?;
            write_json(&dir.stage(HF_CONFIG)?, &config_json)?;
            let preprocessor = hugging_face::preprocess_to_hf(&preprocess, siglip)?;
            write_json(&dir.stage(HF_PREPROCESSOR)?, &preprocessor)?;
        }
    }
    Ok(())
}

/// What an export wrote, beside it: `.oxclip-export.json`.
pub const EXPORT_MARKER: &str = ".oxclip-export.json";

/// The output folder of one export, written as a whole or not at all.
pub struct ExportDir {
    out: PathBuf,
    /// Whether this export made the folder (and so may remove it when it fails).
    created: bool,
    /// The files an earlier oxclip export wrote there (which this one may replace or remove).
    earlier: Vec<String>,
    /// Names staged, in order; each written as `.<name>.oxclip-tmp` until committed.
    staged: Vec<String>,
    committed: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    written_by: String,
    files: Vec<String>,
}

impl ExportDir {
    /// Opens `out` for an export: missing (made), empty, or an earlier oxclip export; any
    /// other file there is an error naming it.
    pub fn open(out: &Path) -> Result<ExportDir> {
        let names: Vec<String> = match std::fs::read_dir(out) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()
                .map_err(io_err(out))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(TrainError::Io { path: out.into(), source: e }),
        };
        let earlier: Vec<String> = std::fs::read_to_string(out.join(EXPORT_MARKER))
            .ok()
            .and_then(|text| serde_json::from_str::<Marker>(&text).ok())
            .filter(|m| m.written_by == "oxclip export")
            .map(|m| m.files.into_iter().filter(|f| is_plain_name(f)).collect())
            .unwrap_or_default();
        let foreign: Vec<&String> =
            names.iter().filter(|n| n.as_str() != EXPORT_MARKER && !earlier.contains(n)).collect();
        if !foreign.is_empty() {
            let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
            let more = if foreign.len() > 5 {
                format!(" and {} more", foreign.len() - 5)
            } else {
                String::new()
            };
            return Err(TrainError::Input(format!(
                "{}: the folder holds {} file(s) that an oxclip export did not write ({}{more}); \
                 an export never overwrites or removes them. Export into an empty or new folder",
                out.display(),
                foreign.len(),
                shown.join(", ")
            )));
        }
        let created = !out.exists();
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        Ok(ExportDir { out: out.into(), created, earlier, staged: Vec::new(), committed: false })
    }

    /// Where to write the file `name`, to appear as `out/name` at [`ExportDir::commit`].
    pub fn stage(&mut self, name: &str) -> Result<PathBuf> {
        if !is_plain_name(name) || self.staged.iter().any(|s| s == name) {
            return Err(TrainError::Input(format!(
                "an export cannot write {name:?} twice or outside its folder"
            )));
        }
        self.staged.push(name.to_owned());
        Ok(self.tmp(name))
    }

    /// The final path of a staged name.
    pub fn path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.out.join(format!(".{name}.oxclip-tmp"))
    }

    /// Renames every staged file into place, records them in the marker, and removes the
    /// files of the earlier export this one did not write again. Returns the files written.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        for name in &self.staged {
            let (tmp, to) = (self.tmp(name), self.out.join(name));
            std::fs::rename(&tmp, &to).map_err(io_err(&to))?;
        }
        let marker = Marker { written_by: "oxclip export".into(), files: self.staged.clone() };
        let path = self.out.join(EXPORT_MARKER);
        let text = serde_json::to_string_pretty(&marker)
            .map_err(|e| TrainError::Input(format!("{}: {e}", path.display())))?;
        std::fs::write(&path, text + "\n").map_err(io_err(&path))?;
        for stale in self.earlier.iter().filter(|e| !self.staged.contains(e)) {
            let _ = std::fs::remove_file(self.out.join(stale));
        }
        self.committed = true;
        Ok(self.staged.iter().map(|n| self.out.join(n)).collect())
    }
}

impl Drop for ExportDir {
    /// An export that did not commit leaves the folder as it found it.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for name in &self.staged {
            let _ = std::fs::remove_file(self.tmp(name));
        }
        if self.created {
            let _ = std::fs::remove_dir(&self.out); // only when nothing is left in it
        }
    }
}

/// A file name without a directory part (a marker could list anything).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\\')
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
    held_as("SiglipModel", hugging_face::siglip_to_hf_config(cfg)?, cfg)
}

/// The `config.json` of a `CLIPModel`, refused (by key) where it would read back as another
/// model: a CLIPModel has no LayerScale, pools text at argmax / first EOS, ...
fn clip_config(cfg: &ModelConfig) -> Result<serde_json::Value> {
    held_as("CLIPModel", hugging_face::clip_to_hf_config(cfg), cfg)
}

/// `json`, a Hugging Face `class`'s `config.json`, when it reads back as `cfg`; else the
/// error naming where the two differ.
fn held_as(class: &str, json: serde_json::Value, cfg: &ModelConfig) -> Result<serde_json::Value> {
    let back = hugging_face::model_from_hf_config(&json)
        .map(|(_, m)| m)
        .map_err(TrainError::ModelConfig)?;
    let diffs = pretrained::differences(&back, cfg);
    if !diffs.is_empty() {
        return Err(TrainError::ModelConfig(format!(
            "a Hugging Face {class} cannot hold this model ({}); export with --format open_clip",
            diffs.join("; ")
        )));
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
    use crate::interchange::pretrained::Pretrained;
    use crate::interchange::weights::{load_weights, save_weights};
    use crate::interchange::Source;
    use crate::model::Clip;
    use tch::{nn, Device};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    #[test]
    fn exports_load_back_into_the_same_model() {
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml"))
                .unwrap();
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs.root(), &cfg).unwrap();
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
            let _ = Clip::new(&other.root(), &cfg).unwrap();
            load_weights(&other, &out.join(file)).unwrap();
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
        let _ = Clip::new(&clip_vs.root(), &cfg).unwrap();
        cfg.init_logit_bias = Some(-10.0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).unwrap();
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
        save_weights(&clip_vs, &clip_file).unwrap();
        let _ = tch::no_grad(|| model.logit_bias.as_ref().unwrap().shallow_clone().fill_(-3.0));
        load_weights(&vs, &clip_file).unwrap();
        assert_eq!(model.logit_bias.as_ref().unwrap().double_value(&[]), -3.0);
        assert!(vs.variables()["visual.proj"].equal(&clip_vs.variables()["visual.proj"]));
    }

    /// What transformers reads from an `--format hf` export is what transformers itself wrote
    /// for the same model (`fixture`, from `save_pretrained`): the same tensor names, shapes,
    /// dtypes and values, and the same architecture and every key of `vision_config` and
    /// `text_config` that decides a layer's shape or function. `from_pretrained` then builds
    /// the fixture's model with the fixture's weights (checked by hand once, with
    /// `OXCLIP_KEEP_EXPORTS`: embeddings within 1.6e-7 of `oxclip embed`).
    fn same_as_transformers_wrote(fixture: &Path, out: &Path) {
        let read_weights = |dir: &Path| -> BTreeMap<String, Tensor> {
            Tensor::read_safetensors(dir.join(HF_WEIGHTS)).unwrap().into_iter().collect()
        };
        let (ours, theirs) = (read_weights(out), read_weights(fixture));
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
        for (k, v) in &theirs {
            assert_eq!((ours[k].size(), ours[k].kind()), (v.size(), v.kind()), "{k}");
            assert!(ours[k].equal(v), "{k}");
        }
        let read = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(HF_CONFIG)).unwrap()).unwrap()
        };
        let (ours, theirs) = (read(out), read(fixture));
        for key in ["architectures", "model_type", "projection_dim"] {
            assert_eq!(ours[key], theirs[key], "{key}");
        }
        // Keys that decide no layer's shape or function in CLIPModel / SiglipModel: dropout
        // (off at inference; transformers' default is the fixture's 0.0), initialisation, the
        // towers' own projection_dim (read only by the *WithProjection classes; the model's
        // is the top-level key), pad_token_id (no padding_idx in their embeddings; pooling
        // looks for the EOS id), and provenance.
        const NOT_ARCHITECTURE: &[&str] = &[
            "attention_dropout",
            "initializer_factor",
            "initializer_range",
            "projection_dim",
            "pad_token_id",
            "bos_token_id",
            "dtype",
            "transformers_version",
        ];
        for tower in ["vision_config", "text_config"] {
            for (key, value) in theirs[tower].as_object().unwrap() {
                if !NOT_ARCHITECTURE.contains(&key.as_str()) {
                    assert_eq!(&ours[tower][key], value, "{tower}.{key}");
                }
            }
        }
    }

    /// `--format hf` of a SigLIP model writes a SiglipModel directory that reads back as the
    /// same model, preprocessing and weights (the weights go through open_clip names, so no
    /// model has to be built). The CLIP directory likewise comes back as its CLIPModel.
    /// `OXCLIP_KEEP_EXPORTS=DIR` keeps the directories, for checking them with transformers.
    #[test]
    fn exports_read_back_as_the_same_model_and_weights() {
        use tch::Tensor;
        let tmp = tempfile::tempdir().unwrap();
        let root =
            std::env::var_os("OXCLIP_KEEP_EXPORTS").map_or(tmp.path().to_path_buf(), PathBuf::from);
        for (name, mapping) in [("hf_siglip_tiny", true), ("hf_clip_quickgelu_tiny", false)] {
            let p = Pretrained::read(&fixtures().join(name)).unwrap();
            let hf: std::collections::BTreeMap<String, Tensor> =
                Tensor::read_safetensors(&p.weights).unwrap().into_iter().collect();
            let oc = if mapping {
                hf_siglip::from_hf(hf).unwrap()
            } else {
                hf_clip::from_hf(hf).unwrap()
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
                    same_as_transformers_wrote(&fixtures().join(name), &out);
                    written = if mapping {
                        hf_siglip::from_hf(written).unwrap()
                    } else {
                        hf_clip::from_hf(written).unwrap()
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
        let err = siglip_config(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("text_cfg.no_causal_mask") && err.contains("--format open_clip"),
            "{err}"
        );
    }

    /// An export that fails before committing leaves nothing: its temporary files go, and so
    /// does the folder it made.
    #[test]
    fn an_uncommitted_export_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new");
        {
            let mut export = ExportDir::open(&out).unwrap();
            std::fs::write(export.stage("model.safetensors").unwrap(), b"half").unwrap();
            assert!(export.stage("model.safetensors").is_err(), "staged twice");
            assert!(export.stage("../escape").is_err());
        }
        assert!(!out.exists(), "the folder it made is gone");
        // A folder that held an earlier export keeps that export when the next one fails.
        let first = ExportDir::open(&out).unwrap();
        let mut first = first;
        std::fs::write(first.stage("config.json").unwrap(), b"{}").unwrap();
        first.commit().unwrap();
        {
            let mut second = ExportDir::open(&out).unwrap();
            std::fs::write(second.stage("config.json").unwrap(), b"{\"new\": 1}").unwrap();
        }
        assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{}");
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [EXPORT_MARKER, "config.json"]);
    }
}
