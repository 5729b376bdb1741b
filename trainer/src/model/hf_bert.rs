//! transformers' BERT-family encoder, for `model_type` `roberta`, `xlm-roberta` and `bert`:
//! word, position and token-type embeddings summed and LayerNormed, then post-LN layers
//! (self-attention over the non-padding tokens, `LayerNorm(x + attn)`, `LayerNorm(x + mlp)`).
//! RoBERTa's positions start after the padding id and skip padding (transformers'
//! `create_position_ids_from_input_ids`); BERT's count from 0. Parameter names are
//! transformers' `XLMRobertaModel`'s (`embeddings.*`, `encoder.layer.N.*`, `pooler.dense`).

use serde_json::Value;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::config::Activation;
use super::hf_config::ConfigJson;
use super::params::param;
use super::transformer::{randn, LayerNorm, Linear};
use crate::error::Result;

/// How a BERT-family encoder numbers its positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// RoBERTa, XLM-R: `padding_idx + 1, padding_idx + 2, ...` over the non-padding tokens,
    /// `padding_idx` on padding.
    AfterPadding,
    /// BERT: `0, 1, 2, ...`.
    FromZero,
}

/// A BERT-family encoder's `config.json`: what its shapes and numerics depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct BertArch {
    pub positions: Positions,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub layers: i64,
    pub heads: i64,
    pub intermediate_size: i64,
    pub max_positions: i64,
    pub type_vocab_size: i64,
    pub pad_token_id: i64,
    pub layer_norm_eps: f64,
    pub act: Activation,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
}

impl BertArch {
    /// Keys the file lacks take transformers' `BertConfig` / `(XLM)RobertaConfig` defaults.
    pub fn from_json(json: &ConfigJson, positions: Positions) -> Result<BertArch> {
        if let Some(kind) =
            json.get("position_embedding_type").and_then(Value::as_str).filter(|&k| k != "absolute")
        {
            return Err(json.error(format!(
                "position_embedding_type {kind:?}: oxclip builds absolute position embeddings only"
            )));
        }
        let pad_default = if positions == Positions::AfterPadding { 1 } else { 0 };
        let arch = BertArch {
            positions,
            vocab_size: json.positive("vocab_size", 30522)?,
            hidden_size: json.positive("hidden_size", 768)?,
            layers: json.positive("num_hidden_layers", 12)?,
            heads: json.positive("num_attention_heads", 12)?,
            intermediate_size: json.positive("intermediate_size", 3072)?,
            max_positions: json.positive("max_position_embeddings", 512)?,
            type_vocab_size: json.positive("type_vocab_size", 2)?,
            pad_token_id: json.int("pad_token_id", pad_default)?,
            layer_norm_eps: json.eps("layer_norm_eps", 1e-12)?,
            act: json.activation("hidden_act", "gelu")?,
            hidden_dropout: json.probability("hidden_dropout_prob", 0.1)?,
            attention_dropout: json.probability("attention_probs_dropout_prob", 0.1)?,
        };
        json.divides("num_attention_heads", arch.heads, "hidden_size", arch.hidden_size)?;
        Ok(arch)
    }

    /// The longest caption, in tokens, the position table covers.
    pub fn max_context_length(&self) -> i64 {
        match self.positions {
            Positions::AfterPadding => self.max_positions - self.pad_token_id - 1,
            Positions::FromZero => self.max_positions,
        }
    }
}

#[derive(Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    out: Linear,
    out_norm: LayerNorm,
}

/// transformers' `nn.Linear` initialisation for these models: normal(0.02), zero bias.
pub(super) fn hf_linear(p: nn::Path, d_in: i64, d_out: i64) -> Linear {
    Linear::with_bias_init(p, d_in, d_out, randn(0.02), Init::Const(0.0))
}

impl BertLayer {
    fn new(p: nn::Path, a: &BertArch) -> Self {
        let (w, i) = (a.hidden_size, a.intermediate_size);
        let att = &p / "attention";
        BertLayer {
            query: hf_linear(&att / "self" / "query", w, w),
            key: hf_linear(&att / "self" / "key", w, w),
            value: hf_linear(&att / "self" / "value", w, w),
            attn_out: hf_linear(&att / "output" / "dense", w, w),
            attn_norm: LayerNorm::new(&att / "output" / "LayerNorm", w, a.layer_norm_eps),
            intermediate: hf_linear(&p / "intermediate" / "dense", w, i),
            out: hf_linear(&p / "output" / "dense", i, w),
            out_norm: LayerNorm::new(&p / "output" / "LayerNorm", w, a.layer_norm_eps),
        }
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, a: &BertArch, train: bool) -> Tensor {
        let ctx = attention(
            x,
            [&self.query, &self.key, &self.value],
            a.heads,
            mask,
            None,
            if train { a.attention_dropout } else { 0.0 },
        );
        let attended = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx).dropout(a.hidden_dropout, train) + x));
        let hidden = a.act.forward(&self.intermediate.forward(&attended));
        self.out_norm
            .forward(&(self.out.forward(&hidden).dropout(a.hidden_dropout, train) + attended))
    }
}

/// Multi-head self-attention of x (B, L, W) through separate q, k, v projections, before the
/// output projection: (B, L, heads * head width). `mask` is additive, (B, 1, 1, L) or
/// broadcastable to (B, H, L, L); `scale` None is 1/sqrt(head width).
pub(super) fn attention(
    x: &Tensor,
    [q, k, v]: [&Linear; 3],
    heads: i64,
    mask: &Tensor,
    scale: Option<f64>,
    dropout: f64,
) -> Tensor {
    let size = x.size();
    let (b, l) = (size[0], size[1]);
    let split = |t: Tensor| t.view([b, l, heads, -1]).transpose(1, 2);
    let (q, k, v) = (split(q.forward(x)), split(k.forward(x)), split(v.forward(x)));
    Tensor::scaled_dot_product_attention(
        &q,
        &k,
        &v,
        Some(mask.to_kind(q.kind())),
        dropout,
        false,
        scale,
        false,
    )
    .transpose(1, 2)
    .reshape([b, l, -1])
}

/// The BERT family's embeddings and layers, under `transformer.`.
#[derive(Debug)]
pub struct BertEncoder {
    pub arch: BertArch,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    layers: Vec<BertLayer>,
    /// transformers' `BertPooler` (`pooler.dense`, tanh), built under `cls_pooler` only:
    /// open_clip builds the model with `add_pooling_layer` only then.
    pub pooler: Option<Linear>,
}

impl BertEncoder {
    pub fn new(p: nn::Path, a: &BertArch, with_pooler: bool) -> Self {
        let e = &p / "embeddings";
        let w = a.hidden_size;
        let embedding = |name: &str, rows| param(&(&e / name), "weight", &[rows, w], randn(0.02));
        BertEncoder {
            arch: a.clone(),
            word: embedding("word_embeddings", a.vocab_size),
            position: embedding("position_embeddings", a.max_positions),
            token_type: embedding("token_type_embeddings", a.type_vocab_size),
            norm: LayerNorm::new(&e / "LayerNorm", w, a.layer_norm_eps),
            layers: (0..a.layers)
                .map(|i| BertLayer::new(&p / "encoder" / "layer" / i, a))
                .collect(),
            pooler: with_pooler.then(|| hf_linear(&p / "pooler" / "dense", w, w)),
        }
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// tokens (B, L) -> (B, L, W). The padding rows of both tables get no gradient, as
    /// transformers' `nn.Embedding(padding_idx=pad)`.
    pub fn embed(&self, tokens: &Tensor, train: bool) -> Tensor {
        let a = &self.arch;
        let pad = a.pad_token_id;
        let positions = match a.positions {
            Positions::AfterPadding => positions_after_padding(tokens, pad),
            Positions::FromZero => {
                Tensor::arange(tokens.size()[1], (Kind::Int64, tokens.device())).unsqueeze(0)
            }
        };
        let words = Tensor::embedding(&self.word, tokens, pad, false, false);
        let positions = Tensor::embedding(&self.position, &positions, pad, false, false);
        // Every caption is one segment: token type 0.
        let x = words + self.token_type.get(0) + positions;
        self.norm.forward(&x).dropout(a.hidden_dropout, train)
    }

    /// Layer `i` on x (B, L, W), attending to the tokens `attended` (B, L) marks.
    pub fn layer(&self, i: usize, x: &Tensor, attended: &Tensor, train: bool) -> Tensor {
        self.layers[i].forward(x, &additive_mask(attended, x.kind()), &self.arch, train)
    }
}

/// transformers' `create_position_ids_from_input_ids`: `pad + 1, pad + 2, ...` over the
/// tokens that are not `pad`, `pad` on those that are.
pub(super) fn positions_after_padding(tokens: &Tensor, pad: i64) -> Tensor {
    let on = tokens.ne(pad).to_kind(Kind::Int64);
    on.cumsum(1, Kind::Int64) * &on + pad
}

/// transformers' extended attention mask, (B, 1, 1, L) in `kind`: 0 where `attended`, the
/// kind's lowest value elsewhere.
pub(super) fn additive_mask(attended: &Tensor, kind: Kind) -> Tensor {
    let lowest = match kind {
        Kind::BFloat16 => -3.389_531_389_251_535e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    };
    let b = attended.size()[0];
    attended.logical_not().to_kind(kind).multiply_scalar(lowest).view([b, 1, 1, -1])
}
