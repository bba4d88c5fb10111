//! The development token issuer: an Ed25519 key in the data directory that mints JWTs for
//! `chartlog token`. It exists so the embedded default runs without an identity provider, and
//! is for development only: anyone who can read the data directory can mint tokens.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use zeroize::Zeroize;

use super::keystore::{load_or_create, KeyStoreError};

/// `iss` of development tokens.
pub const ISSUER: &str = "chartlog-dev";
/// `aud` of development tokens.
pub const AUDIENCE: &str = "chartlog";
/// Key id of the development key in its JWKS.
const KEY_ID: &str = "chartlog-dev-1";

/// The development issuer's key.
pub struct DevIssuer {
    key: ed25519_dalek::SigningKey,
    path: PathBuf,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevIssuer({})", self.path.display())
    }
}

/// Error from minting a token.
#[derive(Debug, thiserror::Error)]
#[error("cannot mint token: {0}")]
pub struct MintError(String);

impl DevIssuer {
    /// Returns the path of the development key file inside a key directory.
    pub fn key_path(key_dir: &Path) -> PathBuf {
        key_dir.join("dev-issuer.key")
    }

    /// Loads the development key from `key_dir`, creating it (owner-only) when absent.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError`] when the key file cannot be read or created.
    pub fn open_or_create(key_dir: &Path) -> Result<DevIssuer, KeyStoreError> {
        let path = Self::key_path(key_dir);
        let (mut seed, _) = load_or_create(&path, true)?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        seed.zeroize();
        Ok(DevIssuer { key, path })
    }

    /// Returns the issuer's JSON Web Key Set, holding its public key only.
    pub fn jwks_json(&self) -> String {
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.key.verifying_key().as_bytes());
        serde_json::json!({
            "keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": KEY_ID, "x": x}]
        })
        .to_string()
    }

    /// Mints a token for `subject` with `roles`, valid from now for `ttl`.
    ///
    /// # Errors
    ///
    /// [`MintError`] when encoding fails.
    pub fn mint(&self, subject: &str, roles: &[&str], ttl: Duration) -> Result<String, MintError> {
        let ttl_seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        self.mint_with_times(subject, roles, 0, ttl_seconds)
    }

    /// Mints a token whose `nbf` and `exp` are offsets in seconds from now (negative for the
    /// past), for tests of expiry and not-before.
    ///
    /// # Errors
    ///
    /// [`MintError`] when encoding fails.
    pub fn mint_with_times(
        &self,
        subject: &str,
        roles: &[&str],
        not_before_offset: i64,
        expires_offset: i64,
    ) -> Result<String, MintError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|error| MintError(error.to_string()))?
            .as_secs() as i64;
        let claims = serde_json::json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "roles": roles,
            "iat": now,
            "nbf": now + not_before_offset,
            "exp": now.saturating_add(expires_offset),
        });
        let pem = self
            .key
            .to_pkcs8_pem(Default::default())
            .map_err(|error| MintError(error.to_string()))?;
        let encoding = jsonwebtoken::EncodingKey::from_ed_pem(pem.as_bytes())
            .map_err(|error| MintError(error.to_string()))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(KEY_ID.to_owned());
        jsonwebtoken::encode(&header, &claims, &encoding)
            .map_err(|error| MintError(error.to_string()))
    }
}
