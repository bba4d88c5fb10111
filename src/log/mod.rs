//! The log: the ordered, append-only sequence of envelopes that is the record itself.
//!
//! [`EventLog`] is the interface every backend implements; [`embedded::EmbeddedLog`] keeps the
//! log in RocksDB on one machine. A backend stores envelope bytes as they are given, so the same
//! bytes can move between backends by replaying.
//!
//! Invariant: a backend never overwrites or deletes an entry, and acknowledges an append only
//! once it is durable.

pub mod access_topic;
pub mod embedded;
pub mod head_topic;
pub mod kafka;
pub mod key_topic;
pub mod ownership;

use std::time::Duration;

use chartlog_schemas::{ChartId, Envelope, EventSeq};
use tokio::sync::watch;

pub use embedded::EmbeddedLog;
pub use kafka::{KafkaConfig, KafkaLog};

/// A chart's head as recorded beside the log: chart id, last sequence number and digest.
pub type RecordedHead = (ChartId, EventSeq, [u8; 32]);

/// Position of an entry in the log: its partition, and its offset there, from 0. The
/// embedded log has one partition, whose offsets count up without gaps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct LogPosition {
    /// Partition of the entry; every entry of a chart is in the same one.
    pub partition: u32,
    /// Offset of the entry within its partition.
    pub offset: u64,
}

impl LogPosition {
    /// Returns the position at `offset` of `partition`.
    pub const fn new(partition: u32, offset: u64) -> LogPosition {
        LogPosition { partition, offset }
    }

    /// Returns the position after this one in the same partition.
    pub const fn next(self) -> LogPosition {
        LogPosition::new(self.partition, self.offset + 1)
    }
}

impl std::fmt::Display for LogPosition {
    /// Writes the offset alone in partition 0, so a log of one partition names positions as
    /// plain numbers, and `partition:offset` elsewhere. The alternate form (`{:#}`) writes
    /// `partition:offset` in every partition, for logs of several.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.partition == 0 && !f.alternate() {
            self.offset.fmt(f)
        } else {
            write!(f, "{}:{}", self.partition, self.offset)
        }
    }
}

/// One offset per partition, each one past the last entry counted there: the end of a log, or
/// how far a projection has applied it.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Frontier(Vec<u64>);

impl Frontier {
    /// Returns the frontier at the start of a log of `partitions` partitions.
    pub fn start(partitions: u32) -> Frontier {
        Frontier(vec![0; partitions as usize])
    }

    /// Returns the frontier of the given offsets, the first for partition 0.
    pub fn from_offsets(offsets: Vec<u64>) -> Frontier {
        Frontier(offsets)
    }

    /// Returns the offset of `partition`; 0 for a partition this frontier does not hold.
    pub fn get(&self, partition: u32) -> u64 {
        self.0.get(partition as usize).copied().unwrap_or(0)
    }

    /// Returns the offsets, the first for partition 0.
    pub fn offsets(&self) -> &[u64] {
        &self.0
    }

    /// Moves `partition` forward to `offset` when that is further. Returns whether it moved.
    pub fn raise(&mut self, partition: u32, offset: u64) -> bool {
        let index = partition as usize;
        if self.0.len() <= index {
            self.0.resize(index + 1, 0);
        }
        let moved = offset > self.0[index];
        if moved {
            self.0[index] = offset;
        }
        moved
    }

    /// Moves every partition forward to `other`'s offset where that is further. Returns
    /// whether any moved.
    pub fn raise_to(&mut self, other: &Frontier) -> bool {
        let mut moved = false;
        for (partition, offset) in other.0.iter().enumerate() {
            moved |= self.raise(partition as u32, *offset);
        }
        moved
    }

    /// Returns whether every partition is at or past `other`'s offset.
    pub fn covers(&self, other: &Frontier) -> bool {
        other
            .0
            .iter()
            .enumerate()
            .all(|(partition, offset)| self.get(partition as u32) >= *offset)
    }

    /// Returns the sum of the offsets: the entries counted, transaction markers included on
    /// Kafka.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Returns how many entries `self` counts beyond `applied`, partition by partition.
    pub fn beyond(&self, applied: &Frontier) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(partition, offset)| offset.saturating_sub(applied.get(partition as u32)))
            .sum()
    }
}

/// Returns the partition of a chart's events in a log of `partitions` partitions: the first
/// eight bytes of the BLAKE3 digest of the chart id, big-endian, modulo the count. It depends
/// on the id alone, so every node and tool agrees on it, and `verify` can check it.
pub fn partition_of(chart_id: ChartId, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let digest = blake3::hash(chart_id.as_bytes());
    let mut first = [0; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    (u64::from_be_bytes(first) % u64::from(partitions)) as u32
}

/// Returns the name a projection records for the log its positions belong to: `embedded`, or
/// `kafka`, the topic and its partition count.
pub fn log_name(kafka: Option<&KafkaConfig>) -> String {
    match kafka {
        None => "embedded".to_owned(),
        Some(kafka) => format!("kafka {} {}", kafka.topic, kafka.partitions),
    }
}

/// Error from appending to the log.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The log's storage failed; nothing of the batch was appended.
    #[error("log storage write failed")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The log is not reachable; nothing of the batch was appended.
    #[error("log unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Error from reading the log.
#[derive(Debug, thiserror::Error)]
#[error("log read failed at position {position}")]
pub struct ReadError {
    /// The first position the read could not give: where it started, or the first entry past
    /// what it read.
    pub position: LogPosition,
    /// Cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The log ends before a position that a reader has already read: entries were lost, as when
/// a Kafka topic was deleted and created again. Retrying cannot help.
#[derive(Debug, thiserror::Error)]
#[error("the log now ends at position {end}, before entries already read: entries were lost from the log; restore it from a backup and run chartlog-replay verify")]
pub struct EntriesLost {
    /// Position one past the last entry of the partition now.
    pub end: LogPosition,
}

impl ReadError {
    /// Returns whether the log was found to have lost entries already read.
    pub fn is_loss(&self) -> bool {
        self.source.downcast_ref::<EntriesLost>().is_some()
    }
}

/// An append-only log of envelopes.
pub trait EventLog: Send + Sync + 'static {
    /// Appends a batch atomically and durably: either every envelope is appended, in order,
    /// and synced, or none is. Each envelope goes to the partition of its chart. Returns the
    /// position of each envelope. Blocks the calling
    /// thread; call it from a writer thread, never from the async runtime.
    ///
    /// # Errors
    ///
    /// [`AppendError`] when the batch could not be made durable; nothing was appended.
    fn append_batch(&self, envelopes: &[Envelope]) -> Result<Vec<LogPosition>, AppendError>;

    /// Returns the number of partitions; a chart's events are all in
    /// [`partition_of`] its id.
    fn partitions(&self) -> u32 {
        1
    }

    /// Reads up to `max` entries of `from`'s partition starting at `from`, in log order.
    /// Blocks the calling thread.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the storage cannot be read.
    fn read_from(
        &self,
        from: LogPosition,
        max: usize,
    ) -> Result<Vec<(LogPosition, Envelope)>, ReadError>;

    /// Returns a reader of this log on clients of its own, for one pass over all of it such as
    /// rebuilding the writer's state, or `None` when the log's own reads serve as well. On
    /// Kafka the pass then neither moves the position of the projector's reads between its
    /// own, nor depends on the state an outage left the projector's long-lived client in.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the clients cannot be created.
    fn separate_reader(&self) -> Result<Option<Box<dyn EventLog>>, ReadError> {
        Ok(None)
    }

    /// Returns a receiver of the end of each partition, one past its last durable entry; it
    /// changes after every successful append.
    fn end_position(&self) -> watch::Receiver<Frontier>;

    /// Returns how long ago the end in [`EventLog::end_position`] was last confirmed, or
    /// `None` when it never was. The embedded log returns zero, because only this node appends
    /// to it.
    fn end_age(&self) -> Option<Duration> {
        Some(Duration::ZERO)
    }

    /// Returns how many times a reader's client was replaced because it fetched nothing while
    /// its partition contained more. The embedded log has no such clients.
    fn readers_replaced(&self) -> u64 {
        0
    }

    /// Asks the storage for its end again, so that [`EventLog::end_position`] stays current
    /// while reads fail. Blocks the calling thread.
    fn refresh_end(&self) {}

    /// Returns the backend's name for health reports: `embedded` or `kafka`.
    fn backend_name(&self) -> &'static str {
        "embedded"
    }

    /// Returns whether positions follow each other without holes. The embedded log's do;
    /// Kafka's offsets skip the positions its transaction markers take.
    fn is_dense(&self) -> bool {
        true
    }

    /// Returns where reading continues after a read from `from` found nothing: `from` itself on
    /// a dense log, and past any transaction markers on Kafka.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the position cannot be determined.
    fn resume_position(&self, from: LogPosition) -> Result<LogPosition, ReadError> {
        Ok(from)
    }

    /// Returns the largest resource JSON one entry can carry, leaving room for the envelope's
    /// header, encryption and signature, when the backend limits entries below
    /// [`crate::command::MAX_RESOURCE_BYTES`].
    fn max_resource_bytes(&self) -> Option<usize> {
        None
    }

    /// Returns each chart's last sequence number and digest as recorded beside the log with
    /// every append, or `None` when the log records none.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the recorded heads cannot be read.
    fn recorded_heads(&self) -> Result<Option<Vec<RecordedHead>>, ReadError> {
        Ok(None)
    }

    /// Starts taking over the log from its previous writer: on Kafka, initializes the
    /// partition's transactional id, which fences the previous holder and aborts its open
    /// transaction. Appends stay refused until [`EventLog::complete_ownership`], so the caller
    /// can first rebuild its state from everything committed before. The embedded log has one
    /// writer by construction and does nothing.
    ///
    /// # Errors
    ///
    /// [`AppendError`] when the log cannot be reached.
    fn begin_ownership(&self) -> Result<(), AppendError> {
        Ok(())
    }

    /// Records heads beside the log for charts that have none there, during a take-over, for
    /// charts written before heads were recorded or after the recorded heads were lost. The
    /// embedded log records every head with its append and does nothing.
    ///
    /// # Errors
    ///
    /// [`AppendError`] when the heads could not be recorded.
    fn record_heads(&self, heads: &[RecordedHead]) -> Result<(), AppendError> {
        let _ = heads;
        Ok(())
    }

    /// Lets appends through after [`EventLog::begin_ownership`].
    fn complete_ownership(&self) {}

    /// Refuses appends from now on, because another node is taking the log over.
    fn release_ownership(&self) {}

    /// Returns whether appends are let through: always on the embedded log; on Kafka, between
    /// a completed take-over and its release or fencing.
    fn is_owner(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::LogPosition;

    #[test]
    fn position_display_names_partition() {
        assert_eq!(LogPosition::new(0, 5).to_string(), "5");
        assert_eq!(LogPosition::new(2, 5).to_string(), "2:5");
        assert_eq!(format!("{:#}", LogPosition::new(0, 5)), "0:5");
        assert_eq!(format!("{:#}", LogPosition::new(2, 5)), "2:5");
    }
}
