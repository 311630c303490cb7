//! Cluster mode: several real `mixd serve` processes on one PostgreSQL database and one data
//! dir, with real faults (kill -9, SIGSTOP, a terminated LISTEN connection). Each test gets a
//! database of its own, dropped at the end.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::common::ScratchDatabase;
use crate::helpers::{connect_ws, eventually_async, make_audio, start_server, Server, SseStream, DEADLINE};

/// The server tests make their databases on: `MIXD_TEST_POSTGRES` (scripts/test sets it when it
/// starts a throwaway cluster), else the machine's own.
pub(crate) fn admin_url() -> String {
    std::env::var("MIXD_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

struct Cluster {
    db: ScratchDatabase,
    data: tempfile::TempDir,
    fixtures: tempfile::TempDir,
}

impl Cluster {
    async fn new() -> Self {
        Self::on(ScratchDatabase::create_on(admin_url()).await)
    }

    fn on(db: ScratchDatabase) -> Self {
        Self { db, data: tempfile::tempdir().unwrap(), fixtures: tempfile::tempdir().unwrap() }
    }

    /// A node with `slots` mixer slots and a 2 s lease.
    async fn node(&self, slots: usize) -> Server {
        self.node_with_lease(slots, "2s").await
    }

    async fn node_with_lease(&self, slots: usize, lease: &str) -> Server {
        self.node_with(slots, &["--lease", lease]).await
    }

    async fn node_with(&self, slots: usize, extra_args: &[&str]) -> Server {
        let slots = slots.to_string();
        let args: Vec<&str> = ["--database-url", self.db.url.as_str(), "--mix-slots", &slots].into_iter().chain(extra_args.iter().copied()).collect();
        start_server(self.data.path(), self.fixtures.path(), &args).await
    }

    /// Stems of `seconds` each (three of them), uploaded to `node` as project `project`.
    async fn upload(&self, node: &Server, project: &str, seconds: u32) {
        let stems: Vec<PathBuf> =
            (1..=3).map(|i| make_audio(self.fixtures.path(), &format!("{project}-{i}.wav"), &format!("sine=f={}:r=48000:d={seconds}", 110 * i), &["-ac", "2"])).collect();
        let paths: Vec<&Path> = stems.iter().map(PathBuf::as_path).collect();
        assert_eq!(node.app.upload(project, &paths).await.0, 201);
    }
}

async fn start(node: &Server, project: &str) -> String {
    let (status, started) = node.app.start_mix(project, None).await;
    assert_eq!(status, 202, "{started}");
    started["data"]["job_id"].as_str().unwrap().to_string()
}

/// A Prometheus counter of `node`, by its full name with labels.
pub(crate) async fn counter(node: &Server, series: &str) -> u64 {
    let text = node.app.client.get(node.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or_else(|| panic!("{series} in {text}"))
}

pub(crate) const CLAIMED: &str = "mixd_leases_total{event=\"claimed\"}";

/// Every status of a job's SSE stream on `node`, until it ends.
pub(crate) async fn statuses_over_sse(mut stream: SseStream) -> Vec<Value> {
    let mut statuses = Vec::new();
    while let Some(event) = stream.next_event().await {
        if event.event.as_deref() == Some("status") {
            statuses.push(serde_json::from_str(&event.data).unwrap());
        }
    }
    statuses
}

/// The names in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn seqs(statuses: &[Value]) -> Vec<u64> {
    statuses.iter().map(|status| status["seq"].as_u64().unwrap()).collect()
}

/// The stages a job runs through, in order.
const STAGES: [&str; 9] = ["queued", "running", "loading_stems", "aligning_stems", "processing_tracks", "mixing", "mastering", "exporting", "complete"];

/// Reads SSE statuses until one is at `state` or a later stage (the stream may join past it),
/// short of the end.
pub(crate) async fn until_state(stream: &mut SseStream, state: &str) -> Vec<Value> {
    let target = STAGES.iter().position(|stage| *stage == state).expect("a stage");
    let mut seen = Vec::new();
    loop {
        let event = stream.next_event().await.unwrap_or_else(|| panic!("the stream ended before {state}: {seen:?}"));
        if event.event.as_deref() != Some("status") {
            continue;
        }
        let status: Value = serde_json::from_str(&event.data).unwrap();
        assert_ne!(status["state"], "complete", "the mix finished before {state}: make it longer");
        let reached = STAGES.iter().position(|stage| status["state"] == *stage).is_some_and(|at| at >= target);
        seen.push(status);
        if reached {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_on_one_node_mixes_on_another_and_a_third_streams_every_change() {
    let cluster = Cluster::new().await;
    let (a, b, c) = (cluster.node(0).await, cluster.node(0).await, cluster.node(1).await);
    cluster.upload(&a, "p1", 5).await;
    let job_id = start(&a, "p1").await;

    let path = format!("/mix/p1/mix/job/{job_id}");
    let sse = SseStream::connect(&b.app.client, &b.app.url(&format!("{path}/events")), None).await;
    assert_eq!(sse.status, 200);
    let (mut socket, _) = connect_ws(b.app.url(&format!("{path}/ws")).replace("http", "ws")).await.unwrap();
    let over_ws = async {
        let mut statuses = Vec::new();
        while let Some(Ok(message)) = socket.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).unwrap();
                statuses.push(frame["data"].clone());
            }
        }
        statuses
    };
    let (over_sse, over_ws) = tokio::join!(statuses_over_sse(sse), over_ws);

    for statuses in [&over_sse, &over_ws] {
        assert_eq!(statuses.last().unwrap()["state"], "complete", "{statuses:?}");
        let seqs = seqs(statuses);
        assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1), "seq rises by one with no gap: {seqs:?}");
        assert!(statuses.iter().any(|status| status["state"] == "mixing"), "the stages came through");
    }
    assert_eq!((counter(&a, CLAIMED).await, counter(&b, CLAIMED).await, counter(&c, CLAIMED).await), (0, 0, 1), "only the node with a slot mixed");
    // Every node answers for the job alike.
    let (_, on_a) = a.app.get_json(&format!("{path}/status")).await;
    let (_, on_c) = c.app.get_json(&format!("{path}/status")).await;
    assert_eq!(on_a["data"], on_c["data"]);
    assert_eq!(&on_a["data"], over_sse.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_mix_loses_its_job_to_another_which_completes_it_under_the_same_id() {
    let cluster = Cluster::new().await;
    let watcher = cluster.node(0).await;
    let mut first = cluster.node(1).await;
    cluster.upload(&watcher, "p1", 40).await;
    let job_id = start(&watcher, "p1").await;
    let path = format!("/mix/p1/mix/job/{job_id}");
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("{path}/events")), None).await;
    let mut seen = until_state(&mut events, "processing_tracks").await;
    // Only now does a second mixing node exist: the job is certainly the first's.
    let second = cluster.node(1).await;
    first.kill();

    seen.extend(statuses_over_sse(events).await);
    assert_eq!(seen.last().unwrap()["state"], "complete", "{seen:?}");
    assert_eq!(seen.last().unwrap()["job_id"], job_id.as_str());
    let seqs = seqs(&seen);
    assert!(seqs.windows(2).all(|pair| pair[1] > pair[0]), "seq never goes back: {seqs:?}");
    assert!(seen.iter().any(|status| status["state"] == "queued" && status["seq"].as_u64() > Some(1)), "re-queued after the kill: {seen:?}");
    assert_eq!(counter(&second, CLAIMED).await, 1);
    assert_eq!(counter(&watcher, "mixd_leases_total{event=\"rescued\"}").await + counter(&second, "mixd_leases_total{event=\"rescued\"}").await, 1);
    // The result exists once, and nothing of the killed run is left beside it.
    assert_eq!(files_in(&cluster.data.path().join(format!("p1/mix_outputs/{job_id}"))), ["analysis.json", "final_mix.opus", "final_mix.wav"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_encoding_loses_its_job_to_another_which_delivers_every_format() {
    let cluster = Cluster::new().await;
    let watcher = cluster.node(0).await;
    let mut first = cluster.node(1).await;
    cluster.upload(&watcher, "p1", 120).await;
    let formats = serde_json::json!({"output": {"formats": [{"format": "wav"}, {"format": "flac"}, {"format": "mp3"}, {"format": "opus"}]}});
    let (status, started) = watcher.app.start_mix("p1", Some(formats)).await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let path = format!("/mix/p1/mix/job/{job_id}");
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("{path}/events")), None).await;
    let mut seen = until_state(&mut events, "exporting").await;
    let second = cluster.node(1).await;
    first.kill();

    // The kill came mid-export: the first run had put its WAV aside, not yet its Opus file.
    let outputs = cluster.data.path().join(format!("p1/mix_outputs/{job_id}"));
    let staged: Vec<String> =
        files_in(&outputs).into_iter().filter(|name| name.starts_with(&format!(".final_mix.{job_id}.")) && !name.ends_with(".writing.partial")).collect();
    assert!(staged.iter().any(|name| name.ends_with(".wav.partial")), "{staged:?}");
    assert!(!staged.iter().any(|name| name.ends_with(".opus.partial")), "{staged:?}");

    seen.extend(statuses_over_sse(events).await);
    let complete = seen.last().unwrap();
    assert_eq!(complete["state"], "complete", "{seen:?}");
    assert_eq!(counter(&second, CLAIMED).await, 1);
    let formats: Vec<&str> = complete["results"].as_array().unwrap().iter().map(|file| file["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["wav", "flac", "mp3", "opus"]);
    // Every file whole, and nothing of either run's temporaries left beside them.
    assert_eq!(files_in(&outputs), ["analysis.json", "final_mix.flac", "final_mix.mp3", "final_mix.opus", "final_mix.wav"]);
    for file in complete["results"].as_array().unwrap() {
        let served = watcher.app.client.get(watcher.app.url(file["url"].as_str().unwrap())).send().await.unwrap();
        assert_eq!(served.status(), 200, "{file}");
        assert_eq!(served.bytes().await.unwrap().len() as u64, file["bytes"].as_u64().unwrap(), "{file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stalled_past_its_lease_changes_nothing_when_it_wakes() {
    let cluster = Cluster::new().await;
    let watcher = cluster.node(0).await;
    let stalled = cluster.node(1).await;
    cluster.upload(&watcher, "p1", 40).await;
    let job_id = start(&watcher, "p1").await;
    let path = format!("/mix/p1/mix/job/{job_id}");
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("{path}/events")), None).await;
    until_state(&mut events, "processing_tracks").await;
    stalled.process.signal("STOP");
    let rescuer = cluster.node(1).await;
    let finished = statuses_over_sse(events).await;
    let complete = finished.last().unwrap().clone();
    assert_eq!(complete["state"], "complete");
    assert_eq!(counter(&rescuer, CLAIMED).await, 1, "the job ran again elsewhere");
    let result = cluster.data.path().join(format!("p1/mix_outputs/{job_id}/final_mix.wav"));
    let bytes = std::fs::read(&result).unwrap();

    stalled.process.signal("CONT");
    // The woken node learns that its lease is gone, and stops.
    eventually_async("the stalled node saw its lease gone", || async { counter(&stalled, "mixd_leases_total{event=\"lost\"}").await == 1 }).await;
    let (_, now) = watcher.app.get_json(&format!("{path}/status")).await;
    assert_eq!(now["data"], complete, "the job is exactly as the rescuer left it");
    assert_eq!(std::fs::read(&result).unwrap(), bytes, "the result is untouched");
    assert_eq!(files_in(result.parent().unwrap()), ["analysis.json", "final_mix.opus", "final_mix.wav"], "the stale run removed its own files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stalled_inside_a_transaction_holds_the_queue_lock_for_seconds_not_forever() {
    /// The advisory lock every queue change takes (src/jobs/store/postgres.rs).
    const QUEUE_LOCK: i64 = 0x6d69_7864_0000_0001;
    let cluster = Cluster::new().await;
    let (stalled, other) = (cluster.node(0).await, cluster.node(0).await);
    cluster.upload(&other, "p1", 2).await;
    // The test holds the queue lock, so the first node's submission waits for it inside its
    // transaction; the node is stopped there, and the lock handed to its stopped session.
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    let mut holding = db.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(QUEUE_LOCK).execute(&mut *holding).await.unwrap();
    let (client, url) = (stalled.app.client.clone(), stalled.app.url("/mix/p1/mix/start"));
    let submitting = tokio::spawn(async move { client.post(url).send().await.unwrap().status().as_u16() });
    let watching = sqlx::PgPool::connect(&cluster.db.url).await.unwrap();
    let waiting = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'SELECT pg_advisory_xact_lock%'";
    eventually_async("the node waits for the queue lock", || async { sqlx::query_scalar::<_, i64>(waiting).fetch_one(&watching).await.unwrap() == 1 }).await;
    stalled.process.signal("STOP");
    holding.commit().await.unwrap();

    // PostgreSQL ends the stalled session, and with it the lock: the other node's job is taken.
    let (status, body) = tokio::time::timeout(DEADLINE, other.app.start_mix("p1", None)).await.expect("the queue lock came free");
    assert_eq!(status, 202, "{body}");
    stalled.process.signal("CONT");
    assert_eq!(submitting.await.unwrap(), 503, "the stalled node's own submission failed with its session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_hands_its_mix_back_for_another_to_run_at_once() {
    let cluster = Cluster::new().await;
    // Leases far longer than the test: only a hand-back lets the job run again in time.
    let watcher = cluster.node_with_lease(0, "10m").await;
    let mut first = cluster.node_with_lease(1, "10m").await;
    cluster.upload(&watcher, "p1", 40).await;
    let job_id = start(&watcher, "p1").await;
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("/mix/p1/mix/job/{job_id}/events")), None).await;
    let mut seen = until_state(&mut events, "processing_tracks").await;
    let second = cluster.node_with_lease(1, "10m").await;
    first.process.signal("TERM");
    assert!(first.process.wait_for_exit(DEADLINE).expect("exits on SIGTERM").success());

    seen.extend(statuses_over_sse(events).await);
    assert_eq!(seen.last().unwrap()["state"], "complete", "{seen:?}");
    assert_eq!(counter(&second, CLAIMED).await, 1);
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    let (attempts, handed_back): (i32, i32) = sqlx::query_as("SELECT attempts, handed_back FROM jobs").fetch_one(&mut db).await.unwrap();
    assert_eq!((attempts, handed_back), (2, 1), "two runs, the first handed back rather than interrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listen_connection_loses_no_event() {
    let cluster = Cluster::new().await;
    let mixer = cluster.node(1).await;
    let watcher = cluster.node(0).await;
    cluster.upload(&watcher, "p1", 15).await;
    let job_id = start(&watcher, "p1").await;
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("/mix/p1/mix/job/{job_id}/events")), None).await;
    let mut seen = until_state(&mut events, "loading_stems").await;

    let mut admin = PgConnection::connect(&cluster.db.url).await.unwrap();
    let terminated: Vec<bool> = sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'")
        .fetch_all(&mut admin)
        .await
        .unwrap();
    assert_eq!(terminated, [true, true], "each node's LISTEN connection");

    seen.extend(statuses_over_sse(events).await);
    assert_eq!(seen.last().unwrap()["state"], "complete");
    let seqs = seqs(&seen);
    assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1), "no event lost: {seqs:?}");
    assert_eq!(counter(&mixer, CLAIMED).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_sent_to_two_nodes_at_once_makes_one_job() {
    let cluster = Cluster::new().await;
    let (a, b) = (cluster.node(0).await, cluster.node(0).await);
    cluster.upload(&a, "p1", 1).await;
    let send = |node: &Server| node.app.client.post(node.app.url("/mix/p1/mix/start")).header("Idempotency-Key", "same").send();
    let (first, second) = tokio::join!(send(&a), send(&b));
    let (first, second) = (first.unwrap(), second.unwrap());
    let mut codes = [first.status().as_u16(), second.status().as_u16()];
    codes.sort();
    assert_eq!(codes, [200, 202], "one made it, the other found it");
    let (first, second): (Value, Value) = (first.json().await.unwrap(), second.json().await.unwrap());
    assert_eq!(first["data"]["job_id"], second["data"]["job_id"]);
    let (_, listed) = b.app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!(listed["data"]["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_starts_at_once_on_three_nodes_never_queue_more_than_the_project_cap() {
    let cluster = Cluster::new().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(cluster.node_with(0, &["--max-queued-per-project", "5"]).await);
    }
    cluster.upload(&nodes[0], "p1", 1).await;
    let sends = (0..20).map(|i| {
        let node = &nodes[i % 3];
        async move {
            let response = node.app.client.post(node.app.url("/mix/p1/mix/start")).send().await.unwrap();
            (response.status().as_u16(), response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()))
        }
    });
    let answers = futures_util::future::join_all(sends).await;
    let accepted = answers.iter().filter(|(status, _)| *status == 202).count();
    let refused: Vec<_> = answers.iter().filter(|(status, _)| *status != 202).collect();
    assert_eq!(accepted, 5, "{answers:?}");
    assert!(refused.iter().all(|(status, retry)| *status == 429 && retry.as_deref() == Some("30")), "{answers:?}");
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE project_id = 'p1' AND state = 'queued'").fetch_one(&mut db).await.unwrap();
    assert_eq!(queued, 5);
    let mut counted = 0;
    for node in &nodes {
        counted += counter(node, "mixd_refusals_total{code=\"TOO_MANY_JOBS\"}").await;
    }
    assert_eq!(counted, 15, "each node counts its own refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_uploads_at_once_on_three_nodes_keep_exactly_what_the_quota_holds() {
    let cluster = Cluster::new().await;
    let stems: Vec<PathBuf> = (0..12).map(|i| make_audio(cluster.fixtures.path(), &format!("s{i}.wav"), "sine=f=440:r=48000:d=1", &["-ac", "2"])).collect();
    let size = std::fs::metadata(&stems[0]).unwrap().len();
    // Room for five of them.
    let quota = format!("{}", 5.5 * size as f64 / 1e9);
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(cluster.node_with(0, &["--project-quota-gb", &quota]).await);
    }
    let uploads = stems.iter().enumerate().map(|(i, stem)| {
        let node = &nodes[i % 3];
        async move { node.app.upload("p1", &[stem.as_path()]).await }
    });
    let mut statuses: Vec<u16> = futures_util::future::join_all(uploads).await.into_iter().map(|(status, _)| status).collect();
    statuses.sort();
    assert_eq!(statuses, [[201; 5].as_slice(), [413; 7].as_slice()].concat());
    let (_, listed) = nodes[1].app.get_json("/projects/p1/stems").await;
    assert_eq!(listed["data"]["stems"].as_array().unwrap().len(), 5);
    let audio = std::fs::read_dir(cluster.data.path().join("p1/stems")).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "wav")).count();
    assert_eq!(audio, 5, "no refused upload left a file");
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    let used: i64 = sqlx::query_scalar("SELECT bytes FROM project_usage WHERE project_id = 'p1'").fetch_one(&mut db).await.unwrap();
    assert_eq!(used as u64, 5 * size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_a_project_queueing_many_delays_another_by_one_mix_per_slot_at_most() {
    let cluster = Cluster::new().await;
    let watcher = cluster.node(0).await;
    cluster.upload(&watcher, "pa", 2).await;
    cluster.upload(&watcher, "pb", 2).await;
    let mut stream = SseStream::connect(&watcher.app.client, &watcher.app.url("/events"), None).await;
    let mut a = Vec::new();
    for _ in 0..6 {
        a.push(start(&watcher, "pa").await);
    }
    let b = start(&watcher, "pb").await;
    // Only now do mixing nodes exist: two slots, one on each.
    let _nodes = (cluster.node(1).await, cluster.node(1).await);
    let order = crate::fair_use::run_order(&mut stream, 7).await;
    // The first two claims take one job each; pb, never claimed, is next: before pa's third.
    let at = |job: &String| order.iter().position(|run| run == job).unwrap();
    assert!(at(&b) < at(&a[2]), "pb's job ran {}th: {order:?}", at(&b) + 1);
    assert_eq!(order.iter().filter(|job| **job != b).cloned().collect::<Vec<_>>(), a, "pa's jobs in the order they came");
}

/// A dashboard-style subscriber on project `p1` of `watcher` that leaves before the job it saw
/// ends, and comes back with its cursor after: it gets the terminal status first thing.
async fn resume_after_the_end(watcher: &Server, starter: &Server) {
    let job_id = start(starter, "p1").await;
    let url = watcher.app.url("/mix/p1/mix/events");
    let mut first = SseStream::connect(&watcher.app.client, &url, None).await;
    let cursor = loop {
        let event = first.next_event().await.unwrap();
        if event.event.as_deref() == Some("status") && event.data.contains(&job_id) {
            break event.id.unwrap();
        }
    };
    drop(first);
    eventually_async("the job completed", || async { watcher.app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await.1["data"]["state"] == "complete" }).await;

    let mut resumed = SseStream::connect(&watcher.app.client, &url, Some(&cursor)).await;
    let event = loop {
        let event = resumed.next_event().await.unwrap();
        if event.event.as_deref() == Some("status") {
            break event;
        }
    };
    let status: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!((status["job_id"].as_str(), status["state"].as_str()), (Some(job_id.as_str()), Some("complete")));
    let (epoch, position) = cursor.split_once(':').expect("a cursor is {epoch}:{position}");
    let resumed_at = event.id.unwrap();
    let (resumed_epoch, resumed_position) = resumed_at.split_once(':').unwrap();
    assert_eq!(resumed_epoch, epoch, "one store, one epoch, on every node");
    assert!(resumed_position.parse::<u64>().unwrap() > position.parse::<u64>().unwrap(), "the cursor grew");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_subscriber_that_reconnects_with_its_cursor_gets_the_job_that_ended_meanwhile() {
    // One node on the embedded store.
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let single = start_server(data.path(), fixtures.path(), &["--mix-slots", "1"]).await;
    let stem = make_audio(fixtures.path(), "a.wav", "sine=f=220:r=48000:d=2", &[]);
    assert_eq!(single.app.upload("p1", &[&stem]).await.0, 201);
    resume_after_the_end(&single, &single).await;

    // Two nodes on PostgreSQL: the watcher is not the node the job ran on.
    let cluster = Cluster::new().await;
    let (watcher, mixer) = (cluster.node(0).await, cluster.node(1).await);
    cluster.upload(&mixer, "p1", 2).await;
    resume_after_the_end(&watcher, &mixer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_at_once_on_a_fresh_database_migrate_it_once_and_all_serve() {
    let cluster = Cluster::new().await;
    // Three processes spawned together race for the schema; the migration lock lets one apply it.
    let starting: Vec<_> = [1usize, 1, 0]
        .into_iter()
        .map(|slots| {
            let (data, fixtures, url) = (cluster.data.path().to_path_buf(), cluster.fixtures.path().to_path_buf(), cluster.db.url.clone());
            tokio::task::spawn_blocking(move || {
                let slots = slots.to_string();
                tokio::runtime::Handle::current().block_on(start_server(&data, &fixtures, &["--database-url", &url, "--mix-slots", &slots, "--lease", "2s"]))
            })
        })
        .collect();
    let mut nodes = Vec::new();
    for node in starting {
        nodes.push(node.await.unwrap());
    }
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(&mut db).await.unwrap();
    assert_eq!(applied, [1, 2, 3], "each migration applied once");
    cluster.upload(&nodes[2], "p1", 2).await;
    let job_id = start(&nodes[2], "p1").await;
    for node in &nodes {
        eventually_async("every node reads the job complete", || async { job_state(node, &job_id).await == "complete" }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_a_node_that_is_not_mixing_stops_the_mix_and_the_cluster_queue_moves_up() {
    let cluster = Cluster::new().await;
    let (watcher, mixer) = (cluster.node(0).await, cluster.node(1).await);
    cluster.upload(&watcher, "p1", 20).await;
    // A ten-minute mix (its first stem starts at 10:00) holds the cluster's only slot.
    let (status, long) = watcher.app.start_mix("p1", Some(serde_json::json!({"tracks": {"p1-1.wav": {"offset_ms": 600_000}}}))).await;
    assert_eq!(status, 202, "{long}");
    let running = long["data"]["job_id"].as_str().unwrap().to_string();
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("/mix/p1/mix/job/{running}/events")), None).await;
    until_state(&mut events, "loading_stems").await;
    let waiting = start(&watcher, "p1").await;
    for node in [&watcher, &mixer] {
        let (_, status) = node.app.get_json(&format!("/mix/p1/mix/job/{waiting}/status")).await;
        assert_eq!((status["data"]["state"].as_str(), status["data"]["queue_position"].as_u64()), (Some("queued"), Some(1)), "the same place on every node");
    }

    let response = watcher.app.client.delete(watcher.app.url(&format!("/mix/p1/mix/job/{running}"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let ended = statuses_over_sse(events).await;
    let last = ended.last().unwrap();
    assert_eq!((last["state"].as_str(), last["error_code"].as_str()), (Some("error"), Some("CANCELED")));
    // The mixing node stopped the canceled run, so its slot took the waiting job.
    eventually_async("the waiting job completed", || async { job_state(&watcher, &waiting).await == "complete" }).await;
    assert_eq!(counter(&mixer, CLAIMED).await, 2);
    let outputs = cluster.data.path().join("p1/mix_outputs");
    eventually_async("the canceled run left nothing", || async { !outputs.join(&running).exists() }).await;
}

/// `pg_ctl <action>` on the throwaway PostgreSQL scripts/test started for this test alone.
fn pg_ctl(action: &[&str]) {
    let command = std::env::var("MIXD_TEST_PG_CTL").expect("scripts/test starts a PostgreSQL this test may stop and start");
    let mut words = command.split_whitespace();
    let output = std::process::Command::new(words.next().unwrap()).args(words).args(action).output().unwrap();
    assert!(output.status.success(), "pg_ctl {action:?}: {}", String::from_utf8_lossy(&output.stderr));
}

async fn job_state(node: &Server, job_id: &str) -> Value {
    node.app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await.1["data"]["state"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_makes_nodes_unhealthy_and_loses_no_accepted_job() {
    let admin = std::env::var("MIXD_TEST_RESTARTABLE_POSTGRES").expect("scripts/test starts a PostgreSQL this test may stop and start");
    let cluster = Cluster::on(ScratchDatabase::create_on(admin).await);
    let (watcher, mixer) = (cluster.node(0).await, cluster.node(1).await);
    cluster.upload(&watcher, "p1", 20).await;
    // The first mix is ten minutes long (its first stem starts at 10:00), so it is running when
    // the database stops; the second waits behind it.
    let (status, long) = watcher.app.start_mix("p1", Some(serde_json::json!({"tracks": {"p1-1.wav": {"offset_ms": 600_000}}}))).await;
    assert_eq!(status, 202, "{long}");
    let accepted = [long["data"]["job_id"].as_str().unwrap().to_string(), start(&watcher, "p1").await];
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("/mix/p1/mix/job/{}/events", accepted[0])), None).await;
    until_state(&mut events, "loading_stems").await;

    pg_ctl(&["stop", "-m", "fast", "-w"]);
    let health = watcher.app.client.get(watcher.app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(health.json::<Value>().await.unwrap()["error"], "STORE_UNAVAILABLE");
    let (status, refused) = watcher.app.start_mix("p1", None).await;
    assert_eq!((status, refused["error"].as_str()), (503, Some("STORE_UNAVAILABLE")), "a job the store cannot take is refused, not accepted");
    pg_ctl(&["start", "-w"]);

    eventually_async("the node is healthy again", || async { watcher.app.client.get(watcher.app.url("/healthz")).send().await.unwrap().status() == 200 }).await;
    for job_id in &accepted {
        // On both nodes: each reads the log on its own, and after the database's restart a node's
        // LISTEN connection may be back a poll (a second) after the other's.
        for node in [&watcher, &mixer] {
            eventually_async("every accepted job completed", || async { job_state(node, job_id).await == "complete" }).await;
        }
    }
    let after = start(&mixer, "p1").await;
    eventually_async("a job accepted after the restart completed", || async { job_state(&watcher, &after).await == "complete" }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_node_dies_in_three_runs_ends_interrupted_and_runs_no_more() {
    let cluster = Cluster::new().await;
    let watcher = cluster.node(0).await;
    cluster.upload(&watcher, "p1", 40).await;
    let job_id = start(&watcher, "p1").await;
    let mut events = SseStream::connect(&watcher.app.client, &watcher.app.url(&format!("/mix/p1/mix/job/{job_id}/events")), None).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        // A node of its own for each run, killed once the run is at work.
        let mut mixer = cluster.node(1).await;
        seen.extend(until_state(&mut events, "processing_tracks").await);
        mixer.kill();
    }
    seen.extend(statuses_over_sse(events).await);
    let last = seen.last().unwrap();
    assert_eq!((last["state"].as_str(), last["error_code"].as_str()), (Some("error"), Some("INTERRUPTED")), "{seen:?}");
    assert_eq!(last["error"], "The node running this mix stopped 3 times; it was not run again");
    let seqs = seqs(&seen);
    assert!(seqs.windows(2).all(|pair| pair[1] > pair[0]), "seq never goes back: {seqs:?}");
    assert_eq!(seen.iter().filter(|status| status["state"] == "running").count(), 3, "three runs: {seen:?}");
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM jobs").fetch_one(&mut db).await.unwrap();
    assert_eq!(attempts, 3, "not claimed a fourth time");
    assert!(!cluster.data.path().join(format!("p1/mix_outputs/{job_id}/final_mix.wav")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_and_its_output_expire_on_every_node_and_free_its_idempotency_key() {
    let cluster = Cluster::new().await;
    let keep = ["--job-ttl", "2s", "--output-retention", "2s"];
    let (mixer, other) = (cluster.node_with(1, &keep).await, cluster.node_with(0, &keep).await);
    cluster.upload(&other, "p1", 1).await;
    let started: Value = other.app.client.post(other.app.url("/mix/p1/mix/start")).header("Idempotency-Key", "k1").send().await.unwrap().json().await.unwrap();
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(other.app.follow_job("p1", &job_id).await.last().unwrap()["state"], "complete");
    let output = cluster.data.path().join(format!("p1/mix_outputs/{job_id}"));
    assert!(output.join("final_mix.wav").is_file());

    let path = format!("/mix/p1/mix/job/{job_id}/status");
    for node in [&mixer, &other] {
        eventually_async("the job expired on every node", || async { node.app.get_json(&path).await.0 == 404 }).await;
    }
    let mut db = PgConnection::connect(&cluster.db.url).await.unwrap();
    assert_eq!(sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM jobs").fetch_one(&mut db).await.unwrap(), 0);
    eventually_async("the output was removed", || async { !output.exists() }).await;
    // The key names a new job now, on either node.
    let again = mixer.app.client.post(mixer.app.url("/mix/p1/mix/start")).header("Idempotency-Key", "k1").send().await.unwrap();
    assert_eq!(again.status(), 202);
    assert_ne!(again.json::<Value>().await.unwrap()["data"]["job_id"], job_id.as_str());
}
