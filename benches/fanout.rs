//! Live fan-out: N subscribers, half SSE and half WebSocket, following mixes while they run. For
//! every event, the delay from the job's `updated_at` to its arrival; and the server's resident
//! memory per idle subscriber. `cargo bench --bench fanout` (MIXD_FANOUT_N=1000,5000,15000 by
//! default; MIXD_FANOUT_SECONDS=60, the length of the one-job scenario's stems; figures in
//! BENCHMARKS.md).
//!
//! Two scenarios: every subscriber on one project whose one mix runs, and the subscribers spread
//! over ten projects whose ten mixes start together and queue for the mixer slots. Subscribers
//! connect while nothing runs (so idle memory is the server's RSS with all of them open, read from
//! /proc), then the mixes start and every subscriber follows its project to the terminal event.
//! Server, load client and mixes share this machine's cores; the client's own work is inside the
//! measured delay, so it is written to cost little: raw HTTP for SSE (the response is chunked and
//! decoded as such) and tokio-tungstenite with a small read buffer for WebSocket, and each event
//! is read for its two fields only. `MIXD_BENCH_SERVER=path/to/mixd` runs another build of the
//! server (a reference commit) under the same client.

mod common;

use std::process::Command;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Scenario two: this many projects, one mix each, all started at once.
const MANY_JOBS: usize = 10;
/// Connections opening at once; more overflow the listen backlog.
const CONNECTING: usize = 256;

/// Every other subscriber is SSE, the rest WebSocket.
#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Sse,
    WebSocket,
}

impl Transport {
    fn of(subscriber: usize) -> Self {
        if subscriber.is_multiple_of(2) {
            Transport::Sse
        } else {
            Transport::WebSocket
        }
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("MIXD_FANOUT_N").unwrap_or_else(|_| "1000,5000,15000".into()).split(',').map(|n| n.trim().parse().unwrap()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("| scenario | subscribers | events delivered | p50 delay | p99 delay | max delay | server RSS per idle subscriber: SSE / WebSocket | CPU per delivery: server (incl. mix) / client |");
    println!("|---|---|---|---|---|---|---|---|");
    let seconds: u32 = std::env::var("MIXD_FANOUT_SECONDS").map_or(60, |s| s.parse().unwrap());
    for &n in &sizes {
        runtime.block_on(measure(n, 1, seconds));
    }
    for &n in &sizes {
        runtime.block_on(measure(n, MANY_JOBS, 10));
    }
}

/// `n` subscribers over `projects` projects (two stems of `seconds` each), then one mix per project.
async fn measure(n: usize, projects: usize, seconds: u32) {
    let data = tempfile::tempdir().unwrap();
    // MIXD_BENCH_SERVER: another build of the server (a reference commit) under the same client.
    let binary = std::env::var("MIXD_BENCH_SERVER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mixd").into());
    let server = common::start_mixd(&binary, data.path(), &[], "warn");
    let (pid, address) = (server.pid(), server.address.clone());
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let stems: Vec<Vec<u8>> = (0..2).map(|i| sine_wav(&data.path().join(format!("s{i}.wav")), 110 * (i + 1), seconds)).collect();
    for project in 0..projects {
        for (i, stem) in stems.iter().enumerate() {
            let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(stem.clone()).file_name(format!("s{i}.wav")));
            assert!(client.post(format!("{base}/projects/p{project}/stems")).multipart(form).send().await.unwrap().status().is_success());
        }
    }

    // SSE subscribers first, then WebSocket ones: their idle costs differ, so each is read alone.
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut subscribers = Vec::with_capacity(n);
    let mut idle_kib = Vec::new();
    for transport in [Transport::Sse, Transport::WebSocket] {
        let before = common::resident_kib(pid);
        let count = (0..n).filter(|i| Transport::of(*i) == transport).count();
        for i in (0..n).filter(|i| Transport::of(*i) == transport) {
            let (address, connecting) = (address.clone(), connecting.clone());
            let project = i / 2 % projects;
            subscribers.push(tokio::spawn(async move {
                match transport {
                    Transport::Sse => sse_subscriber(&address, &format!("/mix/p{project}/mix/events"), connecting).await,
                    Transport::WebSocket => ws_subscriber(&address, &format!("/mix/p{project}/mix/ws"), connecting).await,
                }
            }));
        }
        common::wait_for_subscribers(&client, &base, subscribers.len()).await;
        idle_kib.push(common::resident_kib(pid).saturating_sub(before) as f64 / count as f64);
    }

    let cpu_before = (common::cpu_seconds(pid), common::cpu_seconds(std::process::id()));
    for project in 0..projects {
        assert!(client.post(format!("{base}/mix/p{project}/mix/start")).send().await.unwrap().status().is_success());
    }
    let mut delays: Vec<f64> = Vec::new();
    for subscriber in subscribers {
        delays.extend(subscriber.await.unwrap());
    }
    let cpu = (common::cpu_seconds(pid) - cpu_before.0, common::cpu_seconds(std::process::id()) - cpu_before.1);
    delays.sort_by(f64::total_cmp);
    let percentile = |p: f64| delays[((delays.len() as f64 - 1.0) * p).round() as usize];
    let scenario = if projects == 1 { "one job".to_string() } else { format!("{projects} jobs") };
    println!(
        "| {scenario} | {n} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} KiB | {:.1} / {:.1} µs |",
        delays.len(),
        percentile(0.5),
        percentile(0.99),
        delays.last().unwrap(),
        idle_kib[0],
        idle_kib[1],
        cpu.0 * 1e6 / delays.len() as f64,
        cpu.1 * 1e6 / delays.len() as f64,
    );
    drop(server);
}

fn sine_wav(path: &std::path::Path, frequency: u32, seconds: u32) -> Vec<u8> {
    let made = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", &format!("sine=f={frequency}:r=48000:d={seconds}"), "-ac", "2"])
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::read(path).unwrap()
}

/// Follows an SSE stream over a plain TCP connection until a terminal status; returns the delay of
/// every status. Every event in one read arrived at the time of that read.
async fn sse_subscriber(address: &str, path: &str, connecting: Arc<Semaphore>) -> Vec<f64> {
    let mut permit = Some(connecting.acquire_owned().await.unwrap());
    let mut socket = TcpStream::connect(address).await.unwrap();
    socket.write_all(format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n").as_bytes()).await.unwrap();
    let mut received = Vec::with_capacity(4096);
    let mut head_read = false;
    let mut body = Vec::new();
    let mut followed = Followed::default();
    loop {
        assert!(socket.read_buf(&mut received).await.unwrap() > 0, "the stream ended before its terminal event");
        let arrived = Utc::now();
        if !head_read {
            let Some(end) = find(&received, b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200") && head.contains("transfer-encoding: chunked"), "{head}");
            received.drain(..end + 4);
            head_read = true;
            permit.take();
        }
        take_chunks(&mut received, &mut body);
        while let Some(end) = find(&body, b"\n\n") {
            let event = std::str::from_utf8(&body[..end]).unwrap();
            if event.lines().any(|line| line == "event: status") {
                let data = event.lines().find_map(|line| line.strip_prefix("data: ")).expect("a status has data");
                if followed.record(data, arrived) {
                    return followed.delays;
                }
            }
            body.drain(..end + 2);
        }
    }
}

/// Moves the payload of every complete chunk of a chunked HTTP body from `received` to `body`.
fn take_chunks(received: &mut Vec<u8>, body: &mut Vec<u8>) {
    while let Some(line_end) = find(received, b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&received[..line_end]).unwrap().trim(), 16).expect("a chunk size");
        assert!(size > 0, "the stream ended before its terminal event");
        let payload = line_end + 2;
        if received.len() < payload + size + 2 {
            return;
        }
        body.extend_from_slice(&received[payload..payload + size]);
        received.drain(..payload + size + 2);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

/// Follows a WebSocket until a terminal status; returns the delay of every status.
async fn ws_subscriber(address: &str, path: &str, connecting: Arc<Semaphore>) -> Vec<f64> {
    let permit = connecting.acquire_owned().await.unwrap();
    // tungstenite's default 128 KiB read buffer, times thousands, would be most of this process.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{address}{path}"), Some(config), false).await.unwrap();
    drop(permit);
    let mut followed = Followed::default();
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message.unwrap() {
            let arrived = Utc::now();
            // `{"type":"status","cursor":"N","data":{...}}` on a project stream.
            let data = text.as_str().split_once(r#","data":"#).map(|(_, data)| data).expect("a status frame");
            if followed.record(data, arrived) {
                return followed.delays;
            }
        }
    }
    panic!("the WebSocket closed before its terminal event");
}

/// What one subscriber saw of its job: each status's delivery delay, checked to be every status
/// in order (its project's stream was open before the job existed, so it starts at seq 1).
#[derive(Default)]
struct Followed {
    delays: Vec<f64>,
}

impl Followed {
    /// Records one status; true when it is the terminal one. Reads only the fields it needs:
    /// thousands of clients parsing every event in full on the server's own cores would measure
    /// the client, not the server.
    fn record(&mut self, json: &str, arrived: DateTime<Utc>) -> bool {
        let field = |name: &str, end: char| {
            let key = format!("\"{name}\":");
            let start = json.find(&key).expect("a status field") + key.len();
            let value = json[start..].trim_start_matches('"');
            &value[..value.find(end).unwrap()]
        };
        let seq: usize = field("seq", ',').parse().unwrap();
        assert_eq!(seq, self.delays.len() + 1, "a status was skipped or repeated");
        let stamped = DateTime::parse_from_rfc3339(field("updated_at", '"')).unwrap();
        self.delays.push((arrived - stamped.with_timezone(&Utc)).num_microseconds().unwrap() as f64 / 1000.0);
        matches!(field("state", '"'), "complete" | "error")
    }
}
