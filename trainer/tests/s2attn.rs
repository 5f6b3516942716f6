//! LongLoRA's S²-Attn (`shift_attn`) against LLaMA-Factory's `longlora.py` run under transformers
//! 4.47 (`scripts/s2attn_reference.py`): a training pass of the tiny Llama on two rows of 16
//! tokens, one padded, gives the logits of LLaMA-Factory's attention with its shift-back line
//! assigned as LongLoRA means it; an eval pass gives full attention's.

mod common;

use candle_core::{DType, Device};
use rand::SeedableRng;
use trainer::model::Model;

fn rel_err(ours: &[f32], theirs: &[f64]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (f64::from(*a) - b).powi(2))
        .sum();
    let den: f64 = theirs.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

#[test]
fn shifted_short_attention_matches_llamafactorys() {
    let e: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/s2attn.json")).unwrap(),
    )
    .unwrap();
    let want = |k: &str| -> Vec<f64> {
        e[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let rows: Vec<Vec<u32>> = e["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(e["lens"].as_array().unwrap())
        .map(|(r, n)| {
            r.as_array()
                .unwrap()
                .iter()
                .take(n.as_u64().unwrap() as usize)
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let b = common::full_rows(&rows);
    assert_eq!(b.seq, 16);
    let mut model = Model::load(
        &common::repo().join("tests/fixtures/models/llama"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    model.shift_attn = Some(0);
    let flat = |t: candle_core::Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let shifted = flat(model.train_logits(&b, &mut rng).unwrap());
    let err = rel_err(&shifted, &want("fixed"));
    assert!(err < 1e-5, "S²-Attn training pass: relative error {err}");
    // Evaluation attends over the whole sequence (compared at the real tokens: a padding
    // position's query sees other padding here, which transformers' mask hides).
    let vocab = shifted.len() / (b.batch * b.seq);
    let real = |v: &[f64]| -> Vec<f64> {
        (0..b.batch * b.seq)
            .filter(|i| i % b.seq < b.lens[i / b.seq])
            .flat_map(|i| v[i * vocab..(i + 1) * vocab].to_vec())
            .collect()
    };
    let full: Vec<f64> = flat(model.logits(&b).unwrap())
        .into_iter()
        .map(f64::from)
        .collect();
    let full: Vec<f32> = real(&full).into_iter().map(|x| x as f32).collect();
    let err = rel_err(&full, &real(&want("full")));
    assert!(err < 1e-5, "eval pass: relative error {err}");
    // The shift changes the function, and LLaMA-Factory's shipped roll-back (within each group)
    // is another function again.
    let shifted_real: Vec<f32> = real(&shifted.iter().map(|&x| f64::from(x)).collect::<Vec<_>>())
        .into_iter()
        .map(|x| x as f32)
        .collect();
    assert!(rel_err(&shifted_real, &real(&want("full"))) > 1e-3);
    assert!(rel_err(&shifted, &want("shipped")) > 1e-3);
}
