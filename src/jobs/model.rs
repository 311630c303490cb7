//! The job domain's types. Bad data is unrepresentable past the edge: ids validate when parsed,
//! states are an ordered enum, and [`JobStatus::apply`] is the only way a status changes.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::audio::{MixReport, Stage};

/// 1-64 chars of `A-Z a-z 0-9 _ -`, first alphanumeric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
#[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", example = "p1")]
pub struct ProjectId(String);

impl FromStr for ProjectId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let valid = (1..=64).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if valid {
            Ok(Self(s.to_string()))
        } else {
            Err(())
        }
    }
}

impl<'de> Deserialize<'de> for ProjectId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(|()| serde::de::Error::custom(INVALID_PROJECT_ID))
    }
}

/// The messages a failed id parse carries, so the API can tell which id was bad.
pub const INVALID_PROJECT_ID: &str = "invalid project id";
pub const INVALID_JOB_ID: &str = "invalid job id";
pub const INVALID_STEM_ID: &str = "invalid stem id";

impl ProjectId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! uuid_id {
    ($name:ident, $doc:literal, $invalid:expr) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ToSchema)]
        #[schema(value_type = String, format = Uuid, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$")]
        pub struct $name(Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match Uuid::try_parse(s) {
                    Ok(uuid) if uuid.get_version_num() == 4 => Ok(Self(uuid)),
                    _ => Err(()),
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                raw.parse().map_err(|()| serde::de::Error::custom($invalid))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(JobId, "A mix job's id: a UUID v4.", INVALID_JOB_ID);
uuid_id!(StemId, "A stem's id: a UUID v4.", INVALID_STEM_ID);

/// A job's state; the declaration order is the order a job walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    LoadingStems,
    AligningStems,
    ProcessingTracks,
    Mixing,
    Mastering,
    Exporting,
    Complete,
    Error,
}

impl JobState {
    pub const ALL: [JobState; 10] = [
        JobState::Queued,
        JobState::Running,
        JobState::LoadingStems,
        JobState::AligningStems,
        JobState::ProcessingTracks,
        JobState::Mixing,
        JobState::Mastering,
        JobState::Exporting,
        JobState::Complete,
        JobState::Error,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Complete | JobState::Error)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::LoadingStems => "loading_stems",
            JobState::AligningStems => "aligning_stems",
            JobState::ProcessingTracks => "processing_tracks",
            JobState::Mixing => "mixing",
            JobState::Mastering => "mastering",
            JobState::Exporting => "exporting",
            JobState::Complete => "complete",
            JobState::Error => "error",
        }
    }
}

impl From<Stage> for JobState {
    fn from(stage: Stage) -> Self {
        match stage {
            Stage::LoadingStems => JobState::LoadingStems,
            Stage::AligningStems => JobState::AligningStems,
            Stage::ProcessingTracks => JobState::ProcessingTracks,
            Stage::Mixing => JobState::Mixing,
            Stage::Mastering => JobState::Mastering,
            Stage::Exporting => JobState::Exporting,
        }
    }
}

/// Why a job ended in `error`: a stable machine code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    DecodeFailed,
    UnsupportedAudio,
    StemMissing,
    NoStems,
    InvalidSettings,
    OutputTooLong,
    InsufficientStorage,
    ExportFailed,
    Canceled,
    Interrupted,
    Internal,
}

/// Progress 0..=100 that only rises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[schema(value_type = u8, example = 42)]
pub struct Progress(u8);

impl Progress {
    pub const COMPLETE: Progress = Progress(100);

    /// Below 100: only `complete` may report 100.
    pub fn running(percent: f64) -> Self {
        Progress(percent.clamp(0.0, 99.0) as u8)
    }

    pub fn value(self) -> u8 {
        self.0
    }
}

/// RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ToSchema, Deserialize)]
#[schema(value_type = String, format = DateTime, example = "2026-11-29T10:00:00.000000Z")]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// Now, to the microsecond: what the wire and the database carry, so a restored status
    /// equals the one that was stored.
    pub fn now() -> Self {
        Self(Utc::now().trunc_subsecs(6))
    }

    /// Time since this moment; zero if it lies in the future (the clock was set back).
    pub fn elapsed(self) -> std::time::Duration {
        (Utc::now() - self.0).to_std().unwrap_or_default()
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

/// A job as clients see it: the `data` of status routes and the payload of every pushed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobStatus {
    pub job_id: JobId,
    pub project_id: ProjectId,
    pub state: JobState,
    pub progress: Progress,
    pub message: String,
    /// Non-null exactly when `state == "error"`.
    pub error: Option<String>,
    /// Non-null exactly when `state == "error"`.
    pub error_code: Option<ErrorCode>,
    /// Non-null exactly when `state == "complete"`; the file is fully written there.
    pub result_url: Option<String>,
    /// 1-based while queued, else null.
    pub queue_position: Option<u32>,
    /// Starts at 1 and rises by 1 on every change of this job; the SSE event id.
    pub seq: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The loudness report, when complete.
    pub report: Option<MixReport>,
}

/// A status as it is published: serialised once, however many subscribers send it on.
#[derive(Debug)]
pub struct JobEvent {
    pub status: JobStatus,
    pub json: Box<str>,
}

impl JobEvent {
    pub fn new(status: JobStatus) -> std::sync::Arc<Self> {
        let json = serde_json::to_string(&status).expect("a JobStatus serialises").into_boxed_str();
        std::sync::Arc::new(Self { status, json })
    }
}

/// One change to a job. Every change goes through [`JobStatus::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum JobChange {
    /// Still waiting; the queue moved.
    QueuePosition(u32),
    /// Got a mixer slot.
    Started,
    /// Waiting again after a server restart cut its run short: the one move back to `queued`.
    /// Progress stays where it was (it never falls) until the new run passes it.
    Requeued(u32),
    /// The engine reports `state` at `progress`.
    Progress { state: JobState, progress: Progress, message: String },
    Completed { result_url: String, report: Box<MixReport> },
    Failed { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    #[error("the job is already {0:?}")]
    Finished(JobState),
    #[error("{from:?} cannot go back to {to:?}")]
    Backwards { from: JobState, to: JobState },
    #[error("nothing changed")]
    Unchanged,
}

impl JobStatus {
    pub fn queued(job_id: JobId, project_id: ProjectId, position: u32) -> Self {
        let now = Timestamp::now();
        Self {
            job_id,
            project_id,
            state: JobState::Queued,
            progress: Progress::default(),
            message: queue_message(position),
            error: None,
            error_code: None,
            result_url: None,
            queue_position: Some(position),
            seq: 1,
            created_at: now,
            updated_at: now,
            report: None,
        }
    }

    /// The status after `change`, with `seq` bumped and `updated_at` stamped, or why the change
    /// is not allowed. States only move forward, progress never falls, and a terminal job is final.
    pub fn apply(&self, change: JobChange) -> Result<JobStatus, TransitionError> {
        if self.state.is_terminal() {
            return Err(TransitionError::Finished(self.state));
        }
        let mut next = self.clone();
        match change {
            JobChange::QueuePosition(position) => {
                if self.state != JobState::Queued {
                    return Err(TransitionError::Backwards { from: self.state, to: JobState::Queued });
                }
                if self.queue_position == Some(position) {
                    return Err(TransitionError::Unchanged);
                }
                next.queue_position = Some(position);
                next.message = queue_message(position);
            }
            JobChange::Requeued(position) => {
                next.state = JobState::Queued;
                next.queue_position = Some(position);
                next.message = format!("Re-queued after a server restart (position {position})");
            }
            JobChange::Started => {
                next.move_to(JobState::Running, Progress::running(1.0), "Starting the mix".to_string())?;
            }
            JobChange::Progress { state, progress, message } => {
                if state.is_terminal() || state < JobState::Running {
                    return Err(TransitionError::Backwards { from: self.state, to: state });
                }
                if state == self.state && progress <= self.progress {
                    return Err(TransitionError::Unchanged);
                }
                next.move_to(state, progress, message)?;
            }
            JobChange::Completed { result_url, report } => {
                next.move_to(JobState::Complete, Progress::COMPLETE, "Mix complete".to_string())?;
                next.result_url = Some(result_url);
                next.report = Some(*report);
            }
            JobChange::Failed { code, message } => {
                next.state = JobState::Error;
                next.queue_position = None;
                next.message = message.clone();
                next.error = Some(message);
                next.error_code = Some(code);
            }
        }
        next.seq = self.seq + 1;
        next.updated_at = Timestamp::now().max(self.updated_at);
        Ok(next)
    }

    /// Moves forward to `state`. Progress holds at its high-water mark: a re-run after a restart
    /// reports lower figures until it passes the old run.
    fn move_to(&mut self, state: JobState, progress: Progress, message: String) -> Result<(), TransitionError> {
        if state < self.state {
            return Err(TransitionError::Backwards { from: self.state, to: state });
        }
        self.state = state;
        self.progress = self.progress.max(progress);
        self.message = message;
        self.queue_position = None;
        Ok(())
    }
}

fn queue_message(position: u32) -> String {
    format!("Waiting for mixer slot (position {position})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobStatus {
        JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 2)
    }

    fn progress(state: JobState, percent: f64) -> JobChange {
        JobChange::Progress { state, progress: Progress::running(percent), message: String::new() }
    }

    #[test]
    fn ids_validate_when_parsed() {
        assert!("p1".parse::<ProjectId>().is_ok());
        assert!("My_Song-2".parse::<ProjectId>().is_ok());
        assert!("a".repeat(64).parse::<ProjectId>().is_ok());
        for bad in ["", "-p", "_p", "p 1", "p/1", "..", "p.1", &"a".repeat(65), "é"] {
            assert!(bad.parse::<ProjectId>().is_err(), "{bad:?}");
        }
        let id = JobId::new().to_string();
        assert_eq!(id.parse::<JobId>().unwrap().to_string(), id);
        assert!("not-a-uuid".parse::<JobId>().is_err());
        // A valid UUID of another version is not a job id.
        assert!("6ba7b810-9dad-11d1-80b4-00c04fd430c8".parse::<JobId>().is_err());
    }

    #[test]
    fn a_job_walks_forward_and_seq_counts_every_change() {
        let queued = job();
        assert_eq!((queued.seq, queued.queue_position, queued.progress.value()), (1, Some(2), 0));
        let moved = queued.apply(JobChange::QueuePosition(1)).unwrap();
        assert_eq!((moved.seq, moved.message.as_str()), (2, "Waiting for mixer slot (position 1)"));
        let running = moved.apply(JobChange::Started).unwrap();
        assert_eq!((running.state, running.queue_position, running.seq), (JobState::Running, None, 3));
        let loading = running.apply(progress(JobState::LoadingStems, 5.0)).unwrap();
        let mixing = loading.apply(progress(JobState::Mixing, 72.0)).unwrap();
        assert!(mixing.updated_at >= loading.updated_at);
        assert_eq!(mixing.apply(progress(JobState::LoadingStems, 80.0)).unwrap_err(), TransitionError::Backwards { from: JobState::Mixing, to: JobState::LoadingStems });
        assert_eq!(mixing.apply(progress(JobState::Mixing, 50.0)).unwrap_err(), TransitionError::Unchanged);
        // A later stage reporting a lower figure (a re-run after a restart) keeps the high-water mark.
        let mastering = mixing.apply(progress(JobState::Mastering, 30.0)).unwrap();
        assert_eq!((mastering.state, mastering.progress.value()), (JobState::Mastering, 72));
        assert_eq!(mixing.apply(progress(JobState::Mixing, 72.0)).unwrap_err(), TransitionError::Unchanged);
        assert_eq!(mixing.apply(JobChange::QueuePosition(1)).unwrap_err(), TransitionError::Backwards { from: JobState::Mixing, to: JobState::Queued });
    }

    #[test]
    fn a_requeued_job_waits_again_without_losing_progress_or_seq() {
        let running = job().apply(JobChange::Started).unwrap().apply(progress(JobState::ProcessingTracks, 40.0)).unwrap();
        let requeued = running.apply(JobChange::Requeued(1)).unwrap();
        assert_eq!((requeued.state, requeued.queue_position, requeued.progress.value()), (JobState::Queued, Some(1), 40));
        assert_eq!(requeued.seq, running.seq + 1);
        let rerun = requeued.apply(JobChange::Started).unwrap().apply(progress(JobState::LoadingStems, 3.0)).unwrap();
        assert_eq!((rerun.state, rerun.progress.value()), (JobState::LoadingStems, 40));
    }

    #[test]
    fn progress_reaches_100_only_on_complete() {
        assert_eq!(Progress::running(100.0).value(), 99);
        assert_eq!(Progress::running(-3.0).value(), 0);
    }

    #[test]
    fn error_fields_are_set_exactly_in_error_and_terminal_is_final() {
        let failed = job().apply(JobChange::Failed { code: ErrorCode::Canceled, message: "Canceled".into() }).unwrap();
        assert_eq!((failed.state, failed.error_code, failed.error.as_deref()), (JobState::Error, Some(ErrorCode::Canceled), Some("Canceled")));
        assert_eq!(failed.queue_position, None);
        assert_eq!(failed.apply(JobChange::Started).unwrap_err(), TransitionError::Finished(JobState::Error));
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["error_code"], "CANCELED");
        assert_eq!(json["state"], "error");
        assert!(json["created_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(json["created_at"].as_str().unwrap().len(), "2026-11-29T10:00:00.000000Z".len());
    }
}
