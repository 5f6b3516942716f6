//! Tool formats (`tool_format`): how a template writes the tool list into the system prompt,
//! how it writes the assistant's function calls, and how it reads calls back from generated text.
//! Each mirrors LLaMA-Factory's `ToolUtils` of the same name, character for character.

use serde_json::{json, Value};

use crate::data::pyjson::dumps;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Default,
    Llama3,
    Mistral,
    Qwen,
    Glm4,
}

pub const TOOL_FORMATS: &[&str] = &["default", "glm4", "llama3", "mistral", "qwen"];

impl ToolFormat {
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "default" => Self::Default,
            "llama3" => Self::Llama3,
            "mistral" => Self::Mistral,
            "qwen" => Self::Qwen,
            "glm4" => Self::Glm4,
            other => {
                return Err(format!(
                    "unknown tool_format `{other}`; supported: {}",
                    TOOL_FORMATS.join(", ")
                ))
            }
        })
    }
}

/// A function call: name and its arguments as a JSON string.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

fn py_str(v: Option<&Value>) -> String {
    match v {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => "None".into(),
        Some(other) => dumps(other, None),
    }
}

fn wrapped(tool: &Value) -> Value {
    if tool.get("type").and_then(Value::as_str) == Some("function") {
        tool.clone()
    } else {
        json!({"type": "function", "function": tool})
    }
}

fn parse_args(arguments: &str) -> Result<Value, String> {
    serde_json::from_str(arguments)
        .map_err(|e| format!("function arguments are not valid JSON: {e}"))
}

const QWEN_TOOL_PROMPT_HEAD: &str = "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const QWEN_TOOL_PROMPT_TAIL: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";
const GLM4_TOOL_PROMPT: &str = "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具";

impl ToolFormat {
    /// The system-prompt text describing `tools` (a JSON list).
    pub fn tool_formatter(self, tools: &[Value], today: &str) -> Result<String, String> {
        Ok(match self {
            Self::Default => {
                let mut tool_text = String::new();
                let mut names = Vec::new();
                for tool in tools {
                    let tool = if tool.get("type").and_then(Value::as_str) == Some("function") {
                        tool.get("function")
                            .cloned()
                            .unwrap_or(Value::String(String::new()))
                    } else {
                        tool.clone()
                    };
                    let name = tool
                        .get("name")
                        .map(|n| py_str(Some(n)))
                        .ok_or("a tool has no `name`")?;
                    let params = tool
                        .get("parameters")
                        .ok_or_else(|| format!("tool `{name}` has no `parameters`"))?;
                    let props = params
                        .get("properties")
                        .and_then(Value::as_object)
                        .ok_or_else(|| {
                            format!("tool `{name}`: `parameters.properties` is missing")
                        })?;
                    let required: Vec<&str> = params
                        .get("required")
                        .and_then(Value::as_array)
                        .map(|r| r.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut param_text = String::new();
                    for (pname, param) in props {
                        let req = if required.contains(&pname.as_str()) {
                            ", required"
                        } else {
                            ""
                        };
                        let enum_text = match param.get("enum") {
                            Some(Value::Array(e)) if !e.is_empty() => {
                                format!(
                                    ", should be one of [{}]",
                                    e.iter()
                                        .map(|x| py_str(Some(x)))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )
                            }
                            _ => String::new(),
                        };
                        let items = match param.get("items") {
                            Some(items) if items.as_object().is_some_and(|o| !o.is_empty()) => {
                                format!(", where each item should be {}", py_str(items.get("type")))
                            }
                            _ => String::new(),
                        };
                        param_text += &format!(
                            "  - {pname} ({}{req}): {}{enum_text}{items}\n",
                            py_str(param.get("type")),
                            py_str(param.get("description"))
                        );
                    }
                    tool_text += &format!(
                        "> Tool Name: {name}\nTool Description: {}\nTool Args:\n{param_text}\n",
                        py_str(tool.get("description"))
                    );
                    names.push(name);
                }
                format!(
                    "You have access to the following tools:\n{tool_text}Use the following format if using a tool:\n```\nAction: tool name (one of [{}])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{{\"input\": \"hello world\", \"num_beams\": 5}}```)\n```\n",
                    names.join(", ")
                )
            }
            Self::Llama3 => {
                let tool_text: String = tools
                    .iter()
                    .map(|t| dumps(&wrapped(t), Some(4)) + "\n\n")
                    .collect();
                format!(
                    "Cutting Knowledge Date: December 2023\nToday Date: {today}\n\nYou have access to the following functions. To call a function, please respond with JSON for a function call. Respond in the format {{\"name\": function name, \"parameters\": dictionary of argument name and its value}}. Do not use variables.\n\n{tool_text}"
                )
            }
            Self::Mistral => {
                let list: Vec<Value> = tools.iter().map(wrapped).collect();
                format!(
                    "[AVAILABLE_TOOLS] {}[/AVAILABLE_TOOLS]",
                    dumps(&Value::Array(list), None)
                )
            }
            Self::Qwen => {
                let tool_text: String = tools
                    .iter()
                    .map(|t| "\n".to_string() + &dumps(&wrapped(t), None))
                    .collect();
                format!("{QWEN_TOOL_PROMPT_HEAD}{tool_text}{QWEN_TOOL_PROMPT_TAIL}")
            }
            Self::Glm4 => {
                let mut tool_text = String::new();
                for tool in tools {
                    let tool = if tool.get("type").and_then(Value::as_str) == Some("function") {
                        tool.get("function").cloned().unwrap_or_default()
                    } else {
                        tool.clone()
                    };
                    tool_text += &format!(
                        "\n\n## {}\n\n{}\n在调用上述函数时，请使用 Json 格式表示调用的参数。",
                        py_str(tool.get("name")),
                        dumps(&tool, Some(4))
                    );
                }
                format!("{GLM4_TOOL_PROMPT}{tool_text}")
            }
        })
    }

    /// The assistant text for a list of function calls.
    pub fn function_formatter(self, functions: &[FunctionCall]) -> Result<String, String> {
        Ok(match self {
            Self::Default => functions
                .iter()
                .map(|f| format!("Action: {}\nAction Input: {}", f.name, f.arguments))
                .collect::<Vec<_>>()
                .join("\n"),
            Self::Llama3 => {
                let objs = functions
                    .iter()
                    .map(|f| Ok(json!({"name": f.name, "parameters": parse_args(&f.arguments)?})))
                    .collect::<Result<Vec<_>, String>>()?;
                if objs.len() == 1 {
                    dumps(&objs[0], None)
                } else {
                    dumps(&Value::Array(objs), None)
                }
            }
            Self::Mistral => {
                let objs = functions
                    .iter()
                    .map(|f| Ok(json!({"name": f.name, "arguments": parse_args(&f.arguments)?})))
                    .collect::<Result<Vec<_>, String>>()?;
                dumps(&Value::Array(objs), None)
            }
            Self::Qwen => functions
                .iter()
                .map(|f| {
                    let text = dumps(
                        &json!({"name": f.name, "arguments": parse_args(&f.arguments)?}),
                        None,
                    );
                    Ok(format!("<tool_call>\n{text}\n</tool_call>"))
                })
                .collect::<Result<Vec<_>, String>>()?
                .join("\n"),
            Self::Glm4 => {
                if functions.len() > 1 {
                    return Err("GLM-4 does not support parallel functions.".into());
                }
                let f = functions.first().ok_or("no function call")?;
                format!("{}\n{}", f.name, f.arguments)
            }
        })
    }

    /// Function calls found in generated text, or `None` when it is a plain reply.
    pub fn tool_extractor(self, content: &str) -> Option<Vec<FunctionCall>> {
        let call = |name: &str, args: &Value| FunctionCall {
            name: name.to_string(),
            arguments: dumps(args, None),
        };
        match self {
            Self::Default => {
                let mut out = Vec::new();
                let mut rest = content;
                while let Some(pos) = rest.find("Action:") {
                    let after = &rest[pos + "Action:".len()..];
                    let input_pos = after.find("Action Input:")?;
                    let name = after[..input_pos].trim();
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return None;
                    }
                    let after_input = &after[input_pos + "Action Input:".len()..];
                    let end = after_input.find("Action:").unwrap_or(after_input.len());
                    let raw = after_input[..end]
                        .trim()
                        .trim_matches('"')
                        .trim_matches('`');
                    let args: Value = serde_json::from_str(raw).ok()?;
                    out.push(call(name, &args));
                    rest = &after_input[end..];
                }
                (!out.is_empty()).then_some(out)
            }
            Self::Llama3 | Self::Mistral => {
                let key = if self == Self::Llama3 {
                    "parameters"
                } else {
                    "arguments"
                };
                let v: Value = serde_json::from_str(content.trim()).ok()?;
                let list = match v {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                list.iter()
                    .map(|t| Some(call(t.get("name")?.as_str()?, t.get(key)?)))
                    .collect()
            }
            Self::Qwen => {
                let mut out = Vec::new();
                let mut rest = content;
                while let Some(start) = rest.find("<tool_call>") {
                    let after = &rest[start + "<tool_call>".len()..];
                    let end = after.find("</tool_call>")?;
                    let v: Value = serde_json::from_str(after[..end].trim()).ok()?;
                    out.push(call(v.get("name")?.as_str()?, v.get("arguments")?));
                    rest = &after[end + "</tool_call>".len()..];
                }
                (!out.is_empty()).then_some(out)
            }
            Self::Glm4 => {
                let (name, input) = content.split_once('\n')?;
                let args: Value = serde_json::from_str(input.trim()).ok()?;
                Some(vec![call(name, &args)])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Value> {
        vec![json!({"name": "get_weather", "description": "Get weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"]},
                "days": {"type": "array", "description": "Days", "items": {"type": "integer"}}},
              "required": ["city"]}})]
    }

    #[test]
    fn default_tool_prompt_matches_llamafactory() {
        let text = ToolFormat::Default.tool_formatter(&tools(), "").unwrap();
        assert_eq!(
            text,
            "You have access to the following tools:\n> Tool Name: get_weather\nTool Description: Get weather\nTool Args:\n  - city (string, required): City name\n  - unit (string): Unit, should be one of [c, f]\n  - days (array): Days, where each item should be integer\n\nUse the following format if using a tool:\n```\nAction: tool name (one of [get_weather])\nAction Input: the input to the tool, in a JSON format representing the kwargs (e.g. ```{\"input\": \"hello world\", \"num_beams\": 5}```)\n```\n"
        );
    }

    #[test]
    fn function_calls_round_trip() {
        let calls = vec![FunctionCall {
            name: "f".into(),
            arguments: r#"{"a": 1}"#.into(),
        }];
        for fmt in [
            ToolFormat::Default,
            ToolFormat::Llama3,
            ToolFormat::Mistral,
            ToolFormat::Qwen,
            ToolFormat::Glm4,
        ] {
            let text = fmt.function_formatter(&calls).unwrap();
            assert_eq!(
                fmt.tool_extractor(&text),
                Some(calls.clone()),
                "{fmt:?}: {text}"
            );
        }
        assert_eq!(
            ToolFormat::Qwen.function_formatter(&calls).unwrap(),
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"
        );
        assert_eq!(ToolFormat::Qwen.tool_extractor("plain reply"), None);
    }
}
