//! The handle on all jobs. The store is the truth, shared by every node of a cluster; each node
//! keeps the current status of every job in its live view (`live`), fed only by the store's event
//! log (`follow`), and answers status polls and new subscribers from it. Writers (submit, cancel,
//! the runner's fenced writes) go to the store; what they changed reaches the view and every
//! subscriber on every node through the log, once, in order.
//!
//! This is the one module that points down at the others: it opens the store's snapshot into the
//! view and starts the log reader, the runner and expiry, each given only the parts it uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::engine::EnginePool;
use super::follow::{spawn_on_own_thread, Follower};
use super::live::LiveView;
use super::metrics::Metrics;
use super::model::{JobEvent, JobState, JobStatus};
use super::runner::{run_slots, FaultHook, Runner};
use super::runs::LocalRuns;
pub use super::store::JobError;
use super::store::{NewJob, Store, StoreError, Submitted};
use super::webhook::WebhookSpec;
use crate::audio::{StemSource, ValidSettings};
use crate::ids::{JobId, ProjectId};
use crate::media::Media;

/// Room for bursts of changes; a subscriber that falls further behind is resynchronised.
pub const EVENT_BUFFER: usize = 4096;
/// How long a write waits to see itself in this node's memory before answering anyway (the store
/// has it; a poll that follows at once reads it from there).
const READ_YOUR_WRITE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Mixes this node runs at once; 0 takes none.
    pub mix_slots: usize,
    /// How long a finished job stays queryable.
    pub job_ttl: Duration,
    /// Changes the channel of every change holds for a subscriber that falls behind
    /// ([`EVENT_BUFFER`]); a project's channel holds fewer.
    pub event_buffer: usize,
    /// Where stems are read and results kept.
    pub media: Media,
    /// How long a node holds a job without renewing it.
    pub lease: Duration,
    /// The most jobs one project may have waiting, across the cluster.
    pub max_queued_per_project: u32,
}

/// Why the job layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("starting the mix engine's threads: {0}")]
    Engine(std::io::Error),
    #[error("starting the event log's reader: {0}")]
    Follower(std::io::Error),
}

/// A handle on all jobs; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    live: Arc<LiveView>,
    metrics: Arc<Metrics>,
    /// This process run's lease owner id.
    owner: Uuid,
    /// Woken when a published change may have stored a webhook delivery.
    deliveries: Arc<Notify>,
    /// The log reader, the runner and expiry; done once runs are handed back.
    tasks: TaskTracker,
    /// The most jobs one project may have waiting.
    max_queued_per_project: u32,
    #[cfg(test)]
    runs: Arc<LocalRuns>,
}

impl Jobs {
    /// Reads every job into memory, then starts following the log, the runner (which rescues
    /// jobs whose node died, those of an earlier run of this one included) and expiry. They all
    /// end with `shutdown`; [`Jobs::stopped`] waits for that.
    pub async fn open(config: JobsConfig, store: Store, shutdown: CancellationToken) -> Result<Self, OpenError> {
        Self::open_with(config, store, shutdown, FaultHook::default()).await
    }

    async fn open_with(config: JobsConfig, store: Store, shutdown: CancellationToken, faults: FaultHook) -> Result<Self, OpenError> {
        let snapshot = store.snapshot().await?;
        let engine = EnginePool::new(config.mix_slots).map_err(OpenError::Engine)?;
        let live = Arc::new(LiveView::new(snapshot.jobs, snapshot.head, config.event_buffer));
        let (runs, metrics) = (Arc::<LocalRuns>::default(), Arc::<Metrics>::default());
        let (wake_runner, wake_expiry, deliveries) = (Arc::new(Notify::new()), Arc::new(Notify::new()), Arc::new(Notify::new()));
        let tasks = TaskTracker::new();

        let follower = Follower {
            store: store.clone(),
            live: live.clone(),
            runs: runs.clone(),
            metrics: metrics.clone(),
            wake_runner: wake_runner.clone(),
            wake_expiry: wake_expiry.clone(),
            wake_deliveries: deliveries.clone(),
        };
        let follow_stop = shutdown.child_token();
        spawn_on_own_thread(tasks.track_future(follower.follow(follow_stop.clone())), follow_stop).map_err(OpenError::Follower)?;
        let runner = Runner {
            store: store.clone(),
            live: live.clone(),
            runs: runs.clone(),
            metrics: metrics.clone(),
            engine,
            owner: Uuid::new_v4(),
            slots: config.mix_slots,
            lease: config.lease,
            media: config.media,
            wake: wake_runner,
            faults,
        };
        let owner = runner.owner;
        tasks.spawn(run_slots(Arc::new(runner), shutdown.clone()));
        tasks.spawn(super::retention::expire_finished_jobs(live.clone(), store.clone(), config.job_ttl, wake_expiry, shutdown));
        tasks.close();
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                live,
                metrics,
                owner,
                deliveries,
                tasks,
                max_queued_per_project: config.max_queued_per_project,
                #[cfg(test)]
                runs,
            }),
        })
    }

    /// Waits until the background tasks have ended after shutdown, this node's runs handed back.
    pub async fn stopped(&self) {
        self.inner.tasks.wait().await
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The job store, for the webhook outbox that drains its deliveries.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Notified whenever a published change may have stored a webhook delivery, on any node.
    pub fn delivery_wake(&self) -> Arc<Notify> {
        self.inner.deliveries.clone()
    }

    /// Whether several nodes share this store.
    pub fn is_clustered(&self) -> bool {
        self.inner.store.is_shared()
    }

    /// This node's lease owner id, unique per process run.
    pub fn node_id(&self) -> Uuid {
        self.inner.owner
    }

    /// A secret kept in the job store for every node (`webhook_secret`, `session_key`), made by
    /// `generate` at the first start.
    pub async fn server_secret(&self, name: &'static str, generate: impl FnOnce() -> String + Send + 'static) -> Result<String, JobError> {
        Ok(self.inner.store.setting(name, generate).await?)
    }

    /// Answers when the store can be reached.
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// The store's epoch: log positions mean something only within it.
    pub(super) fn epoch(&self) -> &str {
        self.inner.store.epoch()
    }

    /// This node's view of every job, for the subscription core.
    pub(super) fn live(&self) -> &LiveView {
        &self.inner.live
    }

    /// Every change from now on, or with `project` only that project's.
    pub(super) fn subscribe_events(&self, project: Option<&ProjectId>) -> broadcast::Receiver<Arc<JobEvent>> {
        self.inner.live.subscribe(project)
    }

    /// Queues a mix of `stems`. With an idempotency key already used for this project (on any
    /// node), returns that job instead. The job is stored before this returns, so a crash right
    /// after the 202 loses nothing.
    pub async fn submit(
        &self,
        project: ProjectId,
        settings: ValidSettings,
        stems: Vec<StemSource>,
        idempotency_key: Option<String>,
        webhook: Option<WebhookSpec>,
    ) -> Result<Submitted, JobError> {
        let job = NewJob { job_id: JobId::new(), project, settings, stems, idempotency_key, webhook, queue_cap: self.inner.max_queued_per_project };
        let submitted = self.inner.store.submit(job).await?;
        let status = match &submitted {
            Submitted::New(status) => {
                tracing::info!(job_id = %status.job_id(), "job queued");
                status
            }
            // Perhaps made a moment ago on another node: this one's lists should hold it too.
            Submitted::Existing(status) => status,
            Submitted::QueueFull { .. } => return Ok(submitted),
        };
        self.seen(status).await;
        Ok(submitted)
    }

    /// Waits (briefly) until this node's memory holds `status` or later, so that a poll right
    /// after a write reads what it wrote.
    async fn seen(&self, status: &JobStatus) {
        let mut head = self.inner.live.watch_head();
        let reached = || self.inner.live.has_seen(status.job_id(), status.seq());
        let _ = tokio::time::timeout(READ_YOUR_WRITE, async {
            while !reached() {
                if head.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// A job's status as last published. Another node's brand-new job this node's log reader has
    /// not reached yet is read from the store.
    pub async fn find(&self, job_id: JobId) -> Result<Option<Arc<JobEvent>>, JobError> {
        Ok(self.inner.live.find(&self.inner.store, job_id).await?)
    }

    /// A job's status as this node last published it.
    pub fn published(&self, job_id: JobId) -> Option<Arc<JobEvent>> {
        self.inner.live.published(job_id)
    }

    /// The project's newest job, as last published.
    pub fn newest_published(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
        self.inner.live.newest(project)
    }

    /// The project's newest complete job: "the newest mix", wherever it is named.
    pub fn newest_complete(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
        self.inner.live.newest_complete(project)
    }

    /// The project's jobs, newest first.
    pub fn for_project(&self, project: &ProjectId) -> Vec<JobStatus> {
        self.inner.live.for_project(project)
    }

    /// Every project that has jobs, with its newest job as last published.
    pub fn newest_by_project(&self) -> HashMap<ProjectId, Arc<JobEvent>> {
        self.inner.live.newest_by_project()
    }

    pub fn has_project(&self, project: &ProjectId) -> bool {
        self.inner.live.has_project(project)
    }

    /// How many jobs are in each state, and how many wait for a slot (cluster-wide).
    /// Jobs by state, and the projects with the most jobs queued (at most `top`, most first).
    pub fn counts(&self, top: usize) -> (HashMap<JobState, usize>, Vec<(ProjectId, usize)>) {
        let (counts, queued) = self.inner.live.counts();
        let mut queued: Vec<(ProjectId, usize)> = queued.into_iter().collect();
        queued.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_str().cmp(b.0.as_str())));
        queued.truncate(top);
        (counts, queued)
    }

    /// Cancels a job on whichever node: a queued one leaves the queue, a running one ends in
    /// `error` / `CANCELED` at once and its node stops the mix when it sees that.
    pub async fn cancel(&self, project: &ProjectId, job_id: JobId) -> Result<JobStatus, JobError> {
        let status = self.inner.store.cancel(project, job_id).await?;
        self.seen(&status).await;
        Ok(status)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use super::*;
    use crate::audio::MixSettings;
    use crate::jobs::model::{ErrorCode, JobChange, Progress};
    use crate::jobs::store::StoreLocation;

    pub async fn open_jobs(dir: &Path, mix_slots: usize, event_buffer: usize) -> Jobs {
        open_jobs_with(dir, mix_slots, event_buffer, FaultHook::default()).await
    }

    async fn open_jobs_with(dir: &Path, mix_slots: usize, event_buffer: usize, faults: FaultHook) -> Jobs {
        let layout = crate::media::MediaLayout::new(dir);
        let store = Store::open(&StoreLocation::Sqlite(layout.database_dir())).await.unwrap();
        let config = JobsConfig {
            mix_slots,
            job_ttl: Duration::from_secs(3600),
            event_buffer,
            media: Media::Local(layout),
            lease: Duration::from_secs(15),
            // These tests queue dozens of jobs in one project; the cap is tested through the API.
            max_queued_per_project: 1000,
        };
        Jobs::open_with(config, store, CancellationToken::new(), faults).await.unwrap()
    }

    pub async fn submit(jobs: &Jobs, key: Option<&str>) -> JobId {
        submit_to(jobs, "p1", key).await
    }

    pub async fn submit_to(jobs: &Jobs, project: &str, key: Option<&str>) -> JobId {
        match jobs.submit(project.parse().unwrap(), MixSettings::default().validate(&[], 48_000).unwrap(), Vec::new(), key.map(String::from), None).await.unwrap() {
            Submitted::New(status) | Submitted::Existing(status) => status.job_id(),
            Submitted::QueueFull { cap } => panic!("the project already has {cap} jobs waiting"),
        }
    }

    fn status_of(jobs: &Jobs, job_id: JobId) -> Option<JobStatus> {
        jobs.published(job_id).map(|event| event.status.clone())
    }

    /// A row as the first release wrote it: no lease, no event log, `attempts` runs started.
    fn legacy_row(conn: &rusqlite::Connection, status: &JobStatus, attempts: u32, key: &str) {
        let settings = serde_json::to_string(&MixSettings::default().validate(&[], 48_000).unwrap()).unwrap();
        conn.execute(
            "INSERT INTO jobs (job_id, status, settings, stems, idempotency_key, attempts, webhook) VALUES (?1, ?2, ?3, '[]', ?4, ?5, NULL)",
            rusqlite::params![status.job_id().to_string(), serde_json::to_string(status).unwrap(), settings, key, attempts],
        )
        .unwrap();
    }

    #[tokio::test]
    async fn a_first_release_database_is_migrated_its_finished_jobs_kept_and_crash_loops_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let database_dir = crate::media::MediaLayout::new(dir.path()).database_dir();
        std::fs::create_dir_all(&database_dir).unwrap();
        let queued = JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1);
        let failed = queued.apply(JobChange::Failed { code: ErrorCode::DecodeFailed, message: "broken".into() }).unwrap();
        let progress = JobChange::Progress { state: JobState::Mixing, progress: Progress::running(71.0), message: "Mixing".into() };
        let crash_looping = JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1).apply(JobChange::Started).unwrap().apply(progress).unwrap();
        {
            let conn = rusqlite::Connection::open(crate::jobs::store::sqlite_file(&database_dir)).unwrap();
            conn.execute_batch(
                "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL, settings TEXT NOT NULL, stems TEXT NOT NULL,
                    idempotency_key TEXT, attempts INTEGER NOT NULL DEFAULT 0, webhook TEXT);",
            )
            .unwrap();
            legacy_row(&conn, &failed, 1, "first");
            legacy_row(&conn, &crash_looping, 3, "second");
        }
        // No mixer slots: the rescue at start is what changes the crash-looping job.
        let jobs = open_jobs(dir.path(), 0, EVENT_BUFFER).await;
        let mut given_up = None;
        for _ in 0..200 {
            given_up = status_of(&jobs, crash_looping.job_id()).filter(|status| status.state().is_terminal());
            if given_up.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let given_up = given_up.expect("the job whose runs all died was given up");
        assert_eq!(status_of(&jobs, failed.job_id()), Some(failed.clone()), "a finished job answers exactly as before");
        assert_eq!((given_up.error_code(), given_up.seq(), given_up.progress().value()), (Some(ErrorCode::Interrupted), crash_looping.seq() + 1, 71));
        // Each Idempotency-Key still finds its own job.
        for (key, job) in [("first", &failed), ("second", &crash_looping)] {
            assert_eq!(submit(&jobs, Some(key)).await, job.job_id(), "{key}");
        }
    }

    #[tokio::test]
    async fn a_project_channel_carries_only_its_projects_changes_and_goes_after_its_last_subscriber() {
        use tokio::sync::broadcast::error::TryRecvError;
        let dir = tempfile::tempdir().unwrap();
        let jobs = open_jobs(dir.path(), 0, EVENT_BUFFER).await;
        let p1: ProjectId = "p1".parse().unwrap();
        let mut own = jobs.subscribe_events(Some(&p1));
        let mut every = jobs.subscribe_events(None);
        // A submit returns once its change is published.
        let elsewhere = submit_to(&jobs, "p2", None).await;
        let here = submit_to(&jobs, "p1", None).await;
        assert_eq!(every.try_recv().unwrap().status.job_id(), elsewhere);
        assert_eq!(every.try_recv().unwrap().status.job_id(), here);
        assert_eq!(own.try_recv().unwrap().status.job_id(), here);
        assert!(matches!(own.try_recv(), Err(TryRecvError::Empty)), "p2's change is not on p1's channel");
        assert_eq!(jobs.inner.live.project_channels(), std::slice::from_ref(&p1), "a channel only for the project with a subscriber");

        drop(own);
        jobs.cancel(&p1, here).await.unwrap();
        assert!(jobs.inner.live.project_channels().is_empty(), "dropped at the first change after its last subscriber left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_job_expires_exactly_when_its_ttl_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open_jobs(dir.path(), 0, EVENT_BUFFER).await;
        let canceled = submit(&jobs, Some("key")).await;
        let unfinished = submit(&jobs, None).await;
        jobs.cancel(&"p1".parse().unwrap(), canceled).await.unwrap();
        // Published on the log reader's own thread, which the paused clock does not wait for.
        while !status_of(&jobs, canceled).is_some_and(|status| status.state().is_terminal()) {
            tokio::task::yield_now().await;
        }

        // Its TTL runs from the moment its end was stamped. Sleeping lets the expiry task run up
        // to the paused clock.
        let finished_at = jobs.inner.live.finished_at(canceled).expect("a finished job has an end time");
        tokio::time::sleep_until(finished_at + Duration::from_secs(3600) - Duration::from_millis(1)).await;
        assert!(status_of(&jobs, canceled).is_some(), "kept until its TTL has passed");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(status_of(&jobs, canceled), None, "gone once it has");
        assert_eq!(jobs.find(canceled).await.unwrap().map(|event| event.status.job_id()), None, "from the store too");
        assert_ne!(submit(&jobs, Some("key")).await, canceled, "its Idempotency-Key is free again");
        tokio::time::sleep(Duration::from_secs(7 * 24 * 3600)).await;
        assert!(status_of(&jobs, unfinished).is_some(), "a job that has not finished never expires");
    }
    /// A one-second stereo tone at 48 kHz, written as a WAV in `dir`.
    fn tone_stem(dir: &Path) -> StemSource {
        let path = dir.join("tone.wav");
        let spec = hound::WavSpec { channels: 2, sample_rate: 48_000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
        let mut writer = hound::WavWriter::create(&path, spec).unwrap();
        for n in 0..48_000 {
            let sample = ((n as f64 * 440.0 * std::f64::consts::TAU / 48_000.0).sin() * 8_000.0) as i16;
            writer.write_sample(sample).unwrap();
            writer.write_sample(sample).unwrap();
        }
        writer.finalize().unwrap();
        StemSource { id: "s1".into(), name: "tone.wav".into(), path }
    }

    async fn submit_stem(jobs: &Jobs, stem: &StemSource) -> JobId {
        let settings = MixSettings::default().validate(std::slice::from_ref(stem), 48_000).unwrap();
        match jobs.submit("p1".parse().unwrap(), settings, vec![stem.clone()], None, None).await.unwrap() {
            Submitted::New(status) | Submitted::Existing(status) => status.job_id(),
            Submitted::QueueFull { cap } => panic!("the project already has {cap} jobs waiting"),
        }
    }

    async fn ended(jobs: &Jobs, job_id: JobId) -> JobStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = status_of(jobs, job_id).filter(|status| status.state().is_terminal()) {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "job {job_id} never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Review found that a panic after a run's background work started (in its writer, or as it
    /// publishes its ending) left the lease keeper renewing for ever: the job stayed `running` on
    /// every node and rescue never took it. Now the panic ends the job at once (`INTERNAL`), the
    /// run's entry and lease go, and the slot takes the next job.
    #[tokio::test]
    async fn a_panic_in_a_run_ends_its_job_and_the_slot_runs_the_next() {
        type Point = (&'static str, fn(&JobChange) -> bool);
        let points: [Point; 2] =
            [("the writer", |change| matches!(change, JobChange::Progress { .. })), ("the ending", |change| matches!(change, JobChange::Completed { .. }))];
        for (point, at) in points {
            let dir = tempfile::tempdir().unwrap();
            let stem = tone_stem(dir.path());
            let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let trigger = armed.clone();
            let hook = FaultHook::new(move |change| {
                if at(change) && trigger.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    panic!("injected in {point}");
                }
            });
            let jobs = open_jobs_with(dir.path(), 1, EVENT_BUFFER, hook).await;
            let panicked = submit_stem(&jobs, &stem).await;
            let status = ended(&jobs, panicked).await;
            assert_eq!((status.state(), status.error_code(), status.message()), (JobState::Error, Some(ErrorCode::Internal), "The mix failed unexpectedly"), "{point}");
            assert!(!armed.load(std::sync::atomic::Ordering::SeqCst), "{point}: the fault was hit");
            // The job is ended only once the panicked run's task is gone.
            assert!(jobs.inner.runs.is_empty(), "{point}: the panicked run left no entry");
            let next = submit_stem(&jobs, &stem).await;
            assert_eq!(ended(&jobs, next).await.state(), JobState::Complete, "{point}: the slot took the next job");
        }
    }

    /// Draining a queue writes a status per move that is news, not one per move: 40 jobs queued
    /// and canceled from the front leave 40 submits, 40 ends and 364 positions in the event log
    /// (`store::rules`), where rewriting every waiting job on each change left 40 + 40 + 780.
    #[tokio::test]
    async fn draining_a_queue_logs_the_moves_that_are_news() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open_jobs(dir.path(), 0, EVENT_BUFFER).await;
        let mut queued = Vec::new();
        for _ in 0..40 {
            queued.push(submit(&jobs, None).await);
        }
        let project: ProjectId = "p1".parse().unwrap();
        for job in &queued {
            jobs.cancel(&project, *job).await.unwrap();
        }
        assert_eq!(jobs.inner.store.events_after(0, 100_000).await.unwrap().len(), 444);
        let last = status_of(&jobs, *queued.last().unwrap()).unwrap();
        assert_eq!((last.state(), last.seq()), (JobState::Error, 1 + 10 + 1 + 1), "the last job: queued at 40, shown at 20 and each of 10..1, then canceled");
    }
}
