//! The training loop: `run_training` prepares a run (`setup`), then for each optimizer step
//! takes its learning rate and examples from the plan, lets the objective step, logs, and
//! evaluates, saves and stops when the plan or the user says so; at the end it writes
//! LLaMA-Factory's output files.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Result;
use protocol::events::StepMetrics;
use protocol::{TrainArgs, WorkerEvent};
use serde_json::{json, Map, Value};

use super::batch::Examples;
use super::checkpoint::{
    atomic_dir, last_checkpoint, restore, rotate_checkpoints, save_model, SaveKind,
};
use super::log::{round, write_results, Progress, TrainerLog};
use super::model_card::{write_model_card, CardFacts};
use super::objective::{Objective, StepInput, StepOutput};
use super::optim::AdamW;
use super::plan::{Order, Plan};
use super::report::Reporter;
use super::setup::{prepare, Prepared};
use super::{Outcome, TrainOptions};
use crate::files::{write_json, write_safetensors};
use crate::model::adapter::LoraSpec;
use crate::model::Model;
use crate::tokenizer::HfTokenizer;

/// Trains per `args`, reporting through `rep`. Errors before the first step are returned;
/// problems during training end in [`Outcome::Failed`].
pub fn run_training(
    args: &TrainArgs,
    opts: &TrainOptions,
    rep: &mut dyn Reporter,
) -> Result<Outcome> {
    crate::config::validate(args)?;
    check_data_parallel(args, &opts.world)?;
    let mut s = Session::start(args, prepare(args, opts, rep)?, &opts.world)?;
    rep.event(&WorkerEvent::Started {
        total_steps: s.plan.total_steps as u64,
        num_examples: s.train.len() as u64,
        skipped_examples: s.skipped as u64,
    });
    let mut order = Order::default();
    let (started, tokens_at_start) = (Instant::now(), s.tokens_seen);
    for step in s.start_step + 1..=s.plan.total_steps {
        let lr = s.plan.lr(step - 1);
        let micro = s.plan.micro_batches(&mut order, step);
        let input = StepInput {
            args,
            step,
            lr,
            examples: &s.train,
            micro: &micro,
            pad: s.pad,
            world: s.world,
        };
        let out = s.objective.step(&mut s.model, &mut s.opt, input)?;
        s.tokens_seen += out.tokens;
        if let Some(b) = s.badam.as_mut() {
            if b.after_step() {
                s.model.train_only(|n| b.is_active(n))?;
                let mut trainable = s.model.trainable();
                trainable.extend(s.objective.trainable());
                s.opt = super::setup::optimizer(trainable, args, &[])?;
                if args.badam_verbose >= 1 {
                    rep.event(&WorkerEvent::Log {
                        level: "info".into(),
                        message: format!("BAdam: training {} from step {}", b.active(), step + 1),
                    });
                }
            }
        }
        if !out.loss.is_finite() {
            return Ok(s.stop_on_non_finite(step, &out, rep));
        }
        s.log.add_step(out.loss, out.metrics);

        if step % args.logging_steps.max(1) == 0 || step == s.plan.total_steps {
            let this_run = started.elapsed().as_secs_f64().max(1e-9);
            let tps = (s.tokens_seen - tokens_at_start) as f64 / this_run;
            let remaining =
                this_run / (step - s.start_step) as f64 * (s.plan.total_steps - step) as f64;
            s.report_step(step, out.grad_norm, tps, remaining, rep)?;
        }
        if s.plan.should_eval(step) && !s.eval.is_empty() {
            s.evaluate(step, rep)?;
        }
        let saved = if s.plan.should_save(step) {
            Some(s.save_checkpoint(step, rep)?)
        } else {
            None
        };
        // One rank asked to stop (LlamaBoard's abort reaches each): all stop after this step.
        if s.world
            .any(opts.stop.load(Ordering::SeqCst), "stop requests")?
        {
            let dir = match saved {
                Some(dir) => dir,
                None => s.save_checkpoint(step, rep)?,
            };
            rep.event(&WorkerEvent::Aborted {
                step: step as u64,
                checkpoint: Some(dir.display().to_string()),
            });
            s.log.end_tracking(super::mlflow::RunStatus::Killed, None);
            return Ok(Outcome::Aborted);
        }
    }
    s.finish()
}

/// What data-parallel runs do not support, as an error naming the key: KTO's KL estimate and
/// PPO's rollouts are per batch, and layer-wise GaLore/APOLLO step each tensor during the
/// backward pass, before the gradients could be summed over ranks (LLaMA-Factory refuses
/// those too).
fn check_data_parallel(args: &TrainArgs, world: &crate::dist::World) -> Result<()> {
    use protocol::args::Stage;
    if world.size() == 1 {
        if let Some(n) = args.nproc_per_node.filter(|&n| n > 1) {
            anyhow::bail!(
                "`nproc_per_node`: {n} ranks are started by `llamafactory train` (or mpirun, torchrun, srun), not inside this process"
            );
        }
        return Ok(());
    }
    let refuse = |key: &str, why: &str| {
        anyhow::bail!(
            "`{key}`: {why} is not supported in a data-parallel run ({} ranks); run it in one process",
            world.size()
        )
    };
    match args.stage {
        Stage::Kto => refuse("stage", "KTO (its KL estimate spans the whole batch)")?,
        Stage::Ppo => refuse("stage", "PPO")?,
        _ => {}
    }
    if args.use_galore && args.galore_layerwise {
        refuse("galore_layerwise", "layer-wise GaLore")?;
    }
    if args.use_apollo && args.apollo_layerwise {
        refuse("apollo_layerwise", "layer-wise APOLLO")?;
    }
    Ok(())
}

/// A run between its preparation and its last file. In a data-parallel run every rank has
/// one; rank 0's alone writes files and reports.
struct Session<'a> {
    args: &'a TrainArgs,
    world: &'a crate::dist::World,
    output_dir: PathBuf,
    model_dir: PathBuf,
    model: Model,
    tok: HfTokenizer,
    lora: Option<LoraSpec>,
    objective: Objective,
    opt: AdamW,
    plan: Plan,
    train: Examples,
    eval: Examples,
    skipped: usize,
    pad: u32,
    log: TrainerLog,
    /// The step the run continues after (0 for a new run).
    start_step: usize,
    tokens_seen: u64,
    start: Instant,
    /// Seconds already spent before a resume.
    prior_elapsed: f64,
    badam: Option<super::badam::Badam>,
}

/// The trackers `report_to` names that run here.
const TRACKERS_HERE: &[&str] = &["tensorboard", "mlflow", "wandb"];

/// The trackers of `report_to`: TensorBoard's event file (with the run's arguments as text),
/// MLflow's run and an offline W&B run; the others are named in a warning, as they have no
/// effect here.
fn open_trackers(
    args: &TrainArgs,
    output_dir: &std::path::Path,
    log: &mut TrainerLog,
    model: &Model,
) -> Result<()> {
    let trackers = args.trackers();
    let others: Vec<&String> = trackers
        .iter()
        .filter(|t| !TRACKERS_HERE.contains(&t.as_str()))
        .collect();
    if !others.is_empty() {
        eprintln!(
            "warning: `report_to`: {} not supported, ignored (TensorBoard, MLflow and W&B offline are; LlamaBoard's own log is always written)",
            others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    // transformers names a run `run_name`, by default the output dir, and gives the trackers
    // the model's config with every argument over it.
    let name = args
        .run_name
        .clone()
        .unwrap_or_else(|| output_dir.display().to_string());
    let config = || {
        let mut config: Vec<(String, serde_json::Value)> = model
            .cfg
            .raw
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let serde_json::Value::Object(a) = serde_json::to_value(args).unwrap_or_default() {
            config.retain(|(k, _)| !a.contains_key(k));
            config.extend(a);
        }
        config
    };
    if trackers.iter().any(|t| t == "mlflow") {
        log.mlflow = super::mlflow::Mlflow::start(super::mlflow::RunInfo {
            run_name: &name,
            params: super::mlflow::params(config()),
        });
    }
    if trackers.iter().any(|t| t == "wandb") {
        log.wandb = super::wandb::WandbRun::start(&name, config());
    }
    if trackers.iter().any(|t| t == "tensorboard") {
        log.tensorboard = Some(tensorboard_writer(args, output_dir)?);
    }
    Ok(())
}

/// TensorBoard's event file under `logging_dir`, with the run's arguments as text.
fn tensorboard_writer(
    args: &TrainArgs,
    output_dir: &std::path::Path,
) -> Result<super::tensorboard::EventWriter> {
    let dir = match &args.logging_dir {
        Some(d) => std::path::PathBuf::from(d),
        None => super::tensorboard::default_logging_dir(output_dir),
    };
    let mut w = super::tensorboard::EventWriter::create(&dir)?;
    w.text(
        "args",
        &serde_json::to_string_pretty(&args.non_default()).unwrap_or_default(),
    )?;
    Ok(w)
}

impl<'a> Session<'a> {
    /// The prepared run, restored from its checkpoint when it resumes.
    fn start(args: &'a TrainArgs, p: Prepared, world: &'a crate::dist::World) -> Result<Self> {
        let Prepared {
            output_dir,
            model_dir,
            resume,
            tok,
            model,
            lora,
            objective,
            mut opt,
            train,
            eval,
            skipped,
            pad,
            badam,
        } = p;
        let restored = match &resume {
            Some(ckpt) => Some(restore(
                ckpt,
                &mut opt,
                lora.is_some(),
                objective.value_head().is_some(),
                model.cfg.layout,
                model.dtype,
                &model.device,
            )?),
            None => None,
        };
        let start_step = restored.as_ref().map_or(0, |r| r.step);
        // Every rank starts from rank 0's weights (a resumed run's come from one checkpoint).
        world.broadcast_vars(&opt.vars())?;
        let main = world.is_main();
        // PiSSA with `pissa_convert`: the initial adapter, which the conversion at the end
        // subtracts (LLaMA-Factory's `pissa_init` folder).
        if let Some(spec) = lora
            .as_ref()
            .filter(|s| s.pissa.is_some() && args.pissa_convert && main)
        {
            if restored.is_none() {
                let init = LoraSpec {
                    pissa: None,
                    ..spec.clone()
                };
                let base = args.model_name_or_path.clone().unwrap_or_default();
                super::checkpoint::save_model(
                    &output_dir.join(super::checkpoint::PISSA_INIT),
                    &model,
                    &SaveKind::Adapter(&init),
                    &base,
                    &tok,
                )?;
            }
        }
        let mut log = TrainerLog::open(
            main.then_some(output_dir.as_path()),
            restored.as_ref().map(|r| r.step),
            restored
                .as_ref()
                .map(|r| r.log_history.clone())
                .unwrap_or_default(),
        )?;
        if main {
            open_trackers(args, &output_dir, &mut log, &model)?;
        }
        Ok(Self {
            args,
            world,
            plan: Plan::new(args, train.len(), world.size()),
            output_dir,
            model_dir,
            model,
            tok,
            lora,
            objective,
            opt,
            train,
            eval,
            skipped,
            pad,
            log,
            start_step,
            tokens_seen: restored.as_ref().map_or(0, |r| r.tokens_seen),
            start: Instant::now(),
            prior_elapsed: restored.as_ref().map_or(0.0, |r| r.elapsed),
            badam,
        })
    }

    fn elapsed(&self) -> f64 {
        self.prior_elapsed + self.start.elapsed().as_secs_f64()
    }

    fn progress(&self, step: usize, remaining: f64) -> Progress {
        Progress {
            step,
            total_steps: self.plan.total_steps,
            epoch: self.plan.epoch_at(step),
            elapsed: self.elapsed(),
            remaining,
        }
    }

    /// Logs the steps since the last line and tells the reporter.
    fn report_step(
        &mut self,
        step: usize,
        grad_norm: f64,
        tokens_per_sec: f64,
        remaining: f64,
        rep: &mut dyn Reporter,
    ) -> Result<()> {
        // The rate this step applied, as transformers 5 logs it.
        let lr = self.plan.lr(step - 1);
        let at = self.progress(step, remaining);
        let logged = self
            .log
            .log_step(&at, lr, grad_norm, tokens_per_sec, self.tokens_seen)?;
        rep.event(&WorkerEvent::Step(StepMetrics {
            step: step as u64,
            total: self.plan.total_steps as u64,
            loss: logged.loss,
            lr,
            epoch: round(at.epoch, 4),
            grad_norm: Some(grad_norm),
            tokens_per_sec,
            elapsed_s: at.elapsed,
            eta_s: remaining,
            extra: logged.extra,
        }));
        Ok(())
    }

    /// Evaluates the held-out examples after `step` and records the result.
    fn evaluate(&mut self, step: usize, rep: &mut dyn Reporter) -> Result<()> {
        let Some(e) = self.eval_held_out()? else {
            return Ok(());
        };
        let at = self.progress(step, 0.0);
        self.log.log_eval(&at, e.loss, &e.metrics)?;
        let mut metrics = Map::new();
        metrics.insert("eval_loss".into(), json!(e.loss));
        if self.objective.reports_perplexity() {
            metrics.insert("eval_perplexity".into(), json!(e.loss.exp()));
        }
        metrics.extend(e.metrics);
        rep.event(&WorkerEvent::Eval {
            step: step as u64,
            metrics,
        });
        Ok(())
    }

    /// The objective's evaluation of the held-out examples (every rank takes its turns); `None`
    /// without any, or for an objective that does not evaluate.
    fn eval_held_out(&self) -> Result<Option<super::step::EvalOutput>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let bs = self.args.per_device_eval_batch_size.max(1);
        self.objective
            .eval(&self.model, &self.eval, bs, self.pad, self.world)
    }

    /// The trained model (adapter or full weights), its tokenizer and its value head into `dir`.
    fn save_model_to(&self, dir: &std::path::Path) -> Result<()> {
        let kind = match &self.lora {
            Some(spec) => SaveKind::Adapter(spec),
            None => SaveKind::Full {
                source_dir: &self.model_dir,
                max_shard_bytes: 5_000_000_000,
            },
        };
        let base = self.args.model_name_or_path.clone().unwrap_or_default();
        save_model(dir, &self.model, &kind, &base, &self.tok)?;
        if let Some(h) = self.objective.value_head() {
            h.save(dir)?;
        }
        Ok(())
    }

    /// `trainer_state.json` after `step`.
    fn state_json(&self, step: usize) -> Value {
        let a = self.args;
        json!({
            "best_global_step": null,
            "best_metric": null,
            "best_model_checkpoint": null,
            "epoch": self.plan.epoch_at(step),
            "eval_steps": a.eval_steps.unwrap_or(a.logging_steps),
            "global_step": step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": self.log.history,
            "logging_steps": a.logging_steps,
            "max_steps": self.plan.total_steps,
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

    /// Writes `checkpoint-<step>/` (model, value head, optimizer, state) and rotates old ones.
    /// Rank 0 alone writes; the others return the same path.
    fn save_checkpoint(&self, step: usize, rep: &mut dyn Reporter) -> Result<PathBuf> {
        let dir = self.output_dir.join(format!("checkpoint-{step}"));
        if !self.world.is_main() {
            return Ok(dir);
        }
        atomic_dir(&dir, |tmp| {
            self.save_model_to(tmp)?;
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

    /// Ends the run on a non-finite loss at `step`. The weights of step `step - 1` are saved
    /// as the last good state unless an update of this step already changed them (PPO), in
    /// which case the last checkpoint on disk is the one to go back to.
    fn stop_on_non_finite(
        &mut self,
        step: usize,
        out: &StepOutput,
        rep: &mut dyn Reporter,
    ) -> Outcome {
        let saved = if out.updated {
            match last_checkpoint(&self.output_dir) {
                Some(p) => format!(
                    "; updates of this step had already changed the weights, so they were not saved: the last good checkpoint is {}",
                    p.display()
                ),
                None => "; updates of this step had already changed the weights, so they were not saved (there is no earlier checkpoint)".into(),
            }
        } else {
            match self.save_checkpoint(step - 1, rep) {
                Ok(p) => format!(", the last good state is saved in {}", p.display()),
                Err(e) => format!("; saving the last good state failed: {e:#}"),
            }
        };
        let msg = format!(
            "the loss became {} at step {step}; training stopped{saved} — lower the learning rate or check the data",
            out.loss
        );
        rep.event(&WorkerEvent::Failed {
            step: Some(step as u64),
            error: msg.clone(),
        });
        self.log
            .end_tracking(super::mlflow::RunStatus::Failed, None);
        Outcome::Failed(msg)
    }

    /// The final model, results, state and loss plot, as LLaMA-Factory writes them.
    fn finish(mut self) -> Result<Outcome> {
        if !self.world.is_main() {
            // The other ranks take their turns at the final evaluation rank 0 records.
            self.eval_held_out()?;
            return Ok(Outcome::Finished(Map::new()));
        }
        let total = self.plan.total_steps;
        self.save_model_to(&self.output_dir)?;
        if self.args.pissa_convert && self.lora.as_ref().is_some_and(|s| s.pissa.is_some()) {
            super::checkpoint::convert_pissa(&self.output_dir)?;
        }
        let runtime = self.elapsed();
        let epoch = round(self.plan.epoch_at(total), 4);
        let mut train = Map::new();
        train.insert("epoch".into(), json!(epoch));
        train.insert("total_flos".into(), json!(0.0));
        train.insert("train_loss".into(), json!(self.log.train_loss()));
        train.insert("train_runtime".into(), json!(round(runtime, 4)));
        let samples = self.plan.samples(self.args);
        train.insert(
            "train_samples_per_second".into(),
            json!(round(samples / runtime, 3)),
        );
        train.insert(
            "train_steps_per_second".into(),
            json!(round(total as f64 / runtime, 3)),
        );
        train.insert("num_input_tokens_seen".into(), json!(self.tokens_seen));
        train.insert(
            "throughput".into(),
            json!(round(self.tokens_seen as f64 / runtime, 2)),
        );
        let eval = self.eval_held_out()?.map(|e| {
            let mut m = Map::new();
            m.insert("epoch".into(), json!(epoch));
            m.insert("eval_loss".into(), json!(e.loss));
            if self.objective.reports_perplexity() {
                m.insert("eval_perplexity".into(), json!(e.loss.exp()));
            }
            m.extend(e.metrics);
            m
        });
        let mut all = write_results(&self.output_dir, &train, eval.as_ref())?;
        write_json(
            &self.output_dir.join("trainer_state.json"),
            &self.state_json(total),
        )?;
        if self.args.plot_loss {
            crate::plot::plot_losses(&self.output_dir, &self.log.history)?;
        }
        write_model_card(
            &self.output_dir,
            self.args,
            &CardFacts {
                log_history: &self.log.history,
                results: &all,
                plotted: self.args.plot_loss,
            },
        )?;
        all.insert("global_step".into(), json!(total));
        // The trackers get the end-of-training entry transformers logs (runtime, speeds, mean
        // loss) and the evaluation's, then MLflow the output files.
        let mut last = train.clone();
        last.insert("step".into(), json!(total));
        if let Some(e) = &eval {
            last.extend(e.clone());
        }
        self.log.track(&Value::Object(last));
        self.log
            .end_tracking(super::mlflow::RunStatus::Finished, Some(&self.output_dir));
        Ok(Outcome::Finished(all))
    }
}
