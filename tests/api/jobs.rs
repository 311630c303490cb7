use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{assert_contract_step, eventually, eventually_async, ffmpeg_loudness, read_wav, spawn_app, spawn_app_with, SseStream, TestApp, DEADLINE};

async fn project_with_stems(app: &TestApp, project: &str, seconds: u32) {
    let d = seconds.to_string();
    let drums = app.fixture("drums.wav", &format!("aevalsrc=0.8*sin(2*PI*80*t)*exp(-15*mod(t\\,0.5)):s=44100:d={d}"), &["-c:a", "pcm_s24le"]);
    let bass = app.fixture("bass.flac", &format!("sine=f=55:r=48000:d={d}"), &["-ac", "2"]);
    let keys = app.fixture("keys.mp3", &format!("anoisesrc=c=pink:a=0.15:r=44100:d={d}"), &["-ac", "2"]);
    let (status, body) = app.upload(project, &[&drums, &bass, &keys]).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_is_watched_over_sse_websocket_and_polling_at_once() {
    let app = spawn_app().await;
    project_with_stems(&app, "p1", 6).await;
    let (status, started) = app
        .start_mix(
            "p1",
            Some(json!({"master": {"target_lufs": -16.0}, "tracks": {"bass.flac": {"gain_db": -3, "pan": -0.3, "eq": [{"type": "highpass", "freq_hz": 30}]}}})),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let job = started["data"].clone();
    let job_id = job["job_id"].as_str().unwrap().to_string();
    assert_eq!(job["links"]["events"], format!("/mix/p1/mix/job/{job_id}/events"));
    assert_contract_step(None, &job);

    let sse = app.follow_job("p1", &job_id);
    let ws = async {
        let url = format!("{}/mix/p1/mix/job/{job_id}/ws", app.address.replace("http://", "ws://"));
        let (mut socket, _) = crate::helpers::connect_ws(url).await.expect("WebSocket upgrade");
        let mut statuses = Vec::new();
        let close_code = loop {
            match tokio::time::timeout(DEADLINE, socket.next()).await.expect("WebSocket stalled") {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(frame["type"], "status");
                    statuses.push(frame["data"].clone());
                }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("WebSocket ended without a close frame: {other:?}"),
            }
        };
        let _ = socket.close(None).await;
        (statuses, close_code)
    };
    let polling = async {
        let mut seen = Vec::new();
        loop {
            let response = app.client.get(app.url(&format!("/api/projects/p1/mix/status?job_id={job_id}"))).send().await.unwrap();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap();
            assert_eq!((body["ok"].as_bool(), body["message"].as_str()), (Some(true), Some("Job status retrieved successfully")));
            let status = body["data"].clone();
            let terminal = matches!(status["state"].as_str(), Some("complete" | "error"));
            assert_eq!(retry_after.is_none(), terminal, "Retry-After: 1 exactly while running");
            if seen.last().is_none_or(|last: &Value| last["seq"] != status["seq"]) {
                seen.push(status);
            }
            if terminal {
                return seen;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let (sse, (ws, close_code), polled) = tokio::join!(sse, ws, polling);

    for (transport, statuses) in [("sse", &sse), ("ws", &ws), ("polling", &polled)] {
        assert!(!statuses.is_empty(), "{transport} saw nothing");
        for pair in statuses.windows(2) {
            assert_contract_step(Some(&pair[0]), &pair[1]);
        }
        assert_eq!(statuses.last().unwrap()["state"], "complete", "{transport}: {}", statuses.last().unwrap());
    }
    assert_eq!(close_code, Some(1000));
    // The live transports see every stage the job walked (after the snapshot each started from).
    let states: Vec<&str> = sse.iter().map(|s| s["state"].as_str().unwrap()).collect();
    for stage in ["processing_tracks", "mixing", "mastering", "exporting", "complete"] {
        assert!(states.contains(&stage), "SSE missed {stage}: {states:?}");
    }
    // Both push transports carry the same final snapshot.
    assert_eq!(sse.last(), ws.last());

    let done = sse.last().unwrap();
    let result_url = done["result_url"].as_str().unwrap();
    assert_eq!(result_url, format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"));
    let report = &done["report"];
    assert_eq!((report["sample_rate"].as_u64(), report["bit_depth"].as_u64(), report["channels"].as_u64()), (Some(48_000), Some(24), Some(2)));
    assert!((report["duration_s"].as_f64().unwrap() - 6.0).abs() < 0.1);
    assert_eq!(report["stems"].as_array().unwrap().len(), 3);

    let file = app.data_dir.path().join(format!("p1/mix_outputs/{job_id}/final_mix.wav"));
    let (integrated, peak) = ffmpeg_loudness(&file);
    assert!((integrated + 16.0).abs() <= 0.5 && peak <= -0.8, "{integrated} LUFS, {peak} dBTP");
    assert!((report["integrated_lufs"].as_f64().unwrap() - integrated).abs() < 0.2);
    let (spec, _) = read_wav(&file);
    assert_eq!((spec.sample_rate, spec.bits_per_sample), (48_000, 24));

    // Its analysis is beside it: peaks at three zooms, loudness once a second, against the ceiling.
    let analysis = app.client.get(app.url(&format!("/media/p1/mix_outputs/{job_id}/analysis.json"))).send().await.unwrap();
    assert_eq!((analysis.status(), analysis.headers()["content-type"].to_str().unwrap()), (reqwest::StatusCode::OK, "application/json"));
    let analysis: Value = analysis.json().await.unwrap();
    assert_eq!(analysis["waveform"].as_array().unwrap().iter().map(|level| level["columns"].as_u64().unwrap()).collect::<Vec<_>>(), [4096, 1024, 256]);
    assert!((analysis["duration_s"].as_f64().unwrap() - report["duration_s"].as_f64().unwrap()).abs() < 0.001);
    assert_eq!(analysis["short_term_lufs"].as_array().unwrap().len(), 6);
    assert_eq!(analysis["true_peak_ceiling_dbtp"], -1.0);
    let loudest = analysis["waveform"][0]["max"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).fold(0.0, f64::max);
    assert!(loudest > 0.5 && loudest <= 1.0, "{loudest}");

    // The legacy path now serves the newest mix, and preview points at this job.
    let (status, preview) = app.get_json("/mix/p1/mix/preview").await;
    assert_eq!((status, preview["data"]["job_id"].as_str()), (200, Some(job_id.as_str())));
    let legacy = app.client.get(app.url("/media/p1/mix_outputs/final_mix.wav")).send().await.unwrap();
    assert_eq!((legacy.status().as_u16(), legacy.headers()["cache-control"].to_str().unwrap()), (200, "no-cache"));
    assert_eq!(legacy.bytes().await.unwrap(), std::fs::read(&file).unwrap());
    let (status, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!((status, jobs["data"]["jobs"].as_array().unwrap().len()), (200, 1));
    let (_, newest) = app.get_json("/mix/p1/mix/status").await;
    assert_eq!(newest["data"], *done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_publish_their_positions_and_run_in_order() {
    let app = spawn_app_with(|config| config.mix_slots = Some(1)).await;
    project_with_stems(&app, "p1", 20).await;
    let mut events = SseStream::connect(&app.client, &app.url("/mix/p1/mix/events"), None).await;
    assert_eq!(events.status, 200);

    let mut ids = Vec::new();
    for submitted_before in 0..3 {
        // Queued behind whichever earlier jobs the slot has not taken yet.
        let (status, body) = app.start_mix("p1", None).await;
        assert_eq!((status, body["data"]["state"].as_str()), (202, Some("queued")));
        let position = body["data"]["queue_position"].as_u64().unwrap();
        assert!((1..=submitted_before + 1).contains(&position), "{body}");
        assert_eq!(body["data"]["message"], format!("Waiting for mixer slot (position {position})"));
        ids.push(body["data"]["job_id"].as_str().unwrap().to_string());
    }
    let mut cursor = 0;

    let mut by_job: HashMap<String, Vec<Value>> = HashMap::new();
    let mut finished_order = Vec::new();
    while finished_order.len() < 3 {
        let event = events.next_event().await.expect("the project stream stays open");
        let Some("status") = event.event.as_deref() else { continue };
        let status: Value = serde_json::from_str(&event.data).unwrap();
        let id = status["job_id"].as_str().unwrap().to_string();
        // A project stream's id is its cursor, which only grows.
        let id_cursor: u64 = event.id.as_deref().and_then(|id| id.split_once(':')).unwrap().1.parse().unwrap();
        assert!(id_cursor > cursor, "{id_cursor} after {cursor}");
        cursor = id_cursor;
        let history = by_job.entry(id.clone()).or_default();
        assert_contract_step(history.last(), &status);
        if matches!(status["state"].as_str(), Some("complete")) {
            finished_order.push(id);
        }
        history.push(status);
    }
    assert_eq!(finished_order, ids, "FIFO");
    let positions = |id: &str| -> Vec<u64> { by_job[id].iter().filter_map(|s| s["queue_position"].as_u64()).collect() };
    // Each job moves up one place at a time until it is first, then takes the slot.
    for id in &ids {
        let positions = positions(id);
        assert!(positions.windows(2).all(|pair| pair[1] == pair[0] - 1) && positions.last() == Some(&1), "{positions:?}");
    }
    assert!(positions(&ids[2]).first() >= Some(&2), "the third job waited behind the second");
    // A job starts only after the one before it finished: one slot.
    let started_at = |id: &str| by_job[id].iter().find(|s| s["state"] == "running").map(|s| s["updated_at"].as_str().unwrap().to_string()).unwrap();
    let completed_at = |id: &str| by_job[id].last().unwrap()["updated_at"].as_str().unwrap().to_string();
    assert!(started_at(&ids[1]) >= completed_at(&ids[0]));
    assert!(started_at(&ids[2]) >= completed_at(&ids[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_queued_and_running_jobs_and_frees_the_slot() {
    let app = spawn_app_with(|config| config.mix_slots = Some(1)).await;
    project_with_stems(&app, "p1", 60).await;
    let (_, running) = app.start_mix("p1", None).await;
    let running_id = running["data"]["job_id"].as_str().unwrap();
    // The one slot takes it before the others queue: until then it is first in the queue itself.
    let running_status = format!("/mix/p1/mix/job/{running_id}/status");
    eventually_async("the first job runs", || async { app.get_json(&running_status).await.1["data"]["state"] != "queued" }).await;
    let (_, queued) = app.start_mix("p1", None).await;
    let (_, last) = app.start_mix("p1", None).await;
    let queued_id = queued["data"]["job_id"].as_str().unwrap();
    let last_id = last["data"]["job_id"].as_str().unwrap();
    assert_eq!(last["data"]["queue_position"], 2);

    // The running job is writing into its output directory (its spill is there) when it is
    // canceled: the directory must go with the run, not merely never have been made.
    let outputs = app.data_dir.path().join(format!("p1/mix_outputs/{running_id}"));
    eventually("the running job writes into its output directory", || outputs.is_dir()).await;
    for id in [queued_id, running_id] {
        let response = app.client.delete(app.url(&format!("/mix/p1/mix/job/{id}"))).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!((body["data"]["state"].as_str(), body["data"]["error_code"].as_str()), (Some("error"), Some("CANCELED")));
        assert_contract_step(None, &body["data"]);
    }
    // The last job moves up and runs to the end in the freed slot.
    let statuses = app.follow_job("p1", last_id).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    let again = app.client.delete(app.url(&format!("/mix/p1/mix/job/{last_id}"))).send().await.unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(again.json::<Value>().await.unwrap()["error"], "JOB_FINISHED");
    // A canceled job leaves no output behind.
    eventually("the canceled job's output directory is gone", || !outputs.exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_starts_one_mix() {
    let app = spawn_app().await;
    project_with_stems(&app, "p1", 2).await;
    let start = |key: &'static str| app.client.post(app.url("/mix/p1/mix/start")).header("Idempotency-Key", key).send();
    let first = start("click-1").await.unwrap();
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].to_str().unwrap().to_string();
    let first: Value = first.json().await.unwrap();
    let second = start("click-1").await.unwrap();
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["data"]["job_id"], second["data"]["job_id"]);
    assert_eq!(location, format!("/mix/p1/mix/job/{}/status", first["data"]["job_id"].as_str().unwrap()));
    let third: Value = start("click-2").await.unwrap().json().await.unwrap();
    assert_ne!(third["data"]["job_id"], first["data"]["job_id"]);
    let (_, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!(jobs["data"]["jobs"].as_array().unwrap().len(), 2);
    let (status, by_location) = app.get_json(&location).await;
    assert_eq!((status, &by_location["data"]["job_id"]), (200, &first["data"]["job_id"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_expire_after_the_ttl() {
    let app = spawn_app_with(|config| config.job_ttl = std::time::Duration::ZERO).await;
    project_with_stems(&app, "p1", 2).await;
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap();
    let statuses = app.follow_job("p1", job_id).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    let path = format!("/mix/p1/mix/job/{job_id}/status");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = app.get_json(&path).await;
        if status == 404 {
            assert_eq!(body["error"], "JOB_NOT_FOUND");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never expired");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The output file outlives the job record.
    assert!(app.data_dir.path().join(format!("p1/mix_outputs/{job_id}/final_mix.wav")).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_stem_breaks_fails_with_its_code_and_others_complete() {
    let app = spawn_app().await;
    project_with_stems(&app, "p1", 2).await;
    let (_, stems) = app.get_json("/projects/p1/stems").await;
    let drums = stems["data"]["stems"].as_array().unwrap().iter().find(|s| s["name"] == "drums.wav").unwrap().clone();
    // The file is damaged on disk after it was accepted.
    let path = app.data_dir.path().join(format!("p1/stems/{}.wav", drums["stem_id"].as_str().unwrap()));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..64]).unwrap();
    let (_, started) = app.start_mix("p1", None).await;
    let statuses = app.follow_job("p1", started["data"]["job_id"].as_str().unwrap()).await;
    let last = statuses.last().unwrap();
    assert_eq!(last["state"], "error");
    // Cut inside its header, the file no longer opens as audio.
    assert_eq!(last["error_code"], "UNSUPPORTED_AUDIO", "{last}");
    assert!(last["error"].as_str().unwrap().contains("drums.wav"));

    std::fs::remove_file(&path).unwrap();
    let (_, started) = app.start_mix("p1", None).await;
    let statuses = app.follow_job("p1", started["data"]["job_id"].as_str().unwrap()).await;
    assert_eq!(statuses.last().unwrap()["error_code"], "STEM_MISSING");

    project_with_stems(&app, "p2", 2).await;
    let (_, started) = app.start_mix("p2", None).await;
    let statuses = app.follow_job("p2", started["data"]["job_id"].as_str().unwrap()).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_can_ping_and_close() {
    let app = spawn_app().await;
    project_with_stems(&app, "p1", 2).await;
    let url = format!("{}/ws", app.address.replace("http://", "ws://"));
    let (mut socket, _) = crate::helpers::connect_ws(url).await.unwrap();
    socket.send(Message::Ping(vec![1, 2, 3].into())).await.unwrap();
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].clone();
    let mut saw_pong = false;
    loop {
        match tokio::time::timeout(DEADLINE, socket.next()).await.unwrap().unwrap().unwrap() {
            Message::Pong(payload) => saw_pong = payload.as_ref() == [1, 2, 3],
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["data"]["job_id"] == job_id && frame["data"]["state"] == "complete" {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(saw_pong);
    socket.close(None).await.unwrap();
}
