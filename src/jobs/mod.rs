//! Job state and events: the validated job model, the store with its mixer slots and expiry (kept
//! in SQLite so jobs survive restarts), the webhook outbox written with each change, the stems of
//! each project, the layout of the data root, and the subscription core the live streams are
//! built on.

mod db;
mod engine;
mod feed;
mod layout;
mod manager;
mod metrics;
mod model;
mod outbox;
mod stems;
mod webhook;

#[cfg(test)]
pub use db::TestDb;
pub use db::{unix_millis, DbError};
pub use feed::{feed, Scope};
pub use layout::{MediaFile, MediaLayout};
pub use manager::{JobError, Jobs, JobsConfig, OpenError, Submitted, EVENT_BUFFER};
pub use metrics::{Metrics, SubscriberGuard, Transport, MIX_DURATION_BUCKETS, WEBHOOK_OUTCOMES};
pub use model::{ErrorCode, InvalidId, JobChange, JobEvent, JobId, JobState, JobStatus, Progress, ProjectId, StemId, Timestamp};
pub use outbox::{AttemptResult, Outbox, PendingDelivery};
pub use stems::{sanitize_file_name, Stem, StemStore};
pub use webhook::{Attempt, WebhookEvent, WebhookSpec};
