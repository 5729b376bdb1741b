//! Reading the JSON files of model directories (`config.json`, `preprocessor_config.json`,
//! `open_clip_config.json`, the tokenizer's): typed keys whose errors name `section.key`, so
//! every layout's translation reports what it cannot take the same way.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{io_err, Result, TrainError};

/// The error for what a file of a model directory says: its path and the message.
pub(super) fn bad(path: &Path, message: String) -> TrainError {
    TrainError::WeightsPath { path: path.into(), message }
}

/// The JSON value of the file at `path`.
pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))
}

/// Reads typed keys of one JSON object, naming `section.key` in every error. An absent key or
/// `null` takes transformers' default.
pub(super) struct Keys<'a> {
    obj: Option<&'a Map<String, Value>>,
    section: &'a str,
}

/// What a translation returns: the value, or the message for [`bad`] to give its file.
pub(super) type Msg<T> = std::result::Result<T, String>;

impl<'a> Keys<'a> {
    pub(super) fn new(value: Option<&'a Value>, section: &'a str) -> Self {
        Keys { obj: value.and_then(Value::as_object), section }
    }
    pub(super) fn name(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.section)
        }
    }
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| o.get(key)).filter(|v| !v.is_null())
    }
    pub(super) fn int(&self, key: &str, default: i64) -> Msg<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_i64().ok_or_else(|| format!("{} must be an integer, got {v}", self.name(key)))
            }
        }
    }
    pub(super) fn float(&self, key: &str, default: f64) -> Msg<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| format!("{} must be a number, got {v}", self.name(key)))
            }
        }
    }
    pub(super) fn string(&self, key: &str, default: &str) -> Msg<String> {
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(v) => v
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{} must be a string, got {v}", self.name(key))),
        }
    }
    pub(super) fn boolean(&self, key: &str, default: bool) -> Msg<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{} must be true or false, got {v}", self.name(key))),
        }
    }
    /// An image side: a number, or `[h, w]` / `{"height", "width"}` with h == w.
    pub(super) fn side(&self, key: &str, default: i64) -> Msg<i64> {
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
