//! Types that cross process and network boundaries: the run arguments (LLaMA-Factory's flat
//! argument namespace, the same keys as the training YAML) and the worker's progress events.

pub mod args;
pub mod events;

pub use args::TrainArgs;
pub use events::WorkerEvent;
