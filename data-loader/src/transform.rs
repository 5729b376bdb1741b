//! Image decode and the open_clip image transforms, written as CHW normalised floats.
//!
//! Both are built from a model's [`Preprocess`]. Train: torchvision
//! `RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3))` with bicubic interpolation
//! whatever the resize mode (open_clip `transform.py`, `image_transform(is_train=True)`
//! without extra augmentation). Eval, by `resize_mode`: `shortest` is `Resize(size)` of the
//! shorter side then `CenterCrop(size)`; `squash` is `Resize((size, size))`; `longest` is
//! `ResizeKeepRatio(size, longest=1)` then `CenterCropOrPad(size, fill=0)` (black borders).
//! Both then `ToTensor` and `Normalize(mean, std)`.
//!
//! Resizing uses fast_image_resize's convolutions: Catmull-Rom is the same cubic (a = -0.5)
//! with the same support scaling on downsampling as PIL's `BICUBIC`, its bilinear filter
//! PIL's `BILINEAR`, so results match PIL to rounding. The random crop is drawn from a ChaCha8 stream seeded by the caller, so a sample
//! gets the same crop on every machine, thread and run.

use std::cell::RefCell;

use fast_image_resize::images::{CroppedImage, Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::augment::Augment;

/// Per-channel mean of OpenAI's CLIP training images (RGB, in [0, 1]).
pub const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// Per-channel standard deviation of OpenAI's CLIP training images. (The digits are
/// open_clip's, kept as written though f32 holds fewer.)
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How images are prepared for a model, as open_clip's `PreprocessCfg` (the
/// `preprocess_cfg` of an `open_clip_config.json`): output size, normalisation, resize rule
/// and interpolation. Every command that feeds a model builds its transform from this.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Output side length in pixels.
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(default)]
    pub interpolation: Interpolation,
    #[serde(default)]
    pub resize_mode: ResizeMode,
    /// Training only (open_clip's `aug_cfg`, not part of its `PreprocessCfg`): the crop's
    /// ranges and the colour augmentations. Evaluation ignores it.
    #[serde(default, skip_serializing_if = "Augment::is_default")]
    pub augment: Augment,
}

// Configs holding a Preprocess compare with `==`; its floats are checked finite where they
// are read, so equality is reflexive in practice.
impl Eq for Preprocess {}

/// How an image is brought to the model's square size at evaluation (open_clip's
/// `resize_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Shorter side to the size, then a centre crop (OpenAI CLIP).
    #[default]
    Shortest,
    /// Both sides to the size, the aspect ratio not kept (SigLIP).
    Squash,
    /// Longer side to the size, then padded to a square.
    Longest,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    #[default]
    Bicubic,
    Bilinear,
}

impl Preprocess {
    /// OpenAI CLIP's: OpenAI mean/std, shortest-side resize, bicubic.
    pub fn openai(size: u32) -> Self {
        Preprocess {
            size,
            mean: OPENAI_MEAN,
            std: OPENAI_STD,
            interpolation: Interpolation::Bicubic,
            resize_mode: ResizeMode::Shortest,
            augment: Augment::default(),
        }
    }

    /// SigLIP's (and open_clip's SigLIP configs'): mean = std = 0.5, squash resize, bicubic.
    pub fn siglip(size: u32) -> Self {
        Preprocess {
            size,
            mean: [0.5; 3],
            std: [0.5; 3],
            interpolation: Interpolation::Bicubic,
            resize_mode: ResizeMode::Squash,
            augment: Augment::default(),
        }
    }
}

/// A crop rectangle in source pixels: `top` row, `left` column, `height`, `width`
/// (torchvision's `i, j, h, w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// torchvision `RandomResizedCrop.get_params`: 10 tries at a random area fraction in
/// `scale` and a log-uniform aspect ratio in `ratio`; then the centre-crop fallback clamped
/// to `ratio`. Python's `round` (half to even) and `torch.randint`'s exclusive upper bound
/// are kept; the random stream itself is ours (ChaCha8), not torch's.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> CropBox {
    let (w_img, h_img) = (f64::from(width), f64::from(height));
    let area = w_img * h_img;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale.0, scale.1);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= w_img && h > 0.0 && h <= h_img {
            let (w, h) = (w as u32, h as u32);
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return CropBox { top, left, height: h, width: w };
        }
    }
    let in_ratio = w_img / h_img;
    let (w, h) = if in_ratio < ratio.0.min(ratio.1) {
        (width, ((w_img / ratio.0.min(ratio.1)).round_ties_even() as u32).clamp(1, height))
    } else if in_ratio > ratio.0.max(ratio.1) {
        (((h_img * ratio.0.max(ratio.1)).round_ties_even() as u32).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Uniform in [lo, hi) (torch's `uniform_`); `lo` when the range is empty.
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Train { augment: Augment },
    Eval,
}

/// Decoded image -> `3 x S x S` normalised floats.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTransform {
    image_size: u32,
    mode: Mode,
    mean: [f32; 3],
    std: [f32; 3],
    /// Eval only: training resizes bicubic, as open_clip's `RandomResizedCrop` does.
    interpolation: Interpolation,
    resize_mode: ResizeMode,
}

impl ImageTransform {
    /// open_clip's train transform: `RandomResizedCrop(size, scale=(0.9, 1.0))`, bicubic.
    pub fn train(image_size: u32) -> Self {
        Self {
            image_size,
            mode: Mode::Train { augment: Augment::default() },
            mean: OPENAI_MEAN,
            std: OPENAI_STD,
            interpolation: Interpolation::Bicubic,
            resize_mode: ResizeMode::Shortest,
        }
    }

    /// open_clip's eval transform: shorter side to `size` (bicubic), then centre crop.
    pub fn eval(image_size: u32) -> Self {
        Self::eval_for(&Preprocess::openai(image_size))
    }

    /// The train transform for a model's preprocessing: its size, mean/std and `augment`
    /// (the crop and its bicubic resize are open_clip's whatever the resize mode).
    pub fn train_for(p: &Preprocess) -> Self {
        let mut t = Self::train(p.size).with_normalization(p.mean, p.std);
        t.mode = Mode::Train { augment: p.augment };
        t
    }

    /// The eval transform for a model's preprocessing: its resize mode, interpolation,
    /// size and mean/std.
    pub fn eval_for(p: &Preprocess) -> Self {
        Self {
            image_size: p.size,
            mode: Mode::Eval,
            mean: p.mean,
            std: p.std,
            interpolation: p.interpolation,
            resize_mode: p.resize_mode,
        }
    }

    /// The same transform with another normalisation (e.g. 0.5/0.5 for SigLIP weights).
    pub fn with_normalization(mut self, mean: [f32; 3], std: [f32; 3]) -> Self {
        self.mean = mean;
        self.std = std;
        self
    }

    /// Output side length S.
    pub fn image_size(&self) -> u32 {
        self.image_size
    }

    /// Floats per image: `3 * S * S`.
    pub fn output_len(&self) -> usize {
        3 * self.image_size as usize * self.image_size as usize
    }

    /// Writes the transformed image as CHW floats into `out[..3 * S * S]`. `seed` picks the
    /// random crop (train); eval ignores it. Panics only if `out` is shorter than
    /// [`output_len`](Self::output_len), which is the caller's bug, not the data's.
    pub fn apply(&self, img: &RgbImage, seed: u64, out: &mut [f32]) {
        let s = self.image_size;
        assert!(
            out.len() >= self.output_len(),
            "output buffer holds {} floats, the transform writes {}",
            out.len(),
            self.output_len()
        );
        if s == 0 || img.width() == 0 || img.height() == 0 {
            out[..self.output_len()].fill(0.0);
            return;
        }
        match self.mode {
            Mode::Train { augment } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let [scale, ratio] = [augment.scale, augment.ratio].map(|[lo, hi]| (lo, hi));
                let c =
                    random_resized_crop_params(img.width(), img.height(), scale, ratio, &mut rng);
                let mut resized = resize_rgb(img, c, s, s, Interpolation::Bicubic);
                augment.apply_colour(&mut resized, &mut rng);
                self.normalize_into(&resized, s, 0, 0, out);
            }
            Mode::Eval => self.apply_eval(img, out),
        }
    }

    fn apply_eval(&self, img: &RgbImage, out: &mut [f32]) {
        let s = self.image_size;
        let (w, h) = (img.width(), img.height());
        let whole = CropBox { top: 0, left: 0, height: h, width: w };
        match self.resize_mode {
            ResizeMode::Squash => {
                let resized = pil_resize(img, whole, s, s, self.interpolation);
                self.normalize_into(&resized, s, 0, 0, out);
            }
            ResizeMode::Longest => {
                // ResizeKeepRatio(longest=1): both sides divided by the larger ratio, Python's
                // round (half to even); then CenterCropOrPad pads with black, (S - n) // 2
                // before.
                let ratio = (f64::from(h) / f64::from(s)).max(f64::from(w) / f64::from(s));
                let side = |x: u32| ((f64::from(x) / ratio).round_ties_even() as u32).clamp(1, s);
                let (new_w, new_h) = (side(w), side(h));
                let resized = pil_resize(img, whole, new_w, new_h, self.interpolation);
                let mut canvas = vec![0u8; 3 * s as usize * s as usize];
                let (left, top) = (((s - new_w) / 2) as usize, ((s - new_h) / 2) as usize);
                let row = 3 * new_w as usize;
                for y in 0..new_h as usize {
                    let at = ((top + y) * s as usize + left) * 3;
                    canvas[at..at + row].copy_from_slice(&resized[y * row..(y + 1) * row]);
                }
                self.normalize_into(&canvas, s, 0, 0, out);
            }
            ResizeMode::Shortest => {
                // torchvision Resize(int): the shorter side becomes S, the longer
                // int(S * long / short) (truncated).
                let (w, h) = (img.width(), img.height());
                let (new_w, new_h) = if w <= h {
                    (s, ((u64::from(s) * u64::from(h)) / u64::from(w)) as u32)
                } else {
                    (((u64::from(s) * u64::from(w)) / u64::from(h)) as u32, s)
                };
                let resized = pil_resize(img, whole, new_w, new_h, self.interpolation);
                // CenterCrop: int(round((H - S) / 2)), half to even.
                let top = (f64::from(new_h - s) / 2.0).round_ties_even() as u32;
                let left = (f64::from(new_w - s) / 2.0).round_ties_even() as u32;
                self.normalize_into(&resized, new_w, left, top, out);
            }
        }
    }

    /// Copies the `S x S` window at (`left`, `top`) of an RGB buffer `row_width` wide into
    /// `out` as CHW, `(x / 255 - mean) / std`.
    fn normalize_into(&self, rgb: &[u8], row_width: u32, left: u32, top: u32, out: &mut [f32]) {
        let s = self.image_size as usize;
        let plane = s * s;
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| self.mean[c] / self.std[c]);
        let (row_width, left, top) = (row_width as usize, left as usize, top as usize);
        for y in 0..s {
            let row = &rgb[((top + y) * row_width + left) * 3..][..s * 3];
            for (x, px) in row.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + y * s + x] = f32::from(px[c]) * scale[c] - shift[c];
                }
            }
        }
    }
}

/// PIL's `Image.resize` of the `crop` region (PIL crops, then resizes the crop), bit for bit:
/// Pillow's `Resample.c` with its filters and 22-bit fixed-point coefficients, each pass
/// rounded and clipped to 8 bits, a pass skipped when its side keeps its size, and Pillow
/// 13's pass order (vertical first when the height shrinks by more than twice what the width
/// does). The evaluation transform uses it so that a model sees exactly the pixels open_clip
/// gives it; fast_image_resize, used for the training crops, always runs the vertical pass
/// first on 8-bit images, which moves a pixel by a few levels where the cubic overshoots.
fn pil_resize(
    img: &RgbImage,
    crop: CropBox,
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> Vec<u8> {
    let (src_w, src) = (img.width() as usize, img.as_raw());
    let (in_w, in_h, out_w, out_h) =
        (crop.width as usize, crop.height as usize, width as usize, height as usize);
    let mut pixels = Vec::with_capacity(in_w * in_h * 3);
    for y in 0..in_h {
        let at = ((crop.top as usize + y) * src_w + crop.left as usize) * 3;
        pixels.extend_from_slice(&src[at..at + in_w * 3]);
    }
    let (filter, support): (fn(f64) -> f64, f64) = match interpolation {
        Interpolation::Bicubic => (pil_bicubic, 2.0),
        Interpolation::Bilinear => (pil_bilinear, 1.0),
    };
    // Integer sums as Pillow's (INT32 accumulators: the weights sum to 2^22, so no sum of
    // 8-bit pixels overflows), laid out so that the compiler vectorises them: a pixel's three
    // channels together along a row, whole rows at a time down the columns.
    let horizontal = |pixels: &[u8], rows: usize| -> Vec<u8> {
        let coefficients = pil_coefficients(in_w, out_w, filter, support);
        let mut out = vec![0u8; out_w * rows * 3];
        for (row, out_row) in
            pixels.chunks_exact(in_w * 3).zip(out.chunks_exact_mut(out_w * 3)).take(rows)
        {
            for ((start, weights), px) in coefficients.iter().zip(out_row.chunks_exact_mut(3)) {
                let window = &row[start * 3..(start + weights.len()) * 3];
                let mut acc = [1i32 << (PIL_PRECISION_BITS - 1); 3];
                for (src, &w) in window.chunks_exact(3).zip(weights) {
                    acc[0] += i32::from(src[0]) * w;
                    acc[1] += i32::from(src[1]) * w;
                    acc[2] += i32::from(src[2]) * w;
                }
                for (p, a) in px.iter_mut().zip(acc) {
                    *p = pil_clip8(a);
                }
            }
        }
        out
    };
    let vertical = |pixels: &[u8], cols: usize| -> Vec<u8> {
        let coefficients = pil_coefficients(in_h, out_h, filter, support);
        let stride = cols * 3;
        let mut out = vec![0u8; stride * out_h];
        let mut acc = vec![0i32; stride];
        for ((start, weights), out_row) in coefficients.iter().zip(out.chunks_exact_mut(stride)) {
            acc.fill(1 << (PIL_PRECISION_BITS - 1));
            for (k, &w) in weights.iter().enumerate() {
                let src = &pixels[(start + k) * stride..][..stride];
                for (a, &p) in acc.iter_mut().zip(src) {
                    *a += i32::from(p) * w;
                }
            }
            for (p, &a) in out_row.iter_mut().zip(&acc) {
                *p = pil_clip8(a);
            }
        }
        out
    };
    let (need_h, need_v) = (in_w != out_w, in_h != out_h);
    let shrink_h = in_h as i64 - out_h as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > (in_w as i64 - out_w as i64) * 2);
    if horizontal_first {
        if need_h {
            pixels = horizontal(&pixels, in_h);
        }
        if need_v {
            pixels = vertical(&pixels, out_w);
        }
    } else {
        if need_v {
            pixels = vertical(&pixels, in_w);
        }
        if need_h {
            pixels = horizontal(&pixels, out_h);
        }
    }
    pixels
}

/// Pillow's `PRECISION_BITS` for 8-bit images.
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

fn pil_clip8(acc: i32) -> u8 {
    (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `bicubic_filter` (a = -0.5).
fn pil_bicubic(x: f64) -> f64 {
    let (a, x) = (-0.5, x.abs());
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn pil_bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`: for each output pixel, the first
/// input pixel and the fixed-point weights, the support widened by the downscaling factor.
fn pil_coefficients(
    in_size: usize,
    out_size: usize,
    filter: fn(f64) -> f64,
    support: f64,
) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = support * filter_scale;
    let inv = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax =
                ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize;
            let weights: Vec<f64> =
                (xmin..xmax).map(|x| filter((x as f64 - center + 0.5) * inv)).collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PIL_PRECISION_BITS);
                    if w < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

thread_local! {
    // A Resizer keeps scratch buffers between calls; one per worker thread.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Bicubic (Catmull-Rom) or bilinear resize of the `crop` region of an RGB image to
/// `width x height`; returns packed RGB. As PIL crops first and then resizes the crop, the filter never reads
/// outside the region: fast_image_resize's `CroppedImage` view gives that without a copy.
fn resize_rgb(
    img: &RgbImage,
    crop: CropBox,
    width: u32,
    height: u32,
    interpolation: Interpolation,
) -> Vec<u8> {
    let (filter, fallback_filter) = match interpolation {
        Interpolation::Bicubic => (FilterType::CatmullRom, image::imageops::FilterType::CatmullRom),
        Interpolation::Bilinear => (FilterType::Bilinear, image::imageops::FilterType::Triangle),
    };
    let whole = (crop.left, crop.top, crop.width, crop.height) == (0, 0, img.width(), img.height());
    if whole && img.width() == width && img.height() == height {
        return img.as_raw().clone();
    }
    // Unreachable for a well-formed RgbImage and an in-bounds crop, but a resize error must not
    // fail a sample: fall back to the image crate's (slower) Catmull-Rom.
    let fallback = || {
        let region =
            image::imageops::crop_imm(img, crop.left, crop.top, crop.width, crop.height).to_image();
        image::imageops::resize(&region, width, height, fallback_filter).into_raw()
    };
    let Ok(src) = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3) else {
        return fallback();
    };
    let Ok(view) = CroppedImage::new(&src, crop.left, crop.top, crop.width, crop.height) else {
        return fallback();
    };
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
    let resized = RESIZER.with(|r| r.borrow_mut().resize(&view, &mut dst, &options).is_ok());
    if resized {
        dst.into_vec()
    } else {
        fallback()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizing_a_crop_view_equals_resizing_a_cropped_copy() {
        // The copy is what PIL does (crop, then resize the crop); the view must match it bit
        // for bit, i.e. never read pixels outside the crop.
        let img = RgbImage::from_fn(97, 61, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (255 - x * 2) as u8])
        });
        for (left, top, width, height, out) in
            [(0, 0, 97, 61, 32), (10, 5, 40, 50, 24), (50, 20, 47, 41, 64), (3, 1, 90, 60, 90)]
        {
            let crop = CropBox { top, left, height, width };
            let copy = image::imageops::crop_imm(&img, left, top, width, height).to_image();
            let whole = CropBox { top: 0, left: 0, height, width };
            for i in [Interpolation::Bicubic, Interpolation::Bilinear] {
                assert_eq!(
                    resize_rgb(&img, crop, out, out, i),
                    resize_rgb(&copy, whole, out, out, i),
                    "{crop:?}"
                );
            }
        }
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8])
        })
    }

    #[test]
    fn uniform_image_gives_the_normalised_colour() {
        let img = RgbImage::from_pixel(40, 30, image::Rgb([255, 128, 0]));
        for t in [ImageTransform::train(16), ImageTransform::eval(16)] {
            let mut out = vec![f32::NAN; t.output_len()];
            t.apply(&img, 7, &mut out);
            assert_eq!(out.len(), 3 * 16 * 16);
            for (c, value) in [255.0f32, 128.0, 0.0].iter().enumerate() {
                let want = (value / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c];
                for &v in &out[c * 256..(c + 1) * 256] {
                    assert!((v - want).abs() < 1e-4, "channel {c}: {v} vs {want}");
                }
            }
        }
    }

    /// `data.augment`: the defaults are today's transform exactly; a wider scale gives other
    /// crops; grayscale keeps the crop (drawn first) and makes the channels equal.
    #[test]
    fn train_augment_defaults_change_nothing() {
        let img = gradient(97, 83);
        let bytes = |augment: Augment| {
            // mean 0, std 1/255: the output is the 8-bit crop itself.
            let p = Preprocess {
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
                augment,
                ..Preprocess::openai(32)
            };
            let t = ImageTransform::train_for(&p);
            (0..8u64)
                .map(|seed| {
                    let mut out = vec![0.0; t.output_len()];
                    t.apply(&img, seed, &mut out);
                    out
                })
                .collect::<Vec<_>>()
        };
        let plain = ImageTransform::train(32).with_normalization([0.0; 3], [1.0 / 255.0; 3]);
        let today: Vec<Vec<f32>> = (0..8u64)
            .map(|seed| {
                let mut out = vec![0.0; plain.output_len()];
                plain.apply(&img, seed, &mut out);
                out
            })
            .collect();
        assert!(bytes(Augment::default()) == today);
        assert!(
            bytes(Augment { scale: [0.08, 1.0], ratio: [0.5, 2.0], ..Augment::default() }) != today
        );
        let grey = bytes(Augment { gray_scale_prob: 1.0, ..Augment::default() });
        for (g, t) in grey.iter().zip(&today) {
            let plane = 32 * 32;
            assert!(g[..plane] == g[plane..2 * plane] && g[..plane] == g[2 * plane..]);
            for i in 0..plane {
                let [r, g8, b] = [t[i], t[plane + i], t[2 * plane + i]].map(|v| v.round() as u32);
                let luma = (r * 19595 + g8 * 38470 + b * 7471 + 32768) >> 16;
                assert!((g[i] - luma as f32).abs() < 1e-3, "{} vs {luma}", g[i]);
            }
        }
    }

    #[test]
    fn train_transform_is_deterministic_per_seed() {
        // Near-square: with scale >= 0.9, a 3:2 image could only take the centre fallback.
        let img = gradient(97, 83);
        let t = ImageTransform::train(32);
        let run = |seed| {
            let mut out = vec![0.0; t.output_len()];
            t.apply(&img, seed, &mut out);
            out
        };
        assert!(run(1) == run(1));
        assert!(run(1) != run(2));
        let e = ImageTransform::eval(32);
        let mut a = vec![0.0; e.output_len()];
        let mut b = vec![1.0; e.output_len()];
        e.apply(&img, 1, &mut a);
        e.apply(&img, 2, &mut b);
        assert!(a == b);
    }

    #[test]
    fn random_resized_crop_stays_in_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let sizes =
            [(1, 1), (1, 500), (500, 1), (3, 2), (224, 224), (640, 480), (100, 2000), (4000, 30)];
        for &(w, h) in &sizes {
            for _ in 0..200 {
                let c = random_resized_crop_params(w, h, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
                assert!(c.width >= 1 && c.height >= 1, "{w}x{h}: {c:?}");
                assert!(c.left + c.width <= w && c.top + c.height <= h, "{w}x{h}: {c:?}");
            }
        }
        // Extreme aspect ratios take the centre-crop fallback, clamped to the ratio range.
        let c = random_resized_crop_params(100, 2000, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!((c.width, c.height, c.left, c.top), (100, 133, 0, 933));
        // A square image keeps at least 90% of its area.
        let c = random_resized_crop_params(200, 200, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!(c.width * c.height >= 34_000, "{c:?}");
    }

    #[test]
    fn eval_centre_crops_the_shorter_side() {
        // 2:1, left half black, right half white. Eval keeps the centre square, whose left
        // half is black and right half white.
        let img = RgbImage::from_fn(64, 32, |x, _| {
            if x < 32 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let t = ImageTransform::eval(16);
        let mut out = vec![0.0; t.output_len()];
        t.apply(&img, 0, &mut out);
        let black = -OPENAI_MEAN[0] / OPENAI_STD[0];
        let white = (1.0 - OPENAI_MEAN[0]) / OPENAI_STD[0];
        assert!((out[8 * 16 + 2] - black).abs() < 1e-3);
        assert!((out[8 * 16 + 13] - white).abs() < 1e-3);
    }
}

#[cfg(test)]
mod preprocess_tests {
    use super::*;
    use crate::formats::image::{decode_image, DEFAULT_MAX_PIXELS};

    /// open_clip's `image_transform(is_train=False, ...)` outputs
    /// (tests/fixtures/make_transform_fixtures.py) for every resize mode and interpolation, on
    /// PNGs of odd sizes: the same 8-bit pixels as PIL's, so equal to float rounding.
    #[test]
    fn eval_transforms_match_open_clip() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/transforms");
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let expected: Vec<f32> = std::fs::read(dir.join("expected.bin"))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut offset = 0;
        let mut worst = 0f32;
        for case in cases.as_array().unwrap() {
            let p = Preprocess {
                size: case["size"].as_u64().unwrap() as u32,
                mean: serde_json::from_value(case["mean"].clone()).unwrap(),
                std: serde_json::from_value(case["std"].clone()).unwrap(),
                interpolation: serde_json::from_value(case["interpolation"].clone()).unwrap(),
                resize_mode: serde_json::from_value(case["resize_mode"].clone()).unwrap(),
                augment: Default::default(),
            };
            let bytes = std::fs::read(dir.join(case["image"].as_str().unwrap())).unwrap();
            let img = decode_image(&bytes, DEFAULT_MAX_PIXELS).unwrap();
            let t = ImageTransform::eval_for(&p);
            let mut out = vec![f32::NAN; t.output_len()];
            t.apply(&img, 0, &mut out);
            let want = &expected[offset..offset + out.len()];
            offset += out.len();
            let level = 1.0 / (255.0 * p.std.iter().cloned().fold(f32::INFINITY, f32::min));
            let diff = out.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let off_by_more = out.iter().zip(want).filter(|(a, b)| (*a - *b).abs() > 1e-5).count();
            worst = worst.max(diff / level);
            assert!(
                diff < 1e-5,
                "{case}: max abs diff {diff} (one level is {level}), {off_by_more} values differ"
            );
        }
        assert_eq!(offset, expected.len());
        eprintln!("worst difference: {worst} levels");
    }

    #[test]
    fn longest_pads_with_black_and_squash_fills_the_square() {
        let img = RgbImage::from_pixel(40, 20, image::Rgb([255, 255, 255]));
        let mut p = Preprocess::siglip(16);
        p.resize_mode = ResizeMode::Longest;
        let t = ImageTransform::eval_for(&p);
        let mut out = vec![0.0; t.output_len()];
        t.apply(&img, 0, &mut out);
        // 40 x 20 -> 16 x 8, rows 4..12 white, the rest black: (0 - 0.5) / 0.5 = -1.
        assert_eq!(out[0], -1.0);
        assert_eq!(out[8 * 16 + 8], 1.0);
        assert_eq!(out[15 * 16 + 8], -1.0);
        let t = ImageTransform::eval_for(&Preprocess::siglip(16));
        t.apply(&img, 0, &mut out);
        assert!(out.iter().all(|&v| v == 1.0));
        assert_eq!(ImageTransform::eval(16), ImageTransform::eval_for(&Preprocess::openai(16)));
    }
}
