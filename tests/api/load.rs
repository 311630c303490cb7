//! Under load (ignored in the normal run; `cargo test --test api load -- --ignored --nocapture`):
//! thousands of SSE and WebSocket subscribers on running jobs, some of them very slow readers.
//! Every subscriber that keeps reading ends on the terminal event, the server's memory per
//! subscriber stays bounded, and shutdown with thousands of streams open is prompt.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::common;
use crate::helpers::{make_audio, start_server, SseStream, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a load test: run on demand"]
async fn thousands_of_subscribers_all_end_on_the_terminal_event() {
    let per_transport: usize = std::env::var("MIXD_LOAD_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let subscribers = 2 * per_transport;
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let stems: Vec<_> = (0..4).map(|i| make_audio(fixtures.path(), &format!("s{i}.wav"), &format!("sine=f={}:r=48000:d=60", 100 + 50 * i), &["-ac", "2"])).collect();
    let mut server = start_server(data.path(), fixtures.path(), &["--mix-slots", "1"]).await;
    let pid = server.process.pid();
    let app = &server.app;
    app.upload("p1", &stems.iter().map(|p| p.as_path()).collect::<Vec<_>>()).await;
    let duration = |status: &Value| {
        let stamp = |field: &str| chrono::DateTime::parse_from_rfc3339(status[field].as_str().unwrap()).unwrap();
        (stamp("updated_at") - stamp("created_at")).to_std().unwrap()
    };
    let (_, job) = app.start_mix("p1", None).await;
    let quiet = duration(app.follow_job("p1", job["data"]["job_id"].as_str().unwrap()).await.last().unwrap());

    // 1. Idle subscribers: project streams with no job running, and they never read.
    let idle_before = common::resident_kib(pid);
    let ws_project = app.url("/mix/p1/mix/ws").replace("http://", "ws://");
    let mut idle_sse = Vec::new();
    let mut idle_ws = Vec::new();
    for _ in 0..per_transport {
        idle_sse.push(SseStream::connect(&app.client, &app.url("/mix/p1/mix/events"), None).await);
        idle_ws.push(crate::helpers::connect_ws(ws_project.clone()).await.expect("upgrade").0);
    }
    common::wait_for_subscribers(&app.client, &app.address, subscribers).await;
    let idle_after = common::resident_kib(pid);
    let per_idle = idle_after.saturating_sub(idle_before) as f64 / subscribers as f64;

    // 2. Delivery: subscribers gather on a job queued behind another, a tenth of them slow.
    app.start_mix("p1", None).await;
    let (_, job) = app.start_mix("p1", None).await;
    let job_id = job["data"]["job_id"].as_str().unwrap().to_string();
    let sse_url = app.url(&format!("/mix/p1/mix/job/{job_id}/events"));
    let ws_url = sse_url.replace("http://", "ws://").replace("/events", "/ws");
    let started = Instant::now();
    let mut tasks = Vec::new();
    // One fast subscriber keeps every status, to time the run from its own stamps.
    let witness = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    for i in 0..per_transport {
        let slow = i % 10 == 0;
        let client = app.client.clone();
        let url = sse_url.clone();
        let witness = (i == 1).then(|| witness.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = SseStream::connect(&client, &url, None).await;
            let mut last = Value::Null;
            while let Some(event) = stream.next_event().await {
                if event.event.as_deref() == Some("status") {
                    last = serde_json::from_str(&event.data).unwrap();
                    if let Some(witness) = &witness {
                        witness.lock().unwrap().push(last.clone());
                    }
                }
                if slow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            last["state"].as_str().map(String::from)
        }));
        let url = ws_url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut socket, _) = crate::helpers::connect_ws(url).await.expect("upgrade");
            let mut last = Value::Null;
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(text) = message {
                    last = serde_json::from_str::<Value>(&text).unwrap()["data"].clone();
                }
                if slow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            last["state"].as_str().map(String::from)
        }));
    }
    for task in tasks {
        let state = tokio::time::timeout(DEADLINE, task).await.expect("every subscriber finishes").unwrap();
        assert_eq!(state.as_deref(), Some("complete"));
    }
    let drained = started.elapsed();
    let seen = witness.lock().unwrap().clone();
    let stamp = |status: &Value| chrono::DateTime::parse_from_rfc3339(status["updated_at"].as_str().unwrap()).unwrap();
    let first_running = seen.iter().find(|s| s["state"] != "queued").expect("the witness saw the job start");
    let loaded_run = (stamp(seen.last().unwrap()) - stamp(first_running)).to_std().unwrap();
    eprintln!(
        "{subscribers} job subscribers (1 in 10 slow) all ended on complete; the mix ran {:.2} s with one subscriber and {:.2} s (from its first running status) with {subscribers}; the slowest reader drained {:.2} s after subscribing",
        quiet.as_secs_f64(),
        loaded_run.as_secs_f64(),
        drained.as_secs_f64()
    );
    eprintln!("{subscribers} idle subscribers: server RSS {idle_before} KiB -> {idle_after} KiB, {per_idle:.1} KiB each");
    assert!(per_idle <= 64.0, "memory per idle subscriber is bounded: {per_idle:.1} KiB");

    // 3. Shutdown with thousands of streams open, none of them reading.
    let stopping = Instant::now();
    server.process.signal("TERM");
    let exited = server.process.wait_for_exit(Duration::from_secs(15)).expect("exits within the grace period");
    eprintln!("SIGTERM with {} open streams: exited ({exited}) in {:.2} s", idle_sse.len() + idle_ws.len(), stopping.elapsed().as_secs_f64());
    assert!(exited.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a load test: run on demand"]
async fn two_thousand_streams_open_across_a_restart_all_come_back_resumed() {
    crate::restart::streams_come_back_across_a_restart(2000).await;
}
