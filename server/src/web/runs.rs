//! Runs: start (train / predict / export), list, detail, metrics, log, predictions, abort,
//! resume, delete, the event WebSocket, and saved argument sets.

use std::path::Path;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::run::{
    ArgSet, CommandPreview, Created, MetricPoint, Run, RunEventMsg, RunKind, RunStatus,
};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::broadcast::error::RecvError;

use super::error::{ApiError, ApiResult, Body, Query, UrlPath, Ws};
use super::prepare::prepare;
use super::AppState;
use crate::db::RunFilter;
use crate::runs::{args_file, run_output_dir, to_yaml, worker_subcommand};

async fn start(
    app: &AppState,
    kind: RunKind,
    values: Map<String, Value>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    let args = prepare(&app.cfg.workdir, Some(&kind), values)?;
    let id = app.manager.submit(kind, &args).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

#[utoipa::path(post, path = "/api/runs", request_body(content = Object, description = "Training arguments under LLaMA-Factory's names (the YAML keys); unset keys take the defaults"),
    responses((status = 201, body = Created), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn start_train(
    State(app): State<AppState>,
    Body(values): Body<Map<String, Value>>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    start(&app, RunKind::Train, values).await
}

#[utoipa::path(post, path = "/api/predict", request_body(content = Object, description = "Arguments of a prediction run (`do_predict`)"),
    responses((status = 201, body = Created), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn start_predict(
    State(app): State<AppState>,
    Body(values): Body<Map<String, Value>>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    start(&app, RunKind::Predict, values).await
}

#[utoipa::path(post, path = "/api/export", request_body(content = Object, description = "Export arguments (`export_dir`, `export_size`, `export_format`, ...)"),
    responses((status = 201, body = Created), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn start_export(
    State(app): State<AppState>,
    Body(values): Body<Map<String, Value>>,
) -> ApiResult<(StatusCode, Json<Created>)> {
    start(&app, RunKind::Export, values).await
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PreviewQuery {
    /// `train` (default), `predict` or `export`.
    kind: Option<String>,
}

#[utoipa::path(post, path = "/api/preview-command", params(PreviewQuery), request_body(content = Object),
    responses((status = 200, body = CommandPreview), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn preview_command(
    State(app): State<AppState>,
    Query(q): Query<PreviewQuery>,
    Body(values): Body<Map<String, Value>>,
) -> ApiResult<Json<CommandPreview>> {
    let kind = match q.kind.as_deref() {
        None => RunKind::Train,
        Some(k) => RunKind::parse(k).ok_or_else(|| {
            ApiError::bad(format!("unknown kind `{k}`: train, predict or export"))
        })?,
    };
    let args = prepare(&app.cfg.workdir, Some(&kind), values)?;
    let out = run_output_dir(&kind, &args);
    let file = args_file(&kind, Path::new(&out), &app.cfg.workdir.join("logs"), 0);
    Ok(Json(CommandPreview {
        command: format!(
            "llamafactory {} {}",
            worker_subcommand(&kind),
            file.display()
        ),
        yaml: to_yaml(&args.non_default())?,
        output_dir: out,
        memory: (kind == RunKind::Train)
            .then(|| memory_estimate(&args))
            .flatten(),
    }))
}

/// The run's memory from its model's `config.json` (in f32, the CPU's compute type).
fn memory_estimate(args: &protocol::TrainArgs) -> Option<protocol::run::MemoryEstimate> {
    let model = args.model_name_or_path.as_deref()?;
    let dir = trainer::hub::resolve_model_dir(model, &args.model_revision).ok()?;
    let cfg = trainer::model::ModelConfig::load(&dir).ok()?;
    let e = trainer::train::memory::estimate(&cfg, args, 4);
    Some(protocol::run::MemoryEstimate {
        weights: e.weights,
        training_state: e.training_state,
        activations: e.activations,
        total: e.total(),
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    model: Option<String>,
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/runs", params(ListQuery), responses((status = 200, body = Vec<Run>)))]
pub async fn list(
    State(app): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<Run>>> {
    if let Some(s) = &q.status {
        if RunStatus::parse(s).is_none() {
            return Err(ApiError::field("status", format!("unknown status `{s}`")));
        }
    }
    let mut runs = app
        .manager
        .db()
        .runs(&RunFilter {
            status: q.status,
            kind: q.kind,
            model: q.model,
            limit: q.limit,
        })
        .await?;
    for r in &mut runs {
        r.queue_position = app.manager.queue_position(r.id);
    }
    Ok(Json(runs))
}

async fn find(app: &AppState, id: i64) -> ApiResult<Run> {
    app.manager
        .run_with_position(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("run {id} does not exist")))
}

#[utoipa::path(get, path = "/api/runs/{id}", responses((status = 200, body = Run), (status = 404, body = protocol::run::ErrorBody)))]
pub async fn detail(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Json<Run>> {
    Ok(Json(find(&app, id).await?))
}

#[utoipa::path(get, path = "/api/runs/{id}/metrics", responses((status = 200, body = Vec<MetricPoint>)))]
pub async fn metrics(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Json<Vec<MetricPoint>>> {
    find(&app, id).await?;
    Ok(Json(app.manager.db().metrics(id).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// How many bytes from the end (default 64 KiB, at most 1 MiB).
    bytes: Option<u64>,
}

#[utoipa::path(get, path = "/api/runs/{id}/log", params(LogQuery), responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn log(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
    Query(q): Query<LogQuery>,
) -> ApiResult<String> {
    find(&app, id).await?;
    // The path comes from our own database, never from the request.
    let path = app.manager.db().log_path(id).await?.unwrap_or_default();
    let max = q.bytes.unwrap_or(64 * 1024).min(1 << 20);
    Ok(crate::runs::worker_tail(Path::new(&path), max))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PageQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/runs/{id}/predictions", params(PageQuery), responses((status = 200, body = protocol::run::DatasetPage)))]
pub async fn predictions(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<protocol::run::DatasetPage>> {
    let run = find(&app, id).await?;
    let file = Path::new(&run.output_dir).join("generated_predictions.jsonl");
    let text = std::fs::read_to_string(&file).map_err(|_| {
        ApiError::not_found(format!(
            "run {id} has no predictions yet ({})",
            file.display()
        ))
    })?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let offset = q.offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(20).clamp(1, 200);
    let rows = lines
        .iter()
        .skip(offset)
        .take(limit)
        .map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.to_string())))
        .collect();
    Ok(Json(protocol::run::DatasetPage {
        name: "generated_predictions.jsonl".into(),
        total: lines.len() as u64,
        offset: offset as u64,
        rows,
        images: Vec::new(),
    }))
}

#[utoipa::path(post, path = "/api/runs/{id}/abort", responses((status = 200, body = Run), (status = 409, body = protocol::run::ErrorBody)))]
pub async fn abort(State(app): State<AppState>, UrlPath(id): UrlPath<i64>) -> ApiResult<Json<Run>> {
    find(&app, id).await?;
    app.manager.abort(id).await?;
    Ok(Json(find(&app, id).await?))
}

#[utoipa::path(post, path = "/api/runs/{id}/resume", responses((status = 200, body = Run), (status = 409, body = protocol::run::ErrorBody)))]
pub async fn resume(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<Json<Run>> {
    app.manager.resume(id).await?;
    Ok(Json(find(&app, id).await?))
}

#[utoipa::path(delete, path = "/api/runs/{id}", responses((status = 204), (status = 409, body = protocol::run::ErrorBody)))]
pub async fn remove(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
) -> ApiResult<StatusCode> {
    app.manager.delete(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The run's events: first its history from the database, then live ones, each exactly once
/// (by sequence number). A client too slow for the live channel catches up from the database.
#[utoipa::path(get, path = "/api/runs/{id}/events", responses((status = 101, description = "WebSocket of RunEventMsg JSON texts", body = RunEventMsg)))]
pub async fn events(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<i64>,
    Ws(ws): Ws,
) -> Response {
    if let Err(e) = find(&app, id).await {
        return e.into_response();
    }
    ws.on_upgrade(move |socket| stream_events(app, id, socket))
}

async fn send(socket: &mut WebSocket, msg: &RunEventMsg) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => true,
    }
}

async fn stream_events(app: AppState, id: i64, mut socket: WebSocket) {
    let mut live = app.manager.subscribe();
    let mut stopping = app.stopping.subscribe();
    let mut last = 0i64;
    let db = app.manager.db().clone();
    macro_rules! catch_up {
        () => {
            match db.events_after(id, last).await {
                Ok(history) => {
                    for m in history {
                        if !send(&mut socket, &m).await {
                            return;
                        }
                        last = m.seq;
                    }
                }
                Err(_) => return,
            }
        };
    }
    catch_up!();
    loop {
        tokio::select! {
            r = live.recv() => match r {
                Ok((rid, m)) if rid == id && m.seq > last => {
                    if m.seq > last + 1 {
                        catch_up!();
                    } else {
                        if !send(&mut socket, &m).await {
                            return;
                        }
                        last = m.seq;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => catch_up!(),
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = stopping.changed() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

#[utoipa::path(get, path = "/api/arg-sets", responses((status = 200, body = Vec<ArgSet>)))]
pub async fn arg_sets(State(app): State<AppState>) -> ApiResult<Json<Vec<ArgSet>>> {
    Ok(Json(app.manager.db().arg_sets().await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveArgSet {
    name: String,
    #[schema(value_type = Object)]
    config: Map<String, Value>,
}

#[utoipa::path(post, path = "/api/arg-sets", request_body = SaveArgSet, responses((status = 204), (status = 422, body = protocol::run::ErrorBody)))]
pub async fn save_arg_set(
    State(app): State<AppState>,
    Body(body): Body<SaveArgSet>,
) -> ApiResult<StatusCode> {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(ApiError::field(
            "name",
            "give the argument set a name of 1 to 100 characters",
        ));
    }
    super::prepare::parse_args(body.config.clone())?;
    app.manager.db().save_arg_set(name, &body.config).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/api/arg-sets/{name}", responses((status = 204), (status = 404, body = protocol::run::ErrorBody)))]
pub async fn delete_arg_set(
    State(app): State<AppState>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<StatusCode> {
    if app.manager.db().delete_arg_set(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no argument set named `{name}`"
        )))
    }
}
