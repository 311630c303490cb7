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
        // Both channels in one loop: each filter's samples wait on the one before, so the four
        // recursions run side by side in the core. Each frame adds left² then right², as before.
        let [shelf, highpass] = self.coefficients;
        let stage = |c: &[f64; 5], state: &mut [f64; 2], x: f64| {
            let y = c[0] * x + state[0];
            state[0] = c[1] * x - c[3] * y + state[1];
            state[1] = c[2] * x - c[4] * y;
            y
        };
        let [mut left_shelf, mut left_highpass, mut right_shelf, mut right_highpass] = self.state;
        for ((l, r), energy) in left.iter().zip(right).zip(energy.iter_mut()) {
            let l = stage(&highpass, &mut left_highpass, stage(&shelf, &mut left_shelf, f64::from(*l)));
            let r = stage(&highpass, &mut right_highpass, stage(&shelf, &mut right_shelf, f64::from(*r)));
            *energy += l * l;
            *energy += r * r;
        }
        self.state = [left_shelf, left_highpass, right_shelf, right_highpass];
    }
}

/// Frames in BS.1770's 100 ms step at `rate`, rounded as libebur128 rounds it.
pub fn step_frames(rate: u32) -> usize {
    (rate as usize + 5) / 10
}

/// Gated integrated loudness from the energy of consecutive 100 ms steps: 400 ms blocks every
/// 100 ms, an absolute gate at -70 LUFS and a relative gate 10 LU under the mean. It keeps one
/// number per block that passes the absolute gate (ten a second).
pub struct Gating {
    step_frames: usize,
    steps: [f64; 4],
    seen: usize,
    blocks: Vec<f64>,
}

impl Gating {
    pub fn new(rate: u32) -> Self {
        Self { step_frames: step_frames(rate), steps: [0.0; 4], seen: 0, blocks: Vec::new() }
    }

    /// The summed energy of the next 100 ms step.
    pub fn push_step(&mut self, energy: f64) {
        self.steps = [self.steps[1], self.steps[2], self.steps[3], energy];
        self.seen += 1;
        if self.seen >= 4 {
            let block = self.steps.iter().sum::<f64>() / (4 * self.step_frames) as f64;
            if block >= absolute_gate_energy() {
                self.blocks.push(block);
            }
        }
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

    fn ours(left: &[f32], right: &[f32], rate: u32) -> Option<f64> {
        let mut filter = KWeighting::new(rate);
        let mut energy = vec![0.0; left.len()];
        filter.add_energy(left, right, &mut energy);
        let mut gating = Gating::new(rate);
        for step in energy.chunks_exact(step_frames(rate)) {
            gating.push_step(step.iter().sum());
        }
        gating.integrated()
    }

    fn reference(left: &[f32], right: &[f32], rate: u32) -> Option<f64> {
        let mut meter = EbuR128::new(2, rate, Mode::I).unwrap();
        meter.add_frames_planar_f32(&[left, right]).unwrap();
        meter.loudness_global().ok().filter(|l| l.is_finite())
    }

    #[test]
    fn integrated_loudness_matches_the_ebur128_crate() {
        for rate in [44_100, 48_000, 96_000, 22_050, 11_025] {
            let frames = rate as usize * 7 + 1234;
            // Noise with loud and quiet passages, so that both gates decide something, and a
            // low sine the high-pass has to take out.
            let envelope = |n: usize| if (n / rate as usize).is_multiple_of(3) { 0.02 } else { 0.6 };
            let left: Vec<f32> = test_noise(frames, 11).iter().enumerate().map(|(n, x)| x * envelope(n)).collect();
            let right: Vec<f32> = (0..frames).map(|n| 0.3 * (2.0 * std::f32::consts::PI * 30.0 * n as f32 / rate as f32).sin()).collect();
            let (ours, reference) = (ours(&left, &right, rate).unwrap(), reference(&left, &right, rate).unwrap());
            assert!((ours - reference).abs() < 0.005, "{rate} Hz: {ours} LUFS against the crate's {reference}");
        }
        let silence = vec![0.0; 48_000];
        assert_eq!(ours(&silence, &silence, 48_000), None);
        let short = test_noise(10_000, 3);
        assert_eq!(ours(&short, &short, 48_000), None, "under 400 ms has no block");
    }
}
