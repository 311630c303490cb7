//! Mix jobs over HTTP: start, status (both the contract's path and the legacy frontend's), the
//! project's jobs, cancel and the newest complete mix.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{body_error, is_json, respond, respond_serialised, ApiError, Envelope, ErrorEnvelope};
use super::extract::{ApiQuery, JobPath, ProjectPath};
use super::state::AppState;
use crate::access::{Caller, Right};
use crate::audio::{MixReport, MixSettings};
use crate::ids::{JobId, ProjectId};
use crate::jobs::{Attempt, JobEvent, JobStatus, Submitted, WebhookSpec};
use crate::webhooks::{check_url, redacted};

const STATUS_MESSAGE: &str = "Job status retrieved successfully";
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// The largest settings body the start route reads; real settings are a few KiB.
pub const MAX_SETTINGS_MB: u64 = 1;

/// A started job: its status plus where to follow it.
#[derive(Serialize, ToSchema)]
pub struct StartedJob {
    #[serde(flatten)]
    pub status: JobStatus,
    pub links: JobLinks,
}

#[derive(Serialize, ToSchema)]
pub struct JobLinks {
    pub status: String,
    pub events: String,
    pub ws: String,
}

impl JobLinks {
    fn new(project: &ProjectId, job_id: JobId) -> Self {
        let base = format!("/mix/{project}/mix/job/{job_id}");
        Self { status: format!("{base}/status"), events: format!("{base}/events"), ws: format!("{base}/ws") }
    }
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobStatus>,
}

#[derive(Serialize, ToSchema)]
pub struct Preview {
    pub job_id: JobId,
    pub result_url: String,
    pub report: Option<MixReport>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// Without it, the project's newest job. A malformed id is answered like an unknown one
    /// (parsed after the query, by its typed error).
    #[param(value_type = Option<JobId>, nullable = false)]
    pub job_id: Option<String>,
}

/// Start a mix of the project's stems. An empty body means the default settings.
#[utoipa::path(post, path = "/mix/{project_id}/mix/start", tag = "mix",
    params(ProjectPath,
        ("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 256, pattern = "^[!-~]([ -~]{0,254}[!-~])?$",
            description = "1-256 visible ASCII characters. A repeat for the same project returns the first job")),
    // Optional (an empty body means the defaults) but never `null`: see `openapi::OptionalSettings`.
    request_body(content = MixSettings, content_type = "application/json", description = "Empty: the default settings"),
    responses(
        (status = 202, body = Envelope<StartedJob>, description = "Queued", headers(("Location" = String, description = "The job's status URL"))),
        (status = 200, body = Envelope<StartedJob>, description = "The job an earlier request with the same Idempotency-Key started"),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID, or BAD_REQUEST for a malformed Idempotency-Key"),
        (status = 404, body = ErrorEnvelope, description = "PROJECT_NOT_FOUND: the project has no stems"),
        (status = 413, body = ErrorEnvelope, description = "PAYLOAD_TOO_LARGE: the body is over 1 MiB"),
        (status = 415, body = ErrorEnvelope, description = "UNSUPPORTED_MEDIA_TYPE: a body not sent as application/json"),
        (status = 422, body = ErrorEnvelope, description = "INVALID_SETTINGS naming the field, also for a body that is not JSON, or a mix longer than --max-mix-minutes"),
        (status = 429, body = ErrorEnvelope, description = "TOO_MANY_JOBS: the project already has --max-queued-per-project jobs waiting", headers(("Retry-After" = u32))),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL"),
        (status = 503, body = ErrorEnvelope, description = "MEDIA_UNAVAILABLE: the object storage did not answer (with --storage)", headers(("Retry-After" = u32)))))]
pub async fn start(
    State(app): State<AppState>,
    ProjectPath { project_id }: ProjectPath,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| body_error(rejection, MAX_SETTINGS_MB))?;
    // A body that is not declared JSON is refused before anything reads it: a form or a
    // `text/plain` POST is what a page elsewhere can send without asking (no CORS preflight).
    if !body.is_empty() && !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let stems = app.stems.list(&project_id).await.map_err(ApiError::media)?;
    let Some(highest_rate) = stems.iter().map(|s| s.sample_rate).max() else { return Err(ApiError::ProjectNotFound) };
    let sources: Vec<_> = stems.iter().map(|stem| app.stems.source(&project_id, stem)).collect();
    let (body, webhook) = split_webhook(&body, app.config.webhook_allow_private)?;
    let settings =
        MixSettings::from_json(&body).and_then(|settings| settings.validate(&sources, highest_rate)).map_err(|err| ApiError::InvalidSettings(err.to_string()))?;
    let minutes = settings.length_s(sources.iter().zip(stems.iter().map(|stem| stem.duration_s))) / 60.0;
    if minutes > f64::from(app.config.max_mix_minutes) {
        return Err(ApiError::InvalidSettings(format!(
            "the mix would last {minutes:.1} minutes (its latest-ending stem, after offsets); this server mixes at most {} (--max-mix-minutes)",
            app.config.max_mix_minutes
        )));
    }
    let key = match headers.get("idempotency-key") {
        Some(value) => {
            let key = value.to_str().map_err(|_| ApiError::BadRequest("Idempotency-Key must be visible ASCII".into()))?;
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
                return Err(ApiError::BadRequest(format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters")));
            }
            Some(key.to_string())
        }
        None => None,
    };

    let submitted = app.jobs.submit(project_id.clone(), settings, sources, key, webhook).await?;
    let (status, code, message) = match submitted {
        Submitted::New(status) => (status, StatusCode::ACCEPTED, "Mix job queued"),
        Submitted::Existing(status) => (status, StatusCode::OK, "Mix job already started with this Idempotency-Key"),
        Submitted::QueueFull { cap } => return Err(ApiError::TooManyJobs(cap)),
    };
    let links = JobLinks::new(&project_id, status.job_id());
    let location = HeaderValue::from_str(&links.status).expect("ids are URL-safe");
    let mut response = respond(code, StartedJob { status, links }, message);
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// The start body is the mix settings plus an optional `webhook`, which is the job's and not the
/// engine's: it is taken out and checked here (its URL by the rules in `crate::webhooks`).
fn split_webhook(body: &[u8], allow_private: bool) -> Result<(Vec<u8>, Option<WebhookSpec>), ApiError> {
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice::<serde_json::Value>(body) else {
        // Not an object: the settings parser names what is wrong with it.
        return Ok((body.to_vec(), None));
    };
    let Some(webhook) = fields.remove("webhook") else { return Ok((body.to_vec(), None)) };
    let invalid = |field: &str, reason: String| ApiError::InvalidSettings(format!("webhook{field}: {reason}"));
    let webhook: WebhookSpec = serde_path_to_error::deserialize(webhook).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." { String::new() } else { format!(".{path}") };
        invalid(&field, err.into_inner().to_string())
    })?;
    check_url(&webhook.url, allow_private).map_err(|err| invalid(".url", err.to_string()))?;
    if webhook.events.is_empty() {
        return Err(invalid(".events", "name at least one of start, completed".into()));
    }
    Ok((serde_json::to_vec(&fields).expect("a JSON object serialises"), Some(webhook)))
}

/// A job's status; `Retry-After: 1` while it is not finished.
#[utoipa::path(get, path = "/mix/{project_id}/mix/job/{job_id}/status", tag = "mix",
    params(JobPath),
    responses(
        (status = 200, body = Envelope<JobStatus>, headers(("Retry-After" = u32, description = "1 while the job is not finished"))),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "JOB_NOT_FOUND, also for a job of another project"),
        (status = 500, body = ErrorEnvelope, description = "JOB_STATUS_ERROR")))]
pub async fn job_status(State(app): State<AppState>, JobPath { project_id, job_id }: JobPath) -> Result<Response, ApiError> {
    let status = find_job(&app, &project_id, job_id).await.map_err(ApiError::on_status_route)?;
    Ok(status_response(status))
}

/// The legacy frontend's status call: with `job_id`, exactly the job status route; without it,
/// the project's newest job.
#[utoipa::path(get, path = "/projects/{project_id}/mix/status", tag = "mix",
    params(ProjectPath, StatusQuery),
    responses(
        (status = 200, body = Envelope<JobStatus>, headers(("Retry-After" = u32, description = "1 while the job is not finished"))),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID, or BAD_REQUEST for a malformed query string"),
        (status = 404, body = ErrorEnvelope, description = "JOB_NOT_FOUND, or NO_MIX_JOBS without `job_id`"),
        (status = 500, body = ErrorEnvelope, description = "JOB_STATUS_ERROR")))]
pub async fn legacy_status(State(app): State<AppState>, ProjectPath { project_id }: ProjectPath, ApiQuery(query): ApiQuery<StatusQuery>) -> Result<Response, ApiError> {
    let status = match query.job_id {
        Some(job_id) => match job_id.parse() {
            Ok(job_id) => find_job(&app, &project_id, job_id).await,
            Err(invalid) => Err(ApiError::from(invalid)),
        },
        None => newest_job(&app, &project_id),
    };
    Ok(status_response(status.map_err(ApiError::on_status_route)?))
}

/// The project's newest job.
#[utoipa::path(get, path = "/mix/{project_id}/mix/status", tag = "mix",
    params(ProjectPath),
    responses(
        (status = 200, body = Envelope<JobStatus>, headers(("Retry-After" = u32, description = "1 while the job is not finished"))),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "NO_MIX_JOBS"),
        (status = 500, body = ErrorEnvelope, description = "JOB_STATUS_ERROR")))]
pub async fn project_status(State(app): State<AppState>, ProjectPath { project_id }: ProjectPath) -> Result<Response, ApiError> {
    Ok(status_response(newest_job(&app, &project_id).map_err(ApiError::on_status_route)?))
}

/// The project's jobs, newest first.
#[utoipa::path(get, path = "/mix/{project_id}/mix/jobs", tag = "mix",
    params(ProjectPath),
    responses((status = 200, body = Envelope<JobList>), (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID")))]
pub async fn jobs(State(app): State<AppState>, ProjectPath { project_id }: ProjectPath) -> Response {
    respond(StatusCode::OK, JobList { jobs: app.jobs.for_project(&project_id) }, "Jobs retrieved successfully")
}

/// Cancel a queued or running job: it ends in `error` with `CANCELED`.
#[utoipa::path(delete, path = "/mix/{project_id}/mix/job/{job_id}", tag = "mix",
    params(JobPath),
    responses(
        (status = 200, body = Envelope<JobStatus>),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "JOB_NOT_FOUND"),
        (status = 409, body = ErrorEnvelope, description = "JOB_FINISHED")))]
pub async fn cancel(State(app): State<AppState>, JobPath { project_id, job_id }: JobPath) -> Result<Response, ApiError> {
    let status = app.jobs.cancel(&project_id, job_id).await?;
    Ok(respond(StatusCode::OK, status, "Job canceled"))
}

/// The newest complete mix of the project.
#[utoipa::path(get, path = "/mix/{project_id}/mix/preview", tag = "mix",
    params(ProjectPath),
    responses(
        (status = 200, body = Envelope<Preview>),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "NO_MIX_AVAILABLE")))]
pub async fn preview(State(app): State<AppState>, ProjectPath { project_id }: ProjectPath) -> Result<Response, ApiError> {
    let newest = app.jobs.newest_complete(&project_id).ok_or(ApiError::NoMixAvailable)?;
    let status = &newest.status;
    let result_url = status.result_url().expect("a complete job has a result").to_string();
    let newest = Preview { job_id: status.job_id(), result_url, report: status.report().cloned() };
    Ok(respond(StatusCode::OK, newest, "Mix preview retrieved successfully"))
}

/// The job's status as published, if it is this project's.
pub(super) async fn find_job(app: &AppState, project: &ProjectId, job_id: JobId) -> Result<Arc<JobEvent>, ApiError> {
    app.jobs.find(job_id).await?.filter(|event| event.status.project_id() == project).ok_or(ApiError::JobNotFound)
}

fn newest_job(app: &AppState, project: &ProjectId) -> Result<Arc<JobEvent>, ApiError> {
    app.jobs.newest_published(project).ok_or(ApiError::NoMixJobs)
}

/// The envelope around the status's published JSON.
fn status_response(event: Arc<JobEvent>) -> Response {
    let response = respond_serialised(StatusCode::OK, &event.json, STATUS_MESSAGE);
    if event.status.state().is_terminal() {
        response
    } else {
        ([(header::RETRY_AFTER, "1")], response).into_response()
    }
}

#[derive(Serialize, ToSchema)]
pub struct WebhookAttempts {
    pub attempts: Vec<Attempt>,
}

/// Every attempt to deliver the job's webhooks: when, the receiver's status or the error, and
/// when the next attempt is due.
#[utoipa::path(get, path = "/mix/{project_id}/mix/job/{job_id}/webhooks", tag = "mix",
    params(JobPath),
    responses(
        (status = 200, body = Envelope<WebhookAttempts>),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "JOB_NOT_FOUND"),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL")))]
pub async fn webhook_attempts(State(app): State<AppState>, Extension(caller): Extension<Caller>, JobPath { project_id, job_id }: JobPath) -> Result<Response, ApiError> {
    find_job(&app, &project_id, job_id).await?;
    let mut attempts = app.outbox.attempts(job_id).await?;
    // A read token (handed to browsers) sees where deliveries go, not the receiver's secrets.
    if !caller.may(Right::Write, Some(&project_id)) {
        for attempt in &mut attempts {
            attempt.url = redacted(&attempt.url);
        }
    }
    Ok(respond(StatusCode::OK, WebhookAttempts { attempts }, "Webhook attempts retrieved successfully"))
}
