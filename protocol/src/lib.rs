//! Types that cross process and network boundaries: the run arguments (LLaMA-Factory's flat
//! argument namespace, the same keys as the training YAML) and their closed choices, the worker's
//! progress events and the web server's API types.

pub mod args;
pub mod events;
pub mod options;
pub mod run;

pub use args::TrainArgs;
pub use events::WorkerEvent;
