//! How much memory a training run needs: the base weights (quantized ones at their bits per
//! weight), the trained tensors with their gradients and Adam moments, and the activations of a
//! micro-batch. Estimated from `config.json` before anything loads (LlamaBoard's Preview), and
//! checked against the machine once the model is loaded.

use protocol::args::FinetuningType;
use protocol::TrainArgs;

use crate::model::quant::QuantFormat;
use crate::model::ModelConfig;

/// Bytes, by what they hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    /// Trained tensors, their gradients and the optimizer's two moments.
    pub training_state: u64,
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.training_state + self.activations
    }
}

/// Activations of a micro-batch of `tokens` tokens (`seq` long each) kept for backward, in
/// bytes of `elem` each: a dozen hidden-sized tensors a layer, the MLP's, the attention
/// scores, and the LM head's logits — all of them (with their gradient) when the head trains,
/// else a few tiles at a time ([`crate::ops::frozen_head_logps`]).
pub fn activation_bytes(
    cfg: &ModelConfig,
    tokens: u64,
    seq: usize,
    elem: u64,
    head_trains: bool,
) -> u64 {
    // A token of a sparse layer goes through its top-k experts (and a shared one).
    let mlp = match &cfg.moe {
        Some(m) => m.top_k * m.expert_intermediate + m.shared_intermediate + m.experts,
        None => cfg.intermediate_size,
    };
    let per_layer = (14 * cfg.hidden_size + 3 * mlp + 3 * cfg.num_attention_heads * seq) as u64;
    let logits = if head_trains {
        tokens * 3 * cfg.vocab_size as u64
    } else {
        4 * crate::ops::HEAD_TILE_ELEMS as u64
    };
    (tokens * per_layer * cfg.num_hidden_layers as u64 + logits) * elem
}

/// Decoder layer `l`'s linear weights, `(out, in)` each: attention, then the MLP's (a sparse
/// layer's router, experts and shared expert).
fn layer_linears(cfg: &ModelConfig, l: usize) -> Vec<(usize, usize)> {
    let h = cfg.hidden_size;
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut out = vec![(q, h), (kv, h), (kv, h), (h, q)];
    let ffn = |i: usize| [(i, h), (i, h), (h, i)];
    match &cfg.moe {
        Some(m) if m.sparse_layers[l] => {
            out.push((m.experts, h));
            for _ in 0..m.experts {
                out.extend(ffn(m.expert_intermediate));
            }
            if m.shared_expert {
                out.extend(ffn(m.shared_intermediate));
                out.push((1, h));
            }
        }
        _ => out.extend(ffn(cfg.intermediate_size)),
    }
    out
}

/// The estimate for `args` on a model of `cfg`, computing in `elem`-byte floats with f32
/// masters for what trains.
pub fn estimate(cfg: &ModelConfig, args: &TrainArgs, elem: u64) -> MemoryEstimate {
    let linears: Vec<(usize, usize)> = (0..cfg.num_hidden_layers)
        .flat_map(|l| layer_linears(cfg, l))
        .collect();
    let layers = cfg.num_hidden_layers as u64;
    let linear_elems: u64 = linears.iter().map(|(o, i)| (o * i) as u64).sum::<u64>();
    let embed = (cfg.vocab_size * cfg.hidden_size) as u64;
    let norms = (cfg.hidden_size as u64) * (2 * layers + 1);
    let quant = QuantFormat::from_args(args).ok().flatten();
    // QLoRA keeps a half-precision checkpoint's embedding and head in its 16 bits.
    let half_checkpoint = matches!(cfg.torch_dtype.as_str(), "bfloat16" | "float16");
    let table_elem = if quant.is_some() && half_checkpoint {
        elem.min(2)
    } else {
        elem
    };
    let tables = embed * if cfg.tie_word_embeddings { 1 } else { 2 };
    let linear_bytes = match quant {
        Some(f) => (linear_elems as f64 * f.bits_per_weight() / 8.0) as u64,
        None => linear_elems * elem,
    };
    let trained: u64 = match args.finetuning_type {
        FinetuningType::Lora => {
            let r = args.lora_rank as u64;
            linears
                .iter()
                .map(|(o, i)| r * (o + i) as u64 + if args.use_dora { *o as u64 } else { 0 })
                .sum()
        }
        FinetuningType::Freeze => {
            let k = args.freeze_trainable_layers.unsigned_abs().min(layers);
            linear_elems / layers.max(1) * k
        }
        FinetuningType::Full => linear_elems + tables + norms,
    };
    let seq = args.cutoff_len;
    let tokens = (args.per_device_train_batch_size * seq) as u64;
    MemoryEstimate {
        weights: linear_bytes + tables * table_elem + norms * elem,
        // Value, gradient and two moments, in f32.
        training_state: trained * 4 * 4,
        activations: activation_bytes(
            cfg,
            tokens,
            seq,
            elem,
            args.finetuning_type == FinetuningType::Full,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_4bit_base_takes_about_an_eighth_of_f32() {
        let raw = json!({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "tie_word_embeddings": true, "torch_dtype": "bfloat16"});
        let cfg = ModelConfig::from_json(raw, std::path::Path::new("config.json")).unwrap();
        let f32_run = estimate(&cfg, &TrainArgs::default(), 4);
        let q4 = estimate(
            &cfg,
            &TrainArgs {
                quantization_bit: Some(4),
                ..TrainArgs::default()
            },
            4,
        );
        // Qwen2.5-0.5B: 358 M linear weights and a 136 M embedding (kept in bf16 under QLoRA).
        let gb = |b: u64| b as f64 / 1e9;
        assert!(
            (gb(f32_run.weights) - 1.98).abs() < 0.05,
            "{}",
            gb(f32_run.weights)
        );
        assert!((gb(q4.weights) - 0.46).abs() < 0.05, "{}", gb(q4.weights));
        assert_eq!(f32_run.training_state, q4.training_state);
    }

    /// Mixtral-8x7B: 46.7 B parameters, of which 0.26 B are the two embedding tables; in bf16
    /// about 93 GB of weights.
    #[test]
    fn a_mixture_of_experts_counts_every_expert() {
        let raw = json!({"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
            "tie_word_embeddings": false});
        let cfg = ModelConfig::from_json(raw, std::path::Path::new("config.json")).unwrap();
        let e = estimate(&cfg, &TrainArgs::default(), 2);
        let params = e.weights as f64 / 2.0 / 1e9;
        assert!((params - 46.7).abs() < 0.1, "{params} B");
    }
}
