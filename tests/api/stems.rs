use serde_json::Value;

use crate::helpers::{eventually, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_stems_are_probed_exactly_and_listed() {
    let app = spawn_app().await;
    let wav = app.fixture("Kick Drum.wav", "sine=f=60:r=44100:d=3", &["-ac", "1"]);
    let flac = app.fixture("bass.flac", "sine=f=110:r=96000:d=2.5", &["-ac", "2"]);
    let (status, body) = app.upload("song-1", &[&wav, &flac]).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["ok"], true);
    let stems = body["data"]["stems"].as_array().unwrap();
    assert_eq!(stems.len(), 2);
    assert_eq!(stems[0]["name"], "Kick Drum.wav");
    assert_eq!((stems[0]["format"].as_str(), stems[0]["sample_rate"].as_u64(), stems[0]["channels"].as_u64()), (Some("wav"), Some(44_100), Some(1)));
    assert_eq!(stems[0]["duration_s"].as_f64(), Some(3.0));
    assert_eq!(stems[0]["size_bytes"].as_u64(), Some(std::fs::metadata(&wav).unwrap().len()));
    assert_eq!((stems[1]["codec"].as_str(), stems[1]["sample_rate"].as_u64()), (Some("flac"), Some(96_000)));
    assert_eq!(stems[1]["duration_s"].as_f64(), Some(2.5));

    let (status, listed) = app.get_json("/api/projects/song-1/stems").await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"]["stems"].as_array().unwrap().len(), 2);

    let stem_id = stems[0]["stem_id"].as_str().unwrap();
    let deleted = app.client.delete(app.url(&format!("/projects/song-1/stems/{stem_id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    let again = app.client.delete(app.url(&format!("/projects/song-1/stems/{stem_id}"))).send().await.unwrap();
    assert_eq!(again.status(), 404);
    assert_eq!(again.json::<Value>().await.unwrap()["error"], "STEM_NOT_FOUND");
    let (_, listed) = app.get_json("/projects/song-1/stems").await;
    assert_eq!(listed["data"]["stems"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_leave_nothing_behind_and_name_the_file() {
    let app = spawn_app().await;
    let good = app.fixture("good.wav", "sine=f=440:r=44100:d=2", &[]);
    let bytes = std::fs::read(&good).unwrap();
    let cut = app.fixtures.path().join("cut.wav");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let text = app.fixtures.path().join("notes.wav");
    std::fs::write(&text, "verse, chorus, verse").unwrap();

    let (status, body) = app.upload("p1", &[&good, &cut]).await;
    assert_eq!(status, 415, "{body}");
    assert_eq!(body["error"], "UNSUPPORTED_AUDIO");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("cut.wav") && message.contains("1.0"), "names the file and where it fails: {message}");
    let (status, body) = app.upload("p1", &[&text]).await;
    assert_eq!((status, body["error"].as_str()), (415, Some("UNSUPPORTED_AUDIO")));
    assert!(body["message"].as_str().unwrap().contains("notes.wav"));

    // All or nothing: the good file of the refused request was not kept either.
    let (_, listed) = app.get_json("/projects/p1/stems").await;
    assert_eq!(listed["data"]["stems"].as_array().unwrap().len(), 0);
    let leftovers: Vec<_> = walk(app.data_dir.path()).into_iter().filter(|p| p.is_file()).collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_uploads_are_refused_before_the_body_is_read() {
    let app = spawn_app_small_limit().await;
    let big = app.fixture("big.wav", "sine=f=440:r=48000:d=8", &["-ac", "2"]); // ~3 MiB
    let (status, body) = app.upload("p1", &[&big]).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("PAYLOAD_TOO_LARGE")));
    // Without a Content-Length the limit holds while streaming.
    let bytes = std::fs::read(&big).unwrap();
    let stream = futures_util::stream::iter(bytes.chunks(64 * 1024).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>());
    let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(stream)).file_name("big.wav");
    let response = app.client.post(app.url("/projects/p1/stems")).multipart(reqwest::multipart::Form::new().part("file", part)).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "PAYLOAD_TOO_LARGE");
    assert!(walk(app.data_dir.path()).iter().all(|p| !p.is_file()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_upload_leaves_no_file() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    let address = app.address.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let boundary = "XyZ";
    let head = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"half.wav\"\r\n\r\n");
    let request = format!(
        "POST /projects/p1/stems HTTP/1.1\r\nHost: {address}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 10000000\r\n\r\n{head}"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket.write_all(&[0u8; 200_000]).await.unwrap();
    socket.flush().await.unwrap();
    // Wait until the server has started writing the partial file, then hang up.
    eventually("the upload reaches the disk", || walk(app.data_dir.path()).iter().any(|p| p.is_file())).await;
    drop(socket);
    eventually("the partial upload is removed", || !walk(app.data_dir.path()).iter().any(|p| p.is_file())).await;
    let (status, _) = app.get_json("/healthz").await;
    assert_eq!(status, 200);
}

async fn spawn_app_small_limit() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(|config| config.max_upload_mb = 1).await
}

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            }
            found.push(path);
        }
    }
    found
}
