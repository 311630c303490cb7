//! Webhooks end to end, with a real receiver on loopback: signed deliveries that survive a kill -9
//! of the server, and URLs refused at start. (Retry timing, 410, timeouts, redirects and names
//! that resolve to private addresses are tested beside the dispatcher, on a paused clock.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::helpers::{make_audio, spawn_app, start_server, DEADLINE};

#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    arrived: Arc<Notify>,
    /// While set, a completion is received and never answered (the server dies mid-delivery).
    hang_on_completion: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(&self) -> String {
        let receiver = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: String| {
                let receiver = receiver.clone();
                async move {
                    let completion = body.contains(r#""type":"mix.completed""#);
                    receiver.received.lock().unwrap().push((headers, body));
                    receiver.arrived.notify_one();
                    if completion && receiver.hang_on_completion.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    async fn wait_for(&self, count: usize) -> Vec<(HeaderMap, String)> {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let arrived = self.arrived.notified();
                if self.received.lock().unwrap().len() >= count {
                    return self.received.lock().unwrap().clone();
                }
                arrived.await;
            }
        })
        .await
        .expect("the webhook arrives")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_in_flight_when_the_server_is_killed_arrives_after_the_restart_signed_with_the_same_id() {
    let data = tempfile::tempdir().unwrap();
    let fixtures = tempfile::tempdir().unwrap();
    let stem = make_audio(fixtures.path(), "a.wav", "sine=f=440:r=48000:d=1", &[]);
    let receiver = Receiver::default();
    receiver.hang_on_completion.store(true, Ordering::SeqCst);
    let url = receiver.start().await;

    let mut first = start_server(data.path(), fixtures.path(), &["--webhook-allow-private"]).await;
    let app = &first.app;
    let (_, secret) = app.get_json("/webhooks/secret").await;
    let secret = secret["data"]["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let (status, started) = app.start_mix("p1", Some(json!({"webhook": {"url": url, "events": ["start", "completed"]}}))).await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    // The receiver hangs on the completion: the mix is not held up by it.
    let statuses = app.follow_job("p1", &job_id).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    let before = receiver.wait_for(2).await;
    first.kill();

    receiver.hang_on_completion.store(false, Ordering::SeqCst);
    let second = start_server(data.path(), fixtures.path(), &["--webhook-allow-private"]).await;
    let received = receiver.wait_for(3).await;
    let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
    for (headers, body) in &received {
        verifier.verify(body.as_bytes(), headers).expect("every delivery verifies with the secret, before and after the restart");
    }
    let of_type = |deliveries: &[(HeaderMap, String)], kind: &str| deliveries.iter().find(|(_, body)| body.contains(&format!(r#""type":"{kind}""#))).cloned().unwrap();
    let (start_headers, start_body) = &of_type(&before, "mix.started");
    let start: Value = serde_json::from_str(start_body).unwrap();
    assert_eq!(
        (start["type"].as_str(), start["data"]["state"].as_str(), start["data"]["job_id"].as_str()),
        (Some("mix.started"), Some("running"), Some(job_id.as_str()))
    );
    let (cut_headers, _) = &of_type(&before, "mix.completed");
    let (again_headers, again_body) = &received[2];
    assert_eq!(again_headers["webhook-id"], cut_headers["webhook-id"], "the retry carries the same webhook-id");
    assert_ne!(again_headers["webhook-id"], start_headers["webhook-id"]);
    let completed: Value = serde_json::from_str(again_body).unwrap();
    assert_eq!((completed["type"].as_str(), completed["data"]["state"].as_str()), (Some("mix.completed"), Some("complete")));
    assert_eq!(completed["data"]["result_url"], statuses.last().unwrap()["result_url"]);

    // The attempt is recorded once the receiver has answered: wait for it.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let attempts = loop {
        let (status, body) = second.app.get_json(&format!("/mix/p1/mix/job/{job_id}/webhooks")).await;
        assert_eq!(status, 200);
        let attempts = body["data"]["attempts"].as_array().unwrap().clone();
        if attempts.len() >= 2 || tokio::time::Instant::now() > deadline {
            break attempts;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let summary: Vec<(&str, u64, u64)> =
        attempts.iter().map(|a| (a["type"].as_str().unwrap(), a["attempt"].as_u64().unwrap(), a["http_status"].as_u64().unwrap())).collect();
    assert_eq!(summary, [("mix.started", 1, 204), ("mix.completed", 1, 204)], "the cut attempt left no record: it was sent again");
    assert!(attempts.iter().all(|a| a["next_attempt_at"].is_null()));
    let metrics = second.app.client.get(second.app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("mixd_webhook_attempts_total{outcome=\"delivered\"} 1"), "{metrics}");
    assert!(metrics.contains("mixd_webhook_queue_length 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_that_reach_this_machine_or_a_private_network_are_refused_at_start() {
    let app = spawn_app().await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
    app.upload("p1", &[&stem]).await;
    for (url, field) in [
        ("http://127.0.0.1/hook", "webhook.url"),
        ("http://[::1]/hook", "webhook.url"),
        ("http://169.254.169.254/latest/meta-data", "webhook.url"),
        ("http://10.0.0.1/", "webhook.url"),
        ("http://[::ffff:127.0.0.1]/", "webhook.url"),
        ("http://0x7f000001/", "webhook.url"),
        ("ftp://example.com/hook", "webhook.url"),
    ] {
        let (status, body) = app.start_mix("p1", Some(json!({"webhook": {"url": url}}))).await;
        assert_eq!((status, body["error"].as_str()), (422, Some("INVALID_SETTINGS")), "{url}");
        assert!(body["message"].as_str().unwrap().contains(field), "{url}: {body}");
    }
    let (status, body) = app.start_mix("p1", Some(json!({"webhook": {"url": "https://hooks.example.com/x", "events": ["finished"]}}))).await;
    assert_eq!((status, body["message"].as_str().unwrap().contains("webhook.events")), (422, true), "{body}");
    let (_, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!(jobs["data"]["jobs"].as_array().unwrap().len(), 0, "no refused start made a job");
}

/// A read token (the kind handed to browsers) may list a job's webhook attempts, but a receiver's
/// URL often carries its secret (`?token=...`, or userinfo): a read token sees the origin and path
/// only; a write token and an admin see the URL as given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_sees_a_webhook_url_without_its_query_or_userinfo() {
    let app = crate::helpers::spawn_app_with(|config| config.webhook_allow_private = true).await;
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let secret_url = format!("{}?token=s3cret", url.replace("http://", "http://user:pw@"));
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let (status, started) = app.start_mix("p1", Some(json!({"webhook": {"url": secret_url}}))).await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    receiver.wait_for(1).await;

    let attempts_path = format!("/mix/p1/mix/job/{job_id}/webhooks");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while app.get_json(&attempts_path).await.1["data"]["attempts"].as_array().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the attempt is recorded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let url_seen = |credential: String| {
        let (app, path) = (&app, attempts_path.clone());
        async move {
            let response = reqwest::Client::new().get(app.url(&path)).header("authorization", format!("Bearer {credential}")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()["data"]["attempts"][0]["url"].as_str().unwrap().to_string()
        }
    };
    let app_ref = &app;
    let mint = |scope: &'static str| async move {
        let (_, minted) = crate::helpers::post_json(app_ref, "/tokens", json!({"project_id": "p1", "scope": scope, "ttl_s": 600})).await;
        minted["data"]["token"].as_str().unwrap().to_string()
    };
    assert_eq!(url_seen(mint("read").await).await, url, "origin and path only");
    assert_eq!(url_seen(mint("write").await).await, secret_url);
    assert_eq!(url_seen(crate::helpers::ADMIN_KEY.to_string()).await, secret_url);
}
