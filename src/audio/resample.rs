//! Streaming sample-rate conversion with rubato's FFT resampler.
//!
//! Chunks of any size go in and come out at the new rate; the resampler's own latency is dropped at
//! the start and its tail flushed at the end, so a stem converted here keeps its timing to a
//! twentieth of a frame (see `chunk_frames` for where rubato misreports its latency) and its
//! length is exactly `round(frames_in * out_rate / in_rate)`.

use rubato::{FftFixedIn, Resampler};

use super::buffer::StereoBuffer;
use super::AudioError;

const CHUNK_FRAMES: usize = 2048;
const SUB_CHUNKS: usize = 2;

pub struct RateConverter {
    resampler: Option<FftFixedIn<f32>>,
    in_rate: u32,
    out_rate: u32,
    pending: StereoBuffer,
    output: Vec<Vec<f32>>,
    latency_left: usize,
    frames_in: u64,
    frames_out: u64,
}

impl RateConverter {
    pub fn new(in_rate: u32, out_rate: u32) -> Result<Self, AudioError> {
        let resampler = if in_rate == out_rate {
            None
        } else {
            Some(
                FftFixedIn::<f32>::new(in_rate as usize, out_rate as usize, chunk_frames(in_rate, out_rate), SUB_CHUNKS, 2)
                    .map_err(|err| AudioError::Internal(format!("resampler {in_rate}->{out_rate}: {err}")))?,
            )
        };
        let output = resampler.as_ref().map(|r| r.output_buffer_allocate(true)).unwrap_or_default();
        let latency_left = resampler.as_ref().map_or(0, |r| r.output_delay());
        Ok(Self { resampler, in_rate, out_rate, pending: StereoBuffer::default(), output, latency_left, frames_in: 0, frames_out: 0 })
    }

    /// Converts `input`, appending whatever output is ready to `out`.
    pub fn push(&mut self, input: &StereoBuffer, out: &mut StereoBuffer) -> Result<(), AudioError> {
        self.frames_in += input.len() as u64;
        let Some(resampler) = self.resampler.as_mut() else {
            out.left.extend_from_slice(&input.left);
            out.right.extend_from_slice(&input.right);
            self.frames_out += input.len() as u64;
            return Ok(());
        };
        self.pending.left.extend_from_slice(&input.left);
        self.pending.right.extend_from_slice(&input.right);
        let mut consumed = 0;
        while self.pending.len() - consumed >= resampler.input_frames_next() {
            let need = resampler.input_frames_next();
            let wave_in = [&self.pending.left[consumed..consumed + need], &self.pending.right[consumed..consumed + need]];
            let (used, produced) = resampler.process_into_buffer(&wave_in, &mut self.output, None).map_err(|err| AudioError::Internal(format!("resampler: {err}")))?;
            consumed += used;
            Self::emit(&self.output, produced, &mut self.latency_left, &mut self.frames_out, u64::MAX, out);
        }
        self.pending.left.drain(..consumed);
        self.pending.right.drain(..consumed);
        Ok(())
    }

    /// Flushes the resampler's tail so the output has exactly the expected length.
    pub fn finish(&mut self, out: &mut StereoBuffer) -> Result<(), AudioError> {
        let expected = self.expected_output_frames();
        let Some(resampler) = self.resampler.as_mut() else { return Ok(()) };
        // rubato 0.16 rejects an empty partial chunk; None means the same and is accepted.
        let mut input = Some(std::mem::take(&mut self.pending)).filter(|p| !p.is_empty());
        while self.frames_out < expected {
            let wave_in = input.as_ref().map(|p| [p.left.as_slice(), p.right.as_slice()]);
            let (_, produced) = resampler
                .process_partial_into_buffer(wave_in.as_ref().map(|w| &w[..]), &mut self.output, None)
                .map_err(|err| AudioError::Internal(format!("resampler: {err}")))?;
            input = None;
            Self::emit(&self.output, produced, &mut self.latency_left, &mut self.frames_out, expected, out);
        }
        Ok(())
    }

    pub fn expected_output_frames(&self) -> u64 {
        (self.frames_in as f64 * f64::from(self.out_rate) / f64::from(self.in_rate)).round() as u64
    }

    fn emit(output: &[Vec<f32>], produced: usize, latency_left: &mut usize, frames_out: &mut u64, limit: u64, out: &mut StereoBuffer) {
        let skip = (*latency_left).min(produced);
        *latency_left -= skip;
        let room = limit.saturating_sub(*frames_out).min((produced - skip) as u64) as usize;
        out.left.extend_from_slice(&output[0][skip..skip + room]);
        out.right.extend_from_slice(&output[1][skip..skip + room]);
        *frames_out += room as u64;
    }
}

/// An input chunk size near `CHUNK_FRAMES` for which both of rubato's FFT lengths are even: with
/// an odd one, its reported latency is off from the real one by half a frame.
fn chunk_frames(in_rate: u32, out_rate: u32) -> usize {
    let (mut a, mut b) = (in_rate, out_rate);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let min_chunk_in = (in_rate / a) as usize;
    let fft_chunks = (CHUNK_FRAMES / SUB_CHUNKS).div_ceil(min_chunk_in).max(1).next_multiple_of(2);
    fft_chunks * min_chunk_in * SUB_CHUNKS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f64, rate: u32, frames: usize, amplitude: f32) -> StereoBuffer {
        let left: Vec<f32> = (0..frames).map(|n| amplitude * (2.0 * std::f64::consts::PI * freq * n as f64 / f64::from(rate)).sin() as f32).collect();
        StereoBuffer { right: left.clone(), left }
    }

    fn convert(input: &StereoBuffer, from: u32, to: u32, piece: usize) -> StereoBuffer {
        let mut converter = RateConverter::new(from, to).unwrap();
        let mut out = StereoBuffer::default();
        for start in (0..input.len()).step_by(piece) {
            let end = (start + piece).min(input.len());
            let part = StereoBuffer { left: input.left[start..end].to_vec(), right: input.right[start..end].to_vec() };
            converter.push(&part, &mut out).unwrap();
        }
        converter.finish(&mut out).unwrap();
        out
    }

    /// Amplitude and phase of `freq` in `signal`, by correlation with a quadrature pair.
    fn tone(signal: &[f32], freq: f64, rate: u32) -> (f64, f64) {
        let (mut re, mut im) = (0.0, 0.0);
        for (n, &x) in signal.iter().enumerate() {
            let w = 2.0 * std::f64::consts::PI * freq * n as f64 / f64::from(rate);
            re += f64::from(x) * w.sin();
            im += f64::from(x) * w.cos();
        }
        let scale = 2.0 / signal.len() as f64;
        // x ≈ A·sin(w + φ) = A·cos φ·sin w + A·sin φ·cos w
        ((re * scale).hypot(im * scale), im.atan2(re))
    }

    #[test]
    fn a_resampled_sine_keeps_its_frequency_level_timing_and_length() {
        for (from, to) in [(44_100, 48_000), (48_000, 44_100), (96_000, 48_000), (22_050, 48_000)] {
            let input = sine(1000.0, from, from as usize * 2, 0.5);
            let out = convert(&input, from, to, 1000);
            assert_eq!(out.len() as u64, (input.len() as f64 * f64::from(to) / f64::from(from)).round() as u64);
            // Skip the edges, where the signal starts and stops abruptly.
            let middle = &out.left[to as usize / 4..to as usize * 7 / 4];
            let (amplitude, phase) = tone(middle, 1000.0, to);
            assert!((amplitude - 0.5).abs() < 0.005, "{from}->{to}: amplitude {amplitude}");
            // Same phase relative to the window start as the ideal sine: no added latency.
            let ideal: Vec<f32> = sine(1000.0, to, to as usize * 2, 0.5).left[to as usize / 4..to as usize * 7 / 4].to_vec();
            let (_, ideal_phase) = tone(&ideal, 1000.0, to);
            let error = (phase - ideal_phase + std::f64::consts::PI).rem_euclid(2.0 * std::f64::consts::PI) - std::f64::consts::PI;
            let error_frames = error / (2.0 * std::f64::consts::PI * 1000.0) * f64::from(to);
            assert!(error_frames.abs() < 0.05, "{from}->{to}: timing off by {error_frames:.3} frames");
            // And it is a pure tone: against a sine of the measured level and phase, the rest is far down.
            let residual: f64 = middle
                .iter()
                .enumerate()
                .map(|(n, &x)| {
                    let w = 2.0 * std::f64::consts::PI * 1000.0 * n as f64 / f64::from(to);
                    (f64::from(x) - amplitude * (w + phase).sin()).powi(2)
                })
                .sum::<f64>()
                / middle.len() as f64;
            let snr_db = 10.0 * (amplitude * amplitude / 2.0 / residual).log10();
            assert!(snr_db > 90.0, "{from}->{to}: SNR {snr_db:.1} dB");
        }
    }

    #[test]
    fn same_rate_is_a_bit_exact_passthrough() {
        let input = sine(440.0, 48_000, 10_000, 0.3);
        assert_eq!(convert(&input, 48_000, 48_000, 777), input);
    }
}
