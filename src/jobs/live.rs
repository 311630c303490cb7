//! This node's live view of every job: the current status of each, as last published, and the
//! broadcast channels changes go out on. It is fed only by the store's event log (`follow`), and
//! answers polls, lists and new subscribers. The lock around it guards maps and channel sends,
//! never a disk or network write, so readers never wait on one; and a panic under it (a bug)
//! costs that one call: each change under the lock leaves the maps whole.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::model::{JobEvent, JobState, JobStatus};
use super::store::LoggedEvent;
use crate::ids::{JobId, ProjectId};

/// A project's channel is made for each project with subscribers, and a slot of it is allocated
/// whether used or not: it holds at most this many changes.
const PROJECT_EVENT_BUFFER: usize = 256;

pub(super) struct LiveView {
    cache: Mutex<Cache>,
    /// Every change, for the global streams.
    events: broadcast::Sender<Arc<JobEvent>>,
    /// The log position the view has reached, for writers waiting to see their change.
    head: watch::Sender<u64>,
    project_buffer: usize,
}

#[derive(Default)]
struct Cache {
    jobs: HashMap<JobId, Cached>,
    /// The log position memory reflects: every entry up to it, none after.
    head: u64,
    /// Each project's changes, on a channel of its own for the project's subscribers: on the one
    /// channel of every change, each change woke every subscriber of every project, only for all
    /// but the project's own to drop it. Made by the first subscriber; dropped at the first change
    /// after the last one left, or by [`LiveView::subscribe`] now and then.
    projects: HashMap<ProjectId, broadcast::Sender<Arc<JobEvent>>>,
    /// How many project channels may exist before those without subscribers are dropped.
    projects_limit: usize,
}

struct Cached {
    /// As last published: snapshots and resyncs send this same serialisation.
    published: Arc<JobEvent>,
    /// When the job ended, on this node's clock; its TTL runs from here.
    finished_at: Option<Instant>,
}

impl Cached {
    fn new(published: Arc<JobEvent>) -> Self {
        Self { finished_at: finished_at(&published.status), published }
    }
}

/// When a finished job ended, on this node's monotonic clock: the moment its final status was
/// stamped, however late this node read it (at start, or behind another node's write), so that
/// every node expires it at the same time.
fn finished_at(status: &JobStatus) -> Option<Instant> {
    let now = Instant::now();
    status.state().is_terminal().then(|| now.checked_sub(status.updated_at().elapsed()).unwrap_or(now))
}

impl LiveView {
    /// The view of `jobs`, read at log position `head`. A record that cannot be read is skipped.
    pub fn new(jobs: Vec<LoggedEvent>, head: u64, event_buffer: usize) -> Self {
        let mut cache = Cache { head, ..Cache::default() };
        for logged in jobs {
            match logged.parse() {
                Ok(event) => {
                    cache.jobs.insert(event.status.job_id(), Cached::new(event));
                }
                Err(err) => tracing::error!(%err, "skipping a job record that cannot be read"),
            }
        }
        let (events, _) = broadcast::channel(event_buffer);
        Self { cache: Mutex::new(cache), events, head: watch::Sender::new(head), project_buffer: event_buffer.min(PROJECT_EVENT_BUFFER) }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The log position the view has reached.
    pub fn head(&self) -> u64 {
        self.cache().head
    }

    /// Follows the head as the view takes in the log.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Takes a batch of log entries in at once and sends every one that is news to its
    /// subscribers; returns those. A write's changes (a cancel and the queue it moves) are in one
    /// transaction, and whoever reads the view sees all of them or none.
    pub fn take_in(&self, entries: Vec<LoggedEvent>) -> Vec<Arc<JobEvent>> {
        let Some(last) = entries.last().map(|entry| entry.cursor) else { return Vec::new() };
        let mut published = Vec::with_capacity(entries.len());
        {
            let mut cache = self.cache();
            for entry in entries {
                let cursor = entry.cursor;
                match entry.parse() {
                    Ok(event) => published.extend(self.publish(&mut cache, event)),
                    Err(err) => {
                        tracing::error!(cursor, %err, "skipping a log entry that cannot be read");
                        cache.head = cursor;
                    }
                }
            }
        }
        self.head.send_replace(last);
        published
    }

    /// Takes one logged change in and sends it to every subscriber, unless the view already holds
    /// it or a later one (it was read at start); the change, when it was news.
    fn publish(&self, cache: &mut Cache, event: Arc<JobEvent>) -> Option<Arc<JobEvent>> {
        let status = &event.status;
        cache.head = event.cursor;
        if cache.jobs.get(&status.job_id()).is_some_and(|cached| cached.published.status.seq() >= status.seq()) {
            return None;
        }
        cache.jobs.insert(status.job_id(), Cached::new(event.clone()));
        // Sent under the lock: a subscriber reading the view under it sees each change either in
        // its snapshot or on its channel, never both nor neither.
        let _ = self.events.send(event.clone());
        let project = status.project_id();
        if let Some(channel) = cache.projects.get(project) {
            if channel.send(event.clone()).is_err() {
                // Its subscribers have all left.
                cache.projects.remove(project);
            }
        }
        Some(event)
    }

    /// Every change from now on, or with `project` only that project's.
    pub fn subscribe(&self, project: Option<&ProjectId>) -> broadcast::Receiver<Arc<JobEvent>> {
        let Some(project) = project else { return self.events.subscribe() };
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
        let (channel, receiver) = broadcast::channel(self.project_buffer);
        cache.projects.insert(project.clone(), channel);
        receiver
    }

    /// The jobs `matches` picks, oldest change first, with the log position the view had reached:
    /// with `after`, every one that changed after that cursor; without, those `live` picks.
    pub fn snapshots(&self, matches: impl Fn(&JobStatus) -> bool, after: Option<u64>, live: impl Fn(&JobStatus) -> bool) -> (Vec<Arc<JobEvent>>, u64) {
        let cache = self.cache();
        let mut snapshots: Vec<Arc<JobEvent>> = cache
            .jobs
            .values()
            .map(|cached| &cached.published)
            .filter(|event| {
                matches(&event.status)
                    && match after {
                        Some(cursor) => event.cursor > cursor,
                        None => live(&event.status),
                    }
            })
            .cloned()
            .collect();
        let head = cache.head;
        drop(cache);
        snapshots.sort_by_key(|event| event.cursor);
        (snapshots, head)
    }

    /// A job's status as last published.
    pub fn published(&self, job_id: JobId) -> Option<Arc<JobEvent>> {
        self.cache().jobs.get(&job_id).map(|cached| cached.published.clone())
    }

    /// Whether the view holds `job_id` at `seq` or later.
    pub fn has_seen(&self, job_id: JobId, seq: u64) -> bool {
        self.cache().jobs.get(&job_id).is_some_and(|cached| cached.published.status.seq() >= seq)
    }

    /// The project's newest job.
    pub fn newest(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
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

    /// Every project that has jobs, with its newest job.
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

    /// How many jobs are in each state.
    pub fn counts(&self) -> HashMap<JobState, usize> {
        let mut counts = HashMap::new();
        for cached in self.cache().jobs.values() {
            *counts.entry(cached.published.status.state()).or_default() += 1;
        }
        counts
    }

    /// The finished jobs whose `ttl` has passed.
    pub fn expired(&self, ttl: Duration) -> Vec<JobId> {
        let now = Instant::now();
        self.cache().jobs.iter().filter(|(_, cached)| cached.finished_at.is_some_and(|t| t + ttl <= now)).map(|(id, _)| *id).collect()
    }

    /// When the next finished job's `ttl` passes.
    pub fn next_expiry(&self, ttl: Duration) -> Option<Instant> {
        self.cache().jobs.values().filter_map(|cached| cached.finished_at).min().map(|t| t + ttl)
    }

    pub fn forget(&self, job_ids: &[JobId]) {
        let mut cache = self.cache();
        for job_id in job_ids {
            cache.jobs.remove(job_id);
            tracing::debug!(%job_id, "job expired");
        }
    }

    /// Which projects have a channel of their own.
    #[cfg(test)]
    pub fn project_channels(&self) -> Vec<ProjectId> {
        self.cache().projects.keys().cloned().collect()
    }

    /// When a finished job's TTL started.
    #[cfg(test)]
    pub fn finished_at(&self, job_id: JobId) -> Option<Instant> {
        self.cache().jobs.get(&job_id).and_then(|cached| cached.finished_at)
    }
}
