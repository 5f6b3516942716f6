//! What a run optimises, built once from its stage: next-token cross-entropy (SFT and
//! pre-training), the reward model's pairwise loss, the DPO family, KTO, or PPO. Each takes an
//! optimizer step over the examples the plan hands it and evaluates held-out examples, and
//! both report in one shape whatever the stage.

mod preference;
mod rollout;

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use protocol::args::Stage;
use protocol::TrainArgs;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

pub use preference::{pairwise_reward, Dpo, Kto, PairwiseReward};

use super::batch::{Examples, MicroBatch};
use super::optim::AdamW;
pub(crate) use super::step::{EvalOutput, StepInput, StepOutput};
use crate::metrics::mean;
use crate::model::value_head::{self, ValueHead};
use crate::model::Model;
use rollout::Ppo;

pub(crate) enum Objective {
    /// Next-token cross-entropy over the labelled tokens; pre-training also reports perplexity.
    Sft {
        perplexity: bool,
    },
    /// A value head scoring chosen above rejected answers.
    Rm(ValueHead),
    Dpo(Dpo),
    Kto(Kto),
    Ppo(Box<Ppo>),
}

impl Objective {
    /// The objective of `args.stage`. `value_head` gives the head RM trains and PPO's critic
    /// (asked for only by those stages).
    pub(crate) fn new(
        args: &TrainArgs,
        model: &Model,
        value_head: impl FnOnce() -> Result<ValueHead>,
        stop_ids: Vec<u32>,
        pad: u32,
    ) -> Result<Self> {
        Ok(match args.stage {
            Stage::Sft | Stage::Pt => Self::Sft {
                perplexity: args.stage == Stage::Pt,
            },
            Stage::Rm => Self::Rm(value_head()?),
            Stage::Dpo => Self::Dpo(Dpo::from_args(args)),
            Stage::Kto => Self::Kto(Kto::from_args(args)),
            Stage::Ppo => Self::Ppo(Box::new(Ppo::new(
                args,
                model,
                value_head()?,
                stop_ids,
                pad,
            )?)),
        })
    }

    /// The value head a checkpoint saves next to the model (RM, PPO).
    pub(crate) fn value_head(&self) -> Option<&ValueHead> {
        match self {
            Self::Rm(head) => Some(head),
            Self::Ppo(ppo) => Some(&ppo.head),
            _ => None,
        }
    }

    /// Tensors the objective trains besides the model's (the value head), by name.
    pub(crate) fn trainable(&self) -> Vec<(String, Var)> {
        self.value_head()
            .map(|h| {
                vec![
                    (value_head::WEIGHT.to_string(), h.weight.clone()),
                    (value_head::BIAS.to_string(), h.bias.clone()),
                ]
            })
            .unwrap_or_default()
    }

    /// Tokens a training sequence can grow by beyond its prompt (PPO's sampled responses).
    pub(crate) fn generated_tokens(&self) -> usize {
        match self {
            Self::Ppo(ppo) => ppo.max_new_tokens(),
            _ => 0,
        }
    }

    /// Whether the objective evaluates held-out examples (PPO does not, as in LLaMA-Factory).
    pub(crate) fn evaluates(&self) -> bool {
        self.batch_loss().is_some()
    }

    /// Whether evaluation results add `eval_perplexity` (pre-training).
    pub(crate) fn reports_perplexity(&self) -> bool {
        matches!(self, Self::Sft { perplexity: true })
    }

    fn batch_loss(&self) -> Option<BatchLoss<'_>> {
        Some(match self {
            Self::Sft { .. } => BatchLoss::Lm,
            Self::Rm(head) => BatchLoss::Reward(head),
            Self::Dpo(d) => BatchLoss::Dpo(d),
            Self::Kto(k) => BatchLoss::Kto(k),
            Self::Ppo(_) => return None,
        })
    }

    /// One optimizer step: forward and backward over the step's micro-batches, gradient
    /// clipping and the update (PPO: a rollout and its `ppo_epochs` of updates).
    pub(crate) fn step(
        &mut self,
        model: &mut Model,
        opt: &mut AdamW,
        input: StepInput,
    ) -> Result<StepOutput> {
        let loss = match self {
            Self::Ppo(ppo) => {
                let prompts: Vec<_> = input
                    .micro
                    .iter()
                    .flatten()
                    .map(|&i| &input.examples.rows[i])
                    .collect();
                return ppo.step(model, opt, input.args, &prompts, input.step, input.lr);
            }
            Self::Sft { .. } => BatchLoss::Lm,
            Self::Rm(head) => BatchLoss::Reward(head),
            Self::Dpo(d) => BatchLoss::Dpo(d),
            Self::Kto(k) => BatchLoss::Kto(k),
        };
        loss.gradient_step(model, opt, input)
    }

    /// The loss and metrics over `examples` in batches of `batch_size`; `None` when the
    /// objective does not evaluate. Ranks take turns at the batches and sum what they found.
    pub(crate) fn eval(
        &self,
        model: &Model,
        examples: &Examples,
        batch_size: usize,
        pad: u32,
        world: &crate::dist::World,
    ) -> Result<Option<EvalOutput>> {
        let Some(loss) = self.batch_loss() else {
            return Ok(None);
        };
        let (mut sum, mut weight) = (0.0, 0.0);
        // Weighted sums and weights per metric: a KTO batch may lack one kind of example.
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for mb in examples.chunks(batch_size, pad, (world.rank(), world.size())) {
            let mb = mb?;
            let l = loss.loss(model, &mb, None)?;
            let value = l.value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let n = mb.examples as f64;
            match l.reduction {
                Reduction::TokenSum(tokens) => {
                    sum += value;
                    weight += tokens as f64;
                }
                Reduction::Mean => {
                    sum += value * n;
                    weight += n;
                }
            }
            for (k, v) in l.metrics.into_iter().filter(|(k, _)| loss.evaluated(k)) {
                let e = sums.entry(format!("eval_{k}")).or_default();
                e.0 += v * n;
                e.1 += n;
            }
        }
        if world.size() > 1 {
            let all = world.gather_json(&json!([sum, weight, sums]), "evaluation")?;
            (sum, weight, sums) = (0.0, 0.0, BTreeMap::new());
            for rank in all {
                let (s, w, m): (f64, f64, BTreeMap<String, (f64, f64)>) =
                    serde_json::from_value(rank)?;
                sum += s;
                weight += w;
                for (k, (v, n)) in m {
                    let e = sums.entry(k).or_default();
                    e.0 += v;
                    e.1 += n;
                }
            }
        }
        let loss = if weight == 0.0 {
            f64::NAN
        } else {
            sum / weight
        };
        let metrics = sums
            .into_iter()
            .map(|(k, (v, w))| (k, json!(v / w.max(1.0))))
            .collect();
        Ok(Some(EvalOutput { loss, metrics }))
    }
}

/// The objectives that learn by plain gradient steps, by the loss of one micro-batch.
enum BatchLoss<'a> {
    Lm,
    Reward(&'a ValueHead),
    Dpo(&'a Dpo),
    Kto(&'a Kto),
}

/// How a micro-batch's loss combines with the others of its step.
enum Reduction {
    /// Summed over this many labelled tokens: a step divides by all its micro-batches' tokens.
    TokenSum(usize),
    /// A mean over the batch's examples: each micro-batch of a step counts the same.
    Mean,
}

struct Loss {
    value: Tensor,
    metrics: Vec<(String, f64)>,
    reduction: Reduction,
}

impl BatchLoss<'_> {
    fn loss(&self, model: &Model, mb: &MicroBatch, rng: Option<&mut ChaCha8Rng>) -> Result<Loss> {
        let b = &mb.batch;
        let (value, metrics, reduction) = match self {
            Self::Lm => {
                let (sum, tokens) = model.loss_sum(b, rng)?;
                (sum, Vec::new(), Reduction::TokenSum(tokens))
            }
            Self::Reward(head) => {
                let r = pairwise_reward(head, model, b, rng)?;
                let metrics = vec![
                    ("accuracy".to_string(), r.accuracy),
                    ("rewards/chosen".to_string(), mean(&r.chosen)),
                    ("rewards/rejected".to_string(), mean(&r.rejected)),
                ];
                (r.loss, metrics, Reduction::Mean)
            }
            Self::Dpo(d) => {
                let (l, m) = d.loss(model, b, rng)?;
                (l, m, Reduction::Mean)
            }
            Self::Kto(k) => {
                let (l, m) = k.loss(model, b, &mb.tags, rng)?;
                (l, m, Reduction::Mean)
            }
        };
        Ok(Loss {
            value,
            metrics,
            reduction,
        })
    }

    /// Whether a training metric is also reported by evaluation (RM evaluates its accuracy
    /// only, as LLaMA-Factory's `compute_accuracy`).
    fn evaluated(&self, metric: &str) -> bool {
        !matches!(self, Self::Reward(_)) || metric == "accuracy"
    }

    /// Gradient accumulation over the step's micro-batches, then clipping and the update. In
    /// a data-parallel run each rank takes its shard of every micro-batch and the gradients,
    /// loss and token counts are summed over ranks, weighted so the step equals one process
    /// taking the whole global batch.
    fn gradient_step(
        &self,
        model: &Model,
        opt: &mut AdamW,
        input: StepInput,
    ) -> Result<StepOutput> {
        let world = input.world;
        let per_rank = input.args.per_device_train_batch_size.max(1);
        let n_micro = input.micro.len().max(1);
        // This rank's part of each micro-batch, with the micro-batch's size over all ranks.
        let batches: Vec<(usize, MicroBatch, usize)> = input
            .micro
            .iter()
            .enumerate()
            .map(|(i, global)| (i, global, world.shard(global, per_rank)))
            .filter(|(_, _, mine)| !mine.is_empty())
            .map(|(i, global, mine)| {
                Ok((
                    i,
                    input.examples.micro_batch(mine, input.pad)?,
                    global.len(),
                ))
            })
            .collect::<Result<_>>()?;
        let local_targets: usize = batches.iter().map(|(_, m, _)| m.batch.num_targets()).sum();
        let n_targets = world.sum_f64(&[local_targets as f64], "label counts")?[0].max(1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(
            input.args.seed
                ^ (input.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (world.rank() as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.params.len()];
        let (mut total, mut metrics) = (0.0, Vec::new());
        for (i, mb, global_len) in &batches {
            let l = self.loss(model, mb, Some(&mut rng))?;
            let scaled = match l.reduction {
                Reduction::TokenSum(_) => (l.value / n_targets)?,
                // A mean over this rank's examples, weighed by their share of the micro-batch.
                Reduction::Mean if mb.examples == *global_len => (l.value / n_micro as f64)?,
                Reduction::Mean => {
                    (l.value * (mb.examples as f64 / (*global_len * n_micro) as f64))?
                }
            };
            metrics.extend(l.metrics.into_iter().map(|(k, v)| (*i, k, v, mb.examples)));
            total += scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            opt.accumulate(&mut grads, &model.backward(&scaled)?)?;
        }
        world.all_reduce_gradients(&mut grads, &opt.vars())?;
        let local_tokens: u64 = batches.iter().map(|(_, m, _)| m.tokens).sum();
        let sums = world.sum_f64(&[total, local_tokens as f64], "loss")?;
        let (total, tokens) = (sums[0], sums[1] as u64);
        let metrics = merge_metrics(world, metrics)?;
        opt.check_gradients_once(&grads)?;
        opt.restrict_gradients(&mut grads)?;
        if !total.is_finite() {
            return Ok(StepOutput {
                loss: total,
                grad_norm: f64::NAN,
                tokens,
                metrics,
                updated: false,
            });
        }
        // Layer-wise GaLore steps each tensor as its gradient arrives, before any clipping
        // (LLaMA-Factory warns that its gradient norm then shows as 0).
        let grad_norm = if (input.args.use_galore && input.args.galore_layerwise)
            || (input.args.use_apollo && input.args.apollo_layerwise)
        {
            0.0
        } else {
            AdamW::clip_grad_norm(&mut grads, input.args.max_grad_norm)?
        };
        opt.update(&grads, input.lr)?;
        Ok(StepOutput {
            loss: total,
            grad_norm,
            tokens,
            metrics,
            updated: true,
        })
    }
}

/// The stage metrics of a step, one entry per micro-batch and name: on one rank as they came;
/// over ranks, each micro-batch's value is the mean of the ranks' values weighed by their
/// examples (each rank's value is a mean over its examples).
fn merge_metrics(
    world: &crate::dist::World,
    mine: Vec<(usize, String, f64, usize)>,
) -> Result<Vec<(String, f64)>> {
    if world.size() == 1 {
        return Ok(mine.into_iter().map(|(_, k, v, _)| (k, v)).collect());
    }
    let all = world.gather_json(&json!(mine), "metrics")?;
    let mut merged: Vec<((usize, String), (f64, f64))> = Vec::new();
    for rank in all {
        let entries: Vec<(usize, String, f64, usize)> = serde_json::from_value(rank)?;
        for (i, k, v, n) in entries {
            let key = (i, k);
            match merged.iter_mut().find(|(k2, _)| *k2 == key) {
                Some((_, (sum, w))) => {
                    *sum += v * n as f64;
                    *w += n as f64;
                }
                None => merged.push((key, (v * n as f64, n as f64))),
            }
        }
    }
    merged.sort_by_key(|((i, _), _)| *i);
    Ok(merged
        .into_iter()
        .map(|((_, k), (sum, w))| (k, sum / w.max(1.0)))
        .collect())
}
