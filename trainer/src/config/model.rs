//! `model:`, what a run config names a model by, resolved to its config: a built-in name
//! (open_clip's zoo and oxclip's own), a model file (a model YAML, an open_clip JSON, an
//! `open_clip_config.json`, or one of OpenAI's `.pt` files, whose tensors' shapes are the
//! model), a model directory (Hugging Face's `config.json` or open_clip's hub layout), or the
//! config itself inline (what a resolved config holds).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::yaml::deserialize_text;
use super::{ConfigError, Origin};
use crate::interchange::pretrained;
use crate::model::{zoo, ModelConfig};

/// The model as the config names it: a built-in name, a path to a model YAML, or the config
/// itself inline (what the resolved config written to a run directory holds).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ModelRef {
    Name(String),
    Inline(Box<ModelConfig>),
}

/// A string is a name and a mapping the model itself, decided by what the YAML holds: the
/// mapping is then read as a `ModelConfig` from the same deserializer, so a typo inside it is
/// reported with its key path and line (serde's untagged enums only say that no variant matched).
impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ModelRef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a built-in model name, the path of a model file or directory, or the model config inline")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<ModelRef, E> {
                Ok(ModelRef::Name(name.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<ModelRef, A::Error> {
                ModelConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|m| ModelRef::Inline(Box::new(m)))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What an unknown model reference is told: the closest built-in names.
pub(super) fn unknown_model(reference: &str) -> String {
    format!(
        "model `{reference}` is neither a built-in model nor an existing file{} \
         (`oxclip model list` prints the built-in names)",
        suggestion(reference)
    )
}

/// `; did you mean ViT-B-32 or ViT-B-32-256?` when names are close to `reference`.
pub(super) fn suggestion(reference: &str) -> String {
    match zoo::suggest(reference, 3).as_slice() {
        [] => String::new(),
        [one] => format!("; did you mean {one}?"),
        [rest @ .., last] => format!("; did you mean {} or {last}?", rest.join(", ")),
    }
}

/// Resolves a model reference to its config: a built-in name first (open_clip's zoo and
/// oxclip's own), then a file ([`model_from_file`]), then a model directory.
pub fn resolve_model(reference: &str) -> Result<ModelConfig, ConfigError> {
    resolve_named(reference).map(|named| named.model)
}

/// A model reference resolved: the config, where it came from, and the directory when it is
/// one (which also says how the model's text and images are prepared).
pub(super) struct Named {
    pub model: ModelConfig,
    pub origin: Origin,
    pub directory: Option<pretrained::Pretrained>,
}

/// [`resolve_model`], keeping what the run config's resolution needs besides the model.
pub(super) fn resolve_named(reference: &str) -> Result<Named, ConfigError> {
    let named = |model, origin| Named { model, origin, directory: None };
    if let Some(config) = zoo::builtin(reference) {
        let source = PathBuf::from(format!("<built-in model {reference}>"));
        crate::model::validate(&config)
            .map_err(|e| ConfigError::Invalid { path: source, message: e.to_string() })?;
        return Ok(named(config, Origin::BuiltIn));
    }
    let path = Path::new(reference);
    if path.is_file() && crate::interchange::pickle::is_torchscript(path) {
        // One of OpenAI's own files: its tensors' shapes are the model.
        let file = pretrained::Pretrained::openai(path)
            .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })?;
        let origin = Origin::ModelFile(path.to_owned());
        return Ok(Named { model: file.model.clone(), origin, directory: Some(file) });
    }
    if path.is_file() {
        return Ok(named(model_from_file(path)?, Origin::ModelFile(path.to_owned())));
    }
    if path.is_dir() {
        // A Hugging Face (`config.json`) or open_clip hub (`open_clip_config.json`) directory.
        let dir = pretrained::Pretrained::read(path)
            .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })?;
        let origin = Origin::ModelDirectory(path.to_owned());
        return Ok(Named { model: dir.model.clone(), origin, directory: Some(dir) });
    }
    Err(ConfigError::UnknownModel(reference.to_string()))
}

/// A model config file: a model YAML, an open_clip model config JSON as is
/// (`model_configs/ViT-B-32.json`), or an `open_clip_config.json` (open_clip's hub layout,
/// what `oxclip export --format open_clip` writes), whose `model_cfg` is the model.
pub fn model_from_file(path: &Path) -> Result<ModelConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let invalid = |message: String| ConfigError::Invalid { path: path.into(), message };
    let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value: Option<serde_yaml::Value> = if json {
        Some(serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?)
    } else {
        // A YAML syntax error is reported below with its line.
        serde_yaml::from_str(&text).ok()
    };
    let model_cfg = value.as_ref().and_then(|v| v.get("model_cfg")).cloned();
    let config: ModelConfig = match (model_cfg, value) {
        (Some(model_cfg), _) => serde_path_to_error::deserialize(model_cfg).map_err(|e| {
            let key = match e.path().to_string().as_str() {
                "." => "model_cfg".to_owned(),
                inner => format!("model_cfg.{inner}"),
            };
            invalid(format!("{key}: {}", e.inner()))
        })?,
        (None, Some(value)) if json => {
            serde_path_to_error::deserialize(value).map_err(|e| {
                match e.path().to_string().as_str() {
                    "." => invalid(e.inner().to_string()),
                    key => invalid(format!("{key}: {}", e.inner())),
                }
            })?
        }
        _ => deserialize_text(&text, path)?,
    };
    crate::model::validate(&config)
        .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of OpenAI's `.pt` files names its own model, and says how its images are prepared.
    #[test]
    fn an_openai_file_is_a_model_reference() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/pickle/openai_vit.pt")
            .display()
            .to_string();
        let named = resolve_named(&file).unwrap();
        assert!(named.model.quick_gelu);
        assert_eq!(named.model.vision_cfg.width, 64);
        let dir = named.directory.unwrap();
        assert_eq!(dir.preprocess, oxclip_data_loader::Preprocess::openai(16));
        assert!(matches!(named.origin, Origin::ModelFile(_)));
    }
}
