//! The records every store keeps and hands out: a job as it is queued, claimed and leased, the
//! event log's entries, the webhook outbox's rows, and what can go wrong reaching them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::audio::{StemSource, ValidSettings};
use crate::ids::{JobId, ProjectId};
use crate::jobs::model::{JobEvent, JobStatus};
use crate::jobs::webhook::{Delivery, WebhookSpec};

/// How long a node has to finish sending a webhook before another may send it again.
pub const DELIVERY_CLAIM: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job database: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("job database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("job database record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("job database directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("job database record: {0}")]
    Corrupt(String),
    /// A statement's work panicked (a bug); the store itself is unharmed.
    #[error("job database call failed: {0}")]
    Panicked(String),
}

impl StoreError {
    /// Whether the database could not be reached at all (rather than refusing a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Postgres(err) => {
                matches!(err, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed)
                    // 57P: shut down or terminated; 08: connection failures; 25P03: a session
                    // ended for idling in a transaction (this node stalled inside one).
                    || err.as_database_error().and_then(|db| db.code()).is_some_and(|code| code.starts_with("57P") || code.starts_with("08") || code == "25P03")
            }
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(err, _)) => {
                matches!(err.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked | rusqlite::ErrorCode::CannotOpen)
            }
            _ => false,
        }
    }
}

/// The run of a job one node holds: every write of that run is fenced on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Unique per process run.
    pub owner: Uuid,
    /// Runs begun so far, this one included.
    pub attempt: u32,
}

/// A job to queue.
pub struct NewJob {
    pub job_id: JobId,
    pub project: ProjectId,
    pub settings: ValidSettings,
    pub stems: Vec<StemSource>,
    pub idempotency_key: Option<String>,
    pub webhook: Option<WebhookSpec>,
    /// The most jobs its project may have waiting: past it the job is refused.
    pub queue_cap: u32,
}

/// What a submit came to: the job it queued, the one its Idempotency-Key had made before, or
/// nothing: its project already had `cap` jobs waiting.
pub enum Submitted {
    New(JobStatus),
    Existing(JobStatus),
    QueueFull { cap: u32 },
}

/// A job this node now runs.
pub struct Claim {
    pub lease: Lease,
    /// Its status after the start.
    pub status: JobStatus,
    pub settings: StoredSettings,
    pub stems: Vec<StemSource>,
    pub webhook: Option<WebhookSpec>,
}

/// The settings column. Rows written before settings were stored validated hold plain
/// [`crate::audio::MixSettings`], which the run plans against the stems as the version that wrote
/// them would have; `ValidSettings` refuses unknown fields, so neither passes for the other.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum StoredSettings {
    Valid(ValidSettings),
    Legacy(crate::audio::MixSettings),
}

/// One entry of the event log: a job's status as it was published.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub cursor: u64,
    pub json: String,
}

impl LoggedEvent {
    pub fn parse(self) -> Result<Arc<JobEvent>, StoreError> {
        let status: JobStatus = serde_json::from_str(&self.json)?;
        Ok(JobEvent::logged(status, self.json.into_boxed_str(), self.cursor))
    }
}

/// Every job's current status, and the log position they were read at.
pub struct Snapshot {
    pub head: u64,
    pub jobs: Vec<LoggedEvent>,
}

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job not found")]
    NotFound,
    #[error("the job has already finished")]
    Finished,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A status change about to be written, serialised once, with the delivery it causes.
pub struct Change {
    pub event: Arc<JobEvent>,
    pub delivery: Option<Delivery>,
}

impl Change {
    /// `first_run`: the job had not been started before (a re-run is not a new start).
    pub fn new(status: JobStatus, webhook: Option<&WebhookSpec>, first_run: bool) -> Self {
        let event = JobEvent::new(status);
        let delivery = webhook.and_then(|webhook| Delivery::caused_by(webhook, &event, first_run));
        Self { event, delivery }
    }

    pub fn status(&self) -> &JobStatus {
        &self.event.status
    }
}

/// A row in the queue, or one about to rejoin it.
pub(super) struct QueueEntry {
    pub order: i64,
    pub status: JobStatus,
    pub webhook: Option<WebhookSpec>,
    /// Running until now: rejoins the queue in its old place (it was submitted then).
    pub rejoining: bool,
}

/// A delivery waiting for its next attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelivery {
    pub id: String,
    pub job_id: String,
    pub url: String,
    pub message_type: String,
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub attempted_at_ms: i64,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    /// When to try again; None ends the delivery with `outcome`.
    pub next_attempt_at_ms: Option<i64>,
    pub outcome: Option<&'static str>,
}

/// The SQLite file inside the layout's database directory.
pub fn sqlite_file(dir: &Path) -> std::path::PathBuf {
    dir.join("jobs.sqlite3")
}

/// Where a store keeps its epoch: made once, when the store is made, so that a store that is
/// replaced (a new database, a reset file) starts a new epoch and cursors of the old one are known
/// to be foreign.
pub(super) const EPOCH_KEY: &str = "store_epoch";

/// A fresh epoch: eight hex digits of a v4 UUID's random bits.
pub(super) fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

pub fn unix_millis(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn rfc3339(millis: i64) -> String {
    use chrono::{DateTime, SecondsFormat, Utc};
    DateTime::<Utc>::from_timestamp_millis(millis).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}
