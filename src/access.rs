//! Who may do what: admin keys and scoped tokens, independent of HTTP.
//!
//! An admin key has every right. A token is a JWT (HS256 only: the algorithm is never taken from
//! the token) signed with one of the configured token keys, chosen by its `kid`; it grants `read`
//! or `write` (which includes read) on one project until its `exp`. Keys are compared in constant
//! time, and nothing here logs or returns a secret, or says which check a credential failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::ProjectId;

/// The audience every token must name.
pub const AUDIENCE: &str = "mixd";
/// The audience of a session, which the server signs for itself: a scoped token never passes for
/// one, whatever key signed it.
const SESSION_AUDIENCE: &str = "mixd-session";
/// How long a session lives unless `--session-ttl` says otherwise.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Secrets shorter than this are refused at start: they could be guessed.
pub const MIN_SECRET_LEN: usize = 32;
/// The latest expiry any credential may claim, 9999-12-31T23:59:59Z: a time claim past it (2^63,
/// 10^15) would overflow the clocks streams are timed with, and is no credential anyone minted.
const LATEST_EXPIRY: u64 = 253_402_300_799;
/// The longest a token minted here lives.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// A secret from the configuration; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An admin key, as `--api-key` takes it.
pub fn parse_api_key(text: &str) -> Result<Secret, String> {
    let key = text.trim();
    if key.len() < MIN_SECRET_LEN {
        return Err(format!("an API key must be at least {MIN_SECRET_LEN} characters"));
    }
    Ok(Secret(key.into()))
}

/// A token key, `kid=secret`, as `--token-key` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    pub kid: String,
    pub secret: Secret,
}

pub fn parse_token_key(text: &str) -> Result<TokenKey, String> {
    let (kid, secret) = text.trim().split_once('=').ok_or("a token key is kid=secret")?;
    if kid.is_empty() || !kid.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err("a token key's kid is letters, digits, '_', '-' or '.'".into());
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!("a token key's secret must be at least {MIN_SECRET_LEN} characters"));
    }
    Ok(TokenKey { kid: kid.to_string(), secret: Secret(secret.into()) })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

/// What a verified credential may do.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    /// No keys are configured: the server is open to whoever can reach it.
    Open,
    Admin,
    /// A browser session opened with an admin key: the key's rights until `expires_at`.
    Session {
        expires_at: SystemTime,
    },
    Token(Arc<Grant>),
}

/// A verified token's rights.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub project: ProjectId,
    pub scope: Scope,
    pub subject: Option<String>,
    pub expires_at: SystemTime,
}

/// A right a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Read,
    Write,
    Admin,
}

impl Caller {
    /// Whether this caller has `right` on `project` (None: a right not tied to a project).
    pub fn may(&self, right: Right, project: Option<&ProjectId>) -> bool {
        match self {
            Caller::Open | Caller::Admin | Caller::Session { .. } => true,
            Caller::Token(grant) => {
                let scope_suffices = match right {
                    Right::Read => true,
                    Right::Write => grant.scope == Scope::Write,
                    Right::Admin => false,
                };
                scope_suffices && project == Some(&grant.project)
            }
        }
    }

    /// The one project a scoped token is for; None for a caller with every project.
    pub fn only_project(&self) -> Option<&ProjectId> {
        match self {
            Caller::Token(grant) => Some(&grant.project),
            Caller::Open | Caller::Admin | Caller::Session { .. } => None,
        }
    }

    /// When this caller's rights end; a stream open on them ends then too.
    pub fn expires_at(&self) -> Option<SystemTime> {
        match self {
            Caller::Token(grant) => Some(grant.expires_at),
            Caller::Session { expires_at } => Some(*expires_at),
            Caller::Open | Caller::Admin => None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    aud: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    prj: ProjectId,
    scope: Scope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
}

/// A session's claims: no project and no scope, an audience of its own, and `adm`, which ties it
/// to the admin key it was opened with: a session outlives neither that key's removal nor a
/// reader of the job store who knows the session secret but no admin key.
#[derive(Debug, Serialize, Deserialize)]
struct SessionClaims {
    aud: String,
    exp: u64,
    iat: u64,
    adm: String,
}

/// A credential that did not verify. Deliberately says nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the credential is missing, malformed, expired or not recognised")]
pub struct Unverified;

/// The configured admin keys and token keys; cheap to clone.
#[derive(Clone)]
pub struct Keys {
    inner: Arc<KeySet>,
}

struct KeySet {
    /// SHA-256 of each admin key: comparing digests in constant time does not leak a key's length.
    admin: Vec<[u8; 32]>,
    tokens: Vec<SigningKey>,
    verified: VerifiedTokens,
    /// What browser sessions are signed with, how long they live, and the secret that ties each
    /// to its admin key.
    sessions: Option<(SigningKey, Duration, Vec<u8>)>,
}

/// Tokens that already verified, with their grants: a client that polls or reconnects with the
/// same token pays for the signature check once, not on every request. Only tokens whose
/// signature checked out are kept (the whole token is the key, so a tampered one misses), and
/// expiry is checked on every hit. Bounded: when full it is emptied and refills.
#[derive(Default)]
struct VerifiedTokens {
    grants: Mutex<HashMap<Box<str>, Arc<Grant>>>,
}

const VERIFIED_TOKENS: usize = 4096;

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<Arc<Grant>> {
        self.grants.lock().expect("never poisoned").get(token).cloned()
    }

    fn insert(&self, token: &str, grant: Arc<Grant>) {
        let mut grants = self.grants.lock().expect("never poisoned");
        if grants.len() >= VERIFIED_TOKENS {
            grants.clear();
        }
        grants.insert(token.into(), grant);
    }
}

#[derive(Clone)]
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Keys {
    pub fn new(admin_keys: &[Secret], token_keys: &[TokenKey]) -> Self {
        // One crypto backend is compiled in; installing it makes the choice explicit rather than
        // inferred, should another crate in the graph ever enable jsonwebtoken's other backend.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let tokens = token_keys
            .iter()
            .map(|key| {
                let secret = key.secret.expose().as_bytes();
                SigningKey {
                    kid: key.kid.clone(),
                    encoding: EncodingKey::from_secret(secret).expect("a parsed secret is long enough for HS256"),
                    decoding: DecodingKey::from_secret(secret).expect("a parsed secret is long enough for HS256"),
                }
            })
            .collect();
        let admin = admin_keys.iter().map(|key| digest(key.expose())).collect();
        Self { inner: Arc::new(KeySet { admin, tokens, verified: VerifiedTokens::default(), sessions: None }) }
    }

    /// These keys, with browser sessions signed with `secret` and living `ttl`. Replacing the
    /// secret ends every session signed with the old one.
    pub fn with_sessions(self, secret: &[u8], ttl: Duration) -> Self {
        let key = SigningKey {
            kid: "session".into(),
            encoding: EncodingKey::from_secret(secret).expect("a session secret is long enough for HS256"),
            decoding: DecodingKey::from_secret(secret).expect("a session secret is long enough for HS256"),
        };
        let KeySet { admin, tokens, verified, .. } = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| KeySet {
            admin: shared.admin.clone(),
            tokens: shared.tokens.clone(),
            verified: VerifiedTokens::default(),
            sessions: None,
        });
        Self { inner: Arc::new(KeySet { admin, tokens, verified, sessions: Some((key, ttl, secret.to_vec())) }) }
    }

    /// What ties a session to the admin key whose digest is `admin`: an HMAC of it under the session
    /// secret, so that it names the key without revealing it.
    fn session_binding(secret: &[u8], admin: &[u8; 32]) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(admin);
        mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// A browser session with the rights of `admin_key` (which the caller verified): what the
    /// session cookie holds instead of the key itself, so that a stolen cookie expires, cannot be
    /// used as the key elsewhere, and ends when the key is removed.
    pub fn open_session(&self, admin_key: &str) -> Option<(String, SystemTime)> {
        let (key, ttl, secret) = self.inner.sessions.as_ref()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let exp = now.checked_add(ttl.as_secs().max(1)).filter(|exp| *exp <= LATEST_EXPIRY)?;
        let claims = SessionClaims { aud: SESSION_AUDIENCE.into(), exp, iat: now, adm: Self::session_binding(secret, &digest(admin_key)) };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key.encoding).expect("HS256 signs any claims");
        Some((token, UNIX_EPOCH + Duration::from_secs(exp)))
    }

    fn verify_session(&self, token: &str) -> Result<Caller, Unverified> {
        let (key, ttl, secret) = self.inner.sessions.as_ref().ok_or(Unverified)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[SESSION_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<SessionClaims>(token, &key.decoding, &validation).map_err(|_| Unverified)?.claims;
        // No session lives longer than the server opens them for.
        if claims.exp.saturating_sub(claims.iat) > ttl.as_secs().max(1) {
            return Err(Unverified);
        }
        // Opened with an admin key that is still configured: every key is compared.
        let presented = claims.adm.as_bytes();
        let current = self.inner.admin.iter().fold(subtle::Choice::from(0), |found, admin| found | Self::session_binding(secret, admin).as_bytes().ct_eq(presented));
        if !bool::from(current) {
            return Err(Unverified);
        }
        Ok(Caller::Session { expires_at: expiry(claims.exp)? })
    }

    /// Whether any key is configured: without one, access control is off.
    pub fn any(&self) -> bool {
        !self.inner.admin.is_empty() || !self.inner.tokens.is_empty()
    }

    /// Who `credential` (an admin key or a token) is.
    pub fn verify(&self, credential: &str) -> Result<Caller, Unverified> {
        let presented = digest(credential);
        // Every key is compared, so the time taken does not tell which one matched.
        let is_admin = self.inner.admin.iter().fold(subtle::Choice::from(0), |found, key| found | key.ct_eq(&presented));
        if bool::from(is_admin) {
            return Ok(Caller::Admin);
        }
        if let Some(grant) = self.inner.verified.get(credential) {
            return if grant.expires_at > SystemTime::now() { Ok(Caller::Token(grant)) } else { Err(Unverified) };
        }
        let grant = match self.verify_token(credential) {
            Ok(grant) => Arc::new(grant),
            Err(unverified) => return self.verify_session(credential).map_err(|_| unverified),
        };
        self.inner.verified.insert(credential, grant.clone());
        Ok(Caller::Token(grant))
    }

    fn verify_token(&self, token: &str) -> Result<Grant, Unverified> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Unverified)?;
        let key = match &header.kid {
            Some(kid) => self.inner.tokens.iter().find(|key| key.kid == *kid),
            // Without a kid a token is only unambiguous when there is one key.
            None if self.inner.tokens.len() == 1 => self.inner.tokens.first(),
            None => None,
        }
        .ok_or(Unverified)?;
        // HS256 only, whatever the header says: `decode` refuses any other `alg`.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|_| Unverified)?.claims;
        Ok(Grant { project: claims.prj, scope: claims.scope, subject: claims.sub, expires_at: expiry(claims.exp)? })
    }

    /// A token for `project` with `scope`, living `ttl`, signed with the first token key.
    pub fn mint(&self, project: &ProjectId, scope: Scope, ttl: Duration, subject: Option<String>) -> Result<(String, SystemTime), MintError> {
        let key = self.inner.tokens.first().ok_or(MintError::NoTokenKey)?;
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(MintError::Ttl);
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // Whole seconds, rounded up, so a token never lives shorter than asked.
        let exp = (now + ttl).as_secs() + u64::from((now + ttl).subsec_nanos() > 0);
        let claims = Claims { aud: AUDIENCE.into(), exp, iat: Some(now.as_secs()), prj: project.clone(), scope, sub: subject };
        let header = Header { kid: Some(key.kid.clone()), ..Header::new(Algorithm::HS256) };
        let token = jsonwebtoken::encode(&header, &claims, &key.encoding).expect("HS256 signs any claims");
        Ok((token, UNIX_EPOCH + Duration::from_secs(exp)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("no token key is configured: set --token-key (MIXD_TOKEN_KEYS)")]
    NoTokenKey,
    #[error("a token lives 1 second to 24 hours")]
    Ttl,
}

/// An `exp` claim as a time, if it is one a credential may have.
fn expiry(exp: u64) -> Result<SystemTime, Unverified> {
    (exp <= LATEST_EXPIRY).then(|| UNIX_EPOCH + Duration::from_secs(exp)).ok_or(Unverified)
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys() -> Keys {
        Keys::new(
            &[parse_api_key(&"k".repeat(32)).unwrap()],
            &[parse_token_key(&format!("new={SECRET}")).unwrap(), parse_token_key(&format!("old={}", SECRET.repeat(2))).unwrap()],
        )
    }

    fn project(name: &str) -> ProjectId {
        name.parse().unwrap()
    }

    #[test]
    fn admin_keys_and_minted_tokens_verify_with_their_rights() {
        let keys = keys();
        assert_eq!(keys.verify(&"k".repeat(32)), Ok(Caller::Admin));
        assert_eq!(keys.verify(&"k".repeat(31)), Err(Unverified));
        let (token, expires_at) = keys.mint(&project("p1"), Scope::Read, Duration::from_secs(60), Some("user-7".into())).unwrap();
        let Ok(Caller::Token(grant)) = keys.verify(&token) else { panic!("the minted token verifies") };
        assert_eq!((grant.project.clone(), grant.scope, grant.subject.as_deref(), grant.expires_at), (project("p1"), Scope::Read, Some("user-7"), expires_at));
        let caller = keys.verify(&token).unwrap();
        assert!(caller.may(Right::Read, Some(&project("p1"))));
        assert!(!caller.may(Right::Write, Some(&project("p1"))), "read does not include write");
        assert!(!caller.may(Right::Read, Some(&project("p2"))), "one project only");
        assert!(!caller.may(Right::Admin, None));
        let (writer, _) = keys.mint(&project("p1"), Scope::Write, Duration::from_secs(60), None).unwrap();
        assert!(keys.verify(&writer).unwrap().may(Right::Read, Some(&project("p1"))), "write includes read");
    }

    #[test]
    fn a_verified_token_is_remembered_but_still_expires_and_a_tampered_one_is_not_taken_for_it() {
        let keys = keys();
        let (token, _) = keys.mint(&project("p1"), Scope::Read, Duration::from_secs(1), None).unwrap();
        assert!(matches!(keys.verify(&token), Ok(Caller::Token(_))));
        assert!(matches!(keys.verify(&token), Ok(Caller::Token(_))), "from the cache");
        let mut tampered = token.clone();
        tampered.pop();
        assert_eq!(keys.verify(&tampered), Err(Unverified));
        // A grant past its expiry is refused even when remembered.
        let expired = Arc::new(Grant { project: project("p1"), scope: Scope::Write, subject: None, expires_at: SystemTime::now() - Duration::from_secs(1) });
        keys.inner.verified.insert("remembered", expired);
        assert_eq!(keys.verify("remembered"), Err(Unverified));
    }

    #[test]
    fn a_token_signed_by_a_later_key_verifies_by_its_kid_and_a_removed_key_does_not() {
        let old_only = Keys::new(&[], &[parse_token_key(&format!("old={}", SECRET.repeat(2))).unwrap()]);
        let (token, _) = old_only.mint(&project("p1"), Scope::Read, Duration::from_secs(60), None).unwrap();
        assert!(matches!(keys().verify(&token), Ok(Caller::Token(_))), "rotation: the old key still verifies");
        let rotated_out = Keys::new(&[], &[parse_token_key(&format!("new={SECRET}")).unwrap()]);
        assert_eq!(rotated_out.verify(&token), Err(Unverified));
    }

    #[test]
    fn secrets_too_short_are_refused_and_never_printed() {
        assert!(parse_api_key("short").is_err());
        assert!(parse_token_key("kid=short").is_err());
        assert!(parse_token_key(SECRET).is_err(), "no kid");
        let key = parse_token_key(&format!("k1={SECRET}")).unwrap();
        assert!(!format!("{key:?}").contains(SECRET));
    }

    #[test]
    fn a_session_is_signed_by_the_server_expires_and_passes_for_nothing_else() {
        let session_secret = b"session-secret-0123456789abcdef-01234";
        let signing = keys().with_sessions(session_secret, Duration::from_secs(600));
        let (session, expires_at) = signing.open_session(&"k".repeat(32)).unwrap();
        assert_eq!(signing.verify(&session), Ok(Caller::Session { expires_at }));
        assert!(signing.verify(&session).unwrap().may(Right::Admin, None));
        // Another session key (rotated) refuses it; keys without sessions open none.
        assert_eq!(keys().with_sessions(b"another-secret-0123456789abcdef-0123", Duration::from_secs(600)).verify(&session), Err(Unverified));
        assert!(keys().open_session(&"k".repeat(32)).is_none());
        // The admin key it was opened with removed: the session ends with it.
        let without_that_key = Keys::new(&[parse_api_key(&"z".repeat(32)).unwrap()], &[]).with_sessions(session_secret, Duration::from_secs(600));
        assert_eq!(without_that_key.verify(&session), Err(Unverified));
        // Expired: signed with the right key, but its exp has passed.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let adm = Keys::session_binding(session_secret, &digest(&"k".repeat(32)));
        let forged = |exp: u64, iat: u64| {
            let claims = SessionClaims { aud: SESSION_AUDIENCE.into(), exp, iat, adm: adm.clone() };
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(session_secret).unwrap()).unwrap()
        };
        assert!(signing.verify(&forged(now + 60, now)).is_ok(), "well made, it verifies");
        assert_eq!(signing.verify(&forged(now - 5, now - 600)), Err(Unverified), "expired");
        assert_eq!(signing.verify(&forged(now + 100 * 365 * 86_400, now)), Err(Unverified), "longer than sessions are opened for");
        // A scoped token signed with the session secret is still no session (its audience), and a
        // session signed with a token key is no token.
        let as_token = Keys::new(&[], &[parse_token_key(&format!("s={}", std::str::from_utf8(session_secret).unwrap())).unwrap()]);
        let (token, _) = as_token.mint(&"p1".parse().unwrap(), Scope::Read, Duration::from_secs(60), None).unwrap();
        assert_eq!(signing.verify(&token), Err(Unverified));
        let (session_by_token_key, _) = as_token.with_sessions(SECRET.as_bytes(), Duration::from_secs(60)).open_session(&"k".repeat(32)).unwrap();
        assert_eq!(signing.verify(&session_by_token_key), Err(Unverified));
    }
}
