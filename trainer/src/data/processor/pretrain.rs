//! `stage: pt` texts: each text with eos, truncated, or concatenated and cut into `cutoff_len`
//! blocks (`packing`).

use super::{ones, Features, Processor};
use crate::data::converter::Example;

/// `text + eos`, either truncated one by one or concatenated and cut into `cutoff_len` blocks
/// (the remainder of the batch dropped), with bos at each block start when the tokenizer adds bos.
pub(super) fn process(p: &Processor, batch: &[Example], out: &mut Vec<Features>) {
    let eos = if p.args.template.as_deref() == Some("llama3") {
        "<|end_of_text|>".to_string()
    } else {
        p.tok.eos_token.clone().unwrap_or_default()
    };
    let texts = batch.iter().map(|ex| {
        ex.prompt
            .first()
            .map(|m| m.content.as_str())
            .unwrap_or_default()
            .to_string()
            + &eos
    });
    let cutoff = p.args.cutoff_len;
    let bos = p.tok.bos_token.clone().filter(|_| p.tok.add_bos_token);
    let push = |out: &mut Vec<Features>, ids: Vec<u32>| {
        out.push(Features {
            attention_mask: Some(ones(ids.len())),
            input_ids: Some(ids),
            ..Default::default()
        })
    };
    if !p.args.packing() {
        for text in texts {
            let text = match &bos {
                Some(b) => format!("{b}{text}"),
                None => text,
            };
            let mut ids = p.tok.encode(&text);
            ids.truncate(cutoff);
            push(out, ids);
        }
        return;
    }
    let all: Vec<u32> = texts.flat_map(|t| p.tok.encode(&t)).collect();
    let usable = all.len() / cutoff * cutoff;
    let bos_id = bos.and_then(|_| p.tok.bos_id());
    for block in all[..usable].chunks(cutoff) {
        let mut ids = block.to_vec();
        if let Some(b) = bos_id {
            ids[0] = b;
        }
        push(out, ids);
    }
}
