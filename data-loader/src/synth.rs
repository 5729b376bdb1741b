//! Procedurally drawn scenes: a dataset that needs no download, for the quickstart and tests.
//!
//! Each scene shows one or two coloured shapes on a light, slightly noisy background, with a
//! caption that names them ("a photo of a large red circle above a small blue square"). The
//! 24 colour x shape pairs are the zero-shot classes ("red circle", ...; chance is 1/24 =
//! 4.2%), and the caption prefixes match [`templates`], so zero-shot prompts transfer. A scene
//! depends only on (seed, index): the same data on every machine, in any order.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::DataError;
use crate::seed::mix;
use crate::webdataset::{remove_stale_shards, write_atomic, ShardWriter};

const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 35, 35]),
    ("green", [35, 165, 55]),
    ("blue", [35, 75, 220]),
    ("yellow", [240, 210, 20]),
    ("purple", [145, 50, 185]),
    ("orange", [250, 135, 20]),
];
const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];
/// Object radius as a fraction of the image side (the shape spans about twice this).
const SMALL_RADIUS: f32 = 0.13;
const LARGE_RADIUS: f32 = 0.21;
/// Caption prefixes; each has a matching zero-shot template.
const PREFIXES: [&str; 6] = [
    "a ",
    "a photo of a ",
    "a drawing of a ",
    "a picture of a ",
    "an image of a ",
    "a rendering of a ",
];
const RELATIONS: [&str; 4] = ["above", "below", "to the left of", "to the right of"];
/// JPEG quality of written shards.
const JPEG_QUALITY: u8 = 90;

/// The zero-shot class names, "red circle" ... "orange cross"; index = colour * 4 + shape.
pub fn classnames() -> Vec<String> {
    COLORS
        .iter()
        .flat_map(|(color, _)| SHAPES.iter().map(move |shape| format!("{color} {shape}")))
        .collect()
}

/// Zero-shot prompt templates, `{}` standing for a class name.
pub fn templates() -> Vec<String> {
    [
        "a {}.",
        "a photo of a {}.",
        "a drawing of a {}.",
        "a picture of a {}.",
        "a picture of a small {}.",
        "a picture of a large {}.",
        "an image of a {}.",
        "a rendering of a {}.",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect()
}

/// One drawn scene.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub image: RgbImage,
    pub caption: String,
    /// Class index (into [`classnames`]) of the first, or only, object.
    pub label: usize,
}

struct Object {
    color: usize,
    shape: usize,
    large: bool,
}

impl Object {
    fn random(rng: &mut impl Rng) -> Self {
        Self {
            color: rng.gen_range(0..COLORS.len()),
            shape: rng.gen_range(0..SHAPES.len()),
            large: rng.gen_bool(0.5),
        }
    }

    fn label(&self) -> usize {
        self.color * SHAPES.len() + self.shape
    }

    /// "large red circle", or "red circle" when `with_size` is false.
    fn describe(&self, with_size: bool) -> String {
        let size = if self.large { "large " } else { "small " };
        format!(
            "{}{} {}",
            if with_size { size } else { "" },
            COLORS[self.color].0,
            SHAPES[self.shape]
        )
    }
}

/// Draws scene `index` of the stream `seed` at `image_size` pixels square. Train scenes
/// (`single_object == false`) hold one object (half of them) or two in a spatial relation;
/// validation scenes hold exactly one.
pub fn draw_scene(seed: u64, index: u64, image_size: u32, single_object: bool) -> Scene {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, index]));
    let s = image_size.max(1) as f32;
    let mut image = background(&mut rng, image_size);

    let first = Object::random(&mut rng);
    let two = !single_object && rng.gen_bool(0.5);
    let prefix = PREFIXES[rng.gen_range(0..PREFIXES.len())];
    let period = if rng.gen_bool(0.5) { "." } else { "" };
    let caption = if two {
        let second = Object::random(&mut rng);
        let relation = rng.gen_range(0..RELATIONS.len());
        // Each object gets its half of the image along the relation's axis.
        let (first_half, second_half, vertical) = match relation {
            0 => (0, 1, true),
            1 => (1, 0, true),
            2 => (0, 1, false),
            _ => (1, 0, false),
        };
        for (obj, half) in [(&first, first_half), (&second, second_half)] {
            let r = radius(&mut rng, obj.large, s);
            let room = (0.5 * s - 2.0 * r).max(0.0);
            let along = half as f32 * 0.5 * s + r + rng.gen::<f32>() * room;
            let across = rng.gen_range(r..=(s - r).max(r));
            let (cx, cy) = if vertical {
                (across, along)
            } else {
                (along, across)
            };
            draw_object(&mut image, &mut rng, obj, cx, cy, r);
        }
        format!(
            "{prefix}{} {} a {}{period}",
            first.describe(rng.gen_bool(0.8)),
            RELATIONS[relation],
            second.describe(rng.gen_bool(0.8))
        )
    } else {
        let r = radius(&mut rng, first.large, s);
        let cx = rng.gen_range(r..=(s - r).max(r));
        let cy = rng.gen_range(r..=(s - r).max(r));
        draw_object(&mut image, &mut rng, &first, cx, cy, r);
        format!("{prefix}{}{period}", first.describe(rng.gen_bool(0.6)))
    };
    add_noise(&mut image, &mut rng);
    Scene {
        image,
        caption,
        label: first.label(),
    }
}

fn radius(rng: &mut impl Rng, large: bool, s: f32) -> f32 {
    let base = if large { LARGE_RADIUS } else { SMALL_RADIUS };
    base * s * rng.gen_range(0.9..1.1)
}

/// A light two-colour gradient in a random direction.
fn background(rng: &mut impl Rng, size: u32) -> RgbImage {
    let mut light = || -> [f32; 3] { std::array::from_fn(|_| rng.gen_range(200.0..250.0)) };
    let (a, b) = (light(), light());
    let angle: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let s = size.max(1) as f32;
    RgbImage::from_fn(size, size, |x, y| {
        let t = 0.5 + ((x as f32 / s - 0.5) * dx + (y as f32 / s - 0.5) * dy) * 0.7;
        Rgb(std::array::from_fn(|c| {
            (a[c] + (b[c] - a[c]) * t.clamp(0.0, 1.0)) as u8
        }))
    })
}

/// Whether (u, v), in units of the radius from the centre, is inside `shape`.
fn inside(shape: usize, u: f32, v: f32) -> bool {
    match shape {
        0 => u * u + v * v <= 1.0,
        1 => u.abs() <= 0.85 && v.abs() <= 0.85,
        // Pointing up: apex at v = -0.95, base at v = 0.75 with half-width 1.
        2 => (-0.95..=0.75).contains(&v) && u.abs() <= (v + 0.95) / 1.7,
        _ => (u.abs() <= 0.32 && v.abs() <= 1.0) || (v.abs() <= 0.32 && u.abs() <= 1.0),
    }
}

/// Paints `obj` centred at (cx, cy) with radius r, 2x2 supersampled at the edges.
fn draw_object(img: &mut RgbImage, rng: &mut impl Rng, obj: &Object, cx: f32, cy: f32, r: f32) {
    let base = COLORS[obj.color].1;
    let color: [f32; 3] = std::array::from_fn(|c| {
        (f32::from(base[c]) + rng.gen_range(-12.0..12.0)).clamp(0.0, 255.0)
    });
    let (w, h) = img.dimensions();
    let x0 = (cx - r - 1.0).floor().max(0.0) as u32;
    let y0 = (cy - r - 1.0).floor().max(0.0) as u32;
    let x1 = ((cx + r + 1.0).ceil() as u32).min(w);
    let y1 = ((cy + r + 1.0).ceil() as u32).min(h);
    for y in y0..y1 {
        for x in x0..x1 {
            let mut hits = 0u8;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let u = (x as f32 + ox - cx) / r;
                let v = (y as f32 + oy - cy) / r;
                hits += u8::from(inside(obj.shape, u, v));
            }
            if hits > 0 {
                let alpha = f32::from(hits) / 4.0;
                let px = img.get_pixel_mut(x, y);
                for (channel, target) in px.0.iter_mut().zip(color) {
                    *channel = (f32::from(*channel) * (1.0 - alpha) + target * alpha) as u8;
                }
            }
        }
    }
}

/// Light per-pixel noise, so that no two scenes are pixel-identical.
fn add_noise(img: &mut RgbImage, rng: &mut impl Rng) {
    for px in img.pixels_mut() {
        let n: i16 = rng.gen_range(-5..=5);
        for c in px.0.iter_mut() {
            *c = (i16::from(*c) + n).clamp(0, 255) as u8;
        }
    }
}

/// What [`write_synth`] writes.
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

/// `index.json` of a shard directory: each shard's name and sample count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub shards: Vec<ShardIndexEntry>,
    pub samples: u64,
    /// `oxclip data pack` for the indexes it writes: a folder whose index says so is pack's own
    /// earlier output, which a new pack may replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_by: Option<String>,
}

/// One shard in an [`ShardIndex`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndexEntry {
    pub name: String,
    pub samples: u64,
}

impl ShardIndex {
    /// Reads `dir/index.json`.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("index.json");
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| DataError::Json { path, source })
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
        return Err(DataError::Config(
            "synth: shard_size must be at least 1".into(),
        ));
    }
    if cfg.image_size < 8 {
        return Err(DataError::Config(format!(
            "synth: image_size {} is too small to draw shapes (need 8 or more)",
            cfg.image_size
        )));
    }
    refuse_overwriting_foreign_files(out, cfg)?;
    let mut done = 0u64;
    let train_shards = write_split(
        &out.join("train"),
        cfg,
        cfg.samples,
        cfg.seed,
        false,
        &mut done,
        progress,
    )?;
    let val_seed = mix(&[cfg.seed, VAL_STREAM]);
    let val_shards = write_split(
        &out.join("val"),
        cfg,
        cfg.val_samples,
        val_seed,
        true,
        &mut done,
        progress,
    )?;
    write_atomic(
        &out.join("classnames.txt"),
        (classnames().join("\n") + "\n").as_bytes(),
    )?;
    write_atomic(
        &out.join("templates.txt"),
        (templates().join("\n") + "\n").as_bytes(),
    )?;
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
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let shard_count = samples.div_ceil(cfg.shard_size);
    // Only what our own earlier index lists is ever removed.
    let previous: Vec<String> = ShardIndex::read(dir)
        .map(|index| index.shards.into_iter().map(|s| s.name).collect())
        .unwrap_or_default();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let mut index = ShardIndex {
        shards: Vec::new(),
        samples: 0,
        written_by: None,
    };
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
        index.shards.push(ShardIndexEntry {
            name,
            samples: written,
        });
        index.samples += written;
    }
    let json = serde_json::to_vec_pretty(&index).map_err(|source| DataError::Json {
        path: dir.join("index.json"),
        source,
    })?;
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
                scope.spawn(move || {
                    part.iter()
                        .map(|&i| encode(i))
                        .collect::<Result<Vec<_>, _>>()
                })
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
    use crate::transform::{decode_image, DEFAULT_MAX_PIXELS};
    use crate::webdataset::read_shard;

    #[test]
    fn classes_and_templates() {
        let names = classnames();
        assert_eq!(names.len(), 24);
        assert_eq!(names[0], "red circle");
        assert_eq!(names[23], "orange cross");
        assert!(templates().iter().all(|t| t.contains("{}")));
    }

    #[test]
    fn scenes_are_deterministic_and_captioned() {
        let a = draw_scene(1, 5, 64, false);
        let b = draw_scene(1, 5, 64, false);
        assert!(a == b);
        assert!(draw_scene(1, 6, 64, false).image != a.image);
        let names = classnames();
        for i in 0..50 {
            let scene = draw_scene(3, i, 64, true);
            assert_eq!(scene.image.dimensions(), (64, 64));
            // The single object's class name appears in the caption.
            assert!(
                scene.caption.contains(&names[scene.label]),
                "{} / {}",
                scene.caption,
                names[scene.label]
            );
            assert!(
                RELATIONS.iter().all(|r| !scene.caption.contains(r)),
                "{}",
                scene.caption
            );
        }
        let two = (0..50)
            .map(|i| draw_scene(3, i, 64, false))
            .filter(|s| {
                RELATIONS
                    .iter()
                    .any(|r| s.caption.contains(&format!(" {r} a ")))
            })
            .count();
        assert!(
            two > 10 && two < 40,
            "{two} of 50 train scenes have two objects"
        );
    }

    #[test]
    fn objects_are_visible_at_64_pixels() {
        // The object's colour covers a good number of pixels in every scene.
        for i in 0..40 {
            let scene = draw_scene(9, i, 64, true);
            let target = COLORS[scene.label / SHAPES.len()].1;
            let close = scene
                .image
                .pixels()
                .filter(|p| (0..3).all(|c| (i16::from(p.0[c]) - i16::from(target[c])).abs() < 40))
                .count();
            assert!(
                close >= 60,
                "scene {i} ({}): only {close} pixels of the object colour",
                scene.caption
            );
        }
    }

    #[test]
    fn write_synth_writes_readable_shards_matching_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            samples: 23,
            val_samples: 7,
            image_size: 32,
            shard_size: 10,
            seed: 4,
        };
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
        assert!(err.contains("train/00001.tar") && err.contains("classnames.txt") && err.contains("did not write"), "{err}");
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
