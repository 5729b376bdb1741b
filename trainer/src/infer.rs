//! Using a trained model: L2-normalised image and text embeddings, with the eval transform
//! (shorter side to the model's size, bicubic, center crop, normalise) and the tokenizer
//! the model was trained with. Behind `oxclip embed` and `oxclip classify`.

use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use oxclip_data_loader::transform::{decode_image, DEFAULT_MAX_PIXELS};
use oxclip_data_loader::{ImageTransform, Tokenizer};

use crate::error::{io_err, Result, TrainError};
use crate::model::{normalize, Clip, ModelConfig};

/// A model ready to embed.
pub struct Embedder {
    model: Clip,
    _vs: nn::VarStore,
    tokenizer: Tokenizer,
    transform: ImageTransform,
    device: Device,
}

impl Embedder {
    /// The architecture `cfg` with the weights of `weights` (either layout, see
    /// [`load_weights`]) on `device`.
    pub fn new(cfg: &ModelConfig, weights: &Path, tokenizer: Tokenizer, device: Device) -> Result<Self> {
        let (vs, model) = crate::model::load(cfg, weights, device)?;
        let transform = ImageTransform::eval(cfg.vision_cfg.image_size as u32);
        Ok(Self { model, _vs: vs, tokenizer, transform, device })
    }

    /// `exp(logit_scale)`: how the model scales cosine similarities into logits.
    pub fn logit_scale(&self) -> f64 {
        self.model.logit_scale.exp().double_value(&[])
    }

    /// Embeddings of the image files, (n, d), `batch_size` at a time. A file that cannot be
    /// read or decoded is an error naming it.
    pub fn embed_image_files(&self, paths: &[PathBuf], batch_size: usize) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let size = self.model.config.vision_cfg.image_size;
        let per_image = self.transform.output_len();
        let mut parts = Vec::new();
        for chunk in paths.chunks(batch_size.max(1)) {
            let mut pixels = vec![0f32; chunk.len() * per_image];
            for (path, out) in chunk.iter().zip(pixels.chunks_mut(per_image)) {
                let bytes = std::fs::read(path).map_err(io_err(path))?;
                let image = decode_image(&bytes, DEFAULT_MAX_PIXELS).map_err(|reason| {
                    TrainError::Config(format!("{}: cannot use this image ({reason})", path.display()))
                })?;
                self.transform.apply(&image, 0, out);
            }
            let images = Tensor::from_slice(&pixels).view([chunk.len() as i64, 3, size, size]).to_device(self.device);
            parts.push(normalize(&self.model.encode_image(&images).to_kind(Kind::Float)).to_device(Device::Cpu));
        }
        Ok(cat_or_empty(&parts, self.model.config.embed_dim))
    }

    /// Embeddings of the texts, (m, d), tokenized as in training.
    pub fn embed_texts(&self, texts: &[String], batch_size: usize) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let context = self.model.config.text_cfg.context_length as usize;
        let mut parts = Vec::new();
        for chunk in texts.chunks(batch_size.max(1)) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let ids = self.tokenizer.encode_batch(&refs, context);
            let tokens = Tensor::from_slice(&ids).view([chunk.len() as i64, context as i64]).to_device(self.device);
            parts.push(normalize(&self.model.encode_text(&tokens).to_kind(Kind::Float)).to_device(Device::Cpu));
        }
        Ok(cat_or_empty(&parts, self.model.config.embed_dim))
    }

    /// For one image and several labels: each label's probability. A CLIP model gives the
    /// softmax of the scaled cosine similarities over the labels (CLIP paper, figure 1); a
    /// model trained with the sigmoid loss (it has a `logit_bias`) gives each label's own
    /// probability, `sigmoid(s cos + b)`, as SigLIP is meant to be read.
    pub fn classify(&self, image: &Path, labels: &[String]) -> Result<Vec<f64>> {
        let image = self.embed_image_files(&[image.to_path_buf()], 1)?;
        let texts = self.embed_texts(labels, 256)?;
        let logits = image.matmul(&texts.tr()).to_kind(Kind::Double) * self.logit_scale();
        let probs = match &self.model.logit_bias {
            Some(bias) => (logits + bias.to_kind(Kind::Double).to_device(Device::Cpu)).sigmoid(),
            None => logits.softmax(1, Kind::Double),
        };
        Ok(Vec::<f64>::try_from(&probs.view([-1]))?)
    }
}

fn cat_or_empty(parts: &[Tensor], dim: i64) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0, dim], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(parts, 0)
    }
}

/// Image files in `paths`: files as given, directories searched (recursively, sorted) for
/// `.jpg`, `.jpeg`, `.png` and `.webp` files.
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            collect_images(path, &mut found)?;
            found.sort();
            out.extend(found);
        } else if path.is_file() {
            out.push(path.clone());
        } else {
            return Err(TrainError::Config(format!("{} does not exist", path.display())));
        }
    }
    Ok(out)
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if oxclip_data_loader::sources::is_image_path(&path) {
            out.push(path);
        }
    }
    Ok(())
}
