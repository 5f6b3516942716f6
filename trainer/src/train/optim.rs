//! AdamW as `torch.optim.AdamW` computes it, with state that can be saved and restored, parameter
//! groups (weight decay off for biases and norms; LoRA+ learning-rate ratios) and global-norm
//! gradient clipping. With GaLore it is `galore_torch.GaLoreAdamW` instead: the projected
//! weights' moments live in their low-rank subspace ([`super::galore`]), and every tensor takes
//! that optimizer's update (epsilon added to √v before the bias correction, which goes into the
//! step size; weight decay applied after the step).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use protocol::TrainArgs;

use super::galore::{ApolloScale, GaloreSpec, Projector};
use protocol::args::{ApolloProj, ApolloProjType, ApolloScaleType, GaloreProjType};

pub struct ParamGroup {
    pub name: String,
    pub var: Var,
    pub weight_decay: f64,
    pub lr_scale: f64,
    /// GaLore's projection of this weight's gradient.
    pub galore: Option<GaloreSpec>,
}

/// Which AdamW computes the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// `torch.optim.AdamW`.
    Torch,
    /// `galore_torch.GaLoreAdamW` (transformers' old AdamW plus projections).
    Galore,
}

pub struct AdamW {
    pub params: Vec<ParamGroup>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step: usize,
    pub rule: Rule,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    projectors: Vec<Option<Projector>>,
    /// APOLLO's norm-growth limiter: the last scaled gradient's norm.
    limiter: Vec<Option<f64>>,
    /// Whether [`AdamW::check_gradients_once`] has checked a step's gradients.
    gradients_checked: bool,
    /// BAdam's ratio mode: each step updates masked entries only (see [`super::badam_ratio`]).
    pub ratio: Option<super::badam_ratio::RatioMasks>,
    /// Ratio mode's sparse moments, per tensor.
    sparse: Vec<(Vec<f32>, Vec<f32>)>,
    /// Whether f32 CPU parameters take [`AdamW::fused_update`] (tests compare both ways).
    fused: bool,
}

/// Whether `t`'s values can be read as one f32 slice (what the one-pass paths take).
fn contiguous_f32_cpu(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous()
}

/// One AdamW step's constants for a parameter, as f32 (as candle's scalar ops cast them).
struct AdamStep {
    /// `1 − lr · weight_decay`, when there is weight decay.
    decay: Option<f32>,
    beta1: f32,
    keep1: f32,
    beta2: f32,
    keep2: f32,
    /// `1 / √(1 − β₂ᵗ)`.
    inv_bc2: f32,
    eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    size: f32,
}

impl AdamStep {
    /// `(θ', m', v')`. Each line is one of the composed update's tensor ops, written as candle
    /// computes it (a scalar op is `x · mul + add`), so the results are the same bits.
    fn apply(&self, theta: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> [Vec<f32>; 3] {
        let n = theta.len();
        let (mut t2, mut m2, mut v2) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in 0..n {
            let th = match self.decay {
                Some(d) => theta[i] * d + 0.0,
                None => theta[i],
            };
            let mi = (m[i] * self.beta1 + 0.0) + (g[i] * self.keep1 + 0.0);
            let vi = (v[i] * self.beta2 + 0.0) + ((g[i] * g[i]) * self.keep2 + 0.0);
            let denom = (vi.sqrt() * self.inv_bc2 + 0.0) * 1.0 + self.eps;
            let update = (mi / denom) * self.size + 0.0;
            t2.push(th - update);
            m2.push(mi);
            v2.push(vi);
        }
        [t2, m2, v2]
    }
}

/// APOLLO's update for a weight: the full gradient `full` scaled by the ratio of the low-rank
/// Adam update `norm` to the low-rank gradient `low` (per channel: the rows of a right
/// projection, the columns of a left one; or per tensor), its norm kept from growing more than
/// 1% a step, times √scale.
fn apollo_scaled(
    full: &Tensor,
    low: &Tensor,
    norm: &Tensor,
    scale_type: ApolloScale,
    scale: f64,
    last: &mut Option<f64>,
) -> Result<Tensor> {
    let l2 = |t: &Tensor| -> candle_core::Result<Tensor> { t.sqr()?.sum_all()?.sqrt() };
    let (rows, cols) = full.dims2()?;
    let factor = match scale_type {
        ApolloScale::Tensor => (l2(norm)? / (l2(low)? + 1e-8)?)?,
        ApolloScale::Channel => {
            // torch.norm(x, dim=norm_dim): dim 0 when the gradient is wide, else dim 1.
            let dim = if rows < cols { 0 } else { 1 };
            (norm.sqr()?.sum_keepdim(dim)?.sqrt()?
                / (low.sqr()?.sum_keepdim(dim)?.sqrt()? + 1e-8)?)?
        }
    };
    let mut scaled = full.broadcast_mul(&factor)?;
    let n = l2(&scaled)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    match *last {
        Some(prev) => {
            let limiter = (n / (prev + 1e-8)).max(1.01) / 1.01;
            scaled = (scaled / limiter)?;
            *last = Some(n / limiter);
        }
        None => *last = Some(n),
    }
    Ok((scaled * scale.sqrt())?)
}

/// transformers' `get_decay_parameter_names`: no decay for biases and norm weights.
pub fn decays(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(n.contains("bias")
        || n.contains("layernorm")
        || n.contains("rmsnorm")
        || n.contains(".norm.")
        || n.contains("_norm"))
}

impl AdamW {
    pub fn new(params: Vec<ParamGroup>, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let m = params
            .iter()
            .map(|p| p.var.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let projectors: Vec<Option<Projector>> = params
            .iter()
            .map(|p| p.galore.map(Projector::new))
            .collect();
        let rule = if params.iter().any(|p| p.galore.is_some()) {
            Rule::Galore
        } else {
            Rule::Torch
        };
        Ok(Self {
            params,
            beta1,
            beta2,
            eps,
            step: 0,
            rule,
            m,
            v,
            limiter: vec![None; projectors.len()],
            projectors,
            gradients_checked: false,
            ratio: None,
            sparse: Vec::new(),
            fused: true,
        })
    }

    /// BAdam's ratio mode over `params`: no dense moments, only the masked entries' (see
    /// [`super::badam_ratio`]).
    pub fn ratio(
        params: Vec<ParamGroup>,
        (beta1, beta2, eps): (f64, f64, f64),
        masks: super::badam_ratio::RatioMasks,
    ) -> Result<Self> {
        let none = |p: &ParamGroup| Tensor::zeros(0, DType::F32, p.var.device());
        let m = params
            .iter()
            .map(none)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            v: m.clone(),
            m,
            limiter: vec![None; params.len()],
            projectors: params.iter().map(|_| None).collect(),
            sparse: vec![(Vec::new(), Vec::new()); params.len()],
            params,
            beta1,
            beta2,
            eps,
            step: 0,
            rule: Rule::Torch,
            gradients_checked: false,
            ratio: Some(masks),
            fused: true,
        })
    }

    /// The optimizer of a training run over `trainable` tensors: `weight_decay` except on
    /// biases and norms, LoRA+'s `loraplus_lr_ratio` on the B matrices, the Adam betas and
    /// epsilon of `args`.
    pub fn for_training(
        trainable: Vec<(String, Var)>,
        args: &TrainArgs,
        galore_targets: &[String],
    ) -> Result<Self> {
        let galore = if args.use_galore {
            Some(GaloreSpec {
                rank: args.galore_rank,
                update_interval: args.galore_update_interval,
                scale: args.galore_scale,
                proj_type: args.galore_proj_type,
                random: None,
                apollo: None,
            })
        } else if args.use_apollo {
            Some(GaloreSpec {
                rank: args.apollo_rank,
                update_interval: args.apollo_update_interval,
                scale: args.apollo_scale,
                proj_type: match args.apollo_proj_type {
                    ApolloProjType::Std => GaloreProjType::Std,
                    ApolloProjType::Right => GaloreProjType::Right,
                    ApolloProjType::Left => GaloreProjType::Left,
                },
                random: (args.apollo_proj == ApolloProj::Random).then_some(args.seed),
                apollo: Some(match args.apollo_scale_type {
                    ApolloScaleType::Channel => ApolloScale::Channel,
                    ApolloScaleType::Tensor => ApolloScale::Tensor,
                }),
            })
        } else {
            None
        };
        let groups = trainable
            .into_iter()
            .enumerate()
            .map(|(i, (name, var))| ParamGroup {
                // LLaMA-Factory's: the 2-D weights of the target linear modules. APOLLO's
                // random projections are seeded per tensor (by its position).
                galore: galore
                    .filter(|_| {
                        var.rank() == 2
                            && name
                                .strip_suffix(".weight")
                                .is_some_and(|m| galore_targets.iter().any(|t| m == t))
                    })
                    .map(|s| GaloreSpec {
                        random: s
                            .random
                            .map(|seed| seed.wrapping_mul(1_000_003) + i as u64 + 1),
                        ..s
                    }),
                lr_scale: match args.loraplus_lr_ratio {
                    Some(r) if name.contains("lora_B") => r,
                    _ => 1.0,
                },
                weight_decay: if decays(&name) {
                    args.weight_decay
                } else {
                    0.0
                },
                name,
                var,
            })
            .collect();
        Self::new(groups, args.adam_beta1, args.adam_beta2, args.adam_epsilon)
    }

    /// This optimizer's gradients out of a backward pass, in parameter order.
    pub fn grads_of(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            // Detached: a gradient computed by a custom backward from graph tensors would
            // otherwise keep that graph alive in the optimizer's moments.
            .map(|p| store.get(p.var.as_tensor()).map(Tensor::detach))
            .collect()
    }

    /// Adds a backward pass's gradients to `sum` (gradient accumulation over micro-batches).
    pub fn accumulate(&self, sum: &mut [Option<Tensor>], store: &GradStore) -> Result<()> {
        for (slot, g) in sum.iter_mut().zip(self.grads_of(store)) {
            *slot = match (slot.take(), g) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
        }
        Ok(())
    }

    /// [`AdamW::check_gradients`] on the first gradients this optimizer is given (the first
    /// step of every run, resumed or not).
    pub fn check_gradients_once(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if !self.gradients_checked {
            self.check_gradients(grads)?;
            self.gradients_checked = true;
        }
        Ok(())
    }

    /// Fails when a trainable tensor got no gradient: candle ops without a backward drop
    /// gradients silently.
    pub fn check_gradients(&self, grads: &[Option<Tensor>]) -> Result<()> {
        let missing: Vec<&str> = self
            .params
            .iter()
            .zip(grads)
            .filter(|(_, g)| g.is_none())
            .map(|(p, _)| p.name.as_str())
            .collect();
        if let Some(first) = missing.first() {
            anyhow::bail!(
                "internal error: no gradient reached {} trainable tensors (first: {first})",
                missing.len()
            );
        }
        Ok(())
    }

    /// Pre-clipping global L2 norm of the gradients; scales them to `max_norm` when above it.
    pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
        use rayon::prelude::*;
        // Each tensor's Σ g² in f64: f32 CPU ones in one pass each, shared over the threads.
        let squares: Vec<f64> = grads
            .par_iter()
            .flatten()
            .map(|g| -> Result<f64> {
                if contiguous_f32_cpu(g) {
                    return Ok(crate::ops::with_f32(g, |s| {
                        s.iter().map(|&x| x as f64 * x as f64).sum::<f64>()
                    })?);
                }
                Ok(g.to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?)
            })
            .collect::<Result<_>>()?;
        let norm = squares.iter().sum::<f64>().sqrt();
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                for g in grads.iter_mut().flatten() {
                    *g = (&*g * coef)?;
                }
            }
        }
        Ok(norm)
    }

    /// Ratio-mode BAdam keeps of each gradient only this step's masked entries (before the
    /// gradient norm is taken, as its gradient hook runs before clipping); a no-op otherwise.
    pub fn restrict_gradients(&mut self, grads: &mut [Option<Tensor>]) -> Result<()> {
        match self.ratio.as_mut() {
            Some(r) => r.restrict(grads),
            None => Ok(()),
        }
    }

    /// One update with learning rate `lr` (before each group's scale).
    pub fn update(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if self.ratio.is_some() {
            return self.ratio_update(grads, lr);
        }
        if self.rule == Rule::Galore {
            return self.galore_update(grads, lr);
        }
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let fused = match self.fused {
            true => self.fused_update(grads, lr, bc1, bc2)?,
            false => vec![false; self.params.len()],
        };
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            if fused[i] {
                continue;
            }
            let lr = lr * p.lr_scale;
            let mut theta = p.var.as_tensor().clone();
            if p.weight_decay != 0.0 {
                theta = (&theta * (1.0 - lr * p.weight_decay))?;
            }
            self.m[i] = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = (self.m[i].div(&denom)? * (lr / bc1))?;
            p.var.set(&(theta - update)?)?;
        }
        Ok(())
    }

    /// The update of every f32 CPU parameter (with contiguous gradient and moments) in one
    /// pass per tensor, the tensors shared out over the threads: the same f32 operations in the
    /// same order as the composed update in [`AdamW::update`] (so the same bits), without its
    /// dozen tensors per parameter and serial passes. Which parameters it updated.
    fn fused_update(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        bc1: f64,
        bc2: f64,
    ) -> Result<Vec<bool>> {
        use rayon::prelude::*;
        let fits: Vec<bool> = (0..self.params.len())
            .map(|i| {
                let theta = self.params[i].var.as_tensor();
                grads[i].as_ref().is_some_and(|g| {
                    [theta, g, &self.m[i], &self.v[i]]
                        .into_iter()
                        .all(contiguous_f32_cpu)
                })
            })
            .collect();
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        let (m, v) = (&self.m, &self.v);
        let updated: Vec<(usize, [Vec<f32>; 3])> = self
            .params
            .par_iter()
            .enumerate()
            .filter(|(i, _)| fits[*i])
            .map(|(i, p)| {
                let g = grads[i].as_ref().expect("fits");
                let lr = lr * p.lr_scale;
                let step = AdamStep {
                    decay: (p.weight_decay != 0.0).then_some((1.0 - lr * p.weight_decay) as f32),
                    beta1: beta1 as f32,
                    keep1: (1.0 - beta1) as f32,
                    beta2: beta2 as f32,
                    keep2: (1.0 - beta2) as f32,
                    inv_bc2: (1.0 / bc2.sqrt()) as f32,
                    eps: eps as f32,
                    size: (lr / bc1) as f32,
                };
                let out = crate::ops::with_f32(p.var.as_tensor(), |theta| {
                    crate::ops::with_f32(g, |g| {
                        crate::ops::with_f32(&m[i], |m| {
                            crate::ops::with_f32(&v[i], |v| step.apply(theta, g, m, v))
                        })
                    })
                })????;
                Ok((i, out))
            })
            .collect::<candle_core::Result<_>>()?;
        for (i, [theta, m, v]) in updated {
            let p = &self.params[i];
            let (shape, dev) = (p.var.shape().clone(), p.var.device().clone());
            self.m[i] = Tensor::from_vec(m, shape.clone(), &dev)?;
            self.v[i] = Tensor::from_vec(v, shape.clone(), &dev)?;
            p.var.set(&Tensor::from_vec(theta, shape, &dev)?)?;
        }
        Ok(fits)
    }

    /// `BlockOptimizerRatio.step`: sparse Adam on the masked entries; the state starts afresh
    /// when the masks move on.
    fn ratio_update(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let Some(ratio) = self.ratio.as_mut() else {
            return Ok(());
        };
        self.step += 1;
        let state_step = ratio.state_step(self.step);
        self.sparse
            .resize(self.params.len(), (Vec::new(), Vec::new()));
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let (m, v) = &mut self.sparse[i];
            let theta = super::badam_ratio::sparse_adam(
                p.var.as_tensor(),
                g,
                &ratio.masks[i],
                m,
                v,
                state_step,
                lr * p.lr_scale,
                (self.beta1, self.beta2, self.eps),
            )?;
            p.var.set(&theta)?;
        }
        let shapes: Vec<Vec<usize>> = self.params.iter().map(|p| p.var.dims().to_vec()).collect();
        if ratio.after_step(self.step, &shapes) {
            self.sparse.iter_mut().for_each(|(m, v)| {
                m.clear();
                v.clear();
            });
        }
        Ok(())
    }

    /// `GaLoreAdamW.step`.
    fn galore_update(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let iter = self.step;
        self.step += 1;
        let t = self.step as i32;
        let step_size = (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t));
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let lr = lr * p.lr_scale;
            let g = match &mut self.projectors[i] {
                Some(proj) => proj.project(g, iter)?,
                None => g.clone(),
            };
            if self.m[i].dims() != g.dims() {
                self.m[i] = g.zeros_like()?;
                self.v[i] = g.zeros_like()?;
            }
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mut norm = self.m[i].div(&(self.v[i].sqrt()? + self.eps)?)?;
            match (
                &self.projectors[i],
                p.galore.and_then(|s| s.apollo.map(|a| (s, a))),
            ) {
                (Some(_), Some((spec, scale))) => {
                    norm = apollo_scaled(
                        &grads[i].clone().expect("checked above"),
                        &g,
                        &norm,
                        scale,
                        spec.scale,
                        &mut self.limiter[i],
                    )?;
                }
                (Some(proj), None) => norm = proj.project_back(&norm)?,
                _ => {}
            }
            let mut theta = (p.var.as_tensor() - (norm * (lr * step_size))?)?;
            if p.weight_decay > 0.0 {
                theta = (&theta * (1.0 - lr * p.weight_decay))?;
            }
            p.var.set(&theta)?;
        }
        Ok(())
    }

    /// Elements of optimizer state (the moments; GaLore's projections), for the log.
    pub fn state_elements(&self) -> usize {
        if let Some(r) = &self.ratio {
            return r.masks.iter().map(|m| 2 * m.len()).sum();
        }
        self.params
            .iter()
            .map(|p| {
                let Some(s) = p.galore else {
                    return 2 * p.var.elem_count();
                };
                let (r, c) = p.var.as_tensor().dims2().unwrap_or((0, 0));
                let k = s.rank.min(r).min(c);
                let (low, proj) = match s.side_of(r, c) {
                    super::galore::Side::Right => (r * k, k * c),
                    super::galore::Side::Left => (k * c, r * k),
                    super::galore::Side::Both => (k * k, k * (r + c)),
                };
                2 * low + proj
            })
            .sum()
    }

    /// Moments by parameter name plus the step count, for checkpoints.
    /// The trained tensors, in the order of [`AdamW::params`] (and of the gradients).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        if self.ratio.is_some() {
            let dev = candle_core::Device::Cpu;
            for (p, (m, v)) in self.params.iter().zip(&self.sparse) {
                out.insert(
                    format!("exp_avg.{}", p.name),
                    Tensor::from_slice(m, m.len(), &dev)?,
                );
                out.insert(
                    format!("exp_avg_sq.{}", p.name),
                    Tensor::from_slice(v, v.len(), &dev)?,
                );
            }
            out.insert("step".into(), Tensor::new(&[self.step as f64], &dev)?);
            return Ok(out);
        }
        for (i, p) in self.params.iter().enumerate() {
            out.insert(format!("exp_avg.{}", p.name), self.m[i].clone());
            out.insert(format!("exp_avg_sq.{}", p.name), self.v[i].clone());
            if let Some(proj) = &self.projectors[i] {
                for (k, t) in proj.matrices().iter().enumerate() {
                    out.insert(format!("galore.{k}.{}", p.name), t.clone());
                }
            }
        }
        out.insert(
            "step".into(),
            Tensor::new(
                &[self.step as f64],
                self.m
                    .first()
                    .map(|t| t.device())
                    .unwrap_or(&candle_core::Device::Cpu),
            )?,
        );
        Ok(out)
    }

    pub fn load_state(&mut self, file: &Path) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let t: HashMap<String, Tensor> = candle_core::safetensors::load(file, &device)
            .map_err(|e| anyhow!("cannot read optimizer state {}: {e}", file.display()))?;
        let scalar = |k: &str| -> Result<usize> {
            let s = t
                .get(k)
                .ok_or_else(|| anyhow!("{}: `{k}` missing", file.display()))?;
            Ok(s.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as usize)
        };
        if let Some(ratio) = self.ratio.as_mut() {
            for (p, (m, v)) in self.params.iter().zip(self.sparse.iter_mut()) {
                let get = |k: String| -> Result<Vec<f32>> {
                    Ok(t.get(&k)
                        .ok_or_else(|| anyhow!("{}: `{k}` missing", file.display()))?
                        .to_dtype(DType::F32)?
                        .to_vec1()?)
                };
                *m = get(format!("exp_avg.{}", p.name))?;
                *v = get(format!("exp_avg_sq.{}", p.name))?;
            }
            self.step = scalar("step")?;
            // The masks where the run left them.
            let shapes: Vec<Vec<usize>> =
                self.params.iter().map(|p| p.var.dims().to_vec()).collect();
            for step in 1..=self.step {
                ratio.after_step(step, &shapes);
            }
            return Ok(());
        }
        for (i, p) in self.params.iter().enumerate() {
            let get = |k: String| -> Result<Tensor> {
                let dtype = p.var.dtype();
                Ok(t.get(&k)
                    .ok_or_else(|| anyhow!("{}: `{k}` missing", file.display()))?
                    .to_dtype(dtype)?)
            };
            self.m[i] = get(format!("exp_avg.{}", p.name))?;
            self.v[i] = get(format!("exp_avg_sq.{}", p.name))?;
            if let Some(proj) = &mut self.projectors[i] {
                let saved: Vec<Tensor> = (0..2)
                    .map_while(|k| t.get(&format!("galore.{k}.{}", p.name)).cloned())
                    .collect();
                proj.set_matrices(saved);
            }
        }
        let step = t
            .get("step")
            .ok_or_else(|| anyhow!("{}: `step` missing", file.display()))?;
        self.step = step.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_torch_reference() {
        // torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) on
        // p = [1, -2], loss = sum(p^2) for two steps gives:
        let want = [0.7985190749168396, -1.7962726354599];
        let var = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![ParamGroup {
                name: "p".into(),
                var: var.clone(),
                weight_decay: 0.01,
                lr_scale: 1.0,
                galore: None,
            }],
            0.9,
            0.999,
            1e-8,
        )
        .unwrap();
        for _ in 0..2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = opt.grads_of(&loss.backward().unwrap());
            opt.update(&grads, 0.1).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(
            !decays("model.layers.0.input_layernorm.weight")
                && !decays("model.norm.weight")
                && !decays("x.bias")
        );
    }

    /// The global gradient norm over f32 and f64 gradients (and a missing one) is the f64 norm
    /// of all their entries; above `max_norm` every gradient is scaled by `max_norm / (norm +
    /// 1e-6)`, below it none is.
    #[test]
    fn gradient_norm_and_clipping() {
        let f32s: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.1).sin()).collect();
        let f64s = [3.0f64, -4.0];
        let want = (f32s.iter().map(|&x| x as f64 * x as f64).sum::<f64>() + 25.0).sqrt();
        let grads = || {
            vec![
                Some(Tensor::from_vec(f32s.clone(), (50, 100), &Device::Cpu).unwrap()),
                None,
                Some(Tensor::new(&f64s, &Device::Cpu).unwrap()),
            ]
        };
        let mut g = grads();
        let norm = AdamW::clip_grad_norm(&mut g, 1e9).unwrap();
        assert!((norm - want).abs() <= 1e-12 * want, "{norm} vs {want}");
        assert_eq!(g[2].as_ref().unwrap().to_vec1::<f64>().unwrap(), f64s);
        let mut g = grads();
        AdamW::clip_grad_norm(&mut g, 1.0).unwrap();
        let coef = 1.0 / (want + 1e-6);
        let got = g[2].as_ref().unwrap().to_vec1::<f64>().unwrap();
        assert!((got[0] - 3.0 * coef).abs() < 1e-12 && (got[1] + 4.0 * coef).abs() < 1e-12);
        let first = g[0]
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((first[1] - f32s[1] * coef as f32).abs() < 1e-7);
    }

    /// In f32 on the CPU the update runs fused, one pass per tensor: the same bits as the
    /// composed tensor ops over five steps (with and without weight decay, LoRA+'s learning-rate
    /// scale, a parameter without a gradient), and torch's values for the reference problem.
    #[test]
    fn fused_f32_update_is_the_composed_one() {
        let init = |i: usize| {
            let v: Vec<f32> = (0..300)
                .map(|j| ((i * 300 + j) as f32 * 0.37).sin())
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, 300, &Device::Cpu).unwrap()).unwrap()
        };
        let run = |fused: bool| {
            let vars: Vec<Var> = (0..3).map(init).collect();
            let groups = vars
                .iter()
                .enumerate()
                .map(|(i, v)| ParamGroup {
                    name: format!("p{i}"),
                    var: v.clone(),
                    weight_decay: if i == 0 { 0.0 } else { 0.01 },
                    lr_scale: if i == 2 { 16.0 } else { 1.0 },
                    galore: None,
                })
                .collect();
            let mut opt = AdamW::new(groups, 0.9, 0.999, 1e-8).unwrap();
            opt.fused = fused;
            for step in 0..5 {
                let grads: Vec<Option<Tensor>> = vars
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let g = (v.as_tensor() * (0.5 + step as f64))
                            .unwrap()
                            .cos()
                            .unwrap();
                        (i != 1 || step % 2 == 0).then_some(g)
                    })
                    .collect();
                opt.update(&grads, 1e-2).unwrap();
            }
            let values: Vec<Vec<f32>> = vars
                .iter()
                .map(|v| v.as_tensor().to_vec1().unwrap())
                .collect();
            (values, opt.m.clone(), opt.v.clone())
        };
        let (fused, composed) = (run(true), run(false));
        assert!(fused.0 == composed.0, "parameters differ");
        for (a, b) in fused
            .1
            .iter()
            .chain(&fused.2)
            .zip(composed.1.iter().chain(&composed.2))
        {
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
        assert!(
            fused.0[0] != init(0).as_tensor().to_vec1::<f32>().unwrap(),
            "it moved"
        );

        // torch's two steps of the reference problem (`adamw_matches_torch_reference`) in f32.
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let group = ParamGroup {
            name: "p".into(),
            var: var.clone(),
            weight_decay: 0.01,
            lr_scale: 1.0,
            galore: None,
        };
        let mut opt = AdamW::new(vec![group], 0.9, 0.999, 1e-8).unwrap();
        for _ in 0..2 {
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = opt.grads_of(&loss.backward().unwrap());
            opt.update(&grads, 0.1).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip([0.798_519_1_f32, -1.796_272_6]) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    /// `scripts/optim_reference.py`'s fixture `name`.
    fn fixture(name: &str) -> serde_json::Value {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/optim")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Runs the shared gradients of `galore.json` (a bias, a tall and a wide weight) through an
    /// optimizer whose weights take `spec` (eps 1e-3, lr 0.01, decay 0.01 on the weights) and
    /// compares every value after each of the first `steps` steps with `case["steps"]`.
    fn replay(spec: GaloreSpec, case: &serde_json::Value, steps: usize, label: &str) {
        let e = fixture("galore.json");
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let tensor = |k: &str, v: &serde_json::Value| -> Tensor {
            let shape: Vec<usize> = e["shapes"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            Tensor::from_vec(floats(v), shape, &Device::Cpu).unwrap()
        };
        let names = ["bias", "w_tall", "w_wide"];
        let vars: Vec<Var> = names
            .iter()
            .map(|k| Var::from_tensor(&tensor(k, &e["init"][*k])).unwrap())
            .collect();
        let groups = names
            .iter()
            .zip(&vars)
            .map(|(k, v)| ParamGroup {
                name: k.to_string(),
                var: v.clone(),
                weight_decay: if *k == "bias" { 0.0 } else { 0.01 },
                lr_scale: 1.0,
                galore: (*k != "bias").then_some(spec),
            })
            .collect();
        let mut opt = AdamW::new(groups, 0.9, 0.999, 1e-3).unwrap();
        assert_eq!(opt.rule, Rule::Galore);
        for (step, g) in e["grads"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .take(steps)
        {
            let grads: Vec<Option<Tensor>> =
                names.iter().map(|k| Some(tensor(k, &g[*k]))).collect();
            opt.update(&grads, 0.01).unwrap();
            for (k, v) in names.iter().zip(&vars) {
                let ours: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let theirs = floats(&case["steps"][step][*k]);
                let worst = ours
                    .iter()
                    .zip(&theirs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                // The references take their SVDs of f64 gradients in f32: their projections
                // carry f32 rounding (ours are f64).
                assert!(
                    worst < 2e-6,
                    "{label}: `{k}` after step {}: off by {worst}",
                    step + 1
                );
            }
        }
    }

    /// `galore_torch.GaLoreAdamW` on the same gradients: every projection type over three
    /// steps, and a projection refreshed at every step.
    #[test]
    fn galore_matches_galore_torch() {
        use protocol::args::GaloreProjType;
        use protocol::options::Choice;
        for case in fixture("galore.json")["cases"].as_array().unwrap() {
            let interval = case["update_interval"].as_u64().unwrap() as usize;
            let spec = GaloreSpec {
                rank: 2,
                update_interval: interval,
                scale: 0.25,
                proj_type: GaloreProjType::parse(case["proj_type"].as_str().unwrap()).unwrap(),
                random: None,
                apollo: None,
            };
            // A refreshed projection carries the SVD's arbitrary signs, which differ between
            // LAPACK and nalgebra, and the moments kept from the old basis then mix
            // differently: with a refresh at every step only the first step is compared.
            let steps = if interval == 1 { 1 } else { 3 };
            replay(
                spec,
                case,
                steps,
                &format!("GaLore {:?} every {interval}", spec.proj_type),
            );
        }
    }

    /// `apollo_torch.APOLLOAdamW` on the same gradients, with its SVD projection: channel and
    /// tensor scaling, three projection sides, the norm-growth limiter (from step 2).
    #[test]
    fn apollo_matches_apollo_torch() {
        use protocol::args::GaloreProjType;
        use protocol::options::Choice;
        let a = fixture("apollo.json");
        for case in a["cases"].as_array().unwrap() {
            let spec = GaloreSpec {
                rank: 2,
                update_interval: 200,
                scale: a["scale"].as_f64().unwrap(),
                proj_type: GaloreProjType::parse(case["proj_type"].as_str().unwrap()).unwrap(),
                random: None,
                apollo: Some(if case["scale_type"] == "channel" {
                    ApolloScale::Channel
                } else {
                    ApolloScale::Tensor
                }),
            };
            replay(
                spec,
                case,
                3,
                &format!("APOLLO {} {}", case["proj_type"], case["scale_type"]),
            );
        }
    }
}
