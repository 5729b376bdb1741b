//! Model configs in open_clip's JSON schema (`model_configs/*.json`, `open_clip_config.json`'s
//! `model_cfg`): the same keys, the same defaults (open_clip's `CLIPVisionCfg` /
//! `CLIPTextCfg`), so an open_clip JSON is a valid config as is and ours load into open_clip.
//! Keys open_clip has that oxclip does not build yet parse, and `validate` names them.

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Result, TrainError};

/// A CLIP model: two towers projected into a shared embedding space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the shared image-text embedding space.
    pub embed_dim: i64,
    /// `x * sigmoid(1.702 x)` instead of GELU, as the OpenAI-trained weights use. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub quick_gelu: bool,
    /// Starting `logit_scale` (the log of the scale); default ln(1/0.07), or ln 10 when the
    /// run trains with `loss.kind: siglip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_scale: Option<f64>,
    /// Gives the model a learnable `logit_bias` starting here (SigLIP models: -10). Without it
    /// the model has none, as open_clip's CLIP models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_logit_bias: Option<f64>,
    /// open_clip's `CustomTextCLIP`: the text tower's parameters live under `text.` instead of
    /// the model's root (every SigLIP config sets it).
    #[serde(default, skip_serializing_if = "is_false")]
    pub custom_text: bool,
    pub vision_cfg: VisionConfig,
    pub text_cfg: TextConfig,
    /// CoCa's captioning decoder (open_clip's `MultimodalCfg`): a model with one is a CoCa,
    /// trained with `loss.kind: coca` and captioning with `oxclip caption`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multimodal_cfg: Option<MultimodalConfig>,
}

/// CoCa's text decoder (open_clip's `MultimodalCfg`, a `CLIPTextCfg` with a few more keys):
/// `layers` causal self-attention blocks, each followed by a block that cross-attends to the
/// image tokens, then ln_final and a projection onto the text tower's vocabulary
/// (`text_cfg.vocab_size`: open_clip sizes the decoder's output by the text config, not by
/// this one's `vocab_size`). It has no positions of its own: the text tower's tokens carry them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultimodalConfig {
    /// The longest caption the decoder's causal mask covers (open_clip slices a mask this
    /// long; oxclip's causal attention has no table, so longer sequences are not refused).
    #[serde(default = "default_context_length")]
    pub context_length: i64,
    /// Parsed as open_clip does, and unused as there: the output is `text_cfg.vocab_size` wide.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "default_text_width")]
    pub width: i64,
    #[serde(default = "default_text_heads")]
    pub heads: i64,
    #[serde(default = "default_text_layers")]
    pub layers: i64,
    #[serde(default = "default_mlp_ratio", skip_serializing_if = "is_default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    /// open_clip's `MultimodalCfg` keys that its decoder does not read (the attentional
    /// pooler's are `vision_cfg`'s): parsed and kept, so its JSON round-trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim_head: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_queries: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_pooler_heads: Option<i64>,
}

/// The image tower: a ViT (`layers` a number), OpenAI's ModifiedResNet (`layers` a list of
/// four block counts), or a timm ViT by name (`timm_model_name`, the SigLIP trunks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Residual blocks (ViT), or blocks per stage (ModifiedResNet: `[3, 4, 6, 3]` for RN50).
    #[serde(default = "default_vision_layers", skip_serializing_if = "is_default_vision_layers")]
    pub layers: VisionLayers,
    /// Token width (ViT), or the stem's width (ModifiedResNet: 64 for RN50).
    #[serde(default = "default_vision_width", skip_serializing_if = "is_default_vision_width")]
    pub width: i64,
    /// Width of one attention head. Default 64.
    #[serde(default = "default_head_width", skip_serializing_if = "is_default_head_width")]
    pub head_width: i64,
    /// MLP hidden width as a multiple of `width`. Default 4.
    #[serde(default = "default_mlp_ratio", skip_serializing_if = "is_default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Side of a square patch in pixels; must divide `image_size`. `null` for ResNets.
    #[serde(default = "default_patch_size", skip_serializing_if = "is_default_patch_size")]
    pub patch_size: Option<i64>,
    /// Input resolution in pixels (square; `[h, w]` with h == w is accepted). Default 224.
    #[serde(default = "default_image_size", deserialize_with = "square_size")]
    pub image_size: i64,
    /// LayerScale: each block's residual branches multiplied by learned `ls_1.gamma`,
    /// `ls_2.gamma` starting at this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    /// Patch dropout (FLIP): the fraction of patch tokens each image drops at random in
    /// training, in [0, 1); the class token stays and `max(1, int(patches * (1 - p)))` patches
    /// are kept. Towers with patch tokens only (not ResNets, ConvNeXt, `vit_relpos_*`).
    /// `train.force_patch_dropout` overrides it for a run.
    /// Evaluation never drops. Default 0 (off).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patch_dropout: f64,
    /// No LayerNorm before the blocks (CLIPA).
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_ln_pre: bool,
    /// `ln_post` after pooling instead of on every token.
    #[serde(default, skip_serializing_if = "is_false")]
    pub final_ln_after_pool: bool,
    /// `tok`: the class token; `avg`: the mean of the patch tokens.
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool_type: VisionPool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_kwargs: Option<ActKwargs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_kwargs: Option<NormKwargs>,

    /// A timm ViT trunk by name (`vit_base_patch16_siglip_224`, ...); overrides `layers`,
    /// `width`, `patch_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timm_model_name: Option<String>,
    /// open_clip downloads ImageNet weights when true; oxclip never downloads, so it must be false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub timm_model_pretrained: bool,
    /// The timm trunk's pooling: `map` (the SigLIP attention-pool head), `avg`, `token`, or `` / `none`.
    #[serde(default = "default_timm_pool", skip_serializing_if = "is_default_timm_pool")]
    pub timm_pool: String,
    /// The projection after a timm trunk (open_clip's `TimmModel` head, `timm_head.rs`):
    /// `linear`, `mlp`, `none` (the trunk's width is the embedding) or null (the trunk's own
    /// classifier projects).
    #[serde(default = "default_timm_proj", skip_serializing_if = "is_default_timm_proj")]
    pub timm_proj: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub timm_proj_bias: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timm_drop: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timm_drop_path: Option<f64>,

    /// CoCa's attentional pooler: `attn_pooler_queries` learned queries (`attn_pooler_heads`
    /// heads) cross-attend to the ViT's tokens; ln_post, pooling and `proj` then act on them.
    #[serde(default, skip_serializing_if = "is_false", deserialize_with = "attentional_pool")]
    pub attentional_pool: bool,
    #[serde(
        default = "default_attn_pooler_queries",
        skip_serializing_if = "is_default_attn_pooler_queries"
    )]
    pub attn_pooler_queries: i64,
    #[serde(
        default = "default_attn_pooler_heads",
        skip_serializing_if = "is_default_attn_pooler_heads"
    )]
    pub attn_pooler_heads: i64,
    /// The tower also hands its tokens on (CoCa's decoder reads them); set by CoCa configs,
    /// meaningless without `multimodal_cfg`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub output_tokens: bool,

    /// open_clip options oxclip parses but does not build (other positional embeddings, the
    /// custom attention block): `validate` names any that is set.
    #[serde(default = "default_pos_embed_type", skip_serializing_if = "is_default_pos_embed_type")]
    pub pos_embed_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_type: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub qk_norm: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scaled_cosine_attn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_heads: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_attn_inner: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_attn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_fc: bool,
}

/// The text tower: open_clip's `TextTransformer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// Tokens per caption, specials included (77 for OpenAI's tokenizer, 64 for SigLIP).
    #[serde(default = "default_context_length")]
    pub context_length: i64,
    /// Vocabulary size (49,408 for OpenAI's CLIP BPE).
    #[serde(default = "default_vocab_size")]
    pub vocab_size: i64,
    /// The Hugging Face tokenizer open_clip would download (`timm/ViT-B-16-SigLIP`); oxclip
    /// never downloads: give its `tokenizer.json` with `--tokenizer` or `data.tokenizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_tokenizer_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_mode: Option<String>,
    /// open_clip's `HFTokenizer` options: `clean` (`canonicalize`, `whitespace`, `lower`),
    /// `strip_sep_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_kwargs: Option<TokenizerKwargs>,
    /// Token width.
    #[serde(default = "default_text_width")]
    pub width: i64,
    /// Attention heads; must divide `width`.
    #[serde(default = "default_text_heads")]
    pub heads: i64,
    /// Number of residual blocks.
    #[serde(default = "default_text_layers")]
    pub layers: i64,
    /// MLP hidden width as a multiple of `width`. Default 4.
    #[serde(default = "default_mlp_ratio", skip_serializing_if = "is_default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ls_init_value: Option<f64>,
    /// The padding id the tokenizer fills with (open_clip: `pad_id`).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub pad_id: i64,
    /// The end-of-text id `pool_type: eos` pools at.
    #[serde(default = "default_eos_id", skip_serializing_if = "is_default_eos_id")]
    pub eos_id: i64,
    /// Bidirectional attention (SigLIP) instead of causal.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_causal_mask: bool,
    /// `ln_final` after pooling instead of on every token.
    #[serde(default, skip_serializing_if = "is_false")]
    pub final_ln_after_pool: bool,
    /// Where a caption's features are read: `argmax` (the largest id: CLIP's EOT), `eos`
    /// (the first `eos_id`), `last`, `first`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool_type: TextPool,
    /// `text_projection` as a Linear with a bias (SigLIP) instead of a bias-free matrix.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proj_bias: bool,
    /// `linear`, or `none` (no projection: the width is the embedding).
    #[serde(default = "default_proj_type", skip_serializing_if = "is_default_proj_type")]
    pub proj_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_kwargs: Option<ActKwargs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_kwargs: Option<NormKwargs>,

    /// CoCa's class embedding `cls_emb`, appended after the caption: the tower pools there
    /// (overriding `pool_type`, ln_final after pooling) and attention masks padding.
    #[serde(default, skip_serializing_if = "is_false")]
    pub embed_cls: bool,
    /// The tower also hands its tokens on (CoCa's decoder reads them); set by CoCa configs,
    /// meaningless without `multimodal_cfg`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub output_tokens: bool,
    /// A Hugging Face text model (`hf_text.rs`) instead of open_clip's `TextTransformer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_model_name: Option<String>,
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub hf_model_pretrained: bool,
    #[serde(default = "default_hf_proj_type", skip_serializing_if = "is_default_hf_proj_type")]
    pub hf_proj_type: String,
    #[serde(default = "default_hf_pooler_type", skip_serializing_if = "is_default_hf_pooler_type")]
    pub hf_pooler_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_type: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub qk_norm: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scaled_cosine_attn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_heads: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_attn_inner: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_attn: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_fc: bool,
}

/// `layers`: a ViT's block count, or a ModifiedResNet's blocks per stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum VisionLayers {
    Count(i64),
    Stages(Vec<i64>),
}

impl<'de> Deserialize<'de> for VisionLayers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = VisionLayers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a block count (ViT) or a list of four block counts (ModifiedResNet)")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Ok(VisionLayers::Count(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                i64::try_from(v)
                    .map(VisionLayers::Count)
                    .map_err(|_| E::custom("block count too large"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element::<i64>()? {
                    out.push(n);
                }
                Ok(VisionLayers::Stages(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionPool {
    /// The class token.
    #[default]
    Tok,
    /// The mean of the patch tokens (the class token excluded).
    Avg,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextPool {
    /// The position of the largest id in each row (CLIP's EOT is its largest id).
    #[default]
    Argmax,
    /// The first position holding `eos_id`.
    Eos,
    /// The last position (SigLIP: captions padded to the full length).
    Last,
    /// The first position.
    First,
}

/// The activation's options, as open_clip passes them to `nn.GELU`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActKwargs {
    /// `none` (erf GELU) or `tanh` (SigLIP 2's `gelu_pytorch_tanh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approximate: Option<String>,
}

/// The LayerNorms' options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormKwargs {
    /// Default 1e-5 (PyTorch's); SigLIP's text tower uses 1e-6.
    pub eps: f64,
}

/// open_clip's `HFTokenizer` keyword arguments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerKwargs {
    /// Text cleaning before tokenizing: `whitespace` (open_clip's default for Hugging Face
    /// tokenizers), `lower`, or `canonicalize` (lower case, punctuation removed: SigLIP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean: Option<String>,
    /// Drop the `[SEP]` token (BERT tokenizers, CLIPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strip_sep_token: Option<bool>,
    /// The source-language code every text is marked with (`HFTokenizer.set_language`):
    /// NLLB's `eng_Latn`, `deu_Latn`, ...; refused for a tokenizer without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// Which image tower a config builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionTowerKind<'a> {
    /// open_clip's `VisionTransformer`.
    Vit,
    /// OpenAI's `ModifiedResNet` with these blocks per stage.
    ResNet(&'a [i64]),
    /// A timm ViT trunk by name.
    Timm(&'a str),
}

/// The activation of a tower's MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `nn.GELU()`, erf form.
    Gelu,
    /// `nn.GELU(approximate='tanh')` (`gelu_pytorch_tanh`).
    GeluTanh,
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's approximation.
    QuickGelu,
    /// `max(x, 0)` (Hugging Face text towers whose `hidden_act` is `relu`).
    Relu,
}

impl Activation {
    /// open_clip's rule: QuickGELU when the model says so, else GELU with `act_kwargs`.
    fn of(quick_gelu: bool, kwargs: &Option<ActKwargs>, key: &str) -> Result<Activation> {
        let approximate = kwargs.as_ref().and_then(|k| k.approximate.as_deref());
        match (quick_gelu, approximate) {
            (true, None) => Ok(Activation::QuickGelu),
            (false, None | Some("none")) => Ok(Activation::Gelu),
            (false, Some("tanh")) => Ok(Activation::GeluTanh),
            (true, Some(_)) => Err(TrainError::ModelConfig(format!(
                "{key}.act_kwargs.approximate cannot be combined with quick_gelu: true"
            ))),
            (false, Some(other)) => Err(TrainError::ModelConfig(format!(
                "{key}.act_kwargs.approximate must be \"none\" or \"tanh\", got {other:?}"
            ))),
        }
    }
}

impl VisionConfig {
    pub fn tower(&self) -> VisionTowerKind<'_> {
        match (&self.timm_model_name, &self.layers) {
            (Some(name), _) => VisionTowerKind::Timm(name),
            (None, VisionLayers::Stages(stages)) => VisionTowerKind::ResNet(stages),
            (None, VisionLayers::Count(_)) => VisionTowerKind::Vit,
        }
    }

    /// The ViT's block count (0 for other towers).
    pub fn vit_layers(&self) -> i64 {
        match self.layers {
            VisionLayers::Count(n) => n,
            VisionLayers::Stages(_) => 0,
        }
    }

    /// Attention heads: width / head_width for a ViT; width * 32 / head_width for a
    /// ModifiedResNet's attention pool (open_clip's rule).
    pub fn heads(&self) -> i64 {
        match self.tower() {
            VisionTowerKind::ResNet(_) => self.width * 32 / self.head_width,
            _ => self.width / self.head_width,
        }
    }

    /// The ViT's patch side (16 when unset).
    pub fn patch(&self) -> i64 {
        self.patch_size.unwrap_or(16)
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch()
    }

    pub fn activation(&self, quick_gelu: bool) -> Result<Activation> {
        Activation::of(quick_gelu, &self.act_kwargs, "vision_cfg")
    }

    pub fn norm_eps(&self) -> f64 {
        self.norm_kwargs.as_ref().map_or(1e-5, |n| n.eps)
    }
}

impl TextConfig {
    pub fn activation(&self, quick_gelu: bool) -> Result<Activation> {
        Activation::of(quick_gelu, &self.act_kwargs, "text_cfg")
    }

    /// A Hugging Face text tower (`hf_model_name`) instead of open_clip's `TextTransformer`.
    pub fn is_hf(&self) -> bool {
        self.hf_model_name.is_some()
    }

    pub fn norm_eps(&self) -> f64 {
        self.norm_kwargs.as_ref().map_or(1e-5, |n| n.eps)
    }

    /// Whether the tower ends in a projection (`proj_type: none` has none).
    pub fn has_projection(&self) -> bool {
        self.proj_type != "none"
    }
}

impl ModelConfig {
    /// Parameter-name prefix of the text tower: `text.` under `custom_text`, else the root.
    pub fn text_prefix(&self) -> &'static str {
        // open_clip builds every Hugging Face text tower as a CustomTextCLIP.
        if self.custom_text || self.text_cfg.is_hf() {
            "text."
        } else {
            ""
        }
    }

    /// Checks the relations between fields that the shapes depend on, and refuses what oxclip
    /// does not build, naming the key.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        let err = |m: String| Err(TrainError::ModelConfig(m));
        let mut positive = vec![
            ("embed_dim", self.embed_dim),
            ("vision_cfg.image_size", v.image_size),
            ("text_cfg.context_length", t.context_length),
            ("text_cfg.vocab_size", t.vocab_size),
            ("text_cfg.width", t.width),
            ("text_cfg.heads", t.heads),
            ("text_cfg.layers", t.layers),
        ];
        match v.tower() {
            VisionTowerKind::Vit => positive.extend([
                ("vision_cfg.layers", v.vit_layers()),
                ("vision_cfg.width", v.width),
                ("vision_cfg.patch_size", v.patch_size.unwrap_or(0)),
                ("vision_cfg.head_width", v.head_width),
            ]),
            VisionTowerKind::ResNet(stages) => {
                if stages.len() != 4 || stages.iter().any(|&n| n <= 0) {
                    return err(format!(
                        "vision_cfg.layers must be a block count (ViT) or four positive block counts (ModifiedResNet), got {stages:?}"
                    ));
                }
                positive.extend([
                    ("vision_cfg.width", v.width),
                    ("vision_cfg.head_width", v.head_width),
                ]);
            }
            VisionTowerKind::Timm(_) => {}
        }
        for (key, value) in positive {
            if value <= 0 {
                return err(format!("{key} must be positive, got {value}"));
            }
        }
        match v.tower() {
            VisionTowerKind::Vit => {
                if v.image_size % v.patch() != 0 {
                    return err(format!(
                        "vision_cfg.patch_size {} does not divide vision_cfg.image_size {}",
                        v.patch(),
                        v.image_size
                    ));
                }
                if v.width % v.head_width != 0 {
                    return err(format!(
                        "vision_cfg.head_width {} does not divide vision_cfg.width {}",
                        v.head_width, v.width
                    ));
                }
            }
            VisionTowerKind::ResNet(_) => {
                if v.image_size % 32 != 0 {
                    return err(format!(
                        "vision_cfg.image_size {} must be a multiple of 32 for a ModifiedResNet",
                        v.image_size
                    ));
                }
                if (v.width * 32) % v.head_width != 0 {
                    return err(format!(
                        "vision_cfg.head_width {} does not divide the ModifiedResNet's output width {}",
                        v.head_width,
                        v.width * 32
                    ));
                }
            }
            VisionTowerKind::Timm(_) => {
                if v.timm_model_pretrained {
                    return err("vision_cfg.timm_model_pretrained: true asks for a download of ImageNet weights; oxclip never downloads. \
                                Set it false and load the CLIP weights with --checkpoint or init.checkpoint"
                        .into());
                }
            }
        }
        if t.width % t.heads != 0 {
            return err(format!(
                "text_cfg.heads {} does not divide text_cfg.width {}",
                t.heads, t.width
            ));
        }
        for (key, value) in
            [("init_logit_scale", self.init_logit_scale), ("init_logit_bias", self.init_logit_bias)]
        {
            if let Some(value) = value.filter(|v| !v.is_finite()) {
                return err(format!("{key} must be a finite number, got {value}"));
            }
        }
        for (key, ratio) in
            [("vision_cfg.mlp_ratio", v.mlp_ratio), ("text_cfg.mlp_ratio", t.mlp_ratio)]
        {
            if !(ratio > 0.0 && ratio.is_finite()) {
                return err(format!("{key} must be a positive number, got {ratio}"));
            }
        }
        if !(0.0..1.0).contains(&v.patch_dropout) {
            return err(format!(
                "vision_cfg.patch_dropout must be in [0, 1), got {}",
                v.patch_dropout
            ));
        }
        if let Some(tower) = super::patchless_tower(v).filter(|_| v.patch_dropout > 0.0) {
            return err(format!(
                "vision_cfg.patch_dropout ({}) drops patch tokens, which a {tower} image tower \
                 cannot drop; remove it (patch dropout is for ViTs)",
                v.patch_dropout
            ));
        }
        if !["linear", "none"].contains(&t.proj_type.as_str()) {
            return err(format!(
                "text_cfg.proj_type must be \"linear\" or \"none\", got {:?}",
                t.proj_type
            ));
        }
        if !t.has_projection() && t.width != self.embed_dim {
            return err(format!(
                "text_cfg.proj_type: none needs text_cfg.width ({}) equal to embed_dim ({})",
                t.width, self.embed_dim
            ));
        }
        if t.pool_type == TextPool::Eos && !(0..t.vocab_size).contains(&t.eos_id) {
            return err(format!(
                "text_cfg.eos_id {} is outside the vocabulary (0..{})",
                t.eos_id, t.vocab_size
            ));
        }
        v.activation(self.quick_gelu)?;
        t.activation(self.quick_gelu)?;
        for (key, eps) in [("vision_cfg", v.norm_eps()), ("text_cfg", t.norm_eps())] {
            if !(eps > 0.0 && eps.is_finite()) {
                return err(format!("{key}.norm_kwargs.eps must be a positive number, got {eps}"));
            }
        }
        self.validate_coca()?;
        self.refuse_unbuilt()
    }

    /// The attentional pooler and CoCa's decoder: sizes that must agree for the shapes to meet.
    fn validate_coca(&self) -> Result<()> {
        let (v, t) = (&self.vision_cfg, &self.text_cfg);
        let err = |m: String| Err(TrainError::ModelConfig(m));
        if v.attentional_pool {
            if v.tower() != VisionTowerKind::Vit {
                return err("vision_cfg.attentional_pool is open_clip's ViT's; this image tower \
                            (a ResNet or a timm trunk) has none"
                    .into());
            }
            for (key, value) in [
                ("vision_cfg.attn_pooler_queries", v.attn_pooler_queries),
                ("vision_cfg.attn_pooler_heads", v.attn_pooler_heads),
            ] {
                if value <= 0 {
                    return err(format!("{key} must be positive, got {value}"));
                }
            }
            if self.embed_dim % v.attn_pooler_heads != 0 {
                return err(format!(
                    "vision_cfg.attn_pooler_heads {} does not divide embed_dim {} (the pooler's width)",
                    v.attn_pooler_heads, self.embed_dim
                ));
            }
        }
        let Some(m) = &self.multimodal_cfg else { return Ok(()) };
        for (key, value) in [
            ("multimodal_cfg.width", m.width),
            ("multimodal_cfg.heads", m.heads),
            ("multimodal_cfg.layers", m.layers),
            ("multimodal_cfg.context_length", m.context_length),
        ] {
            if value <= 0 {
                return err(format!("{key} must be positive, got {value}"));
            }
        }
        if m.width % m.heads != 0 {
            return err(format!(
                "multimodal_cfg.heads {} does not divide multimodal_cfg.width {}",
                m.heads, m.width
            ));
        }
        if !(m.mlp_ratio > 0.0 && m.mlp_ratio.is_finite()) {
            return err(format!(
                "multimodal_cfg.mlp_ratio must be a positive number, got {}",
                m.mlp_ratio
            ));
        }
        if v.tower() != VisionTowerKind::Vit {
            return err("a CoCa model (multimodal_cfg) reads the image tower's tokens, which open_clip's \
                        ViT gives (vision_cfg.layers a number, no timm_model_name); this image tower does not"
                .into());
        }
        // The decoder cross-attends to the image tokens at its own width.
        let (image_tokens, from) = if v.attentional_pool {
            (self.embed_dim, "embed_dim (the attentional pooler's width)")
        } else {
            (v.width, "vision_cfg.width")
        };
        if image_tokens != m.width {
            return err(format!(
                "multimodal_cfg.width {} must equal {from}, {image_tokens}: the decoder cross-attends to the image tokens",
                m.width
            ));
        }
        if v.attentional_pool && v.attn_pooler_queries < 2 {
            return err(format!(
                "vision_cfg.attn_pooler_queries {} leaves the decoder no image tokens: the first query is the pooled one",
                v.attn_pooler_queries
            ));
        }
        if !t.is_hf() && t.width != m.width {
            return err(format!(
                "multimodal_cfg.width {} must equal text_cfg.width {}: the decoder reads the text tower's tokens",
                m.width, t.width
            ));
        }
        Ok(())
    }

    /// A CoCa model: contrastive towers plus a captioning decoder (`multimodal_cfg`).
    pub fn is_coca(&self) -> bool {
        self.multimodal_cfg.is_some()
    }

    /// open_clip options that parse but that oxclip does not build: an error naming the key,
    /// never a silently different model.
    fn refuse_unbuilt(&self) -> Result<()> {
        let (v, t) = (&self.vision_cfg, &self.text_cfg);
        let mut set: Vec<&str> = Vec::new();
        if v.pos_embed_type != "learnable" {
            set.push("vision_cfg.pos_embed_type (only \"learnable\")");
        }
        if t.tokenizer_mode.as_deref().is_some_and(|m| !m.is_empty()) {
            set.push("text_cfg.tokenizer_mode");
        }
        let custom = |block_type: &Option<String>, switches: [bool; 6]| {
            block_type.as_deref().is_some_and(|b| b != "default") || switches.contains(&true)
        };
        if custom(
            &v.block_type,
            [
                v.qk_norm,
                v.scaled_cosine_attn,
                v.scale_heads,
                v.scale_attn_inner,
                v.scale_attn,
                v.scale_fc,
            ],
        ) {
            set.push("vision_cfg.block_type and its options (custom attention blocks)");
        }
        if custom(
            &t.block_type,
            [
                t.qk_norm,
                t.scaled_cosine_attn,
                t.scale_heads,
                t.scale_attn_inner,
                t.scale_attn,
                t.scale_fc,
            ],
        ) {
            set.push("text_cfg.block_type and its options (custom attention blocks)");
        }
        match set.as_slice() {
            [] => Ok(()),
            keys => Err(TrainError::ModelConfig(format!(
                "oxclip does not build {} yet; see docs/models.md for what is supported",
                keys.join(", ")
            ))),
        }
    }
}

/// `attentional_pool`: true or false; open_clip's `"parallel"` and `"cascade"` pools (which
/// open_clip itself marks untested) are refused by name.
fn attentional_pool<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Pool {
        On(bool),
        Kind(String),
    }
    match Pool::deserialize(d)? {
        Pool::On(on) => Ok(on),
        Pool::Kind(kind) => Err(serde::de::Error::custom(format!(
            "attentional_pool {kind:?} (open_clip's separate contrastive pooler, untested there) \
             is not built; true (CoCa's pooler) or false"
        ))),
    }
}

fn square_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(i64),
        Two([i64; 2]),
    }
    match Size::deserialize(d) {
        Ok(Size::One(n)) => Ok(n),
        Ok(Size::Two([h, w])) if h == w => Ok(h),
        Ok(Size::Two([h, w])) => Err(serde::de::Error::custom(format!(
            "non-square image_size [{h}, {w}] is not supported; give one number"
        ))),
        Err(_) => Err(serde::de::Error::custom(
            "image_size must be a number of pixels or [h, w] with h == w",
        )),
    }
}

// open_clip's defaults (CLIPVisionCfg, CLIPTextCfg), named so serialisation can omit them.
fn default_vision_layers() -> VisionLayers {
    VisionLayers::Count(12)
}
fn is_default_vision_layers(v: &VisionLayers) -> bool {
    *v == default_vision_layers()
}
fn default_vision_width() -> i64 {
    768
}
fn is_default_vision_width(v: &i64) -> bool {
    *v == 768
}
fn default_head_width() -> i64 {
    64
}
fn is_default_head_width(v: &i64) -> bool {
    *v == 64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn is_default_mlp_ratio(v: &f64) -> bool {
    *v == 4.0
}
fn default_patch_size() -> Option<i64> {
    Some(16)
}
fn is_default_patch_size(v: &Option<i64>) -> bool {
    *v == Some(16)
}
fn default_image_size() -> i64 {
    224
}
fn default_timm_pool() -> String {
    "avg".into()
}
fn is_default_timm_pool(v: &String) -> bool {
    v == "avg"
}
fn default_timm_proj() -> Option<String> {
    Some("linear".into())
}
fn is_default_timm_proj(v: &Option<String>) -> bool {
    v.as_deref() == Some("linear")
}
fn default_attn_pooler_queries() -> i64 {
    256
}
fn is_default_attn_pooler_queries(v: &i64) -> bool {
    *v == 256
}
fn default_attn_pooler_heads() -> i64 {
    8
}
fn is_default_attn_pooler_heads(v: &i64) -> bool {
    *v == 8
}
fn default_pos_embed_type() -> String {
    "learnable".into()
}
fn is_default_pos_embed_type(v: &String) -> bool {
    v == "learnable"
}
fn default_context_length() -> i64 {
    77
}
fn default_vocab_size() -> i64 {
    49408
}
fn default_text_width() -> i64 {
    512
}
fn default_text_heads() -> i64 {
    8
}
fn default_text_layers() -> i64 {
    12
}
fn default_eos_id() -> i64 {
    2
}
fn is_default_eos_id(v: &i64) -> bool {
    *v == 2
}
fn default_proj_type() -> String {
    "linear".into()
}
fn is_default_proj_type(v: &String) -> bool {
    v == "linear"
}
fn default_hf_proj_type() -> String {
    "mlp".into()
}
fn is_default_hf_proj_type(v: &String) -> bool {
    v == "mlp"
}
fn default_hf_pooler_type() -> String {
    "mean_pooler".into()
}
fn is_default_hf_pooler_type(v: &String) -> bool {
    v == "mean_pooler"
}
fn default_true() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_clip_json_parses_with_open_clips_defaults() {
        let rn50: ModelConfig = serde_json::from_str(
            r#"{"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": null},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}"#,
        )
        .unwrap();
        rn50.validate().unwrap();
        assert_eq!(rn50.vision_cfg.tower(), VisionTowerKind::ResNet(&[3, 4, 6, 3]));
        assert_eq!(rn50.vision_cfg.heads(), 32);
        assert_eq!(rn50.text_cfg.pool_type, TextPool::Argmax);
        let siglip: ModelConfig = serde_json::from_str(
            r#"{"embed_dim": 768, "init_logit_bias": -10, "custom_text": true,
                "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224", "timm_model_pretrained": false, "timm_pool": "map", "timm_proj": "none"},
                "text_cfg": {"context_length": 64, "vocab_size": 32000, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "tokenizer_kwargs": {"clean": "canonicalize"},
                             "width": 768, "heads": 12, "layers": 12, "no_causal_mask": true, "proj_bias": true, "pool_type": "last",
                             "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}}}"#,
        )
        .unwrap();
        siglip.validate().unwrap();
        assert_eq!(siglip.text_prefix(), "text.");
        assert_eq!(siglip.text_cfg.activation(false).unwrap(), Activation::GeluTanh);
        assert_eq!(siglip.text_cfg.norm_eps(), 1e-6);
        // Serialising omits defaults and parses back to the same config.
        let json = serde_json::to_value(&siglip).unwrap();
        assert!(json["vision_cfg"].get("attn_pooler_queries").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<ModelConfig>(json).unwrap(), siglip);
    }

    #[test]
    fn unknown_and_unbuilt_keys_are_named() {
        let unknown = serde_json::from_str::<ModelConfig>(
            r#"{"embed_dim": 8, "vision_cfg": {"widht": 3}, "text_cfg": {}}"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("widht"));
        let coca: ModelConfig =
            serde_json::from_str(r#"{"embed_dim": 512, "vision_cfg": {"attentional_pool": true, "output_tokens": true},
                "text_cfg": {"embed_cls": true, "output_tokens": true},
                "multimodal_cfg": {"width": 512, "heads": 8, "layers": 12, "attn_pooler_heads": 8}}"#).unwrap();
        coca.validate().unwrap();
        assert!(coca.is_coca());
        let mut wide = coca.clone();
        if let Some(m) = wide.multimodal_cfg.as_mut() {
            m.width = 768;
        }
        let msg = wide.validate().unwrap_err().to_string();
        assert!(msg.contains("multimodal_cfg.width 768 must equal embed_dim"), "{msg}");
        let unknown = serde_json::from_str::<ModelConfig>(
            r#"{"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}, "multimodal_cfg": {"widht": 3}}"#,
        );
        assert!(unknown.unwrap_err().to_string().contains("widht"));
        let cascade = serde_json::from_str::<ModelConfig>(
            r#"{"embed_dim": 8, "vision_cfg": {"attentional_pool": "cascade"}, "text_cfg": {}}"#,
        );
        assert!(cascade.unwrap_err().to_string().contains("\"cascade\""));
        let mut resnet_coca = coca.clone();
        resnet_coca.vision_cfg.attentional_pool = false;
        resnet_coca.vision_cfg.layers = VisionLayers::Stages(vec![3, 4, 6, 3]);
        let msg = resnet_coca.validate().unwrap_err().to_string();
        assert!(msg.contains("open_clip's ViT"), "{msg}");
        let bad = serde_json::from_str::<ModelConfig>(
            r#"{"embed_dim": 8, "vision_cfg": {"image_size": [224, 256]}, "text_cfg": {}}"#,
        );
        assert!(bad.unwrap_err().to_string().contains("non-square"));
    }
}
