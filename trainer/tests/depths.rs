//! Mixture-of-Depths against the `mixture-of-depth` package's own routed Llama
//! (`scripts/mod_reference.py` → `tests/fixtures/depths.json`, `tests/fixtures/models/llama-mod`):
//! the losses of training passes as the capacity decays, the gradients (with and without
//! gradient checkpointing), evaluation logits and greedy decoding with the KV cache; and a
//! dense model converted, saved and loaded back routed.

mod common;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use trainer::model::Model;

fn fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(common::repo().join("tests/fixtures/depths.json")).unwrap(),
    )
    .unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest difference relative to the reference's largest magnitude.
fn rel_err(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn routed(dtype: DType) -> Model {
    let m = Model::load(
        &common::repo().join("tests/fixtures/models/llama-mod"),
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    assert!(m.cfg.mixture_of_depths);
    m
}

fn rows(e: &Value) -> Vec<Vec<u32>> {
    e["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(common::token_ids)
        .collect()
}

#[test]
fn routed_training_passes_match_the_package() {
    let e = fixture();
    let b = common::full_rows(&rows(&e));
    let losses = floats(&e["losses"]);
    for checkpointing in [false, true] {
        let mut m = routed(DType::F64);
        m.setup_full().unwrap();
        m.checkpointing = checkpointing;
        for (step, want) in losses.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            let (sum, n) = m.loss_sum(&b, Some(&mut rng)).unwrap();
            let loss = (sum / n as f64).unwrap();
            let got = loss.to_scalar::<f64>().unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "pass {step} (checkpointing {checkpointing}): loss {got} vs {want}"
            );
            if step > 0 {
                continue;
            }
            let grads = m.backward(&loss).unwrap();
            let trainable = m.trainable();
            for (name, theirs) in e["grads"].as_object().unwrap() {
                let var = &trainable.iter().find(|(n, _)| n == name).unwrap().1;
                let ours = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                // The routers compute in f32 in the package and here, whatever the model's dtype,
                // and a router's gradient is a sum of terms that mostly cancel: the routers and
                // every tensor upstream of one (which its input's gradient reaches) agree to
                // about 1e-3; inside the routed blocks, to 2e-6.
                let tol = if name.contains(".block.") { 1e-5 } else { 5e-3 };
                let err = rel_err(&flat(ours), &floats(theirs));
                assert!(
                    err < tol,
                    "{name} (checkpointing {checkpointing}): relative error {err}"
                );
            }
        }
        // Evaluation keeps the capacity the training passes left (0.4167).
        let err = rel_err(&flat(&m.logits(&b).unwrap()), &floats(&e["eval_logits"]));
        assert!(err < 1e-5, "eval after training: relative error {err}");
    }
}

#[test]
fn a_loaded_routed_model_evaluates_and_decodes_as_the_package() {
    let e = fixture();
    let b = common::full_rows(&rows(&e));
    let m = routed(DType::F32);
    let err = rel_err(&flat(&m.logits(&b).unwrap()), &floats(&e["fresh_logits"]));
    assert!(
        err < 1e-5,
        "fresh model (capacity 0.125): relative error {err}"
    );
    // Greedy decoding with the KV cache: each new token always routes, over the routed prompt.
    let prompt = common::token_ids(&e["prompt"]);
    let mut cache = Default::default();
    let mut logits = m.forward_cached(&prompt, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..6 {
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        out.push(u64::from(next));
        logits = m.forward_cached(&[next], &mut cache).unwrap();
    }
    let want: Vec<u64> = e["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(out, want);
}

#[test]
fn a_converted_model_saves_routed_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::repo().join("tests/fixtures/models/llama");
    let mut m = Model::load(&src, DType::F32, &Device::Cpu).unwrap();
    m.route_depths(42).unwrap();
    let names: Vec<String> = m.params().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"model.layers.1.router.weight_predictor.weight".to_string()));
    assert!(names.contains(&"model.layers.1.block.self_attn.q_proj.weight".to_string()));
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.weight".to_string()));
    assert!(!names
        .iter()
        .any(|n| n.starts_with("model.layers.1.self_attn")));
    // PyTorch's Linear initialization: uniform in ±1/√hidden.
    let w = flat(
        m.params()
            .into_iter()
            .find(|(n, _)| n == "model.layers.1.router.weight_predictor.weight")
            .unwrap()
            .1
            .t(),
    );
    let bound = 1.0 / (m.cfg.hidden_size as f64).sqrt();
    assert!(w.iter().all(|x| x.abs() <= bound) && w.iter().any(|x| x.abs() > bound / 2.0));
    assert!(m
        .route_depths(42)
        .unwrap_err()
        .to_string()
        .contains("already routed"));

    m.setup_full().unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = m
        .checkpoint_params()
        .into_iter()
        .map(|(k, p)| (k, p.t().clone()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let mut cfg = Value::Object(m.cfg.raw.clone());
    cfg["torch_dtype"] = "float32".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaMoDForCausalLM");

    let back = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(back.cfg.mixture_of_depths);
    let b = common::batch();
    let (a, z) = (m.logits(&b).unwrap(), back.logits(&b).unwrap());
    assert!(common::max_diff(&a, &z) < 1e-6);
    // The routed layers change the function of the dense model.
    let dense = Model::load(&src, DType::F32, &Device::Cpu).unwrap();
    assert!(common::max_diff(&a, &dense.logits(&b).unwrap()) > 1e-3);
}
