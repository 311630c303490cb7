//! Where jobs are kept, for one node or for a cluster: the embedded SQLite file in the data dir,
//! or PostgreSQL shared by every node. Both keep the same records and follow the same rules,
//! which live here; the two submodules only speak their database's SQL.
//!
//! Every change of a job is a row in the job table and an entry in the event log, written in
//! one transaction with the webhook delivery it causes. The log's cursor is handed out in commit
//! order (PostgreSQL takes a lock for it at the end of the transaction; SQLite has one writer), so
//! a node that reads the log from its last cursor on never skips a change. Queue changes (submit,
//! claim, cancel of a queued job, hand-back, rescue) also take the queue lock first, so positions
//! are exact cluster-wide and one Idempotency-Key makes one job. A mix holds its job under a lease
//! `(owner, attempt)`, and every write it makes is fenced on it: once the lease is gone (expired and
//! rescued, canceled, handed back), nothing the old run writes lands.

mod postgres;
mod sqlite;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::model::{ErrorCode, JobChange, JobEvent, JobId, JobState, JobStatus, ProjectId};
use super::outbox::{AttemptResult, PendingDelivery};
use super::webhook::{Attempt, Delivery, WebhookSpec};
use crate::audio::{StemSource, ValidSettings};

/// Runs a job may begin without ending (its node died or stalled each time) before it is given up.
pub const MAX_INTERRUPTED_RUNS: u32 = 3;
/// How long a node has to finish sending a webhook before another may send it again.
pub const DELIVERY_CLAIM: Duration = Duration::from_secs(60);

/// Which job store, and where.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// The embedded store, in this directory.
    Sqlite(std::path::PathBuf),
    /// `postgres://...`, shared by every node.
    Postgres(String),
}

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
}

/// What a submit came to, with the event-log cursor it was written at (or found at).
pub enum Submitted {
    New(JobStatus),
    Existing(JobStatus),
}

/// A job this node now runs.
pub struct Claim {
    pub lease: Lease,
    /// Its status after the start.
    pub status: JobStatus,
    pub settings: ValidSettings,
    pub stems: Vec<StemSource>,
    pub webhook: Option<WebhookSpec>,
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

/// The changes that put `entries` in queue order with 1-based positions: a rejoining job says it
/// was re-queued, a waiting one whose position moved says where it is now.
pub(super) fn reposition(mut entries: Vec<QueueEntry>) -> Vec<Change> {
    entries.sort_by_key(|entry| entry.order);
    let mut changes = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let position = index as u32 + 1;
        let change = if entry.rejoining { JobChange::Requeued(position) } else { JobChange::QueuePosition(position) };
        if let Ok(next) = entry.status.apply(change) {
            changes.push(Change::new(next, entry.webhook.as_ref(), false));
        }
    }
    changes
}

/// What happens to a job whose run ended without finishing it: `Ok` it rejoins the queue, `Err`
/// the change that gives it up after [`MAX_INTERRUPTED_RUNS`].
pub(super) fn after_interrupted_run(status: &JobStatus, webhook: Option<&WebhookSpec>, interrupted_runs: u32) -> Result<(), Change> {
    if interrupted_runs < MAX_INTERRUPTED_RUNS {
        return Ok(());
    }
    let message = format!("The node running this mix stopped {interrupted_runs} times; it was not run again");
    let failed = status.apply(JobChange::Failed { code: ErrorCode::Interrupted, message }).expect("an unfinished job can fail");
    Err(Change::new(failed, webhook, false))
}

/// The start of a claimed job's run number `attempt`.
pub(super) fn started(status: &JobStatus, webhook: Option<&WebhookSpec>, attempt: u32) -> Option<Change> {
    status.apply(JobChange::Started).ok().map(|next| Change::new(next, webhook, attempt == 1))
}

/// The end of a canceled job, or why it cannot be canceled.
pub(super) fn canceled(status: &JobStatus, webhook: Option<&WebhookSpec>) -> Result<Change, JobError> {
    status.apply(JobChange::canceled()).map(|next| Change::new(next, webhook, false)).map_err(|_| JobError::Finished)
}

pub(super) const TERMINAL_STATES: [&str; 2] = [JobState::Complete.as_str(), JobState::Error.as_str()];

/// The job store: one of the two, behind the same operations.
#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<sqlite::SqliteStore>),
    Postgres(postgres::PgStore),
}

/// Calls the same method on whichever store this is.
macro_rules! each_store {
    ($self:expr, $store:ident => $call:expr) => {
        match $self {
            Store::Sqlite($store) => $call,
            Store::Postgres($store) => $call,
        }
    };
}

impl Store {
    /// Opens the store and applies its migrations (PostgreSQL: under a lock, so nodes starting
    /// together take turns). A SQLite store belongs to this one process: every lease in it is left
    /// from an earlier run and is expired at once.
    pub async fn open(location: &StoreLocation) -> Result<Self, StoreError> {
        Ok(match location {
            StoreLocation::Sqlite(dir) => Store::Sqlite(Arc::new(sqlite::SqliteStore::open(dir).await?)),
            StoreLocation::Postgres(url) => Store::Postgres(postgres::PgStore::open(url).await?),
        })
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Queues a job, or finds the one its Idempotency-Key already made.
    pub async fn submit(&self, job: NewJob) -> Result<Submitted, StoreError> {
        each_store!(self, store => store.submit(job).await)
    }

    /// A job's current status straight from the database.
    pub async fn find(&self, job_id: JobId) -> Result<Option<LoggedEvent>, StoreError> {
        each_store!(self, store => store.find(job_id).await)
    }

    /// Takes the oldest queued job for `owner`, leased for `lease`.
    pub async fn claim(&self, owner: Uuid, lease: Duration) -> Result<Option<Claim>, StoreError> {
        each_store!(self, store => store.claim(owner, lease).await)
    }

    /// Writes the next status of a leased job; `false` when the lease is gone (nothing written).
    pub async fn write(&self, lease: Lease, previous_seq: u64, change: &Change) -> Result<bool, StoreError> {
        each_store!(self, store => store.write(lease, previous_seq, change).await)
    }

    /// Extends a lease; `false` when it is gone.
    pub async fn renew(&self, job_id: JobId, lease: Lease, duration: Duration) -> Result<bool, StoreError> {
        each_store!(self, store => store.renew(job_id, lease, duration).await)
    }

    /// Puts a leased job back in the queue at once, not counted as an interrupted run.
    pub async fn hand_back(&self, job_id: JobId, lease: Lease) -> Result<bool, StoreError> {
        each_store!(self, store => store.hand_back(job_id, lease).await)
    }

    /// Re-queues (or gives up on) every job whose lease has expired; returns how many.
    pub async fn rescue(&self) -> Result<usize, StoreError> {
        each_store!(self, store => store.rescue().await)
    }

    pub async fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        each_store!(self, store => store.cancel(project, job_id).await)
    }

    /// Up to `limit` log entries after `cursor`, in order.
    pub async fn events_after(&self, cursor: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError> {
        each_store!(self, store => store.events_after(cursor, limit).await)
    }

    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        each_store!(self, store => store.snapshot().await)
    }

    /// Removes finished jobs, their log entries and their ended deliveries.
    pub async fn delete_finished(&self, job_ids: &[JobId]) -> Result<(), StoreError> {
        each_store!(self, store => store.delete_finished(job_ids).await)
    }

    /// Answers when the database can be reached.
    pub async fn ping(&self) -> Result<(), StoreError> {
        each_store!(self, store => store.ping().await)
    }

    /// Waits until the log may hold entries after `cursor`: a notification (PostgreSQL, from any
    /// node) or a local write (SQLite). Returns `false` when notifications may have been missed
    /// (the listener reconnected), so the caller reads the log again either way.
    pub async fn changed(&self) -> bool {
        each_store!(self, store => store.changed().await)
    }

    /// The webhook secret kept in the store, made by `generate` the first time.
    pub async fn webhook_secret(&self, generate: impl FnOnce() -> String + Send + 'static) -> Result<String, StoreError> {
        each_store!(self, store => store.webhook_secret(generate).await)
    }

    /// Claims up to `limit` deliveries due at `now_ms` for [`DELIVERY_CLAIM`].
    pub async fn due_deliveries(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingDelivery>, StoreError> {
        each_store!(self, store => store.due_deliveries(now_ms, limit).await)
    }

    /// When the next delivery becomes due (unix ms), if any.
    pub async fn next_delivery_due(&self) -> Result<Option<i64>, StoreError> {
        each_store!(self, store => store.next_delivery_due().await)
    }

    pub async fn record_attempt(&self, delivery: &PendingDelivery, result: &AttemptResult) -> Result<(), StoreError> {
        each_store!(self, store => store.record_attempt(delivery, result).await)
    }

    pub async fn attempts(&self, job_id: JobId) -> Result<Vec<Attempt>, StoreError> {
        each_store!(self, store => store.attempts(job_id).await)
    }

    /// Pending deliveries, and when the oldest was made (unix ms).
    pub async fn delivery_backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        each_store!(self, store => store.delivery_backlog().await)
    }

    /// A delivery made by hand, for the dispatcher's tests.
    #[cfg(test)]
    pub async fn add_delivery(&self, delivery: Delivery) {
        each_store!(self, store => store.add_delivery(delivery).await)
    }
}

/// The SQLite file inside the layout's database directory.
pub fn sqlite_file(dir: &Path) -> std::path::PathBuf {
    dir.join("jobs.sqlite3")
}

/// The settings column. Rows written before settings were stored validated hold plain
/// [`crate::audio::MixSettings`]; `ValidSettings` refuses unknown fields, so neither passes for the other.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StoredSettings {
    Valid(ValidSettings),
    Legacy(crate::audio::MixSettings),
}

/// A job's settings and stems as stored, ready to run. Legacy settings are planned against the
/// stems, as the version that wrote them would have done.
pub(super) fn parse_job_inputs(settings: &str, stems: &str, webhook: Option<&str>) -> Result<(ValidSettings, Vec<StemSource>, Option<WebhookSpec>), StoreError> {
    let stems: Vec<StemSource> = serde_json::from_str(stems)?;
    let settings = match serde_json::from_str(settings)? {
        StoredSettings::Valid(settings) => settings,
        StoredSettings::Legacy(settings) => crate::audio::plan(&stems, settings).map_err(|err| StoreError::Corrupt(format!("legacy settings do not plan: {err}")))?,
    };
    let webhook = webhook.map(serde_json::from_str).transpose()?;
    Ok((settings, stems, webhook))
}

pub fn unix_millis(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn rfc3339(millis: i64) -> String {
    use chrono::{DateTime, SecondsFormat, Utc};
    DateTime::<Utc>::from_timestamp_millis(millis).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}
