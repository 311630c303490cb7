//! Building and running the server: the data root, the job layer, the router and the listener.
//! Binding happens in `build`, so a caller asking for port 0 learns the real port before serving.
//!
//! Connections are served by `api::connection` (hyper-util, or its own writer for event streams)
//! rather than `axum::serve`, which sets no header-read timeout: a client that never finishes its
//! headers would hold a connection (and a file descriptor) forever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::Keys;
use crate::api::{default_max_connections, router, serve_connection, App, AppState, ConnectionConfig, ConnectionLimits, ConnectionPlace, RateLimits, StreamLimits};
use crate::config::Config;
use crate::jobs::{Jobs, JobsConfig, Store, StoreLocation, EVENT_BUFFER};
use crate::media::{remove_old_outputs, Media, MediaLayout, ObjectMedia, StemCache, StemStore, StorageUrl};
use crate::webhooks::{Dispatcher, DispatcherConfig, Outbox, WebhookSecret};

/// Webhook deliveries in flight at once: a receiver that hangs holds one until the timeout.
const WEBHOOK_CONCURRENCY: usize = 16;
/// How long a receiver has to answer, as the contract says.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);
/// In a cluster, a partial file this old at start is left by a dead node, not one still writing.
const CLUSTER_PARTIAL_AGE: Duration = Duration::from_secs(24 * 3600);

/// A listener whose queue of connections not yet accepted holds `backlog` (tokio's `bind` asks for 128).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As `TcpListener::bind` does: a restarted server can take its port back at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The backlog the kernel grants for `requested`: no more than `net.core.somaxconn` (Linux).
fn effective_backlog(requested: u32) -> u32 {
    let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|text| text.trim().parse().ok());
    cap.map_or(requested, |cap: u32| requested.min(cap))
}

/// Inside the cache directory: where this node writes mixes before storing them.
const WORK_DIR: &str = "work";

/// Opens the stem cache and reaches the bucket; a bucket that does not answer or refuses us is a
/// start-up error that names it (and not the credentials).
async fn connect_objects(config: &Config, layout: &MediaLayout, url: StorageUrl) -> anyhow::Result<ObjectMedia> {
    let cache_dir = config.cache_dir.clone().unwrap_or_else(|| layout.default_cache_dir());
    let max_bytes = (config.cache_max_gb * 1e9) as u64;
    let cache = StemCache::open(cache_dir.clone(), max_bytes).with_context(|| format!("opening the stem cache {}", cache_dir.display()))?;
    let shown = url.to_string();
    let objects = ObjectMedia::connect(url, cache)
        .await
        .with_context(|| format!("the object storage {shown} cannot be used (is it reachable, does the bucket exist, may these credentials read and write it?)"))?;
    tracing::info!(storage = shown, cache = %cache_dir.display(), cache_max_bytes = max_bytes, "media on object storage");
    Ok(objects)
}

pub struct Application {
    listener: TcpListener,
    state: AppState,
    connection_limits: ConnectionLimits,
}

impl Application {
    pub async fn build(mut config: Config) -> anyhow::Result<Self> {
        config.check().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating the data root {}", config.data_dir.display()))?;
        let layout = MediaLayout::new(&config.data_dir);
        let location = match &config.database_url {
            Some(url) => StoreLocation::Postgres(url.expose().to_string()),
            None => StoreLocation::Sqlite(layout.database_dir()),
        };
        // Alone, every partial file is an earlier run's; on storage other nodes share, only old ones are.
        let partial_age = if config.database_url.is_some() { CLUSTER_PARTIAL_AGE } else { Duration::ZERO };
        let renamed = layout.rename_legacy_project_dirs().context("renaming project directories")?;
        if renamed > 0 {
            tracing::info!(renamed, "renamed the directories of projects with capital letters to their case-safe names");
        }
        let removed = layout.remove_partials(partial_age).context("cleaning partial files")?;
        if removed > 0 {
            tracing::info!(removed, "removed partial files left by an earlier run");
        }
        // The one decision of where media live. With object storage, mixes are written in this
        // node's own work directory, then stored.
        let media = match &config.storage {
            Some(url) => {
                let objects = connect_objects(&config, &layout, url.clone()).await?;
                let work = MediaLayout::new(objects.cache().dir().join(WORK_DIR));
                work.remove_partials(Duration::ZERO).context("cleaning the work directory")?;
                Media::Object { objects, work }
            }
            None if config.media_redirect => {
                anyhow::bail!("--media-redirect needs object storage (--storage s3://bucket/prefix): the data dir has no URL to redirect to")
            }
            None => Media::Local(layout.clone()),
        };
        let store = Store::open(&location).await.context("opening the job database")?;
        let shutdown = CancellationToken::new();
        let jobs = Jobs::open(
            JobsConfig {
                mix_slots: config.mix_slots(),
                job_ttl: config.job_ttl,
                media: media.clone(),
                event_buffer: EVENT_BUFFER,
                lease: config.lease,
                max_queued_per_project: config.max_queued_per_project,
            },
            store,
            shutdown.clone(),
        )
        .await
        .context("opening the job store")?;
        // Before binding: raising the open-file limit is part of deciding the cap.
        let max_connections = config.max_connections.map_or_else(default_max_connections, |max| max as usize);
        let connection_limits = ConnectionLimits::new(max_connections);
        let listener = listen(config.addr, config.listen_backlog).with_context(|| format!("binding {}", config.addr))?;
        // Browser sessions opened with an admin key are signed with `--session-key`, or one made at
        // the first start and kept in the job store, so that every node verifies them.
        let session_key = match &config.session_key {
            Some(key) => key.expose().to_string(),
            None => jobs.server_secret("session_key", || WebhookSecret::generate().as_str().to_string()).await.context("reading the session key")?,
        };
        let keys = Keys::new(&config.api_keys, &config.token_keys.token_keys).with_sessions(session_key.as_bytes(), config.session_ttl);
        let webhook_secret = match &config.webhook_secret {
            Some(secret) => secret.clone(),
            None => {
                let stored = jobs.server_secret("webhook_secret", || WebhookSecret::generate().as_str().to_string()).await.context("reading the webhook secret")?;
                WebhookSecret::parse(&stored).map_err(|err| anyhow::anyhow!("the stored webhook secret: {err}"))?
            }
        };
        let dispatcher =
            DispatcherConfig { secret: webhook_secret.clone(), allow_private: config.webhook_allow_private, concurrency: WEBHOOK_CONCURRENCY, timeout: WEBHOOK_TIMEOUT };
        let outbox = Arc::new(Outbox::new(jobs.store().clone(), jobs.delivery_wake()));
        let dispatcher = Dispatcher::new(outbox.clone(), jobs.metrics().clone(), dispatcher).context("building the webhook client")?;
        tokio::spawn(dispatcher.run(shutdown.clone()));
        // A job never points at a deleted file: outputs are kept at least as long as jobs.
        let retention = config.output_retention.max(config.job_ttl);
        tokio::spawn(remove_old_outputs(media.clone(), retention, shutdown.clone()));
        let streams = StreamLimits::new(config.max_streams_per_client);
        let rate_limits = config.rate_limit.map(|limit| Arc::new(RateLimits::new(limit)));
        if let Some(limits) = &rate_limits {
            tokio::spawn(forget_idle_clients(limits.clone(), shutdown.clone()));
        }
        let state = AppState::new(App {
            jobs,
            stems: StemStore::new(media.clone()),
            media,
            outbox,
            keys,
            webhook_secret,
            streams,
            rate_limits,
            config: Arc::new(config),
            shutdown,
        });
        Ok(Self { listener, state, connection_limits })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Cancelling this token shuts the server down: streams end, then the server stops.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting, lets open requests
    /// finish (streams end at once on the same token) and returns within the grace period.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        let header_timeout = self.state.config.header_timeout;
        let grace = self.state.config.shutdown_grace;
        tracing::info!(
            address = %self.local_addr(),
            data_dir = %self.state.config.data_dir.display(),
            slots = self.state.config.mix_slots(),
            store = if self.state.jobs.is_clustered() { "postgres" } else { "sqlite" },
            node = %self.state.jobs.node_id(),
            access_control = self.state.keys.any(),
            listen_backlog = effective_backlog(self.state.config.listen_backlog),
            "mixd listening"
        );
        let jobs = self.state.jobs.clone();
        let app = router(self.state);
        let connection = ConnectionConfig { header_timeout };
        let connections = TaskTracker::new();
        loop {
            let admission = tokio::select! {
                admission = self.connection_limits.admit() => admission,
                _ = shutdown.cancelled() => break,
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(connection) => connection,
                Err(err) => {
                    // Out of file descriptors and the like: pass, and keep serving.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Live events are small writes in quick succession: with Nagle's algorithm on, the
            // second would wait for the client's delayed ACK (up to 40 ms on Linux).
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "could not disable Nagle's algorithm on a connection");
            }
            let (app, shutdown) = (app.clone(), shutdown.clone());
            let place = ConnectionPlace(Arc::new(admission));
            connections.spawn(async move { serve_connection(stream, peer.ip(), place, app, connection, shutdown).await });
        }
        connections.close();
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, connections.wait()).await.is_err() {
            tracing::warn!(open = connections.len(), "connections still open after the grace period; stopping anyway");
        }
        // The runs on this node are handed back to the queue, for another node (or the next start).
        if tokio::time::timeout_at(deadline, jobs.stopped()).await.is_err() {
            tracing::warn!("the job runner had not stopped by the end of the grace period");
        }
        Ok(())
    }
}

/// Every minute, forgets the rate-limited clients that could send a full burst again.
async fn forget_idle_clients(limits: Arc<RateLimits>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = every.tick() => limits.forget_idle(),
            _ = shutdown.cancelled() => return,
        }
    }
}
