//! `/openapi.json`: the contract, generated from the handlers and types it describes.

use utoipa::OpenApi;

use super::{media, mix, service, stems, streams};

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
    tags(
        (name = "stems", description = "Upload and manage a project's stems"),
        (name = "mix", description = "Mix jobs and the legacy polling status"),
        (name = "events", description = "Live job events: SSE frames `id: <seq>`, `event: status`, `data: <JobStatus>`; WebSocket text frames `{\"type\":\"status\",\"data\":<JobStatus>}`"),
        (name = "media", description = "Mix results and stems, with byte ranges and ETags"),
        (name = "service", description = "Health, metrics, this document"),
    )
)]
pub struct ApiDoc;
