//! Where jobs are kept, for one node or for a cluster: the embedded SQLite file in the data dir,
//! or PostgreSQL shared by every node, behind one [`Store`]. Both keep the same records
//! (`records`) and follow the same rules (`rules`); `sqlite` and `postgres` only speak their
//! database's SQL.
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
mod records;
mod rules;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

pub use records::{
    sqlite_file, unix_millis, AttemptResult, Change, Claim, JobError, Lease, LoggedEvent, NewJob, PendingDelivery, Snapshot, StoreError, StoredSettings, Submitted,
};

use super::model::JobStatus;
use super::webhook::Attempt;
#[cfg(test)]
use super::webhook::Delivery;
use crate::ids::{JobId, ProjectId, StemId};

/// Which job store, and where.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// The embedded store, in this directory.
    Sqlite(std::path::PathBuf),
    /// `postgres://...`, shared by every node.
    Postgres(String),
}

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

    /// The store's epoch: event-log cursors mean something only within it.
    pub fn epoch(&self) -> &str {
        each_store!(self, store => store.epoch())
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Postgres(_))
    }

    /// Queues a job, or finds the one its Idempotency-Key already made.
    pub async fn submit(&self, job: NewJob) -> Result<Submitted, StoreError> {
        each_store!(self, store => store.submit(job).await)
    }

    /// Whether the bytes of `project`'s stems are on record.
    pub async fn usage_known(&self, project: &ProjectId) -> Result<bool, StoreError> {
        let project = project.clone();
        each_store!(self, store => store.usage_known(project).await)
    }

    /// Records `stems` (ids and bytes) as `project`'s usage, unless it is on record already.
    pub async fn start_usage(&self, project: &ProjectId, stems: Vec<(StemId, u64)>) -> Result<(), StoreError> {
        let project = project.clone();
        each_store!(self, store => store.start_usage(project, stems).await)
    }

    /// Records a stored stem's bytes, reserved before it was stored, as its own.
    pub async fn count_stem(&self, project: &ProjectId, stem_id: StemId, bytes: u64) -> Result<(), StoreError> {
        let project = project.clone();
        each_store!(self, store => store.count_stem(project, stem_id, bytes).await)
    }

    /// Gives a deleted stem's bytes back to its project, once however many delete it.
    pub async fn forget_stem(&self, stem_id: StemId) -> Result<(), StoreError> {
        each_store!(self, store => store.forget_stem(stem_id).await)
    }

    /// Adds `bytes` to `project`'s usage if that keeps it within `quota`; `false`: refused.
    pub async fn reserve_bytes(&self, project: &ProjectId, bytes: u64, quota: u64) -> Result<bool, StoreError> {
        let project = project.clone();
        each_store!(self, store => store.reserve_bytes(project, bytes, quota).await)
    }

    pub async fn release_bytes(&self, project: &ProjectId, bytes: u64) -> Result<(), StoreError> {
        let project = project.clone();
        each_store!(self, store => store.release_bytes(project, bytes).await)
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

    /// Ends a leased job whose run failed unexpectedly (`INTERNAL`); `false` when the lease is gone.
    pub async fn fail_run(&self, job_id: JobId, lease: Lease) -> Result<bool, StoreError> {
        each_store!(self, store => store.fail_run(job_id, lease).await)
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

    /// The server setting `name` kept in the store (a generated secret), made by `generate` the
    /// first time; nodes starting together agree on one.
    pub async fn setting(&self, name: &'static str, generate: impl FnOnce() -> String + Send + 'static) -> Result<String, StoreError> {
        each_store!(self, store => store.setting(name, generate).await)
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
