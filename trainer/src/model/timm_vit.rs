//! The timm `VisionTransformer` trunks open_clip's configs name, under `visual.trunk.`, with
//! open_clip's `TimmModel` head after them (`timm_head.rs`). One trunk, as timm 1.0 writes it,
//! with the options its definitions set:
//!
//! - the stem: a patch-embedding convolution (with a bias unless `pre_norm`), or MobileCLIP's
//!   MCi convolutional stem (`vit_base_mci_224`: three strided convolutions, BatchNorm and GELU
//!   between them, under `patch_embed.backbone.`), or ViTamin's MbConv stages
//!   (`timm_vitamin.rs`, under the same name);
//! - a class token or none; learned positions for every token, for the patches only
//!   (`no_embed_class`: added before the class token is prepended), or none at all
//!   (ViTamin-XL; `vit_relpos_*`, whose attention adds a bias from a small MLP over
//!   log-spaced relative coordinates, timm's `RelPosMlp`); then patch dropout
//!   (`patch_dropout.rs`) and `norm_pre` (CLIP's ln_pre) where the definition asks for it;
//! - pre-LN blocks: fused `qkv` (bias optional), timm's `Mlp` or ViTamin's `GeGluMlp`,
//!   LayerScale (`ls1`, `ls2`) where the definition sets `init_values`, stochastic depth
//!   (`drop_path.rs`) at open_clip's `timm_drop_path`;
//! - the pooling: the class token (`token`), the mean (`avg`), the maximum (`max`, `avgmax`) of
//!   the patch tokens, or timm's `AttentionPoolLatent` (`map`: one learned latent query attends
//!   over the patch tokens; SigLIP), with the final norm before the pooling or, under `fc_norm`,
//!   after it.
//!
//! Which pooling a trunk ends with is open_clip's rule: a trunk whose own classifier (or
//! nothing) projects is built with `timm_pool`; otherwise it is built with its definition's
//! pooling, which `timm_pool` then replaces unless empty (timm's `reset_classifier`), and the
//! norm stays where the definition put it.
//!
//! The trunks are the `@register_model` definitions of timm's `vision_transformer.py`,
//! `vision_transformer_hybrid.py`, `vision_transformer_relpos.py` and `vitamin.py` that
//! open_clip 3.3's configs use, in [`SIGLIP`], [`CLIP`] and [`VITAMIN`].

use tch::nn::{self, Init};
use tch::Tensor;

use super::batch_norm::{BatchNorm2d, BnSwitches};
use super::config::VisionConfig;
use super::drop_path::{self, drop_path};
use super::params::{param, torch_conv_init};
use super::patch_dropout::keep_patches;
use super::staged;
use super::timm_head::{drop_path_rate, TimmHead, TimmProj};
use super::timm_vitamin::{MbConvLayout, MbConvStages};
use super::transformer::{Activation, LayerNorm, LayerScale, Linear};
use crate::error::{Result, TrainError};

/// How a trunk turns images into patch tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stem {
    /// One `patch x patch` convolution of stride `patch`.
    Patch,
    /// MobileCLIP's MCi stem (timm's `ConvStem`): 4x4 stride 4 to width / 4, BatchNorm, GELU;
    /// 2x2 stride 2, BatchNorm, GELU; 2x2 stride 2 to the width, with a bias. 16 px per token.
    MciConv,
    /// ViTamin's convolutional stages (`timm_vitamin.rs`), 16 px per token.
    MbConv(MbConvLayout),
}

/// Where a trunk's tokens learn their positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// `pos_embed`, added in the stem.
    Learned,
    /// `RelPosMlp` of this hidden width in every block's attention (`vit_relpos_*`).
    RelPosMlp(i64),
    /// None (`pos_embed='none'`: ViTamin-XL, whose convolutional stem places the tokens).
    None,
}

/// The blocks' MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// timm's `Mlp`: fc1, activation, fc2.
    Plain,
    /// vitamin.py's `GeGluMlp`: its own LayerNorm, then act(w0 x) * w1 x, then w2.
    GeGlu,
}

/// A timm pooling over the tokens (`global_pool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// `''`: no pooling (the tokens themselves).
    None,
    Token,
    Avg,
    Max,
    AvgMax,
    /// `AttentionPoolLatent`.
    Map,
}

impl Pool {
    fn parse(s: &str) -> Option<Pool> {
        Some(match s {
            "" => Pool::None,
            "token" => Pool::Token,
            "avg" => Pool::Avg,
            "max" => Pool::Max,
            "avgmax" => Pool::AvgMax,
            "map" => Pool::Map,
            _ => return None,
        })
    }

    /// timm's `VisionTransformer` rule for `fc_norm=None`: the norm moves after a reducing pool.
    fn reduces(self) -> bool {
        matches!(self, Pool::Avg | Pool::Max | Pool::AvgMax)
    }
}

/// What open_clip's pooling rule ([`Ending::of`]) needs to know of a trunk's definition.
#[derive(Debug, Clone, Copy)]
pub struct PoolRule {
    pub name: &'static str,
    /// The definition's `global_pool`.
    pub pool: Pool,
    pub class_token: bool,
    /// Where the final norm sits for a pooling the trunk is built with: after it (`fc_norm`)
    /// or before it.
    pub fc_norm: fn(Pool) -> bool,
}

/// One timm ViT definition: what its `@register_model` function passes to the model (and the
/// input size of its pretrained config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimmArch {
    pub name: &'static str,
    /// The pretrained config's input size; open_clip's configs use the same `image_size`.
    pub img_size: i64,
    /// Pixels per token side (the MCi stem's strides multiply to 16).
    pub patch: i64,
    pub width: i64,
    pub depth: i64,
    pub heads: i64,
    /// `int(width * mlp_ratio)`: the blocks' and the MAP head's MLP width.
    pub mlp_hidden: i64,
    /// `nn.GELU` unless the definition says `act_layer='gelu_tanh'`.
    pub act: Activation,
    /// Every LayerNorm's eps: timm's 1e-6, or 1e-5 where the definition passes PyTorch's.
    pub eps: f64,
    pub stem: Stem,
    pub class_token: bool,
    /// Positions for the patch tokens only, added before the class token is prepended.
    pub no_embed_class: bool,
    /// `norm_pre` after the positions (and no bias on the patch convolution).
    pub pre_norm: bool,
    pub qkv_bias: bool,
    /// LayerScale's initial value (`init_values`), when the blocks have it.
    pub init_values: Option<f64>,
    pub mlp: MlpKind,
    /// The definition's `global_pool`.
    pub pool: Pool,
    /// The definition's `fc_norm`; `None` follows the pooling (a reducing one moves the norm
    /// after it).
    pub fc_norm: Option<bool>,
    pub positions: Positions,
}

/// timm's `LayerNorm` default.
pub const NORM_EPS: f64 = 1e-6;

impl TimmArch {
    pub fn pool_rule(&self) -> PoolRule {
        let fc_norm = match self.fc_norm {
            Some(true) => |_: Pool| true,
            Some(false) => |_: Pool| false,
            None => Pool::reduces,
        };
        PoolRule { name: self.name, pool: self.pool, class_token: self.class_token, fc_norm }
    }

    /// `RelPosMlp`'s hidden width, for a trunk with relative positions.
    pub fn rel_pos_hidden(&self) -> Option<i64> {
        match self.positions {
            Positions::RelPosMlp(hidden) => Some(hidden),
            Positions::Learned | Positions::None => None,
        }
    }
}

/// The SigLIP trunk shape every row starts from: no class token, learned positions for the
/// patches, MAP pooling, timm's eps.
const BASE: TimmArch = TimmArch {
    name: "",
    img_size: 224,
    patch: 16,
    width: 768,
    depth: 12,
    heads: 12,
    mlp_hidden: 3072,
    act: Activation::Gelu,
    eps: NORM_EPS,
    stem: Stem::Patch,
    class_token: false,
    no_embed_class: false,
    pre_norm: false,
    qkv_bias: true,
    init_values: None,
    mlp: MlpKind::Plain,
    pool: Pool::Map,
    fc_norm: None,
    positions: Positions::Learned,
};

// One SigLIP row, each argument named by its column.
#[allow(clippy::too_many_arguments)]
const fn siglip(
    name: &'static str,
    img_size: i64,
    patch: i64,
    width: i64,
    depth: i64,
    heads: i64,
    mlp_hidden: i64,
    act: Activation,
) -> TimmArch {
    TimmArch { name, img_size, patch, width, depth, heads, mlp_hidden, act, ..BASE }
}

use Activation::{Gelu, GeluTanh};

/// The SigLIP / SigLIP 2 trunks: `class_token=False, global_pool='map'` for all of them;
/// so400m's `mlp_ratio=3.7362` makes int(1152 * 3.7362) = 4304.
pub const SIGLIP: [TimmArch; 16] = [
    siglip("vit_base_patch16_siglip_224", 224, 16, 768, 12, 12, 3072, Gelu),
    siglip("vit_base_patch16_siglip_256", 256, 16, 768, 12, 12, 3072, Gelu),
    siglip("vit_base_patch16_siglip_384", 384, 16, 768, 12, 12, 3072, Gelu),
    siglip("vit_base_patch16_siglip_512", 512, 16, 768, 12, 12, 3072, Gelu),
    siglip("vit_base_patch32_siglip_256", 256, 32, 768, 12, 12, 3072, GeluTanh),
    siglip("vit_large_patch16_siglip_256", 256, 16, 1024, 24, 16, 4096, Gelu),
    siglip("vit_large_patch16_siglip_384", 384, 16, 1024, 24, 16, 4096, Gelu),
    siglip("vit_large_patch16_siglip_512", 512, 16, 1024, 24, 16, 4096, GeluTanh),
    siglip("vit_so400m_patch14_siglip_224", 224, 14, 1152, 27, 16, 4304, Gelu),
    siglip("vit_so400m_patch14_siglip_378", 378, 14, 1152, 27, 16, 4304, Gelu),
    siglip("vit_so400m_patch14_siglip_384", 384, 14, 1152, 27, 16, 4304, Gelu),
    siglip("vit_so400m_patch16_siglip_256", 256, 16, 1152, 27, 16, 4304, GeluTanh),
    siglip("vit_so400m_patch16_siglip_384", 384, 16, 1152, 27, 16, 4304, GeluTanh),
    siglip("vit_so400m_patch16_siglip_512", 512, 16, 1152, 27, 16, 4304, GeluTanh),
    siglip("vit_giantopt_patch16_siglip_256", 256, 16, 1536, 40, 16, 6144, GeluTanh),
    siglip("vit_giantopt_patch16_siglip_384", 384, 16, 1536, 40, 16, 6144, GeluTanh),
];

/// The other ViT trunks of open_clip's configs (MobileCLIP, MobileCLIP2-L, the ViT-M pair).
pub const CLIP: [TimmArch; 4] = [
    // vision_transformer_hybrid.py: ConvStem((192, 192, 768), strides (4, 2, 2)),
    // no_embed_class=True; the class token pools.
    TimmArch {
        name: "vit_base_mci_224",
        stem: Stem::MciConv,
        class_token: true,
        no_embed_class: true,
        pool: Pool::Token,
        ..BASE
    },
    // CLIP's ViT-L/14 in timm: pre_norm=True, PyTorch's LayerNorm eps.
    TimmArch {
        name: "vit_large_patch14_clip_224",
        patch: 14,
        width: 1024,
        depth: 24,
        heads: 16,
        mlp_hidden: 4096,
        eps: 1e-5,
        class_token: true,
        pre_norm: true,
        pool: Pool::Token,
        ..BASE
    },
    // class_token=False, global_pool='avg', qkv_bias=False, init_values=1e-6, fc_norm=False.
    TimmArch {
        name: "vit_medium_patch16_gap_256",
        img_size: 256,
        width: 512,
        heads: 8,
        mlp_hidden: 2048,
        qkv_bias: false,
        init_values: Some(1e-6),
        pool: Pool::Avg,
        fc_norm: Some(false),
        ..BASE
    },
    // vision_transformer_relpos.py: qkv_bias=False, fc_norm=False, rel_pos_dim=256,
    // class_token=True, global_pool='token'; the class's init_values default, 1e-6.
    TimmArch {
        name: "vit_relpos_medium_patch16_cls_224",
        width: 512,
        heads: 8,
        mlp_hidden: 2048,
        class_token: true,
        qkv_bias: false,
        init_values: Some(1e-6),
        pool: Pool::Token,
        fc_norm: Some(false),
        positions: Positions::RelPosMlp(256),
        ..BASE
    },
];

// vitamin.py: class_token=False, global_pool='avg' (so fc_norm), mlp_ratio=2 with GeGluMlp,
// the stem's widths (VitCfg); XL has pos_embed='none'.
const fn vitamin(
    name: &'static str,
    img_size: i64,
    width: i64,
    depth: i64,
    heads: i64,
    stem_width: i64,
    dims: [i64; 2],
) -> TimmArch {
    TimmArch {
        name,
        img_size,
        width,
        depth,
        heads,
        mlp_hidden: 2 * width,
        stem: Stem::MbConv(MbConvLayout { stem_width, dims, depths: [2, 4] }),
        mlp: MlpKind::GeGlu,
        pool: Pool::Avg,
        positions: if width == 1152 { Positions::None } else { Positions::Learned },
        ..BASE
    }
}

/// The ViTamin trunks (timm's vitamin.py).
pub const VITAMIN: [TimmArch; 13] = [
    vitamin("vitamin_small_224", 224, 384, 14, 6, 64, [64, 128]),
    vitamin("vitamin_base_224", 224, 768, 14, 12, 128, [128, 256]),
    vitamin("vitamin_large_224", 224, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large_256", 256, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large_336", 336, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large_384", 384, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large2_224", 224, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large2_256", 256, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large2_336", 336, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_large2_384", 384, 1024, 31, 16, 160, [160, 320]),
    vitamin("vitamin_xlarge_256", 256, 1152, 32, 16, 192, [192, 384]),
    vitamin("vitamin_xlarge_336", 336, 1152, 32, 16, 192, [192, 384]),
    vitamin("vitamin_xlarge_384", 384, 1152, 32, 16, 192, [192, 384]),
];

/// oxclip's own CPU-sized SigLIP trunk (not a timm model: open_clip cannot build it), for
/// tests and first experiments as the `tiny` model is for CLIP: small enough to commit as a
/// Hugging Face SiglipModel directory (tests/fixtures/hf_siglip_tiny;
/// make_hf_siglip_fixtures.py registers it in timm to make that fixture).
pub const TINY: TimmArch = siglip("vit_oxtiny_patch8_siglip_32", 32, 8, 32, 2, 2, 128, GeluTanh);

/// The SigLIP trunks, [`SIGLIP`] and [`TINY`]: what a Hugging Face `SiglipModel` holds.
pub fn siglip_trunks() -> Vec<TimmArch> {
    let mut all = SIGLIP.to_vec();
    all.push(TINY);
    all
}

/// The timm ViT trunks open_clip's configs name.
pub fn trunks() -> impl Iterator<Item = &'static TimmArch> {
    SIGLIP.iter().chain(&CLIP).chain(&VITAMIN)
}

/// The architecture of a timm model name, or an error listing the names oxclip builds.
pub fn architecture(name: &str) -> Result<TimmArch> {
    trunks().chain([&TINY]).find(|a| a.name == name).copied().ok_or_else(|| {
        let names: Vec<&str> = trunks().map(|a| a.name).collect();
        TrainError::ModelConfig(format!(
            "vision_cfg.timm_model_name {name:?} is not a timm ViT oxclip builds; its timm ViTs are: {}",
            names.join(", ")
        ))
    })
}

/// The pooling a built trunk applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooled {
    Token,
    Avg,
    Max,
    AvgMax,
    /// The `AttentionPoolLatent` head.
    Map,
}

/// How the trunk ends, after open_clip has built it: the pooling, and whether the final norm
/// comes before it (`norm`) or after it (`fc_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    pub pool: Pooled,
    pub fc_norm: bool,
}

impl Ending {
    /// open_clip's rule (module docs) for `cfg.timm_pool` and `timm_proj` on the trunk `a`
    /// describes.
    pub fn of(a: &PoolRule, cfg: &VisionConfig) -> Result<Ending> {
        let name = a.name;
        let err = |m: String| Err(TrainError::ModelConfig(m));
        let Some(asked) = Pool::parse(&cfg.timm_pool) else {
            return err(format!(
                "vision_cfg.timm_pool must be \"token\", \"avg\", \"max\", \"avgmax\", \"map\" or \"\" for {name}, got {:?}",
                cfg.timm_pool
            ));
        };
        let built = if TimmProj::of(cfg)?.trunk_pools() { asked } else { a.pool };
        let fc_norm = (a.fc_norm)(built);
        let pool = match (if asked == Pool::None { built } else { asked }, built) {
            (Pool::None, _) => {
                return err(format!(
                    "vision_cfg.timm_pool \"\" with timm_proj none or null leaves {name}'s tokens unpooled; name a pooling"
                ))
            }
            (Pool::Map, Pool::Map) => Pooled::Map,
            (Pool::Map, _) => {
                return err(format!(
                    "vision_cfg.timm_pool \"map\" with timm_proj linear or mlp: timm cannot add an attention pool to {name} after building it"
                ))
            }
            (Pool::Token, _) if !a.class_token => {
                return err(format!(
                    "vision_cfg.timm_pool \"token\" needs a class token, which {name} has not"
                ))
            }
            (Pool::Token, _) => Pooled::Token,
            (Pool::Avg, _) => Pooled::Avg,
            (Pool::Max, _) => Pooled::Max,
            (Pool::AvgMax, _) => Pooled::AvgMax,
        };
        Ok(Ending { pool, fc_norm })
    }

    /// The trunk's last norm and its pooling, in the order this ending puts them: (B, prefix +
    /// P, W) -> (B, W), what open_clip's head takes.
    pub fn norm_and_pool(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        prefix: i64,
        attn_pool: Option<&AttentionPoolLatent>,
        map_all: bool,
    ) -> Tensor {
        if self.fc_norm {
            norm.forward(&self.pool(x, prefix, attn_pool, map_all))
        } else {
            self.pool(&norm.forward(x), prefix, attn_pool, map_all)
        }
    }

    /// The pooling of (B, prefix + P, W) tokens after the final norm (or before `fc_norm`):
    /// the class token, a reduction over the patch tokens, or the MAP head over the patch
    /// tokens (over every token under `map_all`, as timm's `Eva`).
    pub fn pool(
        &self,
        x: &Tensor,
        prefix: i64,
        attn_pool: Option<&AttentionPoolLatent>,
        map_all: bool,
    ) -> Tensor {
        let patches = || x.narrow(1, prefix, x.size()[1] - prefix);
        match (attn_pool, self.pool) {
            (Some(attn_pool), _) if map_all => attn_pool.forward(x),
            (Some(attn_pool), _) => attn_pool.forward(&patches()),
            (None, Pooled::Token) => x.select(1, 0),
            (None, Pooled::Avg | Pooled::Map) => patches().mean_dim(1, false, None),
            (None, Pooled::Max) => patches().amax(1, false),
            (None, Pooled::AvgMax) => {
                let p = patches();
                (p.amax(1, false) + p.mean_dim(1, false, None)) * 0.5
            }
        }
    }
}

/// timm's initialisation of `nn.Linear` in a ViT (`init_weights_vit_timm`): weights
/// trunc_normal(std 0.02) truncated at +-2 (i.e. +-100 std: a plain normal), biases zero.
pub(super) fn timm_linear(p: nn::Path, in_dim: i64, out_dim: i64) -> Linear {
    Linear::with_bias_init(p, in_dim, out_dim, TIMM_WEIGHT, Init::Const(0.0))
}

pub(super) const TIMM_WEIGHT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// The dropout after `RelPosMlp`'s activation in training (timm's `drop=(0.125, 0.)`).
pub const REL_POS_DROP: f64 = 0.125;

/// timm's `RelPosMlp` in its `cr` mode: a bias per head and query-key pair, an MLP (ReLU, a
/// dropout in training) over the pair's log-spaced relative coordinates; the class
/// token's row and column are zero.
#[derive(Debug)]
pub struct RelPosMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    /// (2g-1, 2g-1, 2): sign(d) ln(1 + |d|) of each offset (non-persistent in timm).
    coords: Tensor,
    /// (g^2 * g^2,): each query-key pair's row in the flattened coordinate table.
    index: Tensor,
    heads: i64,
    prefix: i64,
}

impl RelPosMlp {
    fn new(p: nn::Path, grid: i64, hidden: i64, heads: i64, prefix: i64) -> Self {
        let side = 2 * grid - 1;
        let log = |d: i64| (d.signum() as f32) * (1.0 + d.abs() as f32).ln();
        let mut coords = Vec::with_capacity((side * side * 2) as usize);
        for dh in -(grid - 1)..grid {
            for dw in -(grid - 1)..grid {
                coords.extend([log(dh), log(dw)]);
            }
        }
        let n = grid * grid;
        let mut index = Vec::with_capacity((n * n) as usize);
        for q in 0..n {
            for k in 0..n {
                let (dh, dw) = (q / grid - k / grid, q % grid - k % grid);
                index.push((dh + grid - 1) * side + dw + grid - 1);
            }
        }
        let device = p.device();
        RelPosMlp {
            fc1: timm_linear(&p / "mlp" / "fc1", 2, hidden),
            fc2: timm_linear(&p / "mlp" / "fc2", hidden, heads),
            coords: Tensor::from_slice(&coords).view([side, side, 2]).to_device(device),
            index: Tensor::from_slice(&index).to_device(device),
            heads,
            prefix,
        }
    }

    /// (1, heads, N, N), N counting the class token.
    fn bias(&self, train: bool) -> Tensor {
        let coords = self.coords.to_kind(self.fc1.weight.kind());
        let table =
            self.fc2.forward(&self.fc1.forward(&coords).relu().dropout(REL_POS_DROP, train));
        let n = self.index.size()[0];
        let side = (n as f64).sqrt().round() as i64;
        let bias = table.view([-1, self.heads]).index_select(0, &self.index);
        let bias = bias.view([side, side, self.heads]).permute([2, 0, 1]);
        let p = self.prefix;
        bias.constant_pad_nd([p, 0, p, 0]).unsqueeze(0)
    }
}

/// timm's `Attention`: fused `qkv` (bias optional), scaled dot-product attention with the
/// relative-position bias where there is one, `proj`.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv_weight: Tensor,
    pub qkv_bias: Option<Tensor>,
    pub proj: Linear,
    pub rel_pos: Option<RelPosMlp>,
    heads: i64,
}

impl SelfAttention {
    /// x: (B, N, C) -> (B, N, C).
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let qkv = x.linear(&self.qkv_weight, self.qkv_bias.as_ref());
        let bias = self.rel_pos.as_ref().map(|r| r.bias(train));
        self.proj.forward(&fused_qkv_attention(&qkv, self.heads, bias.as_ref()))
    }
}

/// Scaled dot-product attention of timm's fused projections: qkv (B, N, 3C), laid out
/// [q | k | v] with heads contiguous in each, -> (B, N, C) before the output projection;
/// `bias` is added to the logits, broadcast over (B, heads, N, N).
pub(super) fn fused_qkv_attention(qkv: &Tensor, heads: i64, bias: Option<&Tensor>) -> Tensor {
    let size = qkv.size();
    let (b, n, c) = (size[0], size[1], size[2] / 3);
    // (B, N, 3C) -> (3, B, H, N, C/H)
    let qkv = qkv.view([b, n, 3, heads, c / heads]).permute([2, 0, 3, 1, 4]);
    let bias = bias.map(|t| t.to_kind(qkv.kind()));
    let out = Tensor::scaled_dot_product_attention(
        &qkv.get(0),
        &qkv.get(1),
        &qkv.get(2),
        bias.as_ref(),
        0.0,
        false,
        None,
        false,
    );
    out.transpose(1, 2).reshape([b, n, c])
}

/// timm's `Mlp`: fc1, activation, fc2.
#[derive(Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub(super) fn new(p: nn::Path, width: i64, hidden: i64, act: Activation) -> Self {
        Mlp {
            fc1: timm_linear(&p / "fc1", width, hidden),
            fc2: timm_linear(&p / "fc2", hidden, width),
            act,
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)))
    }
}

/// vitamin.py's `GeGluMlp`: LayerNorm (timm's eps), act(w0 x) * w1 x, w2.
#[derive(Debug)]
pub struct GeGluMlp {
    pub norm: LayerNorm,
    pub w0: Linear,
    pub w1: Linear,
    pub w2: Linear,
    act: Activation,
}

impl GeGluMlp {
    fn new(p: nn::Path, width: i64, hidden: i64, act: Activation) -> Self {
        GeGluMlp {
            norm: LayerNorm::new(&p / "norm", width, NORM_EPS),
            w0: timm_linear(&p / "w0", width, hidden),
            w1: timm_linear(&p / "w1", width, hidden),
            w2: timm_linear(&p / "w2", hidden, width),
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.norm.forward(x);
        self.w2.forward(&(self.act.forward(&self.w0.forward(&x)) * self.w1.forward(&x)))
    }
}

/// A block's MLP, as [`MlpKind`] names it.
#[derive(Debug)]
pub enum BlockMlp {
    Plain(Mlp),
    GeGlu(GeGluMlp),
}

impl BlockMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            BlockMlp::Plain(mlp) => mlp.forward(x),
            BlockMlp::GeGlu(mlp) => mlp.forward(x),
        }
    }
}

/// timm's `Block`: x + drop_path(ls1(attn(norm1(x)))), then the same with the MLP.
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: SelfAttention,
    pub ls1: Option<LayerScale>,
    pub norm2: LayerNorm,
    pub mlp: BlockMlp,
    pub ls2: Option<LayerScale>,
    drop_path: f64,
}

impl Block {
    fn new(p: nn::Path, a: &TimmArch, grid: i64, prefix: i64, drop_path: f64) -> Self {
        let w = a.width;
        let attn = &p / "attn";
        let qkv = &attn / "qkv";
        Block {
            norm1: LayerNorm::new(&p / "norm1", w, a.eps),
            attn: SelfAttention {
                qkv_weight: param(&qkv, "weight", &[3 * w, w], TIMM_WEIGHT),
                qkv_bias: a.qkv_bias.then(|| param(&qkv, "bias", &[3 * w], Init::Const(0.0))),
                proj: timm_linear(&attn / "proj", w, w),
                rel_pos: a
                    .rel_pos_hidden()
                    .map(|h| RelPosMlp::new(&attn / "rel_pos", grid, h, a.heads, prefix)),
                heads: a.heads,
            },
            ls1: a.init_values.map(|v| LayerScale::new(&p / "ls1", w, v)),
            norm2: LayerNorm::new(&p / "norm2", w, a.eps),
            mlp: match a.mlp {
                MlpKind::Plain => BlockMlp::Plain(Mlp::new(&p / "mlp", w, a.mlp_hidden, a.act)),
                MlpKind::GeGlu => {
                    BlockMlp::GeGlu(GeGluMlp::new(&p / "mlp", w, a.mlp_hidden, a.act))
                }
            },
            ls2: a.init_values.map(|v| LayerScale::new(&p / "ls2", w, v)),
            drop_path,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let branch = |y: Tensor, ls: &Option<LayerScale>| {
            let y = match ls {
                Some(ls) => ls.forward(&y),
                None => y,
            };
            drop_path(&y, self.drop_path, train)
        };
        let x = x + branch(self.attn.forward(&self.norm1.forward(x), train), &self.ls1);
        &x + branch(self.mlp.forward(&self.norm2.forward(&x)), &self.ls2)
    }
}

/// timm's `AttentionPoolLatent` with one latent query, `q` and `kv` projections (biases),
/// no q/k norm, and the output `proj`, `norm`, `mlp` (out_features = width).
#[derive(Debug)]
pub struct AttentionPoolLatent {
    /// (1, 1, width)
    pub latent: Tensor,
    pub q: Linear,
    pub kv: Linear,
    pub proj: Linear,
    pub norm: LayerNorm,
    pub mlp: Mlp,
    heads: i64,
}

impl AttentionPoolLatent {
    /// Over tokens of `width`, with `heads` heads and an MLP of `mlp_hidden` (`act`).
    pub fn new(
        p: nn::Path,
        width: i64,
        heads: i64,
        mlp_hidden: i64,
        act: Activation,
        eps: f64,
    ) -> Self {
        let w = width;
        AttentionPoolLatent {
            // timm: trunc_normal_tf_(std = latent_dim^-0.5), truncated at +-2 std; a plain
            // normal here (its spread is about 14% larger).
            latent: param(
                &p,
                "latent",
                &[1, 1, w],
                Init::Randn { mean: 0.0, stdev: (w as f64).powf(-0.5) },
            ),
            q: timm_linear(&p / "q", w, w),
            kv: timm_linear(&p / "kv", w, 2 * w),
            proj: timm_linear(&p / "proj", w, w),
            norm: LayerNorm::new(&p / "norm", w, eps),
            mlp: Mlp::new(&p / "mlp", w, mlp_hidden, act),
            heads,
        }
    }

    /// x: (B, N, C) -> (B, C).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let dh = c / self.heads;
        // (B, 1, C) -> (B, H, 1, Dh)
        let q = self
            .q
            .forward(&self.latent.expand([b, -1, -1], false))
            .view([b, 1, self.heads, dh])
            .transpose(1, 2);
        // (B, N, 2C) -> (2, B, H, N, Dh)
        let kv = self.kv.forward(x).view([b, n, 2, self.heads, dh]).permute([2, 0, 3, 1, 4]);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &kv.get(0),
            &kv.get(1),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let x = self.proj.forward(&out.transpose(1, 2).reshape([b, 1, c]));
        // The residual is around the MLP only: the attention output replaces the latent.
        let x = &x + self.mlp.forward(&self.norm.forward(&x));
        x.select(1, 0)
    }
}

/// One convolution of the MCi stem and, but for the last, its BatchNorm (then GELU).
#[derive(Debug)]
pub struct StemConv {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub bn: Option<BatchNorm2d>,
    stride: i64,
}

/// The patch embedding: timm's `PatchEmbed.proj`, or a `HybridEmbed`'s `backbone` without a
/// projection (the MCi stem, ViTamin's MbConv stages).
#[derive(Debug)]
pub enum PatchEmbed {
    Conv { weight: Tensor, bias: Option<Tensor>, patch: i64 },
    Mci { convs: Vec<StemConv>, batch_norm: BnSwitches },
    MbConv(MbConvStages),
}

impl PatchEmbed {
    fn new(p: nn::Path, a: &TimmArch) -> Self {
        match a.stem {
            Stem::Patch => {
                let pe = &p / "proj";
                let init = torch_conv_init(3 * a.patch * a.patch);
                PatchEmbed::Conv {
                    weight: param(&pe, "weight", &[a.width, 3, a.patch, a.patch], init),
                    bias: (!a.pre_norm).then(|| param(&pe, "bias", &[a.width], init)),
                    patch: a.patch,
                }
            }
            Stem::MciConv => {
                let w = a.width;
                let layers = [(3, w / 4, 4), (w / 4, w / 4, 2), (w / 4, w, 2)];
                let convs = layers
                    .iter()
                    .enumerate()
                    .map(|(i, &(inp, out, k))| {
                        let b = &p / "backbone" / i;
                        let c = &b / "conv";
                        let init = torch_conv_init(inp * k * k);
                        let last = i + 1 == layers.len();
                        StemConv {
                            weight: param(&c, "weight", &[out, inp, k, k], init),
                            bias: last.then(|| param(&c, "bias", &[out], init)),
                            bn: (!last).then(|| BatchNorm2d::new(&b / "bn", out, 1.0)),
                            stride: k,
                        }
                    })
                    .collect();
                PatchEmbed::Mci { convs, batch_norm: BnSwitches::default() }
            }
            Stem::MbConv(layout) => {
                PatchEmbed::MbConv(MbConvStages::new(&p / "backbone", &layout, a.width))
            }
        }
    }

    /// Tokens per side for `image_size` (convolutions without padding round down).
    fn grid(&self, image_size: i64) -> i64 {
        match self {
            PatchEmbed::Conv { patch, .. } => image_size / patch,
            PatchEmbed::Mci { convs, .. } => convs.iter().fold(image_size, |s, c| s / c.stride),
            PatchEmbed::MbConv(_) => MbConvStages::grid(image_size),
        }
    }

    /// (B, 3, S, S) -> (B, g*g, W).
    fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        let x = match self {
            PatchEmbed::Conv { weight, bias, patch } => {
                images.conv2d(weight, bias.as_ref(), [*patch, *patch], [0, 0], [1, 1], 1)
            }
            PatchEmbed::Mci { convs, batch_norm } => {
                let mode = batch_norm.mode(train);
                convs.iter().fold(images.shallow_clone(), |x, c| {
                    let s = [c.stride, c.stride];
                    let x = x.conv2d(&c.weight, c.bias.as_ref(), s, [0, 0], [1, 1], 1);
                    match &c.bn {
                        Some(bn) => bn.forward(&x, mode).gelu("none"),
                        None => x,
                    }
                })
            }
            PatchEmbed::MbConv(stages) => stages.forward(images),
        };
        x.flatten(2, 3).transpose(1, 2)
    }
}

/// The timm ViT trunk and open_clip's head. Variables live under `p` (`visual.`).
#[derive(Debug)]
pub struct TimmVit {
    pub arch: TimmArch,
    pub ending: Ending,
    pub patch_embed: PatchEmbed,
    /// (1, 1, width)
    pub cls_token: Option<Tensor>,
    /// (1, g*g (+ 1 with a class token that has a position), width)
    pub pos_embed: Option<Tensor>,
    pub norm_pre: Option<LayerNorm>,
    pub blocks: Vec<Block>,
    /// Before the pooling (`norm`) or after it (`fc_norm`, [`Ending::fc_norm`]).
    pub norm: LayerNorm,
    /// Built exactly when the ending pools by [`Pooled::Map`].
    pub attn_pool: Option<AttentionPoolLatent>,
    pub head: TimmHead,
    num_patches: i64,
}

impl TimmVit {
    /// The trunk named by `cfg.timm_model_name`, with positions for `cfg.image_size`: timm's
    /// default size when they agree (every open_clip config), and what open_clip's
    /// `force_image_size` (timm's `set_input_size`) gives otherwise. The grid is
    /// `image_size / patch` rounded down, as timm's `PatchEmbed` (SO400M/14 at 384: 27).
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let mut a = architecture(name)?;
        // open_clip hands timm the name alone, so its activation is the definition's; a
        // config (or a Hugging Face SigLIP checkpoint, whose v1 towers use tanh GELU where
        // timm's definitions say erf) may say otherwise through act_kwargs.
        if cfg.act_kwargs.is_some() {
            a.act = cfg.activation(false)?;
        }
        let err = |m: String| Err(TrainError::ModelConfig(m));
        let ending = Ending::of(&a.pool_rule(), cfg)?;
        if a.rel_pos_hidden().is_some() && !matches!(ending.pool, Pooled::Token | Pooled::Avg) {
            return err(format!("vision_cfg.timm_pool: {name} pools by \"token\" or \"avg\" only"));
        }
        let max_drop_path = drop_path_rate(cfg, 0.0)?;
        if cfg.image_size < a.patch {
            return err(format!(
                "vision_cfg.image_size {} is smaller than {name}'s patch ({})",
                cfg.image_size, a.patch
            ));
        }
        let t = &p / "trunk";
        let w = a.width;
        let patch_embed = PatchEmbed::new(&t / "patch_embed", &a);
        let grid = patch_embed.grid(cfg.image_size);
        let prefix = i64::from(a.class_token);
        let positions = grid * grid + if a.no_embed_class { 0 } else { prefix };
        let rates = drop_path::rates(max_drop_path, a.depth);
        let blocks = (0..a.depth)
            .map(|i| Block::new(&t / "blocks" / i, &a, grid, prefix, rates[i as usize]))
            .collect();
        let norm_path = if ending.fc_norm { "fc_norm" } else { "norm" };
        Ok(TimmVit {
            arch: a,
            ending,
            patch_embed,
            // timm: normal(std 1e-6).
            cls_token: a.class_token.then(|| {
                param(&t, "cls_token", &[1, 1, w], Init::Randn { mean: 0.0, stdev: 1e-6 })
            }),
            // timm: trunc_normal_(std=.02), truncated at +-2 (+-100 std).
            pos_embed: (a.positions == Positions::Learned)
                .then(|| param(&t, "pos_embed", &[1, positions, w], TIMM_WEIGHT)),
            norm_pre: a.pre_norm.then(|| LayerNorm::new(&t / "norm_pre", w, a.eps)),
            blocks,
            norm: LayerNorm::new(&t / norm_path, w, a.eps),
            attn_pool: (ending.pool == Pooled::Map).then(|| {
                AttentionPoolLatent::new(&t / "attn_pool", w, a.heads, a.mlp_hidden, a.act, a.eps)
            }),
            head: TimmHead::new(&p, cfg, w, embed_dim, |out| timm_linear(&t / "head", w, out))?,
            num_patches: grid * grid,
        })
    }

    /// Patch tokens per image.
    pub fn num_patches(&self) -> i64 {
        self.num_patches
    }

    /// Whether patch dropout can apply: relative positions need the whole grid.
    pub fn drops_patches(&self) -> bool {
        self.arch.rel_pos_hidden().is_none()
    }

    /// Whether training draws random numbers before the head: stochastic depth, and the
    /// relative-position MLP's dropout.
    pub fn draws_in_stages(&self) -> bool {
        self.arch.rel_pos_hidden().is_some() || self.blocks.iter().any(|b| b.drop_path > 0.0)
    }

    /// The stem's BatchNorm switches (MCi), if it has any.
    pub fn batch_norm(&self) -> Option<&BnSwitches> {
        match &self.patch_embed {
            PatchEmbed::Mci { batch_norm, .. } => Some(batch_norm),
            PatchEmbed::Conv { .. } | PatchEmbed::MbConv(_) => None,
        }
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised. `train` turns on
    /// BatchNorm's batch statistics, stochastic depth and the dropouts; `kept`: (B, keep) patch
    /// positions each image keeps (patch dropout), or `None` for all of them.
    pub fn forward(&self, images: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train, kept))
    }

    /// The stages of [`TimmVit::forward`] (model/staged.rs): the stem, each block, the head
    /// (norm, pooling, open_clip's head).
    pub fn stage_count(&self) -> usize {
        self.blocks.len() + 2
    }

    /// Stage `i` on its input: images for the first, (B, prefix + g*g, W) after it (fewer
    /// under patch dropout: the first keeps the patches `kept` lists).
    pub fn stage(&self, i: usize, x: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        if i == 0 {
            self.stem(x, train, kept)
        } else if let Some(block) = self.blocks.get(i - 1) {
            block.forward(x, train)
        } else {
            self.head(x, train)
        }
    }

    /// timm's `patch_embed`, `_pos_embed`, `patch_drop`, `norm_pre`.
    fn stem(&self, images: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        let x = self.patch_embed.forward(images, train);
        let kind = x.kind();
        let add_positions = |x: Tensor| match &self.pos_embed {
            Some(pos) => x + pos.to_kind(kind),
            None => x,
        };
        // deit-3 / MCi: positions for the patches only, then the class token; otherwise the
        // class token first and a position for it too.
        let x = if self.arch.no_embed_class { add_positions(x) } else { x };
        let x = match &self.cls_token {
            Some(cls) => {
                let b = x.size()[0];
                Tensor::cat(&[cls.to_kind(kind).expand([b, -1, -1], false), x], 1)
            }
            None => x,
        };
        let mut x = if self.arch.no_embed_class { x } else { add_positions(x) };
        if let Some(kept) = kept {
            x = keep_patches(&x, i64::from(self.arch.class_token), kept);
        }
        match &self.norm_pre {
            Some(norm) => norm.forward(&x),
            None => x,
        }
    }

    /// (B, prefix + g*g, W) -> (B, embed_dim): timm's `norm`, `forward_head` (pooling,
    /// `fc_norm`), then open_clip's head.
    fn head(&self, x: &Tensor, train: bool) -> Tensor {
        let prefix = i64::from(self.arch.class_token);
        let pooled =
            self.ending.norm_and_pool(x, &self.norm, prefix, self.attn_pool.as_ref(), false);
        self.head.forward(&pooled, train)
    }
}

/// What timm's `group_matcher` for a ViT-family trunk (`VisionTransformer`, `Eva`) sees of it.
#[derive(Debug, Clone, Copy)]
pub struct GroupLayout {
    pub class_token: bool,
    pub pos_embed: bool,
    pub norm_pre: bool,
    pub depth: i64,
    pub ending: Ending,
    /// The trunk's own classifier (`timm_proj: null`).
    pub classifier: bool,
}

/// open_clip's `TimmModel.lock` groups, as timm's `group_matcher` for a ViT and
/// `group_parameters` order them: the stem {cls_token, pos_embed, patch_embed, norm_pre},
/// each block but the last, {last block, norm} (`norm`'s ordinal is timm's MATCH_PREV_GROUP),
/// then what no pattern matches: {attn_pool, fc_norm, the trunk's classifier}, when there is
/// any. `visual.head` is in none: `TimmModel.lock` only freezes the trunk. Names relative to
/// the model root.
pub fn vit_family_groups(l: &GroupLayout) -> Vec<Vec<String>> {
    let t = "visual.trunk";
    let mut stem = Vec::new();
    if l.class_token {
        stem.push(format!("{t}.cls_token"));
    }
    if l.pos_embed {
        stem.push(format!("{t}.pos_embed"));
    }
    stem.push(format!("{t}.patch_embed"));
    if l.norm_pre {
        stem.push(format!("{t}.norm_pre"));
    }
    let mut out = vec![stem];
    out.extend((0..l.depth - 1).map(|i| vec![format!("{t}.blocks.{i}")]));
    let mut last = vec![format!("{t}.blocks.{}", l.depth - 1)];
    let mut rest = Vec::new();
    if l.ending.fc_norm {
        rest.push(format!("{t}.fc_norm"));
    } else {
        last.push(format!("{t}.norm"));
    }
    out.push(last);
    if l.ending.pool == Pooled::Map {
        rest.push(format!("{t}.attn_pool"));
    }
    if l.classifier {
        rest.push(format!("{t}.head"));
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// [`vit_family_groups`] of the `VisionTransformer` trunk `cfg` names; empty for another.
pub fn lock_groups(cfg: &VisionConfig) -> Vec<Vec<String>> {
    let Ok(a) = architecture(cfg.timm_model_name.as_deref().unwrap_or_default()) else {
        return Vec::new();
    };
    let Ok(ending) = Ending::of(&a.pool_rule(), cfg) else { return Vec::new() };
    vit_family_groups(&GroupLayout {
        class_token: a.class_token,
        pos_embed: a.positions == Positions::Learned,
        norm_pre: a.pre_norm,
        depth: a.depth,
        ending,
        classifier: TimmProj::of(cfg).is_ok_and(|p| p == TimmProj::Classifier),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::Clip;

    fn siglip(name: &str, image_size: i64, embed_dim: i64) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "embed_dim": embed_dim, "init_logit_bias": -10, "custom_text": true,
            "vision_cfg": {"image_size": image_size, "timm_model_name": name, "timm_model_pretrained": false,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1,
                         "no_causal_mask": true, "proj_bias": true, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
        }))
        .unwrap()
    }

    #[test]
    fn unknown_names_and_unbuilt_options_are_clear_errors() {
        let err =
            Clip::shapes(&siglip("vit_huge_patch14_clip_224", 224, 768)).unwrap_err().to_string();
        assert!(
            err.contains("vit_huge_patch14_clip_224")
                && err.contains("vit_giantopt_patch16_siglip_384"),
            "{err}"
        );
        let err =
            Clip::shapes(&siglip("vit_base_patch16_siglip_224", 224, 512)).unwrap_err().to_string();
        assert!(err.contains("embed_dim (512)") && err.contains("768"), "{err}");
        let mut cfg = siglip("vit_base_patch16_siglip_224", 224, 768);
        cfg.vision_cfg.timm_pool = "token".into();
        let err = Clip::shapes(&cfg).unwrap_err().to_string();
        assert!(err.contains("needs a class token"), "{err}");
        cfg.vision_cfg.timm_pool = "".into();
        let err = Clip::shapes(&cfg).unwrap_err().to_string();
        assert!(err.contains("unpooled"), "{err}");
        let mut cfg = siglip("vit_medium_patch16_gap_256", 256, 512);
        cfg.vision_cfg.timm_proj = Some("linear".into());
        let err = Clip::shapes(&cfg).unwrap_err().to_string();
        assert!(err.contains("cannot add an attention pool"), "{err}");
        cfg.vision_cfg.timm_proj = Some("conv".into());
        let err = Clip::shapes(&cfg).unwrap_err().to_string();
        assert!(err.contains("timm_proj must be"), "{err}");
    }

    /// SO400M/14 at 384 px: timm's grid rounds down (27 x 27 = 729 positions); a linear head
    /// adds `visual.head.proj`.
    #[test]
    fn positions_follow_image_size_and_linear_head_adds_a_projection() {
        let find = |shapes: &[(String, Vec<i64>)], n: &str| {
            shapes.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone())
        };
        let shapes = Clip::shapes(&siglip("vit_so400m_patch14_siglip_384", 384, 1152)).unwrap();
        assert_eq!(find(&shapes, "visual.trunk.pos_embed"), Some(vec![1, 729, 1152]));
        assert_eq!(find(&shapes, "visual.trunk.attn_pool.mlp.fc1.weight"), Some(vec![4304, 1152]));
        assert!(find(&shapes, "visual.trunk.blocks.26.attn.qkv.bias").is_some());
        let mut cfg = siglip("vit_base_patch16_siglip_224", 32, 512);
        cfg.vision_cfg.timm_proj = Some("linear".into());
        let shapes = Clip::shapes(&cfg).unwrap();
        assert_eq!(find(&shapes, "visual.trunk.pos_embed"), Some(vec![1, 4, 768]));
        assert_eq!(find(&shapes, "visual.head.proj.weight"), Some(vec![512, 768]));
        assert_eq!(find(&shapes, "visual.head.proj.bias"), None);
    }

    #[test]
    fn lock_groups_follow_timms_group_matcher() {
        let groups = lock_groups(&siglip("vit_base_patch16_siglip_224", 224, 768).vision_cfg);
        assert_eq!(groups.len(), 1 + 12 + 1);
        assert_eq!(groups[0], ["visual.trunk.pos_embed", "visual.trunk.patch_embed"]);
        assert_eq!(groups[12], ["visual.trunk.blocks.11", "visual.trunk.norm"]);
        assert_eq!(groups[13], ["visual.trunk.attn_pool"]);
        // The trunk's own classifier (timm_proj null) is unmatched, so last; a reducing pool
        // without fc_norm adds nothing after the last block.
        let mut cfg = siglip("vit_base_mci_224", 224, 512).vision_cfg;
        (cfg.timm_pool, cfg.timm_proj) = ("token".into(), None);
        let groups = lock_groups(&cfg);
        assert_eq!(groups[0][0], "visual.trunk.cls_token");
        assert_eq!(groups.last().unwrap(), &["visual.trunk.head"]);
        let mut cfg = siglip("vit_medium_patch16_gap_256", 256, 512).vision_cfg;
        (cfg.timm_pool, cfg.timm_proj) = ("".into(), Some("linear".into()));
        assert_eq!(
            lock_groups(&cfg).last().unwrap(),
            &["visual.trunk.blocks.11", "visual.trunk.norm"]
        );
    }

    /// Every trunk of the table is the one timm builds (hf_siglip_names.json, from timm).
    #[test]
    fn the_trunk_table_is_timms() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join("hf_siglip_names.json")).unwrap(),
        )
        .unwrap();
        let timm = golden["timm_trunks"].as_object().unwrap();
        assert_eq!(timm.len(), SIGLIP.len());
        for t in SIGLIP {
            let g = &timm[t.name];
            let want = (
                g["patch"].as_i64(),
                g["width"].as_i64(),
                g["depth"].as_i64(),
                g["heads"].as_i64(),
                g["mlp"].as_i64(),
                g["image"].as_i64(),
            );
            assert_eq!(
                (
                    Some(t.patch),
                    Some(t.width),
                    Some(t.depth),
                    Some(t.heads),
                    Some(t.mlp_hidden),
                    Some(t.img_size)
                ),
                want,
                "{}",
                t.name
            );
            assert_eq!(t.act == Activation::GeluTanh, g["act"] == "GELUTanh", "{}", t.name);
            assert_eq!(g["eps"], 1e-6);
        }
    }
}
