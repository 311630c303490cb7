//! Job state and events: the validated job model, the store (embedded SQLite, or PostgreSQL shared
//! by a cluster) with the event log every node follows and the webhook deliveries each change
//! causes, this node's live view of every job, its mixer slots and leases, expiry, and the
//! subscription core the live streams are built on.
//!
//! `manager` ([`Jobs`]) is the handle the API uses and the one module that points down at the
//! others: `follow` reads the log into `live`, `runner` runs claimed jobs (tracked in `runs`) on
//! the `engine`'s threads, `retention` expires finished jobs, `feed` serves subscribers from `live`.

mod engine;
mod feed;
mod follow;
mod live;
mod manager;
mod metrics;
mod model;
mod retention;
mod runner;
mod runs;
mod store;
mod webhook;

pub use feed::{feed, Resume, Scope};
pub use manager::{JobError, Jobs, JobsConfig, OpenError, EVENT_BUFFER};
pub use metrics::{LeaseEvent, Metrics, SubscriberGuard, Transport, LEASE_EVENTS, MIX_DURATION_BUCKETS, REFUSALS, WEBHOOK_OUTCOMES};
pub use model::{ErrorCode, JobChange, JobEvent, JobState, JobStatus, Progress, FRAMINGS};
pub use store::{sqlite_file, unix_millis, AttemptResult, PendingDelivery, Store, StoreError, StoreLocation, Submitted};
#[cfg(test)]
pub(crate) use webhook::Delivery;
pub use webhook::{Attempt, WebhookEvent, WebhookSpec};
