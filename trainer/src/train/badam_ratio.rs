//! BAdam's ratio mode (`badam_mode: ratio`), as `badam.BlockOptimizerRatio` runs it under
//! LLaMA-Factory: every tensor but the embedding and the head trains, but each step updates only
//! a `badam_update_ratio` share of each tensor's entries, and Adam keeps state for those alone.
//!
//! BlockOptimizerRatio's rules, kept: a tensor of `n` entries updates `⌊n · ratio⌋` of them;
//! `adjacent` masks take them consecutively (row-major) from the tensor's offset, wrapping
//! around; the offset moves on by that count every `switch_every` steps (100: LLaMA-Factory does
//! not pass it), when the Adam state starts afresh; tensors of one shape share one mask; a tensor
//! under 100 entries gets 1e-9 added to its gradient first. The update is its sparse Adam:
//! `m`, `v` over the masked entries, `θ −= lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)`, no weight decay.
//! `scatter` masks take a random permutation's window instead (from this engine's generator:
//! the package draws from torch's).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Tensor};
use protocol::args::BadamMaskMode;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// BlockOptimizerRatio's default `switch_every`, which LLaMA-Factory keeps.
pub const SWITCH_EVERY: usize = 100;
/// Below this many entries a gradient gets 1e-9 added before masking (`preserve_threshold`).
const PRESERVE_THRESHOLD: usize = 100;

/// The masks of ratio mode and when they move.
#[derive(Debug, Clone)]
pub struct RatioMasks {
    ratio: f64,
    mode: BadamMaskMode,
    switch_every: usize,
    seed: u64,
    /// Each tensor's offset into its entries.
    offsets: Vec<usize>,
    /// This step's mask of each tensor: sorted flat indices.
    pub masks: Vec<Vec<u32>>,
}

impl RatioMasks {
    pub fn new(
        count: usize,
        ratio: f64,
        mode: BadamMaskMode,
        switch_every: usize,
        seed: u64,
    ) -> Self {
        Self {
            ratio,
            mode,
            switch_every: switch_every.max(1),
            seed,
            offsets: vec![0; count],
            masks: vec![Vec::new(); count],
        }
    }

    fn mask_of(&self, shape: &[usize], offset: usize) -> Vec<u32> {
        let n: usize = shape.iter().product();
        let ones = (n as f64 * self.ratio) as usize;
        let window = |i: usize| (offset + i) % n.max(1);
        let mut idx: Vec<u32> = match self.mode {
            BadamMaskMode::Adjacent => (0..ones).map(|i| window(i) as u32).collect(),
            BadamMaskMode::Scatter => {
                // One permutation per shape, fixed for the run.
                let key = shape.iter().fold(self.seed, |h, &d| {
                    h.wrapping_mul(1_000_003).wrapping_add(d as u64)
                });
                let mut perm: Vec<u32> = (0..n as u32).collect();
                perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(key));
                (0..ones).map(|i| perm[window(i)]).collect()
            }
        };
        idx.sort_unstable();
        idx.dedup();
        idx
    }

    /// Keeps of each gradient only this step's masked entries (zeros elsewhere), as the
    /// package's gradient hook does, and records the masks for the update.
    pub fn restrict(&mut self, grads: &mut [Option<Tensor>]) -> Result<()> {
        let mut by_shape: HashMap<Vec<usize>, Vec<u32>> = HashMap::new();
        for (i, g) in grads.iter_mut().enumerate() {
            let Some(t) = g else {
                self.masks[i].clear();
                continue;
            };
            let shape = t.dims().to_vec();
            let mask = by_shape
                .entry(shape.clone())
                .or_insert_with(|| self.mask_of(&shape, self.offsets[i]))
                .clone();
            let mut values: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if values.len() < PRESERVE_THRESHOLD {
                values.iter_mut().for_each(|v| *v += 1e-9);
            }
            let mut kept = vec![0f32; values.len()];
            for &j in &mask {
                kept[j as usize] = values[j as usize];
            }
            *t = Tensor::from_vec(kept, t.shape(), t.device())?.to_dtype(t.dtype())?;
            self.masks[i] = mask;
        }
        Ok(())
    }

    /// Adam's step count for optimizer step `step` (from 1): steps since the state last
    /// started afresh.
    pub fn state_step(&self, step: usize) -> usize {
        (step - 1) % self.switch_every + 1
    }

    /// After optimizer step `step` (from 1): whether the Adam state starts afresh (the masks
    /// moved on).
    pub fn after_step(&mut self, step: usize, shapes: &[Vec<usize>]) -> bool {
        if !step.is_multiple_of(self.switch_every) {
            return false;
        }
        for (o, shape) in self.offsets.iter_mut().zip(shapes) {
            let n: usize = shape.iter().product();
            *o = (*o + (n as f64 * self.ratio) as usize) % n.max(1);
        }
        true
    }
}

/// Sparse Adam on `theta`'s masked entries: the package's `_sparse_adam`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_adam(
    theta: &Tensor,
    grad: &Tensor,
    mask: &[u32],
    m: &mut Vec<f32>,
    v: &mut Vec<f32>,
    step: usize,
    lr: f64,
    (beta1, beta2, eps): (f64, f64, f64),
) -> Result<Tensor> {
    if m.len() != mask.len() {
        *m = vec![0.0; mask.len()];
        *v = vec![0.0; mask.len()];
    }
    let g: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut w: Vec<f32> = theta.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let t = step as i32;
    let step_size = (lr * (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t))) as f32;
    let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
    for (k, &j) in mask.iter().enumerate() {
        let gj = g[j as usize];
        m[k] += (gj - m[k]) * (1.0 - b1);
        v[k] += (gj * gj - v[k]) * (1.0 - b2);
        w[j as usize] -= step_size * (m[k] / (v[k].sqrt() + eps));
    }
    Ok(Tensor::from_vec(w, theta.shape(), theta.device())?.to_dtype(theta.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adjacent_masks_wrap_and_move_on_at_the_switch() {
        let mut r = RatioMasks::new(1, 0.5, BadamMaskMode::Adjacent, 2, 0);
        assert_eq!(r.mask_of(&[2, 3], 0), [0, 1, 2]);
        assert_eq!(r.mask_of(&[2, 3], 4), [0, 4, 5]);
        let shapes = vec![vec![2, 3]];
        assert!(!r.after_step(1, &shapes));
        assert!(r.after_step(2, &shapes));
        assert_eq!(r.offsets, [3]);
    }

    /// Seven steps of `badam.BlockOptimizerRatio` on fixed gradients
    /// (`scripts/badam_ratio_reference.py`), through the same masking and update.
    #[test]
    fn equals_blockoptimizerratio_on_fixed_gradients() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/optim/badam_ratio.json"
        );
        let f: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let names: Vec<String> = f["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        let shape = |n: &str| -> Vec<usize> {
            f["shapes"][n]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect()
        };
        let tensor = |v: &serde_json::Value, n: &str| -> Tensor {
            let data: Vec<f32> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            Tensor::from_vec(data, shape(n), &Device::Cpu).unwrap()
        };
        // The embedding and the head never train.
        let trained: Vec<&String> = names
            .iter()
            .filter(|n| !n.contains("embed") && !n.contains("lm_head"))
            .collect();
        let shapes: Vec<Vec<usize>> = trained.iter().map(|n| shape(n)).collect();
        for case in f["cases"].as_array().unwrap() {
            let ratio = case["ratio"].as_f64().unwrap();
            let mut masks = RatioMasks::new(trained.len(), ratio, BadamMaskMode::Adjacent, 3, 0);
            let mut theta: Vec<Tensor> = trained
                .iter()
                .map(|n| tensor(&f["init"][n.as_str()], n))
                .collect();
            let (mut m, mut v) = (
                vec![Vec::new(); trained.len()],
                vec![Vec::new(); trained.len()],
            );

            for (s, g) in f["grads"].as_array().unwrap().iter().enumerate() {
                let mut grads: Vec<Option<Tensor>> = trained
                    .iter()
                    .map(|n| Some(tensor(&g[n.as_str()], n)))
                    .collect();
                masks.restrict(&mut grads).unwrap();
                for i in 0..trained.len() {
                    theta[i] = sparse_adam(
                        &theta[i],
                        grads[i].as_ref().unwrap(),
                        &masks.masks[i],
                        &mut m[i],
                        &mut v[i],
                        masks.state_step(s + 1),
                        f["lr"].as_f64().unwrap(),
                        (0.9, 0.999, 1e-8),
                    )
                    .unwrap();
                }
                if masks.after_step(s + 1, &shapes) {
                    m.iter_mut().for_each(Vec::clear);
                    v.iter_mut().for_each(Vec::clear);
                }
                for (i, n) in trained.iter().enumerate() {
                    let want: Vec<f64> = case["steps"][s][n.as_str()]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect();
                    let got: Vec<f32> = theta[i].flatten_all().unwrap().to_vec1().unwrap();
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (f64::from(*a) - b).abs() < 1e-6,
                            "ratio {ratio} step {s} {n}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
