//! Golden test: our data pipeline against LLaMA-Factory's, token for token.
//!
//! `tests/fixtures/lf/*.jsonl` were written by `scripts/lf_reference.py`, which runs LLaMA-Factory
//! 0.9.5's own templates and processors on its demo data (`../shared/compat/llamafactory-data`)
//! with the demo tokenizer in `tests/fixtures/demo-tokenizer`. Each case of `cases.json` is run
//! here with the same arguments and every processed example must match exactly.

use std::path::PathBuf;

use serde_json::{Map, Value};
use trainer::config::args_from_json;
use trainer::data::pipeline::{get_dataset, load_tokenizer_and_template};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[path = "../../tests/common/shared.rs"]
mod shared;

#[test]
fn pipeline_matches_llamafactory_for_every_case() {
    let Some(lf_data) = shared::shared_file(
        "compat/llamafactory-data/dataset_info.json",
        "pipeline_matches_llamafactory_for_every_case",
    ) else {
        return;
    };
    let lf_data = lf_data.parent().unwrap().to_path_buf();
    let fixtures = repo().join("tests/fixtures/lf");
    let cases: Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 40, "expected the full case list");
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let mut values = case.as_object().unwrap().clone();
        // A case LLaMA-Factory cannot run on a text-only tokenizer names the case whose ids it
        // must equal (see scripts/cases.py).
        let fixture = match values.remove("reference") {
            Some(Value::String(other)) => other,
            _ => name.clone(),
        };
        // A case may run with another model folder (the qwen2_vl cases' processor folder).
        let folder = match values.remove("model") {
            Some(Value::String(m)) => m,
            _ => "demo-tokenizer".into(),
        };
        let tokenizer_dir = repo().join("tests/fixtures").join(folder);
        values.insert(
            "model_name_or_path".into(),
            tokenizer_dir.display().to_string().into(),
        );
        values.insert("dataset_dir".into(), lf_data.display().to_string().into());
        let args = args_from_json(values).unwrap();
        let (tok, mut template, _) = load_tokenizer_and_template(&args).unwrap();
        template.today = "28 Nov 2026".into();
        let module =
            get_dataset(&args, &tok, &template).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let rows = if args.do_predict {
            &module.eval
        } else {
            &module.train
        };
        let expected: Vec<Value> =
            std::fs::read_to_string(fixtures.join(format!("{fixture}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        if rows.len() != expected.len() {
            failures.push(format!(
                "{name}: {} examples, LLaMA-Factory has {}",
                rows.len(),
                expected.len()
            ));
            continue;
        }
        for (i, (ours, theirs)) in rows.iter().zip(&expected).enumerate() {
            let ours = serde_json::to_value(ours).unwrap();
            for (col, want) in theirs.as_object().unwrap() {
                if ours.get(col) != Some(want) {
                    failures.push(describe(name, i, col, ours.get(col), want));
                }
            }
        }
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join(format!("{fixture}.tokens.json"))).unwrap(),
        )
        .unwrap();
        let ours_state = serde_json::json!({
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_id(), "pad_token_id": tok.pad_id(), "len": tok.len()
        });
        if ours_state != state {
            failures.push(format!("{name}: tokenizer state {ours_state} != {state}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Where two id lists first differ, with a little context: full rows are too long to read.
fn describe(name: &str, i: usize, col: &str, ours: Option<&Value>, theirs: &Value) -> String {
    let (Some(Value::Array(a)), Value::Array(b)) = (ours, theirs) else {
        return format!("{name} example {i} column {col}: ours {ours:?}, theirs {theirs}");
    };
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let window = |v: &[Value]| {
        v[at.saturating_sub(3)..(at + 5).min(v.len())]
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{name} example {i} column {col}: lengths {} vs {}, first difference at {at}: ours [..{}..] theirs [..{}..]",
        a.len(),
        b.len(),
        window(a),
        window(b)
    )
}
