//! `llamafactory train`: SFT and pre-training with LoRA, freeze or full fine-tuning, from
//! LLaMA-Factory's arguments, writing LLaMA-Factory's output files.

pub mod checkpoint;
pub mod optim;
pub mod report;
pub mod schedule;
mod session;

pub use session::{run_training, Outcome, TrainOptions};
