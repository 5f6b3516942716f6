//! MLflow tracking against a real tracking server: `mlflow server` (PyPI's `mlflow`, installed
//! by `.ci/run` into `$LLAMAFACTORY_TOOLS/mlflow`) started on a free port, a LoRA run with
//! `report_to: mlflow`, and what it logged read back through MLflow's own Python client.
//! Without the tool the test says so and passes, except under `CI=true`, where it must run.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, workdir, write_config};
use serde_json::Value;

/// The `mlflow` venv's `bin` folder, if installed.
fn mlflow_bin() -> Option<PathBuf> {
    let tools = std::env::var("LLAMAFACTORY_TOOLS").unwrap_or_else(|_| "/var/tmp/lf-tools".into());
    let bin = Path::new(&tools).join("mlflow/bin");
    if bin.join("mlflow").is_file() {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "MLflow is not installed at {}: .ci/run installs it",
        bin.display()
    );
    eprintln!(
        "skipped: no MLflow at {} (pip install mlflow into a venv there)",
        bin.display()
    );
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on the local port: the response's status line and body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

struct MlflowServer(Child);

impl Drop for MlflowServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(bin: &Path, dir: &Path, port: u16) -> MlflowServer {
    let child = Command::new(bin.join("mlflow"))
        .args([
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--workers",
            "1",
        ])
        .arg("--backend-store-uri")
        .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
        .arg("--artifacts-destination")
        .arg(dir.join("artifacts"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mlflow server starts");
    let server = MlflowServer(child);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(180) {
        if http_get(port, "/health").is_some_and(|r| r.contains("OK")) {
            return server;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("mlflow server did not answer /health in 180 s");
}

/// What the run logged, read back with MLflow's Python client.
fn read_back(bin: &Path, uri: &str, experiment: &str, artifact: &str) -> Value {
    let script = r#"
import json, sys, mlflow
c = mlflow.MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name(sys.argv[2])
runs = c.search_runs([exp.experiment_id])
r = runs[0]
hist = {k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)] for k in ("loss", "learning_rate", "grad_norm", "train_runtime", "eval_loss")}
arts = sorted(a.path for a in c.list_artifacts(r.info.run_id))
got = open(c.download_artifacts(r.info.run_id, sys.argv[3])).read()
print(json.dumps({"runs": len(runs), "status": r.info.status, "name": r.info.run_name, "params": r.data.params,
                  "tags": r.data.tags, "history": hist, "artifacts": arts, "artifact_text": got}))
"#;
    let o = Command::new(bin.join("python"))
        .args(["-c", script, uri, experiment, artifact])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn a_run_logs_params_metrics_status_and_outputs_to_mlflow() {
    let Some(bin) = mlflow_bin() else { return };
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = start_server(&bin, store.path(), port);
    let uri = format!("http://127.0.0.1:{port}");

    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 24\nval_size: 0.25\nper_device_train_batch_size: 4\nmax_steps: 4\nlogging_steps: 1\neval_strategy: steps\neval_steps: 2\nlearning_rate: 1.0e-3\nlora_rank: 4\nreport_to: mlflow\nrun_name: mlflow-check\n");
    let o = common::bin()
        .args(["train", "cfg.yaml"])
        .current_dir(dir.path())
        .env("MLFLOW_TRACKING_URI", &uri)
        .env("MLFLOW_EXPERIMENT_NAME", "llamaboard-tests")
        .env("MLFLOW_TAGS", r#"{"team": "board"}"#)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning: MLflow"), "{}", stderr(&o));

    let got = read_back(&bin, &uri, "llamaboard-tests", "adapter_config.json");
    assert_eq!(got["runs"], 1);
    assert_eq!(got["status"], "FINISHED");
    assert_eq!(got["name"], "mlflow-check");
    assert_eq!(got["tags"]["team"], "board");
    assert_eq!(got["params"]["learning_rate"], "0.001");
    assert_eq!(got["params"]["lora_rank"], "4");
    // The model config's entries come after the arguments.
    assert_eq!(got["params"]["model_type"], "llama");
    // Every logged step's loss at its step, equal to the run's own log.
    let ours: Vec<(u64, f64)> = std::fs::read_to_string(dir.path().join("out/trainer_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["current_steps"].as_u64()?, v["loss"].as_f64()?)))
        .collect();
    let theirs: Vec<(u64, f64)> = got["history"]["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(ours.len(), 4);
    assert_eq!(theirs, ours);
    assert_eq!(got["history"]["learning_rate"].as_array().unwrap().len(), 4);
    assert_eq!(got["history"]["grad_norm"].as_array().unwrap().len(), 4);
    // Evaluation at steps 2 and 4, then the end-of-training entry.
    let eval_steps: Vec<u64> = got["history"]["eval_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert!(eval_steps.starts_with(&[2, 4]), "{eval_steps:?}");
    assert_eq!(got["history"]["train_runtime"][0][0], 4);
    // The outputs are the run's artifacts, stored by the server.
    let arts: Vec<&str> = got["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "all_results.json",
        "trainer_log.jsonl",
    ] {
        assert!(arts.contains(&f), "{f} not in {arts:?}");
    }
    assert_eq!(
        got["artifact_text"].as_str().unwrap(),
        std::fs::read_to_string(dir.path().join("out/adapter_config.json")).unwrap()
    );
}

#[test]
fn an_unreachable_tracking_server_costs_a_warning_not_the_run() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 8\nper_device_train_batch_size: 4\nmax_steps: 2\nlogging_steps: 1\nreport_to: mlflow\n");
    let port = free_port();
    let o = common::bin()
        .args(["train", "cfg.yaml"])
        .current_dir(dir.path())
        .env("MLFLOW_TRACKING_URI", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot open a run at http://127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("MLflow logging is off for this run"), "{err}");
    assert!(dir.path().join("out/adapter_model.safetensors").exists());
}

/// `report_to: wandb` with `WANDB_MODE=offline`: the run folder wandb writes, its records (the
/// framing is checked against wandb's own bytes in the unit tests; `scripts/wandb_offline_check.py`
/// reads a run with wandb's reader): the run with its config, a history row per log line with
/// transformers' keys, the summary and a zero exit code. Online mode warns and stays off.
#[test]
fn an_offline_wandb_run_is_written_for_wandb_sync() {
    use prost::Message;
    use trainer::train::wandb::{read_records, Kind, Record};
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 8\nper_device_train_batch_size: 4\nmax_steps: 4\nlogging_steps: 1\nreport_to: wandb\nrun_name: wb\n");
    let o = common::bin()
        .args(["train", "cfg.yaml"])
        .current_dir(dir.path())
        .env("WANDB_MODE", "offline")
        .env("WANDB_PROJECT", "board")
        .env_remove("WANDB_DIR")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.path().join("wandb"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("offline-run-")
        })
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let file = std::fs::read_dir(&runs[0])
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "wandb"))
        .unwrap();
    let records: Vec<Record> = read_records(&std::fs::read(&file).unwrap())
        .unwrap()
        .iter()
        .map(|b| Record::decode(b.as_slice()).unwrap())
        .collect();
    assert!(matches!(records[0].kind, Some(Kind::Header(_))));
    let Some(Kind::Run(run)) = &records[1].kind else {
        panic!("{:?}", records[1])
    };
    assert_eq!(
        (run.project.as_str(), run.display_name.as_str()),
        ("board", "wb")
    );
    let config = &run.config.as_ref().unwrap().update;
    assert!(config
        .iter()
        .any(|i| i.key == "lora_rank" && i.value_json == "8"));
    assert!(config
        .iter()
        .any(|i| i.key == "model_type" && i.value_json == "\"llama\""));
    let rows: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.kind {
            Some(Kind::History(h)) => Some(h),
            _ => None,
        })
        .collect();
    // A row per logged step, then the end-of-training row (its epoch), as transformers logs.
    assert_eq!(rows.len(), 5);
    let value = |row: &trainer::train::wandb::HistoryRecord, k: &str| {
        row.item
            .iter()
            .find(|i| i.key == k)
            .map(|i| i.value_json.clone())
    };
    assert_eq!(value(rows[3], "train/global_step").as_deref(), Some("4"));
    assert_eq!(value(rows[3], "_step").as_deref(), Some("3"));
    assert!(
        value(rows[0], "train/loss").is_some() && value(rows[0], "train/learning_rate").is_some()
    );
    let Some(Kind::Summary(summary)) = &records[records.len() - 2].kind else {
        panic!()
    };
    assert!(summary.update.iter().any(|i| i.key == "train_runtime"));
    assert!(matches!(records.last().unwrap().kind, Some(Kind::Exit(ref e)) if e.exit_code == 0));

    // Online mode (no WANDB_MODE) needs the network: a warning, and the run goes on.
    let o = common::bin()
        .args(["train", "cfg.yaml", "output_dir=online"])
        .current_dir(dir.path())
        .env_remove("WANDB_MODE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("set WANDB_MODE=offline"),
        "{}",
        stderr(&o)
    );
}
