//! `llamafactory export`: merge adapters into the base weights and write a Hugging Face folder
//! (sharded safetensors, config, generation config, tokenizer with chat template) plus an
//! Ollama `Modelfile`, as LLaMA-Factory's export does.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

pub mod gguf;
pub mod gptq;

pub use crate::model::quant::gptq::GptqConfig;

use crate::files::{write_json, write_sharded};
use crate::infer::ChatModel;
use protocol::args::{Choice, ExportFormat, InferDtype};
use protocol::TrainArgs;

fn export_dtype(args: &TrainArgs, config_dtype: &str) -> Result<(DType, &'static str)> {
    let name = match args.infer_dtype {
        InferDtype::Auto => config_dtype,
        other => other.as_str(),
    };
    Ok(match name {
        "float32" | "fp32" => (DType::F32, "float32"),
        "bfloat16" | "bf16" => (DType::BF16, "bfloat16"),
        "float16" | "fp16" => (DType::F16, "float16"),
        other => {
            bail!("the model's config.json gives `torch_dtype: {other}`; set `infer_dtype` to float32, bfloat16 or float16")
        }
    })
}

/// Writes the merged model; returns the files written.
pub fn export_model(args: &TrainArgs) -> Result<Vec<PathBuf>> {
    export_model_with(args, &mut |done, total| {
        eprintln!("GPTQ: {done}/{total} layers quantized");
    })
}

/// [`export_model`], telling `progress(done, total)` how many decoder layers GPTQ has
/// quantized (`export_quantization_bit`).
pub fn export_model_with(
    args: &TrainArgs,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<PathBuf>> {
    let dir = PathBuf::from(
        args.export_dir
            .as_deref()
            .ok_or_else(|| anyhow!("`export_dir` is required"))?,
    );
    if args.export_legacy_format {
        bail!("`export_legacy_format` (PyTorch .bin files) is not supported; remove it to export safetensors");
    }
    let gptq_cfg = match args.export_quantization_bit {
        None => None,
        Some(b @ (2 | 3 | 4 | 8)) => Some(GptqConfig::new(b)),
        Some(b) => bail!("`export_quantization_bit: {b}`: GPTQ exports 2, 3, 4 or 8 bits"),
    };
    if gptq_cfg.is_some() {
        if args.adapter_name_or_path.is_some() {
            bail!("Please merge adapters before quantizing the model. (`export_quantization_bit` quantizes a full model: export the merged model first, then quantize that folder)");
        }
        if args.export_format == ExportFormat::Gguf {
            bail!("`export_quantization_bit` (GPTQ) writes safetensors; a quantized GGUF comes from `export_gguf_type` (q8_0, q4_k_m, …)");
        }
        if args.export_quantization_dataset.is_none() {
            bail!("Please choose a dataset. (`export_quantization_bit` needs `export_quantization_dataset`: the calibration texts)");
        }
    }
    // Adapters merge into the full-precision base: a QLoRA run's `quantization_bit` does not
    // apply to the export (as in LLaMA-Factory, which refuses to merge into a quantized model).
    if args.quantization_bit.is_some() {
        eprintln!("warning: `quantization_bit` is ignored by export: adapters are merged into the full-precision base");
    }
    let unquantized = TrainArgs {
        quantization_bit: None,
        ..args.clone()
    };
    let args = &unquantized;
    let mut chat = ChatModel::load(args, &Device::Cpu)?;
    if args.export_format == ExportFormat::Gguf
        && args.export_gguf_type == gguf::GgufType::Base
        && crate::model::gguf::source_of(&chat.dir).is_none()
    {
        bail!(
            "`export_gguf_type: base` re-quantizes to the types of a GGUF base, but `model_name_or_path` ({}) is not a GGUF file; choose f16, q8_0 or q4_k_m",
            chat.dir.display()
        );
    }
    if args.export_format == ExportFormat::Gguf {
        gguf::arch(&chat.model.cfg)?;
    }
    if gptq_cfg.is_some() && chat.model.quantized().next().is_some() {
        bail!(
            "{} is already quantized ({}); GPTQ quantizes a full-precision model",
            chat.dir.display(),
            chat.model
                .quantized()
                .next()
                .map(|q| q.format.describe())
                .unwrap_or_default()
        );
    }
    let dequantized = chat.model.dequantize_all()?;
    if dequantized > 0 {
        eprintln!(
            "warning: the base's weights are quantized (a GGUF file): the export holds their dequantized values ({dequantized} linear weights), with the adapter merged into them"
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match args.export_format {
        ExportFormat::Safetensors => {}
        ExportFormat::Gguf => {
            let kind = args.export_gguf_type;
            let stem = dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            let path = dir.join(format!("{stem}-{}.gguf", args.export_gguf_type));
            gguf::write_gguf(&chat, &path, kind)?;
            let modelfile = chat.template.ollama_modelfile(&chat.tok).replace(
                "FROM .",
                &format!(
                    "FROM ./{}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
            );
            std::fs::write(dir.join("Modelfile"), modelfile)?;
            return Ok(vec![path, dir.join("Modelfile")]);
        }
    }
    let (dtype, dtype_name) = match gptq_cfg {
        // transformers saves a GPTQ model in float16, as LLaMA-Factory's export does.
        Some(_) => (DType::F16, "float16"),
        None => export_dtype(args, &chat.model.cfg.torch_dtype)?,
    };
    let quantized = match &gptq_cfg {
        Some(cfg) => {
            let samples = gptq::calibration_samples(args, &chat.tok)?;
            eprintln!(
                "GPTQ: {}-bit, groups of 128, {} calibration windows of {} tokens",
                cfg.bits,
                samples.len(),
                args.export_quantization_maxlen
            );
            gptq::quantize_model(&mut chat.model, &samples, cfg, progress)?
        }
        None => BTreeMap::new(),
    };
    let mut tensors: BTreeMap<String, Tensor> = chat
        .model
        .checkpoint_params()
        .into_iter()
        .map(|(k, p)| Ok((k, p.tensor.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    for (name, q) in &quantized {
        for (part, t) in q.to_tensors()? {
            tensors.insert(chat.model.cfg.layout.file(&format!("{name}.{part}")), t);
        }
    }
    let max_bytes = (args.export_size as u64).max(1) * 1_000_000_000;
    let mut files = write_sharded(&dir, &tensors, max_bytes)?;
    let mut cfg = Value::Object(chat.model.cfg.raw.clone());
    cfg["torch_dtype"] = json!(dtype_name);
    if cfg.get("dtype").is_some() {
        cfg["dtype"] = json!(dtype_name);
    }
    match &gptq_cfg {
        Some(q) => cfg["quantization_config"] = q.to_json(),
        // Written dense (a GPTQ base dequantized, adapters merged into it): no longer quantized.
        None => {
            if let Some(c) = cfg.as_object_mut() {
                c.remove("quantization_config");
            }
        }
    }
    write_json(&dir.join("config.json"), &cfg)?;
    let gen = chat.dir.join("generation_config.json");
    if gen.exists() {
        std::fs::copy(&gen, dir.join("generation_config.json"))?;
    } else {
        let eos = chat.template.stop_token_ids(&chat.tok);
        write_json(
            &dir.join("generation_config.json"),
            &json!({"eos_token_id": eos, "do_sample": true}),
        )?;
    }
    chat.tok.config.insert("padding_side".into(), json!("left"));
    chat.tok.save(&dir)?;
    copy_remote_code(&chat.dir, &dir)?;
    std::fs::write(
        dir.join("Modelfile"),
        chat.template.ollama_modelfile(&chat.tok),
    )?;
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "Modelfile",
    ] {
        if dir.join(f).exists() {
            files.push(dir.join(f));
        }
    }
    if dir.join("model.safetensors.index.json").exists() {
        files.push(dir.join("model.safetensors.index.json"));
    }
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".py")
            || matches!(
                name.as_str(),
                "tokenizer.model" | "preprocessor_config.json" | "processor_config.json"
            )
        {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// A remote-code checkpoint's Python files (Baichuan 2's `modeling_baichuan.py`, …), which
/// transformers needs next to the exported weights (`config.json`'s `auto_map` names them).
fn copy_remote_code(src: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(src) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "py") {
            std::fs::copy(&path, dir.join(entry.file_name()))
                .with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(())
}
