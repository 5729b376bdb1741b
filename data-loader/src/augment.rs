//! open_clip's training augmentations (its `AugmentationCfg` on the non-timm path of
//! `image_transform(is_train=True)`): the random resized crop's `scale` and `ratio`, then
//! `color_jitter` applied with probability `color_jitter_prob`, then `gray_scale_prob`.
//!
//! The colour operations work on the 8-bit RGB crop, as open_clip runs them on the PIL
//! image (`torchvision.transforms.functional` on a PIL image is Pillow): `ImageEnhance`'s
//! `Image.blend` with an f32 factor for brightness, contrast and saturation, Pillow's
//! integer HSV conversion for hue, and ITU-R 601-2 luma (`convert("L")`) for grayscale.
//! `ColorJitter` applies its four adjustments in a random order, each with a factor drawn
//! uniformly: brightness, contrast and saturation in `[max(0, 1 - v), 1 + v]`, hue in
//! `[-v, v]`; a value of 0 leaves that adjustment out.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// `data.augment`: what the training transform does beyond open_clip's defaults. Checked
/// ([`validate`](Self::validate)) as it is read, so every command that reads a config
/// refuses the same values with the same message.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, try_from = "Unchecked")]
pub struct Augment {
    /// Area of the random crop as a share of the image, `[min, max]` (open_clip's 0.9..1).
    pub scale: [f64; 2],
    /// Aspect ratio of the random crop, `[min, max]` (torchvision's 3/4..4/3).
    pub ratio: [f64; 2],
    /// Colour jitter strengths; none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color_jitter: Option<ColorJitter>,
    /// Probability of applying `color_jitter` to an image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color_jitter_prob: Option<f64>,
    /// Probability of turning an image grey (three equal channels).
    pub gray_scale_prob: f64,
}

/// [`Augment`] as written, before [`Augment::validate`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Unchecked {
    scale: [f64; 2],
    ratio: [f64; 2],
    color_jitter: Option<ColorJitter>,
    color_jitter_prob: Option<f64>,
    gray_scale_prob: f64,
}

impl Default for Unchecked {
    fn default() -> Self {
        let Augment { scale, ratio, color_jitter, color_jitter_prob, gray_scale_prob } =
            Augment::default();
        Self { scale, ratio, color_jitter, color_jitter_prob, gray_scale_prob }
    }
}

impl TryFrom<Unchecked> for Augment {
    type Error = String;

    fn try_from(u: Unchecked) -> Result<Self, String> {
        let augment = Augment {
            scale: u.scale,
            ratio: u.ratio,
            color_jitter: u.color_jitter,
            color_jitter_prob: u.color_jitter_prob,
            gray_scale_prob: u.gray_scale_prob,
        };
        augment.validate()?;
        Ok(augment)
    }
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            scale: [0.9, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            color_jitter: None,
            color_jitter_prob: None,
            gray_scale_prob: 0.0,
        }
    }
}

/// torchvision's `ColorJitter(brightness, contrast, saturation, hue)`. Written in a config as
/// one number (brightness, contrast and saturation alike, no hue, as timm reads it) or as
/// `[brightness, contrast, saturation, hue]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
}

impl Augment {
    /// Whether the crop is the default one and nothing else is done: today's transform.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Errors name the key under `data.augment`.
    pub fn validate(&self) -> Result<(), String> {
        let [lo, hi] = self.scale;
        if !(lo > 0.0 && hi <= 1.0 && lo <= hi) {
            return Err(format!(
                "data.augment.scale must be [min, max] with 0 < min <= max <= 1, got {:?}",
                self.scale
            ));
        }
        let [lo, hi] = self.ratio;
        if !(lo > 0.0 && hi.is_finite() && lo <= hi) {
            return Err(format!(
                "data.augment.ratio must be [min, max] with 0 < min <= max, got {:?}",
                self.ratio
            ));
        }
        let probability = |key: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(format!("data.augment.{key} must be a probability in [0, 1], got {p}"))
            }
        };
        probability("gray_scale_prob", self.gray_scale_prob)?;
        match (self.color_jitter, self.color_jitter_prob) {
            (Some(j), Some(p)) => {
                probability("color_jitter_prob", p)?;
                for (key, v) in [("brightness", j.brightness), ("contrast", j.contrast), ("saturation", j.saturation)] {
                    if !(v >= 0.0 && v.is_finite()) {
                        return Err(format!("data.augment.color_jitter: {key} must be a non-negative number, got {v}"));
                    }
                }
                if !(0.0..=0.5).contains(&j.hue) {
                    return Err(format!("data.augment.color_jitter: hue must be in [0, 0.5], got {}", j.hue));
                }
                Ok(())
            }
            // open_clip applies the jitter only through its probability, and asserts a
            // jitter where a probability is given: neither half alone does anything.
            (Some(_), None) => Err("data.augment.color_jitter needs data.augment.color_jitter_prob (the share of images jittered, open_clip's default 0.8)".into()),
            (None, Some(_)) => Err("data.augment.color_jitter_prob needs data.augment.color_jitter (the jitter strengths)".into()),
            (None, None) => Ok(()),
        }
    }

    /// The colour operations on an `S x S` RGB crop, drawn from `rng` after the crop: the
    /// jitter (one draw for whether, then its order and factors), then grayscale (one draw).
    /// Nothing is drawn for an operation that is off.
    pub fn apply_colour(&self, rgb: &mut [u8], rng: &mut impl Rng) {
        let (adjustments, grey) = self.draw_colour(rng);
        for adjust in adjustments {
            adjust.apply(rgb);
        }
        if grey {
            grayscale(rgb);
        }
    }

    /// What [`apply_colour`](Self::apply_colour) does to one image: the jitter's
    /// adjustments in order (none when it is not applied), and whether it turns grey.
    pub fn draw_colour(&self, rng: &mut impl Rng) -> (Vec<Adjust>, bool) {
        let mut adjustments = Vec::new();
        if let (Some(jitter), Some(p)) = (self.color_jitter, self.color_jitter_prob) {
            if p > 0.0 && rng.gen::<f64>() < p {
                adjustments = jitter.draw(rng);
            }
        }
        let grey = self.gray_scale_prob > 0.0 && rng.gen::<f64>() < self.gray_scale_prob;
        (adjustments, grey)
    }
}

/// One colour adjustment with its factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Adjust {
    Brightness(f64),
    Contrast(f64),
    Saturation(f64),
    Hue(f64),
}

impl Adjust {
    /// torchvision's `adjust_*` on a PIL image.
    pub fn apply(self, rgb: &mut [u8]) {
        match self {
            Self::Brightness(f) => adjust_brightness(rgb, f),
            Self::Contrast(f) => adjust_contrast(rgb, f),
            Self::Saturation(f) => adjust_saturation(rgb, f),
            Self::Hue(f) => adjust_hue(rgb, f),
        }
    }
}

impl ColorJitter {
    /// `ColorJitter.forward`: a random order of the four, each with a uniform factor; those
    /// set to 0 are skipped.
    pub fn apply(&self, rgb: &mut [u8], rng: &mut impl Rng) {
        for adjust in self.draw(rng) {
            adjust.apply(rgb);
        }
    }

    /// The adjustments `apply` makes, in order.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<Adjust> {
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        let around_one = |v: f64, rng: &mut dyn rand::RngCore| {
            (v > 0.0).then(|| uniform(rng, (1.0 - v).max(0.0), 1.0 + v))
        };
        let b = around_one(self.brightness, rng);
        let c = around_one(self.contrast, rng);
        let s = around_one(self.saturation, rng);
        let h = (self.hue > 0.0).then(|| uniform(rng, -self.hue, self.hue));
        order
            .iter()
            .filter_map(|i| match i {
                0 => b.map(Adjust::Brightness),
                1 => c.map(Adjust::Contrast),
                2 => s.map(Adjust::Saturation),
                _ => h.map(Adjust::Hue),
            })
            .collect()
    }
}

fn uniform(rng: &mut dyn rand::RngCore, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// Pillow's ITU-R 601-2 luma, `convert("L")`: (R 19595 + G 38470 + B 7471 + 2^15) >> 16.
fn luma(px: &[u8]) -> u8 {
    ((u32::from(px[0]) * 19595 + u32::from(px[1]) * 38470 + u32::from(px[2]) * 7471 + 0x8000) >> 16)
        as u8
}

/// Pillow's `Image.blend(degenerate, image, alpha)` for one byte: `alpha` is a C float, the
/// arithmetic f32, the result truncated (clipped first when extrapolating).
fn blend(degenerate: u8, value: u8, alpha: f32) -> u8 {
    let (a, b) = (i32::from(degenerate), i32::from(value));
    let mixed = a as f32 + alpha * (b - a) as f32;
    if (0.0..=1.0).contains(&alpha) {
        mixed as u8
    } else if mixed <= 0.0 {
        0
    } else if mixed >= 255.0 {
        255
    } else {
        mixed as u8
    }
}

/// `ImageEnhance.Brightness`: blended with black.
pub fn adjust_brightness(rgb: &mut [u8], factor: f64) {
    let alpha = factor as f32;
    for v in rgb.iter_mut() {
        *v = blend(0, *v, alpha);
    }
}

/// `ImageEnhance.Contrast`: blended with the mean luma, rounded to an integer.
pub fn adjust_contrast(rgb: &mut [u8], factor: f64) {
    let pixels = rgb.len() / 3;
    if pixels == 0 {
        return;
    }
    let sum: u64 = rgb.chunks_exact(3).map(|px| u64::from(luma(px))).sum();
    let mean = (sum as f64 / pixels as f64 + 0.5) as u8;
    let alpha = factor as f32;
    for v in rgb.iter_mut() {
        *v = blend(mean, *v, alpha);
    }
}

/// `ImageEnhance.Color`: each pixel blended with its own luma.
pub fn adjust_saturation(rgb: &mut [u8], factor: f64) {
    let alpha = factor as f32;
    for px in rgb.chunks_exact_mut(3) {
        let grey = luma(px);
        for v in px.iter_mut() {
            *v = blend(grey, *v, alpha);
        }
    }
}

/// torchvision's PIL `adjust_hue`: to Pillow's 8-bit HSV, `int32(factor * 255)` added to the
/// hue byte with wrap-around, back to RGB.
pub fn adjust_hue(rgb: &mut [u8], factor: f64) {
    let shift = (factor * 255.0) as i32 as u8;
    for px in rgb.chunks_exact_mut(3) {
        let [h, s, v] = rgb_to_hsv(px[0], px[1], px[2]);
        let [r, g, b] = hsv_to_rgb(h.wrapping_add(shift), s, v);
        px.copy_from_slice(&[r, g, b]);
    }
}

/// torchvision's `Grayscale(num_output_channels=3)`: the luma in all three channels.
pub fn grayscale(rgb: &mut [u8]) {
    for px in rgb.chunks_exact_mut(3) {
        let grey = luma(px);
        px.fill(grey);
    }
}

/// Pillow's `rgb2hsv` (colorsys in floats, each stored as f32, bytes by truncation).
fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let (maxc, minc) = (r.max(g).max(b), r.min(g).min(b));
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = f32::from(maxc - minc);
    let s = cr / f32::from(maxc);
    let rc = f32::from(maxc - r) / cr;
    let gc = f32::from(maxc - g) / cr;
    let bc = f32::from(maxc - b) / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + f64::from(rc) - f64::from(bc)) as f32
    } else {
        (4.0 + f64::from(gc) - f64::from(rc)) as f32
    };
    let h = ((f64::from(h) / 6.0 + 1.0) % 1.0) as f32;
    let byte = |x: f32| ((f64::from(x) * 255.0) as i32).clamp(0, 255) as u8;
    [byte(h), byte(s), maxc]
}

/// Pillow's `hsv2rgb`.
fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let sector = (f64::from(h) * 6.0 / 255.0).floor() as i32;
    let f = (f64::from(h) * 6.0 / 255.0 - f64::from(sector)) as f32;
    let fs = (f64::from(s) / 255.0) as f32;
    let v64 = f64::from(v);
    let byte = |x: f64| (x.round() as i32).clamp(0, 255) as u8;
    let p = byte(v64 * (1.0 - f64::from(fs)));
    // `fs * f` is a product of two C floats: f32.
    let q = byte(v64 * (1.0 - f64::from(fs * f)));
    let t = byte(v64 * (1.0 - f64::from(fs) * (1.0 - f64::from(f))));
    match sector % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

impl Serialize for ColorJitter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(4))?;
        for v in [self.brightness, self.contrast, self.saturation, self.hue] {
            seq.serialize_element(&v)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for ColorJitter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct JitterVisitor;
        impl<'de> Visitor<'de> for JitterVisitor {
            type Value = ColorJitter;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number (brightness, contrast and saturation) or [brightness, contrast, saturation, hue]")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ColorJitter, E> {
                Ok(ColorJitter { brightness: v, contrast: v, saturation: v, hue: 0.0 })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ColorJitter, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ColorJitter, E> {
                self.visit_f64(v as f64)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ColorJitter, A::Error> {
                let mut v = Vec::with_capacity(4);
                while let Some(x) = seq.next_element::<f64>()? {
                    v.push(x);
                }
                match v[..] {
                    [brightness, contrast, saturation, hue] => {
                        Ok(ColorJitter { brightness, contrast, saturation, hue })
                    }
                    _ => Err(de::Error::invalid_length(v.len(), &self)),
                }
            }
        }
        deserializer.deserialize_any(JitterVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use serde_json::Value;

    use super::*;

    /// Each operation with fixed factors on a real photo, against torchvision's PIL functions
    /// (tests/fixtures/make_augment_fixtures.py): every byte equal.
    #[test]
    fn colour_operations_match_torchvision_on_pil() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/augment");
        let cases: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let expected = std::fs::read(dir.join("expected.bin")).unwrap();
        let photo = image::open(dir.join("photo.png")).unwrap().to_rgb8();
        let (w, h) =
            (cases["width"].as_u64().unwrap() as u32, cases["height"].as_u64().unwrap() as u32);
        assert_eq!(photo.dimensions(), (w, h));
        let n = (3 * w * h) as usize;
        let cases = cases["cases"].as_array().unwrap();
        assert_eq!(expected.len(), n * cases.len());
        let mut failures = Vec::new();
        for (case, want) in cases.iter().zip(expected.chunks(n)) {
            let mut rgb = photo.as_raw().clone();
            for op in case["ops"].as_array().unwrap() {
                let f = op[1].as_f64().unwrap();
                match op[0].as_str().unwrap() {
                    "brightness" => Adjust::Brightness(f).apply(&mut rgb),
                    "contrast" => Adjust::Contrast(f).apply(&mut rgb),
                    "saturation" => Adjust::Saturation(f).apply(&mut rgb),
                    "hue" => Adjust::Hue(f).apply(&mut rgb),
                    "grayscale" => grayscale(&mut rgb),
                    other => panic!("unknown op {other}"),
                }
            }
            let differ = rgb.iter().zip(want).filter(|(a, b)| a != b).count();
            let max = rgb.iter().zip(want).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
            if differ > 0 {
                failures.push(format!(
                    "{}: {differ} of {n} bytes differ, by at most {max}",
                    case["ops"]
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn probabilities_and_ranges_are_honoured() {
        let augment = Augment {
            color_jitter: Some(ColorJitter {
                brightness: 0.4,
                contrast: 0.3,
                saturation: 1.5,
                hue: 0.1,
            }),
            color_jitter_prob: Some(0.8),
            gray_scale_prob: 0.2,
            ..Augment::default()
        };
        augment.validate().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let draws = 20_000;
        let (mut jittered, mut grey) = (0, 0);
        let mut orders = std::collections::HashSet::new();
        let (mut lowest, mut highest) = ([f64::MAX; 4], [f64::MIN; 4]);
        for _ in 0..draws {
            let (adjustments, g) = augment.draw_colour(&mut rng);
            grey += usize::from(g);
            if adjustments.is_empty() {
                continue;
            }
            jittered += 1;
            assert_eq!(adjustments.len(), 4);
            let mut order = Vec::new();
            for a in adjustments {
                let (i, f) = match a {
                    Adjust::Brightness(f) => (0, f),
                    Adjust::Contrast(f) => (1, f),
                    Adjust::Saturation(f) => (2, f),
                    Adjust::Hue(f) => (3, f),
                };
                order.push(i);
                lowest[i] = lowest[i].min(f);
                highest[i] = highest[i].max(f);
            }
            orders.insert(order);
        }
        let share = |k: usize| k as f64 / draws as f64;
        assert!((share(jittered) - 0.8).abs() < 0.015, "jittered {}", share(jittered));
        assert!((share(grey) - 0.2).abs() < 0.015, "grey {}", share(grey));
        assert_eq!(orders.len(), 24, "every order of the four occurs");
        // [1 - v, 1 + v] (saturation's floor at 0), hue [-v, v]; the draws fill the range.
        for (i, (lo, hi)) in
            [(0.6, 1.4), (0.7, 1.3), (0.0, 2.5), (-0.1, 0.1)].into_iter().enumerate()
        {
            assert!(lowest[i] >= lo && highest[i] < hi, "{i}: [{}, {}]", lowest[i], highest[i]);
            assert!(
                lowest[i] < lo + 0.01 && highest[i] > hi - 0.01,
                "{i}: [{}, {}]",
                lowest[i],
                highest[i]
            );
        }
        // An adjustment set to 0 is left out.
        let no_hue = ColorJitter { hue: 0.0, ..augment.color_jitter.unwrap() };
        assert!(no_hue.draw(&mut rng).iter().all(|a| !matches!(a, Adjust::Hue(_))));
        assert_eq!(no_hue.draw(&mut rng).len(), 3);
        // Off by default: nothing drawn, nothing changed.
        let mut a = ChaCha8Rng::seed_from_u64(1);
        let b = a.clone();
        assert_eq!(Augment::default().draw_colour(&mut a), (Vec::new(), false));
        assert_eq!(a, b);
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |augment: Augment| augment.validate().unwrap_err();
        assert!(
            bad(Augment { scale: [0.0, 1.0], ..Augment::default() }).contains("data.augment.scale")
        );
        assert!(
            bad(Augment { scale: [0.5, 1.2], ..Augment::default() }).contains("data.augment.scale")
        );
        assert!(
            bad(Augment { scale: [0.9, 0.5], ..Augment::default() }).contains("data.augment.scale")
        );
        assert!(bad(Augment { ratio: [-1.0, 1.0], ..Augment::default() })
            .contains("data.augment.ratio"));
        assert!(bad(Augment { gray_scale_prob: 1.5, ..Augment::default() })
            .contains("data.augment.gray_scale_prob"));
        let jitter = ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1 };
        assert!(bad(Augment { color_jitter: Some(jitter), ..Augment::default() })
            .contains("data.augment.color_jitter_prob"));
        assert!(bad(Augment { color_jitter_prob: Some(0.8), ..Augment::default() })
            .contains("data.augment.color_jitter"));
        assert!(bad(Augment {
            color_jitter: Some(jitter),
            color_jitter_prob: Some(-0.1),
            ..Augment::default()
        })
        .contains("data.augment.color_jitter_prob"));
        let big_hue = Some(ColorJitter { hue: 0.7, ..jitter });
        assert!(bad(Augment {
            color_jitter: big_hue,
            color_jitter_prob: Some(0.8),
            ..Augment::default()
        })
        .contains("hue"));
        assert!(Augment {
            scale: [0.08, 1.0],
            ratio: [0.5, 2.0],
            color_jitter: Some(jitter),
            color_jitter_prob: Some(0.8),
            gray_scale_prob: 0.2
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn a_config_reads_a_number_or_four() {
        let one: Augment =
            serde_json::from_str(r#"{"color_jitter": 0.4, "color_jitter_prob": 0.8}"#).unwrap();
        assert_eq!(
            one.color_jitter,
            Some(ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.0 })
        );
        let four: Augment = serde_json::from_str(
            r#"{"color_jitter": [0.1, 0.2, 0.3, 0.05], "color_jitter_prob": 1, "scale": [0.5, 1]}"#,
        )
        .unwrap();
        assert_eq!(
            four.color_jitter,
            Some(ColorJitter { brightness: 0.1, contrast: 0.2, saturation: 0.3, hue: 0.05 })
        );
        assert_eq!(four.scale, [0.5, 1.0]);
        let three = serde_json::from_str::<Augment>(r#"{"color_jitter": [0.1, 0.2, 0.3]}"#)
            .unwrap_err()
            .to_string();
        assert!(three.contains("[brightness, contrast, saturation, hue]"), "{three}");
        assert!(serde_json::from_str::<Augment>(r#"{"colour_jitter": 0.4}"#)
            .unwrap_err()
            .to_string()
            .contains("colour_jitter"));
        // Values are checked as they are read.
        let bad =
            serde_json::from_str::<Augment>(r#"{"scale": [0.5, 2]}"#).unwrap_err().to_string();
        assert!(bad.contains("data.augment.scale"), "{bad}");
        // Written back as four numbers, and not at all when default.
        assert_eq!(
            serde_json::to_value(four).unwrap()["color_jitter"],
            serde_json::json!([0.1, 0.2, 0.3, 0.05])
        );
        assert!(Augment::default().is_default());
    }
}
