//! Training objectives beyond causal-LM cross-entropy.

pub mod ppo;
pub mod preference;
pub mod reward;
