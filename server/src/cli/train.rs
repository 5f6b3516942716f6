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
    #[command(flatten)]
    launch: super::launch::LaunchArgs,
}

/// A stop request that arrives as SIGUSR1 (how `mpirun` passes one on to its ranks).
static STOP_FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

extern "C" fn on_usr1(_: libc::c_int) {
    if let Some(stop) = STOP_FLAG.get() {
        stop.store(true, Ordering::SeqCst);
    }
}

/// A rank other than 0 reports nothing (rank 0 speaks for the run) but its failure, on stderr.
struct OtherRank(usize);

impl Reporter for OtherRank {
    fn event(&mut self, e: &WorkerEvent) {
        if let WorkerEvent::Failed { error, .. } = e {
            eprintln!("rank {}: {error}", self.0);
        }
    }
}

pub fn run(cmd: TrainCmd) -> Result<ExitCode> {
    let place = trainer::dist::ranks()?;
    // Read once, by the launcher and the run alike; a config that does not load is reported by
    // the run below.
    let loaded = trainer::config::load_args(&cmd.config, &cmd.overrides);
    if place.world_size == 1 {
        // The config's `nproc_per_node` (LlamaBoard's device count) unless a flag or
        // NPROC_PER_NODE says otherwise.
        let mut launch_args = cmd.launch.clone();
        if let (None, Ok((args, _))) = (launch_args.nproc_per_node, &loaded) {
            launch_args.nproc_per_node = args.nproc_per_node;
        }
        if let Some(launch) = launch_args.plan()? {
            let mut train_args: Vec<std::ffi::OsString> = vec![cmd.config.clone().into()];
            train_args.extend(cmd.overrides.iter().map(Into::into));
            if cmd.events.is_some() {
                train_args.extend(["--events".into(), "json".into()]);
            }
            return launch.run(train_args, cmd.events.is_some());
        }
    }
    let mut reporter: Box<dyn Reporter> = match cmd.events {
        _ if place.rank > 0 => Box::new(OtherRank(place.rank)),
        Some(Events::Json) => Box::new(JsonReporter),
        None => Box::new(BarReporter::new()),
    };
    let mut opts = TrainOptions {
        // One process alone is local rank 0: the first GPU, as `default_device`.
        device: trainer::device::device_for_rank(place.local_rank),
        ..TrainOptions::default()
    };
    let stop = opts.stop.clone();
    let _ = STOP_FLAG.set(stop.clone());
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
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
    let result = loaded.and_then(|(args, warnings)| {
        let precision = trainer::device::train_precision(&args, &opts.device);
        opts.dtype = precision.dtype;
        trainer::ops::use_bf16_products(precision.bf16_products);
        let mut notes: Vec<(bool, String)> = warnings.into_iter().map(|w| (true, w)).collect();
        notes.extend(precision.note);
        for (warning, message) in notes {
            reporter.event(&WorkerEvent::Log {
                level: if warning { "warning" } else { "info" }.into(),
                message,
            });
        }
        let timeout = std::time::Duration::from_secs(args.ddp_timeout.max(1));
        opts.world = trainer::dist::World::connect(&place, &opts.device, timeout)?;
        if opts.world.size() > 1 {
            reporter.event(&WorkerEvent::Log {
                level: "info".into(),
                message: format!(
                    "data-parallel run: {} ranks over {} ({} examples per rank and micro-batch)",
                    opts.world.size(),
                    opts.world.engine(),
                    args.per_device_train_batch_size
                ),
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
