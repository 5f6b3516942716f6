//! Between our slot templates and Jinja chat templates: writing one for a tokenizer
//! (LLaMA-Factory's `_get_jinja_template`) and reading a model's own (`parse_template`).

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind};

use super::{t, Slot, Template, TemplateKind};
use crate::tokenizer::HfTokenizer;

fn escape(s: &str) -> String {
    s.replace('\'', "\\'")
}

fn slots_to_jinja(slots: &[Slot], tok: &HfTokenizer, placeholder: &str) -> Option<String> {
    let mut items = Vec::new();
    for slot in slots {
        match slot {
            Slot::Text(s) => {
                let mut pieces = s.splitn(2, "{{content}}");
                let head = pieces.next().unwrap_or_default();
                if !head.is_empty() {
                    items.push(format!("'{}'", escape(head)));
                }
                if let Some(tail) = pieces.next() {
                    items.push(placeholder.to_string());
                    if !tail.is_empty() {
                        items.push(format!("'{}'", escape(tail)));
                    }
                }
            }
            Slot::Bos => {
                if let (Some(b), Some(_)) = (&tok.bos_token, tok.bos_id()) {
                    items.push(format!("'{b}'"));
                }
            }
            Slot::Eos => {
                if let (Some(e), Some(_)) = (&tok.eos_token, tok.eos_id()) {
                    items.push(format!("'{e}'"));
                }
            }
            Slot::Token(_) => return None,
        }
    }
    Some(items.join(" + "))
}

pub(super) fn template_to_jinja(tpl: &Template, tok: &HfTokenizer) -> Option<String> {
    let prefix = slots_to_jinja(&tpl.format_prefix, tok, "content")?;
    let system = slots_to_jinja(&tpl.format_system, tok, "system_message")?;
    let user = slots_to_jinja(&tpl.format_user, tok, "content")?;
    let assistant = slots_to_jinja(&tpl.format_assistant, tok, "content")?;
    let mut j = String::new();
    if !prefix.is_empty() {
        j += &format!("{{{{ {prefix} }}}}");
    }
    if !tpl.default_system.is_empty() {
        j += &format!(
            "{{% set system_message = '{}' %}}",
            escape(&tpl.default_system)
        );
    }
    j += "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}";
    if tpl.kind == TemplateKind::Llama2 {
        j += &format!(
            "{{% for message in loop_messages %}}{{% if loop.index0 == 0 and system_message is defined %}}{{% set content = {system} + message['content'] %}}{{% else %}}{{% set content = message['content'] %}}{{% endif %}}{{% if message['role'] == 'user' %}}{{{{ {user} }}}}{{% elif message['role'] == 'assistant' %}}{{{{ {assistant} }}}}{{% endif %}}{{% endfor %}}"
        );
    } else {
        j += &format!(
            "{{% if system_message is defined %}}{{{{ {system} }}}}{{% endif %}}{{% for message in loop_messages %}}{{% set content = message['content'] %}}{{% if message['role'] == 'user' %}}{{{{ {user} }}}}{{% elif message['role'] == 'assistant' %}}{{{{ {assistant} }}}}{{% endif %}}{{% endfor %}}"
        );
    }
    Some(j)
}

/// A Jinja environment that renders Hugging Face chat templates.
pub fn chat_environment(source: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| {
        chrono::Local::now().format(&fmt).to_string()
    });
    env.add_template_owned("chat", source.to_string())
        .map_err(|e| anyhow!("the tokenizer's chat_template does not parse: {e}"))?;
    Ok(env)
}

/// `tokenizer.apply_chat_template(messages, tokenize=False, ...)`.
pub fn apply_chat_template(
    env: &Environment<'_>,
    tok: &HfTokenizer,
    messages: &[(&str, &str)],
    add_generation_prompt: bool,
) -> Result<String> {
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| context! { role => r, content => c })
        .collect();
    env.get_template("chat")?
        .render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => tok.bos_token.clone().unwrap_or_default(),
            eos_token => tok.eos_token.clone().unwrap_or_default(),
            pad_token => tok.pad_token.clone().unwrap_or_default(),
        })
        .map_err(|e| anyhow!("rendering the tokenizer's chat_template failed: {e}"))
}

/// Characters of `long` that are not in `short`, walking both in order (LLaMA-Factory's `find_diff`).
fn find_diff(short: &str, long: &str) -> String {
    let s: Vec<char> = short.chars().collect();
    let l: Vec<char> = long.chars().collect();
    let (mut i, mut j) = (0, 0);
    let mut diff = String::new();
    while i < s.len() && j < l.len() {
        if s[i] == l[j] {
            i += 1;
        } else {
            diff.push(l[j]);
        }
        j += 1;
    }
    diff
}

fn tail(s: &str, chars: usize) -> String {
    s.chars().skip(chars).collect()
}

/// Builds a template from the tokenizer's own chat template by rendering probe conversations.
pub fn parse_template(tok: &HfTokenizer) -> Result<Template> {
    let source = tok
        .chat_template
        .as_deref()
        .ok_or_else(|| anyhow!("the tokenizer has no chat_template"))?;
    let env = chat_environment(source)?;
    let prefix_ids = tok
        .inner
        .encode("", true)
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default();
    let prefix = tok.decode(&prefix_ids, false);
    let plen = prefix.chars().count();
    let c = "{{content}}";
    let system_slot = tail(
        &apply_chat_template(&env, tok, &[("system", c)], false)?,
        plen,
    );
    let user_slot_empty_system = tail(
        &apply_chat_template(&env, tok, &[("system", ""), ("user", c)], true)?,
        plen,
    );
    let mut user_slot = tail(&apply_chat_template(&env, tok, &[("user", c)], true)?, plen);
    let assistant_full = apply_chat_template(&env, tok, &[("user", c), ("assistant", c)], false)?;
    let assistant_slot = tail(&assistant_full, plen + user_slot.chars().count());
    let reasoning = assistant_slot.contains("<think>");
    let assistant_slot = assistant_slot
        .replace("<think>", "")
        .replace("</think>", "")
        .trim_start_matches('\n')
        .to_string();
    let mut default_system = String::new();
    if user_slot.chars().count() > user_slot_empty_system.chars().count() {
        default_system = find_diff(&user_slot_empty_system, &user_slot);
        let sole_system = system_slot.replacen(c, &default_system, 1);
        user_slot = tail(&user_slot, sole_system.chars().count());
    }
    let mut tpl = Template::builder("parsed");
    tpl.kind = if reasoning {
        TemplateKind::Reasoning
    } else {
        TemplateKind::Plain
    };
    tpl.format_user = vec![t(&user_slot)];
    tpl.format_assistant = vec![t(&assistant_slot)];
    tpl.format_system = vec![t(&system_slot)];
    tpl.format_function = vec![t(&assistant_slot)];
    tpl.format_observation = vec![t(&user_slot)];
    tpl.format_prefix = if prefix.is_empty() {
        Vec::new()
    } else {
        vec![t(&prefix)]
    };
    tpl.default_system = default_system;
    Ok(tpl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_diff_extracts_default_system() {
        assert_eq!(find_diff("<s>user", "<s>sysXuser"), "sysX");
    }
}
