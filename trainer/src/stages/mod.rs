//! The losses of the training stages beyond causal-LM cross-entropy, as pure math over tensors
//! and vectors (no model, no data): the DPO family, KTO and the pairwise reward loss
//! (`preference`), and PPO's rewards, advantages and clipped loss (`ppo`).

pub mod ppo;
pub mod preference;
