//! The project picker's list: every project with stems or jobs, most recently updated first.

use std::collections::HashSet;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{respond, ApiError, Envelope, ErrorEnvelope};
use super::state::AppState;
use crate::access::Caller;
use crate::ids::{ProjectId, Timestamp};
use crate::jobs::JobStatus;

#[derive(Serialize, ToSchema)]
pub struct ProjectSummary {
    pub project_id: ProjectId,
    /// How many stems it has.
    pub stems: usize,
    /// The stems' bytes.
    pub size_bytes: u64,
    /// Its newest job, as last published; null when it has none.
    pub newest_job: Option<JobStatus>,
    /// When a stem was last added or a job last changed.
    pub updated_at: Timestamp,
}

#[derive(Serialize, ToSchema)]
pub struct ProjectList {
    pub projects: Vec<ProjectSummary>,
}

/// Every project with stems or jobs, most recently updated first. A scoped token sees only its
/// own project.
#[utoipa::path(get, path = "/projects", tag = "stems",
    responses((status = 200, body = Envelope<ProjectList>), (status = 500, body = ErrorEnvelope, description = "INTERNAL"),
        (status = 503, body = ErrorEnvelope, description = "MEDIA_UNAVAILABLE: the object storage did not answer", headers(("Retry-After" = u32)))))]
pub async fn list(State(app): State<AppState>, Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    let stored = app.media.projects().await.map_err(ApiError::media)?;
    let mut newest = app.jobs.newest_by_project();
    let mut ids: HashSet<ProjectId> = stored.into_iter().chain(newest.keys().cloned()).collect();
    if let Some(only) = caller.only_project() {
        ids.retain(|project| project == only);
    }
    let mut projects = Vec::with_capacity(ids.len());
    for project_id in ids {
        let stems = app.stems.list(&project_id).await.map_err(ApiError::media)?;
        let newest_job = newest.remove(&project_id).map(|event| event.status.clone());
        let last_stem = stems.iter().map(|stem| stem.created_at).max();
        let Some(updated_at) = last_stem.into_iter().chain(newest_job.as_ref().map(JobStatus::updated_at)).max() else {
            // A directory with neither stems nor jobs (everything deleted) is no project.
            continue;
        };
        projects.push(ProjectSummary { project_id, stems: stems.len(), size_bytes: stems.iter().map(|stem| stem.size_bytes).sum(), newest_job, updated_at });
    }
    projects.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then_with(|| a.project_id.as_str().cmp(b.project_id.as_str())));
    Ok(respond(StatusCode::OK, ProjectList { projects }, "Projects retrieved successfully"))
}
