//! Reading an image file into RGB as LLaMA-Factory does (`PIL.Image.open(path).convert("RGB")`):
//! JPEG through libjpeg-turbo's decoder (mozjpeg, the decoder Pillow's wheels carry, so the pixels
//! are the same to the bit), other formats (PNG, WebP, GIF, BMP) through the `image` crate, alpha
//! dropped as Pillow's conversion drops it.

use std::path::Path;

use anyhow::{anyhow, Context, Result};

use super::RgbImage;

/// The image at `path`, in RGB.
pub fn load(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    from_bytes(&bytes).with_context(|| format!("cannot decode image {}", path.display()))
}

/// An encoded image (JPEG, PNG, WebP, GIF, BMP) in RGB.
pub fn from_bytes(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return jpeg(bytes);
    }
    let img = image::load_from_memory(bytes).map_err(|e| anyhow!("{e}"))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok(RgbImage::new(w, h, rgb.into_raw()))
}

fn jpeg(bytes: &[u8]) -> Result<RgbImage> {
    // mozjpeg reports corrupt data by panicking through its error handler; keep that an error.
    std::panic::catch_unwind(|| -> Result<RgbImage> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let mut img = d.rgb()?;
        let (w, h) = (img.width(), img.height());
        let rows: Vec<[u8; 3]> = img.read_scanlines()?;
        img.finish()?;
        Ok(RgbImage::new(w, h, rows.into_iter().flatten().collect()))
    })
    .map_err(|_| anyhow!("corrupt JPEG data"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_and_garbage() {
        let mut png = Vec::new();
        let img = image::RgbaImage::from_fn(3, 2, |x, y| image::Rgba([x as u8, y as u8, 7, 9]));
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let rgb = from_bytes(&png).unwrap();
        assert_eq!((rgb.width, rgb.height), (3, 2));
        assert_eq!(&rgb.data[..6], &[0, 0, 7, 1, 0, 7]);
        assert!(from_bytes(b"not an image").is_err());
        let mut bad = vec![0xFF, 0xD8, 0xFF, 0xE0];
        bad.extend([0u8; 40]);
        assert!(from_bytes(&bad).is_err());
    }
}
