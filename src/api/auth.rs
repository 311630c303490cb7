//! The one place that decides whether a request may proceed: a layer on every route that finds
//! the caller's credential, verifies it (`crate::access`), and checks it against the right the
//! route needs, before any handler runs (so before any WebSocket upgrade). The verified
//! [`Caller`] goes on in the request's extensions.
//!
//! Without keys the server is open, but only to the person at this machine: it listens on
//! loopback (see `Config::check_exposure`), answers only requests addressed to a loopback host
//! (a DNS-rebinding page addresses its own name), and refuses state changes and WebSocket
//! upgrades from a foreign `Origin` (a page elsewhere posting to 127.0.0.1:8080).

use axum::extract::{FromRequestParts, MatchedPath, Query, RawPathParams, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use std::net::IpAddr;

use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{ApiError, ErrorCodeOf};
use super::limits::{Client, ClientKey, PeerAddr, Reserved};
use super::state::AppState;
use crate::access::{Caller, Right, Scope};
use crate::ids::ProjectId;

/// The cookie `POST /session` sets.
pub const SESSION_COOKIE: &str = "mixd_token";

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Nobody needs a credential (health, the session routes themselves).
    Nothing,
    /// Any valid credential.
    Credential,
    /// A right on the project the path names.
    Project(Right),
    /// A right not tied to a project.
    Global(Right),
}

/// How a route may be reached, besides what it needs.
#[derive(Debug, Clone, Copy)]
struct Rule {
    need: Need,
    /// A GET stream or media route: a read token may come as `?access_token=`, since neither an
    /// EventSource nor an `<audio>` element can send a header.
    query_token: bool,
    websocket: bool,
}

/// Every route's rule, by method and route template. A route missing here needs admin rights:
/// forgetting to list one fails closed.
fn rule(method: &Method, route: &str) -> Rule {
    let plain = |need| Rule { need, query_token: false, websocket: false };
    let stream = |need| Rule { need, query_token: true, websocket: false };
    let websocket = |need| Rule { need, query_token: true, websocket: true };
    let read = Need::Project(Right::Read);
    let write = Need::Project(Right::Write);
    let admin = Need::Global(Right::Admin);
    match (method.as_str(), route) {
        ("GET", "/healthz") | ("POST" | "DELETE", "/session") => plain(Need::Nothing),
        // `/projects` lists only a scoped token's own project.
        ("GET", "/session" | "/openapi.json" | "/projects") => plain(Need::Credential),
        ("POST", "/projects/{project_id}/stems") | ("DELETE", "/projects/{project_id}/stems/{stem_id}") => plain(write),
        ("POST", "/mix/{project_id}/mix/start") | ("DELETE", "/mix/{project_id}/mix/job/{job_id}") => plain(write),
        ("GET", "/projects/{project_id}/stems" | "/projects/{project_id}/mix/status") => plain(read),
        (
            "GET",
            "/mix/{project_id}/mix/status"
            | "/mix/{project_id}/mix/jobs"
            | "/mix/{project_id}/mix/preview"
            | "/mix/{project_id}/mix/job/{job_id}/status"
            | "/mix/{project_id}/mix/job/{job_id}/webhooks",
        ) => plain(read),
        ("GET", "/mix/{project_id}/mix/job/{job_id}/events" | "/mix/{project_id}/mix/events" | "/media/{*path}") => stream(read),
        ("GET", "/mix/{project_id}/mix/job/{job_id}/ws" | "/mix/{project_id}/mix/ws") => websocket(read),
        ("GET", "/events") => stream(admin),
        ("GET", "/ws") => websocket(admin),
        // `/metrics`, `/webhooks/secret`, `POST /tokens`, and any route not listed above.
        _ => plain(admin),
    }
}

/// How `/openapi.json` describes a route's access: whether it needs a credential, and whether a
/// read token may come in the query. Read from the same table the layer checks.
pub(super) fn documented_access(method: &str, route: &str) -> (bool, bool) {
    let route = if route == "/media/{path}" { "/media/{*path}" } else { route };
    let rule = rule(&method.to_ascii_uppercase().parse().unwrap_or(Method::GET), route);
    (rule.need != Need::Nothing, rule.query_token)
}

#[derive(Deserialize)]
struct AccessTokenQuery {
    access_token: Option<String>,
}

/// The layer: checks the request against its route's rule and the client's limits, then runs it
/// with its [`Caller`]; counts what the limits refused, here or in the handler.
pub async fn authorize(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let response = check_and_run(&app, request, next).await.unwrap_or_else(IntoResponse::into_response);
    if let Some(ErrorCodeOf(code)) = response.extensions().get() {
        app.jobs.metrics().count_refusal(code);
    }
    response
}

async fn check_and_run(app: &AppState, request: Request, next: Next) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let (rule, is_health) = {
        let route = parts.extensions.get::<MatchedPath>().map_or("", MatchedPath::as_str);
        let route = route.strip_prefix("/api").unwrap_or(route);
        (rule(&parts.method, route), route == "/healthz")
    };
    let is_upgrade = rule.websocket && parts.headers.get(header::UPGRADE).is_some();
    let authority = request_authority(&parts)?;
    let changes_state = matches!(parts.method, Method::POST | Method::DELETE | Method::PUT | Method::PATCH);
    // A browser attaches the cookie to a request any page sends (SameSite=Strict does not tell a
    // sibling port or subdomain from the server's own page): what the cookie authenticates must
    // come from the server's own page, or from an origin listed with `--allowed-origin`.
    let from_own_page = |parts: &axum::http::request::Parts| origin_allowed(app, &parts.headers, authority.as_ref()) && fetch_site_allowed(app, &parts.headers);

    let peer = parts.extensions.get::<PeerAddr>().map(|PeerAddr(address)| *address);
    let reserved = parts.extensions.get::<Reserved>().is_some();
    let (caller, client) = if app.keys.any() {
        if is_upgrade && !origin_allowed(app, &parts.headers, authority.as_ref()) {
            return Err(ApiError::Forbidden);
        }
        let authenticated = authenticate(app, &parts, rule);
        // Past the connection cap, the reserve answers only the health check and admins.
        if reserved && !is_health && !matches!(authenticated, Ok((Caller::Admin | Caller::Session { .. }, _, _))) {
            return Err(ApiError::ServerBusy);
        }
        match authenticated {
            Ok((_, Credential::Cookie, _)) if changes_state && !from_own_page(&parts) => return Err(ApiError::Forbidden),
            Ok((caller, _, client)) => (caller, client),
            // Signing in or out must work with a stale cookie still in the browser.
            Err(_) if rule.need == Need::Nothing => (Caller::Open, peer.map(ClientKey::address)),
            Err(refused) => return Err(refused),
        }
    } else {
        if reserved && !is_health {
            return Err(ApiError::ServerBusy);
        }
        // On any address, loopback or not (`--no-auth`): a DNS-rebinding page addresses the
        // server under a name of its own.
        // The health check says nothing a rebinding page could use, and a load balancer's probe
        // addresses a node by whatever address it knows it by.
        if !is_health && !host_allowed(app, authority.as_ref()) {
            return Err(ApiError::Forbidden);
        }
        if (changes_state || is_upgrade) && !from_own_page(&parts) {
            return Err(ApiError::Forbidden);
        }
        (Caller::Open, peer.map(ClientKey::address))
    };

    let allowed = match rule.need {
        Need::Nothing | Need::Credential => true,
        Need::Global(right) => caller.may(right, None),
        // An admin (or an open server) passes even a malformed id, which its handler refuses
        // with its own code; a token names one valid project, so a bad id is not it.
        Need::Project(_) if matches!(caller, Caller::Admin | Caller::Session { .. } | Caller::Open) => true,
        Need::Project(right) => {
            let params = RawPathParams::from_request_parts(&mut parts, app).await.ok();
            let project = params.as_ref().and_then(|params| {
                params.iter().find_map(|(name, value)| match name {
                    "project_id" => Some(value),
                    // `/media/{project}/...`
                    "path" => value.split('/').next(),
                    _ => None,
                })
            });
            project.and_then(|p| p.parse::<ProjectId>().ok()).is_some_and(|project| caller.may(right, Some(&project)))
        }
    };
    if !allowed {
        return Err(ApiError::Forbidden);
    }
    // Reads and streams are never limited; a state change is, per client (admins are not).
    let rate = match (&app.rate_limits, client) {
        (Some(limits), Some(client)) if changes_state => Some(limits.check(&client)?),
        _ => None,
    };
    parts.extensions.insert(caller);
    parts.extensions.insert(Client(client));
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if let Some(rate) = rate {
        rate.apply(response.headers_mut());
    }
    Ok(response)
}

/// Where a request's credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    Header,
    /// The session cookie, which a browser attaches to whatever page sends the request.
    Cookie,
    Query,
}

/// The caller behind the request's credential: the `Authorization` header, else the session
/// cookie, else (on the routes that allow it) a read token in `?access_token=`.
/// The client key is `None` for an admin key, which no limit counts (and so is not hashed).
fn authenticate(app: &AppState, parts: &axum::http::request::Parts, rule: Rule) -> Result<(Caller, Credential, Option<ClientKey>), ApiError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        // A header that is there but not a bearer credential is refused, not skipped.
        let credential = value.to_str().ok().and_then(bearer).ok_or(ApiError::Unauthorized)?;
        return app
            .keys
            .verify(credential)
            .map(|caller| {
                let client = (!matches!(caller, Caller::Admin)).then(|| app.streams.credential(credential));
                (caller, Credential::Header, client)
            })
            .map_err(|_| ApiError::Unauthorized);
    }
    if let Some(credential) = session_cookie(&parts.headers) {
        // The server never puts an admin key in the cookie (`POST /session` signs a session in
        // its stead): one found there was put by someone else, or by an older server, and is not
        // taken.
        return match app.keys.verify(credential) {
            Ok(Caller::Admin) | Err(_) => Err(ApiError::Unauthorized),
            Ok(caller) => Ok((caller, Credential::Cookie, Some(app.streams.credential(credential)))),
        };
    }
    let from_query = Query::<AccessTokenQuery>::try_from_uri(&parts.uri).ok().and_then(|Query(q)| q.access_token);
    if let Some(credential) = from_query {
        // Query strings end up in proxies' logs and browser history: only a read token, which
        // can change nothing and expires, may travel there, and only to a GET stream or media.
        if !(rule.query_token && parts.method == Method::GET) {
            return Err(ApiError::Unauthorized);
        }
        return match app.keys.verify(&credential) {
            Ok(Caller::Token(grant)) if grant.scope == Scope::Read => Ok((Caller::Token(grant), Credential::Query, Some(app.streams.credential(&credential)))),
            _ => Err(ApiError::Unauthorized),
        };
    }
    Err(ApiError::Unauthorized)
}

/// The credential of `Bearer <credential>`; the scheme is case-insensitive (RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .filter(|value| !value.is_empty())
}

/// A request's authority as RFC 3986 has it: a host (a bracketed IPv6 address, or an IPv4
/// address or a name of letters, digits, `-` and `.`), then an optional `:port` of digits, and
/// nothing else.
#[derive(Debug, PartialEq)]
struct Authority<'a> {
    host: Host<'a>,
    port: Option<u16>,
}

#[derive(Debug, PartialEq)]
enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

impl Host<'_> {
    fn same(&self, other: &Host) -> bool {
        match (self, other) {
            (Host::Ip(a), Host::Ip(b)) => a == b,
            (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        }
    }
}

fn parse_authority(text: &str) -> Option<Authority<'_>> {
    let (host, rest) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (inside, rest) = bracketed.split_once(']')?;
            (Host::Ip(IpAddr::V6(inside.parse().ok()?)), rest)
        }
        None => {
            let (name, rest) = text.split_at(text.find(':').unwrap_or(text.len()));
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
                return None;
            }
            (name.parse().map_or(Host::Name(name), |ip: std::net::Ipv4Addr| Host::Ip(IpAddr::V4(ip))), rest)
        }
    };
    let port = match rest {
        "" => None,
        _ => {
            let digits = rest.strip_prefix(':')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse().ok()?)
        }
    };
    Some(Authority { host, port })
}

/// The authority the request is addressed to (its `Host`, or an HTTP/2 request's authority);
/// `Err` when it is there but is not one (two `Host` headers, or one that no client should send:
/// `[::1].evil.com`, `localhost:80, evil.com`).
fn request_authority(parts: &axum::http::request::Parts) -> Result<Option<Authority<'_>>, ApiError> {
    let malformed = || ApiError::BadRequest("the Host header is not a host with an optional port".into());
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let text = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(malformed()),
        (Some(host), None) => host.to_str().map_err(|_| malformed())?,
        (None, _) => match parts.uri.authority() {
            Some(authority) => authority.as_str(),
            None => return Ok(None),
        },
    };
    parse_authority(text).map(Some).ok_or_else(malformed)
}

/// Whether an open server answers a request addressed to `authority`: a loopback name or
/// address, the address it listens on, or a name listed with `--allowed-host`.
fn host_allowed(app: &AppState, authority: Option<&Authority>) -> bool {
    if host_is_loopback(authority) {
        return true;
    }
    match authority.map(|authority| &authority.host) {
        Some(Host::Ip(ip)) => {
            let ip = ip.to_canonical();
            let bound = app.config.addr.ip();
            (!bound.is_unspecified() && ip == bound.to_canonical())
                || app.config.allowed_hosts.iter().any(|allowed| allowed.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|allowed| allowed.to_canonical() == ip))
        }
        Some(Host::Name(name)) => app.config.allowed_hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(name)),
        None => false,
    }
}

/// Whether the request is addressed to a loopback name or address, port aside.
fn host_is_loopback(authority: Option<&Authority>) -> bool {
    match authority.map(|authority| &authority.host) {
        Some(Host::Name(name)) => {
            let ends_with = |suffix: &str| name.len() >= suffix.len() && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
            name.eq_ignore_ascii_case("localhost") || ends_with(".localhost")
        }
        Some(Host::Ip(ip)) => ip.to_canonical().is_loopback(),
        None => false,
    }
}

/// What `Sec-Fetch-Site` says, where a browser sends it: the server's own page (`same-origin`), the
/// user's own action (`none`), or an origin listed with `--allowed-origin`. A page on a sibling
/// port or subdomain is `same-site`, one elsewhere `cross-site`.
fn fetch_site_allowed(app: &AppState, headers: &HeaderMap) -> bool {
    match headers.get("sec-fetch-site").map(|value| value.to_str().unwrap_or_default()) {
        None | Some("same-origin" | "none") => true,
        Some(_) => {
            let origin = headers.get(header::ORIGIN).and_then(|origin| origin.to_str().ok());
            origin.is_some_and(|origin| app.config.allowed_origins.iter().any(|allowed| allowed.trim_end_matches('/').eq_ignore_ascii_case(origin)))
        }
    }
}

/// No `Origin` (not a browser), one listed with `--allowed-origin`, or the server's own: `http`,
/// and the host and port the request is addressed to. The whole origin is compared: a page at
/// `https://127.0.0.1:P` or `x://127.0.0.1:P` is not the server at `http://127.0.0.1:P`. A server
/// reached over TLS (behind a proxy) lists its `https://` origin with `--allowed-origin`.
fn origin_allowed(app: &AppState, headers: &HeaderMap, authority: Option<&Authority>) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if app.config.allowed_origins.iter().any(|allowed| allowed.trim_end_matches('/').eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Some(own) = authority else { return false };
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    let Some(origin) = parse_authority(rest) else { return false };
    let default_port = |port: Option<u16>| port.unwrap_or(80);
    scheme.eq_ignore_ascii_case("http") && origin.host.same(&own.host) && default_port(origin.port) == default_port(own.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_route_has_its_right_and_an_unlisted_one_needs_admin() {
        let get = Method::GET;
        assert_eq!(rule(&get, "/healthz").need, Need::Nothing);
        assert_eq!(rule(&Method::POST, "/mix/{project_id}/mix/start").need, Need::Project(Right::Write));
        assert_eq!(rule(&get, "/mix/{project_id}/mix/job/{job_id}/status").need, Need::Project(Right::Read));
        assert!(rule(&get, "/media/{*path}").query_token);
        assert!(!rule(&get, "/mix/{project_id}/mix/jobs").query_token);
        assert_eq!(rule(&get, "/events").need, Need::Global(Right::Admin));
        assert_eq!(rule(&get, "/some/new/route").need, Need::Global(Right::Admin), "fails closed");
        assert_eq!(rule(&Method::PUT, "/mix/{project_id}/mix/start").need, Need::Global(Right::Admin));
    }

    #[test]
    fn credentials_are_read_from_bearer_and_cookie_only_when_well_formed() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "theme=dark; mixd_token=t0k; other=1".parse().unwrap());
        assert_eq!(session_cookie(&headers), Some("t0k"));
        headers.insert(header::COOKIE, "mixd_tokenx=1; mixd_token=".parse().unwrap());
        assert_eq!(session_cookie(&headers), None);
    }

    #[test]
    fn a_host_is_an_authority_and_nothing_else() {
        let ip = |text: &str| Host::Ip(text.parse().unwrap());
        assert_eq!(parse_authority("localhost"), Some(Authority { host: Host::Name("localhost"), port: None }));
        assert_eq!(parse_authority("127.0.0.1:8080"), Some(Authority { host: ip("127.0.0.1"), port: Some(8080) }));
        assert_eq!(parse_authority("[::1]:80"), Some(Authority { host: ip("::1"), port: Some(80) }));
        assert_eq!(parse_authority("Mixd.Localhost"), Some(Authority { host: Host::Name("Mixd.Localhost"), port: None }));
        for refused in [
            "[::1].evil.com",
            "[::1]evil.com:80",
            "localhost:80, evil.com",
            "localhost:",
            "localhost:99999",
            "[::1",
            "[evil]",
            "",
            ":80",
            "a b",
            "user@localhost",
            "localhost:8o",
        ] {
            assert_eq!(parse_authority(refused), None, "{refused}");
        }
        let loopback = |text: &str| host_is_loopback(parse_authority(text).as_ref());
        for host in ["localhost", "LOCALHOST:1", "a.localhost", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]:8080"] {
            assert!(loopback(host), "{host}");
        }
        for host in ["localhost.evil.com", "evil.com", "10.0.0.1", "[::2]", "localhostx"] {
            assert!(!loopback(host), "{host}");
        }
    }
}
