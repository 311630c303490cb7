//! # mixd
//!
//! Mixes and masters uploaded audio stems, and pushes every step of each mix job to browsers live.
//!
//! # Layout
//! - [`audio`]: the mix engine, pure DSP over plain buffers: decode, resample, align, per-track
//!   processing, mastering to a loudness target under a true-peak ceiling, atomic WAV export. It
//!   knows nothing of HTTP, jobs or tokio.
//! - [`jobs`]: job state and events. The validated job model, the one function every change goes
//!   through, the mixer slots (a FIFO queue), the runner that drives the engine off the async
//!   runtime, TTL expiry, the stem store, and the subscription core every live stream uses.
//! - [`api`]: HTTP. Routes, the `{ok, data, error, message}` envelope and its error codes (in one
//!   place), SSE and WebSocket adapters, media with ranges, metrics and `/openapi.json`.
//! - [`access`]: admin keys and scoped tokens, what each may do; no HTTP in it.
//! - [`webhooks`]: signing, URL rules and the dispatcher that drains the job store's outbox.
//! - [`config`], [`telemetry`], [`startup`]: configuration (clap, env fallbacks), logging, and
//!   building the server on a listener.
//!
//! Data flows one way: api → jobs → audio. Only progress callbacks flow back.

pub mod access;
pub mod api;
pub mod audio;
pub mod config;
pub mod jobs;
pub mod startup;
pub mod telemetry;
pub mod webhooks;
