//! This node's mixer slots. With a slot free the runner claims the oldest queued job from the
//! store (whichever node queued it), and runs it under a lease it renews every third of its
//! length. Every change the run makes is a write fenced on that lease, made in order by the run's
//! own writer; a write or renewal that finds the lease gone stops the mix, and nothing of the old
//! run lands. The result is written under an attempt-specific name and linked into place just
//! before the fenced completion. The runner also rescues jobs whose lease expired (their node died
//! or stalled), and on shutdown hands this node's runs back to the queue at once.
//!
//! A run's background work (the lease keeper, the writer) is owned by the run and aborted with
//! it, and its entry among this node's runs goes with it, however it ends. A run that panics
//! ends its job in `error` (`INTERNAL`) at once, fenced on its lease; should the store not take
//! that, the lease, no longer renewed, expires and another run rescues the job.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use uuid::Uuid;

use super::engine::EnginePool;
use super::live::LiveView;
use super::metrics::{LeaseEvent, Metrics};
use super::model::{ErrorCode, JobChange, JobState, JobStatus, Progress, ResultFile};
use super::runs::{lose_lease, LocalRuns, RunGuard};
use super::store::{Change, Claim, Lease, Store, StoreError, StoredSettings};
use super::webhook::WebhookSpec;
use crate::audio::{self, AudioError, Delivered, Format, FormatSettings, MixObserver, MixReport, Outputs, Stage, StemSource};
use crate::ids::{JobId, ProjectId};
use crate::media::{CachedFile, JobFile, Media, MediaError, MediaLayout};

/// How often the queue is checked without a wake-up (a notification may be lost).
const CLAIM_POLL: Duration = Duration::from_secs(1);
/// Pause after the store failed before the runner tries again.
const STORE_RETRY: Duration = Duration::from_millis(250);

/// What this node's slots run with.
pub(super) struct Runner {
    pub store: Store,
    pub live: Arc<LiveView>,
    pub runs: Arc<LocalRuns>,
    pub metrics: Arc<Metrics>,
    pub engine: EnginePool,
    /// This process run's lease owner id.
    pub owner: Uuid,
    pub slots: usize,
    /// How long a node holds a job without renewing it.
    pub lease: Duration,
    /// Where stems are read and results kept.
    pub media: Media,
    /// A job was queued, or a slot may be free.
    pub wake: Arc<Notify>,
    pub faults: FaultHook,
}

/// A test's way to make a run panic where a bug would (in the writer, or as the run ends), to show
/// that no panic wedges a job. Without `cfg(test)` it holds nothing and does nothing.
#[derive(Clone, Default)]
pub(super) struct FaultHook(#[cfg(test)] Option<Arc<Fault>>);

#[cfg(test)]
type Fault = dyn Fn(&JobChange) + Send + Sync;

impl FaultHook {
    #[cfg(test)]
    pub fn new(hook: impl Fn(&JobChange) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(hook)))
    }

    /// Called before each change a run writes.
    fn before_write(&self, _change: &JobChange) {
        #[cfg(test)]
        if let Some(hook) = &self.0 {
            hook(_change)
        }
    }
}

pub(super) async fn run_slots(runner: Arc<Runner>, shutdown: CancellationToken) {
    let mut runs: JoinSet<()> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, (JobId, Lease)> = HashMap::new();
    // Expired leases are looked for three times per lease: a dead node's job runs again within
    // about a lease and a third of its last renewal.
    let mut rescue = tokio::time::interval(runner.lease / 3);
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while runs.len() < runner.slots && !shutdown.is_cancelled() {
            match runner.store.claim(runner.owner, runner.lease).await {
                Ok(Some(claim)) => {
                    runner.metrics.count_lease(LeaseEvent::Claimed, 1);
                    let span =
                        tracing::info_span!(parent: None, "mix", job_id = %claim.status.job_id(), project = %claim.status.project_id(), attempt = claim.lease.attempt);
                    let ran = (claim.status.job_id(), claim.lease);
                    let task = runs.spawn(JobRun::start(runner.clone(), claim).run().instrument(span));
                    running.insert(task.id(), ran);
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(%err, "cannot claim a job");
                    tokio::time::sleep(STORE_RETRY).await;
                    break;
                }
            }
        }
        tokio::select! {
            Some(ended) = runs.join_next_with_id(), if !runs.is_empty() => runner.run_ended(ended, &mut running).await,
            _ = runner.wake.notified() => {}
            _ = rescue.tick() => match runner.store.rescue().await {
                Ok(0) => {}
                Ok(rescued) => runner.metrics.count_lease(LeaseEvent::Rescued, rescued as u64),
                Err(err) => tracing::warn!(%err, "cannot rescue jobs with expired leases"),
            },
            _ = tokio::time::sleep(CLAIM_POLL), if runs.len() < runner.slots => {}
            _ = shutdown.cancelled() => break,
        }
    }
    runner.hand_back().await;
    // The runs stop at their next check; their writes are fenced out already.
    while let Some(ended) = runs.join_next_with_id().await {
        runner.run_ended(ended, &mut running).await;
    }
}

impl Runner {
    /// Gives this node's runs back to the queue, so that another node starts them at once.
    async fn hand_back(&self) {
        for (job_id, lease, stop) in self.runs.all() {
            stop.store(true, Ordering::Relaxed);
            match self.store.hand_back(job_id, lease).await {
                Ok(true) => {
                    self.metrics.count_lease(LeaseEvent::HandedBack, 1);
                    tracing::info!(%job_id, "handed a running job back to the queue");
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(%job_id, %err, "could not hand a job back; it runs again once its lease expires"),
            }
        }
    }

    /// A run's task is done. One that panicked (a bug) ends its job now, rather than leave it to
    /// the lease's expiry: the same panic would most likely come back on every run.
    async fn run_ended(&self, ended: Result<(tokio::task::Id, ()), JoinError>, running: &mut HashMap<tokio::task::Id, (JobId, Lease)>) {
        let (task, panic) = match ended {
            Ok((task, ())) => (task, None),
            Err(err) => (err.id(), err.try_into_panic().ok()),
        };
        let Some((job_id, lease)) = running.remove(&task) else { return };
        let Some(panic) = panic else { return };
        tracing::error!(%job_id, panic = %audio::panic_message(&*panic), "a mix run panicked");
        match self.store.fail_run(job_id, lease).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(%job_id, "the panicked run no longer held its job"),
            Err(err) => tracing::warn!(%job_id, %err, "could not end the panicked run's job; its lease expires and it is rescued"),
        }
    }

    /// Whether the job has ended (in this node's view, or in the store for one it does not hold).
    async fn has_ended(&self, job_id: JobId) -> bool {
        matches!(self.live.find(&self.store, job_id).await, Ok(Some(event)) if event.status.state().is_terminal())
    }
}

/// One run of a claimed job.
struct JobRun {
    runner: Arc<Runner>,
    claim: Claim,
    /// Its place among this node's runs, and what stops it.
    guard: RunGuard,
}

enum Ending {
    Mixed { report: Box<MixReport>, delivered: Vec<Delivered>, outputs: Outputs },
    Failed(JobChange),
}

/// Where one run writes its files and analysis before they are published: names of its own
/// (attempt-specific), in the job's directory.
struct Staged {
    layout: MediaLayout,
    project: ProjectId,
    job_id: JobId,
    attempt: u32,
}

impl Staged {
    fn outputs(&self, formats: &[FormatSettings]) -> Outputs {
        Outputs::new(formats, |format| {
            let file = JobFile::Mix(format);
            (self.layout.result_staged(&self.project, self.job_id, self.attempt, file), self.layout.result_temporary(&self.project, self.job_id, self.attempt, file))
        })
    }

    fn analysis(&self) -> PathBuf {
        self.layout.result_staged(&self.project, self.job_id, self.attempt, JobFile::Analysis)
    }

    /// Every name the run may have written under.
    fn every_file(&self) -> Vec<PathBuf> {
        let outputs = self.outputs(&Format::ALL.map(FormatSettings::new));
        let mut files = vec![self.analysis(), outputs.master_temporary];
        files.extend(outputs.files.into_iter().flat_map(|file| [file.path, file.temporary]));
        files
    }
}

impl JobRun {
    fn start(runner: Arc<Runner>, claim: Claim) -> Self {
        let guard = runner.runs.register(claim.status.job_id(), claim.lease, claim.status.seq());
        Self { runner, claim, guard }
    }

    fn project(&self) -> &crate::ids::ProjectId {
        self.claim.status.project_id()
    }

    fn job_id(&self) -> JobId {
        self.claim.status.job_id()
    }

    fn stopped(&self) -> bool {
        self.guard.stop.load(Ordering::Relaxed)
    }

    fn staged(&self) -> Staged {
        Staged { layout: self.runner.media.work().clone(), project: self.project().clone(), job_id: self.job_id(), attempt: self.claim.lease.attempt }
    }

    /// The run, step by step: clear what earlier runs left, mix, write the ending, clean up.
    async fn run(self) {
        let started = Instant::now();
        let (changes, pending) = mpsc::unbounded_channel();
        let writing = AbortOnDropHandle::new(tokio::spawn(self.writer().write_all(pending).in_current_span()));
        let keeper = AbortOnDropHandle::new(tokio::spawn(keep_lease(self.runner.clone(), self.job_id(), self.claim.lease, self.guard.stop.clone()).in_current_span()));
        self.clear_earlier_attempts().await;
        let staged = self.staged();
        let ending = self.mix(&staged, changes).await;
        // Every progress change is written before the ending; a writer that panicked takes the
        // run with it.
        let mut writer = match writing.await {
            Ok(writer) => writer,
            Err(err) => std::panic::resume_unwind(err.try_into_panic().unwrap_or_else(|err| Box::new(err.to_string()))),
        };
        let finished = match ending {
            Some(ending) if !self.stopped() => self.end(&mut writer, &staged, ending).await,
            _ => false,
        };
        // The job is no longer this run's: nothing renews its lease, nor takes its last change
        // through the log for another node's.
        drop(keeper);
        self.guard.release();
        let completed = finished && writer.status.state() == JobState::Complete;
        self.clean_up(&staged, finished, completed).await;
        if finished {
            tracing::info!(state = writer.status.state().as_str(), seconds = started.elapsed().as_secs_f64(), "job finished");
            if completed {
                self.runner.metrics.observe_mix(started.elapsed());
            }
        } else {
            tracing::info!("run stopped: the job was canceled or is no longer this node's");
        }
    }

    fn writer(&self) -> Writer {
        Writer {
            store: self.runner.store.clone(),
            metrics: self.runner.metrics.clone(),
            lease: self.claim.lease,
            lease_length: self.runner.lease,
            status: self.claim.status.clone(),
            webhook: self.claim.webhook.clone(),
            stop: self.guard.stop.clone(),
            faults: self.runner.faults.clone(),
        }
    }

    /// Removes what earlier runs of the job left (their nodes died, stalled or were canceled:
    /// never published).
    async fn clear_earlier_attempts(&self) {
        if let Err(err) = self.runner.media.clear_earlier_attempts(self.project(), self.job_id(), self.claim.lease.attempt).await {
            tracing::warn!(%err, "could not remove what earlier runs of the job left");
        }
    }

    /// The stems as local files, held (on object storage, in this node's cache) until the mix is
    /// done.
    async fn local_stems(&self) -> Result<(Vec<StemSource>, Vec<CachedFile>), JobChange> {
        self.runner.media.local_stems(&self.claim.stems).await.map_err(|(err, stem)| match err {
            MediaError::NotFound => JobChange::Failed { code: ErrorCode::StemMissing, message: format!("Stem \"{stem}\" was deleted before the mix could use it") },
            err => {
                tracing::warn!(%err, stem, "could not fetch a stem");
                let code = if matches!(&err, MediaError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull) {
                    ErrorCode::InsufficientStorage
                } else {
                    ErrorCode::MediaUnavailable
                };
                JobChange::Failed { code, message: format!("Stem \"{stem}\" could not be read from the media storage") }
            }
        })
    }

    /// Mixes on the engine's threads, its progress going to the writer through `changes`; `None`
    /// when the run was stopped.
    async fn mix(&self, staged: &Staged, changes: mpsc::UnboundedSender<JobChange>) -> Option<Ending> {
        let (stems, _held) = match self.local_stems().await {
            Ok(local) => local,
            Err(failed) => return Some(Ending::Failed(failed)),
        };
        let settings = match self.settings(&stems).await {
            Ok(settings) => settings,
            Err(failed) => return Some(Ending::Failed(failed)),
        };
        let ceiling = settings.settings().master.true_peak_dbtp;
        let outputs = staged.outputs(&settings.settings().output.formats);
        let observer = JobObserver::new(changes, self.guard.stop.clone());
        let span = tracing::Span::current();
        let engine_outputs = outputs.clone();
        let outcome = self.runner.engine.run(move || span.in_scope(|| audio::mix(&stems, &settings, &engine_outputs, &observer))).await;
        match outcome {
            Ok(Ok(_)) | Ok(Err(AudioError::Canceled)) if self.stopped() => None,
            Ok(Ok((mut report, delivered))) => {
                // Taken out, so that the report published is the report stored.
                let reference_db = report.reference.as_mut().map(|reference| std::mem::take(&mut reference.levels_db));
                self.analyse(&outputs.master, staged.analysis(), ceiling, reference_db).await;
                Some(Ending::Mixed { report: Box::new(report), delivered, outputs })
            }
            Ok(Err(AudioError::Canceled)) => None,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "mix failed");
                Some(Ending::Failed(failure(&err)))
            }
            Err(panic) => {
                let panic = audio::panic_message(&*panic);
                tracing::error!(%panic, "mix engine panicked");
                Some(Ending::Failed(JobChange::Failed { code: ErrorCode::Internal, message: "The mix engine failed unexpectedly".into() }))
            }
        }
    }

    /// The job's settings, validated. A job stored by the first release holds plain settings,
    /// planned here against its stems (on the engine's threads: it opens their files), as that
    /// version would have done at start.
    async fn settings(&self, stems: &[StemSource]) -> Result<audio::ValidSettings, JobChange> {
        let legacy = match &self.claim.settings {
            StoredSettings::Valid(settings) => return Ok(settings.clone()),
            StoredSettings::Legacy(settings) => settings.clone(),
        };
        let stems = stems.to_vec();
        match self.runner.engine.run(move || audio::plan(&stems, legacy)).await {
            Ok(Ok(settings)) => Ok(settings),
            Ok(Err(err)) => Err(failure(&err)),
            Err(_) => Err(JobChange::Failed { code: ErrorCode::Internal, message: "The mix engine failed unexpectedly".into() }),
        }
    }

    /// Writes the result's analysis to `target` (on the engine's threads: it reads the whole file).
    /// A failure is logged and the mix still completes: the page then draws no waveform.
    async fn analyse(&self, result: &Path, target: PathBuf, ceiling: f64, reference_db: Option<Vec<Option<f64>>>) {
        let result = result.to_path_buf();
        let written = self
            .runner
            .engine
            .run(move || -> Result<(), String> {
                let analysis = audio::analyse(&result, ceiling, reference_db.as_deref()).map_err(|err| err.to_string())?;
                let json = serde_json::to_vec(&analysis).map_err(|err| err.to_string())?;
                std::fs::write(&target, json).map_err(|err| err.to_string())
            })
            .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "could not write the mix's analysis"),
            Err(_) => tracing::error!("the analysis panicked"),
        }
    }

    /// Writes the run's ending: publishes a mix, or records the failure. False when it was not
    /// written (the lease is gone).
    async fn end(&self, writer: &mut Writer, staged: &Staged, ending: Ending) -> bool {
        match ending {
            Ending::Mixed { report, delivered, outputs } => self.publish(writer, staged, *report, delivered, outputs).await,
            Ending::Failed(change) => writer.write(change).await,
        }
    }

    /// Makes the staged files the job's and completes it, if the lease still holds: whoever sees
    /// the job complete finds exactly its files. (Should the lease be lost between the check and
    /// the write, the files in place are the rescuer's to keep: it finds them there.)
    async fn publish(&self, writer: &mut Writer, staged: &Staged, report: MixReport, delivered: Vec<Delivered>, outputs: Outputs) -> bool {
        let (project, job_id) = (self.project(), self.job_id());
        if !writer.still_held().await {
            return false;
        }
        // The analysis first: a page that sees the mix finds its analysis too.
        let files: Vec<(JobFile, PathBuf)> = std::iter::once((JobFile::Analysis, staged.analysis()))
            .chain(outputs.files.iter().map(|file| (JobFile::Mix(file.format.format), file.path.clone())))
            .collect();
        if let Err(err) = self.runner.media.publish_result(project, job_id, self.claim.lease.attempt, &files).await {
            tracing::warn!(%err, "could not publish the mix");
            return writer.write(publish_failure(err)).await;
        }
        // The WAV the other files came from, when not asked for, goes before anyone sees the job
        // complete.
        if !outputs.files.iter().any(|file| file.path == outputs.master) {
            let _ = tokio::fs::remove_file(&outputs.master).await;
        }
        let results = delivered.into_iter().map(|delivered| ResultFile::new(MediaLayout::result_url(project, job_id, delivered.format), delivered)).collect();
        writer.write(JobChange::Completed { results, report: Box::new(report) }).await
    }

    /// Removes the run's own files, and on object storage what it stored unless it completed the job.
    async fn clean_up(&self, staged: &Staged, finished: bool, completed: bool) {
        let ended = self.runner.has_ended(self.job_id());
        self.runner.media.end_run(self.project(), self.job_id(), self.claim.lease.attempt, &staged.every_file(), (finished, completed), ended).await;
    }
}

/// What a result that could not be published makes of the job.
fn publish_failure(err: MediaError) -> JobChange {
    match err {
        MediaError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            JobChange::Failed { code: ErrorCode::InsufficientStorage, message: format!("Could not publish the mix: {io}") }
        }
        MediaError::Unavailable(_) => {
            JobChange::Failed { code: ErrorCode::MediaUnavailable, message: "The media storage is unavailable: the mix could not be stored".into() }
        }
        other => JobChange::Failed { code: ErrorCode::ExportFailed, message: format!("Could not publish the mix: {other}") },
    }
}

/// How long the store has been out of reach for a run. Past a lease length another node may hold
/// the job, so the run gives up (the rule for renewals and writes alike).
struct Outage {
    since: Instant,
    length: Duration,
}

impl Outage {
    fn new(length: Duration) -> Self {
        Self { since: Instant::now(), length }
    }

    fn reached(&mut self) {
        self.since = Instant::now();
    }

    fn too_long(&self) -> bool {
        self.since.elapsed() >= self.length
    }
}

/// Renews the lease every third of its length; stops the run when it is gone, or when the
/// store cannot be reached for longer than the lease.
async fn keep_lease(runner: Arc<Runner>, job_id: JobId, lease: Lease, stop: Arc<AtomicBool>) {
    let length = runner.lease;
    let mut outage = Outage::new(length);
    loop {
        tokio::time::sleep(length / 3).await;
        match runner.store.renew(job_id, lease, length).await {
            Ok(true) => outage.reached(),
            Ok(false) => {
                tracing::warn!("the lease is gone: stopping the mix");
                lose_lease(&runner.metrics, &stop);
                return;
            }
            Err(err) if outage.too_long() => {
                tracing::warn!(%err, "could not renew the lease for its whole length: stopping the mix");
                lose_lease(&runner.metrics, &stop);
                return;
            }
            Err(err) => tracing::warn!(%err, "could not renew the lease; trying again"),
        }
    }
}

/// Writes one run's changes in order, each fenced on the run's lease.
struct Writer {
    store: Store,
    metrics: Arc<Metrics>,
    lease: Lease,
    lease_length: Duration,
    /// The last status written.
    status: JobStatus,
    webhook: Option<WebhookSpec>,
    stop: Arc<AtomicBool>,
    faults: FaultHook,
}

impl Writer {
    async fn write_all(mut self, mut changes: mpsc::UnboundedReceiver<JobChange>) -> Self {
        while let Some(change) = changes.recv().await {
            if self.stop.load(Ordering::Relaxed) {
                continue;
            }
            self.write(change).await;
        }
        self
    }

    /// Writes `change`; false when it was not (refused by the rules, or the lease is gone).
    async fn write(&mut self, change: JobChange) -> bool {
        self.faults.before_write(&change);
        let next = match self.status.apply(change) {
            Ok(next) => next,
            Err(err) => {
                tracing::debug!(%err, "change refused");
                return false;
            }
        };
        let change = Change::new(next, self.webhook.as_ref(), false);
        let written = &change;
        match self.retry(move |store, lease, previous| async move { store.write(lease, previous, written).await }).await {
            Some(true) => {
                self.status = change.event.status.clone();
                true
            }
            _ => false,
        }
    }

    /// Whether the lease still holds, renewing it.
    async fn still_held(&mut self) -> bool {
        let (job_id, length) = (self.status.job_id(), self.lease_length);
        self.retry(move |store, lease, _| async move { store.renew(job_id, lease, length).await }).await == Some(true)
    }

    /// Runs `attempt` until the store answers, for at most one lease length ([`Outage`]).
    /// `Some(false)` and giving up both stop the run.
    async fn retry<F, Fut>(&mut self, attempt: F) -> Option<bool>
    where
        F: Fn(Store, Lease, u64) -> Fut,
        Fut: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let outage = Outage::new(self.lease_length);
        loop {
            match attempt(self.store.clone(), self.lease, self.status.seq()).await {
                Ok(true) => return Some(true),
                Ok(false) => {
                    tracing::warn!("the lease is gone: the run stops and writes nothing more");
                    lose_lease(&self.metrics, &self.stop);
                    return Some(false);
                }
                Err(err) if !outage.too_long() => {
                    tracing::warn!(%err, "could not write a job change; trying again");
                    tokio::time::sleep(STORE_RETRY).await;
                }
                Err(err) => {
                    tracing::error!(%err, "could not write a job change for a whole lease: the run stops");
                    lose_lease(&self.metrics, &self.stop);
                    return None;
                }
            }
        }
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
        AudioError::Export(_) | AudioError::Encode { .. } => ErrorCode::ExportFailed,
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
pub(super) const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Turns the engine's stage reports into job changes for the run's writer: every new stage, and a
/// rise in whole percent at most once per [`PROGRESS_INTERVAL`].
pub(super) struct JobObserver {
    changes: mpsc::UnboundedSender<JobChange>,
    stop: Arc<AtomicBool>,
    published: Mutex<Published>,
}

struct Published {
    state: JobState,
    progress: u8,
    at: Instant,
}

impl JobObserver {
    pub fn new(changes: mpsc::UnboundedSender<JobChange>, stop: Arc<AtomicBool>) -> Self {
        let published = Published { state: JobState::Running, progress: 0, at: Instant::now() };
        Self { changes, stop, published: Mutex::new(published) }
    }
}

impl MixObserver for JobObserver {
    fn progress(&self, stage: Stage, fraction: f64) {
        let state = JobState::from(stage);
        let progress = Progress::running(stage.percent(fraction));
        {
            let mut published = self.published.lock().unwrap_or_else(PoisonError::into_inner);
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
        let _ = self.changes.send(JobChange::Progress { state, progress, message: stage.label().to_string() });
    }

    fn is_cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoder_failure_ends_the_job_export_failed_naming_the_format_and_a_full_disk_insufficient_storage() {
        let encode = AudioError::Encode { format: "opus", reason: "reading it back: invalid packet".into() };
        match failure(&encode) {
            JobChange::Failed { code, message } => {
                assert_eq!(code, ErrorCode::ExportFailed);
                assert_eq!(message, "Encoding the opus file failed: reading it back: invalid packet");
            }
            other => panic!("{other:?}"),
        }
        match failure(&AudioError::Export(std::io::Error::from(std::io::ErrorKind::StorageFull))) {
            JobChange::Failed { code, message } => {
                assert_eq!((code, message.as_str()), (ErrorCode::InsufficientStorage, "The disk is full: the mix could not be written"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn progress_within_a_stage_is_published_at_most_once_per_interval_and_every_stage_at_once() {
        let (changes, mut sent) = mpsc::unbounded_channel();
        let observer = JobObserver::new(changes, Arc::new(AtomicBool::new(false)));
        let mut published = || {
            let mut seen = Vec::new();
            while let Ok(JobChange::Progress { state, progress, .. }) = sent.try_recv() {
                seen.push((state, progress.value()));
            }
            seen
        };

        // Time stands still: each new stage is published at once, its rises within it are not.
        for stage in [Stage::LoadingStems, Stage::AligningStems, Stage::ProcessingTracks] {
            for step in 0..=100 {
                observer.progress(stage, step as f64 / 100.0);
            }
        }
        assert_eq!(published(), [(JobState::LoadingStems, 2), (JobState::AligningStems, 5), (JobState::ProcessingTracks, 8)]);
        // Just short of the interval, a rise still waits; at the interval it goes out.
        tokio::time::advance(PROGRESS_INTERVAL - Duration::from_millis(1)).await;
        observer.progress(Stage::ProcessingTracks, 0.5);
        assert_eq!(published(), []);
        tokio::time::advance(Duration::from_millis(1)).await;
        observer.progress(Stage::ProcessingTracks, 0.5);
        assert_eq!(published(), [(JobState::ProcessingTracks, 36)]);
        // A lower figure is never published, however long it has been.
        tokio::time::advance(PROGRESS_INTERVAL).await;
        observer.progress(Stage::ProcessingTracks, 0.1);
        assert_eq!(published(), []);
    }
}
