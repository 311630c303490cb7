//! The webhook outbox as the dispatcher sees it: due deliveries, and what each attempt came to.
//! The deliveries themselves are written by the job store, in the transaction of the change that
//! causes them; in a cluster every node's dispatcher drains the one outbox, each delivery claimed
//! by one node at a time.

use tokio::sync::Notify;

use super::model::JobId;
use super::store::{Store, StoreError};
use super::webhook::Attempt;

/// A delivery waiting for its next attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelivery {
    pub id: String,
    pub job_id: String,
    pub url: String,
    pub message_type: String,
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub attempted_at_ms: i64,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    /// When to try again; None ends the delivery with `outcome`.
    pub next_attempt_at_ms: Option<i64>,
    pub outcome: Option<&'static str>,
}

pub struct Outbox {
    store: Store,
    wake: Notify,
}

impl Outbox {
    pub fn new(store: Store) -> Self {
        Self { store, wake: Notify::new() }
    }

    /// Wakes the dispatcher: a delivery was just stored.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Up to `limit` deliveries due at `now_ms`, oldest first, claimed for this node.
    pub async fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingDelivery>, StoreError> {
        self.store.due_deliveries(now_ms, limit).await
    }

    /// When the next delivery becomes due (unix ms), if any.
    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        self.store.next_delivery_due().await
    }

    /// Records an attempt and the delivery's next step, in one transaction.
    pub async fn record(&self, delivery: &PendingDelivery, result: &AttemptResult) -> Result<(), StoreError> {
        self.store.record_attempt(delivery, result).await
    }

    /// Every attempt made for a job's deliveries, in order.
    pub async fn attempts(&self, job_id: JobId) -> Result<Vec<Attempt>, StoreError> {
        self.store.attempts(job_id).await
    }

    /// How many deliveries are pending, and when the oldest of them was made (unix ms).
    pub async fn backlog(&self) -> Result<(u64, Option<i64>), StoreError> {
        self.store.delivery_backlog().await
    }
}
