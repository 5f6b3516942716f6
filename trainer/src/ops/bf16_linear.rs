//! Frozen linear products in bf16 on AMX tiles: the CPU's `bf16: true`. A frozen weight
//! `W (out, in)` is rounded to bf16 and packed once, in both orientations a step needs (the
//! forward `x·Wᵀ` and the input gradient `g·W`); activations and gradients stay f32 and are
//! rounded as they are packed; the products sum in f32 (see [`super::amx_bf16`]). A LoRA layer's
//! rank-r term joins its frozen product on the tiles, rounded the same way (as PEFT's adapters
//! compute under autocast). Attention's products run on the tiles too (`attention_blocks`);
//! everything else in the step — norms, softmax, log-probabilities, LoRA's `h`, `gB` and its
//! gradients, the optimizer — computes in f32.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::amx_bf16::{self, PackedB};
use super::with_f32;

static ON: AtomicBool = AtomicBool::new(false);

/// Turns bf16 products of frozen linear weights on (only where AMX tiles are available);
/// returns whether they are on.
pub fn use_bf16_products(on: bool) -> bool {
    let on = on && amx_bf16::available();
    ON.store(on, Ordering::Relaxed);
    on
}

/// Whether frozen linear weights (and attention, `attention_blocks`) multiply in bf16 on AMX
/// tiles.
pub fn bf16_products() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Which of a frozen weight's products: the forward `x · Wᵀ` or the input gradient `g · W`.
#[derive(Clone, Copy)]
pub enum Side {
    Forward,
    InputGrad,
}

/// A frozen `W (out, in)` rounded to bf16, packed for `x·Wᵀ` and for `g·W`.
pub struct Bf16Weight {
    forward: PackedB,
    input_grad: PackedB,
}

impl Bf16Weight {
    /// Packs `w (out, in)`, an f32 CPU tensor.
    pub fn new(w: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.contiguous()?;
        with_f32(&w, |s| Self {
            forward: PackedB::new(s, inp, out, 1, inp),
            input_grad: PackedB::new(s, out, inp, inp, 1),
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.input_grad.dims()
    }

    /// The weight rounded to bf16, `(out, in)` in `dtype`: what the products multiply by.
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(self.input_grad.unpack(), self.dims(), &Device::Cpu)?.to_dtype(dtype)
    }

    /// Bytes of the two packed copies.
    pub fn bytes(&self) -> usize {
        self.forward.bytes() + self.input_grad.bytes()
    }

    /// `x · Wᵀ` as a value.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        product(x, &self.forward)
    }

    /// `g · W` as a value.
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        product(g, &self.input_grad)
    }

    /// `x · Wᵀ + h · s` for `h (tokens, r)` and `s (r, out)` row-major (a LoRA layer's
    /// low-rank term), summed on the tiles with the product (see [`product_plus`]).
    pub fn forward_plus(&self, x: &Tensor, h: &[f32], s: &[f32]) -> Result<Tensor> {
        product_plus(x, &self.forward, h, s)
    }

    /// For [`Side::Forward`], `(x · Wᵀ + h · s, h)` with `h = scale · x · pᵀ`, `p (r, in)`,
    /// `s (r, out)`; for [`Side::InputGrad`], `(g · W + h · s, h)` with `h = scale · g · pᵀ`,
    /// `p (r, out)`, `s (r, in)`. The rows of `h` are projected as the input is packed, one
    /// read of it for both.
    pub fn product_projected(
        &self,
        side: Side,
        x: &Tensor,
        p: &[f32],
        scale: f32,
        s: &[f32],
    ) -> Result<(Tensor, Vec<f32>)> {
        let b = match side {
            Side::Forward => &self.forward,
            Side::InputGrad => &self.input_grad,
        };
        product_projected(x, b, p, scale, s)
    }
}

/// `(x · B + h · s, h)` for `h = scale · x · pᵀ`, `p (r, k)`, `s (r, n)`: `h` projected as `x`
/// is packed, then summed on the tiles as in [`product_plus`].
fn product_projected(
    x: &Tensor,
    b: &PackedB,
    p: &[f32],
    scale: f32,
    s: &[f32],
) -> Result<(Tensor, Vec<f32>)> {
    let (k, n) = b.dims();
    let r = s.len() / n.max(1);
    if r * n != s.len() || p.len() != r * k {
        candle_core::bail!("bf16 product: the low-rank term does not fit the product");
    }
    let mut h = vec![0f32; x.elem_count() / k.max(1) * r];
    let s = PackedB::new(s, r, n, n, 1);
    let rows = amx_bf16::Rows::Projected {
        p,
        scale,
        out: &mut h,
    };
    let y = product_with(x, b, Some(amx_bf16::LowRank { h: rows, s: &s }))?;
    Ok((y, h))
}

/// `x · B + h · s`, the low-rank term summed in the same tiles as more depth (`h` and `s`
/// rounded to bf16 too, as PEFT's adapters compute under autocast; the sum stays f32).
fn product_plus(x: &Tensor, b: &PackedB, h: &[f32], s: &[f32]) -> Result<Tensor> {
    let n = b.dims().1;
    let r = s.len() / n.max(1);
    if r * n != s.len() || h.len() != x.elem_count() / b.dims().0.max(1) * r {
        candle_core::bail!("bf16 product: the low-rank term does not fit the product");
    }
    let s = PackedB::new(s, r, n, n, 1);
    let h = amx_bf16::Rows::Given(h);
    product_with(x, b, Some(amx_bf16::LowRank { h, s: &s }))
}

/// `x (..., k) · B → (..., n)` as a value (no graph).
fn product(x: &Tensor, b: &PackedB) -> Result<Tensor> {
    product_with(x, b, None)
}

/// [`product`] plus a low-rank term.
fn product_with(x: &Tensor, b: &PackedB, low_rank: Option<amx_bf16::LowRank>) -> Result<Tensor> {
    let (k, n) = b.dims();
    let x = x.detach().contiguous()?;
    let mut dims = x.dims().to_vec();
    let last = dims.pop().unwrap_or(0);
    if last != k {
        candle_core::bail!("bf16 product: input has {last} features, the weight {k}");
    }
    let m: usize = dims.iter().product();
    let c = with_f32(&x, |a| amx_bf16::matmul_new_plus(a, m, k, b, low_rank))?;
    dims.push(n);
    Tensor::from_vec(c, dims, &Device::Cpu)
}

/// `x (..., in) · Wᵀ` for a frozen weight packed in bf16, differentiable in `x` (`dx = g · W`,
/// also in bf16).
pub fn bf16_linear(x: &Tensor, w: &Arc<Bf16Weight>) -> Result<Tensor> {
    let y0 = w.forward(x)?;
    let wb = w.clone();
    match super::attach("bf16-linear", x, y0.clone(), move |_x, g| wb.input_grad(g))? {
        Some(y) => Ok(y),
        None => Ok(y0),
    }
}

#[cfg(test)]
mod tests {
    use super::super::amx_bf16::round_to_bf16;
    use super::super::test_util::max_diff;
    use super::*;

    fn rounded(t: &Tensor) -> Tensor {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v.into_iter().map(round_to_bf16).collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    }

    /// The low-rank term summed on the tiles equals the product plus `h · s` of the rounded
    /// operands added afterwards, on shapes with partial blocks in both directions and ranks
    /// below, at and above one tile's depth.
    #[test]
    fn products_plus_a_low_rank_term() {
        if !amx_bf16::available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return;
        }
        let dev = Device::Cpu;
        let wave = |rows: usize, cols: usize, f: f64| {
            (Tensor::arange(0f32, (rows * cols) as f32, &dev)
                .unwrap()
                .reshape((rows, cols))
                .unwrap()
                * f)
                .unwrap()
                .sin()
                .unwrap()
        };
        let (n, inp, out) = (37, 40, 50);
        let (x, w, g) = (
            wave(n, inp, 0.013),
            wave(out, inp, 0.07),
            wave(n, out, 0.029),
        );
        let packed = Bf16Weight::new(&w).unwrap();
        let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        for r in [3, 32, 40] {
            let (h, s_out, s_in) = (wave(n, r, 0.31), wave(r, out, 0.17), wave(r, inp, 0.23));
            let term = |s: &Tensor| rounded(&h).matmul(&rounded(s)).unwrap();
            let got = packed.forward_plus(&x, &v(&h), &v(&s_out)).unwrap();
            let want = (packed.forward(&x).unwrap() + term(&s_out)).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "rank {r}: differs by {d}");
            // The rows projected as the input is packed: `h = 0.5 · x · pᵀ` in f32, and the
            // product plus that `h`'s term.
            let (p_in, p_out) = (wave(r, inp, 0.41), wave(r, out, 0.37));
            let projected = [
                (
                    packed.product_projected(Side::Forward, &x, &v(&p_in), 0.5, &v(&s_out)),
                    &x,
                    &p_in,
                    &s_out,
                ),
                (
                    packed.product_projected(Side::InputGrad, &g, &v(&p_out), 0.5, &v(&s_in)),
                    &g,
                    &p_out,
                    &s_in,
                ),
            ];
            for (i, (got, input, p, s)) in projected.into_iter().enumerate() {
                let (y, h) = got.unwrap();
                let want_h = (input.matmul(&p.t().unwrap()).unwrap() * 0.5).unwrap();
                let h = Tensor::from_vec(h, (n, r), &dev).unwrap();
                assert!(max_diff(&h, &want_h) < 1e-5, "rank {r}: h differs");
                let frozen = match i {
                    0 => packed.forward(input).unwrap(),
                    _ => packed.input_grad(input).unwrap(),
                };
                let want = (frozen + rounded(&h).matmul(&rounded(s)).unwrap()).unwrap();
                let d = max_diff(&y, &want);
                assert!(d < 1e-5, "rank {r}, projected: differs by {d}");
            }
        }
        let (h, s_in) = (wave(n, 3, 0.31), wave(3, inp, 0.23));
        // A term that does not fit is refused.
        assert!(packed.forward_plus(&x, &v(&h), &v(&s_in)).is_err());
    }

    /// Value and input gradient equal the f32 products of the bf16-rounded operands.
    #[test]
    fn value_and_input_gradient_are_the_rounded_products() {
        if !amx_bf16::available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX-BF16 tiles");
            return;
        }
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &(Tensor::arange(0f32, 3.0 * 7.0 * 40.0, &dev)
                .unwrap()
                .reshape((3, 7, 40))
                .unwrap()
                * 0.013)
                .unwrap()
                .sin()
                .unwrap(),
        )
        .unwrap();
        let w = (Tensor::arange(0f32, 50.0 * 40.0, &dev)
            .unwrap()
            .reshape((50, 40))
            .unwrap()
            * 0.07)
            .unwrap()
            .cos()
            .unwrap();
        let packed = Arc::new(Bf16Weight::new(&w).unwrap());
        let y = bf16_linear(x.as_tensor(), &packed).unwrap();
        let want = rounded(x.as_tensor())
            .broadcast_matmul(&rounded(&w).t().unwrap())
            .unwrap();
        assert_eq!(y.dims(), &[3, 7, 50]);
        assert!(max_diff(&y, &want) < 1e-4, "{}", max_diff(&y, &want));
        let weights = (Tensor::arange(0f32, 3.0 * 7.0 * 50.0, &dev)
            .unwrap()
            .reshape((3, 7, 50))
            .unwrap()
            * 0.01)
            .unwrap();
        let grads = (&y * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = grads.get(x.as_tensor()).unwrap();
        let want_dx = rounded(&weights).broadcast_matmul(&rounded(&w)).unwrap();
        assert!(max_diff(dx, &want_dx) < 1e-4, "{}", max_diff(dx, &want_dx));
        // Not the f32 product: the rounding is real.
        let f32_y = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&y, &f32_y) > 1e-3);
        assert!(!dx.track_op());
        // The packed weight unpacks to the rounded one.
        assert_eq!(
            max_diff(&packed.to_dense(DType::F32).unwrap(), &rounded(&w)),
            0.0
        );
    }
}
