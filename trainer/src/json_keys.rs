//! Typed keys of a JSON object (a transformers `config.json`, a `preprocessor_config.json`,
//! an `open_clip_config.json`): an absent key or `null` takes the caller's default (the
//! library's), and a value of the wrong type is a message naming `section.key`. Below both
//! `model` (a Hugging Face text tower's `config.json`) and `interchange` (every layout's files).

use serde_json::{Map, Value};

/// Reads typed keys of one JSON object, naming `section.key` in every error. An absent key or
/// `null` takes transformers' default.
pub(crate) struct Keys<'a> {
    obj: Option<&'a Map<String, Value>>,
    section: &'a str,
}

/// What a read returns: the value, or the message for the caller to give its file.
pub(crate) type Msg<T> = std::result::Result<T, String>;

impl<'a> Keys<'a> {
    pub(crate) fn new(value: Option<&'a Value>, section: &'a str) -> Self {
        Keys { obj: value.and_then(Value::as_object), section }
    }
    pub(crate) fn name(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.section)
        }
    }
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.and_then(|o| o.get(key)).filter(|v| !v.is_null())
    }
    pub(crate) fn int(&self, key: &str, default: i64) -> Msg<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_i64().ok_or_else(|| format!("{} must be an integer, got {v}", self.name(key)))
            }
        }
    }
    pub(crate) fn float(&self, key: &str, default: f64) -> Msg<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| format!("{} must be a number, got {v}", self.name(key)))
            }
        }
    }
    pub(crate) fn string(&self, key: &str, default: &str) -> Msg<String> {
        match self.get(key) {
            None => Ok(default.to_owned()),
            Some(v) => v
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("{} must be a string, got {v}", self.name(key))),
        }
    }
    pub(crate) fn boolean(&self, key: &str, default: bool) -> Msg<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{} must be true or false, got {v}", self.name(key))),
        }
    }
    /// An image side: a number, or `[h, w]` / `{"height", "width"}` with h == w.
    pub(crate) fn side(&self, key: &str, default: i64) -> Msg<i64> {
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
