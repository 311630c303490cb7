//! The deliverables against ffmpeg's encoders, in the same run. `cargo bench --bench
//! deliverables` (figures in BENCHMARKS.md).
//!
//! The asc-music tracks frontiers and time_to_strike (`target/test-media`, which scripts/test
//! unpacks) mixed by `mixd mix`: first to the WAV alone, then with each format beside it. What a
//! format adds to the mix (its encode, and for the lossy formats the decode and measurement that
//! check the ceiling) is set against ffmpeg encoding that mix's own WAV at the same settings:
//! `flac` at its default level, `libmp3lame` at 320 kbps CBR, `libopus` at 160 kbps. Each
//! command runs three times and the fastest counts: the machine is noisy, so read the ratios.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn main() {
    let media = std::env::var("MIXD_TEST_MEDIA").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-media"));
    let music = media.join("usr/share/games/asc/music");
    let stems = [music.join("frontiers.mp3"), music.join("time_to_strike.mp3")];
    assert!(stems.iter().all(|stem| stem.is_file()), "{} holds no asc-music: run scripts/test once to unpack it", media.display());
    let out = tempfile::tempdir().unwrap();
    let wav = out.path().join("mix.wav");

    let wav_only = fastest(|| mix(&stems, &wav, "wav"));
    let seconds = hound::WavReader::open(&wav).map(|reader| f64::from(reader.duration()) / f64::from(reader.spec().sample_rate)).unwrap();
    println!("A mix of {seconds:.0} s; the WAV alone: {wav_only:.2} s");
    println!();
    println!("| format | mixd adds | ffmpeg encode | ratio | bytes per minute |");
    println!("|---|---|---|---|---|");
    let references: [(&str, &[&str]); 3] =
        [("flac", &["-c:a", "flac"]), ("mp3", &["-c:a", "libmp3lame", "-ar", "44100", "-b:a", "320k"]), ("opus", &["-c:a", "libopus", "-b:a", "160k"])];
    for (format, args) in references {
        let with = fastest(|| mix(&stems, &wav, &format!("wav,{format}")));
        let bytes = std::fs::metadata(out.path().join(format!("mix.{format}"))).unwrap().len();
        let reference_out = out.path().join(format!("ffmpeg.{format}"));
        let reference = fastest(|| {
            let mut ffmpeg = Command::new("ffmpeg");
            ffmpeg.args(["-nostdin", "-loglevel", "error", "-y", "-i"]).arg(&wav).args(args).arg(&reference_out);
            ffmpeg
        });
        let adds = with - wav_only;
        println!("| {format} | {adds:.2} s | {reference:.2} s | {:.2} | {:.0} |", adds / reference, bytes as f64 * 60.0 / seconds);
    }
    let wav_and_opus = fastest(|| mix(&stems, &wav, "wav,opus"));
    println!();
    println!("A mix with wav+opus: {wav_and_opus:.2} s, {:.2}x the WAV-only mix", wav_and_opus / wav_only);
}

fn mix(stems: &[PathBuf], out: &Path, formats: &str) -> Command {
    let mut mixd = Command::new(common::server_binary());
    mixd.arg("mix").args(stems).arg("-o").arg(out).args(["--format", formats]);
    mixd
}

/// The fastest of three runs of `command`, in seconds.
fn fastest(command: impl Fn() -> Command) -> f64 {
    (0..3)
        .map(|_| {
            let mut command = command();
            let start = Instant::now();
            let output = command.output().unwrap();
            assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
