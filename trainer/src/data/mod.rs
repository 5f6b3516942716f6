//! The data pipeline, as LLaMA-Factory runs it: `dataset_info.json` → files → aligned examples
//! (alpaca / sharegpt / openai) → template → processor (pt, sft, packed sft, pairwise, kto,
//! unsupervised) → token ids and labels.

pub mod converter;
pub mod dataset_info;
pub mod loader;
pub mod media;
pub mod pipeline;
pub mod processor;
pub mod pyjson;
pub mod template;

/// The label of tokens that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// A problem with one record that does not stop the run: the record is skipped and counted.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub file: String,
    /// 1-based record number within the file (line number for JSON Lines and text files).
    pub row: usize,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} record {}: {}", self.file, self.row, self.reason)
    }
}
