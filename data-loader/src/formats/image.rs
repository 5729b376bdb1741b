//! Image files: which extensions are images, and decoding one to RGB as PIL would.

use std::io::Cursor;
use std::path::Path;

use image::{ImageDecoder, RgbImage};

use crate::skip::SkipReason;

/// Extensions read as the image, in order of preference when a sample has several.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Whether `path` has an image extension (`jpg`, `jpeg`, `png`, `webp`, any case).
pub fn is_image_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| {
        let e = e.to_string_lossy().to_lowercase();
        IMAGE_EXTENSIONS.contains(&e.as_str())
    })
}

/// PIL's default decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`).
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Decodes JPEG, PNG or WebP bytes to 8-bit RGB (alpha dropped, grey expanded, 16-bit
/// reduced), as PIL's `convert("RGB")` does. The pixel count is checked from the header
/// before any pixel is decoded. Bytes that are recognisably another image format (GIF,
/// BMP, TIFF, ...) are `UnsupportedImage`, not `UndecodableImage`: the file is fine, the
/// format is what the user has to change.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, SkipReason> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| SkipReason::UndecodableImage)?;
    match reader.format() {
        Some(image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP) => {}
        Some(_) => return Err(SkipReason::UnsupportedImage),
        None => return Err(SkipReason::UndecodableImage),
    }
    let mut limits = image::Limits::default();
    // Room for the largest allowed image at 16 bits x 4 channels, so that the pixel limit,
    // not the allocator guard, is what decides.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(512 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|_| SkipReason::UndecodableImage)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(SkipReason::UndecodableImage);
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(SkipReason::TooManyPixels);
    }
    let image =
        image::DynamicImage::from_decoder(decoder).map_err(|_| SkipReason::UndecodableImage)?;
    Ok(image.into_rgb8())
}

#[cfg(test)]
pub(crate) mod test_images {
    //! Real image bytes for the tests of every layer.
    use image::{Rgb, RgbImage};
    use std::path::Path;

    pub fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, 90]))
    }

    pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
            .encode_image(&gradient(w, h))
            .unwrap();
        buf
    }

    pub fn png(w: u32, h: u32) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(Vec::new());
        gradient(w, h).write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    }

    pub fn write(path: &Path, bytes: &[u8]) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid 1 x 1 GIF89a, one white pixel.
    const GIF_1X1: &[u8] = b"GIF89a\x01\0\x01\0\x80\0\0\xff\xff\xff\0\0\0!\xf9\x04\x01\0\0\0\0,\0\0\0\0\x01\0\x01\0\0\x02\x02D\x01\0;";

    #[test]
    fn decode_checks_pixels_before_decoding() {
        let bytes = test_images::jpeg(50, 40);
        let decoded = decode_image(&bytes, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(decoded.dimensions(), (50, 40));
        assert_eq!(decode_image(&bytes, 1999), Err(SkipReason::TooManyPixels));
        assert_eq!(
            decode_image(b"not an image", DEFAULT_MAX_PIXELS),
            Err(SkipReason::UndecodableImage)
        );
        assert_eq!(
            decode_image(&bytes[..bytes.len() / 3], DEFAULT_MAX_PIXELS),
            Err(SkipReason::UndecodableImage)
        );
        // A real GIF (the classic 1 x 1 pixel) and BMP are whole images in formats we do not
        // read.
        assert_eq!(decode_image(GIF_1X1, DEFAULT_MAX_PIXELS), Err(SkipReason::UnsupportedImage));
        let bmp = b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0\x01\0\0\0\x01\0\0\0\x01\0\x18\0";
        assert_eq!(decode_image(bmp, DEFAULT_MAX_PIXELS), Err(SkipReason::UnsupportedImage));
        // PNG with alpha and grey both come back as RGB.
        let rgba = image::RgbaImage::from_pixel(5, 4, image::Rgba([10, 20, 30, 40]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgba8(rgba)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(decode_image(&png, 100).unwrap().get_pixel(1, 1), &image::Rgb([10, 20, 30]));
    }
}
