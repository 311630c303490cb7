//! The polling status route under wrk at 64 connections: mixd against the legacy stack
//! (FastAPI/uvicorn, rebuilt in bench/legacy/), in the same run on the same machine.
//! `cargo bench --bench polling` (needs wrk, python3 with fastapi and uvicorn, and PostgreSQL at
//! MIXD_BENCH_POSTGRES or 127.0.0.1:5432; figures in BENCHMARKS.md). Both answer the same question: a finished job's status in the envelope.

mod common;

use mixd::access::{parse_api_key, parse_token_key, Keys, Scope};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const DURATION: &str = "15s";

const ADMIN_KEY: &str = "bench-admin-key-0123456789abcdef-0123456789";
const TOKEN_KEY: &str = "b1=bench-token-secret-0123456789abcdef-0123";

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().unwrap();
    let (mixd, status_url, job_id) = finished_job(data.path(), &[], &[]);
    let ours = wrk(&status_url, None);
    drop(mixd);

    // The same route with access control on: once with a scoped read token (an HS256 verify per
    // request), once with an admin key (a SHA-256 and a constant-time compare).
    let keyed = tempfile::tempdir().unwrap();
    let admin = format!("authorization: Bearer {ADMIN_KEY}");
    let (mixd, keyed_url, _) = finished_job(keyed.path(), &["--api-key", ADMIN_KEY, "--token-key", TOKEN_KEY], &["-H", &admin]);
    let token = capture(&common::server_binary(), &["token", "--project", "p1", "--scope", "read", "--ttl", "1h", "--token-key", TOKEN_KEY]);
    let with_token = wrk(&keyed_url, Some(&format!("authorization: Bearer {}", token.trim())));
    let with_key = wrk(&keyed_url, Some(&admin));
    drop(mixd);

    // The same open route on a node whose job store is PostgreSQL: polls read memory either way.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let database = runtime
        .block_on(common::ScratchDatabase::create_on(std::env::var("MIXD_BENCH_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())));
    let clustered = tempfile::tempdir().unwrap();
    let (mixd, clustered_url, _) = finished_job(clustered.path(), &["--database-url", &database.url], &[]);
    let on_postgres = wrk(&clustered_url, None);
    drop(mixd);
    drop(database);

    let port = free_port();
    let mut legacy = Command::new("python3")
        .args(["-m", "uvicorn", "app:app", "--app-dir"])
        .arg(root.join("bench/legacy"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--log-level", "warning"])
        .env("LEGACY_JOB_ID", &job_id)
        .spawn()
        .expect("python3 -m uvicorn (pip install fastapi uvicorn)");
    let legacy_url = format!("http://127.0.0.1:{port}/mix/p1/mix/job/{job_id}/status");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("curl").args(["-sf", "-o", "/dev/null", &legacy_url]).status().unwrap().success() {
        assert!(Instant::now() < deadline, "uvicorn did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let theirs = wrk(&legacy_url, None);
    legacy.kill().unwrap();
    let _ = legacy.wait();

    println!("| server | requests/s | p50 | p99 |");
    println!("|---|---|---|---|");
    println!("| mixd | {:.0} | {} | {} |", ours.0, ours.1, ours.2);
    println!("| legacy FastAPI/uvicorn | {:.0} | {} | {} |", theirs.0, theirs.1, theirs.2);
    println!("| mixd, scoped token | {:.0} | {} | {} |", with_token.0, with_token.1, with_token.2);
    println!("| mixd, admin key | {:.0} | {} | {} |", with_key.0, with_key.1, with_key.2);
    println!("| mixd, PostgreSQL job store | {:.0} | {} | {} |", on_postgres.0, on_postgres.1, on_postgres.2);
    println!("throughput ratio mixd/legacy: {:.1}x (wrk -t2 -c64 -d{DURATION}, same machine, same run)", ours.0 / theirs.0);
    println!(
        "cost of verifying: token {:.1}%, admin key {:.1}% of the open route's throughput",
        100.0 * (1.0 - with_token.0 / ours.0),
        100.0 * (1.0 - with_key.0 / ours.0)
    );
    // wrk's figures move by 10% from run to run here, more than the check costs: time the check
    // itself too, and say what share of the open route's time it is.
    let keys = Keys::new(&[parse_api_key(ADMIN_KEY).unwrap()], &[parse_token_key(TOKEN_KEY).unwrap()]);
    let (token, _) = keys.mint(&"p1".parse().unwrap(), Scope::Read, Duration::from_secs(3600), None).unwrap();
    for (what, credential) in [("scoped token", token.as_str()), ("admin key", ADMIN_KEY)] {
        let rounds = 1_000_000;
        let started = Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(keys.verify(std::hint::black_box(credential)).unwrap());
        }
        let per_check = started.elapsed().as_secs_f64() / f64::from(rounds);
        println!("{what}: {:.0} ns per check, {:.1}% of a core at the open route's {:.0} req/s", per_check * 1e9, 100.0 * per_check * ours.0, ours.0);
    }
}

/// A mixd started with `args`, a finished job on it, that job's status URL and id. `auth` are
/// curl's arguments for the credential, if the server wants one.
fn finished_job(data: &Path, args: &[&str], auth: &[&str]) -> (common::Mixd, String, String) {
    let mixd = common::start_mixd(&common::server_binary(), data, args, "warn");
    let address = mixd.address.clone();
    let stem = data.join("stem.wav");
    run("ffmpeg", &["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=f=440:r=48000:d=2", stem.to_str().unwrap()]);
    let (file, stems_url) = (format!("file=@{}", stem.display()), format!("http://{address}/projects/p1/stems"));
    run("curl", &[auth, &["-sf", "-o", "/dev/null", "-F", &file, &stems_url]].concat());
    let start_url = format!("http://{address}/mix/p1/mix/start");
    let started = capture("curl", &[auth, &["-sf", "-X", "POST", &start_url]].concat());
    let job_id = started.split("\"job_id\":\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    let status_url = format!("http://{address}/mix/p1/mix/job/{job_id}/status");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !capture("curl", &[auth, &["-sf", &status_url]].concat()).contains("\"state\":\"complete\"") {
        assert!(Instant::now() < deadline, "the mix did not complete");
        std::thread::sleep(Duration::from_millis(50));
    }
    (mixd, status_url, job_id)
}

/// Requests per second and the p50/p99 latencies wrk reports, with `header` on every request.
fn wrk(url: &str, header: Option<&str>) -> (f64, String, String) {
    let mut args = vec!["-t2".to_string(), "-c64".into(), format!("-d{DURATION}"), "--latency".into()];
    if let Some(header) = header {
        args.extend(["-H".to_string(), header.to_string()]);
    }
    args.push(url.to_string());
    let output = capture("wrk", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let value = |prefix: &str| output.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string())).unwrap_or_else(|| panic!("{prefix} in {output}"));
    assert!(!output.contains("Non-2xx"), "{output}");
    (value("Requests/sec:").parse().unwrap(), value("50%"), value("99%"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(program: &str, args: &[&str]) {
    assert!(Command::new(program).args(args).status().unwrap().success(), "{program} {args:?}");
}

fn capture(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}
