//! `llamafactory expand-model`: LLaMA Pro's block expansion, with the arguments of
//! LLaMA-Factory's `scripts/llama_pro.py`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct ExpandCmd {
    /// The model to expand (a Hugging Face folder or a cached hub id).
    #[arg(long)]
    model_name_or_path: String,
    /// Where the expanded model goes.
    #[arg(long)]
    output_dir: PathBuf,
    /// Blocks to insert (the layer count must be divisible by it).
    #[arg(long)]
    num_expand: usize,
    /// Largest weight shard, e.g. `2GB`, `500MB`.
    #[arg(long, default_value = "2GB")]
    shard_size: String,
}

/// `2GB`, `500MB`, `100KB` or a number of bytes (decimal units, as transformers reads them).
fn bytes(size: &str) -> Result<u64> {
    let s = size.trim().to_ascii_uppercase();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s.as_str(), "B"),
    };
    let mult = match unit {
        "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => bail!("--shard-size {size}: use a size such as 2GB or 500MB"),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n > 0.0 => Ok((n * mult as f64) as u64),
        _ => bail!("--shard-size {size}: use a size such as 2GB or 500MB"),
    }
}

pub fn run(cmd: ExpandCmd) -> Result<ExitCode> {
    let src = trainer::hub::resolve_model_dir(&cmd.model_name_or_path, "main")?;
    let done = trainer::model::expand::expand_model(
        &src,
        &cmd.output_dir,
        cmd.num_expand,
        bytes(&cmd.shard_size)?,
    )?;
    for (new, (old, inserted)) in done.layers.iter().enumerate() {
        if *inserted {
            println!("Add layer {new} expanded from layer {old}.");
        }
    }
    for f in &done.files {
        println!("{}", f.display());
    }
    println!("- Fine-tune this model with:");
    println!("model_name_or_path: {}", cmd.output_dir.display());
    println!("finetuning_type: freeze");
    println!("freeze_trainable_layers: {}", cmd.num_expand);
    println!("use_llama_pro: true");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shard_sizes_read_like_transformers() {
        assert_eq!(super::bytes("2GB").unwrap(), 2_000_000_000);
        assert_eq!(super::bytes("500mb").unwrap(), 500_000_000);
        assert!(super::bytes("lots").is_err());
    }
}
