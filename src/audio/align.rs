//! Finding how far a stem is shifted against a reference, by FFT cross-correlation.

use realfft::RealFftPlanner;

/// Below this normalised correlation the peak is noise: the stems share no material to align on.
const MIN_CORRELATION: f64 = 0.1;

/// The lag `d` (in frames) that best explains `other[n] ≈ reference[n - d]`, searched within
/// ±`max_lag`; `None` when the two signals are not similar enough to say.
pub fn estimate_lag(reference: &[f32], other: &[f32], max_lag: usize) -> Option<i64> {
    if reference.is_empty() || other.is_empty() {
        return None;
    }
    let size = (reference.len() + other.len()).next_power_of_two();
    let mut planner = RealFftPlanner::<f64>::new();
    let forward = planner.plan_fft_forward(size);
    let inverse = planner.plan_fft_inverse(size);

    let spectrum = |signal: &[f32]| {
        let mut input = forward.make_input_vec();
        input.iter_mut().zip(signal).for_each(|(slot, &x)| *slot = f64::from(x));
        let mut output = forward.make_output_vec();
        forward.process(&mut input, &mut output).expect("buffer sizes come from the plan");
        output
    };
    let a = spectrum(reference);
    let b = spectrum(other);
    // conj(A)·B transforms back to r[k] = Σ a[n]·b[n+k], with negative lags wrapped to the end.
    let mut product: Vec<_> = a.iter().zip(&b).map(|(x, y)| x.conj() * y).collect();
    let mut correlation = inverse.make_output_vec();
    inverse.process(&mut product, &mut correlation).expect("buffer sizes come from the plan");

    let max_lag = max_lag.min(size / 2 - 1) as i64;
    let at = |lag: i64| correlation[lag.rem_euclid(size as i64) as usize];
    let best = (-max_lag..=max_lag).max_by(|&x, &y| at(x).total_cmp(&at(y)))?;

    let energy = |s: &[f32]| s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>();
    let norm = (energy(reference) * energy(other)).sqrt() * size as f64;
    (norm > 0.0 && at(best) / norm >= MIN_CORRELATION).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::buffer::test_noise;

    /// Deterministic noise in -0.5..0.5: a drum-like signal with no periodicity to confuse the search.
    fn noise(frames: usize, seed: u64) -> Vec<f32> {
        test_noise(frames, seed).into_iter().map(|x| 0.5 * x).collect()
    }

    #[test]
    fn recovers_a_known_shift_within_a_millisecond() {
        let rate = 48_000;
        let reference = noise(rate * 3, 7);
        for shift in [-2_400i64, -37, 0, 1, 480, 12_345] {
            let other: Vec<f32> = (0..reference.len() as i64)
                .map(|n| {
                    let source = n - shift;
                    if (0..reference.len() as i64).contains(&source) {
                        0.8 * reference[source as usize]
                    } else {
                        0.0
                    }
                })
                .collect();
            let lag = estimate_lag(&reference, &other, rate).expect("correlated");
            let error_ms = (lag - shift).abs() as f64 * 1000.0 / rate as f64;
            assert!(error_ms <= 1.0, "shift {shift}: found {lag}");
            assert_eq!(lag, shift);
        }
    }

    #[test]
    fn unrelated_signals_give_no_lag() {
        assert_eq!(estimate_lag(&noise(48_000, 1), &noise(48_000, 2), 4_800), None);
        assert_eq!(estimate_lag(&[0.0; 100], &[0.0; 100], 10), None);
    }
}
