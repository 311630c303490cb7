//! The whole mix, stage by stage. See the module docs of `audio` for the streaming design.

use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::align::estimate_lag;
use super::buffer::{StereoBuffer, BLOCK};
use super::decode::StemReader;
use super::deliver::{Delivered, Outputs};
use super::dsp::audible;
use super::export::max_frames;
use super::master::{Loudness, Mastered, Premaster, Premastered};
use super::matching::{design, measure, MatchingEq, Sound};
use super::render::{render_segment, TrackStream};
use super::resample::RateConverter;
use super::settings::{AlignMode, MasterSettings, MixSettings, SettingsError, TrackSettings, ValidSettings};
use super::spectrum::{normalised, spectral_error_db, Spectrum, BANDS};
use super::{AudioError, MixObserver, Stage, StemSource};

/// The share of `loading_stems` that probing takes when stems are measured after it.
const PROBED: f64 = 0.1;
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
    /// With `master.reference`: how close the master came to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceReport>,
}

/// The reference a master matched, and the match before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReferenceReport {
    pub stem_id: String,
    pub name: String,
    /// As a meter reads the reference file (a mono one as one channel).
    pub integrated_lufs: f64,
    /// RMS over the 1/3-octave bands (31.5 Hz-16 kHz) of the level differences between mix and
    /// reference after loudness normalisation, in dB: the bus before matching, the master after.
    pub spectral_error_db_before: Option<f64>,
    pub spectral_error_db_after: Option<f64>,
    /// Side over mid energy: the bus before, the master after, and the reference's own.
    pub width_ratio_before: Option<f64>,
    pub width_ratio_after: Option<f64>,
    pub width_ratio_reference: Option<f64>,
    /// The reference's normalised band levels, for the mix's analysis; not part of the report.
    #[serde(skip)]
    pub levels_db: Vec<Option<f64>>,
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
    /// With `auto.balance`: the stem's integrated loudness as uploaded (null for silence), and
    /// the gain that balance gave it before its `gain_db`. Null without balance.
    #[serde(default)]
    pub loudness_lufs: Option<f64>,
    #[serde(default)]
    pub auto_gain_db: Option<f64>,
}

struct Track<'a> {
    stem: &'a StemSource,
    settings: TrackSettings,
    source_rate: u32,
    source_frames: u64,
    offset_frames: i64,
    audible: bool,
    /// With `auto.balance`, once measured: the stem's loudness as uploaded, and its balancing gain
    /// (already in `settings.gain_db`).
    loudness_lufs: Option<f64>,
    auto_gain_db: Option<f64>,
}

/// The reference, measured: what the master matches.
struct Reference<'a> {
    stem: &'a StemSource,
    integrated_lufs: f64,
    levels: [Option<f64>; BANDS],
    width_ratio: Option<f64>,
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

/// Mixes `stems` into a stereo WAV at `outputs.master`, and the other files of `outputs` from it.
/// `settings` were validated for these stems (by [`MixSettings::validate`] or [`plan`]) and are
/// not checked again. Returns the report and each file of `outputs` as delivered, in order.
///
/// Each file is written to its temporary, a name the caller owns in the same directory, then
/// renamed into place: no file is ever seen half-written, and a failed or canceled mix leaves none
/// of its files behind, whole or not.
pub fn mix(stems: &[StemSource], settings: &ValidSettings, outputs: &Outputs, observer: &dyn MixObserver) -> Result<(MixReport, Vec<Delivered>), AudioError> {
    if stems.is_empty() {
        return Err(AudioError::NoStems);
    }
    let rate = settings.output_rate();
    let settings = settings.settings();
    let reference = stems.iter().find(|stem| settings.is_reference(stem));
    let played: Vec<StemSource> = stems.iter().filter(|stem| !settings.is_reference(stem)).cloned().collect();

    let mut tracks = load_stems(&played, settings, rate, observer)?;
    balance_stems(&mut tracks, settings, observer)?;
    align_stems(&mut tracks, settings, rate, observer)?;
    // The spill and the result's temporary share the result's directory (and its disk).
    let scratch = match outputs.master_temporary.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(scratch).map_err(AudioError::Export)?;
    // The reference is measured beside the bus's render, which needs nothing of it.
    let (reference, rendered) = rayon::join(
        || reference.map(|stem| measure_reference(stem, observer)).transpose(),
        || render_bus(&tracks, &settings.master, rate, scratch, reference.is_some(), observer),
    );
    let (reference, (mut premastered, skipped)) = (reference?, rendered?);
    let duration_s = premastered.frames() as f64 / f64::from(rate);
    let mut master = settings.master.clone();
    let mut matched = None;
    if let Some(reference) = &reference {
        master.target_lufs = Some(settings.master.target_lufs.unwrap_or(reference.integrated_lufs));
        // A silent bus has nothing to match: it passes through a flat filter.
        let eq = match (premastered.loudness()?, premastered.spectrum()) {
            (Some(bus_lufs), Some(bus)) => {
                matched = Some((spectral_error_db(&normalised(&bus.levels_db(), bus_lufs), &reference.levels), bus.width_ratio()));
                design(bus, bus_lufs, &reference.levels, reference.width_ratio)
            }
            _ => MatchingEq::flat(rate),
        };
        tracing::debug!(side_gain = eq.side_gain, predicted_error_db = eq.predicted_error_db, "matching the reference");
        premastered = premastered.rematch(&eq, scratch, observer)?;
    }
    let Mastered { loudness, spectrum: written, delivered } = premastered.master(&master, settings.output.bit_depth, outputs, observer)?;
    let reference = match reference {
        Some(reference) => {
            let after_levels = written.as_ref().zip(loudness.integrated_lufs).map(|(spectrum, lufs)| normalised(&spectrum.levels_db(), lufs));
            let (error_before, width_before) = matched.unwrap_or((None, None));
            Some(ReferenceReport {
                stem_id: reference.stem.id.clone(),
                name: reference.stem.name.clone(),
                integrated_lufs: reference.integrated_lufs,
                spectral_error_db_before: error_before,
                spectral_error_db_after: after_levels.and_then(|levels| spectral_error_db(&levels, &reference.levels)),
                width_ratio_before: width_before,
                width_ratio_after: written.as_ref().and_then(Spectrum::width_ratio),
                width_ratio_reference: reference.width_ratio,
                levels_db: reference.levels.to_vec(),
            })
        }
        None => None,
    };

    let report = MixReport {
        duration_s,
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
                loudness_lufs: track.loudness_lufs,
                auto_gain_db: track.auto_gain_db,
            })
            .collect(),
        reference,
    };
    Ok((report, delivered))
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
        let share = if settings.auto.balance { PROBED } else { 1.0 };
        observer.progress(Stage::LoadingStems, share * (i + 1) as f64 / stems.len() as f64);
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
            loudness_lufs: None,
            auto_gain_db: None,
        })
        .collect();
    let frames = tracks.iter().map(|t| end_frame(t, rate)).max().unwrap_or(0);
    if frames > max_frames(settings.output.bit_depth) {
        return Err(AudioError::TooLong { seconds: frames as f64 / f64::from(rate), max_seconds: max_frames(settings.output.bit_depth) as f64 / f64::from(rate) });
    }
    Ok(tracks)
}

/// The rest of `loading_stems` with `auto.balance`: each audible stem's loudness and the gain
/// that brings it to the common level (the mean of theirs, as the mix hears them) less its
/// `level_lu`. Stems are decoded in parallel on the current rayon pool.
fn balance_stems(tracks: &mut [Track], settings: &MixSettings, observer: &dyn MixObserver) -> Result<(), AudioError> {
    if !settings.auto.balance {
        return Ok(());
    }
    let balanced: Vec<usize> = (0..tracks.len()).filter(|&i| tracks[i].audible).collect();
    let done = std::sync::Mutex::new(0usize);
    let measured = balanced
        .par_iter()
        .with_max_len(1)
        .map(|&i| {
            let sound = measure(tracks[i].stem, false, observer)?;
            let mut done = done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *done += 1;
            observer.progress(Stage::LoadingStems, PROBED + (1.0 - PROBED) * *done as f64 / balanced.len() as f64);
            Ok(sound)
        })
        .collect::<Result<Vec<Sound>, AudioError>>()?;
    let heard: Vec<f64> = measured.iter().filter_map(|sound| sound.stereo_lufs).collect();
    if !heard.is_empty() {
        let common = heard.iter().sum::<f64>() / heard.len() as f64;
        for (&i, sound) in balanced.iter().zip(&measured) {
            let track = &mut tracks[i];
            let gain = sound.stereo_lufs.map_or(0.0, |lufs| common + track.settings.level_lu - lufs);
            track.settings.gain_db += gain;
            (track.loudness_lufs, track.auto_gain_db) = (sound.integrated_lufs(), Some(gain));
        }
    }
    observer.progress(Stage::LoadingStems, 1.0);
    Ok(())
}

/// The reference's loudness, spectrum and width; a silent one is refused.
fn measure_reference<'a>(stem: &'a StemSource, observer: &dyn MixObserver) -> Result<Reference<'a>, AudioError> {
    let sound = measure(stem, true, observer)?;
    let silent = || SettingsError { field: "master.reference".into(), reason: format!("stem \"{}\" is silent: it has no loudness or spectrum to match", stem.name) };
    let (Some(integrated_lufs), Some(levels)) = (sound.integrated_lufs(), sound.normalised_levels()) else { return Err(silent().into()) };
    Ok(Reference { stem, integrated_lufs, levels, width_ratio: sound.spectrum.as_ref().and_then(Spectrum::width_ratio) })
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

/// Pass one of the master, fed by the tracks: each segment of the bus is rendered from every
/// audible track (decoded, resampled and processed as it goes) and handed on. Returns the
/// premastered mix and, per track, the damaged packets its decoder skipped.
///
/// Tracks are processed and summed together here, so `processing_tracks` covers both and
/// `mixing` marks the end of the sum.
fn render_bus(
    tracks: &[Track],
    master: &MasterSettings,
    rate: u32,
    scratch: &Path,
    matching: bool,
    observer: &dyn MixObserver,
) -> Result<(Premastered, Vec<u64>), AudioError> {
    observer.progress(Stage::ProcessingTracks, 0.0);
    // A muted track still sets the length of the mix, as it does in a DAW.
    let length = tracks.iter().map(|t| end_frame(t, rate)).max().unwrap_or(0);
    let audible: Vec<&Track> = tracks.iter().filter(|t| t.audible).collect();
    let mut streams = audible.iter().map(|t| TrackStream::open(t.stem, &t.settings, t.source_rate, rate, t.offset_frames)).collect::<Result<Vec<_>, _>>()?;
    let total_work = audible.iter().map(|t| t.source_frames).sum::<u64>().max(1);
    let mut premaster = if matching { Premaster::before_matching(master, rate, scratch)? } else { Premaster::new(master, rate, scratch)? };
    // Three stages, overlapped: while the tracks render one segment, the master strip takes the
    // one before and the one before that is measured, so that no core waits on another's part.
    let (mut rendered, mut to_strip, mut to_measure) = (StereoBuffer::default(), None::<StereoBuffer>, None::<StereoBuffer>);
    for start in (0..length).step_by(BLOCK) {
        if observer.is_cancelled() {
            return Err(AudioError::Canceled);
        }
        let frames = (length - start).min(BLOCK as u64) as usize;
        render_segment(&mut streams, start, frames, &mut rendered, || premaster.push_overlapped(to_strip.as_mut(), to_measure.as_ref()))??;
        // The measured segment's buffer is the next to render into.
        let spare = to_measure.take().unwrap_or_default();
        to_measure = to_strip.replace(std::mem::replace(&mut rendered, spare));
        let done: u64 = streams.iter().map(|s| s.frames_read).sum();
        observer.progress(Stage::ProcessingTracks, (done as f64 / total_work as f64).min(1.0));
    }
    premaster.push_overlapped(to_strip.as_mut(), to_measure.as_ref())?;
    premaster.push_overlapped(None, to_strip.as_ref())?;
    observer.progress(Stage::ProcessingTracks, 1.0);
    observer.progress(Stage::Mixing, 0.0);
    let premastered = premaster.finish()?;
    observer.progress(Stage::Mixing, 1.0);
    let mut streams = streams.into_iter();
    let skipped = tracks.iter().map(|t| if t.audible { streams.next().map_or(0, |s| s.skipped_packets()) } else { 0 }).collect();
    Ok((premastered, skipped))
}
