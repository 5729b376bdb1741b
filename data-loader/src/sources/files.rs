//! Image-caption sources that are not WebDataset shards: a CSV/TSV file (`csv.rs`), a folder of
//! images with `.txt` captions beside them (`folder.rs`), a JSON Lines file (`jsonl.rs`).
//!
//! Each reduces to the same thing, a list of (image file, caption) entries read when the
//! source is opened, held in a [`FileDataset`]. The image file is read and decoded on
//! [`Dataset::get`], like a shard sample. What is wrong with the list itself (an empty caption,
//! a row without an image path, a line that is not JSON) is found while opening: those rows
//! get no index and are counted in [`Dataset::load_skips`]. What is wrong with the files (a
//! missing or undecodable image, a missing caption file) is found on `get` and is a
//! [`SkipReason`]. Nothing panics on bad input.

use std::path::{Path, PathBuf};

use super::{Dataset, Sample};
use crate::formats::image::{decode_image, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS};
use crate::formats::webdataset::{usable_caption, RawSample};
use crate::skip::{SkipCounts, SkipReason};

/// The name of [`SkipReason::BadRecord`] in [`SkipCounts`]: a CSV row or JSONL line that cannot be parsed.
pub const BAD_RECORD: &str = "bad_record";

/// Where an entry's caption is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caption {
    /// Read with the index (CSV, JSONL); never empty.
    Text(String),
    /// A sidecar file, read on `get` (folder).
    File(PathBuf),
}

/// One image-caption pair of a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Stable name of the sample within its source (a line number, a relative path).
    pub key: String,
    /// The image file, already joined to the source's folder.
    pub image: PathBuf,
    pub caption: Caption,
    /// The class index, for sources that have one (a folder per class).
    pub label: Option<i64>,
    /// Where the entry was read, for logs: `line 12`, a relative path.
    pub origin: String,
}

/// A source held as a list of image files and captions; images are read on
/// [`Dataset::get`]. Built by `csv::load`, `folder::load` and `jsonl::load`.
#[derive(Debug)]
pub struct FileDataset {
    /// The CSV/JSONL file or the folder.
    source: PathBuf,
    entries: Vec<Entry>,
    max_pixels: u64,
    load_skips: SkipCounts,
}

impl FileDataset {
    /// A dataset of `entries` read from `source`; `load_skips` counts the records dropped
    /// while reading it.
    pub fn new(source: PathBuf, entries: Vec<Entry>, load_skips: SkipCounts) -> Self {
        if load_skips.total() > 0 {
            tracing::warn!(
                "{} record(s) of {} skipped while reading it ({load_skips}); {} kept",
                load_skips.total(),
                source.display(),
                entries.len()
            );
        }
        Self { source, entries, max_pixels: DEFAULT_MAX_PIXELS, load_skips }
    }

    /// Sets the largest image, in pixels, that `get` decodes (PIL's limit by default).
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// The CSV/JSONL file or folder this was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Entry `index`'s image file as the source names it: relative to the folder, or to the
    /// CSV/JSONL file's folder (absolute paths stay absolute).
    pub fn source_name(&self, index: usize) -> Option<String> {
        let entry = self.entries.get(index)?;
        let base = if self.source.is_dir() { self.source.clone() } else { base_dir(&self.source) };
        let name = entry.image.strip_prefix(&base).unwrap_or(&entry.image);
        Some(name.to_string_lossy().into_owned())
    }

    /// Sample `index` as stored: the image file's bytes, undecoded, and its caption (checked
    /// to be UTF-8, not to be non-empty). `image_ext` is the file's extension when it is one
    /// of the image extensions, else `jpg`.
    pub fn get_raw(&self, index: usize) -> Result<RawSample, SkipReason> {
        let entry = self.entries.get(index).ok_or(SkipReason::MissingImage)?;
        let image = std::fs::read(&entry.image).map_err(|_| SkipReason::MissingImage)?;
        let caption = match &entry.caption {
            Caption::Text(text) => text.clone(),
            Caption::File(path) => {
                let bytes = std::fs::read(path).map_err(|_| SkipReason::MissingCaption)?;
                String::from_utf8(bytes).map_err(|_| SkipReason::NonUtf8Caption)?
            }
        };
        let image_ext = entry
            .image
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .filter(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
            .unwrap_or_else(|| "jpg".to_owned());
        Ok(RawSample {
            key: entry.key.clone(),
            image,
            image_ext,
            caption: Some(caption),
            label: entry.label,
            source: self.source_name(index),
        })
    }
}

impl Dataset for FileDataset {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, index: usize) -> Result<Sample, SkipReason> {
        let raw = self.get_raw(index)?;
        let caption = usable_caption(&raw)?.to_owned();
        let image = decode_image(&raw.image, self.max_pixels)?;
        Ok(Sample { image, caption, label: raw.label, key: raw.key, source: raw.source })
    }

    fn caption(&self, index: usize) -> Result<String, SkipReason> {
        let entry = self.entries.get(index).ok_or(SkipReason::MissingImage)?;
        match &entry.caption {
            Caption::Text(text) => Ok(text.clone()),
            Caption::File(path) => {
                let bytes = std::fs::read(path).map_err(|_| SkipReason::MissingCaption)?;
                String::from_utf8(bytes).map_err(|_| SkipReason::NonUtf8Caption)
            }
        }
    }

    fn describe(&self, index: usize) -> String {
        match self.entries.get(index) {
            Some(e) => {
                format!("{}, {} (image {})", self.source.display(), e.origin, e.image.display())
            }
            None => format!("{}, sample {index} (out of range)", self.source.display()),
        }
    }

    fn load_skips(&self) -> SkipCounts {
        self.load_skips.clone()
    }
}

/// Counts a record dropped while reading `source` under `reason` (a [`SkipReason`] name or
/// [`BAD_RECORD`]) and logs it: the first few in full, then every 1000th, so that a broken
/// file cannot flood the log.
pub(crate) fn skip_record(
    skips: &mut SkipCounts,
    reason: &str,
    source: &Path,
    origin: &str,
    detail: &str,
) {
    *skips.entry(reason.to_owned()).or_insert(0) += 1;
    let n = skips.total();
    if n <= 10 || n % 1000 == 0 {
        tracing::warn!(
            skipped_so_far = n,
            "skipping {}, {origin}: {reason}{}",
            source.display(),
            if detail.is_empty() { String::new() } else { format!(" ({detail})") }
        );
    }
}

/// The folder that relative image paths in `file` are resolved against.
pub(crate) fn base_dir(file: &Path) -> PathBuf {
    file.parent().map_or_else(PathBuf::new, Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::test_images::*;

    #[test]
    fn file_dataset_reads_decodes_and_skips_on_get() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("a.jpg"), &jpeg(12, 8));
        write(&d.join("b.png"), &png(5, 6));
        write(&d.join("bad.jpg"), b"not an image");
        write(&d.join("c.jpg"), &jpeg(4, 4));
        write(&d.join("c.txt"), b"\xff\xfe");
        write(&d.join("e.jpg"), &jpeg(4, 4));
        write(&d.join("e.txt"), b" \n");
        let text = |s: &str| Caption::Text(s.to_owned());
        let entry = |key: &str, image: &str, caption| Entry {
            label: None,
            key: key.to_owned(),
            image: d.join(image),
            caption,
            origin: format!("line {key}"),
        };
        let entries = vec![
            entry("1", "a.jpg", text("a jpeg")),
            entry("2", "b.png", text("a png")),
            entry("3", "bad.jpg", text("broken")),
            entry("4", "gone.jpg", text("missing")),
            entry("5", "c.jpg", Caption::File(d.join("c.txt"))),
            entry("6", "a.jpg", Caption::File(d.join("none.txt"))),
            entry("7", "e.jpg", Caption::File(d.join("e.txt"))),
        ];
        let ds = FileDataset::new(d.join("list.csv"), entries, SkipCounts::new());
        assert_eq!(ds.len(), 7);
        let a = ds.get(0).unwrap();
        assert_eq!((a.key.as_str(), a.caption.as_str()), ("1", "a jpeg"));
        assert_eq!(a.image.dimensions(), (12, 8));
        assert_eq!(ds.get(1).unwrap().image.dimensions(), (5, 6));
        assert_eq!(ds.get_raw(1).unwrap().image_ext, "png");
        assert_eq!(ds.get(2), Err(SkipReason::UndecodableImage));
        assert_eq!(ds.get(3), Err(SkipReason::MissingImage));
        assert_eq!(ds.get(4), Err(SkipReason::NonUtf8Caption));
        assert_eq!(ds.get(5), Err(SkipReason::MissingCaption));
        assert_eq!(ds.get(6), Err(SkipReason::EmptyCaption));
        assert_eq!(ds.get(7), Err(SkipReason::MissingImage));
        let described = ds.describe(3);
        assert!(described.contains("list.csv") && described.contains("line 4"), "{described}");
        let small = FileDataset::new(d.join("list.csv"), ds.entries().to_vec(), SkipCounts::new())
            .with_max_pixels(10);
        assert_eq!(small.get(0), Err(SkipReason::TooManyPixels));
    }
}

#[cfg(test)]
mod bad_record_tests {
    #[test]
    fn bad_record_is_the_skip_reasons_name() {
        assert_eq!(super::BAD_RECORD, crate::skip::SkipReason::BadRecord.as_str());
    }
}
