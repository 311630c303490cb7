//! What every handler shares: the job layer, the media, the keys and the configuration.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::limits::{RateLimits, StreamLimits};
use crate::access::Keys;
use crate::config::Config;
use crate::jobs::Jobs;
use crate::media::{Media, StemStore};
use crate::webhooks::{Outbox, WebhookSecret};

/// What every handler shares. Each extractor of a request takes its own handle, so a handle is
/// one reference count (cloning the parts, a cancellation token among them, cost 7% of the status
/// route's time).
#[derive(Clone)]
pub struct AppState(Arc<App>);

pub struct App {
    pub jobs: Jobs,
    pub stems: StemStore,
    /// Where stems and mixes are kept: the data root or object storage.
    pub media: Media,
    /// The webhook outbox, for the attempts route and `/metrics`.
    pub outbox: Arc<Outbox>,
    pub keys: Keys,
    pub webhook_secret: WebhookSecret,
    /// Event streams open per client.
    pub streams: Arc<StreamLimits>,
    /// State changes per client, with `--rate-limit`.
    pub rate_limits: Option<Arc<RateLimits>>,
    pub config: Arc<Config>,
    /// Cancelled when the server shuts down: every open stream ends.
    pub shutdown: CancellationToken,
}

impl AppState {
    pub fn new(app: App) -> Self {
        Self(Arc::new(app))
    }
}

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}
