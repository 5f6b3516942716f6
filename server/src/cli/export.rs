use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ExportCmd {
    /// LLaMA-Factory merge/export YAML (`model_name_or_path`, `adapter_name_or_path`, `export_dir`, ...).
    config: PathBuf,
    /// `key=value` overrides, applied after the file.
    overrides: Vec<String>,
}

pub fn run(cmd: ExportCmd) -> Result<ExitCode> {
    let (args, warnings) = trainer::config::load_args(&cmd.config, &cmd.overrides)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    for f in trainer::export::export_model(&args)? {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
