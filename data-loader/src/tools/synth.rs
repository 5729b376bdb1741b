//! `oxclip data synth`: the procedurally drawn scenes (`sources/synthetic.rs`) written as
//! WebDataset shards with an index, for the quickstart and tests.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::formats::index::{ShardIndex, ShardIndexEntry};
use crate::formats::webdataset::{remove_stale_shards, write_atomic, ShardWriter};
use crate::seed::mix;
pub use crate::sources::synthetic::{classnames, draw_scene, templates, Scene};

const JPEG_QUALITY: u8 = 90;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// Training samples (1 or 2 objects each).
    pub samples: u64,
    /// Validation samples (one object each, with a `.cls` label).
    pub val_samples: u64,
    /// Side of the square images, in pixels.
    pub image_size: u32,
    /// Samples per shard.
    pub shard_size: u64,
    /// Seed of the scene stream; validation uses a stream derived from it.
    pub seed: u64,
}

/// What [`write_synth`] wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthSummary {
    pub out: PathBuf,
    pub train_samples: u64,
    pub train_shards: u64,
    pub val_samples: u64,
    pub val_shards: u64,
}

impl std::fmt::Display for SynthSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} train samples in {} shards and {} val samples in {} shards",
            self.train_samples, self.train_shards, self.val_samples, self.val_shards
        )
    }
}

/// Seed offset of the validation stream, so that validation scenes are not training scenes.
const VAL_STREAM: u64 = 0x7661_6c69_6461_7465; // "validate"

/// Writes the synthetic dataset as WebDataset shards:
/// `out/train/00000.tar ...` (`KEY.jpg`, `KEY.txt`), `out/val/00000.tar ...` (plus `KEY.cls`),
/// `out/{train,val}/index.json`, `out/classnames.txt` and `out/templates.txt`. Each shard is
/// written to a `.tmp` file and renamed; shards that the index of an earlier, larger run
/// lists are removed.
/// `progress` is called after each sample with the number written so far (train, then val).
pub fn write_synth(
    out: &Path,
    cfg: &SynthConfig,
    progress: &mut dyn FnMut(u64),
) -> Result<SynthSummary, DataError> {
    if cfg.shard_size == 0 {
        return Err(DataError::Config("synth: shard_size must be at least 1".into()));
    }
    if cfg.image_size < 8 {
        return Err(DataError::Config(format!(
            "synth: image_size {} is too small to draw shapes (need 8 or more)",
            cfg.image_size
        )));
    }
    refuse_overwriting_foreign_files(out, cfg)?;
    let mut done = 0u64;
    let train_shards =
        write_split(&out.join("train"), cfg, cfg.samples, cfg.seed, false, &mut done, progress)?;
    let val_seed = mix(&[cfg.seed, VAL_STREAM]);
    let val_shards =
        write_split(&out.join("val"), cfg, cfg.val_samples, val_seed, true, &mut done, progress)?;
    write_atomic(&out.join("classnames.txt"), (classnames().join("\n") + "\n").as_bytes())?;
    write_atomic(&out.join("templates.txt"), (templates().join("\n") + "\n").as_bytes())?;
    Ok(SynthSummary {
        out: out.to_owned(),
        train_samples: cfg.samples,
        train_shards,
        val_samples: cfg.val_samples,
        val_shards,
    })
}

/// Synth overwrites only what an earlier synth wrote: in a split folder, the shards its
/// `index.json` lists (an index pack wrote is pack's, not ours) and that index; at the top,
/// `classnames.txt` and `templates.txt` once `train/index.json` is ours. Any other file at a
/// path it would write is refused, named, before anything is written.
fn refuse_overwriting_foreign_files(out: &Path, cfg: &SynthConfig) -> Result<(), DataError> {
    let ours = |dir: &Path| ShardIndex::read(dir).ok().filter(|index| index.written_by.is_none());
    let mut foreign: Vec<String> = Vec::new();
    for (split, samples) in [("train", cfg.samples), ("val", cfg.val_samples)] {
        let dir = out.join(split);
        let listed: Vec<String> = match ours(&dir) {
            Some(index) => index.shards.into_iter().map(|s| s.name).collect(),
            None if dir.join("index.json").exists() => {
                foreign.push(format!("{split}/index.json"));
                Vec::new()
            }
            None => Vec::new(),
        };
        for shard in 0..samples.div_ceil(cfg.shard_size) {
            let name = format!("{shard:05}.tar");
            if dir.join(&name).exists() && !listed.contains(&name) {
                foreign.push(format!("{split}/{name}"));
            }
        }
    }
    if ours(&out.join("train")).is_none() {
        for name in ["classnames.txt", "templates.txt"] {
            if out.join(name).exists() {
                foreign.push(name.to_owned());
            }
        }
    }
    if foreign.is_empty() {
        return Ok(());
    }
    Err(DataError::Config(format!(
        "synth: {} holds {} file(s) that `data synth` did not write and would overwrite: {}; write to a new or empty folder",
        out.display(),
        foreign.len(),
        crate::error::first_few(&foreign, 5)
    )))
}

fn write_split(
    dir: &Path,
    cfg: &SynthConfig,
    samples: u64,
    seed: u64,
    val: bool,
    done: &mut u64,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, DataError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| DataError::Write { path: dir.to_owned(), source })?;
    let shard_count = samples.div_ceil(cfg.shard_size);
    // Only what our own earlier index lists is ever removed.
    let previous: Vec<String> = ShardIndex::read(dir)
        .map(|index| index.shards.into_iter().map(|s| s.name).collect())
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let mut index = ShardIndex { shards: Vec::new(), samples: 0, written_by: None };
    for shard in 0..shard_count {
        let start = shard * cfg.shard_size;
        let end = (start + cfg.shard_size).min(samples);
        let name = format!("{shard:05}.tar");
        let encoded = encode_range(seed, start..end, cfg.image_size, val, threads)?;
        let mut writer = ShardWriter::create(&dir.join(&name))?;
        for (i, (jpeg, caption, label)) in encoded.iter().enumerate() {
            let key = format!("{:09}", start + i as u64);
            let label_text = label.to_string();
            let mut members: Vec<(&str, &[u8])> = vec![("jpg", jpeg), ("txt", caption.as_bytes())];
            if val {
                members.push(("cls", label_text.as_bytes()));
            }
            writer.write_sample(&key, &members)?;
            *done += 1;
            progress(*done);
        }
        let written = writer.finish()?;
        index.shards.push(ShardIndexEntry { name, samples: written });
        index.samples += written;
    }
    let json = serde_json::to_vec_pretty(&index)
        .map_err(|source| DataError::Json { path: dir.join("index.json"), source })?;
    write_atomic(&dir.join("index.json"), &json)?;
    let kept: Vec<String> = index.shards.iter().map(|s| s.name.clone()).collect();
    remove_stale_shards(dir, &previous, &kept)?;
    Ok(shard_count)
}

/// Draws and JPEG-encodes scenes `range` on up to `threads` threads; in index order.
fn encode_range(
    seed: u64,
    range: std::ops::Range<u64>,
    image_size: u32,
    single_object: bool,
    threads: usize,
) -> Result<Vec<(Vec<u8>, String, usize)>, DataError> {
    let encode = |index: u64| -> Result<(Vec<u8>, String, usize), DataError> {
        let scene = draw_scene(seed, index, image_size, single_object);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
            .encode_image(&scene.image)
            .map_err(|e| DataError::Encode {
                key: format!("{index:09}"),
                message: e.to_string(),
            })?;
        Ok((jpeg, scene.caption, scene.label))
    };
    let indices: Vec<u64> = range.collect();
    let chunk = indices.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || part.iter().map(|&i| encode(i)).collect::<Result<Vec<_>, _>>())
            })
            .collect();
        let mut out = Vec::with_capacity(indices.len());
        for handle in handles {
            let part = handle
                .join()
                .map_err(|_| DataError::Pipeline("synth: an encoding thread panicked".into()))??;
            out.extend(part);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::{decode_image, DEFAULT_MAX_PIXELS};
    use crate::formats::webdataset::read_shard;

    #[test]
    fn write_synth_writes_readable_shards_matching_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            SynthConfig { samples: 23, val_samples: 7, image_size: 32, shard_size: 10, seed: 4 };
        // A stale shard that an earlier, larger run listed in its index disappears; a shard
        // no index of ours lists is not ours to remove.
        std::fs::create_dir_all(dir.path().join("train")).unwrap();
        std::fs::write(dir.path().join("train/00007.tar"), b"old").unwrap();
        std::fs::write(dir.path().join("train/00008.tar"), b"foreign").unwrap();
        std::fs::write(
            dir.path().join("train/index.json"),
            r#"{"shards": [{"name": "00007.tar", "samples": 1}], "samples": 1}"#,
        )
        .unwrap();
        let mut calls = Vec::new();
        let summary = write_synth(dir.path(), &cfg, &mut |n| calls.push(n)).unwrap();
        assert_eq!((summary.train_shards, summary.val_shards), (3, 1));
        assert_eq!(
            summary.to_string(),
            "23 train samples in 3 shards and 7 val samples in 1 shards"
        );
        assert_eq!(calls, (1..=30).collect::<Vec<_>>());
        assert!(!dir.path().join("train/00007.tar").exists());
        assert_eq!(std::fs::read(dir.path().join("train/00008.tar")).unwrap(), b"foreign");

        // A shard, an index or a class list that no synth of ours wrote is never overwritten.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("train")).unwrap();
        std::fs::write(other.path().join("train/00001.tar"), b"theirs").unwrap();
        std::fs::write(other.path().join("classnames.txt"), b"theirs").unwrap();
        let err = write_synth(other.path(), &cfg, &mut |_| {}).unwrap_err().to_string();
        assert!(
            err.contains("train/00001.tar")
                && err.contains("classnames.txt")
                && err.contains("did not write"),
            "{err}"
        );
        assert_eq!(std::fs::read(other.path().join("train/00001.tar")).unwrap(), b"theirs");
        assert_eq!(std::fs::read(other.path().join("classnames.txt")).unwrap(), b"theirs");
        assert!(!other.path().join("train/00000.tar").exists(), "wrote before refusing");
        // Writing again over its own output is fine.
        write_synth(dir.path(), &cfg, &mut |_| {}).unwrap();
        for (split, total, labelled) in [("train", 23, false), ("val", 7, true)] {
            let index = ShardIndex::read(&dir.path().join(split)).unwrap();
            assert_eq!(index.samples, total);
            let mut seen = 0;
            for entry in &index.shards {
                let samples: Vec<_> = read_shard(&dir.path().join(split).join(&entry.name))
                    .map(|s| s.unwrap())
                    .collect();
                assert_eq!(samples.len() as u64, entry.samples);
                for s in &samples {
                    assert_eq!(s.key, format!("{seen:09}"));
                    let img = decode_image(&s.image, DEFAULT_MAX_PIXELS).unwrap();
                    assert_eq!(img.dimensions(), (32, 32));
                    assert!(!s.caption.as_deref().unwrap().is_empty());
                    assert_eq!(s.label.is_some(), labelled);
                    seen += 1;
                }
            }
            assert_eq!(seen, total);
        }
        let classes = std::fs::read_to_string(dir.path().join("classnames.txt")).unwrap();
        assert_eq!(classes.lines().count(), 24);
        assert!(std::fs::read_to_string(dir.path().join("templates.txt"))
            .unwrap()
            .contains("a photo of a {}."));
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
