//! Per-track and bus processing: RBJ biquads, a feed-forward compressor and the pan law.
//!
//! Filters run in f64 (transposed direct form II) so that low-frequency EQ on high sample rates
//! stays accurate; the audio itself travels as f32.

use std::f64::consts::PI;

use super::settings::{CompressorSettings, EqBand, EqType, TrackSettings};

pub fn db_to_gain(db: f64) -> f64 {
    10f64.powf(db / 20.0)
}

pub fn gain_to_db(gain: f64) -> f64 {
    20.0 * gain.log10()
}

/// dB per doubling of a level: `20·log10(2)`.
const DB_PER_OCTAVE: f64 = 6.020_599_913_279_624;
/// dB per neper, the natural logarithm's unit of a level: `20 / ln(10)`.
const DB_PER_NEPER: f64 = 20.0 / std::f64::consts::LN_10;

/// [`gain_to_db`] of a positive, normal `f32`, to within 1e-12 dB of the library's: the
/// exponent's octaves, plus the mantissa (brought into [√½, √2)) by the series of
/// `ln(m) = 2·atanh(s)`, `s = (m - 1) / (m + 1)`, to `s^15` (the next term is under 1e-13).
/// It has no branch and no call, so that a loop of it runs in vector lanes: the library's
/// `log10` in the compressor's static curve was a quarter of a typical mix's CPU time.
#[inline(always)]
fn level_db(level: f32) -> f64 {
    let bits = level.to_bits();
    let mantissa = f64::from(f32::from_bits(bits & 0x007f_ffff | 0x3f80_0000));
    let high = mantissa > std::f64::consts::SQRT_2;
    let octaves = f64::from(((bits >> 23) & 0xff) as i32 - 127 + i32::from(high));
    let mantissa = if high { mantissa * 0.5 } else { mantissa };
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    let s2 = s * s;
    let series = [1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0].into_iter().fold(0.0, |sum, term| sum * s2 + term);
    octaves * DB_PER_OCTAVE + 2.0 * s * series * DB_PER_NEPER
}

/// Constant-power pan: `(left, right)` gains, each -3 dB at the centre, `cos²+sin² = 1` everywhere.
pub fn pan_gains(pan: f64) -> (f64, f64) {
    let angle = (pan.clamp(-1.0, 1.0) + 1.0) * PI / 4.0;
    (angle.cos(), angle.sin())
}

/// Which tracks sound, with DAW semantics: when any track is soloed only soloed tracks play, and
/// mute always wins.
pub fn audible(tracks: &[TrackSettings]) -> Vec<bool> {
    let any_solo = tracks.iter().any(|t| t.solo);
    tracks.iter().map(|t| !t.mute && (!any_solo || t.solo)).collect()
}

/// Normalised biquad coefficients (a0 = 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BiquadCoefficients {
    pub b0: f64,
    pub b1: f64,
    pub b2: f64,
    pub a1: f64,
    pub a2: f64,
}

impl BiquadCoefficients {
    /// The filters of Robert Bristow-Johnson's "Audio EQ Cookbook".
    pub fn rbj(band: &EqBand, sample_rate: u32) -> Self {
        let w0 = 2.0 * PI * band.freq_hz / f64::from(sample_rate);
        let (sin, cos) = w0.sin_cos();
        let alpha = sin / (2.0 * band.q);
        let a = 10f64.powf(band.gain_db / 40.0);
        let sqrt_a_alpha = 2.0 * a.sqrt() * alpha;
        let (b0, b1, b2, a0, a1, a2) = match band.kind {
            EqType::Lowpass => ((1.0 - cos) / 2.0, 1.0 - cos, (1.0 - cos) / 2.0, 1.0 + alpha, -2.0 * cos, 1.0 - alpha),
            EqType::Highpass => ((1.0 + cos) / 2.0, -(1.0 + cos), (1.0 + cos) / 2.0, 1.0 + alpha, -2.0 * cos, 1.0 - alpha),
            EqType::Peak => (1.0 + alpha * a, -2.0 * cos, 1.0 - alpha * a, 1.0 + alpha / a, -2.0 * cos, 1.0 - alpha / a),
            EqType::Lowshelf => (
                a * ((a + 1.0) - (a - 1.0) * cos + sqrt_a_alpha),
                2.0 * a * ((a - 1.0) - (a + 1.0) * cos),
                a * ((a + 1.0) - (a - 1.0) * cos - sqrt_a_alpha),
                (a + 1.0) + (a - 1.0) * cos + sqrt_a_alpha,
                -2.0 * ((a - 1.0) + (a + 1.0) * cos),
                (a + 1.0) + (a - 1.0) * cos - sqrt_a_alpha,
            ),
            EqType::Highshelf => (
                a * ((a + 1.0) + (a - 1.0) * cos + sqrt_a_alpha),
                -2.0 * a * ((a - 1.0) + (a + 1.0) * cos),
                a * ((a + 1.0) + (a - 1.0) * cos - sqrt_a_alpha),
                (a + 1.0) - (a - 1.0) * cos + sqrt_a_alpha,
                2.0 * ((a - 1.0) - (a + 1.0) * cos),
                (a + 1.0) - (a - 1.0) * cos - sqrt_a_alpha,
            ),
        };
        Self { b0: b0 / a0, b1: b1 / a0, b2: b2 / a0, a1: a1 / a0, a2: a2 / a0 }
    }

    /// |H(e^jw)| at `freq_hz`, straight from the transfer function.
    #[cfg(test)]
    pub fn magnitude(&self, freq_hz: f64, sample_rate: u32) -> f64 {
        let w = 2.0 * PI * freq_hz / f64::from(sample_rate);
        let (z1r, z1i) = (w.cos(), -w.sin());
        let (z2r, z2i) = ((2.0 * w).cos(), -(2.0 * w).sin());
        let num = ((self.b0 + self.b1 * z1r + self.b2 * z2r), (self.b1 * z1i + self.b2 * z2i));
        let den = ((1.0 + self.a1 * z1r + self.a2 * z2r), (self.a1 * z1i + self.a2 * z2i));
        num.0.hypot(num.1) / den.0.hypot(den.1)
    }
}

#[derive(Debug, Clone)]
pub struct Biquad {
    c: BiquadCoefficients,
    s1: f64,
    s2: f64,
}

impl Biquad {
    pub fn new(c: BiquadCoefficients) -> Self {
        Self { c, s1: 0.0, s2: 0.0 }
    }

    /// One sample through the filter with coefficients `c` and state `(s1, s2)`, the state kept
    /// by the caller in locals so that it stays in registers across the caller's loop.
    #[inline(always)]
    fn tick(c: &BiquadCoefficients, s1: &mut f64, s2: &mut f64, sample: &mut f32) {
        let x = f64::from(*sample);
        let y = c.b0 * x + *s1;
        *s1 = c.b1 * x - c.a1 * y + *s2;
        *s2 = c.b2 * x - c.a2 * y;
        *sample = y as f32;
    }

    /// Each track's pair of filters over its two channels, `N` tracks in one loop (transposed
    /// direct form II, in f64). Each sample waits on the one before it, so the independent
    /// chains of every track's channels run side by side in the core: several tracks take little
    /// longer than one. A channel's arithmetic is the same whatever runs beside it.
    #[expect(clippy::needless_range_loop, reason = "a frame's index runs across every lane's channels, which no one iterator zips")]
    pub fn process_lanes<const N: usize>(mut filters: [[&mut Biquad; 2]; N], audio: [Channels; N]) {
        let (frames, audio) = same_frames(audio);
        let c = filters.each_ref().map(|pair| pair.each_ref().map(|filter| filter.c));
        let mut s1 = filters.each_ref().map(|pair| pair.each_ref().map(|filter| filter.s1));
        let mut s2 = filters.each_ref().map(|pair| pair.each_ref().map(|filter| filter.s2));
        for i in 0..frames {
            for lane in 0..N {
                for channel in 0..2 {
                    Self::tick(&c[lane][channel], &mut s1[lane][channel], &mut s2[lane][channel], &mut audio[lane][channel][i]);
                }
            }
        }
        for (lane, pair) in filters.iter_mut().enumerate() {
            for (channel, filter) in pair.iter_mut().enumerate() {
                (filter.s1, filter.s2) = (s1[lane][channel], s2[lane][channel]);
            }
        }
    }
}

/// A track's two channels, left and right.
pub type Channels<'a> = [&'a mut [f32]; 2];

/// The frames every track's channels hold, and the channels cut to exactly that many (which
/// spares the loops over them their bounds checks): tracks run together over the same frames.
fn same_frames<const N: usize>(audio: [Channels; N]) -> (usize, [Channels; N]) {
    let frames = audio.first().map_or(0, |[left, _]| left.len());
    assert!(audio.iter().flatten().all(|channel| channel.len() == frames), "tracks run together over the same frames");
    (frames, audio.map(|[left, right]| [&mut left[..frames], &mut right[..frames]]))
}

/// The channels again, for the next stage over the same frames.
fn reborrow<'a, const N: usize>(audio: &'a mut [Channels; N]) -> [Channels<'a>; N] {
    audio.each_mut().map(|[left, right]| [&mut **left, &mut **right])
}

/// A stereo EQ chain: the same bands on both channels, each channel with its own state.
#[derive(Debug, Clone, Default)]
pub struct Equalizer {
    left: Vec<Biquad>,
    right: Vec<Biquad>,
}

impl Equalizer {
    /// The chain for this rate. Every band lies below its Nyquist frequency: validating the
    /// settings checked that for the output rate.
    pub fn new(bands: &[EqBand], sample_rate: u32) -> Self {
        let filters: Vec<Biquad> = bands.iter().map(|band| Biquad::new(BiquadCoefficients::rbj(band, sample_rate))).collect();
        Self { left: filters.clone(), right: filters }
    }

    /// `N` tracks' chains over the same frames, each band in lanes side by side while every
    /// track has one; each track's bands still run in its own order.
    pub fn process_lanes<const N: usize>(mut equalizers: [&mut Equalizer; N], mut audio: [Channels; N]) {
        let shared = equalizers.iter().map(|eq| eq.left.len()).min().unwrap_or(0);
        for band in 0..shared {
            Biquad::process_lanes(equalizers.each_mut().map(|eq| eq.band(band)), reborrow(&mut audio));
        }
        // The bands only some tracks have, each track on its own.
        for (eq, [left, right]) in equalizers.into_iter().zip(audio) {
            for band in shared..eq.left.len() {
                Biquad::process_lanes([eq.band(band)], [[&mut *left, &mut *right]]);
            }
        }
    }

    /// The left and right filters of a band.
    fn band(&mut self, band: usize) -> [&mut Biquad; 2] {
        [&mut self.left[band], &mut self.right[band]]
    }
}

/// Feed-forward, stereo-linked compressor: peak level in dB, a hard knee, and attack/release
/// smoothing on the gain reduction.
#[derive(Debug, Clone)]
pub struct Compressor {
    threshold_db: f64,
    /// The threshold as a sample's magnitude: at or under it, a sample asks for no reduction
    /// (its level in dB is worked out all the same, so that the loop has no branch).
    threshold_gain: f64,
    slope: f64,
    follower: Follower,
    /// The static curve's reduction for each frame of the chunk being processed.
    targets: Vec<f64>,
}

/// The compressor's recursion: the gain reduction following the static curve, and the gain it
/// gives. Small and `Copy`, so that a chunk's loop holds it in registers.
#[derive(Debug, Clone, Copy)]
struct Follower {
    makeup_db: f64,
    attack: f64,
    release: f64,
    reduction_db: f64,
    /// `10^((makeup_db - reduction_db) / 20)`, carried from sample to sample (see
    /// [`Follower::next_gain`]).
    gain: f64,
    /// Samples since `gain` was last computed outright.
    carried: u32,
}

/// dB to a natural exponent: `10^(db / 20) = e^(db * LN_10 / 20)`.
const DB_TO_EXPONENT: f64 = std::f64::consts::LN_10 / 20.0;
/// The gain is carried by a series for at most this many samples, then computed outright.
const CARRIED_SAMPLES: u32 = 32;
/// The largest exponent step the series takes; beyond it (a fast attack's first samples) the
/// gain is computed outright.
const CARRIED_STEP: f64 = 0.01;

impl Compressor {
    pub fn new(settings: &CompressorSettings, sample_rate: u32) -> Self {
        let coefficient = |ms: f64| if ms <= 0.0 { 0.0 } else { (-1.0 / (ms / 1000.0 * f64::from(sample_rate))).exp() };
        Self {
            threshold_db: settings.threshold_db,
            threshold_gain: db_to_gain(settings.threshold_db),
            slope: 1.0 - 1.0 / settings.ratio,
            follower: Follower {
                makeup_db: settings.makeup_db,
                attack: coefficient(settings.attack_ms),
                release: coefficient(settings.release_ms),
                reduction_db: 0.0,
                gain: db_to_gain(settings.makeup_db),
                carried: 0,
            },
            targets: Vec::new(),
        }
    }

    /// The gain reduction a steady level settles at: the static curve.
    pub fn static_reduction_db(&self, level_db: f64) -> f64 {
        (level_db - self.threshold_db).max(0.0) * self.slope
    }

    pub fn process(&mut self, left: &mut [f32], right: &mut [f32]) {
        Self::process_lanes([self], [[left, right]]);
    }

    /// `N` compressors over the same frames in one loop: each one's recursion waits on its
    /// previous sample, so they run side by side. Each computes exactly what it would alone.
    pub fn process_lanes<const N: usize>(mut compressors: [&mut Compressor; N], audio: [Channels; N]) {
        let (frames, audio) = same_frames(audio);
        let targets: [Vec<f64>; N] = std::array::from_fn(|lane| compressors[lane].static_targets(audio[lane][0], audio[lane][1]));
        let mut followers = compressors.each_ref().map(|compressor| compressor.follower);
        {
            let targets = targets.each_ref().map(|targets| &targets[..frames]);
            for i in 0..frames {
                for lane in 0..N {
                    let gain = followers[lane].next_gain(targets[lane][i]);
                    audio[lane][0][i] *= gain;
                    audio[lane][1][i] *= gain;
                }
            }
        }
        for ((compressor, follower), targets) in compressors.iter_mut().zip(followers).zip(targets) {
            (compressor.follower, compressor.targets) = (follower, targets);
        }
    }

    /// The static curve's reduction for each frame, in a loop of its own that runs in vector
    /// lanes (see [`level_db`]), apart from the recursion, which cannot: four lanes wide where
    /// the processor has AVX2, the same operations in the same order either way. The buffer is
    /// the compressor's own, lent out for the chunk.
    fn static_targets(&mut self, left: &[f32], right: &[f32]) -> Vec<f64> {
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        targets.resize(left.len(), 0.0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2, as just checked.
            unsafe { self.fill_targets_avx2(&mut targets, left, right) };
            return targets;
        }
        self.fill_targets(&mut targets, left, right);
        targets
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fill_targets_avx2(&self, targets: &mut [f64], left: &[f32], right: &[f32]) {
        self.fill_targets(targets, left, right)
    }

    #[inline(always)]
    fn fill_targets(&self, targets: &mut [f64], left: &[f32], right: &[f32]) {
        for ((target, l), r) in targets.iter_mut().zip(left).zip(right) {
            let peak = l.abs().max(r.abs());
            // Worked out for every frame, so that there is no branch; a frame at or under the
            // threshold (silence included, where the level is meaningless) asks for none.
            let reduction = self.static_reduction_db(level_db(peak));
            *target = if f64::from(peak) > self.threshold_gain { reduction } else { 0.0 };
        }
    }
}

impl Follower {
    /// The detector's step towards the static curve's `target` for the next frame, and the
    /// gain that frame gets.
    ///
    /// The gain follows the reduction sample by sample, which moves it by a small step: so the
    /// gain is carried, times `e^step` by its series to the fourth power (an error under 1e-12 a
    /// sample for steps under [`CARRIED_STEP`]), and computed outright every
    /// [`CARRIED_SAMPLES`] samples and on any larger step. An `exp` a sample was half of a
    /// typical mix's time; this matches it to within f64 rounding.
    #[inline(always)]
    fn next_gain(&mut self, target: f64) -> f32 {
        let coefficient = if target > self.reduction_db { self.attack } else { self.release };
        let previous = self.reduction_db;
        self.reduction_db = target + coefficient * (previous - target);
        let step = (previous - self.reduction_db) * DB_TO_EXPONENT;
        if self.carried < CARRIED_SAMPLES && step.abs() <= CARRIED_STEP {
            self.gain *= 1.0 + step * (1.0 + step / 2.0 * (1.0 + step / 3.0 * (1.0 + step / 4.0)));
            self.carried += 1;
        } else {
            self.gain = ((self.makeup_db - self.reduction_db) * DB_TO_EXPONENT).exp();
            self.carried = 0;
        }
        self.gain as f32
    }
}

/// EQ, then compression: what a track and the master bus both do to their audio.
pub struct ChannelStrip {
    equalizer: Equalizer,
    compressor: Option<Compressor>,
}

impl ChannelStrip {
    pub fn new(eq: &[EqBand], compressor: Option<&CompressorSettings>, sample_rate: u32) -> Self {
        Self { equalizer: Equalizer::new(eq, sample_rate), compressor: compressor.map(|c| Compressor::new(c, sample_rate)) }
    }

    pub fn process(&mut self, left: &mut [f32], right: &mut [f32]) {
        Self::process_lanes([self], [[left, right]]);
    }

    /// `N` strips over the same frames, their filters and compressors in lanes side by side.
    pub fn process_lanes<const N: usize>(mut strips: [&mut ChannelStrip; N], mut audio: [Channels; N]) {
        Equalizer::process_lanes(strips.each_mut().map(|strip| &mut strip.equalizer), reborrow(&mut audio));
        if strips.iter().all(|strip| strip.compressor.is_some()) {
            Compressor::process_lanes(strips.map(|strip| strip.compressor.as_mut().expect("every strip has one")), audio);
        } else {
            for (strip, [left, right]) in strips.into_iter().zip(audio) {
                if let Some(compressor) = strip.compressor.as_mut() {
                    compressor.process(left, right);
                }
            }
        }
    }
}

/// Everything one track does to its audio, in order: gain, EQ, compressor, pan.
pub struct TrackChain {
    gain: f32,
    strip: ChannelStrip,
    pan: (f32, f32),
}

impl TrackChain {
    pub fn new(track: &TrackSettings, sample_rate: u32) -> Self {
        let (left, right) = pan_gains(track.pan);
        Self { gain: db_to_gain(track.gain_db) as f32, strip: ChannelStrip::new(&track.eq, track.compressor.as_ref(), sample_rate), pan: (left as f32, right as f32) }
    }

    /// `N` tracks over the same frames, their strips in lanes side by side (see
    /// [`ChannelStrip::process_lanes`]).
    pub fn process_lanes<const N: usize>(mut chains: [&mut TrackChain; N], mut audio: [Channels; N]) {
        for (chain, [left, right]) in chains.iter().zip(audio.iter_mut()) {
            chain.apply_gain(left, right);
        }
        ChannelStrip::process_lanes(chains.each_mut().map(|chain| &mut chain.strip), reborrow(&mut audio));
        for (chain, [left, right]) in chains.iter().zip(audio.iter_mut()) {
            chain.apply_pan(left, right);
        }
    }

    fn apply_gain(&self, left: &mut [f32], right: &mut [f32]) {
        left.iter_mut().chain(right.iter_mut()).for_each(|x| *x *= self.gain);
    }

    fn apply_pan(&self, left: &mut [f32], right: &mut [f32]) {
        left.iter_mut().for_each(|x| *x *= self.pan.0);
        right.iter_mut().for_each(|x| *x *= self.pan.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::StereoBuffer;

    const RATE: u32 = 48_000;

    fn band(kind: EqType, freq_hz: f64, q: f64, gain_db: f64) -> EqBand {
        EqBand { kind, freq_hz, q, gain_db }
    }

    fn sine(freq: f64, frames: usize) -> Vec<f32> {
        (0..frames).map(|n| (2.0 * PI * freq * n as f64 / f64::from(RATE)).sin() as f32).collect()
    }

    fn rms(x: &[f32]) -> f64 {
        (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
    }

    #[test]
    fn pan_law_is_constant_power_with_minus_3_db_centre() {
        let (l, r) = pan_gains(0.0);
        assert!((gain_to_db(l) + 3.0103).abs() < 1e-3 && (l - r).abs() < 1e-12);
        assert!(pan_gains(-1.0).1.abs() < 1e-12);
        assert!((pan_gains(1.0).1 - 1.0).abs() < 1e-12);
        for pan in [-0.9, -0.3, 0.25, 0.7] {
            let (l, r) = pan_gains(pan);
            assert!((l * l + r * r - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn biquad_responses_match_the_rbj_formulas_at_known_frequencies() {
        // (band, frequency, expected gain in dB from the cookbook's definitions)
        let cases = [
            (band(EqType::Highpass, 1000.0, std::f64::consts::FRAC_1_SQRT_2, 0.0), 1000.0, -3.0103),
            (band(EqType::Lowpass, 1000.0, std::f64::consts::FRAC_1_SQRT_2, 0.0), 1000.0, -3.0103),
            (band(EqType::Highpass, 1000.0, std::f64::consts::FRAC_1_SQRT_2, 0.0), 100.0, -40.0),
            (band(EqType::Peak, 2000.0, 1.0, 6.0), 2000.0, 6.0),
            (band(EqType::Peak, 2000.0, 1.0, -9.0), 2000.0, -9.0),
            (band(EqType::Lowshelf, 200.0, std::f64::consts::FRAC_1_SQRT_2, 6.0), 20.0, 6.0),
            (band(EqType::Lowshelf, 200.0, std::f64::consts::FRAC_1_SQRT_2, 6.0), 200.0, 3.0),
            (band(EqType::Highshelf, 4000.0, std::f64::consts::FRAC_1_SQRT_2, -6.0), 20_000.0, -6.0),
            (band(EqType::Highshelf, 4000.0, std::f64::consts::FRAC_1_SQRT_2, -6.0), 4000.0, -3.0),
        ];
        for (band, freq, expected_db) in cases {
            let coefficients = BiquadCoefficients::rbj(&band, RATE);
            let formula_db = gain_to_db(coefficients.magnitude(freq, RATE));
            assert!((formula_db - expected_db).abs() < 0.15, "{band:?} at {freq} Hz: formula {formula_db:.3} dB");
            // The running filter agrees with its transfer function on a steady sine.
            let mut signal = sine(freq, RATE as usize);
            let mut other = signal.clone();
            Biquad::process_lanes([[&mut Biquad::new(coefficients), &mut Biquad::new(coefficients)]], [[&mut signal, &mut other]]);
            assert_eq!(signal, other, "each channel is filtered alike");
            let measured_db = gain_to_db(rms(&signal[RATE as usize / 2..]) / std::f64::consts::FRAC_1_SQRT_2);
            assert!((measured_db - formula_db).abs() < 0.05, "{band:?} at {freq} Hz: measured {measured_db:.3}, formula {formula_db:.3}");
        }
    }

    #[test]
    fn the_carried_gain_is_the_gain_computed_outright_every_sample() {
        // Bursts over the threshold with silence between: fast attacks (a 0 ms one jumps), and
        // long releases, where the gain is carried longest.
        let signal: Vec<f32> = (0..RATE as usize).map(|n| if (n / 2000) % 3 == 0 { 0.9 * (n as f32 * 0.07).sin() } else { 0.001 }).collect();
        for attack_ms in [0.0, 0.5, 10.0] {
            let settings = CompressorSettings { threshold_db: -30.0, ratio: 8.0, attack_ms, release_ms: 200.0, makeup_db: 3.0 };
            let mut compressor = Compressor::new(&settings, RATE);
            let (mut left, mut right) = (signal.clone(), signal.clone());
            compressor.process(&mut left, &mut right);
            // The definition: the same detector, and 10^(gain / 20) computed for every sample.
            let mut reference = Compressor::new(&settings, RATE);
            for (n, (&x, &got)) in signal.iter().zip(&left).enumerate() {
                let level = f64::from(x.abs());
                let target = if level > reference.threshold_gain { reference.static_reduction_db(gain_to_db(level)) } else { 0.0 };
                let follower = &mut reference.follower;
                let coefficient = if target > follower.reduction_db { follower.attack } else { follower.release };
                follower.reduction_db = target + coefficient * (follower.reduction_db - target);
                let want = f64::from(x) * db_to_gain(settings.makeup_db - follower.reduction_db);
                assert!((f64::from(got) - want).abs() <= 1e-6 * want.abs() + 1e-12, "attack {attack_ms} ms, sample {n}: {got} against {want}");
            }
            assert_eq!(left, right);
        }
    }

    #[test]
    fn two_strips_side_by_side_compute_what_each_computes_alone() {
        let noise = |seed| crate::audio::buffer::test_noise(10_000, seed);
        let strip = |bands: Vec<EqBand>, compressor: Option<CompressorSettings>| ChannelStrip::new(&bands, compressor.as_ref(), RATE);
        let compressor = |threshold_db, attack_ms| Some(CompressorSettings { threshold_db, ratio: 5.0, attack_ms, release_ms: 100.0, makeup_db: 2.0 });
        // Band counts 2 and 1, a compressor against none, and both with different compressors.
        let cases = [
            (
                (vec![band(EqType::Peak, 1000.0, 1.0, 6.0), band(EqType::Lowshelf, 100.0, 0.7, -4.0)], compressor(-15.0, 3.0)),
                (vec![band(EqType::Highpass, 200.0, 0.7, 0.0)], None),
            ),
            ((vec![], compressor(-30.0, 0.0)), (vec![band(EqType::Highshelf, 5000.0, 0.7, 3.0)], compressor(-10.0, 20.0))),
        ];
        for ((first_bands, first_compressor), (second_bands, second_compressor)) in cases {
            let (mut first, mut second) = (strip(first_bands.clone(), first_compressor), strip(second_bands.clone(), second_compressor));
            let (mut first_alone, mut second_alone) = (strip(first_bands, first_compressor), strip(second_bands, second_compressor));
            let [mut a, mut b, mut x, mut y] = [noise(1), noise(2), noise(3), noise(4)];
            let [mut a_alone, mut b_alone, mut x_alone, mut y_alone] = [a.clone(), b.clone(), x.clone(), y.clone()];
            // In chunks, so that the state carried between them is checked too.
            for range in [0..3000, 3000..3001, 3001..10_000] {
                let r = range.clone();
                ChannelStrip::process_lanes([&mut first, &mut second], [[&mut a[r.clone()], &mut b[r.clone()]], [&mut x[r.clone()], &mut y[r]]]);
                first_alone.process(&mut a_alone[range.clone()], &mut b_alone[range.clone()]);
                second_alone.process(&mut x_alone[range.clone()], &mut y_alone[range]);
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            assert_eq!([bits(&a), bits(&b), bits(&x), bits(&y)], [bits(&a_alone), bits(&b_alone), bits(&x_alone), bits(&y_alone)]);
            assert_ne!(bits(&a), bits(&noise(1)), "the strip changed the audio");
        }
    }

    #[test]
    fn level_db_is_the_library_s_20_log10_within_1e_12_db() {
        // Every 997th f32 from the smallest normal to the largest: every exponent, and mantissas
        // across [1, 2) on both sides of √2.
        let mut worst = (0.0f64, 0f32);
        for bits in (0x0080_0000u32..0x7f80_0000).step_by(997) {
            let level = f32::from_bits(bits);
            let error = (level_db(level) - gain_to_db(f64::from(level))).abs();
            if error > worst.0 {
                worst = (error, level);
            }
        }
        assert!(worst.0 < 1e-12, "{} dB off at {}", worst.0, worst.1);
        assert_eq!([level_db(1.0), level_db(0.5), level_db(4.0)], [0.0, -DB_PER_OCTAVE, 2.0 * DB_PER_OCTAVE]);
    }

    #[test]
    fn the_static_curve_reads_the_same_in_lanes_of_any_width() {
        let settings = CompressorSettings { threshold_db: -24.0, ratio: 3.0, attack_ms: 1.0, release_ms: 50.0, makeup_db: 0.0 };
        let mut compressor = Compressor::new(&settings, RATE);
        // Noise from silence to full scale, a few frames at a time and many at once.
        let left: Vec<f32> = crate::audio::buffer::test_noise(4099, 5).iter().enumerate().map(|(n, x)| x * (n as f32 / 4099.0).powi(3)).collect();
        let right = crate::audio::buffer::test_noise(4099, 6);
        for frames in [1, 3, 4099] {
            let mut portable = vec![0.0; frames];
            compressor.fill_targets(&mut portable, &left[..frames], &right[..frames]);
            let used = compressor.static_targets(&left[..frames], &right[..frames]);
            assert_eq!(used.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        let targets = compressor.static_targets(&left, &right);
        assert!(targets.contains(&0.0) && targets.iter().any(|&t| t > 5.0), "the noise spans the threshold");
    }

    #[test]
    fn compressor_settles_at_its_static_curve() {
        let settings = CompressorSettings { threshold_db: -20.0, ratio: 4.0, attack_ms: 5.0, release_ms: 50.0, makeup_db: 2.0 };
        // A square wave has a constant peak level, so the detector sees a steady -6 dBFS.
        let amplitude = db_to_gain(-6.0) as f32;
        let square: Vec<f32> = (0..RATE as usize).map(|n| if (n / 100) % 2 == 0 { amplitude } else { -amplitude }).collect();
        let mut chunk = StereoBuffer { left: square.clone(), right: square };
        Compressor::new(&settings, RATE).process(&mut chunk.left, &mut chunk.right);
        let out_db = gain_to_db(f64::from(chunk.left.last().unwrap().abs()));
        // 14 dB over threshold at 4:1 leaves 3.5 dB over: -16.5 dBFS, plus 2 dB makeup.
        assert!((out_db - (-14.5)).abs() < 0.01, "settled at {out_db:.3} dBFS");
        // Below threshold it only applies makeup.
        let quiet = db_to_gain(-30.0) as f32;
        let mut chunk = StereoBuffer { left: vec![quiet; 4800], right: vec![quiet; 4800] };
        Compressor::new(&settings, RATE).process(&mut chunk.left, &mut chunk.right);
        assert!((gain_to_db(f64::from(chunk.left[4799])) - (-28.0)).abs() < 0.01);
    }

    #[test]
    fn solo_and_mute_follow_daw_rules() {
        let track = |mute, solo| TrackSettings { mute, solo, ..Default::default() };
        assert_eq!(audible(&[track(false, false), track(true, false)]), [true, false]);
        assert_eq!(audible(&[track(false, true), track(false, false)]), [true, false]);
        assert_eq!(audible(&[track(true, true), track(false, true), track(false, false)]), [false, true, false]);
        assert_eq!(audible(&[track(false, false), track(false, false)]), [true, true]);
    }
}
