//! Prediction and PPO prompts: the prompt to generate from, with the reference answer (if any)
//! as labels.

use super::{as_labels, infer_seqlen, ones, skipped, with_media, Features, Processor};
use crate::data::converter::{Example, Message, Role};
use crate::data::Skipped;

/// Prompt as `input_ids`, the reference answer (or nothing) as `labels`, for generation.
pub(super) fn process(
    p: &Processor,
    batch: &[Example],
    out: &mut Vec<Features>,
    skips: &mut Vec<Skipped>,
) {
    for ex in batch {
        if ex.prompt.len() % 2 != 1 {
            skips.push(skipped(ex, format!("Dropped invalid example: the prompt has {} messages; it must end in a user turn", ex.prompt.len())));
            continue;
        }
        let mut messages = ex.prompt.clone();
        if ex.response.len() == 1 {
            messages.push(ex.response[0].clone());
        } else {
            messages.push(Message::new(Role::Assistant, ""));
        }
        match p
            .template
            .encode_oneturn(p.tok, &messages, &ex.system, &ex.tools)
        {
            Ok((mut input_ids, mut labels)) => {
                if p.template.efficient_eos {
                    labels.extend(p.tok.eos_id());
                }
                let (source_len, target_len) =
                    infer_seqlen(input_ids.len(), labels.len(), p.args.cutoff_len);
                input_ids.truncate(source_len);
                labels.truncate(target_len);
                out.push(with_media(
                    Features {
                        attention_mask: Some(ones(input_ids.len())),
                        input_ids: Some(input_ids),
                        labels: Some(as_labels(&labels)),
                        ..Default::default()
                    },
                    ex,
                ));
            }
            Err(reason) => skips.push(skipped(ex, reason)),
        }
    }
}
