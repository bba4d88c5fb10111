//! The key topic: how the nodes on one Kafka log share the data keys of the charts they create.
//!
//! Each record is one chart's data key as the key store keeps it, wrapped by the
//! key-encryption key, which every node on the log shares. The record key is the key id, and
//! the topic is compacted, so a key could later be removed by a tombstone. The writer sends a
//! chart's key record in the same Kafka transaction as the chart's first events, so any node
//! that can read an event can also read its key. A node reads the topic whenever its key store
//! lacks a key, importing what it finds.
//!
//! Invariant: the topic carries only wrapped keys. Without the key-encryption key, its records
//! open nothing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chartlog_schemas::KeyId;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::kafka::{
    ensure_topic, is_connection_error, reader_consumer, KafkaConfig, KafkaOpenError, ReaderContext,
};
use crate::crypto::{KeySource, KeyStore, KeyStoreError};

/// The key topic's only partition.
pub const KEY_PARTITION: i32 = 0;

/// How long one catch-up may read before giving up for now.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one poll of the catch-up waits for records.
const POLL: Duration = Duration::from_millis(200);

/// The key topic of one Kafka log.
pub struct KeyTopic {
    name: String,
    /// Settings for a new reader after a failed catch-up.
    config: KafkaConfig,
    reader: Mutex<KeyReader>,
    /// Ids of the keys the topic is known to hold: read from it, or committed to it by this
    /// node.
    published: Mutex<HashSet<KeyId>>,
}

struct KeyReader {
    consumer: BaseConsumer<ReaderContext>,
    /// Offset to read next.
    next: i64,
}

/// Returns the key topic that belongs to the event topic `topic`.
pub fn key_topic_name(topic: &str) -> String {
    format!("{topic}.keys")
}

impl KeyTopic {
    /// Connects to the key topic of `config.topic`, creating it when `create` is set and it is
    /// missing (compacted, unlimited retention), and checking an existing one.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError`] when the cluster cannot be reached or the topic would lose records.
    pub async fn open(config: &KafkaConfig, create: bool) -> Result<Arc<KeyTopic>, KafkaOpenError> {
        let name = key_topic_name(&config.topic);
        if create {
            ensure_topic(config, &name, 1, "compact").await?;
        }
        let consumer = reader_consumer(config)?;
        Ok(Arc::new(KeyTopic {
            name,
            config: config.clone(),
            reader: Mutex::new(KeyReader { consumer, next: 0 }),
            published: Mutex::new(HashSet::new()),
        }))
    }

    /// Returns the topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns whether the topic is known to hold the key.
    pub fn is_published(&self, key_id: KeyId) -> bool {
        self.published
            .lock()
            .expect("published key lock is not poisoned")
            .contains(&key_id)
    }

    /// Records that keys were committed to the topic.
    pub fn mark_published(&self, key_ids: impl IntoIterator<Item = KeyId>) {
        self.published
            .lock()
            .expect("published key lock is not poisoned")
            .extend(key_ids);
    }

    /// Forgets what the topic was known to hold, after it was found missing and created
    /// again, so that the next catch-up reads it from its start and every local key is
    /// published again.
    pub fn forget_published(&self) {
        self.published
            .lock()
            .expect("published key lock is not poisoned")
            .clear();
        self.reader
            .lock()
            .expect("key reader lock is not poisoned")
            .next = 0;
    }

    /// Reads the topic from where the last catch-up stopped to its end, importing each key
    /// the store lacks. After a failure the reader's consumer is replaced, so that nothing it
    /// kept (queued errors, metadata from before a broker restart) outlives the failure, and a
    /// failure that came at once is tried again with the new consumer.
    fn read_to_end(&self, store: &KeyStore) -> Result<(), KafkaError> {
        let result = self.read_to_end_once(store);
        let Err(error) = &result else {
            return result;
        };
        let timed_out = matches!(error, KafkaError::Canceled)
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut);
        match reader_consumer(&self.config) {
            Ok(consumer) => {
                self.reader
                    .lock()
                    .expect("key reader lock is not poisoned")
                    .consumer = consumer;
            }
            Err(replace_error) => {
                tracing::warn!(topic = %self.name, error = %replace_error, "key topic reader not replaced");
                return result;
            }
        }
        // A cluster that timed out will most likely time out again, so only fast failures are
        // retried.
        if timed_out {
            return result;
        }
        tracing::debug!(topic = %self.name, error = %error, "key topic catch-up failed; trying once more with a new reader");
        self.read_to_end_once(store)
    }

    fn read_to_end_once(&self, store: &KeyStore) -> Result<(), KafkaError> {
        let mut reader = self.reader.lock().expect("key reader lock is not poisoned");
        let KeyReader { consumer, next } = &mut *reader;
        let (_, high) = consumer.fetch_watermarks(&self.name, KEY_PARTITION, CATCH_UP_TIMEOUT)?;
        if *next > high {
            // The topic ends before where this reader got: it was deleted and created again.
            // Read the new one from its start.
            tracing::warn!(topic = %self.name, "key topic ends before the position read so far; reading it again from its start");
            *next = 0;
            self.published
                .lock()
                .expect("published key lock is not poisoned")
                .clear();
        }
        if *next >= high {
            return Ok(());
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.name, KEY_PARTITION, Offset::Offset(*next))?;
        consumer.assign(&assignment)?;
        let started = Instant::now();
        let mut imported = Vec::new();
        // The last connection error polled, returned only if the catch-up then fails to reach
        // `high` in time.
        let mut client_error = None;
        loop {
            if started.elapsed() > CATCH_UP_TIMEOUT {
                return Err(client_error.unwrap_or(KafkaError::Canceled));
            }
            match consumer.poll(POLL) {
                Some(Ok(message)) => {
                    *next = message.offset() + 1;
                    let key_id = message
                        .key()
                        .and_then(|key| <[u8; 16]>::try_from(key).ok())
                        .map(KeyId::from_bytes);
                    match (key_id, message.payload()) {
                        (Some(key_id), Some(record)) => {
                            match store.import_wrapped(key_id, record) {
                                Ok(_) => imported.push(key_id),
                                Err(error) => {
                                    tracing::error!(key = %key_id, error = %error, "shared data key not imported");
                                }
                            }
                        }
                        // NOTE: a tombstone would remove a shredded chart's key; nothing writes
                        // one yet, so none is acted on.
                        (Some(_), None) => {}
                        (None, _) => {
                            tracing::error!(
                                offset = message.offset(),
                                "key topic record without a key id skipped"
                            );
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(error)) if is_connection_error(&error) => {
                    // The queue also carries the client's connection errors, which librdkafka
                    // recovers from by itself. This consumer is polled only during a catch-up,
                    // so such an error may have waited since an outage that ended long ago.
                    // Returning it would fail each catch-up on one queued error, before any
                    // record is read. The broker has just returned the watermark, so read on.
                    tracing::debug!(topic = %self.name, error = %error, "client error during a key topic catch-up; reading on");
                    client_error = Some(error);
                }
                Some(Err(error)) => return Err(error),
                None => {}
            }
            if *next >= high {
                break;
            }
        }
        // Transaction markers take offsets too: continue after them next time.
        if let Ok(position) = consumer.position() {
            if let Some(Offset::Offset(offset)) = position
                .find_partition(&self.name, KEY_PARTITION)
                .map(|element| element.offset())
            {
                *next = (*next).max(offset);
            }
        }
        drop(reader);
        self.mark_published(imported);
        Ok(())
    }
}

impl KeyTopic {
    /// Reads the topic to its end like a catch-up, so that [`KeyTopic::is_published`] covers
    /// every key it holds.
    ///
    /// # Errors
    ///
    /// The Kafka error when the topic cannot be read.
    pub fn catch_up_published(&self, store: &KeyStore) -> Result<(), KafkaError> {
        self.read_to_end(store)
    }
}

impl KeySource for KeyTopic {
    fn catch_up(&self, store: &KeyStore) -> Result<(), KeyStoreError> {
        self.read_to_end(store)
            .map_err(|error| KeyStoreError::Source(format!("key topic {}: {error}", self.name)))
    }
}
