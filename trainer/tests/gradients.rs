//! Every trainable tensor gets a gradient, and f64 gradients match central finite differences,
//! for LoRA, DoRA, rsLoRA, freeze and full fine-tuning on every architecture variant (mixtures of
//! experts with their load-balancing loss).

mod common;

use std::path::PathBuf;

use common::batch;

use candle_core::{DType, Device, Tensor, Var};
use protocol::TrainArgs;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::model::adapter::LoraSpec;
use trainer::model::vision::VisionPart;
use trainer::model::{Batch, Model};

fn model(name: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/models")
        .join(name);
    let mut m = Model::load(&dir, DType::F64, &Device::Cpu).unwrap();
    // Mixtures of experts train with the load-balancing loss, so the router's gradient through
    // it is checked too.
    if m.cfg.moe.is_some() {
        m.router_aux_loss_coef = Some(0.5);
    }
    m
}

fn mean_loss(m: &Model, b: &Batch) -> Tensor {
    mean_loss_in(m, b, false)
}

/// The mean loss of an eval pass, or of a training pass (an rng turns on what only training
/// does — dropout, NEFTune, S²-Attn — seeded the same every time, so it is one function).
fn mean_loss_in(m: &Model, b: &Batch, training: bool) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (sum, n) = m.loss_sum(b, training.then_some(&mut rng)).unwrap();
    (sum / n as f64).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

fn set_entry(v: &Var, i: usize, value: f64) {
    let shape = v.shape().clone();
    let mut data = v
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    data[i] = value;
    v.set(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap())
        .unwrap();
}

/// Checks `samples` entries of every trainable tensor against central differences.
fn check(m: &Model, what: &str, samples: usize) {
    check_on(m, what, samples, &batch());
}

/// [`check`] on the batch `b`.
fn check_on(m: &Model, what: &str, samples: usize, b: &Batch) {
    check_pass(m, what, samples, b, false);
}

/// [`check_on`] with an eval or a training pass.
fn check_pass(m: &Model, what: &str, samples: usize, b: &Batch, training: bool) {
    let mean_loss = |m: &Model, b: &Batch| mean_loss_in(m, b, training);
    let trainable = m.trainable();
    assert!(!trainable.is_empty(), "{what}: nothing trainable");
    let grads = mean_loss(m, b).backward().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Fourth-order central differences: truncation O(h⁴), roundoff ~1e-12 at h = 1e-4.
    let h = 1e-4;
    for (name, var) in &trainable {
        // An expert no token of the batch was routed to has no gradient, rightly: its finite
        // differences must then be zero too.
        let g: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None if name.contains(".experts.") => vec![0.0; var.elem_count()],
            None => panic!("{what}: no gradient for {name}"),
        };
        let n = g.len();
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for _ in 0..samples.min(n) {
            let i = rng.gen_range(0..n);
            let x0 = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[i];
            let at = |dx: f64| {
                set_entry(var, i, x0 + dx);
                scalar(&mean_loss(m, b))
            };
            let fd = (8.0 * (at(h) - at(-h)) - (at(2.0 * h) - at(-2.0 * h))) / (12.0 * h);
            set_entry(var, i, x0);
            diff += (g[i] - fd).powi(2);
            norm += fd.powi(2);
        }
        let (diff, norm) = (diff.sqrt(), norm.sqrt());
        // Differences carry ~1e-12 of roundoff; below |g| = 1e-5 that is too coarse for a
        // relative bound (a k_proj bias barely moves softmax), so bound the absolute error.
        if norm > 1e-5 {
            assert!(
                diff / norm < 1e-6,
                "{what} {name}: relative error {:.2e} (|g| {norm:.2e})",
                diff / norm
            );
        } else {
            assert!(
                diff < 1e-11,
                "{what} {name}: abs error {diff:.2e} on a tiny gradient ({norm:.2e})"
            );
        }
    }
}

/// LoRA with B randomised so that every path (A and B) carries gradient.
fn with_lora(name: &str, args: &TrainArgs) -> Model {
    let mut m = model(name);
    m.add_lora(&LoraSpec::for_model(args, &m).unwrap(), 1)
        .unwrap();
    m.randomize_lora_b(0.2, 3).unwrap();
    m
}

const VARIANTS: [&str; 15] = common::MODEL_VARIANTS;

#[test]
fn lora_variants_match_finite_differences() {
    for name in VARIANTS {
        let args = TrainArgs {
            lora_rank: 4,
            lora_target: "all".into(),
            ..TrainArgs::default()
        };
        check(&with_lora(name, &args), &format!("{name}/lora"), 4);
        let args = TrainArgs {
            lora_rank: 2,
            lora_target: match name {
                "phi3" => "qkv_proj,down_proj",
                "baichuan2" => "W_pack,down_proj",
                "mixtral" => "q_proj,w2",
                _ => "q_proj,down_proj",
            }
            .into(),
            use_rslora: true,
            additional_target: Some("norm".into()),
            ..TrainArgs::default()
        };
        let m = with_lora(name, &args);
        assert!(
            m.trainable().iter().any(|(n, _)| n == "model.norm.weight"),
            "additional_target trains model.norm"
        );
        check(&m, &format!("{name}/rslora+additional"), 4);
    }
}

#[test]
fn dora_matches_finite_differences() {
    for name in ["llama", "qwen2", "gemma2"] {
        let args = TrainArgs {
            lora_rank: 4,
            lora_target: "v_proj,up_proj".into(),
            use_dora: true,
            ..TrainArgs::default()
        };
        let mut m = with_lora(name, &args);
        assert!(m
            .trainable()
            .iter()
            .any(|(n, _)| n.ends_with("lora_magnitude_vector")));
        assert!(
            m.lora_layers().values().all(|l| l.detach_norm),
            "PEFT's detached norm by default"
        );
        // The detached norm makes A/B gradients deliberately inexact; check the exact function.
        for l in m.lora_layers_mut() {
            l.detach_norm = false;
        }
        check(&m, &format!("{name}/dora"), 4);
    }
}

#[test]
fn full_and_freeze_match_finite_differences() {
    for name in VARIANTS {
        let mut m = model(name);
        m.setup_full().unwrap();
        assert_eq!(m.trainable().len(), m.params().len());
        check(&m, &format!("{name}/full"), 2);
        let mut m = model(name);
        let args = TrainArgs {
            freeze_trainable_layers: 1,
            freeze_extra_modules: Some("embed_tokens".into()),
            ..TrainArgs::default()
        };
        m.setup_freeze(&args).unwrap();
        let names: Vec<String> = m.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(
            names
                .iter()
                .all(|n| n.contains(".1.") || n.contains("embed_tokens")),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n.contains("embed_tokens")));
        check(&m, &format!("{name}/freeze"), 3);
    }
}

#[test]
fn freeze_rejects_unknown_modules() {
    let mut m = model("llama");
    let args = TrainArgs {
        freeze_trainable_modules: "attention".into(),
        ..TrainArgs::default()
    };
    let e = m.setup_freeze(&args).unwrap_err().to_string();
    assert!(
        e.contains("Module attention is not found") && e.contains("self_attn"),
        "{e}"
    );
}

/// Reward modelling: the value head scores the last real token of each row, and the pairwise
/// loss's gradients (value head and LoRA) match finite differences.
#[test]
fn reward_model_matches_hand_values_and_finite_differences() {
    use trainer::model::value_head::ValueHead;
    use trainer::train::objective::pairwise_reward;
    let args = TrainArgs {
        lora_target: "all".into(),
        ..TrainArgs::default()
    };
    let m = with_lora("llama", &args);
    let head = ValueHead::new(m.cfg.hidden_size, 5, DType::F64, &Device::Cpu).unwrap();
    let b = batch(); // row 0 (8 tokens) is "chosen", row 1 (6 tokens, padded) "rejected"
                     // By hand: w · h[last real token] + bias.
    let h = m.hidden(&b, None).unwrap();
    let w: Vec<f64> = head
        .weight
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bias = head.bias.as_tensor().to_vec1::<f64>().unwrap()[0];
    let row = |i: usize| -> Vec<f64> { h.get(i).unwrap().to_vec1().unwrap() };
    let dot = |x: Vec<f64>| x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + bias;
    let (c, r) = (dot(row(7)), dot(row(b.seq + 5)));
    let out = pairwise_reward(&head, &m, &b, None).unwrap();
    let (loss, acc, cs, rs) = (out.loss, out.accuracy, out.chosen, out.rejected);
    assert!(
        (cs[0] - c).abs() < 1e-12 && (rs[0] - r).abs() < 1e-12,
        "{cs:?} {rs:?} vs {c} {r}"
    );
    let want = -(1.0 / (1.0 + (-(c - r)).exp())).ln();
    assert!((scalar(&loss) - want).abs() < 1e-12);
    assert_eq!(acc, f64::from(u8::from(c > r)));

    let mut vars: Vec<(String, Var)> = m.trainable();
    vars.push(("v_head.summary.weight".into(), head.weight.clone()));
    vars.push(("v_head.summary.bias".into(), head.bias.clone()));
    let f = || scalar(&pairwise_reward(&head, &m, &b, None).unwrap().loss);
    let grads = pairwise_reward(&head, &m, &b, None)
        .unwrap()
        .loss
        .backward()
        .unwrap();
    let hstep = 1e-4;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (name, var) in &vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let i = rng.gen_range(0..g.len());
        let x0 = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[i];
        let at = |dx: f64| {
            set_entry(var, i, x0 + dx);
            f()
        };
        let fd = (8.0 * (at(hstep) - at(-hstep)) - (at(2.0 * hstep) - at(-2.0 * hstep)))
            / (12.0 * hstep);
        set_entry(var, i, x0);
        assert!(
            (g[i] - fd).abs() <= 1e-6 * fd.abs().max(1e-5),
            "{name}[{i}]: {} vs {fd}",
            g[i]
        );
    }
}

/// Gradients (and the loss) with each decoder layer recomputed in backward equal those of the
/// plain graph: LoRA with dropout (the replay must draw the same masks), full fine-tuning
/// (the embedding trains, so the first layer's input is tracked), and freeze (the first layer
/// has nothing trainable: no checkpoint node, but its input still gets a gradient).
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let lora = TrainArgs {
        lora_rank: 4,
        lora_target: "all".into(),
        lora_dropout: 0.3,
        ..TrainArgs::default()
    };
    let mut full = model("qwen2");
    full.setup_full().unwrap();
    let mut freeze = model("llama");
    freeze
        .setup_freeze(&TrainArgs {
            freeze_trainable_layers: 1,
            freeze_extra_modules: Some("embed_tokens".into()),
            ..TrainArgs::default()
        })
        .unwrap();
    let cases = [
        ("llama/lora+dropout", with_lora("llama", &lora)),
        ("qwen3/lora+dropout", with_lora("qwen3", &lora)),
        ("qwen2/full", full),
        ("llama/freeze", freeze),
    ];
    let b = batch();
    for (what, mut m) in cases {
        let run = |m: &Model| {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let (sum, n) = m.loss_sum(&b, Some(&mut rng)).unwrap();
            let loss = (sum / n as f64).unwrap();
            let grads = m.backward(&loss).unwrap();
            (scalar(&loss), grads)
        };
        let (plain_loss, plain) = run(&m);
        m.checkpointing = true;
        let (ckpt_loss, ckpt) = run(&m);
        assert!(
            (plain_loss - ckpt_loss).abs() < 1e-14,
            "{what}: loss {plain_loss} vs {ckpt_loss}"
        );
        for (name, var) in m.trainable() {
            let flat = |s: &candle_core::backprop::GradStore| -> Vec<f64> {
                s.get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: no gradient for {name}"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (a, c) = (flat(&plain), flat(&ckpt));
            let err = a
                .iter()
                .zip(&c)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let scale = a.iter().map(|x| x.abs()).fold(0.0, f64::max);
            assert!(
                err <= 1e-12 * scale.max(1e-12),
                "{what} {name}: max diff {err:.2e} (max |g| {scale:.2e})"
            );
        }
    }
}

/// A half-precision model keeps its trainable tensors in f32 (LoRA matrices, and the weights
/// of full tuning): each gets an f32 gradient through the cast, the loss is computed in f32 and
/// stays close to the f32 model's, and an optimizer step moves the masters.
#[test]
fn half_precision_models_train_f32_masters() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2");
    let b = batch();
    let reference = {
        let m = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
        scalar_f32(&mean_loss(&m, &b))
    };
    for full in [false, true] {
        let mut m = Model::load(&dir, DType::F16, &Device::Cpu).unwrap();
        if full {
            m.setup_full().unwrap();
        } else {
            m.add_lora(
                &LoraSpec::from_args(&TrainArgs {
                    lora_rank: 4,
                    lora_target: "all".into(),
                    ..TrainArgs::default()
                }),
                1,
            )
            .unwrap();
        }
        let loss = mean_loss(&m, &b);
        assert_eq!(loss.dtype(), DType::F32);
        let l = scalar_f32(&loss);
        assert!(
            (l - reference).abs() < 2e-3 * reference.abs(),
            "full={full}: f16 loss {l} vs f32 {reference}"
        );
        let grads = m.backward(&loss).unwrap();
        let trainable = m.trainable();
        for (name, var) in &trainable {
            assert_eq!(var.dtype(), DType::F32, "{name}");
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("full={full}: no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{name}");
        }
        let (name, var) = trainable
            .iter()
            .find(|(n, _)| {
                n.ends_with(if full {
                    "down_proj.weight"
                } else {
                    "lora_B.weight"
                })
            })
            .unwrap();
        let before = var.as_tensor().to_vec2::<f32>().unwrap();
        let mut opt = trainer::train::optim::AdamW::new(
            vec![trainer::train::optim::ParamGroup {
                name: name.clone(),
                var: var.clone(),
                weight_decay: 0.0,
                lr_scale: 1.0,
                galore: None,
            }],
            0.9,
            0.999,
            1e-8,
        )
        .unwrap();
        opt.update(&opt.grads_of(&grads), 1e-3).unwrap();
        assert!(
            before != var.as_tensor().to_vec2::<f32>().unwrap(),
            "full={full}: {name} did not move"
        );
    }
}

fn scalar_f32(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

/// Qwen2-VL with images: LoRA on the language model and the trained projector (the merger),
/// whose gradient comes back through the image embeddings spliced into the text.
#[test]
fn qwen2_vl_lora_and_projector_match_finite_differences() {
    for name in ["qwen2_vl", "qwen2_5_vl"] {
        vision_gradients(name);
    }
}

/// LongLoRA's S²-Attn in a training pass: the shifted, grouped attention (on a batch padded
/// to a multiple of 8) hands LoRA on q/k/v/o and the MLP exact gradients.
#[test]
fn shifted_short_attention_matches_finite_differences() {
    let args = TrainArgs {
        lora_rank: 2,
        lora_target: "q_proj,k_proj,v_proj,o_proj,down_proj".into(),
        lora_dropout: 0.0,
        ..TrainArgs::default()
    };
    let mut m = with_lora("llama", &args);
    m.shift_attn = Some(0);
    // Rows of 13 and 9 tokens: padded to 16, groups of 4.
    let b = common::full_rows(&[(1..14).collect(), (20..29).collect()]);
    let (shifted, plain) = (mean_loss_in(&m, &b, true), mean_loss(&m, &b));
    assert!(
        (scalar(&shifted) - scalar(&plain)).abs() > 1e-6,
        "the training pass attends differently"
    );
    check_pass(&m, "llama/S²-Attn", 3, &b, true);
}

/// LLaVA: LoRA, the projector, and two tensors of the CLIP tower (learned positions, a query
/// projection), whose gradients come back through the dropped class token's attention.
#[test]
fn llava_lora_projector_and_tower_match_finite_differences() {
    vision_gradients("llava");
}

fn vision_gradients(name: &str) {
    let args = TrainArgs {
        lora_rank: 2,
        lora_target: "q_proj,down_proj".into(),
        ..TrainArgs::default()
    };
    let mut m = with_lora(name, &args);
    let kind = m.vision.as_ref().unwrap().cfg().kind;
    for (param, p) in m.params_mut() {
        let tower = [
            "vision_tower.embeddings.position_embedding.weight",
            "vision_tower.encoder.layers.1.self_attn.q_proj.weight",
        ];
        if kind.part(&param) == Some(VisionPart::Projector) || tower.contains(&param.as_str()) {
            p.var = Some(Var::from_tensor(&p.tensor).unwrap());
        }
    }
    let b = common::vision_batch(name);
    check_on(&m, &format!("{name}/lora+projector"), 3, &b);
}
