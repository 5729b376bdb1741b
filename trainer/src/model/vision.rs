//! The ViT image tower, open_clip's `VisionTransformer` with its defaults: a bias-free
//! patch-embedding convolution, a class token, learned positions, ln_pre, the residual
//! blocks, ln_post on every token, the class token pooled and projected by `proj`.

use tch::nn::{self, Init};
use tch::Tensor;

use super::config::VisionConfig;
use super::transformer::{randn, Activation, BlockInit, LayerNorm, Transformer};

#[derive(Debug)]
pub struct VisionTransformer {
    /// (width, 3, patch, patch), no bias.
    pub conv1: Tensor,
    /// (width,)
    pub class_embedding: Tensor,
    /// (grid^2 + 1, width)
    pub positional_embedding: Tensor,
    pub ln_pre: LayerNorm,
    pub transformer: Transformer,
    pub ln_post: LayerNorm,
    /// (width, embed_dim), applied as `x @ proj`.
    pub proj: Tensor,
    patch_size: i64,
}

impl VisionTransformer {
    /// Variables live under `p` (open_clip: `visual.`).
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64, act: Activation) -> Self {
        let width = cfg.width;
        // open_clip: `scale = width ** -0.5` for the class token, positions and projection;
        // the conv and the blocks keep PyTorch's default initialisation.
        let scale = (width as f64).powf(-0.5);
        let fan_in = 3 * cfg.patch_size * cfg.patch_size;
        let conv_bound = 1.0 / (fan_in as f64).sqrt();
        VisionTransformer {
            conv1: (&p / "conv1").var(
                "weight",
                &[width, 3, cfg.patch_size, cfg.patch_size],
                Init::Uniform { lo: -conv_bound, up: conv_bound },
            ),
            class_embedding: p.var("class_embedding", &[width], randn(scale)),
            positional_embedding: p.var("positional_embedding", &[cfg.grid() * cfg.grid() + 1, width], randn(scale)),
            ln_pre: LayerNorm::new(&p / "ln_pre", width),
            transformer: Transformer::new(
                &p / "transformer",
                width,
                cfg.layers,
                cfg.heads(),
                cfg.mlp_ratio,
                act,
                BlockInit::PyTorchDefault,
            ),
            ln_post: LayerNorm::new(&p / "ln_post", width),
            proj: p.var("proj", &[width, embed_dim], randn(scale)),
            patch_size: cfg.patch_size,
        }
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, images: &Tensor) -> Tensor {
        let stride = [self.patch_size, self.patch_size];
        // (B, W, g, g) -> (B, g*g, W)
        let x = images.conv2d(&self.conv1, None::<Tensor>, stride, [0, 0], [1, 1], 1);
        let x = x.flatten(2, 3).transpose(1, 2);
        let b = x.size()[0];
        let cls = self.class_embedding.to_kind(x.kind()).view([1, 1, -1]).expand([b, 1, -1], false);
        // (B, g*g + 1, W)
        let kind = x.kind();
        let x = Tensor::cat(&[cls, x], 1) + self.positional_embedding.to_kind(kind);
        let x = self.ln_pre.forward(&x);
        let x = self.transformer.forward(&x, false);
        let x = self.ln_post.forward(&x);
        // Pool the class token.
        x.select(1, 0).matmul(&self.proj)
    }
}
