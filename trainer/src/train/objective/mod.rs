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
    /// objective does not evaluate.
    pub(crate) fn eval(
        &self,
        model: &Model,
        examples: &Examples,
        batch_size: usize,
        pad: u32,
    ) -> Result<Option<EvalOutput>> {
        let Some(loss) = self.batch_loss() else {
            return Ok(None);
        };
        let (mut sum, mut weight) = (0.0, 0.0);
        // Weighted sums and weights per metric: a KTO batch may lack one kind of example.
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for mb in examples.chunks(batch_size, pad) {
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

    /// Gradient accumulation over the step's micro-batches, then clipping and the update.
    fn gradient_step(
        &self,
        model: &Model,
        opt: &mut AdamW,
        input: StepInput,
    ) -> Result<StepOutput> {
        let batches: Vec<MicroBatch> = input
            .micro
            .iter()
            .map(|idx| input.examples.micro_batch(idx, input.pad))
            .collect::<Result<_>>()?;
        let n_targets: usize = batches
            .iter()
            .map(|m| m.batch.num_targets())
            .sum::<usize>()
            .max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(
            input.args.seed ^ (input.step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.params.len()];
        let (mut total, mut metrics) = (0.0, Vec::new());
        for mb in &batches {
            let l = self.loss(model, mb, Some(&mut rng))?;
            let scaled = match l.reduction {
                Reduction::TokenSum(_) => (l.value / n_targets as f64)?,
                Reduction::Mean => (l.value / batches.len() as f64)?,
            };
            metrics.extend(l.metrics);
            total += scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            opt.accumulate(&mut grads, &model.backward(&scaled)?)?;
        }
        opt.check_gradients_once(&grads)?;
        opt.restrict_gradients(&mut grads)?;
        let tokens = batches.iter().map(|m| m.tokens).sum();
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
