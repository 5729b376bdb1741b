//! Procedurally drawn scenes: a dataset that needs no download, for the quickstart and tests.
//!
//! Each scene shows one or two coloured shapes on a light, slightly noisy background, with a
//! caption that names them ("a photo of a large red circle above a small blue square"). The
//! 24 colour x shape pairs are the zero-shot classes ("red circle", ...; chance is 1/24 =
//! 4.2%), and the caption prefixes match [`templates`], so zero-shot prompts transfer. A scene
//! depends only on (seed, index): the same data on every machine, in any order.
//! `synthetic:N` opens to a [`SyntheticDataset`]; `oxclip data synth` writes scenes as shards.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, Sample};
use crate::seed::mix;
use crate::skip::SkipReason;

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
            let (cx, cy) = if vertical { (across, along) } else { (along, across) };
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
    Scene { image, caption, label: first.label() }
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
        Rgb(std::array::from_fn(|c| (a[c] + (b[c] - a[c]) * t.clamp(0.0, 1.0)) as u8))
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
        Self { len, seed, image_size }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(RELATIONS.iter().all(|r| !scene.caption.contains(r)), "{}", scene.caption);
        }
        let two = (0..50)
            .map(|i| draw_scene(3, i, 64, false))
            .filter(|s| RELATIONS.iter().any(|r| s.caption.contains(&format!(" {r} a "))))
            .count();
        assert!(two > 10 && two < 40, "{two} of 50 train scenes have two objects");
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
}
