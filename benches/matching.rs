//! Reference mastering against Matchering 2.0.6, in the same run. `cargo bench --bench matching`
//! (figures in BENCHMARKS.md; `pip install matchering==2.0.6` first).
//!
//! Each asc-music track (`target/test-media`, which scripts/test unpacks) is mastered to sound
//! like another, by Matchering (`mg.process`, 24-bit WAV) and by `mixd mix --reference` (24-bit
//! WAV, its default -1 dBTP ceiling), from the same 44.1 kHz WAV copies. Both results are judged
//! the same way: the spectral error against the reference (RMS of the 1/3-octave band
//! differences after loudness normalisation, `mixd::audio::spectrum`), the loudness difference
//! and the true peak by ffmpeg's EBU R128 meter, and the wall time of the whole command, the
//! fastest of two runs each.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use mixd::audio::spectrum::spectral_error_db;
use mixd::audio::{self, MixObserver, Stage, StemSource};

const PAIRS: [(&str, &str); 3] = [("machine_wars", "frontiers"), ("frontiers", "time_to_strike"), ("time_to_strike", "machine_wars")];

struct Quiet;

impl MixObserver for Quiet {
    fn progress(&self, _: Stage, _: f64) {}
    fn is_cancelled(&self) -> bool {
        false
    }
}

fn main() {
    let media = std::env::var("MIXD_TEST_MEDIA").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-media"));
    let music = media.join("usr/share/games/asc/music");
    assert!(music.join("frontiers.mp3").is_file(), "{} holds no asc-music: run scripts/test once to unpack it", media.display());
    let version = Command::new("python3").args(["-c", "import matchering; print(matchering.__version__)"]).output().unwrap();
    assert!(version.status.success(), "Matchering is not installed: pip install matchering==2.0.6");
    let out = tempfile::tempdir().unwrap();
    let wav = |name: &str| {
        let path = out.path().join(format!("{name}.wav"));
        if !path.exists() {
            run(Command::new("ffmpeg")
                .args(["-nostdin", "-loglevel", "error", "-i"])
                .arg(music.join(format!("{name}.mp3")))
                .args(["-ar", "44100", "-c:a", "pcm_s16le"])
                .arg(&path));
        }
        path
    };
    println!("Matchering {}", String::from_utf8_lossy(&version.stdout).trim());
    println!();
    println!("| target → reference | tool | wall time | time ratio | spectral error | LU off the reference | true peak |");
    println!("|---|---|---|---|---|---|---|");
    for (target, reference) in PAIRS {
        let (target_wav, reference_wav) = (wav(target), wav(reference));
        let reference_levels = levels(&reference_wav);
        let reference_lufs = ffmpeg_loudness(&reference_wav).0;
        let before = spectral_error_db(&levels(&target_wav), &reference_levels).unwrap();
        let matchering_out = out.path().join("matchering.wav");
        let mixd_out = out.path().join("mixd.wav");
        let script = format!(
            "import matchering as mg; mg.log(print); mg.process(target={:?}, reference={:?}, results=[mg.pcm24({:?})])",
            target_wav.display().to_string(),
            reference_wav.display().to_string(),
            matchering_out.display().to_string()
        );
        let matchering = fastest(|| {
            let mut python = Command::new("python3");
            python.args(["-c", &script]);
            python
        });
        let ours = fastest(|| {
            let mut mixd = Command::new(common::server_binary());
            mixd.arg("mix").arg(&target_wav).arg("--reference").arg(&reference_wav).arg("-o").arg(&mixd_out).args(["--format", "wav"]);
            mixd
        });
        println!("| {target} → {reference} | (unmatched) | | | {before:.2} dB | | |");
        for (tool, file, seconds) in [("Matchering", &matchering_out, matchering), ("mixd", &mixd_out, ours)] {
            let error = spectral_error_db(&levels(file), &reference_levels).unwrap();
            let (lufs, peak) = ffmpeg_loudness(file);
            println!("| | {tool} | {seconds:.2} s | {:.2} | {error:.2} dB | {:+.2} | {peak:+.2} dBTP |", seconds / matchering, lufs - reference_lufs);
        }
    }
}

/// A file's loudness-normalised band levels.
fn levels(path: &Path) -> [Option<f64>; 28] {
    let stem = StemSource { id: String::new(), name: path.display().to_string(), path: path.to_path_buf() };
    audio::measure(&stem, true, &Quiet).unwrap().normalised_levels().unwrap()
}

/// ffmpeg's integrated loudness and true peak of a file.
fn ffmpeg_loudness(path: &Path) -> (f64, f64) {
    let output =
        Command::new("ffmpeg").args(["-nostdin", "-hide_banner", "-nostats", "-i"]).arg(path).args(["-af", "ebur128=peak=true", "-f", "null", "-"]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    let summary = &text[text.rfind("Summary:").expect("an ebur128 summary")..];
    let value_after = |label: &str| -> f64 {
        let at = summary.find(label).unwrap() + label.len();
        summary[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    (value_after("I:"), value_after("Peak:"))
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// The fastest of two runs of `command`, in seconds.
fn fastest(command: impl Fn() -> Command) -> f64 {
    (0..2)
        .map(|_| {
            let mut command = command();
            let start = Instant::now();
            run(&mut command);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
