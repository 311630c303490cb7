//! The job store on disk: SQLite in WAL mode, one row per job with its status, settings, stems,
//! Idempotency-Key and how many runs it has started.
//!
//! WAL with `synchronous=NORMAL` makes each commit survive a crash of the process (kill -9
//! included) without an fsync per progress update; a power cut may lose the last commits, which a
//! restart then re-runs. The database lives in the layout's database directory, which `/media`
//! cannot reach.

use std::path::Path;

use rusqlite::{params, Connection};

use super::model::{JobEvent, JobId, JobStatus};
use crate::audio::{MixSettings, StemSource};

/// Everything needed to answer for a job, and to run it again after a restart.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub status: JobStatus,
    pub settings: MixSettings,
    pub stems: Vec<StemSource>,
    pub idempotency_key: Option<String>,
    /// Runs started; a job whose runs keep dying with the process is given up on.
    pub attempts: u32,
}

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

impl JobDb {
    pub fn open(dir: &Path) -> Result<Self, DbError> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("jobs.sqlite3"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                job_id TEXT PRIMARY KEY,
                status TEXT NOT NULL,
                settings TEXT NOT NULL,
                stems TEXT NOT NULL,
                idempotency_key TEXT,
                attempts INTEGER NOT NULL DEFAULT 0
            )",
        )?;
        Ok(Self { conn })
    }

    pub fn insert(&self, job: &StoredJob) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO jobs (job_id, status, settings, stems, idempotency_key, attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                job.status.job_id().to_string(),
                serde_json::to_string(&job.status)?,
                serde_json::to_string(&job.settings)?,
                serde_json::to_string(&job.stems)?,
                job.idempotency_key,
                job.attempts
            ],
        )?;
        Ok(())
    }

    /// Stores a job's new status, as the JSON it was published with: every change comes through
    /// here, so the statement is prepared once.
    pub fn update_status(&self, event: &JobEvent) -> Result<(), DbError> {
        self.conn.prepare_cached("UPDATE jobs SET status = ?2 WHERE job_id = ?1")?.execute(params![event.status.job_id().to_string(), &*event.json])?;
        Ok(())
    }

    pub fn set_attempts(&self, job_id: JobId, attempts: u32) -> Result<(), DbError> {
        self.conn.execute("UPDATE jobs SET attempts = ?2 WHERE job_id = ?1", params![job_id.to_string(), attempts])?;
        Ok(())
    }

    pub fn delete(&self, job_id: JobId) -> Result<(), DbError> {
        self.conn.execute("DELETE FROM jobs WHERE job_id = ?1", params![job_id.to_string()])?;
        Ok(())
    }

    /// Every stored job, oldest first. A row that no longer parses is logged and skipped.
    pub fn load_all(&self) -> Result<Vec<StoredJob>, DbError> {
        let mut statement = self.conn.prepare("SELECT job_id, status, settings, stems, idempotency_key, attempts FROM jobs")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?, row.get::<_, String>(3)?, row.get(4)?, row.get(5)?))
        })?;
        let mut jobs = Vec::new();
        for row in rows {
            let (job_id, status, settings, stems, idempotency_key, attempts) = row?;
            let parsed = (|| -> Result<StoredJob, serde_json::Error> {
                Ok(StoredJob {
                    status: serde_json::from_str(&status)?,
                    settings: serde_json::from_str(&settings)?,
                    stems: serde_json::from_str(&stems)?,
                    idempotency_key,
                    attempts,
                })
            })();
            match parsed {
                Ok(job) => jobs.push(job),
                Err(err) => tracing::error!(%job_id, %err, "skipping a job record that does not parse"),
            }
        }
        jobs.sort_by_key(|job| job.status.created_at());
        Ok(jobs)
    }
}
