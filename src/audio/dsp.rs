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

    /// Two filters over two channels in one loop (transposed direct form II, in f64): each
    /// sample waits on the one before it, so the channels' independent chains run side by side
    /// in the core.
    pub fn process_pair(left_filter: &mut Biquad, right_filter: &mut Biquad, left: &mut [f32], right: &mut [f32]) {
        let (cl, cr) = (left_filter.c, right_filter.c);
        let (mut l1, mut l2, mut r1, mut r2) = (left_filter.s1, left_filter.s2, right_filter.s1, right_filter.s2);
        for (l, r) in left.iter_mut().zip(right.iter_mut()) {
            Self::tick(&cl, &mut l1, &mut l2, l);
            Self::tick(&cr, &mut r1, &mut r2, r);
        }
        (left_filter.s1, left_filter.s2, right_filter.s1, right_filter.s2) = (l1, l2, r1, r2);
    }

    /// Two tracks' pairs of filters over the same frames in one loop: four chains side by side,
    /// since each waits only on its own latency. Every channel's arithmetic is the same as alone.
    pub fn process_two_pairs(first: [&mut Biquad; 2], second: [&mut Biquad; 2], first_audio: [&mut [f32]; 2], second_audio: [&mut [f32]; 2]) {
        let [first_left, first_right] = first;
        let [second_left, second_right] = second;
        let filters = [first_left, first_right, second_left, second_right];
        let c = filters.each_ref().map(|filter| filter.c);
        let (mut s1, mut s2) = (filters.each_ref().map(|filter| filter.s1), filters.each_ref().map(|filter| filter.s2));
        let [a, b] = first_audio;
        let [x, y] = second_audio;
        assert!(a.len() == b.len() && x.len() == a.len() && y.len() == a.len(), "two tracks are processed together over the same frames");
        for (((a, b), x), y) in a.iter_mut().zip(b.iter_mut()).zip(x.iter_mut()).zip(y.iter_mut()) {
            Self::tick(&c[0], &mut s1[0], &mut s2[0], a);
            Self::tick(&c[1], &mut s1[1], &mut s2[1], b);
            Self::tick(&c[2], &mut s1[2], &mut s2[2], x);
            Self::tick(&c[3], &mut s1[3], &mut s2[3], y);
        }
        for ((filter, s1), s2) in filters.into_iter().zip(s1).zip(s2) {
            (filter.s1, filter.s2) = (s1, s2);
        }
    }
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

    pub fn process(&mut self, left: &mut [f32], right: &mut [f32]) {
        for (left_filter, right_filter) in self.left.iter_mut().zip(&mut self.right) {
            Biquad::process_pair(left_filter, right_filter, left, right);
        }
    }

    /// Two tracks' chains over the same frames, band by band side by side while both have one;
    /// each track's bands still run in its own order.
    pub fn process_two(first: &mut Equalizer, second: &mut Equalizer, first_audio: [&mut [f32]; 2], second_audio: [&mut [f32]; 2]) {
        let [a, b] = first_audio;
        let [x, y] = second_audio;
        let (mut first_bands, mut second_bands) = (first.left.iter_mut().zip(&mut first.right), second.left.iter_mut().zip(&mut second.right));
        loop {
            match (first_bands.next(), second_bands.next()) {
                (Some((l, r)), Some((m, n))) => Biquad::process_two_pairs([l, r], [m, n], [&mut *a, &mut *b], [&mut *x, &mut *y]),
                (Some((l, r)), None) => Biquad::process_pair(l, r, a, b),
                (None, Some((m, n))) => Biquad::process_pair(m, n, x, y),
                (None, None) => return,
            }
        }
    }
}

/// Feed-forward, stereo-linked compressor: peak level in dB, a hard knee, and attack/release
/// smoothing on the gain reduction.
#[derive(Debug, Clone)]
pub struct Compressor {
    threshold_db: f64,
    /// The threshold as a sample's magnitude: at or under it, a sample asks for no reduction,
    /// and its level in dB is not needed.
    threshold_gain: f64,
    slope: f64,
    makeup_db: f64,
    attack: f64,
    release: f64,
    reduction_db: f64,
    /// `10^((makeup_db - reduction_db) / 20)`, carried from sample to sample (see `process`).
    gain: f64,
    /// Samples since `gain` was last computed outright.
    carried: u32,
    /// The static curve's reduction for each frame of the chunk being processed.
    targets: Vec<f64>,
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
            makeup_db: settings.makeup_db,
            attack: coefficient(settings.attack_ms),
            release: coefficient(settings.release_ms),
            reduction_db: 0.0,
            gain: db_to_gain(settings.makeup_db),
            carried: 0,
            targets: Vec::new(),
        }
    }

    /// The gain reduction a steady level settles at: the static curve.
    pub fn static_reduction_db(&self, level_db: f64) -> f64 {
        (level_db - self.threshold_db).max(0.0) * self.slope
    }

    /// The gain follows the reduction sample by sample, which moves it by a small step: so the
    /// gain is carried, times `e^step` by its series to the fourth power (an error under 1e-12 a
    /// sample for steps under [`CARRIED_STEP`]), and computed outright every
    /// [`CARRIED_SAMPLES`] samples and on any larger step. An `exp` a sample was half of a
    /// typical mix's time; this matches it to within f64 rounding.
    pub fn process(&mut self, left: &mut [f32], right: &mut [f32]) {
        let targets = self.static_targets(left, right);
        for ((l, r), &target) in left.iter_mut().zip(right.iter_mut()).zip(&targets) {
            let gain = self.next_gain(target);
            *l *= gain;
            *r *= gain;
        }
        self.targets = targets;
    }

    /// Two compressors over the same frames in one loop: each one's recursion waits on its
    /// previous sample, so the two run side by side. Each computes exactly what it would alone.
    pub fn process_two(first: &mut Compressor, second: &mut Compressor, first_audio: [&mut [f32]; 2], second_audio: [&mut [f32]; 2]) {
        let [a, b] = first_audio;
        let [x, y] = second_audio;
        assert!(a.len() == b.len() && x.len() == a.len() && y.len() == a.len(), "two tracks are processed together over the same frames");
        let (first_targets, second_targets) = (first.static_targets(a, b), second.static_targets(x, y));
        for ((((a, b), x), y), (&first_target, &second_target)) in
            a.iter_mut().zip(b.iter_mut()).zip(x.iter_mut()).zip(y.iter_mut()).zip(first_targets.iter().zip(&second_targets))
        {
            let gain = first.next_gain(first_target);
            *a *= gain;
            *b *= gain;
            let gain = second.next_gain(second_target);
            *x *= gain;
            *y *= gain;
        }
        (first.targets, second.targets) = (first_targets, second_targets);
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

    /// The detector's step towards the static curve's `target` for the next frame, and the
    /// gain that frame gets.
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
        self.equalizer.process(left, right);
        if let Some(compressor) = self.compressor.as_mut() {
            compressor.process(left, right);
        }
    }

    /// Two strips over the same frames, their filters and compressors side by side.
    pub fn process_two(first: &mut ChannelStrip, second: &mut ChannelStrip, first_audio: [&mut [f32]; 2], second_audio: [&mut [f32]; 2]) {
        let [a, b] = first_audio;
        let [x, y] = second_audio;
        Equalizer::process_two(&mut first.equalizer, &mut second.equalizer, [&mut *a, &mut *b], [&mut *x, &mut *y]);
        match (first.compressor.as_mut(), second.compressor.as_mut()) {
            (Some(first), Some(second)) => Compressor::process_two(first, second, [a, b], [x, y]),
            (first, second) => {
                if let Some(compressor) = first {
                    compressor.process(a, b);
                }
                if let Some(compressor) = second {
                    compressor.process(x, y);
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

    pub fn process(&mut self, left: &mut [f32], right: &mut [f32]) {
        self.apply_gain(left, right);
        self.strip.process(left, right);
        self.apply_pan(left, right);
    }

    /// Two tracks over the same frames, their strips side by side (see [`ChannelStrip::process_two`]).
    pub fn process_two(first: &mut TrackChain, second: &mut TrackChain, first_audio: [&mut [f32]; 2], second_audio: [&mut [f32]; 2]) {
        let [a, b] = first_audio;
        let [x, y] = second_audio;
        first.apply_gain(a, b);
        second.apply_gain(x, y);
        ChannelStrip::process_two(&mut first.strip, &mut second.strip, [&mut *a, &mut *b], [&mut *x, &mut *y]);
        first.apply_pan(a, b);
        second.apply_pan(x, y);
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
            Biquad::process_pair(&mut Biquad::new(coefficients), &mut Biquad::new(coefficients), &mut signal, &mut other);
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
                let coefficient = if target > reference.reduction_db { reference.attack } else { reference.release };
                reference.reduction_db = target + coefficient * (reference.reduction_db - target);
                let want = f64::from(x) * db_to_gain(settings.makeup_db - reference.reduction_db);
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
                ChannelStrip::process_two(&mut first, &mut second, [&mut a[r.clone()], &mut b[r.clone()]], [&mut x[r.clone()], &mut y[r]]);
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
