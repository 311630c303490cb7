//! The summed bus, rendered a segment at a time: every track keeps its decoder, resampler and
//! effects between segments, so memory holds one segment per worker and each track's small
//! decode state, however long the mix.

use std::panic::{catch_unwind, AssertUnwindSafe};

use rayon::prelude::*;

use super::buffer::StereoBuffer;
use super::decode::StemReader;
use super::dsp::TrackChain;
use super::resample::RateConverter;
use super::{panic_message, AudioError, StemSource};

/// One audible track on its way into the bus.
pub struct TrackStream {
    stem_name: String,
    reader: StemReader,
    converter: RateConverter,
    chain: TrackChain,
    /// Processed frames not yet added to the bus, from `taken`; `position` is where
    /// `pending[taken]` sits in the mix (negative while an early stem is still before the start).
    pending: StereoBuffer,
    taken: usize,
    position: i64,
    decoded: StereoBuffer,
    source_ended: bool,
    /// Source frames decoded so far, for progress.
    pub frames_read: u64,
}

impl TrackStream {
    pub fn open(stem: &StemSource, settings: &super::TrackSettings, source_rate: u32, rate: u32, offset_frames: i64) -> Result<Self, AudioError> {
        Ok(Self {
            stem_name: stem.name.clone(),
            reader: StemReader::source(stem)?,
            converter: RateConverter::new(source_rate, rate)?,
            chain: TrackChain::new(settings, rate),
            pending: StereoBuffer::default(),
            taken: 0,
            position: offset_frames,
            decoded: StereoBuffer::default(),
            source_ended: false,
            frames_read: 0,
        })
    }

    /// Damaged packets the decoder skipped so far.
    pub fn skipped_packets(&self) -> u64 {
        self.reader.info.skipped_packets
    }

    /// Adds this track's audio for mix frames `start..start + segment.len()` into `segment`.
    fn add_segment(&mut self, start: u64, segment: &mut StereoBuffer) -> Result<(), AudioError> {
        let end = start as i64 + segment.len() as i64;
        while self.position < end {
            if self.taken == self.pending.len() && !self.refill()? {
                return Ok(());
            }
            let available = self.pending.len() - self.taken;
            // Frames before the mix's start (a negative offset) are dropped.
            let skip = ((start as i64).max(0) - self.position).clamp(0, available as i64) as usize;
            if skip == available {
                self.taken += skip;
                self.position += skip as i64;
                continue;
            }
            let from = self.taken + skip;
            let at = (self.position + skip as i64 - start as i64) as usize;
            let count = (available - skip).min(segment.len().saturating_sub(at));
            let add = |bus: &mut [f32], track: &[f32]| bus[at..at + count].iter_mut().zip(&track[from..from + count]).for_each(|(out, x)| *out += x);
            add(&mut segment.left, &self.pending.left);
            add(&mut segment.right, &self.pending.right);
            self.taken = from + count;
            self.position += (skip + count) as i64;
        }
        Ok(())
    }

    /// Decodes, converts and processes the next chunk into `pending`. False when the stem is done.
    fn refill(&mut self) -> Result<bool, AudioError> {
        self.pending.clear();
        self.taken = 0;
        while self.pending.is_empty() {
            if self.source_ended {
                return Ok(false);
            }
            if self.reader.next_chunk(&mut self.decoded)? {
                self.frames_read += self.decoded.len() as u64;
                self.converter.push(&self.decoded, &mut self.pending)?;
            } else {
                self.source_ended = true;
                self.converter.finish(&mut self.pending)?;
            }
            self.chain.process(&mut self.pending);
        }
        Ok(true)
    }
}

/// Renders mix frames `start..start + frames` of `tracks` into `bus`, the tracks shared out over
/// the current rayon pool (the engine's, for a job): each worker adds its tracks into its own
/// segment, and the segments are summed.
pub fn render_segment(tracks: &mut [TrackStream], start: u64, frames: usize, bus: &mut StereoBuffer) -> Result<(), AudioError> {
    let silent = || StereoBuffer { left: vec![0.0; frames], right: vec![0.0; frames] };
    let summed = tracks
        .par_iter_mut()
        .with_max_len(1)
        .try_fold(silent, |mut segment, track| {
            // Caught here, so that a bug in one track fails the mix instead of unwinding through
            // the pool into the caller.
            catch_unwind(AssertUnwindSafe(|| track.add_segment(start, &mut segment)))
                .unwrap_or_else(|panic| Err(AudioError::Internal(format!("track \"{}\" panicked: {}", track.stem_name, panic_message(&*panic)))))?;
            Ok::<_, AudioError>(segment)
        })
        .try_reduce(silent, |mut sum, other| {
            add_into(&mut sum, &other);
            Ok(sum)
        })?;
    *bus = summed;
    Ok(())
}

fn add_into(sum: &mut StereoBuffer, other: &StereoBuffer) {
    sum.left.iter_mut().zip(&other.left).for_each(|(out, x)| *out += x);
    sum.right.iter_mut().zip(&other.right).for_each(|(out, x)| *out += x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;
    use crate::audio::dsp::pan_gains;
    use crate::audio::TrackSettings;

    fn stem(dir: &std::path::Path, name: &str, frames: usize, seed: u64) -> (StemSource, Vec<f32>) {
        let path = dir.join(name);
        let spec = hound::WavSpec { channels: 1, sample_rate: 48_000, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        let samples = test_noise(frames, seed);
        samples.iter().for_each(|&x| writer.write_sample(x).unwrap());
        writer.finalize().unwrap();
        (StemSource { id: name.into(), name: name.into(), path }, samples)
    }

    #[test]
    fn segments_place_every_track_at_its_offset_across_segment_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        // One stem starting before the mix (its first 20,000 frames, several decoded chunks, cut),
        // one starting well inside
        // a later segment, one beyond the mix's end.
        let tracks =
            [(stem(dir.path(), "early.wav", 50_000, 1), -20_000i64), (stem(dir.path(), "late.wav", 30_000, 2), 70_001), (stem(dir.path(), "after.wav", 100, 3), 200_000)];
        let length = 110_000usize;
        let mut expected = vec![0f32; length];
        for ((_, samples), offset) in &tracks {
            for (i, &x) in samples.iter().enumerate() {
                let at = *offset + i as i64;
                if (0..length as i64).contains(&at) {
                    expected[at as usize] += x;
                }
            }
        }
        let settings = TrackSettings::default();
        let mut streams: Vec<TrackStream> = tracks.iter().map(|((source, _), offset)| TrackStream::open(source, &settings, 48_000, 48_000, *offset).unwrap()).collect();
        let (mut rendered, mut segment, mut start) = (Vec::new(), StereoBuffer::default(), 0usize);
        for frames in [4096, 1, 65_536, 39_000, 1367] {
            render_segment(&mut streams, start as u64, frames, &mut segment).unwrap();
            assert_eq!(segment.len(), frames);
            rendered.extend_from_slice(&segment.left);
            start += frames;
        }
        assert_eq!(start, length);
        // A mono stem plays in both channels, through the centre pan's -3 dB.
        let centre = pan_gains(0.0).0 as f32;
        for (n, (&got, &want)) in rendered.iter().zip(&expected).enumerate() {
            assert!((got - want * centre).abs() < 1e-6, "frame {n}: {got} against {}", want * centre);
        }
    }
}
