//! `/media`: finished mixes and stems, with byte ranges and ETags, from the data root or streamed
//! from object storage. Which paths name a file, and whether it can change, is the layout's to say
//! ([`crate::jobs::MediaLayout::media_name`]): nothing else under the data root or the bucket's
//! prefix, and nothing outside it, is reachable, and directories are never listed. Multi-range requests get the whole file: answering them costs quadratic time in
//! tower-http's implementation (tower-http#660) and players never send them.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorEnvelope};
use super::state::AppState;
use crate::audio::Format;
use crate::jobs::{JobState, JobStatus};
use crate::media::{JobFile, MediaFile, MediaLayout, MediaName, ObjectInfo};

/// A mixed WAV, its analysis, a stem, or the legacy newest mix.
#[utoipa::path(get, path = "/media/{path}", tag = "media",
    params(
        ("path" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*$",
            description = "Plain names (at most 255 characters each) joined by `/`, e.g. p1/mix_outputs/{job_id}/final_mix.wav (or .flac, .mp3, .opus: the files `results` lists), \
p1/mix_outputs/{job_id}/analysis.json (waveform peaks per column at 4096/1024/256 columns, short-term loudness once a second, \
true-peak ceiling hits), or p1/mix_outputs/final_mix.wav for the newest mix"),
        ("Range" = Option<String>, Header, nullable = false, description = "One byte range, `bytes=first-last`, `bytes=first-` or `bytes=-suffix`; anything else gets the whole file"),
        ("If-Range" = Option<String>, Header, nullable = false, description = "An ETag: the range applies only while it matches"),
        ("If-None-Match" = Option<String>, Header, nullable = false, description = "ETags, or `*`: 304 when one matches")),
    responses(
        (status = 200, description = "The file", headers(("ETag" = String), ("Accept-Ranges" = String, description = "bytes"), ("Cache-Control" = String)),
            content(
                (Vec<u8> = "audio/wav"), (Vec<u8> = "audio/flac"), (Vec<u8> = "audio/mpeg"), (Vec<u8> = "audio/ogg"), (Vec<u8> = "audio/mp4"),
                (Vec<u8> = "audio/aac"), (Vec<u8> = "audio/aiff"), (crate::audio::Analysis = "application/json"), (Vec<u8> = "application/octet-stream"))),
        (status = 206, description = "The requested range", headers(("Content-Range" = String), ("ETag" = String)),
            content(
                (Vec<u8> = "audio/wav"), (Vec<u8> = "audio/flac"), (Vec<u8> = "audio/mpeg"), (Vec<u8> = "audio/ogg"), (Vec<u8> = "audio/mp4"),
                (Vec<u8> = "audio/aac"), (Vec<u8> = "audio/aiff"), (Vec<u8> = "application/json"), (Vec<u8> = "application/octet-stream"))),
        (status = 302, description = "With --media-redirect (object storage only): a presigned URL to the object, valid for 5 minutes", headers(("Location" = String))),
        (status = 304, description = "Not modified: If-None-Match matched"),
        (status = 404, body = ErrorEnvelope, description = "MEDIA_NOT_FOUND"),
        (status = 416, description = "The range starts past the end", headers(("Content-Range" = String, description = "bytes */{length}"))),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL"),
        (status = 503, body = ErrorEnvelope, description = "MEDIA_UNAVAILABLE: the object storage did not answer", headers(("Retry-After" = u32)))))]
pub async fn serve(State(app): State<AppState>, path: Result<Path<String>, PathRejection>, headers: HeaderMap) -> Result<Response, ApiError> {
    // A path that is not UTF-8 once percent-decoded names no file either.
    let Ok(Path(path)) = path else { return Err(ApiError::MediaNotFound) };
    let name = MediaLayout::media_name(&path).ok_or(ApiError::MediaNotFound)?;
    let immutable = name.is_immutable();
    let source = app.media.open(&media_file(&app, name).await?).await.map_err(ApiError::media)?;
    if app.config.media_redirect {
        if let Some(url) = source.presigned_url(REDIRECT_VALIDITY).await {
            let url = url.map_err(ApiError::media)?;
            let location = HeaderValue::from_str(url.as_str()).map_err(|err| ApiError::Internal(err.to_string()))?;
            return Ok((StatusCode::FOUND, [(header::LOCATION, location), (header::CACHE_CONTROL, HeaderValue::from_static("no-store"))]).into_response());
        }
    }
    let ObjectInfo { bytes: length, modified_nanos } = source.info();
    let etag = format!("\"{length:x}-{modified_nanos:x}\"");

    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
    response_headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let cache = if immutable { "public, max-age=31536000, immutable" } else { "no-cache" };
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));

    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*")) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let if_range_ok = headers.get(header::IF_RANGE).is_none_or(|v| v.to_str().is_ok_and(|v| v == etag));
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).filter(|_| if_range_ok).map(|v| parse_range(v, length));

    let (status, start, count) = match range {
        None | Some(RangeRequest::Ignored) => (StatusCode::OK, 0, length),
        Some(RangeRequest::Unsatisfiable) => {
            response_headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{length}")).expect("digits"));
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, response_headers).into_response());
        }
        Some(RangeRequest::Bytes(start, end)) => {
            let value = format!("bytes {start}-{end}/{length}");
            response_headers.insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("digits"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    let body = Body::from_stream(source.read(start..start + count).await.map_err(ApiError::media)?);
    Ok((status, response_headers, body).into_response())
}

/// How long a presigned `/media` redirect stays valid: long enough to start playing, short enough
/// that a leaked URL soon stops working.
const REDIRECT_VALIDITY: Duration = Duration::from_secs(300);

/// The file behind a `/media` name, by one rule on every storage and node. A job's outputs are
/// served only once the job is complete (and then, on object storage, from the run that completed
/// it); a job forgotten after its TTL is complete or gone, so its outputs, while kept, are served.
/// The legacy newest-mix path is the newest complete job's result, as `/mix/{p}/mix/preview`
/// names it ([`crate::jobs::Jobs::newest_complete`]).
async fn media_file(app: &AppState, name: MediaName) -> Result<MediaFile, ApiError> {
    match name {
        MediaName::Stem { project, stem_id, format } => Ok(MediaFile::Stem { project, stem_id, format }),
        MediaName::Newest { project } => {
            let newest = app.jobs.newest_complete(&project).ok_or(ApiError::MediaNotFound)?;
            if !has_mix(&newest.status, Format::Wav) {
                return Err(ApiError::MediaNotFound);
            }
            Ok(MediaFile::Result { project, job_id: newest.status.job_id(), file: JobFile::Mix(Format::Wav) })
        }
        MediaName::Result { project, job_id, file } => match app.jobs.find(job_id).await? {
            Some(event) if event.status.project_id() != &project || event.status.state() != JobState::Complete => Err(ApiError::MediaNotFound),
            Some(event) if matches!(file, JobFile::Mix(format) if !has_mix(&event.status, format)) => Err(ApiError::MediaNotFound),
            _ => Ok(MediaFile::Result { project, job_id, file }),
        },
    }
}

/// Whether a complete job delivered its mix in `format` (a job completed before formats delivered
/// the WAV alone).
fn has_mix(status: &JobStatus, format: Format) -> bool {
    match status.results() {
        Some(results) => results.iter().any(|result| result.format == format),
        None => format == Format::Wav,
    }
}

fn content_type(path: &str) -> &'static str {
    let extension = path.rsplit('.').next().unwrap_or_default().to_ascii_lowercase();
    if let Some(format) = Format::from_extension(&extension) {
        return format.content_type();
    }
    match extension.as_str() {
        "ogg" => "audio/ogg",
        "m4a" => "audio/mp4",
        "aac" => "audio/aac",
        "aiff" => "audio/aiff",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

#[derive(Debug, PartialEq)]
enum RangeRequest {
    /// Inclusive byte range.
    Bytes(u64, u64),
    Unsatisfiable,
    /// Not a single byte range we answer: serve the whole file.
    Ignored,
}

fn parse_range(value: &str, length: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return RangeRequest::Ignored };
    if spec.contains(',') {
        return RangeRequest::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeRequest::Ignored };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => (start, end.min(length.saturating_sub(1))),
        (Ok(start), Err(_)) if last.is_empty() => (start, length.saturating_sub(1)),
        (Err(_), Ok(suffix)) if first.is_empty() && suffix > 0 => (length.saturating_sub(suffix), length.saturating_sub(1)),
        _ => return RangeRequest::Ignored,
    };
    if length == 0 || range.0 >= length {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Bytes(range.0, range.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_per_rfc_9110() {
        assert_eq!(parse_range("bytes=0-99", 1000), RangeRequest::Bytes(0, 99));
        assert_eq!(parse_range("bytes=900-", 1000), RangeRequest::Bytes(900, 999));
        assert_eq!(parse_range("bytes=-100", 1000), RangeRequest::Bytes(900, 999));
        assert_eq!(parse_range("bytes=990-2000", 1000), RangeRequest::Bytes(990, 999));
        assert_eq!(parse_range("bytes=1000-", 1000), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-9", 1000), RangeRequest::Ignored);
        assert_eq!(parse_range("items=0-1", 1000), RangeRequest::Ignored);
        assert_eq!(parse_range("bytes=9-1", 1000), RangeRequest::Ignored);
    }
}
