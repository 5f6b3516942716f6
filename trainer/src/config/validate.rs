//! LLaMA-Factory's cross-argument rules (its parser's post-init checks) for what this engine
//! runs. Each failure names the key it is about, as data, so the web form can mark the field.

use protocol::args::{FinetuningType, PrefLossType, QuantizationMethod, Stage};
use protocol::TrainArgs;

/// A rule an argument breaks: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgError {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ArgError {}

fn fail(key: &'static str, message: impl Into<String>) -> Result<(), ArgError> {
    Err(ArgError {
        key,
        message: message.into(),
    })
}

/// Checks the rules that tie arguments together; values of a single key were checked when it
/// was read.
pub fn validate(a: &TrainArgs) -> Result<(), ArgError> {
    unsupported(a)?;
    for t in a.trackers() {
        if !protocol::args::TRACKERS.contains(&t.as_str()) {
            return fail(
                "report_to",
                format!(
                    "`report_to: {t}` is not a tracker; choose from none, all, {}",
                    protocol::args::TRACKERS.join(", ")
                ),
            );
        }
    }
    if a.stage != Stage::Sft {
        for (key, on) in [
            ("predict_with_generate", a.predict_with_generate),
            ("neat_packing", a.neat_packing),
            ("train_on_prompt", a.train_on_prompt),
            ("mask_history", a.mask_history),
        ] {
            if on {
                return fail(
                    key,
                    format!(
                        "`{key}` is only valid for stage sft (stage is `{}`)",
                        a.stage
                    ),
                );
            }
        }
    }
    if a.train_on_prompt && a.mask_history {
        return fail(
            "mask_history",
            "`train_on_prompt` and `mask_history` cannot be used together",
        );
    }
    if a.stage == Stage::Sft && a.do_predict && !a.predict_with_generate {
        return fail("predict_with_generate", "please enable `predict_with_generate` to save model predictions (do_predict with stage sft)");
    }
    if a.predict_with_generate && a.compute_accuracy {
        return fail(
            "compute_accuracy",
            "`predict_with_generate` cannot be used with `compute_accuracy`",
        );
    }
    if a.val_size > 1e-6 && a.eval_dataset.is_some() {
        return fail(
            "val_size",
            "cannot specify `val_size` if `eval_dataset` is not None",
        );
    }
    if a.val_size < 0.0 {
        return fail(
            "val_size",
            format!("key `val_size` must not be negative, got {}", a.val_size),
        );
    }
    if a.adapter_name_or_path.is_some() && a.finetuning_type != FinetuningType::Lora {
        return fail(
            "adapter_name_or_path",
            "adapters (`adapter_name_or_path`) are only valid for LoRA training",
        );
    }
    if a.finetuning_type != FinetuningType::Lora {
        for (key, on) in [
            ("use_rslora", a.use_rslora),
            ("use_dora", a.use_dora),
            ("pissa_init", a.pissa_init),
            ("loraplus_lr_ratio", a.loraplus_lr_ratio.is_some()),
        ] {
            if on {
                return fail(
                    key,
                    format!(
                        "`{key}` is only valid for LoRA training (finetuning_type is `{}`)",
                        a.finetuning_type
                    ),
                );
            }
        }
    }
    if let Some(bits) = a.quantization_bit {
        let m = a.quantization_method;
        if !m.supported() {
            return fail(
                "quantization_method",
                format!("`quantization_method: {m}` is not supported: use `bnb` (4-bit NF4/FP4, 8-bit) or `ggml` (2, 3, 4, 5, 6 or 8 bits)"),
            );
        }
        if !m.bits().contains(&bits) {
            let hint = if m == QuantizationMethod::Bnb
                && QuantizationMethod::Ggml.bits().contains(&bits)
            {
                " (bitsandbytes has 4 and 8 bits; `quantization_method: ggml` has this width)"
            } else {
                ""
            };
            return fail(
                "quantization_bit",
                format!(
                    "`quantization_bit: {bits}` is not supported with `quantization_method: {m}`: choose one of {:?}{hint}",
                    m.bits()
                ),
            );
        }
        if a.do_train && a.finetuning_type != FinetuningType::Lora {
            return fail(
                "quantization_bit",
                "Quantization is only compatible with the LoRA method (`finetuning_type: lora`).",
            );
        }
    }
    if a.stage == Stage::Ppo && a.reward_model.is_none() {
        return fail("reward_model", "stage ppo requires `reward_model`");
    }
    if a.dpo_label_smoothing > 1e-6 && a.pref_loss != PrefLossType::Sigmoid {
        return fail(
            "dpo_label_smoothing",
            "`dpo_label_smoothing` is only valid for pref_loss sigmoid",
        );
    }
    if [a.use_galore, a.use_apollo, a.use_badam]
        .iter()
        .filter(|x| **x)
        .count()
        > 1
    {
        return fail(
            if a.use_apollo {
                "use_apollo"
            } else {
                "use_badam"
            },
            "Cannot use GaLore, APOLLO or BAdam together.",
        );
    }
    if a.use_apollo && a.finetuning_type == FinetuningType::Lora {
        return fail(
            "use_apollo",
            "Cannot use LoRA with GaLore, APOLLO or BAdam together (APOLLO trains full weights: use `finetuning_type: full` or `freeze`)",
        );
    }
    if a.use_apollo && a.apollo_layerwise && a.gradient_accumulation_steps != 1 {
        return fail(
            "apollo_layerwise",
            "Per-layer APOLLO does not support gradient accumulation (`gradient_accumulation_steps` must be 1)",
        );
    }
    if a.use_apollo && (a.apollo_rank == 0 || a.apollo_update_interval == 0) {
        return fail(
            "apollo_rank",
            "`apollo_rank` and `apollo_update_interval` must be at least 1",
        );
    }
    if a.use_galore && a.use_badam {
        return fail("use_badam", "Cannot use GaLore, APOLLO or BAdam together.");
    }
    if a.use_badam && a.finetuning_type == FinetuningType::Lora {
        return fail(
            "use_badam",
            "Cannot use LoRA with GaLore, APOLLO or BAdam together (BAdam trains full layers: use `finetuning_type: full`)",
        );
    }
    if a.use_badam
        && a.badam_mode == protocol::args::BadamMode::Ratio
        && !(a.badam_update_ratio > 1e-6 && a.badam_update_ratio <= 1.0)
    {
        return fail(
            "badam_update_ratio",
            format!(
                "`badam_update_ratio: {}`: ratio-based BAdam updates a share of each tensor, above 0 and at most 1",
                a.badam_update_ratio
            ),
        );
    }
    if a.use_badam && matches!(a.stage, Stage::Dpo | Stage::Kto | Stage::Ppo) {
        return fail(
            "use_badam",
            format!("BAdam with stage {} is not supported here: its frozen reference model would follow the blocks already trained; use stage sft, pt or rm", a.stage),
        );
    }
    if a.use_galore && a.finetuning_type == FinetuningType::Lora {
        return fail(
            "use_galore",
            "Cannot use LoRA with GaLore, APOLLO or BAdam together (GaLore trains full weights: use `finetuning_type: full` or `freeze`)",
        );
    }
    if a.use_galore && a.galore_layerwise && a.gradient_accumulation_steps != 1 {
        return fail(
            "galore_layerwise",
            "Per-layer GaLore does not support gradient accumulation (`gradient_accumulation_steps` must be 1)",
        );
    }
    if a.use_galore && (a.galore_rank == 0 || a.galore_update_interval == 0) {
        return fail(
            "galore_rank",
            "`galore_rank` and `galore_update_interval` must be at least 1",
        );
    }
    if a.use_llama_pro && a.finetuning_type == FinetuningType::Full {
        return fail(
            "use_llama_pro",
            "`use_llama_pro` is only valid for freeze or LoRA training",
        );
    }
    if a.cutoff_len == 0 {
        return fail("cutoff_len", "key `cutoff_len` must be at least 1");
    }
    check_ranges(a)?;
    if a.per_device_train_batch_size == 0 {
        return fail(
            "per_device_train_batch_size",
            "`per_device_train_batch_size` and `gradient_accumulation_steps` must be at least 1",
        );
    }
    if a.gradient_accumulation_steps == 0 {
        return fail(
            "gradient_accumulation_steps",
            "`per_device_train_batch_size` and `gradient_accumulation_steps` must be at least 1",
        );
    }
    Ok(())
}

/// A key of a feature this engine does not have, set away from its default.
fn unsupported(a: &TrainArgs) -> Result<(), ArgError> {
    let (Ok(mine), Ok(defaults)) = (
        serde_json::to_value(a),
        serde_json::to_value(TrainArgs::default()),
    ) else {
        return Ok(());
    };
    for (key, u) in protocol::args::UNREAD_KEYS {
        let protocol::args::KeyUse::Unsupported(instead) = u else {
            continue;
        };
        let v = &mine[*key];
        if v != &defaults[*key] && !v.is_null() {
            return fail(key, format!("`{key}: {v}` is not supported: {instead}"));
        }
    }
    Ok(())
}

/// A number outside the range a key allows: checked where the arguments are read, so a worker
/// never starts with a value it cannot run.
fn check_ranges(a: &TrainArgs) -> Result<(), ArgError> {
    let range = |key: &'static str, v: f64, ok: bool, want: &str| -> Result<(), ArgError> {
        if ok && v.is_finite() {
            Ok(())
        } else {
            fail(key, format!("key `{key}` must be {want}, got {v}"))
        }
    };
    range(
        "learning_rate",
        a.learning_rate,
        a.learning_rate >= 0.0,
        "0 or more",
    )?;
    range(
        "weight_decay",
        a.weight_decay,
        a.weight_decay >= 0.0,
        "0 or more",
    )?;
    range(
        "warmup_ratio",
        a.warmup_ratio,
        (0.0..=1.0).contains(&a.warmup_ratio),
        "between 0 and 1",
    )?;
    range(
        "max_grad_norm",
        a.max_grad_norm,
        a.max_grad_norm >= 0.0,
        "0 (no clipping) or more",
    )?;
    range(
        "adam_beta1",
        a.adam_beta1,
        (0.0..1.0).contains(&a.adam_beta1),
        "in [0, 1)",
    )?;
    range(
        "adam_beta2",
        a.adam_beta2,
        (0.0..1.0).contains(&a.adam_beta2),
        "in [0, 1)",
    )?;
    range(
        "adam_epsilon",
        a.adam_epsilon,
        a.adam_epsilon >= 0.0,
        "0 or more",
    )?;
    if a.max_steps <= 0 {
        range(
            "num_train_epochs",
            a.num_train_epochs,
            a.num_train_epochs > 0.0,
            "above 0 (or set `max_steps`)",
        )?;
    }
    for (key, v) in [
        ("logging_steps", a.logging_steps),
        ("save_steps", a.save_steps),
        ("per_device_eval_batch_size", a.per_device_eval_batch_size),
    ] {
        range(key, v as f64, v >= 1, "at least 1")?;
    }
    if let Some(n) = a.eval_steps {
        range("eval_steps", n as f64, n >= 1, "at least 1")?;
    }
    if a.finetuning_type == FinetuningType::Lora {
        range(
            "lora_rank",
            a.lora_rank as f64,
            a.lora_rank >= 1,
            "at least 1",
        )?;
        range(
            "lora_alpha",
            a.lora_alpha(),
            a.lora_alpha() > 0.0,
            "above 0",
        )?;
        range(
            "lora_dropout",
            a.lora_dropout,
            (0.0..1.0).contains(&a.lora_dropout),
            "in [0, 1)",
        )?;
        if let Some(r) = a.loraplus_lr_ratio {
            range("loraplus_lr_ratio", r, r > 0.0, "above 0")?;
        }
    }
    if matches!(a.stage, Stage::Dpo | Stage::Kto) {
        range("pref_beta", a.pref_beta, a.pref_beta > 0.0, "above 0")?;
        range("pref_ftx", a.pref_ftx, a.pref_ftx >= 0.0, "0 or more")?;
    }
    if a.stage == Stage::Ppo {
        range(
            "ppo_epochs",
            a.ppo_epochs as f64,
            a.ppo_epochs >= 1,
            "at least 1",
        )?;
        range(
            "ppo_buffer_size",
            a.ppo_buffer_size as f64,
            a.ppo_buffer_size >= 1,
            "at least 1",
        )?;
    }
    range(
        "temperature",
        a.temperature,
        a.temperature >= 0.0,
        "0 or more",
    )?;
    range(
        "top_p",
        a.top_p,
        a.top_p > 0.0 && a.top_p <= 1.0,
        "in (0, 1]",
    )?;
    range(
        "repetition_penalty",
        a.repetition_penalty,
        a.repetition_penalty > 0.0,
        "above 0",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_rule_breaks_naming_the_key() {
        let a = TrainArgs {
            stage: Stage::Pt,
            train_on_prompt: true,
            ..TrainArgs::default()
        };
        let e = validate(&a).unwrap_err();
        assert_eq!(e.key, "train_on_prompt");
        assert!(e.message.contains("only valid for stage sft"), "{e}");
        let a = TrainArgs {
            finetuning_type: FinetuningType::Full,
            use_dora: true,
            ..TrainArgs::default()
        };
        assert_eq!(validate(&a).unwrap_err().key, "use_dora");
        let a = TrainArgs {
            val_size: 0.1,
            eval_dataset: Some("x".into()),
            ..TrainArgs::default()
        };
        assert_eq!(validate(&a).unwrap_err().key, "val_size");
        for (a, key) in [
            (
                TrainArgs {
                    lora_rank: 0,
                    ..TrainArgs::default()
                },
                "lora_rank",
            ),
            (
                TrainArgs {
                    lora_dropout: 2.0,
                    ..TrainArgs::default()
                },
                "lora_dropout",
            ),
            (
                TrainArgs {
                    learning_rate: -1.0,
                    ..TrainArgs::default()
                },
                "learning_rate",
            ),
            (
                TrainArgs {
                    warmup_ratio: -1.0,
                    ..TrainArgs::default()
                },
                "warmup_ratio",
            ),
            (
                TrainArgs {
                    learning_rate: f64::NAN,
                    ..TrainArgs::default()
                },
                "learning_rate",
            ),
        ] {
            let e = validate(&a).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(&format!("`{key}`")), "{e}");
        }
        assert!(validate(&TrainArgs::default()).is_ok());
    }
}
