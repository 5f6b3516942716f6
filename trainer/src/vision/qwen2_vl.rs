//! Qwen2-VL / Qwen2.5-VL images, as LLaMA-Factory and transformers' `Qwen2VLImageProcessor`
//! prepare them: LLaMA-Factory's regularization (`image_max_pixels` / `image_min_pixels`, at
//! least 28 pixels a side, no side over 200× the other), then the processor's `smart_resize` to
//! multiples of `patch_size × merge_size` within its pixel budget, Pillow's bicubic resize,
//! rescale and normalize, and the patches cut in the order the vision tower reads them:
//! `(grid_t·grid_h·grid_w, channels·temporal_patch·patch·patch)`, merge windows contiguous.

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use super::resample::resize_bicubic;
use super::RgbImage;

/// The image processor's settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlProcessor {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
}

impl Default for Qwen2VlProcessor {
    fn default() -> Self {
        Self {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            image_mean: super::CLIP_MEAN,
            image_std: super::CLIP_STD,
            rescale_factor: 1.0 / 255.0,
        }
    }
}

/// One image ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePatches {
    /// `(grid_t·grid_h·grid_w) × (3·temporal·patch·patch)` values, row-major.
    pub pixel_values: Vec<f32>,
    /// `(grid_t, grid_h, grid_w)`, `image_grid_thw`.
    pub grid: [usize; 3],
}

impl ImagePatches {
    /// The number of `<|image_pad|>` tokens the image becomes in the prompt.
    pub fn tokens(&self, merge_size: usize) -> usize {
        self.grid.iter().product::<usize>() / (merge_size * merge_size)
    }
}

impl Qwen2VlProcessor {
    /// Reads `preprocessor_config.json` in `dir` (missing keys take the class defaults).
    pub fn load(dir: &Path) -> Result<Self> {
        let (file, v) = super::preprocessor_config(dir)?;
        let mut p = Self::default();
        let int = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        p.patch_size = int("patch_size").unwrap_or(p.patch_size);
        p.temporal_patch_size = int("temporal_patch_size").unwrap_or(p.temporal_patch_size);
        p.merge_size = int("merge_size").unwrap_or(p.merge_size);
        // `min_pixels` / `max_pixels`, or the newer `size` {shortest_edge, longest_edge}.
        let size = |k: &str| v.get("size").and_then(|s| s.get(k)).and_then(Value::as_u64);
        p.min_pixels = int("min_pixels")
            .or(size("shortest_edge").map(|x| x as usize))
            .unwrap_or(p.min_pixels);
        p.max_pixels = int("max_pixels")
            .or(size("longest_edge").map(|x| x as usize))
            .unwrap_or(p.max_pixels);
        let triple = |k: &str| super::channel_triple(&v, k, &file);
        p.image_mean = triple("image_mean")?.unwrap_or(p.image_mean);
        p.image_std = triple("image_std")?.unwrap_or(p.image_std);
        p.rescale_factor = v
            .get("rescale_factor")
            .and_then(Value::as_f64)
            .unwrap_or(p.rescale_factor);
        Ok(p)
    }

    /// `smart_resize`: the size, multiples of `patch·merge`, nearest the image's within the
    /// pixel budget (Python's round-half-to-even, as transformers computes it).
    pub fn smart_resize(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let factor = (self.patch_size * self.merge_size) as f64;
        let (h, w) = (height as f64, width as f64);
        if h.max(w) / h.min(w) > 200.0 {
            bail!(
                "absolute aspect ratio must be smaller than 200, got {}",
                h.max(w) / h.min(w)
            );
        }
        let mut hb = (h / factor).round_ties_even() * factor;
        let mut wb = (w / factor).round_ties_even() * factor;
        if hb * wb > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            hb = factor.max((h / beta / factor).floor() * factor);
            wb = factor.max((w / beta / factor).floor() * factor);
        } else if hb * wb < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            hb = (h * beta / factor).ceil() * factor;
            wb = (w * beta / factor).ceil() * factor;
        }
        Ok((hb as usize, wb as usize))
    }

    /// The processor's output for an (already regularized) image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<ImagePatches> {
        let (rh, rw) = self.smart_resize(img.height, img.width)?;
        let img = resize_bicubic(img, rw, rh);
        let (p, t, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let (gh, gw) = (rh / p, rw / p);
        // Channel-first normalized planes; one frame repeated to fill the temporal patch.
        let plane = |c: usize, y: usize, x: usize| -> f32 {
            let v = f64::from(img.data[(y * rw + x) * 3 + c]) * self.rescale_factor;
            ((v as f32) - self.image_mean[c]) / self.image_std[c]
        };
        let row = 3 * t * p * p;
        let mut out = Vec::with_capacity(gh * gw * row);
        // Patch order (grid_h/m, grid_w/m, m, m); within a patch (channel, frame, py, px).
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for _frame in 0..t {
                                for py in 0..p {
                                    for px in 0..p {
                                        out.push(plane(c, y0 + py, x0 + px));
                                    }
                                }
                            }
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

/// The size `(width, height)` LLaMA-Factory's regularization gives an image of `width × height`
/// (`Qwen2VLPlugin._preprocess_image`): scaled into `[min_pixels, max_pixels]` (each side
/// truncated), at least 28 pixels a side, no side over 200× the other.
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

/// Each resize of the regularization, in order.
fn regularize_steps(
    mut w: usize,
    mut h: usize,
    max_pixels: usize,
    min_pixels: usize,
) -> Vec<(usize, usize)> {
    let mut steps = super::clip::regularize_steps(w, h, max_pixels, min_pixels);
    if let Some(&last) = steps.last() {
        (w, h) = last;
    }
    if w.min(h) < 28 {
        (w, h) = (w.max(28), h.max(28));
        steps.push((w, h));
    }
    if w as f64 / h as f64 > 200.0 {
        w = h * 180;
        steps.push((w, h));
    }
    if h as f64 / w as f64 > 200.0 {
        h = w * 180;
        steps.push((w, h));
    }
    steps
}

/// LLaMA-Factory's regularization of an image for Qwen2-VL ([`regularized_size`]), each step a
/// Pillow bicubic resize.
pub fn regularize(mut img: RgbImage, max_pixels: usize, min_pixels: usize) -> RgbImage {
    for (w, h) in regularize_steps(img.width, img.height, max_pixels, min_pixels) {
        img = resize_bicubic(&img, w, h);
    }
    img
}
