//! The one subscription core every stream adapter (SSE and WebSocket, per job, per project and
//! for all projects) is built on: the current snapshot first, then every later change.
//!
//! The broadcast receiver is created before the snapshot is read, so no change can fall between
//! the two; changes already covered by the snapshot are dropped by comparing `seq`. A subscriber
//! that lags behind the channel gets fresh snapshots instead of the events it missed (each event
//! is a full snapshot, so nothing is lost), and never slows a job: the channel never waits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use tokio_util::sync::CancellationToken;

use super::manager::Jobs;
use super::model::{JobEvent, JobId, JobStatus, ProjectId, Timestamp};

#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// One job, until its terminal event.
    Job(JobId),
    /// Every job of a project; stays open.
    Project(ProjectId),
    /// Every job; stays open.
    All,
}

impl Scope {
    fn matches(&self, status: &JobStatus) -> bool {
        match self {
            Scope::Job(id) => status.job_id() == *id,
            Scope::Project(project) => status.project_id() == project,
            Scope::All => true,
        }
    }
}

struct Feed {
    jobs: Jobs,
    scope: Scope,
    events: Receiver<Arc<JobEvent>>,
    pending: VecDeque<Arc<JobEvent>>,
    /// The last seq sent per job; a job leaves once its terminal event is sent.
    sent: HashMap<JobId, u64>,
    /// When the newest event this feed received was stamped: a resync also sends jobs that
    /// finished after it.
    last_seen: Option<Timestamp>,
    /// After a resync, the seq each snapshot covered. The channel may still hold older events
    /// for those jobs (a finished job included, which `sent` no longer tracks); they are stale
    /// until the backlog retained at the resync has been received.
    covered: HashMap<JobId, u64>,
    backlog: usize,
    finished: bool,
    shutdown: CancellationToken,
}

/// Snapshot, then changes, for `scope`. With `resume_after` (a per-job `Last-Event-ID`), events
/// up to that seq are not sent again.
pub fn feed(jobs: &Jobs, scope: Scope, resume_after: Option<u64>, shutdown: CancellationToken) -> impl Stream<Item = Arc<JobEvent>> + Send + 'static {
    let events = jobs.subscribe_events();
    let mut sent = HashMap::new();
    if let (Scope::Job(job_id), Some(seq)) = (&scope, resume_after) {
        sent.insert(*job_id, seq);
    }
    let mut feed =
        Feed { jobs: jobs.clone(), scope, events, pending: VecDeque::new(), sent, last_seen: None, covered: HashMap::new(), backlog: 0, finished: false, shutdown };
    feed.queue_snapshots(false);
    if matches!(feed.scope, Scope::Job(_)) && feed.pending.is_empty() && feed.sent.is_empty() {
        // The job does not exist (any more): nothing will ever come.
        feed.finished = true;
    }
    futures_util::stream::unfold(feed, |mut feed| async move {
        let status = feed.next().await?;
        Some((status, feed))
    })
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
                        self.backlog = self.backlog.saturating_sub(1);
                        if self.backlog == 0 {
                            self.covered.clear();
                        }
                        self.last_seen = Some(event.status.updated_at());
                        if self.scope.matches(&event.status) {
                            self.pending.push_back(event);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        self.jobs.metrics().count_resync();
                        self.queue_snapshots(true);
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }

    /// Whether `status` is news to this subscriber; records it as sent when it is.
    fn admit(&mut self, status: &JobStatus) -> bool {
        let stale = |seen: &HashMap<JobId, u64>| seen.get(&status.job_id()).is_some_and(|&seq| status.seq() <= seq);
        if stale(&self.sent) || stale(&self.covered) {
            return false;
        }
        if status.state().is_terminal() {
            self.sent.remove(&status.job_id());
            if matches!(self.scope, Scope::Job(_)) {
                self.finished = true;
            }
        } else {
            self.sent.insert(status.job_id(), status.seq());
        }
        true
    }

    /// Queues the current snapshot of every job in scope this subscriber should know about: live
    /// jobs, and after a lag also those it was following or that finished while it lagged.
    fn queue_snapshots(&mut self, resync: bool) {
        let (scope, sent, last_seen) = (&self.scope, &self.sent, self.last_seen);
        let snapshots = self.jobs.matching(|status| {
            scope.matches(status)
                && match scope {
                    Scope::Job(_) => true,
                    _ => !status.state().is_terminal() || (resync && (sent.contains_key(&status.job_id()) || last_seen.is_none_or(|t| status.updated_at() >= t))),
                }
        });
        if resync {
            // Every event still retained was sent before this snapshot was read, so once that
            // many have been received nothing older than the snapshot can arrive.
            self.covered = snapshots.iter().map(|event| (event.status.job_id(), event.status.seq())).collect();
            self.backlog = self.events.len();
            if self.backlog == 0 {
                self.covered.clear();
            }
        }
        self.pending.extend(snapshots);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;
    use crate::audio::MixSettings;
    use crate::jobs::layout::MediaLayout;
    use crate::jobs::manager::{JobsConfig, Submitted};

    #[tokio::test]
    async fn a_lagging_subscriber_never_sees_a_finished_job_go_back() {
        let dir = tempfile::tempdir().unwrap();
        // No mixer slots and a 4-event channel: jobs only queue, and five changes make a lag.
        let config = JobsConfig {
            mix_slots: 0,
            job_ttl: Duration::from_secs(3600),
            output_retention: Duration::from_secs(3600),
            layout: MediaLayout::new(dir.path()),
            event_buffer: 4,
        };
        let jobs = Jobs::open(config, CancellationToken::new()).unwrap();
        let project: ProjectId = "p1".parse().unwrap();
        let mut stream = Box::pin(feed(&jobs, Scope::Project(project.clone()), None, CancellationToken::new()));

        let submit = || match jobs.submit(project.clone(), MixSettings::default().validate(&[], 48_000).unwrap(), Vec::new(), None, None).unwrap() {
            Submitted::New(status) => status.job_id(),
            Submitted::Existing(_) => unreachable!("no idempotency key"),
        };
        let _others = [submit(), submit(), submit()];
        let last = submit();
        jobs.cancel(&project, last).unwrap();

        let mut seen: Vec<(JobId, u64, bool)> = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            seen.push((event.status.job_id(), event.status.seq(), event.status.state().is_terminal()));
        }
        let canceled: Vec<_> = seen.iter().filter(|(id, _, _)| *id == last).collect();
        assert_eq!(canceled.len(), 1, "the canceled job once, as its terminal snapshot: {seen:?}");
        assert!(canceled[0].2);
        assert_eq!(jobs.metrics().resyncs(), 1, "the subscriber did lag");
    }
}
