//! A GGUF file (llama.cpp, Ollama, LM Studio) as a base model: `model_name_or_path` may name a
//! `.gguf` file, or a folder holding one and no `config.json`. Its metadata become a Hugging
//! Face folder in the cache (`config.json`, a byte-level BPE `tokenizer.json` from the
//! `tokenizer.ggml.*` keys, `tokenizer_config.json`, `chat_template.jinja`) plus `gguf.json`
//! pointing back at the file; the weights are read from the file itself, the quantized ones used
//! as they are (no re-quantization), so QLoRA trains on them directly.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value as Json};

use super::layers::{LinearWeight, Param};
use super::quant::QuantWeight;
use super::weights::WeightSource;

/// The marker file of a folder made from a GGUF file.
pub const MARKER: &str = "gguf.json";

/// The `.gguf` file `path` names: the file itself, or the one `.gguf` in a folder without
/// `config.json`.
pub fn gguf_file(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return (path.extension().and_then(|e| e.to_str()) == Some("gguf"))
            .then(|| path.to_path_buf());
    }
    if !path.is_dir() || path.join("config.json").exists() {
        return None;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

/// The GGUF file behind a folder made by [`materialize`].
pub fn source_of(dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dir.join(MARKER)).ok()?;
    let v: Json = serde_json::from_str(&text).ok()?;
    v["file"].as_str().map(PathBuf::from)
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("llamafactory")
        .join("gguf")
}

fn read_content(file: &Path) -> Result<Content> {
    let mut r = BufReader::new(
        File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    Content::read(&mut r).map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", file.display()))
}

fn meta_u32(c: &Content, key: &str) -> Option<u32> {
    c.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn meta_f32(c: &Content, key: &str) -> Option<f32> {
    c.metadata.get(key).and_then(|v| v.to_f32().ok())
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    c.metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

/// `(HF model_type, GGUF architecture)`.
fn architecture(c: &Content, file: &Path) -> Result<(&'static str, String)> {
    let arch = meta_str(c, "general.architecture")
        .ok_or_else(|| anyhow!("{}: no general.architecture", file.display()))?
        .to_string();
    let model_type = match arch.as_str() {
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        other => bail!(
            "{}: GGUF architecture `{other}` is not supported as a base (supported: llama, qwen2, qwen3)",
            file.display()
        ),
    };
    Ok((model_type, arch))
}

fn config_json(c: &Content, file: &Path, vocab: usize) -> Result<Json> {
    let (model_type, a) = architecture(c, file)?;
    let need = |key: &str| -> Result<u32> {
        meta_u32(c, &format!("{a}.{key}"))
            .ok_or_else(|| anyhow!("{}: metadata `{a}.{key}` missing", file.display()))
    };
    if c.tensor_infos.contains_key("rope_freqs.weight") {
        bail!(
            "{}: Llama 3.1-style `rope_freqs` scaling is not supported in GGUF bases; give the model's safetensors folder",
            file.display()
        );
    }
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let head_dim = meta_u32(c, &format!("{a}.attention.key_length")).unwrap_or(hidden / heads);
    Ok(json!({
        "architectures": [match model_type {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "LlamaForCausalLM",
        }],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_u32(c, &format!("{a}.attention.head_count_kv")).unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta_f32(c, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": meta_f32(c, &format!("{a}.rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": meta_u32(c, &format!("{a}.context_length")).unwrap_or(4096),
        "tie_word_embeddings": !c.tensor_infos.contains_key("output.weight"),
        "bos_token_id": meta_u32(c, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta_u32(c, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }))
}

/// The pre-tokenizer regex llama.cpp names by `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<Json> {
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}
        ]})
    };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
        "qwen2" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        "llama-bpe" | "llama3" => split(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        other => bail!("the GGUF tokenizer's pre-tokenizer `{other}` is not supported (default, qwen2, llama-bpe); give the model's tokenizer folder"),
    })
}

/// `tokenizer.json` and `tokenizer_config.json` from the `tokenizer.ggml.*` metadata.
fn tokenizer_files(c: &Content, file: &Path) -> Result<(Json, Json, Option<String>, usize)> {
    let model = meta_str(c, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!(
            "{}: tokenizer `{model}` is not supported in GGUF bases (byte-level BPE, `gpt2`, is); give the model's tokenizer folder",
            file.display()
        );
    }
    let list = |key: &str| -> Result<&Vec<Value>> {
        c.metadata
            .get(key)
            .ok_or_else(|| anyhow!("{}: `{key}` missing", file.display()))?
            .to_vec()
            .map_err(|e| anyhow!("{}: `{key}`: {e}", file.display()))
    };
    let tokens: Vec<String> = list("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().unwrap_or_default())
        .collect();
    let types: Vec<i32> = list("tokenizer.ggml.token_type")
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|_| vec![1; tokens.len()]);
    let merges: Vec<Json> = list("tokenizer.ggml.merges")?
        .iter()
        .map(|v| Json::String(v.to_string().cloned().unwrap_or_default()))
        .collect();
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (t, ty)) in tokens.iter().zip(&types).enumerate() {
        // 3: control, 4: user-defined; 5 (unused) are padding slots.
        if *ty == 5 {
            continue;
        }
        vocab.insert(t.clone(), json!(id));
        if *ty == 3 || *ty == 4 {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": *ty == 4, "special": *ty == 3}),
            );
        }
    }
    let pre = pre_tokenizer(meta_str(c, "tokenizer.ggml.pre").unwrap_or("default"))?;
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let token = |key: &str| -> Json {
        meta_u32(c, key)
            .and_then(|id| tokens.get(id as usize))
            .map_or(Json::Null, |t| Json::String(t.clone()))
    };
    let add_bos = c
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let bos = token("tokenizer.ggml.bos_token_id");
    let post = match (&bos, add_bos) {
        (Json::String(b), true) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [meta_u32(c, "tokenizer.ggml.bos_token_id")], "tokens": [b]}}}),
        _ => byte_level.clone(),
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let config = json!({
        "bos_token": bos,
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "model_max_length": 131072,
    });
    let chat_template = meta_str(c, "tokenizer.chat_template").map(str::to_string);
    Ok((tokenizer, config, chat_template, tokens.len()))
}

fn write(dir: &Path, name: &str, v: &Json) -> Result<()> {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", dir.join(name).display()))
}

/// The Hugging Face folder standing for the GGUF `file` (made once per file version, in the
/// cache): what every loader reads, with the weights left in the file.
pub fn materialize(file: &Path) -> Result<PathBuf> {
    let file = file
        .canonicalize()
        .with_context(|| format!("cannot read {}", file.display()))?;
    let meta = std::fs::metadata(&file)?;
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let key = format!("{}:{}:{stamp}", file.display(), meta.len());
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let dir = cache_root().join(format!("{stem}-{hash:016x}"));
    if source_of(&dir).as_deref() == Some(file.as_path()) {
        return Ok(dir);
    }
    let content = read_content(&file)?;
    let (tokenizer, tok_config, chat_template, vocab) = tokenizer_files(&content, &file)?;
    let config = config_json(&content, &file, vocab)?;
    // Written in a folder of this call's own, then renamed into place: processes that load the
    // same file at once (the board listing it, a worker training on it) never see or remove
    // each other's half-written folder.
    let root = cache_root();
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{stem}-"))
        .tempdir_in(&root)
        .with_context(|| format!("cannot create a folder in {}", root.display()))?;
    write(tmp.path(), "config.json", &config)?;
    write(tmp.path(), "tokenizer.json", &tokenizer)?;
    write(tmp.path(), "tokenizer_config.json", &tok_config)?;
    if let Some(t) = chat_template {
        std::fs::write(tmp.path().join("chat_template.jinja"), t)?;
    }
    write(tmp.path(), MARKER, &json!({"file": file}))?;
    let fresh = |d: &Path| source_of(d).as_deref() == Some(file.as_path());
    if fresh(&dir) {
        return Ok(dir); // another process finished first
    }
    let _ = std::fs::remove_dir_all(&dir); // stale: made from an older version of the file
    if let Err(e) = std::fs::rename(tmp.path(), &dir) {
        if fresh(&dir) {
            return Ok(dir);
        }
        return Err(e).with_context(|| format!("cannot create {}", dir.display()));
    }
    // Renamed away: nothing left for the temporary folder's guard to delete.
    let _ = tmp.keep();
    Ok(dir)
}

/// Rows of llama.cpp's interleaved q/k layout in Hugging Face's rotate-half order: HF row
/// `h·d + t·d/2 + j` is GGUF row `h·d + 2j + t`.
fn hf_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    let half = d / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..half {
                order.push(h * d + 2 * j + t);
            }
        }
    }
    order
}

/// `q` with its rows in `order`.
fn reorder_rows(q: &QTensor, order: &[usize], device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(rows * row_bytes);
    for &r in order {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// A model's weights read from its GGUF file.
pub(crate) struct GgufSource {
    content: Content,
    reader: BufReader<File>,
    file: PathBuf,
    arch: String,
    heads: usize,
    kv_heads: usize,
    left: BTreeSet<String>,
    dtype: DType,
    device: Device,
}

impl GgufSource {
    pub fn open(file: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let content = read_content(file)?;
        let (_, arch) = architecture(&content, file)?;
        let heads = meta_u32(&content, &format!("{arch}.attention.head_count")).unwrap_or(1);
        let kv_heads =
            meta_u32(&content, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads);
        let left = content.tensor_infos.keys().cloned().collect();
        Ok(Self {
            reader: BufReader::new(File::open(file)?),
            content,
            file: file.to_path_buf(),
            arch,
            heads: heads as usize,
            kv_heads: kv_heads as usize,
            left,
            dtype,
            device: device.clone(),
        })
    }

    /// The tensor for Hugging Face name `hf`, in HF's row order.
    fn read(&mut self, hf: &str) -> Result<QTensor> {
        let name =
            crate::export::gguf::gguf_name(hf).ok_or_else(|| anyhow!("no GGUF name for `{hf}`"))?;
        if !self.left.remove(&name) {
            bail!(
                "{}: tensor `{name}` (`{hf}`) is missing",
                self.file.display()
            );
        }
        let q = self
            .content
            .tensor(&mut self.reader, &name, &self.device)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.file.display()))?;
        let heads = if self.arch != "llama" {
            None
        } else if name.ends_with("attn_q.weight") {
            Some(self.heads)
        } else if name.ends_with("attn_k.weight") {
            Some(self.kv_heads)
        } else {
            None
        };
        match heads {
            Some(h) => {
                let rows = q.shape().dims2()?.0;
                reorder_rows(&q, &hf_row_order(rows, h), &self.device)
            }
            None => Ok(q),
        }
    }
}

impl WeightSource for GgufSource {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        Ok(self
            .read(name)?
            .dequantize(&self.device)?
            .to_dtype(self.dtype)?)
    }

    fn take_linear(&mut self, name: &str) -> Result<LinearWeight> {
        let q = self.read(name)?;
        Ok(match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => LinearWeight::Dense(
                Param::frozen(q.dequantize(&self.device)?.to_dtype(self.dtype)?),
            ),
            _ => LinearWeight::Quantized(QuantWeight::from_qtensor(q, &self.device)?),
        })
    }

    fn rest(&mut self) -> Result<Vec<(String, Tensor)>> {
        // llama.cpp-only tensors (rope tables and the like) have no Hugging Face name.
        self.left.clear();
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_order_undoes_llama_cpp_permutation() {
        // Export's permutation: (heads, 2, half, in) -> (heads, half, 2, in).
        let (heads, d) = (2usize, 4usize);
        let hf: Vec<usize> = (0..heads * d).collect();
        let mut gguf = vec![0; hf.len()];
        for h in 0..heads {
            for t in 0..2 {
                for j in 0..d / 2 {
                    gguf[h * d + 2 * j + t] = hf[h * d + t * (d / 2) + j];
                }
            }
        }
        let back: Vec<usize> = hf_row_order(heads * d, heads)
            .iter()
            .map(|&r| gguf[r])
            .collect();
        assert_eq!(back, hf);
    }
}
