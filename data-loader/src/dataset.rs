//! Random-access datasets: sample `i` of `len`, decoded. The loader decides the order.
//!
//! [`SyntheticDataset`] draws scene `i` on demand. [`ShardDataset`] reads every shard into
//! memory once (encoded bytes, a few tens of KB per sample) and decodes on [`Dataset::get`];
//! streaming shards that do not fit in memory is a later addition. CSV, JSONL and image-folder
//! sources ([`crate::sources`]) hold their list of files and read each image on `get`.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::DataError;
pub use crate::skip::{SkipCounts, SkipReason};
use crate::sources;
use crate::spec::DataSpec;
use crate::synth::draw_scene;
use crate::transform::{decode_image, DEFAULT_MAX_PIXELS};
use crate::webdataset::read_shard;

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
        })
    }

    fn describe(&self, index: usize) -> String {
        format!("synthetic scene {index} (seed {})", self.seed)
    }
}

/// A stored sample: still-encoded image and its text.
#[derive(Clone, Debug)]
struct Stored {
    shard: u32,
    key: String,
    image: Vec<u8>,
    caption: Option<String>,
    label: Option<i64>,
}

/// WebDataset shards held in memory as encoded bytes, decoded on `get`.
#[derive(Debug)]
pub struct ShardDataset {
    shards: Vec<PathBuf>,
    samples: Vec<Stored>,
    max_pixels: u64,
    load_skips: SkipCounts,
}

impl ShardDataset {
    /// Reads every sample of `paths`, in order. Samples the reader cannot use are counted in
    /// the returned [`SkipCounts`] (and logged, the first few in full) instead of failing;
    /// a shard that cannot be opened at all is an error.
    pub fn load(paths: &[PathBuf]) -> Result<(Self, SkipCounts), DataError> {
        let mut samples = Vec::new();
        let mut skips = SkipCounts::new();
        for (shard_index, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(DataError::Shard {
                    path: path.clone(),
                    message: "no such file".into(),
                });
            }
            let shard = u32::try_from(shard_index)
                .map_err(|_| DataError::Config("more than 2^32 shards".into()))?;
            for item in read_shard(path) {
                match item {
                    Ok(raw) => samples.push(Stored {
                        shard,
                        key: raw.key,
                        image: raw.image,
                        caption: raw.caption,
                        label: raw.label,
                    }),
                    Err(e) if e.reason == SkipReason::UnreadableShard => {
                        return Err(DataError::Shard {
                            path: path.clone(),
                            message: e.message,
                        });
                    }
                    Err(e) => {
                        skips.add(e.reason);
                        let n = skips.total();
                        // The first few in full, then every 1000th, so a broken shard cannot
                        // flood the log.
                        if n <= 10 || n % 1000 == 0 {
                            tracing::warn!(skipped_so_far = n, "skipping a sample: {e}");
                        }
                    }
                }
            }
        }
        if skips.total() > 0 {
            tracing::warn!(
                ?skips,
                shards = paths.len(),
                kept = samples.len(),
                "samples skipped while reading shards"
            );
        }
        let dataset = Self {
            shards: paths.to_vec(),
            samples,
            max_pixels: DEFAULT_MAX_PIXELS,
            load_skips: skips.clone(),
        };
        Ok((dataset, skips))
    }

    /// Sets the largest image, in pixels, that `get` decodes (PIL's limit by default).
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// The shards, in the order their samples are indexed.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    fn shard_path(&self, shard: u32) -> &Path {
        self.shards
            .get(shard as usize)
            .map_or(Path::new("?"), |p| p.as_path())
    }
}

impl Dataset for ShardDataset {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn get(&self, index: usize) -> Result<Sample, SkipReason> {
        let stored = self.samples.get(index).ok_or(SkipReason::MissingImage)?;
        let caption = stored
            .caption
            .as_deref()
            .ok_or(SkipReason::MissingCaption)?;
        if caption.trim().is_empty() {
            return Err(SkipReason::EmptyCaption);
        }
        let image = decode_image(&stored.image, self.max_pixels)?;
        Ok(Sample {
            image,
            caption: caption.to_owned(),
            label: stored.label,
            key: stored.key.clone(),
        })
    }

    fn describe(&self, index: usize) -> String {
        match self.samples.get(index) {
            Some(s) => format!(
                "shard {}, sample {}",
                self.shard_path(s.shard).display(),
                s.key
            ),
            None => format!("sample {index} (out of range)"),
        }
    }

    fn load_skips(&self) -> SkipCounts {
        self.load_skips.clone()
    }
}

/// The dataset a spec names: `synthetic:N` draws N scenes from `synthetic_seed` at
/// [`SYNTHETIC_IMAGE_SIZE`]; shards are loaded with [`ShardDataset::load`] (their load-time
/// skips are logged and available from [`Dataset::load_skips`]); CSV, JSONL and image folders
/// are listed into a [`FileDataset`](crate::sources::FileDataset) (see [`crate::sources`]).
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
        DataSpec::Shards(paths) => {
            let (dataset, _skips) = ShardDataset::load(paths)?;
            Ok(Box::new(dataset))
        }
        DataSpec::Csv(csv) => Ok(Box::new(sources::csv::load(csv)?)),
        DataSpec::Folder(dir) => Ok(Box::new(sources::folder::load(dir)?)),
        DataSpec::Jsonl(jsonl) => Ok(Box::new(sources::jsonl::load(jsonl)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webdataset::ShardWriter;

    fn jpeg(color: [u8; 3]) -> Vec<u8> {
        let img = RgbImage::from_pixel(12, 10, image::Rgb(color));
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
            .encode_image(&img)
            .unwrap();
        buf
    }

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
    fn shard_dataset_reads_decodes_and_skips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000.tar");
        let mut w = ShardWriter::create(&path).unwrap();
        let good = jpeg([200, 10, 10]);
        w.write_sample("k0", &[("jpg", &good), ("txt", b"a red thing")])
            .unwrap();
        w.write_sample("k1", &[("jpg", b"garbage"), ("txt", b"broken image")])
            .unwrap();
        w.write_sample("k2", &[("jpg", &good), ("txt", b"  ")])
            .unwrap();
        w.write_sample("k3", &[("jpg", &good)]).unwrap();
        w.write_sample("k4", &[("txt", b"no image")]).unwrap();
        w.write_sample("k5", &[("jpg", &good), ("txt", b"\xff")])
            .unwrap();
        w.write_sample("k6", &[("jpg", &good), ("txt", b"labelled"), ("cls", b"5")])
            .unwrap();
        w.finish().unwrap();

        let (d, skips) = ShardDataset::load(std::slice::from_ref(&path)).unwrap();
        assert_eq!(d.len(), 5);
        assert_eq!(skips.get("missing_image"), Some(&1));
        assert_eq!(skips.get("non_utf8_caption"), Some(&1));
        assert_eq!(d.load_skips(), skips);
        let s0 = d.get(0).unwrap();
        assert_eq!(
            (s0.key.as_str(), s0.caption.as_str(), s0.label),
            ("k0", "a red thing", None)
        );
        assert_eq!(s0.image.dimensions(), (12, 10));
        assert_eq!(d.get(1).unwrap_err(), SkipReason::UndecodableImage);
        assert_eq!(d.get(2).unwrap_err(), SkipReason::EmptyCaption);
        assert_eq!(d.get(3).unwrap_err(), SkipReason::MissingCaption);
        assert_eq!(d.get(4).unwrap().label, Some(5));
        assert!(d.describe(1).contains("00000.tar") && d.describe(1).contains("k1"));
        let small = ShardDataset::load(std::slice::from_ref(&path))
            .unwrap()
            .0
            .with_max_pixels(100);
        assert_eq!(small.get(0).unwrap_err(), SkipReason::TooManyPixels);
    }

    #[test]
    fn open_follows_the_spec() {
        let d = open(&DataSpec::Synthetic(7), 1).unwrap();
        assert_eq!(d.len(), 7);
        assert_eq!(d.get(0).unwrap().image.width(), SYNTHETIC_IMAGE_SIZE);
        let Err(err) = open(
            &DataSpec::Shards(vec![PathBuf::from("/nonexistent/00000.tar")]),
            0,
        ) else {
            panic!("opened a missing shard");
        };
        assert!(err.to_string().contains("/nonexistent/00000.tar"), "{err}");
    }
}
