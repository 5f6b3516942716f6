//! Training objectives beyond causal-LM cross-entropy.

pub mod preference;
pub mod reward;
