//! CLIP as open_clip builds it: an image tower under `visual.`, a text transformer on the
//! root path (under `text.` for `custom_text` models), a learnable temperature `logit_scale`
//! and, for SigLIP, a `logit_bias`. Variable paths are open_clip's state_dict keys, so a
//! `VarStore` saved to safetensors loads into open_clip with `strict=True` and open_clip
//! weights load here with nothing renamed.
//!
//! One file per tower: `vision.rs` (open_clip's ViT), `resnet.rs` (OpenAI's ModifiedResNet),
//! `timm_vit.rs` (the SigLIP trunks), `text.rs`, and `transformer.rs` (the block the ViT and
//! text towers share). `config.rs` is open_clip's JSON schema, `zoo.rs` its built-in configs,
//! `params.rs` how every parameter is made. Files in: `pretrained.rs` (Hugging Face and
//! open_clip directories), `hf.rs` / `hf_siglip.rs` (their weight names); files out:
//! `export.rs`; fine-tuning: `lock.rs`.

pub mod config;
pub mod export;
pub mod hf;
pub mod hf_siglip;
pub mod lock;
pub mod params;
pub mod pretrained;
pub mod resnet;
pub mod text;
pub mod timm_vit;
pub mod transformer;
pub mod vision;
pub mod zoo;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

pub use config::{ModelConfig, TextConfig, VisionConfig, VisionTowerKind};
use params::param;
use resnet::ModifiedResNet;
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
    pub text: TextTransformer,
    /// The log of the temperature's inverse; a 0-dim tensor.
    pub logit_scale: Tensor,
    /// The sigmoid loss's learnable bias (0-dim), when the config asks for one.
    pub logit_bias: Option<Tensor>,
    /// PyTorch's `model.train()` / `model.eval()`: what BatchNorm and patch dropout follow.
    training: AtomicBool,
}

/// The image tower the config names.
#[derive(Debug)]
pub enum VisionTower {
    Vit(VisionTransformer),
    ResNet(ModifiedResNet),
    /// A timm ViT trunk with open_clip's `TimmModel` head (SigLIP, SigLIP 2).
    Timm(timm_vit::TimmVit),
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
            VisionTowerKind::Timm(_) => {
                Ok(VisionTower::Timm(timm_vit::TimmVit::new(p, cfg, config.embed_dim)?))
            }
        }
    }

    /// images: (B, 3, S, S) -> (B, embed_dim).
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        match self {
            VisionTower::Vit(vit) => vit.forward(images),
            VisionTower::ResNet(resnet) => resnet.forward(images, train),
            VisionTower::Timm(vit) => vit.forward(images, train),
        }
    }
}

impl Clip {
    /// Builds the model's variables under `root` with open_clip's initialisation, in eval mode.
    pub fn new(root: &nn::Path, config: &ModelConfig) -> Result<Self> {
        config.validate()?;
        let text_root = match config.text_prefix() {
            "" => root.clone(),
            _ => root / "text",
        };
        let text_act = config.text_cfg.activation(config.quick_gelu)?;
        Ok(Clip {
            config: config.clone(),
            visual: VisionTower::new(root / "visual", config)?,
            text: TextTransformer::new(text_root, &config.text_cfg, config.embed_dim, text_act),
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
        config.validate()?;
        let mut built = Ok(());
        let shapes = params::shapes_of(|root| {
            if let Err(e) = Clip::new(root, config) {
                built = Err(e);
            }
        });
        built.map(|()| shapes)
    }

    /// Training mode (BatchNorm normalises with batch statistics and updates its running
    /// ones) or eval mode, as PyTorch's `model.train(on)`.
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
        let VisionTower::ResNet(resnet) = &self.visual else { return f() };
        resnet.count_batches(false);
        let out = f();
        resnet.count_batches(true);
        out
    }

    /// BatchNorm in the image tower normalises with its running statistics and keeps them,
    /// in training mode too (open_clip's `--lock-image-freeze-bn-stats`). Towers without
    /// BatchNorm are left as they are.
    pub fn freeze_batch_norm(&self) {
        if let VisionTower::ResNet(resnet) = &self.visual {
            resnet.freeze_batch_norm();
        }
    }

    /// images: (B, 3, S, S) -> (B, embed_dim), not normalised.
    pub fn encode_image(&self, images: &Tensor) -> Tensor {
        self.visual.forward(images, self.is_training())
    }

    /// tokens: (B, context_length) -> (B, embed_dim), not normalised.
    pub fn encode_text(&self, tokens: &Tensor) -> Tensor {
        self.text.forward(tokens)
    }

    /// L2-normalised image and text features, the inputs of every contrastive loss.
    pub fn features(&self, images: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
        (normalize(&self.encode_image(images)), normalize(&self.encode_text(tokens)))
    }

    /// Keeps the scale in [1, 100], as open_clip does after each optimizer step.
    pub fn clamp_logit_scale(&self) {
        tch::no_grad(|| {
            let _ = self.logit_scale.shallow_clone().clamp_(0.0, LOGIT_SCALE_MAX);
        });
    }
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

/// A model of architecture `config` with the weights of `path` (see [`load_weights`]) on
/// `device`. A file with a `logit_bias` (trained with the sigmoid loss) gets a model with one,
/// whatever the config says, so a SigLIP checkpoint loads under its plain architecture name.
pub fn load(
    config: &ModelConfig,
    path: &Path,
    device: tch::Device,
) -> Result<(nn::VarStore, Clip)> {
    let mut config = config.clone();
    if config.init_logit_bias.is_none() && has_tensor(path, "logit_bias") {
        config.init_logit_bias = Some(0.0); // the file's value replaces it
    }
    let vs = nn::VarStore::new(device);
    let model = Clip::new(&vs.root(), &config)?;
    load_weights(&vs, path)?;
    Ok((vs, model))
}

/// Whether the safetensors file at `path` holds a tensor `name`, from its header alone.
fn has_tensor(path: &Path, name: &str) -> bool {
    let header = || -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)?;
        // A corrupt length is left to `load_weights` to report; read at most 100 MB here.
        let mut header = vec![0u8; u64::from_le_bytes(len).min(100 << 20) as usize];
        file.read_exact(&mut header)?;
        Ok(header)
    };
    let Ok(header) = header() else { return false };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header)
        .is_ok_and(|h| h.contains_key(name))
}

/// Loads weights into `vs` from a safetensors file in open_clip layout (an oxclip checkpoint,
/// `open_clip_model.safetensors`) or Hugging Face `CLIPModel` / `SiglipModel` layout (`model.safetensors`),
/// told apart by their names; converts dtype (fp16 / bf16 files load) and refuses any
/// mismatch, naming every missing, unexpected or mis-shaped tensor. Pickled checkpoints are
/// refused with the conversion to run.
pub fn load_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    refuse_pickles(path)?;
    let mut loaded = read_safetensors(path)?;
    if hf_siglip::is_siglip(loaded.keys()) {
        loaded = hf_siglip::from_hf(loaded)
            .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })?;
    } else if hf::is_hf(loaded.keys()) {
        loaded = hf::from_hf(loaded)
            .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })?;
    } else if loaded.keys().all(|k| k.starts_with("module.")) {
        // Saved from inside DistributedDataParallel, as open_clip's own checkpoints are.
        loaded = loaded.into_iter().map(|(k, v)| (k["module.".len()..].to_owned(), v)).collect();
    }
    let mut vars = vs.variables();
    if vars.contains_key("logit_bias") && !loaded.contains_key("logit_bias") {
        // CLIP weights fine-tuned with the sigmoid loss: the bias keeps its initial value.
        tracing::info!("{} has no logit_bias; it starts at its initial value", path.display());
        vars.remove("logit_bias");
    }
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
        for (name, var) in &vars {
            let src = &loaded[name];
            var.shallow_clone().f_copy_(&src.f_to_kind(var.kind())?.f_to_device(var.device())?)?;
        }
        Ok(())
    })
}

/// We never unpickle (a pickle runs code). `.pt`, `.pth`, `.bin` and `.ckpt` files, and files
/// that start like a zip or a pickle, get the one line of Python that converts them.
fn refuse_pickles(path: &Path) -> Result<()> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    let mut head = [0u8; 9];
    let read =
        std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
    // safetensors: an 8-byte header length, then the JSON header.
    let safetensors = read.is_ok() && head[8] == b'{';
    let pickle_magic = read.is_ok()
        && (head[..4] == *b"PK\x03\x04" || (head[0] == 0x80 && (2..=5).contains(&head[1])));
    if !safetensors && (pickle_magic || ["pt", "pth", "bin", "ckpt"].contains(&ext.as_str())) {
        let p = path.display();
        return Err(TrainError::Weights {
            path: path.into(),
            message: format!(
                "a pickled PyTorch file; oxclip reads safetensors only (unpickling runs arbitrary code). Convert it once with:\n  \
                 python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('{p}', map_location='cpu', weights_only=True); \
                 sd = sd.get('state_dict', sd); save_file({{k.removeprefix('module.'): v.contiguous() for k, v in sd.items()}}, '{p}.safetensors')\""
            ),
        });
    }
    Ok(())
}

/// Writes `vs` as fp32 safetensors with open_clip's keys.
pub fn save_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let tensors: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(k, v)| {
            // Integer buffers (BatchNorm's num_batches_tracked) keep their kind.
            let kind = if v.is_floating_point() { Kind::Float } else { v.kind() };
            Ok((k, v.f_to_kind(kind)?.f_to_device(tch::Device::Cpu)?.f_contiguous()?))
        })
        .collect::<Result<_>>()?;
    Tensor::write_safetensors(&tensors, path)
        .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })
}

/// fp32 safetensors with `{"format": "pt"}` metadata (transformers refuses files without it)
/// and any `extra` metadata. Integer tensors (BatchNorm's `num_batches_tracked`) are written
/// as int64, the dtype PyTorch's `load_state_dict` expects.
pub fn write_safetensors(
    tensors: &BTreeMap<String, Tensor>,
    extra: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, bytes) = if t.is_floating_point() {
            (safetensors::Dtype::F32, crate::bytes::f32_le_bytes(t)?)
        } else {
            (safetensors::Dtype::I64, crate::bytes::i64_le_bytes(t)?)
        };
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        data.push((name.clone(), dtype, shape, bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| TrainError::Weights {
                    path: path.into(),
                    message: format!("{name}: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metadata = extra.unwrap_or_default();
    metadata.insert("format".to_owned(), "pt".to_owned());
    safetensors::tensor::serialize_to_file(views, &Some(metadata), path)
        .map_err(|e| TrainError::Weights { path: path.into(), message: e.to_string() })
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

/// Every tensor of a safetensors file, by name. Read here rather than through tch so that a
/// failure reads as one sentence ("Is a directory (os error 21)", "not a safetensors file")
/// instead of the safetensors crate's debug text.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
    let bad = |message: String| TrainError::Weights { path: path.into(), message };
    let file =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(safetensors_message(&e)))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let size: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            bad(format!("{name} has dtype {:?}, which oxclip does not load", view.dtype()))
        })?;
        out.insert(name, Tensor::f_from_data_size(view.data(), &size, kind)?);
    }
    Ok(out)
}

fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn safetensors_message(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::IoError(io) => io.to_string(),
        E::JsonError(json) => {
            format!("not a safetensors file: its header is not valid JSON ({json})")
        }
        E::HeaderTooSmall
        | E::InvalidHeaderLength
        | E::InvalidHeaderStart
        | E::InvalidHeader
        | E::InvalidHeaderDeserialization => {
            "not a safetensors file: it does not start with a safetensors header".to_owned()
        }
        E::HeaderTooLarge => "not a safetensors file: its header length is over 100 MB".to_owned(),
        E::InvalidOffset(name) => {
            format!("damaged or truncated: the data of {name} lies outside the file")
        }
        E::MetadataIncompleteBuffer
        | E::TensorInvalidInfo
        | E::InvalidTensorView(..)
        | E::ValidationOverflow => {
            "damaged or truncated: the tensors it lists do not fit its size".to_owned()
        }
        E::TensorNotFound(name) => format!("no tensor {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> (nn::VarStore, Clip) {
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

    /// A Hugging Face CLIPModel file (tests/fixtures/make_hf_fixtures.py) loads through the
    /// name mapping and gives transformers' embeddings, in fp32 and from an fp16 copy.
    #[test]
    fn hugging_face_weights_give_transformers_embeddings() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../../tests/fixtures/models/parity-tiny.yaml"))
                .unwrap();
        let io: BTreeMap<String, Tensor> =
            Tensor::read_safetensors(fixtures.join("hf_tiny/io.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        let dir = tempfile::tempdir().unwrap();
        let half = dir.path().join("model-fp16.safetensors");
        let tensors: Vec<(String, Tensor)> =
            Tensor::read_safetensors(fixtures.join("hf_tiny/model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.to_kind(Kind::Half)))
                .collect();
        Tensor::write_safetensors(&tensors, &half).unwrap();
        for (file, tolerance) in [(fixtures.join("hf_tiny/model.safetensors"), 1e-5), (half, 5e-3)]
        {
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Clip::new(&vs.root(), &cfg).unwrap();
            load_weights(&vs, &file).unwrap();
            let (i, t) = tch::no_grad(|| model.features(&io["pixel_values"], &io["input_ids"]));
            let di = (i - &io["image_embeds"]).abs().max().double_value(&[]);
            let dt = (t - &io["text_embeds"]).abs().max().double_value(&[]);
            assert!(di < tolerance && dt < tolerance, "{}: image {di}, text {dt}", file.display());
        }
    }

    #[test]
    fn pickles_are_refused_with_the_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epoch_32.pt");
        std::fs::write(&path, b"PK\x03\x04 a torch.save zip").unwrap();
        let (vs, _) = tiny();
        let err = load_weights(&vs, &path).unwrap_err().to_string();
        assert!(
            err.contains("pickled")
                && err.contains("save_file")
                && err.contains("epoch_32.pt.safetensors"),
            "{err}"
        );
    }

    /// Another architecture's weights: the message counts the mismatches and names a few,
    /// rather than every one of hundreds; a folder or a non-safetensors file reads as a sentence.
    #[test]
    fn mismatched_or_unreadable_weights_read_as_short_sentences() {
        let dir = tempfile::tempdir().unwrap();
        let small: ModelConfig =
            serde_yaml::from_str(include_str!("../../../configs/models/small.yaml")).unwrap();
        let vs_small = nn::VarStore::new(Device::Cpu);
        let _ = Clip::new(&vs_small.root(), &small).unwrap();
        let path = dir.path().join("small.safetensors");
        save_weights(&vs_small, &path).unwrap();
        let (vs, _) = tiny();
        let err = load_weights(&vs, &path).unwrap_err().to_string();
        assert!(err.len() < 1200, "{} characters: {err}", err.len());
        assert!(
            err.contains("more)") && err.contains("tensors") && err.contains("does not match"),
            "{err}"
        );
        for (bad, needle) in [
            (dir.path().to_path_buf(), "Is a directory"),
            (dir.path().join("x.safetensors"), "not a safetensors file"),
        ] {
            if needle.starts_with("not") {
                std::fs::write(&bad, b"0123456789abcdef").unwrap();
            }
            let err = load_weights(&vs, &bad).unwrap_err().to_string();
            assert!(
                err.contains(needle) && !err.contains("Os {") && !err.contains("IoError"),
                "{err}"
            );
        }
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        tch::manual_seed(1);
        let (vs, _) = tiny();
        save_weights(&vs, &path).expect("saves");
        tch::manual_seed(2);
        let (other, _) = tiny();
        load_weights(&other, &path).expect("loads");
        let a = vs.variables();
        for (name, t) in other.variables() {
            assert!(t.equal(&a[&name]), "{name}");
        }
    }
}
