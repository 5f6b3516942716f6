//! Each family as llama.cpp's converter (`convert_hf_to_gguf.py`) writes it: the architecture
//! name, what llama.cpp can run of the family (refused by name otherwise), its hyper-parameter
//! keys, and its tensors under llama.cpp's names: Gemma's norms stored as `1 + w`, q/k rows in
//! llama.cpp's rotary order where it wants them, Baichuan's `W_pack` split and its NormHead
//! applied, the experts of a mixture stacked per layer, Phi-3's LongRoPE factors.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};

use crate::model::config::{ModelConfig, RopeScaling};

/// llama.cpp's architecture for the model, or why llama.cpp cannot run it as it is.
pub(crate) fn arch(c: &ModelConfig) -> Result<&'static str> {
    let a = match c.model_type.as_str() {
        "llama" | "mistral" | "mixtral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "qwen2_moe" => "qwen2moe",
        "qwen3_moe" => "qwen3moe",
        "gemma" => "gemma",
        "gemma2" => "gemma2",
        "gemma3_text" => "gemma3",
        "phi3" => "phi3",
        // GLM-4 turns interleaved pairs, as llama.cpp's own `glm4` does: q/k rows go as they are.
        "glm4" => "glm4",
        "baichuan" => "baichuan",
        other => bail!(
            "GGUF export of `{other}` models is not supported yet (supported: llama, mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe, gemma, gemma2, gemma3_text, phi3, glm4, baichuan); export safetensors (`export_format: safetensors`) and convert with llama.cpp's convert_hf_to_gguf.py"
        ),
    };
    runnable(c, a)?;
    Ok(a)
}

/// What llama.cpp fixes per architecture that a checkpoint could set otherwise.
fn runnable(c: &ModelConfig, a: &str) -> Result<()> {
    let refuse = |why: String| -> Result<()> {
        bail!("GGUF export: llama.cpp's `{a}` cannot run this model as configured: {why}; export safetensors instead")
    };
    if let Some(m) = &c.moe {
        if m.sparse_layers.iter().any(|s| !s) {
            return refuse("some layers have a dense MLP (`mlp_only_layers` / `decoder_sparse_step`); llama.cpp puts experts in every layer".into());
        }
        // llama.cpp renormalizes the chosen experts' weights for Mixtral and Qwen3-MoE, and not
        // for Qwen2-MoE.
        let renormalizes = a != "qwen2moe";
        if m.renormalize != renormalizes {
            return refuse(format!(
                "`norm_topk_prob: {}` (llama.cpp's `{a}` has {renormalizes})",
                m.renormalize
            ));
        }
    }
    if matches!(a, "gemma2" | "gemma3") {
        // llama.cpp scales attention by head_dim^-0.5 (27B: (hidden/heads)^-0.5) and fixes the
        // local/global layer pattern: every other layer (Gemma 2), five local in six (Gemma 3).
        let by_head = (c.head_dim as f64).powf(-0.5);
        let big = (c.hidden_size as f64 / c.num_attention_heads as f64).powf(-0.5);
        let layers_27b = if a == "gemma2" { 46 } else { 62 };
        let scale_ok = (c.attn_scale - by_head).abs() < 1e-9
            || (c.num_hidden_layers == layers_27b && (c.attn_scale - big).abs() < 1e-9);
        if !scale_ok {
            return refuse(format!(
                "`query_pre_attn_scalar` gives an attention scale of {} and llama.cpp uses head_dim^-0.5 = {by_head}",
                c.attn_scale
            ));
        }
        let period = if a == "gemma2" { 2 } else { 6 };
        let pattern_ok = c
            .sliding_window
            .iter()
            .enumerate()
            .all(|(l, w)| w.is_some() == (l % period < period - 1));
        if !pattern_ok {
            return refuse(format!(
                "its sliding-window layers are not llama.cpp's pattern (local except every {period}th layer)"
            ));
        }
        if let Some(theta) = c.gemma.as_ref().and_then(|g| g.local_rope_theta) {
            if theta != 10_000.0 {
                return refuse(format!(
                    "`rope_local_base_freq: {theta}` (llama.cpp uses 10000)"
                ));
            }
        }
    }
    if a == "baichuan" && c.num_hidden_layers != 32 {
        return refuse(format!(
            "{} layers: llama.cpp runs Baichuan at the 7B shape (32 layers) only",
            c.num_hidden_layers
        ));
    }
    Ok(())
}

/// The architecture's hyper-parameters beyond the common ones.
pub(super) fn metadata(c: &ModelConfig, a: &str, meta: &mut Vec<(String, Value)>) {
    let mut put = |k: &str, v: Value| meta.push((format!("{a}.{k}"), v));
    if let Some(m) = &c.moe {
        put("expert_count", Value::U32(m.experts as u32));
        put("expert_used_count", Value::U32(m.top_k as u32));
        if a != "llama" {
            put(
                "expert_feed_forward_length",
                Value::U32(m.expert_intermediate as u32),
            );
        }
        if m.shared_expert {
            put(
                "expert_shared_feed_forward_length",
                Value::U32(m.shared_intermediate as u32),
            );
        }
    }
    if let Some(g) = &c.gemma {
        if let Some(cap) = g.attn_softcap {
            put("attn_logit_softcapping", Value::F32(cap as f32));
        }
        if let Some(cap) = g.final_softcap {
            put("final_logit_softcapping", Value::F32(cap as f32));
        }
    }
    if matches!(a, "gemma2" | "gemma3" | "phi3") {
        if let Some(w) = c.sliding_window.iter().flatten().next() {
            put("attention.sliding_window", Value::U32(*w as u32));
        }
    }
    match &c.rope_scaling {
        Some(RopeScaling::Linear(f)) => {
            put("rope.scaling.type", Value::String("linear".into()));
            put("rope.scaling.factor", Value::F32(*f as f32));
        }
        Some(RopeScaling::LongRope(l)) => {
            put(
                "rope.scaling.original_context_length",
                Value::U32(l.original_max_position_embeddings as u32),
            );
            put(
                "rope.scaling.attn_factor",
                Value::F32(l.attention_factor as f32),
            );
        }
        _ => {}
    }
}

/// llama.cpp's name for a tensor of a Llama-layout checkpoint (also how a GGUF base's tensors
/// are found again, `crate::model::gguf`).
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
        // Phi-3's fused q/k/v.
        "self_attn.qkv_proj" => "attn_qkv",
        "post_self_attn_layernorm" => "post_attention_norm",
        "post_mlp_layernorm" => "post_ffw_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Fused gate and up rows (Phi-3, GLM-4): llama.cpp's `ffn_up` of twice the width.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // A mixture's router, and Qwen2-MoE's shared expert and its gate.
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// The name under the model's own norm layout (Gemma 2/3's sandwich norms reuse
/// `post_attention_layernorm` for the attention output).
fn export_name(hf: &str, c: &ModelConfig) -> Option<String> {
    let norm = hf
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(layer, module)| Some((layer, module.strip_suffix(".weight")?)));
    if let Some((layer, module)) = norm {
        let role = if Some(module) == c.norms.attn_out {
            Some("post_attention_norm")
        } else if module == c.norms.mlp_in {
            Some("ffn_norm")
        } else if Some(module) == c.norms.mlp_out {
            Some("post_ffw_norm")
        } else {
            None
        };
        if let Some(role) = role {
            return Some(format!("blk.{layer}.{role}.weight"));
        }
    }
    gguf_name(hf)
}

/// An expert's weight: `(layer, llama.cpp's stacked name, expert)`.
fn expert_of(hf: &str) -> Option<(usize, &'static str, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest
        .strip_prefix("block_sparse_moe.experts.")
        .or_else(|| rest.strip_prefix("mlp.experts."))?;
    let (expert, module) = rest.split_once('.')?;
    let stacked = match module {
        "w1.weight" | "gate_proj.weight" => "ffn_gate_exps",
        "w3.weight" | "up_proj.weight" => "ffn_up_exps",
        "w2.weight" | "down_proj.weight" => "ffn_down_exps",
        _ => return None,
    };
    Some((layer.parse().ok()?, stacked, expert.parse().ok()?))
}

/// HF's rotate-half q/k layout → llama.cpp's interleaved one (architectures with "normal" rope).
fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// The model's f32 tensors `(HF name, tensor)` as llama.cpp's tensors.
pub(super) fn tensors(
    c: &ModelConfig,
    a: &str,
    params: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    let permutes = matches!(a, "llama" | "baichuan");
    let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut push = |name: String, t: Tensor| -> Result<()> {
        let t = if permutes && name.ends_with("attn_q.weight") {
            permute_qk(&t, nh)?
        } else if permutes && name.ends_with("attn_k.weight") {
            permute_qk(&t, nkv)?
        } else {
            t
        };
        out.push((name, t));
        Ok(())
    };
    let mut experts: BTreeMap<(usize, &'static str), Vec<(usize, Tensor)>> = BTreeMap::new();
    for (hf, mut t) in params {
        if c.norm_plus_one() && hf.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        if c.norm_head && hf == "lm_head.weight" {
            // Baichuan 2's NormHead (already applied to a head loaded frozen; a trained head is
            // the raw weight).
            t = crate::model::unit_rows(&t)?;
        }
        if let Some((layer, stacked, e)) = expert_of(&hf) {
            experts.entry((layer, stacked)).or_default().push((e, t));
            continue;
        }
        if let Some(prefix) = hf.strip_suffix(".self_attn.W_pack.weight") {
            let layer = prefix.trim_start_matches("model.layers.");
            for (i, (part, rows)) in [("attn_q", nh), ("attn_k", nkv), ("attn_v", nkv)]
                .into_iter()
                .enumerate()
            {
                let start = [0, nh, nh + nkv][i] * hd;
                push(
                    format!("blk.{layer}.{part}.weight"),
                    t.narrow(0, start, rows * hd)?.force_contiguous()?,
                )?;
            }
            continue;
        }
        let name = export_name(&hf, c).ok_or_else(|| anyhow!("no GGUF name for tensor `{hf}`"))?;
        // Qwen2-MoE's shared-expert gate is one row: llama.cpp reads a vector.
        let t = if name.ends_with("ffn_gate_inp_shexp.weight") {
            t.flatten_all()?
        } else {
            t
        };
        push(name, t)?;
    }
    for ((layer, stacked), mut list) in experts {
        list.sort_by_key(|(e, _)| *e);
        let parts: Vec<Tensor> = list.into_iter().map(|(_, t)| t).collect();
        out.push((
            format!("blk.{layer}.{stacked}.weight"),
            Tensor::stack(&parts, 0)?,
        ));
    }
    out.extend(rope_tensors(c)?);
    Ok(out)
}

/// Llama 3's frequency factors (`rope_freqs`), Phi-3's LongRoPE factors.
fn rope_tensors(c: &ModelConfig) -> Result<Vec<(String, Tensor)>> {
    let vector = |v: Vec<f32>| -> Result<Tensor> {
        let n = v.len();
        Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
    };
    Ok(match &c.rope_scaling {
        Some(RopeScaling::Llama3(_)) => {
            let mut plain = c.clone();
            plain.rope_scaling = None;
            let factors = plain
                .inv_freq()
                .iter()
                .zip(c.inv_freq())
                .map(|(b, s)| (b / s) as f32)
                .collect();
            vec![("rope_freqs.weight".into(), vector(factors)?)]
        }
        Some(RopeScaling::LongRope(l)) => {
            let f32s = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<_>>();
            vec![
                (
                    "rope_factors_long.weight".into(),
                    vector(f32s(&l.long_factor))?,
                ),
                (
                    "rope_factors_short.weight".into(),
                    vector(f32s(&l.short_factor))?,
                ),
            ]
        }
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> ModelConfig {
        let mut base = json!({"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1});
        base.as_object_mut()
            .unwrap()
            .extend(v.as_object().unwrap().clone());
        ModelConfig::from_json(base, std::path::Path::new("config.json")).unwrap()
    }

    fn refusal(c: &ModelConfig) -> String {
        arch(c).unwrap_err().to_string()
    }

    #[test]
    fn families_map_to_llama_cpp_architectures_or_are_refused_by_name() {
        for (mt, a) in [
            ("mistral", "llama"),
            ("gemma", "gemma"),
            ("phi3", "phi3"),
            ("glm4", "glm4"),
            ("qwen3_moe", "qwen3moe"),
        ] {
            let mut extra = json!({"model_type": mt});
            if mt == "qwen3_moe" {
                extra["norm_topk_prob"] = json!(true);
            }
            assert_eq!(arch(&cfg(extra)).unwrap(), a, "{mt}");
        }
        assert!(
            refusal(&cfg(json!({"model_type": "glm"}))).contains("`glm` models is not supported")
        );
        // What llama.cpp fixes: every layer sparse, its top-k normalization, Gemma 2's scale.
        let e = refusal(&cfg(
            json!({"model_type": "qwen2_moe", "mlp_only_layers": [1]}),
        ));
        assert!(e.contains("mlp_only_layers"), "{e}");
        let e = refusal(&cfg(
            json!({"model_type": "qwen3_moe", "norm_topk_prob": false}),
        ));
        assert!(e.contains("norm_topk_prob"), "{e}");
        let e = refusal(&cfg(
            json!({"model_type": "gemma2", "head_dim": 4, "query_pre_attn_scalar": 24, "sliding_window": 4}),
        ));
        assert!(e.contains("query_pre_attn_scalar"), "{e}");
        let e = refusal(&cfg(
            json!({"model_type": "gemma3_text", "head_dim": 4, "query_pre_attn_scalar": 4,
            "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4}),
        ));
        assert!(e.contains("sliding-window layers"), "{e}");
        let e = refusal(&cfg(
            json!({"model_type": "baichuan", "max_position_embeddings": 64}),
        ));
        assert!(e.contains("32 layers"), "{e}");
    }

    #[test]
    fn tensors_take_llama_cpp_names_and_layouts() {
        let c = cfg(
            json!({"model_type": "gemma2", "head_dim": 4, "query_pre_attn_scalar": 4, "sliding_window": 4}),
        );
        let t = |v: Vec<f32>| Tensor::new(v, &Device::Cpu).unwrap();
        let out = tensors(
            &c,
            "gemma2",
            vec![
                (
                    "model.layers.0.post_attention_layernorm.weight".into(),
                    t(vec![0.5]),
                ),
                (
                    "model.layers.0.pre_feedforward_layernorm.weight".into(),
                    t(vec![0.0]),
                ),
                (
                    "model.layers.0.post_feedforward_layernorm.weight".into(),
                    t(vec![-0.5]),
                ),
            ],
        )
        .unwrap();
        let got: Vec<(String, f32)> = out
            .iter()
            .map(|(n, t)| (n.clone(), t.to_vec1::<f32>().unwrap()[0]))
            .collect();
        assert_eq!(
            got,
            [
                ("blk.0.post_attention_norm.weight".to_string(), 1.5),
                ("blk.0.ffn_norm.weight".to_string(), 1.0),
                ("blk.0.post_ffw_norm.weight".to_string(), 0.5),
            ]
        );
        // Experts stack per layer in expert order; the router keeps its name.
        let c =
            cfg(json!({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 1}));
        let w = |x: f32| Tensor::full(x, (3, 2), &Device::Cpu).unwrap();
        let out = tensors(
            &c,
            "llama",
            vec![
                (
                    "model.layers.1.block_sparse_moe.experts.1.w2.weight".into(),
                    w(2.0),
                ),
                (
                    "model.layers.1.block_sparse_moe.experts.0.w2.weight".into(),
                    w(1.0),
                ),
                ("model.layers.1.block_sparse_moe.gate.weight".into(), w(0.0)),
            ],
        )
        .unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["blk.1.ffn_gate_inp.weight", "blk.1.ffn_down_exps.weight"]
        );
        let stacked = &out[1].1;
        assert_eq!(stacked.dims(), &[2, 3, 2]);
        let first: Vec<f32> = stacked
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(first.iter().all(|x| *x == 1.0));
        // Baichuan's W_pack splits into q, k, v; its head is normalized.
        let c = cfg(
            json!({"model_type": "baichuan", "max_position_embeddings": 64,
            "num_key_value_heads": 2, "num_hidden_layers": 32}),
        );
        let rows: Vec<f32> = (0..24 * 8).map(|i| i as f32).collect();
        let pack = Tensor::from_vec(rows, (24, 8), &Device::Cpu).unwrap();
        let head = Tensor::full(2f32, (16, 8), &Device::Cpu).unwrap();
        let out = tensors(
            &c,
            "baichuan",
            vec![
                ("model.layers.0.self_attn.W_pack.weight".into(), pack),
                ("lm_head.weight".into(), head),
            ],
        )
        .unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "blk.0.attn_q.weight",
                "blk.0.attn_k.weight",
                "blk.0.attn_v.weight",
                "output.weight"
            ]
        );
        let v: Vec<f32> = out[2].1.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(
            v[0],
            (16 * 8) as f32,
            "v is the third block of rows, not permuted"
        );
        let h: Vec<f32> = out[3].1.get(0).unwrap().to_vec1().unwrap();
        assert!((h.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
