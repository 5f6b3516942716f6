//! `llamafactory train … --nproc-per-node N`: starts the ranks of a data-parallel run, as
//! torchrun does for LLaMA-Factory. GPU ranks (one per GPU, NCCL) are started here with
//! torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`);
//! CPU ranks (MPI) are started by Open MPI's `mpirun`, which MPI needs. LLaMA-Factory's
//! variables (`NPROC_PER_NODE`, `NNODES`, `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
//! `FORCE_TORCHRUN`) work as the flags do.
//!
//! The launcher watches its ranks: a stop request (SIGINT/SIGTERM, LlamaBoard's abort) reaches
//! every rank, which agree to save one checkpoint and stop; a rank that dies ends the others
//! (mpirun does so itself) and the launcher reports the run failed.

use std::ffi::OsString;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use protocol::WorkerEvent;
use trainer::train::report::{JsonReporter, Reporter};

#[derive(Args, Debug, Default, Clone)]
pub struct LaunchArgs {
    /// Data-parallel ranks on this machine: one per GPU (NCCL), or CPU ranks under `mpirun`
    /// (MPI). Each rank takes `per_device_train_batch_size` examples of every batch.
    #[arg(long, env = "NPROC_PER_NODE")]
    pub nproc_per_node: Option<usize>,
    /// Machines in the run (GPU ranks: start the launcher on each with its `--node-rank`).
    #[arg(long, env = "NNODES", default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's index among `--nnodes` (0 hosts rank 0).
    #[arg(long, env = "NODE_RANK", default_value_t = 0)]
    pub node_rank: usize,
    /// Where rank 0 listens for the others (GPU ranks).
    #[arg(long, env = "MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// Rank 0's port (default: a free one on one machine, 29500 across machines).
    #[arg(long, env = "MASTER_PORT")]
    pub master_port: Option<u16>,
    /// CPU ranks on several machines: MPI's host list (`host` or `host:slots`,
    /// comma-separated), started from this machine by `mpirun` over ssh.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
}

/// The ranks to start, when the flags or the environment ask for more than this process.
pub struct Launch {
    per_node: usize,
    nnodes: usize,
    node_rank: usize,
    master_addr: String,
    master_port: Option<u16>,
    hosts: Vec<String>,
    gpus: usize,
}

impl LaunchArgs {
    /// What to start, or `None` to train in this process.
    pub fn plan(&self) -> Result<Option<Launch>> {
        let forced = std::env::var("FORCE_TORCHRUN")
            .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
        self.plan_for(trainer::device::cuda_device_count(), forced)
    }

    /// [`LaunchArgs::plan`] on a machine with `gpus` GPUs, `FORCE_TORCHRUN` set or not.
    fn plan_for(&self, gpus: usize, forced: bool) -> Result<Option<Launch>> {
        // As LLaMA-Factory: several visible GPUs, or FORCE_TORCHRUN, start one rank per GPU.
        let per_node = match self.nproc_per_node {
            Some(0) => bail!("`--nproc-per-node` (NPROC_PER_NODE) must be at least 1"),
            Some(n) => n,
            None if forced || gpus > 1 => gpus.max(1),
            None => 1,
        };
        if self.nnodes == 0 || self.node_rank >= self.nnodes {
            bail!(
                "`--node-rank` (NODE_RANK) {} is not one of the {} machines of `--nnodes` (NNODES)",
                self.node_rank,
                self.nnodes
            );
        }
        let hosts_world = self.hosts.len() > 1;
        if per_node * self.nnodes <= 1 && !hosts_world && !forced {
            return Ok(None);
        }
        if gpus > 0 && per_node > gpus {
            bail!("`--nproc-per-node` {per_node}: this machine has {gpus} GPUs (one rank per GPU)");
        }
        Ok(Some(Launch {
            per_node,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            master_addr: self
                .master_addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
            master_port: self.master_port,
            hosts: self.hosts.clone(),
            gpus,
        }))
    }
}

/// First stop request: forwarded to the ranks (they save and stop together). Second: ended.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

impl Launch {
    /// Starts the ranks with `train_args` (the config, overrides and event format), waits for
    /// them and reports their end.
    pub fn run(self, train_args: Vec<OsString>, json_events: bool) -> Result<ExitCode> {
        ctrlc::set_handler(|| {
            SIGNALS.fetch_add(1, Ordering::SeqCst);
        })?;
        let exe = std::env::current_exe().context("cannot find this program to start its ranks")?;
        let outcome = if self.gpus > 0 {
            self.run_gpu_ranks(&exe, &train_args)
        } else {
            self.run_mpi_ranks(&exe, &train_args)
        };
        match outcome {
            Ok(None) => Ok(ExitCode::SUCCESS),
            Ok(Some(failure)) | Err(failure) => {
                let msg = format!("{failure:#}");
                if json_events {
                    JsonReporter.event(&WorkerEvent::Failed {
                        step: None,
                        error: msg.clone(),
                    });
                }
                eprintln!("error: {msg}");
                Ok(ExitCode::from(1))
            }
        }
    }

    /// CPU ranks: `mpirun -np N` (or over `--hosts`) running this program's `train`.
    fn run_mpi_ranks(
        &self,
        exe: &std::path::Path,
        train_args: &[OsString],
    ) -> Result<Option<anyhow::Error>> {
        if !cfg!(feature = "mpi") {
            bail!("CPU ranks need the MPI engine, which this build lacks: build with `cargo build --release --features mpi` (Open MPI: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`)");
        }
        if self.nnodes > 1 {
            bail!("CPU ranks on several machines are started from one by `mpirun`: give `--hosts host1,host2` (with passwordless ssh) instead of `--nnodes`/`--node-rank`");
        }
        let mpirun = std::env::var_os("MPIRUN").unwrap_or_else(|| "mpirun".into());
        let mut cmd = Command::new(&mpirun);
        let ranks = if self.hosts.is_empty() {
            // One machine: ranks may outnumber what Open MPI counts as slots (its cores).
            cmd.args(["-np", &self.per_node.to_string(), "--oversubscribe"]);
            self.per_node
        } else {
            let list: Vec<String> = self
                .hosts
                .iter()
                .map(|h| {
                    if h.contains(':') {
                        h.clone()
                    } else {
                        format!("{h}:{}", self.per_node)
                    }
                })
                .collect();
            let n: usize = list
                .iter()
                .map(|h| {
                    h.rsplit(':')
                        .next()
                        .and_then(|s| s.parse::<usize>().ok())
                        .unwrap_or(1)
                })
                .sum();
            cmd.args(["-np", &n.to_string(), "-H", &list.join(",")]);
            n
        };
        // Each rank's threads share the machine's cores instead of all of them each.
        let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.per_node).max(1).to_string()
        });
        cmd.args([
            "--bind-to",
            "none",
            "-x",
            &format!("RAYON_NUM_THREADS={threads}"),
        ]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        cmd.arg(exe).arg("train").args(train_args);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} (Open MPI: `apt-get install openmpi-bin`; or set MPIRUN)",
                mpirun.to_string_lossy()
            )
        })?;
        let pid = child.id() as i32;
        // mpirun passes SIGUSR1 on to every rank (a stop request); SIGTERM ends the job.
        let status = watch(std::slice::from_mut(&mut child), |n| {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid, if n == 1 { libc::SIGUSR1 } else { libc::SIGTERM });
            }
        })?;
        Ok(match status[0] {
            Some(s) if s.success() => None,
            s => Some(anyhow::anyhow!(
                "a rank of the {ranks} MPI ranks failed: mpirun ended with {} (its message is above)",
                describe(s)
            )),
        })
    }

    /// GPU ranks: one process per GPU with torchrun's variables; rank 0 shares NCCL's id.
    fn run_gpu_ranks(
        &self,
        exe: &std::path::Path,
        train_args: &[OsString],
    ) -> Result<Option<anyhow::Error>> {
        let world = self.per_node * self.nnodes;
        let port = match self.master_port {
            Some(p) => p,
            None if self.nnodes > 1 => 29500,
            None => std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port(),
        };
        let mut children = Vec::new();
        for local in 0..self.per_node {
            let rank = self.node_rank * self.per_node + local;
            let child = Command::new(exe)
                .arg("train")
                .args(train_args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", self.per_node.to_string())
                .env("MASTER_ADDR", &self.master_addr)
                .env("MASTER_PORT", port.to_string())
                .spawn()
                .with_context(|| format!("cannot start rank {rank}"))?;
            children.push(child);
        }
        let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
        let status = watch(&mut children, |n| {
            for &pid in &pids {
                // SAFETY: kill(2) on our own children.
                unsafe {
                    libc::kill(pid, if n == 1 { libc::SIGINT } else { libc::SIGKILL });
                }
            }
        })?;
        let failed: Vec<String> = status
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_some_and(|s| s.success()))
            .map(|(i, s)| {
                format!(
                    "rank {} {}",
                    self.node_rank * self.per_node + i,
                    describe(*s)
                )
            })
            .collect();
        Ok((!failed.is_empty()).then(|| anyhow::anyhow!("{}", failed.join("; "))))
    }
}

/// Waits for every child, passing the n-th stop request to `on_signal(n)`. When one child
/// fails, the others get a moment to end on their own (their collectives fail) and are then
/// killed, so a dead rank never leaves the rest waiting.
fn watch(children: &mut [Child], on_signal: impl Fn(usize)) -> Result<Vec<Option<ExitStatus>>> {
    let mut status: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut signalled = 0;
    let mut failed_at: Option<Instant> = None;
    let grace = Duration::from_secs(10);
    loop {
        for (c, s) in children.iter_mut().zip(status.iter_mut()) {
            if s.is_none() {
                if let Some(done) = c.try_wait()? {
                    if !done.success() && failed_at.is_none() {
                        failed_at = Some(Instant::now());
                    }
                    *s = Some(done);
                }
            }
        }
        if status.iter().all(Option::is_some) {
            return Ok(status);
        }
        let requested = SIGNALS.load(Ordering::SeqCst);
        while signalled < requested.min(2) {
            signalled += 1;
            on_signal(signalled);
        }
        if failed_at.is_some_and(|t| t.elapsed() > grace) {
            for (c, s) in children.iter_mut().zip(&status) {
                if s.is_none() {
                    let _ = c.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn describe(s: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match s {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "an unknown end".into(),
        },
        None => "no exit status".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranks(nproc: Option<usize>, gpus: usize, forced: bool) -> Option<usize> {
        let args = LaunchArgs {
            nproc_per_node: nproc,
            nnodes: 1,
            ..LaunchArgs::default()
        };
        args.plan_for(gpus, forced).unwrap().map(|l| l.per_node)
    }

    #[test]
    fn an_unset_count_takes_every_gpu_and_an_explicit_one_is_kept() {
        // As LLaMA-Factory: several visible GPUs start one rank each unless told otherwise.
        assert_eq!(ranks(None, 4, false), Some(4));
        assert_eq!(ranks(None, 1, false), None);
        assert_eq!(ranks(None, 0, false), None);
        // LlamaBoard's Devices = 1 (or `nproc_per_node: 1`) is one process, even with 4 GPUs.
        assert_eq!(ranks(Some(1), 4, false), None);
        assert_eq!(ranks(Some(2), 4, false), Some(2));
        assert_eq!(ranks(Some(2), 0, false), Some(2));
        assert_eq!(ranks(None, 1, true), Some(1));
        assert!(LaunchArgs {
            nproc_per_node: Some(8),
            nnodes: 1,
            ..LaunchArgs::default()
        }
        .plan_for(4, false)
        .is_err());
    }
}
