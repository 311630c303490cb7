//! What the benchmarks and the integration tests share: the real `mixd` binary as a child
//! process, its resident memory, its count of open subscribers, and scratch PostgreSQL databases.
//! Not every user needs every piece.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An S3-compatible server on a free loopback port: moto in server mode (`moto_server`, which
/// scripts/test installs from PyPI), a real HTTP S3 implementation with its own state. Killed when
/// dropped; [`S3Server::stop`] is kill -9, [`S3Server::start_again`] brings a new, empty one up on
/// the same port.
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
}

impl S3Server {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = Self { child: None, port };
        server.start_again();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port, and returns once it answers.
    pub fn start_again(&mut self) {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server runs (scripts/test installs moto[server] from PyPI)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen on {} within 30 s", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new().put(format!("{}/{bucket}", self.endpoint())).send().await.unwrap();
        assert!(response.status().is_success(), "creating bucket {bucket}: {}", response.status());
    }

    /// What `mixd` needs in its environment to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint().as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
    }

    /// Every key in `bucket` under `prefix` with its size, in key order (ListObjectsV2, read with a
    /// plain scan of its XML: keys and sizes are all a test needs).
    pub async fn objects(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint());
        let xml = reqwest::Client::new().get(url).send().await.unwrap().text().await.unwrap();
        let field = |item: &str, name: &str| item.split(&format!("<{name}>")).nth(1).and_then(|rest| rest.split(&format!("</{name}>")).next()).map(str::to_string);
        xml.split("<Contents>").skip(1).map(|item| (field(item, "Key").unwrap(), field(item, "Size").unwrap().parse().unwrap())).collect()
    }

    /// An object's bytes, read straight from the server.
    pub async fn object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let response = reqwest::Client::new().get(format!("{}/{bucket}/{key}", self.endpoint())).send().await.unwrap();
        response.status().is_success().then_some(response.bytes().await.unwrap().to_vec())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `mixd serve` as a child process: the one way the benchmarks and the integration tests start
/// the real binary. It is killed when dropped.
pub struct Mixd {
    pub child: Child,
    /// `host:port`, as the server logged it once bound.
    pub address: String,
    /// The log lines after the address line, as they come (JSON, one per line).
    pub log: std::sync::mpsc::Receiver<String>,
}

/// Starts `mixd serve` with `extra_args`, on port 0 unless they give an `--addr`, and learns its
/// address from the JSON log. `log_filter` is its `RUST_LOG`: the address line is logged at
/// `info` by `mixd::startup`.
pub fn start_mixd(binary: &str, data: &Path, extra_args: &[&str], log_filter: &str) -> Mixd {
    start_mixd_with_env(binary, data, extra_args, log_filter, &[])
}

/// [`start_mixd`] with extra environment variables (the AWS ones, for object storage).
pub fn start_mixd_with_env(binary: &str, data: &Path, extra_args: &[&str], log_filter: &str, env: &[(String, String)]) -> Mixd {
    let addr: &[&str] = if extra_args.contains(&"--addr") { &[] } else { &["--addr", "127.0.0.1:0"] };
    let mut child = Command::new(binary)
        .arg("serve")
        .args(addr)
        .args(["--log-format", "json", "--data-dir"])
        .arg(data)
        .args(extra_args)
        .env("RUST_LOG", format!("{log_filter},mixd::startup=info"))
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("mixd starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = loop {
        let line = lines.next().expect("mixd exited before listening").unwrap();
        if let Some(at) = line.find("\"address\":\"") {
            break line[at + 11..].split('"').next().unwrap().to_string();
        }
    };
    let (sender, log) = std::sync::mpsc::channel();
    // Keep draining the log, so the server never blocks on a full pipe, whoever reads it.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| drop(sender.send(line))));
    Mixd { child, address, log }
}

impl Mixd {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "KILL", "STOP") to the server. A STOP returns once every
    /// thread of the server has stopped: the kernel stops each as it next runs, so on a busy
    /// machine what a test does right after `kill` could still be answered by the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal}");
        if signal == "STOP" {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.stopped() {
                assert!(Instant::now() < deadline, "the server did not stop within 10 s of SIGSTOP");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Whether every thread of the server is stopped (state T in /proc).
    fn stopped(&self) -> bool {
        let Ok(threads) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else { return false };
        threads.filter_map(Result::ok).all(|thread| {
            let stat = std::fs::read_to_string(thread.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses and may hold anything.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) == Some('T')
        })
    }

    /// Waits until the process has exited, or `limit` has passed (None).
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Mixd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// CPU time (user and system) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name, which may itself hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The open subscribers the server at `base` counts: (SSE, WebSocket).
pub async fn subscribers(client: &reqwest::Client, base: &str) -> (usize, usize) {
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let count =
        |transport: &str| -> usize { metrics.lines().find_map(|l| l.strip_prefix(&format!("mixd_subscribers{{transport=\"{transport}\"}} "))).unwrap().parse().unwrap() };
    (count("sse"), count("ws"))
}

/// Waits until the server at `base` counts `total` open subscribers (SSE and WebSocket).
pub async fn wait_for_subscribers(client: &reqwest::Client, base: &str, total: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (sse, ws) = subscribers(client, base).await;
        if sse + ws >= total {
            return;
        }
        assert!(Instant::now() < deadline, "subscribers never all connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh PostgreSQL database on the server at `admin` (a URL of a database to connect to for
/// CREATE DATABASE), dropped with whatever still holds it when this is.
pub struct ScratchDatabase {
    pub url: String,
    name: String,
    admin: String,
}

impl ScratchDatabase {
    pub async fn create_on(admin: String) -> Self {
        use sqlx::{Connection, Executor};
        let name = format!("mixd_scratch_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL answers (scripts/test starts one)");
        conn.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
        let base = admin.rsplit_once('/').expect("a URL with a database").0;
        Self { url: format!("{base}/{name}"), name, admin }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        use sqlx::{Connection, Executor};
        let (name, admin) = (self.name.clone(), self.admin.clone());
        // Dropped from async code too: a thread of its own, with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
                }
            })
        })
        .join();
    }
}

/// The server binary a bench runs: this build's, or `MIXD_BENCH_SERVER` (another build, such as
/// the landed commit, to compare under the same client in the same run).
#[allow(dead_code)]
pub fn server_binary() -> String {
    std::env::var("MIXD_BENCH_SERVER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mixd").to_string())
}
