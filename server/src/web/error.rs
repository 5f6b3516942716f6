//! The API's error: `{"error": {"code", "message", "field"}}` with a 4xx/5xx status, the one
//! place where the run manager's and validation's errors get their status, and extractors (JSON
//! body, URL path, query string, WebSocket upgrade) whose rejections come out in that shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::run::{ErrorBody, ErrorDetail};
use serde::de::DeserializeOwned;
use trainer::config::ArgError;

use crate::runs::RunError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn internal(e: anyhow::Error) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{e:#}"),
        )
    }
}

/// A failure of the server itself (the registry, the file system): 500, with the cause in the
/// server's log too.
impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        eprintln!("internal error: {e:#}");
        Self::internal(e)
    }
}

/// The run manager's refusals, each with its status.
impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        let message = e.to_string();
        match e {
            RunError::NotFound(_) => Self::not_found(message),
            RunError::WrongStatus { .. }
            | RunError::NotActive { .. }
            | RunError::NotResumable(_) => Self::conflict(message),
            RunError::OutputDirBusy { key, .. } => Self {
                field: Some(key.into()),
                ..Self::conflict(message)
            },
            RunError::Internal(e) => e.into(),
        }
    }
}

/// A broken argument rule names its key as the field.
impl From<ArgError> for ApiError {
    fn from(e: ArgError) -> Self {
        Self::field(e.key, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// `Json<T>` whose rejections are API errors.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rej) => Err(rejection(rej)),
        }
    }
}

/// `axum::extract::Path` whose rejection (`/api/runs/abc`) is an API error.
pub struct UrlPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for UrlPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(UrlPath(v)),
            Err(rej) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_path",
                format!("{}: {}", parts.uri.path(), rej.body_text()),
            )),
        }
    }
}

/// `axum::extract::Query` whose rejection (`?limit=abc`, a required parameter missing) is an
/// API error naming the parameter when serde does.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(rej) => {
                let text = rej.body_text();
                let field = text
                    .split('`')
                    .nth(1)
                    .filter(|_| text.contains("field"))
                    .map(str::to_string);
                Err(ApiError {
                    field,
                    ..ApiError::new(StatusCode::BAD_REQUEST, "bad_query", text)
                })
            }
        }
    }
}

/// `WebSocketUpgrade` whose rejection (a plain GET without upgrade headers) is an API error.
pub struct Ws(pub WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Ws {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match WebSocketUpgrade::from_request_parts(parts, state).await {
            Ok(ws) => Ok(Ws(ws)),
            Err(rej) => Err(ApiError::new(
                rej.status(),
                "websocket_required",
                format!(
                    "{} is a WebSocket endpoint: {}",
                    parts.uri.path(),
                    rej.body_text()
                ),
            )),
        }
    }
}

fn rejection(rej: JsonRejection) -> ApiError {
    let status = rej.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "malformed_json",
    };
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is larger than the limit of {} bytes",
            super::BODY_LIMIT
        ),
        _ => rej.body_text(),
    };
    ApiError::new(status, code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::run::RunStatus;

    #[test]
    fn run_errors_map_to_their_status_in_one_place() {
        let status = |e: RunError| ApiError::from(e).status;
        assert_eq!(status(RunError::NotFound(3)), StatusCode::NOT_FOUND);
        assert_eq!(
            status(RunError::WrongStatus {
                id: 3,
                status: RunStatus::Running,
                action: "abort it first",
            }),
            StatusCode::CONFLICT
        );
        assert_eq!(status(RunError::NotActive { id: 3 }), StatusCode::CONFLICT);
        let busy = ApiError::from(RunError::OutputDirBusy {
            run: 2,
            dir: "/w/saves/x".into(),
            key: "output_dir",
        });
        assert_eq!(
            (busy.status, busy.field.as_deref()),
            (StatusCode::CONFLICT, Some("output_dir"))
        );
        // The registry failing is the server's fault, not a conflict.
        let db = RunError::Internal(anyhow::anyhow!("database is locked"));
        let e = ApiError::from(db);
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("database is locked"));
    }
}
