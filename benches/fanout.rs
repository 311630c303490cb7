//! Live fan-out: N subscribers, half SSE and half WebSocket, on one project while one mix runs.
//! For every event, the delay from the job's `updated_at` to its arrival; and the server's
//! resident memory per idle subscriber. `cargo bench --bench fanout`
//! (MIXD_FANOUT_N=1000,5000,15000 by default; figures in BENCHMARKS.md).
//!
//! The subscribers connect while nothing runs (so idle memory is the server's RSS with all of
//! them open, read from /proc), then one mix starts and every subscriber follows it to its
//! terminal event. Server, load client and mix share this machine's cores, as in production a
//! server shares them with its mixes; the client's own work is inside the measured delay.

mod common;
// The tests' client; this bench reads its status but not its headers.
#[allow(dead_code)]
#[path = "../tests/api/sse.rs"]
mod sse;

use std::process::Command;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

fn main() {
    let sizes: Vec<usize> = std::env::var("MIXD_FANOUT_N").unwrap_or_else(|_| "1000,5000,15000".into()).split(',').map(|n| n.trim().parse().unwrap()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("| subscribers | events delivered | p50 delay | p99 delay | max delay | server RSS per idle subscriber |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        runtime.block_on(measure(n));
    }
}

async fn measure(n: usize) {
    let data = tempfile::tempdir().unwrap();
    let (mut server, address) = common::start_mixd(env!("CARGO_BIN_EXE_mixd"), data.path(), &["--mix-slots", "1"]);
    let pid = server.id();
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    for i in 0..2 {
        let stem = data.path().join(format!("s{i}.wav"));
        let made = Command::new("ffmpeg")
            .args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", &format!("sine=f={}:r=48000:d=60", 110 * (i + 1)), "-ac", "2"])
            .arg(&stem)
            .status()
            .unwrap();
        assert!(made.success());
        let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(std::fs::read(&stem).unwrap()).file_name(format!("s{i}.wav")));
        assert!(client.post(format!("{base}/projects/p1/stems")).multipart(form).send().await.unwrap().status().is_success());
    }

    let idle_before = common::resident_kib(pid);
    let connecting = Arc::new(Semaphore::new(256));
    let mut subscribers = Vec::with_capacity(n);
    for i in 0..n {
        let (client, base, connecting) = (client.clone(), base.clone(), connecting.clone());
        subscribers.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let permit = connecting.acquire_owned().await.unwrap();
                let mut stream = sse::SseStream::connect(&client, &format!("{base}/mix/p1/mix/events"), None).await;
                drop(permit);
                assert_eq!(stream.status, 200);
                let mut delays = Vec::new();
                while let Some(event) = stream.next_event().await {
                    if event.event.as_deref() == Some("status") && record(&event.data, &mut delays) {
                        break;
                    }
                }
                delays
            } else {
                let permit = connecting.acquire_owned().await.unwrap();
                let (mut socket, _) = tokio_tungstenite::connect_async(format!("{}/mix/p1/mix/ws", base.replace("http://", "ws://"))).await.unwrap();
                drop(permit);
                let mut delays = Vec::new();
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        if record(&text, &mut delays) {
                            break;
                        }
                    }
                }
                delays
            }
        }));
    }
    common::wait_for_subscribers(&client, &base, n).await;
    let idle_after = common::resident_kib(pid);

    assert!(client.post(format!("{base}/mix/p1/mix/start")).send().await.unwrap().status().is_success());
    let mut delays: Vec<f64> = Vec::new();
    for subscriber in subscribers {
        delays.extend(subscriber.await.unwrap());
    }
    delays.sort_by(f64::total_cmp);
    let percentile = |p: f64| delays[((delays.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "| {n} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} KiB |",
        delays.len(),
        percentile(0.5),
        percentile(0.99),
        delays.last().unwrap(),
        idle_after.saturating_sub(idle_before) as f64 / n as f64
    );
    server.kill().unwrap();
    let _ = server.wait();
}

/// Records one status's delivery delay; true when it is the terminal event. Reads only the two
/// fields it needs: 15,000 clients parsing every event in full on the server's own two cores would
/// measure the client, not the server.
fn record(json: &str, delays: &mut Vec<f64>) -> bool {
    let arrived = chrono::Utc::now();
    let field = |name: &str| {
        let key = format!("\"{name}\":\"");
        let start = json.find(&key).expect("a status field") + key.len();
        &json[start..start + json[start..].find('"').unwrap()]
    };
    let stamped = chrono::DateTime::parse_from_rfc3339(field("updated_at")).unwrap();
    delays.push((arrived - stamped.with_timezone(&chrono::Utc)).num_microseconds().unwrap() as f64 / 1000.0);
    matches!(field("state"), "complete" | "error")
}
