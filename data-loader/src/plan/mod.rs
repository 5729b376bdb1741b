//! The plan: which sample goes to which rank, worker and batch, decided from counts and a
//! seed before any image is read, and the positions a checkpoint saves. No threads, no I/O:
//! the pipelines (`pipeline/`) follow it.
//!
//! - [`indexed`]: lists of samples readable one by one, permuted per epoch.
//! - [`stream`]: WebDataset shards, dealt to ranks and workers and shuffled through a buffer.
//!
//! Both fill the same [`Batch`] (made by `Batch::empty`, one `Row` at a time by `Batch::push`)
//! and resume from the same [`LoaderState`].

pub mod indexed;
pub mod stream;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::skip::SkipCounts;
use crate::transform::Preprocess;
use stream::StreamCursor;

/// Most unusable samples in a row a train batch position may go through before the loader
/// gives up on the dataset.
pub const MAX_CONSECUTIVE_SKIPS: usize = 1000;

/// How the loader batches, for this rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// Samples per batch on this rank (n); the global batch is `batch_size * world_size`.
    pub batch_size: usize,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks (W).
    pub world_size: usize,
    /// Seed of the epoch permutations and the augmentations.
    pub seed: u64,
    /// Side of the square model input, in pixels.
    pub image_size: u32,
    /// Tokens per caption (77 for CLIP).
    pub context_length: usize,
    /// Decode/augment/tokenize threads (0 is taken as 1; more than `batch_size` is capped).
    pub workers: usize,
    /// Train: train transform, a new permutation each epoch, endless. Eval: eval transform,
    /// dataset order, one pass at a time, last partial batch kept.
    pub train: bool,
    /// The model's mean/std, resize mode and interpolation (its size is `image_size`);
    /// `None`: OpenAI CLIP's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,
}

/// Where the loader stands: the position of the next batch [`Loader::next_batch`] returns.
/// Saved in checkpoints; [`Loader::restore`] continues from it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub batch_in_epoch: u64,
    /// Streamed sources: every worker's position (`epoch` and `batch_in_epoch` repeat its
    /// fields). `None` for indexed sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamCursor>,
}

impl LoaderState {
    /// Batch `batch_in_epoch` of `epoch` of an indexed source.
    pub fn at(epoch: u64, batch_in_epoch: u64) -> Self {
        Self { epoch, batch_in_epoch, stream: None }
    }

    pub(crate) fn of_stream(cursor: &StreamCursor) -> Self {
        Self {
            epoch: cursor.epoch,
            batch_in_epoch: cursor.batch_in_epoch,
            stream: Some(cursor.clone()),
        }
    }
}

/// One batch for this rank, as flat row-major buffers.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `batch_size x 3 x S x S`, normalised.
    pub images: Vec<f32>,
    /// `batch_size x context_length`.
    pub tokens: Vec<i64>,
    /// Class label per row, -1 when the sample has none.
    pub labels: Vec<i64>,
    /// Rows in this batch (the configured size, except for eval's last batch).
    pub batch_size: usize,
    /// Samples that could not be used while making this batch.
    pub skipped: SkipCounts,
    /// Index of each row's sample: in the dataset (after any replacement), or for shards in
    /// all shards laid end to end.
    pub indices: Vec<u64>,
    /// The sample key of each row (WebDataset `__key__`, file stem, or scene number).
    pub keys: Vec<String>,
    /// The caption of each row, as read (before tokenization).
    pub captions: Vec<String>,
    /// Where each row's sample came from, when known ([`Sample::source`]).
    pub sources: Vec<Option<String>>,
    /// Which batch this is.
    pub position: LoaderState,
}

impl Batch {
    /// An empty batch at `position`, with room for `rows` rows. `images` is the buffer the
    /// image rows go into: empty, and recycled from the trainer where it can be.
    pub(crate) fn empty(
        images: Vec<f32>,
        rows: usize,
        context_length: usize,
        position: LoaderState,
    ) -> Self {
        Self {
            images,
            tokens: Vec::with_capacity(rows * context_length),
            labels: Vec::with_capacity(rows),
            batch_size: 0,
            skipped: SkipCounts::new(),
            indices: Vec::with_capacity(rows),
            keys: Vec::with_capacity(rows),
            sources: Vec::with_capacity(rows),
            captions: Vec::with_capacity(rows),
            position,
        }
    }

    /// Appends one row. Gives back the row's image buffer, which the caller may reuse.
    pub(crate) fn push(&mut self, row: Row) -> Vec<f32> {
        self.images.extend_from_slice(&row.image);
        self.tokens.extend_from_slice(&row.tokens);
        self.labels.push(row.label);
        self.indices.push(row.index);
        self.keys.push(row.key);
        self.sources.push(row.source);
        self.captions.push(row.caption);
        self.batch_size += 1;
        row.image
    }
}

/// One sample made ready for a batch: what [`Batch::push`] adds as a row.
pub(crate) struct Row {
    /// `3 x S x S`, normalised.
    pub image: Vec<f32>,
    /// `context_length` token ids.
    pub tokens: Vec<i64>,
    /// The class label, -1 without one.
    pub label: i64,
    /// The sample's index ([`Batch::indices`]).
    pub index: u64,
    pub key: String,
    pub caption: String,
    pub source: Option<String>,
}

/// Checks shared by both kinds of loader.
pub(crate) fn check_config(cfg: &LoaderConfig) -> Result<(), DataError> {
    if cfg.batch_size == 0 {
        return Err(DataError::Config("batch_size must be at least 1".into()));
    }
    if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
        return Err(DataError::Config(format!(
            "rank {} is not in 0..world_size ({})",
            cfg.rank, cfg.world_size
        )));
    }
    if cfg.image_size == 0 || cfg.context_length == 0 {
        return Err(DataError::Config("image_size and context_length must be positive".into()));
    }
    Ok(())
}
