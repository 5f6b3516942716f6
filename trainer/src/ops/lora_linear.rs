//! A LoRA linear layer over a frozen weight, `y = x·Wᵀ + s·((m ⊙ x)·Aᵀ)·Bᵀ` (`m` LoRA's dropout
//! mask, when it drops), as one graph node. Composed from candle ops the graph would keep the
//! frozen product, the low-rank product and their sum — three `(tokens, out)` tensors per
//! adapted linear, most of a LoRA step's activation memory — though the backward needs only
//! `x` (and recomputes the `(tokens, r)` product).
//!
//! Backward, with `g = ∂L/∂y`, `gB = s·g·B` and `h = s·(m ⊙ x)·Aᵀ`:
//! `dx = g·W + m ⊙ (gB·A)`, `dA = gBᵀ·(m ⊙ x)`, `dB = gᵀ·h`.
//!
//! In f32 on the CPU the rank-r products go through [`super::low_rank`]'s kernels and the
//! rank-r terms are added into the frozen products (`y`, `dx`) in place; with a weight packed
//! for AMX tiles they are summed on the tiles within the product, and without a dropout mask
//! `h` and `gB` are projected as its input is packed. Other dtypes and devices compose
//! candle's products.

use std::sync::Arc;

use candle_core::{CustomOp3, DType, Result, Tensor};

use super::attach::{supported, Slot};
use super::bf16_linear::Side;
use super::low_rank::{self, AddOuter};
use super::with_f32;
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

    /// `x · Wᵀ + h · s` as a value, for f32 `x (tokens, in)`, `h (tokens, r)`, `s (r, out)`.
    fn product_plus(&self, x: &Tensor, h: &[f32], s: &[f32]) -> Result<Tensor> {
        match self {
            Frozen::Dense(_) => add_in_place(self.product(x)?, h, s),
            Frozen::Bf16(w) => w.forward_plus(x, h, s),
        }
    }

    /// `(x · Wᵀ + h · s, h)` for `h = scale · x · pᵀ`, `p (r, in)` and `s (r, out)` — or, for
    /// [`Side::InputGrad`], `(g · W + h · s, h)` for `h = scale · g · pᵀ`, `p (r, out)` and
    /// `s (r, in)`. With a packed weight the rows of `h` are made as the input is packed (one
    /// read of it for both).
    fn product_projected(
        &self,
        side: Side,
        x: &Tensor,
        p: &[f32],
        scale: f32,
        s: &[f32],
    ) -> Result<(Tensor, Vec<f32>)> {
        match self {
            Frozen::Dense(_) => {
                let h = projected_rows(x, p, scale)?;
                let y = match side {
                    Side::Forward => self.product(x)?,
                    Side::InputGrad => self.input_grad(x)?,
                };
                Ok((add_in_place(y, &h, s)?, h))
            }
            Frozen::Bf16(w) => w.product_projected(side, x, p, scale, s),
        }
    }
}

/// `y + h · s` in `y`'s own storage (a product just made, held by no one else).
fn add_in_place(y: Tensor, h: &[f32], s: &[f32]) -> Result<Tensor> {
    y.inplace_op1(&AddOuter { h, s })?;
    Ok(y)
}

struct LoraLinear {
    result: Slot,
    w: Frozen,
    scale: f64,
    /// LoRA dropout's mask (already scaled by `1 / (1 − p)`), when it drops.
    mask: Option<Tensor>,
    /// `h = s·(m ⊙ x)·Aᵀ` `(tokens, r)` when the forward ran on the low-rank kernels, whose
    /// backward then runs on them too and reuses it (a few kilobytes; recomputing it would read
    /// `x` once more).
    h: Option<Vec<f32>>,
}

impl LoraLinear {
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => x * m,
            None => Ok(x.clone()),
        }
    }

    /// The backward with the low-rank kernels, given the forward's `h`: `gB` as a row
    /// projection, `dA` and `dBᵀ` gathered over the tokens, `gB·A` added into the frozen input
    /// gradient in place.
    fn backward_f32(
        &self,
        xm: &Tensor,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
        h: &[f32],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, inp) = a.dims2()?;
        let out = g.dim(1)?;
        let xm = xm.contiguous()?;
        let a = a.contiguous()?;
        let bt = b.t()?.contiguous()?;
        let scale = self.scale as f32;
        let (dx, gb) = match &self.mask {
            None => with_f32(&bt, |p| {
                with_f32(&a, |s| {
                    self.w.product_projected(Side::InputGrad, g, p, scale, s)
                })
            })???,
            Some(m) => {
                let gb = projected(g, &bt, self.scale)?;
                let n = gb.len() / r.max(1);
                let gbt = Tensor::from_slice(&gb, (n, r), g.device())?;
                ((self.w.input_grad(g)? + (gbt.matmul(&a)? * m)?)?, gb)
            }
        };
        let da = with_f32(&xm, |xs| low_rank::gather(xs, inp, &gb, r))?;
        let dbt = with_f32(g, |gs| low_rank::gather(gs, out, h, r))?;
        let da = Tensor::from_vec(da, (r, inp), g.device())?;
        let db = Tensor::from_vec(dbt, (r, out), g.device())?
            .t()?
            .contiguous()?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// Whether a layer's products go through [`low_rank`]'s kernels: a 2-D f32 input and adapter
/// on the CPU, fused kernels on.
fn low_rank_kernels(x: &Tensor, a: &Tensor) -> bool {
    super::fused_for(x) && x.dtype() == DType::F32 && a.dtype() == DType::F32 && x.rank() == 2
}

/// `scale · x · sᵀ` for `x (tokens, k)` and `s (r, k)`: `(tokens, r)`, row-major.
fn projected(x: &Tensor, s: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let s = s.contiguous()?;
    with_f32(&s, |ss| projected_rows(x, ss, scale as f32))?
}

/// [`projected`] for `s` as a slice.
fn projected_rows(x: &Tensor, s: &[f32], scale: f32) -> Result<Vec<f32>> {
    let x = x.contiguous()?;
    let k = x.dims().last().copied().unwrap_or(0);
    with_f32(&x, |xs| low_rank::project(xs, k, s, scale))
}

/// `x·Wᵀ + s·((m ⊙ x)·Aᵀ)·Bᵀ` with the low-rank kernels: the rank-r term is added into the
/// frozen product (on a packed weight's tiles, projected as `x` is packed, when no dropout
/// mask makes `m ⊙ x` another input); also returns `h = s·(m ⊙ x)·Aᵀ`.
fn forward_f32(
    w: &Frozen,
    x: &Tensor,
    xm: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<(Tensor, Vec<f32>)> {
    let bt = b.t()?.contiguous()?;
    match xm {
        None => {
            let a = a.contiguous()?;
            with_f32(&a, |p| {
                with_f32(&bt, |s| {
                    w.product_projected(Side::Forward, x, p, scale as f32, s)
                })
            })??
        }
        Some(xm) => {
            let h = projected(xm, a, scale)?;
            let y = with_f32(&bt, |s| w.product_plus(x, &h, s))??;
            Ok((y, h))
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
        if let Some(h) = &self.h {
            return self.backward_f32(&xm, &a, &b, &g.contiguous()?, h);
        }
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
    let (y, h) = if low_rank_kernels(x, a) {
        let xd = x.detach();
        let xm = mask.as_ref().map(|m| &xd * m).transpose()?;
        let (y, h) = forward_f32(&w, &xd, xm.as_ref(), &a.detach(), &b.detach(), scale)?;
        (y, Some(h))
    } else {
        (composed(&x.detach())?.detach(), None)
    };
    let op = LoraLinear {
        result: Slot::new("lora-linear", y)?,
        w,
        scale,
        mask,
        h,
    };
    x.apply_op3_arc(a, b, std::sync::Arc::new(Box::new(op)))
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_abs, max_diff, wave_var};
    use super::*;
    use candle_core::{Device, Var};

    fn var(shape: (usize, usize), seed: f64, dtype: DType) -> Var {
        let v = wave_var(shape, seed, 0.7);
        Var::from_tensor(&v.as_tensor().to_dtype(dtype).unwrap()).unwrap()
    }

    /// The op's value and gradients equal the composed graph's, with and without a dropout
    /// mask: in f64 (the composed products), and in f32 (the low-rank kernels) on a shape with
    /// whole and partial SIMD strips and a rank past one register group.
    #[test]
    fn matches_the_composed_graph() {
        // (tokens, in, out, rank, dtype, relative tolerance)
        let cases = [
            (5, 4, 3, 2, DType::F64, 1e-12),
            (37, 40, 24, 6, DType::F32, 1e-5),
        ];
        for (n, inp, out, r, dtype, tol) in cases {
            let (x, a, b) = (
                var((n, inp), 0.0, dtype),
                var((r, inp), 1.0, dtype),
                var((out, r), 2.0, dtype),
            );
            let w = var((out, inp), 3.0, dtype).as_tensor().detach();
            let mask = Tensor::from_vec(
                (0..n * inp)
                    .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
                    .collect::<Vec<f64>>(),
                (n, inp),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            for m in [None, Some(mask)] {
                let fused =
                    lora_linear(&x, Frozen::Dense(w.clone()), &a, &b, 0.5, m.clone()).unwrap();
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
                let d = max_diff(&fused, &composed);
                assert!(
                    d <= tol * max_abs(&composed),
                    "{dtype:?}: value differs by {d}"
                );
                // A loss that weights every output differently.
                let weights = Tensor::arange(0f64, (n * out) as f64, &Device::Cpu)
                    .unwrap()
                    .reshape((n, out))
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
                let gf = loss(&fused).backward().unwrap();
                let gc = loss(&composed).backward().unwrap();
                for v in [&x, &a, &b] {
                    let want = gc.get(v).unwrap();
                    let d = max_diff(gf.get(v).unwrap(), want);
                    assert!(
                        d <= tol * max_abs(want),
                        "{dtype:?}: gradient differs by {d} (largest {})",
                        max_abs(want)
                    );
                    // A value, holding no graph.
                    assert!(!gf.get(v).unwrap().track_op());
                }
            }
        }
    }
}
