//! What a data spec opens to. A [`DataSpec`] (what the user wrote, [`spec`]) opens to a
//! [`DataSource`]: WebDataset shards to stream ([`shards`]: the catalog of local files and
//! `pipe:` commands with their sample counts) or an indexed [`Dataset`]: sample `i` of `len`,
//! decoded on demand, the loader deciding the order. Indexed datasets are drawn scenes
//! ([`synthetic`]) or lists of image files with captions ([`files`]: read from a CSV/TSV
//! ([`csv`]), a JSON Lines file ([`jsonl`]), a folder with `.txt` captions ([`folder`]) or a
//! folder per class ([`classes`])). Hugging Face datasets, Parquet and Arrow tables
//! ([`table`]), are streamed as shards are, a row group or record batch standing for a shard.
//!
//! Below: the file formats (`formats/`). Above: the plan that orders samples (`plan/`).

pub mod classes;
pub mod csv;
pub mod files;
pub mod folder;
pub mod jsonl;
pub mod shards;
pub mod spec;
pub mod synthetic;
pub mod table;

pub use files::{FileDataset, BAD_RECORD};
pub use spec::DataSpec;
pub use synthetic::SyntheticDataset;

use std::sync::Arc;

use image::RgbImage;

use crate::error::DataError;
use crate::skip::{SkipCounts, SkipReason};
use shards::{CountHints, Shard, ShardLocation, ShardSet};
use table::{CaptionDraw, Labels, TableSpec};

/// Side of the scenes [`open_indexed`] draws for `synthetic:N` (CLIP's input size; the loader's
/// transform resizes to whatever the model wants).
pub const SYNTHETIC_IMAGE_SIZE: u32 = 224;

/// One decoded sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub image: RgbImage,
    pub caption: String,
    /// Class index, when the sample has one (`KEY.cls`, synthetic scenes).
    pub label: Option<i64>,
    pub key: String,
    /// Where the sample came from, for people (the image file's path), when known.
    pub source: Option<String>,
}

/// Samples addressed by index `0..len()`. `get` is called from several loader threads at
/// once and must not depend on call order.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `index`, or why it cannot be used. `index >= len()` is `MissingImage`.
    fn get(&self, index: usize) -> Result<Sample, SkipReason>;

    /// Sample `index`'s caption alone (tokenizer training); by default through [`get`](Self::get).
    fn caption(&self, index: usize) -> Result<String, SkipReason> {
        self.get(index).map(|s| s.caption)
    }

    /// Where sample `index` comes from, for log lines about skips.
    fn describe(&self, index: usize) -> String {
        format!("sample {index}")
    }

    /// Samples dropped while the dataset was opened (unreadable members, truncated shards),
    /// which therefore never get an index. The loader reports them once.
    fn load_skips(&self) -> SkipCounts {
        SkipCounts::new()
    }
}

/// A spec, opened: shards to stream, or an indexed dataset.
#[derive(Clone)]
pub enum DataSource {
    Indexed(Arc<dyn Dataset>),
    Shards(ShardSet),
}

impl DataSource {
    /// Opens `spec`: shards are counted ([`ShardSet::resolve`]), everything else goes
    /// through [`open_indexed`]. A source left with no sample once its unusable entries and shards
    /// are dropped is [`DataError::NoUsableSample`], with the reasons: every command that
    /// reads data (training, evaluation, indexing) refuses it here, before any work.
    pub fn open(spec: &DataSpec, synthetic_seed: u64) -> Result<Self, DataError> {
        Self::open_with(spec, synthetic_seed, &CountHints::default())
    }

    /// [`open`](Self::open), taking shard counts from `hints` where they give them (a sizes
    /// file, or an epoch length that spares reading remote shards to count them).
    pub fn open_with(
        spec: &DataSpec,
        synthetic_seed: u64,
        hints: &CountHints,
    ) -> Result<Self, DataError> {
        let source = match spec {
            DataSpec::Shards(sources) => Self::Shards(ShardSet::resolve_with(sources, hints)?),
            DataSpec::Table(table) => Self::Shards(open_table(table, None)?.0),
            other => Self::Indexed(Arc::from(open_indexed(other, synthetic_seed)?)),
        };
        if source.is_empty() {
            let skipped = match &source {
                Self::Indexed(dataset) => dataset.load_skips(),
                Self::Shards(set) => set.open_skips.clone(),
            };
            return Err(DataError::NoUsableSample { what: spec.to_string(), skipped });
        }
        Ok(source)
    }

    /// Every usable caption, in source order (shards streamed, images never decoded), and
    /// the samples without one, by reason.
    pub fn captions(&self) -> Result<(Vec<String>, SkipCounts), DataError> {
        let mut captions = Vec::new();
        let mut skipped = SkipCounts::new();
        match self {
            Self::Indexed(dataset) => {
                for i in 0..dataset.len() {
                    match dataset.caption(i) {
                        Ok(c) if !c.trim().is_empty() => captions.push(c),
                        Ok(_) => skipped.add(SkipReason::EmptyCaption),
                        Err(reason) => skipped.add(reason),
                    }
                }
            }
            Self::Shards(set) => {
                skipped.merge(&set.open_skips);
                for shard in &set.shards {
                    let read = shard.location.for_each_sample(CaptionDraw::default(), |item| {
                        match item
                            .map_err(|e| e.reason)
                            .and_then(|raw| raw.caption.ok_or(SkipReason::MissingCaption))
                        {
                            Ok(c) if !c.trim().is_empty() => captions.push(c),
                            Ok(_) => skipped.add(SkipReason::EmptyCaption),
                            Err(reason) => skipped.add(reason),
                        }
                        std::ops::ControlFlow::Continue(())
                    });
                    if read.is_err() {
                        skipped.add(SkipReason::UnreadableShard);
                    }
                }
            }
        }
        Ok((captions, skipped))
    }

    /// Samples in the source (for shards, as their counts say).
    pub fn len(&self) -> u64 {
        match self {
            Self::Indexed(d) => d.len() as u64,
            Self::Shards(s) => s.total_samples(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The indexed dataset a spec names: `synthetic:N` draws N scenes from `synthetic_seed` at
/// [`SYNTHETIC_IMAGE_SIZE`]; CSV, JSONL and image folders are listed into a
/// [`FileDataset`](files::FileDataset). Shards are not
/// indexed: open them with [`DataSource::open`].
pub fn open_indexed(spec: &DataSpec, synthetic_seed: u64) -> Result<Box<dyn Dataset>, DataError> {
    open_with_image_size(spec, synthetic_seed, SYNTHETIC_IMAGE_SIZE)
}

/// [`open_indexed`], drawing synthetic scenes at `synthetic_image_size` pixels.
pub fn open_with_image_size(
    spec: &DataSpec,
    synthetic_seed: u64,
    synthetic_image_size: u32,
) -> Result<Box<dyn Dataset>, DataError> {
    match spec {
        DataSpec::Synthetic(n) => {
            let len = usize::try_from(*n)
                .map_err(|_| DataError::Config(format!("synthetic:{n} is too many samples")))?;
            Ok(Box::new(SyntheticDataset::new(len, synthetic_seed, synthetic_image_size)))
        }
        DataSpec::Shards(_) | DataSpec::Table(_) => Err(DataError::Config(
            "WebDataset shards and Parquet/Arrow tables are streamed, not indexed; open them \
             with DataSource::open"
                .into(),
        )),
        DataSpec::Csv(spec) => Ok(Box::new(csv::load(spec)?)),
        DataSpec::Folder(dir) => Ok(Box::new(folder::load(dir)?)),
        DataSpec::Classes(dir) => Ok(Box::new(classes::load(dir)?.0)),
        DataSpec::Jsonl(spec) => Ok(Box::new(jsonl::load(spec)?)),
    }
}

/// The [`FileDataset`] of a `csv:`, `folder:` or `jsonl:` spec; `None` for other specs.
pub fn open_files(spec: &DataSpec) -> Option<Result<FileDataset, DataError>> {
    match spec {
        DataSpec::Csv(csv_spec) => Some(csv::load(csv_spec)),
        DataSpec::Folder(dir) => Some(folder::load(dir)),
        DataSpec::Classes(dir) => Some(classes::load(dir).map(|(dataset, _)| dataset)),
        DataSpec::Jsonl(jsonl_spec) => Some(jsonl::load(jsonl_spec)),
        DataSpec::Synthetic(_) | DataSpec::Shards(_) | DataSpec::Table(_) => None,
    }
}

/// A Parquet or Arrow table as the shard set the stream plan reads, one shard per row group
/// or record batch, and what it says of its labels (a `ClassLabel` column's names). `classes`
/// is the length of a class names file given beside it (see [`table::open`]).
pub fn open_table(
    spec: &TableSpec,
    classes: Option<usize>,
) -> Result<(ShardSet, Labels), DataError> {
    let set = table::open(spec, classes)?;
    let shards = set
        .parts
        .into_iter()
        .map(|part| Shard {
            samples: part.rows(),
            location: ShardLocation::Table(part),
            source: 0,
            estimated: false,
        })
        .collect();
    let shards = ShardSet {
        shards,
        sources: vec![spec.to_string()],
        open_skips: set.skipped,
        read_timeout: None,
    };
    Ok((shards, set.labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_samples_are_stable_by_index() {
        let d = SyntheticDataset::new(10, 3, 32);
        assert_eq!(d.len(), 10);
        let a = d.get(4).unwrap();
        assert_eq!(a, d.get(4).unwrap());
        assert_eq!(a.image.dimensions(), (32, 32));
        assert!(a.label.is_some_and(|l| (0..24).contains(&l)));
        assert_eq!(d.get(10), Err(SkipReason::MissingImage));
    }

    #[test]
    fn open_follows_the_spec() {
        let d = open_indexed(&DataSpec::Synthetic(7), 1).unwrap();
        assert_eq!(d.len(), 7);
        assert_eq!(d.get(0).unwrap().image.width(), SYNTHETIC_IMAGE_SIZE);
        let source = DataSource::open(&DataSpec::Synthetic(3), 1).unwrap();
        assert!(matches!(source, DataSource::Indexed(_)));
        assert_eq!(source.len(), 3);
    }

    #[test]
    fn a_source_with_nothing_usable_is_an_error_with_its_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("list.csv"),
            "filepath,title
,no image
a.jpg,
",
        )
        .unwrap();
        let spec = DataSpec::parse(d.join("list.csv").to_str().unwrap()).unwrap();
        let err = DataSource::open(&spec, 0).err().unwrap().to_string();
        assert!(
            err.contains("list.csv") && err.contains("skipped: 1 empty caption, 1 missing image"),
            "{err}"
        );
        let tar = d.join("garbage.tar");
        std::fs::write(&tar, vec![0x5a; 3000]).unwrap();
        let spec = DataSpec::parse(tar.to_str().unwrap()).unwrap();
        let err = DataSource::open(&spec, 0).err().unwrap().to_string();
        assert!(err.contains("garbage.tar") && err.contains("1 unreadable shard"), "{err}");
    }
}
