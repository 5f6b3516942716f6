//! A run as one tab watches it: status, progress, metric points, log tail and result, all fed by
//! the run's WebSocket (history first, then live events).

use leptos::prelude::*;
use protocol::run::{MetricPoint, RunEvent, RunEventMsg, RunStatus};
use serde_json::{Map, Value};

use crate::client::Socket;
use crate::form::hms;
use crate::i18n::use_i18n;

/// Lines of log a tab keeps.
const LOG_LINES: usize = 300;

#[derive(Clone, Copy)]
pub struct RunView {
    pub id: RwSignal<Option<i64>>,
    pub status: RwSignal<Option<RunStatus>>,
    pub error: RwSignal<Option<String>>,
    pub points: RwSignal<Vec<MetricPoint>>,
    pub step: RwSignal<u64>,
    pub total: RwSignal<u64>,
    pub elapsed: RwSignal<f64>,
    pub eta: RwSignal<f64>,
    pub tokens_per_sec: RwSignal<Option<f64>>,
    pub log: RwSignal<Vec<String>>,
    pub result: RwSignal<Map<String, Value>>,
    /// Bumped when a run reaches a final status, so lists can refresh.
    pub finished: RwSignal<u64>,
    socket: StoredValue<Option<Socket>, LocalStorage>,
}

impl RunView {
    pub fn new() -> Self {
        Self {
            id: RwSignal::new(None),
            status: RwSignal::new(None),
            error: RwSignal::new(None),
            points: RwSignal::new(Vec::new()),
            step: RwSignal::new(0),
            total: RwSignal::new(0),
            elapsed: RwSignal::new(0.0),
            eta: RwSignal::new(0.0),
            tokens_per_sec: RwSignal::new(None),
            log: RwSignal::new(Vec::new()),
            result: RwSignal::new(Map::new()),
            finished: RwSignal::new(0),
            socket: StoredValue::new_local(None),
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(
            self.status.get(),
            Some(RunStatus::Queued | RunStatus::Running)
        )
    }

    fn reset(&self) {
        self.status.set(None);
        self.error.set(None);
        self.points.set(Vec::new());
        self.step.set(0);
        self.total.set(0);
        self.elapsed.set(0.0);
        self.eta.set(0.0);
        self.tokens_per_sec.set(None);
        self.log.set(Vec::new());
        self.result.set(Map::new());
    }

    /// Watches run `id` from its first event on.
    pub fn attach(&self, id: i64) {
        let me = *self;
        self.socket.set_value(None);
        self.reset();
        self.id.set(Some(id));
        let socket = Socket::open(&format!("/api/runs/{id}/events"), move |text| {
            if let Ok(msg) = serde_json::from_str::<RunEventMsg>(&text) {
                me.apply(msg.event);
            }
        });
        self.socket.set_value(socket);
    }

    /// Asks the server to abort the watched run; a refusal goes to `message`.
    pub fn abort(&self, message: RwSignal<Option<String>>) {
        if let Some(id) = self.id.get_untracked() {
            leptos::task::spawn_local(async move {
                let url = format!("/api/runs/{id}/abort");
                let sent = crate::client::send::<_, protocol::run::Run>(
                    "POST",
                    &url,
                    &serde_json::Value::Null,
                );
                if let Err(e) = sent.await {
                    message.set(Some(e.message));
                }
            });
        }
    }

    fn apply(&self, e: RunEvent) {
        match e {
            RunEvent::Status { status, error, .. } => {
                if status == RunStatus::Running || status == RunStatus::Queued {
                    self.error.set(None);
                } else {
                    self.error.set(error);
                    self.finished.update(|n| *n += 1);
                }
                self.status.set(Some(status));
            }
            RunEvent::Started { total_steps, .. } => self.total.set(total_steps),
            RunEvent::Metric(p) => {
                if let Some(t) = p.total {
                    self.total.set(t);
                }
                if p.loss.is_some() {
                    self.step.set(p.step);
                }
                if let Some(e) = p.elapsed_s {
                    self.elapsed.set(e);
                }
                if let Some(e) = p.eta_s {
                    self.eta.set(e);
                }
                if p.tokens_per_sec.is_some() {
                    self.tokens_per_sec.set(p.tokens_per_sec);
                }
                self.points.update(|pts| merge_point(pts, p));
            }
            RunEvent::Progress {
                step,
                total,
                elapsed_s,
                eta_s,
            } => {
                self.step.set(step);
                self.total.set(total);
                self.elapsed.set(elapsed_s);
                self.eta.set(eta_s);
            }
            RunEvent::Checkpoint { step, path } => {
                self.push_log(format!("checkpoint at step {step}: {path}"))
            }
            RunEvent::Log { line } => self.push_log(line),
            RunEvent::Finished { metrics } => self.result.set(metrics),
        }
    }

    fn push_log(&self, line: String) {
        self.log.update(|l| {
            l.push(line);
            if l.len() > LOG_LINES {
                let cut = l.len() - LOG_LINES;
                l.drain(..cut);
            }
        });
    }
}

impl Default for RunView {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds a point, merging train and eval values of the same step (a resumed run repeats steps).
pub fn merge_point(pts: &mut Vec<MetricPoint>, p: MetricPoint) {
    match pts.iter_mut().find(|q| q.step == p.step) {
        Some(q) => {
            q.loss = p.loss.or(q.loss);
            q.eval_loss = p.eval_loss.or(q.eval_loss);
            q.lr = p.lr.or(q.lr);
            q.epoch = p.epoch.or(q.epoch);
            q.extra.extend(p.extra);
        }
        None => {
            let at = pts.partition_point(|q| q.step < p.step);
            pts.insert(at, p);
        }
    }
}

/// Status badge, progress bar with step/total, elapsed and ETA, tokens/s.
#[component]
pub fn Progress(view: RunView) -> impl IntoView {
    let i = use_i18n();
    let pct = move || {
        let t = view.total.get();
        if view.status.get() == Some(RunStatus::Succeeded) {
            100.0
        } else if t == 0 {
            0.0
        } else {
            (view.step.get() as f64 / t as f64 * 100.0).min(100.0)
        }
    };
    view! {
        <div class="progress" data-testid="progress">
            <div class="progress-line">
                <span class=move || format!("badge {}", view.status.get().map(|s| s.as_str()).unwrap_or("idle"))
                    data-testid="run-status">
                    {move || match view.status.get() {
                        Some(s) => i.tr(s.as_str()).to_string(),
                        None => i.tr("ready").to_string(),
                    }}
                </span>
                {move || view.id.get().map(|id| view! { <span class="muted">"#"{id}</span> })}
                <span class="muted" data-testid="step-count">
                    {move || format!("{} / {}", view.step.get(), view.total.get())}
                </span>
                <span class="muted">
                    {move || format!("{} {} · {} {}", i.tr("elapsed"), hms(view.elapsed.get()), i.tr("eta"), hms(view.eta.get()))}
                </span>
                {move || view.tokens_per_sec.get().map(|t| view! { <span class="muted">{format!("{t:.0} ")}{i.t("tokens_per_sec")}</span> })}
            </div>
            <div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow=move || format!("{:.0}", pct())>
                <div class="fill" style=move || format!("width: {:.1}%", pct())></div>
            </div>
            {move || view.error.get().map(|e| view! { <pre class="error-box" data-testid="run-error">{e}</pre> })}
        </div>
    }
}

/// The last lines of the run's log.
#[component]
pub fn LogTail(view: RunView) -> impl IntoView {
    let i = use_i18n();
    view! {
        <details class="log" open>
            <summary>{i.t("log")}</summary>
            <pre data-testid="log">{move || view.log.get().join("\n")}</pre>
        </details>
    }
}
