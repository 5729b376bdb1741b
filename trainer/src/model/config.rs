//! Model configs, field for field open_clip's JSON model configs (`model_configs/*.json`), so
//! `configs/models/*.yaml` read like them.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// A CLIP model: two towers projected into a shared embedding space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the shared image-text embedding space.
    pub embed_dim: i64,
    /// `x * sigmoid(1.702 x)` instead of GELU, as the OpenAI-trained weights use. Default false.
    #[serde(default)]
    pub quick_gelu: bool,
    /// Starting `logit_scale` (the log of the scale); default ln(1/0.07), or ln 10 when the
    /// run trains with `loss.kind: siglip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_scale: Option<f64>,
    /// Gives the model a learnable `logit_bias` starting here (SigLIP models: -10). Without it
    /// the model has none, as open_clip's CLIP models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_bias: Option<f64>,
    pub vision_cfg: VisionConfig,
    pub text_cfg: TextConfig,
}

/// The ViT image tower.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Input resolution in pixels (square).
    pub image_size: i64,
    /// Number of residual blocks.
    pub layers: i64,
    /// Token width.
    pub width: i64,
    /// Side of a square patch in pixels; must divide `image_size`.
    pub patch_size: i64,
    /// Width of one attention head; heads = width / head_width. Default 64.
    #[serde(default = "default_head_width")]
    pub head_width: i64,
    /// MLP hidden width as a multiple of `width`. Default 4.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

/// The causal text transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// Tokens per caption, SOT and EOT included (77 for OpenAI's tokenizer).
    pub context_length: i64,
    /// Vocabulary size (49,408 for OpenAI's CLIP BPE).
    pub vocab_size: i64,
    /// Token width.
    pub width: i64,
    /// Attention heads; must divide `width`.
    pub heads: i64,
    /// Number of residual blocks.
    pub layers: i64,
    /// MLP hidden width as a multiple of `width`. Default 4.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

fn default_head_width() -> i64 {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}

impl VisionConfig {
    pub fn heads(&self) -> i64 {
        self.width / self.head_width
    }
    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

impl ModelConfig {
    /// Checks the relations between fields that the shapes depend on.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        let positive = [
            ("embed_dim", self.embed_dim),
            ("vision_cfg.image_size", v.image_size),
            ("vision_cfg.layers", v.layers),
            ("vision_cfg.width", v.width),
            ("vision_cfg.patch_size", v.patch_size),
            ("vision_cfg.head_width", v.head_width),
            ("text_cfg.context_length", t.context_length),
            ("text_cfg.vocab_size", t.vocab_size),
            ("text_cfg.width", t.width),
            ("text_cfg.heads", t.heads),
            ("text_cfg.layers", t.layers),
        ];
        for (key, value) in positive {
            if value <= 0 {
                return Err(TrainError::ModelConfig(format!("{key} must be positive, got {value}")));
            }
        }
        let err = |m: String| Err(TrainError::ModelConfig(m));
        if v.image_size % v.patch_size != 0 {
            return err(format!(
                "vision_cfg.patch_size {} does not divide vision_cfg.image_size {}",
                v.patch_size, v.image_size
            ));
        }
        if v.width % v.head_width != 0 {
            return err(format!(
                "vision_cfg.head_width {} does not divide vision_cfg.width {}",
                v.head_width, v.width
            ));
        }
        if t.width % t.heads != 0 {
            return err(format!("text_cfg.heads {} does not divide text_cfg.width {}", t.heads, t.width));
        }
        for (key, value) in [("init_logit_scale", self.init_logit_scale), ("init_logit_bias", self.init_logit_bias)] {
            if let Some(value) = value.filter(|v| !v.is_finite()) {
                return err(format!("{key} must be a finite number, got {value}"));
            }
        }
        for (key, ratio) in [("vision_cfg.mlp_ratio", v.mlp_ratio), ("text_cfg.mlp_ratio", t.mlp_ratio)] {
            if !(ratio > 0.0 && ratio.is_finite()) {
                return err(format!("{key} must be a positive number, got {ratio}"));
            }
        }
        Ok(())
    }
}
