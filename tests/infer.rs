//! `llamafactory chat` and `llamafactory export` as a user runs them.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{bin, run, stderr, stdout, workdir, write_config};

#[test]
fn chat_streams_replies_and_understands_clear_and_exit() {
    let dir = workdir();
    write_config(
        dir.path(),
        "template: qwen\ndo_sample: false\nmax_new_tokens: 8\n",
    );
    let mut child = bin()
        .args(["chat", "cfg.yaml"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What color is a banana?\nclear\nAdd 2 and 3.\nexit\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.starts_with("Welcome to the CLI application"), "{s}");
    assert_eq!(s.matches("Assistant: ").count(), 2, "{s}");
    assert!(s.contains("History has been removed."), "{s}");
}

#[test]
fn export_writes_a_merged_model_folder() {
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 32\nmax_samples: 16\nmax_steps: 2\ndo_train: true\n");
    let o = run(&["train", "cfg.yaml"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        &[
            "export",
            "cfg.yaml",
            "adapter_name_or_path=out",
            "export_dir=merged",
            "export_size=1",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("model.safetensors") && stdout(&o).contains("Modelfile"),
        "{}",
        stdout(&o)
    );
    // The export is itself a model: chat with it.
    let o = run(
        &[
            "export",
            "cfg.yaml",
            "model_name_or_path=merged",
            "export_dir=again",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        &["export", "cfg.yaml", "adapter_name_or_path=out"],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("`export_dir` is required"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn predict_with_llamafactory_example_writes_predictions_and_scores() {
    let Some(example) = common::shared_file(
        "compat/llamafactory-examples/extras/nlg_eval/llama3_lora_predict.yaml",
        "predict_with_llamafactory_example_writes_predictions_and_scores",
    ) else {
        return;
    };
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 32\nmax_samples: 16\nmax_steps: 2\ndo_train: true\n");
    assert!(run(&["train", "cfg.yaml"], dir.path()).status.success());
    let data = common::repo().join("data");
    let o = run(
        &[
            "train",
            example.to_str().unwrap(),
            "model_name_or_path=model",
            "adapter_name_or_path=out",
            "template=qwen",
            &format!("dataset_dir={}", data.display()),
            "eval_dataset=demo_sft,demo_chat",
            "max_samples=3",
            "max_new_tokens=6",
            "output_dir=pred",
            "--events",
            "json",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let events: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| e["event"] == "progress"));
    let fin = events.last().unwrap();
    assert_eq!(fin["event"], "finished");
    for k in [
        "predict_bleu-4",
        "predict_rouge-1",
        "predict_rouge-2",
        "predict_rouge-l",
        "predict_samples_per_second",
    ] {
        assert!(fin["metrics"][k].is_number(), "{k} in {fin}");
    }
    let lines = common::jsonl(&dir.path().join("pred/generated_predictions.jsonl"));
    assert_eq!(lines.len(), 6);
    assert!(lines[0]["prompt"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>user"));
    assert!(lines
        .iter()
        .all(|l| l["predict"].is_string() && l["label"].is_string()));
    assert!(
        dir.path().join("pred/predict_results.json").exists()
            && dir.path().join("pred/all_results.json").exists()
    );
    // Evaluation without generation: loss and token accuracy.
    let o = run(
        &[
            "train",
            "cfg.yaml",
            "do_train=false",
            "do_eval=true",
            "eval_dataset=demo_sft",
            "dataset=null",
            "compute_accuracy=true",
            "adapter_name_or_path=out",
            "output_dir=ev",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = common::read_json(&dir.path().join("ev/eval_results.json"));
    assert!(
        r["eval_loss"].as_f64().unwrap() > 0.0 && r["eval_accuracy"].as_f64().unwrap() >= 0.0,
        "{r}"
    );
}
