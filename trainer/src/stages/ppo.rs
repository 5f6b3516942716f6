//! PPO's arithmetic as TRL's `PPOTrainer` (the API LLaMA-Factory's PPO stage drives) does it:
//! per-token KL-penalised rewards, GAE, whitening, score normalisation, the adaptive KL
//! coefficient and the clipped policy + value loss. Token sequences are kept unpadded: each
//! response is a slice of per-token numbers, which is what TRL's masks select.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// TRL's `PPOConfig` defaults that LLaMA-Factory leaves alone.
pub const GAMMA: f64 = 1.0;
pub const LAM: f64 = 0.95;
pub const CLIPRANGE: f64 = 0.2;
pub const CLIPRANGE_VALUE: f64 = 0.2;
pub const VF_COEF: f64 = 0.1;
pub const INIT_KL_COEF: f64 = 0.2;
pub const KL_HORIZON: f64 = 10_000.0;
/// A minibatch whose mean probability ratio exceeds this is skipped (loss × 0).
pub const RATIO_THRESHOLD: f64 = 10.0;

/// `-kl_coef · (logp - ref_logp)` per token, with the score added at the last token.
pub fn token_rewards(score: f64, logps: &[f64], ref_logps: &[f64], kl_coef: f64) -> Vec<f64> {
    let mut r: Vec<f64> = logps
        .iter()
        .zip(ref_logps)
        .map(|(l, r)| -kl_coef * (l - r))
        .collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalised advantage estimation over one response (the value after its end is 0).
/// Returns (advantages, returns).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// `(x - mean) / sqrt(var + 1e-8)` over every token of every sequence, with the unbiased
/// variance; `shift_mean: false` adds the mean back (TRL's `masked_whiten`).
pub fn whiten(seqs: &mut [Vec<f64>], shift_mean: bool) {
    let n: usize = seqs.iter().map(Vec::len).sum();
    if n < 2 {
        return;
    }
    let mean = seqs.iter().flatten().sum::<f64>() / n as f64;
    let var = seqs
        .iter()
        .flatten()
        .map(|x| (x - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let inv = 1.0 / (var + 1e-8).sqrt();
    for x in seqs.iter_mut().flatten() {
        *x = (*x - mean) * inv + if shift_mean { 0.0 } else { mean };
    }
}

/// Running mean and standard deviation of reward-model scores (TRL's `RunningMoments`),
/// for `ppo_score_norm`.
#[derive(Debug, Clone)]
pub struct RunningMoments {
    pub mean: f64,
    pub std: f64,
    pub var: f64,
    pub count: f64,
}

impl Default for RunningMoments {
    fn default() -> Self {
        Self {
            mean: 0.0,
            std: 1.0,
            var: 1.0,
            count: 1e-24,
        }
    }
}

impl RunningMoments {
    pub fn update(&mut self, xs: &[f64]) {
        let k = xs.len() as f64;
        if xs.is_empty() {
            return;
        }
        let mean = xs.iter().sum::<f64>() / k;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / k;
        let delta = mean - self.mean;
        let total = self.count + k;
        let sum = self.var * self.count + delta * delta * self.count * k / total + var * k;
        self.mean += delta * k / total;
        let new_var = sum / total;
        self.std = (new_var * total / (total - 1.0)).max(0.0).sqrt();
        self.var = new_var;
        self.count = total;
    }

    /// TRL with `use_score_scaling` and `use_score_norm` (what `ppo_score_norm` turns on):
    /// update the moments with the batch, then `(s - mean) / (std + eps)`.
    pub fn normalize(&mut self, scores: &[f64]) -> Vec<f64> {
        self.update(scores);
        let scale = self.std + f32::EPSILON as f64;
        scores.iter().map(|s| (s - self.mean) / scale).collect()
    }
}

/// TRL's adaptive KL controller: nudges the coefficient toward `target` KL (`ppo_target`).
#[derive(Debug, Clone)]
pub struct AdaptiveKl {
    pub value: f64,
    pub target: f64,
    pub horizon: f64,
}

impl AdaptiveKl {
    pub fn new(target: f64) -> Self {
        Self {
            value: INIT_KL_COEF,
            target,
            horizon: KL_HORIZON,
        }
    }

    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        let err = (current_kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.value *= 1.0 + err * n_steps as f64 / self.horizon;
    }
}

/// What one minibatch's PPO loss reports besides the loss tensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossStats {
    pub total: f64,
    pub policy: f64,
    pub value: f64,
    pub clipfrac: f64,
    pub approx_kl: f64,
    pub mean_ratio: f64,
}

/// Rollout quantities of a minibatch's tokens, in the order the new forward pass sees them.
pub struct OldTokens<'a> {
    pub logps: &'a [f64],
    pub values: &'a [f64],
    pub advantages: &'a [f64],
    pub returns: &'a [f64],
}

/// TRL's `PPOTrainer.loss`: clipped surrogate + `vf_coef` × clipped value loss, means over
/// the response tokens of the minibatch. `logps` and `vpreds` are the `(n,)` outputs of the
/// current policy and value head.
pub fn ppo_loss(logps: &Tensor, vpreds: &Tensor, old: &OldTokens) -> Result<(Tensor, LossStats)> {
    let n = old.logps.len();
    let dev = logps.device();
    let dt = logps.dtype();
    let t = |x: &[f64]| -> Result<Tensor> { Ok(Tensor::from_slice(x, n, dev)?.to_dtype(dt)?) };
    let (old_lp, old_v, adv, ret) = (
        t(old.logps)?,
        t(old.values)?,
        t(old.advantages)?,
        t(old.returns)?,
    );
    let lo = (&old_v - CLIPRANGE_VALUE)?;
    let hi = (&old_v + CLIPRANGE_VALUE)?;
    let vclipped = vpreds.maximum(&lo)?.minimum(&hi)?;
    let vf1 = (vpreds - &ret)?.sqr()?;
    let vf2 = (&vclipped - &ret)?.sqr()?;
    let vf_loss = (vf1.maximum(&vf2)?.mean_all()? * 0.5)?;

    let log_ratio = (logps - &old_lp)?;
    let ratio = log_ratio.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()? * ratio.clamp(1.0 - CLIPRANGE, 1.0 + CLIPRANGE)?)?;
    let pg_loss = pg1.maximum(&pg2)?.mean_all()?;
    let mut loss = (&pg_loss + (&vf_loss * VF_COEF)?)?;

    let f = |x: &Tensor| -> Result<f64> { Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let v = |x: &Tensor| -> Result<Vec<f64>> { Ok(x.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let (p1, p2) = (v(&pg1)?, v(&pg2)?);
    let clipfrac = p1.iter().zip(&p2).filter(|(a, b)| b > a).count() as f64 / n.max(1) as f64;
    let lr = v(&log_ratio)?;
    let mean_ratio = lr.iter().map(|x| x.exp()).sum::<f64>() / n.max(1) as f64;
    let approx_kl = 0.5 * lr.iter().map(|x| x * x).sum::<f64>() / n.max(1) as f64;
    let mut stats = LossStats {
        total: f(&loss)?,
        policy: f(&pg_loss)?,
        value: VF_COEF * f(&vf_loss)?,
        clipfrac,
        approx_kl,
        mean_ratio,
    };
    if mean_ratio > RATIO_THRESHOLD {
        loss = (loss * 0.0)?;
        stats.total = 0.0;
    }
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_by_hand() {
        // rewards r, values v, γ=1, λ=0.95: δ2 = 1 - 0.3, δ1 = 0 + 0.3 - 0.2, δ0 = 0 + 0.2 - 0.1
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.1, 0.2, 0.3], 1.0, 0.95);
        let d2 = 0.7;
        let d1 = 0.1 + 0.95 * d2;
        let d0 = 0.1 + 0.95 * d1;
        for (x, y) in a.iter().zip([d0, d1, d2]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        assert!((r[0] - (d0 + 0.1)).abs() < 1e-12);
    }

    #[test]
    fn rewards_whiten_moments_and_kl_controller_by_hand() {
        let r = token_rewards(2.0, &[-1.0, -2.0], &[-1.5, -1.0], 0.2);
        assert!((r[0] - (-0.1)).abs() < 1e-12 && (r[1] - (0.2 + 2.0)).abs() < 1e-12);

        let mut s = vec![vec![1.0, 2.0], vec![3.0]];
        whiten(&mut s, true);
        // mean 2, unbiased var 1.
        let inv = 1.0 / (1.0f64 + 1e-8).sqrt();
        assert!(
            (s[0][0] + inv).abs() < 1e-12 && s[0][1].abs() < 1e-12 && (s[1][0] - inv).abs() < 1e-12
        );

        let mut m = RunningMoments::default();
        let n = m.normalize(&[1.0, 3.0]);
        // First batch: mean ≈ 2, std = sqrt(2) (unbiased over 2 values, count ≈ 2).
        assert!((m.mean - 2.0).abs() < 1e-9 && (m.std - 2f64.sqrt()).abs() < 1e-9);
        assert!((n[0] + 1.0 / 2f64.sqrt()).abs() < 1e-6);
        m.update(&[5.0]);
        // Same as the moments of [1, 3, 5]: mean 3, unbiased std 2.
        assert!(
            (m.mean - 3.0).abs() < 1e-9 && (m.std - 2.0).abs() < 1e-9,
            "{m:?}"
        );

        let mut kl = AdaptiveKl::new(6.0);
        kl.update(12.0, 100); // error clipped to 0.2
        assert!((kl.value - 0.2 * (1.0 + 0.2 * 100.0 / 10_000.0)).abs() < 1e-15);
        kl.update(5.4, 100); // error -0.1
        assert!((kl.value - 0.2 * 1.002 * (1.0 - 0.1 * 0.01)).abs() < 1e-15);
    }

    #[test]
    fn loss_matches_a_scalar_reference() {
        use candle_core::Device;
        let old = OldTokens {
            logps: &[-1.0, -2.0, -0.5],
            values: &[0.5, -0.2, 0.1],
            advantages: &[1.0, -0.5, 0.3],
            returns: &[1.2, -0.1, 0.0],
        };
        let new_lp: [f64; 3] = [-0.7, -2.4, -0.45];
        let vpred: [f64; 3] = [0.9, -0.15, 0.05];
        let lp = Tensor::new(&new_lp, &Device::Cpu).unwrap();
        let vp = Tensor::new(&vpred, &Device::Cpu).unwrap();
        let (loss, stats) = ppo_loss(&lp, &vp, &old).unwrap();
        let (mut pg, mut vf, mut clipped) = (0.0, 0.0, 0);
        for i in 0..3 {
            let ratio = (new_lp[i] - old.logps[i]).exp();
            let a = old.advantages[i];
            let p1 = -a * ratio;
            let p2 = -a * ratio.clamp(0.8, 1.2);
            pg += p1.max(p2) / 3.0;
            clipped += usize::from(p2 > p1);
            let vc = vpred[i].clamp(old.values[i] - 0.2, old.values[i] + 0.2);
            let r = old.returns[i];
            vf += 0.5 * (vpred[i] - r).powi(2).max((vc - r).powi(2)) / 3.0;
        }
        let want = pg + 0.1 * vf;
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!((stats.policy - pg).abs() < 1e-12 && (stats.value - 0.1 * vf).abs() < 1e-12);
        assert_eq!(stats.clipfrac, clipped as f64 / 3.0);
        assert!(clipped > 0, "the example should exercise clipping");
    }

    #[test]
    fn loss_gradients_match_finite_differences() {
        use candle_core::{Device, Var};
        let old = OldTokens {
            logps: &[-1.0, -2.0, -0.5, -1.2],
            values: &[0.5, -0.2, 0.1, 0.0],
            advantages: &[1.0, -0.5, 0.3, -1.1],
            returns: &[1.2, -0.1, 0.0, 0.4],
        };
        // Points away from the kinks of max/clamp, inside and outside the clip ranges.
        let lp0 = [-0.7, -2.4, -0.45, -1.25];
        let vp0 = [0.9, -0.15, 0.05, 0.13];
        let lp = Var::new(&lp0, &Device::Cpu).unwrap();
        let vp = Var::new(&vp0, &Device::Cpu).unwrap();
        let (loss, _) = ppo_loss(lp.as_tensor(), vp.as_tensor(), &old).unwrap();
        let g = loss.backward().unwrap();
        let glp: Vec<f64> = g.get(&lp).unwrap().to_vec1().unwrap();
        let gvp: Vec<f64> = g.get(&vp).unwrap().to_vec1().unwrap();
        let f = |a: &[f64], b: &[f64]| -> f64 {
            let a = Tensor::new(a, &Device::Cpu).unwrap();
            let b = Tensor::new(b, &Device::Cpu).unwrap();
            ppo_loss(&a, &b, &old)
                .unwrap()
                .0
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-6;
        for i in 0..4 {
            let (mut up, mut dn) = (lp0, lp0);
            up[i] += h;
            dn[i] -= h;
            let fd = (f(&up, &vp0) - f(&dn, &vp0)) / (2.0 * h);
            assert!((fd - glp[i]).abs() < 1e-6, "logp {i}: {fd} vs {}", glp[i]);
            let (mut up, mut dn) = (vp0, vp0);
            up[i] += h;
            dn[i] -= h;
            let fd = (f(&lp0, &up) - f(&lp0, &dn)) / (2.0 * h);
            assert!((fd - gvp[i]).abs() < 1e-6, "value {i}: {fd} vs {}", gvp[i]);
        }
        assert!(glp.contains(&0.0), "a clipped token has no policy gradient");
        assert!(glp.iter().any(|x| *x != 0.0));
    }
}
