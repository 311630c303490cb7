//! The engine checked against tools nobody here wrote: decoding against ffmpeg's decoders, the
//! master against ffmpeg's EBU R128 meter.

use std::path::Path;
use std::process::Command;

use mixd::audio::{self, AudioError, Format, FormatSettings, MixObserver, MixReport, MixSettings, Outputs, Stage, StemReader, StemSource, StereoBuffer};

use crate::helpers::{crate_true_peak, ffmpeg_loudness, ffmpeg_true_peak, make_audio, read_wav, test_media};

/// A stereo test signal with content across the band: two tones and a little noise.
const SOURCE: &str = "aevalsrc=0.4*sin(2*PI*441*t)+0.05*random(0)|0.3*sin(2*PI*1234*t+1)+0.05*random(1):s=44100:d=4";

struct Quiet;

impl MixObserver for Quiet {
    fn progress(&self, _: Stage, _: f64) {}
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// Mixes into a WAV alone at `output` (the other formats are `deliverables.rs`'s).
fn mix_wav(stems: &[StemSource], mut settings: MixSettings, output: &Path) -> MixReport {
    settings.output.formats = vec![FormatSettings::new(Format::Wav)];
    let outputs = Outputs::new(&settings.output.formats, |_| (output.to_path_buf(), output.with_file_name(".mix.partial")));
    let (report, delivered) = audio::mix(stems, &audio::plan(stems, settings).unwrap(), &outputs, &Quiet).unwrap();
    assert_eq!(delivered.len(), 1);
    report
}

fn decode(path: &Path) -> Result<StereoBuffer, AudioError> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut reader = StemReader::open(path, &name)?;
    let (mut all, mut chunk) = (StereoBuffer::default(), StereoBuffer::default());
    while reader.next_chunk(&mut chunk)? {
        all.left.extend_from_slice(&chunk.left);
        all.right.extend_from_slice(&chunk.right);
    }
    Ok(all)
}

/// ffmpeg's decode of a stereo file, as two planes.
fn ffmpeg_decode(path: &Path) -> StereoBuffer {
    let output =
        Command::new("ffmpeg").args(["-nostdin", "-loglevel", "error", "-i"]).arg(path).args(["-f", "f32le", "-acodec", "pcm_f32le", "-"]).output().expect("ffmpeg runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let samples: Vec<f32> = output.stdout.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    StereoBuffer { left: samples.iter().step_by(2).copied().collect(), right: samples.iter().skip(1).step_by(2).copied().collect() }
}

/// Signal-to-difference ratio in dB over the common length.
fn snr_db(reference: &[f32], test: &[f32]) -> f64 {
    let n = reference.len().min(test.len());
    let signal: f64 = reference[..n].iter().map(|&x| f64::from(x).powi(2)).sum();
    let noise: f64 = reference[..n].iter().zip(&test[..n]).map(|(&a, &b)| f64::from(a - b).powi(2)).sum();
    10.0 * (signal / noise.max(1e-30)).log10()
}

#[test]
fn every_format_decodes_like_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    // (file, ffmpeg encoder arguments, least SNR against ffmpeg's own decode of the same file)
    let cases: [(&str, &[&str], f64); 12] = [
        ("s16.wav", &["-c:a", "pcm_s16le"], 120.0),
        ("s24.wav", &["-c:a", "pcm_s24le"], 120.0),
        ("s32.wav", &["-c:a", "pcm_s32le"], 120.0),
        ("f32.wav", &["-c:a", "pcm_f32le"], 120.0),
        ("rf64.wav", &["-c:a", "pcm_s24le", "-rf64", "always"], 120.0),
        ("u8.wav", &["-c:a", "pcm_u8"], 120.0),
        ("x.flac", &["-c:a", "flac"], 120.0),
        ("x.aiff", &["-c:a", "pcm_s16be"], 120.0),
        ("alac.m4a", &["-c:a", "alac"], 120.0),
        ("x.mp3", &["-c:a", "libmp3lame", "-b:a", "192k"], 60.0),
        ("x.ogg", &["-c:a", "libvorbis", "-q:a", "5"], 60.0),
        ("aac.m4a", &["-c:a", "aac", "-b:a", "192k"], 40.0),
    ];
    for (name, args, least_snr) in cases {
        let path = make_audio(dir.path(), name, SOURCE, args);
        let ours = decode(&path).unwrap_or_else(|err| panic!("{name}: {err}"));
        let theirs = ffmpeg_decode(&path);
        let length_difference = ours.len().abs_diff(theirs.len());
        // Lossy decoders may differ by part of a packet at the very end.
        assert!(length_difference <= 1152, "{name}: {} frames vs ffmpeg's {}", ours.len(), theirs.len());
        for (a, b) in [(&theirs.left, &ours.left), (&theirs.right, &ours.right)] {
            let snr = snr_db(a, b);
            assert!(snr >= least_snr, "{name}: {snr:.1} dB against ffmpeg");
        }
        let info = audio::probe_stem(&path, name).unwrap();
        assert_eq!((info.sample_rate, info.channels), (44_100, 2), "{name}");
    }
}

#[test]
fn m4a_and_wav_copies_of_one_signal_line_up_to_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    // Clicks every 0.25 s: any misalignment shows as a shifted peak.
    let clicks = "aevalsrc=if(lt(mod(t\\,0.25)\\,0.002)\\,0.8*sin(2*PI*3000*t)\\,0):s=48000:d=3";
    let wav = decode(&make_audio(dir.path(), "c.wav", clicks, &["-ac", "2", "-c:a", "pcm_f32le"])).unwrap();
    let m4a = decode(&make_audio(dir.path(), "c.m4a", clicks, &["-ac", "2", "-c:a", "aac", "-b:a", "256k"])).unwrap();
    let best_lag = (-2048i64..=2048)
        .max_by(|&a, &b| {
            let score = |lag: i64| -> f64 {
                (0..wav.len() as i64 - 4096).step_by(3).filter_map(|n| m4a.left.get((n + lag).max(0) as usize).map(|&y| f64::from(wav.left[n as usize] * y))).sum()
            };
            score(a).total_cmp(&score(b))
        })
        .unwrap();
    assert_eq!(best_lag, 0, "the M4A copy is {best_lag} frames off the WAV");
}

#[test]
fn the_master_hits_loudness_targets_under_the_true_peak_ceiling_by_ffmpegs_meter() {
    let dir = tempfile::tempdir().unwrap();
    let stems = [
        ("drums.wav", "aevalsrc=0.9*sin(2*PI*60*t)*exp(-20*mod(t\\,0.5)):s=44100:d=8", vec!["-c:a", "pcm_s16le"]),
        ("bass.flac", "aevalsrc=0.5*sin(2*PI*55*t)|0.5*sin(2*PI*55*t):s=48000:d=8", vec!["-c:a", "flac"]),
        ("keys.mp3", "anoisesrc=c=pink:a=0.2:r=44100:d=8", vec!["-ac", "2", "-c:a", "libmp3lame"]),
    ];
    let sources: Vec<StemSource> =
        stems.iter().map(|(name, source, args)| StemSource { id: name.to_string(), name: name.to_string(), path: make_audio(dir.path(), name, source, args) }).collect();
    for (target, ceiling) in [(-23.0, -1.0), (-16.0, -1.0), (-14.0, -1.0), (-9.0, -1.0), (-14.0, -2.0)] {
        let mut settings = MixSettings::default();
        settings.master.target_lufs = Some(target);
        settings.master.true_peak_dbtp = ceiling;
        let output = dir.path().join(format!("mix{target}{ceiling}.wav"));
        let report = mix_wav(&sources, settings, &output);
        let (integrated, peak) = ffmpeg_loudness(&output);
        assert!((integrated - target).abs() <= 0.5, "target {target}: ffmpeg measures {integrated} LUFS");
        assert!(peak <= ceiling + 0.2, "ceiling {ceiling}: ffmpeg measures {peak} dBTP");
        let ours = report.loudness.integrated_lufs.unwrap();
        assert!((ours - integrated).abs() <= 0.2, "our meter {ours} vs ffmpeg {integrated}");
        assert_eq!((report.sample_rate, report.bit_depth, report.channels), (48_000, 24, 2));
        let (spec, samples) = read_wav(&output);
        assert_eq!((spec.sample_rate, spec.bits_per_sample, spec.channels), (48_000, 24, 2));
        assert!((samples.len() as f64 / 2.0 / 48_000.0 - report.duration_s).abs() < 1e-6);
    }
}

/// Runs ffmpeg with `args`, for test material it cannot make from a single lavfi source.
fn ffmpeg(args: &[&str]) {
    let output = Command::new("ffmpeg").args(["-nostdin", "-loglevel", "error", "-y"]).args(args).output().expect("ffmpeg runs");
    assert!(output.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Six seconds of a rock beat played on the real drum samples of Debian's hydrogen-data (GPL),
/// every hit at its hardest: dense transients with the inter-sample peaks recordings have.
fn drum_beat(media: &Path, out: &Path) {
    let kit = media.join("usr/share/hydrogen/data/drumkits/GMRockKit");
    let mut hits: Vec<(&str, u32)> = Vec::new();
    for beat in 0..12 {
        hits.push((if beat % 2 == 0 { "Kick-Hardest.wav" } else { "Snare-Hardest.wav" }, beat * 500));
        hits.push(("HatClosed-Hardest.wav", beat * 500 + 250));
    }
    hits.extend([("Crash-Hardest.wav", 0), ("Crash-Hardest.wav", 4000), ("Tom1-Hardest.wav", 5500)]);
    let mut args: Vec<String> = Vec::new();
    let mut graph = String::new();
    for (i, (sample, delay_ms)) in hits.iter().enumerate() {
        args.extend(["-i".to_string(), kit.join(sample).display().to_string()]);
        graph += &format!("[{i}:a]aformat=sample_fmts=fltp:sample_rates=44100:channel_layouts=stereo,adelay={delay_ms}|{delay_ms}[h{i}];");
    }
    graph += &(0..hits.len()).map(|i| format!("[h{i}]")).collect::<String>();
    graph += &format!("amix=inputs={}:normalize=0:duration=longest", hits.len());
    args.extend(["-filter_complex".to_string(), graph, "-t".to_string(), "6".to_string(), "-c:a".to_string(), "pcm_s24le".to_string(), out.display().to_string()]);
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn the_true_peak_ceiling_holds_on_recordings_and_adversarial_signals_at_every_rate_and_depth() {
    let media = test_media();
    let dir = tempfile::tempdir().unwrap();
    let song = media.join("usr/share/games/asc/music/machine_wars.mp3");
    let file = |name: &str| dir.path().join(name).display().to_string();
    drum_beat(&media, &dir.path().join("drums.wav"));
    ffmpeg(&["-ss", "40", "-t", "6", "-i", &song.display().to_string(), "-c:a", "flac", &file("music.flac")]);
    // The song driven 12 dB into the rails of 16 bits: a clipped master as uploads have them.
    ffmpeg(&["-ss", "90", "-t", "4", "-i", &song.display().to_string(), "-af", "volume=12dB", "-c:a", "pcm_s16le", &file("clipped.wav")]);
    // Bursts of 10 ms every half second over a quiet floor: reaching the target takes 8 dB or
    // more of gain, so every burst goes through the limiter.
    let burst = |signal: &str| format!("if(lt(mod(t\\,0.5)\\,0.01)\\,{signal}\\,0.001*random(0))");
    let square = burst("if(lt(mod(t*1000\\,1)\\,0.5)\\,1\\,-1)");
    make_audio(dir.path(), "square.wav", &format!("aevalsrc={square}:s=44100:d=3"), &["-c:a", "pcm_s16le"]);
    // Quarter-rate sines, sampled off their crests: every sample is 3 dB under the true peak.
    let (left, right) = (burst("sin(2*PI*12000*t+PI/4)"), burst("sin(2*PI*12000*t+PI/3)"));
    make_audio(dir.path(), "quarter48.wav", &format!("aevalsrc={left}|{right}:s=48000:d=3"), &["-c:a", "pcm_f32le"]);
    let (left, right) = (burst("0.9*sin(2*PI*11025*t+PI/4)"), burst("0.9*sin(2*PI*11025*t+3*PI/4)"));
    make_audio(dir.path(), "quarter44.wav", &format!("aevalsrc={left}|{right}:s=44100:d=3"), &["-c:a", "pcm_f32le"]);
    make_audio(dir.path(), "impulses.wav", "aevalsrc=if(eq(mod(n\\,11025)\\,0)\\,1\\,0)|if(eq(mod(n\\,11025)\\,7)\\,-1\\,0):s=44100:d=3", &["-c:a", "pcm_s16le"]);

    let stems = |names: &[&str]| -> Vec<StemSource> {
        names.iter().map(|name| StemSource { id: name.to_string(), name: name.to_string(), path: dir.path().join(name) }).collect()
    };
    // (stems, target LUFS): every target pushes the material well into the limiter.
    let cases = [
        (stems(&["drums.wav", "music.flac"]), -8.0),
        (stems(&["clipped.wav"]), -5.0),
        (stems(&["square.wav"]), -5.0),
        (stems(&["quarter48.wav", "quarter44.wav"]), -5.0),
        (stems(&["impulses.wav"]), -14.0),
    ];
    let ceiling = -1.0;
    let mut failures = Vec::new();
    for (sources, target) in &cases {
        for rate in [44_100u32, 48_000, 96_000] {
            for bits in [16u16, 24, 32] {
                let settings = MixSettings::from_json(
                    format!(r#"{{"master": {{"target_lufs": {target}, "true_peak_dbtp": {ceiling}}}, "output": {{"bit_depth": {bits}, "sample_rate": {rate}}}}}"#)
                        .as_bytes(),
                )
                .unwrap();
                let output = dir.path().join(format!("{}-{rate}-{bits}.wav", sources[0].id));
                let report = mix_wav(sources, settings, &output);
                let by_crate = crate_true_peak(&output);
                let by_ffmpeg = ffmpeg_true_peak(&output);
                let reported = report.loudness.true_peak_dbtp.unwrap();
                let line = format!("{} at {rate} Hz, {bits}-bit: ebur128 crate {by_crate:.4}, ffmpeg {by_ffmpeg:.4}, reported {reported:.4} dBTP", sources[0].id);
                // ffmpeg's reading resolves a thousandth of a dB.
                // The report is mixd's own reading, which never understates the crate's.
                if by_crate > ceiling || by_ffmpeg > ceiling + 0.001 || reported > ceiling || reported < by_crate - 1e-4 {
                    failures.push(line);
                } else {
                    eprintln!("{line}");
                }
            }
        }
    }
    assert!(failures.is_empty(), "over the ceiling of {ceiling} dBTP, or misreported:\n{}", failures.join("\n"));
}

#[test]
fn every_bit_depth_and_output_rate_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = make_audio(dir.path(), "a.wav", "sine=f=1000:r=48000:d=2", &[]);
    let stems = [StemSource { id: "a".into(), name: "a.wav".into(), path }];
    for (bits, rate) in [(16u16, 44_100u32), (24, 96_000), (32, 48_000)] {
        let settings = MixSettings::from_json(format!(r#"{{"output": {{"bit_depth": {bits}, "sample_rate": {rate}}}}}"#).as_bytes()).unwrap();
        let output = dir.path().join(format!("out{bits}.wav"));
        mix_wav(&stems, settings, &output);
        let (spec, samples) = read_wav(&output);
        assert_eq!((spec.bits_per_sample, spec.sample_rate), (bits, rate));
        assert_eq!(samples.len() as u32, 2 * 2 * rate, "two seconds, stereo");
    }
}

#[test]
fn offsets_and_auto_alignment_move_stems_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let noise = "anoisesrc=c=white:a=0.5:r=48000:d=4:seed=42";
    let reference = make_audio(dir.path(), "ref.wav", noise, &[]);
    // The same material starting 120 ms late.
    let late = make_audio(dir.path(), "late.wav", noise, &["-af", "adelay=120"]);
    let stems = [StemSource { id: "ref".into(), name: "ref.wav".into(), path: reference }, StemSource { id: "late".into(), name: "late.wav".into(), path: late }];
    let settings = MixSettings::from_json(br#"{"align": "auto", "tracks": {"ref.wav": {"offset_ms": 10}}}"#).unwrap();
    let report = mix_wav(&stems, settings, &dir.path().join("aligned.wav"));
    assert_eq!(report.stems[0].offset_ms, 10.0);
    assert!((report.stems[1].offset_ms - -120.0).abs() <= 1.0, "found {} ms", report.stems[1].offset_ms);
}

#[test]
fn bad_files_give_typed_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = make_audio(dir.path(), "good.wav", "sine=f=440:r=44100:d=2", &[]);
    let flac = make_audio(dir.path(), "good.flac", "sine=f=440:r=44100:d=2", &[]);
    let bytes = std::fs::read(&good).unwrap();
    let flac_bytes = std::fs::read(&flac).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.wav", Vec::new()),
        ("text.wav", b"this is not audio at all, just some text".repeat(20)),
        ("png.mp3", [b"\x89PNG\r\n\x1a\n".as_slice(), &[0u8; 512]].concat()),
        ("zip.flac", [b"PK\x03\x04".as_slice(), &[0u8; 512]].concat()),
        ("cut.wav", bytes[..bytes.len() / 3].to_vec()),
        ("header-only.wav", bytes[..44].to_vec()),
        ("cut.flac", flac_bytes[..flac_bytes.len() / 2].to_vec()),
        ("rf64.wav", [b"RF64\xff\xff\xff\xffWAVE".as_slice(), &bytes[12..]].concat()),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        match audio::probe_stem(&path, name) {
            Err(AudioError::Unsupported { stem, .. }) | Err(AudioError::Decode { stem, .. }) => assert_eq!(stem, name),
            other => panic!("{name}: expected a typed refusal, got {other:?}"),
        }
    }
    let truncated = audio::probe_stem(&dir.path().join("cut.wav"), "cut.wav").unwrap_err().to_string();
    assert!(truncated.contains("truncated") && truncated.contains("0.6"), "says where it stops: {truncated}");
}

#[test]
fn a_decoder_panic_found_by_the_fuzzer_becomes_a_typed_error() {
    // cargo fuzz found this input: symphonia 0.5.5's AAC decoder indexes past a 64-entry table.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-aac-decoder-panic.bin");
    match audio::probe_stem(&path, "fuzzed.m4a") {
        Err(AudioError::Decode { stem, reason }) => {
            assert_eq!(stem, "fuzzed.m4a");
            assert!(reason.contains("crashed"), "{reason}");
        }
        other => panic!("expected a contained decoder panic, got {other:?}"),
    }
}

#[test]
fn the_offline_command_mixes_with_a_report_and_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_audio(dir.path(), "a.wav", "sine=f=220:r=44100:d=2", &[]);
    let b = make_audio(dir.path(), "b.flac", "sine=f=330:r=48000:d=2", &[]);
    let output = dir.path().join("out.wav");
    let run =
        Command::new(env!("CARGO_BIN_EXE_mixd")).arg("mix").arg(&a).arg(&b).arg("-o").arg(&output).args(["--target-lufs", "-16", "--bit-depth", "16"]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("integrated") && stdout.contains("LUFS"), "{stdout}");
    let (integrated, _) = ffmpeg_loudness(&output);
    assert!((integrated + 16.0).abs() <= 0.5);

    let junk = dir.path().join("junk.wav");
    std::fs::write(&junk, "not audio").unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_mixd")).arg("mix").arg(&junk).arg("-o").arg(dir.path().join("x.wav")).output().unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("junk.wav"));
}

#[test]
fn the_offline_command_picks_formats_from_the_extension_or_format() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_audio(dir.path(), "a.wav", "sine=f=220:r=44100:d=2", &[]);
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("out")).collect();
        names.sort();
        names
    };
    let mix = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_mixd")).arg("mix").arg(&a).args(args).current_dir(dir.path()).output().unwrap();
    let run = mix(&["-o", "out.mp3"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(listing(), ["out.mp3"], "the MP3 alone, and no hidden WAV left");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count(), 0);
    let run = mix(&["-o", "out.wav", "--format", "flac,opus", "--format", "wav"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(listing(), ["out.flac", "out.mp3", "out.opus", "out.wav"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("out.opus (opus, 160 kbps)"), "{stdout}");
    let run = mix(&["-o", "out.aac"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("the extension names no format"), "{}", String::from_utf8_lossy(&run.stderr));
    let run = mix(&["-o", "out.wav", "--format", "wma"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("wma is not one of wav, flac, mp3, opus"));
}

/// Memory does not grow with the mix: a ten-minute mix at 48 kHz, whose bus alone is 222 MB of
/// f32, is made with the process's data capped at 64 MiB. RLIMIT_DATA counts every private
/// writable mapping, malloc's large ones included; the control shows the cap is enforced here.
#[test]
fn a_mix_whose_bus_is_far_larger_than_the_memory_cap_is_made_under_it() {
    const CAP_KIB: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let stem = make_audio(dir.path(), "a.wav", "sine=f=440:r=48000:d=2", &["-ac", "2"]);
    let settings = dir.path().join("settings.json");
    std::fs::write(&settings, r#"{"tracks": {"a.wav": {"offset_ms": 600000}}}"#).unwrap();
    let frames: u32 = 602 * 48_000;
    let bus_bytes = u64::from(frames) * 2 * 4;
    let capped = |script: &str| {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!("ulimit -d {CAP_KIB} && exec {script}"));
        command
    };

    let control = capped(&format!("dd if=/dev/zero of=/dev/null bs={bus_bytes} count=1")).output().unwrap();
    assert!(!control.status.success(), "a buffer the size of the bus is refused under the cap");

    let output = dir.path().join("out.wav");
    let run = capped(r#""$0" mix "$1" -o "$2" --settings "$3" --bit-depth 16"#).arg(env!("CARGO_BIN_EXE_mixd")).arg(&stem).arg(&output).arg(&settings).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let reader = hound::WavReader::open(&output).unwrap();
    assert_eq!((reader.spec().sample_rate, reader.duration()), (48_000, frames));
}
