//! The head topic: each chart's last sequence number and digest, kept beside the Kafka log as
//! the embedded log keeps them in its `heads` column family.
//!
//! The writer sends a chart's new head in the same Kafka transaction as the events that moved
//! it, so the head topic never runs ahead of the log. The topic is compacted on the chart id, and
//! a reader keeps the last record of each chart. A log whose chart ends before its recorded
//! head lost events; `chartlog-replay verify` reports it, and a node refuses to take such a log
//! over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chartlog_schemas::{ChartId, EventSeq};
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::kafka::{reader_consumer, KafkaConfig};
use super::RecordedHead;

/// The head topic's only partition.
pub const HEAD_PARTITION: i32 = 0;

/// Length of a head record: the sequence number (8 bytes, big-endian), then the digest.
const HEAD_LEN: usize = 40;

/// How long reading the whole topic may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Returns the head topic that belongs to the event topic `topic`.
pub fn head_topic_name(topic: &str) -> String {
    format!("{topic}.heads")
}

/// Encodes a head record's value.
pub fn encode_head(seq: EventSeq, digest: &[u8; 32]) -> [u8; HEAD_LEN] {
    let mut value = [0u8; HEAD_LEN];
    value[..8].copy_from_slice(&seq.0.to_be_bytes());
    value[8..].copy_from_slice(digest);
    value
}

fn decode_head(key: &[u8], value: &[u8]) -> Option<RecordedHead> {
    let chart = <[u8; 16]>::try_from(key).ok()?;
    if value.len() != HEAD_LEN {
        return None;
    }
    let seq = u64::from_be_bytes(value[..8].try_into().ok()?);
    let digest = <[u8; 32]>::try_from(&value[8..]).ok()?;
    Some((ChartId::from_bytes(chart), EventSeq(seq), digest))
}

/// Returns whether the cluster lists the topic `name`. Blocks.
///
/// # Errors
///
/// The Kafka error when the cluster's metadata cannot be fetched.
pub fn topic_exists<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    name: &str,
    timeout: Duration,
) -> Result<bool, KafkaError> {
    let metadata = client.fetch_metadata(Some(name), timeout)?;
    Ok(metadata.topics().iter().any(|topic| {
        topic.name() == name
            && topic.error().is_none_or(|code| {
                RDKafkaErrorCode::from(code) != RDKafkaErrorCode::UnknownTopicOrPartition
            })
            && !topic.partitions().is_empty()
    }))
}

/// Contents of the head topic: each chart's recorded head, and the offsets of records that
/// Chartlog never writes there.
#[derive(Debug, Default)]
pub struct HeadRecords {
    /// The last head recorded for each chart.
    pub heads: Vec<RecordedHead>,
    /// Offsets of records that are not a head and were skipped.
    pub malformed: Vec<i64>,
    /// Offsets of tombstones, each of which removed a chart's head.
    pub tombstones: Vec<i64>,
}

/// Reads every chart's recorded head like [`read_heads_noting`], without what was skipped.
///
/// # Errors
///
/// As [`read_heads_noting`].
pub fn read_heads(config: &KafkaConfig) -> Result<Option<Vec<RecordedHead>>, KafkaError> {
    Ok(read_heads_noting(config)?.map(|records| records.heads))
}

/// Reads every chart's recorded head, the last record of each chart. Returns `None` when the
/// topic does not exist, as for a log written before heads were recorded. Blocks.
///
/// # Errors
///
/// The Kafka error when the topic cannot be read, or [`KafkaError::Canceled`] when the read
/// timed out. Malformed records are logged with their offset and skipped.
pub fn read_heads_noting(config: &KafkaConfig) -> Result<Option<HeadRecords>, KafkaError> {
    let name = head_topic_name(&config.topic);
    let consumer = reader_consumer(config).map_err(|_| KafkaError::Canceled)?;
    if !topic_exists(consumer.client(), &name, READ_TIMEOUT)? {
        return Ok(None);
    }
    let (_, high) = consumer.fetch_watermarks(&name, HEAD_PARTITION, READ_TIMEOUT)?;
    let mut heads: HashMap<ChartId, (EventSeq, [u8; 32])> = HashMap::new();
    let mut malformed = Vec::new();
    let mut tombstones = Vec::new();
    if high > 0 {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&name, HEAD_PARTITION, Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let started = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let key = message.key().unwrap_or_default();
                    match (message.payload(), <[u8; 16]>::try_from(key)) {
                        // A tombstone removes the chart's head, as compaction will.
                        (None, Ok(chart)) => {
                            tracing::warn!(
                                offset = message.offset(),
                                "chart head removed by a tombstone; that chart's end is not checked"
                            );
                            heads.remove(&ChartId::from_bytes(chart));
                            tombstones.push(message.offset());
                        }
                        (payload, _) => match decode_head(key, payload.unwrap_or_default()) {
                            Some((chart_id, seq, digest)) => {
                                heads.insert(chart_id, (seq, digest));
                            }
                            // Nothing Chartlog writes looks like this. Skipping it keeps every
                            // valid head checked; stopping here would stop every take-over.
                            None => {
                                tracing::error!(
                                    offset = message.offset(),
                                    "malformed chart head record skipped"
                                );
                                malformed.push(message.offset());
                            }
                        },
                    }
                    if message.offset() + 1 >= high {
                        break;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(error)) => return Err(error),
                None if started.elapsed() > READ_TIMEOUT => return Err(KafkaError::Canceled),
                None => {}
            }
        }
    }
    Ok(Some(HeadRecords {
        heads: heads
            .into_iter()
            .map(|(chart_id, (seq, digest))| (chart_id, seq, digest))
            .collect(),
        malformed,
        tombstones,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_record_round_trips() {
        let chart_id = ChartId::random();
        let value = encode_head(EventSeq(42), &[7u8; 32]);
        assert_eq!(
            decode_head(chart_id.as_bytes(), &value),
            Some((chart_id, EventSeq(42), [7u8; 32]))
        );
        assert_eq!(decode_head(chart_id.as_bytes(), &value[..39]), None);
        assert_eq!(decode_head(&[0u8; 15], &value), None);
    }
}
