//! The Chat tab: load / unload the model of the top bar, then chat with streamed replies (token by
//! token over `/api/chat`), a stop button, system prompt, tools and role, sampling settings.
//! Replies are shown as text with fenced code blocks; nothing is ever inserted as HTML.

use leptos::prelude::*;
use leptos::task::spawn_local;
use protocol::run::{ChatReply, ChatStatus};
use serde_json::{json, Value};

use crate::client::{get, send, Socket};
use crate::form::{choices, Field, Form, Select};
use crate::i18n::use_i18n;
use crate::use_ctx;
use protocol::args::InferDtype;

const CHAT_DEFAULTS: &[(&str, &str)] = &[
    ("infer_dtype", "auto"),
    ("system", ""),
    ("tools", ""),
    ("role", "user"),
    ("max_new_tokens", "1024"),
    ("top_p", "0.7"),
    ("temperature", "0.95"),
];

#[derive(Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
    /// Images first sent with this turn (data URLs), shown in its bubble.
    pub images: Vec<String>,
}

/// Splits text into prose and fenced code blocks (```lang ... ```).
pub fn blocks(text: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("```") {
        if start > 0 {
            out.push((false, rest[..start].to_string()));
        }
        let after = &rest[start + 3..];
        // Skip the language tag line.
        let body_start = after.find('\n').map(|i| i + 1).unwrap_or(after.len());
        let body = &after[body_start..];
        match body.find("```") {
            Some(end) => {
                out.push((true, body[..end].trim_end_matches('\n').to_string()));
                rest = &body[end + 3..];
            }
            None => {
                // An unfinished block while streaming.
                out.push((true, body.to_string()));
                rest = "";
            }
        }
    }
    if !rest.is_empty() {
        out.push((false, rest.to_string()));
    }
    out
}

#[component]
fn Bubble(turn: Turn) -> impl IntoView {
    let parts = blocks(&turn.content);
    view! {
        <div class=format!("bubble {}", turn.role) data-role=turn.role.clone()>
            {(!turn.images.is_empty()).then(|| view! {
                <div class="thumbs">
                    {turn.images.iter().map(|url| view! { <img class="thumb-img" src=url.clone() alt=""/> }).collect_view()}
                </div>
            })}
            {parts.into_iter().map(|(code, text)| if code {
                view! { <pre class="code"><code>{text}</code></pre> }.into_any()
            } else {
                view! { <p class="prose">{text}</p> }.into_any()
            }).collect_view()}
        </div>
    }
}

#[component]
pub fn ChatTab() -> impl IntoView {
    let i = use_i18n();
    let ctx = use_ctx();
    let form = Form::new("chat", CHAT_DEFAULTS);
    let status = RwSignal::new(None::<ChatStatus>);
    let history = RwSignal::new(Vec::<Turn>::new());
    let query = RwSignal::new(String::new());
    let streaming = RwSignal::new(false);
    // The conversation's images, `(file name, data URL)`.
    let images = RwSignal::new(Vec::<(String, String)>::new());
    let message = RwSignal::new(None::<String>);
    let socket = StoredValue::new_local(None::<Socket>);

    Effect::new(move |_| {
        spawn_local(async move {
            if let Ok(s) = get::<ChatStatus>("/api/chat/status").await {
                status.set(Some(s));
            }
        });
    });
    let loaded = move || status.get().is_some_and(|s| s.state == "loaded");
    let on_load = move |_| {
        message.set(None);
        ctx.top.clear_errors();
        let mut body = ctx.top_args();
        body.insert(
            "infer_dtype".into(),
            Value::String(form.get_untracked("infer_dtype")),
        );
        status.update(|s| {
            if let Some(s) = s {
                s.state = "loading".into();
            }
        });
        spawn_local(async move {
            match send::<_, ChatStatus>("POST", "/api/chat/load", &body).await {
                Ok(s) => status.set(Some(s)),
                Err(e) => {
                    message.set(ctx.place_error(&e, &[form]));
                    if let Ok(s) = get::<ChatStatus>("/api/chat/status").await {
                        status.set(Some(s));
                    }
                }
            }
        });
    };
    let on_unload = move |_| {
        spawn_local(async move {
            if let Ok(s) = send::<_, ChatStatus>("POST", "/api/chat/unload", &Value::Null).await {
                status.set(Some(s));
                history.set(Vec::new());
            }
        });
    };
    let on_reply = move |text: String| {
        let Ok(r) = serde_json::from_str::<ChatReply>(&text) else {
            return;
        };
        match r {
            ChatReply::Token { text } => history.update(|h| {
                if let Some(last) = h.last_mut() {
                    last.content.push_str(&text);
                }
            }),
            ChatReply::Done { .. } => streaming.set(false),
            ChatReply::Error { message: m } => {
                streaming.set(false);
                message.set(Some(m));
            }
        }
    };
    let submit = move || {
        let q = query.get_untracked();
        if q.trim().is_empty() || streaming.get_untracked() {
            return;
        }
        message.set(None);
        // The images added since the last message go with this one's bubble.
        let all: Vec<String> = images.get_untracked().into_iter().map(|(_, u)| u).collect();
        let shown: usize = history.with_untracked(|h| h.iter().map(|t| t.images.len()).sum());
        let new_images = all.get(shown.min(all.len())..).unwrap_or_default().to_vec();
        history.update(|h| {
            h.push(Turn {
                role: form.get_untracked("role"),
                content: q,
                images: new_images,
            });
        });
        query.set(String::new());
        let messages: Vec<Value> = history
            .get_untracked()
            .iter()
            .map(|t| json!({"role": t.role, "content": t.content}))
            .collect();
        history.update(|h| {
            h.push(Turn {
                role: "assistant".into(),
                content: String::new(),
                images: Vec::new(),
            })
        });
        let num = |k: &str| form.get_untracked(k).parse::<f64>().ok();
        let req = json!({
            "type": "generate",
            "messages": messages,
            "system": form.get_untracked("system"),
            "tools": form.get_untracked("tools"),
            "max_new_tokens": num("max_new_tokens").map(|n| n as usize),
            "top_p": num("top_p"),
            "temperature": num("temperature"),
            "images": images.get_untracked().into_iter().map(|(_, url)| url).collect::<Vec<_>>(),
        })
        .to_string();
        streaming.set(true);
        let open = socket.with_value(|s| s.as_ref().is_some_and(|s| s.is_open()));
        if open {
            socket.with_value(|s| s.as_ref().map(|s| s.send(&req)));
        } else {
            let ws = Socket::open("/api/chat", on_reply);
            if let Some(ws) = &ws {
                let req2 = req.clone();
                ws.on_open(move || {
                    socket.with_value(|s| s.as_ref().map(|s| s.send(&req2)));
                });
                ws.on_close(move || streaming.set(false));
            }
            socket.set_value(ws);
        }
    };
    let stop = move |_| {
        socket.with_value(|s| s.as_ref().map(|s| s.send(r#"{"type":"stop"}"#)));
    };
    view! {
        <div class="grid">
            <div class="field">
                <label for="f-backend">{i.t("infer_backend")}</label>
                <input id="f-backend" readonly prop:value=move || status.get().map(|s| s.backend).unwrap_or_else(|| "candle".into())/>
            </div>
            <Select form key="infer_dtype" label="infer_dtype" options={choices::<InferDtype>()}/>
        </div>
        <div class="actions">
            <button class="primary" data-testid="chat-load" disabled=move || status.get().is_some_and(|s| s.state == "loading") on:click=on_load>{i.t("load_model")}</button>
            <button data-testid="chat-unload" disabled=move || !loaded() on:click=on_unload>{i.t("unload_model")}</button>
        </div>
        <p class="message" role="status" data-testid="chat-status">
            {move || match status.get() {
                Some(s) if s.state == "loaded" => {
                    let adapter = s.adapter.map(|a| format!(" + {}", crate::short(&a))).unwrap_or_default();
                    format!("{} ({}{adapter})", i.tr("model_loaded"), crate::short(&s.model.unwrap_or_default()))
                }
                Some(s) if s.state == "loading" => i.tr("model_loading").to_string(),
                Some(s) if s.state == "failed" => format!("{}: {}", i.tr("load_failed"), s.error.unwrap_or_default()),
                _ => i.tr("model_unloaded").to_string(),
            }}
        </p>
        {move || message.get().map(|m| view! { <pre class="error-box" data-testid="chat-error">{m}</pre> })}
        <div class="chat-box" class:hidden=move || !loaded()>
            <div class="chat-log" data-testid="chat-log" aria-live="polite">
                {move || history.get().into_iter().map(|t| view! { <Bubble turn=t/> }).collect_view()}
            </div>
            <div class="grid">
                <Select form key="role" label="role" options=vec![("user", "user"), ("observation", "observation")]/>
                <Field form key="system" label="system_prompt"/>
                <Field form key="tools" label="tools"/>
            </div>
            <textarea rows="4" data-testid="chat-input" placeholder=i.t("input")
                prop:value=move || query.get()
                on:input=move |ev| query.set(event_target_value(&ev))
                on:keydown=move |ev| if ev.key() == "Enter" && (ev.ctrl_key() || ev.meta_key()) { submit() }></textarea>
            <div class="actions">
                <button class="primary" data-testid="chat-submit" disabled=move || streaming.get() on:click=move |_| submit()>{i.t("submit")}</button>
                <button data-testid="chat-stop" disabled=move || !streaming.get() on:click=stop>{i.t("stop")}</button>
                <button data-testid="chat-clear" on:click=move |_| { history.set(Vec::new()); images.set(Vec::new()); }>{i.t("clear_history")}</button>
            </div>
            <div class="field" class:hidden=move || !status.get().is_some_and(|s| s.takes_images)>
                <label for="f-chat-image">{i.t("image_input")}</label>
                <input id="f-chat-image" type="file" accept="image/*" multiple data-testid="chat-image"
                    on:change=move |_| spawn_local(async move {
                        match crate::client::read_images("f-chat-image").await {
                            Ok(new) => images.update(|v| v.extend(new)),
                            Err(e) => message.set(Some(e.message)),
                        }
                    })/>
                <div class="thumbs">
                    {move || images.get().into_iter().enumerate().map(|(k, (name, url))| view! {
                        <figure class="thumb" data-testid="chat-image-thumb">
                            <img src=url alt=name.clone() title=name/>
                            <button aria-label=i.t("remove") on:click=move |_| images.update(|v| { if k < v.len() { v.remove(k); } })>"×"</button>
                        </figure>
                    }).collect_view()}
                </div>
            </div>
            <div class="grid">
                <Field form key="max_new_tokens" label="max_new_tokens" kind="number" min="8" max="8192"/>
                <Field form key="top_p" label="top_p" kind="number" min="0.01" max="1" step="0.01"/>
                <Field form key="temperature" label="temperature" kind="number" min="0" max="1.5" step="0.01"/>
            </div>
        </div>
    }
    .into_any()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_code_is_split_out() {
        let b = blocks("Here:\n```rust\nfn main() {}\n```\nDone <b>");
        assert_eq!(
            b,
            vec![
                (false, "Here:\n".to_string()),
                (true, "fn main() {}".to_string()),
                (false, "\nDone <b>".to_string()),
            ]
        );
        assert_eq!(blocks("```py\nx = 1"), vec![(true, "x = 1".to_string())]);
    }
}
