//! `llamafactory export`: merges adapters into the model and writes safetensors or GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use protocol::WorkerEvent;
use trainer::train::report::{JsonReporter, Reporter};

use super::train::Events;

#[derive(Args)]
pub struct ExportCmd {
    /// LLaMA-Factory merge/export YAML (`model_name_or_path`, `adapter_name_or_path`, `export_dir`, ...).
    config: PathBuf,
    /// `key=value` overrides, applied after the file.
    overrides: Vec<String>,
    /// Machine-readable progress (for the web server) instead of the list of files.
    #[arg(long, value_enum)]
    events: Option<Events>,
}

pub fn run(cmd: ExportCmd) -> Result<ExitCode> {
    let mut json = cmd.events.map(|_| JsonReporter);
    let result =
        trainer::config::load_args(&cmd.config, &cmd.overrides).and_then(|(args, warnings)| {
            for w in warnings {
                match json.as_mut() {
                    Some(r) => r.event(&WorkerEvent::Log {
                        level: "warning".into(),
                        message: w,
                    }),
                    None => eprintln!("warning: {w}"),
                }
            }
            if let Some(r) = json.as_mut() {
                r.event(&WorkerEvent::Progress {
                    step: 0,
                    total: 1,
                    elapsed_s: 0.0,
                    eta_s: 0.0,
                });
            }
            let t = std::time::Instant::now();
            // GPTQ reports its layers: the board's progress shows layers done / total.
            let mut layers = 0;
            let mut report = |done: usize, total: usize| {
                layers = total;
                let elapsed = t.elapsed().as_secs_f64();
                match json.as_mut() {
                    Some(r) => r.event(&WorkerEvent::Progress {
                        step: done as u64,
                        total: total as u64,
                        elapsed_s: elapsed,
                        eta_s: elapsed / done.max(1) as f64 * (total - done) as f64,
                    }),
                    None => eprintln!("GPTQ: {done}/{total} layers quantized"),
                }
            };
            let files = trainer::export::export_model_with(&args, &mut report)?;
            Ok((files, t.elapsed().as_secs_f64(), layers.max(1) as u64))
        });
    match (result, json.as_mut()) {
        (Ok((files, _, _)), None) => {
            for f in files {
                println!("{}", f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        (Ok((files, secs, steps)), Some(r)) => {
            r.event(&WorkerEvent::Progress {
                step: steps,
                total: steps,
                elapsed_s: secs,
                eta_s: 0.0,
            });
            let mut metrics = serde_json::Map::new();
            let listed: Vec<serde_json::Value> = files
                .iter()
                .map(|f| {
                    let size = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
                    serde_json::json!({"path": f.to_string_lossy(), "size": size})
                })
                .collect();
            metrics.insert("files".into(), listed.into());
            metrics.insert("export_runtime".into(), secs.into());
            r.event(&WorkerEvent::Finished {
                step: steps,
                metrics,
            });
            Ok(ExitCode::SUCCESS)
        }
        (Err(e), Some(r)) => {
            r.event(&WorkerEvent::Failed {
                step: None,
                error: format!("{e:#}"),
            });
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}
