//! `llamafactory train`: every stage (pre-training, SFT, reward modelling, DPO, KTO, PPO) with
//! LoRA, freeze or full fine-tuning, from LLaMA-Factory's arguments, writing LLaMA-Factory's
//! output files; then prediction or evaluation with the result when asked.
//!
//! `job` runs a config (train, then predict or evaluate). The training loop (`session`) reads
//! top to bottom; each of its parts has a module: `setup` (resume, model, method, optimizer),
//! `plan` (steps, data order, learning rate, when to evaluate and save), `batch` (examples and
//! batches), `objective` (the stage's step and evaluation, reporting through `step`'s types),
//! `log` (LLaMA-Factory's log and results files), `checkpoint` (saving and restoring).

pub mod badam;
pub mod badam_ratio;
mod batch;
pub mod checkpoint;
pub mod galore;
mod job;
pub mod log;
pub mod memory;
pub mod mlflow;
mod model_card;
pub mod objective;
pub mod optim;
mod plan;
pub mod report;
mod reward_predict;
pub mod schedule;
mod session;
mod setup;
mod step;
pub mod tensorboard;
pub mod wandb;

pub use job::run_job;
pub use session::run_training;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde_json::{Map, Value};

pub struct TrainOptions {
    pub dtype: DType,
    pub device: Device,
    /// Set by SIGINT/SIGTERM: finish the step, save, stop.
    pub stop: Arc<AtomicBool>,
    /// The ranks of a data-parallel run (one process by default).
    pub world: crate::dist::World,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            stop: Arc::new(AtomicBool::new(false)),
            world: crate::dist::World::single(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the metrics for the `finished` event.
    Finished(Map<String, Value>),
    Aborted,
    /// Training stopped on a problem after it started.
    Failed(String),
}
