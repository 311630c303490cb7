//! The embedded store: one SQLite file in WAL mode, one writing connection and two reading
//! ones beside it, every statement off the runtime. WAL with `synchronous=NORMAL` makes each commit survive a crash of the process (kill -9
//! included) without an fsync per progress update; a power cut may lose the last commits, which a
//! restart then re-runs. The file lives in the layout's database directory, which `/media` cannot
//! reach. One process owns the file, so leases use this machine's clock and every lease found at
//! start is from a dead run.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::Notify;
use uuid::Uuid;

use super::records::{
    new_epoch, rfc3339, sqlite_file, unix_millis, AttemptResult, Change, Claim, JobError, Lease, LoggedEvent, NewJob, PendingDelivery, QueueEntry, Snapshot, StoreError,
    Submitted, DELIVERY_CLAIM, EPOCH_KEY,
};
use super::rules::{
    after_interrupted_run, canceled, damaged, moved, parse_job_inputs, parse_webhook, place_of_new_job, reposition, run_failed, started, LastClaims, Waiting,
    TERMINAL_STATES,
};
use crate::ids::{JobId, ProjectId, StemId};
use crate::jobs::model::{JobState, JobStatus};
use crate::jobs::webhook::{Attempt, Delivery, WebhookSpec};

pub struct SqliteStore {
    /// The one writer: SQLite takes one write transaction at a time anyway.
    conn: Arc<Mutex<Connection>>,
    /// Connections for reads, which under WAL go on beside the writer instead of queueing behind
    /// it on one mutex: the log reader's read of a change waited for the write transaction after
    /// it, and every status poll that misses memory for the claim before it.
    readers: Arc<[Mutex<Connection>]>,
    next_reader: AtomicUsize,
    written: Arc<Notify>,
    epoch: String,
}

/// Read connections: the log reader, and a poll or an outbox read at a time beside it.
const READERS: usize = 2;

/// Schema versions, applied in order inside one transaction each; `PRAGMA user_version` says how
/// many have been. Version 1 is the layout of the first release, created if missing.
const MIGRATIONS: [&str; 4] = [
    "CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        settings TEXT NOT NULL,
        stems TEXT NOT NULL,
        idempotency_key TEXT,
        attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS webhook_deliveries (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        message_type TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER,
        outcome TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS webhook_attempts (
        delivery_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        attempted_at INTEGER NOT NULL,
        http_status INTEGER,
        error TEXT,
        next_attempt_at INTEGER,
        PRIMARY KEY (delivery_id, attempt)
    );
    CREATE TABLE IF NOT EXISTS server_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // Cluster-era columns: the fields rules query, the lease, the queue order and the event log.
    // A job that was running when the previous version stopped gets a lease that has expired.
    "ALTER TABLE jobs ADD COLUMN project_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN state TEXT NOT NULL DEFAULT 'queued';
    ALTER TABLE jobs ADD COLUMN seq INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE jobs ADD COLUMN queue_order INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN handed_back INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at INTEGER;
    UPDATE jobs SET project_id = json_extract(status, '$.project_id'), state = json_extract(status, '$.state'),
        seq = json_extract(status, '$.seq'), queue_order = rowid;
    UPDATE jobs SET lease_owner = '00000000-0000-0000-0000-000000000000', lease_expires_at = 0
        WHERE state NOT IN ('queued', 'complete', 'error');
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_queue ON jobs (queue_order) WHERE state = 'queued';
    CREATE TABLE job_events (cursor INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, status TEXT NOT NULL);
    CREATE INDEX job_events_job ON job_events (job_id, cursor);
    INSERT INTO job_events (job_id, status) SELECT job_id, status FROM jobs ORDER BY queue_order;
    ALTER TABLE webhook_deliveries ADD COLUMN claimed_until INTEGER;
    CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;",
    // The position a waiting job's status shows, so that a queue change reads the queue's order
    // and positions without parsing every waiting job's status.
    "ALTER TABLE jobs ADD COLUMN queue_position INTEGER;
    UPDATE jobs SET queue_position = json_extract(status, '$.queue_position') WHERE state = 'queued';",
    // Fair use: each project's last claim, by a number every claim raises (rules.rs), and the
    // bytes of its stems, which an upload reserves before its stem is stored (--project-quota-gb).
    "CREATE TABLE project_claims (project_id TEXT PRIMARY KEY, last_claim INTEGER NOT NULL);
    CREATE INDEX jobs_queued_by_project ON jobs (project_id) WHERE state = 'queued';
    CREATE TABLE project_usage (project_id TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
    CREATE TABLE stem_usage (stem_id TEXT PRIMARY KEY, project_id TEXT NOT NULL, bytes INTEGER NOT NULL);",
];

/// Adds the `webhook` column to a first-release database that predates it, before the migrations.
fn add_webhook_column(conn: &Connection) -> rusqlite::Result<()> {
    let has_jobs: bool = conn.prepare("SELECT 1 FROM sqlite_master WHERE name = 'jobs'")?.exists([])?;
    let has_webhook: bool = conn.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'webhook'")?.exists([])?;
    if has_jobs && !has_webhook {
        conn.execute_batch("ALTER TABLE jobs ADD COLUMN webhook TEXT")?;
    }
    Ok(())
}

fn now_ms() -> i64 {
    unix_millis(SystemTime::now())
}

impl SqliteStore {
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || -> Result<(Connection, Vec<Mutex<Connection>>, String), StoreError> {
            std::fs::create_dir_all(&dir)?;
            let mut conn = Connection::open(sqlite_file(&dir))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.busy_timeout(Duration::from_secs(5))?;
            migrate(&mut conn)?;
            // Whatever held a lease or a delivery in here was an earlier run of this process.
            conn.execute("UPDATE jobs SET lease_expires_at = 0 WHERE lease_owner IS NOT NULL", [])?;
            conn.execute("UPDATE webhook_deliveries SET claimed_until = NULL", [])?;
            conn.execute("INSERT OR IGNORE INTO server_settings (key, value) VALUES (?1, ?2)", params![EPOCH_KEY, new_epoch()])?;
            let epoch = conn.query_row("SELECT value FROM server_settings WHERE key = ?1", params![EPOCH_KEY], |row| row.get(0))?;
            let readers = (0..READERS)
                .map(|_| -> Result<Mutex<Connection>, StoreError> {
                    let reader = Connection::open_with_flags(sqlite_file(&dir), OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
                    reader.busy_timeout(Duration::from_secs(5))?;
                    Ok(Mutex::new(reader))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((conn, readers, epoch))
        })
        .await
        .expect("opening the database does not panic")?;
        let (conn, readers, epoch) = conn;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), readers: readers.into(), next_reader: AtomicUsize::new(0), written: Arc::default(), epoch })
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Runs `work` on the connection, off the runtime.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        // A panic while the connection is held unwinds through the open transaction, whose drop
        // rolls it back: the connection is whole again, and the panic costs its one call.
        let ran = tokio::task::spawn_blocking(move || work(&mut conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner))).await;
        ran.unwrap_or_else(|panic| Err(StoreError::Panicked(panic.to_string())))
    }

    /// Runs `work`, which only reads, on a read connection off the runtime. Under WAL a read sees
    /// every transaction committed before it began, whichever connection wrote it.
    async fn read<T: Send + 'static>(&self, work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let reader = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
        let ran = tokio::task::spawn_blocking(move || work(&mut readers[reader].lock().unwrap_or_else(std::sync::PoisonError::into_inner))).await;
        ran.unwrap_or_else(|panic| Err(StoreError::Panicked(panic.to_string())))
    }

    /// Runs `work` in one write transaction and wakes the log's reader as it commits: from the
    /// blocking thread, not after the writing task is next polled, which under load waits its turn
    /// behind every subscriber task of the change before.
    async fn write_transaction<T: Send + 'static>(&self, work: impl FnOnce(&Transaction) -> Result<T, StoreError> + Send + 'static) -> Result<T, StoreError> {
        let written = self.written.clone();
        self.run(move |conn| {
            let transaction = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let result = work(&transaction)?;
            transaction.commit()?;
            written.notify_one();
            Ok(result)
        })
        .await
    }

    pub async fn submit(&self, job: NewJob) -> Result<Submitted, StoreError> {
        self.write_transaction(move |tx| {
            if let Some(key) = &job.idempotency_key {
                let existing: Option<String> = tx
                    .prepare_cached("SELECT status FROM jobs WHERE project_id = ?1 AND idempotency_key = ?2")?
                    .query_row(params![job.project.as_str(), key], |row| row.get(0))
                    .optional()?;
                if let Some(status) = existing {
                    return Ok(Submitted::Existing(serde_json::from_str(&status)?));
                }
            }
            let in_project: u32 =
                tx.prepare_cached("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND project_id = ?1")?.query_row(params![job.project.as_str()], |row| row.get(0))?;
            if in_project >= job.queue_cap {
                return Ok(Submitted::QueueFull { cap: job.queue_cap });
            }
            let queue = tx
                .prepare_cached("SELECT project_id, queue_order FROM jobs WHERE state = 'queued'")?
                .query_map([], |row| Ok(Waiting { key: (), project: row.get(0)?, order: row.get(1)?, shown: None }))?
                .collect::<Result<Vec<_>, _>>()?;
            let place = place_of_new_job(queue, job.project.as_str(), &last_claims(tx, Some(job.project.as_str()))?);
            let change = Change::new(JobStatus::queued(job.job_id, job.project.clone(), place), None, false);
            tx.prepare_cached(
                "INSERT INTO jobs (job_id, project_id, state, seq, status, settings, stems, idempotency_key, webhook, queue_position, queue_order)
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, (SELECT COALESCE(MAX(queue_order), 0) + 1 FROM jobs))",
            )?
            .execute(params![
                job.job_id.to_string(),
                job.project.as_str(),
                change.status().seq(),
                &*change.event.json,
                serde_json::to_string(&job.settings)?,
                serde_json::to_string(&job.stems)?,
                job.idempotency_key,
                job.webhook.as_ref().map(serde_json::to_string).transpose()?,
                change.status().queue_position()
            ])?;
            append_event(tx, &change)?;
            // The jobs it went ahead of move back.
            requeue(tx, Vec::new())?;
            Ok(Submitted::New(change.event.status.clone()))
        })
        .await
    }

    pub async fn usage_known(&self, project: ProjectId) -> Result<bool, StoreError> {
        self.read(move |conn| Ok(conn.prepare_cached("SELECT 1 FROM project_usage WHERE project_id = ?1")?.exists(params![project.as_str()])?)).await
    }

    pub async fn start_usage(&self, project: ProjectId, stems: Vec<(StemId, u64)>) -> Result<(), StoreError> {
        self.write_transaction(move |tx| {
            let total: u64 = stems.iter().map(|(_, bytes)| bytes).sum();
            let started = tx
                .prepare_cached("INSERT INTO project_usage (project_id, bytes) VALUES (?1, ?2) ON CONFLICT (project_id) DO NOTHING")?
                .execute(params![project.as_str(), total as i64])?;
            if started == 1 {
                for (stem_id, bytes) in stems {
                    count_stem(tx, &project, stem_id, bytes)?;
                }
            }
            Ok(())
        })
        .await
    }

    pub async fn count_stem(&self, project: ProjectId, stem_id: StemId, bytes: u64) -> Result<(), StoreError> {
        self.write_transaction(move |tx| count_stem(tx, &project, stem_id, bytes)).await
    }

    pub async fn forget_stem(&self, stem_id: StemId) -> Result<(), StoreError> {
        self.write_transaction(move |tx| {
            let counted: Option<(String, i64)> = tx
                .prepare_cached("DELETE FROM stem_usage WHERE stem_id = ?1 RETURNING project_id, bytes")?
                .query_row(params![stem_id.to_string()], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            if let Some((project, bytes)) = counted {
                tx.prepare_cached("UPDATE project_usage SET bytes = MAX(bytes - ?2, 0) WHERE project_id = ?1")?.execute(params![project, bytes])?;
            }
            Ok(())
        })
        .await
    }

    pub async fn reserve_bytes(&self, project: ProjectId, bytes: u64, quota: u64) -> Result<bool, StoreError> {
        self.write_transaction(move |tx| {
            let reserved = tx.prepare_cached("UPDATE project_usage SET bytes = bytes + ?2 WHERE project_id = ?1 AND bytes + ?2 <= ?3")?.execute(params![
                project.as_str(),
                bytes as i64,
                quota.min(i64::MAX as u64) as i64
            ])?;
            Ok(reserved == 1)
        })
        .await
    }

    pub async fn release_bytes(&self, project: ProjectId, bytes: u64) -> Result<(), StoreError> {
        self.write_transaction(move |tx| {
            tx.prepare_cached("UPDATE project_usage SET bytes = MAX(bytes - ?2, 0) WHERE project_id = ?1")?.execute(params![project.as_str(), bytes as i64])?;
            Ok(())
        })
        .await
    }

    pub async fn find(&self, job_id: JobId) -> Result<Option<LoggedEvent>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT status, (SELECT MAX(cursor) FROM job_events e WHERE e.job_id = j.job_id) FROM jobs j WHERE job_id = ?1")?
                .query_row(params![job_id.to_string()], |row| Ok(LoggedEvent { json: row.get(0)?, cursor: row.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64 }))
                .optional()?)
        })
        .await
    }

    pub async fn claim(&self, owner: Uuid, lease: Duration) -> Result<Option<Claim>, StoreError> {
        self.write_transaction(move |tx| {
            let row = tx
                .prepare_cached(
                    "SELECT j.job_id, j.status, j.settings, j.stems, j.webhook, j.attempts, j.project_id FROM jobs j LEFT JOIN project_claims c ON c.project_id = j.project_id
                     WHERE j.state = 'queued' ORDER BY COALESCE(c.last_claim, 0), j.queue_order LIMIT 1",
                )?
                .query_row([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, Option<String>>(4)?,
                        row.get::<_, u32>(5)?,
                        row.get::<_, String>(6)?,
                    ))
                })
                .optional()?;
            let Some((job_id, status, settings, stems, webhook, attempts, project)) = row else { return Ok(None) };
            let status: JobStatus = serde_json::from_str(&status)?;
            let (settings, stems, webhook) = match parse_job_inputs(&settings, &stems, webhook.as_deref()) {
                Ok(inputs) => inputs,
                Err(err) => {
                    write_status(tx, &damaged(&job_id, &status, &err), true)?;
                    requeue(tx, Vec::new())?;
                    return Ok(None);
                }
            };
            let attempt = attempts + 1;
            let change = started(&status, webhook.as_ref(), attempt).ok_or_else(|| StoreError::Corrupt(format!("queued job {job_id} cannot start")))?;
            write_status(tx, &change, false)?;
            // The project goes to the back of the rotation.
            tx.prepare_cached(
                "INSERT INTO project_claims (project_id, last_claim) VALUES (?1, (SELECT COALESCE(MAX(last_claim), 0) + 1 FROM project_claims))
                 ON CONFLICT (project_id) DO UPDATE SET last_claim = excluded.last_claim",
            )?
            .execute(params![project])?;
            tx.prepare_cached("UPDATE jobs SET attempts = ?2, lease_owner = ?3, lease_expires_at = ?4 WHERE job_id = ?1")?.execute(params![
                job_id,
                attempt,
                owner.to_string(),
                now_ms() + lease.as_millis() as i64
            ])?;
            requeue(tx, Vec::new())?;
            Ok(Some(Claim { lease: Lease { owner, attempt }, status: change.event.status.clone(), settings, stems, webhook }))
        })
        .await
    }

    pub async fn write(&self, lease: Lease, previous_seq: u64, change: &Change) -> Result<bool, StoreError> {
        let event = change.event.clone();
        let delivery = change.delivery.clone();
        self.write_transaction(move |tx| {
            let job_id = event.status.job_id().to_string();
            let held: bool = tx.prepare_cached("SELECT 1 FROM jobs WHERE job_id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND seq = ?4")?.exists(params![
                job_id,
                lease.owner.to_string(),
                lease.attempt,
                previous_seq
            ])?;
            if !held {
                return Ok(false);
            }
            let change = Change { event, delivery };
            write_status(tx, &change, change.status().state().is_terminal())?;
            Ok(true)
        })
        .await
    }

    pub async fn renew(&self, job_id: JobId, lease: Lease, duration: Duration) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let renewed = conn.prepare_cached("UPDATE jobs SET lease_expires_at = ?4 WHERE job_id = ?1 AND lease_owner = ?2 AND attempts = ?3")?.execute(params![
                job_id.to_string(),
                lease.owner.to_string(),
                lease.attempt,
                now_ms() + duration.as_millis() as i64
            ])?;
            Ok(renewed == 1)
        })
        .await
    }

    pub async fn hand_back(&self, job_id: JobId, lease: Lease) -> Result<bool, StoreError> {
        self.write_transaction(move |tx| {
            let Some((status, webhook, order)) = leased(tx, job_id, lease)? else { return Ok(false) };
            tx.prepare_cached("UPDATE jobs SET handed_back = handed_back + 1 WHERE job_id = ?1")?.execute(params![job_id.to_string()])?;
            requeue(tx, vec![QueueEntry { order, status, webhook, rejoining: true }])?;
            Ok(true)
        })
        .await
    }

    pub async fn fail_run(&self, job_id: JobId, lease: Lease) -> Result<bool, StoreError> {
        self.write_transaction(move |tx| {
            let Some((status, webhook, _)) = leased(tx, job_id, lease)? else { return Ok(false) };
            let Some(change) = run_failed(&status, webhook.as_ref()) else { return Ok(false) };
            write_status(tx, &change, true)?;
            Ok(true)
        })
        .await
    }

    pub async fn rescue(&self) -> Result<usize, StoreError> {
        self.write_transaction(move |tx| {
            let mut statement = tx.prepare_cached(
                "SELECT status, webhook, queue_order, attempts - handed_back FROM jobs WHERE lease_owner IS NOT NULL AND lease_expires_at < ?1 AND state NOT IN (?2, ?3)",
            )?;
            let rows = statement
                .query_map(params![now_ms(), TERMINAL_STATES[0], TERMINAL_STATES[1]], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?, row.get::<_, u32>(3)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            drop(statement);
            let mut rejoining = Vec::new();
            let rescued = rows.len();
            for (status, webhook, order, interrupted_runs) in rows {
                let (status, webhook): (JobStatus, _) = (serde_json::from_str(&status)?, parse_webhook(webhook.as_deref())?);
                tracing::info!(job_id = %status.job_id(), interrupted_runs, "rescuing a job whose lease expired");
                match after_interrupted_run(&status, webhook.as_ref(), interrupted_runs) {
                    Ok(()) => rejoining.push(QueueEntry { order, status, webhook, rejoining: true }),
                    Err(given_up) => write_status(tx, &given_up, true)?,
                }
            }
            requeue(tx, rejoining)?;
            Ok(rescued)
        })
        .await
    }

    pub async fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        let project = project.clone();
        let result = self
            .write_transaction(move |tx| {
                let row = tx
                    .prepare_cached("SELECT status, webhook FROM jobs WHERE job_id = ?1 AND project_id = ?2")?
                    .query_row(params![job_id.to_string(), project.as_str()], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?)))
                    .optional()?;
                let Some((status, webhook)) = row else { return Ok(Err(JobError::NotFound)) };
                let status: JobStatus = serde_json::from_str(&status)?;
                let change = match canceled(&status, parse_webhook(webhook.as_deref())?.as_ref()) {
                    Ok(change) => change,
                    Err(err) => return Ok(Err(err)),
                };
                write_status(tx, &change, true)?;
                if status.state() == JobState::Queued {
                    requeue(tx, Vec::new())?;
                }
                Ok(Ok(change.event.status.clone()))
            })
            .await;
        result?
    }

    pub async fn events_after(&self, cursor: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached("SELECT cursor, status FROM job_events WHERE cursor > ?1 ORDER BY cursor LIMIT ?2")?;
            let rows = statement.query_map(params![cursor as i64, limit], |row| Ok(LoggedEvent { cursor: row.get::<_, i64>(0)? as u64, json: row.get(1)? }))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.read(move |conn| {
            let transaction = conn.transaction()?;
            let head: i64 = transaction.query_row("SELECT COALESCE(MAX(cursor), 0) FROM job_events", [], |row| row.get(0))?;
            let mut statement =
                transaction.prepare("SELECT status, (SELECT MAX(cursor) FROM job_events e WHERE e.job_id = j.job_id) FROM jobs j ORDER BY queue_order")?;
            let jobs = statement
                .query_map([], |row| Ok(LoggedEvent { json: row.get(0)?, cursor: row.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64 }))?
                .collect::<Result<_, _>>()?;
            Ok(Snapshot { head: head as u64, jobs })
        })
        .await
    }

    pub async fn delete_finished(&self, job_ids: &[JobId]) -> Result<(), StoreError> {
        let ids: Vec<String> = job_ids.iter().map(JobId::to_string).collect();
        self.run(move |conn| {
            let transaction = conn.transaction()?;
            for id in ids {
                let deleted = transaction.prepare_cached("DELETE FROM jobs WHERE job_id = ?1 AND state IN (?2, ?3)")?.execute(params![
                    id,
                    TERMINAL_STATES[0],
                    TERMINAL_STATES[1]
                ])?;
                if deleted == 0 {
                    continue;
                }
                transaction.prepare_cached("DELETE FROM job_events WHERE job_id = ?1")?.execute(params![id])?;
                // A delivery still being sent stays until it ends.
                transaction
                    .prepare_cached(
                        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE job_id = ?1 AND next_attempt_at IS NULL)",
                    )?
                    .execute(params![id])?;
                transaction.prepare_cached("DELETE FROM webhook_deliveries WHERE job_id = ?1 AND next_attempt_at IS NULL")?.execute(params![id])?;
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)).await
    }

    pub async fn changed(&self) -> bool {
        self.written.notified().await;
        true
    }

    pub async fn setting(&self, name: &'static str, generate: impl FnOnce() -> String + Send + 'static) -> Result<String, StoreError> {
        self.run(move |conn| {
            let stored: Option<String> = conn.query_row("SELECT value FROM server_settings WHERE key = ?1", params![name], |row| row.get(0)).optional()?;
            if let Some(value) = stored {
                return Ok(value);
            }
            let value = generate();
            conn.execute("INSERT INTO server_settings (key, value) VALUES (?1, ?2)", params![name, value])?;
            Ok(value)
        })
        .await
    }

    pub async fn due_deliveries(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingDelivery>, StoreError> {
        self.run(move |conn| {
            let transaction = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let due: Vec<PendingDelivery> = transaction
                .prepare_cached(
                    "SELECT id, job_id, url, message_type, body, attempts FROM webhook_deliveries
                     WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ?1 AND (claimed_until IS NULL OR claimed_until <= ?1)
                     ORDER BY next_attempt_at LIMIT ?2",
                )?
                .query_map(params![now_ms, limit as i64], |row| {
                    Ok(PendingDelivery { id: row.get(0)?, job_id: row.get(1)?, url: row.get(2)?, message_type: row.get(3)?, body: row.get(4)?, attempts: row.get(5)? })
                })?
                .collect::<Result<_, _>>()?;
            for delivery in &due {
                transaction
                    .prepare_cached("UPDATE webhook_deliveries SET claimed_until = ?2 WHERE id = ?1")?
                    .execute(params![delivery.id, now_ms + DELIVERY_CLAIM.as_millis() as i64])?;
            }
            transaction.commit()?;
            Ok(due)
        })
        .await
    }

    pub async fn next_delivery_due(&self) -> Result<Option<i64>, StoreError> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT MIN(MAX(next_attempt_at, COALESCE(claimed_until, 0))) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL", [], |row| {
                row.get(0)
            })?)
        })
        .await
    }

    pub async fn record_attempt(&self, delivery: &PendingDelivery, result: &AttemptResult) -> Result<(), StoreError> {
        let (delivery, result) = (delivery.clone(), result.clone());
        self.run(move |conn| {
            let transaction = conn.transaction()?;
            let attempt = delivery.attempts + 1;
            transaction.execute(
                "INSERT INTO webhook_attempts (delivery_id, job_id, attempt, attempted_at, http_status, error, next_attempt_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![delivery.id, delivery.job_id, attempt, result.attempted_at_ms, result.http_status, result.error, result.next_attempt_at_ms],
            )?;
            transaction.execute(
                "UPDATE webhook_deliveries SET attempts = ?2, next_attempt_at = ?3, outcome = ?4, claimed_until = NULL WHERE id = ?1",
                params![delivery.id, attempt, result.next_attempt_at_ms, result.outcome],
            )?;
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    pub async fn attempts(&self, job_id: JobId) -> Result<Vec<Attempt>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT a.delivery_id, d.message_type, d.url, a.attempt, a.attempted_at, a.http_status, a.error, a.next_attempt_at
                 FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
                 WHERE a.job_id = ?1 ORDER BY a.attempted_at, a.attempt",
            )?;
            let rows = statement.query_map(params![job_id.to_string()], |row| {
                Ok(Attempt {
                    webhook_id: row.get(0)?,
                    message_type: row.get(1)?,
                    url: row.get(2)?,
                    attempt: row.get(3)?,
                    attempted_at: rfc3339(row.get(4)?),
                    http_status: row.get(5)?,
                    error: row.get(6)?,
                    next_attempt_at: row.get::<_, Option<i64>>(7)?.map(rfc3339),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn delivery_backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT COUNT(*), MIN(created_at) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL", [], |row| Ok((row.get(0)?, row.get(1)?)))?)
        })
        .await
    }

    #[cfg(test)]
    pub async fn add_delivery(&self, delivery: Delivery) {
        self.write_transaction(move |tx| insert_delivery(tx, &delivery)).await.unwrap();
    }

    /// Runs raw SQL, for tests that write what an older version would have.
    #[cfg(test)]
    pub async fn execute(&self, sql: &'static str) {
        self.run(move |conn| Ok(conn.execute_batch(sql)?)).await.unwrap();
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    add_webhook_column(conn)?;
    let applied: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    // A database the first release made has its tables but no version yet: version 1 is
    // idempotent, so it runs again harmlessly.
    for (version, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let transaction = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", version + 1)?;
        transaction.commit()?;
    }
    add_webhook_column(conn)?;
    Ok(())
}

/// The status, webhook and queue place of a job still held under `lease`.
fn leased(tx: &Transaction, job_id: JobId, lease: Lease) -> Result<Option<(JobStatus, Option<WebhookSpec>, i64)>, StoreError> {
    let row = tx
        .prepare_cached("SELECT status, webhook, queue_order FROM jobs WHERE job_id = ?1 AND lease_owner = ?2 AND attempts = ?3")?
        .query_row(params![job_id.to_string(), lease.owner.to_string(), lease.attempt], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?))
        })
        .optional()?;
    let Some((status, webhook, order)) = row else { return Ok(None) };
    Ok(Some((serde_json::from_str(&status)?, parse_webhook(webhook.as_deref())?, order)))
}

/// Stores a status and logs it with the delivery it causes. `ends_run`: the job leaves its lease.
fn write_status(tx: &Transaction, change: &Change, ends_run: bool) -> Result<(), StoreError> {
    let status = change.status();
    tx.prepare_cached(
        "UPDATE jobs SET status = ?2, state = ?3, seq = ?4, queue_position = ?6,
            lease_owner = CASE WHEN ?5 THEN NULL ELSE lease_owner END, lease_expires_at = CASE WHEN ?5 THEN NULL ELSE lease_expires_at END
         WHERE job_id = ?1",
    )?
    .execute(params![status.job_id().to_string(), &*change.event.json, status.state().as_str(), status.seq(), ends_run, status.queue_position()])?;
    append_event(tx, change)
}

fn append_event(tx: &Transaction, change: &Change) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO job_events (job_id, status) VALUES (?1, ?2)")?.execute(params![change.status().job_id().to_string(), &*change.event.json])?;
    if let Some(delivery) = &change.delivery {
        insert_delivery(tx, delivery)?;
    }
    Ok(())
}

fn insert_delivery(tx: &Transaction, delivery: &Delivery) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO webhook_deliveries (id, job_id, url, message_type, body, next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)")?
        .execute(params![delivery.id, delivery.job_id.to_string(), delivery.url, delivery.message_type, delivery.body, now_ms()])?;
    Ok(())
}

/// Records a stem's bytes as its own (once: a second record of it changes nothing).
fn count_stem(tx: &Transaction, project: &ProjectId, stem_id: StemId, bytes: u64) -> Result<(), StoreError> {
    tx.prepare_cached("INSERT INTO stem_usage (stem_id, project_id, bytes) VALUES (?1, ?2, ?3) ON CONFLICT (stem_id) DO NOTHING")?.execute(params![
        stem_id.to_string(),
        project.as_str(),
        bytes as i64
    ])?;
    Ok(())
}

/// The last claims of the projects with jobs waiting, and of `joining`'s (a job about to be queued).
fn last_claims(tx: &Transaction, joining: Option<&str>) -> Result<LastClaims, StoreError> {
    Ok(tx
        .prepare_cached("SELECT project_id, last_claim FROM project_claims WHERE project_id IN (SELECT project_id FROM jobs WHERE state = 'queued') OR project_id = ?1")?
        .query_map(params![joining], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?)
}

/// Where a job about to move in the queue is: still a row, or rejoining with its status in hand.
enum Slot {
    Row(String),
    Rejoining(QueueEntry),
}

/// Re-positions the queue, with `rejoining` jobs back in their places; their leases end. Only the
/// queue's order and shown positions are read for every waiting job; a status is read and written
/// only for the jobs whose move is news ([`super::rules::position_is_news`]).
fn requeue(tx: &Transaction, rejoining: Vec<QueueEntry>) -> Result<(), StoreError> {
    // 'queued' as a literal, as the partial index on the queue has it: a bound state would not
    // let SQLite use the index.
    let mut queue = tx
        .prepare_cached("SELECT job_id, queue_order, queue_position, project_id FROM jobs WHERE state = 'queued' ORDER BY queue_order")?
        .query_map([], |row| {
            Ok(Waiting { key: Slot::Row(row.get(0)?), order: row.get(1)?, project: row.get(3)?, shown: Some(row.get::<_, Option<u32>>(2)?.unwrap_or(0)) })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    queue.extend(rejoining.into_iter().map(|entry| Waiting {
        order: entry.order,
        project: entry.status.project_id().as_str().to_string(),
        shown: None,
        key: Slot::Rejoining(entry),
    }));
    for (slot, position) in reposition(queue, &last_claims(tx, None)?) {
        let entry = match slot {
            Slot::Rejoining(entry) => entry,
            Slot::Row(job_id) => {
                let (status, webhook, order) = tx
                    .prepare_cached("SELECT status, webhook, queue_order FROM jobs WHERE job_id = ?1")?
                    .query_row(params![job_id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?)))?;
                QueueEntry { order, status: serde_json::from_str(&status)?, webhook: parse_webhook(webhook.as_deref())?, rejoining: false }
            }
        };
        if let Some(change) = moved(entry, position) {
            write_status(tx, &change, true)?;
        }
    }
    Ok(())
}
