//! Commands and the writer's view of the record: what a command requests, the state it is
//! checked against, and the events it becomes.
//!
//! Domain code only: no IO, no async runtime, no storage. [`state::WriterState::plan`] turns a
//! [`Command`] into planned events or a [`CommandError`]; the writer thread seals and appends
//! them. Read [`Command`] and [`Operation`] first.

pub mod state;

use chartlog_schemas::{ChartAccessed, ChartId, CommandId};

pub use state::{PlannedEvent, WriterState};

/// Largest resource JSON one event carries, in bytes (8 MiB): half the envelope limit, so the
/// header, encryption overhead and signature always fit. Larger documents belong in a
/// Binary store referenced by a DocumentReference.
pub const MAX_RESOURCE_BYTES: usize = 8 * 1024 * 1024;

/// Target chart of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChartTarget {
    /// The chart of the patient with this Patient resource id. For a Patient resource that
    /// does not exist yet, a new chart is opened.
    Patient(String),
    /// The shared directory of resources outside every patient compartment.
    Directory,
}

/// One change or access within a command.
#[derive(Clone)]
pub enum Operation {
    /// Creates or updates a resource.
    Record {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id (server-assigned for creates).
        resource_id: String,
        /// The resource as sent by the client, already validated, references rewritten.
        resource: serde_json::Map<String, serde_json::Value>,
        /// Chart the resource belongs to.
        chart: ChartTarget,
        /// Version the client based the change on (If-Match), when it named one.
        if_match: Option<u64>,
        /// Whether the operation must create: fails when the resource exists.
        create_only: bool,
        /// Resources the content refers to, which must exist (not deleted) when applied.
        references: Vec<(String, String)>,
    },
    /// Deletes a resource. Its versions stay in history.
    Retract {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
        /// Version the client based the delete on, when it named one.
        if_match: Option<u64>,
    },
    /// Records that health data of a chart was read.
    Access {
        /// The chart that was read.
        chart_id: ChartId,
        /// The resources read, the interaction and the client address (actor and purpose are in
        /// the command).
        access: ChartAccessed,
    },
}

impl std::fmt::Debug for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Record {
                resource_type,
                resource_id,
                ..
            } => {
                write!(f, "Record({resource_type}/{resource_id})")
            }
            Operation::Retract {
                resource_type,
                resource_id,
                ..
            } => {
                write!(f, "Retract({resource_type}/{resource_id})")
            }
            Operation::Access { chart_id, .. } => write!(f, "Access({chart_id})"),
        }
    }
}

/// A command: operations applied together, all or nothing, on behalf of one actor.
#[derive(Clone, Debug)]
pub struct Command {
    /// Subject id of the authenticated actor.
    pub actor: String,
    /// Purpose of use code.
    pub purpose_of_use: String,
    /// Client-supplied id that makes a retried command take effect once.
    pub command_id: Option<CommandId>,
    /// Digest of the request that carried the command id, so that reusing the id for another
    /// request is rejected rather than given the first request's results.
    pub fingerprint: Option<[u8; 32]>,
    /// The operations, applied in order.
    pub operations: Vec<Operation>,
}

/// Result of one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperationResult {
    /// A resource version was written.
    Recorded {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
        /// The new version number.
        version: u64,
        /// Whether this version created the resource (no earlier live version existed).
        created: bool,
        /// `meta.lastUpdated` of the new version.
        last_updated: String,
    },
    /// A resource was deleted, or was already absent.
    Retracted {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
        /// Version of the deletion, or `None` when there was nothing to delete.
        version: Option<u64>,
    },
    /// An access was recorded.
    Accessed,
}

/// Reason a command was rejected. Nothing of a rejected command is written.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    /// The resource does not exist.
    #[error("{resource_type}/{resource_id} not found")]
    NotFound {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
    },
    /// The resource was deleted.
    #[error("{resource_type}/{resource_id} is deleted")]
    Gone {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
    },
    /// If-Match named a version that is not the current one.
    #[error("version conflict on {resource_type}/{resource_id}: If-Match names version {expected}, current version is {actual}")]
    VersionConflict {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
        /// Version named by the client.
        expected: u64,
        /// Current version, or 0 when the resource does not exist.
        actual: u64,
    },
    /// A create named an id that exists.
    #[error("{resource_type}/{resource_id} already exists")]
    AlreadyExists {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
    },
    /// A referenced resource does not exist or is deleted.
    #[error("reference at {path} points to {resource_type}/{resource_id}, which does not exist")]
    DanglingReference {
        /// Element holding the reference.
        path: String,
        /// Referenced type.
        resource_type: String,
        /// Referenced id.
        resource_id: String,
    },
    /// The resource is larger than one event may carry.
    #[error("{resource_type} of {bytes} bytes exceeds the maximum of {limit} bytes that one log entry holds")]
    TooLarge {
        /// FHIR resource type.
        resource_type: String,
        /// Size of the resource's JSON.
        bytes: usize,
        /// The largest resource JSON an event may carry.
        limit: usize,
    },
    /// A command id was reused by another actor or for another request.
    #[error("command id {0} was already used for a different request")]
    CommandIdReused(CommandId),
    /// An update would move a resource into another patient's chart.
    #[error("{resource_type}/{resource_id} belongs to another chart; moving resources between patients is not supported")]
    ChartChange {
        /// FHIR resource type.
        resource_type: String,
        /// Logical id.
        resource_id: String,
    },
}

impl CommandError {
    /// Returns whether the error is a stale If-Match (HTTP 412).
    pub fn is_precondition_failure(&self) -> bool {
        matches!(self, CommandError::VersionConflict { .. })
    }
}
