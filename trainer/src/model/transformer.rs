//! The pre-LN residual block shared by both towers: open_clip's `ResidualAttentionBlock` with
//! `nn.MultiheadAttention` (fused `in_proj_weight`), attention through libtorch's
//! scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).

use tch::nn::{self, Init};
use tch::Tensor;

/// `nn.Linear`: weight is out x in, as PyTorch stores it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// Weight drawn from `weight_init`; bias from PyTorch's default U(-1/sqrt(in), 1/sqrt(in)).
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64, weight_init: Init) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], weight_init),
            bias: p.var("bias", &[out_dim], Init::Uniform { lo: -bound, up: bound }),
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

/// `nn.LayerNorm` with PyTorch's eps.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        LayerNorm { weight: p.var("weight", &[dim], Init::Const(1.0)), bias: p.var("bias", &[dim], Init::Const(0.0)), dim }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm([self.dim], Some(&self.weight), Some(&self.bias), 1e-5, true)
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
            BlockInit::Normal { attn_std, proj_std, .. } => {
                (Init::Randn { mean: 0.0, stdev: attn_std }, Init::Randn { mean: 0.0, stdev: proj_std })
            }
        };
        let in_proj_weight = p.var("in_proj_weight", &[3 * width, width], in_init);
        let in_proj_bias = p.var("in_proj_bias", &[3 * width], Init::Const(0.0));
        let out_proj = Linear::new(&p / "out_proj", width, width, out_init);
        // nn.MultiheadAttention zeroes out_proj.bias.
        tch::no_grad(|| {
            let _ = out_proj.bias.shallow_clone().zero_();
        });
        Attention { in_proj_weight, in_proj_bias, out_proj, heads }
    }

    /// x: (B, L, W) -> (B, L, W).
    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let size = x.size();
        let (b, l, w) = (size[0], size[1], size[2]);
        let head_dim = w / self.heads;
        // (B, L, 3W) -> (3, B, H, L, Dh)
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias))
            .view([b, l, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, causal, None, false);
        // (B, H, L, Dh) -> (B, L, W)
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, l, w]))
    }
}

/// The activation between the MLP's two linears.
#[derive(Debug, Clone, Copy)]
pub enum Activation {
    Gelu,
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's approximation.
    QuickGelu,
}

impl Activation {
    fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
        }
    }
}

#[derive(Debug)]
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    act: Activation,
}

/// open_clip's `ResidualAttentionBlock`: x + attn(ln_1(x)), then x + mlp(ln_2(x)).
#[derive(Debug)]
pub struct ResidualBlock {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl ResidualBlock {
    fn new(p: nn::Path, width: i64, heads: i64, mlp_ratio: f64, act: Activation, init: BlockInit) -> Self {
        let hidden = (width as f64 * mlp_ratio) as i64;
        let (fc_init, proj_init) = match init {
            BlockInit::PyTorchDefault => (Linear::default_init(width), Linear::default_init(hidden)),
            BlockInit::Normal { proj_std, fc_std, .. } => {
                (Init::Randn { mean: 0.0, stdev: fc_std }, Init::Randn { mean: 0.0, stdev: proj_std })
            }
        };
        ResidualBlock {
            ln_1: LayerNorm::new(&p / "ln_1", width),
            attn: Attention::new(&p / "attn", width, heads, init),
            ln_2: LayerNorm::new(&p / "ln_2", width),
            mlp: Mlp {
                c_fc: Linear::new(&p / "mlp" / "c_fc", width, hidden, fc_init),
                c_proj: Linear::new(&p / "mlp" / "c_proj", hidden, width, proj_init),
                act,
            },
        }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&self.ln_1.forward(x), causal);
        let h = self.mlp.act.forward(&self.mlp.c_fc.forward(&self.ln_2.forward(&x)));
        &x + self.mlp.c_proj.forward(&h)
    }
}

/// A stack of residual blocks under `<path>.resblocks.<i>`.
#[derive(Debug)]
pub struct Transformer {
    pub resblocks: Vec<ResidualBlock>,
}

impl Transformer {
    pub fn new(
        p: nn::Path,
        width: i64,
        layers: i64,
        heads: i64,
        mlp_ratio: f64,
        act: Activation,
        init: BlockInit,
    ) -> Self {
        let blocks = &p / "resblocks";
        let resblocks =
            (0..layers).map(|i| ResidualBlock::new(&blocks / i, width, heads, mlp_ratio, act, init)).collect();
        Transformer { resblocks }
    }

    /// x: (B, L, W) -> (B, L, W); `causal` masks attention to later tokens.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for block in &self.resblocks {
            x = block.forward(&x, causal);
        }
        x
    }
}

/// A normal initialiser, as `nn.init.normal_(std=stdev)`.
pub(crate) fn randn(stdev: f64) -> Init {
    Init::Randn { mean: 0.0, stdev }
}
