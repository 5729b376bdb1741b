//! What CoCa adds to CLIP (open_clip's `coca_model.py`): the attentional pooler its ViT may end
//! in, and the text decoder that captions an image from the image tower's tokens and the text
//! tower's, scored by a cross-entropy over the next token beside the contrastive loss.
//!
//! The towers hand their tokens on through `head_with_tokens` (`vision.rs`, `text.rs`,
//! `hf_text.rs`); the model (`mod.rs`) joins them here.

use tch::nn::{self, Init};
use tch::{Kind, Reduction, Tensor};

use super::config::{Activation, MultimodalConfig};
use super::params::param;
use super::transformer::{
    attend, BlockInit, BlockSpec, LayerNorm, Linear, ResidualBlock, Transformer,
};
use super::Clip;
use crate::error::{Result, TrainError};
use crate::generate::{generate, GenerateOptions, Strategy};

/// open_clip's `AttentionalPooler`: `n_queries` learned queries attend to the ViT's tokens
/// through an `nn.MultiheadAttention(d_model, heads, kdim = vdim = context width)`.
#[derive(Debug)]
pub struct AttentionalPooler {
    /// (n_queries, d_model)
    pub query: Tensor,
    pub attn: KvAttention,
    pub ln_q: LayerNorm,
    pub ln_k: LayerNorm,
}

impl AttentionalPooler {
    /// Under `p` (`visual.attn_pool`); its LayerNorms keep PyTorch's eps whatever the tower's
    /// `norm_kwargs`, as open_clip builds them.
    pub fn new(p: nn::Path, d_model: i64, context_dim: i64, heads: i64, n_queries: i64) -> Self {
        AttentionalPooler {
            query: param(&p, "query", &[n_queries, d_model], Init::Randn { mean: 0.0, stdev: 1.0 }),
            attn: KvAttention::new(&p / "attn", d_model, context_dim, heads),
            ln_q: LayerNorm::new(&p / "ln_q", d_model, 1e-5),
            ln_k: LayerNorm::new(&p / "ln_k", context_dim, 1e-5),
        }
    }

    /// x: (B, L, context_dim) -> (B, n_queries, d_model).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.ln_k.forward(x);
        let q = self.ln_q.forward(&self.query.to_kind(x.kind()));
        let b = x.size()[0];
        self.attn.forward(&q.unsqueeze(0).expand([b, -1, -1], false), &x)
    }
}

/// `nn.MultiheadAttention` whose keys and values come from another width (`kdim`, `vdim`):
/// PyTorch then keeps `q_proj_weight`, `k_proj_weight`, `v_proj_weight`; at one width it keeps
/// the fused `in_proj_weight`. Either way one `in_proj_bias`.
#[derive(Debug)]
pub struct KvAttention {
    pub proj: QkvProj,
    pub in_proj_bias: Tensor,
    pub out_proj: Linear,
    heads: i64,
}

#[derive(Debug)]
pub enum QkvProj {
    /// (3 d, d)
    Fused(Tensor),
    /// (d, d), (d, kdim), (d, vdim)
    Separate { q: Tensor, k: Tensor, v: Tensor },
}

impl KvAttention {
    fn new(p: nn::Path, d_model: i64, context_dim: i64, heads: i64) -> Self {
        // nn.MultiheadAttention._reset_parameters: xavier_uniform on each projection.
        let xavier = |rows: i64, cols: i64| {
            let bound = (6.0 / (rows + cols) as f64).sqrt();
            Init::Uniform { lo: -bound, up: bound }
        };
        let proj = if context_dim == d_model {
            QkvProj::Fused(param(
                &p,
                "in_proj_weight",
                &[3 * d_model, d_model],
                xavier(3 * d_model, d_model),
            ))
        } else {
            QkvProj::Separate {
                q: param(&p, "q_proj_weight", &[d_model, d_model], xavier(d_model, d_model)),
                k: param(
                    &p,
                    "k_proj_weight",
                    &[d_model, context_dim],
                    xavier(d_model, context_dim),
                ),
                v: param(
                    &p,
                    "v_proj_weight",
                    &[d_model, context_dim],
                    xavier(d_model, context_dim),
                ),
            }
        };
        KvAttention {
            proj,
            in_proj_bias: param(&p, "in_proj_bias", &[3 * d_model], Init::Const(0.0)),
            out_proj: Linear::with_bias_init(
                &p / "out_proj",
                d_model,
                d_model,
                Linear::default_init(d_model),
                Init::Const(0.0),
            ),
            heads,
        }
    }

    /// queries (B, Q, d), context (B, L, kdim) -> (B, Q, d).
    fn forward(&self, queries: &Tensor, context: &Tensor) -> Tensor {
        let d = queries.size()[2];
        let biases = self.in_proj_bias.split(d, 0);
        let (wq, wk, wv) = match &self.proj {
            QkvProj::Fused(w) => {
                let w = w.split(d, 0);
                (w[0].shallow_clone(), w[1].shallow_clone(), w[2].shallow_clone())
            }
            QkvProj::Separate { q, k, v } => {
                (q.shallow_clone(), k.shallow_clone(), v.shallow_clone())
            }
        };
        let out = attend(
            &queries.linear(&wq, Some(&biases[0])),
            &context.linear(&wk, Some(&biases[1])),
            &context.linear(&wv, Some(&biases[2])),
            self.heads,
        );
        self.out_proj.forward(&out)
    }
}

/// open_clip's `MultimodalTransformer` under `text_decoder.`: per layer a causal self-attention
/// block over the caption's tokens (`resblocks.<i>`) and a block cross-attending to the image
/// tokens (`cross_attn.<i>`), then `ln_final` and `text_projection` onto the vocabulary.
#[derive(Debug)]
pub struct TextDecoder {
    pub transformer: Transformer,
    pub cross_attn: Vec<ResidualBlock>,
    pub ln_final: LayerNorm,
    /// (width, vocab)
    pub text_projection: Tensor,
}

impl TextDecoder {
    /// Blocks at PyTorch's default initialisation, as open_clip leaves them (its
    /// `MultimodalTransformer.init_parameters` is never called); `text_projection`, which open_clip
    /// leaves uninitialised memory, is drawn from N(0, width^-1/2) as that method means.
    pub fn new(p: nn::Path, cfg: &MultimodalConfig, vocab: i64, act: Activation) -> Self {
        let spec = BlockSpec {
            width: cfg.width,
            heads: cfg.heads,
            mlp_ratio: cfg.mlp_ratio,
            act,
            eps: 1e-5,
            ls_init_value: cfg.ls_init_value,
            init: BlockInit::PyTorchDefault,
        };
        let cross = &p / "cross_attn";
        TextDecoder {
            transformer: Transformer::new(p.clone(), cfg.layers, spec),
            cross_attn: (0..cfg.layers)
                .map(|i| ResidualBlock::new_cross(&cross / i, spec))
                .collect(),
            ln_final: LayerNorm::new(&p / "ln_final", cfg.width, 1e-5),
            text_projection: param(
                &p,
                "text_projection",
                &[cfg.width, vocab],
                Init::Randn { mean: 0.0, stdev: (cfg.width as f64).powf(-0.5) },
            ),
        }
    }

    /// image_tokens (B, M, W), text_tokens (B, L, W) -> next-token logits (B, L, vocab).
    pub fn forward(&self, image_tokens: &Tensor, text_tokens: &Tensor) -> Tensor {
        let mut x = text_tokens.shallow_clone();
        for (block, cross) in self.transformer.resblocks.iter().zip(&self.cross_attn) {
            x = block.forward(&x, true);
            x = cross.forward_cross(&x, image_tokens);
        }
        self.ln_final.forward(&x).matmul(&self.text_projection)
    }
}

/// The captioning loss's numerator: the summed cross-entropy (fp32) of `logits` (B, L, V)
/// against `labels` (B, L) over the labels that are not `pad_id`. Divided by their count over
/// the whole batch it is open_clip's `CrossEntropyLoss(ignore_index=pad_id)`; the step divides by
/// the global count, so the loss is the same however the batch is split.
pub fn caption_nll_sum(logits: &Tensor, labels: &Tensor, pad_id: i64) -> Tensor {
    let v = logits.size()[2];
    logits.to_kind(Kind::Float).reshape([-1, v]).cross_entropy_loss::<Tensor>(
        &labels.reshape([-1]),
        None,
        Reduction::Sum,
        pad_id,
        0.0,
    )
}

/// How many labels of `tokens` (B, L) the caption loss scores: those after the first position
/// that are not padding.
pub fn caption_label_count(tokens: &Tensor, pad_id: i64) -> Tensor {
    let l = tokens.size()[1];
    tokens.narrow(1, 1, (l - 1).max(0)).ne(pad_id).sum(Kind::Float)
}

/// Captions for `images` (B, 3, S, S), normalised as the model expects, by open_clip's
/// `CoCa.generate` search (`generate.rs`): each image is encoded once, and every step runs the
/// text tower and the decoder over the sequences so far. The model should be in eval mode.
pub fn caption(model: &Clip, images: &Tensor, opts: &GenerateOptions) -> Result<Vec<Vec<i64>>> {
    // The model reads a caption but its last token; sampling reads the last max_seq_len.
    let read = match opts.strategy {
        Strategy::BeamSearch { .. } => opts.seq_len.saturating_sub(1),
        Strategy::TopK { .. } | Strategy::TopP { .. } => {
            opts.seq_len.saturating_sub(1).min(opts.max_seq_len)
        }
    };
    if let Some(max) = model.text.max_tokens().filter(|&max| read as i64 > max) {
        return Err(TrainError::Input(format!(
            "captions of up to {} tokens have the text tower read {read}, but it reads at most {max} \
             (its context length): ask for at most {} tokens (--seq-len)",
            opts.seq_len,
            max + 1
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let (_, image_tokens) = model.encode_image_tokens(images);
    let device = image_tokens.device();
    let batch = images.size()[0] as usize;
    generate(batch, opts, |rows, ids| {
        let context = image_tokens.index_select(0, &rows.to_device(device));
        model.next_token_logits(&context, &ids.to_device(device))
    })
}
