//! `llamafactory demo`: builds the small demo model (and its tokenizer) from the demo data.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

pub fn run(out: &Path, dataset_dir: &Path) -> Result<ExitCode> {
    let summary =
        trainer::demo::build_demo_model(out, dataset_dir, &trainer::demo::DemoConfig::default())?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
