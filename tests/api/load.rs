//! Under load (ignored in the normal run; `cargo test --test api load -- --ignored --nocapture`):
//! thousands of SSE and WebSocket subscribers on running jobs, some of them very slow readers.
//! Every subscriber that keeps reading ends on the terminal event, the server's memory per
//! subscriber stays bounded, and shutdown with thousands of streams open is prompt.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{make_audio, start_server, SseStream, DEADLINE};

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a load test: run on demand"]
async fn thousands_of_subscribers_all_end_on_the_terminal_event() {
    let per_transport: usize = std::env::var("MIXD_LOAD_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let stems: Vec<_> = (0..4).map(|i| make_audio(fixtures.path(), &format!("s{i}.wav"), &format!("sine=f={}:r=48000:d=60", 100 + 50 * i), &["-ac", "2"])).collect();
    let mut server = start_server(data.path(), fixtures.path(), &["--mix-slots", "1"]).await;
    let pid = server.child.id().unwrap();
    let app = &server.app;
    app.upload("p1", &stems.iter().map(|p| p.as_path()).collect::<Vec<_>>()).await;

    // The same mix with one subscriber, for comparison; durations come from the job's own stamps.
    let duration = |status: &Value| {
        let stamp = |field: &str| chrono::DateTime::parse_from_rfc3339(status[field].as_str().unwrap()).unwrap();
        (stamp("updated_at") - stamp("created_at")).to_std().unwrap()
    };
    let (_, job) = app.start_mix("p1", None).await;
    let quiet = duration(app.follow_job("p1", job["data"]["job_id"].as_str().unwrap()).await.last().unwrap());

    let idle_before = resident_kib(pid);
    let (_, job) = app.start_mix("p1", None).await;
    let job_id = job["data"]["job_id"].as_str().unwrap().to_string();
    let loaded_start = Instant::now();
    let sse_url = app.url(&format!("/mix/p1/mix/job/{job_id}/events"));
    let ws_url = sse_url.replace("http://", "ws://").replace("/events", "/ws");
    let mut tasks = Vec::new();
    for i in 0..per_transport {
        // One in ten reads slowly: 50 ms per event.
        let slow = i % 10 == 0;
        let client = app.client.clone();
        let url = sse_url.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = SseStream::connect(&client, &url, None).await;
            let mut last = Value::Null;
            while let Some(event) = stream.next_event().await {
                if event.event.as_deref() == Some("status") {
                    last = serde_json::from_str(&event.data).unwrap();
                }
                if slow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            last["state"].as_str().map(String::from)
        }));
        let url = ws_url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
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
    // Every subscriber is connected (the server counts them) before memory is read.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let count = |transport: &str| -> usize {
            metrics.lines().find_map(|l| l.strip_prefix(&format!("mixd_subscribers{{transport=\"{transport}\"}} "))).unwrap().parse().unwrap()
        };
        if count("sse") + count("ws") >= 2 * per_transport {
            break;
        }
        assert!(Instant::now() < deadline, "subscribers never all connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected_rss = resident_kib(pid);
    let mut complete = 0;
    for task in tasks {
        let state = tokio::time::timeout(DEADLINE, task).await.expect("every subscriber finishes").unwrap();
        assert_eq!(state.as_deref(), Some("complete"));
        complete += 1;
    }
    let (_, finished) = app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await;
    let loaded = duration(&finished["data"]);
    let drained = loaded_start.elapsed();
    let subscribers = 2 * per_transport;
    eprintln!(
        "{subscribers} subscribers all ended on complete ({complete}); server RSS {idle_before} KiB before, {connected_rss} KiB while connected ({:.1} KiB per subscriber); mix took {:.2} s alone, {:.2} s with subscribers (the slowest reader drained after {:.2} s)",
        (connected_rss.saturating_sub(idle_before)) as f64 / subscribers as f64,
        quiet.as_secs_f64(),
        loaded.as_secs_f64(),
        drained.as_secs_f64()
    );
    assert!((connected_rss.saturating_sub(idle_before)) as f64 / subscribers as f64 <= 64.0, "memory per subscriber is bounded");

    // Shutdown with thousands of open streams: prompt.
    let mut open = Vec::new();
    for _ in 0..subscribers {
        open.push(SseStream::connect(&app.client, &app.url("/mix/p1/mix/events"), None).await);
    }
    let stopping = Instant::now();
    nix_kill_term(pid);
    let exited = tokio::time::timeout(Duration::from_secs(15), server.child.wait()).await.expect("exits within the grace period").unwrap();
    eprintln!("SIGTERM with {} open streams: exited ({exited}) in {:.2} s", open.len(), stopping.elapsed().as_secs_f64());
    assert!(exited.success());
}

fn nix_kill_term(pid: u32) {
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}
