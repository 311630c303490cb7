//! The engine against ffmpeg, in the same run. `cargo bench --bench engine` (figures in
//! BENCHMARKS.md).
//!
//! Each side runs as its own process under `/usr/bin/time`, so peak RSS is that process alone.
//! Stems are WAV (stereo, 44.1 kHz, so both resample; plain 2-channel WAV carries no layout, so
//! ffmpeg is told it is stereo), made once by ffmpeg and kept in `target/bench-stems`.
//!
//! 1. Speed: `mixd mix` (decode, resample to 48 kHz, sum, master to -14 LUFS under -1 dBTP,
//!    24-bit WAV) against ffmpeg decoding the same files and nothing else (`ffmpeg -i each -f
//!    null -`), the floor any mixer stands on; and against ffmpeg's closest full chain (`amix`,
//!    `loudnorm` to -14 LUFS / -1 dBTP, 24-bit WAV).
//! 2. A typical user's mix: every track with an EQ band and a compressor, a master compressor,
//!    24-bit WAV at the stems' 44.1 kHz (and then with its Opus file), 8 and 32 stems of 180 s,
//!    as WAV and as FLAC (where decoding is real work, as with most uploads), against ffmpeg
//!    decoding the same files two at a time (`xargs -P 2`: both cores, as a decoder would use
//!    them). MIXD_BENCH_TYPICAL=1 runs this part alone.
//! 3. Memory against length: the same stems at 5, 30 and 60 minutes, and 16 stems of two hours (one
//!    file, listed 16 times: every listing is its own decoder and track). Skipped with
//!    MIXD_BENCH_QUICK=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let quick = std::env::var("MIXD_BENCH_QUICK").is_ok();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-stems");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.wav");
    if std::env::var("MIXD_BENCH_TYPICAL").is_ok() {
        typical_mixes(&dir, &out, false);
        return;
    }

    println!("| stems | length | mixd wall | ffmpeg decode-only wall | ratio | ffmpeg amix+loudnorm wall | ratio | mixd peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    let cases: &[(usize, u32)] = if quick { &[(8, 30)] } else { &[(2, 30), (8, 30), (8, 180), (32, 180)] };
    for &(count, seconds) in cases {
        let stems: Vec<PathBuf> = (0..count).map(|i| stem(&dir, i, seconds)).collect();
        let (mixd_wall, mixd_rss) = timed(mixd(&stems, &out));
        let mut decode = Command::new("sh");
        decode.arg("-c").arg("for stem in \"$@\"; do ffmpeg -nostdin -loglevel error -i \"$stem\" -f null - || exit 1; done").arg("sh").args(&stems);
        let (decode_wall, _) = timed(decode);
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
        let (ffmpeg_wall, _) = timed(ffmpeg);
        println!(
            "| {count} | {seconds} s | {mixd_wall:.2} s | {decode_wall:.2} s | {:.2} | {ffmpeg_wall:.2} s | {:.2} | {:.0} MB |",
            mixd_wall / decode_wall,
            mixd_wall / ffmpeg_wall,
            mixd_rss / 1024.0
        );
    }

    typical_mixes(&dir, &out, quick);
    if quick {
        return;
    }

    println!();
    println!("| stems | length | mixd wall | mixd peak RSS | RSS against the 5-minute mix |");
    println!("|---|---|---|---|---|");
    let mut five_minutes = None;
    for &(count, seconds) in &[(8usize, 300u32), (8, 1800), (8, 3600), (16, 7200)] {
        // One file per length, listed `count` times, keeps the disk use to one stem.
        let stems: Vec<PathBuf> = vec![stem(&dir, 0, seconds); count];
        let (wall, rss) = timed(mixd(&stems, &out));
        let base = *five_minutes.get_or_insert(rss);
        println!("| {count} | {} min | {wall:.1} s | {:.0} MB | {:.2}x |", seconds / 60, rss / 1024.0, rss / base);
    }
    let _ = std::fs::remove_file(&out);
}

/// The typical user's mix (part 2) against ffmpeg decode-only, two stems at a time.
fn typical_mixes(dir: &Path, out: &Path, quick: bool) {
    println!();
    println!("| typical mix: stems | stem format | length | formats | mixd wall | ffmpeg decode-only, two at a time | ratio | mixd peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    let typical: &[(usize, &str, &str)] =
        if quick { &[(8, "wav", "wav")] } else { &[(8, "wav", "wav"), (8, "flac", "wav"), (8, "wav", "wav,opus"), (32, "wav", "wav"), (32, "flac", "wav")] };
    for &(count, stem_format, formats) in typical {
        let seconds = 180;
        let stems: Vec<PathBuf> = (0..count)
            .map(|i| match stem_format {
                "flac" => flac_stem(dir, i, seconds),
                _ => stem(dir, i, seconds),
            })
            .collect();
        let settings = dir.join(format!("typical-{count}-{stem_format}.json"));
        std::fs::write(&settings, typical_settings(&stems).to_string()).unwrap();
        let mut mixd = mixd_with(&stems, out, formats);
        mixd.arg("--settings").arg(&settings);
        let (mixd_wall, mixd_rss) = timed(mixd);
        let mut decode = Command::new("sh");
        decode.arg("-c").arg("printf '%s\\0' \"$@\" | xargs -0 -P 2 -I{} ffmpeg -nostdin -loglevel error -i {} -f null -").arg("sh").args(&stems);
        let (decode_wall, _) = timed(decode);
        println!(
            "| {count} | {stem_format} | {seconds} s | {formats} | {mixd_wall:.2} s | {decode_wall:.2} s | {:.2} | {:.0} MB |",
            mixd_wall / decode_wall,
            mixd_rss / 1024.0
        );
    }
}

fn mixd(stems: &[PathBuf], out: &Path) -> Command {
    let mut mixd = Command::new(common::server_binary());
    mixd.arg("mix").args(stems).arg("-o").arg(out).args(["--rate", "48000", "--target-lufs", "-14", "--true-peak", "-1"]);
    mixd
}

/// A typical mix at the stems' own rate, into `formats`.
fn mixd_with(stems: &[PathBuf], out: &Path, formats: &str) -> Command {
    let mut mixd = Command::new(common::server_binary());
    mixd.arg("mix").args(stems).arg("-o").arg(out).args(["--format", formats, "--bit-depth", "24", "--target-lufs", "-14", "--true-peak", "-1"]);
    mixd
}

/// Every track with a presence bump and a compressor, and the bus compressed gently.
fn typical_settings(stems: &[PathBuf]) -> serde_json::Value {
    let track = serde_json::json!({
        "eq": [{"type": "peak", "freq_hz": 2500, "q": 1.0, "gain_db": 2.0}],
        "compressor": {"threshold_db": -20, "ratio": 3, "attack_ms": 10, "release_ms": 120, "makeup_db": 2}
    });
    let tracks: serde_json::Map<String, serde_json::Value> = stems.iter().map(|stem| (stem.file_name().unwrap().to_string_lossy().into_owned(), track.clone())).collect();
    serde_json::json!({
        "tracks": tracks,
        "master": {"compressor": {"threshold_db": -12, "ratio": 2, "attack_ms": 30, "release_ms": 250, "makeup_db": 0}}
    })
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

/// The same stem as 16-bit FLAC (ffmpeg's default level), made once.
fn flac_stem(dir: &Path, index: usize, seconds: u32) -> PathBuf {
    let path = dir.join(format!("stem-{index}-{seconds}s.flac"));
    if !path.exists() {
        let status = Command::new("ffmpeg")
            .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
            .arg(stem(dir, index, seconds))
            .args(["-c:a", "flac"])
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
