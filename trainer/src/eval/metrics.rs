//! The metrics of an evaluation, as pure functions of L2-normalised embeddings and labels
//! (no model, no loader, no ranks: [`super::pass`] brings them the gathered rows):
//!
//! - zero-shot classification: top-1 and top-5 accuracy and the mean per-class recall of
//!   image embeddings against class embeddings, after checking the labels against the class
//!   count;
//! - image-text retrieval over pairs, as open_clip's `get_clip_metrics`
//!   ([`retrieval_metrics`]);
//! - image-text retrieval with several captions per image, as clip_benchmark's
//!   `metrics/zeroshot_retrieval.py` ([`multi_caption_recall`]).
//!
//! Retrieval scores a chunk of rows at a time, so memory stays O(chunk x n), not O(n^2).

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

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

/// The gathered labels of a zero-shot evaluation against `classes` class names: some must be
/// there, none may be beyond the list (that would be scored as a miss, silently). `local`
/// and `keys` are this rank's, to name an offending sample when it is here.
pub(super) fn check_labels(
    labels: &[i64],
    local: &[i64],
    keys: &[String],
    classes: i64,
) -> Result<()> {
    let labelled = labels.iter().filter(|&&l| l >= 0).count();
    if labelled == 0 {
        return Err(TrainError::Input(format!(
            "none of the {} samples has a class label (KEY.cls in shards, a label column in a CSV \
             or JSONL, a folder per class), so zero-shot accuracy cannot be scored",
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
            "{} samples are labelled beyond the {classes} class names (labels 0 to {}), up to \
             {largest}{example}; the class names file must name every class the data uses",
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

/// What a zero-shot pass counted: samples scored and hits, overall and per class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ZeroShotCounts {
    /// Samples with a label (those without are left out).
    scored: u64,
    top1: u64,
    top5: u64,
    /// Per class: (samples labelled with it, of those the top-1 hits).
    per_class: Vec<(u64, u64)>,
}

impl ZeroShotCounts {
    pub(super) fn result(&self) -> ZeroShotResult {
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
pub(super) fn zero_shot_counts(
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
        // img0 vs [0.0, 1.0, 0.8]: own 0.0, two above -> rank 2;
        // img1 vs [1.0, 0.0, 0.6]: own 0.0 -> rank 2; img2 vs [0.8, 0.6, 0.96]: rank 0.
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
        assert!(
            beyond.contains(
                "1 samples are labelled beyond the 5 class names (labels 0 to 4), up to 5 (sample \
                 k2: label 5)"
            ),
            "{beyond}"
        );
        let none = check_labels(&[-1, -1], &[-1, -1], &keys, 5).unwrap_err().to_string();
        assert!(none.contains("none of the 2 samples has a class label"), "{none}");
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
