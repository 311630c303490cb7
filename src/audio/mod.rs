//! The mix engine: pure DSP over plain buffers and settings. Nothing here knows about HTTP, jobs
//! or tokio; callers see progress and cancellation through [`MixObserver`].
//!
//! A mix walks the [`Stage`]s in order, and streams: `loading_stems` opens and probes every stem,
//! `aligning_stems` reads only the stems' first seconds, `processing_tracks` renders the bus a
//! segment at a time (every track decoded, resampled and processed as it goes) through the master
//! strip into a spill file and a small summary, and `mastering` solves gain and limiter on the
//! summary and writes the WAV from the spill. Memory holds a few segments and each track's decode
//! state: it grows with neither the length of the mix nor, beyond that state, its stems.

mod align;
mod analysis;
mod buffer;
mod container;
mod decode;
mod deliver;
mod downmix;
mod dsp;
mod export;
mod loudness;
mod master;
mod matching;
mod pipeline;
mod render;
mod resample;
mod settings;
pub mod spectrum;
mod true_peak;

use std::path::PathBuf;

pub use analysis::{analyse, Analysis};
pub use buffer::StereoBuffer;
pub use decode::{probe_stem, StemInfo, StemReader, MAX_PROBE_TIME};
pub use deliver::{Delivered, OutputFile, Outputs};
pub use master::Loudness;
pub use matching::{measure, Sound};
pub use pipeline::{mix, plan, MixReport, ReferenceReport, StemReport};
pub use settings::{
    AlignMode, AutoSettings, BitDepth, CompressorSettings, EqBand, EqType, Format, FormatSettings, MasterSettings, MixSettings, OutputSettings, SettingsError,
    TrackSettings, ValidSettings,
};

/// Whether the processor has AVX2 and FMA (every x86-64 since 2013): the instruction set of the
/// engine's vector paths. Their arithmetic is fused (`mul_add`), which elsewhere is a library
/// call, exactly rounded as the instruction is, so every machine computes the same bits.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether the processor has AVX-512F as well: the loops that are bound by how much they issue
/// (the true-peak detector's taps, the 24-bit rounding) run sixteen lanes wide there.
#[cfg(target_arch = "x86_64")]
fn has_avx512_fma() -> bool {
    has_avx2_fma() && std::arch::is_x86_feature_detected!("avx512f")
}

/// A stem to mix: its identity and where its file is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StemSource {
    pub id: String,
    /// The original file name; track settings may be keyed by it.
    pub name: String,
    pub path: PathBuf,
}

/// The engine's stages, in the order a mix walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    LoadingStems,
    AligningStems,
    ProcessingTracks,
    Mixing,
    Mastering,
    Exporting,
}

impl Stage {
    /// The share of a whole job's 0-100 progress this stage spans, by its typical cost.
    pub fn percent_span(self) -> (f64, f64) {
        match self {
            Stage::LoadingStems => (2.0, 5.0),
            Stage::AligningStems => (5.0, 8.0),
            // Pass one of the master: decoding, track processing and the sum, spilled.
            Stage::ProcessingTracks => (8.0, 65.0),
            Stage::Mixing => (65.0, 66.0),
            // The gain solve and pass two, which writes the file.
            Stage::Mastering => (66.0, 90.0),
            // The files beside the WAV: encoding each, and reading it back to measure.
            Stage::Exporting => (90.0, 99.0),
        }
    }

    /// Overall progress (0-100) when `fraction` of this stage is done.
    pub fn percent(self, fraction: f64) -> f64 {
        let (start, end) = self.percent_span();
        start + (end - start) * fraction.clamp(0.0, 1.0)
    }

    pub fn label(self) -> &'static str {
        match self {
            Stage::LoadingStems => "Loading stems",
            Stage::AligningStems => "Aligning stems",
            Stage::ProcessingTracks => "Processing tracks",
            Stage::Mixing => "Mixing",
            Stage::Mastering => "Mastering",
            Stage::Exporting => "Exporting",
        }
    }
}

/// What a running mix reports to, and asks whether to stop. Called from worker threads, often:
/// implementations should be cheap and must not block.
pub trait MixObserver: Sync {
    /// `fraction` (0..=1) of `stage` is done. Never decreases within a stage.
    fn progress(&self, stage: Stage, fraction: f64);
    fn is_cancelled(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("There are no stems to mix")]
    NoStems,
    #[error("Stem \"{stem}\" cannot be opened: {source}")]
    Open {
        stem: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Stem \"{stem}\" is not supported audio: {reason}")]
    Unsupported { stem: String, reason: String },
    #[error("Stem \"{stem}\" failed to decode: {reason}")]
    Decode { stem: String, reason: String },
    #[error("Invalid settings: {0}")]
    Settings(#[from] SettingsError),
    #[error("The mix would last {seconds:.0} s; a WAV file at this rate and bit depth holds at most {max_seconds:.0} s")]
    TooLong { seconds: f64, max_seconds: f64 },
    #[error("The mix was canceled")]
    Canceled,
    #[error("Writing the mix failed: {0}")]
    Export(#[source] std::io::Error),
    #[error("Encoding the {format} file failed: {reason}")]
    Encode { format: &'static str, reason: String },
    #[error("Internal engine error: {0}")]
    Internal(String),
}

impl AudioError {
    fn unsupported(stem: &str, reason: impl Into<String>) -> Self {
        AudioError::Unsupported { stem: stem.to_string(), reason: reason.into() }
    }
}

/// What a caught panic said. `panic!` with a literal carries a `&str`, with format arguments a
/// `String`; anything else has no message to show. Pass the payload itself (`&*boxed`): a
/// `&Box<dyn Any + Send>` would coerce to an `Any` that is the box.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic with no message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_come_out_of_either_payload() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        assert_eq!(panic_message(&*caught(|| panic!("a literal"))), "a literal");
        assert_eq!(panic_message(&*caught(|| panic!("formatted {}", 42))), "formatted 42");
        assert_eq!(panic_message(&*caught(|| std::panic::panic_any(7u8))), "a panic with no message");
    }
}
