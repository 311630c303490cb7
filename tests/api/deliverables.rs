//! The files a mix is delivered in, checked as a listener's player and ffmpeg read them: FLAC, MP3
//! and Opus beside the WAV, on real recordings and on material made to break a lossy encoder's
//! ceiling (drums, hard-clipped synths, 16 kHz content at the lowest MP3 bitrate).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::{ffmpeg_loudness, ffmpeg_true_peak, make_audio, post_json, spawn_app, test_media, TestApp};

/// ffmpeg's decode of a file as interleaved 32-bit integers, and its rate.
fn ffmpeg_pcm(path: &Path) -> (Vec<u8>, u32) {
    let output =
        Command::new("ffmpeg").args(["-nostdin", "-loglevel", "error", "-i"]).arg(path).args(["-f", "s32le", "-acodec", "pcm_s32le", "-"]).output().expect("ffmpeg runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    (output.stdout, String::from_utf8_lossy(&probe.stdout).trim().parse().expect("a rate"))
}

/// A recording cut to `seconds` (an excerpt keeps the test short; it is still the recording).
fn excerpt(dir: &Path, source: &Path, name: &str, seconds: u32) -> PathBuf {
    let path = dir.join(name);
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
        .arg(source)
        .args(["-t", &seconds.to_string(), "-c:a", "flac"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    path
}

async fn mix_to_completion(app: &TestApp, project: &str, settings: Value) -> Value {
    let (status, started) = app.start_mix(project, Some(settings)).await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let last = app.follow_job(project, &job_id).await.pop().expect("a status");
    assert_eq!(last["state"], "complete", "{last}");
    last
}

/// Fetches every file of `results`, checks what `/media` says of it, and saves it in `dir`.
async fn fetch_results(app: &TestApp, results: &[Value], dir: &Path) -> Vec<PathBuf> {
    let content_types = [("wav", "audio/wav"), ("flac", "audio/flac"), ("mp3", "audio/mpeg"), ("opus", "audio/ogg; codecs=opus")];
    let mut files = Vec::new();
    for result in results {
        let format = result["format"].as_str().unwrap();
        let url = result["url"].as_str().unwrap();
        assert!(url.ends_with(&format!("/final_mix.{format}")), "{url}");
        let response = app.client.get(app.url(url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let expected_type = content_types.iter().find(|(name, _)| *name == format).unwrap().1;
        assert_eq!(response.headers()["content-type"], expected_type, "{url}");
        let etag = response.headers()["etag"].to_str().unwrap().to_string();
        let bytes = response.bytes().await.unwrap();
        assert_eq!(bytes.len() as u64, result["bytes"].as_u64().unwrap(), "{url}: the size results reports");
        // A player streams it by ranges.
        let range = app.client.get(app.url(url)).header("range", "bytes=100-199").send().await.unwrap();
        assert_eq!(range.status(), 206, "{url}");
        assert_eq!(range.headers()["etag"].to_str().unwrap(), etag);
        assert_eq!(range.headers()["content-range"].to_str().unwrap(), format!("bytes 100-199/{}", bytes.len()));
        assert_eq!(range.bytes().await.unwrap(), bytes.slice(100..200));
        let path = dir.join(format!("final_mix.{format}"));
        std::fs::write(&path, &bytes).unwrap();
        files.push(path);
    }
    files
}

/// Every file keeps the master's promise as ffmpeg decodes it: loudness within 0.5 LU of the
/// target, true peak at or under the ceiling, the WAV's length within 1 ms; the FLAC decodes to
/// the WAV's exact samples; and `results` reports what ffmpeg measures.
fn assert_promise_kept(files: &[PathBuf], results: &[Value], target: f64, ceiling: f64, what: &str) {
    let wav = files.iter().find(|f| f.extension().unwrap() == "wav").expect("a WAV");
    let (wav_pcm, wav_rate) = ffmpeg_pcm(wav);
    let wav_seconds = wav_pcm.len() as f64 / 8.0 / f64::from(wav_rate);
    for (file, result) in files.iter().zip(results) {
        let format = result["format"].as_str().unwrap();
        let (integrated, _) = ffmpeg_loudness(file);
        let peak = ffmpeg_true_peak(file);
        let (pcm, rate) = ffmpeg_pcm(file);
        let seconds = pcm.len() as f64 / 8.0 / f64::from(rate);
        eprintln!("{what} {format}: {integrated:.2} LUFS, {peak:.3} dBTP, {seconds:.5} s (WAV {wav_seconds:.5} s), {} bytes", result["bytes"]);
        assert!((integrated - target).abs() <= 0.5, "{what} {format}: {integrated} LUFS, target {target}");
        assert!(peak <= ceiling + 0.001, "{what} {format}: ffmpeg reads {peak} dBTP over the ceiling {ceiling}");
        assert!((seconds - wav_seconds).abs() <= 0.001, "{what} {format}: {seconds} s decoded, the WAV has {wav_seconds} s");
        assert!((result["duration_s"].as_f64().unwrap() - seconds).abs() <= 0.001, "{what} {format}: reported {} s", result["duration_s"]);
        assert!(
            (result["integrated_lufs"].as_f64().unwrap() - integrated).abs() <= 0.2,
            "{what} {format}: reported {} LUFS, ffmpeg {integrated}",
            result["integrated_lufs"]
        );
        assert!(result["true_peak_dbtp"].as_f64().unwrap() <= ceiling, "{what} {format}: reported {}", result["true_peak_dbtp"]);
        if format == "flac" {
            assert_eq!(rate, wav_rate);
            assert!(pcm == wav_pcm, "{what}: the FLAC decodes to other samples than the WAV's");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_keeps_loudness_ceiling_and_length_as_ffmpeg_decodes_it_on_real_recordings() {
    let app = spawn_app().await;
    let media = test_media();
    let music = media.join("usr/share/games/asc/music");
    let dir = app.fixtures.path();
    let game = [excerpt(dir, &music.join("frontiers.mp3"), "frontiers.flac", 25), excerpt(dir, &music.join("time_to_strike.mp3"), "strike.flac", 25)];
    assert_eq!(app.upload("game", &[&game[0], &game[1]]).await.0, 201);
    let settings = json!({"output": {"formats": [{"format": "wav"}, {"format": "flac"}, {"format": "mp3"}, {"format": "opus"}]}});
    let complete = mix_to_completion(&app, "game", settings).await;
    let results = complete["results"].as_array().unwrap();
    let formats: Vec<&str> = results.iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["wav", "flac", "mp3", "opus"], "in the order asked");
    assert_eq!(complete["result_url"], results[0]["url"]);
    let out = tempfile::tempdir().unwrap();
    let files = fetch_results(&app, results, out.path()).await;
    assert_promise_kept(&files, results, -14.0, -1.0, "game music");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_material_stays_under_the_ceiling_at_low_bitrates() {
    let app = spawn_app().await;
    let kit = test_media().join("usr/share/hydrogen/data/drumkits/GMRockKit");
    let dir = app.fixtures.path();
    // Drums: the kit's hardest kick and snare, looped into a 12 s pattern.
    let pattern = dir.join("drums.wav");
    let hit = "aresample=44100,apad=whole_dur=0.5,atrim=0:0.5,aloop=loop=-1:size=22050,atrim=0:12";
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
        .arg(kit.join("Kick-Hardest.wav"))
        .arg("-i")
        .arg(kit.join("Snare-Hardest.wav"))
        .args(["-filter_complex", &format!("[0]{hit}[k];[1]adelay=250|250,{hit}[s];[k][s]amix=inputs=2:normalize=0"), "-ac", "2"])
        .arg(&pattern)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // A hard-clipped saw synth, and 16 kHz content that a 96 kbps MP3 cannot keep.
    let synth = make_audio(dir, "synth.wav", "aevalsrc=clip(3*(2*mod(110*t\\,1)-1)\\,-0.9\\,0.9):s=44100:d=12", &["-ac", "2"]);
    let air = make_audio(dir, "air.wav", "aevalsrc=0.5*sin(2*PI*16000*t)+0.2*sin(2*PI*15000*t):s=44100:d=12", &["-ac", "2"]);
    assert_eq!(app.upload("hard", &[&pattern, &synth, &air]).await.0, 201);
    // The drums lead, so that the limiter holds their peaks at the ceiling.
    for (target, ceiling) in [(-9.0, -1.0), (-11.0, -2.0)] {
        let settings = json!({
            "tracks": {"synth.wav": {"gain_db": -12}, "air.wav": {"gain_db": -16}},
            "master": {"target_lufs": target, "true_peak_dbtp": ceiling},
            "output": {"bit_depth": 16, "formats": [{"format": "wav"}, {"format": "mp3", "bitrate_kbps": 96}, {"format": "opus", "bitrate_kbps": 64}, {"format": "flac"}]}
        });
        let complete = mix_to_completion(&app, "hard", settings).await;
        let results = complete["results"].as_array().unwrap();
        let out = tempfile::tempdir().unwrap();
        let files = fetch_results(&app, results, out.path()).await;
        let what = format!("drums, clipped synth and 16 kHz at {target} LUFS / {ceiling} dBTP");
        let master_peak = results[0]["true_peak_dbtp"].as_f64().unwrap();
        assert!(master_peak > ceiling - 0.5, "{what}: the master peaks at {master_peak} dBTP, not limited at the ceiling: not adversarial");
        assert_promise_kept(&files, results, target, ceiling, &what);
    }
}

#[tokio::test]
async fn bad_formats_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let stem = app.fixture("a.wav", "sine=f=440:r=44100:d=1", &[]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let cases = [
        (json!({"output": {"formats": []}}), "output.formats"),
        (json!({"output": {"formats": [{"format": "aac"}]}}), "output.formats[0].format"),
        (json!({"output": {"formats": [{"format": "opus"}, {"format": "opus", "bitrate_kbps": 96}]}}), "output.formats[1].format"),
        (json!({"output": {"formats": [{"format": "mp3", "bitrate_kbps": 64}]}}), "output.formats[0].bitrate_kbps"),
        (json!({"output": {"formats": [{"format": "mp3", "bitrate_kbps": 150}]}}), "output.formats[0].bitrate_kbps"),
        (json!({"output": {"formats": [{"format": "opus", "bitrate_kbps": 512}]}}), "output.formats[0].bitrate_kbps"),
        (json!({"output": {"formats": [{"format": "wav", "bitrate_kbps": 320}]}}), "output.formats[0].bitrate_kbps"),
        (json!({"output": {"formats": [{"format": "flac"}], "bit_depth": 32}}), "output.bit_depth"),
        (json!({"output": {"formats": [{"format": "opus", "quality": 5}]}}), "output.formats[0]"),
    ];
    for (settings, field) in cases {
        let (status, body) = post_json(&app, "/mix/p1/mix/start", settings.clone()).await;
        assert_eq!((status, body["error"].as_str()), (422, Some("INVALID_SETTINGS")), "{settings}: {body}");
        assert!(body["message"].as_str().unwrap().starts_with(&format!("Invalid settings: {field}")), "{settings}: {body}");
    }
    let (status, jobs) = app.get_json("/mix/p1/mix/jobs").await;
    assert_eq!((status, jobs["data"]["jobs"].as_array().map(Vec::len)), (200, Some(0)), "no job was started: {jobs}");
}

#[tokio::test]
async fn a_job_delivers_only_what_it_asked_for_and_the_defaults_are_wav_and_opus() {
    let app = spawn_app().await;
    let stem = app.fixture("a.wav", "sine=f=440:r=44100:d=2", &[]);
    assert_eq!(app.upload("p1", &[&stem]).await.0, 201);
    let default = mix_to_completion(&app, "p1", json!({})).await;
    let formats: Vec<&str> = default["results"].as_array().unwrap().iter().map(|r| r["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["wav", "opus"]);

    let opus_only = mix_to_completion(&app, "p1", json!({"output": {"formats": [{"format": "opus", "bitrate_kbps": 96}]}})).await;
    let job = opus_only["job_id"].as_str().unwrap();
    assert_eq!(opus_only["result_url"], format!("/media/p1/mix_outputs/{job}/final_mix.opus"));
    assert_eq!(opus_only["results"].as_array().unwrap().len(), 1);
    for absent in ["wav", "flac", "mp3"] {
        let response = app.client.get(app.url(&format!("/media/p1/mix_outputs/{job}/final_mix.{absent}"))).send().await.unwrap();
        assert_eq!(response.status(), 404, "{absent}");
    }
    // The legacy path is the newest complete job's WAV: this one has none.
    assert_eq!(app.client.get(app.url("/media/p1/mix_outputs/final_mix.wav")).send().await.unwrap().status(), 404);
    let names: Vec<String> =
        std::fs::read_dir(app.data_dir.path().join(format!("p1/mix_outputs/{job}"))).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["analysis.json", "final_mix.opus"], "nothing staged is left, and no WAV");
}

/// Pink noise mastered to -7 LUFS under -1 dBTP is limited so hard that Opus at 64 kbps cannot
/// be both under the ceiling and at its loudness (it reads over 2 LU short with room to spare):
/// the encoder's promise fails, and with it the job, naming the format, with nothing published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_file_that_cannot_keep_the_promise_fails_the_job_export_failed_and_publishes_nothing() {
    let app = spawn_app().await;
    let noise = make_audio(app.fixtures.path(), "noise.wav", "anoisesrc=c=pink:a=0.5:r=48000:d=10", &["-ac", "2"]);
    assert_eq!(app.upload("p1", &[&noise]).await.0, 201);
    let settings = json!({"master": {"target_lufs": -7, "true_peak_dbtp": -1}, "output": {"formats": [{"format": "wav"}, {"format": "opus", "bitrate_kbps": 64}]}});
    let (status, started) = app.start_mix("p1", Some(settings)).await;
    assert_eq!(status, 202, "{started}");
    let job_id = started["data"]["job_id"].as_str().unwrap().to_string();
    let statuses = app.follow_job("p1", &job_id).await;
    let last = statuses.last().unwrap();
    assert_eq!((last["state"].as_str(), last["error_code"].as_str()), (Some("error"), Some("EXPORT_FAILED")), "{last}");
    let message = last["error"].as_str().unwrap();
    assert!(message.starts_with("Encoding the opus file failed: as decoded it read "), "{message}");
    assert!(message.ends_with("the master is limited too hard for its opus file to keep both (a lower target loudness leaves it room)"), "{message}");
    assert!(statuses.iter().any(|status| status["state"] == "exporting"), "it failed while exporting");
    assert_eq!(last["results"], Value::Null);
    // Nothing of the job is published: not even the WAV made before the Opus file failed.
    let outputs = app.data_dir.path().join(format!("p1/mix_outputs/{job_id}"));
    let left: Vec<String> =
        std::fs::read_dir(&outputs).map(|entries| entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    assert_eq!(left, Vec::<String>::new());
    let wav = app.client.get(app.url(&format!("/media/p1/mix_outputs/{job_id}/final_mix.wav"))).send().await.unwrap();
    assert_eq!(wav.status(), 404);
}
