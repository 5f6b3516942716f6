//! What the trainer's integration tests share: the repository root, the reference model
//! variants and small batches.
#![allow(dead_code)]

use std::path::PathBuf;

use trainer::model::{Batch, RowRef};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Two rows of different lengths, prompts masked, one padded.
pub fn batch() -> Batch {
    let a: Vec<u32> = vec![3, 17, 42, 5, 88, 9, 61, 23];
    let b: Vec<u32> = vec![11, 2, 95, 33, 70, 4];
    let la: Vec<i64> = vec![-100, -100, -100, 5, 88, 9, 61, 23];
    let lb: Vec<i64> = vec![-100, -100, 95, 33, 70, 4];
    let rows: Vec<RowRef> = vec![(&a, &la, None), (&b, &lb, None)];
    Batch::pad(&rows, 0)
}

/// The tiny reference models in `tests/fixtures/models` (`scripts/make_reference_models.py`),
/// one or more per supported family.
pub const MODEL_VARIANTS: [&str; 15] = [
    "llama",
    "llama3_scaled_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "glm",
    "glm4",
    "baichuan2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
];

/// Rows trained on every token (labels = ids), padded with 0.
pub fn full_rows(rows: &[Vec<u32>]) -> Batch {
    rows_with_prompt(rows, 0)
}

/// Rows whose first `prompt_len` tokens are a prompt (label -100) and the rest trained (labels =
/// ids), padded with 0.
pub fn rows_with_prompt(rows: &[Vec<u32>], prompt_len: usize) -> Batch {
    let labels: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, &t)| if i < prompt_len { -100 } else { t as i64 })
                .collect()
        })
        .collect();
    let refs: Vec<RowRef> = rows
        .iter()
        .zip(&labels)
        .map(|(r, l)| (r.as_slice(), l.as_slice(), None))
        .collect();
    Batch::pad(&refs, 0)
}

/// The row with two images of the vision-language reference model `name` (`qwen2_vl`,
/// `qwen2_5_vl` in `tests/fixtures/models`), through our decoder, LLaMA-Factory's regularization
/// and the processor, every token trained.
pub fn vision_batch(name: &str) -> Batch {
    use trainer::vision::{decode, qwen2_vl};
    let root = repo().join("tests/fixtures");
    let e: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("models").join(name).join("expected.json")).unwrap(),
    )
    .unwrap();
    let llava = name == "llava";
    let processor = qwen2_vl::Qwen2VlProcessor::default();
    let clip = trainer::vision::clip::ClipProcessor::load(&root.join("models").join(name), 14);
    let (mut pixel_values, mut grids) = (Vec::new(), Vec::new());
    for name in e["images"].as_array().unwrap() {
        let img = decode::load(&root.join("vision").join(name.as_str().unwrap())).unwrap();
        let (max, min) = (
            e["image_max_pixels"].as_u64().unwrap() as usize,
            e["image_min_pixels"].as_u64().unwrap() as usize,
        );
        let p = if llava {
            let img = trainer::vision::clip::regularize(img, max, min);
            clip.as_ref().unwrap().preprocess(&img).unwrap()
        } else {
            processor
                .preprocess(&qwen2_vl::regularize(img, max, min))
                .unwrap()
        };
        pixel_values.extend(p.pixel_values);
        grids.push(p.grid);
    }
    let ids = token_ids(&e["input_ids"]);
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let mut b = Batch::pad(&[(&ids, &labels, None)], 0);
    b.vision = Some(trainer::model::VisionBatch {
        mrope_positions: if llava {
            Vec::new()
        } else {
            trainer::model::vision::mrope_positions(&ids, &grids, 150, 2).unwrap()
        },
        pixel_values,
        grids,
    });
    b
}

/// A fixture's JSON array of token ids.
pub fn token_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Checks LoRA factors `(a, b)` against a reference `(want_a, want_b)` built from the same
/// singular triplets, within `tol`: each rank-one pair (row of A, column of B) up to the joint
/// sign an SVD leaves free.
pub fn assert_factors_match(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    want_a: &candle_core::Tensor,
    want_b: &candle_core::Tensor,
    tol: f32,
    what: &str,
) {
    for i in 0..a.dim(0).unwrap() {
        let (ra, wa) = (a.get(i).unwrap(), want_a.get(i).unwrap());
        let flipped = wa.neg().unwrap();
        let sign = if max_diff(&ra, &wa) < max_diff(&ra, &flipped) {
            1.0
        } else {
            -1.0
        };
        assert!(
            max_diff(&ra, &(&wa * sign).unwrap()) < tol,
            "{what}: A row {i}"
        );
        let (rb, wb) = (b.narrow(1, i, 1).unwrap(), want_b.narrow(1, i, 1).unwrap());
        assert!(
            max_diff(&rb, &(&wb * sign).unwrap()) < tol,
            "{what}: B column {i}"
        );
    }
}

/// The 50-step LoRA run on the demo data that the switch tests compare (fused vs composed
/// kernels, bf16 vs f32 products): a demo model in `base`, outputs in `out`.
pub fn demo_lora_args(base: &std::path::Path, out: PathBuf) -> protocol::TrainArgs {
    protocol::TrainArgs {
        model_name_or_path: Some(base.display().to_string()),
        dataset: Some("demo_sft".into()),
        dataset_dir: repo().join("data").display().to_string(),
        template: Some("qwen".into()),
        cutoff_len: 64,
        per_device_train_batch_size: 4,
        gradient_accumulation_steps: 1,
        max_steps: 50,
        logging_steps: 1,
        learning_rate: 2e-3,
        save_strategy: protocol::args::IntervalStrategy::No,
        output_dir: Some(out.display().to_string()),
        do_train: true,
        ..protocol::TrainArgs::default()
    }
}

/// How far curve `a` (with unrounded mean loss `mean_a`) is from the reference `b`: the largest
/// relative difference of the logged losses, and the relative difference of the means.
pub fn curve_gaps(a: &[f64], b: &[f64], mean_a: f64, mean_b: f64) -> (f64, f64) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / y).abs())
        .fold(0.0, f64::max);
    (worst, ((mean_a - mean_b) / mean_b).abs())
}

/// The logged losses of a run and its unrounded mean training loss.
pub fn loss_curve(args: &protocol::TrainArgs) -> (Vec<f64>, f64) {
    struct Losses(Vec<f64>);
    impl trainer::train::report::Reporter for Losses {
        fn event(&mut self, e: &protocol::WorkerEvent) {
            if let protocol::WorkerEvent::Step(m) = e {
                self.0.push(m.loss);
            }
        }
    }
    let mut rep = Losses(Vec::new());
    let outcome =
        trainer::train::run_training(args, &trainer::train::TrainOptions::default(), &mut rep)
            .unwrap();
    let trainer::train::Outcome::Finished(m) = outcome else {
        panic!("{outcome:?}")
    };
    (rep.0, m["train_loss"].as_f64().unwrap())
}
