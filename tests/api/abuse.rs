//! Clients that misbehave on purpose: the server keeps serving everyone else.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{spawn_app_with, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_their_headers_are_cut_off_and_others_are_served() {
    let app = spawn_app_with(|config| config.header_timeout = std::time::Duration::from_secs(1)).await;
    let address = app.address.trim_start_matches("http://").to_string();
    let mut stuck = Vec::new();
    for _ in 0..300 {
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        stuck.push(socket);
    }
    // Everyone else is still served while those hang.
    let (status, body) = app.get_json("/healthz").await;
    assert_eq!((status, body["ok"].as_bool()), (200, Some(true)));
    // And the stuck ones are closed once the 1 s header timeout passes: by 15 s at the latest,
    // however loaded the machine, where a server that waited out a 100 s timeout would not be.
    let cut_off_by = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    for mut socket in stuck {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout_at(cut_off_by, socket.read_to_end(&mut rest)).await.expect("the server closes a stuck connection after its header timeout");
        let text = String::from_utf8_lossy(&rest);
        assert!(closed.is_err() || rest.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_headers_are_refused_without_harm() {
    let app = crate::helpers::spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let huge = "a".repeat(2 * 1024 * 1024);
    let _ = socket.write_all(format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\n\r\n").as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, socket.read_to_end(&mut response)).await.expect("answered or closed");
    let text = String::from_utf8_lossy(&response);
    assert!(response.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(app.get_json("/healthz").await.0, 200);
}
