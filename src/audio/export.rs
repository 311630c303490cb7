//! Writing the finished mix as WAV, atomically: a reader sees the old file or the whole new one.

use std::fs::File;
use std::io::{BufWriter, Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hound::{SampleFormat, WavSpec, WavWriter};

use super::buffer::StereoBuffer;
use super::settings::BitDepth;
use super::AudioError;

/// How many stereo frames fit in one WAV file: the RIFF chunk's size (the header less its first
/// 8 bytes, and the samples) is a u32, and the header is 68 bytes over 16 bits.
pub fn max_frames(depth: BitDepth) -> u64 {
    let header = wav_header(wav_spec(44_100, depth)).len() as u64;
    (u64::from(u32::MAX) + 8 - header) / (2 * u64::from(depth.bits() / 8))
}

/// A stereo mix's WAV format at `rate` and `depth`.
fn wav_spec(rate: u32, depth: BitDepth) -> WavSpec {
    WavSpec {
        channels: 2,
        sample_rate: rate,
        bits_per_sample: depth.bits(),
        sample_format: if depth == BitDepth::Float32 { SampleFormat::Float } else { SampleFormat::Int },
    }
}

/// The header hound's writer makes for a file of `spec` with no samples: the two sizes in it are
/// patched once the samples are written.
fn wav_header(spec: WavSpec) -> Vec<u8> {
    let mut header = Cursor::new(Vec::new());
    WavWriter::new(&mut header, spec).and_then(WavWriter::finalize).expect("hound writes 16, 24 and 32-bit headers, and memory takes them");
    header.into_inner()
}

/// A file being written under a temporary name, removed if dropped before it was kept: an error
/// or a cancel leaves nothing behind. Every file a mix writes is one.
pub(super) struct PartialFile {
    pub file: File,
    path: PathBuf,
    kept: bool,
}

impl PartialFile {
    pub fn create(path: &Path) -> Result<Self, AudioError> {
        Ok(Self { file: File::create(path).map_err(AudioError::Export)?, path: path.to_path_buf(), kept: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fsyncs the file and keeps it.
    pub fn keep(mut self) -> Result<(), AudioError> {
        self.file.sync_all().map_err(AudioError::Export)?;
        self.kept = true;
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A WAV file being written at `temporary`, a name the caller owns in the same directory as the
/// final path, so that it knows what a crash can leave behind. Dropped before [`WavSink::finish`]
/// (an error, a cancel), it removes the file.
///
/// The header is hound's, as its writer makes it for no samples; the samples are packed a segment
/// at a time here, since hound writes them one at a time through its checks and the buffer's
/// (the larger part of writing a 24-bit master). The finished file is byte for byte what hound's
/// writer makes (tested).
pub struct WavSink {
    file: BufWriter<File>,
    /// Declared after the writer, so dropped after it: what the writer flushes is removed too.
    partial: PartialFile,
    depth: BitDepth,
    header_bytes: u64,
    data_bytes: u64,
    packed: Vec<u8>,
}

impl WavSink {
    pub fn create(temporary: &Path, rate: u32, depth: BitDepth) -> Result<Self, AudioError> {
        let header = wav_header(wav_spec(rate, depth));
        let partial = PartialFile::create(temporary)?;
        let mut file = BufWriter::with_capacity(1 << 20, partial.file.try_clone().map_err(AudioError::Export)?);
        file.write_all(&header).map_err(AudioError::Export)?;
        Ok(Self { file, partial, depth, header_bytes: header.len() as u64, data_bytes: 0, packed: Vec::new() })
    }

    /// Writes frames a [`Quantiser`] of the same depth made: each sample is an integer over the
    /// depth's full scale, which f32 holds exactly, so the integer is read back exactly.
    pub fn write(&mut self, segment: &StereoBuffer) -> Result<(), AudioError> {
        let (packed, frames) = (&mut self.packed, segment.left.iter().zip(&segment.right));
        let width = usize::from(self.depth.bits() / 8);
        packed.resize(2 * width * segment.len(), 0);
        match self.depth {
            BitDepth::Int16 => packed.chunks_exact_mut(4).zip(frames).for_each(|(out, (l, r))| {
                out[..2].copy_from_slice(&((l * 32_768.0) as i16).to_le_bytes());
                out[2..].copy_from_slice(&((r * 32_768.0) as i16).to_le_bytes());
            }),
            BitDepth::Int24 => {
                // A frame's six bytes as one eight-byte store whose last two the next frame's
                // store overwrites (the last frame's go in two bytes of room, then cut): a store
                // a frame where byte copies took two.
                packed.resize(6 * segment.len() + 2, 0);
                let sample = |x: f32| u64::from((x * 8_388_608.0) as i32 as u32 & 0x00ff_ffff);
                for (at, (l, r)) in frames.enumerate() {
                    packed[6 * at..6 * at + 8].copy_from_slice(&(sample(*l) | sample(*r) << 24).to_le_bytes());
                }
                packed.truncate(6 * segment.len());
            }
            BitDepth::Float32 => packed.chunks_exact_mut(8).zip(frames).for_each(|(out, (l, r))| {
                out[..4].copy_from_slice(&l.to_le_bytes());
                out[4..].copy_from_slice(&r.to_le_bytes());
            }),
        }
        self.file.write_all(&self.packed).map_err(AudioError::Export)?;
        self.data_bytes += self.packed.len() as u64;
        start_writeback(self.file.get_ref());
        Ok(())
    }

    /// Completes the header (the RIFF and data chunks' sizes, where hound puts them) and fsyncs
    /// the file.
    pub fn finish(self) -> Result<(), AudioError> {
        let Self { mut file, partial, header_bytes, data_bytes, .. } = self;
        let too_long = || AudioError::Internal(format!("WAV writer: {data_bytes} bytes of samples do not fit in a WAV file"));
        let riff_bytes = u32::try_from(data_bytes + header_bytes - 8).map_err(|_| too_long())?;
        let data_bytes = u32::try_from(data_bytes).map_err(|_| too_long())?;
        let mut patch = |offset: u64, value: u32| file.seek(SeekFrom::Start(offset)).and_then(|_| file.write_all(&value.to_le_bytes()));
        patch(4, riff_bytes).and_then(|()| patch(header_bytes - 4, data_bytes)).and_then(|()| file.flush()).map_err(AudioError::Export)?;
        drop(file);
        partial.keep()
    }
}

/// Quantises (and dithers) frames for a file of one depth, leaving in them exactly what a reader
/// of the file will get back: apart from the writing, so that it can run ahead of it while the
/// frames before are written and metered.
pub struct Quantiser {
    depth: BitDepth,
    dither: Tpdf,
}

impl Quantiser {
    pub fn new(depth: BitDepth) -> Self {
        Self { depth, dither: Tpdf::new(0x6d69_7864) }
    }

    pub fn quantise(&mut self, segment: &mut StereoBuffer) {
        match self.depth {
            BitDepth::Int16 => {
                for (l, r) in segment.left.iter_mut().zip(segment.right.iter_mut()) {
                    for x in [l, r] {
                        *x = quantize(*x, 15, self.dither.next()) as f32 / 32_768.0;
                    }
                }
            }
            BitDepth::Int24 => {
                #[cfg(target_arch = "x86_64")]
                if super::has_avx512_fma() {
                    // SAFETY: the processor supports AVX-512F, as just checked.
                    return unsafe { Self::round_24_avx512(segment) };
                }
                #[cfg(target_arch = "x86_64")]
                if super::has_avx2_fma() {
                    // SAFETY: the processor supports AVX2, as just checked.
                    return unsafe { Self::round_24_avx2(segment) };
                }
                Self::round_24(segment);
            }
            BitDepth::Float32 => {}
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_24_avx512(segment: &mut StereoBuffer) {
        Self::round_24(segment)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn round_24_avx2(segment: &mut StereoBuffer) {
        Self::round_24(segment)
    }

    /// 24-bit samples need no dither, so each channel is rounded in a plain loop that runs in
    /// vector lanes where the processor has them.
    #[inline(always)]
    fn round_24(segment: &mut StereoBuffer) {
        for channel in [&mut segment.left, &mut segment.right] {
            for x in channel.iter_mut() {
                *x = quantize(*x, 23, 0.0) as f32 / 8_388_608.0;
            }
        }
    }
}

/// Renames the finished `temporary` over `path` and fsyncs the directory, so that a reader sees
/// the old file or the whole new one, and a crash leaves one of them. The temporary is removed
/// if that fails.
pub fn publish(temporary: &Path, path: &Path) -> Result<(), AudioError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let renamed = std::fs::rename(temporary, path).map_err(AudioError::Export);
    if renamed.is_err() {
        let _ = std::fs::remove_file(temporary);
    }
    renamed?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(AudioError::Export)
}

/// How far quantisation can move a sample at `depth`, in full scale: half an LSB of rounding,
/// plus the 16-bit dither's ±1 LSB. A float file holds the samples as they are.
pub fn max_quantisation_error(depth: BitDepth) -> f32 {
    match depth {
        BitDepth::Int16 => 1.5 / 32_768.0,
        BitDepth::Int24 => 0.5 / 8_388_608.0,
        BitDepth::Float32 => 0.0,
    }
}

/// Asks the kernel to start writing to the disk what has reached `file` so far, and returns at
/// once: the fsync that ends a file then waits for its last part, where it waited for all of it
/// (a 3-minute 24-bit master's fsync was 5% of its mix). A failure only leaves that to the fsync.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor the file owns; it reads and writes no memory.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File) {}

/// Rounds to a signed integer of `bits + 1` bits after adding `dither` (in LSBs), saturating.
fn quantize(x: f32, bits: u32, dither: f64) -> i32 {
    let scale = f64::from(1u32 << bits);
    // Within a step of the range, so that the integers below cannot overflow; NaN stays NaN.
    let value = (f64::from(x) * scale + dither).clamp(-scale - 1.0, scale);
    // Rounded half away from zero, as `f64::round` rounds, without its library call on every
    // sample: truncated, then stepped by the fraction, which is exact. In i32, which holds every
    // value clamped above, and whose conversions vectorise where i64's do not.
    let whole = value as i32;
    let fraction = value - f64::from(whole);
    let rounded = whole + i32::from(fraction >= 0.5) - i32::from(fraction <= -0.5);
    rounded.clamp(-(1 << bits), (1 << bits) - 1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    #[test]
    fn the_file_lands_whole_and_an_abandoned_one_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (path, temporary) = (dir.path().join("mix.wav"), dir.path().join(".mix.wav.partial"));
        let mut segment = StereoBuffer { left: vec![0.25; 1000], right: vec![-0.25; 1000] };
        let mut sink = WavSink::create(&temporary, 48_000, BitDepth::Int24).unwrap();
        Quantiser::new(BitDepth::Int24).quantise(&mut segment);
        sink.write(&segment).unwrap();
        sink.finish().unwrap();
        publish(&temporary, &path).unwrap();
        let written = std::fs::read(&path).unwrap();
        let samples: Vec<i32> = hound::WavReader::open(&path).unwrap().into_samples().map(Result::unwrap).collect();
        assert_eq!(samples.len(), 2000);
        assert_eq!(&samples[..2], [2_097_152, -2_097_152]);
        assert_eq!(segment.left[0], 0.25, "the segment holds what a reader gets back");
        assert!(!temporary.exists());

        let mut abandoned = WavSink::create(&temporary, 48_000, BitDepth::Int16).unwrap();
        Quantiser::new(BitDepth::Int16).quantise(&mut segment);
        abandoned.write(&segment).unwrap();
        assert!(temporary.exists());
        drop(abandoned);
        assert_eq!(std::fs::read(&path).unwrap(), written, "the old file is untouched");
        assert!(!temporary.exists());
    }

    #[test]
    fn the_file_is_byte_for_byte_what_hound_writes() {
        let dir = tempfile::tempdir().unwrap();
        let noise = test_noise(10_007, 9);
        for depth in [BitDepth::Int16, BitDepth::Int24, BitDepth::Float32] {
            for (rate, frames) in [(44_100, 10_007), (96_000, 1), (48_000, 0)] {
                let mut segment = StereoBuffer { left: noise[..frames].to_vec(), right: noise[..frames].iter().map(|x| -0.7 * x).collect() };
                Quantiser::new(depth).quantise(&mut segment);
                let ours = dir.path().join("ours.wav");
                let mut sink = WavSink::create(&ours, rate, depth).unwrap();
                // In two pieces, the first odd.
                let split = frames / 3;
                for (start, end) in [(0, split), (split, frames)] {
                    sink.write(&StereoBuffer { left: segment.left[start..end].to_vec(), right: segment.right[start..end].to_vec() }).unwrap();
                }
                sink.finish().unwrap();

                let hounds = dir.path().join("hound.wav");
                let mut writer = WavWriter::create(&hounds, wav_spec(rate, depth)).unwrap();
                for x in segment.left.iter().zip(&segment.right).flat_map(|(l, r)| [*l, *r]) {
                    match depth {
                        BitDepth::Int16 => writer.write_sample((x * 32_768.0) as i16),
                        BitDepth::Int24 => writer.write_sample((x * 8_388_608.0) as i32),
                        BitDepth::Float32 => writer.write_sample(x),
                    }
                    .unwrap();
                }
                writer.finalize().unwrap();
                assert_eq!(std::fs::read(&ours).unwrap(), std::fs::read(&hounds).unwrap(), "{} bits, {rate} Hz, {frames} frames", depth.bits());
            }
        }
    }

    #[test]
    fn the_longest_file_allowed_has_a_riff_size_its_header_can_hold() {
        for depth in [BitDepth::Int16, BitDepth::Int24, BitDepth::Float32] {
            let header = wav_header(wav_spec(48_000, depth)).len() as u64;
            let riff_bytes = |frames: u64| header - 8 + frames * 2 * u64::from(depth.bits() / 8);
            assert!(riff_bytes(max_frames(depth)) <= u64::from(u32::MAX), "{} bits: the longest fits", depth.bits());
            assert!(riff_bytes(max_frames(depth) + 1) > u64::from(u32::MAX), "{} bits: it is the longest that fits", depth.bits());
        }
    }

    #[test]
    fn quantize_rounds_and_saturates() {
        assert_eq!(quantize(0.5, 15, 0.0), 16_384);
        assert_eq!(quantize(1.5, 15, 0.0), 32_767);
        assert_eq!(quantize(-1.5, 23, 0.0), -8_388_608);
        assert_eq!(quantize(f32::NAN, 23, 0.0), 0);
        assert_eq!(quantize(f32::INFINITY, 15, 0.0), 32_767);
    }

    #[test]
    fn the_file_holds_exactly_the_integers_quantising_made() {
        let dir = tempfile::tempdir().unwrap();
        let noise = test_noise(10_000, 3);
        for (depth, bits) in [(BitDepth::Int16, 15), (BitDepth::Int24, 23)] {
            let path = dir.path().join(format!("{bits}.wav"));
            let mut segment = StereoBuffer { left: noise.clone(), right: noise.iter().map(|x| -0.5 * x).collect() };
            Quantiser::new(depth).quantise(&mut segment);
            let mut sink = WavSink::create(&path, 48_000, depth).unwrap();
            sink.write(&segment).unwrap();
            sink.finish().unwrap();
            let read: Vec<i32> = hound::WavReader::open(&path).unwrap().samples::<i32>().map(Result::unwrap).collect();
            let scale = f64::from(1u32 << bits);
            let expected: Vec<i32> = segment.left.iter().zip(&segment.right).flat_map(|(l, r)| [*l, *r]).map(|x| (f64::from(x) * scale) as i32).collect();
            assert_eq!(read, expected, "{bits} bits");
            // Without dither at 24 bits, the integers are the samples rounded.
            if bits == 23 {
                assert_eq!(read[0], (f64::from(noise[0]) * scale).round() as i32);
            }
        }
    }

    #[test]
    fn quantize_rounds_as_f64_round_does() {
        let outright = |x: f32, bits: u32, dither: f64| {
            let scale = f64::from(1u32 << bits);
            (f64::from(x) * scale + dither).round().clamp(-scale, scale - 1.0) as i32
        };
        // Ties either side of zero, both sides of every tie, the ends of the range, and noise.
        let ties = (-40..40).map(|k| (k as f32 + 0.5) / 32_768.0);
        let near_ties = ties.clone().flat_map(|x| [x.next_up(), x.next_down()]);
        let noise = test_noise(100_000, 7).into_iter().map(|x| 1.2 * x);
        for x in ties.chain(near_ties).chain(noise).chain([1.0, -1.0, 0.999_999_9, -0.999_999_9, 0.0, -0.0]) {
            for (bits, dither) in [(15, 0.0), (15, 0.5), (15, -0.75), (23, 0.0)] {
                assert_eq!(quantize(x, bits, dither), outright(x, bits, dither), "{x} at {bits} bits, dither {dither}");
            }
        }
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
