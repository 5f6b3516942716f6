//! The engine behind `llamafactory`: configs, datasets, templates and processors, the model and
//! its adapters, training (SFT, pre-training, RM, DPO, KTO, PPO), generation, prediction,
//! export, benchmarks and the demo model.

pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod dist;
pub mod export;
pub mod files;
pub mod hub;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod plot;
pub mod predict;
pub mod stages;
pub mod sysinfo;
pub mod tokenizer;
pub mod train;
pub mod vision;
