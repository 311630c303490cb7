//! `/openapi.json`: the contract, generated from the handlers and types it describes.

use utoipa::openapi::schema::Schema;
use utoipa::openapi::{OpenApi as Document, RefOr, Required};
use utoipa::{Modify, OpenApi};

use super::{error, media, mix, service, stems, streams};
use crate::jobs::{JobId, ProjectId, StemId};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mixd",
        description = "Mixes and masters uploaded stems and pushes every step of each mix job live. \
Every route is also served under the /api prefix. Differences from shared/CONTRACT.md: \
`report.stems` lists each stem's applied offset; report loudness fields are null for a silent mix; \
extra codes TOO_MANY_FILES, BAD_REQUEST, MEDIA_NOT_FOUND, NOT_FOUND and job error codes \
OUTPUT_TOO_LONG, INSUFFICIENT_STORAGE, EXPORT_FAILED and INVALID_SETTINGS (the start route refuses such settings with 422 first); \
progress within a stage is published at most every 100 ms per job (a new stage at once)."
    ),
    paths(
        stems::upload, stems::list, stems::delete,
        mix::start, mix::job_status, mix::legacy_status, mix::project_status, mix::jobs, mix::cancel, mix::preview,
        streams::job_sse, streams::project_sse, streams::global_sse, streams::job_ws, streams::project_ws, streams::global_ws,
        media::serve,
        service::healthz, service::metrics, service::openapi,
    ),
    // The ids are the types of the path and query parameters, and appear in no body of their own.
    components(schemas(ProjectId, JobId, StemId, error::ErrorEnvelope)),
    modifiers(&OptionalSettings, &ProjectIdLength),
    tags(
        (name = "stems", description = "Upload and manage a project's stems"),
        (name = "mix", description = "Mix jobs and the legacy polling status"),
        (name = "events", description = "Live job events: SSE frames `id: <seq>`, `event: status`, `data: <JobStatus>`; WebSocket text frames `{\"type\":\"status\",\"data\":<JobStatus>}`"),
        (name = "media", description = "Mix results and stems, with byte ranges and ETags"),
        (name = "service", description = "Health, metrics, this document"),
    )
)]
pub struct ApiDoc;

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
        let project_id = &document["components"]["schemas"]["ProjectId"];
        assert_eq!((&project_id["minLength"], &project_id["maxLength"]), (&Value::from(1), &Value::from(64)));
        assert!(document["paths"]["/mix/{project_id}/mix/start"]["post"]["requestBody"]["required"] == false);
    }
}
