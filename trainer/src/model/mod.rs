//! CLIP as open_clip builds it: an image tower under `visual.`, a text transformer on the
//! root path (under `text.` for `custom_text` models), a learnable temperature `logit_scale`
//! and, for SigLIP, a `logit_bias`. Variable paths are open_clip's state_dict keys, so a
//! `VarStore` saved to safetensors loads into open_clip with `strict=True` and open_clip
//! weights load here with nothing renamed.
//!
//! One file per tower: `vision.rs` (open_clip's ViT), `resnet.rs` (OpenAI's ModifiedResNet),
//! `timm_vit.rs` (timm's ViT trunks, with `timm_vitamin.rs` for ViTamin's convolutional
//! stem), `timm_eva.rs` (timm's EVA and PE trunks), `timm_convnext.rs` (timm's ConvNeXt),
//! `timm_swin.rs` (timm's Swin Transformer), `timm_fastvit.rs` (timm's FastViT, MobileCLIP-S),
//! `timm_head.rs` (open_clip's head after a timm
//! trunk), `text.rs`, `hf_text.rs` (Hugging Face text towers, over `hf_bert.rs`, `hf_t5.rs`
//! and `hf_m2m100.rs`, which read `hf_config.rs`), `transformer.rs` (the block the ViT and text
//! towers share) and `coca.rs` (CoCa's attentional pooler, text decoder and captioning loss);
//! `batch_norm.rs`, `conv.rs` and `drop_path.rs` hold what several towers use. `config.rs` is open_clip's
//! JSON schema, `zoo.rs` its built-in configs, `params.rs` how every parameter is made,
//! `lock.rs` what fine-tuning freezes, `staged.rs` each tower's forward as stages and
//! activation checkpointing over them, `patch_dropout.rs` which patches a training step keeps
//! and how the ViTs drop the rest. Here: the model, its towers behind one enum, and
//! [`load_state_dict`], which takes weights already in open_clip's
//! names. Files (safetensors, other libraries' names and model directories,
//! export) are the `interchange` module's, which builds on this one.

pub mod batch_norm;
pub mod coca;
pub mod config;
pub mod conv;
pub mod drop_path;
pub mod hf_bert;
pub mod hf_config;
pub mod hf_m2m100;
pub mod hf_t5;
pub mod hf_text;
pub mod lock;
pub mod params;
pub mod patch_dropout;
pub mod resnet;
pub mod staged;
pub mod text;
pub mod timm_convnext;
pub mod timm_eva;
pub mod timm_fastvit;
pub mod timm_head;
pub mod timm_swin;
pub mod timm_vit;
pub mod timm_vitamin;
pub mod transformer;
pub mod vision;
pub mod zoo;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Init};
use tch::Tensor;

use batch_norm::BnSwitches;
use config::Activation;
pub use config::{ModelConfig, MultimodalConfig, TextConfig, VisionConfig, VisionTowerKind};
use params::param;
use resnet::ModifiedResNet;
use staged::Stages;
use text::TextTransformer;
use vision::VisionTransformer;

use crate::error::{Result, TrainError};

/// `logit_scale` starts at ln(1/0.07) (CLIP paper) ...
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778; // ln(1 / 0.07)
/// ... and is clamped to [0, ln 100] after every step, so the scale never exceeds 100.
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092; // ln(100)

#[derive(Debug)]
pub struct Clip {
    pub config: ModelConfig,
    pub visual: VisionTower,
    pub text: TextTower,
    /// CoCa's captioning decoder (`multimodal_cfg`), under `text_decoder.`.
    pub text_decoder: Option<coca::TextDecoder>,
    /// The log of the temperature's inverse; a 0-dim tensor.
    pub logit_scale: Tensor,
    /// The sigmoid loss's learnable bias (0-dim), when the config asks for one.
    pub logit_bias: Option<Tensor>,
    /// PyTorch's `model.train()` / `model.eval()`: what BatchNorm and patch dropout follow.
    training: AtomicBool,
}

/// [`ModelConfig::validate`], and what the towers know beyond the config: a Hugging Face
/// text tower's encoder (its `config.json`) and its options.
pub fn validate(config: &ModelConfig) -> Result<()> {
    config.validate()?;
    if config.text_cfg.is_hf() {
        let arch = hf_text::check(&config.text_cfg)?;
        if let Some(m) = &config.multimodal_cfg {
            if arch.width() != m.width {
                return Err(TrainError::ModelConfig(format!(
                    "multimodal_cfg.width {} must equal the text model's width {} ({}): the decoder reads its tokens",
                    m.width,
                    arch.width(),
                    config.text_cfg.hf_model_name.as_deref().unwrap_or_default()
                )));
            }
            if hf_text::HfPooler::parse(&config.text_cfg.hf_pooler_type)? == hf_text::HfPooler::Cls
            {
                return Err(TrainError::ModelConfig(
                    "a CoCa model cannot pool its Hugging Face text tower with cls_pooler: open_clip \
                     then drops the first token from those the decoder reads, and the captions no \
                     longer line up with their labels; use mean_pooler or cls_last_hidden_state_pooler"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

/// What a training forward gives the step: the L2-normalised features the contrastive loss
/// scores and, for CoCa, the caption loss's summed cross-entropy over this batch's labels.
#[derive(Debug)]
pub struct Outputs {
    pub image: Tensor,
    pub text: Tensor,
    /// 0-dim fp32; `None` for a model without a decoder.
    pub caption_nll: Option<Tensor>,
}

/// The text tower the config names.
#[derive(Debug)]
pub enum TextTower {
    /// open_clip's own `TextTransformer`.
    Clip(TextTransformer),
    /// A Hugging Face encoder (`text_cfg.hf_model_name`), open_clip's `HFTextEncoder`.
    Hf(Box<hf_text::HfText>),
}

impl TextTower {
    fn new(p: nn::Path, config: &ModelConfig) -> Result<Self> {
        let cfg = &config.text_cfg;
        if cfg.is_hf() {
            return Ok(TextTower::Hf(Box::new(hf_text::HfText::new(p, cfg, config.embed_dim)?)));
        }
        let act = cfg.activation(config.quick_gelu)?;
        Ok(TextTower::Clip(TextTransformer::new(p, cfg, config.embed_dim, act)))
    }

    /// tokens: (B, L) int64 -> (B, embed_dim), not L2-normalised; `train` turns on the
    /// dropout of Hugging Face towers.
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Tensor {
        match self {
            TextTower::Clip(t) => t.forward(tokens),
            TextTower::Hf(t) => t.forward(tokens, train),
        }
    }

    pub fn stage_count(&self) -> usize {
        match self {
            TextTower::Clip(t) => t.stage_count(),
            TextTower::Hf(t) => t.stage_count(),
        }
    }

    pub fn stage(&self, i: usize, x: &Tensor, tokens: &Tensor, train: bool) -> Tensor {
        match self {
            TextTower::Clip(t) => t.stage(i, x, tokens),
            TextTower::Hf(t) => t.stage(i, x, tokens, train),
        }
    }

    /// Whether a training forward draws random numbers (a Hugging Face encoder's dropouts).
    pub fn draws(&self) -> bool {
        match self {
            TextTower::Clip(_) => false,
            TextTower::Hf(t) => t.draws(),
        }
    }

    /// The last stage on `x`, and the tokens CoCa's decoder reads (`head_with_tokens` of
    /// `text.rs`, `hf_text.rs`).
    pub fn head_with_tokens(&self, x: &Tensor, tokens: &Tensor, train: bool) -> (Tensor, Tensor) {
        match self {
            TextTower::Clip(t) => t.head_with_tokens(x, tokens),
            TextTower::Hf(t) => t.head_with_tokens(x, tokens, train),
        }
    }

    /// The longest caption, in tokens, the tower reads (`None`: no limit).
    pub fn max_tokens(&self) -> Option<i64> {
        match self {
            TextTower::Clip(t) => Some(t.max_tokens()),
            TextTower::Hf(t) => t.max_tokens(),
        }
    }

    /// The id captions are padded with, which attention and the caption loss skip.
    pub fn pad_id(&self) -> i64 {
        match self {
            TextTower::Clip(t) => t.pad_id(),
            TextTower::Hf(t) => t.pad_token_id(),
        }
    }
}

/// The image tower the config names.
#[derive(Debug)]
pub enum VisionTower {
    Vit(VisionTransformer),
    ResNet(ModifiedResNet),
    /// A timm ViT trunk with open_clip's `TimmModel` head (SigLIP, SigLIP 2, MobileCLIP, ...).
    Timm(Box<timm_vit::TimmVit>),
    /// A timm `Eva` trunk with open_clip's `TimmModel` head (EVA01, EVA02, PE-Core).
    Eva(Box<timm_eva::TimmEva>),
    /// A timm `ConvNeXt` trunk with open_clip's `TimmModel` head.
    ConvNext(Box<timm_convnext::TimmConvNext>),
    /// A timm `SwinTransformer` trunk with open_clip's `TimmModel` head.
    Swin(Box<timm_swin::TimmSwin>),
    /// A timm `FastVit` trunk (MobileCLIP-S) with open_clip's `TimmModel` head.
    FastVit(Box<timm_fastvit::TimmFastVit>),
}

impl VisionTower {
    fn new(p: nn::Path, config: &ModelConfig) -> Result<Self> {
        let cfg = &config.vision_cfg;
        let act = cfg.activation(config.quick_gelu)?;
        match cfg.tower() {
            VisionTowerKind::Vit => {
                Ok(VisionTower::Vit(VisionTransformer::new(p, cfg, config.embed_dim, act)))
            }
            VisionTowerKind::ResNet(stages) => {
                Ok(VisionTower::ResNet(ModifiedResNet::new(p, cfg, stages, config.embed_dim)))
            }
            VisionTowerKind::Timm(name) if timm_convnext::architecture(name).is_some() => {
                Ok(VisionTower::ConvNext(Box::new(timm_convnext::TimmConvNext::new(
                    p,
                    cfg,
                    config.embed_dim,
                )?)))
            }
            VisionTowerKind::Timm(name) if timm_fastvit::architecture(name).is_some() => {
                Ok(VisionTower::FastVit(Box::new(timm_fastvit::TimmFastVit::new(
                    p,
                    cfg,
                    config.embed_dim,
                )?)))
            }
            VisionTowerKind::Timm(name) if timm_swin::architecture(name).is_some() => {
                Ok(VisionTower::Swin(Box::new(timm_swin::TimmSwin::new(p, cfg, config.embed_dim)?)))
            }
            VisionTowerKind::Timm(name) if timm_eva::architecture(name).is_some() => {
                Ok(VisionTower::Eva(Box::new(timm_eva::TimmEva::new(p, cfg, config.embed_dim)?)))
            }
            VisionTowerKind::Timm(name) if timm_vit::architecture(name).is_ok() => {
                Ok(VisionTower::Timm(Box::new(timm_vit::TimmVit::new(p, cfg, config.embed_dim)?)))
            }
            VisionTowerKind::Timm(name) => Err(unknown_timm_trunk(name)),
        }
    }

    /// images: (B, 3, S, S) -> (B, embed_dim). `kept`: the patches each image keeps (patch
    /// dropout, [`patch_dropout`]); a tower without patch tokens takes `None` only.
    pub fn forward(&self, images: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        staged::fold(self.stage_count(), images, |i, x| self.stage(i, x, train, kept))
    }

    /// Patch tokens per image, for the towers that can drop some (not a convolutional tower,
    /// nor a timm trunk with relative positions).
    pub fn num_patches(&self) -> Option<i64> {
        match self {
            VisionTower::Vit(vit) => Some(vit.num_patches()),
            VisionTower::ResNet(_) => None,
            VisionTower::Timm(vit) => vit.drops_patches().then(|| vit.num_patches()),
            VisionTower::Eva(eva) => Some(eva.num_patches()),
            VisionTower::ConvNext(_) | VisionTower::Swin(_) | VisionTower::FastVit(_) => None,
        }
    }

    /// The switches of the tower's BatchNorms, for the towers that have them.
    pub fn batch_norm(&self) -> Option<&BnSwitches> {
        match self {
            VisionTower::Vit(_) => None,
            VisionTower::ResNet(resnet) => Some(&resnet.batch_norm),
            VisionTower::Timm(vit) => vit.batch_norm(),
            VisionTower::FastVit(fastvit) => Some(&fastvit.batch_norm),
            VisionTower::Eva(_) | VisionTower::ConvNext(_) | VisionTower::Swin(_) => None,
        }
    }

    /// Whether a training-mode forward draws random numbers before the last stage
    /// (stochastic depth, a dropout inside a block): model/staged.rs seeds each stage then.
    pub fn draws_in_stages(&self) -> bool {
        match self {
            VisionTower::Vit(_) | VisionTower::ResNet(_) => false,
            VisionTower::Timm(vit) => vit.draws_in_stages(),
            VisionTower::Eva(eva) => eva.draws_in_stages(),
            VisionTower::ConvNext(convnext) => convnext.draws_in_stages(),
            VisionTower::Swin(swin) => swin.draws_in_stages(),
            VisionTower::FastVit(fastvit) => fastvit.draws_in_stages(),
        }
    }

    /// The tower's stages (model/staged.rs).
    pub fn stage_count(&self) -> usize {
        match self {
            VisionTower::Vit(vit) => vit.stage_count(),
            VisionTower::ResNet(resnet) => resnet.stage_count(),
            VisionTower::Timm(vit) => vit.stage_count(),
            VisionTower::Eva(eva) => eva.stage_count(),
            VisionTower::ConvNext(convnext) => convnext.stage_count(),
            VisionTower::Swin(swin) => swin.stage_count(),
            VisionTower::FastVit(fastvit) => fastvit.stage_count(),
        }
    }

    /// The last stage on `x`, and the tokens CoCa's decoder reads: the ViT's
    /// (`vision.rs`); for the towers a CoCa config cannot name (refused by validation), the
    /// last stage's input.
    pub fn head_with_tokens(&self, x: &Tensor, train: bool) -> (Tensor, Tensor) {
        match self {
            VisionTower::Vit(vit) => vit.head_with_tokens(x),
            _ => (self.stage(self.stage_count() - 1, x, train, None), x.shallow_clone()),
        }
    }

    /// Stage `i` of [`VisionTower::forward`]; a ResNet has no patches to drop (the config
    /// refuses patch dropout on it) and ignores `kept`.
    pub fn stage(&self, i: usize, x: &Tensor, train: bool, kept: Option<&Tensor>) -> Tensor {
        match self {
            VisionTower::Vit(vit) => vit.stage(i, x, kept),
            VisionTower::ResNet(resnet) => resnet.stage(i, x, train),
            VisionTower::Timm(vit) => vit.stage(i, x, train, kept),
            VisionTower::Eva(eva) => eva.stage(i, x, train, kept),
            VisionTower::ConvNext(convnext) => convnext.stage(i, x, train),
            VisionTower::Swin(swin) => swin.stage(i, x, train),
            VisionTower::FastVit(fastvit) => fastvit.stage(i, x, train),
        }
    }
}

/// What the image tower `cfg` describes is, when it has no patch tokens patch dropout could drop
/// (convolutional towers; a ViT whose relative positions span the whole grid): its name for
/// messages. `None` for the ViTs.
pub fn patchless_tower(cfg: &VisionConfig) -> Option<&'static str> {
    match cfg.tower() {
        VisionTowerKind::ResNet(_) => Some("ModifiedResNet"),
        VisionTowerKind::Timm(name) if timm_convnext::architecture(name).is_some() => {
            Some("ConvNeXt")
        }
        VisionTowerKind::Timm(name) if timm_swin::architecture(name).is_some() => {
            Some("Swin Transformer")
        }
        VisionTowerKind::Timm(name) if timm_fastvit::architecture(name).is_some() => {
            Some("FastViT")
        }
        VisionTowerKind::Timm(name) => timm_vit::architecture(name)
            .is_ok_and(|a| a.rel_pos_hidden().is_some())
            .then_some("relative-position ViT"),
        VisionTowerKind::Vit => None,
    }
}

/// The error for a timm name none of the timm tower files builds, listing those they do.
fn unknown_timm_trunk(name: &str) -> TrainError {
    let vit = timm_vit::trunks().map(|a| a.name);
    let eva = timm_eva::ARCHITECTURES.iter().map(|a| a.name);
    let convnext = timm_convnext::ARCHITECTURES.iter().map(|a| a.name);
    let swin = timm_swin::ARCHITECTURES.iter().map(|a| a.name);
    let fastvit = timm_fastvit::ARCHITECTURES.iter().map(|a| a.name);
    let names: Vec<&str> = vit.chain(eva).chain(convnext).chain(swin).chain(fastvit).collect();
    TrainError::ModelConfig(format!(
        "vision_cfg.timm_model_name {name:?} is not a timm model oxclip builds; it builds: {}",
        names.join(", ")
    ))
}

/// The image tower as the training step runs it, in stages: the tower's, its output
/// L2-normalised, keeping the patches `kept` lists (patch dropout). A CoCa model's stop before
/// the head, whose pooled features and tokens [`Clip::outputs`] takes.
pub struct ImageStages<'a> {
    model: &'a Clip,
    kept: Option<&'a Tensor>,
}

impl Stages for ImageStages<'_> {
    fn count(&self) -> usize {
        self.model.visual.stage_count() - usize::from(self.model.is_coca())
    }

    fn draws(&self) -> bool {
        self.model.is_training() && self.model.visual.draws_in_stages()
    }

    fn run(&self, i: usize, x: &Tensor) -> Tensor {
        let training = self.model.is_training();
        let out = if i == 0 {
            self.model.visual.stage(i, &self.model.in_weight_kind(x), training, self.kept)
        } else {
            self.model.visual.stage(i, x, training, self.kept)
        };
        if i + 1 == self.count() && !self.model.is_coca() {
            normalize(&out)
        } else {
            out
        }
    }
}

/// The text tower for the captions `tokens` as the training step runs it, in stages: the
/// tower's, its output L2-normalised; a CoCa model's stop before the head, as
/// [`ImageStages`].
pub struct TextStages<'a> {
    model: &'a Clip,
    tokens: &'a Tensor,
}

impl Stages for TextStages<'_> {
    fn count(&self) -> usize {
        self.model.text.stage_count() - usize::from(self.model.is_coca())
    }

    fn draws(&self) -> bool {
        self.model.is_training() && self.model.text.draws()
    }

    fn run(&self, i: usize, x: &Tensor) -> Tensor {
        let out = self.model.text.stage(i, x, self.tokens, self.model.is_training());
        if i + 1 == self.count() && !self.model.is_coca() {
            normalize(&out)
        } else {
            out
        }
    }
}

impl Clip {
    /// Builds the model's variables under `root` with open_clip's initialisation, in eval mode.
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Result<Self> {
        validate(config)?;
        let text_root = match config.text_prefix() {
            "" => root.clone(),
            _ => root / "text",
        };
        Ok(Clip {
            config: config.clone(),
            visual: VisionTower::new(root / "visual", config)?,
            text: TextTower::new(text_root, config)?,
            text_decoder: config.multimodal_cfg.as_ref().map(|m| {
                // open_clip's decoder takes no act_kwargs: QuickGELU or exact GELU.
                let act = if config.quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
                coca::TextDecoder::new(root / "text_decoder", m, config.text_cfg.vocab_size, act)
            }),
            logit_scale: param(
                root,
                "logit_scale",
                &[],
                Init::Const(config.init_logit_scale.unwrap_or(LOGIT_SCALE_INIT)),
            ),
            logit_bias: config
                .init_logit_bias
                .map(|b| param(root, "logit_bias", &[], Init::Const(b))),
            training: AtomicBool::new(false),
        })
    }

    /// Every state_dict entry of `config`'s model, name and shape, sorted by name, without
    /// allocating the weights.
    pub fn shapes(config: &ModelConfig) -> Result<Vec<(String, Vec<i64>)>> {
        validate(config)?;
        let mut built = Ok(());
        let shapes = params::shapes_of(|root| {
            if let Err(e) = Clip::new(root, config) {
                built = Err(e);
            }
        });
        built.map(|()| shapes)
    }

    /// [`Clip::shapes`] for the trainable parameters alone (no BatchNorm statistics): what
    /// open_clip's `model.parameters()` holds.
    pub fn parameter_shapes(config: &ModelConfig) -> Result<Vec<(String, Vec<i64>)>> {
        validate(config)?;
        let mut built = Ok(());
        let shapes = params::parameter_shapes_of(|root| {
            if let Err(e) = Clip::new(root, config) {
                built = Err(e);
            }
        });
        built.map(|()| shapes)
    }

    /// Training mode (BatchNorm normalises with batch statistics and updates its running
    /// ones) or eval mode, as PyTorch's `model.train(on)`.
    /// Readies a model that will only run inference: a FastViT image tower is
    /// re-parameterised (timm's `reparameterize_model`, `timm_fastvit.rs`), its branches and
    /// BatchNorms fused into single convolutions; other towers have nothing to fuse. The model
    /// is in eval mode from then on, and its VarStore keeps the weights it was loaded with.
    pub fn prepare_for_inference(&mut self) {
        self.set_training(false);
        if let VisionTower::FastVit(fastvit) = &mut self.visual {
            fastvit.reparameterize();
        }
    }

    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Runs `f`, forwards that repeat ones already taken in training mode (gradient caching's
    /// pass with gradients): BatchNorm normalises with the batch's statistics as the first
    /// time but does not fold them into its running ones again.
    pub fn repeating<T>(&self, f: impl FnOnce() -> T) -> T {
        let Some(bn) = self.visual.batch_norm() else { return f() };
        bn.count_batches(false);
        let out = f();
        bn.count_batches(true);
        out
    }

    /// BatchNorm in the image tower normalises with its running statistics and keeps them,
    /// in training mode too (open_clip's `--lock-image-freeze-bn-stats`). Towers without
    /// BatchNorm are left as they are.
    pub fn freeze_batch_norm(&self) {
        if let Some(bn) = self.visual.batch_norm() {
            bn.freeze();
        }
    }

    /// images: (B, 3, S, S) -> (B, embed_dim), not normalised; every patch.
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        self.encode_image_keeping(images, None)
    }

    /// [`Clip::encode_image`] with patch dropout: image b keeps the patch tokens row b of
    /// `kept` lists ((B, keep) positions, [`patch_dropout::PatchDropout::kept`]); `None`
    /// keeps all. Only the training step passes indices.
    pub fn encode_image_keeping(&self, images: &Tensor, kept: Option<&Tensor>) -> Tensor {
        self.visual.forward(&self.in_weight_kind(images), self.is_training(), kept)
    }

    /// Images meet the weights in the weights' precision: bf16 under `pure_bf16` (open_clip
    /// casts its inputs so, `get_input_dtype`). Every float weight has one kind, which
    /// logit_scale's stands for; under autocast the weights stay fp32 and autocast casts.
    fn in_weight_kind(&self, images: &Tensor) -> Tensor {
        let kind = self.logit_scale.kind();
        if images.kind() == kind {
            images.shallow_clone()
        } else {
            images.to_kind(kind)
        }
    }

    /// tokens: (B, context_length) -> (B, embed_dim), not normalised.
    pub fn encode_text(&self, tokens: &Tensor) -> Tensor {
        self.text.forward(tokens, self.is_training())
    }

    /// L2-normalised image and text features, the inputs of every contrastive loss.
    pub fn features(&self, images: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
        self.features_keeping(images, tokens, None)
    }

    /// [`Clip::features`], the images keeping only the patches `kept` lists (patch dropout;
    /// see [`Clip::encode_image_keeping`]).
    pub fn features_keeping(
        &self,
        images: &Tensor,
        tokens: &Tensor,
        kept: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let image = staged::forward(&self.image_stages(kept), images);
        let text = staged::forward(&self.text_stages(tokens), tokens);
        if !self.is_coca() {
            return (image, text);
        }
        // CoCa's stages stop before the heads (the decoder reads what they see).
        let train = self.is_training();
        let (image, _) = self.visual.head_with_tokens(&image, train);
        let (text, _) = self.text.head_with_tokens(&text, tokens, train);
        (normalize(&image), normalize(&text))
    }

    /// A CoCa model: it has a captioning decoder.
    pub fn is_coca(&self) -> bool {
        self.text_decoder.is_some()
    }

    /// The image tower as the training step runs it, in stages (activation checkpointing).
    pub fn image_stages<'a>(&'a self, kept: Option<&'a Tensor>) -> ImageStages<'a> {
        ImageStages { model: self, kept }
    }

    /// The text tower over `tokens` as the training step runs it, in stages.
    pub fn text_stages<'a>(&'a self, tokens: &'a Tensor) -> TextStages<'a> {
        TextStages { model: self, tokens }
    }

    /// The training forward: [`Clip::outputs`] of both towers' stages.
    pub fn forward_outputs(
        &self,
        images: &Tensor,
        tokens: &Tensor,
        kept: Option<&Tensor>,
    ) -> Outputs {
        let image = staged::forward(&self.image_stages(kept), images);
        let text = staged::forward(&self.text_stages(tokens), tokens);
        self.outputs(&image, &text, tokens)
    }

    /// The step's [`Outputs`] from the outputs of [`Clip::image_stages`] and
    /// [`Clip::text_stages`] over `tokens`: their features as they are, or for CoCa the heads'
    /// features normalised and the caption loss, as open_clip's `CoCa.forward` and `CoCaLoss`.
    pub fn outputs(&self, image: &Tensor, text: &Tensor, tokens: &Tensor) -> Outputs {
        match self.coca_heads(image, text, tokens) {
            Some((image_features, text_features, logits)) => {
                let labels = tokens.narrow(1, 1, tokens.size()[1] - 1);
                Outputs {
                    image: normalize(&image_features),
                    text: normalize(&text_features),
                    caption_nll: Some(coca::caption_nll_sum(&logits, &labels, self.pad_id())),
                }
            }
            None => Outputs {
                image: image.shallow_clone(),
                text: text.shallow_clone(),
                caption_nll: None,
            },
        }
    }

    /// CoCa's heads on the towers' trunk outputs: image and text features (not normalised)
    /// and the teacher-forced logits (B, L - 1, vocab): the decoder reads the caption's tokens
    /// but the last and predicts each next one. `None` without a decoder.
    fn coca_heads(
        &self,
        image: &Tensor,
        text: &Tensor,
        tokens: &Tensor,
    ) -> Option<(Tensor, Tensor, Tensor)> {
        let decoder = self.text_decoder.as_ref()?;
        let train = self.is_training();
        let (image_features, image_tokens) = self.visual.head_with_tokens(image, train);
        let (text_features, text_tokens) = self.text.head_with_tokens(text, tokens, train);
        let l = tokens.size()[1];
        let logits = decoder.forward(&image_tokens, &text_tokens.narrow(1, 0, l - 1));
        Some((image_features, text_features, logits))
    }

    /// CoCa's teacher-forced next-token logits for `images` and their captions `tokens` (B, L):
    /// (B, L - 1, vocab), position i predicting token i + 1 (open_clip's
    /// `CoCa(images, tokens)["logits"]`).
    pub fn caption_logits(&self, images: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let image = staged::forward(&self.image_stages(None), images);
        let text = staged::forward(&self.text_stages(tokens), tokens);
        self.coca_heads(&image, &text, tokens).map(|(_, _, logits)| logits).ok_or_else(not_coca)
    }

    /// The id captions are padded with: attention skips it, and so does the caption loss.
    pub fn pad_id(&self) -> i64 {
        self.text.pad_id()
    }

    /// CoCa: each image's features and the tokens the decoder reads, (B, embed_dim) not
    /// normalised and (B, M, W), in eval or training mode as the model is.
    pub fn encode_image_tokens(&self, images: &Tensor) -> (Tensor, Tensor) {
        let images = self.in_weight_kind(images);
        let stages = self.visual.stage_count();
        let trunk = staged::fold(stages - 1, &images, |i, x| {
            self.visual.stage(i, x, self.is_training(), None)
        });
        self.visual.head_with_tokens(&trunk, self.is_training())
    }

    /// CoCa's next-token logits: for each sequence `ids` (R, L), read with the image tokens
    /// of its row of `image_tokens` (R, M, W), the logits (R, vocab) of the token after it
    /// (open_clip's `CoCa.forward(..., output_labels=False)["logits"][:, -1]`).
    pub fn next_token_logits(&self, image_tokens: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let decoder = self.text_decoder.as_ref().ok_or_else(not_coca)?;
        let stages = self.text.stage_count();
        let train = self.is_training();
        let x = staged::fold(stages - 1, ids, |i, x| self.text.stage(i, x, ids, train));
        let (_, text_tokens) = self.text.head_with_tokens(&x, ids, train);
        let logits = decoder.forward(image_tokens, &text_tokens);
        Ok(logits.select(1, logits.size()[1] - 1))
    }

    /// Keeps the scale in [1, 100], as open_clip does after each optimizer step.
    pub fn clamp_logit_scale(&self) {
        tch::no_grad(|| {
            let _ = self.logit_scale.shallow_clone().clamp_(0.0, LOGIT_SCALE_MAX);
        });
    }
}

fn not_coca() -> TrainError {
    TrainError::ModelConfig(
        "this model has no captioning decoder (multimodal_cfg): it is not a CoCa model".into(),
    )
}

/// Row-wise L2 normalisation (`F.normalize(x, dim=-1)`, eps 1e-12).
pub fn normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    x / norm
}

/// Number of scalar parameters.
pub fn num_params(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// Copies `loaded` (open_clip's names, any float dtype: fp16 / bf16 files load) into `vs`,
/// refusing any mismatch: every missing, unexpected or mis-shaped tensor is counted and a few
/// are named. `path` is the file they were read from, for the messages. A model with a
/// `logit_bias` takes weights without one, whose bias keeps its initial value.
pub fn load_state_dict(
    vs: &nn::VarStore,
    loaded: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let mut vars = vs.variables();
    if vars.contains_key("logit_bias") && !loaded.contains_key("logit_bias") {
        // CLIP weights fine-tuned with the sigmoid loss: the bias keeps its initial value.
        tracing::info!("{} has no logit_bias; it starts at its initial value", path.display());
        vars.remove("logit_bias");
    }
    load_variables(&vars, &loaded, path)
}

/// [`load_state_dict`] for the variables `vars` (a part of a model, e.g. one tower): each
/// takes the tensor of its name in `loaded`; any missing, unexpected or mis-shaped tensor is
/// refused, all of them named.
pub fn load_variables(
    vars: &std::collections::HashMap<String, Tensor>,
    loaded: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    let mut problems = Vec::new();
    let mut missing: Vec<&String> = vars.keys().filter(|k| !loaded.contains_key(*k)).collect();
    missing.sort();
    let unexpected: Vec<&String> = loaded.keys().filter(|k| !vars.contains_key(*k)).collect();
    if !missing.is_empty() {
        problems.push(format!(
            "missing {}",
            some_of(missing.len(), "tensor", missing.iter().map(|s| s.to_string()))
        ));
    }
    if !unexpected.is_empty() {
        problems.push(format!(
            "unexpected {}",
            some_of(unexpected.len(), "tensor", unexpected.iter().map(|s| s.to_string()))
        ));
    }
    let mut misshaped: Vec<String> = vars
        .iter()
        .filter_map(|(name, var)| {
            let t = loaded.get(name)?;
            (t.size() != var.size()).then(|| {
                format!("{name} (file {}, model {})", shape(&t.size()), shape(&var.size()))
            })
        })
        .collect();
    misshaped.sort();
    if !misshaped.is_empty() {
        problems.push(format!(
            "mis-shaped {}",
            some_of(misshaped.len(), "tensor", misshaped.into_iter())
        ));
    }
    if !problems.is_empty() {
        return Err(TrainError::Weights {
            path: path.into(),
            message: format!(
                "{}; the model config does not match these weights",
                problems.join("; ")
            ),
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vars {
            let src = &loaded[name];
            var.shallow_clone().f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
        }
        Ok(())
    })
}

/// "3 tensors: a, b, c", or past [`LISTED`] names "412 tensors, e.g. a, b, c, d, e (407 more)":
/// a whole architecture's worth of names on one line hides the point.
fn some_of(count: usize, noun: &str, items: impl Iterator<Item = String>) -> String {
    const LISTED: usize = 5;
    let plural = if count == 1 { "" } else { "s" };
    let shown: Vec<String> = items.take(LISTED).collect();
    if count <= LISTED {
        format!("{count} {noun}{plural}: {}", shown.join(", "))
    } else {
        format!("{count} {noun}{plural}, e.g. {} ({} more)", shown.join(", "), count - LISTED)
    }
}

fn shape(size: &[i64]) -> String {
    format!("[{}]", size.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The `tiny` model on the CPU, for tests here and in `interchange`.
    pub(crate) fn tiny() -> (nn::VarStore, Clip) {
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../configs/models/tiny.yaml"))
                .expect("parses");
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg).expect("builds");
        (vs, model)
    }

    #[test]
    fn logit_scale_starts_at_ln_1_over_0_07_and_is_clamped_to_0_ln_100() {
        let (_vs, model) = tiny();
        assert!((model.logit_scale.double_value(&[]) - (1.0f64 / 0.07).ln()).abs() < 1e-6);
        for (set, expected) in [(7.0, LOGIT_SCALE_MAX), (-1.0, 0.0), (3.0, 3.0)] {
            let _ = tch::no_grad(|| model.logit_scale.shallow_clone().fill_(set));
            model.clamp_logit_scale();
            assert!(
                (model.logit_scale.double_value(&[]) - expected).abs() < 1e-6,
                "{set} -> {expected}"
            );
        }
        assert!(model.logit_scale.requires_grad(), "clamping keeps it a trainable leaf");
    }

    #[test]
    fn features_are_unit_norm_and_text_pools_at_the_largest_id() {
        let (_vs, model) = tiny();
        let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let mut ids = vec![0i64; 64];
        ids[..4].copy_from_slice(&[49406, 320, 1125, 49407]);
        ids[32..35].copy_from_slice(&[49406, 320, 49407]);
        let tokens = Tensor::from_slice(&ids).view([2, 32]);
        let (i, t) = model.features(&images, &tokens);
        let norms = Tensor::cat(
            &[i.norm_scalaropt_dim(2, [-1], false), t.norm_scalaropt_dim(2, [-1], false)],
            0,
        );
        assert!((norms - 1.0).abs().max().double_value(&[]) < 1e-5);
        // Tokens after EOT do not change the text features (causal mask + EOT pooling).
        let mut padded = ids.clone();
        padded[10] = 999;
        let t2 = normalize(&model.encode_text(&Tensor::from_slice(&padded).view([2, 32])));
        assert!((t - t2).abs().max().double_value(&[]) < 1e-6);
    }
}
