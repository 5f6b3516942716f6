//! Pillow's resampling (`Image.resize(size, Image.BICUBIC)` on 8-bit images), which the Hugging
//! Face image processors and LLaMA-Factory's image regularization use: a separable convolution
//! whose kernel widens with the scale when shrinking (antialiasing), weights normalized per output
//! pixel and turned into 22-bit fixed point, the horizontal pass first (into 8-bit pixels, on
//! the rows the vertical pass needs), then the vertical pass, each rounding and clipping to 0..255.
//! The result equals Pillow's to the bit (tests against Pillow's output).

use super::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index, and the fixed-point weights of the inputs
/// from there.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncation, then clamped to the image.
            let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let xmax = ((center + support + 0.5).trunc() as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for k in &mut w {
                    *k /= total;
                }
            }
            let fixed = w
                .iter()
                .map(|&k| {
                    let v = k * f64::from(1u32 << PRECISION_BITS);
                    (if k < 0.0 { v - 0.5 } else { v + 0.5 }).trunc() as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `img` resized to `width × height` as Pillow's bicubic does.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let vertical = coefficients(img.height, height);
    // Only the input rows some output row reads.
    let (first, last) = if height != img.height {
        let first = vertical.first().map(|(y, _)| *y).unwrap_or(0);
        let last = vertical
            .iter()
            .map(|(y, k)| y + k.len())
            .max()
            .unwrap_or(img.height);
        (first, last)
    } else {
        (0, img.height)
    };
    let rows = last - first;
    let half = 1i64 << (PRECISION_BITS - 1);
    let horizontal_done: Vec<u8> = if width != img.width {
        let horizontal = coefficients(img.width, width);
        let mut out = vec![0u8; rows * width * 3];
        for y in 0..rows {
            let src = &img.data[(first + y) * img.width * 3..(first + y + 1) * img.width * 3];
            for (xx, (xmin, k)) in horizontal.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = half;
                    for (i, w) in k.iter().enumerate() {
                        acc += i64::from(src[(xmin + i) * 3 + c]) * i64::from(*w);
                    }
                    out[(y * width + xx) * 3 + c] = clip8(acc);
                }
            }
        }
        out
    } else {
        img.data[first * img.width * 3..last * img.width * 3].to_vec()
    };
    if height == img.height {
        return RgbImage::new(width, height, horizontal_done);
    }
    let mut out = vec![0u8; height * width * 3];
    for (yy, (ymin, k)) in vertical.iter().enumerate() {
        for x in 0..width * 3 {
            let mut acc = half;
            for (i, w) in k.iter().enumerate() {
                acc +=
                    i64::from(horizontal_done[(ymin - first + i) * width * 3 + x]) * i64::from(*w);
            }
            out[yy * width * 3 + x] = clip8(acc);
        }
    }
    RgbImage::new(width, height, out)
}
