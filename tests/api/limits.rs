//! What one client may hold open, and the server overall: event streams per credential (per
//! address on an open server), and connections, with a reserve that still answers `/healthz` and
//! admins while the cap holds.

use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{eventually_async, spawn_app_with, TestApp, ADMIN_KEY};

/// A read token for `project`, minted by the admin for `subject`.
async fn read_token(app: &TestApp, project: &str, subject: &str) -> String {
    let body = serde_json::json!({"project_id": project, "scope": "read", "ttl_s": 600, "subject": subject});
    let response = app.client.post(app.url("/tokens")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["data"]["token"].as_str().unwrap().to_string()
}

/// A client of its own, whose every request is a new connection.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// The project's event stream opened with `token` (none: the request goes without a credential);
/// the response is held open by the caller.
async fn open_stream(app: &TestApp, project: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = fresh_client().get(app.url(&format!("/mix/{project}/mix/events"))).header("accept", "text/event-stream");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn refused(response: reqwest::Response) -> (u16, Option<String>, String) {
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_string());
    let body: Value = response.json().await.unwrap();
    (status, retry_after, body["error"].as_str().unwrap().to_string())
}

async fn project_with_a_stem(app: &TestApp, project: &str) {
    let stem = app.fixture(&format!("{project}.wav"), "sine=f=440:r=48000:d=1", &[]);
    assert_eq!(app.upload(project, &[&stem]).await.0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_its_cap_of_streams_and_each_token_and_the_admin_count_apart() {
    let app = spawn_app_with(|config| config.max_streams_per_client = 2).await;
    project_with_a_stem(&app, "p1").await;
    let (token, other) = (read_token(&app, "p1", "listener-1").await, read_token(&app, "p1", "listener-2").await);
    let first = open_stream(&app, "p1", Some(&token)).await;
    let second = open_stream(&app, "p1", Some(&token)).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));

    assert_eq!(refused(open_stream(&app, "p1", Some(&token)).await).await, (429, Some("5".into()), "TOO_MANY_STREAMS".into()));
    // A WebSocket counts as a stream too; the query string is the same credential.
    let mut request = app.url("/mix/p1/mix/ws").replace("http://", "ws://").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("the third stream was not refused: {other:?}"),
    }
    let by_query = fresh_client().get(app.url(&format!("/mix/p1/mix/events?access_token={token}"))).send().await.unwrap();
    assert_eq!(refused(by_query).await.2, "TOO_MANY_STREAMS");

    // Another token of the same project and scope has its own count; the admin is not counted.
    let theirs = open_stream(&app, "p1", Some(&other)).await;
    assert_eq!(theirs.status(), 200);
    let admin: Vec<reqwest::Response> = futures_util::future::join_all((0..3).map(|_| open_stream(&app, "p1", Some(ADMIN_KEY)))).await;
    assert!(admin.iter().all(|response| response.status() == 200));

    // A closed stream frees its place (once the server sees the connection go).
    drop(first);
    eventually_async("the token may open a stream again", || async { open_stream(&app, "p1", Some(&token)).await.status() == 200 }).await;
    drop((second, theirs, admin));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_counts_streams_per_client_address() {
    let app = spawn_app_with(|config| {
        config.api_keys.clear();
        config.token_keys.token_keys.clear();
        config.max_streams_per_client = 2;
    })
    .await;
    project_with_a_stem(&app, "p1").await;
    let held = [open_stream(&app, "p1", None).await, open_stream(&app, "p1", None).await];
    assert!(held.iter().all(|response| response.status() == 200));
    assert_eq!(refused(open_stream(&app, "p1", None).await).await, (429, Some("5".into()), "TOO_MANY_STREAMS".into()));
    // Everything but streams is not counted.
    assert_eq!(fresh_client().get(app.url("/projects/p1/stems")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_only_the_health_check_and_admins_are_answered_until_a_connection_closes() {
    let app = spawn_app_with(|config| config.max_connections = Some(2)).await;
    project_with_a_stem(&app, "p1").await;
    let token = read_token(&app, "p1", "listener").await;
    // The admin's pooled connection from the set-up may hold a place: streams take the others,
    // until one is refused, answered by the reserve.
    let mut held = Vec::new();
    let busy = loop {
        let response = open_stream(&app, "p1", Some(&token)).await;
        if response.status() != 200 {
            break refused(response).await;
        }
        held.push(response);
        assert!(held.len() <= 2, "more streams than connections");
    };
    assert_eq!(busy, (503, Some("5".into()), "SERVER_BUSY".into()));

    let status = |credential: Option<&'static str>, path: &'static str| {
        let mut request = fresh_client().get(app.url(path));
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        async move { request.send().await.unwrap() }
    };
    assert_eq!(refused(status(None, "/projects/p1/stems").await).await.2, "SERVER_BUSY");
    assert_eq!(refused(open_stream(&app, "p1", Some(&token)).await).await.2, "SERVER_BUSY");
    assert_eq!(status(None, "/healthz").await.status(), 200);
    assert_eq!(status(Some(ADMIN_KEY), "/projects/p1/stems").await.status(), 200);

    held.clear();
    eventually_async("a closed connection frees its place", || async { open_stream(&app, "p1", Some(&token)).await.status() == 200 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_keeps_its_connection_s_place_after_the_upgrade() {
    let app = spawn_app_with(|config| config.max_connections = Some(2)).await;
    project_with_a_stem(&app, "p1").await;
    let token = read_token(&app, "p1", "listener").await;
    let mut sockets = Vec::new();
    let refused = loop {
        let mut request = app.url("/mix/p1/mix/ws").replace("http://", "ws://").into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => sockets.push(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => break response.status().as_u16(),
            Err(other) => panic!("{other}"),
        }
        assert!(sockets.len() <= 2, "more WebSockets open than the server has places");
    };
    assert_eq!(refused, 503);
    assert_eq!(refused_status(&app, "/projects/p1/stems").await, 503, "the places are still the sockets'");
    drop(sockets);
}

async fn refused_status(app: &TestApp, path: &str) -> u16 {
    fresh_client().get(app.url(path)).send().await.unwrap().status().as_u16()
}
