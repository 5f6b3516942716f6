//! The tokenizer in GGUF metadata, in the two forms llama.cpp reads: byte-level BPE (`gpt2`:
//! tokens, types and merges; Llama 3, Qwen, GLM-4, SmolLM) and SentencePiece-style (`llama`:
//! tokens, scores and types; Llama 2, Mistral, Gemma, Phi-3, Baichuan), plus the special ids
//! and the chat template.

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::infer::ChatModel;
use crate::tokenizer::HfTokenizer;

/// llama.cpp's token types.
mod kind {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// How the tokenizer splits text, read from its own definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    ByteLevel,
    SentencePiece,
}

fn style(tok: &HfTokenizer) -> Result<(Style, Json)> {
    let raw: Json = serde_json::from_str(
        &tok.inner
            .to_string(false)
            .map_err(|e| anyhow!("cannot read the tokenizer's definition: {e}"))?,
    )?;
    let model = &raw["model"];
    let text = raw.to_string();
    let byte_level = raw["pre_tokenizer"].to_string().contains("ByteLevel")
        || raw["decoder"].to_string().contains("ByteLevel");
    let style = match model["type"].as_str() {
        Some("BPE") if byte_level => Style::ByteLevel,
        Some("BPE") if model["byte_fallback"] == true || text.contains('\u{2581}') => {
            Style::SentencePiece
        }
        other => bail!(
            "GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, GLM-4) and SentencePiece-style BPE ones (Llama 2, Mistral, Gemma, Phi-3, Baichuan); this tokenizer is {} with pre-tokenizer {}",
            other.unwrap_or("unknown"),
            raw["pre_tokenizer"]["type"]
        ),
    };
    Ok((style, raw))
}

/// Tokens by id over the model's vocabulary (padding slots named `[PAD{i}]`, unused), and
/// their llama.cpp types.
fn tokens_and_types(chat: &ChatModel) -> (Vec<String>, Vec<i32>) {
    let tok = &chat.tok;
    let n = tok.len().max(chat.model.cfg.vocab_size);
    let mut tokens = vec![String::new(); n];
    let mut types = vec![kind::NORMAL; n];
    for (t, id) in tok.inner.get_vocab(true) {
        if (id as usize) < n {
            tokens[id as usize] = t;
        }
    }
    for (id, added) in tok.inner.get_added_tokens_decoder() {
        if (id as usize) < n {
            types[id as usize] = if added.special {
                kind::CONTROL
            } else {
                kind::USER_DEFINED
            };
        }
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
            types[i] = kind::UNUSED;
        }
    }
    (tokens, types)
}

/// `<0x41>`: a byte-fallback piece.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// Byte-level BPE: the merges in rank order.
fn byte_level(chat: &ChatModel, raw: &Json, meta: &mut Vec<(String, Value)>) -> Result<()> {
    let (tokens, types) = tokens_and_types(chat);
    let merges: Vec<Value> = raw["model"]["merges"]
        .as_array()
        .ok_or_else(|| anyhow!("the tokenizer has no BPE merges"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Value::String(s.clone()),
            Json::Array(pair) => Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap_or(""),
                pair[1].as_str().unwrap_or("")
            )),
            _ => Value::String(String::new()),
        })
        .collect();
    let tok = &chat.tok;
    let pre = match chat.model.cfg.model_type.as_str() {
        "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe" => "qwen2",
        "glm4" => "glm4",
        _ if tok.token_to_id("<|begin_of_text|>").is_some() => "llama-bpe",
        _ => "default",
    };
    meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    push_tokens(meta, tokens, types);
    meta.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    Ok(())
}

/// SentencePiece-style: each piece's score (from `tokenizer.model` when the folder has it, else
/// minus its id, the order SentencePiece's BPE trainer gives its pieces), byte pieces typed as
/// such, the unknown piece as unknown.
fn sentencepiece(chat: &ChatModel, raw: &Json, meta: &mut Vec<(String, Value)>) -> Result<()> {
    let (tokens, mut types) = tokens_and_types(chat);
    let tok = &chat.tok;
    let spm = tok.dir.join("tokenizer.model");
    let model_scores: Vec<f32> = if spm.exists() {
        let bytes = std::fs::read(&spm)?;
        sentencepiece_model::SentencePieceModel::from_slice(&bytes)
            .map_err(|e| anyhow!("{}: {e}", spm.display()))?
            .pieces()
            .iter()
            .map(|p| p.score())
            .collect()
    } else {
        Vec::new()
    };
    let unk = raw["model"]["unk_token"]
        .as_str()
        .and_then(|u| tok.token_to_id(u));
    let mut scores = Vec::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if Some(id as u32) == unk {
            types[id] = kind::UNKNOWN;
        } else if types[id] == kind::NORMAL && is_byte_piece(t) {
            types[id] = kind::BYTE;
        }
        let score = match model_scores.get(id) {
            Some(s) => *s,
            None if types[id] == kind::NORMAL => -(id as f32),
            None => 0.0,
        };
        scores.push(Value::F32(score));
    }
    // The dummy prefix: a normalizer that prepends `▁` (Llama 2 style) or a Metaspace
    // pre-tokenizer that does (newer conversions); Gemma and Baichuan have none.
    let pre = &raw["pre_tokenizer"];
    let space_prefix = raw["normalizer"].to_string().contains("Prepend")
        || (pre.to_string().contains("Metaspace") && !pre.to_string().contains("\"never\""));
    meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
    meta.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
    meta.push((
        "tokenizer.ggml.add_space_prefix".into(),
        Value::Bool(space_prefix),
    ));
    push_tokens(meta, tokens, types);
    meta.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
    if let Some(id) = unk {
        meta.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(id)));
    }
    Ok(())
}

fn push_tokens(meta: &mut Vec<(String, Value)>, tokens: Vec<String>, types: Vec<i32>) {
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
}

/// The tokenizer's `tokenizer.*` metadata.
pub(super) fn metadata(chat: &ChatModel, meta: &mut Vec<(String, Value)>) -> Result<()> {
    let tok = &chat.tok;
    let (style, raw) = style(tok)?;
    match style {
        Style::ByteLevel => byte_level(chat, &raw, meta)?,
        Style::SentencePiece => sentencepiece(chat, &raw, meta)?,
    }
    if let Some(id) = tok.eos_id() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    if let Some(id) = tok.bos_id() {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
    }
    if let Some(id) = tok.pad_id() {
        meta.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(id)));
    }
    meta.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.add_bos_token),
    ));
    if let Some(t) = &tok.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_pieces_are_recognised() {
        assert!(is_byte_piece("<0x0A>") && is_byte_piece("<0xff>"));
        assert!(!is_byte_piece("<0x0A") && !is_byte_piece("<s>") && !is_byte_piece("<0xZZ>"));
    }

    #[test]
    fn sentencepiece_and_byte_level_tokenizers_are_told_apart() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let demo = HfTokenizer::load(&root.join("tests/fixtures/demo-tokenizer")).unwrap();
        assert_eq!(style(&demo).unwrap().0, Style::ByteLevel);
        let d = tempfile::tempdir().unwrap();
        std::fs::copy(
            root.join("tests/fixtures/spm/llama_like/tokenizer.model"),
            d.path().join("tokenizer.model"),
        )
        .unwrap();
        let spm = HfTokenizer::load(d.path()).unwrap();
        assert_eq!(style(&spm).unwrap().0, Style::SentencePiece);
    }
}
