//! The one subscription core every stream adapter (SSE and WebSocket, per job, per project and
//! for all projects) is built on: a snapshot first, then every later change.
//!
//! The broadcast receiver (on the project's channel, or for the global scope on the channel of
//! every change) is created before the snapshot is read, and the snapshot is read under
//! the lock the log follower publishes under; the snapshot reflects the log up to some cursor, so
//! every change on the channel at or before that cursor is already in it and is dropped. A
//! subscriber that lags behind the channel gets a fresh snapshot of every job in its scope that
//! changed after the last change it received (each event is a full snapshot, so nothing is lost),
//! and never slows a job: the channel never waits.
//!
//! Project and global streams are resumable by cursor: with one, the snapshot is every job of the
//! scope that changed after it, finished ones included, so a dashboard that was away misses no end.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use tokio_util::sync::CancellationToken;

use super::manager::{JobError, Jobs};
use super::model::{JobEvent, JobStatus};
use crate::ids::{JobId, ProjectId};

#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// One job of a project, until its terminal event.
    Job(ProjectId, JobId),
    /// Every job of a project; stays open.
    Project(ProjectId),
    /// Every job; stays open.
    All,
}

impl Scope {
    fn matches(&self, status: &JobStatus) -> bool {
        match self {
            Scope::Job(_, id) => status.job_id() == *id,
            Scope::Project(project) => status.project_id() == project,
            Scope::All => true,
        }
    }
}

/// Where a subscriber picks up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resume {
    /// From now: snapshots of the live jobs (the job itself for a job stream).
    Now,
    /// A job stream's `Last-Event-ID`: its changes after this seq.
    AfterSeq(u64),
    /// A project or global stream's cursor: every job of the scope that changed after it.
    AfterCursor(u64),
}

/// Project and global streams' cursors: the store's epoch and a log position within it.
impl Jobs {
    /// A project or global stream's cursor for log position `position`: `{epoch}:{position}`.
    pub fn cursor(&self, position: u64) -> String {
        format!("{}:{position}", self.epoch())
    }

    /// Where a stream resumes from `cursor`. A cursor of another epoch (the store was replaced: a
    /// new database, a reset file), from the future (beyond what this node has read of the log),
    /// or that is not a cursor at all, gets the full snapshot of the scope: a client could only
    /// miss jobs by being trusted.
    pub fn resume_from(&self, cursor: &str) -> Resume {
        let within_epoch = cursor.trim().split_once(':').filter(|(epoch, _)| *epoch == self.epoch());
        match within_epoch.and_then(|(_, position)| position.parse::<u64>().ok()) {
            Some(position) if position <= self.live().head() => Resume::AfterCursor(position),
            _ => Resume::AfterCursor(0),
        }
    }
}

struct Feed {
    jobs: Jobs,
    scope: Scope,
    events: Receiver<Arc<JobEvent>>,
    pending: VecDeque<Arc<JobEvent>>,
    /// The log position everything sent so far reflects: a channel event at or before it is old.
    position: u64,
    /// A job stream's resume point: nothing up to this seq is sent.
    after_seq: u64,
    finished: bool,
    shutdown: CancellationToken,
}

/// Snapshot, then changes, for `scope`, picking up at `resume`. A job stream for a job this node
/// has not seen yet (just submitted on another node) starts from the store's copy.
pub async fn feed(jobs: &Jobs, scope: Scope, resume: Resume, shutdown: CancellationToken) -> Result<impl Stream<Item = Arc<JobEvent>> + Send + 'static, JobError> {
    let events = jobs.subscribe_events(match &scope {
        Scope::Job(project, _) | Scope::Project(project) => Some(project),
        Scope::All => None,
    });
    let after_seq = match resume {
        Resume::AfterSeq(seq) => seq,
        _ => 0,
    };
    let mut feed = Feed { jobs: jobs.clone(), scope, events, pending: VecDeque::new(), position: 0, after_seq, finished: false, shutdown };
    let after_cursor = match resume {
        Resume::AfterCursor(cursor) => Some(cursor),
        _ => None,
    };
    feed.queue_snapshots(after_cursor);
    if let (Scope::Job(_, job_id), true) = (&feed.scope, feed.pending.is_empty()) {
        match jobs.find(*job_id).await? {
            // Not in memory yet: its changes after this copy come on the channel.
            Some(event) if jobs.published(*job_id).is_none() => {
                feed.position = feed.position.min(event.cursor);
                feed.pending.push_back(event);
            }
            Some(_) => feed.queue_snapshots(None),
            // Gone: nothing will ever come.
            None => feed.finished = true,
        }
    }
    Ok(futures_util::stream::unfold(feed, |mut feed| async move {
        let status = feed.next().await?;
        Some((status, feed))
    }))
}

impl Feed {
    async fn next(&mut self) -> Option<Arc<JobEvent>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if self.admit(&event.status) {
                    return Some(event);
                }
                continue;
            }
            if self.finished {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                received = self.events.recv() => match received {
                    Ok(event) => {
                        if event.cursor <= self.position {
                            continue;
                        }
                        self.position = event.cursor;
                        if self.scope.matches(&event.status) {
                            self.pending.push_back(event);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.jobs.metrics().count_resync();
                        self.queue_snapshots(Some(self.position));
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Whether `status` is news to this subscriber.
    fn admit(&mut self, status: &JobStatus) -> bool {
        if let Scope::Job(..) = self.scope {
            if status.seq() <= self.after_seq {
                return false;
            }
            self.after_seq = status.seq();
            if status.state().is_terminal() {
                self.finished = true;
            }
        }
        true
    }

    /// Queues snapshots of the jobs in scope, oldest change first: with `after`, every one that
    /// changed after that cursor; without, the live ones (a job stream: its job, whatever state).
    fn queue_snapshots(&mut self, after: Option<u64>) {
        let scope = &self.scope;
        let live = |status: &JobStatus| matches!(scope, Scope::Job(..)) || !status.state().is_terminal();
        let project = match scope {
            Scope::Job(project, _) | Scope::Project(project) => Some(project),
            Scope::All => None,
        };
        let (snapshots, head) = self.jobs.live().snapshots(project, |status| scope.matches(status), after, live);
        self.position = self.position.max(head);
        self.pending.extend(snapshots);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;
    use crate::jobs::manager::tests::{open_jobs, submit};

    /// Everything the stream has ready within a moment, as (job, seq, terminal, cursor).
    async fn drain(stream: &mut (impl Stream<Item = Arc<JobEvent>> + Unpin)) -> Vec<(JobId, u64, bool, u64)> {
        let mut seen = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            seen.push((event.status.job_id(), event.status.seq(), event.status.state().is_terminal(), event.cursor));
        }
        seen
    }

    #[tokio::test]
    async fn a_lagging_subscriber_never_sees_a_finished_job_go_back() {
        let dir = tempfile::tempdir().unwrap();
        // No mixer slots and a 4-event channel: jobs only queue, and five changes make a lag.
        let jobs = open_jobs(dir.path(), 0, 4).await;
        let project: ProjectId = "p1".parse().unwrap();
        let mut stream = Box::pin(feed(&jobs, Scope::Project(project.clone()), Resume::Now, CancellationToken::new()).await.unwrap());

        let _others = [submit(&jobs, None).await, submit(&jobs, None).await, submit(&jobs, None).await];
        let last = submit(&jobs, None).await;
        jobs.cancel(&project, last).await.unwrap();

        let seen = drain(&mut stream).await;
        let canceled: Vec<_> = seen.iter().filter(|(id, ..)| *id == last).collect();
        assert_eq!(canceled.len(), 1, "the canceled job once, as its terminal snapshot: {seen:?}");
        assert!(canceled[0].2);
        assert!(seen.windows(2).all(|pair| pair[0].3 < pair[1].3), "cursors only grow: {seen:?}");
        assert_eq!(jobs.metrics().resyncs(), 1, "the subscriber did lag");
    }

    #[tokio::test]
    async fn a_project_subscriber_resuming_from_its_cursor_gets_the_jobs_that_ended_while_it_was_away() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = open_jobs(dir.path(), 0, crate::jobs::EVENT_BUFFER).await;
        let project: ProjectId = "p1".parse().unwrap();
        let (ended_before, untouched) = (submit(&jobs, None).await, submit(&jobs, None).await);
        jobs.cancel(&project, ended_before).await.unwrap();

        let mut first = Box::pin(feed(&jobs, Scope::Project(project.clone()), Resume::Now, CancellationToken::new()).await.unwrap());
        let seen = drain(&mut first).await;
        assert_eq!(seen.iter().map(|(id, ..)| *id).collect::<Vec<_>>(), [untouched], "live jobs only: {seen:?}");
        let cursor = seen.last().unwrap().3;
        drop(first);

        // Away: the live job ends, and another is queued and ends.
        jobs.cancel(&project, untouched).await.unwrap();
        let later = submit(&jobs, None).await;
        jobs.cancel(&project, later).await.unwrap();

        let mut resumed = Box::pin(feed(&jobs, Scope::Project(project.clone()), Resume::AfterCursor(cursor), CancellationToken::new()).await.unwrap());
        let seen = drain(&mut resumed).await;
        let ended: Vec<(JobId, bool)> = seen.iter().map(|(id, _, terminal, _)| (*id, *terminal)).collect();
        assert_eq!(ended, [(untouched, true), (later, true)], "each job that changed since, as it is now, oldest change first: {seen:?}");
        assert!(seen[0].3 > cursor);
    }
}
