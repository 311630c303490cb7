//! The webhook outbox as the dispatcher sees it: due deliveries, and what each attempt came to.
//! The deliveries themselves are rows of the job store, written in the transaction of the change
//! that causes them; in a cluster every node's dispatcher drains the one outbox, each delivery
//! claimed by one node at a time.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::ids::JobId;
use crate::jobs::{Attempt, AttemptResult, PendingDelivery, Store, StoreError};

pub struct Outbox {
    store: Store,
    /// Woken by the job layer when a published change may have stored a delivery.
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn new(store: Store, wake: Arc<Notify>) -> Self {
        Self { store, wake }
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
