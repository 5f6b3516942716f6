//! GGUF files as base models: ones written by llama.cpp's `gguf` package
//! (`scripts/gguf_reference.py`) give the logits of their dequantized safetensors twin, with
//! their quantized weights used as they are; one written by our own export loads back close to
//! the model it came from; LoRA on a GGUF base gets every gradient.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{batch, repo};
use protocol::TrainArgs;
use trainer::model::adapter::LoraSpec;
use trainer::model::Model;
use trainer::tokenizer::HfTokenizer;

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
}

fn load(name_or_path: &str) -> Model {
    let dir = trainer::hub::resolve_model_dir(name_or_path, "main").unwrap();
    Model::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn llama_cpp_ggufs_give_their_dequantized_twins_logits() {
    for name in ["qwen2", "llama"] {
        let file = repo().join(format!("tests/fixtures/gguf/{name}.gguf"));
        let model = load(file.to_str().unwrap());
        assert!(
            model.quantized().count() > 0,
            "{name}: the quantized weights are used as they are"
        );
        let twin = load(
            repo()
                .join(format!("tests/fixtures/gguf/{name}-twin"))
                .to_str()
                .unwrap(),
        );
        let b = batch();
        let err = max_rel(&model.logits(&b).unwrap(), &twin.logits(&b).unwrap());
        assert!(err < 1e-5, "{name}: logits differ by {err}");
        // Its tokenizer and chat template came from the metadata.
        let dir = trainer::hub::resolve_model_dir(file.to_str().unwrap(), "main").unwrap();
        let tok = HfTokenizer::load(&dir).unwrap();
        assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"), "{name}");
        assert!(tok
            .chat_template
            .as_deref()
            .unwrap()
            .contains("<|im_start|>"));
        assert_eq!(tok.inner.get_vocab_size(true), model.cfg.vocab_size);
    }
}

#[test]
fn our_gguf_export_loads_back_as_a_base_and_trains_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    trainer::demo::build_demo_model(&base, &repo().join("data"), &Default::default()).unwrap();
    let out = tmp.path().join("gguf");
    let args = TrainArgs {
        model_name_or_path: Some(base.display().to_string()),
        template: Some("qwen".into()),
        export_dir: Some(out.display().to_string()),
        export_format: protocol::args::ExportFormat::Gguf,
        export_gguf_type: protocol::args::GgufType::Q8_0,
        ..TrainArgs::default()
    };
    let files = trainer::export::export_model(&args).unwrap();
    let original = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
    // The folder holding the .gguf (and a Modelfile) stands for the model too.
    let mut from_gguf = load(out.to_str().unwrap());
    assert!(from_gguf.quantized().count() > 0);
    let b = batch();
    let err = max_rel(
        &from_gguf.logits(&b).unwrap(),
        &original.logits(&b).unwrap(),
    );
    assert!(err < 0.03, "Q8_0 round trip: {err}");
    // The same tokenizer: the demo's byte-level BPE rebuilt from the metadata.
    let dir = trainer::hub::resolve_model_dir(files[0].to_str().unwrap(), "main").unwrap();
    let tok = HfTokenizer::load(&dir).unwrap();
    let orig_tok = HfTokenizer::load(&base).unwrap();
    for text in [
        "Hello, world! 123",
        "你好，世界",
        "<|im_start|>user\nhi<|im_end|>",
    ] {
        assert_eq!(tok.encode(text), orig_tok.encode(text), "{text}");
    }
    // Exported from the GGUF base, the weights come out dequantized: the same logits.
    let merged = tmp.path().join("merged");
    let args = TrainArgs {
        model_name_or_path: Some(out.display().to_string()),
        template: Some("qwen".into()),
        export_dir: Some(merged.display().to_string()),
        ..TrainArgs::default()
    };
    trainer::export::export_model(&args).unwrap();
    let back = Model::load(&merged, DType::F32, &Device::Cpu).unwrap();
    let err = max_rel(&back.logits(&b).unwrap(), &from_gguf.logits(&b).unwrap());
    assert!(err < 1e-5, "dequantized export: {err}");
    // LoRA on the quantized base: every trainable tensor gets its gradient.
    from_gguf
        .add_lora(&LoraSpec::from_args(&TrainArgs::default()), 1)
        .unwrap();
    let (loss, _) = from_gguf.loss_sum(&b, None).unwrap();
    let grads = from_gguf.backward(&loss).unwrap();
    for (name, var) in from_gguf.trainable() {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient for {name}"
        );
    }
    // Asking to quantize it again is refused.
    let e = Model::load_quantized(
        &dir,
        DType::F32,
        &Device::Cpu,
        trainer::model::quant::QuantFormat::from_args(&TrainArgs {
            quantization_bit: Some(4),
            ..TrainArgs::default()
        })
        .unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("already quantized"), "{e}");
}

#[test]
fn a_gguf_base_exports_back_to_its_own_types() {
    use candle_core::quantized::gguf_file;
    let read = |p: &std::path::Path| {
        let mut f = std::fs::File::open(p).unwrap();
        gguf_file::Content::read(&mut f).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen2", "llama"] {
        let file = repo().join(format!("tests/fixtures/gguf/{name}.gguf"));
        let out = tmp.path().join(name);
        let args = TrainArgs {
            model_name_or_path: Some(file.display().to_string()),
            template: Some("qwen".into()),
            export_dir: Some(out.display().to_string()),
            export_format: protocol::args::ExportFormat::Gguf,
            export_gguf_type: protocol::args::GgufType::Base,
            ..TrainArgs::default()
        };
        let files = trainer::export::export_model(&args).unwrap();
        let (src, dst) = (read(&file), read(&files[0]));
        let file_type = |c: &gguf_file::Content| {
            c.metadata
                .get("general.file_type")
                .map(|v| v.to_u32().unwrap())
        };
        assert_eq!(file_type(&dst), file_type(&src), "{name}");
        for (t, info) in &src.tensor_infos {
            let Some(out) = dst.tensor_infos.get(t) else {
                let mut names: Vec<_> = dst.tensor_infos.keys().collect();
                names.sort();
                panic!("{name}: {t} is missing from the export, which has {names:?}");
            };
            assert_eq!(
                out.ggml_dtype, info.ggml_dtype,
                "{name}: {t} keeps its type"
            );
        }
        assert_eq!(dst.tensor_infos.len(), src.tensor_infos.len(), "{name}");
        // Re-quantizing values that were already on the grid of their type loses little.
        let b = batch();
        let err = max_rel(
            &load(files[0].to_str().unwrap()).logits(&b).unwrap(),
            &load(file.to_str().unwrap()).logits(&b).unwrap(),
        );
        assert!(err < 0.02, "{name}: {err}");
    }
    // A safetensors base has no types of its own to go back to.
    let base = tmp.path().join("base");
    trainer::demo::build_demo_model(&base, &repo().join("data"), &Default::default()).unwrap();
    let e = trainer::export::export_model(&TrainArgs {
        model_name_or_path: Some(base.display().to_string()),
        template: Some("qwen".into()),
        export_dir: Some(tmp.path().join("x").display().to_string()),
        export_format: protocol::args::ExportFormat::Gguf,
        export_gguf_type: protocol::args::GgufType::Base,
        ..TrainArgs::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("is not a GGUF file"), "{e}");
}

/// Processes that open the same GGUF at once (the board listing it while a worker trains on it)
/// each get the complete stand-in folder: none sees or removes another's half-written one.
#[test]
fn concurrent_loads_of_one_gguf_share_one_complete_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("race.gguf");
    std::fs::copy(repo().join("tests/fixtures/gguf/qwen2.gguf"), &file).unwrap();
    let dirs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| trainer::model::gguf::materialize(&file)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let dirs: Vec<_> = dirs.into_iter().map(|d| d.unwrap()).collect();
    assert!(dirs.windows(2).all(|w| w[0] == w[1]));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dirs[0].join(f).is_file(), "{f}");
    }
    HfTokenizer::load(&dirs[0]).unwrap();
    let _ = std::fs::remove_dir_all(&dirs[0]);
}
