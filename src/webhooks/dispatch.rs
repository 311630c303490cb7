//! The dispatcher: one task that sends the outbox's due deliveries, a bounded number at a time,
//! and records what each attempt came to. It sleeps until the next delivery is due or a new one
//! is stored; it never polls. A slow or dead receiver holds one of its slots until the timeout,
//! never a mix, and never the other receivers beyond the slots it takes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::outbox::Outbox;
use super::{check_url, is_public, retry_delay, WebhookSecret};
use crate::jobs::{AttemptResult, Metrics, PendingDelivery, StoreError};

/// A receiver's answer is read this far and no further: only its status matters.
const MAX_RESPONSE_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub secret: WebhookSecret,
    /// Lets webhooks reach loopback and private addresses (tests, on-premises receivers).
    pub allow_private: bool,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// How long one attempt may take, connection to last byte read.
    pub timeout: Duration,
}

pub struct Dispatcher {
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    config: DispatcherConfig,
    clock: Clock,
}

/// The wall clock, advanced by tokio's: in production the two agree, and a test that pauses
/// tokio's clock controls both (so retry gaps are exact, not slept through).
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall: SystemTime,
    monotonic: Instant,
}

impl Clock {
    fn new() -> Self {
        Self { wall: SystemTime::now(), monotonic: Instant::now() }
    }

    fn now_ms(&self) -> i64 {
        crate::jobs::unix_millis(self.wall + self.monotonic.elapsed())
    }

    /// The instant at which the wall clock reads `ms`.
    fn instant_at(&self, ms: i64) -> Instant {
        let ahead = ms - self.now_ms();
        Instant::now() + Duration::from_millis(ahead.max(0) as u64)
    }
}

impl Dispatcher {
    pub fn new(outbox: Arc<Outbox>, metrics: Arc<Metrics>, config: DispatcherConfig) -> Result<Self, reqwest::Error> {
        let mut client = reqwest::Client::builder()
            // A redirect could point anywhere, this machine included: a 3xx is an answer, retried.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect for us, to an address we never checked.
            .no_proxy()
            .timeout(config.timeout)
            .user_agent(concat!("mixd/", env!("CARGO_PKG_VERSION"), " (webhooks)"));
        if !config.allow_private {
            // Every host name is checked on the addresses it resolves to, and only those are
            // connected to: a name that resolves to this machine (DNS rebinding) gets nowhere.
            client = client.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Self { outbox, metrics, client: client.build()?, config, clock: Clock::new() })
    }

    /// Sends due deliveries until `shutdown`. Each is claimed in the outbox while it is sent, so
    /// no other node (nor this one) sends it at the same time; one in flight when a node dies is
    /// sent again once its claim runs out. Delivery is at least once, and the `webhook-id` lets a
    /// receiver drop a repeat.
    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut in_flight: JoinSet<()> = JoinSet::new();
        loop {
            let free = this.config.concurrency.saturating_sub(in_flight.len());
            let read = async {
                let due = if free > 0 { this.outbox.due(this.clock.now_ms(), free).await? } else { Vec::new() };
                Ok::<_, StoreError>((due, this.outbox.next_due().await?))
            };
            let next_due = match read.await {
                Ok((due, next_due)) => {
                    for delivery in due {
                        let dispatcher = this.clone();
                        in_flight.spawn(async move {
                            let result = dispatcher.attempt(&delivery).await;
                            dispatcher.finish(&delivery, &result).await;
                        });
                    }
                    next_due.map(|ms| this.clock.instant_at(ms))
                }
                Err(err) => {
                    tracing::error!(%err, "could not read the webhook outbox");
                    Some(Instant::now() + Duration::from_secs(1))
                }
            };
            // With every slot taken, the next due delivery waits for one to finish instead.
            let full = in_flight.len() >= this.config.concurrency;
            let sleep = async move {
                match next_due {
                    Some(at) if !full => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = sleep => {}
                _ = this.outbox.woken() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Counts and records what an attempt came to.
    async fn finish(&self, delivery: &PendingDelivery, result: &AttemptResult) {
        let outcome = result.outcome.unwrap_or("retry");
        self.metrics.count_webhook(outcome);
        match (&result.http_status, &result.error) {
            (Some(status), _) => tracing::info!(webhook_id = %delivery.id, job_id = %delivery.job_id, status, outcome, "webhook attempt"),
            (None, error) => {
                tracing::info!(webhook_id = %delivery.id, job_id = %delivery.job_id, error = error.as_deref().unwrap_or_default(), outcome, "webhook attempt")
            }
        }
        if let Err(err) = self.outbox.record(delivery, result).await {
            // Not recorded: it is sent again once its claim runs out, which at-least-once allows.
            tracing::error!(webhook_id = %delivery.id, %err, "could not record a webhook attempt");
        }
    }

    /// One attempt: sign, send, and decide what follows.
    async fn attempt(&self, delivery: &PendingDelivery) -> AttemptResult {
        let attempted_at_ms = self.clock.now_ms();
        let (http_status, error, retry_after) = match self.send(delivery, attempted_at_ms / 1000).await {
            Ok((status, retry_after)) => (Some(status), None, retry_after),
            Err(error) => (None, Some(error), None),
        };
        let (next_attempt_at_ms, outcome) = match http_status {
            Some(200..=299) => (None, Some("delivered")),
            // The receiver says this endpoint is gone for good.
            Some(410) => (None, Some("gone")),
            _ => match retry_delay(delivery.attempts + 1, jitter_unit(), retry_after) {
                Some(delay) => (Some(attempted_at_ms + delay.as_millis() as i64), None),
                None => (None, Some("failed")),
            },
        };
        AttemptResult { attempted_at_ms, http_status, error, next_attempt_at_ms, outcome }
    }

    async fn send(&self, delivery: &PendingDelivery, timestamp: i64) -> Result<(u16, Option<Duration>), String> {
        // A literal address is never resolved, so the resolver cannot check it: check it here.
        check_url(&delivery.url, self.config.allow_private).map_err(|err| err.to_string())?;
        let response = self
            .client
            .post(&delivery.url)
            .header("content-type", "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", self.config.secret.sign(&delivery.id, timestamp, &delivery.body))
            .body(delivery.body.clone())
            .send()
            .await
            .map_err(|err| describe(&err, self.config.timeout))?;
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        // Read a little of the answer, so the connection can be reused, and no more.
        let mut body = response.bytes_stream();
        let mut read = 0;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read >= MAX_RESPONSE_BYTES {
                break;
            }
        }
        Ok((status, retry_after))
    }
}

/// Why an attempt got no answer, in words, without the URL (it may hold the receiver's secret).
fn describe(err: &reqwest::Error, timeout: Duration) -> String {
    if err.is_timeout() {
        return format!("no answer within {} s", timeout.as_secs());
    }
    let mut source: &dyn std::error::Error = err;
    while let Some(next) = source.source() {
        source = next;
    }
    if err.is_connect() {
        format!("could not connect: {source}")
    } else {
        format!("the request failed: {source}")
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

/// A uniform number in 0..1 for the jitter; not for secrets.
fn jitter_unit() -> f64 {
    let bits = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().expect("eight bytes"));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Resolves host names to their public addresses only.
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addresses.into_iter().filter(|address| is_public(address.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} resolves only to addresses webhooks may not reach").into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;

    use super::*;
    use crate::ids::JobId;
    use crate::jobs::{Attempt, Delivery, Store, StoreLocation};
    use crate::media::MediaLayout;

    /// What a receiver saw of each request: when (on tokio's clock), its webhook-id and whether
    /// its signature is the one the reference library computes.
    #[derive(Debug, Clone)]
    struct Received {
        at: Instant,
        webhook_id: String,
        verified: bool,
    }

    /// A real HTTP receiver on loopback answering each request with the next of `answers`
    /// (the last repeats); `None` never answers.
    async fn receiver(secret: &WebhookSecret, answers: Vec<Option<(StatusCode, HeaderMap)>>) -> (String, Arc<Mutex<Vec<Received>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let verifier = Arc::new(standardwebhooks::Webhook::new(secret.as_str()).unwrap());
        let (record, answers) = (seen.clone(), Arc::new(answers));
        let app = axum::Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (record, answers, verifier) = (record.clone(), answers.clone(), verifier.clone());
                // The reference library's signature for the same id, timestamp and body (its
                // `verify` would also compare the timestamp with the real clock, which this test
                // has paused and moved on).
                let header = |name: &str| headers[name].to_str().unwrap().to_string();
                let timestamp: i64 = header("webhook-timestamp").parse().unwrap();
                let verified = verifier.sign(&header("webhook-id"), timestamp, &body).is_ok_and(|expected| expected == header("webhook-signature"));
                async move {
                    let index = {
                        let mut seen = record.lock().unwrap();
                        let webhook_id = headers["webhook-id"].to_str().unwrap().to_string();
                        seen.push(Received { at: Instant::now(), webhook_id, verified });
                        seen.len() - 1
                    };
                    match answers[index.min(answers.len() - 1)].clone() {
                        Some((status, headers)) => (status, headers).into_response(),
                        None => std::future::pending::<axum::response::Response>().await,
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    struct Harness {
        _dir: tempfile::TempDir,
        store: Store,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    }

    async fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreLocation::Sqlite(MediaLayout::new(dir.path()).database_dir())).await.unwrap();
        let outbox = Arc::new(Outbox::new(store.clone(), Arc::default()));
        Harness { _dir: dir, store, outbox, metrics: Arc::default(), shutdown: CancellationToken::new() }
    }

    impl Harness {
        fn start(&self, secret: &WebhookSecret, allow_private: bool) {
            let config = DispatcherConfig { secret: secret.clone(), allow_private, concurrency: 4, timeout: Duration::from_secs(15) };
            let dispatcher = Dispatcher::new(self.outbox.clone(), self.metrics.clone(), config).unwrap();
            tokio::spawn(dispatcher.run(self.shutdown.clone()));
        }

        async fn deliver(&self, url: &str) -> (String, JobId) {
            let job_id = JobId::new();
            let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
            let body = r#"{"type":"mix.completed","data":{}}"#.to_string();
            self.store.add_delivery(Delivery { id: id.clone(), job_id, url: url.into(), message_type: "mix.completed", body }).await;
            self.outbox.wake();
            (id, job_id)
        }

        async fn attempts(&self, job_id: JobId) -> Vec<Attempt> {
            self.outbox.attempts(job_id).await.unwrap()
        }

        /// Waits until the job's attempts satisfy `done`.
        async fn until(&self, job_id: JobId, done: impl Fn(&[Attempt]) -> bool) {
            // Time is paused: each sleep lets everything due run first, at no real cost.
            for _ in 0..100_000 {
                if done(&self.attempts(job_id).await) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("never happened");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failed_attempts_are_retried_on_schedule_with_the_same_id_until_one_succeeds() {
        let secret = WebhookSecret::generate();
        let error = Some((StatusCode::INTERNAL_SERVER_ERROR, HeaderMap::new()));
        let (url, seen) = receiver(&secret, vec![error.clone(), error, Some((StatusCode::OK, HeaderMap::new()))]).await;
        let harness = harness().await;
        harness.start(&secret, true);
        let (id, job_id) = harness.deliver(&url).await;
        harness.until(job_id, |a| a.len() == 3).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|r| r.verified && r.webhook_id == id), "{seen:?}");
        // The gaps are the schedule's, within its jitter: 5 s, then 5 min.
        for (gap, expected) in [(seen[1].at - seen[0].at, Duration::from_secs(5)), (seen[2].at - seen[1].at, Duration::from_secs(300))] {
            assert!(gap >= expected.mul_f64(0.9) && gap <= expected.mul_f64(1.1) + Duration::from_millis(200), "{gap:?} for {expected:?}");
        }
        let attempts = harness.attempts(job_id).await;
        assert_eq!(attempts.iter().map(|a| a.http_status).collect::<Vec<_>>(), [Some(500), Some(500), Some(200)]);
        assert!(attempts[2].next_attempt_at.is_none() && attempts[0].next_attempt_at.is_some());
        // Nothing more is sent, however long we wait.
        tokio::time::sleep(Duration::from_secs(48 * 3600)).await;
        assert_eq!(harness.attempts(job_id).await.len(), 3);
        assert_eq!((harness.metrics.webhooks("delivered"), harness.metrics.webhooks("retry")), (1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn gone_stops_retrying_and_retry_after_is_honoured() {
        let secret = WebhookSecret::generate();
        let mut later = HeaderMap::new();
        later.insert("retry-after", "120".parse().unwrap());
        let (url, seen) = receiver(&secret, vec![Some((StatusCode::SERVICE_UNAVAILABLE, later)), Some((StatusCode::GONE, HeaderMap::new()))]).await;
        let harness = harness().await;
        harness.start(&secret, true);
        let (_, job_id) = harness.deliver(&url).await;
        harness.until(job_id, |a| a.len() == 2).await;
        let seen = seen.lock().unwrap().clone();
        assert!(seen[1].at - seen[0].at >= Duration::from_secs(120), "waited for Retry-After, not the 5 s schedule");
        tokio::time::sleep(Duration::from_secs(48 * 3600)).await;
        assert_eq!(harness.attempts(job_id).await.len(), 2, "410 ends the delivery");
        assert_eq!(harness.metrics.webhooks("gone"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_that_never_answers_times_out_without_holding_up_another() {
        let secret = WebhookSecret::generate();
        let (silent, _) = receiver(&secret, vec![None]).await;
        let (prompt, prompt_seen) = receiver(&secret, vec![Some((StatusCode::NO_CONTENT, HeaderMap::new()))]).await;
        let harness = harness().await;
        harness.start(&secret, true);
        let (_, silent_job) = harness.deliver(&silent).await;
        let (_, prompt_job) = harness.deliver(&prompt).await;
        harness.until(prompt_job, |a| a.len() == 1).await;
        assert_eq!(prompt_seen.lock().unwrap().len(), 1);
        harness.until(silent_job, |a| !a.is_empty()).await;
        let attempt = &harness.attempts(silent_job).await[0];
        assert_eq!((attempt.http_status, attempt.error.as_deref()), (None, Some("no answer within 15 s")));
        assert!(attempt.next_attempt_at.is_some(), "a timeout is retried");
    }

    #[tokio::test(start_paused = true)]
    async fn private_addresses_are_refused_whether_literal_resolved_or_redirected_to() {
        let secret = WebhookSecret::generate();
        let (inner, inner_seen) = receiver(&secret, vec![Some((StatusCode::OK, HeaderMap::new()))]).await;
        let mut redirect = HeaderMap::new();
        redirect.insert("location", inner.parse().unwrap());
        let (redirecting, _) = receiver(&secret, vec![Some((StatusCode::FOUND, redirect))]).await;
        // Refusing private addresses, the literal and the name are refused without a connection.
        let strict = harness().await;
        strict.start(&secret, false);
        let port = inner.rsplit(':').next().unwrap();
        let (_, by_name) = strict.deliver(&format!("http://localhost:{port}")).await;
        let (_, literal) = strict.deliver(&inner).await;
        strict.until(by_name, |a| a.len() == 1).await;
        strict.until(literal, |a| a.len() == 1).await;
        let error = |attempts: Vec<Attempt>| attempts[0].error.clone().unwrap();
        let (by_name_error, literal_error) = (error(strict.attempts(by_name).await), error(strict.attempts(literal).await));
        assert!(by_name_error.contains("resolves only to addresses webhooks may not reach"), "{by_name_error}");
        assert!(literal_error.contains("is not a public address"), "{literal_error}");
        assert_eq!(inner_seen.lock().unwrap().len(), 0, "nothing reached the private receiver");
        // Allowed to reach the receivers, a redirect is an answer, not followed.
        let lenient = harness().await;
        lenient.start(&secret, true);
        let (_, redirected) = lenient.deliver(&redirecting).await;
        lenient.until(redirected, |a| !a.is_empty()).await;
        assert_eq!(lenient.attempts(redirected).await[0].http_status, Some(302));
        assert_eq!(inner_seen.lock().unwrap().len(), 0, "the redirect was not followed");
    }
}
