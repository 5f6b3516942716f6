//! The frozen LM head, a tile of its rows at a time: the head weight may be stored in another
//! dtype than the model computes in (QLoRA keeps a half-precision checkpoint's embedding in its
//! 16 bits), and for a loss the `(rows, vocab)` logits never exist whole. At real scale they
//! would dominate a step's memory: 4,096 tokens × a 151,936-token vocabulary is 2.5 GB in f32,
//! and the unfused path keeps the logits and their gradient.
//!
//! [`frozen_head_logps`] streams over vocabulary tiles with a running maximum and sum (the
//! online softmax of flash attention). A row's log-probability depends on its own hidden state
//! only, so its gradient `∂ log p(t | h) / ∂h = W[t] − softmax(h · Wᵀ) · W` is accumulated in
//! the same pass and kept, `(rows, hidden)`; the backward scales it by the incoming gradient.
//! The GEMM work is that of the unfused path (the head forward, the `dlogits · W` backward),
//! only moved. A trainable head also needs `dW`; it takes the unfused path.
//!
//! Gemma 2 soft-caps its logits, `z' = c · tanh(z / c)`: the tiles are capped as they are made,
//! and the Jacobian carries the cap's derivative `1 − tanh²` of each logit.

use candle_core::{DType, Result, Tensor, D};

use super::attach::attach;
use super::Bf16Weight;
use crate::model::layers::f32_if_half;

/// Hidden-state rows per chunk.
const ROWS: usize = 256;
/// Vocabulary rows per tile: a 256 × 8,192 tile of logits is 8 MB in f32.
const VOCAB: usize = 8192;
/// Elements of one tile of logits (what the memory estimate counts a few of).
pub const HEAD_TILE_ELEMS: usize = ROWS * VOCAB;

/// A frozen head `w (vocab, hidden)` packed in bf16 for [`frozen_head_logps`], one
/// [`Bf16Weight`] per vocabulary tile.
pub fn pack_head_bf16(w: &Tensor) -> Result<Vec<Bf16Weight>> {
    let vocab = w.dim(0)?;
    (0..vocab)
        .step_by(VOCAB)
        .map(|j| Bf16Weight::new(&w.narrow(0, j, VOCAB.min(vocab - j))?))
        .collect()
}

/// `x (n, hidden) · wᵀ → (n, vocab)` for a frozen `w`, differentiable in `x`; `w` may be stored
/// in another dtype, converted a tile at a time.
pub fn frozen_head(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        return super::frozen_linear(x, w);
    }
    let w = w.detach();
    let dtype = x.dtype();
    let vocab = w.dim(0)?;
    let tile =
        move |j: usize| -> Result<Tensor> { w.narrow(0, j, VOCAB.min(vocab - j))?.to_dtype(dtype) };
    let xd = x.detach();
    let mut parts = Vec::new();
    for j in (0..vocab).step_by(VOCAB) {
        parts.push(xd.matmul(&tile(j)?.t()?)?);
    }
    let y0 = Tensor::cat(&parts, 1)?;
    let attached = attach("frozen-head", x, y0.clone(), move |_x, g| {
        let mut dx: Option<Tensor> = None;
        for j in (0..vocab).step_by(VOCAB) {
            let t = tile(j)?;
            let part = g.narrow(1, j, t.dim(0)?)?.matmul(&t)?;
            dx = Some(match dx {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        dx.ok_or_else(|| candle_core::Error::Msg("frozen-head: empty vocabulary".into()))
    })?;
    Ok(attached.unwrap_or(y0))
}

/// `log softmax(h · wᵀ)[r, targets[r]]` for each row `r` of `h (n, hidden)`, `(n, 1)` — in f32
/// when `h` is half precision, like the unfused path. Differentiable in `h` only; `w` is frozen
/// and may be stored in another dtype (each tile is converted once). `softcap` caps the logits
/// first (`c · tanh(z / c)`).
pub fn frozen_head_logps(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    bf16: Option<&[Bf16Weight]>,
) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    if n != targets.len() {
        candle_core::bail!("frozen-head-logps: {n} rows but {} targets", targets.len());
    }
    let w = w.detach();
    let hd = h.detach();
    let wants_grad = h.track_op();
    let dtype = h.dtype();
    let chunks: Vec<Tensor> = (0..n)
        .step_by(ROWS)
        .map(|s| hd.narrow(0, s, ROWS.min(n - s)))
        .collect::<Result<_>>()?;
    let mut states: Vec<Online> = chunks
        .iter()
        .map(|_| Online {
            state: None,
            softcap,
        })
        .collect();
    let vocab = w.dim(0)?;
    if bf16.is_some_and(|tiles| tiles.len() != vocab.div_ceil(VOCAB)) {
        candle_core::bail!("frozen-head-logps: the bf16 head has another number of tiles");
    }
    for (t, j) in (0..vocab).step_by(VOCAB).enumerate() {
        let wt = w.narrow(0, j, VOCAB.min(vocab - j))?.to_dtype(dtype)?;
        let packed = bf16.map(|tiles| &tiles[t]);
        for (hc, state) in chunks.iter().zip(&mut states) {
            state.add_tile(hc, &wt, packed, wants_grad)?;
        }
    }
    let mut logps = Vec::new();
    let mut jacobians = Vec::new();
    for (k, (hc, state)) in chunks.iter().zip(states).enumerate() {
        let s = k * ROWS;
        let t = Tensor::from_slice(&targets[s..s + hc.dim(0)?], hc.dim(0)?, h.device())?;
        let (logp, jacobian) = state.finish(hc, &w, &t, bf16.is_some())?;
        logps.push(logp);
        jacobians.extend(jacobian);
    }
    let logps = Tensor::cat(&logps, 0)?;
    if !wants_grad {
        return Ok(logps);
    }
    let jacobian = Tensor::cat(&jacobians, 0)?;
    let attached = attach("frozen-head-logps", h, logps.clone(), move |_h, g| {
        jacobian.broadcast_mul(&g.to_dtype(jacobian.dtype())?)
    })?;
    Ok(attached.unwrap_or(logps))
}

/// A chunk of rows' running maximum `m`, sum `s = Σ exp(z − m)` and, for the gradient,
/// `acc = Σ exp(z − m) · W_j` over the vocabulary tiles seen so far.
struct Online {
    state: Option<(Tensor, Tensor, Option<Tensor>)>,
    softcap: Option<f64>,
}

/// `(c · tanh(z / c), 1 − tanh²(z / c))`: capped logits and the cap's derivative.
fn capped(z: Tensor, cap: f64) -> Result<(Tensor, Tensor)> {
    let t = (z / cap)?.tanh()?;
    let slope = t.sqr()?.affine(-1.0, 1.0)?;
    Ok(((t * cap)?, slope))
}

impl Online {
    /// Adds a vocabulary tile `wt`, multiplied in bf16 on AMX tiles when `packed` is given.
    fn add_tile(
        &mut self,
        h: &Tensor,
        wt: &Tensor,
        packed: Option<&Bf16Weight>,
        jacobian: bool,
    ) -> Result<()> {
        let dtype = h.dtype();
        let ldtype = f32_if_half(dtype);
        let z = match packed {
            Some(p) => p.forward(h)?,
            None => h.matmul(&wt.t()?)?.to_dtype(ldtype)?,
        };
        let (z, slope) = match self.softcap {
            Some(cap) => {
                let (z, slope) = capped(z, cap)?;
                (z, Some(slope))
            }
            None => (z, None),
        };
        let m_prev = self.state.as_ref().map(|(m, _, _)| m);
        let (m, p, tile_sum) = if z.dtype() == DType::F32 && super::fused_for(&z) {
            shifted_exp_cpu(z, m_prev)?
        } else {
            let tile_max = z.max_keepdim(D::Minus1)?;
            let m = match m_prev {
                Some(m) => m.maximum(&tile_max)?,
                None => tile_max,
            };
            let p = z.broadcast_sub(&m)?.exp()?;
            let tile_sum = p.sum_keepdim(D::Minus1)?;
            (m, p, tile_sum)
        };
        let tile_acc = if jacobian {
            let p = match &slope {
                Some(slope) => (&p * slope)?,
                None => p,
            };
            Some(match packed {
                Some(w) => w.input_grad(&p)?,
                None => p.to_dtype(dtype)?.matmul(wt)?.to_dtype(ldtype)?,
            })
        } else {
            None
        };
        self.state = Some(match self.state.take() {
            None => (m, tile_sum, tile_acc),
            Some((m_old, s, acc)) => {
                let alpha = (m_old - &m)?.exp()?;
                let s = (s * &alpha)?.add(&tile_sum)?;
                let acc = match (acc, tile_acc) {
                    (Some(acc), Some(t)) => Some(acc.broadcast_mul(&alpha)?.add(&t)?),
                    _ => None,
                };
                (m, s, acc)
            }
        });
        Ok(())
    }

    /// The log-probabilities `(r, 1)` of `targets` and, when accumulated, their gradients with
    /// respect to the rows `(r, hidden)`. `bf16`: the tiles were bf16 products, so the target's
    /// logit is made of the same rounded operands (else a log-probability could exceed 0).
    fn finish(
        self,
        h: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        bf16: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let Some((m, s, acc)) = self.state else {
            candle_core::bail!("frozen-head-logps: empty vocabulary")
        };
        let ldtype = f32_if_half(h.dtype());
        let rounded = |t: Tensor| -> Result<Tensor> {
            if bf16 {
                t.to_dtype(DType::BF16)?.to_dtype(ldtype)
            } else {
                Ok(t)
            }
        };
        let mut w_target = rounded(w.index_select(targets, 0)?.to_dtype(ldtype)?)?;
        let mut target_logit =
            (rounded(h.to_dtype(ldtype)?)? * &w_target)?.sum_keepdim(D::Minus1)?;
        if let Some(cap) = self.softcap {
            let (z, slope) = capped(target_logit, cap)?;
            target_logit = z;
            w_target = w_target.broadcast_mul(&slope)?;
        }
        let logp = (target_logit - (m + s.log()?)?)?;
        let jacobian = match acc {
            Some(acc) => Some((w_target - acc.broadcast_div(&s)?)?.to_dtype(h.dtype())?),
            None => None,
        };
        Ok((logp, jacobian))
    }
}

/// `m = max(m_prev, rowmax(z))`, `p = exp(z − m)` and `Σ_j p` of an f32 tile on the CPU, in one
/// pass over its rows in parallel (candle's reductions and `exp` are one pass each, on one core),
/// vectorised (`rowwise::shifted_exp_row`) and in the tile's own buffer.
fn shifted_exp_cpu(z: Tensor, m_prev: Option<&Tensor>) -> Result<(Tensor, Tensor, Tensor)> {
    use rayon::prelude::*;
    let (r, v) = z.dims2()?;
    let dev = z.device().clone();
    // The tile is a fresh product: its buffer is taken over, not copied.
    let mut p = match super::attach::owned_cpu_storage(z) {
        Ok(candle_core::CpuStorage::F32(p)) => p,
        Ok(_) => candle_core::bail!("an f32 tile"),
        Err(z) => z.flatten_all()?.to_vec1::<f32>()?,
    };
    let prev = m_prev
        .map(|m| m.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let (m, s): (Vec<f32>, Vec<f32>) = p
        .par_chunks_mut(v)
        .enumerate()
        .map(|(i, row)| {
            let floor = prev.as_ref().map_or(f32::NEG_INFINITY, |prev| prev[i]);
            super::rowwise::shifted_exp_row(row, floor)
        })
        .unzip();
    Ok((
        Tensor::from_vec(m, (r, 1), &dev)?,
        Tensor::from_vec(p, (r, v), &dev)?,
        Tensor::from_vec(s, (r, 1), &dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    /// Normal-ish values from a fixed seed (the tests' bounds hold for these, not just usually).
    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.0 * shape.1;
        let v: Vec<f64> = (0..n)
            .map(|_| (0..12).map(|_| rng.gen::<f64>()).sum::<f64>() - 6.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// 300 rows and a 20,000-token vocabulary cross chunk and tile boundaries; the reference
    /// is the composed graph on the whole logits.
    #[test]
    fn matches_the_composed_log_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let (n, d, v) = (300, 8, 20_000);
        let h = Var::from_tensor(&randn((n, d), 1)).unwrap();
        let w = randn((v, d), 2);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
        let weights = randn((n, 1), 3);

        let ours = frozen_head_logps(h.as_tensor(), &w, &targets, None, None).unwrap();
        let tgt = Tensor::from_slice(&targets, (n, 1), &dev).unwrap();
        let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let reference = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(&tgt, 1)
            .unwrap();
        assert!(max_diff(&ours, &reference) < 1e-10);

        let loss = |x: &Tensor| (x * &weights).unwrap().sum_all().unwrap();
        let g = loss(&ours).backward().unwrap();
        let g_ref = loss(&reference).backward().unwrap();
        let (g, g_ref) = (
            g.get(h.as_tensor()).unwrap(),
            g_ref.get(h.as_tensor()).unwrap(),
        );
        assert!(max_diff(g_ref, &g_ref.zeros_like().unwrap()) > 0.1);
        assert!(max_diff(g, g_ref) < 1e-10);

        // The f32 CPU pass agrees with the f64 one.
        let h32 = Var::from_tensor(&h.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let ours32 = frozen_head_logps(h32.as_tensor(), &w32, &targets, None, None).unwrap();
        assert!(max_diff(&ours32, &reference) < 1e-4);
        let weights32 = weights.to_dtype(DType::F32).unwrap();
        let g32 = (ours32 * &weights32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // f32 sums over a 20,000-token vocabulary: relative to the largest gradient entry.
        let scale = max_diff(g_ref, &g_ref.zeros_like().unwrap());
        let d32 = max_diff(g32.get(h32.as_tensor()).unwrap(), g_ref);
        assert!(
            d32 < 2e-5 * scale,
            "f32 gradient off by {d32} (scale {scale})"
        );

        // bf16 products on AMX tiles, three vocabulary tiles: the log-probabilities of the
        // rounded operands (f64 reference), and a gradient within bf16's precision.
        if !super::super::amx_bf16::available() {
            eprintln!("bf16 part skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return;
        }
        let round = |t: &Tensor| -> Tensor {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let v: Vec<f64> = v
                .into_iter()
                .map(|x| super::super::amx_bf16::round_to_bf16(x) as f64)
                .collect();
            Tensor::from_vec(v, t.dims(), &dev).unwrap()
        };
        let packed = pack_head_bf16(&w32).unwrap();
        assert_eq!(packed.len(), 3);
        let h16 = Var::from_tensor(h32.as_tensor()).unwrap();
        let ours16 =
            frozen_head_logps(h16.as_tensor(), &w32, &targets, None, Some(&packed)).unwrap();
        let logits16 = round(h32.as_tensor())
            .matmul(&round(&w32).t().unwrap())
            .unwrap();
        let reference16 = candle_nn::ops::log_softmax(&logits16, D::Minus1)
            .unwrap()
            .gather(&tgt, 1)
            .unwrap();
        let d16 = max_diff(&ours16, &reference16);
        assert!(d16 < 1e-4, "bf16 log-probabilities off by {d16}");
        assert!(
            max_diff(&reference16, &reference) > 1e-4,
            "the rounding is real"
        );
        let g16 = (ours16 * &weights32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d16 = max_diff(g16.get(h16.as_tensor()).unwrap(), g_ref);
        assert!(
            d16 < 1e-2 * scale,
            "bf16 gradient off by {d16} (scale {scale})"
        );
    }

    /// A head stored in bf16 under an f32 model gives what the same head converted whole gives.
    #[test]
    fn a_head_in_another_dtype_is_converted_tile_by_tile() {
        let dev = Device::Cpu;
        let (n, d, v) = (5, 16, 10_000);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (v, d), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let targets: Vec<u32> = vec![0, 9_999, 8_192, 8_191, 17];

        let y = frozen_head(x.as_tensor(), &w).unwrap();
        let y_ref = x.as_tensor().matmul(&w32.t().unwrap()).unwrap();
        assert!(max_diff(&y, &y_ref) < 1e-5);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            max_diff(
                g.get(x.as_tensor()).unwrap(),
                g_ref.get(x.as_tensor()).unwrap()
            ) < 1e-2
        );

        let lp = frozen_head_logps(x.as_tensor(), &w, &targets, None, None).unwrap();
        let lp_ref = frozen_head_logps(x.as_tensor(), &w32, &targets, None, None).unwrap();
        assert_eq!(lp.dtype(), DType::F32);
        assert!(max_diff(&lp, &lp_ref) < 1e-4);
    }

    /// Soft-capped logits (Gemma 2): the composed `c · tanh(z / c)` graph is the reference.
    #[test]
    fn soft_capped_logits_match_the_composed_graph_and_its_gradient() {
        let dev = Device::Cpu;
        let (n, d, v, cap) = (7, 6, 9_000, 3.0);
        let h = Var::from_tensor(&randn((n, d), 4)).unwrap();
        let w = randn((v, d), 5);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 1237) % v as u32).collect();
        let ours = frozen_head_logps(h.as_tensor(), &w, &targets, Some(cap), None).unwrap();
        let z = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let z = ((z / cap).unwrap().tanh().unwrap() * cap).unwrap();
        let tgt = Tensor::from_slice(&targets, (n, 1), &dev).unwrap();
        let reference = candle_nn::ops::log_softmax(&z, D::Minus1)
            .unwrap()
            .gather(&tgt, 1)
            .unwrap();
        assert!(max_diff(&ours, &reference) < 1e-10);
        let uncapped = frozen_head_logps(h.as_tensor(), &w, &targets, None, None).unwrap();
        assert!(
            max_diff(&ours, &uncapped) > 0.1,
            "the cap changes the result"
        );
        let g = ours.sum_all().unwrap().backward().unwrap();
        let g_ref = reference.sum_all().unwrap().backward().unwrap();
        assert!(
            max_diff(
                g.get(h.as_tensor()).unwrap(),
                g_ref.get(h.as_tensor()).unwrap()
            ) < 1e-10
        );
    }
}
