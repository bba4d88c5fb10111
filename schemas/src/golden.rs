//! Golden encodings: one fixed sample of every event type and of the envelope layout, whose
//! bytes are checked in under `schemas/golden/` and must decode to the same values forever.
//!
//! A change to a payload struct, the header or the envelope layout that alters these bytes
//! fails the tests below. Such a change needs a new schema or format version, never an edit of
//! an old one. To write the files for a newly added sample, run the tests with
//! `CHARTLOG_BLESS_GOLDEN=1`; existing files are never overwritten.

use uuid::Uuid;

use crate::envelope::{encode_unsigned, finish_digest, SIGNATURE_LEN};
use crate::event::{
    AccessedResource, ChartAccessed, ChartKind, ChartOpened, EventHeader, EventPayload, EventType,
    HlcTimestamp, ResourceRecorded, ResourceRetracted,
};
use crate::ids::{ChartId, CommandId, EventId, EventSeq, KeyId, SignerId};

/// Returns the fixed sample payload of each event type, named as its golden file.
pub fn sample_payloads() -> Vec<(&'static str, EventPayload)> {
    vec![
        (
            "chart-opened-v1",
            EventPayload::ChartOpened(ChartOpened {
                kind: ChartKind::Patient,
                patient_id: "3f2b8c1e".into(),
            }),
        ),
        (
            "resource-recorded-v2",
            EventPayload::ResourceRecorded(ResourceRecorded {
                resource_type: "Observation".into(),
                resource_id: "obs-1".into(),
                version: 2,
                resource_json:
                    r#"{"resourceType":"Observation","id":"obs-1","valueQuantity":{"value":1.50}}"#
                        .into(),
                command_fingerprint: Some([0x3c; 32]),
            }),
        ),
        (
            "resource-retracted-v2",
            EventPayload::ResourceRetracted(ResourceRetracted {
                resource_type: "Condition".into(),
                resource_id: "cond-7".into(),
                version: 3,
                command_fingerprint: None,
            }),
        ),
        (
            "chart-accessed-v2",
            EventPayload::ChartAccessed(ChartAccessed {
                interaction: "read".into(),
                resources: vec![AccessedResource {
                    resource_type: "Condition".into(),
                    resource_id: "cond-7".into(),
                    version: None,
                }],
                client_address: "10.0.0.8:41000".into(),
                served_at_micros: Some(1_764_806_400_000_000),
            }),
        ),
    ]
}

/// Returns the samples of schema versions no longer written: each golden file's name, its
/// version, and the value it must decode to once upcast to the current version.
pub fn retired_samples() -> Vec<(&'static str, u16, EventPayload)> {
    vec![
        (
            "chart-accessed-v1",
            1,
            EventPayload::ChartAccessed(ChartAccessed {
                interaction: "vread".into(),
                resources: vec![AccessedResource {
                    resource_type: "Observation".into(),
                    resource_id: "obs-1".into(),
                    version: Some(2),
                }],
                client_address: "127.0.0.1:50000".into(),
                served_at_micros: None,
            }),
        ),
        (
            "resource-recorded-v1",
            1,
            EventPayload::ResourceRecorded(ResourceRecorded {
                resource_type: "Observation".into(),
                resource_id: "obs-1".into(),
                version: 2,
                resource_json:
                    r#"{"resourceType":"Observation","id":"obs-1","valueQuantity":{"value":1.50}}"#
                        .into(),
                command_fingerprint: None,
            }),
        ),
        (
            "resource-retracted-v1",
            1,
            EventPayload::ResourceRetracted(ResourceRetracted {
                resource_type: "Condition".into(),
                resource_id: "cond-7".into(),
                version: 3,
                command_fingerprint: None,
            }),
        ),
    ]
}

/// Returns the fixed sample header used in the golden envelope.
pub fn sample_header() -> EventHeader {
    EventHeader {
        event_id: EventId(Uuid::from_u128(0x0191_0000_0000_4000_8000_0000_0000_00aa)),
        chart_id: ChartId(Uuid::from_u128(0x0191_0000_0000_4000_8000_0000_0000_00bb)),
        seq: EventSeq(7),
        event_type: EventType::ResourceRecorded,
        schema_version: 1,
        recorded_at: HlcTimestamp {
            wall_micros: 1_764_806_400_000_000,
            logical: 3,
        },
        actor: "physician-17".into(),
        purpose_of_use: "TREAT".into(),
        key_id: KeyId(Uuid::from_u128(0x0191_0000_0000_4000_8000_0000_0000_00cc)),
        signer: SignerId([1, 2, 3, 4, 5, 6, 7, 8]),
        prev_digest: [0x5a; 32],
        command_id: Some(CommandId(Uuid::from_u128(
            0x0191_0000_0000_4000_8000_0000_0000_00dd,
        ))),
    }
}

/// Returns the bytes of a sample envelope: the sample header, a fixed stand-in ciphertext, a
/// real digest and a fixed stand-in signature (this crate does not sign).
pub fn sample_envelope_bytes() -> Vec<u8> {
    let ciphertext: Vec<u8> = (0u8..48).collect();
    let mut bytes = encode_unsigned(&sample_header(), &ciphertext);
    finish_digest(&mut bytes);
    bytes.extend_from_slice(&[0xee; SIGNATURE_LEN]);
    bytes
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::envelope;

    fn golden_path(name: &str) -> PathBuf {
        // Cargo sets the variable when it runs the test too. The run's value names the checkout
        // under test; the compiled-in one names where the binary was built, which differs when
        // a shared target directory serves several checkouts.
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
            .join("golden")
            .join(format!("{name}.hex"))
    }

    /// Reads a golden file, or writes it first when blessing is requested and it is absent.
    fn golden_bytes(name: &str, fresh: &[u8]) -> Vec<u8> {
        let path = golden_path(name);
        if !path.exists() && std::env::var_os("CHARTLOG_BLESS_GOLDEN").is_some() {
            std::fs::write(&path, format!("{}\n", hex::encode(fresh))).unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("golden file {} unreadable: {error}", path.display()));
        hex::decode(text.trim()).unwrap()
    }

    #[test]
    fn golden_payloads_decode_to_samples() {
        for (name, sample) in sample_payloads() {
            let golden = golden_bytes(name, &sample.encode());
            let event_type = sample.event_type();
            let decoded =
                EventPayload::decode(event_type, event_type.current_schema_version(), &golden)
                    .unwrap_or_else(|error| panic!("golden {name} no longer decodes: {error}"));
            assert!(
                decoded == sample,
                "golden {name} decodes to a different value"
            );
        }
    }

    #[test]
    fn samples_encode_to_golden_bytes() {
        for (name, sample) in sample_payloads() {
            let golden = golden_bytes(name, &sample.encode());
            assert_eq!(
                hex::encode(sample.encode()),
                hex::encode(golden),
                "encoding of {name} changed; add a schema version instead"
            );
        }
    }

    #[test]
    fn retired_versions_decode_upcast() {
        for (name, version, expected) in retired_samples() {
            let path = golden_path(name);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
                panic!("golden file {} unreadable: {error}", path.display())
            });
            let golden = hex::decode(text.trim()).unwrap();
            let decoded = EventPayload::decode(expected.event_type(), version, &golden)
                .unwrap_or_else(|error| panic!("golden {name} no longer decodes: {error}"));
            assert!(
                decoded == expected,
                "golden {name} decodes to a different value"
            );
        }
    }

    #[test]
    fn golden_envelope_parses_to_sample_header() {
        let fresh = sample_envelope_bytes();
        let golden = golden_bytes("envelope-v1", &fresh);
        let parsed = envelope::parse(&golden).expect("golden envelope no longer parses");
        assert_eq!(parsed.header, sample_header());
        assert!(
            parsed.digest_matches(),
            "golden envelope digest no longer matches"
        );
        assert_eq!(parsed.ciphertext, (0u8..48).collect::<Vec<_>>().as_slice());
        assert_eq!(
            hex::encode(&fresh),
            hex::encode(&golden),
            "envelope layout changed"
        );
    }
}
