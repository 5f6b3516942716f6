//! `llamafactory demo`: builds the small demo model (and its tokenizer) from the demo data, or
//! (`--vision-from`) the demo vision-language model from it.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

pub fn run(out: &Path, dataset_dir: &Path, vision_from: Option<&Path>) -> Result<ExitCode> {
    let cfg = trainer::demo::DemoConfig::default();
    let summary = match vision_from {
        Some(text) => trainer::demo::build_demo_vl_model(text, out, &cfg)?,
        None => trainer::demo::build_demo_model(out, dataset_dir, &cfg)?,
    };
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
