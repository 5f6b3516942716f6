//! `llamafactory webui`: the REST + WebSocket API, the server-rendered LlamaBoard and its static
//! files, behind a guard that refuses foreign hosts and origins and, off loopback, requires the
//! access token.

mod catalog;
mod chat;
pub mod error;
mod openapi;
mod prepare;
mod runs;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

use crate::runs::Manager;
use error::ApiError;

/// Largest request body accepted (argument objects and chat messages are small).
pub const BODY_LIMIT: usize = 1 << 20;

pub struct WebConfig {
    pub workdir: PathBuf,
    pub addr: SocketAddr,
    /// Required on every request when the server listens beyond loopback.
    pub token: Option<String>,
    /// Where the browser bundle (`pkg/frontend.js`, `pkg/frontend_bg.wasm`, `style.css`) lives.
    pub site_root: PathBuf,
}

pub struct App {
    pub manager: Arc<Manager>,
    pub chat: chat::ChatService,
    pub cfg: WebConfig,
    /// Flips to true at shutdown so open WebSockets close and the server can exit.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

pub type AppState = Arc<App>;

pub fn router(app: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/openapi.json", get(openapi::document))
        .route("/models", get(catalog::models))
        .route("/templates", get(catalog::templates))
        .route("/datasets", get(catalog::datasets))
        .route("/datasets/{name}/preview", get(catalog::preview))
        .route("/checkpoints", get(catalog::checkpoints))
        .route("/preview-command", post(runs::preview_command))
        .route("/runs", get(runs::list).post(runs::start_train))
        .route("/predict", post(runs::start_predict))
        .route("/export", post(runs::start_export))
        .route("/runs/{id}", get(runs::detail).delete(runs::remove))
        .route("/runs/{id}/metrics", get(runs::metrics))
        .route("/runs/{id}/log", get(runs::log))
        .route("/runs/{id}/predictions", get(runs::predictions))
        .route("/runs/{id}/abort", post(runs::abort))
        .route("/runs/{id}/resume", post(runs::resume))
        .route("/runs/{id}/events", get(runs::events))
        .route("/arg-sets", get(runs::arg_sets).post(runs::save_arg_set))
        .route("/arg-sets/{name}", delete(runs::delete_arg_set))
        .route(
            "/settings",
            get(catalog::settings).put(catalog::put_settings),
        )
        .route("/chat/status", get(chat::status))
        .route("/chat/load", post(chat::load))
        .route("/chat/unload", post(chat::unload))
        .route("/chat", get(chat::socket))
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    ui::routes(app.clone())
        .nest("/api", api.with_state(app.clone()))
        .layer(middleware::from_fn_with_state(app, guard))
}

/// Whether any model folder is known (work dir `models/`, or the Hugging Face cache).
pub fn has_models(workdir: &std::path::Path) -> bool {
    !catalog::list_models(workdir, &[]).is_empty()
}

fn local_hosts(port: u16) -> [String; 3] {
    [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ]
}

/// Refuses requests that a page of another site could make through the user's browser: a
/// `Host` that is not this server (DNS rebinding) or an `Origin` of another site. Off loopback,
/// the access token is required (header, `?token=` once, then a cookie).
async fn guard(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let port = app.cfg.addr.port();
    let loopback = app.cfg.addr.ip().is_loopback();
    if loopback && !local_hosts(port).contains(&host) {
        return ApiError::forbidden(format!(
            "host `{host}` is not this server; open http://127.0.0.1:{port}/"
        ))
        .into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            == Some(host.as_str());
        if !same {
            return ApiError::forbidden(format!("cross-origin request from `{origin}` refused"))
                .into_response();
        }
    }
    let mut set_cookie = None;
    if let Some(token) = &app.cfg.token {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let cookie = headers
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .into_iter()
            .flat_map(|c| c.split(';'))
            .filter_map(|kv| kv.trim().strip_prefix("lf_token="))
            .next();
        let query = req
            .uri()
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|kv| kv.strip_prefix("token="))
            .next();
        let ok = [bearer, cookie, query]
            .iter()
            .flatten()
            .any(|t| *t == token);
        if !ok {
            return ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server requires its access token: open the URL it printed at start",
            )
            .into_response();
        }
        if query.is_some() {
            set_cookie = Some(format!(
                "lf_token={token}; Path=/; HttpOnly; SameSite=Strict"
            ));
        }
    }
    let mut resp = next.run(req).await;
    if let Some(c) = set_cookie {
        if let Ok(v) = c.parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// Serves until Ctrl-C / SIGTERM, then asks workers to save and stop.
pub async fn serve(app: AppState, listener: tokio::net::TcpListener) -> Result<()> {
    let manager = app.manager.clone();
    let stopping = app.stopping.clone();
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            let _ = stopping.send(true);
            eprintln!("stopping: asking running workers to save a checkpoint ...");
            manager.shutdown().await;
        })
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
