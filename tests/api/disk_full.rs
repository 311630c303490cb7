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

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs only writes the struct it is given; the path is a valid C string.
    let stats = unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut stats), 0, "statvfs");
        stats
    };
    stats.f_bavail * stats.f_frsize
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_spill_the_export_or_the_upload_cleanly_and_the_server_recovers() {
    let disk = Tmpfs::mount(4 * 1024 * 1024);
    let data = disk.path().to_path_buf();
    let app = spawn_app_with(|config| config.data_dir = data).await;
    let stem = make_audio(app.fixtures.path(), "vox.wav", "sine=f=330:r=48000:d=10", &["-ac", "1"]); // 960 KB
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);

    let short = make_audio(app.fixtures.path(), "hum.wav", "sine=f=110:r=48000:d=5", &["-ac", "1"]); // 480 KB
    assert_eq!(app.upload("p2", &[&short]).await.0, 201);
    let before = free_bytes(disk.path());

    // Pass one spills the bus as 32-bit float stereo, 3.8 MB for p1's 10 s: more than is left, so
    // that mix fails while spilling. p2's 5 s spill (1.9 MB) fits, but not with the 1.9 MB 32-bit
    // result beside it, so that mix fails while mastering writes the result.
    for (project, failed_in) in [("p1", "processing_tracks"), ("p2", "mastering")] {
        let (_, started) = app.start_mix(project, Some(json!({"output": {"bit_depth": 32}}))).await;
        let statuses = app.follow_job(project, started["data"]["job_id"].as_str().unwrap()).await;
        let last = statuses.last().unwrap();
        assert_eq!((last["state"].as_str(), last["error_code"].as_str()), (Some("error"), Some("INSUFFICIENT_STORAGE")), "{project}: {last}");
        assert!(last["error"].as_str().unwrap().contains("disk is full"));
        assert_eq!(statuses[statuses.len() - 2]["state"], failed_in, "{project}");
        let partials: Vec<_> = walk(disk.path()).into_iter().filter(|p| p.to_string_lossy().contains(".partial")).collect();
        assert!(partials.is_empty(), "{partials:?}");
        // The spill is an unnamed file: once closed, its megabytes are back (the job's events
        // in the database take a few kilobytes).
        let after = free_bytes(disk.path());
        assert!(after + 512 * 1024 >= before, "{project}: {after} bytes free after the failed mix, {before} before");
        assert_eq!(app.get_json("/healthz").await.0, 200);
    }

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

    // A mix that fits (2 s: a 0.8 MB spill and a 0.4 MB 16-bit result) completes.
    let brief = make_audio(app.fixtures.path(), "tick.wav", "sine=f=880:r=48000:d=2", &["-ac", "1"]);
    assert_eq!(app.upload("p3", &[&brief]).await.0, 201);
    let (_, started) = app.start_mix("p3", Some(json!({"output": {"bit_depth": 16}}))).await;
    let statuses = app.follow_job("p3", started["data"]["job_id"].as_str().unwrap()).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    drop(app);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_encoding_fails_the_job_in_exporting_and_publishes_nothing() {
    const MOUNT: u64 = 16 * 1024 * 1024;
    let disk = Tmpfs::mount(MOUNT);
    let data = disk.path().to_path_buf();
    let app = spawn_app_with(|config| config.data_dir = data).await;
    // White noise, which FLAC can hardly shrink: 8 s at 48 kHz.
    let seconds = 8;
    let stem = make_audio(app.fixtures.path(), "noise.wav", &format!("anoisesrc=c=white:a=0.5:r=48000:d={seconds}"), &["-ac", "2"]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    // Room for the spill (8 bytes a frame) and the 24-bit WAV (6) with 384 KiB to spare for the
    // job's events, not for the FLAC of noise (over 1.5 MB) that comes after the WAV.
    let frames = seconds * 48_000;
    let size = MOUNT - free_bytes(disk.path()) + frames * (8 + 6) + 384 * 1024;
    let remount = |bytes: u64| {
        let status = Command::new("mount").args(["-o", &format!("remount,size={bytes}")]).arg(disk.path()).status().unwrap();
        assert!(status.success(), "remounting the tmpfs");
    };
    remount(size);
    let settings = json!({"output": {"formats": [{"format": "wav"}, {"format": "flac"}]}});
    let (_, started) = app.start_mix("p1", Some(settings.clone())).await;
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let statuses = app.follow_job("p1", &job_id).await;
    let last = statuses.last().unwrap();
    assert_eq!((last["state"].as_str(), last["error_code"].as_str()), (Some("error"), Some("INSUFFICIENT_STORAGE")), "{last}");
    assert_eq!(statuses[statuses.len() - 2]["state"], "exporting", "it failed while encoding: {statuses:?}");
    // Nothing of the job is published or left half-written: not even the WAV that was whole.
    let left: Vec<_> = walk(disk.path()).into_iter().filter(|p| p.is_file() && p.to_string_lossy().contains(&job_id)).collect();
    assert!(left.is_empty(), "{left:?}");
    let outputs = disk.path().join(format!("p1/mix_outputs/{job_id}"));
    crate::helpers::eventually("the failed job's empty directory is removed", || !outputs.exists()).await;
    let wav = app.client.get(app.url(&format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"))).send().await.unwrap();
    assert_eq!(wav.status(), 404);
    assert_eq!(app.get_json("/healthz").await.0, 200);

    // With room again, the same mix delivers both files.
    remount(MOUNT);
    let (_, started) = app.start_mix("p1", Some(settings)).await;
    let statuses = app.follow_job("p1", started["data"]["job_id"].as_str().unwrap()).await;
    let last = statuses.last().unwrap();
    assert_eq!(last["state"], "complete", "{last}");
    let formats: Vec<&str> = last["results"].as_array().unwrap().iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["wav", "flac"]);
    drop(app);
}
