//! Reading a run config as written (ripgrep's "low args"): the YAML text, the overrides over
//! it, and serde's defaults for every key left out. Errors name the file, the key path and the
//! line, inside an inline model too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::model::ModelRef;
use super::yaml::deserialize_text;
use super::{
    ConfigError, DataConfig, DistConfig, EvalConfig, InitConfig, LossConfig, OptimConfig,
    Overrides, TrainConfig,
};

/// A run config as written, before the model is resolved; every section default comes from
/// the section's own type.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Written {
    pub run_dir: PathBuf,
    pub model: ModelRef,
    pub data: DataConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub init: Option<InitConfig>,
    #[serde(default)]
    pub dist: DistConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

/// The config as written, with `overrides` applied, and the dotted paths of the keys the file
/// and the overrides set (for [`super::show`]: every other key took its default).
pub(super) fn read(
    path: &Path,
    overrides: &Overrides,
) -> Result<(Written, BTreeSet<String>, BTreeSet<String>), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let invalid = |message: String| ConfigError::Invalid { path: path.into(), message };
    let mut written: Written = if overrides.set.is_empty() {
        // Straight from the text, so errors carry line numbers.
        deserialize_text(&text, path)?
    } else {
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        for (key, new) in &overrides.set {
            apply_override(&mut value, key, new.clone())?;
        }
        serde_path_to_error::deserialize(value)
            .map_err(|e| invalid(format!("{}: {} (after the overrides)", e.path(), e.inner())))?
    };
    let in_file = serde_yaml::from_str(&text).map(|v| key_paths(&v)).unwrap_or_default();
    let mut on_command_line: BTreeSet<String> =
        overrides.set.iter().map(|(key, _)| key.clone()).collect();
    if let Some(dir) = &overrides.run_dir {
        written.run_dir = dir.clone();
        on_command_line.insert("run_dir".into());
    }
    if let Some(threads) = overrides.threads {
        written.train.threads = Some(threads);
        on_command_line.insert("train.threads".into());
    }
    if let Some(path) = &overrides.init {
        // It replaces the checkpoint; whether its optimizer is taken stays the file's say.
        let optimizer = written.init.as_ref().is_some_and(|i| i.optimizer);
        written.init = Some(InitConfig { checkpoint: path.clone(), optimizer });
        on_command_line.insert("init.checkpoint".into());
    }
    Ok((written, in_file, on_command_line))
}

/// Every dotted key path of a YAML mapping tree, parents included (`train`, `train.steps`).
fn key_paths(value: &serde_yaml::Value) -> BTreeSet<String> {
    fn walk(value: &serde_yaml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        let Some(map) = value.as_mapping() else { return };
        for (key, child) in map {
            let Some(key) = key.as_str() else { continue };
            let path = if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") };
            walk(child, &path, out);
            out.insert(path);
        }
    }
    let mut out = BTreeSet::new();
    walk(value, "", &mut out);
    out
}

/// Splits `a.b.c=value` into the key path and the value parsed as YAML (so `1e-4`, `true`,
/// `[0.9, 0.95]`, `null` work). The error says what is wrong with the text.
pub fn parse_override(arg: &str) -> Result<(String, serde_yaml::Value), String> {
    let (key, raw) = arg.split_once('=').ok_or("expected dotted.key=value")?;
    let value = serde_yaml::from_str(raw).map_err(|e| format!("value is not YAML: {e}"))?;
    if key.split('.').any(str::is_empty) {
        return Err(format!("`{key}` is not a dotted key path"));
    }
    Ok((key.to_owned(), value))
}

/// Sets `key` (a dotted path) to `value` in the YAML tree, creating mappings on the way.
fn apply_override(
    root: &mut serde_yaml::Value,
    key: &str,
    value: serde_yaml::Value,
) -> Result<(), ConfigError> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().ok_or_else(|| ConfigError::Override {
            key: key.to_owned(),
            message: format!("`{}` is not a mapping", parts[..i].join(".")),
        })?;
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    Ok(())
}
