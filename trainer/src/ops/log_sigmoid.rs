//! `log σ(x)` with an exact gradient everywhere: the stable formula
//! `min(x, 0) - log(1 + e^{-|x|})` has kinks whose tie-breaking in autograd gives a wrong
//! gradient at exactly 0 (a margin of 0 is common in preference losses), so its backward is
//! written out: `d/dx log σ(x) = σ(-x) = 1 / (1 + e^x)`.

use candle_core::{Result, Tensor};

use super::attach::attach;

fn stable(x: &Tensor) -> Result<Tensor> {
    let min0 = x.minimum(&x.zeros_like()?)?;
    min0 - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let y0 = stable(&x.detach())?;
    let input_grad = |x: &Tensor, g: &Tensor| -> Result<Tensor> { g * (x.exp()? + 1.0)?.recip()? };
    match attach("log-sigmoid", x, y0, input_grad)? {
        Some(y) => Ok(y),
        // Off the CPU: the smooth (unstabilised) form, exact away from overflow.
        None => Ok(((x.neg()?.exp()? + 1.0)?.log()?.neg())?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn value_and_gradient_including_zero_and_extremes() {
        let xs = [-800.0f64, -3.0, 0.0, 2.5, 800.0];
        let v = Var::new(&xs, &Device::Cpu).unwrap();
        let y = log_sigmoid(v.as_tensor()).unwrap();
        let got: Vec<f64> = y.to_vec1().unwrap();
        for (x, g) in xs.iter().zip(&got) {
            let want = if *x < 0.0 {
                x - (1.0 + x.exp()).ln()
            } else {
                -(1.0 + (-x).exp()).ln()
            };
            assert!((g - want).abs() < 1e-12, "{x}: {g} vs {want}");
        }
        let grads = y.sum_all().unwrap().backward().unwrap();
        let d: Vec<f64> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        let want: Vec<f64> = xs.iter().map(|x| 1.0 / (1.0 + x.exp())).collect();
        for (a, b) in d.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{d:?} vs {want:?}");
        }
    }
}
