//! A corpus of malformed inputs made from real files, each uploaded to a live server: every one
//! is refused with its code and a message naming it (or, where damaged audio data still decodes,
//! accepted and then mixed to completion: which ones is stated per case), nothing is left behind, and a good mix still
//! completes beside them.

use std::path::PathBuf;

use serde_json::Value;

use crate::helpers::{make_audio, spawn_app};
use crate::stems::walk;

struct Case {
    name: String,
    bytes: Vec<u8>,
    /// Whether the file is accepted. Damaged audio data can still decode: PCM has no structure
    /// to break, and MP3 and AAC skip an isolated bad packet; FLAC's checksums, Vorbis and ALAC
    /// refuse it. An accepted file must then mix cleanly.
    decodes: bool,
}

fn wav_with(header_patch: impl Fn(&mut Vec<u8>), base: &[u8]) -> Vec<u8> {
    let mut bytes = base.to_vec();
    header_patch(&mut bytes);
    bytes
}

fn corpus(dir: &std::path::Path) -> Vec<Case> {
    let source = "sine=f=440:r=44100:d=3";
    let formats: [(&str, &[&str]); 7] = [
        ("wav", &[]),
        ("flac", &[]),
        ("mp3", &["-c:a", "libmp3lame"]),
        ("ogg", &["-c:a", "libvorbis"]),
        ("m4a", &["-c:a", "aac"]),
        ("alac.m4a", &["-c:a", "alac"]),
        ("aiff", &[]),
    ];
    let mut cases = Vec::new();
    for (extension, args) in formats {
        let base = std::fs::read(make_audio(dir, &format!("base.{extension}"), source, args)).unwrap();
        let case = |label: &str, bytes: Vec<u8>, decodes: bool| Case { name: format!("{label}.{extension}"), bytes, decodes };
        cases.push(case("empty", Vec::new(), false));
        for percent in [1, 10, 33, 50, 90] {
            cases.push(case(&format!("cut-at-{percent}pct"), base[..base.len() * percent / 100].to_vec(), false));
        }
        let mut header = base.clone();
        header[..16].copy_from_slice(b"\x00garbage-header\x00");
        cases.push(case("bad-header", header, false));
        let mut frames = base.clone();
        let middle = frames.len() / 2;
        frames[middle..middle + 512].iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8).wrapping_mul(37) ^ 0xA5);
        cases.push(case("bad-frames", frames, matches!(extension, "wav" | "aiff" | "mp3" | "m4a")));
    }
    let wav = std::fs::read(make_audio(dir, "plain.wav", source, &[])).unwrap();
    let put_u32 = |offset: usize, value: u32| move |bytes: &mut Vec<u8>| bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    let put_u16 = |offset: usize, value: u16| move |bytes: &mut Vec<u8>| bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    let absurd = [
        ("rate-zero", wav_with(put_u32(24, 0), &wav)),
        ("rate-max", wav_with(put_u32(24, u32::MAX), &wav)),
        ("rate-1hz", wav_with(put_u32(24, 1), &wav)),
        ("channels-zero", wav_with(put_u16(22, 0), &wav)),
        ("channels-1000", wav_with(put_u16(22, 1000), &wav)),
        ("data-length-huge", wav_with(put_u32(40, 0xFFFF_FFF0), &wav)),
        ("bits-zero", wav_with(put_u16(34, 0), &wav)),
        ("rf64", wav_with(|b| b[..4].copy_from_slice(b"RF64"), &wav)),
    ];
    for (label, bytes) in absurd {
        cases.push(Case { name: format!("{label}.wav"), bytes, decodes: false });
    }
    // Streaming writers leave the RIFF size wrong; the data chunk is intact, so this one plays.
    cases.push(Case { name: "riff-length-huge.wav".into(), bytes: wav_with(put_u32(4, 0xFFFF_FFF0), &wav), decodes: true });
    let others: [(&str, Vec<u8>); 5] = [
        ("lyrics.wav", b"Verse one\nChorus\nVerse two\n".repeat(50)),
        ("archive.flac", [b"PK\x03\x04\x14\x00\x00\x00\x08\x00".as_slice(), &[0x42; 4096]].concat()),
        ("cover.mp3", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".as_slice(), &[0x11; 4096]].concat()),
        ("photo.ogg", [b"\xff\xd8\xff\xe0\x00\x10JFIF\x00".as_slice(), &[0x22; 4096]].concat()),
        ("random.m4a", (0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
    ];
    for (name, bytes) in others {
        cases.push(Case { name: name.to_string(), bytes, decodes: false });
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_malformed_inputs_are_refused_cleanly_and_nothing_else_is_affected() {
    let app = spawn_app().await;
    let cases = corpus(app.fixtures.path());
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let good = make_audio(app.fixtures.path(), "good.wav", "sine=f=220:r=48000:d=4", &[]);
    assert_eq!(app.upload("good", &[&good]).await.0, 201);
    let (_, good_job) = app.start_mix("good", None).await;

    let mut accepted: Vec<String> = Vec::new();
    for case in &cases {
        let path: PathBuf = app.fixtures.path().join(&case.name);
        std::fs::write(&path, &case.bytes).unwrap();
        let project = format!("bad-{}", accepted.len());
        let (status, body) = app.upload(&project, &[&path]).await;
        match (status, case.decodes) {
            (415, false) => {
                assert_eq!(body["error"], "UNSUPPORTED_AUDIO", "{}", case.name);
                let message = body["message"].as_str().unwrap();
                assert!(message.contains(&case.name), "{}: the message names the file: {message}", case.name);
            }
            (201, true) => {
                accepted.push(project.clone());
                // It decoded to its end when it was uploaded, so it mixes to the end.
                let (_, started) = app.start_mix(&project, None).await;
                let statuses = app.follow_job(&project, started["data"]["job_id"].as_str().unwrap()).await;
                let last: &Value = statuses.last().unwrap();
                assert_eq!(last["state"], "complete", "{}: {last}", case.name);
            }
            _ => panic!("{}: {status} {body}", case.name),
        }
    }
    let statuses = app.follow_job("good", good_job["data"]["job_id"].as_str().unwrap()).await;
    assert_eq!(statuses.last().unwrap()["state"], "complete");
    assert_eq!(app.get_json("/healthz").await.0, 200);
    let partials: Vec<_> = walk(app.data_dir.path()).into_iter().filter(|p| p.to_string_lossy().ends_with(".partial")).collect();
    assert!(partials.is_empty(), "{partials:?}");
    assert_eq!(accepted.len(), 5, "the cases that decode despite the damage");
}
