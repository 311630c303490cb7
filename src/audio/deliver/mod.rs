//! The files a mix is delivered in, beside the WAV: FLAC, MP3 and Opus, each encoded by the
//! field's library for it (libFLAC, LAME, libopus in Ogg), written under a temporary name and
//! renamed into place only once whole, the lossy ones measured as a decoder reads them back.
//!
//! Lossy coding moves peaks: a master at the ceiling decodes over it. So a lossy file is made from
//! the master's own pass two with its limiter held lower by a margin (and the gain solved again so
//! that the loudness stays), decoded, and measured; were it still over the ceiling, or off the
//! WAV's loudness, it is made again with the limit lowered by what it was over ([`super::master`]).

mod flac;
mod mp3;
mod opus;

use std::path::{Path, PathBuf};

use super::buffer::{StereoBuffer, BLOCK};
use super::decode::StemReader;
use super::dsp::gain_to_db;
use super::loudness::LoudnessMeter;
use super::settings::{Format, FormatSettings};
use super::true_peak::PeakDetector;
use super::AudioError;

pub(super) use flac::encode_wav;

/// Where one delivered file goes: written at `temporary` (a name the caller owns, in the same
/// directory), renamed to `path` once whole.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFile {
    pub format: FormatSettings,
    pub path: PathBuf,
    pub temporary: PathBuf,
}

/// Every file of a mix. The WAV is the master every other file comes from: it is written (at
/// `master`) even when it is not among `files`, and is then the caller's to remove.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    pub master: PathBuf,
    pub master_temporary: PathBuf,
    /// In the order asked; a WAV among them is the file at `master`.
    pub files: Vec<OutputFile>,
}

impl Outputs {
    /// `master` and its temporary, and the other formats beside it, named by `name(format)`:
    /// each a path and a temporary.
    pub fn new(formats: &[FormatSettings], name: impl Fn(Format) -> (PathBuf, PathBuf)) -> Self {
        let (master, master_temporary) = name(Format::Wav);
        let files = formats
            .iter()
            .map(|format| {
                let (path, temporary) = name(format.format);
                OutputFile { format: *format, path, temporary }
            })
            .collect();
        Self { master, master_temporary, files }
    }

    /// Removes every file of the mix that is in place (each temporary removes itself).
    pub(super) fn remove_all(&self) {
        for path in std::iter::once(&self.master).chain(self.files.iter().map(|file| &file.path)) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A delivered file, measured as a decoder reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub format: Format,
    /// `None` for the lossless formats.
    pub bitrate_kbps: Option<u32>,
    pub bytes: u64,
    pub duration_s: f64,
    pub integrated_lufs: Option<f64>,
    pub true_peak_dbtp: Option<f64>,
}

/// A lossy encoder: segments of the master at the mix's rate in, a file out.
pub(super) trait LossyEncoder {
    fn write(&mut self, segment: &StereoBuffer) -> Result<(), AudioError>;
    /// Flushes, completes the file's headers and fsyncs it; returns the file measured as its
    /// decoder reads it back. Failing, it removes the file.
    fn finish(self: Box<Self>) -> Result<Measured, AudioError>;
}

pub(super) fn lossy_encoder(format: FormatSettings, rate: u32, temporary: &Path) -> Result<Box<dyn LossyEncoder>, AudioError> {
    let kbps = format.bitrate().unwrap_or_default();
    match format.format {
        Format::Mp3 => Ok(Box::new(mp3::Mp3Encoder::create(temporary, rate, kbps)?)),
        Format::Opus => Ok(Box::new(opus::OpusEncoder::create(temporary, rate, kbps)?)),
        Format::Wav | Format::Flac => Err(AudioError::Internal(format!("{} is not a lossy format", format.format.extension()))),
    }
}

/// What a decoder reads back from a file: its length and rate, loudness and true peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Measured {
    pub frames: u64,
    pub rate: u32,
    pub integrated_lufs: Option<f64>,
    /// Linear.
    pub peak: f32,
}

impl Measured {
    pub fn delivered(&self, format: FormatSettings, bytes: u64) -> Delivered {
        let finite = |value: f64| value.is_finite().then_some(value);
        Delivered {
            format: format.format,
            bitrate_kbps: format.bitrate(),
            bytes,
            duration_s: self.frames as f64 / f64::from(self.rate),
            integrated_lufs: self.integrated_lufs,
            true_peak_dbtp: finite(gain_to_db(f64::from(self.peak))),
        }
    }
}

/// Decodes `path` as `format` and measures it: MP3 through symphonia with the LAME tag's delay
/// and padding trimmed, Opus through libopus with its pre-skip and end trimming, as players do.
/// A file that cannot be read back is the encoder's failure (`EXPORT_FAILED` naming the format),
/// not a stem's.
pub(super) fn measure(path: &Path, format: Format) -> Result<Measured, AudioError> {
    read_back(path, format).map_err(|err| match err {
        AudioError::Unsupported { reason, .. } | AudioError::Decode { reason, .. } => encoder_error(format, format!("reading it back: {reason}")),
        other => other,
    })
}

fn read_back(path: &Path, format: Format) -> Result<Measured, AudioError> {
    let mut meter = Meter::default();
    match format {
        Format::Opus => opus::decode(path, &mut |segment, rate| {
            meter.push(segment, rate);
            Ok(())
        })?,
        Format::Wav | Format::Flac | Format::Mp3 => {
            let name = format!("final_mix.{}", format.extension());
            let mut reader = StemReader::open(path, &name)?;
            let rate = reader.info.sample_rate;
            let mut chunk = StereoBuffer::default();
            while reader.next_chunk(&mut chunk)? {
                meter.push(&chunk, rate);
            }
        }
    }
    meter.finish().ok_or_else(|| AudioError::Internal(format!("the {} file decodes to nothing", format.extension())))
}

/// Loudness and true peak of decoded audio, gathered a block at a time (a decoder's packets are
/// a few hundred frames, too few to measure in parallel).
#[derive(Default)]
struct Meter {
    state: Option<(LoudnessMeter, PeakDetector, u32)>,
    pending: StereoBuffer,
    peaks: Vec<f32>,
    peak: f32,
    frames: u64,
}

impl Meter {
    fn push(&mut self, segment: &StereoBuffer, rate: u32) {
        if self.state.is_none() {
            self.state = Some((LoudnessMeter::new(rate), PeakDetector::new(rate), rate));
        }
        self.pending.left.extend_from_slice(&segment.left);
        self.pending.right.extend_from_slice(&segment.right);
        if self.pending.len() >= BLOCK {
            self.measure_pending();
        }
    }

    fn measure_pending(&mut self) {
        let Some((meter, detector, _)) = &mut self.state else { return };
        let (pending, peaks) = (&self.pending, &mut self.peaks);
        rayon::join(|| meter.push(&pending.left, &pending.right), || detector.push(&pending.left, &pending.right, peaks));
        self.peak = self.peaks.drain(..).fold(self.peak, f32::max);
        self.frames += self.pending.len() as u64;
        self.pending.clear();
    }

    /// `None` when nothing was decoded.
    fn finish(mut self) -> Option<Measured> {
        self.measure_pending();
        let (meter, mut detector, rate) = self.state?;
        detector.finish(&mut self.peaks);
        let peak = self.peaks.into_iter().fold(self.peak, f32::max);
        Some(Measured { frames: self.frames, rate, integrated_lufs: meter.integrated(), peak })
    }
}

/// An encoder's failure, naming the format: the job ends `EXPORT_FAILED` with it.
pub(super) fn encoder_error(format: Format, err: impl std::fmt::Display) -> AudioError {
    AudioError::Encode { format: format.extension(), reason: err.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    /// Two seconds of quiet noise encoded as Opus at 96 kbps, at `path`, measured as it was made.
    fn encode_opus(path: &Path) -> Measured {
        let noise = test_noise(96_000, 7);
        let quiet: Vec<f32> = noise.iter().map(|x| 0.25 * x).collect();
        let mut encoder = lossy_encoder(FormatSettings { bitrate_kbps: Some(96), ..FormatSettings::new(Format::Opus) }, 48_000, path).unwrap();
        for start in (0..quiet.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(quiet.len());
            encoder.write(&StereoBuffer { left: quiet[start..end].to_vec(), right: quiet[start..end].to_vec() }).unwrap();
        }
        encoder.finish().unwrap()
    }

    #[test]
    fn an_opus_file_measured_while_encoded_reads_back_the_same_and_a_damaged_one_fails_the_encoder_not_a_stem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("final_mix.opus");
        let while_encoded = encode_opus(&path);
        let measured = measure(&path, Format::Opus).unwrap();
        assert_eq!((measured.frames, measured.rate), (96_000, 48_000), "pre-skip and end trimming give the input's length");
        assert_eq!(measured, while_encoded, "the packets measured as they were made are the file's");

        // One byte flipped in the middle of an audio page: its checksum no longer holds.
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        match measure(&path, Format::Opus) {
            Err(AudioError::Encode { format: "opus", reason }) => assert!(reason.starts_with("reading it back: "), "{reason}"),
            other => panic!("expected the Opus encoder's failure, got {other:?}"),
        }
    }
}
