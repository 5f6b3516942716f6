//! Preference and reward losses as LLaMA-Factory computes them (TRL's DPO / KTO formulas and
//! LLaMA-Factory's own ORPO and SimPO), over per-example sequence log-probabilities. Inputs
//! are `(batch,)` tensors; each function returns the per-example losses and the reward
//! metrics TRL logs. ipo, orpo and simpo expect length-averaged log-probabilities.

use anyhow::{bail, Result};
use candle_core::Tensor;

pub use crate::ops::log_sigmoid;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PrefLoss {
    Sigmoid { label_smoothing: f64 },
    Hinge,
    Ipo,
    Orpo,
    Simpo { gamma: f64 },
}

impl PrefLoss {
    pub fn from_args(a: &protocol::TrainArgs) -> Self {
        use protocol::args::PrefLossType as T;
        match a.pref_loss {
            T::Sigmoid => Self::Sigmoid {
                label_smoothing: a.dpo_label_smoothing,
            },
            T::Hinge => Self::Hinge,
            T::Ipo => Self::Ipo,
            T::Orpo => Self::Orpo,
            T::Simpo => Self::Simpo {
                gamma: a.simpo_gamma,
            },
        }
    }

    /// ORPO and SimPO need no reference model.
    pub fn needs_reference(self) -> bool {
        !matches!(self, Self::Orpo | Self::Simpo { .. })
    }

    /// ipo, orpo and simpo compare length-averaged log-probabilities.
    pub fn length_averaged(self) -> bool {
        matches!(self, Self::Ipo | Self::Orpo | Self::Simpo { .. })
    }
}

pub struct PrefOutput {
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// Per-example preference losses. `reference` holds the reference model's (chosen, rejected)
/// log-probabilities when the loss uses one.
pub fn preference_loss(
    kind: PrefLoss,
    beta: f64,
    chosen: &Tensor,
    rejected: &Tensor,
    reference: Option<(&Tensor, &Tensor)>,
) -> Result<PrefOutput> {
    match kind {
        PrefLoss::Orpo => {
            // log odds(p) = log p - log(1 - p), with log p the averaged log-probability.
            let log1m = |x: &Tensor| -> Result<Tensor> { Ok((x.exp()?.neg()? + 1.0)?.log()?) };
            let log_odds = ((chosen - rejected)? - (log1m(chosen)? - log1m(rejected)?)?)?;
            let sft = chosen.neg()?;
            let losses = (sft + (log_sigmoid(&log_odds)?.neg()? * beta)?)?;
            Ok(PrefOutput {
                losses,
                chosen_rewards: (chosen.detach() * beta)?,
                rejected_rewards: (rejected.detach() * beta)?,
            })
        }
        PrefLoss::Simpo { gamma } => {
            let logits = ((chosen - rejected)? - gamma / beta)?;
            let losses = log_sigmoid(&(logits * beta)?)?.neg()?;
            Ok(PrefOutput {
                losses,
                chosen_rewards: (chosen.detach() * beta)?,
                rejected_rewards: (rejected.detach() * beta)?,
            })
        }
        _ => {
            let Some((ref_c, ref_r)) = reference else {
                bail!("this preference loss needs the reference model's log-probabilities")
            };
            let logits = ((chosen - rejected)? - (ref_c - ref_r)?)?;
            let losses = match kind {
                PrefLoss::Sigmoid {
                    label_smoothing: eps,
                } => {
                    let bl = (&logits * beta)?;
                    ((log_sigmoid(&bl)?.neg()? * (1.0 - eps))?
                        + (log_sigmoid(&bl.neg()?)?.neg()? * eps)?)?
                }
                PrefLoss::Hinge => ((&logits * beta)?.neg()? + 1.0)?.relu()?,
                PrefLoss::Ipo => (logits - 1.0 / (2.0 * beta))?.sqr()?,
                _ => unreachable!("reference-free losses are handled above"),
            };
            Ok(PrefOutput {
                losses,
                chosen_rewards: ((chosen - ref_c)?.detach() * beta)?,
                rejected_rewards: ((rejected - ref_r)?.detach() * beta)?,
            })
        }
    }
}

/// TRL's KTO loss. `kl` holds the policy and reference log-probabilities of the mismatched
/// (KL) completions; desirable and undesirable examples come as separate vectors.
pub fn kto_loss(
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
    chosen: Option<(&Tensor, &Tensor)>,
    rejected: Option<(&Tensor, &Tensor)>,
    kl: (&Tensor, &Tensor),
) -> Result<Tensor> {
    let kl_est = (kl.0 - kl.1)?
        .mean_all()?
        .detach()
        .clamp(0.0, f64::INFINITY)?;
    let mut parts = Vec::new();
    if let Some((pc, rc)) = chosen {
        let ratio = (pc - rc)?;
        let l = ((log_sigmoid(&(ratio.broadcast_sub(&kl_est)? * beta)?)?
            .exp()?
            .neg()?
            + 1.0)?
            * desirable_weight)?;
        parts.push(l);
    }
    if let Some((pr, rr)) = rejected {
        let ratio = (pr - rr)?;
        let l = ((log_sigmoid(&(ratio.broadcast_sub(&kl_est)?.neg()? * beta)?)?
            .exp()?
            .neg()?
            + 1.0)?
            * undesirable_weight)?;
        parts.push(l);
    }
    if parts.is_empty() {
        bail!("a KTO batch needs at least one example");
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Pairwise reward-model loss `-log σ(r_chosen - r_rejected)` per pair.
pub fn reward_loss(chosen_scores: &Tensor, rejected_scores: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(&(chosen_scores - rejected_scores)?)?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn vals(x: &Tensor) -> Vec<f64> {
        x.to_vec1().unwrap()
    }
    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }
    fn ls(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn losses_match_hand_computed_values() {
        let (c, r, rc, rr) = (
            t(&[-1.0, -3.0]),
            t(&[-2.0, -1.5]),
            t(&[-1.2, -2.0]),
            t(&[-1.8, -2.0]),
        );
        let beta = 0.1;
        // logits = (c - r) - (rc - rr) = [1 - 0.6, -1.5 - 0] = [0.4, -1.5]
        let logits = [0.4, -1.5];
        let out = preference_loss(
            PrefLoss::Sigmoid {
                label_smoothing: 0.0,
            },
            beta,
            &c,
            &r,
            Some((&rc, &rr)),
        )
        .unwrap();
        close(&vals(&out.losses), &logits.map(|l| -ls(beta * l)));
        close(&vals(&out.chosen_rewards), &[beta * 0.2, -beta]);
        let smooth = preference_loss(
            PrefLoss::Sigmoid {
                label_smoothing: 0.2,
            },
            beta,
            &c,
            &r,
            Some((&rc, &rr)),
        )
        .unwrap();
        close(
            &vals(&smooth.losses),
            &logits.map(|l| -ls(beta * l) * 0.8 - ls(-beta * l) * 0.2),
        );
        let h = preference_loss(PrefLoss::Hinge, beta, &c, &r, Some((&rc, &rr))).unwrap();
        close(&vals(&h.losses), &logits.map(|l| (1.0 - beta * l).max(0.0)));
        let ipo = preference_loss(PrefLoss::Ipo, beta, &c, &r, Some((&rc, &rr))).unwrap();
        close(
            &vals(&ipo.losses),
            &logits.map(|l| (l - 1.0 / (2.0 * beta)).powi(2)),
        );
        let s = preference_loss(PrefLoss::Simpo { gamma: 0.5 }, 2.0, &c, &r, None).unwrap();
        close(
            &vals(&s.losses),
            &[-ls(2.0 * (1.0 - 0.25)), -ls(2.0 * (-1.5 - 0.25))],
        );
        let o = preference_loss(PrefLoss::Orpo, beta, &c, &r, None).unwrap();
        let odds = |p: f64| p - (1.0 - p.exp()).ln();
        close(
            &vals(&o.losses),
            &[
                1.0 - beta * ls(odds(-1.0) - odds(-2.0)),
                3.0 - beta * ls(odds(-3.0) - odds(-1.5)),
            ],
        );
        assert!(
            preference_loss(PrefLoss::Hinge, beta, &c, &r, None).is_err(),
            "hinge needs a reference"
        );
        let rm = reward_loss(&t(&[2.0, 0.0]), &t(&[1.0, 1.0])).unwrap();
        close(&vals(&rm), &[-ls(1.0), -ls(-1.0)]);
        // KTO: kl = max(mean([-1, -2] - [-1.5, -1.5]), 0) = 0
        let k = kto_loss(
            0.1,
            1.0,
            2.0,
            Some((&t(&[-1.0]), &t(&[-1.4]))),
            Some((&t(&[-2.0]), &t(&[-1.0]))),
            (&t(&[-1.0, -2.0]), &t(&[-1.5, -1.5])),
        )
        .unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        close(
            &vals(&k),
            &[1.0 - sig(0.1 * 0.4), 2.0 * (1.0 - sig(0.1 * 1.0))],
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let c0 = [-1.0, -3.0, -0.7];
        let r0 = [-2.0, -1.5, -0.9];
        let rc = t(&[-1.2, -2.0, -1.0]);
        let rr = t(&[-1.8, -2.0, -0.8]);
        for kind in [
            PrefLoss::Sigmoid {
                label_smoothing: 0.1,
            },
            PrefLoss::Hinge,
            PrefLoss::Ipo,
            PrefLoss::Orpo,
            PrefLoss::Simpo { gamma: 0.5 },
        ] {
            let f = |c: &Tensor, r: &Tensor| -> Tensor {
                preference_loss(kind, 0.5, c, r, Some((&rc, &rr)))
                    .unwrap()
                    .losses
                    .sum_all()
                    .unwrap()
            };
            let cv = Var::new(&c0, &Device::Cpu).unwrap();
            let rv = Var::new(&r0, &Device::Cpu).unwrap();
            let grads = f(cv.as_tensor(), rv.as_tensor()).backward().unwrap();
            let gc = vals(grads.get(cv.as_tensor()).unwrap());
            let h = 1e-6;
            for i in 0..3 {
                let mut up = c0;
                up[i] += h;
                let mut down = c0;
                down[i] -= h;
                let fd = (f(&t(&up), &t(&r0)).to_scalar::<f64>().unwrap()
                    - f(&t(&down), &t(&r0)).to_scalar::<f64>().unwrap())
                    / (2.0 * h);
                assert!(
                    (fd - gc[i]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "{kind:?} d/dchosen[{i}]: {fd} vs {}",
                    gc[i]
                );
            }
            assert!(
                grads.get(rv.as_tensor()).is_some(),
                "{kind:?}: rejected gets a gradient"
            );
        }
    }
}
