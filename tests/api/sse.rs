//! A minimal EventSource client for the integration tests. (The fan-out benchmark reads raw
//! sockets instead: at 15,000 subscribers this client would cost more CPU than the server.)

use std::time::Duration;

use futures_util::StreamExt;

/// How long a stream may go without a byte before the caller is told it stalled.
const STALL_LIMIT: Duration = Duration::from_secs(120);

pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

/// A minimal EventSource: reads frames from a streaming response.
pub struct SseStream {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buffer: String,
}

impl SseStream {
    pub async fn connect(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Self {
        Self::try_connect(client, url, last_event_id).await.expect("SSE request")
    }

    /// As an EventSource reconnecting: the server may not be listening yet.
    pub async fn try_connect(client: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> reqwest::Result<Self> {
        let mut request = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await?;
        Ok(Self { status: response.status().as_u16(), headers: response.headers().clone(), body: Box::pin(response.bytes_stream()), buffer: String::new() })
    }

    /// The next frame with content (keep-alive comments are skipped); None when the server closes.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent { id: None, event: None, data: String::new(), retry: None };
                let mut has_field = false;
                for line in frame.lines() {
                    let Some((field, value)) = line.split_once(':') else { continue };
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    has_field |= !field.is_empty();
                    match field {
                        "id" => event.id = Some(value.to_string()),
                        "event" => event.event = Some(value.to_string()),
                        "data" => event.data.push_str(value),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                if has_field {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(STALL_LIMIT, self.body.next()).await.expect("SSE stalled past the deadline")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.expect("SSE body")));
        }
    }
}
