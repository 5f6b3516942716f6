//! Processors turn aligned examples into model inputs, one `datasets.map` batch at a time
//! (`preprocessing_batch_size`), because packing and KTO's mismatched pairs work per batch.

mod feedback;
mod pairwise;
mod pretrain;
mod supervised;
mod unsupervised;

use serde::Serialize;

use super::converter::Example;
use super::template::Template;
use super::Skipped;
use crate::tokenizer::HfTokenizer;
use protocol::args::Stage;
use protocol::TrainArgs;

/// One processed example under LLaMA-Factory's column names.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Features {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing_params: Option<PackingParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_input_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_attention_mask: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_labels: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_input_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_attention_mask: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_labels: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_input_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_attention_mask: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_labels: Option<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kto_tags: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub videos: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audios: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackingParams {
    pub sequence_boundaries: Vec<usize>,
    pub right_padding_length: usize,
}

fn ones(n: usize) -> Vec<u32> {
    vec![1; n]
}

fn as_labels(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&i| i as i64).collect()
}

fn with_media(mut f: Features, ex: &Example) -> Features {
    f.images = ex.images.clone();
    f.videos = ex.videos.clone();
    f.audios = ex.audios.clone();
    f
}

/// LLaMA-Factory's `infer_seqlen`: how much of source and target survive `cutoff_len`.
pub fn infer_seqlen(source_len: usize, target_len: usize, cutoff_len: usize) -> (usize, usize) {
    let max_target_len = if target_len * 2 < cutoff_len {
        cutoff_len
    } else if source_len * 2 < cutoff_len {
        cutoff_len - source_len
    } else {
        (cutoff_len as f64 * (target_len as f64 / (source_len + target_len) as f64)) as usize
    };
    let new_target_len = max_target_len.min(target_len);
    let max_source_len = cutoff_len.saturating_sub(new_target_len);
    (max_source_len.min(source_len), new_target_len)
}

/// Which processor a stage uses (`dpo` reads pairwise data like `rm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessorKind {
    Pretrain,
    Supervised,
    PackedSupervised,
    Pairwise,
    Feedback,
    Unsupervised,
}

impl ProcessorKind {
    pub fn for_stage(args: &TrainArgs, do_generate: bool) -> Self {
        match args.stage {
            Stage::Pt => Self::Pretrain,
            Stage::Sft if !do_generate => {
                if args.packing() {
                    Self::PackedSupervised
                } else {
                    Self::Supervised
                }
            }
            Stage::Rm | Stage::Dpo => Self::Pairwise,
            Stage::Kto => Self::Feedback,
            _ => Self::Unsupervised,
        }
    }
}

pub struct Processor<'a> {
    pub kind: ProcessorKind,
    pub template: &'a Template,
    pub tok: &'a HfTokenizer,
    pub args: &'a TrainArgs,
}

fn skipped(ex: &Example, reason: impl Into<String>) -> Skipped {
    Skipped {
        file: ex.file.to_string(),
        row: ex.row,
        reason: reason.into(),
    }
}

impl Processor<'_> {
    /// Processes one `datasets.map` batch.
    pub fn process_batch(
        &self,
        batch: &[Example],
        out: &mut Vec<Features>,
        skips: &mut Vec<Skipped>,
    ) {
        match self.kind {
            ProcessorKind::Pretrain => pretrain::process(self, batch, out),
            ProcessorKind::Supervised => supervised::process(self, batch, out, skips),
            ProcessorKind::PackedSupervised => supervised::process_packed(self, batch, out, skips),
            ProcessorKind::Pairwise => pairwise::process(self, batch, out, skips),
            ProcessorKind::Feedback => feedback::process(self, batch, out, skips),
            ProcessorKind::Unsupervised => unsupervised::process(self, batch, out, skips),
        }
    }

    /// All examples, batch by batch, in order; batches run in parallel on the rayon pool.
    pub fn process_all(&self, examples: &[Example]) -> (Vec<Features>, Vec<Skipped>) {
        use rayon::prelude::*;
        let batch = self.args.preprocessing_batch_size.max(1);
        let parts: Vec<(Vec<Features>, Vec<Skipped>)> = examples
            .par_chunks(batch)
            .map(|chunk| {
                let (mut out, mut skips) = (Vec::new(), Vec::new());
                self.process_batch(chunk, &mut out, &mut skips);
                (out, skips)
            })
            .collect();
        let mut out = Vec::with_capacity(examples.len());
        let mut skips = Vec::new();
        for (o, s) in parts {
            out.extend(o);
            skips.extend(s);
        }
        (out, skips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_seqlen_follows_llamafactory() {
        assert_eq!(infer_seqlen(10, 5, 100), (10, 5));
        assert_eq!(infer_seqlen(100, 10, 50), (40, 10));
        assert_eq!(infer_seqlen(10, 100, 50), (10, 40));
        assert_eq!(infer_seqlen(60, 40, 50), (30, 20));
        assert_eq!(infer_seqlen(5, 5, 0), (0, 0));
    }
}
