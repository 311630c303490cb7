use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{spawn_app, ADMIN_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_served_with_ranges_etags_and_nothing_outside_the_root() {
    let app = spawn_app().await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=2", &[]);
    app.upload("p1", &[&stem]).await;
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let statuses = app.follow_job("p1", &job_id).await;
    let result_url = statuses.last().unwrap()["result_url"].as_str().unwrap().to_string();
    let on_disk = std::fs::read(app.data_dir.path().join(format!("p1/mix_outputs/{job_id}/final_mix.wav"))).unwrap();

    for url in [result_url.clone(), format!("/api{result_url}"), "/media/p1/mix_outputs/final_mix.wav".to_string()] {
        let response = app.client.get(app.url(&url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(response.headers()["content-type"], "audio/wav");
        assert_eq!(response.headers()["accept-ranges"], "bytes");
        let etag = response.headers()["etag"].to_str().unwrap().to_string();
        assert_eq!(response.bytes().await.unwrap(), on_disk);

        let ranged = app.client.get(app.url(&url)).header("range", "bytes=44-143").send().await.unwrap();
        assert_eq!(ranged.status(), 206);
        assert_eq!(ranged.headers()["content-range"], format!("bytes 44-143/{}", on_disk.len()));
        assert_eq!(ranged.bytes().await.unwrap(), on_disk[44..144]);
        let tail = app.client.get(app.url(&url)).header("range", "bytes=-10").send().await.unwrap();
        assert_eq!(tail.bytes().await.unwrap(), on_disk[on_disk.len() - 10..]);
        let beyond = app.client.get(app.url(&url)).header("range", format!("bytes={}-", on_disk.len())).send().await.unwrap();
        assert_eq!(beyond.status(), 416);
        let many = app.client.get(app.url(&url)).header("range", "bytes=0-1,4-5,8-9").send().await.unwrap();
        assert_eq!(many.status(), 200, "multi-range requests get the whole file");
        let cached = app.client.get(app.url(&url)).header("if-none-match", &etag).send().await.unwrap();
        assert_eq!(cached.status(), 304);
    }
    let immutable = app.client.get(app.url(&result_url)).send().await.unwrap();
    assert!(immutable.headers()["cache-control"].to_str().unwrap().contains("immutable"));

    // Raw requests, so no client normalises the path first.
    for path in [
        "/media/../../../../etc/passwd",
        "/media/p1/..%2f..%2f..%2fetc/passwd",
        "/media/%2e%2e/%2e%2e/etc/passwd",
        "/media/p1/",
        "/media/p1/mix_outputs",
        "/media/p1/stems/..%2F..%2F..%2Fetc%2Fpasswd",
    ] {
        let address = app.address.trim_start_matches("http://");
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        socket.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).await.unwrap();
        let status_line = response.lines().next().unwrap();
        assert!(status_line.contains(" 404 ") || status_line.contains(" 400 "), "{path}: {status_line}");
        assert!(!response.contains("root:"), "{path} leaked a file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_routes_describe_and_report_the_server() {
    let app = spawn_app().await;
    let (status, health) = app.get_json("/healthz").await;
    assert_eq!((status, health["data"]["status"].as_str()), (200, Some("ok")));

    let (status, spec) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    let paths = spec["paths"].as_object().unwrap();
    for path in [
        "/mix/{project_id}/mix/start",
        "/mix/{project_id}/mix/job/{job_id}/status",
        "/projects/{project_id}/mix/status",
        "/mix/{project_id}/mix/job/{job_id}/events",
        "/projects/{project_id}/stems",
    ] {
        assert!(paths.contains_key(path), "{path} missing from /openapi.json");
    }
    let schema = &spec["components"]["schemas"]["JobStatus"]["properties"];
    for field in
        ["job_id", "project_id", "state", "progress", "message", "error", "error_code", "result_url", "queue_position", "seq", "created_at", "updated_at", "report"]
    {
        assert!(schema.get(field).is_some(), "JobStatus.{field} missing from the schema");
    }

    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in ["mixd_jobs{state=\"queued\"} 0", "mixd_queue_depth 0", "mixd_subscribers{transport=\"sse\"} 0", "mixd_mix_duration_seconds_count 0"] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    let _stream = crate::helpers::SseStream::connect(&app.client, &app.url("/events"), None).await;
    let metrics = app.client.get(app.url("/api/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("mixd_subscribers{transport=\"sse\"} 1"), "{metrics}");

    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let body: Value = app.client.get(app.url("/nope.html")).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["error"], "NOT_FOUND");
}

/// "The newest mix" is one rule on every storage and node: the newest-created complete job. With
/// two slots, a job made first can complete last (here its stem is delayed two minutes into the
/// mix, so it is the longer one); the legacy path and the preview must both name the newer job.
/// The data dir's legacy path was a link to whichever job completed last.
pub async fn the_newest_mix_is_the_newest_complete_job(app: &crate::helpers::TestApp) {
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &["-ac", "2"]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let (_, older) = app.start_mix("p1", Some(serde_json::json!({"tracks": {"a.wav": {"offset_ms": 120000}}}))).await;
    let (_, newer) = app.start_mix("p1", None).await;
    let (older, newer) = (older["data"]["job_id"].as_str().unwrap().to_string(), newer["data"]["job_id"].as_str().unwrap().to_string());
    let (older_end, newer_end) = (app.follow_job("p1", &older).await.pop().unwrap(), app.follow_job("p1", &newer).await.pop().unwrap());
    assert_eq!((older_end["state"].as_str(), newer_end["state"].as_str()), (Some("complete"), Some("complete")));
    assert!(older_end["updated_at"].as_str() > newer_end["updated_at"].as_str(), "the older job completed last: {older_end} {newer_end}");

    let (_, preview) = app.get_json("/mix/p1/mix/preview").await;
    assert_eq!(preview["data"]["job_id"].as_str(), Some(newer.as_str()));
    let bytes = |path: String| async move { app.client.get(app.url(&path)).send().await.unwrap().bytes().await.unwrap() };
    let legacy = bytes("/media/p1/mix_outputs/final_mix.wav".into()).await;
    assert_eq!(legacy, bytes(newer_end["result_url"].as_str().unwrap().to_string()).await, "the legacy path serves the newer job's mix");
    assert_ne!(legacy, bytes(older_end["result_url"].as_str().unwrap().to_string()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_mix_is_the_newest_complete_job_on_the_data_dir() {
    let app = crate::helpers::spawn_app_with(|config| config.mix_slots = Some(2)).await;
    the_newest_mix_is_the_newest_complete_job(&app).await;
}
