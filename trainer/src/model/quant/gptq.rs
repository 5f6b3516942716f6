//! GPTQ (Frantar et al., 2022) as AutoGPTQ / optimum run it for transformers' `GPTQConfig`, and
//! the checkpoint layout transformers loads.
//!
//! Quantizing one linear weight `W (rows = out, cols = in)` with the Hessian `H = Σ x xᵀ` of its
//! calibration inputs: damping of `damp_percent` of H's mean diagonal, the upper Cholesky factor of
//! `H⁻¹`, then columns left to right in blocks of 128, each column rounded with its group's
//! scale and the rounding error spread over the columns not yet done. The quantizer is
//! AutoGPTQ's: per output row and group of `group_size` inputs, symmetric (`zero = 2^(bits−1)`,
//! the range from the group's extremes and 0), `q = clamp(round(w / scale) + zero, 0, 2^bits − 1)`
//! with ties to even, as `torch.round`.
//!
//! The layout (AutoGPTQ's `QuantLinear`, `checkpoint_format: gptq`): `qweight (in·bits/32, out)`
//! and `qzeros (groups, out·bits/32)` as int32 words holding a little-endian bit stream of
//! `bits`-bit values along the packed axis (3-bit values cross word boundaries), the zeros stored
//! minus one; `scales (groups, out)` in float16; `g_idx (in,)`, each input's group.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};

/// The quantization transformers' `GPTQConfig` asks for (LLaMA-Factory passes `bits`; the rest are
/// its defaults: `group_size` 128, `damp_percent` 0.1, `desc_act` false, `sym` true).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    pub bits: u32,
    /// Inputs per scale; `None` is one group per row (`group_size: -1`).
    pub group_size: Option<usize>,
    pub damp_percent: f64,
}

impl GptqConfig {
    pub fn new(bits: u32) -> Self {
        Self {
            bits,
            group_size: Some(128),
            damp_percent: 0.1,
        }
    }

    fn maxq(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    fn group(&self, cols: usize) -> usize {
        self.group_size.unwrap_or(cols).min(cols).max(1)
    }

    /// `quantization_config` as transformers writes it for a GPTQ checkpoint.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size.map_or(-1, |g| g as i64),
            "damp_percent": self.damp_percent,
            "desc_act": false,
            "sym": true,
            "true_sequential": true,
            "static_groups": false,
            "checkpoint_format": "gptq",
            "use_exllama": true,
            "model_seqlen": null,
            "block_name_to_quantize": null,
            "module_name_preceding_first_block": null,
            "batch_size": 1,
            "pad_token_id": null,
            "use_cuda_fp16": false,
            "max_input_length": null,
            "cache_block_outputs": true,
            "modules_in_block_to_quantize": null,
        })
    }
}

/// What a GPTQ checkpoint's `quantization_config` says about reading it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqCheckpoint {
    pub bits: u32,
    pub group_size: Option<usize>,
    /// `checkpoint_format: gptq` (the default) stores zeros minus one; `gptq_v2` as they are.
    pub zeros_minus_one: bool,
}

impl GptqCheckpoint {
    /// The checkpoint's quantization, from `config.json`'s `quantization_config`; `None` when
    /// there is none, an error naming the method when it is not GPTQ.
    pub fn from_config(
        config: &serde_json::Map<String, serde_json::Value>,
        file: &std::path::Path,
    ) -> Result<Option<Self>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let method = q["quant_method"].as_str().unwrap_or("");
        if method != "gptq" {
            bail!(
                "{}: the checkpoint is quantized with `{method}`, which this engine does not read (GPTQ checkpoints are; or use the unquantized model with `quantization_bit`)",
                file.display()
            );
        }
        let bits = q["bits"].as_u64().unwrap_or(0) as u32;
        if !matches!(bits, 2 | 3 | 4 | 8) {
            bail!(
                "{}: GPTQ with {bits} bits is not supported (2, 3, 4 or 8)",
                file.display()
            );
        }
        let group_size = q["group_size"]
            .as_i64()
            .filter(|g| *g > 0)
            .map(|g| g as usize);
        let format = q["checkpoint_format"].as_str().unwrap_or("gptq");
        if !matches!(format, "gptq" | "gptq_v2") {
            bail!(
                "{}: GPTQ `checkpoint_format: {format}` is not supported (gptq, gptq_v2)",
                file.display()
            );
        }
        Ok(Some(Self {
            bits,
            group_size,
            zeros_minus_one: format == "gptq",
        }))
    }
}

/// A quantized weight: the integers, per-group scales and zeros, and each input's group.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub bits: u32,
    pub rows: usize,
    pub cols: usize,
    /// The integers (`0 ..= 2^bits − 1`), each row's as a bit stream of [`Self::row_words`]
    /// words: a quarter of a byte per weight at 2 bits, half at 4.
    q: Vec<u32>,
    /// `scales[g · rows + r]` (float16 values).
    pub scales: Vec<f32>,
    /// `zeros[g · rows + r]`.
    pub zeros: Vec<u16>,
    /// `g_idx[c]`: the group of input `c`.
    pub g_idx: Vec<u32>,
}

impl Quantized {
    /// Words per row's stream.
    pub fn row_words(&self) -> usize {
        (self.cols * self.bits as usize).div_ceil(32)
    }

    fn set_code(&mut self, r: usize, c: usize, v: u8) {
        let wpr = self.row_words();
        pack_at(
            &mut self.q[r * wpr..(r + 1) * wpr],
            c,
            self.bits as usize,
            v,
        );
    }

    /// Row `r`'s integers.
    pub fn row_codes(&self, r: usize) -> Vec<u8> {
        let wpr = self.row_words();
        unpack(
            &self.q[r * wpr..(r + 1) * wpr],
            self.bits as usize,
            self.cols,
        )
    }

    /// Every integer, row-major.
    pub fn codes(&self) -> Vec<u8> {
        (0..self.rows).flat_map(|r| self.row_codes(r)).collect()
    }

    pub fn groups(&self) -> usize {
        self.scales.len() / self.rows.max(1)
    }

    /// Rows `r0 .. r0 + n` dequantized into `out` (`n · cols` values).
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        for r in 0..n {
            let row = r0 + r;
            let codes = self.row_codes(row);
            let dst = &mut out[r * self.cols..(r + 1) * self.cols];
            for (c, d) in dst.iter_mut().enumerate() {
                let g = self.g_idx[c] as usize * self.rows + row;
                *d = self.scales[g] * (f32::from(codes[c]) - f32::from(self.zeros[g]));
            }
        }
    }

    /// The whole weight, `(rows, cols)` f32.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }

    /// The checkpoint's tensors of this weight: `qweight`, `qzeros`, `scales`, `g_idx`.
    pub fn to_tensors(&self) -> Result<Vec<(&'static str, Tensor)>> {
        let (rows, cols, bits) = (self.rows, self.cols, self.bits as usize);
        ensure!(
            (cols * bits).is_multiple_of(32) && (rows * bits).is_multiple_of(32),
            "GPTQ packs {bits}-bit values in 32-bit words: a {rows}×{cols} weight does not fill them"
        );
        // qweight: for each output column, the stream of its inputs' values.
        let words = cols * bits / 32;
        let mut qweight = vec![0u32; words * rows];
        for r in 0..rows {
            let mut column = vec![0u32; words];
            column.fill(0);
            pack(self.row_codes(r).into_iter(), bits, &mut column);
            for (w, v) in column.into_iter().enumerate() {
                qweight[w * rows + r] = v;
            }
        }
        let groups = self.groups();
        let zwords = rows * bits / 32;
        let mut qzeros = vec![0u32; groups * zwords];
        for g in 0..groups {
            pack(
                (0..rows).map(|r| (self.zeros[g * rows + r].wrapping_sub(1) & self.mask()) as u8),
                bits,
                &mut qzeros[g * zwords..(g + 1) * zwords],
            );
        }
        let as_i32 = |v: Vec<u32>| -> Vec<i32> { v.into_iter().map(|x| x as i32).collect() };
        let cpu = Device::Cpu;
        Ok(vec![
            (
                "qweight",
                Tensor::from_vec(as_i32(qweight), (words, rows), &cpu)?,
            ),
            (
                "qzeros",
                Tensor::from_vec(as_i32(qzeros), (groups, zwords), &cpu)?,
            ),
            (
                "scales",
                Tensor::from_vec(self.scales.clone(), (groups, rows), &cpu)?
                    .to_dtype(DType::F16)?,
            ),
            (
                "g_idx",
                Tensor::from_vec(
                    self.g_idx.iter().map(|&g| g as i32).collect::<Vec<_>>(),
                    cols,
                    &cpu,
                )?,
            ),
        ])
    }

    fn mask(&self) -> u16 {
        ((1u32 << self.bits) - 1) as u16
    }

    /// A weight read from a checkpoint's tensors. `zeros_minus_one`: the zeros are stored minus
    /// one (`checkpoint_format: gptq`, what AutoGPTQ, GPTQModel and optimum save; `gptq_v2` stores
    /// them as they are).
    pub fn from_tensors(
        bits: u32,
        qweight: &Tensor,
        qzeros: &Tensor,
        scales: &Tensor,
        g_idx: Option<&Tensor>,
        zeros_minus_one: bool,
        name: &str,
    ) -> Result<Self> {
        ensure!(
            matches!(bits, 2 | 3 | 4 | 8),
            "{name}: GPTQ with {bits} bits is not supported (2, 3, 4 or 8)"
        );
        let b = bits as usize;
        let (words, rows) = qweight.dims2()?;
        let cols = words * 32 / b;
        let (groups, srows) = scales.dims2()?;
        ensure!(
            srows == rows,
            "{name}: scales {groups}×{srows} do not match qweight's {rows} outputs"
        );
        let words_of = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(match t.dtype() {
                DType::I32 => t
                    .flatten_all()?
                    .to_vec1::<i32>()?
                    .into_iter()
                    .map(|x| x as u32)
                    .collect(),
                DType::U32 => t.flatten_all()?.to_vec1::<u32>()?,
                other => bail!("{name}: packed GPTQ tensors are int32, not {other:?}"),
            })
        };
        let qw = words_of(qweight)?;
        // The checkpoint's streams run down each output column; ours along each row.
        let mut q = vec![0u32; rows * words];
        for r in 0..rows {
            for w in 0..words {
                q[r * words + w] = qw[w * rows + r];
            }
        }
        let qz = words_of(qzeros)?;
        let zwords = qz.len() / groups.max(1);
        ensure!(
            zwords * 32 / b >= rows,
            "{name}: qzeros hold {} values per group, fewer than the {rows} outputs",
            zwords * 32 / b
        );
        // AutoGPTQ adds the one back in 32 bits: a stored 2^bits − 1 reads as 2^bits.
        let plus = u16::from(zeros_minus_one);
        let zeros: Vec<u16> = (0..groups)
            .flat_map(|g| unpack(&qz[g * zwords..(g + 1) * zwords], b, rows))
            .map(|v| u16::from(v) + plus)
            .collect();
        let scales: Vec<f32> = scales.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let g_idx: Vec<u32> = match g_idx {
            Some(t) => t
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|g| g as u32)
                .collect(),
            None => {
                let size = cols.div_ceil(groups.max(1));
                (0..cols).map(|c| (c / size) as u32).collect()
            }
        };
        ensure!(
            g_idx.len() == cols && g_idx.iter().all(|&g| (g as usize) < groups),
            "{name}: g_idx does not give each of the {cols} inputs one of the {groups} groups"
        );
        Ok(Self {
            bits,
            rows,
            cols,
            q,
            scales,
            zeros,
            g_idx,
        })
    }

    /// Bytes the packed weight takes (what a checkpoint stores).
    pub fn packed_bytes(&self) -> usize {
        self.rows * self.cols * self.bits as usize / 8
            + self.scales.len() * 2
            + self.zeros.len() * self.bits as usize / 8
            + self.cols * 4
    }
}

/// Writes `values` as a little-endian stream of `bits`-bit fields into `words` (zeroed).
fn pack(values: impl Iterator<Item = u8>, bits: usize, words: &mut [u32]) {
    for (i, v) in values.enumerate() {
        pack_at(words, i, bits, v);
    }
}

/// Field `i` of the stream in `words` (zeroed there) set to `v`.
fn pack_at(words: &mut [u32], i: usize, bits: usize, v: u8) {
    let at = i * bits;
    let (w, s) = (at / 32, at % 32);
    words[w] |= u32::from(v) << s;
    if s + bits > 32 {
        words[w + 1] |= u32::from(v) >> (32 - s);
    }
}

/// The first `n` `bits`-bit fields of the stream in `words`.
fn unpack(words: &[u32], bits: usize, n: usize) -> Vec<u8> {
    let mask = (1u64 << bits) - 1;
    (0..n)
        .map(|i| {
            let at = i * bits;
            let (w, s) = (at / 32, at % 32);
            let lo = u64::from(words[w]);
            let hi = words.get(w + 1).map_or(0, |&x| u64::from(x));
            (((lo | (hi << 32)) >> s) & mask) as u8
        })
        .collect()
}

/// AutoGPTQ's symmetric quantizer for one group of one row: `(scale, zero)`. The range is
/// `[min(x, 0), max(x, 0)]` made symmetric around 0 when it reaches below 0; an all-zero
/// group gets `[-1, 1]`.
fn find_params(x: &[f32], maxq: f32) -> (f32, f32) {
    let mut xmin = x.iter().copied().fold(0f32, f32::min);
    let mut xmax = x.iter().copied().fold(0f32, f32::max);
    xmax = xmax.max(xmin.abs());
    if xmin < 0.0 {
        xmin = -xmax;
    }
    if xmin == 0.0 && xmax == 0.0 {
        xmin = -1.0;
        xmax = 1.0;
    }
    // In f32 while quantizing, as AutoGPTQ; the checkpoint keeps them in float16.
    ((xmax - xmin) / maxq, (maxq + 1.0) / 2.0)
}

fn quantize(x: f32, scale: f32, zero: f32, maxq: f32) -> f32 {
    ((x / scale).round_ties_even() + zero).clamp(0.0, maxq)
}

/// Round-to-nearest with the same quantizer and groups: the baseline GPTQ improves on.
pub fn rtn(w: &Tensor, cfg: &GptqConfig) -> Result<Quantized> {
    let (rows, cols) = w.dims2()?;
    let data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (maxq, gs) = (cfg.maxq(), cfg.group(cols));
    let groups = cols.div_ceil(gs);
    let mut out = empty(cfg, rows, cols, groups);
    for r in 0..rows {
        let row = &data[r * cols..(r + 1) * cols];
        for g in 0..groups {
            let span = g * gs..((g + 1) * gs).min(cols);
            let (scale, zero) = find_params(&row[span.clone()], maxq);
            out.scales[g * rows + r] = scale;
            out.zeros[g * rows + r] = zero as u16;
            for c in span {
                out.set_code(r, c, quantize(row[c], scale, zero, maxq) as u8);
            }
        }
    }
    Ok(out)
}

fn empty(cfg: &GptqConfig, rows: usize, cols: usize, groups: usize) -> Quantized {
    let gs = cfg.group(cols);
    Quantized {
        bits: cfg.bits,
        rows,
        cols,
        q: vec![0; rows * (cols * cfg.bits as usize).div_ceil(32)],
        scales: vec![0.0; groups * rows],
        zeros: vec![0; groups * rows],
        g_idx: (0..cols).map(|c| (c / gs) as u32).collect(),
    }
}

/// GPTQ of `w (rows, cols)` given `h (cols, cols)`, the sum of its inputs' outer products.
pub fn gptq(w: &Tensor, h: &Tensor, cfg: &GptqConfig) -> Result<Quantized> {
    const BLOCK: usize = 128;
    let (rows, cols) = w.dims2()?;
    ensure!(
        h.dims2()? == (cols, cols),
        "the Hessian is not {cols}×{cols}"
    );
    let mut w: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut h: Vec<f32> = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    // Inputs that never fire: their weights cannot matter; zero them and make H invertible.
    for c in 0..cols {
        if h[c * cols + c] == 0.0 {
            h[c * cols + c] = 1.0;
            for r in 0..rows {
                w[r * cols + c] = 0.0;
            }
        }
    }
    let mean_diag = (0..cols).map(|c| h[c * cols + c]).sum::<f32>() / cols as f32;
    let damp = cfg.damp_percent as f32 * mean_diag;
    for c in 0..cols {
        h[c * cols + c] += damp;
    }
    let hinv = inverse_cholesky_upper(h, cols)?;
    let (maxq, gs) = (cfg.maxq(), cfg.group(cols));
    let groups = cols.div_ceil(gs);
    let mut out = empty(cfg, rows, cols, groups);
    // The current group's parameters per row.
    let mut params = vec![(0f32, 0f32); rows];
    let mut err = vec![0f32; rows * BLOCK];
    let mut group = Vec::with_capacity(gs);
    for i1 in (0..cols).step_by(BLOCK) {
        let i2 = (i1 + BLOCK).min(cols);
        let count = i2 - i1;
        // A group's range is found on the weights as they were at the block's start (AutoGPTQ
        // reads `W`, which takes the block's updates only at its end): the same when groups
        // and blocks align (128), different for groups that start inside a block.
        let start: Vec<f32> = (0..rows)
            .flat_map(|r| w[r * cols + i1..r * cols + i2].to_vec())
            .collect();
        for i in 0..count {
            let c = i1 + i;
            if c % gs == 0 {
                let g = c / gs;
                let end = (c + gs).min(cols);
                for (r, p) in params.iter_mut().enumerate() {
                    group.clear();
                    group.extend_from_slice(&start[r * count + i..r * count + count.min(end - i1)]);
                    if end > i2 {
                        group.extend_from_slice(&w[r * cols + i2..r * cols + end]);
                    }
                    *p = find_params(&group, maxq);
                    out.scales[g * rows + r] = p.0;
                    out.zeros[g * rows + r] = p.1 as u16;
                }
            }
            let d = hinv[c * cols + c];
            for (r, &(scale, zero)) in params.iter().enumerate() {
                let x = w[r * cols + c];
                let q = quantize(x, scale, zero, maxq);
                out.set_code(r, c, q as u8);
                let e = (x - scale * (q - zero)) / d;
                err[r * BLOCK + i] = e;
                // The error spread over the block's columns not yet done.
                let hrow = &hinv[c * cols..c * cols + i2];
                let wrow = &mut w[r * cols..r * cols + i2];
                for j in c + 1..i2 {
                    wrow[j] -= e * hrow[j];
                }
            }
        }
        // Then over the columns after the block, all at once: `W[:, i2:] -= E · H⁻¹[i1:i2, i2:]`,
        // the O(rows · cols²) part of GPTQ, as one matrix product.
        if i2 < cols {
            let rest = cols - i2;
            let e: Vec<f32> = (0..rows)
                .flat_map(|r| err[r * BLOCK..r * BLOCK + count].iter().copied())
                .collect();
            let hb: Vec<f32> = (i1..i2)
                .flat_map(|i| hinv[i * cols + i2..(i + 1) * cols].iter().copied())
                .collect();
            let dev = Device::Cpu;
            let update = Tensor::from_vec(e, (rows, count), &dev)?.matmul(&Tensor::from_vec(
                hb,
                (count, rest),
                &dev,
            )?)?;
            let update: Vec<f32> = update.flatten_all()?.to_vec1()?;
            for r in 0..rows {
                let wrow = &mut w[r * cols + i2..(r + 1) * cols];
                for (x, u) in wrow.iter_mut().zip(&update[r * rest..(r + 1) * rest]) {
                    *x -= u;
                }
            }
        }
    }
    Ok(out)
}

/// The upper Cholesky factor of `H⁻¹` (row-major `n × n`), in f32 as AutoGPTQ computes it
/// (`cholesky`, `cholesky_inverse`, `cholesky(upper=True)`).
fn inverse_cholesky_upper(h: Vec<f32>, n: usize) -> Result<Vec<f32>> {
    let m = nalgebra::DMatrix::from_row_slice(n, n, &h);
    let Some(chol) = m.cholesky() else {
        bail!("GPTQ: the damped Hessian is not positive definite (raise `damp_percent`)");
    };
    let inv = chol.inverse();
    let Some(chol) = inv.cholesky() else {
        bail!("GPTQ: the inverse Hessian is not positive definite");
    };
    // H⁻¹ = L Lᵀ; the upper factor is Lᵀ.
    let upper = chol.l().transpose();
    let mut out = vec![0f32; n * n];
    for r in 0..n {
        for c in 0..n {
            out[r * n + c] = upper[(r, c)];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn bit_streams_round_trip_for_every_width() {
        for bits in [2usize, 3, 4, 8] {
            let n = 64;
            let values: Vec<u8> = (0..n).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let mut words = vec![0u32; n * bits / 32];
            pack(values.iter().copied(), bits, &mut words);
            assert_eq!(unpack(&words, bits, n), values, "{bits} bits");
        }
        // AutoGPTQ's 3-bit layout: value 10 straddles the first two words.
        let mut words = vec![0u32; 3];
        let mut v = vec![0u8; 32];
        v[10] = 0b111;
        pack(v.into_iter(), 3, &mut words);
        assert_eq!(words, [0b11 << 30, 0b1, 0]);
    }

    #[test]
    fn the_quantizer_is_autogptqs() {
        // Symmetric: zero 8 for 4 bits, range ±max|x|.
        let (s, z) = find_params(&[-0.5, 0.25, 0.1], 15.0);
        assert_eq!(z, 8.0);
        assert_eq!(s, 1.0 / 15.0);
        // All non-negative: the range is [0, max], so values above 7·scale clip.
        let (s, _) = find_params(&[0.0, 0.3, 0.6], 15.0);
        assert_eq!(s, 0.6 / 15.0);
        assert_eq!(quantize(0.6, s, 8.0, 15.0), 15.0);
        // Ties to even, as torch.round.
        assert_eq!(quantize(2.5, 1.0, 8.0, 15.0), 10.0);
        assert_eq!(quantize(3.5, 1.0, 8.0, 15.0), 12.0);
    }

    #[test]
    fn packed_tensors_read_back_and_zeros_are_stored_minus_one() {
        let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu).unwrap();
        for bits in [2, 3, 4, 8] {
            let q = rtn(&w, &GptqConfig::new(bits)).unwrap();
            let t = q.to_tensors().unwrap();
            let get = |n: &str| &t.iter().find(|(k, _)| *k == n).unwrap().1;
            let zero = 1u32 << (bits - 1);
            let first = get("qzeros")
                .flatten_all()
                .unwrap()
                .to_vec1::<i32>()
                .unwrap()[0] as u32;
            assert_eq!(first & ((1 << bits) - 1), zero - 1, "{bits} bits");
            let back = Quantized::from_tensors(
                bits,
                get("qweight"),
                get("qzeros"),
                get("scales"),
                Some(get("g_idx")),
                true,
                "w",
            )
            .unwrap();
            assert_eq!(
                (back.codes(), &back.zeros, &back.g_idx),
                (q.codes(), &q.zeros, &q.g_idx),
                "{bits} bits"
            );
            for (a, b) in back.scales.iter().zip(&q.scales) {
                assert_eq!(*a, f16::from_f32(*b).to_f32());
            }
            // `gptq_v2` keeps the zeros as they are: the same words read one lower.
            let v2 = Quantized::from_tensors(
                bits,
                get("qweight"),
                get("qzeros"),
                get("scales"),
                None,
                false,
                "w",
            )
            .unwrap();
            assert!(v2.zeros.iter().zip(&q.zeros).all(|(a, b)| a + 1 == *b));
            assert_eq!(v2.g_idx, q.g_idx, "g_idx from the group size when absent");
        }
    }

    #[test]
    fn gptq_beats_rounding_on_the_layer_output() {
        // Correlated inputs, where error compensation pays.
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 1.0, (512, 32), &dev).unwrap();
        let mix = Tensor::randn(0f32, 1.0, (32, 256), &dev).unwrap();
        let x = (base.matmul(&mix).unwrap() + Tensor::randn(0f32, 0.1, (512, 256), &dev).unwrap())
            .unwrap();
        let w = Tensor::randn(0f32, 0.05, (64, 256), &dev).unwrap();
        let h = x.t().unwrap().matmul(&x).unwrap();
        let cfg = GptqConfig::new(4);
        let err = |q: &Quantized| -> f32 {
            let wq = q.dequantize(&dev).unwrap();
            let d =
                (x.matmul(&w.t().unwrap()).unwrap() - x.matmul(&wq.t().unwrap()).unwrap()).unwrap();
            d.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let (g, r) = (
            err(&gptq(&w, &h, &cfg).unwrap()),
            err(&rtn(&w, &cfg).unwrap()),
        );
        assert!(g < 0.5 * r, "GPTQ {g} vs RTN {r}");
    }
}
