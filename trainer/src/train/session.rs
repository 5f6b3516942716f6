use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use protocol::events::StepMetrics;
use protocol::{TrainArgs, WorkerEvent};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::checkpoint::{
    atomic_dir, last_checkpoint, rotate_checkpoints, save_model, write_json, write_safetensors,
    SaveKind,
};
use super::optim::{decays, AdamW, ParamGroup};
use super::ppo::Ppo;
use super::report::Reporter;
use super::schedule::LrSchedule;
use crate::data::pipeline::{get_dataset, load_tokenizer_and_template};
use crate::data::processor::Features;
use crate::metrics::mean;
use crate::model::adapter::LoraSpec;
use crate::model::{Batch, Model, RowRef};
use crate::stages::preference::{preference_loss, PrefLoss};
use crate::stages::reward::{self, ValueHead, VALUE_HEAD_FILE};
use crate::tokenizer::HfTokenizer;

pub struct TrainOptions {
    pub dtype: DType,
    pub device: Device,
    /// Set by SIGINT/SIGTERM: finish the step, save, stop.
    pub stop: Arc<AtomicBool>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the metrics for the `finished` event.
    Finished(Map<String, Value>),
    Aborted,
    /// Training stopped on a problem after it started; a checkpoint was saved.
    Failed(String),
}

/// One training example's tensors, ready to batch.
pub(crate) struct Row {
    pub(crate) ids: Vec<u32>,
    labels: Vec<i64>,
    positions: Option<Vec<u32>>,
    segments: Option<Vec<u32>>,
}

impl Row {
    pub(crate) fn new(ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Self {
            ids,
            labels,
            positions: None,
            segments: None,
        }
    }
}

fn rows_of(features: &[Features], neat: bool) -> Vec<Row> {
    features
        .iter()
        .filter_map(|f| {
            let ids = f.input_ids.clone()?;
            let labels = f
                .labels
                .clone()
                .unwrap_or_else(|| ids.iter().map(|&i| i as i64).collect());
            Some(Row {
                labels,
                positions: f.position_ids.clone(),
                segments: if neat { f.attention_mask.clone() } else { None },
                ids,
            })
        })
        .collect()
}

/// Chosen and rejected rows of pairwise examples, index-aligned.
pub(crate) fn pair_rows(features: &[Features]) -> (Vec<Row>, Vec<Row>) {
    let row = |ids: &Option<Vec<u32>>, labels: &Option<Vec<i64>>| -> Option<Row> {
        Some(Row {
            ids: ids.clone()?,
            labels: labels.clone()?,
            positions: None,
            segments: None,
        })
    };
    features
        .iter()
        .filter_map(|f| {
            Some((
                row(&f.chosen_input_ids, &f.chosen_labels)?,
                row(&f.rejected_input_ids, &f.rejected_labels)?,
            ))
        })
        .unzip()
}

/// Examples, their KL partner rows and desirability tags (KTO data).
fn kto_rows(features: &[Features]) -> (Vec<Row>, Vec<Row>, Vec<bool>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for f in features {
        let (Some(ids), Some(labels), Some(kl_ids), Some(kl_labels), Some(tag)) = (
            &f.input_ids,
            &f.labels,
            &f.kl_input_ids,
            &f.kl_labels,
            f.kto_tags,
        ) else {
            continue;
        };
        out.0.push(Row {
            ids: ids.clone(),
            labels: labels.clone(),
            positions: None,
            segments: None,
        });
        out.1.push(Row {
            ids: kl_ids.clone(),
            labels: kl_labels.clone(),
            positions: None,
            segments: None,
        });
        out.2.push(tag);
    }
    out
}

/// KTO loss of one micro-batch: first half the examples, second half their KL completions.
fn kto_step(
    model: &Model,
    b: &Batch,
    tags: &[bool],
    args: &TrainArgs,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<(Tensor, Vec<(String, f64)>)> {
    use crate::stages::preference::kto_loss;
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
    let chosen = (pick(&policy, true)?, pick(&refp, true)?);
    let rejected = (pick(&policy, false)?, pick(&refp, false)?);
    let pair = |p: &(Option<Tensor>, Option<Tensor>)| -> Option<(Tensor, Tensor)> {
        Some((p.0.clone()?, p.1.clone()?))
    };
    let (c, r) = (pair(&chosen), pair(&rejected));
    let losses = kto_loss(
        args.pref_beta,
        args.kto_chosen_weight,
        args.kto_rejected_weight,
        c.as_ref().map(|(a, b)| (a, b)),
        r.as_ref().map(|(a, b)| (a, b)),
        (&policy_kl, &ref_kl),
    )?;
    let mut loss = losses.mean_all()?;
    if args.pref_ftx > 0.0 {
        if let Some((pc, _)) = &c {
            let lens: Vec<f64> = (0..n)
                .filter(|&i| tags[i])
                .map(|i| counts[i].max(1) as f64)
                .collect();
            let k = lens.len();
            let lens = Tensor::from_vec(lens, k, pc.device())?.to_dtype(pc.dtype())?;
            loss = (loss + ((pc / lens)?.neg()?.mean_all()? * args.pref_ftx)?)?;
        }
    }
    let mean_reward = |p: &Option<(Tensor, Tensor)>| -> Result<Option<f64>> {
        let Some((a, b)) = p else { return Ok(None) };
        Ok(Some(
            ((a - b)? * args.pref_beta)?
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()?,
        ))
    };
    let kl = (&policy_kl - &ref_kl)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?
        .max(0.0);
    let mut metrics = vec![("kl".to_string(), kl)];
    if let Some(v) = mean_reward(&c)? {
        metrics.push(("rewards/chosen".into(), v));
    }
    if let Some(v) = mean_reward(&r)? {
        metrics.push(("rewards/rejected".into(), v));
    }
    Ok((loss, metrics))
}

/// DPO-family loss of one micro-batch whose first half holds chosen and second half rejected
/// sequences, with TRL's logged metrics.
pub fn preference_step(
    model: &Model,
    b: &Batch,
    kind: PrefLoss,
    args: &TrainArgs,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<(Tensor, Vec<(String, f64)>)> {
    let pairs = b.batch / 2;
    let (sums, counts) = model.sequence_logps(b, rng)?;
    let lens = Tensor::from_vec(
        counts.iter().map(|&c| c.max(1) as f64).collect::<Vec<_>>(),
        b.batch,
        &model.device,
    )?
    .to_dtype(model.dtype)?;
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
        args.pref_beta,
        &pc,
        &pr,
        reference.as_ref().map(|(c, r)| (c, r)),
    )?;
    let mut loss = out.losses.mean_all()?;
    if args.pref_ftx > 0.0 {
        let sft = avg.narrow(0, 0, pairs)?.neg()?.mean_all()?;
        loss = (loss + (sft * args.pref_ftx)?)?;
    }
    let v = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let (cr, rr) = (v(&out.chosen_rewards)?, v(&out.rejected_rewards)?);
    let acc: Vec<f64> = cr
        .iter()
        .zip(&rr)
        .map(|(c, r)| f64::from(u8::from(c > r)))
        .collect();
    let margins: Vec<f64> = cr.iter().zip(&rr).map(|(c, r)| c - r).collect();
    let all = v(&sums)?;
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

pub(crate) fn make_batch(rows: &[&Row], pad_id: u32) -> Batch {
    let refs: Vec<RowRef> = rows
        .iter()
        .map(|r| {
            (
                r.ids.as_slice(),
                r.labels.as_slice(),
                r.positions.as_deref(),
            )
        })
        .collect();
    let mut b = Batch::pad(&refs, pad_id);
    if rows.iter().any(|r| r.segments.is_some()) {
        let mut seg = Vec::with_capacity(b.batch * b.seq);
        for r in rows {
            let s = r.segments.clone().unwrap_or_else(|| vec![1; r.ids.len()]);
            seg.extend_from_slice(&s);
            seg.extend(std::iter::repeat_n(0, b.seq - s.len()));
        }
        b.segments = Some(seg);
    }
    b
}

/// `str(timedelta(seconds=int(s)))`, as LLaMA-Factory writes elapsed and remaining time.
fn timedelta(s: f64) -> String {
    let s = s.max(0.0) as u64;
    let (d, h, m, sec) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60, s % 60);
    let hms = format!("{h}:{m:02}:{sec:02}");
    match d {
        0 => hms,
        1 => format!("1 day, {hms}"),
        _ => format!("{d} days, {hms}"),
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn available_memory() -> Option<u64> {
    crate::sysinfo::proc_kib("/proc/meminfo", "MemAvailable:").map(|kb| kb * 1024)
}

/// Refuses runs that clearly cannot fit in memory, with the numbers.
fn check_memory(model: &Model, trainable: u64, args: &TrainArgs, seq: usize) -> Result<()> {
    let c = &model.cfg;
    let elem = model.dtype.size_in_bytes() as u64;
    let params: u64 = model
        .params
        .values()
        .map(|p| p.tensor.elem_count() as u64)
        .sum();
    let tokens = (args.per_device_train_batch_size * seq) as u64;
    let per_layer =
        (14 * c.hidden_size + 3 * c.intermediate_size + 3 * c.num_attention_heads * seq) as u64;
    let activations =
        tokens * (per_layer * c.num_hidden_layers as u64 + 3 * c.vocab_size as u64) * elem;
    let need = params * elem + trainable * elem * 4 + activations;
    if let Some(avail) = available_memory() {
        if need > avail {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            bail!(
                "this run needs about {:.1} GiB ({:.1} GiB weights, {:.1} GiB gradients and optimizer state, {:.1} GiB activations for batch {} × {} tokens) but only {:.1} GiB is available; lower `per_device_train_batch_size` or `cutoff_len`, or use LoRA",
                gib(need),
                gib(params * elem),
                gib(trainable * elem * 4),
                gib(activations),
                args.per_device_train_batch_size,
                seq,
                gib(avail)
            );
        }
    }
    Ok(())
}

/// Grows the embeddings (and an untied LM head) for tokens the template added, initialised
/// to the mean embedding like `resize_token_embeddings(mean_resizing=True)`.
fn resize_vocab(model: &mut Model, new_size: usize) -> Result<()> {
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let Some(p) = model.params.get_mut(name) else {
            continue;
        };
        let (rows, _) = p.tensor.dims2()?;
        if rows >= new_size {
            continue;
        }
        let mean = p.tensor.mean_keepdim(0)?;
        let extra = mean.repeat((new_size - rows, 1))?;
        p.tensor = Tensor::cat(&[&p.tensor, &extra], 0)?;
    }
    model.cfg.vocab_size = model.cfg.vocab_size.max(new_size);
    model
        .cfg
        .raw
        .insert("vocab_size".into(), json!(model.cfg.vocab_size));
    Ok(())
}

struct Run<'a> {
    args: &'a TrainArgs,
    opts: &'a TrainOptions,
    output_dir: PathBuf,
    model_dir: PathBuf,
    model: Model,
    tok: HfTokenizer,
    lora: Option<LoraSpec>,
    value_head: Option<ValueHead>,
    opt: AdamW,
    log_history: Vec<Value>,
    total_steps: usize,
    steps_per_epoch: usize,
    num_examples: usize,
    tokens_seen: u64,
    start: Instant,
    /// Seconds already spent before a resume.
    prior_elapsed: f64,
}

impl Run<'_> {
    fn save_kind(&self) -> SaveKind<'_> {
        match &self.lora {
            Some(spec) => SaveKind::Adapter(spec),
            None => SaveKind::Full {
                source_dir: &self.model_dir,
                max_shard_bytes: 5_000_000_000,
            },
        }
    }

    fn epoch_at(&self, step: usize) -> f64 {
        step as f64 / self.steps_per_epoch as f64
    }

    fn elapsed(&self) -> f64 {
        self.prior_elapsed + self.start.elapsed().as_secs_f64()
    }

    fn state_json(&self, step: usize) -> Value {
        let a = self.args;
        json!({
            "best_global_step": null,
            "best_metric": null,
            "best_model_checkpoint": null,
            "epoch": self.epoch_at(step),
            "eval_steps": a.eval_steps.unwrap_or(a.logging_steps),
            "global_step": step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": self.log_history,
            "logging_steps": a.logging_steps,
            "max_steps": self.total_steps,
            "num_input_tokens_seen": self.tokens_seen,
            "num_train_epochs": a.num_train_epochs.ceil() as u64,
            "save_steps": a.save_steps,
            "total_flos": 0.0,
            "train_batch_size": a.per_device_train_batch_size,
            "trial_name": null,
            "trial_params": null,
            "train_runtime_so_far": self.elapsed(),
        })
    }

    fn save_checkpoint(&self, step: usize, rep: &mut dyn Reporter) -> Result<PathBuf> {
        let dir = self.output_dir.join(format!("checkpoint-{step}"));
        let base = self.args.model_name_or_path.clone().unwrap_or_default();
        atomic_dir(&dir, |tmp| {
            save_model(tmp, &self.model, &self.save_kind(), &base, &self.tok)?;
            if let Some(h) = &self.value_head {
                h.save(tmp)?;
            }
            if !self.args.save_only_model {
                write_safetensors(
                    &tmp.join("optimizer.safetensors"),
                    &self.opt.state_tensors()?.into_iter().collect(),
                )?;
            }
            write_json(&tmp.join("trainer_state.json"), &self.state_json(step))
        })?;
        if let Some(limit) = self.args.save_total_limit {
            rotate_checkpoints(&self.output_dir, limit)?;
        }
        rep.event(&WorkerEvent::Checkpoint {
            step: step as u64,
            path: dir.display().to_string(),
        });
        Ok(dir)
    }

    fn eval_loss(&self, eval: &[Row], pad: u32) -> Result<f64> {
        let bs = self.args.per_device_eval_batch_size.max(1);
        let (mut sum, mut n) = (0.0, 0usize);
        for chunk in eval.chunks(bs) {
            let refs: Vec<&Row> = chunk.iter().collect();
            let b = make_batch(&refs, pad);
            let (loss, count) = self.model.loss_sum(&b, None)?;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n += count;
        }
        Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
    }

    /// Evaluation of a paired stage over `(chosen, rejected)` rows: the mean loss and the
    /// metrics under `eval_` names (RM: `eval_accuracy`; DPO: TRL's `eval_rewards/*`, `eval_logps/*`).
    /// KTO evaluates its examples with their KL partners the same way (`kto_tags` given).
    fn pair_eval(
        &self,
        pairs: &(Vec<Row>, Vec<Row>),
        pref: Option<PrefLoss>,
        kto_tags: Option<&[bool]>,
        pad: u32,
    ) -> Result<(f64, Map<String, Value>)> {
        let bs = self.args.per_device_eval_batch_size.max(1);
        let (mut loss, mut n) = (0.0, 0usize);
        // Weighted sums and weights per metric: a KTO chunk may lack one kind of example.
        let mut sums: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
        for (i, (c, r)) in pairs.0.chunks(bs).zip(pairs.1.chunks(bs)).enumerate() {
            let rows: Vec<&Row> = c.iter().chain(r.iter()).collect();
            let b = make_batch(&rows, pad);
            let (l, metrics) = match (&self.value_head, pref, kto_tags) {
                (_, _, Some(tags)) => {
                    let tags = &tags[i * bs..(i * bs + c.len()).min(tags.len())];
                    kto_step(&self.model, &b, tags, self.args, None)?
                }
                (Some(head), _, None) => {
                    let (l, acc, _, _) = reward::pairwise_step(head, &self.model, &b, None)?;
                    (l, vec![("accuracy".to_string(), acc)])
                }
                (None, Some(kind), None) => {
                    preference_step(&self.model, &b, kind, self.args, None)?
                }
                (None, None, None) => {
                    bail!("internal error: pair evaluation without a paired stage")
                }
            };
            loss += l.to_dtype(DType::F64)?.to_scalar::<f64>()? * c.len() as f64;
            for (k, v) in metrics {
                let e = sums.entry(format!("eval_{k}")).or_default();
                e.0 += v * c.len() as f64;
                e.1 += c.len() as f64;
            }
            n += c.len();
        }
        let n = n.max(1) as f64;
        Ok((
            loss / n,
            sums.into_iter()
                .map(|(k, (v, w))| (k, json!(v / w.max(1.0))))
                .collect(),
        ))
    }

    fn log_line(&self, path: &Path, entry: &Value) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{}", serde_json::to_string(entry)?)?;
        Ok(())
    }
}

/// Trains per `args`, reporting through `rep`. Errors before the first step are returned;
/// problems during training end in [`Outcome::Failed`] after a checkpoint is saved.
pub fn run_training(
    args: &TrainArgs,
    opts: &TrainOptions,
    rep: &mut dyn Reporter,
) -> Result<Outcome> {
    crate::config::validate(args)?;
    let output_dir = PathBuf::from(
        args.output_dir
            .as_deref()
            .ok_or_else(|| anyhow!("`output_dir` is required"))?,
    );
    let mut resume = args.resume_from_checkpoint.as_ref().map(PathBuf::from);
    if resume.is_none() && output_dir.is_dir() && !args.overwrite_output_dir {
        resume = last_checkpoint(&output_dir);
        let has_outputs = [
            "adapter_model.safetensors",
            "model.safetensors",
            "model.safetensors.index.json",
        ]
        .iter()
        .any(|f| output_dir.join(f).exists());
        if resume.is_none() && has_outputs {
            bail!(
                "Output directory {} already exists and is not empty. Please set `overwrite_output_dir: true` or choose another `output_dir`.",
                output_dir.display()
            );
        }
    }
    if let Some(r) = &resume {
        if !r.join("trainer_state.json").exists() {
            bail!(
                "cannot resume from {}: no trainer_state.json there",
                r.display()
            );
        }
        rep.event(&WorkerEvent::Log {
            level: "info".into(),
            message: format!("Resuming training from {}.", r.display()),
        });
    }
    std::fs::create_dir_all(&output_dir)
        .with_context(|| format!("cannot create {}", output_dir.display()))?;

    let (tok, template, warnings) = load_tokenizer_and_template(args)?;
    for w in warnings {
        rep.event(&WorkerEvent::Log {
            level: "warning".into(),
            message: w,
        });
    }
    let data = get_dataset(args, &tok, &template)?;
    for s in data.skipped.iter().take(10) {
        rep.event(&WorkerEvent::Log {
            level: "warning".into(),
            message: format!("skipped {s}"),
        });
    }
    let model_name = args.model_name_or_path.clone().unwrap_or_default();
    let model_dir = crate::hub::resolve_model_dir(&model_name, &args.model_revision)?;
    let mut model = Model::load(&model_dir, opts.dtype, &opts.device)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    if tok.len() > model.cfg.vocab_size {
        if !args.resize_vocab {
            bail!(
                "the template added tokens {:?} that the model's vocabulary ({} entries) lacks; set `resize_vocab: true` to train their embeddings, or choose the model's own template",
                tok.new_tokens,
                model.cfg.vocab_size
            );
        }
        resize_vocab(&mut model, tok.len())?;
    }
    model.checkpointing = args.gradient_checkpointing && !args.disable_gradient_checkpointing;

    // Method.
    let mut lora = None;
    match args.finetuning_type.as_str() {
        "lora" => {
            let adapters = TrainArgs::split_list(args.adapter_name_or_path.as_deref());
            let (merge, resume_adapter) = match (adapters.split_last(), args.create_new_adapter) {
                (Some((last, rest)), false) => (rest.to_vec(), Some(last.clone())),
                _ => (adapters.clone(), None),
            };
            for a in &merge {
                model.load_adapter(Path::new(a), false)?;
            }
            lora = Some(match resume_adapter {
                Some(a) => model.load_adapter(Path::new(&a), true)?,
                None => {
                    let spec = LoraSpec::from_args(args);
                    model.add_lora(&spec, args.seed)?;
                    spec
                }
            });
        }
        "freeze" => model.setup_freeze(args)?,
        _ => model.setup_full()?,
    }
    let mut trainable = model.trainable();
    // RM trains a value head as the reward; PPO's policy carries one as its critic.
    let value_head = if matches!(args.stage.as_str(), "rm" | "ppo") {
        let head = match (&resume, lora.is_some()) {
            // Continuing an adapter that already has a value head next to it.
            (None, true) => TrainArgs::split_list(args.adapter_name_or_path.as_deref())
                .last()
                .map(Path::new)
                .filter(|d| d.join(VALUE_HEAD_FILE).exists() && !args.create_new_adapter)
                .map(|d| ValueHead::load(d, opts.dtype, &opts.device))
                .transpose()?,
            _ => None,
        };
        let head = match head {
            Some(h) => h,
            None => ValueHead::new(model.cfg.hidden_size, args.seed, opts.dtype, &opts.device)?,
        };
        trainable.push((reward::WEIGHT.into(), head.weight.clone()));
        trainable.push((reward::BIAS.into(), head.bias.clone()));
        Some(head)
    } else {
        None
    };
    if trainable.is_empty() {
        bail!("no parameter is trainable with these settings");
    }
    let n_trainable: u64 = trainable.iter().map(|(_, v)| v.elem_count() as u64).sum();
    let n_all: u64 = model
        .params
        .values()
        .map(|p| p.tensor.elem_count() as u64)
        .sum::<u64>()
        + model
            .lora
            .values()
            .map(|l| (l.a.elem_count() + l.b.elem_count()) as u64)
            .sum::<u64>()
        + value_head
            .as_ref()
            .map_or(0, |h| (h.weight.elem_count() + h.bias.elem_count()) as u64);
    rep.event(&WorkerEvent::Log {
        level: "info".into(),
        message: format!(
            "trainable params: {n_trainable} || all params: {n_all} || trainable%: {:.4}",
            100.0 * n_trainable as f64 / n_all as f64
        ),
    });

    let neat = args.neat_packing;
    let pref = if args.stage == "dpo" {
        Some(PrefLoss::from_args(args)?)
    } else {
        None
    };
    let kto = args.stage == "kto";
    let rm = args.stage == "rm";
    let is_ppo = args.stage == "ppo";
    // Paired stages keep a partner row per example: the rejected answer (DPO, RM) or the
    // mismatched KL completion (KTO).
    let (train_rows, rejected_rows, kto_tags) = if pref.is_some() || rm {
        let (c, r) = pair_rows(&data.train);
        (c, Some(r), Vec::new())
    } else if kto {
        let (m, k, t) = kto_rows(&data.train);
        (m, Some(k), t)
    } else {
        (rows_of(&data.train, neat), None, Vec::new())
    };
    // RM and DPO evaluate pairs: chosen rows, then their rejected partners.
    let (eval_pairs, eval_tags) = if rm || pref.is_some() {
        (Some(pair_rows(&data.eval)), None)
    } else if kto {
        let (m, k, t) = kto_rows(&data.eval);
        (Some((m, k)), Some(t))
    } else {
        (None, None)
    };
    let eval_rows = if pref.is_some() || kto || rm || is_ppo {
        if !data.eval.is_empty() && is_ppo {
            rep.event(&WorkerEvent::Log {
                level: "warning".into(),
                message: "PPO does not evaluate (as in LLaMA-Factory); the eval set is ignored"
                    .into(),
            });
        }
        Vec::new()
    } else {
        rows_of(&data.eval, neat)
    };
    let mut max_seq = train_rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
    let pad = tok.pad_id().or(tok.eos_id()).unwrap_or(0);
    let mut ppo = if is_ppo {
        let p = Ppo::new(args, &model, template.stop_token_ids(&tok), pad)?;
        max_seq += p.max_new_tokens();
        Some(p)
    } else {
        None
    };
    check_memory(&model, n_trainable, args, max_seq)?;

    // Schedule. A PPO step samples `ppo_buffer_size` batches of prompts.
    let bs = args.per_device_train_batch_size;
    let accum = args.gradient_accumulation_steps;
    let micro_per_step = accum
        * if is_ppo {
            args.ppo_buffer_size.max(1)
        } else {
            1
        };
    let n_micro = train_rows.len().div_ceil(bs);
    let steps_per_epoch = n_micro.div_ceil(micro_per_step).max(1);
    let total_steps = if args.max_steps > 0 {
        args.max_steps as usize
    } else {
        (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize
    };
    let warmup = if args.warmup_steps > 0 {
        args.warmup_steps
    } else {
        (args.warmup_ratio * total_steps as f64).ceil() as usize
    };
    let schedule = LrSchedule::new(
        &args.lr_scheduler_type,
        warmup,
        total_steps,
        args.learning_rate,
    )?;

    let groups = trainable
        .into_iter()
        .map(|(name, var)| {
            let lr_scale = match args.loraplus_lr_ratio {
                Some(r) if name.contains("lora_B") => r,
                _ => 1.0,
            };
            let weight_decay = if decays(&name) {
                args.weight_decay
            } else {
                0.0
            };
            ParamGroup {
                name,
                var,
                weight_decay,
                lr_scale,
            }
        })
        .collect();
    let opt = AdamW::new(groups, args.adam_beta1, args.adam_beta2, args.adam_epsilon)?;
    let mut run = Run {
        args,
        opts,
        output_dir: output_dir.clone(),
        model_dir,
        model,
        tok,
        lora,
        value_head,
        opt,
        log_history: Vec::new(),
        total_steps,
        steps_per_epoch,
        num_examples: train_rows.len(),
        tokens_seen: 0,
        start: Instant::now(),
        prior_elapsed: 0.0,
    };

    let mut start_step = 0usize;
    let log_path = output_dir.join("trainer_log.jsonl");
    if let Some(ckpt) = &resume {
        start_step = restore(&mut run, ckpt)?;
        // Keep the log up to the checkpoint; later lines belong to the lost part of the run.
        if let Ok(text) = std::fs::read_to_string(&log_path) {
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v["current_steps"].as_u64())
                        .is_some_and(|s| s as usize <= start_step)
                })
                .collect();
            std::fs::write(
                &log_path,
                kept.iter().map(|l| format!("{l}\n")).collect::<String>(),
            )?;
        }
    } else {
        let _ = std::fs::remove_file(&log_path);
    }

    rep.event(&WorkerEvent::Started {
        total_steps: total_steps as u64,
        num_examples: train_rows.len() as u64,
        skipped_examples: data.skipped.len() as u64,
    });

    let mut first_step_checked = false;
    let mut window_loss = 0.0;
    let mut window_extra: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    let mut window_steps = 0usize;
    let mut losses_for_result = Vec::new();
    let mut perm: Vec<usize> = Vec::new();
    let mut perm_epoch = usize::MAX;
    let eval_every = args.eval_steps.unwrap_or(args.logging_steps).max(1);
    let started_at = Instant::now();
    let tokens_at_start = run.tokens_seen;
    for step in start_step + 1..=total_steps {
        let epoch_idx = (step - 1) / steps_per_epoch;
        let in_epoch = (step - 1) % steps_per_epoch;
        if epoch_idx != perm_epoch {
            perm = (0..train_rows.len()).collect();
            if !args.disable_shuffling {
                perm.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    args.seed.wrapping_add(epoch_idx as u64),
                ));
            }
            perm_epoch = epoch_idx;
        }
        let micro_range = in_epoch * micro_per_step..((in_epoch + 1) * micro_per_step).min(n_micro);
        let lr = args.learning_rate * schedule.factor(step - 1);
        let (step_loss, grad_norm) = if let Some(ppo) = ppo.as_mut() {
            let prompts: Vec<&Row> = micro_range
                .flat_map(|m| perm[m * bs..((m + 1) * bs).min(perm.len())].iter())
                .map(|&i| &train_rows[i])
                .collect();
            let head = run.value_head.as_ref().expect("ppo has a value head");
            let out = ppo.step(&mut run.model, head, &mut run.opt, args, &prompts, step, lr)?;
            run.tokens_seen += out.tokens;
            tally(&mut window_extra, out.metrics);
            (out.loss, out.grad_norm)
        } else {
            let micro: Vec<Batch> = micro_range
                .clone()
                .map(|m| {
                    let idx = &perm[m * bs..((m + 1) * bs).min(perm.len())];
                    let mut rows: Vec<&Row> = idx.iter().map(|&i| &train_rows[i]).collect();
                    if let Some(rej) = &rejected_rows {
                        rows.extend(idx.iter().map(|&i| &rej[i]));
                    }
                    run.tokens_seen += rows.iter().map(|r| r.ids.len() as u64).sum::<u64>();
                    make_batch(&rows, pad)
                })
                .collect();
            let micro_tags: Vec<Vec<bool>> = micro_range
                .map(|m| {
                    perm[m * bs..((m + 1) * bs).min(perm.len())]
                        .iter()
                        .map(|&i| kto_tags.get(i).copied().unwrap_or(true))
                        .collect()
                })
                .collect();
            let n_targets: usize = micro.iter().map(Batch::num_targets).sum::<usize>().max(1);
            let mut grads: Vec<Option<Tensor>> = vec![None; run.opt.params.len()];
            let mut step_loss = 0.0;
            let mut rng = ChaCha8Rng::seed_from_u64(
                args.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            for (mi, b) in micro.iter().enumerate() {
                // Token-level losses weigh micro-batches by their labelled tokens; preference
                // losses are means over examples, so each micro-batch counts equally.
                let (loss, metrics) = match pref {
                    Some(kind) => {
                        let (l, m) = preference_step(&run.model, b, kind, args, Some(&mut rng))?;
                        ((l / micro.len() as f64)?, m)
                    }
                    None if rm => {
                        let head = run.value_head.as_ref().expect("rm has a value head");
                        let (l, acc, c, r) =
                            reward::pairwise_step(head, &run.model, b, Some(&mut rng))?;
                        let m = vec![
                            ("accuracy".to_string(), acc),
                            ("rewards/chosen".to_string(), mean(&c)),
                            ("rewards/rejected".to_string(), mean(&r)),
                        ];
                        ((l / micro.len() as f64)?, m)
                    }
                    None if kto => {
                        let (l, m) =
                            kto_step(&run.model, b, &micro_tags[mi], args, Some(&mut rng))?;
                        ((l / micro.len() as f64)?, m)
                    }
                    None => {
                        let (loss_sum, _) = run.model.loss_sum(b, Some(&mut rng))?;
                        ((loss_sum / n_targets as f64)?, Vec::new())
                    }
                };
                tally(&mut window_extra, metrics);
                step_loss += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                run.opt
                    .accumulate(&mut grads, &run.model.backward(&loss)?)?;
            }
            if !first_step_checked {
                run.opt.check_gradients(&grads)?;
                first_step_checked = true;
            }
            if !step_loss.is_finite() {
                (step_loss, f64::NAN)
            } else {
                let grad_norm = AdamW::clip_grad_norm(&mut grads, args.max_grad_norm)?;
                run.opt.update(&grads, lr)?;
                (step_loss, grad_norm)
            }
        };
        if !step_loss.is_finite() {
            let saved = run.save_checkpoint(step - 1, rep).ok();
            let msg = format!(
                "the loss became {step_loss} at step {step}; training stopped{} — lower the learning rate or check the data",
                saved.map(|p| format!(", the last good state is saved in {}", p.display())).unwrap_or_default()
            );
            rep.event(&WorkerEvent::Failed {
                step: Some(step as u64),
                error: msg.clone(),
            });
            return Ok(Outcome::Failed(msg));
        }
        window_loss += step_loss;
        window_steps += 1;
        losses_for_result.push(step_loss);

        let logged_lr = args.learning_rate * schedule.factor(step);
        let elapsed = run.elapsed();
        let this_run = started_at.elapsed().as_secs_f64().max(1e-9);
        let tps = (run.tokens_seen - tokens_at_start) as f64 / this_run;
        let eta = this_run / (step - start_step) as f64 * (total_steps - step) as f64;
        if step % args.logging_steps.max(1) == 0 || step == total_steps {
            let loss = round(window_loss / window_steps as f64, 4);
            window_loss = 0.0;
            window_steps = 0;
            let epoch = round(run.epoch_at(step), 4);
            let extra: Map<String, Value> = std::mem::take(&mut window_extra)
                .into_iter()
                .map(|(k, (sum, n))| (k, json!(round(sum / n as f64, 4))))
                .collect();
            let mut entry = json!({"epoch": epoch, "grad_norm": grad_norm, "learning_rate": logged_lr, "loss": loss, "step": step});
            let mut line = json!({
                "current_steps": step, "total_steps": total_steps, "loss": loss, "lr": logged_lr, "epoch": epoch,
                "percentage": round(step as f64 / total_steps as f64 * 100.0, 2),
                "elapsed_time": timedelta(elapsed), "remaining_time": timedelta(eta),
                "throughput": round(tps, 2), "total_tokens": run.tokens_seen,
            });
            for (k, v) in &extra {
                entry[k] = v.clone();
                // LLaMA-Factory's log line names the DPO accuracy `accuracy`.
                line[if k == "rewards/accuracies" {
                    "accuracy"
                } else {
                    k.as_str()
                }] = v.clone();
            }
            run.log_history.push(entry);
            run.log_line(&log_path, &line)?;
            rep.event(&WorkerEvent::Step(StepMetrics {
                step: step as u64,
                total: total_steps as u64,
                loss,
                lr: logged_lr,
                epoch,
                grad_norm: Some(grad_norm),
                tokens_per_sec: tps,
                elapsed_s: elapsed,
                eta_s: eta,
                extra,
            }));
        }
        let epoch_end = in_epoch + 1 == steps_per_epoch;
        let eval_now = !eval_rows.is_empty()
            && ((args.eval_strategy == "steps" && step % eval_every == 0)
                || (args.eval_strategy == "epoch" && epoch_end));
        if eval_now {
            let el = run.eval_loss(&eval_rows, pad)?;
            record_eval(&mut run, &log_path, step, el, Map::new(), rep)?;
        }
        let pair_eval_now = eval_pairs.as_ref().is_some_and(|p| !p.0.is_empty())
            && ((args.eval_strategy == "steps" && step % eval_every == 0)
                || (args.eval_strategy == "epoch" && epoch_end));
        if let (true, Some(pairs)) = (pair_eval_now, &eval_pairs) {
            let (el, extra) = run.pair_eval(pairs, pref, eval_tags.as_deref(), pad)?;
            record_eval(&mut run, &log_path, step, el, extra, rep)?;
        }
        let save_now = (args.save_strategy == "steps" && step % args.save_steps.max(1) == 0)
            || (args.save_strategy == "epoch" && epoch_end);
        if save_now && step != total_steps {
            run.save_checkpoint(step, rep)?;
        }
        if opts.stop.load(Ordering::SeqCst) {
            let dir = run.save_checkpoint(step, rep)?;
            rep.event(&WorkerEvent::Aborted {
                step: step as u64,
                checkpoint: Some(dir.display().to_string()),
            });
            return Ok(Outcome::Aborted);
        }
    }

    // Final outputs, as LLaMA-Factory writes them.
    if args.save_strategy != "no"
        && total_steps > start_step
        && total_steps % args.save_steps.max(1) == 0
    {
        run.save_checkpoint(total_steps, rep)?;
    }
    let base = model_name.clone();
    save_model(&output_dir, &run.model, &run.save_kind(), &base, &run.tok)?;
    if let Some(h) = &run.value_head {
        h.save(&output_dir)?;
    }
    let runtime = run.elapsed();
    let mut metrics = Map::new();
    metrics.insert("epoch".into(), json!(round(run.epoch_at(total_steps), 4)));
    metrics.insert("total_flos".into(), json!(0.0));
    let train_loss = run
        .log_history
        .iter()
        .filter_map(|h| h.get("loss").and_then(Value::as_f64))
        .collect::<Vec<_>>();
    let mean_loss = if losses_for_result.is_empty() {
        train_loss.last().copied().unwrap_or(f64::NAN)
    } else {
        losses_for_result.iter().sum::<f64>() / losses_for_result.len() as f64
    };
    metrics.insert("train_loss".into(), json!(mean_loss));
    metrics.insert("train_runtime".into(), json!(round(runtime, 4)));
    metrics.insert(
        "train_samples_per_second".into(),
        json!(round(
            run.num_examples as f64 * args.num_train_epochs / runtime,
            3
        )),
    );
    metrics.insert(
        "train_steps_per_second".into(),
        json!(round(total_steps as f64 / runtime, 3)),
    );
    metrics.insert("num_input_tokens_seen".into(), json!(run.tokens_seen));
    metrics.insert(
        "throughput".into(),
        json!(round(run.tokens_seen as f64 / runtime, 2)),
    );
    let mut all = metrics.clone();
    if !eval_rows.is_empty() && (args.do_eval || args.val_size > 0.0 || args.eval_dataset.is_some())
    {
        let el = run.eval_loss(&eval_rows, pad)?;
        let mut eval = Map::new();
        eval.insert("epoch".into(), json!(round(run.epoch_at(total_steps), 4)));
        eval.insert("eval_loss".into(), json!(el));
        if args.stage == "pt" {
            eval.insert("eval_perplexity".into(), json!(el.exp()));
        }
        write_json(
            &output_dir.join("eval_results.json"),
            &Value::Object(eval.clone()),
        )?;
        all.extend(eval);
    }
    if let Some(pairs) = eval_pairs.as_ref().filter(|p| !p.0.is_empty()) {
        let (el, extra) = run.pair_eval(pairs, pref, eval_tags.as_deref(), pad)?;
        let mut eval: Map<String, Value> = [
            (
                "epoch".to_string(),
                json!(round(run.epoch_at(total_steps), 4)),
            ),
            ("eval_loss".to_string(), json!(el)),
        ]
        .into_iter()
        .collect();
        eval.extend(extra);
        write_json(
            &output_dir.join("eval_results.json"),
            &Value::Object(eval.clone()),
        )?;
        all.extend(eval);
    }
    write_json(
        &output_dir.join("train_results.json"),
        &Value::Object(metrics),
    )?;
    write_json(
        &output_dir.join("all_results.json"),
        &Value::Object(all.clone()),
    )?;
    write_json(
        &output_dir.join("trainer_state.json"),
        &run.state_json(total_steps),
    )?;
    if args.plot_loss {
        crate::plot::plot_losses(&output_dir, &run.log_history)?;
    }
    all.insert("global_step".into(), json!(total_steps));
    Ok(Outcome::Finished(all))
}

/// Adds a micro-step's metrics to the sums averaged at the next log line.
fn tally(
    window: &mut std::collections::BTreeMap<String, (f64, usize)>,
    metrics: Vec<(String, f64)>,
) {
    for (k, v) in metrics {
        let e = window.entry(k).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    }
}

fn record_eval(
    run: &mut Run,
    log_path: &Path,
    step: usize,
    eval_loss: f64,
    extra: Map<String, Value>,
    rep: &mut dyn Reporter,
) -> Result<()> {
    let epoch = round(run.epoch_at(step), 4);
    let mut entry = json!({"epoch": epoch, "eval_loss": eval_loss, "step": step});
    for (k, v) in &extra {
        entry[k] = v.clone();
    }
    run.log_history.push(entry);
    let line = json!({
        "current_steps": step, "total_steps": run.total_steps, "eval_loss": eval_loss, "epoch": epoch,
        "percentage": round(step as f64 / run.total_steps as f64 * 100.0, 2),
        "elapsed_time": timedelta(run.elapsed()), "remaining_time": timedelta(0.0),
    });
    run.log_line(log_path, &line)?;
    let mut metrics = Map::new();
    metrics.insert("eval_loss".into(), json!(eval_loss));
    if run.args.stage == "pt" {
        metrics.insert("eval_perplexity".into(), json!(eval_loss.exp()));
    }
    metrics.extend(extra);
    rep.event(&WorkerEvent::Eval {
        step: step as u64,
        metrics,
    });
    Ok(())
}

/// Restores weights, optimizer and progress from a checkpoint; returns its step.
fn restore(run: &mut Run, ckpt: &Path) -> Result<usize> {
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("trainer_state.json"))
            .with_context(|| format!("cannot read {}", ckpt.display()))?,
    )?;
    let step = state["global_step"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: bad trainer_state.json", ckpt.display()))?
        as usize;
    run.log_history = state["log_history"].as_array().cloned().unwrap_or_default();
    run.tokens_seen = state["num_input_tokens_seen"].as_u64().unwrap_or(0);
    run.prior_elapsed = state["train_runtime_so_far"].as_f64().unwrap_or(0.0);
    let weights_file = if run.lora.is_some() {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    };
    let mut tensors = candle_core::safetensors::load(ckpt.join(weights_file), &run.opts.device)
        .map_err(|e| anyhow!("cannot read {}: {e}", ckpt.join(weights_file).display()))?;
    if run.value_head.is_some() {
        let head = ValueHead::load(ckpt, run.opts.dtype, &run.opts.device)?;
        tensors.extend(head.tensors()?);
    }
    for p in &run.opt.params {
        let key = if run.lora.is_some()
            && !p.name.starts_with("base_model.model.")
            && !p.name.starts_with("v_head.")
        {
            format!("base_model.model.{}", p.name)
        } else {
            p.name.clone()
        };
        let t = tensors
            .get(&key)
            .ok_or_else(|| anyhow!("{}: `{key}` missing in checkpoint", ckpt.display()))?;
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    let opt_file = ckpt.join("optimizer.safetensors");
    if opt_file.exists() {
        run.opt.load_state(&opt_file)?;
    }
    Ok(step)
}
