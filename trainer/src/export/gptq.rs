//! `export_quantization_bit`: the model quantized with GPTQ as LLaMA-Factory exports it through
//! transformers' `GPTQConfig` (optimum's quantizer): calibration windows drawn from
//! `export_quantization_dataset`, then decoder layer by decoder layer, the layer's linear
//! modules in their order of use (attention inputs, attention output, MLP inputs, MLP output),
//! each module's Hessian from its inputs with the modules before it already quantized, and the
//! next layer's inputs computed through the quantized layer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::layers::{InputSums, LinearWeight};
use crate::model::quant::gptq::{gptq, GptqConfig, Quantized};
use crate::model::quant::QuantWeight;
use crate::model::{Batch, Model};
use crate::tokenizer::HfTokenizer;
use protocol::TrainArgs;

/// LLaMA-Factory's calibration windows: `nsamples` times, a random record whose tokens number more
/// than `maxlen`, and a random window of `maxlen` tokens in it.
pub fn calibration_samples(args: &TrainArgs, tok: &HfTokenizer) -> Result<Vec<Vec<u32>>> {
    let Some(source) = args.export_quantization_dataset.as_deref() else {
        bail!("`export_quantization_bit` needs `export_quantization_dataset` (calibration texts: a file with a `text` column, or a dataset of `dataset_dir`)");
    };
    let texts = calibration_texts(source, Path::new(&args.dataset_dir))?;
    let maxlen = args.export_quantization_maxlen.max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let mut out = Vec::with_capacity(args.export_quantization_nsamples);
    for _ in 0..args.export_quantization_nsamples {
        let mut tries = 0;
        let ids = loop {
            if tries > 100 {
                bail!("Cannot find satisfying example, considering decrease `export_quantization_maxlen` (no text of {source} found longer than {maxlen} tokens in 100 tries).");
            }
            let ids = tok.encode_with_special(&texts[rng.gen_range(0..texts.len())]);
            tries += 1;
            if ids.len() > maxlen {
                break ids;
            }
        };
        let start = rng.gen_range(0..ids.len() - maxlen);
        out.push(ids[start..start + maxlen].to_vec());
    }
    Ok(out)
}

/// The texts of a file (its `text` column; a `.txt` file's lines) or of a dataset named in
/// `dataset_dir/dataset_info.json` (its prompt column).
fn calibration_texts(source: &str, dataset_dir: &Path) -> Result<Vec<String>> {
    use crate::data::dataset_info::{DatasetAttr, DatasetInfo};
    let path = Path::new(source);
    let (attr, column) = if path.is_file() {
        let abs = std::fs::canonicalize(path)?;
        let entry = serde_json::json!({"file_name": abs.display().to_string()});
        let attr = DatasetAttr::from_entry(
            source,
            entry.as_object().expect("an object"),
            Path::new(source),
        )?;
        (attr, "text".to_string())
    } else {
        let info = DatasetInfo::load(dataset_dir).with_context(|| {
            format!("`export_quantization_dataset: {source}` is neither a file nor a dataset of `dataset_dir`")
        })?;
        let attr = info.attr(source)?;
        let column = attr.prompt.clone().unwrap_or_else(|| "text".into());
        (attr, column)
    };
    let records = crate::data::loader::load_records(&attr, dataset_dir)?;
    let texts: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.value
                .get(&column)
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .filter(|t| !t.is_empty())
        .collect();
    if texts.is_empty() {
        bail!("`export_quantization_dataset: {source}`: no record has a `{column}` text");
    }
    Ok(texts)
}

/// The order optimum quantizes a block's modules in (`true_sequential`): each stage sees the
/// inputs the stages before it produce once quantized.
fn stage(name: &str) -> usize {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    match leaf {
        "q_proj" | "k_proj" | "v_proj" | "qkv_proj" | "W_pack" => 0,
        "o_proj" => 1,
        "down_proj" | "w2" => 3,
        _ => 2,
    }
}

/// Quantizes every linear module of the decoder layers with GPTQ over `samples`, leaving the
/// model computing with the quantized weights; the quantized weights by module name.
/// `progress(done, total)` follows the layers.
pub fn quantize_model(
    model: &mut Model,
    samples: &[Vec<u32>],
    cfg: &GptqConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BTreeMap<String, Quantized>> {
    for lin in model.linears() {
        let (rows, cols) = lin.weight.dims()?;
        if !(cols * cfg.bits as usize).is_multiple_of(32)
            || !(rows * cfg.bits as usize).is_multiple_of(32)
        {
            bail!(
                "{}: a {rows}×{cols} weight cannot be packed in {}-bit GPTQ (32-bit words along both sides)",
                lin.name,
                cfg.bits
            );
        }
    }
    let mut states = Vec::with_capacity(samples.len());
    for ids in samples {
        let labels = vec![-100i64; ids.len()];
        let b = Batch::pad(&[(ids.as_slice(), labels.as_slice(), None)], 0);
        states.push(model.begin_pass(
            &b,
            None,
            crate::model::layers::Weights::Policy,
            false,
            false,
        )?);
    }
    let layers = model.layers.len();
    let mut out = BTreeMap::new();
    for l in 0..layers {
        for s in 0..4 {
            let names: Vec<String> = model.layers[l]
                .linears()
                .into_iter()
                .filter(|lin| stage(&lin.name) == s)
                .map(|lin| lin.name.clone())
                .collect();
            if names.is_empty() {
                continue;
            }
            let sums: Vec<Arc<InputSums>> = names.iter().map(|_| Arc::default()).collect();
            for (lin, sum) in model.layers[l]
                .linears_mut()
                .into_iter()
                .filter(|lin| stage(&lin.name) == s)
                .zip(&sums)
            {
                lin.observer = Some(sum.clone());
            }
            for (x, pass) in states.iter_mut() {
                model.layer_forward(l, x.clone(), pass)?;
            }
            for lin in model.layers[l].linears_mut() {
                let Some(i) = names.iter().position(|n| *n == lin.name) else {
                    continue;
                };
                lin.observer = None;
                let (rows, cols) = lin.weight.dims()?;
                // AutoGPTQ's scale, 2/N Σ x xᵀ over N calibration windows; a module no token
                // reached gets zeros (all its inputs "dead", as there).
                let h = match sums[i].take() {
                    Some(sum) => (sum * (2.0 / samples.len().max(1) as f64))?,
                    None => Tensor::zeros((cols, cols), DType::F32, &model.device)?,
                };
                let w = lin.weight.to_dense(DType::F32)?;
                let q = gptq(&w, &h, cfg).with_context(|| format!("GPTQ of {}", lin.name))?;
                debug_assert_eq!((q.rows, q.cols), (rows, cols));
                lin.weight = LinearWeight::Quantized(QuantWeight::from_gptq(
                    q.clone(),
                    cfg.group_size,
                    &model.device,
                ));
                out.insert(lin.name.clone(), q);
            }
        }
        for (x, pass) in states.iter_mut() {
            *x = model.layer_forward(l, x.clone(), pass)?;
        }
        progress(l + 1, layers);
    }
    Ok(out)
}
