//! Live fan-out: N subscribers, half SSE and half WebSocket, on one project while one mix runs.
//! For every event, the delay from the job's `updated_at` to its arrival; and the server's
//! resident memory per idle subscriber. `cargo bench --bench fanout`
//! (MIXD_FANOUT_N=1000,5000,15000 by default; figures in BENCHMARKS.md).
//!
//! The subscribers connect while nothing runs (so idle memory is the server's RSS with all of
//! them open, read from /proc), then one mix starts and every subscriber follows it to its
//! terminal event. Server, load client and mix share this machine's cores, as in production a
//! server shares them with its mixes; the client's own work is inside the measured delay.

#[path = "../tests/api/sse.rs"]
mod sse;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let (mut server, address) = start_mixd(data.path());
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

    let idle_before = resident_kib(pid);
    let connecting = Arc::new(Semaphore::new(256));
    let mut subscribers = Vec::with_capacity(n);
    for i in 0..n {
        let (client, base, connecting) = (client.clone(), base.clone(), connecting.clone());
        subscribers.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let permit = connecting.acquire_owned().await.unwrap();
                let mut stream = sse::SseStream::connect(&client, &format!("{base}/mix/p1/mix/events"), None).await;
                drop(permit);
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
    wait_for_subscribers(&client, &base, n).await;
    let idle_after = resident_kib(pid);

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

async fn wait_for_subscribers(client: &reqwest::Client, base: &str, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        let count = |transport: &str| -> usize {
            metrics.lines().find_map(|l| l.strip_prefix(&format!("mixd_subscribers{{transport=\"{transport}\"}} "))).unwrap().parse().unwrap()
        };
        if count("sse") + count("ws") >= total {
            return;
        }
        assert!(Instant::now() < deadline, "subscribers never all connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_mixd(data: &Path) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mixd"))
        .args(["serve", "--addr", "127.0.0.1:0", "--log-format", "json", "--mix-slots", "1", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn,mixd::startup=info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = loop {
        let line = lines.next().expect("mixd exited").unwrap();
        if let Some(at) = line.find("\"address\":\"") {
            break line[at + 11..].split('"').next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, address)
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}
