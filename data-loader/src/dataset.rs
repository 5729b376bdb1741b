//! What a data spec opens to: a [`DataSource`], either WebDataset shards (streamed, see
//! `stream.rs`) or an indexed [`Dataset`]: sample `i` of `len`, decoded on demand, the
//! loader deciding the order.
//!
//! [`SyntheticDataset`] draws scene `i` on demand. CSV, JSONL and image-folder sources
//! ([`crate::sources`]) hold their list of files and read each image on `get`.

use std::sync::Arc;

use image::RgbImage;

use crate::error::DataError;
use crate::shards::ShardSet;
pub use crate::skip::{SkipCounts, SkipReason};
use crate::sources;
use crate::spec::DataSpec;
use crate::synth::draw_scene;

/// Side of the scenes [`open`] draws for `synthetic:N` (CLIP's input size; the loader's
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

/// `len` synthetic scenes, scene `i` drawn from `(seed, i)` on each `get` (no JPEG round
/// trip). Every scene has one object and a label, or two objects and the first one's label.
#[derive(Clone, Debug)]
pub struct SyntheticDataset {
    len: usize,
    seed: u64,
    image_size: u32,
}

impl SyntheticDataset {
    pub fn new(len: usize, seed: u64, image_size: u32) -> Self {
        Self {
            len,
            seed,
            image_size,
        }
    }
}

impl Dataset for SyntheticDataset {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize) -> Result<Sample, SkipReason> {
        if index >= self.len {
            return Err(SkipReason::MissingImage);
        }
        let scene = draw_scene(self.seed, index as u64, self.image_size, false);
        Ok(Sample {
            image: scene.image,
            caption: scene.caption,
            label: Some(scene.label as i64),
            key: format!("{index:09}"),
            source: None,
        })
    }

    fn describe(&self, index: usize) -> String {
        format!("synthetic scene {index} (seed {})", self.seed)
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
    /// through [`open`]. A source left with no sample once its unusable entries and shards
    /// are dropped is [`DataError::NoUsableSample`], with the reasons: every command that
    /// reads data (training, evaluation, indexing) refuses it here, before any work.
    pub fn open(spec: &DataSpec, synthetic_seed: u64) -> Result<Self, DataError> {
        let source = match spec {
            DataSpec::Shards(sources) => Self::Shards(ShardSet::resolve(sources)?),
            other => Self::Indexed(Arc::from(open(other, synthetic_seed)?)),
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
                    let Ok(reader) = shard.location.open() else {
                        skipped.add(SkipReason::UnreadableShard);
                        continue;
                    };
                    crate::webdataset::for_each_sample_in(reader, &shard.location.name(), |item| {
                        match item.map_err(|e| e.reason).and_then(|raw| raw.caption.ok_or(SkipReason::MissingCaption)) {
                            Ok(c) if !c.trim().is_empty() => captions.push(c),
                            Ok(_) => skipped.add(SkipReason::EmptyCaption),
                            Err(reason) => skipped.add(reason),
                        }
                        std::ops::ControlFlow::Continue(())
                    });
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
/// [`FileDataset`](crate::sources::FileDataset) (see [`crate::sources`]). Shards are not
/// indexed: open them with [`DataSource::open`].
pub fn open(spec: &DataSpec, synthetic_seed: u64) -> Result<Box<dyn Dataset>, DataError> {
    open_with_image_size(spec, synthetic_seed, SYNTHETIC_IMAGE_SIZE)
}

/// [`open`], drawing synthetic scenes at `synthetic_image_size` pixels.
pub fn open_with_image_size(
    spec: &DataSpec,
    synthetic_seed: u64,
    synthetic_image_size: u32,
) -> Result<Box<dyn Dataset>, DataError> {
    match spec {
        DataSpec::Synthetic(n) => {
            let len = usize::try_from(*n)
                .map_err(|_| DataError::Config(format!("synthetic:{n} is too many samples")))?;
            Ok(Box::new(SyntheticDataset::new(
                len,
                synthetic_seed,
                synthetic_image_size,
            )))
        }
        DataSpec::Shards(_) => Err(DataError::Config(
            "WebDataset shards are streamed, not indexed; open them with DataSource::open".into(),
        )),
        DataSpec::Csv(csv) => Ok(Box::new(sources::csv::load(csv)?)),
        DataSpec::Folder(dir) => Ok(Box::new(sources::folder::load(dir)?)),
        DataSpec::Classes(dir) => Ok(Box::new(sources::classes::load(dir)?.0)),
        DataSpec::Jsonl(jsonl) => Ok(Box::new(sources::jsonl::load(jsonl)?)),
    }
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
        let d = open(&DataSpec::Synthetic(7), 1).unwrap();
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
        std::fs::write(d.join("list.csv"), "filepath,title
,no image
a.jpg,
").unwrap();
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
