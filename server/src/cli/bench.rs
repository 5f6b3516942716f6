//! `llamafactory bench`: speed and memory tables (training steps, whole training runs beside
//! LLaMA-Factory's, data pipeline, decoding, the GPU path, the web server's event latency)
//! measured side by side in one run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Web server: event latency (worker print → WebSocket client) during a demo LoRA run with
    /// N subscribers, and server memory at idle and while streaming.
    Server {
        #[arg(long, default_value_t = 50)]
        subscribers: usize,
        /// Training steps of the demo run (one event each).
        #[arg(long, default_value_t = 200)]
        steps: usize,
    },
    /// Data pipeline throughput: read, convert, template and tokenize N Alpaca examples.
    Data {
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        /// Model folder whose tokenizer is used (default: a freshly built demo model).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value = "qwen")]
        template: String,
    },
    /// Greedy decoding tokens/s (batch 1 and batched), next to PyTorch `generate()` when it can run.
    Decode {
        #[arg(long, default_value = "tiny")]
        config: String,
        /// Prompts decoded together in the batched measurement.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value = "../shared/bench/bench_torch_lora.py")]
        torch_script: PathBuf,
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Training step time and peak memory for the shapes of `bench_torch_lora.py`, and the
    /// PyTorch + PEFT figures side by side when that script and a Python with torch can run.
    Train {
        #[arg(long, default_value = "tiny")]
        config: String,
        /// Full fine-tuning instead of LoRA.
        #[arg(long)]
        full: bool,
        /// With `--full`: `adamw`, `galore` (rank 16 on every linear, `use_galore`) or
        /// `badam` (one decoder layer trainable, `use_badam`) — their memory side by side.
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Also time a DPO step on the same shape and report its cost in SFT steps.
        #[arg(long)]
        dpo: bool,
        /// Also time the same step with candle's composed ops instead of our fused kernels.
        #[arg(long)]
        composed: bool,
        /// Recompute each decoder layer in backward instead of keeping its activations
        /// (`gradient_checkpointing: true`); the PyTorch side keeps them.
        #[arg(long)]
        gradient_checkpointing: bool,
        /// QLoRA: the frozen base quantized to this many bits (`quantization_bit`).
        #[arg(long)]
        quantization_bit: Option<u32>,
        /// Sequences per step instead of the shape's (ours only).
        #[arg(long)]
        batch: Option<usize>,
        /// With `--quantization-bit`: `bnb` (4-bit NF4, 8-bit) or `ggml` (2–8 bits).
        #[arg(long, default_value = "bnb")]
        quantization_method: String,
        /// Sequence length instead of the shape's 256 (ours only: the PyTorch script has no
        /// such option).
        #[arg(long)]
        seq: Option<usize>,
        /// Also time the shape as a Mixtral-style mixture of this many experts (top 2, each the
        /// dense MLP's size), next to the dense model and to the dense model with all the
        /// experts' MLP work (ours only).
        #[arg(long)]
        experts: Option<usize>,
        /// The PyTorch side (dev machines keep it in the shared folder).
        #[arg(long, default_value = "../shared/bench/bench_torch_lora.py")]
        torch_script: PathBuf,
        /// Python with torch, transformers and peft.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// A LLaMA-Factory training YAML run whole, through our trainer and (with `--python`)
    /// through `llamafactory-cli train` on the CPU, in f32 and bf16: samples/s, wall time and
    /// peak RSS side by side, with the CPU's flags.
    E2e {
        /// The training YAML (LLaMA-Factory's format).
        #[arg(long)]
        config: PathBuf,
        /// A Python with `llamafactory[torch]` installed, for LLaMA-Factory's side.
        #[arg(long)]
        python: Option<String>,
        /// Comma-separated: f32, bf16.
        #[arg(long, default_value = "f32,bf16")]
        dtypes: String,
        /// Runs of each engine and dtype (the table gives each, the summary their range).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Also run our trainer on padded batches (`LLAMAFACTORY_PADDING_FREE=0`), to show what
        /// padding-free batches gain.
        #[arg(long)]
        padded: bool,
        /// `key=value` overrides for both engines (e.g. `max_steps=20`).
        overrides: Vec<String>,
    },
    /// f32 matrix products of a LoRA step (the 135M shape at 512 tokens) in GFLOP/s: candle's
    /// matmul (the `gemm` crate) and, when `--python` has torch, PyTorch's (MKL) on the same
    /// shapes and threads.
    Gemm {
        /// A Python with torch, for PyTorch's side.
        #[arg(long)]
        python: Option<String>,
        /// Timed rounds per shape (the best counts).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The compute device (a GPU when built with `--features cuda` or `metal`): logits, loss
    /// and LoRA gradients against the CPU on the same weights, then LoRA training step time,
    /// tokens/s and MFU, and decode tokens/s, for one shape (default: a 0.5B-class model).
    Device {
        #[arg(long, default_value = "0.5b")]
        config: String,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Sequences per step (default: the shape's).
        #[arg(long)]
        batch: Option<usize>,
        /// Tokens per sequence (default: the shape's).
        #[arg(long)]
        seq: Option<usize>,
        /// Compute dtype for the timed run: bf16, fp16 or fp32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// The device's dense peak in TFLOPS at that dtype, for MFU (default: an H100/H200
        /// SXM's bf16 989; its fp32 is 67).
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
    },
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
        BenchCommand::Device {
            config,
            steps,
            batch,
            seq,
            dtype,
            peak_tflops,
        } => device(&config, steps, batch, seq, &dtype, peak_tflops),
        BenchCommand::Gemm { python, rounds } => gemm(python.as_deref(), rounds),
        BenchCommand::Server { subscribers, steps } => super::bench_server::run(subscribers, steps),
        BenchCommand::E2e {
            config,
            python,
            dtypes,
            runs,
            padded,
            overrides,
        } => super::bench_e2e::run(
            &config,
            python.as_deref(),
            &dtypes,
            runs,
            padded,
            &overrides,
        ),
        BenchCommand::Decode {
            config,
            batch,
            torch_script,
            python,
        } => {
            let c = trainer::bench::train_bench_config(&config)?;
            let (single, batched) = trainer::bench::decode_speed(&c, batch)?;
            println!("| engine | config | decode tok/s (batch 1) | decode tok/s (batch {batch}) |");
            println!("|---|---|---:|---:|");
            println!(
                "| llamafactory (candle) | {} | {single:.1} | {batched:.1} |",
                c.name
            );
            if torch_script.exists() {
                let threads = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .to_string();
                let out = std::process::Command::new(&python)
                    .arg(&torch_script)
                    .args(["--config", &config, "--no-train", "--threads", &threads])
                    .output();
                let parsed = out.ok().and_then(|o| {
                    let text = String::from_utf8_lossy(&o.stdout).into_owned();
                    let line = text
                        .lines()
                        .find(|l| l.starts_with("RESULT decode"))?
                        .to_string();
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix("tok_per_s="))?
                        .parse::<f64>()
                        .ok()
                });
                match parsed {
                    Some(t) => {
                        println!("| PyTorch generate() | {} | {t:.1} | |", c.name);
                        println!("\ndecode speed ratio (ours / PyTorch, batch 1): {:.2}×", single / t);
                    }
                    None => println!("\n(PyTorch side not run: {python} with torch, transformers and peft is needed)"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Train {
            config,
            full,
            optimizer,
            steps,
            dpo,
            composed,
            gradient_checkpointing,
            quantization_bit,
            quantization_method,
            batch,
            seq,
            experts,
            torch_script,
            python,
        } => {
            let mut c = trainer::bench::train_bench_config(&config)?;
            c.checkpointing = gradient_checkpointing;
            c.optimizer = match optimizer.as_str() {
                "adamw" => trainer::bench::FullOptimizer::AdamW,
                "galore" => trainer::bench::FullOptimizer::Galore,
                "badam" => trainer::bench::FullOptimizer::Badam,
                other => anyhow::bail!("--optimizer {other}: choose adamw, galore or badam"),
            };
            anyhow::ensure!(
                full || c.optimizer == trainer::bench::FullOptimizer::AdamW,
                "--optimizer galore / badam are full fine-tuning methods: add --full"
            );
            if let Some(b) = batch {
                anyhow::ensure!(b > 0, "--batch must be at least 1");
                c.batch = b;
            }
            if let Some(bits) = quantization_bit {
                anyhow::ensure!(
                    !full,
                    "--quantization-bit trains LoRA on the quantized base; drop --full"
                );
                let args = protocol::TrainArgs {
                    quantization_bit: Some(bits),
                    quantization_method: quantization_method
                        .parse()
                        .map_err(|e: String| anyhow::anyhow!("--quantization-method: {e}"))?,
                    ..Default::default()
                };
                trainer::config::validate(&args)?;
                c.quant = trainer::model::quant::QuantFormat::from_args(&args)?;
            }
            if let Some(seq) = seq {
                c.set_seq(seq)?;
            }
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            let (t, tokens) = trainer::bench::train_steps(&c, full, steps)?;
            let rss = trainer::bench::peak_rss().unwrap_or(0);
            let mut method = match (full, gradient_checkpointing) {
                (false, false) => "LoRA",
                (true, false) => "full",
                (false, true) => "LoRA, checkpointed",
                (true, true) => "full, checkpointed",
            }
            .to_string();
            if let Some(q) = c.quant {
                method = format!("{method}, base {}", q.describe());
            }
            match c.optimizer {
                trainer::bench::FullOptimizer::AdamW => {}
                trainer::bench::FullOptimizer::Galore => method.push_str(", GaLore r16"),
                trainer::bench::FullOptimizer::Badam => method.push_str(", BAdam (1 layer)"),
            }
            println!("| engine | config | method | step (s) | fwd | bwd | opt | tokens/s | peak RSS (GB) |");
            println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
            println!(
                "| llamafactory (candle) | {} | {method} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.2} |",
                c.name,
                t.total,
                t.forward,
                t.backward,
                t.optimizer,
                tokens as f64 / t.total,
                rss as f64 / 1e9
            );
            println!(
                "\nloss after the last step (the same batch every step): {:.4}\n",
                t.loss
            );
            if composed {
                trainer::ops::use_composed_ops(true);
                let (u, _) = trainer::bench::train_steps(&c, full, steps)?;
                trainer::ops::use_composed_ops(false);
                println!(
                    "| llamafactory, composed candle ops | {} | {method} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | |",
                    c.name,
                    u.total,
                    u.forward,
                    u.backward,
                    u.optimizer,
                    tokens as f64 / u.total
                );
            }
            if let Some(e) = experts {
                anyhow::ensure!(e >= 2, "--experts needs at least 2 experts");
                // Both on the dense run's shape, batch, length, checkpointing and quantization.
                let moe = trainer::bench::TrainBenchConfig {
                    experts: Some(e),
                    ..c.clone()
                };
                let (m, _) = trainer::bench::train_steps(&moe, full, steps)?;
                // The same work done densely: every token through all the experts' MLPs.
                let wide = trainer::bench::TrainBenchConfig {
                    intermediate: c.intermediate * e,
                    ..c.clone()
                };
                let (w, _) = trainer::bench::train_steps(&wide, full, steps)?;
                println!(
                    "| llamafactory (candle), {e} experts, top 2 | {} | {method} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | |",
                    c.name, m.total, m.forward, m.backward, m.optimizer, tokens as f64 / m.total
                );
                println!(
                    "| llamafactory (candle), dense MLP {e}× as wide | {} | {method} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | |",
                    c.name, w.total, w.forward, w.backward, w.optimizer, tokens as f64 / w.total
                );
                println!(
                    "\nMoE step / dense step: {:.2}×; MoE step / every expert run densely: {:.2}× (top 2 of {e}: only the chosen experts run)\n",
                    m.total / t.total,
                    m.total / w.total
                );
            }
            if dpo {
                let (d, _) = trainer::bench::dpo_steps(&c, full, steps)?;
                println!(
                    "| llamafactory (candle), DPO on {} pairs | {} | {method} | {:.3} | {:.3} | {:.3} | {:.3} | | |",
                    c.batch, c.name, d.total, d.forward, d.backward, d.optimizer
                );
                println!(
                    "\nDPO step / SFT step: {:.2}× (two policy passes over chosen + rejected, plus a reference forward with the adapter off)\n",
                    d.total / t.total
                );
            }
            if seq.is_some() || batch.is_some() || quantization_bit.is_some() || experts.is_some() {
                println!("\n(PyTorch side not run: its script trains only the shape's own batch and sequence length, in full precision)");
            } else if torch_script.exists() {
                match run_torch(&python, &torch_script, &config, full, steps, threads) {
                    Ok((step, tps, torch_rss)) => {
                        println!(
                            "| PyTorch + PEFT | {} | {} | {step:.3} | | | | {tps:.0} | {:.2} |",
                            c.name,
                            if full { "full" } else { "LoRA" },
                            torch_rss as f64 / 1e9
                        );
                        println!();
                        println!(
                            "step time ratio (ours / PyTorch): {:.2}×; peak RSS ratio: {:.2}×",
                            t.total / step,
                            rss as f64 / torch_rss as f64
                        );
                    }
                    Err(e) => println!("\n(PyTorch side not run: {e:#})"),
                }
            } else {
                println!(
                    "\n(PyTorch side not run: {} not found)",
                    torch_script.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Data { n, model, template } => {
            let work = tempfile_dir()?;
            let model = match model {
                Some(m) => m,
                None => {
                    let m = work.join("demo-model");
                    trainer::demo::build_demo_model(
                        &m,
                        &PathBuf::from("data"),
                        &Default::default(),
                    )?;
                    m
                }
            };
            let rows = trainer::bench::data_pipeline(n, &model, &work, &template)?;
            println!("| stage | examples | seconds | examples/s |");
            println!("|---|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {} | {:.3} | {:.0} |",
                    r.stage,
                    r.examples,
                    r.seconds,
                    r.examples as f64 / r.seconds
                );
            }
            let _ = std::fs::remove_dir_all(&work);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("llamafactory-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs the PyTorch benchmark; returns its median step time, tokens/s and peak RSS.
fn run_torch(
    python: &str,
    script: &std::path::Path,
    config: &str,
    full: bool,
    steps: usize,
    threads: usize,
) -> Result<(f64, f64, u64)> {
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script).args([
        "--config",
        config,
        "--no-decode",
        "--steps",
        &steps.to_string(),
        "--threads",
        &threads.to_string(),
    ]);
    if full {
        cmd.arg("--full");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("failed")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT cfg="))
        .ok_or_else(|| anyhow::anyhow!("no RESULT line"))?;
    let field = |k: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(|v| v.trim_end_matches('s').parse().ok())?
    };
    let step = field("median_step=").ok_or_else(|| anyhow::anyhow!("no median_step"))?;
    let tps = field("tokens_per_s=").unwrap_or(0.0);
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    Ok((step, tps, usage.ru_maxrss as u64 * 1024))
}

fn device(
    config: &str,
    steps: usize,
    batch: Option<usize>,
    seq: Option<usize>,
    dtype: &str,
    peak_tflops: f64,
) -> Result<ExitCode> {
    use candle_core::DType;
    let dev = trainer::device::default_device();
    let dtype = match dtype {
        "bf16" => DType::BF16,
        "fp16" => DType::F16,
        "fp32" => DType::F32,
        other => anyhow::bail!("--dtype {other}: expected bf16, fp16 or fp32"),
    };
    println!("device: {}", trainer::device::describe(&dev));
    // candle's CPU matmul has f16 but no bf16 kernel.
    let half = if dev.is_cpu() {
        DType::F16
    } else {
        DType::BF16
    };
    println!("\n| dtype | max |Δ logit| | max |logit| (CPU f32) | loss CPU | loss device | worst LoRA grad rel. error |");
    println!("|---|---:|---:|---:|---:|---:|");
    for a in trainer::bench::device_agreement(&dev, &[DType::F32, half])? {
        println!(
            "| {:?} | {:.2e} | {:.3} | {:.5} | {:.5} | {:.2e} |",
            a.dtype, a.logits_max_diff, a.logits_max, a.loss_cpu, a.loss_device, a.grad_rel_err
        );
    }
    let mut c = trainer::bench::train_bench_config(config)?;
    c.device = dev.clone();
    c.dtype = dtype;
    if let Some(b) = batch {
        c.batch = b;
    }
    if let Some(s) = seq {
        c.set_seq(s)?;
    }
    let (t, tokens) = trainer::bench::train_steps(&c, false, steps)?;
    let tps = tokens as f64 / t.total;
    let mfu = tps * trainer::bench::train_flops_per_token(&c, false) / (peak_tflops * 1e12);
    println!("\n| config | dtype | batch × seq | step (s) | fwd | bwd | opt | tokens/s | MFU (peak {peak_tflops} TFLOPS) |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} LoRA r8 | {:?} | {} × {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} % |",
        c.name,
        dtype,
        c.batch,
        c.seq,
        t.total,
        t.forward,
        t.backward,
        t.optimizer,
        tps,
        mfu * 100.0
    );
    let (single, batched) = trainer::bench::decode_speed(&c, 8)?;
    println!("\ndecode (greedy, KV cache, 32-token prompt, 64 new): {single:.1} tokens/s at batch 1, {batched:.1} at batch 8");
    Ok(ExitCode::SUCCESS)
}

/// PyTorch's side of `bench gemm`: the same shapes, threads and timing rule.
const TORCH_GEMM: &str = r#"
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))

def gflops(a, b, flops, reps):
    best = 1e9
    for _ in range(int(sys.argv[3])):
        a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return flops / best / 1e9

for m, n, k, tr in json.loads(sys.argv[1]):
    a = torch.randn(m, k)
    b = torch.randn(n, k).t() if tr else torch.randn(k, n)
    flops = 2.0 * m * n * k
    reps = min(max(int(1e10 / flops), 3), 2000)
    print(gflops(a, b, flops, reps), gflops(a.bfloat16(), b.bfloat16(), flops, 4 * reps), flush=True)
"#;

fn gemm(python: Option<&str>, rounds: usize) -> Result<ExitCode> {
    use trainer::bench::{amx_gemm_gflops, gemm_gflops, gemm_shapes};
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{threads} threads; AVX-512F: {}; bf16 units: {}",
        if trainer::sysinfo::avx512f() {
            "yes"
        } else {
            "no"
        },
        trainer::sysinfo::bf16_units().describe()
    );
    let shapes = gemm_shapes();
    let ours = shapes
        .iter()
        .map(|s| gemm_gflops(s, rounds))
        .collect::<Result<Vec<f64>>>()?;
    let amx = shapes
        .iter()
        .map(|s| amx_gemm_gflops(s, rounds))
        .collect::<Result<Vec<Option<f64>>>>()?;
    // PyTorch's f32 and bf16 figures per shape.
    let torch: Option<Vec<(f64, f64)>> = python.and_then(|py| {
        let list: Vec<(usize, usize, usize, bool)> = shapes
            .iter()
            .map(|s| (s.m, s.n, s.k, s.transposed))
            .collect();
        let out = std::process::Command::new(py)
            .args(["-c", TORCH_GEMM])
            .arg(serde_json::to_string(&list).ok()?)
            .arg(threads.to_string())
            .arg(rounds.to_string())
            .output()
            .ok()?;
        let v: Vec<(f64, f64)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace().map(|x| x.parse::<f64>().ok());
                Some((it.next()??, it.next()??))
            })
            .collect();
        if v.len() != shapes.len() {
            let why = String::from_utf8_lossy(&out.stderr);
            eprintln!(
                "PyTorch side not run ({py}): {}",
                why.lines().last().unwrap_or("no output")
            );
            return None;
        }
        Some(v)
    });
    println!("\n| product | m × n × k | f32: candle (gemm crate) | PyTorch (MKL) | candle / PyTorch | bf16: ours (AMX tiles) | PyTorch | ours / PyTorch |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let gflops = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "–".into(),
    };
    for (i, s) in shapes.iter().enumerate() {
        let t = torch.as_ref().map(|t| t[i]);
        println!(
            "| {} | {} × {} × {} | {:.0} | {} | {} | {} | {} | {} |",
            s.what,
            s.m,
            s.n,
            s.k,
            ours[i],
            gflops(t.map(|t| t.0)),
            ratio(Some(ours[i]), t.map(|t| t.0)),
            gflops(amx[i]),
            gflops(t.map(|t| t.1)),
            ratio(amx[i], t.map(|t| t.1)),
        );
    }
    println!("\nGFLOP/s, best of {rounds} rounds each. bf16: operands rounded to bf16, products summed in f32; ours packs the weight operand once, as it does for a frozen weight.");
    if amx.iter().all(Option::is_none) {
        println!("This CPU (or OS) offers no AMX-BF16 tiles: no bf16 column of ours.");
    }
    if python.is_none() {
        println!("PyTorch's side: add --python PY (a Python with torch).");
    }
    Ok(ExitCode::SUCCESS)
}
