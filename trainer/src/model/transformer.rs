//! The pre-LN residual block shared by both towers: open_clip's `ResidualAttentionBlock` with
//! `nn.MultiheadAttention` (fused `in_proj_weight`), attention through libtorch's
//! scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).

use tch::nn::{self, Init};
use tch::Tensor;

pub use super::config::Activation;
use super::params::param;

/// `nn.Linear`: weight is out x in, as PyTorch stores it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// Weight drawn from `weight_init`; bias from PyTorch's default U(-1/sqrt(in), 1/sqrt(in)).
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, weight_init: Init) -> Self {
        Self::with_bias_init(p, in_dim, out_dim, weight_init, Self::default_init(in_dim))
    }

    pub fn with_bias_init(
        p: nn::Path,
        in_dim: i64,
        out_dim: i64,
        weight_init: Init,
        bias_init: Init,
    ) -> Self {
        Linear {
            weight: param(&p, "weight", &[out_dim, in_dim], weight_init),
            bias: param(&p, "bias", &[out_dim], bias_init),
        }
    }

    /// PyTorch's default `nn.Linear` initialisation: kaiming_uniform(a = sqrt 5), i.e.
    /// U(-1/sqrt(in), 1/sqrt(in)).
    pub fn default_init(in_dim: i64) -> Init {
        let bound = 1.0 / (in_dim as f64).sqrt();
        Init::Uniform { lo: -bound, up: bound }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// `nn.LayerNorm` (eps 1e-5 unless the config's `norm_kwargs` say otherwise).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: param(&p, "weight", &[dim], Init::Const(1.0)),
            bias: param(&p, "bias", &[dim], Init::Const(0.0)),
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }

    /// Over the channels of (B, C, H, W): timm's `LayerNorm2d`.
    pub fn forward_2d(&self, x: &Tensor) -> Tensor {
        self.forward(&x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
    }
}

/// LayerScale: a learned per-channel factor on a residual branch (`ls_1.gamma`).
#[derive(Debug)]
pub struct LayerScale {
    pub gamma: Tensor,
}

impl LayerScale {
    pub fn new(p: nn::Path, dim: i64, init: f64) -> Self {
        LayerScale { gamma: param(&p, "gamma", &[dim], Init::Const(init)) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x * &self.gamma
    }
}

/// Initial standard deviations of a tower's weights. open_clip's text tower draws them from
/// normals (`TextTransformer.init_parameters`); its image tower keeps PyTorch's defaults.
#[derive(Debug, Clone, Copy)]
pub enum BlockInit {
    /// `nn.MultiheadAttention` and `nn.Linear` defaults.
    PyTorchDefault,
    /// Normal weights with these standard deviations.
    Normal { attn_std: f64, proj_std: f64, fc_std: f64 },
}

/// Multi-head self-attention with the fused q, k, v projection of `nn.MultiheadAttention`.
#[derive(Debug)]
pub struct Attention {
    pub in_proj_weight: Tensor,
    pub in_proj_bias: Tensor,
    pub out_proj: Linear,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, width: i64, heads: i64, init: BlockInit) -> Self {
        let (in_init, out_init) = match init {
            // nn.MultiheadAttention._reset_parameters: xavier_uniform on in_proj_weight
            // (fan_in = width, fan_out = 3 width).
            BlockInit::PyTorchDefault => {
                let bound = (6.0 / (4 * width) as f64).sqrt();
                (Init::Uniform { lo: -bound, up: bound }, Linear::default_init(width))
            }
            BlockInit::Normal { attn_std, proj_std, .. } => (
                Init::Randn { mean: 0.0, stdev: attn_std },
                Init::Randn { mean: 0.0, stdev: proj_std },
            ),
        };
        let in_proj_weight = param(&p, "in_proj_weight", &[3 * width, width], in_init);
        let in_proj_bias = param(&p, "in_proj_bias", &[3 * width], Init::Const(0.0));
        // nn.MultiheadAttention zeroes out_proj.bias.
        let out_proj =
            Linear::with_bias_init(&p / "out_proj", width, width, out_init, Init::Const(0.0));
        Attention { in_proj_weight, in_proj_bias, out_proj, heads }
    }

    /// x: (B, L, W) -> (B, L, W); `mask` says which keys each query sees.
    fn forward(&self, x: &Tensor, mask: Mask) -> Tensor {
        let size = x.size();
        let (b, l, w) = (size[0], size[1], size[2]);
        let head_dim = w / self.heads;
        // (B, L, 3W) -> (3, B, H, L, Dh)
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .view([b, l, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let (explicit, causal) = match mask {
            Mask::None => (None, false),
            Mask::Causal => (None, true),
            Mask::Explicit(keep) => (Some(keep), false),
        };
        let out =
            Tensor::scaled_dot_product_attention(&q, &k, &v, explicit, 0.0, causal, None, false);
        // (B, H, L, Dh) -> (B, L, W)
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, l, w]))
    }

    /// Queries from `x` (B, L, W), keys and values from `context` (B, M, W), with the same
    /// fused projection cut in three (`nn.MultiheadAttention(q, k, v)` with k = v): CoCa's
    /// decoder reading the image tokens.
    fn forward_cross(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let w = x.size()[2];
        let weights = self.in_proj_weight.split(w, 0);
        let biases = self.in_proj_bias.split(w, 0);
        let out = attend(
            &x.linear(&weights[0], Some(&biases[0])),
            &context.linear(&weights[1], Some(&biases[1])),
            &context.linear(&weights[2], Some(&biases[2])),
            self.heads,
        );
        self.out_proj.forward(&out)
    }
}

/// Multi-head attention of projected queries (B, L, W) over projected keys and values
/// (B, M, W), every key seen: split into `heads`, scaled dot-product attention, merged back to
/// (B, L, W).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64) -> Tensor {
    let (b, l, w) = (q.size()[0], q.size()[1], q.size()[2]);
    let split = |t: &Tensor| t.view([b, t.size()[1], heads, w / heads]).transpose(1, 2);
    let out = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    );
    out.transpose(1, 2).reshape([b, l, w])
}

/// Which keys each query of a self-attention sees.
#[derive(Debug, Clone, Copy)]
pub enum Mask<'a> {
    /// All of them.
    None,
    /// Those at or before its own position.
    Causal,
    /// Where this boolean (B, 1, L, L) is true: causality and padding together (CoCa's text
    /// tower).
    Explicit(&'a Tensor),
}

impl Activation {
    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Relu => x.relu(),
        }
    }
}

/// What every block of a tower shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub width: i64,
    pub heads: i64,
    pub mlp_ratio: f64,
    pub act: Activation,
    /// LayerNorm eps.
    pub eps: f64,
    /// LayerScale's initial value; `None`: no LayerScale.
    pub ls_init_value: Option<f64>,
    pub init: BlockInit,
}

#[derive(Debug)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    act: Activation,
}

/// open_clip's `ResidualAttentionBlock`: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))).
/// A cross-attention block (CoCa's decoder) takes keys and values from a context normalised
/// by its own `ln_1_kv`.
#[derive(Debug)]
pub struct ResidualBlock {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ls_1: Option<LayerScale>,
    pub ln_1_kv: Option<LayerNorm>,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
    pub ls_2: Option<LayerScale>,
}

impl ResidualBlock {
    fn new(p: nn::Path, spec: BlockSpec) -> Self {
        Self::build(p, spec, false)
    }

    /// A block whose attention reads a context ([`ResidualBlock::forward_cross`]).
    pub fn new_cross(p: nn::Path, spec: BlockSpec) -> Self {
        Self::build(p, spec, true)
    }

    fn build(p: nn::Path, spec: BlockSpec, cross: bool) -> Self {
        let BlockSpec { width, heads, mlp_ratio, act, eps, ls_init_value, init } = spec;
        // open_clip: `mlp_width = int(d_model * mlp_ratio)`.
        let hidden = (width as f64 * mlp_ratio) as i64;
        let (fc_init, proj_init) = match init {
            BlockInit::PyTorchDefault => {
                (Linear::default_init(width), Linear::default_init(hidden))
            }
            BlockInit::Normal { proj_std, fc_std, .. } => (
                Init::Randn { mean: 0.0, stdev: fc_std },
                Init::Randn { mean: 0.0, stdev: proj_std },
            ),
        };
        ResidualBlock {
            ln_1: LayerNorm::new(&p / "ln_1", width, eps),
            attn: Attention::new(&p / "attn", width, heads, init),
            ls_1: ls_init_value.map(|v| LayerScale::new(&p / "ls_1", width, v)),
            ln_1_kv: cross.then(|| LayerNorm::new(&p / "ln_1_kv", width, eps)),
            ln_2: LayerNorm::new(&p / "ln_2", width, eps),
            mlp: Mlp {
                c_fc: Linear::new(&p / "mlp" / "c_fc", width, hidden, fc_init),
                c_proj: Linear::new(&p / "mlp" / "c_proj", hidden, width, proj_init),
                act,
            },
            ls_2: ls_init_value.map(|v| LayerScale::new(&p / "ls_2", width, v)),
        }
    }

    /// x: (B, L, W) -> (B, L, W); `causal` masks attention to later tokens.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        self.forward_masked(x, if causal { Mask::Causal } else { Mask::None })
    }

    /// [`ResidualBlock::forward`] with the keys each query sees given by `mask`.
    pub fn forward_masked(&self, x: &Tensor, mask: Mask) -> Tensor {
        let x = x + scaled(&self.ls_1, self.attn.forward(&self.ln_1.forward(x), mask));
        self.mlp_residual(&x)
    }

    /// x: (B, L, W) attending to `context` (B, M, W) (after `ln_1_kv`), then the MLP.
    pub fn forward_cross(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let context = match &self.ln_1_kv {
            Some(ln) => ln.forward(context),
            None => context.shallow_clone(),
        };
        let attended = self.attn.forward_cross(&self.ln_1.forward(x), &context);
        let x = x + scaled(&self.ls_1, attended);
        self.mlp_residual(&x)
    }

    fn mlp_residual(&self, x: &Tensor) -> Tensor {
        let h = self.mlp.act.forward(&self.mlp.c_fc.forward(&self.ln_2.forward(x)));
        x + scaled(&self.ls_2, self.mlp.c_proj.forward(&h))
    }
}

/// A residual branch through its LayerScale, if any.
fn scaled(ls: &Option<LayerScale>, h: Tensor) -> Tensor {
    match ls {
        Some(ls) => ls.forward(&h),
        None => h,
    }
}

/// A stack of residual blocks under `<path>.resblocks.<i>`; the towers run them as stages
/// (model/staged.rs).
#[derive(Debug)]
pub struct Transformer {
    pub resblocks: Vec<ResidualBlock>,
}

impl Transformer {
    pub fn new(p: nn::Path, layers: i64, spec: BlockSpec) -> Self {
        let blocks = &p / "resblocks";
        let resblocks = (0..layers).map(|i| ResidualBlock::new(&blocks / i, spec)).collect();
        Transformer { resblocks }
    }
}

/// A normal initialiser, as `nn.init.normal_(std=stdev)`.
pub(crate) fn randn(stdev: f64) -> Init {
    Init::Randn { mean: 0.0, stdev }
}
