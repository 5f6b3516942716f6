//! Benchmarks that print tables (`llamafactory bench ...`); speed targets live here, never in
//! timed unit tests.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::data::pipeline::{get_dataset, load_examples, load_tokenizer_and_template};
use protocol::TrainArgs;

pub struct DataBenchRow {
    pub stage: &'static str,
    pub examples: usize,
    pub seconds: f64,
}

/// Writes `n` Alpaca records (varied so the tokenizer cache does not make it trivial) and runs
/// the SFT pipeline over them: read + convert, then the whole path including tokenization.
pub fn data_pipeline(
    n: usize,
    model_dir: &Path,
    work: &Path,
    template: &str,
) -> Result<Vec<DataBenchRow>> {
    let data = work.join("bench-data");
    std::fs::create_dir_all(&data)?;
    let records: Vec<_> = (0..n)
        .map(|i| {
            json!({
                "instruction": format!("Add the two numbers and explain step {i}."),
                "input": format!("{} and {}", i % 97, (i * 7) % 89),
                "output": format!("{} plus {} is {}. Adding numbers is easy when you count carefully, example {i}.", i % 97, (i * 7) % 89, i % 97 + (i * 7) % 89)
            })
        })
        .collect();
    std::fs::write(data.join("bench.json"), serde_json::to_string(&records)?)?;
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"bench": {"file_name": "bench.json"}}"#,
    )?;
    let args = TrainArgs {
        model_name_or_path: Some(model_dir.display().to_string()),
        dataset: Some("bench".into()),
        dataset_dir: data.display().to_string(),
        template: Some(template.into()),
        cutoff_len: 1024,
        ..TrainArgs::default()
    };
    let (tok, tpl, _) = load_tokenizer_and_template(&args)?;
    let t = Instant::now();
    let mut skipped = Vec::new();
    let examples = load_examples(&["bench".to_string()], &args, &mut skipped)?;
    let read = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let module = get_dataset(&args, &tok, &tpl)?;
    let full = t.elapsed().as_secs_f64();
    Ok(vec![
        DataBenchRow {
            stage: "read + convert",
            examples: examples.len(),
            seconds: read,
        },
        DataBenchRow {
            stage: "read + convert + template + tokenize",
            examples: module.train.len(),
            seconds: full,
        },
    ])
}
