//! The job domain's types: states are an ordered enum, progress is 0..=100, and a status keeps
//! its fields private so that [`JobStatus::apply`] is the only way it changes. What a status means
//! in each state (a queue position only while queued, an error only in `error`, a result only when
//! `complete`) is one [`Phase`] enum, not nullable fields kept in step.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use crate::audio::{AudioError, Delivered, Format, MixReport, Stage};
use crate::ids::{JobId, ProjectId, Timestamp};

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

    pub const fn as_str(self) -> &'static str {
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
    /// The object storage did not answer or refused while the mix read its stems or stored its
    /// result; nothing of the run became visible, and a new mix of the same stems may succeed.
    MediaUnavailable,
    ExportFailed,
    Canceled,
    Interrupted,
    Internal,
}

/// A job's progress, 0..=100. A value outside that range does not parse; that a job's progress
/// never falls is [`JobStatus::apply`]'s rule (it keeps the high-water mark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "u8")]
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

impl TryFrom<u8> for Progress {
    type Error = String;
    fn try_from(percent: u8) -> Result<Self, String> {
        if percent <= 100 {
            Ok(Progress(percent))
        } else {
            Err(format!("progress {percent} is over 100"))
        }
    }
}

/// Where a job is, with exactly the data that belongs there.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Queued {
        position: u32,
    },
    /// `running` up to `exporting`.
    Working(JobState),
    Complete {
        report: Box<MixReport>,
        files: Delivery,
    },
    /// The status's `message` is the error.
    Failed {
        code: ErrorCode,
    },
}

/// What a complete job delivered. `result_url` is derived from it, never stored beside it.
#[derive(Debug, Clone, PartialEq)]
enum Delivery {
    /// Every file, in the order asked; never empty.
    Files(Vec<ResultFile>),
    /// A job completed before mixes were delivered in several formats: one WAV, at this URL.
    LegacyWav(String),
}

/// One file a complete job delivered, measured as a decoder reads it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResultFile {
    pub format: Format,
    /// Where `/media` serves it.
    pub url: String,
    #[schema(minimum = 1)]
    pub bytes: u64,
    pub duration_s: f64,
    /// Null for silence.
    pub integrated_lufs: Option<f64>,
    /// Null for silence.
    pub true_peak_dbtp: Option<f64>,
}

impl ResultFile {
    pub fn new(url: String, delivered: Delivered) -> Self {
        let Delivered { format, bytes, duration_s, integrated_lufs, true_peak_dbtp, .. } = delivered;
        Self { format, url, bytes, duration_s, integrated_lufs, true_peak_dbtp }
    }
}

/// A job as clients see it: the `data` of status routes and the payload of every pushed event.
/// Serialised as [`JobStatusFields`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "JobStatusFields")]
pub struct JobStatus {
    job_id: JobId,
    project_id: ProjectId,
    phase: Phase,
    progress: Progress,
    message: String,
    seq: u64,
    created_at: Timestamp,
    updated_at: Timestamp,
}

/// A job status on the wire, field by field as the contract lists them.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(title = "JobStatus")]
pub struct JobStatusFields {
    pub job_id: JobId,
    pub project_id: ProjectId,
    pub state: JobState,
    #[schema(value_type = u8, minimum = 0, maximum = 100)]
    pub progress: Progress,
    pub message: String,
    /// Non-null exactly when `state == "error"`.
    pub error: Option<String>,
    /// Non-null exactly when `state == "error"`.
    pub error_code: Option<ErrorCode>,
    /// Non-null exactly when `state == "complete"`; the file is fully written there.
    pub result_url: Option<String>,
    /// 1-based while queued, else null.
    #[schema(minimum = 1)]
    pub queue_position: Option<u32>,
    /// Starts at 1 and rises by 1 on every change of this job; the SSE event id.
    #[schema(minimum = 1)]
    pub seq: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The loudness report, when complete.
    pub report: Option<MixReport>,
    /// Non-null exactly when `state == "complete"`: every file delivered, in the order
    /// `output.formats` asked for them; `result_url` is the first one's `url`. (Null also for a
    /// job completed by a release before formats, whose one file is the WAV at `result_url`.)
    #[serde(default)]
    pub results: Option<Vec<ResultFile>>,
}

impl Serialize for JobStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            job_id: JobId,
            project_id: &'a ProjectId,
            state: JobState,
            progress: Progress,
            message: &'a str,
            error: Option<&'a str>,
            error_code: Option<ErrorCode>,
            result_url: Option<&'a str>,
            queue_position: Option<u32>,
            seq: u64,
            created_at: Timestamp,
            updated_at: Timestamp,
            report: Option<&'a MixReport>,
            results: Option<&'a [ResultFile]>,
        }
        Fields {
            job_id: self.job_id,
            project_id: &self.project_id,
            state: self.state(),
            progress: self.progress,
            message: &self.message,
            error: self.error(),
            error_code: self.error_code(),
            result_url: self.result_url(),
            queue_position: self.queue_position(),
            seq: self.seq,
            created_at: self.created_at,
            updated_at: self.updated_at,
            report: self.report(),
            results: self.results(),
        }
        .serialize(serializer)
    }
}

impl TryFrom<JobStatusFields> for JobStatus {
    type Error = String;

    /// Accepts exactly the combinations a status can have; anything else is a corrupt record.
    fn try_from(fields: JobStatusFields) -> Result<Self, String> {
        let JobStatusFields { job_id, project_id, state, progress, message, error, error_code, result_url, queue_position, seq, created_at, updated_at, report, results } =
            fields;
        let phase = match (state, queue_position, error_code, error, result_url, report, results) {
            (JobState::Queued, Some(position), None, None, None, None, None) if position >= 1 => Phase::Queued { position },
            (JobState::Complete, None, None, None, Some(result_url), Some(report), results) if progress == Progress::COMPLETE => {
                let files = match results {
                    None => Delivery::LegacyWav(result_url),
                    Some(results) if results.first().is_some_and(|first| first.url == result_url) => Delivery::Files(results),
                    Some(_) => return Err(format!("job {job_id}: result_url is not the first of its results")),
                };
                Phase::Complete { report: Box::new(report), files }
            }
            (JobState::Error, None, Some(code), Some(error), None, None, None) if error == message => Phase::Failed { code },
            (state, None, None, None, None, None, None) if state > JobState::Queued && !state.is_terminal() && progress < Progress::COMPLETE => Phase::Working(state),
            _ => return Err(format!("job {job_id}: the fields of a {} status do not fit together", state.as_str())),
        };
        if seq == 0 {
            return Err(format!("job {job_id}: seq starts at 1"));
        }
        Ok(Self { job_id, project_id, phase, progress, message, seq, created_at, updated_at })
    }
}

impl utoipa::PartialSchema for JobStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <JobStatusFields as utoipa::PartialSchema>::schema()
    }
}

impl ToSchema for JobStatus {
    fn name() -> std::borrow::Cow<'static, str> {
        "JobStatus".into()
    }

    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <JobStatusFields as ToSchema>::schemas(schemas)
    }
}

/// A status as it is published: serialised once, however many subscribers send it on, with the
/// event-log cursor it was written at (0 until it has been).
#[derive(Debug)]
pub struct JobEvent {
    pub status: JobStatus,
    pub json: Box<str>,
    pub cursor: u64,
    /// The wire framings of this event (SSE and WebSocket, numbered by the streams), each built by
    /// the first subscriber that sends it that way and shared by every other: thousands of
    /// subscribers of one stream send the same bytes, so framing per delivery would be waste.
    framings: [OnceLock<Bytes>; FRAMINGS],
}

/// How many wire framings an event can carry.
pub const FRAMINGS: usize = 4;

impl JobEvent {
    pub fn new(status: JobStatus) -> Arc<Self> {
        let json = serde_json::to_string(&status).expect("a JobStatus serialises").into_boxed_str();
        Self::logged(status, json, 0)
    }

    /// A status read back from the event log, with the exact JSON it was published as.
    pub fn logged(status: JobStatus, json: Box<str>, cursor: u64) -> Arc<Self> {
        Arc::new(Self { status, json, cursor, framings: Default::default() })
    }

    /// Framing number `framing` of this event: built by `frame` the first time, shared after.
    pub fn framed(&self, framing: usize, frame: impl FnOnce(&Self) -> Bytes) -> Bytes {
        self.framings[framing].get_or_init(|| frame(self)).clone()
    }
}

/// One change to a job. Every change goes through [`JobStatus::apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum JobChange {
    /// Still waiting; the queue moved.
    QueuePosition(u32),
    /// Got a mixer slot.
    Started,
    /// Waiting again after its run was interrupted (its node died, stalled or was shut down and
    /// handed it back): the one move back to `queued`.
    /// Progress stays where it was (it never falls) until the new run passes it.
    Requeued(u32),
    /// The engine reports `state` at `progress`.
    Progress {
        state: JobState,
        progress: Progress,
        message: String,
    },
    /// Every file delivered (at least one; `result_url` is the first's).
    Completed {
        results: Vec<ResultFile>,
        report: Box<MixReport>,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
}

impl JobChange {
    /// The end of a canceled job, worded the way the engine words a mix it stopped.
    pub fn canceled() -> Self {
        JobChange::Failed { code: ErrorCode::Canceled, message: AudioError::Canceled.to_string() }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransitionError {
    #[error("the job is already {0:?}")]
    Finished(JobState),
    #[error("{from:?} cannot go back to {to:?}")]
    Backwards { from: JobState, to: JobState },
    #[error("nothing changed")]
    Unchanged,
    #[error("a complete job delivers at least one file")]
    NoResults,
}

impl JobStatus {
    pub fn queued(job_id: JobId, project_id: ProjectId, position: u32) -> Self {
        let now = Timestamp::now();
        Self {
            job_id,
            project_id,
            phase: Phase::Queued { position },
            progress: Progress::default(),
            message: queue_message(position),
            seq: 1,
            created_at: now,
            updated_at: now,
        }
    }

    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    pub fn project_id(&self) -> &ProjectId {
        &self.project_id
    }

    pub fn state(&self) -> JobState {
        match &self.phase {
            Phase::Queued { .. } => JobState::Queued,
            Phase::Working(state) => *state,
            Phase::Complete { .. } => JobState::Complete,
            Phase::Failed { .. } => JobState::Error,
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }

    pub fn queue_position(&self) -> Option<u32> {
        match self.phase {
            Phase::Queued { position } => Some(position),
            _ => None,
        }
    }

    pub fn error_code(&self) -> Option<ErrorCode> {
        match self.phase {
            Phase::Failed { code } => Some(code),
            _ => None,
        }
    }

    pub fn error(&self) -> Option<&str> {
        self.error_code().map(|_| self.message.as_str())
    }

    pub fn result_url(&self) -> Option<&str> {
        match &self.phase {
            Phase::Complete { files: Delivery::Files(files), .. } => files.first().map(|first| first.url.as_str()),
            Phase::Complete { files: Delivery::LegacyWav(url), .. } => Some(url),
            _ => None,
        }
    }

    pub fn report(&self) -> Option<&MixReport> {
        match &self.phase {
            Phase::Complete { report, .. } => Some(report),
            _ => None,
        }
    }

    pub fn results(&self) -> Option<&[ResultFile]> {
        match &self.phase {
            Phase::Complete { files: Delivery::Files(files), .. } => Some(files),
            _ => None,
        }
    }

    /// The status after `change`, with `seq` bumped and `updated_at` stamped, or why the change
    /// is not allowed. States move forward (but for [`JobChange::Requeued`], the one way back to
    /// `queued`), progress never falls, and a terminal job is final.
    pub fn apply(&self, change: JobChange) -> Result<JobStatus, TransitionError> {
        let state = self.state();
        if state.is_terminal() {
            return Err(TransitionError::Finished(state));
        }
        let mut next = self.clone();
        match change {
            JobChange::QueuePosition(position) => {
                if state != JobState::Queued {
                    return Err(TransitionError::Backwards { from: state, to: JobState::Queued });
                }
                if self.queue_position() == Some(position) {
                    return Err(TransitionError::Unchanged);
                }
                next.phase = Phase::Queued { position };
                next.message = queue_message(position);
            }
            JobChange::Requeued(position) => {
                next.phase = Phase::Queued { position };
                next.message = format!("Re-queued: the node running it stopped (position {position})");
            }
            JobChange::Started => {
                next.move_to(JobState::Running, Progress::running(1.0), "Starting the mix".to_string())?;
            }
            JobChange::Progress { state: to, progress, message } => {
                if to.is_terminal() || to < JobState::Running {
                    return Err(TransitionError::Backwards { from: state, to });
                }
                if to == state && progress <= self.progress {
                    return Err(TransitionError::Unchanged);
                }
                next.move_to(to, progress, message)?;
            }
            JobChange::Completed { results, report } => {
                if results.is_empty() {
                    return Err(TransitionError::NoResults);
                }
                if state < JobState::Running {
                    return Err(TransitionError::Backwards { from: state, to: JobState::Complete });
                }
                next.phase = Phase::Complete { report, files: Delivery::Files(results) };
                next.progress = Progress::COMPLETE;
                next.message = "Mix complete".to_string();
            }
            JobChange::Failed { code, message } => {
                next.phase = Phase::Failed { code };
                next.message = message;
            }
        }
        next.seq = self.seq + 1;
        next.updated_at = Timestamp::now().max(self.updated_at);
        Ok(next)
    }

    /// Moves forward to `state` (running up to exporting). Progress holds at its high-water
    /// mark: a re-run after a restart reports lower figures until it passes the old run.
    fn move_to(&mut self, state: JobState, progress: Progress, message: String) -> Result<(), TransitionError> {
        if state < self.state() {
            return Err(TransitionError::Backwards { from: self.state(), to: state });
        }
        self.phase = Phase::Working(state);
        self.progress = self.progress.max(progress);
        self.message = message;
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
    fn a_job_walks_forward_and_seq_counts_every_change() {
        let queued = job();
        assert_eq!((queued.seq(), queued.queue_position(), queued.progress().value()), (1, Some(2), 0));
        let moved = queued.apply(JobChange::QueuePosition(1)).unwrap();
        assert_eq!((moved.seq(), moved.message()), (2, "Waiting for mixer slot (position 1)"));
        let running = moved.apply(JobChange::Started).unwrap();
        assert_eq!((running.state(), running.queue_position(), running.seq()), (JobState::Running, None, 3));
        let loading = running.apply(progress(JobState::LoadingStems, 5.0)).unwrap();
        let mixing = loading.apply(progress(JobState::Mixing, 72.0)).unwrap();
        assert!(mixing.updated_at() >= loading.updated_at());
        assert_eq!(mixing.apply(progress(JobState::LoadingStems, 80.0)).unwrap_err(), TransitionError::Backwards { from: JobState::Mixing, to: JobState::LoadingStems });
        assert_eq!(mixing.apply(progress(JobState::Mixing, 50.0)).unwrap_err(), TransitionError::Unchanged);
        // A later stage reporting a lower figure (a re-run after a restart) keeps the high-water mark.
        let mastering = mixing.apply(progress(JobState::Mastering, 30.0)).unwrap();
        assert_eq!((mastering.state(), mastering.progress().value()), (JobState::Mastering, 72));
        assert_eq!(mixing.apply(progress(JobState::Mixing, 72.0)).unwrap_err(), TransitionError::Unchanged);
        assert_eq!(mixing.apply(JobChange::QueuePosition(1)).unwrap_err(), TransitionError::Backwards { from: JobState::Mixing, to: JobState::Queued });
    }

    #[test]
    fn a_requeued_job_waits_again_without_losing_progress_or_seq() {
        let running = job().apply(JobChange::Started).unwrap().apply(progress(JobState::ProcessingTracks, 40.0)).unwrap();
        let requeued = running.apply(JobChange::Requeued(1)).unwrap();
        assert_eq!((requeued.state(), requeued.queue_position(), requeued.progress().value()), (JobState::Queued, Some(1), 40));
        assert_eq!(requeued.seq(), running.seq() + 1);
        let rerun = requeued.apply(JobChange::Started).unwrap().apply(progress(JobState::LoadingStems, 3.0)).unwrap();
        assert_eq!((rerun.state(), rerun.progress().value()), (JobState::LoadingStems, 40));
    }

    #[test]
    fn a_status_parses_back_only_when_its_fields_fit_together() {
        let queued = job();
        let json = serde_json::to_value(&queued).unwrap();
        assert_eq!(serde_json::from_value::<JobStatus>(json.clone()).unwrap(), queued);
        let broken =
            [("state", serde_json::json!("error")), ("queue_position", serde_json::json!(null)), ("progress", serde_json::json!(101)), ("seq", serde_json::json!(0))];
        for (field, value) in broken {
            let mut bad = json.clone();
            bad[field] = value;
            assert!(serde_json::from_value::<JobStatus>(bad).is_err(), "{field} changed alone must not parse");
        }
        let failed = queued.apply(JobChange::canceled()).unwrap();
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(
            (json["error"].as_str(), json["error_code"].as_str(), json["message"].as_str()),
            (Some("The mix was canceled"), Some("CANCELED"), Some("The mix was canceled"))
        );
        assert_eq!(serde_json::from_value::<JobStatus>(json).unwrap(), failed);
    }

    #[test]
    fn a_complete_status_derives_result_url_from_its_first_file_and_reads_records_from_before_formats() {
        let report: MixReport = serde_json::from_value(serde_json::json!({"duration_s": 1.0, "sample_rate": 48000, "bit_depth": 24, "channels": 2,
            "integrated_lufs": -14.0, "true_peak_dbtp": -1.1, "loudness_range_lu": 3.0, "stems": []}))
        .unwrap();
        let file =
            |format: Format, url: &str| ResultFile { format, url: url.into(), bytes: 1000, duration_s: 1.0, integrated_lufs: Some(-14.0), true_peak_dbtp: Some(-1.2) };
        let running = job().apply(JobChange::Started).unwrap();
        assert_eq!(running.apply(JobChange::Completed { results: Vec::new(), report: Box::new(report.clone()) }).unwrap_err(), TransitionError::NoResults);
        let results = vec![file(Format::Opus, "/media/p1/mix_outputs/j/final_mix.opus"), file(Format::Wav, "/media/p1/mix_outputs/j/final_mix.wav")];
        let complete = running.apply(JobChange::Completed { results: results.clone(), report: Box::new(report) }).unwrap();
        assert_eq!(complete.result_url(), Some("/media/p1/mix_outputs/j/final_mix.opus"));
        let json = serde_json::to_value(&complete).unwrap();
        assert_eq!(json["results"], serde_json::to_value(&results).unwrap());
        assert_eq!(serde_json::from_value::<JobStatus>(json.clone()).unwrap(), complete);

        let mut elsewhere = json.clone();
        elsewhere["result_url"] = serde_json::json!("/media/p1/mix_outputs/j/final_mix.wav");
        assert!(serde_json::from_value::<JobStatus>(elsewhere).is_err(), "result_url must be the first file's");
        let mut legacy = json;
        legacy.as_object_mut().unwrap().remove("results");
        let legacy = serde_json::from_value::<JobStatus>(legacy).unwrap();
        assert_eq!((legacy.result_url(), legacy.results()), (Some("/media/p1/mix_outputs/j/final_mix.opus"), None));
        assert_eq!(serde_json::to_value(&legacy).unwrap()["results"], serde_json::Value::Null);
    }

    #[test]
    fn progress_reaches_100_only_on_complete() {
        assert_eq!(Progress::running(100.0).value(), 99);
        assert_eq!(Progress::running(-3.0).value(), 0);
    }

    #[test]
    fn error_fields_are_set_exactly_in_error_and_terminal_is_final() {
        let failed = job().apply(JobChange::Failed { code: ErrorCode::Canceled, message: "Canceled".into() }).unwrap();
        assert_eq!((failed.state(), failed.error_code(), failed.error()), (JobState::Error, Some(ErrorCode::Canceled), Some("Canceled")));
        assert_eq!(failed.queue_position(), None);
        assert_eq!(failed.apply(JobChange::Started).unwrap_err(), TransitionError::Finished(JobState::Error));
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["error_code"], "CANCELED");
        assert_eq!(json["state"], "error");
        assert!(json["created_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(json["created_at"].as_str().unwrap().len(), "2026-11-29T10:00:00.000000Z".len());
    }
}
