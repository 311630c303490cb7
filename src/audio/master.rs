//! The master, in two streaming passes over the summed bus, so that memory does not grow with
//! the length of the mix.
//!
//! Pass one ([`Premaster`]) runs the bus EQ and compressor on each segment as it is rendered,
//! spills the result to an unnamed temporary file, and keeps a summary of it on disk: per chunk
//! of a few dozen frames, the K-weighted energy (BS.1770-4) and the largest true peak. Limiting
//! lowers loudness, so gain and limiter are solved together on that summary: the limiter works
//! on chunks, so its envelope for any gain follows from the summary alone, and with it the
//! loudness of the limited mix. Pass two reads the spill back, applies the gain and the envelope,
//! and writes the WAV while it measures exactly what is written (after quantisation and dither).
//! That measurement is the report, and it is checked: were the written loudness off the target
//! (the summary predicts a limited mix's closely, not exactly) or its true peak over the ceiling,
//! pass two runs again with the gain solved anew or the excess taken out.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::buffer::{StereoBuffer, BLOCK};
use super::deliver::{encode_wav, lossy_encoder, Delivered, Measured, OutputFile, Outputs};
use super::dsp::{db_to_gain, gain_to_db, ChannelStrip};
use super::export::{max_quantisation_error, Quantiser, WavSink};
use super::loudness::{step_frames, Gating, KWeighting, LoudnessMeter};
use super::matching::{MatchingEq, MatchingFilter};
use super::settings::{BitDepth, Format, FormatSettings, MasterSettings};
use super::spectrum::{Spectrum, SpectrumMeter};
use super::true_peak::{self, Limiter, PeakDetector, METER_REACH};
use super::{AudioError, MixObserver, Stage};

/// Close enough to the target that another pass would not be audible or measurable by a client.
const LOUDNESS_TOLERANCE_LU: f64 = 0.05;
/// Gain solves on the summary, at most.
const MAX_SOLVES: usize = 12;
/// Measurements of a solved gain on the audio itself, at most.
const MAX_CHECKS: usize = 3;
/// The most the limiter is asked to take off a target's worth of gain: beyond it, a target the
/// material cannot reach is missed rather than the mix flattened.
const MAX_LIMITING_DB: f64 = 20.0;
/// Times pass two may run; the last only scales the one before.
const MAX_RENDERS: usize = 3;
/// How far under the written file's ceiling the limiter holds the peaks it sees. The gain moves
/// across the samples an interpolated point is made from, so a written peak can read a hair over
/// what the limiter held (2.4e-5 over, on a real recording matched to another): with this room
/// the file is written once, where without it pass two ran three times; no meter shows the cost.
const LIMITER_ROOM_DB: f64 = 0.01;
/// A written peak at most this far over its ceiling is scaled off, which costs as much loudness,
/// a fifth of [`LOUDNESS_TOLERANCE_LU`].
const TRIM_EXCESS_DB: f64 = 0.01;
/// True-peak meters disagree with each other and with the band-limited signal near Nyquist, by
/// their filters and grids. The detector reads close to the band-limited signal and at least what
/// the `ebur128` crate reads; ffmpeg's meter, resampling 44.1 kHz to 192 kHz between 1024
/// interpolated filter phases, read up to 0.10 dB above it on the drum recordings
/// (tests/api/engine.rs, every rate and depth). At ffmpeg's highest point on one such file, a
/// direct sinc interpolation read 0.886 where ffmpeg read 0.896: the excess is ffmpeg's filter.
/// The master holds its reading this far under the ceiling, so the file passes every meter
/// tested.
const METER_MARGIN_DB: f64 = 0.12;
/// How far a decoded lossy file may be from the master's loudness: half the contract's 0.5 LU,
/// so that meters that differ by a tenth still agree it is within.
const LOSSY_LOUDNESS_TOLERANCE_LU: f64 = 0.25;
/// The most a lossy file over its ceiling is scaled down by, rather than limited harder.
const LOSSY_TRIM_DB: f64 = 0.15;
/// Encodes of one lossy file, at most.
const MAX_ENCODES: usize = 4;
/// How far a lossy file's decoded length may be from the master's: the contract's gapless
/// promise.
const GAPLESS_TOLERANCE_S: f64 = 0.001;
/// What an encode that read over takes off beyond its excess, so that the next is not over again
/// by a hair.
const LOSSY_STEP_DB: f64 = 0.03;

/// How far under the master's limit a lossy file's limiter starts: lossy coding raises true
/// peaks, the more the fewer bits it has. Chosen from what the asc-music recordings read over
/// their limiter's level once encoded (README, "Choices"), more for fewer bits; a file still over
/// is encoded again.
fn lossy_margin_db(format: FormatSettings) -> f64 {
    let kbps = f64::from(format.bitrate().unwrap_or(320));
    match format.format {
        Format::Mp3 => 0.5 + 0.5 * (320.0 - kbps) / 224.0,
        Format::Opus => 1.0 + 0.5 * (256.0 - kbps) / 192.0,
        Format::Wav | Format::Flac => 0.0,
    }
}

/// Bytes per chunk in the summary: energy and peak, both f32.
const SUMMARY_RECORD: usize = 8;

/// Loudness of a finished mix; `None` where silence has no value (integrated loudness of silence).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Loudness {
    pub integrated_lufs: Option<f64>,
    pub true_peak_dbtp: Option<f64>,
    pub loudness_range_lu: Option<f64>,
}

/// Frames per summary chunk at `rate`: the smallest divisor of the 100 ms step that is at least
/// 32 frames (and so longer than a meter's filter reaches either side), so that chunks tile the
/// loudness gating's steps exactly.
fn chunk_frames(rate: u32) -> usize {
    let step = step_frames(rate);
    (2 * METER_REACH..=step).find(|&d| step.is_multiple_of(d)).unwrap_or(step)
}

/// Pass one: the bus, segment by segment, through the master strip into the spill and summary.
pub struct Premaster {
    rate: u32,
    strip: ChannelStrip,
    weighting: KWeighting,
    /// None before a matching pass, which finds the peaks of what it makes.
    detector: Option<PeakDetector>,
    /// The bus's spectrum, metered for a matching pass to follow.
    spectrum: Option<SpectrumMeter>,
    chunk_frames: usize,
    spill: BufWriter<File>,
    summary: BufWriter<File>,
    frames: u64,
    /// The segment being spilled, as bytes (kept to spare an allocation per segment).
    spill_bytes: Vec<u8>,
    /// Per-frame energies and peaks not yet gathered into a whole chunk.
    energies: Vec<f64>,
    peaks: Vec<f32>,
    chunks: u64,
    peak: f32,
}

impl Premaster {
    /// The spill and the summary are unnamed files in `scratch`: nothing is left behind, whatever
    /// happens to the process.
    pub fn new(settings: &MasterSettings, rate: u32, scratch: &Path) -> Result<Self, AudioError> {
        let unnamed = || tempfile::tempfile_in(scratch).map_err(AudioError::Export);
        Ok(Self {
            rate,
            strip: ChannelStrip::new(&settings.eq, settings.compressor.as_ref(), rate),
            weighting: KWeighting::new(rate),
            detector: Some(PeakDetector::new(rate)),
            spectrum: None,
            chunk_frames: chunk_frames(rate),
            spill: BufWriter::with_capacity(1 << 20, unnamed()?),
            summary: BufWriter::with_capacity(1 << 16, unnamed()?),
            frames: 0,
            spill_bytes: Vec::new(),
            energies: Vec::new(),
            peaks: Vec::new(),
            chunks: 0,
            peak: 0.0,
        })
    }

    /// Pass one of a mix to be matched to a reference ([`Premastered::rematch`] must follow): the
    /// bus's spectrum is metered, and its true peaks are not, since the matching pass reads the
    /// peaks of what it makes.
    pub fn before_matching(settings: &MasterSettings, rate: u32, scratch: &Path) -> Result<Self, AudioError> {
        Ok(Self { detector: None, spectrum: Some(SpectrumMeter::new(rate)), ..Self::new(settings, rate, scratch)? })
    }

    /// The next segment of the bus (at most [`BLOCK`] frames; only the last may be shorter).
    pub fn push(&mut self, segment: &mut StereoBuffer) -> Result<(), AudioError> {
        self.push_overlapped(Some(segment), None)?;
        self.push_overlapped(None, Some(segment))
    }

    /// Pass one's two stages at once, on the current rayon pool: `next` (the next segment of the
    /// bus, as for [`Self::push`]) through the strip into the spill, while `previous`, the
    /// segment that went there before it, is measured into the summary.
    pub fn push_overlapped(&mut self, next: Option<&mut StereoBuffer>, previous: Option<&StereoBuffer>) -> Result<(), AudioError> {
        let Premaster { strip, spill, spill_bytes, frames, weighting, detector, spectrum, energies, peaks, .. } = self;
        let spilling = || -> Result<(), AudioError> {
            let Some(segment) = next else { return Ok(()) };
            debug_assert!(segment.len() <= BLOCK && frames.is_multiple_of(BLOCK as u64));
            strip.process(&mut segment.left, &mut segment.right);
            if segment.left.iter().chain(&segment.right).any(|x| !x.is_finite()) {
                return Err(AudioError::Internal("the mix bus holds non-finite samples".into()));
            }
            // Sized once, then filled in a loop that vectorises (pushed a sample at a time, each
            // push checked the capacity).
            spill_bytes.resize(8 * segment.len(), 0);
            for (bytes, x) in spill_bytes.chunks_exact_mut(4).zip(segment.left.iter().chain(&segment.right)) {
                bytes.copy_from_slice(&x.to_le_bytes());
            }
            spill.write_all(spill_bytes).map_err(AudioError::Export)?;
            *frames += segment.len() as u64;
            Ok(())
        };
        let measuring = || {
            let Some(segment) = previous else { return };
            let from = energies.len();
            energies.resize(from + segment.len(), 0.0);
            let energies = &mut energies[from..];
            rayon::join(
                || weighting.add_energy(&segment.left, &segment.right, energies),
                || {
                    match detector {
                        Some(detector) => detector.push(&segment.left, &segment.right, peaks),
                        None => peaks.resize(peaks.len() + segment.len(), 0.0),
                    }
                    if let Some(spectrum) = spectrum {
                        spectrum.push(&segment.left, &segment.right);
                    }
                },
            );
        };
        let (spilled, ()) = rayon::join(spilling, measuring);
        spilled?;
        self.write_chunks(false)
    }

    /// Writes every whole chunk whose energies and peaks are both known; at the end, the last
    /// part-chunk too.
    fn write_chunks(&mut self, end: bool) -> Result<(), AudioError> {
        let ready = self.energies.len().min(self.peaks.len());
        let whole = ready / self.chunk_frames * self.chunk_frames;
        let upto = if end { ready } else { whole };
        let mut records = Vec::with_capacity(upto.div_ceil(self.chunk_frames) * SUMMARY_RECORD);
        for (energies, peaks) in self.energies[..upto].chunks(self.chunk_frames).zip(self.peaks[..upto].chunks(self.chunk_frames)) {
            let energy = energies.iter().sum::<f64>() as f32;
            let peak = peaks.iter().copied().fold(0.0, f32::max);
            records.extend_from_slice(&energy.to_le_bytes());
            records.extend_from_slice(&peak.to_le_bytes());
            self.chunks += 1;
            self.peak = self.peak.max(peak);
        }
        self.summary.write_all(&records).map_err(AudioError::Export)?;
        self.energies.drain(..upto);
        self.peaks.drain(..upto);
        Ok(())
    }

    /// Ends pass one.
    pub fn finish(mut self) -> Result<Premastered, AudioError> {
        if let Some(detector) = &mut self.detector {
            detector.finish(&mut self.peaks);
        }
        self.write_chunks(true)?;
        let into_file = |writer: BufWriter<File>| writer.into_inner().map_err(|err| AudioError::Export(err.into_error()));
        Ok(Premastered {
            rate: self.rate,
            chunk_frames: self.chunk_frames,
            frames: self.frames,
            chunks: self.chunks,
            peak: self.peak,
            pass: match self.spectrum {
                Some(spectrum) => Pass::BeforeMatching(spectrum.finish()),
                None => Pass::Plain,
            },
            spill: into_file(self.spill)?,
            summary: into_file(self.summary)?,
        })
    }
}

/// The spilled, bus-processed mix and its summary, ready for pass two.
pub struct Premastered {
    rate: u32,
    chunk_frames: usize,
    frames: u64,
    chunks: u64,
    /// The largest true peak of the bus.
    peak: f32,
    pass: Pass,
    spill: File,
    summary: File,
}

/// What made a [`Premastered`].
enum Pass {
    Plain,
    /// [`Premaster::before_matching`], with the bus's spectrum: its summary's peaks are zeros,
    /// no bound on anything, so it is mastered only once matched.
    BeforeMatching(Spectrum),
    /// [`Premastered::rematch`]: what is written is metered for its spectrum too.
    Matched,
}

/// What the master made: its loudness, its spectrum as written when it was matched to a
/// reference, and each file as delivered, in order.
pub struct Mastered {
    pub loudness: Loudness,
    pub spectrum: Option<Spectrum>,
    pub delivered: Vec<Delivered>,
}

/// The levels a master holds its true peaks to under a ceiling, as linear gains.
struct PeakLevels {
    /// What the written file's detector may read: the ceiling less [`METER_MARGIN_DB`].
    aim: f32,
    /// What a file scaled down to fit is scaled to.
    held: f32,
    /// What the limiter holds the peaks it sees to.
    limit: f32,
}

impl PeakLevels {
    fn new(true_peak_dbtp: f64, depth: BitDepth) -> Self {
        let aim = db_to_gain(true_peak_dbtp - METER_MARGIN_DB) as f32;
        // Rounding and dither move each sample by at most `max_quantisation_error`; a meter's
        // interpolated point moves by at most that times its filter's absolute tap sum, which is
        // under 2 for the 4x filters of libebur128 and ffmpeg. f32 arithmetic on the way to the
        // file errs by parts in 10^7. A file scaled down holds that much under the aim; the
        // limiter holds [`LIMITER_ROOM_DB`] under that.
        let held = aim * (1.0 - 1e-5) - 2.0 * max_quantisation_error(depth);
        Self { aim, held, limit: held * db_to_gain(-LIMITER_ROOM_DB) as f32 }
    }
}

/// Where the master's gain stands in being checked against its loudness target.
struct Check {
    gain_db: f64,
    /// How far the audio measured from the summary's prediction, last time.
    bias: f64,
    /// The prediction for a limited plan not yet measured on the audio.
    predicted: Option<f64>,
    /// Measurements made.
    done: usize,
}

impl Check {
    /// Takes the loudness `measured` on a file written under the plan last solved: how far it is
    /// from the summary's prediction, where the plan was limited, missed the `target` and may be
    /// measured again; otherwise what is written stands.
    fn missed_by(&mut self, measured: Option<f64>, target: f64) -> Option<f64> {
        let predicted = self.predicted.take()?;
        self.done += 1;
        tracing::debug!(check = self.done, predicted, measured, "measured a limited plan's loudness");
        let measured = measured.filter(|measured| (target - measured).abs() >= LOUDNESS_TOLERANCE_LU / 2.0)?;
        (self.done < MAX_CHECKS).then_some(measured - predicted)
    }
}

/// What a render wrote: its loudness, and its true peak (linear) as the detector read it.
struct Written {
    loudness: Loudness,
    peak: f32,
    /// The spectrum of what was written, for a matched master.
    spectrum: Option<Spectrum>,
    /// Frames the detector read: those of the chunks that may hold the peak.
    frames_read: u64,
}

/// The gain and limiter a render applies.
#[derive(Debug, Clone, Copy)]
struct Plan {
    gain: f32,
    /// What the limiter holds true peaks to, linear.
    limit: f32,
}

impl Premastered {
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The bus's integrated loudness as it stands (no gain, no limiting: exact from the summary).
    pub fn loudness(&self) -> Result<Option<f64>, AudioError> {
        self.predict(Plan { gain: 1.0, limit: f32::MAX })
    }

    /// The bus's spectrum, metered by a pass one [`Premaster::before_matching`].
    pub fn spectrum(&self) -> Option<&Spectrum> {
        match &self.pass {
            Pass::BeforeMatching(spectrum) => Some(spectrum),
            Pass::Plain | Pass::Matched => None,
        }
    }

    /// Pass one again, through `eq`: the spill read back, filtered, and spilled and summarised
    /// anew in `scratch`, this one's files closing as it is dropped.
    pub fn rematch(self, eq: &MatchingEq, scratch: &Path, observer: &dyn MixObserver) -> Result<Premastered, AudioError> {
        let mut premaster = Premaster::new(&MasterSettings::default(), self.rate, scratch)?;
        let mut filter = MatchingFilter::new(eq);
        let (mut bytes, mut segment, mut filtered) = (Vec::new(), StereoBuffer::default(), StereoBuffer::default());
        // Whole blocks of filtered bus for the premaster, which takes them while the filter makes
        // the next; their buffers are filled again once taken.
        let (mut ready, mut spare) = (Vec::new(), Vec::new());
        let mut push_ready = |ready: &mut Vec<StereoBuffer>, spare: &mut Vec<StereoBuffer>| {
            ready.drain(..).try_for_each(|mut block| {
                premaster.push(&mut block)?;
                spare.push(block);
                Ok::<_, AudioError>(())
            })
        };
        for start in (0..self.frames).step_by(BLOCK) {
            if observer.is_cancelled() {
                return Err(AudioError::Canceled);
            }
            let frames = (self.frames - start).min(BLOCK as u64) as usize;
            let (filtering, pushing) = rayon::join(
                || {
                    self.read_segment(start, frames, &mut bytes, &mut segment)?;
                    filter.push(&segment, &mut filtered);
                    Ok::<_, AudioError>(())
                },
                || push_ready(&mut ready, &mut spare),
            );
            filtering?;
            pushing?;
            take_blocks(&mut filtered, &mut ready, &mut spare, false);
            observer.progress(Stage::Mixing, (start + frames as u64) as f64 / self.frames as f64);
        }
        filter.finish(&mut filtered);
        take_blocks(&mut filtered, &mut ready, &mut spare, true);
        push_ready(&mut ready, &mut spare)?;
        Ok(Premastered { pass: Pass::Matched, ..premaster.finish()? })
    }

    /// Frames `start..start + frames` of the spill, as written.
    fn read_segment(&self, start: u64, frames: usize, bytes: &mut Vec<u8>, segment: &mut StereoBuffer) -> Result<(), AudioError> {
        bytes.resize(8 * frames, 0);
        self.spill.read_exact_at(bytes, 8 * start).map_err(AudioError::Export)?;
        let (left, right) = bytes.split_at(4 * frames);
        for (channel, bytes) in [(&mut segment.left, left), (&mut segment.right, right)] {
            channel.resize(frames, 0.0);
            for (x, bytes) in channel.iter_mut().zip(bytes.chunks_exact(4)) {
                *x = f32::from_le_bytes(bytes.try_into().expect("four bytes"));
            }
        }
        Ok(())
    }

    /// Summary records in order: (energy, peak) per chunk.
    fn records(&self) -> impl Iterator<Item = std::io::Result<(f32, f32)>> + '_ {
        let total = self.chunks as usize;
        let mut buffer = Vec::new();
        let (mut next, mut at) = (0usize, 0usize);
        std::iter::from_fn(move || {
            if next == total {
                return None;
            }
            if at == buffer.len() {
                let count = (total - next).min(1 << 14);
                buffer.resize(count * SUMMARY_RECORD, 0);
                at = 0;
                if let Err(err) = self.summary.read_exact_at(&mut buffer, (next * SUMMARY_RECORD) as u64) {
                    return Some(Err(err));
                }
            }
            let field = |i: usize| f32::from_le_bytes(buffer[at + 4 * i..at + 4 * i + 4].try_into().expect("four bytes"));
            let record = (field(0), field(1));
            at += SUMMARY_RECORD;
            next += 1;
            Some(Ok(record))
        })
    }

    /// A limiter fed with the summary's peaks. A summary that cannot be read stops the feed and
    /// leaves the error in `failed`.
    fn limiter<'a>(&'a self, plan: Plan, failed: &'a ReadError) -> Limiter<impl FnMut() -> Option<f32> + 'a> {
        let mut records = self.records();
        let peaks = move || match records.next()? {
            Ok((_, peak)) => Some(peak),
            Err(err) => {
                failed.set(err);
                None
            }
        };
        Limiter::new(peaks, self.rate, self.chunk_frames, plan.gain, plan.limit)
    }

    /// Per chunk, in order, a lower and an upper bound on the detector's reading of the chunk as
    /// written under `plan` and `trim`, from the summary and the limiter's envelope alone: the
    /// chunks whose upper bound is under the highest lower bound cannot hold the written peak,
    /// so pass two need not read them. A summary that cannot be read leaves the error in `failed`.
    ///
    /// A point the detector reads is made from the samples within its reach (at most `reach`
    /// chunks away), with weights whose absolute values sum to at most `weight_bound`. Written,
    /// each of those samples is its bus sample times a gain between the least and the greatest
    /// over the reach, `low` and `high`; so the point is `high` (or `low`) times the same point
    /// on the bus, which pass one read, give or take `weight_bound * (high - low)` times the
    /// largest of those samples, which pass one's peaks bound, and `weight_bound` times the
    /// quantisation error of the written samples (the detector reads what the file holds). f32
    /// sums err by parts in 10^6.
    fn chunk_bounds<'a>(&'a self, plan: Plan, trim: f32, depth: BitDepth, weight_bound: f32, failed: &'a ReadError) -> impl Iterator<Item = (f32, f32)> + 'a {
        const ROUNDING: f32 = 1e-4;
        let reach = (true_peak::REACH + 1).div_ceil(self.chunk_frames) as u64;
        let gain = plan.gain * trim;
        let mut limiter = self.limiter(plan, failed);
        let mut records = self.records();
        // (peak, low gain, high gain) of the chunks from `next - reach` to `loaded`.
        let mut window: VecDeque<(f32, f32, f32)> = VecDeque::new();
        let (mut next, mut loaded) = (0u64, 0u64);
        std::iter::from_fn(move || {
            if next == self.chunks {
                return None;
            }
            while loaded < self.chunks && loaded <= next + reach {
                let peak = match records.next() {
                    Some(Ok((_, peak))) => peak,
                    Some(Err(err)) => {
                        failed.set(err);
                        0.0
                    }
                    None => 0.0,
                };
                let (start, end) = limiter.next_chunk();
                window.push_back((peak, start.min(end) * gain, start.max(end) * gain));
                loaded += 1;
            }
            while loaded - window.len() as u64 + reach < next {
                window.pop_front();
            }
            let peak = window[(next + window.len() as u64 - loaded) as usize].0;
            let (largest, low, high) = window.iter().fold((0f32, f32::MAX, 0f32), |(y, low, high), &(peak, l, h)| (y.max(peak), low.min(l), high.max(h)));
            let spread = weight_bound * (largest * (high - low + ROUNDING * high) + max_quantisation_error(depth));
            next += 1;
            Some((low * peak - spread, high * peak + spread))
        })
    }

    /// The integrated loudness the mix would have under `plan`, from the summary: each chunk's
    /// K-weighted energy times the mean square of the gain over it.
    fn predict(&self, plan: Plan) -> Result<Option<f64>, AudioError> {
        let failed = ReadError::default();
        let mut limiter = self.limiter(plan, &failed);
        let mut gating = Gating::new(self.rate);
        let chunks_per_step = step_frames(self.rate) / self.chunk_frames;
        let (mut step, mut in_step) = (0f64, 0usize);
        let squared_gain = f64::from(plan.gain).powi(2);
        for record in self.records() {
            let (energy, _) = record.map_err(AudioError::Export)?;
            let (a, b) = limiter.next_chunk();
            let (a, b) = (f64::from(a), f64::from(b));
            step += f64::from(energy) * squared_gain * (a * a + a * b + b * b) / 3.0;
            in_step += 1;
            if in_step == chunks_per_step {
                gating.push_step(step);
                (step, in_step) = (0.0, 0);
            }
        }
        match failed.take() {
            Some(err) => Err(AudioError::Export(err)),
            None => Ok(gating.integrated()),
        }
    }

    /// Solves gain and limiter, then writes the WAV at `outputs.master` (by way of its temporary)
    /// until what is written measures under the ceiling, and then every other file of `outputs`
    /// ([`super::deliver`]).
    pub fn master(self, settings: &MasterSettings, depth: BitDepth, outputs: &Outputs, observer: &dyn MixObserver) -> Result<Mastered, AudioError> {
        if matches!(self.pass, Pass::BeforeMatching(_)) {
            return Err(AudioError::Internal("a bus metered for matching is mastered only once matched".into()));
        }
        let progress = Monotonic::new(observer, Stage::Mastering);
        let PeakLevels { aim, held, limit } = PeakLevels::new(settings.true_peak_dbtp, depth);
        let mut plan = Plan { gain: 1.0, limit };
        let unprocessed = self.predict(plan)?;
        let mut max_gain_db = MAX_LIMITING_DB;
        // The summary's prediction is close, not exact: the K-weighting filter sees the gain
        // envelope's modulation, which the summary cannot. So the model is solved, the result
        // measured on the audio, and the model solved again for the target less its bias. Where
        // the limiter has nothing to do, the gain is one number, by which every chunk's energy
        // scales exactly: the prediction is the measurement. Otherwise the measurement is the
        // written file's own, which pass two makes anyway: a plan that misses is written again.
        let mut checking = None;
        if let Some(unprocessed) = unprocessed {
            let unlimited_gain_db = settings.target() - unprocessed;
            max_gain_db = unlimited_gain_db + MAX_LIMITING_DB;
            checking = Some(Check { gain_db: unlimited_gain_db, bias: 0.0, predicted: None, done: 0 });
        }
        let solve = |plan: &mut Plan, check: &mut Check| -> Result<(), AudioError> {
            check.gain_db = self.solve(*plan, check.gain_db, max_gain_db, settings.target() - check.bias, observer)?;
            plan.gain = db_to_gain(check.gain_db) as f32;
            let predicted = self.predict(*plan)?;
            check.predicted = predicted.filter(|_| self.peak * plan.gain > plan.limit);
            Ok(())
        };
        if let Some(check) = &mut checking {
            solve(&mut plan, check)?;
        }
        progress.report(0.02);

        // The limiter held every peak the detector saw, the `ebur128` crate's reading included,
        // but the gain varies across the samples an interpolated point is made from. Should the
        // file still read over, it is written again: scaled by the excess, which true peak
        // follows exactly, where that costs no audible loudness (and the last time); otherwise
        // with the limit lowered by the excess.
        let (mut trim, mut over) = (1.0f32, 0);
        while over < MAX_RENDERS {
            let Written { loudness, peak, spectrum, frames_read } =
                self.render(plan, trim, depth, &outputs.master_temporary, &|fraction| progress.report(0.02 + 0.98 * fraction), observer)?;
            tracing::debug!(frames_read, frames = self.frames, "read the written mix's true peak");
            if let Some(check) = checking.as_mut() {
                if let Some(bias) = check.missed_by(loudness.integrated_lufs, settings.target()) {
                    let written_gain = plan.gain;
                    check.bias = bias;
                    solve(&mut plan, check)?;
                    if plan.gain != written_gain {
                        continue;
                    }
                    // Solved anew to the gain just written (the most it may be, where the target
                    // is out of reach): writing it again would change nothing.
                    check.predicted = None;
                }
            }
            if peak <= aim {
                super::export::publish(&outputs.master_temporary, &outputs.master)?;
                let master = Measured { frames: self.frames, rate: self.rate, integrated_lufs: loudness.integrated_lufs, peak };
                // All or nothing: a file that fails (a full disk, a cancel) takes the ones
                // already in place with it.
                let delivered = self.deliver(plan, aim, max_gain_db, &master, outputs, observer).inspect_err(|_| outputs.remove_all())?;
                return Ok(Mastered { loudness, spectrum, delivered });
            }
            tracing::debug!(over, peak_dbtp = gain_to_db(f64::from(peak)), "the written mix read over the ceiling; writing it again");
            if gain_to_db(f64::from(peak / aim)) <= TRIM_EXCESS_DB || over + 2 >= MAX_RENDERS {
                trim *= held / peak;
            } else {
                plan.limit *= aim / peak;
            }
            over += 1;
        }
        let _ = std::fs::remove_file(&outputs.master_temporary);
        Err(AudioError::Internal("the master could not meet its true-peak ceiling".into()))
    }

    /// The `exporting` stage: every file of `outputs` from the `master` WAV written under `plan`
    /// and measured as `master` (the WAV as it is, FLAC from its samples, the lossy formats from
    /// pass two again, held under `aim` as their decoders read them).
    fn deliver(&self, plan: Plan, aim: f32, max_gain_db: f64, master: &Measured, outputs: &Outputs, observer: &dyn MixObserver) -> Result<Vec<Delivered>, AudioError> {
        let progress = Monotonic::new(observer, Stage::Exporting);
        let count = outputs.files.len().max(1) as f64;
        let size = |path: &Path| std::fs::metadata(path).map(|meta| meta.len()).map_err(AudioError::Export);
        let mut delivered = Vec::with_capacity(outputs.files.len());
        for (i, file) in outputs.files.iter().enumerate() {
            let report = |fraction: f64| progress.report((i as f64 + fraction.clamp(0.0, 1.0)) / count);
            let done = match file.format.format {
                Format::Wav => master.delivered(file.format, size(&outputs.master)?),
                // Lossless: it decodes to the WAV's samples, so it measures as the WAV does.
                Format::Flac => {
                    encode_wav(&outputs.master, &file.temporary, &report, &|| observer.is_cancelled())?;
                    super::export::publish(&file.temporary, &file.path)?;
                    master.delivered(file.format, size(&file.path)?)
                }
                Format::Mp3 | Format::Opus => self.deliver_lossy(plan, aim, max_gain_db, master, file, &report, observer)?,
            };
            delivered.push(done);
            report(1.0);
        }
        Ok(delivered)
    }

    /// One lossy file: pass two again with the limiter held `margin` under `aim` and the gain
    /// solved so that the summary predicts the master's loudness, encoded, then decoded and
    /// measured. Over `aim`, the limit is lowered by the excess; off the master's loudness by more
    /// than [`LOSSY_LOUDNESS_TOLERANCE_LU`], the loudness aimed at moves by the difference; and it
    /// is encoded again, at most [`MAX_ENCODES`] times.
    #[allow(clippy::too_many_arguments)]
    fn deliver_lossy(
        &self,
        plan: Plan,
        aim: f32,
        max_gain_db: f64,
        master: &Measured,
        file: &OutputFile,
        report: &dyn Fn(f64),
        observer: &dyn MixObserver,
    ) -> Result<Delivered, AudioError> {
        let format = file.format;
        let mut lossy = Plan { gain: plan.gain, limit: plan.limit * db_to_gain(-lossy_margin_db(format)) as f32 };
        let mut aimed_prediction = self.predict(plan)?;
        let mut trim = 1.0f32;
        let mut last = None;
        for encode in 0..MAX_ENCODES {
            if let Some(prediction) = aimed_prediction {
                lossy.gain = db_to_gain(self.solve(lossy, gain_to_db(f64::from(lossy.gain)), max_gain_db, prediction, observer)?) as f32;
            }
            let mut encoder = lossy_encoder(format, self.rate, &file.temporary)?;
            let frames = self.frames.max(1) as f64;
            let pass = |fraction: f64| report((encode as f64 + fraction) / MAX_ENCODES as f64);
            self.limited_segments(
                lossy,
                trim,
                observer,
                |_, ()| {},
                |segment, (), done| {
                    pass(0.9 * done as f64 / frames);
                    encoder.write(segment)
                },
            )?;
            let measured = encoder.finish()?;
            // Gapless: a player plays exactly the master's length, whatever the codec's frames.
            let (length_s, master_s) = (measured.frames as f64 / f64::from(measured.rate), master.frames as f64 / f64::from(master.rate));
            if (length_s - master_s).abs() > GAPLESS_TOLERANCE_S {
                let _ = std::fs::remove_file(&file.temporary);
                return Err(AudioError::Encode { format: format.format.extension(), reason: format!("it decodes to {length_s:.4} s, the master lasts {master_s:.4} s") });
            }
            let loudness_error = match (master.integrated_lufs, measured.integrated_lufs) {
                (Some(wanted), Some(got)) => got - wanted,
                _ => 0.0,
            };
            tracing::debug!(
                format = format.format.extension(),
                encode,
                peak_dbtp = gain_to_db(f64::from(measured.peak)),
                loudness_error,
                "measured a lossy file as its decoder reads it"
            );
            if measured.peak <= aim && loudness_error.abs() <= LOSSY_LOUDNESS_TOLERANCE_LU {
                super::export::publish(&file.temporary, &file.path)?;
                let bytes = std::fs::metadata(&file.path).map_err(AudioError::Export)?.len();
                return Ok(measured.delivered(format, bytes));
            }
            // A decoded peak follows the limit only in part (coding noise rides on the signal
            // under it too), but a plain scale exactly: a hair over is scaled off, which costs as
            // much loudness; further over, the limiter is held lower by twice the excess.
            let excess_db = gain_to_db(f64::from(measured.peak / aim));
            // The same reading as the encode before: what changed made no difference, and another
            // encode would read the same again.
            if last == Some((excess_db, loudness_error)) {
                break;
            }
            last = Some((excess_db, loudness_error));
            if excess_db > 0.0 && excess_db <= LOSSY_TRIM_DB && loudness_error - excess_db - LOSSY_STEP_DB >= -LOSSY_LOUDNESS_TOLERANCE_LU {
                trim *= db_to_gain(-(excess_db + LOSSY_STEP_DB)) as f32;
            } else if excess_db > 0.0 {
                lossy.limit *= db_to_gain(-(2.0 * excess_db + LOSSY_STEP_DB)) as f32;
            } else if loudness_error < -LOSSY_LOUDNESS_TOLERANCE_LU {
                // Quiet with room under the ceiling: where more gain is no louder (a master limited
                // hard), the limit is what the loudness follows; it rises by most of the room, even
                // past the master's own (a codec's low-pass can take peaks off), never past full scale.
                lossy.limit = (lossy.limit * db_to_gain(-excess_db - LOSSY_STEP_DB) as f32).min(1.0);
            }
            if loudness_error.abs() > LOSSY_LOUDNESS_TOLERANCE_LU {
                aimed_prediction = aimed_prediction.map(|prediction| prediction - loudness_error);
            }
        }
        let _ = std::fs::remove_file(&file.temporary);
        let (excess_db, loudness_error) = last.unwrap_or_default();
        Err(AudioError::Encode {
            format: format.format.extension(),
            reason: format!(
                "as decoded it read {excess_db:+.2} dB from the true-peak ceiling and {loudness_error:+.2} LU from the master's loudness; \
                 the master is limited too hard for its {} file to keep both (a lower target loudness leaves it room)",
                format.format.extension()
            ),
        })
    }

    /// The gain (dB) under which the summary predicts `target`, starting from `gain_db`, at most
    /// `max_gain_db`. Under heavy limiting, loudness rises far slower than gain, so the steps
    /// follow the secant rather than assuming one dB for one LU.
    fn solve(&self, plan: Plan, mut gain_db: f64, max_gain_db: f64, target: f64, observer: &dyn MixObserver) -> Result<f64, AudioError> {
        let mut previous: Option<(f64, f64)> = None;
        for _ in 0..MAX_SOLVES {
            if observer.is_cancelled() {
                return Err(AudioError::Canceled);
            }
            let Some(predicted) = self.predict(Plan { gain: db_to_gain(gain_db) as f32, ..plan })? else { break };
            let error = target - predicted;
            if error.abs() < LOUDNESS_TOLERANCE_LU / 10.0 {
                break;
            }
            let slope = match previous {
                Some((gain, loudness)) if (gain_db - gain).abs() > 1e-9 => ((predicted - loudness) / (gain_db - gain)).clamp(0.02, 1.0),
                _ => 1.0,
            };
            previous = Some((gain_db, predicted));
            let next = (gain_db + error / slope).min(max_gain_db);
            if next == gain_db {
                break;
            }
            gain_db = next;
        }
        Ok(gain_db)
    }

    /// Reads the spill back with `plan` (and `trim`) applied, a segment at a time, through
    /// `prepare` (which runs ahead, on a worker, and may leave what it works out about the
    /// segment in its `P`), handing each to `each` with its `P` and the frames done so far.
    ///
    /// Three stages, overlapped: while `each` takes segment n here (it need not be sendable: an
    /// encoder may not be), segment n + 1 is scaled by its gains and prepared, and segment n + 2
    /// read from the spill beside its gain envelope. Each stage's work follows only its own from
    /// the segment before (the envelope, the meter, the file), so the three run side by side. In
    /// two stages (read, scale and prepare against `each`), the typical mix's pass two kept its
    /// two cores 80% busy for 119 ms; in three, 86% for 112 ms.
    fn limited_segments<P: Default + Send>(
        &self,
        plan: Plan,
        trim: f32,
        observer: &dyn MixObserver,
        mut prepare: impl FnMut(&mut StereoBuffer, &mut P) + Send,
        mut each: impl FnMut(&mut StereoBuffer, &mut P, u64) -> Result<(), AudioError>,
    ) -> Result<(), AudioError> {
        let failed = ReadError::default();
        let mut limiter = self.limiter(plan, &failed);
        let mut bytes = Vec::new();
        let (mut gain, mut chunk_end_gain, mut step, mut left_in_chunk) = (0f32, 0f32, 0f32, 0usize);
        let gain_and_trim = plan.gain * trim;
        let segments = self.frames.div_ceil(BLOCK as u64) as usize;
        let start_of = |segment: usize| segment as u64 * BLOCK as u64;
        let mut read = |segment: usize, InFlight { audio, gains, .. }: &mut InFlight<P>| -> Result<(), AudioError> {
            let start = start_of(segment);
            let frames = (self.frames - start).min(BLOCK as u64) as usize;
            // Each frame's gain follows the one before.
            // A chunk's run at a time, into a buffer sized once.
            let envelope = || {
                gains.resize(frames, 0.0);
                let mut filled = 0;
                while filled < frames {
                    if left_in_chunk == 0 {
                        let (a, b) = limiter.next_chunk();
                        (gain, chunk_end_gain, left_in_chunk) = (a, b, self.chunk_frames);
                        step = (b - a) / self.chunk_frames as f32;
                    }
                    let run = left_in_chunk.min(frames - filled);
                    for slot in &mut gains[filled..filled + run] {
                        *slot = gain_and_trim * gain;
                        gain += step;
                    }
                    filled += run;
                    left_in_chunk -= run;
                    if left_in_chunk == 0 {
                        gain = chunk_end_gain;
                    }
                }
            };
            let (read, ()) = rayon::join(|| self.read_segment(start, frames, &mut bytes, audio), envelope);
            read?;
            failed.take().map_or(Ok(()), |err| Err(AudioError::Export(err)))
        };
        // The samples scaled in plain loops the compiler vectorises.
        let mut limit = |InFlight { audio, gains, prepared }: &mut InFlight<P>| {
            for channel in [&mut audio.left, &mut audio.right] {
                channel.iter_mut().zip(gains.iter()).for_each(|(x, g)| *x *= g);
            }
            prepare(audio, prepared);
        };
        let mut in_flight: [InFlight<P>; 3] = Default::default();
        if segments > 0 {
            read(0, &mut in_flight[0])?;
            limit(&mut in_flight[0]);
        }
        if segments > 1 {
            read(1, &mut in_flight[1])?;
        }
        // Segment n lives in `in_flight[n % 3]` from its read to its taking.
        for n in 0..segments {
            if observer.is_cancelled() {
                return Err(AudioError::Canceled);
            }
            let [taken, limited, fresh] = in_flight.get_disjoint_mut([n % 3, (n + 1) % 3, (n + 2) % 3]).expect("three distinct segments");
            let mut was_read = Ok(());
            let was_taken = rayon::in_place_scope(|scope| {
                if n + 2 < segments {
                    scope.spawn(|_| was_read = read(n + 2, fresh));
                }
                if n + 1 < segments {
                    scope.spawn(|_| limit(limited));
                }
                let InFlight { audio, prepared, .. } = taken;
                each(audio, prepared, (start_of(n) + BLOCK as u64).min(self.frames))
            });
            was_taken?;
            was_read?;
        }
        Ok(())
    }

    /// Writes the mix under `plan` to `temporary`, measuring what is written: its loudness and
    /// loudness range, and its true peak read by the detector, which reads at least what the
    /// `ebur128` crate's meter reads and between its points too. The detector reads only the
    /// chunks that [`Self::chunk_bounds`] cannot rule out, and so finds the same peak as reading
    /// them all.
    fn render(&self, plan: Plan, trim: f32, depth: BitDepth, temporary: &Path, progress: &dyn Fn(f64), observer: &dyn MixObserver) -> Result<Written, AudioError> {
        let mut meter = LoudnessMeter::new(self.rate);
        let mut detector = PeakDetector::new(self.rate);
        let mut spectrum = matches!(self.pass, Pass::Matched).then(|| SpectrumMeter::new(self.rate));
        let failed = ReadError::default();
        let highest_lower_bound = self.chunk_bounds(plan, trim, depth, detector.weight_bound(), &failed).fold(0f32, |highest, (lower, _)| highest.max(lower));
        let mut bounds = self.chunk_bounds(plan, trim, depth, detector.weight_bound(), &failed);
        let (mut chunk_wanted, mut left_in_chunk) = (false, 0usize);
        let (mut peaks, mut peak) = (Vec::new(), 0f32);
        let mut sink = WavSink::create(temporary, self.rate, depth)?;
        let mut quantiser = Quantiser::new(depth);
        self.limited_segments(
            plan,
            trim,
            observer,
            // On the reading side, beside the rounding: which frames the detector reads.
            |segment, wanted: &mut Vec<bool>| {
                let frames = segment.len();
                let wanting = || {
                    wanted.clear();
                    while wanted.len() < frames {
                        if left_in_chunk == 0 {
                            chunk_wanted = bounds.next().is_some_and(|(_, upper)| upper > 0.0 && upper >= highest_lower_bound);
                            left_in_chunk = self.chunk_frames;
                        }
                        let run = left_in_chunk.min(frames - wanted.len());
                        wanted.extend(std::iter::repeat_n(chunk_wanted, run));
                        left_in_chunk -= run;
                    }
                };
                rayon::join(|| quantiser.quantise(segment), wanting);
            },
            |segment, wanted, done| {
                let ((), written) = rayon::join(
                    || {
                        meter.push(&segment.left, &segment.right);
                        if let Some(spectrum) = &mut spectrum {
                            spectrum.push(&segment.left, &segment.right);
                        }
                    },
                    || {
                        detector.push_selected(&segment.left, &segment.right, Some(wanted), &mut peaks);
                        sink.write(segment)
                    },
                );
                written?;
                peak = peaks.drain(..).fold(peak, f32::max);
                progress(done as f64 / self.frames.max(1) as f64);
                Ok(())
            },
        )?;
        if let Some(err) = failed.take() {
            return Err(AudioError::Export(err));
        }
        sink.finish()?;
        detector.finish(&mut peaks);
        let peak = peaks.into_iter().fold(peak, f32::max);
        let finite = |value: f64| value.is_finite().then_some(value);
        let loudness = Loudness { integrated_lufs: meter.integrated(), true_peak_dbtp: finite(gain_to_db(f64::from(peak))), loudness_range_lu: Some(meter.range()) };
        Ok(Written { loudness, peak, spectrum: spectrum.map(SpectrumMeter::finish), frames_read: detector.frames_read() })
    }
}

/// A segment of pass two on its way from the spill to the file: its samples, their gains, and
/// what [`Premastered::limited_segments`]' `prepare` made of it.
#[derive(Default)]
struct InFlight<P> {
    audio: StereoBuffer,
    gains: Vec<f32>,
    prepared: P,
}

/// Moves the whole blocks at the front of `filtered` (at the `end`, all of it) into `blocks`, in
/// buffers from `spare` where it has any: a premaster takes whole blocks until the last.
fn take_blocks(filtered: &mut StereoBuffer, blocks: &mut Vec<StereoBuffer>, spare: &mut Vec<StereoBuffer>, end: bool) {
    let whole = if end { filtered.len() } else { filtered.len() / BLOCK * BLOCK };
    for start in (0..whole).step_by(BLOCK) {
        let stop = (start + BLOCK).min(whole);
        let mut block = spare.pop().unwrap_or_default();
        block.clear();
        block.left.extend_from_slice(&filtered.left[start..stop]);
        block.right.extend_from_slice(&filtered.right[start..stop]);
        blocks.push(block);
    }
    filtered.left.drain(..whole);
    filtered.right.drain(..whole);
}

/// The first error reading the summary, left by the iterators over it, which can only stop.
#[derive(Default)]
struct ReadError(Mutex<Option<std::io::Error>>);

impl ReadError {
    fn set(&self, err: std::io::Error) {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(err);
    }

    fn take(&self) -> Option<std::io::Error> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// Progress within one stage that never goes back, though a render may run again.
struct Monotonic<'a> {
    observer: &'a dyn MixObserver,
    stage: Stage,
    reported: std::cell::Cell<f64>,
}

impl<'a> Monotonic<'a> {
    fn new(observer: &'a dyn MixObserver, stage: Stage) -> Self {
        observer.progress(stage, 0.0);
        Self { observer, stage, reported: std::cell::Cell::new(0.0) }
    }

    fn report(&self, fraction: f64) {
        if fraction > self.reported.get() {
            self.reported.set(fraction);
            self.observer.progress(self.stage, fraction);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    struct Quiet;

    impl MixObserver for Quiet {
        fn progress(&self, _: Stage, _: f64) {}
        fn is_cancelled(&self) -> bool {
            false
        }
    }

    /// Drum-like material: decaying noise bursts and low thumps, four hits a second.
    fn hits(rate: u32, seconds: usize) -> StereoBuffer {
        let frames = rate as usize * seconds;
        let noise = test_noise(frames, 42);
        let left: Vec<f32> = (0..frames)
            .map(|n| {
                let t = (n % (rate as usize / 4)) as f32 / rate as f32;
                let thump = (2.0 * std::f32::consts::PI * 60.0 * t).sin() * (-t * 30.0).exp();
                0.5 * thump + 0.4 * noise[n] * (-t * 60.0).exp()
            })
            .collect();
        StereoBuffer { right: left.iter().map(|x| -x).collect(), left }
    }

    fn premastered(bus: &StereoBuffer, rate: u32, dir: &Path) -> Premastered {
        let mut premaster = Premaster::new(&MasterSettings::default(), rate, dir).unwrap();
        for start in (0..bus.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(bus.len());
            premaster.push(&mut StereoBuffer { left: bus.left[start..end].to_vec(), right: bus.right[start..end].to_vec() }).unwrap();
        }
        premaster.finish().unwrap()
    }

    #[test]
    fn the_summary_predicts_the_loudness_of_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let rate = 48_000;
        let premastered = premastered(&hits(rate, 10), rate, dir.path());
        for gain_db in [0.0, 6.0, 12.0, 18.0] {
            let plan = Plan { gain: db_to_gain(gain_db) as f32, limit: 0.8 };
            let predicted = premastered.predict(plan).unwrap().unwrap();
            let written = premastered.render(plan, 1.0, BitDepth::Float32, &dir.path().join("out.wav"), &|_| {}, &Quiet).unwrap();
            let written = written.loudness.integrated_lufs.unwrap();
            assert!((predicted - written).abs() < 0.25, "{gain_db} dB of gain: predicted {predicted:.3} LUFS, written {written:.3}");
        }
    }

    #[test]
    fn without_limiting_the_summary_predicts_the_written_loudness_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for rate in [44_100, 48_000, 96_000] {
            let premastered = premastered(&hits(rate, 10), rate, dir.path());
            for gain_db in [-12.0, -2.0] {
                let plan = Plan { gain: db_to_gain(gain_db) as f32, limit: 1.0 };
                assert!(premastered.peak * plan.gain <= plan.limit, "the limiter has nothing to do");
                let predicted = premastered.predict(plan).unwrap().unwrap();
                let written = premastered.render(plan, 1.0, BitDepth::Float32, &dir.path().join("out.wav"), &|_| {}, &Quiet).unwrap();
                let written = written.loudness.integrated_lufs.unwrap();
                assert!((predicted - written).abs() < 1e-4, "{rate} Hz, {gain_db} dB: predicted {predicted} LUFS, written {written}");
            }
        }
    }

    #[test]
    fn a_limited_master_whose_written_loudness_misses_the_target_is_written_again_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let rate = 48_000;
        let (target, depth) = (-18.0, BitDepth::Int24);
        let settings = MasterSettings { target_lufs: Some(target), ..MasterSettings::default() };
        let premastered = premastered(&hits(rate, 10), rate, dir.path());
        // The gain solved on the summary alone, as the master solves it first, written: limited,
        // and off the target by more than the master lets pass.
        let limit = PeakLevels::new(settings.true_peak_dbtp, depth).limit;
        let unprocessed = premastered.predict(Plan { gain: 1.0, limit }).unwrap().unwrap();
        let first_gain_db = premastered.solve(Plan { gain: 1.0, limit }, target - unprocessed, target - unprocessed + MAX_LIMITING_DB, target, &Quiet).unwrap();
        let first = Plan { gain: db_to_gain(first_gain_db) as f32, limit };
        assert!(premastered.peak * first.gain > limit, "the limiter has work to do");
        let first = premastered.render(first, 1.0, depth, &dir.path().join("first.wav"), &|_| {}, &Quiet).unwrap().loudness.integrated_lufs.unwrap();
        assert!((first - target).abs() >= LOUDNESS_TOLERANCE_LU / 2.0, "the summary alone lands {first:.3} LUFS, on the {target} LUFS target");

        let master = dir.path().join("master.wav");
        let outputs = Outputs::new(&[FormatSettings::new(Format::Wav)], |_| (master.clone(), dir.path().join("master.wav.partial")));
        let mastered = premastered.master(&settings, depth, &outputs, &Quiet).unwrap();
        let written = mastered.loudness.integrated_lufs.unwrap();
        assert!((written - target).abs() < LOUDNESS_TOLERANCE_LU / 2.0, "mastered to {written:.3} LUFS for a {target} LUFS target");
        assert!(master.is_file(), "the file written again is the one in place");
    }

    #[test]
    fn the_written_peak_is_read_on_the_chunks_that_may_hold_it_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        for rate in [44_100, 48_000] {
            let premastered = premastered(&hits(rate, 10), rate, dir.path());
            // Limited hard and not at all (quiet, where the quantisation error weighs most).
            for (gain_db, trim, depth) in [(0.0, 1.0, BitDepth::Int16), (6.0, 0.97, BitDepth::Int24), (12.0, 1.0, BitDepth::Float32), (-30.0, 1.0, BitDepth::Int16)] {
                let plan = Plan { gain: db_to_gain(gain_db) as f32, limit: 0.8 };
                let file = dir.path().join("out.wav");
                let written = premastered.render(plan, trim, depth, &file, &|_| {}, &Quiet).unwrap();
                // Every frame of the file itself, read back.
                let mut reader = hound::WavReader::open(&file).unwrap();
                let samples: Vec<f32> = match depth {
                    BitDepth::Float32 => reader.samples::<f32>().map(Result::unwrap).collect(),
                    _ => {
                        let scale = 1.0 / (1u32 << (reader.spec().bits_per_sample - 1)) as f32;
                        reader.samples::<i32>().map(|sample| sample.unwrap() as f32 * scale).collect()
                    }
                };
                let (left, right): (Vec<f32>, Vec<f32>) = samples.chunks_exact(2).map(|frame| (frame[0], frame[1])).unzip();
                let mut detector = PeakDetector::new(rate);
                let mut peaks = Vec::new();
                detector.push(&left, &right, &mut peaks);
                detector.finish(&mut peaks);
                let every_frame = peaks.into_iter().fold(0.0, f32::max);
                assert_eq!(written.peak, every_frame, "{rate} Hz, {gain_db} dB: the same peak as reading every frame");
                let read = written.frames_read as f64 / premastered.frames() as f64;
                assert!(read < 0.2, "{rate} Hz, {gain_db} dB: read {:.1}% of the frames", 100.0 * read);
            }
        }
    }
}
