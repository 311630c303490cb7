//! HTTP: routes, the envelope, streams and media. Handlers translate between HTTP and the jobs
//! layer and nothing else; every error becomes the envelope in `error.rs`.

mod auth;
mod connection;
mod error;
mod extract;
mod limits;
mod media;
mod mix;
mod openapi;
mod projects;
mod service;
mod session;
mod state;
mod stems;
mod streams;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware;
use axum::routing::{delete, get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

pub use connection::{serve as serve_connection, ConnectionConfig};
pub use limits::{default_max_connections, ConnectionLimits, ConnectionPlace, RateLimits, StreamLimits};
pub use state::{App, AppState};

/// The dashboard loads only its own scripts, styles and media and talks only to its own server;
/// no page may frame it (clickjacking), and nothing it serves is sniffed into another type. With
/// `--media-redirect`, `/media` answers with a redirect to the bucket, which the browser checks
/// against the policy again: media and the analysis may then come from any https origin.
fn dashboard_policy(media_redirect: bool) -> HeaderValue {
    let elsewhere = if media_redirect { " https:" } else { "" };
    let policy = format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'{elsewhere}; connect-src 'self'{elsewhere}; \
         object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy).expect("the policy is ASCII")
}

/// Every route, served at its own path and under `/api` (the legacy frontend's base URL), with
/// the dashboard from `static/` for everything else.
pub fn router(state: AppState) -> Router {
    let upload_limit = usize::try_from(state.config.max_upload_bytes()).unwrap_or(usize::MAX);
    let routes: Router<AppState> = Router::new()
        .route("/projects", get(projects::list))
        .route("/projects/{project_id}/stems", post(stems::upload).get(stems::list).layer(DefaultBodyLimit::max(upload_limit)))
        .route("/projects/{project_id}/stems/{stem_id}", delete(stems::delete))
        .route("/projects/{project_id}/mix/status", get(mix::legacy_status))
        .route("/mix/{project_id}/mix/start", post(mix::start).layer(DefaultBodyLimit::max(mix::MAX_SETTINGS_MB as usize * 1024 * 1024)))
        .route("/mix/{project_id}/mix/status", get(mix::project_status))
        .route("/mix/{project_id}/mix/jobs", get(mix::jobs))
        .route("/mix/{project_id}/mix/preview", get(mix::preview))
        .route("/mix/{project_id}/mix/job/{job_id}", delete(mix::cancel))
        .route("/mix/{project_id}/mix/job/{job_id}/status", get(mix::job_status))
        .route("/mix/{project_id}/mix/job/{job_id}/events", get(streams::job_sse))
        .route("/mix/{project_id}/mix/job/{job_id}/ws", get(streams::job_ws))
        .route("/mix/{project_id}/mix/events", get(streams::project_sse))
        .route("/mix/{project_id}/mix/ws", get(streams::project_ws))
        .route("/events", get(streams::global_sse))
        .route("/ws", get(streams::global_ws))
        .route("/media/{*path}", get(media::serve))
        .route("/healthz", get(service::healthz))
        .route("/metrics", get(service::metrics))
        .route("/openapi.json", get(openapi::openapi))
        .route("/session", post(session::create).get(session::show).delete(session::delete))
        .route("/tokens", post(session::mint))
        .route("/mix/{project_id}/mix/job/{job_id}/webhooks", get(mix::webhook_attempts))
        .route("/webhooks/secret", get(service::webhook_secret))
        // After routing, so the check knows the route; before every handler and upgrade.
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::authorize));
    let dashboard = tower::ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(header::CONTENT_SECURITY_POLICY, dashboard_policy(state.config.media_redirect)))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::overriding(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .service(ServeDir::new(&state.config.static_dir).not_found_service(get(service::not_found).with_state(state.clone())));
    let cors = cors(&state.config.allowed_origins);
    Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .fallback_service(dashboard)
        .layer(cors)
        // The request's span names its path only: a query string may carry a token.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<_>| tracing::info_span!("request", method = %request.method(), path = %request.uri().path())),
        )
        .with_state(state)
}

/// CORS for the listed origins, with credentials (so never `*`); with none listed, no
/// cross-origin request is allowed.
fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|origin| HeaderValue::from_str(origin.trim_end_matches('/')).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("idempotency-key"), HeaderName::from_static("last-event-id")])
        .expose_headers([
            header::LOCATION,
            header::RETRY_AFTER,
            header::ETAG,
            header::CONTENT_RANGE,
            HeaderName::from_static("ratelimit"),
            HeaderName::from_static("ratelimit-policy"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_media_redirects_the_dashboard_may_play_and_read_from_the_bucket() {
        let policy = |redirect| dashboard_policy(redirect).to_str().unwrap().to_string();
        assert!(policy(false).contains("media-src 'self'; connect-src 'self';"));
        assert!(policy(true).contains("media-src 'self' https:; connect-src 'self' https:;"));
        assert!(policy(true).ends_with("frame-ancestors 'none'"));
    }
}
