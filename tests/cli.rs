//! End-to-end tests of the `llamafactory` binary: what a user types, what they see.

mod common;

use common::{read_json, repo, run, stderr, stdout, workdir, write_config};

#[test]
fn version_and_env() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&["version"], tmp.path());
    assert!(stdout(&o).starts_with("llamafactory 0."), "{}", stdout(&o));
    let o = run(&["env"], tmp.path());
    let s = stdout(&o);
    assert!(
        s.contains("Device: CPU") && s.contains("CPU threads:") && s.contains("Dataset dir"),
        "{s}"
    );
}

#[test]
fn demo_model_is_a_hugging_face_folder() {
    let dir = workdir();
    let m = dir.path().join("model");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(m.join(f).is_file(), "{f} missing");
    }
    let cfg = read_json(&m.join("config.json"));
    assert_eq!(cfg["model_type"], "llama");
    let tok = read_json(&m.join("tokenizer_config.json"));
    assert!(tok["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    // Seeded: a second build is byte-identical.
    let again = tempfile::tempdir().unwrap();
    let data = repo().join("data");
    assert!(run(
        &[
            "demo",
            "--out",
            "m2",
            "--dataset-dir",
            data.to_str().unwrap()
        ],
        again.path()
    )
    .status
    .success());
    for f in ["model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(m.join(f)).unwrap(),
            std::fs::read(again.path().join("m2").join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn preview_data_json_and_text() {
    let dir = workdir();
    let cfg = write_config(
        dir.path(),
        "stage: sft\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 128\n",
    );
    let o = run(
        &[
            "preview-data",
            cfg.to_str().unwrap(),
            "--format",
            "json",
            "--num",
            "2",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let ids = lines[0]["input_ids"].as_array().unwrap();
    let labels = lines[0]["labels"].as_array().unwrap();
    assert_eq!(ids.len(), labels.len());
    assert_eq!(labels[0], -100, "the prompt is masked");
    assert_ne!(
        labels.last().unwrap(),
        &serde_json::json!(-100),
        "the answer is trained"
    );
    assert!(stderr(&o).contains("400 train examples"), "{}", stderr(&o));

    // Overrides after the file, and the text view marks trained spans.
    let o = run(
        &[
            "preview-data",
            cfg.to_str().unwrap(),
            "dataset=demo_chat",
            "template=llama3",
            "--num",
            "1",
        ],
        dir.path(),
    );
    let s = stdout(&o);
    assert!(
        s.contains("<|start_header_id|>user<|end_header_id|>")
            && s.contains('⟦')
            && s.contains("<|eot_id|>⟧"),
        "{s}"
    );
    assert!(
        stderr(&o).contains("resize_vocab"),
        "new special tokens are flagged: {}",
        stderr(&o)
    );
}

#[test]
fn preview_data_for_every_demo_stage() {
    let dir = workdir();
    for (stage, dataset, column) in [
        ("pt", "demo_pt", "input_ids"),
        ("rm", "demo_dpo", "chosen_input_ids"),
        ("dpo", "demo_dpo", "rejected_labels"),
        ("kto", "demo_kto", "kl_input_ids"),
        ("ppo", "demo_sft", "labels"),
    ] {
        let extra = if stage == "ppo" {
            "reward_model: model\n"
        } else {
            ""
        };
        let cfg = write_config(
            dir.path(),
            &format!("stage: {stage}\ndataset: {dataset}\ntemplate: qwen\ncutoff_len: 64\n{extra}"),
        );
        let o = run(
            &[
                "preview-data",
                cfg.to_str().unwrap(),
                "--format",
                "json",
                "--num",
                "1",
            ],
            dir.path(),
        );
        assert!(o.status.success(), "{stage}: {}", stderr(&o));
        let v: serde_json::Value =
            serde_json::from_str(stdout(&o).lines().next().unwrap()).unwrap();
        assert!(v.get(column).is_some(), "{stage}: {v}");
    }
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = workdir();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "lerning_rate: 1e-4\ndataset: demo_sft\n",
            &[],
            "unknown key `lerning_rate`; did you mean `learning_rate`?",
        ),
        (
            "cutoff_len: long\ndataset: demo_sft\n",
            &[],
            "key `cutoff_len` has value \"long\", expected a non-negative integer",
        ),
        (
            "dataset: demo_sft\n",
            &["stage=stf"],
            "key `stage` has value \"stf\", expected one of sft, rm, dpo, kto, ppo, pt (did you mean `sft`?)",
        ),
        ("dataset: demo_sfft\n", &[], "Undefined dataset demo_sfft"),
        (
            "dataset: demo_dpo\nstage: sft\n",
            &[],
            "not applicable in the current training stage",
        ),
        (
            "dataset: demo_sft\ntemplate: qwen4\n",
            &[],
            "Template qwen4 does not exist (did you mean `qwen`?)",
        ),
        (
            "dataset: demo_sft\n",
            &["model_name_or_path=/nonexistent/model"],
            "model path /nonexistent/model does not exist",
        ),
        (
            "dataset: demo_sft\n",
            &["model_name_or_path=NoSuchOrg/NoSuchModel"],
            "neither a local folder nor in the Hugging Face cache",
        ),
        ("dataset: [demo_sft\n", &[], "invalid YAML"),
    ];
    for (body, overrides, expected) in cases {
        let cfg = write_config(dir.path(), body);
        let mut args = vec!["preview-data", cfg.to_str().unwrap()];
        args.extend_from_slice(overrides);
        let o = run(&args, dir.path());
        assert!(!o.status.success(), "{body} should fail");
        assert!(
            stderr(&o).contains(expected),
            "{body}: expected `{expected}` in:\n{}",
            stderr(&o)
        );
        if expected.contains("unknown key") {
            assert!(stderr(&o).contains("cfg.yaml"), "the file is named");
        }
    }
}

#[test]
fn malformed_rows_are_skipped_with_file_row_and_reason() {
    let dir = workdir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("dataset_info.json"), r#"{"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt"}, "broken": {"file_name": "broken.json"}}"#).unwrap();
    std::fs::write(
        data.join("chat.jsonl"),
        [
            r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}"#,
            r#"{"conversations": [{"from": "gpt", "value": "wrong order"}, {"from": "human", "value": "x"}]}"#,
            r#"{"conversations": [{"from": "human", "value": "odd count"}]}"#,
            r#"{"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "fine"}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    std::fs::write(
        data.join("broken.json"),
        "[{\"instruction\": \"a\"},\n {\"instruction\" \"b\"}]",
    )
    .unwrap();
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(
        &cfg,
        "model_name_or_path: model\ndataset_dir: data\ndataset: chat\ntemplate: qwen\n",
    )
    .unwrap();
    let o = run(
        &[
            "preview-data",
            cfg.to_str().unwrap(),
            "--format",
            "json",
            "--num",
            "0",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 2);
    let err = stderr(&o);
    assert!(
        err.contains("chat.jsonl record 2: Invalid role tag `gpt` in message 1"),
        "{err}"
    );
    assert!(
        err.contains("chat.jsonl record 3: Invalid message count"),
        "{err}"
    );
    assert!(err.contains("(2 records skipped)"), "{err}");
    let o = run(
        &["preview-data", cfg.to_str().unwrap(), "dataset=broken"],
        dir.path(),
    );
    assert!(
        stderr(&o).contains("broken.json: invalid JSON at line 2"),
        "{}",
        stderr(&o)
    );
}

/// `bench gemm` times every product of its list and prints one row each.
#[test]
fn bench_gemm_prints_a_measured_row_per_product() {
    let dir = workdir();
    let o = run(&["bench", "gemm", "--rounds", "1"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" × ") && !l.starts_with("| product"))
        .collect();
    assert_eq!(rows.len(), 9, "{out}");
    for row in rows {
        let gflops: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap();
        assert!(gflops > 0.0, "{row}");
    }
    assert!(out.contains("--python PY"), "{out}");
}

/// `bench e2e` runs a LLaMA-Factory YAML whole and prints its row; without `--python` it says
/// how to add LLaMA-Factory's side (the side-by-side run is a dev measurement, in the README).
#[test]
fn bench_e2e_runs_a_yaml_and_prints_its_row() {
    let dir = workdir();
    write_config(dir.path(), "stage: sft\ndo_train: true\ndataset: demo_sft\ntemplate: qwen\ncutoff_len: 48\nmax_samples: 8\nper_device_train_batch_size: 4\n");
    let o = run(
        &[
            "bench",
            "e2e",
            "--config",
            "cfg.yaml",
            "--dtypes",
            "f32",
            "max_steps=2",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("machine: "), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("| ours | f32 | 1 |"))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<f64> = row
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    // run, samples/s, runtime, wall, RSS: all measured.
    assert!(
        cells.len() == 5 && cells[1..].iter().all(|x| *x > 0.0),
        "{row}"
    );
    assert!(out.contains("--python PY"), "{out}");
}
