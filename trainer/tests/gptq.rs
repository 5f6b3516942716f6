//! GPTQ against AutoGPTQ 0.7.1 (`scripts/gptq_reference.py` → `tests/fixtures/gptq/layer.safetensors`):
//! the same weight and calibration inputs quantized by both, and the checkpoint layout read and
//! written bit for bit.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use trainer::model::quant::gptq::{gptq, rtn, GptqConfig, Quantized};

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        common::repo().join("tests/fixtures/gptq/layer.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn cases() -> [(u32, usize); 3] {
    [(4, 128), (3, 32), (2, 128)]
}

fn reference(f: &HashMap<String, Tensor>, bits: u32, group: usize) -> Quantized {
    let t = |n: &str| &f[&format!("b{bits}g{group}.{n}")];
    Quantized::from_tensors(
        bits,
        t("qweight"),
        t("qzeros"),
        t("scales"),
        Some(t("g_idx")),
        true,
        "reference",
    )
    .unwrap()
}

/// `‖X Wᵀ − X Qᵀ‖²`: the layer's output error on the calibration inputs.
fn output_error(x: &Tensor, w: &Tensor, q: &Tensor) -> f64 {
    let d = (x.matmul(&w.t().unwrap()).unwrap() - x.matmul(&q.t().unwrap()).unwrap()).unwrap();
    d.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

#[test]
fn our_layout_is_autogptqs_bit_for_bit() {
    let f = fixture();
    for (bits, group) in cases() {
        let theirs = reference(&f, bits, group);
        // The reference's integers are the ones its GPTQ chose: its dequantized weight back
        // within float16 scale rounding.
        let deq = theirs.dequantize(&Device::Cpu).unwrap();
        let want = &f[&format!("b{bits}g{group}.dequantized")];
        let diff = (deq - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-3,
            "b{bits}g{group}: dequantized differs by {diff}"
        );
        // Written again, the packed tensors are the reference's, bit for bit.
        for (name, t) in theirs.to_tensors().unwrap() {
            let r = &f[&format!("b{bits}g{group}.{name}")];
            let (a, b) = match name {
                "scales" => (
                    t.to_dtype(DType::F32).unwrap(),
                    r.to_dtype(DType::F32).unwrap(),
                ),
                _ => (
                    t.to_dtype(DType::I64).unwrap(),
                    r.to_dtype(DType::I64).unwrap(),
                ),
            };
            assert_eq!(a.shape(), b.shape(), "b{bits}g{group}.{name}");
            let same = a
                .eq(&b)
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<u32>()
                .unwrap() as usize;
            assert_eq!(same, a.elem_count(), "b{bits}g{group}.{name}");
        }
    }
}

#[test]
fn our_gptq_chooses_autogptqs_integers() {
    let f = fixture();
    let (w, x) = (&f["weight"], &f["inputs"]);
    // AutoGPTQ's Hessian: 2/N Σ x xᵀ over its 8 samples.
    let h = (x.t().unwrap().matmul(x).unwrap() * (2.0 / 8.0)).unwrap();
    for (bits, group) in cases() {
        let cfg = GptqConfig {
            bits,
            group_size: Some(group),
            damp_percent: 0.1,
        };
        let ours = gptq(w, &h, &cfg).unwrap();
        let theirs = reference(&f, bits, group);
        let same = ours.q.iter().zip(&theirs.q).filter(|(a, b)| a == b).count();
        let share = same as f64 / ours.q.len() as f64;
        assert!(
            share > 0.995,
            "b{bits}g{group}: {share} of the integers agree"
        );
        assert_eq!(ours.zeros, theirs.zeros);
        let err_ours = output_error(x, w, &ours.dequantize(&Device::Cpu).unwrap());
        let err_theirs = output_error(x, w, &f[&format!("b{bits}g{group}.dequantized")]);
        assert!(
            (err_ours / err_theirs - 1.0).abs() < 0.01,
            "b{bits}g{group}: output error {err_ours} vs AutoGPTQ's {err_theirs}"
        );
        // And it is GPTQ, not rounding: the output error is well below round-to-nearest's.
        let err_rtn = output_error(
            x,
            w,
            &rtn(w, &cfg).unwrap().dequantize(&Device::Cpu).unwrap(),
        );
        assert!(
            err_ours < 0.7 * err_rtn,
            "b{bits}g{group}: GPTQ {err_ours} vs RTN {err_rtn}"
        );
        eprintln!("b{bits}g{group}: {share:.4} of integers agree; output error {err_ours:.4} (AutoGPTQ {err_theirs:.4}, RTN {err_rtn:.4})");
    }
}
