//! Sealing and opening of envelopes, and every piece of key material.
//!
//! Invariant: this module is the only one that touches key bytes or calls the AES-256-GCM-SIV
//! and Ed25519 primitives. Keys are zeroized when dropped and never appear in `Debug` output,
//! logs or errors. Read [`seal_event`] and [`open_event`] first; [`keystore`] owns the files.

pub mod dev_issuer;
pub mod keystore;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use chartlog_schemas::envelope::{self, EnvelopeError, SIGNATURE_LEN};
use chartlog_schemas::{Envelope, EventHeader, EventPayload, PayloadError, SignerId};
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use rand::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

pub use keystore::{KeySource, KeyStore, KeyStoreError};

/// Length in bytes of an AES-GCM-SIV nonce.
const NONCE_LEN: usize = 12;

/// A 256-bit symmetric key: a chart's data key or the key-encryption key. Zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SymmetricKey([u8; 32]);

impl SymmetricKey {
    /// Generates a key from the operating system's random source.
    pub fn generate() -> SymmetricKey {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        SymmetricKey(bytes)
    }

    /// Wraps raw key bytes. The caller zeroizes its own copy.
    pub fn from_bytes(bytes: [u8; 32]) -> SymmetricKey {
        SymmetricKey(bytes)
    }

    fn cipher(&self) -> Aes256GcmSiv {
        Aes256GcmSiv::new((&self.0).into())
    }
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

/// Error from sealing, opening or verifying.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Authenticated decryption failed: wrong key, altered ciphertext or altered binding data.
    #[error("decryption failed")]
    Decryption,
    /// A ciphertext is shorter than its nonce.
    #[error("ciphertext of {0} bytes is shorter than its nonce")]
    ShortCiphertext(usize),
    /// The envelope's layout is invalid.
    #[error("invalid envelope layout")]
    Layout(#[from] EnvelopeError),
    /// The stored digest does not match the envelope's bytes.
    #[error("digest mismatch")]
    DigestMismatch,
    /// The envelope was signed by a key that is not trusted.
    #[error("unknown signer {0}")]
    UnknownSigner(SignerId),
    /// The signature does not verify under the signer's public key.
    #[error("invalid signature by signer {0}")]
    BadSignature(SignerId),
    /// The decrypted payload does not decode.
    #[error("payload does not decode")]
    Payload(#[from] PayloadError),
}

/// Encrypts `plaintext` under `key` with a fresh random nonce, binding `associated_data`.
/// Returns the nonce followed by the ciphertext and tag.
pub fn encrypt(key: &SymmetricKey, plaintext: &[u8], associated_data: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let sealed = key
        .cipher()
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: associated_data,
            },
        )
        // AES-GCM-SIV encryption only fails for plaintexts over 2^36 bytes; envelopes are
        // bounded far below that by MAX_ENVELOPE_BYTES.
        .expect("plaintext is below the AES-GCM-SIV length limit");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Decrypts what [`encrypt`] produced.
///
/// # Errors
///
/// [`CryptoError::ShortCiphertext`] or [`CryptoError::Decryption`].
pub fn decrypt(
    key: &SymmetricKey,
    sealed: &[u8],
    associated_data: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN {
        return Err(CryptoError::ShortCiphertext(sealed.len()));
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    key.cipher()
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: associated_data,
            },
        )
        .map_err(|_| CryptoError::Decryption)
}

/// Returns the data bound to an event's ciphertext: its event id and chart id, so a
/// ciphertext moved into another envelope fails to decrypt even before signatures are checked.
fn payload_binding(header: &EventHeader) -> [u8; 32] {
    let mut binding = [0u8; 32];
    binding[..16].copy_from_slice(header.event_id.as_bytes());
    binding[16..].copy_from_slice(header.chart_id.as_bytes());
    binding
}

/// A node's Ed25519 signing key.
pub struct NodeSigner {
    key: ed25519_dalek::SigningKey,
    id: SignerId,
}

impl NodeSigner {
    /// Builds a signer from a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> NodeSigner {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let id = SignerId::from_public_key(key.verifying_key().as_bytes());
        NodeSigner { key, id }
    }

    /// Returns the id derived from the public key.
    pub fn id(&self) -> SignerId {
        self.id
    }

    /// Returns the 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeSigner({})", self.id)
    }
}

/// The public keys whose signatures a reader accepts.
#[derive(Clone, Default, Debug)]
pub struct TrustedSigners {
    keys: std::collections::HashMap<SignerId, VerifyingKey>,
}

impl TrustedSigners {
    /// Adds a 32-byte Ed25519 public key. Returns `None` when the bytes are not a valid key.
    pub fn add(&mut self, public_key: &[u8; 32]) -> Option<SignerId> {
        let key = VerifyingKey::from_bytes(public_key).ok()?;
        let id = SignerId::from_public_key(public_key);
        self.keys.insert(id, key);
        Some(id)
    }

    /// Returns whether a public key is trusted.
    pub fn contains(&self, public_key: &[u8; 32]) -> bool {
        self.keys
            .contains_key(&SignerId::from_public_key(public_key))
    }

    /// Returns the number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Returns whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Seals one event: encrypts the payload under the chart's data key, then appends the digest
/// and the node's signature. `header.key_id` and `header.signer` must already name `data_key`
/// and `signer`.
pub fn seal_event(
    header: &EventHeader,
    payload: &EventPayload,
    data_key: &SymmetricKey,
    signer: &NodeSigner,
) -> Envelope {
    debug_assert_eq!(
        header.signer, signer.id,
        "header names the sealing node's key"
    );
    let mut plaintext = payload.encode();
    let ciphertext = encrypt(data_key, &plaintext, &payload_binding(header));
    plaintext.zeroize();
    let mut bytes = envelope::encode_unsigned(header, &ciphertext);
    envelope::finish_digest(&mut bytes);
    let signature = signer.key.sign(&bytes);
    bytes.extend_from_slice(&signature.to_bytes());
    Envelope(bytes)
}

/// Result of checking an envelope's integrity without decrypting it.
pub struct CheckedEnvelope<'a> {
    /// The parsed envelope.
    pub parsed: envelope::ParsedEnvelope<'a>,
}

/// Checks an envelope's layout, digest and signature.
///
/// # Errors
///
/// [`CryptoError::Layout`], [`CryptoError::DigestMismatch`], [`CryptoError::UnknownSigner`] or
/// [`CryptoError::BadSignature`].
pub fn check_envelope<'a>(
    bytes: &'a [u8],
    signers: &TrustedSigners,
) -> Result<CheckedEnvelope<'a>, CryptoError> {
    let parsed = envelope::parse(bytes)?;
    if !parsed.digest_matches() {
        return Err(CryptoError::DigestMismatch);
    }
    let signer = parsed.header.signer;
    let key = signers
        .keys
        .get(&signer)
        .ok_or(CryptoError::UnknownSigner(signer))?;
    let signature = Signature::from_bytes(&parsed.signature);
    debug_assert_eq!(parsed.signature.len(), SIGNATURE_LEN);
    key.verify(parsed.signed, &signature)
        .map_err(|_| CryptoError::BadSignature(signer))?;
    Ok(CheckedEnvelope { parsed })
}

/// Checks an envelope's layout and digest, but not its signature. For envelopes read back from
/// this node's own projection, whose signatures were checked when they were projected; the
/// AES-GCM-SIV tag still authenticates the payload when it is opened, so content that was not
/// sealed under the chart's data key cannot pass.
///
/// # Errors
///
/// [`CryptoError::Layout`] or [`CryptoError::DigestMismatch`].
pub fn check_stored_envelope(bytes: &[u8]) -> Result<CheckedEnvelope<'_>, CryptoError> {
    let parsed = envelope::parse(bytes)?;
    if !parsed.digest_matches() {
        return Err(CryptoError::DigestMismatch);
    }
    Ok(CheckedEnvelope { parsed })
}

/// Most envelopes [`RecentlySealed`] remembers at once.
const RECENTLY_SEALED_LIMIT: usize = 1 << 16;

/// Hashes of the envelopes this node's writer sealed and is appending, so that its projector
/// recognises them when it reads them back and skips a second signature check: bytes equal to
/// the ones this node signed carry its valid signature. Bytes that differ in one bit hash
/// differently and are checked in full. Bounded: with [`RECENTLY_SEALED_LIMIT`] entries held,
/// nothing more is added until the projector has taken some.
#[derive(Default)]
pub struct RecentlySealed {
    hashes: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
}

impl RecentlySealed {
    /// Remembers envelopes about to be appended.
    pub fn record<'a>(&self, envelopes: impl IntoIterator<Item = &'a Envelope>) {
        let mut hashes = self
            .hashes
            .lock()
            .expect("sealed hashes lock is not poisoned");
        for envelope in envelopes {
            if hashes.len() >= RECENTLY_SEALED_LIMIT {
                break;
            }
            hashes.insert(*blake3::hash(&envelope.0).as_bytes());
        }
    }

    /// Forgets envelopes whose append failed.
    pub fn forget<'a>(&self, envelopes: impl IntoIterator<Item = &'a Envelope>) {
        let mut hashes = self
            .hashes
            .lock()
            .expect("sealed hashes lock is not poisoned");
        for envelope in envelopes {
            hashes.remove(blake3::hash(&envelope.0).as_bytes());
        }
    }

    /// Returns whether `bytes` are exactly an envelope this node sealed, and removes it.
    pub fn take(&self, bytes: &[u8]) -> bool {
        let hash = blake3::hash(bytes);
        self.hashes
            .lock()
            .expect("sealed hashes lock is not poisoned")
            .remove(hash.as_bytes())
    }
}

/// Decrypts and decodes the payload of a checked envelope with the chart's data key.
///
/// # Errors
///
/// [`CryptoError::Decryption`] or [`CryptoError::Payload`].
pub fn open_payload(
    checked: &CheckedEnvelope<'_>,
    data_key: &SymmetricKey,
) -> Result<EventPayload, CryptoError> {
    let header = &checked.parsed.header;
    let mut plaintext = decrypt(
        data_key,
        checked.parsed.ciphertext,
        &payload_binding(header),
    )?;
    let decoded = EventPayload::decode(header.event_type, header.schema_version, &plaintext);
    plaintext.zeroize();
    Ok(decoded?)
}

#[cfg(test)]
mod tests {
    use chartlog_schemas::golden;
    use chartlog_schemas::ChartId;

    use super::*;

    #[test]
    fn sealed_bytes_match_exactly() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let sealed = RecentlySealed::default();
        sealed.record([&envelope]);
        let mut altered = envelope.0.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(
            !sealed.take(&altered),
            "an altered signature passed as this node's own"
        );
        assert!(sealed.take(&envelope.0));
        assert!(!sealed.take(&envelope.0), "an envelope was taken twice");
        sealed.record([&envelope]);
        sealed.forget([&envelope]);
        assert!(
            !sealed.take(&envelope.0),
            "a forgotten envelope was remembered"
        );
    }

    fn sample() -> (EventHeader, EventPayload, SymmetricKey, NodeSigner) {
        let signer = NodeSigner::from_seed(&[7u8; 32]);
        let mut header = golden::sample_header();
        header.signer = signer.id();
        let payload = golden::sample_payloads().remove(1).1;
        // The golden header keeps the version it was written with; a sealed payload is encoded
        // at its current version.
        header.schema_version = payload.event_type().current_schema_version();
        (header, payload, SymmetricKey::from_bytes([9u8; 32]), signer)
    }

    fn trusted(signer: &NodeSigner) -> TrustedSigners {
        let mut signers = TrustedSigners::default();
        signers.add(&signer.public_key()).unwrap();
        signers
    }

    #[test]
    fn sealed_event_opens_to_same_payload() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let checked = check_envelope(&envelope.0, &trusted(&signer)).unwrap();
        assert_eq!(checked.parsed.header, header);
        assert!(open_payload(&checked, &key).unwrap() == payload);
    }

    #[test]
    fn ciphertext_hides_payload_text() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let needle = b"Observation\",\"id\"";
        assert!(!envelope
            .0
            .windows(needle.len())
            .any(|window| window == needle));
    }

    #[test]
    fn flipped_byte_anywhere_is_detected() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let signers = trusted(&signer);
        for offset in 0..envelope.0.len() {
            let mut bytes = envelope.0.clone();
            bytes[offset] ^= 0x40;
            let outcome = check_envelope(&bytes, &signers).and_then(|c| open_payload(&c, &key));
            assert!(
                outcome.is_err(),
                "flipped byte {offset} of {} went unnoticed",
                bytes.len()
            );
        }
    }

    #[test]
    fn signature_byte_flip_is_bad_signature() {
        let (header, payload, key, signer) = sample();
        let mut bytes = seal_event(&header, &payload, &key, &signer).0;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let error = check_envelope(&bytes, &trusted(&signer)).err().unwrap();
        assert!(matches!(error, CryptoError::BadSignature(_)), "{error:?}");
    }

    #[test]
    fn resealed_digest_without_key_is_bad_signature() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let parsed = envelope::parse(&envelope.0).unwrap();
        // An attacker rewrites the chart id and recomputes the digest but cannot sign.
        let mut forged_header = parsed.header.clone();
        forged_header.chart_id = ChartId::random();
        let mut bytes = envelope::encode_unsigned(&forged_header, parsed.ciphertext);
        envelope::finish_digest(&mut bytes);
        bytes.extend_from_slice(&parsed.signature);
        let error = check_envelope(&bytes, &trusted(&signer)).err().unwrap();
        assert!(matches!(error, CryptoError::BadSignature(_)), "{error:?}");
    }

    #[test]
    fn unknown_signer_is_rejected() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let other = NodeSigner::from_seed(&[8u8; 32]);
        let error = check_envelope(&envelope.0, &trusted(&other)).err().unwrap();
        assert!(matches!(error, CryptoError::UnknownSigner(_)), "{error:?}");
    }

    #[test]
    fn wrong_data_key_fails_decryption() {
        let (header, payload, key, signer) = sample();
        let envelope = seal_event(&header, &payload, &key, &signer);
        let checked = check_envelope(&envelope.0, &trusted(&signer)).unwrap();
        let other = SymmetricKey::from_bytes([1u8; 32]);
        assert!(matches!(
            open_payload(&checked, &other),
            Err(CryptoError::Decryption)
        ));
    }

    #[test]
    fn aes_gcm_siv_known_answer() {
        // RFC 8452, appendix C.2, first AEAD_AES_256_GCM_SIV vector: empty plaintext and AAD.
        let key = SymmetricKey::from_bytes(
            hex::decode("0100000000000000000000000000000000000000000000000000000000000000")
                .unwrap()
                .try_into()
                .unwrap(),
        );
        let nonce = hex::decode("030000000000000000000000").unwrap();
        let tag = key
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: b"", aad: b"" })
            .unwrap();
        assert_eq!(hex::encode(tag), "07f5f4169bbf55a8400cd47ea6fd400f");
    }
}
