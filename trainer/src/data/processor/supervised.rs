//! `stage: sft` examples: the prompt masked in the labels (unless `train_on_prompt`), multi-turn
//! with `mask_history`, truncated to `cutoff_len` like LLaMA-Factory, and packed (`packing`,
//! `neat_packing`) into `cutoff_len` sequences.

use std::collections::HashMap;

use super::{
    as_labels, infer_seqlen, ones, skipped, with_media, Features, PackingParams, Processor,
};
use crate::data::converter::Example;
use crate::data::{Skipped, IGNORE_INDEX};

fn check(ex: &Example) -> Result<(), String> {
    if ex.prompt.len() % 2 != 1 || ex.response.len() != 1 {
        return Err(format!(
            "Dropped invalid example: a supervised example needs alternating turns ending in a user turn and exactly one response (got {} prompt messages, {} responses)",
            ex.prompt.len(),
            ex.response.len()
        ));
    }
    Ok(())
}

/// `<bos> X Y <eos>` with labels `<ignore>... Y <eos>`, turn by turn, truncated to `cutoff_len`.
pub(super) fn encode(p: &Processor, ex: &Example) -> Result<(Vec<u32>, Vec<i64>), String> {
    let args = p.args;
    let tpl = p.template;
    let messages: Vec<_> = ex.prompt.iter().chain(&ex.response).cloned().collect();
    let discarding_history_cot = args.mask_history && !tpl.preserve_thinking;
    let mut pairs = tpl.encode_multiturn(
        p.tok,
        &messages,
        &ex.system,
        &ex.tools,
        discarding_history_cot,
    )?;
    let eos = p.tok.eos_id().map(|e| e as i64).unwrap_or(IGNORE_INDEX);
    let mut total_length = usize::from(tpl.efficient_eos);
    if args.mask_history {
        pairs.reverse();
    }
    let mut input_ids: Vec<u32> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    for (turn_idx, (source, target)) in pairs.into_iter().enumerate() {
        if total_length >= args.cutoff_len {
            break;
        }
        let (source_len, target_len) =
            infer_seqlen(source.len(), target.len(), args.cutoff_len - total_length);
        let source = &source[..source_len];
        let target = &target[..target_len];
        total_length += source_len + target_len;
        let source_label: Vec<i64> = if args.train_on_prompt {
            as_labels(source)
        } else if tpl.efficient_eos && turn_idx != 0 {
            std::iter::once(eos)
                .chain(std::iter::repeat_n(
                    IGNORE_INDEX,
                    source_len.saturating_sub(1),
                ))
                .collect()
        } else {
            vec![IGNORE_INDEX; source_len]
        };
        let target_label: Vec<i64> = if args.mask_history && turn_idx != 0 {
            vec![IGNORE_INDEX; target_len]
        } else {
            as_labels(target)
        };
        if args.mask_history {
            input_ids = [source, target, &input_ids].concat();
            labels = [source_label, target_label, labels].concat();
        } else {
            input_ids.extend_from_slice(source);
            input_ids.extend_from_slice(target);
            labels.extend(source_label);
            labels.extend(target_label);
        }
    }
    if tpl.efficient_eos {
        if let Some(e) = p.tok.eos_id() {
            input_ids.push(e);
            labels.push(e as i64);
        }
    }
    Ok((input_ids, labels))
}

pub(super) fn process(
    p: &Processor,
    batch: &[Example],
    out: &mut Vec<Features>,
    skips: &mut Vec<Skipped>,
) {
    for ex in batch {
        match check(ex).and_then(|_| encode(p, ex)) {
            Ok((input_ids, labels)) => out.push(with_media(
                Features {
                    attention_mask: Some(ones(input_ids.len())),
                    input_ids: Some(input_ids),
                    labels: Some(labels),
                    ..Default::default()
                },
                ex,
            )),
            Err(reason) => skips.push(skipped(ex, reason)),
        }
    }
}

/// LLaMA-Factory's greedy knapsack: repeatedly fill a bin with the largest length that fits.
fn greedy_knapsack(mut numbers: Vec<usize>, capacity: usize) -> Vec<Vec<usize>> {
    numbers.sort_unstable();
    let mut knapsacks = Vec::new();
    while !numbers.is_empty() {
        let mut current = Vec::new();
        let mut remaining = capacity;
        loop {
            // bisect_right(numbers, remaining) - 1
            let index = numbers.partition_point(|&n| n <= remaining);
            if index == 0 {
                break;
            }
            remaining -= numbers[index - 1];
            current.push(numbers.remove(index - 1));
        }
        if current.is_empty() {
            break; // only lengths above capacity remain; they were filtered before
        }
        knapsacks.push(current);
    }
    knapsacks
}

pub(super) fn process_packed(
    p: &Processor,
    batch: &[Example],
    out: &mut Vec<Features>,
    skips: &mut Vec<Skipped>,
) {
    let cutoff = p.args.cutoff_len;
    let neat = p.args.neat_packing;
    let mut encoded: Vec<(Vec<u32>, Vec<i64>, &Example)> = Vec::new();
    let mut lengths = Vec::new();
    let mut length2indexes: HashMap<usize, Vec<usize>> = HashMap::new();
    for ex in batch {
        match check(ex).and_then(|_| encode(p, ex)) {
            Ok((ids, labels)) => {
                let length = ids.len();
                if length > cutoff {
                    skips.push(skipped(
                        ex,
                        format!("Dropped lengthy example with length {length} > {cutoff}."),
                    ));
                } else {
                    lengths.push(length);
                    length2indexes
                        .entry(length)
                        .or_default()
                        .push(encoded.len());
                    encoded.push((ids, labels, ex));
                }
            }
            Err(reason) => skips.push(skipped(ex, reason)),
        }
    }
    let pad = p.tok.pad_id().unwrap_or(0);
    for knapsack in greedy_knapsack(lengths, cutoff) {
        let mut f = Features::default();
        let (mut ids, mut mask, mut pos, mut labels) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut boundaries = vec![0usize];
        for (i, length) in knapsack.iter().enumerate() {
            let index = length2indexes
                .get_mut(length)
                .and_then(Vec::pop)
                .expect("length was recorded");
            let (e_ids, e_labels, ex) = &encoded[index];
            ids.extend_from_slice(e_ids);
            pos.extend(0..e_ids.len() as u32);
            labels.extend_from_slice(e_labels);
            mask.extend(std::iter::repeat_n(
                if neat { i as u32 + 1 } else { 1 },
                e_ids.len(),
            ));
            boundaries.push(boundaries[boundaries.len() - 1] + e_ids.len());
            f.images.extend(ex.images.iter().cloned());
            f.videos.extend(ex.videos.iter().cloned());
            f.audios.extend(ex.audios.iter().cloned());
        }
        // Pad to cutoff + 1 so flash attention never drops the mask, as LLaMA-Factory does.
        let pad_length = cutoff + 1 - ids.len();
        ids.extend(std::iter::repeat_n(pad, pad_length));
        pos.extend(std::iter::repeat_n(0, pad_length));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad_length));
        mask.extend(std::iter::repeat_n(u32::from(!neat), pad_length));
        boundaries.push(boundaries[boundaries.len() - 1] + pad_length);
        if neat {
            f.packing_params = Some(PackingParams {
                sequence_boundaries: boundaries,
                right_padding_length: pad_length,
            });
        }
        f.input_ids = Some(ids);
        f.attention_mask = Some(mask);
        f.position_ids = Some(pos);
        f.labels = Some(labels);
        out.push(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knapsack_matches_llamafactory() {
        assert_eq!(
            greedy_knapsack(vec![3, 5, 2, 8, 1], 10),
            vec![vec![8, 2], vec![5, 3, 1]]
        );
        assert_eq!(greedy_knapsack(vec![10, 10], 10), vec![vec![10], vec![10]]);
    }
}
