//! `llamafactory bench e2e`: one LLaMA-Factory training YAML run whole through our trainer and,
//! with `--python`, through LLaMA-Factory's own `llamafactory-cli train` (`use_cpu: true`), in f32
//! and in bf16, side by side in one invocation: train samples/s and runtime from each run's
//! `all_results.json`, wall time, and each process's peak RSS (from `wait4`), with the CPU's
//! matrix-unit flags.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// One finished run.
struct Measured {
    samples_per_s: f64,
    runtime_s: f64,
    wall_s: f64,
    peak_rss: u64,
}

/// The CPU flags that decide bf16 speed here.
fn cpu_flags() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let wanted = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"];
    let have: Vec<&str> = wanted
        .iter()
        .map(|w| if flags.contains(w) { *w } else { "" })
        .filter(|w| !w.is_empty())
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores; flags: {}", have.join(" "))
}

/// Runs `cmd` to its end; its peak RSS from the kernel's accounting of that child alone.
fn run_measured(mut cmd: Command, out: &Path, log: &Path) -> Result<Measured> {
    let file = std::fs::File::create(log)?;
    cmd.stdout(Stdio::null()).stderr(file);
    let started = Instant::now();
    let child = cmd.spawn().context("starting the run")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 writes only into the two out-parameters given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall_s = started.elapsed().as_secs_f64();
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        bail!(
            "the run failed (log {}): {}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("all_results.json"))
            .with_context(|| format!("{}: no all_results.json", out.display()))?,
    )?;
    let get = |k: &str| results[k].as_f64().unwrap_or(f64::NAN);
    Ok(Measured {
        samples_per_s: get("train_samples_per_second"),
        runtime_s: get("train_runtime"),
        wall_s,
        peak_rss: usage.ru_maxrss as u64 * 1024,
    })
}

fn range(xs: &[f64]) -> String {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if (hi - lo).abs() < 0.005 {
        format!("{lo:.2}")
    } else {
        format!("{lo:.2}–{hi:.2}")
    }
}

/// `f(a) / f(b)` for each pair of runs.
fn ratios(a: &[Measured], b: &[Measured], f: impl Fn(&Measured) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect()
}

pub fn run(
    config: &Path,
    python: Option<&str>,
    dtypes: &str,
    runs: usize,
    padded: bool,
    overrides: &[String],
) -> Result<ExitCode> {
    if !config.is_file() {
        bail!("{}: no such YAML", config.display());
    }
    let me = std::env::current_exe()?;
    let work = std::env::temp_dir().join(format!("llamafactory-bench-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!("machine: {}", cpu_flags());
    println!("config: {} {}", config.display(), overrides.join(" "));
    println!("\n| engine | dtype | run | train samples/s | train runtime (s) | wall (s) | peak RSS (GB) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut summary = Vec::new();
    for dtype in dtypes.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bf16 = match dtype {
            "f32" => false,
            "bf16" => true,
            other => bail!("--dtypes {other}: f32 or bf16"),
        };
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut padded_runs = Vec::new();
        for i in 1..=runs.max(1) {
            let engines: Vec<&str> = std::iter::once("ours")
                .chain(padded.then_some("ours-padded"))
                .chain(python.map(|_| "llamafactory"))
                .collect();
            for engine in engines {
                let out: PathBuf = work.join(format!("{engine}-{dtype}-{i}"));
                let _ = std::fs::remove_dir_all(&out);
                let mut args: Vec<String> = vec![
                    format!("output_dir={}", out.display()),
                    "overwrite_output_dir=true".into(),
                    format!("bf16={bf16}"),
                    "report_to=none".into(),
                ];
                args.extend(overrides.iter().cloned());
                let cmd = if engine.starts_with("ours") {
                    let mut c = Command::new(&me);
                    c.arg("train").arg(config).args(&args);
                    if engine == "ours-padded" {
                        c.env("LLAMAFACTORY_PADDING_FREE", "0");
                    }
                    c
                } else {
                    let mut c = Command::new(python.unwrap_or("python3"));
                    c.args([
                        "-c",
                        "import sys; from llamafactory.cli import main; sys.argv = ['llamafactory-cli'] + sys.argv[1:]; main()",
                        "train",
                    ])
                    .arg(config)
                    .args(&args)
                    .arg("use_cpu=true")
                    .env("CUDA_VISIBLE_DEVICES", "")
                    .env("DISABLE_VERSION_CHECK", "1");
                    c
                };
                let log = work.join(format!("{engine}-{dtype}-{i}.log"));
                let m = run_measured(cmd, &out, &log)
                    .with_context(|| format!("{engine}, {dtype}, run {i}"))?;
                println!(
                    "| {engine} | {dtype} | {i} | {:.2} | {:.1} | {:.1} | {:.2} |",
                    m.samples_per_s,
                    m.runtime_s,
                    m.wall_s,
                    m.peak_rss as f64 / 1e9
                );
                match engine {
                    "ours" => ours.push(m),
                    "ours-padded" => padded_runs.push(m),
                    _ => theirs.push(m),
                }
            }
        }
        if !padded_runs.is_empty() {
            let speed = ratios(&ours, &padded_runs, |m| m.samples_per_s);
            summary.push(format!(
                "{dtype}: samples/s padding-free / padded {}× (over {} runs)",
                range(&speed),
                speed.len()
            ));
        }
        if !theirs.is_empty() {
            let speed = ratios(&ours, &theirs, |m| m.samples_per_s);
            let rss = ratios(&ours, &theirs, |m| m.peak_rss as f64);
            let wall = ratios(&ours, &theirs, |m| m.wall_s);
            summary.push(format!(
                "{dtype}: samples/s ours / LLaMA-Factory {}×, wall {}×, peak RSS {}× (over {} runs)",
                range(&speed),
                range(&wall),
                range(&rss),
                speed.len()
            ));
        }
    }
    if !summary.is_empty() {
        println!();
        for s in summary {
            println!("{s}");
        }
    } else if python.is_none() {
        println!("\n(LLaMA-Factory's side runs with `--python PY`, a Python with `llamafactory[torch]` installed)");
    }
    println!("\nlogs and outputs: {}", work.display());
    Ok(ExitCode::SUCCESS)
}
