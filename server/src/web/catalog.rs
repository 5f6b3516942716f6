//! What the forms choose from: models (work dir, configured dirs, Hugging Face cache, demo),
//! templates, datasets with a paged preview, checkpoints, and user settings.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::Json;
use protocol::run::{CheckpointEntry, DatasetEntry, DatasetPage, ModelEntry};
use serde::Deserialize;
use serde_json::{Map, Value};
use trainer::data::dataset_info::{DatasetInfo, Formatting};
use trainer::data::template::auto::auto_template;
use trainer::model::value_head::VALUE_HEAD_FILE;

use super::error::{ApiError, ApiResult, Body, Query, UrlPath};
use super::prepare::{dataset_dir, model_label};
use super::AppState;

fn read_config(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()
}

fn entry(path: String, name: String, source: &str, dir: &Path) -> ModelEntry {
    let cfg = read_config(dir).unwrap_or_default();
    let auto = auto_template(dir);
    ModelEntry {
        path,
        name,
        source: source.into(),
        model_type: cfg
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        template: auto.name,
        template_reason: auto.reason,
    }
}

/// Model folders directly inside `root` (and `root` itself).
fn scan(root: &Path, source: &str, out: &mut Vec<ModelEntry>) {
    let mut dirs = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        let mut children: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        children.sort();
        dirs.extend(children);
    }
    for d in dirs {
        if d.join("config.json").is_file() {
            let name = model_label(&d.to_string_lossy());
            let src = if name == "demo" { "demo" } else { source };
            out.push(entry(d.to_string_lossy().into_owned(), name, src, &d));
        } else if let Some(file) = trainer::model::gguf::gguf_file(&d) {
            // A GGUF file (Ollama, LM Studio, llama.cpp) is listed with what it stands for.
            if let Ok(stand_in) = trainer::model::gguf::materialize(&file) {
                let name = model_label(&file.to_string_lossy());
                out.push(entry(
                    file.to_string_lossy().into_owned(),
                    name,
                    "gguf",
                    &stand_in,
                ));
            }
        }
    }
}

pub fn list_models(workdir: &Path, extra_dirs: &[String]) -> Vec<ModelEntry> {
    let mut out = Vec::new();
    scan(&workdir.join("models"), "local", &mut out);
    for d in extra_dirs {
        scan(Path::new(d), "local", &mut out);
    }
    if let Some(cache) = trainer::hub::hub_cache_dir() {
        if let Ok(rd) = std::fs::read_dir(&cache) {
            let mut repos: Vec<String> = rd
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("models--")
                        .map(str::to_string)
                })
                .collect();
            repos.sort();
            for r in repos {
                let id = r.replacen("--", "/", 1);
                if let Some(snap) = trainer::hub::cached_snapshot(&cache, &id, "main") {
                    if snap.join("config.json").is_file() {
                        out.push(entry(id.clone(), id, "hf_cache", &snap));
                    }
                }
            }
        }
    }
    out.dedup_by(|a, b| a.path == b.path);
    out
}

async fn extra_model_dirs(app: &AppState) -> Vec<String> {
    app.manager
        .db()
        .settings()
        .await
        .ok()
        .and_then(|s| s.get("model_dirs").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

#[utoipa::path(get, path = "/api/models", responses((status = 200, body = Vec<ModelEntry>)))]
pub async fn models(State(app): State<AppState>) -> ApiResult<Json<Vec<ModelEntry>>> {
    let extra = extra_model_dirs(&app).await;
    Ok(Json(list_models(&app.cfg.workdir, &extra)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ModelQuery {
    /// A model folder (or hub id in the local cache), as typed in the top bar.
    model: String,
}

/// One model as `/api/models` lists it, for any folder or hub id: what the board fills in when
/// a model path is typed.
#[utoipa::path(get, path = "/api/models/info", params(ModelQuery), responses((status = 200, body = ModelEntry), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn model_info(
    State(app): State<AppState>,
    Query(q): Query<ModelQuery>,
) -> ApiResult<Json<ModelEntry>> {
    let dir = super::prepare::model_dir(&app.cfg.workdir, &q.model)?;
    let name = model_label(&q.model);
    Ok(Json(entry(q.model.clone(), name, "path", &dir)))
}

#[utoipa::path(get, path = "/api/templates", responses((status = 200, body = Vec<String>)))]
pub async fn templates() -> Json<Vec<String>> {
    Json(
        trainer::data::template::registry::TEMPLATE_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct DatasetQuery {
    /// A folder with `dataset_info.json` (default `data` in the work dir).
    dataset_dir: Option<String>,
}

fn kind_of(attr: &trainer::data::dataset_info::DatasetAttr) -> &'static str {
    if attr.ranking {
        "rm"
    } else if attr.is_kto() {
        "kto"
    } else if matches!(attr.formatting, Formatting::Alpaca)
        && attr.response.is_none()
        && attr.history.is_none()
    {
        "pt"
    } else {
        "sft"
    }
}

#[utoipa::path(get, path = "/api/datasets", params(DatasetQuery), responses((status = 200, body = Vec<DatasetEntry>), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn datasets(
    State(app): State<AppState>,
    Query(q): Query<DatasetQuery>,
) -> ApiResult<Json<Vec<DatasetEntry>>> {
    let dir = dataset_dir(&app.cfg.workdir, q.dataset_dir.as_deref().unwrap_or("data"))?;
    let info =
        DatasetInfo::load(&dir).map_err(|e| ApiError::field("dataset_dir", format!("{e:#}")))?;
    Ok(Json(
        info.all()
            .iter()
            .map(|a| DatasetEntry {
                name: a.name.clone(),
                kind: kind_of(a).into(),
                formatting: format!("{:?}", a.formatting).to_ascii_lowercase(),
                file: match &a.load_from {
                    trainer::data::dataset_info::LoadFrom::File(f) => Some(f.clone()),
                    _ => None,
                },
                ranking: a.ranking,
            })
            .collect(),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PreviewQuery {
    dataset_dir: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/datasets/{name}/preview", params(PreviewQuery), responses((status = 200, body = DatasetPage), (status = 404, body = protocol::run::ErrorBody)))]
pub async fn preview(
    State(app): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<PreviewQuery>,
) -> ApiResult<Json<DatasetPage>> {
    let dir = dataset_dir(&app.cfg.workdir, q.dataset_dir.as_deref().unwrap_or("data"))?;
    let info =
        DatasetInfo::load(&dir).map_err(|e| ApiError::field("dataset_dir", format!("{e:#}")))?;
    let attr = info
        .attr(&name)
        .map_err(|e| ApiError::not_found(format!("{e:#}")))?;
    if !matches!(
        attr.load_from,
        trainer::data::dataset_info::LoadFrom::File(_)
    ) {
        return Err(ApiError::bad(format!(
            "dataset `{name}` is not a local file; only local datasets can be previewed"
        )));
    }
    let attr_images = attr.images.clone();
    let records =
        tokio::task::spawn_blocking(move || trainer::data::loader::load_records(&attr, &dir))
            .await
            .map_err(|e| ApiError::internal(e.into()))?
            .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let total = records.len();
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(10).clamp(1, 100);
    let rows: Vec<Value> = records
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|r| Value::Object(r.value))
        .collect();
    let dir_arg = protocol::query_enc(q.dataset_dir.as_deref().unwrap_or("data"));
    let images = rows
        .iter()
        .map(|r| {
            let paths: Vec<&str> = match attr_images.as_deref().and_then(|c| r.get(c)) {
                Some(Value::String(p)) => vec![p.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            paths
                .into_iter()
                .map(|p| {
                    format!(
                        "/api/datasets/media?dataset_dir={dir_arg}&path={}",
                        protocol::query_enc(p)
                    )
                })
                .collect()
        })
        .collect();
    Ok(Json(DatasetPage {
        name,
        total: total as u64,
        offset: offset as u64,
        rows,
        images,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct MediaQuery {
    dataset_dir: Option<String>,
    /// The image's path as the dataset names it, relative to the dataset dir.
    path: String,
}

/// An image a dataset refers to (thumbnails in the dataset preview): only image files inside the
/// dataset dir, at most 32 MB.
#[utoipa::path(get, path = "/api/datasets/media", params(MediaQuery), responses((status = 200, description = "the image file"), (status = 404, body = protocol::run::ErrorBody)))]
pub async fn media(
    State(app): State<AppState>,
    Query(q): Query<MediaQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let dir = dataset_dir(&app.cfg.workdir, q.dataset_dir.as_deref().unwrap_or("data"))?;
    let mime = match Path::new(&q.path)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("bmp") => "image/bmp",
        _ => return Err(ApiError::bad(format!("{} is not an image file", q.path))),
    };
    let file = dir
        .join(&q.path)
        .canonicalize()
        .ok()
        .filter(|f| f.starts_with(&dir) && f.is_file())
        .ok_or_else(|| ApiError::not_found(format!("no image {} in the dataset dir", q.path)))?;
    let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    if len > 32 << 20 {
        return Err(ApiError::bad(format!("{} is over 32 MB", q.path)));
    }
    let bytes = tokio::fs::read(&file)
        .await
        .map_err(|e| ApiError::internal(e.into()))?;
    Ok(([(axum::http::header::CONTENT_TYPE, mime)], bytes).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CheckpointQuery {
    /// `model_name_or_path` as the form has it.
    model: String,
    finetuning_type: Option<String>,
}

/// Saved outputs of a model (`saves/<model>/<finetuning_type>/*`) and their `checkpoint-N`
/// folders: what the checkpoint picker offers.
#[utoipa::path(get, path = "/api/checkpoints", params(CheckpointQuery), responses((status = 200, body = Vec<CheckpointEntry>)))]
pub async fn checkpoints(
    State(app): State<AppState>,
    Query(q): Query<CheckpointQuery>,
) -> ApiResult<Json<Vec<CheckpointEntry>>> {
    let ft = q.finetuning_type.unwrap_or_else(|| "lora".into());
    if ft.contains(['/', '\\', '.']) {
        return Err(ApiError::field(
            "finetuning_type",
            "expected lora, freeze or full",
        ));
    }
    let root = app
        .cfg
        .workdir
        .join("saves")
        .join(model_label(&q.model))
        .join(&ft);
    let runs = app
        .manager
        .db()
        .runs(&Default::default())
        .await
        .unwrap_or_default();
    let mut out = Vec::new();
    let is_ckpt =
        |d: &Path| d.join("adapter_config.json").is_file() || d.join("config.json").is_file();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    for d in dirs {
        let run_id = runs
            .iter()
            .find(|r| Path::new(&r.output_dir) == d)
            .map(|r| r.id);
        let base = d
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if is_ckpt(&d) {
            out.push(CheckpointEntry {
                path: d.to_string_lossy().into_owned(),
                name: base.clone(),
                finetuning_type: ft.clone(),
                run_id,
                reward_model: d.join(VALUE_HEAD_FILE).is_file(),
            });
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            // `checkpoint-N.tmp` is a save in progress.
                            .and_then(|n| n.strip_prefix("checkpoint-"))
                            .is_some_and(|k| k.parse::<u64>().is_ok())
                            && is_ckpt(p)
                    })
                    .collect()
            })
            .unwrap_or_default();
        subs.sort_by_key(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("checkpoint-"))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        });
        for s in subs {
            out.push(CheckpointEntry {
                path: s.to_string_lossy().into_owned(),
                name: format!(
                    "{base}/{}",
                    s.file_name().unwrap_or_default().to_string_lossy()
                ),
                finetuning_type: ft.clone(),
                run_id,
                reward_model: s.join(VALUE_HEAD_FILE).is_file(),
            });
        }
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/settings", responses((status = 200, body = Object)))]
pub async fn settings(State(app): State<AppState>) -> ApiResult<Json<Map<String, Value>>> {
    Ok(Json(app.manager.db().settings().await?))
}

const SETTING_KEYS: &[&str] = &["language", "last_model", "model_dirs", "last_dataset_dir"];

#[utoipa::path(put, path = "/api/settings", request_body(content = Object, description = "language, last_model, model_dirs (list of folders), last_dataset_dir"),
    responses((status = 200, body = Object), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn put_settings(
    State(app): State<AppState>,
    Body(values): Body<Map<String, Value>>,
) -> ApiResult<Json<Map<String, Value>>> {
    for (k, v) in &values {
        if !SETTING_KEYS.contains(&k.as_str()) {
            return Err(ApiError::field(
                k.clone(),
                format!("unknown setting `{k}`; known: {}", SETTING_KEYS.join(", ")),
            ));
        }
        match k.as_str() {
            "language" if !matches!(v.as_str(), Some("en" | "zh")) => {
                return Err(ApiError::field(k.clone(), "language must be `en` or `zh`"));
            }
            "model_dirs" => {
                let dirs: Vec<String> = serde_json::from_value(v.clone()).map_err(|_| {
                    ApiError::field(k.clone(), "model_dirs must be a list of folders")
                })?;
                for d in &dirs {
                    let p = Path::new(d);
                    if !p.is_absolute() || !p.is_dir() {
                        return Err(ApiError::field(
                            k.clone(),
                            format!("{d} is not an absolute path of an existing folder"),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    for (k, v) in &values {
        app.manager.db().set_setting(k, v).await?;
    }
    Ok(Json(app.manager.db().settings().await?))
}
