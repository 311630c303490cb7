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
use crate::audio::{self, AudioError, MixSettings, StemSource, ValidSettings};

/// Everything needed to answer for a job, and to run it again after a restart.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub status: JobStatus,
    pub settings: ValidSettings,
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

    /// Every stored job, oldest first. A legacy row's settings are planned against its stems, as
    /// the version that wrote it would have done when the job ran. A row that no longer parses, or
    /// whose legacy settings do not plan (a stem is gone or unreadable), is logged and skipped.
    pub fn load_all(&self) -> Result<Vec<StoredJob>, DbError> {
        let mut statement = self.conn.prepare("SELECT job_id, status, settings, stems, idempotency_key, attempts FROM jobs")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?, row.get::<_, String>(3)?, row.get(4)?, row.get(5)?))
        })?;
        let mut jobs = Vec::new();
        for row in rows {
            let (job_id, status, settings, stems, idempotency_key, attempts) = row?;
            let parsed = (|| -> Result<StoredJob, RowError> {
                let stems: Vec<StemSource> = serde_json::from_str(&stems)?;
                let settings = match serde_json::from_str(&settings)? {
                    StoredSettings::Valid(settings) => settings,
                    StoredSettings::Legacy(settings) => audio::plan(&stems, settings)?,
                };
                Ok(StoredJob { status: serde_json::from_str(&status)?, settings, stems, idempotency_key, attempts })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(settings: ValidSettings, stems: Vec<StemSource>) -> StoredJob {
        StoredJob { status: JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1), settings, stems, idempotency_key: None, attempts: 0 }
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
