//! The summed bus, rendered a segment at a time: every track keeps its decoder, resampler and
//! effects between segments, so memory holds a segment for each part of the sum (kept by the
//! track that heads it, so that a segment allocates nothing) and each track's small decode
//! state, however long the mix.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::buffer::StereoBuffer;
use super::decode::StemReader;
use super::dsp::{TrackChain, STRIP_LANES};
use super::resample::RateConverter;
use super::{panic_message, AudioError, StemSource};

/// One audible track on its way into the bus.
pub struct TrackStream {
    stem_name: String,
    reader: StemReader,
    converter: RateConverter,
    chain: TrackChain,
    /// Frames decoded and converted, not yet added to the bus, from `taken`: those before
    /// `processed` have been through the track's chain. `position` is where `pending[taken]`
    /// sits in the mix (negative while an early stem is still before the start).
    pending: StereoBuffer,
    taken: usize,
    processed: usize,
    position: i64,
    decoded: StereoBuffer,
    /// The sum of the tracks from this one to the end of its half (see [`render_tracks`]), kept
    /// for the next segment so that rendering one allocates nothing.
    sum: StereoBuffer,
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
            processed: 0,
            position: offset_frames,
            decoded: StereoBuffer::default(),
            sum: StereoBuffer::default(),
            source_ended: false,
            frames_read: 0,
        })
    }

    /// Damaged packets the decoder skipped so far.
    pub fn skipped_packets(&self) -> u64 {
        self.reader.info.skipped_packets
    }

    /// Adds the audio of `tracks` for mix frames `start..start + segments[0].len()` into
    /// `segments`, each track's into the one its `pair` names, their chains run in lanes side by
    /// side over the frames all have waiting. Each track's frames go through its chain in order,
    /// as they would alone, and each frame of a segment is the sum of at most two tracks' in
    /// either order (addition commutes exactly).
    fn add_segment<const N: usize>(mut tracks: [&mut TrackStream; N], start: u64, pair: [usize; N], segments: &mut [StereoBuffer]) -> Result<(), AudioError> {
        loop {
            let mut wants = [false; N];
            for (lane, track) in tracks.iter_mut().enumerate() {
                wants[lane] = !track.add_processed(start, &mut segments[pair[lane]]) && track.has_unprocessed()?;
            }
            if !wants.contains(&true) {
                return Ok(());
            }
            // A track that has what it needs for this segment goes along with the frames it
            // already has, never decoding more for it; when one has none, the others run alone.
            if tracks.iter().zip(wants).all(|(track, wants)| wants || track.unprocessed() > 0) {
                Self::process_lanes(tracks.each_mut().map(|track| &mut **track));
            } else {
                for (track, wants) in tracks.iter_mut().zip(wants) {
                    if wants {
                        Self::process_lanes([&mut **track]);
                    }
                }
            }
        }
    }

    /// Adds the processed frames that fall in mix frames `start..start + segment.len()` into
    /// `segment`, dropping those before the mix's start. True when the track has reached the
    /// segment's end.
    fn add_processed(&mut self, start: u64, segment: &mut StereoBuffer) -> bool {
        let end = start as i64 + segment.len() as i64;
        while self.position < end && self.taken < self.processed {
            let available = self.processed - self.taken;
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
        self.position >= end
    }

    fn unprocessed(&self) -> usize {
        self.pending.len() - self.processed
    }

    /// Decodes and converts the next chunk when no frame is waiting for the chain. False when
    /// the stem is done.
    fn has_unprocessed(&mut self) -> Result<bool, AudioError> {
        while self.unprocessed() == 0 {
            if self.source_ended {
                return Ok(false);
            }
            self.pending.left.drain(..self.taken);
            self.pending.right.drain(..self.taken);
            self.processed -= self.taken;
            self.taken = 0;
            if self.reader.next_chunk(&mut self.decoded)? {
                self.frames_read += self.decoded.len() as u64;
                self.converter.push(&self.decoded, &mut self.pending)?;
            } else {
                self.source_ended = true;
                self.converter.finish(&mut self.pending)?;
            }
        }
        Ok(true)
    }

    /// Runs the tracks' chains over as many waiting frames as all of them have.
    fn process_lanes<const N: usize>(tracks: [&mut TrackStream; N]) {
        let frames = tracks.iter().map(|track| track.unprocessed()).min().unwrap_or(0);
        let (chains, audio) = {
            let mut parts = tracks.map(|track| {
                let from = track.processed;
                track.processed += frames;
                let TrackStream { chain, pending, .. } = track;
                (Some(chain), [&mut pending.left[from..from + frames], &mut pending.right[from..from + frames]])
            });
            (parts.each_mut().map(|(chain, _)| chain.take().expect("taken once")), parts.map(|(_, audio)| audio))
        };
        TrackChain::process_lanes(chains, audio);
    }
}

/// Renders mix frames `start..start + frames` of `tracks` into `bus`, the tracks shared out over
/// the current rayon pool (the engine's, for a job) by halving the list: each half renders into
/// a segment of its own, and the two are summed. The halving stops at as many tracks as each
/// worker needs (at most [`STRIP_LANES`]), which render together, in lanes (see
/// [`TrackStream::add_segment`]), their sum still taken by halving down to pairs: the bus is
/// the same to the bit however many render together.
///
/// `beside` runs on the pool at the same time, beside the first group of tracks: every other
/// half is there to be taken first, so the tracks start on every worker, and `beside`'s work
/// fills in after them, where begun first its indivisible part would hold a half back.
pub fn render_segment<T: Send>(
    tracks: &mut [TrackStream],
    start: u64,
    frames: usize,
    bus: &mut StereoBuffer,
    beside: impl FnOnce() -> T + Send,
) -> Result<T, AudioError> {
    if tracks.is_empty() {
        silence(bus, frames);
        return Ok(beside());
    }
    let lanes = tracks.len().div_ceil(rayon::current_num_threads()).clamp(1, STRIP_LANES);
    let result = render_tracks(tracks, start, frames, lanes, beside)?;
    // The bus's old buffer becomes the first track's for the next segment.
    std::mem::swap(bus, &mut tracks[0].sum);
    Ok(result)
}

/// Renders `tracks` (one or more) into the first one's `sum`, `beside` them (see
/// [`render_segment`]).
fn render_tracks<T: Send>(tracks: &mut [TrackStream], start: u64, frames: usize, lanes: usize, beside: impl FnOnce() -> T + Send) -> Result<T, AudioError> {
    if tracks.len() > lanes {
        let (first, second) = tracks.split_at_mut(tracks.len() / 2);
        let (rendered, other) = rayon::join(|| render_tracks(first, start, frames, lanes, beside), || render_tracks(second, start, frames, lanes, nothing));
        let result = rendered?;
        other?;
        add_into(&mut first[0].sum, &second[0].sum);
        return Ok(result);
    }
    let (rendered, result) = rayon::join(|| render_group(tracks, start, frames), beside);
    rendered?;
    Ok(result)
}

/// What the halves of the tracks have beside them but the first: a function, not a closure,
/// whose type does not grow with each level of the halving.
fn nothing() {}

/// Renders a group of tracks together, in lanes, into the first one's `sum`.
fn render_group(tracks: &mut [TrackStream], start: u64, frames: usize) -> Result<(), AudioError> {
    // Each pair of the halving sums into a segment of its own, the buffer its first track keeps.
    let mut pair = [0; STRIP_LANES];
    pair_up(0, &mut pair[..tracks.len()]);
    let mut segments: [StereoBuffer; STRIP_LANES] = Default::default();
    let count = tracks.len();
    let heads = || (0..count).filter(|&track| pair[track] == track);
    for head in heads() {
        segments[head] = std::mem::take(&mut tracks[head].sum);
        silence(&mut segments[head], frames);
    }
    // Caught here, so that a bug in a track fails the mix instead of unwinding through the pool
    // into the caller.
    catch_unwind(AssertUnwindSafe(|| match &mut *tracks {
        [a] => TrackStream::add_segment([a], start, [0], &mut segments),
        [a, b] => TrackStream::add_segment([a, b], start, [pair[0], pair[1]], &mut segments),
        [a, b, c] => TrackStream::add_segment([a, b, c], start, [pair[0], pair[1], pair[2]], &mut segments),
        [a, b, c, d] => TrackStream::add_segment([a, b, c, d], start, [pair[0], pair[1], pair[2], pair[3]], &mut segments),
        _ => unreachable!("halving leaves at most STRIP_LANES tracks"),
    }))
    .unwrap_or_else(|panic| {
        let names: Vec<String> = tracks.iter().map(|track| format!("\"{}\"", track.stem_name)).collect();
        Err(AudioError::Internal(format!("track {} panicked: {}", names.join(" or "), panic_message(&*panic))))
    })?;
    for head in heads() {
        tracks[head].sum = std::mem::take(&mut segments[head]);
    }
    sum_pairs(tracks);
    Ok(())
}

/// Names, for each of a run of tracks starting at `first`, the first track of its pair (or of
/// itself, alone) in the halving of [`render_tracks`].
fn pair_up(first: usize, pair: &mut [usize]) {
    if pair.len() <= 2 {
        pair.fill(first);
        return;
    }
    let half = pair.len() / 2;
    let (head, tail) = pair.split_at_mut(half);
    pair_up(first, head);
    pair_up(first + half, tail);
}

/// Sums the pairs' segments up the halving into the first track's `sum`, as [`render_tracks`]
/// sums its halves.
fn sum_pairs(tracks: &mut [TrackStream]) {
    if tracks.len() <= 2 {
        return;
    }
    let (first, second) = tracks.split_at_mut(tracks.len() / 2);
    sum_pairs(first);
    sum_pairs(second);
    add_into(&mut first[0].sum, &second[0].sum);
}

fn silence(segment: &mut StereoBuffer, frames: usize) {
    segment.clear();
    segment.left.resize(frames, 0.0);
    segment.right.resize(frames, 0.0);
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
    use crate::audio::settings::{CompressorSettings, EqBand, EqType};
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
            render_segment(&mut streams, start as u64, frames, &mut segment, || ()).unwrap();
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

    #[test]
    fn tracks_rendered_in_lanes_sum_to_the_same_bits_as_tracks_rendered_alone() {
        let dir = tempfile::tempdir().unwrap();
        let band = |kind, freq_hz, gain_db| EqBand { kind, freq_hz, q: 0.9, gain_db };
        let compressor = |threshold_db, attack_ms| Some(CompressorSettings { threshold_db, ratio: 4.0, attack_ms, release_ms: 80.0, makeup_db: 1.5 });
        // Five tracks halve into a pair and three, the three into one alone and a pair. The pairs'
        // strips differ (three bands and a compressor against one band and none; a compressor
        // alone against two bands and a compressor); stems of different lengths and offsets (one
        // starting before the mix), all resampled from 48 to 44.1 kHz so that chunks differ.
        let tracks = [
            (
                TrackSettings {
                    eq: vec![band(EqType::Lowshelf, 150.0, 4.0), band(EqType::Peak, 2000.0, -3.0), band(EqType::Highpass, 40.0, 0.0)],
                    compressor: compressor(-20.0, 5.0),
                    ..Default::default()
                },
                60_000,
                -3_000,
            ),
            (TrackSettings { eq: vec![band(EqType::Peak, 800.0, 6.0)], gain_db: -4.0, pan: 0.6, ..Default::default() }, 50_000, 1_234),
            (TrackSettings { gain_db: 3.0, ..Default::default() }, 10_000, 30_000),
            (TrackSettings { compressor: compressor(-12.0, 0.0), pan: -0.3, ..Default::default() }, 90_000, 0),
            (
                TrackSettings {
                    eq: vec![band(EqType::Lowpass, 5000.0, 0.0), band(EqType::Highshelf, 6000.0, -2.0)],
                    compressor: compressor(-26.0, 20.0),
                    ..Default::default()
                },
                70_000,
                17,
            ),
        ];
        let sources: Vec<StemSource> = tracks.iter().enumerate().map(|(i, (_, frames, _))| stem(dir.path(), &format!("{i}.wav"), *frames, i as u64 + 7).0).collect();
        // All five (a pair and three, the three in lanes or one alone and a pair), and the first
        // four (four in lanes, or two pairs).
        for count in [5, 4] {
            let open = || -> Vec<TrackStream> {
                tracks[..count]
                    .iter()
                    .zip(&sources)
                    .map(|((settings, _, offset), source)| TrackStream::open(source, settings, 48_000, 44_100, *offset).unwrap())
                    .collect()
            };
            let mut alone = open();
            let mut in_lanes: Vec<(usize, Vec<TrackStream>)> = (2..=STRIP_LANES).map(|lanes| (lanes, open())).collect();
            let mut start = 0u64;
            for frames in [4096, 1, 65_536, 333, 20_000] {
                render_tracks(&mut alone, start, frames, 1, || ()).unwrap();
                let bits = |segment: &StereoBuffer| segment.left.iter().chain(&segment.right).map(|x| x.to_bits()).collect::<Vec<u32>>();
                for (lanes, streams) in &mut in_lanes {
                    render_tracks(streams, start, frames, *lanes, || ()).unwrap();
                    let (got, want) = (bits(&streams[0].sum), bits(&alone[0].sum));
                    assert!(got == want, "{count} tracks, {lanes} lanes, segment at {start}: sample {:?} differs", got.iter().zip(&want).position(|(a, b)| a != b));
                }
                assert!(alone[0].sum.left.iter().any(|&x| x.abs() > 0.1), "segment at {start} holds audio");
                start += frames as u64;
            }
        }
    }
}
