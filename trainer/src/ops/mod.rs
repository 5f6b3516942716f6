//! CustomOps with hand-written backward passes for the training hot path.

mod frozen_linear;

pub use frozen_linear::frozen_linear;
