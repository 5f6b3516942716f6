//! `llamafactory train` end to end on the demo model: LLaMA-Factory's own example YAML, the
//! files it leaves, resuming, aborting, and the errors a user can hit.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use common::{bin, jsonl, read_json, repo, run, stderr, workdir, write_config};

fn losses(log: &Path) -> Vec<(u64, f64)> {
    jsonl(log)
        .iter()
        .filter_map(|l| Some((l["current_steps"].as_u64()?, l["loss"].as_f64()?)))
        .collect()
}

#[test]
fn llamafactory_example_yaml_trains_and_writes_its_files() {
    let Some(example) = common::shared_file(
        "compat/llamafactory-examples/train_lora/qwen3_lora_sft.yaml",
        "llamafactory_example_yaml_trains_and_writes_its_files",
    ) else {
        return;
    };
    let dir = workdir();
    let data = repo().join("data");
    let o = run(
        &[
            "train",
            example.to_str().unwrap(),
            "model_name_or_path=model",
            &format!("dataset_dir={}", data.display()),
            "dataset=demo_sft",
            "output_dir=out",
            "max_samples=96",
            "cutoff_len=64",
            "per_device_train_batch_size=4",
            "gradient_accumulation_steps=2",
            "max_steps=24",
            "logging_steps=4",
            "save_steps=12",
            "learning_rate=2e-3",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_log.jsonl",
        "train_results.json",
        "all_results.json",
        "trainer_state.json",
        "training_loss.png",
        "checkpoint-12/adapter_model.safetensors",
        "checkpoint-12/optimizer.safetensors",
        "checkpoint-12/trainer_state.json",
        "checkpoint-24/adapter_model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(
        cfg["target_modules"].as_array().unwrap().len(),
        7,
        "lora_target: all"
    );
    let tok = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tok["eos_token"], "<|im_end|>", "qwen3_nothink replaces eos");
    let l = losses(&out.join("trainer_log.jsonl"));
    assert_eq!(
        l.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![4, 8, 12, 16, 20, 24]
    );
    assert!(l.last().unwrap().1 < l[0].1 - 0.3, "loss falls: {l:?}");
    let line = &jsonl(&out.join("trainer_log.jsonl"))[0];
    for k in [
        "total_steps",
        "lr",
        "epoch",
        "percentage",
        "elapsed_time",
        "remaining_time",
        "throughput",
    ] {
        assert!(line.get(k).is_some(), "trainer_log.jsonl lacks {k}");
    }
    let results = read_json(&out.join("all_results.json"));
    for k in [
        "epoch",
        "train_loss",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
    ] {
        assert!(results.get(k).is_some(), "all_results.json lacks {k}");
    }
    let png = std::fs::read(out.join("training_loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

/// The error of the `failed` event a `--events json` run printed.
fn failure(o: &std::process::Output) -> String {
    common::stdout(o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "failed")
        .and_then(|e| e["error"].as_str().map(str::to_string))
        .expect("a failed event")
}

fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "cfg.yaml"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn resumed_run_continues_the_same_loss_curve() {
    let dir = workdir();
    let body = "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 64\n\
                per_device_train_batch_size: 4\nmax_steps: 12\nlogging_steps: 1\nsave_steps: 4\nlearning_rate: 1.0e-3\n\
                lora_dropout: 0.1\nlr_scheduler_type: cosine\nwarmup_steps: 2\n";
    write_config(dir.path(), body);
    let o = run(&train_args(&["output_dir=straight"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&train_args(&["output_dir=resumed"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // Lose everything after checkpoint-8, as a crash would.
    let r = dir.path().join("resumed");
    std::fs::remove_dir_all(r.join("checkpoint-12")).unwrap();
    std::fs::remove_file(r.join("adapter_model.safetensors")).unwrap();
    let o = run(&train_args(&["output_dir=resumed"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Resuming training from") && stderr(&o).contains("checkpoint-8"),
        "{}",
        stderr(&o)
    );
    let a = losses(&dir.path().join("straight/trainer_log.jsonl"));
    let b = losses(&r.join("trainer_log.jsonl"));
    assert_eq!(a.len(), 12);
    assert_eq!(
        a, b,
        "the resumed run repeats the uninterrupted curve exactly"
    );
    // A finished output dir without checkpoints is not silently overwritten.
    std::fs::remove_dir_all(r.join("checkpoint-4")).unwrap();
    std::fs::remove_dir_all(r.join("checkpoint-8")).unwrap();
    std::fs::remove_dir_all(r.join("checkpoint-12")).unwrap();
    let o = run(&train_args(&["output_dir=resumed"]), dir.path());
    assert!(
        stderr(&o).contains("already exists and is not empty")
            && stderr(&o).contains("overwrite_output_dir"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn sigterm_finishes_the_step_saves_and_reports_aborted() {
    let dir = workdir();
    write_config(
        dir.path(),
        "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 64\nper_device_train_batch_size: 2\nnum_train_epochs: 50\nlogging_steps: 1\nsave_steps: 100000\ndo_train: true\n",
    );
    let mut child = bin()
        .args(["train", "cfg.yaml", "--events", "json"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut events = Vec::new();
    let mut signalled = false;
    for line in BufReader::new(stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(&line.unwrap()).expect("every stdout line is a JSON event");
        if v["event"] == "step" && v["step"].as_u64() >= Some(3) && !signalled {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            signalled = true;
        }
        events.push(v);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "exit 0 after an abort");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "aborted", "{events:?}");
    let ckpt = last["checkpoint"].as_str().unwrap();
    assert!(
        dir.path()
            .join(ckpt)
            .join("adapter_model.safetensors")
            .exists()
            || Path::new(ckpt).join("adapter_model.safetensors").exists()
    );
    assert_eq!(events[0]["event"], "log");
    assert!(events
        .iter()
        .any(|e| e["event"] == "started" && e["total_steps"].as_u64() > Some(100)));
}

#[test]
fn bad_runs_fail_clearly() {
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 32\nmax_samples: 16\nmax_steps: 6\ndo_train: true\n");
    // Exploding learning rate: stop, save, report the step.
    let o = run(
        &train_args(&["learning_rate=1e30", "output_dir=nan", "--events", "json"]),
        dir.path(),
    );
    assert!(!o.status.success());
    let msg = failure(&o);
    assert!(
        msg.contains("the loss became") && msg.contains("at step"),
        "{msg}"
    );
    // More memory than the machine has: refused before starting, with the numbers.
    let o = run(
        &train_args(&["per_device_train_batch_size=100000000", "output_dir=big"]),
        dir.path(),
    );
    assert!(
        stderr(&o).contains("GiB") && stderr(&o).contains("available"),
        "{}",
        stderr(&o)
    );
    // A model folder without weights; a folder without a tokenizer.
    std::fs::create_dir_all(dir.path().join("broken")).unwrap();
    std::fs::copy(
        dir.path().join("model/config.json"),
        dir.path().join("broken/config.json"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("model/tokenizer.json"),
        dir.path().join("broken/tokenizer.json"),
    )
    .unwrap();
    let o = run(
        &train_args(&["model_name_or_path=broken", "output_dir=b"]),
        dir.path(),
    );
    assert!(
        stderr(&o).contains("incomplete: no model.safetensors"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(dir.path().join("broken/tokenizer.json")).unwrap();
    let o = run(
        &train_args(&["model_name_or_path=broken", "output_dir=b"]),
        dir.path(),
    );
    assert!(stderr(&o).contains("tokenizer not found"), "{}", stderr(&o));
    let o = run(
        &train_args(&["model_name_or_path=/no/such/dir", "output_dir=b"]),
        dir.path(),
    );
    assert!(
        stderr(&o).contains("/no/such/dir does not exist"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn freeze_and_full_pretraining_write_full_weights() {
    let dir = workdir();
    write_config(dir.path(), "stage: pt\ndataset: demo_pt\ncutoff_len: 64\nmax_samples: 40\nmax_steps: 4\nlogging_steps: 2\ndo_train: true\nval_size: 0.1\neval_strategy: steps\neval_steps: 2\n");
    for (ft, out) in [("freeze", "frz"), ("full", "full")] {
        let o = run(
            &train_args(&[
                &format!("finetuning_type={ft}"),
                &format!("output_dir={out}"),
            ]),
            dir.path(),
        );
        assert!(o.status.success(), "{ft}: {}", stderr(&o));
        let d = dir.path().join(out);
        assert!(
            d.join("model.safetensors").exists() && d.join("config.json").exists(),
            "{ft}"
        );
        let results = read_json(&d.join("all_results.json"));
        assert!(
            results["eval_loss"].as_f64().is_some()
                && results["eval_perplexity"].as_f64().is_some(),
            "{results}"
        );
        assert!(jsonl(&d.join("trainer_log.jsonl"))
            .iter()
            .any(|l| l.get("eval_loss").is_some()));
    }
}

/// LLaMA-Factory's rule: LoRA with `resize_vocab` trains the embedding whole, so the template's
/// new tokens learn their rows; the adapter carries them and an export merges them.
#[test]
fn resize_vocab_trains_the_new_rows_and_exports_them() {
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: llama3\nresize_vocab: true\ncutoff_len: 48\nmax_samples: 16\nmax_steps: 2\ndo_train: true\nlora_rank: 4\n");
    let o = run(&train_args(&["output_dir=out"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Vocab has been resized, add embed_tokens"),
        "{}",
        stderr(&o)
    );
    let base_vocab = read_json(&dir.path().join("model/config.json"))["vocab_size"]
        .as_u64()
        .unwrap() as usize;
    let adapter = candle_core::safetensors::load(
        dir.path().join("out/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let embed = &adapter["base_model.model.model.embed_tokens.weight"];
    let rows = embed.dim(0).unwrap();
    assert!(rows > base_vocab, "{rows} rows, base {base_vocab}");
    assert_eq!(
        read_json(&dir.path().join("out/adapter_config.json"))["modules_to_save"][0],
        "embed_tokens"
    );
    let o = run(
        &[
            "export",
            "cfg.yaml",
            "adapter_name_or_path=out",
            "export_dir=merged",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        read_json(&dir.path().join("merged/config.json"))["vocab_size"],
        rows
    );
}

#[test]
fn continues_training_an_existing_adapter() {
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 32\nmax_steps: 3\ndo_train: true\nlora_rank: 4\nlora_target: q_proj,v_proj\n");
    let o = run(&train_args(&["output_dir=first"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // The adapter's own rank and targets are kept, not the config's defaults.
    let o = run(
        &train_args(&[
            "output_dir=second",
            "adapter_name_or_path=first",
            "lora_rank=8",
            "lora_target=all",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = read_json(&dir.path().join("second/adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let first = std::fs::read(dir.path().join("first/adapter_model.safetensors")).unwrap();
    let second = std::fs::read(dir.path().join("second/adapter_model.safetensors")).unwrap();
    assert_ne!(first, second, "training went on");
}

#[test]
fn full_disk_while_saving_keeps_the_previous_checkpoint() {
    let dir = workdir();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // A 1.5 MB filesystem: one checkpoint (~0.95 MB) fits, a second copy beside it does not.
    let mounted = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1536k",
            "tmpfs",
            out.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "skipped: cannot mount a tmpfs here (not root?); checkpoint::tests covers the logic"
        );
        return;
    }
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 32\nmax_samples: 32\nmax_steps: 6\nsave_steps: 2\ndo_train: true\noverwrite_output_dir: true\n");
    let o = run(&train_args(&[]), dir.path());
    let ckpt_ok = out.join("checkpoint-2/adapter_model.safetensors").exists();
    let _ = std::process::Command::new("umount").arg(&out).status();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is the disk full?")
            && stderr(&o).contains("earlier checkpoints are intact"),
        "{}",
        stderr(&o)
    );
    assert!(ckpt_ok, "checkpoint-2 survived");
}

#[test]
fn dpo_separates_chosen_from_rejected() {
    let dir = workdir();
    write_config(
        dir.path(),
        "stage: dpo\ndo_train: true\ndataset: demo_dpo\ntemplate: qwen\ncutoff_len: 96\nper_device_train_batch_size: 4\n\
         max_steps: 30\nlogging_steps: 5\nlearning_rate: 5.0e-3\npref_beta: 0.1\nval_size: 0.1\n",
    );
    let o = run(&train_args(&["output_dir=dpo"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // Held-out pairs are evaluated with TRL's metric names.
    let eval = read_json(&dir.path().join("dpo/eval_results.json"));
    assert!(eval["eval_loss"].as_f64().unwrap().is_finite(), "{eval}");
    assert!(eval["eval_rewards/accuracies"].as_f64().is_some(), "{eval}");
    let log = jsonl(&dir.path().join("dpo/trainer_log.jsonl"));
    for k in [
        "accuracy",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(log[0].get(k).is_some(), "trainer_log.jsonl lacks {k}");
    }
    let margin = |l: &serde_json::Value| l["rewards/margins"].as_f64().unwrap();
    let acc: f64 = log[log.len() - 2..]
        .iter()
        .map(|l| l["accuracy"].as_f64().unwrap())
        .sum::<f64>()
        / 2.0;
    assert!(acc > 0.7, "rewards/accuracies well above chance: {acc}");
    assert!(
        margin(log.last().unwrap()) > margin(&log[0]) + 0.2,
        "margins grow: {log:?}"
    );
    // Reference-free variants need no reference pass and run too.
    for pl in ["orpo", "simpo"] {
        let o = run(
            &train_args(&[
                &format!("pref_loss={pl}"),
                &format!("output_dir={pl}"),
                "max_steps=4",
            ]),
            dir.path(),
        );
        assert!(o.status.success(), "{pl}: {}", stderr(&o));
    }
}

#[test]
fn reward_model_ranks_held_out_pairs_better_than_chance() {
    let dir = workdir();
    write_config(
        dir.path(),
        "stage: rm\ndo_train: true\ndataset: demo_dpo\ntemplate: qwen\ncutoff_len: 96\nmax_samples: 100\n\
         val_size: 0.2\nper_device_train_batch_size: 4\nper_device_eval_batch_size: 8\nmax_steps: 24\n\
         logging_steps: 4\nlearning_rate: 2.0e-3\n",
    );
    let o = run(&train_args(&["output_dir=rm"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("rm");
    for f in [
        "value_head.safetensors",
        "adapter_model.safetensors",
        "eval_results.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let log = jsonl(&out.join("trainer_log.jsonl"));
    assert!(log[0].get("accuracy").is_some(), "{:?}", log[0]);
    let eval = read_json(&out.join("eval_results.json"));
    let acc = eval["eval_accuracy"].as_f64().unwrap();
    assert!(acc > 0.7, "held-out ranking accuracy {acc}");
    // Scoring the held-out pairs with the saved adapter and value head.
    let o = run(
        &train_args(&[
            "do_train=false",
            "do_predict=true",
            "eval_dataset=demo_dpo",
            "val_size=0",
            "max_samples=20",
            "adapter_name_or_path=rm",
            "output_dir=rm_predict",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let preds = jsonl(&dir.path().join("rm_predict/generated_predictions.jsonl"));
    assert_eq!(preds.len(), 20);
    let right = preds
        .iter()
        .filter(|p| p["chosen"].as_f64().unwrap() > p["rejected"].as_f64().unwrap())
        .count();
    assert!(right > 12, "{right} of 20 pairs ranked right");
}

#[test]
fn kto_pushes_desirable_up_and_undesirable_down() {
    let dir = workdir();
    write_config(
        dir.path(),
        "stage: kto\ndo_train: true\ndataset: demo_kto\ntemplate: qwen\ncutoff_len: 96\nper_device_train_batch_size: 4\n\
         max_steps: 30\nlogging_steps: 10\nlearning_rate: 5.0e-3\npref_beta: 0.1\nval_size: 0.2\n\
         per_device_eval_batch_size: 8\n",
    );
    let o = run(&train_args(&["output_dir=kto"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    // Held-out examples: desirable ones end up with a higher implicit reward than undesirable.
    let eval = read_json(&dir.path().join("kto/eval_results.json"));
    for k in [
        "eval_loss",
        "eval_kl",
        "eval_rewards/chosen",
        "eval_rewards/rejected",
    ] {
        assert!(eval[k].as_f64().is_some_and(f64::is_finite), "{k}: {eval}");
    }
    assert!(
        eval["eval_rewards/chosen"].as_f64() > eval["eval_rewards/rejected"].as_f64(),
        "{eval}"
    );
    let log = jsonl(&dir.path().join("kto/trainer_log.jsonl"));
    let last = log.last().unwrap();
    for k in ["rewards/chosen", "rewards/rejected", "kl"] {
        assert!(last.get(k).is_some(), "trainer_log.jsonl lacks {k}: {last}");
    }
    let gap = |l: &serde_json::Value| {
        l["rewards/chosen"].as_f64().unwrap() - l["rewards/rejected"].as_f64().unwrap()
    };
    assert!(
        gap(last) > gap(&log[0]) + 0.3,
        "desirable and undesirable rewards separate: {log:?}"
    );
    assert!(
        last["loss"].as_f64() < log[0]["loss"].as_f64(),
        "loss falls"
    );
}

/// A config file of its own, for runs that chain models (SFT → RM → PPO) in one folder.
fn write_named(dir: &Path, name: &str, body: &str) -> String {
    let text = format!(
        "dataset_dir: {}\ntemplate: qwen\ndo_train: true\n{body}",
        repo().join("data").display()
    );
    std::fs::write(dir.join(name), text).unwrap();
    name.to_string()
}

#[test]
fn ppo_raises_the_reward_of_a_trained_reward_model() {
    // RL needs a policy with some prior: an SFT'd demo model, a LoRA reward model on it, then
    // PPO with a LoRA policy whose reference is the SFT'd weights.
    let dir = workdir();
    let d = dir.path();
    let sft = write_named(d, "sft.yaml", "model_name_or_path: model\noutput_dir: sft\nfinetuning_type: full\ndataset: demo_sft\n\
         cutoff_len: 64\nper_device_train_batch_size: 4\nmax_steps: 80\nlogging_steps: 40\nlearning_rate: 2.0e-3\n");
    let o = run(&["train", &sft], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let rm = write_named(d, "rm.yaml", "model_name_or_path: sft\noutput_dir: rm\nstage: rm\ndataset: demo_dpo\ncutoff_len: 96\n\
         max_samples: 100\nper_device_train_batch_size: 4\nmax_steps: 24\nlogging_steps: 24\nlearning_rate: 2.0e-3\n");
    let o = run(&["train", &rm], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let ppo = write_named(d, "ppo.yaml", "model_name_or_path: sft\noutput_dir: ppo\nstage: ppo\nreward_model: rm\ndataset: demo_sft\n\
         cutoff_len: 64\nper_device_train_batch_size: 4\nmax_steps: 40\nlogging_steps: 5\nlearning_rate: 2.0e-3\n\
         max_new_tokens: 12\ntop_k: 0\ntop_p: 0.9\n");
    let o = run(&["train", &ppo], d);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "adapter_model.safetensors",
        "value_head.safetensors",
        "trainer_state.json",
    ] {
        assert!(d.join("ppo").join(f).is_file(), "{f} missing");
    }
    let log = jsonl(&d.join("ppo/trainer_log.jsonl"));
    assert_eq!(log.len(), 8);
    for k in ["loss", "reward", "kl", "kl_coef", "lr", "response_length"] {
        assert!(
            log[0].get(k).is_some(),
            "trainer_log.jsonl lacks {k}: {}",
            log[0]
        );
    }
    let reward = |l: &serde_json::Value| l["reward"].as_f64().unwrap();
    let late = log[5..].iter().map(reward).sum::<f64>() / 3.0;
    // Measured: the first window averages -3.5, the last three -1.9; with the learning rate at
    // 1e-9 every window stays near -3.6.
    assert!(
        late > reward(&log[0]) + 0.5,
        "reward rises: {:?}",
        log.iter().map(reward).collect::<Vec<_>>()
    );
    let kl = log.last().unwrap()["kl"].as_f64().unwrap();
    assert!(
        kl > 0.0,
        "the policy moved away from its reference: kl {kl}"
    );

    // A full reward model (its own weights and value head) works too.
    let rm_full = write_named(d, "rm_full.yaml", "model_name_or_path: sft\noutput_dir: rm_full\nstage: rm\nfinetuning_type: full\n\
         dataset: demo_dpo\ncutoff_len: 96\nmax_samples: 16\nper_device_train_batch_size: 4\nmax_steps: 2\nlearning_rate: 1.0e-4\n");
    let o = run(&["train", &rm_full], d);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        &[
            "train",
            &ppo,
            "reward_model=rm_full",
            "reward_model_type=full",
            "max_steps=2",
            "output_dir=ppo_full",
        ],
        d,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("ppo_full/value_head.safetensors").is_file());

    // An exploding PPO step: its first update lands, the next minibatch's loss is not finite.
    // Those weights are not the last good state, so nothing is saved as such.
    let o = run(
        &[
            "train",
            &ppo,
            "learning_rate=1e30",
            "max_steps=2",
            "output_dir=ppo_nan",
            "--events",
            "json",
        ],
        d,
    );
    assert!(!o.status.success());
    let msg = failure(&o);
    assert!(
        msg.contains("the loss became") && msg.contains("already changed the weights"),
        "{msg}"
    );
    assert!(
        !d.join("ppo_nan/checkpoint-0").exists(),
        "updated weights saved as the last good state"
    );

    // A reward model without a value head is refused up front, naming the folder.
    let o = run(
        &["train", &ppo, "reward_model=sft", "output_dir=ppo_bad"],
        d,
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("value_head.safetensors") && err.contains("sft"),
        "{err}"
    );
}

/// `transformers.get_scheduler` at learning rate 1e-3, warmup 1 of 6 steps: the rate each step
/// used, which is what transformers 5 logs (`scripts/schedule_reference.py`; LLaMA-Factory's
/// extra arguments for `cosine_with_min_lr` and `warmup_stable_decay`).
const SCHEDULES: &[(&str, [f64; 6])] = &[
    ("linear", [0.0, 0.001, 0.0008, 0.0006, 0.0004, 0.0002]),
    (
        "cosine",
        [
            0.0,
            0.001,
            0.0009045084971874737,
            0.0006545084971874737,
            0.00034549150281252633,
            9.549150281252633e-05,
        ],
    ),
    (
        "cosine_with_restarts",
        [
            0.0,
            0.001,
            0.0009045084971874737,
            0.0006545084971874737,
            0.00034549150281252633,
            9.549150281252633e-05,
        ],
    ),
    (
        "polynomial",
        [
            0.0,
            0.001,
            0.0008000199999999999,
            0.0006000399999999999,
            0.00040006,
            0.00020007999999999994,
        ],
    ),
    ("constant", [0.001; 6]),
    (
        "constant_with_warmup",
        [0.0, 0.001, 0.001, 0.001, 0.001, 0.001],
    ),
    (
        "inverse_sqrt",
        [
            0.0,
            0.001,
            0.0007071067811865475,
            0.0005773502691896259,
            0.0005,
            0.00044721359549995795,
        ],
    ),
    (
        "cosine_with_min_lr",
        [
            0.0,
            0.001,
            0.0009140576474687263,
            0.0006890576474687264,
            0.0004109423525312738,
            0.00018594235253127373,
        ],
    ),
    (
        "warmup_stable_decay",
        [
            0.0,
            0.001,
            0.001,
            0.0008535533905932737,
            0.0005,
            0.00014644660940672628,
        ],
    ),
];

#[test]
fn every_scheduler_the_ui_offers_trains_with_transformers_learning_rates() {
    use protocol::args::{Choice, SchedulerType};
    let offered = SchedulerType::names();
    let covered: Vec<&str> = SCHEDULES.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        offered, covered,
        "every scheduler needs its reference values"
    );
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 24\nmax_samples: 12\nper_device_train_batch_size: 2\n\
         max_steps: 6\nwarmup_steps: 1\nlogging_steps: 1\nlearning_rate: 1.0e-3\nsave_strategy: 'no'\ndo_train: true\n");
    for (name, want) in SCHEDULES {
        let out = format!("output_dir=sched_{name}");
        let kind = format!("lr_scheduler_type={name}");
        let o = run(&train_args(&[&out, &kind]), dir.path());
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let got: Vec<f64> = jsonl(&dir.path().join(format!("sched_{name}/trainer_log.jsonl")))
            .iter()
            .map(|l| l["lr"].as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), 6, "{name}: {got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-12 + 1e-9 * w.abs(),
                "{name}: {got:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn epoch_strategy_saves_and_evaluates_each_epoch_and_the_end() {
    // 12 examples, batch 2, accumulation 2: 3 steps an epoch, 2 epochs. save_steps 4 does not
    // divide 6, which used to drop the final checkpoint.
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 24\nmax_samples: 12\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 2\nnum_train_epochs: 2\nlogging_steps: 1\nsave_strategy: epoch\nsave_steps: 4\n\
         eval_strategy: epoch\neval_dataset: demo_sft\nper_device_eval_batch_size: 4\ndo_train: true\n");
    let o = run(&train_args(&["output_dir=out"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let mut saved: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    saved.sort();
    assert_eq!(saved, ["checkpoint-3", "checkpoint-6"]);
    // The files of LLaMA-Factory 0.9.5 on transformers 5: the chat template beside the
    // tokenizer, a model card, no special_tokens_map.json.
    for dir in [out.clone(), out.join("checkpoint-6")] {
        assert!(
            dir.join("chat_template.jinja").is_file(),
            "{}",
            dir.display()
        );
        assert!(
            !dir.join("special_tokens_map.json").exists(),
            "{}",
            dir.display()
        );
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("base_model:") && card.contains("| 6 |") && card.contains("train_loss"),
        "{card}"
    );
    let evals: Vec<u64> = jsonl(&out.join("trainer_log.jsonl"))
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .map(|l| l["current_steps"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [3, 6]);
    // With `steps`, the last step is saved even when save_steps does not divide it.
    let o = run(
        &train_args(&[
            "output_dir=steps",
            "save_strategy=steps",
            "eval_strategy=no",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for n in [4, 6] {
        assert!(dir.path().join(format!("steps/checkpoint-{n}")).is_dir());
    }
}

/// The last logged training loss of a run.
fn final_loss(out: &Path) -> f64 {
    losses(&out.join("trainer_log.jsonl")).last().unwrap().1
}

#[test]
fn qlora_on_a_quantized_base_trains_close_to_full_precision_lora() {
    let dir = workdir();
    write_config(dir.path(), "dataset: demo_sft\ntemplate: qwen\ncutoff_len: 64\nmax_samples: 64\nper_device_train_batch_size: 4\n\
         max_steps: 30\nlogging_steps: 5\nlearning_rate: 2.0e-3\nsave_strategy: 'no'\ndo_train: true\n");
    let train = |name: &str, extra: &[&str]| -> f64 {
        let out = format!("output_dir={name}");
        let mut args = vec![out.as_str()];
        args.extend_from_slice(extra);
        let o = run(&train_args(&args), dir.path());
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        final_loss(&dir.path().join(name))
    };
    let f32_loss = train("f32", &[]);
    let nf4 = run(
        &train_args(&["output_dir=nf4", "quantization_bit=4"]),
        dir.path(),
    );
    assert!(nf4.status.success(), "{}", stderr(&nf4));
    assert!(
        stderr(&nf4).contains("the base's 28 linear weights are quantized: NF4"),
        "{}",
        stderr(&nf4)
    );
    let nf4_loss = final_loss(&dir.path().join("nf4"));
    let q8_loss = train("q8", &["quantization_bit=8"]);
    let first = losses(&dir.path().join("nf4/trainer_log.jsonl"))[0].1;
    assert!(
        nf4_loss < first - 0.3,
        "4-bit LoRA learns: {first} → {nf4_loss}"
    );
    let rel = |x: f64| (x - f32_loss).abs() / f32_loss;
    assert!(rel(nf4_loss) < 0.05, "4-bit {nf4_loss} vs f32 {f32_loss}");
    assert!(rel(q8_loss) < 0.02, "8-bit {q8_loss} vs f32 {f32_loss}");
    // The adapter is a plain PEFT adapter: it merges into the full-precision base.
    let o = run(
        &[
            "export",
            "cfg.yaml",
            "adapter_name_or_path=nf4",
            "export_dir=merged",
            "quantization_bit=4",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("merged into the full-precision base"),
        "{}",
        stderr(&o)
    );
    assert!(dir.path().join("merged/model.safetensors").is_file());
    // A GGUF file (here our own Q8_0 export) is a base as it is: LoRA trains on its weights.
    let o = run(
        &[
            "export",
            "cfg.yaml",
            "export_dir=demo_gguf",
            "export_format=gguf",
            "export_gguf_type=q8_0",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let gguf_loss = train("on_gguf", &["model_name_or_path=demo_gguf"]);
    assert!(
        rel(gguf_loss) < 0.05,
        "on the GGUF base {gguf_loss} vs f32 {f32_loss}"
    );
    // Widths bitsandbytes does not have are refused, naming the method that has them.
    let o = run(
        &train_args(&["output_dir=q3", "quantization_bit=3"]),
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("quantization_method: ggml"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &train_args(&[
            "output_dir=full",
            "quantization_bit=4",
            "finetuning_type=full",
        ]),
        dir.path(),
    );
    assert!(
        stderr(&o).contains("only compatible with the LoRA method"),
        "{}",
        stderr(&o)
    );
}

/// The tensor names of the weights file `before`, and those whose values differ in `after`
/// (both sorted).
fn changed_tensors(before: &Path, after: &Path) -> (Vec<String>, Vec<String>) {
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let (before, after) = (load(before), load(after));
    let mut all: Vec<String> = before.keys().cloned().collect();
    all.sort();
    let changed = all
        .iter()
        .filter(|k| {
            let a = after[*k].to_dtype(candle_core::DType::F32).unwrap();
            let b = before[*k].to_dtype(candle_core::DType::F32).unwrap();
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap() > 0.0
        })
        .cloned()
        .collect();
    (all, changed)
}

/// The seed's optimization methods from a LLaMA-Factory YAML: PiSSA with `pissa_convert` (with
/// NEFTune and S²-Attn) leaves LLaMA-Factory's folders and a rank-2r adapter for the original base; LLaMA
/// Pro expands the demo model and trains the inserted blocks only.
#[test]
fn pissa_neftune_and_llama_pro_run_from_yaml() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 32\nper_device_train_batch_size: 4\nmax_steps: 6\nlogging_steps: 1\nlearning_rate: 1.0e-3\nlora_rank: 4\n");
    let o = run(
        &train_args(&[
            "pissa_init=true",
            "pissa_convert=true",
            "neftune_noise_alpha=5",
            "shift_attn=true",
            "output_dir=pissa",
        ]),
        dir.path(),
    );
    assert!(
        stderr(&o).contains("Using shift short attention with group_size_ratio=1/4."),
        "{}",
        stderr(&o)
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("pissa");
    for f in [
        "pissa_init/adapter_model.safetensors",
        "pissa_backup/adapter_model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let cfg = read_json(&out.join("adapter_config.json"));
    assert_eq!(cfg["r"], 8, "rank doubled by the conversion");
    assert_eq!(cfg["init_lora_weights"], true);
    assert_eq!(
        read_json(&out.join("pissa_backup/adapter_config.json"))["init_lora_weights"],
        "pissa_niter_16"
    );
    assert!(losses(&out.join("trainer_log.jsonl"))
        .iter()
        .all(|(_, l)| l.is_finite()));

    let o = run(
        &[
            "expand-model",
            "--model-name-or-path",
            "model",
            "--output-dir",
            "expanded",
            "--num-expand",
            "1",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(common::stdout(&o).contains("use_llama_pro: true"));
    let layers = read_json(&dir.path().join("expanded/config.json"))["num_hidden_layers"]
        .as_u64()
        .unwrap() as usize;
    let o = run(
        &train_args(&[
            "model_name_or_path=expanded",
            "finetuning_type=freeze",
            "use_llama_pro=true",
            "freeze_trainable_layers=1",
            "output_dir=pro",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, changed) = changed_tensors(
        &dir.path().join("expanded/model.safetensors"),
        &dir.path().join("pro/model.safetensors"),
    );
    let last = format!("model.layers.{}.", layers - 1);
    assert!(!changed.is_empty());
    assert!(
        changed.iter().all(|k| k.starts_with(&last)),
        "only the inserted block trains: {changed:?}"
    );
}

/// GaLore from a LLaMA-Factory YAML: full fine-tuning whose projected weights keep their Adam
/// state in the subspace (the log says how much smaller), with a falling loss.
#[test]
fn galore_trains_full_weights_with_low_rank_state() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 32\nper_device_train_batch_size: 4\nmax_steps: 8\nlogging_steps: 1\nlearning_rate: 1.0e-3\nfinetuning_type: full\nuse_galore: true\ngalore_rank: 4\ngalore_update_interval: 4\ngalore_scale: 0.25\n");
    let o = run(&train_args(&["output_dir=galore"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    let line = log
        .lines()
        .find(|l| l.contains("GaLore (rank 4, every 4 steps"))
        .unwrap_or_else(|| panic!("{log}"));
    let mb: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    let (ours, adamw) = (mb[mb.len() - 2], mb[mb.len() - 1]);
    assert!(ours < adamw, "{line}");
    let l = losses(&dir.path().join("galore/trainer_log.jsonl"));
    assert_eq!(l.len(), 8);
    assert!(l.iter().all(|(_, x)| x.is_finite()));
    assert!(l[7].1 < l[0].1, "{l:?}");
    // APOLLO, same family: random projections, channel-wise gradient scaling.
    let o = run(
        &train_args(&[
            "output_dir=apollo",
            "use_galore=false",
            "use_apollo=true",
            "apollo_rank=4",
            "max_steps=4",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("APOLLO (rank 4, random projection, channel scaling"));
    let l = losses(&dir.path().join("apollo/trainer_log.jsonl"));
    assert!(
        l.len() == 4 && l.iter().all(|(_, x)| x.is_finite()),
        "{l:?}"
    );
    let o = run(
        &train_args(&["output_dir=lora", "finetuning_type=lora"]),
        dir.path(),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("Cannot use LoRA with GaLore"),
        "{}",
        stderr(&o)
    );
}

/// BAdam from a LLaMA-Factory YAML: one decoder layer trains at a time; embeddings, final norm
/// and head never change; a resumed run continues the same block schedule and loss curve.
#[test]
fn badam_trains_one_layer_block_at_a_time() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 32\nper_device_train_batch_size: 4\nmax_steps: 3\nlogging_steps: 1\nlearning_rate: 1.0e-3\nfinetuning_type: full\nuse_badam: true\nbadam_switch_interval: 50\nbadam_switch_mode: descending\n");
    let o = run(&train_args(&["output_dir=badam"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("BAdam (layer mode)"), "{}", stderr(&o));
    let layers = read_json(&dir.path().join("model/config.json"))["num_hidden_layers"]
        .as_u64()
        .unwrap();
    let (all, changed) = changed_tensors(
        &dir.path().join("model/model.safetensors"),
        &dir.path().join("badam/model.safetensors"),
    );
    let last = format!("model.layers.{}.", layers - 1);
    let in_last: Vec<String> = all.into_iter().filter(|k| k.starts_with(&last)).collect();
    assert_eq!(
        changed, in_last,
        "exactly the last layer moves (descending: it trains first)"
    );
    // Blocks switching every 2 steps over 6 steps, checkpoints every 2: resumed after step 4
    // (its checkpoint holds the blocks trained so far), the curve is the uninterrupted one.
    let body = [
        "max_steps=6",
        "badam_switch_interval=2",
        "save_steps=2",
        "badam_switch_mode=ascending",
    ];
    let with = |out: &'static str| -> Vec<&'static str> {
        let mut v = vec![out];
        v.extend_from_slice(&body);
        v
    };
    let o = run(&train_args(&with("output_dir=straight")), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&train_args(&with("output_dir=resumed")), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let r = dir.path().join("resumed");
    std::fs::remove_dir_all(r.join("checkpoint-6")).unwrap();
    std::fs::remove_file(r.join("model.safetensors")).unwrap();
    let o = run(&train_args(&with("output_dir=resumed")), dir.path());
    assert!(
        o.status.success() && stderr(&o).contains("checkpoint-4"),
        "{}",
        stderr(&o)
    );
    let (a, b) = (
        losses(&dir.path().join("straight/trainer_log.jsonl")),
        losses(&r.join("trainer_log.jsonl")),
    );
    assert_eq!(a.len(), 6);
    assert_eq!(
        a, b,
        "the resumed BAdam run repeats the uninterrupted curve"
    );
}

/// LoftQ as LLaMA-Factory's loftq_init.py is used: `loftq-init` writes a base and an adapter,
/// and QLoRA training continues that adapter on the 4-bit base.
#[test]
fn loftq_init_starts_a_qlora_run() {
    let dir = workdir();
    let o = run(
        &[
            "loftq-init",
            "--model-name-or-path",
            "model",
            "--output-dir",
            "loftq",
            "--lora-rank",
            "4",
            "--loftq-iter",
            "2",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(common::stdout(&o).contains("quantization_bit: 4"));
    let cfg = read_json(&dir.path().join("loftq/loftq_init/adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 16\nper_device_train_batch_size: 4\nmax_steps: 3\nlogging_steps: 1\nadapter_name_or_path: loftq/loftq_init\nquantization_bit: 4\n");
    let o = run(
        &train_args(&["output_dir=qlora", "model_name_or_path=loftq"]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let l = losses(&dir.path().join("qlora/trainer_log.jsonl"));
    assert!(
        l.len() == 3 && l.iter().all(|(_, x)| x.is_finite()),
        "{l:?}"
    );
}

/// `report_to: tensorboard` writes a TensorBoard event file under `logging_dir`: TFRecords
/// (length, CRC, data, CRC) holding the version record, the arguments as text and one summary
/// per logged line and evaluation, under transformers' tags. (Read back with TensorBoard's own
/// `EventAccumulator` in a dev check: train/loss, train/grad_norm, train/learning_rate,
/// train/epoch, eval/loss and args/text_summary.)
#[test]
fn report_to_tensorboard_writes_event_files() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 32\nper_device_train_batch_size: 4\nmax_steps: 4\nlogging_steps: 2\nval_size: 0.25\neval_strategy: steps\neval_steps: 4\n");
    let o = run(
        &train_args(&[
            "output_dir=tb",
            "report_to=tensorboard",
            "logging_dir=events",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let files: Vec<_> = std::fs::read_dir(dir.path().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let bytes = std::fs::read(&files[0]).unwrap();
    let mut at = 0;
    let mut records = Vec::new();
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        records.push(&bytes[at + 12..at + 12 + len]);
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "records fill the file exactly");
    // Version, arguments, two training lines, one evaluation, and the end of training's
    // figures (transformers logs them through `on_log` too).
    assert_eq!(records.len(), 6);
    assert!(records[5]
        .windows("train/train_runtime".len())
        .any(|w| w == b"train/train_runtime"));
    let has = |r: &[u8], s: &str| r.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has(records[0], "brain.Event:2"));
    assert!(has(records[1], "args/text_summary") && has(records[1], "demo_sft"));
    assert!(has(records[2], "train/loss") && has(records[2], "train/learning_rate"));
    assert!(records.iter().any(|r| has(r, "eval/loss")));
    // A tracker name that does not exist is refused by name.
    let o = run(
        &train_args(&["output_dir=tb2", "report_to=tensorbord"]),
        dir.path(),
    );
    assert!(
        !o.status.success() && stderr(&o).contains("`report_to: tensorbord`"),
        "{}",
        stderr(&o)
    );
}

/// Mixture-of-Depths from a LLaMA-Factory YAML: `convert` routes the demo model's odd layers and
/// trains them with their routers (full fine-tuning); the output is saved as the package saves a
/// routed model, and `load` trains on from it.
#[test]
fn mixture_of_depths_converts_trains_and_loads() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 16\nper_device_train_batch_size: 4\nmax_steps: 3\nlogging_steps: 1\nlearning_rate: 1.0e-3\nfinetuning_type: full\n");
    let o = run(
        &train_args(&["mixture_of_depths=convert", "output_dir=mod"]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("mod");
    assert_eq!(
        read_json(&out.join("config.json"))["architectures"][0],
        "LlamaMoDForCausalLM"
    );
    let saved =
        candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    for name in [
        "model.layers.1.router.weight_predictor.weight",
        "model.layers.1.block.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ] {
        assert!(saved.contains_key(name), "{name} not in {:?}", saved.keys());
    }
    assert!(!saved.contains_key("model.layers.1.mlp.down_proj.weight"));
    assert!(losses(&out.join("trainer_log.jsonl"))
        .iter()
        .all(|(_, l)| l.is_finite()));
    // A dense model is not `load`ed; a routed one is not converted again.
    let o = run(
        &train_args(&["mixture_of_depths=load", "output_dir=x", "--events", "json"]),
        dir.path(),
    );
    assert!(
        failure(&o).contains("not a Mixture-of-Depths checkpoint"),
        "{}",
        failure(&o)
    );
    let o = run(
        &train_args(&[
            "model_name_or_path=mod",
            "mixture_of_depths=convert",
            "output_dir=x",
            "--events",
            "json",
        ]),
        dir.path(),
    );
    assert!(failure(&o).contains("already routed"), "{}", failure(&o));
    let o = run(
        &train_args(&[
            "model_name_or_path=mod",
            "mixture_of_depths=load",
            "output_dir=again",
        ]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, changed) = changed_tensors(
        &out.join("model.safetensors"),
        &dir.path().join("again/model.safetensors"),
    );
    assert!(
        changed.contains(&"model.layers.1.router.weight_predictor.weight".to_string()),
        "{changed:?}"
    );
}

/// BAdam's ratio mode from a YAML: the embedding and head stay, and within three steps (one
/// mask: masks move every 100) each other tensor changes in at most its ratio of entries; a run
/// resumed from a checkpoint continues the same curve (the sparse Adam state is saved).
#[test]
fn badam_ratio_mode_updates_a_share_of_each_tensor() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 32\nper_device_train_batch_size: 4\nmax_steps: 4\nlogging_steps: 1\nsave_steps: 2\nlearning_rate: 1.0e-3\nfinetuning_type: full\nuse_badam: true\nbadam_mode: ratio\nbadam_update_ratio: 0.1\n");
    let o = run(
        &train_args(&["output_dir=ratio", "max_steps=3"]),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("ratio-based update, update ratio is 0.1"),
        "{}",
        stderr(&o)
    );
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let (before, after) = (
        load(&dir.path().join("model/model.safetensors")),
        load(&dir.path().join("ratio/model.safetensors")),
    );
    let mut moved = 0;
    for (name, b) in &before {
        let flat = |t: &candle_core::Tensor| -> Vec<f32> {
            t.to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (x, y) = (flat(b), flat(&after[name]));
        let changed = x.iter().zip(&y).filter(|(p, q)| p != q).count();
        if name.contains("embed") || name.contains("lm_head") {
            assert_eq!(changed, 0, "{name} trains");
        }
        let allowed = (x.len() as f64 * 0.1) as usize;
        assert!(
            changed <= allowed,
            "{name}: {changed} of {} entries changed",
            x.len()
        );
        moved += usize::from(changed > 0);
    }
    assert!(moved > 10, "only {moved} tensors moved");
    // Resumed after step 2: the same losses as straight through.
    let o = run(&train_args(&["output_dir=straight"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&train_args(&["output_dir=resumed"]), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(dir.path().join("resumed/checkpoint-4")).unwrap();
    std::fs::remove_file(dir.path().join("resumed/model.safetensors")).unwrap();
    let o = run(&train_args(&["output_dir=resumed"]), dir.path());
    assert!(stderr(&o).contains("checkpoint-2"), "{}", stderr(&o));
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        losses(&dir.path().join("straight/trainer_log.jsonl")),
        losses(&dir.path().join("resumed/trainer_log.jsonl")),
    );
    assert_eq!(a.len(), 4);
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!((la - lb).abs() < 1e-4, "step {sa}: {la} vs {lb}");
    }
}
