//! Long-term spectra on the 1/3-octave bands from 31.5 Hz to 16 kHz, and stereo width: what
//! reference mastering matches and reports, and what `analysis.json` plots.
//!
//! The meter averages the power spectra of Hann-windowed frames (Welch's method, half
//! overlapping) of the mid and side signals apart, `M = (L + R) / 2` and `S = (L - R) / 2`: a
//! filter applied to both channels and a gain on the side then predict the result exactly, bin by
//! bin, which is how the matching EQ is designed. Frames are long enough (about 0.7 s) that the
//! 31.5 Hz band, 7 Hz wide, spans several bins.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// Nominal centres of the 1/3-octave bands (IEC 61260), as reported.
pub const BANDS_HZ: [f64; BANDS] = [
    31.5, 40.0, 50.0, 63.0, 80.0, 100.0, 125.0, 160.0, 200.0, 250.0, 315.0, 400.0, 500.0, 630.0, 800.0, 1000.0, 1250.0, 1600.0, 2000.0, 2500.0, 3150.0, 4000.0, 5000.0,
    6300.0, 8000.0, 10000.0, 12500.0, 16000.0,
];
pub const BANDS: usize = 28;

/// Exact centre of band `i` (base ten: 10^(n/10) Hz), the nominal one being its rounding.
pub fn band_centre_hz(band: usize) -> f64 {
    10f64.powf((15 + band) as f64 / 10.0)
}

/// Lower and upper edge of band `i`: a tenth of a decade around its centre.
fn band_edges_hz(band: usize) -> (f64, f64) {
    let centre = band_centre_hz(band);
    (centre * 10f64.powf(-0.05), centre * 10f64.powf(0.05))
}

/// Below this a band holds nothing worth a level (-150 dB).
const SILENT_POWER: f64 = 1e-15;

/// Frame length at `rate`: a power of two of about two thirds of a second.
pub fn frame_size(rate: u32) -> usize {
    (rate as usize * 2 / 3).next_power_of_two()
}

/// Accumulates the long-term mid and side spectra of a stereo stream.
pub struct SpectrumMeter {
    rate: u32,
    fft: Arc<dyn RealToComplex<f32>>,
    window: Vec<f32>,
    /// Samples not yet in a whole frame, mid and side.
    pending: [Vec<f32>; 2],
    input: Vec<f32>,
    output: Vec<Complex<f32>>,
    scratch: Vec<Complex<f32>>,
    /// Sum over frames of |X|², mid and side.
    power: [Vec<f64>; 2],
    /// The window's power summed over the frames taken.
    window_power: f64,
    /// Sum of squares in time, mid and side.
    energy: [f64; 2],
    frames: u64,
}

impl SpectrumMeter {
    pub fn new(rate: u32) -> Self {
        let size = frame_size(rate);
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(size);
        let window = (0..size).map(|n| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / size as f64).cos()) as f32).collect();
        let (input, output, scratch) = (fft.make_input_vec(), fft.make_output_vec(), fft.make_scratch_vec());
        let bins = output.len();
        Self {
            rate,
            fft,
            window,
            pending: [Vec::with_capacity(2 * size), Vec::with_capacity(2 * size)],
            input,
            output,
            scratch,
            power: [vec![0.0; bins], vec![0.0; bins]],
            window_power: 0.0,
            energy: [0.0; 2],
            frames: 0,
        }
    }

    pub fn push(&mut self, left: &[f32], right: &[f32]) {
        let from = self.pending[0].len();
        // Planes first, in loops the compiler vectorises; then the energies, in order.
        self.pending[0].extend(left.iter().zip(right).map(|(&l, &r)| 0.5 * (l + r)));
        self.pending[1].extend(left.iter().zip(right).map(|(&l, &r)| 0.5 * (l - r)));
        for (&mid, &side) in self.pending[0][from..].iter().zip(&self.pending[1][from..]) {
            self.energy[0] += f64::from(mid) * f64::from(mid);
            self.energy[1] += f64::from(side) * f64::from(side);
        }
        self.frames += left.len() as u64;
        let size = self.window.len();
        while self.pending[0].len() >= size {
            self.take_frame(size);
            let hop = size / 2;
            self.pending.iter_mut().for_each(|pending| drop(pending.drain(..hop)));
        }
    }

    /// Adds the power spectrum of the first `occupied` pending samples (zero beyond) of each plane.
    fn take_frame(&mut self, occupied: usize) {
        for plane in 0..2 {
            let (windowed, padding) = self.input.split_at_mut(occupied);
            windowed.iter_mut().zip(&self.pending[plane][..occupied]).zip(&self.window).for_each(|((x, sample), w)| *x = sample * w);
            padding.fill(0.0);
            self.fft.process_with_scratch(&mut self.input, &mut self.output, &mut self.scratch).expect("buffers sized by the plan");
            for (sum, bin) in self.power[plane].iter_mut().zip(&self.output) {
                *sum += f64::from(bin.norm_sqr());
            }
        }
        self.window_power += self.window[..occupied].iter().map(|w| f64::from(w * w)).sum::<f64>();
    }

    pub fn finish(mut self) -> Spectrum {
        // A stream shorter than one frame still has a spectrum: its samples, zero-padded.
        if self.window_power == 0.0 && !self.pending[0].is_empty() {
            self.take_frame(self.pending[0].len());
        }
        let size = self.window.len();
        // One-sided density: white noise of variance v reads v / (size / 2) in every bin.
        let scale = if self.window_power > 0.0 { 2.0 / (size as f64 * self.window_power) } else { 0.0 };
        let [mid, side] = self.power.map(|sums| sums.into_iter().map(|sum| sum * scale).collect());
        let frames = self.frames.max(1) as f64;
        Spectrum { rate: self.rate, size, mid, side, mid_energy: self.energy[0] / frames, side_energy: self.energy[1] / frames }
    }
}

/// A long-term spectrum: per bin of a `size`-point transform at `rate`, the mean power of the mid
/// and of the side signal, and their mean squares in time.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub rate: u32,
    pub size: usize,
    pub mid: Vec<f64>,
    pub side: Vec<f64>,
    pub mid_energy: f64,
    pub side_energy: f64,
}

impl Spectrum {
    pub fn bin_hz(&self) -> f64 {
        f64::from(self.rate) / self.size as f64
    }

    /// Each band's power (the mean of L² + R² that falls in it) from a power per bin, each bin
    /// counted for the part of its width inside the band; `None` for a band at or past Nyquist or
    /// with nothing in it.
    pub fn band_powers(&self, per_bin: impl Fn(usize) -> f64) -> [Option<f64>; BANDS] {
        let bin_hz = self.bin_hz();
        let usable_hz = 0.98 * f64::from(self.rate) / 2.0;
        std::array::from_fn(|band| {
            let (low, high) = band_edges_hz(band);
            if high > usable_hz {
                return None;
            }
            let first = (low / bin_hz - 0.5).floor().max(0.0) as usize;
            let last = ((high / bin_hz + 0.5).ceil() as usize).min(self.mid.len() - 1);
            let power: f64 = (first..=last)
                .map(|k| {
                    let (from, to) = ((k as f64 - 0.5) * bin_hz, (k as f64 + 0.5) * bin_hz);
                    let overlap = (to.min(high) - from.max(low)).max(0.0) / bin_hz;
                    overlap * per_bin(k)
                })
                .sum();
            (power > SILENT_POWER).then_some(power)
        })
    }

    /// Band levels in dB (of L² + R²: a full-scale sine in both channels reads 0).
    pub fn levels_db(&self) -> [Option<f64>; BANDS] {
        self.band_powers(|k| 2.0 * (self.mid[k] + self.side[k])).map(|power| power.map(|p| 10.0 * p.log10()))
    }

    /// Side energy over mid energy: 0 for mono, 1 for unrelated channels, above 1 for channels
    /// mostly out of phase. `None` for silence.
    pub fn width_ratio(&self) -> Option<f64> {
        (self.mid_energy + self.side_energy > SILENT_POWER && self.mid_energy > 0.0).then(|| self.side_energy / self.mid_energy)
    }
}

/// Band levels relative to a loudness, as the spectral error compares them: the tonal balance
/// with the level taken out.
pub fn normalised(levels: &[Option<f64>; BANDS], integrated_lufs: f64) -> [Option<f64>; BANDS] {
    levels.map(|level| level.map(|db| db - integrated_lufs))
}

/// The RMS over bands of the difference between two normalised spectra, in dB, over the bands
/// both have; `None` when they share none.
pub fn spectral_error_db(a: &[Option<f64>; BANDS], b: &[Option<f64>; BANDS]) -> Option<f64> {
    let differences: Vec<f64> = a.iter().zip(b).filter_map(|(a, b)| Some(a.as_ref()? - b.as_ref()?)).collect();
    (!differences.is_empty()).then(|| (differences.iter().map(|d| d * d).sum::<f64>() / differences.len() as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    #[test]
    fn bands_are_the_nominal_third_octaves_and_tile_the_range() {
        for (band, nominal) in BANDS_HZ.iter().enumerate() {
            assert!((band_centre_hz(band) / nominal - 1.0).abs() < 0.02, "{nominal}");
            if band > 0 {
                assert!((band_edges_hz(band).0 - band_edges_hz(band - 1).1).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn a_sine_lands_in_its_band_at_its_power_and_white_noise_spreads_by_bandwidth() {
        let rate = 48_000;
        let frames = rate as usize * 5;
        // 1 kHz at half scale, in phase in both channels: L² + R² averages 0.25, -6.02 dB; all mid.
        let sine: Vec<f32> = (0..frames).map(|n| 0.5 * (2.0 * std::f32::consts::PI * 1000.0 * n as f32 / rate as f32).sin()).collect();
        let mut meter = SpectrumMeter::new(rate);
        for (l, r) in sine.chunks(10_000).zip(sine.chunks(10_000)) {
            meter.push(l, r);
        }
        let spectrum = meter.finish();
        let levels = spectrum.levels_db();
        let at_1k = BANDS_HZ.iter().position(|&hz| hz == 1000.0).unwrap();
        assert!((levels[at_1k].unwrap() + 6.02).abs() < 0.05, "{:?}", levels[at_1k]);
        assert!(levels[at_1k - 2].is_none_or(|db| db < -90.0) && levels[at_1k + 2].is_none_or(|db| db < -90.0), "{levels:?}");
        assert_eq!(spectrum.width_ratio(), Some(0.0));

        // Uncorrelated white noise in each channel: each band holds its share of the bandwidth,
        // and mid and side carry as much.
        let frames = 4 * frames;
        let (left, right) = (test_noise(frames, 1), test_noise(frames, 2));
        let mut meter = SpectrumMeter::new(rate);
        meter.push(&left, &right);
        let spectrum = meter.finish();
        let total: f64 = left.iter().chain(&right).map(|x| f64::from(x * x)).sum::<f64>() / frames as f64;
        for (band, level) in spectrum.levels_db().iter().enumerate() {
            let (low, high) = band_edges_hz(band);
            let expected = 10.0 * (total * (high - low) / f64::from(rate / 2)).log10();
            // Estimation noise: 20 s of noise give a band of n bins about 7 n independent
            // readings, so a few dB of spread under 100 Hz and tenths of one above 1 kHz.
            let tolerance = match BANDS_HZ[band] {
                hz if hz < 200.0 => 1.5,
                hz if hz < 1000.0 => 0.5,
                _ => 0.2,
            };
            assert!((level.unwrap() - expected).abs() < tolerance, "{} Hz: {level:?} against {expected}", BANDS_HZ[band]);
        }
        assert!((spectrum.width_ratio().unwrap() - 1.0).abs() < 0.01);
    }

    #[test]
    fn the_spectral_error_is_the_rms_of_shared_bands() {
        let mut a = [Some(0.0); BANDS];
        let mut b = [Some(1.0); BANDS];
        a[0] = None;
        b[1] = Some(-1.0);
        // 26 bands 1 dB apart and one 1 dB apart the other way.
        assert_eq!(spectral_error_db(&a, &b), Some(1.0));
        assert_eq!(spectral_error_db(&[None; BANDS], &b), None);
        assert_eq!(normalised(&b, -10.0)[0], Some(11.0));
    }
}
