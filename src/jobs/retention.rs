//! How long finished jobs and their outputs are kept. Every node forgets a finished job when its
//! TTL has passed and deletes it from the store (a delete another node already made changes
//! nothing), so the Idempotency-Key is free again everywhere. Output directories are swept by
//! age on the shared media storage.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::manager::Jobs;
use super::model::JobId;

/// Removes finished jobs once their TTL has passed, sleeping until the next one is due.
pub(super) async fn expire_finished_jobs(jobs: Jobs, shutdown: CancellationToken) {
    let ttl = jobs.inner.config.job_ttl;
    loop {
        let now = Instant::now();
        let expired: Vec<JobId> = jobs.cache().jobs.iter().filter(|(_, cached)| cached.finished_at.is_some_and(|t| t + ttl <= now)).map(|(id, _)| *id).collect();
        if !expired.is_empty() {
            match jobs.inner.store.delete_finished(&expired).await {
                Ok(()) => {
                    let mut cache = jobs.cache();
                    for job_id in &expired {
                        cache.jobs.remove(job_id);
                        tracing::debug!(%job_id, "job expired");
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "could not delete expired jobs; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
        let next_deadline = jobs.cache().jobs.values().filter_map(|cached| cached.finished_at).min().map(|t| t + ttl);
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = jobs.inner.expiry_wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Deletes per-job outputs older than the retention, then sleeps until the oldest remaining one is
/// due. New outputs are always due later, so nothing needs to wake it early. On the data root the
/// legacy `mix_outputs/final_mix.wav` is a hard link and outlives its job's directory. On object
/// storage the same pass removes stems' audio left without a record, and runs at least hourly.
pub(super) async fn remove_old_outputs(jobs: Jobs, shutdown: CancellationToken) {
    let config = &jobs.inner.config;
    let retention = config.output_retention.max(config.job_ttl);
    loop {
        let wait = match &config.objects {
            Some(objects) => objects.sweep(retention).await.unwrap_or_else(|err| {
                tracing::warn!(%err, "could not sweep the object storage; trying again in a minute");
                Duration::from_secs(60)
            }),
            None => {
                let layout = config.layout.clone();
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
