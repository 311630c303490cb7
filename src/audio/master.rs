//! The master chain: bus EQ and compression, loudness normalisation to a target measured per
//! ITU-R BS.1770-4 / EBU R128 (the `ebur128` crate), then the true-peak limiter.
//!
//! Limiting lowers loudness, so gain and limiter are solved together: the frame peaks are computed
//! once, and the gain is corrected until the limited signal measures on target.

use ebur128::{EbuR128, Mode};
use serde::{Deserialize, Serialize};

use super::buffer::{StereoBuffer, BLOCK};
use super::dsp::{db_to_gain, gain_to_db, ChannelStrip};
use super::settings::MasterSettings;
use super::true_peak::{frame_peaks, true_peak, Limiter};
use super::{AudioError, MixObserver, Stage};

/// Close enough to the target that another pass would not be audible or measurable by a client.
const LOUDNESS_TOLERANCE_LU: f64 = 0.05;
const MAX_PASSES: usize = 8;

/// Loudness of a finished mix; `None` where silence has no value (integrated loudness of silence).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Loudness {
    pub integrated_lufs: Option<f64>,
    pub true_peak_dbtp: Option<f64>,
    pub loudness_range_lu: Option<f64>,
}

pub fn master(bus: &mut StereoBuffer, settings: &MasterSettings, rate: u32, observer: &dyn MixObserver) -> Result<Loudness, AudioError> {
    let report = |fraction: f64| observer.progress(Stage::Mastering, fraction);
    let mut strip = ChannelStrip::new(&settings.eq, settings.compressor.as_ref(), rate);
    for_each_block(bus, observer, |left, right| strip.process(left, right))?;
    report(0.15);

    let ceiling = db_to_gain(settings.true_peak_dbtp) as f32;
    if let Some(unprocessed) = integrated(bus, rate, 1.0, None)? {
        report(0.25);
        let peaks = frame_peaks(bus);
        report(0.45);
        let limiter = Limiter::new(rate);
        let mut gain_db = settings.target_lufs - unprocessed;
        let mut envelope = limiter.envelope(&peaks, db_to_gain(gain_db) as f32, ceiling);
        for pass in 0..MAX_PASSES {
            if observer.is_cancelled() {
                return Err(AudioError::Canceled);
            }
            let Some(measured) = integrated(bus, rate, db_to_gain(gain_db) as f32, Some(&envelope))? else { break };
            report(0.45 + 0.35 * (pass + 1) as f64 / MAX_PASSES as f64);
            let error = settings.target_lufs - measured;
            if error.abs() < LOUDNESS_TOLERANCE_LU {
                break;
            }
            gain_db += error;
            envelope = limiter.envelope(&peaks, db_to_gain(gain_db) as f32, ceiling);
        }
        drop(peaks);
        let gain = db_to_gain(gain_db) as f32;
        for ((l, r), g) in bus.left.iter_mut().zip(bus.right.iter_mut()).zip(&envelope) {
            *l *= gain * g;
            *r *= gain * g;
        }
    }
    report(0.85);

    // The envelope is exact at sample points; between them a gain change can leave a few
    // hundredths of a dB. One linear trim removes it, since true peak scales with gain.
    let mut peak = true_peak(bus);
    if peak > ceiling {
        let trim = ceiling / peak;
        bus.left.iter_mut().chain(bus.right.iter_mut()).for_each(|x| *x *= trim);
        // The interpolation is linear, so the trimmed peak needs no second pass.
        peak *= trim;
    }
    report(0.9);
    let loudness = measure(bus, rate, Some(peak))?;
    report(1.0);
    Ok(loudness)
}

/// Integrated loudness, range and true peak of a stereo buffer. `own_true_peak` (linear), when
/// given, is combined with the meter's so the report never understates the peak.
pub fn measure(buffer: &StereoBuffer, rate: u32, own_true_peak: Option<f32>) -> Result<Loudness, AudioError> {
    let mut meter = meter(rate, Mode::I | Mode::LRA | Mode::TRUE_PEAK)?;
    for start in (0..buffer.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(buffer.len());
        meter.add_frames_planar_f32(&[&buffer.left[start..end], &buffer.right[start..end]]).map_err(|err| AudioError::Internal(format!("loudness meter: {err}")))?;
    }
    let finite = |value: f64| value.is_finite().then_some(value);
    let meter_peak = meter.true_peak(0).unwrap_or(0.0).max(meter.true_peak(1).unwrap_or(0.0));
    let peak = meter_peak.max(f64::from(own_true_peak.unwrap_or(0.0)));
    Ok(Loudness {
        integrated_lufs: meter.loudness_global().ok().and_then(finite),
        true_peak_dbtp: finite(gain_to_db(peak)),
        loudness_range_lu: meter.loudness_range().ok().and_then(finite),
    })
}

/// Integrated loudness of `buffer * gain * envelope`, without materialising the product.
fn integrated(buffer: &StereoBuffer, rate: u32, gain: f32, envelope: Option<&[f32]>) -> Result<Option<f64>, AudioError> {
    let mut meter = meter(rate, Mode::I)?;
    let (mut left, mut right) = (Vec::with_capacity(BLOCK), Vec::with_capacity(BLOCK));
    for start in (0..buffer.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(buffer.len());
        left.clear();
        right.clear();
        match envelope {
            Some(envelope) => {
                let gains = envelope[start..end].iter().map(|g| g * gain);
                for ((l, r), g) in buffer.left[start..end].iter().zip(&buffer.right[start..end]).zip(gains) {
                    left.push(l * g);
                    right.push(r * g);
                }
            }
            None => {
                left.extend(buffer.left[start..end].iter().map(|x| x * gain));
                right.extend(buffer.right[start..end].iter().map(|x| x * gain));
            }
        }
        meter.add_frames_planar_f32(&[&left, &right]).map_err(|err| AudioError::Internal(format!("loudness meter: {err}")))?;
    }
    Ok(meter.loudness_global().ok().filter(|l| l.is_finite()))
}

fn meter(rate: u32, mode: Mode) -> Result<EbuR128, AudioError> {
    EbuR128::new(2, rate, mode).map_err(|err| AudioError::Internal(format!("loudness meter: {err}")))
}

fn for_each_block(bus: &mut StereoBuffer, observer: &dyn MixObserver, mut f: impl FnMut(&mut [f32], &mut [f32])) -> Result<(), AudioError> {
    for (left, right) in bus.left.chunks_mut(BLOCK).zip(bus.right.chunks_mut(BLOCK)) {
        if observer.is_cancelled() {
            return Err(AudioError::Canceled);
        }
        f(left, right);
    }
    Ok(())
}
