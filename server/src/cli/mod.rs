//! Command-line interface; subcommand names follow `llamafactory-cli`.

mod api;
mod bench;
mod bench_e2e;
mod bench_server;
mod chat;
mod demo;
mod env;
mod expand;
mod export;
mod launch;
mod loftq;
mod preview;
mod train;
mod webui;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llamafactory",
    version,
    about = "Fine-tune LLMs with LLaMA-Factory configs, natively"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start LlamaBoard, the web UI (and its REST + WebSocket API).
    Webui(webui::WebuiCmd),
    /// Train from a LLaMA-Factory YAML (`key=value` overrides after the file).
    Train(train::TrainCmd),
    /// Serve a model through an OpenAI-compatible API.
    Api(api::ApiCmd),
    /// Chat with a model (and adapters) in the terminal.
    Chat(chat::ChatCmd),
    /// Merge adapters and export a Hugging Face model folder with an Ollama Modelfile.
    Export(export::ExportCmd),
    /// Print the processed training examples of a config, exactly as training would see them.
    PreviewData(preview::PreviewArgs),
    /// LLaMA Pro block expansion: insert zero-output copies of layers, to train them with
    /// `use_llama_pro: true` (LLaMA-Factory's scripts/llama_pro.py).
    ExpandModel(expand::ExpandCmd),
    /// LoftQ: quantized base plus the LoRA adapter that makes up for the quantization, as a
    /// QLoRA starting point (LLaMA-Factory's scripts/loftq_init.py).
    LoftqInit(loftq::LoftqCmd),
    /// Build the tiny demo model (random init) and its tokenizer in Hugging Face layout.
    Demo {
        /// Output folder.
        #[arg(long, default_value = "models/demo")]
        out: PathBuf,
        /// Dataset dir whose demo data trains the tokenizer.
        #[arg(long, default_value = "data")]
        dataset_dir: PathBuf,
        /// Build the demo vision-language model (a tiny Qwen2-VL) from the demo model in this
        /// folder (its tokenizer plus the vision tokens) instead.
        #[arg(long, value_name = "DEMO_MODEL")]
        vision_from: Option<PathBuf>,
    },
    /// Print versions, device, threads and data/model dirs.
    Env,
    /// Run a benchmark and print a table.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print the version.
    Version,
}

/// Training allocates and frees the same large activation buffers every step. mimalloc's
/// default hands freed pages back to the OS after 10 ms, so each step faulted them in again,
/// zeroed by the kernel (15–20 % of a LoRA step in `clear_page`). Training and benchmark
/// processes keep them; the long-lived server keeps the default.
fn keep_freed_pages() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); -1 = never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a process-wide allocator option; mimalloc allows it at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// mimalloc asks for transparent huge pages on its 1 GiB arenas (`MADV_HUGEPAGE`), so with
/// the kernel's usual `defrag=madvise` every first touch of 2 MB waits for the kernel to find
/// (compact, if need be) and zero a huge page. On a VM whose host has reclaimed the guest's
/// free memory that ran at ~100 MB/s: a 135M LoRA run's first steps, growing to 1.6 GB, took
/// 10 s longer than in a run right after another (16 steps: 20 s against 9.3 s), where with
/// 4 KiB pages both take 9.2–9.5 s. PyTorch's allocator (glibc) makes no such request. The
/// flag holds for the process's later faults, whatever was advised before, and for the
/// processes it starts.
fn no_huge_page_faults() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// candle runs large elementwise ops on its own thread pool, whose workers spin after each op
/// waiting for the next; with few cores they take those cores from the GEMM threads (16 % of a
/// smol LoRA step was that spinning on 2 cores). Our fused kernels and GEMM use rayon, so on
/// small machines candle's pool is left single-threaded unless the user chose otherwise.
fn quiet_elementwise_pool() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores <= 4 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Still single-threaded here: no other thread reads the environment yet.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Train(_) | Command::Bench(_)) {
        keep_freed_pages();
        no_huge_page_faults();
        quiet_elementwise_pool();
        return on_compute_pool(move || dispatch(cli.command));
    }
    dispatch(cli.command)
}

/// Runs `f` on a worker of a rayon pool instead of the main thread. Every GEMM and fused
/// kernel fans out over rayon; called from outside the pool, each one also parked the caller on
/// a futex and woke it at the end (thousands of context switches per step). From inside, the
/// caller takes a share of the work itself.
fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // candle's backward walks the graph recursively: a deep model needs more than the 2 MiB
    // that threads get by default (the main thread has 8 MiB).
    match rayon::ThreadPoolBuilder::new()
        .stack_size(256 << 20)
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Webui(a) => webui::run(a),
        Command::Train(a) => train::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Api(a) => api::run(a),
        Command::Export(a) => export::run(a),
        Command::PreviewData(a) => preview::run(a),
        Command::ExpandModel(a) => expand::run(a),
        Command::LoftqInit(a) => loftq::run(a),
        Command::Demo {
            out,
            dataset_dir,
            vision_from,
        } => demo::run(&out, &dataset_dir, vision_from.as_deref()),
        Command::Env => env::run(),
        Command::Bench(b) => bench::run(b),
        Command::Version => {
            println!("llamafactory {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}
