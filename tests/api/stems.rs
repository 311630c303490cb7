use serde_json::Value;

use crate::helpers::{eventually, spawn_app, ADMIN_KEY};

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
    let address = app.address.trim_start_matches("http://").to_string();
    let part_head = "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n\r\n";
    // Declared too large: refused on the headers alone, without sending a byte of body.
    let head = &format!("POST /projects/p1/stems HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 2000000\r\n\r\n");
    let (status, body) = raw_exchange(&address, head, Vec::new()).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "PAYLOAD_TOO_LARGE");
    // Chunked, with no length declared: the limit holds while streaming.
    let head = &format!("POST /projects/p1/stems HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: multipart/form-data; boundary=B\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut chunks = vec![format!("{:x}\r\n{part_head}\r\n", part_head.len()).into_bytes()];
    for _ in 0..40 {
        let data = vec![0u8; 64 * 1024];
        chunks.push([format!("{:x}\r\n", data.len()).into_bytes(), data, b"\r\n".to_vec()].concat());
    }
    let (status, body) = raw_exchange(&address, head, chunks).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "PAYLOAD_TOO_LARGE");
    eventually("no partial upload is left", || walk(app.data_dir.path()).iter().all(|p| !p.is_file())).await;
}

/// Sends a request over a raw connection, writing the body in the background without caring
/// whether the server reads it (a server may answer early and close), and returns the response.
pub async fn raw_exchange(address: &str, head: &str, body: Vec<Vec<u8>>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    writer.write_all(head.as_bytes()).await.unwrap();
    let writing = tokio::spawn(async move {
        for chunk in body {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = writer.write_all(b"0\r\n\r\n").await;
        let _ = writer.shutdown().await;
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let read = tokio::time::timeout(crate::helpers::DEADLINE, reader.read(&mut buffer)).await.expect("a response");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
        }
        if let Some(parsed) = parse_response(&response) {
            writing.abort();
            return parsed;
        }
    }
    writing.abort();
    parse_response(&response).unwrap_or_else(|| panic!("no complete response: {}", String::from_utf8_lossy(&response)))
}

fn parse_response(bytes: &[u8]) -> Option<(u16, Value)> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))?;
    (body.len() >= length).then(|| (status, serde_json::from_str(&body[..length]).unwrap()))
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
        "POST /projects/p1/stems HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 10000000\r\n\r\n{head}"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_files_in_one_upload_are_refused() {
    let app = crate::helpers::spawn_app_with(|config| config.max_files = 2).await;
    let stem = app.fixture("a.wav", "sine=f=440:r=44100:d=1", &[]);
    let (status, body) = app.upload("p1", &[&stem, &stem, &stem]).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("TOO_MANY_FILES")), "{body}");
    let (_, listed) = app.get_json("/projects/p1/stems").await;
    assert_eq!(listed["data"]["stems"].as_array().unwrap().len(), 0, "all or nothing");
}

async fn spawn_app_small_limit() -> crate::helpers::TestApp {
    crate::helpers::spawn_app_with(|config| config.max_upload_mb = 1).await
}

/// Everything under the data root but the job database.
pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name() == ".mixd" {
                continue;
            }
            if path.is_dir() {
                found.extend(walk(&path));
            }
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_are_listed_with_their_stems_and_newest_job_most_recent_first() {
    let app = spawn_app().await;
    assert_eq!(app.get_json("/projects").await.1["data"]["projects"], serde_json::json!([]), "none yet");
    let one = app.fixture("one.wav", "sine=f=440:r=48000:d=1", &[]);
    let two = app.fixture("two.wav", "sine=f=220:r=48000:d=1", &[]);
    let (_, first) = app.upload("first", &[&one, &two]).await;
    let sizes: u64 = first["data"]["stems"].as_array().unwrap().iter().map(|s| s["size_bytes"].as_u64().unwrap()).sum();
    assert_eq!(app.upload("second", &[&one]).await.0, 201);
    // A job makes the first project the most recently updated again.
    let (_, started) = app.start_mix("first", None).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let done = app.follow_job("first", &job_id).await.pop().unwrap();

    let (status, body) = app.get_json("/projects").await;
    assert_eq!(status, 200);
    let projects = body["data"]["projects"].as_array().unwrap();
    assert_eq!(projects.iter().map(|p| p["project_id"].as_str().unwrap()).collect::<Vec<_>>(), ["first", "second"]);
    assert_eq!((projects[0]["stems"].as_u64(), projects[0]["size_bytes"].as_u64()), (Some(2), Some(sizes)));
    assert_eq!(projects[0]["newest_job"], done);
    assert_eq!(projects[0]["updated_at"], done["updated_at"]);
    assert_eq!((projects[1]["stems"].as_u64(), &projects[1]["newest_job"]), (Some(1), &Value::Null));
}
