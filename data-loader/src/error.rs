//! The crate's error type. Bad *samples* are not errors: they travel as [`SkipReason`]s and
//! are counted (see `skip.rs`). A `DataError` is something the run cannot continue past: a
//! missing shard, an unreadable vocabulary, a loader configuration that makes no sense.
//!
//! [`SkipReason`]: crate::SkipReason

use std::fmt::Display;
use std::path::PathBuf;

use crate::skip::SkipCounts;

/// Everything that can stop the data side of a run. Messages name the file, shard or key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// Reading a file or directory failed.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing a file (shard, index, class list) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The CLIP BPE vocabulary is not where we looked.
    #[error(
        "CLIP BPE vocabulary not found at {path}; run `make setup` to fetch it \
         (or point OXCLIP_VOCAB at a copy of bpe_simple_vocab_16e6.txt.gz)"
    )]
    VocabMissing { path: PathBuf },

    /// The vocabulary or tokenizer.json exists but could not be used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// A data spec (`synthetic:N`, a brace pattern, a .tar, a directory) is malformed.
    #[error("invalid data spec `{spec}`: {message}")]
    Spec { spec: String, message: String },

    /// A shard named by a spec does not exist.
    #[error("shard {path} does not exist (from data spec `{spec}`)")]
    MissingShard { spec: String, path: PathBuf },

    /// A Parquet or Arrow table cannot be read as the spec asks (a column missing or of a
    /// type that is not read, files of one source with different columns); `message` names
    /// the columns.
    #[error("{path}: {message}")]
    Table { path: PathBuf, message: String },

    /// A shard could not be read at all (not merely truncated: that is a skip).
    #[error("shard {path}: {message}")]
    Shard { path: PathBuf, message: String },

    /// Encoding an image (JPEG) for a shard failed.
    #[error("cannot encode image for sample {key}: {message}")]
    Encode { key: String, message: String },

    /// A JSON file (shard index) could not be read or written.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The loader configuration is inconsistent with itself or with the dataset.
    #[error("invalid loader configuration: {0}")]
    Config(String),

    /// A saved loader position does not fit this loader (other dataset size, batch or world).
    #[error("cannot restore loader to epoch {epoch}, batch {batch_in_epoch}: {message}")]
    Restore { epoch: u64, batch_in_epoch: u64, message: String },

    /// Every sample tried in a row was bad; the dataset is broken rather than noisy.
    #[error(
        "{attempts} samples in a row could not be used (starting at sample {first_index} in \
         epoch {epoch}); last reason: {last_reason}"
    )]
    TooManySkips { epoch: u64, first_index: usize, attempts: usize, last_reason: &'static str },

    /// The class labels of a CSV/JSONL source (`label_key`, for zero-shot evaluation) are
    /// missing or not class indices; `message` names the column or the line.
    #[error("{path}: {message}")]
    Label { path: PathBuf, message: String },

    /// A pipeline thread panicked or could not be started.
    #[error("data loader thread failed: {0}")]
    Pipeline(String),

    /// A source in which no sample can be used: opening it would only train or score on
    /// nothing. `skipped` says why, by reason.
    #[error("no usable sample in {what}, {}", no_sample_reasons(skipped))]
    NoUsableSample { what: String, skipped: SkipCounts },

    /// `data pack`'s output folder holds files that pack did not write, or would have to
    /// overwrite one.
    #[error("{dir}: {message}")]
    PackOutput { dir: PathBuf, message: String },

    /// `next_batch` on an eval loader after its last batch (use `next_eval_batch` for an
    /// `Option`). The following call starts the next pass.
    #[error("eval loader reached the end of epoch {epoch}")]
    EndOfEpoch { epoch: u64 },
}

fn no_sample_reasons(skipped: &SkipCounts) -> String {
    if skipped.total() == 0 {
        "which holds none".into()
    } else {
        format!("skipped: {skipped}")
    }
}

/// `items` joined with commas, cut to the first `shown` with a count of the rest:
/// `a, b, c and 12 more (15 in all)`.
pub fn first_few<T: Display>(items: &[T], shown: usize) -> String {
    let head: Vec<String> = items.iter().take(shown).map(ToString::to_string).collect();
    let head = head.join(", ");
    if items.len() > shown {
        format!("{head} and {} more ({} in all)", items.len() - shown, items.len())
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::skip::SkipReason;

    #[test]
    fn no_usable_sample_names_the_source_and_the_reasons_in_words() {
        let mut skipped = SkipCounts::new();
        skipped.add(SkipReason::UnreadableShard);
        let e = DataError::NoUsableSample { what: "garbage.tar".into(), skipped };
        assert_eq!(e.to_string(), "no usable sample in garbage.tar, skipped: 1 unreadable shard");
        let e = DataError::NoUsableSample { what: "x".into(), skipped: SkipCounts::new() };
        assert_eq!(e.to_string(), "no usable sample in x, which holds none");
    }

    #[test]
    fn long_lists_are_cut() {
        assert_eq!(first_few(&["a", "b"], 3), "a, b");
        let many: Vec<u32> = (0..15).collect();
        assert_eq!(first_few(&many, 3), "0, 1, 2 and 12 more (15 in all)");
    }
}
