//! Any bytes, as an uploaded stem: probing and decoding must end in Ok or a typed error, never a
//! panic that escapes, a hang, or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("mixd-fuzz-{}.bin", std::process::id()));
    std::fs::write(&path, data).expect("the temp dir is writable");
    let _ = mixd::audio::probe_stem(&path, "fuzz.bin");
});
