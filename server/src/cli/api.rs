//! `llamafactory api`: an OpenAI-compatible chat completions server for a model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct ApiCmd {
    /// LLaMA-Factory inference YAML.
    config: PathBuf,
    /// `key=value` overrides, applied after the file.
    overrides: Vec<String>,
    /// Address to bind (`API_HOST`); anything but loopback needs `API_KEY`.
    #[arg(long, env = "API_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "API_PORT", default_value_t = 8000)]
    port: u16,
}

pub fn run(cmd: ApiCmd) -> Result<ExitCode> {
    let (args, warnings) = trainer::config::load_args(&cmd.config, &cmd.overrides)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let api_key = std::env::var("API_KEY").ok().filter(|k| !k.is_empty());
    let addr: SocketAddr = format!("{}:{}", cmd.host, cmd.port).parse()?;
    if !addr.ip().is_loopback() && api_key.is_none() {
        bail!("binding {} exposes the model to the network: set API_KEY so requests must carry `Authorization: Bearer <key>`", addr.ip());
    }
    let chat = trainer::infer::ChatModel::load(&args, &trainer::device::default_device())?;
    let worker = crate::api::ModelWorker::start(chat);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::api::serve(worker, addr, api_key))?;
    Ok(ExitCode::SUCCESS)
}
