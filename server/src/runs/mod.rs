//! The run manager: a queue of jobs run as worker processes (`llamafactory train|export ...
//! --events json`), their events parsed into SQLite and a broadcast channel, abort with a grace
//! period, resume, and recovery of runs a previous server lost.

mod error;
mod worker;

pub use error::{RunError, RunResult};
pub use worker::tail as worker_tail;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use protocol::run::{MetricPoint, Run, RunEvent, RunEventMsg, RunKind, RunStatus};
use protocol::TrainArgs;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, Notify};

use crate::db::{Db, NewRun};

/// What a running job can be asked to do.
struct Active {
    pid: u32,
    abort_requested: bool,
    shutting_down: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<i64>,
    active: HashMap<i64, Active>,
    /// Set at shutdown: no new job starts.
    closed: bool,
}

pub struct ManagerConfig {
    pub exe: PathBuf,
    pub workdir: PathBuf,
    /// How many workers run at once (1 by default: one accelerator, or a CPU whose cores one
    /// training job already uses).
    pub max_jobs: usize,
    /// How long an aborted worker has to save before it is killed.
    pub grace: Duration,
}

pub struct Manager {
    db: Db,
    cfg: ManagerConfig,
    state: Mutex<State>,
    wake: Notify,
    events: broadcast::Sender<(i64, RunEventMsg)>,
    /// Serializes event appends so sequence numbers follow broadcast order.
    record_lock: tokio::sync::Mutex<()>,
    /// Held while a run is admitted (started or resumed): the checks (status, busy output dir)
    /// and the state change happen as one step, never interleaved with another admission.
    admission: tokio::sync::Mutex<()>,
}

/// The argument file a run's worker reads.
pub fn args_file(kind: &RunKind, output_dir: &Path, logs: &Path, id: i64) -> PathBuf {
    match kind {
        RunKind::Export => logs.join(format!("run-{id}-export_args.yaml")),
        _ => output_dir.join("training_args.yaml"),
    }
}

/// Where a run writes: `export_dir` for exports, else `output_dir`.
pub fn run_output_dir(kind: &RunKind, args: &TrainArgs) -> String {
    match kind {
        RunKind::Export => args.export_dir.clone(),
        _ => args.output_dir.clone(),
    }
    .unwrap_or_default()
}

/// The `llamafactory` subcommand that runs a job of `kind`.
pub fn worker_subcommand(kind: &RunKind) -> &'static str {
    match kind {
        RunKind::Export => "export",
        _ => "train",
    }
}

/// A config as YAML, its keys in the order given (callers pass `TrainArgs::non_default`, which
/// keeps LLaMA-Factory keys with non-default values in declaration order).
pub fn to_yaml(config: &Map<String, Value>) -> Result<String> {
    Ok(serde_yaml_ng::to_string(config)?)
}

impl Manager {
    pub async fn start(db: Db, cfg: ManagerConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(cfg.workdir.join("logs"))
            .with_context(|| format!("cannot create {}", cfg.workdir.join("logs").display()))?;
        let (events, _) = broadcast::channel(4096);
        let m = Arc::new(Self {
            db,
            cfg,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            events,
            record_lock: tokio::sync::Mutex::new(()),
            admission: tokio::sync::Mutex::new(()),
        });
        m.recover().await?;
        let sched = m.clone();
        tokio::spawn(async move { sched.schedule().await });
        Ok(m)
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(i64, RunEventMsg)> {
        self.events.subscribe()
    }

    /// Runs a previous server left queued or running can no longer be watched: they are
    /// interrupted (their workers, told by the kernel when their parent died, saved and stopped).
    async fn recover(&self) -> Result<()> {
        for run in self
            .db
            .runs_with_status(&[RunStatus::Queued, RunStatus::Running])
            .await?
        {
            if run.kind == RunKind::Train {
                self.reconcile_metrics(&run).await?;
            }
            let msg = "the server stopped while this run was active; resume it to continue from its last checkpoint";
            self.set_status(run.id, RunStatus::Interrupted, None, Some(msg))
                .await?;
        }
        Ok(())
    }

    /// Adds the logged steps the registry missed (the server died before it read them) from
    /// the run's own `trainer_log.jsonl`, so the chart and the files agree.
    async fn reconcile_metrics(&self, run: &Run) -> Result<()> {
        let log = Path::new(&run.output_dir).join("trainer_log.jsonl");
        let Ok(text) = std::fs::read_to_string(&log) else {
            return Ok(());
        };
        let known = self.db.metrics(run.id).await?;
        let has = |step: u64, eval: bool| {
            known.iter().any(|p| {
                p.step == step
                    && if eval {
                        p.eval_loss.is_some()
                    } else {
                        p.loss.is_some()
                    }
            })
        };
        for line in text.lines() {
            let Some(p) = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| point_of_log_line(&v))
            else {
                continue;
            };
            if has(p.step, p.eval_loss.is_some()) {
                continue;
            }
            self.db.upsert_metric(run.id, &p).await?;
            if let Some(total) = p.total {
                self.db.set_progress(run.id, p.step, total).await?;
            }
            self.record(run.id, RunEvent::Metric(p)).await?;
        }
        Ok(())
    }

    pub async fn record(&self, id: i64, event: RunEvent) -> Result<()> {
        self.record_at(id, event, None).await
    }

    async fn record_at(&self, id: i64, event: RunEvent, worker_ts: Option<f64>) -> Result<()> {
        let _guard = self.record_lock.lock().await;
        let msg = self.db.append_event(id, &event, worker_ts).await?;
        // No receiver is fine; a slow one lags and re-reads from the database.
        let _ = self.events.send((id, msg));
        Ok(())
    }

    fn log_path(&self, id: i64) -> PathBuf {
        self.cfg.workdir.join("logs").join(format!("run-{id}.log"))
    }

    /// Registers a run, writes its argument file and queues it; refused while another active
    /// run writes to the same folder.
    pub async fn submit(&self, kind: RunKind, args: &TrainArgs) -> RunResult<i64> {
        let config = args.non_default();
        let output_dir = run_output_dir(&kind, args);
        let _admitting = self.admission.lock().await;
        self.check_output_dir_free(&kind, &output_dir).await?;
        let model = args.model_name_or_path.clone().unwrap_or_default();
        let dataset = match kind {
            RunKind::Predict => args.eval_dataset.clone().or(args.dataset.clone()),
            RunKind::Train => args.dataset.clone(),
            RunKind::Export => None,
        }
        .unwrap_or_default();
        let id = self
            .db
            .insert_run(
                NewRun {
                    kind: kind.clone(),
                    config: &config,
                    output_dir: &output_dir,
                    model: &model,
                    dataset: &dataset,
                },
                "",
            )
            .await?;
        let log = self.log_path(id);
        self.db.set_log_path(id, &log.to_string_lossy()).await?;
        let file = args_file(
            &kind,
            Path::new(&output_dir),
            &self.cfg.workdir.join("logs"),
            id,
        );
        if let Err(e) = write_args(&file, &config) {
            let msg = format!("{e:#}");
            self.set_status(id, RunStatus::Failed, None, Some(&msg))
                .await?;
            return Err(e.into());
        }
        self.enqueue(id).await?;
        Ok(id)
    }

    /// Fails when an active run writes to `dir`.
    async fn check_output_dir_free(&self, kind: &RunKind, dir: &str) -> RunResult<()> {
        let active = self
            .db
            .runs_with_status(&[RunStatus::Queued, RunStatus::Running])
            .await?;
        match active.into_iter().find(|r| r.output_dir == dir) {
            Some(r) => Err(RunError::OutputDirBusy {
                run: r.id,
                dir: dir.to_string(),
                key: if *kind == RunKind::Export {
                    "export_dir"
                } else {
                    "output_dir"
                },
            }),
            None => Ok(()),
        }
    }

    async fn enqueue(&self, id: i64) -> Result<()> {
        self.set_status(id, RunStatus::Queued, None, None).await?;
        self.state.lock().unwrap().queue.push_back(id);
        self.wake.notify_one();
        Ok(())
    }

    /// Where a queued run stands in line (1 = next).
    pub fn queue_position(&self, id: i64) -> Option<u64> {
        let st = self.state.lock().unwrap();
        st.queue.iter().position(|&q| q == id).map(|p| p as u64 + 1)
    }

    pub async fn run_with_position(&self, id: i64) -> Result<Option<Run>> {
        Ok(self.db.run(id).await?.map(|mut r| {
            r.queue_position = self.queue_position(id);
            r
        }))
    }

    /// Asks a run to stop: a queued one leaves the queue; a running worker gets SIGINT, finishes
    /// its step, saves a checkpoint and exits; after the grace period it is killed.
    pub async fn abort(self: &Arc<Self>, id: i64) -> RunResult<RunStatus> {
        let pid = {
            let mut st = self.state.lock().unwrap();
            if let Some(pos) = st.queue.iter().position(|&q| q == id) {
                st.queue.remove(pos);
                None
            } else if let Some(a) = st.active.get_mut(&id) {
                a.abort_requested = true;
                Some(a.pid)
            } else {
                return Err(RunError::NotActive { id });
            }
        };
        match pid {
            None => {
                self.set_status(id, RunStatus::Aborted, None, None).await?;
                Ok(RunStatus::Aborted)
            }
            Some(pid) => {
                worker::signal(pid, libc::SIGINT);
                let me = self.clone();
                let grace = self.cfg.grace;
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let still = me.state.lock().unwrap().active.get(&id).map(|a| a.pid);
                    if still == Some(pid) {
                        worker::signal(pid, libc::SIGKILL);
                    }
                });
                Ok(RunStatus::Running)
            }
        }
    }

    /// Queues a stopped training run again; the worker resumes from the last checkpoint in its
    /// output dir.
    pub async fn resume(&self, id: i64) -> RunResult<()> {
        let _admitting = self.admission.lock().await;
        let run = self.db.run(id).await?.ok_or(RunError::NotFound(id))?;
        if !run.status.is_final() {
            return Err(RunError::WrongStatus {
                id,
                status: run.status,
                action: "only a stopped run can be resumed",
            });
        }
        if run.kind != RunKind::Train {
            return Err(RunError::NotResumable(run.kind));
        }
        self.check_output_dir_free(&run.kind, &run.output_dir)
            .await?;
        let mut config = run.config.clone();
        let out = Path::new(&run.output_dir);
        if let Some(ckpt) = trainer::train::checkpoint::last_checkpoint(out) {
            config.insert(
                "resume_from_checkpoint".into(),
                Value::String(ckpt.to_string_lossy().into_owned()),
            );
        }
        write_args(&out.join("training_args.yaml"), &config)?;
        // The status moves only from where it was read, in one statement.
        if !self
            .db
            .transition(id, &RunStatus::STOPPED, RunStatus::Queued)
            .await?
        {
            return Err(RunError::WrongStatus {
                id,
                status: self.db.run(id).await?.map_or(run.status, |r| r.status),
                action: "only a stopped run can be resumed",
            });
        }
        self.record(
            id,
            RunEvent::Status {
                status: RunStatus::Queued,
                error: None,
                exit_code: None,
            },
        )
        .await?;
        self.state.lock().unwrap().queue.push_back(id);
        self.wake.notify_one();
        Ok(())
    }

    /// Deletes a stopped run's record (its files stay on disk).
    pub async fn delete(&self, id: i64) -> RunResult<()> {
        let run = self.db.run(id).await?.ok_or(RunError::NotFound(id))?;
        if !run.status.is_final() {
            return Err(RunError::WrongStatus {
                id,
                status: run.status,
                action: "abort it first",
            });
        }
        Ok(self.db.delete_run(id).await?)
    }

    async fn schedule(self: Arc<Self>) {
        loop {
            let next = {
                let mut st = self.state.lock().unwrap();
                if !st.closed && st.active.len() < self.cfg.max_jobs.max(1) {
                    st.queue.pop_front()
                } else {
                    None
                }
            };
            match next {
                Some(id) => {
                    if let Err(e) = self.launch(id).await {
                        let msg = format!("{e:#}");
                        let _ = self
                            .set_status(id, RunStatus::Failed, None, Some(&msg))
                            .await;
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    async fn launch(self: &Arc<Self>, id: i64) -> Result<()> {
        let run = self
            .db
            .run(id)
            .await?
            .with_context(|| format!("run {id} vanished from the database"))?;
        let logs = self.cfg.workdir.join("logs");
        let file = args_file(&run.kind, Path::new(&run.output_dir), &logs, id);
        let spawned = worker::spawn(
            &self.cfg.exe,
            worker_subcommand(&run.kind),
            &file,
            &self.cfg.workdir,
            &self.log_path(id),
        )?;
        self.state.lock().unwrap().active.insert(
            id,
            Active {
                pid: spawned.pid,
                abort_requested: false,
                shutting_down: false,
            },
        );
        self.set_status(id, RunStatus::Running, None, None).await?;
        let me = self.clone();
        tokio::spawn(async move {
            let end = worker::follow(spawned, |line| {
                let me = me.clone();
                async move { me.on_line(id, line).await }
            })
            .await;
            let (status, exit_code, error) = {
                let st = me.state.lock().unwrap();
                let a = st.active.get(&id);
                end.verdict(
                    a.is_some_and(|a| a.abort_requested),
                    a.is_some_and(|a| a.shutting_down),
                )
            };
            if let Err(e) = me.set_status(id, status, exit_code, error.as_deref()).await {
                eprintln!("run {id}: cannot record the end: {e:#}");
            }
            me.state.lock().unwrap().active.remove(&id);
            me.wake.notify_one();
        });
        Ok(())
    }

    /// Sets a run's status in the registry and tells its subscribers.
    async fn set_status(
        &self,
        id: i64,
        status: RunStatus,
        exit_code: Option<i64>,
        error: Option<&str>,
    ) -> Result<()> {
        self.db.set_status(id, status, exit_code, error).await?;
        self.record(
            id,
            RunEvent::Status {
                status,
                error: error.map(str::to_string),
                exit_code,
            },
        )
        .await
    }

    /// One line of a worker's stdout or stderr: an event, or text for the log.
    async fn on_line(&self, id: i64, line: worker::Line) -> Result<()> {
        let (event, ts) = match line {
            worker::Line::Event(e, ts) => (e, ts),
            worker::Line::Text(line) => return self.record(id, RunEvent::Log { line }).await,
        };
        use protocol::WorkerEvent as W;
        match event {
            W::Started {
                total_steps,
                num_examples,
                ..
            } => {
                self.db.set_progress(id, 0, total_steps).await?;
                self.record_at(
                    id,
                    RunEvent::Started {
                        total_steps,
                        num_examples,
                    },
                    ts,
                )
                .await
            }
            W::Step(s) => {
                let p = MetricPoint {
                    step: s.step,
                    loss: Some(s.loss),
                    lr: Some(s.lr),
                    epoch: Some(s.epoch),
                    grad_norm: s.grad_norm,
                    tokens_per_sec: Some(s.tokens_per_sec),
                    elapsed_s: Some(s.elapsed_s),
                    eta_s: Some(s.eta_s),
                    total: Some(s.total),
                    extra: s.extra,
                    ..Default::default()
                };
                self.db.upsert_metric(id, &p).await?;
                self.db.set_progress(id, s.step, s.total).await?;
                self.record_at(id, RunEvent::Metric(p), ts).await
            }
            W::Eval { step, metrics } => {
                let mut p = MetricPoint {
                    step,
                    eval_loss: metrics.get("eval_loss").and_then(Value::as_f64),
                    ..Default::default()
                };
                p.extra = metrics
                    .into_iter()
                    .filter(|(k, _)| k != "eval_loss")
                    .collect();
                self.db.upsert_metric(id, &p).await?;
                self.record_at(id, RunEvent::Metric(p), ts).await
            }
            W::Progress {
                step,
                total,
                elapsed_s,
                eta_s,
            } => {
                self.db.set_progress(id, step, total).await?;
                self.record_at(
                    id,
                    RunEvent::Progress {
                        step,
                        total,
                        elapsed_s,
                        eta_s,
                    },
                    ts,
                )
                .await
            }
            W::Checkpoint { step, path } => {
                self.record_at(id, RunEvent::Checkpoint { step, path }, ts)
                    .await
            }
            W::Log { level, message } => {
                self.record_at(
                    id,
                    RunEvent::Log {
                        line: format!("[{level}] {message}"),
                    },
                    ts,
                )
                .await
            }
            W::Finished { metrics, .. } => {
                self.db.set_result(id, &metrics).await?;
                self.record_at(id, RunEvent::Finished { metrics }, ts).await
            }
            W::Aborted { step, checkpoint } => {
                let line = match checkpoint {
                    Some(c) => format!("aborted at step {step}; checkpoint saved at {c}"),
                    None => format!("aborted at step {step}"),
                };
                self.record_at(id, RunEvent::Log { line }, ts).await
            }
            W::Failed { step, error } => {
                let line = match step {
                    Some(s) => format!("[error] step {s}: {error}"),
                    None => format!("[error] {error}"),
                };
                self.record_at(id, RunEvent::Log { line }, ts).await
            }
        }
    }

    /// Server shutdown: no new jobs; running workers are asked to save and stop, and are
    /// recorded as interrupted (resumable).
    pub async fn shutdown(&self) {
        let pids: Vec<u32> = {
            let mut st = self.state.lock().unwrap();
            st.closed = true;
            st.active
                .values_mut()
                .map(|a| {
                    a.shutting_down = true;
                    a.pid
                })
                .collect()
        };
        for pid in &pids {
            worker::signal(*pid, libc::SIGINT);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.grace;
        while tokio::time::Instant::now() < deadline {
            if self.state.lock().unwrap().active.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left: Vec<u32> = self
            .state
            .lock()
            .unwrap()
            .active
            .values()
            .map(|a| a.pid)
            .collect();
        for pid in left {
            worker::signal(pid, libc::SIGKILL);
        }
    }
}

/// A metric point from a `trainer_log.jsonl` line (a logged step or an evaluation).
fn point_of_log_line(v: &Value) -> Option<MetricPoint> {
    const PROGRESS: &[&str] = &[
        "current_steps",
        "total_steps",
        "loss",
        "eval_loss",
        "lr",
        "epoch",
        "percentage",
        "elapsed_time",
        "remaining_time",
        "throughput",
        "total_tokens",
    ];
    let step = v["current_steps"].as_u64()?;
    let p = MetricPoint {
        step,
        loss: v["loss"].as_f64(),
        eval_loss: v["eval_loss"].as_f64(),
        lr: v["lr"].as_f64(),
        epoch: v["epoch"].as_f64(),
        tokens_per_sec: v["throughput"].as_f64(),
        total: v["total_steps"].as_u64(),
        extra: v
            .as_object()?
            .iter()
            .filter(|(k, _)| !PROGRESS.contains(&k.as_str()))
            .map(|(k, x)| (k.clone(), x.clone()))
            .collect(),
        ..Default::default()
    };
    (p.loss.is_some() || p.eval_loss.is_some()).then_some(p)
}

fn write_args(file: &Path, config: &Map<String, Value>) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(file, to_yaml(config)?)
        .with_context(|| format!("cannot write {}", file.display()))
}
