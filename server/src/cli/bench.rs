use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
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
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    match cmd {
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
