//! `stage: rm` with `do_predict`: scores the chosen and rejected answer of each held-out pair with
//! the trained value head and writes `generated_predictions.jsonl` lines `{"chosen", "rejected"}`
//! like LLaMA-Factory, plus the ranking accuracy.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use protocol::{TrainArgs, WorkerEvent};
use serde_json::{json, Map, Value};

use super::batch::{make_batch, pair_rows, Row};
use super::report::Reporter;
use crate::data::pipeline::get_dataset;
use crate::infer::ChatModel;
use crate::model::value_head::{ValueHead, VALUE_HEAD_FILE};

pub fn run(
    args: &TrainArgs,
    device: &Device,
    rep: &mut dyn Reporter,
) -> Result<Map<String, Value>> {
    if args.eval_dataset.is_none() && args.val_size <= 0.0 {
        bail!("`do_predict` needs `eval_dataset` (or `val_size`) naming the pairs to score");
    }
    let out = crate::predict::output_dir(args)?;
    let chat = ChatModel::load(args, device)?;
    // The value head sits next to the last adapter (LoRA) or in the model folder (full).
    let head_dir = TrainArgs::split_list(args.adapter_name_or_path.as_deref())
        .last()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| chat.dir.clone());
    if !head_dir.join(VALUE_HEAD_FILE).exists() {
        bail!(
            "{} has no {VALUE_HEAD_FILE}: score with the output of a `stage: rm` run",
            head_dir.display()
        );
    }
    let head = ValueHead::load(Path::new(&head_dir), DType::F32, device)?;
    let data = get_dataset(args, &chat.tok, &chat.template)?;
    let (chosen, rejected) = pair_rows(&data.eval);
    if chosen.is_empty() {
        bail!("no pairs to score");
    }
    let pad = chat.tok.pad_id().or(chat.tok.eos_id()).unwrap_or(0);
    let file = out.join("generated_predictions.jsonl");
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&file).with_context(|| format!("cannot write {}", file.display()))?,
    );
    rep.event(&WorkerEvent::Started {
        total_steps: chosen.len() as u64,
        num_examples: chosen.len() as u64,
        skipped_examples: data.skipped.len() as u64,
    });
    let start = Instant::now();
    let bs = args.per_device_eval_batch_size.max(1);
    let (mut right, mut done) = (0usize, 0usize);
    for (c, r) in chosen.chunks(bs).zip(rejected.chunks(bs)) {
        let rows: Vec<&Row> = c.iter().chain(r.iter()).collect();
        let s: Vec<f64> = head
            .scores(&chat.model, &make_batch(&rows, pad), None)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        for i in 0..c.len() {
            let (sc, sr) = (s[i], s[c.len() + i]);
            right += usize::from(sc > sr);
            writeln!(w, "{}", json!({"chosen": sc, "rejected": sr}))?;
        }
        done += c.len();
        let elapsed = start.elapsed().as_secs_f64();
        rep.event(&WorkerEvent::Progress {
            step: done as u64,
            total: chosen.len() as u64,
            elapsed_s: elapsed,
            eta_s: elapsed / done as f64 * (chosen.len() - done) as f64,
        });
    }
    w.flush()?;
    let runtime = start.elapsed().as_secs_f64();
    let mut m = Map::new();
    m.insert(
        "predict_accuracy".into(),
        json!(right as f64 / chosen.len() as f64),
    );
    m.insert("predict_runtime".into(), json!(runtime));
    m.insert(
        "predict_samples_per_second".into(),
        json!(chosen.len() as f64 / runtime.max(1e-9)),
    );
    crate::files::write_json(&out.join("predict_results.json"), &Value::Object(m.clone()))?;
    Ok(m)
}
