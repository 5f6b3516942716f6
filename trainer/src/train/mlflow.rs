//! MLflow tracking (`report_to: mlflow`) through MLflow's REST API, as transformers'
//! `MLflowCallback` logs a run: in the experiment `MLFLOW_EXPERIMENT_NAME` (created when missing;
//! MLflow's default experiment when unset), a run named `run_name` (default: the output
//! directory) or the existing run `MLFLOW_RUN_ID`, with `MLFLOW_TAGS` (a JSON object) as tags,
//! the run's arguments and the model's config as params, every logged number as a metric at
//! its step, the final status, and the run's outputs as artifacts.
//!
//! The server is `MLFLOW_TRACKING_URI`, an `http(s)://` address (`mlflow server`). Sending runs
//! on its own thread behind a bounded queue, with retries and a bounded backlog: a server that
//! is slow, down or gone costs warnings, never a stalled or failed run.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

/// Messages waiting for the sending thread; more are dropped (with a count in the warning).
const QUEUE: usize = 1024;
/// Metrics kept for a later retry while the server is unreachable; the oldest go first.
const BACKLOG: usize = 10_000;
/// Tries of one request, with doubling pauses from 0.5 s.
const ATTEMPTS: u32 = 4;
/// How long the end of a run waits for the queue to drain.
const DRAIN: Duration = Duration::from_secs(30);
/// MLflow's limits per `log-batch` request and on a param's value.
const METRICS_PER_BATCH: usize = 1000;
const PARAMS_PER_BATCH: usize = 100;
const PARAM_VALUE_MAX: usize = 6000;

/// How the run ended, in MLflow's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

enum Job {
    Metrics(Vec<Value>),
    End {
        status: RunStatus,
        artifacts: Vec<(String, PathBuf)>,
    },
}

/// An open MLflow run.
pub struct Mlflow {
    tx: Option<SyncSender<Job>>,
    done: Receiver<()>,
    dropped: usize,
    pub run_id: String,
}

/// What the run is told at its start.
pub struct RunInfo<'a> {
    pub run_name: &'a str,
    /// `(key, value)` params: the arguments, then the model's config.
    pub params: Vec<(String, String)>,
}

impl Mlflow {
    /// Opens the run on the server `MLFLOW_TRACKING_URI`; `None`, after a warning on stderr, when
    /// there is none to log to or it does not answer.
    pub fn start(info: RunInfo) -> Option<Self> {
        let uri = std::env::var("MLFLOW_TRACKING_URI").unwrap_or_default();
        let client = match Client::new(&uri) {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "warning: `report_to: mlflow`: {e:#}; MLflow logging is off for this run"
                );
                return None;
            }
        };
        match client.open_run(info) {
            Ok((run_id, artifact_uri)) => {
                let (tx, rx) = mpsc::sync_channel(QUEUE);
                let (done_tx, done) = mpsc::channel();
                let sender = Sender {
                    client,
                    run_id: run_id.clone(),
                    artifact_uri,
                    backlog: Vec::new(),
                    lost: 0,
                };
                std::thread::spawn(move || {
                    sender.serve(rx);
                    let _ = done_tx.send(());
                });
                eprintln!("MLflow run {run_id} at {uri}");
                Some(Self {
                    tx: Some(tx),
                    done,
                    dropped: 0,
                    run_id,
                })
            }
            Err(e) => {
                eprintln!(
                    "warning: `report_to: mlflow`: cannot open a run at {uri}: {e:#}; MLflow logging is off for this run"
                );
                None
            }
        }
    }

    /// Queues a log-history entry's numbers as metrics at its `step` (transformers' `on_log`:
    /// every number but the step, keys with characters MLflow refuses turned into `_`).
    pub fn log(&mut self, entry: &Value) {
        let Some(obj) = entry.as_object() else { return };
        let step = obj.get("step").and_then(Value::as_u64).unwrap_or(0);
        let timestamp = now_ms();
        let metrics: Vec<Value> = obj
            .iter()
            .filter(|(k, _)| *k != "step")
            .filter_map(|(k, v)| {
                let v = v.as_f64().filter(|x| x.is_finite())?;
                Some(
                    json!({"key": metric_key(k), "value": v, "timestamp": timestamp, "step": step}),
                )
            })
            .collect();
        if !metrics.is_empty() {
            self.send(Job::Metrics(metrics));
        }
    }

    /// Ends the run with `status`, uploading the files of `outputs` (not its checkpoints)
    /// first, and waits up to 30 s for everything queued to reach the server.
    pub fn end(mut self, status: RunStatus, outputs: Option<&Path>) {
        let artifacts = outputs.map(output_files).unwrap_or_default();
        self.finish(status, artifacts);
    }

    fn finish(&mut self, status: RunStatus, artifacts: Vec<(String, PathBuf)>) {
        if self.tx.is_none() {
            return;
        }
        self.send(Job::End { status, artifacts });
        self.tx = None;
        if self.done.recv_timeout(DRAIN).is_err() {
            eprintln!(
                "warning: MLflow: the server did not take the run's last records within {} s; they are lost",
                DRAIN.as_secs()
            );
        }
        if self.dropped > 0 {
            eprintln!(
                "warning: MLflow: {} records were dropped while the queue was full",
                self.dropped
            );
        }
    }

    fn send(&mut self, job: Job) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped += 1,
            Err(TrySendError::Disconnected(_)) => self.tx = None,
        }
    }
}

impl Drop for Mlflow {
    /// A run left without an end (an error unwound the training) is marked failed.
    fn drop(&mut self) {
        self.finish(RunStatus::Failed, Vec::new());
    }
}

/// The files directly in `dir` (not its checkpoint folders), by name. Full model weights go
/// only when `HF_MLFLOW_LOG_ARTIFACTS` is set, as transformers uploads them.
fn output_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let weights = matches!(
        std::env::var("HF_MLFLOW_LOG_ARTIFACTS")
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str(),
        "1" | "true"
    );
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let full_weights = name.starts_with("model") && name.ends_with(".safetensors");
            (weights || !full_weights).then(|| (name, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// transformers' key cleaning: characters other than alphanumerics, `_ - . space : /` become `_`.
fn metric_key(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-. :/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A run's config as MLflow params: strings as they are, other values as JSON.
pub fn params(config: Vec<(String, Value)>) -> Vec<(String, String)> {
    config
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect()
}

/// The sending thread's state.
struct Sender {
    client: Client,
    run_id: String,
    artifact_uri: String,
    /// Metrics not yet accepted by the server.
    backlog: Vec<Value>,
    lost: usize,
}

impl Sender {
    fn serve(mut self, rx: Receiver<Job>) {
        let mut warned = false;
        while let Ok(job) = rx.recv() {
            match job {
                Job::Metrics(m) => {
                    self.backlog.extend(m);
                    if self.backlog.len() > BACKLOG {
                        let over = self.backlog.len() - BACKLOG;
                        self.backlog.drain(..over);
                        self.lost += over;
                    }
                    if let Err(e) = self.flush() {
                        if !warned {
                            eprintln!("warning: MLflow: cannot log metrics ({e:#}); keeping them to retry");
                            warned = true;
                        }
                    } else {
                        warned = false;
                    }
                }
                Job::End { status, artifacts } => {
                    if let Err(e) = self.flush() {
                        eprintln!(
                            "warning: MLflow: {} metrics could not be logged: {e:#}",
                            self.backlog.len()
                        );
                    }
                    for (name, path) in &artifacts {
                        if let Err(e) = self.upload(name, path) {
                            eprintln!("warning: MLflow: artifact {name} not logged: {e:#}");
                            break;
                        }
                    }
                    let body = json!({"run_id": self.run_id, "status": status.as_str(), "end_time": now_ms()});
                    if let Err(e) = self.client.retried(|c| c.post("runs/update", &body)) {
                        eprintln!("warning: MLflow: the run's status was not set: {e:#}");
                    }
                    if self.lost > 0 {
                        eprintln!(
                            "warning: MLflow: {} metrics were dropped while the server was unreachable",
                            self.lost
                        );
                    }
                    return;
                }
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(METRICS_PER_BATCH);
            let body = json!({"run_id": self.run_id, "metrics": &self.backlog[..n]});
            self.client.retried(|c| c.post("runs/log-batch", &body))?;
            self.backlog.drain(..n);
        }
        Ok(())
    }

    /// One output file into the run's artifacts: through the tracking server when it serves
    /// them (`mlflow-artifacts:`), copied when the store is a local folder.
    fn upload(&self, name: &str, path: &Path) -> Result<()> {
        let uri = self.artifact_uri.as_str();
        if let Some(rest) = uri.strip_prefix("mlflow-artifacts:") {
            // `mlflow-artifacts:/1/<run>/artifacts` or `mlflow-artifacts://host:port/1/…`.
            let rel = match rest.strip_prefix("//") {
                Some(hosted) => hosted.split_once('/').map_or("", |(_, p)| p),
                None => rest.trim_start_matches('/'),
            };
            let url = format!(
                "{}/api/2.0/mlflow-artifacts/artifacts/{rel}/{name}",
                self.client.base
            );
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            return self.client.retried(|c| c.put_bytes(&url, &bytes));
        }
        let local = uri.strip_prefix("file://").unwrap_or(uri);
        if local.starts_with('/') {
            std::fs::create_dir_all(local)?;
            std::fs::copy(path, Path::new(local).join(name))
                .with_context(|| format!("copying to {local}"))?;
            return Ok(());
        }
        bail!("the run's artifact store {uri} is not reachable from here (only a tracking server's own store or a local folder is)")
    }
}

/// The tracking server's REST API.
struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(uri: &str) -> Result<Self> {
        let uri = uri.trim().trim_end_matches('/');
        if uri.is_empty() {
            bail!("MLFLOW_TRACKING_URI is not set: start a tracking server (`mlflow server --port 5000`) and set MLFLOW_TRACKING_URI=http://127.0.0.1:5000")
        }
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            bail!("MLFLOW_TRACKING_URI={uri}: runs are logged to a tracking server here (`http://…` or `https://…`, e.g. `mlflow server --backend-store-uri {uri}`), not written to a store directly")
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            base: uri.to_string(),
            agent,
        })
    }

    fn api(&self, path: &str) -> String {
        format!("{}/api/2.0/mlflow/{path}", self.base)
    }

    fn answer(mut resp: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = resp.status();
        let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
        if !status.is_success() {
            let code = body["error_code"].as_str().unwrap_or("");
            let msg = body["message"].as_str().unwrap_or("");
            return Err(anyhow!("HTTP {} {code} {msg}", status.as_u16()));
        }
        Ok(body)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        Self::answer(self.agent.post(&self.api(path)).send_json(body)?)
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let mut req = self.agent.get(&self.api(path));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        Self::answer(req.call()?)
    }

    fn put_bytes(&self, url: &str, bytes: &[u8]) -> Result<()> {
        Self::answer(self.agent.put(url).send(bytes)?).map(|_| ())
    }

    /// `f` tried up to four times, pausing 0.5, 1 and 2 s; a 4xx answer is not retried.
    fn retried<T>(&self, f: impl Fn(&Self) -> Result<T>) -> Result<T> {
        let mut pause = Duration::from_millis(500);
        let mut last = None;
        for _ in 0..ATTEMPTS {
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if e.to_string().starts_with("HTTP 4") => return Err(e),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(pause);
            pause *= 2;
        }
        Err(last.unwrap_or_else(|| anyhow!("no attempt made")))
    }

    /// The experiment's id: `MLFLOW_EXPERIMENT_NAME`'s (created when missing), else the
    /// default experiment's.
    fn experiment(&self) -> Result<String> {
        let Some(name) = std::env::var("MLFLOW_EXPERIMENT_NAME")
            .ok()
            .filter(|n| !n.is_empty())
        else {
            return Ok("0".into());
        };
        match self.get("experiments/get-by-name", &[("experiment_name", &name)]) {
            Ok(v) => Ok(v["experiment"]["experiment_id"]
                .as_str()
                .ok_or_else(|| anyhow!("no experiment id in {v}"))?
                .to_string()),
            Err(e) if e.to_string().contains("RESOURCE_DOES_NOT_EXIST") => {
                let v = self.post("experiments/create", &json!({"name": name}))?;
                Ok(v["experiment_id"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no experiment id in {v}"))?
                    .to_string())
            }
            Err(e) => Err(e.context(format!("experiment {name}"))),
        }
    }

    /// Creates (or, with `MLFLOW_RUN_ID`, reopens) the run and logs its params and tags; its
    /// id and artifact location.
    fn open_run(&self, info: RunInfo) -> Result<(String, String)> {
        let tags: Vec<Value> = std::env::var("MLFLOW_TAGS")
            .ok()
            .filter(|t| !t.is_empty())
            .map(|t| {
                serde_json::from_str::<Map<String, Value>>(&t)
                    .with_context(|| format!("MLFLOW_TAGS is not a JSON object: {t}"))
            })
            .transpose()?
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let value = v.as_str().map_or_else(|| v.to_string(), String::from);
                json!({"key": k, "value": value})
            })
            .collect();
        let run = match std::env::var("MLFLOW_RUN_ID")
            .ok()
            .filter(|r| !r.is_empty())
        {
            Some(id) => {
                let v = self.get("runs/get", &[("run_id", &id)])?;
                self.post("runs/update", &json!({"run_id": id, "status": "RUNNING"}))?;
                v["run"]["info"].clone()
            }
            None => {
                let experiment_id = self.experiment()?;
                let v = self.post(
                    "runs/create",
                    &json!({
                        "experiment_id": experiment_id,
                        "run_name": info.run_name,
                        "start_time": now_ms(),
                        "tags": tags,
                    }),
                )?;
                v["run"]["info"].clone()
            }
        };
        let run_id = run["run_id"]
            .as_str()
            .ok_or_else(|| anyhow!("the server returned no run id: {run}"))?
            .to_string();
        let artifact_uri = run["artifact_uri"].as_str().unwrap_or("").to_string();
        let (kept, long): (Vec<_>, Vec<_>) = info
            .params
            .into_iter()
            .partition(|(_, v)| v.len() <= PARAM_VALUE_MAX);
        for (k, _) in &long {
            eprintln!("warning: MLflow: param {k} is longer than {PARAM_VALUE_MAX} characters and is not logged");
        }
        for chunk in kept.chunks(PARAMS_PER_BATCH) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect();
            self.post(
                "runs/log-batch",
                &json!({"run_id": run_id, "params": params}),
            )?;
        }
        Ok((run_id, artifact_uri))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_keys_are_cleaned_as_transformers_cleans_them() {
        assert_eq!(metric_key("rewards/chosen"), "rewards/chosen");
        assert_eq!(metric_key("eval_loss"), "eval_loss");
        assert_eq!(metric_key("loss(ppo)"), "loss_ppo_");
    }

    #[test]
    fn a_tracking_uri_must_name_a_server() {
        let e = Client::new("").err().unwrap().to_string();
        assert!(e.contains("MLFLOW_TRACKING_URI is not set"), "{e}");
        let e = Client::new("./mlruns").err().unwrap().to_string();
        assert!(e.contains("tracking server"), "{e}");
        assert!(Client::new("http://127.0.0.1:5000/").is_ok());
    }

    #[test]
    fn an_unreachable_server_does_not_open_a_run() {
        // Nothing listens on port 9 (discard) here: the run goes on without MLflow.
        let c = Client::new("http://127.0.0.1:9").unwrap();
        let info = RunInfo {
            run_name: "x",
            params: vec![],
        };
        assert!(c.open_run(info).is_err());
    }
}
