//! True peak (ITU-R BS.1770 annex 2) by oversampling, and the look-ahead limiter that keeps it
//! under a ceiling.
//!
//! No crate does true-peak limiting: sample-peak limiters let inter-sample peaks through, which
//! then clip in every converter and lossy encoder downstream. The limiter here takes the gain it
//! needs from the oversampled peak of every frame, so it is written by hand and tested against
//! the `ebur128` crate's and ffmpeg's true-peak meters.

use std::collections::VecDeque;

use dasp_ring_buffer::Fixed;

use rayon::prelude::*;

/// Taps either side of the half-sample point in the first stage, and either side of a point in
/// the second (which works at twice the rate).
const HALF_A: usize = 48;
const HALF_B: usize = 12;
/// Frames of context either side that a frame's points are made from.
pub(crate) const REACH: usize = HALF_A + HALF_B / 2;
/// How far either side of a point the meters' filters reach: ffmpeg's 32 taps; the `ebur128`
/// crate's 12 or 24.
pub(crate) const METER_REACH: usize = 16;
/// Frames interpolated at a time: the tile and its window stay in the L1 cache.
const TILE: usize = 1024;
/// Frames per parallel task.
const TASK: usize = 8 * TILE;

/// A Kaiser-windowed sinc for the point `fraction` of the way from sample `half - 1` to sample
/// `half`, over `2 * half` samples, normalised to unit gain at DC.
fn kaiser_sinc(half: usize, fraction: f64, beta: f64) -> Vec<f32> {
    let bessel_i0 = |x: f64| {
        let (mut sum, mut term, mut k) = (1.0, 1.0, 1.0);
        while term > 1e-12 * sum {
            term *= (x / (2.0 * k)).powi(2);
            sum += term;
            k += 1.0;
        }
        sum
    };
    let taps: Vec<f64> = (0..2 * half)
        .map(|j| {
            let t = fraction - (j as f64 - (half as f64 - 1.0));
            let sinc = if t == 0.0 { 1.0 } else { (std::f64::consts::PI * t).sin() / (std::f64::consts::PI * t) };
            let u = t / half as f64;
            let window = if u.abs() >= 1.0 { 0.0 } else { bessel_i0(beta * (1.0 - u * u).sqrt()) / bessel_i0(beta) };
            sinc * window
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.iter().map(|tap| (tap / sum) as f32).collect()
}

/// The detector's filters. Eight points per frame, in two stages: a long half-band filter makes
/// the point halfway between each two samples (the hard part, near Nyquist), then a short one
/// makes three points between each two of the doubled-rate samples, whose content now sits in
/// the lower half of their band. That reads near the band-limited signal at an eighth of the
/// work of eight-times oversampling with the long filter.
struct Interpolator {
    half_band: Vec<f32>,
    /// Per quarter point (1/4, 2/4, 3/4 of the way between two doubled-rate samples), the taps
    /// over the 24 doubled-rate samples around it.
    quarters: Vec<Vec<f32>>,
    /// The `ebur128` crate's meter phases, each with the window offset of its first tap.
    meter: Vec<(usize, Vec<f32>)>,
}

impl Interpolator {
    /// With `meter_factor`, the phases of the `ebur128` crate's meter (libebur128's 48-tap
    /// Hann-windowed sinc, unnormalised) at that factor, computed as it computes them: a file is
    /// checked against that meter, whose short filter overshoots on transients.
    fn new(meter_factor: Option<usize>) -> Self {
        let half_band = kaiser_sinc(HALF_A, 0.5, 6.0);
        let quarters = [0.25, 0.5, 0.75].iter().map(|&fraction| kaiser_sinc(HALF_B, fraction, 6.0)).collect();
        let mut meter = Vec::new();
        if let Some(factor) = meter_factor {
            // libebur128: coefficient j = hann(j / 48) * sinc((j - 24) / factor); output phase p
            // of input n sums coefficient t * factor + p times x[n - t], the point p / factor
            // after x[n - 24 / factor].
            const METER_TAPS: usize = 48;
            let coefficient = |j: usize| {
                let window = 0.5 * (1.0 - (2.0 * std::f64::consts::PI * j as f64 / METER_TAPS as f64).cos());
                let m = j as f64 - METER_TAPS as f64 / 2.0;
                let sinc = if m.abs() > 1e-6 { (m * std::f64::consts::PI / factor as f64).sin() / (m * std::f64::consts::PI / factor as f64) } else { 1.0 };
                (window * sinc) as f32
            };
            let active = METER_TAPS / factor;
            let centre = METER_TAPS / 2 / factor;
            for p in 1..factor {
                // Ordered from the oldest sample, x[k - (active - 1 - centre)], to the newest.
                let taps: Vec<f32> = (0..active).rev().map(|t| coefficient(t * factor + p)).collect();
                meter.push((REACH - (active - 1 - centre), taps));
            }
        }
        Self { half_band, quarters, meter }
    }

    /// At least the sum of the absolute weights that any point the detector reads gives the
    /// samples around it: a point moves by at most this times the largest change of a sample.
    fn weight_bound(&self) -> f32 {
        let l1 = |taps: &[f32]| taps.iter().map(|tap| tap.abs()).sum::<f32>();
        // A second-stage point weighs samples directly and through half-band points.
        let through_half_band = l1(&self.half_band).max(1.0);
        let quarters = self.quarters.iter().map(|taps| l1(taps) * through_half_band);
        let meter = self.meter.iter().map(|(_, taps)| l1(taps));
        quarters.chain(meter).fold(through_half_band, f32::max)
    }

    /// Raises each `peaks[k]` to the largest magnitude of frame k and the points after it, where
    /// `window[k..k + 2 * REACH + 1]` are the samples around frame k (which is `window[k + REACH]`).
    ///
    /// Every filter runs tap by tap over a tile of frames: the inner loops run along the frames
    /// and vectorise, sixteen lanes wide under AVX-512 and eight under AVX2 (the same fused
    /// operations in the same order, so the readings are identical either way).
    fn raise_peaks(&self, window: &[f32], peaks: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx512_fma() {
            // SAFETY: the processor supports AVX-512F and FMA, as just checked.
            return unsafe { self.raise_peaks_avx512(window, peaks) };
        }
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the processor supports AVX2 and FMA, as just checked.
            return unsafe { self.raise_peaks_avx2(window, peaks) };
        }
        self.raise_peaks_portable(window, peaks)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn raise_peaks_avx512(&self, window: &[f32], peaks: &mut [f32]) {
        self.raise_peaks_portable(window, peaks)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn raise_peaks_avx2(&self, window: &[f32], peaks: &mut [f32]) {
        self.raise_peaks_portable(window, peaks)
    }

    #[inline(always)]
    fn raise_peaks_portable(&self, window: &[f32], peaks: &mut [f32]) {
        debug_assert!(window.len() >= peaks.len() + 2 * REACH);
        const SIDE: usize = HALF_B / 2;
        let mut mids = [0f32; TILE + 2 * SIDE];
        let mut points = [0f32; TILE];
        for (tile, peaks) in peaks.chunks_mut(TILE).enumerate() {
            let window = &window[tile * TILE..];
            let frames = peaks.len();
            let x = |offset: isize| &window[(REACH as isize + offset) as usize..][..frames];
            for (peak, sample) in peaks.iter_mut().zip(x(0)) {
                *peak = peak.max(sample.abs());
            }
            // mids[i] is the point halfway between frames i - SIDE and i - SIDE + 1.
            let mids = &mut mids[..frames + 2 * SIDE];
            let from = REACH - SIDE - (HALF_A - 1);
            convolve(mids, &self.half_band, |tap| &window[from + tap..]);
            for (peak, mid) in peaks.iter_mut().zip(&mids[SIDE..]) {
                *peak = peak.max(mid.abs());
            }
            // The doubled-rate sequence z is x(0), m(0), x(1), m(1)...; a point between z(p) and
            // z(p + 1) takes z(p - 11..=p + 12). From an even p = 2j those are m(j - 6), x(j - 5),
            // m(j - 5), ... x(j + 6); from an odd p = 2j + 1, x(j - 5), m(j - 5), ... m(j + 6).
            let mid = |offset: isize| &mids[(SIDE as isize + offset) as usize..][..frames];
            for taps in &self.quarters {
                for odd in [false, true] {
                    convolve(&mut points[..frames], taps, |t| {
                        let t = t as isize;
                        match (odd, t % 2 == 0) {
                            (false, true) => mid(t / 2 - 6),
                            (false, false) => x((t - 11) / 2),
                            (true, true) => x(t / 2 - 5),
                            (true, false) => mid((t - 11) / 2),
                        }
                    });
                    for (peak, point) in peaks.iter_mut().zip(&points[..frames]) {
                        *peak = peak.max(point.abs());
                    }
                }
            }
            for (offset, taps) in &self.meter {
                convolve(&mut points[..frames], taps, |t| &window[offset + t..]);
                for (peak, point) in peaks.iter_mut().zip(&points[..frames]) {
                    *peak = peak.max(point.abs());
                }
            }
        }
    }
}

/// `out[i] = sum of taps[t] * source(t)[i]`, every tap in order and fused into the sum (one
/// rounding a tap), four taps to a pass over `out`: each output is loaded and stored once per four
/// taps instead of once per tap (the loop was bound by its stores). The first pass writes `out`
/// without reading it, so it needs no clearing.
#[inline(always)]
fn convolve<'a>(out: &mut [f32], taps: &[f32], source: impl Fn(usize) -> &'a [f32]) {
    debug_assert!(taps.len() >= 4);
    let n = out.len();
    let mut groups = taps.chunks_exact(4);
    for (group, coefficients) in groups.by_ref().enumerate() {
        let t = 4 * group;
        let [c0, c1, c2, c3] = [coefficients[0], coefficients[1], coefficients[2], coefficients[3]];
        let (s0, s1, s2, s3) = (&source(t)[..n], &source(t + 1)[..n], &source(t + 2)[..n], &source(t + 3)[..n]);
        let sum = |before: f32, a: &f32, b: &f32, c: &f32, d: &f32| c3.mul_add(*d, c2.mul_add(*c, c1.mul_add(*b, c0.mul_add(*a, before))));
        if group == 0 {
            for ((((out, a), b), c), d) in out.iter_mut().zip(s0).zip(s1).zip(s2).zip(s3) {
                *out = sum(0.0, a, b, c, d);
            }
        } else {
            for ((((out, a), b), c), d) in out.iter_mut().zip(s0).zip(s1).zip(s2).zip(s3) {
                *out = sum(*out, a, b, c, d);
            }
        }
    }
    let done = taps.len() - groups.remainder().len();
    for (t, &coefficient) in groups.remainder().iter().enumerate() {
        for (out, sample) in out.iter_mut().zip(&source(done + t)[..n]) {
            *out = coefficient.mul_add(*sample, *out);
        }
    }
}

/// The `ebur128` crate's oversampling at `rate`, as it chooses it (none from 192 kHz).
fn meter_factor(rate: u32) -> Option<usize> {
    match rate {
        0..96_000 => Some(4),
        96_000..192_000 => Some(2),
        _ => None,
    }
}

/// Frame peaks of a stream of stereo audio: per frame, the true peak over both channels between
/// it and the next frame. Each frame's points need the frames after it, so peaks come out that
/// far behind the audio pushed, and `finish` gives the last ones.
///
/// Before the first frame and after the last, a player (and the `ebur128` crate) has silence,
/// while ffmpeg's meter mirrors the signal about its first and last samples (its resampler's
/// edge handling): a stream that starts or ends at full level can read higher that way. The
/// frames whose points reach past either end are read both ways, and the higher reading kept.
pub struct PeakDetector {
    interpolator: Interpolator,
    /// Per channel, the frames from `REACH` before the first frame without a peak yet (zeros
    /// before the start) to the last frame pushed.
    window: [Vec<f32>; 2],
    /// Per frame without a peak yet, whether to read it (pushed by [`Self::push_selected`]).
    wanted: Vec<bool>,
    pending: usize,
    started: bool,
    frames_read: u64,
}

impl PeakDetector {
    pub fn new(rate: u32) -> Self {
        let context = vec![0.0; REACH];
        Self { interpolator: Interpolator::new(meter_factor(rate)), window: [context.clone(), context], wanted: Vec::new(), pending: 0, started: false, frames_read: 0 }
    }

    /// See [`Interpolator::weight_bound`].
    pub fn weight_bound(&self) -> f32 {
        self.interpolator.weight_bound()
    }

    /// Frames read so far, both ways counted once (frames skipped by [`Self::push_selected`] are
    /// not read).
    pub fn frames_read(&self) -> u64 {
        self.frames_read
    }

    /// Takes the next frames; appends the peaks of every frame that can now be measured.
    pub fn push(&mut self, left: &[f32], right: &[f32], peaks: &mut Vec<f32>) {
        self.push_selected(left, right, None, peaks);
    }

    /// As [`Self::push`], but reads only the frames whose `wanted` is true: the peaks of the
    /// others are zero. The frames near either end are always read.
    pub fn push_selected(&mut self, left: &[f32], right: &[f32], wanted: Option<&[bool]>, peaks: &mut Vec<f32>) {
        match wanted {
            Some(wanted) => self.wanted.extend_from_slice(wanted),
            None => self.wanted.resize(self.wanted.len() + left.len(), true),
        }
        self.window[0].extend_from_slice(left);
        self.window[1].extend_from_slice(right);
        self.pending += left.len();
        let count = self.pending.saturating_sub(REACH);
        // The first frames wait until every frame near the start can be read both ways at once.
        if self.started || count >= REACH {
            self.emit(count, peaks);
        }
    }

    /// Appends the peaks of the frames still held (the stream is over).
    pub fn finish(&mut self, peaks: &mut Vec<f32>) {
        let tail = self.pending.min(REACH);
        let mirrored_end = self.window.each_ref().map(|channel| {
            let last = channel.len() - 1;
            let mut extended = channel[channel.len() - (tail + REACH)..].to_vec();
            extended.extend((1..=REACH).map(|k| last.checked_sub(k).map_or(0.0, |i| channel[i])));
            extended
        });
        for channel in &mut self.window {
            channel.extend_from_slice(&[0.0; REACH]);
        }
        let held = self.wanted.len();
        self.wanted[held - tail..].fill(true);
        self.emit(self.pending, peaks);
        let end = peaks.len();
        Self::raise_from(&self.interpolator, &mirrored_end, &mut peaks[end - tail..], None);
    }

    fn emit(&mut self, count: usize, peaks: &mut Vec<f32>) {
        let from = peaks.len();
        peaks.resize(from + count, 0.0);
        let head = if self.started { 0 } else { count.min(REACH) };
        self.wanted[..head].fill(true);
        self.frames_read += Self::raise_from(&self.interpolator, &self.window, &mut peaks[from..], Some(&self.wanted[..count]));
        if !self.started {
            self.started = true;
            let mirrored_start = self.window.each_ref().map(|channel| {
                let mut extended: Vec<f32> = (1..=REACH).rev().map(|k| channel.get(REACH + k).copied().unwrap_or(0.0)).collect();
                extended.extend_from_slice(&channel[REACH..2 * REACH + head]);
                extended
            });
            Self::raise_from(&self.interpolator, &mirrored_start, &mut peaks[from..from + head], None);
        }
        for channel in &mut self.window {
            channel.drain(..count);
        }
        self.wanted.drain(..count);
        self.pending -= count;
    }

    /// Raises `peaks` to the readings of the frames `window` holds after its context, those
    /// `wanted` only where given. Returns how many frames it read.
    fn raise_from(interpolator: &Interpolator, window: &[Vec<f32>; 2], peaks: &mut [f32], wanted: Option<&[bool]>) -> u64 {
        peaks
            .par_chunks_mut(TASK)
            .enumerate()
            .map(|(task, peaks)| {
                let (start, frames) = (task * TASK, peaks.len());
                let mut read = |from: usize, to: usize| {
                    for channel in window {
                        interpolator.raise_peaks(&channel[start + from..start + to + 2 * REACH], &mut peaks[from..to]);
                    }
                    (to - from) as u64
                };
                let Some(wanted) = wanted.map(|wanted| &wanted[start..start + frames]) else { return read(0, frames) };
                let (mut frames_read, mut run) = (0, None);
                for (i, &wanted) in wanted.iter().enumerate() {
                    match (wanted, run) {
                        (true, None) => run = Some(i),
                        (false, Some(from)) => {
                            frames_read += read(from, i);
                            run = None;
                        }
                        _ => {}
                    }
                }
                if let Some(from) = run {
                    frames_read += read(from, wanted.len());
                }
                frames_read
            })
            .sum()
    }
}

/// The true peak of a whole signal, linear (for tests).
#[cfg(test)]
pub fn true_peak(left: &[f32], right: &[f32], rate: u32) -> f32 {
    let mut detector = PeakDetector::new(rate);
    let mut peaks = Vec::new();
    detector.push(left, right, &mut peaks);
    detector.finish(&mut peaks);
    peaks.into_iter().fold(0.0, f32::max)
}

/// The look-ahead limiter, working on chunks of frames: given each chunk's largest frame peak,
/// it yields the gain at every chunk boundary, and a frame's gain is the straight line between
/// the boundaries of its chunk.
///
/// Per chunk the required gain brings its peak (times `pre_gain`) to the ceiling. It is widened
/// to the neighbouring chunks, so that every sample a meter makes an interpolated point from (16
/// either side, and a chunk is at least that long) has at most the gain that point needs; then
/// min-filtered over the look-ahead, eased back up by the release, and averaged over the
/// look-ahead. The average of values that are each at most a chunk's required gain is at most
/// that gain, so the envelope ramps down over the look-ahead and still meets every peak.
pub struct Limiter<P: FnMut() -> Option<f32>> {
    peaks: P,
    pre_gain: f32,
    ceiling: f32,
    lookahead: usize,
    release: f32,
    /// Required gains of the previous, current and next chunk.
    required: [f32; 3],
    /// Index of the next widened gain, and the candidates for the sliding minimum over it.
    next: usize,
    candidates: VecDeque<(usize, f32)>,
    released: f32,
    /// The last `lookahead` released gains (zeros before the first) and their sum.
    averaged: Fixed<Vec<f32>>,
    sum: f64,
    /// The next chunk's gain, and the gain at its start, once known.
    upcoming: Option<f32>,
    boundary: Option<f32>,
}

impl<P: FnMut() -> Option<f32>> Limiter<P> {
    /// `chunk_frames` long chunks at `rate`, whose peaks `peaks` yields in order (then `None`).
    pub fn new(peaks: P, rate: u32, chunk_frames: usize, pre_gain: f32, ceiling: f32) -> Self {
        debug_assert!(chunk_frames >= METER_REACH);
        let chunks_per_second = f64::from(rate) / chunk_frames as f64;
        let lookahead = ((0.003 * chunks_per_second).ceil() as usize).max(1);
        let release = (1.0 - (-1.0 / (0.08 * chunks_per_second)).exp()) as f32;
        let mut limiter = Self {
            peaks,
            pre_gain,
            ceiling,
            lookahead,
            release,
            required: [1.0; 3],
            next: 0,
            candidates: VecDeque::new(),
            released: 1.0,
            averaged: Fixed::from(vec![0.0; lookahead]),
            sum: 0.0,
            upcoming: None,
            boundary: None,
        };
        limiter.required[2] = limiter.next_required();
        for _ in 0..lookahead {
            limiter.average_in_next();
        }
        limiter
    }

    fn next_required(&mut self) -> f32 {
        match (self.peaks)() {
            Some(peak) if peak * self.pre_gain > self.ceiling => self.ceiling / (peak * self.pre_gain),
            _ => 1.0,
        }
    }

    fn next_released(&mut self) -> f32 {
        self.required = [self.required[1], self.required[2], self.next_required()];
        let widened = self.required.iter().copied().fold(1.0, f32::min);
        let k = self.next;
        self.next += 1;
        while self.candidates.back().is_some_and(|&(_, v)| v >= widened) {
            self.candidates.pop_back();
        }
        self.candidates.push_back((k, widened));
        while self.candidates.front().is_some_and(|&(i, _)| i + self.lookahead <= k) {
            self.candidates.pop_front();
        }
        let minimum = self.candidates.front().map_or(1.0, |&(_, v)| v);
        self.released = if minimum < self.released { minimum } else { self.released + self.release * (minimum - self.released) };
        self.released
    }

    /// The next chunk's gain (the average over its look-ahead).
    fn next_chunk_gain(&mut self) -> f32 {
        let gain = (self.sum / self.lookahead as f64) as f32;
        self.average_in_next();
        gain
    }

    fn average_in_next(&mut self) {
        let released = self.next_released();
        let oldest = self.averaged.push(released);
        self.sum += f64::from(released) - f64::from(oldest);
    }

    /// The gains at the start and end of the next chunk: each at most the chunk's own gain and
    /// its neighbour's, so every frame of the chunk is too.
    pub fn next_chunk(&mut self) -> (f32, f32) {
        let current = match self.upcoming.take() {
            Some(gain) => gain,
            None => self.next_chunk_gain(),
        };
        let following = self.next_chunk_gain();
        self.upcoming = Some(following);
        let start = self.boundary.unwrap_or(current);
        let end = current.min(following);
        self.boundary = Some(end);
        (start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    const RATE: u32 = 48_000;
    const CHUNK: usize = 32;

    #[test]
    fn streamed_frame_peaks_match_a_direct_sum_of_the_taps() {
        // Pushed in uneven pieces, some shorter than the interpolator's reach, over several tasks.
        let frames = TASK + 3 * TILE + 321;
        let (left, right) = (test_noise(frames, 0x9e37_79b9), test_noise(frames, 0x7f4a_7c15));
        let interpolator = Interpolator::new(meter_factor(RATE));
        // The slow way: in f64, each point a plain sum of taps over the signal, read with zeros
        // outside it and again mirrored about its first and last samples.
        let zero = |channel: &[f32], k: isize| usize::try_from(k).ok().and_then(|k| channel.get(k)).map_or(0.0, |&x| f64::from(x));
        let last = frames as isize - 1;
        let mirror = |channel: &[f32], k: isize| {
            f64::from(
                channel[if k < 0 {
                    -k
                } else if k > last {
                    2 * last - k
                } else {
                    k
                } as usize],
            )
        };
        let reading = |channel: &[f32], at: &dyn Fn(&[f32], isize) -> f64, n: isize| -> f64 {
            let x = |k: isize| at(channel, k);
            let m = |k: isize| interpolator.half_band.iter().enumerate().map(|(t, &a)| f64::from(a) * x(k - (HALF_A as isize - 1) + t as isize)).sum::<f64>();
            let z = |q: isize| if q.rem_euclid(2) == 0 { x(q.div_euclid(2)) } else { m(q.div_euclid(2)) };
            let mut peak = x(n).abs().max(m(n).abs());
            for p in [2 * n, 2 * n + 1] {
                for taps in &interpolator.quarters {
                    let point: f64 = taps.iter().enumerate().map(|(t, &b)| f64::from(b) * z(p - (HALF_B as isize - 1) + t as isize)).sum();
                    peak = peak.max(point.abs());
                }
            }
            for (offset, taps) in &interpolator.meter {
                let point: f64 = taps.iter().enumerate().map(|(t, &c)| f64::from(c) * x(n + (offset + t) as isize - REACH as isize)).sum();
                peak = peak.max(point.abs());
            }
            peak
        };
        let slow: Vec<f64> = (0..frames as isize)
            .map(|n| reading(&left, &zero, n).max(reading(&right, &zero, n)).max(reading(&left, &mirror, n)).max(reading(&right, &mirror, n)))
            .collect();

        let mut detector = PeakDetector::new(RATE);
        let mut fast = Vec::new();
        let mut start = 0;
        for piece in [5, 7000, 1, 20_000, 3].into_iter().cycle() {
            let end = (start + piece).min(frames);
            detector.push(&left[start..end], &right[start..end], &mut fast);
            let expected = if end >= 2 * REACH { end - REACH } else { 0 };
            assert_eq!(fast.len(), expected, "peaks trail the audio by the interpolator's reach");
            start = end;
            if start == frames {
                break;
            }
        }
        detector.finish(&mut fast);
        assert_eq!(fast.len(), frames);
        for (n, (&fast, &slow)) in fast.iter().zip(&slow).enumerate() {
            // f32 summation errs by a few parts in 10^7; a wrong tap or offset by far more.
            assert!((f64::from(fast) - slow).abs() <= 2e-5 * slow, "frame {n}: {fast} against {slow}");
        }
    }

    #[test]
    fn the_meter_phases_read_what_the_ebur128_crate_reads() {
        for (rate, factor) in [(44_100, 4), (48_000, 4), (96_000, 2)] {
            // Noise, and clicks: a short filter overshoots most on transients.
            let mut left = test_noise(20_000, 7);
            left.iter_mut().skip(5000).step_by(3001).for_each(|x| *x = 1.0);
            let right: Vec<f32> = test_noise(20_000, 8).iter().map(|x| 0.5 * x).collect();
            let meter = Interpolator::new(Some(factor)).meter;
            let meter_only = PeakDetector { interpolator: Interpolator { half_band: vec![0.0; 2 * HALF_A], quarters: Vec::new(), meter }, ..PeakDetector::new(rate) };
            let ours = peak_of(meter_only, &left, &right);
            let mut crate_meter = ebur128::EbuR128::new(2, rate, ebur128::Mode::TRUE_PEAK).unwrap();
            crate_meter.add_frames_planar_f32(&[&left, &right]).unwrap();
            let theirs = crate_meter.true_peak(0).unwrap().max(crate_meter.true_peak(1).unwrap()) as f32;
            assert!((ours - theirs).abs() <= 1e-6 * theirs, "{rate} Hz: {ours} against the crate's {theirs}");
            // The whole detector reads at least what the meter reads.
            assert!(peak_of(PeakDetector::new(rate), &left, &right) >= theirs);
        }
    }

    fn peak_of(mut detector: PeakDetector, left: &[f32], right: &[f32]) -> f32 {
        let mut peaks = Vec::new();
        detector.push(left, right, &mut peaks);
        detector.finish(&mut peaks);
        peaks.into_iter().fold(0.0, f32::max)
    }

    #[test]
    fn a_tone_near_nyquist_reads_at_its_amplitude() {
        // 19 and 21 kHz at 44.1 and 48 kHz: the long first stage keeps them within 0.02 dB
        // (over a second the points land on every phase of the tone).
        for (rate, freq) in [(44_100u32, 19_000.0), (48_000, 21_000.0)] {
            let tone: Vec<f32> = (0..rate as usize).map(|n| (0.5 * (2.0 * std::f64::consts::PI * freq * n as f64 / f64::from(rate) + 0.3).sin()) as f32).collect();
            let mut peaks = Vec::new();
            let mut detector = PeakDetector::new(rate);
            detector.push(&tone, &tone, &mut peaks);
            detector.finish(&mut peaks);
            // Away from the ends, which read higher mirrored.
            let peak = peaks[1000..peaks.len() - 1000].iter().copied().fold(0.0, f32::max);
            assert!((20.0 * (peak / 0.5).log10()).abs() < 0.02, "{freq} Hz at {rate} Hz reads {peak}");
        }
    }

    #[test]
    fn interpolation_finds_the_peak_between_samples() {
        // A sine at fs/4 sampled 45° off its peaks: every sample is at 0.707, the true peak is 1.
        // Faded in and out, so that neither end reads higher.
        let fade = |n: usize| (n.min(4799 - n) as f64 / 480.0).min(1.0);
        let signal: Vec<f32> =
            (0..4800).map(|n| (fade(n) * (2.0 * std::f64::consts::PI * 12_000.0 * n as f64 / f64::from(RATE) + std::f64::consts::FRAC_PI_4).sin()) as f32).collect();
        let sample_peak = signal.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((sample_peak - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-3);
        let peak = true_peak(&signal, &signal, RATE);
        assert!((peak - 1.0).abs() < 0.015, "true peak {peak}");
    }

    /// Per frame, the gain the limiter gives a signal with these frame peaks.
    fn frame_gains(peaks: &[f32], pre_gain: f32, ceiling: f32) -> Vec<f32> {
        let mut chunk_peaks = peaks.chunks(CHUNK).map(|c| c.iter().copied().fold(0.0, f32::max));
        let mut limiter = Limiter::new(move || chunk_peaks.next(), RATE, CHUNK, pre_gain, ceiling);
        let mut gains = Vec::with_capacity(peaks.len());
        for chunk in peaks.chunks(CHUNK) {
            let (a, b) = limiter.next_chunk();
            gains.extend((0..chunk.len()).map(|i| a + (b - a) * i as f32 / CHUNK as f32));
        }
        gains
    }

    #[test]
    fn every_sample_a_peak_is_made_from_gets_at_most_the_gain_the_peak_needs() {
        // Bursts of noise at random levels, some far over the ceiling.
        let frames = 40_000;
        let levels = test_noise(frames / 500 + 1, 5);
        let signal: Vec<f32> = test_noise(frames, 9).iter().enumerate().map(|(n, x)| x * (1.0 + 3.0 * levels[n / 500].abs())).collect();
        let mut detector = PeakDetector::new(RATE);
        let mut peaks = Vec::new();
        detector.push(&signal, &signal, &mut peaks);
        detector.finish(&mut peaks);
        let (pre_gain, ceiling) = (1.5, 0.9);
        let gains = frame_gains(&peaks, pre_gain, ceiling);
        for (n, &peak) in peaks.iter().enumerate() {
            let needed = (ceiling / (peak * pre_gain)).min(1.0);
            let reach = n.saturating_sub(METER_REACH)..(n + METER_REACH + 1).min(frames);
            for (m, &gain) in gains[reach.clone()].iter().enumerate() {
                assert!(gain <= needed * (1.0 + 1e-6), "frame {} has gain {gain} where frame {n}'s peak needs {needed}", reach.start + m);
            }
        }
    }

    #[test]
    fn limiter_holds_a_square_wave_under_the_ceiling() {
        let square: Vec<f32> = (0..RATE as usize).map(|n| if (n / 60) % 2 == 0 { 0.95 } else { -0.95 }).collect();
        let mut detector = PeakDetector::new(RATE);
        let mut peaks = Vec::new();
        detector.push(&square, &square, &mut peaks);
        detector.finish(&mut peaks);
        let ceiling = 10f32.powf(-1.0 / 20.0);
        let pre_gain = 2.0; // pushes the square 12 dB over the ceiling
        let gains = frame_gains(&peaks, pre_gain, ceiling);
        let limited: Vec<f32> = square.iter().zip(&gains).map(|(x, g)| x * pre_gain * g).collect();
        let out_peak = true_peak(&limited, &limited, RATE);
        assert!(out_peak <= ceiling * 1.0005, "true peak {} dB over a ceiling of -1 dB", 20.0 * out_peak.log10());
        // It limits, it does not mute: the held level sits close under the ceiling.
        assert!(out_peak > ceiling * 0.9);
        // The envelope never jumps: it ramps over the look-ahead.
        let largest_step = gains.windows(2).map(|w| (w[1] - w[0]).abs()).fold(0f32, f32::max);
        assert!(largest_step < 0.02, "gain step {largest_step}");
    }

    #[test]
    fn a_quiet_signal_passes_untouched() {
        let peaks = vec![0.1f32; 1000];
        assert!(frame_gains(&peaks, 1.0, 0.9).iter().all(|&g| g == 1.0));
    }
}
