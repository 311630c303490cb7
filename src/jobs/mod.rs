//! Job state and events: the validated job model, the store with its mixer slots and expiry (kept
//! in SQLite so jobs survive restarts), the stems of each project, and the subscription core the
//! live streams are built on.

mod db;
mod engine;
mod feed;
mod manager;
mod metrics;
mod model;
mod stems;

pub use db::DbError;
pub use feed::{feed, Scope};
pub use manager::{result_url, JobError, Jobs, JobsConfig, OpenError, Submitted, EVENT_BUFFER};
pub use metrics::{Metrics, SubscriberGuard, Transport, MIX_DURATION_BUCKETS};
pub use model::{
    ErrorCode, JobChange, JobEvent, JobId, JobState, JobStatus, ProjectId, Progress, StemId, Timestamp, INVALID_JOB_ID, INVALID_PROJECT_ID,
    INVALID_STEM_ID,
};
pub use stems::{sanitize_file_name, Stem, StemStore};
