//! Dense matrices between candle tensors and nalgebra (whose SVD and QR PiSSA, LoftQ, GaLore and
//! APOLLO use), computed in f64, and the standard normal draws their random sketches take.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A 2-D tensor as an f64 matrix.
pub fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(DMatrix::from_row_slice(rows, cols, &v))
}

/// A matrix as a tensor of `dtype` on `device`.
pub fn to_tensor(m: &DMatrix<f64>, dtype: DType, device: &Device) -> Result<Tensor> {
    let rows: Vec<f64> = m.transpose().iter().copied().collect();
    Ok(
        Tensor::from_vec(rows, (m.nrows(), m.ncols()), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?,
    )
}

/// A standard normal draw (Box–Muller).
pub fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
