//! Follows the store's event log into this node's memory and its broadcast channel: the one place
//! a change is published, whichever node made it. The log is read from the last cursor on, when
//! the store says something changed and at least every [`POLL`] regardless, so a notification that
//! never came (a lost LISTEN connection, a restarted database) delays a change and never loses it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::manager::{Cached, Jobs};
use super::model::{JobEvent, JobState};

/// The longest a change can wait to be seen when every notification is lost.
const POLL: Duration = Duration::from_secs(1);
/// Log entries read per query.
const BATCH: u32 = 1000;
/// How long to wait before reading again after the store failed.
const RETRY: Duration = Duration::from_millis(250);

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
            _ = store.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn read_log(jobs: &Jobs) -> Result<(), super::store::StoreError> {
    loop {
        let head = jobs.cache().head;
        let entries = jobs.inner.store.events_after(head, BATCH).await?;
        let full = entries.len() == BATCH as usize;
        for entry in entries {
            let cursor = entry.cursor;
            match entry.parse() {
                Ok(event) => publish(jobs, event),
                Err(err) => {
                    tracing::error!(cursor, %err, "skipping a log entry that cannot be read");
                    jobs.cache().head = cursor;
                }
            }
            jobs.inner.head.send_replace(cursor);
        }
        if !full {
            return Ok(());
        }
    }
}

/// Takes one logged change into memory and sends it to every subscriber, unless memory already
/// holds it or a later one (it was read at start).
fn publish(jobs: &Jobs, event: Arc<JobEvent>) {
    let status = &event.status;
    let job_id = status.job_id();
    {
        let mut cache = jobs.cache();
        cache.head = event.cursor;
        if cache.jobs.get(&job_id).is_some_and(|cached| cached.published.status.seq() >= status.seq()) {
            return;
        }
        let finished_at = status.state().is_terminal().then(Instant::now);
        cache.jobs.insert(job_id, Cached { published: event.clone(), finished_at });
        // Sent under the lock: a subscriber reading memory under it sees each change either in
        // its snapshot or on its channel, never both nor neither.
        let _ = jobs.inner.events.send(event.clone());
    }
    let state = status.state();
    if state.is_terminal() {
        jobs.inner.expiry_wake.notify_one();
    }
    if state.is_terminal() || state == JobState::Running {
        // Such a change may have queued a webhook delivery, on whichever node made it.
        jobs.inner.outbox.wake();
    }
    if state.is_terminal() || state == JobState::Queued {
        // A run of it here ends: canceled, or rescued after this node lost its lease.
        if let Some(run) = jobs.inner.local_runs.lock().expect("never poisoned").get(&job_id).filter(|run| status.seq() > run.started_seq) {
            super::runner::lose_lease(jobs.metrics(), &run.stop);
        }
    }
    if state == JobState::Queued {
        jobs.inner.runner_wake.notify_one();
    }
}
