//! Draining a queue: N jobs queued on a node with no mixer slot, then canceled oldest first while
//! one project subscriber follows. For each build: the rows the drain added to the event log, the
//! statuses the subscriber received, and the drain's wall time. `cargo bench --bench drain`
//! (MIXD_DRAIN_N=1000 by default; MIXD_BENCH_SERVER=path/to/mixd for another build under the same
//! client; figures in BENCHMARKS.md).

mod common;

use std::time::Instant;

use futures_util::StreamExt;

fn main() {
    let n: usize = std::env::var("MIXD_DRAIN_N").map_or(1000, |n| n.parse().expect("MIXD_DRAIN_N is a number"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    // One project queues them all, past the default cap; set in the environment, which a build
    // from before the cap ignores.
    let uncapped = [("MIXD_MAX_QUEUED_PER_PROJECT".to_string(), "1000000".to_string())];
    let server = common::start_mixd_with_env(&common::server_binary(), data.path(), &["--mix-slots", "0"], "warn", &uncapped);
    let base = format!("http://{}", server.address);
    let (rows, frames, seconds) = runtime.block_on(drain(&base, data.path(), n));
    println!("| queued jobs | log rows | per job | statuses sent to a project subscriber | drain wall |");
    println!("|---|---|---|---|---|");
    println!("| {n} | {rows} | {:.1} | {frames} | {seconds:.2} s |", rows as f64 / n as f64);
}

async fn drain(base: &str, data: &std::path::Path, n: usize) -> (u64, usize, f64) {
    let client = reqwest::Client::new();
    let stem = data.join("tone.wav");
    let made = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "sine=f=440:r=48000:d=1", "-ac", "2"])
        .arg(&stem)
        .status()
        .unwrap();
    assert!(made.success());
    let form = reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(std::fs::read(&stem).unwrap()).file_name("tone.wav"));
    assert!(client.post(format!("{base}/projects/p1/stems")).multipart(form).send().await.unwrap().status().is_success());
    let mut jobs = Vec::with_capacity(n);
    for _ in 0..n {
        let started: serde_json::Value = client.post(format!("{base}/mix/p1/mix/start")).send().await.unwrap().json().await.unwrap();
        jobs.push(started["data"]["job_id"].as_str().unwrap().to_string());
    }
    let before = log_rows(data);

    // The subscriber counts every status sent from now on, until the last job's end.
    let events = client.get(format!("{base}/mix/p1/mix/events")).send().await.unwrap();
    let last = jobs.last().unwrap().clone();
    let subscriber = tokio::spawn(async move {
        let (mut body, mut text, mut frames) = (events.bytes_stream(), String::new(), 0);
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                if event.contains("event: status") {
                    frames += 1;
                    if event.contains(&last) && event.contains("\"state\":\"error\"") {
                        return frames;
                    }
                }
            }
        }
        panic!("the stream ended before the last job did");
    });

    let started = Instant::now();
    for job in &jobs {
        let canceled = client.delete(format!("{base}/mix/p1/mix/job/{job}")).send().await.unwrap();
        assert!(canceled.status().is_success(), "{}", canceled.status());
    }
    let frames = subscriber.await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    // The snapshot of the live jobs the subscriber got first is not the drain's.
    (log_rows(data) - before, frames - n, seconds)
}

fn log_rows(data: &std::path::Path) -> u64 {
    let database = rusqlite::Connection::open(data.join(".mixd/jobs.sqlite3")).unwrap();
    database.query_row("SELECT COUNT(*) FROM job_events", [], |row| row.get(0)).unwrap()
}
