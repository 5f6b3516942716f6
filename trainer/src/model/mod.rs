//! The decoder in candle (the Llama, Gemma, Phi-3, GLM and MoE families), built only from
//! differentiable ops (or CustomOps with a backward), its parts (`layers`, the MLPs and experts
//! in `mlp`), batches (`batch`), LoRA / DoRA adapters in PEFT's format and
//! the freeze / full methods (`adapter`), the value head of reward models and PPO
//! (`value_head`), and reading configs and weights.

pub mod adapter;
pub mod batch;
pub mod config;
pub mod depths;
pub mod expand;
pub mod gguf;
pub mod layers;
pub mod linalg;
mod llama;
pub mod loftq;
pub mod mlp;
pub mod pissa;
pub mod quant;
pub mod value_head;
pub mod vision;
pub mod weights;

pub use batch::{shifted_targets, Batch, RowRef, VisionBatch};
pub use config::ModelConfig;
pub use layers::{
    log_softmax, softmax, DecoderLayer, KvCache, Linear, LinearWeight, LoraLayer, Param, Weights,
};
pub(crate) use llama::unit_rows;
pub use llama::{Model, TargetLogits};
