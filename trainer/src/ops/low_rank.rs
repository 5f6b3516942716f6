//! LoRA's low-rank products on the CPU in f32: an `(n, k)` activation or gradient against an
//! adapter of rank `r` (8–64 where a 576–4,096-wide layer has thousands of columns). A general
//! GEMM (candle's `gemm` crate) runs these skinny shapes far below memory speed — on a 135M
//! model's LoRA step they took as long as the frozen products themselves — and composing them
//! from tensor ops costs an `(n, out)` product and a sum pass per layer. Three kernels cover a
//! LoRA layer's forward and backward:
//!
//! - [`project`]: `x · sᵀ` for `s (r, k)`: `(n, r)` (`x·Aᵀ`, `g·B`),
//! - [`gather`]: `hᵀ · x` for `h (n, r)`: `(r, k)` (`dA`, `dBᵀ`),
//! - [`add_outer`]: `y += h · s` in place (the low-rank term added to a dense frozen product;
//!   an AMX product sums it on its tiles instead, see [`super::amx_bf16::LowRank`]).
//!
//! Each reads its large operand once, keeps the rank-sized side in registers or L1, splits
//! the rows (or columns) over rayon's threads, and is compiled for AVX-512 and AVX2
//! (`simd_kernel!`). The forward's `h = x·Aᵀ` is kept for the backward (`tokens × r` floats).

use candle_core::{CpuStorage, InplaceOp1, Layout, Result};
use rayon::prelude::*;

/// SIMD width the kernels are written for (16 f32 lanes: one AVX-512 register).
const LANES: usize = 16;
/// Rows of `s` [`project`] keeps in registers at once.
const GROUP: usize = 4;
/// Columns of `h` [`gather`] keeps in registers at once (a rank-8 adapter in one pass).
const WIDE: usize = 8;
/// Rows per parallel task: enough work to outweigh a hand-off.
const ROWS_PER_TASK: usize = 32;

/// Asks for the cache line holding `x[at]` (nothing past the end).
#[inline(always)]
fn prefetch(x: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < x.len() {
        // SAFETY: a prefetch only hints the cache; the address lies within `x`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                x.as_ptr().add(at).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, at);
}

/// `acc += a ⊙ b`, lane by lane, in fused multiply-adds (Rust never fuses a product and a
/// sum by itself; in the `simd_kernel!` copies, compiled with FMA, `mul_add` is one
/// instruction, half the arithmetic of a multiply and an add).
#[inline(always)]
fn fma(acc: &mut [f32; LANES], a: &[f32; LANES], b: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] = a[l].mul_add(b[l], acc[l]);
    }
}

/// `acc += a · b`, lane by lane (fused, as [`fma`]).
#[inline(always)]
fn axpy(acc: &mut [f32; LANES], a: f32, b: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] = a.mul_add(b[l], acc[l]);
    }
}

simd_kernel! {
/// `out[j] = x · s_j` for the rows `s_j` (each `x.len()` long) of `s`, `GROUP` at a time.
fn row_dots(out: &mut [f32], x: &[f32], s: &[f32]) {
    let k = x.len();
    let (xc, xt) = x.as_chunks::<LANES>();
    let mut j = 0;
    while j < out.len() {
        let g = (out.len() - j).min(GROUP);
        // A short group repeats its last row (computed, not stored).
        let rows: [&[f32]; GROUP] = std::array::from_fn(|q| {
            let jj = j + q.min(g - 1);
            &s[jj * k..(jj + 1) * k]
        });
        let [c0, c1, c2, c3] = rows.map(|r| r.as_chunks::<LANES>().0);
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for ((((xv, s0), s1), s2), s3) in xc.iter().zip(c0).zip(c1).zip(c2).zip(c3) {
            fma(&mut a0, xv, s0);
            fma(&mut a1, xv, s1);
            fma(&mut a2, xv, s2);
            fma(&mut a3, xv, s3);
        }
        let acc = [a0, a1, a2, a3];
        let whole = k - xt.len();
        for q in 0..g {
            let mut t: f32 = acc[q].iter().sum();
            for (&xv, &sv) in xt.iter().zip(&rows[q][whole..]) {
                t = xv.mul_add(sv, t);
            }
            out[j + q] = t;
        }
        j += g;
    }
}
}

/// `scale · x · sᵀ` for `x (n, k)` and `s (r, k)` row-major: `(n, r)`.
pub fn project(x: &[f32], k: usize, s: &[f32], scale: f32) -> Vec<f32> {
    let r = s.len() / k.max(1);
    let n = x.len() / k.max(1);
    let mut out = vec![0f32; n * r];
    if r == 0 || k == 0 {
        return out;
    }
    out.par_chunks_mut(r * ROWS_PER_TASK)
        .zip(x.par_chunks(k * ROWS_PER_TASK))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(r).zip(xs.chunks_exact(k)) {
                project_row(orow, xrow, s, scale);
            }
        });
    out
}

/// One row of [`project`]: `out (r) = scale · x · sᵀ` for `x (k)` and `s (r, k)`.
pub(super) fn project_row(out: &mut [f32], x: &[f32], s: &[f32], scale: f32) {
    row_dots(out, x, s);
    if scale != 1.0 {
        out.iter_mut().for_each(|v| *v *= scale);
    }
}

/// Rows of `x` [`gather`] sums in registers before adding into its output: enough for the
/// adds to vanish beside the products, few enough that a block's rows stay in L1.
const GATHER_ROWS: usize = 32;

/// Rows `i0 .. i1` of `x (·, k)`, columns `c0 + c ..` (`S` strips of `LANES`), against `h`'s
/// columns `j .. j + g` (`g ≤ WIDE`), added into `out (r, w)` at column `c`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gather_block<const S: usize>(
    out: &mut [f32],
    w: usize,
    x: &[f32],
    k: usize,
    (c0, c): (usize, usize),
    h: &[f32],
    r: usize,
    (i0, i1): (usize, usize),
    (j, g): (usize, usize),
) {
    // One array of WIDE accumulators per strip, named one by one: indexed in loops, LLVM
    // vectorised across them with gathers instead of keeping each in a register.
    let mut acc = [[[0f32; LANES]; WIDE]; 2];
    for i in i0..i1 {
        // The same columns a block of rows ahead: asked for now, there when that block runs.
        let ahead = (i + GATHER_ROWS) * k + c0 + c;
        for s in 0..S {
            prefetch(x, ahead + s * LANES);
        }
        let row = &x[i * k + c0 + c..][..S * LANES];
        let hs = &h[i * r + j..i * r + j + g];
        let hv: [f32; WIDE] = std::array::from_fn(|q| hs[q.min(g - 1)]);
        for (s, strip) in acc.iter_mut().enumerate().take(S) {
            let xv: &[f32; LANES] = row[s * LANES..][..LANES].try_into().expect("a strip");
            let [a0, a1, a2, a3, a4, a5, a6, a7] = strip;
            axpy(a0, hv[0], xv);
            axpy(a1, hv[1], xv);
            axpy(a2, hv[2], xv);
            axpy(a3, hv[3], xv);
            axpy(a4, hv[4], xv);
            axpy(a5, hv[5], xv);
            axpy(a6, hv[6], xv);
            axpy(a7, hv[7], xv);
        }
    }
    for (s, strip) in acc.iter().enumerate().take(S) {
        for (q, v) in strip.iter().enumerate().take(g) {
            let dst: &mut [f32; LANES] = (&mut out[(j + q) * w + c + s * LANES..][..LANES])
                .try_into()
                .expect("a strip");
            for l in 0..LANES {
                dst[l] += v[l];
            }
        }
    }
}

simd_kernel! {
/// Columns `c0 .. c0 + w` of `hᵀ · x` for `x (n, k)`, `h (n, r)`: `out (r, w)`, zeroed first.
/// Blocks of rows, each swept along its rows two strips at a time (a few streams of adjacent
/// lines the hardware prefetches, where a strip down all the rows waited on every line).
fn gather_part(out: &mut [f32], w: usize, x: &[f32], k: usize, c0: usize, h: &[f32], r: usize) {
    let n = h.len() / r;
    for i0 in (0..n).step_by(GATHER_ROWS) {
        let rows = (i0, (i0 + GATHER_ROWS).min(n));
        for j in (0..r).step_by(WIDE) {
            let cols = (j, (r - j).min(WIDE));
            let mut c = 0;
            while c + 2 * LANES <= w {
                gather_block::<2>(out, w, x, k, (c0, c), h, r, rows, cols);
                c += 2 * LANES;
            }
            if c + LANES <= w {
                gather_block::<1>(out, w, x, k, (c0, c), h, r, rows, cols);
                c += LANES;
            }
            for cc in c..w {
                for i in rows.0..rows.1 {
                    for jj in cols.0..cols.0 + cols.1 {
                        out[jj * w + cc] = h[i * r + jj].mul_add(x[i * k + c0 + cc], out[jj * w + cc]);
                    }
                }
            }
        }
    }
}
}

/// `hᵀ · x` for `x (n, k)` and `h (n, r)` row-major: `(r, k)`. The columns are split between
/// the threads (each sums over all the rows: no partial sums to add).
pub fn gather(x: &[f32], k: usize, h: &[f32], r: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * k];
    if r == 0 || k == 0 {
        return out;
    }
    let parts = (2 * rayon::current_num_threads()).clamp(1, k.div_ceil(2 * LANES));
    let width = k.div_ceil(parts).div_ceil(2 * LANES) * 2 * LANES;
    let sums: Vec<(usize, usize, Vec<f32>)> = (0..k.div_ceil(width))
        .into_par_iter()
        .map(|part| part * width)
        .map(|c0| {
            let w = width.min(k - c0);
            let mut part = vec![0f32; r * w];
            gather_part(&mut part, w, x, k, c0, h, r);
            (c0, w, part)
        })
        .collect();
    for (c0, w, part) in sums {
        for (dst, src) in out.chunks_exact_mut(k).zip(part.chunks_exact(w)) {
            dst[c0..c0 + w].copy_from_slice(src);
        }
    }
    out
}

simd_kernel! {
/// `y += h · s` for one row: `y (m)`, `h (r)`, `s (r, m)` row-major.
fn add_outer_row(y: &mut [f32], h: &[f32], s: &[f32]) {
    let m = y.len();
    let (yc, yt) = y.as_chunks_mut::<LANES>();
    let whole = yc.len() * LANES;
    for (ci, yv) in yc.iter_mut().enumerate() {
        let mut acc = *yv;
        for (j, &hv) in h.iter().enumerate() {
            let sv: &[f32; LANES] = s[j * m + ci * LANES..][..LANES]
                .try_into()
                .expect("a strip");
            axpy(&mut acc, hv, sv);
        }
        *yv = acc;
    }
    for (c, yv) in (whole..m).zip(yt) {
        for (j, &hv) in h.iter().enumerate() {
            *yv = hv.mul_add(s[j * m + c], *yv);
        }
    }
}
}

/// `y += h · s` in place for `y (n, m)`, `h (n, r)` and `s (r, m)` row-major.
pub fn add_outer(y: &mut [f32], m: usize, h: &[f32], s: &[f32]) {
    let r = s.len() / m.max(1);
    if r == 0 || m == 0 {
        return;
    }
    y.par_chunks_mut(m * ROWS_PER_TASK)
        .zip(h.par_chunks(r * ROWS_PER_TASK))
        .for_each(|(ys, hs)| {
            for (yrow, hrow) in ys.chunks_exact_mut(m).zip(hs.chunks_exact(r)) {
                add_outer_row(yrow, hrow, s);
            }
        });
}

/// [`add_outer`] on a tensor's storage: `y += h · s`, applied with `Tensor::inplace_op1` to a
/// contiguous f32 CPU tensor no one else holds.
pub struct AddOuter<'a> {
    pub h: &'a [f32],
    pub s: &'a [f32],
}

impl InplaceOp1 for AddOuter<'_> {
    fn name(&self) -> &'static str {
        "add-outer"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let m = layout.dims().last().copied().unwrap_or(0);
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                add_outer(&mut v[a..b], m, self.h, self.s);
                Ok(())
            }
            _ => candle_core::bail!("add-outer: expected a contiguous f32 CPU tensor"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::wave;
    use super::*;

    /// `a (n, k) · b (k, m)` in f64.
    fn reference(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * m];
        for i in 0..n {
            for p in 0..k {
                for j in 0..m {
                    out[i * m + j] += a[i * k + p] as f64 * b[p * m + j] as f64;
                }
            }
        }
        out
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows)
            .map(|i| a[(i % rows) * cols + i / rows])
            .collect()
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        let top = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= 1e-5 * top,
                "element {i}: {g} vs {w}"
            );
        }
    }

    /// Ragged shapes: ranks that do and do not fill a register group, widths with and
    /// without a partial SIMD strip, more rows than one parallel task.
    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (3, 16, 4),
        (70, 40, 5),
        (33, 576, 8),
        (100, 37, 16),
        (65, 48, 3),
    ];

    #[test]
    fn project_is_x_times_s_transposed() {
        for (n, k, r) in SHAPES {
            let (x, s) = (wave(n * k, 0.1), wave(r * k, 1.3));
            let want: Vec<f64> = reference(&x, &transpose(&s, r, k), n, k, r)
                .into_iter()
                .map(|v| v * 0.5)
                .collect();
            close(&project(&x, k, &s, 0.5), &want);
        }
    }

    #[test]
    fn gather_is_h_transposed_times_x() {
        for (n, k, r) in SHAPES {
            let (x, h) = (wave(n * k, 0.2), wave(n * r, 2.1));
            let want = reference(&transpose(&h, n, r), &x, r, n, k);
            close(&gather(&x, k, &h, r), &want);
        }
    }

    #[test]
    fn add_outer_adds_h_times_s() {
        for (n, m, r) in SHAPES {
            let (y0, h, s) = (wave(n * m, 0.3), wave(n * r, 0.7), wave(r * m, 1.9));
            let hs = reference(&h, &s, n, r, m);
            let want: Vec<f64> = y0.iter().zip(&hs).map(|(&y, &p)| y as f64 + p).collect();
            let mut y = y0.clone();
            add_outer(&mut y, m, &h, &s);
            close(&y, &want);
        }
    }
}
