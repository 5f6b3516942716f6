//! `llamafactory webui`: the LlamaBoard server.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::db::Db;
use crate::runs::{Manager, ManagerConfig};
use crate::web::{self, App, WebConfig};
use crate::workdir_lock::WorkdirLock;

#[derive(Args)]
pub struct WebuiCmd {
    /// Address to listen on; anything but loopback requires the access token printed at start.
    #[arg(long, env = "GRADIO_SERVER_NAME", default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, env = "GRADIO_SERVER_PORT", default_value_t = 7860)]
    port: u16,
    /// Holds `saves/`, `models/`, `data/`, `logs/` and the database `llamaboard.db`.
    #[arg(long, default_value = ".")]
    workdir: PathBuf,
    /// Worker processes that may run at once; more queue.
    #[arg(long, default_value_t = 1)]
    max_jobs: usize,
    /// Seconds an aborted worker has to save a checkpoint before it is killed.
    #[arg(long, default_value_t = 30)]
    grace_secs: u64,
    /// Serve the browser bundle (`pkg/frontend.js`, `pkg/frontend_bg.wasm`) from this folder
    /// instead of the copy built into the binary (for working on the frontend).
    #[arg(long, env = "LLAMAFACTORY_SITE_ROOT")]
    site_root: Option<PathBuf>,
}

/// The demo datasets, built into the binary so a fresh work dir has something to train on.
const DEMO_DATA: &[(&str, &str)] = &[
    (
        "dataset_info.json",
        include_str!("../../../data/dataset_info.json"),
    ),
    ("demo_sft.json", include_str!("../../../data/demo_sft.json")),
    (
        "demo_chat.json",
        include_str!("../../../data/demo_chat.json"),
    ),
    ("demo_dpo.json", include_str!("../../../data/demo_dpo.json")),
    ("demo_kto.json", include_str!("../../../data/demo_kto.json")),
    ("demo_pt.txt", include_str!("../../../data/demo_pt.txt")),
];

fn ensure_demo(workdir: &Path) -> Result<()> {
    let data = workdir.join("data");
    if !data.join("dataset_info.json").exists() {
        std::fs::create_dir_all(&data)
            .with_context(|| format!("cannot create {}", data.display()))?;
        for (name, text) in DEMO_DATA {
            std::fs::write(data.join(name), text)
                .with_context(|| format!("cannot write {}", data.join(name).display()))?;
        }
        println!("wrote the demo datasets to {}", data.display());
    }
    if web::has_models(workdir) {
        return Ok(());
    }
    let out = workdir.join("models").join("demo");
    println!(
        "no model found: building the demo model in {} ...",
        out.display()
    );
    // In a child process, so the tokenizer training's memory never stays with the server.
    let status = std::process::Command::new(std::env::current_exe()?)
        .arg("demo")
        .arg("--out")
        .arg(&out)
        .arg("--dataset-dir")
        .arg(&data)
        .status()
        .context("cannot start the demo model build")?;
    if !status.success() {
        anyhow::bail!("building the demo model in {} failed", out.display());
    }
    // And the vision-language demo (image chat and multimodal training out of the box).
    let vl = workdir.join("models").join("demo-vl");
    let status = std::process::Command::new(std::env::current_exe()?)
        .arg("demo")
        .arg("--vision-from")
        .arg(&out)
        .arg("--out")
        .arg(&vl)
        .status()
        .context("cannot start the demo vision model build")?;
    if !status.success() {
        anyhow::bail!(
            "building the demo vision-language model in {} failed",
            vl.display()
        );
    }
    Ok(())
}

/// Where the browser bundle comes from: a folder given with `--site-root`, else the one
/// embedded at build time; `None` when neither exists (the page then renders but stays static).
fn site_root(given: Option<PathBuf>) -> Result<Option<PathBuf>> {
    match given {
        Some(p) if p.join("pkg").join("frontend.js").is_file() => Ok(Some(p)),
        Some(p) => anyhow::bail!(
            "--site-root {}: no pkg/frontend.js there; build it with `scripts/build-web.sh`",
            p.display()
        ),
        None => {
            if !web::bundle_embedded() {
                eprintln!(
                    "warning: this binary was built without the browser bundle (run `scripts/build-web.sh` before building it); the page renders, but stays static"
                );
            }
            Ok(None)
        }
    }
}

pub fn run(cmd: WebuiCmd) -> Result<ExitCode> {
    std::fs::create_dir_all(&cmd.workdir)
        .with_context(|| format!("cannot create the work dir {}", cmd.workdir.display()))?;
    let workdir = cmd.workdir.canonicalize()?;
    // Before anything touches the work dir: a second server would mark the first one's live
    // runs interrupted.
    let mut lock = WorkdirLock::acquire(&workdir)?;
    ensure_demo(&workdir)?;
    let site_root = site_root(cmd.site_root)?;
    let addr = SocketAddr::new(cmd.host, cmd.port);
    let token = (!cmd.host.is_loopback()).then(|| {
        std::env::var("LLAMAFACTORY_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(random_token)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {addr}: {e} (is another server using the port? try --port)"
            )
        })?;
        let addr = listener.local_addr()?;
        lock.describe(&format!("pid {}, http://{addr}", std::process::id()))?;
        let db = Db::open(&workdir.join("llamaboard.db")).await?;
        let manager = Manager::start(
            db,
            ManagerConfig {
                exe: std::env::current_exe()?,
                workdir: workdir.clone(),
                max_jobs: cmd.max_jobs,
                grace: Duration::from_secs(cmd.grace_secs),
            },
        )
        .await?;
        let app = Arc::new(App {
            manager,
            chat: Default::default(),
            cfg: WebConfig {
                workdir: workdir.clone(),
                addr,
                token: token.clone(),
                site_root,
            },
            stopping: tokio::sync::watch::channel(false).0,
        });
        let shown = if cmd.host.is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            cmd.host.to_string()
        };
        let port = addr.port();
        match &token {
            Some(t) => println!(
                "Visit http://{shown}:{port}/?token={t} for Web UI (work dir {})",
                workdir.display()
            ),
            None => println!(
                "Visit http://{shown}:{port} for Web UI (work dir {})",
                workdir.display()
            ),
        }
        web::serve(app, listener).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn random_token() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..32)
        .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
        .collect()
}
