//! What the run manager refuses, and why. The web layer maps each case to an HTTP status in
//! one place (`web::error`).

use protocol::run::{RunKind, RunStatus};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("run {0} does not exist")]
    NotFound(i64),
    /// The run is not in a state the action applies to.
    #[error("run {id} is {}; {action}", status.as_str())]
    WrongStatus {
        id: i64,
        status: RunStatus,
        /// What would be needed, e.g. "only a stopped run can be resumed".
        action: &'static str,
    },
    #[error("run {id} is not queued or running")]
    NotActive { id: i64 },
    #[error("only training runs can be resumed; start a new {} run instead", .0.as_str())]
    NotResumable(RunKind),
    /// Another active run writes to the same folder.
    #[error("run {run} is already writing to {dir}")]
    OutputDirBusy {
        run: i64,
        dir: String,
        /// The argument naming the folder (`output_dir` or `export_dir`).
        key: &'static str,
    },
    /// The registry or the file system failed: the server's problem, not the request's.
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

pub type RunResult<T> = Result<T, RunError>;
