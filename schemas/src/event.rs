//! The clear event header and the versioned payloads that are encrypted inside an envelope.
//!
//! Invariant: the header holds no health data, only random ids, counters, the actor's subject
//! id, the purpose of use and a timestamp. Everything about the patient is in a payload.
//! A payload type never changes shape once released: a new shape is a new schema version, and
//! older versions are upcast when decoded (see [`EventPayload::decode`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{ChartId, CommandId, EventId, EventSeq, KeyId, SignerId};

/// Kind of event, stored in the clear header so a reader can pick the payload decoder.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum EventType {
    /// A chart was created: the first event of every chart.
    ChartOpened,
    /// A FHIR resource was created or updated; the payload contains the new version.
    ResourceRecorded,
    /// A FHIR resource was deleted. Its earlier versions stay in the log and in history.
    ResourceRetracted,
    /// Health data of the chart was read by someone.
    ChartAccessed,
}

impl EventType {
    /// Returns the current schema version written for this event type.
    pub fn current_schema_version(self) -> u16 {
        match self {
            EventType::ChartOpened => 1,
            EventType::ResourceRecorded => 2,
            EventType::ResourceRetracted => 2,
            EventType::ChartAccessed => 2,
        }
    }

    /// Returns the event type's name as it appears in reports and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ChartOpened => "chart-opened",
            EventType::ResourceRecorded => "resource-recorded",
            EventType::ResourceRetracted => "resource-retracted",
            EventType::ChartAccessed => "chart-accessed",
        }
    }
}

/// Hybrid logical clock reading: wall-clock microseconds since the Unix epoch (UTC) plus a
/// counter that orders events sharing one microsecond, so time never goes backwards in a chart.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct HlcTimestamp {
    /// Microseconds since 1970-01-01T00:00:00Z.
    pub wall_micros: i64,
    /// Tie-breaker among events with the same `wall_micros`.
    pub logical: u32,
}

impl HlcTimestamp {
    /// Returns the smallest timestamp that is later than `self` and not earlier than
    /// `wall_micros`, the reading of the local clock.
    pub fn advance(self, wall_micros: i64) -> HlcTimestamp {
        if wall_micros > self.wall_micros {
            HlcTimestamp {
                wall_micros,
                logical: 0,
            }
        } else {
            HlcTimestamp {
                wall_micros: self.wall_micros,
                logical: self.logical.saturating_add(1),
            }
        }
    }
}

/// The clear part of an event. It is hashed and signed with the ciphertext but never encrypted.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EventHeader {
    /// Unique id of this event.
    pub event_id: EventId,
    /// Chart whose stream this event extends.
    pub chart_id: ChartId,
    /// Position in the chart's stream, starting at 1.
    pub seq: EventSeq,
    /// Kind of payload.
    pub event_type: EventType,
    /// Version of the payload's schema for `event_type`.
    pub schema_version: u16,
    /// When the event was recorded, from the writer's hybrid logical clock.
    pub recorded_at: HlcTimestamp,
    /// Subject id of the authenticated user or service that caused the event.
    pub actor: String,
    /// Purpose of use code (HL7 v3 PurposeOfUse, for example `TREAT`).
    pub purpose_of_use: String,
    /// Id of the chart data key that encrypted the payload.
    pub key_id: KeyId,
    /// Id of the node key that signed the envelope.
    pub signer: SignerId,
    /// Digest of the chart's previous event, or all zeros for the first event.
    pub prev_digest: [u8; 32],
    /// Client-supplied command id, when the command carried one, for exactly-once effect.
    pub command_id: Option<CommandId>,
}

/// Kind of chart.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ChartKind {
    /// One patient's compartment: the Patient resource and everything that refers to it.
    Patient,
    /// Resources outside every patient compartment, shared by all charts.
    Directory,
}

/// Payload of the first event of a chart.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChartOpened {
    /// Whether this is a patient's chart or the shared directory.
    pub kind: ChartKind,
    /// The server-assigned id of the chart's Patient resource; empty for the directory.
    pub patient_id: String,
}

/// Payload of a create or update: the complete new version of one FHIR resource.
///
/// Version 2 added `command_fingerprint`; version 1 events decode with it empty.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecorded {
    /// FHIR resource type, for example `Observation`.
    pub resource_type: String,
    /// Server-assigned logical id.
    pub resource_id: String,
    /// Version number of this version, starting at 1 and counting deletes.
    pub version: u64,
    /// The resource as FHIR R4 JSON, exactly as served (meta.versionId and meta.lastUpdated
    /// included). Stored as text so decimals and element order survive unchanged.
    pub resource_json: String,
    /// Digest of the request, for a command sent with a command id: a later request with the
    /// same id and another digest is refused, also after the writer rebuilt its state.
    pub command_fingerprint: Option<[u8; 32]>,
}

/// Payload of a delete.
///
/// Version 2 added `command_fingerprint`; version 1 events decode with it empty.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRetracted {
    /// FHIR resource type.
    pub resource_type: String,
    /// Logical id of the deleted resource.
    pub resource_id: String,
    /// Version number the delete takes; reads of this version return 410 Gone.
    pub version: u64,
    /// Digest of the request, as in [`ResourceRecorded::command_fingerprint`].
    pub command_fingerprint: Option<[u8; 32]>,
}

/// [`ResourceRecorded`] as schema version 1 wrote it.
#[derive(Deserialize)]
struct ResourceRecordedV1 {
    resource_type: String,
    resource_id: String,
    version: u64,
    resource_json: String,
}

impl From<ResourceRecordedV1> for ResourceRecorded {
    fn from(old: ResourceRecordedV1) -> ResourceRecorded {
        ResourceRecorded {
            resource_type: old.resource_type,
            resource_id: old.resource_id,
            version: old.version,
            resource_json: old.resource_json,
            command_fingerprint: None,
        }
    }
}

/// [`ResourceRetracted`] as schema version 1 wrote it.
#[derive(Deserialize)]
struct ResourceRetractedV1 {
    resource_type: String,
    resource_id: String,
    version: u64,
}

impl From<ResourceRetractedV1> for ResourceRetracted {
    fn from(old: ResourceRetractedV1) -> ResourceRetracted {
        ResourceRetracted {
            resource_type: old.resource_type,
            resource_id: old.resource_id,
            version: old.version,
            command_fingerprint: None,
        }
    }
}

/// One resource named in an access event.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessedResource {
    /// FHIR resource type.
    pub resource_type: String,
    /// Logical id.
    pub resource_id: String,
    /// Version read, when the interaction was a version read.
    pub version: Option<u64>,
}

/// Payload of a read of health data: who read (header), what, how and from where.
///
/// Version 2 added `served_at_micros`; version 1 events decode with it empty.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChartAccessed {
    /// FHIR interaction: `read`, `vread`, `history`, `search` or `everything`.
    pub interaction: String,
    /// The resources whose content left the server.
    pub resources: Vec<AccessedResource>,
    /// Network address of the client, as the server saw it.
    pub client_address: String,
    /// When the data left the server, in microseconds since the Unix epoch, for a read served
    /// while the log was unreachable: its access waited in the node's access journal and was
    /// recorded later. Empty when the event was recorded before the data left.
    pub served_at_micros: Option<i64>,
}

/// [`ChartAccessed`] as schema version 1 wrote it.
#[derive(Deserialize)]
struct ChartAccessedV1 {
    interaction: String,
    resources: Vec<AccessedResource>,
    client_address: String,
}

impl From<ChartAccessedV1> for ChartAccessed {
    fn from(old: ChartAccessedV1) -> ChartAccessed {
        ChartAccessed {
            interaction: old.interaction,
            resources: old.resources,
            client_address: old.client_address,
            served_at_micros: None,
        }
    }
}

/// A decoded payload of any event type, at its current schema version.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventPayload {
    /// See [`ChartOpened`].
    ChartOpened(ChartOpened),
    /// See [`ResourceRecorded`].
    ResourceRecorded(ResourceRecorded),
    /// See [`ResourceRetracted`].
    ResourceRetracted(ResourceRetracted),
    /// See [`ChartAccessed`].
    ChartAccessed(ChartAccessed),
}

// Payloads hold health data, so their Debug output is a marker that names the type only.
macro_rules! redacted_debug {
    ($($name:ident),*) => {
        $(impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted>)"))
            }
        })*
    };
}
redacted_debug!(
    ChartOpened,
    ResourceRecorded,
    ResourceRetracted,
    ChartAccessed,
    EventPayload
);

/// Error from decoding a payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The header names a schema version this build cannot read.
    #[error("unsupported schema version {version} for event type {event_type}")]
    UnsupportedVersion {
        /// Event type from the header.
        event_type: &'static str,
        /// Schema version from the header.
        version: u16,
    },
    /// The bytes do not decode as the payload type the header names.
    #[error("payload does not decode as {event_type} version {version}")]
    Malformed {
        /// Event type from the header.
        event_type: &'static str,
        /// Schema version from the header.
        version: u16,
        /// Decoder error.
        #[source]
        source: postcard::Error,
    },
}

impl EventPayload {
    /// Returns the event type of this payload.
    pub fn event_type(&self) -> EventType {
        match self {
            EventPayload::ChartOpened(_) => EventType::ChartOpened,
            EventPayload::ResourceRecorded(_) => EventType::ResourceRecorded,
            EventPayload::ResourceRetracted(_) => EventType::ResourceRetracted,
            EventPayload::ChartAccessed(_) => EventType::ChartAccessed,
        }
    }

    /// Encodes the payload with postcard at its type's current schema version.
    pub fn encode(&self) -> Vec<u8> {
        let encoded = match self {
            EventPayload::ChartOpened(payload) => postcard::to_allocvec(payload),
            EventPayload::ResourceRecorded(payload) => postcard::to_allocvec(payload),
            EventPayload::ResourceRetracted(payload) => postcard::to_allocvec(payload),
            EventPayload::ChartAccessed(payload) => postcard::to_allocvec(payload),
        };
        // postcard only fails to serialize into a fixed buffer or for unsupported serde
        // features; these plain structs into a growable Vec cannot hit either.
        encoded.expect("payload structs serialize with postcard into a Vec")
    }

    /// Decodes the plaintext of a payload given the type and schema version from its header.
    ///
    /// # Errors
    ///
    /// [`PayloadError::UnsupportedVersion`] for a version this build does not know, and
    /// [`PayloadError::Malformed`] for bytes that do not decode.
    pub fn decode(event_type: EventType, version: u16, bytes: &[u8]) -> Result<Self, PayloadError> {
        let name = event_type.as_str();
        let malformed = |source| PayloadError::Malformed {
            event_type: name,
            version,
            source,
        };
        // Older versions decode with their own struct and are upcast; they are never rewritten.
        match (event_type, version) {
            (EventType::ChartAccessed, 1) => {
                let old: ChartAccessedV1 = postcard::from_bytes(bytes).map_err(malformed)?;
                return Ok(EventPayload::ChartAccessed(old.into()));
            }
            (EventType::ResourceRecorded, 1) => {
                let old: ResourceRecordedV1 = postcard::from_bytes(bytes).map_err(malformed)?;
                return Ok(EventPayload::ResourceRecorded(old.into()));
            }
            (EventType::ResourceRetracted, 1) => {
                let old: ResourceRetractedV1 = postcard::from_bytes(bytes).map_err(malformed)?;
                return Ok(EventPayload::ResourceRetracted(old.into()));
            }
            _ => {}
        }
        if version != event_type.current_schema_version() {
            return Err(PayloadError::UnsupportedVersion {
                event_type: name,
                version,
            });
        }
        let payload = match event_type {
            EventType::ChartOpened => {
                EventPayload::ChartOpened(postcard::from_bytes(bytes).map_err(malformed)?)
            }
            EventType::ResourceRecorded => {
                EventPayload::ResourceRecorded(postcard::from_bytes(bytes).map_err(malformed)?)
            }
            EventType::ResourceRetracted => {
                EventPayload::ResourceRetracted(postcard::from_bytes(bytes).map_err(malformed)?)
            }
            EventType::ChartAccessed => {
                EventPayload::ChartAccessed(postcard::from_bytes(bytes).map_err(malformed)?)
            }
        };
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_advances_past_equal_wall_clock() {
        let start = HlcTimestamp {
            wall_micros: 100,
            logical: 0,
        };
        let same = start.advance(100);
        assert_eq!(
            same,
            HlcTimestamp {
                wall_micros: 100,
                logical: 1
            }
        );
        let earlier = same.advance(50);
        assert!(
            earlier > same,
            "a clock reading in the past must not move the HLC backwards"
        );
        let later = earlier.advance(200);
        assert_eq!(
            later,
            HlcTimestamp {
                wall_micros: 200,
                logical: 0
            }
        );
    }

    #[test]
    fn decode_rejects_unknown_schema_version() {
        let error = EventPayload::decode(EventType::ChartOpened, 9, &[]).unwrap_err();
        assert!(matches!(
            error,
            PayloadError::UnsupportedVersion { version: 9, .. }
        ));
    }

    #[test]
    fn payload_debug_is_redacted() {
        let payload = EventPayload::ResourceRecorded(ResourceRecorded {
            resource_type: "Patient".into(),
            resource_id: "p1".into(),
            version: 1,
            resource_json: "{\"name\":\"Secret Name\"}".into(),
            command_fingerprint: None,
        });
        let text = format!("{payload:?}");
        assert!(
            !text.contains("Secret"),
            "debug output leaked the payload: {text}"
        );
    }
}
