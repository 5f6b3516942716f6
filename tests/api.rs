//! `llamafactory api`: OpenAI-shaped requests and responses over real HTTP, streaming included.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{bin, http, workdir, write_config, Server};

fn start(dir: &std::path::Path, key: Option<&str>) -> Server {
    let mut cmd = bin();
    cmd.args(["api", "cfg.yaml", "--port", "0"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd.env_remove("API_KEY")
        .env_remove("API_HOST")
        .env_remove("API_PORT");
    if let Some(k) = key {
        cmd.env("API_KEY", k);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    Server { child, addr }
}

#[test]
fn openai_client_shaped_requests() {
    let dir = workdir();
    write_config(dir.path(), "template: qwen\nmax_new_tokens: 16\n");
    let srv = start(dir.path(), None);
    let (status, body) = http(&srv.addr, "GET", "/v1/models", "", &[]);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "model");

    let req = r#"{"model": "model", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is a banana?"}], "temperature": 0, "max_tokens": 5}"#;
    let (status, body) = http(&srv.addr, "POST", "/v1/chat/completions", req, &[]);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 5);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    if usage["completion_tokens"] == 5 {
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }

    // Streaming: the same greedy text, chunk by chunk, then [DONE].
    let stream_req = req.replace("\"max_tokens\": 5", "\"max_tokens\": 5, \"stream\": true");
    let (status, body) = http(&srv.addr, "POST", "/v1/chat/completions", &stream_req, &[]);
    assert_eq!(status, 200);
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, text,
        "stream and non-stream agree under greedy decoding"
    );
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // Errors in OpenAI's shape.
    let (status, body) = http(&srv.addr, "POST", "/v1/chat/completions", "{not json", &[]);
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, body) = http(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "assistant", "content": "hi"}]}"#,
        &[],
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("alternate"), "{body}");
    let (status, _) = http(&srv.addr, "GET", "/v2/nothing", "", &[]);
    assert_eq!(status, 404);
}

#[test]
fn api_key_is_required_when_set() {
    let dir = workdir();
    write_config(dir.path(), "template: qwen\n");
    let srv = start(dir.path(), Some("sekrit"));
    let (status, body) = http(&srv.addr, "GET", "/v1/models", "", &[]);
    assert_eq!(status, 401);
    assert!(body.contains("authentication_error"));
    let (status, _) = http(
        &srv.addr,
        "GET",
        "/v1/models",
        "",
        &[("Authorization", "Bearer sekrit")],
    );
    assert_eq!(status, 200);
}
