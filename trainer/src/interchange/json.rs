//! Reading the JSON files of model directories (`config.json`, `preprocessor_config.json`,
//! `open_clip_config.json`, the tokenizer's) with the typed keys of `crate::json_keys`, whose
//! errors name `section.key`, so every layout's translation reports what it cannot take the
//! same way.

use std::path::Path;

use serde_json::Value;

use crate::error::{io_err, Result, TrainError};
pub(super) use crate::json_keys::{Keys, Msg};

/// The error for what a file of a model directory says: its path and the message.
pub(super) fn bad(path: &Path, message: String) -> TrainError {
    TrainError::WeightsPath { path: path.into(), message }
}

/// The JSON value of the file at `path`.
pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))
}

pub(super) fn triple(k: &Keys, key: &str, default: [f32; 3]) -> Msg<[f32; 3]> {
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
