//! Model forward against `transformers` (and PEFT) logits for each architecture variant:
//! Llama (untied), Llama 3 rope scaling with tied embeddings, Mistral, Qwen2 (q/k/v bias, tied),
//! Qwen3 (q/k norm, head_dim ≠ hidden/heads), and the Gemma family saved in bf16 like real
//! checkpoints: Gemma ((1+w) norms, scaled embedding, GeGLU), Gemma 2 (sandwich norms, attention
//! and final soft-capping, a sliding-window layer) and Gemma 3 text (q/k norms, local RoPE base,
//! scaled global RoPE), and Phi-3 (fused qkv/gate-up projections, partial rotary, LongRoPE with
//! both factor sets), GLM and GLM-4 (interleaved partial rotary, fused gate-up, post-norms).
//! Mixtral, Qwen2-MoE and Qwen3-MoE (top-k routing, shared expert, dense layers, load-balancing
//! loss). Fixtures: `scripts/make_reference_models.py`.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use trainer::model::{Batch, Model};

/// `tests/fixtures/models`, or `REFERENCE_MODELS` (a dev run against another transformers
/// version's fixtures: `REFERENCE_OUT=DIR python scripts/make_reference_models.py`).
fn fixtures() -> PathBuf {
    match std::env::var_os("REFERENCE_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models"),
    }
}

fn expected(name: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(name).join("expected.json")).unwrap(),
    )
    .unwrap()
}

/// The rows of `input_ids` cut to `len` tokens, every token trained.
fn rows(e: &serde_json::Value, len: usize) -> Vec<Vec<u32>> {
    e["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array().unwrap()[..len.min(r.as_array().unwrap().len())]
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn batch(e: &serde_json::Value) -> Batch {
    common::full_rows(&rows(e, usize::MAX))
}

fn rel_err(ours: &[f64], theirs: &[f64]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let max_diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = theirs.iter().map(|x| x.abs()).fold(0.0, f64::max);
    max_diff / scale
}

fn logits(model: &Model, b: &Batch) -> Vec<f64> {
    model
        .logits(b)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn want(e: &serde_json::Value, key: &str) -> Vec<f64> {
    e[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

const VARIANTS: [&str; 15] = common::MODEL_VARIANTS;

#[test]
fn logits_match_transformers_for_every_variant() {
    for name in VARIANTS {
        let e = expected(name);
        let b = batch(&e);
        for dtype in [DType::F32, DType::F64] {
            let model = Model::load(&fixtures().join(name), dtype, &Device::Cpu).unwrap();
            let err = rel_err(&logits(&model, &b), &want(&e, "logits"));
            assert!(err < 1e-4, "{name} {dtype:?}: relative error {err}");
        }
    }
}

#[test]
fn peft_adapters_match_unmerged_and_merged() {
    for (name, adapter) in [
        ("llama", "lora"),
        ("qwen2", "lora"),
        ("qwen3", "lora"),
        ("gemma", "lora"),
        ("gemma2", "lora"),
        ("gemma3_text", "lora"),
        ("phi3", "lora"),
        ("glm", "lora"),
        ("glm4", "lora"),
        ("baichuan2", "lora"),
        ("mixtral", "lora"),
        ("qwen2_moe", "lora"),
        ("qwen3_moe", "lora"),
        ("llama", "dora"),
        ("qwen2", "dora"),
        ("gemma2", "dora"),
    ] {
        let e = expected(name);
        let b = batch(&e);
        let reference = want(&e, &format!("{adapter}_logits"));
        let mut model = Model::load(&fixtures().join(name), DType::F32, &Device::Cpu).unwrap();
        let spec = model
            .load_adapter(&fixtures().join(name).join(adapter), true)
            .unwrap();
        assert_eq!(spec.use_dora, adapter == "dora");
        let wrapped = candle_core::safetensors::load(
            fixtures()
                .join(name)
                .join(adapter)
                .join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        .keys()
        .filter(|k| k.ends_with("lora_A.weight"))
        .count();
        assert_eq!(
            model.lora_layers().len(),
            wrapped,
            "every module PEFT wrapped"
        );
        let err = rel_err(&logits(&model, &b), &reference);
        assert!(
            err < 1e-4,
            "{name}/{adapter} unmerged: relative error {err}"
        );
        model.merge_lora().unwrap();
        assert!(model.lora_layers().is_empty());
        let err = rel_err(&logits(&model, &b), &reference);
        assert!(err < 1e-4, "{name}/{adapter} merged: relative error {err}");
    }
}

#[test]
fn incomplete_models_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Model::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("has no config.json"), "{e}");
    std::fs::copy(
        fixtures().join("llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        Model::load(tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("incomplete: no model.safetensors"), "{e}");
}

#[test]
fn sharded_weights_load_like_a_single_file() {
    use std::collections::BTreeMap;
    let src = fixtures().join("qwen3");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let weights: BTreeMap<_, _> =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let files = trainer::files::write_sharded(tmp.path(), &weights, 20_000).unwrap();
    assert!(files.len() > 2, "small shards: {}", files.len());
    assert!(tmp.path().join("model.safetensors.index.json").exists());
    let e = expected("qwen3");
    let model = Model::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    assert!(rel_err(&logits(&model, &batch(&e)), &want(&e, "logits")) < 1e-4);
    std::fs::remove_file(&files[1]).unwrap();
    let err = format!(
        "{:#}",
        Model::load(tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("is missing") && err.contains("incomplete"),
        "{err}"
    );
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_adapters() {
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for name in VARIANTS {
        let e = expected(name);
        let prompt = ids(&e["input_ids"][0]);
        let model = Model::load(&fixtures().join(name), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            trainer::infer::generate_ids(&model, &prompt, 12).unwrap(),
            ids(&e["greedy"]),
            "{name}"
        );
        for adapter in ["lora", "dora"] {
            let Some(want) = e.get(format!("{adapter}_greedy")) else {
                continue;
            };
            let mut model = Model::load(&fixtures().join(name), DType::F32, &Device::Cpu).unwrap();
            model
                .load_adapter(&fixtures().join(name).join(adapter), false)
                .unwrap();
            assert_eq!(
                trainer::infer::generate_ids(&model, &prompt, 12).unwrap(),
                ids(want),
                "{name}/{adapter}"
            );
        }
    }
}

/// The bf16 path (candle's composed ops, not the fused f32 kernels) of the families saved in bf16:
/// its error against the f32 reference stays within a small multiple of transformers' own bf16
/// error (tiny random models amplify rounding: transformers is 0.3–5% off here).
#[test]
fn bf16_compute_stays_within_rounding_of_the_reference() {
    // The fixtures saved in bf16 carry transformers' own bf16 logits.
    let bf16: Vec<_> = VARIANTS
        .iter()
        .map(|n| (n, expected(n)))
        .filter(|(_, e)| e.get("bf16_logits").is_some())
        .collect();
    assert_eq!(bf16.len(), 10, "every family added in bf16");
    for (name, e) in bf16 {
        let reference = want(&e, "logits");
        let theirs = rel_err(&want(&e, "bf16_logits"), &reference);
        let model = Model::load(&fixtures().join(name), DType::BF16, &Device::Cpu).unwrap();
        let ours = rel_err(&logits(&model, &batch(&e)), &reference);
        assert!(
            ours < 2.0 * theirs + 5e-3,
            "{name} bf16: relative error {ours}, transformers' bf16 {theirs}"
        );
    }
}

/// Phi-3's LongRoPE switches factor sets with the pass's length: the 10-token rows above use the
/// long factors (past `original_max_position_embeddings` = 8), their 6-token prefixes the short.
#[test]
fn long_rope_uses_the_short_factors_within_the_original_length() {
    let e = expected("phi3");
    let b = common::full_rows(&rows(&e, 6));
    let model = Model::load(&fixtures().join("phi3"), DType::F32, &Device::Cpu).unwrap();
    let err = rel_err(&logits(&model, &b), &want(&e, "prefix_logits"));
    assert!(err < 1e-4, "phi3 prefix: relative error {err}");
}

/// The load-balancing loss of each mixture of experts equals transformers' `aux_loss` on the same
/// rows: the loss with the coefficient 1 minus the loss without, per labelled token.
#[test]
fn load_balancing_loss_matches_transformers() {
    for name in ["mixtral", "qwen2_moe", "qwen3_moe"] {
        let e = expected(name);
        let b = batch(&e);
        let mut model = Model::load(&fixtures().join(name), DType::F64, &Device::Cpu).unwrap();
        let (ce, n) = model.loss_sum(&b, None).unwrap();
        model.router_aux_loss_coef = Some(1.0);
        let (with_aux, _) = model.loss_sum(&b, None).unwrap();
        let aux = ((with_aux - ce).unwrap().to_scalar::<f64>().unwrap()) / n as f64;
        let want = e["aux_loss"].as_f64().unwrap();
        assert!(
            (aux - want).abs() < 1e-5 * want,
            "{name}: aux {aux} vs transformers {want}"
        );
    }
}

/// Qwen2-VL with two images in one row: our image path (decode, LLaMA-Factory's regularization,
/// the processor), the vision tower, the merger and M-RoPE give transformers' logits; a text-only
/// row too.
#[test]
fn qwen2_vl_logits_match_transformers_with_images() {
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        vision_language_case(name);
    }
}

/// LLaVA with two images in one row: LLaMA-Factory's base regularization and the CLIP
/// processor give transformers' pixel values; the CLIP tower read at layer -2 without the class
/// token, the projector and the Llama give its logits, greedy tokens and cached-decoding logits.
#[test]
fn llava_pixels_and_logits_match_transformers() {
    let e = expected("llava");
    let b = common::vision_batch("llava");
    // transformers' (images, 3, 56, 56) in our patch order: 14×14 patches row-major, each
    // channel-first.
    let theirs = want(&e, "pixel_values");
    let (p, side) = (14, 56);
    let mut patched = Vec::with_capacity(theirs.len());
    for img in 0..2 {
        for r in 0..side / p {
            for c in 0..side / p {
                for ch in 0..3 {
                    for y in 0..p {
                        for x in 0..p {
                            let (yy, xx) = (r * p + y, c * p + x);
                            patched.push(theirs[((img * 3 + ch) * side + yy) * side + xx]);
                        }
                    }
                }
            }
        }
    }
    let ours = &b.vision.as_ref().unwrap().pixel_values;
    let worst = ours
        .iter()
        .zip(&patched)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert_eq!(ours.len(), patched.len());
    assert!(worst <= 1e-5, "pixel values: max abs error {worst}");
    vision_language_case("llava");
}

/// A PEFT adapter on LLaVA's language model, its modules listed by full path as
/// LLaMA-Factory does (`model.language_model.layers.N.…`): it loads and gives PEFT's logits with
/// images, unmerged and merged; and what we save for it is what PEFT saved (the same keys, the
/// same full-path targets), so PEFT and LLaMA-Factory read ours.
#[test]
fn llava_peft_adapter_loads_and_saves_as_peft_names_it() {
    let e = expected("llava");
    let b = common::vision_batch("llava");
    let dir = fixtures().join("llava");
    let mut model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let spec = model.load_adapter(&dir.join("lora"), true).unwrap();
    assert_eq!(model.lora_layers().len(), 6, "q/v/down of both layers");
    let peft: std::collections::BTreeSet<String> =
        candle_core::safetensors::load(dir.join("lora/adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    let ours: std::collections::BTreeSet<String> = model
        .adapter_tensors(DType::F32)
        .unwrap()
        .into_keys()
        .collect();
    assert_eq!(ours, peft, "adapter keys");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let mut theirs: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    theirs.sort();
    assert_eq!(
        spec.peft_config("base", &model)["target_modules"],
        serde_json::json!(theirs)
    );
    let reference = want(&e, "lora_logits");
    let err = rel_err(&logits(&model, &b), &reference);
    assert!(err < 1e-4, "llava/lora unmerged: relative error {err}");
    model.merge_lora().unwrap();
    let err = rel_err(&logits(&model, &b), &reference);
    assert!(err < 1e-4, "llava/lora merged: relative error {err}");
}

fn vision_language_case(name: &str) {
    let e = expected(name);
    let model = Model::load(&fixtures().join(name), DType::F32, &Device::Cpu).unwrap();
    let b = common::vision_batch(name);
    let grids: Vec<[usize; 3]> = e
        .get("grids")
        .cloned()
        .unwrap_or_else(|| serde_json::json!([[1, 4, 4], [1, 4, 4]]))
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let g: Vec<usize> = g
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            [g[0], g[1], g[2]]
        })
        .collect();
    assert_eq!(
        b.vision.as_ref().unwrap().grids,
        grids,
        "the processor's grids"
    );
    let image_err = rel_err(&logits(&model, &b), &want(&e, "logits"));
    // Greedy decoding from the row with images, and each step's logits against transformers'
    // full pass over prompt and answer (the KV cache carries M-RoPE's offset).
    let (ids, _) = trainer::infer::generate_with_images(
        &model,
        &b.input_ids,
        b.vision.as_ref(),
        &trainer::infer::GenerationConfig::greedy(10),
        &[],
        |_, _| true,
    )
    .unwrap();
    let want_ids: Vec<u32> = e["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want_ids, "{name} greedy with images");
    let mut cache = trainer::model::KvCache::default();
    let mut steps = Vec::new();
    let mut l = model
        .forward_cached_with_images(&b.input_ids, b.vision.as_ref().unwrap(), &mut cache)
        .unwrap();
    for &t in &ids {
        steps.extend(l.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
        l = model.forward_cached(&[t], &mut cache).unwrap();
    }
    let err = rel_err(&steps, &want(&e, "greedy_logits"));
    assert!(err < 1e-4, "{name} cached decoding: relative error {err}");
    let text: Vec<u32> = e["text_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let tl: Vec<i64> = text.iter().map(|&x| x as i64).collect();
    let b = Batch::pad(&[(&text, &tl, None)], 0);
    let err = rel_err(&logits(&model, &b), &want(&e, "text_logits"));
    assert!(err < 1e-4, "{name} text only: relative error {err}");
    assert!(
        image_err < 1e-4,
        "{name} with images: relative error {image_err}"
    );
}
