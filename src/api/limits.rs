//! What one client may hold open, and the server overall.
//!
//! Event streams are counted per client: per credential (a token or a browser session; each
//! token on its own), or per address on an open server. Admin keys are the operator's and are
//! not counted. Past the cap a stream is refused 429 `TOO_MANY_STREAMS`: a read token handed to
//! a browser cannot hold the server's file descriptors.
//!
//! State changes (POST, DELETE) are rate-limited per client with `--rate-limit`, by the
//! `governor` crate's GCRA: past it 429 `RATE_LIMITED` with `Retry-After` and the IETF
//! `RateLimit-Policy` / `RateLimit` headers, which every allowed state change carries too.
//!
//! Connections are capped overall, as mini-redis caps them, with a semaphore taken before each
//! accept; past the cap a small reserve of connections is still accepted, each for one request,
//! and serves only `/healthz` and admins: the load balancer and the operator still get answers
//! while the cap holds. Past the reserve too, connections wait in the listen queue.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::config::RateLimit;

/// Who a request counts against: a credential (by a keyed hash of it: the map holds no secret),
/// or a client address on an open server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Credential(u64),
    Address(IpAddr),
}

impl ClientKey {
    /// A client by its address: an IPv6 host by its /64, which is one host's to pick addresses
    /// from (RFC 4291); an IPv4-mapped address as the IPv4 one.
    pub fn address(ip: IpAddr) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        };
        ClientKey::Address(ip)
    }
}

/// The request's client, as `authorize` found it: `None` for an admin, who is not counted.
#[derive(Debug, Clone, Copy)]
pub struct Client(pub Option<ClientKey>);

/// The address a connection came from, on each of its requests.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub IpAddr);

/// On each request of a connection accepted from the reserve: only `/healthz` and admins.
#[derive(Debug, Clone, Copy)]
pub struct Reserved;

/// Open event streams per client.
pub struct StreamLimits {
    per_client: usize,
    open: Mutex<HashMap<ClientKey, usize>>,
    /// Keyed at random per process: a credential's hash says nothing outside it.
    hasher: std::hash::RandomState,
}

impl StreamLimits {
    /// `per_client` streams at most per client; 0: no limit.
    pub fn new(per_client: usize) -> Arc<Self> {
        Arc::new(Self { per_client, open: Mutex::default(), hasher: std::hash::RandomState::new() })
    }

    pub fn credential(&self, credential: &str) -> ClientKey {
        ClientKey::Credential(self.hasher.hash_one(credential))
    }

    /// A stream for `client`, counted until the permit is dropped; refused past the cap.
    pub fn open(self: &Arc<Self>, client: Client) -> Result<StreamPermit, ApiError> {
        let Client(Some(key)) = client else { return Ok(StreamPermit(None)) };
        if self.per_client == 0 {
            return Ok(StreamPermit(None));
        }
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(key).or_default();
        if *count >= self.per_client {
            return Err(ApiError::TooManyStreams(self.per_client));
        }
        *count += 1;
        Ok(StreamPermit(Some((self.clone(), key))))
    }
}

/// One open stream of a client; dropping it closes the count.
pub struct StreamPermit(Option<(Arc<StreamLimits>, ClientKey)>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let Some((limits, key)) = self.0.take() else { return };
        let mut open = limits.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

/// State changes per client, by `--rate-limit`.
pub struct RateLimits {
    limiter: DefaultKeyedRateLimiter<ClientKey, StateInformationMiddleware>,
    clock: DefaultClock,
    limit: RateLimit,
    policy: HeaderValue,
}

/// The rate-limit headers of one request (draft-ietf-httpapi-ratelimit-headers): the policy, and
/// what is left of it and in how many seconds it is whole again.
#[derive(Debug, Clone)]
pub struct RateHeaders {
    policy: HeaderValue,
    state: HeaderValue,
    /// For a refused request: whole seconds until one more would pass.
    pub retry_after: Option<u64>,
}

impl RateHeaders {
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(HeaderName::from_static("ratelimit-policy"), self.policy.clone());
        headers.insert(HeaderName::from_static("ratelimit"), self.state.clone());
    }
}

impl RateLimits {
    pub fn new(limit: RateLimit) -> Self {
        let quota =
            Quota::with_period(limit.period / limit.requests.get()).expect("a period of at least a second over at most 2^32 requests").allow_burst(limit.requests);
        let policy = HeaderValue::from_str(&format!("\"default\";q={};w={}", limit.requests, limit.period.as_secs())).expect("ASCII");
        Self { limiter: DefaultKeyedRateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(), clock: DefaultClock::default(), limit, policy }
    }

    /// One state change by `client`: its headers, or 429 past the limit.
    pub fn check(&self, client: &ClientKey) -> Result<RateHeaders, ApiError> {
        let per_request = self.limit.period.as_secs_f64() / f64::from(self.limit.requests.get());
        match self.limiter.check_key(client) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let reset = (f64::from(self.limit.requests.get() - remaining) * per_request).ceil() as u64;
                Ok(self.headers(remaining, reset, None))
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now()).as_secs_f64().ceil().max(1.0) as u64;
                let reset = (f64::from(self.limit.requests.get()) * per_request).ceil() as u64;
                Err(ApiError::RateLimited(self.headers(0, reset, Some(wait))))
            }
        }
    }

    fn headers(&self, remaining: u32, reset: u64, retry_after: Option<u64>) -> RateHeaders {
        let state = HeaderValue::from_str(&format!("\"default\";r={remaining};t={reset}")).expect("ASCII");
        RateHeaders { policy: self.policy.clone(), state, retry_after }
    }

    /// Forgets the clients whose limits are whole again: the map would otherwise hold every
    /// client ever seen.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Connections the reserve holds beyond the cap, for `/healthz` and admins.
pub const RESERVED_CONNECTIONS: usize = 64;
/// File descriptors the default connection cap leaves for everything else: stems and mixes being
/// read and written, the database, object storage, the reserve.
const DESCRIPTORS_KEPT: u64 = 512;

/// The connection cap when none is configured: the open-file limit, raised to its hard limit
/// first, less what the server needs besides connections; at least 64.
pub fn default_max_connections() -> usize {
    let descriptors = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    descriptors.saturating_sub(DESCRIPTORS_KEPT).max(64) as usize
}

/// The connections being served, and the reserve.
pub struct ConnectionLimits {
    general: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
}

/// A connection's place, on each of its requests: the connection's task holds it, and so does a
/// WebSocket the connection was upgraded to, which outlives the task.
#[derive(Clone)]
pub struct ConnectionPlace(pub Arc<Admission>);

/// A connection's place: held for as long as it is open.
pub struct Admission {
    /// From the reserve: one request, `/healthz` or an admin's.
    pub reserved: bool,
    _permit: OwnedSemaphorePermit,
}

impl ConnectionLimits {
    pub fn new(max_connections: usize) -> Self {
        Self { general: Arc::new(Semaphore::new(max_connections)), reserve: Arc::new(Semaphore::new(RESERVED_CONNECTIONS)) }
    }

    /// A place for the next connection, waiting while the cap and the reserve are both taken.
    pub async fn admit(&self) -> Admission {
        if let Ok(permit) = self.general.clone().try_acquire_owned() {
            return Admission { reserved: false, _permit: permit };
        }
        if let Ok(permit) = self.reserve.clone().try_acquire_owned() {
            return Admission { reserved: true, _permit: permit };
        }
        // Neither semaphore is ever closed.
        tokio::select! {
            biased;
            Ok(permit) = self.general.clone().acquire_owned() => Admission { reserved: false, _permit: permit },
            Ok(permit) = self.reserve.clone().acquire_owned() => Admission { reserved: true, _permit: permit },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_its_cap_and_a_closed_stream_frees_its_place() {
        let limits = StreamLimits::new(2);
        let (token, other) = (Client(Some(limits.credential("token-a"))), Client(Some(limits.credential("token-b"))));
        let first = limits.open(token).unwrap();
        let _second = limits.open(token).unwrap();
        assert!(matches!(limits.open(token), Err(ApiError::TooManyStreams(2))));
        assert!(limits.open(other).is_ok(), "another credential has its own count");
        assert!(limits.open(Client(None)).is_ok(), "an admin is not counted");
        drop(first);
        assert!(limits.open(token).is_ok());
    }

    #[test]
    fn a_client_past_its_rate_gets_429_with_when_to_retry_and_every_answer_carries_the_policy() {
        let limits = RateLimits::new(RateLimit::parse("2/m").unwrap());
        let (client, other) = (ClientKey::Address([10, 0, 0, 1].into()), ClientKey::Address([10, 0, 0, 2].into()));
        let state = |headers: &RateHeaders| headers.state.to_str().unwrap().to_string();
        let first = limits.check(&client).unwrap();
        assert_eq!((first.policy.to_str().unwrap(), state(&first).as_str()), ("\"default\";q=2;w=60", "\"default\";r=1;t=30"));
        assert_eq!(state(&limits.check(&client).unwrap()), "\"default\";r=0;t=60");
        match limits.check(&client) {
            Err(ApiError::RateLimited(refused)) => {
                assert_eq!(state(&refused), "\"default\";r=0;t=60");
                // The next request is due 30 s after the first: a little less has passed.
                assert!((29..=30).contains(&refused.retry_after.unwrap()), "{:?}", refused.retry_after);
            }
            other => panic!("{other:?}"),
        }
        assert!(limits.check(&other).is_ok(), "each client has its own limit");
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_address_its_ipv4_one() {
        let key = |text: &str| ClientKey::address(text.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
    }

    #[tokio::test]
    async fn past_the_cap_a_connection_takes_the_reserve_and_past_that_it_waits() {
        let limits = ConnectionLimits::new(1);
        let general = limits.admit().await;
        assert!(!general.reserved);
        let reserve: Vec<Admission> = futures_util::future::join_all((0..RESERVED_CONNECTIONS).map(|_| limits.admit())).await;
        assert!(reserve.iter().all(|admission| admission.reserved));
        let mut waiting = std::pin::pin!(limits.admit());
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        drop(general);
        assert!(!waiting.await.reserved);
    }
}
