//! The Llama-family decoder in candle, built only from differentiable ops, with LoRA / DoRA
//! layers and PEFT-compatible adapter files.

pub mod adapter;
pub mod config;
mod llama;
pub mod weights;

pub use config::ModelConfig;
pub use llama::{
    log_softmax, softmax, Batch, KvCache, LoraLayer, Model, Param, RowRef, TargetLogits,
};
