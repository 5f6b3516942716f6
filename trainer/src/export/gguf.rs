//! GGUF export for llama.cpp and Ollama: llama.cpp's tensor names and metadata keys, the
//! byte-level BPE tokenizer (`gpt2` model: tokens, types, merges, special ids, chat template),
//! and f16 / q8_0 / q4_k_m weights (K-quant mix as llama.cpp's Q4_K_M: Q6_K for the output and
//! for attn_v / ffn_down in the layers that get more bits), or, for a model whose base is a GGUF
//! file, `base`: every tensor re-quantized to the type it has in that file.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use gguf_file::Value;
use serde_json::Value as Json;

use crate::infer::ChatModel;

pub use protocol::args::GgufType;

/// `general.file_type`: llama.cpp's `LLAMA_FTYPE_*` of the file's main weight type.
fn file_type(t: GgufType) -> u32 {
    match t {
        GgufType::F16 => 1,
        GgufType::Q8_0 => 7,
        GgufType::Q4KM => 15,
        GgufType::Base => unreachable!("`base` takes the base file's own file type"),
    }
}

/// How each tensor's type is chosen.
enum TypePlan {
    /// One of llama.cpp's mixes.
    Mix(GgufType),
    /// The types the tensors have in the base GGUF file, and that file's `general.file_type`
    /// (optional in GGUF: llama.cpp guesses it from the tensors when it is missing).
    Base {
        types: std::collections::HashMap<String, GgmlDType>,
        file_type: Option<u32>,
    },
}

impl TypePlan {
    fn new(kind: GgufType, chat: &ChatModel) -> Result<Self> {
        if kind != GgufType::Base {
            return Ok(Self::Mix(kind));
        }
        let Some(file) = crate::model::gguf::source_of(&chat.dir) else {
            bail!("`export_gguf_type: base` needs a GGUF base model")
        };
        let mut f = std::fs::File::open(&file)
            .with_context(|| format!("cannot open the base GGUF {}", file.display()))?;
        let content = gguf_file::Content::read(&mut f)
            .with_context(|| format!("reading the base GGUF {}", file.display()))?;
        let file_type = content
            .metadata
            .get("general.file_type")
            .and_then(|v| v.to_u32().ok());
        let types = content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name.clone(), info.ggml_dtype))
            .collect();
        Ok(Self::Base { types, file_type })
    }

    fn file_type(&self) -> Option<u32> {
        match self {
            Self::Mix(kind) => Some(file_type(*kind)),
            Self::Base { file_type, .. } => *file_type,
        }
    }

    fn pick(&self, name: &str, cols: usize, n_layers: usize) -> Result<GgmlDType> {
        match self {
            Self::Mix(kind) => Ok(pick_type(*kind, name, cols, n_layers)),
            Self::Base { types, .. } => types.get(name).copied().ok_or_else(|| {
                anyhow!("`export_gguf_type: base`: the base GGUF file has no tensor `{name}`")
            }),
        }
    }
}

/// llama.cpp's architecture for a Hugging Face `model_type`.
pub(crate) fn arch(model_type: &str) -> Result<&'static str> {
    Ok(match model_type {
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "llama" | "mistral" => "llama",
        // GLM-4 turns interleaved pairs, as llama.cpp's own `glm4` does: q/k rows go as they are.
        "glm4" => "glm4",
        other => anyhow::bail!(
            "GGUF export of `{other}` models is not supported yet (supported: llama, mistral, qwen2, qwen3, glm4); export safetensors (`export_format: safetensors`) and convert with llama.cpp's convert_hf_to_gguf.py"
        ),
    })
}

/// llama.cpp's name for a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let (module, kind) = module.rsplit_once('.')?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_self_attn_layernorm" => "post_attention_norm",
        "post_mlp_layernorm" => "post_ffw_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // GLM-4's fused gate and up rows: llama.cpp's `ffn_up` of twice the width.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn more_bits(layer: usize, n: usize) -> bool {
    layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2
}

fn pick_type(t: GgufType, name: &str, cols: usize, n_layers: usize) -> GgmlDType {
    let fits = |d: GgmlDType| cols.is_multiple_of(d.block_size());
    let want = match t {
        GgufType::F16 | GgufType::Base => GgmlDType::F16,
        GgufType::Q8_0 => GgmlDType::Q8_0,
        GgufType::Q4KM => {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            let heavy = name == "output.weight"
                || ((name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
                    && layer.is_some_and(|l| more_bits(l, n_layers)));
            if heavy {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    if fits(want) {
        return want;
    }
    // llama.cpp's fallbacks for rows that are not a multiple of 256.
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// HF's rotate-half q/k layout → llama.cpp's interleaved one (for the `llama` architecture).
fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

fn tokenizer_metadata(chat: &ChatModel, meta: &mut Vec<(String, Value)>) -> Result<()> {
    let tok = &chat.tok;
    let raw: Json = serde_json::from_str(
        &std::fs::read_to_string(tok.dir.join("tokenizer.json"))
            .with_context(|| format!("reading {}", tok.dir.join("tokenizer.json").display()))?,
    )?;
    let model = &raw["model"];
    if model["type"] != "BPE" || raw["pre_tokenizer"].to_string().contains("Metaspace") {
        bail!("GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style); this tokenizer is {} with {}", model["type"], raw["pre_tokenizer"]["type"]);
    }
    let vocab = tok.inner.get_vocab(true);
    let n = tok.len().max(chat.model.cfg.vocab_size);
    let mut tokens = vec![String::new(); n];
    let mut types = vec![1i32; n];
    for (t, id) in &vocab {
        if (*id as usize) < n {
            tokens[*id as usize] = t.clone();
        }
    }
    for (id, added) in tok.inner.get_added_tokens_decoder() {
        if (id as usize) < n {
            types[id as usize] = if added.special { 3 } else { 4 };
        }
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
            types[i] = 5; // unused
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .ok_or_else(|| anyhow!("tokenizer.json has no BPE merges"))?
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
    let pre = match chat.model.cfg.model_type.as_str() {
        "qwen2" | "qwen3" => "qwen2",
        "glm4" => "glm4",
        _ if tok.token_to_id("<|begin_of_text|>").is_some() => "llama-bpe",
        _ => "default",
    };
    meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    meta.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
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

/// Writes `path` as one GGUF file of the merged model.
pub fn write_gguf(chat: &ChatModel, path: &Path, kind: GgufType) -> Result<()> {
    let c = &chat.model.cfg;
    let a = arch(&c.model_type)?;
    let plan = TypePlan::new(kind, chat)?;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    if let Some(t) = plan.file_type() {
        meta.push(("general.file_type".into(), Value::U32(t)));
    }
    let counts = [
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_hidden_layers),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("rope.dimension_count", c.rotary_dim),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
        ("vocab_size", c.vocab_size),
    ];
    for (key, n) in counts {
        meta.push((format!("{a}.{key}"), Value::U32(n as u32)));
    }
    meta.push((
        format!("{a}.attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps as f32),
    ));
    meta.push((
        format!("{a}.rope.freq_base"),
        Value::F32(c.rope_theta as f32),
    ));
    tokenizer_metadata(chat, &mut meta)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (hf, p) in chat.model.params() {
        let Some(name) = gguf_name(&hf) else {
            bail!("no GGUF name for tensor `{hf}`")
        };
        let mut t = p.tensor.to_dtype(DType::F32)?;
        if a == "llama" && name.ends_with("attn_q.weight") {
            t = permute_qk(&t, c.num_attention_heads)?;
        } else if a == "llama" && name.ends_with("attn_k.weight") {
            t = permute_qk(&t, c.num_key_value_heads)?;
        }
        let q = if t.rank() == 1 {
            QTensor::quantize(&t, GgmlDType::F32)?
        } else {
            let cols = t.dim(1)?;
            QTensor::quantize(&t, plan.pick(&name, cols, c.num_hidden_layers)?)?
        };
        tensors.push((name, q));
    }
    if let Some(crate::model::config::RopeScaling::Llama3(_)) = &c.rope_scaling {
        let base: Vec<f64> = {
            let mut plain = c.clone();
            plain.rope_scaling = None;
            plain.inv_freq()
        };
        let factors: Vec<f32> = base
            .iter()
            .zip(c.inv_freq())
            .map(|(b, s)| (b / s) as f32)
            .collect();
        let n = factors.len();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(
                &Tensor::from_vec(factors, n, &candle_core::Device::Cpu)?,
                GgmlDType::F32,
            )?,
        ));
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
    );
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quant_mix_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias").unwrap(),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        // GLM-4's post-norms and fused gate/up, as llama.cpp's converter names them (the file
        // runs in llama.cpp: scripts/gguf_family_check.py).
        assert_eq!(
            gguf_name("model.layers.2.post_self_attn_layernorm.weight").unwrap(),
            "blk.2.post_attention_norm.weight"
        );
        assert_eq!(
            gguf_name("model.layers.2.post_mlp_layernorm.weight").unwrap(),
            "blk.2.post_ffw_norm.weight"
        );
        assert_eq!(
            gguf_name("model.layers.2.mlp.gate_up_proj.weight").unwrap(),
            "blk.2.ffn_up.weight"
        );
        assert_eq!(arch("glm4").unwrap(), "glm4");
        for refused in ["gemma2", "phi3", "mixtral"] {
            let e = arch(refused).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{refused}` models is not supported yet")),
                "{e}"
            );
        }
        assert_eq!(
            pick_type(GgufType::Q4KM, "blk.0.ffn_down.weight", 512, 32),
            GgmlDType::Q6K
        );
        assert_eq!(
            pick_type(GgufType::Q4KM, "blk.10.ffn_down.weight", 512, 32),
            GgmlDType::Q4K
        );
        assert_eq!(
            pick_type(GgufType::Q4KM, "blk.10.attn_q.weight", 128, 32),
            GgmlDType::Q5_0
        );
        assert_eq!(
            pick_type(GgufType::Q8_0, "blk.1.attn_q.weight", 100, 32),
            GgmlDType::F16
        );
    }
}
