//! `/openapi.json`: the contract, generated from the handlers and types it describes, and the
//! route that serves it.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::schema::Schema;
use utoipa::openapi::{OpenApi as Document, RefOr, Required};
use utoipa::{Modify, OpenApi};

use super::{auth, error, media, mix, projects, service, session, stems, streams};
use crate::ids::{JobId, ProjectId, StemId};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mixd",
        description = "Mixes and masters uploaded stems and pushes every step of each mix job live. \
Every route is also served under the /api prefix. Differences from shared/CONTRACT.md: \
`report.stems` lists each stem's applied offset; report loudness fields are null for a silent mix; \
extra codes TOO_MANY_FILES, BAD_REQUEST (also a Host that is not a host[:port]), MEDIA_NOT_FOUND, NOT_FOUND, \
UNSUPPORTED_MEDIA_TYPE (415: a JSON route's body not sent as application/json), \
TOO_MANY_STREAMS (429 on the stream routes, past --max-streams-per-client for one credential or, on an open server, one address; admin keys are not counted), \
SERVER_BUSY (503 past --max-connections: a reserve of connections answers only /healthz and admin keys), \
TOO_MANY_JOBS (429, Retry-After: 30), QUOTA_EXCEEDED (413) and RATE_LIMITED (429; with --rate-limit every POST and DELETE answer also carries RateLimit-Policy and RateLimit, and `N/m` is accepted beside `N/s`; admin keys are not limited), \
automatic mixing: tracks.<stem>.level_lu is -40..40 and needs auto.balance (422 otherwise), report.stems[] loudness_lufs and auto_gain_db are null without balance, a silent master.reference ends the job INVALID_SETTINGS, report.reference adds width_ratio_reference, and analysis.json's spectrum levels are relative to each file's integrated loudness; the fair queue's positions on every node, /metrics mixd_queued_jobs_by_project (the ten fullest projects) and mixd_refusals_total by code, and job error codes \
OUTPUT_TOO_LONG, INSUFFICIENT_STORAGE, EXPORT_FAILED and INVALID_SETTINGS (the start route refuses such settings with 422 first); \
progress within a stage is published at most every 100 ms per job (a new stage at once); \
queue_position is exact for the first 10 places, and further back is published again when the place has halved since last shown \
or moved back (never below the real place); the legacy /media/{p}/mix_outputs/final_mix.wav is the newest-created complete job's result, \
as the preview names it, on every storage. \
Access (see the security schemes): GET /session says who a credential is; POST /tokens takes an optional `subject` and answers \
INVALID_REQUEST (422) for an out-of-range ttl_s and NO_TOKEN_KEY (409) without a token key; a token without `kid` is accepted \
only when exactly one token key is configured; /openapi.json and GET /session need any valid credential; /media serves job \
results, their analysis (schema Analysis), the newest mix and stem audio only. Without keys every route answers 403 to a non-loopback Host, and state changes \
and WebSocket upgrades to a foreign Origin. Webhooks: `webhook` in the start body; GET .../webhooks lists the attempts. \
Cluster mode: 503 STORE_UNAVAILABLE while the job database cannot be reached (and 503 MEDIA_UNAVAILABLE from /healthz); \
the start route's 202 carries the job as stored (queued, with its position); project and global streams' ids are cursors `{epoch}:{position}` (a cursor of another epoch, from beyond the log, or malformed gets the full snapshot of the scope), \
also sent as `cursor` in their WebSocket frames; /metrics adds mixd_leases_total by event."
    ),
    paths(
        projects::list, stems::upload, stems::list, stems::delete,
        mix::start, mix::job_status, mix::legacy_status, mix::project_status, mix::jobs, mix::cancel, mix::preview,
        streams::job_sse, streams::project_sse, streams::global_sse, streams::job_ws, streams::project_ws, streams::global_ws,
        media::serve,
        service::healthz, service::metrics, openapi, service::webhook_secret,
        session::create, session::show, session::delete, session::mint, mix::webhook_attempts,
    ),
    // The ids are the types of the path and query parameters, and appear in no body of their own.
    components(schemas(ProjectId, JobId, StemId, error::ErrorEnvelope, crate::audio::Analysis)),
    modifiers(&OptionalSettings, &ProjectIdLength, &AccessRequirements, &StoreAvailability, &ClientLimits),
    tags(
        (name = "stems", description = "Upload and manage a project's stems"),
        (name = "mix", description = "Mix jobs and the legacy polling status"),
        (name = "events", description = "Live job events: SSE frames `id: <seq>`, `event: status`, `data: <JobStatus>`; WebSocket text frames `{\"type\":\"status\",\"data\":<JobStatus>}`"),
        (name = "media", description = "Mix results and stems, with byte ranges and ETags"),
        (name = "service", description = "Health, metrics, this document, the webhook secret"),
        (name = "access", description = "Sessions for browsers and scoped tokens"),
    )
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, content_type = "application/json", description = "OpenAPI 3.1")))]
pub async fn openapi() -> Response {
    // The document is fixed at build time: generated and serialised once.
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| ApiDoc::openapi().to_json().expect("the OpenAPI document serialises"));
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

/// The start route's settings body is optional (an empty body means the defaults) but, when
/// present, a MixSettings object and never `null`: utoipa can only say "optional" with a
/// nullable `Option<T>`, so the path declares the object and this marks the body optional.
struct OptionalSettings;

impl Modify for OptionalSettings {
    fn modify(&self, document: &mut Document) {
        let body = document
            .paths
            .paths
            .get_mut("/mix/{project_id}/mix/start")
            .and_then(|item| item.post.as_mut())
            .and_then(|operation| operation.request_body.as_mut())
            .expect("the start route takes a settings body");
        body.required = Some(Required::False);
    }
}

/// `ProjectId`'s pattern already bounds its length; minLength and maxLength say it to clients
/// and tools that read lengths but not patterns. utoipa takes no lengths on a newtype's schema.
struct ProjectIdLength;

impl Modify for ProjectIdLength {
    fn modify(&self, document: &mut Document) {
        let schema = document.components.as_mut().and_then(|components| components.schemas.get_mut("ProjectId"));
        let Some(RefOr::T(Schema::Object(object))) = schema else { panic!("ProjectId is a string schema") };
        object.min_length = Some(1);
        object.max_length = Some(64);
    }
}

/// Each route's security, from the table the access layer checks (`auth::documented_access`):
/// a bearer credential (admin key or token), the session cookie, and for GET streams and media a
/// read token in `?access_token=`; 401 where a credential is needed, and 403 everywhere (a right
/// the credential lacks, or without keys a foreign Host or Origin).
struct AccessRequirements;

impl Modify for AccessRequirements {
    fn modify(&self, document: &mut Document) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
        use utoipa::openapi::{Ref, ResponseBuilder};
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme("session", SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(super::auth::SESSION_COOKIE))));
        components.add_security_scheme("access_token", SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("access_token"))));
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content("application/json", utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorEnvelope"))).build())
                .build()
        };
        for (path, item) in document.paths.paths.iter_mut() {
            let operations = [("get", &mut item.get), ("post", &mut item.post), ("delete", &mut item.delete)];
            for (method, operation) in operations {
                let Some(operation) = operation.as_mut() else { continue };
                let (needs_credential, query_token) = auth::documented_access(method, path);
                operation.responses.responses.entry("403".into()).or_insert_with(|| error("FORBIDDEN").into());
                if !needs_credential {
                    continue;
                }
                operation.responses.responses.entry("401".into()).or_insert_with(|| error("UNAUTHORIZED: no credential, or one that does not verify").into());
                let mut security = vec![SecurityRequirement::new("bearer", Vec::<String>::new()), SecurityRequirement::new("session", Vec::<String>::new())];
                if query_token {
                    security.push(SecurityRequirement::new("access_token", Vec::<String>::new()));
                }
                operation.security = Some(security);
            }
        }
    }
}

/// Every route that reads or writes jobs may find the job database unreachable (in a cluster,
/// PostgreSQL): 503 `STORE_UNAVAILABLE`, for the client to retry.
struct StoreAvailability;

impl Modify for StoreAvailability {
    fn modify(&self, document: &mut Document) {
        use utoipa::openapi::{Ref, ResponseBuilder};
        let unavailable = ResponseBuilder::new()
            .description("STORE_UNAVAILABLE: the job database cannot be reached; try again shortly")
            .content("application/json", utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorEnvelope"))).build())
            .build();
        for (path, item) in document.paths.paths.iter_mut() {
            if !(path.contains("/mix") || path == "/events" || path == "/ws") {
                continue;
            }
            for operation in [&mut item.get, &mut item.post, &mut item.delete].into_iter().flatten() {
                operation.responses.responses.entry("503".into()).or_insert_with(|| unavailable.clone().into());
            }
        }
    }
}

/// The caps of `api::limits` on every route: past the connection cap, 503 `SERVER_BUSY` from the
/// reserve (all but `/healthz` and admins); past a client's stream cap, 429 `TOO_MANY_STREAMS` on
/// the stream routes; past `--rate-limit`, 429 `RATE_LIMITED` on every state change.
struct ClientLimits;

impl Modify for ClientLimits {
    fn modify(&self, document: &mut Document) {
        use utoipa::openapi::{HeaderBuilder, Ref, ResponseBuilder};
        let envelope = || utoipa::openapi::ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorEnvelope"))).build();
        let retry_after = || {
            HeaderBuilder::new()
                .schema(utoipa::openapi::schema::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Integer))
                .description(Some("Seconds to wait"))
                .build()
        };
        const BUSY: &str = "SERVER_BUSY: the server is at its connection limit (only /healthz and admin keys are answered)";
        let too_many = ResponseBuilder::new()
            .description("TOO_MANY_STREAMS: this credential (or address, on an open server) holds the most streams one may")
            .content("application/json", envelope())
            .header("Retry-After", retry_after())
            .build();
        const LIMITED: &str = "RATE_LIMITED: this credential (or address, on an open server) is past --rate-limit; \
            RateLimit-Policy and RateLimit say the policy and when it is whole again";
        let rate_limited = ResponseBuilder::new()
            .description(LIMITED)
            .content("application/json", envelope())
            .header("Retry-After", retry_after())
            .header(
                "RateLimit-Policy",
                HeaderBuilder::new().schema(utoipa::openapi::schema::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String)).build(),
            )
            .header("RateLimit", HeaderBuilder::new().schema(utoipa::openapi::schema::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String)).build())
            .build();
        for (path, item) in document.paths.paths.iter_mut() {
            let is_stream = path.ends_with("/events") || path.ends_with("/ws");
            for operation in [&mut item.post, &mut item.delete].into_iter().flatten() {
                match operation.responses.responses.entry("429".into()).or_insert_with(|| rate_limited.clone().into()) {
                    RefOr::T(response) if response.description != LIMITED => response.description = format!("{}; or {LIMITED}", response.description),
                    _ => {}
                }
            }
            for operation in [&mut item.get, &mut item.post, &mut item.delete, &mut item.put, &mut item.patch].into_iter().flatten() {
                if path != "/healthz" {
                    match operation
                        .responses
                        .responses
                        .entry("503".into())
                        .or_insert_with(|| ResponseBuilder::new().content("application/json", envelope()).build().into())
                    {
                        RefOr::T(response) if response.description.is_empty() => response.description = BUSY.into(),
                        RefOr::T(response) => response.description = format!("{}; or {BUSY}", response.description),
                        RefOr::Ref(_) => {}
                    }
                }
                if is_stream {
                    operation.responses.responses.entry("429".into()).or_insert_with(|| too_many.clone().into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn ids_are_typed_and_their_rejections_documented() {
        let document = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    let id = match parameter["name"].as_str().unwrap() {
                        "project_id" => "ProjectId",
                        "job_id" => "JobId",
                        "stem_id" => "StemId",
                        _ => continue,
                    };
                    assert_eq!(parameter["schema"]["$ref"], format!("#/components/schemas/{id}"), "{method} {path}");
                }
                let responses = &operation["responses"];
                if path.contains("{project_id}") {
                    assert_ne!(responses["400"], Value::Null, "{method} {path}: INVALID_PROJECT_ID is undocumented");
                }
                for (status, response) in responses.as_object().unwrap() {
                    if status.starts_with('4') || status.starts_with('5') {
                        let body = &response["content"]["application/json"]["schema"]["$ref"];
                        assert!(status == "416" || body == "#/components/schemas/ErrorEnvelope", "{method} {path} {status}: no error envelope");
                    }
                }
            }
        }
        let start = &document["paths"]["/mix/{project_id}/mix/start"]["post"];
        assert_eq!((start["responses"]["401"].is_object(), start["security"][0]["bearer"].is_array()), (true, true));
        let events = &document["paths"]["/mix/{project_id}/mix/events"]["get"]["security"];
        assert!(events.as_array().unwrap().iter().any(|s| s["access_token"].is_array()), "streams take a read token in the query");
        assert!(document["paths"]["/healthz"]["get"]["security"].is_null(), "health is open");
        let project_id = &document["components"]["schemas"]["ProjectId"];
        assert_eq!((&project_id["minLength"], &project_id["maxLength"]), (&Value::from(1), &Value::from(64)));
        assert!(document["paths"]["/mix/{project_id}/mix/start"]["post"]["requestBody"]["required"] == false);
    }
}
