//! A Hugging Face `config.json` of the decoders we run: the Llama family (`llama`, `mistral`,
//! `qwen2`, `qwen3`), the Gemma family (`gemma`, `gemma2`, `gemma3_text`), Phi-3 / Phi-4-mini
//! (`phi3`), GLM-4 (`glm`, `glm4`), Baichuan and Baichuan 2 7B (`baichuan`) and the mixtures of
//! experts (`mixtral`, `qwen2_moe`, `qwen3_moe`), read into one [`ModelConfig`] whose fields say what each architecture does
//! differently.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "glm",
    "glm4",
    "baichuan",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen2_vl",
    "qwen2_5_vl",
    "llava",
];

/// How a mixture-of-experts checkpoint names its MLP weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeNaming {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1|w3|w2` (gate, up, down).
    Mixtral,
    /// `mlp.gate`, `mlp.experts.{e}.gate_proj|up_proj|down_proj`, `mlp.shared_expert.*`,
    /// `mlp.shared_expert_gate`.
    Qwen,
}

/// A sparse MLP: a router picks `top_k` of `experts` per token.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    pub top_k: usize,
    /// Renormalise the chosen experts' probabilities to sum to one (Mixtral always; Qwen's
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// Qwen2-MoE's always-on shared expert (gated by a sigmoid).
    pub shared_expert: bool,
    /// Each expert's intermediate size (Mixtral: `intermediate_size`; Qwen:
    /// `moe_intermediate_size`), and the shared expert's (`shared_expert_intermediate_size`).
    pub expert_intermediate: usize,
    pub shared_intermediate: usize,
    /// Per layer: sparse (`decoder_sparse_step`, not in `mlp_only_layers`) or a dense MLP.
    pub sparse_layers: Vec<bool>,
    /// `router_aux_loss_coef`, and whether the checkpoint asks for the load-balancing loss in
    /// training (`output_router_logits`; LLaMA-Factory's `moe_aux_loss_coef` turns it on).
    pub router_aux_loss_coef: f64,
    pub output_router_logits: bool,
    pub naming: MoeNaming,
}

/// Where a decoder layer normalises besides its input: the MLP's input norm, and the norms some
/// families put on the attention and MLP outputs before they join the residual stream. Each
/// names the Hugging Face weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormLayout {
    pub attn_out: Option<&'static str>,
    pub mlp_in: &'static str,
    pub mlp_out: Option<&'static str>,
}

impl NormLayout {
    /// Llama: `post_attention_layernorm` is the MLP's input norm.
    pub const LLAMA: Self = Self {
        attn_out: None,
        mlp_in: "post_attention_layernorm",
        mlp_out: None,
    };
    /// Gemma 2 and 3: sandwich norms.
    pub const GEMMA2: Self = Self {
        attn_out: Some("post_attention_layernorm"),
        mlp_in: "pre_feedforward_layernorm",
        mlp_out: Some("post_feedforward_layernorm"),
    };
    /// GLM-4 (`glm4`): post-norms under their own names.
    pub const GLM4: Self = Self {
        attn_out: Some("post_self_attn_layernorm"),
        mlp_in: "post_attention_layernorm",
        mlp_out: Some("post_mlp_layernorm"),
    };
}

/// The MLP's gate activation (`hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up` (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU with the tanh approximation: `gelu_tanh(gate) · up` (Gemma).
    GeluTanh,
    /// GeGLU with the exact (erf) GeLU: what transformers runs for `hidden_act: gelu`.
    Gelu,
}

/// What the Gemma family does differently from Llama.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaStyle {
    /// `tanh` soft-capping of the attention scores (Gemma 2: `attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// `tanh` soft-capping of the output logits (`final_logit_softcapping`).
    pub final_softcap: Option<f64>,
    /// RoPE base of the sliding-window layers (Gemma 3: `rope_local_base_freq`, unscaled).
    pub local_rope_theta: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Phi-3's LongRoPE (`longrope`, formerly `su`): per-frequency factors, the long ones once a
/// pass reaches beyond `original_max_position_embeddings`, and cos/sin scaled by
/// `attention_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3(Llama3Scaling),
    Linear(f64),
    LongRope(LongRope),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias: true` in Llama).
    pub o_bias: bool,
    /// RMSNorm on q and k per head (Qwen3, Gemma 3).
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
    pub torch_dtype: String,
    pub activation: Activation,
    /// Attention scores are `q·k · attn_scale` (`head_dim^-0.5`, or Gemma's
    /// `query_pre_attn_scalar^-0.5`).
    pub attn_scale: f64,
    /// Per layer: the sliding-window length of a local-attention layer, `None` for a global one.
    pub sliding_window: Vec<Option<usize>>,
    /// Gemma: RMSNorm weights are offsets, `(1 + w)`; the embedding is scaled by `√hidden`.
    pub gemma: Option<GemmaStyle>,
    /// Leading dimensions of each head that RoPE rotates (`partial_rotary_factor`; Phi-4-mini
    /// rotates three quarters); the rest pass through.
    pub rotary_dim: usize,
    /// The name of one fused projection instead of `q_proj`, `k_proj`, `v_proj`: `qkv_proj`
    /// (Phi-3), `W_pack` (Baichuan).
    pub fused_qkv: Option<&'static str>,
    /// Baichuan 2's NormHead: the LM head's rows are scaled to unit length before use.
    pub norm_head: bool,
    /// One `gate_up_proj` instead of `gate_proj`, `up_proj` (Phi-3, GLM).
    pub fused_gate_up: bool,
    /// RoPE turns interleaved pairs `(x₀, x₁), (x₂, x₃), …` instead of the two halves (GLM).
    pub interleaved_rope: bool,
    pub norms: NormLayout,
    /// Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE).
    pub moe: Option<MoeConfig>,
    /// The vision tower of a vision-language model (Qwen2-VL, Qwen2.5-VL, LLaVA).
    pub vision: Option<super::vision::VisionConfig>,
    /// M-RoPE: the rotary half-dimensions turned by the time, height and width positions.
    pub mrope_section: Option<[usize; 3]>,
    /// How the checkpoint names the tensors (LLaVA nests its language model).
    pub layout: super::weights::CheckpointLayout,
    /// Mixture-of-Depths: the odd layers are routed (`LlamaMoDForCausalLM`, …).
    pub mixture_of_depths: bool,
    /// The checkpoint's linear weights are GPTQ-quantized (`quantization_config`).
    pub gptq: Option<super::quant::gptq::GptqCheckpoint>,
    pub raw: serde_json::Map<String, Value>,
}

fn num(v: &serde_json::Map<String, Value>, key: &str, file: &Path) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("{}: `{key}` is missing or not a number", file.display()))
}

fn rope_scaling(
    obj: &Value,
    cfg: &serde_json::Map<String, Value>,
    file: &Path,
) -> Result<Option<RopeScaling>> {
    let Some(o) = obj.as_object() else {
        return Ok(None);
    };
    let kind = o
        .get("rope_type")
        .or_else(|| o.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str, d: f64| o.get(k).and_then(Value::as_f64).unwrap_or(d);
    Ok(match kind {
        // Qwen2-VL's `{"type": "mrope", "mrope_section": …}`: plain RoPE on three position axes.
        "default" | "mrope" => None,
        "llama3" => Some(RopeScaling::Llama3(Llama3Scaling {
            factor: f("factor", 8.0),
            low_freq_factor: f("low_freq_factor", 1.0),
            high_freq_factor: f("high_freq_factor", 4.0),
            original_max_position_embeddings: f("original_max_position_embeddings", 8192.0),
        })),
        "linear" => Some(RopeScaling::Linear(f("factor", 1.0))),
        "longrope" | "su" => Some(RopeScaling::LongRope(long_rope(o, cfg, file)?)),
        other => bail!(
            "{}: rope scaling type `{other}` is not supported (supported: llama3, linear, longrope)",
            file.display()
        ),
    })
}

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<Self> {
        let file = model_dir.join("config.json");
        if !file.exists() {
            bail!(
                "{} has no config.json: is this a Hugging Face model folder?",
                model_dir.display()
            );
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", file.display()))?;
        Self::from_json(raw, &file)
    }

    pub fn from_json(raw: Value, file: &Path) -> Result<Self> {
        let Value::Object(v) = raw else {
            bail!("{}: expected a JSON object", file.display())
        };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if model_type == "gemma3" {
            bail!(
                "{}: model_type `gemma3` is Gemma 3's vision-language checkpoint (4B and up); text fine-tuning here reads the text-only `gemma3_text` (Gemma 3 1B, or a 4B+ checkpoint's language model saved as `Gemma3ForCausalLM`)",
                file.display()
            );
        }
        if model_type == "chatglm" {
            bail!(
                "{}: model_type `chatglm` (ChatGLM2/3 and the first GLM-4-9B release) is a remote-code layout this trainer does not load; use its transformers-native successor (`glm`: THUDM/glm-4-9b-chat-hf, or `glm4`: GLM-4-0414)",
                file.display()
            );
        }
        if !SUPPORTED.contains(&model_type.as_str()) {
            bail!(
                "{}: model_type `{model_type}` is not supported; supported: {}",
                file.display(),
                SUPPORTED.join(", ")
            );
        }
        // A vision-language model: its text decoder is read like the family it extends.
        let raw = v.clone();
        let (v, vision, text_type) = if matches!(model_type.as_str(), "qwen2_vl" | "qwen2_5_vl") {
            let vision = super::vision::VisionConfig::from_json(&v, &model_type, file)?;
            (
                super::vision::flatten_text_config(v),
                Some(vision),
                "qwen2".to_string(),
            )
        } else if model_type == "llava" {
            let vision = super::vision::VisionConfig::from_json(&v, &model_type, file)?;
            let (v, text_type) = super::vision::llava_text_config(v, file)?;
            if !SUPPORTED[..SUPPORTED.len() - 3].contains(&text_type.as_str()) {
                bail!(
                    "{}: LLaVA with a `{text_type}` language model is not supported (llama, mistral, qwen2 … are)",
                    file.display()
                );
            }
            (v, Some(vision), text_type)
        } else {
            let t = model_type.clone();
            (v, None, t)
        };
        let mrope_section = super::vision::mrope_section(&v, file)?;
        let hidden_size = num(&v, "hidden_size", file)? as usize;
        let heads = num(&v, "num_attention_heads", file)? as usize;
        let kv_heads = v
            .get("num_key_value_heads")
            .and_then(Value::as_f64)
            .map(|x| x as usize)
            .unwrap_or(heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_f64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / heads);
        // transformers 5 writes `rope_parameters` {rope_theta, rope_type, ...} instead, and for
        // models with local and global layers (Gemma 3) one such object per layer type.
        let per_type = v
            .get("rope_parameters")
            .and_then(|p| p.get("full_attention"))
            .is_some();
        let rope_params = if per_type {
            v.get("rope_parameters")
                .and_then(|p| p.get("full_attention"))
        } else {
            v.get("rope_parameters")
        };
        let local_rope_theta = v
            .get("rope_parameters")
            .and_then(|p| p.get("sliding_attention"))
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64);
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let scaling = match v.get("rope_scaling") {
            Some(s) if !s.is_null() => rope_scaling(s, &v, file)?,
            _ => match rope_params {
                Some(p) => rope_scaling(p, &v, file)?,
                None => None,
            },
        };
        let family = Family::of(&text_type);
        if family == Family::Baichuan && v.get("max_position_embeddings").is_none() {
            bail!(
                "{}: this Baichuan checkpoint (13B: no `max_position_embeddings`) uses ALiBi position biases, which this trainer does not implement; Baichuan 2 7B (and Baichuan 7B) use rotary positions and are supported",
                file.display()
            );
        }
        // GLM's config classes default to biased q/k/v projections.
        let attention_bias = v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(matches!(family, Family::Glm(_)));
        let layers = num(&v, "num_hidden_layers", file)? as usize;
        let activation = activation(&v, family, file)?;
        let opt = |k: &str| v.get(k).and_then(Value::as_f64);
        let gemma = match family {
            Family::Llama | Family::Phi3 | Family::Glm(_) | Family::Baichuan => None,
            Family::Gemma(generation) => {
                if v.get("use_bidirectional_attention")
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    bail!("{}: `use_bidirectional_attention: true` (an embedding model) is not supported: this trainer runs causal language models", file.display());
                }
                Some(GemmaStyle {
                    attn_softcap: if generation == 2 {
                        opt("attn_logit_softcapping")
                    } else {
                        None
                    },
                    final_softcap: if generation >= 2 {
                        opt("final_logit_softcapping")
                    } else {
                        None
                    },
                    local_rope_theta: if generation == 3 {
                        Some(
                            local_rope_theta
                                .or_else(|| opt("rope_local_base_freq"))
                                .unwrap_or(10_000.0),
                        )
                    } else {
                        None
                    },
                })
            }
        };
        let attn_scale = match family {
            Family::Gemma(g) if g >= 2 => opt("query_pre_attn_scalar").unwrap_or(256.0).powf(-0.5),
            _ => (head_dim as f64).powf(-0.5),
        };
        let sliding_window = match family {
            Family::Gemma(g) if g >= 2 => sliding_layers(&v, g, layers, file)?,
            // Phi-3, Mistral (v0.1's 4,096) and Mixtral apply one window to every layer.
            _ if family == Family::Phi3 || matches!(text_type.as_str(), "mistral" | "mixtral") => {
                vec![
                    v.get("sliding_window")
                        .and_then(Value::as_u64)
                        .map(|w| w as usize);
                    layers
                ]
            }
            _ => vec![None; layers],
        };
        // transformers 5 keeps `partial_rotary_factor` in `rope_parameters`.
        let rotary_dim = (head_dim as f64
            * v.get("partial_rotary_factor")
                .or_else(|| rope_params.and_then(|p| p.get("partial_rotary_factor")))
                .and_then(Value::as_f64)
                .unwrap_or(1.0)) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 || rotary_dim > head_dim {
            bail!(
                "{}: `partial_rotary_factor` gives {rotary_dim} rotary dimensions of {head_dim}; an even number up to head_dim is needed",
                file.display()
            );
        }
        if let Some(RopeScaling::LongRope(l)) = &scaling {
            for (k, f) in [
                ("short_factor", &l.short_factor),
                ("long_factor", &l.long_factor),
            ] {
                if f.len() != rotary_dim / 2 {
                    bail!(
                        "{}: `rope_scaling.{k}` has {} entries; {} rotary dimensions need {}",
                        file.display(),
                        f.len(),
                        rotary_dim,
                        rotary_dim / 2
                    );
                }
            }
        }
        Ok(Self {
            vocab_size: num(&v, "vocab_size", file)? as usize,
            intermediate_size: num(&v, "intermediate_size", file)? as usize,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            hidden_size,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling: scaling,
            // An absent key takes the config class's default: Gemma ties, the others do not.
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(matches!(family, Family::Gemma(_))),
            qkv_bias: text_type == "qwen2"
                || (text_type == "qwen2_moe"
                    && v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true))
                || attention_bias,
            // GLM's o_proj never has a bias.
            o_bias: attention_bias
                && !matches!(text_type.as_str(), "qwen2" | "qwen2_moe")
                && !matches!(family, Family::Glm(_)),
            qk_norm: matches!(text_type.as_str(), "qwen3" | "qwen3_moe" | "gemma3_text"),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_f64)
                .unwrap_or(4096.0) as usize,
            torch_dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(Value::as_str)
                .unwrap_or("float32")
                .to_string(),
            activation,
            attn_scale,
            sliding_window,
            gemma,
            rotary_dim,
            moe: moe_config(&v, &text_type, layers, file)?,
            layout: match model_type.as_str() {
                "llava" => super::weights::CheckpointLayout::Llava,
                "qwen2_vl" | "qwen2_5_vl" => super::weights::CheckpointLayout::Qwen2Vl,
                _ => super::weights::CheckpointLayout::Plain,
            },
            vision,
            mrope_section,
            gptq: super::quant::gptq::GptqCheckpoint::from_config(&raw, file)?,
            mixture_of_depths: v
                .get("architectures")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .is_some_and(super::depths::is_routed_architecture),
            fused_qkv: match family {
                Family::Phi3 => Some("qkv_proj"),
                Family::Baichuan => Some("W_pack"),
                _ => None,
            },
            // Baichuan 2's vocabulary is 125,696; Baichuan 1's 64,000 has a plain head.
            norm_head: family == Family::Baichuan
                && v.get("vocab_size").and_then(Value::as_u64) != Some(64_000),
            fused_gate_up: matches!(family, Family::Phi3 | Family::Glm(_)),
            interleaved_rope: matches!(family, Family::Glm(_)),
            norms: match family {
                Family::Gemma(g) if g >= 2 => NormLayout::GEMMA2,
                Family::Glm(4) => NormLayout::GLM4,
                _ => NormLayout::LLAMA,
            },
            model_type,
            raw,
        })
    }

    /// The checkpoint's class (`architectures[0]`), or a name made from its model type.
    pub fn architecture(&self) -> String {
        self.raw
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| format!("{}ForCausalLM", self.model_type))
    }

    /// Whether RMSNorm weights are offsets from one (Gemma).
    pub fn norm_plus_one(&self) -> bool {
        self.gemma.is_some()
    }

    /// `rope_scaling` as LLaMA-Factory's `configure_rope` applies it: stretch the positions by
    /// `ceil(model_max_length / max_position_embeddings)` when training on longer sequences
    /// (`model_max_length` is `cutoff_len`), by 2 at inference (`None`), and raise
    /// `max_position_embeddings` to match; `config.json` saved with the model says so too.
    /// Returns what LLaMA-Factory logs.
    pub fn apply_rope_scaling(
        &mut self,
        kind: protocol::args::RopeScalingType,
        model_max_length: Option<usize>,
    ) -> String {
        use protocol::args::RopeScalingType;
        let old = match &self.rope_scaling {
            Some(RopeScaling::Llama3(s)) => s.original_max_position_embeddings,
            _ => self.max_position_embeddings as f64,
        };
        let factor = match model_max_length {
            Some(len) if len as f64 <= old => {
                return "Input length is smaller than max length. Disabling rope scaling.".into()
            }
            Some(len) => (len as f64 / old).ceil(),
            None => 2.0,
        };
        let (scaling, params) = match kind {
            RopeScalingType::Linear => (
                RopeScaling::Linear(factor),
                serde_json::json!({"rope_type": "linear", "factor": factor}),
            ),
            RopeScalingType::Llama3 => (
                RopeScaling::Llama3(Llama3Scaling {
                    factor,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: old,
                }),
                serde_json::json!({"rope_type": "llama3", "factor": factor,
                    "original_max_position_embeddings": old,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
            ),
        };
        self.rope_scaling = Some(scaling);
        self.max_position_embeddings = (old * factor) as usize;
        self.raw.insert("rope_scaling".into(), params);
        self.raw.insert(
            "max_position_embeddings".into(),
            serde_json::json!(self.max_position_embeddings),
        );
        format!(
            "Enlarge max model length from {old} to {}; using {kind} scaling with factor {factor}.",
            old * factor
        )
    }

    /// RoPE inverse frequencies of the sliding-window layers where they differ from the global
    /// ones (Gemma 3's local base, unscaled).
    pub fn local_inv_freq(&self) -> Option<Vec<f64>> {
        let theta = self.gemma.as_ref()?.local_rope_theta?;
        Some(base_inv_freq(theta, self.rotary_dim))
    }

    /// RoPE inverse frequencies for a pass whose positions reach `len - 1`, and the factor that
    /// scales cos and sin (LongRoPE's attention factor; 1 otherwise).
    pub fn rope_for(&self, len: usize) -> (Vec<f64>, f64) {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope(l)) => {
                let ext = if len > l.original_max_position_embeddings {
                    &l.long_factor
                } else {
                    &l.short_factor
                };
                let base = base_inv_freq(self.rope_theta, self.rotary_dim);
                let inv = base.iter().zip(ext).map(|(f, e)| f / e).collect();
                (inv, l.attention_factor)
            }
            _ => (self.inv_freq(), 1.0),
        }
    }

    /// RoPE inverse frequencies, with Llama 3 / linear scaling applied (LongRoPE's short
    /// factors; see [`ModelConfig::rope_for`]).
    pub fn inv_freq(&self) -> Vec<f64> {
        let base = base_inv_freq(self.rope_theta, self.rotary_dim);
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::LongRope(_)) => self.rope_for(0).0,
            Some(RopeScaling::Linear(f)) => base.iter().map(|x| x / f).collect(),
            Some(RopeScaling::Llama3(s)) => {
                let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / s.factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The MoE keys of `mixtral`, `qwen2_moe` and `qwen3_moe` (transformers' defaults where absent).
fn moe_config(
    v: &serde_json::Map<String, Value>,
    model_type: &str,
    layers: usize,
    file: &Path,
) -> Result<Option<MoeConfig>> {
    let int = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
    let naming = match model_type {
        "mixtral" => MoeNaming::Mixtral,
        "qwen2_moe" | "qwen3_moe" => MoeNaming::Qwen,
        _ => return Ok(None),
    };
    // transformers 4 writes Qwen's count as `num_experts`; transformers 5 writes
    // `num_local_experts` for Qwen3-MoE too.
    let experts = int("num_local_experts")
        .or_else(|| int("num_experts"))
        .unwrap_or(if naming == MoeNaming::Mixtral { 8 } else { 60 });
    let top_k =
        int("num_experts_per_tok").unwrap_or(if naming == MoeNaming::Mixtral { 2 } else { 4 });
    if top_k == 0 || top_k > experts {
        bail!(
            "{}: `num_experts_per_tok` is {top_k} with {experts} experts",
            file.display()
        );
    }
    let step = int("decoder_sparse_step").unwrap_or(1).max(1);
    let dense: Vec<usize> = usize_list(v.get("mlp_only_layers")).unwrap_or_default();
    let sparse_layers = (0..layers)
        .map(|l| naming == MoeNaming::Mixtral || (!dense.contains(&l) && (l + 1) % step == 0))
        .collect();
    Ok(Some(MoeConfig {
        experts,
        top_k,
        renormalize: naming == MoeNaming::Mixtral
            || v.get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        shared_expert: model_type == "qwen2_moe",
        expert_intermediate: match naming {
            MoeNaming::Mixtral => int("intermediate_size").unwrap_or(14336),
            MoeNaming::Qwen => int("moe_intermediate_size").unwrap_or(1408),
        },
        shared_intermediate: if model_type == "qwen2_moe" {
            int("shared_expert_intermediate_size").unwrap_or(5632)
        } else {
            0
        },
        sparse_layers,
        router_aux_loss_coef: v
            .get("router_aux_loss_coef")
            .and_then(Value::as_f64)
            .unwrap_or(0.001),
        output_router_logits: v
            .get("output_router_logits")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        naming,
    }))
}

/// LongRoPE as transformers computes it: with `original_max_position_embeddings` in the config,
/// the factor is `max_position_embeddings / original`, and the default attention factor
/// `√(1 + ln factor / ln original)`.
fn long_rope(
    o: &serde_json::Map<String, Value>,
    cfg: &serde_json::Map<String, Value>,
    file: &Path,
) -> Result<LongRope> {
    let list = |k: &str| -> Result<Vec<f64>> {
        o.get(k)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| {
                anyhow!(
                    "{}: `rope_scaling.{k}` (a list of numbers) is missing",
                    file.display()
                )
            })
    };
    let max = cfg
        .get("max_position_embeddings")
        .and_then(Value::as_f64)
        .unwrap_or(4096.0);
    let (original, factor) = match cfg
        .get("original_max_position_embeddings")
        .and_then(Value::as_f64)
    {
        Some(orig) => (orig, max / orig),
        None => (max, o.get("factor").and_then(Value::as_f64).unwrap_or(1.0)),
    };
    let attention_factor = match o.get("attention_factor").and_then(Value::as_f64) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / original.ln()).sqrt(),
    };
    Ok(LongRope {
        short_factor: list("short_factor")?,
        long_factor: list("long_factor")?,
        original_max_position_embeddings: original as usize,
        attention_factor,
    })
}

fn base_inv_freq(theta: f64, d: usize) -> Vec<f64> {
    (0..d / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    /// Gemma 1, 2 or 3.
    Gemma(u8),
    Phi3,
    /// `glm` (GLM-4-9B-chat-hf) or `glm4` (GLM-4-0414, with post-norms).
    Glm(u8),
    /// Baichuan's remote-code layout: fused `W_pack`, Baichuan 2's NormHead.
    Baichuan,
}

impl Family {
    fn of(model_type: &str) -> Self {
        match model_type {
            "gemma" => Family::Gemma(1),
            "gemma2" => Family::Gemma(2),
            "gemma3_text" => Family::Gemma(3),
            "phi3" => Family::Phi3,
            "glm" => Family::Glm(1),
            "glm4" => Family::Glm(4),
            "baichuan" => Family::Baichuan,
            _ => Family::Llama,
        }
    }
}

/// A JSON list of non-negative integers (other entries skipped).
pub(crate) fn usize_list(v: Option<&Value>) -> Option<Vec<usize>> {
    Some(
        v?.as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as usize)
            .collect(),
    )
}

/// The MLP activation, from the key transformers reads for the family: `hidden_act` (Llama,
/// Gemma 1), `hidden_activation` (Gemma 2 and 3).
fn activation(
    v: &serde_json::Map<String, Value>,
    family: Family,
    file: &Path,
) -> Result<Activation> {
    let (key, default) = match family {
        Family::Gemma(g) if g >= 2 => ("hidden_activation", Activation::GeluTanh),
        Family::Gemma(_) => ("hidden_act", Activation::GeluTanh),
        Family::Llama | Family::Phi3 | Family::Glm(_) | Family::Baichuan => {
            ("hidden_act", Activation::Silu)
        }
    };
    Ok(match v.get(key).and_then(Value::as_str) {
        None => default,
        Some("silu" | "swish") => Activation::Silu,
        Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_tanh") => Activation::GeluTanh,
        Some("gelu") => Activation::Gelu,
        Some(other) => bail!(
            "{}: `{key}: {other}` is not supported (supported: silu, gelu, gelu_pytorch_tanh)",
            file.display()
        ),
    })
}

/// Which layers attend within a sliding window: `layer_types` when the file has it, else the
/// pattern transformers derives (Gemma 2: every other layer from the first; Gemma 3: all but
/// every `sliding_window_pattern`-th, default 6).
fn sliding_layers(
    v: &serde_json::Map<String, Value>,
    generation: u8,
    layers: usize,
    file: &Path,
) -> Result<Vec<Option<usize>>> {
    let window = v
        .get("sliding_window")
        .and_then(Value::as_u64)
        .map(|w| w as usize);
    let kinds: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
        Some(types) => {
            if types.len() != layers {
                bail!(
                    "{}: `layer_types` has {} entries for {layers} layers",
                    file.display(),
                    types.len()
                );
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => bail!("{}: `layer_types` entry {t} is not `sliding_attention` or `full_attention`", file.display()),
                })
                .collect::<Result<_>>()?
        }
        None => {
            let pattern = match generation {
                2 => 2,
                _ => v
                    .get("sliding_window_pattern")
                    .and_then(Value::as_u64)
                    .unwrap_or(6) as usize,
            };
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    };
    kinds
        .into_iter()
        .map(|sliding| match (sliding, window) {
            (false, _) => Ok(None),
            (true, Some(w)) => Ok(Some(w)),
            (true, None) => bail!(
                "{}: sliding-window layers need `sliding_window`",
                file.display()
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(extra: Value) -> Result<ModelConfig> {
        let mut base = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json(base, Path::new("config.json"))
    }

    #[test]
    fn rope_scaling_follows_llamafactory() {
        use protocol::args::RopeScalingType;
        let mut c = cfg(json!({"max_position_embeddings": 1024})).unwrap();
        let base = c.inv_freq();
        let msg = c.apply_rope_scaling(RopeScalingType::Linear, Some(512));
        assert!(msg.contains("Disabling"), "{msg}");
        assert!(c.rope_scaling.is_none());
        c.apply_rope_scaling(RopeScalingType::Linear, Some(2500));
        assert_eq!(
            c.max_position_embeddings, 3072,
            "factor ceil(2500/1024) = 3"
        );
        assert!((c.inv_freq()[0] - base[0] / 3.0).abs() < 1e-12);
        assert_eq!(c.raw["rope_scaling"]["factor"], 3.0);
        let mut c = cfg(json!({"max_position_embeddings": 1024})).unwrap();
        c.apply_rope_scaling(RopeScalingType::Llama3, None);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3(ref s)) if s.factor == 2.0));
    }

    #[test]
    fn reads_variants_and_rejects_unknown_architectures() {
        let c = cfg(json!({})).unwrap();
        assert_eq!(
            (c.num_key_value_heads, c.head_dim, c.rope_theta),
            (2, 4, 10000.0)
        );
        let c = cfg(json!({"model_type": "qwen2"})).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        let c = cfg(json!({"model_type": "qwen3", "head_dim": 16, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})).unwrap();
        assert!(c.qk_norm);
        assert_eq!((c.head_dim, c.rope_theta), (16, 1e6));
        let c = cfg(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})).unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3(_))));
        let e = cfg(json!({"model_type": "gpt2"})).unwrap_err().to_string();
        assert!(
            e.contains(
                "model_type `gpt2` is not supported; supported: llama, mistral, qwen2, qwen3, gemma"
            ),
            "{e}"
        );
    }

    #[test]
    fn gemma_families_read_their_own_keys_and_defaults() {
        let c = cfg(json!({"model_type": "gemma", "head_dim": 16, "hidden_act": "gelu"})).unwrap();
        assert_eq!(c.activation, Activation::Gelu, "Gemma 1 follows hidden_act");
        assert_eq!(c.attn_scale, 0.25);
        assert!(c.norm_plus_one());
        assert_eq!(c.norms, NormLayout::LLAMA);
        assert_eq!(c.sliding_window, vec![None]);

        let c = cfg(
            json!({"model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 8,
            "query_pre_attn_scalar": 64, "final_logit_softcapping": 30.0}),
        )
        .unwrap();
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.attn_scale, 0.125);
        assert_eq!(c.sliding_window, vec![Some(8), None, Some(8), None]);
        let g = c.gemma.unwrap();
        assert_eq!(c.norms, NormLayout::GEMMA2);
        assert_eq!((g.attn_softcap, g.final_softcap), (None, Some(30.0)));

        let c = cfg(
            json!({"model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window": 4,
            "sliding_window_pattern": 3, "rope_local_base_freq": 100.0}),
        )
        .unwrap();
        let local: Vec<bool> = c.sliding_window.iter().map(Option::is_some).collect();
        assert_eq!(local, [true, true, false, true, true, false, true]);
        assert_eq!(c.local_inv_freq().unwrap()[1], 100f64.powf(-2.0 / 4.0));

        let e = cfg(json!({"model_type": "gemma3"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gemma3_text"), "{e}");
        let e = cfg(json!({"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": ["full_attention"]}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`layer_types` has 1 entries for 2 layers"),
            "{e}"
        );
        let e = cfg(json!({"model_type": "llama", "hidden_act": "relu"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`hidden_act: relu` is not supported"), "{e}");
    }

    #[test]
    fn phi3_reads_long_rope_and_partial_rotary() {
        let c = cfg(json!({"model_type": "phi3", "hidden_size": 16, "num_attention_heads": 2,
            "partial_rotary_factor": 0.5, "max_position_embeddings": 64, "original_max_position_embeddings": 8,
            "sliding_window": 5,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0], "long_factor": [4.0, 8.0]}}))
        .unwrap();
        assert_eq!((c.head_dim, c.rotary_dim), (8, 4));
        assert!(c.fused_qkv == Some("qkv_proj") && c.fused_gate_up && !c.interleaved_rope);
        assert_eq!(c.sliding_window, vec![Some(5)], "one window on every layer");
        let (short, a) = c.rope_for(8);
        let (long, b) = c.rope_for(9);
        assert_eq!(a, b);
        assert!((a - 2f64.sqrt()).abs() < 1e-12, "√(1 + ln 8 / ln 8)");
        let close = |x: &[f64], y: [f64; 2]| x.iter().zip(y).all(|(a, b)| (a - b).abs() < 1e-15);
        assert!(close(&short, [1.0, 0.01 / 2.0]), "{short:?}");
        assert!(close(&long, [1.0 / 4.0, 0.01 / 8.0]), "{long:?}");
        let e = cfg(
            json!({"model_type": "phi3", "hidden_size": 16, "num_attention_heads": 2,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`rope_scaling.short_factor` has 1 entries; 8 rotary dimensions need 4"),
            "{e}"
        );
    }

    /// transformers 5's spellings: `rope_parameters` (per layer type for Gemma 3, with
    /// `partial_rotary_factor` inside), `num_local_experts` for Qwen3-MoE, a null `head_dim`.
    #[test]
    fn reads_transformers_5_configs() {
        let c = cfg(json!({"model_type": "gemma3_text", "head_dim": 4, "sliding_window": 4,
            "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}))
        .unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear(8.0)));
        assert_eq!(c.gemma.unwrap().local_rope_theta, Some(1e4));
        let c = cfg(json!({"model_type": "glm", "head_dim": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}))
        .unwrap();
        assert_eq!(c.rotary_dim, 2);
        let c = cfg(
            json!({"model_type": "qwen3_moe", "num_local_experts": 4, "num_experts_per_tok": 2,
            "norm_topk_prob": true}),
        )
        .unwrap();
        assert_eq!(c.moe.unwrap().experts, 4);
        let c = cfg(json!({"model_type": "mixtral", "head_dim": null})).unwrap();
        assert_eq!(c.head_dim, 4);
    }

    #[test]
    fn baichuan_reads_w_pack_and_norm_head_and_refuses_alibi() {
        let c = cfg(json!({"model_type": "baichuan", "vocab_size": 125696,
            "max_position_embeddings": 4096}))
        .unwrap();
        assert_eq!(c.fused_qkv, Some("W_pack"));
        assert!(c.norm_head && !c.fused_gate_up && !c.tie_word_embeddings);
        // Baichuan 1 (64,000 tokens) has a plain head.
        let c = cfg(json!({"model_type": "baichuan", "vocab_size": 64000,
            "max_position_embeddings": 4096}))
        .unwrap();
        assert!(!c.norm_head);
        // 13B: ALiBi, no max_position_embeddings.
        let e =
            cfg(json!({"model_type": "baichuan", "vocab_size": 125696, "model_max_length": 4096}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("ALiBi") && e.contains("Baichuan 2 7B"), "{e}");
    }

    #[test]
    fn glm_families_default_to_biased_qkv_and_interleaved_rope() {
        let c = cfg(json!({"model_type": "glm4", "partial_rotary_factor": 0.5})).unwrap();
        assert!(
            c.qkv_bias && !c.o_bias,
            "attention_bias defaults to true; o_proj has none"
        );
        assert!(c.interleaved_rope && c.fused_gate_up && c.fused_qkv.is_none());
        assert_eq!((c.head_dim, c.rotary_dim), (4, 2));
        assert_eq!(c.norms, NormLayout::GLM4);
        let e = cfg(json!({"model_type": "chatglm"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("glm-4-9b-chat-hf"), "{e}");
        let c = cfg(json!({"model_type": "glm", "attention_bias": false})).unwrap();
        assert!(!c.qkv_bias);
        assert_eq!(c.norms, NormLayout::LLAMA);
    }

    #[test]
    fn moe_families_read_their_experts_and_sparse_layers() {
        let c =
            cfg(json!({"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 8}))
                .unwrap();
        let m = c.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.renormalize, m.shared_expert),
            (8, 2, true, false)
        );
        assert_eq!(m.naming, MoeNaming::Mixtral);
        let c = cfg(
            json!({"model_type": "qwen2_moe", "num_hidden_layers": 4, "num_experts": 6,
            "decoder_sparse_step": 2, "mlp_only_layers": [3], "output_router_logits": true}),
        )
        .unwrap();
        assert!(c.qkv_bias, "qwen2_moe's qkv_bias defaults to true");
        let m = c.moe.unwrap();
        assert_eq!(m.sparse_layers, vec![false, true, false, false]);
        assert!(m.shared_expert && !m.renormalize && m.output_router_logits);
        assert_eq!((m.top_k, m.router_aux_loss_coef), (4, 0.001));
        let c = cfg(json!({"model_type": "qwen3_moe", "num_experts": 4, "norm_topk_prob": true}))
            .unwrap();
        assert!(c.qk_norm && c.moe.unwrap().renormalize);
        let e =
            cfg(json!({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3}))
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("`num_experts_per_tok` is 3 with 2 experts"),
            "{e}"
        );
    }
}
