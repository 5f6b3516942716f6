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
