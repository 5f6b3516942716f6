use anyhow::{bail, Result};
use protocol::TrainArgs;

const STAGES: &[&str] = &["pt", "sft", "rm", "ppo", "dpo", "kto"];
const FINETUNING_TYPES: &[&str] = &["lora", "freeze", "full"];
const SCHEDULERS: &[&str] = &[
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
    "polynomial",
    "inverse_sqrt",
];
const PREF_LOSSES: &[&str] = &["sigmoid", "hinge", "ipo", "orpo", "simpo"];
const MIX_STRATEGIES: &[&str] = &["concat"];

fn one_of(key: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        return Ok(());
    }
    let hint = super::closest(value, allowed.iter().copied())
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default();
    bail!(
        "key `{key}` has value `{value}`, expected one of {}{hint}",
        allowed.join(", ")
    )
}

/// LLaMA-Factory's cross-argument rules (its parser's post-init checks) for what this engine runs.
pub fn validate(a: &TrainArgs) -> Result<()> {
    one_of("stage", &a.stage, STAGES)?;
    one_of("finetuning_type", &a.finetuning_type, FINETUNING_TYPES)?;
    one_of("lr_scheduler_type", &a.lr_scheduler_type, SCHEDULERS)?;
    one_of("pref_loss", &a.pref_loss, PREF_LOSSES)?;
    one_of("mix_strategy", &a.mix_strategy, MIX_STRATEGIES)?;
    if a.stage != "sft" {
        for (key, on) in [
            ("predict_with_generate", a.predict_with_generate),
            ("neat_packing", a.neat_packing),
            ("train_on_prompt", a.train_on_prompt),
            ("mask_history", a.mask_history),
        ] {
            if on {
                bail!(
                    "`{key}` is only valid for stage sft (stage is `{}`)",
                    a.stage
                );
            }
        }
    }
    if a.train_on_prompt && a.mask_history {
        bail!("`train_on_prompt` and `mask_history` cannot be used together");
    }
    if a.stage == "sft" && a.do_predict && !a.predict_with_generate {
        bail!("please enable `predict_with_generate` to save model predictions (do_predict with stage sft)");
    }
    if a.predict_with_generate && a.compute_accuracy {
        bail!("`predict_with_generate` cannot be used with `compute_accuracy`");
    }
    if a.val_size > 1e-6 && a.eval_dataset.is_some() {
        bail!("cannot specify `val_size` if `eval_dataset` is not None");
    }
    if a.val_size < 0.0 {
        bail!("key `val_size` must not be negative, got {}", a.val_size);
    }
    if a.adapter_name_or_path.is_some() && a.finetuning_type != "lora" {
        bail!("adapters (`adapter_name_or_path`) are only valid for LoRA training");
    }
    if a.finetuning_type != "lora" {
        for (key, on) in [
            ("use_rslora", a.use_rslora),
            ("use_dora", a.use_dora),
            ("pissa_init", a.pissa_init),
            ("loraplus_lr_ratio", a.loraplus_lr_ratio.is_some()),
        ] {
            if on {
                bail!(
                    "`{key}` is only valid for LoRA training (finetuning_type is `{}`)",
                    a.finetuning_type
                );
            }
        }
    }
    if a.quantization_bit.is_some() {
        bail!("`quantization_bit` (QLoRA) is not supported by this engine yet; remove it to train in full precision");
    }
    if a.deepspeed.is_some() {
        bail!("`deepspeed` is not supported: this engine trains on one device without DeepSpeed; remove the key");
    }
    if a.stage == "ppo" && a.reward_model.is_none() {
        bail!("stage ppo requires `reward_model`");
    }
    if a.dpo_label_smoothing > 1e-6 && a.pref_loss != "sigmoid" {
        bail!("`dpo_label_smoothing` is only valid for pref_loss sigmoid");
    }
    if a.use_llama_pro && a.finetuning_type == "full" {
        bail!("`use_llama_pro` is only valid for freeze or LoRA training");
    }
    if a.cutoff_len == 0 {
        bail!("key `cutoff_len` must be at least 1");
    }
    if a.per_device_train_batch_size == 0 || a.gradient_accumulation_steps == 0 {
        bail!("`per_device_train_batch_size` and `gradient_accumulation_steps` must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_choices_with_hint() {
        let a = TrainArgs {
            stage: "stf".into(),
            ..TrainArgs::default()
        };
        let e = validate(&a).unwrap_err().to_string();
        assert!(
            e.contains("`stage` has value `stf`") && e.contains("did you mean `sft`"),
            "{e}"
        );
        let a = TrainArgs {
            stage: "pt".into(),
            train_on_prompt: true,
            ..TrainArgs::default()
        };
        assert!(validate(&a)
            .unwrap_err()
            .to_string()
            .contains("only valid for stage sft"));
        let a = TrainArgs {
            val_size: 0.1,
            eval_dataset: Some("x".into()),
            ..TrainArgs::default()
        };
        assert!(validate(&a).is_err());
        assert!(validate(&TrainArgs::default()).is_ok());
    }
}
