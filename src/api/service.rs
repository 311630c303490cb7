//! Health, metrics and the machine-readable contract.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::error::{respond, ApiError, Envelope};
use super::AppState;
use crate::jobs::{JobState, Transport, MIX_DURATION_BUCKETS};

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
}

#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, body = Envelope<Health>)))]
pub async fn healthz() -> Response {
    respond(StatusCode::OK, Health { status: "ok", version: env!("CARGO_PKG_VERSION") }, "OK")
}

/// Prometheus text: jobs by state, queue depth, open subscribers by transport, mix durations.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, body = String, content_type = "text/plain", description = "Prometheus text format 0.0.4")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    let (counts, queued) = app.jobs.counts();
    let metrics = app.jobs.metrics();
    let mut text = String::new();
    let _ = writeln!(text, "# HELP mixd_jobs Jobs held, by state.\n# TYPE mixd_jobs gauge");
    for state in JobState::ALL {
        let _ = writeln!(text, "mixd_jobs{{state=\"{}\"}} {}", state.as_str(), counts.get(&state).copied().unwrap_or(0));
    }
    let _ = writeln!(text, "# HELP mixd_queue_depth Jobs waiting for a mixer slot.\n# TYPE mixd_queue_depth gauge\nmixd_queue_depth {queued}");
    let _ = writeln!(text, "# HELP mixd_subscribers Open live-event subscribers.\n# TYPE mixd_subscribers gauge");
    for transport in [Transport::Sse, Transport::WebSocket] {
        let _ = writeln!(text, "mixd_subscribers{{transport=\"{}\"}} {}", transport.label(), metrics.subscribers(transport));
    }
    let _ = writeln!(
        text,
        "# HELP mixd_subscriber_resyncs_total Subscribers that lagged and were resynchronised.\n# TYPE mixd_subscriber_resyncs_total counter\nmixd_subscriber_resyncs_total {}",
        metrics.resyncs()
    );
    let histogram = metrics.mix_durations();
    let _ = writeln!(text, "# HELP mixd_mix_duration_seconds Wall time of completed mixes.\n# TYPE mixd_mix_duration_seconds histogram");
    for (bound, count) in MIX_DURATION_BUCKETS.iter().zip(histogram.buckets) {
        let _ = writeln!(text, "mixd_mix_duration_seconds_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(text, "mixd_mix_duration_seconds_bucket{{le=\"+Inf\"}} {}", histogram.count);
    let _ = writeln!(text, "mixd_mix_duration_seconds_sum {}\nmixd_mix_duration_seconds_count {}", histogram.sum, histogram.count);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, content_type = "application/json", description = "OpenAPI 3.1")))]
pub async fn openapi() -> Response {
    // The document is fixed at build time: generated and serialised once.
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| super::openapi::ApiDoc::openapi().to_json().expect("the OpenAPI document serialises"));
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

/// Unknown paths answer with the envelope too.
pub async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}
