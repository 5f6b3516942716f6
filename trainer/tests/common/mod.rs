//! What the trainer's integration tests share: the repository root, the reference model
//! variants and small batches.
#![allow(dead_code)]

use std::path::PathBuf;

use trainer::model::{Batch, RowRef};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Two rows of different lengths, prompts masked, one padded.
pub fn batch() -> Batch {
    let a: Vec<u32> = vec![3, 17, 42, 5, 88, 9, 61, 23];
    let b: Vec<u32> = vec![11, 2, 95, 33, 70, 4];
    let la: Vec<i64> = vec![-100, -100, -100, 5, 88, 9, 61, 23];
    let lb: Vec<i64> = vec![-100, -100, 95, 33, 70, 4];
    let rows: Vec<RowRef> = vec![(&a, &la, None), (&b, &lb, None)];
    Batch::pad(&rows, 0)
}

/// The tiny reference models in `tests/fixtures/models` (`scripts/make_reference_models.py`),
/// one or more per supported family.
pub const MODEL_VARIANTS: [&str; 15] = [
    "llama",
    "llama3_scaled_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "glm",
    "glm4",
    "baichuan2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
];

/// Rows trained on every token (labels = ids), padded with 0.
pub fn full_rows(rows: &[Vec<u32>]) -> Batch {
    let labels: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|&x| x as i64).collect())
        .collect();
    let refs: Vec<RowRef> = rows
        .iter()
        .zip(&labels)
        .map(|(r, l)| (r.as_slice(), l.as_slice(), None))
        .collect();
    Batch::pad(&refs, 0)
}
