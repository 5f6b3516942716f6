//! Chat: one model loaded in the server process on its own thread (the OpenAI API's worker),
//! loaded and unloaded over REST, with replies streamed token by token over `/api/chat`.

use std::sync::Mutex;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use axum::extract::State;
use axum::response::Response;
use axum::Json;
use protocol::run::{ChatReply, ChatRequest, ChatStatus};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use trainer::data::converter::{Message, Role};

use super::error::{ApiError, ApiResult, Body, Ws};
use super::AppState;
use crate::api::worker::{Chunk, Job};
use crate::api::ModelWorker;

enum Loaded {
    None,
    Loading,
    Ready(ModelWorker),
    Failed,
}

/// The largest chat request: a conversation with its images as data URLs.
const CHAT_MESSAGE_LIMIT: usize = 32 << 20;

pub struct ChatService {
    state: Mutex<(Loaded, ChatStatus)>,
}

fn unloaded() -> ChatStatus {
    ChatStatus {
        state: "unloaded".into(),
        model: None,
        adapter: None,
        template: None,
        backend: backend(),
        error: None,
        takes_images: false,
    }
}

fn backend() -> String {
    format!(
        "candle (native Rust) on {}",
        trainer::device::describe(&trainer::device::default_device())
    )
}

impl ChatService {
    pub fn new() -> Self {
        Self {
            state: Mutex::new((Loaded::None, unloaded())),
        }
    }

    pub fn status(&self) -> ChatStatus {
        self.state.lock().unwrap().1.clone()
    }

    fn worker(&self) -> Option<ModelWorker> {
        match &self.state.lock().unwrap().0 {
            Loaded::Ready(w) => Some(w.clone()),
            _ => None,
        }
    }
}

impl Default for ChatService {
    fn default() -> Self {
        Self::new()
    }
}

#[utoipa::path(get, path = "/api/chat/status", responses((status = 200, body = ChatStatus)))]
pub async fn status(State(app): State<AppState>) -> Json<ChatStatus> {
    Json(app.chat.status())
}

/// Loads a model (and adapters) for chat, replacing the loaded one; answers when it is ready.
/// The load runs on a task of its own: a client that goes away does not stop it, and it always
/// ends in `loaded` or `failed`.
#[utoipa::path(post, path = "/api/chat/load", request_body(content = Object, description = "model_name_or_path, adapter_name_or_path, finetuning_type, template, infer_dtype, default_system, max_new_tokens, top_p, temperature"),
    responses((status = 200, body = ChatStatus), (status = 409, body = protocol::run::ErrorBody), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn load(
    State(app): State<AppState>,
    Body(values): Body<Map<String, Value>>,
) -> ApiResult<Json<ChatStatus>> {
    let args = super::prepare::prepare(&app.cfg.workdir, None, values)?;
    {
        let mut st = app.chat.state.lock().unwrap();
        if matches!(st.0, Loaded::Loading) {
            return Err(ApiError::conflict(format!(
                "{} is being loaded; wait until the chat status says loaded or failed, then load again",
                st.1.model.as_deref().unwrap_or("a model")
            )));
        }
        st.0 = Loaded::Loading;
        st.1 = ChatStatus {
            state: "loading".into(),
            model: args.model_name_or_path.clone(),
            adapter: args.adapter_name_or_path.clone(),
            template: args.template.clone(),
            backend: backend(),
            error: None,
            takes_images: false,
        };
    }
    let service = app.clone();
    let done = tokio::spawn(async move {
        let loaded = tokio::task::spawn_blocking(move || {
            if let Some(ms) = std::env::var(LOAD_DELAY_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
            {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            // The board always names its template; none is its "model's own" choice.
            trainer::infer::ChatModel::load_as_given(&args, &trainer::device::default_device())
        })
        .await;
        let mut st = service.chat.state.lock().unwrap();
        let failed = |st: &mut (Loaded, ChatStatus), msg: String| {
            st.0 = Loaded::Failed;
            st.1.state = "failed".into();
            st.1.error = Some(msg.clone());
            Err(msg)
        };
        match loaded {
            Ok(Ok(chat)) => {
                let template = chat.template.name.clone();
                st.1.takes_images = chat.takes_images();
                st.0 = Loaded::Ready(ModelWorker::start(chat));
                st.1.state = "loaded".into();
                st.1.template = Some(template);
                Ok(st.1.clone())
            }
            Ok(Err(e)) => failed(&mut st, format!("{e:#}")),
            Err(e) => failed(&mut st, format!("loading the model crashed: {e}")),
        }
    });
    match done.await {
        Ok(Ok(status)) => Ok(Json(status)),
        Ok(Err(msg)) => Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "load_failed",
            msg,
        )),
        Err(e) => Err(ApiError::internal(e.into())),
    }
}

/// Test hook: milliseconds a chat load waits before it starts (a slow load on demand).
pub const LOAD_DELAY_ENV: &str = "LLAMAFACTORY_TEST_CHAT_LOAD_DELAY_MS";

#[utoipa::path(post, path = "/api/chat/unload", responses((status = 200, body = ChatStatus)))]
pub async fn unload(State(app): State<AppState>) -> ApiResult<Json<ChatStatus>> {
    let mut st = app.chat.state.lock().unwrap();
    if matches!(st.0, Loaded::Loading) {
        return Err(ApiError::conflict(
            "a model is being loaded; unload it when it is ready",
        ));
    }
    // Dropping the last handle ends the model thread once its queue is empty.
    st.0 = Loaded::None;
    st.1 = unloaded();
    Ok(Json(st.1.clone()))
}

/// Each `generate` request streams `token` messages and one `done` (or `error`); `stop` ends the
/// reply early.
#[utoipa::path(get, path = "/api/chat", responses((status = 101, description = "WebSocket: send ChatRequest JSON, receive ChatReply JSON", body = ChatReply)))]
pub async fn socket(State(app): State<AppState>, Ws(ws): Ws) -> Response {
    ws.max_message_size(CHAT_MESSAGE_LIMIT)
        .on_upgrade(move |s| chat_loop(app, s))
}

async fn reply(socket: &mut WebSocket, r: &ChatReply) -> bool {
    let text = serde_json::to_string(r).unwrap_or_default();
    socket.send(WsMessage::Text(text.into())).await.is_ok()
}

fn to_messages(turns: Vec<protocol::run::ChatTurn>) -> Result<Vec<Message>, String> {
    turns
        .into_iter()
        .map(|t| {
            let role = match t.role.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "observation" | "tool" => Role::Observation,
                "function" => Role::Function,
                other => {
                    return Err(format!(
                        "unknown role `{other}`: user, assistant, observation or function"
                    ))
                }
            };
            Ok(Message::new(role, t.content))
        })
        .collect()
}

async fn chat_loop(app: AppState, mut socket: WebSocket) {
    let mut stopping = app.stopping.subscribe();
    // The reply being streamed; dropping the receiver makes the model thread stop generating.
    let mut current: Option<mpsc::UnboundedReceiver<Chunk>> = None;
    loop {
        tokio::select! {
            chunk = async { current.as_mut().unwrap().recv().await }, if current.is_some() => {
                let msg = match chunk {
                    Some(Chunk::Text(text)) => ChatReply::Token { text },
                    Some(Chunk::Done { prompt_tokens, completion_tokens, finish }) => {
                        current = None;
                        ChatReply::Done { prompt_tokens, completion_tokens, finish: finish.into() }
                    }
                    Some(Chunk::Error(message)) => {
                        current = None;
                        ChatReply::Error { message }
                    }
                    None => {
                        current = None;
                        ChatReply::Error { message: "the model thread stopped".into() }
                    }
                };
                if !reply(&mut socket, &msg).await {
                    return;
                }
            }
            incoming = socket.recv() => {
                let text = match incoming {
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                let req: ChatRequest = match serde_json::from_str(&text) {
                    Ok(r) => r,
                    Err(e) => {
                        if !reply(&mut socket, &ChatReply::Error { message: format!("malformed chat request: {e}") }).await {
                            return;
                        }
                        continue;
                    }
                };
                match req {
                    ChatRequest::Stop => {
                        if current.take().is_some() && !reply(&mut socket, &ChatReply::Done { prompt_tokens: 0, completion_tokens: 0, finish: "stopped".into() }).await {
                            return;
                        }
                    }
                    ChatRequest::Generate { messages, system, tools, max_new_tokens, top_p, temperature, images } => {
                        let err = |m: String| ChatReply::Error { message: m };
                        let Some(worker) = app.chat.worker() else {
                            if !reply(&mut socket, &err("no model is loaded: load one first".into())).await { return; }
                            continue;
                        };
                        if current.is_some() {
                            if !reply(&mut socket, &err("a reply is still streaming; stop it first".into())).await { return; }
                            continue;
                        }
                        let messages = match to_messages(messages) {
                            Ok(m) if !m.is_empty() => m,
                            Ok(_) => { if !reply(&mut socket, &err("send at least one message".into())).await { return; } continue; }
                            Err(m) => { if !reply(&mut socket, &err(m)).await { return; } continue; }
                        };
                        let images = match images.iter().map(|u| crate::api::image_from_data_url(u)).collect::<Result<Vec<_>, String>>() {
                            Ok(i) => i,
                            Err(m) => { if !reply(&mut socket, &err(m)).await { return; } continue; }
                        };
                        let mut gen = worker.defaults.clone();
                        if let Some(n) = max_new_tokens { gen.max_new_tokens = n.clamp(1, 8192); }
                        if let Some(p) = top_p { gen.top_p = p.clamp(0.01, 1.0); }
                        if let Some(t) = temperature {
                            gen.temperature = t.clamp(0.0, 2.0);
                            gen.do_sample = t > 0.0;
                        }
                        let (tx, rx) = mpsc::unbounded_channel();
                        let job = Job { messages, images, system, tools, gen, stop: Vec::new(), out: tx };
                        if let Err(e) = worker.submit(job) {
                            if !reply(&mut socket, &err(format!("{e:#}"))).await { return; }
                            continue;
                        }
                        current = Some(rx);
                    }
                }
            }
            _ = stopping.changed() => {
                let _ = socket.send(WsMessage::Close(None)).await;
                return;
            }
        }
    }
}
