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
    let mut resumed = SseStream::connect(&app.client, &app.url(&format!("/mix/long/mix/job/{running_id}/events")), Some(seq)).await;
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
