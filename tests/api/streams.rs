use serde_json::Value;

use crate::helpers::{spawn_app, SseStream, TestApp};

async fn finished_job(app: &TestApp) -> (String, Vec<Value>) {
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=2", &[]);
    app.upload("p1", &[&stem]).await;
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let statuses = app.follow_job("p1", &job_id).await;
    (job_id, statuses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_frames_headers_and_resume_follow_the_contract() {
    let app = spawn_app().await;
    let (job_id, statuses) = finished_job(&app).await;
    let terminal_seq = statuses.last().unwrap()["seq"].as_u64().unwrap();
    let url = app.url(&format!("/mix/p1/mix/job/{job_id}/events"));

    // A finished job: retry first, then the terminal snapshot, then the stream closes.
    let mut stream = SseStream::connect(&app.client, &url, None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["cache-control"], "no-cache");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    assert!(stream.headers.get("content-encoding").is_none());
    assert_eq!(stream.next_event().await.unwrap().retry, Some(2000));
    let event = stream.next_event().await.unwrap();
    assert_eq!((event.id, event.event.as_deref()), (Some(terminal_seq.to_string()), Some("status")));
    assert!(stream.next_event().await.is_none(), "closes after the terminal event");

    // Already at the terminal seq: 204, header or query.
    assert_eq!(SseStream::connect(&app.client, &url, Some(terminal_seq)).await.status, 204);
    let response = app.client.get(format!("{url}?last_event_id={terminal_seq}")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    // An older id gets the current snapshot.
    let mut resumed = SseStream::connect(&app.client, &url, Some(terminal_seq - 3)).await;
    assert_eq!(resumed.status, 200);
    resumed.next_event().await.unwrap();
    let event = resumed.next_event().await.unwrap();
    assert_eq!(event.id, Some(terminal_seq.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_and_projects_get_the_404_envelope_before_any_upgrade() {
    let app = spawn_app().await;
    let (job_id, _) = finished_job(&app).await;
    let unknown = uuid::Uuid::new_v4();
    let cases = [
        (format!("/mix/p1/mix/job/{unknown}/events"), "JOB_NOT_FOUND"),
        ("/mix/p1/mix/job/not-a-uuid/events".to_string(), "JOB_NOT_FOUND"),
        (format!("/mix/other/mix/job/{job_id}/events"), "JOB_NOT_FOUND"),
        (format!("/mix/p1/mix/job/{unknown}/ws"), "JOB_NOT_FOUND"),
        ("/mix/nobody/mix/events".to_string(), "PROJECT_NOT_FOUND"),
        ("/mix/nobody/mix/ws".to_string(), "PROJECT_NOT_FOUND"),
        ("/api/mix/bad$id/mix/events".to_string(), "INVALID_PROJECT_ID"),
    ];
    for (path, code) in cases {
        let ws_url = app.url(&path).replace("http://", "ws://");
        if path.ends_with("/ws") {
            let err = crate::helpers::connect_ws(ws_url).await.expect_err("no upgrade");
            match err {
                tokio_tungstenite::tungstenite::Error::Http(response) => {
                    assert_eq!(response.status(), 404, "{path}");
                    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
                    assert_eq!(body["error"], code, "{path}");
                }
                other => panic!("{path}: {other}"),
            }
        } else {
            let (status, body) = app.get_json(&path).await;
            assert_eq!((status == 404 || status == 400, body["error"].as_str()), (true, Some(code)), "{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_stream_sends_live_snapshots_first_and_shutdown_ends_it() {
    let app = crate::helpers::spawn_app_with(|config| config.mix_slots = Some(1)).await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=40", &[]);
    app.upload("p1", &[&stem]).await;
    let (_, first) = app.start_mix("p1", None).await;
    let (_, second) = app.start_mix("p1", None).await;
    let mut global = SseStream::connect(&app.client, &app.url("/events"), None).await;
    let mut snapshot_ids = Vec::new();
    global.next_event().await.unwrap(); // retry
    for _ in 0..2 {
        let event = global.next_event().await.unwrap();
        let status: Value = serde_json::from_str(&event.data).unwrap();
        snapshot_ids.push(status["job_id"].clone());
    }
    assert!(snapshot_ids.contains(&first["data"]["job_id"]) && snapshot_ids.contains(&second["data"]["job_id"]));

    let url = app.address.replace("http://", "ws://") + "/ws";
    let (mut socket, _) = crate::helpers::connect_ws(url).await.unwrap();
    app.shutdown.cancel();
    // Both streams end promptly although jobs are still running.
    loop {
        if global.next_event().await.is_none() {
            break;
        }
    }
    use futures_util::StreamExt;
    let close_code = loop {
        match socket.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close_code, Some(1001));
    let stopped = tokio::time::timeout(crate::helpers::DEADLINE, app.server).await.expect("the server stops");
    stopped.unwrap().unwrap();
}
