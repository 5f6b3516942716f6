//! `x · Wᵀ` for a frozen `W`: one GEMM outside the graph, re-attached to `x` with the backward
//! `dx = g · W` only. candle's own matmul backward would also compute `xᵀ · g` for `W` (a third
//! of a step's GEMM work) and keep it in the gradient store, though nothing reads it.

use candle_core::{Result, Tensor};

use super::attach::attach;

/// `x (N, in) · wᵀ → (N, out)`, differentiable in `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = w.detach();
    let y0 = x.detach().matmul(&w.t()?)?;
    let wb = w.clone();
    match attach("frozen-linear", x, y0, move |_x, g| g.matmul(&wb))? {
        Some(y) => Ok(y),
        None => x.matmul(&w.t()?),
    }
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
