//! Access control, rule by rule, each with the request that must be refused: no credential,
//! malformed or forged ones, the wrong project or scope, credentials where they may not travel,
//! foreign origins, and streams that outlive their token. Every refusal changes nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::start_mixd;
use crate::helpers::{spawn_app, spawn_app_with, start_server, SseStream, TestApp, ADMIN_KEY, TOKEN_KEY};

const SECRET: &str = "test-token-secret-0123456789abcdef-0123";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token as an app backend would mint it, with any header and claims a test needs.
fn sign(alg: Algorithm, kid: Option<&str>, secret: &str, claims: Value) -> String {
    let header = Header { kid: kid.map(String::from), ..Header::new(alg) };
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
}

fn claims(project: &str, scope: &str, ttl_s: i64) -> Value {
    json!({"aud": "mixd", "exp": now() as i64 + ttl_s, "prj": project, "scope": scope})
}

fn token(project: &str, scope: &str) -> String {
    sign(Algorithm::HS256, Some("t1"), SECRET, claims(project, scope, 600))
}

/// `header.payload.signature`, each part replaced as a test needs.
fn forge(header: &Value, payload: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(payload.to_string()))
}

/// A client without the admin key.
fn anonymous() -> reqwest::Client {
    reqwest::Client::new()
}

async fn send(app: &TestApp, method: &str, path: &str, credential: Option<&str>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = anonymous().request(method.parse().unwrap(), app.url(path));
    if let Some(credential) = credential {
        request = request.header("authorization", credential);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// A project with a stem and a finished mix, made with the admin key: (job id, result URL).
async fn mixed_project(app: &TestApp, project: &str) -> (String, String) {
    let stem = app.fixture(&format!("{project}.wav"), "sine=f=440:r=48000:d=1", &[]);
    assert_eq!(app.upload(project, &[&stem]).await.0, 201);
    let (_, started) = app.start_mix(project, None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let last = app.follow_job(project, &job_id).await.pop().unwrap();
    (job_id, last["result_url"].as_str().unwrap().to_string())
}

async fn stem_id(app: &TestApp, project: &str) -> String {
    app.get_json(&format!("/projects/{project}/stems")).await.1["data"]["stems"][0]["stem_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_route_refuses_a_missing_or_broken_credential_and_changes_nothing() {
    let app = spawn_app().await;
    let (job_id, result_url) = mixed_project(&app, "p1").await;
    let stem = stem_id(&app, "p1").await;
    let routes = [
        ("POST", "/projects/p1/stems".to_string()),
        ("GET", "/projects/p1/stems".to_string()),
        ("DELETE", format!("/projects/p1/stems/{stem}")),
        ("GET", format!("/projects/p1/mix/status?job_id={job_id}")),
        ("POST", "/mix/p1/mix/start".to_string()),
        ("GET", "/mix/p1/mix/status".to_string()),
        ("GET", "/mix/p1/mix/jobs".to_string()),
        ("GET", "/mix/p1/mix/preview".to_string()),
        ("DELETE", format!("/mix/p1/mix/job/{job_id}")),
        ("GET", format!("/mix/p1/mix/job/{job_id}/status")),
        ("GET", format!("/api/mix/p1/mix/job/{job_id}/status")),
        ("GET", format!("/mix/p1/mix/job/{job_id}/events")),
        ("GET", format!("/mix/p1/mix/job/{job_id}/ws")),
        ("GET", "/mix/p1/mix/events".to_string()),
        ("GET", "/mix/p1/mix/ws".to_string()),
        ("GET", "/events".to_string()),
        ("GET", "/ws".to_string()),
        ("GET", result_url.clone()),
        ("GET", "/metrics".to_string()),
        ("GET", "/openapi.json".to_string()),
        ("POST", "/tokens".to_string()),
        ("GET", "/session".to_string()),
    ];
    let expired = sign(Algorithm::HS256, Some("t1"), SECRET, claims("p1", "write", -5));
    let valid_claims = claims("p1", "write", 600);
    let valid = token("p1", "write");
    let (valid_header, valid_payload, valid_signature) = {
        let mut parts = valid.split('.');
        (parts.next().unwrap().to_string(), parts.next().unwrap().to_string(), parts.next().unwrap().to_string())
    };
    let mut tampered_claims = valid_claims.clone();
    tampered_claims["prj"] = json!("p2");
    let broken = [
        "Basic dXNlcjpwYXNz".to_string(),
        "Bearer".to_string(),
        "Token abc".to_string(),
        format!("Bearer {}", &ADMIN_KEY[1..]),
        format!("Bearer {expired}"),
        format!("Bearer {}", sign(Algorithm::HS256, Some("t1"), SECRET, json!({"aud": "mixd", "exp": now() + 600, "nbf": now() + 300, "prj": "p1", "scope": "write"}))),
        format!("Bearer {}", sign(Algorithm::HS256, Some("t1"), SECRET, json!({"aud": "someone-else", "exp": now() + 600, "prj": "p1", "scope": "write"}))),
        format!("Bearer {}", sign(Algorithm::HS256, Some("t1"), SECRET, json!({"aud": "mixd", "prj": "p1", "scope": "write"}))),
        format!("Bearer {}", forge(&json!({"alg": "none", "typ": "JWT", "kid": "t1"}), &valid_claims, "")),
        format!("Bearer {}", sign(Algorithm::HS512, Some("t1"), SECRET, valid_claims.clone())),
        format!("Bearer {}", forge(&json!({"alg": "RS256", "typ": "JWT", "kid": "t1"}), &valid_claims, &valid_signature)),
        format!("Bearer {}", sign(Algorithm::HS256, Some("t9"), SECRET, valid_claims.clone())),
        format!("Bearer {}", sign(Algorithm::HS256, Some("t1"), "a-key-that-was-removed-0123456789abcdef", valid_claims.clone())),
        format!("Bearer {}", forge(&json!({"alg": "HS256", "typ": "JWT", "kid": "t1"}), &tampered_claims, &valid_signature)),
        format!("Bearer {valid_header}.{valid_payload}.{}", &valid_signature[..valid_signature.len() / 2]),
        format!("Bearer {valid_header}.{valid_payload}."),
        format!("Bearer {}", "x".repeat(4096)),
    ];
    let credentials: Vec<Option<&str>> = std::iter::once(None).chain(broken.iter().map(|c| Some(c.as_str()))).collect();
    for (method, path) in &routes {
        for credential in &credentials {
            let (status, headers, body) = send(&app, method, path, *credential).await;
            assert_eq!(status, 401, "{method} {path} with {credential:?}: {body}");
            assert_eq!(headers["www-authenticate"], "Bearer");
            assert_eq!(
                (body["error"].as_str(), body["message"].as_str()),
                (Some("UNAUTHORIZED"), Some("A valid credential is required")),
                "never says which check failed"
            );
        }
    }
    // A header past hyper's limit is refused before any route runs.
    let (status, _, _) = send(&app, "GET", "/mix/p1/mix/jobs", Some(&format!("Bearer {}", "x".repeat(1 << 20)))).await;
    assert_eq!(status, 431);
    // Nothing changed: the stem, the job and its result are all still there.
    let (_, stems) = app.get_json("/projects/p1/stems").await;
    assert_eq!(stems["data"]["stems"].as_array().unwrap().len(), 1);
    let (_, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!(jobs["data"]["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(app.client.get(app.url(&result_url)).send().await.unwrap().status(), 200);
    // Health and the dashboard stay open.
    assert_eq!(send(&app, "GET", "/healthz", None).await.0, 200);
    let page = anonymous().get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(anonymous().get(app.url("/app.js")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_has_its_project_and_scope_and_nothing_more() {
    let app = spawn_app().await;
    let (job_a, _) = mixed_project(&app, "pa").await;
    let (job_b, result_b) = mixed_project(&app, "pb").await;
    let stem_b = stem_id(&app, "pb").await;
    let (reader, writer) = (format!("Bearer {}", token("pa", "read")), format!("Bearer {}", token("pa", "write")));
    // The project list shows a token its own project only; an admin sees both, newest first.
    let listed = |body: Value| body["data"]["projects"].as_array().unwrap().iter().map(|p| p["project_id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (status, _, body) = send(&app, "GET", "/projects", Some(&reader)).await;
    assert_eq!((status, listed(body)), (200, vec!["pa".to_string()]));
    assert_eq!(listed(app.get_json("/projects").await.1), ["pb", "pa"]);
    assert_eq!(send(&app, "GET", "/projects", None).await.0, 401);

    // Project A's token on project B: 403 on every route, whatever the path.
    let on_b = [
        ("POST", "/projects/pb/stems".to_string()),
        ("DELETE", format!("/projects/pb/stems/{stem_b}")),
        ("GET", format!("/projects/pb/mix/status?job_id={job_b}")),
        ("GET", format!("/api/projects/pb/mix/status?job_id={job_b}")),
        ("GET", format!("/mix/pb/mix/job/{job_b}/status")),
        ("GET", format!("/api/mix/pb/mix/job/{job_b}/status")),
        ("GET", "/mix/pb/mix/status".to_string()),
        ("GET", format!("/mix/pb/mix/job/{job_b}/events")),
        ("GET", "/mix/pb/mix/events".to_string()),
        ("GET", format!("/mix/pb/mix/job/{job_b}/ws")),
        ("GET", result_b.clone()),
        ("DELETE", format!("/mix/pb/mix/job/{job_b}")),
        ("POST", "/mix/pb/mix/start".to_string()),
    ];
    for (method, path) in &on_b {
        let (status, _, body) = send(&app, method, path, Some(&writer)).await;
        assert_eq!((status, body["error"].as_str()), (403, Some("FORBIDDEN")), "{method} {path}");
    }
    // A job of another project, asked for under this one, stays unknown.
    let (status, _, body) = send(&app, "GET", &format!("/mix/pa/mix/job/{job_b}/status"), Some(&reader)).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("JOB_NOT_FOUND")));
    // A read token reads...
    assert_eq!(send(&app, "GET", &format!("/mix/pa/mix/job/{job_a}/status"), Some(&reader)).await.0, 200);
    assert_eq!(send(&app, "GET", "/projects/pa/stems", Some(&reader)).await.0, 200);
    // ...and changes nothing.
    let stem_a = stem_id(&app, "pa").await;
    for (method, path) in [
        ("POST", "/projects/pa/stems".to_string()),
        ("POST", "/mix/pa/mix/start".to_string()),
        ("DELETE", format!("/mix/pa/mix/job/{job_a}")),
        ("DELETE", format!("/projects/pa/stems/{stem_a}")),
    ] {
        let (status, _, body) = send(&app, method, &path, Some(&reader)).await;
        assert_eq!((status, body["error"].as_str()), (403, Some("FORBIDDEN")), "read token: {method} {path}");
    }
    // Admin-only routes refuse any token.
    for path in ["/events", "/metrics"] {
        assert_eq!(send(&app, "GET", path, Some(&writer)).await.0, 403, "{path}");
    }
    let response =
        anonymous().post(app.url("/tokens")).header("authorization", &writer).json(&json!({"project_id": "pa", "scope": "write", "ttl_s": 60})).send().await.unwrap();
    assert_eq!(response.status(), 403);
    // A write token starts a mix on its own project.
    let response = anonymous().post(app.url("/mix/pa/mix/start")).header("authorization", &writer).send().await.unwrap();
    assert_eq!(response.status(), 202);
    // B is untouched by all of the above.
    let (_, jobs) = app.get_json("/mix/pb/mix/jobs").await;
    assert_eq!(jobs["data"]["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(app.get_json("/projects/pb/stems").await.1["data"]["stems"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_read_token_may_travel_in_the_query_and_only_to_streams_and_media() {
    let app = spawn_app().await;
    let (job_id, result_url) = mixed_project(&app, "p1").await;
    let read = token("p1", "read");
    let events = format!("/mix/p1/mix/job/{job_id}/events");
    let status = format!("/mix/p1/mix/job/{job_id}/status");
    let app = &app;
    let get = |path: String| async move { anonymous().get(app.url(&path)).send().await.unwrap().status().as_u16() };
    assert_eq!(get(format!("{result_url}?access_token={read}")).await, 200);
    assert_eq!(get(format!("{events}?access_token={read}")).await, 200);
    assert_eq!(get(format!("{status}?access_token={read}")).await, 401, "not a stream or media route");
    assert_eq!(get(format!("{events}?access_token={}", token("p1", "write"))).await, 401, "a write token");
    assert_eq!(get(format!("{events}?access_token={ADMIN_KEY}")).await, 401, "an admin key");
    let ranged = anonymous().get(app.url(&format!("{result_url}?access_token={read}"))).header("range", "bytes=0-3").send().await.unwrap();
    assert_eq!((ranged.status().as_u16(), ranged.bytes().await.unwrap().as_ref()), (206, b"RIFF".as_slice()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_signs_a_browser_in_and_a_foreign_origin_cannot_use_it_for_a_websocket() {
    let app = spawn_app().await;
    mixed_project(&app, "p1").await;
    let read = token("p1", "read");
    let response = anonymous().post(app.url("/session")).json(&json!({"token": read})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with(&format!("mixd_token={read}; HttpOnly; SameSite=Strict; Path=/")), "{cookie}");
    assert!(!cookie.contains("Secure"), "on loopback the cookie cannot be Secure (no TLS): {cookie}");
    let identity: Value = response.json().await.unwrap();
    assert_eq!(
        (identity["data"]["kind"].as_str(), identity["data"]["project_id"].as_str(), identity["data"]["scope"].as_str()),
        (Some("token"), Some("p1"), Some("read"))
    );
    let with_cookie = |path: &str| anonymous().get(app.url(path)).header("cookie", format!("mixd_token={read}"));
    assert_eq!(with_cookie("/mix/p1/mix/jobs").send().await.unwrap().status(), 200);
    assert_eq!(with_cookie("/mix/p2/mix/jobs").send().await.unwrap().status(), 403);
    assert_eq!(with_cookie("/session").send().await.unwrap().json::<Value>().await.unwrap()["data"]["kind"], "token");
    let bad = anonymous().post(app.url("/session")).json(&json!({"token": "not-a-token"})).send().await.unwrap();
    assert_eq!(bad.status(), 401);
    // A browser still holding a stale cookie (an expired token, a removed key) can sign in and out.
    let stale = format!("mixd_token={}", sign(Algorithm::HS256, Some("t1"), SECRET, claims("p1", "read", -5)));
    let again = anonymous().post(app.url("/session")).header("cookie", &stale).json(&json!({"token": read})).send().await.unwrap();
    assert_eq!(again.status(), 200);
    let signed_out = anonymous().delete(app.url("/session")).header("cookie", &stale).send().await.unwrap();
    assert_eq!(signed_out.status(), 200);
    assert!(signed_out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));

    // A WebSocket from a page elsewhere, carrying the cookie the browser attaches: 403 before the upgrade.
    let url = app.url("/mix/p1/mix/ws").replace("http://", "ws://");
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("cookie", format!("mixd_token={read}").parse().unwrap());
    request.headers_mut().insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("a foreign origin upgraded: {other:?}"),
    }
    // The same host and port under another scheme is another origin.
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("cookie", format!("mixd_token={read}").parse().unwrap());
    request.headers_mut().insert("origin", app.address.replace("http://", "https://").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("an https origin upgraded on an http server: {other:?}"),
    }
    // From the server's own page it opens.
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("cookie", format!("mixd_token={read}").parse().unwrap());
    request.headers_mut().insert("origin", app.address.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.expect("its own origin upgrades");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_listed_origins_with_credentials_and_no_other() {
    let app = spawn_app_with(|config| config.allowed_origins = vec!["https://app.example".into()]).await;
    let preflight = |origin: &'static str| {
        anonymous()
            .request(reqwest::Method::OPTIONS, app.url("/mix/p1/mix/start"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let listed = preflight("https://app.example").await.unwrap();
    assert_eq!(listed.headers()["access-control-allow-origin"], "https://app.example");
    assert_eq!(listed.headers()["access-control-allow-credentials"], "true");
    let unlisted = preflight("https://evil.example").await.unwrap();
    assert!(unlisted.headers().get("access-control-allow-origin").is_none());
    // The listed origin may open a WebSocket; an unlisted one may not, even with the admin key.
    let url = app.url("/ws").replace("http://", "ws://");
    for (origin, allowed) in [("https://app.example", true), ("https://evil.example", false)] {
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
        request.headers_mut().insert("origin", origin.parse().unwrap());
        assert_eq!(tokio_tungstenite::connect_async(request).await.is_ok(), allowed, "{origin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_when_their_token_expires() {
    let app = spawn_app().await;
    let stem = app.fixture("long.wav", "sine=f=440:r=48000:d=30", &[]);
    app.upload("p1", &[&stem]).await;
    // exp is in whole seconds: two from now is at least one second away.
    let short = sign(Algorithm::HS256, Some("t1"), SECRET, claims("p1", "read", 2));
    let opened = std::time::Instant::now();
    let mut sse = SseStream::connect(&anonymous(), &app.url(&format!("/mix/p1/mix/events?access_token={short}")), None).await;
    assert_eq!(sse.status, 200);
    let mut request = app.url("/mix/p1/mix/ws").replace("http://", "ws://").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {short}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    // Neither stream has anything to say (no job runs); both end at the token's exp.
    while sse.next_event().await.is_some() {}
    let close = loop {
        match socket.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close, Some(4001));
    assert!(opened.elapsed() >= Duration::from_millis(900), "they ended at the expiry, not at once: {:?}", opened.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_minted_by_admins_within_their_limits() {
    let app = spawn_app().await;
    let mint = |body: Value| app.client.post(app.url("/tokens")).json(&body).send();
    let minted: Value = mint(json!({"project_id": "p1", "scope": "write", "ttl_s": 60})).await.unwrap().json().await.unwrap();
    let token = minted["data"]["token"].as_str().unwrap();
    let (status, _, _) = send(&app, "GET", "/mix/p1/mix/jobs", Some(&format!("Bearer {token}"))).await;
    assert_eq!(status, 200);
    for (body, code) in [
        (json!({"project_id": "p1", "scope": "write", "ttl_s": 0}), 422),
        (json!({"project_id": "p1", "scope": "write", "ttl_s": 86_401}), 422),
        (json!({"project_id": "p1", "scope": "admin", "ttl_s": 60}), 400),
        (json!({"project_id": "bad id", "scope": "read", "ttl_s": 60}), 400),
    ] {
        assert_eq!(mint(body.clone()).await.unwrap().status(), code, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_on_loopback_means_open_to_this_machine_only() {
    let app = spawn_app_with(|config| {
        config.api_keys.clear();
        config.token_keys.token_keys.clear();
    })
    .await;
    let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201, "open: no credential needed");
    // A DNS-rebinding page reaches 127.0.0.1 under its own name.
    let rebound = anonymous().get(app.url("/mix/p1/mix/jobs")).header("host", "attacker.example").send().await.unwrap();
    assert_eq!(rebound.status(), 403);
    for host in ["localhost", "127.0.0.1", "[::1]:8080", "mixd.localhost:1"] {
        assert_eq!(anonymous().get(app.url("/mix/p1/mix/jobs")).header("host", host).send().await.unwrap().status(), 200, "{host}");
    }
    // Authorities no client sends, which a loose reading took for loopback: 400, not served.
    for host in ["[::1].evil.com", "[::1]evil.com:80", "localhost:80, evil.com", "localhost:8o", "127.0.0.1:99999"] {
        let response = anonymous().get(app.url("/mix/p1/mix/jobs")).header("host", host).send().await.unwrap();
        assert_eq!(response.status(), 400, "{host}");
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "BAD_REQUEST", "{host}");
    }
    // The whole origin is compared, scheme included: a page at https:// or x:// on the same host
    // and port is not the server at http://.
    let (host, port) = app.address.trim_start_matches("http://").split_once(':').unwrap();
    for origin in [format!("https://{host}:{port}"), format!("x://{host}:{port}"), format!("http://{host}:{}", port.parse::<u16>().unwrap() - 1)] {
        let response = anonymous().post(app.url("/mix/p1/mix/start")).header("origin", &origin).send().await.unwrap();
        assert_eq!(response.status(), 403, "{origin}");
    }
    // A page elsewhere posting to the server: refused; the server's own page: accepted.
    let foreign = anonymous().post(app.url("/mix/p1/mix/start")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(foreign.status(), 403);
    let own = anonymous().post(app.url("/mix/p1/mix/start")).header("origin", app.address.clone()).send().await.unwrap();
    assert_eq!(own.status(), 202);
    let (_, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!(jobs["data"]["jobs"].as_array().unwrap().len(), 1, "only the own-origin start made a job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_the_log() {
    let data = tempfile::tempdir().unwrap();
    let server = start_mixd(env!("CARGO_BIN_EXE_mixd"), data.path(), &["--api-key", ADMIN_KEY, "--token-key", TOKEN_KEY], "debug");
    let base = format!("http://{}", server.address);
    let read = token("p1", "read");
    let client = anonymous();
    for path in [format!("/mix/p1/mix/events?access_token={read}"), format!("/media/p1/mix_outputs/final_mix.wav?access_token={read}")] {
        let _ = client.get(format!("{base}{path}")).timeout(Duration::from_millis(300)).send().await;
    }
    let _ = client.get(format!("{base}/mix/p1/mix/jobs")).header("authorization", format!("Bearer {ADMIN_KEY}")).send().await;
    let _ = client.post(format!("{base}/session")).json(&json!({"token": read})).send().await;
    // The requests above are logged (at debug, by the request span) before this one answers.
    let _ = client.get(format!("{base}/healthz")).send().await;
    let lines: Vec<String> = std::iter::from_fn(|| server.log.recv_timeout(Duration::from_millis(500)).ok()).collect();
    assert!(lines.iter().any(|line| line.contains("/mix/p1/mix/events")), "requests are logged");
    let signature = read.rsplit('.').next().unwrap();
    for line in &lines {
        assert!(!line.contains(signature) && !line.contains(ADMIN_KEY) && !line.contains("access_token"), "{line}");
    }
}

/// `POST /session` with an admin key used to keep the key itself in the cookie, with no expiry:
/// a stolen cookie was the key, for ever. The cookie now holds a session the server signs, which
/// expires (12 h by default), is not the key, and ends when the session key changes; a cookie
/// holding a raw key is not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_signs_in_with_a_session_that_is_not_the_key_and_ends_with_its_key() {
    const SESSION_KEY: &str = "session-key-a-0123456789abcdef-0123456789";
    let with_key = |key: &'static str| move |config: &mut mixd::config::Config| config.session_key = Some(mixd::access::parse_api_key(key).unwrap());
    let app = spawn_app_with(with_key(SESSION_KEY)).await;
    let response = anonymous().post(app.url("/session")).json(&json!({"token": ADMIN_KEY})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(!cookie.contains(ADMIN_KEY), "the key itself is not in the cookie: {cookie}");
    let max_age: u64 = cookie.split("Max-Age=").nth(1).expect("the cookie expires").parse().unwrap();
    assert!((12 * 3600 - 5..=12 * 3600).contains(&max_age), "{cookie}");
    let session = cookie.strip_prefix("mixd_token=").unwrap().split(';').next().unwrap().to_string();
    let identity: Value = response.json().await.unwrap();
    assert_eq!(identity["data"]["kind"], "admin");
    assert!(identity["data"]["expires_at"].is_string(), "{identity}");

    let metrics = |app: &TestApp, cookie: String| anonymous().get(app.url("/metrics")).header("cookie", cookie).send();
    assert_eq!(metrics(&app, format!("mixd_token={session}")).await.unwrap().status(), 200, "the session has the key's rights");
    assert_eq!(metrics(&app, format!("mixd_token={ADMIN_KEY}")).await.unwrap().status(), 401, "a raw key in the cookie is not taken");
    // Revoked by rotating the session key: a server signing with another key refuses the session,
    // one with the same key takes it.
    let rotated = spawn_app_with(with_key("session-key-b-0123456789abcdef-0123456789")).await;
    assert_eq!(metrics(&rotated, format!("mixd_token={session}")).await.unwrap().status(), 401);
    let same = spawn_app_with(with_key(SESSION_KEY)).await;
    assert_eq!(metrics(&same, format!("mixd_token={session}")).await.unwrap().status(), 200);
}

/// A token whose time claims no clock can hold (`exp` of 2^63 or 10^15), signed with a real token
/// key as a careless backend might: it used to panic the request (an overflowing instant, chrono's
/// "no such local time" on `GET /session`) and drop the connection. It is refused with 401, and
/// the server answers on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_time_claims_are_refused_with_401_not_a_panic() {
    let app = spawn_app().await;
    mixed_project(&app, "p1").await;
    for exp in [json!(1u64 << 63), json!(1_000_000_000_000_000u64), json!(u64::MAX)] {
        let absurd = sign(Algorithm::HS256, Some("t1"), SECRET, json!({"aud": "mixd", "exp": exp, "prj": "p1", "scope": "read"}));
        for path in ["/session", "/mix/p1/mix/jobs", "/mix/p1/mix/events"] {
            let (status, headers, body) = send(&app, "GET", path, Some(&format!("Bearer {absurd}"))).await;
            assert_eq!((status, body["error"].as_str()), (401, Some("UNAUTHORIZED")), "{path} with exp {exp}");
            assert_eq!(headers["www-authenticate"], "Bearer");
        }
    }
    assert_eq!(app.get_json("/healthz").await.0, 200);
}

/// `--allowed-origin '*'` used to panic in the CORS layer after the server had logged that it was
/// listening. Every flag is now checked before anything is bound: a clear message, exit 1.
#[test]
fn a_wildcard_allowed_origin_stops_the_server_before_it_listens() {
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mixd"))
        .args(["serve", "--addr", "127.0.0.1:0", "--allowed-origin", "*", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: --allowed-origin \"*\""), "{stderr}");
    assert!(!stderr.contains("listening") && !stderr.contains("panicked"), "{stderr}");
}

/// The dashboard is served with a policy that lets it load only its own scripts, styles and media
/// and talk only to its own server, is never framed, and is never sniffed into another type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_with_a_content_security_policy_nosniff_and_no_framing() {
    let app = spawn_app().await;
    for path in ["/", "/app.js", "/style.css"] {
        let response = anonymous().get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        assert_eq!(
            headers["content-security-policy"],
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
            "{path}"
        );
        assert_eq!((headers["x-content-type-options"].to_str().unwrap(), headers["x-frame-options"].to_str().unwrap()), ("nosniff", "DENY"), "{path}");
    }
}

/// `--no-auth` on an address that is loopback but not spelled 127.x or ::1 used to skip the Host
/// check (a rebinding page got 202); and on a network address it skipped it altogether. Without
/// keys the Host allow-list now holds on every address: loopback names and addresses, the address
/// listened on, and `--allowed-host` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_answers_only_its_own_hosts_on_every_address() {
    for (addr, allowed) in [("[::ffff:127.0.0.1]:0", Vec::new()), ("0.0.0.0:0", vec!["mixd.lan".to_string(), "192.0.2.7".to_string()])] {
        let app = spawn_app_with(|config| {
            config.api_keys.clear();
            config.token_keys.token_keys.clear();
            config.no_auth = true;
            config.addr = addr.parse().unwrap();
            config.allowed_hosts = allowed.clone();
        })
        .await;
        let stem = app.fixture("a.wav", "sine=f=440:r=48000:d=1", &[]);
        let port = app.address.rsplit(':').next().unwrap().to_string();
        let url = app.url("/mix/p1/mix/start").replace("[::ffff:127.0.0.1]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1");
        let start = |host: String| anonymous().post(&url).header("host", host).header("origin", "http://attacker.example").send();
        // A rebinding page: its own name as Host, and as Origin.
        assert_eq!(start(format!("attacker.example:{port}")).await.unwrap().status(), 403, "{addr}");
        // The health check answers a load balancer's probe by whatever name it uses.
        let health = anonymous().get(url.replace("/mix/p1/mix/start", "/healthz")).header("host", format!("10.1.2.3:{port}")).send().await.unwrap();
        assert_eq!(health.status(), 200, "{addr}");
        let upload = anonymous()
            .post(url.replace("/mix/p1/mix/start", "/projects/p1/stems"))
            .header("host", format!("localhost:{port}"))
            .multipart(reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(std::fs::read(&stem).unwrap()).file_name("a.wav")))
            .send()
            .await
            .unwrap();
        assert_eq!(upload.status(), 201, "{addr}: loopback names are the server's own");
        for host in &allowed {
            let listed = anonymous().get(url.replace("/mix/p1/mix/start", "/mix/p1/mix/jobs")).header("host", format!("{host}:{port}")).send().await.unwrap();
            assert_eq!(listed.status(), 200, "{addr}: --allowed-host {host}");
        }
    }
}

/// A page on another localhost port (or a sibling subdomain: SameSite=Strict does not separate
/// those) used to start a mix with the signed-in user's cookie, by a `text/plain` POST (no CORS
/// preflight). Every state change the cookie authenticates now needs the server's own origin, and
/// `Sec-Fetch-Site: same-origin` where the browser sends it; a JSON body needs `application/json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_authenticates_state_changes_only_from_the_server_s_own_page() {
    let app = spawn_app().await;
    mixed_project(&app, "p1").await;
    let write = token("p1", "write");
    let start = |origin: Option<String>, site: Option<&'static str>, content_type: &'static str, credential: &str| {
        let mut request = anonymous().post(app.url("/mix/p1/mix/start")).header("content-type", content_type).body("{}");
        request =
            if credential.starts_with("Bearer ") { request.header("authorization", credential) } else { request.header("cookie", format!("mixd_token={credential}")) };
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(site) = site {
            request = request.header("sec-fetch-site", site);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap()["error"].as_str().map(String::from))
        }
    };
    let forbidden = (403, Some("FORBIDDEN".to_string()));
    let other_port = Some("http://localhost:1".to_string());
    assert_eq!(start(other_port.clone(), Some("same-site"), "text/plain", &write).await, forbidden, "the attack as reported");
    assert_eq!(start(other_port.clone(), None, "application/json", &write).await, forbidden);
    assert_eq!(start(None, Some("same-site"), "application/json", &write).await, forbidden, "a sibling port without Origin");
    assert_eq!(start(None, Some("cross-site"), "application/json", &write).await, forbidden);
    let upload = anonymous()
        .post(app.url("/projects/p1/stems"))
        .header("cookie", format!("mixd_token={write}"))
        .header("origin", "http://localhost:1")
        .multipart(reqwest::multipart::Form::new().part("file", reqwest::multipart::Part::bytes(b"RIFF".to_vec()).file_name("x.wav")))
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 403, "an upload from another page");

    let own = Some(app.address.clone());
    assert_eq!(start(own.clone(), Some("same-origin"), "application/json", &write).await, (202, None), "the server's own page");
    assert_eq!(start(own, Some("same-origin"), "text/plain", &write).await, (415, Some("UNSUPPORTED_MEDIA_TYPE".to_string())));
    // A bearer credential is no cookie: a script that holds it needs no forgery.
    assert_eq!(start(other_port, Some("cross-site"), "application/json", &format!("Bearer {write}")).await, (202, None));
    let (_, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!(jobs["data"]["jobs"].as_array().unwrap().len(), 3, "the first mix and the two accepted starts, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_differing_only_in_case_never_share_a_directory_and_an_older_layout_is_renamed() {
    let (data, fixtures) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = start_server(data.path(), fixtures.path(), &[]).await;
    for project in ["pa", "pA"] {
        let stem = first.app.fixture(&format!("{project}.wav"), "sine=f=440:r=48000:d=1", &[]);
        assert_eq!(first.app.upload(project, &[&stem]).await.0, 201);
    }
    // On a case-insensitive filesystem (macOS, Windows, casefold) `pa` and `pA` would be one
    // directory: their names differ beyond case.
    let mut names: Vec<String> =
        std::fs::read_dir(data.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect();
    names.sort();
    assert_eq!(names, ["p+a", "pa"]);
    let token = sign(Algorithm::HS256, Some("t1"), SECRET, claims("pa", "read", 600));
    let (status, _, listed) = send(&first.app, "GET", "/projects/pa/stems", Some(&format!("Bearer {token}"))).await;
    assert_eq!((status, listed["data"]["stems"][0]["name"].as_str()), (200, Some("pa.wav")));
    assert_eq!(send(&first.app, "GET", "/projects/pA/stems", Some(&format!("Bearer {token}"))).await.0, 403);

    // A data dir an earlier release wrote, the capital in the directory's name, is renamed at start.
    first.kill();
    std::fs::rename(data.path().join("p+a"), data.path().join("pA")).unwrap();
    let second = start_server(data.path(), fixtures.path(), &[]).await;
    assert!(data.path().join("p+a").is_dir() && !data.path().join("pA").exists());
    let (_, listed) = second.app.get_json("/projects/pA/stems").await;
    assert_eq!(listed["data"]["stems"][0]["name"], "pA.wav");
    let (_, projects) = second.app.get_json("/projects").await;
    let mut ids: Vec<&str> = projects["data"]["projects"].as_array().unwrap().iter().map(|p| p["project_id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["pA", "pa"]);
}
