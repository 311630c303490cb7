//! What the benchmarks and the integration tests share: the real `mixd` binary as a child
//! process, its resident memory, its count of open subscribers, and scratch PostgreSQL databases.
//! Not every user needs every piece.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    let addr: &[&str] = if extra_args.contains(&"--addr") { &[] } else { &["--addr", "127.0.0.1:0"] };
    let mut child = Command::new(binary)
        .arg("serve")
        .args(addr)
        .args(["--log-format", "json", "--data-dir"])
        .arg(data)
        .args(extra_args)
        .env("RUST_LOG", format!("{log_filter},mixd::startup=info"))
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

    /// Sends `signal` (e.g. "TERM", "KILL", "STOP") to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal}");
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
