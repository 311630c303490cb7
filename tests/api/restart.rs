//! Crashes: the real binary is killed with SIGKILL mid-mix and started again on the same data.

use serde_json::Value;

use crate::helpers::{assert_contract_step, make_audio, start_server, SseStream, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_kill_9_and_resume_under_the_same_id() {
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let short = make_audio(fixtures.path(), "short.wav", "sine=f=440:r=48000:d=1", &[]);
    let long: Vec<_> = ["a.wav", "b.wav", "c.wav"]
        .iter()
        .enumerate()
        .map(|(i, name)| make_audio(fixtures.path(), name, &format!("sine=f={}:r=48000:d=40", 110 * (i + 1)), &["-ac", "2"]))
        .collect();

    let mut first = start_server(data.path(), fixtures.path(), &["--mix-slots", "1"]).await;
    let app = &first.app;
    assert_eq!(app.upload("short", &[&short]).await.0, 201);
    assert_eq!(app.upload("long", &long.iter().map(|p| p.as_path()).collect::<Vec<_>>()).await.0, 201);
    let (_, done) = app.start_mix("short", None).await;
    let done_id = done["data"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(app.follow_job("short", &done_id).await.last().unwrap()["state"], "complete");
    let (_, done_before) = app.get_json(&format!("/mix/short/mix/job/{done_id}/status")).await;

    let (_, running) = app.start_mix("long", None).await;
    let queued: Value = app.client.post(app.url("/mix/long/mix/start")).header("Idempotency-Key", "k1").send().await.unwrap().json().await.unwrap();
    let running_id = running["data"]["job_id"].as_str().unwrap().to_string();
    let queued_id = queued["data"]["job_id"].as_str().unwrap().to_string();
    // Watch the running job until the engine is at work on its tracks, then kill the server outright.
    let mut events = SseStream::connect(&app.client, &app.url(&format!("/mix/long/mix/job/{running_id}/events")), None).await;
    let last_seen = loop {
        let event = events.next_event().await.expect("events until the kill");
        if event.event.as_deref() != Some("status") {
            continue;
        }
        let status: Value = serde_json::from_str(&event.data).unwrap();
        assert_ne!(status["state"], "complete", "the mix finished before the kill: make it longer");
        if status["state"] == "processing_tracks" {
            break status;
        }
    };
    first.kill();
    drop(events);
    let leftover = data.path().join("long/mix_outputs/.final_mix.crashed.partial");
    std::fs::create_dir_all(leftover.parent().unwrap()).unwrap();
    std::fs::write(&leftover, b"half a file").unwrap();

    let second = start_server(data.path(), fixtures.path(), &["--mix-slots", "1"]).await;
    let app = &second.app;
    assert!(!leftover.exists(), "partial files are cleaned at start");
    let (status, done_after) = app.get_json(&format!("/mix/short/mix/job/{done_id}/status")).await;
    assert_eq!(status, 200);
    assert_eq!(done_after["data"], done_before["data"], "a finished job answers exactly as before");

    // The reconnecting client resumes with its Last-Event-ID; seq and progress carry on.
    let seq = last_seen["seq"].as_u64().unwrap();
    let mut resumed = SseStream::connect(&app.client, &app.url(&format!("/mix/long/mix/job/{running_id}/events")), Some(&seq.to_string())).await;
    assert_eq!(resumed.status, 200);
    let mut previous = last_seen.clone();
    let mut states = Vec::new();
    while let Some(event) = resumed.next_event().await {
        if event.event.as_deref() != Some("status") {
            continue;
        }
        let status: Value = serde_json::from_str(&event.data).unwrap();
        assert!(status["seq"].as_u64().unwrap() > previous["seq"].as_u64().unwrap());
        assert!(status["progress"].as_u64() >= previous["progress"].as_u64(), "progress fell across the restart");
        states.push(status["state"].as_str().unwrap().to_string());
        previous = status;
    }
    assert_eq!(previous["state"], "complete", "{states:?}");
    assert_eq!(previous["job_id"], running_id.as_str());

    let queued_statuses = app.follow_job("long", &queued_id).await;
    for pair in queued_statuses.windows(2) {
        assert_contract_step(Some(&pair[0]), &pair[1]);
    }
    assert_eq!(queued_statuses.last().unwrap()["state"], "complete");
    // The Idempotency-Key still maps to its job after the restart.
    let repeat = app.client.post(app.url("/mix/long/mix/start")).header("Idempotency-Key", "k1").send().await.unwrap();
    assert_eq!(repeat.status(), 200);
    assert_eq!(repeat.json::<Value>().await.unwrap()["data"]["job_id"], queued_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_running_mix_which_resumes_at_the_next_start() {
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let stem = make_audio(fixtures.path(), "a.wav", "sine=f=220:r=48000:d=20", &["-ac", "2"]);
    let mut first = start_server(data.path(), fixtures.path(), &["--shutdown-grace", "1s"]).await;
    let app = &first.app;
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    // Ten minutes of mix (the stem starts at 9:40): long enough to be mid-run at the signal.
    let (_, started) = app.start_mix("p1", Some(serde_json::json!({"tracks": {"a.wav": {"offset_ms": 580000}}}))).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let mut events = SseStream::connect(&app.client, &app.url(&format!("/mix/p1/mix/job/{job_id}/events")), None).await;
    loop {
        let event = events.next_event().await.expect("events until the signal");
        if event.event.as_deref() == Some("status") && event.data.contains("\"state\":\"processing_tracks\"") {
            break;
        }
    }
    first.process.signal("TERM");
    let exited = first.process.wait_for_exit(DEADLINE).expect("mixd exits on SIGTERM");
    assert!(exited.success(), "{exited}");
    assert!(events.next_event().await.is_none(), "the stream ended with the server");
    // Had the process waited for the engine, the engine would have written its file first.
    let output = data.path().join(format!("p1/mix_outputs/{job_id}/final_mix.wav"));
    assert!(!output.exists(), "shutdown waited for the running mix");

    let second = start_server(data.path(), fixtures.path(), &[]).await;
    let (_, status) = second.app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await;
    assert_ne!(status["data"]["state"], "complete");
    let statuses = second.app.follow_job("p1", &job_id).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    assert!(output.is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_open_across_a_restart_comes_back_resumed_and_ends_on_the_terminal_status() {
    streams_come_back_across_a_restart(200).await;
}

/// A rolling restart under `subscribers` open EventSource-like clients, half on the project's
/// stream and half on the job's: the first server only queues the job, stops (SIGTERM, as a
/// deploy does) and a second on the same address runs it. Every client reconnects by itself with
/// its `Last-Event-ID`, and each ends on the one terminal status, having seen the queued one
/// before and nothing twice. Also run with 2,000 in the load test.
pub async fn streams_come_back_across_a_restart(subscribers: usize) {
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let stem = make_audio(fixtures.path(), "a.wav", "sine=f=220:r=48000:d=2", &["-ac", "2"]);
    let mut first = start_server(data.path(), fixtures.path(), &["--mix-slots", "0", "--listen-backlog", "3000"]).await;
    let address = first.process.address.clone();
    assert_eq!(listen_backlog(&address), 3000.min(somaxconn()), "the kernel holds the backlog asked for, up to its cap");
    let app = &first.app;
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let mut queued = started["data"].clone();
    assert_eq!(queued["state"], "queued");
    // Events carry the status alone; the answer to a start adds the job's links.
    queued.as_object_mut().unwrap().remove("links");

    let (ready, mut all_ready) = tokio::sync::mpsc::channel(subscribers);
    let clients: Vec<_> = (0..subscribers)
        .map(|i| {
            let path = if i % 2 == 0 { "/mix/p1/mix/events".to_string() } else { format!("/mix/p1/mix/job/{job_id}/events") };
            let (url, client, job_id, ready) = (app.url(&path), app.client.clone(), job_id.clone(), ready.clone());
            tokio::spawn(async move { follow_through_restarts(&client, &url, &job_id, ready).await })
        })
        .collect();
    drop(ready);
    for _ in 0..subscribers {
        all_ready.recv().await.expect("every client saw the queued job");
    }

    first.process.signal("TERM");
    first.process.wait_for_exit(DEADLINE).expect("mixd exits on SIGTERM");
    let second = start_server(data.path(), fixtures.path(), &["--addr", &address, "--mix-slots", "1"]).await;
    let mut finished = Vec::new();
    for client in clients {
        finished.push(tokio::time::timeout(DEADLINE, client).await.expect("every client is back and done").unwrap());
    }
    let (_, last) = second.app.get_json(&format!("/mix/p1/mix/job/{job_id}/status")).await;
    assert_eq!(last["data"]["state"], "complete");
    for (statuses, connections) in finished {
        assert_eq!(statuses.first(), Some(&queued), "each client saw the job queued first");
        assert_eq!(statuses.last(), Some(&last["data"]), "and ends on its terminal status, exactly");
        let seqs: Vec<u64> = statuses.iter().map(|status| status["seq"].as_u64().unwrap()).collect();
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "nothing twice, nothing back: {seqs:?}");
        assert!(connections >= 2, "the client reconnected");
    }
}

/// Follows one job's statuses on `url` as an EventSource does, reconnecting with the last id
/// whenever the stream ends or the server cannot be reached, until the terminal status (or a 204,
/// which says the client already has it). Returns the statuses and the connections it took.
async fn follow_through_restarts(client: &reqwest::Client, url: &str, job_id: &str, ready: tokio::sync::mpsc::Sender<()>) -> (Vec<Value>, usize) {
    let (mut statuses, mut last_id, mut connections) = (Vec::<Value>::new(), None::<String>, 0);
    loop {
        let mut stream = match SseStream::try_connect(client, url, last_id.as_deref()).await {
            Ok(stream) => stream,
            Err(_) => {
                // Not listening yet: EventSource waits its retry time; this client, less.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        connections += 1;
        if stream.status == 204 {
            return (statuses, connections);
        }
        assert_eq!(stream.status, 200);
        while let Some(event) = stream.next_event().await {
            if event.event.as_deref() != Some("status") {
                continue;
            }
            last_id = Some(event.id.expect("every status has an id"));
            let status: Value = serde_json::from_str(&event.data).unwrap();
            if status["job_id"] != job_id {
                continue;
            }
            let terminal = matches!(status["state"].as_str(), Some("complete" | "error"));
            statuses.push(status);
            if statuses.len() == 1 {
                ready.send(()).await.unwrap();
            }
            if terminal {
                return (statuses, connections);
            }
        }
    }
}

/// The backlog of the socket listening on `address`, as the kernel reports it (`ss`: a listening
/// socket's Send-Q).
fn listen_backlog(address: &str) -> u32 {
    let port = address.rsplit_once(':').unwrap().1;
    let output = std::process::Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().expect("ss runs");
    let listing = String::from_utf8(output.stdout).unwrap();
    let fields: Vec<&str> = listing.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"LISTEN"), "{listing}");
    fields[2].parse().unwrap()
}

fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap()
}
