use serde_json::Value;

use crate::helpers::{spawn_app, SseStream, TestApp};

async fn finished_job(app: &TestApp) -> (String, Vec<Value>) {
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=2", &[]);
    app.upload("p1", &[&stem]).await;
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let statuses = app.follow_job("p1", &job_id).await;
    (job_id, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_frames_headers_and_resume_follow_the_contract() {
    let app = spawn_app().await;
    let (job_id, statuses) = finished_job(&app).await;
    let terminal_seq = statuses.last().unwrap()["seq"].as_u64().unwrap();
    let url = app.url(&format!("/mix/p1/mix/job/{job_id}/events"));

    // A finished job: retry first, then the terminal snapshot, then the stream closes.
    let mut stream = SseStream::connect(&app.client, &url, None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["cache-control"], "no-cache");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    assert!(stream.headers.get("content-encoding").is_none());
    assert_eq!(stream.next_event().await.unwrap().retry, Some(2000));
    let event = stream.next_event().await.unwrap();
    assert_eq!((event.id, event.event.as_deref()), (Some(terminal_seq.to_string()), Some("status")));
    assert!(stream.next_event().await.is_none(), "closes after the terminal event");

    // Already at the terminal seq: 204, header or query.
    assert_eq!(SseStream::connect(&app.client, &url, Some(&terminal_seq.to_string())).await.status, 204);
    let response = app.client.get(format!("{url}?last_event_id={terminal_seq}")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    // An older id gets the current snapshot.
    let mut resumed = SseStream::connect(&app.client, &url, Some(&(terminal_seq - 3).to_string())).await;
    assert_eq!(resumed.status, 200);
    resumed.next_event().await.unwrap();
    let event = resumed.next_event().await.unwrap();
    assert_eq!(event.id, Some(terminal_seq.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_and_projects_get_the_404_envelope_before_any_upgrade() {
    let app = spawn_app().await;
    let (job_id, _) = finished_job(&app).await;
    let unknown = uuid::Uuid::new_v4();
    let cases = [
        (format!("/mix/p1/mix/job/{unknown}/events"), "JOB_NOT_FOUND"),
        ("/mix/p1/mix/job/not-a-uuid/events".to_string(), "JOB_NOT_FOUND"),
        (format!("/mix/other/mix/job/{job_id}/events"), "JOB_NOT_FOUND"),
        (format!("/mix/p1/mix/job/{unknown}/ws"), "JOB_NOT_FOUND"),
        ("/mix/nobody/mix/events".to_string(), "PROJECT_NOT_FOUND"),
        ("/mix/nobody/mix/ws".to_string(), "PROJECT_NOT_FOUND"),
        ("/api/mix/bad$id/mix/events".to_string(), "INVALID_PROJECT_ID"),
    ];
    for (path, code) in cases {
        let ws_url = app.url(&path).replace("http://", "ws://");
        if path.ends_with("/ws") {
            let err = crate::helpers::connect_ws(ws_url).await.expect_err("no upgrade");
            match err {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    assert_eq!(response.status(), 404, "{path}");
                    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                    assert_eq!(body["error"], code, "{path}");
                }
                other => panic!("{path}: {other}"),
            }
        } else {
            let (status, body) = app.get_json(&path).await;
            assert_eq!((status == 404 || status == 400, body["error"].as_str()), (true, Some(code)), "{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_stream_sends_live_snapshots_first_and_shutdown_ends_it() {
    let app = crate::helpers::spawn_app_with(|config| config.mix_slots = Some(1)).await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=40", &[]);
    app.upload("p1", &[&stem]).await;
    let (_, first) = app.start_mix("p1", None).await;
    let (_, second) = app.start_mix("p1", None).await;
    let mut global = SseStream::connect(&app.client, &app.url("/events"), None).await;
    let mut snapshot_ids = Vec::new();
    global.next_event().await.unwrap(); // retry
    for _ in 0..2 {
        let event = global.next_event().await.unwrap();
        let status: Value = serde_json::from_str(&event.data).unwrap();
        snapshot_ids.push(status["job_id"].clone());
    }
    assert!(snapshot_ids.contains(&first["data"]["job_id"]) && snapshot_ids.contains(&second["data"]["job_id"]));

    let url = app.address.replace("http://", "ws://") + "/ws";
    let (mut socket, _) = crate::helpers::connect_ws(url).await.unwrap();
    app.shutdown.cancel();
    // Both streams end promptly although jobs are still running.
    loop {
        if global.next_event().await.is_none() {
            break;
        }
    }
    use futures_util::StreamExt;
    let close_code = loop {
        match socket.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close_code, Some(1001));
    let stopped = tokio::time::timeout(crate::helpers::DEADLINE, app.server).await.expect("the server stops");
    stopped.unwrap().unwrap();
}

/// Reads from `socket` until `buffer` holds `needle`; what came before it and it.
async fn read_until(socket: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>, needle: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(at) = buffer.windows(needle.len()).position(|window| window == needle) {
            return buffer.drain(..at + needle.len()).collect();
        }
        let read = tokio::time::timeout(crate::helpers::DEADLINE, socket.read_buf(buffer)).await.expect("the server answers").unwrap();
        assert!(read > 0, "closed early; had {:?}", String::from_utf8_lossy(buffer));
    }
}

/// The payload of a chunked body that ends in `buffer`.
fn unchunk(mut body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    loop {
        let line = body.windows(2).position(|window| window == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line]).unwrap(), 16).unwrap();
        assert_eq!(&body[line + 2 + size..line + 4 + size], b"\r\n", "each chunk ends with CRLF");
        payload.extend_from_slice(&body[line + 2..line + 2 + size]);
        body = &body[line + 4 + size..];
        if size == 0 {
            assert!(body.is_empty());
            return payload;
        }
    }
}

/// The server writes an event stream that opens a connection itself (not hyper, which keeps 24 KiB
/// per connection for as long as it streams): the same head and bytes, valid chunks, and the
/// connection back in service at the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_opening_a_connection_is_written_exactly_and_the_connection_serves_on() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    let (job_id, statuses) = finished_job(&app).await;
    let (_, status) = app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await;
    assert_eq!(status["data"], *statuses.last().unwrap());
    let address = app.address.trim_start_matches("http://");
    let auth = format!("Authorization: Bearer {}\r\n", crate::helpers::ADMIN_KEY);

    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket.write_all(format!("GET /mix/p1/mix/job/{job_id}/events HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let mut buffer = Vec::new();
    let head = String::from_utf8(read_until(&mut socket, &mut buffer, b"\r\n\r\n").await).unwrap();
    let lines: Vec<&str> = head.lines().filter(|line| !line.starts_with("date: ")).collect();
    assert_eq!(
        lines,
        [
            "HTTP/1.1 200 OK",
            "content-type: text/event-stream",
            "cache-control: no-cache",
            "x-accel-buffering: no",
            "vary: origin, access-control-request-method, access-control-request-headers",
            "access-control-allow-credentials: true",
            "access-control-expose-headers: location,retry-after,etag,content-range,ratelimit,ratelimit-policy",
            "transfer-encoding: chunked",
            ""
        ],
        "{head}"
    );
    assert!(head.contains("\r\ndate: "), "{head}");
    let body = read_until(&mut socket, &mut buffer, b"\r\n0\r\n\r\n").await;
    let seq = statuses.last().unwrap()["seq"].as_u64().unwrap();
    let payload = String::from_utf8(unchunk(&body)).unwrap();
    // Both frames were waiting when the stream opened: they go out as one chunk (hyper would send
    // a chunk each), then the last chunk.
    assert_eq!(body, format!("{:x}\r\n{payload}\r\n0\r\n\r\n", payload.len()).into_bytes(), "{}", String::from_utf8_lossy(&body));
    let json = payload.strip_prefix(&format!("retry: 2000\n\nid: {seq}\nevent: status\ndata: ")).and_then(|rest| rest.strip_suffix("\n\n")).expect(&payload);
    assert_eq!(serde_json::from_str::<Value>(json).unwrap(), status["data"]);

    // The stream ended at a request boundary: the same connection serves the next request, an
    // error envelope with its length, and then another.
    socket.write_all(format!("GET /mix/p1/mix/job/00000000-0000-4000-8000-000000000000/events HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes()).await.unwrap();
    let head = String::from_utf8(read_until(&mut socket, &mut buffer, b"\r\n\r\n").await).unwrap();
    assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
    let length: usize = head.lines().find_map(|line| line.strip_prefix("content-length: ")).unwrap().parse().unwrap();
    while buffer.len() < length {
        use tokio::io::AsyncReadExt;
        assert!(socket.read_buf(&mut buffer).await.unwrap() > 0, "closed before the envelope's end");
    }
    let envelope: Value = serde_json::from_slice(&buffer.drain(..length).collect::<Vec<_>>()).unwrap();
    assert_eq!(envelope["error"], "JOB_NOT_FOUND");
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let head = String::from_utf8(read_until(&mut socket, &mut buffer, b"\r\n\r\n").await).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_hangs_up_on_an_idle_stream_is_let_go_at_once() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
    app.upload("p1", &[&stem]).await;
    let address = app.address.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET /mix/p1/mix/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n", crate::helpers::ADMIN_KEY);
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = Vec::new();
    read_until(&mut socket, &mut buffer, b"retry: 2000\n\n").await;
    let sse_subscribers = || async { crate::common::subscribers(&app.client, &app.address).await.0 };
    assert_eq!(sse_subscribers().await, 1);
    // Nothing will be sent on this stream for 15 s (the keep-alive), yet the server notices.
    drop(socket);
    crate::helpers::eventually_async("the stream is closed", || async { sse_subscribers().await == 0 }).await;
}

/// The job ids and cursors of the statuses a project stream sends, until it has sent `count`.
async fn next_statuses(stream: &mut SseStream, count: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let event = stream.next_event().await.expect("the project stream stays open");
        if event.event.as_deref() == Some("status") {
            let status: Value = serde_json::from_str(&event.data).unwrap();
            seen.push((status["job_id"].as_str().unwrap().to_string(), event.id.unwrap()));
        }
    }
    seen
}

/// Cursors carry the store's epoch. After the store is replaced (a new database, a reset file) a
/// client may come back with a cursor of the old store, or with one beyond the new store's log:
/// both get the full snapshot of the scope, finished jobs included, where a bare position would
/// have resumed to nothing. A cursor this store handed out resumes right after itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_another_epoch_or_from_the_future_gets_the_full_snapshot() {
    // No mixer slot: jobs stay queued until canceled.
    let app = crate::helpers::spawn_app_with(|config| config.mix_slots = Some(0)).await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
    app.upload("p1", &[&stem]).await;
    let (_, ended) = app.start_mix("p1", None).await;
    let (_, waiting) = app.start_mix("p1", None).await;
    let (ended, waiting) = (ended["data"]["job_id"].as_str().unwrap().to_string(), waiting["data"]["job_id"].as_str().unwrap().to_string());
    assert_eq!(app.client.delete(app.url(&format!("/mix/p1/mix/job/{ended}"))).send().await.unwrap().status(), 200);

    let url = app.url("/mix/p1/mix/events");
    let mut live = SseStream::connect(&app.client, &url, None).await;
    let first = next_statuses(&mut live, 1).await;
    assert_eq!(first[0].0, waiting, "without a cursor: the live jobs only");
    let (epoch, position) = first[0].1.split_once(':').expect("a cursor is {epoch}:{position}");
    assert_eq!(epoch.len(), 8, "{epoch}");
    let position: u64 = position.parse().unwrap();

    let other_epoch = if epoch == "00000000" { "11111111" } else { "00000000" };
    for foreign in [format!("{other_epoch}:{position}"), format!("{epoch}:{}", position + 1_000_000), position.to_string()] {
        let mut resumed = SseStream::connect(&app.client, &url, Some(&foreign)).await;
        let mut jobs: Vec<String> = next_statuses(&mut resumed, 2).await.into_iter().map(|(job, _)| job).collect();
        jobs.sort();
        let mut expected = vec![ended.clone(), waiting.clone()];
        expected.sort();
        assert_eq!(jobs, expected, "{foreign}: every job of the project, the finished one included");
    }

    // The cursor this store handed out: nothing is sent again, and the next change comes first.
    let mut resumed = SseStream::connect(&app.client, &url, Some(&first[0].1)).await;
    assert_eq!(app.client.delete(app.url(&format!("/mix/p1/mix/job/{waiting}"))).send().await.unwrap().status(), 200);
    let next = next_statuses(&mut resumed, 1).await;
    assert_eq!(next[0].0, waiting);
    let (next_epoch, next_position) = next[0].1.split_once(':').unwrap();
    assert_eq!((next_epoch, next_position.parse::<u64>().unwrap() > position), (epoch, true));
}
