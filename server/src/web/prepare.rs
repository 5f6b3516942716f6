//! From a browser's argument object to checked `TrainArgs`: every key checked like a YAML key
//! (errors name the field), paths canonicalized and required to be what they claim, output dirs
//! kept inside the work dir's `saves/` unless the user gave an absolute path.

use std::path::{Component, Path, PathBuf};

use protocol::args::Stage;
use protocol::run::RunKind;
use protocol::TrainArgs;
use serde_json::{Map, Value};
use trainer::model::value_head::VALUE_HEAD_FILE;

use super::error::{ApiError, ApiResult};

/// Checks each key alone so the error can name it.
pub fn parse_args(values: Map<String, Value>) -> ApiResult<TrainArgs> {
    for (k, v) in &values {
        let one: Map<String, Value> = [(k.clone(), v.clone())].into_iter().collect();
        if let Err(e) = trainer::config::args_from_json(one) {
            return Err(ApiError::field(k.clone(), format!("{e:#}")));
        }
    }
    trainer::config::args_from_json(values).map_err(|e| ApiError::bad(format!("{e:#}")))
}

fn canonical(workdir: &Path, p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        workdir.join(path)
    };
    full.canonicalize().ok()
}

/// A model folder with `config.json`, or a hub id found in the local Hugging Face cache.
pub fn model_dir(workdir: &Path, value: &str) -> ApiResult<PathBuf> {
    let field = "model_name_or_path";
    if value.trim().is_empty() {
        return Err(ApiError::field(
            field,
            "choose a model (a folder with config.json or a Hugging Face id)",
        ));
    }
    if let Some(dir) = canonical(workdir, value) {
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        if let Some(file) = trainer::model::gguf::gguf_file(&dir) {
            return trainer::model::gguf::materialize(&file)
                .map_err(|e| ApiError::field(field, format!("{e:#}")));
        }
        return Err(ApiError::field(
            field,
            format!(
                "{} is not a model folder: it has no config.json",
                dir.display()
            ),
        ));
    }
    if value.matches('/').count() == 1 && !value.starts_with(['.', '/']) {
        return trainer::hub::resolve_model_dir(value, "main")
            .map_err(|e| ApiError::field(field, format!("{e:#}")));
    }
    Err(ApiError::field(
        field,
        format!("model folder {value} does not exist"),
    ))
}

/// Adapter folders (comma-separated), each with `adapter_config.json` or `config.json`.
fn adapter_dirs(workdir: &Path, value: &str) -> ApiResult<String> {
    let field = "adapter_name_or_path";
    let mut out = Vec::new();
    for a in TrainArgs::split_list(Some(value)) {
        let dir = canonical(workdir, &a).ok_or_else(|| {
            ApiError::field(field, format!("checkpoint folder {a} does not exist"))
        })?;
        if !dir.join("adapter_config.json").is_file() && !dir.join("config.json").is_file() {
            return Err(ApiError::field(
                field,
                format!(
                    "{} is not a checkpoint: it has neither adapter_config.json nor config.json",
                    dir.display()
                ),
            ));
        }
        out.push(dir.to_string_lossy().into_owned());
    }
    Ok(out.join(","))
}

/// PPO's reward model: one folder with the `value_head.safetensors` that `stage: rm` writes.
fn reward_model_dir(workdir: &Path, value: &str) -> ApiResult<String> {
    let field = "reward_model";
    let dirs = TrainArgs::split_list(Some(value));
    let [one] = dirs.as_slice() else {
        return Err(ApiError::field(
            field,
            if dirs.is_empty() {
                "Please select a reward model.".to_string()
            } else {
                format!("choose one reward model, not {}", dirs.len())
            },
        ));
    };
    let dir = canonical(workdir, one).ok_or_else(|| {
        ApiError::field(field, format!("reward model folder {one} does not exist"))
    })?;
    if !dir.join(VALUE_HEAD_FILE).is_file() {
        return Err(ApiError::field(
            field,
            format!(
                "{} is not a reward model: it has no value_head.safetensors (train one with the Reward Modeling stage)",
                dir.display()
            ),
        ));
    }
    Ok(dir.to_string_lossy().into_owned())
}

/// A dataset dir with `dataset_info.json`.
pub fn dataset_dir(workdir: &Path, value: &str) -> ApiResult<PathBuf> {
    let field = "dataset_dir";
    let dir = canonical(workdir, value)
        .ok_or_else(|| ApiError::field(field, format!("dataset dir {value} does not exist")))?;
    if !dir.join("dataset_info.json").is_file() {
        return Err(ApiError::field(
            field,
            format!(
                "{} is not a dataset dir: it has no dataset_info.json",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

fn check_datasets(dir: &Path, field: &str, value: Option<&str>) -> ApiResult<()> {
    let names = TrainArgs::split_list(value);
    if names.is_empty() {
        return Ok(());
    }
    let info = trainer::data::dataset_info::DatasetInfo::load(dir)
        .map_err(|e| ApiError::field("dataset_dir", format!("{e:#}")))?;
    for n in names {
        info.attr(&n)
            .map_err(|e| ApiError::field(field, format!("{e:#}")))?;
    }
    Ok(())
}

/// A relative output dir lives under `<workdir>/saves/`; `..` may not climb out of it. An
/// absolute path is the user's explicit choice and is kept.
pub fn output_dir(workdir: &Path, field: &str, value: &str) -> ApiResult<PathBuf> {
    let p = Path::new(value);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    if p.components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ApiError::field(
            field,
            format!("{value}: a relative output dir may not contain `..`; give an absolute path to write elsewhere"),
        ));
    }
    let rel = p.strip_prefix("saves").unwrap_or(p);
    if rel.as_os_str().is_empty() {
        return Err(ApiError::field(field, "name the output dir"));
    }
    Ok(workdir.join("saves").join(rel))
}

/// LlamaBoard's layout: a bare name goes to `saves/<model>/<finetuning_type>/<name>`, where the
/// checkpoint picker finds it; a path with folders is kept as given under `saves/`.
fn run_dir(workdir: &Path, args: &TrainArgs, value: &str) -> ApiResult<PathBuf> {
    let p = Path::new(value);
    if !p.is_absolute() && p.components().count() == 1 && !value.starts_with('.') {
        let label = model_label(args.model_name_or_path.as_deref().unwrap_or("model"));
        let grouped = format!("{label}/{}/{value}", args.finetuning_type);
        return output_dir(workdir, "output_dir", &grouped);
    }
    output_dir(workdir, "output_dir", value)
}

/// The name a model's saves are grouped under, like LlamaBoard's `saves/<model>/<method>/`.
pub fn model_label(model: &str) -> String {
    Path::new(model.trim_end_matches('/'))
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn default_dir(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        chrono::Local::now().format("%Y-%m-%d-%H-%M-%S")
    )
}

/// GPTQ's calibration texts (LlamaBoard's checks): no adapters (they merge first), and a dataset
/// of the dataset dir or a file of the work dir, made absolute.
fn calibration_source(workdir: &Path, args: &mut TrainArgs) -> ApiResult<()> {
    let field = "export_quantization_dataset";
    if args.adapter_name_or_path.is_some() {
        return Err(ApiError::field(
            "export_quantization_bit",
            "Please merge adapters before quantizing the model.",
        ));
    }
    let source = args
        .export_quantization_dataset
        .clone()
        .unwrap_or_default()
        .trim()
        .to_string();
    if source.is_empty() {
        return Err(ApiError::field(field, "Please choose a dataset."));
    }
    let dir = dataset_dir(workdir, &args.dataset_dir)?;
    args.dataset_dir = dir.to_string_lossy().into_owned();
    let named = trainer::data::dataset_info::DatasetInfo::load(&dir)
        .is_ok_and(|info| info.names().any(|n| n == source));
    if named {
        return Ok(());
    }
    match canonical(workdir, &source).filter(|p| p.is_file()) {
        Some(file) => {
            args.export_quantization_dataset = Some(file.to_string_lossy().into_owned());
            Ok(())
        }
        None => Err(ApiError::field(
            field,
            format!(
                "`{source}` is neither a dataset of {} nor a file",
                dir.display()
            ),
        )),
    }
}

/// Checks and completes the arguments of a job of `kind`; `None` prepares a chat model load.
pub fn prepare(
    workdir: &Path,
    kind: Option<&RunKind>,
    values: Map<String, Value>,
) -> ApiResult<TrainArgs> {
    let mut args = parse_args(values)?;
    let model = model_dir(workdir, args.model_name_or_path.as_deref().unwrap_or(""))?;
    let given_model = args.model_name_or_path.clone().unwrap_or_default();
    // A hub id stays an id (the worker resolves it the same way); a folder becomes absolute,
    // and a GGUF file stays the file (its stand-in folder is the cache's business).
    if let Some(p) = canonical(workdir, &given_model) {
        let shown = trainer::model::gguf::gguf_file(&p).unwrap_or(model);
        args.model_name_or_path = Some(shown.to_string_lossy().into_owned());
    }
    if let Some(a) = args
        .adapter_name_or_path
        .clone()
        .filter(|a| !a.trim().is_empty())
    {
        args.adapter_name_or_path = Some(adapter_dirs(workdir, &a)?);
    } else {
        args.adapter_name_or_path = None;
    }
    if let Some(n) = args.nproc_per_node.filter(|&n| n > 1) {
        if kind != Some(&RunKind::Train) {
            return Err(ApiError::field(
                "nproc_per_node",
                "several devices train only; prediction and export run in one process",
            ));
        }
        let gpus = trainer::device::cuda_device_count();
        if gpus > 0 && n > gpus {
            return Err(ApiError::field(
                "nproc_per_node",
                format!("this machine has {gpus} GPUs (one rank per GPU)"),
            ));
        }
        if gpus == 0 && !cfg!(feature = "mpi") {
            return Err(ApiError::field("nproc_per_node", "several CPU ranks need the MPI engine: build with `--features mpi` (Open MPI installed)"));
        }
    }
    match kind {
        Some(RunKind::Train) | Some(RunKind::Predict) => {
            let dir = dataset_dir(workdir, &args.dataset_dir)?;
            args.dataset_dir = dir.to_string_lossy().into_owned();
            if kind == Some(&RunKind::Train) {
                args.do_train = true;
                if args.stage == Stage::Ppo {
                    args.reward_model = Some(reward_model_dir(
                        workdir,
                        args.reward_model.as_deref().unwrap_or(""),
                    )?);
                }
                if args.dataset.as_deref().unwrap_or("").trim().is_empty() {
                    return Err(ApiError::field("dataset", "choose at least one dataset"));
                }
            } else {
                args.do_train = false;
                if !args.do_eval {
                    args.do_predict = true;
                }
                args.predict_with_generate = args.do_predict;
                if args.eval_dataset.is_none() {
                    args.eval_dataset = args.dataset.take();
                }
                if args.eval_dataset.as_deref().unwrap_or("").trim().is_empty() {
                    return Err(ApiError::field(
                        "eval_dataset",
                        "choose at least one dataset",
                    ));
                }
            }
            check_datasets(&dir, "dataset", args.dataset.as_deref())?;
            check_datasets(&dir, "eval_dataset", args.eval_dataset.as_deref())?;
            let out = match args.output_dir.as_deref().filter(|d| !d.trim().is_empty()) {
                Some(d) => d.to_string(),
                None => default_dir(if kind == Some(&RunKind::Train) {
                    "train"
                } else {
                    "eval"
                }),
            };
            args.output_dir = Some(
                run_dir(workdir, &args, &out)?
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        Some(RunKind::Export) => {
            let out = match args.export_dir.as_deref().filter(|d| !d.trim().is_empty()) {
                Some(d) => d.to_string(),
                None => format!(
                    "{}/{}",
                    model_label(args.model_name_or_path.as_deref().unwrap_or("model")),
                    default_dir("export")
                ),
            };
            args.export_dir = Some(
                output_dir(workdir, "export_dir", &out)?
                    .to_string_lossy()
                    .into_owned(),
            );
            if args.export_quantization_bit.is_some() {
                calibration_source(workdir, &mut args)?;
            }
        }
        None => {}
    }
    if kind.is_some() {
        trainer::config::validate(&args)?;
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_output_dirs_stay_in_saves() {
        let w = Path::new("/w");
        assert_eq!(
            output_dir(w, "output_dir", "demo/lora/x").unwrap(),
            Path::new("/w/saves/demo/lora/x")
        );
        assert_eq!(
            output_dir(w, "output_dir", "saves/demo/x").unwrap(),
            Path::new("/w/saves/demo/x")
        );
        assert_eq!(
            output_dir(w, "output_dir", "/tmp/x").unwrap(),
            Path::new("/tmp/x")
        );
        let e = output_dir(w, "output_dir", "../../etc").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("output_dir"));
    }

    #[test]
    fn a_broken_rule_names_its_key_as_the_field() {
        let values: Map<String, Value> = serde_json::from_str(
            r#"{"model_name_or_path": "/", "finetuning_type": "full", "use_dora": true}"#,
        )
        .unwrap();
        let args = parse_args(values).unwrap();
        let e: ApiError = trainer::config::validate(&args).unwrap_err().into();
        assert_eq!(e.field.as_deref(), Some("use_dora"));
        assert_eq!(e.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
    }
}
