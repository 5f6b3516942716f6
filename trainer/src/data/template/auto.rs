//! The template a model gets when none is named, in LlamaBoard, `chat`, `api` and predictions:
//! LLaMA-Factory's template for a model family it knows (from `config.json`'s `model_type` and
//! the model's name), else the model's own chat template (its Jinja, parsed as LLaMA-Factory
//! does), else `default`. The choice comes with the reason, which the board shows.

use std::path::Path;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct AutoTemplate {
    /// A registered template; `None` means the model's own chat template.
    pub name: Option<String>,
    pub reason: String,
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The model's own chat template, if its tokenizer files carry one.
fn own_chat_template(dir: &Path) -> Option<String> {
    read_json(&dir.join("tokenizer_config.json"))
        .and_then(|c| c.get("chat_template")?.as_str().map(str::to_string))
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
        .filter(|t| !t.trim().is_empty())
}

/// The LLaMA-Factory template of a known family, with the family's name.
fn known_family(
    dir: &Path,
    cfg: &Value,
    own: Option<&str>,
) -> Option<(&'static str, &'static str)> {
    let model_type = cfg.get("model_type")?.as_str()?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    Some(match model_type {
        "qwen3" => ("qwen3", "Qwen3 models"),
        "qwen2" => ("qwen", "Qwen2 / Qwen2.5 models"),
        "mistral" => ("mistral", "Mistral models"),
        "gemma" => ("gemma", "Gemma models"),
        "gemma2" => ("gemma2", "Gemma 2 models"),
        "gemma3" | "gemma3_text" => ("gemma3", "Gemma 3 models"),
        "phi3" if name.contains("phi-4") || name.contains("phi4") => ("phi4", "Phi-4 models"),
        "phi3" | "phi" => ("phi", "Phi models"),
        "glm4" | "glm" => ("glm4", "GLM-4 models"),
        "baichuan" => ("baichuan2", "Baichuan 2 models"),
        "qwen2_vl" => ("qwen2_vl", "Qwen2-VL models"),
        "qwen2_5_vl" => ("qwen2_vl", "Qwen2.5-VL models"),
        "llava" => ("llava", "LLaVA-1.5 models"),
        "llama" if name.starts_with("yi-") || name.contains("--yi-") => ("yi", "Yi models"),
        "llama" if name.contains("llama-3") || name.contains("llama3") => {
            ("llama3", "Llama 3 models")
        }
        "llama" if name.contains("llama-2") || name.contains("llama2") => {
            ("llama2", "Llama 2 models")
        }
        // `llamafactory demo`: a small Llama with a ChatML tokenizer.
        "llama"
            if cfg
                .get("vocab_size")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX)
                < 10_000
                && own.is_some_and(|t| t.contains("<|im_start|>")) =>
        {
            ("qwen", "the demo model (ChatML)")
        }
        _ => return None,
    })
}

/// The template for the model folder `dir`, and why.
pub fn auto_template(dir: &Path) -> AutoTemplate {
    let cfg = read_json(&dir.join("config.json")).unwrap_or_default();
    let own = own_chat_template(dir);
    if let Some((name, family)) = known_family(dir, &cfg, own.as_deref()) {
        return AutoTemplate {
            name: Some(name.into()),
            reason: format!("LLaMA-Factory's template for {family}"),
        };
    }
    let model_type = cfg
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    match own {
        Some(_) => AutoTemplate {
            name: None,
            reason: format!(
                "no LLaMA-Factory template is known for this `{model_type}` model: its own chat template (Jinja) from the tokenizer files"
            ),
        },
        None => AutoTemplate {
            name: Some("default".into()),
            reason: format!(
                "no LLaMA-Factory template is known for this `{model_type}` model and it has no chat template of its own"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn known_families_then_the_models_own_template_then_default() {
        let qwen = model(&[("config.json", r#"{"model_type": "qwen2"}"#)]);
        assert_eq!(auto_template(qwen.path()).name.as_deref(), Some("qwen"));
        let baichuan = model(&[("config.json", r#"{"model_type": "baichuan"}"#)]);
        assert_eq!(
            auto_template(baichuan.path()).name.as_deref(),
            Some("baichuan2")
        );
        let other = model(&[
            (
                "config.json",
                r#"{"model_type": "llama", "vocab_size": 32000}"#,
            ),
            (
                "tokenizer_config.json",
                r#"{"chat_template": "{{ messages }}"}"#,
            ),
        ]);
        let t = auto_template(other.path());
        assert_eq!(t.name, None, "{t:?}");
        assert!(t.reason.contains("its own chat template"), "{t:?}");
        let bare = model(&[(
            "config.json",
            r#"{"model_type": "llama", "vocab_size": 32000}"#,
        )]);
        assert_eq!(auto_template(bare.path()).name.as_deref(), Some("default"));
    }

    #[test]
    fn yi_is_a_llama_known_by_its_folder_name() {
        let d = tempfile::tempdir().unwrap();
        let yi = d.path().join("Yi-1.5-6B-Chat");
        std::fs::create_dir(&yi).unwrap();
        std::fs::write(yi.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        let t = auto_template(&yi);
        assert_eq!(t.name.as_deref(), Some("yi"), "{t:?}");
        assert!(t.reason.contains("Yi models"), "{t:?}");
    }
}
