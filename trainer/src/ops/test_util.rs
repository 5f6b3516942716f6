//! What the ops' unit tests share: smooth deterministic inputs and the size of a difference.

use candle_core::{Device, Shape, Tensor, Var};

/// A trainable f64 tensor of `shape` holding sin((i + seed) · freq).
pub(super) fn wave_var(shape: impl Into<Shape>, seed: f64, freq: f64) -> Var {
    let shape = shape.into();
    let v: Vec<f64> = (0..shape.elem_count())
        .map(|i| ((i as f64 + seed) * freq).sin())
        .collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
}

/// `len` f32 values sin(i · 0.37 + seed).
pub(super) fn wave(len: usize, seed: f32) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

/// The largest absolute entry of `t`.
pub(super) fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The largest absolute entry of `a - b`, computed in f64 (the two may differ in dtype).
pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    max_abs(&(f64(a) - f64(b)).unwrap())
}
