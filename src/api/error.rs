//! The API's one error type, and the envelope every JSON response wears. Each error code string
//! appears here once, beside its HTTP status.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::ids::InvalidId;
use crate::jobs::{JobError, StoreError};
use crate::media::MediaError;

/// `{ok, data, error, message}`: the legacy envelope, kept for every JSON response.
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope<T> {
    pub ok: bool,
    pub data: T,
    /// A stable machine code when `ok` is false.
    pub error: Option<&'static str>,
    pub message: String,
}

/// The body of every error response: the envelope with `ok` false, an empty `data` and the code.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    /// Always false.
    pub ok: bool,
    pub data: NoData,
    /// A stable machine code, e.g. `JOB_NOT_FOUND`.
    pub error: &'static str,
    pub message: String,
}

/// `{}`: an error carries no data.
#[derive(Debug, Serialize, ToSchema)]
// Serialize ignores it; utoipa reads it as `additionalProperties: false`, so the schema says "empty".
#[serde(deny_unknown_fields)]
pub struct NoData {}

/// A successful response: `data` under the envelope, with its status code.
pub fn respond<T: Serialize>(status: StatusCode, data: T, message: impl Into<String>) -> Response {
    (status, Json(Envelope { ok: true, data, error: None, message: message.into() })).into_response()
}

/// The same envelope around `data` already serialised (a status as it was published, sent to
/// every poll without cloning or serialising it again): the bytes [`respond`] would write.
pub fn respond_serialised(status: StatusCode, data: &str, message: &'static str) -> Response {
    // One buffer, written once: this is every status poll's answer.
    let mut body = Vec::with_capacity(data.len() + message.len() + 48);
    body.extend_from_slice(br#"{"ok":true,"data":"#);
    body.extend_from_slice(data.as_bytes());
    body.extend_from_slice(br#","error":null,"message":"#);
    serde_json::to_writer(&mut body, message).expect("a string serialises");
    body.push(b'}');
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Invalid project id: use 1-64 letters, digits, '_' or '-', starting with a letter or digit")]
    InvalidProjectId,
    #[error("Job not found")]
    JobNotFound,
    #[error("Stem not found")]
    StemNotFound,
    #[error("Project not found: it has no stems")]
    ProjectNotFound,
    #[error("This project has no mix jobs")]
    NoMixJobs,
    #[error("This project has no complete mix yet")]
    NoMixAvailable,
    #[error("The job has already finished")]
    JobFinished,
    #[error("No file was uploaded: send the stems as multipart/form-data file parts")]
    NoFiles,
    #[error("Too many files in one upload: at most {0}")]
    TooManyFiles(usize),
    #[error("The request body is larger than the {0} MiB limit")]
    PayloadTooLarge(u64),
    #[error("{0}")]
    UnsupportedAudio(String),
    /// A JSON route sent something that does not say it is JSON.
    #[error("The request body must be JSON, sent as Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("The disk is full: the file could not be stored")]
    InsufficientStorage,
    #[error("Invalid settings: {0}")]
    InvalidSettings(String),
    #[error("Bad request: {0}")]
    BadRequest(String),
    #[error("File not found")]
    MediaNotFound,
    #[error("No such route")]
    RouteNotFound,
    /// No credential, or one that does not verify: never says which.
    #[error("A valid credential is required")]
    Unauthorized,
    #[error("This credential does not allow this request")]
    Forbidden,
    #[error("Invalid request: {0}")]
    InvalidRequest(String),
    #[error("No token key is configured: start the server with --token-key")]
    NoTokenKey,
    #[error("The media storage is unavailable; try again shortly")]
    MediaUnavailable,
    #[error("Too many requests from this client; try again in {} s", .0.retry_after.unwrap_or(1))]
    RateLimited(super::limits::RateHeaders),
    #[error("This upload would take the project's stems past its quota of {0} GB: delete stems to make room")]
    QuotaExceeded(f64),
    #[error("This project already has {0} mix jobs waiting, the most one may; start another once one of them has begun")]
    TooManyJobs(u32),
    #[error("This client already holds {0} open event streams, the most one credential (or address, on an open server) may; close one first")]
    TooManyStreams(usize),
    /// Past the connection cap: the reserve serves only the health check and admins.
    #[error("The server is at its connection limit; try again shortly")]
    ServerBusy,
    /// The job database cannot be reached; the cause is logged, never sent (it may name hosts).
    #[error("The job database is unavailable; try again shortly")]
    StoreUnavailable(String),
    /// Something went wrong that the client cannot fix; the cause is logged, never sent.
    #[error("Something went wrong on the server")]
    Internal(String),
    /// The status routes keep the legacy code for internal failures.
    #[error("Failed to get job status")]
    JobStatus(String),
}

/// The code of an error response, for the layers that count refusals.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCodeOf(pub &'static str);

/// How long a client is told to wait before trying again.
const RETRY_UNAVAILABLE_S: u64 = 5;
/// A project's queue drains one mix at a time: a mix of a few minutes takes some tens of seconds.
const RETRY_QUEUE_FULL_S: u64 = 30;

impl ApiError {
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(headers) => headers.retry_after,
            ApiError::TooManyJobs(_) => Some(RETRY_QUEUE_FULL_S),
            _ if matches!(self.status_and_code().0, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) => Some(RETRY_UNAVAILABLE_S),
            _ => None,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidProjectId => (StatusCode::BAD_REQUEST, "INVALID_PROJECT_ID"),
            ApiError::JobNotFound => (StatusCode::NOT_FOUND, "JOB_NOT_FOUND"),
            ApiError::StemNotFound => (StatusCode::NOT_FOUND, "STEM_NOT_FOUND"),
            ApiError::ProjectNotFound => (StatusCode::NOT_FOUND, "PROJECT_NOT_FOUND"),
            ApiError::NoMixJobs => (StatusCode::NOT_FOUND, "NO_MIX_JOBS"),
            ApiError::NoMixAvailable => (StatusCode::NOT_FOUND, "NO_MIX_AVAILABLE"),
            ApiError::JobFinished => (StatusCode::CONFLICT, "JOB_FINISHED"),
            ApiError::NoFiles => (StatusCode::BAD_REQUEST, "NO_FILES"),
            ApiError::TooManyFiles(_) => (StatusCode::BAD_REQUEST, "TOO_MANY_FILES"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            ApiError::UnsupportedAudio(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_AUDIO"),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"),
            ApiError::InsufficientStorage => (StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_STORAGE"),
            ApiError::InvalidSettings(_) => (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_SETTINGS"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            ApiError::MediaNotFound => (StatusCode::NOT_FOUND, "MEDIA_NOT_FOUND"),
            ApiError::RouteNotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            ApiError::InvalidRequest(_) => (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_REQUEST"),
            ApiError::NoTokenKey => (StatusCode::CONFLICT, "NO_TOKEN_KEY"),
            ApiError::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE"),
            ApiError::MediaUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "MEDIA_UNAVAILABLE"),
            ApiError::TooManyStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS"),
            ApiError::TooManyJobs(_) => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_JOBS"),
            ApiError::QuotaExceeded(_) => (StatusCode::PAYLOAD_TOO_LARGE, "QUOTA_EXCEEDED"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            ApiError::ServerBusy => (StatusCode::SERVICE_UNAVAILABLE, "SERVER_BUSY"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
            ApiError::JobStatus(_) => (StatusCode::INTERNAL_SERVER_ERROR, "JOB_STATUS_ERROR"),
        }
    }

    /// On the status routes an internal failure keeps the legacy `JOB_STATUS_ERROR` code.
    pub fn on_status_route(self) -> Self {
        match self {
            ApiError::Internal(cause) => ApiError::JobStatus(cause),
            other => other,
        }
    }

    /// A media storage failure: the object storage unreachable or refusing is the client's to
    /// retry (its cause is logged, never sent), a full disk is the client's to know about.
    pub fn media(err: MediaError) -> Self {
        match err {
            MediaError::Io(err) => Self::storage(err),
            MediaError::NotFound => ApiError::MediaNotFound,
            MediaError::Unavailable(cause) => {
                tracing::warn!(%cause, "the media storage failed");
                ApiError::MediaUnavailable
            }
        }
    }

    /// An I/O failure: a full disk is the client's to know about, the rest is internal.
    pub fn storage(err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::StorageFull {
            ApiError::InsufficientStorage
        } else {
            ApiError::Internal(err.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(cause) | ApiError::JobStatus(cause) | ApiError::StoreUnavailable(cause) = &self {
            tracing::error!(%cause, code, "request failed");
        }
        let body = ErrorEnvelope { ok: false, data: NoData {}, error: code, message: self.to_string() };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        if let ApiError::RateLimited(headers) = &self {
            headers.apply(response.headers_mut());
        }
        response.extensions_mut().insert(ErrorCodeOf(code));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<JobError> for ApiError {
    fn from(err: JobError) -> Self {
        match err {
            JobError::NotFound => ApiError::JobNotFound,
            JobError::Finished => ApiError::JobFinished,
            JobError::Store(err) => err.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        if err.is_unavailable() {
            ApiError::StoreUnavailable(err.to_string())
        } else {
            ApiError::Internal(err.to_string())
        }
    }
}

impl From<InvalidId> for ApiError {
    /// A malformed job or stem id answers exactly like an unknown one.
    fn from(invalid: InvalidId) -> Self {
        match invalid {
            InvalidId::Project => ApiError::InvalidProjectId,
            InvalidId::Job => ApiError::JobNotFound,
            InvalidId::Stem => ApiError::StemNotFound,
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        // A segment that is not UTF-8 once percent-decoded is a malformed id like any other.
        if let PathRejection::FailedToDeserializePathParams(err) = &rejection {
            if let ErrorKind::InvalidUtf8InPathParam { key } = err.kind() {
                match key.as_str() {
                    "project_id" => return ApiError::InvalidProjectId,
                    "job_id" => return ApiError::JobNotFound,
                    "stem_id" => return ApiError::StemNotFound,
                    _ => {}
                }
            }
        }
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            other => ApiError::BadRequest(other.body_text()),
        }
    }
}

/// Whether `headers` say the body is JSON (`application/json`, parameters aside).
pub fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or_default();
    content_type.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json")
}

/// A request to a WebSocket route that is not a WebSocket handshake.
impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> Self {
        ApiError::BadRequest(format!("not a WebSocket handshake: {}", rejection.body_text()))
    }
}

/// A body that could not be read. Its size limit is the route's, in MiB.
pub fn body_error(rejection: BytesRejection, limit_mb: u64) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(limit_mb)
    } else {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(_: MultipartRejection) -> Self {
        ApiError::NoFiles
    }
}

/// A multipart stream that broke: too large (axum enforces the body limit while streaming) or cut.
pub fn multipart_error(err: MultipartError, limit_mb: u64) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(limit_mb)
    } else {
        ApiError::BadRequest(format!("the upload was interrupted or malformed: {}", err.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_serialised_status_wears_exactly_the_envelope_respond_writes() {
        let data = serde_json::json!({"job_id": "j1", "message": "quote \" and \\ inside", "report": null});
        let message = "Job status retrieved successfully";
        let typed = respond(StatusCode::OK, &data, message);
        let serialised = respond_serialised(StatusCode::OK, &serde_json::to_string(&data).unwrap(), message);
        assert_eq!(typed.headers().get("content-type"), serialised.headers().get("content-type"));
        let body = |response: Response| async { axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap() };
        assert_eq!(body(typed).await, body(serialised).await);
    }
}
