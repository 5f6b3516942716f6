//! One worker process: spawned without a shell, its stdout parsed as JSON events, every line of
//! stdout and stderr kept in the run's log file, and its end turned into a final status.

use std::future::Future;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};
use protocol::run::RunStatus;
use protocol::WorkerEvent;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How much of the log a failed run keeps in its record.
const ERROR_TAIL_BYTES: u64 = 20 * 1024;

pub struct Spawned {
    pub pid: u32,
    child: Child,
    log: std::path::PathBuf,
}

pub enum Line {
    /// An event and when the worker printed it.
    Event(WorkerEvent, Option<f64>),
    Text(String),
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; a stale pid is at worst an ESRCH error.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn spawn(exe: &Path, sub: &str, args_file: &Path, cwd: &Path, log: &Path) -> Result<Spawned> {
    let mut cmd = Command::new(exe);
    cmd.arg(sub)
        .arg(args_file)
        .args(["--events", "json"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal, so a
    // worker whose server dies saves a checkpoint and stops instead of running on unwatched.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start the worker {}", exe.display()))?;
    let pid = child.id().context("the worker exited at once")?;
    Ok(Spawned {
        pid,
        child,
        log: log.to_path_buf(),
    })
}

/// How a worker ended, from its exit status and what it reported.
pub struct End {
    code: Option<i32>,
    signal: Option<i32>,
    finished: bool,
    aborted: bool,
    failure: Option<String>,
    log_tail: String,
}

impl End {
    pub fn verdict(
        &self,
        abort_requested: bool,
        shutting_down: bool,
    ) -> (RunStatus, Option<i64>, Option<String>) {
        let code = self.code.map(i64::from);
        if shutting_down {
            let msg = "the server stopped; resume the run to continue from its last checkpoint";
            return (RunStatus::Interrupted, code, Some(msg.into()));
        }
        if self.finished && self.code == Some(0) {
            return (RunStatus::Succeeded, code, None);
        }
        if abort_requested || self.aborted {
            return (RunStatus::Aborted, code, None);
        }
        let reason = match (&self.failure, self.code, self.signal) {
            (Some(f), _, _) => f.clone(),
            (None, _, Some(9)) => "the worker was killed (SIGKILL; out of memory?)".into(),
            (None, _, Some(s)) => format!("the worker was killed by signal {s}"),
            (None, Some(0), _) => "the worker exited without reporting a result".into(),
            (None, Some(c), _) => format!("the worker exited with code {c}"),
            (None, None, None) => "the worker ended for an unknown reason".into(),
        };
        let error = format!("{reason}\n--- last lines of the log ---\n{}", self.log_tail);
        let code = code.or(self.signal.map(|s| 128 + i64::from(s)));
        (RunStatus::Failed, code, Some(error))
    }
}

/// Reads the worker's output to the end, handing each line to `on_line` and the log file, then
/// waits for it to exit.
pub async fn follow<F, Fut>(mut sp: Spawned, on_line: F) -> End
where
    F: Fn(Line) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&sp.log)
        .await
        .ok();
    let stdout = sp.child.stdout.take().map(BufReader::new);
    let stderr = sp.child.stderr.take().map(BufReader::new);
    let mut out_lines = stdout.map(|s| s.lines());
    let mut err_lines = stderr.map(|s| s.lines());
    let mut end = End {
        code: None,
        signal: None,
        finished: false,
        aborted: false,
        failure: None,
        log_tail: String::new(),
    };
    while out_lines.is_some() || err_lines.is_some() {
        let (line, from_stdout) = tokio::select! {
            l = next(&mut out_lines) => (l, true),
            l = next(&mut err_lines) => (l, false),
        };
        let Some(text) = line else {
            continue;
        };
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(format!("{text}\n").as_bytes()).await;
        }
        let parsed = if from_stdout {
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    let ts = v.get("ts").and_then(serde_json::Value::as_f64);
                    serde_json::from_value::<WorkerEvent>(v)
                        .ok()
                        .map(|e| (e, ts))
                })
        } else {
            None
        };
        let line = match parsed {
            Some((e, ts)) => {
                match &e {
                    WorkerEvent::Finished { .. } => end.finished = true,
                    WorkerEvent::Aborted { .. } => end.aborted = true,
                    // The first failure is the cause: a data-parallel launcher reports its
                    // ranks' end after rank 0 has reported why.
                    WorkerEvent::Failed { error, .. } => {
                        end.failure.get_or_insert_with(|| error.clone());
                    }
                    _ => {}
                }
                Line::Event(e, ts)
            }
            None => Line::Text(text),
        };
        if let Err(e) = on_line(line).await {
            eprintln!("worker {}: cannot record a line: {e:#}", sp.pid);
        }
    }
    if let Some(f) = log.as_mut() {
        let _ = f.flush().await;
    }
    if let Ok(status) = sp.child.wait().await {
        use std::os::unix::process::ExitStatusExt;
        end.code = status.code();
        end.signal = status.signal();
    }
    end.log_tail = tail(&sp.log, ERROR_TAIL_BYTES);
    end
}

/// The next line of a stream; a finished or broken stream is set to `None` so it is not polled
/// again, and then this never resolves, leaving the other stream to `select!`.
async fn next<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Option<tokio::io::Lines<R>>,
) -> Option<String> {
    match lines {
        None => std::future::pending().await,
        Some(l) => match l.next_line().await {
            Ok(Some(s)) => Some(s),
            _ => {
                *lines = None;
                None
            }
        },
    }
}

/// The last `max` bytes of a file, starting at a line boundary.
pub fn tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        match text.find('\n') {
            Some(i) => text[i + 1..].to_string(),
            None => text,
        }
    } else {
        text
    }
}
