//! A running Chartlog node: the key store, the log, the writer and the projector, opened from
//! one data directory.
//!
//! Start-up order matters: keys first (so every envelope can be opened), then the log, then the
//! writer state rebuilt by replaying and checking the whole log, then the projection catches up.
//! Only after that does the node accept requests.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use chartlog_projections::ChartProjection;
use chartlog_schemas::{ChartId, EventSeq};
use tokio::sync::watch;

use crate::command::WriterState;
use crate::crypto::keystore::KeyPaths;
use crate::crypto::KeyStore;
use crate::journal::{self, AccessJournal};
use crate::log::access_topic::AccessTopic;
use crate::log::kafka::KafkaOpenError;
use crate::log::key_topic::KeyTopic;
use crate::log::ownership::{Ownership, Role};
use crate::log::{
    partition_of, EmbeddedLog, EventLog, Frontier, KafkaConfig, KafkaLog, LogPosition,
};
use crate::projector::{self, ProjectorStatus};
use crate::writer::Writer;

/// File locations of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The key-encryption key file; defaults to `DATA/keys/kek.key`.
    pub kek_file: Option<PathBuf>,
    /// The Kafka log to use instead of the embedded log in the data directory.
    pub kafka: Option<KafkaConfig>,
    /// Base URL of this node's FHIR endpoint as clients reach it. On Kafka, standbys redirect
    /// clients to the owner's; required there.
    pub url: Option<String>,
}

impl NodeConfig {
    /// Returns the key store's paths.
    pub fn key_paths(&self) -> KeyPaths {
        KeyPaths::under(&self.data_dir, self.kek_file.clone())
    }

    /// Returns the directory of the embedded log.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }

    /// Returns the directory of the access journal.
    pub fn access_journal_dir(&self) -> PathBuf {
        self.data_dir.join("access-journal")
    }

    /// Returns the file holding the node's id, which names it in the Kafka owner group across
    /// restarts.
    pub fn node_id_file(&self) -> PathBuf {
        self.data_dir.join("node-id")
    }

    /// Returns the directory of the chart projection.
    pub fn chart_projection_dir(&self) -> PathBuf {
        self.data_dir.join("projections").join("chart")
    }
}

/// A started node.
pub struct Node {
    /// Writer handle.
    pub writer: Writer,
    /// The chart read model.
    pub projection: Arc<ChartProjection>,
    /// Keys.
    pub keys: Arc<KeyStore>,
    /// The log.
    pub log: Arc<dyn EventLog>,
    /// Projector status.
    pub projector: watch::Receiver<ProjectorStatus>,
    /// Accesses of reads served while the log could not take their events.
    pub access_journal: Arc<AccessJournal>,
    /// On Kafka, this node's role: owner of the log or standby. `None` on the embedded log,
    /// which its node always owns.
    pub role: Option<watch::Receiver<Role>>,
    /// On Kafka, why this node's attempts to take the log over keep failing, if they do.
    pub take_over_error: Option<watch::Receiver<Option<String>>>,
    membership: Option<Ownership>,
    shutdown: watch::Sender<bool>,
    projector_task: Option<tokio::task::JoinHandle<()>>,
    drain_task: Option<tokio::task::JoinHandle<()>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

/// Returns the Kafka topic that the chart projection of `config`'s data directory was built
/// from, when it was built from one: such a directory belongs to a node on Kafka and has no
/// embedded log.
pub fn projected_kafka_topic(config: &NodeConfig) -> Option<String> {
    let name = ChartProjection::read_bound_log(&config.chart_projection_dir()).ok()??;
    let (topic, _partitions) = name.strip_prefix("kafka ")?.rsplit_once(' ')?;
    Some(topic.to_owned())
}

/// Explains an open failure in terms of the data directory when RocksDB reports its lock.
fn explain_lock(error: anyhow::Error, data_dir: &Path) -> anyhow::Error {
    let text = format!("{error:#}");
    if text.contains("LOCK")
        || text.contains("lock hold")
        || text.contains("Resource temporarily unavailable")
    {
        anyhow::anyhow!(
            "data directory {} is in use by another Chartlog process; stop it or choose another --data",
            data_dir.display()
        )
    } else {
        error
    }
}

/// Rebuilds the writer state by checking and decrypting every entry of the log.
///
/// # Errors
///
/// Fails on the first entry that does not check or decrypt, naming its position.
pub fn rebuild_writer_state(log: &dyn EventLog, keys: &KeyStore) -> anyhow::Result<WriterState> {
    let mut state = WriterState::default();
    // A read can return nothing before the end, as from a Kafka consumer that is still
    // fetching after an outage. A state rebuilt from part of the log would look as if events
    // were removed, so the rebuild reads up to the end known now.
    let ends = log.end_position().borrow().clone();
    let partitions = log.partitions();
    for partition in 0..partitions {
        let end = LogPosition::new(partition, ends.get(partition));
        let mut position = LogPosition::new(partition, 0);
        let started = Instant::now();
        loop {
            let entries = log
                .read_from(position, 4096)
                .context("reading the log at start-up")?;
            if entries.is_empty() {
                if position >= end {
                    break;
                }
                // Past transaction markers, Kafka's next position may already be the end.
                let resumed = log
                    .resume_position(position)
                    .context("reading the log at start-up")?;
                if resumed >= end {
                    break;
                }
                position = position.max(resumed);
                if started.elapsed() > REBUILD_READ_LIMIT {
                    anyhow::bail!(
                        "the log could not be read past position {position} of {end} within {} s",
                        REBUILD_READ_LIMIT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            for (at, envelope) in &entries {
                if log.is_dense() && *at != position {
                    anyhow::bail!(
                        "log entries at positions {position} to {} are missing; run chartlog-replay verify",
                        at.offset.saturating_sub(1)
                    );
                }
                let (header, payload, digest) = projector::open_envelope(keys, *at, envelope)
                    .with_context(|| format!("replaying log entry {at} at start-up"))?;
                let home = partition_of(header.chart_id, partitions);
                if home != partition {
                    anyhow::bail!(
                        "log entry {at} belongs to chart {}, whose events go to partition {home} of {partitions}: it was written there by something other than Chartlog's writer, or partitions were added to the topic after it was written; run chartlog-replay verify",
                        header.chart_id
                    );
                }
                let head = state.chart(header.chart_id);
                let expected_seq = head.map_or(EventSeq::FIRST, |head| head.seq.next());
                let expected_digest = head.map_or([0u8; 32], |head| head.digest);
                if header.seq != expected_seq || header.prev_digest != expected_digest {
                    anyhow::bail!(
                        "log entry {at} (chart {}, sequence {}) does not continue its chart's hash chain; run chartlog-replay verify",
                        header.chart_id,
                        header.seq
                    );
                }
                state.replay(&header, &payload, digest);
                position = at.next();
            }
        }
    }
    Ok(state)
}

/// How long rebuilding the writer state may wait for reads to reach the end of the log.
const REBUILD_READ_LIMIT: Duration = Duration::from_secs(60);

/// How long opening a node on Kafka waits for the owner group to decide its role.
const ROLE_WAIT: Duration = Duration::from_secs(60);

/// Reads the node's id, creating it on first start.
fn read_or_create_node_id(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                anyhow::bail!(
                    "{} does not hold a node id; remove it to have a new one created",
                    path.display()
                );
            }
            Ok(id.to_owned())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(path, format!("{id}\n"))
                .with_context(|| format!("cannot write the node id to {}", path.display()))?;
            tracing::info!(path = %path.display(), "created node id file");
            Ok(id)
        }
        Err(error) => {
            Err(error).with_context(|| format!("cannot read the node id from {}", path.display()))
        }
    }
}

/// Checks that every chart ends at the head recorded with its appends.
pub(crate) fn check_heads(
    state: &WriterState,
    heads: &[(ChartId, EventSeq, [u8; 32])],
) -> anyhow::Result<()> {
    for (chart_id, seq, digest) in heads {
        let matches = state
            .chart(*chart_id)
            .is_some_and(|head| head.seq == *seq && head.digest == *digest);
        if !matches {
            let found = state.chart(*chart_id).map_or(0, |head| head.seq.0);
            if found > seq.0 {
                anyhow::bail!(
                    "chart {chart_id} continues to sequence {found} past its recorded head (sequence {seq}): the recorded heads were rolled back or altered; run chartlog-replay verify"
                );
            }
            anyhow::bail!(
                "chart {chart_id} does not end at its recorded head (sequence {seq}, found {found}): events were removed or altered; run chartlog-replay verify"
            );
        }
    }
    Ok(())
}

impl Node {
    /// Opens or creates the node's data directory and starts the writer and projector on the
    /// current tokio runtime. Logs where files were created.
    ///
    /// # Errors
    ///
    /// Fails with a one-line explanation when the directory is in use, a key file is missing
    /// or unreadable, or the log does not verify.
    pub async fn open(config: &NodeConfig) -> anyhow::Result<Node> {
        Self::open_with(config, |log| log).await
    }

    /// Opens a node like [`Node::open`], letting `wrap` interpose on the embedded log, for
    /// tests that count or fail appends.
    ///
    /// # Errors
    ///
    /// As [`Node::open`].
    pub async fn open_with(
        config: &NodeConfig,
        wrap: impl FnOnce(Arc<dyn EventLog>) -> Arc<dyn EventLog>,
    ) -> anyhow::Result<Node> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;

        let key_paths = config.key_paths();
        let initialized = key_paths.is_initialized();
        let (keys, created) = KeyStore::open(&key_paths, !initialized)
            .map_err(anyhow::Error::from)
            .map_err(|error| explain_lock(error, &data_dir))?;
        for path in &created {
            tracing::info!(path = %path.display(), "created key file");
        }
        let keys = Arc::new(keys);

        let mut offline = false;
        let mut access_topic = None;
        let (log, heads, partition): (Arc<dyn EventLog>, Option<Vec<_>>, Option<i32>) =
            match &config.kafka {
                None => {
                    // A data directory whose key database exists was initialized with a log: a
                    // missing log is lost data, never a reason to start an empty one.
                    let log_dir = config.log_dir();
                    if initialized && !log_dir.exists() {
                        if let Some(topic) = projected_kafka_topic(config) {
                            anyhow::bail!(
                                "data directory {} belongs to a node on the Kafka topic {topic}; start it with CHARTLOG_LOG_BACKEND=kafka and the CHARTLOG_KAFKA_* settings of that topic",
                                data_dir.display()
                            );
                        }
                        anyhow::bail!(
                        "the log at {} is missing; this data directory was initialized with one, so restore it from a backup",
                        log_dir.display()
                    );
                    }
                    let log = EmbeddedLog::open(&log_dir, true)
                        .map_err(anyhow::Error::from)
                        .map_err(|error| explain_lock(error, &data_dir))?;
                    let heads = log.chart_heads().context("reading the chart heads")?;
                    (wrap(Arc::new(log)), Some(heads), None)
                }
                Some(kafka) => {
                    // A node that ran on this log before starts while the cluster is away,
                    // serving what it projected; a first start needs the cluster, so that a
                    // wrong address fails at once.
                    // The event topic first: one that would lose records is refused before
                    // any topic is created beside it.
                    let opened = async {
                        let log = KafkaLog::open_unowned(kafka.clone()).await?;
                        let key_topic = KeyTopic::open(kafka, true).await?;
                        let accesses = AccessTopic::open(kafka, true).await?;
                        Ok::<_, KafkaOpenError>((key_topic, log, accesses))
                    }
                    .await;
                    let (key_topic, mut log) = match opened {
                        Ok((key_topic, log, accesses)) => {
                            access_topic = Some(accesses);
                            (key_topic, log)
                        }
                        Err(error @ KafkaOpenError::Client { .. }) if initialized => {
                            tracing::warn!(
                                topic = %kafka.topic,
                                error = %format!("{:#}", anyhow::Error::from(error)),
                                "the kafka cluster cannot be reached; serving what is projected until it can"
                            );
                            let key_topic =
                                KeyTopic::open(kafka, false).await.with_context(|| {
                                    format!("cannot open the key topic of {}", kafka.topic)
                                })?;
                            let log = KafkaLog::open_offline(kafka.clone()).with_context(|| {
                                format!("cannot open the Kafka log on topic {}", kafka.topic)
                            })?;
                            offline = true;
                            access_topic = Some(AccessTopic::open(kafka, false).await?);
                            (key_topic, log)
                        }
                        Err(error @ KafkaOpenError::Client { .. }) => {
                            return Err(anyhow::Error::from(error).context(format!(
                                "cannot open the Kafka log on topic {}; a node's first start needs the cluster",
                                kafka.topic
                            )))
                        }
                        Err(error) => {
                            return Err(anyhow::Error::from(error).context(format!(
                                "cannot open the Kafka log on topic {}",
                                kafka.topic
                            )))
                        }
                    };
                    keys.set_source(key_topic.clone());
                    log.attach_keys(keys.clone(), key_topic);
                    tracing::info!(topic = %kafka.topic, "using the kafka log");
                    let partition = log.lease_partition();
                    (wrap(Arc::new(log)), None, Some(partition))
                }
            };

        // On Kafka the writer rebuilds its state when it takes the log over, after fencing the
        // previous writer; until then it appends nothing.
        let state = match &heads {
            Some(heads) => {
                let started = Instant::now();
                let state = {
                    let (log, keys) = (log.clone(), keys.clone());
                    tokio::task::spawn_blocking(move || rebuild_writer_state(log.as_ref(), &keys))
                        .await??
                };
                check_heads(&state, heads)?;
                tracing::info!(
                    charts = state.chart_count(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "writer state rebuilt from the log"
                );
                state
            }
            None => WriterState::default(),
        };

        let projection = ChartProjection::open(&config.chart_projection_dir())
            .map_err(anyhow::Error::from)
            .map_err(|error| explain_lock(error, &data_dir))?;
        let projection = Arc::new(projection);
        if projection.cleared_for_rebuild() {
            tracing::warn!(
                "the chart projection was written in an earlier layout; it was cleared and is rebuilt from the log"
            );
        }
        let log_name = crate::log::log_name(config.kafka.as_ref());
        if projection.bind_log(&log_name)? {
            tracing::warn!(
                log = %log_name,
                "the chart projection was built from another log; it was cleared and is rebuilt from this one"
            );
        }
        let applied = Frontier::from_offsets(projection.positions(log.partitions())?);
        let log_end = log.end_position().borrow().clone();
        // A node started while the cluster is away does not know the end yet; its projector
        // makes this check once it does.
        if !offline {
            for partition in 0..log.partitions() {
                let (applied, end) = (applied.get(partition), log_end.get(partition));
                if applied > end {
                    anyhow::bail!(
                        "the chart projection has applied {} but the log ends at {}: entries were lost from the log; restore it from a backup and run chartlog-replay verify",
                        LogPosition::new(partition, applied),
                        LogPosition::new(partition, end)
                    );
                }
            }
        }

        let (shutdown, shutdown_receiver) = watch::channel(false);
        let (writer, writer_thread) = Writer::start(
            log.clone(),
            keys.clone(),
            Arc::new(RwLock::new(state)),
            applied,
        );
        let (projector, projector_task) = projector::start(
            log.clone(),
            keys.clone(),
            projection.clone(),
            shutdown_receiver.clone(),
        );
        let access_journal = AccessJournal::open(&config.access_journal_dir(), keys.clone())
            .map_err(anyhow::Error::from)
            .map_err(|error| explain_lock(error, &data_dir))?;
        let access_journal = Arc::new(access_journal);
        let waiting = *access_journal.pending().borrow();
        if waiting > 0 {
            tracing::info!(
                pending = waiting,
                "access journal has accesses waiting for the log"
            );
        }

        let membership = match (&config.kafka, partition) {
            (Some(kafka), Some(partition)) => {
                let url = config
                    .url
                    .as_deref()
                    .context("a node on the Kafka log needs the base URL clients reach it at")?;
                let node_id = read_or_create_node_id(&config.node_id_file())?;
                let membership = Ownership::start(
                    kafka,
                    partition,
                    &node_id,
                    url,
                    log.clone(),
                    writer.downgrade(),
                )
                .context("cannot join the Kafka owner group")?;
                Some(membership)
            }
            _ => None,
        };
        let role = membership.as_ref().map(Ownership::role);
        let settled = membership.as_ref().map(Ownership::settled);
        let take_over_error = membership.as_ref().map(Ownership::take_over_error);
        let handoff = match (access_topic, &role) {
            (Some(topic), Some(role)) => Some(journal::Handoff {
                topic: Arc::new(topic),
                role: role.clone(),
                log: log.clone(),
                own_url: config.url.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        let drain_task = journal::start_drain(
            access_journal.clone(),
            writer.downgrade(),
            handoff,
            shutdown_receiver,
        );

        let node = Node {
            writer,
            projection,
            keys,
            log,
            projector,
            access_journal,
            role,
            take_over_error,
            membership,
            shutdown,
            projector_task: Some(projector_task),
            drain_task: Some(drain_task),
            writer_thread: Some(writer_thread),
        };
        let end = node.log.end_position().borrow().clone();
        let projected = node
            .wait_for_projection(&end, Duration::from_secs(600))
            .await;
        if let Err(error) = projected {
            // New keys meeting an old log, or a log signed by a key the trusted list lacks:
            // both mean the node's key files are not those of the log's other nodes.
            let foreign_signer = format!("{error:#}").contains("unknown signer");
            if (!created.is_empty() && end.total() > 0) || foreign_signer {
                return Err(error.context(
                    "the log holds events this node's key files cannot check; every node on one log needs the same kek.key, node-signing.key and trusted-signers, copied before its first start",
                ));
            }
            return Err(error);
        }
        // A node started without the cluster cannot hear from the group: it serves at once.
        if let Some(mut settled) = settled.filter(|_| !offline) {
            let decided =
                tokio::time::timeout(ROLE_WAIT, settled.wait_for(|settled| *settled)).await;
            if decided.is_err() {
                tracing::warn!(
                    waited_s = ROLE_WAIT.as_secs(),
                    "the kafka owner group has not decided this node's role yet; writes answer 503 until it does"
                );
            }
        }
        let failure = node.membership.as_ref().and_then(Ownership::failure);
        if let Some(failure) = failure {
            anyhow::bail!("cannot join the Kafka owner group: {failure}");
        }
        Ok(node)
    }

    /// Waits until the projection has applied every entry before `end` in each partition.
    ///
    /// # Errors
    ///
    /// Fails when the projector halted or the wait timed out.
    pub async fn wait_for_projection(
        &self,
        end: &Frontier,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut status = self.projector.clone();
        let reached = tokio::time::timeout(
            timeout,
            status.wait_for(|status| status.applied.covers(end) || status.halted.is_some()),
        )
        .await
        .context("timed out waiting for the chart projection")?
        .context("projector stopped")?;
        if let Some(reason) = &reached.halted {
            anyhow::bail!("chart projection halted: {reason}");
        }
        Ok(())
    }

    /// Stops the projector and the writer and waits for both.
    pub async fn shutdown(mut self) {
        if let Some(mut membership) = self.membership.take() {
            let _ = tokio::task::spawn_blocking(move || membership.stop()).await;
        }
        let _ = self.shutdown.send(true);
        if let Some(task) = self.projector_task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.drain_task.take() {
            let _ = task.await;
        }
        let writer_thread = self.writer_thread.take();
        drop(self);
        if let Some(thread) = writer_thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Node {
    /// Stops the projector and, once every other writer handle is gone, waits for the writer
    /// thread, so the RocksDB databases close before the process exits.
    fn drop(&mut self) {
        // Leave the owner group first, so appends stop before the writer does.
        drop(self.membership.take());
        let _ = self.shutdown.send(true);
        if let Some(task) = self.projector_task.take() {
            task.abort();
        }
        if let Some(task) = self.drain_task.take() {
            task.abort();
        }
        self.writer = self.writer.detached();
        if let Some(thread) = self.writer_thread.take() {
            if self.writer.is_last_handle() {
                let _ = thread.join();
            }
        }
    }
}
