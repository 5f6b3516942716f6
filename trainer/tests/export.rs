//! A merged export reproduces the adapter model's logits and is a complete model folder.

use std::path::PathBuf;

use candle_core::{DType, Device};
use protocol::TrainArgs;
use trainer::model::adapter::LoraSpec;
use trainer::model::{Batch, Model, RowRef};
use trainer::train::checkpoint::{save_model, SaveKind};

fn logits(m: &Model) -> Vec<f32> {
    let ids: Vec<u32> = vec![5, 40, 77, 120, 9, 300, 17, 64];
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let rows: Vec<RowRef> = vec![(&ids, &labels, None)];
    m.logits(&Batch::pad(&rows, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn merged_export_reproduces_adapter_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
    trainer::demo::build_demo_model(&base, &data, &Default::default()).unwrap();
    for use_dora in [false, true] {
        let mut model = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
        let args = TrainArgs {
            lora_rank: 4,
            use_dora,
            ..TrainArgs::default()
        };
        let spec = LoraSpec::from_args(&args);
        model.add_lora(&spec, 3).unwrap();
        model.randomize_lora_b(0.05, 5).unwrap();
        let want = logits(&model);
        let adapter = tmp.path().join(format!("adapter-{use_dora}"));
        let tok = trainer::tokenizer::HfTokenizer::load(&base).unwrap();
        save_model(
            &adapter,
            &model,
            &SaveKind::Adapter(&spec),
            base.to_str().unwrap(),
            &tok,
        )
        .unwrap();
        let out = tmp.path().join(format!("export-{use_dora}"));
        let export_args = TrainArgs {
            model_name_or_path: Some(base.display().to_string()),
            adapter_name_or_path: Some(adapter.display().to_string()),
            template: Some("qwen".into()),
            export_dir: Some(out.display().to_string()),
            ..TrainArgs::default()
        };
        trainer::export::export_model(&export_args).unwrap();
        for f in [
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "Modelfile",
        ] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let merged = Model::load(&out, DType::F32, &Device::Cpu).unwrap();
        let got = logits(&merged);
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(
            max_diff / scale <= 1e-5,
            "dora={use_dora}: relative {}",
            max_diff / scale
        );
        let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
        assert!(
            modelfile.contains("FROM .")
                && modelfile.contains("<|im_start|>user")
                && modelfile.contains("PARAMETER stop \"<|im_end|>\""),
            "{modelfile}"
        );
        let tok_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tok_cfg["padding_side"], "left");
    }
}

#[test]
fn gguf_round_trips_through_candles_reader() {
    use candle_core::quantized::gguf_file;
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data");
    trainer::demo::build_demo_model(&base, &data, &Default::default()).unwrap();
    let original = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
    for kind in ["f16", "q8_0", "q4_k_m"] {
        let out = tmp.path().join(format!("gguf-{kind}"));
        let args = TrainArgs {
            model_name_or_path: Some(base.display().to_string()),
            template: Some("qwen".into()),
            export_dir: Some(out.display().to_string()),
            export_format: protocol::args::ExportFormat::Gguf,
            export_gguf_type: kind.parse().unwrap(),
            ..TrainArgs::default()
        };
        let files = trainer::export::export_model(&args).unwrap();
        let path = &files[0];
        assert!(path.to_string_lossy().ends_with(&format!("-{kind}.gguf")));
        assert!(std::fs::read_to_string(out.join("Modelfile"))
            .unwrap()
            .contains(".gguf"));
        let mut f = std::fs::File::open(path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        let md = &content.metadata;
        assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(md["llama.block_count"].to_u32().unwrap(), 4);
        assert_eq!(md["llama.embedding_length"].to_u32().unwrap(), 128);
        assert_eq!(md["llama.attention.head_count_kv"].to_u32().unwrap(), 2);
        assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
        let tokens = md["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(tokens.len(), original.cfg.vocab_size);
        assert!(!md["tokenizer.ggml.merges"].to_vec().unwrap().is_empty());
        let tok = trainer::tokenizer::HfTokenizer::load(&base).unwrap();
        assert_eq!(
            md["tokenizer.ggml.eos_token_id"].to_u32().unwrap(),
            tok.token_to_id("<|im_end|>").unwrap()
        );
        assert!(md["tokenizer.chat_template"]
            .to_string()
            .unwrap()
            .contains("<|im_start|>"));
        // 4 layers × 9 tensors + embeddings + final norm (tied: no output.weight).
        assert_eq!(content.tensor_infos.len(), 4 * 9 + 2);
        let emb = content
            .tensor(&mut f, "token_embd.weight", &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let want = original.embed.tensor.clone();
        assert_eq!(emb.dims(), want.dims());
        let err = (emb - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let bound = if kind == "f16" { 1e-4 } else { 5e-3 };
        assert!(err < bound, "{kind}: embedding error {err}");
        let norm = content
            .tensor(&mut f, "blk.0.attn_norm.weight", &Device::Cpu)
            .unwrap();
        assert_eq!(norm.dtype(), candle_core::quantized::GgmlDType::F32);
    }
}

/// A copy of the reference model `name` with a tokenizer: the demo's byte-level BPE, or a
/// SentencePiece `tokenizer.model` from `tests/fixtures/spm`.
fn with_tokenizer(tmp: &std::path::Path, name: &str, spm: Option<&str>) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(root.join("tests/fixtures/models").join(name)).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let tok = match spm {
        Some(s) => root.join("tests/fixtures/spm").join(s),
        None => root.join("tests/fixtures/demo-tokenizer"),
    };
    for e in std::fs::read_dir(tok).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "expected.json" {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    dir
}

fn export_gguf(base: &std::path::Path, out: &std::path::Path) -> anyhow::Result<PathBuf> {
    let args = TrainArgs {
        model_name_or_path: Some(base.display().to_string()),
        template: Some("empty".into()),
        export_dir: Some(out.display().to_string()),
        export_format: protocol::args::ExportFormat::Gguf,
        export_gguf_type: "f16".parse().unwrap(),
        // The reference models have 96 embeddings; the tokenizers are larger.
        resize_vocab: true,
        ..TrainArgs::default()
    };
    Ok(trainer::export::export_model(&args)?.remove(0))
}

/// The families beyond Llama as llama.cpp's converter writes them (the files run in llama.cpp
/// itself in the dev check `scripts/gguf_family_check.py`): a mixture's experts stacked per layer
/// with the router in f32, Gemma's norms as `1 + w`, Baichuan's W_pack split and its head
/// normalized, a SentencePiece vocabulary with scores; what llama.cpp cannot run is refused.
#[test]
fn gguf_export_writes_each_family_as_llama_cpp_does() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    let tmp = tempfile::tempdir().unwrap();
    let read = |path: &PathBuf| {
        let mut f = std::fs::File::open(path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        (c, f)
    };
    // Qwen3-MoE.
    let base = with_tokenizer(tmp.path(), "qwen3_moe", None);
    let path = export_gguf(&base, &tmp.path().join("moe")).unwrap();
    let (c, mut f) = read(&path);
    assert_eq!(
        c.metadata["general.architecture"].to_string().unwrap(),
        "qwen3moe"
    );
    assert_eq!(c.metadata["qwen3moe.expert_count"].to_u32().unwrap(), 4);
    assert_eq!(
        c.metadata["qwen3moe.expert_used_count"].to_u32().unwrap(),
        2
    );
    assert_eq!(
        c.metadata["qwen3moe.expert_feed_forward_length"]
            .to_u32()
            .unwrap(),
        24
    );
    let gate = c
        .tensor(&mut f, "blk.1.ffn_gate_exps.weight", &Device::Cpu)
        .unwrap();
    assert_eq!(gate.shape().dims(), &[4, 24, 32]);
    let router = c
        .tensor(&mut f, "blk.1.ffn_gate_inp.weight", &Device::Cpu)
        .unwrap();
    assert_eq!(router.dtype(), GgmlDType::F32);
    assert!(!c.tensor_infos.keys().any(|k| k.contains("experts")));
    // Gemma: norms stored as 1 + w.
    let base = with_tokenizer(tmp.path(), "gemma", Some("llama_like"));
    let model = Model::load(&base, DType::F32, &Device::Cpu).unwrap();
    let path = export_gguf(&base, &tmp.path().join("gemma")).unwrap();
    let (c, mut f) = read(&path);
    assert_eq!(
        c.metadata["tokenizer.ggml.model"].to_string().unwrap(),
        "llama"
    );
    assert!(c.metadata["tokenizer.ggml.add_space_prefix"]
        .to_bool()
        .unwrap());
    let scores = c.metadata["tokenizer.ggml.scores"].to_vec().unwrap();
    let tokens = c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    assert!(scores.len() == tokens.len() && tokens.len() >= 2400);
    assert_eq!(tokens[3].to_string().unwrap(), "<0x00>");
    let types = c.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
    // <unk>, <s>, then a byte piece.
    let t = |i: usize| types[i].to_i32().unwrap();
    assert_eq!((t(0), t(1), t(3)), (2, 3, 6));
    let norm = c
        .tensor(&mut f, "blk.0.attn_norm.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let hf = model.layers[0].input_norm.tensor.clone();
    let diff: f32 = (norm - (hf + 1.0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
    // Gemma 2 with a query_pre_attn_scalar llama.cpp does not read: refused by name.
    let base = with_tokenizer(tmp.path(), "gemma2", None);
    let e = export_gguf(&base, &tmp.path().join("gemma2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("query_pre_attn_scalar"), "{e}");
}
