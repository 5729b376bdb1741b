//! The evaluations the field reports, as open_clip computes them:
//!
//! - zero-shot classification (CLIP paper section 3.1.4; open_clip `zero_shot_classifier.py`):
//!   each class's text embedding is the normalised mean of its prompts' normalised
//!   embeddings; an image is assigned the class of highest cosine similarity;
//! - image-text retrieval over pairs (open_clip `get_clip_metrics`): for each image the rank
//!   of its own caption among all captions, and the reverse; R@1/5/10, mean and median rank;
//! - image-text retrieval with several captions per image (clip_benchmark
//!   `metrics/zeroshot_retrieval.py`): a caption finds its image within k, an image finds
//!   any of its captions within k.
//!
//! [`benchmark`] reads the sets the field shares: ImageNet-1k (class names built in) and
//! clip_benchmark's webdataset layout.

pub mod benchmark;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use oxclip_data_loader::formats::webdataset;
use oxclip_data_loader::sources::shards::{ShardSet, ShardSource};
use oxclip_data_loader::sources::spec::DEFAULT_LABEL_KEY;
use oxclip_data_loader::sources::{self, classes, FileDataset};
use oxclip_data_loader::{
    DataSource, DataSpec, Loader, LoaderConfig, Preprocess, ShardOptions, SkipCounts, Tokenizer,
};

use crate::collectives::{self, Collectives};
use crate::error::{Result, TrainError};
use crate::model::{normalize, Clip, ModelConfig};

/// Top-1 and top-5 accuracy of a zero-shot evaluation, in [0, 1], and the mean over the
/// classes present of each class's top-1 recall (clip_benchmark's `mean_per_class_recall`,
/// sklearn's `balanced_accuracy_score`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroShotResult {
    pub top1: f64,
    pub top5: f64,
    pub mean_per_class_recall: f64,
    pub samples: u64,
}

/// The labelled images and the class names of a zero-shot evaluation, checked against each
/// other by [`open_zero_shot`].
pub struct ZeroShotSet {
    pub source: DataSource,
    /// Line i names class i.
    pub classnames: Vec<String>,
}

/// Opens `spec` for zero-shot evaluation with the class names of `classnames` (one per line,
/// line i names class i) and refuses, before anything is embedded, what cannot be scored
/// honestly: data without class labels, a class names file whose count differs from the
/// class folders', a CSV/JSONL label outside the class list, a set with no images. The one
/// check behind `oxclip eval --zero-shot` and training's `data.val` with `data.classnames`.
///
/// - `classes:DIR`: the folder names are the class names unless `classnames` is given, and
///   then it must name as many classes as there are folders;
/// - a CSV or JSONL file: its `label_key` column (`label` when the spec names none) holds
///   each row's class index, every one below the number of class names;
/// - shards and `synthetic:N`: labels (`.cls`) are read as the images are; one outside the
///   class list fails the evaluation (see [`evaluate`]);
/// - a folder of captioned images has no labels and is refused.
pub fn open_zero_shot(
    spec: &DataSpec,
    classnames: Option<&Path>,
    seed: u64,
) -> Result<ZeroShotSet> {
    let listed =
        classnames.map(|file| Ok::<_, TrainError>((read_lines(file)?, file))).transpose()?;
    let needs_names = || {
        TrainError::Input(format!(
            "zero-shot evaluation of `{}` needs the class names: a file with one per line, line i naming class i \
             (--classnames FILE, or data.classnames in a run config)",
            describe_spec(spec)
        ))
    };
    match spec {
        DataSpec::Classes(dir) => {
            let (dataset, folders) = classes::load(dir)?;
            let classnames = match listed {
                Some((names, file)) if names.len() != folders.len() => {
                    return Err(TrainError::Input(format!(
                        "{} names {} classes but {} has {} class folders ({}); line i of the class names file names \
                         the i-th folder in sorted order, so the counts must match (or leave the file out to use the folder names)",
                        file.display(),
                        names.len(),
                        dir.display(),
                        folders.len(),
                        first_few(&folders)
                    )))
                }
                Some((names, _)) => names,
                None => folders,
            };
            labelled_files(dataset, classnames, &format!("{} has", dir.display()))
        }
        DataSpec::Csv(csv) => {
            let (names, file) = listed.ok_or_else(needs_names)?;
            let mut csv = csv.clone();
            csv.label_key.get_or_insert_with(|| DEFAULT_LABEL_KEY.to_owned());
            labelled_files(sources::csv::load(&csv)?, names, &format!("{} names", file.display()))
        }
        DataSpec::Jsonl(jsonl) => {
            let (names, file) = listed.ok_or_else(needs_names)?;
            let mut jsonl = jsonl.clone();
            jsonl.label_key.get_or_insert_with(|| DEFAULT_LABEL_KEY.to_owned());
            labelled_files(sources::jsonl::load(&jsonl)?, names, &format!("{} names", file.display()))
        }
        DataSpec::Folder(dir) => Err(TrainError::Input(format!(
            "{} is a folder of captioned images: it has no class labels to score zero-shot accuracy against. Give a folder \
             per class (classes:DIR), a CSV or JSONL with a label column (csv:FILE?label_key=COLUMN), or shards whose \
             samples carry a class index (KEY.cls)",
            dir.display()
        ))),
        DataSpec::Shards(parts) => {
            let (names, file) = listed.ok_or_else(needs_names)?;
            check_shard_labels(parts, &names, &file.display().to_string())?;
            let source = DataSource::open(spec, seed)?;
            Ok(ZeroShotSet { source, classnames: names })
        }
        DataSpec::Synthetic(_) => {
            let (names, _) = listed.ok_or_else(needs_names)?;
            let source = DataSource::open(spec, seed)?;
            if source.is_empty() {
                return Err(TrainError::Input(format!("`{}` holds no samples to evaluate", describe_spec(spec))));
            }
            Ok(ZeroShotSet { source, classnames: names })
        }
    }
}

/// Opens a set resolved by [`benchmark::resolve`] and checks it as [`open_zero_shot`] does:
/// a classification set's labels against its class names (a folder count, every shard's
/// `cls`), a retrieval set for having samples.
pub fn open_benchmark(set: &benchmark::Benchmark, seed: u64) -> Result<DataSource> {
    match (&set.task, &set.spec) {
        (benchmark::Task::Retrieval, spec) => {
            let source = DataSource::open(spec, seed)?;
            if source.is_empty() {
                return Err(TrainError::Input(format!(
                    "`{}` holds no image-caption samples to evaluate",
                    describe_spec(spec)
                )));
            }
            Ok(source)
        }
        (benchmark::Task::Classification { classnames, .. }, DataSpec::Classes(dir)) => {
            let (dataset, _) = classes::load(dir)?;
            Ok(labelled_files(dataset, classnames.clone(), &format!("{} has", dir.display()))?
                .source)
        }
        (benchmark::Task::Classification { classnames, .. }, DataSpec::Shards(parts)) => {
            let named_by = match parts
                .first()
                .and_then(|p| Path::new(&p.spec).parent())
                .and_then(Path::parent)
            {
                Some(dir) if dir.join("classnames.txt").is_file() => {
                    dir.join("classnames.txt").display().to_string()
                }
                _ => "the class list".to_owned(),
            };
            check_shard_labels(parts, classnames, &named_by)?;
            Ok(DataSource::open(&set.spec, seed)?)
        }
        (benchmark::Task::Classification { .. }, spec) => Err(TrainError::Input(format!(
            "`{}` is neither a folder per class nor shards with class labels",
            describe_spec(spec)
        ))),
    }
}

/// Reads the class index (`KEY.cls`) of every sample of the shards, without decoding any
/// image, so that shards with no labels, or with a label beyond the class list, fail before
/// the model is loaded (and at the start of training for `data.val`), not at the first
/// evaluation.
/// `named_by` says where the class names came from (a file, the built-in list).
fn check_shard_labels(parts: &[ShardSource], classnames: &[String], named_by: &str) -> Result<()> {
    let n = classnames.len() as i64;
    let (mut labelled, mut unlabelled) = (0u64, 0u64);
    let mut outside: Option<(PathBuf, String, i64)> = None;
    for shard in &ShardSet::resolve(parts)?.shards {
        let name = shard.location.name();
        let Ok(reader) = shard.location.open() else {
            // Unreadable shards are counted and reported by the loader itself.
            continue;
        };
        webdataset::for_each_sample_in(reader, &name, |item| {
            match item.map(|sample| (sample.label, sample.key)) {
                Ok((Some(label), key)) if !(0..n).contains(&label) => {
                    outside = Some((name.clone(), key, label));
                    return ControlFlow::Break(());
                }
                Ok((Some(_), _)) => labelled += 1,
                Ok((None, _)) => unlabelled += 1,
                // Samples the reader cannot use are skipped and counted by the loader.
                Err(_) => {}
            }
            ControlFlow::Continue(())
        });
        if outside.is_some() {
            break;
        }
    }
    if let Some((shard, key, label)) = outside {
        return Err(TrainError::Input(format!(
            "{}, sample {key}: label {label} is outside the class list: {named_by} names {n} classes (labels 0 to {})",
            shard.display(),
            n - 1
        )));
    }
    if labelled == 0 {
        let spec: Vec<&str> = parts.iter().map(|p| p.spec.as_str()).collect();
        return Err(TrainError::Input(format!(
            "no sample of {} carries a class label ({} read): zero-shot evaluation needs each image's class index as a \
             KEY.cls member (0 for the first line of {named_by})",
            spec.join("::"),
            unlabelled,
        )));
    }
    if unlabelled > 0 {
        tracing::warn!(
            "{unlabelled} of {} samples carry no class label (KEY.cls) and are not scored",
            labelled + unlabelled
        );
    }
    Ok(())
}

/// A CSV/JSONL/class-folder dataset whose every entry is labelled, checked against the
/// class list.
/// `named_by` says where the class list came from: `names.txt names`, `DIR has`.
fn labelled_files(
    dataset: FileDataset,
    classnames: Vec<String>,
    named_by: &str,
) -> Result<ZeroShotSet> {
    let source = dataset.source().to_owned();
    if dataset.entries().is_empty() {
        return Err(TrainError::Input(format!(
            "{} holds no image to evaluate{}",
            source.display(),
            skipped_note(&sources::Dataset::load_skips(&dataset))
        )));
    }
    let n = classnames.len() as i64;
    if let Some(entry) = dataset.entries().iter().find(|e| e.label.is_none_or(|l| l >= n)) {
        let label = entry.label.map_or_else(|| "none".to_owned(), |l| l.to_string());
        return Err(TrainError::Input(format!(
            "{}, {}: label {label} is outside the class list: {named_by} {n} classes (labels 0 to {})",
            source.display(),
            entry.origin,
            n - 1
        )));
    }
    Ok(ZeroShotSet { source: DataSource::Indexed(Arc::new(dataset)), classnames })
}

/// ` (skipped: missing_image 3, empty_caption 1)`, or nothing when nothing was skipped.
fn skipped_note(skips: &SkipCounts) -> String {
    if skips.total() == 0 {
        return String::new();
    }
    let parts: Vec<String> = skips.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    format!(" (skipped: {})", parts.join(", "))
}

/// The first few names, then how many more.
fn first_few(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text =
        names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

fn describe_spec(spec: &DataSpec) -> String {
    match spec {
        DataSpec::Csv(csv) => csv.path.display().to_string(),
        DataSpec::Jsonl(jsonl) => jsonl.path.display().to_string(),
        DataSpec::Folder(dir) | DataSpec::Classes(dir) => dir.display().to_string(),
        DataSpec::Synthetic(n) => format!("synthetic:{n}"),
        DataSpec::Shards(parts) => {
            parts.iter().map(|p| p.spec.clone()).collect::<Vec<_>>().join("::")
        }
    }
}

/// (embed_dim, classes) matrix of class embeddings.
pub fn zero_shot_classifier(
    model: &Clip,
    tokenizer: &Tokenizer,
    classnames: &[String],
    templates: &[String],
    device: Device,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let context_length = model.config.text_cfg.context_length as usize;
    let mut columns = Vec::with_capacity(classnames.len());
    for name in classnames {
        let prompts: Vec<String> = templates.iter().map(|t| t.replace("{}", name)).collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let ids = tokenizer.encode_batch(&refs, context_length);
        let tokens = Tensor::from_slice(&ids)
            .view([prompts.len() as i64, context_length as i64])
            .to_device(device);
        let embeddings = normalize(&model.encode_text(&tokens).to_kind(Kind::Float));
        columns.push(normalize(&embeddings.mean_dim([0i64].as_slice(), false, Kind::Float)));
    }
    Ok(Tensor::stack(&columns, 1))
}

/// Classifies every labelled sample the loader yields (one pass, in dataset order).
pub fn zero_shot_accuracy(
    model: &Clip,
    classifier: &Tensor,
    loader: &mut Loader,
    device: Device,
) -> Result<ZeroShotResult> {
    let result = evaluate(
        model,
        loader,
        Some(classifier),
        false,
        device,
        &crate::collectives::SingleProcess,
    )?;
    result
        .zero_shot
        .ok_or_else(|| TrainError::Input("the evaluation gave no zero-shot result".to_owned()))
}

/// Image<->text retrieval metrics, with open_clip's names.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalResult {
    pub pairs: u64,
    /// (name, value), e.g. `("image_to_text_R@1", 0.52)`, in a fixed order.
    pub metrics: Vec<(String, f64)>,
}

impl RetrievalResult {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Rows of `queries` scored against all of `targets` at a time.
const RETRIEVAL_CHUNK: i64 = 1024;

/// For each row i of `queries` (n, d), the 0-based rank of `targets[i]` among all rows of
/// `targets` (n, d) by dot product: the number of targets scoring strictly higher. Computed
/// `RETRIEVAL_CHUNK` rows at a time, so memory is O(chunk x n), not O(n^2).
fn ranks_of_own_pair(queries: &Tensor, targets: &Tensor) -> Tensor {
    let n = queries.size()[0];
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = RETRIEVAL_CHUNK.min(n - start);
        let scores = queries.narrow(0, start, len).matmul(&targets.tr());
        // The own pair's score taken from the same matrix, so ties compare equal exactly.
        let own = scores.gather(
            1,
            &Tensor::arange_start(start, start + len, (Kind::Int64, scores.device())).unsqueeze(1),
            false,
        );
        parts.push(scores.gt_tensor(&own).sum_dim_intlist([1i64].as_slice(), false, Kind::Int64));
        start += len;
    }
    Tensor::cat(&parts, 0)
}

/// open_clip's `get_clip_metrics` on L2-normalised embeddings of n image-caption pairs
/// (row i of each is pair i): for both directions R@1, R@5, R@10, mean rank and median
/// rank (1-based; the median floored as numpy's is).
pub fn retrieval_metrics(image: &Tensor, text: &Tensor) -> RetrievalResult {
    let _guard = tch::no_grad_guard();
    let (image, text) = (image.to_kind(Kind::Float), text.to_kind(Kind::Float));
    let n = image.size()[0];
    let mut metrics = Vec::new();
    for (name, ranks) in [
        ("image_to_text", ranks_of_own_pair(&image, &text)),
        ("text_to_image", ranks_of_own_pair(&text, &image)),
    ] {
        let ranks: Vec<i64> = Vec::try_from(&ranks.to_device(Device::Cpu)).unwrap_or_default();
        let mean = ranks.iter().sum::<i64>() as f64 / n.max(1) as f64 + 1.0;
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        let median = match sorted.len() {
            0 => 0.0,
            len if len % 2 == 1 => sorted[len / 2] as f64,
            len => (sorted[len / 2 - 1] + sorted[len / 2]) as f64 / 2.0,
        };
        metrics.push((format!("{name}_mean_rank"), mean));
        metrics.push((format!("{name}_median_rank"), median.floor() + 1.0));
        for k in [1, 5, 10] {
            let hits = ranks.iter().filter(|&&r| r < k).count();
            metrics.push((format!("{name}_R@{k}"), hits as f64 / n.max(1) as f64));
        }
    }
    RetrievalResult { pairs: n as u64, metrics }
}

/// clip_benchmark's retrieval recall (`metrics/zeroshot_retrieval.py`) on L2-normalised
/// embeddings of n images and m captions, caption t describing image `caption_image[t]`:
/// `image_retrieval_recall@k`, the share of captions whose image is among the k images
/// scoring highest for it, and `text_retrieval_recall@k`, the share of images with at least
/// one of their captions among the k captions scoring highest for them, for k = 1, 5, 10.
/// A rank here is the number of candidates scoring strictly higher (ties are rare in
/// floating point; clip_benchmark's `topk` breaks them by position).
pub fn multi_caption_recall(
    image: &Tensor,
    text: &Tensor,
    caption_image: &[i64],
) -> Result<RetrievalResult> {
    let _guard = tch::no_grad_guard();
    let (image, text) = (image.to_kind(Kind::Float), text.to_kind(Kind::Float));
    let (n, m) = (image.size()[0], text.size()[0]);
    let device = image.device();
    let owner = Tensor::from_slice(caption_image).to_device(device);
    // Caption -> image: the rank of its own image.
    let mut caption_ranks = Vec::new();
    let mut start = 0;
    while start < m {
        let len = RETRIEVAL_CHUNK.min(m - start);
        let scores = text.narrow(0, start, len).matmul(&image.tr());
        let own = scores.gather(1, &owner.narrow(0, start, len).unsqueeze(1), false);
        caption_ranks.push(scores.gt_tensor(&own).sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Int64,
        ));
        start += len;
    }
    // Image -> captions: the rank of its best-scoring own caption.
    let mut image_ranks = Vec::new();
    let mut start = 0;
    while start < n {
        let len = RETRIEVAL_CHUNK.min(n - start);
        let scores = image.narrow(0, start, len).matmul(&text.tr());
        let rows = Tensor::arange_start(start, start + len, (Kind::Int64, device)).unsqueeze(1);
        let own = owner.unsqueeze(0).eq_tensor(&rows);
        let best =
            scores.masked_fill(&own.logical_not(), f64::NEG_INFINITY).amax([1i64].as_slice(), true);
        image_ranks.push(scores.gt_tensor(&best).sum_dim_intlist(
            [1i64].as_slice(),
            false,
            Kind::Int64,
        ));
        start += len;
    }
    let ranks = |parts: Vec<Tensor>| -> Result<Vec<i64>> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(Vec::<i64>::try_from(&Tensor::cat(&parts, 0).to_device(Device::Cpu))?)
    };
    let mut metrics = Vec::new();
    for (name, ranks) in
        [("image_retrieval", ranks(caption_ranks)?), ("text_retrieval", ranks(image_ranks)?)]
    {
        for k in [1, 5, 10] {
            let hits = ranks.iter().filter(|&&r| r < k).count();
            metrics.push((format!("{name}_recall@{k}"), hits as f64 / ranks.len().max(1) as f64));
        }
    }
    Ok(RetrievalResult { pairs: n as u64, metrics })
}

/// One pass of a retrieval set whose samples carry several captions, one per line of the
/// caption text (clip_benchmark's layout): every image and every caption embedded, then
/// [`multi_caption_recall`]. With several ranks each embeds its share of the images and
/// their captions, and the rows are gathered (caption owners shifted to the gathered image
/// order), so every rank returns the whole set's numbers.
pub fn evaluate_multi_caption(
    model: &Clip,
    loader: &mut Loader,
    tokenizer: &Tokenizer,
    device: Device,
    comm: &dyn Collectives,
    progress: &mut dyn FnMut(u64),
) -> Result<RetrievalResult> {
    let _guard = tch::no_grad_guard();
    let image_size = model.config.vision_cfg.image_size;
    let context = model.config.text_cfg.context_length;
    let dim = model.config.embed_dim;
    let (mut images, mut texts, mut owners) = (Vec::new(), Vec::new(), Vec::new());
    let mut local_images = 0i64;
    let mut skipped = loader.load_skips();
    while let Some(batch) = loader.next_eval_batch()? {
        skipped.merge(&batch.skipped);
        let (pixels, _) = crate::device::batch_to_device(&batch, image_size, context, device)?;
        images.push(normalize(&model.encode_image(&pixels).to_kind(Kind::Float)));
        let mut captions = Vec::new();
        for (row, text) in batch.captions.iter().enumerate() {
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                captions.push(line);
                owners.push((local_images + row as i64) as f32);
            }
        }
        local_images += batch.batch_size as i64;
        if !captions.is_empty() {
            let ids = tokenizer.encode_batch(&captions, context as usize);
            let tokens =
                Tensor::from_slice(&ids).view([captions.len() as i64, context]).to_device(device);
            texts.push(normalize(&model.encode_text(&tokens).to_kind(Kind::Float)));
        }
        progress(batch.batch_size as u64 + batch.skipped.total());
    }
    let cat = |parts: &[Tensor], cols: i64| {
        if parts.is_empty() {
            Tensor::zeros([0, cols], (Kind::Float, device))
        } else {
            Tensor::cat(parts, 0).view([-1, cols])
        }
    };
    // Each rank's caption owners index its own images: shift them by the images of the
    // ranks before it, the order the gather lays them out in.
    let counts = collectives::all_gather_u64(comm, local_images as u64)?;
    let offset: u64 = counts.iter().take(comm.rank()).sum();
    let owners = Tensor::from_slice(&owners).to_device(device).view([-1, 1]) + offset as f64;
    let images = gather_rows(comm, &cat(&images, dim))?;
    let rows = gather_rows(comm, &Tensor::cat(&[cat(&texts, dim), owners], 1))?;
    if images.size()[0] == 0 || rows.size()[0] == 0 {
        return Err(TrainError::Input(format!(
            "no image with a caption could be evaluated{}",
            skipped_note(&skipped)
        )));
    }
    let owners = Vec::<i64>::try_from(
        &rows.narrow(1, dim, 1).view([-1]).to_kind(Kind::Int64).to_device(Device::Cpu),
    )?;
    multi_caption_recall(&images, &rows.narrow(1, 0, dim), &owners)
}

/// What one evaluation pass measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// With a classifier: zero-shot accuracy over the labelled samples.
    pub zero_shot: Option<ZeroShotResult>,
    /// With `retrieval`: image<->text retrieval over the pairs.
    pub retrieval: Option<RetrievalResult>,
}

/// A loader for evaluating `model` on `source`: the eval transform of the model's default
/// preprocessing ([`crate::prepare::default_preprocess`]), its context length, the dataset in
/// order, this rank's share of it.
pub fn eval_loader(
    source: &DataSource,
    tokenizer: Tokenizer,
    model: &ModelConfig,
    batch_size: usize,
    workers: usize,
    comm: &dyn Collectives,
) -> Result<Loader> {
    eval_loader_with(
        source,
        tokenizer,
        model,
        &crate::prepare::default_preprocess(model),
        batch_size,
        workers,
        comm,
    )
}

/// [`eval_loader`] with the given preprocessing (mean/std, resize mode, interpolation).
pub fn eval_loader_with(
    source: &DataSource,
    tokenizer: Tokenizer,
    model: &ModelConfig,
    preprocess: &Preprocess,
    batch_size: usize,
    workers: usize,
    comm: &dyn Collectives,
) -> Result<Loader> {
    Ok(Loader::open(
        source,
        &ShardOptions::default(),
        tokenizer,
        LoaderConfig {
            batch_size: batch_size.max(1),
            rank: comm.rank(),
            world_size: comm.world_size(),
            seed: 0,
            image_size: model.vision_cfg.image_size as u32,
            context_length: model.text_cfg.context_length as usize,
            workers,
            train: false,
            preprocess: Some(preprocess.clone()),
        },
    )?)
}

/// One pass over the loader's samples (dataset order, eval transform): zero-shot accuracy
/// against `classifier` (from [`zero_shot_classifier`]) when given, retrieval over the
/// image-caption pairs when `retrieval`. Embeddings are kept (n x d), the metrics computed
/// in chunks. With several ranks, each embeds its share (the loader's rank split) and the
/// embeddings are gathered before scoring, so every rank returns the whole set's numbers.
pub fn evaluate(
    model: &Clip,
    loader: &mut Loader,
    classifier: Option<&Tensor>,
    retrieval: bool,
    device: Device,
    comm: &dyn Collectives,
) -> Result<EvalResult> {
    evaluate_with_progress(model, loader, classifier, retrieval, device, comm, &mut |_| {})
}

/// [`evaluate`], telling `progress` how many samples each batch took (used and skipped), for
/// a progress bar.
pub fn evaluate_with_progress(
    model: &Clip,
    loader: &mut Loader,
    classifier: Option<&Tensor>,
    retrieval: bool,
    device: Device,
    comm: &dyn Collectives,
    progress: &mut dyn FnMut(u64),
) -> Result<EvalResult> {
    let _guard = tch::no_grad_guard();
    let image_size = model.config.vision_cfg.image_size;
    let context = model.config.text_cfg.context_length;
    let dim = model.config.embed_dim;
    let (mut images, mut texts, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    let mut keys = Vec::new();
    let mut skipped = loader.load_skips();
    while let Some(batch) = loader.next_eval_batch()? {
        skipped.merge(&batch.skipped);
        keys.extend(batch.keys.iter().cloned());
        let (pixels, tokens) = crate::device::batch_to_device(&batch, image_size, context, device)?;
        images.push(normalize(&model.encode_image(&pixels).to_kind(Kind::Float)));
        if retrieval {
            texts.push(normalize(&model.encode_text(&tokens).to_kind(Kind::Float)));
        }
        labels.push(Tensor::from_slice(&batch.labels).to_kind(Kind::Float).to_device(device));
        progress(batch.batch_size as u64 + batch.skipped.total());
    }
    let empty = |cols: i64| Tensor::zeros([0, cols], (Kind::Float, device));
    let cat = |parts: &[Tensor], cols: i64| {
        if parts.is_empty() {
            empty(cols)
        } else {
            Tensor::cat(parts, 0).view([-1, cols])
        }
    };
    // Image embedding, text embedding and label side by side, one row per sample, so one
    // gather moves them all.
    let mut columns = vec![cat(&images, dim)];
    if retrieval {
        columns.push(cat(&texts, dim));
    }
    columns.push(cat(&labels, 1));
    let local_labels = Vec::<i64>::try_from(
        &cat(&labels, 1).view([-1]).to_kind(Kind::Int64).to_device(Device::Cpu),
    )?;
    let rows = gather_rows(comm, &Tensor::cat(&columns, 1))?;
    let images = rows.narrow(1, 0, dim);
    let labels = rows.narrow(1, rows.size()[1] - 1, 1).view([-1]).to_kind(Kind::Int64);
    // Every rank sees the gathered rows, so every rank decides these errors alike.
    if rows.size()[0] == 0 {
        return Err(TrainError::Input(format!(
            "no sample could be evaluated{}",
            skipped_note(&skipped)
        )));
    }
    let zero_shot = match classifier {
        Some(c) => {
            let labels = Vec::<i64>::try_from(&labels.to_device(Device::Cpu))?;
            check_labels(&labels, &local_labels, &keys, c.size()[1])?;
            Some(zero_shot_counts(&images, &labels, c)?.result())
        }
        None => None,
    };
    let retrieval = retrieval.then(|| retrieval_metrics(&images, &rows.narrow(1, dim, dim)));
    Ok(EvalResult { zero_shot, retrieval })
}

/// The gathered labels of a zero-shot evaluation against `classes` class names: some must be
/// there, none may be beyond the list (that would be scored as a miss, silently). `local`
/// and `keys` are this rank's, to name an offending sample when it is here.
fn check_labels(labels: &[i64], local: &[i64], keys: &[String], classes: i64) -> Result<()> {
    let labelled = labels.iter().filter(|&&l| l >= 0).count();
    if labelled == 0 {
        return Err(TrainError::Input(format!(
            "none of the {} samples has a class label (KEY.cls in shards, a label column in a CSV or JSONL, a folder per class), \
             so zero-shot accuracy cannot be scored",
            labels.len()
        )));
    }
    let beyond: Vec<i64> = labels.iter().copied().filter(|&l| l >= classes).collect();
    if let Some(&largest) = beyond.iter().max() {
        let here = local
            .iter()
            .position(|&l| l >= classes)
            .and_then(|i| keys.get(i).map(|k| (k, local[i])));
        let example =
            here.map_or_else(String::new, |(key, label)| format!(" (sample {key}: label {label})"));
        return Err(TrainError::Input(format!(
            "{} samples are labelled beyond the {classes} class names (labels 0 to {}), up to {largest}{example}; \
             the class names file must name every class the data uses",
            beyond.len(),
            classes - 1
        )));
    }
    if labelled < labels.len() {
        tracing::warn!(
            "{} of {} samples have no class label and are left out of the zero-shot accuracy",
            labels.len() - labelled,
            labels.len()
        );
    }
    Ok(())
}

/// Every rank's (n_r, c) rows, concatenated in rank order. Ranks may hold different
/// numbers of rows: each pads to the largest count for the gather and the padding is cut.
fn gather_rows(comm: &dyn Collectives, rows: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(rows.shallow_clone());
    }
    let n = rows.size()[0];
    let counts: Vec<i64> =
        collectives::all_gather_u64(comm, n as u64)?.into_iter().map(|c| c as i64).collect();
    let most = counts.iter().copied().max().unwrap_or(0);
    let cols = rows.size()[1];
    let padded = Tensor::cat(
        &[rows.shallow_clone(), Tensor::zeros([most - n, cols], (rows.kind(), rows.device()))],
        0,
    );
    let all = comm.all_gather(&padded)?;
    let parts: Vec<Tensor> =
        counts.iter().enumerate().map(|(r, &c)| all.narrow(0, r as i64 * most, c)).collect();
    Ok(Tensor::cat(&parts, 0))
}

/// What a zero-shot pass counted: samples scored and hits, overall and per class.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ZeroShotCounts {
    /// Samples with a label (those without are left out).
    scored: u64,
    top1: u64,
    top5: u64,
    /// Per class: (samples labelled with it, of those the top-1 hits).
    per_class: Vec<(u64, u64)>,
}

impl ZeroShotCounts {
    fn result(&self) -> ZeroShotResult {
        let frac = |x: u64| if self.scored == 0 { 0.0 } else { x as f64 / self.scored as f64 };
        // Classes no sample is labelled with have no recall; sklearn leaves them out too.
        let recalls: Vec<f64> = self
            .per_class
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|&(n, hits)| hits as f64 / n as f64)
            .collect();
        let mean_per_class_recall = if recalls.is_empty() {
            0.0
        } else {
            recalls.iter().sum::<f64>() / recalls.len() as f64
        };
        ZeroShotResult {
            top1: frac(self.top1),
            top5: frac(self.top5),
            mean_per_class_recall,
            samples: self.scored,
        }
    }
}

/// Top-1/top-5 of normalised image embeddings against the class embeddings (embed_dim,
/// classes); samples with label -1 (none) are left out. Labels are checked to be below the
/// class count ([`check_labels`]).
fn zero_shot_counts(
    images: &Tensor,
    labels: &[i64],
    classifier: &Tensor,
) -> Result<ZeroShotCounts> {
    let classes = classifier.size()[1];
    let k = 5.min(classes);
    let (_, pred) = images.matmul(classifier).topk(k, 1, true, true);
    let pred = Vec::<i64>::try_from(&pred.reshape([-1]).to_device(Device::Cpu))?;
    let mut counts =
        ZeroShotCounts { scored: 0, top1: 0, top5: 0, per_class: vec![(0, 0); classes as usize] };
    for (&label, ranked) in labels.iter().zip(pred.chunks(k as usize)) {
        let Some(class) = counts.per_class.get_mut(label as usize).filter(|_| label >= 0) else {
            continue;
        };
        let hit1 = ranked.first() == Some(&label);
        class.0 += 1;
        class.1 += u64::from(hit1);
        counts.scored += 1;
        counts.top1 += u64::from(hit1);
        counts.top5 += u64::from(ranked.contains(&label));
    }
    Ok(counts)
}

/// A templates file's prompts, or OpenAI's 80 ImageNet templates; each must hold `{}`.
pub fn read_templates(path: Option<&str>) -> Result<Vec<String>> {
    let templates = match path {
        Some(path) => read_lines(Path::new(path))?,
        None => OPENAI_IMAGENET_TEMPLATES.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = templates.iter().find(|t| !t.contains("{}")) {
        return Err(TrainError::Config(format!(
            "template `{bad}` has no `{{}}` for the class name"
        )));
    }
    Ok(templates)
}

/// Non-empty, trimmed lines of a text file.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let lines: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(TrainError::Config(format!("{} is empty", path.display())));
    }
    Ok(lines)
}

/// OpenAI's 80 ImageNet prompt templates (CLIP repo, `notebooks/Prompt_Engineering_for_ImageNet.ipynb`),
/// as open_clip's `zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`.
pub const OPENAI_IMAGENET_TEMPLATES: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(values: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = values.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([values.len() as i64, 2])
    }

    #[test]
    fn retrieval_metrics_on_a_known_case() {
        // Unit vectors; the scores, worked out by hand:
        let image = rows(&[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]);
        let text = rows(&[[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]);
        // scores image x text:
        //   img0: [1.0, 0.0, 0.8]   own 1.0 -> rank 0
        //   img1: [0.0, 1.0, 0.6]   own 1.0 -> rank 0
        //   img2: [0.6, 0.8, 0.96]  own 0.96 -> rank 0
        // text x image:
        //   txt0: [1.0, 0.0, 0.6]   own 1.0 -> rank 0
        //   txt1: [0.0, 1.0, 0.8]   own 1.0 -> rank 0
        //   txt2: [0.8, 0.6, 0.96]  own 0.96 -> rank 0
        let r = retrieval_metrics(&image, &text);
        assert_eq!(r.get("image_to_text_R@1"), Some(1.0));
        assert_eq!(r.get("text_to_image_mean_rank"), Some(1.0));

        // Swap two captions: pairs 0 and 1 now rank their own caption second (of 3).
        let swapped = rows(&[[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]]);
        let r = retrieval_metrics(&image, &swapped);
        // img0 vs [0.0, 1.0, 0.8]: own 0.0, two above -> rank 2; img1 vs [1.0, 0.0, 0.6]: own 0.0 -> rank 2;
        // img2 vs [0.8, 0.6, 0.96]: rank 0.
        assert!((r.get("image_to_text_R@1").unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.get("image_to_text_R@5"), Some(1.0));
        assert!(
            (r.get("image_to_text_mean_rank").unwrap() - (2.0 + 2.0 + 0.0) / 3.0 - 1.0).abs()
                < 1e-9
        );
        assert_eq!(r.get("image_to_text_median_rank"), Some(3.0));
        assert_eq!(r.pairs, 3);
        let names: Vec<&str> = r.metrics.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names[..5],
            [
                "image_to_text_mean_rank",
                "image_to_text_median_rank",
                "image_to_text_R@1",
                "image_to_text_R@5",
                "image_to_text_R@10"
            ]
        );
    }

    #[test]
    fn multi_caption_recall_on_a_known_case() {
        let image = rows(&[[1.0, 0.0], [0.0, 1.0]]);
        // Captions 0 and 1 describe image 0, caption 2 image 1.
        let text = rows(&[[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]);
        // caption x image: t0 [1.0, 0.0] own 1.0 -> rank 0; t1 [0.6, 0.8] own 0.6 -> rank 1;
        // t2 [0.8, 0.6] own 0.6 -> rank 1.
        // image x caption: img0 [1.0, 0.6, 0.8], best own 1.0 -> rank 0; img1 [0.0, 0.8, 0.6],
        // own 0.6 -> rank 1.
        let r = multi_caption_recall(&image, &text, &[0, 0, 1]).unwrap();
        assert!((r.get("image_retrieval_recall@1").unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(r.get("image_retrieval_recall@5"), Some(1.0));
        assert_eq!(r.get("text_retrieval_recall@1"), Some(0.5));
        assert_eq!(r.get("text_retrieval_recall@10"), Some(1.0));
        assert_eq!(r.pairs, 2);
    }

    /// open_clip_train's own `get_clip_metrics` on 50 random pairs
    /// (tests/fixtures/make_retrieval_fixture.py).
    #[test]
    fn retrieval_metrics_equal_open_clips() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/retrieval");
        let tensors: std::collections::BTreeMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("embeds.safetensors")).unwrap().into_iter().collect();
        let expected: std::collections::BTreeMap<String, f64> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let r = retrieval_metrics(&tensors["image"], &tensors["text"]);
        assert_eq!(r.metrics.len(), expected.len());
        for (name, value) in &r.metrics {
            assert!(
                (value - expected[name]).abs() < 1e-9,
                "{name}: {value} vs open_clip {}",
                expected[name]
            );
        }
    }

    /// Hand-made image embeddings against the identity as class embeddings (6 classes): an
    /// image's scores are its own entries, so every rank below is known.
    #[test]
    fn zero_shot_counts_on_a_known_case() {
        let images: Vec<[f32; 6]> = vec![
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  // label 0: top-1 right
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  // label 1: ranked 2nd, top-1 wrong, top-5 right
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  // label 5: ranked 6th, both wrong
            [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  // label 2: top-1 right
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],  // no label: left out
            [0.1, 0.2, 0.3, 0.9, 0.0, 0.05], // label 2: ranked 2nd (3, 2, 1, 0, 5), top-5 right
        ];
        let labels = [0, 1, 5, 2, -1, 2];
        let flat: Vec<f32> = images.iter().flatten().copied().collect();
        let images = Tensor::from_slice(&flat).view([6, 6]);
        let classifier = Tensor::eye(6, (Kind::Float, Device::Cpu));
        let counts = zero_shot_counts(&images, &labels, &classifier).unwrap();
        assert_eq!(
            counts,
            ZeroShotCounts {
                scored: 5,
                top1: 2,
                top5: 4,
                per_class: vec![(1, 1), (1, 0), (2, 1), (0, 0), (0, 0), (1, 0)]
            }
        );
        // Per class recall 1, 0, 1/2, 0 over the four classes with samples (3 and 4 have none).
        assert_eq!(
            counts.result(),
            ZeroShotResult { top1: 0.4, top5: 0.8, mean_per_class_recall: 0.375, samples: 5 }
        );

        // Fewer than 5 classes: top-5 is every class, so it is 1 for any labelled sample.
        let two = Tensor::eye(6, (Kind::Float, Device::Cpu)).narrow(1, 0, 2);
        // (Image 3 scores 0 for both, a tie, so it is left unlabelled here.)
        let counts = zero_shot_counts(&images, &[1, 0, 0, -1, -1, 1], &two).unwrap();
        assert_eq!((counts.scored, counts.top1, counts.top5), (4, 3, 4));

        assert!(check_labels(&labels, &labels, &[], 6).is_ok());
        let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
        let beyond = check_labels(&labels, &labels, &keys, 5).unwrap_err().to_string();
        assert!(beyond.contains("1 samples are labelled beyond the 5 class names (labels 0 to 4), up to 5 (sample k2: label 5)"), "{beyond}");
        let none = check_labels(&[-1, -1], &[-1, -1], &keys, 5).unwrap_err().to_string();
        assert!(none.contains("none of the 2 samples has a class label"), "{none}");
    }

    /// `open_zero_shot` refuses what it cannot score, naming files, counts and rows. Image
    /// files are only listed here, never decoded, so any bytes do.
    #[test]
    fn zero_shot_inputs_are_checked_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |rel: &str, text: &str| {
            let path = d.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        for class in ["ant", "bee", "cat", "dog"] {
            write(&format!("classes/{class}/1.jpg"), "x");
        }
        write("two.txt", "ant\nbee\n");
        write("four.txt", "ant\nbee\ncat\ndog\n");
        let classes = DataSpec::Classes(d.join("classes"));
        let err = open_zero_shot(&classes, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("two.txt names 2 classes but")
                && err.contains("classes has 4 class folders")
                && err.contains("`ant`"),
            "{err}"
        );
        let set = open_zero_shot(&classes, Some(&d.join("four.txt")), 0).unwrap();
        assert_eq!((set.classnames.len(), set.source.len()), (4, 4));
        assert_eq!(
            open_zero_shot(&classes, None, 0).unwrap().classnames,
            ["ant", "bee", "cat", "dog"]
        );

        // A CSV without labels: the column looked for and how to name another.
        write("val.csv", "filepath,title\nclasses/ant/1.jpg,an ant\n");
        let csv = DataSpec::parse(d.join("val.csv").to_str().unwrap()).unwrap();
        let err = open_zero_shot(&csv, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("val.csv")
                && err.contains("no label column `label`")
                && err.contains("label_key=COLUMN"),
            "{err}"
        );
        // Without class names at all.
        let err = open_zero_shot(&csv, None, 0).err().unwrap().to_string();
        assert!(err.contains("needs the class names") && err.contains("--classnames"), "{err}");
        // A label beyond the class list: the line and the label.
        write("val.csv", "filepath,label\nclasses/ant/1.jpg,1\nclasses/bee/1.jpg,3\n");
        let err = open_zero_shot(&csv, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("val.csv, line 3: label 3 is outside the class list")
                && err.contains("two.txt names 2 classes"),
            "{err}"
        );
        assert_eq!(open_zero_shot(&csv, Some(&d.join("four.txt")), 0).unwrap().source.len(), 2);
        // JSONL the same way.
        write("val.jsonl", "{\"image\": \"classes/ant/1.jpg\", \"label\": 2}\n");
        let jsonl = DataSpec::parse(d.join("val.jsonl").to_str().unwrap()).unwrap();
        let err = open_zero_shot(&jsonl, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(err.contains("val.jsonl, line 1: label 2 is outside"), "{err}");
        // Nothing to score.
        write("empty.csv", "filepath,label\n,0\n");
        let empty = DataSpec::parse(d.join("empty.csv").to_str().unwrap()).unwrap();
        let err = open_zero_shot(&empty, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("empty.csv holds no image to evaluate (skipped: missing_image 1)"),
            "{err}"
        );
        // Captioned images carry no labels.
        let folder = DataSpec::Folder(d.join("classes/ant"));
        let err = open_zero_shot(&folder, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(err.contains("no class labels") && err.contains("classes:DIR"), "{err}");
    }

    #[test]
    fn chunked_ranks_equal_the_full_matrix() {
        tch::manual_seed(3);
        let n = 2 * RETRIEVAL_CHUNK + 37;
        let image = crate::model::normalize(&Tensor::randn([n, 8], (Kind::Float, Device::Cpu)));
        let text = crate::model::normalize(
            &(&image + Tensor::randn([n, 8], (Kind::Float, Device::Cpu)) * 0.5),
        );
        let ranks = ranks_of_own_pair(&image, &text);
        let full = image.matmul(&text.tr());
        let own = full.diagonal(0, 0, 1).unsqueeze(1);
        let expected = full.gt_tensor(&own).sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
        assert!(ranks.equal(&expected));
        // Median of an even count: numpy's mean of the middle two, floored, plus one.
        let r =
            retrieval_metrics(&rows(&[[1.0, 0.0], [0.0, 1.0]]), &rows(&[[0.0, 1.0], [1.0, 0.0]]));
        assert_eq!(r.get("image_to_text_median_rank"), Some(2.0));
    }
}
