//! Row-wise kernels with hand-written backward passes: the attention softmax (scale and mask
//! folded in), log-softmax + target gather (cross-entropy), and RMSNorm. Composed from candle
//! ops each of these is 5–10 full passes over its tensor forward and as many backward, every
//! one allocating; here each is one pass forward and one backward, over contiguous rows in
//! parallel. CPU only: other devices keep the composed versions (see `ops::fused`).

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

// ---------------------------------------------------------------------------------------------
// Attention softmax: softmax(scale · s + mask) over the last dim, with `mask (B, 1, T, Tk)`
// broadcast over the heads of `s (B, H, T, Tk)`.

struct MaskedSoftmax {
    scale: f64,
}

fn masked_softmax_rows<T: WithDType + Float>(
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
        .for_each(|(r, (o, x))| {
            let (b, q) = (r / (heads * t), r % t);
            let mask = &m[(b * t + q) * tk..(b * t + q + 1) * tk];
            let mut max = T::neg_infinity();
            for (oj, (&xj, &mj)) in o.iter_mut().zip(x.iter().zip(mask)) {
                *oj = xj * scale + mj;
                max = Float::max(max, *oj);
            }
            let mut sum = T::zero();
            for oj in o.iter_mut() {
                *oj = (*oj - max).exp();
                sum += *oj;
            }
            let inv = T::one() / sum;
            o.iter_mut().for_each(|oj| *oj *= inv);
        });
    out
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
                .for_each(|(o, (p, g))| {
                    let dot = p.iter().zip(g).fold(T::zero(), |a, (&p, &g)| a + p * g);
                    for (oj, (&pj, &gj)) in o.iter_mut().zip(p.iter().zip(g)) {
                        *oj = scale * pj * (gj - dot);
                    }
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
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
            let out: Vec<T> = x
                .par_chunks(v)
                .zip(self.targets.par_iter())
                .map(|(row, &t)| {
                    let max = row.iter().fold(T::neg_infinity(), |a, &b| Float::max(a, b));
                    let sum = row.iter().fold(T::zero(), |a, &b| a + (b - max).exp());
                    row[t as usize] - max - sum.ln()
                })
                .collect();
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, 1))))
        })
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = LogSoftmaxGatherBwd {
            targets: self.targets.clone(),
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
                .for_each(|((o, row), (&gr, &t))| {
                    let max = row.iter().fold(T::neg_infinity(), |a, &b| Float::max(a, b));
                    let mut sum = T::zero();
                    for (oj, &xj) in o.iter_mut().zip(row) {
                        *oj = (xj - max).exp();
                        sum += *oj;
                    }
                    let k = -gr / sum;
                    o.iter_mut().for_each(|oj| *oj *= k);
                    o[t as usize] += gr;
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

/// Log-probability of each row's target, `(n, 1)`: cross-entropy's per-token term.
pub fn log_softmax_gather(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(LogSoftmaxGather {
        targets: Arc::new(targets),
    })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) · w`.

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: WithDType + Float>(x: &[T], eps: f64) -> T {
    let ss = x.iter().fold(T::zero(), |a, &b| a + b * b);
    T::one() / (ss / T::from_f64(x.len() as f64) + T::from_f64(eps)).sqrt()
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
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .for_each(|(o, x)| {
                    let inv = inv_rms(x, self.eps);
                    for ((oj, &xj), &wj) in o.iter_mut().zip(x).zip(w) {
                        *oj = xj * inv * wj;
                    }
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
            let n = T::from_f64(d as f64);
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(d)
                .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                .for_each(|(o, (x, g))| {
                    let inv = inv_rms(x, self.eps);
                    let dot = x
                        .iter()
                        .zip(g)
                        .zip(w)
                        .fold(T::zero(), |a, ((&x, &g), &w)| a + g * w * x);
                    let k = inv * inv * inv * dot / n;
                    for (((oj, &xj), &gj), &wj) in o.iter_mut().zip(x).zip(g).zip(w) {
                        *oj = inv * gj * wj - xj * k;
                    }
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
            let mut dw = vec![T::zero(); d];
            for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                let inv = inv_rms(x, self.eps);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
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
        let x = rand_tensor(&[3, 2, 6], 5);
        let w = rand_tensor(&[6], 6);
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
        let x = rand_tensor(&[4, 9], 8);
        let w = rand_tensor(&[9], 9);
        let a = rms_norm(&x, &w, 1e-6).unwrap();
        let b = rms_norm(
            &x.to_dtype(candle_core::DType::F32).unwrap(),
            &w.to_dtype(candle_core::DType::F32).unwrap(),
            1e-6,
        )
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
    }
}
