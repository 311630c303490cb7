//! Integrated loudness (ITU-R BS.1770-4) from the K-weighted energy of short chunks, so that the
//! master can predict the loudness of the mix under any gain envelope from a small summary
//! instead of rendering it again. The filter and the gating follow libebur128 (which the
//! `ebur128` crate ports) and are checked against that crate in the tests.

/// The K-weighting pre-filter (a high shelf) then the RLB high-pass, one state per channel.
pub struct KWeighting {
    coefficients: [[f64; 5]; 2],
    state: [[f64; 2]; 4],
}

impl KWeighting {
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        let (f0, gain_db, q) = (1681.974450955533, 3.999843853973347, 0.7071752369554196);
        let k = (std::f64::consts::PI * f0 / rate).tan();
        let vh = 10f64.powf(gain_db / 20.0);
        let vb = vh.powf(0.4996667741545416);
        let a0 = 1.0 + k / q + k * k;
        let shelf = [(vh + vb * k / q + k * k) / a0, 2.0 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0];
        let (f0, q) = (38.13547087602444, 0.5003270373238773);
        let k = (std::f64::consts::PI * f0 / rate).tan();
        let a0 = 1.0 + k / q + k * k;
        let highpass = [1.0, -2.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0];
        Self { coefficients: [shelf, highpass], state: [[0.0; 2]; 4] }
    }

    /// The filter's power gain at `freq_hz` (|H|² of both stages at `rate`).
    pub fn power_at(&self, freq_hz: f64, rate: u32) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq_hz / f64::from(rate);
        let (c1, s1, c2, s2) = (w.cos(), w.sin(), (2.0 * w).cos(), (2.0 * w).sin());
        self.coefficients
            .iter()
            .map(|[b0, b1, b2, a1, a2]| {
                let numerator = (b0 + b1 * c1 + b2 * c2).powi(2) + (b1 * s1 + b2 * s2).powi(2);
                let denominator = (1.0 + a1 * c1 + a2 * c2).powi(2) + (a1 * s1 + a2 * s2).powi(2);
                numerator / denominator
            })
            .product()
    }

    /// Adds each frame's K-weighted energy (left² + right², the channel weights of stereo being
    /// 1) to `energy`.
    pub fn add_energy(&mut self, left: &[f32], right: &[f32], energy: &mut [f64]) {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the processor supports AVX2 and FMA, as just checked.
            return unsafe { self.add_energy_fma(left, right, energy) };
        }
        self.add_energy_fused(left, right, energy)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add_energy_fma(&mut self, left: &[f32], right: &[f32], energy: &mut [f64]) {
        self.add_energy_fused(left, right, energy)
    }

    #[inline(always)]
    fn add_energy_fused(&mut self, left: &[f32], right: &[f32], energy: &mut [f64]) {
        // Both channels in one loop: each filter's samples wait on the one before, so the four
        // recursions run side by side in the core. Each is fused, so a sample waits on two
        // roundings of the one before, where unfused it waited on four. Each frame adds left²
        // then right².
        let [shelf, highpass] = self.coefficients;
        let stage = |c: &[f64; 5], state: &mut [f64; 2], x: f64| {
            let y = c[0].mul_add(x, state[0]);
            state[0] = (-c[3]).mul_add(y, c[1].mul_add(x, state[1]));
            state[1] = (-c[4]).mul_add(y, c[2] * x);
            y
        };
        let [mut left_shelf, mut left_highpass, mut right_shelf, mut right_highpass] = self.state;
        for ((l, r), energy) in left.iter().zip(right).zip(energy.iter_mut()) {
            let l = stage(&highpass, &mut left_highpass, stage(&shelf, &mut left_shelf, f64::from(*l)));
            let r = stage(&highpass, &mut right_highpass, stage(&shelf, &mut right_shelf, f64::from(*r)));
            *energy = r.mul_add(r, l.mul_add(l, *energy));
        }
        self.state = [left_shelf, left_highpass, right_shelf, right_highpass];
    }
}

/// Frames in BS.1770's 100 ms step at `rate`, rounded as libebur128 rounds it.
pub fn step_frames(rate: u32) -> usize {
    (rate as usize + 5) / 10
}

/// 400 ms gating blocks, in 100 ms steps.
const BLOCK_STEPS: usize = 4;
/// EBU Tech 3342's short-term blocks for the loudness range: 3 s, every second.
const SHORT_TERM_STEPS: usize = 30;
const SHORT_TERM_EVERY: usize = 10;

/// Gated integrated loudness and loudness range from the energy of consecutive 100 ms steps: for
/// the first, 400 ms blocks every 100 ms, an absolute gate at -70 LUFS and a relative gate 10 LU
/// under the mean; for the range (EBU Tech 3342), 3 s blocks every second from the third, the
/// same absolute gate, a relative gate 20 LU under the mean, and the spread between their 10th
/// and 95th percentiles, picked from the sorted list as libebur128 picks them. It keeps one
/// number per block that passes the absolute gate (eleven a second).
pub struct Gating {
    step_frames: usize,
    /// The last [`SHORT_TERM_STEPS`] steps' energies, the newest at `(seen - 1) % SHORT_TERM_STEPS`.
    recent: [f64; SHORT_TERM_STEPS],
    seen: usize,
    blocks: Vec<f64>,
    short_term_blocks: Vec<f64>,
}

impl Gating {
    pub fn new(rate: u32) -> Self {
        Self { step_frames: step_frames(rate), recent: [0.0; SHORT_TERM_STEPS], seen: 0, blocks: Vec::new(), short_term_blocks: Vec::new() }
    }

    /// The summed energy of the next 100 ms step.
    pub fn push_step(&mut self, energy: f64) {
        self.recent[self.seen % SHORT_TERM_STEPS] = energy;
        self.seen += 1;
        if self.seen >= BLOCK_STEPS {
            let block = self.sum_of_last(BLOCK_STEPS) / (BLOCK_STEPS * self.step_frames) as f64;
            if block >= absolute_gate_energy() {
                self.blocks.push(block);
            }
        }
        if self.seen >= SHORT_TERM_STEPS && (self.seen - SHORT_TERM_STEPS).is_multiple_of(SHORT_TERM_EVERY) {
            let block = self.sum_of_last(SHORT_TERM_STEPS) / (SHORT_TERM_STEPS * self.step_frames) as f64;
            if block >= absolute_gate_energy() {
                self.short_term_blocks.push(block);
            }
        }
    }

    /// The energy of the last `steps` steps, summed oldest first.
    fn sum_of_last(&self, steps: usize) -> f64 {
        (self.seen - steps..self.seen).map(|step| self.recent[step % SHORT_TERM_STEPS]).sum()
    }

    /// Integrated loudness in LUFS; `None` when no block passes the gates (silence, or under
    /// 400 ms).
    pub fn integrated(&self) -> Option<f64> {
        if self.blocks.is_empty() {
            return None;
        }
        let relative_gate = self.blocks.iter().sum::<f64>() / self.blocks.len() as f64 * 0.1;
        let (sum, count) = self.blocks.iter().filter(|&&b| b >= relative_gate).fold((0.0, 0usize), |(sum, count), b| (sum + b, count + 1));
        (count > 0).then(|| energy_to_lufs(sum / count as f64))
    }

    /// Loudness range in LU; 0 where no short-term block passes the gates (silence, or under 3 s),
    /// as libebur128 has it.
    pub fn range(&self) -> f64 {
        let mut blocks = self.short_term_blocks.clone();
        blocks.sort_unstable_by(f64::total_cmp);
        let relative_gate = blocks.iter().sum::<f64>() / blocks.len().max(1) as f64 * 0.01;
        let gated = &blocks[blocks.partition_point(|&b| b < relative_gate)..];
        let Some(last) = gated.len().checked_sub(1) else { return 0.0 };
        let percentile = |fraction: f64| gated[(last as f64 * fraction + 0.5) as usize];
        energy_to_lufs(percentile(0.95)) - energy_to_lufs(percentile(0.1))
    }
}

/// Integrated loudness and loudness range of stereo audio given in pieces of any length: the
/// K-weighting and [`Gating`] that libebur128 (the `ebur128` crate) uses, with the 100 ms steps'
/// energies summed once rather than every block's anew, which made that crate's meter the
/// largest part of writing a master.
pub struct LoudnessMeter {
    weighting: KWeighting,
    gating: Gating,
    step_frames: usize,
    energies: Vec<f64>,
    step: f64,
    in_step: usize,
}

impl LoudnessMeter {
    pub fn new(rate: u32) -> Self {
        Self { weighting: KWeighting::new(rate), gating: Gating::new(rate), step_frames: step_frames(rate), energies: Vec::new(), step: 0.0, in_step: 0 }
    }

    pub fn push(&mut self, left: &[f32], right: &[f32]) {
        self.energies.clear();
        self.energies.resize(left.len(), 0.0);
        self.weighting.add_energy(left, right, &mut self.energies);
        for energy in &self.energies {
            self.step += energy;
            self.in_step += 1;
            if self.in_step == self.step_frames {
                self.gating.push_step(self.step);
                (self.step, self.in_step) = (0.0, 0);
            }
        }
    }

    /// See [`Gating::integrated`].
    pub fn integrated(&self) -> Option<f64> {
        self.gating.integrated()
    }

    /// See [`Gating::range`].
    pub fn range(&self) -> f64 {
        self.gating.range()
    }
}

fn absolute_gate_energy() -> f64 {
    10f64.powf((-70.0 + 0.691) / 10.0)
}

fn energy_to_lufs(energy: f64) -> f64 {
    10.0 * energy.log10() - 0.691
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;
    use ebur128::{EbuR128, Mode};

    /// Integrated loudness and range, the audio given in pieces of `piece` frames.
    fn ours(left: &[f32], right: &[f32], rate: u32, piece: usize) -> (Option<f64>, f64) {
        let mut meter = LoudnessMeter::new(rate);
        for (left, right) in left.chunks(piece).zip(right.chunks(piece)) {
            meter.push(left, right);
        }
        (meter.integrated(), meter.range())
    }

    fn reference(left: &[f32], right: &[f32], rate: u32) -> (Option<f64>, f64) {
        let mut meter = EbuR128::new(2, rate, Mode::I | Mode::LRA).unwrap();
        meter.add_frames_planar_f32(&[left, right]).unwrap();
        (meter.loudness_global().ok().filter(|l| l.is_finite()), meter.loudness_range().unwrap())
    }

    #[test]
    fn loudness_and_range_match_the_ebur128_crate() {
        // Noise: a loud passage (falling 3 dB), 6 s 15 dB down, 6 s 30 dB down, so that each gate
        // decides something (the integrated loudness's at -10 LU leaves out the middle passage,
        // the range's at -20 LU keeps it) and the range's percentiles fall on blocks of distinct
        // loudness; and a low sine the high-pass has to take out. The loud passage's length sets
        // how many short-term blocks pass the gates (6 more than its seconds), and with it whether
        // rounding the percentiles' places (libebur128 adds a half) moves the pick: for 10 and 16
        // blocks it does.
        for (rate, loud) in [(44_100, 10.0), (48_000, 4.0), (96_000, 8.0), (22_050, 5.0), (11_025, 9.0)] {
            let frames = rate as usize * (loud as usize + 12) + 1234;
            let envelope = |n: usize| {
                let seconds = n as f32 / rate as f32;
                let db = if seconds < loud {
                    -3.0 * seconds / loud
                } else if seconds < loud + 6.0 {
                    -15.0
                } else {
                    -30.0
                };
                10f32.powf(db / 20.0)
            };
            let left: Vec<f32> = test_noise(frames, 11).iter().enumerate().map(|(n, x)| x * envelope(n)).collect();
            let right: Vec<f32> = test_noise(frames, 12)
                .iter()
                .enumerate()
                .map(|(n, x)| x * envelope(n) + 0.01 * (2.0 * std::f32::consts::PI * 30.0 * n as f32 / rate as f32).sin())
                .collect();
            let ((ours, ours_range), (reference, reference_range)) = (ours(&left, &right, rate, frames), reference(&left, &right, rate));
            let (ours, reference) = (ours.unwrap(), reference.unwrap());
            assert!((ours - reference).abs() < 0.005, "{rate} Hz: {ours} LUFS against the crate's {reference}");
            assert!(reference_range > 5.0, "{rate} Hz: the signal has a range to measure, {reference_range} LU");
            assert!((ours_range - reference_range).abs() < 0.005, "{rate} Hz: a range of {ours_range} LU against the crate's {reference_range}");
        }
        let silence = vec![0.0; 48_000 * 4];
        assert_eq!(ours(&silence, &silence, 48_000, 4096), (None, 0.0));
        let short = test_noise(10_000, 3);
        assert_eq!(ours(&short, &short, 48_000, 4096), (None, 0.0), "under 400 ms has no block, under 3 s no short-term block");
    }

    #[test]
    fn audio_given_in_pieces_measures_as_it_does_whole() {
        let rate = 44_100;
        let frames = rate as usize * 9 + 77;
        let left = test_noise(frames, 5);
        let right: Vec<f32> = test_noise(frames, 6).iter().enumerate().map(|(n, x)| x * (n % 30_000) as f32 / 30_000.0).collect();
        let whole = ours(&left, &right, rate, frames);
        for piece in [1, 1000, 4410, 4417, 65_536] {
            assert_eq!(ours(&left, &right, rate, piece), whole, "in pieces of {piece} frames");
        }
    }
}
