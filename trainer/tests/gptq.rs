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
        let diff = common::max_diff(&deq, want);
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
        let (a, b) = (ours.codes(), theirs.codes());
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        let share = same as f64 / a.len() as f64;
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

/// Mean next-token loss of `model` over `rows`.
fn loss(model: &trainer::model::Model, rows: &[Vec<u32>]) -> f64 {
    let b = common::full_rows(rows);
    let (sum, n) = model.loss_sum(&b, None).unwrap();
    sum.to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        / n as f64
}

/// A trained demo model exported with `export_quantization_bit: 4`: the folder has
/// transformers' GPTQ layout, our loader reads it quantized, and its perplexity on held-out text
/// is close to the full-precision model's and better than round-to-nearest 4-bit of the same
/// model (the README quotes these numbers).
#[test]
fn a_gptq_export_loads_and_beats_rounding_on_held_out_text() {
    use protocol::TrainArgs;
    use trainer::model::quant::{QuantFormat, QuantWeight};
    use trainer::model::{layers::LinearWeight, Model};
    let tmp = tempfile::tempdir().unwrap();
    let data = common::repo().join("data");
    let base = tmp.path().join("base");
    trainer::demo::build_demo_model(&base, &data, &Default::default()).unwrap();
    // A model that has learned the demo text, so that quantization has something to lose.
    let trained = tmp.path().join("trained");
    let args = TrainArgs {
        model_name_or_path: Some(base.display().to_string()),
        stage: protocol::args::Stage::Pt,
        dataset: Some("demo_pt".into()),
        dataset_dir: data.display().to_string(),
        finetuning_type: protocol::args::FinetuningType::Full,
        cutoff_len: 64,
        max_samples: Some(250),
        per_device_train_batch_size: 8,
        num_train_epochs: 4.0,
        learning_rate: 3e-3,
        logging_steps: 100,
        save_strategy: protocol::args::IntervalStrategy::No,
        output_dir: Some(trained.display().to_string()),
        do_train: true,
        ..TrainArgs::default()
    };
    struct Quiet;
    impl trainer::train::report::Reporter for Quiet {
        fn event(&mut self, _: &protocol::WorkerEvent) {}
    }
    let outcome = trainer::train::run_training(&args, &Default::default(), &mut Quiet).unwrap();
    assert!(matches!(outcome, trainer::train::Outcome::Finished(_)));

    // Calibration from a file (a `.txt` file's lines are its `text`): the trained-on lines.
    let text = std::fs::read_to_string(data.join("demo_pt.txt")).unwrap();
    let calibration = tmp.path().join("calibration.txt");
    std::fs::write(
        &calibration,
        text.lines().take(250).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let exported = tmp.path().join("gptq");
    let mut layers_done = Vec::new();
    let export = TrainArgs {
        model_name_or_path: Some(trained.display().to_string()),
        template: Some("default".into()),
        dataset_dir: data.display().to_string(),
        export_dir: Some(exported.display().to_string()),
        export_quantization_bit: Some(4),
        export_quantization_dataset: Some(calibration.display().to_string()),
        export_quantization_nsamples: 64,
        export_quantization_maxlen: 16,
        ..TrainArgs::default()
    };
    trainer::export::export_model_with(&export, &mut |done, total| layers_done.push((done, total)))
        .unwrap();
    let layers = layers_done.last().unwrap().1;
    assert_eq!(
        layers_done,
        (1..=layers).map(|d| (d, layers)).collect::<Vec<_>>()
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "gptq");
    assert_eq!(cfg["quantization_config"]["bits"], 4);
    assert_eq!(cfg["quantization_config"]["group_size"], 128);
    assert_eq!(cfg["torch_dtype"], "float16");
    let files =
        candle_core::safetensors::load(exported.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        files["model.layers.0.mlp.down_proj.qweight"].dtype(),
        DType::I32
    );
    assert_eq!(
        files["model.layers.0.mlp.down_proj.scales"].dtype(),
        DType::F16
    );
    assert!(!files.contains_key("model.layers.0.mlp.down_proj.weight"));
    assert_eq!(files["model.embed_tokens.weight"].dtype(), DType::F16);

    // Held-out text: the demo text's last 50 lines, which neither training nor calibration saw.
    let tok = trainer::tokenizer::HfTokenizer::load(&trained).unwrap();
    let rows: Vec<Vec<u32>> = std::fs::read_to_string(data.join("demo_pt.txt"))
        .unwrap()
        .lines()
        .skip(250)
        .map(|t| tok.encode_with_special(t))
        .collect();
    assert_eq!(rows.len(), 50);
    let full = Model::load(&trained, DType::F32, &Device::Cpu).unwrap();
    let gptq_model = Model::load(&exported, DType::F32, &Device::Cpu).unwrap();
    assert!(gptq_model.linears().all(|l| matches!(
        &l.weight,
        LinearWeight::Quantized(q) if matches!(q.format, QuantFormat::Gptq { bits: 4, group_size: Some(128) })
    )));
    let mut rtn_model = Model::load(&trained, DType::F32, &Device::Cpu).unwrap();
    for lin in rtn_model.linears_mut() {
        let w = lin.weight.to_dense(DType::F32).unwrap();
        lin.weight = LinearWeight::Quantized(
            QuantWeight::quantize(
                &w,
                QuantFormat::Gptq {
                    bits: 4,
                    group_size: Some(128),
                },
            )
            .unwrap(),
        );
    }
    let ppl = |m: &Model| loss(m, &rows).exp();
    let (p_full, p_gptq, p_rtn) = (ppl(&full), ppl(&gptq_model), ppl(&rtn_model));
    eprintln!("held-out perplexity: f32 {p_full:.3}, GPTQ 4-bit {p_gptq:.3}, RTN 4-bit {p_rtn:.3}");
    assert!(p_gptq < p_rtn, "GPTQ {p_gptq} vs RTN {p_rtn}");
    assert!(
        (p_gptq / p_full - 1.0).abs() < 0.01,
        "GPTQ {p_gptq} vs f32 {p_full}"
    );
    assert!(
        (p_gptq - p_full) < 0.5 * (p_rtn - p_full),
        "GPTQ should lose less than half of what rounding loses: f32 {p_full}, GPTQ {p_gptq}, RTN {p_rtn}"
    );

    // The GPTQ folder is a QLoRA base: LoRA trains on it; full fine-tuning is refused.
    let lora = TrainArgs {
        model_name_or_path: Some(exported.display().to_string()),
        finetuning_type: protocol::args::FinetuningType::Lora,
        num_train_epochs: 1.0,
        max_samples: Some(32),
        output_dir: Some(tmp.path().join("qlora").display().to_string()),
        ..args.clone()
    };
    let outcome = trainer::train::run_training(&lora, &Default::default(), &mut Quiet).unwrap();
    let trainer::train::Outcome::Finished(m) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(m["train_loss"].as_f64().unwrap().is_finite());
    assert!(tmp.path().join("qlora/adapter_model.safetensors").exists());
    let full = TrainArgs {
        finetuning_type: protocol::args::FinetuningType::Full,
        output_dir: Some(tmp.path().join("full").display().to_string()),
        ..lora
    };
    let e = trainer::train::run_training(&full, &Default::default(), &mut Quiet).unwrap_err();
    assert!(e.to_string().contains("trains with LoRA only"), "{e}");
}
