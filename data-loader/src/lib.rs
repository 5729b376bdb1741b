//! oxclip's data side: everything between image-caption files on disk and the flat rows of
//! floats and token ids that the trainer turns into tensors. It knows nothing of models
//! (launch -> trainer -> data-loader).
//!
//! Read it bottom-up; each floor uses only the floors below it (a test in
//! `launch/tests/module_layers.rs` fails on any import loop):
//!
//! 0. [`skip`], [`error`], [`seed`], [`parallel`]: the vocabulary: why a sample is skipped,
//!    what stops a run, seed mixing, a parallel map.
//! 1. [`formats`]: WebDataset tar shards, their `index.json`, image decode; [`tokenizer`]: the
//!    OpenAI CLIP BPE (or any tokenizer.json), ids exactly as `open_clip.tokenize`;
//!    [`transform`]: open_clip's train/eval image transforms; [`augment`]: its training
//!    augmentations (`data.augment`: crop ranges, colour jitter, grayscale on the 8-bit crop).
//! 2. [`sources`]: what a data spec opens to: the [`DataSpec`] the user writes, the shard
//!    catalog (local files or `pipe:` commands with their counts), synthetic scenes, CSV/TSV,
//!    JSONL and image folders, as a [`DataSource`].
//! 3. [`plan`]: which sample goes to which rank, worker and batch, from counts and a seed:
//!    the indexed permutation, the shard stream, the [`Batch`] and the resumable
//!    [`LoaderState`].
//! 4. `pipeline`: the threads that follow a plan: shared plumbing, then one file per
//!    topology (indexed, streamed).
//! 5. [`loader`]: the [`Loader`], the one API the trainer sees.
//!
//! Beside them, [`tools`]: `oxclip data pack`, `data stats` and `data synth`, which use the
//! floors and are used by none.
//!
//! Bad samples never stop a run: they become a [`SkipReason`], are counted in
//! [`SkipCounts`], and are replaced (train) or dropped (eval). A [`DataError`] is for what the
//! run cannot continue past.

pub mod error;
pub mod parallel;
pub mod seed;
pub mod skip;

pub mod augment;
pub mod formats;
pub mod tokenizer;
pub mod transform;

pub mod sources;

pub mod plan;

mod pipeline;

pub mod loader;

pub mod tools;

// The paths callers used before the floors had folders.
pub use formats::webdataset;
pub use plan::stream;
pub use sources::{shards, spec};
pub use tools::{pack, stats, synth};

pub use error::DataError;
pub use formats::webdataset::{read_shard, RawSample, ShardWriter};
pub use loader::{measure_throughput, Loader};
pub use plan::stream::{ShardOptions, StreamCursor};
pub use plan::{Batch, LoaderConfig, LoaderState};
pub use skip::{SampleError, SkipCounts, SkipReason};
pub use sources::shards::{ShardLocation, ShardSet, ShardSource};
pub use sources::spec::{CsvSpec, DataSpec, JsonlSpec};
pub use sources::{
    open_indexed as open, DataSource, Dataset, FileDataset, Sample, SyntheticDataset,
};
pub use tokenizer::Tokenizer;
pub use tools::pack::{pack, PackConfig, PackSummary};
pub use tools::stats::{stats, DataStats};
pub use tools::synth::{write_synth, SynthConfig, SynthSummary};
pub use transform::{
    ImageTransform, Interpolation, Preprocess, ResizeMode, OPENAI_MEAN, OPENAI_STD,
};
