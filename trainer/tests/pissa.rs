//! PiSSA against PEFT (`scripts/pissa_reference.py`): the initial A, B and residual of every
//! adapted module (exact SVD; A and B up to the sign of each singular pair, which SVD leaves
//! free), PEFT's conversion of a trained adapter for `pissa_convert`, and the converted adapter
//! on the original base computing what the trained one computes on the residual base.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{assert_factors_match, max_diff};
use protocol::TrainArgs;
use trainer::model::adapter::LoraSpec;
use trainer::model::pissa::{factors, Svd};
use trainer::model::Model;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(rel), &Device::Cpu).unwrap()
}

fn args() -> TrainArgs {
    TrainArgs {
        lora_rank: 4,
        lora_alpha: Some(8.0),
        lora_target: "q_proj,v_proj".into(),
        pissa_init: true,
        pissa_iter: -1,
        ..TrainArgs::default()
    }
}

#[test]
fn initial_adapter_and_residual_equal_pefts() {
    let peft = load("pissa/init.safetensors");
    let weights = load("models/llama/model.safetensors");
    let mut modules = 0;
    for (key, want_a) in &peft {
        let Some(module) = key.strip_suffix(".A") else {
            continue;
        };
        let w = &weights[&format!("{module}.weight")];
        let (a, b, residual) = factors(w, 4, 2.0, Svd::Exact, 0).unwrap();
        let want_b = &peft[&format!("{module}.B")];
        assert!(
            max_diff(&residual, &peft[&format!("{module}.residual")]) < 1e-4,
            "{module}: residual"
        );
        // Each singular pair may come with both signs flipped.
        assert_factors_match(&a, &b, want_a, want_b, 1e-4, module);
        modules += 1;
    }
    assert_eq!(modules, 4, "q_proj and v_proj of two layers");

    // add_lora with pissa_init sets the same product and residual on the model.
    let dir = fixtures().join("models/llama");
    let mut m = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let spec = LoraSpec::for_model(&args(), &m).unwrap();
    m.add_lora(&spec, 42).unwrap();
    let layers = m.lora_layers();
    let q = layers["model.layers.1.self_attn.q_proj"];
    let ours = q.b.as_tensor().matmul(q.a.as_tensor()).unwrap();
    let theirs = peft["model.layers.1.self_attn.q_proj.B"]
        .matmul(&peft["model.layers.1.self_attn.q_proj.A"])
        .unwrap();
    assert!(max_diff(&ours, &theirs) < 1e-4);
    assert_eq!(
        spec.peft_config("base", &m)["init_lora_weights"],
        serde_json::json!("pissa")
    );
}

#[test]
fn conversion_equals_pefts_and_applies_to_the_original_base() {
    // PEFT's conversion, reproduced from the same initial and trained tensors.
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(out.path().join("pissa_init")).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(
            fixtures().join("pissa/pissa_init").join(f),
            out.path().join("pissa_init").join(f),
        )
        .unwrap();
    }
    let trained = load("pissa/trained.safetensors");
    let tensors: std::collections::BTreeMap<String, Tensor> = trained.into_iter().collect();
    trainer::files::write_safetensors(&out.path().join("adapter_model.safetensors"), &tensors)
        .unwrap();
    std::fs::copy(
        fixtures().join("pissa/pissa_init/adapter_config.json"),
        out.path().join("adapter_config.json"),
    )
    .unwrap();
    trainer::train::checkpoint::convert_pissa(out.path()).unwrap();
    let ours =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let peft = load("pissa/converted/adapter_model.safetensors");
    assert_eq!(ours.len(), peft.len());
    for (k, t) in &peft {
        assert!(max_diff(&ours[k], t) < 1e-6, "{k}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()),
        (Some(8), Some(16.0))
    );
    assert!(out
        .path()
        .join("pissa_backup/adapter_model.safetensors")
        .exists());

    // The trained adapter on the residual base and the converted one on the original base
    // compute the same function.
    let dir = fixtures().join("models/llama");
    let b = common::full_rows(&[vec![3, 17, 5, 42, 8, 1]]);
    let mut trained_model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let spec = LoraSpec::for_model(&args(), &trained_model).unwrap();
    trained_model.add_lora(&spec, 42).unwrap();
    let t = load("pissa/trained.safetensors");
    for (name, l) in trained_model.lora_layers() {
        let k = format!("base_model.model.{name}");
        l.a.set(&t[&format!("{k}.lora_A.weight")]).unwrap();
        l.b.set(&t[&format!("{k}.lora_B.weight")]).unwrap();
    }
    let want = trained_model.logits(&b).unwrap();
    let mut converted = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    converted.load_adapter(out.path(), false).unwrap();
    let got = converted.logits(&b).unwrap();
    assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
}
