//! ViTamin's convolutional stem: timm's `MbConvStages` (vitamin.py), which a ViTamin trunk
//! runs as its `HybridEmbed` backbone (`visual.trunk.patch_embed.backbone.`, no projection
//! after it) before plain ViT blocks with a GeGLU MLP (`timm_vit.rs`).
//!
//! Each `/2` is a 3x3 stride-2 operation with padding 1, so the token grid is the image side
//! halved four times, rounding up (224 px -> 14):
//!
//! - `stem`: conv 3x3 /2, LayerNorm2d + GELU, conv 3x3;
//! - two stages of `MbConvLNBlock`s, the first of each /2: a pre-norm inverted bottleneck
//!   (LayerNorm2d, 1x1 expand x4, GELU, depthwise 3x3, GELU, 1x1) plus a shortcut, which in
//!   the first block is a 3x3 average pool /2 (padding excluded) and, where the width
//!   changes, a 1x1 convolution;
//! - `pool`: LayerNorm2d, then a 3x3 /2 convolution to the trunk's width.
//!
//! The blocks have no stochastic depth: timm's definitions give them none.

use tch::nn::{self, Init};
use tch::Tensor;

use super::conv::Conv2d;
use super::params::torch_conv_init;
use super::transformer::LayerNorm;

/// The widths and depths of one ViTamin size (timm's `VitCfg`); the trunk's width follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbConvLayout {
    pub stem_width: i64,
    /// The two convolutional stages' widths.
    pub dims: [i64; 2],
    pub depths: [i64; 2],
}

/// timm's LayerNorm2d eps in these layers.
const EPS: f64 = 1e-6;
/// `MbConvLNBlock`'s `expand_ratio`.
const EXPAND: i64 = 4;

/// vitamin.py's `_init_conv`: normal(0, sqrt(2 / fan_out)), fan_out = k * k * out / groups;
/// zero bias.
fn fan_out_init(out: i64, k: i64, groups: i64) -> Init {
    Init::Randn { mean: 0.0, stdev: (2.0 / (k * k * out / groups) as f64).sqrt() }
}

/// A convolution of vitamin.py's (`fan_out`) or PyTorch's default initialisation (the `pool`
/// convolution, which no init of timm's reaches).
fn conv(
    p: nn::Path,
    inp: i64,
    out: i64,
    k: i64,
    stride: i64,
    groups: i64,
    fan_out: bool,
) -> Conv2d {
    let (weight, bias) = if fan_out {
        (fan_out_init(out, k, groups), Init::Const(0.0))
    } else {
        let init = torch_conv_init(inp / groups * k * k);
        (init, init)
    };
    Conv2d::new(&p, (inp, out, k), stride, groups, weight, bias)
}

/// `MbConvLNBlock`, stride 2 (the first of a stage, with the pooled shortcut) or 1.
#[derive(Debug)]
pub struct MbConvBlock {
    /// The 1x1 `shortcut.expand` after the pool, where the block changes the width.
    pub expand: Option<Conv2d>,
    pub pre_norm: LayerNorm,
    pub conv1_1x1: Conv2d,
    pub conv2_kxk: Conv2d,
    pub conv3_1x1: Conv2d,
    downsample: bool,
}

impl MbConvBlock {
    fn new(p: nn::Path, inp: i64, out: i64, downsample: bool) -> Self {
        // timm's make_divisible(out * 4, 8): already a multiple of 8 for every ViTamin width.
        let mid = out * EXPAND;
        let stride = if downsample { 2 } else { 1 };
        MbConvBlock {
            expand: (downsample && inp != out)
                .then(|| conv(&p / "shortcut" / "expand", inp, out, 1, 1, 1, true)),
            pre_norm: LayerNorm::new(&p / "pre_norm", inp, EPS),
            conv1_1x1: conv(&p / "conv1_1x1", inp, mid, 1, 1, 1, true),
            conv2_kxk: conv(&p / "conv2_kxk", mid, mid, 3, stride, mid, true),
            conv3_1x1: conv(&p / "conv3_1x1", mid, out, 1, 1, 1, true),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let shortcut = if self.downsample {
            let pooled = x.avg_pool2d([3, 3], [2, 2], [1, 1], false, false, None::<i64>);
            match &self.expand {
                Some(conv) => conv.forward(&pooled),
                None => pooled,
            }
        } else {
            x.shallow_clone()
        };
        let y = self.conv1_1x1.forward(&self.pre_norm.forward_2d(x)).gelu("none");
        let y = self.conv2_kxk.forward(&y).gelu("none");
        self.conv3_1x1.forward(&y) + shortcut
    }
}

/// timm's `MbConvStages`: (B, 3, S, S) -> (B, width, g, g).
#[derive(Debug)]
pub struct MbConvStages {
    pub stem_conv1: Conv2d,
    pub stem_norm1: LayerNorm,
    pub stem_conv2: Conv2d,
    pub stages: Vec<Vec<MbConvBlock>>,
    pub pool_norm: LayerNorm,
    pub pool_proj: Conv2d,
}

impl MbConvStages {
    /// Under `p` (`patch_embed.backbone`), ending at the trunk's `width`.
    pub fn new(p: nn::Path, l: &MbConvLayout, width: i64) -> Self {
        let stem = &p / "stem";
        let s = l.stem_width;
        let mut inp = s;
        let stages = (0..2)
            .map(|i| {
                let (dim, depth) = (l.dims[i], l.depths[i]);
                (0..depth)
                    .map(|d| {
                        let b = MbConvBlock::new(&p / "stages" / i / d, inp, dim, d == 0);
                        inp = dim;
                        b
                    })
                    .collect()
            })
            .collect();
        let pool = &p / "pool";
        MbConvStages {
            stem_conv1: conv(&stem / "conv1", 3, s, 3, 2, 1, true),
            stem_norm1: LayerNorm::new(&stem / "norm1", s, EPS),
            stem_conv2: conv(&stem / "conv2", s, s, 3, 1, 1, true),
            stages,
            pool_norm: LayerNorm::new(&pool / "norm", l.dims[1], EPS),
            pool_proj: conv(&pool / "proj", l.dims[1], width, 3, 2, 1, false),
        }
    }

    /// Tokens per side for `image_size`: four halvings, each rounding up.
    pub fn grid(image_size: i64) -> i64 {
        (0..4).fold(image_size, |s, _| (s + 1) / 2)
    }

    pub fn forward(&self, images: &Tensor) -> Tensor {
        let x = self.stem_conv1.forward(images);
        let x = self.stem_conv2.forward(&self.stem_norm1.forward_2d(&x).gelu("none"));
        let x = self.stages.iter().flatten().fold(x, |x, b| b.forward(&x));
        self.pool_proj.forward(&self.pool_norm.forward_2d(&x))
    }
}
