//! `llamafactory loftq-init`: a LoftQ starting point for QLoRA, with the arguments of
//! LLaMA-Factory's `scripts/loftq_init.py`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct LoftqCmd {
    /// The model (a Hugging Face folder or a cached hub id).
    #[arg(long)]
    model_name_or_path: String,
    /// Where the quantization-ready base goes (the adapter goes to `loftq_init/` inside).
    #[arg(long)]
    output_dir: PathBuf,
    /// Bits of the quantization LoftQ prepares for (2, 4 or 8).
    #[arg(long, default_value_t = 4)]
    loftq_bits: u32,
    /// Alternating quantization / SVD rounds.
    #[arg(long, default_value_t = 4)]
    loftq_iter: usize,
    /// LoRA alpha (default: twice the rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Module kinds, comma-separated, or `all`.
    #[arg(long, default_value = "q_proj,v_proj")]
    lora_target: String,
}

pub fn run(cmd: LoftqCmd) -> Result<ExitCode> {
    let src = trainer::hub::resolve_model_dir(&cmd.model_name_or_path, "main")?;
    println!("Initializing LoftQ weights, it may take several minutes, wait patiently.");
    let args = trainer::model::loftq::LoftqArgs {
        bits: cmd.loftq_bits,
        iters: cmd.loftq_iter,
        rank: cmd.lora_rank,
        alpha: cmd.lora_alpha,
        dropout: cmd.lora_dropout,
        targets: protocol::TrainArgs::split_list(Some(&cmd.lora_target)),
    };
    let files = trainer::model::loftq::loftq_init_model(&src, &cmd.output_dir, &args)?;
    for f in &files {
        println!("{}", f.display());
    }
    let dir = cmd.output_dir.display();
    println!("- Fine-tune this model with:");
    println!("model_name_or_path: {dir}");
    println!("adapter_name_or_path: {dir}/loftq_init");
    println!("finetuning_type: lora");
    println!("quantization_bit: {}", cmd.loftq_bits);
    Ok(ExitCode::SUCCESS)
}
