//! The job store on disk: SQLite in WAL mode, one row per job with its status, settings, stems,
//! Idempotency-Key, webhook and how many runs it has started; the webhook outbox (deliveries and
//! their attempts), written in the same transaction as the change that causes a delivery; and
//! the server's generated webhook secret.
//!
//! WAL with `synchronous=NORMAL` makes each commit survive a crash of the process (kill -9
//! included) without an fsync per progress update; a power cut may lose the last commits, which a
//! restart then re-runs. The database lives in the layout's database directory, which `/media`
//! cannot reach.

use std::path::Path;

use rusqlite::{params, Connection};

use super::model::{JobEvent, JobId, JobStatus};
use super::webhook::{Delivery, WebhookSpec};
use crate::audio::{self, AudioError, MixSettings, StemSource, ValidSettings};

/// Everything needed to answer for a job, and to run it again after a restart.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub status: JobStatus,
    pub settings: ValidSettings,
    pub stems: Vec<StemSource>,
    pub idempotency_key: Option<String>,
    pub webhook: Option<WebhookSpec>,
    /// Runs started; a job whose runs keep dying with the process is given up on.
    pub attempts: u32,
}

/// The database file, inside the layout's database directory.
pub fn database_file(dir: &Path) -> std::path::PathBuf {
    dir.join("jobs.sqlite3")
}

/// How long a connection waits for another's write: the outbox has a connection of its own.
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct JobDb {
    conn: Connection,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job database record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("job database directory: {0}")]
    Io(#[from] std::io::Error),
}

/// The settings column. Rows written before settings were stored validated hold plain
/// [`MixSettings`]; `ValidSettings` refuses unknown fields, so neither shape passes for the other.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StoredSettings {
    Valid(ValidSettings),
    Legacy(MixSettings),
}

/// Why a row cannot be restored.
#[derive(Debug, thiserror::Error)]
enum RowError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("its settings, stored before they were validated for the stems, do not plan: {0}")]
    Legacy(#[from] AudioError),
}

impl JobDb {
    pub fn open(dir: &Path) -> Result<Self, DbError> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(database_file(dir))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(
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
                -- Unix milliseconds; NULL once the delivery has ended.
                next_attempt_at INTEGER,
                outcome TEXT,
                created_at INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
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
        )?;
        // Added after the first release: a database from then gains the column.
        let has_webhook: bool = conn.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'webhook'")?.exists([])?;
        if !has_webhook {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN webhook TEXT")?;
        }
        Ok(Self { conn })
    }

    pub fn insert(&self, job: &StoredJob) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO jobs (job_id, status, settings, stems, idempotency_key, attempts, webhook) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job.status.job_id().to_string(),
                serde_json::to_string(&job.status)?,
                serde_json::to_string(&job.settings)?,
                serde_json::to_string(&job.stems)?,
                job.idempotency_key,
                job.attempts,
                job.webhook.as_ref().map(serde_json::to_string).transpose()?
            ],
        )?;
        Ok(())
    }

    /// Stores a job's new status, as the JSON it was published with, and the webhook delivery it
    /// causes, in one transaction: the outbox never misses a change, nor holds one that was not
    /// stored. Every change comes through here, so the statements are prepared once.
    pub fn update_status(&mut self, event: &JobEvent, delivery: Option<&Delivery>) -> Result<(), DbError> {
        let transaction = self.conn.transaction()?;
        transaction.prepare_cached("UPDATE jobs SET status = ?2 WHERE job_id = ?1")?.execute(params![event.status.job_id().to_string(), &*event.json])?;
        if let Some(delivery) = delivery {
            insert_delivery(&transaction, delivery)?;
        }
        transaction.commit()?;
        Ok(())
    }

    /// The webhook secret kept in the store, made by `generate` the first time.
    pub fn webhook_secret(&self, generate: impl FnOnce() -> String) -> Result<String, DbError> {
        let stored: Option<String> = self.conn.query_row("SELECT value FROM server_settings WHERE key = 'webhook_secret'", [], |row| row.get(0)).ok();
        if let Some(secret) = stored {
            return Ok(secret);
        }
        let secret = generate();
        self.conn.execute("INSERT INTO server_settings (key, value) VALUES ('webhook_secret', ?1)", params![secret])?;
        Ok(secret)
    }

    pub fn set_attempts(&self, job_id: JobId, attempts: u32) -> Result<(), DbError> {
        self.conn.execute("UPDATE jobs SET attempts = ?2 WHERE job_id = ?1", params![job_id.to_string(), attempts])?;
        Ok(())
    }

    /// Removes an expired job and the record of its deliveries; one still being delivered stays
    /// until it ends (the outbox sweeps it then).
    pub fn delete(&self, job_id: JobId) -> Result<(), DbError> {
        let id = job_id.to_string();
        self.conn.execute("DELETE FROM jobs WHERE job_id = ?1", params![id])?;
        self.conn.execute(
            "DELETE FROM webhook_attempts WHERE job_id = ?1 AND delivery_id IN (SELECT id FROM webhook_deliveries WHERE job_id = ?1 AND next_attempt_at IS NULL)",
            params![id],
        )?;
        self.conn.execute("DELETE FROM webhook_deliveries WHERE job_id = ?1 AND next_attempt_at IS NULL", params![id])?;
        Ok(())
    }

    /// Every stored job, oldest first. A legacy row's settings are planned against its stems, as
    /// the version that wrote it would have done when the job ran. A row that no longer parses, or
    /// whose legacy settings do not plan (a stem is gone or unreadable), is logged and skipped.
    pub fn load_all(&self) -> Result<Vec<StoredJob>, DbError> {
        let mut statement = self.conn.prepare("SELECT job_id, status, settings, stems, idempotency_key, attempts, webhook FROM jobs")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get::<_, Option<String>>(6)?,
            ))
        })?;
        let mut jobs = Vec::new();
        for row in rows {
            let (job_id, status, settings, stems, idempotency_key, attempts, webhook) = row?;
            let parsed = (|| -> Result<StoredJob, RowError> {
                let stems: Vec<StemSource> = serde_json::from_str(&stems)?;
                let settings = match serde_json::from_str(&settings)? {
                    StoredSettings::Valid(settings) => settings,
                    StoredSettings::Legacy(settings) => audio::plan(&stems, settings)?,
                };
                let webhook = webhook.as_deref().map(serde_json::from_str).transpose()?;
                Ok(StoredJob { status: serde_json::from_str(&status)?, settings, stems, idempotency_key, webhook, attempts })
            })();
            match parsed {
                Ok(job) => jobs.push(job),
                Err(err) => tracing::error!(%job_id, %err, "skipping a job record that cannot be restored"),
            }
        }
        jobs.sort_by_key(|job| job.status.created_at());
        Ok(jobs)
    }
}

/// A new delivery, due at once.
fn insert_delivery(conn: &Connection, delivery: &Delivery) -> Result<(), DbError> {
    let now = unix_millis(std::time::SystemTime::now());
    conn.prepare_cached("INSERT INTO webhook_deliveries (id, job_id, url, message_type, body, next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)")?
        .execute(params![delivery.id, delivery.job_id.to_string(), delivery.url, delivery.message_type, delivery.body, now])?;
    Ok(())
}

/// A job database for the dispatcher's tests, with deliveries made by hand.
#[cfg(test)]
pub struct TestDb(JobDb);

#[cfg(test)]
impl TestDb {
    pub fn open(dir: &Path) -> Self {
        Self(JobDb::open(dir).unwrap())
    }

    pub fn add_delivery(&self, job_id: JobId, url: &str, body: &str) -> String {
        let delivery = Delivery { id: format!("msg_{}", uuid::Uuid::new_v4().simple()), job_id, url: url.into(), message_type: "mix.completed", body: body.into() };
        insert_delivery(&self.0.conn, &delivery).unwrap();
        delivery.id
    }
}

pub fn unix_millis(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(settings: ValidSettings, stems: Vec<StemSource>) -> StoredJob {
        StoredJob { status: JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1), settings, stems, idempotency_key: None, webhook: None, attempts: 0 }
    }

    fn write_wav(path: &Path, rate: u32) {
        let spec = hound::WavSpec { channels: 2, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut writer = hound::WavWriter::create(path, spec).unwrap();
        (0..2 * rate / 10).for_each(|n| writer.write_sample((n % 100) as i16).unwrap());
        writer.finalize().unwrap();
    }

    #[test]
    fn validated_settings_round_trip_and_legacy_rows_are_planned_against_their_stems() {
        let dir = tempfile::tempdir().unwrap();
        let stem = StemSource { id: "s1".into(), name: "a.wav".into(), path: dir.path().join("a.wav") };
        write_wav(&stem.path, 44_100);
        let gone = StemSource { id: "s2".into(), name: "gone.wav".into(), path: dir.path().join("gone.wav") };
        let db = JobDb::open(dir.path()).unwrap();

        let settings = MixSettings::from_json(br#"{"output": {"sample_rate": 96000}}"#).unwrap();
        let current = job(settings.clone().validate(std::slice::from_ref(&stem), 44_100).unwrap(), vec![stem.clone()]);
        let legacy = job(current.settings.clone(), vec![stem.clone()]);
        let unplannable = job(current.settings.clone(), vec![gone]);
        for row in [&current, &legacy, &unplannable] {
            db.insert(row).unwrap();
        }
        // Rows the previous version wrote: plain MixSettings, with no output rate.
        let plain = serde_json::to_string(&MixSettings::default()).unwrap();
        for row in [&legacy, &unplannable] {
            db.conn.execute("UPDATE jobs SET settings = ?2 WHERE job_id = ?1", params![row.status.job_id().to_string(), plain]).unwrap();
        }

        let loaded = db.load_all().unwrap();
        let found = |row: &StoredJob| loaded.iter().find(|j| j.status.job_id() == row.status.job_id());
        assert_eq!(found(&current).unwrap().settings, current.settings);
        let planned = &found(&legacy).expect("a legacy row is restored").settings;
        assert_eq!((planned.settings(), planned.output_rate()), (&MixSettings::default(), 44_100), "at its stem's rate");
        assert!(found(&unplannable).is_none(), "a legacy row whose stem is gone cannot be planned");
    }
}
