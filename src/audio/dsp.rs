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
    let series = [1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0].into_iter().fold(0.0f64, |sum, term| sum.mul_add(s2, term));
    octaves.mul_add(DB_PER_OCTAVE, 2.0 * s * series * DB_PER_NEPER)
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

    /// One sample through the filter with state `[s1, s2]` (transposed direct form II, in f64):
    /// the definition every path of the strips computes, in this order.
    #[inline(always)]
    fn tick(&self, sample: f32, [s1, s2]: &mut [f64; 2]) -> f32 {
        let x = f64::from(sample);
        let y = self.b0.mul_add(x, *s1);
        *s1 = (-self.a1).mul_add(y, self.b1.mul_add(x, *s2));
        *s2 = (-self.a2).mul_add(y, self.b2 * x);
        y as f32
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

/// The filter that changes nothing (`y = 1·x + 0`): a strip with fewer bands than those beside it
/// runs it in their place. It can turn a -0.0 sample into +0.0, which no sum, gain or meter after
/// it can tell apart.
const PASS_THROUGH: BiquadCoefficients = BiquadCoefficients { b0: 1.0, b1: 0.0, b2: 0.0, a1: 0.0, a2: 0.0 };

/// One EQ band of a stereo strip: its filter, and each channel's state `[s1, s2]`.
#[derive(Debug, Clone)]
struct Band {
    c: BiquadCoefficients,
    state: [[f64; 2]; 2],
}

/// A stereo EQ chain: the same bands on both channels, each channel with its own state.
#[derive(Debug, Clone, Default)]
pub struct Equalizer {
    bands: Vec<Band>,
}

impl Equalizer {
    /// The chain for this rate. Every band lies below its Nyquist frequency: validating the
    /// settings checked that for the output rate.
    pub fn new(bands: &[EqBand], sample_rate: u32) -> Self {
        Self { bands: bands.iter().map(|band| Band { c: BiquadCoefficients::rbj(band, sample_rate), state: [[0.0; 2]; 2] }).collect() }
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

/// Feed-forward, stereo-linked compressor: peak level in dB, a hard knee, and attack/release
/// smoothing on the gain reduction.
#[derive(Debug, Clone, Copy)]
pub struct Compressor {
    threshold_db: f64,
    /// The threshold as a sample's magnitude: at or under it, a sample asks for no reduction
    /// (its level in dB is worked out all the same, so that the loop has no branch).
    threshold_gain: f64,
    slope: f64,
    follower: Follower,
}

/// The compressor's recursion: the gain reduction following the static curve, and the gain it
/// gives. Small and `Copy`, so that a block's loop holds it in registers.
#[derive(Debug, Clone, Copy)]
struct Follower {
    makeup_db: f64,
    attack: f64,
    release: f64,
    reduction_db: f64,
    /// `10^((makeup_db - reduction_db) / 20)`, carried from sample to sample (see
    /// [`Follower::carry`]).
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

/// `e^step` by its series to the fourth power, in Horner's order (see [`Follower::carry`]).
#[inline(always)]
fn exp_series(step: f64) -> f64 {
    EXP_SERIES[1..].iter().fold(EXP_SERIES[0], |sum, &term| sum.mul_add(step, term))
}

/// The coefficients of [`exp_series`], the highest power's first: `1/4!` down to `1/0!`.
const EXP_SERIES: [f64; 5] = [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

impl Compressor {
    /// The compressor that never acts: no frame is over its threshold, and its gain is exactly
    /// one (`10^0`, carried by `1 + 0`). It stands in a lane whose strip has no compressor.
    const BYPASS: Compressor = Compressor {
        threshold_db: 0.0,
        threshold_gain: f64::INFINITY,
        slope: 0.0,
        follower: Follower { makeup_db: 0.0, attack: 0.0, release: 0.0, reduction_db: 0.0, gain: 1.0, carried: 0 },
    };

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
        }
    }

    /// The gain reduction a steady level settles at: the static curve.
    pub fn static_reduction_db(&self, level_db: f64) -> f64 {
        (level_db - self.threshold_db).max(0.0) * self.slope
    }

    /// The reduction the static curve asks for at a frame whose louder channel is `peak`: worked
    /// out for every frame, so that there is no branch; a frame at or under the threshold
    /// (silence included, where the level is meaningless) asks for none.
    #[inline(always)]
    fn target_db(&self, peak: f32) -> f64 {
        let reduction = self.static_reduction_db(level_db(peak));
        if f64::from(peak) > self.threshold_gain {
            reduction
        } else {
            0.0
        }
    }
}

impl Compressor {
    /// The static curve's reduction for each frame, in a loop of its own that runs in vector
    /// lanes (see [`level_db`]) where the processor has them.
    #[inline(always)]
    fn fill_targets(&self, targets: &mut [f64], left: &[f32], right: &[f32]) {
        for ((target, l), r) in targets.iter_mut().zip(left).zip(right) {
            *target = self.target_db(l.abs().max(r.abs()));
        }
    }
}

impl Follower {
    /// Moves the reduction one frame towards the static curve's `target`; returns the step of
    /// the gain's exponent that makes (see [`Self::carry`]).
    #[inline(always)]
    fn advance(&mut self, target: f64) -> f64 {
        let coefficient = if target > self.reduction_db { self.attack } else { self.release };
        let previous = self.reduction_db;
        self.reduction_db = coefficient.mul_add(previous - target, target);
        (previous - self.reduction_db) * DB_TO_EXPONENT
    }

    /// Whether the gain can be carried across `step` (see [`Self::carry`]).
    #[inline(always)]
    fn can_carry(&self, step: f64) -> bool {
        (self.carried < CARRIED_SAMPLES) & (step.abs() <= CARRIED_STEP)
    }

    /// The gain follows the reduction sample by sample, which moves it by a small step: so the
    /// gain is carried, times `e^step` by its series to the fourth power (an error under 1e-12 a
    /// sample for steps under [`CARRIED_STEP`]), and computed outright ([`Self::recompute`])
    /// every [`CARRIED_SAMPLES`] samples and on any larger step. An `exp` a sample was half of a
    /// typical mix's time; this matches it to within f64 rounding.
    #[inline(always)]
    fn carry(&mut self, step: f64) {
        self.gain *= exp_series(step);
        self.carried += 1;
    }

    fn recompute(&mut self) {
        self.gain = ((self.makeup_db - self.reduction_db) * DB_TO_EXPONENT).exp();
        self.carried = 0;
    }

    /// One frame: the reduction's step towards `target`, and the gain it gives.
    #[inline(always)]
    fn next_gain(&mut self, target: f64) -> f32 {
        let step = self.advance(target);
        self.take(step);
        self.gain as f32
    }

    /// The gain after `step`: carried where it can be, computed outright where not.
    #[inline(always)]
    fn take(&mut self, step: f64) {
        if self.can_carry(step) {
            self.carry(step);
        } else {
            self.recompute();
        }
    }
}

/// Strips processed side by side, at most: one vector instruction takes a biquad's step for all
/// their channels (two under AVX2), and the static curve's and the follower's for all of them.
pub const STRIP_LANES: usize = 4;
/// Channels of [`STRIP_LANES`] strips.
const CHANNEL_LANES: usize = 2 * STRIP_LANES;
/// Frames the strips' stages take at a time: a block on the stack, in the L1 cache.
const STRIP_BLOCK: usize = 256;

/// One frame of [`STRIP_LANES`] strips' audio, each strip's left and right side by side (silence
/// in the lanes of strips not there).
type Frame = [f32; CHANNEL_LANES];

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
        Self::process_lanes([self], [1.0], [[1.0; 2]], [[left, right]]);
    }

    /// `N` strips (at most [`STRIP_LANES`]) over the same frames, each channel times its strip's
    /// `gains` on the way in and times its `outputs` gain on the way out (a multiplication by
    /// one changes nothing).
    ///
    /// Every filter and the compressor's recursion wait on their previous sample, so the strips
    /// run side by side: a block of frames is gathered with every strip's channels next to each
    /// other, and each stage takes the block a frame at a time, with the same operation for
    /// every lane in one vector instruction. A strip with fewer bands runs [`PASS_THROUGH`] in
    /// the others' place, one without a compressor [`Compressor::BYPASS`]. Each channel's
    /// arithmetic is exactly what it is alone, in the order it is alone: the lanes only share
    /// instructions.
    pub fn process_lanes<const N: usize>(strips: [&mut ChannelStrip; N], gains: [f32; N], outputs: [[f32; 2]; N], audio: [Channels; N]) {
        const { assert!(N <= STRIP_LANES) };
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the processor supports AVX2 and FMA, as just checked.
            return unsafe { Self::process_lanes_avx2(strips, gains, outputs, audio) };
        }
        Self::process_lanes_with::<Portable, N>(strips, gains, outputs, audio)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn process_lanes_avx2<const N: usize>(strips: [&mut ChannelStrip; N], gains: [f32; N], outputs: [[f32; 2]; N], audio: [Channels; N]) {
        Self::process_lanes_with::<avx2::Avx2, N>(strips, gains, outputs, audio)
    }

    #[inline(always)]
    fn process_lanes_with<K: Lanes, const N: usize>(mut strips: [&mut ChannelStrip; N], gains: [f32; N], outputs: [[f32; 2]; N], audio: [Channels; N]) {
        let (frames, mut audio) = same_frames(audio);
        if let ([strip], [gain], [output], [[left, right]]) = (&mut strips[..], &gains[..], &outputs[..], &mut audio[..]) {
            return strip.process_alone(*gain, *output, left, right);
        }
        Self::run::<K>(&mut strips, &gains, &outputs, &mut audio, frames)
    }

    /// A strip alone, channel by channel: its lanes would be a quarter full. Its arithmetic is
    /// [`Portable`]'s; only the static curve runs differently, over four frames at a time.
    #[inline(always)]
    fn process_alone(&mut self, gain: f32, output: [f32; 2], left: &mut [f32], right: &mut [f32]) {
        left.iter_mut().chain(right.iter_mut()).for_each(|x| *x *= gain);
        for band in &mut self.equalizer.bands {
            let c = band.c;
            let [mut left_state, mut right_state] = band.state;
            // Both channels in one loop: each waits on its own previous sample, side by side.
            for (l, r) in left.iter_mut().zip(right.iter_mut()) {
                *l = c.tick(*l, &mut left_state);
                *r = c.tick(*r, &mut right_state);
            }
            band.state = [left_state, right_state];
        }
        if let Some(compressor) = &mut self.compressor {
            let mut targets = [0.0; STRIP_BLOCK];
            // A copy, held in registers: through the strip, each frame's step stored it and the
            // next loaded it back, in the recursion's path.
            let mut follower = compressor.follower;
            for (left, right) in left.chunks_mut(STRIP_BLOCK).zip(right.chunks_mut(STRIP_BLOCK)) {
                let targets = &mut targets[..left.len()];
                compressor.fill_targets(targets, left, right);
                for ((l, r), &target) in left.iter_mut().zip(right.iter_mut()).zip(targets.iter()) {
                    let gain = follower.next_gain(target);
                    *l *= gain;
                    *r *= gain;
                }
            }
            compressor.follower = follower;
        }
        left.iter_mut().for_each(|x| *x *= output[0]);
        right.iter_mut().for_each(|x| *x *= output[1]);
    }

    #[inline(always)]
    fn run<K: Lanes>(strips: &mut [&mut ChannelStrip], gains: &[f32], outputs: &[[f32; 2]], audio: &mut [Channels], frames: usize) {
        let bands = strips.iter().map(|strip| strip.equalizer.bands.len()).max().unwrap_or(0);
        let wide = strips.len() > STRIP_LANES / 2;
        let mut compressors = [Compressor::BYPASS; STRIP_LANES];
        for (compressor, strip) in compressors.iter_mut().zip(strips.iter()) {
            *compressor = strip.compressor.unwrap_or(Compressor::BYPASS);
        }
        let mut followers = compressors.map(|compressor| compressor.follower);
        let compressed = strips.iter().any(|strip| strip.compressor.is_some());
        let mut block = [[0f32; CHANNEL_LANES]; STRIP_BLOCK];
        for start in (0..frames).step_by(STRIP_BLOCK) {
            let block = &mut block[..(frames - start).min(STRIP_BLOCK)];
            K::gather(block, audio, gains, start);
            for band in 0..bands {
                let mut c = [PASS_THROUGH; STRIP_LANES];
                let (mut s1, mut s2) = ([0.0; CHANNEL_LANES], [0.0; CHANNEL_LANES]);
                for (lane, strip) in strips.iter().enumerate() {
                    if let Some(band) = strip.equalizer.bands.get(band) {
                        c[lane] = band.c;
                        [[s1[2 * lane], s2[2 * lane]], [s1[2 * lane + 1], s2[2 * lane + 1]]] = band.state;
                    }
                }
                K::filter(block, &c, &mut s1, &mut s2, wide);
                for (lane, strip) in strips.iter_mut().enumerate() {
                    if let Some(band) = strip.equalizer.bands.get_mut(band) {
                        band.state = [[s1[2 * lane], s2[2 * lane]], [s1[2 * lane + 1], s2[2 * lane + 1]]];
                    }
                }
            }
            if compressed {
                K::compress(block, &compressors, &mut followers);
            }
            K::scatter(block, audio, outputs, start);
        }
        for (strip, follower) in strips.iter_mut().zip(followers) {
            if let Some(compressor) = &mut strip.compressor {
                compressor.follower = follower;
            }
        }
    }
}

/// Frames `start..start + block.len()` of each strip's channels into their lanes of `block`, each
/// sample times its strip's gain in.
#[inline(always)]
fn gather_frames(block: &mut [Frame], audio: &[Channels], gains: &[f32], start: usize) {
    for (lane, (channels, &gain)) in audio.iter().zip(gains).enumerate() {
        for (channel, samples) in channels.iter().enumerate() {
            for (frame, x) in block.iter_mut().zip(&samples[start..]) {
                frame[2 * lane + channel] = x * gain;
            }
        }
    }
}

/// [`gather_frames`] the other way: each lane of `block` back into its channel from `start`, times
/// the channel's output gain.
#[inline(always)]
fn scatter_frames(block: &[Frame], audio: &mut [Channels], outputs: &[[f32; 2]], start: usize) {
    for (lane, (channels, gains)) in audio.iter_mut().zip(outputs).enumerate() {
        for (channel, samples) in channels.iter_mut().enumerate() {
            for (x, frame) in samples[start..].iter_mut().zip(block.iter()) {
                *x = frame[2 * lane + channel] * gains[channel];
            }
        }
    }
}

/// The stages of [`ChannelStrip::process_lanes`] over a block, every lane the arithmetic of its
/// strip alone.
trait Lanes {
    /// See [`gather_frames`].
    fn gather(block: &mut [Frame], audio: &[Channels], gains: &[f32], start: usize) {
        gather_frames(block, audio, gains, start)
    }

    /// See [`scatter_frames`].
    fn scatter(block: &[Frame], audio: &mut [Channels], outputs: &[[f32; 2]], start: usize) {
        scatter_frames(block, audio, outputs, start)
    }

    /// One band of each strip (coefficients `c`, state `s1`, `s2` per channel), transposed direct
    /// form II in f64; only the first half of the lanes where not `wide`.
    fn filter(block: &mut [Frame], c: &[BiquadCoefficients; STRIP_LANES], s1: &mut [f64; CHANNEL_LANES], s2: &mut [f64; CHANNEL_LANES], wide: bool);

    /// Each strip's compressor: the static curve at the louder channel, the follower's step, and
    /// the gain on both channels.
    fn compress(block: &mut [Frame], compressors: &[Compressor; STRIP_LANES], followers: &mut [Follower; STRIP_LANES]);
}

/// Lane by lane: the definition, and the kernel where there is no vector one.
struct Portable;

impl Lanes for Portable {
    fn filter(block: &mut [Frame], c: &[BiquadCoefficients; STRIP_LANES], s1: &mut [f64; CHANNEL_LANES], s2: &mut [f64; CHANNEL_LANES], wide: bool) {
        let lanes = if wide { CHANNEL_LANES } else { CHANNEL_LANES / 2 };
        for frame in block.iter_mut() {
            for lane in 0..lanes {
                let mut state = [s1[lane], s2[lane]];
                frame[lane] = c[lane / 2].tick(frame[lane], &mut state);
                [s1[lane], s2[lane]] = state;
            }
        }
    }

    fn compress(block: &mut [Frame], compressors: &[Compressor; STRIP_LANES], followers: &mut [Follower; STRIP_LANES]) {
        for frame in block.iter_mut() {
            for (lane, (compressor, follower)) in compressors.iter().zip(followers.iter_mut()).enumerate() {
                let gain = follower.next_gain(compressor.target_db(frame[2 * lane].abs().max(frame[2 * lane + 1].abs())));
                frame[2 * lane] *= gain;
                frame[2 * lane + 1] *= gain;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! [`Lanes`] in AVX2: the same operations in the same order as [`super::Portable`], four f64 lanes
    //! to an instruction (IEEE arithmetic is exact per lane, fused where `mul_add` is).

    use std::arch::x86_64::*;

    use super::{
        gather_frames, scatter_frames, BiquadCoefficients, Channels, Compressor, Follower, Frame, Lanes, CARRIED_SAMPLES, CARRIED_STEP, CHANNEL_LANES, DB_PER_NEPER,
        DB_PER_OCTAVE, DB_TO_EXPONENT, EXP_SERIES, STRIP_BLOCK, STRIP_LANES,
    };

    pub struct Avx2;

    impl Lanes for Avx2 {
        /// Four strips' eight channels are eight frames of eight channels at a time, turned into
        /// eight frames by a transpose in registers, where lane by lane each sample was a load
        /// and a store of its own; fewer strips, or the frames left over, go lane by lane.
        #[inline(always)]
        fn gather(block: &mut [Frame], audio: &[Channels], gains: &[f32], start: usize) {
            if audio.len() != STRIP_LANES {
                return gather_frames(block, audio, gains, start);
            }
            let whole = block.len() / CHANNEL_LANES * CHANNEL_LANES;
            let channels: [&[f32]; CHANNEL_LANES] = std::array::from_fn(|c| &audio[c / 2][c % 2][start..start + block.len()]);
            // SAFETY: `Avx2` is only used from code compiled for AVX2 on a processor that has it,
            // and every load reads eight samples within the first `whole` of a channel.
            unsafe {
                let scales: [__m256; CHANNEL_LANES] = std::array::from_fn(|c| _mm256_set1_ps(gains[c / 2]));
                for (at, frames) in block[..whole].chunks_exact_mut(CHANNEL_LANES).enumerate() {
                    let rows = std::array::from_fn(|c| _mm256_mul_ps(_mm256_loadu_ps(channels[c][CHANNEL_LANES * at..].as_ptr()), scales[c]));
                    for (frame, row) in frames.iter_mut().zip(transpose(rows)) {
                        _mm256_storeu_ps(frame.as_mut_ptr(), row);
                    }
                }
            }
            gather_frames(&mut block[whole..], audio, gains, start + whole);
        }

        #[inline(always)]
        fn scatter(block: &[Frame], audio: &mut [Channels], outputs: &[[f32; 2]], start: usize) {
            if audio.len() != STRIP_LANES {
                return scatter_frames(block, audio, outputs, start);
            }
            let whole = block.len() / CHANNEL_LANES * CHANNEL_LANES;
            // SAFETY: as in `gather`; the stores go through bounds-checked slices of eight.
            unsafe {
                let scales: [__m256; CHANNEL_LANES] = std::array::from_fn(|c| _mm256_set1_ps(outputs[c / 2][c % 2]));
                for (at, frames) in block[..whole].chunks_exact(CHANNEL_LANES).enumerate() {
                    let rows = transpose(std::array::from_fn(|f| _mm256_loadu_ps(frames[f].as_ptr())));
                    for (c, row) in rows.into_iter().enumerate() {
                        let samples = &mut audio[c / 2][c % 2][start + CHANNEL_LANES * at..][..CHANNEL_LANES];
                        _mm256_storeu_ps(samples.as_mut_ptr(), _mm256_mul_ps(row, scales[c]));
                    }
                }
            }
            scatter_frames(&block[whole..], audio, outputs, start + whole);
        }

        #[inline(always)]
        fn filter(block: &mut [Frame], c: &[BiquadCoefficients; STRIP_LANES], s1: &mut [f64; CHANNEL_LANES], s2: &mut [f64; CHANNEL_LANES], wide: bool) {
            // SAFETY: `Avx2` is only used from code compiled for AVX2 on a processor that has it.
            unsafe { filter(block, c, s1, s2, wide) }
        }

        #[inline(always)]
        fn compress(block: &mut [Frame], compressors: &[Compressor; STRIP_LANES], followers: &mut [Follower; STRIP_LANES]) {
            // SAFETY: as above.
            unsafe { compress(block, compressors, followers) }
        }
    }

    /// Eight rows of eight into eight columns: `transpose(rows)[i][j] == rows[j][i]`.
    #[inline(always)]
    unsafe fn transpose(rows: [__m256; 8]) -> [__m256; 8] {
        let [r0, r1, r2, r3, r4, r5, r6, r7] = rows;
        let (t0, t1, t2, t3) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1), _mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5, t6, t7) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5), _mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let (u0, u1, u2, u3) =
            (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xee>(t0, t2), _mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xee>(t1, t3));
        let (u4, u5, u6, u7) =
            (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xee>(t4, t6), _mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xee>(t5, t7));
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// A coefficient of strips `first` and `first + 1`, once per channel.
    #[inline(always)]
    unsafe fn per_channel(c: &[BiquadCoefficients; STRIP_LANES], first: usize, field: fn(&BiquadCoefficients) -> f64) -> __m256d {
        _mm256_setr_pd(field(&c[first]), field(&c[first]), field(&c[first + 1]), field(&c[first + 1]))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn filter(block: &mut [Frame], c: &[BiquadCoefficients; STRIP_LANES], s1: &mut [f64; CHANNEL_LANES], s2: &mut [f64; CHANNEL_LANES], wide: bool) {
        if wide {
            filter_halves::<2>(block, c, s1, s2)
        } else {
            filter_halves::<1>(block, c, s1, s2)
        }
    }

    /// The first `HALVES` halves of the lanes (two strips each), in one loop: each half's
    /// recursion waits on its previous frame, so the two run side by side.
    #[inline(always)]
    unsafe fn filter_halves<const HALVES: usize>(
        block: &mut [Frame],
        c: &[BiquadCoefficients; STRIP_LANES],
        s1: &mut [f64; CHANNEL_LANES],
        s2: &mut [f64; CHANNEL_LANES],
    ) {
        let coefficient = |field: fn(&BiquadCoefficients) -> f64| -> [__m256d; HALVES] { std::array::from_fn(|half| per_channel(c, 2 * half, field)) };
        let (b0, b1, b2, a1, a2) = (coefficient(|c| c.b0), coefficient(|c| c.b1), coefficient(|c| c.b2), coefficient(|c| c.a1), coefficient(|c| c.a2));
        let mut z1: [__m256d; HALVES] = std::array::from_fn(|half| _mm256_loadu_pd(s1[4 * half..].as_ptr()));
        let mut z2: [__m256d; HALVES] = std::array::from_fn(|half| _mm256_loadu_pd(s2[4 * half..].as_ptr()));
        for frame in block.iter_mut() {
            for half in 0..HALVES {
                let samples = frame[4 * half..].as_mut_ptr();
                let x = _mm256_cvtps_pd(_mm_loadu_ps(samples));
                let y = _mm256_fmadd_pd(b0[half], x, z1[half]);
                z1[half] = _mm256_fnmadd_pd(a1[half], y, _mm256_fmadd_pd(b1[half], x, z2[half]));
                z2[half] = _mm256_fnmadd_pd(a2[half], y, _mm256_mul_pd(b2[half], x));
                _mm_storeu_ps(samples, _mm256_cvtpd_ps(y));
            }
        }
        for half in 0..HALVES {
            _mm256_storeu_pd(s1[4 * half..].as_mut_ptr(), z1[half]);
            _mm256_storeu_pd(s2[4 * half..].as_mut_ptr(), z2[half]);
        }
    }

    /// Four lanes of a compressor's field.
    #[inline(always)]
    unsafe fn lanes<T>(items: &[T; STRIP_LANES], field: impl Fn(&T) -> f64) -> __m256d {
        _mm256_setr_pd(field(&items[0]), field(&items[1]), field(&items[2]), field(&items[3]))
    }

    /// [`super::level_db`] in four lanes.
    #[inline(always)]
    unsafe fn level_db(level: __m128) -> __m256d {
        let bits = _mm_castps_si128(level);
        let mantissa = _mm256_cvtps_pd(_mm_castsi128_ps(_mm_or_si128(_mm_and_si128(bits, _mm_set1_epi32(0x007f_ffff)), _mm_set1_epi32(0x3f80_0000))));
        let high = _mm256_cmp_pd::<_CMP_GT_OQ>(mantissa, _mm256_set1_pd(std::f64::consts::SQRT_2));
        let exponent = _mm_sub_epi32(_mm_and_si128(_mm_srli_epi32::<23>(bits), _mm_set1_epi32(0xff)), _mm_set1_epi32(127));
        // The integer octave plus one where the mantissa is halved: exact in f64 either way.
        let octaves = _mm256_add_pd(_mm256_cvtepi32_pd(exponent), _mm256_and_pd(high, _mm256_set1_pd(1.0)));
        let mantissa = _mm256_blendv_pd(mantissa, _mm256_mul_pd(mantissa, _mm256_set1_pd(0.5)), high);
        let one = _mm256_set1_pd(1.0);
        let s = _mm256_div_pd(_mm256_sub_pd(mantissa, one), _mm256_add_pd(mantissa, one));
        let s2 = _mm256_mul_pd(s, s);
        let mut series = _mm256_setzero_pd();
        for term in [1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
            series = _mm256_fmadd_pd(series, s2, _mm256_set1_pd(term));
        }
        let neper = _mm256_mul_pd(_mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(2.0), s), series), _mm256_set1_pd(DB_PER_NEPER));
        _mm256_fmadd_pd(octaves, _mm256_set1_pd(DB_PER_OCTAVE), neper)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn compress(block: &mut [Frame], compressors: &[Compressor; STRIP_LANES], followers: &mut [Follower; STRIP_LANES]) {
        let threshold_db = lanes(compressors, |c| c.threshold_db);
        let threshold_gain = lanes(compressors, |c| c.threshold_gain);
        let slope = lanes(compressors, |c| c.slope);
        let (attack, release) = (lanes(followers, |f| f.attack), lanes(followers, |f| f.release));
        let (mut reduction, mut gain) = (lanes(followers, |f| f.reduction_db), lanes(followers, |f| f.gain));
        let mut carried = lanes(followers, |f| f64::from(f.carried));
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // Each strip's left and right apart, and each strip's gain back to both its channels.
        let (apart, together) = (_mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
        let (zero, one) = (_mm256_setzero_pd(), _mm256_set1_pd(1.0));
        // The static curve first, in a loop of its own: no frame's waits on another's, so the
        // processor overlaps many frames' long chains (a division and a series), which the
        // follower's recursion would otherwise wait on frame after frame.
        // Not cleared first (8 KB a block, every block): each frame's is written before it is read.
        let mut targets = [std::mem::MaybeUninit::<__m256d>::uninit(); STRIP_BLOCK];
        for (target, frame) in targets.iter_mut().zip(block.iter()) {
            let sides = _mm256_permutevar8x32_ps(_mm256_and_ps(_mm256_loadu_ps(frame.as_ptr()), magnitude), apart);
            let peak = _mm_max_ps(_mm256_castps256_ps128(sides), _mm256_extractf128_ps::<1>(sides));
            let reduction_db = _mm256_mul_pd(_mm256_max_pd(_mm256_sub_pd(level_db(peak), threshold_db), zero), slope);
            target.write(_mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(_mm256_cvtps_pd(peak), threshold_gain), reduction_db));
        }
        for (frame, target) in block.iter_mut().zip(&targets) {
            // SAFETY: the loop above wrote the target of every frame of the block (both zips
            // stop at its end, and it is at most STRIP_BLOCK frames).
            let target = target.assume_init();
            let samples = _mm256_loadu_ps(frame.as_ptr());
            let coefficient = _mm256_blendv_pd(release, attack, _mm256_cmp_pd::<_CMP_GT_OQ>(target, reduction));
            let previous = reduction;
            reduction = _mm256_fmadd_pd(coefficient, _mm256_sub_pd(previous, target), target);
            let step = _mm256_mul_pd(_mm256_sub_pd(previous, reduction), _mm256_set1_pd(DB_TO_EXPONENT));
            let small = _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_and_pd(step, _mm256_castsi256_pd(_mm256_set1_epi64x(i64::MAX))), _mm256_set1_pd(CARRIED_STEP));
            let carries = _mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(carried, _mm256_set1_pd(f64::from(CARRIED_SAMPLES))), small);
            if _mm256_movemask_pd(carries) == 0b1111 {
                let series = EXP_SERIES[1..].iter().fold(_mm256_set1_pd(EXP_SERIES[0]), |sum, &term| _mm256_fmadd_pd(sum, step, _mm256_set1_pd(term)));
                gain = _mm256_mul_pd(gain, series);
                carried = _mm256_add_pd(carried, one);
            } else {
                // A lane's gain computed outright (every CARRIED_SAMPLES frames, or a large step):
                // the followers' own code, lane by lane.
                let mut lanes = [[0.0; 4]; 4];
                for (lane, vector) in lanes.iter_mut().zip([reduction, gain, carried, step]) {
                    _mm256_storeu_pd(lane.as_mut_ptr(), vector);
                }
                let [reductions, gains, carrieds, steps] = &mut lanes;
                for lane in 0..STRIP_LANES {
                    let mut follower = Follower { reduction_db: reductions[lane], gain: gains[lane], carried: carrieds[lane] as u32, ..followers[lane] };
                    follower.take(steps[lane]);
                    (gains[lane], carrieds[lane]) = (follower.gain, f64::from(follower.carried));
                }
                gain = _mm256_loadu_pd(gains.as_ptr());
                carried = _mm256_loadu_pd(carrieds.as_ptr());
            }
            let gains = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(gain)), together);
            _mm256_storeu_ps(frame.as_mut_ptr(), _mm256_mul_ps(samples, gains));
        }
        let mut lanes = [[0.0; 4]; 3];
        for (lane, vector) in lanes.iter_mut().zip([reduction, gain, carried]) {
            _mm256_storeu_pd(lane.as_mut_ptr(), vector);
        }
        for (lane, follower) in followers.iter_mut().enumerate() {
            (follower.reduction_db, follower.gain, follower.carried) = (lanes[0][lane], lanes[1][lane], lanes[2][lane] as u32);
        }
    }
}

/// Everything one track does to its audio, in order: gain, EQ, compressor, pan.
pub struct TrackChain {
    gain: f32,
    strip: ChannelStrip,
    pan: [f32; 2],
}

impl TrackChain {
    pub fn new(track: &TrackSettings, sample_rate: u32) -> Self {
        let (left, right) = pan_gains(track.pan);
        Self { gain: db_to_gain(track.gain_db) as f32, strip: ChannelStrip::new(&track.eq, track.compressor.as_ref(), sample_rate), pan: [left as f32, right as f32] }
    }

    /// `N` tracks over the same frames, their strips in lanes side by side (see
    /// [`ChannelStrip::process_lanes`]).
    pub fn process_lanes<const N: usize>(chains: [&mut TrackChain; N], audio: [Channels; N]) {
        let (gains, pans) = (chains.each_ref().map(|chain| chain.gain), chains.each_ref().map(|chain| chain.pan));
        ChannelStrip::process_lanes(chains.map(|chain| &mut chain.strip), gains, pans, audio);
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
            ChannelStrip::new(&[band], None, RATE).process(&mut signal, &mut other);
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
            let (mut left, mut right) = (signal.clone(), signal.clone());
            ChannelStrip::new(&[], Some(&settings), RATE).process(&mut left, &mut right);
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

    /// A strip's settings, its gain in and its output gains.
    type StripSettings = (Vec<EqBand>, Option<CompressorSettings>, f32, [f32; 2]);

    /// Four strips as different as they come: band counts 2, 1, 0 and 3, compressors differing
    /// and one missing, gains and output gains of every kind.
    fn four_strips() -> Vec<StripSettings> {
        let compressor = |threshold_db, attack_ms| Some(CompressorSettings { threshold_db, ratio: 5.0, attack_ms, release_ms: 100.0, makeup_db: 2.0 });
        vec![
            (vec![band(EqType::Peak, 1000.0, 1.0, 6.0), band(EqType::Lowshelf, 100.0, 0.7, -4.0)], compressor(-15.0, 3.0), 1.4, [0.7, 0.7]),
            (vec![band(EqType::Highpass, 200.0, 0.7, 0.0)], None, 0.5, [1.0, 0.0]),
            (vec![], compressor(-30.0, 0.0), 1.0, [0.2, 0.97]),
            (
                vec![band(EqType::Highshelf, 5000.0, 0.7, 3.0), band(EqType::Lowpass, 9000.0, 0.7, 0.0), band(EqType::Peak, 300.0, 2.0, -5.0)],
                compressor(-10.0, 20.0),
                2.0,
                [1.0, 1.0],
            ),
        ]
    }

    /// Runs the first `N` of [`four_strips`] over noise in lanes with `run`, in chunks (so that the
    /// state carried between them is checked too); returns each channel's bits.
    fn in_lanes<const N: usize>(run: impl Fn(&mut [&mut ChannelStrip], &[f32], &[[f32; 2]], &mut [Channels], usize)) -> Vec<Vec<u32>> {
        let settings = four_strips();
        let mut strips: Vec<ChannelStrip> = settings[..N].iter().map(|(bands, compressor, _, _)| ChannelStrip::new(bands, compressor.as_ref(), RATE)).collect();
        let gains: Vec<f32> = settings[..N].iter().map(|s| s.2).collect();
        let outputs: Vec<[f32; 2]> = settings[..N].iter().map(|s| s.3).collect();
        let mut audio: Vec<Vec<f32>> = (0..2 * N as u64).map(|seed| crate::audio::buffer::test_noise(10_000, seed + 1)).collect();
        for range in [0..3000, 3000..3001, 3001..3257, 3257..10_000] {
            let mut strips: Vec<&mut ChannelStrip> = strips.iter_mut().collect();
            let mut channels: Vec<Channels> = audio
                .chunks_mut(2)
                .map(|pair| {
                    let [left, right] = pair else { unreachable!("pairs") };
                    [&mut left[range.clone()], &mut right[range.clone()]]
                })
                .collect();
            run(&mut strips, &gains, &outputs, &mut channels, range.len());
        }
        audio.iter().map(|channel| channel.iter().map(|x| x.to_bits()).collect()).collect()
    }

    /// Where two runs' channels first differ, if they do.
    fn first_difference(got: &[Vec<u32>], want: &[Vec<u32>]) -> Option<(usize, usize)> {
        got.iter().zip(want).enumerate().find_map(|(channel, (got, want))| got.iter().zip(want).position(|(a, b)| a != b).map(|frame| (channel, frame)))
    }

    fn alone(strips: &mut [&mut ChannelStrip], gains: &[f32], outputs: &[[f32; 2]], audio: &mut [Channels], _: usize) {
        for (((strip, &gain), &output), [left, right]) in strips.iter_mut().zip(gains).zip(outputs).zip(audio.iter_mut()) {
            ChannelStrip::process_lanes([&mut **strip], [gain], [output], [[&mut **left, &mut **right]]);
        }
    }

    #[test]
    fn strips_in_lanes_compute_what_each_computes_alone() {
        fn lanes<const N: usize>() -> Vec<Vec<u32>> {
            in_lanes::<N>(|strips, gains, outputs, audio, _| {
                let strips: [&mut ChannelStrip; N] =
                    strips.iter_mut().map(|strip| &mut **strip).collect::<Vec<_>>().try_into().unwrap_or_else(|_| unreachable!("N strips"));
                let channels: [Channels; N] =
                    audio.iter_mut().map(|[left, right]| [&mut **left, &mut **right]).collect::<Vec<_>>().try_into().unwrap_or_else(|_| unreachable!("N strips"));
                ChannelStrip::process_lanes(strips, gains.try_into().expect("N gains"), outputs.try_into().expect("N outputs"), channels);
            })
        }
        assert_eq!(first_difference(&lanes::<2>(), &in_lanes::<2>(alone)), None);
        assert_eq!(first_difference(&lanes::<3>(), &in_lanes::<3>(alone)), None);
        let four = lanes::<4>();
        assert_eq!(first_difference(&four, &in_lanes::<4>(alone)), None);
        // Alone, a strip runs channel by channel: the lanes are checked against another path.
        let noise: Vec<u32> = crate::audio::buffer::test_noise(10_000, 1).iter().map(|x| x.to_bits()).collect();
        assert_ne!(four[0], noise, "the strips changed the audio");
    }

    #[test]
    fn the_vector_lanes_compute_what_the_portable_lanes_compute() {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(crate::audio::has_avx2_fma(), "this test runs where the vector lanes do");
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run_avx2(strips: &mut [&mut ChannelStrip], gains: &[f32], outputs: &[[f32; 2]], audio: &mut [Channels], frames: usize) {
                ChannelStrip::run::<avx2::Avx2>(strips, gains, outputs, audio, frames)
            }
            // Portable's `mul_add`, compiled here without FMA, is the library's: the same bits.
            let portable = in_lanes::<4>(ChannelStrip::run::<Portable>);
            // SAFETY: the processor supports AVX2 and FMA, as just asserted.
            let vector = in_lanes::<4>(|strips, gains, outputs, audio, frames| unsafe { run_avx2(strips, gains, outputs, audio, frames) });
            assert_eq!(first_difference(&vector, &portable), None);
            let narrow = in_lanes::<2>(|strips, gains, outputs, audio, frames| unsafe { run_avx2(strips, gains, outputs, audio, frames) });
            let portable = in_lanes::<2>(ChannelStrip::run::<Portable>);
            assert_eq!(first_difference(&narrow, &portable), None);
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

    /// The static curve as a strip alone computes it where the processor has AVX2 and FMA: in
    /// vector lanes, with fused instructions.
    fn vector_targets(compressor: &Compressor, targets: &mut [f64], left: &[f32], right: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fill_targets_avx2(compressor: &Compressor, targets: &mut [f64], left: &[f32], right: &[f32]) {
                compressor.fill_targets(targets, left, right)
            }
            assert!(crate::audio::has_avx2_fma(), "this test runs where the vector lanes do");
            // SAFETY: the processor supports AVX2 and FMA, as just asserted.
            unsafe { fill_targets_avx2(compressor, targets, left, right) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        compressor.fill_targets(targets, left, right)
    }

    #[test]
    fn the_static_curve_reads_the_same_in_lanes_of_any_width() {
        let settings = CompressorSettings { threshold_db: -24.0, ratio: 3.0, attack_ms: 1.0, release_ms: 50.0, makeup_db: 0.0 };
        let compressor = Compressor::new(&settings, RATE);
        // Noise from silence to full scale, a few frames at a time and many at once.
        let left: Vec<f32> = crate::audio::buffer::test_noise(4099, 5).iter().enumerate().map(|(n, x)| x * (n as f32 / 4099.0).powi(3)).collect();
        let right = crate::audio::buffer::test_noise(4099, 6);
        for frames in [1, 3, 4099] {
            let mut portable = vec![0.0; frames];
            compressor.fill_targets(&mut portable, &left[..frames], &right[..frames]);
            let mut used = vec![0.0; frames];
            vector_targets(&compressor, &mut used, &left[..frames], &right[..frames]);
            assert_eq!(used.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), portable.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        let mut targets = vec![0.0; left.len()];
        vector_targets(&compressor, &mut targets, &left, &right);
        assert!(targets.contains(&0.0) && targets.iter().any(|&t| t > 5.0), "the noise spans the threshold");
    }

    #[test]
    fn compressor_settles_at_its_static_curve() {
        let settings = CompressorSettings { threshold_db: -20.0, ratio: 4.0, attack_ms: 5.0, release_ms: 50.0, makeup_db: 2.0 };
        // A square wave has a constant peak level, so the detector sees a steady -6 dBFS.
        let amplitude = db_to_gain(-6.0) as f32;
        let square: Vec<f32> = (0..RATE as usize).map(|n| if (n / 100) % 2 == 0 { amplitude } else { -amplitude }).collect();
        let mut chunk = StereoBuffer { left: square.clone(), right: square };
        ChannelStrip::new(&[], Some(&settings), RATE).process(&mut chunk.left, &mut chunk.right);
        let out_db = gain_to_db(f64::from(chunk.left.last().unwrap().abs()));
        // 14 dB over threshold at 4:1 leaves 3.5 dB over: -16.5 dBFS, plus 2 dB makeup.
        assert!((out_db - (-14.5)).abs() < 0.01, "settled at {out_db:.3} dBFS");
        // Below threshold it only applies makeup.
        let quiet = db_to_gain(-30.0) as f32;
        let mut chunk = StereoBuffer { left: vec![quiet; 4800], right: vec![quiet; 4800] };
        ChannelStrip::new(&[], Some(&settings), RATE).process(&mut chunk.left, &mut chunk.right);
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
