//! Learning-rate schedules, as `transformers.get_scheduler` defines them: a factor of the peak
//! learning rate for each optimizer step.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
    CosineWithMinLr { min_lr_rate: f64 },
    Polynomial { lr_end_ratio: f64, power: f64 },
    InverseSqrt,
}

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub warmup: usize,
    pub total: usize,
}

impl LrSchedule {
    pub fn new(name: &str, warmup: usize, total: usize, peak_lr: f64) -> Result<Self> {
        let kind = match name {
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            // transformers requires `min_lr_rate`; LLaMA-Factory's UI uses 0.1.
            "cosine_with_min_lr" => Schedule::CosineWithMinLr { min_lr_rate: 0.1 },
            "polynomial" => Schedule::Polynomial {
                lr_end_ratio: 1e-7 / peak_lr.max(f64::MIN_POSITIVE),
                power: 1.0,
            },
            "inverse_sqrt" => Schedule::InverseSqrt,
            other => bail!("unknown lr_scheduler_type `{other}`"),
        };
        Ok(Self {
            kind,
            warmup,
            total,
        })
    }

    /// Factor of the peak learning rate after `step` scheduler steps.
    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warm = |s: f64| s / w.max(1.0);
        if step < self.warmup && self.kind != Schedule::Constant {
            return warm(s);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Schedule::CosineWithMinLr { min_lr_rate } => {
                let f = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                f * (1.0 - min_lr_rate) + min_lr_rate
            }
            Schedule::Polynomial {
                lr_end_ratio,
                power,
            } => {
                if s > t {
                    lr_end_ratio
                } else {
                    (1.0 - lr_end_ratio) * (1.0 - progress).powf(power) + lr_end_ratio
                }
            }
            Schedule::InverseSqrt => {
                let timescale = if self.warmup > 0 { w } else { 10000.0 };
                let shift = timescale - w;
                1.0 / ((s + shift) / timescale).sqrt()
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

    #[test]
    fn matches_transformers_formulas() {
        let lin = LrSchedule::new("linear", 2, 10, 1e-4).unwrap();
        let got: Vec<f64> = (0..=10).map(|s| lin.factor(s)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        assert!(got.iter().zip(want).all(|(a, b)| close(*a, b)), "{got:?}");
        let cos = LrSchedule::new("cosine", 0, 10, 1e-4).unwrap();
        assert!(
            close(cos.factor(5), 0.5) && close(cos.factor(0), 1.0) && close(cos.factor(10), 0.0)
        );
        let c = LrSchedule::new("constant", 5, 10, 1e-4).unwrap();
        assert!(close(c.factor(1), 1.0));
        let cw = LrSchedule::new("constant_with_warmup", 4, 10, 1e-4).unwrap();
        assert!(close(cw.factor(1), 0.25) && close(cw.factor(7), 1.0));
        let m = LrSchedule::new("cosine_with_min_lr", 0, 10, 1e-4).unwrap();
        assert!(close(m.factor(10), 0.1));
        let p = LrSchedule::new("polynomial", 0, 10, 1e-4).unwrap();
        assert!(close(p.factor(5), 0.5 * (1.0 - 1e-3) + 1e-3));
        let inv = LrSchedule::new("inverse_sqrt", 4, 100, 1e-4).unwrap();
        assert!(close(inv.factor(2), 0.5) && close(inv.factor(16), 0.5));
        assert!(LrSchedule::new("sawtooth", 0, 1, 1.0).is_err());
    }
}
