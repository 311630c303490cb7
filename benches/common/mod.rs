//! What the benchmarks and the load test share: the real `mixd` binary as a child process, its
//! resident memory, and its count of open subscribers. Not every user needs every piece.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `mixd serve` on port 0 with `extra_args`, and learns its address from the JSON log.
pub fn start_mixd(binary: &str, data: &Path, extra_args: &[&str]) -> (Child, String) {
    let mut child = Command::new(binary)
        .args(["serve", "--addr", "127.0.0.1:0", "--log-format", "json", "--data-dir"])
        .arg(data)
        .args(extra_args)
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

/// Waits until the server at `base` counts `total` open subscribers (SSE and WebSocket).
pub async fn wait_for_subscribers(client: &reqwest::Client, base: &str, total: usize) {
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

