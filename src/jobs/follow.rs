//! Follows the store's event log into this node's memory and its broadcast channel: the one place
//! a change is published, whichever node made it. The log is read from the last cursor on, when
//! the store says something changed and at least every [`POLL`] regardless, so a notification that
//! never came (a lost LISTEN connection, a restarted database) delays a change and never loses it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::live::LiveView;
use super::metrics::Metrics;
use super::model::{JobEvent, JobState};
use super::runs::LocalRuns;
use super::store::{Store, StoreError};

/// The longest a change can wait to be seen when every notification is lost.
const POLL: Duration = Duration::from_secs(1);
/// Log entries read per query.
const BATCH: u32 = 1000;
/// How long to wait before reading again after the store failed.
const RETRY: Duration = Duration::from_millis(250);

/// Runs `follow` on a thread of its own, on the current runtime's clock, timers, I/O and
/// blocking pool. As one task among the runtime's, each step of a change's way to its subscribers
/// (the wake-up at its commit, the read of the log, the publish) waited its turn behind every
/// subscriber task still delivering the change before: 50 ms at the median and 340 ms at p99 with
/// 15,000 subscribers, before any of them was sent anything. On its own thread it is woken directly.
///
/// `runtime_gone` is cancelled when the runtime drops its tasks, so that the thread stops before it
/// would poll the runtime's stopped timers (a server shuts `follow` down first; a test's runtime
/// may simply end).
pub(super) fn spawn_on_own_thread(follow: impl std::future::Future<Output = ()> + Send + 'static, runtime_gone: CancellationToken) -> std::io::Result<()> {
    let runtime = tokio::runtime::Handle::current();
    runtime.spawn(async move {
        let _cancel_when_dropped = runtime_gone.drop_guard();
        std::future::pending::<()>().await
    });
    std::thread::Builder::new().name("mixd-follow".into()).spawn(move || runtime.block_on(follow))?;
    Ok(())
}

/// What the log is read into, and what a published change sets going on this node.
pub(super) struct Follower {
    pub store: Store,
    pub live: Arc<LiveView>,
    pub runs: Arc<LocalRuns>,
    pub metrics: Arc<Metrics>,
    /// A job was queued: a slot may take it.
    pub wake_runner: Arc<Notify>,
    /// A job finished: its TTL starts.
    pub wake_expiry: Arc<Notify>,
    /// A change that may have stored a webhook delivery.
    pub wake_deliveries: Arc<Notify>,
}

impl Follower {
    pub async fn follow(self, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            match self.read_log().await {
                Ok(()) if failing => {
                    tracing::info!("the job store answers again");
                    failing = false;
                }
                Ok(()) => {}
                Err(err) => {
                    if !failing {
                        tracing::warn!(%err, "cannot read the job log; retrying");
                    }
                    failing = true;
                }
            }
            let wait = if failing { RETRY } else { POLL };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = self.store.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn read_log(&self) -> Result<(), StoreError> {
        loop {
            let entries = self.store.events_after(self.live.head(), BATCH).await?;
            let full = entries.len() == BATCH as usize;
            let Some(last) = entries.last().map(|entry| entry.cursor) else { return Ok(()) };
            for event in self.live.take_in(entries) {
                self.react(&event);
            }
            self.live.reached(last);
            if !full {
                return Ok(());
            }
        }
    }

    /// What a published change sets going on this node.
    fn react(&self, event: &JobEvent) {
        let (state, job_id) = (event.status.state(), event.status.job_id());
        if state.is_terminal() {
            self.wake_expiry.notify_one();
        }
        if state.is_terminal() || state == JobState::Running {
            // Such a change may have queued a webhook delivery, on whichever node made it.
            self.wake_deliveries.notify_one();
        }
        if state.is_terminal() || state == JobState::Queued {
            // A run of it here ends: canceled, or rescued after this node lost its lease.
            self.runs.superseded(job_id, event.status.seq(), &self.metrics);
        }
        if state == JobState::Queued {
            self.wake_runner.notify_one();
        }
    }
}
