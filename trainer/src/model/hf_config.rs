//! A transformers `config.json`, as the Hugging Face text encoders read it: the typed keys of
//! `crate::json_keys` with transformers' defaults, the checks the encoders' sizes share, and
//! errors naming the file and the key.

use serde_json::Value;

use super::config::Activation;
use crate::error::{Result, TrainError};
use crate::json_keys::{Keys, Msg};

/// A transformers `config.json`, parsed; `origin` (its path, or the built-in name) starts
/// every error.
pub struct ConfigJson {
    json: Value,
    origin: String,
}

impl ConfigJson {
    pub fn new(json: Value, origin: &str) -> Self {
        ConfigJson { json, origin: origin.to_owned() }
    }

    fn keys(&self) -> Keys<'_> {
        Keys::new(Some(&self.json), "")
    }

    /// A read's value, or its message as an error naming the file.
    fn named<T>(&self, read: Msg<T>) -> Result<T> {
        read.map_err(|message| self.error(message))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys().get(key)
    }

    pub fn error(&self, message: String) -> TrainError {
        TrainError::ModelConfig(format!("{}: {message}", self.origin))
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64> {
        self.named(self.keys().int(key, default))
    }

    pub fn positive(&self, key: &str, default: i64) -> Result<i64> {
        match self.int(key, default)? {
            v if v > 0 => Ok(v),
            v => Err(self.error(format!("{key} must be positive, got {v}"))),
        }
    }

    /// A LayerNorm epsilon: positive and finite.
    pub fn eps(&self, key: &str, default: f64) -> Result<f64> {
        match self.named(self.keys().float(key, default))? {
            v if v > 0.0 && v.is_finite() => Ok(v),
            v => Err(self.error(format!("{key} must be a positive number, got {v}"))),
        }
    }

    /// A dropout rate, in [0, 1).
    pub fn probability(&self, key: &str, default: f64) -> Result<f64> {
        match self.named(self.keys().float(key, default))? {
            v if (0.0..1.0).contains(&v) => Ok(v),
            v => Err(self.error(format!("{key} must be in [0, 1), got {v}"))),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        self.named(self.keys().boolean(key, default))
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

    /// The activation transformers' `ACT2FN` names under `key` (`default` when absent).
    pub fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.get(key).and_then(Value::as_str).unwrap_or(default);
        activation(name).ok_or_else(|| {
            self.error(format!(
                "{key} {name:?} is not one oxclip builds (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, relu)"
            ))
        })
    }
}

/// transformers' `ACT2FN` names oxclip builds.
pub fn activation(name: &str) -> Option<Activation> {
    match name {
        "gelu" => Some(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
        "quick_gelu" => Some(Activation::QuickGelu),
        "relu" => Some(Activation::Relu),
        _ => None,
    }
}
