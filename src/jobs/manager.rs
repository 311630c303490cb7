//! The job store, the mixer slots, the runner and expiry.
//!
//! All job state sits behind one mutex, and every change goes through [`Jobs::apply`]: it
//! validates the transition, bumps `seq`, stamps `updated_at`, stores the new status and
//! publishes it on the broadcast channel while still holding the lock, so every subscriber sees
//! each job's changes in `seq` order.
//!
//! Mixer slots are a FIFO queue: a finished job hands its slot to the head of the queue, and every
//! job still waiting gets its new `queue_position`. Nothing polls: the queue moves when a job is
//! submitted, canceled or finishes, and expiry sleeps until the next deadline or a new one.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::db::{DbError, JobDb, StoredJob};
use super::engine::EnginePool;
use super::metrics::Metrics;
use super::model::{ErrorCode, JobChange, JobEvent, JobId, JobState, JobStatus, ProjectId, Progress, TransitionError};
use crate::audio::{self, AudioError, MixObserver, MixReport, Stage, StemSource, ValidSettings};

/// Room for bursts of changes; a subscriber that falls further behind is resynchronised.
pub const EVENT_BUFFER: usize = 4096;
/// Runs a job may start without finishing (the process died each time) before it is given up on.
const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub mix_slots: usize,
    pub job_ttl: Duration,
    /// How long output files are kept; at least `job_ttl`, so a job never points at a deleted file.
    pub output_retention: Duration,
    /// Changes the broadcast channel holds for a subscriber that falls behind ([`EVENT_BUFFER`]).
    pub event_buffer: usize,
    /// The media root: outputs go to `{media_root}/{project}/mix_outputs/{job}/final_mix.wav`,
    /// the job database to `{media_root}/.mixd/`.
    pub media_root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job not found")]
    NotFound,
    #[error("the job has already finished")]
    Finished,
    #[error(transparent)]
    Store(#[from] DbError),
}

/// Why the job layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] DbError),
    #[error("starting the mix engine's threads: {0}")]
    Engine(std::io::Error),
}

/// A handle on all jobs; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    config: JobsConfig,
    state: Mutex<State>,
    events: broadcast::Sender<Arc<JobEvent>>,
    expiry: Notify,
    metrics: Arc<Metrics>,
    engine: EnginePool,
}

struct State {
    db: JobDb,
    jobs: HashMap<JobId, JobRecord>,
    waiting: VecDeque<JobId>,
    running: usize,
    idempotency: HashMap<(ProjectId, String), JobId>,
}

struct JobRecord {
    /// The current status, as it was last published: snapshots and resyncs send this same
    /// serialisation, however many subscribers ask.
    published: Arc<JobEvent>,
    settings: ValidSettings,
    stems: Vec<StemSource>,
    cancel: Arc<AtomicBool>,
    idempotency_key: Option<String>,
    attempts: u32,
    finished_at: Option<Instant>,
}

impl JobRecord {
    fn status(&self) -> &JobStatus {
        &self.published.status
    }
}

/// The outcome of a submit: a new job, or the one an earlier request with the same key started.
pub enum Submitted {
    New(JobStatus),
    Existing(JobStatus),
}

impl Jobs {
    /// Opens the job database and restores its jobs: finished ones answer as before, unfinished
    /// ones queue again under the same id. Starts the expiry task, which ends with `shutdown`.
    pub fn open(config: JobsConfig, shutdown: CancellationToken) -> Result<Self, OpenError> {
        let db = JobDb::open(&config.media_root)?;
        let stored = db.load_all()?;
        let state = State { db, jobs: HashMap::new(), waiting: VecDeque::new(), running: 0, idempotency: HashMap::new() };
        let (events, _) = broadcast::channel(config.event_buffer);
        let engine = EnginePool::new(config.mix_slots).map_err(OpenError::Engine)?;
        let jobs = Self {
            inner: Arc::new(Inner { config, state: Mutex::new(state), events, expiry: Notify::new(), metrics: Arc::default(), engine }),
        };
        jobs.restore(stored);
        tokio::spawn(jobs.clone().expire_finished_jobs(shutdown.clone()));
        tokio::spawn(jobs.clone().remove_old_outputs(shutdown));
        Ok(jobs)
    }

    fn restore(&self, stored: Vec<StoredJob>) {
        let mut state = self.lock();
        let mut requeued = Vec::new();
        for job in stored {
            let job_id = job.status.job_id;
            let finished_at = job.status.state.is_terminal().then(|| Instant::now() - job.status.updated_at.elapsed());
            if let Some(key) = &job.idempotency_key {
                state.idempotency.insert((job.status.project_id.clone(), key.clone()), job_id);
            }
            let unfinished = !job.status.state.is_terminal();
            state.jobs.insert(
                job_id,
                JobRecord {
                    published: JobEvent::new(job.status),
                    settings: job.settings,
                    stems: job.stems,
                    cancel: Arc::default(),
                    idempotency_key: job.idempotency_key,
                    attempts: job.attempts,
                    finished_at,
                },
            );
            if unfinished {
                requeued.push((job_id, job.attempts));
            }
        }
        for (job_id, attempts) in requeued {
            if attempts >= MAX_ATTEMPTS {
                let message = format!("The server stopped during this mix {attempts} times; it was not run again");
                self.apply_locked(&mut state, job_id, JobChange::Failed { code: ErrorCode::Interrupted, message });
            } else {
                state.waiting.push_back(job_id);
                let position = state.waiting.len() as u32;
                self.apply_locked(&mut state, job_id, JobChange::Requeued(position));
                tracing::info!(%job_id, attempts, "job re-queued after a restart");
            }
        }
        self.schedule(&mut state);
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub(super) fn subscribe_events(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.inner.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("job state is never left half-changed")
    }

    /// Queues a mix of `stems`. With an idempotency key already used for this project, returns
    /// that job instead.
    /// The job is in the database before this returns, so a crash right after the 202 loses nothing.
    pub fn submit(&self, project: ProjectId, settings: ValidSettings, stems: Vec<StemSource>, idempotency_key: Option<String>) -> Result<Submitted, JobError> {
        let mut state = self.lock();
        if let Some(key) = &idempotency_key {
            if let Some(existing) = state.idempotency.get(&(project.clone(), key.clone())).and_then(|id| state.jobs.get(id)) {
                return Ok(Submitted::Existing(existing.status().clone()));
            }
        }
        let job_id = JobId::new();
        let status = JobStatus::queued(job_id, project.clone(), state.waiting.len() as u32 + 1);
        state.db.insert(&StoredJob { status: status.clone(), settings: settings.clone(), stems: stems.clone(), idempotency_key: idempotency_key.clone(), attempts: 0 })?;
        if let Some(key) = &idempotency_key {
            state.idempotency.insert((project, key.clone()), job_id);
        }
        let published = JobEvent::new(status);
        state.jobs.insert(job_id, JobRecord { published: published.clone(), settings, stems, cancel: Arc::default(), idempotency_key, attempts: 0, finished_at: None });
        state.waiting.push_back(job_id);
        let _ = self.inner.events.send(published);
        tracing::info!(%job_id, "job queued");
        self.schedule(&mut state);
        Ok(Submitted::New(state.jobs[&job_id].status().clone()))
    }

    pub fn get(&self, job_id: JobId) -> Option<JobStatus> {
        self.lock().jobs.get(&job_id).map(|r| r.status().clone())
    }

    /// The project's jobs, newest first.
    pub fn for_project(&self, project: &ProjectId) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = self.lock().jobs.values().map(JobRecord::status).filter(|s| &s.project_id == project).cloned().collect();
        jobs.sort_by_key(|status| std::cmp::Reverse(status.created_at));
        jobs
    }

    pub fn has_project(&self, project: &ProjectId) -> bool {
        self.lock().jobs.values().any(|r| &r.status().project_id == project)
    }

    /// The current status of every job matching `filter`, as published, oldest first.
    pub(super) fn matching(&self, filter: impl Fn(&JobStatus) -> bool) -> Vec<Arc<JobEvent>> {
        let mut jobs: Vec<Arc<JobEvent>> = self.lock().jobs.values().filter(|r| filter(r.status())).map(|r| r.published.clone()).collect();
        jobs.sort_by_key(|event| event.status.created_at);
        jobs
    }

    /// How many jobs are in each state, and how many wait for a slot.
    pub fn counts(&self) -> (HashMap<JobState, usize>, usize) {
        let state = self.lock();
        let mut counts = HashMap::new();
        for record in state.jobs.values() {
            *counts.entry(record.status().state).or_default() += 1;
        }
        (counts, state.waiting.len())
    }

    /// Cancels a job: a queued one leaves the queue, a running one is told to stop. Either way it
    /// ends in `error` with `CANCELED` right away; the slot is freed when the engine has stopped.
    pub fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        let mut state = self.lock();
        let record = state.jobs.get(&job_id).filter(|r| &r.status().project_id == project).ok_or(JobError::NotFound)?;
        if record.status().state.is_terminal() {
            return Err(JobError::Finished);
        }
        record.cancel.store(true, Ordering::Relaxed);
        let was_queued = record.status().state == JobState::Queued;
        let status = self
            .apply_locked(&mut state, job_id, JobChange::Failed { code: ErrorCode::Canceled, message: "The mix was canceled".into() })
            .expect("a job that is not terminal can fail");
        if was_queued {
            state.waiting.retain(|id| *id != job_id);
            self.publish_queue_positions(&mut state);
        }
        Ok(status)
    }

    /// Applies one change to a job and publishes it. Returns the new status, or None when the
    /// change is not allowed (logged: it means a bug or a race with cancel).
    pub fn apply(&self, job_id: JobId, change: JobChange) -> Option<JobStatus> {
        let mut state = self.lock();
        self.apply_locked(&mut state, job_id, change)
    }

    fn apply_locked(&self, state: &mut State, job_id: JobId, change: JobChange) -> Option<JobStatus> {
        let State { db, jobs, .. } = state;
        let record = jobs.get_mut(&job_id)?;
        match record.status().apply(change) {
            Ok(next) => {
                let event = JobEvent::new(next);
                // Written before it is published. A failed write keeps the server answering from
                // memory; the job then restarts from its last stored state after a crash.
                if let Err(err) = db.update_status(&event) {
                    tracing::error!(%job_id, %err, "could not store a job change");
                }
                if event.status.state.is_terminal() {
                    record.finished_at = Some(Instant::now());
                    self.inner.expiry.notify_one();
                }
                record.published = event.clone();
                // No receivers is fine: nobody is watching.
                let _ = self.inner.events.send(event.clone());
                Some(event.status.clone())
            }
            Err(TransitionError::Unchanged) => None,
            Err(err) => {
                tracing::debug!(%job_id, %err, "change refused");
                None
            }
        }
    }

    /// Hands free slots to the head of the queue, then tells the rest their new positions.
    fn schedule(&self, state: &mut State) {
        while state.running < self.inner.config.mix_slots {
            let Some(job_id) = state.waiting.pop_front() else { break };
            state.running += 1;
            self.apply_locked(state, job_id, JobChange::Started);
            let State { db, jobs, .. } = &mut *state;
            let record = jobs.get_mut(&job_id).expect("waiting jobs are held");
            record.attempts += 1;
            if let Err(err) = db.set_attempts(job_id, record.attempts) {
                tracing::error!(%job_id, %err, "could not store the attempt count");
            }
            let record = &state.jobs[&job_id];
            let run = JobRun {
                jobs: self.clone(),
                job_id,
                project: record.status().project_id.clone(),
                settings: record.settings.clone(),
                stems: record.stems.clone(),
                cancel: record.cancel.clone(),
            };
            let span = tracing::info_span!("mix", %job_id, project = %run.project);
            tokio::spawn(run.run().instrument(span));
        }
        self.publish_queue_positions(state);
    }

    fn publish_queue_positions(&self, state: &mut State) {
        let waiting: Vec<JobId> = state.waiting.iter().copied().collect();
        for (index, job_id) in waiting.into_iter().enumerate() {
            self.apply_locked(state, job_id, JobChange::QueuePosition(index as u32 + 1));
        }
    }

    fn release_slot(&self) {
        let mut state = self.lock();
        state.running -= 1;
        self.schedule(&mut state);
    }

    /// Removes finished jobs once their TTL has passed, sleeping until the next one is due.
    async fn expire_finished_jobs(self, shutdown: CancellationToken) {
        loop {
            let next_deadline = {
                let mut state = self.lock();
                let now = Instant::now();
                let ttl = self.inner.config.job_ttl;
                let expired: Vec<JobId> = state.jobs.iter().filter(|(_, r)| r.finished_at.is_some_and(|t| t + ttl <= now)).map(|(id, _)| *id).collect();
                for job_id in expired {
                    if let Err(err) = state.db.delete(job_id) {
                        tracing::error!(%job_id, %err, "could not delete an expired job");
                        continue;
                    }
                    if let Some(record) = state.jobs.remove(&job_id) {
                        if let Some(key) = record.idempotency_key {
                            state.idempotency.remove(&(record.published.status.project_id.clone(), key));
                        }
                        tracing::debug!(%job_id, "job expired");
                    }
                }
                state.jobs.values().filter_map(|r| r.finished_at).min().map(|t| t + ttl)
            };
            let sleep = async {
                match next_deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.inner.expiry.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Deletes per-job output directories older than the retention, then sleeps until the oldest
    /// remaining one is due. New outputs are always due later, so nothing needs to wake it early.
    /// The legacy `mix_outputs/final_mix.wav` is a hard link and outlives its job's directory.
    async fn remove_old_outputs(self, shutdown: CancellationToken) {
        let retention = self.inner.config.output_retention.max(self.inner.config.job_ttl);
        loop {
            let root = self.inner.config.media_root.clone();
            let swept = tokio::task::spawn_blocking(move || sweep_outputs(&root, retention)).await;
            let wait = match swept {
                Ok(Ok(next_due)) => next_due.unwrap_or(retention),
                Ok(Err(err)) => {
                    tracing::warn!(%err, "could not sweep old outputs");
                    Duration::from_secs(3600)
                }
                Err(err) => {
                    tracing::error!(%err, "output sweep panicked");
                    Duration::from_secs(3600)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn output_path(&self, project: &ProjectId, job_id: JobId) -> PathBuf {
        self.inner.config.media_root.join(project.as_str()).join("mix_outputs").join(job_id.to_string()).join("final_mix.wav")
    }
}

/// Removes `{root}/{project}/mix_outputs/{job}/` directories whose file is older than `retention`;
/// returns how long until the oldest one left is due.
fn sweep_outputs(root: &std::path::Path, retention: Duration) -> std::io::Result<Option<Duration>> {
    let mut next_due: Option<Duration> = None;
    for project in std::fs::read_dir(root)? {
        let outputs = project?.path().join("mix_outputs");
        let Ok(jobs) = std::fs::read_dir(&outputs) else { continue };
        for job in jobs {
            let dir = job?.path();
            let Ok(modified) = std::fs::metadata(dir.join("final_mix.wav")).and_then(|m| m.modified()) else { continue };
            let age = modified.elapsed().unwrap_or_default();
            if age >= retention {
                std::fs::remove_dir_all(&dir)?;
                tracing::info!(dir = %dir.display(), "removed an output past its retention");
            } else {
                let due = retention - age;
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
        }
    }
    Ok(next_due)
}

/// The URL a finished job's file is served at.
pub fn result_url(project: &ProjectId, job_id: JobId) -> String {
    format!("/media/{project}/mix_outputs/{job_id}/final_mix.wav")
}

/// One job on its way through the engine.
struct JobRun {
    jobs: Jobs,
    job_id: JobId,
    project: ProjectId,
    settings: ValidSettings,
    stems: Vec<StemSource>,
    cancel: Arc<AtomicBool>,
}

impl JobRun {
    async fn run(self) {
        let started = Instant::now();
        let output = self.jobs.output_path(&self.project, self.job_id);
        let observer = JobObserver::new(self.jobs.clone(), self.job_id, self.cancel.clone());
        let span = tracing::Span::current();
        let temporary = output.with_file_name(format!(".final_mix.{}.partial", self.job_id));
        let (stems, settings, engine_output) = (self.stems.clone(), self.settings.clone(), output.clone());
        let outcome = self.jobs.inner.engine.run(move || span.in_scope(|| audio::mix(&stems, &settings, &engine_output, &temporary, &observer))).await;

        let change = match outcome {
            Ok(Ok(report)) if !self.cancel.load(Ordering::Relaxed) => self.complete(&output, report).await,
            Ok(Ok(_)) | Ok(Err(AudioError::Canceled)) => {
                let _ = tokio::fs::remove_dir_all(output.parent().expect("outputs live in a job directory")).await;
                JobChange::Failed { code: ErrorCode::Canceled, message: "The mix was canceled".into() }
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "mix failed");
                failure(&err)
            }
            Err(panic) => {
                let panic = audio::panic_message(&*panic);
                tracing::error!(%panic, "mix engine panicked");
                JobChange::Failed { code: ErrorCode::Internal, message: "The mix engine failed unexpectedly".into() }
            }
        };
        let succeeded = matches!(change, JobChange::Completed { .. });
        if let Some(status) = self.jobs.apply(self.job_id, change) {
            tracing::info!(state = status.state.as_str(), seconds = started.elapsed().as_secs_f64(), "job finished");
        }
        if succeeded {
            self.jobs.metrics().observe_mix(started.elapsed());
        }
        self.jobs.release_slot();
    }

    /// Points the legacy "newest mix" path at this output, then reports completion.
    async fn complete(&self, output: &std::path::Path, report: MixReport) -> JobChange {
        let outputs_dir = output.parent().and_then(|p| p.parent()).expect("outputs live under mix_outputs");
        let legacy = outputs_dir.join("final_mix.wav");
        let staging = outputs_dir.join(format!(".final_mix.{}.partial", self.job_id));
        let linked = async {
            let _ = tokio::fs::remove_file(&staging).await;
            if tokio::fs::hard_link(output, &staging).await.is_err() {
                tokio::fs::copy(output, &staging).await?;
            }
            tokio::fs::rename(&staging, &legacy).await
        };
        if let Err(err) = linked.await {
            tracing::warn!(%err, "could not update the legacy final_mix.wav");
        }
        JobChange::Completed { result_url: result_url(&self.project, self.job_id), report: Box::new(report) }
    }
}

fn failure(err: &AudioError) -> JobChange {
    let code = match err {
        AudioError::NoStems => ErrorCode::NoStems,
        AudioError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorCode::StemMissing,
        AudioError::Open { .. } | AudioError::Internal(_) => ErrorCode::Internal,
        AudioError::Unsupported { .. } => ErrorCode::UnsupportedAudio,
        AudioError::Decode { .. } => ErrorCode::DecodeFailed,
        AudioError::Settings(_) => ErrorCode::InvalidSettings,
        AudioError::TooLong { .. } => ErrorCode::OutputTooLong,
        AudioError::Canceled => ErrorCode::Canceled,
        AudioError::Export(io) if io.kind() == std::io::ErrorKind::StorageFull => ErrorCode::InsufficientStorage,
        AudioError::Export(_) => ErrorCode::ExportFailed,
    };
    let message = match err {
        AudioError::Internal(_) => "The mix engine failed unexpectedly".to_string(),
        AudioError::Open { stem, .. } if code == ErrorCode::StemMissing => format!("Stem \"{stem}\" was deleted before the mix could use it"),
        AudioError::Export(_) if code == ErrorCode::InsufficientStorage => "The disk is full: the mix could not be written".to_string(),
        other => other.to_string(),
    };
    JobChange::Failed { code, message }
}

/// Progress within a stage is published at most this often. A progress bar needs no more, and
/// every change is stored and sent to every subscriber: a short mix would otherwise make a
/// hundred changes in a second. A new stage is published at once.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Turns the engine's stage reports into job changes: every new stage, and a rise in whole
/// percent at most once per [`PROGRESS_INTERVAL`].
struct JobObserver {
    jobs: Jobs,
    job_id: JobId,
    cancel: Arc<AtomicBool>,
    published: Mutex<Published>,
}

struct Published {
    state: JobState,
    progress: u8,
    at: std::time::Instant,
}

impl JobObserver {
    fn new(jobs: Jobs, job_id: JobId, cancel: Arc<AtomicBool>) -> Self {
        let published = Published { state: JobState::Running, progress: 0, at: std::time::Instant::now() };
        Self { jobs, job_id, cancel, published: Mutex::new(published) }
    }
}

impl MixObserver for JobObserver {
    fn progress(&self, stage: Stage, fraction: f64) {
        let state = JobState::from(stage);
        let progress = Progress::running(stage.percent(fraction));
        {
            let mut published = self.published.lock().expect("never poisoned");
            let now = std::time::Instant::now();
            let news = if state == published.state {
                progress.value() > published.progress && now.duration_since(published.at) >= PROGRESS_INTERVAL
            } else {
                state > published.state
            };
            if !news {
                return;
            }
            *published = Published { state, progress: progress.value(), at: now };
        }
        self.jobs.apply(self.job_id, JobChange::Progress { state, progress, message: stage.label().to_string() });
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::MixSettings;
    use crate::jobs::model::Progress;

    fn default_settings() -> ValidSettings {
        MixSettings::default().validate(&[], 48_000).unwrap()
    }

    fn stored(state_changes: &[JobChange], attempts: u32) -> StoredJob {
        let mut status = JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1);
        for change in state_changes {
            status = status.apply(change.clone()).unwrap();
        }
        StoredJob { status, settings: default_settings(), stems: Vec::new(), idempotency_key: Some("k".into()), attempts }
    }

    #[tokio::test]
    async fn a_restart_restores_finished_jobs_and_gives_up_on_crash_loops() {
        let dir = tempfile::tempdir().unwrap();
        let failed = stored(&[JobChange::Failed { code: ErrorCode::DecodeFailed, message: "broken".into() }], 1);
        let progress = JobChange::Progress { state: JobState::Mixing, progress: Progress::running(71.0), message: "Mixing".into() };
        let crash_looping = stored(&[JobChange::Started, progress], MAX_ATTEMPTS);
        {
            let db = JobDb::open(dir.path()).unwrap();
            db.insert(&failed).unwrap();
            db.insert(&crash_looping).unwrap();
        }
        let config = JobsConfig {
            mix_slots: 1,
            job_ttl: Duration::from_secs(3600),
            output_retention: Duration::from_secs(3600),
            media_root: dir.path().to_path_buf(),
            event_buffer: EVENT_BUFFER,
        };
        let jobs = Jobs::open(config, CancellationToken::new()).unwrap();

        assert_eq!(jobs.get(failed.status.job_id), Some(failed.status.clone()), "a finished job answers exactly as before");
        let given_up = jobs.get(crash_looping.status.job_id).unwrap();
        assert_eq!((given_up.state, given_up.error_code), (JobState::Error, Some(ErrorCode::Interrupted)));
        assert_eq!(given_up.seq, crash_looping.status.seq + 1);
        assert_eq!(given_up.progress.value(), 71);
        // The Idempotency-Key still finds its job.
        let again = jobs.submit("p1".parse().unwrap(), default_settings(), Vec::new(), Some("k".into())).unwrap();
        assert!(matches!(again, Submitted::Existing(status) if status.job_id == failed.status.job_id || status.job_id == crash_looping.status.job_id));
        // And the change was stored: a second restart sees the same.
        drop(jobs);
        let stored_again = JobDb::open(dir.path()).unwrap().load_all().unwrap();
        assert!(stored_again.iter().any(|j| j.status == given_up));
    }

    #[tokio::test]
    async fn progress_within_a_stage_is_published_at_most_once_per_interval_and_every_stage_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // No mixer slots: the job is started by hand and the engine never runs.
        let config = JobsConfig { mix_slots: 0, job_ttl: Duration::from_secs(3600), output_retention: Duration::from_secs(3600), media_root: dir.path().into(), event_buffer: EVENT_BUFFER };
        let jobs = Jobs::open(config, CancellationToken::new()).unwrap();
        let Submitted::New(queued) = jobs.submit("p1".parse().unwrap(), default_settings(), Vec::new(), None).unwrap() else { unreachable!() };
        jobs.apply(queued.job_id, JobChange::Started).unwrap();
        let mut events = jobs.subscribe_events();
        let observer = JobObserver::new(jobs.clone(), queued.job_id, Arc::new(AtomicBool::new(false)));

        let started = std::time::Instant::now();
        for stage in [Stage::LoadingStems, Stage::AligningStems, Stage::ProcessingTracks] {
            for step in 0..=100 {
                observer.progress(stage, step as f64 / 100.0);
            }
        }
        let elapsed = started.elapsed();
        // Once the interval has passed, the next rise is published.
        observer.published.lock().unwrap().at -= PROGRESS_INTERVAL;
        observer.progress(Stage::ProcessingTracks, 1.0);

        let mut published = Vec::new();
        while let Ok(event) = events.try_recv() {
            published.push((event.status.state, event.status.progress.value()));
        }
        let (last, reports) = published.split_last().unwrap();
        let stages: Vec<_> = reports.iter().map(|(state, _)| *state).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        assert_eq!(stages, [JobState::LoadingStems, JobState::AligningStems, JobState::ProcessingTracks], "each stage at once: {published:?}");
        let rises = reports.len() - stages.len();
        let allowed = (elapsed.as_secs_f64() / PROGRESS_INTERVAL.as_secs_f64()).floor() as usize;
        assert!(rises <= allowed, "{rises} rises published in {elapsed:?} from 303 reports");
        assert_eq!(*last, (JobState::ProcessingTracks, 70));
        assert!(published.windows(2).all(|pair| pair[0] < pair[1]), "never backwards: {published:?}");
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[test]
    fn outputs_past_retention_are_removed_and_the_next_due_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let old = root.path().join("p1/mix_outputs/old");
        let fresh = root.path().join("p1/mix_outputs/fresh");
        for dir in [&old, &fresh] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("final_mix.wav"), b"RIFF").unwrap();
        }
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(old.join("final_mix.wav")).unwrap().set_modified(an_hour_ago).unwrap();
        std::fs::write(root.path().join("p1/mix_outputs/final_mix.wav"), b"legacy").unwrap();

        let next = sweep_outputs(root.path(), Duration::from_secs(1800)).unwrap().unwrap();
        assert!(!old.exists());
        assert!(fresh.exists());
        assert!(root.path().join("p1/mix_outputs/final_mix.wav").exists(), "the legacy newest mix stays");
        assert!(next > Duration::from_secs(1790) && next <= Duration::from_secs(1800), "{next:?}");
    }
}
