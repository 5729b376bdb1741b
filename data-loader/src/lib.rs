//! oxclip's data side: everything between image-caption files on disk and the flat rows of
//! floats and token ids that the trainer turns into tensors. It knows nothing of models
//! (launch -> trainer -> data-loader).
//!
//! - [`spec`]: what to read, as the user writes it (`synthetic:N`, `data/{00000..00012}.tar`,
//!   a `.tar`, a directory of shards).
//! - [`webdataset`]: WebDataset tar shards, read by key and written atomically.
//! - [`shards`]: the shard catalog: local files or `pipe:` commands, with sample counts from
//!   an index, a cache, or one read.
//! - [`stream`]: how shards are split over ranks and workers and shuffled, and the position a
//!   checkpoint saves; its threads live in `stream_pipeline.rs`.
//! - [`dataset`]: [`DataSource`] for a spec (shards, or an indexed dataset: [`SyntheticDataset`],
//!   CSV, JSONL, folders).
//! - [`transform`]: decode, open_clip's train/eval image transforms, normalisation.
//! - [`augment`]: open_clip's training augmentations (`data.augment`): crop ranges, colour
//!   jitter and grayscale on the 8-bit crop, as Pillow computes them.
//! - [`tokenizer`]: the OpenAI CLIP BPE (or any tokenizer.json), ids exactly as
//!   `open_clip.tokenize`.
//! - [`loader`]: the [`Loader`] the trainer pulls [`Batch`]es from: deterministic for a seed,
//!   split across ranks, resumable from a [`LoaderState`]. Indexed sources' threads live in
//!   `pipeline.rs`.
//! - [`synth`]: procedurally drawn shapes with captions, for the quickstart and tests.
//! - [`sources`]: CSV/TSV, JSONL and image-folder sources ([`FileDataset`]).
//! - [`pack`]: writes a source as WebDataset shards with an index (`oxclip data pack`).
//! - [`stats`]: reads every sample of a source and counts usable and skipped ones
//!   (`oxclip data stats`).
//!
//! Bad samples never stop a run: they become a [`SkipReason`], are counted in
//! [`SkipCounts`], and are replaced (train) or dropped (eval). A [`DataError`] is for what the
//! run cannot continue past.

pub mod dataset;
pub mod error;
pub mod loader;
pub mod pack;
mod pipeline;
pub mod seed;
pub mod shards;
pub mod skip;
pub mod sources;
pub mod spec;
pub mod stats;
pub mod stream;
mod stream_pipeline;
pub mod synth;
pub mod augment;
pub mod tokenizer;
pub mod transform;
pub mod webdataset;

pub use dataset::{open, DataSource, Dataset, Sample, SyntheticDataset};
pub use error::DataError;
pub use loader::{measure_throughput, Batch, Loader, LoaderConfig, LoaderState};
pub use pack::{pack, PackConfig, PackSummary};
pub use shards::{ShardLocation, ShardSet, ShardSource};
pub use skip::{SampleError, SkipCounts, SkipReason};
pub use stream::{ShardOptions, StreamCursor};
pub use sources::FileDataset;
pub use spec::{CsvSpec, DataSpec, JsonlSpec};
pub use stats::{stats, DataStats};
pub use synth::{write_synth, SynthConfig, SynthSummary};
pub use tokenizer::Tokenizer;
pub use transform::{ImageTransform, Interpolation, Preprocess, ResizeMode, OPENAI_MEAN, OPENAI_STD};
pub use webdataset::{read_shard, RawSample, ShardWriter};
