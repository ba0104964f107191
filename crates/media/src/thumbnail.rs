//! Thumbnails of JPEG, PNG, GIF and WebP images with the `image` crate.
//! Hostile images are refused before decoding: the header's dimensions
//! must be within [`Bounds`], and the decoder's own allocation limit holds
//! for whatever the header did not tell. CPU-bound: call it from a
//! blocking thread.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{ImageFormat, ImageReader, Limits};

/// How the image is fitted into the requested size (the spec's `method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Fit within width × height, keeping the aspect ratio.
    Scale,
    /// Fill width × height exactly, cutting what overhangs (centred).
    Crop,
}

/// What an image may be to be thumbnailed at all.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Largest width or height of the source image.
    pub max_side: u32,
    /// Largest width × height of the source image.
    pub max_pixels: u64,
    /// Largest allocation the decoder may make.
    pub max_alloc: u64,
}

impl Default for Bounds {
    /// 16384 px a side, 40 megapixels, 256 MiB: every real photo fits, a
    /// decompression bomb (a few KB declaring 100 000 × 100 000) does not.
    fn default() -> Self {
        Self {
            max_side: 16_384,
            max_pixels: 40_000_000,
            max_alloc: 256 * 1024 * 1024,
        }
    }
}

/// A generated thumbnail.
#[derive(Debug)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ThumbnailError {
    /// Not an image of the four formats (or not an image at all).
    #[error("not a JPEG, PNG, GIF or WebP image")]
    Unsupported,
    /// Larger than [`Bounds`] allows.
    #[error("the image is too large to thumbnail ({0} x {1})")]
    TooLarge(u32, u32),
    /// A damaged or truncated image.
    #[error("the image could not be decoded: {0}")]
    Broken(String),
    /// A zero width or height was asked for.
    #[error("width and height must be positive")]
    BadSize,
}

/// The content types the repository thumbnails.
pub fn can_thumbnail(content_type: &str) -> bool {
    matches!(
        content_type.split(';').next().map(str::trim),
        Some("image/jpeg" | "image/png" | "image/gif" | "image/webp")
    )
}

/// Makes a thumbnail of `input` of at most `width` × `height` (never
/// larger than the source: a small image is re-encoded at its own size).
/// JPEG stays JPEG; the others become PNG, which keeps transparency.
pub fn thumbnail(
    input: &[u8],
    width: u32,
    height: u32,
    method: Method,
    bounds: Bounds,
) -> Result<Thumbnail, ThumbnailError> {
    if width == 0 || height == 0 {
        return Err(ThumbnailError::BadSize);
    }
    let reader = ImageReader::new(Cursor::new(input))
        .with_guessed_format()
        .map_err(|e| ThumbnailError::Broken(e.to_string()))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Gif | ImageFormat::WebP)) => f,
        _ => return Err(ThumbnailError::Unsupported),
    };
    // The header alone first: a bomb is refused before anything is
    // allocated for its pixels.
    let (w, h) = ImageReader::with_format(Cursor::new(input), format)
        .into_dimensions()
        .map_err(|e| ThumbnailError::Broken(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(ThumbnailError::Broken("empty image".into()));
    }
    if w > bounds.max_side || h > bounds.max_side || u64::from(w) * u64::from(h) > bounds.max_pixels {
        return Err(ThumbnailError::TooLarge(w, h));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(bounds.max_side);
    limits.max_image_height = Some(bounds.max_side);
    limits.max_alloc = Some(bounds.max_alloc);
    let mut reader = ImageReader::with_format(Cursor::new(input), format);
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => ThumbnailError::TooLarge(w, h),
        e => ThumbnailError::Broken(e.to_string()),
    })?;
    let out = match method {
        Method::Scale if w <= width && h <= height => image,
        Method::Scale => image.resize(width, height, FilterType::Triangle),
        Method::Crop => {
            // Never upscale: crop to the requested aspect within the source.
            let (tw, th) = if width <= w && height <= h {
                (width, height)
            } else {
                let s = f64::min(f64::from(w) / f64::from(width), f64::from(h) / f64::from(height)).min(1.0);
                (
                    ((f64::from(width) * s).round() as u32).max(1),
                    ((f64::from(height) * s).round() as u32).max(1),
                )
            };
            image.resize_to_fill(tw, th, FilterType::Triangle)
        }
    };
    let (content_type, out_format) = match format {
        ImageFormat::Jpeg => ("image/jpeg", ImageFormat::Jpeg),
        _ => ("image/png", ImageFormat::Png),
    };
    // JPEG has no alpha channel: encode from RGB.
    let out = if out_format == ImageFormat::Jpeg {
        image::DynamicImage::ImageRgb8(out.to_rgb8())
    } else {
        out
    };
    let mut bytes = Vec::new();
    out.write_to(&mut Cursor::new(&mut bytes), out_format)
        .map_err(|e| ThumbnailError::Broken(e.to_string()))?;
    Ok(Thumbnail {
        bytes,
        content_type,
        width: out.width(),
        height: out.height(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, RgbImage};

    fn encoded(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let mut out = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), format)
            .unwrap();
        out
    }

    fn dims(bytes: &[u8]) -> (u32, u32) {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .unwrap()
            .into_dimensions()
            .unwrap()
    }

    #[test]
    fn scale_fits_within_and_keeps_aspect() {
        let src = encoded(800, 600, ImageFormat::Png);
        let t = thumbnail(&src, 320, 240, Method::Scale, Bounds::default()).unwrap();
        assert_eq!((t.width, t.height, t.content_type), (320, 240, "image/png"));
        assert_eq!(dims(&t.bytes), (320, 240));
        let t = thumbnail(&src, 100, 100, Method::Scale, Bounds::default()).unwrap();
        assert_eq!((t.width, t.height), (100, 75));
    }

    #[test]
    fn crop_fills_exactly() {
        let src = encoded(800, 600, ImageFormat::Jpeg);
        let t = thumbnail(&src, 96, 96, Method::Crop, Bounds::default()).unwrap();
        assert_eq!((t.width, t.height, t.content_type), (96, 96, "image/jpeg"));
        assert_eq!(dims(&t.bytes), (96, 96));
    }

    #[test]
    fn small_images_are_not_upscaled() {
        let src = encoded(40, 30, ImageFormat::Png);
        let t = thumbnail(&src, 320, 240, Method::Scale, Bounds::default()).unwrap();
        assert_eq!((t.width, t.height), (40, 30));
        let t = thumbnail(&src, 320, 320, Method::Crop, Bounds::default()).unwrap();
        assert_eq!((t.width, t.height), (30, 30));
    }

    #[test]
    fn refused_inputs() {
        assert_eq!(
            thumbnail(b"not an image", 10, 10, Method::Scale, Bounds::default()).unwrap_err(),
            ThumbnailError::Unsupported
        );
        let src = encoded(400, 300, ImageFormat::Png);
        let tight = Bounds {
            max_side: 16_384,
            max_pixels: 100_000,
            max_alloc: 1 << 28,
        };
        assert_eq!(
            thumbnail(&src, 10, 10, Method::Scale, tight).unwrap_err(),
            ThumbnailError::TooLarge(400, 300)
        );
        let half = thumbnail(&src[..src.len() / 2], 10, 10, Method::Scale, Bounds::default());
        assert!(matches!(half, Err(ThumbnailError::Broken(_))), "{half:?}");
        assert_eq!(
            thumbnail(&src, 0, 10, Method::Scale, Bounds::default()).unwrap_err(),
            ThumbnailError::BadSize
        );
    }

    /// A PNG whose header declares 100 000 × 100 000 pixels (40 GB of
    /// RGBA) is refused from its header, without decoding.
    #[test]
    fn decompression_bomb_is_refused_from_the_header() {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // Some compressed pixel data (its content is never reached) and the end.
        for (name, data) in [
            (&b"IDAT"[..], &[0x78u8, 0x9c, 0xed, 0xc1, 0x01, 0x0d][..]),
            (b"IEND", &[]),
        ] {
            let mut chunk = name.to_vec();
            chunk.extend_from_slice(data);
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            png.extend_from_slice(&chunk);
            png.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        let started = std::time::Instant::now();
        assert_eq!(
            thumbnail(&png, 64, 64, Method::Scale, Bounds::default()).unwrap_err(),
            ThumbnailError::TooLarge(100_000, 100_000)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
