//! The webhook outbox as the dispatcher sees it: due deliveries, and what each attempt came to.
//! It has its own connection to the job database, so sending never waits on the job lock and a
//! status change never waits on a slow receiver; the deliveries themselves are written by the
//! job store, in the transaction of the change that causes them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, Connection};
use tokio::sync::Notify;

use super::db::{database_file, DbError, BUSY_TIMEOUT};
use super::model::JobId;
use super::webhook::Attempt;

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

pub struct Outbox {
    conn: Mutex<Connection>,
    wake: Notify,
}

impl Outbox {
    pub fn open(database_dir: &Path) -> Result<Self, DbError> {
        let conn = Connection::open(database_file(database_dir))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(Self { conn: Mutex::new(conn), wake: Notify::new() })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("no panics while the outbox connection is held")
    }

    /// Wakes the dispatcher: a delivery was just stored.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Up to `limit` deliveries due at `now_ms`, oldest first, leaving out those in flight.
    pub fn due(&self, now_ms: i64, limit: usize, in_flight: &HashSet<String>) -> Result<Vec<PendingDelivery>, DbError> {
        let conn = self.conn();
        let mut statement = conn.prepare_cached(
            "SELECT id, job_id, url, message_type, body, attempts FROM webhook_deliveries
             WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ?1 ORDER BY next_attempt_at LIMIT ?2",
        )?;
        let rows = statement.query_map(params![now_ms, (limit + in_flight.len()) as i64], |row| {
            Ok(PendingDelivery { id: row.get(0)?, job_id: row.get(1)?, url: row.get(2)?, message_type: row.get(3)?, body: row.get(4)?, attempts: row.get(5)? })
        })?;
        let mut due = Vec::new();
        for row in rows {
            let delivery = row?;
            if !in_flight.contains(&delivery.id) && due.len() < limit {
                due.push(delivery);
            }
        }
        Ok(due)
    }

    /// When the next pending delivery not in flight is due (unix ms), if any.
    pub fn next_due(&self, in_flight: &HashSet<String>) -> Result<Option<i64>, DbError> {
        let conn = self.conn();
        let mut statement =
            conn.prepare_cached("SELECT id, next_attempt_at FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL ORDER BY next_attempt_at LIMIT ?1")?;
        let rows = statement.query_map(params![(in_flight.len() + 1) as i64], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))?;
        for row in rows {
            let (id, due) = row?;
            if !in_flight.contains(&id) {
                return Ok(Some(due));
            }
        }
        Ok(None)
    }

    /// Records an attempt and the delivery's next step, in one transaction.
    pub fn record(&self, delivery: &PendingDelivery, result: &AttemptResult) -> Result<(), DbError> {
        let mut conn = self.conn();
        let transaction = conn.transaction()?;
        let attempt = delivery.attempts + 1;
        transaction.execute(
            "INSERT INTO webhook_attempts (delivery_id, job_id, attempt, attempted_at, http_status, error, next_attempt_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![delivery.id, delivery.job_id, attempt, result.attempted_at_ms, result.http_status, result.error, result.next_attempt_at_ms],
        )?;
        transaction.execute(
            "UPDATE webhook_deliveries SET attempts = ?2, next_attempt_at = ?3, outcome = ?4 WHERE id = ?1",
            params![delivery.id, attempt, result.next_attempt_at_ms, result.outcome],
        )?;
        transaction.commit()?;
        Ok(())
    }

    /// Every attempt made for a job's deliveries, in order.
    pub fn attempts(&self, job_id: JobId) -> Result<Vec<Attempt>, DbError> {
        let conn = self.conn();
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
    }

    /// How many deliveries are pending, and when the oldest of them was made (unix ms).
    pub fn backlog(&self) -> Result<(u64, Option<i64>), DbError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*), MIN(created_at) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL", [], |row| Ok((row.get(0)?, row.get(1)?)))?)
    }
}

fn rfc3339(millis: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(millis).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}
