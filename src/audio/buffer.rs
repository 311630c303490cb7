//! The audio every stage passes on: stereo `f32` in two planes, and the block size the whole-mix
//! stages work in.

/// Frames the whole-mix stages (mastering, true peak, export) handle at a time. Each block is a
/// unit of parallel work and a point where cancellation is checked and progress reported; one
/// size for all keeps their progress steps and cancellation latency alike.
pub(crate) const BLOCK: usize = 1 << 16;

/// Stereo audio in two planes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StereoBuffer {
    pub left: Vec<f32>,
    pub right: Vec<f32>,
}

impl StereoBuffer {
    pub fn len(&self) -> usize {
        self.left.len()
    }

    pub fn is_empty(&self) -> bool {
        self.left.is_empty()
    }

    pub fn clear(&mut self) {
        self.left.clear();
        self.right.clear();
    }
}

/// Deterministic white noise in -1..1 (a xorshift generator): test signals with no periodicity.
#[cfg(test)]
pub(crate) fn test_noise(frames: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..frames)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
