//! Zero-shot classification (CLIP paper section 3.1.4; open_clip `zero_shot_classifier.py`):
//! each class's text embedding is the normalised mean of its prompts' normalised embeddings;
//! an image is assigned the class of highest cosine similarity.

use tch::{Device, Kind, Tensor};

use oxclip_data_loader::{Loader, Tokenizer};

use crate::error::Result;
use crate::model::{normalize, Clip};

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
    let _guard = tch::no_grad_guard();
    let classes = classifier.size()[1];
    let k = 5.min(classes);
    let (mut top1, mut top5, mut total) = (0i64, 0i64, 0i64);
    let image_size = model.config.vision_cfg.image_size;
    while let Some(batch) = loader.next_eval_batch()? {
        let b = batch.batch_size as i64;
        let images = Tensor::from_slice(&batch.images).view([b, 3, image_size, image_size]).to_device(device);
        let labels = Tensor::from_slice(&batch.labels).to_device(device);
        let keep = labels.ge(0);
        let features = normalize(&model.encode_image(&images).to_kind(Kind::Float));
        let logits = features.matmul(classifier);
        let (_, pred) = logits.topk(k, 1, true, true);
        let hits = pred.eq_tensor(&labels.unsqueeze(1)).logical_and(&keep.unsqueeze(1));
        top1 += hits.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
        top5 += hits.sum(Kind::Int64).int64_value(&[]);
        total += keep.sum(Kind::Int64).int64_value(&[]);
    }
    let frac = |x: i64| if total == 0 { 0.0 } else { x as f64 / total as f64 };
    Ok(ZeroShotResult { top1: frac(top1), top5: frac(top5), samples: total as u64 })
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
