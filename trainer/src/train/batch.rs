//! Training examples as token rows, shaped by stage, and the padded batches built from them.
//! Pairwise stages keep a partner row per example (the rejected answer of RM and DPO, the
//! mismatched KL completion of KTO); a batch holds the examples first, then their partners.

use protocol::args::Stage;

use crate::data::processor::Features;
use crate::model::{Batch, RowRef};

/// One training example's tensors, ready to batch.
pub(crate) struct Row {
    pub(crate) ids: Vec<u32>,
    labels: Vec<i64>,
    positions: Option<Vec<u32>>,
    segments: Option<Vec<u32>>,
    /// The example's image files, in the order of their tokens.
    images: Vec<String>,
}

impl Row {
    pub(crate) fn new(ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Self {
            ids,
            labels,
            positions: None,
            segments: None,
            images: Vec::new(),
        }
    }

    fn with_images(mut self, images: &[String]) -> Self {
        self.images = images.to_vec();
        self
    }
}

/// A stage's examples, index-aligned with their partners and KTO desirability tags.
pub(crate) struct Examples {
    pub(crate) rows: Vec<Row>,
    partners: Option<Vec<Row>>,
    tags: Option<Vec<bool>>,
    /// Turns the rows' images into pixel values (a vision-language model's data).
    images: Option<std::sync::Arc<ImageBatcher>>,
}

pub(crate) use crate::data::media::ImageBatcher;

/// The examples of one micro-batch, padded.
pub(crate) struct MicroBatch {
    pub(crate) batch: Batch,
    /// KTO's desirability of each example (true elsewhere).
    pub(crate) tags: Vec<bool>,
    /// Examples in the batch (partners not counted).
    pub(crate) examples: usize,
    /// Tokens in the batch before padding, partners included.
    pub(crate) tokens: u64,
}

impl Examples {
    /// The rows `stage` trains on. `neat` keeps packed sub-sequences apart (neat packing).
    pub(crate) fn for_stage(stage: Stage, features: &[Features], neat: bool) -> Self {
        match stage {
            Stage::Rm | Stage::Dpo => {
                let (rows, partners) = pair_rows(features);
                Self {
                    rows,
                    partners: Some(partners),
                    tags: None,
                    images: None,
                }
            }
            Stage::Kto => {
                let (rows, partners, tags) = kto_rows(features);
                Self {
                    rows,
                    partners: Some(partners),
                    tags: Some(tags),
                    images: None,
                }
            }
            Stage::Sft | Stage::Pt | Stage::Ppo => Self {
                rows: rows_of(features, neat),
                partners: None,
                tags: None,
                images: None,
            },
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether any example has images.
    pub(crate) fn has_images(&self) -> bool {
        self.rows.iter().any(|r| !r.images.is_empty())
    }

    /// Batches carry the rows' images through `batcher`.
    pub(crate) fn with_images(mut self, batcher: std::sync::Arc<ImageBatcher>) -> Self {
        self.images = Some(batcher);
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The longest row, in tokens.
    pub(crate) fn max_len(&self) -> usize {
        self.rows.iter().map(|r| r.ids.len()).max().unwrap_or(1)
    }

    /// The examples at `idx` (and their partners) as one padded batch.
    pub(crate) fn micro_batch(&self, idx: &[usize], pad: u32) -> anyhow::Result<MicroBatch> {
        let mut rows: Vec<&Row> = idx.iter().map(|&i| &self.rows[i]).collect();
        if let Some(p) = &self.partners {
            rows.extend(idx.iter().map(|&i| &p[i]));
        }
        let mut batch = make_batch(&rows, pad);
        if let Some(images) = &self.images {
            if rows.iter().any(|r| !r.images.is_empty()) {
                let parts: Vec<(&[u32], &[String])> = rows
                    .iter()
                    .map(|r| (r.ids.as_slice(), r.images.as_slice()))
                    .collect();
                batch.vision = Some(images.batch(&parts, batch.seq)?);
            }
        }
        Ok(MicroBatch {
            tokens: rows.iter().map(|r| r.ids.len() as u64).sum(),
            batch,
            tags: idx
                .iter()
                .map(|&i| self.tags.as_ref().is_none_or(|t| t[i]))
                .collect(),
            examples: idx.len(),
        })
    }

    /// Consecutive micro-batches of `bs` examples over all of them (evaluation); of those,
    /// every `parts`-th from the `part`-th (a rank's turns).
    pub(crate) fn chunks(
        &self,
        bs: usize,
        pad: u32,
        (part, parts): (usize, usize),
    ) -> impl Iterator<Item = anyhow::Result<MicroBatch>> + '_ {
        let idx: Vec<usize> = (0..self.len()).collect();
        let chunks: Vec<Vec<usize>> = idx
            .chunks(bs.max(1))
            .skip(part)
            .step_by(parts.max(1))
            .map(<[usize]>::to_vec)
            .collect();
        chunks.into_iter().map(move |c| self.micro_batch(&c, pad))
    }
}

fn rows_of(features: &[Features], neat: bool) -> Vec<Row> {
    features
        .iter()
        .filter_map(|f| {
            let ids = f.input_ids.clone()?;
            let labels = f
                .labels
                .clone()
                .unwrap_or_else(|| ids.iter().map(|&i| i as i64).collect());
            Some(Row {
                labels,
                positions: f.position_ids.clone(),
                segments: if neat { f.attention_mask.clone() } else { None },
                images: f.images.clone(),
                ids,
            })
        })
        .collect()
}

/// Chosen and rejected rows of pairwise examples, index-aligned.
pub(crate) fn pair_rows(features: &[Features]) -> (Vec<Row>, Vec<Row>) {
    let row = |ids: &Option<Vec<u32>>, labels: &Option<Vec<i64>>| -> Option<Row> {
        Some(Row::new(ids.clone()?, labels.clone()?))
    };
    features
        .iter()
        .filter_map(|f| {
            Some((
                row(&f.chosen_input_ids, &f.chosen_labels)?.with_images(&f.images),
                row(&f.rejected_input_ids, &f.rejected_labels)?.with_images(&f.images),
            ))
        })
        .unzip()
}

/// Examples, their KL partner rows and desirability tags (KTO data).
fn kto_rows(features: &[Features]) -> (Vec<Row>, Vec<Row>, Vec<bool>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for f in features {
        let (Some(ids), Some(labels), Some(kl_ids), Some(kl_labels), Some(tag)) = (
            &f.input_ids,
            &f.labels,
            &f.kl_input_ids,
            &f.kl_labels,
            f.kto_tags,
        ) else {
            continue;
        };
        out.0
            .push(Row::new(ids.clone(), labels.clone()).with_images(&f.images));
        out.1
            .push(Row::new(kl_ids.clone(), kl_labels.clone()).with_images(&f.images));
        out.2.push(tag);
    }
    out
}

/// Right-pads rows into one batch, with neat packing's segment ids when any row has them.
pub(crate) fn make_batch(rows: &[&Row], pad_id: u32) -> Batch {
    let refs: Vec<RowRef> = rows
        .iter()
        .map(|r| {
            (
                r.ids.as_slice(),
                r.labels.as_slice(),
                r.positions.as_deref(),
            )
        })
        .collect();
    let mut b = Batch::pad(&refs, pad_id);
    if rows.iter().any(|r| r.segments.is_some()) {
        let mut seg = Vec::with_capacity(b.batch * b.seq);
        for r in rows {
            let s = r.segments.clone().unwrap_or_else(|| vec![1; r.ids.len()]);
            seg.extend_from_slice(&s);
            seg.extend(std::iter::repeat_n(0, b.seq - s.len()));
        }
        b.segments = Some(seg);
    }
    b
}
