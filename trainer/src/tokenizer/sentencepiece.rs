//! A SentencePiece `tokenizer.model` (checkpoints that ship only a slow tokenizer, such as
//! Baichuan 2) turned into a [`Tokenizer`] that encodes as SentencePiece does: the model's own
//! normalization (its precompiled character map, extra-whitespace removal, the dummy prefix,
//! spaces as `▁`), BPE merges ranked by the merged piece's score (or the Unigram lattice), byte
//! fallback, and user-defined and control pieces matched whole. The conversion follows
//! transformers' `SentencePieceExtractor` / `LlamaConverter`; the tests hold it to SentencePiece's
//! own ids.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use sentencepiece_model::{ModelType, SentencePieceModel, Type};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as StripDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Prepend, Replace, Sequence, Strip};
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, Tokenizer};

/// SentencePiece's whitespace mark.
const SPACE: &str = "\u{2581}";

/// The tokenizer of the SentencePiece model file `path`.
pub fn load(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sp = SentencePieceModel::from_slice(&bytes)
        .map_err(|e| anyhow!("{}: not a SentencePiece model: {e}", path.display()))?;
    convert(&sp).with_context(|| format!("converting the SentencePiece model {}", path.display()))
}

fn convert(sp: &SentencePieceModel) -> Result<Tokenizer> {
    let trainer = sp.trainer().cloned().unwrap_or_default();
    let norm = sp.normalizer().cloned().unwrap_or_default();
    let pieces: Vec<(String, f32, Type)> = sp
        .pieces()
        .iter()
        .map(|p| (p.piece().to_string(), p.score(), p.r#type()))
        .collect();
    if pieces.is_empty() {
        bail!("the model has no pieces");
    }
    let unk = pieces
        .iter()
        .position(|(_, _, t)| *t == Type::Unknown)
        .ok_or_else(|| anyhow!("the model has no unknown piece"))?;
    let model: ModelWrapper = match trainer.model_type() {
        ModelType::Bpe => bpe(&pieces, unk, trainer.byte_fallback())?.into(),
        ModelType::Unigram => {
            let vocab = pieces
                .iter()
                .map(|(p, s, _)| (p.clone(), f64::from(*s)))
                .collect();
            Unigram::from(vocab, Some(unk), trainer.byte_fallback())
                .map_err(|e| anyhow!("Unigram model: {e}"))?
                .into()
        }
        other => bail!("SentencePiece model type {other:?} is not supported (BPE and Unigram are)"),
    };
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(normalizer(&norm)?))
        .map_err(|e| anyhow!("{e}"))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPACE, " ").map_err(|e| anyhow!("{e}"))?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if norm.add_dummy_prefix() {
        decoders.push(StripDecoder::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    // Control pieces (`<s>`, `</s>`) and the unknown piece are special tokens, as the slow
    // tokenizer treats them; user-defined pieces are matched whole, as SentencePiece does.
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (p, _, t) in &pieces {
        match t {
            Type::Control | Type::Unknown => {
                special.push(AddedToken::from(p.clone(), true).normalized(false))
            }
            Type::UserDefined => user.push(AddedToken::from(p.clone(), false).normalized(false)),
            _ => {}
        }
    }
    tok.add_special_tokens(special)
        .map_err(|e| anyhow!("{e}"))?;
    tok.add_tokens(user).map_err(|e| anyhow!("{e}"))?;
    Ok(tok)
}

/// BPE over the pieces: every split of a normal piece into two pieces of the vocabulary is a
/// merge, ranked by the merged piece's score (highest first; ties in vocabulary order).
fn bpe(pieces: &[(String, f32, Type)], unk: usize, byte_fallback: bool) -> Result<BPE> {
    let vocab: std::collections::HashMap<String, u32> = pieces
        .iter()
        .enumerate()
        .map(|(i, (p, _, _))| (p.clone(), i as u32))
        .collect();
    let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (piece, score, kind) in pieces {
        if *kind != Type::Normal {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((*score, li, ri, l.to_string(), r.to_string()));
            }
        }
    }
    // Stable: within one score, the order transformers' extractor gives (left id, right id).
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect(),
        )
        .unk_token(pieces[unk].0.clone())
        .fuse_unk(true)
        .byte_fallback(byte_fallback)
        .build()
        .map_err(|e| anyhow!("BPE model: {e}"))
}

/// SentencePiece's normalizer: the character map, extra-whitespace removal, the dummy prefix
/// and `▁` for spaces.
fn normalizer(spec: &sentencepiece_model::NormalizerSpec) -> Result<NormalizerWrapper> {
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    let map = spec.precompiled_charsmap();
    if !map.is_empty() {
        steps.push(
            Precompiled::from(map)
                .map_err(|e| anyhow!("precompiled character map: {e}"))?
                .into(),
        );
    }
    if spec.remove_extra_whitespaces() {
        steps.push(Strip::new(true, true).into());
        steps.push(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
                " ",
            )
            .map_err(|e| anyhow!("{e}"))?
            .into(),
        );
    }
    if spec.add_dummy_prefix() {
        steps.push(Prepend::new(SPACE.into()).into());
    }
    if spec.escape_whitespaces() {
        steps.push(Replace::new(" ", SPACE).map_err(|e| anyhow!("{e}"))?.into());
    }
    Ok(Sequence::new(steps).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture(name: &str) -> (Tokenizer, Value) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/spm")
            .join(name);
        let tok = load(&dir.join("tokenizer.model")).unwrap();
        let e: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        (tok, e)
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    /// SentencePiece's ids for every string of the fixture, and the slow tokenizer's (which splits
    /// out `<s>` and `</s>` first) where the text has special tokens.
    fn check(name: &str) {
        let (tok, e) = fixture(name);
        assert_eq!(
            tok.get_vocab_size(true) as u64,
            e["vocab_size"].as_u64().unwrap()
        );
        for case in e["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ours = tok.encode(text, false).unwrap().get_ids().to_vec();
            let key = if text.contains("<s>") { "slow" } else { "sp" };
            assert_eq!(ours, ids(&case[key]), "{name}: {text:?}");
            if key == "sp" {
                let back = tok.decode(&ours, false).unwrap();
                assert_eq!(back, case["decoded"].as_str().unwrap(), "{name}: {text:?}");
            }
        }
    }

    #[test]
    fn baichuan_style_bpe_encodes_like_sentencepiece() {
        check("baichuan_like");
    }

    #[test]
    fn llama_style_bpe_with_nfkc_and_dummy_prefix_encodes_like_sentencepiece() {
        check("llama_like");
    }

    #[test]
    fn a_file_that_is_not_a_model_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("tokenizer.model");
        std::fs::write(&f, b"not a protobuf \xff\xff\xff").unwrap();
        let e = format!("{:#}", load(&f).unwrap_err());
        assert!(e.contains("tokenizer.model"), "{e}");
    }
}
