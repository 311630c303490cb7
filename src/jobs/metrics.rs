//! Counters the jobs layer and the streams keep for `/metrics`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the mix duration histogram.
pub const MIX_DURATION_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    WebSocket,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "ws",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    sse_subscribers: AtomicI64,
    ws_subscribers: AtomicI64,
    mix_durations: Mutex<Histogram>,
    resyncs: AtomicU64,
    webhook_outcomes: [AtomicU64; WEBHOOK_OUTCOMES.len()],
    lease_events: [AtomicU64; LEASE_EVENTS.len()],
    refusals: [AtomicU64; REFUSALS.len()],
}

/// What a webhook attempt can come to: `retry` when another attempt follows.
pub const WEBHOOK_OUTCOMES: [&str; 4] = ["delivered", "retry", "gone", "failed"];

/// What this node did with leases: took a queued job, gave one back at shutdown, found one of its
/// own gone (canceled, or expired and rescued elsewhere), or rescued another node's expired one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    Claimed,
    HandedBack,
    Lost,
    Rescued,
}

pub const LEASE_EVENTS: [LeaseEvent; 4] = [LeaseEvent::Claimed, LeaseEvent::HandedBack, LeaseEvent::Lost, LeaseEvent::Rescued];

impl LeaseEvent {
    pub fn label(self) -> &'static str {
        match self {
            LeaseEvent::Claimed => "claimed",
            LeaseEvent::HandedBack => "handed_back",
            LeaseEvent::Lost => "lost",
            LeaseEvent::Rescued => "rescued",
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Histogram {
    pub buckets: [u64; MIX_DURATION_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Metrics {
    fn gauge(&self, transport: Transport) -> &AtomicI64 {
        match transport {
            Transport::Sse => &self.sse_subscribers,
            Transport::WebSocket => &self.ws_subscribers,
        }
    }

    /// Counts a subscriber for as long as the guard lives.
    pub fn subscriber(self: &Arc<Self>, transport: Transport) -> SubscriberGuard {
        self.gauge(transport).fetch_add(1, Ordering::Relaxed);
        SubscriberGuard { metrics: self.clone(), transport }
    }

    pub fn subscribers(&self, transport: Transport) -> i64 {
        self.gauge(transport).load(Ordering::Relaxed)
    }

    pub fn observe_mix(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let mut histogram = self.mix_durations.lock().expect("never poisoned");
        for (bucket, bound) in histogram.buckets.iter_mut().zip(MIX_DURATION_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }

    pub fn mix_durations(&self) -> Histogram {
        self.mix_durations.lock().expect("never poisoned").clone()
    }

    pub fn count_resync(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    pub fn count_lease(&self, event: LeaseEvent, count: u64) {
        self.lease_events[event as usize].fetch_add(count, Ordering::Relaxed);
    }

    pub fn leases(&self, event: LeaseEvent) -> u64 {
        self.lease_events[event as usize].load(Ordering::Relaxed)
    }

    pub fn count_webhook(&self, outcome: &str) {
        if let Some(index) = WEBHOOK_OUTCOMES.iter().position(|o| *o == outcome) {
            self.webhook_outcomes[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Webhook attempts that came to `outcome`.
    pub fn webhooks(&self, outcome: &str) -> u64 {
        WEBHOOK_OUTCOMES.iter().position(|o| *o == outcome).map_or(0, |index| self.webhook_outcomes[index].load(Ordering::Relaxed))
    }
}

impl Metrics {
    /// A request refused by a limit, by its error code (one of [`REFUSALS`]; others are not counted).
    pub fn count_refusal(&self, code: &str) {
        if let Some(index) = REFUSALS.iter().position(|c| *c == code) {
            self.refusals[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refusals(&self, code: &str) -> u64 {
        REFUSALS.iter().position(|c| *c == code).map_or(0, |index| self.refusals[index].load(Ordering::Relaxed))
    }
}

/// The error codes of the limits on what one client or project may do, counted in `/metrics`.
pub const REFUSALS: [&str; 5] = ["TOO_MANY_JOBS", "RATE_LIMITED", "QUOTA_EXCEEDED", "TOO_MANY_STREAMS", "SERVER_BUSY"];

pub struct SubscriberGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.metrics.gauge(self.transport).fetch_sub(1, Ordering::Relaxed);
    }
}
