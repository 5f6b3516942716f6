//! `/api/openapi.json`, generated from the handlers' annotations and the wire types.

use axum::Json;
use utoipa::OpenApi;

use super::{catalog, chat, runs};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "LlamaBoard API",
        description = "Runs (train, predict, export), their metrics and live events, models, datasets, checkpoints, chat. \
            Run arguments use LLaMA-Factory's names, the same keys as its training YAML. Errors are `{\"error\": {\"code\", \"message\", \"field\"}}`."
    ),
    paths(
        runs::start_train,
        runs::start_predict,
        runs::start_export,
        runs::preview_command,
        runs::list,
        runs::detail,
        runs::metrics,
        runs::log,
        runs::predictions,
        runs::abort,
        runs::resume,
        runs::remove,
        runs::events,
        runs::arg_sets,
        runs::save_arg_set,
        runs::delete_arg_set,
        catalog::models,
        catalog::model_info,
        catalog::templates,
        catalog::datasets,
        catalog::preview,
        catalog::media,
        catalog::checkpoints,
        catalog::settings,
        catalog::put_settings,
        chat::status,
        chat::load,
        chat::unload,
        chat::socket,
    ),
    components(schemas(
        protocol::TrainArgs,
        protocol::WorkerEvent,
        protocol::events::StepMetrics,
        protocol::run::RunEvent,
        protocol::run::ChatRequest,
        protocol::run::ChatTurn,
    ))
)]
struct ApiDoc;

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
