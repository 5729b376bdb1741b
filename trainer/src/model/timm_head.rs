//! open_clip's `TimmModel` head: what turns a timm trunk's pooled features into the image
//! embedding, chosen by `vision_cfg.timm_proj`. Every timm tower (ViT, and the trunks to come)
//! ends in one of these; the trunk itself decides only its pooling and where its own
//! classifier lives.
//!
//! - `none`: nothing; the trunk's width must be `embed_dim`.
//! - `null` (JSON null): the trunk's own classifier, a Linear with a bias to `embed_dim`, is
//!   the projection (timm's `num_classes=embed_dim`; MobileCLIP, EVA, PE). It sits under the
//!   trunk (`visual.trunk.head.`), so locking the trunk freezes it too, as open_clip does.
//! - `linear`: `visual.head.proj` (bias under `timm_proj_bias`) after a dropout of `timm_drop`.
//! - `mlp`: timm's `Mlp(width, 2 * embed_dim, embed_dim)` under `visual.head.mlp.`: fc1 with a
//!   bias, GELU, a dropout of `timm_drop`, fc2 (bias under `timm_proj_bias`).

use tch::nn;
use tch::Tensor;

use super::config::VisionConfig;
use super::params::param;
use super::transformer::Linear;
use crate::error::{Result, TrainError};

/// `vision_cfg.timm_drop_path`, the stochastic-depth rate of a trunk's last block, or the
/// trunk's own default where the config leaves it unset (open_clip then passes nothing and
/// timm's `drop_path_rate` holds: 0, but 0.1 for Swin).
pub fn drop_path_rate(cfg: &VisionConfig, default: f64) -> Result<f64> {
    let rate = cfg.timm_drop_path.unwrap_or(default);
    if (0.0..1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(TrainError::ModelConfig(format!(
            "vision_cfg.timm_drop_path must be in [0, 1), got {rate}"
        )))
    }
}

/// The global pooling of a trunk's last feature map (ConvNeXt, Swin): timm's `avg` unless
/// `timm_pool` names `max` or `avgmax`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapPool {
    Avg,
    Max,
    AvgMax,
}

impl MapPool {
    /// open_clip's rule for `cfg.timm_pool`: `""` keeps the trunk's `avg` when open_clip resets
    /// the classifier (`linear`, `mlp`) and builds it without pooling otherwise, which leaves
    /// nothing to project.
    pub fn of(cfg: &VisionConfig) -> Result<MapPool> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let err = |m: String| Err(TrainError::ModelConfig(m));
        match (cfg.timm_pool.as_str(), TimmProj::of(cfg)?.trunk_pools()) {
            ("avg", _) | ("", false) => Ok(MapPool::Avg),
            ("max", _) => Ok(MapPool::Max),
            ("avgmax", _) => Ok(MapPool::AvgMax),
            ("", true) => err(format!(
                "vision_cfg.timm_pool \"\" with timm_proj none or null leaves {name}'s feature map unpooled; name a pooling"
            )),
            (other, _) => err(format!(
                "vision_cfg.timm_pool {other:?}: {name} pools by \"avg\", \"max\" or \"avgmax\""
            )),
        }
    }

    /// Pools `x` over its spatial `dims`.
    pub fn reduce(self, x: &Tensor, dims: [i64; 2]) -> Tensor {
        let mean = || x.mean_dim(dims.as_slice(), false, None);
        let max = || x.amax(dims.as_slice(), false);
        match self {
            MapPool::Avg => mean(),
            MapPool::Max => max(),
            MapPool::AvgMax => (max() + mean()) * 0.5,
        }
    }
}

/// `vision_cfg.timm_proj`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimmProj {
    None,
    Classifier,
    Linear,
    Mlp,
}

impl TimmProj {
    pub fn of(cfg: &VisionConfig) -> Result<TimmProj> {
        match cfg.timm_proj.as_deref() {
            None => Ok(TimmProj::Classifier),
            Some("none") => Ok(TimmProj::None),
            Some("linear") => Ok(TimmProj::Linear),
            Some("mlp") => Ok(TimmProj::Mlp),
            Some(other) => Err(TrainError::ModelConfig(format!(
                "vision_cfg.timm_proj must be \"linear\", \"mlp\", \"none\" or null (the trunk's own classifier), got {other:?}"
            ))),
        }
    }

    /// Whether open_clip builds the trunk with its pooling and classifier (`none`, `null`)
    /// rather than building it plain and resetting its classifier (`linear`, `mlp`): it
    /// decides which pooling the trunk ends with (see each trunk's pooling rule).
    pub fn trunk_pools(self) -> bool {
        matches!(self, TimmProj::None | TimmProj::Classifier)
    }
}

/// The head after the trunk's pooling.
#[derive(Debug)]
pub enum TimmHead {
    None,
    /// The trunk's classifier (no dropout: timm's `drop_rate` is 0 in open_clip's trunks).
    Classifier(Linear),
    Linear {
        weight: Tensor,
        bias: Option<Tensor>,
        drop: f64,
    },
    Mlp {
        fc1: Linear,
        fc2_weight: Tensor,
        fc2_bias: Option<Tensor>,
        drop: f64,
    },
}

impl TimmHead {
    /// The head `cfg` asks for after a trunk of `width` features, `visual` being the tower's
    /// path (`visual.`); `classifier` builds the trunk's own classifier (its path and its
    /// initialisation are the trunk's) to `embed_dim` outputs for `timm_proj: null`.
    pub fn new(
        visual: &nn::Path,
        cfg: &VisionConfig,
        width: i64,
        embed_dim: i64,
        classifier: impl FnOnce(i64) -> Linear,
    ) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        // open_clip's nn.Linear and timm's Mlp keep PyTorch's default initialisation.
        let default = Linear::default_init;
        Ok(match TimmProj::of(cfg)? {
            TimmProj::None => {
                if embed_dim != width {
                    return Err(TrainError::ModelConfig(format!(
                        "vision_cfg.timm_proj: none needs embed_dim ({embed_dim}) equal to the width of {name} ({width})"
                    )));
                }
                TimmHead::None
            }
            TimmProj::Classifier => TimmHead::Classifier(classifier(embed_dim)),
            TimmProj::Linear => {
                let p = visual / "head" / "proj";
                TimmHead::Linear {
                    weight: param(&p, "weight", &[embed_dim, width], default(width)),
                    bias: cfg
                        .timm_proj_bias
                        .then(|| param(&p, "bias", &[embed_dim], default(width))),
                    drop: cfg.timm_drop,
                }
            }
            TimmProj::Mlp => {
                let p = visual / "head" / "mlp";
                let hidden = 2 * embed_dim;
                let fc2 = &p / "fc2";
                TimmHead::Mlp {
                    fc1: Linear::new(&p / "fc1", width, hidden, default(width)),
                    fc2_weight: param(&fc2, "weight", &[embed_dim, hidden], default(hidden)),
                    fc2_bias: cfg
                        .timm_proj_bias
                        .then(|| param(&fc2, "bias", &[embed_dim], default(hidden))),
                    drop: cfg.timm_drop,
                }
            }
        })
    }

    /// pooled: (B, width) -> (B, embed_dim); `train` turns on the dropouts.
    pub fn forward(&self, pooled: &Tensor, train: bool) -> Tensor {
        match self {
            TimmHead::None => pooled.shallow_clone(),
            TimmHead::Classifier(linear) => linear.forward(pooled),
            TimmHead::Linear { weight, bias, drop } => {
                pooled.dropout(*drop, train).linear(weight, bias.as_ref())
            }
            TimmHead::Mlp { fc1, fc2_weight, fc2_bias, drop } => {
                let hidden = fc1.forward(pooled).gelu("none").dropout(*drop, train);
                hidden.linear(fc2_weight, fc2_bias.as_ref())
            }
        }
    }
}
