//! The timm `FastVit` trunks of Apple's MobileCLIP-S / MobileCLIP2-S image towers
//! (`fastvit_mci0` ... `fastvit_mci4`, timm 1.0's `fastvit.py`, Vasu et al. 2023), under
//! `visual.trunk.`, with open_clip's `TimmModel` head after them (`timm_head.rs`), built in
//! their train-time form: every re-parameterisable layer keeps its branches, each with its own
//! BatchNorm, as timm builds the model and as open_clip trains and saves it. For inference,
//! [`TimmFastVit::reparameterize`] fuses each such layer into one convolution, as timm's
//! `reparameterize_model`.
//!
//! - `stem`: three MobileOne blocks (3x3 /2; depthwise 3x3 /2; 1x1), GELU after each;
//! - stages; each after the first starts with `downsample`, timm's `PatchEmbed`: a depthwise
//!   7x7 /2 convolution widening the channels, summed with a 3x3 branch, squeeze-excite in
//!   MCi0-2's last two, GELU; then a 1x1 MobileOne block;
//! - the attention stages (the last one or two) start with a conditional positional encoding
//!   (`pos_emb`: x plus a depthwise 7x7 convolution of x);
//! - a RepMixer block: x + gamma (mixer(x) - norm(x)), the mixer a depthwise 3x3 MobileOne
//!   block (its 3x3, 1x1 and identity BatchNorm branches summed), the norm a BatchNorm; then
//!   x + drop_path(gamma ConvMlp(x)) (a depthwise 7x7 convolution and BatchNorm, 1x1 up, GELU,
//!   1x1 down);
//! - an attention block: x + drop_path(gamma attn(norm(x))) over the flattened grid (heads of
//!   32 channels, `qkv` without a bias), the norm a BatchNorm (MCi0-2) or a LayerNorm over the
//!   channels (MCi3-4); then the ConvMlp as above;
//! - `final_conv`: a depthwise 3x3 MobileOne block doubling the channels, squeeze-excite, GELU;
//!   then timm's `ClassifierHead` (a global pooling and, under `timm_proj: null`, `head.fc`).
//!
//! A MobileOne block sums what it has of a kxk convolution, a 1x1 convolution (the scale
//! branch) and a BatchNorm of its input (the identity branch, where the shape allows), each
//! convolution followed by its own BatchNorm. There are no patch tokens to drop
//! (`model::patchless_tower`).

use tch::nn::{self, Init};
use tch::Tensor;

use super::batch_norm::{BatchNorm2d, BnMode, BnSwitches, BN_EPS};
use super::config::VisionConfig;
use super::conv::Conv2d;
use super::drop_path::{self, drop_path};
use super::params::{param, torch_conv_init};
use super::staged;
use super::timm_head::{drop_path_rate, MapPool, TimmHead, TimmProj};
use super::timm_vit::{fused_qkv_attention, timm_linear, TIMM_WEIGHT};
use super::transformer::{LayerNorm, Linear};
use crate::error::{Result, TrainError};

/// One timm FastViT (MCi) definition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FastVitArch {
    pub name: &'static str,
    /// Blocks per stage.
    pub layers: &'static [i64],
    pub dims: &'static [i64],
    pub mlp_ratio: i64,
    /// Squeeze-excite in each stage's downsample.
    pub se_downsamples: &'static [bool],
    /// The first stage of attention blocks (with a positional encoding); RepMixer before it.
    pub attention_from: usize,
    /// The attention blocks' norm: a LayerNorm over the channels (eps 1e-5), or BatchNorm.
    pub layer_norm: bool,
    /// Whether the stem's 3x3 blocks have their 1x1 branch.
    pub stem_scale_branch: bool,
}

const MCI_LOW: FastVitArch = FastVitArch {
    name: "",
    layers: &[],
    dims: &[64, 128, 256, 512],
    mlp_ratio: 3,
    se_downsamples: &[false, false, true, true],
    attention_from: 3,
    layer_norm: false,
    stem_scale_branch: true,
};

const MCI_HIGH: FastVitArch = FastVitArch {
    name: "",
    layers: &[2, 12, 24, 4, 2],
    dims: &[96, 192, 384, 768, 1536],
    mlp_ratio: 4,
    se_downsamples: &[false; 5],
    attention_from: 3,
    layer_norm: true,
    stem_scale_branch: false,
};

/// The FastViT trunks of open_clip 3.3's configs.
pub const ARCHITECTURES: [FastVitArch; 5] = [
    FastVitArch { name: "fastvit_mci0", layers: &[2, 6, 10, 2], ..MCI_LOW },
    FastVitArch { name: "fastvit_mci1", layers: &[4, 12, 20, 4], ..MCI_LOW },
    FastVitArch {
        name: "fastvit_mci2",
        layers: &[4, 12, 24, 4],
        dims: &[80, 160, 320, 640],
        ..MCI_LOW
    },
    FastVitArch { name: "fastvit_mci3", ..MCI_HIGH },
    FastVitArch {
        name: "fastvit_mci4",
        layers: &[2, 12, 24, 4, 4],
        dims: &[128, 256, 512, 1024, 2048],
        ..MCI_HIGH
    },
];

/// The architecture of a FastViT timm name, if it is one.
pub fn architecture(name: &str) -> Option<FastVitArch> {
    ARCHITECTURES.iter().find(|a| a.name == name).copied()
}

/// timm's defaults: LayerScale's start, the attention's head width, the ConvMlp's and the
/// positional encoding's depthwise kernel, the downsample's large and small kernels.
const LS_INIT: f64 = 1e-5;
const HEAD_DIM: i64 = 32;
const MLP_KERNEL: i64 = 7;
const CPE_KERNEL: i64 = 7;
const DOWN_KERNEL: i64 = 7;
const SMALL_KERNEL: i64 = 3;
/// `final_conv` widens the last stage by `cls_ratio`.
const CLS_RATIO: i64 = 2;

/// timm's `make_divisible(v, divisor, round_limit=0)`.
fn make_divisible(v: f64, divisor: i64) -> i64 {
    (((v + divisor as f64 / 2.0) as i64) / divisor * divisor).max(divisor)
}

/// A bias-free convolution and its BatchNorm (timm's `ConvNormAct` without an activation),
/// padded (k - 1) / 2.
#[derive(Debug)]
pub struct ConvBn {
    pub weight: Tensor,
    pub bn: BatchNorm2d,
    stride: i64,
    groups: i64,
}

impl ConvBn {
    fn new(p: nn::Path, inp: i64, out: i64, k: i64, stride: i64, groups: i64, init: Init) -> Self {
        ConvBn {
            weight: param(&(&p / "conv"), "weight", &[out, inp / groups, k, k], init),
            bn: BatchNorm2d::new(&p / "bn", out, 1.0),
            stride,
            groups,
        }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let pad = self.weight.size()[3] / 2;
        let s = [self.stride, self.stride];
        let y = x.conv2d(&self.weight, None::<Tensor>, s, [pad, pad], [1, 1], self.groups);
        self.bn.forward(&y, mode)
    }

    /// The convolution with its BatchNorm's running statistics folded in, its kernel padded
    /// to `k` (timm's `_fuse_bn_tensor`).
    fn fused(&self, k: i64) -> (Tensor, Tensor) {
        let (w, b) = fold_bn(&self.weight, &self.bn);
        let pad = (k - self.weight.size()[3]) / 2;
        (w.constant_pad_nd([pad, pad, pad, pad]), b)
    }
}

/// `weight` (out, in, k, k) followed by `bn` in eval mode, as one convolution with a bias.
fn fold_bn(weight: &Tensor, bn: &BatchNorm2d) -> (Tensor, Tensor) {
    let std = (&bn.running_var + BN_EPS).sqrt();
    let t = &bn.weight / &std;
    let w = weight * t.reshape([-1, 1, 1, 1]);
    (w, &bn.bias - &bn.running_mean * t)
}

/// The kernel of the identity as a (channels, channels / groups, k, k) convolution: 1 at the
/// centre of channel i's input i % (channels / groups).
fn identity_kernel(channels: i64, groups: i64, k: i64, like: &Tensor) -> Tensor {
    let per_group = channels / groups;
    let mut values = vec![0f32; (channels * per_group * k * k) as usize];
    for i in 0..channels {
        let at = ((i * per_group + i % per_group) * k + k / 2) * k + k / 2;
        values[at as usize] = 1.0;
    }
    Tensor::from_slice(&values)
        .view([channels, per_group, k, k])
        .to_kind(like.kind())
        .to_device(like.device())
}

/// A convolution with a bias, padded (k - 1) / 2: PyTorch's default initialisation, or
/// `init` for the weight and a zero bias.
fn conv(p: nn::Path, inp: i64, out: i64, k: i64, groups: i64, init: Option<Init>) -> Conv2d {
    let default = torch_conv_init(inp / groups * k * k);
    let (weight, bias) = match init {
        Some(w) => (w, Init::Const(0.0)),
        None => (default, default),
    };
    Conv2d::new(&p, (inp, out, k), 1, groups, weight, bias)
}

/// timm's `SqueezeExcite`: x * sigmoid(fc2(relu(fc1(mean over the grid)))).
#[derive(Debug)]
pub struct SqueezeExcite {
    pub fc1: Conv2d,
    pub fc2: Conv2d,
}

impl SqueezeExcite {
    fn new(p: nn::Path, channels: i64, reduced: i64) -> Self {
        SqueezeExcite {
            fc1: conv(&p / "fc1", channels, reduced, 1, 1, None),
            fc2: conv(&p / "fc2", reduced, channels, 1, 1, None),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.mean_dim([2i64, 3].as_slice(), true, None);
        x * self.fc2.forward(&self.fc1.forward(&s).relu()).sigmoid()
    }
}

/// timm's `MobileOneBlock` in its train-time form.
#[derive(Debug)]
pub struct MobileOne {
    /// BatchNorm of the input, where the block keeps the shape (stride 1, in = out).
    pub identity: Option<BatchNorm2d>,
    pub conv_kxk: Option<ConvBn>,
    /// The 1x1 branch of a kxk block (k > 1).
    pub conv_scale: Option<ConvBn>,
    pub se: Option<SqueezeExcite>,
    /// The branches fused into one convolution ([`TimmFastVit::reparameterize`]).
    pub reparam_conv: Option<Conv2d>,
    act: bool,
    kernel: i64,
    stride: i64,
    groups: i64,
}

/// What a MobileOne block has besides its shape.
#[derive(Debug, Clone, Copy)]
struct MobileOneSpec {
    /// Depthwise (timm's `group_size=1`) or dense.
    depthwise: bool,
    kxk: bool,
    scale: bool,
    se: bool,
    act: bool,
}

const DENSE: MobileOneSpec =
    MobileOneSpec { depthwise: false, kxk: true, scale: true, se: false, act: true };

impl MobileOne {
    fn new(p: nn::Path, inp: i64, out: i64, k: i64, stride: i64, s: MobileOneSpec) -> Self {
        let groups = if s.depthwise { inp } else { 1 };
        let init = torch_conv_init(inp / groups * k * k);
        let scale_init = torch_conv_init(inp / groups);
        MobileOne {
            identity: (inp == out && stride == 1)
                .then(|| BatchNorm2d::new(&p / "identity", inp, 1.0)),
            conv_kxk: s
                .kxk
                .then(|| ConvBn::new(&p / "conv_kxk" / 0, inp, out, k, stride, groups, init)),
            conv_scale: (k > 1 && s.scale)
                .then(|| ConvBn::new(&p / "conv_scale", inp, out, 1, stride, groups, scale_init)),
            se: s
                .se
                .then(|| SqueezeExcite::new(&p / "se", out, make_divisible(out as f64 / 16.0, 1))),
            reparam_conv: None,
            act: s.act,
            kernel: k,
            stride,
            groups,
        }
    }

    /// timm's `MobileOneBlock._get_kernel_bias`: every branch as a kxk kernel and a bias,
    /// summed.
    fn fused(&self) -> Option<(Tensor, Tensor)> {
        let mut parts = Vec::new();
        if let Some(scale) = &self.conv_scale {
            parts.push(scale.fused(self.kernel));
        }
        if let Some(bn) = &self.identity {
            let id = identity_kernel(bn.weight.size()[0], self.groups, self.kernel, &bn.weight);
            parts.push(fold_bn(&id, bn));
        }
        if let Some(kxk) = &self.conv_kxk {
            parts.push(kxk.fused(self.kernel));
        }
        // None only for a block without branches, which no FastViT builds.
        parts.into_iter().reduce(|(w, b), (w2, b2)| (w + w2, b + b2))
    }

    fn reparameterize(&mut self) {
        if self.reparam_conv.is_none() {
            if let Some((weight, bias)) = self.fused() {
                let (stride, groups) = (self.stride, self.groups);
                self.reparam_conv = Some(Conv2d::of(weight, bias, stride, groups));
            }
        }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        if let Some(conv) = &self.reparam_conv {
            return self.finish(conv.forward(x));
        }
        // timm's order: scale + identity, then the kxk branch.
        let mut out: Option<Tensor> = None;
        let mut add = |y: Tensor| {
            out = Some(match out.take() {
                Some(o) => o + y,
                None => y,
            })
        };
        if let Some(scale) = &self.conv_scale {
            add(scale.forward(x, mode));
        }
        if let Some(identity) = &self.identity {
            add(identity.forward(x, mode));
        }
        if let Some(kxk) = &self.conv_kxk {
            add(kxk.forward(x, mode));
        }
        self.finish(out.unwrap_or_else(|| x.zeros_like()))
    }

    /// Squeeze-excite and the activation after the branches.
    fn finish(&self, out: Tensor) -> Tensor {
        let out = match &self.se {
            Some(se) => se.forward(&out),
            None => out,
        };
        if self.act {
            out.gelu("none")
        } else {
            out
        }
    }
}

/// timm's `PatchEmbed` of a stage: `ReparamLargeKernelConv` (a depthwise 7x7 /2 and a 3x3 /2
/// branch, squeeze-excite, GELU), then a 1x1 MobileOne block.
#[derive(Debug)]
pub struct Downsample {
    pub large_conv: ConvBn,
    pub small_conv: ConvBn,
    pub se: Option<SqueezeExcite>,
    pub mobile_one: MobileOne,
    /// The two branches fused ([`TimmFastVit::reparameterize`]).
    pub reparam_conv: Option<Conv2d>,
}

impl Downsample {
    fn new(p: nn::Path, inp: i64, out: i64, se: bool) -> Self {
        let proj = &p / "proj";
        let lk = &proj / 0;
        let large = torch_conv_init(DOWN_KERNEL * DOWN_KERNEL);
        let small = torch_conv_init(SMALL_KERNEL * SMALL_KERNEL);
        Downsample {
            large_conv: ConvBn::new(&lk / "large_conv", inp, out, DOWN_KERNEL, 2, inp, large),
            small_conv: ConvBn::new(&lk / "small_conv", inp, out, SMALL_KERNEL, 2, inp, small),
            se: se
                .then(|| SqueezeExcite::new(&lk / "se", out, make_divisible(out as f64 * 0.25, 8))),
            mobile_one: MobileOne::new(&proj / 1, out, out, 1, 1, DENSE),
            reparam_conv: None,
        }
    }

    /// timm's `ReparamLargeKernelConv.reparameterize`, and the MobileOne block's.
    fn reparameterize(&mut self) {
        if self.reparam_conv.is_none() {
            let (w, b) = self.large_conv.fused(DOWN_KERNEL);
            let (ws, bs) = self.small_conv.fused(DOWN_KERNEL);
            let groups = self.large_conv.groups;
            self.reparam_conv = Some(Conv2d::of(w + ws, b + bs, 2, groups));
        }
        self.mobile_one.reparameterize();
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let y = match &self.reparam_conv {
            Some(conv) => conv.forward(x),
            None => self.large_conv.forward(x, mode) + self.small_conv.forward(x, mode),
        };
        let y = match &self.se {
            Some(se) => se.forward(&y),
            None => y,
        };
        self.mobile_one.forward(&y.gelu("none"), mode)
    }
}

/// timm's `ConvMlp`: a depthwise 7x7 convolution and BatchNorm, 1x1 up, GELU, 1x1 down; its
/// convolutions start at trunc_normal(0.02) (a plain normal: truncated at +-2), zero biases.
#[derive(Debug)]
pub struct ConvMlp {
    pub conv: ConvBn,
    pub fc1: Conv2d,
    pub fc2: Conv2d,
}

impl ConvMlp {
    fn new(p: nn::Path, dim: i64, hidden: i64) -> Self {
        ConvMlp {
            conv: ConvBn::new(&p / "conv", dim, dim, MLP_KERNEL, 1, dim, TIMM_WEIGHT),
            fc1: conv(&p / "fc1", dim, hidden, 1, 1, Some(TIMM_WEIGHT)),
            fc2: conv(&p / "fc2", hidden, dim, 1, 1, Some(TIMM_WEIGHT)),
        }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        self.fc2.forward(&self.fc1.forward(&self.conv.forward(x, mode)).gelu("none"))
    }
}

/// LayerScale2d: a per-channel factor, (C, 1, 1).
fn layer_scale(p: nn::Path, dim: i64) -> Tensor {
    param(&p, "gamma", &[dim, 1, 1], Init::Const(LS_INIT))
}

/// The attention block's norm.
#[derive(Debug)]
pub enum Norm2d {
    Batch(BatchNorm2d),
    Layer(LayerNorm),
}

/// A FastViT block: RepMixer or attention as the token mixer, then the ConvMlp.
#[derive(Debug)]
pub enum Block {
    RepMixer {
        /// `token_mixer.norm`: a MobileOne block of the identity branch alone.
        norm: Box<MobileOne>,
        mixer: Box<MobileOne>,
        /// `token_mixer.layer_scale.gamma`
        mixer_scale: Tensor,
        /// x + gamma (mixer(x) - norm(x)) as one depthwise convolution
        /// ([`TimmFastVit::reparameterize`]).
        reparam_conv: Option<Conv2d>,
        mlp: ConvMlp,
        /// `layer_scale.gamma`
        mlp_scale: Tensor,
        drop_path: f64,
    },
    Attention {
        norm: Norm2d,
        qkv_weight: Tensor,
        proj: Linear,
        /// `layer_scale_1.gamma`
        attn_scale: Tensor,
        mlp: ConvMlp,
        /// `layer_scale_2.gamma`
        mlp_scale: Tensor,
        drop_path: f64,
    },
}

impl Block {
    fn new(p: nn::Path, a: &FastVitArch, dim: i64, attention: bool, rate: f64) -> Self {
        let mlp = ConvMlp::new(&p / "mlp", dim, dim * a.mlp_ratio);
        if attention {
            let t = &p / "token_mixer";
            Block::Attention {
                norm: if a.layer_norm {
                    Norm2d::Layer(LayerNorm::new(&p / "norm", dim, 1e-5))
                } else {
                    Norm2d::Batch(BatchNorm2d::new(&p / "norm", dim, 1.0))
                },
                qkv_weight: param(&(&t / "qkv"), "weight", &[3 * dim, dim], TIMM_WEIGHT),
                proj: timm_linear(&t / "proj", dim, dim),
                attn_scale: layer_scale(&p / "layer_scale_1", dim),
                mlp,
                mlp_scale: layer_scale(&p / "layer_scale_2", dim),
                drop_path: rate,
            }
        } else {
            let t = &p / "token_mixer";
            let dw = MobileOneSpec { depthwise: true, act: false, ..DENSE };
            Block::RepMixer {
                norm: Box::new(MobileOne::new(
                    &t / "norm",
                    dim,
                    dim,
                    3,
                    1,
                    MobileOneSpec { kxk: false, scale: false, ..dw },
                )),
                mixer: Box::new(MobileOne::new(&t / "mixer", dim, dim, 3, 1, dw)),
                mixer_scale: layer_scale(&t / "layer_scale", dim),
                reparam_conv: None,
                mlp,
                mlp_scale: layer_scale(&p / "layer_scale", dim),
                drop_path: rate,
            }
        }
    }

    /// timm's `RepMixer.reparameterize`: w = id + gamma (w_mixer - w_norm), b = gamma
    /// (b_mixer - b_norm). Attention blocks have nothing to fuse.
    fn reparameterize(&mut self) {
        let Block::RepMixer { norm, mixer, mixer_scale, reparam_conv: fused @ None, .. } = self
        else {
            return;
        };
        if let (Some((wm, bm)), Some((wn, bn))) = (mixer.fused(), norm.fused()) {
            let dim = wm.size()[0];
            let id = identity_kernel(dim, dim, 3, &wm);
            let weight = id + mixer_scale.unsqueeze(-1) * (wm - wn);
            let bias = mixer_scale.view([-1]) * (bm - bn);
            *fused = Some(Conv2d::of(weight, bias, 1, dim));
        }
    }

    fn drop_path(&self) -> f64 {
        match self {
            Block::RepMixer { drop_path, .. } | Block::Attention { drop_path, .. } => *drop_path,
        }
    }

    /// (B, C, H, W) -> the same.
    fn forward(&self, x: &Tensor, mode: BnMode, train: bool) -> Tensor {
        match self {
            Block::RepMixer {
                norm,
                mixer,
                mixer_scale,
                reparam_conv,
                mlp,
                mlp_scale,
                drop_path: p,
            } => {
                let x = match reparam_conv {
                    Some(conv) => conv.forward(x),
                    None => x + (mixer.forward(x, mode) - norm.forward(x, mode)) * mixer_scale,
                };
                let y = mlp.forward(&x, mode) * mlp_scale;
                &x + drop_path(&y, *p, train)
            }
            Block::Attention {
                norm,
                qkv_weight,
                proj,
                attn_scale,
                mlp,
                mlp_scale,
                drop_path: p,
            } => {
                let y = match norm {
                    Norm2d::Batch(bn) => bn.forward(x, mode),
                    Norm2d::Layer(ln) => ln.forward_2d(x),
                };
                let y = attention(&y, qkv_weight, proj) * attn_scale;
                let x = x + drop_path(&y, *p, train);
                let y = mlp.forward(&x, mode) * mlp_scale;
                &x + drop_path(&y, *p, train)
            }
        }
    }
}

/// timm's FastViT `Attention` over a (B, C, H, W) map: the grid flattened to tokens, heads of
/// 32 channels, back to the map.
fn attention(x: &Tensor, qkv_weight: &Tensor, proj: &Linear) -> Tensor {
    let size = x.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    let qkv = x.flatten(2, 3).transpose(1, 2).linear(qkv_weight, None::<Tensor>);
    let out = proj.forward(&fused_qkv_attention(&qkv, c / HEAD_DIM, None));
    out.transpose(1, 2).reshape([b, c, h, w])
}

/// What starts a stage: its downsample and its positional encoding, either of which may be
/// absent.
#[derive(Debug)]
pub struct StageStart {
    pub downsample: Option<Downsample>,
    /// `pos_emb.pos_enc`: x + a depthwise 7x7 convolution of x (`RepConditionalPosEnc`).
    pub pos_emb: Option<Conv2d>,
    /// The positional encoding with its shortcut folded in ([`TimmFastVit::reparameterize`]).
    pub reparam_pos_emb: Option<Conv2d>,
}

impl StageStart {
    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let x = match &self.downsample {
            Some(d) => d.forward(x, mode),
            None => x.shallow_clone(),
        };
        match (&self.reparam_pos_emb, &self.pos_emb) {
            (Some(fused), _) => fused.forward(&x),
            (None, Some(pe)) => pe.forward(&x) + &x,
            (None, None) => x,
        }
    }

    fn reparameterize(&mut self) {
        if let Some(d) = &mut self.downsample {
            d.reparameterize();
        }
        if let (Some(pe), None) = (&self.pos_emb, &self.reparam_pos_emb) {
            let dim = pe.weight.size()[0];
            let weight = identity_kernel(dim, dim, CPE_KERNEL, &pe.weight) + &pe.weight;
            let bias = pe.bias.copy();
            self.reparam_pos_emb = Some(Conv2d::of(weight, bias, 1, dim));
        }
    }
}

/// The FastViT trunk and open_clip's head. Variables live under `p` (`visual.`).
#[derive(Debug)]
pub struct TimmFastVit {
    pub arch: FastVitArch,
    pub stem: Vec<MobileOne>,
    /// Per stage: what starts it (when anything does) and its blocks.
    pub stages: Vec<(Option<StageStart>, Vec<Block>)>,
    pub final_conv: MobileOne,
    pub pool: MapPool,
    pub head: TimmHead,
    pub batch_norm: BnSwitches,
    /// [`TimmFastVit::reparameterize`] has run: eval-mode forwards only.
    reparameterized: bool,
}

impl TimmFastVit {
    /// The trunk `cfg.timm_model_name` names, pooled as [`MapPool::of`] says.
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64) -> Result<Self> {
        let name = cfg.timm_model_name.as_deref().unwrap_or_default();
        let a = architecture(name).ok_or_else(|| {
            TrainError::ModelConfig(format!(
                "vision_cfg.timm_model_name {name:?} is not a FastViT oxclip builds"
            ))
        })?;
        let pool = MapPool::of(cfg)?;
        let depth: i64 = a.layers.iter().sum();
        let rates = drop_path::rates(drop_path_rate(cfg, 0.0)?, depth);
        let stride = 4 << (a.layers.len() - 1);
        if cfg.image_size < stride {
            return Err(TrainError::ModelConfig(format!(
                "vision_cfg.image_size {} is smaller than {name}'s stride ({stride})",
                cfg.image_size
            )));
        }
        let t = &p / "trunk";
        let d0 = a.dims[0];
        let stem_spec = MobileOneSpec { scale: a.stem_scale_branch, ..DENSE };
        let stem = vec![
            MobileOne::new(&t / "stem" / 0, 3, d0, 3, 2, stem_spec),
            MobileOne::new(
                &t / "stem" / 1,
                d0,
                d0,
                3,
                2,
                MobileOneSpec { depthwise: true, ..stem_spec },
            ),
            MobileOne::new(&t / "stem" / 2, d0, d0, 1, 1, stem_spec),
        ];
        let mut rate = rates.iter();
        let mut prev = d0;
        let stages = a
            .dims
            .iter()
            .enumerate()
            .map(|(s, &dim)| {
                let sp = &t / "stages" / s;
                let attention = s >= a.attention_from;
                let downsample = (s > 0 || prev != dim)
                    .then(|| Downsample::new(&sp / "downsample", prev, dim, a.se_downsamples[s]));
                let pos_emb = attention
                    .then(|| conv(&sp / "pos_emb" / "pos_enc", dim, dim, CPE_KERNEL, dim, None));
                prev = dim;
                let start = (downsample.is_some() || pos_emb.is_some()).then_some(StageStart {
                    downsample,
                    pos_emb,
                    reparam_pos_emb: None,
                });
                let blocks = (0..a.layers[s])
                    .map(|b| {
                        let r = rate.next().copied().unwrap_or(0.0);
                        Block::new(&sp / "blocks" / b, &a, dim, attention, r)
                    })
                    .collect();
                (start, blocks)
            })
            .collect();
        let width = prev * CLS_RATIO;
        let final_spec = MobileOneSpec { depthwise: true, se: true, ..DENSE };
        Ok(TimmFastVit {
            arch: a,
            stem,
            stages,
            final_conv: MobileOne::new(&t / "final_conv", prev, width, 3, 1, final_spec),
            pool,
            head: TimmHead::new(&p, cfg, width, embed_dim, |out| {
                timm_linear(&t / "head" / "fc", width, out)
            })?,
            batch_norm: BnSwitches::default(),
            reparameterized: false,
        })
    }

    /// timm's `reparameterize_model` for inference: each MobileOne block, large-kernel
    /// convolution, RepMixer and positional encoding becomes one convolution, its BatchNorms
    /// folded in with their running statistics. The result computes the eval-mode forward (to
    /// float rounding) in fewer convolutions; it cannot train, so only an inference-only model
    /// takes it (the VarStore keeps the train-time weights, which export as they are).
    pub fn reparameterize(&mut self) {
        tch::no_grad(|| {
            for m in &mut self.stem {
                m.reparameterize();
            }
            for (start, blocks) in &mut self.stages {
                if let Some(s) = start {
                    s.reparameterize();
                }
                for b in blocks {
                    b.reparameterize();
                }
            }
            self.final_conv.reparameterize();
        });
        self.reparameterized = true;
    }

    /// Whether training draws random numbers before the head (stochastic depth).
    pub fn draws_in_stages(&self) -> bool {
        self.stages.iter().flat_map(|(_, b)| b).any(|b| b.drop_path() > 0.0)
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train))
    }

    /// The stem, each block (what starts a stage runs with its first block, as timm's groups
    /// have it), then `final_conv` and the head (model/staged.rs).
    pub fn stage_count(&self) -> usize {
        self.stages.iter().map(|(_, b)| b.len()).sum::<usize>() + 2
    }

    /// Stage `i` on its input: images for the stem, feature maps after it.
    pub fn stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        // A fused model has no BatchNorm left to normalise with a batch's statistics.
        let mode = self.batch_norm.mode(train && !self.reparameterized);
        if i == 0 {
            return self.stem.iter().fold(x.shallow_clone(), |x, m| m.forward(&x, mode));
        }
        if let Some((start, block)) = staged::nth_block(&self.stages, i - 1) {
            let x = match start {
                Some(s) => s.forward(x, mode),
                None => x.shallow_clone(),
            };
            return block.forward(&x, mode, train);
        }
        let x = self.final_conv.forward(x, mode);
        self.head.forward(&self.pool.reduce(&x, [2, 3]), train)
    }
}

/// open_clip's `TimmModel.lock` groups for the FastViT `cfg` names, as timm's `group_matcher`
/// and `group_parameters` order them: {stem}, each block (a stage's downsample and positional
/// encoding with its first block), then what no pattern matches: {final_conv, and the
/// classifier when the trunk's projects}. Empty for another trunk.
pub fn lock_groups(cfg: &VisionConfig) -> Vec<Vec<String>> {
    let Some(a) = architecture(cfg.timm_model_name.as_deref().unwrap_or_default()) else {
        return Vec::new();
    };
    let t = "visual.trunk";
    let mut out = vec![vec![format!("{t}.stem")]];
    let starts = |s: usize| {
        let mut m = Vec::new();
        if s > 0 {
            m.push("downsample");
        }
        if s >= a.attention_from {
            m.push("pos_emb");
        }
        m
    };
    out.extend(staged::per_block_groups(&format!("{t}.stages"), a.layers, starts));
    let mut rest = vec![format!("{t}.final_conv")];
    if TimmProj::of(cfg).is_ok_and(|p| p == TimmProj::Classifier) {
        rest.push(format!("{t}.head"));
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// timm's make_divisible at the squeeze-excite widths of the MCi trunks.
    #[test]
    fn reduced_widths_are_timms() {
        assert_eq!(make_divisible(1024.0 / 16.0, 1), 64);
        assert_eq!(make_divisible(1280.0 / 16.0, 1), 80);
        assert_eq!(make_divisible(320.0 * 0.25, 8), 80);
        assert_eq!(make_divisible(640.0 * 0.25, 8), 160);
        assert_eq!(make_divisible(4.0 * 0.25, 8), 8);
    }
}
