//! The run config: one YAML file gathering the model and the sections of the crates that use
//! them (`data:` the loader's, `loss:` the loss's, the rest the trainer's). Every command that
//! reads one goes through [`load`]: read (as written, `--set dotted.key=value` overrides
//! applied), resolve (the model inline, a model directory's tokenizer and preprocessing, what
//! the loss needs of the model), check (every section, [`oxclip_trainer::config::validate`],
//! and the tokenizer against the text tower). So `oxclip config show` and `oxclip train` accept
//! and refuse the same configs with the same messages. Unknown keys and wrong types, inside an
//! inline model too, are errors that name the key path and the line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use oxclip_trainer::config::{DataConfig, DistConfig, LossConfig, OptimConfig, TrainConfig};
use oxclip_trainer::interchange::pretrained;
use oxclip_trainer::model::{zoo, ModelConfig};
use oxclip_trainer::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    #[error("model `{0}` is neither a built-in model nor an existing file{hint} (`oxclip model list` prints the built-in names)", hint = suggestion(.0))]
    UnknownModel(String),
}

/// The model as the config names it: a built-in name, a path to a model YAML, or the config
/// itself inline (what the resolved config written to a run directory holds).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ModelRef {
    Name(String),
    Inline(ModelConfig),
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
                    .map(ModelRef::Inline)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A run config as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where checkpoints, TensorBoard events, results.jsonl and config.yaml go.
    pub run_dir: PathBuf,
    /// A built-in model name (open_clip's: ViT-B-32, RN50, ...; `oxclip model list`), a path to
    /// a model YAML or open_clip JSON, or the model config inline.
    pub model: ModelRef,
    pub data: DataConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub loss: LossConfig,
    /// Where a fresh run's weights come from (fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    /// How ranks talk to each other in a multi-process run.
    #[serde(default)]
    pub dist: DistConfig,
    /// Benchmark sets evaluated with `data.val` every `train.eval_every` steps.
    #[serde(default, skip_serializing_if = "is_default_eval")]
    pub eval: oxclip_trainer::config::EvalConfig,
}

fn is_default_eval(eval: &oxclip_trainer::config::EvalConfig) -> bool {
    eval.datasets.is_empty()
}

/// `init:` — starting weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// A safetensors file with open_clip's parameter names (an open_clip
    /// `open_clip_model.safetensors`, or an oxclip checkpoint's `model.safetensors`).
    pub checkpoint: PathBuf,
}

/// `; did you mean ViT-B-32 or ViT-B-32-256?` when names are close to `reference`.
fn suggestion(reference: &str) -> String {
    match zoo::suggest(reference, 3).as_slice() {
        [] => String::new(),
        [one] => format!("; did you mean {one}?"),
        [rest @ .., last] => format!("; did you mean {} or {last}?", rest.join(", ")),
    }
}

/// Resolves a model reference to its config: a built-in name first (open_clip's zoo and
/// oxclip's own), then a file ([`model_from_file`]).
pub fn resolve_model(reference: &str) -> Result<ModelConfig, ConfigError> {
    if let Some(config) = zoo::builtin(reference) {
        let source = PathBuf::from(format!("<built-in model {reference}>"));
        config
            .validate()
            .map_err(|e| ConfigError::Invalid { path: source, message: e.to_string() })?;
        return Ok(config);
    }
    let path = Path::new(reference);
    if path.is_file() {
        return model_from_file(path);
    }
    if path.is_dir() {
        return Ok(model_directory(path)?.model);
    }
    Err(ConfigError::UnknownModel(reference.to_string()))
}

/// A Hugging Face (`config.json`) or open_clip hub (`open_clip_config.json`) model directory.
fn model_directory(path: &Path) -> Result<pretrained::Pretrained, ConfigError> {
    pretrained::Pretrained::read(path)
        .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })
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
    config
        .validate()
        .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })?;
    Ok(config)
}

/// Reads a run config, applies `--set` overrides, resolves it and checks it.
pub fn load(path: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
    load_with(path, overrides, |_| {})
}

/// [`load`], with `flags` (a command's own flags over config keys: `--run-dir`, `--threads`)
/// applied before the config is resolved and checked, so a bad flag is refused as the key
/// would be.
pub fn load_with(
    path: &Path,
    overrides: &[String],
    flags: impl FnOnce(&mut RunConfig),
) -> Result<RunConfig, ConfigError> {
    let mut config = read(path, overrides)?;
    flags(&mut config);
    resolve(&mut config, path)?;
    check(&config, path)?;
    Ok(config)
}

/// The config as written, with `--set` overrides applied.
fn read(path: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let config: RunConfig = if overrides.is_empty() {
        // Straight from the text, so errors carry line numbers.
        deserialize_text(&text, path)?
    } else {
        let mut value: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| ConfigError::Invalid { path: path.into(), message: e.to_string() })?;
        for arg in overrides {
            apply_override(&mut value, arg)?;
        }
        serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Invalid {
            path: path.into(),
            message: format!("{}: {} (after --set overrides)", e.path(), e.inner()),
        })?
    };
    Ok(config)
}

/// The model inline, with what a model directory says of its tokenizer and preprocessing
/// (unless the config says) and what the loss needs of the model (SigLIP's bias).
fn resolve(config: &mut RunConfig, path: &Path) -> Result<(), ConfigError> {
    if let ModelRef::Name(name) = &config.model {
        // A model directory also says how its text and images are prepared, unless the
        // config does.
        if Path::new(name).is_dir() && zoo::builtin(name).is_none() {
            let dir = model_directory(Path::new(name))?;
            let data = &mut config.data;
            if data.tokenizer.is_none() {
                data.tokenizer = dir
                    .tokenizer
                    .as_ref()
                    .and_then(|t| t.tokenizer_json.as_ref())
                    .map(|p| p.display().to_string());
            }
            data.image_mean.get_or_insert(dir.preprocess.mean);
            data.image_std.get_or_insert(dir.preprocess.std);
            data.resize_mode.get_or_insert(dir.preprocess.resize_mode);
            data.interpolation.get_or_insert(dir.preprocess.interpolation);
        }
        config.model = ModelRef::Inline(resolve_model(name).map_err(|e| match e {
            // The name is the config's `model:`; say in which file.
            ConfigError::UnknownModel(_) => {
                ConfigError::Invalid { path: path.into(), message: format!("model: {e}") }
            }
            other => other,
        })?);
    }
    // What the loss needs of the model (SigLIP's bias) goes into the resolved config.
    if let ModelRef::Inline(model) = &mut config.model {
        config.loss.complete_model(model);
    }
    Ok(())
}

/// Every check of a resolved config: the sections ([`oxclip_trainer::config::validate`]) and
/// the tokenizer against the model's text tower.
fn check(config: &RunConfig, path: &Path) -> Result<(), ConfigError> {
    let invalid =
        |e: TrainError| ConfigError::Invalid { path: path.into(), message: e.to_string() };
    let model = config.model_config()?;
    oxclip_trainer::config::validate(
        &model,
        &config.data,
        &config.train,
        &config.optim,
        &config.loss,
    )
    .map_err(invalid)?;
    config.dist.validate().map_err(invalid)?;
    oxclip_trainer::prepare::data_tokenizer(&config.data, &model).map_err(invalid)?;
    Ok(())
}

impl RunConfig {
    pub fn model_config(&self) -> Result<ModelConfig, ConfigError> {
        match &self.model {
            ModelRef::Inline(m) => Ok(m.clone()),
            ModelRef::Name(name) => resolve_model(name),
        }
    }

    /// The resolved config as YAML, defaults filled in.
    pub fn to_yaml(&self) -> String {
        // ok: serialising plain structs of numbers, strings and lists cannot fail.
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

/// Deserialises YAML text, naming the key path and the line on error.
fn deserialize_text<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        // An error raised after a section was read (a conversion such as `loss:`'s) carries the
        // document's start, not the section's line: no location beats a wrong one.
        let first_key = key.split('.').next().unwrap_or_default();
        let location = inner
            .location()
            .filter(|l| {
                !(l.line() == 1 && l.column() == 1 && key != "." && !text.starts_with(first_key))
            })
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        // serde_yaml repeats the key path (or the path of the mapping holding the key) and the
        // location in its own message; keep its core.
        let mut message = inner.to_string();
        let parents: Vec<&str> =
            key.match_indices('.').map(|(i, _)| &key[..i]).chain([key.as_str()]).collect();
        if let Some(stripped) =
            parents.iter().rev().find_map(|p| message.strip_prefix(&format!("{p}: ")))
        {
            message = stripped.to_string();
        }
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        let key = if key == "." { String::new() } else { format!("{key}: ") };
        ConfigError::Invalid { path: path.into(), message: format!("{key}{message}{location}") }
    })
}

/// Applies `a.b.c=value`, the value parsed as YAML (so `1e-4`, `true`, `[0.9, 0.95]`, `null` work).
fn apply_override(root: &mut serde_yaml::Value, arg: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Override { arg: arg.to_string(), message };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected dotted.key=value".into()))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(raw).map_err(|e| err(format!("value is not YAML: {e}")))?;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("`{key}` is not a dotted key path")));
    }
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| err(format!("`{}` is not a mapping", parts[..i].join("."))))?;
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "run_dir: runs/x\nmodel: tiny\ndata:\n  train: synthetic:64\ntrain:\n  steps: 10\n";

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.yaml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn loads_defaults_and_resolves_the_model() {
        let (_d, path) = write(GOOD);
        let cfg = load(&path, &[]).expect("loads");
        assert_eq!(cfg.train.batch_size, 256);
        assert_eq!(cfg.optim.lr, 5e-4);
        assert_eq!(cfg.optim.betas, [0.9, 0.98]);
        assert!(matches!(cfg.model, ModelRef::Inline(ref m) if m.embed_dim == 64));
        // The resolved YAML loads back to the same config.
        let (_d2, again) = write(&cfg.to_yaml());
        assert_eq!(load(&again, &[]).expect("reloads"), cfg);
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let (_d, path) = write(&GOOD.replace("  steps: 10\n", "  steps: 10\n  bach_size: 4\n"));
        let msg = load(&path, &[]).expect_err("rejects").to_string();
        assert!(msg.contains("train"), "{msg}");
        assert!(msg.contains("bach_size"), "{msg}");
        assert!(msg.contains("line 7"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key_and_line() {
        let (_d, path) = write(&GOOD.replace("steps: 10", "steps: ten"));
        let msg = load(&path, &[]).expect_err("rejects").to_string();
        assert!(msg.contains("train.steps"), "{msg}");
        assert!(msg.contains("line 6"), "{msg}");
    }

    #[test]
    fn overrides_set_nested_keys_with_yaml_values() {
        let (_d, path) = write(GOOD);
        let cfg = load(
            &path,
            &[
                "train.batch_size=8".into(),
                "optim.betas=[0.9, 0.95]".into(),
                "optim.grad_clip_norm=1.0".into(),
            ],
        )
        .expect("loads");
        assert_eq!(cfg.train.batch_size, 8);
        assert_eq!(cfg.optim.betas, [0.9, 0.95]);
        assert_eq!(cfg.optim.grad_clip_norm, Some(1.0));
        let msg = load(&path, &["train.bogus=1".into()]).expect_err("rejects").to_string();
        assert!(msg.contains("train.bogus") || msg.contains("bogus"), "{msg}");
        assert!(load(&path, &["novalue".into()]).is_err());
    }

    #[test]
    fn missing_file_and_unknown_model_are_named() {
        let msg = load(Path::new("/nonexistent/run.yaml"), &[]).expect_err("rejects").to_string();
        assert!(msg.contains("/nonexistent/run.yaml"), "{msg}");
        let (_d, path) = write(&GOOD.replace("model: tiny", "model: ViT-Z-99"));
        let msg = load(&path, &[]).expect_err("rejects").to_string();
        assert!(msg.contains("ViT-Z-99"), "{msg}");
    }

    #[test]
    fn builtin_models_resolve_and_unknown_names_get_suggestions() {
        for name in zoo::names() {
            resolve_model(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let msg = resolve_model("vit-b-32").expect_err("names are exact").to_string();
        assert!(
            msg.contains("did you mean ViT-B-32") && msg.contains("oxclip model list"),
            "{msg}"
        );
        assert!(msg.lines().count() == 1 && msg.len() < 200, "{msg}");
    }

    #[test]
    fn model_files_yaml_open_clip_json_and_open_clip_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b32 = zoo::builtin("ViT-B-32").expect("built-in");
        let json_text = include_str!("../../configs/models/open_clip/ViT-B-32.json");
        let json = dir.path().join("ViT-B-32.json");
        std::fs::write(&json, json_text).expect("write");
        assert_eq!(model_from_file(&json).expect("open_clip JSON"), b32);
        assert_eq!(resolve_model(json.to_str().expect("utf-8")).expect("by path"), b32);
        let hub = dir.path().join("open_clip_config.json");
        std::fs::write(
            &hub,
            format!(
                r#"{{"model_cfg": {json_text}, "preprocess_cfg": {{"mean": [0.5, 0.5, 0.5]}}}}"#
            ),
        )
        .expect("write");
        assert_eq!(model_from_file(&hub).expect("open_clip_config.json"), b32);
        let yaml = dir.path().join("m.yaml");
        std::fs::write(&yaml, serde_yaml::to_string(&b32).expect("yaml")).expect("write");
        assert_eq!(model_from_file(&yaml).expect("YAML"), b32);

        std::fs::write(&json, json_text.replace("\"patch_size\"", "\"patch_sise\""))
            .expect("write");
        let msg = model_from_file(&json).expect_err("unknown field").to_string();
        assert!(
            msg.contains("vision_cfg")
                && msg.contains("patch_sise")
                && msg.contains("ViT-B-32.json"),
            "{msg}"
        );
        std::fs::write(
            &hub,
            r#"{"model_cfg": {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"heds": 2}}}"#,
        )
        .expect("write");
        let msg = model_from_file(&hub).expect_err("unknown field").to_string();
        assert!(msg.contains("model_cfg.text_cfg") && msg.contains("heds"), "{msg}");
    }

    #[test]
    fn siglip_gives_the_model_its_bias_and_micro_batches_are_checked() {
        let (_d, path) = write(GOOD);
        let cfg = load(&path, &["loss.kind=siglip".into()]).expect("loads");
        let model = cfg.model_config().expect("model");
        assert_eq!(model.init_logit_bias, Some(-10.0));
        assert!((model.init_logit_scale.expect("scale") - 10f64.ln()).abs() < 1e-12);
        // A model config's own values win.
        let (_d, path) = write(&GOOD.replace(
            "model: tiny",
            &format!("model:\n{}  init_logit_bias: -5.0\n", indent(&tiny_yaml())),
        ));
        let cfg = load(&path, &["loss.kind=siglip".into()]).expect("loads");
        assert_eq!(cfg.model_config().expect("model").init_logit_bias, Some(-5.0));
        // CLIP models have no bias.
        let (_d, path) = write(GOOD);
        assert_eq!(
            load(&path, &[]).expect("loads").model_config().expect("model").init_logit_bias,
            None
        );

        for (micro, message) in [
            ("0", "train.micro_batch_size must be at least 1"),
            ("300", "train.micro_batch_size (300) exceeds train.batch_size (256)"),
        ] {
            let err = load(&path, &[format!("train.micro_batch_size={micro}")])
                .expect_err("refused")
                .to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    /// A mapping under `model:` is read as the model itself, so its errors name the key path
    /// and the line (not "did not match any variant of untagged enum ModelRef").
    #[test]
    fn a_typo_inside_an_inline_model_names_its_key_and_line() {
        let inline =
            GOOD.replace("model: tiny", &format!("model:\n{}", indent(&tiny_yaml()).trim_end()));
        let (_d, path) = write(&inline);
        let cfg = load(&path, &[]).expect("the inline model loads");
        assert_eq!(cfg.model_config().expect("model"), zoo::builtin("tiny").expect("built-in"));
        for (from, to, says) in [
            ("  patch_size: 8", "  patch_sise: 8", ["model.vision_cfg", "patch_sise", "line 8"]),
            ("embed_dim: 64", "embed_dims: 64", ["model", "embed_dims", "line 3"]),
            (
                "  layers: 2\n    width: 64\n    patch",
                "  layers: two\n    width: 64\n    patch",
                ["model.vision_cfg.layers", "invalid type", "line 6"],
            ),
        ] {
            assert!(inline.contains(from), "{from}");
            let (_d, path) = write(&inline.replacen(from, to, 1));
            let msg = load(&path, &[]).expect_err("rejects").to_string();
            for needle in says {
                assert!(msg.contains(needle), "`{needle}` not in: {msg}");
            }
            assert!(!msg.contains("untagged"), "{msg}");
        }
        // Neither a name nor a mapping.
        let (_d, path) = write(&GOOD.replace("model: tiny", "model: [tiny]"));
        let msg = load(&path, &[]).expect_err("rejects").to_string();
        assert!(
            msg.contains("model")
                && msg.contains("a built-in model name")
                && msg.contains("line 2"),
            "{msg}"
        );
    }

    fn tiny_yaml() -> String {
        include_str!("../../configs/models/tiny.yaml")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn indent(text: &str) -> String {
        text.lines().map(|l| format!("  {l}\n")).collect()
    }
}
