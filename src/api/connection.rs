//! One accepted connection. hyper serves it, unless its first request asks for an event stream:
//! that request goes through the same router (routing, access control, the error envelope and
//! tracing are the router's, whoever writes the bytes), and its response is written here.
//!
//! Why: for as long as a response streams, hyper keeps the connection's two buffers, 8 KiB for
//! response heads and 16 KiB for reading (neither can be made smaller), which were three quarters
//! of an idle SSE subscriber's memory. Here an open stream holds its socket and its task (about
//! 4 KiB of heap with its subscription, by massif), and each event goes from the bytes every
//! subscriber shares (see `JobEvent::framed`) to the socket in one vectored write, without a copy. When the stream
//! ends, the connection is at a request boundary and goes to hyper for whatever comes next.
//!
//! Only a first request that arrives whole in the first read, a GET with no body, on HTTP/1.1,
//! whose path may be an event stream is taken; anything else, including everything a slow or
//! odd client sends, is hyper's, with the bytes already read handed over first.

use std::io::{IoSlice, Write};
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use axum::Router;
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::limits::{ConnectionPlace, PeerAddr, Reserved};

/// What the first read takes: a browser's EventSource request, cookies included, fits.
const FIRST_READ: usize = 4096;
/// Headers a request taken here may have; one with more is hyper's (which allows 100).
const MAX_HEADERS: usize = 64;
/// A client that cannot take a write within this long is closed as a slow consumer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames already waiting go out in one chunk, at most this many.
const BATCH: usize = 8;
/// The most a response that is not a stream (an error envelope, a 204) may hold.
const MAX_SMALL_BODY: usize = 1024 * 1024;

#[derive(Clone, Copy)]
pub struct ConnectionConfig {
    pub header_timeout: Duration,
}

/// Serves `stream`, from `peer`, until the client leaves or the server shuts down. A `reserved`
/// connection (past the connection cap) serves one request, through hyper, marked [`Reserved`].
pub async fn serve(mut stream: TcpStream, peer: IpAddr, place: ConnectionPlace, app: Router, config: ConnectionConfig, shutdown: CancellationToken) {
    if place.0.reserved {
        return Box::pin(serve_with_hyper(Prefixed { prefix: Bytes::new(), inner: stream }, peer, place, app, config, shutdown)).await;
    }
    let mut first = Vec::with_capacity(FIRST_READ);
    match tokio::time::timeout(config.header_timeout, stream.read_buf(&mut first)).await {
        Ok(Ok(read)) if read > 0 => {}
        // Silent past the header timeout, gone, or broken: as hyper would, close.
        _ => return,
    }
    // hyper's connection state is boxed, so that a stream's task is only as large as a stream needs.
    let Some((request, close)) = event_stream_request(&first) else {
        // Copied to its own size: the read buffer is not kept for the connection's life.
        let prefix = Bytes::copy_from_slice(&first);
        drop(first);
        return Box::pin(serve_with_hyper(Prefixed { prefix, inner: stream }, peer, place, app, config, shutdown)).await;
    };
    drop(first);
    let mut request = request;
    request.extensions_mut().insert(PeerAddr(peer));
    request.extensions_mut().insert(place.clone());
    // Boxed too: the router's future is large, and only lives until the response is made.
    let response = Box::pin(app.clone().oneshot(request)).await.unwrap_or_else(|never| match never {});
    let answered = if is_event_stream(&response) {
        let (parts, body) = response.into_parts();
        let head = head(parts.status, &parts.headers, Some("transfer-encoding: chunked"));
        drop(parts);
        let sent = matches!(tokio::time::timeout(SEND_TIMEOUT, stream.write_all(&head)).await, Ok(Ok(())));
        drop(head);
        sent && stream_body(&mut stream, body).await
    } else {
        write_whole(&mut stream, response).await
    };
    if answered && !close && !shutdown.is_cancelled() {
        Box::pin(serve_with_hyper(Prefixed { prefix: Bytes::new(), inner: stream }, peer, place, app, config, shutdown)).await;
    }
}

/// The request, if the first read holds exactly one whole request this module takes, and
/// whether the client asked to close after it.
fn event_stream_request(bytes: &[u8]) -> Option<(Request<Body>, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(length)) = parsed.parse(bytes) else { return None };
    let path = parsed.path?;
    if length != bytes.len() || parsed.method != Some("GET") || parsed.version != Some(1) || !may_be_event_stream(path.split('?').next()?) {
        return None;
    }
    let mut request = Request::builder().method("GET").uri(path.parse::<Uri>().ok()?).version(Version::HTTP_11).body(Body::empty()).ok()?;
    let mut close = false;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        // A body, or a change of protocol, is hyper's to handle.
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || (name == header::CONTENT_LENGTH && value != "0") {
            return None;
        }
        if name == header::CONNECTION && value.to_str().ok()?.split(',').any(|token| token.trim().eq_ignore_ascii_case("close")) {
            close = true;
        }
        request.headers_mut().append(name, value);
    }
    Some((request, close))
}

fn is_event_stream(response: &Response<Body>) -> bool {
    response.status() == StatusCode::OK && response.headers().get(header::CONTENT_TYPE).is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"))
}

/// The status line and headers, with `Date` as hyper sends it, and `framing`: how the body's
/// length is known.
fn head(status: StatusCode, headers: &HeaderMap, framing: Option<&str>) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let _ =
        write!(head, "HTTP/1.1 {} {}\r\ndate: {}\r\n", status.as_str(), status.canonical_reason().unwrap_or(""), httpdate::fmt_http_date(std::time::SystemTime::now()));
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::DATE {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(framing) = framing {
        head.extend_from_slice(framing.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// A response that is not a stream (an error envelope, a 204), in one write. False when the
/// connection is lost.
async fn write_whole(stream: &mut TcpStream, response: Response<Body>) -> bool {
    let (parts, body) = response.into_parts();
    let Ok(collected) = http_body_util::Limited::new(body, MAX_SMALL_BODY).collect().await else { return false };
    let body = collected.to_bytes();
    let bodiless = parts.status.is_informational() || parts.status == StatusCode::NO_CONTENT || parts.status == StatusCode::NOT_MODIFIED;
    let length = format!("content-length: {}", body.len());
    let mut whole = head(parts.status, &parts.headers, (!bodiless).then_some(length.as_str()));
    whole.extend_from_slice(&body);
    matches!(tokio::time::timeout(SEND_TIMEOUT, stream.write_all(&whole)).await, Ok(Ok(())))
}

/// Streams `body` as chunks until it ends (true) or the client leaves or stops reading (false).
/// Frames that are already waiting go out together, in one chunk and one system call.
async fn stream_body(stream: &mut TcpStream, mut body: Body) -> bool {
    let mut batch: [Bytes; BATCH] = Default::default();
    loop {
        let mut next = tokio::select! {
            next = body.frame() => next,
            gone = client_gone(stream) => if gone { return false } else { continue },
        };
        let (mut count, mut ended) = (0, false);
        loop {
            match next {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        batch[count] = data;
                        count += 1;
                    }
                }
                // The end: the body is not polled again.
                None => ended = true,
                // A broken stream ends the connection without its last chunk, so the client
                // knows it is incomplete.
                Some(Err(_)) => return false,
            }
            if ended || count == BATCH {
                break;
            }
            match body.frame().now_or_never() {
                Some(waiting) => next = waiting,
                None => break,
            }
        }
        if count > 0 {
            let sent = tokio::time::timeout(SEND_TIMEOUT, write_chunk(stream, &batch[..count])).await;
            batch.iter_mut().for_each(|frame| *frame = Bytes::new());
            if !matches!(sent, Ok(Ok(()))) {
                return false;
            }
        }
        if ended {
            return matches!(tokio::time::timeout(SEND_TIMEOUT, stream.write_all(b"0\r\n\r\n")).await, Ok(Ok(())));
        }
    }
}

/// One chunk holding `frames`, in as few writes as the socket allows.
async fn write_chunk(stream: &mut TcpStream, frames: &[Bytes]) -> std::io::Result<()> {
    let size: usize = frames.iter().map(Bytes::len).sum();
    let mut size_line = [0u8; 20];
    let mut cursor = std::io::Cursor::new(&mut size_line[..]);
    write!(cursor, "{size:x}\r\n")?;
    let size_line_length = cursor.position() as usize;
    let mut slices = [IoSlice::new(&[]); BATCH + 2];
    slices[0] = IoSlice::new(&size_line[..size_line_length]);
    for (slice, frame) in slices[1..].iter_mut().zip(frames) {
        *slice = IoSlice::new(frame);
    }
    slices[frames.len() + 1] = IoSlice::new(b"\r\n");
    let mut remaining = &mut slices[..frames.len() + 2];
    while !remaining.is_empty() {
        let written = stream.write_vectored(remaining).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}

/// Resolves when the socket has something to read: true when the client has closed (or the
/// connection broke), false for bytes it sent, which a stream has no use for and drops.
async fn client_gone(stream: &TcpStream) -> bool {
    if stream.readable().await.is_err() {
        return true;
    }
    let mut discard = [0u8; 64];
    match stream.try_read(&mut discard) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    }
}

async fn serve_with_hyper(io: Prefixed, peer: IpAddr, place: ConnectionPlace, app: Router, config: ConnectionConfig, shutdown: CancellationToken) {
    let reserved = place.0.reserved;
    let service = TowerToHyperService::new(app.map_request(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(PeerAddr(peer));
        request.extensions_mut().insert(place.clone());
        if reserved {
            request.extensions_mut().insert(Reserved);
        }
        request
    }));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(config.header_timeout).keep_alive(!reserved);
    // A reserved place serves one request: HTTP/2 would serve any number on it.
    if reserved {
        builder = builder.http1_only();
    }
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// A connection with bytes already read from it in front.
struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let taken = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix.split_to(taken));
        if self.prefix.is_empty() {
            // An empty slice of the prefix would keep all of it allocated.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether `path` may be an event stream: every SSE route ends so, and no other route does. The
/// connection layer writes such responses itself (see `connection`); the router still decides
/// what they are.
fn may_be_event_stream(path: &str) -> bool {
    path.ends_with("/events")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_bodiless_get_for_a_stream_is_taken() {
        let taken = |text: &str| event_stream_request(text.as_bytes()).map(|(request, close)| (request.uri().to_string(), close));
        let get = "GET /mix/p1/mix/events?last_event_id=3 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n";
        assert_eq!(taken(get), Some(("/mix/p1/mix/events?last_event_id=3".into(), false)));
        let (request, _) = event_stream_request(get.as_bytes()).unwrap();
        assert_eq!(request.headers()["last-event-id"], "7");
        assert_eq!(taken("GET /events HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n"), Some(("/events".into(), true)));
        assert_eq!(taken("GET /events HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Some(("/events".into(), false)));
        for other in [
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /events HTTP/1.1\r\nHost: x\r\n",
            "GET /events HTTP/1.0\r\n\r\n",
            "POST /events HTTP/1.1\r\n\r\n",
            "GET /events HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            "GET /events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /events HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /events HTTP/1.1\r\n\r\nGET /events HTTP/1.1\r\n\r\n",
            "GET /eventsx HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert_eq!(taken(other), None, "{other:?}");
        }
    }
}
