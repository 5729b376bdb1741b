//! transformers' M2M-100 encoder (`model_type` `m2m_100`), the text side of NLLB: token
//! embeddings scaled by sqrt(width) (`scale_embedding`), fixed sinusoidal positions counted
//! as RoBERTa's (from after the padding id, skipping padding), pre-LN layers and a final
//! LayerNorm. open_clip takes the encoder of transformers' `M2M100Model`, so parameter names
//! are its `encoder.*`: `embed_tokens`, `layers.N.{self_attn,fc1,fc2,...}`, `layer_norm`.

use tch::nn;
use tch::{Kind, Tensor};

use super::config::Activation;
use super::hf_bert::{additive_mask, attention, hf_linear, positions_after_padding};
use super::hf_config::ConfigJson;
use super::params::param;
use super::transformer::{randn, LayerNorm, Linear};
use crate::error::Result;

/// An M2M-100 encoder's `config.json`: what its shapes and numerics depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct M2m100Arch {
    pub vocab_size: i64,
    pub d_model: i64,
    pub layers: i64,
    pub heads: i64,
    pub ffn_dim: i64,
    pub pad_token_id: i64,
    pub scale_embedding: bool,
    pub act: Activation,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation_dropout: f64,
    /// The probability of skipping each layer in training (`encoder_layerdrop`).
    pub layerdrop: f64,
}

impl M2m100Arch {
    /// Keys the file lacks take transformers' `M2M100Config` defaults.
    pub fn from_json(json: &ConfigJson) -> Result<M2m100Arch> {
        let arch = M2m100Arch {
            vocab_size: json.positive("vocab_size", 128112)?,
            d_model: json.positive("d_model", 1024)?,
            layers: json.positive("encoder_layers", 12)?,
            heads: json.positive("encoder_attention_heads", 16)?,
            ffn_dim: json.positive("encoder_ffn_dim", 4096)?,
            pad_token_id: json.int("pad_token_id", 1)?,
            scale_embedding: json.bool("scale_embedding", true)?,
            act: json.activation("activation_function", "relu")?,
            dropout: json.probability("dropout", 0.1)?,
            attention_dropout: json.probability("attention_dropout", 0.1)?,
            activation_dropout: json.probability("activation_dropout", 0.0)?,
            layerdrop: json.probability("encoder_layerdrop", 0.05)?,
        };
        json.divides("encoder_attention_heads", arch.heads, "d_model", arch.d_model)?;
        Ok(arch)
    }
}

#[derive(Debug)]
struct M2m100Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    attn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    final_norm: LayerNorm,
}

impl M2m100Layer {
    fn new(p: nn::Path, a: &M2m100Arch) -> Self {
        let (w, f) = (a.d_model, a.ffn_dim);
        let att = &p / "self_attn";
        M2m100Layer {
            q: hf_linear(&att / "q_proj", w, w),
            k: hf_linear(&att / "k_proj", w, w),
            v: hf_linear(&att / "v_proj", w, w),
            out: hf_linear(&att / "out_proj", w, w),
            attn_norm: LayerNorm::new(&p / "self_attn_layer_norm", w, 1e-5),
            fc1: hf_linear(&p / "fc1", w, f),
            fc2: hf_linear(&p / "fc2", f, w),
            final_norm: LayerNorm::new(&p / "final_layer_norm", w, 1e-5),
        }
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, a: &M2m100Arch, train: bool) -> Tensor {
        let h = self.attn_norm.forward(x);
        let dropout = if train { a.attention_dropout } else { 0.0 };
        let h = attention(&h, [&self.q, &self.k, &self.v], a.heads, mask, None, dropout);
        let x = x + self.out.forward(&h).dropout(a.dropout, train);
        let h = a.act.forward(&self.fc1.forward(&self.final_norm.forward(&x)));
        let h = self.fc2.forward(&h.dropout(a.activation_dropout, train));
        &x + h.dropout(a.dropout, train)
    }
}

/// The M2M-100 encoder, under `transformer.`.
#[derive(Debug)]
pub struct M2m100Encoder {
    pub arch: M2m100Arch,
    embed_tokens: Tensor,
    layers: Vec<M2m100Layer>,
    layer_norm: LayerNorm,
}

impl M2m100Encoder {
    pub fn new(p: nn::Path, a: &M2m100Arch) -> Self {
        M2m100Encoder {
            arch: a.clone(),
            embed_tokens: param(
                &(&p / "embed_tokens"),
                "weight",
                &[a.vocab_size, a.d_model],
                randn(0.02),
            ),
            layers: (0..a.layers).map(|i| M2m100Layer::new(&p / "layers" / i, a)).collect(),
            layer_norm: LayerNorm::new(&p / "layer_norm", a.d_model, 1e-5),
        }
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// tokens (B, L) -> (B, L, W): scaled token embeddings (no gradient into the padding
    /// row) plus the sinusoids of their positions.
    pub fn embed(&self, tokens: &Tensor, train: bool) -> Tensor {
        let a = &self.arch;
        let scale = if a.scale_embedding { (a.d_model as f64).sqrt() } else { 1.0 };
        let words =
            Tensor::embedding(&self.embed_tokens, tokens, a.pad_token_id, false, false) * scale;
        let positions = positions_after_padding(tokens, a.pad_token_id);
        let (b, l) = (tokens.size()[0], tokens.size()[1]);
        let table = sinusoids(a.pad_token_id + 1 + l, a.d_model, a.pad_token_id, tokens.device());
        let positions = table.index_select(0, &positions.view([-1])).view([b, l, a.d_model]);
        let x = &words + positions.to_kind(words.kind());
        x.dropout(a.dropout, train)
    }

    /// Layer `i` on x (B, L, W), attending to the tokens `attended` (B, L) marks; in
    /// training skipped with probability `encoder_layerdrop`, as transformers does.
    pub fn layer(&self, i: usize, x: &Tensor, attended: &Tensor, train: bool) -> Tensor {
        let a = &self.arch;
        let drawn = || Tensor::rand([], (Kind::Float, tch::Device::Cpu)).double_value(&[]);
        if train && a.layerdrop > 0.0 && drawn() < a.layerdrop {
            return x.shallow_clone();
        }
        self.layers[i].forward(x, &additive_mask(attended, x.kind()), a, train)
    }

    /// The encoder's final LayerNorm.
    pub fn finish(&self, x: &Tensor) -> Tensor {
        self.layer_norm.forward(x)
    }
}

/// transformers' `M2M100SinusoidalPositionalEmbedding.get_embedding`, float32: row p is
/// `[sin(p f_0), .., sin(p f_{h-1}), cos(p f_0), .., cos(p f_{h-1})]` with
/// `f_j = exp(-j ln(10000) / (h - 1))`, h = dim / 2 (a zero column for an odd dim), and the
/// padding row zero.
fn sinusoids(rows: i64, dim: i64, pad: i64, device: tch::Device) -> Tensor {
    let half = dim / 2;
    let step = (10000f64).ln() / (half - 1) as f64;
    let freqs = (Tensor::arange(half, (Kind::Int64, device)).to_kind(Kind::Float) * -step).exp();
    let angles = Tensor::arange(rows, (Kind::Int64, device)).to_kind(Kind::Float).unsqueeze(1)
        * freqs.unsqueeze(0);
    let mut table = Tensor::cat(&[angles.sin(), angles.cos()], 1);
    if dim % 2 == 1 {
        table = Tensor::cat(&[table, Tensor::zeros([rows, 1], (Kind::Float, device))], 1);
    }
    let keep =
        Tensor::arange(rows, (Kind::Int64, device)).ne(pad).to_kind(Kind::Float).unsqueeze(1);
    table * keep
}
