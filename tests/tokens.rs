//! Bearer tokens signed with ES256 and RS256 by an issuer configured through a JWKS file, next
//! to the development issuer's EdDSA: each is accepted with the right key, audience and issuer,
//! and rejected otherwise.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use chartlog::auth::{AuthError, Authenticator, IssuerConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey as _;
use rsa::traits::PublicKeyParts;

const ISSUER: &str = "https://idp.hospital.test";
const AUDIENCE: &str = "chartlog-api";

fn claims(audience: &str) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({"iss": ISSUER, "aud": audience, "sub": "svc-lab", "roles": ["nurse"], "exp": now + 300, "nbf": now - 5})
}

fn authenticator(dir: &std::path::Path, jwks: serde_json::Value) -> Authenticator {
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    Authenticator::from_config(&[IssuerConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks_file: Some(path),
        jwks_url: None,
    }])
    .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn es256_token_from_jwks_file_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let mut jwk: serde_json::Value =
        serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
    jwk["kid"] = "ec-1".into();
    jwk["alg"] = "ES256".into();
    let auth = authenticator(dir.path(), serde_json::json!({"keys": [jwk]}));
    let pem = secret.to_pkcs8_pem(Default::default()).unwrap();
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec-1".into());

    let token = jsonwebtoken::encode(&header, &claims(AUDIENCE), &key).unwrap();
    let principal = auth.authenticate(Some(&bearer(&token))).unwrap();
    assert_eq!(principal.subject, "svc-lab");

    let wrong_audience = jsonwebtoken::encode(&header, &claims("another-api"), &key).unwrap();
    let error = auth
        .authenticate(Some(&bearer(&wrong_audience)))
        .unwrap_err();
    assert!(matches!(error, AuthError::Invalid(_)), "{error}");
}

#[test]
fn rs256_token_from_jwks_file_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let secret = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let encode = |bytes: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let public = secret.to_public_key();
    let jwk = serde_json::json!({
        "kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig",
        "n": encode(public.n().to_bytes_be()), "e": encode(public.e().to_bytes_be()),
    });
    let auth = authenticator(dir.path(), serde_json::json!({"keys": [jwk]}));
    let pem = secret.to_pkcs8_pem(Default::default()).unwrap();
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());

    let token = jsonwebtoken::encode(&header, &claims(AUDIENCE), &key).unwrap();
    assert!(auth.authenticate(Some(&bearer(&token))).is_ok());

    // The same claims under an HMAC key made from the public modulus must not pass.
    let mut forged_header = Header::new(Algorithm::HS256);
    forged_header.kid = Some("rsa-1".into());
    let hmac = EncodingKey::from_secret(&public.n().to_bytes_be());
    let forged = jsonwebtoken::encode(&forged_header, &claims(AUDIENCE), &hmac).unwrap();
    assert!(
        auth.authenticate(Some(&bearer(&forged))).is_err(),
        "an HS256 token was accepted"
    );
}

#[test]
fn unsigned_token_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let mut jwk: serde_json::Value =
        serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
    jwk["kid"] = "ec-1".into();
    let auth = authenticator(dir.path(), serde_json::json!({"keys": [jwk]}));
    let encode = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
    let token = format!(
        "{}.{}.",
        encode(r#"{"alg":"none","kid":"ec-1"}"#),
        encode(&claims(AUDIENCE).to_string())
    );
    assert!(
        auth.authenticate(Some(&bearer(&token))).is_err(),
        "an unsigned token was accepted"
    );
}
