//! The evaluations the field reports, as open_clip computes them:
//!
//! - zero-shot classification (CLIP paper section 3.1.4; open_clip `zero_shot_classifier.py`):
//!   each class's text embedding is the normalised mean of its prompts' normalised
//!   embeddings; an image is assigned the class of highest cosine similarity;
//! - image-text retrieval over pairs (open_clip `get_clip_metrics`): for each image the rank
//!   of its own caption among all captions, and the reverse; R@1/5/10, mean and median rank.

use tch::{Device, Kind, Tensor};

use oxclip_data_loader::{DataSource, Loader, LoaderConfig, ShardOptions, Tokenizer};

use crate::collectives::{self, Collectives};
use crate::error::Result;
use crate::model::{normalize, Clip, ModelConfig};

/// Top-1 and top-5 accuracy of a zero-shot evaluation, in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroShotResult {
    pub top1: f64,
    pub top5: f64,
    pub samples: u64,
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
        let tokens = Tensor::from_slice(&ids).view([prompts.len() as i64, context_length as i64]).to_device(device);
        let embeddings = normalize(&model.encode_text(&tokens).to_kind(Kind::Float));
        columns.push(normalize(&embeddings.mean_dim([0i64].as_slice(), false, Kind::Float)));
    }
    Ok(Tensor::stack(&columns, 1))
}

/// Classifies every labelled sample the loader yields (one pass, in dataset order).
pub fn zero_shot_accuracy(model: &Clip, classifier: &Tensor, loader: &mut Loader, device: Device) -> Result<ZeroShotResult> {
    let result = evaluate(model, loader, Some(classifier), false, device, &crate::collectives::SingleProcess)?;
    Ok(result.zero_shot.unwrap_or(ZeroShotResult { top1: 0.0, top5: 0.0, samples: 0 }))
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
        let own = scores.gather(1, &Tensor::arange_start(start, start + len, (Kind::Int64, scores.device())).unsqueeze(1), false);
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
    for (name, ranks) in [("image_to_text", ranks_of_own_pair(&image, &text)), ("text_to_image", ranks_of_own_pair(&text, &image))] {
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

/// What one evaluation pass measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// With a classifier: zero-shot accuracy over the labelled samples.
    pub zero_shot: Option<ZeroShotResult>,
    /// With `retrieval`: image<->text retrieval over the pairs.
    pub retrieval: Option<RetrievalResult>,
}

/// A loader for evaluating `model` on `source`: the eval transform at the model's resolution,
/// its context length, the dataset in order, this rank's share of it.
pub fn eval_loader(source: &DataSource, tokenizer: Tokenizer, model: &ModelConfig, batch_size: usize, workers: usize, comm: &dyn Collectives) -> Result<Loader> {
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
    let _guard = tch::no_grad_guard();
    let image_size = model.config.vision_cfg.image_size;
    let context = model.config.text_cfg.context_length;
    let dim = model.config.embed_dim;
    let (mut images, mut texts, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(batch) = loader.next_eval_batch()? {
        let b = batch.batch_size as i64;
        let pixels = Tensor::from_slice(&batch.images).view([b, 3, image_size, image_size]).to_device(device);
        images.push(normalize(&model.encode_image(&pixels).to_kind(Kind::Float)));
        if retrieval {
            let tokens = Tensor::from_slice(&batch.tokens).view([b, context]).to_device(device);
            texts.push(normalize(&model.encode_text(&tokens).to_kind(Kind::Float)));
        }
        labels.push(Tensor::from_slice(&batch.labels).to_kind(Kind::Float).to_device(device));
    }
    let empty = |cols: i64| Tensor::zeros([0, cols], (Kind::Float, device));
    let cat = |parts: &[Tensor], cols: i64| if parts.is_empty() { empty(cols) } else { Tensor::cat(parts, 0).view([-1, cols]) };
    // Image embedding, text embedding and label side by side, one row per sample, so one
    // gather moves them all.
    let mut columns = vec![cat(&images, dim)];
    if retrieval {
        columns.push(cat(&texts, dim));
    }
    columns.push(cat(&labels, 1));
    let rows = gather_rows(comm, &Tensor::cat(&columns, 1))?;
    let images = rows.narrow(1, 0, dim);
    let labels = rows.narrow(1, rows.size()[1] - 1, 1).view([-1]).to_kind(Kind::Int64);
    if rows.size()[0] == 0 {
        return Ok(EvalResult { zero_shot: classifier.map(|_| ZeroShotResult { top1: 0.0, top5: 0.0, samples: 0 }), retrieval: None });
    }
    let zero_shot = classifier.map(|c| zero_shot_scores(&images, &labels, c));
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
    let counts: Vec<i64> = collectives::all_gather_u64(comm, n as u64)?.into_iter().map(|c| c as i64).collect();
    let most = counts.iter().copied().max().unwrap_or(0);
    let cols = rows.size()[1];
    let padded = Tensor::cat(&[rows.shallow_clone(), Tensor::zeros([most - n, cols], (rows.kind(), rows.device()))], 0);
    let all = comm.all_gather(&padded)?;
    let parts: Vec<Tensor> = counts.iter().enumerate().map(|(r, &c)| all.narrow(0, r as i64 * most, c)).collect();
    Ok(Tensor::cat(&parts, 0))
}

/// Top-1/top-5 of normalised image embeddings against the class embeddings; samples with
/// label -1 (none) are left out.
fn zero_shot_scores(images: &Tensor, labels: &Tensor, classifier: &Tensor) -> ZeroShotResult {
    let k = 5.min(classifier.size()[1]);
    let keep = labels.ge(0);
    let (_, pred) = images.matmul(classifier).topk(k, 1, true, true);
    let hits = pred.eq_tensor(&labels.unsqueeze(1)).logical_and(&keep.unsqueeze(1));
    let top1 = hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
    let top5 = hits.sum(Kind::Int64).int64_value(&[]);
    let total = keep.sum(Kind::Int64).int64_value(&[]);
    let frac = |x: i64| if total == 0 { 0.0 } else { x as f64 / total as f64 };
    ZeroShotResult { top1: frac(top1), top5: frac(top5), samples: total as u64 }
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
        assert!((r.get("image_to_text_mean_rank").unwrap() - (2.0 + 2.0 + 0.0) / 3.0 - 1.0).abs() < 1e-9);
        assert_eq!(r.get("image_to_text_median_rank"), Some(3.0));
        assert_eq!(r.pairs, 3);
        let names: Vec<&str> = r.metrics.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[..5], ["image_to_text_mean_rank", "image_to_text_median_rank", "image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10"]);
    }

    /// open_clip_train's own `get_clip_metrics` on 50 random pairs
    /// (tests/fixtures/make_retrieval_fixture.py).
    #[test]
    fn retrieval_metrics_equal_open_clips() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/retrieval");
        let tensors: std::collections::BTreeMap<String, Tensor> =
            Tensor::read_safetensors(dir.join("embeds.safetensors")).unwrap().into_iter().collect();
        let expected: std::collections::BTreeMap<String, f64> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let r = retrieval_metrics(&tensors["image"], &tensors["text"]);
        assert_eq!(r.metrics.len(), expected.len());
        for (name, value) in &r.metrics {
            assert!((value - expected[name]).abs() < 1e-9, "{name}: {value} vs open_clip {}", expected[name]);
        }
    }

    #[test]
    fn chunked_ranks_equal_the_full_matrix() {
        tch::manual_seed(3);
        let n = 2 * RETRIEVAL_CHUNK + 37;
        let image = crate::model::normalize(&Tensor::randn([n, 8], (Kind::Float, Device::Cpu)));
        let text = crate::model::normalize(&(&image + Tensor::randn([n, 8], (Kind::Float, Device::Cpu)) * 0.5));
        let ranks = ranks_of_own_pair(&image, &text);
        let full = image.matmul(&text.tr());
        let own = full.diagonal(0, 0, 1).unsqueeze(1);
        let expected = full.gt_tensor(&own).sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
        assert!(ranks.equal(&expected));
        // Median of an even count: numpy's mean of the middle two, floored, plus one.
        let r = retrieval_metrics(&rows(&[[1.0, 0.0], [0.0, 1.0]]), &rows(&[[0.0, 1.0], [1.0, 0.0]]));
        assert_eq!(r.get("image_to_text_median_rank"), Some(2.0));
    }
}
