//! The access topic: accesses that a node journaled while it knew no owner of the log, handed
//! to the owner once it finds one.
//!
//! Only the owner appends to the log, so a standby cannot record the accesses of the reads it
//! served during an outage. It sends each journaled access here instead, encrypted as in its
//! journal under the chart's data key, and deletes it from its journal once the cluster has
//! acknowledged it (`acks=all`). The owner reads the topic, records each access on the log with
//! the command id fixed when it was journaled, and only then commits its read position. A
//! record delivered twice therefore takes effect once.
//!
//! The topic keeps its records (unlimited retention, no compaction): they are audit records on
//! their way to the log.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::kafka::{ensure_topic, KafkaConfig, KafkaOpenError, ReaderContext};

/// The access topic's only partition.
const PARTITION: i32 = 0;

/// How long a send may wait for the cluster's acknowledgement.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one read waits for the first record.
const POLL: Duration = Duration::from_millis(200);

/// Returns the access topic that belongs to the event topic `topic`.
pub fn access_topic_name(topic: &str) -> String {
    format!("{topic}.accesses")
}

/// A connection to the access topic, for sending (standbys) and reading (the owner).
pub struct AccessTopic {
    name: String,
    config: KafkaConfig,
    producer: Mutex<Option<FutureProducer>>,
    /// The owner's reader, created when it starts reading and dropped when it stops owning the
    /// log, so that a later owner begins at the last committed position.
    reader: Mutex<Option<BaseConsumer<ReaderContext>>>,
}

impl std::fmt::Debug for AccessTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessTopic({})", self.name)
    }
}

/// A record read from the topic: its offset and bytes.
pub struct HandedAccess {
    /// Offset of the record.
    pub offset: i64,
    /// The record's value, as the journal encrypted it.
    pub bytes: Vec<u8>,
}

impl AccessTopic {
    /// Connects to the access topic of `config.topic`, creating or checking it when `create`
    /// is set. Clients connect on first use, so this asks nothing of the cluster otherwise.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError`] when the topic cannot be created or would lose records.
    pub async fn open(config: &KafkaConfig, create: bool) -> Result<AccessTopic, KafkaOpenError> {
        let name = access_topic_name(&config.topic);
        if create {
            ensure_topic(config, &name, 1, "delete").await?;
        }
        Ok(AccessTopic {
            name,
            config: config.clone(),
            producer: Mutex::new(None),
            reader: Mutex::new(None),
        })
    }

    /// Returns the topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the topic if it is missing, as after it was deleted.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError`] when the topic cannot be created or would lose records.
    pub async fn ensure(&self) -> Result<bool, KafkaOpenError> {
        ensure_topic(&self.config, &self.name, 1, "delete").await
    }

    fn producer(&self) -> Result<FutureProducer, KafkaError> {
        let mut slot = self
            .producer
            .lock()
            .expect("access producer lock is not poisoned");
        if let Some(producer) = slot.as_ref() {
            return Ok(producer.clone());
        }
        let producer: FutureProducer = self
            .config
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", SEND_TIMEOUT.as_millis().to_string())
            .create()?;
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// Sends records and returns once the cluster has acknowledged every one of them.
    ///
    /// # Errors
    ///
    /// The Kafka error of the first record that was not acknowledged; records before it may
    /// have been stored, which their command ids make harmless when they are sent again.
    pub async fn send(&self, records: &[(Vec<u8>, Vec<u8>)]) -> Result<(), KafkaError> {
        let producer = self.producer()?;
        let mut deliveries = Vec::with_capacity(records.len());
        for (key, value) in records {
            let record = FutureRecord::to(&self.name)
                .partition(PARTITION)
                .key(key)
                .payload(value);
            deliveries.push(producer.send_result(record).map_err(|(error, _)| error)?);
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(error),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }

    /// Reads up to `max` records after the last committed position. Blocks; call it off the
    /// async runtime.
    ///
    /// # Errors
    ///
    /// The Kafka error when the topic cannot be read.
    pub fn read(&self, max: usize) -> Result<Vec<HandedAccess>, KafkaError> {
        let mut slot = self
            .reader
            .lock()
            .expect("access reader lock is not poisoned");
        if slot.is_none() {
            let consumer: BaseConsumer<ReaderContext> = self
                .config
                .client_config()
                .set(
                    "group.id",
                    format!("chartlog-accesses.{}", self.config.topic),
                )
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("isolation.level", "read_committed")
                .set("enable.partition.eof", "true")
                .create_with_context(ReaderContext)?;
            let mut assignment = TopicPartitionList::new();
            assignment.add_partition_offset(&self.name, PARTITION, Offset::Stored)?;
            consumer.assign(&assignment)?;
            *slot = Some(consumer);
        }
        let consumer = slot.as_ref().expect("the reader was created above");
        let mut records = Vec::new();
        while records.len() < max {
            match consumer.poll(if records.is_empty() {
                POLL
            } else {
                Duration::ZERO
            }) {
                Some(Ok(message)) => records.push(HandedAccess {
                    offset: message.offset(),
                    bytes: message.payload().unwrap_or_default().to_vec(),
                }),
                Some(Err(KafkaError::PartitionEOF(_))) | None => break,
                Some(Err(error)) => {
                    // Start again from the committed position next time.
                    *slot = None;
                    return Err(error);
                }
            }
        }
        Ok(records)
    }

    /// Commits that every record before `next` is recorded on the log. Blocks.
    ///
    /// # Errors
    ///
    /// The Kafka error when the commit fails; the records are then read and recorded again,
    /// which their command ids make harmless.
    pub fn commit(&self, next: i64) -> Result<(), KafkaError> {
        let slot = self
            .reader
            .lock()
            .expect("access reader lock is not poisoned");
        let Some(consumer) = slot.as_ref() else {
            return Ok(());
        };
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&self.name, PARTITION, Offset::Offset(next))?;
        consumer.commit(&offsets, CommitMode::Sync)
    }

    /// Drops the reader, when this node stops owning the log or a read failed, so that reading
    /// starts again at the committed position.
    pub fn stop_reading(&self) {
        self.reader
            .lock()
            .expect("access reader lock is not poisoned")
            .take();
    }
}
