//! Building and running the server: the data root, the job layer, the router and the listener.
//! Binding happens in `build`, so a caller asking for port 0 learns the real port before serving.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{router, AppState};
use crate::config::Config;
use crate::jobs::{Jobs, JobsConfig, StemStore};

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating the data root {}", config.data_dir.display()))?;
        let stems = StemStore::new(&config.data_dir);
        let removed = stems.remove_partials().context("cleaning partial files")?;
        if removed > 0 {
            tracing::info!(removed, "removed partial files left by an earlier run");
        }
        let shutdown = CancellationToken::new();
        let jobs = Jobs::open(
            JobsConfig { mix_slots: config.mix_slots(), job_ttl: config.job_ttl, media_root: config.data_dir.clone() },
            shutdown.clone(),
        )
        .context("opening the job database")?;
        let listener = TcpListener::bind(config.addr).await.with_context(|| format!("binding {}", config.addr))?;
        let state = AppState { jobs, stems, config: Arc::new(config), shutdown };
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Cancelling this token shuts the server down: streams end, then the server stops.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let shutdown = self.state.shutdown.clone();
        tracing::info!(address = %self.local_addr(), data_dir = %self.state.config.data_dir.display(), slots = self.state.config.mix_slots(), "mixd listening");
        axum::serve(self.listener, router(self.state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
    }
}
