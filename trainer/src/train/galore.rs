//! GaLore (`use_galore`): the gradient of each target weight projected onto the top singular
//! vectors of the gradient itself (refreshed by an SVD every `galore_update_interval` steps),
//! Adam's moments kept in that `rank`-dimensional subspace — the memory saving — and the update
//! projected back and scaled by `galore_scale`, as `galore_torch.GaLoreProjector` computes it.
//!
//! APOLLO (`use_apollo`) projects the same way — by default with a Gaussian matrix scaled by
//! 1/√rank instead of singular vectors (`apollo_proj: random`) — but never projects back: the
//! low-rank Adam ratio only sets a scaling of the full gradient per channel (or per tensor),
//! bounded by a norm-growth limiter, as `apollo_torch.APOLLOAdamW` does.

use anyhow::{anyhow, Result};
use candle_core::Tensor;
use nalgebra::DMatrix;

use crate::model::linalg::{standard_normal, to_matrix, to_tensor};
use protocol::args::GaloreProjType;

/// GaLore's (or APOLLO's) settings for one weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaloreSpec {
    pub rank: usize,
    pub update_interval: usize,
    pub scale: f64,
    pub proj_type: GaloreProjType,
    /// A seeded Gaussian projection (APOLLO's `random`) instead of singular vectors.
    pub random: Option<u64>,
    /// APOLLO: the gradient scaling, in place of projecting the update back.
    pub apollo: Option<ApolloScale>,
}

impl GaloreSpec {
    /// The side a `rows × cols` gradient is projected on.
    pub fn side_of(&self, rows: usize, cols: usize) -> Side {
        match self.proj_type {
            GaloreProjType::Std if rows >= cols => Side::Right,
            GaloreProjType::Std => Side::Left,
            GaloreProjType::ReverseStd if rows >= cols => Side::Left,
            GaloreProjType::ReverseStd => Side::Right,
            GaloreProjType::Right => Side::Right,
            GaloreProjType::Left => Side::Left,
            GaloreProjType::Full => Side::Both,
        }
    }
}

/// APOLLO's `apollo_scale_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApolloScale {
    /// One factor per row or column (the side that was projected).
    Channel,
    /// One factor for the tensor.
    Tensor,
}

/// Which side a projection multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `G·Pᵀ` with `P = Vᵀ[:r]` (`r × cols`).
    Right,
    /// `Pᵀ·G` with `P = U[:, :r]` (`rows × r`).
    Left,
    /// `Uᵀ·G·Vᵀ` with both.
    Both,
}

/// One weight's projection and when it was made.
#[derive(Debug, Clone)]
pub struct Projector {
    spec: GaloreSpec,
    /// `P` of the current side (`Both`: left then right).
    ortho: Vec<Tensor>,
    /// Random projections made so far (each gets its own draw).
    draws: u64,
}

impl Projector {
    pub fn new(spec: GaloreSpec) -> Self {
        Self {
            spec,
            ortho: Vec::new(),
            draws: 0,
        }
    }

    /// The projection matrices, saved with the optimizer state.
    pub fn matrices(&self) -> &[Tensor] {
        &self.ortho
    }

    /// Restores saved projection matrices.
    pub fn set_matrices(&mut self, ortho: Vec<Tensor>) {
        self.ortho = ortho;
    }

    /// The low-rank gradient of `grad` at optimizer step `iter` (counted from 0), refreshing
    /// the projection from `grad`'s SVD on the first step and every `update_interval` steps.
    pub fn project(&mut self, grad: &Tensor, iter: usize) -> Result<Tensor> {
        let (rows, cols) = grad.dims2()?;
        let side = self.spec.side_of(rows, cols);
        if self.ortho.is_empty() || iter.is_multiple_of(self.spec.update_interval.max(1)) {
            if let Some(seed) = self.spec.random {
                self.ortho = vec![self.gaussian(rows, cols, side, seed, grad)?];
                self.draws += 1;
                return self.apply(grad, side);
            }
            let svd = to_matrix(grad)?.svd(true, true);
            let u = svd.u.ok_or_else(|| anyhow!("GaLore: SVD failed"))?;
            let vt = svd.v_t.ok_or_else(|| anyhow!("GaLore: SVD failed"))?;
            let r = self.spec.rank.min(rows).min(cols);
            let (dtype, device) = (grad.dtype(), grad.device());
            let left = || to_tensor(&u.columns(0, r).into_owned(), dtype, device);
            let right = || to_tensor(&vt.rows(0, r).into_owned(), dtype, device);
            self.ortho = match side {
                Side::Right => vec![right()?],
                Side::Left => vec![left()?],
                Side::Both => vec![left()?, right()?],
            };
        }
        self.apply(grad, side)
    }

    fn apply(&self, grad: &Tensor, side: Side) -> Result<Tensor> {
        let p = &self.ortho;
        Ok(match side {
            Side::Right => grad.matmul(&p[0].t()?)?,
            Side::Left => p[0].t()?.matmul(grad)?,
            Side::Both => p[0].t()?.matmul(grad)?.matmul(&p[1].t()?)?,
        })
    }

    /// APOLLO's random projection: standard normal entries over √rank, `rows × r` on the
    /// left or `r × cols` on the right, a fresh draw at every refresh.
    fn gaussian(
        &self,
        rows: usize,
        cols: usize,
        side: Side,
        seed: u64,
        like: &Tensor,
    ) -> Result<Tensor> {
        use rand::SeedableRng;
        let r = self.spec.rank;
        let (a, b) = match side {
            Side::Left => (rows, r),
            _ => (r, cols),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (self.draws << 32));
        let scale = 1.0 / (r as f64).sqrt();
        let m =
            DMatrix::from_row_iterator(a, b, (0..a * b).map(|_| standard_normal(&mut rng) * scale));
        to_tensor(&m, like.dtype(), like.device())
    }

    /// The low-rank update `low` back in the weight's shape, times `galore_scale` (the side
    /// chosen from `low`'s shape, as `project_back` does).
    pub fn project_back(&self, low: &Tensor) -> Result<Tensor> {
        let (rows, cols) = low.dims2()?;
        let p = &self.ortho;
        let right = || -> Result<Tensor> { Ok(low.matmul(&p[0])?) };
        let left = || -> Result<Tensor> { Ok(p[0].matmul(low)?) };
        let full = match self.spec.proj_type {
            GaloreProjType::Std if rows >= cols => right()?,
            GaloreProjType::Std => left()?,
            GaloreProjType::ReverseStd if rows <= cols => left()?,
            GaloreProjType::ReverseStd => right()?,
            GaloreProjType::Right => right()?,
            GaloreProjType::Left => left()?,
            GaloreProjType::Full => p[0].matmul(low)?.matmul(&p[1])?,
        };
        Ok((full * self.spec.scale)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_projection_refreshes_every_interval_and_keeps_its_side() {
        let spec = GaloreSpec {
            rank: 2,
            update_interval: 2,
            scale: 1.0,
            proj_type: GaloreProjType::Std,
            random: None,
            apollo: None,
        };
        let mut p = Projector::new(spec);
        let g = |seed: u64| {
            let v: Vec<f64> = (0..24)
                .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 500.0 - 1.0)
                .collect();
            Tensor::from_vec(v, (6, 4), &Device::Cpu).unwrap()
        };
        // Tall: projected on the right, (6, 2).
        assert_eq!(p.project(&g(1), 0).unwrap().dims(), [6, 2]);
        let first = p.matrices()[0].clone();
        p.project(&g(2), 1).unwrap();
        let same = (&first - &p.matrices()[0]).unwrap().abs().unwrap();
        assert_eq!(same.max_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
        p.project(&g(3), 2).unwrap();
        let moved = (&first - &p.matrices()[0]).unwrap().abs().unwrap();
        assert!(moved.max_all().unwrap().to_scalar::<f64>().unwrap() > 1e-3);
        // The projection is orthonormal: projecting back what was projected keeps the part in
        // the subspace, a projection of it again is unchanged.
        let low = p.project(&g(4), 3).unwrap();
        let back = p.project_back(&low).unwrap();
        let again = p.project(&back, 3).unwrap();
        let d = (&again - &low).unwrap().abs().unwrap();
        assert!(d.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
    }
}
