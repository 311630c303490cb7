//! The shared test harness: a real mixd on port 0 with its own data directory, real clients,
//! and audio fixtures made by ffmpeg at test time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mixd::config::Config;
use mixd::startup::Application;
use serde_json::Value;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub use crate::common::{start_mixd_with_env, Mixd, S3Server};
pub use crate::sse::SseStream;

/// Long enough for any mix in these tests on a loaded 2-core machine; only a broken server waits it out.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Polls `condition` until it holds, failing at the deadline.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks `condition` (an async one, such as a request) until it holds, failing at the deadline.
pub async fn eventually_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every test server runs with access control on, and every test client carries this admin
/// key, so nothing a test reaches slipped past the check.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef-0123456789";
/// The token key (`kid=secret`) test servers sign and verify scoped tokens with.
pub const TOKEN_KEY: &str = "t1=test-token-secret-0123456789abcdef-0123";

/// A client that sends the admin key with every request.
pub fn authorized_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// Opens a WebSocket with the admin key.
pub async fn connect_ws(
    url: impl AsRef<str>,
) -> Result<
    (tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, tokio_tungstenite::tungstenite::handshake::client::Response),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.as_ref().into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub data_dir: TempDir,
    pub fixtures: TempDir,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Config)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::with_data_dir(data_dir.path());
    config.addr = "127.0.0.1:0".parse().unwrap();
    config.api_keys = vec![mixd::access::parse_api_key(ADMIN_KEY).unwrap()];
    config.token_keys.token_keys = vec![mixd::access::parse_token_key(TOKEN_KEY).unwrap()];
    configure(&mut config);
    let app = Application::build(config).await.expect("the app builds");
    let address = format!("http://{}", app.local_addr());
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp { address, client: authorized_client(), data_dir, fixtures: tempfile::tempdir().unwrap(), shutdown, server }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON envelope"))
    }

    /// Uploads files as multipart parts named `file`.
    pub async fn upload(&self, project: &str, files: &[&Path]) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new();
        for file in files {
            let bytes = std::fs::read(file).expect("fixture");
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            form = form.part("file", reqwest::multipart::Part::bytes(bytes).file_name(name));
        }
        let response = self.client.post(self.url(&format!("/projects/{project}/stems"))).multipart(form).send().await.expect("upload");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON envelope"))
    }

    pub async fn start_mix(&self, project: &str, settings: Option<Value>) -> (u16, Value) {
        let mut request = self.client.post(self.url(&format!("/mix/{project}/mix/start")));
        if let Some(settings) = settings {
            request = request.json(&settings);
        }
        let response = request.send().await.expect("start");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON envelope"))
    }

    /// Follows a job's SSE stream to its end and returns every status it carried.
    pub async fn follow_job(&self, project: &str, job_id: &str) -> Vec<Value> {
        let mut stream = SseStream::connect(&self.client, &self.url(&format!("/mix/{project}/mix/job/{job_id}/events")), None).await;
        let mut statuses = Vec::new();
        while let Some(event) = stream.next_event().await {
            if event.event.as_deref() == Some("status") {
                statuses.push(serde_json::from_str(&event.data).expect("JSON data"));
            }
        }
        statuses
    }

    /// Path of a fixture made by `ffmpeg -f lavfi -i <source> <args> <name>`.
    pub fn fixture(&self, name: &str, source: &str, args: &[&str]) -> PathBuf {
        make_audio(self.fixtures.path(), name, source, args)
    }
}

pub fn make_audio(dir: &Path, name: &str, source: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source])
        .args(args)
        .arg(&path)
        .output()
        .expect("ffmpeg runs (scripts/test installs it)");
    assert!(output.status.success(), "ffmpeg failed for {name}: {}", String::from_utf8_lossy(&output.stderr));
    path
}

/// Loudness of a file as ffmpeg's EBU R128 meter measures it: (integrated LUFS, true peak dBTP).
pub fn ffmpeg_loudness(path: &Path) -> (f64, f64) {
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-nostats", "-i"])
        .arg(path)
        .args(["-af", "ebur128=peak=true", "-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    let text = String::from_utf8_lossy(&output.stderr);
    let summary = &text[text.rfind("Summary:").expect("an ebur128 summary")..];
    let value_after = |label: &str| -> f64 {
        let at = summary.find(label).unwrap_or_else(|| panic!("{label} in {summary}")) + label.len();
        summary[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    (value_after("I:"), value_after("Peak:"))
}

/// Every rule of the contract that one status, and the step from the previous one, must keep.
pub fn assert_contract_step(previous: Option<&Value>, status: &Value) {
    const ORDER: [&str; 10] = ["queued", "running", "loading_stems", "aligning_stems", "processing_tracks", "mixing", "mastering", "exporting", "complete", "error"];
    let state = status["state"].as_str().expect("state");
    let rank = ORDER.iter().position(|s| *s == state).unwrap_or_else(|| panic!("unknown state {state}"));
    let progress = status["progress"].as_u64().expect("progress");
    assert!(progress <= 100);
    assert_eq!(progress == 100, state == "complete", "100 exactly when complete: {status}");
    assert_eq!(status["error"].is_null(), state != "error", "error iff state error: {status}");
    assert_eq!(status["error_code"].is_null(), state != "error", "error_code iff state error: {status}");
    assert_eq!(status["result_url"].is_null(), state != "complete", "result_url iff complete: {status}");
    assert_eq!(status["queue_position"].is_null(), state != "queued", "queue_position iff queued: {status}");
    assert_eq!(status["report"].is_null(), state != "complete");
    for stamp in ["created_at", "updated_at"] {
        let text = status[stamp].as_str().unwrap();
        assert!(text.ends_with('Z') && text.len() == 27, "{stamp} {text}");
    }
    if let Some(previous) = previous {
        let before = ORDER.iter().position(|s| *s == previous["state"].as_str().unwrap()).unwrap();
        assert!(rank >= before || state == "error", "state went back: {previous} -> {status}");
        assert!(status["seq"].as_u64() > previous["seq"].as_u64(), "seq must rise");
        assert!(progress >= previous["progress"].as_u64().unwrap(), "progress fell");
        assert!(status["updated_at"].as_str() >= previous["updated_at"].as_str());
    }
}

/// Reads a whole integer or float WAV as interleaved f32, via hound.
pub fn read_wav(path: &Path) -> (hound::WavSpec, Vec<f32>) {
    let mut reader = hound::WavReader::open(path).expect("a valid WAV");
    let spec = reader.spec();
    let samples = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().map(|s| s.unwrap()).collect(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader.samples::<i32>().map(|s| s.unwrap() as f32 * scale).collect()
        }
    };
    (spec, samples)
}

/// The real `mixd` binary as a child process (killed when dropped), and a client for it.
pub struct Server {
    pub process: Mixd,
    pub app: TestApp,
}

/// Starts `mixd serve` on port 0 over `data_dir`, with the test keys and `extra_args`, logging
/// at `info`.
pub async fn start_server(data_dir: &Path, fixtures: &Path, extra_args: &[&str]) -> Server {
    start_server_with_env(data_dir, fixtures, extra_args, &[]).await
}

/// [`start_server`] with extra environment variables.
pub async fn start_server_with_env(data_dir: &Path, fixtures: &Path, extra_args: &[&str], env: &[(String, String)]) -> Server {
    let args: Vec<&str> = ["--api-key", ADMIN_KEY, "--token-key", TOKEN_KEY].into_iter().chain(extra_args.iter().copied()).collect();
    let process = start_mixd_with_env(env!("CARGO_BIN_EXE_mixd"), data_dir, &args, "info", env);
    let app = TestApp {
        address: format!("http://{}", process.address),
        client: authorized_client(),
        data_dir: tempfile::tempdir().unwrap(),
        fixtures: tempfile::tempdir_in(fixtures).unwrap(),
        shutdown: Default::default(),
        server: tokio::spawn(async { Ok(()) }),
    };
    Server { process, app }
}

impl Server {
    /// kill -9, and waits until it is gone.
    pub fn kill(&mut self) {
        self.process.signal("KILL");
        self.process.wait_for_exit(DEADLINE).expect("a killed process exits");
    }
}

/// The true peak of a file in dBTP by ffmpeg's EBU R128 meter (which oversamples to 192 kHz), read
/// to a thousandth of a dB: the meter prints linear peaks to three decimals, so the audio goes in
/// 20 dB hotter (in double precision, nothing clips) and comes out that much lower.
pub fn ffmpeg_true_peak(path: &Path) -> f64 {
    let output = Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-nostats", "-i"])
        .arg(path)
        .args([
            "-af",
            "aformat=sample_fmts=dbl,volume=20dB:precision=double,ebur128=peak=true:metadata=1,ametadata=mode=print:key=lavfi.r128.true_peak:file=-",
            "-f",
            "null",
            "-",
        ])
        .output()
        .expect("ffmpeg runs");
    assert!(output.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let peak = text.lines().filter_map(|line| line.strip_prefix("lavfi.r128.true_peak=")).map(|value| value.parse::<f64>().expect("a number")).fold(0.0, f64::max);
    assert!(peak > 0.0, "ffmpeg printed no true peak: {text}");
    20.0 * peak.log10() - 20.0
}

/// The true peak of a WAV in dBTP by the `ebur128` crate, over the samples a reader gets.
pub fn crate_true_peak(path: &Path) -> f64 {
    let (spec, samples) = read_wav(path);
    let mut meter = ebur128::EbuR128::new(spec.channels.into(), spec.sample_rate, ebur128::Mode::TRUE_PEAK).unwrap();
    meter.add_frames_f32(&samples).unwrap();
    let peak = (0..u32::from(spec.channels)).map(|ch| meter.true_peak(ch).unwrap()).fold(0.0, f64::max);
    20.0 * peak.log10()
}

/// Where `scripts/test` unpacked the Debian packages of free recordings the engine tests use.
pub fn test_media() -> PathBuf {
    let dir = PathBuf::from(std::env::var("MIXD_TEST_MEDIA").expect("MIXD_TEST_MEDIA: run the tests with scripts/test, which fetches the recordings"));
    assert!(dir.join("usr/share/hydrogen/data/drumkits/GMRockKit/Kick-Hardest.wav").exists(), "{} lacks the hydrogen-data drum kit", dir.display());
    dir
}

/// POSTs `body` as JSON with the admin key: (status, envelope).
pub async fn post_json(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let response = app.client.post(app.url(path)).json(&body).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON envelope"))
}
