//! Scaled dot-product attention as one graph node that keeps only its inputs: the backward
//! recomputes the scores and probabilities from `q` and `k` (as flash attention's does). Composed
//! from candle ops, the graph would keep the scores and the probabilities of every layer,
//! `heads × n × total` each — at 4,096 tokens, 9 heads, 600 MB per layer and sequence, against
//! the few megabytes of `q`, `k`, `v`. The recomputation costs one `q·kᵀ` product and a softmax
//! per layer, a few percent of a step.
//!
//! In f32 on the CPU (no soft cap) both passes run on `attention_blocks`: a block of query rows
//! at a time, its products stopping at the block's last visible key — a causal mask's upper
//! half is never computed; with the CPU's bf16 products on (`bf16_linear::bf16_products`) the
//! blocks' products run on AMX tiles. Other dtypes and devices, and Gemma 2's soft cap, run on
//! candle.
//!
//! Grouped-query attention without copies: the `rep` query heads of a kv head are stacked along
//! the sequence axis, `q (B, kv_heads, rep·n, hd)`, so one product per kv head serves them all.
//!
//! With `z = q·kᵀ` (soft-capped: `z' = c·tanh(scale·z / c)`, else `z' = scale·z`),
//! `P = softmax(z' + mask)`, `o = P·v` and `g = ∂L/∂o`: `dv = Pᵀ·g`, `dP = g·vᵀ`,
//! `dz' = P ⊙ (dP − Σ dP ⊙ P)`, `dz = dz' · scale` (times `1 − tanh²` when capped),
//! `dq = dz·k`, `dk = dzᵀ·q`.

use candle_core::{CustomOp3, DType, Result, Tensor, D};

use super::attach::{supported, Slot};
use super::{attention_blocks, with_f32};
use crate::model::layers::f32_if_half;

/// What one attention call computes with.
#[derive(Clone)]
struct Scores {
    /// `(B or 1, 1, n, total)`, additive.
    mask: Tensor,
    scale: f64,
    softcap: Option<f64>,
    /// Query heads per kv head.
    rep: usize,
}

impl Scores {
    /// `(probabilities (B, kv, rep·n, total), tanh of the capped scores when capped)`.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (bs, nkv, rn, _) = q.dims4()?;
        let total = k.dim(2)?;
        let n = rn / self.rep;
        let z = q.matmul(&k.t()?)?.reshape((bs, nkv * self.rep, n, total))?;
        let (z, scale, t) = match self.softcap {
            Some(cap) => {
                let t = (z * (self.scale / cap))?.tanh()?;
                ((&t * cap)?, 1.0, Some(t))
            }
            None => (z, self.scale, None),
        };
        let p = if super::fused_for(&z) {
            super::masked_softmax(&z, &self.mask, scale)?
        } else {
            // In f32 for half-precision scores, as transformers computes attention weights.
            // The max is detached: softmax does not depend on it.
            let x = (z * scale)?.broadcast_add(&self.mask)?;
            let x = x.to_dtype(f32_if_half(x.dtype()))?;
            let e = x
                .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
                .exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
                .to_dtype(q.dtype())?
        };
        Ok((p.reshape((bs, nkv, rn, total))?, t))
    }
}

struct Attention {
    result: Slot,
    scores: Scores,
    /// Set when the forward ran on [`attention_blocks`] (the backward does too).
    blocks: Option<attention_blocks::Dims>,
}

/// The block kernels' dimensions when they apply: f32 on the CPU, no soft cap, a mask that
/// fits `(B or 1, 1, n, total)` — or, for a padding-free row's `segments` (`(start, len)`,
/// in order, covering its `n` positions; no cached keys), `(1, 1, M, M)` for `M` at least the
/// longest segment.
fn block_dims(
    q: &Tensor,
    k: &Tensor,
    scores: &Scores,
    segments: Option<&[(usize, usize)]>,
) -> Option<attention_blocks::Dims> {
    let mask = &scores.mask;
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if scores.softcap.is_some() || !f32_cpu(q) || !f32_cpu(k) || !f32_cpu(mask) {
        return None;
    }
    let (batch, kv_heads, rn, head_dim) = q.dims4().ok()?;
    let total = k.dim(2).ok()?;
    let n = rn / scores.rep;
    let (mb, one, mn, mt) = mask.dims4().ok()?;
    if one != 1 || n * scores.rep != rn || (mb != 1 && mb != batch) {
        return None;
    }
    let segs = match segments {
        None if mn == n && mt == total => vec![attention_blocks::Seg {
            q0: 0,
            len: n,
            k0: 0,
            keys: total,
        }],
        Some(parts) if batch == 1 && total == n && mn == mt => {
            let mut next = 0;
            let mut segs = Vec::with_capacity(parts.len());
            for &(start, len) in parts {
                if start != next || len > mn {
                    return None;
                }
                next += len;
                segs.push(attention_blocks::Seg {
                    q0: start,
                    len,
                    k0: start,
                    keys: len,
                });
            }
            if next != n {
                return None;
            }
            segs
        }
        _ => return None,
    };
    Some(attention_blocks::Dims {
        batch,
        kv_heads,
        rep: scores.rep,
        n,
        total,
        head_dim,
        mask_per_row: mb == batch && batch > 1,
        mask_cols: mt,
        scale: scores.scale as f32,
        bf16: super::bf16_linear::bf16_products(),
        segs,
    })
}

/// `f` on the f32 slices of contiguous CPU tensors `q`, `k`, `v` and the mask.
fn with_slices<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32], &[f32]) -> R,
) -> Result<R> {
    let (q, k, v, mask) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        mask.contiguous()?,
    );
    with_f32(&q, |q| {
        with_f32(&k, |k| with_f32(&v, |v| with_f32(&mask, |m| f(q, k, v, m))))
    })???
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    super::attach::slot_forwards3!();

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), g.detach());
        if let Some(d) = &self.blocks {
            let g = g.contiguous()?;
            let (dq, dk, dv) = with_slices(&q, &k, &v, &self.scores.mask, |qs, ks, vs, m| {
                with_f32(&g, |gs| attention_blocks::backward(d, qs, ks, vs, m, gs))
            })??;
            let dev = q.device();
            return Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ));
        }
        let (p, t) = self.scores.probs(&q, &k)?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        let dz = if super::fused_for(&p) {
            // The scale folds in here unless a cap comes first.
            let scale = if t.is_some() { 1.0 } else { self.scores.scale };
            super::rowwise::softmax_backward(&p, &dp, scale)?
        } else {
            // In f32 for half-precision inputs.
            let wide = f32_if_half(p.dtype());
            let (pw, dp) = (p.to_dtype(wide)?, dp.to_dtype(wide)?);
            let dz = (&pw * dp.broadcast_sub(&(&dp * &pw)?.sum_keepdim(D::Minus1)?)?)?;
            if t.is_some() {
                dz
            } else {
                (dz * self.scores.scale)?
            }
        };
        let dz = match &t {
            Some(t) => {
                let t = t.reshape(dz.shape())?.to_dtype(dz.dtype())?;
                (dz * (t.sqr()?.affine(-1.0, 1.0)? * self.scores.scale)?)?
            }
            None => dz,
        };
        let dz = dz.to_dtype(q.dtype())?;
        let dq = dz.matmul(&k)?;
        let dk = dz.t()?.matmul(&q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `softmax(scale · q·kᵀ + mask) · v` (logits soft-capped at `softcap` first, Gemma 2) for
/// `q (B, kv_heads, rep·n, hd)`, `k`, `v (B, kv_heads, total, hd)` and an additive `mask`
/// broadcast to `(B, kv_heads·rep, n, total)`; `(B, kv_heads, rep·n, hd)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    rep: usize,
) -> Result<Tensor> {
    attend(q, k, v, mask, None, scale, softcap, rep)
}

/// Attention over a padding-free row of sequences, each attending within itself: `q (1,
/// kv_heads, rep·n, hd)`, `k`, `v (1, kv_heads, n, hd)`, `segments` the sequences' `(start,
/// len)` in order, covering the `n` positions, and `mask (1, 1, M, M)` a table whose top-left
/// `len × len` corner is each sequence's mask (a causal table at least as long as the longest
/// sequence). On the block kernels, one node for the row: no per-sequence copies of `q`, `k`,
/// `v` and their gradients; elsewhere, one [`attention`] per sequence, concatenated.
#[allow(clippy::too_many_arguments)]
pub fn attention_packed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    segments: &[(usize, usize)],
    scale: f64,
    softcap: Option<f64>,
    rep: usize,
) -> Result<Tensor> {
    attend(q, k, v, mask, Some(segments), scale, softcap, rep)
}

/// [`attention`], or [`attention_packed`] with `segments`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    segments: Option<&[(usize, usize)]>,
    scale: f64,
    softcap: Option<f64>,
    rep: usize,
) -> Result<Tensor> {
    let scores = Scores {
        mask: mask.detach(),
        scale,
        softcap,
        rep,
    };
    let fused = supported(q) && !super::composed();
    let blocks = fused.then(|| block_dims(q, k, &scores, segments)).flatten();
    let Some(segments) = segments else {
        if !fused {
            // The composed graph (benchmarks and tests compare the two).
            let (p, _) = scores.probs(q, k)?;
            return p.matmul(v);
        }
        return node(q, k, v, scores, blocks);
    };
    if blocks.is_some() {
        return node(q, k, v, scores, blocks);
    }
    // Off the block kernels: one attention per sequence.
    let (bs, nkv, rn, hd) = q.dims4()?;
    let n = rn / rep;
    let q = q.reshape((bs, nkv, rep, n, hd))?;
    let mut outs = Vec::with_capacity(segments.len());
    for &(start, len) in segments {
        let part = |t: &Tensor| t.narrow(2, start, len)?.contiguous();
        let qs = q
            .narrow(3, start, len)?
            .contiguous()?
            .reshape((bs, nkv, rep * len, hd))?;
        let m = mask.narrow(2, 0, len)?.narrow(3, 0, len)?.contiguous()?;
        let o = attention(&qs, &part(k)?, &part(v)?, &m, scale, softcap, rep)?;
        outs.push(o.reshape((bs, nkv, rep, len, hd))?);
    }
    Tensor::cat(&outs, 3)?.reshape((bs, nkv, rn, hd))
}

/// The attention node, its forward on the block kernels when `blocks` says so (else candle).
fn node(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scores: Scores,
    blocks: Option<attention_blocks::Dims>,
) -> Result<Tensor> {
    let o = match &blocks {
        Some(d) => {
            let o = with_slices(q, k, v, &scores.mask, |qs, ks, vs, m| {
                attention_blocks::forward(d, qs, ks, vs, m)
            })?;
            Tensor::from_vec(o, q.shape(), q.device())?
        }
        None => {
            let (p, _) = scores.probs(&q.detach(), &k.detach())?;
            p.matmul(&v.detach())?
        }
    };
    let op = Attention {
        result: Slot::new("attention", o)?,
        scores,
        blocks,
    };
    q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_abs, max_diff};
    use super::*;
    use candle_core::{DType, Device, Var};

    fn var(shape: &[usize], seed: f64) -> Var {
        super::super::test_util::wave_var(shape, seed, 0.37)
    }

    /// A batch of products, as the heads make (shared out over the threads by the vendored
    /// candle, one product per thread), equals each product on its own, with the left side
    /// transposed or not.
    #[test]
    fn batched_products_equal_one_at_a_time() {
        let q = var(&[2, 9, 70, 32], 0.0)
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap();
        let k = var(&[2, 9, 70, 32], 1.0)
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap();
        for (lhs, rhs) in [(q.clone(), k.t().unwrap()), (q.t().unwrap(), k.clone())] {
            let all = lhs.matmul(&rhs).unwrap();
            for b in 0..2 {
                for h in 0..9 {
                    let one = lhs.get(b).unwrap().get(h).unwrap();
                    let one = one.matmul(&rhs.get(b).unwrap().get(h).unwrap()).unwrap();
                    let got = all.get(b).unwrap().get(h).unwrap();
                    let d = max_abs(&(got - &one).unwrap());
                    assert!(d <= 1e-5 * max_abs(&one), "batch {b}, head {h}: {d}");
                }
            }
        }
    }

    /// The node's output and its q, k, v gradients equal those of the composed graph (GQA with
    /// two query heads per kv head, a causal mask over a cached prefix, with and without a
    /// soft cap), and the gradients hold no graph.
    #[test]
    fn matches_the_composed_graph() {
        let (bs, nkv, rep, n, total, hd) = (2, 2, 2, 3, 5, 4);
        let q = var(&[bs, nkv, rep * n, hd], 0.0);
        let k = var(&[bs, nkv, total, hd], 1.0);
        let v = var(&[bs, nkv, total, hd], 2.0);
        let mask: Vec<f64> = (0..n * total)
            .map(|i| if i % total > i / total + 2 { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, n, total), &Device::Cpu)
            .unwrap()
            .broadcast_as((bs, 1, n, total))
            .unwrap()
            .contiguous()
            .unwrap();
        let weights = Tensor::arange(0f64, (bs * nkv * rep * n * hd) as f64, &Device::Cpu)
            .unwrap()
            .reshape((bs, nkv, rep * n, hd))
            .unwrap()
            .cos()
            .unwrap();
        for softcap in [None, Some(2.0)] {
            let fused = attention(&q, &k, &v, &mask, 0.5, softcap, rep).unwrap();
            let z = q
                .matmul(&k.t().unwrap())
                .unwrap()
                .reshape((bs, nkv * rep, n, total))
                .unwrap();
            let z = match softcap {
                Some(c) => ((z * (0.5 / c)).unwrap().tanh().unwrap() * c).unwrap(),
                None => (z * 0.5).unwrap(),
            };
            let x = z.broadcast_add(&mask).unwrap();
            let e = x
                .broadcast_sub(&x.max_keepdim(D::Minus1).unwrap().detach())
                .unwrap()
                .exp()
                .unwrap();
            let p = e
                .broadcast_div(&e.sum_keepdim(D::Minus1).unwrap())
                .unwrap()
                .reshape((bs, nkv, rep * n, total))
                .unwrap();
            let composed = p.matmul(&v).unwrap();
            assert!(max_abs(&(&fused - &composed).unwrap()) < 1e-12);
            let loss = |o: &Tensor| (o * &weights).unwrap().sum_all().unwrap();
            let gf = loss(&fused).backward().unwrap();
            let gc = loss(&composed).backward().unwrap();
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (gf.get(t).unwrap(), gc.get(t).unwrap());
                let d = max_abs(&(a - b).unwrap());
                assert!(
                    d < 1e-10,
                    "{name} (softcap {softcap:?}): gradient differs by {d}"
                );
                assert!(max_abs(a) > 1e-3, "{name}: a gradient that is not zero");
                assert!(!a.track_op(), "{name}: the gradient holds a graph");
            }
        }
    }

    /// `[o, dq, dk, dv]` in f64 for the loss `Σ o ⊙ weights`.
    fn with_gradients(o: &Tensor, weights: &Var, [q, k, v]: [&Var; 3]) -> [Tensor; 4] {
        let loss = (o.to_dtype(DType::F64).unwrap() * weights.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let grad = |t: &Var| g.get(t).unwrap().to_dtype(DType::F64).unwrap();
        [o.to_dtype(DType::F64).unwrap(), grad(q), grad(k), grad(v)]
    }

    /// A causal mask over `n` queries and `total` keys (the first `total − n` cached), where the
    /// queries from `second` on are a second packed sequence that sees only the keys from
    /// `second` on, and the queries from `blind` on see none.
    fn causal(n: usize, total: usize, second: usize, blind: usize) -> Vec<f64> {
        (0..n * total)
            .map(|i| {
                let (pos, key) = (i / total, i % total);
                if key > pos + (total - n) || (pos >= second && key < second) || pos >= blind {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// In f32 on the CPU the forward and backward run block by block, each block's products
    /// stopping at its last visible key (`attention_blocks`); they agree with the f64 graph:
    /// GQA with three query heads per kv head, 70 positions (two full blocks and a ragged one),
    /// a causal mask per batch row (the second row two packed sequences), and a causal mask over
    /// a cached prefix of five keys.
    #[test]
    fn blocks_in_f32_match_the_f64_graph() {
        let (bs, nkv, rep, n, hd) = (2, 2, 3, 70, 20);
        let per_row = [causal(n, n, n, n), causal(n, n, 30, n)].concat();
        let shared = [causal(n, n + 5, n, n), causal(n, n + 5, n, n)].concat();
        for (total, mask) in [(n, per_row), (n + 5, shared)] {
            let mask = Tensor::from_vec(mask, (bs, 1, n, total), &Device::Cpu).unwrap();
            let q = var(&[bs, nkv, rep * n, hd], 0.0);
            let k = var(&[bs, nkv, total, hd], 1.0);
            let v = var(&[bs, nkv, total, hd], 2.0);
            let weights = var(&[bs, nkv, rep * n, hd], 3.0);
            let run = |dtype: DType| {
                let to = |t: &Var| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
                let (q, k, v) = (to(&q), to(&k), to(&v));
                let mask = mask.to_dtype(dtype).unwrap();
                let o = attention(&q, &k, &v, &mask, 0.3, None, rep).unwrap();
                with_gradients(&o, &weights, [&q, &k, &v])
            };
            let f32_mask = mask.to_dtype(DType::F32).unwrap();
            let scores = Scores {
                mask: f32_mask,
                scale: 0.3,
                softcap: None,
                rep,
            };
            let qf = q.to_dtype(DType::F32).unwrap();
            let kf = k.to_dtype(DType::F32).unwrap();
            assert!(
                block_dims(&qf, &kf, &scores, None).is_some(),
                "the block path applies"
            );
            for (name, (a, b)) in ["o", "dq", "dk", "dv"]
                .iter()
                .zip(run(DType::F64).iter().zip(run(DType::F32)))
            {
                let (d, m) = (max_diff(a, &b), max_abs(a));
                assert!(m > 1e-2, "{name} (total {total}): not zero");
                assert!(
                    d <= 2e-5 * m,
                    "{name} (total {total}): f32 blocks off by {d} of {m}"
                );
            }
        }
    }

    /// A padding-free row of three sequences (30, 25 and 15 positions: full, ragged and single
    /// blocks) under one causal table of 40 (a windowed one too): in f32 one node on the block
    /// kernels, its output and gradients equal to those of each sequence on its own (the f64
    /// graph, a node per sequence and their concatenation), and no key of one sequence reaches
    /// another (a change to the first sequence's values moves only its own outputs).
    #[test]
    fn a_packed_row_attends_within_each_sequence() {
        let (nkv, rep, n, hd) = (2, 3, 70, 12);
        let segments = [(0, 30), (30, 25), (55, 15)];
        for window in [None, Some(6)] {
            let table: Vec<f64> = (0..40 * 40)
                .map(|i| {
                    let (pos, key) = (i / 40, i % 40);
                    let far = window.is_some_and(|w| pos >= key + w);
                    if key > pos || far {
                        -1e9
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(table, (1, 1, 40, 40), &Device::Cpu).unwrap();
            let q = var(&[1, nkv, rep * n, hd], 0.0);
            let k = var(&[1, nkv, n, hd], 1.0);
            let v = var(&[1, nkv, n, hd], 2.0);
            let weights = var(&[1, nkv, rep * n, hd], 3.0);
            let run = |dtype: DType, v_shift: f64| {
                let to = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
                let (q, k) = (to(&q), to(&k));
                // The first sequence's values shifted (the others' untouched).
                let shift = Tensor::arange(0u32, n as u32, &Device::Cpu)
                    .unwrap()
                    .lt(30u32)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .reshape((1, 1, n, 1))
                    .unwrap();
                let v = to(&(v.as_tensor().broadcast_add(&(shift * v_shift).unwrap())).unwrap());
                let mask = mask.to_dtype(dtype).unwrap();
                let o = attention_packed(&q, &k, &v, &mask, &segments, 0.3, None, rep).unwrap();
                with_gradients(&o, &weights, [&q, &k, &v])
            };
            let scores = Scores {
                mask: mask.to_dtype(DType::F32).unwrap(),
                scale: 0.3,
                softcap: None,
                rep,
            };
            let (qf, kf) = (
                q.to_dtype(DType::F32).unwrap(),
                k.to_dtype(DType::F32).unwrap(),
            );
            assert!(block_dims(&qf, &kf, &scores, Some(&segments)).is_some());
            let exact = run(DType::F64, 0.0);
            for (name, (a, b)) in ["o", "dq", "dk", "dv"]
                .iter()
                .zip(exact.iter().zip(run(DType::F32, 0.0)))
            {
                let (d, m) = (max_diff(a, &b), max_abs(a));
                assert!(m > 1e-2, "{name}: not zero");
                assert!(
                    d <= 2e-5 * m,
                    "{name} ({window:?}): packed f32 off by {d} of {m}"
                );
            }
            // Outputs of the second and third sequences ignore the first one's values.
            let moved = run(DType::F32, 5.0);
            let rows = |t: &Tensor, from: usize, len: usize| {
                t.reshape((nkv, rep, n, hd))
                    .unwrap()
                    .narrow(2, from, len)
                    .unwrap()
            };
            let (later, before) = (rows(&moved[0], 30, 40), rows(&exact[0], 30, 40));
            assert!(max_diff(&later, &before) <= 2e-5 * max_abs(&before));
            assert!(max_diff(&rows(&moved[0], 0, 30), &rows(&exact[0], 0, 30)) > 1.0);
        }
    }

    /// A query that sees no key keeps every key, as the unblocked softmax does (in f32 its
    /// scores all round to −1e9, so it averages the values): the blocks' output equals the
    /// f32 product of the unblocked probabilities for a mask whose last rows are blind.
    #[test]
    fn a_query_that_sees_no_key_keeps_every_key() {
        let (bs, nkv, rep, n, hd) = (1, 1, 2, 40, 8);
        let f32 = |t: &Var| t.to_dtype(DType::F32).unwrap();
        let q = f32(&var(&[bs, nkv, rep * n, hd], 0.0));
        let k = f32(&var(&[bs, nkv, n, hd], 1.0));
        let v = f32(&var(&[bs, nkv, n, hd], 2.0));
        let mask = Tensor::from_vec(causal(n, n, n, 35), (1, 1, n, n), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let scores = Scores {
            mask: mask.clone(),
            scale: 0.3,
            softcap: None,
            rep,
        };
        let (p, _) = scores.probs(&q, &k).unwrap();
        let unblocked = p.matmul(&v).unwrap();
        let blocked = attention(&q, &k, &v, &mask, 0.3, None, rep).unwrap();
        let d = max_diff(&blocked, &unblocked);
        assert!(d < 1e-5, "off by {d}");
    }
}
