//! The Kafka log: envelopes as records of one topic, byte for byte the bytes the embedded log
//! stores, so a deployment can move between the two by replaying.
//!
//! The topic has one or more partitions; each chart's events go to [`super::partition_of`] its
//! id, so a chart's events keep their order. Appends are Kafka transactions of an idempotent
//! producer with `acks=all`, and one transaction may span partitions. The producer's
//! `transactional.id` is derived from the topic and partition 0, so a node that takes the log
//! over fences the previous writer at the broker: the previous writer's next commit fails
//! instead of interleaving with the new one's. Which node writes is decided by a consumer group
//! (see [`super::ownership`]): the member assigned partition 0 writes every partition. A node
//! appends only between taking the log over and losing it. Reads use `read_committed`, so
//! aborted appends are never seen.
//!
//! NOTE: one node writes every partition. Partitions written by different nodes, each
//! holding its own charts, are not built yet: they need a transaction to stay within one
//! partition and references across partitions to be checked against the projection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chartlog_schemas::{ChartId, Envelope};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::watch;

use super::access_topic::access_topic_name;
use super::head_topic::{encode_head, head_topic_name, read_heads, HEAD_PARTITION};
use super::key_topic::{key_topic_name, KeyTopic, KEY_PARTITION};
use super::ownership::lease_topic_name;
use super::{partition_of, AppendError, EventLog, Frontier, LogPosition, ReadError, RecordedHead};
use crate::crypto::KeyStore;
use chartlog_schemas::KeyId;

/// The partition whose holder in the owner group writes the log, and from which the
/// producer's transactional id is derived.
const LEASE_PARTITION: i32 = 0;

/// How long one append may take before it fails and the writer returns 503: long enough for
/// a leader election among three brokers, short enough that a client is not kept waiting.
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long aborting a failed append may take. An append fails mostly because the broker is
/// away, and then the abort fails too. A producer that could not abort is replaced anyway, so
/// waiting longer would only keep the failed append's callers waiting.
const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an append waits for its delivered records to leave the producer's count before
/// committing anyway.
const FLUSH_SETTLE: Duration = Duration::from_millis(20);

/// librdkafka's default `message.max.bytes`, the largest record the producer sends.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Room left in a record for everything of an envelope but the resource JSON.
const ENVELOPE_MARGIN: usize = 64 * 1024;

/// How long a read waits for records that are not there yet before returning what it has.
const READ_POLL: Duration = Duration::from_millis(200);

/// How long a partition's reader may find nothing while the partition's known end lies past
/// its position before its client is replaced. After a broker restart, librdkafka's consumer
/// was seen fetching nothing for over a minute; a new client reads at once. The known end
/// counts committed records only (`read_committed` ends and this node's commits), so a
/// transaction left open does not count as records to read.
const READER_STALL: Duration = Duration::from_secs(15);

/// Largest partition count a topic can be created with: the range librdkafka's admin client
/// accepts.
const MAX_PARTITIONS: u32 = 100_000;

/// Settings of the Kafka log. Client properties come from configuration, never from code.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Topic of the chart events.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions of the event topic. A topic created at start-up gets this many, and an
    /// existing topic must have exactly this many, since a chart's partition follows from its
    /// id and the count.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Replication factor of a topic created at start-up.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of a topic created at start-up.
    #[serde(default = "default_replication")]
    pub min_insync_replicas: i32,
    /// Further librdkafka client properties, such as `security.protocol`, `ssl.ca.location`
    /// or `sasl.mechanism`.
    #[serde(default)]
    pub properties: HashMap<String, String>,
}

fn default_topic() -> String {
    "chartlog.events".to_owned()
}

fn default_replication() -> i32 {
    1
}

fn default_partitions() -> u32 {
    1
}

impl KafkaConfig {
    /// Builds the settings from `CHARTLOG_KAFKA_*` environment variables: the bootstrap
    /// servers, topic, partition count and replication settings by name, and every other
    /// variable as a client property (`CHARTLOG_KAFKA_SSL_CA_LOCATION` becomes
    /// `ssl.ca.location`), except the variables of `compose/kafka.sh`. Returns `None` when no bootstrap servers are given.
    ///
    /// # Errors
    ///
    /// [`KafkaSettingError`] when the partition count or a replication setting is not a
    /// positive whole number, the partition count is above 100,000, or more replicas must be
    /// in sync than there are.
    pub fn from_env(base: Option<KafkaConfig>) -> Result<Option<KafkaConfig>, KafkaSettingError> {
        let mut config = base;
        for (name, value) in std::env::vars() {
            let Some(key) = name.strip_prefix("CHARTLOG_KAFKA_") else {
                continue;
            };
            if key == "BOOTSTRAP_SERVERS" {
                match &mut config {
                    Some(config) => config.bootstrap_servers = value,
                    None => {
                        config = Some(KafkaConfig {
                            bootstrap_servers: value,
                            topic: default_topic(),
                            partitions: default_partitions(),
                            replication_factor: default_replication(),
                            min_insync_replicas: default_replication(),
                            properties: HashMap::new(),
                        })
                    }
                }
            }
        }
        let Some(mut config) = config else {
            return Ok(None);
        };
        let count = |name: &'static str, value: &str| match value.trim().parse::<i32>() {
            Ok(count) if count > 0 => Ok(count),
            _ => Err(KafkaSettingError {
                name,
                expected: "a positive whole number",
            }),
        };
        for (name, value) in std::env::vars() {
            let Some(key) = name.strip_prefix("CHARTLOG_KAFKA_") else {
                continue;
            };
            match key {
                "BOOTSTRAP_SERVERS" => {}
                // Settings of compose/kafka.sh, the local broker script, not client properties.
                "PORT" | "RUN_DIR" | "CACHE_DIR" | "HEAP" | "STOP_TIMEOUT" => {}
                "TOPIC" => config.topic = value,
                "PARTITIONS" => {
                    config.partitions = count("CHARTLOG_KAFKA_PARTITIONS", &value)? as u32;
                }
                "REPLICATION_FACTOR" => {
                    config.replication_factor = count("CHARTLOG_KAFKA_REPLICATION_FACTOR", &value)?;
                }
                "MIN_INSYNC_REPLICAS" => {
                    config.min_insync_replicas =
                        count("CHARTLOG_KAFKA_MIN_INSYNC_REPLICAS", &value)?;
                }
                other => {
                    config
                        .properties
                        .insert(other.to_ascii_lowercase().replace('_', "."), value);
                }
            }
        }
        // A config file can set a count of 0, which no topic has, and Kafka creates no topic
        // of more than 100,000 partitions.
        if config.partitions == 0 || config.partitions > MAX_PARTITIONS {
            return Err(KafkaSettingError {
                name: "kafka.partitions (CHARTLOG_KAFKA_PARTITIONS)",
                expected: "a whole number from 1 to 100000",
            });
        }
        // A topic cannot have more replicas in sync than it has replicas, and a setting that
        // requests more, unnoticed, would leave the log with one copy.
        if config.min_insync_replicas > config.replication_factor {
            return Err(KafkaSettingError {
                name: "kafka.min_insync_replicas (CHARTLOG_KAFKA_MIN_INSYNC_REPLICAS)",
                expected: "at most the replication factor (kafka.replication_factor, CHARTLOG_KAFKA_REPLICATION_FACTOR, 1 by default)",
            });
        }
        Ok(Some(config))
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.bootstrap_servers);
        for (name, value) in &self.properties {
            client.set(name, value);
        }
        client
    }
}

/// A Kafka setting from the environment that is not usable.
#[derive(Debug, thiserror::Error)]
#[error("{name} must be {expected}")]
pub struct KafkaSettingError {
    /// The environment variable or configuration key.
    pub name: &'static str,
    /// Description of the valid values.
    pub expected: &'static str,
}

/// Error from opening the Kafka log.
#[derive(Debug, thiserror::Error)]
pub enum KafkaOpenError {
    /// A Kafka client call failed.
    #[error("kafka {action} failed")]
    Client {
        /// The attempted action.
        action: &'static str,
        /// Cause.
        #[source]
        source: KafkaError,
    },
    /// The topic has another number of partitions than configured. Charts are placed by
    /// their id and the count, so reading or writing it with another count would lose charts.
    #[error("topic {topic} has {count} partitions but the configuration names {configured}; set CHARTLOG_KAFKA_PARTITIONS (or kafka.partitions) to the count the topic was created with, and if partitions were added to it after charts were written, copy it into a new topic with chartlog-replay copy")]
    Partitions {
        /// Topic name.
        topic: String,
        /// Its number of partitions.
        count: usize,
        /// The configured number.
        configured: u32,
    },
    /// The cluster rejected a topic creation with the configured settings.
    #[error("the cluster rejected creating topic {topic} with {partitions} partitions and replication factor {replication_factor}: {reason}")]
    Rejected {
        /// Topic name.
        topic: String,
        /// Requested partition count.
        partitions: u32,
        /// Requested replication factor.
        replication_factor: i32,
        /// The error the cluster returned.
        reason: String,
    },
    /// The topic keeps records for a limited time or compacts them, which would delete
    /// audit records that must be kept for six years or more.
    #[error("topic {topic} has {setting}={value}; chartlog needs retention.ms=-1, retention.bytes=-1 and cleanup.policy={expected_policy}: change it with kafka-configs.sh --alter --entity-type topics --entity-name {topic}")]
    Retention {
        /// Topic name.
        topic: String,
        /// The cleanup policy the topic needs.
        expected_policy: String,
        /// The offending setting.
        setting: String,
        /// Its value.
        value: String,
    },
}

/// The Kafka-backed log.
pub struct KafkaLog {
    config: KafkaConfig,
    runtime: tokio::runtime::Handle,
    producer: Mutex<Option<FutureProducer>>,
    /// One reader per partition, so a projector that reads them in turn keeps each one's
    /// fetch position.
    readers: Vec<Mutex<Reader>>,
    /// How many readers' clients were replaced after fetching nothing for [`READER_STALL`].
    readers_replaced: AtomicU64,
    end: watch::Sender<Frontier>,
    /// Per partition, when the broker last confirmed its end in `end`, or when this node last
    /// committed: the end a standby reports is only as current as the oldest of these.
    end_confirmed: Mutex<Vec<Option<Instant>>>,
    /// Each partition's offset after this node's last committed record there, or the end of
    /// the partition when it took the log over.
    committed_end: Mutex<Frontier>,
    /// Whether appends are let through: set once a take-over completed, cleared when the
    /// partition is released or a newer writer fenced this node or wrote behind its back.
    owner: AtomicBool,
    read_only: bool,
    /// The key store and key topic that share new charts' data keys with the other nodes, once
    /// attached.
    keys: Option<SharedKeys>,
}

/// What an append needs of each envelope's clear header.
struct EnvelopeFacts {
    chart_id: chartlog_schemas::ChartId,
    key_id: KeyId,
    seq: chartlog_schemas::EventSeq,
    digest: [u8; 32],
}

/// Waits for every delivery report and returns the offsets the records got.
async fn delivered(deliveries: Vec<DeliveryFuture>) -> Result<Vec<i64>, KafkaError> {
    let mut offsets = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(delivery)) => offsets.push(delivery.offset),
            Ok(Err((error, _))) => return Err(error),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(offsets)
}

/// The key store and the key topic the writer publishes new data keys through.
struct SharedKeys {
    store: Arc<KeyStore>,
    topic: Arc<KeyTopic>,
}

/// Client context of the reader. Every read ends at the end of the partition, so that is not
/// reported as an error; every other client error is logged.
pub(crate) struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::error!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// Returns whether an error polled from a reader consumer is one of the client's connection
/// errors. A consumer with a group id receives them in its queue, where they wait until the
/// next poll, possibly long after the outage they report ended. librdkafka reconnects and
/// fetches again by itself, so a read can continue past them.
pub(crate) fn is_connection_error(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
        )
    )
}

struct Reader {
    consumer: BaseConsumer<ReaderContext>,
    /// Offset the consumer fetches next, when it is assigned.
    cursor: Option<i64>,
    /// Since when reads have found nothing though the partition's known end lies past them.
    behind_since: Option<Instant>,
}

impl Reader {
    fn new(consumer: BaseConsumer<ReaderContext>) -> Reader {
        Reader {
            consumer,
            cursor: None,
            behind_since: None,
        }
    }
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KafkaLog({})", self.config.topic)
    }
}

fn client_error(action: &'static str) -> impl FnOnce(KafkaError) -> KafkaOpenError {
    move |source| KafkaOpenError::Client { action, source }
}

impl KafkaLog {
    /// Connects, creates the topic when it is missing (unlimited retention, no compaction) or
    /// checks an existing one, and takes the partition over at once, which fences any earlier
    /// writer. For tools that write a log of their own, such as `chartlog-replay copy`; a node
    /// uses [`KafkaLog::open_unowned`] and lets its consumer group decide.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError`] when the cluster cannot be reached or the topic's retention is
    /// limited.
    pub async fn open(config: KafkaConfig) -> Result<KafkaLog, KafkaOpenError> {
        let log = Self::open_unowned(config).await?;
        // The calls block, so they run off the async runtime.
        tokio::task::spawn_blocking(move || {
            log.begin_ownership()
                .map_err(|error| KafkaOpenError::Client {
                    action: "producer initialization",
                    source: match error {
                        AppendError::Unavailable(source) | AppendError::Storage(source) => {
                            match source.downcast::<KafkaError>() {
                                Ok(kafka) => *kafka,
                                Err(_) => KafkaError::Canceled,
                            }
                        }
                    },
                })?;
            log.complete_ownership();
            Ok(log)
        })
        .await
        .map_err(|_| KafkaOpenError::Client {
            action: "start-up",
            source: KafkaError::Canceled,
        })?
    }

    /// Connects and creates or checks the topic like [`KafkaLog::open`], but refuses appends
    /// until [`EventLog::begin_ownership`] and [`EventLog::complete_ownership`] have run.
    ///
    /// # Errors
    ///
    /// As [`KafkaLog::open`].
    pub async fn open_unowned(config: KafkaConfig) -> Result<KafkaLog, KafkaOpenError> {
        ensure_topic(&config, &config.topic, config.partitions, "delete").await?;
        // A refused partition count leaves the cluster as it was: no topic is created beside
        // a topic this configuration cannot use.
        let consumer = reader_consumer(&config)?;
        check_partitions(consumer.client(), &config)?;
        drop(consumer);
        let lease_topic = lease_topic_name(&config.topic, config.partitions);
        if lease_topic != config.topic {
            ensure_topic(&config, &lease_topic, 1, "delete").await?;
        }
        let heads_created =
            ensure_topic(&config, &head_topic_name(&config.topic), 1, "compact").await?;
        let log = Self::connect(config, false).await?;
        if heads_created && log.end.borrow().total() > 0 {
            // Not the first start on this topic: the recorded heads were lost, and events
            // removed from the end of a chart until now cannot be detected any more.
            tracing::error!(topic = %log.config.topic, "the head topic of a log that holds events was missing and was created again; the next take-over records every chart's head from the log as it is");
        }
        Ok(log)
    }

    /// Connects for reading only: no topic changes and no producer, so a verifier or a copy
    /// can read the topic without fencing the node that writes it.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError`] when the cluster cannot be reached.
    pub async fn open_reader(config: KafkaConfig) -> Result<KafkaLog, KafkaOpenError> {
        Self::connect(config, true).await
    }

    /// Creates the reader and reads the end of the topic, off the async runtime because the
    /// client calls block.
    async fn connect(config: KafkaConfig, read_only: bool) -> Result<KafkaLog, KafkaOpenError> {
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let consumer = reader_consumer(&config)?;
            check_partitions(consumer.client(), &config)?;
            let end_of_topic = partition_ends(&consumer, &config, APPEND_TIMEOUT)
                .map_err(client_error("reading the end of the topic"))?;
            let log = Self::assemble(config, runtime, consumer, end_of_topic, read_only)?;
            log.confirm_end();
            Ok(log)
        })
        .await
        .map_err(|_| KafkaOpenError::Client {
            action: "start-up",
            source: KafkaError::Canceled,
        })?
    }

    /// Builds the log around the reader of partition 0 and creates the readers of the other
    /// partitions. `end_of_topic` is the end of each partition as far as known.
    fn assemble(
        config: KafkaConfig,
        runtime: tokio::runtime::Handle,
        consumer: BaseConsumer<ReaderContext>,
        end_of_topic: Frontier,
        read_only: bool,
    ) -> Result<KafkaLog, KafkaOpenError> {
        let mut readers = vec![Mutex::new(Reader::new(consumer))];
        for _ in 1..config.partitions {
            readers.push(Mutex::new(Reader::new(reader_consumer(&config)?)));
        }
        let (end, _) = watch::channel(end_of_topic.clone());
        Ok(KafkaLog {
            runtime,
            producer: Mutex::new(None),
            readers,
            readers_replaced: AtomicU64::new(0),
            committed_end: Mutex::new(end_of_topic),
            owner: AtomicBool::new(false),
            end,
            end_confirmed: Mutex::new(vec![None; config.partitions as usize]),
            config,
            read_only,
            keys: None,
        })
    }

    /// Opens the log of a node that has run on this topic before, while the cluster cannot be
    /// reached: nothing is asked of the cluster now. The node serves what it has projected,
    /// its reader catches up once the cluster answers, and the topic checks of
    /// [`KafkaLog::open_unowned`] run when it takes the log over, before any append.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError::Client`] when the client cannot be created from the configuration.
    pub fn open_offline(config: KafkaConfig) -> Result<KafkaLog, KafkaOpenError> {
        let runtime = tokio::runtime::Handle::current();
        let consumer = reader_consumer(&config)?;
        let start = Frontier::start(config.partitions);
        Self::assemble(config, runtime, consumer, start, false)
    }

    /// Records that the end of every partition published in `end` was confirmed just now.
    fn confirm_end(&self) {
        let now = Instant::now();
        for confirmed in self
            .end_confirmed
            .lock()
            .expect("end confirmation lock is not poisoned")
            .iter_mut()
        {
            *confirmed = Some(now);
        }
    }

    /// Records that the end of `partition` published in `end` was confirmed just now.
    fn confirm_partition_end(&self, partition: u32) {
        if let Some(confirmed) = self
            .end_confirmed
            .lock()
            .expect("end confirmation lock is not poisoned")
            .get_mut(partition as usize)
        {
            *confirmed = Some(Instant::now());
        }
    }

    /// Fetches the end of `partition` with the reader's consumer and publishes it when it
    /// moved forward. Returns the end, or `None` when the request failed.
    fn fetch_end(&self, consumer: &BaseConsumer<ReaderContext>, partition: u32) -> Option<u64> {
        let topic = &self.config.topic;
        match consumer.fetch_watermarks(topic, partition as i32, Duration::from_secs(1)) {
            Ok((_, high)) => {
                let high = high.max(0) as u64;
                self.confirm_partition_end(partition);
                self.end.send_if_modified(|end| end.raise(partition, high));
                Some(high)
            }
            Err(error) => {
                // The end and the lag then stay as they were, and `end_age` grows.
                tracing::debug!(topic = %topic, partition, error = %error, "reading the end of the topic failed");
                None
            }
        }
    }

    /// Moves the consumer of `partition`'s reader to the partition's end while the reader
    /// still expects its next position: from outside, a client that fetches nothing though
    /// the partition contains more. For the tests of the reader watch.
    #[cfg(feature = "kafka-tests")]
    #[doc(hidden)]
    pub fn stall_reader(&self, partition: u32) -> Result<(), KafkaError> {
        let reader = self.readers[partition as usize]
            .lock()
            .expect("kafka reader lock is not poisoned");
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.config.topic, partition as i32, Offset::End)?;
        reader.consumer.assign(&assignment)
    }

    /// Returns whether the topic contains committed records after this node's last commit.
    fn has_foreign_records(&self) -> Result<bool, ReadError> {
        let committed = self
            .committed_end
            .lock()
            .expect("committed end lock is not poisoned")
            .clone();
        for partition in 0..self.config.partitions {
            let end = LogPosition::new(partition, committed.get(partition));
            // Waiting for records is the point here, so the end known so far is no reason
            // to skip the wait.
            if !self.read_partition(end, 1, false)?.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn transactional_id(&self) -> String {
        format!("chartlog-{}-{LEASE_PARTITION}", self.config.topic)
    }

    /// Shares the data keys of the charts this log's writer creates through `topic`. Each key
    /// not yet on the topic goes into the same transaction as the first events that use it.
    /// Taking the log over first publishes any key of `store` still missing there.
    pub fn attach_keys(&mut self, store: Arc<KeyStore>, topic: Arc<KeyTopic>) {
        self.keys = Some(SharedKeys { store, topic });
    }

    /// Returns the topic's name.
    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    /// Returns the partition whose holder in the owner group writes the log.
    pub fn lease_partition(&self) -> i32 {
        LEASE_PARTITION
    }

    fn new_producer(&self) -> Result<FutureProducer, KafkaError> {
        let producer: FutureProducer = self
            .config
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("transactional.id", self.transactional_id())
            .set("transaction.timeout.ms", "60000")
            // Every append is flushed and committed at once, so records need not linger to
            // form batches: the writer thread has already batched them.
            .set("linger.ms", "0")
            .set("message.timeout.ms", APPEND_TIMEOUT.as_millis().to_string())
            .create()?;
        producer.init_transactions(APPEND_TIMEOUT)?;
        Ok(producer)
    }

    fn append_in_transaction(
        &self,
        producer: &FutureProducer,
        envelopes: &[Envelope],
    ) -> Result<Vec<LogPosition>, KafkaError> {
        // Each envelope is parsed once, for its record key, its data key and its chart's head.
        // Bytes that are not an envelope (only tests append such) have no chart.
        let headers: Vec<Option<EnvelopeFacts>> = envelopes
            .iter()
            .map(|envelope| {
                chartlog_schemas::envelope::parse(&envelope.0)
                    .ok()
                    .map(|parsed| EnvelopeFacts {
                        chart_id: parsed.header.chart_id,
                        key_id: parsed.header.key_id,
                        seq: parsed.header.seq,
                        digest: parsed.digest,
                    })
            })
            .collect();
        producer.begin_transaction()?;
        let new_keys = self.unpublished_keys(&headers);
        let key_deliveries = self.send_keys(producer, &new_keys)?;
        let mut deliveries = Vec::with_capacity(envelopes.len());
        let mut partitions = Vec::with_capacity(envelopes.len());
        for (envelope, facts) in envelopes.iter().zip(&headers) {
            let key = facts
                .as_ref()
                .map(|facts| facts.chart_id.as_bytes().to_vec())
                .unwrap_or_default();
            let partition = facts.as_ref().map_or(0, |facts| {
                partition_of(facts.chart_id, self.config.partitions)
            });
            let record = FutureRecord::to(&self.config.topic)
                .partition(partition as i32)
                .key(&key)
                .payload(&envelope.0);
            let delivery = producer.send_result(record).map_err(|(error, _)| error)?;
            deliveries.push(delivery);
            partitions.push(partition);
        }
        let head_deliveries = self.send_heads(producer, &headers)?;
        let offsets = self.runtime.block_on(async {
            delivered(head_deliveries).await?;
            delivered(key_deliveries).await?;
            delivered(deliveries).await
        })?;
        let positions = offsets
            .into_iter()
            .zip(partitions)
            .map(|(offset, partition)| LogPosition::new(partition, offset as u64))
            .collect();
        // rdkafka's commit first flushes, and its flush polls for a fixed 100 ms whenever a
        // record is still counted as outstanding, which it is for a moment after its delivery
        // report. Waiting here for the count to reach zero is far shorter than that poll.
        let settle = std::time::Instant::now();
        while producer.in_flight_count() > 0 && settle.elapsed() < FLUSH_SETTLE {
            std::thread::sleep(Duration::from_micros(20));
        }
        producer.commit_transaction(APPEND_TIMEOUT)?;
        if let Some(keys) = &self.keys {
            keys.topic
                .mark_published(new_keys.into_iter().map(|(key_id, _)| key_id));
        }
        Ok(positions)
    }

    /// Reads up to `max` entries of `from`'s partition starting at `from`. With `skip_idle`, a
    /// partition of a log of several that was read up to its known end is polled without
    /// waiting: a projector reading the partitions in turn would otherwise wait on each idle
    /// one while records arrive in another. The end moves with this node's appends and with
    /// [`KafkaLog::fetch_end`], which an idle read calls through `resume_position`.
    fn read_partition(
        &self,
        from: LogPosition,
        max: usize,
        skip_idle: bool,
    ) -> Result<Vec<(LogPosition, Envelope)>, ReadError> {
        let failure = |source: KafkaError| ReadError {
            position: from,
            source: source.into(),
        };

        let Some(reader) = self.readers.get(from.partition as usize) else {
            return Err(ReadError {
                position: from,
                source: "the topic has no such partition".into(),
            });
        };
        let mut guard = reader.lock().expect("kafka reader lock is not poisoned");
        let Reader {
            consumer,
            cursor,
            behind_since,
        } = &mut *guard;
        let start = from.offset as i64;
        let fresh = *cursor != Some(start);
        if fresh {
            let partition = from.partition as i32;
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(&self.config.topic, partition, Offset::Offset(start))
                .map_err(failure)?;
            consumer.assign(&assignment).map_err(failure)?;
            *cursor = Some(start);
        }

        let idle = skip_idle
            && self.config.partitions > 1
            && !fresh
            && from.offset >= self.end.borrow().get(from.partition);

        let mut entries = Vec::new();
        // A fresh assignment returns records to its first poll only after a fetch round trip, so an empty
        // poll then means "not yet", not "nothing there": keep polling until a record or the
        // end of the partition shows up, within a bound.
        let started = std::time::Instant::now();
        let mut heard_back = false;
        while entries.len() < max {
            // Once records arrived, return with what the consumer has buffered rather than
            // wait for more: a projector that waits here keeps every waiting write waiting.
            let wait = if entries.is_empty() && !idle {
                READ_POLL
            } else {
                Duration::ZERO
            };
            match consumer.poll(wait) {
                None if fresh && !heard_back && started.elapsed() < APPEND_TIMEOUT => continue,
                None => break,
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    // The end of the partition, past any transaction markers.
                    break;
                }
                // NOTE: a connection error the client queued during an earlier outage fails
                // the read too. The projector then retries after a short wait; a take-over
                // reads through new clients, which have no such errors queued.
                Some(Err(error)) => {
                    *cursor = None;
                    return Err(failure(error));
                }
                Some(Ok(message)) => {
                    heard_back = true;
                    let offset = message.offset();
                    *cursor = Some(offset + 1);
                    if offset < start {
                        continue;
                    }
                    let bytes = message.payload().unwrap_or_default().to_vec();
                    entries.push((
                        LogPosition::new(from.partition, offset as u64),
                        Envelope(bytes),
                    ));
                }
            }
        }
        let behind = entries.is_empty() && from.offset < self.end.borrow().get(from.partition);
        if !behind {
            *behind_since = None;
        } else if behind_since.get_or_insert_with(Instant::now).elapsed() >= READER_STALL {
            match reader_consumer(&self.config) {
                Ok(fresh) => {
                    tracing::warn!(
                        partition = from.partition,
                        position = from.offset,
                        stalled_s = READER_STALL.as_secs(),
                        "a kafka reader fetched nothing though its partition contains more; replacing its client"
                    );
                    let stalled = std::mem::replace(consumer, fresh);
                    *cursor = None;
                    *behind_since = None;
                    self.readers_replaced.fetch_add(1, Ordering::Relaxed);
                    // Closing a client waits for its broker threads, which may be stuck too,
                    // so it runs on a thread of its own rather than under the reader's lock.
                    let closing = std::thread::Builder::new()
                        .name("chartlog-reader-close".into())
                        .spawn(move || drop(stalled));
                    if let Err(error) = closing {
                        tracing::warn!(
                            partition = from.partition,
                            error = %error,
                            "closing a replaced kafka reader in the background failed"
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(
                        partition = from.partition,
                        error = %anyhow::Error::from(error),
                        "replacing a stalled kafka reader failed; it is tried again on the next read"
                    );
                }
            }
        }
        Ok(entries)
    }

    /// Returns the key or head topic when the cluster answers that it does not exist, after a
    /// failed append; `None` when both exist or the cluster cannot be asked.
    fn missing_side_topic(&self, producer: &FutureProducer) -> Option<String> {
        // One request for both, so that an unreachable cluster costs one timeout.
        let metadata = producer.client().fetch_metadata(None, ABORT_TIMEOUT).ok()?;
        [
            key_topic_name(&self.config.topic),
            head_topic_name(&self.config.topic),
        ]
        .into_iter()
        .find(|name| !metadata.topics().iter().any(|topic| topic.name() == name))
    }

    /// Returns the wrapped records of the data keys the batch uses that the key topic does not
    /// hold yet.
    fn unpublished_keys(&self, headers: &[Option<EnvelopeFacts>]) -> Vec<(KeyId, Vec<u8>)> {
        let Some(keys) = &self.keys else {
            return Vec::new();
        };
        let mut seen = std::collections::HashSet::new();
        let mut records = Vec::new();
        for facts in headers.iter().flatten() {
            let key_id = facts.key_id;
            if !seen.insert(key_id) || keys.topic.is_published(key_id) {
                continue;
            }
            match keys.store.wrapped_record(key_id) {
                Ok(Some(record)) => records.push((key_id, record)),
                // The writer stores a chart's key before sealing its first event, so this
                // is a damaged key store; other nodes will report the key missing.
                Ok(None) => {
                    tracing::error!(key = %key_id, "data key to share is not in the key store")
                }
                Err(error) => {
                    tracing::error!(key = %key_id, error = %error, "data key to share could not be read")
                }
            }
        }
        records
    }

    /// Sends the new head of each chart the batch extends to the head topic, in the producer's
    /// open transaction.
    fn send_heads(
        &self,
        producer: &FutureProducer,
        headers: &[Option<EnvelopeFacts>],
    ) -> Result<Vec<DeliveryFuture>, KafkaError> {
        let mut heads = std::collections::HashMap::new();
        for facts in headers.iter().flatten() {
            heads.insert(facts.chart_id, encode_head(facts.seq, &facts.digest));
        }
        self.send_head_records(producer, heads)
    }

    /// Sends head records, chart id and encoded head, in the producer's open transaction.
    fn send_head_records(
        &self,
        producer: &FutureProducer,
        heads: impl IntoIterator<Item = (ChartId, [u8; 40])>,
    ) -> Result<Vec<DeliveryFuture>, KafkaError> {
        let heads: Vec<_> = heads.into_iter().collect();
        let topic = head_topic_name(&self.config.topic);
        let mut deliveries = Vec::with_capacity(heads.len());
        for (chart_id, value) in &heads {
            let message = FutureRecord::to(&topic)
                .partition(HEAD_PARTITION)
                .key(chart_id.as_bytes().as_slice())
                .payload(value.as_slice());
            deliveries.push(producer.send_result(message).map_err(|(error, _)| error)?);
        }
        Ok(deliveries)
    }

    /// Sends key records to the key topic in the producer's open transaction.
    fn send_keys(
        &self,
        producer: &FutureProducer,
        records: &[(KeyId, Vec<u8>)],
    ) -> Result<Vec<DeliveryFuture>, KafkaError> {
        let Some(keys) = &self.keys else {
            return Ok(Vec::new());
        };
        let mut deliveries = Vec::with_capacity(records.len());
        for (key_id, record) in records {
            let message = FutureRecord::to(keys.topic.name())
                .partition(KEY_PARTITION)
                .key(key_id.as_bytes().as_slice())
                .payload(record);
            deliveries.push(producer.send_result(message).map_err(|(error, _)| error)?);
        }
        Ok(deliveries)
    }

    /// Publishes, in a transaction of their own, the keys of the local key store that the key
    /// topic lacks: keys of charts created before the topic existed, or by this node's
    /// embedded log before it was copied here.
    fn publish_missing_keys(&self, producer: &FutureProducer) -> Result<usize, AppendError> {
        let Some(keys) = &self.keys else {
            return Ok(0);
        };
        keys.topic
            .catch_up_published(&keys.store)
            .map_err(|error| AppendError::Unavailable(error.into()))?;
        let ids = keys
            .store
            .key_ids()
            .map_err(|error| AppendError::Storage(error.into()))?;
        let mut records = Vec::new();
        for key_id in ids {
            if keys.topic.is_published(key_id) {
                continue;
            }
            if let Ok(Some(record)) = keys.store.wrapped_record(key_id) {
                records.push((key_id, record));
            }
        }
        if records.is_empty() {
            return Ok(0);
        }
        let sent = (|| {
            producer.begin_transaction()?;
            let deliveries = self.send_keys(producer, &records)?;
            self.runtime.block_on(delivered(deliveries))?;
            producer.commit_transaction(APPEND_TIMEOUT)
        })();
        if let Err(error) = sent {
            let _ = producer.abort_transaction(ABORT_TIMEOUT);
            return Err(AppendError::Unavailable(error.into()));
        }
        let count = records.len();
        keys.topic
            .mark_published(records.into_iter().map(|(key_id, _)| key_id));
        Ok(count)
    }
}

pub(crate) fn reader_consumer(
    config: &KafkaConfig,
) -> Result<BaseConsumer<ReaderContext>, KafkaOpenError> {
    config
        .client_config()
        .set(
            "group.id",
            format!("chartlog-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // With the default 500 ms fetch wait, writes that wait for their own projection took
        // hundreds of milliseconds in the bench: a read_committed fetch seems not to be woken
        // when a commit marker makes waiting records visible. A 5 ms wait cost more fetch
        // requests on an idle log and raised writes about fivefold (docs/BENCHMARKS.md).
        .set("fetch.wait.max.ms", "5")
        .create_with_context(ReaderContext)
        .map_err(client_error("consumer creation"))
}

/// Reads the end of every partition of the event topic.
fn partition_ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &KafkaConfig,
    timeout: Duration,
) -> Result<Frontier, KafkaError> {
    let mut ends = Vec::with_capacity(config.partitions as usize);
    for partition in 0..config.partitions {
        let (_, high) = consumer.fetch_watermarks(&config.topic, partition as i32, timeout)?;
        ends.push(high.max(0) as u64);
    }
    Ok(Frontier::from_offsets(ends))
}

/// Creates `name` with `partitions` partitions, unlimited retention and `cleanup_policy` when
/// it is missing, or checks that an existing topic keeps its records: retention unlimited and
/// the same cleanup policy. Returns whether the topic was created.
pub(crate) async fn ensure_topic(
    config: &KafkaConfig,
    name: &str,
    partitions: u32,
    cleanup_policy: &str,
) -> Result<bool, KafkaOpenError> {
    let admin = admin_client(config)?;
    let options = AdminOptions::new().request_timeout(Some(APPEND_TIMEOUT));
    let min_insync = config.min_insync_replicas.to_string();
    let replication = TopicReplication::Fixed(config.replication_factor);
    let topic = NewTopic::new(name, partitions as i32, replication)
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1")
        .set("cleanup.policy", cleanup_policy)
        .set("min.insync.replicas", &min_insync);
    let created = admin
        .create_topics(&[topic], &options)
        .await
        .map_err(client_error("topic creation"))?;
    let mut made = false;
    for result in created {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, "created kafka topic");
                made = true;
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) if is_rejection(code) => {
                return Err(KafkaOpenError::Rejected {
                    topic: name.to_owned(),
                    partitions,
                    replication_factor: config.replication_factor,
                    reason: if code == RDKafkaErrorCode::InvalidReplicationFactor {
                        format!("{code}; set CHARTLOG_KAFKA_REPLICATION_FACTOR to at most the number of brokers")
                    } else {
                        code.to_string()
                    },
                })
            }
            Err((_, code)) => {
                return Err(KafkaOpenError::Client {
                    action: "topic creation",
                    source: KafkaError::AdminOp(code),
                })
            }
        }
    }
    check_topic(config, name, cleanup_policy).await?;
    Ok(made)
}

/// Returns whether the cluster rejected a topic creation because of its settings or the
/// node's rights, which no retry changes, rather than because it timed out.
fn is_rejection(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidReplicaAssignment
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
    )
}

fn admin_client(config: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, KafkaOpenError> {
    config
        .client_config()
        .create()
        .map_err(client_error("admin client creation"))
}

/// Checks that the existing topic `name` keeps its records: retention unlimited and the
/// cleanup policy `cleanup_policy`.
pub(crate) async fn check_topic(
    config: &KafkaConfig,
    name: &str,
    cleanup_policy: &str,
) -> Result<(), KafkaOpenError> {
    let admin = admin_client(config)?;
    let options = AdminOptions::new().request_timeout(Some(APPEND_TIMEOUT));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(name)], &options)
        .await
        .map_err(client_error("topic description"))?;
    for resource in described {
        let resource = resource.map_err(|code| KafkaOpenError::Client {
            action: "topic description",
            source: KafkaError::AdminOp(code),
        })?;
        for entry in resource.entries {
            let value = entry.value.unwrap_or_default();
            let acceptable = match entry.name.as_str() {
                "retention.ms" | "retention.bytes" => value == "-1",
                "cleanup.policy" => value == cleanup_policy,
                _ => true,
            };
            if !acceptable {
                return Err(KafkaOpenError::Retention {
                    topic: name.to_owned(),
                    expected_policy: cleanup_policy.to_owned(),
                    setting: entry.name,
                    value,
                });
            }
        }
    }
    Ok(())
}

/// Rejects a topic with another number of partitions than configured. Charts are placed by
/// their id and the count, so with another count a chart's new events would go elsewhere than
/// its earlier ones. Records of unread partitions would also be neither projected nor verified.
fn check_partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    config: &KafkaConfig,
) -> Result<(), KafkaOpenError> {
    let topic = config.topic.as_str();
    let metadata = client
        .fetch_metadata(Some(topic), APPEND_TIMEOUT)
        .map_err(client_error("reading the topic's metadata"))?;
    let listed = metadata
        .topics()
        .iter()
        .find(|listed| listed.name() == topic);
    let partitions = listed.map_or(0, |listed| listed.partitions().len());
    let replicas = listed
        .and_then(|listed| listed.partitions().first())
        .map_or(0, |partition| partition.replicas().len());
    if replicas > 0 && (replicas as i32) < config.replication_factor {
        // Created earlier with fewer copies: acknowledged writes survive fewer broker losses
        // than configured. Changing it is a partition reassignment, an operator's decision.
        tracing::warn!(
            topic,
            replicas,
            configured = config.replication_factor,
            "the topic has fewer replicas than the configured replication factor"
        );
    }
    if partitions != config.partitions as usize {
        return Err(KafkaOpenError::Partitions {
            topic: topic.to_owned(),
            count: partitions,
            configured: config.partitions,
        });
    }
    Ok(())
}

impl EventLog for KafkaLog {
    fn append_batch(&self, envelopes: &[Envelope]) -> Result<Vec<LogPosition>, AppendError> {
        if self.read_only {
            return Err(AppendError::Unavailable(
                "the kafka log was opened for reading only".into(),
            ));
        }
        if !self.owner.load(Ordering::SeqCst) {
            return Err(AppendError::Unavailable(
                "this node does not hold the partition: another node writes it, or this node was fenced and has not taken it back yet".into(),
            ));
        }
        let mut slot = self.producer.lock().expect("producer lock is not poisoned");
        if slot.is_none() {
            // Taking the transactional id back fences the producer that has it now. That is
            // safe only if no other node wrote since this node's last commit: otherwise this
            // node's chart heads are stale, and writing would fork a chain. The partition is
            // then taken over again only after the state is rebuilt.
            if self
                .has_foreign_records()
                .map_err(|error| AppendError::Unavailable(error.into()))?
            {
                self.owner.store(false, Ordering::SeqCst);
                return Err(AppendError::Unavailable(
                    "another node wrote to the partition; this node rebuilds its state before writing again".into(),
                ));
            }
            let producer = self
                .new_producer()
                .map_err(|error| AppendError::Unavailable(error.into()))?;
            *slot = Some(producer);
        }
        let producer = slot.as_ref().expect("the producer was created above");
        match self.append_in_transaction(producer, envelopes) {
            Ok(positions) => {
                if !positions.is_empty() {
                    let mut committed = self
                        .committed_end
                        .lock()
                        .expect("committed end lock is not poisoned");
                    for position in &positions {
                        committed.raise(position.partition, position.offset + 1);
                    }
                    self.end.send_if_modified(|end| end.raise_to(&committed));
                    drop(committed);
                    self.confirm_end();
                }
                Ok(positions)
            }
            Err(error) => {
                let fenced_code = matches!(
                    error.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::Fenced
                            | RDKafkaErrorCode::ProducerFenced
                            | RDKafkaErrorCode::InvalidProducerEpoch
                    )
                );
                // A fenced producer's queued records come back purged, so the producer's own
                // fatal-error state is the reliable sign, with the error codes as a second one.
                let fatal = producer.client().fatal_error().is_some()
                    || fenced_code
                    || matches!(&error, KafkaError::Transaction(transaction) if transaction.is_fatal());
                let missing = if fatal {
                    None
                } else {
                    self.missing_side_topic(producer)
                };
                if let Some(topic) = missing {
                    // Every later transaction would fail the same way. Taking the log over
                    // again creates the topic and fills it from the keys and the log.
                    tracing::error!(topic = %topic, "a topic beside the log is missing; this node takes the log over again to create it");
                    self.owner.store(false, Ordering::SeqCst);
                    *slot = None;
                } else if fatal {
                    // Fenced by a newer writer (or otherwise unusable for good): this node's
                    // state may be stale from now on, so it stops writing until it has taken
                    // the partition over again, state rebuilt.
                    tracing::error!(error = %error, "kafka producer fenced; this node stops writing");
                    self.owner.store(false, Ordering::SeqCst);
                    *slot = None;
                } else if producer.abort_transaction(ABORT_TIMEOUT).is_err() {
                    // An aborted transaction leaves nothing visible to read_committed readers.
                    // A producer that cannot abort (the broker is away) is replaced at the next
                    // append, after the check above.
                    *slot = None;
                }
                Err(AppendError::Unavailable(error.into()))
            }
        }
    }

    fn read_from(
        &self,
        from: LogPosition,
        max: usize,
    ) -> Result<Vec<(LogPosition, Envelope)>, ReadError> {
        self.read_partition(from, max, true)
    }

    fn partitions(&self) -> u32 {
        self.config.partitions
    }

    fn separate_reader(&self) -> Result<Option<Box<dyn EventLog>>, ReadError> {
        let failure = |error: KafkaOpenError| ReadError {
            position: LogPosition::new(0, 0),
            source: error.into(),
        };
        let consumer = reader_consumer(&self.config).map_err(failure)?;
        let end = self.end.borrow().clone();
        let reader = KafkaLog::assemble(
            self.config.clone(),
            self.runtime.clone(),
            consumer,
            end,
            true,
        )
        .map_err(failure)?;
        Ok(Some(Box::new(reader)))
    }

    fn end_position(&self) -> watch::Receiver<Frontier> {
        self.end.subscribe()
    }

    fn is_dense(&self) -> bool {
        false
    }

    fn backend_name(&self) -> &'static str {
        "kafka"
    }

    fn begin_ownership(&self) -> Result<(), AppendError> {
        if self.read_only {
            return Err(AppendError::Unavailable(
                "the kafka log was opened for reading only".into(),
            ));
        }
        self.owner.store(false, Ordering::SeqCst);
        // A node that started while the cluster was away has not checked the topic yet, and
        // settings can change while a node runs: check before writing. The event topic is
        // never created here, since a new empty topic under a node that projected the old one
        // would look like a log that lost everything.
        self.runtime
            .block_on(check_topic(&self.config, &self.config.topic, "delete"))
            .map_err(|error| AppendError::Unavailable(error.into()))?;
        reader_consumer(&self.config)
            .and_then(|consumer| check_partitions(consumer.client(), &self.config))
            .map_err(|error| AppendError::Unavailable(error.into()))?;
        // The topics beside the log were there when the log was opened; a key or head topic
        // deleted since would stop every append, and the loss of the head topic would go
        // unnoticed by the head check. The access topic only carries accesses in transit.
        let mut side_topics = vec![
            (key_topic_name(&self.config.topic), "compact"),
            (head_topic_name(&self.config.topic), "compact"),
            (access_topic_name(&self.config.topic), "delete"),
        ];
        let lease_topic = lease_topic_name(&self.config.topic, self.config.partitions);
        if lease_topic != self.config.topic {
            side_topics.push((lease_topic, "delete"));
        }
        for (name, policy) in side_topics {
            let created = self
                .runtime
                .block_on(ensure_topic(&self.config, &name, 1, policy))
                .map_err(|error| AppendError::Unavailable(error.into()))?;
            if created {
                tracing::error!(topic = %name, "a topic beside the log was missing and was created again; what it held is restored from this node's keys and the log");
                if let Some(keys) = self.keys.as_ref().filter(|keys| keys.topic.name() == name) {
                    keys.topic.forget_published();
                }
            }
        }
        let mut slot = self.producer.lock().expect("producer lock is not poisoned");
        // Initializing the transactional id fences the previous holder and aborts its open
        // transaction, so the end read afterwards includes every record it committed.
        *slot = None;
        let producer = self
            .new_producer()
            .map_err(|error| AppendError::Unavailable(error.into()))?;
        let consumer = reader_consumer(&self.config)
            .map_err(|error| AppendError::Unavailable(error.into()))?;
        let end = partition_ends(&consumer, &self.config, APPEND_TIMEOUT)
            .map_err(|error| AppendError::Unavailable(error.into()))?;
        *self
            .committed_end
            .lock()
            .expect("committed end lock is not poisoned") = end.clone();
        let published = self.publish_missing_keys(&producer)?;
        if published > 0 {
            tracing::info!(keys = published, "published data keys to the key topic");
        }
        *slot = Some(producer);
        self.end.send_if_modified(|known| known.raise_to(&end));
        self.confirm_end();
        Ok(())
    }

    fn complete_ownership(&self) {
        self.owner.store(true, Ordering::SeqCst);
    }

    fn record_heads(&self, heads: &[RecordedHead]) -> Result<(), AppendError> {
        if heads.is_empty() {
            return Ok(());
        }
        let slot = self.producer.lock().expect("producer lock is not poisoned");
        let producer = slot.as_ref().ok_or_else(|| {
            AppendError::Unavailable("the log is not being taken over by this node".into())
        })?;
        let records = heads
            .iter()
            .map(|(chart_id, seq, digest)| (*chart_id, encode_head(*seq, digest)));
        let sent = (|| {
            producer.begin_transaction()?;
            let deliveries = self.send_head_records(producer, records)?;
            self.runtime.block_on(delivered(deliveries))?;
            producer.commit_transaction(APPEND_TIMEOUT)
        })();
        if let Err(error) = sent {
            let _ = producer.abort_transaction(ABORT_TIMEOUT);
            return Err(AppendError::Unavailable(error.into()));
        }
        Ok(())
    }

    fn max_resource_bytes(&self) -> Option<usize> {
        // A record larger than the producer's `message.max.bytes` is refused by the client, and
        // the transaction carrying it fails. The margin covers the envelope's header (actor and
        // purpose strings included), the payload framing, the tag, the digest and the signature.
        let record_limit = self
            .config
            .properties
            .get("message.max.bytes")
            .and_then(|value| value.parse::<usize>().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Some(record_limit.saturating_sub(ENVELOPE_MARGIN))
    }

    fn recorded_heads(&self) -> Result<Option<Vec<RecordedHead>>, ReadError> {
        read_heads(&self.config).map_err(|source| ReadError {
            position: LogPosition::default(),
            source: source.into(),
        })
    }

    fn release_ownership(&self) {
        self.owner.store(false, Ordering::SeqCst);
    }

    fn is_owner(&self) -> bool {
        self.owner.load(Ordering::SeqCst)
    }

    fn resume_position(&self, from: LogPosition) -> Result<LogPosition, ReadError> {
        let Some(reader) = self.readers.get(from.partition as usize) else {
            return Ok(from);
        };
        let reader = reader.lock().expect("kafka reader lock is not poisoned");
        let position = reader.consumer.position().map_err(|source| ReadError {
            position: from,
            source: source.into(),
        })?;
        let next = position
            .find_partition(&self.config.topic, from.partition as i32)
            .and_then(|element| match element.offset() {
                Offset::Offset(offset) if offset >= 0 => Some(offset as u64),
                _ => None,
            })
            .unwrap_or(from.offset);
        // The end of the log moves with this node's own appends only; on a standby, others
        // append. Asking the broker here, when a read found nothing new, keeps the end (and so
        // the lag `/health` reports) current at one small request per idle read.
        if let Some(high) = self.fetch_end(&reader.consumer, from.partition) {
            if high < from.offset {
                return Err(ReadError {
                    position: from,
                    source: Box::new(super::EntriesLost {
                        end: LogPosition::new(from.partition, high),
                    }),
                });
            }
        }
        Ok(LogPosition::new(from.partition, next.max(from.offset)))
    }

    fn refresh_end(&self) {
        for (partition, reader) in self.readers.iter().enumerate() {
            let reader = reader.lock().expect("kafka reader lock is not poisoned");
            self.fetch_end(&reader.consumer, partition as u32);
        }
    }

    fn readers_replaced(&self) -> u64 {
        self.readers_replaced.load(Ordering::Relaxed)
    }

    fn end_age(&self) -> Option<Duration> {
        // The end is as old as its least recently confirmed partition's.
        let confirmed = self
            .end_confirmed
            .lock()
            .expect("end confirmation lock is not poisoned");
        confirmed
            .iter()
            .map(|confirmed| confirmed.map(|confirmed| confirmed.elapsed()))
            .try_fold(Duration::ZERO, |oldest, age| age.map(|age| oldest.max(age)))
    }
}
