//! Scaled dot-product attention as one graph node that keeps only its inputs: the backward
//! recomputes the scores and probabilities from `q` and `k` (as flash attention's does). Composed
//! from candle ops, the graph would keep the scores and the probabilities of every layer,
//! `heads × n × total` each — at 4,096 tokens, 9 heads, 600 MB per layer and sequence, against
//! the few megabytes of `q`, `k`, `v`. The recomputation costs one `q·kᵀ` product and a softmax
//! per layer, a few percent of a step.
//!
//! Grouped-query attention without copies: the `rep` query heads of a kv head are stacked along
//! the sequence axis, `q (B, kv_heads, rep·n, hd)`, so one product per kv head serves them all.
//!
//! With `z = q·kᵀ` (soft-capped: `z' = c·tanh(scale·z / c)`, else `z' = scale·z`),
//! `P = softmax(z' + mask)`, `o = P·v` and `g = ∂L/∂o`: `dv = Pᵀ·g`, `dP = g·vᵀ`,
//! `dz' = P ⊙ (dP − Σ dP ⊙ P)`, `dz = dz' · scale` (times `1 − tanh²` when capped),
//! `dq = dz·k`, `dk = dzᵀ·q`.

use candle_core::{CustomOp3, Result, Tensor, D};

use super::attach::{supported, Slot};
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
    let scores = Scores {
        mask: mask.detach(),
        scale,
        softcap,
        rep,
    };
    if !supported(q) || super::composed() {
        // The composed graph (benchmarks and tests compare the two).
        let (p, _) = scores.probs(q, k)?;
        return p.matmul(v);
    }
    let (p, _) = scores.probs(&q.detach(), &k.detach())?;
    let o = p.matmul(&v.detach())?;
    drop(p);
    let op = Attention {
        result: Slot::new("attention", o)?,
        scores,
    };
    q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_abs;
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
}
