//! `llamafactory`: one binary for the CLI, the trainer worker and the web UI.

// The page's view types nest deeply.
#![recursion_limit = "256"]

mod api;
mod cli;
mod db;
mod runs;
mod web;

// Tokenization and autograd allocate many small buffers; mimalloc halves the time glibc spends there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
