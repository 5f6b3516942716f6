//! Chat templates at the token level, as LLaMA-Factory encodes them: each message becomes slots
//! (text, a named special token, bos, eos), slots become ids with `add_special_tokens=False`.

pub mod auto;
mod jinja;
pub mod registry;
pub mod tools;

use serde_json::Value;

use crate::data::converter::{Message, Role};
use crate::tokenizer::HfTokenizer;
pub use registry::{get_template, TEMPLATE_NAMES};
use tools::{FunctionCall, ToolFormat};

#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// Text with `{{content}}` / `{{idx}}` placeholders.
    Text(String),
    /// One special token by name (LLaMA-Factory's `{"token": ...}`).
    Token(String),
    Bos,
    Eos,
}

fn t(s: &str) -> Slot {
    Slot::Text(s.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    Plain,
    /// System text fused into the first user message (`Llama2Template`).
    Llama2,
    /// Adds empty thoughts to answers without any (`ReasoningTemplate`).
    Reasoning,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub kind: TemplateKind,
    pub format_user: Vec<Slot>,
    pub format_assistant: Vec<Slot>,
    pub format_system: Vec<Slot>,
    pub format_function: Vec<Slot>,
    pub function_tool_format: ToolFormat,
    pub format_observation: Vec<Slot>,
    pub tool_format: ToolFormat,
    pub format_prefix: Vec<Slot>,
    pub default_system: String,
    pub stop_words: Vec<String>,
    pub thought_words: (String, String),
    pub tool_call_words: (String, String),
    pub efficient_eos: bool,
    /// How images enter the text (LLaMA-Factory's `mm_plugin`).
    pub mm: MmPlugin,
    pub replace_eos: bool,
    pub replace_jinja_template: bool,
    pub enable_thinking: bool,
    pub preserve_thinking: bool,
    /// "Today Date" of the Llama 3 tool prompt (`%d %b %Y`); fixed by tests.
    pub today: String,
}

/// Encoding fails only on malformed tool JSON, which makes the example invalid.
pub type Encoded<T> = Result<T, String>;

fn apply(slots: &[Slot], content: &str, idx: Option<&str>) -> Vec<Slot> {
    slots
        .iter()
        .map(|s| match s {
            Slot::Text(text) => {
                let mut text = text.replacen("{{content}}", content, 1);
                if let Some(idx) = idx {
                    text = text.replacen("{{idx}}", idx, 1);
                }
                Slot::Text(text)
            }
            other => other.clone(),
        })
        .collect()
}

fn first_text(slots: Vec<Slot>) -> String {
    match slots.into_iter().next() {
        Some(Slot::Text(s)) => s,
        _ => String::new(),
    }
}

fn find_between<'a>(content: &'a str, open: &str, close: &str) -> Option<(usize, usize, &'a str)> {
    if open.is_empty() || close.is_empty() {
        return None;
    }
    let start = content.find(open)?;
    let inner_start = start + open.len();
    let end = content[inner_start..].find(close)? + inner_start;
    Some((start, end + close.len(), &content[inner_start..end]))
}

/// How a template puts images into the text: LLaMA-Factory's `mm_plugin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmPlugin {
    /// Text only: a dataset with images is refused.
    Base,
    /// Qwen2-VL: each `<image>` becomes `<|vision_start|>`, one `<|image_pad|>` per merged
    /// 2×2 patch window, `<|vision_end|>`.
    Qwen2Vl,
    /// LLaVA: each `<image>` becomes the tower's fixed number of `<image>` tokens.
    Llava,
}

impl Template {
    fn builder(name: &str) -> Self {
        Self {
            name: name.to_string(),
            kind: TemplateKind::Plain,
            format_user: vec![t("{{content}}")],
            format_assistant: vec![t("{{content}}"), Slot::Eos],
            format_system: vec![t("{{content}}")],
            format_function: vec![t("{{content}}"), Slot::Eos],
            function_tool_format: ToolFormat::Default,
            format_observation: vec![t("{{content}}")],
            tool_format: ToolFormat::Default,
            format_prefix: Vec::new(),
            default_system: String::new(),
            stop_words: Vec::new(),
            thought_words: ("<think>\n".into(), "\n</think>\n\n".into()),
            tool_call_words: ("<tool_call>".into(), "</tool_call>".into()),
            efficient_eos: false,
            mm: MmPlugin::Base,
            replace_eos: false,
            replace_jinja_template: false,
            enable_thinking: true,
            preserve_thinking: false,
            today: chrono::Local::now().format("%d %b %Y").to_string(),
        }
    }

    /// Applies `tool_format` and `default_system` overrides from the arguments, as
    /// `get_template_and_fix_tokenizer` does.
    pub fn with_overrides(mut self, args: &protocol::TrainArgs) -> Result<Self, String> {
        if let Some(fmt) = &args.tool_format {
            let fmt = ToolFormat::parse(fmt)?;
            self.format_function = if self.efficient_eos {
                vec![t("{{content}}")]
            } else {
                vec![t("{{content}}"), Slot::Eos]
            };
            self.function_tool_format = fmt;
            self.tool_format = fmt;
        }
        if let Some(sys) = &args.default_system {
            self.default_system = sys.clone();
        }
        if self.kind == TemplateKind::Reasoning {
            self.enable_thinking = args.enable_thinking;
            self.preserve_thinking = args.preserve_thinking;
        }
        if args.train_on_prompt && self.efficient_eos {
            return Err("Current template does not support `train_on_prompt`.".into());
        }
        Ok(self)
    }

    fn format_tools(&self, tools: &str) -> Encoded<String> {
        let parsed: Value = serde_json::from_str(tools)
            .map_err(|e| format!("Invalid JSON format in tool description: {e}"))?;
        let list = match parsed {
            Value::Array(a) => a,
            Value::Object(o) if o.is_empty() => Vec::new(),
            other => vec![other],
        };
        if list.is_empty() {
            return Ok(String::new());
        }
        self.tool_format.tool_formatter(&list, &self.today)
    }

    fn format_function_call(&self, content: &str, with_words: bool) -> Encoded<Vec<Slot>> {
        let parse = |json_content: &str| -> Encoded<Vec<FunctionCall>> {
            let v: Value = serde_json::from_str(json_content)
                .map_err(|_| format!("Invalid JSON format in function message: {content:?}"))?;
            let list = match v {
                Value::Array(a) => a,
                other => vec![other],
            };
            list.iter()
                .map(|tc| {
                    let name = tc
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or("function call has no `name`")?;
                    let args = tc
                        .get("arguments")
                        .ok_or("function call has no `arguments`")?;
                    Ok(FunctionCall {
                        name: name.to_string(),
                        arguments: crate::data::pyjson::dumps(args, None),
                    })
                })
                .collect()
        };
        let fmt = self.function_tool_format;
        let tool_match = with_words
            .then(|| find_between(content, &self.tool_call_words.0, &self.tool_call_words.1))
            .flatten();
        let function_str = match tool_match {
            None => {
                let thought = with_words
                    .then(|| find_between(content, &self.thought_words.0, &self.thought_words.1))
                    .flatten();
                match thought {
                    Some((s, e, _)) => {
                        let whole = &content[s..e];
                        let json_part = content.replace(whole, "");
                        whole.to_string() + &fmt.function_formatter(&parse(&json_part)?)?
                    }
                    None => fmt.function_formatter(&parse(content)?)?,
                }
            }
            Some((s, e, inner)) => {
                let thought_content = content.replace(&content[s..e], "");
                thought_content + &fmt.function_formatter(&parse(inner)?)?
            }
        };
        Ok(apply(&self.format_function, &function_str, None))
    }

    fn to_ids(&self, tok: &HfTokenizer, elements: &[Slot]) -> Vec<u32> {
        let mut ids = Vec::new();
        for e in elements {
            match e {
                Slot::Text(s) => ids.extend(tok.encode(s)),
                Slot::Token(name) => ids.extend(tok.token_to_id(name)),
                Slot::Bos => ids.extend(tok.bos_id()),
                Slot::Eos => ids.extend(tok.eos_id()),
            }
        }
        ids
    }

    fn encode(
        &self,
        tok: &HfTokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Encoded<Vec<Vec<u32>>> {
        let system = if system.is_empty() {
            self.default_system.as_str()
        } else {
            system
        };
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let mut elements = Vec::new();
            let mut system_text = String::new();
            if i == 0 {
                elements.extend(self.format_prefix.iter().cloned());
                if !system.is_empty() || !tools.is_empty() {
                    let tool_text = if tools.is_empty() {
                        String::new()
                    } else {
                        self.format_tools(tools)?
                    };
                    let sys = apply(
                        &self.format_system,
                        &(system.to_string() + &tool_text),
                        None,
                    );
                    if self.kind == TemplateKind::Llama2 {
                        system_text = first_text(sys);
                    } else {
                        elements.extend(sys);
                    }
                }
            }
            match m.role {
                Role::User => {
                    let idx = (i / 2).to_string();
                    let content = system_text + &m.content;
                    let idx = (self.kind != TemplateKind::Llama2).then_some(idx.as_str());
                    elements.extend(apply(&self.format_user, &content, idx));
                }
                Role::Assistant => elements.extend(apply(&self.format_assistant, &m.content, None)),
                Role::Observation => {
                    elements.extend(apply(&self.format_observation, &m.content, None))
                }
                Role::Function => elements.extend(
                    self.format_function_call(&m.content, self.kind != TemplateKind::Llama2)?,
                ),
                Role::System => {
                    return Err("unexpected system message inside the conversation".into())
                }
            }
            out.push(self.to_ids(tok, &elements));
        }
        Ok(out)
    }

    fn has_thought(&self, content: &str) -> bool {
        content.contains(self.thought_words.0.trim())
            || content.contains(self.thought_words.1.trim())
    }

    pub fn remove_thought(&self, content: &str) -> String {
        let mut s = content.to_string();
        while let Some((a, b, _)) = find_between(&s, &self.thought_words.0, &self.thought_words.1) {
            s.replace_range(a..b, "");
        }
        s.trim_start_matches('\n').to_string()
    }

    fn thought_ids(&self, tok: &HfTokenizer) -> Vec<u32> {
        tok.encode(&format!("{}{}", self.thought_words.0, self.thought_words.1))
    }

    /// Prompt ids (all messages but the last) and response ids (the last).
    pub fn encode_oneturn(
        &self,
        tok: &HfTokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Encoded<(Vec<u32>, Vec<u32>)> {
        let mut messages = messages.to_vec();
        if self.kind == TemplateKind::Reasoning {
            let n = messages.len();
            if !self.preserve_thinking {
                for i in (1..n.saturating_sub(2)).step_by(2) {
                    messages[i].content = self.remove_thought(&messages[i].content);
                }
            }
            if !self.enable_thinking {
                messages[n - 1].content = self.remove_thought(&messages[n - 1].content);
            }
        }
        let mut encoded = self.encode(tok, &messages, system, tools)?;
        let mut response = encoded.pop().unwrap_or_default();
        let mut prompt: Vec<u32> = encoded.concat();
        if self.kind == TemplateKind::Reasoning
            && !self.has_thought(&messages[messages.len() - 1].content)
        {
            if self.enable_thinking {
                response = [self.thought_ids(tok), response].concat();
            } else {
                prompt.extend(self.thought_ids(tok));
            }
        }
        Ok((prompt, response))
    }

    /// (source, target) id pairs, one per turn.
    pub fn encode_multiturn(
        &self,
        tok: &HfTokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
        discarding_history_cot: bool,
    ) -> Encoded<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut messages = messages.to_vec();
        let reasoning = self.kind == TemplateKind::Reasoning;
        if reasoning {
            if !self.enable_thinking {
                for i in (1..messages.len()).step_by(2) {
                    messages[i].content = self.remove_thought(&messages[i].content);
                }
            }
            if discarding_history_cot {
                for i in (1..messages.len().saturating_sub(2)).step_by(2) {
                    messages[i].content = self.remove_thought(&messages[i].content);
                }
            }
        }
        let mut encoded = self.encode(tok, &messages, system, tools)?;
        if reasoning {
            let turns: Vec<usize> = if discarding_history_cot {
                vec![messages.len() - 2]
            } else {
                (0..messages.len()).step_by(2).collect()
            };
            for i in turns {
                if i + 1 < messages.len() && !self.has_thought(&messages[i + 1].content) {
                    if self.enable_thinking {
                        encoded[i + 1] =
                            [self.thought_ids(tok), std::mem::take(&mut encoded[i + 1])].concat();
                    } else {
                        let ids = self.thought_ids(tok);
                        encoded[i].extend(ids);
                    }
                }
            }
        }
        let mut pairs = Vec::with_capacity(encoded.len() / 2);
        let mut it = encoded.into_iter();
        while let (Some(a), Some(b)) = (it.next(), it.next()) {
            pairs.push((a, b));
        }
        Ok(pairs)
    }

    /// LLaMA-Factory's `fix_special_tokens`: eos replaced by the first stop word (when
    /// `replace_eos`), a missing eos becomes `<|endoftext|>`, pad defaults to eos, remaining stop
    /// words become special tokens. Returns warnings (new tokens need `resize_vocab`).
    pub fn fix_special_tokens(&self, tok: &mut HfTokenizer) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        let mut stop_words = self.stop_words.as_slice();
        let set_eos = |tok: &mut HfTokenizer, eos: &str, warnings: &mut Vec<String>| {
            if tok.eos_token.as_deref() == Some(eos) && tok.eos_id().is_some() {
                return Ok(());
            }
            if tok
                .add_special_tokens(&[eos.to_string()])
                .map_err(|e| e.to_string())?
                > 0
            {
                warnings.push(format!(
                    "New token {eos} has been added as eos, make sure `resize_vocab` is True."
                ));
            }
            tok.eos_token = Some(eos.to_string());
            Ok::<(), String>(())
        };
        if self.replace_eos {
            let Some((first, rest)) = stop_words.split_first() else {
                return Err("Stop words are required to replace the EOS token.".into());
            };
            set_eos(tok, first, &mut warnings)?;
            stop_words = rest;
        }
        if tok.eos_id().is_none() {
            set_eos(tok, "<|endoftext|>", &mut warnings)?;
        }
        if tok.pad_id().is_none() {
            tok.pad_token = tok.eos_token.clone();
        }
        if !stop_words.is_empty()
            && tok
                .add_special_tokens(stop_words)
                .map_err(|e| e.to_string())?
                > 0
        {
            warnings.push(format!(
                "New tokens {} have been added, make sure `resize_vocab` is True.",
                stop_words.join(",")
            ));
        }
        Ok(warnings)
    }

    /// Ids that end generation: eos and every stop word.
    pub fn stop_token_ids(&self, tok: &HfTokenizer) -> Vec<u32> {
        let mut ids: Vec<u32> = tok.eos_id().into_iter().collect();
        for w in &self.stop_words {
            if let Some(id) = tok.token_to_id(w) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Reads function calls back from generated text with this template's tool format.
    pub fn extract_tool(&self, content: &str) -> Option<Vec<FunctionCall>> {
        self.tool_format.tool_extractor(content)
    }

    /// Writes this template's Jinja chat template into the tokenizer when it has none (or the
    /// template insists), as `fix_jinja_template` does, so saved tokenizers chat correctly.
    pub fn fix_jinja_template(&self, tok: &mut HfTokenizer) {
        if tok.chat_template.is_none() || self.replace_jinja_template {
            if let Some(j) = jinja::template_to_jinja(self, tok) {
                tok.chat_template = Some(j);
            }
        }
    }
}

pub use jinja::parse_template;

/// The template for a run: the named one, or parsed from the tokenizer's chat template, or
/// `empty`; with the argument overrides applied and the tokenizer fixed.
pub fn get_template_and_fix_tokenizer(
    tok: &mut HfTokenizer,
    args: &protocol::TrainArgs,
) -> anyhow::Result<(Template, Vec<String>)> {
    let mut warnings = Vec::new();
    let template = match &args.template {
        Some(name) => get_template(name)?,
        None => match &tok.chat_template {
            Some(_) => {
                warnings.push("`template` was not specified, try parsing the chat template from the tokenizer.".into());
                parse_template(tok)?
            }
            None => {
                warnings.push("`template` was not specified, use `empty` template.".into());
                get_template("empty")?
            }
        },
    };
    let template = template.with_overrides(args).map_err(anyhow::Error::msg)?;
    warnings.extend(
        template
            .fix_special_tokens(tok)
            .map_err(anyhow::Error::msg)?,
    );
    template.fix_jinja_template(tok);
    Ok((template, warnings))
}

fn slots_to_ollama(slots: &[Slot], tok: &HfTokenizer, placeholder: &str) -> String {
    let mut out = String::new();
    for slot in slots {
        match slot {
            Slot::Text(s) => {
                let mut pieces = s.splitn(2, "{{content}}");
                out += pieces.next().unwrap_or_default();
                if let Some(tail) = pieces.next() {
                    out += &format!("{{{{ {placeholder} }}}}");
                    out += tail;
                }
            }
            Slot::Bos => {
                out += tok
                    .bos_token
                    .as_deref()
                    .filter(|_| tok.bos_id().is_some())
                    .unwrap_or_default()
            }
            Slot::Eos => {
                out += tok
                    .eos_token
                    .as_deref()
                    .filter(|_| tok.eos_id().is_some())
                    .unwrap_or_default()
            }
            Slot::Token(t) => out += t,
        }
    }
    out
}

impl Template {
    /// An Ollama `Modelfile`, as LLaMA-Factory's export writes it.
    pub fn ollama_modelfile(&self, tok: &HfTokenizer) -> String {
        let prefix = slots_to_ollama(&self.format_prefix, tok, "content");
        let system = slots_to_ollama(&self.format_system, tok, ".System");
        let user = slots_to_ollama(&self.format_user, tok, ".Content");
        let assistant = slots_to_ollama(&self.format_assistant, tok, ".Content");
        let template = format!(
            "{prefix}{{{{ if .System }}}}{system}{{{{ end }}}}{{{{ range .Messages }}}}{{{{ if eq .Role \"user\" }}}}{user}{{{{ else if eq .Role \"assistant\" }}}}{assistant}{{{{ end }}}}{{{{ end }}}}"
        );
        let mut m = format!("# ollama modelfile auto-generated by llamafactory\n\nFROM .\n\nTEMPLATE \"\"\"{template}\"\"\"\n\n");
        if !self.default_system.is_empty() {
            m += &format!("SYSTEM \"\"\"{}\"\"\"\n\n", self.default_system);
        }
        for id in self.stop_token_ids(tok) {
            if let Some(t) = tok.inner.id_to_token(id) {
                m += &format!("PARAMETER stop \"{t}\"\n");
            }
        }
        m += "PARAMETER num_ctx 4096\n";
        m
    }
}
