//! `oxclip data pack`: a CSV, JSONL, image-folder or Parquet/Arrow table source written as
//! WebDataset shards, the layout img2dataset writes and the shard catalog
//! ([`sources::shards`](crate::sources::shards)) reads:
//! `OUT/00000.tar ...` with members `KEY.jpg|png|webp`, `KEY.txt` and `KEY.json`, plus
//! `OUT/index.json` (`{"shards": [{"name", "samples"}], "samples", "written_by"}`, as `synth`
//! writes it, marked as pack's).
//!
//! Every input is decoded before it is written, so the shards hold only samples that training
//! can use; the others are skipped and counted by reason. Images keep their original bytes
//! and format (the member extension follows the bytes, not the source file's name) unless
//! `max_side` asks for a resize, in which case they are re-encoded as JPEG. Keys are the
//! written sample's number, `000000000` ..., in source order; `KEY.json` keeps where the
//! sample came from, `{"key": "000000031", "source": "img/31.jpg"}` (img2dataset's `KEY.json`
//! also carries the `key`; its `url` would be the download address, which a local file has
//! not), the image path as the source names it (a table row's: its `Image` path, or the file
//! and row). A table row with several captions is packed with one of them, the one drawn for
//! epoch 0 of seed 0; the shards then serve that caption every epoch.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{first_few, DataError};
use crate::formats::image::{decode_image, DEFAULT_MAX_PIXELS};
use crate::formats::index::{ShardIndex, ShardIndexEntry};
use crate::formats::webdataset::{
    is_plain_shard_name, remove_stale_shards, usable_caption, write_atomic, RawSample, ShardWriter,
};
use crate::parallel::map_in_order;
use crate::skip::{SampleError, SkipCounts, SkipReason};
use crate::sources::shards::ShardSet;
use crate::sources::table::CaptionDraw;
use crate::sources::{Dataset, FileDataset};

/// Inputs prepared on the threads between two writes (and held in memory at once, encoded).
const CHUNK_SAMPLES: usize = 256;

/// How [`pack`] writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackConfig {
    /// Samples per shard (img2dataset's `number_sample_per_shard`, 10000 by default).
    pub shard_size: u64,
    /// Longest side, in pixels, of a written image; larger ones are downscaled (bicubic,
    /// aspect kept) and re-encoded as JPEG. `None` keeps every image as it is.
    pub max_side: Option<u32>,
    /// JPEG quality of re-encoded images (img2dataset's default, 95).
    pub jpeg_quality: u8,
    /// Largest image, in pixels, accepted (PIL's limit by default).
    pub max_pixels: u64,
    /// Threads that read, decode and re-encode.
    pub threads: usize,
    /// Write into a folder that holds files pack did not write, beside them: shard names
    /// skip every name taken, and nothing there is overwritten or removed.
    #[serde(default)]
    pub beside_existing: bool,
}

impl Default for PackConfig {
    fn default() -> Self {
        Self {
            shard_size: 10_000,
            max_side: None,
            jpeg_quality: 95,
            max_pixels: DEFAULT_MAX_PIXELS,
            threads: crate::parallel::default_threads(),
            beside_existing: false,
        }
    }
}

/// What [`pack`] wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackSummary {
    pub out: PathBuf,
    /// Samples written.
    pub samples: u64,
    /// Shards written (`00000.tar` ...).
    pub shards: u64,
    /// Samples whose image was downscaled to `max_side` and re-encoded.
    pub resized: u64,
    /// Inputs not written, by reason (including those dropped while reading the source).
    pub skipped: SkipCounts,
}

/// One input ready to write.
struct Prepared {
    image_ext: &'static str,
    image: Vec<u8>,
    caption: String,
    resized: bool,
}

/// What `index.json` of a pack says wrote it: a folder whose index carries this is pack's
/// own earlier output.
pub const PACK_WRITER: &str = "oxclip data pack";

/// Names shown when a message lists the files of a folder.
const NAMES_SHOWN: usize = 5;

/// What [`pack`] reads: a list of image files with captions (CSV, JSONL, a folder), each
/// read on the threads; or the rows of a Parquet or Arrow table (`sources::open_table`),
/// read part by part in order, a caption drawn as for epoch 0 of seed 0 where a row has
/// several.
#[derive(Clone, Copy)]
pub enum PackSource<'a> {
    Files(&'a FileDataset),
    Table(&'a ShardSet),
}

impl<'a> From<&'a FileDataset> for PackSource<'a> {
    fn from(files: &'a FileDataset) -> Self {
        Self::Files(files)
    }
}

impl<'a> From<&'a ShardSet> for PackSource<'a> {
    fn from(table: &'a ShardSet) -> Self {
        Self::Table(table)
    }
}

impl PackSource<'_> {
    fn len(&self) -> u64 {
        match self {
            Self::Files(files) => files.len() as u64,
            Self::Table(table) => table.total_samples(),
        }
    }

    /// The file, folder or spec, for messages.
    fn name(&self) -> String {
        match self {
            Self::Files(files) => files.source().display().to_string(),
            Self::Table(table) => table.sources.join("::"),
        }
    }

    fn load_skips(&self) -> SkipCounts {
        match self {
            Self::Files(files) => files.load_skips(),
            Self::Table(table) => table.open_skips.clone(),
        }
    }
}

/// Writes `source` as shards in `out` (created if needed) and `out/index.json`.
///
/// Pack never removes or overwrites a file it did not write. `out` must be empty, missing,
/// or pack's own earlier output (an `index.json` that pack wrote), in which case the shards
/// that index lists are replaced: those this pack does not write again are removed once the
/// new index is in place. Any other file there is an error naming it, unless
/// `cfg.beside_existing`: then shards go beside those files under names none of them has.
/// `progress` is called with (inputs done, inputs in the source).
pub fn pack<'a>(
    source: impl Into<PackSource<'a>>,
    out: &Path,
    cfg: &PackConfig,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackSummary, DataError> {
    let source = source.into();
    if cfg.shard_size == 0 {
        return Err(DataError::Config("pack: shard_size must be at least 1".into()));
    }
    if cfg.max_side == Some(0) {
        return Err(DataError::Config("pack: max_side must be at least 1".into()));
    }
    if source.len() == 0 {
        return Err(DataError::NoUsableSample {
            what: source.name(),
            skipped: source.load_skips(),
        });
    }
    let survey = Survey::of(out, cfg.beside_existing)?;
    let created = !out.exists();
    std::fs::create_dir_all(out)
        .map_err(|source| DataError::Write { path: out.to_owned(), source })?;
    // Shards written under names the earlier index did not list: if this pack fails they
    // would belong to no index, so they go.
    let mut new_names = Vec::new();
    let written = write_shards(source, out, cfg, &survey, &mut new_names, progress).and_then(
        |(summary, index)| {
            if summary.samples == 0 {
                return Err(DataError::NoUsableSample {
                    what: source.name(),
                    skipped: summary.skipped,
                });
            }
            let index_path = out.join("index.json");
            let json = serde_json::to_vec_pretty(&index)
                .map_err(|source| DataError::Json { path: index_path.clone(), source })?;
            write_atomic(&index_path, &json)?;
            Ok((summary, index))
        },
    );
    match written {
        Ok((summary, index)) => {
            let kept: Vec<String> = index.shards.iter().map(|s| s.name.clone()).collect();
            remove_stale_shards(out, &survey.listed, &kept)?;
            Ok(summary)
        }
        Err(e) => {
            for name in &new_names {
                let _ = std::fs::remove_file(out.join(name));
            }
            if created {
                // Only removes the folder when nothing is left in it.
                let _ = std::fs::remove_dir(out);
            }
            Err(e)
        }
    }
}

/// What is in a pack's output folder before it writes.
struct Survey {
    /// Shards the earlier pack's index lists (pack's own, which it may replace and remove).
    listed: Vec<String>,
    /// Every other name in the folder.
    foreign: BTreeSet<String>,
}

impl Survey {
    /// Lists `out` and refuses it when it holds files pack did not write (unless
    /// `beside_existing`), or when writing there would overwrite one (`index.json`).
    fn of(out: &Path, beside_existing: bool) -> Result<Self, DataError> {
        let mut survey = Survey { listed: Vec::new(), foreign: BTreeSet::new() };
        let entries = match std::fs::read_dir(out) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(survey),
            Err(source) => return Err(DataError::Read { path: out.to_owned(), source }),
        };
        let names: Vec<String> = entries
            .map(|entry| {
                entry
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(|source| DataError::Read { path: out.to_owned(), source })
            })
            .collect::<Result<_, _>>()?;
        let own_index = ShardIndex::read(out)
            .ok()
            .filter(|index| index.written_by.as_deref() == Some(PACK_WRITER));
        if let Some(index) = &own_index {
            survey.listed = index
                .shards
                .iter()
                .map(|s| s.name.clone())
                .filter(|name| is_plain_shard_name(name))
                .collect();
        }
        for name in names {
            let ours =
                (own_index.is_some() && name == "index.json") || survey.listed.contains(&name);
            if !ours {
                survey.foreign.insert(name);
            }
        }
        if survey.foreign.is_empty() {
            return Ok(survey);
        }
        let foreign: Vec<&String> = survey.foreign.iter().collect();
        let listing = first_few(&foreign, NAMES_SHOWN);
        if !beside_existing {
            return Err(DataError::PackOutput {
                dir: out.to_owned(),
                message: format!(
                    "the folder holds {} file(s) that `data pack` did not write: {listing}. \
                     Pack into an empty or new folder, or pass --beside-existing to write \
                     the shards beside them (nothing there is then overwritten or removed)",
                    foreign.len()
                ),
            });
        }
        if survey.foreign.contains("index.json") {
            return Err(DataError::PackOutput {
                dir: out.to_owned(),
                message: "index.json there was not written by `data pack`, and pack would \
                          have to overwrite it; --beside-existing never overwrites a file. \
                          Pack into another folder"
                    .into(),
            });
        }
        Ok(survey)
    }

    /// The next shard name, `NNNNN.tar` numbered from `next` on, that is neither a file pack
    /// did not write nor has its temporary name (`NNNNN.tar.tmp`) taken; `next` moves past it.
    fn free_name(&self, next: &mut u64) -> String {
        loop {
            let name = format!("{:05}.tar", *next);
            *next += 1;
            let tmp = format!("{name}.tmp");
            if !self.foreign.contains(&name) && !self.foreign.contains(&tmp) {
                return name;
            }
        }
    }
}

/// Reads, checks and writes every input of `source` as shards in `out`. `new_names` gets
/// each shard name written that the earlier index did not list.
fn write_shards(
    source: PackSource<'_>,
    out: &Path,
    cfg: &PackConfig,
    survey: &Survey,
    new_names: &mut Vec<String>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(PackSummary, ShardIndex), DataError> {
    let len = source.len();
    let mut packer = Packer {
        out,
        survey,
        new_names,
        shard_size: cfg.shard_size,
        summary: PackSummary {
            out: out.to_owned(),
            samples: 0,
            shards: 0,
            resized: 0,
            skipped: source.load_skips(),
        },
        index: ShardIndex {
            shards: Vec::new(),
            samples: 0,
            written_by: Some(PACK_WRITER.to_owned()),
        },
        writer: None,
        next_number: 0,
    };
    progress(0, len);
    match source {
        PackSource::Files(files) => {
            let len = files.len();
            let mut start = 0;
            while start < len {
                let end = (start + CHUNK_SAMPLES).min(len);
                let prepared = map_in_order(start..end, cfg.threads, |i| match files.get_raw(i) {
                    Ok(raw) => prepare(raw, cfg, &files.describe(i)),
                    Err(reason) => Ok(Err(reason)),
                })?;
                for (i, result) in (start..end).zip(prepared) {
                    match result? {
                        Ok(item) => packer.write(item, files.source_name(i))?,
                        Err(reason) => packer.skip(reason, &files.describe(i)),
                    }
                }
                start = end;
                progress(start as u64, len as u64);
            }
        }
        PackSource::Table(table) => {
            let mut done = 0u64;
            let mut chunk: Vec<Result<RawSample, SampleError>> = Vec::with_capacity(CHUNK_SAMPLES);
            let mut write_chunk = |chunk: &mut Vec<Result<RawSample, SampleError>>,
                                   packer: &mut Packer<'_>|
             -> Result<(), DataError> {
                let items = std::mem::take(chunk);
                let prepared = map_in_order(0..items.len(), cfg.threads, |i| match &items[i] {
                    Ok(raw) => prepare(raw.clone(), cfg, &raw.key),
                    Err(e) => Ok(Err(e.reason)),
                })?;
                for (item, result) in items.iter().zip(prepared) {
                    match (item, result?) {
                        (Ok(raw), Ok(prepared)) => packer.write(prepared, raw.source.clone())?,
                        (Ok(raw), Err(reason)) => packer.skip(reason, &raw.key),
                        (Err(e), Err(_)) | (Err(e), Ok(_)) => packer.skip(e.reason, &e.to_string()),
                    }
                }
                done += items.len() as u64;
                progress(done, len);
                Ok(())
            };
            for shard in &table.shards {
                let mut failed = Ok(());
                let read = shard.location.for_each_sample(CaptionDraw::default(), |item| {
                    chunk.push(item);
                    if chunk.len() >= CHUNK_SAMPLES {
                        failed = write_chunk(&mut chunk, &mut packer);
                        if failed.is_err() {
                            return ControlFlow::Break(());
                        }
                    }
                    ControlFlow::Continue(())
                });
                failed?;
                if let Err(message) = read {
                    tracing::warn!("not packing {}: {message}", shard.location);
                    packer.summary.skipped.add(SkipReason::UnreadableShard);
                }
            }
            write_chunk(&mut chunk, &mut packer)?;
        }
    }
    packer.finish()
}

/// The shards being written, and the counts so far.
struct Packer<'a> {
    out: &'a Path,
    survey: &'a Survey,
    new_names: &'a mut Vec<String>,
    shard_size: u64,
    summary: PackSummary,
    index: ShardIndex,
    /// The shard being filled, and its name.
    writer: Option<(String, ShardWriter)>,
    next_number: u64,
}

impl Packer<'_> {
    /// Writes one prepared input as the next sample; `source` is where it came from, for
    /// `KEY.json`.
    fn write(&mut self, item: Prepared, source: Option<String>) -> Result<(), DataError> {
        let (name, mut shard) = match self.writer.take() {
            Some(open) => open,
            None => {
                let name = self.survey.free_name(&mut self.next_number);
                let shard = ShardWriter::create(&self.out.join(&name))?;
                (name, shard)
            }
        };
        let key = format!("{:09}", self.summary.samples);
        let json = serde_json::json!({ "key": key, "source": source }).to_string();
        shard.write_sample(
            &key,
            &[
                (item.image_ext, &item.image),
                ("txt", item.caption.as_bytes()),
                ("json", json.as_bytes()),
            ],
        )?;
        self.summary.samples += 1;
        self.summary.resized += u64::from(item.resized);
        if shard.samples() >= self.shard_size {
            finish_shard(name, shard, &mut self.index, self.survey, self.new_names)?;
        } else {
            self.writer = Some((name, shard));
        }
        Ok(())
    }

    /// Counts an input not written, and says so (the first few, then every 1000th).
    fn skip(&mut self, reason: SkipReason, what: &str) {
        self.summary.skipped.add(reason);
        let n = self.summary.skipped.total();
        if n <= 10 || n % 1000 == 0 {
            tracing::warn!("not packing {what}: {reason}");
        }
    }

    fn finish(mut self) -> Result<(PackSummary, ShardIndex), DataError> {
        if let Some((name, shard)) = self.writer.take() {
            finish_shard(name, shard, &mut self.index, self.survey, self.new_names)?;
        }
        self.summary.shards = self.index.shards.len() as u64;
        Ok((self.summary, self.index))
    }
}

fn finish_shard(
    name: String,
    shard: ShardWriter,
    index: &mut ShardIndex,
    survey: &Survey,
    new_names: &mut Vec<String>,
) -> Result<(), DataError> {
    let samples = shard.finish()?;
    if !survey.listed.contains(&name) {
        new_names.push(name.clone());
    }
    index.samples += samples;
    index.shards.push(ShardIndexEntry { name, samples });
    Ok(())
}

/// Checks and (when too large) resizes one input, `what` naming it in errors. The outer
/// error stops the pack; the inner one skips the input.
fn prepare(
    raw: RawSample,
    cfg: &PackConfig,
    what: &str,
) -> Result<Result<Prepared, SkipReason>, DataError> {
    let caption = match usable_caption(&raw) {
        Ok(caption) => caption.to_owned(),
        Err(reason) => return Ok(Err(reason)),
    };
    let decoded = match decode_image(&raw.image, cfg.max_pixels) {
        Ok(image) => image,
        Err(reason) => return Ok(Err(reason)),
    };
    let too_large = cfg.max_side.filter(|&side| decoded.width().max(decoded.height()) > side);
    if let Some(side) = too_large {
        let resized = downscale(&decoded, side);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, cfg.jpeg_quality)
            .encode_image(&resized)
            .map_err(|e| DataError::Encode { key: what.to_owned(), message: e.to_string() })?;
        return Ok(Ok(Prepared { image_ext: "jpg", image: jpeg, caption, resized: true }));
    }
    // It decoded, so the format is one of these.
    let image_ext = match image::guess_format(&raw.image) {
        Ok(image::ImageFormat::Png) => "png",
        Ok(image::ImageFormat::WebP) => "webp",
        _ => "jpg",
    };
    Ok(Ok(Prepared { image_ext, image: raw.image, caption, resized: false }))
}

/// `img` scaled so that its longer side is `side` (aspect kept, each side at least 1 pixel),
/// bicubic (Catmull-Rom, as PIL's BICUBIC).
fn downscale(img: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = f64::from(side) / f64::from(w.max(h));
    let new_w = ((f64::from(w) * scale).round() as u32).clamp(1, side);
    let new_h = ((f64::from(h) * scale).round() as u32).clamp(1, side);
    let fast = || -> Option<RgbImage> {
        let src = ImageRef::new(w, h, img.as_raw(), PixelType::U8x3).ok()?;
        let mut dst = Image::new(new_w, new_h, PixelType::U8x3);
        let options =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
        Resizer::new().resize(&src, &mut dst, &options).ok()?;
        RgbImage::from_raw(new_w, new_h, dst.into_vec())
    };
    fast().unwrap_or_else(|| {
        image::imageops::resize(img, new_w, new_h, image::imageops::FilterType::CatmullRom)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::decode_image;
    use crate::formats::image::test_images::{jpeg, png, write};
    use crate::formats::webdataset::read_shard;
    use crate::sources::spec::{CsvSpec, DataSpec};
    use crate::sources::{csv, folder};

    fn csv_source(path: &Path) -> FileDataset {
        let DataSpec::Csv(spec) = DataSpec::parse(path.to_str().unwrap()).unwrap() else {
            panic!("not a csv spec");
        };
        let spec: CsvSpec = spec;
        csv::load(&spec).unwrap()
    }

    #[test]
    fn packs_a_csv_into_indexed_shards_skipping_bad_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = jpeg(40, 20);
        let b = png(7, 9);
        write(&d.join("src/a.jpg"), &a);
        // A PNG under a .jpg name keeps its bytes and becomes KEY.png.
        write(&d.join("src/b.jpg"), &b);
        write(&d.join("src/bad.jpg"), b"garbage");
        let mut text = String::from("filepath\ttitle\n");
        for i in 0..5 {
            text.push_str(&format!("a.jpg\t\"caption {i}, with a comma\"\n"));
        }
        text.push_str("b.jpg\tthe png\nbad.jpg\tbroken\nmissing.jpg\tgone\na.jpg\t \n");
        write(&d.join("src/list.csv"), text.as_bytes());
        let source = csv_source(&d.join("src/list.csv"));

        let out = d.join("shards");
        // An earlier, larger pack of this folder: its shards beyond this pack's go away.
        let one_per_shard = PackConfig { shard_size: 1, ..PackConfig::default() };
        let earlier = pack(&source, &out, &one_per_shard, &mut |_, _| {}).unwrap();
        assert_eq!(earlier.shards, 6);
        assert!(out.join("00005.tar").exists());
        let cfg = PackConfig { shard_size: 4, threads: 3, ..PackConfig::default() };
        let mut calls = Vec::new();
        let summary =
            pack(&source, &out, &cfg, &mut |done, total| calls.push((done, total))).unwrap();
        assert_eq!((summary.samples, summary.shards, summary.resized), (6, 2, 0));
        assert_eq!(summary.skipped.get("undecodable_image"), Some(&1));
        assert_eq!(summary.skipped.get("missing_image"), Some(&1));
        assert_eq!(summary.skipped.get("empty_caption"), Some(&1));
        assert_eq!(summary.skipped.total(), 3);
        assert_eq!(calls.last(), Some(&(8, 8)));
        for gone in ["00002.tar", "00005.tar"] {
            assert!(!out.join(gone).exists(), "{gone}");
        }

        let index = ShardIndex::read(&out).unwrap();
        assert_eq!(index.samples, 6);
        let names: Vec<_> = index.shards.iter().map(|s| (s.name.as_str(), s.samples)).collect();
        assert_eq!(names, [("00000.tar", 4), ("00001.tar", 2)]);
        let samples: Vec<_> = index
            .shards
            .iter()
            .flat_map(|s| read_shard(&out.join(&s.name)))
            .map(|s| s.unwrap())
            .collect();
        assert_eq!(samples[0].key, "000000000");
        assert_eq!(samples[0].source.as_deref(), Some("a.jpg"));
        assert_eq!(samples[0].image, a);
        assert_eq!(samples[0].image_ext, "jpg");
        assert_eq!(samples[0].caption.as_deref(), Some("caption 0, with a comma"));
        assert_eq!(samples[5].key, "000000005");
        assert_eq!(samples[5].image, b);
        assert_eq!(samples[5].image_ext, "png");

        // The packed directory is a spec that reads back every sample.
        let spec = DataSpec::parse(out.to_str().unwrap()).unwrap();
        let stats = crate::tools::stats::stats(&spec, 2, None, &mut |_, _| {}).unwrap();
        assert_eq!((stats.samples, stats.shards, stats.skipped.total()), (6, 2, 0));
    }

    #[test]
    fn max_side_downscales_and_reencodes_only_large_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("big.png"), &png(64, 32));
        write(&d.join("big.txt"), b"big");
        write(&d.join("small.png"), &png(10, 12));
        write(&d.join("small.txt"), b"small");
        write(&d.join("orphan.jpg"), &jpeg(4, 4));
        let source = folder::load(d).unwrap();
        let out = d.join("out");
        let cfg = PackConfig { max_side: Some(16), ..PackConfig::default() };
        let summary = pack(&source, &out, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!((summary.samples, summary.shards, summary.resized), (2, 1, 1));
        assert_eq!(summary.skipped.get("missing_caption"), Some(&1));
        let samples: Vec<_> = read_shard(&out.join("00000.tar")).map(|s| s.unwrap()).collect();
        assert_eq!(samples[0].image_ext, "jpg");
        let big = decode_image(&samples[0].image, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(big.dimensions(), (16, 8));
        assert_eq!(samples[1].image_ext, "png");
        assert_eq!(samples[1].image, png(10, 12));
        assert_eq!(
            downscale(&crate::formats::image::test_images::gradient(3, 300), 16).dimensions(),
            (1, 16)
        );
    }

    #[test]
    fn nothing_usable_is_an_error_that_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("list.csv"), b"filepath,title\nnone.jpg,x\nbad.jpg,y\n");
        write(&d.join("bad.jpg"), b"not an image");
        let source = csv_source(&d.join("list.csv"));
        let err = pack(&source, &d.join("out"), &PackConfig::default(), &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no usable sample in")
                && err.contains("list.csv")
                && err.contains("1 missing image, 1 undecodable image"),
            "{err}"
        );
        assert!(!d.join("out").exists());
        let zero = PackConfig { shard_size: 0, ..PackConfig::default() };
        assert!(pack(&source, &d.join("out"), &zero, &mut |_, _| {}).is_err());
    }

    /// A folder as img2dataset or a person leaves it: shards pack did not write.
    fn foreign_folder(out: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let files = [
            ("00000.tar", b"foreign shard zero".to_vec()),
            ("00007.tar", b"foreign shard seven".to_vec()),
            ("myarchive.tar", b"my own archive".to_vec()),
        ];
        files
            .into_iter()
            .map(|(name, bytes)| {
                write(&out.join(name), &bytes);
                (out.join(name), bytes)
            })
            .collect()
    }

    #[test]
    fn a_folder_with_files_pack_did_not_write_is_refused_or_written_beside() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("src/a.jpg"), &jpeg(8, 8));
        let mut text = String::from("filepath,title\n");
        for i in 0..9 {
            text.push_str(&format!("a.jpg,caption {i}\n"));
        }
        write(&d.join("src/list.csv"), text.as_bytes());
        let source = csv_source(&d.join("src/list.csv"));
        let out = d.join("out");
        let files = foreign_folder(&out);
        let cfg = PackConfig { shard_size: 1, ..PackConfig::default() };
        let err = pack(&source, &out, &cfg, &mut |_, _| {}).unwrap_err().to_string();
        assert!(
            err.contains(
                "3 file(s) that `data pack` did not write: 00000.tar, 00007.tar, myarchive.tar"
            ) && err.contains("--beside-existing"),
            "{err}"
        );
        assert!(!out.join("index.json").exists());
        for (path, bytes) in &files {
            assert_eq!(&std::fs::read(path).unwrap(), bytes);
        }

        // Beside them: nine shards, none under a taken name, every foreign file unchanged.
        let beside = PackConfig { beside_existing: true, ..cfg.clone() };
        let summary = pack(&source, &out, &beside, &mut |_, _| {}).unwrap();
        assert_eq!((summary.samples, summary.shards), (9, 9));
        let index = ShardIndex::read(&out).unwrap();
        let names: Vec<&str> = index.shards.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "00001.tar",
                "00002.tar",
                "00003.tar",
                "00004.tar",
                "00005.tar",
                "00006.tar",
                "00008.tar",
                "00009.tar",
                "00010.tar"
            ]
        );
        for (path, bytes) in &files {
            assert_eq!(&std::fs::read(path).unwrap(), bytes);
        }

        // Again, smaller: its own earlier shards go, the foreign files stay.
        let bigger_shards = PackConfig { shard_size: 5, ..beside.clone() };
        pack(&source, &out, &bigger_shards, &mut |_, _| {}).unwrap();
        let index = ShardIndex::read(&out).unwrap();
        let names: Vec<&str> = index.shards.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["00001.tar", "00002.tar"]);
        for gone in ["00003.tar", "00006.tar", "00008.tar", "00010.tar"] {
            assert!(!out.join(gone).exists(), "{gone}");
        }
        for (path, bytes) in &files {
            assert_eq!(&std::fs::read(path).unwrap(), bytes);
        }

        // An index.json pack did not write is never overwritten.
        let synth_like = d.join("synth");
        write(&synth_like.join("index.json"), br#"{"shards": [], "samples": 0}"#);
        let err = pack(&source, &synth_like, &beside, &mut |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("index.json there was not written by `data pack`"), "{err}");
        assert_eq!(
            std::fs::read(synth_like.join("index.json")).unwrap(),
            br#"{"shards": [], "samples": 0}"#
        );
    }

    /// A Parquet table with bad rows (tests/fixtures/make_parquet_fixtures.py): the good rows
    /// packed in order with their bytes and the row each came from, the bad ones counted by
    /// reason; the COCO-style set with one caption of each row's five.
    #[test]
    fn packs_the_rows_of_a_table() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf_datasets");
        let open = |spec: &str| {
            let DataSpec::Table(table) =
                DataSpec::parse(&format!("{}/{spec}", fixtures.display())).unwrap()
            else {
                panic!("{spec} is not a table")
            };
            crate::sources::open_table(&table, None).unwrap().0
        };
        let dir = tempfile::tempdir().unwrap();
        let cfg = PackConfig { shard_size: 4, threads: 2, ..PackConfig::default() };
        let out = dir.path().join("bad");
        let summary = pack(&open("bad/bad.parquet"), &out, &cfg, &mut |_, _| {}).unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures.join("expected.json")).unwrap())
                .unwrap();
        assert_eq!(summary.samples, expected["bad"]["samples"].as_u64().unwrap());
        assert_eq!(serde_json::to_value(&summary.skipped).unwrap(), expected["bad"]["skipped"]);
        assert_eq!(summary.shards, 2);
        let samples: Vec<RawSample> = ShardIndex::read(&out)
            .unwrap()
            .shards
            .iter()
            .flat_map(|s| read_shard(&out.join(&s.name)))
            .map(|s| s.unwrap())
            .collect();
        let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_deref().unwrap()).collect();
        assert_eq!(captions, ["good 0", "good 1", "good 2", "good 3", "good 4", "good 5"]);
        assert_eq!(samples[1].source.as_deref(), Some("bad.parquet, row 1"));
        let original = std::fs::read(fixtures.join("images/0001.jpg")).unwrap();
        assert_eq!(samples[1].image, original, "the image's own bytes");

        let out = dir.path().join("coco");
        let summary = pack(&open("coco_arrow"), &out, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!((summary.samples, summary.skipped.total()), (24, 0));
        let samples: Vec<RawSample> = (0..6)
            .flat_map(|i| read_shard(&out.join(format!("{i:05}.tar"))))
            .map(|s| s.unwrap())
            .collect();
        for (i, sample) in samples.iter().enumerate() {
            let caption = sample.caption.as_deref().unwrap();
            assert!(caption.starts_with(&format!("photo {i}, caption ")), "{caption}");
            assert_eq!(sample.source.as_deref(), Some(format!("{i:04}.jpg").as_str()));
        }
    }
}
