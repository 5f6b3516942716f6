//! `llamafactory env`: the version and platform lines users paste into bug reports.

use std::process::ExitCode;

use anyhow::Result;

pub fn run() -> Result<ExitCode> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cwd = std::env::current_dir()?;
    println!("- `llamafactory` version: {}", env!("CARGO_PKG_VERSION"));
    println!(
        "- Platform: {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let device = trainer::device::default_device();
    let built = if cfg!(feature = "cuda") {
        "built with CUDA support"
    } else if cfg!(feature = "metal") {
        "built with Metal support"
    } else {
        "GPU support is built with `--features cuda` or `--features metal`"
    };
    println!("- Device: {} ({built})", trainer::device::describe(&device));
    println!("- CPU threads: {threads}");
    println!("- CPU bf16: {}", trainer::sysinfo::bf16_units().describe());
    if let Ok(t) = std::env::var("RAYON_NUM_THREADS") {
        println!("- RAYON_NUM_THREADS: {t}");
    }
    println!("- Work dir: {}", cwd.display());
    println!(
        "- Dataset dir (default `dataset_dir`): {}",
        cwd.join("data").display()
    );
    match trainer::hub::hub_cache_dir() {
        Some(p) => println!(
            "- Hugging Face cache: {}{}",
            p.display(),
            if p.is_dir() { "" } else { " (not present)" }
        ),
        None => println!("- Hugging Face cache: unknown (no HOME)"),
    }
    Ok(ExitCode::SUCCESS)
}
