//! bitsandbytes' 4-bit formats as `quantize_4bit` / `dequantize_4bit` define them: the tensor
//! flattened into blocks of 64, each scaled by its absolute maximum and mapped to the nearest of
//! 16 code values (NF4: normal-float quantiles; FP4: a 4-bit float), two codes a byte (the first
//! in the high nibble). With double quantization the block maxima are themselves quantized: their
//! mean is subtracted and the rest stored as 8-bit codes of bitsandbytes' dynamic map in blocks
//! of 256, each with its own absmax.

/// bitsandbytes' NF4 code values (`get_4bit_type("nf4")`), in code order, as published (they
/// round to the same f32 bitsandbytes uses).
#[allow(clippy::excessive_precision)]
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' FP4 code values (`get_4bit_type("fp4")`, sign bit first), in code order.
#[allow(clippy::excessive_precision)]
pub const FP4: [f32; 16] = [
    0.0,
    0.005_208_333_3,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333_3,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

pub const BLOCK: usize = 64;
pub const STATS_BLOCK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nf4,
    Fp4,
}

impl Kind {
    fn codes(self) -> &'static [f32; 16] {
        match self {
            Kind::Nf4 => &NF4,
            Kind::Fp4 => &FP4,
        }
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: the 256 values of its 8-bit blockwise
/// quantization, sorted.
pub fn dynamic_map() -> [f32; 256] {
    let (max_exponent_bits, non_sign_bits) = (7i32, 7i32);
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let items = 2usize.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1;
        // torch.linspace(0.1, 1, items) in float32, then the means of neighbours.
        let bounds: Vec<f32> = (0..items)
            .map(|k| {
                if items == 1 {
                    0.1
                } else {
                    let step = (1.0f32 - 0.1) / (items - 1) as f32;
                    if k < items / 2 {
                        0.1 + step * k as f32
                    } else {
                        1.0 - step * (items - 1 - k) as f32
                    }
                }
            })
            .collect();
        let scale = 10f32.powi(-(max_exponent_bits - 1) + i);
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push((scale * mean) as f64);
            data.push((-(scale * mean)) as f64);
        }
    }
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    for (o, d) in out.iter_mut().zip(data) {
        *o = d as f32;
    }
    out
}

/// Index of the code value nearest to `x`, the first in code order on a tie: `torch.argmin`
/// over the distances, as bitsandbytes' CPU quantization does.
fn nearest(codes: &[f32], x: f32) -> u8 {
    let mut best = (f32::INFINITY, 0u8);
    for (i, &c) in codes.iter().enumerate() {
        let d = (x - c).abs();
        if d < best.0 {
            best = (d, i as u8);
        }
    }
    best.1
}

/// A bitsandbytes 4-bit tensor: packed codes and the block maxima (plain or double-quantized).
#[derive(Debug, Clone)]
pub struct Bnb4 {
    pub kind: Kind,
    pub len: usize,
    /// Two codes a byte, the first in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

#[derive(Debug, Clone)]
pub enum Absmax {
    Plain(Vec<f32>),
    /// `value = map[code] * absmax2[block / 256] + offset`.
    Double {
        codes: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

fn shared_dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(dynamic_map)
}

impl Absmax {
    /// The scale of block `b`: `dequantize_blockwise(...) + offset` for double quantization.
    fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Double {
                codes,
                absmax2,
                offset,
            } => shared_dynamic_map()[codes[b] as usize] * absmax2[b / STATS_BLOCK] + offset,
        }
    }
}

impl Bnb4 {
    /// `quantize_4bit(x, blocksize=64, quant_type, compress_statistics=double)` of the flattened
    /// values, as bitsandbytes 0.50 computes it: each value times the reciprocal of its block's
    /// absmax (divided by it in a last, partial block), clamped to [-1, 1], then bucketed by
    /// the midpoints of the sorted code values (a value on a midpoint takes the lower code).
    pub fn quantize(x: &[f32], kind: Kind, double: bool) -> Self {
        let codes = kind.codes();
        let mut order: Vec<usize> = (0..16).collect();
        // Equal values (FP4's +0 and -0) keep code order, as torch.argsort leaves them.
        order.sort_by(|&a, &b| {
            codes[a]
                .partial_cmp(&codes[b])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let bounds: Vec<f32> = order
            .windows(2)
            .map(|w| (codes[w[0]] + codes[w[1]]) / 2.0)
            .collect();
        let blocks = x.len().div_ceil(BLOCK);
        let full = x.len() / BLOCK * BLOCK;
        let mut absmax = Vec::with_capacity(blocks);
        let mut packed = vec![0u8; x.len().div_ceil(2)];
        for (b, chunk) in x.chunks(BLOCK).enumerate() {
            let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(m);
            let m = m.max(1e-38);
            let inv = 1.0 / m;
            for (j, &v) in chunk.iter().enumerate() {
                let e = b * BLOCK + j;
                let scaled = if e < full { v * inv } else { v / m }.clamp(-1.0, 1.0);
                let q = order[bounds.partition_point(|&bd| bd < scaled)] as u8;
                packed[e / 2] |= if e.is_multiple_of(2) { q << 4 } else { q };
            }
        }
        // An odd count is padded with a 0 before packing, as bitsandbytes does.
        if x.len() % 2 == 1 {
            packed[x.len() / 2] |= order[bounds.partition_point(|&bd| bd < 0.0)] as u8;
        }
        let absmax = if double {
            let offset = absmax.iter().map(|&v| v as f64).sum::<f64>() as f32 / blocks as f32;
            let centered: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
            let map = dynamic_map();
            let mut codes8 = Vec::with_capacity(blocks);
            let mut absmax2 = Vec::new();
            for chunk in centered.chunks(STATS_BLOCK) {
                let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                absmax2.push(m);
                let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
                codes8.extend(
                    chunk
                        .iter()
                        .map(|v| nearest(&map, (v * inv).clamp(-1.0, 1.0))),
                );
            }
            Absmax::Double {
                codes: codes8,
                absmax2,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Self {
            kind,
            len: x.len(),
            packed,
            absmax,
        }
    }

    /// `out.len()` dequantized values from element `start` on: `code[q] * scale(block)`, the
    /// scales decoded block by block (`dequantize_4bit`).
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        let codes = self.kind.codes();
        if start.is_multiple_of(BLOCK) {
            // Whole blocks (the usual case: tiles of rows whose length is a multiple of 64), in
            // parallel, a byte (two values) at a time.
            use rayon::prelude::*;
            let first = start / BLOCK;
            out.par_chunks_mut(BLOCK)
                .with_min_len(64)
                .enumerate()
                .for_each(|(i, o)| {
                    let b = first + i;
                    let scale = self.absmax.get(b);
                    let bytes = &self.packed[b * BLOCK / 2..];
                    for (pair, &byte) in o.chunks_mut(2).zip(bytes) {
                        pair[0] = codes[(byte >> 4) as usize] * scale;
                        if let Some(v) = pair.get_mut(1) {
                            *v = codes[(byte & 0x0f) as usize] * scale;
                        }
                    }
                });
            return;
        }
        let (mut e, mut done) = (start, 0);
        while done < out.len() {
            // The rest of `e`'s block, one scale for all of it.
            let n = (BLOCK - e % BLOCK).min(out.len() - done);
            let scale = self.absmax.get(e / BLOCK);
            for o in &mut out[done..done + n] {
                let byte = self.packed[e / 2];
                let q = if e % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                *o = codes[q as usize] * scale;
                e += 1;
            }
            done += n;
        }
    }

    /// Bytes stored: codes, block maxima and their statistics.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(v) => 4 * v.len(),
                Absmax::Double { codes, absmax2, .. } => codes.len() + 4 * absmax2.len() + 4,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_map_has_bitsandbytes_shape() {
        let m = dynamic_map();
        assert_eq!(m[255], 1.0);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!(m.contains(&0.0) && m[0] < -0.99);
    }

    /// Aligned ranges take the parallel path, others the value-by-value one: both agree with
    /// the whole tensor dequantized.
    #[test]
    fn any_range_dequantizes_like_the_whole() {
        let x: Vec<f32> = (0..1001)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0)
            .collect();
        let q = Bnb4::quantize(&x, Kind::Nf4, true);
        let mut whole = vec![0f32; x.len()];
        q.dequantize_range(0, &mut whole);
        for (start, len) in [(64, 500), (5, 300), (130, 871), (960, 41), (1000, 1)] {
            let mut part = vec![0f32; len];
            q.dequantize_range(start, &mut part);
            assert_eq!(part, whole[start..start + len], "{start}+{len}");
        }
        // The value-by-value path on its own, from the start.
        let mut slow = vec![0f32; x.len() - 1];
        q.dequantize_range(1, &mut slow);
        assert_eq!(slow, whole[1..]);
    }

    #[test]
    fn round_trip_error_is_bounded_by_half_a_code_gap() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for kind in [Kind::Nf4, Kind::Fp4] {
            for double in [false, true] {
                let q = Bnb4::quantize(&x, kind, double);
                let mut y = vec![0f32; x.len()];
                q.dequantize_range(0, &mut y);
                let widest_gap = 0.33f32; // NF4's and FP4's largest gap between codes
                for (b, (xs, ys)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
                    let m = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // The scale itself is off by up to 1/127 of its block's range with double
                    // quantization.
                    let slack = if double { 0.02 * m } else { 1e-6 };
                    for (a, c) in xs.iter().zip(ys) {
                        assert!(
                            (a - c).abs() <= widest_gap / 2.0 * m + slack,
                            "{kind:?} double={double} block {b}: {a} vs {c}"
                        );
                    }
                }
            }
        }
    }
}
