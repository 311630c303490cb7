//! A full disk, for real: the data root is a 4 MiB tmpfs (the test command runs as root, as CI
//! does; without root this test fails rather than skips).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::helpers::{make_audio, spawn_app_with, ADMIN_KEY};
use crate::stems::{raw_exchange, walk};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap().keep();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}")]).arg("tmpfs").arg(&dir).status().expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root: run the tests as root, as scripts/test and CI do");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_export_or_upload_cleanly_and_the_server_recovers() {
    let disk = Tmpfs::mount(4 * 1024 * 1024);
    let data = disk.path().to_path_buf();
    let app = spawn_app_with(|config| config.data_dir = data).await;
    let stem = make_audio(app.fixtures.path(), "vox.wav", "sine=f=330:r=48000:d=10", &["-ac", "1"]); // 960 KB
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);

    // 10 s of 32-bit float stereo is 3.8 MB: more than is left.
    let (_, started) = app.start_mix("p1", Some(json!({"output": {"bit_depth": 32}}))).await;
    let statuses = app.follow_job("p1", started["data"]["job_id"].as_str().unwrap()).await;
    let last = statuses.last().unwrap();
    assert_eq!((last["state"].as_str(), last["error_code"].as_str()), (Some("error"), Some("INSUFFICIENT_STORAGE")), "{last}");
    assert!(last["error"].as_str().unwrap().contains("disk is full"));
    let partials: Vec<_> = walk(disk.path()).into_iter().filter(|p| p.to_string_lossy().contains(".partial")).collect();
    assert!(partials.is_empty(), "{partials:?}");
    assert_eq!(app.get_json("/healthz").await.0, 200);

    // An upload larger than the space left: 507, and the partial file is gone.
    let big = std::fs::read(make_audio(app.fixtures.path(), "big.wav", "sine=f=100:r=44100:d=20", &["-ac", "2"])).unwrap(); // 3.5 MB
    let head = "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\nContent-Type: audio/wav\r\n\r\n";
    let tail = "\r\n--B--\r\n";
    let request = format!(
        "POST /projects/p1/stems HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: {}\r\n\r\n",
        head.len() + big.len() + tail.len()
    );
    let body = [head.as_bytes(), &big, tail.as_bytes()].concat();
    let address = app.address.trim_start_matches("http://").to_string();
    let (status, answer) = raw_exchange(&address, &request, body.chunks(64 * 1024).map(<[u8]>::to_vec).collect()).await;
    assert_eq!((status, answer["error"].as_str()), (507, Some("INSUFFICIENT_STORAGE")), "{answer}");
    crate::helpers::eventually("the partial upload is removed", || walk(disk.path()).iter().all(|p| !p.to_string_lossy().contains(".partial"))).await;

    // With room again (16-bit output is a quarter of the size), the next mix completes.
    let (_, started) = app.start_mix("p1", Some(json!({"output": {"bit_depth": 16}}))).await;
    let statuses = app.follow_job("p1", started["data"]["job_id"].as_str().unwrap()).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    drop(app);
}
