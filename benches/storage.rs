//! Media on object storage against the data dir: `cargo bench --bench storage`. One node each, on
//! the same machine: the data dir, and S3 on loopback (moto in server mode, as the tests use).
//! Eight stems of 60 s stereo 48 kHz (11.5 MB each) are uploaded to each, then mixed five times,
//! alternating between the servers. A mix's wall time is the server's own: its `complete`
//! status's `updated_at` less its `created_at`. S3 is measured twice: with a warm stem cache (the
//! default: the uploads stay in it) and with a cache of 0 bytes, where every mix fetches every
//! stem from the bucket.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use common::{start_mixd, start_mixd_with_env, Mixd, S3Server};

const STEMS: usize = 8;
const SECONDS: u32 = 60;
const ROUNDS: usize = 5;
const BUCKET: &str = "mixd-bench";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let fixtures = tempfile::tempdir().unwrap();
        let stems: Vec<PathBuf> = (1..=STEMS).map(|i| make_audio(fixtures.path(), &format!("s{i}.wav"), &format!("sine=f={}:r=48000:d={SECONDS}", 55 * i))).collect();
        let s3 = S3Server::start();
        s3.create_bucket(BUCKET).await;
        let (local_data, warm_data, cold_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let binary = &common::server_binary();
        let local = start_mixd(binary, local_data.path(), &["--mix-slots", "1"], "warn");
        let warm = start_mixd_with_env(binary, warm_data.path(), &["--mix-slots", "1", "--storage", &format!("s3://{BUCKET}/warm")], "warn", &s3.env());
        let cold =
            start_mixd_with_env(binary, cold_data.path(), &["--mix-slots", "1", "--storage", &format!("s3://{BUCKET}/cold"), "--cache-max-gb", "0"], "warn", &s3.env());
        let client = reqwest::Client::new();

        let servers = [("data dir", &local), ("S3, warm cache", &warm), ("S3, no cache", &cold)];
        let mut uploads = Vec::new();
        for (_, server) in servers {
            uploads.push(upload(&client, server, &stems).await);
        }
        let mut mixes: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
        for _ in 0..ROUNDS {
            for (times, (_, server)) in mixes.iter_mut().zip(servers) {
                times.push(mix(&client, server).await);
            }
        }
        println!("{STEMS} stems of {SECONDS} s, stereo 48 kHz; {ROUNDS} mixes each, alternating\n");
        println!("| storage | upload (all stems, one request) | mix wall time, median | range | ratio to the data dir |\n|---|---|---|---|---|");
        let reference = median(&mixes[0]);
        for (i, (name, _)) in servers.iter().enumerate() {
            let times = &mixes[i];
            let low = times.iter().copied().fold(f64::MAX, f64::min);
            let high = times.iter().copied().fold(0.0, f64::max);
            println!("| {name} | {:.2} s | {:.2} s | {low:.2}-{high:.2} s | {:.2}x |", uploads[i].as_secs_f64(), median(times), median(times) / reference);
        }
    });
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn make_audio(dir: &Path, name: &str, source: &str) -> PathBuf {
    let path = dir.join(name);
    let status =
        std::process::Command::new("ffmpeg").args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source, "-ac", "2"]).arg(&path).status().unwrap();
    assert!(status.success());
    path
}

async fn upload(client: &reqwest::Client, server: &Mixd, stems: &[PathBuf]) -> Duration {
    let mut form = reqwest::multipart::Form::new();
    for stem in stems {
        let name = stem.file_name().unwrap().to_string_lossy().into_owned();
        form = form.part("file", reqwest::multipart::Part::bytes(std::fs::read(stem).unwrap()).file_name(name));
    }
    let started = Instant::now();
    let response = client.post(format!("http://{}/projects/bench/stems", server.address)).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 201);
    started.elapsed()
}

/// One mix, start to `complete`, by the server's own timestamps (seconds).
async fn mix(client: &reqwest::Client, server: &Mixd) -> f64 {
    let started: Value = client.post(format!("http://{}/mix/bench/mix/start", server.address)).send().await.unwrap().json().await.unwrap();
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let status_url = format!("http://{}/mix/bench/mix/job/{job_id}/status", server.address);
    loop {
        let status: Value = client.get(&status_url).send().await.unwrap().json().await.unwrap();
        let data = &status["data"];
        match data["state"].as_str().unwrap() {
            "complete" => {
                let at = |field: &str| data[field].as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
                return (at("updated_at") - at("created_at")).as_seconds_f64();
            }
            "error" => panic!("the mix failed: {data}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
