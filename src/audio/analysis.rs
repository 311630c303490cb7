//! The analysis written beside each result, for a page to draw the mix without downloading it:
//! waveform peaks at a few zoom levels, the short-term loudness (3 s window, BS.1770) once a
//! second, and where the true peak reached the ceiling. Read back from the finished WAV in one
//! streaming pass, so it describes exactly the bytes a listener gets and its memory does not grow
//! with the mix's length (only its few thousand output values do). With them, the long-term
//! 1/3-octave spectrum, beside the reference's when the master matched one.

use std::path::Path;

use ebur128::{EbuR128, Mode};
use serde::Serialize;

use super::spectrum::{normalised, SpectrumMeter, BANDS, BANDS_HZ};
use super::AudioError;

/// Waveform columns at the finest zoom; each coarser level has a quarter as many.
const FINEST_COLUMNS: usize = 4096;
const LEVELS: usize = 3;
/// A true peak this close to the ceiling counts as reaching it (the limiter at work).
const CEILING_MARGIN_DB: f64 = 0.5;
/// True peaks are read per block of this many milliseconds.
const PEAK_BLOCK_MS: u32 = 100;
/// At most this many ceiling positions are listed; a mix limited throughout says so by the count.
const MAX_CEILING_HITS: usize = 2000;

/// Served at `/media/{project}/mix_outputs/{job}/analysis.json`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Analysis {
    pub sample_rate: u32,
    pub duration_s: f64,
    /// Finest first: min and max of both channels per column, each in -1..1.
    pub waveform: Vec<WaveformLevel>,
    /// Short-term loudness in LUFS, one value per second (the 3 s window ending then); null for
    /// silence.
    pub short_term_lufs: Vec<Option<f64>>,
    pub true_peak_ceiling_dbtp: f64,
    /// Seconds (block starts) where the true peak came within 0.5 dB of the ceiling.
    pub ceiling_hits_s: Vec<f64>,
    /// How many blocks reached the ceiling in all, listed or not.
    pub ceiling_hit_count: usize,
    pub spectrum: SpectrumAnalysis,
}

/// Long-term 1/3-octave band levels in dB relative to each file's integrated loudness (LU), as
/// the spectral error compares them; null for a band with nothing in it (or past Nyquist).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SpectrumAnalysis {
    /// Nominal band centres, 31.5 Hz to 16 kHz.
    pub bands_hz: Vec<f64>,
    pub mix_db: Vec<Option<f64>>,
    /// The reference the master matched; null without one.
    pub reference_db: Option<Vec<Option<f64>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WaveformLevel {
    pub columns: usize,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
}

/// Reads the WAV at `path` and analyses it against `ceiling_dbtp`, beside `reference_db` (the
/// reference's normalised band levels) when the master matched one.
pub fn analyse(path: &Path, ceiling_dbtp: f64, reference_db: Option<&[Option<f64>]>) -> Result<Analysis, AudioError> {
    let internal = |what: &str, err: &dyn std::fmt::Display| AudioError::Internal(format!("analysing the result: {what}: {err}"));
    let mut reader = hound::WavReader::open(path).map_err(|err| internal("open", &err))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    let frames = reader.duration() as usize;
    let rate = spec.sample_rate;
    let mut meter = EbuR128::new(spec.channels.into(), rate, Mode::I | Mode::S | Mode::TRUE_PEAK).map_err(|err| internal("meter", &err))?;
    let mut spectrum = SpectrumMeter::new(rate);
    let (mut left, mut right) = (Vec::new(), Vec::new());

    let columns = FINEST_COLUMNS.min(frames.max(1));
    let (mut low, mut high) = (vec![0f32; columns], vec![0f32; columns]);
    let mut short_term = Vec::new();
    let mut hits = Vec::new();
    let mut hit_count = 0;
    let block_frames = (rate * PEAK_BLOCK_MS / 1000) as usize;
    let mut block = Vec::with_capacity(block_frames * channels);
    let mut frame = 0usize;
    let mut samples = read_samples(&mut reader).map_err(|err| internal("read", &err))?;
    loop {
        block.clear();
        for _ in 0..block_frames * channels {
            match samples.next() {
                Some(sample) => block.push(sample.map_err(|err| internal("read", &err))?),
                None => break,
            }
        }
        if block.is_empty() {
            break;
        }
        for chunk in block.chunks_exact(channels) {
            let column = frame * columns / frames.max(1);
            for &sample in chunk {
                low[column] = low[column].min(sample);
                high[column] = high[column].max(sample);
            }
            frame += 1;
        }
        meter.add_frames_f32(&block).map_err(|err| internal("meter", &err))?;
        // The mix is stereo; any other file is analysed by its first two channels.
        left.clear();
        right.clear();
        for frame in block.chunks_exact(channels) {
            left.push(frame[0]);
            right.push(frame[channels.min(2) - 1]);
        }
        spectrum.push(&left, &right);
        let block_start = frame - block.len() / channels;
        let peak = (0..channels as u32).filter_map(|channel| meter.prev_true_peak(channel).ok()).fold(0.0f64, f64::max);
        if peak > 0.0 && 20.0 * peak.log10() >= ceiling_dbtp - CEILING_MARGIN_DB {
            hit_count += 1;
            if hits.len() < MAX_CEILING_HITS {
                hits.push(round(block_start as f64 / f64::from(rate), 10.0));
            }
        }
        // Once per whole second of audio: the window of 3 s ending there.
        let seconds_before = block_start / rate as usize;
        if frame / rate as usize > seconds_before {
            let loudness = meter.loudness_shortterm().map_err(|err| internal("meter", &err))?;
            short_term.push(loudness.is_finite().then(|| round(loudness, 10.0)));
        }
    }
    let mut waveform = vec![WaveformLevel { columns, min: low.iter().map(|v| round32(*v)).collect(), max: high.iter().map(|v| round32(*v)).collect() }];
    for _ in 1..LEVELS {
        let finer = waveform.last().expect("one level at least");
        if finer.columns < 4 {
            break;
        }
        let merge = |values: &[f32], pick: fn(f32, f32) -> f32| values.chunks(4).map(|group| group.iter().copied().fold(0.0, pick)).collect::<Vec<_>>();
        let coarser = WaveformLevel { columns: finer.columns.div_ceil(4), min: merge(&finer.min, f32::min), max: merge(&finer.max, f32::max) };
        waveform.push(coarser);
    }
    let levels = spectrum.finish().levels_db();
    let mix_db = match meter.loudness_global().ok().filter(|lufs| lufs.is_finite()) {
        Some(lufs) => normalised(&levels, lufs).iter().map(|level| level.map(|db| round(db, 10.0))).collect(),
        None => vec![None; BANDS],
    };
    Ok(Analysis {
        sample_rate: rate,
        duration_s: round(frames as f64 / f64::from(rate), 1000.0),
        waveform,
        short_term_lufs: short_term,
        true_peak_ceiling_dbtp: ceiling_dbtp,
        ceiling_hits_s: hits,
        ceiling_hit_count: hit_count,
        spectrum: SpectrumAnalysis {
            bands_hz: BANDS_HZ.to_vec(),
            mix_db,
            reference_db: reference_db.map(|levels| levels.iter().map(|level| level.map(|db| round(db, 10.0))).collect()),
        },
    })
}

type Samples<'a> = Box<dyn Iterator<Item = Result<f32, hound::Error>> + 'a>;

/// The file's samples as f32 in -1..1, whatever its format.
fn read_samples<R: std::io::Read>(reader: &mut hound::WavReader<R>) -> Result<Samples<'_>, hound::Error> {
    let spec = reader.spec();
    Ok(match spec.sample_format {
        hound::SampleFormat::Float => Box::new(reader.samples::<f32>()),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            Box::new(reader.samples::<i32>().map(move |sample| sample.map(|value| value as f32 * scale)))
        }
    })
}

fn round(value: f64, per_unit: f64) -> f64 {
    (value * per_unit).round() / per_unit
}

/// Four decimals: a pixel column needs no more, and the file stays small.
fn round32(value: f32) -> f32 {
    (value * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, rate: u32, seconds: u32, sample: impl Fn(u32) -> f32) {
        let spec = hound::WavSpec { channels: 2, sample_rate: rate, bits_per_sample: 24, sample_format: hound::SampleFormat::Int };
        let mut writer = hound::WavWriter::create(path, spec).unwrap();
        for n in 0..rate * seconds {
            let value = (sample(n) * 8_388_607.0) as i32;
            writer.write_sample(value).unwrap();
            writer.write_sample(value).unwrap();
        }
        writer.finalize().unwrap();
    }

    #[test]
    fn peaks_loudness_and_ceiling_hits_describe_the_file_and_stay_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mix.wav");
        // 10 s of a 1 kHz sine at half scale, then 10 s at -1 dBFS peak: the second half reaches a
        // -1.5 dBTP ceiling's margin, the first does not.
        let rate = 48_000;
        write(&path, rate, 20, |n| {
            let amplitude = if n < rate * 10 { 0.5 } else { 0.891 };
            amplitude * (2.0 * std::f32::consts::PI * 1000.0 * n as f32 / rate as f32).sin()
        });
        let analysis = analyse(&path, -1.5, Some(&[Some(-3.0); BANDS])).unwrap();
        assert_eq!((analysis.sample_rate, analysis.duration_s), (48_000, 20.0));
        assert_eq!(analysis.waveform.iter().map(|level| level.columns).collect::<Vec<_>>(), [4096, 1024, 256]);
        let finest = &analysis.waveform[0];
        assert!((finest.max[100] - 0.5).abs() < 0.001 && (finest.min[100] + 0.5).abs() < 0.001, "{} {}", finest.max[100], finest.min[100]);
        assert!((finest.max[4000] - 0.891).abs() < 0.001);
        assert_eq!(analysis.waveform[2].max[0], finest.max[..16].iter().copied().fold(0.0, f32::max), "a coarse column is the max of its fine ones");
        assert_eq!(analysis.short_term_lufs.len(), 20);
        // A 1 kHz sine reads 3.01 dB under its peak per channel, and two equal channels add 3.01 dB:
        // -6.02 LUFS at half scale, -1.0 at 0.891.
        let (quiet, loud) = (analysis.short_term_lufs[8].unwrap(), analysis.short_term_lufs[19].unwrap());
        assert!((quiet + 6.02).abs() < 0.1 && (loud + 1.0).abs() < 0.1, "{quiet} {loud}");
        assert_eq!(analysis.ceiling_hit_count, 100, "every 100 ms block of the loud half, none of the quiet one");
        assert_eq!(analysis.ceiling_hits_s.first(), Some(&10.0));
        // All of a 1 kHz sine's energy is in its band, which reads the loudness's offset from the
        // signal's power (-0.691 dB and the K-weighting's +0.7 at 1 kHz) for every level; the
        // reference's levels are passed on as given.
        let at_1k = BANDS_HZ.iter().position(|&hz| hz == 1000.0).unwrap();
        let band = analysis.spectrum.mix_db[at_1k].unwrap();
        assert!((band - 0.0).abs() < 0.2, "{band}");
        assert!(analysis.spectrum.mix_db[at_1k - 3].is_none_or(|db| db < -60.0), "{:?}", analysis.spectrum.mix_db);
        assert_eq!(analysis.spectrum.reference_db.as_deref(), Some(&[Some(-3.0); BANDS][..]));
        assert_eq!(analysis.spectrum.bands_hz.len(), 28);
        let json = serde_json::to_string(&analysis).unwrap();
        assert!(json.len() < 120_000, "{} bytes for 20 s", json.len());
    }
}
