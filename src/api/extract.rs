//! Extractors whose rejections go through [`ApiError`], so a bad id answers with the contract's
//! code instead of axum's plain-text rejection. Path ids are taken as text and parsed in path
//! order, so the first bad one decides the answer, by its typed error. The path structs double
//! as the document's path parameters, so the ids there carry the same types (and patterns).

use axum::extract::{FromRequest, FromRequestParts, Path};
use axum::http::request::Parts;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use crate::ids::{JobId, ProjectId, StemId};

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProjectPath {
    pub project_id: ProjectId,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JobPath {
    pub project_id: ProjectId,
    /// A malformed id is answered like an unknown one: 404 `JOB_NOT_FOUND`.
    pub job_id: JobId,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StemPath {
    pub project_id: ProjectId,
    /// A malformed id is answered like an unknown one: 404 `STEM_NOT_FOUND`.
    pub stem_id: StemId,
}

#[derive(Deserialize)]
struct RawPath {
    project_id: String,
    job_id: Option<String>,
    stem_id: Option<String>,
}

async fn raw_path<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<RawPath, ApiError> {
    let Path(raw) = Path::<RawPath>::from_request_parts(parts, state).await?;
    Ok(raw)
}

impl<S: Send + Sync> FromRequestParts<S> for ProjectPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = raw_path(parts, state).await?;
        Ok(Self { project_id: raw.project_id.parse()? })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = raw_path(parts, state).await?;
        let project_id = raw.project_id.parse()?;
        Ok(Self { project_id, job_id: raw.job_id.unwrap_or_default().parse()? })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for StemPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = raw_path(parts, state).await?;
        let project_id = raw.project_id.parse()?;
        Ok(Self { project_id, stem_id: raw.stem_id.unwrap_or_default().parse()? })
    }
}
