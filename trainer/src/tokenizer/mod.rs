//! A Hugging Face tokenizer folder: `tokenizer.json` for the model (or, for a checkpoint with only
//! a slow tokenizer, its SentencePiece `tokenizer.model`), `tokenizer_config.json` for the special
//! tokens and the chat template, as `transformers.AutoTokenizer` reads them.

pub mod sentencepiece;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer};

pub struct HfTokenizer {
    pub inner: Tokenizer,
    pub dir: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether `encode(..., add_special_tokens=True)` puts bos first (read from the config or
    /// inferred from the post-processor).
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
    /// Special tokens added after loading (template stop words missing from the vocabulary).
    pub new_tokens: Vec<String>,
    /// The raw `tokenizer_config.json`, kept to write it back with our changes.
    pub config: serde_json::Map<String, Value>,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl HfTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let spm = dir.join("tokenizer.model");
        let inner = if file.exists() {
            Tokenizer::from_file(&file)
                .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", file.display()))?
        } else if spm.exists() {
            // A slow tokenizer only (Baichuan 2): its SentencePiece model, converted.
            sentencepiece::load(&spm)?
        } else {
            anyhow::bail!(
                "tokenizer not found: {} has neither tokenizer.json nor a SentencePiece tokenizer.model",
                dir.display()
            );
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let config: serde_json::Map<String, Value> = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("invalid JSON in {}", cfg_path.display()))?
        } else {
            Default::default()
        };
        let mut chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        if chat_template.is_none() {
            chat_template = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        }
        let bos_token = token_string(config.get("bos_token"));
        let add_bos_token = match config.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b,
            None => {
                // No flag: the post-processor tells whether bos is added (Llama 3 style).
                let probe = inner
                    .encode("a", true)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default();
                let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
                bos_id.is_some() && probe.first().copied() == bos_id
            }
        };
        Ok(Self {
            eos_token: token_string(config.get("eos_token")),
            pad_token: token_string(config.get("pad_token")),
            bos_token,
            add_bos_token,
            chat_template,
            new_tokens: Vec::new(),
            inner,
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// `tokenizer.encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// `tokenizer(text)["input_ids"]`: with the special tokens the tokenizer adds (a BOS).
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        self.inner
            .encode_fast(text, true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.inner.decode(ids, skip_special).unwrap_or_default()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_of(&self, token: &Option<String>) -> Option<u32> {
        token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.id_of(&self.eos_token)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.id_of(&self.bos_token)
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.id_of(&self.pad_token)
    }

    /// `len(tokenizer)`: the vocabulary including added tokens.
    pub fn len(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds special tokens that are not in the vocabulary yet; returns how many were new.
    pub fn add_special_tokens(&mut self, tokens: &[String]) -> Result<usize> {
        // Tokens already in the vocabulary are registered too, so text containing them is split
        // on them, as `transformers` does; only the missing ones get new ids.
        let missing: Vec<String> = tokens
            .iter()
            .filter(|t| self.token_to_id(t).is_none())
            .cloned()
            .collect();
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        self.inner
            .add_special_tokens(added)
            .map_err(|e| anyhow!("cannot add special tokens {tokens:?}: {e}"))?;
        self.new_tokens.extend(missing.iter().cloned());
        Ok(missing.len())
    }
}

impl HfTokenizer {
    /// Writes `tokenizer.json`, `tokenizer_config.json` (with the run's eos and pad tokens) and
    /// `chat_template.jinja`, as transformers 5's `save_pretrained` does after LLaMA-Factory
    /// fixed the tokenizer (no `special_tokens_map.json` any more; the chat template in a file
    /// of its own).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // The slow tokenizer's model travels too (transformers' remote-code tokenizers), and a
        // vision-language model's processor files, so transformers' AutoProcessor loads the result.
        for f in [
            "tokenizer.model",
            "preprocessor_config.json",
            "processor_config.json",
            "video_preprocessor_config.json",
        ] {
            let src = self.dir.join(f);
            if src.exists() && self.dir != dir {
                std::fs::copy(&src, dir.join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
            }
        }
        self.inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| anyhow!("cannot write {}: {e}", dir.join("tokenizer.json").display()))?;
        let mut cfg = self.config.clone();
        let opt = |t: &Option<String>| t.clone().map(Value::String).unwrap_or(Value::Null);
        cfg.insert("eos_token".into(), opt(&self.eos_token));
        cfg.insert("pad_token".into(), opt(&self.pad_token));
        cfg.insert("bos_token".into(), opt(&self.bos_token));
        cfg.remove("chat_template");
        if !self.new_tokens.is_empty() {
            let mut extra: Vec<Value> = match cfg.get("additional_special_tokens") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            extra.extend(self.new_tokens.iter().cloned().map(Value::String));
            cfg.insert("additional_special_tokens".into(), Value::Array(extra));
        }
        let write = |name: &str, v: &Value| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n")
                .with_context(|| format!("cannot write {}", p.display()))
        };
        write("tokenizer_config.json", &Value::Object(cfg))?;
        let template = dir.join("chat_template.jinja");
        match &self.chat_template {
            Some(t) => std::fs::write(&template, t)
                .with_context(|| format!("cannot write {}", template.display()))?,
            None => {
                let _ = std::fs::remove_file(&template);
            }
        }
        Ok(())
    }
}
