//! `do_predict` (generation with BLEU / ROUGE, `generated_predictions.jsonl`) and `do_eval`
//! without training (eval loss, token accuracy), writing LLaMA-Factory's result files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, D};
use protocol::{TrainArgs, WorkerEvent};
use serde_json::{json, Map, Value};

use crate::data::pipeline::get_dataset;
use crate::data::IGNORE_INDEX;
use crate::files::write_json;
use crate::infer::{generate_batch, ChatModel};
use crate::model::{Batch, RowRef};
use crate::train::report::Reporter;

fn merge_results(dir: &Path, metrics: &Map<String, Value>) -> Result<()> {
    let path = dir.join("all_results.json");
    let mut all = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    all.extend(metrics.clone());
    write_json(&path, &Value::Object(all))
}

pub(crate) fn output_dir(args: &TrainArgs) -> Result<PathBuf> {
    let d = PathBuf::from(
        args.output_dir
            .as_deref()
            .ok_or_else(|| anyhow!("`output_dir` is required"))?,
    );
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

/// Generates an answer for every eval example and scores it against the label.
pub fn run_predict(
    args: &TrainArgs,
    device: &candle_core::Device,
    rep: &mut dyn Reporter,
) -> Result<Map<String, Value>> {
    if args.eval_dataset.is_none() && args.val_size <= 0.0 {
        bail!("`do_predict` needs `eval_dataset` (or `val_size`) naming the data to predict");
    }
    let out = output_dir(args)?;
    let chat = ChatModel::load(args, device)?;
    let mut pargs = args.clone();
    pargs.predict_with_generate = true;
    let data = get_dataset(&pargs, &chat.tok, &chat.template)?;
    let rows = &data.eval;
    if rows.is_empty() {
        bail!("no examples to predict");
    }
    let stop = chat.template.stop_token_ids(&chat.tok);
    let skip = args.skip_special_tokens;
    // Examples with images are answered one at a time, their images in the prompt pass.
    let images = image_batcher(&chat, rows, args)?;
    let file = out.join("generated_predictions.jsonl");
    let mut writer = std::io::BufWriter::new(
        std::fs::File::create(&file).with_context(|| format!("cannot write {}", file.display()))?,
    );
    let mut sums: Vec<(&'static str, f64)> = Vec::new();
    let start = Instant::now();
    rep.event(&WorkerEvent::Started {
        total_steps: rows.len() as u64,
        num_examples: rows.len() as u64,
        skipped_examples: data.skipped.len() as u64,
    });
    let pad = chat.tok.pad_id().or(chat.tok.eos_id()).unwrap_or(0);
    let mut done = 0usize;
    for chunk in rows.chunks(args.per_device_eval_batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|f| f.input_ids.clone().unwrap_or_default())
            .collect();
        let outputs = match &images {
            None => generate_batch(&chat.model, &prompts, &chat.gen, &stop, pad)?,
            Some(batcher) => chunk
                .iter()
                .zip(&prompts)
                .map(|(f, prompt)| {
                    let vision = if f.images.is_empty() {
                        None
                    } else {
                        Some(batcher.row(prompt, &f.images, prompt.len())?)
                    };
                    let (ids, finish) = crate::infer::generate_with_images(
                        &chat.model,
                        prompt,
                        vision.as_ref(),
                        &chat.gen,
                        &stop,
                        |_, _| true,
                    )?;
                    let stop_id = (finish == crate::infer::FinishReason::Stop)
                        .then(|| stop.first().copied())
                        .flatten();
                    Ok(crate::infer::Generated { ids, stop: stop_id })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        for ((f, prompt), out) in chunk.iter().zip(&prompts).zip(outputs) {
            let ids = out.ids;
            let label_ids: Vec<u32> = f
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|&l| l != IGNORE_INDEX)
                .map(|l| l as u32)
                .collect();
            let predict = chat.tok.decode(&ids, skip);
            let label = chat.tok.decode(&label_ids, skip);
            let line = json!({"prompt": chat.tok.decode(prompt, false), "predict": predict, "label": label});
            writeln!(writer, "{}", crate::data::pyjson::dumps(&line, None))?;
            for (k, v) in crate::metrics::similarity(&predict, &label) {
                match sums.iter_mut().find(|(n, _)| *n == k) {
                    Some(e) => e.1 += v,
                    None => sums.push((k, v)),
                }
            }
        }
        done += chunk.len();
        let elapsed = start.elapsed().as_secs_f64();
        let eta = elapsed / done as f64 * (rows.len() - done) as f64;
        rep.event(&WorkerEvent::Progress {
            step: done as u64,
            total: rows.len() as u64,
            elapsed_s: elapsed,
            eta_s: eta,
        });
    }
    writer.flush()?;
    let runtime = start.elapsed().as_secs_f64();
    let mut metrics = Map::new();
    for (k, v) in sums {
        metrics.insert(format!("predict_{k}"), json!(v / rows.len() as f64));
    }
    metrics.insert(
        "predict_runtime".into(),
        json!((runtime * 10000.0).round() / 10000.0),
    );
    metrics.insert(
        "predict_samples_per_second".into(),
        json!(((rows.len() as f64 / runtime) * 1000.0).round() / 1000.0),
    );
    write_json(
        &out.join("predict_results.json"),
        &Value::Object(metrics.clone()),
    )?;
    merge_results(&out, &metrics)?;
    Ok(metrics)
}

/// What turns the examples' images into model inputs, when they have images.
fn image_batcher(
    chat: &ChatModel,
    rows: &[crate::data::processor::Features],
    args: &TrainArgs,
) -> Result<Option<crate::data::media::ImageBatcher>> {
    if rows.iter().all(|f| f.images.is_empty()) {
        return Ok(None);
    }
    crate::data::media::ImageBatcher::for_model(
        chat.model.cfg.vision.as_ref(),
        &chat.tok.dir,
        args.image_max_pixels,
        args.image_min_pixels,
    )
    .map(Some)
}

/// Eval loss (and token accuracy when `compute_accuracy`) of the model on the eval set.
pub fn run_eval(args: &TrainArgs, device: &candle_core::Device) -> Result<Map<String, Value>> {
    let out = output_dir(args)?;
    let chat = ChatModel::load(args, device)?;
    let data = get_dataset(args, &chat.tok, &chat.template)?;
    if data.eval.is_empty() {
        bail!("`do_eval` needs `eval_dataset` (or `val_size`)");
    }
    let pad = chat.tok.pad_id().or(chat.tok.eos_id()).unwrap_or(0);
    let images = image_batcher(&chat, &data.eval, args)?;
    let (mut loss, mut n, mut correct) = (0.0, 0usize, 0usize);
    for chunk in data.eval.chunks(args.per_device_eval_batch_size.max(1)) {
        let owned: Vec<(Vec<u32>, Vec<i64>)> = chunk
            .iter()
            .filter_map(|f| {
                let ids = f.input_ids.clone()?;
                Some((
                    ids.clone(),
                    f.labels
                        .clone()
                        .unwrap_or_else(|| ids.iter().map(|&x| x as i64).collect()),
                ))
            })
            .collect();
        let refs: Vec<RowRef> = owned
            .iter()
            .map(|(i, l)| (i.as_slice(), l.as_slice(), None))
            .collect();
        let mut b = Batch::pad(&refs, pad);
        if let Some(batcher) = &images {
            let rows: Vec<(&[u32], &[String])> = chunk
                .iter()
                .filter(|f| f.input_ids.is_some())
                .zip(&owned)
                .map(|(f, (ids, _))| (ids.as_slice(), f.images.as_slice()))
                .collect();
            b.vision = Some(batcher.batch(&rows, b.seq)?);
        }
        let Some(t) = chat.model.target_logits(&b, None)? else {
            continue;
        };
        loss -= t
            .token_logps()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let pred: Vec<u32> = t.logits()?.argmax(D::Minus1)?.to_vec1()?;
        correct += pred.iter().zip(&t.targets).filter(|(a, b)| a == b).count();
        n += t.targets.len();
    }
    let mut metrics = Map::new();
    let eval_loss = loss / n.max(1) as f64;
    metrics.insert("eval_loss".into(), json!(eval_loss));
    if args.compute_accuracy {
        metrics.insert(
            "eval_accuracy".into(),
            json!(correct as f64 / n.max(1) as f64),
        );
    }
    if args.stage == protocol::args::Stage::Pt {
        metrics.insert("eval_perplexity".into(), json!(eval_loss.exp()));
    }
    write_json(
        &out.join("eval_results.json"),
        &Value::Object(metrics.clone()),
    )?;
    merge_results(&out, &metrics)?;
    Ok(metrics)
}
