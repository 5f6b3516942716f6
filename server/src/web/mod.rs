//! `llamafactory webui`: the REST + WebSocket API, the server-rendered LlamaBoard and its static
//! files, behind a guard that refuses foreign hosts and origins and, off loopback, requires the
//! access token.

mod bundle;
mod catalog;
mod chat;
pub mod error;
mod openapi;
mod prepare;
mod runs;
mod ui;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// A folder to serve the browser bundle (`pkg/frontend.js`, `pkg/frontend_bg.wasm`) from
    /// instead of the one embedded in the binary.
    pub site_root: Option<PathBuf>,
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
        .route("/models/info", get(catalog::model_info))
        .route("/templates", get(catalog::templates))
        .route("/datasets", get(catalog::datasets))
        .route("/datasets/{name}/preview", get(catalog::preview))
        .route("/datasets/media", get(catalog::media))
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
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::not_found(format!("no such API endpoint: {}", uri.path()))
        })
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::new(
                    axum::http::StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{method} is not allowed on {}", uri.path()),
                )
            },
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    ui::routes(app.clone())
        .nest("/api", api.with_state(app.clone()))
        .layer(middleware::from_fn_with_state(app, guard))
        .layer(middleware::from_fn(security_headers))
}

/// No framing (clickjacking), no MIME sniffing, no referrer to other sites; responses without
/// a policy of their own (the page sets one) get one that allows nothing.
async fn security_headers(req: Request, next: Next) -> Response {
    use axum::http::HeaderValue;
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        );
    }
    resp
}

/// Whether this binary carries the browser bundle.
pub fn bundle_embedded() -> bool {
    bundle::embedded()
}

/// Whether any model folder is known (work dir `models/`, or the Hugging Face cache).
pub fn has_models(workdir: &std::path::Path) -> bool {
    !catalog::list_models(workdir, &[]).is_empty()
}

/// Whether a `Host` header names this loopback server: `localhost`, `127.0.0.1`, `[::1]` or
/// the address it is bound to, in any case, with its port (or none when that is 80).
fn is_local_host(host: &str, addr: SocketAddr) -> bool {
    let host = host.to_ascii_lowercase();
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.is_empty() && !p.contains(']') => (n.to_string(), p.parse().ok()),
        _ => (host.clone(), Some(80)),
    };
    if port != Some(addr.port()) {
        return false;
    }
    let bound = match addr.ip() {
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    ["127.0.0.1", "localhost", "[::1]", bound.as_str()].contains(&name.as_str())
}

/// Whether an `Origin` is the site the request is addressed to.
fn same_origin(origin: &str, host: &str) -> bool {
    let origin = origin.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    origin.strip_prefix("http://") == Some(host.as_str())
        || origin.strip_prefix("https://") == Some(host.as_str())
}

/// Constant-time equality, so the time a wrong token takes does not tell how much of it was
/// right.
fn token_matches(given: &str, token: &str) -> bool {
    let (a, b) = (given.as_bytes(), token.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ y);
    }
    diff == 0
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
    if loopback && !is_local_host(&host, app.cfg.addr) {
        return ApiError::forbidden(format!(
            "host `{host}` is not this server; open http://127.0.0.1:{port}/"
        ))
        .into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        if !same_origin(origin, &host) {
            return ApiError::forbidden(format!("cross-origin request from `{origin}` refused"))
                .into_response();
        }
    }
    let mut set_cookie = None;
    if let Some(token) = &app.cfg.token {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
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
            .any(|t| token_matches(t, token));
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

/// Connections served at once at most; more wait in the kernel's backlog until one closes.
const MAX_CONNECTIONS: usize = 1024;
/// Connections from one address: a client that opens many cannot crowd out the others.
const MAX_CONNECTIONS_PER_IP: usize = 512;
/// File descriptors kept for everything but connections (database, logs, workers' pipes).
const RESERVED_FDS: u64 = 64;

/// How many connections this process can hold: [`MAX_CONNECTIONS`], fewer when the file
/// descriptor limit is lower (after raising the soft limit to the hard one), so accepting
/// never fails for want of descriptors — a full server makes new clients wait a moment.
fn connection_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return MAX_CONNECTIONS;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let usable = lim.rlim_cur.saturating_sub(RESERVED_FDS).max(16);
    MAX_CONNECTIONS.min(usable as usize)
}
/// How long a connection may take to send a request's headers, and may sit idle between
/// requests, before it is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until Ctrl-C / SIGTERM, then asks workers to save and stop. Connections that send no
/// request within [`HEADER_READ_TIMEOUT`] are closed, and their number is capped overall and
/// per address, so idle connections cannot lock the token holder out.
pub async fn serve(app: AppState, listener: tokio::net::TcpListener) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let manager = app.manager.clone();
    let stopping = app.stopping.clone();
    let service = TowerToHyperService::new(router(app));
    let limit = connection_limit();
    let slots = Arc::new(tokio::sync::Semaphore::new(limit));
    let per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Default::default();
    let (closing, _) = tokio::sync::watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot?,
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, never spin.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let ip = peer.ip();
        {
            let mut counts = per_ip.lock().unwrap();
            let n = counts.entry(ip).or_default();
            if *n >= MAX_CONNECTIONS_PER_IP {
                continue;
            }
            *n += 1;
        }
        let _ = stream.set_nodelay(true);
        let conn = http
            .serve_connection(TokioIo::new(stream), service.clone())
            .with_upgrades();
        let mut closing = closing.subscribe();
        let per_ip = per_ip.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(slot);
            let mut counts = per_ip.lock().unwrap();
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        });
    }
    let _ = stopping.send(true);
    eprintln!("stopping: asking running workers to save a checkpoint ...");
    manager.shutdown().await;
    // Open connections finish their requests (WebSockets closed above), then the server exits.
    let _ = closing.send(true);
    let all = limit as u32;
    let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(all)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_check_knows_every_name_of_a_loopback_server() {
        let addr: SocketAddr = "127.0.0.1:7860".parse().unwrap();
        for ok in [
            "127.0.0.1:7860",
            "LOCALHOST:7860",
            "localhost:7860",
            "[::1]:7860",
        ] {
            assert!(is_local_host(ok, addr), "{ok}");
        }
        for bad in [
            "evil.example:7860",
            "127.0.0.1:7861",
            "127.0.0.1",
            "localhost",
        ] {
            assert!(!is_local_host(bad, addr), "{bad}");
        }
        let on_80: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(is_local_host("127.0.0.1", on_80) && is_local_host("localhost:80", on_80));
        let other: SocketAddr = "127.0.0.2:9000".parse().unwrap();
        assert!(is_local_host("127.0.0.2:9000", other));
        let v6: SocketAddr = "[::1]:9000".parse().unwrap();
        assert!(is_local_host("[::1]:9000", v6) && !is_local_host("[::1]", v6));
    }

    #[test]
    fn origins_and_tokens_compare_as_they_should() {
        assert!(same_origin("http://LocalHost:7860", "localhost:7860"));
        assert!(!same_origin("http://evil.example", "localhost:7860"));
        assert!(token_matches("s3cret", "s3cret"));
        for wrong in ["s3cre", "s3crets", "S3cret", ""] {
            assert!(!token_matches(wrong, "s3cret"), "{wrong}");
        }
    }
}
