//! `stage: ppo`'s step: sample responses to a batch of prompts from the policy (the rollout),
//! score them with the reward model, and run `ppo_epochs` passes of clipped PPO over that
//! rollout, as LLaMA-Factory's `CustomPPOTrainer` drives TRL (the formulas are in
//! `stages::ppo`). The reference model is the policy with
//! its adapter off (LoRA) or the weights as loaded (full / freeze); a LoRA reward model is a
//! second adapter that takes turns with the policy's on the same base weights.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use protocol::TrainArgs;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use protocol::args::{FinetuningType, RewardModelType};

use crate::data::IGNORE_INDEX;
use crate::infer::{generate_batch, GenerationConfig};
use crate::metrics::mean;
use crate::model::value_head::{ValueHead, VALUE_HEAD_FILE};
use crate::model::{Batch, LoraLayer, Model, TargetLogits, Weights};
use crate::stages::ppo::{
    gae, ppo_loss, token_rewards, whiten, AdaptiveKl, OldTokens, RunningMoments, GAMMA, LAM,
};
use crate::train::batch::{make_batch, Row};
use crate::train::optim::AdamW;
use crate::train::step::StepOutput;

/// The reward model of a PPO run (`reward_model`, `reward_model_type`).
enum RewardModel {
    /// An adapter trained with `stage: rm` on the same base model, with its value head.
    Lora {
        layers: BTreeMap<String, LoraLayer>,
        head: ValueHead,
    },
    /// A complete model folder (`stage: rm` with full or freeze tuning, or exported).
    Full { model: Box<Model>, head: ValueHead },
}

impl RewardModel {
    fn load(args: &TrainArgs, policy: &Model, device: &Device) -> Result<Self> {
        let path = args
            .reward_model
            .as_deref()
            .ok_or_else(|| anyhow!("stage ppo requires `reward_model`"))?;
        let dirs = TrainArgs::split_list(Some(path));
        let [dir] = dirs.as_slice() else {
            bail!(
                "`reward_model` names {} folders; PPO uses one reward model",
                dirs.len()
            );
        };
        let dir = Path::new(dir);
        let head_file = dir.join(VALUE_HEAD_FILE);
        if !head_file.exists() {
            bail!(
                "reward model {}: no {VALUE_HEAD_FILE}; train one with `stage: rm` and give its output_dir",
                dir.display()
            );
        }
        match args.reward_model_type {
            RewardModelType::Lora => {
                if args.finetuning_type != FinetuningType::Lora {
                    bail!("`reward_model_type: lora` needs `finetuning_type: lora` (the reward adapter shares the policy's base weights); use `reward_model_type: full` with a full reward model");
                }
                let adapter = policy
                    .read_adapter(dir)
                    .with_context(|| format!("reading the reward adapter {}", dir.display()))?;
                if !adapter.full_weights.is_empty() {
                    bail!(
                        "reward adapter {}: it replaces whole weights (modules_to_save), which cannot take turns with the policy adapter; use `reward_model_type: full` with a merged reward model",
                        dir.display()
                    );
                }
                Ok(Self::Lora {
                    layers: adapter.layers,
                    head: ValueHead::load(dir, policy.dtype, device)?,
                })
            }
            RewardModelType::Full => {
                if dir.join("adapter_config.json").is_file() && !dir.join("config.json").is_file() {
                    bail!(
                        "reward model {} is a LoRA adapter, not a full model: set `reward_model_type: lora` (with `finetuning_type: lora`)",
                        dir.display()
                    );
                }
                let mut model = Model::load(dir, policy.dtype, device)
                    .with_context(|| format!("loading the reward model {}", dir.display()))?;
                for a in TrainArgs::split_list(args.reward_model_adapters.as_deref()) {
                    model.load_adapter(Path::new(&a), false)?;
                }
                Ok(Self::Full {
                    model: Box::new(model),
                    head: ValueHead::load(dir, policy.dtype, device)?,
                })
            }
            RewardModelType::Api => bail!("`reward_model_type: api` (scores from an HTTP server) is not supported; use a reward model trained with `stage: rm` (`lora` or `full`)"),
        }
    }

    /// The score of each row of `b` (its last token).
    fn scores(&mut self, policy: &mut Model, b: &Batch) -> Result<Vec<f64>> {
        let s = match self {
            Self::Lora { layers, head } => {
                policy.swap_lora(layers);
                let s = head.scores(policy, b, None);
                policy.swap_lora(layers);
                s?
            }
            Self::Full { model, head } => head.scores(model, b, None)?,
        };
        Ok(s.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }
}

/// One sampled response and what PPO derives from it.
struct Sample {
    row: Row,
    query_len: usize,
    score: f64,
    logps: Vec<f64>,
    ref_logps: Vec<f64>,
    values: Vec<f64>,
    advantages: Vec<f64>,
    returns: Vec<f64>,
}

impl Sample {
    fn response_len(&self) -> usize {
        self.row.ids.len() - self.query_len
    }
}

/// PPO's state across steps: the critic, the reward model, the adaptive KL controller and the
/// running score moments.
pub(crate) struct Ppo {
    /// The critic: a value head on the policy's hidden states, trained with it.
    pub(super) head: ValueHead,
    reward: RewardModel,
    kl: AdaptiveKl,
    moments: RunningMoments,
    gen: GenerationConfig,
    stop: Vec<u32>,
    pad: u32,
}

impl Ppo {
    pub fn new(
        args: &TrainArgs,
        policy: &Model,
        head: ValueHead,
        stop: Vec<u32>,
        pad: u32,
    ) -> Result<Self> {
        let gen = GenerationConfig::from_args(args);
        if gen.max_new_tokens == 0 {
            bail!("PPO samples responses: set `max_new_tokens` above 0");
        }
        Ok(Self {
            head,
            reward: RewardModel::load(args, policy, &policy.device)?,
            kl: AdaptiveKl::new(args.ppo_target),
            moments: RunningMoments::default(),
            gen,
            stop,
            pad,
        })
    }

    pub fn max_new_tokens(&self) -> usize {
        self.gen.max_new_tokens
    }

    /// Samples responses for `prompts` and scores them.
    fn rollout(
        &mut self,
        model: &mut Model,
        prompts: &[&Row],
        step: usize,
        bs: usize,
    ) -> Result<Vec<Sample>> {
        let mut out = Vec::with_capacity(prompts.len());
        let mut gen = self.gen.clone();
        gen.seed = self.gen.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for (c, chunk) in prompts.chunks(bs.max(1)).enumerate() {
            gen.seed = gen.seed.wrapping_add(c as u64 * 1_000_003);
            let queries: Vec<Vec<u32>> = chunk.iter().map(|r| r.ids.clone()).collect();
            let generated = generate_batch(model, &queries, &gen, &self.stop, self.pad)?;
            let rows: Vec<(Row, usize)> = queries
                .into_iter()
                .zip(generated)
                .map(|(q, g)| {
                    // The response keeps the token that ended it, as TRL's rollout does; an
                    // immediate stop leaves a one-token response.
                    let mut response = g.ids;
                    response.extend(g.stop);
                    if response.is_empty() {
                        response.push(self.pad);
                    }
                    let query_len = q.len();
                    let mut labels = vec![IGNORE_INDEX; query_len];
                    labels.extend(response.iter().map(|&t| t as i64));
                    let mut ids = q;
                    ids.extend(response);
                    (Row::new(ids, labels), query_len)
                })
                .collect();
            let refs: Vec<&Row> = rows.iter().map(|r| &r.0).collect();
            let b = make_batch(&refs, self.pad);
            let scores = self.reward.scores(model, &b)?;
            let (h, t) = response_states(model, &b, None, Weights::Policy)?;
            let logps = per_sequence(&t.token_logps()?, &t, &b)?;
            let values = per_sequence(&self.head.apply(&h)?, &t, &b)?;
            let (_, reference) = response_states(model, &b, None, Weights::Reference)?;
            let ref_logps = per_sequence(&reference.token_logps()?, &reference, &b)?;
            for ((((row, query_len), score), (lp, v)), rl) in rows
                .into_iter()
                .zip(scores)
                .zip(logps.into_iter().zip(values))
                .zip(ref_logps)
            {
                out.push(Sample {
                    row,
                    query_len,
                    score,
                    logps: lp,
                    ref_logps: rl,
                    values: v,
                    advantages: Vec::new(),
                    returns: Vec::new(),
                });
            }
        }
        Ok(out)
    }

    /// One PPO step over `prompts` (`per_device_train_batch_size × gradient_accumulation_steps
    /// × ppo_buffer_size` of them): rollout, advantages, `ppo_epochs` of minibatch updates.
    pub fn step(
        &mut self,
        model: &mut Model,
        opt: &mut AdamW,
        args: &TrainArgs,
        prompts: &[&Row],
        step: usize,
        lr: f64,
    ) -> Result<StepOutput> {
        let bs = args.per_device_train_batch_size.max(1);
        let mut samples = self.rollout(model, prompts, step, bs)?;
        let raw: Vec<f64> = samples.iter().map(|s| s.score).collect();
        let scores = if args.ppo_score_norm {
            self.moments.normalize(&raw)
        } else {
            raw.clone()
        };
        let kl_coef = self.kl.value;
        let mut rewards: Vec<Vec<f64>> = samples
            .iter()
            .zip(&scores)
            .map(|(s, &score)| token_rewards(score, &s.logps, &s.ref_logps, kl_coef))
            .collect();
        if args.ppo_whiten_rewards {
            whiten(&mut rewards, false);
        }
        let mut advantages = Vec::with_capacity(samples.len());
        for (s, r) in samples.iter_mut().zip(&rewards) {
            let (a, ret) = gae(r, &s.values, GAMMA, LAM);
            advantages.push(a);
            s.returns = ret;
        }
        whiten(&mut advantages, true);
        for (s, a) in samples.iter_mut().zip(advantages) {
            s.advantages = a;
        }
        let seq_kl: Vec<f64> = samples
            .iter()
            .map(|s| s.logps.iter().zip(&s.ref_logps).map(|(a, b)| a - b).sum())
            .collect();
        let mean_kl = mean(&seq_kl);

        // Optimisation: each backward batch is `bs × accum` samples in minibatches of `bs`.
        let accum = args.gradient_accumulation_steps.max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ (step as u64) << 17);
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        let mut stats_sum = [0.0f64; 4];
        let mut n_mini = 0usize;
        for _ in 0..args.ppo_epochs.max(1) {
            let mut order: Vec<usize> = (0..samples.len()).collect();
            order.shuffle(&mut rng);
            for backward in order.chunks(bs * accum) {
                let minis: Vec<&[usize]> = backward.chunks(bs).collect();
                let mut grads: Vec<Option<Tensor>> = vec![None; opt.params.len()];
                let mut update_loss = 0.0;
                for mini in &minis {
                    let chosen: Vec<&Sample> = mini.iter().map(|&i| &samples[i]).collect();
                    let rows: Vec<&Row> = chosen.iter().map(|s| &s.row).collect();
                    let b = make_batch(&rows, self.pad);
                    let (lp, vp) = token_tensors(model, &self.head, &b, Some(&mut rng))?;
                    let cat = |f: fn(&Sample) -> &Vec<f64>| -> Vec<f64> {
                        chosen.iter().flat_map(|s| f(s).iter().copied()).collect()
                    };
                    let (old_lp, old_v, adv, ret) = (
                        cat(|s| &s.logps),
                        cat(|s| &s.values),
                        cat(|s| &s.advantages),
                        cat(|s| &s.returns),
                    );
                    let (loss, stats) = ppo_loss(
                        &lp,
                        &vp,
                        &OldTokens {
                            logps: &old_lp,
                            values: &old_v,
                            advantages: &adv,
                            returns: &ret,
                        },
                    )?;
                    update_loss += stats.total;
                    for (acc, v) in stats_sum.iter_mut().zip([
                        stats.policy,
                        stats.value,
                        stats.clipfrac,
                        stats.approx_kl,
                    ]) {
                        *acc += v;
                    }
                    n_mini += 1;
                    losses.push(stats.total);
                    opt.accumulate(&mut grads, &model.backward(&(loss / minis.len() as f64)?)?)?;
                }
                if !update_loss.is_finite() {
                    // The caller stops; this update never lands, but earlier ones of this
                    // step may have.
                    return Ok(StepOutput {
                        loss: update_loss,
                        grad_norm: f64::NAN,
                        tokens: 0,
                        metrics: Vec::new(),
                        updated: !norms.is_empty(),
                    });
                }
                opt.check_gradients_once(&grads)?;
                norms.push(AdamW::clip_grad_norm(&mut grads, args.max_grad_norm)?);
                opt.update(&grads, lr)?;
            }
        }
        self.kl.update(mean_kl, samples.len());

        let n = n_mini.max(1) as f64;
        let lens: Vec<f64> = samples.iter().map(|s| s.response_len() as f64).collect();
        Ok(StepOutput {
            updated: true,
            loss: mean(&losses),
            grad_norm: mean(&norms),
            tokens: samples.iter().map(|s| s.row.ids.len() as u64).sum(),
            metrics: vec![
                ("reward".into(), mean(&raw)),
                ("kl".into(), mean_kl),
                ("kl_coef".into(), kl_coef),
                ("policy_loss".into(), stats_sum[0] / n),
                ("value_loss".into(), stats_sum[1] / n),
                ("clipfrac".into(), stats_sum[2] / n),
                ("approx_kl".into(), stats_sum[3] / n),
                ("response_length".into(), mean(&lens)),
            ],
        })
    }
}

/// Final hidden states and LM-head outputs of the positions that predict response tokens.
fn response_states(
    model: &Model,
    b: &Batch,
    rng: Option<&mut ChaCha8Rng>,
    weights: Weights,
) -> Result<(Tensor, TargetLogits)> {
    model
        .target_states(b, rng, weights)?
        .ok_or_else(|| anyhow!("internal error: a PPO batch without response tokens"))
}

/// Log-probability of every response token and the value head's estimate at the position
/// that predicts it, `(n,)` each, in row-major token order.
fn token_tensors(
    model: &Model,
    head: &ValueHead,
    b: &Batch,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<(Tensor, Tensor)> {
    let (h, t) = response_states(model, b, rng, Weights::Policy)?;
    Ok((t.token_logps()?.squeeze(1)?, head.apply(&h)?))
}

/// Splits per-token values (`(n,)` or `(n, 1)`, in `t`'s row order) into one vector per row
/// of `b`.
fn per_sequence(values: &Tensor, t: &TargetLogits, b: &Batch) -> Result<Vec<Vec<f64>>> {
    let values = values
        .detach()
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let mut out = vec![Vec::new(); b.batch];
    for (v, &r) in values.into_iter().zip(&t.rows) {
        out[r as usize / b.seq].push(v);
    }
    Ok(out)
}
