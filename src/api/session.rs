//! Browser sessions and token minting. A browser cannot keep a secret from the page's scripts, so
//! the dashboard trades a pasted token (or key) for an `HttpOnly` cookie once, and the page never
//! holds it again; backends mint short-lived, one-project tokens for their users' browsers.

use std::time::{Duration, SystemTime};

use axum::extract::{Extension, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::SESSION_COOKIE;
use super::error::{respond, ApiError, Envelope, ErrorEnvelope};
use super::extract::ApiJson;
use super::state::AppState;
use crate::access::{Caller, MintError, Scope, MAX_TOKEN_TTL};
use crate::ids::ProjectId;

#[derive(Deserialize, ToSchema)]
pub struct SessionRequest {
    /// A scoped token or an admin key.
    pub token: String,
}

/// Who a credential is.
#[derive(Serialize, ToSchema)]
pub struct Identity {
    /// `admin`, `token`, or `open` (no access control).
    pub kind: &'static str,
    pub project_id: Option<ProjectId>,
    pub scope: Option<Scope>,
    pub subject: Option<String>,
    /// RFC 3339; null for an admin key sent as itself (a session opened with one expires) or an
    /// open server.
    pub expires_at: Option<String>,
}

impl Identity {
    fn of(caller: &Caller) -> Self {
        match caller {
            Caller::Open => Self { kind: "open", project_id: None, scope: None, subject: None, expires_at: None },
            Caller::Admin => Self { kind: "admin", project_id: None, scope: None, subject: None, expires_at: None },
            Caller::Session { expires_at } => Self { kind: "admin", project_id: None, scope: None, subject: None, expires_at: Some(rfc3339(*expires_at)) },
            Caller::Token(grant) => Self {
                kind: "token",
                project_id: Some(grant.project.clone()),
                scope: Some(grant.scope),
                subject: grant.subject.clone(),
                expires_at: Some(rfc3339(grant.expires_at)),
            },
        }
    }
}

/// Trades a token or key for the `mixd_token` cookie (`HttpOnly; SameSite=Strict`). For an admin
/// key the cookie holds a session the server signs, with the key's rights until it expires
/// (`--session-ttl`), never the key itself.
#[utoipa::path(post, path = "/session", tag = "access",
    request_body = SessionRequest,
    responses((status = 200, body = Envelope<Identity>, headers(("Set-Cookie" = String))), (status = 400, body = ErrorEnvelope, description = "BAD_REQUEST"),
        (status = 401, body = ErrorEnvelope, description = "UNAUTHORIZED"),
        (status = 415, body = ErrorEnvelope, description = "UNSUPPORTED_MEDIA_TYPE: a body not sent as application/json")))]
pub async fn create(State(app): State<AppState>, ApiJson(request): ApiJson<SessionRequest>) -> Result<Response, ApiError> {
    let caller = app.keys.verify(&request.token).map_err(|_| ApiError::Unauthorized)?;
    // An admin key is never kept in the cookie: a session the server signs stands in for it, so a
    // stolen cookie expires, is not the key, and ends for everyone when the session key changes.
    let (caller, value) = match caller {
        Caller::Admin => {
            let (session, expires_at) = app.keys.open_session(&request.token).ok_or_else(|| ApiError::Internal("no session could be opened".into()))?;
            (Caller::Session { expires_at }, session)
        }
        other => (other, request.token),
    };
    let cookie_safe = value.chars().all(|c| c.is_ascii_graphic() && !";,\"\\".contains(c));
    if !cookie_safe {
        return Err(ApiError::BadRequest("this credential cannot be kept in a cookie: send it in the Authorization header".into()));
    }
    let max_age = caller.expires_at().map(|at| at.duration_since(SystemTime::now()).unwrap_or_default().as_secs());
    Ok(with_session_cookie(&app, respond(StatusCode::OK, Identity::of(&caller), "Signed in"), &value, max_age))
}

/// Sets the session cookie: `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's
/// page sends it), `Secure` unless the server is on loopback (where there is no TLS to require).
fn with_session_cookie(app: &AppState, mut response: Response, value: &str, max_age: Option<u64>) -> Response {
    let secure = if app.config.on_loopback() { "" } else { "; Secure" };
    let lifetime = max_age.map(|seconds| format!("; Max-Age={seconds}")).unwrap_or_default();
    let cookie = format!("{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/{secure}{lifetime}");
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("callers pass cookie-safe values"));
    response
}

/// Who the request's credential is.
#[utoipa::path(get, path = "/session", tag = "access",
    responses((status = 200, body = Envelope<Identity>), (status = 401, body = ErrorEnvelope, description = "UNAUTHORIZED")))]
pub async fn show(Extension(caller): Extension<Caller>) -> Response {
    respond(StatusCode::OK, Identity::of(&caller), "Signed in")
}

/// Clears the session cookie.
#[utoipa::path(delete, path = "/session", tag = "access", responses((status = 200, headers(("Set-Cookie" = String)))))]
pub async fn delete(State(app): State<AppState>) -> Response {
    with_session_cookie(&app, respond(StatusCode::OK, serde_json::Map::new(), "Signed out"), "", Some(0))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
    pub project_id: ProjectId,
    pub scope: Scope,
    /// 1 s to 24 h, whole seconds (JSON's `60.0` is the integer 60).
    #[schema(value_type = u64, minimum = 1, maximum = 86400)]
    pub ttl_s: f64,
    /// Who the token is for, carried as `sub`.
    #[serde(default)]
    pub subject: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct MintedToken {
    pub token: String,
    pub expires_at: String,
}

/// Mints a scoped token (admin only), signed with the first token key.
#[utoipa::path(post, path = "/tokens", tag = "access",
    request_body = TokenRequest,
    responses((status = 201, body = Envelope<MintedToken>), (status = 400, body = ErrorEnvelope, description = "BAD_REQUEST"),
        (status = 409, body = ErrorEnvelope, description = "NO_TOKEN_KEY"), (status = 422, body = ErrorEnvelope, description = "INVALID_REQUEST"),
        (status = 415, body = ErrorEnvelope, description = "UNSUPPORTED_MEDIA_TYPE: a body not sent as application/json")))]
pub async fn mint(State(app): State<AppState>, ApiJson(request): ApiJson<TokenRequest>) -> Result<Response, ApiError> {
    let ttl_s = request.ttl_s;
    if ttl_s.fract() != 0.0 || !(1.0..=MAX_TOKEN_TTL.as_secs_f64()).contains(&ttl_s) {
        return Err(ApiError::InvalidRequest(format!("ttl_s: {ttl_s} is not a whole number of seconds in 1..={}", MAX_TOKEN_TTL.as_secs())));
    }
    let (token, expires_at) = app.keys.mint(&request.project_id, request.scope, Duration::from_secs(ttl_s as u64), request.subject).map_err(|err| match err {
        MintError::NoTokenKey => ApiError::NoTokenKey,
        MintError::Ttl => ApiError::InvalidRequest(err.to_string()),
    })?;
    Ok(respond(StatusCode::CREATED, MintedToken { token, expires_at: rfc3339(expires_at) }, "Token minted"))
}

fn rfc3339(at: SystemTime) -> String {
    DateTime::<Utc>::from(at).to_rfc3339_opts(SecondsFormat::Secs, true)
}
