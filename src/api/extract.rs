//! Extractors whose rejections go through [`ApiError`], so a bad id answers with the contract's
//! code instead of axum's plain-text rejection. The path structs double as the document's path
//! parameters, so the ids there carry the same types (and patterns) the handlers parse.

use axum::extract::FromRequestParts;
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use crate::jobs::{JobId, ProjectId, StemId};

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProjectPath {
    pub project_id: ProjectId,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct JobPath {
    pub project_id: ProjectId,
    /// A malformed id is answered like an unknown one: 404 `JOB_NOT_FOUND`.
    pub job_id: JobId,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StemPath {
    pub project_id: ProjectId,
    /// A malformed id is answered like an unknown one: 404 `STEM_NOT_FOUND`.
    pub stem_id: StemId,
}
