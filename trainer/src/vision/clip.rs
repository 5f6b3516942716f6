//! LLaVA-1.5 images, as transformers' `CLIPImageProcessor` prepares them after LLaMA-Factory's
//! regularization (`image_max_pixels` / `image_min_pixels`, no other rule): the shortest side
//! resized to `size.shortest_edge` (the other side truncated, as transformers computes it) with
//! Pillow's bicubic, a center crop to `crop_size`, rescale and normalize, then the patches cut in
//! the order the CLIP tower reads them: `(rows·cols, channels·patch·patch)`, row-major patches.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use super::qwen2_vl::ImagePatches;
use super::resample::resize_bicubic;
use super::RgbImage;

/// How the resize step sizes an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipResize {
    /// The shorter side to this many pixels, the aspect ratio kept.
    ShortestEdge(usize),
    /// Exactly `(height, width)`.
    Exact(usize, usize),
}

/// The image processor's settings (`preprocessor_config.json`) and the patch size the tower cuts.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipProcessor {
    pub resize: ClipResize,
    /// `(height, width)` of the center crop, when the processor crops.
    pub crop: Option<(usize, usize)>,
    pub patch_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
}

impl Default for ClipProcessor {
    /// LLaVA-1.5's: CLIP ViT-L/14 at 336 pixels.
    fn default() -> Self {
        Self {
            resize: ClipResize::ShortestEdge(336),
            crop: Some((336, 336)),
            patch_size: 14,
            image_mean: super::CLIP_MEAN,
            image_std: super::CLIP_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }
}

/// `v["key"]` as `(height, width)`: a number (square) or `{height, width}`.
fn hw(v: Option<&Value>) -> Option<(usize, usize)> {
    let v = v?;
    if let Some(n) = v.as_u64() {
        return Some((n as usize, n as usize));
    }
    let h = v.get("height")?.as_u64()? as usize;
    let w = v.get("width")?.as_u64()? as usize;
    Some((h, w))
}

impl ClipProcessor {
    /// Reads `preprocessor_config.json` in `dir`; `patch_size` is the vision tower's.
    pub fn load(dir: &Path, patch_size: usize) -> Result<Self> {
        let (file, v) = super::preprocessor_config(dir)?;
        let mut p = Self {
            patch_size,
            ..Self::default()
        };
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(true);
        if !flag("do_resize") || !flag("do_rescale") || !flag("do_normalize") {
            bail!(
                "{}: `do_resize`, `do_rescale` and `do_normalize` must be true (LLaVA's processor)",
                file.display()
            );
        }
        if let Some(r) = v.get("resample").and_then(Value::as_u64) {
            if r != 3 {
                bail!(
                    "{}: `resample: {r}` is not supported (bicubic, 3, is)",
                    file.display()
                );
            }
        }
        match v.get("size") {
            None => {}
            Some(s) => {
                p.resize = if let Some(e) = s.get("shortest_edge").and_then(Value::as_u64) {
                    ClipResize::ShortestEdge(e as usize)
                } else if let Some(n) = s.as_u64() {
                    ClipResize::ShortestEdge(n as usize)
                } else {
                    let (h, w) = hw(Some(s)).ok_or_else(|| {
                        anyhow!(
                            "{}: `size` must be {{shortest_edge}} or {{height, width}}",
                            file.display()
                        )
                    })?;
                    ClipResize::Exact(h, w)
                };
            }
        }
        p.crop = if flag("do_center_crop") {
            Some(hw(v.get("crop_size")).unwrap_or((336, 336)))
        } else {
            None
        };
        let triple = |k: &str| super::channel_triple(&v, k, &file);
        p.image_mean = triple("image_mean")?.unwrap_or(p.image_mean);
        p.image_std = triple("image_std")?.unwrap_or(p.image_std);
        p.rescale_factor = v
            .get("rescale_factor")
            .and_then(Value::as_f64)
            .unwrap_or(p.rescale_factor);
        Ok(p)
    }

    /// `(height, width)` after the resize step (`get_resize_output_image_size`).
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            ClipResize::Exact(h, w) => (h, w),
            ClipResize::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = (s as f64 * long as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// `(height, width)` of what the tower sees: the crop, or the resized image.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.crop
            .unwrap_or_else(|| self.resized_size(height, width))
    }

    /// The processor's output for an (already regularized) image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<ImagePatches> {
        let (rh, rw) = self.resized_size(img.height, img.width);
        let img = resize_bicubic(img, rw, rh);
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        if ch > rh || cw > rw {
            bail!(
                "the image is {rw}×{rh} after resizing, smaller than the {cw}×{ch} crop (`crop_size` larger than `size`)"
            );
        }
        let (top, left) = ((rh - ch) / 2, (rw - cw) / 2);
        let p = self.patch_size;
        if !ch.is_multiple_of(p) || !cw.is_multiple_of(p) {
            bail!("the {cw}×{ch} image does not divide into {p}-pixel patches");
        }
        let (gh, gw) = (ch / p, cw / p);
        let value = |c: usize, y: usize, x: usize| -> f32 {
            let v = f64::from(img.data[((top + y) * rw + left + x) * 3 + c]) * self.rescale_factor;
            ((v as f32) - self.image_mean[c]) / self.image_std[c]
        };
        let mut out = Vec::with_capacity(gh * gw * 3 * p * p);
        for r in 0..gh {
            for col in 0..gw {
                for c in 0..3 {
                    for py in 0..p {
                        for px in 0..p {
                            out.push(value(c, r * p + py, col * p + px));
                        }
                    }
                }
            }
        }
        Ok(ImagePatches {
            pixel_values: out,
            grid: [1, gh, gw],
        })
    }
}

/// LLaMA-Factory's base regularization (`MMPluginMixin._preprocess_image`): scaled into
/// `[min_pixels, max_pixels]`, each side truncated, each step a Pillow bicubic resize.
pub fn regularize(mut img: RgbImage, max_pixels: usize, min_pixels: usize) -> RgbImage {
    for (w, h) in regularize_steps(img.width, img.height, max_pixels, min_pixels) {
        img = resize_bicubic(&img, w, h);
    }
    img
}

/// The size `(width, height)` [`regularize`] gives an image.
pub fn regularized_size(
    width: usize,
    height: usize,
    max_pixels: usize,
    min_pixels: usize,
) -> (usize, usize) {
    regularize_steps(width, height, max_pixels, min_pixels)
        .last()
        .copied()
        .unwrap_or((width, height))
}

/// Each resize of the base regularization, in order (Qwen2-VL's adds its own after these).
pub(crate) fn regularize_steps(
    mut w: usize,
    mut h: usize,
    max_pixels: usize,
    min_pixels: usize,
) -> Vec<(usize, usize)> {
    let mut steps = Vec::new();
    let area = |w: usize, h: usize| (w * h) as f64;
    if area(w, h) > max_pixels as f64 {
        let f = (max_pixels as f64 / area(w, h)).sqrt();
        (w, h) = ((w as f64 * f) as usize, (h as f64 * f) as usize);
        steps.push((w, h));
    }
    if area(w, h) < min_pixels as f64 {
        let f = (min_pixels as f64 / area(w, h)).sqrt();
        (w, h) = ((w as f64 * f) as usize, (h as f64 * f) as usize);
        steps.push((w, h));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_the_aspect_ratio_truncating_the_long_side() {
        let p = ClipProcessor::default();
        // 640×427 (w×h): h is short → 336, w = int(336·640/427) = 503.
        assert_eq!(p.resized_size(427, 640), (336, 503));
        assert_eq!(p.resized_size(640, 427), (503, 336));
        assert_eq!(p.output_size(427, 640), (336, 336));
    }
}
