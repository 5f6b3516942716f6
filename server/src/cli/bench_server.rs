//! `llamafactory bench server`: starts `llamafactory webui` on a scratch work dir with the demo
//! model, runs a LoRA job watched by N WebSocket subscribers, and reports how long events take
//! from the worker's print to each client, and the server's memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    trainer::sysinfo::proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

fn post(addr: &str, path: &str, body: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Latencies (seconds) of the metric events one subscriber received, until the run ended.
fn subscribe(addr: &str, id: i64) -> Result<Vec<f64>> {
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/api/runs/{id}/events"))?;
    let mut lat = Vec::new();
    loop {
        let tungstenite::Message::Text(t) = ws.read()? else {
            continue;
        };
        let received = crate::db::now();
        let v: Value = serde_json::from_str(&t)?;
        if v["type"] == "metric" {
            if let Some(ts) = v["worker_ts"].as_f64() {
                lat.push(received - ts);
            }
        }
        if v["type"] == "status" && !matches!(v["status"].as_str(), Some("queued" | "running")) {
            if v["status"] != "succeeded" {
                bail!("the benchmark run ended {}: {}", v["status"], v["error"]);
            }
            return Ok(lat);
        }
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn run(subscribers: usize, steps: usize) -> Result<ExitCode> {
    let work =
        std::env::temp_dir().join(format!("llamafactory-bench-server-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(&exe)
        .args(["webui", "--port", "0", "--workdir"])
        .arg(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the server")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or_else(|| anyhow!("the server exited before listening"))??;
        if let Some(rest) = line.strip_prefix("Visit http://") {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = server.0.id();
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(pid).unwrap_or(0);

    // Enough examples for `steps` steps of batch 1, one event per step.
    let body = json!({
        "model_name_or_path": "models/demo", "dataset": "demo_sft", "template": "qwen",
        "cutoff_len": 64, "max_samples": steps, "per_device_train_batch_size": 1,
        "num_train_epochs": 1, "logging_steps": 1, "save_steps": 100000, "output_dir": "bench",
    });
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let text = post(&addr, "/api/runs", &body.to_string())?;
    let id = serde_json::from_str::<Value>(&text)?["id"]
        .as_i64()
        .ok_or_else(|| anyhow!("cannot start the run: {text}"))?;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..subscribers)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || subscribe(&addr, id))
        })
        .collect();
    let sampler = {
        let peak = peak.clone();
        std::thread::spawn(move || {
            while t0.elapsed() < Duration::from_secs(600) {
                match rss_kib(pid) {
                    Some(r) => {
                        peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                    }
                    None => return,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow!("a subscriber panicked"))??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let streaming = peak.load(std::sync::atomic::Ordering::Relaxed);
    drop(server);
    let _ = sampler.join();
    let _ = std::fs::remove_dir_all(&work);
    all.sort_by(f64::total_cmp);
    let ms = |s: f64| s * 1000.0;
    println!("| measure | value | aim |");
    println!("|---|---:|---:|");
    println!(
        "| metric events received, all {subscribers} subscribers | {} | |",
        all.len()
    );
    println!(
        "| event latency, median | {:.2} ms | < 50 ms |",
        ms(pct(&all, 0.5))
    );
    println!("| event latency, p95 | {:.2} ms | |", ms(pct(&all, 0.95)));
    println!("| event latency, max | {:.2} ms | |", ms(pct(&all, 1.0)));
    println!(
        "| server RSS, idle | {:.1} MB | < 50 MB |",
        idle as f64 / 1024.0
    );
    println!(
        "| server RSS, peak while streaming to {subscribers} | {:.1} MB | |",
        streaming as f64 / 1024.0
    );
    println!("| run wall time | {elapsed:.1} s | |");
    Ok(ExitCode::SUCCESS)
}
