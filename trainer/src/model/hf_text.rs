//! Hugging Face text towers, as open_clip's `HFTextEncoder` wraps them (`text_cfg.hf_model_name`):
//! a transformers encoder under `text.transformer.` with transformers' own parameter names, a
//! pooler over its last hidden states, and open_clip's projection `text.proj`.
//!
//! One file per encoder: `hf_bert.rs` (RoBERTa, XLM-R, BERT), `hf_t5.rs` (mT5, T5) and
//! `hf_m2m100.rs` (NLLB's M2M-100). Here: which one a `config.json` describes, open_clip's
//! poolers and projections, and the tower over them.
//!
//! oxclip never downloads, so the encoder's sizes come from [`HfTextArch::resolve`]: a table of
//! the `config.json` of each text model open_clip's configs name, or the `config.json` of the
//! directory `hf_model_name` points at (as transformers' `AutoConfig.from_pretrained(path)`).

use std::path::Path;

use serde_json::Value;
use tch::nn;
use tch::Tensor;

use super::config::TextConfig;
use super::hf_bert::{BertArch, BertEncoder, Positions};
use super::hf_config::ConfigJson;
use super::hf_m2m100::{M2m100Arch, M2m100Encoder};
use super::hf_t5::{T5Arch, T5Encoder};
use super::params::param;
use super::staged;
use super::transformer::Linear;
use crate::error::{Result, TrainError};

/// The `config.json` of every text model open_clip 3.3's configs name, as the Hugging Face hub
/// holds it (the keys the encoder's shape and numerics depend on; the rest are transformers'
/// defaults). Names with and without the hub's newer organisation prefix.
const BUILTIN: &[(&[&str], &str)] = &[
    (
        &["roberta-base", "FacebookAI/roberta-base"],
        r#"{"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
            "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-05, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#,
    ),
    (
        &["xlm-roberta-base", "FacebookAI/xlm-roberta-base"],
        r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
            "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-05, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#,
    ),
    (
        &["xlm-roberta-large", "FacebookAI/xlm-roberta-large"],
        r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24,
            "num_attention_heads": 16, "intermediate_size": 4096, "max_position_embeddings": 514,
            "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-05, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#,
    ),
    (
        &["google/mt5-base"],
        r#"{"model_type": "mt5", "vocab_size": 250112, "d_model": 768, "d_kv": 64, "d_ff": 2048,
            "num_layers": 12, "num_heads": 12, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-06, "dropout_rate": 0.1, "pad_token_id": 0, "is_encoder_decoder": true}"#,
    ),
    (
        &["google/mt5-xl"],
        r#"{"model_type": "mt5", "vocab_size": 250112, "d_model": 2048, "d_kv": 64, "d_ff": 5120,
            "num_layers": 24, "num_heads": 32, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-06, "dropout_rate": 0.1, "pad_token_id": 0, "is_encoder_decoder": true}"#,
    ),
    (
        &["facebook/nllb-200-distilled-600M"],
        r#"{"model_type": "m2m_100", "vocab_size": 256206, "d_model": 1024, "encoder_layers": 12,
            "encoder_attention_heads": 16, "encoder_ffn_dim": 4096, "max_position_embeddings": 1024,
            "scale_embedding": true, "activation_function": "relu", "pad_token_id": 1, "dropout": 0.1,
            "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0, "is_encoder_decoder": true}"#,
    ),
    (
        &["facebook/nllb-200-distilled-1.3B"],
        r#"{"model_type": "m2m_100", "vocab_size": 256206, "d_model": 1024, "encoder_layers": 24,
            "encoder_attention_heads": 16, "encoder_ffn_dim": 8192, "max_position_embeddings": 1024,
            "scale_embedding": true, "activation_function": "relu", "pad_token_id": 1, "dropout": 0.1,
            "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0, "is_encoder_decoder": true}"#,
    ),
];

/// The text model names [`HfTextArch::resolve`] knows without a directory.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().flat_map(|(names, _)| names.iter().copied())
}

/// The encoder a Hugging Face text tower is built on, and its `model_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum HfTextArch {
    /// `roberta`, `xlm-roberta`, `bert`.
    Bert(String, BertArch),
    /// `mt5`, `t5`: the encoder of the encoder-decoder.
    T5(String, T5Arch),
    /// `m2m_100` (NLLB): the encoder of the encoder-decoder.
    M2m100(M2m100Arch),
}

impl HfTextArch {
    /// The encoder `hf_model_name` names: a built-in name, or a directory holding the text
    /// model's `config.json`.
    pub fn resolve(name: &str) -> Result<HfTextArch> {
        if let Some((_, json)) = BUILTIN.iter().find(|(names, _)| names.contains(&name)) {
            let value: Value = serde_json::from_str(json)
                .map_err(|e| TrainError::ModelConfig(format!("built-in config of {name}: {e}")))?;
            return Self::from_config_json(&value, name);
        }
        let file = Path::new(name).join("config.json");
        if !file.is_file() {
            return Err(TrainError::ModelConfig(format!(
                "text_cfg.hf_model_name {name:?} is neither a text model oxclip knows ({}) nor a directory \
                 holding a transformers config.json; oxclip never downloads: point hf_model_name at the \
                 text model's directory",
                builtin_names().collect::<Vec<_>>().join(", ")
            )));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| {
            TrainError::ModelConfig(format!(
                "text_cfg.hf_model_name: reading {}: {e}",
                file.display()
            ))
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            TrainError::ModelConfig(format!("{} is not valid JSON: {e}", file.display()))
        })?;
        Self::from_config_json(&value, &file.display().to_string())
    }

    /// A transformers `config.json` (already parsed); `origin` names it in errors. Keys it
    /// lacks take transformers' defaults for its `model_type`.
    pub fn from_config_json(json: &Value, origin: &str) -> Result<HfTextArch> {
        let json = ConfigJson::new(json.clone(), origin);
        let model_type =
            json.get("model_type").and_then(Value::as_str).unwrap_or_default().to_owned();
        let arch = match model_type.as_str() {
            "roberta" | "xlm-roberta" => {
                HfTextArch::Bert(model_type, BertArch::from_json(&json, Positions::AfterPadding)?)
            }
            "bert" => HfTextArch::Bert(model_type, BertArch::from_json(&json, Positions::FromZero)?),
            "mt5" => HfTextArch::T5(model_type, T5Arch::from_json(&json, true)?),
            "t5" => HfTextArch::T5(model_type, T5Arch::from_json(&json, false)?),
            "m2m_100" => HfTextArch::M2m100(M2m100Arch::from_json(&json)?),
            other => {
                return Err(json.error(format!(
                    "model_type {other:?} is not a text encoder oxclip builds (roberta, xlm-roberta, bert, mt5, t5, m2m_100)"
                )))
            }
        };
        if !(0..arch.vocab_size()).contains(&arch.pad_token_id()) {
            return Err(json.error(format!(
                "pad_token_id {} is outside the vocabulary (0..{})",
                arch.pad_token_id(),
                arch.vocab_size()
            )));
        }
        Ok(arch)
    }

    pub fn model_type(&self) -> &str {
        match self {
            HfTextArch::Bert(t, _) | HfTextArch::T5(t, _) => t,
            HfTextArch::M2m100(_) => "m2m_100",
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            HfTextArch::Bert(_, a) => a.vocab_size,
            HfTextArch::T5(_, a) => a.vocab_size,
            HfTextArch::M2m100(a) => a.vocab_size,
        }
    }

    /// The encoder's output width (transformers' `hidden_size` / `d_model`).
    pub fn width(&self) -> i64 {
        match self {
            HfTextArch::Bert(_, a) => a.hidden_size,
            HfTextArch::T5(_, a) => a.d_model,
            HfTextArch::M2m100(a) => a.d_model,
        }
    }

    pub fn layers(&self) -> i64 {
        match self {
            HfTextArch::Bert(_, a) => a.layers,
            HfTextArch::T5(_, a) => a.layers,
            HfTextArch::M2m100(a) => a.layers,
        }
    }

    pub fn heads(&self) -> i64 {
        match self {
            HfTextArch::Bert(_, a) => a.heads,
            HfTextArch::T5(_, a) => a.heads,
            HfTextArch::M2m100(a) => a.heads,
        }
    }

    /// The id the tokenizer pads with; every other token is attended to and pooled.
    pub fn pad_token_id(&self) -> i64 {
        match self {
            HfTextArch::Bert(_, a) => a.pad_token_id,
            HfTextArch::T5(_, a) => a.pad_token_id,
            HfTextArch::M2m100(a) => a.pad_token_id,
        }
    }

    /// The longest caption, in tokens, the encoder takes: BERT's position table is learned
    /// and ends; T5's relative positions and M2M-100's sinusoids go on.
    pub fn max_context_length(&self) -> Option<i64> {
        match self {
            HfTextArch::Bert(_, a) => Some(a.max_context_length()),
            HfTextArch::T5(..) | HfTextArch::M2m100(_) => None,
        }
    }

    /// Whether training draws random numbers (dropout, layer drop) in the encoder.
    pub fn draws(&self) -> bool {
        match self {
            HfTextArch::Bert(_, a) => a.hidden_dropout > 0.0 || a.attention_dropout > 0.0,
            HfTextArch::T5(_, a) => a.dropout > 0.0,
            HfTextArch::M2m100(a) => {
                [a.dropout, a.attention_dropout, a.activation_dropout, a.layerdrop]
                    .iter()
                    .any(|&p| p > 0.0)
            }
        }
    }

    /// The encoder's parameter groups for `lock_text`, first to last, as open_clip's
    /// `HFTextEncoder.lock` takes them: the token embeddings, then each layer (its
    /// `token_embeddings_attr` and `layer_attr`). Prefixes relative to the tower's
    /// `transformer.`. open_clip 3.3 names no groups for M2M-100 (its partial lock fails
    /// there); these are the same rule's.
    pub fn lock_groups(&self) -> Vec<String> {
        let (embeddings, layers) = match self {
            HfTextArch::Bert(..) => ("embeddings", "encoder.layer"),
            HfTextArch::T5(..) => ("embed_tokens", "block"),
            HfTextArch::M2m100(_) => ("embed_tokens", "layers"),
        };
        std::iter::once(embeddings.to_owned())
            .chain((0..self.layers()).map(|i| format!("{layers}.{i}")))
            .collect()
    }
}

/// open_clip's registered poolers (`text_cfg.hf_pooler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfPooler {
    /// The mean of the non-padding tokens' last hidden states.
    Mean,
    /// The largest value of each channel over the non-padding tokens.
    Max,
    /// transformers' own pooler (BERT's `tanh(dense(h_0))`) where the encoder has one, else
    /// the first token's hidden state.
    Cls,
    /// The first token's last hidden state.
    ClsLastHiddenState,
}

impl HfPooler {
    pub fn parse(name: &str) -> Result<HfPooler> {
        match name {
            "mean_pooler" => Ok(HfPooler::Mean),
            "max_pooler" => Ok(HfPooler::Max),
            "cls_pooler" => Ok(HfPooler::Cls),
            "cls_last_hidden_state_pooler" => Ok(HfPooler::ClsLastHiddenState),
            other => Err(TrainError::ModelConfig(format!(
                "text_cfg.hf_pooler_type must be one of open_clip's poolers (mean_pooler, max_pooler, \
                 cls_pooler, cls_last_hidden_state_pooler), got {other:?}"
            ))),
        }
    }
}

/// open_clip's `text.proj` (`text_cfg.hf_proj_type`), bias-free as open_clip builds it.
#[derive(Debug)]
pub enum HfProj {
    /// `nn.Linear(width, embed_dim)`: `proj.weight`.
    Linear(Tensor),
    /// `Linear(width, (width + embed_dim) / 2)`, exact GELU, `Linear(.., embed_dim)`:
    /// `proj.0.weight`, `proj.2.weight`.
    Mlp(Tensor, Tensor),
}

/// Checks `hf_proj_type` and `hf_pooler_type` and resolves the encoder.
pub fn check(cfg: &TextConfig) -> Result<HfTextArch> {
    let name = cfg.hf_model_name.as_deref().unwrap_or_default();
    let arch = HfTextArch::resolve(name)?;
    HfPooler::parse(&cfg.hf_pooler_type)?;
    if !["linear", "mlp"].contains(&cfg.hf_proj_type.as_str()) {
        return Err(TrainError::ModelConfig(format!(
            "text_cfg.hf_proj_type must be \"linear\" or \"mlp\" (open_clip's projections), got {:?}",
            cfg.hf_proj_type
        )));
    }
    if let Some(max) = arch.max_context_length().filter(|&max| cfg.context_length > max) {
        return Err(TrainError::ModelConfig(format!(
            "text_cfg.context_length {} is longer than {name}'s position table allows ({max} tokens)",
            cfg.context_length
        )));
    }
    Ok(arch)
}

/// The encoder of [`HfTextArch`], built.
#[derive(Debug)]
enum Encoder {
    Bert(BertEncoder),
    T5(T5Encoder),
    M2m100(M2m100Encoder),
}

impl Encoder {
    fn layer_count(&self) -> usize {
        match self {
            Encoder::Bert(e) => e.layer_count(),
            Encoder::T5(e) => e.layer_count(),
            Encoder::M2m100(e) => e.layer_count(),
        }
    }

    fn embed(&self, tokens: &Tensor, train: bool) -> Tensor {
        match self {
            Encoder::Bert(e) => e.embed(tokens, train),
            Encoder::T5(e) => e.embed(tokens, train),
            Encoder::M2m100(e) => e.embed(tokens, train),
        }
    }

    fn layer(&self, i: usize, x: &Tensor, attended: &Tensor, train: bool) -> Tensor {
        match self {
            Encoder::Bert(e) => e.layer(i, x, attended, train),
            Encoder::T5(e) => e.layer(i, x, attended, train),
            Encoder::M2m100(e) => e.layer(i, x, attended, train),
        }
    }

    /// The last hidden state from the last layer's output: the final norm of the pre-norm
    /// encoders.
    fn last_hidden_state(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Encoder::Bert(_) => x.shallow_clone(),
            Encoder::T5(e) => e.finish(x, train),
            Encoder::M2m100(e) => e.finish(x),
        }
    }

    /// transformers' pooler output, where the encoder has a pooler layer.
    fn pooler(&self) -> Option<&Linear> {
        match self {
            Encoder::Bert(e) => e.pooler.as_ref(),
            Encoder::T5(_) | Encoder::M2m100(_) => None,
        }
    }
}

/// open_clip's `HFTextEncoder`: the encoder, its pooler and `proj`.
#[derive(Debug)]
pub struct HfText {
    arch: HfTextArch,
    encoder: Encoder,
    pooler: HfPooler,
    proj: HfProj,
}

impl HfText {
    /// Variables under `p` (`text.` in open_clip's `CustomTextCLIP`).
    pub fn new(p: nn::Path, cfg: &TextConfig, embed_dim: i64) -> Result<Self> {
        let arch = check(cfg)?;
        let pooler = HfPooler::parse(&cfg.hf_pooler_type)?;
        let t = &p / "transformer";
        let encoder = match &arch {
            HfTextArch::Bert(_, a) => {
                Encoder::Bert(BertEncoder::new(t, a, pooler == HfPooler::Cls))
            }
            HfTextArch::T5(_, a) => Encoder::T5(T5Encoder::new(t, a)),
            HfTextArch::M2m100(a) => Encoder::M2m100(M2m100Encoder::new(t, a)),
        };
        let width = arch.width();
        // nn.Linear's default initialisation, as open_clip leaves it.
        let linear = |p: nn::Path, d_in: i64, d_out| {
            param(&p, "weight", &[d_out, d_in], Linear::default_init(d_in))
        };
        let proj = match cfg.hf_proj_type.as_str() {
            "linear" => HfProj::Linear(linear(&p / "proj", width, embed_dim)),
            _ => {
                let hidden = (width + embed_dim) / 2;
                HfProj::Mlp(
                    linear(&p / "proj" / 0, width, hidden),
                    linear(&p / "proj" / 2, hidden, embed_dim),
                )
            }
        };
        Ok(HfText { arch, encoder, pooler, proj })
    }

    /// Whether a training forward draws random numbers (the encoder's dropouts).
    pub fn draws(&self) -> bool {
        self.arch.draws()
    }

    /// tokens: (B, L) int64 -> (B, embed_dim), not L2-normalised.
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Tensor {
        staged::fold(self.stage_count(), tokens, |i, x| self.stage(i, x, tokens, train))
    }

    /// The stages of [`HfText::forward`]: the embeddings, each layer, then the final norm (if
    /// any), the pooler and the projection.
    pub fn stage_count(&self) -> usize {
        self.encoder.layer_count() + 2
    }

    /// Stage `i` on its input `x`: the token ids for the first, (B, L, W) after it; which
    /// tokens are padding (`pad_token_id`, open_clip's attention mask) comes from `tokens`.
    pub fn stage(&self, i: usize, x: &Tensor, tokens: &Tensor, train: bool) -> Tensor {
        if i == 0 {
            return self.encoder.embed(x, train);
        }
        if i <= self.encoder.layer_count() {
            let attended = tokens.ne(self.arch.pad_token_id());
            return self.encoder.layer(i - 1, x, &attended, train);
        }
        self.head_with_tokens(x, tokens, train).0
    }

    /// The last stage's output and the tokens CoCa's decoder reads: the last hidden state
    /// (B, L, W), without the first token's row under `cls_pooler` (open_clip's HFTextEncoder
    /// drops the row its ClsPooler reads).
    pub fn head_with_tokens(&self, x: &Tensor, tokens: &Tensor, train: bool) -> (Tensor, Tensor) {
        let attended = tokens.ne(self.arch.pad_token_id());
        let hidden = self.encoder.last_hidden_state(x, train);
        let pooled = self.pool(&hidden, &attended);
        let projected = match &self.proj {
            HfProj::Linear(w) => pooled.linear::<Tensor>(w, None),
            HfProj::Mlp(w0, w2) => {
                pooled.linear::<Tensor>(w0, None).gelu("none").linear::<Tensor>(w2, None)
            }
        };
        let rows = match self.pooler {
            HfPooler::Cls => hidden.narrow(1, 1, hidden.size()[1] - 1),
            _ => hidden,
        };
        (projected, rows)
    }

    /// The padding id the encoder masks (`pad_token_id`).
    pub fn pad_token_id(&self) -> i64 {
        self.arch.pad_token_id()
    }

    /// The longest caption, in tokens, the encoder takes (`None`: no limit).
    pub fn max_tokens(&self) -> Option<i64> {
        self.arch.max_context_length()
    }

    /// The encoder's width: that of the tokens [`HfText::head_with_tokens`] gives.
    pub fn width(&self) -> i64 {
        self.arch.width()
    }

    /// (B, L, W) -> (B, W), over the tokens `attended` (B, L) marks.
    fn pool(&self, x: &Tensor, attended: &Tensor) -> Tensor {
        match self.pooler {
            HfPooler::Mean => {
                let mask = attended.to_kind(x.kind()).unsqueeze(-1);
                (x * &mask).sum_dim_intlist(1, false, x.kind())
                    / mask.sum_dim_intlist(1, false, x.kind())
            }
            // open_clip 3.3's MaxPooler fills with an integer mask, which PyTorch refuses (it
            // cannot run); this is the pooling it means: the maximum over the caption's tokens.
            HfPooler::Max => x
                .masked_fill(&attended.logical_not().unsqueeze(-1), f64::NEG_INFINITY)
                .amax(1, false),
            HfPooler::Cls => {
                let first = x.select(1, 0);
                match self.encoder.pooler() {
                    Some(dense) => dense.forward(&first).tanh(),
                    None => first,
                }
            }
            HfPooler::ClsLastHiddenState => x.select(1, 0),
        }
    }
}
