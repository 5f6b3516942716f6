//! QLoRA's quantized base: bitsandbytes' NF4/FP4 bit for bit (fixtures from
//! `scripts/bnb_reference.py`), each GGML format's round-trip error within its bound, the
//! quantized linear's input gradient against finite differences, and every trainable tensor of
//! a LoRA model on a 4-bit base getting its gradient.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use protocol::TrainArgs;
use serde_json::Value;
use trainer::model::adapter::LoraSpec;
use trainer::model::quant::bnb::{Bnb4, Kind};
use trainer::model::quant::{quant_linear, QuantFormat, QuantWeight};
use trainer::model::{Batch, Model, RowRef};

use common::repo;

#[test]
fn bnb_4bit_matches_bitsandbytes_bit_for_bit() {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/quant/bnb4.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let n = fixture["n"].as_u64().unwrap() as usize;
    let x: Vec<f32> = (0..n)
        .map(|i| ((0.37 * i as f64).sin() * 3.0 + ((i % 7) as f64 - 3.0) / 10.0) as f32)
        .collect();
    let hex = |s: &Value| -> Vec<u8> {
        let s = s.as_str().unwrap();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap() as f32)
            .collect()
    };
    for (name, case) in fixture["cases"].as_object().unwrap() {
        let kind = if name.starts_with("nf4") {
            Kind::Nf4
        } else {
            Kind::Fp4
        };
        let double = name.ends_with("_double");
        let q = Bnb4::quantize(&x, kind, double);
        let want = hex(&case["packed"]);
        let wrong: Vec<usize> = (0..want.len())
            .filter(|&i| q.packed[i] != want[i])
            .collect();
        assert!(
            wrong.is_empty() && q.packed.len() == want.len(),
            "{name}: {} of {} packed bytes differ, first at {:?}: ours {:?} theirs {:?}",
            wrong.len(),
            want.len(),
            wrong.first(),
            wrong.first().map(|&i| q.packed[i]),
            wrong.first().map(|&i| want[i])
        );
        match &q.absmax {
            trainer::model::quant::bnb::Absmax::Plain(a) => {
                assert_eq!(a, &floats(&case["absmax"]), "{name}: absmax")
            }
            trainer::model::quant::bnb::Absmax::Double {
                codes,
                absmax2,
                offset,
            } => {
                assert_eq!(codes, &hex(&case["absmax_codes"]), "{name}: absmax codes");
                assert_eq!(absmax2, &floats(&case["absmax2"]), "{name}: absmax2");
                assert_eq!(*offset, case["offset"].as_f64().unwrap() as f32, "{name}");
            }
        }
        let mut head = vec![0f32; 512];
        q.dequantize_range(0, &mut head);
        assert_eq!(head, floats(&case["dequantized_head"]), "{name}: head");
        let mut tail = vec![0f32; 512];
        q.dequantize_range(n - 512, &mut tail);
        assert_eq!(tail, floats(&case["dequantized_tail"]), "{name}: tail");
    }
}

/// A `(rows, cols)` weight of Gaussian-like values.
fn weight(rows: usize, cols: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let a = (i as f32 * 12.9898).sin() * 43_758.547;
            let u = a - a.floor();
            let b = (i as f32 * 78.233).sin() * 12_345.679;
            let w = b - b.floor();
            (-2.0 * (u + 1e-7).ln()).sqrt() * (std::f32::consts::TAU * w).cos() * 0.02
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn rel_rmse(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().mean_all().unwrap();
    let r = a.sqr().unwrap().mean_all().unwrap();
    (d.to_scalar::<f32>().unwrap() / r.to_scalar::<f32>().unwrap()).sqrt() as f64
}

#[test]
fn every_format_round_trips_within_its_bound() {
    let w = weight(96, 512);
    // Relative RMS error bounds of each format on Gaussian weights (about twice what llama.cpp
    // reports for them): fewer bits, a wider bound.
    let cases = [
        (QuantFormat::Ggml(GgmlDType::Q8_0), 0.01),
        (QuantFormat::Ggml(GgmlDType::Q6K), 0.03),
        (QuantFormat::Ggml(GgmlDType::Q5K), 0.06),
        (QuantFormat::Ggml(GgmlDType::Q4K), 0.12),
        (QuantFormat::Ggml(GgmlDType::Q3K), 0.25),
        (QuantFormat::Ggml(GgmlDType::Q2K), 0.45),
        (
            QuantFormat::Bnb4 {
                kind: Kind::Nf4,
                double: true,
            },
            0.12,
        ),
        (
            QuantFormat::Bnb4 {
                kind: Kind::Fp4,
                double: false,
            },
            0.2,
        ),
    ];
    let mut last = 0.0;
    for (format, bound) in cases {
        let q = QuantWeight::quantize(&w, format).unwrap();
        let back = q.dequantize(DType::F32).unwrap();
        let err = rel_rmse(&w, &back);
        assert!(err < bound, "{}: {err}", format.describe());
        if matches!(format, QuantFormat::Ggml(_)) {
            assert!(err >= last, "fewer bits, more error: {}", format.describe());
            last = err;
        }
        // 4 bits take about an eighth of f32.
        if format.describe().starts_with("NF4") {
            assert!(q.bytes() * 7 < 96 * 512 * 4, "{}", q.bytes());
        }
    }
    // Rows that are not whole 256-blocks take the 32-element type.
    let narrow = QuantWeight::quantize(&weight(8, 96), QuantFormat::Ggml(GgmlDType::Q4K)).unwrap();
    assert_eq!(narrow.stored(), QuantFormat::Ggml(GgmlDType::Q4_0));
}

#[test]
fn the_quantized_linear_has_the_input_gradient_of_its_dequantized_weight() {
    // More rows than one tile holds, so the tiling is exercised.
    let w = weight(2100, 2048);
    let q = QuantWeight::quantize(
        &w,
        QuantFormat::Bnb4 {
            kind: Kind::Nf4,
            double: true,
        },
    )
    .unwrap();
    assert!(q.num_tiles() > 1, "{} tiles", q.num_tiles());
    let dense = q.dequantize(DType::F64).unwrap();
    let x =
        Var::from_tensor(&(weight(3, 2048).to_dtype(DType::F64).unwrap() * 50.0).unwrap()).unwrap();
    let y = quant_linear(x.as_tensor(), &q).unwrap();
    let y_ref = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
    let diff = (&y - &y_ref).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f64>().unwrap() < 1e-9);
    // d/dx of sum(y * c) for a fixed c, against central differences of the dequantized product.
    let c = weight(3, 2100).to_dtype(DType::F64).unwrap();
    let f = |x: &Tensor| -> f64 {
        (x.matmul(&dense.t().unwrap()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("x gets a gradient");
    let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    let x0: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for i in [0usize, 517, 2047, 3000, 6143] {
        let h = 1e-3;
        let at = |d: f64| {
            let mut v = x0.clone();
            v[i] += d;
            f(&Tensor::from_vec(v, (3, 2048), &Device::Cpu).unwrap())
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
            "x[{i}]: {fd} vs {}",
            g[i]
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient_on_a_4bit_base() {
    let dir = repo().join("tests/fixtures/models/qwen2");
    for format in [
        QuantFormat::Bnb4 {
            kind: Kind::Nf4,
            double: true,
        },
        QuantFormat::Ggml(GgmlDType::Q4K),
    ] {
        let mut m = Model::load_quantized(&dir, DType::F32, &Device::Cpu, Some(format)).unwrap();
        assert_eq!(m.quantized().count(), 2 * 7, "{}", format.describe());
        for dora in [false, true] {
            let args = TrainArgs {
                lora_target: "all".into(),
                use_dora: dora,
                ..TrainArgs::default()
            };
            let mut m2 =
                Model::load_quantized(&dir, DType::F32, &Device::Cpu, Some(format)).unwrap();
            m2.add_lora(&LoraSpec::from_args(&args), 1).unwrap();
            m2.checkpointing = dora;
            let a: Vec<u32> = vec![3, 17, 42, 5, 88, 9, 61, 23];
            let la: Vec<i64> = vec![-100, -100, -100, 5, 88, 9, 61, 23];
            let rows: Vec<RowRef> = vec![(&a, &la, None)];
            let b = Batch::pad(&rows, 0);
            let (loss, _) = m2.loss_sum(&b, None).unwrap();
            let grads = m2.backward(&loss).unwrap();
            for (name, var) in m2.trainable() {
                assert!(
                    grads.get(var.as_tensor()).is_some(),
                    "{} dora={dora}: no gradient for {name}",
                    format.describe()
                );
            }
        }
        m.add_lora(&LoraSpec::from_args(&TrainArgs::default()), 1)
            .unwrap();
    }
}

/// A checkpoint in bf16, as real ones ship: QLoRA keeps its (tied) embedding in bf16, exactly
/// as loaded, and computes what the same table converted to f32 computes.
#[test]
fn a_quantized_base_keeps_a_bf16_embedding_in_bf16() {
    let src = repo().join("tests/fixtures/models/qwen2");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let weights = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect::<std::collections::HashMap<_, _>>();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let format = QuantFormat::Bnb4 {
        kind: Kind::Nf4,
        double: true,
    };
    let mut m = Model::load_quantized(&dir, DType::F32, &Device::Cpu, Some(format)).unwrap();
    assert_eq!(m.embed.tensor.dtype(), DType::BF16);
    m.add_lora(&LoraSpec::from_args(&TrainArgs::default()), 1)
        .unwrap();
    let a: Vec<u32> = vec![3, 17, 42, 5, 88, 9, 61, 23];
    let la: Vec<i64> = vec![-100, -100, 17, 5, 88, 9, 61, 23];
    let rows: Vec<RowRef> = vec![(&a, &la, None)];
    let b = Batch::pad(&rows, 0);
    let loss_and_grads = |m: &Model| {
        let (loss, _) = m.loss_sum(&b, None).unwrap();
        let grads = m.backward(&loss).unwrap();
        let g: Vec<f32> = m
            .trainable()
            .iter()
            .flat_map(|(_, v)| {
                let g = grads.get(v.as_tensor()).unwrap();
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), g)
    };
    let (loss, grads) = loss_and_grads(&m);
    assert!(
        m.base_bytes()
            < Model::load(&dir, DType::F32, &Device::Cpu)
                .unwrap()
                .base_bytes()
                / 3
    );
    m.embed.tensor = m.embed.tensor.to_dtype(DType::F32).unwrap();
    let (loss32, grads32) = loss_and_grads(&m);
    assert!(
        (loss - loss32).abs() < 1e-4 * loss32.abs(),
        "{loss} vs {loss32}"
    );
    let scale = grads32.iter().fold(0f32, |a, g| a.max(g.abs()));
    assert!(scale > 0.0);
    for (g, g32) in grads.iter().zip(&grads32) {
        assert!((g - g32).abs() <= 1e-4 * scale, "{g} vs {g32}");
    }
}
