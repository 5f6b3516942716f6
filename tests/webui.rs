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
    start_with(dir, &[])
}

fn start_with(dir: &Path, env: &[(&str, &str)]) -> Server {
    let mut child = bin()
        .args(["webui", "--port", "0", "--grace-secs", "20", "--workdir"])
        .arg(dir)
        .envs(env.iter().copied())
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
    // A second server on the same work dir is refused, naming the one there.
    let second = bin()
        .args(["webui", "--port", "0", "--workdir"])
        .arg(dir.path())
        .env_remove("GRADIO_SERVER_NAME")
        .env_remove("GRADIO_SERVER_PORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second server started: {err}");
    assert!(
        err.contains("another LlamaBoard server")
            && err.contains(&format!("pid {}", s.child.id()))
            && err.contains(&s.addr),
        "{err}"
    );
    let (_, run) = get(&s, &format!("/api/runs/{id}"));
    assert_eq!(
        run["status"], "running",
        "the second server left the run alone: {run}"
    );
    // The server dies without a chance to clean up.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(s);
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
    std::thread::sleep(Duration::from_millis(500));
    let s = start(dir.path());
    let (_, run) = get(&s, &format!("/api/runs/{id}"));
    assert_eq!(run["status"], "interrupted", "{run}");
    // Every step the worker logged is on the chart, including those the dead server missed.
    let (_, after) = get(&s, &format!("/api/runs/{id}/metrics"));
    let charted: Vec<u64> = after
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["loss"].is_number())
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    let logged: Vec<u64> = common::jsonl(&out.join("trainer_log.jsonl"))
        .iter()
        .filter(|l| l["loss"].is_number())
        .map(|l| l["current_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(charted, logged);
    // Resume continues from that checkpoint (the worker says so); sixteen simultaneous
    // requests queue it once.
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| post(&s, &format!("/api/runs/{id}/resume"), &json!(null)).0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        answers.iter().filter(|&&c| c == 200).count(),
        1,
        "one resume wins: {answers:?}"
    );
    assert!(answers.iter().all(|&c| c == 200 || c == 409), "{answers:?}");
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
    // The preview estimates memory; a 4-bit base takes less, and a width bitsandbytes lacks is
    // refused on its field.
    let weights = |extra: Value| {
        let (code, v) = post(&s, "/api/preview-command", &quick_run(dir.path(), extra));
        assert_eq!(code, 200, "{v}");
        v["memory"]["weights"].as_u64().unwrap()
    };
    let (full, q4) = (weights(json!({})), weights(json!({"quantization_bit": 4})));
    assert!(q4 < full, "{q4} vs {full}");
    let (code, v) = post(
        &s,
        "/api/runs",
        &quick_run(dir.path(), json!({"quantization_bit": 3})),
    );
    assert_eq!(
        (code, err(code, &v).3.as_deref()),
        (422, Some("quantization_bit")),
        "{v}"
    );
    // Unknown run and endpoint.
    assert_eq!(get(&s, "/api/runs/999").0, 404);
    assert_eq!(get(&s, "/api/nope").0, 404);
    // Values a worker cannot run are refused with their key, never run into a backtrace.
    for (key, value) in [
        ("lora_rank", json!(0)),
        ("lora_dropout", json!(2)),
        ("learning_rate", json!(-1)),
        ("warmup_ratio", json!(-1)),
    ] {
        let (code, v) = post(
            &s,
            "/api/runs",
            &quick_run(dir.path(), json!({ key: value })),
        );
        let (c, _, msg, field) = err(code, &v);
        assert_eq!((c, field.as_deref()), (422, Some(key)), "{v}");
        assert!(msg.contains(&format!("`{key}`")), "{msg}");
    }
    // Every error under /api has the error shape: bad paths and queries, a WebSocket route
    // without an upgrade, a method the route does not take.
    for (method, path, status, code, field) in [
        ("GET", "/api/runs/abc", 400, "bad_path", None),
        ("GET", "/api/runs?limit=abc", 400, "bad_query", None),
        ("GET", "/api/runs/1/log?bytes=-1", 400, "bad_query", None),
        ("GET", "/api/checkpoints", 400, "bad_query", Some("model")),
        ("GET", "/api/runs/1/events", 400, "websocket_required", None),
        ("GET", "/api/chat", 400, "websocket_required", None),
        ("DELETE", "/api/models", 405, "method_not_allowed", None),
        ("POST", "/api/settings", 405, "method_not_allowed", None),
    ] {
        let (c, text) = http(&s.addr, method, path, "", &[]);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text:?}"));
        let (c, kind, msg, f) = err(c, &v);
        assert_eq!((c, kind.as_str()), (status, code), "{method} {path}: {v}");
        assert!(!msg.is_empty(), "{method} {path}: {v}");
        if field.is_some() {
            assert_eq!(f.as_deref(), field, "{method} {path}: {v}");
        }
    }
    // The Host check takes this server under any of its names, in any case.
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    for host in [
        format!("LOCALHOST:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (code, text) = http(&s.addr, "GET", "/api/health", "", &[("Host", &host)]);
        assert_eq!(code, 200, "{host}: {text}");
    }
    let (code, _) = http(&s.addr, "GET", "/api/health", "", &[("Host", "127.0.0.1")]);
    assert_eq!(
        code, 403,
        "no port means port 80, which this server is not on"
    );
    // Pages cannot be framed, and the page's scripts are pinned by a nonce.
    let head = raw_head(&s.addr, "/");
    assert!(head.contains("x-frame-options: deny"), "{head}");
    let csp = head
        .lines()
        .find(|l| l.starts_with("content-security-policy:"))
        .unwrap_or_else(|| panic!("no CSP: {head}"));
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("'nonce-"),
        "{csp}"
    );
    // The browser bundle is built in, compressed as the browser accepts, revalidated by ETag.
    let wasm =
        |headers: &[(&str, &str)]| raw_request_head(&s.addr, "/pkg/frontend_bg.wasm", headers);
    let plain = wasm(&[]);
    if plain.starts_with("http/1.1 404") && std::env::var("CI").as_deref() != Ok("true") {
        eprintln!("skipped: this binary was built without the browser bundle (scripts/build-web.sh first)");
    } else {
        assert!(plain.starts_with("http/1.1 200"), "{plain}");
        assert!(wasm(&[("Accept-Encoding", "gzip, deflate, br")]).contains("content-encoding: br"));
        assert!(wasm(&[("Accept-Encoding", "gzip")]).contains("content-encoding: gzip"));
        let etag = plain
            .lines()
            .find_map(|l| l.strip_prefix("etag: "))
            .unwrap()
            .to_string();
        let again = wasm(&[("If-None-Match", etag.as_str())]);
        assert!(again.starts_with("http/1.1 304"), "{again}");
    }
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
fn a_chat_load_ends_even_when_its_client_goes_away() {
    let dir = workdir();
    // Each load takes two seconds more, so the page can be "reloaded" in the middle.
    let s = start_with(
        dir.path(),
        &[("LLAMAFACTORY_TEST_CHAT_LOAD_DELAY_MS", "2000")],
    );
    // The template follows a typed model: a known family gets LLaMA-Factory's template, an
    // unknown one its own chat template, each with the reason.
    let (code, m) = get(&s, "/api/models/info?model=models/demo");
    assert_eq!((code, m["template"].as_str()), (200, Some("qwen")), "{m}");
    let plain = dir.path().join("models/plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(
        plain.join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 32000}"#,
    )
    .unwrap();
    std::fs::write(
        plain.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
    )
    .unwrap();
    let (code, m) = get(&s, "/api/models/info?model=models/plain");
    assert_eq!(code, 200, "{m}");
    assert!(m["template"].is_null(), "{m}");
    assert!(
        m["template_reason"]
            .as_str()
            .unwrap()
            .contains("its own chat template"),
        "{m}"
    );
    let (code, m) = get(&s, "/api/models/info?model=models/missing");
    assert_eq!(
        (code, m["error"]["field"].as_str()),
        (422, Some("model_name_or_path")),
        "{m}"
    );

    let body = json!({"model_name_or_path": "models/demo", "template": "qwen"}).to_string();
    {
        use std::io::Write;
        let mut sock = TcpStream::connect(&s.addr).unwrap();
        write!(
            sock,
            "POST /api/chat/load HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            s.addr,
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    } // The client goes away while the model loads.
    let (_, st) = get(&s, "/api/chat/status");
    assert_eq!(st["state"], "loading", "{st}");
    // A second load meanwhile is refused, saying why.
    let (code, v) = post(&s, "/api/chat/load", &serde_json::from_str(&body).unwrap());
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is being loaded"),
        "{v}"
    );
    let t = Instant::now();
    loop {
        let (_, st) = get(&s, "/api/chat/status");
        if st["state"] == "loaded" {
            break;
        }
        assert_eq!(st["state"], "loading", "{st}");
        assert!(t.elapsed() < Duration::from_secs(30), "stuck: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The raw response to `GET path` sent with `headers` (a `Host` is added unless given),
/// read until the server closes or `limit` passes.
fn raw_get(addr: &str, path: &str, headers: &[(&str, &str)], limit: Duration) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req += &format!("Host: {addr}\r\n");
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    sock.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = sock.read_to_end(&mut raw);
    raw
}

/// `GET path` with a read timeout; status 0 when no answer came in time.
fn timed_http(addr: &str, path: &str, headers: &[(&str, &str)], limit: Duration) -> (u16, String) {
    let text = String::from_utf8_lossy(&raw_get(addr, path, headers, limit)).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// The response head of `GET path`, lower-cased.
fn raw_head(addr: &str, path: &str) -> String {
    raw_request_head(addr, path, &[])
}

/// The response head of `GET path` sent with `headers`, lower-cased.
fn raw_request_head(addr: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let raw = raw_get(addr, path, headers, Duration::from_secs(30));
    let cut = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..cut]).to_ascii_lowercase()
}

#[test]
fn off_loopback_the_access_token_is_required() {
    let dir = workdir();
    let mut cmd = bin();
    cmd.args(["webui", "--host", "0.0.0.0", "--port", "0", "--workdir"])
        .arg(dir.path())
        .env("LLAMAFACTORY_TOKEN", "s3cret")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // A small descriptor budget, like a locked-down box: fewer than the idle connections below.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
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
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (code, _) = http(
            &s.addr,
            "GET",
            "/api/runs",
            "",
            &[("Authorization", &format!("{scheme} s3cret"))],
        );
        assert_eq!(code, 200, "{scheme}");
    }
    // Three hundred connections that never send a request do not lock the token holder out:
    // they are closed after the header timeout, and the server never runs out of descriptors.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&s.addr).unwrap())
        .collect();
    let t = Instant::now();
    let (code, _) = timed_http(
        &s.addr,
        "/api/runs",
        &[("Authorization", "Bearer s3cret")],
        Duration::from_secs(40),
    );
    assert_eq!(code, 200, "after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    drop(idle);
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

/// The dataset preview of an image dataset links each row's images, served from inside the
/// dataset dir only (no traversal, image files only).
#[test]
fn dataset_preview_links_images_served_from_the_dataset_dir_only() {
    let dir = workdir();
    let data = dir.path().join("vl");
    std::fs::create_dir_all(data.join("imgs")).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/vision/small.png"),
        data.join("imgs/a.png"),
    )
    .unwrap();
    std::fs::write(dir.path().join("secret.png"), b"not for the browser").unwrap();
    std::fs::write(data.join("notes.txt"), b"text").unwrap();
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"vl": {"file_name": "vl.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}, "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}"#,
    )
    .unwrap();
    std::fs::write(
        data.join("vl.json"),
        r#"[{"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A gradient."}], "images": ["imgs/a.png"]}]"#,
    )
    .unwrap();
    let s = start(dir.path());
    let (code, page) = get(&s, "/api/datasets/vl/preview?dataset_dir=vl");
    assert_eq!(code, 200, "{page}");
    let url = page["images"][0][0].as_str().unwrap().to_string();
    assert!(url.starts_with("/api/datasets/media?"), "{url}");
    let (code, body) = http(&s.addr, "GET", &url, "", &[]);
    assert_eq!(code, 200, "{body}");
    for (path, want) in [
        ("../secret.png", 404),
        ("imgs/../../secret.png", 404),
        ("notes.txt", 422),
        ("imgs/missing.png", 404),
    ] {
        let (code, body) = get(
            &s,
            &format!("/api/datasets/media?dataset_dir=vl&path={path}"),
        );
        assert!(
            code == want || (want == 422 && code == 400),
            "{path}: {code} {body}"
        );
    }
}

/// LlamaBoard's device count: a two-rank run (CPU ranks over MPI) records its rank count and
/// streams rank 0's steps; killing one rank mid-run leaves it `failed` with the reason, and the
/// checkpoint saved before is whole.
#[cfg(feature = "mpi")]
#[test]
fn a_two_rank_run_records_its_devices_and_a_killed_rank_fails_it() {
    let dir = workdir();
    let s = start(dir.path());
    let extra = json!({"nproc_per_node": 2, "num_train_epochs": 500, "max_samples": 64, "save_steps": 2, "ddp_timeout": 30});
    let id = start_run(&s, &quick_run(dir.path(), extra));
    let mut sock = ws(&s, &format!("/api/runs/{id}/events"));
    wait_for_step(&mut sock, 3);
    let (_, run) = get(&s, &format!("/api/runs/{id}"));
    assert_eq!(run["config"]["nproc_per_node"], 2, "{run}");
    let out = PathBuf::from(run["output_dir"].as_str().unwrap());
    let t = Instant::now();
    while !out.join("checkpoint-2/trainer_state.json").exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "no checkpoint-2");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Rank 1: a process working in the server's folder with Open MPI's rank variable.
    let rank1 = *common::mpi_ranks(dir.path(), "")
        .get(&1)
        .expect("rank 1 runs");
    unsafe {
        libc::kill(rank1, libc::SIGKILL);
    }
    let run = wait_status(
        &s,
        id,
        &["failed", "aborted", "succeeded"],
        Duration::from_secs(60),
    );
    assert_eq!(run["status"], "failed", "{run}");
    let err = run["error"].as_str().unwrap();
    assert!(err.contains("rank") && err.contains("mpirun"), "{err}");
    assert_eq!(
        common::read_json(&out.join("checkpoint-2/trainer_state.json"))["global_step"],
        2
    );
    let (_, log) = http(&s.addr, "GET", &format!("/api/runs/{id}/log"), "", &[]);
    assert!(log.contains("2 ranks over MPI"), "{log}");
    assert_eq!(get(&s, "/api/health").0, 200);
}
