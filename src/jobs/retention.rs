//! How long finished jobs are kept. Every node forgets a finished job when its TTL has passed and
//! deletes it from the store (a delete another node already made changes nothing), so the
//! Idempotency-Key is free again everywhere. Outputs are the media layer's to sweep.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::live::LiveView;
use super::store::Store;

/// Removes finished jobs once their TTL has passed, sleeping until the next one is due or `wake`
/// says a job finished.
pub(super) async fn expire_finished_jobs(live: Arc<LiveView>, store: Store, ttl: Duration, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let expired = live.expired(ttl);
        if !expired.is_empty() {
            match store.delete_finished(&expired).await {
                Ok(()) => live.forget(&expired),
                Err(err) => {
                    tracing::warn!(%err, "could not delete expired jobs; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
        let next_deadline = live.next_expiry(ttl);
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
