//! Row-wise kernels with hand-written backward passes: the attention softmax (scale and mask
//! folded in), log-softmax + target gather (cross-entropy), RMSNorm, rotary embeddings (RoPE)
//! and the SwiGLU activation. Composed from candle ops each of these is several full passes
//! over its tensor forward and as many backward, every one allocating; here each is one pass
//! forward and one backward, over contiguous rows in parallel. CPU f32/f64 only: other devices
//! and dtypes keep the composed versions (see `ops::fused_for`). The hottest per-row loops are
//! compiled for AVX-512 and AVX2 + FMA too and dispatched at run time (`simd_kernel!`).

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use num_traits::{Float, Zero};
use rayon::prelude::*;

fn rows<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: expects a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    l.shape()
        .dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("row-wise op on a scalar".into()).bt())
}

/// Row `r` of a `(B, H, T, ·)` tensor reads row `(b, t)` of a `(B, 1, T, ·)` table broadcast
/// over the heads (attention mask, RoPE tables).
fn broadcast_row<T>(table: &[T], r: usize, heads: usize, t: usize, width: usize) -> &[T] {
    let row = r / (heads * t) * t + r % t;
    &table[row * width..(row + 1) * width]
}

/// A vector of `n` elements written by `fill` straight into fresh memory, with no zero-fill
/// first (a whole extra pass over an output the kernels overwrite anyway). `fill` must write
/// every element: its callers hand each element of the output to a kernel together with the
/// input elements of the same index, their inputs checked to be as long as the output.
fn written<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all `n` elements (its contract above).
    unsafe { v.set_len(n) };
    v
}

/// Dispatches a generic kernel on the storage's float type.
macro_rules! float_dispatch {
    ($s:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => bail!("{}: only f32 and f64 on the CPU", $name),
        }
    };
}

/// `exp` for the softmax-like kernels. libm's `expf` is a scalar call per element (and a slow
/// path for the masked entries that underflow); the f32 version here is branch-free arithmetic
/// that the compiler vectorises, accurate to about 2e-7 relative. f64 keeps libm's `exp`, so
/// the f64 gradient tests compare against exactly the composed ops.
pub(super) trait FastExp: Float {
    fn fast_exp(self) -> Self;
}

impl FastExp for f64 {
    #[inline]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

impl FastExp for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        // exp(x) = 2^n · exp(r) with n = round(x·log2 e) and r = x − n·ln 2 (|r| ≤ 0.35),
        // ln 2 split in two (Cody–Waite) so r stays exact; exp(r) by its degree-7 Taylor series.
        const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let x = self.clamp(-87.0, 88.0);
        let t = x * std::f32::consts::LOG2_E + ROUND;
        let n = t - ROUND;
        let r = (x - n * LN2_HI) - n * LN2_LO;
        // Horner's rule in fused multiply-adds: the callers are `simd_kernel!`s, compiled
        // with FMA, where `mul_add` is one instruction.
        let p = [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ]
        .iter()
        .fold(1.0 / 5040.0, |acc: f32, &c| acc.mul_add(r, c));
        // 2^n from `t`'s bits, whose low ones hold n (its exponent is ROUND's): integer
        // operations that vectorise, where `n as i32` (a saturating cast) is done lane by lane.
        let scale =
            f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
        // Below -87 the true value is under 1.7e-38: flush to zero like an underflow.
        if self < -87.0 {
            0.0
        } else {
            p * scale
        }
    }
}

/// Sum and maximum with eight independent accumulators: a plain fold is one long dependency
/// chain that the compiler may not reorder (and so not vectorise).
#[inline(always)]
fn lane_sum<T: Float>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = acc[i] + c[i];
        }
    }
    tail.iter()
        .fold(acc.iter().fold(T::zero(), |a, &b| a + b), |a, &b| a + b)
}

#[inline(always)]
fn lane_max<T: Float>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let m = acc
        .iter()
        .fold(T::neg_infinity(), |a, &b| if b > a { b } else { a });
    tail.iter().fold(m, |a, &b| if b > a { b } else { a })
}

/// `Σ a⊙b` with eight independent accumulators (see [`lane_sum`]).
#[inline(always)]
fn lane_dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ac.remainder().iter().zip(bc.remainder());
    for (a8, b8) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] = acc[i] + a8[i] * b8[i];
        }
    }
    tail.fold(lane_sum(&acc), |s, (&a, &b)| s + a * b)
}

/// `Σ a⊙b⊙c` with eight independent accumulators (see [`lane_sum`]).
#[inline(always)]
fn lane_dot3<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ac, bc, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let tail = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .zip(cc.remainder());
    for ((a8, b8), c8) in ac.zip(bc).zip(cc) {
        for i in 0..8 {
            acc[i] = acc[i] + a8[i] * b8[i] * c8[i];
        }
    }
    tail.fold(lane_sum(&acc), |s, ((&a, &b), &c)| s + a * b * c)
}

simd_kernel! {
/// `log Σ exp(row)` without keeping the exponentials (a small buffer at a time).
fn log_sum_exp<T: FastExp>(row: &[T]) -> T {
    let max = lane_max(row);
    let mut buf = [T::zero(); 256];
    let mut sum = T::zero();
    for c in row.chunks(256) {
        for (b, &x) in buf.iter_mut().zip(c) {
            *b = (x - max).fast_exp();
        }
        sum = sum + lane_sum(&buf[..c.len()]);
    }
    max + sum.ln()
}
}

simd_kernel! {
/// `row ← exp(row − m)` in place for `m = max(floor, max(row))`; `(m, Σ exp(row − m))` (a tile
/// of the LM head's online log-sum-exp).
pub(super) fn shifted_exp_row(row: &mut [f32], floor: f32) -> (f32, f32) {
    let m = lane_max(row).max(floor);
    for x in row.iter_mut() {
        *x = (*x - m).fast_exp();
    }
    (m, lane_sum(row))
}
}

// ---------------------------------------------------------------------------------------------
// Attention softmax: softmax(scale · s + mask) over the last dim, with `mask (B, 1, T, Tk)`
// broadcast over the heads of `s (B, H, T, Tk)`.

struct MaskedSoftmax {
    scale: f64,
}

fn masked_softmax_rows<T: WithDType + FastExp>(
    s: &[T],
    m: &[T],
    heads: usize,
    t: usize,
    tk: usize,
    scale: f64,
) -> Vec<T> {
    let mut out = vec![T::zero(); s.len()];
    let scale = T::from_f64(scale);
    out.par_chunks_mut(tk)
        .zip(s.par_chunks(tk))
        .enumerate()
        .for_each(|(r, (o, x))| softmax_row(o, x, broadcast_row(m, r, heads, t, tk), scale));
    out
}

/// The keys a row of an additive attention mask sees, from its first visible key to its last.
/// A key outside the span is masked (the model's masks add −1e9; anything below −1e8 counts
/// here), so its probability is exactly 0 in a row that sees any key: `exp` of −1e9 − max is 0
/// in f32 and f64. A row that sees no key keeps all of them, as the unmasked softmax does.
pub(super) fn visible_keys<T: Float>(mask: &[T]) -> std::ops::Range<usize> {
    let hidden = T::from(-1e8).unwrap_or_else(T::min_value);
    match mask.iter().position(|&m| m > hidden) {
        Some(lo) => lo..mask.iter().rposition(|&m| m > hidden).unwrap_or(lo) + 1,
        None => 0..mask.len(),
    }
}

/// One row of the attention softmax, `o = softmax(scale · x + mask)`, computed over the row's
/// [`visible_keys`] only (exactly 0 elsewhere): a causal row skips the keys after it, half the
/// work of a square pass.
pub(super) fn softmax_row<T: FastExp>(o: &mut [T], x: &[T], mask: &[T], scale: T) {
    let std::ops::Range { start: lo, end: hi } = visible_keys(mask);
    o[..lo].fill(T::zero());
    o[hi..].fill(T::zero());
    softmax_span(&mut o[lo..hi], &x[lo..hi], &mask[lo..hi], scale)
}

simd_kernel! {
/// `o = softmax(scale · x + mask)`.
fn softmax_span<T: FastExp>(o: &mut [T], x: &[T], mask: &[T], scale: T) {
    for (oj, (&xj, &mj)) in o.iter_mut().zip(x.iter().zip(mask)) {
        *oj = xj * scale + mj;
    }
    let max = lane_max(o);
    for oj in o.iter_mut() {
        *oj = (*oj - max).fast_exp();
    }
    let inv = T::one() / lane_sum(o);
    o.iter_mut().for_each(|oj| *oj = *oj * inv);
}
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, tk) = l1.shape().dims4()?;
        if l2.shape().dims4()? != (b, 1, t, tk) {
            bail!(
                "masked-softmax: mask {:?} does not fit scores {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        float_dispatch!(s1, self.name(), |T| {
            let out = masked_softmax_rows::<T>(
                rows(s1, l1, self.name())?,
                rows(s2, l2, self.name())?,
                h,
                t,
                tk,
                self.scale,
            );
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _m: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// The gradient of the scores of `p = softmax(scale · scores + mask)`, `scale · p ⊙ (g − Σ g⊙p)`
/// per row, for a constant `p` and `g` (no graph).
pub(crate) fn softmax_backward(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    p.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd { scale })
}

/// `scale · p ⊙ (g − Σ g⊙p)` per row.
struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        float_dispatch!(s1, self.name(), |T| {
            let p = rows::<T>(s1, l1, self.name())?;
            let g = rows::<T>(s2, l2, self.name())?;
            let scale = T::from_f64(self.scale);
            let mut out = vec![T::zero(); p.len()];
            out.par_chunks_mut(d)
                .zip(p.par_chunks(d).zip(g.par_chunks(d)))
                .for_each(|(o, (p, g))| softmax_bwd_row(o, p, g, scale));
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

simd_kernel! {
/// One row of the softmax's backward: `o = scale · p ⊙ (g − Σ g⊙p)`.
pub(super) fn softmax_bwd_row<T: Float>(o: &mut [T], p: &[T], g: &[T], scale: T) {
    let dot = lane_dot(p, g);
    for (oj, (&pj, &gj)) in o.iter_mut().zip(p.iter().zip(g)) {
        *oj = scale * pj * (gj - dot);
    }
}
}

/// `softmax(scale · scores + mask)` over the last dim; `mask` is constant.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, MaskedSoftmax { scale })
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy: log-softmax of each row of `logits (n, V)` at its target, `(n, 1)`.

struct LogSoftmaxGather {
    targets: Arc<Vec<u32>>,
    /// Each row's log-sum-exp from the forward pass, for the backward.
    lse: std::sync::Mutex<Arc<Vec<f64>>>,
}

impl CustomOp1 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "log-softmax-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l.shape().dims2()?;
        if n != self.targets.len() {
            bail!(
                "log-softmax-gather: {n} rows but {} targets",
                self.targets.len()
            );
        }
        float_dispatch!(s, self.name(), |T| {
            let x = rows::<T>(s, l, self.name())?;
            let lse: Vec<T> = x.par_chunks(v).map(log_sum_exp).collect();
            let out: Vec<T> = lse
                .iter()
                .zip(self.targets.iter())
                .enumerate()
                .map(|(r, (&lse, &t))| x[r * v + t as usize] - lse)
                .collect();
            if let Ok(mut keep) = self.lse.lock() {
                *keep = Arc::new(lse.iter().map(|x| x.to_f64()).collect());
            }
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, 1))))
        })
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let lse = self
            .lse
            .lock()
            .map(|l| l.clone())
            .map_err(|_| candle_core::Error::Msg("log-softmax-gather: poisoned".into()))?;
        if lse.len() != self.targets.len() {
            bail!("log-softmax-gather: backward before forward");
        }
        let op = LogSoftmaxGatherBwd {
            targets: self.targets.clone(),
            lse,
        };
        Ok(Some(
            logits
                .contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &op)?,
        ))
    }
}

/// `g_r · (onehot(t_r) − softmax(row_r))`.
struct LogSoftmaxGatherBwd {
    targets: Arc<Vec<u32>>,
    lse: Arc<Vec<f64>>,
}

impl CustomOp2 for LogSoftmaxGatherBwd {
    fn name(&self) -> &'static str {
        "log-softmax-gather-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        float_dispatch!(s1, self.name(), |T| {
            let x = rows::<T>(s1, l1, self.name())?;
            let g = rows::<T>(s2, l2, self.name())?;
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(v)
                .zip(x.par_chunks(v))
                .zip(g.par_iter().zip(self.targets.par_iter()))
                .zip(self.lse.par_iter())
                .for_each(|(((o, row), (&gr, &t)), &lse)| {
                    log_softmax_bwd_row(o, row, gr, T::from_f64(lse));
                    o[t as usize] += gr;
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

simd_kernel! {
/// `o = −g · softmax(row)`, the softmax given by the row's log-sum-exp.
fn log_softmax_bwd_row<T: FastExp>(o: &mut [T], row: &[T], g: T, lse: T) {
    for (oj, &xj) in o.iter_mut().zip(row) {
        *oj = -g * (xj - lse).fast_exp();
    }
}
}

/// Log-probability of each row's target, `(n, 1)`: cross-entropy's per-token term.
pub fn log_softmax_gather(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(LogSoftmaxGather {
        targets: Arc::new(targets),
        lse: Default::default(),
    })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) · w`.

struct RmsNorm {
    eps: f64,
}

#[inline(always)]
fn inv_rms<T: Float>(x: &[T], eps: T) -> T {
    let ss = lane_dot(x, x);
    T::one() / (ss / T::from(x.len()).unwrap_or_else(T::one) + eps).sqrt()
}

simd_kernel! {
/// One row of RMSNorm: `o = x · inv_rms(x) ⊙ w` (every element of `o` written).
fn rms_norm_row<T: Float>(o: &mut [MaybeUninit<T>], x: &[T], w: &[T], eps: T) {
    let inv = inv_rms(x, eps);
    for ((oj, &xj), &wj) in o.iter_mut().zip(x).zip(w) {
        oj.write(xj * inv * wj);
    }
}
}

simd_kernel! {
/// One row of RMSNorm's input gradient: `o = inv · g⊙w − x · inv³ · Σ(g⊙w⊙x) / d` (every
/// element of `o` written).
fn rms_norm_bwd_row<T: Float>(o: &mut [MaybeUninit<T>], x: &[T], g: &[T], w: &[T], eps: T) {
    let inv = inv_rms(x, eps);
    let dot = lane_dot3(g, w, x);
    let k = inv * inv * inv * dot / T::from(x.len()).unwrap_or_else(T::one);
    for (((oj, &xj), &gj), &wj) in o.iter_mut().zip(x).zip(g).zip(w) {
        oj.write(inv * (gj * wj) - xj * k);
    }
}
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        if l2.shape().elem_count() != d {
            bail!(
                "rms-norm: weight {:?} does not fit {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        float_dispatch!(s1, self.name(), |T| {
            let x = rows::<T>(s1, l1, self.name())?;
            let w = rows::<T>(s2, l2, self.name())?;
            let eps = T::from_f64(self.eps);
            let out = written(x.len(), |out| {
                out.par_chunks_mut(d)
                    .zip(x.par_chunks(d))
                    .for_each(|(o, x)| rms_norm_row(o, x, w, eps))
            });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, g) = (x.contiguous()?, g.contiguous()?);
        let w = w.contiguous()?;
        let dx = x.apply_op3_no_bwd(&w, &g, &RmsNormBwdX { eps: self.eps })?;
        // The weight's gradient only when something trains it (full fine-tuning).
        let dw = if w.track_op() {
            Some(
                x.apply_op2_no_bwd(&g, &RmsNormBwdW { eps: self.eps })?
                    .reshape(w.shape())?,
            )
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// `dx = inv · (g⊙w) − x · inv³ · Σ(g⊙w⊙x) / d` per row.
struct RmsNormBwdX {
    eps: f64,
}

impl CustomOp3 for RmsNormBwdX {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-x"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        float_dispatch!(s1, self.name(), |T| {
            let x = rows::<T>(s1, l1, self.name())?;
            let w = rows::<T>(s2, l2, self.name())?;
            let g = rows::<T>(s3, l3, self.name())?;
            let eps = T::from_f64(self.eps);
            let out = written(x.len(), |out| {
                out.par_chunks_mut(d)
                    .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                    .for_each(|(o, (x, g))| rms_norm_bwd_row(o, x, g, w, eps))
            });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

/// `dw = Σ_rows g ⊙ x · inv`.
struct RmsNormBwdW {
    eps: f64,
}

impl CustomOp2 for RmsNormBwdW {
    fn name(&self) -> &'static str {
        "rms-norm-bwd-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1)?;
        float_dispatch!(s1, self.name(), |T| {
            let x = rows::<T>(s1, l1, self.name())?;
            let g = rows::<T>(s2, l2, self.name())?;
            let eps = T::from_f64(self.eps);
            let mut dw = vec![T::zero(); d];
            for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                let inv = inv_rms(x, eps);
                for ((a, &xj), &gj) in dw.iter_mut().zip(x).zip(g) {
                    *a += gj * xj * inv;
                }
            }
            Ok((T::to_cpu_storage_owned(dw), Shape::from(d)))
        })
    }
}

/// RMSNorm of `x` over its last dim with weight `w (d,)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding: `x · cos + rotate_half(x) · sin` for `x (B, H, T, D)` and tables
// `(B, 1, T, D)` broadcast over the heads. The backward is the inverse rotation.

struct Rope {
    inverse: bool,
}

fn rope_rows<T: WithDType + Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    heads: usize,
    t: usize,
    d: usize,
    inverse: bool,
) -> Vec<T> {
    let h = d / 2;
    written(x.len(), |out| {
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(r, (o, x))| {
                let c = broadcast_row(cos, r, heads, t, d);
                let s = broadcast_row(sin, r, heads, t, d);
                rope_row(o, x, c, s, h, inverse);
            })
    })
}

simd_kernel! {
/// One row of the rotation (`inverse`: its transpose, the backward) over halves of `h`.
fn rope_row<T: Float>(
    o: &mut [MaybeUninit<T>],
    x: &[T],
    c: &[T],
    s: &[T],
    h: usize,
    inverse: bool,
) {
    let (o1, o2) = o.split_at_mut(h);
    let (x1, x2) = x.split_at(h);
    let (c1, c2) = c.split_at(h);
    let (s1, s2) = s.split_at(h);
    let (o2, x2, c2, s2) = (&mut o2[..h], &x2[..h], &c2[..h], &s2[..h]);
    if inverse {
        // Transpose of the rotation: dx[i] = g[i]c[i] + g[i+h]s[i+h], dx[i+h] = g[i+h]c[i+h] − g[i]s[i].
        for i in 0..h {
            o1[i].write(x1[i] * c1[i] + x2[i] * s2[i]);
            o2[i].write(x2[i] * c2[i] - x1[i] * s1[i]);
        }
    } else {
        for i in 0..h {
            o1[i].write(x1[i] * c1[i] - x2[i] * s1[i]);
            o2[i].write(x2[i] * c2[i] + x1[i] * s2[i]);
        }
    }
}
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = l1.shape().dims4()?;
        if l2.shape().dims4()? != (b, 1, t, d) || l3.shape() != l2.shape() || d % 2 != 0 {
            bail!("rope: tables {:?} do not fit {:?}", l2.shape(), l1.shape());
        }
        float_dispatch!(s1, self.name(), |T| {
            let out = rope_rows::<T>(
                rows(s1, l1, self.name())?,
                rows(s2, l2, self.name())?,
                rows(s3, l3, self.name())?,
                h,
                t,
                d,
                self.inverse,
            );
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary position embedding of `x (B, H, T, D)` with `cos`, `sin` of shape `(B, 1, T, D)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: `silu(gate) ⊙ up`.

/// The gate's activation in a gated MLP: `act(gate) ⊙ up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateAct {
    /// `silu` (SwiGLU: Llama, Mistral, Qwen).
    Silu,
    /// `gelu` with the tanh approximation (GeGLU: Gemma). candle's own `gelu` backward uses
    /// six-digit constants, about 1e-6 off the derivative of its forward.
    GeluTanh,
}

struct Glu(GateAct);

#[inline(always)]
fn sigmoid<T: FastExp>(x: T) -> T {
    T::one() / (T::one() + (-x).fast_exp())
}

/// `(act(a), act'(a))`.
#[inline(always)]
fn act_and_slope<T: FastExp>(act: GateAct, a: T) -> (T, T) {
    match act {
        GateAct::Silu => {
            let s = sigmoid(a);
            (a * s, s * (T::one() + a * (T::one() - s)))
        }
        GateAct::GeluTanh => {
            let half = T::from(0.5).unwrap();
            let c = T::from(0.797_884_560_802_865_4).unwrap(); // √(2/π)
            let k = T::from(0.044_715).unwrap();
            let inner = c * a * (T::one() + k * a * a);
            let t = inner.tanh();
            let d_inner = c * (T::one() + T::from(3.0).unwrap() * k * a * a);
            (
                half * a * (T::one() + t),
                half * (T::one() + t) + half * a * (T::one() - t * t) * d_inner,
            )
        }
    }
}

/// Elements per rayon task in the element-wise kernels: one task per element (rayon's default
/// split of `par_iter`) leaves the loop unvectorised and the scheduler busy.
const ELEMENTS_PER_TASK: usize = 4096;

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        match self.0 {
            GateAct::Silu => "swiglu",
            GateAct::GeluTanh => "geglu",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "{}: gate {:?} and up {:?} differ",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let act = self.0;
        float_dispatch!(s1, self.name(), |T| {
            let g = rows::<T>(s1, l1, self.name())?;
            let u = rows::<T>(s2, l2, self.name())?;
            let out = written(g.len(), |out| {
                out.par_chunks_mut(ELEMENTS_PER_TASK)
                    .zip(g.par_chunks(ELEMENTS_PER_TASK))
                    .zip(u.par_chunks(ELEMENTS_PER_TASK))
                    .for_each(|((out, g), u)| glu_span(act, out, g, u))
            });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &g.contiguous()?,
            &GluBwd(self.0),
        )?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

simd_kernel! {
/// `o = act(g) ⊙ u`, one loop per activation so that each stays vectorised.
fn glu_span<T: FastExp>(act: GateAct, o: &mut [MaybeUninit<T>], g: &[T], u: &[T]) {
    match act {
        GateAct::Silu => {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                o.write(g * sigmoid(g) * u);
            }
        }
        GateAct::GeluTanh => {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                o.write(act_and_slope(GateAct::GeluTanh, g).0 * u);
            }
        }
    }
}
}

simd_kernel! {
/// `da = g ⊙ u ⊙ act'(a)`, `du = g ⊙ act(a)`, one loop per activation.
fn glu_bwd_span<T: FastExp>(
    act: GateAct,
    da: &mut [MaybeUninit<T>],
    du: &mut [MaybeUninit<T>],
    a: &[T],
    u: &[T],
    g: &[T],
) {
    let n = da.len();
    let (du, a, u, g) = (&mut du[..n], &a[..n], &u[..n], &g[..n]);
    match act {
        GateAct::Silu => {
            for i in 0..n {
                let (y, slope) = act_and_slope(GateAct::Silu, a[i]);
                du[i].write(g[i] * y);
                da[i].write(g[i] * u[i] * slope);
            }
        }
        GateAct::GeluTanh => {
            for i in 0..n {
                let (y, slope) = act_and_slope(GateAct::GeluTanh, a[i]);
                du[i].write(g[i] * y);
                da[i].write(g[i] * u[i] * slope);
            }
        }
    }
}
}

/// Both input gradients in one pass, stacked `(2, …)`: `g ⊙ up ⊙ act'(gate)` and `g ⊙ act(gate)`.
struct GluBwd(GateAct);

impl CustomOp3 for GluBwd {
    fn name(&self) -> &'static str {
        "glu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            bail!(
                "glu-bwd: gate {:?}, up {:?} and gradient {:?} differ",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        float_dispatch!(s1, self.name(), |T| {
            let a = rows::<T>(s1, l1, self.name())?;
            let u = rows::<T>(s2, l2, self.name())?;
            let g = rows::<T>(s3, l3, self.name())?;
            let n = a.len();
            let out = written(2 * n, |out| {
                let (da, du) = out.split_at_mut(n);
                da.par_chunks_mut(ELEMENTS_PER_TASK)
                    .zip(du.par_chunks_mut(ELEMENTS_PER_TASK))
                    .zip(a.par_chunks(ELEMENTS_PER_TASK))
                    .zip(u.par_chunks(ELEMENTS_PER_TASK))
                    .zip(g.par_chunks(ELEMENTS_PER_TASK))
                    .for_each(|((((da, du), a), u), g)| glu_bwd_span(act, da, du, a, u, g))
            });
            let mut dims = vec![2];
            dims.extend_from_slice(l1.shape().dims());
            Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
        })
    }
}

/// `silu(gate) ⊙ up`, the Llama MLP's gated activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Glu(GateAct::Silu))
}

/// `gelu_tanh(gate) ⊙ up`, the Gemma MLP's gated activation, with an exact backward (in f32 and
/// f64 on the CPU; other devices and dtypes use candle's `gelu`).
pub fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Glu(GateAct::GeluTanh))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_diff;
    use super::*;
    use candle_core::{DType, Device, Var, D};
    use rand::{Rng, SeedableRng};

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks the op's gradient against central differences of `f` (a scalar function of the
    /// input) at every entry.
    fn check_fd(x0: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
        let x = Var::from_tensor(x0).unwrap();
        let g = f(x.as_tensor()).backward().unwrap();
        let g = g.get(x.as_tensor()).expect("gradient reaches the input");
        let flat: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let grad: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-6;
        for i in 0..flat.len() {
            let at = |d: f64| {
                let mut v = flat.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, x0.shape(), &Device::Cpu).unwrap();
                f(&t).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "entry {i}: {fd} vs {}",
                grad[i]
            );
        }
    }

    /// A fixed, non-trivial weighting so each output entry matters differently.
    fn weigh(y: &Tensor, seed: u64) -> Tensor {
        let w = rand_tensor(y.dims(), seed);
        (y * w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn masked_softmax_matches_composed_and_finite_differences() {
        let s = rand_tensor(&[2, 3, 4, 5], 1);
        let mut m = vec![0f64; 2 * 4 * 5];
        for b in 0..2 {
            for i in 0..4 {
                for j in 0..5 {
                    if j > i + 1 || (b == 1 && j == 0) {
                        m[(b * 4 + i) * 5 + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (2, 1, 4, 5), &Device::Cpu).unwrap();
        let fused = masked_softmax(&s, &mask, 0.7).unwrap();
        let composed =
            crate::model::softmax(&(&s * 0.7).unwrap().broadcast_add(&mask).unwrap()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-14);
        check_fd(&s, |x| weigh(&masked_softmax(x, &mask, 0.7).unwrap(), 2));
    }

    #[test]
    fn log_softmax_gather_matches_composed_and_finite_differences() {
        let x = rand_tensor(&[5, 7], 3);
        let targets = vec![0u32, 6, 3, 3, 1];
        let fused = log_softmax_gather(&x, targets.clone()).unwrap();
        let idx = Tensor::from_slice(&targets, (5, 1), &Device::Cpu).unwrap();
        let composed = crate::model::log_softmax(&x)
            .unwrap()
            .gather(&idx, 1)
            .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-14);
        check_fd(&x, |x| {
            weigh(&log_softmax_gather(x, targets.clone()).unwrap(), 4)
        });
    }

    #[test]
    fn rms_norm_matches_composed_and_finite_differences_in_x_and_w() {
        // Rows of 21: whole vectors of f64 and a ragged tail.
        let x = rand_tensor(&[3, 2, 21], 5);
        let w = rand_tensor(&[21], 6);
        let eps = 1e-5;
        let composed = |x: &Tensor, w: &Tensor| {
            let inv = ((x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
                .unwrap()
                .sqrt()
                .unwrap())
            .recip()
            .unwrap();
            x.broadcast_mul(&inv).unwrap().broadcast_mul(w).unwrap()
        };
        assert!(max_diff(&rms_norm(&x, &w, eps).unwrap(), &composed(&x, &w)) < 1e-14);
        check_fd(&x, |x| weigh(&rms_norm(x, &w, eps).unwrap(), 7));
        check_fd(&w, |w| weigh(&rms_norm(&x, w, eps).unwrap(), 7));
        // A frozen weight gets no gradient computed.
        let xv = Var::from_tensor(&x).unwrap();
        let g = weigh(&rms_norm(xv.as_tensor(), &w, eps).unwrap(), 7)
            .backward()
            .unwrap();
        assert!(g.get(&w).is_none());
    }

    #[test]
    fn f32_rows_match_f64() {
        // Rows of 37 and 100: whole AVX-512 vectors and a ragged tail in every kernel.
        type Inputs<'a> = &'a [&'a Tensor];
        type Case = (&'static str, Vec<Tensor>, Box<dyn Fn(Inputs) -> Tensor>);
        let cases: Vec<Case> = vec![
            (
                "rms_norm",
                vec![rand_tensor(&[5, 100], 8), rand_tensor(&[100], 9)],
                Box::new(|t: Inputs| rms_norm(t[0], t[1], 1e-6).unwrap()),
            ),
            (
                "swiglu",
                vec![rand_tensor(&[3, 37], 20), rand_tensor(&[3, 37], 21)],
                Box::new(|t: Inputs| swiglu(t[0], t[1]).unwrap()),
            ),
            (
                "geglu",
                vec![rand_tensor(&[3, 37], 22), rand_tensor(&[3, 37], 23)],
                Box::new(|t: Inputs| geglu(t[0], t[1]).unwrap()),
            ),
            (
                "rope",
                vec![rand_tensor(&[1, 2, 3, 74], 24)],
                Box::new(|t: Inputs| {
                    let cos = rand_tensor(&[1, 1, 3, 74], 25)
                        .to_dtype(t[0].dtype())
                        .unwrap();
                    let sin = rand_tensor(&[1, 1, 3, 74], 26)
                        .to_dtype(t[0].dtype())
                        .unwrap();
                    rope(t[0], &cos, &sin).unwrap()
                }),
            ),
        ];
        for (name, inputs, f) in cases {
            let run = |dtype| {
                let vars: Vec<Var> = inputs
                    .iter()
                    .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                    .collect();
                let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                let y = f(&ts);
                let grads = weigh(&y.to_dtype(DType::F64).unwrap(), 27)
                    .backward()
                    .unwrap();
                let mut out = vec![y.to_dtype(DType::F64).unwrap()];
                out.extend(
                    ts.iter()
                        .map(|t| grads.get(t).unwrap().to_dtype(DType::F64).unwrap()),
                );
                out
            };
            for (i, (a, b)) in run(DType::F64).iter().zip(run(DType::F32)).enumerate() {
                let d = max_diff(a, &b);
                assert!(
                    d < 2e-5,
                    "{name}, {}: f32 off by {d}",
                    ["value", "gradient 0", "gradient 1"][i]
                );
            }
        }
    }

    #[test]
    fn rope_matches_composed_and_finite_differences() {
        // Halves of 11: a whole vector of f64 and a ragged tail.
        let x = rand_tensor(&[2, 3, 4, 22], 10);
        let cos = rand_tensor(&[2, 1, 4, 22], 11);
        let sin = rand_tensor(&[2, 1, 4, 22], 12);
        let half = |x: &Tensor| {
            let a = x.narrow(D::Minus1, 0, 11).unwrap();
            let b = x.narrow(D::Minus1, 11, 11).unwrap();
            Tensor::cat(&[&b.neg().unwrap(), &a], D::Minus1).unwrap()
        };
        let composed =
            (x.broadcast_mul(&cos).unwrap() + half(&x).broadcast_mul(&sin).unwrap()).unwrap();
        assert!(max_diff(&rope(&x, &cos, &sin).unwrap(), &composed) < 1e-14);
        check_fd(&x, |x| weigh(&rope(x, &cos, &sin).unwrap(), 13));
    }

    #[test]
    fn swiglu_matches_composed_and_finite_differences_in_both_inputs() {
        let a = rand_tensor(&[3, 13], 14);
        let u = rand_tensor(&[3, 13], 15);
        let composed = (a.silu().unwrap() * &u).unwrap();
        assert!(max_diff(&swiglu(&a, &u).unwrap(), &composed) < 1e-14);
        check_fd(&a, |a| weigh(&swiglu(a, &u).unwrap(), 16));
        check_fd(&u, |u| weigh(&swiglu(&a, u).unwrap(), 16));
    }

    #[test]
    fn geglu_matches_composed_and_finite_differences_in_both_inputs() {
        let a = rand_tensor(&[3, 13], 17);
        let u = rand_tensor(&[3, 13], 18);
        let composed = (a.gelu().unwrap() * &u).unwrap();
        assert!(max_diff(&geglu(&a, &u).unwrap(), &composed) < 1e-14);
        check_fd(&a, |a| weigh(&geglu(a, &u).unwrap(), 19));
        check_fd(&u, |u| weigh(&geglu(&a, u).unwrap(), 19));
        // The slope to 1e-9 (fourth-order differences), where candle's `gelu` backward is ~1e-6 off.
        for i in -40..=40 {
            let x = i as f64 / 10.0;
            let f = |d: f64| act_and_slope(GateAct::GeluTanh, x + d).0;
            let h = 1e-3;
            let fd = (8.0 * (f(h) - f(-h)) - (f(2.0 * h) - f(-2.0 * h))) / (12.0 * h);
            let slope = act_and_slope(GateAct::GeluTanh, x).1;
            assert!((slope - fd).abs() < 1e-9, "x = {x}: {slope} vs {fd}");
        }
    }

    #[test]
    fn fast_exp_f32_is_accurate_and_flushes_underflow() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = (x as f32).fast_exp() as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!((-1e9f32).fast_exp(), 0.0);
        assert_eq!((-100f32).fast_exp(), 0.0);
        assert_eq!(0f32.fast_exp(), 1.0);
    }
}
