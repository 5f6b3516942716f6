//! `llamafactory webui`: the real server on a free port with the demo model; runs started over the
//! REST API, events read from the WebSocket, workers aborted, killed and orphaned, bad requests.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{bin, http, repo, Server};
use serde_json::{json, Value};

/// A work dir with the demo datasets and the demo model at `models/demo`.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["demo", "--out", "models/demo", "--dataset-dir"])
        .arg(repo().join("data"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
}

fn start(dir: &Path) -> Server {
    let mut child = bin()
        .args(["webui", "--port", "0", "--grace-secs", "20", "--workdir"])
        .arg(dir)
        .env_remove("GRADIO_SERVER_NAME")
        .env_remove("GRADIO_SERVER_PORT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "server exited before listening"
        );
        if line.starts_with("Visit http://") {
            break;
        }
    }
    let addr = line["Visit http://".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    Server { child, addr }
}

fn get(s: &Server, path: &str) -> (u16, Value) {
    let (code, body) = http(&s.addr, "GET", path, "", &[]);
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (code, text) = http(&s.addr, "POST", path, &body.to_string(), &[]);
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn quick_run(dir: &Path, extra: Value) -> Value {
    let mut v = json!({
        "model_name_or_path": "models/demo",
        "dataset": "demo_sft",
        "template": "qwen",
        "finetuning_type": "lora",
        "lora_target": "all",
        "cutoff_len": 64,
        "max_samples": 24,
        "per_device_train_batch_size": 2,
        "learning_rate": "1e-3",
        "num_train_epochs": 1,
        "logging_steps": 1,
        "save_steps": 4,
        "output_dir": format!("demo/lora/run_{}", rand_suffix()),
    });
    let _ = dir;
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn start_run(s: &Server, body: &Value) -> i64 {
    let (code, v) = post(s, "/api/runs", body);
    assert_eq!(code, 201, "{v}");
    v["id"].as_i64().unwrap()
}

fn wait_status(s: &Server, id: i64, want: &[&str], limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let (_, v) = get(s, &format!("/api/runs/{id}"));
        if want.contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(t.elapsed() < limit, "run {id} never reached {want:?}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

fn ws(s: &Server, path: &str) -> Ws {
    let (sock, _) = tungstenite::connect(format!("ws://{}{path}", s.addr)).unwrap();
    sock
}

/// Reads events until the run's final status; returns them all.
fn read_to_end(sock: &mut Ws) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let msg = sock.read().expect("event stream ended before the run did");
        let tungstenite::Message::Text(t) = msg else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        let last =
            v["type"] == "status" && !matches!(v["status"].as_str(), Some("queued" | "running"));
        events.push(v);
        if last {
            return events;
        }
    }
}

/// Reads events until a metric point of step `step` or later.
fn wait_for_step(sock: &mut Ws, step: u64) {
    loop {
        let tungstenite::Message::Text(t) = sock.read().unwrap() else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] == "metric" && v["step"].as_u64() >= Some(step) {
            return;
        }
    }
}

fn assert_gapless(events: &[Value]) {
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let want: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(
        seqs, want,
        "sequence numbers must run 1..n without gaps or repeats"
    );
}

#[test]
fn lora_run_streams_loss_to_completion_and_records_metrics() {
    let dir = workdir();
    let s = start(dir.path());
    let (code, models) = get(&s, "/api/models");
    assert_eq!(code, 200);
    assert!(
        models
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["source"] == "demo"),
        "{models}"
    );
    let (_, ds) = get(&s, "/api/datasets?dataset_dir=data");
    assert!(
        ds.as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "demo_dpo" && d["kind"] == "rm"),
        "{ds}"
    );

    let id = start_run(&s, &quick_run(dir.path(), json!({})));
    // 50 subscribers, some before the first step and some late: every one gets the whole stream.
    let mut subs: Vec<Ws> = (0..25)
        .map(|_| ws(&s, &format!("/api/runs/{id}/events")))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    subs.extend((0..25).map(|_| ws(&s, &format!("/api/runs/{id}/events"))));
    let streams: Vec<Vec<Value>> = std::thread::scope(|sc| {
        let hs: Vec<_> = subs
            .iter_mut()
            .map(|w| sc.spawn(move || read_to_end(w)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = &streams[0];
    assert_gapless(first);
    for st in &streams {
        assert_eq!(st, first, "every subscriber sees the same events");
    }
    assert_eq!(
        first.last().unwrap()["status"],
        "succeeded",
        "{:?}",
        first.last()
    );
    let losses: Vec<f64> = first
        .iter()
        .filter(|e| e["type"] == "metric")
        .filter_map(|e| e["loss"].as_f64())
        .collect();
    assert!(losses.len() >= 10, "{losses:?}");

    let (_, run) = get(&s, &format!("/api/runs/{id}"));
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["kind"], "train");
    let out = PathBuf::from(run["output_dir"].as_str().unwrap());
    assert!(out.starts_with(dir.path().canonicalize().unwrap().join("saves")));
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(out.join("training_args.yaml").is_file());
    let (_, pts) = get(&s, &format!("/api/runs/{id}/metrics"));
    let db_losses: Vec<f64> = pts
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["loss"].as_f64())
        .collect();
    assert_eq!(
        db_losses, losses,
        "metrics in SQLite equal the streamed ones"
    );
    assert!(dir.path().join("llamaboard.db").is_file());

    // The finished adapter is offered as a checkpoint, and predict/export runs work from it.
    let (_, ckpts) = get(
        &s,
        "/api/checkpoints?model=models/demo&finetuning_type=lora",
    );
    assert!(
        ckpts
            .as_array()
            .unwrap()
            .iter()
            .any(|c| Path::new(c["path"].as_str().unwrap()) == out),
        "{ckpts}"
    );
    let (code, e) = post(
        &s,
        "/api/export",
        &json!({"model_name_or_path": "models/demo", "adapter_name_or_path": out, "template": "qwen", "export_dir": "exported"}),
    );
    assert_eq!(code, 201, "{e}");
    let ex = wait_status(
        &s,
        e["id"].as_i64().unwrap(),
        &["succeeded", "failed"],
        Duration::from_secs(60),
    );
    assert_eq!(ex["status"], "succeeded", "{ex}");
    let files = ex["result"]["files"].as_array().unwrap();
    assert!(
        files
            .iter()
            .any(|f| f["path"].as_str().unwrap().ends_with("model.safetensors")),
        "{files:?}"
    );
    assert!(dir.path().join("saves/exported/config.json").is_file());
}

#[test]
fn abort_keeps_a_checkpoint_and_kill_is_a_failure_with_the_log() {
    let dir = workdir();
    let s = start(dir.path());
    let long = json!({"num_train_epochs": 200, "max_samples": 64, "save_steps": 1000});
    let id = start_run(&s, &quick_run(dir.path(), long.clone()));
    // A second run waits in the queue while the first one runs.
    let queued = start_run(&s, &quick_run(dir.path(), long.clone()));
    let mut sock = ws(&s, &format!("/api/runs/{id}/events"));
    wait_for_step(&mut sock, 3);
    let (_, q) = get(&s, &format!("/api/runs/{queued}"));
    assert_eq!(q["status"], "queued");
    assert_eq!(q["queue_position"], 1);
    let (code, _) = post(&s, &format!("/api/runs/{id}/abort"), &json!(null));
    assert_eq!(code, 200);
    let run = wait_status(
        &s,
        id,
        &["aborted", "failed", "succeeded"],
        Duration::from_secs(60),
    );
    assert_eq!(run["status"], "aborted", "{run}");
    let out = PathBuf::from(run["output_dir"].as_str().unwrap());
    let ckpt = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"));
    assert!(
        ckpt.is_some(),
        "an aborted run keeps a checkpoint in {}",
        out.display()
    );

    // The queued run starts; SIGKILL its worker: failed, with the log tail.
    let run = wait_status(&s, queued, &["running"], Duration::from_secs(30));
    let out2 = run["output_dir"].as_str().unwrap().to_string();
    let t = Instant::now();
    let pid = loop {
        if let Some(p) = worker_pid(s.child.id(), &out2) {
            let (_, pts) = get(&s, &format!("/api/runs/{queued}/metrics"));
            if !pts.as_array().unwrap().is_empty() {
                break p;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no worker found");
        std::thread::sleep(Duration::from_millis(100));
    };
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let run = wait_status(
        &s,
        queued,
        &["failed", "aborted", "succeeded"],
        Duration::from_secs(30),
    );
    assert_eq!(run["status"], "failed", "{run}");
    let err = run["error"].as_str().unwrap();
    assert!(err.contains("SIGKILL"), "{err}");
    assert!(err.contains("last lines of the log"), "{err}");
    // The server is still serving.
    assert_eq!(get(&s, "/api/health").0, 200);
    let (_, log) = http(&s.addr, "GET", &format!("/api/runs/{queued}/log"), "", &[]);
    assert!(log.contains("\"event\":\"step\""), "{log}");
}

/// The worker of a run: a child of the server whose command line names the output dir.
fn worker_pid(server: u32, output_dir: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == server && String::from_utf8_lossy(&cmd).contains(output_dir) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_restarted_server_marks_lost_runs_interrupted_and_can_resume_them() {
    let dir = workdir();
    let mut s = start(dir.path());
    let id = start_run(
        &s,
        &quick_run(
            dir.path(),
            json!({"num_train_epochs": 200, "max_samples": 64, "save_steps": 1000}),
        ),
    );
    let mut sock = ws(&s, &format!("/api/runs/{id}/events"));
    wait_for_step(&mut sock, 2);
    let (_, before) = get(&s, &format!("/api/runs/{id}/metrics"));
    // The server dies without a chance to clean up.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(s);
    let s = start(dir.path());
    let (_, run) = get(&s, &format!("/api/runs/{id}"));
    assert_eq!(run["status"], "interrupted", "{run}");
    let (_, after) = get(&s, &format!("/api/runs/{id}/metrics"));
    assert!(after.as_array().unwrap().len() >= before.as_array().unwrap().len());
    // The orphaned worker was told to save and stop: a complete checkpoint appears.
    let out = PathBuf::from(run["output_dir"].as_str().unwrap());
    let complete = |out: &Path| {
        std::fs::read_dir(out).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("checkpoint-")
                .is_some_and(|n| n.parse::<u64>().is_ok())
                && e.path().join("trainer_state.json").is_file()
        })
    };
    let t = Instant::now();
    while !complete(&out) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the orphaned worker saved no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Resume continues from that checkpoint (the worker says so); then abort it again.
    let (code, v) = post(&s, &format!("/api/runs/{id}/resume"), &json!(null));
    assert_eq!(code, 200, "{v}");
    let t = Instant::now();
    loop {
        let (_, log) = http(&s.addr, "GET", &format!("/api/runs/{id}/log"), "", &[]);
        if log.contains("Resuming training from") && log.matches("\"event\":\"step\"").count() > 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the resumed worker did not resume: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = post(&s, &format!("/api/runs/{id}/abort"), &json!(null));
    assert_eq!(code, 200);
    let run = wait_status(
        &s,
        id,
        &["aborted", "failed", "succeeded"],
        Duration::from_secs(60),
    );
    assert_eq!(run["status"], "aborted", "{run}");
}

#[test]
fn bad_requests_get_clear_errors() {
    let dir = workdir();
    let s = start(dir.path());
    let err = |code: u16, v: &Value| -> (u16, String, String, Option<String>) {
        (
            code,
            v["error"]["code"].as_str().unwrap_or("").to_string(),
            v["error"]["message"].as_str().unwrap_or("").to_string(),
            v["error"]["field"].as_str().map(str::to_string),
        )
    };
    // Malformed JSON.
    let (code, text) = http(&s.addr, "POST", "/api/runs", "{\"stage\": ", &[]);
    let v: Value = serde_json::from_str(&text).unwrap();
    let (c, kind, _, _) = err(code, &v);
    assert_eq!((c, kind.as_str()), (400, "malformed_json"), "{v}");
    // Unknown key, with a suggestion.
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"lerning_rate": 1})),
    );
    let (c, _, msg, field) = err(code, &v);
    assert_eq!((c, field.as_deref()), (422, Some("lerning_rate")), "{v}");
    assert!(msg.contains("did you mean `learning_rate`"), "{msg}");
    // A wrong type.
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"lora_rank": "eight"})),
    );
    assert_eq!(err(code, &v).3.as_deref(), Some("lora_rank"), "{v}");
    // Paths that are not what they claim.
    std::fs::create_dir_all(dir.path().join("not_a_model")).unwrap();
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"model_name_or_path": "not_a_model"})),
    );
    let (c, _, msg, field) = err(code, &v);
    assert_eq!(
        (c, field.as_deref()),
        (422, Some("model_name_or_path")),
        "{v}"
    );
    assert!(msg.contains("no config.json"), "{msg}");
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"dataset_dir": "models"})),
    );
    let (c, _, msg, field) = err(code, &v);
    assert_eq!((c, field.as_deref()), (422, Some("dataset_dir")), "{v}");
    assert!(msg.contains("dataset_info.json"), "{msg}");
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"output_dir": "../../etc"})),
    );
    assert_eq!(err(code, &v).3.as_deref(), Some("output_dir"), "{v}");
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"dataset": "demo_sfy"})),
    );
    let (c, _, msg, field) = err(code, &v);
    assert_eq!((c, field.as_deref()), (422, Some("dataset")), "{v}");
    assert!(msg.contains("did you mean `demo_sft`"), "{msg}");
    // PPO without a reward model, and with a folder that is not one (LlamaBoard's message).
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"stage": "ppo"})),
    );
    let (c, _, msg, field) = err(code, &v);
    assert_eq!((c, field.as_deref()), (422, Some("reward_model")), "{v}");
    assert!(msg.contains("Please select a reward model"), "{msg}");
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(
            dir.path(),
            json!({"stage": "ppo", "reward_model": "models/demo"}),
        ),
    );
    let (c, _, msg, field) = err(code, &v);
    assert_eq!((c, field.as_deref()), (422, Some("reward_model")), "{v}");
    assert!(msg.contains("value_head.safetensors"), "{msg}");
    let (code, v) = get(&s, "/api/datasets?dataset_dir=/etc");
    assert_eq!(err(code, &v).3.as_deref(), Some("dataset_dir"), "{v}");
    // A foreign Origin and a foreign Host (DNS rebinding) are refused.
    let (code, text) = http(
        &s.addr,
        "POST",
        "/api/runs",
        "{}",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("cross-origin"), "{text}");
    let (code, _) = http(
        &s.addr,
        "GET",
        "/api/runs",
        "",
        &[("Host", "evil.example:80")],
    );
    assert_eq!(code, 403);
    // Oversize body.
    let big = format!("{{\"x\": \"{}\"}}", "a".repeat(2 << 20));
    let (code, text) = http(&s.addr, "POST", "/api/runs", &big, &[]);
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    // Unknown run and endpoint.
    assert_eq!(get(&s, "/api/runs/999").0, 404);
    assert_eq!(get(&s, "/api/nope").0, 404);
    // The OpenAPI document describes the fixed points.
    let (code, doc) = get(&s, "/api/openapi.json");
    assert_eq!(code, 200);
    for p in [
        "/api/runs",
        "/api/runs/{id}",
        "/api/runs/{id}/metrics",
        "/api/datasets",
    ] {
        assert!(
            doc["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["TrainArgs"]["properties"]["lora_rank"].is_object());
    // The page itself is served, server-rendered.
    let (code, html) = http(&s.addr, "GET", "/", "", &[]);
    assert_eq!(code, 200);
    assert!(
        html.contains("LlamaBoard") && html.contains("data-tab=\"tab_train\""),
        "{html}"
    );
}

#[test]
fn off_loopback_the_access_token_is_required() {
    let dir = workdir();
    let mut child = bin()
        .args(["webui", "--host", "0.0.0.0", "--port", "0", "--workdir"])
        .arg(dir.path())
        .env("LLAMAFACTORY_TOKEN", "s3cret")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("Visit http://") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0);
    }
    assert!(line.contains("?token=s3cret"), "{line}");
    let addr = line["Visit http://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let s = Server { child, addr };
    let (code, body) = http(&s.addr, "GET", "/api/runs", "", &[]);
    assert_eq!(code, 401, "{body}");
    let (code, _) = http(
        &s.addr,
        "GET",
        "/api/runs",
        "",
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!(code, 401);
    let (code, _) = http(
        &s.addr,
        "GET",
        "/api/runs",
        "",
        &[("Authorization", "Bearer s3cret")],
    );
    assert_eq!(code, 200);
    // Opening the printed URL sets a cookie that later requests carry.
    let (code, _) = http(&s.addr, "GET", "/?token=s3cret", "", &[]);
    assert_eq!(code, 200);
    let (code, _) = http(
        &s.addr,
        "GET",
        "/api/runs",
        "",
        &[("Cookie", "lf_token=s3cret")],
    );
    assert_eq!(code, 200);
}
