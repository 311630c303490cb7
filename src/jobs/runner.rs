//! This node's mixer slots. With a slot free the runner claims the oldest queued job from the
//! store (whichever node queued it), and runs it under a lease it renews every third of its
//! length. Every change the run makes is a write fenced on that lease, made in order by the run's
//! own writer; a write or renewal that finds the lease gone stops the mix, and nothing of the old
//! run lands. The result is written under an attempt-specific name and linked into place just
//! before the fenced completion. The runner also rescues jobs whose lease expired (their node died
//! or stalled), and on shutdown hands this node's runs back to the queue at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cache::CachedFile;
use super::layout::{keys, MediaLayout};
use super::manager::{Jobs, LocalRun};
use super::metrics::{LeaseEvent, Metrics};
use super::model::{ErrorCode, JobChange, JobId, JobState, JobStatus, Progress};
use super::objects::{MediaError, ObjectMedia};
use super::store::{Change, Claim, Lease, Store, StoreError};
use super::webhook::WebhookSpec;
use crate::audio::{self, AudioError, MixObserver, MixReport, Stage, StemSource};

/// How often the queue is checked without a wake-up (a notification may be lost).
const CLAIM_POLL: Duration = Duration::from_secs(1);
/// Pause after the store failed before the runner tries again.
const STORE_RETRY: Duration = Duration::from_millis(250);

pub(super) async fn run_slots(jobs: Jobs, shutdown: CancellationToken) {
    let slots = jobs.inner.config.mix_slots;
    let lease = jobs.inner.config.lease;
    let mut runs: JoinSet<()> = JoinSet::new();
    // Expired leases are looked for three times per lease: a dead node's job runs again within
    // about a lease and a third of its last renewal.
    let mut rescue = tokio::time::interval(lease / 3);
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        while runs.len() < slots && !shutdown.is_cancelled() {
            match jobs.inner.store.claim(jobs.inner.owner, lease).await {
                Ok(Some(claim)) => {
                    jobs.metrics().count_lease(LeaseEvent::Claimed, 1);
                    let span =
                        tracing::info_span!(parent: None, "mix", job_id = %claim.status.job_id(), project = %claim.status.project_id(), attempt = claim.lease.attempt);
                    runs.spawn(JobRun::start(jobs.clone(), claim).run().instrument(span));
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
            Some(_) = runs.join_next(), if !runs.is_empty() => {}
            _ = jobs.inner.runner_wake.notified() => {}
            _ = rescue.tick() => match jobs.inner.store.rescue().await {
                Ok(0) => {}
                Ok(rescued) => jobs.metrics().count_lease(LeaseEvent::Rescued, rescued as u64),
                Err(err) => tracing::warn!(%err, "cannot rescue jobs with expired leases"),
            },
            _ = tokio::time::sleep(CLAIM_POLL), if runs.len() < slots => {}
            _ = shutdown.cancelled() => break,
        }
    }
    hand_back(&jobs).await;
    // The runs stop at their next check; their writes are fenced out already.
    while runs.join_next().await.is_some() {}
}

/// Gives this node's runs back to the queue, so that another node starts them at once.
async fn hand_back(jobs: &Jobs) {
    let runs: Vec<(JobId, Lease, Arc<AtomicBool>)> =
        jobs.inner.local_runs.lock().expect("never poisoned").iter().map(|(id, run)| (*id, run.lease, run.stop.clone())).collect();
    for (job_id, lease, stop) in runs {
        stop.store(true, Ordering::Relaxed);
        match jobs.inner.store.hand_back(job_id, lease).await {
            Ok(true) => {
                jobs.metrics().count_lease(LeaseEvent::HandedBack, 1);
                tracing::info!(%job_id, "handed a running job back to the queue");
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(%job_id, %err, "could not hand a job back; it runs again once its lease expires"),
        }
    }
}

/// One run of a claimed job.
struct JobRun {
    jobs: Jobs,
    claim: Claim,
    stop: Arc<AtomicBool>,
}

impl JobRun {
    fn start(jobs: Jobs, claim: Claim) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let run = LocalRun { stop: stop.clone(), started_seq: claim.status.seq(), lease: claim.lease };
        jobs.inner.local_runs.lock().expect("never poisoned").insert(claim.status.job_id(), run);
        Self { jobs, claim, stop }
    }

    /// The local data root, or on object storage the node's own work directory.
    fn layout(&self) -> &MediaLayout {
        &self.jobs.inner.config.layout
    }

    fn objects(&self) -> Option<&ObjectMedia> {
        self.jobs.inner.config.objects.as_ref()
    }

    /// The stems as local files: as they are on the local storage, or fetched into this node's
    /// cache from object storage and held there until the mix is done.
    async fn local_stems(&self) -> Result<(Vec<StemSource>, Vec<CachedFile>), JobChange> {
        let Some(objects) = self.objects() else { return Ok((self.claim.stems.clone(), Vec::new())) };
        let (mut stems, mut held) = (Vec::new(), Vec::new());
        for stem in &self.claim.stems {
            match objects.fetch_stem(&stem.path.to_string_lossy()).await {
                Ok(file) => {
                    stems.push(StemSource { path: file.path().to_path_buf(), ..stem.clone() });
                    held.push(file);
                }
                Err(MediaError::NotFound) => {
                    return Err(JobChange::Failed { code: ErrorCode::StemMissing, message: format!("Stem \"{}\" was deleted before the mix could use it", stem.name) })
                }
                Err(err) => {
                    tracing::warn!(%err, stem = stem.name, "could not fetch a stem");
                    let code = if matches!(&err, MediaError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull) {
                        ErrorCode::InsufficientStorage
                    } else {
                        ErrorCode::MediaUnavailable
                    };
                    return Err(JobChange::Failed { code, message: format!("Stem \"{}\" could not be read from the media storage", stem.name) });
                }
            }
        }
        Ok((stems, held))
    }

    async fn run(self) {
        let started = Instant::now();
        let (job_id, project) = (self.claim.status.job_id(), self.claim.status.project_id().clone());
        let attempt = self.claim.lease.attempt;
        let writer = Writer {
            store: self.jobs.inner.store.clone(),
            metrics: self.jobs.metrics().clone(),
            lease: self.claim.lease,
            lease_length: self.jobs.inner.config.lease,
            status: self.claim.status.clone(),
            webhook: self.claim.webhook.clone(),
            stop: self.stop.clone(),
        };
        let (changes, pending) = mpsc::unbounded_channel();
        let writing = tokio::spawn(writer.write_all(pending).in_current_span());
        let keeper = tokio::spawn(keep_lease(self.jobs.clone(), job_id, self.claim.lease, self.stop.clone()).in_current_span());

        let layout = self.layout().clone();
        let _ = layout.remove_earlier_attempts(&project, job_id, attempt);
        if let Some(objects) = self.objects() {
            if let Err(err) = objects.delete_attempts_except(&project, job_id, Some(attempt)).await {
                tracing::warn!(%err, "could not delete what earlier runs of the job stored");
            }
        }
        let staged = layout.result_staged(&project, job_id, attempt);
        let temporary = layout.result_temporary(&project, job_id, attempt);
        let ending = match self.local_stems().await {
            Err(failed) => Some(Ending::Failed(failed)),
            Ok((stems, _held)) => {
                let observer = JobObserver::new(changes.clone(), self.stop.clone());
                let span = tracing::Span::current();
                let (settings, engine_output) = (self.claim.settings.clone(), staged.clone());
                let outcome = self.jobs.inner.engine.run(move || span.in_scope(|| audio::mix(&stems, &settings, &engine_output, &temporary, &observer))).await;
                let stopped = self.stop.load(Ordering::Relaxed);
                match outcome {
                    Ok(Ok(report)) if !stopped => {
                        self.analyse(&staged, layout.analysis_staged(&project, job_id, attempt)).await;
                        Some(Ending::Mixed(report))
                    }
                    Ok(Ok(_)) | Ok(Err(AudioError::Canceled)) => None,
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
        };
        // Every progress change is written before the ending.
        drop(changes);
        let mut writer = writing.await.expect("the writer does not panic");
        let finished = match ending {
            Some(Ending::Mixed(report)) if !self.stop.load(Ordering::Relaxed) => match self.objects() {
                Some(objects) => self.publish_objects(objects, &mut writer, &staged, report).await,
                None => self.publish(&mut writer, &staged, report).await,
            },
            Some(Ending::Failed(change)) if !self.stop.load(Ordering::Relaxed) => writer.write(change).await,
            _ => false,
        };
        keeper.abort();
        let _ = tokio::fs::remove_file(&staged).await;
        let _ = tokio::fs::remove_file(layout.analysis_staged(&project, job_id, attempt)).await;
        self.jobs.inner.local_runs.lock().expect("never poisoned").remove(&job_id);
        if let Some(objects) = self.objects() {
            // The work files were this node's own; what the run stored is published only if the
            // job completed here.
            let _ = tokio::fs::remove_dir(layout.job_outputs(&project, job_id)).await;
            if !(finished && writer.status.state() == JobState::Complete) {
                for analysis in [false, true] {
                    if let Err(err) = objects.delete(&objects.key(&keys::result(&project, job_id, attempt, analysis))).await {
                        tracing::warn!(%err, "could not delete what this run stored; output retention will");
                    }
                }
            }
        }
        if finished {
            tracing::info!(state = writer.status.state().as_str(), seconds = started.elapsed().as_secs_f64(), "job finished");
            if writer.status.state() == JobState::Complete {
                self.jobs.metrics().observe_mix(started.elapsed());
            }
        } else {
            // A canceled job leaves no empty directory behind (one holding a result stays). A run
            // handed back or lost leaves it alone: the job's next run, maybe on another node, may
            // be writing there already (its spill is an unnamed file, so the directory looks empty).
            let ended = matches!(self.jobs.find(job_id).await, Ok(Some(event)) if event.status.state().is_terminal());
            if ended && self.objects().is_none() {
                let _ = tokio::fs::remove_dir(layout.job_outputs(&project, job_id)).await;
            }
            tracing::info!("run stopped: the job was canceled or is no longer this node's");
        }
    }

    /// Writes the result's analysis to `target` (on the engine's threads: it reads the whole file).
    /// A failure is logged and the mix still completes: the page then draws no waveform.
    async fn analyse(&self, result: &std::path::Path, target: std::path::PathBuf) {
        let (result, ceiling) = (result.to_path_buf(), self.claim.settings.settings().master.true_peak_dbtp);
        let written = self
            .jobs
            .inner
            .engine
            .run(move || -> Result<(), String> {
                let analysis = audio::analyse(&result, ceiling).map_err(|err| err.to_string())?;
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

    /// Links the staged result into place and completes the job, if the lease still holds.
    /// A result already in place came from an earlier run of the same job and inputs, which a
    /// node finished but did not get to report: it is kept.
    async fn publish(&self, writer: &mut Writer, staged: &std::path::Path, report: MixReport) -> bool {
        let (project, job_id) = (self.claim.status.project_id(), self.claim.status.job_id());
        if !writer.still_held().await {
            return false;
        }
        let output = self.layout().result(project, job_id);
        // The analysis first: a page that sees the result finds its analysis too.
        let analysis = self.layout().analysis_staged(project, job_id, self.claim.lease.attempt);
        match tokio::fs::hard_link(&analysis, self.layout().analysis(project, job_id)).await {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => tracing::warn!(%err, "could not publish the mix's analysis"),
        }
        match tokio::fs::hard_link(staged, &output).await {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => tracing::info!("the result was already in place from an earlier run"),
            Err(err) => {
                let code = if err.kind() == std::io::ErrorKind::StorageFull { ErrorCode::InsufficientStorage } else { ErrorCode::ExportFailed };
                return writer.write(JobChange::Failed { code, message: format!("Could not publish the mix: {err}") }).await;
            }
        }
        // The staged names go, and the legacy newest-mix path points here, before the job is
        // reported complete: whoever sees it complete finds exactly the result, on both paths.
        // (Should the lease be lost between the check above and the write, the path points at a
        // result the rescuer keeps: it finds it in place.)
        let _ = tokio::fs::remove_file(staged).await;
        let _ = tokio::fs::remove_file(&analysis).await;
        self.point_newest_at(&output).await;
        writer.write(JobChange::Completed { result_url: MediaLayout::result_url(project, job_id), report: Box::new(report) }).await
    }

    /// Stores this run's result and analysis under its own keys, then completes the job, which is
    /// what publishes them ([`super::objects`]): should the write be fenced out, they are deleted
    /// and were never served.
    async fn publish_objects(&self, objects: &ObjectMedia, writer: &mut Writer, staged: &std::path::Path, report: MixReport) -> bool {
        let (project, job_id, attempt) = (self.claim.status.project_id(), self.claim.status.job_id(), self.claim.lease.attempt);
        let analysis = self.layout().analysis_staged(project, job_id, attempt);
        if tokio::fs::try_exists(&analysis).await.unwrap_or(false) {
            if let Err(err) = objects.put_file(&analysis, &objects.key(&keys::result(project, job_id, attempt, true))).await {
                tracing::warn!(%err, "could not store the mix's analysis");
            }
        }
        if let Err(err) = objects.put_file(staged, &objects.key(&keys::result(project, job_id, attempt, false))).await {
            tracing::warn!(%err, "could not store the mix");
            let message = "The media storage is unavailable: the mix could not be stored".to_string();
            return writer.write(JobChange::Failed { code: ErrorCode::MediaUnavailable, message }).await;
        }
        writer.write(JobChange::Completed { result_url: MediaLayout::result_url(project, job_id), report: Box::new(report) }).await
    }

    /// Points the legacy "newest mix" path at this output.
    async fn point_newest_at(&self, output: &std::path::Path) {
        let (project, job_id) = (self.claim.status.project_id(), self.claim.status.job_id());
        let legacy = self.layout().newest_result(project);
        let staging = self.layout().newest_result_temporary(project, job_id);
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
    }
}

enum Ending {
    Mixed(MixReport),
    Failed(JobChange),
}

/// Renews the lease every third of its length; stops the run when it is gone, or when the
/// store cannot be reached for longer than the lease (another node may have it by then).
async fn keep_lease(jobs: Jobs, job_id: JobId, lease: Lease, stop: Arc<AtomicBool>) {
    let length = jobs.inner.config.lease;
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(length / 3).await;
        match jobs.inner.store.renew(job_id, lease, length).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => {
                tracing::warn!("the lease is gone: stopping the mix");
                lose_lease(jobs.metrics(), &stop);
                return;
            }
            Err(err) if renewed.elapsed() >= length => {
                tracing::warn!(%err, "could not renew the lease for its whole length: stopping the mix");
                lose_lease(jobs.metrics(), &stop);
                return;
            }
            Err(err) => tracing::warn!(%err, "could not renew the lease; trying again"),
        }
    }
}

/// Stops a run whose lease is gone, counting it once. A run stopped on purpose (handed back at
/// shutdown) was stopped before, and is not counted.
pub(super) fn lose_lease(metrics: &Metrics, stop: &AtomicBool) {
    if !stop.swap(true, Ordering::Relaxed) {
        metrics.count_lease(LeaseEvent::Lost, 1);
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

    /// Runs `attempt` until the store answers, for at most one lease length (after that another
    /// node may have the job). `Some(false)` and giving up both stop the run.
    async fn retry<F, Fut>(&mut self, attempt: F) -> Option<bool>
    where
        F: Fn(Store, Lease, u64) -> Fut,
        Fut: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let deadline = Instant::now() + self.lease_length;
        loop {
            match attempt(self.store.clone(), self.lease, self.status.seq()).await {
                Ok(true) => return Some(true),
                Ok(false) => {
                    tracing::warn!("the lease is gone: the run stops and writes nothing more");
                    lose_lease(&self.metrics, &self.stop);
                    return Some(false);
                }
                Err(err) if Instant::now() < deadline => {
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
        let _ = self.changes.send(JobChange::Progress { state, progress, message: stage.label().to_string() });
    }

    fn is_cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
