//! `x · Wᵀ` for a frozen `W`: the forward is one GEMM outside the graph, re-attached to `x`
//! by a CustomOp whose backward returns only `dx = g · W`. candle's own matmul backward would
//! also compute `xᵀ · g` for `W` (a third of a step's GEMM work) and keep it in the gradient
//! store, though nothing reads it.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct AttachInputGrad {
    w: Tensor,
}

impl CustomOp2 for AttachInputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    /// Hands back the precomputed product (arg 2) as the op's result.
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !l2.is_contiguous() || l2.start_offset() != 0 {
            candle_core::bail!("frozen-linear: product must be contiguous");
        }
        Ok((s2.clone(), l2.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y0: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.w)?), None))
    }
}

/// `x (N, in) · wᵀ → (N, out)`, differentiable in `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.detach();
    let y0 = x.detach().matmul(&w.t()?)?.contiguous()?;
    if !x.device().is_cpu() {
        // The attach trick has a CPU forward only; elsewhere use the plain product.
        return x.matmul(&w.t()?);
    }
    x.apply_op2_arc(&y0, std::sync::Arc::new(Box::new(AttachInputGrad { w })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_composed_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f64, 12.0, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        )
        .unwrap();
        let w = (Tensor::arange(0f64, 20.0, &dev)
            .unwrap()
            .reshape((5, 4))
            .unwrap()
            * 0.1)
            .unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let y_ref = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), y_ref.to_vec2::<f64>().unwrap());
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
            g_ref.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        );
    }
}
