//! The batch losses of the preference stages over the model: DPO and its relatives
//! (`pref_loss`), KTO, and the reward model's pairwise loss, with the metrics TRL logs. A
//! batch holds its examples first and their partners (rejected answers, KL completions) after.

use anyhow::Result;
use candle_core::{DType, Tensor};
use protocol::TrainArgs;
use rand_chacha::ChaCha8Rng;

use crate::metrics::mean;
use crate::model::value_head::ValueHead;
use crate::model::{Batch, Model};
use crate::stages::preference::{kto_loss, preference_loss, reward_loss, PrefLoss};

/// A batch's loss tensor and its named metrics.
pub type LossAndMetrics = (Tensor, Vec<(String, f64)>);

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// `stage: dpo`: the DPO-family loss with `pref_beta` and the SFT term `pref_ftx`.
#[derive(Debug, Clone, Copy)]
pub struct Dpo {
    pub kind: PrefLoss,
    pub beta: f64,
    pub ftx: f64,
}

impl Dpo {
    pub fn from_args(args: &TrainArgs) -> Self {
        Self {
            kind: PrefLoss::from_args(args),
            beta: args.pref_beta,
            ftx: args.pref_ftx,
        }
    }

    /// The loss of a batch whose first half holds chosen and second half rejected sequences.
    pub fn loss(
        &self,
        model: &Model,
        b: &Batch,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<LossAndMetrics> {
        let (kind, pairs) = (self.kind, b.batch / 2);
        let (sums, counts) = model.sequence_logps(b, rng)?;
        let lens = Tensor::from_vec(
            counts.iter().map(|&c| c.max(1) as f64).collect::<Vec<_>>(),
            b.batch,
            &model.device,
        )?
        .to_dtype(sums.dtype())?;
        let avg = (&sums / &lens)?;
        let used = if kind.length_averaged() {
            avg.clone()
        } else {
            sums.clone()
        };
        let (pc, pr) = (used.narrow(0, 0, pairs)?, used.narrow(0, pairs, pairs)?);
        let reference = if kind.needs_reference() {
            let r = model.reference_logps(b)?;
            let r = if kind.length_averaged() {
                (r / &lens)?
            } else {
                r
            };
            Some((r.narrow(0, 0, pairs)?, r.narrow(0, pairs, pairs)?))
        } else {
            None
        };
        let out = preference_loss(
            kind,
            self.beta,
            &pc,
            &pr,
            reference.as_ref().map(|(c, r)| (c, r)),
        )?;
        let mut loss = out.losses.mean_all()?;
        if self.ftx > 0.0 {
            let sft = avg.narrow(0, 0, pairs)?.neg()?.mean_all()?;
            loss = (loss + (sft * self.ftx)?)?;
        }
        let (cr, rr) = (to_vec(&out.chosen_rewards)?, to_vec(&out.rejected_rewards)?);
        let acc: Vec<f64> = cr
            .iter()
            .zip(&rr)
            .map(|(c, r)| f64::from(u8::from(c > r)))
            .collect();
        let margins: Vec<f64> = cr.iter().zip(&rr).map(|(c, r)| c - r).collect();
        let all = to_vec(&sums)?;
        Ok((
            loss,
            vec![
                ("rewards/chosen".into(), mean(&cr)),
                ("rewards/rejected".into(), mean(&rr)),
                ("rewards/accuracies".into(), mean(&acc)),
                ("rewards/margins".into(), mean(&margins)),
                ("logps/chosen".into(), mean(&all[..pairs])),
                ("logps/rejected".into(), mean(&all[pairs..])),
            ],
        ))
    }
}

/// `stage: kto`: TRL's KTO loss with `pref_beta`, the desirable / undesirable weights and
/// `pref_ftx`.
#[derive(Debug, Clone, Copy)]
pub struct Kto {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    pub ftx: f64,
}

impl Kto {
    pub fn from_args(args: &TrainArgs) -> Self {
        Self {
            beta: args.pref_beta,
            desirable_weight: args.kto_chosen_weight,
            undesirable_weight: args.kto_rejected_weight,
            ftx: args.pref_ftx,
        }
    }

    /// The loss of a batch whose first half holds the examples (`tags`: desirable or not) and
    /// second half their KL completions.
    pub fn loss(
        &self,
        model: &Model,
        b: &Batch,
        tags: &[bool],
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<LossAndMetrics> {
        let n = b.batch / 2;
        let (sums, counts) = model.sequence_logps(b, rng)?;
        let reference = model.reference_logps(b)?;
        let pick = |t: &Tensor, want: bool| -> Result<Option<Tensor>> {
            let idx: Vec<u32> = (0..n)
                .filter(|&i| tags[i] == want)
                .map(|i| i as u32)
                .collect();
            if idx.is_empty() {
                return Ok(None);
            }
            let k = idx.len();
            Ok(Some(
                t.index_select(&Tensor::from_vec(idx, k, t.device())?, 0)?,
            ))
        };
        let (policy, policy_kl) = (sums.narrow(0, 0, n)?, sums.narrow(0, n, n)?);
        let (refp, ref_kl) = (reference.narrow(0, 0, n)?, reference.narrow(0, n, n)?);
        let pair = |want: bool| -> Result<Option<(Tensor, Tensor)>> {
            Ok(match (pick(&policy, want)?, pick(&refp, want)?) {
                (Some(p), Some(r)) => Some((p, r)),
                _ => None,
            })
        };
        let (c, r) = (pair(true)?, pair(false)?);
        let losses = kto_loss(
            self.beta,
            self.desirable_weight,
            self.undesirable_weight,
            c.as_ref().map(|(a, b)| (a, b)),
            r.as_ref().map(|(a, b)| (a, b)),
            (&policy_kl, &ref_kl),
        )?;
        let mut loss = losses.mean_all()?;
        if let (true, Some((pc, _))) = (self.ftx > 0.0, &c) {
            let lens: Vec<f64> = (0..n)
                .filter(|&i| tags[i])
                .map(|i| counts[i].max(1) as f64)
                .collect();
            let k = lens.len();
            let lens = Tensor::from_vec(lens, k, pc.device())?.to_dtype(pc.dtype())?;
            loss = (loss + ((pc / lens)?.neg()?.mean_all()? * self.ftx)?)?;
        }
        let mean_reward = |p: &Option<(Tensor, Tensor)>| -> Result<Option<f64>> {
            let Some((a, b)) = p else { return Ok(None) };
            Ok(Some(scalar(&((a - b)? * self.beta)?)?))
        };
        let kl = scalar(&(&policy_kl - &ref_kl)?)?.max(0.0);
        let mut metrics = vec![("kl".to_string(), kl)];
        if let Some(v) = mean_reward(&c)? {
            metrics.push(("rewards/chosen".into(), v));
        }
        if let Some(v) = mean_reward(&r)? {
            metrics.push(("rewards/rejected".into(), v));
        }
        Ok((loss, metrics))
    }
}

/// `stage: rm`: the pairwise loss `-logsigmoid(r_chosen - r_rejected)` of the value head's
/// scores, the ranking accuracy and the mean scores.
pub struct PairwiseReward {
    pub loss: Tensor,
    pub accuracy: f64,
    pub chosen: Vec<f64>,
    pub rejected: Vec<f64>,
}

pub fn pairwise_reward(
    head: &ValueHead,
    model: &Model,
    b: &Batch,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<PairwiseReward> {
    let pairs = b.batch / 2;
    let s = head.scores(model, b, rng)?;
    let (c, r) = (s.narrow(0, 0, pairs)?, s.narrow(0, pairs, pairs)?);
    let loss = reward_loss(&c, &r)?.mean_all()?;
    let (chosen, rejected) = (to_vec(&c)?, to_vec(&r)?);
    let accuracy =
        chosen.iter().zip(&rejected).filter(|(a, b)| a > b).count() as f64 / pairs.max(1) as f64;
    Ok(PairwiseReward {
        loss,
        accuracy,
        chosen,
        rejected,
    })
}
