//! Output retention: mix outputs older than the retention are deleted, on the data root or in the
//! bucket, and on object storage stems' audio left without a record goes in the same pass.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::storage::Media;

/// Deletes per-job outputs older than `retention`, then sleeps until the oldest remaining one is
/// due. New outputs are always due later, so nothing needs to wake it early. On object storage
/// the same pass removes stems' audio left without a record, and runs at least hourly.
pub async fn remove_old_outputs(media: Media, retention: Duration, shutdown: CancellationToken) {
    loop {
        let wait = media.sweep(retention).await.unwrap_or_else(|err| {
            tracing::warn!(%err, "could not sweep old outputs; trying again in a minute");
            Duration::from_secs(60)
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
