//! The server's configuration: one struct, parsed by clap with environment fallbacks, then
//! passed down. The one other thing read from the environment is `RUST_LOG`, by the log filter
//! in `telemetry`, as every tracing-based server does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, FromArgMatches, ValueEnum};

use crate::access::{parse_api_key, parse_token_key, Secret, TokenKey};
use crate::media::StorageUrl;
use crate::webhooks::WebhookSecret;

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one (the bound address is logged).
    #[arg(long, env = "MIXD_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Connections the kernel holds for this server before it accepts them. When a server
    /// restarts, every browser's EventSource reconnects within the same second or two; a short
    /// queue drops most of their SYNs, which the clients then retry only after 1, 3 and 7 s.
    /// The kernel caps it at `net.core.somaxconn`.
    #[arg(long, env = "MIXD_LISTEN_BACKLOG", default_value_t = 16_384)]
    pub listen_backlog: u32,
    /// Connections served at once; default: the open-file limit (raised to its hard limit) less
    /// 512 kept for files and the database. Past it 64 more are accepted, each for one request,
    /// serving only /healthz and admin keys (others get 503 SERVER_BUSY); past those, new
    /// connections wait in the listen queue.
    #[arg(long, env = "MIXD_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Event streams (SSE and WebSocket) one credential may hold open at once, or one client
    /// address on an open server; past it 429 TOO_MANY_STREAMS. Admin keys are not counted.
    /// 0: no limit.
    #[arg(long, env = "MIXD_MAX_STREAMS_PER_CLIENT", default_value_t = 100)]
    pub max_streams_per_client: usize,
    /// Data root: stems, mix outputs. Served under /media.
    #[arg(long, env = "MIXD_DATA_DIR", default_value = "media")]
    pub data_dir: PathBuf,
    /// Where stems and mixes are kept: the data dir (the default) or S3-compatible object storage,
    /// `s3://bucket/prefix`, reached with the standard AWS variables (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`). The data dir
    /// then holds only the embedded job database and the stem cache.
    #[arg(long, env = "MIXD_STORAGE", value_parser = StorageUrl::parse)]
    pub storage: Option<StorageUrl>,
    /// With object storage: where this node keeps the stems its mixes read (default: `.mixd-cache`
    /// in the data dir).
    #[arg(long, env = "MIXD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// With object storage: the most the stem cache holds, in GB (10^9 bytes), least recently used
    /// first out; a stem a running mix reads stays whatever its size.
    #[arg(long, env = "MIXD_CACHE_MAX_GB", default_value_t = 10.0, value_parser = parse_cache_size)]
    pub cache_max_gb: f64,
    /// With object storage: answer `/media` with a 302 to a presigned URL, valid for 5 minutes,
    /// so that the bucket serves the bytes (after the same access check as any `/media` request).
    #[arg(long, env = "MIXD_MEDIA_REDIRECT")]
    pub media_redirect: bool,
    /// Mixes that run at once on this node; default: the number of CPUs. 0: this node takes no
    /// mixes (it serves, and others mix).
    #[arg(long, env = "MIXD_MIX_SLOTS")]
    pub mix_slots: Option<usize>,
    /// PostgreSQL shared by every node of a cluster (`postgres://user@host/db`); default: the
    /// embedded SQLite store in the data dir, for one node.
    #[arg(long, env = "MIXD_DATABASE_URL", value_parser = DatabaseUrl::parse)]
    pub database_url: Option<DatabaseUrl>,
    /// How long a node may go without renewing its hold on a running job before another node
    /// runs it again (it renews every third of this).
    #[arg(long, env = "MIXD_LEASE", default_value = "15s", value_parser = parse_lease)]
    pub lease: Duration,
    /// The most mix jobs one project may have waiting in the queue, across the cluster; a start
    /// past it gets 429 TOO_MANY_JOBS.
    #[arg(long, env = "MIXD_MAX_QUEUED_PER_PROJECT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_per_project: u32,
    /// The most a project's stems may take, in GB (10^9 bytes), across the cluster; an upload that
    /// would pass it gets 413 QUOTA_EXCEEDED and nothing of it is kept. Default: no quota.
    #[arg(long, env = "MIXD_PROJECT_QUOTA_GB", value_parser = parse_quota)]
    pub project_quota_gb: Option<f64>,
    /// The longest mix a start may ask for, in minutes (its latest-ending stem, after offsets);
    /// past it 422 INVALID_SETTINGS.
    #[arg(long, env = "MIXD_MAX_MIX_MINUTES", default_value_t = 180, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_mix_minutes: u32,
    /// POST and DELETE requests one credential may send (one client address on an open server),
    /// `N/s` or `N/m`, with bursts of N; past it 429 RATE_LIMITED. Reads and streams are never
    /// limited, nor are admin keys. Per node.
    #[arg(long, env = "MIXD_RATE_LIMIT", value_parser = RateLimit::parse)]
    pub rate_limit: Option<RateLimit>,
    /// How long a finished job stays queryable (e.g. 90s, 15m, 24h, 7d).
    #[arg(long, env = "MIXD_JOB_TTL", default_value = "24h", value_parser = parse_duration)]
    pub job_ttl: Duration,
    /// How long a mix's output file is kept (never less than the job TTL).
    #[arg(long, env = "MIXD_OUTPUT_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub output_retention: Duration,
    /// Largest upload request, in MiB.
    #[arg(long, env = "MIXD_MAX_UPLOAD_MB", default_value_t = 512)]
    pub max_upload_mb: u64,
    /// Most files in one upload request.
    #[arg(long, env = "MIXD_MAX_FILES", default_value_t = 64)]
    pub max_files: usize,
    /// The dashboard's files.
    #[arg(long, env = "MIXD_STATIC_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/static"))]
    pub static_dir: PathBuf,
    #[arg(long, env = "MIXD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// A client must send its request headers within this long.
    #[arg(long, env = "MIXD_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// On shutdown, how long open requests may take to finish.
    #[arg(long, env = "MIXD_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Admin keys, each at least 32 characters (comma-separated in the environment): sent as
    /// `Authorization: Bearer <key>`, full rights. With no key configured the server only
    /// listens on loopback.
    #[arg(long = "api-key", env = "MIXD_API_KEYS", value_delimiter = ',', value_parser = parse_api_key)]
    pub api_keys: Vec<Secret>,
    /// A file of admin keys, one per line (blank lines and `#` comments skipped): unlike
    /// `--api-key`, keys read from a file do not show in `ps`.
    #[arg(long, env = "MIXD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub token_keys: TokenKeys,
    /// The key browser sessions opened with an admin key are signed with (at least 32
    /// characters); default: one generated at the first start and kept in the job store. Setting
    /// a new one signs every such session out.
    #[arg(long, env = "MIXD_SESSION_KEY", value_parser = parse_session_key)]
    pub session_key: Option<Secret>,
    /// How long a browser session opened with an admin key lasts (e.g. 30m, 12h).
    #[arg(long, env = "MIXD_SESSION_TTL", default_value = "12h", value_parser = parse_session_ttl)]
    pub session_ttl: Duration,
    /// Serve without access control on a non-loopback address (only where nobody else can reach it).
    #[arg(long, env = "MIXD_NO_AUTH")]
    pub no_auth: bool,
    /// Host names or addresses an open server (no keys) answers to besides loopback ones and the
    /// address it listens on, e.g. its LAN name or address with --no-auth on 0.0.0.0
    /// (comma-separated in the environment). Any other Host gets 403: a DNS-rebinding page
    /// addresses the server under a name of its own.
    #[arg(long = "allowed-host", env = "MIXD_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call from a browser (CORS, with credentials) and to open WebSockets,
    /// e.g. https://app.example.com (comma-separated in the environment).
    #[arg(long = "allowed-origin", env = "MIXD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// The secret webhooks are signed with (`whsec_` + base64); default: one generated at the
    /// first start and kept in the job store (`GET /webhooks/secret` shows it to an admin).
    #[arg(long, env = "MIXD_WEBHOOK_SECRET", value_parser = WebhookSecret::parse)]
    pub webhook_secret: Option<WebhookSecret>,
    /// Let webhooks reach loopback and private addresses (on-premises receivers, tests).
    #[arg(long, env = "MIXD_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
}

/// The keys scoped tokens are signed with: `kid=secret`, the first signs, all verify (so a new
/// key is rolled in by listing it first, and an old one out by removing it).
#[derive(Debug, Clone, Args)]
pub struct TokenKeys {
    #[arg(long = "token-key", env = "MIXD_TOKEN_KEYS", value_delimiter = ',', value_parser = parse_token_key)]
    pub token_keys: Vec<TokenKey>,
}

/// A PostgreSQL URL. It may hold a password, so it never appears in a log or a debug print.
#[derive(Clone)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(Self(text.to_string()))
        } else {
            Err("expected a postgres:// or postgresql:// URL".into())
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

fn parse_cache_size(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb >= 0.0 => Ok(gb),
        _ => Err("expected a size in GB, e.g. 10 or 0.5".into()),
    }
}

fn parse_session_key(text: &str) -> Result<Secret, String> {
    parse_api_key(text).map_err(|_| format!("a session key must be at least {} characters", crate::access::MIN_SECRET_LEN))
}

fn parse_session_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(30 * 86_400)).contains(&ttl) {
        return Err("a session lasts 1s to 30d".into());
    }
    Ok(ttl)
}

fn parse_quota(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 => Ok(gb),
        _ => Err(format!("{text:?} is not a size in GB above 0 (e.g. 2 or 0.5)")),
    }
}

fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease < Duration::from_secs(1) {
        return Err("a lease shorter than 1s would expire between renewals under load".into());
    }
    Ok(lease)
}

/// `--rate-limit`: `requests` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: std::num::NonZeroU32,
    pub period: Duration,
}

impl RateLimit {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (count, unit) = text.trim().split_once('/').ok_or_else(|| format!("{text:?} is not a rate like 10/s or 100/m"))?;
        let requests = count.trim().parse().map_err(|_| format!("{count:?} in {text:?} is not a whole number of requests above 0"))?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            other => return Err(format!("unknown period {other:?} in {text:?}: use s or m")),
        };
        Ok(Self { requests, period })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// The defaults, as `mixd serve` with no flags and no environment would have them: read
    /// from the flags' own declarations, with their environment fallbacks switched off.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let command = Self::augment_args(clap::Command::new("mixd")).mut_args(|arg| arg.env(None::<&str>));
        let matches = command.try_get_matches_from(["mixd"]).expect("every flag has a default");
        let mut config = Self::from_arg_matches(&matches).expect("every flag has a default");
        config.data_dir = data_dir.into();
        config
    }

    pub fn mix_slots(&self) -> usize {
        self.mix_slots.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// `--project-quota-gb` in bytes; no quota is the most a count can hold.
    pub fn project_quota_bytes(&self) -> u64 {
        self.project_quota_gb.map_or(u64::MAX, |gb| (gb * 1e9) as u64)
    }

    pub fn max_upload_bytes(&self) -> u64 {
        self.max_upload_mb * 1024 * 1024
    }

    /// Whether the server listens on a loopback address, however it is spelled (`::ffff:127.0.0.1`
    /// is 127.0.0.1).
    pub fn on_loopback(&self) -> bool {
        self.addr.ip().to_canonical().is_loopback()
    }

    /// Access control is on when any key is configured.
    pub fn has_keys(&self) -> bool {
        !self.api_keys.is_empty() || !self.token_keys.token_keys.is_empty()
    }

    /// Checks every flag whose value clap cannot judge alone, before anything is bound or opened:
    /// a mistake is a start-up error naming the flag, never a panic after the server said it
    /// listens.
    pub fn check(&mut self) -> Result<(), String> {
        if let Some(file) = &self.api_key_file {
            let text = std::fs::read_to_string(file).map_err(|err| format!("--api-key-file {}: {err}", file.display()))?;
            for (number, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#')) {
                let key = parse_api_key(line).map_err(|err| format!("--api-key-file {} line {}: {err}", file.display(), number + 1))?;
                self.api_keys.push(key);
            }
        }
        self.check_exposure()?;
        for host in &self.allowed_hosts {
            let name = host.trim_matches(['[', ']']);
            let is_host = name.parse::<std::net::IpAddr>().is_ok() || (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
            if !is_host {
                return Err(format!("--allowed-host {host:?}: a host name or address, with no port, scheme or wildcard"));
            }
        }
        for origin in &self.allowed_origins {
            check_origin(origin).map_err(|reason| format!("--allowed-origin {origin:?}: {reason}"))?;
        }
        Ok(())
    }

    /// Refuses to serve open beyond this machine unless told to: an open server on a network
    /// lets anyone upload, mix, read and delete every project.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.has_keys() || self.no_auth || self.on_loopback() {
            return Ok(());
        }
        Err(format!(
            "refusing to listen on {} without access control: set --api-key (MIXD_API_KEYS) and/or --token-key (MIXD_TOKEN_KEYS), \
             or pass --no-auth if nobody else can reach this address",
            self.addr
        ))
    }
}

/// A browser origin as `--allowed-origin` takes it: `http(s)://host[:port]`, nothing more. CORS
/// with credentials cannot allow `*`, and a path or a wildcard matches no origin a browser sends.
fn check_origin(origin: &str) -> Result<(), String> {
    let origin = origin.trim_end_matches('/');
    let url = url::Url::parse(origin).map_err(|_| "not an origin: write it as http(s)://host[:port]".to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("an origin is http(s)://host[:port]".into());
    }
    if let Some(url::Host::Domain(name)) = url.host() {
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
            return Err("a host name is letters, digits, '-' and '.': no wildcard matches an origin".into());
        }
    }
    if url.origin().ascii_serialization() != origin.to_ascii_lowercase() {
        return Err("an origin is a scheme, a host and an optional port, with no path, query or credentials".into());
    }
    Ok(())
}

/// `90`, `90s`, `15m`, `24h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let value: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 24h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use s, m, h or d")),
    };
    Ok(Duration::from_secs(value * seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let config = Config::with_data_dir("somewhere");
        assert_eq!(config.data_dir, PathBuf::from("somewhere"));
        assert_eq!((config.max_files, config.max_upload_mb, config.job_ttl, config.mix_slots), (64, 512, Duration::from_secs(86_400), None));
        assert!(!config.has_keys() && !config.no_auth && config.allowed_origins.is_empty());
    }

    #[test]
    fn an_open_server_listens_on_loopback_only_unless_told_otherwise() {
        let mut config = Config::with_data_dir("somewhere");
        config.check_exposure().expect("loopback is fine open");
        config.addr = "0.0.0.0:8080".parse().unwrap();
        assert!(config.check_exposure().unwrap_err().contains("--api-key"));
        config.no_auth = true;
        config.check_exposure().expect("--no-auth is the explicit way out");
        config.no_auth = false;
        config.api_keys = vec![parse_api_key(&"k".repeat(32)).unwrap()];
        config.check_exposure().expect("with a key, any address");
    }

    #[test]
    fn allowed_origins_are_origins_or_the_server_does_not_start() {
        let mut config = Config::with_data_dir("somewhere");
        for good in ["https://app.example.com", "http://localhost:3000", "https://app.example.com/"] {
            config.allowed_origins = vec![good.into()];
            config.check().unwrap_or_else(|err| panic!("{good}: {err}"));
        }
        for bad in ["*", "https://*.example.com", "app.example.com", "https://app.example.com/path", "ftp://example.com", "https://user@example.com", "null"] {
            config.allowed_origins = vec![bad.into()];
            let err = config.check().unwrap_err();
            assert!(err.starts_with(&format!("--allowed-origin {bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn admin_keys_are_read_from_a_file_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, format!("# the ops team\n{}\n\n  {}  \n", "a".repeat(32), "b".repeat(40))).unwrap();
        let mut config = Config::with_data_dir("somewhere");
        config.api_key_file = Some(file.clone());
        config.check().unwrap();
        assert_eq!(config.api_keys, [parse_api_key(&"a".repeat(32)).unwrap(), parse_api_key(&"b".repeat(40)).unwrap()]);
        assert!(config.has_keys());
        std::fs::write(&file, "short\n").unwrap();
        let mut config = Config::with_data_dir("somewhere");
        config.api_key_file = Some(file);
        let err = config.check().unwrap_err();
        assert!(err.contains("line 1") && err.contains("at least 32") && !err.contains("short"), "{err}");
    }

    #[test]
    fn sessions_last_at_most_thirty_days_and_allowed_hosts_are_hosts() {
        assert_eq!(parse_session_ttl("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_session_ttl("31d").is_err() && parse_session_ttl("0s").is_err());
        let mut config = Config::with_data_dir("somewhere");
        config.allowed_hosts = vec!["mixd.lan".into(), "192.0.2.7".into(), "[2001:db8::1]".into()];
        config.check().unwrap();
        for bad in ["mixd.lan:8080", "*.lan", "http://mixd.lan", ""] {
            config.allowed_hosts = vec![bad.into()];
            assert!(config.check().unwrap_err().starts_with(&format!("--allowed-host {bad:?}")), "{bad}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
