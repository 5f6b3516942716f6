//! `llamafactory api`: an OpenAI-compatible server (`/v1/models`, `/v1/chat/completions` with
//! and without SSE streaming) for one model, like LLaMA-Factory's API.

pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use trainer::data::converter::{Message, Role};
use trainer::infer::GenerationConfig;
use trainer::vision::RgbImage;
pub use worker::ModelWorker;
use worker::{Chunk, Job};

struct AppState {
    worker: ModelWorker,
    api_key: Option<String>,
    created: i64,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

fn check_auth(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Invalid API key.".into(),
            kind: "authentication_error",
            param: None,
        })
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Value>,
    #[serde(default)]
    tools: Option<Value>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    stop: Option<Value>,
    n: Option<usize>,
    seed: Option<u64>,
}

/// A message's text, with `<image>` where an `image_url` part stands (as LLaMA-Factory's API
/// reads parts), and those images.
fn content_parts(v: &Value) -> Result<(String, Vec<RgbImage>), ApiError> {
    match v {
        Value::String(s) => Ok((s.clone(), Vec::new())),
        Value::Null => Ok((String::new(), Vec::new())),
        Value::Array(parts) => {
            let (mut text, mut images) = (String::new(), Vec::new());
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    Some("image_url") => {
                        let url = p
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::bad(
                                    "an image_url part needs `image_url.url`",
                                    Some("messages"),
                                )
                            })?;
                        images.push(load_image_url(url)?);
                        text.push_str(trainer::data::media::IMAGE_PLACEHOLDER);
                    }
                    _ => {}
                }
            }
            Ok((text, images))
        }
        _ => Err(ApiError::bad(
            "message content must be a string or a list of parts",
            Some("messages"),
        )),
    }
}

/// The image of a data URL (`data:image/png;base64,…`).
pub fn image_from_data_url(url: &str) -> Result<RgbImage, String> {
    use base64::Engine;
    let Some((_, data)) = url
        .strip_prefix("data:image/")
        .and_then(|rest| rest.split_once(";base64,"))
    else {
        return Err("an image data URL must be `data:image/<type>;base64,<data>`".into());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("the image data URL is not valid base64: {e}"))?;
    trainer::vision::decode::from_bytes(&bytes)
        .map_err(|e| format!("cannot decode the image: {e:#}"))
}

/// An image from a data URL (`data:image/png;base64,…`), or a local file under
/// `SAFE_MEDIA_PATH` (LLaMA-Factory's rule: local files only from that folder, and not with
/// `ALLOW_LOCAL_FILES=0`). Remote URLs are not fetched.
fn load_image_url(url: &str) -> Result<RgbImage, ApiError> {
    let bad = |m: String| ApiError::bad(m, Some("messages"));
    if url.starts_with("data:") {
        return image_from_data_url(url).map_err(bad);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad("remote image URLs are not fetched; send the image as a data URL (data:image/png;base64,...)".into()));
    }
    let forbidden = |m: &str| ApiError {
        status: StatusCode::FORBIDDEN,
        message: m.into(),
        kind: "permission_error",
        param: Some("messages"),
    };
    if std::env::var("ALLOW_LOCAL_FILES")
        .is_ok_and(|v| matches!(v.as_str(), "0" | "false" | "False"))
    {
        return Err(forbidden("Local file access is disabled."));
    }
    let Some(safe) = std::env::var_os("SAFE_MEDIA_PATH") else {
        return Err(forbidden("local image files are read only from the folder SAFE_MEDIA_PATH names, and it is not set; send the image as a data URL"));
    };
    let (Ok(real), Ok(safe)) = (std::fs::canonicalize(url), std::fs::canonicalize(safe)) else {
        return Err(bad(format!("Invalid or inaccessible file path: {url}")));
    };
    if !real.starts_with(&safe) {
        return Err(forbidden(
            "File access is restricted to the safe media directory.",
        ));
    }
    trainer::vision::decode::load(&real).map_err(|e| bad(format!("{e:#}")))
}

/// OpenAI messages → system prompt, alternating turns and their images, as LLaMA-Factory's API
/// maps them.
fn to_messages(raw: &[Value]) -> Result<(String, Vec<Message>, Vec<RgbImage>), ApiError> {
    let mut system = String::new();
    let mut out = Vec::new();
    let mut all_images = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(format!("messages[{i}] has no role"), Some("messages")))?;
        let (content, images) = content_parts(m.get("content").unwrap_or(&Value::Null))?;
        all_images.extend(images);
        match role {
            "system" if i == 0 => system = content,
            "user" => out.push(Message::new(Role::User, content)),
            "assistant" => match m.get("tool_calls").and_then(Value::as_array) {
                Some(calls) if !calls.is_empty() => {
                    let fns: Vec<Value> = calls
                        .iter()
                        .map(|c| {
                            let f = &c["function"];
                            let args = f["arguments"]
                                .as_str()
                                .and_then(|a| serde_json::from_str(a).ok())
                                .unwrap_or_else(|| f["arguments"].clone());
                            json!({"name": f["name"], "arguments": args})
                        })
                        .collect();
                    out.push(Message::new(
                        Role::Function,
                        trainer::data::pyjson::dumps(&Value::Array(fns), None),
                    ))
                }
                _ => out.push(Message::new(Role::Assistant, content)),
            },
            "tool" | "function" => out.push(Message::new(Role::Observation, content)),
            other => {
                return Err(ApiError::bad(
                    format!("messages[{i}]: unsupported role `{other}`"),
                    Some("messages"),
                ))
            }
        }
    }
    let ok = !out.is_empty()
        && out.len() % 2 == 1
        && out.iter().enumerate().all(|(i, m)| {
            if i % 2 == 0 {
                matches!(m.role, Role::User | Role::Observation)
            } else {
                matches!(m.role, Role::Assistant | Role::Function)
            }
        });
    if !ok {
        return Err(ApiError::bad("messages must alternate user and assistant turns and end with a user (or tool) message", Some("messages")));
    }
    Ok((system, out, all_images))
}

async fn models(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_auth(&s, &headers)?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": s.worker.model_name, "object": "model", "created": s.created, "owned_by": "owner"}]}),
    ))
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_auth(&s, &headers)?;
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("invalid request body: {e}"), None))?;
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("only n = 1 is supported", Some("n")));
    }
    let (system, messages, images) = to_messages(&req.messages)?;
    let tools = match &req.tools {
        Some(t) if !t.is_null() => {
            let list: Vec<Value> = t
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|x| x.get("function").cloned().unwrap_or(x))
                .collect();
            trainer::data::pyjson::dumps(&Value::Array(list), None)
        }
        _ => String::new(),
    };
    let mut gen: GenerationConfig = s.worker.defaults.clone();
    if let Some(t) = req.temperature {
        gen.temperature = t;
        gen.do_sample = t > 0.0;
    }
    if let Some(p) = req.top_p {
        gen.top_p = p;
    }
    if let Some(m) = req.max_tokens {
        gen.max_new_tokens = m;
    }
    if let Some(seed) = req.seed {
        gen.seed = seed;
    }
    let stop = match req.stop {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    s.worker
        .submit(Job {
            messages,
            images,
            system,
            tools,
            gen,
            stop,
            out: tx,
        })
        .map_err(|e| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: e.to_string(),
            kind: "server_error",
            param: None,
        })?;
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let model = req.model.unwrap_or_else(|| s.worker.model_name.clone());
    let created = chrono::Utc::now().timestamp();
    if req.stream {
        let head = {
            let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
            tokio_stream::once(Ok::<Event, Infallible>(
                Event::default().data(c.to_string()),
            ))
        };
        let (id2, model2) = (id.clone(), model.clone());
        let body = UnboundedReceiverStream::new(rx).map(move |chunk| {
            let c = match chunk {
                Chunk::Text(t) => json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": null}]}),
                Chunk::Done { finish, .. } => json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}),
                Chunk::Error(e) => json!({"error": {"message": e, "type": "server_error", "param": null, "code": 500}}),
            };
            Ok(Event::default().data(c.to_string()))
        });
        let done = tokio_stream::once(Ok(Event::default().data("[DONE]")));
        return Ok(Sse::new(head.chain(body).chain(done))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut rx = rx;
    let mut text = String::new();
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Chunk::Text(t) => text.push_str(&t),
            Chunk::Done {
                prompt_tokens,
                completion_tokens,
                finish,
            } => {
                let body = json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}});
                return Ok(Json(body).into_response());
            }
            Chunk::Error(e) => {
                return Err(ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: e,
                    kind: "server_error",
                    param: None,
                })
            }
        }
    }
    Err(ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "generation ended early".into(),
        kind: "server_error",
        param: None,
    })
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "Not found".into(),
        kind: "invalid_request_error",
        param: None,
    }
}

pub fn router(worker: ModelWorker, api_key: Option<String>) -> Router {
    let state = Arc::new(AppState {
        worker,
        api_key,
        created: chrono::Utc::now().timestamp(),
    });
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(32 * 1024 * 1024))
        .with_state(state)
}

/// Serves until Ctrl-C; prints the address first.
pub async fn serve(worker: ModelWorker, addr: SocketAddr, api_key: Option<String>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!(
        "OpenAI-compatible API on http://{local}/v1 (GET /v1/models, POST /v1/chat/completions)"
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    axum::serve(listener, router(worker, api_key))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn png_data_url() -> String {
        let png = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/vision/small.png"),
        )
        .unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        )
    }

    #[test]
    fn image_parts_become_placeholders_and_images() {
        let raw = vec![json!({"role": "user", "content": [
            {"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": png_data_url()}},
            {"type": "text", "text": " what is it?"}
        ]})];
        let (_, messages, images) = to_messages(&raw).unwrap();
        assert_eq!(messages[0].content, "Look: <image> what is it?");
        assert_eq!((images[0].width, images[0].height), (45, 20));
        let remote = vec![json!({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]})];
        let e = to_messages(&remote).unwrap_err();
        assert!(e.message.contains("not fetched"), "{}", e.message);
        let garbage = vec![json!({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]})];
        assert!(to_messages(&garbage)
            .unwrap_err()
            .message
            .contains("cannot decode"));
    }

    #[test]
    fn local_image_files_need_the_safe_media_folder() {
        // Without SAFE_MEDIA_PATH a local path is refused (the test process never sets it).
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/vision/small.png")
            .display()
            .to_string();
        let e = load_image_url(&path).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.message.contains("SAFE_MEDIA_PATH"), "{}", e.message);
    }
}
