//! Extractors whose rejections go through [`ApiError`], so a bad id answers with the contract's
//! code instead of axum's plain-text rejection.

use axum::extract::FromRequestParts;
use serde::Deserialize;

use super::error::ApiError;
use crate::jobs::{JobId, ProjectId, StemId};

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(Deserialize)]
pub struct ProjectPath {
    pub project_id: ProjectId,
}

#[derive(Deserialize)]
pub struct JobPath {
    pub project_id: ProjectId,
    pub job_id: JobId,
}

#[derive(Deserialize)]
pub struct StemPath {
    pub project_id: ProjectId,
    pub stem_id: StemId,
}
