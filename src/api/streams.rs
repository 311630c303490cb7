//! Live events over SSE and WebSocket: thin adapters over the subscription core in
//! `jobs::feed`, at job, project and global scope.

use std::convert::Infallible;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use super::error::{ApiError, ErrorEnvelope};
use super::extract::{ApiQuery, JobPath, ProjectPath};
use super::mix::find_job;
use super::state::AppState;
use std::sync::Arc;

use super::limits::{Client, ConnectionPlace};
use crate::access::Caller;
use crate::ids::ProjectId;
use crate::jobs::{feed, JobEvent, Jobs, Resume, Scope, Transport, FRAMINGS};

/// Tells EventSource to reconnect after 2 s; the first bytes of every SSE stream.
const SSE_RETRY: &[u8] = b"retry: 2000\n\n";
/// An empty comment, so that proxies and browsers see an idle stream is still alive.
const SSE_KEEP_ALIVE: &[u8] = b":\n\n";
const SSE_KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
const WS_PING: Duration = Duration::from_secs(20);
/// A WebSocket client that cannot take a frame within this long is closed as a slow consumer.
const WS_SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients only ever send control frames; anything large is abuse.
const WS_MAX_MESSAGE: usize = 64 * 1024;
/// tungstenite allocates a 128 KiB read buffer per connection by default, and zero-fills all of
/// it on every read: most of an idle subscriber's memory, for a client that only sends control
/// frames (at most 131 bytes). Larger messages still arrive: the buffer grows for them.
const WS_READ_BUFFER: usize = 1024;
/// Frames are gathered up to this size before a write, so a batch of statuses is one system
/// call; a client that lets 1 MiB pile up is a slow consumer and is closed.
const WS_WRITE_BUFFER: usize = 16 * 1024;
/// At most this many waiting statuses are sent together.
const WS_BATCH: usize = 32;
const WS_MAX_WRITE_BUFFER: usize = 1024 * 1024;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResumeQuery {
    /// The seq to resume after, for clients that cannot set `Last-Event-ID`; the header wins.
    #[param(nullable = false)]
    pub last_event_id: Option<u64>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CursorQuery {
    /// The cursor to resume after (the `id` of the last event received), for clients that cannot
    /// set `Last-Event-ID`; the header wins. Every job of the scope that changed after it is sent
    /// first, finished ones included; an unknown or expired cursor sends every job still held.
    #[param(nullable = false)]
    pub last_event_id: Option<String>,
}

/// Where a project or global stream picks up: `Last-Event-ID`, else `?last_event_id=`, else now.
fn cursor_resume(jobs: &Jobs, headers: &HeaderMap, query: CursorQuery) -> Resume {
    let given = headers.get("last-event-id").and_then(|value| value.to_str().ok()).map(str::to_string).or(query.last_event_id);
    match given {
        Some(cursor) => jobs.resume_from(&cursor),
        None => Resume::Now,
    }
}

/// The headers of a WebSocket handshake (RFC 6455, 4.1), for the document only: [`accept`]
/// checks them, and a request without them is not a handshake (400). Header names and the
/// `Connection` and `Upgrade` values are case-insensitive.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct Handshake {
    /// A list that includes the `Upgrade` token.
    #[param(rename = "Connection", pattern = "(^|,)[ \\t]*[Uu][Pp][Gg][Rr][Aa][Dd][Ee][ \\t]*(,|$)")]
    connection: String,
    #[param(rename = "Upgrade", pattern = "^[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]$")]
    upgrade: String,
    #[param(rename = "Sec-WebSocket-Version", pattern = "^13$")]
    version: String,
    /// 16 random bytes, base64.
    #[param(rename = "Sec-WebSocket-Key", pattern = "^[A-Za-z0-9+/]{21}[AQgw]==$")]
    key: String,
}

/// SSE for one job: `id: <seq>`, `event: status`, the JobStatus as data; closes after the
/// terminal event. A `Last-Event-ID` that is already the terminal seq gets 204.
#[utoipa::path(get, path = "/mix/{project_id}/mix/job/{job_id}/events", tag = "events",
    params(JobPath, ResumeQuery,
        ("Last-Event-ID" = Option<u64>, Header, nullable = false, description = "The seq to resume after (EventSource sends it on reconnect); a value that is not a seq is ignored")),
    responses(
        (status = 200, content_type = "text/event-stream", description = "JobStatus events; closes after the terminal one",
            headers(("Cache-Control" = String, description = "no-cache"), ("X-Accel-Buffering" = String, description = "no"))),
        (status = 204, description = "The resume point is already the terminal event"),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID, or BAD_REQUEST for a malformed query string"),
        (status = 404, body = ErrorEnvelope, description = "JOB_NOT_FOUND")))]
pub async fn job_sse(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(client): Extension<Client>,
    JobPath { project_id, job_id }: JobPath,
    ApiQuery(query): ApiQuery<ResumeQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let status = &find_job(&app, &project_id, job_id).await?.status;
    let resume_after = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()).or(query.last_event_id);
    if status.state().is_terminal() && resume_after.is_some_and(|seq| seq >= status.seq()) {
        // 204 is what stops an EventSource from reconnecting.
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    sse(&app, &caller, client, Scope::Job(project_id, job_id), resume_after.map_or(Resume::Now, Resume::AfterSeq)).await
}

/// SSE for every job of a project: snapshots of its live jobs, then every change. Stays open.
#[utoipa::path(get, path = "/mix/{project_id}/mix/events", tag = "events",
    params(ProjectPath, CursorQuery, ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "The cursor to resume after (EventSource sends it on reconnect)")),
    responses(
        (status = 200, content_type = "text/event-stream", description = "JobStatus events; stays open",
            headers(("Cache-Control" = String, description = "no-cache"), ("X-Accel-Buffering" = String, description = "no"))),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID"),
        (status = 404, body = ErrorEnvelope, description = "PROJECT_NOT_FOUND"),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL")))]
pub async fn project_sse(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(client): Extension<Client>,
    ProjectPath { project_id }: ProjectPath,
    ApiQuery(query): ApiQuery<CursorQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    ensure_project(&app, &project_id).await?;
    sse(&app, &caller, client, Scope::Project(project_id), cursor_resume(&app.jobs, &headers, query)).await
}

/// SSE for every job of every project. Stays open.
#[utoipa::path(get, path = "/events", tag = "events",
    params(CursorQuery, ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "The cursor to resume after (EventSource sends it on reconnect)")),
    responses((status = 200, content_type = "text/event-stream", description = "JobStatus events; stays open",
        headers(("Cache-Control" = String, description = "no-cache"), ("X-Accel-Buffering" = String, description = "no")))))]
pub async fn global_sse(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(client): Extension<Client>,
    ApiQuery(query): ApiQuery<CursorQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    sse(&app, &caller, client, Scope::All, cursor_resume(&app.jobs, &headers, query)).await
}

/// WebSocket for one job: `{"type": "status", "data": JobStatus}` text frames; closes with 1000
/// after the terminal event.
#[utoipa::path(get, path = "/mix/{project_id}/mix/job/{job_id}/ws", tag = "events",
    params(JobPath, Handshake),
    responses(
        (status = 101, description = "WebSocket upgrade"),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID, or BAD_REQUEST when the request is not a WebSocket handshake"),
        (status = 404, body = ErrorEnvelope, description = "JOB_NOT_FOUND")))]
pub async fn job_ws(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(client): Extension<Client>,
    JobPath { project_id, job_id }: JobPath,
    headers: HeaderMap,
    place: Option<Extension<ConnectionPlace>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // An unknown job is a 404 whatever the request, a handshake or not.
    find_job(&app, &project_id, job_id).await?;
    let upgrade = accept(upgrade, &headers)?;
    ws(&app, &caller, client, place.map(|Extension(place)| place), Scope::Job(project_id, job_id), Resume::Now, upgrade).await
}

/// WebSocket for every job of a project. Stays open.
#[utoipa::path(get, path = "/mix/{project_id}/mix/ws", tag = "events",
    params(ProjectPath, CursorQuery, Handshake),
    responses(
        (status = 101, description = "WebSocket upgrade"),
        (status = 400, body = ErrorEnvelope, description = "INVALID_PROJECT_ID, or BAD_REQUEST when the request is not a WebSocket handshake"),
        (status = 404, body = ErrorEnvelope, description = "PROJECT_NOT_FOUND"),
        (status = 500, body = ErrorEnvelope, description = "INTERNAL")))]
// An extractor each: the handler's arguments are its request's parts.
#[allow(clippy::too_many_arguments)]
pub async fn project_ws(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(client): Extension<Client>,
    ProjectPath { project_id }: ProjectPath,
    ApiQuery(query): ApiQuery<CursorQuery>,
    headers: HeaderMap,
    place: Option<Extension<ConnectionPlace>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    ensure_project(&app, &project_id).await?;
    let upgrade = accept(upgrade, &headers)?;
    ws(&app, &caller, client, place.map(|Extension(place)| place), Scope::Project(project_id), cursor_resume(&app.jobs, &HeaderMap::new(), query), upgrade).await
}

/// WebSocket for every job of every project. Stays open.
#[utoipa::path(get, path = "/ws", tag = "events",
    params(CursorQuery, Handshake),
    responses(
        (status = 101, description = "WebSocket upgrade"),
        (status = 400, body = ErrorEnvelope, description = "BAD_REQUEST: the request is not a WebSocket handshake")))]
pub async fn global_ws(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(client): Extension<Client>,
    ApiQuery(query): ApiQuery<CursorQuery>,
    headers: HeaderMap,
    place: Option<Extension<ConnectionPlace>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = accept(upgrade, &headers)?;
    ws(&app, &caller, client, place.map(|Extension(place)| place), Scope::All, cursor_resume(&app.jobs, &HeaderMap::new(), query), upgrade).await
}

/// A handshake checked in full. axum checks the method, `Connection`, `Upgrade` and the version,
/// but takes any `Sec-WebSocket-Key`; RFC 6455 (4.2.1) wants 16 bytes in base64, and a 400 for
/// anything else.
fn accept(upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>, headers: &HeaderMap) -> Result<WebSocketUpgrade, ApiError> {
    let upgrade = upgrade?;
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map_or(&[][..], |value| value.as_bytes());
    if !is_handshake_key(key) {
        return Err(ApiError::BadRequest("not a WebSocket handshake: Sec-WebSocket-Key must be 16 bytes in base64".into()));
    }
    Ok(upgrade)
}

/// 16 bytes in canonical base64: 22 digits, the last with its low 4 bits unused (so zero), and `==`.
fn is_handshake_key(key: &[u8]) -> bool {
    let digit = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24 && key[..21].iter().all(digit) && b"AQgw".contains(&key[21]) && &key[22..] == b"=="
}

/// A project exists once it has a stem; one whose stems were deleted still has its jobs. Jobs are
/// asked first: they are in memory, and the stems are on disk.
async fn ensure_project(app: &AppState, project: &ProjectId) -> Result<(), ApiError> {
    if app.jobs.has_project(project) || app.stems.has_any(project).await.map_err(ApiError::media)? {
        Ok(())
    } else {
        Err(ApiError::ProjectNotFound)
    }
}

/// Resolves when the caller's credential expires (never for a key or an open server): a stream
/// must not outlive the rights it was opened with.
fn credential_expiry(caller: &Caller) -> impl std::future::Future<Output = ()> + Send + 'static {
    let left = caller.expires_at().map(|at| at.duration_since(SystemTime::now()).unwrap_or_default());
    async move {
        match left {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    }
}

/// The ways an event goes on the wire. Each is built once per event and its bytes are shared by
/// every subscriber that sends it (see [`JobEvent::framed`]).
#[derive(Clone, Copy)]
enum Framing {
    /// `id: <seq>`: a job stream.
    SseBySeq,
    /// `id: <cursor>`: a project or global stream.
    SseByCursor,
    /// `{"type":"status","data":...}`: a job stream.
    WsText,
    /// `{"type":"status","cursor":"<cursor>","data":...}`: a project or global stream.
    WsTextWithCursor,
}

const _: () = assert!(Framing::WsTextWithCursor as usize + 1 == FRAMINGS);

impl Framing {
    fn sse(scope: &Scope) -> Self {
        match scope {
            Scope::Job(..) => Framing::SseBySeq,
            Scope::Project(_) | Scope::All => Framing::SseByCursor,
        }
    }

    fn ws(scope: &Scope) -> Self {
        match scope {
            Scope::Job(..) => Framing::WsText,
            Scope::Project(_) | Scope::All => Framing::WsTextWithCursor,
        }
    }

    /// The event's bytes in this framing. The JSON is serde_json's compact form, which escapes
    /// every line break inside strings, so it is one SSE `data:` line.
    ///
    /// A cursor is the store's epoch and the event's log position (`{epoch}:{position}`): every
    /// node of a store frames an event alike, so the bytes are built once.
    fn frame(self, event: &JobEvent, jobs: &Jobs) -> Bytes {
        event.framed(self as usize, |event| {
            let json = &event.json;
            Bytes::from(match self {
                Framing::SseBySeq => format!("id: {}\nevent: status\ndata: {json}\n\n", event.status.seq()),
                Framing::SseByCursor => format!("id: {}\nevent: status\ndata: {json}\n\n", jobs.cursor(event.cursor)),
                Framing::WsText => format!(r#"{{"type":"status","data":{json}}}"#),
                Framing::WsTextWithCursor => format!(r#"{{"type":"status","cursor":"{}","data":{json}}}"#, jobs.cursor(event.cursor)),
            })
        })
    }
}

async fn sse(app: &AppState, caller: &Caller, client: Client, scope: Scope, resume: Resume) -> Result<Response, ApiError> {
    let permit = app.streams.open(client)?;
    let guard = (app.jobs.metrics().subscriber(Transport::Sse), permit);
    let framing = Framing::sse(&scope);
    let statuses = feed(&app.jobs, scope, resume, app.shutdown.clone()).await?.take_until(credential_expiry(caller));
    let jobs = app.jobs.clone();
    let frames = statuses.map(move |event| {
        let _counted = &guard;
        framing.frame(&event, &jobs)
    });
    let body = futures_util::stream::once(async { Bytes::from_static(SSE_RETRY) }).chain(with_keep_alive(frames)).map(Ok::<_, Infallible>);
    let headers = [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache"), (header::HeaderName::from_static("x-accel-buffering"), "no")];
    Ok((headers, Body::from_stream(body)).into_response())
}

/// `frames`, with a keep-alive comment every [`SSE_KEEP_ALIVE_EVERY`]; ends when `frames` does.
/// The timer is not reset on each event: on a busy stream a comment costs three bytes every 15 s,
/// and resetting would move a timer per subscriber on every delivery.
fn with_keep_alive(frames: impl Stream<Item = Bytes> + Send + 'static) -> impl Stream<Item = Bytes> + Send + 'static {
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + SSE_KEEP_ALIVE_EVERY, SSE_KEEP_ALIVE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures_util::stream::unfold((Box::pin(frames), every), |(mut frames, mut every)| async move {
        let frame = tokio::select! {
            frame = frames.next() => frame?,
            _ = every.tick() => Bytes::from_static(SSE_KEEP_ALIVE),
        };
        Some((frame, (frames, every)))
    })
}

/// `place`: the connection's, which the socket keeps once upgraded (the connection's task ends).
async fn ws(
    app: &AppState,
    caller: &Caller,
    client: Client,
    place: Option<ConnectionPlace>,
    scope: Scope,
    resume: Resume,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let permit = app.streams.open(client)?;
    let framing = Framing::ws(&scope);
    let statuses = feed(&app.jobs, scope, resume, app.shutdown.clone()).await?;
    let expiry = credential_expiry(caller);
    let guard = (app.jobs.metrics().subscriber(Transport::WebSocket), permit, place);
    let (shutdown, jobs) = (app.shutdown.clone(), app.jobs.clone());
    Ok(upgrade
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let _counted = guard;
            pump(socket, statuses, framing, &jobs, shutdown, expiry).await;
        }))
}

/// Sends every status as a text frame, pings, and closes: 1000 after a job's terminal event,
/// 1001 when the server shuts down, 4001 when the credential expires.
async fn pump(
    mut socket: WebSocket,
    statuses: impl Stream<Item = Arc<JobEvent>>,
    framing: Framing,
    jobs: &Jobs,
    shutdown: CancellationToken,
    expiry: impl std::future::Future<Output = ()>,
) {
    let mut statuses = std::pin::pin!(statuses.fuse());
    let mut expiry = std::pin::pin!(expiry);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + WS_PING, WS_PING);
    loop {
        tokio::select! {
            next = statuses.next() => {
                let Some(mut event) = next else { break };
                // Statuses that are already waiting go out in the same write: when thousands of
                // subscribers fall behind together, each catches up in one system call.
                let send = async {
                    for _ in 0..WS_BATCH {
                        let text = Utf8Bytes::try_from(framing.frame(&event, jobs)).expect("a frame is JSON, so UTF-8");
                        socket.feed(Message::Text(text)).await?;
                        match statuses.next().now_or_never() {
                            Some(Some(waiting)) => event = waiting,
                            _ => break,
                        }
                    }
                    socket.flush().await
                };
                match tokio::time::timeout(WS_SEND_TIMEOUT, send).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::info!("closing a WebSocket client that stopped reading");
                        return;
                    }
                }
            }
            _ = &mut expiry => {
                let close = Message::Close(Some(CloseFrame { code: 4001, reason: "credential expired".into() }));
                let _ = tokio::time::timeout(WS_SEND_TIMEOUT, socket.send(close)).await;
                return;
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let (code, reason) = if shutdown.is_cancelled() { (1001, "server shutting down") } else { (1000, "job finished") };
    let close = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
    let _ = tokio::time::timeout(WS_SEND_TIMEOUT, socket.send(close)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_keys_are_16_bytes_in_base64() {
        // RFC 6455's own example, and one with every bit set.
        assert!(is_handshake_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_handshake_key(b"/////////////////////w=="));
        for bad in
            [&b""[..], b"dGhlIHNhbXBsZSBub25jZQ", b"dGhlIHNhbXBsZSBub25jZR==", b"dGhlIHNhbXBsZSBub25jZQ=", b"dGhlIHNhbXBsZSBub25j*Q==", b"dGhlIHNhbXBsZSBub25jZXh4eA=="]
        {
            assert!(!is_handshake_key(bad), "{}", String::from_utf8_lossy(bad));
        }
    }
}
