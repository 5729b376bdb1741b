//! transformers' T5 encoder (`model_type` `t5`, `mt5`), as open_clip takes it from
//! `MT5Model`: unscaled token embeddings, pre-norm blocks with T5's RMS LayerNorm (no mean,
//! no bias), attention without the 1/sqrt(d) scale plus a learned bias per head and
//! relative-position bucket (block 0's table, shared by every block), a gated-GELU (mT5) or
//! ReLU MLP, and a final norm. Parameter names are its `encoder.*`: `embed_tokens`,
//! `block.N.layer.0.SelfAttention.{q,k,v,o}`, `block.N.layer.1.DenseReluDense.*`,
//! `final_layer_norm`.

use serde_json::Value;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::config::Activation;
use super::hf_bert::additive_mask;
use super::hf_config::{activation, ConfigJson};
use super::params::param;
use super::transformer::randn;

use crate::error::Result;

/// A T5 encoder's `config.json`: what its shapes and numerics depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Arch {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub layers: i64,
    pub heads: i64,
    pub buckets: i64,
    pub max_distance: i64,
    pub eps: f64,
    /// `feed_forward_proj: gated-gelu` (mT5): `wi_0`, `wi_1`; else one `wi`.
    pub gated: bool,
    pub act: Activation,
    pub dropout: f64,
    pub pad_token_id: i64,
}

impl T5Arch {
    /// Keys the file lacks take transformers' `MT5Config` / `T5Config` defaults.
    pub fn from_json(json: &ConfigJson, mt5: bool) -> Result<T5Arch> {
        let proj = json.get("feed_forward_proj").and_then(Value::as_str).unwrap_or(if mt5 {
            "gated-gelu"
        } else {
            "relu"
        });
        // transformers' rule: "gated-ACT" or "ACT", and gated-gelu means the tanh GELU.
        let (gated, act_name) = match proj.strip_prefix("gated-") {
            Some(act) => (true, act),
            None => (false, proj),
        };
        let act_name = if act_name == "gelu" && gated { "gelu_new" } else { act_name };
        let act = activation(act_name).ok_or_else(|| {
            json.error(format!(
                "feed_forward_proj {proj:?}: its activation is not one oxclip builds \
                 (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, relu; gated or not)"
            ))
        })?;
        let arch = T5Arch {
            vocab_size: json.positive("vocab_size", if mt5 { 250112 } else { 32128 })?,
            d_model: json.positive("d_model", 512)?,
            d_kv: json.positive("d_kv", 64)?,
            d_ff: json.positive("d_ff", if mt5 { 1024 } else { 2048 })?,
            layers: json.positive("num_layers", if mt5 { 8 } else { 6 })?,
            heads: json.positive("num_heads", if mt5 { 6 } else { 8 })?,
            buckets: json.positive("relative_attention_num_buckets", 32)?,
            max_distance: json.positive("relative_attention_max_distance", 128)?,
            eps: json.eps("layer_norm_epsilon", 1e-6)?,
            gated,
            act,
            dropout: json.probability("dropout_rate", 0.1)?,
            pad_token_id: json.int("pad_token_id", 0)?,
        };
        Ok(arch)
    }
}

/// T5's LayerNorm: `weight * x / sqrt(mean(x^2) + eps)`, the mean in float32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: param(&p, "weight", &[dim], Init::Const(1.0)), eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let variance = x.to_kind(Kind::Float).square().mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(self.weight.kind())
    }
}

/// A bias-free Linear, normal(`std`) as transformers' T5 initialises it.
fn linear(p: &nn::Path, d_in: i64, d_out: i64, std: f64) -> Tensor {
    param(p, "weight", &[d_out, d_in], randn(std))
}

#[derive(Debug)]
struct T5Block {
    attn_norm: RmsNorm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ff_norm: RmsNorm,
    /// `wi` (ungated) or `wi_0` (gated, through the activation) ...
    wi: Tensor,
    /// ... times `wi_1` (gated only).
    wi_gate: Option<Tensor>,
    wo: Tensor,
}

impl T5Block {
    fn new(p: nn::Path, a: &T5Arch) -> Self {
        let inner = a.heads * a.d_kv;
        let att = &p / "layer" / 0;
        let sa = &att / "SelfAttention";
        let ff = &p / "layer" / 1;
        let dense = &ff / "DenseReluDense";
        // transformers' T5 `_init_weights`: factor 1.0.
        let (dm, kv) = (a.d_model as f64, a.d_kv as f64);
        let (wi, wi_gate) = if a.gated {
            (
                linear(&(&dense / "wi_0"), a.d_model, a.d_ff, dm.powf(-0.5)),
                Some(linear(&(&dense / "wi_1"), a.d_model, a.d_ff, dm.powf(-0.5))),
            )
        } else {
            (linear(&(&dense / "wi"), a.d_model, a.d_ff, dm.powf(-0.5)), None)
        };
        T5Block {
            attn_norm: RmsNorm::new(&att / "layer_norm", a.d_model, a.eps),
            q: linear(&(&sa / "q"), a.d_model, inner, (dm * kv).powf(-0.5)),
            k: linear(&(&sa / "k"), a.d_model, inner, dm.powf(-0.5)),
            v: linear(&(&sa / "v"), a.d_model, inner, dm.powf(-0.5)),
            o: linear(&(&sa / "o"), inner, a.d_model, (inner as f64).powf(-0.5)),
            ff_norm: RmsNorm::new(&ff / "layer_norm", a.d_model, a.eps),
            wi,
            wi_gate,
            wo: linear(&(&dense / "wo"), a.d_ff, a.d_model, (a.d_ff as f64).powf(-0.5)),
        }
    }

    /// `bias`: (B or 1, H, L, L), the position bias plus the padding mask.
    fn forward(&self, x: &Tensor, bias: &Tensor, a: &T5Arch, train: bool) -> Tensor {
        let size = x.size();
        let (b, l) = (size[0], size[1]);
        let h = self.attn_norm.forward(x);
        let split =
            |w: &Tensor| h.linear::<Tensor>(w, None).view([b, l, a.heads, a.d_kv]).transpose(1, 2);
        let (q, k, v) = (split(&self.q), split(&self.k), split(&self.v));
        let dropout = if train { a.dropout } else { 0.0 };
        // T5 does not scale the scores.
        let ctx = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(bias.to_kind(q.kind())),
            dropout,
            false,
            Some(1.0),
            false,
        )
        .transpose(1, 2)
        .reshape([b, l, a.heads * a.d_kv]);
        let x = x + ctx.linear::<Tensor>(&self.o, None).dropout(a.dropout, train);
        let h = self.ff_norm.forward(&x);
        let hidden = a.act.forward(&h.linear::<Tensor>(&self.wi, None));
        let hidden = match &self.wi_gate {
            Some(gate) => hidden * h.linear::<Tensor>(gate, None),
            None => hidden,
        };
        let out = hidden.dropout(a.dropout, train).linear::<Tensor>(&self.wo, None);
        &x + out.dropout(a.dropout, train)
    }
}

/// The T5 encoder, under `transformer.`.
#[derive(Debug)]
pub struct T5Encoder {
    pub arch: T5Arch,
    embed_tokens: Tensor,
    /// (buckets, heads): block 0's `relative_attention_bias`, which every block uses.
    relative_bias: Tensor,
    blocks: Vec<T5Block>,
    final_norm: RmsNorm,
}

impl T5Encoder {
    pub fn new(p: nn::Path, a: &T5Arch) -> Self {
        let bias_path =
            &p / "block" / 0 / "layer" / 0 / "SelfAttention" / "relative_attention_bias";
        T5Encoder {
            arch: a.clone(),
            embed_tokens: param(
                &(&p / "embed_tokens"),
                "weight",
                &[a.vocab_size, a.d_model],
                randn(1.0),
            ),
            relative_bias: param(
                &bias_path,
                "weight",
                &[a.buckets, a.heads],
                randn((a.d_model as f64).powf(-0.5)),
            ),
            blocks: (0..a.layers).map(|i| T5Block::new(&p / "block" / i, a)).collect(),
            final_norm: RmsNorm::new(&p / "final_layer_norm", a.d_model, a.eps),
        }
    }

    pub fn layer_count(&self) -> usize {
        self.blocks.len()
    }

    /// tokens (B, L) -> (B, L, W).
    pub fn embed(&self, tokens: &Tensor, train: bool) -> Tensor {
        Tensor::embedding(&self.embed_tokens, tokens, -1, false, false)
            .dropout(self.arch.dropout, train)
    }

    /// Block `i` on x (B, L, W), attending to the tokens `attended` (B, L) marks.
    pub fn layer(&self, i: usize, x: &Tensor, attended: &Tensor, train: bool) -> Tensor {
        let l = x.size()[1];
        let bias =
            self.position_bias(l, x.device()).to_kind(x.kind()) + additive_mask(attended, x.kind());
        self.blocks[i].forward(x, &bias, &self.arch, train)
    }

    /// The final norm (and transformers' dropout after it).
    pub fn finish(&self, x: &Tensor, train: bool) -> Tensor {
        self.final_norm.forward(x).dropout(self.arch.dropout, train)
    }

    /// (1, H, L, L): the learned bias of each key's offset from the query, by T5's buckets.
    fn position_bias(&self, l: i64, device: tch::Device) -> Tensor {
        let positions = Tensor::arange(l, (Kind::Int64, device));
        let relative = positions.unsqueeze(0) - positions.unsqueeze(1);
        let buckets = relative_buckets(&relative, self.arch.buckets, self.arch.max_distance);
        Tensor::embedding(&self.relative_bias, &buckets, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }
}

/// transformers' bidirectional `_relative_position_bucket`: half the buckets for keys after
/// the query; within each half, exact offsets below a quarter of the buckets, then
/// log-spaced up to `max_distance`.
fn relative_buckets(relative: &Tensor, buckets: i64, max_distance: i64) -> Tensor {
    let half = buckets / 2;
    let side = relative.gt(0).to_kind(Kind::Int64) * half;
    let distance = relative.abs();
    let exact = half / 2;
    let large = (distance.to_kind(Kind::Float) / exact as f64).log()
        / ((max_distance as f64) / exact as f64).ln()
        * (half - exact) as f64;
    let large = (large.to_kind(Kind::Int64) + exact).clamp_max(half - 1);
    side + distance.where_self(&distance.lt(exact), &large)
}
