//! `README.md` in a run's output folder: the model card LLaMA-Factory writes through the
//! Trainer (base model, datasets, hyper-parameters, framework), with what ours adds: the
//! training and evaluation results as a table and the loss plot.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use protocol::args::FinetuningType;
use protocol::TrainArgs;
use serde_json::{Map, Value};

/// What the card reports besides the arguments.
pub(crate) struct CardFacts<'a> {
    pub log_history: &'a [Value],
    /// `all_results.json`'s metrics.
    pub results: &'a Map<String, Value>,
    pub plotted: bool,
}

fn fmt(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() != 0.0 => format!("{x:.4}"),
        _ => v.to_string().trim_matches('"').to_string(),
    }
}

/// The card's Markdown.
pub(crate) fn model_card(args: &TrainArgs, facts: &CardFacts) -> String {
    let base = args.model_name_or_path.clone().unwrap_or_default();
    let name = args
        .output_dir
        .as_deref()
        .and_then(|d| Path::new(d).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let datasets = TrainArgs::split_list(args.dataset.as_deref());
    let lora = args.finetuning_type == FinetuningType::Lora;
    let mut md = String::from("---\n");
    if lora {
        md += "library_name: peft\n";
    }
    let _ = writeln!(md, "base_model: {base}");
    md += "tags:\n- llama-factory\n";
    let _ = writeln!(md, "- {}", args.finetuning_type);
    md += "- generated_from_trainer\n";
    let _ = write!(md, "model-index:\n- name: {name}\n  results: []\n---\n\n");
    let _ = writeln!(md, "# {name}\n");
    let on = match datasets.as_slice() {
        [] => String::new(),
        [one] => format!(" on the {one} dataset"),
        many => format!(" on the {} datasets", many.join(", ")),
    };
    let _ = writeln!(
        md,
        "This model is a fine-tuned version of `{base}`{on} (stage `{}`, {} fine-tuning), trained with llamafactory (Rust) {}.\n",
        args.stage,
        args.finetuning_type,
        env!("CARGO_PKG_VERSION")
    );
    if facts.plotted {
        md += "![Training loss](training_loss.png)\n\n";
    }
    md += "## Training hyper-parameters\n\n";
    let total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps;
    let mut hp: Vec<(&str, String)> = vec![
        ("learning_rate", args.learning_rate.to_string()),
        (
            "train_batch_size",
            args.per_device_train_batch_size.to_string(),
        ),
        (
            "eval_batch_size",
            args.per_device_eval_batch_size.to_string(),
        ),
        ("seed", args.seed.to_string()),
        (
            "gradient_accumulation_steps",
            args.gradient_accumulation_steps.to_string(),
        ),
        ("total_train_batch_size", total_batch.to_string()),
        (
            "optimizer",
            format!(
                "AdamW with betas=({},{}), epsilon={} and weight decay {}",
                args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay
            ),
        ),
        ("lr_scheduler_type", args.lr_scheduler_type.to_string()),
    ];
    if args.warmup_steps > 0 {
        hp.push(("lr_scheduler_warmup_steps", args.warmup_steps.to_string()));
    } else if args.warmup_ratio > 0.0 {
        hp.push(("lr_scheduler_warmup_ratio", args.warmup_ratio.to_string()));
    }
    if args.max_steps > 0 {
        hp.push(("training_steps", args.max_steps.to_string()));
    } else {
        hp.push(("num_epochs", args.num_train_epochs.to_string()));
    }
    hp.push(("cutoff_len", args.cutoff_len.to_string()));
    if lora {
        hp.push((
            "lora",
            format!(
                "rank {}, alpha {}, dropout {}, targets `{}`",
                args.lora_rank,
                args.lora_alpha(),
                args.lora_dropout,
                args.lora_target
            ),
        ));
    }
    for (k, v) in hp {
        let _ = writeln!(md, "- {k}: {v}");
    }
    md += "\n## Training results\n\n";
    let evals: Vec<&Value> = facts
        .log_history
        .iter()
        .filter(|h| h.get("eval_loss").is_some())
        .collect();
    if !evals.is_empty() {
        md += "| Step | Epoch | Training loss | Validation loss |\n|---:|---:|---:|---:|\n";
        for e in evals {
            let step = e["step"].as_u64().unwrap_or(0);
            let train = facts
                .log_history
                .iter()
                .filter(|h| h["step"].as_u64().is_some_and(|s| s <= step))
                .filter_map(|h| h.get("loss"))
                .next_back()
                .map(fmt)
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                md,
                "| {step} | {} | {train} | {} |",
                fmt(&e["epoch"]),
                fmt(&e["eval_loss"])
            );
        }
        md += "\n";
    }
    md += "| Metric | Value |\n|---|---:|\n";
    for (k, v) in facts.results {
        let _ = writeln!(md, "| {k} | {} |", fmt(v));
    }
    let _ = write!(
        md,
        "\n## Framework\n\n- llamafactory (Rust) {} on candle\n",
        env!("CARGO_PKG_VERSION")
    );
    md
}

pub(crate) fn write_model_card(dir: &Path, args: &TrainArgs, facts: &CardFacts) -> Result<()> {
    let path = dir.join("README.md");
    std::fs::write(&path, model_card(args, facts))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_card_names_base_data_settings_and_results() {
        let args = TrainArgs {
            model_name_or_path: Some("Qwen/Qwen3-0.6B".into()),
            dataset: Some("alpaca_en_demo,identity".into()),
            output_dir: Some("saves/qwen3/lora/sft".into()),
            learning_rate: 1e-4,
            ..TrainArgs::default()
        };
        let history = vec![
            json!({"step": 5, "loss": 1.5, "epoch": 0.5}),
            json!({"step": 10, "eval_loss": 1.25, "epoch": 1.0}),
        ];
        let results: Map<String, Value> = [("train_loss".to_string(), json!(1.4321987))]
            .into_iter()
            .collect();
        let md = model_card(
            &args,
            &CardFacts {
                log_history: &history,
                results: &results,
                plotted: true,
            },
        );
        for want in [
            "library_name: peft",
            "base_model: Qwen/Qwen3-0.6B",
            "- llama-factory",
            "# sft",
            "alpaca_en_demo, identity datasets",
            "- learning_rate: 0.0001",
            "| 10 | 1.0 | 1.5000 | 1.2500 |",
            "| train_loss | 1.4322 |",
            "training_loss.png",
        ] {
            assert!(md.contains(want), "`{want}` missing:\n{md}");
        }
    }
}
