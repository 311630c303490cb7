//! Webhooks as the Standard Webhooks specification describes them: each message signed
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<HMAC-SHA256 of id.timestamp.body>`)
//! with a `whsec_` secret, delivered at least once from the job store's outbox on a fixed retry
//! schedule with jitter, and never to this machine or a private network (checked on the address
//! actually connected to).
//!
//! - this module: the secret and signing, the URL rules, the retry schedule;
//! - [`outbox`]: the handle on the job store's deliveries;
//! - [`dispatch`]: the task that sends what the outbox holds.

mod dispatch;
mod outbox;
mod special;

use std::net::IpAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use dispatch::{Dispatcher, DispatcherConfig};
pub use outbox::Outbox;

const SECRET_PREFIX: &str = "whsec_";

/// A signing secret: `whsec_` then the key, base64.
#[derive(Clone)]
pub struct WebhookSecret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    pub fn parse(text: &str) -> Result<Self, String> {
        let encoded = text.trim().strip_prefix(SECRET_PREFIX).ok_or("a webhook secret starts with whsec_")?;
        let key = STANDARD.decode(encoded).map_err(|_| "a webhook secret is whsec_ followed by base64".to_string())?;
        if key.len() < 24 {
            return Err("a webhook secret's key must be at least 24 bytes".into());
        }
        Ok(Self { text: text.trim().to_string(), key })
    }

    /// A new random secret: 32 bytes from two v4 UUIDs, 244 of whose bits come from the OS
    /// generator (the other 12 are the UUID version and variant).
    pub fn generate() -> Self {
        let key: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()].iter().flat_map(|u| *u.as_bytes()).collect();
        Self { text: format!("{SECRET_PREFIX}{}", STANDARD.encode(&key)), key }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body.as_bytes());
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Malformed(String),
    #[error("only http and https URLs are delivered to")]
    Scheme,
    #[error("{0} is not a public address: webhooks do not reach this machine or a private network")]
    NotPublic(IpAddr),
}

/// Checks a webhook URL as given: http(s), with a host, and not a literal address this server
/// must not reach. A host name is checked when it is resolved, on the address connected to.
pub fn check_url(text: &str, allow_private: bool) -> Result<url::Url, UrlError> {
    // WHATWG parsing, as browsers do: `http://0x7f000001` is 127.0.0.1 here too.
    let url = url::Url::parse(text).map_err(|err| UrlError::Malformed(err.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme);
    }
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(UrlError::Malformed("no host".into())),
    };
    match literal {
        Some(ip) if !allow_private && !is_public(ip) => Err(UrlError::NotPublic(ip)),
        _ => Ok(url),
    }
}

/// A webhook URL as a reader who may not change the job is shown it: its origin and path only. A
/// receiver's secret often rides in the query (`?token=...`) or the userinfo.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(url) => format!("{}{}", url.origin().ascii_serialization(), url.path()),
        Err(_) => String::new(),
    }
}

/// Whether a webhook may connect to `ip`: not in any block of the special-purpose registries
/// ([`special::special_purpose`]: loopback, private, link-local, CGNAT, unique-local, the blocks
/// that embed or lead to an IPv4 address, documentation, benchmarking, discard, multicast, ...).
pub fn is_public(ip: IpAddr) -> bool {
    special::special_purpose(ip).is_none()
}

/// The waits before each retry: about 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; a delivery not
/// accepted by then has failed.
pub const RETRY_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];
/// Each wait varies by up to this fraction either way, so receivers that failed together are
/// not all retried in the same instant.
pub const JITTER: f64 = 0.1;
/// A `Retry-After` longer than this is not waited for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The wait before the retry that follows failed attempt number `attempt` (1-based), or None when
/// the schedule is spent. `unit` (0..1) picks the jitter; `retry_after`, when the receiver gave one,
/// is honoured if it asks for longer.
pub fn retry_delay(attempt: u32, unit: f64, retry_after: Option<Duration>) -> Option<Duration> {
    let base = *RETRY_SCHEDULE.get(attempt.checked_sub(1)? as usize)?;
    let jittered = base.mul_f64(1.0 + JITTER * (2.0 * unit.clamp(0.0, 1.0) - 1.0));
    Some(jittered.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_specification_s_test_vector_and_an_independent_implementation() {
        // From the Standard Webhooks specification's reference test suites.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, r#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");

        let generated = WebhookSecret::generate();
        assert_eq!(WebhookSecret::parse(generated.as_str()).unwrap().key, generated.key);
        let body = r#"{"type":"mix.completed"}"#;
        let timestamp = chrono::Utc::now().timestamp();
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        headers.insert("webhook-timestamp", timestamp.to_string().parse().unwrap());
        headers.insert("webhook-signature", generated.sign("msg_1", timestamp, body).parse().unwrap());
        standardwebhooks::Webhook::new(generated.as_str()).unwrap().verify(body.as_bytes(), &headers).expect("the reference library verifies it");
        headers.insert("webhook-id", "msg_2".parse().unwrap());
        assert!(standardwebhooks::Webhook::new(generated.as_str()).unwrap().verify(body.as_bytes(), &headers).is_err());
        assert!(WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err(), "no prefix");
        assert!(!format!("{generated:?}").contains(generated.as_str()));
    }

    #[test]
    fn urls_that_reach_this_machine_or_a_private_network_are_refused() {
        for refused in [
            "http://127.0.0.1/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:8.8.8.8]/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://0.0.0.0/",
            // IPv6 forms that embed IPv4 or lead elsewhere: 6to4 of 127.0.0.1, Teredo, NAT64, discard.
            "http://[2002:7f00:1::]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "http://[64:ff9b::a00:1]/",
            "http://[64:ff9b:1::1]/",
            "http://[100::1]/",
            "http://[3fff::1]/",
            "http://[ff02::1]/",
            "http://198.18.0.1/",
            "http://224.0.0.1/",
        ] {
            assert!(matches!(check_url(refused, false), Err(UrlError::NotPublic(_))), "{refused}");
            check_url(refused, true).expect("allowed with --webhook-allow-private");
        }
        assert_eq!(check_url("ftp://example.com/", false), Err(UrlError::Scheme));
        assert_eq!(check_url("file:///etc/passwd", true), Err(UrlError::Scheme));
        assert!(matches!(check_url("not a url", false), Err(UrlError::Malformed(_))));
        for allowed in ["https://hooks.example.com/mixd", "http://8.8.8.8/", "https://[2606:4700::1111]/"] {
            check_url(allowed, false).unwrap_or_else(|err| panic!("{allowed}: {err}"));
        }
    }

    #[test]
    fn a_redacted_url_keeps_the_origin_and_path_and_drops_secrets() {
        assert_eq!(redacted("https://user:pw@hooks.example.com:8443/mixd/hook?token=s3cret#frag"), "https://hooks.example.com:8443/mixd/hook");
        assert_eq!(redacted("http://8.8.8.8/?key=1"), "http://8.8.8.8/");
        assert_eq!(redacted("not a url"), "");
    }

    #[test]
    fn retries_follow_the_schedule_with_bounded_jitter_and_honour_retry_after() {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(retry_delay(1, 0.5, None), Some(Duration::from_secs(5)));
        assert_eq!(retry_delay(2, 0.5, None), Some(minutes(5)));
        assert_eq!(retry_delay(7, 0.5, None), Some(minutes(600)));
        assert_eq!(retry_delay(8, 0.5, None), None, "eight attempts in all");
        assert_eq!(retry_delay(1, 0.0, None), Some(Duration::from_millis(4500)));
        assert_eq!(retry_delay(1, 1.0, None), Some(Duration::from_millis(5500)));
        assert_eq!(retry_delay(1, 0.5, Some(minutes(2))), Some(minutes(2)), "a longer Retry-After wins");
        assert_eq!(retry_delay(2, 0.5, Some(Duration::from_secs(1))), Some(minutes(5)), "a shorter one does not hurry the schedule");
        assert_eq!(retry_delay(1, 0.5, Some(minutes(60 * 48))), Some(minutes(60 * 24)), "capped");
    }
}
