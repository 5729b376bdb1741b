//! The timm `Eva` trunks open_clip's configs name (timm 1.0's `eva.py`), under `visual.trunk.`,
//! with open_clip's `TimmModel` head after them (`timm_head.rs`):
//!
//! - EVA01 (`eva_giant_patch14_224`): a ViT whose fused `qkv` has no bias of its own; the
//!   query and value biases are parameters apart (`q_bias`, `v_bias`), the key's is zero;
//! - EVA02 (`eva02_*_clip_*`): separate `q_proj` (bias), `k_proj` (none), `v_proj` (bias), a
//!   LayerNorm on the attention's output before `proj` (sub-LN), a SwiGLU MLP with a LayerNorm
//!   before `fc2`, and rotary position embeddings on top of the learned ones; the enormous one
//!   has EVA01's attention and post-norm blocks (`x + norm(attn(x))`);
//! - Meta's Perception Encoder (`vit_pe_core_*`, timm's `AttentionRope`): a fused `qkv` with a
//!   bias, rotary embeddings on an xy grid, a LayerNorm before the blocks (and none on the patch
//!   convolution's bias), and the MAP head (`AttentionPoolLatent`) over every token, the class
//!   token included.
//!
//! Rotary embeddings (timm's `RotaryEmbeddingCat`, language-style bands): each head's dimensions
//! come in pairs, the first half of the pairs turning with the token's first grid coordinate,
//! the second half with the other, at frequencies 1 / 10000^(k / (head_dim / 4)); coordinates
//! are the patch's row and column (+ an offset), rescaled to the pretraining grid
//! (`ref_feat_shape`: EVA02-B/16 was pretrained on a 16 x 16 grid, so its 14 x 14 positions are
//! scaled by 16/14). The class token is not rotated. The table is built once per grid, as
//! timm caches it.
//!
//! Pooling, norms, locking and the head follow the shared rules of `timm_vit.rs` ([`Ending`],
//! [`vit_family_groups`]), with `Eva`'s own placement of the final norm (after the pooling only
//! for `avg`) and its MAP head over all tokens.

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use super::config::VisionConfig;
use super::drop_path::{self, drop_path};
use super::params::{param, torch_conv_init};
use super::patch_dropout::keep_patches;
use super::staged;
use super::timm_head::{drop_path_rate, TimmHead, TimmProj};
use super::timm_vit::{
    timm_linear, vit_family_groups, AttentionPoolLatent, Ending, GroupLayout, Pool, PoolRule,
    Pooled, TIMM_WEIGHT,
};
use super::transformer::{Activation, LayerNorm, Linear};
use crate::error::{Result, TrainError};

/// How a block's attention projects its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qkv {
    /// `qkv` without a bias, `q_bias` and `v_bias` apart (EVA01, EVA02-E).
    FusedQvBias,
    /// `q_proj`, `k_proj` (no bias), `v_proj`, and the sub-LN `attn.norm` (EVA02).
    Separate,
    /// `qkv` with a bias (timm's `AttentionRope`: PE).
    FusedBias,
}

/// A block's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvaMlp {
    /// fc1, GELU, fc2.
    Gelu,
    /// silu(fc1_g(x)) * fc1_x(x), LayerNorm, fc2 (timm's `SwiGLU` with `scale_mlp`).
    SwiGlu,
}

/// The rotary embedding's grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// The pretraining grid side coordinates are rescaled to (`ref_feat_shape`).
    pub ref_grid: i64,
    /// Added to every coordinate (`rope_grid_offset`).
    pub offset: f64,
    /// timm's `grid_indexing='xy'`: the first coordinate is the column.
    pub xy: bool,
}

/// The bands' base (`rope_temperature`, timm's default in every definition here).
pub const ROPE_TEMPERATURE: f64 = 10000.0;

/// One timm `Eva` definition: what its `@register_model` function passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvaArch {
    pub name: &'static str,
    pub img_size: i64,
    pub patch: i64,
    pub width: i64,
    pub depth: i64,
    pub heads: i64,
    pub mlp_hidden: i64,
    pub eps: f64,
    pub class_token: bool,
    /// `use_pre_transformer_norm`: `norm_pre`, and no bias on the patch convolution.
    pub pre_norm: bool,
    /// `use_post_norm`: `x + norm1(attn(x))`, `x + norm2(mlp(x))`.
    pub post_norm: bool,
    pub qkv: Qkv,
    pub mlp: EvaMlp,
    pub rope: Option<Rope>,
    /// The definition's `global_pool`.
    pub pool: Pool,
    /// `attn_pool_num_heads` and the MAP head's MLP width (`attn_pool_mlp_ratio`).
    pub pool_heads: i64,
    pub pool_mlp_hidden: i64,
}

const EVA: EvaArch = EvaArch {
    name: "",
    img_size: 224,
    patch: 14,
    width: 1408,
    depth: 40,
    heads: 16,
    mlp_hidden: 6144,
    eps: 1e-6,
    class_token: true,
    pre_norm: false,
    post_norm: false,
    qkv: Qkv::FusedQvBias,
    mlp: EvaMlp::Gelu,
    rope: None,
    pool: Pool::Avg,
    pool_heads: 16,
    pool_mlp_hidden: 6144,
};

/// EVA02's CLIP towers: `qkv_fused=False, swiglu_mlp, scale_mlp, scale_attn_inner`, rotary
/// embeddings pretrained on a 16 x 16 grid, `mlp_ratio=4 * 2 / 3`, class-token pooling.
const EVA02: EvaArch = EvaArch {
    qkv: Qkv::Separate,
    mlp: EvaMlp::SwiGlu,
    rope: Some(Rope { ref_grid: 16, offset: 0.0, xy: false }),
    pool: Pool::Token,
    ..EVA
};

/// PE-Core: `attn_type='rope', use_pre_transformer_norm`, rotary grid `xy` with offset 1,
/// `global_pool='map'` with 8 heads and `attn_pool_mlp_ratio=4`, PyTorch's LayerNorm eps.
const PE: EvaArch = EvaArch {
    eps: 1e-5,
    pre_norm: true,
    qkv: Qkv::FusedBias,
    pool: Pool::Map,
    pool_heads: 8,
    ..EVA
};

const fn pe(
    name: &'static str,
    img_size: i64,
    patch: i64,
    width: i64,
    depth: i64,
    heads: i64,
    grid: i64,
) -> EvaArch {
    EvaArch {
        name,
        img_size,
        patch,
        width,
        depth,
        heads,
        mlp_hidden: 4 * width,
        rope: Some(Rope { ref_grid: grid, offset: 1.0, xy: true }),
        pool_mlp_hidden: 4 * width,
        ..PE
    }
}

/// The `Eva` trunks of open_clip 3.3's configs.
pub const ARCHITECTURES: [EvaArch; 10] = [
    // mlp_ratio=6144 / 1408; the definition pools by `avg` (open_clip's configs ask `token`).
    EvaArch { name: "eva_giant_patch14_224", ..EVA },
    EvaArch {
        name: "eva02_base_patch16_clip_224",
        patch: 16,
        width: 768,
        depth: 12,
        heads: 12,
        mlp_hidden: 2048,
        ..EVA02
    },
    EvaArch {
        name: "eva02_large_patch14_clip_224",
        width: 1024,
        depth: 24,
        mlp_hidden: 2730,
        ..EVA02
    },
    EvaArch {
        name: "eva02_large_patch14_clip_336",
        img_size: 336,
        width: 1024,
        depth: 24,
        mlp_hidden: 2730,
        ..EVA02
    },
    // use_post_norm=True, mlp_ratio=15360 / 1792, EVA01's attention.
    EvaArch {
        name: "eva02_enormous_patch14_clip_224",
        width: 1792,
        depth: 64,
        mlp_hidden: 15360,
        post_norm: true,
        pool: Pool::Token,
        ..EVA
    },
    pe("vit_pe_core_tiny_patch16_384", 384, 16, 192, 12, 3, 24),
    pe("vit_pe_core_small_patch16_384", 384, 16, 384, 12, 6, 24),
    pe("vit_pe_core_base_patch16_224", 224, 16, 768, 12, 12, 14),
    pe("vit_pe_core_large_patch14_336", 336, 14, 1024, 24, 16, 24),
    // class_token=False, mlp_ratio=8960 / 1536, and no grid offset.
    EvaArch {
        mlp_hidden: 8960,
        class_token: false,
        rope: Some(Rope { ref_grid: 32, offset: 0.0, xy: true }),
        ..pe("vit_pe_core_gigantic_patch14_448", 448, 14, 1536, 50, 16, 32)
    },
];

/// The architecture of an `Eva` timm name, if it is one.
pub fn architecture(name: &str) -> Option<EvaArch> {
    ARCHITECTURES.iter().find(|a| a.name == name).copied()
}

impl EvaArch {
    /// `Eva`'s norm placement: after the pooling for `avg` only (`use_fc_norm=None`).
    pub fn pool_rule(&self) -> PoolRule {
        PoolRule {
            name: self.name,
            pool: self.pool,
            class_token: self.class_token,
            fc_norm: |p: Pool| p == Pool::Avg,
        }
    }
}

/// timm's `build_rotary_pos_embed` for a `grid` x `grid` patch grid, as `RotaryEmbeddingCat`
/// caches it: (grid^2, 2 * head_dim), [sin | cos], each in the interleaved layout (every
/// frequency twice), in float32, computed with timm's own operations so it is its table to
/// the bit.
pub fn rope_table(rope: &Rope, grid: i64, head_dim: i64, device: Device) -> Tensor {
    let bands_count = head_dim / 4;
    let exponent = Tensor::arange(bands_count, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float)
        / bands_count as f64;
    let bands = Tensor::pow_scalar(ROPE_TEMPERATURE, &exponent).reciprocal();
    let axis = || {
        let t = Tensor::arange(grid, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) + rope.offset;
        t / grid as f64 * rope.ref_grid as f64
    };
    let coords = Tensor::meshgrid_indexing(&[axis(), axis()], if rope.xy { "xy" } else { "ij" });
    // (g, g, 2, bands)
    let pos = Tensor::stack(&coords, -1).to_kind(Kind::Float).unsqueeze(-1) * bands;
    let layout =
        |t: Tensor| t.flatten(-2, -1).flatten(0, -2).repeat_interleave_self_int(2, -1, None::<i64>);
    Tensor::cat(&[layout(pos.sin()), layout(pos.cos())], -1).to_device(device)
}

/// x (B, H, N, D) turned by `rope` ((N, 2D) or (B, 1, N, 2D) under patch dropout): timm's
/// `apply_rot_embed_cat`, interleaved pairs.
fn rotate(x: &Tensor, rope: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let (sin, cos) = (rope.narrow(-1, 0, d), rope.narrow(-1, d, d));
    // [x0, x1, x2, x3] -> [-x1, x0, -x3, x2]
    let even = x.slice(-1, 0, None, 2);
    let odd = x.slice(-1, 1, None, 2);
    let turned = Tensor::stack(&[-odd, even], -1).reshape(x.size());
    (x * cos + turned * sin).to_kind(x.kind())
}

/// How a block's attention holds its projections (see [`Qkv`]).
#[derive(Debug)]
pub enum Projections {
    /// `qkv.weight` (3C, C) and the bias of all three: `qkv.bias`, or [`q_bias`; 0; `v_bias`].
    Fused { weight: Tensor, bias: FusedBias },
    /// `q_proj`, `k_proj` (no bias), `v_proj`.
    Separate { q: Linear, k: Tensor, v: Linear },
}

#[derive(Debug)]
pub enum FusedBias {
    Qkv(Tensor),
    QueryValue { q: Tensor, v: Tensor },
}

/// A block's attention: the projections, the rotary turn of the patch tokens' queries and
/// keys, scaled dot-product attention, the sub-LN `norm` (EVA02), `proj`.
#[derive(Debug)]
pub struct EvaAttention {
    pub projections: Projections,
    pub norm: Option<LayerNorm>,
    pub proj: Linear,
    heads: i64,
    prefix: i64,
}

impl EvaAttention {
    fn new(p: nn::Path, a: &EvaArch, proj_std: f64) -> Self {
        let w = a.width;
        let zero = Init::Const(0.0);
        let qkv = &p / "qkv";
        let fused = |bias| Projections::Fused {
            weight: param(&qkv, "weight", &[3 * w, w], TIMM_WEIGHT),
            bias,
        };
        let projections = match a.qkv {
            Qkv::FusedBias => fused(FusedBias::Qkv(param(&qkv, "bias", &[3 * w], zero))),
            Qkv::FusedQvBias => fused(FusedBias::QueryValue {
                q: param(&p, "q_bias", &[w], zero),
                v: param(&p, "v_bias", &[w], zero),
            }),
            Qkv::Separate => Projections::Separate {
                q: timm_linear(&p / "q_proj", w, w),
                k: param(&(&p / "k_proj"), "weight", &[w, w], TIMM_WEIGHT),
                v: timm_linear(&p / "v_proj", w, w),
            },
        };
        EvaAttention {
            projections,
            norm: (a.qkv == Qkv::Separate).then(|| LayerNorm::new(&p / "norm", w, a.eps)),
            proj: Linear::with_bias_init(
                &p / "proj",
                w,
                w,
                Init::Randn { mean: 0.0, stdev: proj_std },
                zero,
            ),
            heads: a.heads,
            prefix: i64::from(a.class_token),
        }
    }

    /// x: (B, N, C) -> (B, N, C); `rope` turns the patch tokens' queries and keys.
    fn forward(&self, x: &Tensor, rope: Option<&Tensor>) -> Tensor {
        let size = x.size();
        let (b, n, c) = (size[0], size[1], size[2]);
        let dh = c / self.heads;
        let (q, k, v) = match &self.projections {
            Projections::Fused { weight, bias } => {
                let bias = match bias {
                    FusedBias::Qkv(bias) => bias.shallow_clone(),
                    FusedBias::QueryValue { q, v } => Tensor::cat(&[q, &q.zeros_like(), v], 0),
                };
                // (B, N, 3C) -> (3, B, H, N, C/H)
                let qkv = x
                    .linear(weight, Some(&bias))
                    .view([b, n, 3, self.heads, dh])
                    .permute([2, 0, 3, 1, 4]);
                (qkv.get(0), qkv.get(1), qkv.get(2))
            }
            Projections::Separate { q, k, v } => {
                let heads = |t: Tensor| t.view([b, n, self.heads, dh]).transpose(1, 2);
                (heads(q.forward(x)), heads(x.linear(k, None::<Tensor>)), heads(v.forward(x)))
            }
        };
        let (q, k) = match rope {
            Some(rope) => {
                let p = self.prefix;
                let turn = |t: &Tensor| {
                    let rest = rotate(&t.narrow(2, p, n - p), rope);
                    Tensor::cat(&[t.narrow(2, 0, p), rest], 2).to_kind(v.kind())
                };
                (turn(&q), turn(&k))
            }
            None => (q, k),
        };
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = out.transpose(1, 2).reshape([b, n, c]);
        let out = match &self.norm {
            Some(norm) => norm.forward(&out),
            None => out,
        };
        self.proj.forward(&out)
    }
}

/// A block's MLP (see [`EvaMlp`]).
#[derive(Debug)]
pub enum Mlp {
    Gelu { fc1: Linear, fc2: Linear },
    SwiGlu { fc1_g: Linear, fc1_x: Linear, norm: LayerNorm, fc2: Linear },
}

impl Mlp {
    fn new(p: nn::Path, a: &EvaArch, fc2_std: f64) -> Self {
        let (w, h) = (a.width, a.mlp_hidden);
        let fc2 = Linear::with_bias_init(
            &p / "fc2",
            h,
            w,
            Init::Randn { mean: 0.0, stdev: fc2_std },
            Init::Const(0.0),
        );
        match a.mlp {
            EvaMlp::Gelu => Mlp::Gelu { fc1: timm_linear(&p / "fc1", w, h), fc2 },
            EvaMlp::SwiGlu => Mlp::SwiGlu {
                fc1_g: timm_linear(&p / "fc1_g", w, h),
                fc1_x: timm_linear(&p / "fc1_x", w, h),
                norm: LayerNorm::new(&p / "norm", h, a.eps),
                fc2,
            },
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gelu { fc1, fc2 } => fc2.forward(&fc1.forward(x).gelu("none")),
            Mlp::SwiGlu { fc1_g, fc1_x, norm, fc2 } => {
                let hidden = fc1_g.forward(x).silu() * fc1_x.forward(x);
                fc2.forward(&norm.forward(&hidden))
            }
        }
    }
}

/// timm's `EvaBlock` (pre-norm) or `EvaBlockPostNorm`.
#[derive(Debug)]
pub struct EvaBlock {
    pub norm1: LayerNorm,
    pub attn: EvaAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    post_norm: bool,
    drop_path: f64,
}

impl EvaBlock {
    fn forward(&self, x: &Tensor, rope: Option<&Tensor>, train: bool) -> Tensor {
        let dp = |y: Tensor| drop_path(&y, self.drop_path, train);
        if self.post_norm {
            let x = x + dp(self.norm1.forward(&self.attn.forward(x, rope)));
            &x + dp(self.norm2.forward(&self.mlp.forward(&x)))
        } else {
            let x = x + dp(self.attn.forward(&self.norm1.forward(x), rope));
            &x + dp(self.mlp.forward(&self.norm2.forward(&x)))
        }
    }
}

/// The `Eva` trunk and open_clip's head. Variables live under `p` (`visual.`).
#[derive(Debug)]
pub struct TimmEva {
    pub arch: EvaArch,
    pub ending: Ending,
    /// `patch_embed.proj`: (width, 3, patch, patch), with a bias unless `pre_norm`.
    pub patch_weight: Tensor,
    pub patch_bias: Option<Tensor>,
    /// (1, 1, width)
    pub cls_token: Option<Tensor>,
    /// (1, prefix + g*g, width)
    pub pos_embed: Tensor,
    pub norm_pre: Option<LayerNorm>,
    pub blocks: Vec<EvaBlock>,
    /// Before the pooling (`norm`) or after it (`fc_norm`).
    pub norm: LayerNorm,
    pub attn_pool: Option<AttentionPoolLatent>,
    pub head: TimmHead,
    /// (g*g, 2 * head_dim), when the trunk has rotary embeddings.
    rope: Option<Tensor>,
    num_patches: i64,
}

impl TimmEva {
    /// The trunk `cfg.timm_model_name` names, at `cfg.image_size` (the grid, the learned
    /// positions and the rotary table follow it, as timm's `set_input_size`).
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let a = architecture(name).ok_or_else(|| {
            TrainError::ModelConfig(format!(
                "vision_cfg.timm_model_name {name:?} is not an Eva trunk oxclip builds"
            ))
        })?;
        Self::with_arch(p, a, cfg, embed_dim)
    }

    /// [`TimmEva::new`] for the definition `a` (a timm name at other sizes, in tests).
    pub fn with_arch(p: nn::Path, a: EvaArch, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let err = |m: String| Err(TrainError::ModelConfig(m));
        let name = a.name;
        if cfg.act_kwargs.is_some() {
            return err(format!(
                "vision_cfg.act_kwargs: {name}'s activations are timm's (GELU, SiLU); remove it"
            ));
        }
        let ending = Ending::of(&a.pool_rule(), cfg)?;
        let max_drop_path = drop_path_rate(cfg, 0.0)?;
        if cfg.image_size < a.patch {
            return err(format!(
                "vision_cfg.image_size {} is smaller than {name}'s patch ({})",
                cfg.image_size, a.patch
            ));
        }
        let t = &p / "trunk";
        let w = a.width;
        let grid = cfg.image_size / a.patch;
        let prefix = i64::from(a.class_token);
        let rates = drop_path::rates(max_drop_path, a.depth);
        let blocks = (0..a.depth)
            .map(|i| {
                let b = &t / "blocks" / i;
                // timm's fix_init_weight: output projections scaled by 1 / sqrt(2 (layer + 1)).
                let std = 0.02 / (2.0 * (i + 1) as f64).sqrt();
                EvaBlock {
                    norm1: LayerNorm::new(&b / "norm1", w, a.eps),
                    attn: EvaAttention::new(&b / "attn", &a, std),
                    norm2: LayerNorm::new(&b / "norm2", w, a.eps),
                    mlp: Mlp::new(&b / "mlp", &a, std),
                    post_norm: a.post_norm,
                    drop_path: rates[i as usize],
                }
            })
            .collect();
        let pe = &t / "patch_embed" / "proj";
        let conv = torch_conv_init(3 * a.patch * a.patch);
        let norm_path = if ending.fc_norm { "fc_norm" } else { "norm" };
        Ok(TimmEva {
            arch: a,
            ending,
            patch_weight: param(&pe, "weight", &[w, 3, a.patch, a.patch], conv),
            patch_bias: (!a.pre_norm).then(|| param(&pe, "bias", &[w], conv)),
            cls_token: a.class_token.then(|| param(&t, "cls_token", &[1, 1, w], TIMM_WEIGHT)),
            pos_embed: param(&t, "pos_embed", &[1, prefix + grid * grid, w], TIMM_WEIGHT),
            norm_pre: a.pre_norm.then(|| LayerNorm::new(&t / "norm_pre", w, a.eps)),
            blocks,
            norm: LayerNorm::new(&t / norm_path, w, a.eps),
            attn_pool: (ending.pool == Pooled::Map).then(|| {
                AttentionPoolLatent::new(
                    &t / "attn_pool",
                    w,
                    a.pool_heads,
                    a.pool_mlp_hidden,
                    Activation::Gelu,
                    a.eps,
                )
            }),
            // Eva's head_init_scale: the classifier starts 1000 times smaller than timm's 0.02.
            head: TimmHead::new(&p, cfg, w, embed_dim, |out| {
                Linear::with_bias_init(
                    &t / "head",
                    w,
                    out,
                    Init::Randn { mean: 0.0, stdev: 2e-5 },
                    Init::Const(0.0),
                )
            })?,
            rope: a.rope.map(|r| rope_table(&r, grid, w / a.heads, t.device())),
            num_patches: grid * grid,
        })
    }

    /// Patch tokens per image.
    pub fn num_patches(&self) -> i64 {
        self.num_patches
    }

    /// Whether training draws random numbers before the head (stochastic depth).
    pub fn draws_in_stages(&self) -> bool {
        self.blocks.iter().any(|b| b.drop_path > 0.0)
    }

    /// The rotary table (float32, as timm's: the turn is computed in float32 and cast back),
    /// for the patches `kept` keeps ((B, 1, keep,
    /// 2D): each kept patch turns by its own position, timm's `apply_keep_indices_nlc`).
    fn rope(&self, kept: Option<&Tensor>) -> Option<Tensor> {
        let table = self.rope.as_ref()?;
        Some(match kept {
            None => table.shallow_clone(),
            Some(kept) => {
                let size = kept.size();
                let rows = table.index_select(0, &kept.to_kind(Kind::Int64).flatten(0, -1));
                rows.view([size[0], 1, size[1], -1])
            }
        })
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, images: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train, kept))
    }

    /// The stem, each block, the head (model/staged.rs).
    pub fn stage_count(&self) -> usize {
        self.blocks.len() + 2
    }

    /// Stage `i` on its input: images for the first, (B, prefix + g*g, W) tokens after it
    /// (fewer under patch dropout: the stem keeps the patches `kept` lists, and the blocks
    /// turn each by its own rotary position).
    pub fn stage(&self, i: usize, x: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        if i == 0 {
            self.stem(x, kept)
        } else if let Some(block) = self.blocks.get(i - 1) {
            block.forward(x, self.rope(kept).as_ref(), train)
        } else {
            self.head(x, train)
        }
    }

    /// timm's `patch_embed`, `_pos_embed` (class token, then positions for every token),
    /// patch dropout, `norm_pre`.
    fn stem(&self, images: &Tensor, kept: Option<&Tensor>) -> Tensor {
        let p = self.arch.patch;
        let x =
            images.conv2d(&self.patch_weight, self.patch_bias.as_ref(), [p, p], [0, 0], [1, 1], 1);
        let x = x.flatten(2, 3).transpose(1, 2);
        let kind = x.kind();
        let x = match &self.cls_token {
            Some(cls) => {
                let b = x.size()[0];
                Tensor::cat(&[cls.to_kind(kind).expand([b, -1, -1], false), x], 1)
            }
            None => x,
        };
        let mut x = x + self.pos_embed.to_kind(kind);
        if let Some(kept) = kept {
            x = keep_patches(&x, i64::from(self.arch.class_token), kept);
        }
        match &self.norm_pre {
            Some(norm) => norm.forward(&x),
            None => x,
        }
    }

    /// timm's `norm`, `forward_head` (pooling, `fc_norm`), then open_clip's head.
    fn head(&self, x: &Tensor, train: bool) -> Tensor {
        let prefix = i64::from(self.arch.class_token);
        let pooled =
            self.ending.norm_and_pool(x, &self.norm, prefix, self.attn_pool.as_ref(), true);
        self.head.forward(&pooled, train)
    }
}

/// open_clip's `TimmModel.lock` groups for the `Eva` trunk `cfg` names ([`vit_family_groups`]:
/// `Eva`'s `group_matcher` is the ViT's); empty for another trunk.
pub fn lock_groups(cfg: &VisionConfig) -> Vec<Vec<String>> {
    let Some(a) = architecture(cfg.timm_model_name.as_deref().unwrap_or_default()) else {
        return Vec::new();
    };
    let Ok(ending) = Ending::of(&a.pool_rule(), cfg) else { return Vec::new() };
    vit_family_groups(&GroupLayout {
        class_token: a.class_token,
        pos_embed: true,
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

    fn small(name: &str, pool: &str) -> (nn::VarStore, TimmEva) {
        let mut a = architecture(name).unwrap();
        (a.depth, a.width, a.heads, a.mlp_hidden, a.pool_mlp_hidden) = (2, 32, 2, 48, 64);
        let cfg: VisionConfig = serde_json::from_value(serde_json::json!(
            {"image_size": 4 * a.patch, "timm_model_name": name, "timm_pool": pool, "timm_proj": null}
        ))
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let eva = TimmEva::with_arch(vs.root() / "visual", a, &cfg, 16).unwrap();
        (vs, eva)
    }

    /// Keeping every patch is no dropout, in any order: each patch takes its own rotary row
    /// along (were the rows taken by sequence position, a reversed order would change the
    /// output; attention is otherwise indifferent to the order).
    #[test]
    fn patch_dropout_keeps_each_patch_its_rotary_position() {
        for (name, pool) in
            [("eva02_base_patch16_clip_224", "token"), ("vit_pe_core_base_patch16_224", "map")]
        {
            let (_vs, eva) = small(name, pool);
            tch::manual_seed(1);
            let size = 4 * eva.arch.patch;
            let images = Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
            let all = Tensor::arange(16, (Kind::Int64, Device::Cpu)).expand([2, 16], false);
            let plain = eva.forward(&images, false, None);
            let kept = eva.forward(&images, false, Some(&all));
            assert!(plain.allclose(&kept, 1e-6, 1e-6, false), "{name}");
            let reversed = eva.forward(&images, false, Some(&all.flip([1])));
            assert!(plain.allclose(&reversed, 1e-5, 1e-5, false), "{name}");
        }
    }

    #[test]
    fn lock_groups_follow_timms_group_matcher() {
        let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
            "embed_dim": 1024, "custom_text": true,
            "vision_cfg": {"image_size": 224, "timm_model_name": "vit_pe_core_base_patch16_224", "timm_pool": "map", "timm_proj": null},
            "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1}
        }))
        .unwrap();
        let groups = lock_groups(&cfg.vision_cfg);
        assert_eq!(groups.len(), 1 + 11 + 1 + 1);
        assert_eq!(
            groups[0],
            [
                "visual.trunk.cls_token",
                "visual.trunk.pos_embed",
                "visual.trunk.patch_embed",
                "visual.trunk.norm_pre"
            ]
        );
        assert_eq!(groups[13], ["visual.trunk.attn_pool", "visual.trunk.head"]);
        assert!(Clip::shapes(&cfg).is_ok());
    }

    #[test]
    fn the_table_has_open_clips_trunks_and_unknown_names_are_refused() {
        assert_eq!(ARCHITECTURES.len(), 10);
        assert!(architecture("eva02_base_patch16_clip_224").is_some_and(|a| a.rope.is_some()));
        assert!(architecture("vit_base_patch16_siglip_224").is_none());
        let cfg: VisionConfig = serde_json::from_value(
            serde_json::json!({"timm_model_name": "eva_nope", "timm_proj": null}),
        )
        .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let err = TimmEva::new(vs.root(), &cfg, 16).unwrap_err().to_string();
        assert!(err.contains("eva_nope"), "{err}");
    }
}
