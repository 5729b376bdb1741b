//! `loss:`, which contrastive loss and how its similarity blocks are tiled, CoCa's captioning
//! loss beside it, and what the loss asks of the model it trains (SigLIP's bias and starting
//! temperature, CoCa's decoder).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::ModelConfig;

/// `logit_scale` of a fresh SigLIP model: ln 10 (the paper's t' = log 10) ...
pub const SIGLIP_LOGIT_SCALE_INIT: f64 = std::f64::consts::LN_10;
/// ... and its `logit_bias`: -10, so that the many negatives do not dominate the first steps.
pub const SIGLIP_LOGIT_BIAS_INIT: f64 = -10.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Symmetric cross-entropy over the scaled similarities (CLIP).
    #[default]
    Clip,
    /// Pairwise sigmoid loss with a learnable bias (SigLIP). The model gets a `logit_bias`
    /// (init -10) and its `logit_scale` starts at ln 10, unless the model config sets
    /// `init_logit_bias` / `init_logit_scale`.
    Siglip,
    /// CoCa: the CLIP loss times `coca_contrastive_loss_weight` plus the decoder's
    /// next-token cross-entropy times `coca_caption_loss_weight` (open_clip's `CoCaLoss`).
    /// For models with a `multimodal_cfg`, and only for them.
    Coca,
}

/// open_clip's `--coca-caption-loss-weight` default ...
pub const COCA_CAPTION_LOSS_WEIGHT: f64 = 2.0;
/// ... and `--coca-contrastive-loss-weight`.
pub const COCA_CONTRASTIVE_LOSS_WEIGHT: f64 = 1.0;

/// How the loss scores the (n x N) similarities of a rank's rows: tile by tile (extra memory
/// O(tile^2) per rank, whatever the batch) or all at once. See docs/large-batch.md.
/// In YAML: `auto`, `naive` or a tile side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tiling {
    /// Tiles of the loss's own choice (`loss::clip::AUTO_TILE`).
    #[default]
    Auto,
    /// Tiles of this side.
    Tile(usize),
    /// The whole n x N blocks at once: the oracle the tiled loss is tested against.
    Naive,
}

impl Tiling {
    /// The choice as the flags before `loss.tiling` wrote it: `tile_size` 0 for automatic,
    /// `naive` over either.
    pub fn from_flags(tile_size: usize, naive: bool) -> Self {
        match (naive, tile_size) {
            (true, _) => Tiling::Naive,
            (false, 0) => Tiling::Auto,
            (false, side) => Tiling::Tile(side),
        }
    }
}

impl Serialize for Tiling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Tiling::Auto => s.serialize_str("auto"),
            Tiling::Tile(side) => s.serialize_u64(*side as u64),
            Tiling::Naive => s.serialize_str("naive"),
        }
    }
}

impl<'de> Deserialize<'de> for Tiling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Tiling;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto`, `naive` or a tile side (a positive integer)")
            }
            fn visit_u64<E: serde::de::Error>(self, side: u64) -> std::result::Result<Tiling, E> {
                match side {
                    0 => Err(E::custom("a tile side must be positive (`auto` picks one)")),
                    side => Ok(Tiling::Tile(side as usize)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, side: i64) -> std::result::Result<Tiling, E> {
                match u64::try_from(side) {
                    Ok(side) => self.visit_u64(side),
                    Err(_) => Err(E::custom(format!("a tile side must be positive, got {side}"))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, word: &str) -> std::result::Result<Tiling, E> {
                match word {
                    "auto" => Ok(Tiling::Auto),
                    "naive" => Ok(Tiling::Naive),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `loss:` — the contrastive objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LossYaml")]
pub struct LossConfig {
    pub kind: LossKind,
    pub tiling: Tiling,
    /// CoCa's weight on the caption loss (default 2, open_clip's); read under `kind: coca`.
    #[serde(skip_serializing_if = "is_default_caption_weight")]
    pub coca_caption_loss_weight: f64,
    /// CoCa's weight on the contrastive loss (default 1, open_clip's).
    #[serde(skip_serializing_if = "is_default_contrastive_weight")]
    pub coca_contrastive_loss_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::default(),
            tiling: Tiling::default(),
            coca_caption_loss_weight: COCA_CAPTION_LOSS_WEIGHT,
            coca_contrastive_loss_weight: COCA_CONTRASTIVE_LOSS_WEIGHT,
        }
    }
}

fn is_default_caption_weight(w: &f64) -> bool {
    *w == COCA_CAPTION_LOSS_WEIGHT
}

fn is_default_contrastive_weight(w: &f64) -> bool {
    *w == COCA_CONTRASTIVE_LOSS_WEIGHT
}

/// `loss:` as written: `tiling`, or the two keys it replaces (`tile_size`, 0 for automatic,
/// and `naive`), which older configs and run directories hold.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LossYaml {
    #[serde(default)]
    kind: LossKind,
    #[serde(default)]
    tiling: Option<Tiling>,
    #[serde(default)]
    tile_size: Option<usize>,
    #[serde(default)]
    naive: Option<bool>,
    #[serde(default)]
    coca_caption_loss_weight: Option<f64>,
    #[serde(default)]
    coca_contrastive_loss_weight: Option<f64>,
}

impl TryFrom<LossYaml> for LossConfig {
    type Error = String;

    fn try_from(raw: LossYaml) -> std::result::Result<Self, String> {
        let tiling = match (raw.tiling, raw.tile_size, raw.naive) {
            (Some(tiling), None, None) => tiling,
            (Some(_), _, _) => {
                return Err("`tiling` replaces `tile_size` and `naive`: give `tiling` alone".into())
            }
            (None, size, naive) => Tiling::from_flags(size.unwrap_or(0), naive.unwrap_or(false)),
        };
        let (caption, contrastive) =
            (raw.coca_caption_loss_weight, raw.coca_contrastive_loss_weight);
        for (key, given) in
            [("coca_caption_loss_weight", caption), ("coca_contrastive_loss_weight", contrastive)]
        {
            let Some(weight) = given else { continue };
            if raw.kind != LossKind::Coca {
                return Err(format!("{key} is CoCa's; it needs `kind: coca`"));
            }
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(format!("{key} must be a number >= 0, got {weight}"));
            }
        }
        Ok(LossConfig {
            kind: raw.kind,
            tiling,
            coca_caption_loss_weight: caption.unwrap_or(COCA_CAPTION_LOSS_WEIGHT),
            coca_contrastive_loss_weight: contrastive.unwrap_or(COCA_CONTRASTIVE_LOSS_WEIGHT),
        })
    }
}

impl LossConfig {
    /// Fills in what the loss needs from the model and the model config leaves open: for
    /// SigLIP a `logit_bias` starting at -10 and a `logit_scale` starting at ln 10. Returns the
    /// model keys it set.
    pub fn complete_model(&self, model: &mut ModelConfig) -> Vec<&'static str> {
        let mut set = Vec::new();
        if self.kind == LossKind::Siglip {
            if model.init_logit_scale.is_none() {
                model.init_logit_scale = Some(SIGLIP_LOGIT_SCALE_INIT);
                set.push("init_logit_scale");
            }
            if model.init_logit_bias.is_none() {
                model.init_logit_bias = Some(SIGLIP_LOGIT_BIAS_INIT);
                set.push("init_logit_bias");
            }
        }
        set
    }

    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.kind == LossKind::Siglip && model.init_logit_bias.is_none() {
            return Err(TrainError::Config(
                "loss.kind siglip needs a model with a logit_bias: set model.init_logit_bias (SigLIP uses -10)".into(),
            ));
        }
        match (self.kind, model.is_coca()) {
            (LossKind::Coca, false) => Err(TrainError::Config(
                "loss.kind coca trains CoCa's captioning decoder, and this model has none \
                 (no multimodal_cfg); use kind clip or siglip"
                    .into(),
            )),
            (LossKind::Clip | LossKind::Siglip, true) => Err(TrainError::Config(format!(
                "this model is a CoCa (it has a multimodal_cfg): train it with loss.kind: coca, \
                 which scores its captioning decoder too (coca_caption_loss_weight: 0 for the \
                 contrastive loss alone), not kind {}",
                if self.kind == LossKind::Clip { "clip" } else { "siglip" }
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> std::result::Result<LossConfig, String> {
        serde_yaml::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn tiling_reads_the_new_key_and_the_two_it_replaces() {
        assert_eq!(parse("kind: clip\n").unwrap().tiling, Tiling::Auto);
        assert_eq!(parse("tiling: auto\n").unwrap().tiling, Tiling::Auto);
        assert_eq!(parse("tiling: naive\n").unwrap().tiling, Tiling::Naive);
        assert_eq!(parse("tiling: 64\n").unwrap().tiling, Tiling::Tile(64));
        assert_eq!(parse("tile_size: 0\n").unwrap().tiling, Tiling::Auto);
        assert_eq!(parse("tile_size: 64\nnaive: false\n").unwrap().tiling, Tiling::Tile(64));
        assert_eq!(parse("naive: true\n").unwrap().tiling, Tiling::Naive);
        for (bad, says) in [
            ("tiling: 0\n", "positive"),
            ("tiling: -4\n", "positive"),
            ("tiling: huge\n", "`auto`, `naive` or a tile side"),
            ("tiling: 64\nnaive: true\n", "`tiling` replaces `tile_size` and `naive`"),
            ("tile_sise: 64\n", "tile_sise"),
            ("coca_caption_loss_weight: 1\n", "needs `kind: coca`"),
            ("kind: coca\ncoca_contrastive_loss_weight: -1\n", ">= 0"),
        ] {
            let msg = parse(bad).expect_err(bad);
            assert!(msg.contains(says), "{bad}: {msg}");
        }
        // Written back as the one key.
        let cfg = LossConfig {
            kind: LossKind::Siglip,
            tiling: Tiling::Tile(128),
            ..LossConfig::default()
        };
        let yaml = serde_yaml::to_string(&cfg).unwrap();
        assert_eq!(yaml, "kind: siglip\ntiling: 128\n");
        assert_eq!(parse(&yaml).unwrap(), cfg);
        assert_eq!(
            serde_yaml::to_string(&LossConfig::default()).unwrap(),
            "kind: clip\ntiling: auto\n"
        );
        let coca = parse("kind: coca\ncoca_caption_loss_weight: 1.5\n").unwrap();
        assert_eq!(coca.coca_caption_loss_weight, 1.5);
        assert_eq!(coca.coca_contrastive_loss_weight, COCA_CONTRASTIVE_LOSS_WEIGHT);
        assert_eq!(parse(&serde_yaml::to_string(&coca).unwrap()).unwrap(), coca);
    }
}
