//! The rules every store follows, whatever its SQL: how a queue change repositions the waiting
//! jobs, what happens to a job whose run was interrupted, how a run starts and a job is canceled,
//! and how a stored row becomes a job to run (or a damaged one that fails instead of blocking the
//! queue). The backends only read and write rows; every decision about them is made here.

use super::records::{Change, JobError, QueueEntry, StoreError};
use crate::audio::{StemSource, ValidSettings};
use crate::jobs::model::{ErrorCode, JobChange, JobState, JobStatus};
use crate::jobs::webhook::WebhookSpec;

/// Runs a job may begin without ending (its node died or stalled each time) before it is given up.
pub const MAX_INTERRUPTED_RUNS: u32 = 3;

/// The changes that put `entries` in queue order with 1-based positions: a rejoining job says it
/// was re-queued, a waiting one whose position moved says where it is now.
pub(super) fn reposition(mut entries: Vec<QueueEntry>) -> Vec<Change> {
    entries.sort_by_key(|entry| entry.order);
    let mut changes = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let position = index as u32 + 1;
        let change = if entry.rejoining { JobChange::Requeued(position) } else { JobChange::QueuePosition(position) };
        if let Ok(next) = entry.status.apply(change) {
            changes.push(Change::new(next, entry.webhook.as_ref(), false));
        }
    }
    changes
}

/// What happens to a job whose run ended without finishing it: `Ok` it rejoins the queue, `Err`
/// the change that gives it up after [`MAX_INTERRUPTED_RUNS`].
pub(super) fn after_interrupted_run(status: &JobStatus, webhook: Option<&WebhookSpec>, interrupted_runs: u32) -> Result<(), Change> {
    if interrupted_runs < MAX_INTERRUPTED_RUNS {
        return Ok(());
    }
    let message = format!("The node running this mix stopped {interrupted_runs} times; it was not run again");
    let failed = status.apply(JobChange::Failed { code: ErrorCode::Interrupted, message }).expect("an unfinished job can fail");
    Err(Change::new(failed, webhook, false))
}

/// The start of a claimed job's run number `attempt`.
pub(super) fn started(status: &JobStatus, webhook: Option<&WebhookSpec>, attempt: u32) -> Option<Change> {
    status.apply(JobChange::Started).ok().map(|next| Change::new(next, webhook, attempt == 1))
}

/// The end of a job whose run failed unexpectedly (it panicked); `None` when it has ended already.
pub(super) fn run_failed(status: &JobStatus, webhook: Option<&WebhookSpec>) -> Option<Change> {
    let failed = JobChange::Failed { code: ErrorCode::Internal, message: "The mix failed unexpectedly".into() };
    status.apply(failed).ok().map(|next| Change::new(next, webhook, false))
}

/// The end of a canceled job, or why it cannot be canceled.
pub(super) fn canceled(status: &JobStatus, webhook: Option<&WebhookSpec>) -> Result<Change, JobError> {
    status.apply(JobChange::canceled()).map(|next| Change::new(next, webhook, false)).map_err(|_| JobError::Finished)
}

pub(super) const TERMINAL_STATES: [&str; 2] = [JobState::Complete.as_str(), JobState::Error.as_str()];

/// The settings column. Rows written before settings were stored validated hold plain
/// [`crate::audio::MixSettings`]; `ValidSettings` refuses unknown fields, so neither passes for the other.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum StoredSettings {
    Valid(ValidSettings),
    Legacy(crate::audio::MixSettings),
}

/// A job's settings and stems as stored, ready to run. Legacy settings are planned against the
/// stems, as the version that wrote them would have done.
pub(super) fn parse_job_inputs(settings: &str, stems: &str, webhook: Option<&str>) -> Result<(ValidSettings, Vec<StemSource>, Option<WebhookSpec>), StoreError> {
    let stems: Vec<StemSource> = serde_json::from_str(stems)?;
    let settings = match serde_json::from_str(settings)? {
        StoredSettings::Valid(settings) => settings,
        StoredSettings::Legacy(settings) => crate::audio::plan(&stems, settings).map_err(|err| StoreError::Corrupt(format!("legacy settings do not plan: {err}")))?,
    };
    Ok((settings, stems, parse_webhook(webhook)?))
}

/// The webhook column.
pub(super) fn parse_webhook(webhook: Option<&str>) -> Result<Option<WebhookSpec>, StoreError> {
    Ok(webhook.map(serde_json::from_str).transpose()?)
}

/// What a queued job whose record cannot be run comes to: it ends in error rather than blocking
/// the queue.
pub(super) fn damaged(job_id: &str, status: &JobStatus, err: &StoreError) -> Change {
    tracing::error!(%job_id, %err, "a queued job's record cannot be run");
    let failed = status.apply(JobChange::Failed { code: ErrorCode::Internal, message: "The job's record is damaged".into() }).expect("a queued job can fail");
    Change::new(failed, None, false)
}
