//! Learning-rate schedules, as `transformers.get_scheduler` defines them: a factor of the peak
//! learning rate for each optimizer step. The extra arguments some schedules take are
//! LLaMA-Factory's defaults (`cosine_with_min_lr`: a floor of 0.1; `warmup_stable_decay`: a
//! third of the post-warmup steps stable, the rest a half-cosine decay to 0).

use protocol::args::SchedulerType;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Linear,
    Cosine,
    /// Cosine with `cycles` hard restarts (transformers' default: 1).
    CosineWithRestarts {
        cycles: f64,
    },
    Constant,
    ConstantWithWarmup,
    CosineWithMinLr {
        min_lr_rate: f64,
    },
    Polynomial {
        lr_end_ratio: f64,
        power: f64,
    },
    InverseSqrt,
    /// Linear warmup, `stable` steps at the peak, then `decay` steps of a half-cosine to 0.
    WarmupStableDecay {
        stable: usize,
        decay: usize,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    shape: Shape,
    warmup: usize,
    total: usize,
}

impl LrSchedule {
    pub fn new(kind: SchedulerType, warmup: usize, total: usize, peak_lr: f64) -> Self {
        let shape = match kind {
            SchedulerType::Linear => Shape::Linear,
            SchedulerType::Cosine => Shape::Cosine,
            SchedulerType::CosineWithRestarts => Shape::CosineWithRestarts { cycles: 1.0 },
            SchedulerType::Constant => Shape::Constant,
            SchedulerType::ConstantWithWarmup => Shape::ConstantWithWarmup,
            // transformers requires `min_lr_rate`; LLaMA-Factory's UI uses 0.1.
            SchedulerType::CosineWithMinLr => Shape::CosineWithMinLr { min_lr_rate: 0.1 },
            SchedulerType::Polynomial => Shape::Polynomial {
                lr_end_ratio: 1e-7 / peak_lr.max(f64::MIN_POSITIVE),
                power: 1.0,
            },
            SchedulerType::InverseSqrt => Shape::InverseSqrt,
            // LLaMA-Factory's `create_custom_scheduler`.
            SchedulerType::WarmupStableDecay => {
                let remaining = total.saturating_sub(warmup);
                let stable = remaining / 3;
                Shape::WarmupStableDecay {
                    stable,
                    decay: remaining - stable,
                }
            }
        };
        Self {
            shape,
            warmup,
            total,
        }
    }

    /// Factor of the peak learning rate after `step` scheduler steps.
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warm = |s: f64| s / w.max(1.0);
        if step < self.warmup && self.shape != Shape::Constant {
            return warm(s);
        }
        let progress = (s - w) / (t - w).max(1.0);
        let half_cosine = |p: f64| 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        match self.shape {
            Shape::Constant | Shape::ConstantWithWarmup => 1.0,
            Shape::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Shape::Cosine => half_cosine(progress).max(0.0),
            Shape::CosineWithRestarts { cycles } => {
                if progress >= 1.0 {
                    0.0
                } else {
                    half_cosine((cycles * progress) % 1.0).max(0.0)
                }
            }
            Shape::CosineWithMinLr { min_lr_rate } => {
                half_cosine(progress) * (1.0 - min_lr_rate) + min_lr_rate
            }
            Shape::Polynomial {
                lr_end_ratio,
                power,
            } => {
                if s > t {
                    lr_end_ratio
                } else {
                    (1.0 - lr_end_ratio) * (1.0 - progress).powf(power) + lr_end_ratio
                }
            }
            Shape::InverseSqrt => {
                let timescale = if self.warmup > 0 { w } else { 10000.0 };
                let shift = timescale - w;
                1.0 / ((s + shift) / timescale).sqrt()
            }
            Shape::WarmupStableDecay { stable, decay } => {
                if step < self.warmup + stable {
                    1.0
                } else if step < self.warmup + stable + decay {
                    let p = (step - self.warmup - stable) as f64 / decay.max(1) as f64;
                    half_cosine(p).max(0.0)
                } else {
                    0.0
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn schedule(kind: SchedulerType, warmup: usize, total: usize) -> LrSchedule {
        LrSchedule::new(kind, warmup, total, 1e-4)
    }

    #[test]
    fn matches_transformers_formulas() {
        let lin = schedule(SchedulerType::Linear, 2, 10);
        let got: Vec<f64> = (0..=10).map(|s| lin.factor(s)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        assert!(got.iter().zip(want).all(|(a, b)| close(*a, b)), "{got:?}");
        let cos = schedule(SchedulerType::Cosine, 0, 10);
        assert!(
            close(cos.factor(5), 0.5) && close(cos.factor(0), 1.0) && close(cos.factor(10), 0.0)
        );
        let c = schedule(SchedulerType::Constant, 5, 10);
        assert!(close(c.factor(1), 1.0));
        let cw = schedule(SchedulerType::ConstantWithWarmup, 4, 10);
        assert!(close(cw.factor(1), 0.25) && close(cw.factor(7), 1.0));
        let m = schedule(SchedulerType::CosineWithMinLr, 0, 10);
        assert!(close(m.factor(10), 0.1));
        let p = schedule(SchedulerType::Polynomial, 0, 10);
        assert!(close(p.factor(5), 0.5 * (1.0 - 1e-3) + 1e-3));
        let inv = schedule(SchedulerType::InverseSqrt, 4, 100);
        assert!(close(inv.factor(2), 0.5) && close(inv.factor(16), 0.5));
    }

    /// Values of `transformers.get_scheduler(...)` (4.57) read off `LambdaLR` for
    /// `cosine_with_restarts` (num_cycles=1) and `warmup_stable_decay` with LLaMA-Factory's
    /// stable/decay split, warmup 2 of 11 steps: stable 3, decay 6.
    #[test]
    fn restarts_and_wsd_match_transformers() {
        let r = schedule(SchedulerType::CosineWithRestarts, 2, 10);
        let want = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.30865828381745514,
            0.14644660940672627,
            0.03806023374435663,
            0.0,
        ];
        for (s, w) in want.iter().enumerate() {
            assert!(close(r.factor(s), *w), "step {s}: {} vs {w}", r.factor(s));
        }
        let wsd = schedule(SchedulerType::WarmupStableDecay, 2, 11);
        let want = [
            0.0,
            0.5,
            1.0,
            1.0,
            1.0,
            1.0,
            0.9330127018922194,
            0.75,
            0.5,
            0.25,
            0.06698729810778081,
            0.0,
        ];
        for (s, w) in want.iter().enumerate() {
            assert!(
                close(wsd.factor(s), *w),
                "step {s}: {} vs {w}",
                wsd.factor(s)
            );
        }
    }
}
