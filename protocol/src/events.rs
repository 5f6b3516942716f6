//! What a worker (`llamafactory train --events json`) prints: one JSON object per line, tagged by
//! `event`. The server parses these into SQLite rows and WebSocket messages.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Started {
        total_steps: u64,
        num_examples: u64,
        skipped_examples: u64,
    },
    Step(StepMetrics),
    /// Progress of work without a loss (prediction, export).
    Progress {
        step: u64,
        total: u64,
        elapsed_s: f64,
        eta_s: f64,
    },
    Eval {
        step: u64,
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        metrics: serde_json::Map<String, serde_json::Value>,
    },
    Checkpoint {
        step: u64,
        path: String,
    },
    Log {
        level: String,
        message: String,
    },
    Finished {
        step: u64,
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        metrics: serde_json::Map<String, serde_json::Value>,
    },
    Aborted {
        step: u64,
        checkpoint: Option<String>,
    },
    Failed {
        step: Option<u64>,
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepMetrics {
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f64,
    pub epoch: f64,
    pub grad_norm: Option<f64>,
    pub tokens_per_sec: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
    /// Stage-specific values under their TRL names (`rewards/accuracies`, `rewards/margins`, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_json_lines() {
        let e = WorkerEvent::Log {
            level: "warn".into(),
            message: "x".into(),
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(line, r#"{"event":"log","level":"warn","message":"x"}"#);
        assert_eq!(serde_json::from_str::<WorkerEvent>(&line).unwrap(), e);
    }
}
