//! Everything about models and data: configs, datasets, templates, processors, the demo model.

pub mod bench;
pub mod config;
pub mod data;
pub mod demo;
pub mod device;
pub mod export;
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
