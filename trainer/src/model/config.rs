//! A Hugging Face `config.json` of the Llama family: `llama`, `mistral`, `qwen2`, `qwen3`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Llama3(Llama3Scaling),
    Linear(f64),
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
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
    pub max_position_embeddings: usize,
    pub torch_dtype: String,
    pub raw: serde_json::Map<String, Value>,
}

fn num(v: &serde_json::Map<String, Value>, key: &str, file: &Path) -> Result<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("{}: `{key}` is missing or not a number", file.display()))
}

fn rope_scaling(obj: &Value, file: &Path) -> Result<Option<RopeScaling>> {
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
        "default" => None,
        "llama3" => Some(RopeScaling::Llama3(Llama3Scaling {
            factor: f("factor", 8.0),
            low_freq_factor: f("low_freq_factor", 1.0),
            high_freq_factor: f("high_freq_factor", 4.0),
            original_max_position_embeddings: f("original_max_position_embeddings", 8192.0),
        })),
        "linear" => Some(RopeScaling::Linear(f("factor", 1.0))),
        other => bail!(
            "{}: rope scaling type `{other}` is not supported (supported: llama3, linear)",
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
        if !SUPPORTED.contains(&model_type.as_str()) {
            bail!(
                "{}: model_type `{model_type}` is not supported; supported: {}",
                file.display(),
                SUPPORTED.join(", ")
            );
        }
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
        // Newer transformers writes `rope_parameters` {rope_theta, rope_type, ...} instead.
        let rope_params = v.get("rope_parameters");
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
            Some(s) if !s.is_null() => rope_scaling(s, file)?,
            _ => match rope_params {
                Some(p) => rope_scaling(p, file)?,
                None => None,
            },
        };
        let attention_bias = v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            vocab_size: num(&v, "vocab_size", file)? as usize,
            intermediate_size: num(&v, "intermediate_size", file)? as usize,
            num_hidden_layers: num(&v, "num_hidden_layers", file)? as usize,
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
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_bias: attention_bias && model_type != "qwen2",
            qk_norm: model_type == "qwen3",
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
            model_type,
            raw: v,
        })
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

    /// RoPE inverse frequencies, with Llama 3 / linear scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
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
                "model_type `gpt2` is not supported; supported: llama, mistral, qwen2, qwen3"
            ),
            "{e}"
        );
    }
}
