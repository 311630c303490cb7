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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::db::{DbError, JobDb, StoredJob};
use super::engine::EnginePool;
use super::layout::MediaLayout;
use super::metrics::Metrics;
use super::model::{ErrorCode, JobChange, JobEvent, JobId, JobState, JobStatus, Progress, ProjectId, TransitionError};
use super::outbox::Outbox;
use super::webhook::{Delivery, WebhookSpec};
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
    /// Where results and the job database go.
    pub layout: MediaLayout,
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
    outbox: Arc<Outbox>,
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
    webhook: Option<WebhookSpec>,
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
        let db = JobDb::open(&config.layout.database_dir())?;
        let outbox = Arc::new(Outbox::open(&config.layout.database_dir())?);
        let stored = db.load_all()?;
        let state = State { db, jobs: HashMap::new(), waiting: VecDeque::new(), running: 0, idempotency: HashMap::new() };
        let (events, _) = broadcast::channel(config.event_buffer);
        let engine = EnginePool::new(config.mix_slots).map_err(OpenError::Engine)?;
        let jobs = Self { inner: Arc::new(Inner { config, state: Mutex::new(state), events, expiry: Notify::new(), metrics: Arc::default(), engine, outbox }) };
        jobs.restore(stored);
        tokio::spawn(jobs.clone().expire_finished_jobs(shutdown.clone()));
        tokio::spawn(jobs.clone().remove_old_outputs(shutdown));
        Ok(jobs)
    }

    fn restore(&self, stored: Vec<StoredJob>) {
        let mut state = self.lock();
        let mut requeued = Vec::new();
        for job in stored {
            let job_id = job.status.job_id();
            let finished_at = job.status.state().is_terminal().then(|| Instant::now() - job.status.updated_at().elapsed());
            if let Some(key) = &job.idempotency_key {
                state.idempotency.insert((job.status.project_id().clone(), key.clone()), job_id);
            }
            let unfinished = !job.status.state().is_terminal();
            state.jobs.insert(
                job_id,
                JobRecord {
                    published: JobEvent::new(job.status),
                    settings: job.settings,
                    stems: job.stems,
                    cancel: Arc::default(),
                    idempotency_key: job.idempotency_key,
                    webhook: job.webhook,
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

    /// The webhook outbox, for the dispatcher and the attempts route.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.inner.outbox
    }

    /// The webhook secret kept in the job store, made by `generate` at the first start.
    pub fn webhook_secret(&self, generate: impl FnOnce() -> String) -> Result<String, JobError> {
        Ok(self.lock().db.webhook_secret(generate)?)
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
    pub fn submit(
        &self,
        project: ProjectId,
        settings: ValidSettings,
        stems: Vec<StemSource>,
        idempotency_key: Option<String>,
        webhook: Option<WebhookSpec>,
    ) -> Result<Submitted, JobError> {
        let mut state = self.lock();
        if let Some(key) = &idempotency_key {
            if let Some(existing) = state.idempotency.get(&(project.clone(), key.clone())).and_then(|id| state.jobs.get(id)) {
                return Ok(Submitted::Existing(existing.status().clone()));
            }
        }
        let job_id = JobId::new();
        let status = JobStatus::queued(job_id, project.clone(), state.waiting.len() as u32 + 1);
        state.db.insert(&StoredJob {
            status: status.clone(),
            settings: settings.clone(),
            stems: stems.clone(),
            idempotency_key: idempotency_key.clone(),
            webhook: webhook.clone(),
            attempts: 0,
        })?;
        if let Some(key) = &idempotency_key {
            state.idempotency.insert((project, key.clone()), job_id);
        }
        let published = JobEvent::new(status);
        state.jobs.insert(
            job_id,
            JobRecord { published: published.clone(), settings, stems, cancel: Arc::default(), idempotency_key, webhook, attempts: 0, finished_at: None },
        );
        state.waiting.push_back(job_id);
        let _ = self.inner.events.send(published);
        tracing::info!(%job_id, "job queued");
        self.schedule(&mut state);
        Ok(Submitted::New(state.jobs[&job_id].status().clone()))
    }

    /// A job's status as it was last published, serialised once for everyone who asks.
    pub fn published(&self, job_id: JobId) -> Option<Arc<JobEvent>> {
        self.lock().jobs.get(&job_id).map(|r| r.published.clone())
    }

    /// The project's newest job, as last published.
    pub fn newest_published(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
        self.lock().jobs.values().filter(|r| r.status().project_id() == project).max_by_key(|r| r.status().created_at()).map(|r| r.published.clone())
    }

    /// The project's jobs, newest first.
    pub fn for_project(&self, project: &ProjectId) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = self.lock().jobs.values().map(JobRecord::status).filter(|s| s.project_id() == project).cloned().collect();
        jobs.sort_by_key(|status| std::cmp::Reverse(status.created_at()));
        jobs
    }

    pub fn has_project(&self, project: &ProjectId) -> bool {
        self.lock().jobs.values().any(|r| r.status().project_id() == project)
    }

    /// The current status of every job matching `filter`, as published, oldest first.
    pub(super) fn matching(&self, filter: impl Fn(&JobStatus) -> bool) -> Vec<Arc<JobEvent>> {
        let mut jobs: Vec<Arc<JobEvent>> = self.lock().jobs.values().filter(|r| filter(r.status())).map(|r| r.published.clone()).collect();
        jobs.sort_by_key(|event| event.status.created_at());
        jobs
    }

    /// How many jobs are in each state, and how many wait for a slot.
    pub fn counts(&self) -> (HashMap<JobState, usize>, usize) {
        let state = self.lock();
        let mut counts = HashMap::new();
        for record in state.jobs.values() {
            *counts.entry(record.status().state()).or_default() += 1;
        }
        (counts, state.waiting.len())
    }

    /// Cancels a job: a queued one leaves the queue, a running one is told to stop. Either way it
    /// ends in `error` with `CANCELED` right away; the slot is freed when the engine has stopped.
    pub fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        let mut state = self.lock();
        let record = state.jobs.get(&job_id).filter(|r| r.status().project_id() == project).ok_or(JobError::NotFound)?;
        if record.status().state().is_terminal() {
            return Err(JobError::Finished);
        }
        record.cancel.store(true, Ordering::Relaxed);
        let was_queued = record.status().state() == JobState::Queued;
        let status = self.apply_locked(&mut state, job_id, JobChange::canceled()).expect("a job that is not terminal can fail");
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
                // A run before this one (cut short by a restart) already announced the start.
                let delivery = record.webhook.as_ref().and_then(|webhook| Delivery::caused_by(webhook, &event, record.attempts == 0));
                // Written before it is published, with the webhook delivery it causes. A failed
                // write keeps the server answering from memory; the job then restarts from its
                // last stored state after a crash.
                match db.update_status(&event, delivery.as_ref()) {
                    Ok(()) if delivery.is_some() => self.inner.outbox.wake(),
                    Ok(()) => {}
                    Err(err) => tracing::error!(%job_id, %err, "could not store a job change"),
                }
                if event.status.state().is_terminal() {
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
                project: record.status().project_id().clone(),
                settings: record.settings.clone(),
                stems: record.stems.clone(),
                cancel: record.cancel.clone(),
            };
            // A root span: this runs inside whichever job freed the slot, and a child of that
            // job's span would keep it (and every job before it) alive and in every log line.
            let span = tracing::info_span!(parent: None, "mix", %job_id, project = %run.project);
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
                            state.idempotency.remove(&(record.published.status.project_id().clone(), key));
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
            let layout = self.inner.config.layout.clone();
            let swept = tokio::task::spawn_blocking(move || layout.remove_old_results(retention)).await;
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
        let output = self.layout().result(&self.project, self.job_id);
        let observer = JobObserver::new(self.jobs.clone(), self.job_id, self.cancel.clone());
        let span = tracing::Span::current();
        let temporary = self.layout().result_temporary(&self.project, self.job_id);
        let (stems, settings, engine_output) = (self.stems.clone(), self.settings.clone(), output.clone());
        let outcome = self.jobs.inner.engine.run(move || span.in_scope(|| audio::mix(&stems, &settings, &engine_output, &temporary, &observer))).await;

        let change = match outcome {
            Ok(Ok(report)) if !self.cancel.load(Ordering::Relaxed) => self.complete(&output, report).await,
            Ok(Ok(_)) | Ok(Err(AudioError::Canceled)) => {
                let _ = tokio::fs::remove_dir_all(self.layout().job_outputs(&self.project, self.job_id)).await;
                JobChange::canceled()
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
            tracing::info!(state = status.state().as_str(), seconds = started.elapsed().as_secs_f64(), "job finished");
        }
        if succeeded {
            self.jobs.metrics().observe_mix(started.elapsed());
        }
        self.jobs.release_slot();
    }

    fn layout(&self) -> &MediaLayout {
        &self.jobs.inner.config.layout
    }

    /// Points the legacy "newest mix" path at this output, then reports completion.
    async fn complete(&self, output: &std::path::Path, report: MixReport) -> JobChange {
        let legacy = self.layout().newest_result(&self.project);
        let staging = self.layout().newest_result_temporary(&self.project, self.job_id);
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
        JobChange::Completed { result_url: MediaLayout::result_url(&self.project, self.job_id), report: Box::new(report) }
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
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

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
    at: Instant,
}

impl JobObserver {
    fn new(jobs: Jobs, job_id: JobId, cancel: Arc<AtomicBool>) -> Self {
        let published = Published { state: JobState::Running, progress: 0, at: Instant::now() };
        Self { jobs, job_id, cancel, published: Mutex::new(published) }
    }
}

impl MixObserver for JobObserver {
    fn progress(&self, stage: Stage, fraction: f64) {
        let state = JobState::from(stage);
        let progress = Progress::running(stage.percent(fraction));
        {
            let mut published = self.published.lock().expect("never poisoned");
            // tokio's clock: the engine's threads are outside the runtime and read the system
            // clock through it, while a test that pauses time controls it.
            let now = Instant::now();
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

    fn stored(state_changes: &[JobChange], attempts: u32, key: &str) -> StoredJob {
        let mut status = JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1);
        for change in state_changes {
            status = status.apply(change.clone()).unwrap();
        }
        StoredJob { status, settings: default_settings(), stems: Vec::new(), idempotency_key: Some(key.into()), webhook: None, attempts }
    }

    fn config(dir: &std::path::Path, mix_slots: usize) -> JobsConfig {
        JobsConfig {
            mix_slots,
            job_ttl: Duration::from_secs(3600),
            output_retention: Duration::from_secs(3600),
            layout: MediaLayout::new(dir),
            event_buffer: EVENT_BUFFER,
        }
    }

    fn status_of(jobs: &Jobs, job_id: JobId) -> Option<JobStatus> {
        jobs.published(job_id).map(|event| event.status.clone())
    }

    fn submit(jobs: &Jobs, key: Option<&str>) -> Submitted {
        jobs.submit("p1".parse().unwrap(), default_settings(), Vec::new(), key.map(String::from), None).unwrap()
    }

    #[tokio::test]
    async fn a_restart_restores_finished_jobs_and_gives_up_on_crash_loops() {
        let dir = tempfile::tempdir().unwrap();
        let failed = stored(&[JobChange::Failed { code: ErrorCode::DecodeFailed, message: "broken".into() }], 1, "first");
        let progress = JobChange::Progress { state: JobState::Mixing, progress: Progress::running(71.0), message: "Mixing".into() };
        let crash_looping = stored(&[JobChange::Started, progress], MAX_ATTEMPTS, "second");
        {
            let db = JobDb::open(&MediaLayout::new(dir.path()).database_dir()).unwrap();
            db.insert(&failed).unwrap();
            db.insert(&crash_looping).unwrap();
        }
        let jobs = Jobs::open(config(dir.path(), 1), CancellationToken::new()).unwrap();

        assert_eq!(status_of(&jobs, failed.status.job_id()), Some(failed.status.clone()), "a finished job answers exactly as before");
        let given_up = status_of(&jobs, crash_looping.status.job_id()).unwrap();
        assert_eq!((given_up.state(), given_up.error_code()), (JobState::Error, Some(ErrorCode::Interrupted)));
        assert_eq!(given_up.seq(), crash_looping.status.seq() + 1);
        assert_eq!(given_up.progress().value(), 71);
        // Each Idempotency-Key still finds its own job.
        for (key, job) in [("first", &failed), ("second", &crash_looping)] {
            let Submitted::Existing(again) = submit(&jobs, Some(key)) else { panic!("{key} started a new job") };
            assert_eq!(again.job_id(), job.status.job_id(), "{key}");
        }
        // And the change was stored: a second restart sees the same.
        drop(jobs);
        let stored_again = JobDb::open(&MediaLayout::new(dir.path()).database_dir()).unwrap().load_all().unwrap();
        let restored = stored_again.iter().find(|j| j.status.job_id() == given_up.job_id()).unwrap();
        assert_eq!(restored.status, given_up);
    }

    #[tokio::test(start_paused = true)]
    async fn progress_within_a_stage_is_published_at_most_once_per_interval_and_every_stage_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // No mixer slots: the job is started by hand and the engine never runs.
        let jobs = Jobs::open(config(dir.path(), 0), CancellationToken::new()).unwrap();
        let Submitted::New(queued) = submit(&jobs, None) else { unreachable!() };
        jobs.apply(queued.job_id(), JobChange::Started).unwrap();
        let mut events = jobs.subscribe_events();
        let observer = JobObserver::new(jobs.clone(), queued.job_id(), Arc::new(AtomicBool::new(false)));
        let mut published = || {
            let mut seen = Vec::new();
            while let Ok(event) = events.try_recv() {
                seen.push((event.status.state(), event.status.progress().value()));
            }
            seen
        };

        // Time stands still: each new stage is published at once, its rises within it are not.
        for stage in [Stage::LoadingStems, Stage::AligningStems, Stage::ProcessingTracks] {
            for step in 0..=100 {
                observer.progress(stage, step as f64 / 100.0);
            }
        }
        assert_eq!(published(), [(JobState::LoadingStems, 2), (JobState::AligningStems, 8), (JobState::ProcessingTracks, 15)]);
        // Just short of the interval, a rise still waits; at the interval it goes out.
        tokio::time::advance(PROGRESS_INTERVAL - Duration::from_millis(1)).await;
        observer.progress(Stage::ProcessingTracks, 0.5);
        assert_eq!(published(), []);
        tokio::time::advance(Duration::from_millis(1)).await;
        observer.progress(Stage::ProcessingTracks, 0.5);
        assert_eq!(published(), [(JobState::ProcessingTracks, 42)]);
        // A lower figure is never published, however long it has been.
        tokio::time::advance(PROGRESS_INTERVAL).await;
        observer.progress(Stage::ProcessingTracks, 0.1);
        assert_eq!(published(), []);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_job_expires_exactly_when_its_ttl_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(config(dir.path(), 0), CancellationToken::new()).unwrap();
        let Submitted::New(queued) = submit(&jobs, Some("key")) else { unreachable!() };
        let Submitted::New(unfinished) = submit(&jobs, None) else { unreachable!() };
        jobs.cancel(queued.project_id(), queued.job_id()).unwrap();

        // Sleeping lets the expiry task run up to the paused clock.
        tokio::time::sleep(Duration::from_millis(3_599_999)).await;
        assert!(status_of(&jobs, queued.job_id()).is_some(), "kept until its TTL has passed");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(status_of(&jobs, queued.job_id()), None, "gone once it has");
        assert!(matches!(submit(&jobs, Some("key")), Submitted::New(_)), "its Idempotency-Key is free again");
        tokio::time::sleep(Duration::from_secs(7 * 24 * 3600)).await;
        assert!(status_of(&jobs, unfinished.job_id()).is_some(), "a job that has not finished never expires");
    }
}
