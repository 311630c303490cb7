//! This node's live view of every job: the current status of each, as last published, and the
//! broadcast channels changes go out on. It is fed only by the store's event log (`follow`), and
//! answers polls, lists and new subscribers. The lock around it guards maps and channel sends,
//! never a disk or network write, so readers never wait on one; and a panic under it (a bug)
//! costs that one call: each change under the lock leaves the maps whole.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::model::{JobEvent, JobState, JobStatus};
use super::store::{LoggedEvent, Store, StoreError};
use crate::ids::{JobId, ProjectId, Timestamp};

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
    /// Each project's jobs, oldest first: a poll, a list or a subscribe costs what its project
    /// holds, not what the server holds.
    by_project: HashMap<ProjectId, BTreeSet<(Timestamp, JobId)>>,
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

impl Cache {
    fn insert(&mut self, cached: Cached) {
        let status = &cached.published.status;
        self.by_project.entry(status.project_id().clone()).or_default().insert((status.created_at(), status.job_id()));
        self.jobs.insert(status.job_id(), cached);
    }

    fn remove(&mut self, job_id: JobId) {
        let Some(cached) = self.jobs.remove(&job_id) else { return };
        let status = &cached.published.status;
        if let Some(project) = self.by_project.get_mut(status.project_id()) {
            project.remove(&(status.created_at(), job_id));
            if project.is_empty() {
                self.by_project.remove(status.project_id());
            }
        }
    }

    /// The project's jobs, newest first.
    fn project(&self, project: &ProjectId) -> impl Iterator<Item = &Arc<JobEvent>> {
        self.by_project.get(project).into_iter().flat_map(|ids| ids.iter().rev()).filter_map(|(_, id)| self.jobs.get(id)).map(|cached| &cached.published)
    }
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
                Ok(event) => cache.insert(Cached::new(event)),
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
    /// transaction, and whoever reads the view sees all of them or none. Writers waiting to see
    /// their change learn of it from [`Self::reached`], once what it sets going is under way.
    pub fn take_in(&self, entries: Vec<LoggedEvent>) -> Vec<Arc<JobEvent>> {
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
        published
    }

    /// Tells writers waiting on [`Self::watch_head`] that the view has reached log position `last`.
    pub fn reached(&self, last: u64) {
        self.head.send_replace(last);
    }

    /// Takes one logged change in and sends it to every subscriber, unless the view already holds
    /// it or a later one (it was read at start); the change, when it was news.
    fn publish(&self, cache: &mut Cache, event: Arc<JobEvent>) -> Option<Arc<JobEvent>> {
        let status = &event.status;
        cache.head = event.cursor;
        if cache.jobs.get(&status.job_id()).is_some_and(|cached| cached.published.status.seq() >= status.seq()) {
            return None;
        }
        cache.insert(Cached::new(event.clone()));
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

    /// The jobs `matches` picks (of `project` only, when given), oldest change first, with the log
    /// position the view had reached: with `after`, every one that changed after that cursor;
    /// without, those `live` picks.
    pub fn snapshots(
        &self,
        project: Option<&ProjectId>,
        matches: impl Fn(&JobStatus) -> bool,
        after: Option<u64>,
        live: impl Fn(&JobStatus) -> bool,
    ) -> (Vec<Arc<JobEvent>>, u64) {
        let cache = self.cache();
        let candidates: Box<dyn Iterator<Item = &Arc<JobEvent>>> = match project {
            Some(project) => Box::new(cache.project(project)),
            None => Box::new(cache.jobs.values().map(|cached| &cached.published)),
        };
        let mut snapshots: Vec<Arc<JobEvent>> = candidates
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

    /// A job's status as last published, or for one the view does not hold yet (another node's
    /// brand-new job its log reader has not reached) as the store has it.
    pub async fn find(&self, store: &Store, job_id: JobId) -> Result<Option<Arc<JobEvent>>, StoreError> {
        if let Some(event) = self.published(job_id) {
            return Ok(Some(event));
        }
        store.find(job_id).await?.map(LoggedEvent::parse).transpose()
    }

    /// Whether the view holds `job_id` at `seq` or later.
    pub fn has_seen(&self, job_id: JobId, seq: u64) -> bool {
        self.cache().jobs.get(&job_id).is_some_and(|cached| cached.published.status.seq() >= seq)
    }

    /// The project's newest job.
    pub fn newest(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
        self.cache().project(project).next().cloned()
    }

    /// The project's newest complete job: the one "the newest mix" names, on every path that
    /// does (the preview, the legacy `mix_outputs/final_mix.wav`), on every node and storage.
    pub fn newest_complete(&self, project: &ProjectId) -> Option<Arc<JobEvent>> {
        self.cache().project(project).find(|event| event.status.state() == JobState::Complete).cloned()
    }

    /// The project's jobs, newest first.
    pub fn for_project(&self, project: &ProjectId) -> Vec<JobStatus> {
        self.cache().project(project).map(|event| event.status.clone()).collect()
    }

    /// Every project that has jobs, with its newest job.
    pub fn newest_by_project(&self) -> HashMap<ProjectId, Arc<JobEvent>> {
        let cache = self.cache();
        cache.by_project.keys().filter_map(|project| Some((project.clone(), cache.project(project).next()?.clone()))).collect()
    }

    pub fn has_project(&self, project: &ProjectId) -> bool {
        self.cache().by_project.contains_key(project)
    }

    /// How many jobs are in each state.
    /// Jobs by state, and the queued ones by project.
    pub fn counts(&self) -> (HashMap<JobState, usize>, HashMap<ProjectId, usize>) {
        let (mut counts, mut queued) = (HashMap::new(), HashMap::new());
        for cached in self.cache().jobs.values() {
            let status = &cached.published.status;
            *counts.entry(status.state()).or_default() += 1;
            if status.state() == JobState::Queued {
                *queued.entry(status.project_id().clone()).or_default() += 1;
            }
        }
        (counts, queued)
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
            cache.remove(*job_id);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::JobChange;

    /// A job's TTL runs from the moment its end was stamped, however late a node reads it (at
    /// start, or behind another node's write): every node then expires it at the same time.
    #[test]
    fn a_finished_job_s_ttl_runs_from_its_stamp_not_from_when_it_was_read() {
        let ended = JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1).apply(JobChange::canceled()).unwrap();
        let mut json = serde_json::to_value(&ended).unwrap();
        let ten_minutes_ago = chrono::Utc::now() - chrono::Duration::minutes(10);
        json["updated_at"] = ten_minutes_ago.to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into();
        let read_late: JobStatus = serde_json::from_value(json).unwrap();
        let started = finished_at(&read_late).expect("a finished job has an end");
        let behind = Instant::now().duration_since(started);
        assert!(behind >= Duration::from_secs(599) && behind < Duration::from_secs(602), "{behind:?}");
        assert_eq!(finished_at(&JobStatus::queued(JobId::new(), "p1".parse().unwrap(), 1)), None, "an unfinished job has no end");
    }
}
