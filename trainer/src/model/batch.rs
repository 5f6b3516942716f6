//! What the model reads: padded batches of token rows with their labels and positions, and
//! which positions carry a training target after the causal shift.

use crate::data::IGNORE_INDEX;

/// One example for [`Batch::pad`]: ids, labels and optional positions.
pub type RowRef<'a> = (&'a [u32], &'a [i64], Option<&'a [u32]>);

/// One padded batch, flattened row-major (`B × T`).
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Position of each token (restarting per packed sub-sequence).
    pub positions: Vec<u32>,
    /// Packed sub-sequence of each token (neat packing); tokens attend within their segment only.
    pub segments: Option<Vec<u32>>,
    /// Unpadded length of each row.
    pub lens: Vec<usize>,
    pub batch: usize,
    pub seq: usize,
    /// The images of a vision-language batch.
    pub vision: Option<VisionBatch>,
}

/// The images of a batch, in the order their tokens appear (row by row), and the M-RoPE
/// positions of every token.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionBatch {
    /// Flattened patches, `(patches, patch_dim)` row-major.
    pub pixel_values: Vec<f32>,
    /// `(t, h, w)` per image, in patches.
    pub grids: Vec<[usize; 3]>,
    /// `(t, h, w)` positions of each of the `B × T` tokens.
    pub mrope_positions: Vec<[u32; 3]>,
}

impl Batch {
    /// Right-pads examples into one batch; positions count from 0 unless given.
    pub fn pad(rows: &[RowRef], pad_id: u32) -> Self {
        let seq = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let mut b = Batch {
            input_ids: Vec::with_capacity(rows.len() * seq),
            labels: Vec::with_capacity(rows.len() * seq),
            positions: Vec::with_capacity(rows.len() * seq),
            segments: None,
            vision: None,
            lens: rows.iter().map(|r| r.0.len()).collect(),
            batch: rows.len(),
            seq,
        };
        for (ids, labels, pos) in rows {
            let n = ids.len();
            b.input_ids.extend_from_slice(ids);
            b.input_ids.extend(std::iter::repeat_n(pad_id, seq - n));
            b.labels.extend_from_slice(labels);
            b.labels
                .extend(std::iter::repeat_n(IGNORE_INDEX, seq - labels.len()));
            match pos {
                Some(p) => b.positions.extend_from_slice(p),
                None => b.positions.extend(0..n as u32),
            }
            b.positions.extend(n as u32..seq as u32);
        }
        b
    }

    /// The batch right-padded further to `seq` tokens with `pad_id` (unlabelled, positions
    /// counting on, outside every packed segment).
    pub fn padded_to(&self, seq: usize, pad_id: u32) -> Batch {
        let extra = seq.saturating_sub(self.seq);
        // Each row's values, then `fill(row, i)` for the i-th added token.
        let widen = |v: &[u32], fill: &dyn Fn(usize, usize) -> u32| -> Vec<u32> {
            let mut out = Vec::with_capacity(self.batch * seq);
            for r in 0..self.batch {
                out.extend_from_slice(&v[r * self.seq..(r + 1) * self.seq]);
                out.extend((0..extra).map(|i| fill(r, i)));
            }
            out
        };
        let mut labels = Vec::with_capacity(self.batch * seq);
        for r in 0..self.batch {
            labels.extend_from_slice(&self.labels[r * self.seq..(r + 1) * self.seq]);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, extra));
        }
        Batch {
            input_ids: widen(&self.input_ids, &|_, _| pad_id),
            labels,
            positions: widen(&self.positions, &|r, i| {
                self.positions[(r + 1) * self.seq - 1] + 1 + i as u32
            }),
            segments: self.segments.as_ref().map(|s| widen(s, &|_, _| 0)),
            lens: self.lens.clone(),
            batch: self.batch,
            seq,
            vision: self.vision.clone(),
        }
    }

    /// Tokens that carry loss after the causal shift.
    pub fn num_targets(&self) -> usize {
        (0..self.batch)
            .map(|b| {
                (1..self.seq)
                    .filter(|&t| self.labels[b * self.seq + t] != IGNORE_INDEX)
                    .count()
            })
            .sum()
    }
}

/// Row index (into `B·T`) and target id of every position whose next label is trained.
pub fn shifted_targets(b: &Batch) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b.batch {
        for t in 0..b.seq.saturating_sub(1) {
            let label = b.labels[r * b.seq + t + 1];
            if label != IGNORE_INDEX {
                rows.push((r * b.seq + t) as u32);
                targets.push(label as u32);
            }
        }
    }
    (rows, targets)
}
