//! One evaluation pass: a model embeds a set (images, and captions or class prompts), each
//! rank its share in dataset order, the rows are gathered so every rank holds the whole set,
//! and [`super::metrics`] scores them. [`eval_loader`] makes the loader such a pass reads
//! (eval transform, the set in order, this rank's share); [`evaluate`] scores zero-shot
//! accuracy and pair retrieval, [`evaluate_multi_caption`] clip_benchmark's multi-caption
//! retrieval.

use tch::{Device, Kind, Tensor};

use oxclip_data_loader::{DataSource, Loader, LoaderConfig, Preprocess, ShardOptions, Tokenizer};

use super::metrics::{
    check_labels, multi_caption_recall, retrieval_metrics, zero_shot_counts, RetrievalResult,
    ZeroShotResult,
};
use super::sets::skipped_note;
use crate::collectives::{self, Collectives};
use crate::error::{Result, TrainError};
use crate::model::{normalize, Clip, ModelConfig};

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
        loader.recycle(batch);
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
        loader.recycle(batch);
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
