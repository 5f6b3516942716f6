//! One loaded model on its own thread; requests wait in a queue (never dropped) and stream
//! their text back through a channel.

use std::sync::mpsc;
use std::thread;

use anyhow::Result;
use tokio::sync::mpsc as tmpsc;
use trainer::data::converter::Message;
use trainer::infer::{ChatModel, FinishReason, GenerationConfig};

pub struct Job {
    pub messages: Vec<Message>,
    /// Images for the `<image>` placeholders of the messages (a vision-language model).
    pub images: Vec<trainer::vision::RgbImage>,
    pub system: String,
    pub tools: String,
    pub gen: GenerationConfig,
    pub stop: Vec<String>,
    pub out: tmpsc::UnboundedSender<Chunk>,
}

pub enum Chunk {
    Text(String),
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish: &'static str,
    },
    Error(String),
}

#[derive(Clone)]
pub struct ModelWorker {
    tx: mpsc::Sender<Job>,
    pub model_name: String,
    pub defaults: GenerationConfig,
}

impl ModelWorker {
    pub fn start(chat: ChatModel) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let model_name = chat.name.clone();
        let defaults = chat.gen.clone();
        thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                for job in rx {
                    serve(&chat, job);
                }
            })
            .expect("spawn model thread");
        Self {
            tx,
            model_name,
            defaults,
        }
    }

    pub fn submit(&self, job: Job) -> Result<()> {
        self.tx
            .send(job)
            .map_err(|_| anyhow::anyhow!("the model thread has stopped"))
    }
}

/// Where the earliest stop string starts in `text`, if any.
fn stop_at(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

fn serve(chat: &ChatModel, job: Job) {
    let mut text = String::new();
    let mut sent = 0usize;
    let mut stopped = false;
    let result = chat.chat_with_images(
        &job.messages,
        &job.images,
        &job.system,
        &job.tools,
        &job.gen,
        |delta| {
            text.push_str(delta);
            let end = match stop_at(&text, &job.stop) {
                Some(i) => {
                    stopped = true;
                    i
                }
                // Hold back a tail that could still become a stop string.
                None => {
                    let hold = job
                        .stop
                        .iter()
                        .map(|s| s.len().saturating_sub(1))
                        .max()
                        .unwrap_or(0);
                    let mut e = text.len().saturating_sub(hold);
                    while !text.is_char_boundary(e) {
                        e -= 1;
                    }
                    e
                }
            };
            if end > sent {
                if job
                    .out
                    .send(Chunk::Text(text[sent..end].to_string()))
                    .is_err()
                {
                    return false; // client went away
                }
                sent = end;
            }
            !stopped
        },
    );
    match result {
        Ok(reply) => {
            if !stopped && text.len() > sent {
                let _ = job.out.send(Chunk::Text(text[sent..].to_string()));
            }
            let finish = match reply.finish {
                FinishReason::Length => "length",
                _ => "stop",
            };
            let _ = job.out.send(Chunk::Done {
                prompt_tokens: reply.prompt_tokens,
                completion_tokens: reply.completion_tokens,
                finish,
            });
        }
        Err(e) => {
            let _ = job.out.send(Chunk::Error(format!("{e:#}")));
        }
    }
}
