//! Authentication and authorization: bearer JWTs checked against configured issuers, and the
//! roles that map a user's duties to permissions per resource type and action.
//!
//! Read [`Authenticator::authenticate`] first; [`roles`] contains the permission table and
//! [`dev_issuer`] the local development issuer behind `chartlog token`.

pub mod roles;

pub use crate::crypto::dev_issuer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub use roles::{Action, Role};

/// An issuer whose tokens are accepted.
#[derive(Clone, Debug, Deserialize)]
pub struct IssuerConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// File holding the issuer's JSON Web Key Set.
    pub jwks_file: Option<PathBuf>,
    /// URL of the issuer's JSON Web Key Set, fetched at start-up.
    pub jwks_url: Option<String>,
}

/// Reason a request is not authenticated. The client sees only that its token was rejected; the
/// variant goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// The token is not a well-formed JWT or names no known key.
    #[error("malformed token or unknown key id")]
    Malformed,
    /// The issuer is not configured.
    #[error("untrusted issuer")]
    UntrustedIssuer,
    /// Signature, expiry, not-before or audience check failed.
    #[error("token rejected: {0}")]
    Invalid(String),
    /// The token carries no role this server defines.
    #[error("token has no known role")]
    NoRole,
}

/// Claims Chartlog reads from a token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    role: Option<String>,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Principal {
    /// Subject id from the token (`sub`); every event names it.
    pub subject: String,
    /// Issuer of the token.
    pub issuer: String,
    /// Roles granted by the token that this server defines.
    pub roles: Vec<Role>,
}

impl Principal {
    /// Returns whether any of the principal's roles permits `action` on `resource_type`.
    pub fn may(&self, action: Action, resource_type: &str) -> bool {
        self.roles
            .iter()
            .any(|role| role.permits(action, resource_type))
    }

    /// Returns the purpose of use assumed for this principal's requests when the client
    /// names none: the purpose of its first role.
    pub fn default_purpose(&self) -> &'static str {
        self.roles
            .first()
            .map_or("TREAT", |role| role.default_purpose())
    }
}

struct TrustedIssuer {
    audience: String,
    keys: JwkSet,
}

/// Validates bearer tokens against the configured issuers.
pub struct Authenticator {
    issuers: HashMap<String, TrustedIssuer>,
    /// Allowed clock skew for `exp` and `nbf`.
    leeway: Duration,
    /// Tokens whose signature and claims were checked, by the BLAKE3 digest of the token, with
    /// their validity window; a hit skips the signature check, never the expiry check.
    verified: Mutex<HashMap<[u8; 32], VerifiedToken>>,
}

/// Longest `sub` accepted, in bytes. Every event header carries the subject in clear, so it
/// must be an identifier, not free text.
const MAX_SUBJECT_BYTES: usize = 256;

/// Most tokens kept in the verified-token cache. A clinic's active sessions fit many times
/// over; when it is full it is emptied, which costs one signature check per token.
const MAX_CACHED_TOKENS: usize = 10_000;

#[derive(Clone)]
struct VerifiedToken {
    principal: Principal,
    not_before: u64,
    expires: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Error from loading issuer keys at start-up.
#[derive(Debug, thiserror::Error)]
pub enum IssuerLoadError {
    /// The JWKS file cannot be read.
    #[error("cannot read JWKS file {path}")]
    Read {
        /// Path of the file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The JWKS does not parse.
    #[error("JWKS for issuer {issuer} is invalid: {reason}")]
    Parse {
        /// The issuer.
        issuer: String,
        /// Parser message.
        reason: String,
    },
    /// Neither a file nor a URL was given.
    #[error("issuer {0} needs jwks_file or jwks_url")]
    NoSource(String),
    /// The JWKS URL could not be fetched.
    #[error("cannot fetch JWKS for issuer {issuer} from {url}: {reason}")]
    Fetch {
        /// The issuer.
        issuer: String,
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
}

impl Authenticator {
    /// Builds an authenticator from issuer configurations, reading each JWKS file.
    ///
    /// # Errors
    ///
    /// [`IssuerLoadError`] when a key set cannot be read or parsed.
    pub fn from_config(issuers: &[IssuerConfig]) -> Result<Authenticator, IssuerLoadError> {
        let mut trusted = HashMap::new();
        for config in issuers {
            let text = match (&config.jwks_file, &config.jwks_url) {
                (Some(path), _) => {
                    std::fs::read_to_string(path).map_err(|source| IssuerLoadError::Read {
                        path: path.clone(),
                        source,
                    })?
                }
                (None, Some(url)) => fetch_jwks(&config.issuer, url)?,
                (None, None) => return Err(IssuerLoadError::NoSource(config.issuer.clone())),
            };
            let keys: JwkSet =
                serde_json::from_str(&text).map_err(|error| IssuerLoadError::Parse {
                    issuer: config.issuer.clone(),
                    reason: error.to_string(),
                })?;
            trusted.insert(
                config.issuer.clone(),
                TrustedIssuer {
                    audience: config.audience.clone(),
                    keys,
                },
            );
        }
        Ok(Authenticator {
            issuers: trusted,
            leeway: Duration::from_secs(30),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the configured issuer names.
    pub fn issuer_names(&self) -> Vec<&str> {
        self.issuers.keys().map(String::as_str).collect()
    }

    /// Authenticates the value of an `Authorization` header.
    ///
    /// # Errors
    ///
    /// [`AuthError`] naming the failed check.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let token = authorization
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;

        let digest = *blake3::hash(token.as_bytes()).as_bytes();
        let cached = self
            .verified
            .lock()
            .expect("token cache lock is not poisoned")
            .get(&digest)
            .cloned();
        if let Some(cached) = cached {
            let now = unix_now();
            let leeway = self.leeway.as_secs();
            if now + leeway < cached.not_before || now > cached.expires.saturating_add(leeway) {
                return Err(AuthError::Invalid("token expired or not yet valid".into()));
            }
            return Ok(cached.principal);
        }

        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let unverified_issuer = peek_issuer(token).ok_or(AuthError::Malformed)?;
        let issuer = self
            .issuers
            .get(&unverified_issuer)
            .ok_or(AuthError::UntrustedIssuer)?;

        let jwk = match &header.kid {
            Some(kid) => issuer.keys.find(kid),
            None if issuer.keys.keys.len() == 1 => issuer.keys.keys.first(),
            None => None,
        }
        .ok_or(AuthError::Malformed)?;
        let allowed = [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256];
        if !allowed.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| AuthError::Malformed)?;

        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&unverified_issuer]);
        validation.set_audience(&[&issuer.audience]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // The reason names the failed check only: decoder messages can quote claim values.
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|error| {
            let reason = match error.kind() {
                jsonwebtoken::errors::ErrorKind::Json(_) => "claims do not decode".to_owned(),
                kind => format!("{kind:?}"),
            };
            AuthError::Invalid(reason)
        })?;

        let claims = data.claims;
        let valid_subject = !claims.sub.is_empty()
            && claims.sub.len() <= MAX_SUBJECT_BYTES
            && !claims.sub.chars().any(char::is_control);
        if !valid_subject {
            return Err(AuthError::Invalid(
                "sub claim is empty, too long or has control characters".into(),
            ));
        }
        let mut names = claims.roles;
        names.extend(claims.role);
        let roles: Vec<Role> = names
            .iter()
            .filter_map(|name| Role::from_name(name))
            .collect();
        if roles.is_empty() {
            return Err(AuthError::NoRole);
        }
        let principal = Principal {
            subject: claims.sub,
            issuer: claims.iss,
            roles,
        };
        let mut verified = self
            .verified
            .lock()
            .expect("token cache lock is not poisoned");
        if verified.len() >= MAX_CACHED_TOKENS {
            verified.clear();
        }
        verified.insert(
            digest,
            VerifiedToken {
                principal: principal.clone(),
                not_before: claims.nbf.unwrap_or(0),
                expires: claims.exp,
            },
        );
        Ok(principal)
    }
}

/// Reads the `iss` claim without verifying, only to pick the issuer's keys.
fn peek_issuer(token: &str) -> Option<String> {
    use base64::Engine;

    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("iss")?.as_str().map(str::to_owned)
}

/// Fetches a JWKS over plain HTTP.
// TODO: only http:// URLs are fetched, once at start-up; https needs a TLS client and the
// key set is not refreshed when the issuer rotates keys. Use jwks_file for https issuers.
fn fetch_jwks(issuer: &str, url: &str) -> Result<String, IssuerLoadError> {
    use std::io::{Read, Write};

    let failure = |reason: String| IssuerLoadError::Fetch {
        issuer: issuer.to_owned(),
        url: url.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| failure("only http:// is supported".into()))?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(host, path)| {
            (host, format!("/{path}"))
        });
    let mut stream =
        std::net::TcpStream::connect(authority).map_err(|error| failure(error.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|error| failure(error.to_string()))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|error| failure(error.to_string()))?;
    let mut response = String::new();
    stream
        .take(1 << 20)
        .read_to_string(&mut response)
        .map_err(|error| failure(error.to_string()))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| failure("malformed HTTP response".into()))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(failure(head.lines().next().unwrap_or("").to_owned()));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::dev_issuer::DevIssuer;
    use super::*;

    fn authenticator(issuer: &DevIssuer, dir: &std::path::Path) -> Authenticator {
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, issuer.jwks_json()).unwrap();
        Authenticator::from_config(&[IssuerConfig {
            issuer: dev_issuer::ISSUER.into(),
            audience: dev_issuer::AUDIENCE.into(),
            jwks_file: Some(jwks),
            jwks_url: None,
        }])
        .unwrap()
    }

    #[test]
    fn minted_token_authenticates_with_role() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open_or_create(dir.path()).unwrap();
        let auth = authenticator(&issuer, dir.path());
        let token = issuer
            .mint("dr-ada", &["physician"], Duration::from_secs(60))
            .unwrap();
        let principal = auth.authenticate(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(principal.subject, "dr-ada");
        assert_eq!(principal.roles, vec![Role::Physician]);
    }

    #[test]
    fn expired_token_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open_or_create(dir.path()).unwrap();
        let auth = authenticator(&issuer, dir.path());
        let token = issuer
            .mint_with_times("dr-ada", &["physician"], -600, -300)
            .unwrap();
        let error = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .unwrap_err();
        assert!(matches!(error, AuthError::Invalid(_)), "{error}");
    }

    #[test]
    fn token_from_other_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open_or_create(dir.path()).unwrap();
        let impostor = DevIssuer::open_or_create(other_dir.path()).unwrap();
        let auth = authenticator(&issuer, dir.path());
        let token = impostor
            .mint("dr-ada", &["physician"], Duration::from_secs(60))
            .unwrap();
        assert!(auth.authenticate(Some(&format!("Bearer {token}"))).is_err());
    }

    #[test]
    fn missing_and_garbage_tokens_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open_or_create(dir.path()).unwrap();
        let auth = authenticator(&issuer, dir.path());
        assert!(matches!(auth.authenticate(None), Err(AuthError::Missing)));
        assert!(matches!(
            auth.authenticate(Some("Bearer ")),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            auth.authenticate(Some("Bearer a.b.c")),
            Err(AuthError::Malformed)
        ));
    }

    #[test]
    fn unknown_role_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open_or_create(dir.path()).unwrap();
        let auth = authenticator(&issuer, dir.path());
        let token = issuer
            .mint("x", &["janitor"], Duration::from_secs(60))
            .unwrap();
        let error = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .unwrap_err();
        assert!(matches!(error, AuthError::NoRole), "{error}");
    }
}
