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
//! One file per job, each using only those listed before it:
//!
//! - [`metrics`]: the scores as pure functions of embeddings and labels (top-k, mean
//!   per-class recall, retrieval recall@K and ranks), with their results;
//! - [`sets`]: a set opened from a data spec and checked before any work (class folders,
//!   CSV/JSONL labels, shards' `KEY.cls`, against the class names), and the prompt
//!   templates;
//! - [`benchmark`]: the sets the field shares, read as they are on disk (ImageNet-1k with
//!   its class names built in, clip_benchmark's webdataset layout), resolved from a name and
//!   opened through [`sets`]' checks. It stays apart from `sets` because it knows those
//!   layouts (type files, `nshards.txt`, `{c}` templates), which plain specs never have;
//! - [`pass`]: one evaluation pass: the loader, the model embedding each rank's share, the
//!   rows gathered over ranks, the [`metrics`] computed into an [`pass::EvalResult`].

pub mod benchmark;
pub mod metrics;
pub mod pass;
pub mod sets;
