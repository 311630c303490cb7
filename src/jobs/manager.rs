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

use super::metrics::Metrics;
use super::model::{ErrorCode, JobChange, JobId, JobState, JobStatus, ProjectId, Progress, TransitionError};
use crate::audio::{self, AudioError, MixObserver, MixReport, MixSettings, Stage, StemSource};

/// Room for bursts of changes; a subscriber that falls further behind is resynchronised.
const EVENT_BUFFER: usize = 4096;

#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub mix_slots: usize,
    pub job_ttl: Duration,
    /// The media root: outputs go to `{media_root}/{project}/mix_outputs/{job}/final_mix.wav`.
    pub media_root: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("job not found")]
    NotFound,
    #[error("the job has already finished")]
    Finished,
}

/// A handle on all jobs; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    config: JobsConfig,
    state: Mutex<State>,
    events: broadcast::Sender<JobStatus>,
    expiry: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobId, JobRecord>,
    waiting: VecDeque<JobId>,
    running: usize,
    idempotency: HashMap<(ProjectId, String), JobId>,
}

struct JobRecord {
    status: JobStatus,
    settings: MixSettings,
    stems: Vec<StemSource>,
    cancel: Arc<AtomicBool>,
    idempotency_key: Option<String>,
    finished_at: Option<Instant>,
}

/// The outcome of a submit: a new job, or the one an earlier request with the same key started.
pub enum Submitted {
    New(JobStatus),
    Existing(JobStatus),
}

impl Jobs {
    /// Starts the expiry task; it ends when `shutdown` is cancelled.
    pub fn new(config: JobsConfig, shutdown: CancellationToken) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let jobs = Self {
            inner: Arc::new(Inner { config, state: Mutex::default(), events, expiry: Notify::new(), metrics: Arc::default() }),
        };
        tokio::spawn(jobs.clone().expire_finished_jobs(shutdown));
        jobs
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub(super) fn subscribe_events(&self) -> broadcast::Receiver<JobStatus> {
        self.inner.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("job state is never left half-changed")
    }

    /// Queues a mix of `stems`. With an idempotency key already used for this project, returns
    /// that job instead.
    pub fn submit(&self, project: ProjectId, settings: MixSettings, stems: Vec<StemSource>, idempotency_key: Option<String>) -> Submitted {
        let mut state = self.lock();
        if let Some(key) = &idempotency_key {
            if let Some(existing) = state.idempotency.get(&(project.clone(), key.clone())).and_then(|id| state.jobs.get(id)) {
                return Submitted::Existing(existing.status.clone());
            }
        }
        let job_id = JobId::new();
        let status = JobStatus::queued(job_id, project.clone(), state.waiting.len() as u32 + 1);
        if let Some(key) = &idempotency_key {
            state.idempotency.insert((project, key.clone()), job_id);
        }
        state.jobs.insert(
            job_id,
            JobRecord { status: status.clone(), settings, stems, cancel: Arc::default(), idempotency_key, finished_at: None },
        );
        state.waiting.push_back(job_id);
        let _ = self.inner.events.send(status.clone());
        tracing::info!(%job_id, "job queued");
        self.schedule(&mut state);
        let status = state.jobs[&job_id].status.clone();
        Submitted::New(status)
    }

    pub fn get(&self, job_id: JobId) -> Option<JobStatus> {
        self.lock().jobs.get(&job_id).map(|r| r.status.clone())
    }

    /// The project's jobs, newest first.
    pub fn for_project(&self, project: &ProjectId) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = self.lock().jobs.values().filter(|r| &r.status.project_id == project).map(|r| r.status.clone()).collect();
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        jobs
    }

    /// Every job matching `filter`, oldest first.
    pub fn matching(&self, filter: impl Fn(&JobStatus) -> bool) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> = self.lock().jobs.values().map(|r| &r.status).filter(|s| filter(s)).cloned().collect();
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        jobs
    }

    /// How many jobs are in each state, and how many wait for a slot.
    pub fn counts(&self) -> (HashMap<JobState, usize>, usize) {
        let state = self.lock();
        let mut counts = HashMap::new();
        for record in state.jobs.values() {
            *counts.entry(record.status.state).or_default() += 1;
        }
        (counts, state.waiting.len())
    }

    /// Cancels a job: a queued one leaves the queue, a running one is told to stop. Either way it
    /// ends in `error` with `CANCELED` right away; the slot is freed when the engine has stopped.
    pub fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        let mut state = self.lock();
        let record = state.jobs.get(&job_id).filter(|r| &r.status.project_id == project).ok_or(JobError::NotFound)?;
        if record.status.state.is_terminal() {
            return Err(JobError::Finished);
        }
        record.cancel.store(true, Ordering::Relaxed);
        let was_queued = record.status.state == JobState::Queued;
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
        let record = state.jobs.get_mut(&job_id)?;
        match record.status.apply(change) {
            Ok(next) => {
                if next.state.is_terminal() {
                    record.finished_at = Some(Instant::now());
                    self.inner.expiry.notify_one();
                }
                record.status = next.clone();
                // No receivers is fine: nobody is watching.
                let _ = self.inner.events.send(next.clone());
                Some(next)
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
            let record = &state.jobs[&job_id];
            let run = JobRun {
                jobs: self.clone(),
                job_id,
                project: record.status.project_id.clone(),
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
                    if let Some(record) = state.jobs.remove(&job_id) {
                        if let Some(key) = record.idempotency_key {
                            state.idempotency.remove(&(record.status.project_id, key));
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

    fn output_path(&self, project: &ProjectId, job_id: JobId) -> PathBuf {
        self.inner.config.media_root.join(project.as_str()).join("mix_outputs").join(job_id.to_string()).join("final_mix.wav")
    }
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
    settings: MixSettings,
    stems: Vec<StemSource>,
    cancel: Arc<AtomicBool>,
}

impl JobRun {
    async fn run(self) {
        let started = Instant::now();
        let output = self.jobs.output_path(&self.project, self.job_id);
        let observer = JobObserver { jobs: self.jobs.clone(), job_id: self.job_id, cancel: self.cancel.clone(), last: Mutex::new((JobState::Running, 0)) };
        let span = tracing::Span::current();
        let (stems, settings, engine_output) = (self.stems.clone(), self.settings.clone(), output.clone());
        // The engine is CPU work: it runs on the blocking pool, where a panic stays contained.
        let outcome = tokio::task::spawn_blocking(move || span.in_scope(|| audio::mix(&stems, &settings, &engine_output, &observer))).await;

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
            Err(join_error) => {
                tracing::error!(error = %join_error, "mix engine panicked");
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
        AudioError::Export(io) if io.raw_os_error() == Some(28) => ErrorCode::InsufficientStorage,
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

/// Turns the engine's stage reports into job changes, one per stage or whole percent.
struct JobObserver {
    jobs: Jobs,
    job_id: JobId,
    cancel: Arc<AtomicBool>,
    last: Mutex<(JobState, u8)>,
}

impl MixObserver for JobObserver {
    fn progress(&self, stage: Stage, fraction: f64) {
        let state = JobState::from(stage);
        let progress = Progress::running(stage.percent(fraction));
        {
            let mut last = self.last.lock().expect("never poisoned");
            if (state, progress.value()) <= *last {
                return;
            }
            *last = (state, progress.value());
        }
        self.jobs.apply(self.job_id, JobChange::Progress { state, progress, message: stage.label().to_string() });
    }

    fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}
