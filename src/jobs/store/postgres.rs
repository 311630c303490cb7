//! The shared store: PostgreSQL, for several nodes at once. Migrations are embedded in the binary
//! and applied at start under sqlx's advisory lock. Leases run on the database's clock, so nodes
//! whose clocks disagree still agree on when a lease has expired.
//!
//! Each change is written with `NOTIFY mixd_events` in its transaction; the payload is only a
//! wake-up (the cursor, a few bytes), and the reader always goes back to the log. One LISTEN
//! connection per node: sqlx's `PgListener` reconnects by itself (reporting it, so the log is read
//! again), and on any other error it is dropped and made again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::records::{
    new_epoch, rfc3339, unix_millis, AttemptResult, Change, Claim, JobError, Lease, LoggedEvent, NewJob, PendingDelivery, QueueEntry, Snapshot, StoreError, Submitted,
    DELIVERY_CLAIM, EPOCH_KEY,
};
use super::rules::{
    after_interrupted_run, canceled, damaged, moved, parse_job_inputs, parse_webhook, place_of_new_job, reposition, run_failed, started, LastClaims, Waiting,
    TERMINAL_STATES,
};
use crate::ids::{JobId, ProjectId, StemId};
use crate::jobs::model::{JobState, JobStatus};
use crate::jobs::webhook::{Attempt, Delivery, WebhookSpec};

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Held (per transaction) by every change of the queue: positions and Idempotency-Keys are exact.
const QUEUE_LOCK: i64 = 0x6d69_7864_0000_0001;
/// Held from a transaction's first log entry to its commit: cursors become visible in order.
const LOG_LOCK: i64 = 0x6d69_7864_0000_0002;
const CHANNEL: &str = "mixd_events";
/// How long a statement waits for a free connection before the request fails (503).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// No transaction here waits on its client between statements: a session idle inside one this
/// long belongs to a stalled node (SIGSTOP, a long pause), and PostgreSQL ends it, so that the
/// locks it holds (the queue's and the log's) cannot stop every other node.
const STALLED_TRANSACTION: &str = "5s";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    listener: Arc<Mutex<Option<PgListener>>>,
    epoch: Arc<str>,
}

type Tx = Transaction<'static, Postgres>;

impl PgStore {
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = url.parse::<PgConnectOptions>()?.options([("idle_in_transaction_session_timeout", STALLED_TRANSACTION)]);
        let pool = PgPoolOptions::new().max_connections(16).acquire_timeout(ACQUIRE_TIMEOUT).connect_with(options).await?;
        MIGRATIONS.run(&pool).await?;
        // Nodes starting together agree on one epoch: the first insert wins.
        sqlx::query("INSERT INTO server_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING").bind(EPOCH_KEY).bind(new_epoch()).execute(&pool).await?;
        let epoch: String = sqlx::query_scalar("SELECT value FROM server_settings WHERE key = $1").bind(EPOCH_KEY).fetch_one(&pool).await?;
        Ok(Self { pool, listener: Arc::default(), epoch: epoch.into() })
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn begin(&self, queue: bool) -> Result<Tx, StoreError> {
        let mut tx = self.pool.begin().await?;
        if queue {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(QUEUE_LOCK).execute(&mut *tx).await?;
        }
        Ok(tx)
    }

    pub async fn submit(&self, job: NewJob) -> Result<Submitted, StoreError> {
        let mut tx = self.begin(true).await?;
        if let Some(key) = &job.idempotency_key {
            let existing: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE project_id = $1 AND idempotency_key = $2")
                .bind(job.project.as_str())
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(status) = existing {
                return Ok(Submitted::Existing(serde_json::from_str(&status)?));
            }
        }
        // Under the queue's lock: twenty starts at once on three nodes count one after another.
        let in_project: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND project_id = $1").bind(job.project.as_str()).fetch_one(&mut *tx).await?;
        if in_project >= i64::from(job.queue_cap) {
            return Ok(Submitted::QueueFull { cap: job.queue_cap });
        }
        let queue: Vec<Waiting<()>> = sqlx::query("SELECT project_id, queue_order FROM jobs WHERE state = 'queued'")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|row| Waiting { key: (), project: row.get(0), order: row.get(1), shown: None })
            .collect();
        let place = place_of_new_job(queue, job.project.as_str(), &last_claims(&mut tx, Some(job.project.as_str())).await?);
        let change = Change::new(JobStatus::queued(job.job_id, job.project.clone(), place), None, false);
        sqlx::query(
            "INSERT INTO jobs (job_id, project_id, state, seq, status, settings, stems, idempotency_key, webhook, queue_position)
             VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(job.job_id.as_uuid())
        .bind(job.project.as_str())
        .bind(change.status().seq() as i64)
        .bind(&*change.event.json)
        .bind(serde_json::to_string(&job.settings)?)
        .bind(serde_json::to_string(&job.stems)?)
        .bind(&job.idempotency_key)
        .bind(job.webhook.as_ref().map(serde_json::to_string).transpose()?)
        .bind(change.status().queue_position().map(|position| position as i32))
        .execute(&mut *tx)
        .await?;
        append_event(&mut tx, &change).await?;
        // The jobs it went ahead of move back.
        requeue(&mut tx, Vec::new()).await?;
        commit(tx).await?;
        Ok(Submitted::New(change.event.status.clone()))
    }

    pub async fn usage_known(&self, project: ProjectId) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM project_usage WHERE project_id = $1").bind(project.as_str()).fetch_optional(&self.pool).await?.is_some())
    }

    pub async fn start_usage(&self, project: ProjectId, stems: Vec<(StemId, u64)>) -> Result<(), StoreError> {
        let mut tx = self.begin(false).await?;
        let total: u64 = stems.iter().map(|(_, bytes)| bytes).sum();
        let started = sqlx::query("INSERT INTO project_usage (project_id, bytes) VALUES ($1, $2) ON CONFLICT (project_id) DO NOTHING")
            .bind(project.as_str())
            .bind(total as i64)
            .execute(&mut *tx)
            .await?;
        if started.rows_affected() == 1 {
            for (stem_id, bytes) in stems {
                count_stem(&mut *tx, &project, stem_id, bytes).await?;
            }
        }
        commit(tx).await
    }

    pub async fn count_stem(&self, project: ProjectId, stem_id: StemId, bytes: u64) -> Result<(), StoreError> {
        count_stem(&self.pool, &project, stem_id, bytes).await
    }

    /// Whoever deletes a stem, its bytes are given back once: the row goes with the first.
    pub async fn forget_stem(&self, stem_id: StemId) -> Result<(), StoreError> {
        let mut tx = self.begin(false).await?;
        let counted = sqlx::query("DELETE FROM stem_usage WHERE stem_id = $1 RETURNING project_id, bytes").bind(stem_id.to_string()).fetch_optional(&mut *tx).await?;
        if let Some(row) = counted {
            sqlx::query("UPDATE project_usage SET bytes = GREATEST(bytes - $2, 0) WHERE project_id = $1")
                .bind(row.get::<&str, _>(0))
                .bind(row.get::<i64, _>(1))
                .execute(&mut *tx)
                .await?;
        }
        commit(tx).await
    }

    /// One statement, so one row lock: uploads at once on any nodes reserve one after another.
    pub async fn reserve_bytes(&self, project: ProjectId, bytes: u64, quota: u64) -> Result<bool, StoreError> {
        let reserved = sqlx::query("UPDATE project_usage SET bytes = bytes + $2 WHERE project_id = $1 AND bytes + $2 <= $3")
            .bind(project.as_str())
            .bind(bytes as i64)
            .bind(quota.min(i64::MAX as u64) as i64)
            .execute(&self.pool)
            .await?;
        Ok(reserved.rows_affected() == 1)
    }

    pub async fn release_bytes(&self, project: ProjectId, bytes: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE project_usage SET bytes = GREATEST(bytes - $2, 0) WHERE project_id = $1")
            .bind(project.as_str())
            .bind(bytes as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn find(&self, job_id: JobId) -> Result<Option<LoggedEvent>, StoreError> {
        let row = sqlx::query("SELECT status, (SELECT MAX(cursor) FROM job_events e WHERE e.job_id = j.job_id) FROM jobs j WHERE job_id = $1")
            .bind(job_id.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| LoggedEvent { json: row.get(0), cursor: row.get::<Option<i64>, _>(1).unwrap_or(0) as u64 }))
    }

    pub async fn claim(&self, owner: Uuid, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let mut tx = self.begin(true).await?;
        let row = sqlx::query(
            "SELECT j.job_id, j.status, j.settings, j.stems, j.webhook, j.attempts, j.project_id FROM jobs j LEFT JOIN project_claims c ON c.project_id = j.project_id
                 WHERE j.state = 'queued' ORDER BY COALESCE(c.last_claim, 0), j.queue_order LIMIT 1 FOR UPDATE OF j SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let job_id: Uuid = row.get(0);
        let status: JobStatus = serde_json::from_str(row.get(1))?;
        let (settings, stems, webhook) = match parse_job_inputs(row.get(2), row.get(3), row.get(4)) {
            Ok(inputs) => inputs,
            Err(err) => {
                write_status(&mut tx, &damaged(&job_id.to_string(), &status, &err), true).await?;
                requeue(&mut tx, Vec::new()).await?;
                commit(tx).await?;
                return Ok(None);
            }
        };
        let attempt = row.get::<i32, _>(5) as u32 + 1;
        let change = started(&status, webhook.as_ref(), attempt).ok_or_else(|| StoreError::Corrupt(format!("queued job {job_id} cannot start")))?;
        write_status(&mut tx, &change, false).await?;
        // The project goes to the back of the rotation.
        sqlx::query(
            "INSERT INTO project_claims (project_id, last_claim) VALUES ($1, (SELECT COALESCE(MAX(last_claim), 0) + 1 FROM project_claims))
             ON CONFLICT (project_id) DO UPDATE SET last_claim = excluded.last_claim",
        )
        .bind(row.get::<&str, _>(6))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE jobs SET attempts = $2, lease_owner = $3, lease_expires_at = now() + $4 * interval '1 millisecond' WHERE job_id = $1")
            .bind(job_id)
            .bind(attempt as i32)
            .bind(owner)
            .bind(lease.as_millis() as i64)
            .execute(&mut *tx)
            .await?;
        requeue(&mut tx, Vec::new()).await?;
        commit(tx).await?;
        Ok(Some(Claim { lease: Lease { owner, attempt }, status: change.event.status.clone(), settings, stems, webhook }))
    }

    pub async fn write(&self, lease: Lease, previous_seq: u64, change: &Change) -> Result<bool, StoreError> {
        let mut tx = self.begin(false).await?;
        let held = sqlx::query("SELECT 1 FROM jobs WHERE job_id = $1 AND lease_owner = $2 AND attempts = $3 AND seq = $4 FOR UPDATE")
            .bind(change.status().job_id().as_uuid())
            .bind(lease.owner)
            .bind(lease.attempt as i32)
            .bind(previous_seq as i64)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !held {
            return Ok(false);
        }
        write_status(&mut tx, change, change.status().state().is_terminal()).await?;
        commit(tx).await?;
        Ok(true)
    }

    pub async fn renew(&self, job_id: JobId, lease: Lease, duration: Duration) -> Result<bool, StoreError> {
        let renewed = sqlx::query("UPDATE jobs SET lease_expires_at = now() + $4 * interval '1 millisecond' WHERE job_id = $1 AND lease_owner = $2 AND attempts = $3")
            .bind(job_id.as_uuid())
            .bind(lease.owner)
            .bind(lease.attempt as i32)
            .bind(duration.as_millis() as i64)
            .execute(&self.pool)
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    pub async fn hand_back(&self, job_id: JobId, lease: Lease) -> Result<bool, StoreError> {
        let mut tx = self.begin(true).await?;
        let Some((status, webhook, order)) = leased(&mut tx, job_id, lease).await? else { return Ok(false) };
        sqlx::query("UPDATE jobs SET handed_back = handed_back + 1 WHERE job_id = $1").bind(job_id.as_uuid()).execute(&mut *tx).await?;
        requeue(&mut tx, vec![QueueEntry { order, status, webhook, rejoining: true }]).await?;
        commit(tx).await?;
        Ok(true)
    }

    pub async fn fail_run(&self, job_id: JobId, lease: Lease) -> Result<bool, StoreError> {
        let mut tx = self.begin(false).await?;
        let Some((status, webhook, _)) = leased(&mut tx, job_id, lease).await? else { return Ok(false) };
        let Some(change) = run_failed(&status, webhook.as_ref()) else { return Ok(false) };
        write_status(&mut tx, &change, true).await?;
        commit(tx).await?;
        Ok(true)
    }

    pub async fn rescue(&self) -> Result<usize, StoreError> {
        let mut tx = self.begin(true).await?;
        let rows = sqlx::query(
            "SELECT status, webhook, queue_order, attempts - handed_back FROM jobs
             WHERE lease_owner IS NOT NULL AND lease_expires_at < now() AND state <> ALL($1) FOR UPDATE SKIP LOCKED",
        )
        .bind(&TERMINAL_STATES[..])
        .fetch_all(&mut *tx)
        .await?;
        let rescued = rows.len();
        let mut rejoining = Vec::new();
        for row in rows {
            let (status, webhook): (JobStatus, _) = (serde_json::from_str(row.get(0))?, parse_webhook(row.get::<Option<&str>, _>(1))?);
            let interrupted_runs = row.get::<i32, _>(3) as u32;
            tracing::info!(job_id = %status.job_id(), interrupted_runs, "rescuing a job whose lease expired");
            match after_interrupted_run(&status, webhook.as_ref(), interrupted_runs) {
                Ok(()) => rejoining.push(QueueEntry { order: row.get(2), status, webhook, rejoining: true }),
                Err(given_up) => write_status(&mut tx, &given_up, true).await?,
            }
        }
        requeue(&mut tx, rejoining).await?;
        commit(tx).await?;
        Ok(rescued)
    }

    pub async fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        let mut tx = self.begin(true).await?;
        let row = sqlx::query("SELECT status, webhook FROM jobs WHERE job_id = $1 AND project_id = $2 FOR UPDATE")
            .bind(job_id.as_uuid())
            .bind(project.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let Some(row) = row else { return Err(JobError::NotFound) };
        let status: JobStatus = serde_json::from_str(row.get(0)).map_err(StoreError::from)?;
        let change = canceled(&status, parse_webhook(row.get::<Option<&str>, _>(1))?.as_ref())?;
        write_status(&mut tx, &change, true).await?;
        if status.state() == JobState::Queued {
            requeue(&mut tx, Vec::new()).await?;
        }
        commit(tx).await?;
        Ok(change.event.status.clone())
    }

    pub async fn events_after(&self, cursor: u64, limit: u32) -> Result<Vec<LoggedEvent>, StoreError> {
        let rows = sqlx::query("SELECT cursor, status FROM job_events WHERE cursor > $1 ORDER BY cursor LIMIT $2")
            .bind(cursor as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|row| LoggedEvent { cursor: row.get::<i64, _>(0) as u64, json: row.get(1) }).collect())
    }

    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        // One snapshot of the database for both reads.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(cursor), 0) FROM job_events").fetch_one(&mut *tx).await?;
        let rows =
            sqlx::query("SELECT status, (SELECT MAX(cursor) FROM job_events e WHERE e.job_id = j.job_id) FROM jobs j ORDER BY queue_order").fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let jobs = rows.into_iter().map(|row| LoggedEvent { json: row.get(0), cursor: row.get::<Option<i64>, _>(1).unwrap_or(0) as u64 }).collect();
        Ok(Snapshot { head: head as u64, jobs })
    }

    pub async fn delete_finished(&self, job_ids: &[JobId]) -> Result<(), StoreError> {
        let ids: Vec<Uuid> = job_ids.iter().map(|id| id.as_uuid()).collect();
        let texts: Vec<String> = job_ids.iter().map(JobId::to_string).collect();
        let mut tx = self.pool.begin().await?;
        let deleted: Vec<Uuid> = sqlx::query_scalar("DELETE FROM jobs WHERE job_id = ANY($1) AND state = ANY($2) RETURNING job_id")
            .bind(&ids)
            .bind(&TERMINAL_STATES[..])
            .fetch_all(&mut *tx)
            .await?;
        if !deleted.is_empty() {
            sqlx::query("DELETE FROM job_events WHERE job_id = ANY($1)").bind(&deleted).execute(&mut *tx).await?;
            // A delivery still being sent stays until it ends.
            sqlx::query("DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE job_id = ANY($1) AND next_attempt_at IS NULL)")
                .bind(&texts)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM webhook_deliveries WHERE job_id = ANY($1) AND next_attempt_at IS NULL").bind(&texts).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn changed(&self) -> bool {
        let mut listener = self.listener.lock().await;
        if listener.is_none() {
            match self.listen().await {
                Ok(connected) => *listener = Some(connected),
                Err(err) => {
                    tracing::warn!(%err, "cannot listen for job changes; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // Whatever was notified before LISTEN took effect is in the log: read it.
            return false;
        }
        let connected = listener.as_mut().expect("checked above");
        match connected.try_recv().await {
            Ok(Some(_)) => true,
            // The connection was lost and made again: notifications in between are gone.
            Ok(None) => {
                tracing::info!("the LISTEN connection was re-established");
                false
            }
            Err(err) => {
                tracing::warn!(%err, "the LISTEN connection failed; making a new one");
                *listener = None;
                false
            }
        }
    }

    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    pub async fn setting(&self, name: &'static str, generate: impl FnOnce() -> String + Send + 'static) -> Result<String, StoreError> {
        // Nodes starting together agree on one secret: the first insert wins.
        sqlx::query("INSERT INTO server_settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING").bind(name).bind(generate()).execute(&self.pool).await?;
        Ok(sqlx::query_scalar("SELECT value FROM server_settings WHERE key = $1").bind(name).fetch_one(&self.pool).await?)
    }

    pub async fn due_deliveries(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingDelivery>, StoreError> {
        let rows = sqlx::query(
            "UPDATE webhook_deliveries SET claimed_until = $1 + $3 WHERE id IN (
                SELECT id FROM webhook_deliveries
                WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= $1 AND (claimed_until IS NULL OR claimed_until <= $1)
                ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING id, job_id, url, message_type, body, attempts",
        )
        .bind(now_ms)
        .bind(limit as i64)
        .bind(DELIVERY_CLAIM.as_millis() as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| PendingDelivery {
                id: row.get(0),
                job_id: row.get(1),
                url: row.get(2),
                message_type: row.get(3),
                body: row.get(4),
                attempts: row.get::<i32, _>(5) as u32,
            })
            .collect())
    }

    pub async fn next_delivery_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT MIN(GREATEST(next_attempt_at, COALESCE(claimed_until, 0))) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn record_attempt(&self, delivery: &PendingDelivery, result: &AttemptResult) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let attempt = delivery.attempts as i32 + 1;
        sqlx::query("INSERT INTO webhook_attempts (delivery_id, job_id, attempt, attempted_at, http_status, error, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&delivery.id)
            .bind(&delivery.job_id)
            .bind(attempt)
            .bind(result.attempted_at_ms)
            .bind(result.http_status.map(i32::from))
            .bind(&result.error)
            .bind(result.next_attempt_at_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE webhook_deliveries SET attempts = $2, next_attempt_at = $3, outcome = $4, claimed_until = NULL WHERE id = $1")
            .bind(&delivery.id)
            .bind(attempt)
            .bind(result.next_attempt_at_ms)
            .bind(result.outcome)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn attempts(&self, job_id: JobId) -> Result<Vec<Attempt>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.delivery_id, d.message_type, d.url, a.attempt, a.attempted_at, a.http_status, a.error, a.next_attempt_at
             FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
             WHERE a.job_id = $1 ORDER BY a.attempted_at, a.attempt",
        )
        .bind(job_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| Attempt {
                webhook_id: row.get(0),
                message_type: row.get(1),
                url: row.get(2),
                attempt: row.get::<i32, _>(3) as u32,
                attempted_at: rfc3339(row.get(4)),
                http_status: row.get::<Option<i32>, _>(5).map(|status| status as u16),
                error: row.get(6),
                next_attempt_at: row.get::<Option<i64>, _>(7).map(rfc3339),
            })
            .collect())
    }

    pub async fn delivery_backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        let row = sqlx::query("SELECT COUNT(*), MIN(created_at) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL").fetch_one(&self.pool).await?;
        Ok((row.get::<i64, _>(0) as u64, row.get(1)))
    }

    #[cfg(test)]
    pub async fn add_delivery(&self, delivery: Delivery) {
        let mut tx = self.pool.begin().await.unwrap();
        insert_delivery(&mut tx, &delivery).await.unwrap();
        tx.commit().await.unwrap();
    }
}

/// The status, webhook and queue place of a job still held under `lease`, locked for the change.
async fn leased(tx: &mut Tx, job_id: JobId, lease: Lease) -> Result<Option<(JobStatus, Option<WebhookSpec>, i64)>, StoreError> {
    let row = sqlx::query("SELECT status, webhook, queue_order FROM jobs WHERE job_id = $1 AND lease_owner = $2 AND attempts = $3 FOR UPDATE")
        .bind(job_id.as_uuid())
        .bind(lease.owner)
        .bind(lease.attempt as i32)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some((serde_json::from_str(row.get(0))?, parse_webhook(row.get::<Option<&str>, _>(1))?, row.get(2))))
}

/// Wakes every node's reader, then commits: the notification is delivered only if the commit is.
async fn commit(mut tx: Tx) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Stores a status and logs it with the delivery it causes. `ends_run`: the job leaves its lease.
async fn write_status(tx: &mut Tx, change: &Change, ends_run: bool) -> Result<(), StoreError> {
    let status = change.status();
    sqlx::query(
        "UPDATE jobs SET status = $2, state = $3, seq = $4, queue_position = $6,
            lease_owner = CASE WHEN $5 THEN NULL ELSE lease_owner END, lease_expires_at = CASE WHEN $5 THEN NULL ELSE lease_expires_at END
         WHERE job_id = $1",
    )
    .bind(status.job_id().as_uuid())
    .bind(&*change.event.json)
    .bind(status.state().as_str())
    .bind(status.seq() as i64)
    .bind(ends_run)
    .bind(status.queue_position().map(|position| position as i32))
    .execute(&mut **tx)
    .await?;
    append_event(tx, change).await
}

async fn append_event(tx: &mut Tx, change: &Change) -> Result<(), StoreError> {
    // Taken again by each entry of a transaction, which costs nothing once held.
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(LOG_LOCK).execute(&mut **tx).await?;
    sqlx::query("INSERT INTO job_events (job_id, status) VALUES ($1, $2)").bind(change.status().job_id().as_uuid()).bind(&*change.event.json).execute(&mut **tx).await?;
    if let Some(delivery) = &change.delivery {
        insert_delivery(tx, delivery).await?;
    }
    Ok(())
}

async fn insert_delivery(tx: &mut Tx, delivery: &Delivery) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO webhook_deliveries (id, job_id, url, message_type, body, next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $6)")
        .bind(&delivery.id)
        .bind(delivery.job_id.to_string())
        .bind(&delivery.url)
        .bind(delivery.message_type)
        .bind(&delivery.body)
        .bind(unix_millis(SystemTime::now()))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records a stem's bytes as its own (once: a second record of it changes nothing).
async fn count_stem(executor: impl sqlx::PgExecutor<'_>, project: &ProjectId, stem_id: StemId, bytes: u64) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO stem_usage (stem_id, project_id, bytes) VALUES ($1, $2, $3) ON CONFLICT (stem_id) DO NOTHING")
        .bind(stem_id.to_string())
        .bind(project.as_str())
        .bind(bytes as i64)
        .execute(executor)
        .await?;
    Ok(())
}

/// The last claims of the projects with jobs waiting, and of `joining`'s (a job about to be queued).
async fn last_claims(tx: &mut Tx, joining: Option<&str>) -> Result<LastClaims, StoreError> {
    let rows =
        sqlx::query("SELECT project_id, last_claim FROM project_claims WHERE project_id IN (SELECT project_id FROM jobs WHERE state = 'queued') OR project_id = $1")
            .bind(joining)
            .fetch_all(&mut **tx)
            .await?;
    Ok(rows.into_iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Where a job about to move in the queue is: still a row, or rejoining with its status in hand.
enum Slot {
    Row(Uuid),
    Rejoining(Box<QueueEntry>),
}

/// Re-positions the queue, with `rejoining` jobs back in their places; their leases end. Only the
/// queue's order and shown positions are read for every waiting job; a status is read and written
/// only for the jobs whose move is news ([`super::rules::position_is_news`]).
async fn requeue(tx: &mut Tx, rejoining: Vec<QueueEntry>) -> Result<(), StoreError> {
    let rows = sqlx::query("SELECT job_id, queue_order, queue_position, project_id FROM jobs WHERE state = 'queued' ORDER BY queue_order FOR UPDATE")
        .fetch_all(&mut **tx)
        .await?;
    let mut queue: Vec<Waiting<Slot>> = rows
        .into_iter()
        .map(|row| Waiting { key: Slot::Row(row.get(0)), order: row.get(1), project: row.get(3), shown: Some(row.get::<Option<i32>, _>(2).unwrap_or(0) as u32) })
        .collect();
    queue.extend(rejoining.into_iter().map(|entry| Waiting {
        order: entry.order,
        project: entry.status.project_id().as_str().to_string(),
        shown: None,
        key: Slot::Rejoining(Box::new(entry)),
    }));
    let last_claims = last_claims(tx, None).await?;
    for (slot, position) in reposition(queue, &last_claims) {
        let entry = match slot {
            Slot::Rejoining(entry) => *entry,
            Slot::Row(job_id) => {
                let row = sqlx::query("SELECT status, webhook, queue_order FROM jobs WHERE job_id = $1").bind(job_id).fetch_one(&mut **tx).await?;
                QueueEntry { order: row.get(2), status: serde_json::from_str(row.get(0))?, webhook: parse_webhook(row.get::<Option<&str>, _>(1))?, rejoining: false }
            }
        };
        if let Some(change) = moved(entry, position) {
            write_status(tx, &change, true).await?;
        }
    }
    Ok(())
}
