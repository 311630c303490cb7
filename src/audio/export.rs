//! Writing the finished mix as WAV, atomically: a reader sees the old file or the whole new one.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use hound::{SampleFormat, WavSpec, WavWriter};

use super::buffer::{StereoBuffer, BLOCK};
use super::settings::BitDepth;
use super::{AudioError, MixObserver, Stage};

const WAV_HEADER_BYTES: u64 = 44;

/// How many stereo frames fit in one WAV file: hound counts the data bytes in a u32.
pub fn max_frames(depth: BitDepth) -> u64 {
    (u64::from(u32::MAX) - WAV_HEADER_BYTES) / (2 * u64::from(depth.bits() / 8))
}

/// Writes `bus` to `path` atomically: to `temporary` first, fsynced, then renamed over `path`,
/// and the directory fsynced, so a crash leaves either the old file or the complete new one.
///
/// The caller names `temporary`, in the same directory as `path`, so that it knows what a crash
/// can leave behind; an export that fails or is canceled removes it.
pub fn export_wav(bus: &StereoBuffer, rate: u32, depth: BitDepth, path: &Path, temporary: &Path, observer: &dyn MixObserver) -> Result<(), AudioError> {
    if bus.len() as u64 > max_frames(depth) {
        return Err(AudioError::TooLong { seconds: bus.len() as f64 / f64::from(rate), max_seconds: max_frames(depth) as f64 / f64::from(rate) });
    }
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(AudioError::Export)?;
    let written = write_wav(bus, rate, depth, temporary, observer).and_then(|()| std::fs::rename(temporary, path).map_err(AudioError::Export));
    if written.is_err() {
        let _ = std::fs::remove_file(temporary);
    }
    written?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(AudioError::Export)?;
    observer.progress(Stage::Exporting, 1.0);
    Ok(())
}

/// Writes `bus` as a WAV file at `path` and fsyncs it.
fn write_wav(bus: &StereoBuffer, rate: u32, depth: BitDepth, path: &Path, observer: &dyn MixObserver) -> Result<(), AudioError> {
    let mut file = File::create(path).map_err(AudioError::Export)?;
    let spec = WavSpec {
        channels: 2,
        sample_rate: rate,
        bits_per_sample: depth.bits(),
        sample_format: if depth == BitDepth::Float32 { SampleFormat::Float } else { SampleFormat::Int },
    };
    {
        let mut writer = WavWriter::new(BufWriter::with_capacity(1 << 20, &mut file), spec).map_err(hound_error)?;
        let mut dither = Tpdf::new(0x6d69_7864);
        for (block, start) in (0..bus.len()).step_by(BLOCK).enumerate() {
            if observer.is_cancelled() {
                return Err(AudioError::Canceled);
            }
            let end = (start + BLOCK).min(bus.len());
            for (&l, &r) in bus.left[start..end].iter().zip(&bus.right[start..end]) {
                for x in [l, r] {
                    match depth {
                        BitDepth::Int16 => writer.write_sample(quantize(x, 15, dither.next())).map_err(hound_error)?,
                        BitDepth::Int24 => writer.write_sample(quantize(x, 23, 0.0)).map_err(hound_error)?,
                        BitDepth::Float32 => writer.write_sample(x).map_err(hound_error)?,
                    }
                }
            }
            observer.progress(Stage::Exporting, (block + 1) as f64 * BLOCK as f64 / bus.len().max(1) as f64 * 0.95);
        }
        writer.finalize().map_err(hound_error)?;
    }
    file.sync_all().map_err(AudioError::Export)
}

/// Rounds to a signed integer of `bits + 1` bits after adding `dither` (in LSBs), saturating.
fn quantize(x: f32, bits: u32, dither: f64) -> i32 {
    let scale = f64::from(1u32 << bits);
    let value = (f64::from(x) * scale + dither).round();
    value.clamp(-scale, scale - 1.0) as i32
}

/// Triangular-PDF dither of ±1 LSB from a xorshift generator: decorrelates the 16-bit
/// quantisation error from the signal at the cost of a flat noise floor.
struct Tpdf(u64);

impl Tpdf {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        self.uniform() - self.uniform()
    }
}

fn hound_error(err: hound::Error) -> AudioError {
    match err {
        hound::Error::IoError(io) => AudioError::Export(io),
        other => AudioError::Internal(format!("WAV writer: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Observer {
        cancelled: bool,
    }

    impl MixObserver for Observer {
        fn progress(&self, _: Stage, _: f64) {}
        fn is_cancelled(&self) -> bool {
            self.cancelled
        }
    }

    #[test]
    fn the_file_lands_whole_and_a_canceled_export_leaves_the_old_one_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (path, temporary) = (dir.path().join("mix.wav"), dir.path().join(".mix.wav.partial"));
        let bus = StereoBuffer { left: vec![0.25; 1000], right: vec![-0.25; 1000] };
        export_wav(&bus, 48_000, BitDepth::Int24, &path, &temporary, &Observer { cancelled: false }).unwrap();
        let written = std::fs::read(&path).unwrap();
        assert_eq!(hound::WavReader::open(&path).unwrap().len(), 2000);
        assert!(!temporary.exists());

        let canceled = export_wav(&bus, 48_000, BitDepth::Int16, &path, &temporary, &Observer { cancelled: true });
        assert!(matches!(canceled, Err(AudioError::Canceled)), "{canceled:?}");
        assert_eq!(std::fs::read(&path).unwrap(), written, "the old file is untouched");
        assert!(!temporary.exists());
    }

    #[test]
    fn quantize_rounds_and_saturates() {
        assert_eq!(quantize(0.5, 15, 0.0), 16_384);
        assert_eq!(quantize(1.5, 15, 0.0), 32_767);
        assert_eq!(quantize(-1.5, 23, 0.0), -8_388_608);
    }

    #[test]
    fn tpdf_dither_is_triangular_within_one_lsb() {
        let mut dither = Tpdf::new(1);
        let values: Vec<f64> = (0..100_000).map(|_| dither.next()).collect();
        assert!(values.iter().all(|v| v.abs() < 1.0));
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        // A triangle on (-1, 1) has variance 1/6.
        assert!(mean.abs() < 0.01 && (variance - 1.0 / 6.0).abs() < 0.01, "mean {mean} variance {variance}");
    }
}
