//! `oxclip data stats`: read every sample of a source the way training would (image decoded,
//! caption checked) and count the usable ones and the skipped ones by reason.

use std::ops::ControlFlow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::formats::image::DEFAULT_MAX_PIXELS;
use crate::formats::webdataset::RawSample;
pub use crate::parallel::default_threads;
use crate::parallel::map_in_order;
use crate::skip::{SampleError, SkipCounts, SkipReason};
use crate::sources::shards::{CountHints, ShardSet};
use crate::sources::spec::DataSpec;
use crate::sources::table::CaptionDraw;
use crate::sources::{open_indexed, open_table, Dataset};

/// Samples decoded between two progress calls (and held by the threads at once).
const CHUNK_SAMPLES: usize = 512;

/// What [`stats`] found. Serialises as `{"samples": 9, "skipped": {"reason": 1}, "shards": 2}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// Samples that decode and have a caption.
    pub samples: u64,
    /// Samples skipped, by reason: those dropped while opening the source plus those that
    /// failed to decode.
    pub skipped: SkipCounts,
    /// WebDataset shards read (0 for CSV, JSONL, folder, table and synthetic sources).
    pub shards: u64,
}

/// Opens `spec` and reads every sample on up to `threads` threads, each shard read waiting at
/// most `read_timeout` for a byte (`None`: for ever; a shard that stalls is one
/// `stalled_shard`). `progress` is called with (samples read, samples in the source) as
/// reading goes on.
pub fn stats(
    spec: &DataSpec,
    threads: usize,
    read_timeout: Option<Duration>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DataStats, DataError> {
    if let DataSpec::Shards(sources) = spec {
        let set =
            ShardSet::resolve_with(sources, &CountHints { read_timeout, ..Default::default() })?;
        let (samples, skipped) = count_shard_samples(&set, threads, progress)?;
        return Ok(DataStats { samples, skipped, shards: set.shards.len() as u64 });
    }
    if let DataSpec::Table(table) = spec {
        let (set, _) = open_table(table, None)?;
        let (samples, skipped) = count_shard_samples(&set, threads, progress)?;
        return Ok(DataStats { samples, skipped, shards: 0 });
    }
    let dataset = open_indexed(spec, 0)?;
    let (samples, skipped) = count_samples(dataset.as_ref(), threads, progress)?;
    Ok(DataStats { samples, skipped, shards: 0 })
}

/// Streams every shard of `set` and decodes its samples, [`CHUNK_SAMPLES`] at a time on
/// `threads` threads: (usable samples, skips including unreadable shards).
pub fn count_shard_samples(
    set: &ShardSet,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, SkipCounts), DataError> {
    let total = set.total_samples();
    let mut skipped = set.open_skips.clone();
    let mut ok = 0u64;
    let mut read = 0u64;
    progress(0, total);
    let mut check = |chunk: &mut Vec<Result<RawSample, SampleError>>| -> Result<(), DataError> {
        let results = map_in_order(0..chunk.len(), threads, |i| match &chunk[i] {
            Ok(raw) => raw.decode(DEFAULT_MAX_PIXELS).map(|_| ()).map_err(|reason| SampleError {
                reason,
                shard: std::path::PathBuf::new(),
                key: Some(raw.key.clone()),
                message: String::new(),
            }),
            Err(e) => Err(e.clone()),
        })?;
        for result in results {
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    skipped.add(e.reason);
                    let n = skipped.total();
                    if n <= 10 || n % 1000 == 0 {
                        tracing::warn!("skipping a sample: {e}");
                    }
                }
            }
        }
        read += chunk.len() as u64;
        progress(read.min(total), total);
        chunk.clear();
        Ok(())
    };
    let mut unreadable = 0;
    for shard in &set.shards {
        let mut chunk = Vec::with_capacity(CHUNK_SAMPLES);
        let mut failed = Ok(());
        let draw = CaptionDraw::default();
        let read = shard.location.for_each_sample_within(draw, set.read_timeout, |item| {
            chunk.push(item);
            if chunk.len() >= CHUNK_SAMPLES {
                failed = check(&mut chunk);
                if failed.is_err() {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        });
        if let Err(e) = read {
            tracing::warn!("skipping shard {}: {e}", shard.location);
            unreadable += 1;
            continue;
        }
        failed?;
        check(&mut chunk)?;
    }
    for _ in 0..unreadable {
        skipped.add(SkipReason::UnreadableShard);
    }
    Ok((ok, skipped))
}

/// Reads every sample of `dataset`: (usable samples, skips including its load-time ones).
pub fn count_samples(
    dataset: &dyn Dataset,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, SkipCounts), DataError> {
    let len = dataset.len();
    let mut skipped = dataset.load_skips();
    let mut ok = 0u64;
    let mut start = 0;
    progress(0, len as u64);
    while start < len {
        let end = (start + CHUNK_SAMPLES).min(len);
        let results = map_in_order(start..end, threads, |i| dataset.get(i).map(|_| ()))?;
        for (i, result) in (start..end).zip(results) {
            match result {
                Ok(()) => ok += 1,
                Err(reason) => {
                    skipped.add(reason);
                    let n = skipped.total();
                    if n <= 10 || n % 1000 == 0 {
                        tracing::warn!("skipping {}: {reason}", dataset.describe(i));
                    }
                }
            }
        }
        start = end;
        progress(start as u64, len as u64);
    }
    Ok((ok, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::test_images::{jpeg, write};
    use crate::formats::webdataset::ShardWriter;

    /// Shards written by the Python webdataset library's TarWriter with a corrupt image, missing,
    /// empty and non-UTF-8 captions and a truncated last shard
    /// (tests/fixtures/make_webdataset_fixture.py): every good sample counted once, every bad
    /// one skipped and counted by its reason.
    #[test]
    fn python_webdataset_shards_with_faults_count_exactly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/webdataset_py");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let spec = DataSpec::parse(dir.to_str().unwrap()).unwrap();
        for threads in [1, 3] {
            let got = stats(&spec, threads, None, &mut |_, _| {}).unwrap();
            assert_eq!(serde_json::to_value(&got).unwrap(), expected, "threads {threads}");
        }
    }

    #[test]
    fn map_in_order_keeps_order_for_any_thread_count() {
        for threads in [1, 2, 3, 8, 100] {
            let out = map_in_order(5..17, threads, |i| i * 2).unwrap();
            assert_eq!(out, (5..17).map(|i| i * 2).collect::<Vec<_>>());
        }
        assert!(map_in_order(0..0, 4, |i| i).unwrap().is_empty());
        let panicked = map_in_order(0..4, 2, |i| {
            assert!(i != 3, "boom");
            i
        });
        assert!(panicked.is_err());
    }

    #[test]
    fn stats_of_shards_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = jpeg(8, 8);
        std::fs::create_dir_all(d.join("shards")).unwrap();
        for (n, name) in ["00000.tar", "00001.tar"].iter().enumerate() {
            let mut w = ShardWriter::create(&d.join("shards").join(name)).unwrap();
            w.write_sample(&format!("{n}a"), &[("jpg", &good), ("txt", b"fine")]).unwrap();
            w.write_sample(&format!("{n}b"), &[("jpg", b"bad"), ("txt", b"broken")]).unwrap();
            w.write_sample(&format!("{n}c"), &[("txt", b"no image")]).unwrap();
            w.finish().unwrap();
        }
        let spec = DataSpec::parse(d.join("shards").to_str().unwrap()).unwrap();
        let mut calls = Vec::new();
        let s = stats(&spec, 2, None, &mut |done, total| calls.push((done, total))).unwrap();
        assert_eq!((s.samples, s.shards), (2, 2));
        assert_eq!(s.skipped.get("undecodable_image"), Some(&2));
        assert_eq!(s.skipped.get("missing_image"), Some(&2));
        // Progress counts every sample of the shards, usable or not.
        assert_eq!(calls.first(), Some(&(0, 6)));
        assert_eq!(calls.last(), Some(&(6, 6)));
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"samples":2,"skipped":{"missing_image":2,"undecodable_image":2},"shards":2}"#
        );

        write(&d.join("a.jpg"), &good);
        write(&d.join("list.csv"), b"filepath,title\na.jpg,ok\na.jpg,\nnone.jpg,x\n");
        let spec = DataSpec::parse(d.join("list.csv").to_str().unwrap()).unwrap();
        let s = stats(&spec, 1, None, &mut |_, _| {}).unwrap();
        assert_eq!((s.samples, s.shards, s.skipped.total()), (1, 0, 2));

        let s = stats(&DataSpec::Synthetic(3), 2, None, &mut |_, _| {}).unwrap();
        assert_eq!((s.samples, s.shards, s.skipped.total()), (3, 0, 0));
    }
}
