//! The whole mix, stage by stage. See the module docs of `audio` for the streaming design.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::align::estimate_lag;
use super::buffer::StereoBuffer;
use super::decode::StemReader;
use super::dsp::{audible, TrackChain};
use super::export::{export_wav, max_frames};
use super::master::{master, Loudness};
use super::resample::RateConverter;
use super::settings::{AlignMode, MixSettings, TrackSettings, ValidSettings};
use super::{panic_message, AudioError, MixObserver, Stage, StemSource};

/// How much of each stem's start `align: auto` compares.
const ALIGN_EXCERPT_S: f64 = 20.0;
/// The largest shift `align: auto` will detect.
const ALIGN_MAX_LAG_S: f64 = 5.0;

/// What a finished mix is, as the contract's `report` field carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MixReport {
    pub duration_s: f64,
    pub sample_rate: u32,
    pub bit_depth: u16,
    pub channels: u16,
    #[serde(flatten)]
    pub loudness: Loudness,
    pub stems: Vec<StemReport>,
}

/// How one stem went into the mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StemReport {
    pub stem_id: String,
    pub name: String,
    /// Where the stem starts in the mix: `offset_ms` plus what `align: auto` found.
    pub offset_ms: f64,
    pub audible: bool,
    /// Damaged packets skipped while decoding.
    pub skipped_packets: u64,
}

struct Track<'a> {
    stem: &'a StemSource,
    settings: TrackSettings,
    source_rate: u32,
    source_frames: u64,
    offset_frames: i64,
    audible: bool,
}

/// Validates `settings` for a mix of `stems` whose rates are not at hand: opens each stem's header
/// to learn the highest rate, then validates. For the offline command, and for jobs stored before
/// their settings were stored validated.
pub fn plan(stems: &[StemSource], settings: MixSettings) -> Result<ValidSettings, AudioError> {
    if stems.is_empty() {
        return Err(AudioError::NoStems);
    }
    let mut highest_rate = 0;
    for stem in stems {
        highest_rate = highest_rate.max(StemReader::source(stem)?.info.sample_rate);
    }
    Ok(settings.validate(stems, highest_rate)?)
}

/// Mixes `stems` into a stereo WAV at `output`. `settings` were validated for these stems (by
/// [`MixSettings::validate`] or [`plan`]) and are not checked again.
///
/// The file is written to `temporary`, a name the caller owns in the same directory as `output`,
/// then renamed into place: `output` is never seen half-written, and a failed or canceled mix
/// leaves neither file behind.
pub fn mix(stems: &[StemSource], settings: &ValidSettings, output: &Path, temporary: &Path, observer: &dyn MixObserver) -> Result<MixReport, AudioError> {
    if stems.is_empty() {
        return Err(AudioError::NoStems);
    }
    let rate = settings.output_rate();
    let settings = settings.settings();

    let mut tracks = load_stems(stems, settings, rate, observer)?;
    align_stems(&mut tracks, settings, rate, observer)?;
    let (buses, skipped) = process_tracks(&tracks, rate, observer)?;
    let mut bus = sum_buses(buses, &tracks, rate, observer)?;
    let loudness = master(&mut bus, &settings.master, rate, observer)?;
    observer.progress(Stage::Exporting, 0.0);
    export_wav(&bus, rate, settings.output.bit_depth, output, temporary, observer)?;

    Ok(MixReport {
        duration_s: bus.len() as f64 / f64::from(rate),
        sample_rate: rate,
        bit_depth: settings.output.bit_depth.bits(),
        channels: 2,
        loudness,
        stems: tracks
            .iter()
            .zip(skipped)
            .map(|(track, skipped_packets)| StemReport {
                stem_id: track.stem.id.clone(),
                name: track.stem.name.clone(),
                offset_ms: track.offset_frames as f64 * 1000.0 / f64::from(rate),
                audible: track.audible,
                skipped_packets,
            })
            .collect(),
    })
}

/// Opens and probes every stem, and checks that the mix at `rate` fits in a WAV file.
fn load_stems<'a>(stems: &'a [StemSource], settings: &MixSettings, rate: u32, observer: &dyn MixObserver) -> Result<Vec<Track<'a>>, AudioError> {
    observer.progress(Stage::LoadingStems, 0.0);
    let track_settings: Vec<TrackSettings> = stems.iter().map(|s| settings.track_for(s)).collect();
    let audible = audible(&track_settings);
    let mut infos = Vec::with_capacity(stems.len());
    for (i, stem) in stems.iter().enumerate() {
        if observer.is_cancelled() {
            return Err(AudioError::Canceled);
        }
        infos.push(StemReader::source(stem)?.info);
        observer.progress(Stage::LoadingStems, (i + 1) as f64 / stems.len() as f64);
    }
    let tracks: Vec<Track> = stems
        .iter()
        .zip(track_settings)
        .zip(infos)
        .zip(audible)
        .map(|(((stem, settings), info), audible)| Track {
            stem,
            offset_frames: (settings.offset_ms / 1000.0 * f64::from(rate)).round() as i64,
            settings,
            source_rate: info.sample_rate,
            source_frames: info.frames,
            audible,
        })
        .collect();
    let frames = tracks.iter().map(|t| end_frame(t, rate)).max().unwrap_or(0);
    if frames > max_frames(settings.output.bit_depth) {
        return Err(AudioError::TooLong { seconds: frames as f64 / f64::from(rate), max_seconds: max_frames(settings.output.bit_depth) as f64 / f64::from(rate) });
    }
    Ok(tracks)
}

fn end_frame(track: &Track, rate: u32) -> u64 {
    let frames = (track.source_frames as f64 * f64::from(rate) / f64::from(track.source_rate)).round() as i64;
    (frames + track.offset_frames).max(0) as u64
}

/// Applies `offset_ms`, and with `align: auto` the offset found against the first stem.
fn align_stems(tracks: &mut [Track], settings: &MixSettings, rate: u32, observer: &dyn MixObserver) -> Result<(), AudioError> {
    observer.progress(Stage::AligningStems, 0.0);
    if settings.align == AlignMode::Auto && tracks.len() > 1 {
        let excerpt_frames = (ALIGN_EXCERPT_S * f64::from(rate)) as usize;
        let reference = excerpt(&tracks[0], rate, excerpt_frames, observer)?;
        for i in 1..tracks.len() {
            let other = excerpt(&tracks[i], rate, excerpt_frames, observer)?;
            if let Some(lag) = estimate_lag(&reference, &other, (ALIGN_MAX_LAG_S * f64::from(rate)) as usize) {
                tracks[i].offset_frames -= lag;
            }
            observer.progress(Stage::AligningStems, i as f64 / (tracks.len() - 1) as f64);
        }
    }
    observer.progress(Stage::AligningStems, 1.0);
    Ok(())
}

/// The first `frames` of a stem at the output rate, summed to mono.
fn excerpt(track: &Track, rate: u32, frames: usize, observer: &dyn MixObserver) -> Result<Vec<f32>, AudioError> {
    let mut reader = StemReader::source(track.stem)?;
    let mut converter = RateConverter::new(track.source_rate, rate)?;
    let (mut chunk, mut converted) = (StereoBuffer::default(), StereoBuffer::default());
    while converted.len() < frames && reader.next_chunk(&mut chunk)? {
        if observer.is_cancelled() {
            return Err(AudioError::Canceled);
        }
        converter.push(&chunk, &mut converted)?;
    }
    converter.finish(&mut converted)?;
    Ok(converted.left.iter().zip(&converted.right).take(frames).map(|(l, r)| 0.5 * (l + r)).collect())
}

/// Decodes, resamples and processes every audible track into one bus per worker. Returns the
/// buses and, per track, the damaged packets its decoder skipped.
///
/// The workers are tasks on the current rayon pool (the engine's, for a job), one per pool thread
/// at most, each pulling the next track from a shared index into its own bus: memory grows with
/// the workers, not the tracks, and however many mixes run, the threads are the pool's.
fn process_tracks(tracks: &[Track], rate: u32, observer: &dyn MixObserver) -> Result<(Vec<StereoBuffer>, Vec<u64>), AudioError> {
    observer.progress(Stage::ProcessingTracks, 0.0);
    let total_work: u64 = tracks.iter().filter(|t| t.audible).map(|t| t.source_frames.max(1)).sum::<u64>().max(1);
    let done = AtomicU64::new(0);
    let next = AtomicUsize::new(0);
    let skipped = Mutex::new(vec![0u64; tracks.len()]);
    let workers = rayon::current_num_threads().clamp(1, tracks.len());
    let report = |frames: u64| {
        let done = done.fetch_add(frames, Ordering::Relaxed) + frames;
        observer.progress(Stage::ProcessingTracks, (done as f64 / total_work as f64).min(1.0));
    };
    let worker = || -> Result<StereoBuffer, AudioError> {
        let mut bus = StereoBuffer::default();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(track) = tracks.get(index) else { return Ok(bus) };
            if !track.audible {
                continue;
            }
            let skipped_packets = process_track(track, rate, &mut bus, observer, &report)?;
            skipped.lock().expect("no panics while held")[index] = skipped_packets;
        }
    };

    let mut buses: Vec<Result<StereoBuffer, AudioError>> = (0..workers).map(|_| Ok(StereoBuffer::default())).collect();
    rayon::scope(|scope| {
        for bus in &mut buses {
            let worker = &worker;
            scope.spawn(move |_| {
                // Caught here, so that a bug in one track fails the mix instead of unwinding
                // through the pool into the caller.
                *bus = catch_unwind(AssertUnwindSafe(worker))
                    .unwrap_or_else(|panic| Err(AudioError::Internal(format!("a track worker panicked: {}", panic_message(&*panic)))));
            });
        }
    });
    let buses = buses.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok((buses, skipped.into_inner().expect("workers are done")))
}

fn process_track(track: &Track, rate: u32, bus: &mut StereoBuffer, observer: &dyn MixObserver, report: &dyn Fn(u64)) -> Result<u64, AudioError> {
    let mut reader = StemReader::source(track.stem)?;
    let mut converter = RateConverter::new(track.source_rate, rate)?;
    let mut chain = TrackChain::new(&track.settings, rate);
    let (mut chunk, mut converted) = (StereoBuffer::default(), StereoBuffer::default());
    let mut position = track.offset_frames;
    let mut reported = 0u64;
    loop {
        if observer.is_cancelled() {
            return Err(AudioError::Canceled);
        }
        let more = reader.next_chunk(&mut chunk)?;
        if more {
            converter.push(&chunk, &mut converted)?;
        } else {
            converter.finish(&mut converted)?;
        }
        chain.process(&mut converted);
        position = add_into(bus, &converted, position);
        converted.clear();
        // Progress counts source frames; a stem longer than declared just holds at its share.
        let frames = chunk.len() as u64;
        let share = frames.min(track.source_frames.max(1).saturating_sub(reported));
        reported += share;
        report(share);
        if !more {
            report(track.source_frames.max(1) - reported);
            return Ok(reader.info.skipped_packets);
        }
    }
}

/// Adds `chunk` into `bus` starting at `position` (which may be negative: that part is cut),
/// growing the bus as needed. Returns the position after the chunk.
fn add_into(bus: &mut StereoBuffer, chunk: &StereoBuffer, position: i64) -> i64 {
    let skip = (-position).clamp(0, chunk.len() as i64) as usize;
    if skip == chunk.len() {
        return position + chunk.len() as i64;
    }
    let start = (position + skip as i64) as usize;
    let end = start + chunk.len() - skip;
    if bus.len() < end {
        bus.left.resize(end, 0.0);
        bus.right.resize(end, 0.0);
    }
    bus.left[start..end].iter_mut().zip(&chunk.left[skip..]).for_each(|(out, x)| *out += x);
    bus.right[start..end].iter_mut().zip(&chunk.right[skip..]).for_each(|(out, x)| *out += x);
    position + chunk.len() as i64
}

/// The mixing stage: sums the workers' buses into one, long enough for every track (a muted
/// track still sets the length of the mix, as it does in a DAW).
fn sum_buses(mut buses: Vec<StereoBuffer>, tracks: &[Track], rate: u32, observer: &dyn MixObserver) -> Result<StereoBuffer, AudioError> {
    observer.progress(Stage::Mixing, 0.0);
    let length = buses.iter().map(StereoBuffer::len).chain(tracks.iter().map(|t| end_frame(t, rate) as usize)).max().unwrap_or(0);
    buses.sort_by_key(|b| std::cmp::Reverse(b.len()));
    let mut rest = buses.into_iter();
    let mut bus = rest.next().unwrap_or_default();
    bus.left.resize(length, 0.0);
    bus.right.resize(length, 0.0);
    let others: Vec<StereoBuffer> = rest.collect();
    for (i, other) in others.iter().enumerate() {
        if observer.is_cancelled() {
            return Err(AudioError::Canceled);
        }
        add_into(&mut bus, other, 0);
        observer.progress(Stage::Mixing, (i + 1) as f64 / others.len() as f64);
    }
    if bus.left.iter().chain(&bus.right).any(|x| !x.is_finite()) {
        return Err(AudioError::Internal("the mix bus holds non-finite samples".into()));
    }
    observer.progress(Stage::Mixing, 1.0);
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_into_cuts_negative_positions_and_grows() {
        let mut bus = StereoBuffer { left: vec![1.0; 2], right: vec![1.0; 2] };
        let chunk = StereoBuffer { left: vec![1.0, 2.0, 3.0], right: vec![4.0, 5.0, 6.0] };
        assert_eq!(add_into(&mut bus, &chunk, -5), -2, "wholly before the start: nothing added");
        assert_eq!(bus.left, [1.0, 1.0]);
        assert_eq!(add_into(&mut bus, &chunk, -1), 2);
        assert_eq!(bus.left, [3.0, 4.0]);
        assert_eq!(add_into(&mut bus, &chunk, 3), 6);
        assert_eq!(bus.left, [3.0, 4.0, 0.0, 1.0, 2.0, 3.0]);
        assert_eq!(bus.right, [6.0, 7.0, 0.0, 4.0, 5.0, 6.0]);
    }
}
