//! The causal text transformer, open_clip's `TextTransformer` with its defaults: token and
//! position embeddings, causally masked residual blocks, ln_final, the EOT token (the largest
//! id in each row) pooled and projected by `text_projection`.

use tch::nn;
use tch::{Kind, Tensor};

use super::config::TextConfig;
use super::transformer::{randn, Activation, BlockInit, LayerNorm, Transformer};

#[derive(Debug)]
pub struct TextTransformer {
    /// (vocab, width)
    pub token_embedding: Tensor,
    /// (context_length, width)
    pub positional_embedding: Tensor,
    pub transformer: Transformer,
    pub ln_final: LayerNorm,
    /// (width, embed_dim), applied as `x @ text_projection`.
    pub text_projection: Tensor,
}

impl TextTransformer {
    /// Variables live directly under `p`: open_clip's CLIP hangs the text tower on the root.
    pub fn new(p: nn::Path, cfg: &TextConfig, embed_dim: i64, act: Activation) -> Self {
        let width = cfg.width;
        // open_clip TextTransformer.init_parameters (OpenAI's scheme).
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * cfg.layers) as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        TextTransformer {
            token_embedding: (&p / "token_embedding").var("weight", &[cfg.vocab_size, width], randn(0.02)),
            positional_embedding: p.var("positional_embedding", &[cfg.context_length, width], randn(0.01)),
            transformer: Transformer::new(
                &p / "transformer",
                width,
                cfg.layers,
                cfg.heads,
                cfg.mlp_ratio,
                act,
                BlockInit::Normal { attn_std, proj_std, fc_std },
            ),
            ln_final: LayerNorm::new(&p / "ln_final", width),
            text_projection: p.var("text_projection", &[width, embed_dim], randn(attn_std)),
        }
    }

    /// tokens: (B, L) int64 -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.token_embedding, tokens, -1, false, false);
        let x = &x + self.positional_embedding.to_kind(x.kind());
        let x = self.transformer.forward(&x, true);
        let x = self.ln_final.forward(&x);
        // Pool at the EOT token: the largest id of each row. A gather keeps it on the device.
        let b = x.size()[0];
        let eot = tokens.argmax(-1, false);
        let rows = Tensor::arange(b, (Kind::Int64, x.device()));
        let pooled = x.index(&[Some(rows), Some(eot)]);
        pooled.matmul(&self.text_projection)
    }
}
