//! What the server's REST and WebSocket API speaks: runs, their metric points and event stream,
//! the catalog (models, datasets, templates), chat and errors. The browser uses the same types.

use serde::{Deserialize, Serialize};

macro_rules! wire {
    ($item:item) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        $item
    };
}

wire! {
    #[serde(rename_all = "snake_case")]
    pub enum RunKind {
        Train,
        Predict,
        Export,
    }
}

impl RunKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunKind::Train => "train",
            RunKind::Predict => "predict",
            RunKind::Export => "export",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "train" => RunKind::Train,
            "predict" => RunKind::Predict,
            "export" => RunKind::Export,
            _ => return None,
        })
    }
}

wire! {
    #[derive(Copy, Eq)]
    #[serde(rename_all = "snake_case")]
    pub enum RunStatus {
        Queued,
        Running,
        Succeeded,
        Failed,
        Aborted,
        Interrupted,
    }
}

impl RunStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Aborted => "aborted",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "aborted" => RunStatus::Aborted,
            "interrupted" => RunStatus::Interrupted,
            _ => return None,
        })
    }

    /// The states no worker is or will be attached to.
    pub const STOPPED: [RunStatus; 4] = [
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Aborted,
        RunStatus::Interrupted,
    ];

    /// No worker is or will be attached to a run in this state.
    pub fn is_final(&self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

wire! {
    /// One run as the registry knows it.
    pub struct Run {
        pub id: i64,
        pub kind: RunKind,
        pub status: RunStatus,
        pub model: String,
        pub dataset: String,
        pub output_dir: String,
        /// The run's arguments, LLaMA-Factory keys with non-default values only.
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        pub config: serde_json::Map<String, serde_json::Value>,
        /// Unix seconds.
        pub created_at: f64,
        pub started_at: Option<f64>,
        pub finished_at: Option<f64>,
        pub exit_code: Option<i64>,
        /// The reason of a failure and the tail of the worker's log.
        pub error: Option<String>,
        pub step: u64,
        pub total_steps: u64,
        pub final_loss: Option<f64>,
        /// Place in the queue (1 = next), while queued.
        pub queue_position: Option<u64>,
        /// Final metrics of the worker (`train_loss`, `predict_bleu-4`, written files, ...).
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        pub result: serde_json::Map<String, serde_json::Value>,
    }
}

wire! {
    /// One point of a run's curve; train and eval values of the same step share a point.
    #[derive(Default)]
    pub struct MetricPoint {
        pub step: u64,
        pub loss: Option<f64>,
        pub eval_loss: Option<f64>,
        pub lr: Option<f64>,
        pub epoch: Option<f64>,
        pub grad_norm: Option<f64>,
        pub tokens_per_sec: Option<f64>,
        pub elapsed_s: Option<f64>,
        pub eta_s: Option<f64>,
        pub total: Option<u64>,
        /// Stage-specific values (`rewards/accuracies`, `eval_accuracy`, ...).
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        pub extra: serde_json::Map<String, serde_json::Value>,
    }
}

wire! {
    /// What `/api/runs/{id}/events` sends, in order, each with a sequence number unique in its run.
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum RunEvent {
        Status {
            status: RunStatus,
            error: Option<String>,
            exit_code: Option<i64>,
        },
        Started {
            total_steps: u64,
            num_examples: u64,
        },
        Metric(MetricPoint),
        Progress {
            step: u64,
            total: u64,
            elapsed_s: f64,
            eta_s: f64,
        },
        Checkpoint {
            step: u64,
            path: String,
        },
        Log {
            line: String,
        },
        Finished {
            #[cfg_attr(feature = "openapi", schema(value_type = Object))]
            metrics: serde_json::Map<String, serde_json::Value>,
        },
    }
}

wire! {
    pub struct RunEventMsg {
        pub seq: i64,
        /// When the worker printed the event (unix seconds), for events that come from it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub worker_ts: Option<f64>,
        #[serde(flatten)]
        pub event: RunEvent,
    }
}

wire! {
    pub struct Created {
        pub id: i64,
    }
}

wire! {
    /// Every error of the API: `{"error": {...}}` with a 4xx or 5xx status.
    pub struct ErrorBody {
        pub error: ErrorDetail,
    }
}

wire! {
    pub struct ErrorDetail {
        /// Stable machine-readable code: `bad_request`, `invalid_field`, `not_found`, `conflict`, ...
        pub code: String,
        pub message: String,
        /// The argument or field the error is about, when there is one.
        pub field: Option<String>,
    }
}

wire! {
    pub struct ModelEntry {
        /// What goes into `model_name_or_path`.
        pub path: String,
        pub name: String,
        /// `local`, `hf_cache` or `demo`.
        pub source: String,
        pub model_type: Option<String>,
        /// The template the model gets when none is named; `None`: its own chat template.
        pub template: Option<String>,
        /// Why that template (shown under the template control).
        pub template_reason: String,
    }
}

wire! {
    pub struct DatasetEntry {
        pub name: String,
        /// `sft`, `rm` (pairwise), `kto` or `pt`: which stages can use it.
        pub kind: String,
        pub formatting: String,
        pub file: Option<String>,
        pub ranking: bool,
    }
}

wire! {
    pub struct DatasetPage {
        pub name: String,
        pub total: u64,
        pub offset: u64,
        #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
        pub rows: Vec<serde_json::Value>,
        /// Per row, the URLs of its images (`/api/datasets/media?…`), for thumbnails.
        #[serde(default)]
        pub images: Vec<Vec<String>>,
    }
}

wire! {
    pub struct CheckpointEntry {
        /// Path for `adapter_name_or_path` (LoRA) or `model_name_or_path` (full / freeze).
        pub path: String,
        pub name: String,
        pub finetuning_type: String,
        pub run_id: Option<i64>,
        /// Has `value_head.safetensors`: a reward model PPO can use.
        #[serde(default)]
        pub reward_model: bool,
    }
}

wire! {
    pub struct CommandPreview {
        /// The command line that runs this config without the server.
        pub command: String,
        pub yaml: String,
        pub output_dir: String,
        /// A training run's estimated memory, from the model's config (before it loads).
        pub memory: Option<MemoryEstimate>,
    }
}

wire! {
    /// Bytes a run needs, by what they hold.
    pub struct MemoryEstimate {
        pub weights: u64,
        /// Trained tensors, their gradients and the optimizer's moments.
        pub training_state: u64,
        pub activations: u64,
        pub total: u64,
    }
}

wire! {
    pub struct ArgSet {
        pub name: String,
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        pub config: serde_json::Map<String, serde_json::Value>,
        pub updated_at: f64,
    }
}

wire! {
    pub struct ChatStatus {
        /// `unloaded`, `loading`, `loaded` or `failed`.
        pub state: String,
        pub model: Option<String>,
        pub adapter: Option<String>,
        pub template: Option<String>,
        pub backend: String,
        pub error: Option<String>,
        /// Whether the loaded model reads images (a vision-language model with its template).
        #[serde(default)]
        pub takes_images: bool,
    }
}

wire! {
    /// Sent by the browser on `/api/chat`.
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ChatRequest {
        Generate {
            messages: Vec<ChatTurn>,
            #[serde(default)]
            system: String,
            #[serde(default)]
            tools: String,
            max_new_tokens: Option<usize>,
            top_p: Option<f64>,
            temperature: Option<f64>,
            /// The conversation's images as data URLs (`data:image/png;base64,…`), for the
            /// `<image>` placeholders of the messages or, without any, before the first message.
            #[serde(default)]
            images: Vec<String>,
        },
        Stop,
    }
}

wire! {
    pub struct ChatTurn {
        /// `user`, `assistant`, `observation` or `function`.
        pub role: String,
        pub content: String,
    }
}

wire! {
    /// Sent by the server on `/api/chat`.
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ChatReply {
        Token { text: String },
        Done {
            prompt_tokens: usize,
            completion_tokens: usize,
            finish: String,
        },
        Error { message: String },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_seq_and_type() {
        let m = RunEventMsg {
            seq: 3,
            worker_ts: None,
            event: RunEvent::Log { line: "hi".into() },
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"seq":3,"type":"log","line":"hi"}"#);
        assert_eq!(serde_json::from_str::<RunEventMsg>(&s).unwrap(), m);
        for st in [
            "queued",
            "running",
            "succeeded",
            "failed",
            "aborted",
            "interrupted",
        ] {
            assert_eq!(RunStatus::parse(st).unwrap().as_str(), st);
        }
    }
}
