//! OpenAI's ResNet image tower, open_clip's `ModifiedResNet` (RN50, RN101, RN50x4, RN50x16,
//! RN50x64): torchvision's ResNet with three changes from the CLIP paper:
//!
//! - a stem of three 3x3 convolutions (the first with stride 2) and an average pool instead
//!   of one 7x7 convolution and a max pool;
//! - anti-aliased downsampling: a stride-2 block average-pools before its last 1x1
//!   convolution (and before the shortcut's), every convolution has stride 1;
//! - an attention pool instead of the global average: the mean of the final feature map,
//!   prepended to its positions, is the one query of a multi-head attention over them.
//!
//! BatchNorm follows PyTorch (`batch_norm.rs`).

use tch::nn::{self, Init};
use tch::Tensor;

use super::batch_norm::{BatchNorm2d, BnMode, BnSwitches};
use super::config::VisionConfig;
use super::params::param;
use super::staged;
use super::transformer::{attend, randn, Linear};

/// A bias-free 2-d convolution weight (out, in, k, k) with PyTorch's default initialisation,
/// kaiming_uniform(a = sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn conv_weight(p: &nn::Path, out: i64, inp: i64, k: i64) -> Tensor {
    let bound = 1.0 / ((inp * k * k) as f64).sqrt();
    param(p, "weight", &[out, inp, k, k], Init::Uniform { lo: -bound, up: bound })
}

fn conv(x: &Tensor, w: &Tensor, stride: i64) -> Tensor {
    let pad = w.size()[3] / 2;
    x.conv2d(w, None::<Tensor>, [stride, stride], [pad, pad], [1, 1], 1)
}

fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
}

/// The shortcut of a block that changes shape: `downsample.0` (conv 1x1) and `downsample.1`
/// (BatchNorm), after an average pool of the block's stride (open_clip names the pool "-1",
/// so the numbered modules keep torchvision's indices).
#[derive(Debug)]
pub struct Downsample {
    pub conv: Tensor,
    pub bn: BatchNorm2d,
}

/// open_clip's `Bottleneck`: 1x1 -> 3x3 -> (avg pool) -> 1x1 (x4 channels), plus the shortcut.
#[derive(Debug)]
pub struct Bottleneck {
    pub conv1: Tensor,
    pub bn1: BatchNorm2d,
    pub conv2: Tensor,
    pub bn2: BatchNorm2d,
    pub conv3: Tensor,
    pub bn3: BatchNorm2d,
    pub downsample: Option<Downsample>,
    stride: i64,
}

const EXPANSION: i64 = 4;

impl Bottleneck {
    fn new(p: nn::Path, inplanes: i64, planes: i64, stride: i64) -> Self {
        let out = planes * EXPANSION;
        let downsample = (stride > 1 || inplanes != out).then(|| Downsample {
            conv: conv_weight(&(&p / "downsample" / "0"), out, inplanes, 1),
            bn: BatchNorm2d::new(&p / "downsample" / "1", out, 1.0),
        });
        Bottleneck {
            conv1: conv_weight(&(&p / "conv1"), planes, inplanes, 1),
            bn1: BatchNorm2d::new(&p / "bn1", planes, 1.0),
            conv2: conv_weight(&(&p / "conv2"), planes, planes, 3),
            bn2: BatchNorm2d::new(&p / "bn2", planes, 1.0),
            conv3: conv_weight(&(&p / "conv3"), out, planes, 1),
            bn3: BatchNorm2d::new(&p / "bn3", out, 0.0),
            downsample,
            stride,
        }
    }

    fn forward(&self, x: &Tensor, mode: BnMode) -> Tensor {
        let mut out = self.bn1.forward(&conv(x, &self.conv1, 1), mode).relu();
        out = self.bn2.forward(&conv(&out, &self.conv2, 1), mode).relu();
        if self.stride > 1 {
            out = avg_pool(&out, self.stride);
        }
        out = self.bn3.forward(&conv(&out, &self.conv3, 1), mode);
        let identity = match &self.downsample {
            Some(d) => {
                let pooled =
                    if self.stride > 1 { avg_pool(x, self.stride) } else { x.shallow_clone() };
                d.bn.forward(&conv(&pooled, &d.conv, 1), mode)
            }
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// open_clip's `AttentionPool2d`: separate q, k, v projections and the output projection
/// `c_proj` to the embedding.
#[derive(Debug)]
pub struct AttentionPool2d {
    /// (grid^2 + 1, width * 32)
    pub positional_embedding: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub c_proj: Linear,
    heads: i64,
}

impl AttentionPool2d {
    fn new(p: nn::Path, grid: i64, dim: i64, heads: i64, output_dim: i64) -> Self {
        // open_clip: positions ~ N(0, 1/dim); `init_parameters` draws the four projection
        // weights from N(0, c_proj.in_features^-1/2); the biases keep nn.Linear's default.
        let std = (dim as f64).powf(-0.5);
        AttentionPool2d {
            positional_embedding: param(
                &p,
                "positional_embedding",
                &[grid * grid + 1, dim],
                randn(std),
            ),
            q_proj: Linear::new(&p / "q_proj", dim, dim, randn(std)),
            k_proj: Linear::new(&p / "k_proj", dim, dim, randn(std)),
            v_proj: Linear::new(&p / "v_proj", dim, dim, randn(std)),
            c_proj: Linear::new(&p / "c_proj", dim, output_dim, randn(std)),
            heads,
        }
    }

    /// x: (B, C, H, W) -> (B, output_dim).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c) = (x.size()[0], x.size()[1]);
        // (B, HW, C), the mean token first.
        let x = x.flatten(2, 3).transpose(1, 2);
        let kind = x.kind();
        let x = Tensor::cat(&[x.mean_dim(1, true, None), x], 1)
            + self.positional_embedding.to_kind(kind);
        // open_clip attends from every position and keeps the first: only that query is computed.
        let q = self.q_proj.forward(&x.narrow(1, 0, 1));
        let out = attend(&q, &self.k_proj.forward(&x), &self.v_proj.forward(&x), self.heads);
        // (B, 1, C) -> (B, C)
        self.c_proj.forward(&out.reshape([b, c]))
    }
}

#[derive(Debug)]
pub struct ModifiedResNet {
    pub conv1: Tensor,
    pub bn1: BatchNorm2d,
    pub conv2: Tensor,
    pub bn2: BatchNorm2d,
    pub conv3: Tensor,
    pub bn3: BatchNorm2d,
    /// layer1 .. layer4.
    pub layers: Vec<Vec<Bottleneck>>,
    pub attnpool: AttentionPool2d,
    /// How its BatchNorms follow the model's mode.
    pub batch_norm: BnSwitches,
}

impl ModifiedResNet {
    /// Variables live under `p` (open_clip: `visual.`); `stages` are the blocks per layer.
    pub fn new(p: nn::Path, cfg: &VisionConfig, stages: &[i64], embed_dim: i64) -> Self {
        let width = cfg.width;
        let half = width / 2;
        let mut inplanes = width;
        let layers = stages
            .iter()
            .enumerate()
            .map(|(i, &blocks)| {
                let planes = width << i;
                let stride = if i == 0 { 1 } else { 2 };
                let layer = &p / format!("layer{}", i + 1);
                (0..blocks)
                    .map(|j| {
                        let block = Bottleneck::new(
                            &layer / j,
                            inplanes,
                            planes,
                            if j == 0 { stride } else { 1 },
                        );
                        inplanes = planes * EXPANSION;
                        block
                    })
                    .collect()
            })
            .collect();
        ModifiedResNet {
            conv1: conv_weight(&(&p / "conv1"), half, 3, 3),
            bn1: BatchNorm2d::new(&p / "bn1", half, 1.0),
            conv2: conv_weight(&(&p / "conv2"), half, half, 3),
            bn2: BatchNorm2d::new(&p / "bn2", half, 1.0),
            conv3: conv_weight(&(&p / "conv3"), width, half, 3),
            bn3: BatchNorm2d::new(&p / "bn3", width, 1.0),
            layers,
            attnpool: AttentionPool2d::new(
                &p / "attnpool",
                cfg.image_size / 32,
                width * 32,
                cfg.heads(),
                embed_dim,
            ),
            batch_norm: BnSwitches::default(),
        }
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train))
    }

    /// The stages of [`ModifiedResNet::forward`] (model/staged.rs): the stem, each
    /// bottleneck block of layer1 to layer4 (as timm checkpoints a ResNet: `checkpoint_seq`
    /// over its blocks), the attention pool.
    pub fn stage_count(&self) -> usize {
        self.layers.iter().map(Vec::len).sum::<usize>() + 2
    }

    /// Stage `i` on its input: images for the stem, feature maps after it. BatchNorm follows
    /// `train` and the switches as they are when the stage runs.
    pub fn stage(&self, i: usize, x: &Tensor, train: bool) -> Tensor {
        let mode = self.batch_norm.mode(train);
        if i == 0 {
            let mut x = self.bn1.forward(&conv(x, &self.conv1, 2), mode).relu();
            x = self.bn2.forward(&conv(&x, &self.conv2, 1), mode).relu();
            x = self.bn3.forward(&conv(&x, &self.conv3, 1), mode).relu();
            avg_pool(&x, 2)
        } else if let Some(block) = self.layers.iter().flatten().nth(i - 1) {
            block.forward(x, mode)
        } else {
            self.attnpool.forward(x)
        }
    }
}
