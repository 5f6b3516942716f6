//! Padding-free passes (the batch's real tokens as one row, a causal mask per sequence, positions
//! restarting) compute what the padded batch computes: the same loss, per-sequence
//! log-probabilities and gradients, on every architecture variant (sliding windows, soft caps,
//! mixtures of experts with their load-balancing loss), with gradient checkpointing, and in a
//! training pass with NEFTune.

mod common;

use candle_core::{DType, Device, Tensor};
use protocol::TrainArgs;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use trainer::model::adapter::LoraSpec;
use trainer::model::{Batch, Model};

fn lora_model(name: &str) -> Model {
    let dir = common::repo().join("tests/fixtures/models").join(name);
    let mut m = Model::load(&dir, DType::F64, &Device::Cpu).unwrap();
    if m.cfg.moe.is_some() {
        m.router_aux_loss_coef = Some(0.5);
    }
    let args = TrainArgs {
        lora_rank: 4,
        lora_target: "all".into(),
        ..TrainArgs::default()
    };
    m.add_lora(&LoraSpec::for_model(&args, &m).unwrap(), 1)
        .unwrap();
    m.randomize_lora_b(0.2, 3).unwrap();
    m
}

/// Three rows of lengths 9, 14 and 5 (the longest in the middle), prompts masked; the tiny
/// models' windows are shorter than 14, so sliding-window layers cut inside a sequence.
fn ragged_batch() -> Batch {
    let rows: Vec<Vec<u32>> = vec![
        vec![3, 17, 42, 5, 88, 9, 61, 23, 40],
        vec![11, 2, 95, 33, 70, 4, 8, 19, 27, 66, 31, 50, 7, 12],
        vec![21, 64, 13, 90, 6],
    ];
    common::rows_with_prompt(&rows, 3)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = a.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// Loss, per-sequence log-probabilities and every trainable gradient of `m` on `b`.
fn outputs(m: &Model, b: &Batch, training: bool) -> (f64, Vec<f64>, Vec<Vec<f64>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (sum, n) = m.loss_sum(b, training.then_some(&mut rng)).unwrap();
    let loss = (sum / n as f64).unwrap();
    let grads = m.backward(&loss).unwrap();
    let grads = m
        .trainable()
        .iter()
        .map(|(name, v)| {
            flat(
                grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}")),
            )
        })
        .collect();
    let (logps, _) = m.sequence_logps(b, None).unwrap();
    (loss.to_scalar::<f64>().unwrap(), flat(&logps), grads)
}

fn assert_same(what: &str, m: &mut Model, b: &Batch, training: bool) {
    m.padding_free = true;
    assert!(
        m.packs(b),
        "{what}: the ragged batch should run padding-free"
    );
    let packed = outputs(m, b, training);
    m.padding_free = false;
    assert!(!m.packs(b));
    let padded = outputs(m, b, training);
    m.padding_free = true;
    let loss_err = (packed.0 - padded.0).abs() / padded.0.abs();
    assert!(
        loss_err < 1e-12,
        "{what}: loss {} padding-free vs {} padded",
        packed.0,
        padded.0
    );
    let logp_err = max_rel(&padded.1, &packed.1);
    assert!(
        logp_err < 1e-12,
        "{what}: sequence log-probs differ by {logp_err:.2e}"
    );
    for (i, (p, q)) in padded.2.iter().zip(&packed.2).enumerate() {
        let err = max_rel(p, q);
        assert!(err < 1e-10, "{what}: gradient {i} differs by {err:.2e}");
    }
}

#[test]
fn every_variant_computes_the_padded_result() {
    let b = ragged_batch();
    for name in common::MODEL_VARIANTS {
        let mut m = lora_model(name);
        assert_same(name, &mut m, &b, false);
    }
}

#[test]
fn checkpointing_and_neftune_keep_it_exact() {
    let b = ragged_batch();
    let mut m = lora_model("gemma2");
    m.checkpointing = true;
    m.neftune_alpha = Some(5.0);
    assert_same("gemma2 checkpointed + NEFTune", &mut m, &b, true);
}

#[test]
fn equal_lengths_and_single_rows_stay_padded() {
    let m = lora_model("llama");
    let even = common::full_rows(&[vec![1, 2, 3], vec![4, 5, 6]]);
    assert!(!m.packs(&even));
    let single = common::full_rows(&[vec![1, 2, 3]]);
    assert!(!m.packs(&single));
}
