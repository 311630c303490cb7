//! The runs this node holds, by job: what stops each, and the lease it runs under. An entry lives
//! exactly as long as its run's [`RunGuard`], so a run that ends in any way, a panic included,
//! leaves no entry behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::metrics::{LeaseEvent, Metrics};
use super::store::Lease;
use crate::ids::JobId;

#[derive(Default)]
pub(super) struct LocalRuns {
    runs: Mutex<HashMap<JobId, LocalRun>>,
}

struct LocalRun {
    stop: Arc<AtomicBool>,
    /// The seq its start was written at: a later `queued` or final status not written by the run
    /// means it no longer holds the job.
    started_seq: u64,
    lease: Lease,
}

/// A run's place in [`LocalRuns`]: removed by [`RunGuard::release`] as the run's ending is
/// written, or when this is dropped (a run that panicked) at the latest.
pub(super) struct RunGuard {
    runs: Arc<LocalRuns>,
    job_id: JobId,
    lease: Lease,
    pub stop: Arc<AtomicBool>,
}

impl RunGuard {
    /// Takes the run out of this node's runs: its own final change, arriving through the log, is
    /// then not taken for another's, nor is the run handed back. Only this run's entry goes: a
    /// later run of the same job on this node (rescued meanwhile) keeps its own.
    pub fn release(&self) {
        let mut runs = self.runs.runs();
        if runs.get(&self.job_id).is_some_and(|run| run.lease == self.lease) {
            runs.remove(&self.job_id);
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.release();
    }
}

impl LocalRuns {
    fn runs(&self) -> MutexGuard<'_, HashMap<JobId, LocalRun>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the run of `job_id` that started at `started_seq` under `lease`.
    pub fn register(self: &Arc<Self>, job_id: JobId, lease: Lease, started_seq: u64) -> RunGuard {
        let stop = Arc::new(AtomicBool::new(false));
        self.runs().insert(job_id, LocalRun { stop: stop.clone(), started_seq, lease });
        RunGuard { runs: self.clone(), job_id, lease, stop }
    }

    /// A change at `seq` that this node's run of `job_id` did not write (the job was canceled, or
    /// rescued after this node lost its lease) stops that run.
    pub fn superseded(&self, job_id: JobId, seq: u64, metrics: &Metrics) {
        if let Some(run) = self.runs().get(&job_id).filter(|run| seq > run.started_seq) {
            lose_lease(metrics, &run.stop);
        }
    }

    /// Every run, to hand back at shutdown.
    pub fn all(&self) -> Vec<(JobId, Lease, Arc<AtomicBool>)> {
        self.runs().iter().map(|(id, run)| (*id, run.lease, run.stop.clone())).collect()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.runs().is_empty()
    }
}

/// Stops a run whose lease is gone, counting it once. A run stopped on purpose (handed back at
/// shutdown) was stopped before, and is not counted.
pub(super) fn lose_lease(metrics: &Metrics, stop: &AtomicBool) {
    if !stop.swap(true, Ordering::Relaxed) {
        metrics.count_lease(LeaseEvent::Lost, 1);
    }
}
