//! Alpaca, ShareGPT and OpenAI records → one aligned form (LLaMA-Factory's `_prompt`,
//! `_response`, `_system`, `_tools`, `_images`, ...). A record LLaMA-Factory would log as
//! abnormal is returned as an error string naming the reason; the pipeline skips and counts it.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use super::dataset_info::{DatasetAttr, Formatting};
use super::loader::Record;
use super::pyjson;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    System,
    Function,
    Observation,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// One example in the aligned form.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Example {
    pub prompt: Vec<Message>,
    pub response: Vec<Message>,
    pub system: String,
    pub tools: String,
    pub images: Vec<String>,
    pub videos: Vec<String>,
    pub audios: Vec<String>,
    #[serde(skip)]
    pub file: Arc<str>,
    #[serde(skip)]
    pub row: usize,
}

type Conv<T> = Result<T, String>;

/// `example[column]` with Python's truthiness helpers; a missing key reads as null like a
/// `datasets` column absent from one row.
fn col<'a>(rec: &'a Map<String, Value>, column: &Option<String>) -> Option<&'a Value> {
    column
        .as_ref()
        .and_then(|c| rec.get(c))
        .filter(|v| !v.is_null())
}

fn text(v: Option<&Value>, what: &str) -> Conv<String> {
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{what} must be a string, got {other}")),
    }
}

fn tools_text(v: Option<&Value>) -> String {
    match v {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => pyjson::dumps(other, None),
    }
}

/// LLaMA-Factory's `_find_medias`: a path is joined with `media_dir` when that file exists.
fn medias(v: Option<&Value>, media_dir: &Path) -> Conv<Vec<String>> {
    let items: Vec<&Value> = match v {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().collect(),
        Some(other) => vec![other],
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::String(p) => {
                let joined = media_dir.join(p);
                out.push(if joined.is_file() {
                    joined.display().to_string()
                } else {
                    p.clone()
                });
            }
            // Video frames come as nested lists; keep them as JSON text.
            other => out.push(other.to_string()),
        }
    }
    Ok(out)
}

fn tag_role(attr: &DatasetAttr, tag: &str) -> Option<Role> {
    // Later entries win, as in LLaMA-Factory's dict literal.
    let mut role = None;
    for (t, r) in [
        (&attr.user_tag, Role::User),
        (&attr.assistant_tag, Role::Assistant),
        (&attr.observation_tag, Role::Observation),
        (&attr.function_tag, Role::Function),
        (&attr.system_tag, Role::System),
    ] {
        if t.as_deref() == Some(tag) {
            role = Some(r);
        }
    }
    role
}

fn kto_flag(rec: &Map<String, Value>, attr: &DatasetAttr) -> Option<bool> {
    col(rec, &attr.kto_tag).and_then(Value::as_bool)
}

fn kto_response(last: Message, desirable: bool) -> Vec<Message> {
    let empty = Message::new(Role::Assistant, "");
    if desirable {
        vec![last, empty]
    } else {
        vec![empty, last]
    }
}

pub fn convert(rec: &Record, attr: &DatasetAttr, media_dir: &Path) -> Conv<Example> {
    let v = &rec.value;
    let (prompt, response, system, tools) = match attr.formatting {
        Formatting::Alpaca => alpaca(v, attr)?,
        Formatting::Sharegpt => sharegpt(v, attr)?,
        Formatting::Openai => openai(v, attr)?,
    };
    Ok(Example {
        prompt,
        response,
        system,
        tools,
        images: medias(col(v, &attr.images), media_dir)?,
        videos: medias(col(v, &attr.videos), media_dir)?,
        audios: medias(col(v, &attr.audios), media_dir)?,
        file: rec.file.clone(),
        row: rec.row,
    })
}

type Aligned = (Vec<Message>, Vec<Message>, String, String);

fn alpaca(v: &Map<String, Value>, attr: &DatasetAttr) -> Conv<Aligned> {
    let mut prompt = Vec::new();
    if let Some(Value::Array(history)) = col(v, &attr.history) {
        for (i, turn) in history.iter().enumerate() {
            let pair = turn.as_array().filter(|p| p.len() == 2);
            let (Some(Value::String(q)), Some(Value::String(a))) =
                (pair.map(|p| &p[0]), pair.map(|p| &p[1]))
            else {
                return Err(format!(
                    "history entry {} must be a [prompt, response] pair of strings",
                    i + 1
                ));
            };
            prompt.push(Message::new(Role::User, q.clone()));
            prompt.push(Message::new(Role::Assistant, a.clone()));
        }
    }
    let mut query = Vec::new();
    for (column, what) in [(&attr.prompt, "prompt"), (&attr.query, "query")] {
        let t = text(
            col(v, column),
            &format!("{what} column `{}`", column.as_deref().unwrap_or("")),
        )?;
        if !t.is_empty() {
            query.push(t);
        }
    }
    prompt.push(Message::new(Role::User, query.join("\n")));
    let response_text = col(v, &attr.response);
    let response = if let (Some(tag), Some(Value::String(r))) = (kto_flag(v, attr), response_text) {
        kto_response(Message::new(Role::Assistant, r.clone()), tag)
    } else if let (true, Some(Value::String(c)), Some(Value::String(r))) =
        (attr.ranking, col(v, &attr.chosen), col(v, &attr.rejected))
    {
        vec![
            Message::new(Role::Assistant, c.clone()),
            Message::new(Role::Assistant, r.clone()),
        ]
    } else if let Some(Value::String(r)) = response_text {
        vec![Message::new(Role::Assistant, r.clone())]
    } else {
        Vec::new()
    };
    let system = text(col(v, &attr.system), "system column")?;
    Ok((prompt, response, system, tools_text(col(v, &attr.tools))))
}

fn messages_of<'a>(
    v: &'a Map<String, Value>,
    attr: &DatasetAttr,
) -> Conv<Vec<&'a Map<String, Value>>> {
    let name = attr.messages.as_deref().unwrap_or("conversations");
    let Some(Value::Array(list)) = col(v, &attr.messages) else {
        return Err(format!(
            "column `{name}` is missing or not a list of messages"
        ));
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            m.as_object()
                .ok_or_else(|| format!("message {} of `{name}` is not an object", i + 1))
        })
        .collect()
}

fn field<'a>(
    m: &'a Map<String, Value>,
    tag: &Option<String>,
    i: usize,
    what: &str,
) -> Conv<&'a str> {
    let name = tag.as_deref().unwrap_or(what);
    match m.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "message {}: `{name}` must be a string, got {other}",
            i + 1
        )),
        None => Err(format!("message {}: field `{name}` is missing", i + 1)),
    }
}

/// Splits off a leading system message, else reads the system column.
fn split_system<'a>(
    v: &Map<String, Value>,
    attr: &DatasetAttr,
    msgs: Vec<&'a Map<String, Value>>,
) -> Conv<(String, Vec<&'a Map<String, Value>>)> {
    if let (Some(tag), Some(first)) = (&attr.system_tag, msgs.first()) {
        if first
            .get(attr.role_tag.as_deref().unwrap_or("from"))
            .and_then(Value::as_str)
            == Some(tag.as_str())
        {
            let sys = field(first, &attr.content_tag, 0, "value")?.to_string();
            return Ok((sys, msgs[1..].to_vec()));
        }
    }
    Ok((text(col(v, &attr.system), "system column")?, msgs))
}

fn is_odd_role(r: Role) -> bool {
    matches!(r, Role::User | Role::Observation)
}
fn is_even_role(r: Role) -> bool {
    matches!(r, Role::Assistant | Role::Function)
}

fn check_count(n: usize, ranking: bool) -> Conv<()> {
    if n.is_multiple_of(2) == ranking {
        return Err(format!(
            "Invalid message count: {n} messages, expected an {} number",
            if ranking { "odd" } else { "even" }
        ));
    }
    Ok(())
}

/// Pairwise, KTO or plain split of checked messages into prompt and response.
fn finish(
    v: &Map<String, Value>,
    attr: &DatasetAttr,
    mut aligned: Vec<Message>,
) -> Conv<(Vec<Message>, Vec<Message>)> {
    if let Some(tag) = kto_flag(v, attr) {
        let last = aligned.pop().ok_or("no messages")?;
        return Ok((aligned, kto_response(last, tag)));
    }
    if attr.ranking {
        if let (Some(Value::Object(c)), Some(Value::Object(r))) =
            (col(v, &attr.chosen), col(v, &attr.rejected))
        {
            let mut response = Vec::new();
            for (m, what) in [(c, "chosen"), (r, "rejected")] {
                let role_tag =
                    field(m, &attr.role_tag, 0, "from").map_err(|e| format!("{what}: {e}"))?;
                let role = tag_role(attr, role_tag).filter(|r| is_even_role(*r));
                let Some(role) = role else {
                    return Err(format!("Invalid role tag `{role_tag}` in {what}: expected an assistant or function message"));
                };
                let content =
                    field(m, &attr.content_tag, 0, "value").map_err(|e| format!("{what}: {e}"))?;
                response.push(Message::new(role, content));
            }
            return Ok((aligned, response));
        }
    }
    let last = aligned.pop().into_iter().collect();
    Ok((aligned, last))
}

fn sharegpt(v: &Map<String, Value>, attr: &DatasetAttr) -> Conv<Aligned> {
    let (system, msgs) = split_system(v, attr, messages_of(v, attr)?)?;
    let mut aligned = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let tag = field(m, &attr.role_tag, i, "from")?;
        let role = tag_role(attr, tag);
        let ok = match role {
            Some(r) if i % 2 == 0 => is_odd_role(r),
            Some(r) => is_even_role(r),
            None => false,
        };
        if !ok {
            return Err(format!(
                "Invalid role tag `{tag}` in message {}: expected {}",
                i + 1,
                if i % 2 == 0 {
                    "a user or observation turn"
                } else {
                    "an assistant or function turn"
                }
            ));
        }
        aligned.push(Message::new(
            role.unwrap_or(Role::User),
            field(m, &attr.content_tag, i, "value")?,
        ));
    }
    check_count(aligned.len(), attr.ranking)?;
    let (prompt, response) = finish(v, attr, aligned)?;
    Ok((prompt, response, system, tools_text(col(v, &attr.tools))))
}

fn openai(v: &Map<String, Value>, attr: &DatasetAttr) -> Conv<Aligned> {
    let (mut system, msgs) = split_system(v, attr, messages_of(v, attr)?)?;
    let role_key = attr.role_tag.as_deref().unwrap_or("role");
    let mut aligned: Vec<Message> = Vec::new();
    let mut tool_responses: Vec<String> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let mut tag = field(m, &attr.role_tag, i, role_key)?.to_string();
        let mut content = match m.get(attr.content_tag.as_deref().unwrap_or("content")) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(other) => {
                return Err(format!(
                    "message {}: content must be a string, got {other}",
                    i + 1
                ))
            }
        };
        if Some(&tag) == attr.assistant_tag.as_ref() || Some(&tag) == attr.function_tag.as_ref() {
            if let Some(Value::Array(calls)) = m.get("tool_calls") {
                if !calls.is_empty() {
                    let functions: Vec<Value> = calls
                        .iter()
                        .map(|c| c.get("function").cloned().unwrap_or(Value::Null))
                        .collect();
                    content = pyjson::dumps(&Value::Array(functions), None);
                    tag = attr.function_tag.clone().unwrap_or_default();
                }
            }
        }
        if Some(&tag) == attr.observation_tag.as_ref() {
            tool_responses.push(content);
            continue;
        } else if !tool_responses.is_empty() {
            aligned.push(Message::new(
                Role::Observation,
                tool_responses.join("\n</tool_response>\n<tool_response>\n"),
            ));
            tool_responses.clear();
        }
        let role = tag_role(attr, &tag)
            .ok_or_else(|| format!("Invalid role tag `{tag}` in message {}", i + 1))?;
        aligned.push(Message::new(role, content));
    }
    for (i, m) in aligned.iter().enumerate() {
        let ok = if i % 2 == 0 {
            is_odd_role(m.role)
        } else {
            is_even_role(m.role)
        };
        if !ok {
            return Err(format!(
                "Invalid role order at message {}: roles must alternate user/assistant",
                i + 1
            ));
        }
    }
    check_count(aligned.len(), attr.ranking)?;
    let (prompt, response) = finish(v, attr, aligned)?;
    let tools = tools_text(col(v, &attr.tools));
    // LLaMA-Factory's OpenAI converter appends Nemotron's thinking switch.
    const SHORT: &str = "detailed thinking off";
    if system.is_empty() {
        if tools.is_empty() {
            system = SHORT.into();
        }
    } else if tools.is_empty() {
        if !system.contains("detailed thinking on") && !system.contains(SHORT) {
            system.push('\n');
            system.push_str(SHORT);
        }
    } else {
        system.push('\n');
    }
    Ok((prompt, response, system, tools))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset_info::DatasetInfo;
    use serde_json::json;

    fn attr(entry: Value) -> DatasetAttr {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dataset_info.json"),
            json!({ "d": entry }).to_string(),
        )
        .unwrap();
        DatasetInfo::load(dir.path()).unwrap().attr("d").unwrap()
    }

    fn rec(v: Value) -> Record {
        Record {
            file: Arc::from("f.json"),
            row: 1,
            value: v.as_object().unwrap().clone(),
        }
    }

    fn conv(entry: Value, v: Value) -> Conv<Example> {
        convert(&rec(v), &attr(entry), Path::new("/nonexistent"))
    }

    #[test]
    fn alpaca_joins_prompt_and_query_and_history() {
        let e = conv(
            json!({"file_name": "x", "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"}}),
            json!({"instruction": "Add", "input": "1 2", "output": "3", "system": "S", "history": [["q0", "a0"]]}),
        )
        .unwrap();
        assert_eq!(
            e.prompt,
            vec![
                Message::new(Role::User, "q0"),
                Message::new(Role::Assistant, "a0"),
                Message::new(Role::User, "Add\n1 2")
            ]
        );
        assert_eq!(e.response, vec![Message::new(Role::Assistant, "3")]);
        assert_eq!(e.system, "S");
        let e = conv(
            json!({"file_name": "x"}),
            json!({"instruction": "Hi", "input": ""}),
        )
        .unwrap();
        assert!(e.response.is_empty());
    }

    #[test]
    fn alpaca_ranking_and_kto() {
        let e = conv(
            json!({"file_name": "x", "ranking": true, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}),
            json!({"instruction": "Q", "chosen": "good", "rejected": "bad"}),
        )
        .unwrap();
        assert_eq!(e.response.len(), 2);
        let e = conv(
            json!({"file_name": "x", "columns": {"prompt": "instruction", "response": "output", "kto_tag": "label"}}),
            json!({"instruction": "Q", "output": "bad", "label": false}),
        )
        .unwrap();
        assert_eq!(
            e.response,
            vec![
                Message::new(Role::Assistant, ""),
                Message::new(Role::Assistant, "bad")
            ]
        );
    }

    #[test]
    fn sharegpt_roles_system_and_errors() {
        let entry = json!({"file_name": "x", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}});
        let e = conv(
            entry.clone(),
            json!({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"},
                                     {"from": "observation", "value": "o"}, {"from": "gpt", "value": "a"}], "tools": "[]"}),
        )
        .unwrap();
        assert_eq!(e.system, "S");
        assert_eq!(e.prompt.len(), 3);
        assert_eq!(e.prompt[1].role, Role::Function);
        assert_eq!(e.tools, "[]");
        let err = conv(entry.clone(), json!({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]})).unwrap_err();
        assert!(err.contains("Invalid role tag `gpt` in message 1"), "{err}");
        let err = conv(
            entry.clone(),
            json!({"conversations": [{"from": "human", "value": "q"}]}),
        )
        .unwrap_err();
        assert!(err.contains("Invalid message count"), "{err}");
        let err = conv(entry.clone(), json!({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]})).unwrap_err();
        assert!(err.contains("message 1: `value` must be a string"), "{err}");
        let err = conv(entry, json!({"other": 1})).unwrap_err();
        assert!(err.contains("column `conversations` is missing"), "{err}");
    }

    #[test]
    fn openai_tool_calls_and_merged_observations() {
        let entry = json!({"file_name": "x", "formatting": "openai", "columns": {"messages": "messages", "tools": "tools"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}});
        let e = conv(
            entry.clone(),
            json!({"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                                {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"},
                                {"role": "assistant", "content": "done"}],
                   "tools": [{"name": "f"}]}),
        )
        .unwrap();
        assert_eq!(
            e.prompt[1],
            Message::new(Role::Function, r#"[{"name": "f", "arguments": {"x": 1}}]"#)
        );
        assert_eq!(
            e.prompt[2],
            Message::new(
                Role::Observation,
                "r1\n</tool_response>\n<tool_response>\nr2"
            )
        );
        assert_eq!(e.tools, r#"[{"name": "f"}]"#);
        assert_eq!(e.system, "");
        let e = conv(entry, json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})).unwrap();
        assert_eq!(e.system, "detailed thinking off");
    }
}
