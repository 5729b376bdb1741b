//! Using a trained model: L2-normalised image and text embeddings, with the eval transform
//! (shorter side to the model's size, bicubic, center crop, normalise) and the tokenizer
//! the model was trained with; captions from a CoCa model. Behind `oxclip embed`, `oxclip
//! classify` and `oxclip caption`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tch::{nn, Device, Kind, Tensor};

use oxclip_data_loader::formats::image::{decode_image, is_image_path, DEFAULT_MAX_PIXELS};
use oxclip_data_loader::sources::{Dataset, Sample};
use oxclip_data_loader::transform::ImageTransform;
use oxclip_data_loader::{Loader, LoaderConfig, Preprocess, SkipCounts, SkipReason, Tokenizer};

use crate::error::{io_err, Result, TrainError};
use crate::generate::GenerateOptions;
use crate::model::{normalize, Clip, ModelConfig};

/// A model ready to embed.
pub struct Embedder {
    model: Clip,
    _vs: nn::VarStore,
    /// `None`: the model embeds images only (no tokenizer that fits its text tower was given).
    tokenizer: Option<Tokenizer>,
    preprocess: Preprocess,
    transform: ImageTransform,
    device: Device,
}

/// One generated caption: its token ids and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub ids: Vec<i64>,
    pub text: String,
}

/// The images [`Embedder::embed_images`] embedded, and those it could not use.
pub struct EmbeddedImages {
    /// (n, d), row i = `kept[i]`.
    pub embeds: Tensor,
    pub kept: Vec<PathBuf>,
    /// Each file that could not be used, with why in words, in the order given.
    pub skipped: Vec<(PathBuf, String)>,
    pub skip_counts: SkipCounts,
}

impl Embedder {
    /// The architecture `cfg` with the weights of `weights` (either layout, see
    /// [`crate::interchange::weights::load_weights`]) on `device`.
    /// Images are prepared as [`crate::prepare::default_preprocess`] says for `cfg`; see
    /// [`with_preprocess`](Self::with_preprocess). The tokenizer is checked against the text
    /// tower first ([`crate::prepare::check_tokenizer`]); without one the embedder takes
    /// images only.
    pub fn new(
        cfg: &ModelConfig,
        weights: &Path,
        tokenizer: Option<Tokenizer>,
        device: Device,
    ) -> Result<Self> {
        if let Some(tokenizer) = &tokenizer {
            crate::prepare::check_tokenizer(tokenizer, cfg, "the tokenizer")?;
        }
        let (vs, mut model) = crate::interchange::weights::load(cfg, weights, device)?;
        model.prepare_for_inference();
        let preprocess = crate::prepare::default_preprocess(cfg);
        let transform = ImageTransform::eval_for(&preprocess);
        Ok(Self { model, _vs: vs, tokenizer, preprocess, transform, device })
    }

    /// The same model with images prepared by `preprocess` (the model's own mean/std, resize
    /// mode and interpolation, e.g. from its preprocessor config); its size must be the
    /// model's image size.
    pub fn with_preprocess(mut self, preprocess: &Preprocess) -> Result<Self> {
        let size = self.model.config.vision_cfg.image_size;
        if i64::from(preprocess.size) != size {
            return Err(TrainError::Input(format!(
                "image preprocessing for {}px images, but the model takes {size}px",
                preprocess.size
            )));
        }
        self.transform = ImageTransform::eval_for(preprocess);
        self.preprocess = preprocess.clone();
        Ok(self)
    }

    fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            TrainError::Input(
                "no tokenizer for this model's text tower: this embedder was made for images \
                 only, without one (a tokenizer.json or the directory holding it)"
                    .into(),
            )
        })
    }

    /// `exp(logit_scale)`: how the model scales cosine similarities into logits.
    pub fn logit_scale(&self) -> f64 {
        self.model.logit_scale.exp().double_value(&[])
    }

    /// Embeddings of the image files, (n, d), `batch_size` at a time. A file that cannot be
    /// read or decoded is an error naming it.
    pub fn embed_image_files(&self, paths: &[PathBuf], batch_size: usize) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let mut parts = Vec::new();
        for chunk in paths.chunks(batch_size.max(1)) {
            let images = self.image_batch(chunk)?;
            parts.push(
                normalize(&self.model.encode_image(&images).to_kind(Kind::Float))
                    .to_device(Device::Cpu),
            );
        }
        Ok(cat_or_empty(&parts, self.model.config.embed_dim))
    }

    /// The image files decoded and transformed as the model expects, (n, 3, S, S) on the
    /// model's device; a file that cannot be read or decoded is an error naming it.
    fn image_batch(&self, paths: &[PathBuf]) -> Result<Tensor> {
        let size = self.model.config.vision_cfg.image_size;
        let per_image = self.transform.output_len();
        let mut pixels = vec![0f32; paths.len() * per_image];
        for (path, out) in paths.iter().zip(pixels.chunks_mut(per_image)) {
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            let image = decode_image(&bytes, DEFAULT_MAX_PIXELS)
                .map_err(|reason| unusable_image(path, reason))?;
            self.transform.apply(&image, 0, out);
        }
        Ok(Tensor::from_slice(&pixels)
            .view([paths.len() as i64, 3, size, size])
            .to_device(self.device))
    }

    /// Captions of the image files by a CoCa model (`oxclip caption`), `batch_size` images at
    /// a time, searched as `opts` says (open_clip's `CoCa.generate`; `model::coca::caption`).
    /// The start, end and padding ids are the tokenizer's and the model's, whatever `opts`
    /// holds. Each caption is its ids (start token first, cut after the end token) and its text.
    pub fn caption_image_files(
        &self,
        paths: &[PathBuf],
        batch_size: usize,
        opts: &GenerateOptions,
    ) -> Result<Vec<Caption>> {
        if !self.model.is_coca() {
            return Err(TrainError::Input(
                "this model has no captioning decoder (multimodal_cfg): only CoCa models caption"
                    .into(),
            ));
        }
        let tokenizer = self.tokenizer()?;
        let (Some(sot_id), Some(eos_id)) = (tokenizer.sot_id(), tokenizer.eot_id()) else {
            return Err(TrainError::Input(
                "the tokenizer has no start and end tokens, which captions begin and end with"
                    .into(),
            ));
        };
        let opts = GenerateOptions { sot_id, eos_id, pad_id: self.model.pad_id(), ..opts.clone() };
        let mut out = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(batch_size.max(1)) {
            let images = self.image_batch(chunk)?;
            for mut ids in crate::model::coca::caption(&self.model, &images, &opts)? {
                if let Some(end) = ids.iter().skip(1).position(|&id| id == eos_id) {
                    ids.truncate(end + 2);
                }
                let text = tokenizer.decode(&ids).trim().to_owned();
                out.push(Caption { ids, text });
            }
        }
        Ok(out)
    }

    /// Embeddings of the image files, `batch_size` at a time, decoded and transformed on
    /// `workers` loader threads (the evaluation loader, files in the order given). A file that
    /// cannot be read or decoded is skipped and reported, as the loader skips samples; only
    /// when none is usable is it an error. `progress` is told how many files each batch took.
    pub fn embed_images(
        &self,
        paths: &[PathBuf],
        batch_size: usize,
        workers: usize,
        progress: &mut dyn FnMut(u64),
    ) -> Result<EmbeddedImages> {
        let files =
            Arc::new(ImageFiles { paths: paths.to_vec(), failures: Mutex::new(Vec::new()) });
        // The loader tokenizes every sample's caption; image files have none (an empty one is
        // encoded and never read), so any tokenizer does.
        let tokenizer = match &self.tokenizer {
            Some(t) => t.clone(),
            None => Tokenizer::clip_default()?,
        };
        let size = self.model.config.vision_cfg.image_size;
        let context = self.model.config.text_cfg.context_length;
        let mut loader = Loader::new(
            Arc::clone(&files) as Arc<dyn Dataset>,
            tokenizer,
            LoaderConfig {
                batch_size: batch_size.max(1),
                rank: 0,
                world_size: 1,
                seed: 0,
                image_size: size as u32,
                context_length: context as usize,
                workers: workers.max(1),
                train: false,
                preprocess: Some(self.preprocess.clone()),
            },
        )?;
        let _guard = tch::no_grad_guard();
        let (mut parts, mut kept, mut skip_counts) = (Vec::new(), Vec::new(), SkipCounts::new());
        while let Some(batch) = loader.next_eval_batch()? {
            skip_counts.merge(&batch.skipped);
            progress(batch.batch_size as u64 + batch.skipped.total());
            kept.extend(batch.indices.iter().map(|&i| paths[i as usize].clone()));
            if batch.batch_size == 0 {
                continue;
            }
            let (images, _) = crate::device::batch_to_device(&batch, size, context, self.device)?;
            parts.push(
                normalize(&self.model.encode_image(&images).to_kind(Kind::Float))
                    .to_device(Device::Cpu),
            );
            loader.recycle(batch);
        }
        let mut failures =
            std::mem::take(&mut *files.failures.lock().unwrap_or_else(PoisonError::into_inner));
        failures.sort_by_key(|(i, _)| *i);
        let skipped: Vec<(PathBuf, String)> = failures
            .into_iter()
            .map(|(i, reason)| (paths[i].clone(), unusable_image(&paths[i], reason).to_string()))
            .collect();
        if kept.is_empty() && !paths.is_empty() {
            let first =
                skipped.first().map(|(_, why)| format!("; the first: {why}")).unwrap_or_default();
            return Err(TrainError::Input(format!(
                "none of the {} image(s) could be used ({skip_counts}){first}",
                paths.len()
            )));
        }
        Ok(EmbeddedImages {
            embeds: cat_or_empty(&parts, self.model.config.embed_dim),
            kept,
            skipped,
            skip_counts,
        })
    }

    /// Embeddings of the texts, (m, d), tokenized as in training.
    pub fn embed_texts(&self, texts: &[String], batch_size: usize) -> Result<Tensor> {
        let tokenizer = self.tokenizer()?;
        let _guard = tch::no_grad_guard();
        let context = self.model.config.text_cfg.context_length as usize;
        let mut parts = Vec::new();
        for chunk in texts.chunks(batch_size.max(1)) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let ids = tokenizer.encode_batch(&refs, context);
            let tokens = Tensor::from_slice(&ids)
                .view([chunk.len() as i64, context as i64])
                .to_device(self.device);
            parts.push(
                normalize(&self.model.encode_text(&tokens).to_kind(Kind::Float))
                    .to_device(Device::Cpu),
            );
        }
        Ok(cat_or_empty(&parts, self.model.config.embed_dim))
    }

    /// For one image and several labels: each label's probability. A CLIP model gives the
    /// softmax of the scaled cosine similarities over the labels (CLIP paper, figure 1); a
    /// model trained with the sigmoid loss (it has a `logit_bias`) gives each label's own
    /// probability, `sigmoid(s cos + b)`, as SigLIP is meant to be read.
    ///
    /// A blank or repeated label is an error, and so is a single label for a CLIP model: its
    /// probabilities are shares of the labels given, so one label always gets 100%.
    pub fn classify(&self, image: &Path, labels: &[String]) -> Result<Vec<f64>> {
        check_labels(labels, self.model.logit_bias.is_some())?;
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

/// Image files as a dataset for the loader: sample i is file i, decoded as `embed` always
/// has (PIL's pixel limit), without a caption. Which files failed, and why, is kept: the
/// loader only counts skips by reason.
struct ImageFiles {
    paths: Vec<PathBuf>,
    failures: Mutex<Vec<(usize, SkipReason)>>,
}

impl ImageFiles {
    fn decode(&self, index: usize) -> std::result::Result<Sample, SkipReason> {
        let path = self.paths.get(index).ok_or(SkipReason::MissingImage)?;
        let bytes = std::fs::read(path).map_err(|_| SkipReason::MissingImage)?;
        let image = decode_image(&bytes, DEFAULT_MAX_PIXELS)?;
        let name = path.display().to_string();
        Ok(Sample {
            image,
            caption: String::new(),
            label: None,
            key: name.clone(),
            source: Some(name),
        })
    }
}

impl Dataset for ImageFiles {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn get(&self, index: usize) -> std::result::Result<Sample, SkipReason> {
        self.decode(index).inspect_err(|&reason| {
            self.failures.lock().unwrap_or_else(PoisonError::into_inner).push((index, reason))
        })
    }

    fn describe(&self, index: usize) -> String {
        self.paths
            .get(index)
            .map_or_else(|| format!("image {index} (out of range)"), |p| p.display().to_string())
    }
}

/// Why an image file that was read cannot be used, in words: a format oxclip does not read
/// is not the same as a broken file.
fn unusable_image(path: &Path, reason: SkipReason) -> TrainError {
    let why = match reason {
        SkipReason::TooManyPixels => format!("the image has more than {DEFAULT_MAX_PIXELS} pixels"),
        _ if !is_image_path(path) => {
            let ext = path
                .extension()
                .map_or_else(|| "no extension".to_owned(), |e| format!(".{}", e.to_string_lossy()));
            format!("unsupported image format ({ext}); oxclip reads JPEG, PNG and WebP (.jpg, .jpeg, .png, .webp)")
        }
        other => format!("the file cannot be decoded as an image ({other})"),
    };
    TrainError::Input(format!("cannot use {}: {why}", path.display()))
}

/// The labels `classify` scores one image against: none blank, none twice, and for a softmax
/// (CLIP) model at least two, since the probabilities are shares among the labels given.
fn check_labels(labels: &[String], sigmoid: bool) -> Result<()> {
    if let Some(i) = labels.iter().position(|l| l.trim().is_empty()) {
        return Err(TrainError::Labels(format!(
            "label {} is empty; give each label as text (\"a photo of a dog\" or \"dog\")",
            i + 1
        )));
    }
    for (i, label) in labels.iter().enumerate() {
        if let Some(first) = labels[..i].iter().position(|l| l == label) {
            return Err(TrainError::Labels(format!(
                "`{label}` is given twice (labels {} and {})",
                first + 1,
                i + 1
            )));
        }
    }
    let least = if sigmoid { 1 } else { 2 };
    if labels.len() < least {
        return Err(TrainError::Labels(if sigmoid {
            "give at least one label".to_owned()
        } else {
            format!(
                "give at least 2 labels (got {}); a CLIP model's probabilities are shares among the labels given, so a single label always gets 100%",
                labels.len()
            )
        }));
    }
    Ok(())
}

fn cat_or_empty(parts: &[Tensor], dim: i64) -> Tensor {
    if parts.is_empty() {
        Tensor::zeros([0, dim], (Kind::Float, Device::Cpu))
    } else {
        Tensor::cat(parts, 0)
    }
}

/// Image files in `paths`: files as given, directories searched (recursively, sorted) for
/// `.jpg`, `.jpeg`, `.png` and `.webp` files. A directory holding none is an error naming
/// it: an empty result would look like a successful run over nothing.
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found = Vec::new();
            collect_images(path, &mut found)?;
            if found.is_empty() {
                return Err(TrainError::Input(format!(
                    "{} holds no images (looked for .jpg, .jpeg, .png and .webp files, in subfolders too)",
                    path.display()
                )));
            }
            found.sort();
            out.extend(found);
        } else if path.is_file() {
            out.push(path.clone());
        } else {
            return Err(TrainError::Input(format!("{} does not exist", path.display())));
        }
    }
    Ok(out)
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if is_image_path(&path) {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn labels_that_cannot_rank_anything_are_refused() {
        assert!(check_labels(&labels(&["dog", "cat"]), false).is_ok());
        let one = check_labels(&labels(&["dog"]), false).unwrap_err().to_string();
        assert!(one.contains("at least 2 labels") && one.contains("100%"), "{one}");
        // A sigmoid (SigLIP) model scores each label on its own: one is a fair question.
        assert!(check_labels(&labels(&["dog"]), true).is_ok());
        assert!(check_labels(&[], true).is_err());
        let blank = check_labels(&labels(&["dog", " "]), false).unwrap_err().to_string();
        assert!(blank.contains("label 2 is empty"), "{blank}");
        let twice = check_labels(&labels(&["dog", "cat", "dog"]), true).unwrap_err().to_string();
        assert!(twice.contains("`dog` is given twice (labels 1 and 3)"), "{twice}");
    }

    #[test]
    fn an_unreadable_image_says_which_and_why() {
        let gif =
            unusable_image(Path::new("photos/anim.gif"), SkipReason::UndecodableImage).to_string();
        assert!(
            gif.contains("photos/anim.gif") && gif.contains("unsupported image format (.gif)"),
            "{gif}"
        );
        let broken =
            unusable_image(Path::new("photos/x.jpg"), SkipReason::UndecodableImage).to_string();
        assert!(
            broken.contains("photos/x.jpg") && broken.contains("cannot be decoded"),
            "{broken}"
        );
        for message in [gif, broken] {
            assert!(!message.contains("training config"), "{message}");
        }
    }

    /// `embed` through the loader's threads gives each file the embedding the direct path
    /// (decode, transform, encode one batch, as `classify` does) gives it, and names the file
    /// it skips.
    #[test]
    fn loader_threads_embed_as_the_direct_path_and_skip_what_is_broken() {
        let cfg: ModelConfig =
            serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml")).expect("parses");
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("tiny.safetensors");
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Clip::new(&vs.root(), &cfg).expect("builds");
        vs.save(&weights).expect("saves");
        let embedder = Embedder::new(&cfg, &weights, None, Device::Cpu).expect("loads");

        // Real photos and drawings, JPEG and PNG, of several sizes.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cli_parity");
        let paths: Vec<PathBuf> = ["photo.jpg", "exact32.png", "photo45x37.jpg", "exact.png"]
            .iter()
            .map(|f| fixtures.join(f))
            .collect();
        let broken = dir.path().join("broken.png");
        std::fs::write(&broken, b"not a png").unwrap();
        let mut all = paths.clone();
        all.insert(2, broken.clone());

        let direct = embedder.embed_image_files(&paths, 64).unwrap();
        let mut seen = 0;
        let loaded = embedder.embed_images(&all, 2, 3, &mut |n| seen += n).unwrap();
        assert_eq!(seen, 5, "progress counts every file, skipped ones too");
        assert_eq!(loaded.kept, paths);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].0, broken);
        assert!(
            loaded.skipped[0].1.contains("broken.png")
                && loaded.skipped[0].1.contains("cannot be decoded"),
            "{}",
            loaded.skipped[0].1
        );
        assert_eq!(loaded.skip_counts.total(), 1);
        let diff = (&loaded.embeds - &direct).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max abs diff {diff}");
        // Distinct images, distinct rows: a row out of place would show.
        assert!((loaded.embeds.get(0) - loaded.embeds.get(1)).abs().max().double_value(&[]) > 1e-4);

        let none = embedder
            .embed_images(std::slice::from_ref(&broken), 4, 1, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            none.contains("none of the 1 image(s) could be used") && none.contains("broken.png"),
            "{none}"
        );
    }

    #[test]
    fn a_folder_without_images_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let err = image_files(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(
            err.contains(&dir.path().display().to_string()) && err.contains("holds no images"),
            "{err}"
        );
        let gone = image_files(&[dir.path().join("gone.jpg")]).unwrap_err().to_string();
        assert!(gone.contains("gone.jpg does not exist"), "{gone}");
    }
}
