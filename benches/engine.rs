//! The engine against ffmpeg, in the same run: wall time and peak memory as stems go 2 → 8 → 32
//! and length 30 s → 10 min. `cargo bench --bench engine` (figures in BENCHMARKS.md).
//!
//! Each side runs as its own process under `/usr/bin/time`, so peak RSS is that process alone:
//! `mixd mix` (decode, resample to 48 kHz, sum, master to -14 LUFS under -1 dBTP, 24-bit WAV) and
//! ffmpeg doing the closest chain it has (`amix`, `loudnorm` to -14 LUFS / -1 dBTP, 24-bit WAV).
//! Stems are WAV (stereo, 44.1 kHz, so both resample; plain 2-channel WAV carries no layout, so
//! ffmpeg is told it is stereo), made once by ffmpeg and kept in
//! `target/bench-stems`. Set MIXD_BENCH_QUICK=1 to skip the 10-minute cases.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let quick = std::env::var("MIXD_BENCH_QUICK").is_ok();
    let cases: &[(usize, u32)] = if quick { &[(2, 30), (8, 30)] } else { &[(2, 30), (8, 30), (32, 30), (8, 180), (8, 600), (32, 600)] };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-stems");
    std::fs::create_dir_all(&dir).unwrap();
    println!("| stems | length | mixd wall | mixd peak RSS | ffmpeg wall | ffmpeg peak RSS | wall ratio (mixd/ffmpeg) | mixd RSS per input MB |");
    println!("|---|---|---|---|---|---|---|---|");
    for &(count, seconds) in cases {
        let stems: Vec<PathBuf> = (0..count).map(|i| stem(&dir, i, seconds)).collect();
        let input_mb: f64 = stems.iter().map(|s| std::fs::metadata(s).unwrap().len() as f64).sum::<f64>() / 1e6;
        let out = dir.join("out.wav");
        let mut mixd = Command::new(env!("CARGO_BIN_EXE_mixd"));
        mixd.arg("mix").args(&stems).arg("-o").arg(&out).args(["--rate", "48000", "--target-lufs", "-14", "--true-peak", "-1"]);
        let (mixd_wall, mixd_rss) = timed(mixd);
        let mut ffmpeg = Command::new("ffmpeg");
        ffmpeg.args(["-nostdin", "-loglevel", "error", "-y"]);
        for stem in &stems {
            ffmpeg.arg("-i").arg(stem);
        }
        ffmpeg
            .arg("-filter_complex")
            .arg(format!("amix=inputs={count}:normalize=0,loudnorm=I=-14:TP=-1:LRA=20,aresample=48000,aformat=channel_layouts=stereo"))
            .args(["-c:a", "pcm_s24le"])
            .arg(&out);
        let (ffmpeg_wall, ffmpeg_rss) = timed(ffmpeg);
        println!(
            "| {count} | {seconds} s | {mixd_wall:.2} s | {:.0} MB | {ffmpeg_wall:.2} s | {:.0} MB | {:.2} | {:.2} |",
            mixd_rss / 1024.0,
            ffmpeg_rss / 1024.0,
            mixd_wall / ffmpeg_wall,
            mixd_rss / 1024.0 / input_mb
        );
    }
}

/// A stereo 44.1 kHz WAV stem with content across the band, made once.
fn stem(dir: &Path, index: usize, seconds: u32) -> PathBuf {
    let path = dir.join(format!("stem-{index}-{seconds}s.wav"));
    if !path.exists() {
        let source = format!(
            "aevalsrc=0.3*sin(2*PI*{f}*t)*(0.6+0.4*sin(2*PI*0.5*t))+0.05*random(0)|0.3*sin(2*PI*{f}*1.01*t)+0.05*random(1):s=44100:d={seconds}",
            f = 55 * (index + 1)
        );
        let status = Command::new("ffmpeg")
            .args(["-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", &source, "-ac", "2", "-c:a", "pcm_s16le"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
    path
}

/// Wall seconds and peak RSS (KiB) of a command, from GNU time.
fn timed(command: Command) -> (f64, f64) {
    let report = tempfile::NamedTempFile::new().unwrap();
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let status = Command::new("/usr/bin/time").args(["-f", "%e %M", "-o"]).arg(report.path()).arg(program).args(args).status().unwrap();
    assert!(status.success(), "{command:?} failed");
    let text = std::fs::read_to_string(report.path()).unwrap();
    let mut fields = text.split_whitespace();
    (fields.next().unwrap().parse().unwrap(), fields.next().unwrap().parse().unwrap())
}
