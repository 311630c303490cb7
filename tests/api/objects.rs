//! Media on object storage: real `mixd serve` processes against a real S3 server (moto in server
//! mode, on loopback), with real faults (the S3 server killed mid-upload and mid-mix).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::cluster::{admin_url, counter, statuses_over_sse, until_state, CLAIMED};
use crate::common::ScratchDatabase;
use crate::helpers::{eventually, eventually_async, make_audio, start_server, start_server_with_env, S3Server, Server, ADMIN_KEY, TOKEN_KEY};

const BUCKET: &str = "mixd-media";
const PREFIX: &str = "team/a";

struct Bucket {
    s3: S3Server,
    fixtures: tempfile::TempDir,
}

impl Bucket {
    async fn new() -> Self {
        let s3 = S3Server::start();
        s3.create_bucket(BUCKET).await;
        Self { s3, fixtures: tempfile::tempdir().unwrap() }
    }

    /// A node on the bucket, with a data dir of its own.
    async fn node(&self, data: &Path, extra_args: &[&str]) -> Server {
        let storage = format!("s3://{BUCKET}/{PREFIX}");
        let args: Vec<&str> = ["--storage", storage.as_str()].into_iter().chain(extra_args.iter().copied()).collect();
        start_server_with_env(data, self.fixtures.path(), &args, &self.s3.env()).await
    }

    /// Every key under the prefix, relative to it, with its size.
    async fn objects(&self) -> Vec<(String, u64)> {
        self.s3.objects(BUCKET, PREFIX).await.into_iter().map(|(key, size)| (key.strip_prefix(&format!("{PREFIX}/")).unwrap().to_string(), size)).collect()
    }

    fn stems(&self) -> Vec<PathBuf> {
        vec![
            make_audio(self.fixtures.path(), "bass.wav", "sine=f=110:r=48000:d=3", &["-ac", "2"]),
            make_audio(self.fixtures.path(), "keys.flac", "sine=f=440:r=44100:d=3", &["-ac", "2"]),
        ]
    }
}

async fn upload(node: &Server, project: &str, stems: &[PathBuf]) -> Vec<Value> {
    let paths: Vec<&Path> = stems.iter().map(PathBuf::as_path).collect();
    let (status, body) = node.app.upload(project, &paths).await;
    assert_eq!(status, 201, "{body}");
    body["data"]["stems"].as_array().unwrap().clone()
}

/// Starts a mix and follows it to its end; returns the job id and its last status.
async fn mix(node: &Server, project: &str) -> (String, Value) {
    let (status, started) = node.app.start_mix(project, None).await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let statuses = node.app.follow_job(project, &job_id).await;
    (job_id, statuses.last().unwrap().clone())
}

async fn get(node: &Server, path: &str, range: Option<&str>) -> reqwest::Response {
    let mut request = node.app.client.get(node.app.url(path));
    if let Some(range) = range {
        request = request.header("range", range);
    }
    request.send().await.unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).filter(|e| e.path().is_file()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn stems_and_mixes_live_in_the_bucket_and_are_served_exactly_as_from_the_data_dir() {
    let bucket = Bucket::new().await;
    let (data, local_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node = bucket.node(data.path(), &[]).await;
    let local = start_server(local_data.path(), bucket.fixtures.path(), &[]).await;
    let stems = bucket.stems();

    let uploaded = upload(&node, "p1", &stems).await;
    let ids: Vec<&str> = uploaded.iter().map(|stem| stem["stem_id"].as_str().unwrap()).collect();
    let mut expected = vec![
        (format!("p1/stems/{}.json", ids[0]), None),
        (format!("p1/stems/{}.wav", ids[0]), Some(std::fs::metadata(&stems[0]).unwrap().len())),
        (format!("p1/stems/{}.json", ids[1]), None),
        (format!("p1/stems/{}.flac", ids[1]), Some(std::fs::metadata(&stems[1]).unwrap().len())),
    ];
    expected.sort();
    let objects = bucket.objects().await;
    assert_eq!(objects.iter().map(|(key, _)| key.clone()).collect::<Vec<_>>(), expected.iter().map(|(key, _)| key.clone()).collect::<Vec<_>>());
    for ((key, size), (_, expected_size)) in objects.iter().zip(&expected) {
        if let Some(expected_size) = expected_size {
            assert_eq!(size, expected_size, "{key}");
        }
    }
    // The stems are listed from their records, and served byte for byte.
    let (status, listed) = node.app.get_json("/projects/p1/stems").await;
    assert_eq!((status, listed["data"]["stems"].as_array().unwrap().len()), (200, 2));
    let served = get(&node, &format!("/media/p1/stems/{}.wav", ids[0]), None).await;
    assert_eq!(served.headers()["content-type"], "audio/wav");
    assert_eq!(served.bytes().await.unwrap(), std::fs::read(&stems[0]).unwrap());

    let (job_id, last) = mix(&node, "p1").await;
    assert_eq!(last["state"], "complete", "{last}");
    let result_url = format!("/media/p1/mix_outputs/{job_id}/final_mix.wav");
    assert_eq!(last["result_url"], result_url);
    let outputs: Vec<String> = bucket.objects().await.into_iter().map(|(key, _)| key).filter(|key| key.contains("mix_outputs")).collect();
    let stored = |name: &str| format!("p1/mix_outputs/{job_id}/attempt-1/{name}");
    assert_eq!(outputs, [stored("analysis.json"), stored("final_mix.opus"), stored("final_mix.wav")]);

    // The same stems mixed on the data dir: the same bytes, over the same ranges and headers.
    upload(&local, "p1", &stems).await;
    let (local_job, local_last) = mix(&local, "p1").await;
    assert_eq!(local_last["state"], "complete");
    let local_url = format!("/media/p1/mix_outputs/{local_job}/final_mix.wav");
    let opus = |job: &str| format!("/media/p1/mix_outputs/{job}/final_mix.opus");
    for (bucket_url, disk_url, range) in [
        (result_url.clone(), local_url.clone(), None),
        (result_url.clone(), local_url.clone(), Some("bytes=44-100043")),
        (result_url.clone(), local_url.clone(), Some("bytes=-4096")),
        (opus(&job_id), opus(&local_job), None),
        (opus(&job_id), opus(&local_job), Some("bytes=0-999")),
    ] {
        let (from_bucket, from_disk) = (get(&node, &bucket_url, range).await, get(&local, &disk_url, range).await);
        let expected_type = if bucket_url.ends_with(".opus") { "audio/ogg; codecs=opus" } else { "audio/wav" };
        assert_eq!(from_bucket.headers()["content-type"], expected_type);
        assert_eq!(from_bucket.status(), from_disk.status(), "{range:?}");
        for header in ["content-type", "content-length", "content-range", "accept-ranges", "cache-control"] {
            assert_eq!(from_bucket.headers().get(header), from_disk.headers().get(header), "{header} for {range:?}");
        }
        assert_eq!(from_bucket.bytes().await.unwrap(), from_disk.bytes().await.unwrap(), "{range:?}");
    }
    let whole = get(&node, &result_url, None).await;
    let etag = whole.headers()["etag"].clone();
    let result = whole.bytes().await.unwrap();
    let not_modified = node.app.client.get(node.app.url(&result_url)).header("if-none-match", etag).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);
    // The legacy newest-mix path and the analysis.
    let legacy = get(&node, "/media/p1/mix_outputs/final_mix.wav", None).await;
    assert_eq!((legacy.status().as_u16(), legacy.headers()["cache-control"].to_str().unwrap()), (200, "no-cache"));
    assert_eq!(legacy.bytes().await.unwrap(), result);
    let analysis: Value = get(&node, &format!("/media/p1/mix_outputs/{job_id}/analysis.json"), None).await.json().await.unwrap();
    let local_analysis: Value = get(&local, &format!("/media/p1/mix_outputs/{local_job}/analysis.json"), None).await.json().await.unwrap();
    assert_eq!(analysis, local_analysis);

    // Deleting a stem deletes both its objects.
    let deleted = node.app.client.delete(node.app.url(&format!("/projects/p1/stems/{}", ids[0]))).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let left: Vec<String> = bucket.objects().await.into_iter().map(|(key, _)| key).filter(|key| key.contains(ids[0])).collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(get(&node, &format!("/media/p1/stems/{}.wav", ids[0]), None).await.status(), 404);
}

#[tokio::test]
async fn a_refused_upload_leaves_nothing_in_the_bucket_or_the_cache() {
    let bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &[]).await;
    let good = make_audio(bucket.fixtures.path(), "good.wav", "sine=f=220:r=48000:d=1", &[]);
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.truncate(60);
    let broken = bucket.fixtures.path().join("broken.wav");
    std::fs::write(&broken, bytes).unwrap();

    let (status, body) = node.app.upload("p1", &[good.as_path(), broken.as_path()]).await;
    assert_eq!((status, body["error"].as_str().unwrap()), (415, "UNSUPPORTED_AUDIO"), "{body}");
    assert_eq!(bucket.objects().await, Vec::<(String, u64)>::new());
    assert_eq!(files_in(&data.path().join(".mixd-cache")), Vec::<String>::new());
    let (status, body) = node.app.get_json("/projects/p1/stems").await;
    assert_eq!((status, body["data"]["stems"].clone()), (200, serde_json::json!([])));
}

#[tokio::test]
async fn the_storage_stopped_mid_upload_answers_503_and_the_server_recovers_when_it_is_back() {
    let mut bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &[]).await;
    let stem = std::fs::read(make_audio(bucket.fixtures.path(), "long.wav", "sine=f=220:r=48000:d=20", &["-ac", "2"])).unwrap();

    // The body is sent in two halves; the S3 server is killed between them.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let boundary = "mixd-test-boundary";
    let head = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"long.wav\"\r\nContent-Type: audio/wav\r\n\r\n").into_bytes();
    let tail = format!("\r\n--{boundary}--\r\n").into_bytes();
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(receiver, |mut receiver| async move { receiver.recv().await.map(|chunk| (chunk, receiver)) }));
    let request = node.app.client.post(node.app.url("/projects/p1/stems")).header("content-type", format!("multipart/form-data; boundary={boundary}")).body(body).send();
    let response = tokio::spawn(request);
    let half = stem.len() / 2;
    sender.send(Ok([head, stem[..half].to_vec()].concat())).await.unwrap();
    bucket.s3.stop();
    sender.send(Ok([stem[half..].to_vec(), tail].concat())).await.unwrap();
    drop(sender);
    let response = response.await.unwrap().unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["error"].as_str().unwrap(), body["message"].as_str().unwrap()), ("MEDIA_UNAVAILABLE", "The media storage is unavailable; try again shortly"));
    assert_eq!(files_in(&data.path().join(".mixd-cache")), Vec::<String>::new(), "the upload's temporary file is gone");
    let (status, health) = node.app.get_json("/healthz").await;
    assert_eq!((status, health["error"].as_str().unwrap()), (503, "MEDIA_UNAVAILABLE"));

    // Back (empty: moto keeps nothing), the same server takes the same upload.
    bucket.s3.start_again();
    bucket.s3.create_bucket(BUCKET).await;
    assert_eq!(node.app.get_json("/healthz").await.0, 200);
    let uploaded = upload(&node, "p1", &[bucket.fixtures.path().join("long.wav")]).await;
    let id = uploaded[0]["stem_id"].as_str().unwrap();
    let keys: Vec<String> = bucket.objects().await.into_iter().map(|(key, _)| key).collect();
    assert_eq!(keys, [format!("p1/stems/{id}.json"), format!("p1/stems/{id}.wav")]);
}

#[tokio::test]
async fn the_storage_stopped_mid_mix_fails_the_job_with_media_unavailable_and_stores_nothing() {
    let mut bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &[]).await;
    let stems: Vec<PathBuf> =
        (1..=3).map(|i| make_audio(bucket.fixtures.path(), &format!("s{i}.wav"), &format!("sine=f={}:r=48000:d=30", 100 * i), &["-ac", "2"])).collect();
    upload(&node, "p1", &stems).await;

    let (status, started) = node.app.start_mix("p1", None).await;
    assert_eq!(status, 202);
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let mut stream = crate::helpers::SseStream::connect(&node.app.client, &node.app.url(&format!("/mix/p1/mix/job/{job_id}/events")), None).await;
    let mut last = Value::Null;
    let mut stopped = false;
    while let Some(event) = stream.next_event().await {
        if event.event.as_deref() != Some("status") {
            continue;
        }
        last = serde_json::from_str(&event.data).unwrap();
        if !stopped && last["state"] == "processing_tracks" {
            bucket.s3.stop();
            stopped = true;
        }
    }
    assert!(stopped, "the job reached processing_tracks: {last}");
    assert_eq!(
        (last["state"].as_str().unwrap(), last["error_code"].as_str().unwrap(), last["error"].as_str().unwrap()),
        ("error", "MEDIA_UNAVAILABLE", "The media storage is unavailable: the mix could not be stored")
    );
    assert_eq!(last["result_url"], Value::Null);
    // The run's work directory (where the engine wrote the mix) goes once the run ends, just
    // after the status is published.
    assert!(data.path().join(".mixd-cache/work/p1/mix_outputs").is_dir());
    let work = data.path().join(format!(".mixd-cache/work/p1/mix_outputs/{job_id}"));
    eventually("the run's work directory is removed", || !work.exists()).await;

    bucket.s3.start_again();
    bucket.s3.create_bucket(BUCKET).await;
    let response = get(&node, &format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"), None).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn two_nodes_share_the_bucket_and_no_directory_and_a_small_cache_keeps_nothing_after_use() {
    let bucket = Bucket::new().await;
    let db = ScratchDatabase::create_on(admin_url()).await;
    let (front_data, mixer_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let front = bucket.node(front_data.path(), &["--database-url", db.url.as_str(), "--mix-slots", "0"]).await;
    // A cap of 1 kB: every stem is larger, so each is fetched for its mix and evicted after it.
    let mixer = bucket.node(mixer_data.path(), &["--database-url", db.url.as_str(), "--mix-slots", "1", "--cache-max-gb", "0.000001"]).await;
    let stems = bucket.stems();
    upload(&front, "p1", &stems).await;

    let (job_id, last) = mix(&front, "p1").await;
    assert_eq!(last["state"], "complete", "{last}");
    let result = get(&front, &format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"), None).await;
    assert_eq!(result.status(), 200);
    let from_front = result.bytes().await.unwrap();
    assert_eq!(&from_front[..4], b"RIFF");
    let from_mixer = get(&mixer, &format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"), None).await.bytes().await.unwrap();
    assert_eq!(from_front, from_mixer);
    // The mixer ran it (the front takes no mixes), from stems it had to fetch, and kept none.
    assert_eq!(files_in(&mixer_data.path().join(".mixd-cache")), Vec::<String>::new());
    assert!(!mixer_data.path().join("p1").exists() && !front_data.path().join("p1").exists(), "no media in either data dir");
}

#[tokio::test]
async fn outputs_past_their_retention_are_deleted_from_the_bucket() {
    let bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &["--job-ttl", "2s", "--output-retention", "2s"]).await;
    upload(&node, "p1", &bucket.stems()).await;
    let (job_id, last) = mix(&node, "p1").await;
    assert_eq!(last["state"], "complete");
    let outputs = || async { bucket.objects().await.into_iter().filter(|(key, _)| key.contains(&job_id)).count() };
    assert_eq!(outputs().await, 3, "the WAV, the Opus file and the analysis");
    eventually_async("the outputs are deleted", || async { outputs().await == 0 }).await;
    let status_url = format!("/mix/p1/mix/job/{job_id}/status");
    eventually_async("the job expires", || async { node.app.get_json(&status_url).await.0 == 404 }).await;
    assert_eq!(get(&node, &format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"), None).await.status(), 404);
    // The stems stay.
    assert_eq!(bucket.objects().await.len(), 4);
}

#[tokio::test]
async fn media_redirects_to_a_presigned_url_only_after_the_access_check() {
    let bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &["--media-redirect"]).await;
    let stems = bucket.stems();
    let id = upload(&node, "p1", &stems).await[0]["stem_id"].as_str().unwrap().to_string();
    let path = format!("/media/p1/stems/{id}.wav");
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let anonymous = no_redirects.get(node.app.url(&path)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let redirected = no_redirects.get(node.app.url(&path)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(redirected.status(), 302);
    assert_eq!(redirected.headers()["cache-control"], "no-store");
    let location = redirected.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&format!("{}/{BUCKET}/{PREFIX}/p1/stems/{id}.wav?", bucket.s3.endpoint())), "{location}");
    assert!(location.contains("X-Amz-Signature=") && location.contains("X-Amz-Expires=300"), "{location}");
    // The URL alone reads the object, with no mixd credential.
    let fetched = reqwest::get(&location).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap(), std::fs::read(&stems[0]).unwrap());
    // A name that is not stored is still a 404, not a redirect to one.
    let missing = no_redirects.get(node.app.url("/media/p1/stems/00000000-0000-4000-8000-000000000000.wav")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn a_bucket_that_cannot_be_used_is_a_start_up_error_naming_it() {
    let bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let start = |storage: &str, env: Vec<(String, String)>| {
        Command::new(env!("CARGO_BIN_EXE_mixd"))
            .args(["serve", "--addr", "127.0.0.1:0", "--api-key", ADMIN_KEY, "--token-key", TOKEN_KEY, "--storage", storage, "--data-dir"])
            .arg(data.path())
            .envs(env)
            .output()
            .unwrap()
    };
    let missing = start("s3://no-such-bucket/x", bucket.s3.env());
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("the object storage s3://no-such-bucket/x cannot be used"), "{stderr}");
    assert!(!stderr.contains("testing"), "no credential in the error: {stderr}");

    let mut unreachable = bucket.s3.env();
    unreachable.retain(|(name, _)| name != "AWS_ENDPOINT_URL");
    unreachable.push(("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:9".into()));
    let refused = start(&format!("s3://{BUCKET}/x"), unreachable);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains(&format!("the object storage s3://{BUCKET}/x cannot be used")));

    let not_s3 = start("gs://bucket/x", bucket.s3.env());
    assert!(!not_s3.status.success());
    assert!(String::from_utf8_lossy(&not_s3.stderr).contains("expected s3://bucket/prefix"));
}

#[tokio::test]
async fn a_stem_larger_than_a_part_is_stored_as_a_multipart_upload_and_read_back_whole() {
    let bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &[]).await;
    // 70 s of 48 kHz stereo 16-bit: 13.4 MB, two parts of 8 MiB.
    let large = make_audio(bucket.fixtures.path(), "large.wav", "sine=f=330:r=48000:d=70", &["-ac", "2"]);
    let id = upload(&node, "p1", std::slice::from_ref(&large)).await[0]["stem_id"].as_str().unwrap().to_string();
    let key = format!("{PREFIX}/p1/stems/{id}.wav");
    let head = reqwest::Client::new().head(format!("{}/{BUCKET}/{key}", bucket.s3.endpoint())).send().await.unwrap();
    // A multipart object's ETag is the digest of its parts' digests, suffixed with their count.
    assert!(head.headers()["etag"].to_str().unwrap().ends_with("-2\""), "{:?}", head.headers()["etag"]);
    let expected = std::fs::read(&large).unwrap();
    assert_eq!(bucket.s3.object(BUCKET, &key).await.unwrap(), expected);
    let ranged = get(&node, &format!("/media/p1/stems/{id}.wav"), Some("bytes=8388600-8388700")).await;
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap(), expected[8_388_600..=8_388_700]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stalled_past_its_lease_never_replaces_the_result_in_the_bucket() {
    let bucket = Bucket::new().await;
    let db = ScratchDatabase::create_on(admin_url()).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let node = |dir: usize, slots: &'static str| {
        let args = ["--database-url", db.url.as_str(), "--mix-slots", slots, "--lease", "2s"];
        let data = dirs[dir].path().to_path_buf();
        let bucket = &bucket;
        async move { bucket.node(&data, &args).await }
    };
    let watcher = node(0, "0").await;
    let stalled = node(1, "1").await;
    let stems: Vec<PathBuf> =
        (1..=3).map(|i| make_audio(bucket.fixtures.path(), &format!("s{i}.wav"), &format!("sine=f={}:r=48000:d=40", 110 * i), &["-ac", "2"])).collect();
    upload(&watcher, "p1", &stems).await;
    let (_, started) = watcher.app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let mut events = crate::helpers::SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("/mix/p1/mix/job/{job_id}/events")), None).await;
    until_state(&mut events, "processing_tracks").await;
    stalled.process.signal("STOP");
    let rescuer = node(2, "1").await;
    let complete = statuses_over_sse(events).await.last().unwrap().clone();
    assert_eq!(complete["state"], "complete", "{complete}");
    assert_eq!(counter(&rescuer, CLAIMED).await, 1, "the job ran again elsewhere");
    let rescued_outputs = ["analysis.json", "final_mix.opus", "final_mix.wav"].map(|name| format!("p1/mix_outputs/{job_id}/attempt-2/{name}"));
    let outputs = || async { bucket.objects().await.into_iter().map(|(key, _)| key).filter(|key| key.contains("mix_outputs")).collect::<Vec<_>>() };
    assert_eq!(outputs().await, rescued_outputs);
    let result_url = format!("/media/p1/mix_outputs/{job_id}/final_mix.wav");
    let served = get(&watcher, &result_url, None).await.bytes().await.unwrap();

    stalled.process.signal("CONT");
    eventually_async("the stalled node saw its lease gone", || async { counter(&stalled, "mixd_leases_total{event=\"lost\"}").await == 1 }).await;
    // Whatever the stale run stored under its own attempt is deleted again, and never served.
    eventually_async("only the rescuer's outputs are left", || async { outputs().await == rescued_outputs }).await;
    let (_, now) = watcher.app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await;
    assert_eq!(now["data"], complete, "the job is exactly as the rescuer left it");
    assert_eq!(get(&stalled, &result_url, None).await.bytes().await.unwrap(), served);
}

#[tokio::test]
async fn the_newest_mix_is_the_newest_complete_job_on_object_storage() {
    let bucket = Bucket::new().await;
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &["--mix-slots", "2"]).await;
    crate::media::the_newest_mix_is_the_newest_complete_job(&node.app).await;
}

#[tokio::test]
async fn the_project_quota_counts_the_stems_in_the_bucket() {
    let bucket = Bucket::new().await;
    let stems = bucket.stems();
    let size = std::fs::metadata(&stems[0]).unwrap().len();
    let quota = format!("{}", 1.5 * size as f64 / 1e9);
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &["--project-quota-gb", &quota]).await;
    upload(&node, "p1", &stems[..1]).await;
    let stored = bucket.objects().await;
    // The same file again, as a second stem: past the quota.
    let (status, body) = node.app.upload("p1", &[stems[0].as_path()]).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{body}");
    assert_eq!(bucket.objects().await, stored, "nothing of the refused upload reached the bucket");
    // A node with a job store of its own takes the project's usage from the bucket's listing.
    let other_data = tempfile::tempdir().unwrap();
    let other = bucket.node(other_data.path(), &["--project-quota-gb", &quota]).await;
    assert_eq!(other.app.upload("p1", &[stems[0].as_path()]).await.0, 413);
    assert_eq!(other.app.upload("p1", &[stems[1].as_path()]).await.0, 201, "a smaller one still fits");
    assert_eq!(bucket.objects().await.len(), stored.len() + 2, "its audio and its record");
}

#[tokio::test]
async fn a_stem_deleted_twice_at_once_gives_its_bytes_back_once() {
    let bucket = Bucket::new().await;
    let stems = bucket.stems();
    let (big, small) = (std::fs::metadata(&stems[0]).unwrap().len(), std::fs::metadata(&stems[1]).unwrap().len());
    // Room for both stems and half the small one again.
    let quota = format!("{}", (big as f64 + 1.5 * small as f64) / 1e9);
    let data = tempfile::tempdir().unwrap();
    let node = bucket.node(data.path(), &["--project-quota-gb", &quota]).await;
    let stored = upload(&node, "p1", &stems).await;
    let small_id = stored[1]["stem_id"].as_str().unwrap();
    let delete = || node.app.client.delete(node.app.url(&format!("/projects/p1/stems/{small_id}"))).send();
    let (first, second) = tokio::join!(delete(), delete());
    assert!([first.unwrap().status().as_u16(), second.unwrap().status().as_u16()].contains(&200));
    // Given back once: the small stem fits again, twice it does not.
    upload(&node, "p1", &stems[1..]).await;
    let (status, body) = node.app.upload("p1", &[stems[1].as_path()]).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{body}");
}
