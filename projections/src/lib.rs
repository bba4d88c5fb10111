//! Read models that Chartlog builds from its log, each in its own RocksDB database.
//!
//! [`chart::ChartProjection`] is the chart: every version of every FHIR resource, indexed by
//! resource, by chart and by type. A projection receives events that the server has already
//! checked and decrypted ([`ProjectedEvent`]); it never holds key material, and it stores each
//! version's content only as the envelope's ciphertext.
//!
//! Invariant: a projection writes its log position in the same atomic batch as its state, so a
//! crash neither applies an event twice nor skips one, and it can be deleted and rebuilt from
//! the log with identical contents.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chart;

use chartlog_schemas::{EventHeader, EventPayload};

pub use chart::{ChartProjection, ProjectionError, VersionRecord};

/// One log entry as a projection sees it: its position, the checked header, the decrypted
/// payload and the stored envelope bytes.
pub struct ProjectedEvent<'a> {
    /// Offset of the entry in its partition of the log (0 for the first entry).
    pub position: u64,
    /// The clear header.
    pub header: &'a EventHeader,
    /// The decrypted payload.
    pub payload: &'a EventPayload,
    /// The envelope as stored on the log.
    pub envelope: &'a [u8],
}
