//! Every error code of the contract, with its HTTP status and the envelope.

use serde_json::{json, Value};

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answers_with_its_code_status_and_envelope() {
    let app = spawn_app().await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let unknown = uuid::Uuid::new_v4();
    let long = "a".repeat(65);

    let gets = [
        ("/projects/-bad/stems".to_string(), 400, "INVALID_PROJECT_ID"),
        (format!("/projects/{long}/stems"), 400, "INVALID_PROJECT_ID"),
        ("/mix/p%20q/mix/status".to_string(), 400, "INVALID_PROJECT_ID"),
        // Not UTF-8 once percent-decoded: still a malformed id, answered as one.
        ("/mix/%FF/mix/status".to_string(), 400, "INVALID_PROJECT_ID"),
        ("/mix/p1/mix/job/%FF/status".to_string(), 404, "JOB_NOT_FOUND"),
        ("/media/p1/%FF.wav".to_string(), 404, "MEDIA_NOT_FOUND"),
        // A WebSocket route asked without a handshake.
        ("/ws".to_string(), 400, "BAD_REQUEST"),
        (format!("/mix/p1/mix/job/{unknown}/status"), 404, "JOB_NOT_FOUND"),
        ("/mix/p1/mix/job/12345/status".to_string(), 404, "JOB_NOT_FOUND"),
        (format!("/api/projects/p1/mix/status?job_id={unknown}"), 404, "JOB_NOT_FOUND"),
        ("/projects/p1/mix/status?job_id=nope".to_string(), 404, "JOB_NOT_FOUND"),
        ("/mix/p1/mix/status".to_string(), 404, "NO_MIX_JOBS"),
        ("/projects/p1/mix/status".to_string(), 404, "NO_MIX_JOBS"),
        ("/mix/p1/mix/preview".to_string(), 404, "NO_MIX_AVAILABLE"),
        ("/media/p1/nothing.wav".to_string(), 404, "MEDIA_NOT_FOUND"),
        ("/no/such/route".to_string(), 404, "NOT_FOUND"),
    ];
    for (path, status, code) in gets {
        let (got, body) = app.get_json(&path).await;
        assert_eq!((got, body["error"].as_str()), (status, Some(code)), "{path}: {body}");
        assert_eq!((body["ok"].as_bool(), body["data"].clone()), (Some(false), json!({})), "{path}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }

    let post = |path: &str, body: &str| app.client.post(app.url(path)).header("content-type", "application/json").body(body.to_string()).send();
    let posts = [
        ("/mix/empty-project/mix/start", "{}", 404, "PROJECT_NOT_FOUND"),
        ("/mix/p1/mix/start", r#"{"tracks": {"a.wav": {"pan": 2}}}"#, 422, "INVALID_SETTINGS"),
        ("/api/mix/p1/mix/start", r#"{"tracks": {"nobody.wav": {}}}"#, 422, "INVALID_SETTINGS"),
        ("/mix/p1/mix/start", r#"{"master": {"compressor": {"ratio": 0.5}}}"#, 422, "INVALID_SETTINGS"),
        ("/mix/p1/mix/start", r#"{"output": {"bit_depth": 12}}"#, 422, "INVALID_SETTINGS"),
        ("/mix/p1/mix/start", r#"{"master": {"eq": [{"type": "highshelf", "freq_hz": 30000, "gain_db": 2}]}}"#, 422, "INVALID_SETTINGS"),
        ("/mix/p1/mix/start", "{not json", 422, "INVALID_SETTINGS"),
        ("/projects/p1/stems", "", 400, "NO_FILES"),
    ];
    for (path, body, status, code) in posts {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        let envelope: Value = response.json().await.unwrap();
        assert_eq!(envelope["error"], code, "{path} {body}: {envelope}");
    }
    let (_, body) = app.start_mix("p1", Some(json!({"tracks": {"a.wav": {"pan": 2}}}))).await;
    assert!(body["message"].as_str().unwrap().contains("tracks.a.wav.pan"), "names the field: {body}");

    let oversized = post("/mix/p1/mix/start", &" ".repeat(1024 * 1024 + 1)).await.unwrap();
    assert_eq!(oversized.status(), 413);
    assert_eq!(oversized.json::<Value>().await.unwrap()["error"], "PAYLOAD_TOO_LARGE");
    let bad_key = app
        .client
        .get(app.url("/ws"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "not sixteen bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 400, "RFC 6455 4.2.1: the key is 16 bytes in base64");
    assert_eq!(bad_key.json::<Value>().await.unwrap()["error"], "BAD_REQUEST");

    let empty_form = app.client.post(app.url("/projects/p1/stems")).multipart(reqwest::multipart::Form::new().text("note", "no files")).send().await.unwrap();
    assert_eq!(empty_form.status(), 400);
    assert_eq!(empty_form.json::<Value>().await.unwrap()["error"], "NO_FILES");

    let delete = app.client.delete(app.url(&format!("/mix/p1/mix/job/{unknown}"))).send().await.unwrap();
    assert_eq!(delete.status(), 404);
    let delete = app.client.delete(app.url("/projects/p1/stems/not-a-stem")).send().await.unwrap();
    assert_eq!((delete.status().as_u16(), delete.json::<Value>().await.unwrap()["error"].clone()), (404, json!("STEM_NOT_FOUND")));

    // A job of one project is not found through another.
    let (_, started) = app.start_mix("p1", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap();
    let (status, body) = app.get_json(&format!("/mix/p2/mix/job/{job_id}/status")).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("JOB_NOT_FOUND")));
    // The server is still fine after all that.
    assert_eq!(app.get_json("/healthz").await.0, 200);
}
