//! `llamafactory train`: a training config run in this process, reporting to a terminal
//! progress bar or as JSON events (`--events json`, what the web server's workers print);
//! SIGINT/SIGTERM finish the step, save a checkpoint and stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use anyhow::Result;
use clap::{Args, ValueEnum};
use protocol::WorkerEvent;
use trainer::train::report::{BarReporter, JsonReporter, Reporter};
use trainer::train::{run_job, Outcome, TrainOptions};

#[derive(Clone, Copy, ValueEnum)]
pub enum Events {
    /// One JSON object per line on stdout (for the web server).
    Json,
}

#[derive(Args)]
pub struct TrainCmd {
    /// LLaMA-Factory training YAML.
    config: PathBuf,
    /// `key=value` overrides, applied after the file.
    overrides: Vec<String>,
    /// Machine-readable progress instead of a progress bar.
    #[arg(long, value_enum)]
    events: Option<Events>,
}

pub fn run(cmd: TrainCmd) -> Result<ExitCode> {
    let mut reporter: Box<dyn Reporter> = match cmd.events {
        Some(Events::Json) => Box::new(JsonReporter),
        None => Box::new(BarReporter::new()),
    };
    let mut opts = TrainOptions {
        device: trainer::device::default_device(),
        ..TrainOptions::default()
    };
    let stop = opts.stop.clone();
    // First signal: finish the step, save, exit cleanly. A second one, a moment later, exits at
    // once. Repeats within a second are one event: when the server dies, the kernel re-sends the
    // parent-death signal each time the worker is handed to another of its dying threads.
    let first = std::sync::OnceLock::<std::time::Instant>::new();
    ctrlc::set_handler(move || {
        let t0 = *first.get_or_init(std::time::Instant::now);
        if stop.swap(true, Ordering::SeqCst) && t0.elapsed() > std::time::Duration::from_secs(1) {
            std::process::exit(130);
        }
    })?;
    let result =
        trainer::config::load_args(&cmd.config, &cmd.overrides).and_then(|(args, mut warnings)| {
            let (dtype, warning) = trainer::device::train_dtype(&args, &opts.device);
            opts.dtype = dtype;
            warnings.extend(warning);
            for w in warnings {
                reporter.event(&WorkerEvent::Log {
                    level: "warning".into(),
                    message: w,
                });
            }
            run_job(&args, &opts, reporter.as_mut())
        });
    match result {
        Ok(Outcome::Finished(_)) | Ok(Outcome::Aborted) => Ok(ExitCode::SUCCESS),
        Ok(Outcome::Failed(_)) => Ok(ExitCode::from(1)),
        Err(e) => {
            if cmd.events.is_some() {
                reporter.event(&WorkerEvent::Failed {
                    step: None,
                    error: format!("{e:#}"),
                });
            }
            Err(e)
        }
    }
}
