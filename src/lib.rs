//! # mixd
//!
//! Mixes and masters uploaded audio stems, and pushes every step of each mix job to browsers live.
//!
//! # Layout
//! - [`audio`]: the mix engine, pure DSP over plain buffers (decode, resample, align, per-track
//!   processing, mastering to a loudness target under a true-peak ceiling, WAV export).
pub mod audio;
