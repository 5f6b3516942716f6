//! GGUF export for llama.cpp and Ollama: each family's architecture, keys and tensors as
//! llama.cpp's converter writes them ([`arch`]), the tokenizer ([`vocab`]), and f16 / q8_0 /
//! q4_k_m weights (K-quant mix as llama.cpp's Q4_K_M: Q6_K for the output and for attn_v /
//! ffn_down in the layers that get more bits, routers in f32), or, for a model whose base is a
//! GGUF file, `base`: every tensor re-quantized to the type it has in that file.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::DType;
use gguf_file::Value;

use crate::infer::ChatModel;

mod arch;
mod vocab;

pub(crate) use arch::arch;
pub use arch::gguf_name;
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
                || ((name.ends_with("attn_v.weight") || name.contains("ffn_down"))
                    && layer.is_some_and(|l| more_bits(l, n_layers)));
            if heavy {
                GgmlDType::Q6K
            } else if name.ends_with("attn_qkv.weight") {
                GgmlDType::Q5K
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
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if fits(fallback) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// Writes `path` as one GGUF file of the merged model.
pub fn write_gguf(chat: &ChatModel, path: &Path, kind: GgufType) -> Result<()> {
    let c = &chat.model.cfg;
    if c.mixture_of_depths {
        bail!(
            "{} is a Mixture-of-Depths model ({}): llama.cpp has no routed layers, so GGUF cannot hold it; export safetensors (`export_format: safetensors`)",
            chat.dir.display(),
            c.architecture()
        );
    }
    let a = arch(c)?;
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
    arch::metadata(c, a, &mut meta);
    vocab::metadata(chat, &mut meta)?;
    let params = chat
        .model
        .params()
        .into_iter()
        .map(|(hf, p)| Ok((hf, p.tensor.to_dtype(DType::F32)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in arch::tensors(c, a, params)? {
        // Quantization reads a tensor's storage from its start, whatever its layout says: each
        // tensor gets storage of its own (a narrowed W_pack block would not).
        let t = t.force_contiguous()?;
        let q = if t.rank() == 1 || keeps_f32(&name) {
            QTensor::quantize(&t, GgmlDType::F32)?
        } else {
            let cols = t.dim(candle_core::D::Minus1)?;
            QTensor::quantize(&t, plan.pick(&name, cols, c.num_hidden_layers)?)?
        };
        tensors.push((name, q));
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

/// Routers stay in f32, as llama.cpp's converter and quantizer keep them.
fn keeps_f32(name: &str) -> bool {
    name.contains("ffn_gate_inp")
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
