//! Cluster mode, against real PostgreSQL: `cargo bench --bench cluster` (MIXD_BENCH_POSTGRES, the
//! server to make a scratch database on, defaults to postgres://postgres@127.0.0.1:5432/postgres).
//!
//! - Cross-node delivery: 1,000 SSE subscribers on node B follow a project whose mix runs on node
//!   A; for every event, the delay from the job's `updated_at` (stamped on A just before its
//!   commit) to its arrival at a subscriber on B. The reference: the same on one SQLite node.
//! - Submissions per second: 32 clients submit 2,000 jobs (1 s stems, no mixer slots, so nothing
//!   but the submit is measured) spread over two PostgreSQL nodes; the reference is one SQLite node.
//! - Rescue time: a node is killed (kill -9) mid-mix, ten times; the time from the kill to the
//!   job's next `running` status, seen on a watching node. Leases of 5 s.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;

use common::{start_mixd, wait_for_subscribers, Mixd, ScratchDatabase};

const SUBSCRIBERS: usize = 1000;
const SUBMITTERS: usize = 32;
const SUBMISSIONS: usize = 2000;
const RESCUES: usize = 10;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let fixtures = tempfile::tempdir().unwrap();
        for i in 1..=3 {
            make_audio(fixtures.path(), &format!("s{i}.wav"), &format!("sine=f={}:r=48000:d=30", 110 * i));
        }
        make_audio(fixtures.path(), "short.wav", "sine=f=440:r=48000:d=1");

        println!("| measure | one node, SQLite | two nodes, PostgreSQL | ratio |\n|---|---|---|---|");
        let single = delivery(fixtures.path(), None).await;
        let db = ScratchDatabase::create_on(admin_url()).await;
        let cluster = delivery(fixtures.path(), Some(&db.url)).await;
        println!("| delivery p50, {SUBSCRIBERS} SSE subscribers | {:.1} ms | {:.1} ms | {:.2}x |", single.0, cluster.0, cluster.0 / single.0);
        println!("| delivery p99 | {:.1} ms | {:.1} ms | {:.2}x |", single.1, cluster.1, cluster.1 / single.1);
        let single = submissions(fixtures.path(), None).await;
        let db = ScratchDatabase::create_on(admin_url()).await;
        let cluster = submissions(fixtures.path(), Some(&db.url)).await;
        println!("| submissions per second ({SUBMITTERS} clients) | {single:.0} | {cluster:.0} | {:.2}x |", cluster / single);
        let db = ScratchDatabase::create_on(admin_url()).await;
        let mut times = rescues(fixtures.path(), &db.url).await;
        times.sort_by(f64::total_cmp);
        println!("\nRescue after kill -9 (lease 5 s, {RESCUES} runs): p50 {:.2} s, max {:.2} s", times[times.len() / 2], times[times.len() - 1]);
    });
}

fn make_audio(dir: &Path, name: &str, source: &str) {
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source, "-ac", "2"])
        .arg(dir.join(name))
        .status()
        .unwrap();
    assert!(status.success());
}

fn admin_url() -> String {
    std::env::var("MIXD_BENCH_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn node(data: &Path, database: Option<&str>, slots: &str, lease: &str) -> Mixd {
    let mut args = vec!["--mix-slots", slots, "--lease", lease];
    if let Some(url) = database {
        args.extend(["--database-url", url]);
    }
    start_mixd(&common::server_binary(), data, &args, "warn")
}

async fn upload(client: &reqwest::Client, base: &str, project: &str, files: &[&Path]) {
    let mut form = reqwest::multipart::Form::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        form = form.part("file", reqwest::multipart::Part::bytes(std::fs::read(file).unwrap()).file_name(name));
    }
    let response = client.post(format!("{base}/projects/{project}/stems")).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 201);
}

async fn start(client: &reqwest::Client, base: &str, project: &str) -> String {
    let response: serde_json::Value = client.post(format!("{base}/mix/{project}/mix/start")).send().await.unwrap().json().await.unwrap();
    response["data"]["job_id"].as_str().unwrap().to_string()
}

/// Reads an SSE response's `data:` lines as JSON, calling `each` with the arrival time.
async fn follow(response: reqwest::Response, mut each: impl FnMut(serde_json::Value, DateTime<Utc>) -> bool) {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        let arrived = Utc::now();
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            if let Some(data) = line.strip_prefix("data:") {
                if !each(serde_json::from_str(data.trim()).unwrap(), arrived) {
                    return;
                }
            }
        }
    }
}

/// (p50, p99) in ms of the delay from commit to arrival, subscribers on a node that is not mixing.
async fn delivery(fixtures: &Path, database: Option<&str>) -> (f64, f64) {
    let data = tempfile::tempdir().unwrap();
    let mixer = node(data.path(), database, "1", "15s");
    // On SQLite the subscribers are on the mixing node itself: there is no other.
    let watcher = database.map(|url| node(data.path(), Some(url), "0", "15s"));
    let (mixing, watching) = (format!("http://{}", mixer.address), format!("http://{}", watcher.as_ref().unwrap_or(&mixer).address));
    let client = reqwest::Client::new();
    let stems: Vec<_> = (1..=3).map(|i| fixtures.join(format!("s{i}.wav"))).collect();
    upload(&client, &mixing, "p1", &stems.iter().map(|p| p.as_path()).collect::<Vec<_>>()).await;
    let mut followers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let response = client.get(format!("{watching}/mix/p1/mix/events")).send().await.unwrap();
        followers.push(tokio::spawn(async move {
            let mut delays = Vec::new();
            follow(response, |status, arrived| {
                let updated: DateTime<Utc> = status["updated_at"].as_str().unwrap().parse().unwrap();
                delays.push((arrived - updated).num_microseconds().unwrap() as f64 / 1000.0);
                status["state"] != "complete"
            })
            .await;
            delays
        }));
    }
    wait_for_subscribers(&client, &watching, SUBSCRIBERS).await;
    start(&client, &mixing, "p1").await;
    let mut delays = Vec::new();
    for follower in followers {
        delays.extend(follower.await.unwrap());
    }
    delays.sort_by(f64::total_cmp);
    (delays[delays.len() / 2], delays[delays.len() * 99 / 100])
}

/// Jobs accepted per second.
async fn submissions(fixtures: &Path, database: Option<&str>) -> f64 {
    let data = tempfile::tempdir().unwrap();
    let nodes: Vec<Mixd> = match database {
        Some(url) => vec![node(data.path(), Some(url), "0", "15s"), node(data.path(), Some(url), "0", "15s")],
        None => vec![node(data.path(), None, "0", "15s")],
    };
    let bases: Vec<String> = nodes.iter().map(|node| format!("http://{}", node.address)).collect();
    let client = reqwest::Client::new();
    upload(&client, &bases[0], "p1", &[&fixtures.join("short.wav")]).await;
    let began = Instant::now();
    let mut submitters = Vec::new();
    for submitter in 0..SUBMITTERS {
        let (client, base) = (client.clone(), bases[submitter % bases.len()].clone());
        submitters.push(tokio::spawn(async move {
            for _ in 0..SUBMISSIONS / SUBMITTERS {
                let response = client.post(format!("{base}/mix/p1/mix/start")).send().await.unwrap();
                assert_eq!(response.status(), 202);
            }
        }));
    }
    for submitter in submitters {
        submitter.await.unwrap();
    }
    (SUBMISSIONS / SUBMITTERS * SUBMITTERS) as f64 / began.elapsed().as_secs_f64()
}

/// Seconds from each kill -9 to the job's next start elsewhere.
async fn rescues(fixtures: &Path, database: &str) -> Vec<f64> {
    let data = tempfile::tempdir().unwrap();
    let watcher = node(data.path(), Some(database), "0", "5s");
    let base = format!("http://{}", watcher.address);
    let client = reqwest::Client::new();
    let stems: Vec<_> = (1..=3).map(|i| fixtures.join(format!("s{i}.wav"))).collect();
    upload(&client, &base, "p1", &stems.iter().map(|p| p.as_path()).collect::<Vec<_>>()).await;
    let mut times = Vec::new();
    let mut mixer = node(data.path(), Some(database), "1", "5s");
    for _ in 0..RESCUES {
        let job_id = start(&client, &base, "p1").await;
        let response = client.get(format!("{base}/mix/p1/mix/job/{job_id}/events")).send().await.unwrap();
        let (killed_at, restarted_at) = (std::sync::Mutex::new(None::<Instant>), std::sync::Mutex::new(None::<Instant>));
        let mut next = None;
        follow(response, |status, _| {
            let state = status["state"].as_str().unwrap();
            if state == "loading_stems" && killed_at.lock().unwrap().is_none() {
                // The next node is up before the kill: only the rescue is timed.
                next = Some(node(data.path(), Some(database), "1", "5s"));
                mixer.signal("KILL");
                mixer.wait_for_exit(Duration::from_secs(30));
                *killed_at.lock().unwrap() = Some(Instant::now());
            } else if state == "running" && killed_at.lock().unwrap().is_some() {
                *restarted_at.lock().unwrap() = Some(Instant::now());
                return false;
            }
            true
        })
        .await;
        let (killed, restarted) = (killed_at.into_inner().unwrap().unwrap(), restarted_at.into_inner().unwrap().unwrap());
        times.push((restarted - killed).as_secs_f64());
        mixer = next.unwrap();
        // The rescued job finishes before the next round.
        let response = client.get(format!("{base}/mix/p1/mix/job/{job_id}/events")).send().await.unwrap();
        follow(response, |status, _| !matches!(status["state"].as_str(), Some("complete" | "error"))).await;
    }
    times
}
