//! A LoRA linear layer over a frozen weight, `y = x·Wᵀ + s·((m ⊙ x)·Aᵀ)·Bᵀ` (`m` LoRA's dropout
//! mask, when it drops), as one graph node. Composed from candle ops the graph would keep the
//! frozen product, the low-rank product and their sum — three `(tokens, out)` tensors per
//! adapted linear, most of a LoRA step's activation memory — though the backward needs only
//! `x` (and recomputes the `(tokens, r)` product).
//!
//! Backward, with `g = ∂L/∂y`, `gB = s·g·B` and `h = s·(m ⊙ x)·Aᵀ`:
//! `dx = g·W + m ⊙ (gB·A)`, `dA = gBᵀ·(m ⊙ x)`, `dB = gᵀ·h`.

use std::sync::Arc;

use candle_core::{CustomOp3, Result, Tensor};

use super::attach::{supported, Slot};
use super::Bf16Weight;

/// A LoRA layer's frozen weight: a tensor, or packed in bf16 for AMX tiles (the CPU's `bf16`).
#[derive(Clone)]
pub enum Frozen {
    Dense(Tensor),
    Bf16(Arc<Bf16Weight>),
}

impl Frozen {
    /// `x · Wᵀ` as a value.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => x.matmul(&w.t()?),
            Frozen::Bf16(w) => w.forward(x),
        }
    }

    /// `g · W` as a value.
    fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => g.matmul(w),
            Frozen::Bf16(w) => w.input_grad(g),
        }
    }
}

struct LoraLinear {
    result: Slot,
    w: Frozen,
    scale: f64,
    /// LoRA dropout's mask (already scaled by `1 / (1 − p)`), when it drops.
    mask: Option<Tensor>,
}

impl LoraLinear {
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => x * m,
            None => Ok(x.clone()),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    super::attach::slot_forwards3!();

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Gradients are values: computed from the inputs detached, they keep no graph alive
        // (an optimizer's moments built on them would otherwise chain every step's graph).
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), g.detach());
        let xm = self.dropped(&x)?;
        let gb = (g.matmul(&b)? * self.scale)?;
        let h = (xm.matmul(&a.t()?)? * self.scale)?;
        let dx = (self.w.input_grad(&g)? + self.dropped(&gb.matmul(&a)?)?)?;
        let da = gb.t()?.matmul(&xm)?;
        let db = g.t()?.matmul(&h)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x (N, in)` through a frozen `w (out, in)` and the adapter `a (r, in)`, `b (out, r)` scaled
/// by `scale`, with LoRA dropout's `mask (N, in)` when given; differentiable in `x`, `a`, `b`.
pub fn lora_linear(
    x: &Tensor,
    w: Frozen,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let w = match w {
        Frozen::Dense(w) => Frozen::Dense(w.detach()),
        packed => packed,
    };
    let composed = |x: &Tensor| -> Result<Tensor> {
        let xm = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        w.product(x)? + xm.matmul(&a.t()?)?.matmul(&(b * scale)?.t()?)?
    };
    if !supported(x) || x.rank() != 2 {
        // The composed graph differentiates through a dense weight's product only: a packed
        // one's is a value.
        if matches!(w, Frozen::Bf16(_)) {
            candle_core::bail!(
                "lora-linear: a bf16-packed weight takes (tokens, features) on the CPU"
            );
        }
        return composed(x);
    }
    let y = composed(&x.detach())?.detach();
    let op = LoraLinear {
        result: Slot::new("lora-linear", y)?,
        w,
        scale,
        mask,
    };
    x.apply_op3_arc(a, b, std::sync::Arc::new(Box::new(op)))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::max_diff;
    use super::*;
    use candle_core::{Device, Var};

    fn var(shape: (usize, usize), seed: f64) -> Var {
        super::super::test_util::wave_var(shape, seed, 0.7)
    }

    /// The op's value and gradients equal the composed graph's, with and without a mask.
    #[test]
    fn matches_the_composed_graph() {
        let (x, a, b) = (var((5, 4), 0.0), var((2, 4), 1.0), var((3, 2), 2.0));
        let w = var((3, 4), 3.0).as_tensor().detach();
        let mask = Tensor::from_vec(
            (0..20)
                .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
                .collect::<Vec<f64>>(),
            (5, 4),
            &Device::Cpu,
        )
        .unwrap();
        for m in [None, Some(mask)] {
            let fused = lora_linear(&x, Frozen::Dense(w.clone()), &a, &b, 0.5, m.clone()).unwrap();
            let xm = match &m {
                Some(m) => (x.as_tensor() * m).unwrap(),
                None => x.as_tensor().clone(),
            };
            let composed = (x.matmul(&w.t().unwrap()).unwrap()
                + xm.matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&(b.as_tensor() * 0.5).unwrap().t().unwrap())
                    .unwrap())
            .unwrap();
            assert!(max_diff(&fused, &composed) < 1e-12);
            // A loss that weights every output differently.
            let weights = Tensor::arange(0f64, 15.0, &Device::Cpu)
                .unwrap()
                .reshape((5, 3))
                .unwrap();
            let gf = (&fused * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (&composed * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &a, &b] {
                let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-10, "gradient differs by {d}");
                // A value, holding no graph.
                assert!(!gf.get(v).unwrap().track_op());
            }
        }
    }
}
