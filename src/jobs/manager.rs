//! The handle on all jobs. The store is the truth, shared by every node of a cluster; each node
//! keeps the current status of every job in memory, fed only by the store's event log (see
//! `follow.rs`), and answers status polls and new subscribers from it. The lock around that
//! memory guards maps and channel sends, never a disk or network write, so readers never wait on
//! one. Writers (submit, cancel, the runner's fenced writes) go to the store; what they changed
//! reaches the memory and every subscriber on every node through the log, once, in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::engine::EnginePool;
use super::layout::MediaLayout;
use super::metrics::Metrics;
use super::model::{JobEvent, JobId, JobState, JobStatus, ProjectId};
use super::objects::ObjectMedia;
use super::outbox::Outbox;
pub use super::store::JobError;
use super::store::{NewJob, Store, StoreError, Submitted};
use super::webhook::WebhookSpec;
use crate::audio::{StemSource, ValidSettings};

/// Room for bursts of changes; a subscriber that falls further behind is resynchronised.
pub const EVENT_BUFFER: usize = 4096;
/// The same, for one project's changes: its channel is made for each project with subscribers,
/// and a slot of it is allocated whether used or not.
const PROJECT_EVENT_BUFFER: usize = 256;
/// How long a write waits to see itself in this node's memory before answering anyway (the store
/// has it; a poll that follows at once reads it from there).
const READ_YOUR_WRITE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Mixes this node runs at once; 0 takes none.
    pub mix_slots: usize,
    pub job_ttl: Duration,
    /// How long output files are kept; at least `job_ttl`, so a job never points at a deleted file.
    pub output_retention: Duration,
    /// Changes the channel of every change holds for a subscriber that falls behind
    /// ([`EVENT_BUFFER`]); a project's channel holds at most [`PROJECT_EVENT_BUFFER`] of them.
    pub event_buffer: usize,
    /// Where results go: the local data root, or with object storage this node's work directory.
    pub layout: MediaLayout,
    /// The object storage, when media are kept there.
    pub objects: Option<ObjectMedia>,
    /// How long a node holds a job without renewing it.
    pub lease: Duration,
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
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub config: JobsConfig,
    pub store: Store,
    pub cache: Mutex<Cache>,
    pub events: broadcast::Sender<Arc<JobEvent>>,
    /// The log position the cache has reached, for writers waiting to see their change.
    pub head: watch::Sender<u64>,
    pub metrics: Arc<Metrics>,
    pub engine: EnginePool,
    pub outbox: Arc<Outbox>,
    /// This process run's lease owner id.
    pub owner: Uuid,
    /// Wakes the runner: a job was queued, or a slot came free.
    pub runner_wake: Notify,
    /// Wakes expiry: a job finished.
    pub expiry_wake: Notify,
    /// Runs on this node, by job.
    pub local_runs: Mutex<HashMap<JobId, LocalRun>>,
    /// The runner, the log follower and the sweeps; done once runs are handed back.
    pub tasks: TaskTracker,
}

pub(super) struct LocalRun {
    /// Stops the mix.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The seq its start was written at: a later `queued` or final status not written by the run
    /// means it no longer holds the job.
    pub started_seq: u64,
    pub lease: super::store::Lease,
}

#[derive(Default)]
pub(super) struct Cache {
    pub jobs: HashMap<JobId, Cached>,
    /// The log position memory reflects: every entry up to it, none after.
    pub head: u64,
    /// Each project's changes, on a channel of its own for the project's subscribers: on the one
    /// channel of every change, each change woke every subscriber of every project, only for all
    /// but the project's own to drop it. Made by the first subscriber; dropped at the first change
    /// after the last one left, or by [`Jobs::subscribe_events`] now and then.
    pub projects: HashMap<ProjectId, broadcast::Sender<Arc<JobEvent>>>,
    /// How many project channels may exist before those without subscribers are dropped.
    projects_limit: usize,
}

pub(super) struct Cached {
    /// As last published: snapshots and resyncs send this same serialisation.
    pub published: Arc<JobEvent>,
    pub finished_at: Option<Instant>,
}

impl Jobs {
    /// Reads every job into memory, then starts following the log, the runner (which rescues
    /// jobs whose node died, those of an earlier run of this one included) and the sweeps. They all
    /// end with `shutdown`; [`Jobs::stopped`] waits for that.
    pub async fn open(config: JobsConfig, store: Store, shutdown: CancellationToken) -> Result<Self, OpenError> {
        let snapshot = store.snapshot().await?;
        let engine = EnginePool::new(config.mix_slots).map_err(OpenError::Engine)?;
        let (events, _) = broadcast::channel(config.event_buffer);
        let mut cache = Cache { head: snapshot.head, ..Cache::default() };
        for logged in snapshot.jobs {
            match logged.parse() {
                Ok(event) => {
                    let finished_at =
                        event.status.state().is_terminal().then(|| Instant::now().checked_sub(event.status.updated_at().elapsed()).unwrap_or_else(Instant::now));
                    cache.jobs.insert(event.status.job_id(), Cached { published: event, finished_at });
                }
                Err(err) => tracing::error!(%err, "skipping a job record that cannot be read"),
            }
        }
        let jobs = Self {
            inner: Arc::new(Inner {
                config,
                outbox: Arc::new(Outbox::new(store.clone())),
                store,
                cache: Mutex::new(cache),
                events,
                head: watch::Sender::new(snapshot.head),
                metrics: Arc::default(),
                engine,
                owner: Uuid::new_v4(),
                runner_wake: Notify::new(),
                expiry_wake: Notify::new(),
                local_runs: Mutex::default(),
                tasks: TaskTracker::new(),
            }),
        };
        let tasks = &jobs.inner.tasks;
        let follow_stop = shutdown.child_token();
        let follow = tasks.track_future(super::follow::follow(jobs.clone(), follow_stop.clone()));
        super::follow::spawn_on_own_thread(follow, follow_stop).map_err(OpenError::Follower)?;
        tasks.spawn(super::runner::run_slots(jobs.clone(), shutdown.clone()));
        tasks.spawn(super::retention::expire_finished_jobs(jobs.clone(), shutdown.clone()));
        tasks.spawn(super::retention::remove_old_outputs(jobs.clone(), shutdown));
        tasks.close();
        Ok(jobs)
    }

    /// Waits until the background tasks have ended after shutdown, this node's runs handed back.
    pub async fn stopped(&self) {
        self.inner.tasks.wait().await
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The webhook outbox, for the dispatcher and the attempts route.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.inner.outbox
    }

    /// Whether several nodes share this store.
    pub fn is_clustered(&self) -> bool {
        self.inner.store.is_shared()
    }

    /// This node's lease owner id, unique per process run.
    pub fn node_id(&self) -> Uuid {
        self.inner.owner
    }

    /// The webhook secret kept in the job store, made by `generate` at the first start.
    pub async fn webhook_secret(&self, generate: impl FnOnce() -> String + Send + 'static) -> Result<String, JobError> {
        Ok(self.inner.store.webhook_secret(generate).await?)
    }

    /// Answers when the store can be reached.
    pub async fn ping_store(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// Every change from now on, or with `project` only that project's.
    pub(super) fn subscribe_events(&self, project: Option<&ProjectId>) -> broadcast::Receiver<Arc<JobEvent>> {
        let Some(project) = project else { return self.inner.events.subscribe() };
        let mut cache = self.cache();
        if let Some(channel) = cache.projects.get(project) {
            return channel.subscribe();
        }
        // A channel whose subscribers all left stays until its project's next change; projects
        // that never change again are dropped here, each time the map has doubled.
        if cache.projects.len() >= cache.projects_limit {
            cache.projects.retain(|_, channel| channel.receiver_count() > 0);
            cache.projects_limit = (cache.projects.len() * 2).max(64);
        }
        let (channel, receiver) = broadcast::channel(self.inner.config.event_buffer.min(PROJECT_EVENT_BUFFER));
        cache.projects.insert(project.clone(), channel);
        receiver
    }

    pub(super) fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.inner.cache.lock().expect("the cache is never left half-changed")
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
        let job = NewJob { job_id: JobId::new(), project, settings, stems, idempotency_key, webhook };
        let submitted = self.inner.store.submit(job).await?;
        let status = match &submitted {
            Submitted::New(status) => {
                tracing::info!(job_id = %status.job_id(), "job queued");
                status
            }
            // Perhaps made a moment ago on another node: this one's lists should hold it too.
            Submitted::Existing(status) => status,
        };
        self.seen(status).await;
        Ok(submitted)
    }

    /// Waits (briefly) until this node's memory holds `status` or later, so that a poll right
    /// after a write reads what it wrote.
    async fn seen(&self, status: &JobStatus) {
        let mut head = self.inner.head.subscribe();
        let reached = || self.cache().jobs.get(&status.job_id()).is_some_and(|cached| cached.published.status.seq() >= status.seq());
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
        if let Some(event) = self.published(job_id) {
            return Ok(Some(event));
        }
        match self.inner.store.find(job_id).await? {
            Some(logged) => Ok(Some(logged.parse()?)),
            None => Ok(None),
        }
    }

    /// A job's status as this node last published it.
    pub fn published(&self, job_id: JobId) -> Option<Arc<JobEvent>> {
        self.cache().jobs.get(&job_id).map(|cached| cached.published.clone())
    }

    /// The project's newest job, as last published.
    pub fn newest_published(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
        self.cache()
            .jobs
            .values()
            .map(|cached| &cached.published)
            .filter(|event| event.status.project_id() == project)
            .max_by_key(|event| event.status.created_at())
            .cloned()
    }

    /// The project's jobs, newest first.
    pub fn for_project(&self, project: &ProjectId) -> Vec<JobStatus> {
        let mut jobs: Vec<JobStatus> =
            self.cache().jobs.values().map(|cached| &cached.published.status).filter(|status| status.project_id() == project).cloned().collect();
        jobs.sort_by_key(|status| std::cmp::Reverse(status.created_at()));
        jobs
    }

    /// Every project that has jobs, with its newest job as last published.
    pub fn newest_by_project(&self) -> HashMap<ProjectId, Arc<JobEvent>> {
        let mut newest: HashMap<ProjectId, Arc<JobEvent>> = HashMap::new();
        for cached in self.cache().jobs.values() {
            let event = &cached.published;
            let slot = newest.entry(event.status.project_id().clone()).or_insert_with(|| event.clone());
            if event.status.created_at() > slot.status.created_at() {
                *slot = event.clone();
            }
        }
        newest
    }

    pub fn has_project(&self, project: &ProjectId) -> bool {
        self.cache().jobs.values().any(|cached| cached.published.status.project_id() == project)
    }

    /// How many jobs are in each state, and how many wait for a slot (cluster-wide).
    pub fn counts(&self) -> (HashMap<JobState, usize>, usize) {
        let mut counts = HashMap::new();
        for cached in self.cache().jobs.values() {
            *counts.entry(cached.published.status.state()).or_default() += 1;
        }
        let queued = counts.get(&JobState::Queued).copied().unwrap_or(0);
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
        let layout = MediaLayout::new(dir);
        let store = Store::open(&StoreLocation::Sqlite(layout.database_dir())).await.unwrap();
        let config = JobsConfig {
            mix_slots,
            job_ttl: Duration::from_secs(3600),
            output_retention: Duration::from_secs(3600),
            event_buffer,
            layout,
            objects: None,
            lease: Duration::from_secs(15),
        };
        Jobs::open(config, store, CancellationToken::new()).await.unwrap()
    }

    pub async fn submit(jobs: &Jobs, key: Option<&str>) -> JobId {
        submit_to(jobs, "p1", key).await
    }

    pub async fn submit_to(jobs: &Jobs, project: &str, key: Option<&str>) -> JobId {
        match jobs.submit(project.parse().unwrap(), MixSettings::default().validate(&[], 48_000).unwrap(), Vec::new(), key.map(String::from), None).await.unwrap() {
            Submitted::New(status) | Submitted::Existing(status) => status.job_id(),
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
        let database_dir = MediaLayout::new(dir.path()).database_dir();
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
        assert!(jobs.cache().projects.keys().eq([&p1]), "a channel only for the project with a subscriber");

        drop(own);
        jobs.cancel(&p1, here).await.unwrap();
        assert!(jobs.cache().projects.is_empty(), "dropped at the first change after its last subscriber left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_job_expires_exactly_when_its_ttl_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open_jobs(dir.path(), 0, EVENT_BUFFER).await;
        let canceled = submit(&jobs, Some("key")).await;
        let unfinished = submit(&jobs, None).await;
        jobs.cancel(&"p1".parse().unwrap(), canceled).await.unwrap();
        // Published on the log reader's own thread, which the paused clock does not wait for: the
        // clock stays put while this task is busy, so it reads the end time as now.
        while !status_of(&jobs, canceled).is_some_and(|status| status.state().is_terminal()) {
            tokio::task::yield_now().await;
        }

        // Sleeping lets the expiry task run up to the paused clock.
        tokio::time::sleep(Duration::from_millis(3_599_900)).await;
        assert!(status_of(&jobs, canceled).is_some(), "kept until its TTL has passed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(status_of(&jobs, canceled), None, "gone once it has");
        assert_eq!(jobs.find(canceled).await.unwrap().map(|event| event.status.job_id()), None, "from the store too");
        assert_ne!(submit(&jobs, Some("key")).await, canceled, "its Idempotency-Key is free again");
        tokio::time::sleep(Duration::from_secs(7 * 24 * 3600)).await;
        assert!(status_of(&jobs, unfinished).is_some(), "a job that has not finished never expires");
    }
}
