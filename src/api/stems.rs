//! Stem upload, listing and deletion. Uploads stream to disk part by part, are decoded in full
//! off the runtime, and are kept only if they decode; a refused or interrupted upload leaves
//! nothing behind.

use std::path::{Path, PathBuf};

use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::error::{multipart_error, respond, ApiError, Envelope, ErrorEnvelope};
use super::extract::{ProjectPath, StemPath};
use super::state::AppState;
use crate::audio::{probe_stem, MAX_PROBE_TIME};
use crate::ids::{ProjectId, StemId};
use crate::jobs::{Store, StoreError};
use crate::media::{sanitize_file_name, Stem};

#[derive(Serialize, ToSchema)]
pub struct StemList {
    pub stems: Vec<Stem>,
}

#[derive(Serialize, ToSchema)]
pub struct DeletedStem {
    pub stem_id: StemId,
}

/// The upload form, for the document only: the handler streams whatever file parts come.
/// Every part with a file name is a stem, whatever its field name, and other parts are ignored;
/// the document names one field so that clients generated from it send a well-formed form.
pub struct StemUpload;

impl PartialSchema for StemUpload {
    fn schema() -> RefOr<Schema> {
        let file = ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/octet-stream")
            .description(Some("An audio file that decodes in full; its file name is kept, sanitised"));
        ObjectBuilder::new()
            .property("files", ArrayBuilder::new().items(file).min_items(Some(1)))
            .required("files")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .description(Some("One or more file parts, at most --max-files (default 64) in all"))
            .into()
    }
}

impl ToSchema for StemUpload {}

/// Upload stems as multipart/form-data file parts.
#[utoipa::path(post, path = "/projects/{project_id}/stems", tag = "stems",
    params(ProjectPath),
    request_body(content = StemUpload, content_type = "multipart/form-data"),
    responses(
        (status = 201, body = Envelope<StemList>),
        (status = 400, body = ErrorEnvelope, description = "NO_FILES, TOO_MANY_FILES, INVALID_PROJECT_ID, or BAD_REQUEST for a malformed or interrupted form"),
        (status = 413, body = ErrorEnvelope, description = "PAYLOAD_TOO_LARGE: over --max-upload-mb (default 512 MiB); or QUOTA_EXCEEDED: the project's stems would pass --project-quota-gb (nothing of the upload is kept)"),
        (status = 415, body = ErrorEnvelope, description = "UNSUPPORTED_AUDIO, naming the file and where it fails"),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL"),
        (status = 507, body = ErrorEnvelope, description = "INSUFFICIENT_STORAGE"),
        (status = 503, body = ErrorEnvelope, description = "MEDIA_UNAVAILABLE: the object storage did not answer (with --storage)", headers(("Retry-After" = u32)))))]
pub async fn upload(
    State(app): State<AppState>,
    ProjectPath { project_id }: ProjectPath,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let limit = app.config.max_upload_bytes();
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        // Refused before a byte of the body is read.
        return Err(ApiError::PayloadTooLarge(app.config.max_upload_mb));
    }
    let mut multipart = multipart?;
    let mut stored: Vec<Stem> = Vec::new();
    let received = async {
        while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, app.config.max_upload_mb))? {
            if field.file_name().is_none() {
                continue;
            }
            if stored.len() >= app.config.max_files {
                return Err(ApiError::TooManyFiles(app.config.max_files));
            }
            stored.push(receive_file(&app, &project_id, field).await?);
        }
        Ok(())
    }
    .await;
    if let Err(err) = received {
        // All or nothing: one refused file refuses the request.
        for stem in &stored {
            if let Err(err) = delete_stem(&app, &project_id, stem.stem_id).await {
                tracing::warn!(%err, stem_id = %stem.stem_id, "could not remove a stem of a refused upload");
            }
        }
        return Err(err);
    }
    if stored.is_empty() {
        return Err(ApiError::NoFiles);
    }
    let message = format!("{} stem(s) uploaded", stored.len());
    Ok(respond(StatusCode::CREATED, StemList { stems: stored }, message))
}

async fn receive_file(app: &AppState, project: &ProjectId, field: Field<'_>) -> Result<Stem, ApiError> {
    let name = sanitize_file_name(field.file_name().unwrap_or_default());
    let path = app.stems.upload_path(project).await.map_err(ApiError::storage)?;
    // Removes the partial file should the request be dropped half-way; a refused file is
    // removed before the answer goes out.
    let partial = PartialFile(Some(path.clone()));
    match store_file(app, project, field, &path, name).await {
        Ok(stem) => {
            partial.keep();
            tracing::info!(stem_id = %stem.stem_id, name = %stem.name, "stem stored");
            Ok(stem)
        }
        Err(err) => {
            partial.keep();
            if let Err(io) = tokio::fs::remove_file(&path).await {
                if io.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), err = %io, "could not remove a refused upload");
                }
            }
            Err(err)
        }
    }
}

/// Streams one file part to `path`, decodes it in full and stores it as a stem.
async fn store_file(app: &AppState, project: &ProjectId, mut field: Field<'_>, path: &Path, name: String) -> Result<Stem, ApiError> {
    let mut file = tokio::fs::File::create(path).await.map_err(ApiError::storage)?;
    let mut size = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, app.config.max_upload_mb))? {
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(ApiError::storage)?;
    }
    file.flush().await.map_err(ApiError::storage)?;
    file.sync_all().await.map_err(ApiError::storage)?;
    drop(file);
    if size == 0 {
        return Err(ApiError::UnsupportedAudio(format!("\"{name}\" is empty")));
    }

    let (probe_path, probe_name) = (path.to_path_buf(), name.clone());
    // The probe checks its own clock between packets; this outer deadline covers a decoder stuck
    // inside one packet, whose thread cannot be stopped but whose request still gets an answer.
    let probe = tokio::task::spawn_blocking(move || probe_stem(&probe_path, &probe_name));
    let info = tokio::time::timeout(MAX_PROBE_TIME + std::time::Duration::from_secs(30), probe)
        .await
        .map_err(|_| ApiError::UnsupportedAudio(format!("Stem \"{name}\" could not be decoded in time; the file looks malformed")))?
        .map_err(|err| ApiError::Internal(format!("probe task: {err}")))?
        .map_err(|err| ApiError::UnsupportedAudio(err.to_string()))?;
    let reservation = reserve(app, project, size).await?;
    let stem = app.stems.commit(project, path, name, info, size).await.map_err(ApiError::media)?;
    // The stem is stored: failing the upload now would leave it behind. Its bytes stay counted;
    // only a later delete of it will not give them back.
    if let Err(err) = reservation.keep(stem.stem_id).await {
        tracing::warn!(%err, stem_id = %stem.stem_id, "could not record a stored stem's bytes");
    }
    Ok(stem)
}

struct PartialFile(Option<PathBuf>);

impl PartialFile {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            // A drop cannot wait: the file goes on the blocking pool, off the request's thread.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || remove_quietly(&path))),
                Err(_) => remove_quietly(&path),
            }
        }
    }
}

fn remove_quietly(path: &Path) {
    if let Err(err) = std::fs::remove_file(path) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %err, "could not remove a partial upload");
        }
    }
}

/// The project's stems, oldest first.
#[utoipa::path(get, path = "/projects/{project_id}/stems", tag = "stems",
    params(ProjectPath),
    responses(
        (status = 200, body = Envelope<StemList>),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL"),
        (status = 503, body = ErrorEnvelope, description = "MEDIA_UNAVAILABLE: the object storage did not answer (with --storage)", headers(("Retry-After" = u32)))))]
pub async fn list(State(app): State<AppState>, ProjectPath { project_id }: ProjectPath) -> Result<Response, ApiError> {
    let stems = app.stems.list(&project_id).await.map_err(ApiError::media)?;
    Ok(respond(StatusCode::OK, StemList { stems }, "Stems retrieved successfully"))
}

/// Delete a stem: its file and its record.
#[utoipa::path(delete, path = "/projects/{project_id}/stems/{stem_id}", tag = "stems",
    params(StemPath),
    responses(
        (status = 200, body = Envelope<DeletedStem>),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "STEM_NOT_FOUND"),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL"),
        (status = 503, body = ErrorEnvelope, description = "MEDIA_UNAVAILABLE: the object storage did not answer (with --storage)", headers(("Retry-After" = u32)))))]
pub async fn delete(State(app): State<AppState>, StemPath { project_id, stem_id }: StemPath) -> Result<Response, ApiError> {
    delete_stem(&app, &project_id, stem_id).await?.ok_or(ApiError::StemNotFound)?;
    Ok(respond(StatusCode::OK, DeletedStem { stem_id }, "Stem deleted"))
}

/// Removes a stem and gives its bytes back to the project's quota (once, however many requests
/// delete it at once: object storage answers each of them as if it had).
async fn delete_stem(app: &AppState, project: &ProjectId, stem_id: StemId) -> Result<Option<Stem>, ApiError> {
    let deleted = app.stems.delete(project, stem_id).await.map_err(ApiError::media)?;
    if deleted.is_some() {
        app.jobs.store().forget_stem(stem_id).await?;
    }
    Ok(deleted)
}

/// Takes `bytes` of the project's quota for a file about to be stored, or refuses it. The
/// project's usage is on record from the first upload that needs it, taken then from its stems
/// as listed; every upload and delete after moves it in the database, the reservation in one
/// conditional statement, so uploads at once on any node count exactly.
async fn reserve(app: &AppState, project: &ProjectId, bytes: u64) -> Result<Reservation, ApiError> {
    let store = app.jobs.store();
    let quota = app.config.project_quota_bytes();
    // One statement when the project's usage is on record; only a refusal asks whether it is.
    let mut reserved = store.reserve_bytes(project, bytes, quota).await?;
    if !reserved {
        if !store.usage_known(project).await? {
            let stems = app.stems.list(project).await.map_err(ApiError::media)?;
            store.start_usage(project, stems.iter().map(|stem| (stem.stem_id, stem.size_bytes)).collect()).await?;
        }
        // Asked again even when another upload put the usage on record after the refusal: the
        // refusal may have found no record, not too little room.
        reserved = store.reserve_bytes(project, bytes, quota).await?;
    }
    if !reserved {
        return Err(ApiError::QuotaExceeded(app.config.project_quota_gb.unwrap_or(f64::INFINITY)));
    }
    Ok(Reservation { store: store.clone(), project: project.clone(), bytes, kept: false })
}

/// Bytes reserved for a file about to be stored: given back unless its stem is counted (an error,
/// or the request dropped when its client left half-way).
struct Reservation {
    store: Store,
    project: ProjectId,
    bytes: u64,
    kept: bool,
}

impl Reservation {
    async fn keep(mut self, stem_id: StemId) -> Result<(), StoreError> {
        self.kept = true;
        self.store.count_stem(&self.project, stem_id, self.bytes).await
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let (store, project, bytes) = (self.store.clone(), self.project.clone(), self.bytes);
        // A drop cannot wait: the release runs on its own, and outlives a dropped request.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = store.release_bytes(&project, bytes).await {
                    tracing::warn!(%err, %project, bytes, "could not give back the bytes of an upload that was not kept");
                }
            });
        }
    }
}
