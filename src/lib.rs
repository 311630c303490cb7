//! # mixd
//!
//! Mixes and masters uploaded audio stems, and pushes every step of each mix job to browsers live.
//!
//! # Layout
//! - [`audio`]: the mix engine, pure DSP over plain buffers: decode, resample, align, per-track
//!   processing, mastering to a loudness target under a true-peak ceiling, atomic WAV export. It
//!   knows nothing of HTTP, jobs or tokio.
//! - [`ids`]: the project, job and stem ids and the time stamp, which jobs and media both use.
//! - [`media`]: where the bytes of stems and mixes live (the data root, or object storage behind
//!   a local cache), the one owner of every path and key, and output retention. It knows no jobs.
//! - [`jobs`]: job state and events. The validated job model, the one function every change goes
//!   through, the store and its event log, the live view every poll and stream reads, the mixer
//!   slots, the runner that drives the engine off the async runtime, TTL expiry, and the
//!   subscription core every live stream uses.
//! - [`api`]: HTTP. Routes, the `{ok, data, error, message}` envelope and its error codes (in one
//!   place), SSE and WebSocket adapters, media with ranges, metrics and `/openapi.json`.
//! - [`access`]: admin keys and scoped tokens, what each may do; no HTTP in it.
//! - [`webhooks`]: signing, URL rules, the outbox handle and the dispatcher that drains it.
//! - [`config`], [`telemetry`], [`startup`]: configuration (clap, env fallbacks), logging, and
//!   building the server on a listener.
//!
//! Data flows one way: api → jobs → media → ids, and jobs → audio; webhooks → jobs. Only progress
//! callbacks flow back.

pub mod access;
pub mod api;
pub mod audio;
pub mod config;
pub mod ids;
pub mod jobs;
pub mod media;
pub mod startup;
pub mod telemetry;
pub mod webhooks;
