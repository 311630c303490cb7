//! Live fan-out, against nginx + nchan in the same run: N subscribers, half SSE and half
//! WebSocket, following mixes while they run. For every event, the delay from the job's
//! `updated_at` to its arrival; the server's resident memory per idle subscriber; and how long a
//! storm of reconnecting subscribers takes to be all back. `cargo bench --bench fanout`
//! (MIXD_FANOUT_N=1000,5000,15000 by default; MIXD_FANOUT_SECONDS=60, the length of the one-job
//! scenario's stems; MIXD_FANOUT_STORM=15000, the storm's subscribers; figures in BENCHMARKS.md).
//!
//! Two scenarios: every subscriber on one project whose one mix runs, and the subscribers spread
//! over ten projects whose ten mixes start together and queue for the mixer slots. Subscribers
//! connect while nothing runs (so idle memory is the server's RSS with all of them open, read from
//! /proc), then the mixes start and every subscriber follows its project to the terminal event.
//!
//! The peer is nginx with the nchan module (Debian's packages, installed with apt-get when
//! missing), one worker (MIXD_FANOUT_NCHAN_WORKERS=2 for two), the same client: it is sent, on one
//! channel per project, the statuses mixd published in the same scenario just before, at the gaps
//! mixd published them, each stamped with the moment it is due. So both servers deliver the same
//! events at the same pace to the same subscribers, each delay counted from the moment the event
//! exists; mixd's figure includes mixing, nchan's does not.
//!
//! Server, load client and mixes share this machine's cores; the client's own work is inside the
//! measured delay, so it is written to cost little: raw HTTP for SSE (the response is chunked and
//! decoded as such) and tokio-tungstenite with a small read buffer for WebSocket, and each event
//! is read for its two fields only. `MIXD_BENCH_SERVER=path/to/mixd` runs another build of the
//! server (a reference commit) under the same client.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Scenario two: this many projects, one mix each, all started at once.
const MANY_JOBS: usize = 10;
/// Connections opening at once while subscribers gather for the delivery scenarios.
const CONNECTING: usize = 256;
/// The storm: subscribers reconnect this many at once...
const STORM_BURST: usize = 1000;
/// ...a burst this long after the one before, as EventSource clients whose streams ended over a
/// moment all retry `retry:` later.
const STORM_GAP: Duration = Duration::from_millis(100);
/// How long an EventSource waits before it reconnects after a failed attempt.
const EVENTSOURCE_RETRY: Duration = Duration::from_secs(2);

/// Every other subscriber is SSE, the rest WebSocket.
#[derive(Clone, Copy, PartialEq, Default)]
enum Transport {
    #[default]
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
    // An empty list runs no delivery scenario: `MIXD_FANOUT_N= cargo bench --bench fanout` runs the storm alone.
    let list = |name: &str, default: &str| -> Vec<usize> {
        std::env::var(name).unwrap_or_else(|_| default.into()).split(',').filter(|n| !n.trim().is_empty()).map(|n| n.trim().parse().unwrap()).collect()
    };
    let sizes = list("MIXD_FANOUT_N", "1000,5000,15000");
    let storm = list("MIXD_FANOUT_STORM", "15000")[0];
    let seconds: u32 = std::env::var("MIXD_FANOUT_SECONDS").map_or(60, |s| s.parse().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    Nchan::install();
    println!("| scenario | subscribers | server | events delivered | p50 delay | p99 delay (SSE / WebSocket) | max delay | RSS per idle subscriber: SSE / WebSocket | CPU per delivery: server / client |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let (mut ratios, mut publishing) = (Vec::new(), Vec::new());
    for (projects, seconds) in [(1, seconds), (MANY_JOBS, 10)] {
        for &n in &sizes {
            let scenario = if projects == 1 { "one job".to_string() } else { format!("{projects} jobs") };
            let (mixd, published) = runtime.block_on(measure_mixd(n, projects, seconds));
            let (nchan, answers) = runtime.block_on(measure_nchan(n, projects, &published));
            println!("{}", mixd.row(&scenario, n, "mixd"));
            println!("{}", nchan.row(&scenario, n, "nchan"));
            publishing.push(format!(
                "| {scenario} | {n} | {:.1} ms | {:.1} ms | {:.1} ms |",
                percentile(&answers, 0.5),
                percentile(&answers, 0.99),
                answers.last().unwrap()
            ));
            ratios.push(format!(
                "| {scenario} | {n} | {:.2}x | {:.2}x | {:.2}x / {:.2}x |",
                mixd.percentile(0.5) / nchan.percentile(0.5),
                mixd.percentile(0.99) / nchan.percentile(0.99),
                mixd.idle_kib[0] / nchan.idle_kib[0],
                mixd.idle_kib[1] / nchan.idle_kib[1],
            ));
        }
    }
    println!("\nnchan's answer to each publish (it answers once the message is written to its subscribers):\n\n| scenario | subscribers | p50 | p99 | max |\n|---|---|---|---|---|");
    publishing.iter().for_each(|row| println!("{row}"));
    println!("\nmixd / nchan:\n\n| scenario | subscribers | p50 | p99 | idle memory: SSE / WebSocket |\n|---|---|---|---|---|");
    ratios.iter().for_each(|row| println!("{row}"));
    let (mixd, nchan) = runtime.block_on(async { (storm_mixd(storm).await, storm_nchan(storm).await) });
    println!("\nReconnect storm: {storm} SSE subscribers in bursts of {STORM_BURST}, {} ms apart; time until every one has its response head:\n", STORM_GAP.as_millis());
    println!("| server | all connected after | connections refused and retried |\n|---|---|---|");
    println!("| mixd | {:.2} s | {} |\n| nchan | {:.2} s | {} |", mixd.0.as_secs_f64(), mixd.1, nchan.0.as_secs_f64(), nchan.1);
    println!("\nmixd / nchan: {:.2}x", mixd.0.as_secs_f64() / nchan.0.as_secs_f64());
}

/// What one server did in one scenario.
struct Measured {
    /// Every delivery's delay, ms, sorted.
    delays: Vec<f64>,
    /// p99 of the SSE subscribers' deliveries, and of the WebSocket ones'.
    p99_by_transport: [f64; 2],
    idle_kib: [f64; 2],
    /// CPU seconds over the delivery phase: the server's, the client's.
    cpu: (f64, f64),
}

impl Measured {
    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.delays, p)
    }

    fn row(&self, scenario: &str, n: usize, server: &str) -> String {
        format!(
            "| {scenario} | {n} | {server} | {} | {:.1} ms | {:.1} ms ({:.1} / {:.1}) | {:.1} ms | {:.1} / {:.1} KiB | {:.1} / {:.1} µs |",
            self.delays.len(),
            self.percentile(0.5),
            self.percentile(0.99),
            self.p99_by_transport[0],
            self.p99_by_transport[1],
            self.delays.last().unwrap(),
            self.idle_kib[0],
            self.idle_kib[1],
            self.cpu.0 * 1e6 / self.delays.len() as f64,
            self.cpu.1 * 1e6 / self.delays.len() as f64,
        )
    }
}

/// A status as mixd published it: its project and its JSON.
#[derive(Clone)]
struct Published {
    project: usize,
    updated_at: DateTime<Utc>,
    json: String,
}

/// A server under test: where its subscribers connect, and how to count them.
trait Target {
    fn address(&self) -> &str;
    /// The processes whose memory and CPU are the server's.
    fn pids(&self) -> Vec<u32>;

    fn resident_kib(&self) -> u64 {
        self.pids().into_iter().map(common::resident_kib).sum()
    }

    fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(common::cpu_seconds).sum()
    }
    /// Where subscriber number `subscriber` of `project` connects.
    fn path(&self, transport: Transport, project: usize, subscriber: usize) -> String;
    /// Subscribers the server counts as connected.
    async fn subscribers(&self) -> usize;

    async fn wait_for_subscribers(&self, total: usize) {
        self.wait_for(total, &[]).await;
    }

    /// Waits until the server counts `total` subscribers; a subscriber that ended (it failed) is
    /// awaited, so its panic is the bench's.
    async fn wait_for(&self, total: usize, subscribers: &[tokio::task::JoinHandle<Followed>]) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.subscribers().await < total {
            assert!(!subscribers.iter().any(|subscriber| subscriber.is_finished()), "a subscriber failed before the mix started");
            assert!(Instant::now() < deadline, "subscribers never all connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `n` subscribers over `projects` projects, half SSE then half WebSocket (their idle costs differ,
/// so each is read alone). Project `p`'s first SSE subscriber keeps what it receives.
async fn subscribe(target: &impl Target, n: usize, projects: usize) -> (Vec<tokio::task::JoinHandle<Followed>>, [f64; 2]) {
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut subscribers = Vec::with_capacity(n);
    let mut idle_kib = [0.0; 2];
    for (slot, transport) in [Transport::Sse, Transport::WebSocket].into_iter().enumerate() {
        let before = target.resident_kib();
        let count = (0..n).filter(|i| Transport::of(*i) == transport).count();
        for i in (0..n).filter(|i| Transport::of(*i) == transport) {
            let (address, connecting) = (target.address().to_string(), connecting.clone());
            let project = i / 2 % projects;
            let path = target.path(transport, project, i);
            let witness = i / 2 < projects && transport == Transport::Sse;
            subscribers.push(tokio::spawn(async move {
                let followed = Followed { transport, project, keep: witness.then(Vec::new), ..Followed::default() };
                match transport {
                    Transport::Sse => sse_subscriber(&address, &path, connecting, followed).await,
                    Transport::WebSocket => ws_subscriber(&address, &path, connecting, followed).await,
                }
            }));
        }
        target.wait_for(subscribers.len(), &subscribers).await;
        idle_kib[slot] = target.resident_kib().saturating_sub(before) as f64 / count as f64;
    }
    (subscribers, idle_kib)
}

/// `p` of `sorted`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Waits for every subscriber: their delays, sorted, with the p99 of each transport's, and what the
/// witnesses kept, by project.
async fn gather(subscribers: Vec<tokio::task::JoinHandle<Followed>>) -> (Vec<f64>, [f64; 2], Vec<Published>) {
    let mut by_transport = [Vec::new(), Vec::new()];
    let mut published = Vec::new();
    for subscriber in subscribers {
        let followed = subscriber.await.unwrap();
        by_transport[followed.transport as usize].extend(followed.delays);
        for json in followed.keep.into_iter().flatten() {
            let updated_at = DateTime::parse_from_rfc3339(field(&json, "updated_at", '"')).unwrap().with_timezone(&Utc);
            published.push(Published { project: followed.project, updated_at, json });
        }
    }
    let p99_by_transport = by_transport.each_mut().map(|delays| {
        delays.sort_by(f64::total_cmp);
        percentile(delays, 0.99)
    });
    let mut delays = by_transport.concat();
    delays.sort_by(f64::total_cmp);
    published.sort_by_key(|status| status.updated_at);
    (delays, p99_by_transport, published)
}

struct MixdTarget {
    server: common::Mixd,
}

impl Target for MixdTarget {
    fn address(&self) -> &str {
        &self.server.address
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.server.pid()]
    }

    /// Each subscriber with a read token of its own, in the query as a browser's EventSource
    /// sends it: one credential per listener, as a music app hands them out.
    fn path(&self, transport: Transport, project: usize, subscriber: usize) -> String {
        let token = read_token(project, subscriber);
        match transport {
            Transport::Sse => format!("/mix/p{project}/mix/events?access_token={token}"),
            Transport::WebSocket => format!("/mix/p{project}/mix/ws?access_token={token}"),
        }
    }

    async fn subscribers(&self) -> usize {
        let (sse, ws) = common::subscribers(&admin_client(), &format!("http://{}", self.address())).await;
        sse + ws
    }
}

impl MixdTarget {
    /// `mixd serve` with `projects` projects of two `seconds`-long stems each.
    async fn start(data: &Path, projects: usize, seconds: u32) -> Self {
        let binary = common::server_binary();
        let server = common::start_mixd(&binary, data, &["--api-key", ADMIN_KEY, "--token-key", TOKEN_KEY], "warn");
        let base = format!("http://{}", server.address);
        let client = admin_client();
        let stems: Vec<Vec<u8>> = (0..2).map(|i| sine_wav(&data.join(format!("s{i}.wav")), 110 * (i + 1), seconds)).collect();
        for project in 0..projects {
            for (i, stem) in stems.iter().enumerate() {
                let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(stem.clone()).file_name(format!("s{i}.wav")));
                assert!(client.post(format!("{base}/projects/p{project}/stems")).multipart(form).send().await.unwrap().status().is_success());
            }
        }
        Self { server }
    }
}

async fn measure_mixd(n: usize, projects: usize, seconds: u32) -> (Measured, Vec<Published>) {
    let data = tempfile::tempdir().unwrap();
    let target = MixdTarget::start(data.path(), projects, seconds).await;
    let (subscribers, idle_kib) = subscribe(&target, n, projects).await;
    let cpu_before = (target.cpu_seconds(), common::cpu_seconds(std::process::id()));
    let client = admin_client();
    for project in 0..projects {
        assert!(client.post(format!("http://{}/mix/p{project}/mix/start", target.address())).send().await.unwrap().status().is_success());
    }
    let (delays, p99_by_transport, published) = gather(subscribers).await;
    let cpu = (target.cpu_seconds() - cpu_before.0, common::cpu_seconds(std::process::id()) - cpu_before.1);
    (Measured { delays, p99_by_transport, idle_kib, cpu }, published)
}

/// nginx with nchan, [`nchan_workers`] workers, on a free loopback port; stopped when dropped.
struct Nchan {
    master: Child,
    address: String,
    _prefix: tempfile::TempDir,
}

impl Nchan {
    /// Debian's nginx and its nchan module, installed when missing (the bench runs as root).
    fn install() {
        if Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so").exists() && Path::new("/usr/sbin/nginx").exists() {
            return;
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx", "libnginx-mod-nchan"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .unwrap();
        assert!(status.success(), "apt-get install nginx libnginx-mod-nchan");
    }

    /// `/pub/<channel>` takes messages, `/sub/<channel>` serves them over SSE (as `event: status`)
    /// and WebSocket, `/status` counts subscribers.
    async fn start() -> Self {
        let prefix = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let config = format!(
            "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;
worker_processes {workers};
worker_rlimit_nofile 20000;
daemon off;
error_log stderr warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    server {{
        listen {address};
        location ~ ^/pub/(\\w+)$ {{ nchan_publisher; nchan_channel_id $1; }}
        location ~ ^/sub/(\\w+)$ {{ nchan_subscriber; nchan_channel_id $1; nchan_eventsource_event status; }}
        location = /status {{ nchan_stub_status; }}
    }}
}}
",
            prefix = prefix.path().display(),
            workers = nchan_workers(),
        );
        let file = prefix.path().join("nginx.conf");
        std::fs::write(&file, config).unwrap();
        let master = Command::new("/usr/sbin/nginx").arg("-p").arg(prefix.path()).arg("-c").arg(&file).stdin(Stdio::null()).spawn().expect("nginx starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&address).await.is_err() {
            assert!(Instant::now() < deadline, "nginx never listened on {address}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { master, address, _prefix: prefix }
    }
}

impl Target for Nchan {
    fn address(&self) -> &str {
        &self.address
    }

    /// The workers, which hold the connections.
    fn pids(&self) -> Vec<u32> {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.master.id())).unwrap();
        let workers: Vec<u32> = children.split_whitespace().map(|pid| pid.parse().unwrap()).collect();
        assert_eq!(workers.len(), nchan_workers(), "nginx's workers");
        workers
    }

    fn path(&self, _: Transport, project: usize, _: usize) -> String {
        format!("/sub/p{project}")
    }

    async fn subscribers(&self) -> usize {
        let status = reqwest::get(format!("http://{}/status", self.address)).await.unwrap().text().await.unwrap();
        status.lines().find_map(|line| line.strip_prefix("subscribers: ")).expect("nchan counts subscribers").trim().parse().unwrap()
    }
}

impl Drop for Nchan {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker before it exits (SIGKILL would orphan the worker).
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.master.id() as i32, libc::SIGTERM) };
        let _ = self.master.wait();
    }
}

/// nginx's worker processes: MIXD_FANOUT_NCHAN_WORKERS, 1 by default (the yardstick #17 set; mixd
/// delivers on both cores).
fn nchan_workers() -> usize {
    std::env::var("MIXD_FANOUT_NCHAN_WORKERS").map_or(1, |workers| workers.parse().expect("MIXD_FANOUT_NCHAN_WORKERS is a number"))
}

/// nchan, sent the statuses mixd published, at the gaps mixd published them; and how long
/// nchan took to answer each publish, ms, sorted.
async fn measure_nchan(n: usize, projects: usize, published: &[Published]) -> (Measured, Vec<f64>) {
    let nchan = Nchan::start().await;
    let (subscribers, idle_kib) = subscribe(&nchan, n, projects).await;
    let cpu_before = (nchan.cpu_seconds(), common::cpu_seconds(std::process::id()));
    // Each message is stamped with the moment it is due, as mixd's statuses are with the moment
    // they are made. nchan answers a publish once it has written the message to its subscribers,
    // so a message due while the one before is still being written waits, inside the measured
    // delay, as a status waits behind the one before in mixd. (Stamped when sent, that wait was
    // left out, and a burst such as a job ending and every queued job's position changing at
    // once cost nchan nothing.) The publisher runs on a thread of its
    // own, so that the subscribers' reads in this process never delay a send.
    let messages = published.to_vec();
    let publish_url = format!("http://{}/pub", nchan.address());
    let answers = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let client = reqwest::Client::new();
            let (first, start, wall_start) = (messages[0].updated_at, Instant::now(), Utc::now());
            let mut answers = Vec::with_capacity(messages.len());
            for Published { project, updated_at, json } in messages {
                let since_first = updated_at - first;
                tokio::time::sleep_until(start + since_first.to_std().unwrap()).await;
                // Framed as mixd's WebSocket frames are, which SSE carries as data.
                let key = r#""updated_at":""#;
                let value = json.find(key).unwrap() + key.len();
                let end = value + json[value..].find('"').unwrap();
                let due = (wall_start + since_first).to_rfc3339_opts(SecondsFormat::Micros, true);
                let message = format!(r#"{{"type":"status","cursor":"0","data":{}{due}{}}}"#, &json[..value], &json[end..]);
                let sent = Instant::now();
                let response = client.post(format!("{publish_url}/p{project}")).header("content-type", "application/json").body(message).send().await.unwrap();
                assert!(response.status().is_success(), "nchan refused a message: {}", response.status());
                answers.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            answers.sort_by(f64::total_cmp);
            answers
        })
    })
    .await
    .unwrap();
    let (delays, p99_by_transport, _) = gather(subscribers).await;
    let cpu = (nchan.cpu_seconds() - cpu_before.0, common::cpu_seconds(std::process::id()) - cpu_before.1);
    (Measured { delays, p99_by_transport, idle_kib, cpu }, answers)
}

/// `total` SSE subscribers of one stream, connecting in bursts; how long until all have their
/// response head, from the first burst, and how many connections failed and were retried.
async fn storm(address: &str, path: impl Fn(usize) -> String, total: usize) -> (Duration, usize, Vec<TcpStream>) {
    let start = Instant::now();
    let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..total)
        .map(|i| {
            let (address, path, retried) = (address.to_string(), path(i), retried.clone());
            let at = start + STORM_GAP * (i / STORM_BURST) as u32;
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                loop {
                    match open_sse(&address, &path).await {
                        Ok(socket) => return (Instant::now(), socket),
                        Err(_) => {
                            retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(EVENTSOURCE_RETRY).await;
                        }
                    }
                }
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(total);
    let mut last = start;
    for client in clients {
        let (connected, socket) = client.await.unwrap();
        last = last.max(connected);
        sockets.push(socket);
    }
    (last - start, retried.load(std::sync::atomic::Ordering::Relaxed), sockets)
}

/// Sends the request and reads the response head, which must be a 200.
async fn open_sse(address: &str, path: &str) -> std::io::Result<TcpStream> {
    let mut socket = TcpStream::connect(address).await?;
    socket.write_all(format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n").as_bytes()).await?;
    let mut received = Vec::with_capacity(1024);
    while find(&received, b"\r\n\r\n").is_none() {
        if socket.read_buf(&mut received).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    assert!(received.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&received));
    Ok(socket)
}

async fn storm_mixd(total: usize) -> (Duration, usize) {
    let data = tempfile::tempdir().unwrap();
    let target = MixdTarget::start(data.path(), 1, 1).await;
    let paths: Vec<String> = (0..total).map(|i| target.path(Transport::Sse, 0, i)).collect();
    let stormed = tokio::spawn({
        let address = target.address().to_string();
        async move { storm(&address, |i| paths[i].clone(), total).await }
    })
    .await;
    // What the server had to say, if a subscriber failed.
    if stormed.is_err() {
        target.server.log.try_iter().take(5).for_each(|line| eprintln!("mixd: {line}"));
    }
    let (took, retried, sockets) = stormed.unwrap();
    target.wait_for_subscribers(sockets.len()).await;
    (took, retried)
}

async fn storm_nchan(total: usize) -> (Duration, usize) {
    let nchan = Nchan::start().await;
    let (took, retried, sockets) = storm(nchan.address(), |i| nchan.path(Transport::Sse, 0, i), total).await;
    nchan.wait_for_subscribers(sockets.len()).await;
    (took, retried)
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

/// Follows an SSE stream over a plain TCP connection until a terminal status. Every event in one
/// read arrived at the time of that read.
async fn sse_subscriber(address: &str, path: &str, connecting: Arc<Semaphore>, mut followed: Followed) -> Followed {
    let mut permit = Some(connecting.acquire_owned().await.unwrap());
    let mut socket = TcpStream::connect(address).await.unwrap();
    socket.write_all(format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n").as_bytes()).await.unwrap();
    let mut received = Vec::with_capacity(4096);
    // Known once the head is read: mixd's body is chunked, nchan's is not.
    let mut chunked = None;
    let mut body = Vec::new();
    loop {
        assert!(socket.read_buf(&mut received).await.unwrap() > 0, "the stream ended before its terminal event");
        let arrived = Utc::now();
        if chunked.is_none() {
            let Some(end) = find(&received, b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{head}");
            chunked = Some(head.contains("transfer-encoding: chunked"));
            received.drain(..end + 4);
            permit.take();
        }
        if chunked == Some(true) {
            take_chunks(&mut received, &mut body);
        } else {
            body.append(&mut received);
        }
        while let Some(end) = find(&body, b"\n\n") {
            let event = std::str::from_utf8(&body[..end]).unwrap();
            if event.lines().any(|line| line == "event: status") {
                let data = event.lines().find_map(|line| line.strip_prefix("data: ")).expect("a status has data");
                if followed.record(data, arrived) {
                    return followed;
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

/// Follows a WebSocket until a terminal status.
async fn ws_subscriber(address: &str, path: &str, connecting: Arc<Semaphore>, mut followed: Followed) -> Followed {
    let permit = connecting.acquire_owned().await.unwrap();
    // tungstenite's default 128 KiB read buffer, times thousands, would be most of this process.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(format!("ws://{address}{path}"), Some(config), false).await.unwrap();
    drop(permit);
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message.unwrap() {
            let arrived = Utc::now();
            // `{"type":"status","cursor":"N","data":{...}}` on a project stream.
            let data = text.as_str().split_once(r#","data":"#).map(|(_, data)| data).expect("a status frame");
            if followed.record(data, arrived) {
                return followed;
            }
        }
    }
    panic!("the WebSocket closed before its terminal event");
}

/// What one subscriber saw of its job: each status's delivery delay, checked to be every status
/// in order (its project's stream was open before the job existed, so it starts at seq 1), and,
/// for a witness, the statuses themselves.
#[derive(Default)]
struct Followed {
    transport: Transport,
    project: usize,
    delays: Vec<f64>,
    keep: Option<Vec<String>>,
}

impl Followed {
    /// Records one status; true when it is the terminal one. Reads only the fields it needs:
    /// thousands of clients parsing every event in full on the server's own cores would measure
    /// the client, not the server.
    fn record(&mut self, json: &str, arrived: DateTime<Utc>) -> bool {
        let seq: usize = field(json, "seq", ',').parse().unwrap();
        assert_eq!(seq, self.delays.len() + 1, "a status was skipped or repeated");
        let stamped = DateTime::parse_from_rfc3339(field(json, "updated_at", '"')).unwrap();
        self.delays.push((arrived - stamped.with_timezone(&Utc)).num_microseconds().unwrap() as f64 / 1000.0);
        if let Some(keep) = &mut self.keep {
            keep.push(json.to_string());
        }
        matches!(field(json, "state", '"'), "complete" | "error")
    }
}

/// The value of `"name":` in a status, up to `end` (a string's quotes stripped).
fn field<'a>(json: &'a str, name: &str, end: char) -> &'a str {
    let key = format!("\"{name}\":");
    let start = json.find(&key).expect("a status field") + key.len();
    let value = json[start..].trim_start_matches('"');
    &value[..value.find(end).unwrap()]
}

/// The bench server's admin key, and the key its tokens are signed with (`kid=secret`).
const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef-0123456789";
const TOKEN_KEY: &str = "b1=bench-token-secret-0123456789abcdef-0123";

/// A client that sends the admin key: it uploads, starts mixes and reads `/metrics`.
fn admin_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// A read token of project `p{project}` for one subscriber, signed as an app's backend would.
fn read_token(project: usize, subscriber: usize) -> String {
    let (kid, secret) = TOKEN_KEY.split_once('=').unwrap();
    let exp = chrono::Utc::now().timestamp() + 3600;
    let claims = serde_json::json!({"aud": "mixd", "exp": exp, "prj": format!("p{project}"), "scope": "read", "sub": format!("listener-{subscriber}")});
    let header = jsonwebtoken::Header { kid: Some(kid.into()), ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256) };
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
}
