//! LLaMA-Factory's run records: `trainer_log.jsonl` (one line per logged or evaluated step),
//! the Trainer's `log_history` kept for `trainer_state.json`, and the `*_results.json` files
//! written at the end. Values are rounded as the Trainer rounds them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::files::write_json;

/// `str(timedelta(seconds=int(s)))`, as LLaMA-Factory writes elapsed and remaining time.
pub(crate) fn timedelta(s: f64) -> String {
    let s = s.max(0.0) as u64;
    let (d, h, m, sec) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60, s % 60);
    let hms = format!("{h}:{m:02}:{sec:02}");
    match d {
        0 => hms,
        1 => format!("1 day, {hms}"),
        _ => format!("{d} days, {hms}"),
    }
}

pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Where a logged step stands, for the log line.
pub(crate) struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: f64,
    pub elapsed: f64,
    pub remaining: f64,
}

/// What the log averaged since its previous line.
pub(crate) struct Logged {
    pub loss: f64,
    /// Stage metrics (`rewards/chosen`, `kl`, …), each averaged over its micro-steps.
    pub extra: Map<String, Value>,
}

pub(crate) struct TrainerLog {
    /// `trainer_log.jsonl`; none on the ranks that do not write (all but rank 0).
    path: Option<PathBuf>,
    /// The Trainer's `log_history`.
    pub(crate) history: Vec<Value>,
    window_loss: f64,
    window_steps: usize,
    window_extra: BTreeMap<String, (f64, usize)>,
    /// Every step's loss of this process, for `train_loss`.
    losses: Vec<f64>,
    /// TensorBoard's event file (`report_to: tensorboard`): every history entry goes there.
    pub(crate) tensorboard: Option<super::tensorboard::EventWriter>,
    /// The MLflow run (`report_to: mlflow`): every history entry's numbers go there.
    pub(crate) mlflow: Option<super::mlflow::Mlflow>,
    /// The offline W&B run (`report_to: wandb`, `WANDB_MODE=offline`).
    pub(crate) wandb: Option<super::wandb::WandbRun>,
}

impl TrainerLog {
    /// The log of `output_dir`. Resuming at `resume_step` keeps the lines up to it (later
    /// ones belong to the lost part of the run) and the checkpoint's `history`; a new run
    /// starts an empty file.
    pub(crate) fn open(
        output_dir: Option<&Path>,
        resume_step: Option<usize>,
        history: Vec<Value>,
    ) -> Result<Self> {
        let path = output_dir.map(|d| d.join("trainer_log.jsonl"));
        match (resume_step, &path) {
            (_, None) => {}
            (Some(step), Some(path)) => {
                if let Ok(text) = std::fs::read_to_string(path) {
                    let kept: String = text
                        .lines()
                        .filter(|l| {
                            serde_json::from_str::<Value>(l)
                                .ok()
                                .and_then(|v| v["current_steps"].as_u64())
                                .is_some_and(|s| s as usize <= step)
                        })
                        .map(|l| format!("{l}\n"))
                        .collect();
                    std::fs::write(path, kept)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
            }
            (None, Some(path)) => {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(Self {
            path,
            history,
            window_loss: 0.0,
            window_steps: 0,
            window_extra: BTreeMap::new(),
            losses: Vec::new(),
            tensorboard: None,
            mlflow: None,
            wandb: None,
        })
    }

    /// Adds a step's loss and its micro-steps' metrics to the window averaged at the next line.
    pub(crate) fn add_step(&mut self, loss: f64, metrics: Vec<(String, f64)>) {
        self.window_loss += loss;
        self.window_steps += 1;
        self.losses.push(loss);
        for (k, v) in metrics {
            let e = self.window_extra.entry(k).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }

    /// Writes the window as one logged step and empties it.
    pub(crate) fn log_step(
        &mut self,
        at: &Progress,
        lr: f64,
        grad_norm: f64,
        throughput: f64,
        tokens_seen: u64,
    ) -> Result<Logged> {
        let loss = round(self.window_loss / self.window_steps.max(1) as f64, 4);
        self.window_loss = 0.0;
        self.window_steps = 0;
        let epoch = round(at.epoch, 4);
        let extra: Map<String, Value> = std::mem::take(&mut self.window_extra)
            .into_iter()
            .map(|(k, (sum, n))| (k, json!(round(sum / n as f64, 4))))
            .collect();
        let mut entry = json!({"epoch": epoch, "grad_norm": grad_norm, "learning_rate": lr, "loss": loss, "step": at.step});
        let mut line = json!({
            "current_steps": at.step, "total_steps": at.total_steps, "loss": loss, "lr": lr, "epoch": epoch,
            "percentage": round(at.step as f64 / at.total_steps as f64 * 100.0, 2),
            "elapsed_time": timedelta(at.elapsed), "remaining_time": timedelta(at.remaining),
            "throughput": round(throughput, 2), "total_tokens": tokens_seen,
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
        self.track(&entry);
        self.history.push(entry);
        self.append(&line)?;
        Ok(Logged { loss, extra })
    }

    /// Records an evaluation at `at.step`: its loss and `eval_`-named metrics.
    pub(crate) fn log_eval(
        &mut self,
        at: &Progress,
        eval_loss: f64,
        extra: &Map<String, Value>,
    ) -> Result<()> {
        let epoch = round(at.epoch, 4);
        let mut entry = json!({"epoch": epoch, "eval_loss": eval_loss, "step": at.step});
        for (k, v) in extra {
            entry[k] = v.clone();
        }
        self.track(&entry);
        self.history.push(entry);
        let line = json!({
            "current_steps": at.step, "total_steps": at.total_steps, "eval_loss": eval_loss, "epoch": epoch,
            "percentage": round(at.step as f64 / at.total_steps as f64 * 100.0, 2),
            "elapsed_time": timedelta(at.elapsed), "remaining_time": timedelta(0.0),
        });
        self.append(&line)
    }

    /// Sends a history entry to the trackers. A tracker that fails is dropped with a warning
    /// on stderr; training goes on.
    pub(crate) fn track(&mut self, entry: &Value) {
        if let Some(tb) = self.tensorboard.as_mut() {
            if let Err(e) = tb.log_entry(entry) {
                eprintln!("warning: TensorBoard logging stopped: {e:#}");
                self.tensorboard = None;
            }
        }
        if let Some(m) = self.mlflow.as_mut() {
            m.log(entry);
        }
        if let Some(w) = self.wandb.as_mut() {
            if let Err(e) = w.log_entry(entry) {
                eprintln!("warning: W&B logging stopped: {e:#}");
                self.wandb = None;
            }
        }
    }

    /// Ends the trackers' runs: MLflow's gets its status and, when it finished, the files of
    /// `outputs`.
    pub(crate) fn end_tracking(
        &mut self,
        status: super::mlflow::RunStatus,
        outputs: Option<&Path>,
    ) {
        if let Some(m) = self.mlflow.take() {
            m.end(status, outputs);
        }
        if let Some(w) = self.wandb.take() {
            let code = match status {
                super::mlflow::RunStatus::Finished => 0,
                super::mlflow::RunStatus::Failed => 1,
                super::mlflow::RunStatus::Killed => 255,
            };
            if let Err(e) = w.finish(code) {
                eprintln!("warning: W&B: the run's end was not written: {e:#}");
            }
        }
    }

    /// The mean loss of the steps this process trained (`train_loss`); the last logged loss
    /// when it trained none (a run resumed at its end).
    pub(crate) fn train_loss(&self) -> f64 {
        if self.losses.is_empty() {
            self.history
                .iter()
                .filter_map(|h| h.get("loss").and_then(Value::as_f64))
                .next_back()
                .unwrap_or(f64::NAN)
        } else {
            self.losses.iter().sum::<f64>() / self.losses.len() as f64
        }
    }

    fn append(&self, line: &Value) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(line)?)?;
        Ok(())
    }
}

/// The end-of-run files: `train_results.json`, `eval_results.json` (when evaluated) and
/// `all_results.json` holding both.
pub(crate) fn write_results(
    output_dir: &Path,
    train: &Map<String, Value>,
    eval: Option<&Map<String, Value>>,
) -> Result<Map<String, Value>> {
    let mut all = train.clone();
    if let Some(eval) = eval {
        write_json(
            &output_dir.join("eval_results.json"),
            &Value::Object(eval.clone()),
        )?;
        all.extend(eval.clone());
    }
    write_json(
        &output_dir.join("train_results.json"),
        &Value::Object(train.clone()),
    )?;
    write_json(
        &output_dir.join("all_results.json"),
        &Value::Object(all.clone()),
    )?;
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timedelta_reads_like_python() {
        assert_eq!(timedelta(5.7), "0:00:05");
        assert_eq!(timedelta(3725.0), "1:02:05");
        assert_eq!(timedelta(90000.0), "1 day, 1:00:00");
        assert_eq!(timedelta(200000.0), "2 days, 7:33:20");
    }

    #[test]
    fn resuming_keeps_log_lines_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (1..=4)
            .map(|s| format!("{}\n", json!({"current_steps": s})))
            .collect();
        std::fs::write(dir.path().join("trainer_log.jsonl"), lines).unwrap();
        TrainerLog::open(Some(dir.path()), Some(2), Vec::new()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("trainer_log.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        TrainerLog::open(Some(dir.path()), None, Vec::new()).unwrap();
        assert!(!dir.path().join("trainer_log.jsonl").exists());
    }
}
