//! `llamafactory chat`: an interactive chat with a model (and adapters) in the terminal.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use trainer::data::converter::{Message, Role};
use trainer::infer::ChatModel;

#[derive(Args)]
pub struct ChatCmd {
    /// LLaMA-Factory inference YAML (`model_name_or_path`, `adapter_name_or_path`, `template`, ...).
    config: PathBuf,
    /// `key=value` overrides, applied after the file.
    overrides: Vec<String>,
    /// An image the conversation is about (repeatable; a vision-language model such as Qwen2-VL or LLaVA):
    /// each `<image>` of your messages takes the next one, or they all go before your first.
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
}

/// LLaMA-Factory's terminal chat: `User:` / `Assistant:`, streamed; `clear` and `exit`.
pub fn run(cmd: ChatCmd) -> Result<ExitCode> {
    let (args, warnings) = trainer::config::load_args(&cmd.config, &cmd.overrides)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let chat = ChatModel::load(&args, &trainer::device::default_device())?;
    let images = cmd
        .images
        .iter()
        .map(|p| trainer::vision::decode::load(p))
        .collect::<Result<Vec<_>>>()?;
    if !images.is_empty() && !chat.takes_images() {
        anyhow::bail!(
            "--image: {} does not take images (template `{}`); use a vision-language model such as Qwen2-VL or LLaVA with its template",
            chat.name,
            chat.template.name
        );
    }
    let system = args.default_system.clone().unwrap_or_default();
    println!("Welcome to the CLI application, use `clear` to remove the history, use `exit` to exit the application.");
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("\nUser: ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next() else { break };
        let query = line?;
        match query.trim() {
            "exit" => break,
            "clear" => {
                history.clear();
                println!("History has been removed.");
                continue;
            }
            "" => continue,
            _ => {}
        }
        history.push(Message::new(Role::User, query));
        print!("Assistant: ");
        std::io::stdout().flush()?;
        let reply = chat.chat_with_images(&history, &images, &system, "", &chat.gen, |delta| {
            print!("{delta}");
            std::io::stdout().flush().is_ok()
        })?;
        println!();
        history.push(Message::new(Role::Assistant, reply.text));
    }
    Ok(ExitCode::SUCCESS)
}
