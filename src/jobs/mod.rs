//! Job state and events: the validated job model, the store (embedded SQLite, or PostgreSQL shared
//! by a cluster) with the event log every node follows, this node's mixer slots and leases, expiry,
//! the webhook outbox written with each change, the stems of each project, the layout of the data
//! root, and the subscription core the live streams are built on.

mod cache;
mod engine;
mod feed;
mod follow;
mod layout;
mod manager;
mod metrics;
mod model;
mod objects;
mod outbox;
mod retention;
mod runner;
mod stems;
mod store;
mod webhook;

pub use cache::StemCache;
pub use feed::{feed, Resume, Scope};
pub use layout::{keys, MediaLayout, MediaName};
pub use manager::{JobError, Jobs, JobsConfig, OpenError, EVENT_BUFFER};
pub use metrics::{LeaseEvent, Metrics, SubscriberGuard, Transport, LEASE_EVENTS, MIX_DURATION_BUCKETS, WEBHOOK_OUTCOMES};
pub use model::{ErrorCode, InvalidId, JobChange, JobEvent, JobId, JobState, JobStatus, Progress, ProjectId, StemId, Timestamp, FRAMINGS};
pub use objects::{MediaError, ObjectInfo, ObjectKey, ObjectMedia, StorageUrl};
pub use outbox::{AttemptResult, Outbox, PendingDelivery};
pub use stems::{sanitize_file_name, Stem, StemStore};
pub use store::{sqlite_file, unix_millis, Store, StoreError, StoreLocation, Submitted};
#[cfg(test)]
pub(crate) use webhook::Delivery;
pub use webhook::{Attempt, WebhookEvent, WebhookSpec};
