//! What the trainer's integration tests share: the repository root and a small batch.
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
