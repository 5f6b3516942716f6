//! Where progress goes: JSON lines on stdout for the server (`--events json`), or a progress
//! bar on a terminal. LLaMA-Factory's `trainer_log.jsonl` is written either way.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};
use protocol::WorkerEvent;

pub trait Reporter {
    fn event(&mut self, e: &WorkerEvent);
}

/// One JSON object per line, flushed at once so the reader sees it live.
pub struct JsonReporter;

impl Reporter for JsonReporter {
    fn event(&mut self, e: &WorkerEvent) {
        let mut out = std::io::stdout().lock();
        // `ts` (unix seconds when printed) lets the server measure event latency; readers of
        // `WorkerEvent` ignore it.
        if let Ok(serde_json::Value::Object(mut m)) = serde_json::to_value(e) {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            m.insert("ts".into(), ts.into());
            let _ = writeln!(out, "{}", serde_json::Value::Object(m));
            let _ = out.flush();
        }
    }
}

/// A terminal progress bar with loss, tokens/s and ETA.
pub struct BarReporter {
    bar: Option<ProgressBar>,
}

impl BarReporter {
    pub fn new() -> Self {
        Self { bar: None }
    }
}

impl Default for BarReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for BarReporter {
    fn event(&mut self, e: &WorkerEvent) {
        match e {
            WorkerEvent::Started {
                total_steps,
                num_examples,
                skipped_examples,
            } => {
                eprintln!("training on {num_examples} examples ({skipped_examples} skipped), {total_steps} steps");
                let bar = ProgressBar::new(*total_steps);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                self.bar = Some(bar);
            }
            WorkerEvent::Progress { step, total, .. } => {
                if self.bar.is_none() {
                    self.bar = Some(ProgressBar::new(*total));
                }
                if let Some(bar) = &self.bar {
                    bar.set_position(*step);
                }
            }
            WorkerEvent::Step(s) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(s.step);
                    bar.set_message(format!(
                        "loss {:.4} lr {:.2e} {:.0} tok/s",
                        s.loss, s.lr, s.tokens_per_sec
                    ));
                }
            }
            other => {
                let text = match other {
                    WorkerEvent::Eval { step, metrics } => format!(
                        "step {step}: {}",
                        serde_json::Value::Object(metrics.clone())
                    ),
                    WorkerEvent::Checkpoint { path, .. } => format!("saved {path}"),
                    WorkerEvent::Log { level, message } => format!("{level}: {message}"),
                    WorkerEvent::Finished { metrics, .. } => {
                        format!("finished: {}", serde_json::Value::Object(metrics.clone()))
                    }
                    WorkerEvent::Aborted { step, checkpoint } => {
                        format!(
                            "aborted at step {step}{}",
                            checkpoint
                                .as_ref()
                                .map(|c| format!(", saved {c}"))
                                .unwrap_or_default()
                        )
                    }
                    WorkerEvent::Failed { step, error } => {
                        format!(
                            "failed{}: {error}",
                            step.map(|s| format!(" at step {s}")).unwrap_or_default()
                        )
                    }
                    _ => String::new(),
                };
                match &self.bar {
                    Some(bar) => bar.println(text),
                    None => eprintln!("{text}"),
                }
                if matches!(
                    other,
                    WorkerEvent::Finished { .. }
                        | WorkerEvent::Aborted { .. }
                        | WorkerEvent::Failed { .. }
                ) {
                    if let Some(bar) = self.bar.take() {
                        bar.finish_and_clear();
                    }
                }
            }
        }
    }
}
