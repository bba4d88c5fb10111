//! Chartlog's event contract: the byte layout of an envelope, the clear header, and every
//! versioned event payload.
//!
//! Read [`envelope`] first: it fixes which bytes are hashed and signed. [`event`] holds the
//! header and the payload types; [`golden`] keeps the encodings that must decode forever.
//! This crate does no cryptography beyond the BLAKE3 digest that defines the chain: sealing
//! and signing live in the server's `crypto` module.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod envelope;
pub mod event;
pub mod golden;
pub mod ids;

pub use envelope::{Envelope, EnvelopeError, ParsedEnvelope};
pub use event::{
    AccessedResource, ChartAccessed, ChartKind, ChartOpened, EventHeader, EventPayload, EventType,
    HlcTimestamp, PayloadError, ResourceRecorded, ResourceRetracted,
};
pub use ids::{ChartId, CommandId, EventId, EventSeq, KeyId, SignerId};
