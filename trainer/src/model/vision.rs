//! The ViT image tower, open_clip's `VisionTransformer`: a bias-free patch-embedding
//! convolution, a class token, learned positions, ln_pre (unless `no_ln_pre`), the residual
//! blocks (LayerScale when `ls_init_value`), then pooling (`tok`: the class token; `avg`: the
//! mean of the patch tokens) with ln_post before it (or after it, `final_ln_after_pool`),
//! projected by `proj`. CoCa's ViT first hands the tokens to an attentional pooler
//! (`attentional_pool`, `coca.rs`), whose queries ln_post, pooling and `proj` act on instead.
//! In training, patch dropout keeps some patch tokens after the positions (`patch_dropout.rs`).

use tch::nn::{self, Init};
use tch::Tensor;

use super::coca::AttentionalPooler;
use super::config::{VisionConfig, VisionPool};
use super::params::param;
use super::patch_dropout::keep_patches;
use super::staged;
use super::transformer::{randn, Activation, BlockInit, BlockSpec, LayerNorm, Transformer};

#[derive(Debug)]
pub struct VisionTransformer {
    /// (width, 3, patch, patch), no bias.
    pub conv1: Tensor,
    /// (width,)
    pub class_embedding: Tensor,
    /// (grid^2 + 1, width)
    pub positional_embedding: Tensor,
    pub ln_pre: Option<LayerNorm>,
    pub transformer: Transformer,
    /// CoCa's attentional pooler (`attn_pool`), when the config asks for one.
    pub attn_pool: Option<AttentionalPooler>,
    pub ln_post: LayerNorm,
    /// (width, embed_dim), applied as `x @ proj`; (embed_dim, embed_dim) after an attentional
    /// pooler.
    pub proj: Tensor,
    patch_size: i64,
    pool: VisionPool,
    final_ln_after_pool: bool,
}

impl VisionTransformer {
    /// Variables live under `p` (open_clip: `visual.`).
    pub fn new(p: nn::Path, cfg: &VisionConfig, embed_dim: i64, act: Activation) -> Self {
        let width = cfg.width;
        let patch = cfg.patch();
        // open_clip: `scale = width ** -0.5` for the class token, positions and projection;
        // the conv and the blocks keep PyTorch's default initialisation.
        let scale = (width as f64).powf(-0.5);
        let conv_bound = 1.0 / ((3 * patch * patch) as f64).sqrt();
        let eps = cfg.norm_eps();
        let spec = BlockSpec {
            width,
            heads: cfg.heads(),
            mlp_ratio: cfg.mlp_ratio,
            act,
            eps,
            ls_init_value: cfg.ls_init_value,
            init: BlockInit::PyTorchDefault,
        };
        let attn_pool = cfg.attentional_pool.then(|| {
            AttentionalPooler::new(
                &p / "attn_pool",
                embed_dim,
                width,
                cfg.attn_pooler_heads,
                cfg.attn_pooler_queries,
            )
        });
        let pool_dim = if attn_pool.is_some() { embed_dim } else { width };
        VisionTransformer {
            conv1: param(
                &(&p / "conv1"),
                "weight",
                &[width, 3, patch, patch],
                Init::Uniform { lo: -conv_bound, up: conv_bound },
            ),
            class_embedding: param(&p, "class_embedding", &[width], randn(scale)),
            positional_embedding: param(
                &p,
                "positional_embedding",
                &[cfg.grid() * cfg.grid() + 1, width],
                randn(scale),
            ),
            ln_pre: (!cfg.no_ln_pre).then(|| LayerNorm::new(&p / "ln_pre", width, eps)),
            transformer: Transformer::new(&p / "transformer", cfg.vit_layers(), spec),
            attn_pool,
            ln_post: LayerNorm::new(&p / "ln_post", pool_dim, eps),
            proj: param(&p, "proj", &[pool_dim, embed_dim], randn(scale)),
            patch_size: patch,
            pool: cfg.pool_type,
            final_ln_after_pool: cfg.final_ln_after_pool,
        }
    }

    /// Patch tokens per image (the class token not counted).
    pub fn num_patches(&self) -> i64 {
        self.positional_embedding.size()[0] - 1
    }

    /// images: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised. `kept`: (B, keep)
    /// patch positions each image keeps (patch dropout), or `None` for all of them.
    pub fn forward(&self, images: &Tensor, kept: Option<&Tensor>) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, kept))
    }

    /// The stages of [`VisionTransformer::forward`] (model/staged.rs): the stem, each
    /// residual block, the head.
    pub fn stage_count(&self) -> usize {
        self.transformer.resblocks.len() + 2
    }

    /// Stage `i` on its input: images for the stem, (B, g*g + 1, W) tokens after it (fewer
    /// under patch dropout: the stem keeps the patches `kept` lists).
    pub fn stage(&self, i: usize, x: &Tensor, kept: Option<&Tensor>) -> Tensor {
        if i == 0 {
            self.stem(x, kept)
        } else if let Some(block) = self.transformer.resblocks.get(i - 1) {
            block.forward(x, false)
        } else {
            self.head(x)
        }
    }

    /// Patch embedding, class token, positions, patch dropout, ln_pre:
    /// (B, 3, S, S) -> (B, 1 + kept patches, W).
    fn stem(&self, images: &Tensor, kept: Option<&Tensor>) -> Tensor {
        let stride = [self.patch_size, self.patch_size];
        // (B, W, g, g) -> (B, g*g, W)
        let x = images.conv2d(&self.conv1, None::<Tensor>, stride, [0, 0], [1, 1], 1);
        let x = x.flatten(2, 3).transpose(1, 2);
        let b = x.size()[0];
        let cls = self.class_embedding.to_kind(x.kind()).view([1, 1, -1]).expand([b, 1, -1], false);
        // (B, g*g + 1, W)
        let kind = x.kind();
        let mut x = Tensor::cat(&[cls, x], 1) + self.positional_embedding.to_kind(kind);
        if let Some(kept) = kept {
            // (B, 1 + keep, W): open_clip's PatchDropout, after the positions, before ln_pre.
            x = keep_patches(&x, 1, kept);
        }
        if let Some(ln_pre) = &self.ln_pre {
            x = ln_pre.forward(&x);
        }
        x
    }

    /// Pooling with ln_post, then proj: (B, g*g + 1, W) -> (B, embed_dim).
    fn head(&self, x: &Tensor) -> Tensor {
        self.head_with_tokens(x).0
    }

    /// The head's output and the tokens CoCa's decoder reads: the patch tokens after ln_post
    /// (B, g*g, W), or the attentional pooler's queries but the first (B, n_queries - 1,
    /// embed_dim) after ln_post, as open_clip's `_pool`.
    pub fn head_with_tokens(&self, x: &Tensor) -> (Tensor, Tensor) {
        let rest = |x: &Tensor| x.narrow(1, 1, x.size()[1] - 1);
        let pool = |x: &Tensor| match self.pool {
            VisionPool::Tok => x.select(1, 0),
            VisionPool::Avg => rest(x).mean_dim(1, false, None),
        };
        let (pooled, tokens) = match &self.attn_pool {
            // open_clip's CoCa setup: ln_post on the pooler's queries, final_ln_after_pool not read.
            Some(attn_pool) => {
                let x = self.ln_post.forward(&attn_pool.forward(x));
                (pool(&x), rest(&x))
            }
            None if self.final_ln_after_pool => (self.ln_post.forward(&pool(x)), rest(x)),
            None => {
                let x = self.ln_post.forward(x);
                (pool(&x), rest(&x))
            }
        };
        (pooled.matmul(&self.proj), tokens)
    }
}
