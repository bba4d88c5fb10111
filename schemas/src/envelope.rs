//! The envelope: the exact bytes stored on the log, identical on Kafka and the embedded log.
//!
//! Layout, format version 1 (integers little-endian):
//!
//! | bytes | content |
//! | --- | --- |
//! | 4 | magic `CLEV` |
//! | 1 | format version, 1 |
//! | 4 | header length `h` |
//! | h | postcard [`EventHeader`] |
//! | 4 | ciphertext length `c` |
//! | c | 12-byte nonce followed by the AES-256-GCM-SIV ciphertext and tag of the payload |
//! | 32 | BLAKE3 digest of every byte above |
//! | 64 | Ed25519 signature over every byte above (the digest included) |
//!
//! Invariant: the digest and the signature cover the stored bytes themselves, never a
//! re-encoding, so a verifier needs no serializer that agrees with the writer's.

use crate::event::EventHeader;

/// The four bytes every envelope starts with.
pub const MAGIC: [u8; 4] = *b"CLEV";
/// The envelope format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Length in bytes of the BLAKE3 digest.
pub const DIGEST_LEN: usize = 32;
/// Length in bytes of the Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Upper bound on an envelope's length (16 MiB), far above any FHIR resource a client may send
/// through the API, so a corrupt length field cannot make a reader allocate without bound.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024 * 1024;

/// Error from parsing the layout of an envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Fewer bytes than the layout requires.
    #[error("envelope truncated: {len} bytes, expected at least {expected}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the layout needs.
        expected: usize,
    },
    /// The magic bytes are wrong: this is not an envelope.
    #[error("invalid envelope magic")]
    BadMagic,
    /// An envelope format this build does not know.
    #[error("unsupported envelope format version {0}, expected {FORMAT_VERSION}")]
    UnsupportedFormat(u8),
    /// Bytes after the signature.
    #[error("envelope has {0} trailing bytes after the signature")]
    TrailingBytes(usize),
    /// The header does not decode.
    #[error("envelope header does not decode")]
    BadHeader(#[source] postcard::Error),
    /// The envelope exceeds [`MAX_ENVELOPE_BYTES`].
    #[error("envelope of {0} bytes exceeds the maximum of {MAX_ENVELOPE_BYTES}")]
    TooLarge(usize),
}

/// An envelope as stored: an owned byte buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope(pub Vec<u8>);

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Envelope({} bytes)", self.0.len())
    }
}

/// Envelope whose layout was parsed; the digest and signature are not yet checked.
#[derive(Debug)]
pub struct ParsedEnvelope<'a> {
    /// Decoded clear header.
    pub header: EventHeader,
    /// Nonce followed by ciphertext and tag.
    pub ciphertext: &'a [u8],
    /// The bytes the digest covers.
    pub digested: &'a [u8],
    /// The stored digest.
    pub digest: [u8; DIGEST_LEN],
    /// The bytes the signature covers: `digested` followed by the digest.
    pub signed: &'a [u8],
    /// The stored signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl ParsedEnvelope<'_> {
    /// Returns whether the stored digest equals the BLAKE3 digest of the covered bytes.
    pub fn digest_matches(&self) -> bool {
        blake3::hash(self.digested) == blake3::Hash::from_bytes(self.digest)
    }
}

/// Assembles the bytes an envelope's digest covers. The caller appends the digest with
/// [`finish_digest`] and then the signature.
pub fn encode_unsigned(header: &EventHeader, ciphertext: &[u8]) -> Vec<u8> {
    // postcard cannot fail on the header's plain fields when writing into a Vec.
    let header_bytes =
        postcard::to_allocvec(header).expect("event header serializes with postcard");
    let mut bytes =
        Vec::with_capacity(13 + header_bytes.len() + ciphertext.len() + DIGEST_LEN + SIGNATURE_LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header_bytes);
    bytes.extend_from_slice(&(ciphertext.len() as u32).to_le_bytes());
    bytes.extend_from_slice(ciphertext);
    bytes
}

/// Appends the BLAKE3 digest of `bytes` to them and returns the digest.
pub fn finish_digest(bytes: &mut Vec<u8>) -> [u8; DIGEST_LEN] {
    let digest = *blake3::hash(bytes).as_bytes();
    bytes.extend_from_slice(&digest);
    digest
}

fn read_u32(bytes: &[u8], at: usize) -> Result<usize, EnvelopeError> {
    let field = bytes.get(at..at + 4).ok_or(EnvelopeError::Truncated {
        len: bytes.len(),
        expected: at + 4,
    })?;
    let mut raw = [0u8; 4];
    raw.copy_from_slice(field);
    Ok(u32::from_le_bytes(raw) as usize)
}

impl Envelope {
    /// Parses the layout and decodes the header.
    ///
    /// # Errors
    ///
    /// Any [`EnvelopeError`] when the bytes do not follow the layout.
    pub fn parse(&self) -> Result<ParsedEnvelope<'_>, EnvelopeError> {
        parse(&self.0)
    }
}

/// Parses the layout of envelope bytes and decodes the header.
///
/// # Errors
///
/// Any [`EnvelopeError`] when the bytes do not follow the layout.
pub fn parse(bytes: &[u8]) -> Result<ParsedEnvelope<'_>, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge(bytes.len()));
    }
    if bytes.len() < 5 {
        return Err(EnvelopeError::Truncated {
            len: bytes.len(),
            expected: 5,
        });
    }
    if bytes[..4] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(EnvelopeError::UnsupportedFormat(bytes[4]));
    }

    let header_len = read_u32(bytes, 5)?;
    let header_start: usize = 9;
    let header_end = header_start.saturating_add(header_len);
    let ciphertext_len = read_u32(bytes, header_end)?;
    let ciphertext_start = header_end + 4;
    let digest_start = ciphertext_start.saturating_add(ciphertext_len);
    let signature_start = digest_start.saturating_add(DIGEST_LEN);
    let end = signature_start.saturating_add(SIGNATURE_LEN);
    if bytes.len() < end {
        return Err(EnvelopeError::Truncated {
            len: bytes.len(),
            expected: end,
        });
    }
    if bytes.len() > end {
        return Err(EnvelopeError::TrailingBytes(bytes.len() - end));
    }

    let header: EventHeader =
        postcard::from_bytes(&bytes[header_start..header_end]).map_err(EnvelopeError::BadHeader)?;
    let mut digest = [0u8; DIGEST_LEN];
    digest.copy_from_slice(&bytes[digest_start..signature_start]);
    let mut signature = [0u8; SIGNATURE_LEN];
    signature.copy_from_slice(&bytes[signature_start..end]);
    Ok(ParsedEnvelope {
        header,
        ciphertext: &bytes[ciphertext_start..digest_start],
        digested: &bytes[..digest_start],
        digest,
        signed: &bytes[..signature_start],
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden;

    #[test]
    fn parse_rejects_bad_magic() {
        let mut bytes = golden::sample_envelope_bytes();
        bytes[0] = b'X';
        assert_eq!(parse(&bytes).unwrap_err(), EnvelopeError::BadMagic);
    }

    #[test]
    fn parse_rejects_truncated_envelope() {
        let bytes = golden::sample_envelope_bytes();
        for cut in [0, 3, 8, 20, bytes.len() - 1] {
            let error = parse(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(error, EnvelopeError::Truncated { .. }),
                "cut at {cut}: {error:?}"
            );
        }
    }

    #[test]
    fn parse_rejects_trailing_bytes() {
        let mut bytes = golden::sample_envelope_bytes();
        bytes.push(0);
        assert_eq!(parse(&bytes).unwrap_err(), EnvelopeError::TrailingBytes(1));
    }

    #[test]
    fn digest_detects_flipped_ciphertext_byte() {
        let mut bytes = golden::sample_envelope_bytes();
        let parsed = parse(&bytes).unwrap();
        assert!(
            parsed.digest_matches(),
            "the untouched sample must match its digest"
        );
        let offset = parsed.digested.len() - 1;
        bytes[offset] ^= 0x01;
        assert!(
            !parse(&bytes).unwrap().digest_matches(),
            "flipped byte {offset} went unnoticed"
        );
    }

    #[test]
    fn huge_length_field_is_rejected_without_allocation() {
        let mut bytes = golden::sample_envelope_bytes();
        bytes[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse(&bytes).is_err());
    }
}
