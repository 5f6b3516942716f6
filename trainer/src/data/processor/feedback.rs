//! `stage: kto` examples: each prompt with its answer, a desirability tag, and the answer of
//! another example of the batch as its KL completion, like LLaMA-Factory's feedback processor.

use super::{as_labels, infer_seqlen, ones, skipped, with_media, Features, Processor};
use crate::data::converter::{Example, Message};
use crate::data::{Skipped, IGNORE_INDEX};

fn pick(response: &[Message]) -> Option<&Message> {
    let first = response.first()?;
    if first.content.is_empty() {
        response.get(1)
    } else {
        Some(first)
    }
}

fn encode_one(
    p: &Processor,
    ex: &Example,
    answer: &Message,
) -> Result<(Vec<u32>, Vec<i64>), String> {
    let messages: Vec<_> = ex
        .prompt
        .iter()
        .chain(std::iter::once(answer))
        .cloned()
        .collect();
    let (prompt_ids, mut response_ids) = p
        .template
        .encode_oneturn(p.tok, &messages, &ex.system, &ex.tools)?;
    if p.template.efficient_eos {
        response_ids.extend(p.tok.eos_id());
    }
    let (source_len, target_len) =
        infer_seqlen(prompt_ids.len(), response_ids.len(), p.args.cutoff_len);
    response_ids.truncate(target_len);
    let ids = [&prompt_ids[..source_len], &response_ids[..]].concat();
    let labels = [vec![IGNORE_INDEX; source_len], as_labels(&response_ids)].concat();
    Ok((ids, labels))
}

/// KTO: each example with its desirability tag, plus a KL example pairing its prompt with the
/// previous example's answer (the batch shifted by one, the first taking the last).
pub(super) fn process(
    p: &Processor,
    batch: &[Example],
    out: &mut Vec<Features>,
    skips: &mut Vec<Skipped>,
) {
    let n = batch.len();
    for (i, ex) in batch.iter().enumerate() {
        if ex.prompt.len() % 2 != 1 || ex.response.len() < 2 {
            skips.push(skipped(
                ex,
                format!(
                    "Dropped invalid example: a KTO example needs a prompt ending in a user turn and a tagged answer (got {} prompt messages, {} responses)",
                    ex.prompt.len(),
                    ex.response.len()
                ),
            ));
            continue;
        }
        let kl_source = &batch[(i + n - 1) % n];
        let (Some(answer), Some(kl_answer)) = (pick(&ex.response), pick(&kl_source.response))
        else {
            skips.push(skipped(ex, "KTO example without an answer"));
            continue;
        };
        let kto_tag = !ex.response[0].content.is_empty();
        let result = encode_one(p, ex, answer).and_then(|a| Ok((a, encode_one(p, ex, kl_answer)?)));
        match result {
            Ok(((ids, labels), (kl_ids, kl_labels))) => out.push(with_media(
                Features {
                    attention_mask: Some(ones(ids.len())),
                    input_ids: Some(ids),
                    labels: Some(labels),
                    kl_attention_mask: Some(ones(kl_ids.len())),
                    kl_input_ids: Some(kl_ids),
                    kl_labels: Some(kl_labels),
                    kto_tags: Some(kto_tag),
                    ..Default::default()
                },
                ex,
            )),
            Err(reason) => skips.push(skipped(ex, reason)),
        }
    }
}
