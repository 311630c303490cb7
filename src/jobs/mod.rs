//! Job state and events: the validated job model, the store with its mixer slots and expiry (kept
//! in SQLite so jobs survive restarts), the stems of each project, the layout of the data root,
//! and the subscription core the live streams are built on.

mod db;
mod engine;
mod feed;
mod layout;
mod manager;
mod metrics;
mod model;
mod stems;

pub use db::DbError;
pub use feed::{feed, Scope};
pub use layout::{MediaFile, MediaLayout};
pub use manager::{JobError, Jobs, JobsConfig, OpenError, Submitted, EVENT_BUFFER};
pub use metrics::{Metrics, SubscriberGuard, Transport, MIX_DURATION_BUCKETS};
pub use model::{ErrorCode, InvalidId, JobChange, JobEvent, JobId, JobState, JobStatus, ProjectId, Progress, StemId, Timestamp};
pub use stems::{sanitize_file_name, Stem, StemStore};
