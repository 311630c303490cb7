//! Follows the store's event log into this node's memory and its broadcast channel: the one place
//! a change is published, whichever node made it. The log is read from the last cursor on, when
//! the store says something changed and at least every [`POLL`] regardless, so a notification that
//! never came (a lost LISTEN connection, a restarted database) delays a change and never loses it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::manager::{Cache, Cached, Jobs};
use super::model::{JobEvent, JobState};

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

pub(super) async fn follow(jobs: Jobs, shutdown: CancellationToken) {
    let store = jobs.inner.store.clone();
    let mut failing = false;
    loop {
        match read_log(&jobs).await {
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
            _ = store.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

async fn read_log(jobs: &Jobs) -> Result<(), super::store::StoreError> {
    loop {
        let head = jobs.cache().head;
        let entries = jobs.inner.store.events_after(head, BATCH).await?;
        let full = entries.len() == BATCH as usize;
        let Some(last) = entries.last().map(|entry| entry.cursor) else { return Ok(()) };
        // A batch goes into memory at once: a write's changes (a cancel and the queue it moves)
        // are in one transaction, and whoever reads memory sees all of them or none.
        let mut published = Vec::with_capacity(entries.len());
        {
            let mut cache = jobs.cache();
            for entry in entries {
                let cursor = entry.cursor;
                match entry.parse() {
                    Ok(event) => published.extend(publish(jobs, &mut cache, event)),
                    Err(err) => {
                        tracing::error!(cursor, %err, "skipping a log entry that cannot be read");
                        cache.head = cursor;
                    }
                }
            }
        }
        published.iter().for_each(|event| react(jobs, event));
        jobs.inner.head.send_replace(last);
        if !full {
            return Ok(());
        }
    }
}

/// Takes one logged change into memory and sends it to every subscriber, unless memory already
/// holds it or a later one (it was read at start); the change, when it was news.
fn publish(jobs: &Jobs, cache: &mut Cache, event: Arc<JobEvent>) -> Option<Arc<JobEvent>> {
    let status = &event.status;
    cache.head = event.cursor;
    if cache.jobs.get(&status.job_id()).is_some_and(|cached| cached.published.status.seq() >= status.seq()) {
        return None;
    }
    let finished_at = status.state().is_terminal().then(Instant::now);
    cache.jobs.insert(status.job_id(), Cached { published: event.clone(), finished_at });
    // Sent under the lock: a subscriber reading memory under it sees each change either in its
    // snapshot or on its channel, never both nor neither.
    let _ = jobs.inner.events.send(event.clone());
    let project = status.project_id();
    if let Some(channel) = cache.projects.get(project) {
        if channel.send(event.clone()).is_err() {
            // Its subscribers have all left.
            cache.projects.remove(project);
        }
    }
    Some(event)
}

/// What a published change sets going on this node.
fn react(jobs: &Jobs, event: &JobEvent) {
    let (state, job_id) = (event.status.state(), event.status.job_id());
    if state.is_terminal() {
        jobs.inner.expiry_wake.notify_one();
    }
    if state.is_terminal() || state == JobState::Running {
        // Such a change may have queued a webhook delivery, on whichever node made it.
        jobs.inner.outbox.wake();
    }
    if state.is_terminal() || state == JobState::Queued {
        // A run of it here ends: canceled, or rescued after this node lost its lease.
        if let Some(run) = jobs.inner.local_runs.lock().expect("never poisoned").get(&job_id).filter(|run| event.status.seq() > run.started_seq) {
            super::runner::lose_lease(jobs.metrics(), &run.stop);
        }
    }
    if state == JobState::Queued {
        jobs.inner.runner_wake.notify_one();
    }
}
