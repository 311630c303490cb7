//! Output retention: mix outputs older than the retention are deleted, on the data root or in the
//! bucket, and on object storage stems' audio left without a record goes in the same pass.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::layout::MediaLayout;
use super::objects::ObjectMedia;

/// Deletes per-job outputs older than `retention`, then sleeps until the oldest remaining one is
/// due. New outputs are always due later, so nothing needs to wake it early. On object storage
/// the same pass removes stems' audio left without a record, and runs at least hourly.
pub async fn remove_old_outputs(layout: MediaLayout, objects: Option<ObjectMedia>, retention: Duration, shutdown: CancellationToken) {
    loop {
        let wait = match &objects {
            Some(objects) => objects.sweep(retention).await.unwrap_or_else(|err| {
                tracing::warn!(%err, "could not sweep the object storage; trying again in a minute");
                Duration::from_secs(60)
            }),
            None => {
                let layout = layout.clone();
                match tokio::task::spawn_blocking(move || layout.remove_old_results(retention)).await {
                    Ok(Ok(next_due)) => next_due.unwrap_or(retention),
                    Ok(Err(err)) => {
                        tracing::warn!(%err, "could not sweep old outputs");
                        Duration::from_secs(3600)
                    }
                    Err(err) => {
                        tracing::error!(%err, "output sweep panicked");
                        Duration::from_secs(3600)
                    }
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
