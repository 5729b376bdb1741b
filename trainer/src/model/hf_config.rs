//! A transformers `config.json`, as the Hugging Face text encoders read it: typed keys with
//! transformers' defaults, errors naming the file and the key.

use serde_json::Value;

use super::config::Activation;
use crate::error::{Result, TrainError};

/// A transformers `config.json`, parsed, with the typed reads the encoders' configs share;
/// errors name the file and the key.
pub struct ConfigJson {
    json: Value,
    origin: String,
}

impl ConfigJson {
    pub fn new(json: Value, origin: &str) -> Self {
        ConfigJson { json, origin: origin.to_owned() }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn error(&self, message: String) -> TrainError {
        TrainError::ModelConfig(format!("{}: {message}", self.origin))
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_i64().ok_or_else(|| self.error(format!("{key} must be an integer, got {v}")))
            }
        }
    }

    pub fn positive(&self, key: &str, default: i64) -> Result<i64> {
        match self.int(key, default)? {
            v if v > 0 => Ok(v),
            v => Err(self.error(format!("{key} must be positive, got {v}"))),
        }
    }

    fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                v.as_f64().ok_or_else(|| self.error(format!("{key} must be a number, got {v}")))
            }
        }
    }

    /// A LayerNorm epsilon: positive and finite.
    pub fn eps(&self, key: &str, default: f64) -> Result<f64> {
        match self.float(key, default)? {
            v if v > 0.0 && v.is_finite() => Ok(v),
            v => Err(self.error(format!("{key} must be a positive number, got {v}"))),
        }
    }

    /// A dropout rate, in [0, 1).
    pub fn probability(&self, key: &str, default: f64) -> Result<f64> {
        match self.float(key, default)? {
            v if (0.0..1.0).contains(&v) => Ok(v),
            v => Err(self.error(format!("{key} must be in [0, 1), got {v}"))),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("{key} must be true or false, got {v}"))),
        }
    }

    /// That `heads` (under `heads_key`) divides `width` (under `width_key`).
    pub fn divides(&self, heads_key: &str, heads: i64, width_key: &str, width: i64) -> Result<()> {
        if width % heads != 0 {
            return Err(
                self.error(format!("{heads_key} {heads} does not divide {width_key} {width}"))
            );
        }
        Ok(())
    }
}

/// transformers' `ACT2FN` names oxclip builds, read from `key`.
pub fn hf_activation(json: &ConfigJson, key: &str, default: &str) -> Result<Activation> {
    match json.get(key).and_then(Value::as_str).unwrap_or(default) {
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
        "quick_gelu" => Ok(Activation::QuickGelu),
        "relu" => Ok(Activation::Relu),
        other => Err(json.error(format!(
            "{key} {other:?} is not one oxclip builds (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, relu)"
        ))),
    }
}
