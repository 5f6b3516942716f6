//! The registered templates, transcribed from LLaMA-Factory's `register_template` calls.

use anyhow::{bail, Result};

use super::tools::ToolFormat;
use super::{t, MmPlugin, Slot, Template, TemplateKind};

pub const TEMPLATE_NAMES: &[&str] = &[
    "alpaca",
    "baichuan2",
    "chatml",
    "default",
    "empty",
    "gemma",
    "gemma2",
    "gemma3",
    "glm4",
    "llama2",
    "llama3",
    "llava",
    "mistral",
    "phi",
    "phi4",
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "qwen2_vl",
    "yi",
];

fn qwen_family(name: &str) -> Template {
    let mut tpl = Template::builder(name);
    tpl.format_user = vec![t(
        "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
    )];
    tpl.format_assistant = vec![t("{{content}}<|im_end|>\n")];
    tpl.format_system = vec![t("<|im_start|>system\n{{content}}<|im_end|>\n")];
    tpl.format_function = vec![t("{{content}}<|im_end|>\n")];
    tpl.function_tool_format = ToolFormat::Qwen;
    tpl.format_observation =
        vec![t("<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n")];
    tpl.tool_format = ToolFormat::Qwen;
    tpl.stop_words = vec!["<|im_end|>".into()];
    tpl.replace_eos = true;
    tpl
}

pub fn get_template(name: &str) -> Result<Template> {
    let mut tpl = Template::builder(name);
    match name {
        "alpaca" => {
            tpl.format_user = vec![t("### Instruction:\n{{content}}\n\n### Response:\n")];
            tpl.format_assistant = vec![t("{{content}}"), Slot::Eos, t("\n\n")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = tpl.format_user.clone();
            tpl.default_system = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n".into();
            tpl.replace_jinja_template = true;
        }
        "default" => {
            tpl.format_user = vec![t("Human: {{content}}"), Slot::Eos, t("\nAssistant:")];
            tpl.format_assistant = vec![t("{{content}}"), Slot::Eos, t("\n")];
            tpl.format_system = vec![t("System: {{content}}"), Slot::Eos, t("\n")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = tpl.format_user.clone();
            tpl.replace_jinja_template = true;
        }
        "chatml" => {
            tpl.format_user = vec![t(
                "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
            )];
            tpl.format_assistant = vec![t("{{content}}<|im_end|>\n")];
            tpl.format_system = vec![t("<|im_start|>system\n{{content}}<|im_end|>\n")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = vec![t(
                "<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
            )];
            tpl.stop_words = vec!["<|im_end|>".into(), "<|im_start|>".into()];
            tpl.replace_eos = true;
            tpl.replace_jinja_template = true;
        }
        "qwen" => {
            tpl = qwen_family(name);
            tpl.default_system =
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".into();
        }
        "qwen3" => {
            tpl = qwen_family(name);
            tpl.kind = TemplateKind::Reasoning;
        }
        "qwen3_nothink" => tpl = qwen_family(name),
        "llama2" => {
            tpl.format_user = vec![Slot::Bos, t("[INST] {{content}} [/INST]")];
            tpl.format_system = vec![t("<<SYS>>\n{{content}}\n<</SYS>>\n\n")];
            tpl.format_observation = tpl.format_user.clone();
            tpl.kind = TemplateKind::Llama2;
        }
        "llama3" => {
            tpl.format_user = vec![t("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")];
            tpl.format_assistant = vec![t("{{content}}<|eot_id|>")];
            tpl.format_system = vec![t(
                "<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
            )];
            tpl.format_function = vec![t("{{content}}<|eot_id|>")];
            tpl.function_tool_format = ToolFormat::Llama3;
            tpl.format_observation = vec![t("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")];
            tpl.tool_format = ToolFormat::Llama3;
            tpl.format_prefix = vec![Slot::Bos];
            tpl.stop_words = vec!["<|eot_id|>".into(), "<|eom_id|>".into()];
            tpl.replace_eos = true;
        }
        "mistral" => {
            tpl.format_user = vec![t("[INST] {{content}}[/INST]")];
            tpl.format_assistant = vec![t(" {{content}}"), Slot::Eos];
            tpl.format_system = vec![t("{{content}}\n\n")];
            tpl.format_function = vec![t("[TOOL_CALLS] {{content}}"), Slot::Eos];
            tpl.function_tool_format = ToolFormat::Mistral;
            tpl.format_observation = vec![t(
                r#"[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]"#,
            )];
            tpl.tool_format = ToolFormat::Mistral;
            tpl.format_prefix = vec![Slot::Bos];
            tpl.kind = TemplateKind::Llama2;
        }
        "gemma" | "gemma2" | "gemma3" => {
            tpl.format_user = vec![t(
                "<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
            )];
            tpl.format_assistant = vec![t("{{content}}<end_of_turn>\n")];
            tpl.format_system = vec![t("{{content}}\n\n")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = vec![t(
                "<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
            )];
            tpl.format_prefix = vec![Slot::Bos];
            if name == "gemma2" {
                // LLaMA-Factory's gemma2: the tokenizer's own `<eos>` stays, and closes the
                // answer only once (efficient EOS).
                tpl.stop_words = vec!["<eos>".into(), "<end_of_turn>".into()];
                tpl.efficient_eos = true;
            } else {
                tpl.stop_words = vec!["<end_of_turn>".into()];
                tpl.replace_eos = true;
            }
            tpl.kind = TemplateKind::Llama2;
        }
        "phi" => {
            tpl.format_user = vec![t("<|user|>\n{{content}}<|end|>\n<|assistant|>\n")];
            tpl.format_assistant = vec![t("{{content}}<|end|>\n")];
            tpl.format_system = vec![t("<|system|>\n{{content}}<|end|>\n")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = tpl.format_user.clone();
            tpl.stop_words = vec!["<|end|>".into()];
            tpl.replace_eos = true;
        }
        "phi4" => {
            tpl.format_user = vec![t(
                "<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",
            )];
            tpl.format_assistant = vec![t("{{content}}<|im_end|>")];
            tpl.format_system = vec![t("<|im_start|>system<|im_sep|>{{content}}<|im_end|>")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = tpl.format_user.clone();
            tpl.stop_words = vec!["<|im_end|>".into()];
            tpl.replace_eos = true;
        }
        "glm4" => {
            tpl.format_user = vec![t("<|user|>\n{{content}}<|assistant|>")];
            tpl.format_assistant = vec![t("\n{{content}}")];
            tpl.format_system = vec![t("<|system|>\n{{content}}")];
            tpl.format_function = vec![t("{{content}}")];
            tpl.function_tool_format = ToolFormat::Glm4;
            tpl.format_observation = vec![t("<|observation|>\n{{content}}<|assistant|>")];
            tpl.tool_format = ToolFormat::Glm4;
            tpl.format_prefix = vec![t("[gMASK]<sop>")];
            tpl.stop_words = vec!["<|user|>".into(), "<|observation|>".into()];
            tpl.efficient_eos = true;
        }
        "yi" => {
            tpl.format_user = vec![t(
                "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
            )];
            tpl.format_assistant = vec![t("{{content}}<|im_end|>\n")];
            tpl.format_system = vec![t("<|im_start|>system\n{{content}}<|im_end|>\n")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = tpl.format_user.clone();
            tpl.stop_words = vec!["<|im_end|>".into()];
        }
        "baichuan2" => {
            // LLaMA-Factory 0.9.2's (the last release that ships it): the answer closes with the
            // tokenizer's eos once, after the last turn (efficient EOS).
            tpl.format_user = vec![t("<reserved_106>{{content}}<reserved_107>")];
            tpl.format_assistant = vec![t("{{content}}")];
            tpl.format_function = tpl.format_assistant.clone();
            tpl.format_observation = tpl.format_user.clone();
            tpl.efficient_eos = true;
        }
        "qwen2_vl" => {
            tpl = qwen_family(name);
            tpl.default_system = "You are a helpful assistant.".into();
            tpl.mm = MmPlugin::Qwen2Vl;
        }
        "llava" => {
            // LLaMA-Factory's (copied from vicuna): no BOS, the answer closed by EOS.
            tpl.format_user = vec![t("USER: {{content}} ASSISTANT:")];
            tpl.default_system = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.".into();
            tpl.mm = MmPlugin::Llava;
        }
        "empty" => {
            tpl.format_assistant = vec![t("{{content}}")];
            tpl.format_function = tpl.format_assistant.clone();
        }
        other => {
            let hint = crate::config::closest(other, TEMPLATE_NAMES.iter().copied())
                .map(|n| format!(" (did you mean `{n}`?)"))
                .unwrap_or_default();
            bail!(
                "Template {other} does not exist{hint}; available: {}",
                TEMPLATE_NAMES.join(", ")
            );
        }
    }
    Ok(tpl)
}
