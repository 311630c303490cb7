//! Health, metrics and the webhook secret.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{respond, ApiError, Envelope, ErrorEnvelope};
use super::state::AppState;
use crate::jobs::{JobState, Transport, LEASE_EVENTS, MIX_DURATION_BUCKETS, REFUSALS, WEBHOOK_OUTCOMES};

/// Projects `/metrics` names in `mixd_queued_jobs_by_project`: the most queued first. A label per
/// project would grow without bound.
const QUEUED_PROJECTS_SHOWN: usize = 10;

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
}

/// How long the health check waits for the job database and the media storage: a load balancer
/// must learn within a second that this node cannot serve.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(900);

/// 200 while this node can reach its job database and its media storage; 503 naming the cause
/// otherwise, so a load balancer routes around it.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, body = Envelope<Health>), (status = 503, body = ErrorEnvelope, description = "STORE_UNAVAILABLE or MEDIA_UNAVAILABLE")))]
pub async fn healthz(State(app): State<AppState>) -> Result<Response, ApiError> {
    match tokio::time::timeout(HEALTH_TIMEOUT, app.jobs.ping_store()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(ApiError::StoreUnavailable(err.to_string())),
        Err(_) => return Err(ApiError::StoreUnavailable("no answer within the health check's timeout".into())),
    }
    let reachable = matches!(tokio::time::timeout(HEALTH_TIMEOUT, app.media.ping()).await, Ok(Ok(())));
    if reachable {
        Ok(respond(StatusCode::OK, Health { status: "ok", version: env!("CARGO_PKG_VERSION") }, "OK"))
    } else {
        Err(ApiError::MediaUnavailable)
    }
}

/// Prometheus text: jobs by state, queue depth, open subscribers by transport, mix durations.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, body = String, content_type = "text/plain", description = "Prometheus text format 0.0.4")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    let (counts, queued_by_project) = app.jobs.counts(QUEUED_PROJECTS_SHOWN);
    let queued = counts.get(&JobState::Queued).copied().unwrap_or(0);
    let metrics = app.jobs.metrics();
    let mut text = String::new();
    let _ = writeln!(text, "# HELP mixd_jobs Jobs held, by state.\n# TYPE mixd_jobs gauge");
    for state in JobState::ALL {
        let _ = writeln!(text, "mixd_jobs{{state=\"{}\"}} {}", state.as_str(), counts.get(&state).copied().unwrap_or(0));
    }
    let _ = writeln!(text, "# HELP mixd_queue_depth Jobs waiting for a mixer slot.\n# TYPE mixd_queue_depth gauge\nmixd_queue_depth {queued}");
    let _ = writeln!(
        text,
        "# HELP mixd_queued_jobs_by_project Jobs waiting, for the {QUEUED_PROJECTS_SHOWN} projects with the most (a bounded set of labels).\n# TYPE mixd_queued_jobs_by_project gauge"
    );
    for (project, count) in queued_by_project {
        let _ = writeln!(text, "mixd_queued_jobs_by_project{{project=\"{project}\"}} {count}");
    }
    let _ = writeln!(text, "# HELP mixd_refusals_total Requests refused by a limit, by error code.\n# TYPE mixd_refusals_total counter");
    for code in REFUSALS {
        let _ = writeln!(text, "mixd_refusals_total{{code=\"{code}\"}} {}", metrics.refusals(code));
    }
    let _ = writeln!(text, "# HELP mixd_subscribers Open live-event subscribers.\n# TYPE mixd_subscribers gauge");
    for transport in [Transport::Sse, Transport::WebSocket] {
        let _ = writeln!(text, "mixd_subscribers{{transport=\"{}\"}} {}", transport.label(), metrics.subscribers(transport));
    }
    let _ = writeln!(
        text,
        "# HELP mixd_subscriber_resyncs_total Subscribers that lagged and were resynchronised.\n# TYPE mixd_subscriber_resyncs_total counter\nmixd_subscriber_resyncs_total {}",
        metrics.resyncs()
    );
    let _ = writeln!(text, "# HELP mixd_webhook_attempts_total Webhook delivery attempts, by what they came to.\n# TYPE mixd_webhook_attempts_total counter");
    for outcome in WEBHOOK_OUTCOMES {
        let _ = writeln!(text, "mixd_webhook_attempts_total{{outcome=\"{outcome}\"}} {}", metrics.webhooks(outcome));
    }
    let _ = writeln!(text, "# HELP mixd_leases_total This node's leases on jobs, by what became of them.\n# TYPE mixd_leases_total counter");
    for event in LEASE_EVENTS {
        let _ = writeln!(text, "mixd_leases_total{{event=\"{}\"}} {}", event.label(), metrics.leases(event));
    }
    if let Ok((pending, oldest)) = app.outbox.backlog().await {
        let age = oldest.map_or(0.0, |created| (crate::jobs::unix_millis(std::time::SystemTime::now()) - created).max(0) as f64 / 1000.0);
        let _ = writeln!(text, "# HELP mixd_webhook_queue_length Webhook deliveries waiting to be sent or retried.\n# TYPE mixd_webhook_queue_length gauge\nmixd_webhook_queue_length {pending}");
        let _ = writeln!(text, "# HELP mixd_webhook_oldest_pending_seconds Age of the oldest undelivered webhook.\n# TYPE mixd_webhook_oldest_pending_seconds gauge\nmixd_webhook_oldest_pending_seconds {age}");
    }
    let histogram = metrics.mix_durations();
    let _ = writeln!(text, "# HELP mixd_mix_duration_seconds Wall time of completed mixes.\n# TYPE mixd_mix_duration_seconds histogram");
    for (bound, count) in MIX_DURATION_BUCKETS.iter().zip(histogram.buckets) {
        let _ = writeln!(text, "mixd_mix_duration_seconds_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(text, "mixd_mix_duration_seconds_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(text, "mixd_mix_duration_seconds_sum {}\nmixd_mix_duration_seconds_count {}", histogram.sum, histogram.count);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Serialize, ToSchema)]
pub struct WebhookSecretBody {
    /// `whsec_` + base64: verify deliveries with any Standard Webhooks library.
    pub secret: String,
}

/// The secret webhooks are signed with (admin only).
#[utoipa::path(get, path = "/webhooks/secret", tag = "service",
    responses((status = 200, body = Envelope<WebhookSecretBody>)))]
pub async fn webhook_secret(State(app): State<AppState>) -> Response {
    respond(StatusCode::OK, WebhookSecretBody { secret: app.webhook_secret.as_str().to_string() }, "Webhook secret retrieved successfully")
}

/// Unknown paths answer with the envelope too.
pub async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}
