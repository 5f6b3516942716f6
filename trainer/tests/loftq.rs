//! LoftQ against PEFT's `loftq_init` with its own normal-float quantizer
//! (`scripts/loftq_reference.py`): the quantizer's tables to the bit, and for q_proj and v_proj
//! of the tiny Llama the quantized base `Q` and the adapter `A`, `B` (up to the sign of each
//! singular pair) within 1e-4 after one round. Later rounds quantize `W − B·A`, whose values
//! sit next to quantization boundaries: PEFT's own result moves a quarter of `Q` when its SVD
//! runs in f64 instead of f32, so after four rounds what must agree is the quality — how well
//! `Q + B·A` approximates `W`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{assert_factors_match, max_diff};
use trainer::model::loftq::{loftq, normal_map};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(rel), &Device::Cpu).unwrap()
}

#[test]
fn quantizer_tables_equal_pefts() {
    let peft = load("loftq/loftq.safetensors");
    for bits in [4u32, 2] {
        let theirs: Vec<f32> = peft[&format!("table{bits}")].to_vec1().unwrap();
        assert_eq!(normal_map(bits), theirs, "{bits}-bit table");
    }
}

#[test]
fn loftq_equals_pefts() {
    let peft = load("loftq/loftq.safetensors");
    let weights = load("models/llama/model.safetensors");
    let mut checked = 0;
    for (bits, iters) in [(4u32, 1usize), (2, 1), (4, 4)] {
        for module in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ] {
            let key = format!("{bits}bit_iter{iters}.{module}");
            let w = &weights[&format!("{module}.weight")];
            let (q, a, b) = loftq(w, bits, 4, iters).unwrap();
            let (pq, pa, pb) = (
                &peft[&format!("{key}.Q")],
                &peft[&format!("{key}.A")],
                &peft[&format!("{key}.B")],
            );
            if iters == 1 {
                assert_eq!(max_diff(&q, pq), 0.0, "{key}: Q");
                assert_factors_match(&a, &b, pa, pb, 1e-4, &key);
            } else {
                let err = |q: &Tensor, b: &Tensor, a: &Tensor| -> f32 {
                    let approx = (q + b.matmul(a).unwrap()).unwrap();
                    (w - approx)
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .sqrt()
                        .unwrap()
                        .to_scalar()
                        .unwrap()
                };
                let (e_ours, e_peft) = (err(&q, &b, &a), err(pq, pb, pa));
                assert!(
                    e_ours <= e_peft * 1.05 && e_peft <= e_ours * 1.05,
                    "{key}: error {e_ours} vs PEFT's {e_peft}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}
