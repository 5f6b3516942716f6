//! PiSSA (`pissa_init`): LoRA's A and B from the principal singular vectors and values of each
//! target weight, `W = U·S·Vᵀ`: `A = √(S_r/s)·V_rᵀ`, `B = U_r·√(S_r/s)` (s the LoRA scale), and
//! the base weight replaced by the residual `W − s·B·A`, so the model starts where it was and
//! LoRA trains the principal part (PEFT's `init_lora_weights="pissa"`). `pissa_iter` ≥ 0 uses
//! the randomized SVD of Halko et al. with that many power iterations (`"pissa_niter_N"`, what
//! `torch.svd_lowrank` computes), exact SVD with −1.
//!
//! `pissa_convert` turns the trained adapter into one that applies to the original base (PEFT's
//! `path_initial_model_for_weight_conversion`): `ΔW = s·(B·A − B₀·A₀)` is the rank-2r adapter
//! `[B, −B₀]·[A; A₀]` with rank and alpha doubled.

use anyhow::{bail, Result};
use candle_core::Tensor;
use nalgebra::DMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::linalg::{standard_normal, to_matrix, to_tensor};

/// How the top singular triplets are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Svd {
    /// Full SVD (`pissa_iter: -1`).
    Exact,
    /// Randomized SVD with this many power iterations.
    Randomized(usize),
}

impl Svd {
    /// `pissa_iter` as LLaMA-Factory reads it.
    pub fn from_pissa_iter(pissa_iter: i64) -> Self {
        if pissa_iter < 0 {
            Self::Exact
        } else {
            Self::Randomized(pissa_iter as usize)
        }
    }

    /// PEFT's `init_lora_weights` value.
    pub fn peft_name(self) -> String {
        match self {
            Self::Exact => "pissa".into(),
            Self::Randomized(n) => format!("pissa_niter_{n}"),
        }
    }

    /// Reads PEFT's `init_lora_weights` (`None` when it is not PiSSA).
    pub fn from_peft_name(v: &str) -> Option<Self> {
        match v {
            "pissa" => Some(Self::Exact),
            _ => v
                .strip_prefix("pissa_niter_")
                .and_then(|n| n.parse().ok())
                .map(Self::Randomized),
        }
    }
}

/// The top `r` singular triplets `(U_r, S_r, V_rᵀ)` of `w`.
fn top_singular(
    w: &DMatrix<f64>,
    r: usize,
    svd: Svd,
    seed: u64,
) -> (DMatrix<f64>, Vec<f64>, DMatrix<f64>) {
    match svd {
        Svd::Exact => {
            let s = w.clone().svd(true, true);
            let (u, vt) = (s.u.expect("u computed"), s.v_t.expect("vᵀ computed"));
            (
                u.columns(0, r).into_owned(),
                s.singular_values.iter().take(r).copied().collect(),
                vt.rows(0, r).into_owned(),
            )
        }
        Svd::Randomized(niter) => {
            // Halko et al.'s algorithm as `torch.svd_lowrank` runs it: a Gaussian sketch,
            // `niter` power iterations each re-orthonormalized, then the SVD of the small
            // projection `Qᵀ·W`.
            let (m, n) = w.shape();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let g = DMatrix::from_fn(n, r, |_, _| standard_normal(&mut rng));
            let orth = |x: DMatrix<f64>| x.qr().q();
            let mut q = orth(w * g);
            for _ in 0..niter {
                q = orth(w.transpose() * &q);
                q = orth(w * &q);
            }
            let b = q.transpose() * w;
            let s = b.svd(true, true);
            let (u, vt) = (s.u.expect("u computed"), s.v_t.expect("vᵀ computed"));
            let k = r.min(m).min(n);
            (
                (&q * u).columns(0, k).into_owned(),
                s.singular_values.iter().take(k).copied().collect(),
                vt.rows(0, k).into_owned(),
            )
        }
    }
}

/// PiSSA's `(A, B, residual)` for the weight `w (out, in)` with rank `r` and LoRA scale
/// `scale`, in `w`'s dtype (computed in f64).
pub fn factors(
    w: &Tensor,
    r: usize,
    scale: f64,
    svd: Svd,
    seed: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (out_f, in_f) = w.dims2()?;
    if r > out_f.min(in_f) {
        bail!("PiSSA: rank {r} is larger than the {out_f}×{in_f} weight allows");
    }
    let m = to_matrix(w)?;
    let (u, s, vt) = top_singular(&m, r, svd, seed);
    let root: Vec<f64> = s.iter().map(|x| (x / scale).sqrt()).collect();
    let a = DMatrix::from_fn(r, in_f, |i, j| root[i] * vt[(i, j)]);
    let b = DMatrix::from_fn(out_f, r, |i, j| u[(i, j)] * root[j]);
    let residual = &m - (&b * &a) * scale;
    let (dtype, device) = (w.dtype(), w.device());
    Ok((
        to_tensor(&a, dtype, device)?,
        to_tensor(&b, dtype, device)?,
        to_tensor(&residual, dtype, device)?,
    ))
}

/// PEFT's conversion of a trained PiSSA adapter `(a, b)` started at `(a0, b0)`: the rank-2r
/// adapter `([a; a0], [b, −b0])` on the original base.
pub fn convert(a: &Tensor, b: &Tensor, a0: &Tensor, b0: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((Tensor::cat(&[a, a0], 0)?, Tensor::cat(&[b, &b0.neg()?], 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A matrix with a clear spectral gap after `r` values (randomized SVD converges there).
    fn gapped(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut g = |r, c| DMatrix::<f64>::from_fn(r, c, |_, _| standard_normal(&mut rng));
        let u = g(rows, rows).qr().q();
        let v = g(cols, cols).qr().q();
        let k = rows.min(cols);
        let s = DMatrix::from_fn(rows, cols, |i, j| {
            if i == j && i < k {
                if i < 4 {
                    8.0 - i as f64
                } else {
                    0.01 / (i as f64)
                }
            } else {
                0.0
            }
        });
        to_tensor(&(u * s * v.transpose()), DType::F32, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn residual_plus_scaled_product_is_the_weight_and_randomized_finds_the_exact_subspace() {
        let w = gapped(24, 40, 1);
        let (a, b, res) = factors(&w, 4, 2.0, Svd::Exact, 0).unwrap();
        let back = (&res + (b.matmul(&a).unwrap() * 2.0).unwrap()).unwrap();
        assert!(max_diff(&back, &w) < 1e-5);
        let (ra, rb, rres) = factors(&w, 4, 2.0, Svd::Randomized(4), 7).unwrap();
        let (p, rp) = (b.matmul(&a).unwrap(), rb.matmul(&ra).unwrap());
        assert!(max_diff(&p, &rp) < 1e-4, "{}", max_diff(&p, &rp));
        assert!(max_diff(&res, &rres) < 1e-4);
        assert_eq!(
            Svd::from_peft_name(&Svd::Randomized(16).peft_name()),
            Some(Svd::Randomized(16))
        );
        assert_eq!(Svd::from_peft_name("pissa"), Some(Svd::Exact));
        assert_eq!(Svd::from_peft_name("gaussian"), None);
    }
}
