//! oxclip's data side: everything between image-caption files on disk and the flat rows of
//! floats and token ids that the trainer turns into tensors. It knows nothing of models
//! (launch -> trainer -> data-loader).
//!
//! Read it bottom-up; each floor uses only the floors below it (`FLOORS` in
//! `launch/tests/module_layers.rs` holds this list against the code):
//!
//! 0. [`skip`], [`seed`]: why a sample is skipped; seed mixing.
//! 1. [`error`]: what stops a run.
//! 2. [`parallel`]: an order-keeping parallel map; [`formats`]: WebDataset tar shards, their
//!    `index.json`, image decode, Parquet and Arrow tables read a part at a time; [`tokenizer`]: the OpenAI CLIP BPE (or any tokenizer.json),
//!    ids exactly as `open_clip.tokenize`; [`augment`]: open_clip's training augmentations
//!    (`data.augment`: crop ranges, colour jitter, grayscale on the 8-bit crop).
//! 3. [`transform`]: open_clip's train/eval image transforms.
//! 4. [`sources`]: what a data spec opens to: the [`DataSpec`] the user writes, the shard
//!    catalog (local files or `pipe:` commands with their counts), synthetic scenes, CSV/TSV,
//!    JSONL and image folders, Hugging Face datasets (Parquet, Arrow), as a [`DataSource`].
//! 5. [`plan`]: which sample goes to which rank, worker and batch, from counts and a seed:
//!    the indexed permutation, the shard stream, the [`Batch`] and the resumable
//!    [`LoaderState`].
//! 6. `pipeline`: the threads that follow a plan: shared plumbing, then one file per
//!    topology (indexed, streamed).
//! 7. [`loader`]: the [`Loader`], the one API the trainer sees.
//!
//! 8. [`tools`]: `oxclip data pack`, `data stats` and `data synth`, which use the floors and
//!    are used by none.
//!
//! Bad samples never stop a run: they become a [`SkipReason`], are counted in
//! [`SkipCounts`], and are replaced (train) or dropped (eval). A [`DataError`] is for what the
//! run cannot continue past.
//!
//! The root re-exports the names a user of the crate writes most: the loader and what it
//! takes and gives ([`Loader`], [`LoaderConfig`], [`ShardOptions`], [`LoaderState`],
//! [`Batch`]), what a data spec is and opens to ([`DataSpec`], [`DataSource`]), the
//! tokenizer and image preprocessing a model carries ([`Tokenizer`], [`Preprocess`] with its
//! [`ResizeMode`], [`Interpolation`] and the OpenAI mean and std), and what stops or thins a
//! run ([`DataError`], [`SkipReason`], [`SkipCounts`]). Each is a shortcut to one item;
//! everything else, modules included, has one path, through its floor (e.g.
//! `formats::webdataset::ShardWriter`, `sources::shards::ShardSet`, `tools::pack::pack`).

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

// The public surface at the root (see the crate docs): the names the trainer and launch use
// most. Everything else, by its module.
pub use error::DataError;
pub use loader::Loader;
pub use plan::stream::ShardOptions;
pub use plan::{Batch, LoaderConfig, LoaderState};
pub use skip::{SkipCounts, SkipReason};
pub use sources::spec::DataSpec;
pub use sources::DataSource;
pub use tokenizer::Tokenizer;
pub use transform::{Interpolation, Preprocess, ResizeMode, OPENAI_MEAN, OPENAI_STD};
