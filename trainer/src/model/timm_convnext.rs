//! The timm `ConvNeXt` trunks open_clip's `convnext_*` configs name (timm 1.0's `convnext.py`,
//! Liu et al. 2022), under `visual.trunk.`, with open_clip's `TimmModel` head after them
//! (`timm_head.rs`):
//!
//! - `stem`: a 4x4 convolution of stride 4 and a channels-first LayerNorm;
//! - four stages; each after the first starts with `downsample`, a LayerNorm and a 2x2
//!   convolution of stride 2 to the stage's width;
//! - a block: a 7x7 depthwise convolution, then, channels last, a LayerNorm and an MLP (fc1,
//!   GELU, fc2) of 4 x the width, LayerScale (`gamma`), stochastic depth, the shortcut;
//! - timm's `NormMlpClassifierHead`: a global pooling of the last feature map, a LayerNorm
//!   (`head.norm`), and, when the trunk's classifier projects (`timm_proj: null`), `head.fc`.
//!
//! Every LayerNorm has timm's eps 1e-6, but `convnext_xxlarge`'s, 1e-5. There are no patch
//! tokens, so no patch dropout (`model::patchless_tower`).

use tch::nn::{self, Init};
use tch::Tensor;

use super::config::VisionConfig;
use super::drop_path::{self, drop_path};
use super::params::param;
use super::staged;
use super::timm_head::{drop_path_rate, MapPool, TimmHead};
use super::transformer::{LayerNorm, LayerScale, Linear};
use crate::error::{Result, TrainError};

/// One timm ConvNeXt definition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvNextArch {
    pub name: &'static str,
    pub depths: [i64; 4],
    pub dims: [i64; 4],
    pub eps: f64,
}

/// The ConvNeXt trunks of open_clip 3.3's configs (`depths`, `dims`, `norm_eps`).
pub const ARCHITECTURES: [ConvNextArch; 6] = [
    ConvNextArch {
        name: "convnext_tiny",
        depths: [3, 3, 9, 3],
        dims: [96, 192, 384, 768],
        eps: 1e-6,
    },
    ConvNextArch {
        name: "convnext_small",
        depths: [3, 3, 27, 3],
        dims: [96, 192, 384, 768],
        eps: 1e-6,
    },
    ConvNextArch {
        name: "convnext_base",
        depths: [3, 3, 27, 3],
        dims: [128, 256, 512, 1024],
        eps: 1e-6,
    },
    ConvNextArch {
        name: "convnext_large",
        depths: [3, 3, 27, 3],
        dims: [192, 384, 768, 1536],
        eps: 1e-6,
    },
    ConvNextArch {
        name: "convnext_xlarge",
        depths: [3, 3, 27, 3],
        dims: [256, 512, 1024, 2048],
        eps: 1e-6,
    },
    ConvNextArch {
        name: "convnext_xxlarge",
        depths: [3, 4, 30, 3],
        dims: [384, 768, 1536, 3072],
        eps: 1e-5,
    },
];

/// The architecture of a ConvNeXt timm name, if it is one.
pub fn architecture(name: &str) -> Option<ConvNextArch> {
    ARCHITECTURES.iter().find(|a| a.name == name).copied()
}

/// The definitions' LayerScale start (`ls_init_value`).
const LS_INIT: f64 = 1e-6;
/// The stem's patch and the depthwise kernel.
const STEM_PATCH: i64 = 4;
const KERNEL: i64 = 7;

/// timm's initialisation of every convolution and linear here: trunc_normal(0.02) (truncated
/// at +-2, i.e. +-100 std: a plain normal), zero biases.
const WEIGHT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

fn conv_weight(p: &nn::Path, out: i64, inp: i64, k: i64) -> Tensor {
    param(p, "weight", &[out, inp, k, k], WEIGHT)
}

/// timm's `ConvNeXtBlock` (channels-last MLP).
#[derive(Debug)]
pub struct Block {
    pub conv_dw_weight: Tensor,
    pub conv_dw_bias: Tensor,
    pub norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub gamma: LayerScale,
    drop_path: f64,
}

impl Block {
    fn new(p: nn::Path, dim: i64, eps: f64, drop_path: f64) -> Self {
        let dw = &p / "conv_dw";
        let zero = Init::Const(0.0);
        Block {
            conv_dw_weight: conv_weight(&dw, dim, 1, KERNEL),
            conv_dw_bias: param(&dw, "bias", &[dim], zero),
            norm: LayerNorm::new(&p / "norm", dim, eps),
            fc1: Linear::with_bias_init(&p / "mlp" / "fc1", dim, 4 * dim, WEIGHT, zero),
            fc2: Linear::with_bias_init(&p / "mlp" / "fc2", 4 * dim, dim, WEIGHT, zero),
            gamma: LayerScale::new(p, dim, LS_INIT),
            drop_path,
        }
    }

    /// (B, C, H, W) -> the same.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let c = self.conv_dw_bias.size()[0];
        let pad = KERNEL / 2;
        let y =
            x.conv2d(&self.conv_dw_weight, Some(&self.conv_dw_bias), [1, 1], [pad, pad], [1, 1], c);
        let y = self.norm.forward(&y.permute([0, 2, 3, 1]));
        let y = self.fc2.forward(&self.fc1.forward(&y).gelu("none"));
        // LayerScale channels last, then back to channels first (timm scales after the permute;
        // the product is the same).
        let y = self.gamma.forward(&y).permute([0, 3, 1, 2]);
        drop_path(&y, self.drop_path, train) + x
    }
}

/// The LayerNorm and 2x2 stride-2 convolution that start each stage after the first.
#[derive(Debug)]
pub struct Downsample {
    pub norm: LayerNorm,
    pub conv_weight: Tensor,
    pub conv_bias: Tensor,
}

/// The ConvNeXt trunk and open_clip's head. Variables live under `p` (`visual.`).
#[derive(Debug)]
pub struct TimmConvNext {
    pub arch: ConvNextArch,
    pub stem_weight: Tensor,
    pub stem_bias: Tensor,
    pub stem_norm: LayerNorm,
    /// Per stage: its downsample (none for the first) and its blocks.
    pub stages: Vec<(Option<Downsample>, Vec<Block>)>,
    pub pool: MapPool,
    /// `head.norm`, after the pooling.
    pub head_norm: LayerNorm,
    pub head: TimmHead,
}

impl TimmConvNext {
    /// The trunk `cfg.timm_model_name` names, pooled as [`MapPool::of`] says.
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let a = architecture(name).ok_or_else(|| {
            TrainError::ModelConfig(format!(
                "vision_cfg.timm_model_name {name:?} is not a ConvNeXt oxclip builds"
            ))
        })?;
        let pool = MapPool::of(cfg)?;
        let max_drop_path = drop_path_rate(cfg, 0.0)?;
        if cfg.image_size < 32 {
            return Err(TrainError::ModelConfig(format!(
                "vision_cfg.image_size {} is smaller than {name}'s stride (32)",
                cfg.image_size
            )));
        }
        let t = &p / "trunk";
        let zero = Init::Const(0.0);
        let stem = &t / "stem";
        let rates = drop_path::rates(max_drop_path, a.depths.iter().sum());
        let mut rate = rates.iter();
        let mut prev = a.dims[0];
        let stages = (0..4)
            .map(|s| {
                let sp = &t / "stages" / s;
                let dim = a.dims[s];
                let downsample = (s > 0).then(|| {
                    let d = &sp / "downsample";
                    let conv = &d / 1;
                    Downsample {
                        norm: LayerNorm::new(&d / 0, prev, a.eps),
                        conv_weight: conv_weight(&conv, dim, prev, 2),
                        conv_bias: param(&conv, "bias", &[dim], zero),
                    }
                });
                prev = dim;
                let blocks = (0..a.depths[s])
                    .map(|b| {
                        let r = rate.next().copied().unwrap_or(0.0);
                        Block::new(&sp / "blocks" / b, dim, a.eps, r)
                    })
                    .collect();
                (downsample, blocks)
            })
            .collect();
        let width = a.dims[3];
        let head = &t / "head";
        Ok(TimmConvNext {
            arch: a,
            stem_weight: conv_weight(&(&stem / 0), a.dims[0], 3, STEM_PATCH),
            stem_bias: param(&(&stem / 0), "bias", &[a.dims[0]], zero),
            stem_norm: LayerNorm::new(&stem / 1, a.dims[0], a.eps),
            stages,
            pool,
            head_norm: LayerNorm::new(&head / "norm", width, a.eps),
            head: TimmHead::new(&p, cfg, width, embed_dim, |out| {
                Linear::with_bias_init(&head / "fc", width, out, WEIGHT, zero)
            })?,
        })
    }

    /// Whether training draws random numbers before the head (stochastic depth).
    pub fn draws_in_stages(&self) -> bool {
        self.blocks().any(|b| b.drop_path > 0.0)
    }

    fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.stages.iter().flat_map(|(_, blocks)| blocks)
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train))
    }

    /// The stem, each block (a stage's downsample runs with its first block, as timm's
    /// groups have it), the head (model/staged.rs).
    pub fn stage_count(&self) -> usize {
        self.blocks().count() + 2
    }

    /// Stage `i` on its input: images for the stem, feature maps after it.
    pub fn stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        if i == 0 {
            let x = x.conv2d(
                &self.stem_weight,
                Some(&self.stem_bias),
                [STEM_PATCH, STEM_PATCH],
                [0, 0],
                [1, 1],
                1,
            );
            return self.stem_norm.forward_2d(&x);
        }
        if let Some((downsample, block)) = staged::nth_block(&self.stages, i - 1) {
            let x = match downsample {
                Some(d) => {
                    let x = d.norm.forward_2d(x);
                    x.conv2d(&d.conv_weight, Some(&d.conv_bias), [2, 2], [0, 0], [1, 1], 1)
                }
                None => x.shallow_clone(),
            };
            return block.forward(&x, train);
        }
        self.head(x, train)
    }

    /// timm's `NormMlpClassifierHead` (pool, `head.norm`), then open_clip's head.
    fn head(&self, x: &Tensor, train: bool) -> Tensor {
        let pooled = self.pool.reduce(x, [2, 3]);
        self.head.forward(&self.head_norm.forward(&pooled), train)
    }
}

/// open_clip's `TimmModel.lock` groups for the ConvNeXt `cfg` names, as timm's `group_matcher`
/// and `group_parameters` order them: {stem}, then each block, a stage's downsample with its
/// first block, then the unmatched {head} (the norm, and the classifier when it projects).
/// Empty for another trunk.
pub fn lock_groups(cfg: &VisionConfig) -> Vec<Vec<String>> {
    let Some(a) = architecture(cfg.timm_model_name.as_deref().unwrap_or_default()) else {
        return Vec::new();
    };
    let t = "visual.trunk";
    let mut out = vec![vec![format!("{t}.stem")]];
    let downsample = |s: usize| if s > 0 { vec!["downsample"] } else { vec![] };
    out.extend(staged::per_block_groups(&format!("{t}.stages"), &a.depths, downsample));
    out.push(vec![format!("{t}.head")]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::Clip;

    fn convnext(extra: serde_json::Value) -> ModelConfig {
        let mut vision = serde_json::json!(
            {"image_size": 64, "timm_model_name": "convnext_tiny", "timm_pool": "", "timm_proj": "linear"}
        );
        if let (Some(v), Some(e)) = (vision.as_object_mut(), extra.as_object()) {
            v.extend(e.clone());
        }
        serde_json::from_value(serde_json::json!({
            "embed_dim": 32, "vision_cfg": vision,
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
        }))
        .unwrap()
    }

    #[test]
    fn pools_and_heads_follow_open_clips_rule_and_the_rest_is_refused() {
        let find = |cfg: &ModelConfig, n: &str| {
            Clip::shapes(cfg).unwrap().into_iter().find(|(k, _)| k == n).map(|(_, s)| s)
        };
        let cfg = convnext(serde_json::json!({}));
        assert_eq!(find(&cfg, "visual.head.proj.weight"), Some(vec![32, 768]));
        assert_eq!(find(&cfg, "visual.trunk.head.fc.weight"), None);
        let cfg = convnext(serde_json::json!({"timm_pool": "max", "timm_proj": null}));
        assert_eq!(find(&cfg, "visual.trunk.head.fc.weight"), Some(vec![32, 768]));
        for (extra, needle) in [
            (serde_json::json!({"timm_pool": "token"}), "pools by"),
            (serde_json::json!({"timm_proj": null}), "unpooled"),
            (serde_json::json!({"patch_dropout": 0.5}), "ConvNeXt image tower cannot drop"),
            (serde_json::json!({"image_size": 16}), "stride"),
        ] {
            let err = Clip::shapes(&convnext(extra.clone())).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
    }

    /// A stage per block (the downsample rides with its stage's first), the stem and the head.
    #[test]
    fn stages_are_the_blocks_and_the_lock_groups_match() {
        let cfg = convnext(serde_json::json!({}));
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).unwrap();
        assert_eq!(model.visual.stage_count(), 3 + 3 + 9 + 3 + 2);
        let groups = lock_groups(&cfg.vision_cfg);
        assert_eq!(groups.len(), model.visual.stage_count());
        assert_eq!(
            groups[4],
            ["visual.trunk.stages.1.blocks.0", "visual.trunk.stages.1.downsample"]
        );
        let images = Tensor::zeros([1, 3, 64, 64], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(model.encode_image(&images).size(), [1, 32]);
    }
}
