//! Integration tests: each starts the real server on port 0 with its own data directory and talks
//! to it over real HTTP, SSE and WebSocket. One binary, as zero2prod does, so it links once.

mod abuse;
mod access;
mod cluster;
#[path = "../../benches/common/mod.rs"]
mod common;
mod corpus;
mod deliverables;
mod disk_full;
mod engine;
mod errors;
mod fair_use;
mod helpers;
mod jobs;
mod limits;
mod load;
mod matching;
mod media;
mod objects;
mod restart;
mod soak;
mod sse;
mod stems;
mod streams;
mod webhooks;
