//! `stage: rm` / `dpo` examples: the prompt with its chosen and its rejected answer, each
//! truncated like LLaMA-Factory's pairwise processor.

use super::{as_labels, infer_seqlen, ones, skipped, with_media, Features, Processor};
use crate::data::converter::Example;
use crate::data::{Skipped, IGNORE_INDEX};

type Pair = (Vec<u32>, Vec<i64>, Vec<u32>, Vec<i64>);

fn encode(p: &Processor, ex: &Example) -> Result<Pair, String> {
    let tpl = p.template;
    let chosen: Vec<_> = ex
        .prompt
        .iter()
        .chain(std::iter::once(&ex.response[0]))
        .cloned()
        .collect();
    let rejected: Vec<_> = ex
        .prompt
        .iter()
        .chain(std::iter::once(&ex.response[1]))
        .cloned()
        .collect();
    let (prompt_ids, mut chosen_ids) = tpl.encode_oneturn(p.tok, &chosen, &ex.system, &ex.tools)?;
    let (_, mut rejected_ids) = tpl.encode_oneturn(p.tok, &rejected, &ex.system, &ex.tools)?;
    if tpl.efficient_eos {
        chosen_ids.extend(p.tok.eos_id());
        rejected_ids.extend(p.tok.eos_id());
    }
    // The response is what matters: the longer one decides the split.
    let (source_len, target_len) = infer_seqlen(
        prompt_ids.len(),
        chosen_ids.len().max(rejected_ids.len()),
        p.args.cutoff_len,
    );
    let prompt = &prompt_ids[..source_len];
    chosen_ids.truncate(target_len);
    rejected_ids.truncate(target_len);
    let masked = vec![IGNORE_INDEX; source_len];
    Ok((
        [prompt, &chosen_ids].concat(),
        [masked.clone(), as_labels(&chosen_ids)].concat(),
        [prompt, &rejected_ids].concat(),
        [masked, as_labels(&rejected_ids)].concat(),
    ))
}

pub(super) fn process(
    p: &Processor,
    batch: &[Example],
    out: &mut Vec<Features>,
    skips: &mut Vec<Skipped>,
) {
    for ex in batch {
        if ex.prompt.len() % 2 != 1 || ex.response.len() < 2 {
            skips.push(skipped(
                ex,
                format!(
                    "Dropped invalid example: a preference example needs a prompt ending in a user turn and a chosen and a rejected answer (got {} prompt messages, {} responses)",
                    ex.prompt.len(),
                    ex.response.len()
                ),
            ));
            continue;
        }
        match encode(p, ex) {
            Ok((ci, cl, ri, rl)) => out.push(with_media(
                Features {
                    chosen_attention_mask: Some(ones(ci.len())),
                    chosen_input_ids: Some(ci),
                    chosen_labels: Some(cl),
                    rejected_attention_mask: Some(ones(ri.len())),
                    rejected_input_ids: Some(ri),
                    rejected_labels: Some(rl),
                    ..Default::default()
                },
                ex,
            )),
            Err(reason) => skips.push(skipped(ex, reason)),
        }
    }
}
