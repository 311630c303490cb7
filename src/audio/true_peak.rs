//! True peak (ITU-R BS.1770 annex 2) by 4x polyphase oversampling, and the look-ahead limiter
//! that keeps it under a ceiling.
//!
//! No crate does true-peak limiting: sample-peak limiters let inter-sample peaks through, which
//! then clip in every converter and lossy encoder downstream. The limiter here takes the gain it
//! needs from the oversampled peak of every frame, so it is written by hand and tested against
//! ffmpeg's true-peak meter in the integration tests.

use rayon::prelude::*;

use super::buffer::{StereoBuffer, BLOCK};

const HALF_TAPS: usize = 16;
const TAPS: usize = 2 * HALF_TAPS;
const OVERSAMPLING: usize = 4;
/// Frames interpolated at a time: the tile and its window stay in the L1 cache.
const TILE: usize = 1024;

/// Windowed-sinc interpolator for the three points between two samples.
struct Interpolator {
    phases: [[f32; TAPS]; OVERSAMPLING - 1],
}

impl Interpolator {
    fn new() -> Self {
        let beta = 8.0;
        let bessel_i0 = |x: f64| {
            let (mut sum, mut term, mut k) = (1.0, 1.0, 1.0);
            while term > 1e-12 * sum {
                term *= (x / (2.0 * k)).powi(2);
                sum += term;
                k += 1.0;
            }
            sum
        };
        let mut phases = [[0f32; TAPS]; OVERSAMPLING - 1];
        for (p, phase) in phases.iter_mut().enumerate() {
            let fraction = (p + 1) as f64 / OVERSAMPLING as f64;
            let mut taps = [0f64; TAPS];
            for (j, tap) in taps.iter_mut().enumerate() {
                // Tap j multiplies x[n + j - (HALF_TAPS - 1)]; the point sits at n + fraction.
                let t = fraction - (j as f64 - (HALF_TAPS as f64 - 1.0));
                let sinc = if t == 0.0 { 1.0 } else { (std::f64::consts::PI * t).sin() / (std::f64::consts::PI * t) };
                let u = t / HALF_TAPS as f64;
                let window = if u.abs() >= 1.0 { 0.0 } else { bessel_i0(beta * (1.0 - u * u).sqrt()) / bessel_i0(beta) };
                *tap = sinc * window;
            }
            let sum: f64 = taps.iter().sum();
            phase.iter_mut().zip(taps).for_each(|(out, tap)| *out = (tap / sum) as f32);
        }
        Self { phases }
    }

    /// For frames `start..start + peaks.len()` of `channel`, raises each `peaks[i]` to the largest
    /// magnitude of the sample and the interpolated points after it.
    ///
    /// Each phase is computed tap by tap over a tile of frames: the inner loop then runs along
    /// the frames and vectorises, and every point still sums its taps in the same order.
    fn raise_peaks(&self, channel: &[f32], start: usize, peaks: &mut [f32]) {
        debug_assert!(start + peaks.len() <= channel.len());
        // A zero-padded window, so the loops below need no bounds logic.
        let from = start as isize - (HALF_TAPS as isize - 1);
        let mut padded = vec![0f32; peaks.len() + TAPS];
        for (i, slot) in padded.iter_mut().enumerate() {
            let source = from + i as isize;
            if source >= 0 && (source as usize) < channel.len() {
                *slot = channel[source as usize];
            }
        }
        let mut interpolated = [0f32; TILE];
        for (tile, peaks) in peaks.chunks_mut(TILE).enumerate() {
            let padded = &padded[tile * TILE..];
            let frames = peaks.len();
            for (peak, x) in peaks.iter_mut().zip(&padded[HALF_TAPS - 1..]) {
                *peak = peak.max(x.abs());
            }
            for phase in &self.phases {
                let interpolated = &mut interpolated[..frames];
                interpolated.fill(0.0);
                for (tap, &coefficient) in phase.iter().enumerate() {
                    for (out, x) in interpolated.iter_mut().zip(&padded[tap..tap + frames]) {
                        *out += coefficient * x;
                    }
                }
                for (peak, value) in peaks.iter_mut().zip(interpolated.iter()) {
                    *peak = peak.max(value.abs());
                }
            }
        }
    }
}

/// Per frame, the true peak (over both channels) between it and the next frame.
pub fn frame_peaks(buffer: &StereoBuffer) -> Vec<f32> {
    let interpolator = Interpolator::new();
    let mut peaks = vec![0f32; buffer.len()];
    peaks.par_chunks_mut(BLOCK).enumerate().for_each(|(block, peaks)| block_peaks(&interpolator, buffer, block * BLOCK, peaks));
    peaks
}

fn block_peaks(interpolator: &Interpolator, buffer: &StereoBuffer, start: usize, peaks: &mut [f32]) {
    interpolator.raise_peaks(&buffer.left, start, peaks);
    interpolator.raise_peaks(&buffer.right, start, peaks);
}

/// The true peak of the whole buffer, linear. Block by block: the frame peaks of a whole mix
/// would be another buffer as long as the mix.
pub fn true_peak(buffer: &StereoBuffer) -> f32 {
    let interpolator = Interpolator::new();
    (0..buffer.len().div_ceil(BLOCK))
        .into_par_iter()
        .map(|block| {
            let start = block * BLOCK;
            let mut peaks = vec![0f32; BLOCK.min(buffer.len() - start)];
            block_peaks(&interpolator, buffer, start, &mut peaks);
            peaks.into_iter().fold(0.0, f32::max)
        })
        .reduce(|| 0.0, f32::max)
}

/// A look-ahead limiter's gain envelope for a signal with the given frame peaks, scaled by
/// `pre_gain`: every frame's gain brings its true peak to `ceiling` or below.
///
/// The required gain is min-filtered over the look-ahead window, eased back up by the release,
/// then averaged over the same window. The average of a window in which every value is at most
/// the gain a peak needs is itself at most that gain, so the envelope ramps down smoothly over
/// the look-ahead and still meets every peak.
pub struct Limiter {
    lookahead: usize,
    release: f32,
}

impl Limiter {
    pub fn new(sample_rate: u32) -> Self {
        let rate = f64::from(sample_rate);
        Self { lookahead: ((0.003 * rate) as usize).max(1), release: (1.0 - (-1.0 / (0.08 * rate)).exp()) as f32 }
    }

    pub fn envelope(&self, peaks: &[f32], pre_gain: f32, ceiling: f32) -> Vec<f32> {
        let window = self.lookahead;
        let total = peaks.len() + window - 1;
        let required = |k: usize| match peaks.get(k) {
            Some(&peak) if peak * pre_gain > ceiling => ceiling / (peak * pre_gain),
            _ => 1.0,
        };
        // Sliding minimum over the last `window` frames (monotonic deque of candidates).
        let mut candidates = std::collections::VecDeque::<(usize, f32)>::new();
        let mut released = Vec::with_capacity(total);
        let mut previous = 1.0f32;
        for k in 0..total {
            let value = required(k);
            while candidates.back().is_some_and(|&(_, v)| v >= value) {
                candidates.pop_back();
            }
            candidates.push_back((k, value));
            while candidates.front().is_some_and(|&(i, _)| i + window <= k) {
                candidates.pop_front();
            }
            let minimum = candidates.front().map_or(1.0, |&(_, v)| v);
            previous = if minimum < previous { minimum } else { previous + self.release * (minimum - previous) };
            released.push(previous);
        }
        let mut envelope = Vec::with_capacity(peaks.len());
        let mut sum = 0f64;
        for k in 0..total {
            sum += f64::from(released[k]);
            if k >= window {
                sum -= f64::from(released[k - window]);
            }
            if k + 1 >= window {
                envelope.push((sum / window as f64) as f32);
            }
        }
        envelope
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    #[test]
    fn frame_peaks_match_a_direct_sum_of_the_taps() {
        // Several tiles, a block boundary, and a last tile cut short.
        let frames = BLOCK + 3 * TILE + 321;
        let buffer = StereoBuffer { left: test_noise(frames, 0x9e37_79b9), right: test_noise(frames, 0x7f4a_7c15) };
        let phases = Interpolator::new().phases;
        // The slow way: in f64, each point a plain sum of taps over the signal, zero outside it.
        let at = |channel: &[f32], k: isize| usize::try_from(k).ok().and_then(|k| channel.get(k)).map_or(0.0, |&x| f64::from(x));
        let slow: Vec<f64> = (0..frames as isize)
            .map(|n| {
                let peak = |channel: &[f32]| {
                    let points = phases
                        .iter()
                        .map(|taps| taps.iter().enumerate().map(|(j, &tap)| f64::from(tap) * at(channel, n + j as isize - (HALF_TAPS as isize - 1))).sum::<f64>());
                    points.fold(at(channel, n).abs(), |peak, point| peak.max(point.abs()))
                };
                peak(&buffer.left).max(peak(&buffer.right))
            })
            .collect();

        let fast = frame_peaks(&buffer);
        assert_eq!(fast.len(), frames);
        for (n, (&fast, &slow)) in fast.iter().zip(&slow).enumerate() {
            // f32 summation errs by a few parts in 10^7; a wrong tap or offset by far more.
            assert!((f64::from(fast) - slow).abs() <= 1e-5 * slow, "frame {n}: {fast} against {slow}");
        }
        let largest = slow.iter().copied().fold(0.0, f64::max);
        assert!((f64::from(true_peak(&buffer)) - largest).abs() <= 1e-5 * largest);
    }

    #[test]
    fn interpolation_finds_the_peak_between_samples() {
        // A sine at fs/4 sampled 45° off its peaks: every sample is at 0.707, the true peak is 1.
        let rate = 48_000.0;
        let signal: Vec<f32> = (0..4800).map(|n| (2.0 * std::f64::consts::PI * 12_000.0 * n as f64 / rate + std::f64::consts::FRAC_PI_4).sin() as f32).collect();
        let sample_peak = signal.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((sample_peak - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3);
        let buffer = StereoBuffer { left: signal.clone(), right: signal };
        let peak = true_peak(&buffer);
        assert!((peak - 1.0).abs() < 0.015, "true peak {peak}");
    }

    #[test]
    fn limiter_holds_a_square_wave_under_the_ceiling() {
        let rate = 48_000;
        let square: Vec<f32> = (0..rate as usize).map(|n| if (n / 60) % 2 == 0 { 0.95 } else { -0.95 }).collect();
        let buffer = StereoBuffer { left: square.clone(), right: square };
        let peaks = frame_peaks(&buffer);
        let ceiling = 10f32.powf(-1.0 / 20.0);
        let pre_gain = 2.0; // pushes the square 12 dB over the ceiling
        let envelope = Limiter::new(rate).envelope(&peaks, pre_gain, ceiling);
        assert_eq!(envelope.len(), buffer.len());
        let limited = StereoBuffer {
            left: buffer.left.iter().zip(&envelope).map(|(x, g)| x * pre_gain * g).collect(),
            right: buffer.right.iter().zip(&envelope).map(|(x, g)| x * pre_gain * g).collect(),
        };
        let out_peak = true_peak(&limited);
        assert!(out_peak <= ceiling * 1.005, "true peak {} dB over a ceiling of -1 dB", 20.0 * out_peak.log10());
        // It limits, it does not mute: the held level sits close under the ceiling.
        assert!(out_peak > ceiling * 0.9);
        // The envelope never jumps: it ramps over the look-ahead.
        let largest_step = envelope.windows(2).map(|w| (w[1] - w[0]).abs()).fold(0f32, f32::max);
        assert!(largest_step < 0.02, "gain step {largest_step}");
    }

    #[test]
    fn a_quiet_signal_passes_untouched() {
        let peaks = vec![0.1f32; 1000];
        assert!(Limiter::new(48_000).envelope(&peaks, 1.0, 0.9).iter().all(|&g| g == 1.0));
    }
}
