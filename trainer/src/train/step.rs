//! What an optimizer step takes (the step, its learning rate, its examples) and what a step or
//! an evaluation reports, whatever the stage.

use protocol::TrainArgs;
use serde_json::{Map, Value};

use super::batch::Examples;

/// What the step being taken needs to know.
pub(crate) struct StepInput<'a> {
    pub args: &'a TrainArgs,
    /// 1-based.
    pub step: usize,
    pub lr: f64,
    pub examples: &'a Examples,
    /// Example indices of each micro-batch.
    /// Example indices of each global micro-batch (all ranks' examples); each rank trains on
    /// its shard.
    pub micro: &'a [Vec<usize>],
    pub pad: u32,
    /// The ranks sharing the step.
    pub world: &'a crate::dist::World,
}

/// What one optimizer step reports.
pub(crate) struct StepOutput {
    pub loss: f64,
    pub grad_norm: f64,
    /// Tokens the step trained on (PPO: queries and sampled responses).
    pub tokens: u64,
    /// Stage metrics, one entry per micro-step; the log averages them.
    pub metrics: Vec<(String, f64)>,
    /// Whether an optimizer update landed during this step. A non-finite loss stops a step
    /// before its update, but PPO's step runs several and may have taken some already.
    pub updated: bool,
}

/// An evaluation over held-out examples: the mean loss and the stage's metrics under `eval_`
/// names (RM: `eval_accuracy`; DPO: TRL's `eval_rewards/*`, `eval_logps/*`; KTO: `eval_kl`,
/// `eval_rewards/*`).
pub(crate) struct EvalOutput {
    pub loss: f64,
    pub metrics: Map<String, Value>,
}
