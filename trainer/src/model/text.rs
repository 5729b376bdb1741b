//! The text tower, open_clip's `TextTransformer`: token and position embeddings, residual
//! blocks (causally masked unless `no_causal_mask`), ln_final, one position pooled where the
//! config says (`argmax`: CLIP's EOT, the largest id; `eos`: the first `eos_id`; `last`;
//! `first`), projected by `text_projection` (a matrix, or a Linear with a bias under
//! `proj_bias`; none under `proj_type: none`). CoCa's tower (`embed_cls`) appends a learned
//! class embedding after the caption, masks padding and pools there.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::config::{TextConfig, TextPool};
use super::params::param;
use super::staged;
use super::transformer::{
    randn, Activation, BlockInit, BlockSpec, LayerNorm, Linear, Mask, Transformer,
};

#[derive(Debug)]
pub enum TextProjection {
    /// (width, embed_dim), applied as `x @ text_projection`.
    Matrix(Tensor),
    /// `nn.Linear(width, embed_dim)`: `text_projection.weight`, `text_projection.bias`.
    Linear(Linear),
    None,
}

#[derive(Debug)]
pub struct TextTransformer {
    /// (vocab, width)
    pub token_embedding: Tensor,
    /// (context_length, width); one more row under `embed_cls`.
    pub positional_embedding: Tensor,
    /// CoCa's class embedding (width,), appended after the caption.
    pub cls_emb: Option<Tensor>,
    pub transformer: Transformer,
    pub ln_final: LayerNorm,
    pub text_projection: TextProjection,
    causal: bool,
    pool: TextPool,
    eos_id: i64,
    pad_id: i64,
}

impl TextTransformer {
    /// Variables live directly under `p`: open_clip's CLIP hangs the text tower on the root
    /// (`CustomTextCLIP`, under `text.`).
    pub fn new(p: nn::Path, cfg: &TextConfig, embed_dim: i64, act: Activation) -> Self {
        let width = cfg.width;
        // open_clip TextTransformer.init_parameters (OpenAI's scheme).
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * cfg.layers) as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        let spec = BlockSpec {
            width,
            heads: cfg.heads,
            mlp_ratio: cfg.mlp_ratio,
            act,
            eps: cfg.norm_eps(),
            ls_init_value: cfg.ls_init_value,
            init: BlockInit::Normal { attn_std, proj_std, fc_std },
        };
        let text_projection = match (cfg.has_projection(), cfg.proj_bias) {
            (false, _) => TextProjection::None,
            (true, false) => TextProjection::Matrix(param(
                &p,
                "text_projection",
                &[width, embed_dim],
                randn(attn_std),
            )),
            (true, true) => TextProjection::Linear(Linear::with_bias_init(
                &p / "text_projection",
                width,
                embed_dim,
                randn(attn_std),
                Init::Const(0.0),
            )),
        };
        TextTransformer {
            token_embedding: param(
                &(&p / "token_embedding"),
                "weight",
                &[cfg.vocab_size, width],
                randn(0.02),
            ),
            positional_embedding: param(
                &p,
                "positional_embedding",
                &[cfg.context_length + i64::from(cfg.embed_cls), width],
                randn(0.01),
            ),
            cls_emb: cfg.embed_cls.then(|| param(&p, "cls_emb", &[width], randn(0.01))),
            transformer: Transformer::new(&p / "transformer", cfg.layers, spec),
            ln_final: LayerNorm::new(&p / "ln_final", width, cfg.norm_eps()),
            text_projection,
            causal: !cfg.no_causal_mask,
            pool: cfg.pool_type,
            eos_id: cfg.eos_id,
            pad_id: cfg.pad_id,
        }
    }

    /// tokens: (B, L) int64 -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        staged::fold(self.stage_count(), tokens, |i, x| self.stage(i, x, tokens))
    }

    /// The stages of [`TextTransformer::forward`] (model/staged.rs): the embeddings, each
    /// residual block, the head.
    pub fn stage_count(&self) -> usize {
        self.transformer.resblocks.len() + 2
    }

    /// Stage `i` on its input `x`: the token ids for the first, (B, L, W) after it; the
    /// head pools at a position `tokens` give.
    pub fn stage(&self, i: usize, x: &Tensor, tokens: &Tensor) -> Tensor {
        if i == 0 {
            self.embed(x)
        } else if let Some(block) = self.transformer.resblocks.get(i - 1) {
            match &self.cls_emb {
                Some(_) => block.forward_masked(x, Mask::Explicit(&self.cls_mask(tokens))),
                None => block.forward(x, self.causal),
            }
        } else {
            self.head(x, tokens)
        }
    }

    /// Token embeddings, the class embedding after them, positions: (B, L) -> (B, L (+1), W).
    /// Captions shorter than the context take the first positions (a caption being generated).
    fn embed(&self, tokens: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.token_embedding, tokens, -1, false, false);
        let x = match &self.cls_emb {
            Some(cls) => {
                let (b, w) = (x.size()[0], x.size()[2]);
                let cls = cls.to_kind(x.kind()).view([1, 1, w]).expand([b, 1, w], false);
                Tensor::cat(&[x, cls], 1)
            }
            None => x,
        };
        let positions = self.positional_embedding.narrow(0, 0, x.size()[1]);
        &x + positions.to_kind(x.kind())
    }

    /// The padding id (`text_cfg.pad_id`) the class embedding's mask skips.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The longest caption, in tokens, the position table covers (the class embedding's
    /// position not counted).
    pub fn max_tokens(&self) -> i64 {
        self.positional_embedding.size()[0] - i64::from(self.cls_emb.is_some())
    }

    /// Which keys each query sees under `embed_cls`, (B, 1, L + 1, L + 1): causality (unless
    /// `no_causal_mask`) and padding. This is open_clip's mask as its CoCa weights were trained
    /// with (`correct_cls_mask` off, which open_clip's builder never turns on): the padding
    /// flags are shifted one key to the right, so key 0 is always seen, key k is seen when token
    /// k - 1 is not padding, and the class embedding (key L) is seen when the last token is not.
    fn cls_mask(&self, tokens: &Tensor) -> Tensor {
        let (b, l) = (tokens.size()[0], tokens.size()[1]);
        let first = Tensor::ones([b, 1], (tch::Kind::Bool, tokens.device()));
        let keys = Tensor::cat(&[first, tokens.ne(self.pad_id)], 1).view([b, 1, 1, l + 1]);
        let keys = keys.expand([b, 1, l + 1, l + 1], false);
        if self.causal {
            let causal = Tensor::ones([l + 1, l + 1], (tch::Kind::Bool, tokens.device())).tril(0);
            keys.logical_and(&causal)
        } else {
            keys
        }
    }

    /// ln_final, pooling, projection: (B, L, W) -> (B, embed_dim).
    fn head(&self, x: &Tensor, tokens: &Tensor) -> Tensor {
        self.head_with_tokens(x, tokens).0
    }

    /// The head's output and the tokens CoCa's decoder reads, as open_clip's forward: under
    /// `embed_cls` the class embedding's row through ln_final (ln_final after pooling) and
    /// the caption's rows before ln_final (B, L, W); otherwise every row after ln_final.
    pub fn head_with_tokens(&self, x: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
        let (pooled, rows) = match &self.cls_emb {
            Some(_) => {
                let l = x.size()[1] - 1;
                (self.ln_final.forward(&x.select(1, l)), x.narrow(1, 0, l))
            }
            None => {
                let x = self.ln_final.forward(x);
                (self.pool(&x, tokens), x)
            }
        };
        let projected = match &self.text_projection {
            TextProjection::Matrix(m) => pooled.matmul(m),
            TextProjection::Linear(l) => l.forward(&pooled),
            TextProjection::None => pooled,
        };
        (projected, rows)
    }

    /// The row of each caption its features are read at, as open_clip's `text_global_pool`.
    fn pool(&self, x: &Tensor, tokens: &Tensor) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let at = match self.pool {
            TextPool::First => return x.select(1, 0),
            TextPool::Last => return x.select(1, l - 1),
            TextPool::Argmax => tokens.argmax(-1, false),
            // The first eos; a row without one pools at position 0, as open_clip does.
            TextPool::Eos => tokens.eq(self.eos_id).to_kind(Kind::Int).argmax(-1, false),
        };
        // A gather keeps it on the device.
        let rows = Tensor::arange(b, (Kind::Int64, x.device()));
        x.index(&[Some(rows), Some(at)])
    }
}
