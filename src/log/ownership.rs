//! Ownership of the Kafka log: the members of one consumer group, and the node the group
//! assigns the partition to, which is the one that writes.
//!
//! Every node joins the group `chartlog-owners.TOPIC` and subscribes to the lease topic (see
//! [`lease_topic_name`]). It never reads records through this consumer, because only the
//! assignment matters: the assigned partition is paused at once. The node that is assigned
//! the partition takes the log over: its writer initializes the partition's transactional id
//! (fencing the previous owner at the broker), rebuilds its state from everything committed, and only then appends. Every other
//! node is a standby: its projector follows the log, and its HTTP handlers redirect clients to
//! the owner, whose URL each member publishes as its Kafka `client.id`.
//!
//! Members are static (`group.instance.id` from the node's id file), so a restarted node gets
//! its partition back at once instead of after a rebalance. The price: a node that stops for
//! good hands over only once its session times out. The assignment is cooperative and sticky,
//! so a joining standby leaves the partition where it is.
//!
//! The membership thread also watches the group: it replaces a consumer that stays outside
//! the group, creates a deleted lease topic again, and has the owner give the log up when a
//! topic's retention would delete records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use tokio::sync::watch;

use super::head_topic::head_topic_name;
use super::kafka::{check_topic, ensure_topic, KafkaConfig, KafkaOpenError};
use super::key_topic::key_topic_name;
use super::EventLog;
use crate::writer::WeakWriter;

/// Session timeout of a member unless `session.timeout.ms` is configured: how long a stopped
/// owner keeps the partition before a standby takes over. The broker's lower bound is 6 s by
/// default.
const DEFAULT_SESSION_TIMEOUT_MS: &str = "10000";

/// How often the group is polled and, on a standby, the owner looked up.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long a standby waits between lookups of the owner's URL.
const LOOKUP_INTERVAL: Duration = Duration::from_secs(1);

/// How long an assigned node waits before trying again to take the log over after a failure.
/// The wait doubles with each failure in a row, up to [`RETRY_TAKE_OVER_MAX`].
const RETRY_TAKE_OVER: Duration = Duration::from_secs(1);

/// Maximum wait between attempts to take the log over. Each attempt reads the whole topic, so
/// a node that keeps failing must not read it every second. Kept short because after a broker
/// outage the next attempt usually succeeds.
const RETRY_TAKE_OVER_MAX: Duration = Duration::from_secs(10);

/// How long this node may be missing from the group's description (or find the group
/// impossible to describe while the broker replies to its readers) before it joins again with
/// a new consumer. After a broker restart the consumer can take tens of seconds to find the
/// coordinator and rejoin by itself, and a new consumer then would only move the lease. The
/// wait doubles after each new consumer that did not help, up to [`REJOIN_AFTER_MAX`], so a
/// long broker outage does not leave a trail of consumers waiting to close.
const REJOIN_AFTER: Duration = Duration::from_secs(120);

/// Maximum age of the broker's last reply to the log's readers for a failed description of the
/// group to count as this node missing from it.
const BROKER_REPLIED_WITHIN: Duration = Duration::from_secs(5);

/// Maximum wait before joining again with a new consumer.
const REJOIN_AFTER_MAX: Duration = Duration::from_secs(600);

/// How long the group's description may name this node's own URL as the owner's while this
/// node does not hold the lease before it is reported as two nodes sharing one URL. Just after
/// losing the lease, the description still names this node for a few seconds.
const OWN_URL_GRACE: Duration = Duration::from_secs(20);

/// How often the owner checks that the event, key and head topics still keep their records:
/// retention changed on a running cluster would make the broker delete audit records.
const TOPIC_CHECK: Duration = Duration::from_secs(30);

/// How long a standby finds no member assigned the lease before it checks that the lease
/// topic still exists, and the interval between later checks.
const LEASE_CHECK: Duration = Duration::from_secs(5);

/// Returns the wait before the next attempt to take the log over after `failures` failed
/// attempts in a row.
fn take_over_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(8);
    (RETRY_TAKE_OVER * (1u32 << doublings)).min(RETRY_TAKE_OVER_MAX)
}

/// A node's role for the Kafka log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The group has not assigned the partition yet, or this node is taking it over.
    Undecided,
    /// This node writes the log.
    Owner,
    /// Another node writes the log; its URL, once known.
    Standby {
        /// Base URL of the owner's FHIR endpoint.
        owner_url: Option<String>,
    },
}

impl Role {
    /// Returns the role's name for health reports.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Undecided => "undecided",
            Role::Owner => "owner",
            Role::Standby { .. } => "standby",
        }
    }
}

/// The group membership of a node, run by a thread of its own.
pub struct Ownership {
    role: watch::Receiver<Role>,
    settled: watch::Receiver<bool>,
    take_over_error: watch::Receiver<Option<String>>,
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Assignment state, set by the rebalance callbacks and read by the membership thread.
#[derive(Default)]
struct Assignment {
    /// Whether this member is assigned the partition; `None` before the first assignment.
    has_partition: Option<bool>,
}

struct OwnerContext {
    topic: String,
    partition: i32,
    log: Arc<dyn EventLog>,
    assignment: Mutex<Assignment>,
    /// A broker error that no retry can change, such as a refused session timeout.
    failure: Arc<Mutex<Option<String>>>,
    /// Set when a new consumer replaced this one: its callbacks while it closes change nothing.
    retired: AtomicBool,
}

impl ClientContext for OwnerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::FencedInstanceId) {
            // Another member joined with this node's group.instance.id, which comes from
            // DATA/node-id: most likely a copied data directory.
            tracing::error!(
                error = %error,
                "another node uses this node's id; remove node-id from the copied data directory and restart that node"
            );
            return;
        }
        let permanent = matches!(
            error.rdkafka_error_code(),
            Some(
                rdkafka::types::RDKafkaErrorCode::InvalidSessionTimeout
                    | rdkafka::types::RDKafkaErrorCode::GroupAuthorizationFailed
            )
        );
        if permanent {
            let mut failure = self.failure.lock().expect("failure lock is not poisoned");
            if failure.is_none() {
                *failure = Some(format!("{reason} ({error})"));
            }
            return;
        }
        tracing::warn!(error = %error, reason, "kafka group membership error");
    }
}

impl ConsumerContext for OwnerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if self.retired.load(Ordering::SeqCst) {
            return;
        }
        // With the cooperative protocol a revocation lists only the partitions taken away.
        if let Rebalance::Revoke(partitions) = rebalance {
            if partitions
                .find_partition(&self.topic, self.partition)
                .is_some()
            {
                // Stop appending before the partition goes to another node; that node fences
                // this one anyway, so this only spares appends that would fail.
                self.log.release_ownership();
                self.assignment
                    .lock()
                    .expect("assignment lock is not poisoned")
                    .has_partition = Some(false);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            // Records are read by the projector, not here.
            if partitions.count() > 0 {
                if let Err(error) = consumer.pause(partitions) {
                    tracing::warn!(error = %error, "pausing the group consumer failed");
                }
            }
            // With the cooperative protocol an assignment lists only the partitions added, so
            // one without ours changes nothing once this member has it.
            let added = partitions
                .find_partition(&self.topic, self.partition)
                .is_some();
            let mut assignment = self
                .assignment
                .lock()
                .expect("assignment lock is not poisoned");
            if added {
                assignment.has_partition = Some(true);
            } else if assignment.has_partition.is_none() {
                assignment.has_partition = Some(false);
            }
        }
    }
}

impl Ownership {
    /// Joins the group and starts the membership thread. `node_id` names this node across
    /// restarts; `url` is the base URL clients are redirected to while this node owns the
    /// log.
    ///
    /// # Errors
    ///
    /// [`KafkaOpenError`] when the consumer cannot be created or subscribed.
    pub fn start(
        config: &KafkaConfig,
        partition: i32,
        node_id: &str,
        url: &str,
        log: Arc<dyn EventLog>,
        writer: WeakWriter,
    ) -> Result<Ownership, KafkaOpenError> {
        let group = group_name(&config.topic);
        let lease_topic = lease_topic_name(&config.topic, config.partitions);
        let failure = Arc::new(Mutex::new(None));
        let joining = Joining {
            config: config.clone(),
            group: group.clone(),
            instance: format!("chartlog-{node_id}"),
            url: url.to_owned(),
            topic: lease_topic.clone(),
            partition,
            log: log.clone(),
            failure: failure.clone(),
        };
        let consumer = joining.consumer()?;
        let (role_sender, role) = watch::channel(Role::Undecided);
        let (settled_sender, settled) = watch::channel(false);
        let (take_over_error_sender, take_over_error) = watch::channel(None);
        let stop = Arc::new(AtomicBool::new(false));
        let member = Member {
            consumer,
            joining,
            log,
            writer,
            role: role_sender,
            settled: settled_sender,
            take_over_error: take_over_error_sender,
            stop: stop.clone(),
        };
        // The member name identifies the node in lines of nodes that share a log output.
        let span = tracing::info_span!("owner_group", member = %member.joining.instance);
        let thread = std::thread::Builder::new()
            .name("chartlog-ownership".into())
            .spawn(move || span.in_scope(|| member.run()))
            .map_err(|_| KafkaOpenError::Client {
                action: "group thread start",
                source: KafkaError::Canceled,
            })?;
        Ok(Ownership {
            role,
            settled,
            take_over_error,
            failure,
            stop,
            thread: Some(thread),
        })
    }

    /// Returns a receiver of this node's role.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// Returns why the node cannot be a member of the group at all, such as a session timeout
    /// the broker rejects. The membership thread has stopped then.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .expect("failure lock is not poisoned")
            .clone()
    }

    /// Returns a receiver that turns true once the group's first assignment has been acted
    /// on: the node is a standby, owns the log, or tried to take it over and failed.
    pub fn settled(&self) -> watch::Receiver<bool> {
        self.settled.clone()
    }

    /// Returns a receiver of why this node's last attempt to take the log over failed, while
    /// it keeps failing: a log whose chart ends before its recorded head, say. It clears once
    /// a take-over succeeds.
    pub fn take_over_error(&self) -> watch::Receiver<Option<String>> {
        self.take_over_error.clone()
    }

    /// Leaves the group's poll loop and closes the consumer. Blocks; call it off the async
    /// runtime.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Settings to join the owner group with, kept to join again with a new consumer.
struct Joining {
    config: KafkaConfig,
    group: String,
    instance: String,
    url: String,
    topic: String,
    partition: i32,
    log: Arc<dyn EventLog>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Joining {
    /// Creates a group consumer subscribed to the lease topic.
    fn consumer(&self) -> Result<BaseConsumer<OwnerContext>, KafkaOpenError> {
        let mut client = self.config.client_config();
        client
            .set("group.id", &self.group)
            .set("group.instance.id", &self.instance)
            .set("client.id", &self.url)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            // Sticky: a node joining the group leaves the partition with its owner instead of
            // moving it, so adding a standby never interrupts writes.
            .set("partition.assignment.strategy", "cooperative-sticky");
        if !self.config.properties.contains_key("session.timeout.ms") {
            client.set("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS);
        }
        let context = OwnerContext {
            topic: self.topic.clone(),
            partition: self.partition,
            log: self.log.clone(),
            assignment: Mutex::new(Assignment::default()),
            failure: self.failure.clone(),
            retired: AtomicBool::new(false),
        };
        let consumer: BaseConsumer<OwnerContext> =
            client
                .create_with_context(context)
                .map_err(|source| KafkaOpenError::Client {
                    action: "group consumer creation",
                    source,
                })?;
        consumer
            .subscribe(&[&self.topic])
            .map_err(|source| KafkaOpenError::Client {
                action: "group subscription",
                source,
            })?;
        Ok(consumer)
    }
}

/// Returns the consumer group whose assignment decides the owner of `topic`.
pub fn group_name(topic: &str) -> String {
    format!("chartlog-owners.{topic}")
}

/// Returns the topic whose partition 0 the owner group assigns to the node that writes the
/// log: the event topic itself when it has one partition, and otherwise the topic
/// `TOPIC.owner` of one partition and no records. The group spreads a topic's partitions over
/// its members, so with several it would move partition 0, and the log, to a joining node.
/// A lease topic deleted while nodes run leaves no member assigned, so the standbys then create
/// it again.
pub fn lease_topic_name(topic: &str, partitions: u32) -> String {
    if partitions > 1 {
        format!("{topic}.owner")
    } else {
        topic.to_owned()
    }
}

struct Member {
    consumer: BaseConsumer<OwnerContext>,
    joining: Joining,
    log: Arc<dyn EventLog>,
    writer: WeakWriter,
    role: watch::Sender<Role>,
    settled: watch::Sender<bool>,
    take_over_error: watch::Sender<Option<String>>,
    stop: Arc<AtomicBool>,
}

impl Member {
    fn run(mut self) {
        let mut last_lookup: Option<Instant> = None;
        let mut last_attempt: Option<Instant> = None;
        let mut failures = 0u32;
        // When the lookups began finding no member assigned the lease, and when its topic was
        // last checked.
        let mut ownerless_since: Option<Instant> = None;
        let mut last_lease_check: Option<Instant> = None;
        // When the lookups began finding this node missing from the group, and when they began
        // naming this node's own URL as the owner's while it does not hold the lease.
        let mut absent_since: Option<Instant> = None;
        let mut own_url_since: Option<Instant> = None;
        let mut last_topic_check: Option<Instant> = None;
        // The retention check runs on a thread of its own: its requests wait up to 10 s each
        // when the cluster is away, and the group's callbacks run only while this thread polls.
        let mut topic_check: Option<std::thread::JoinHandle<Option<String>>> = None;
        let mut rejoin_after = REJOIN_AFTER;
        while !self.stop.load(Ordering::SeqCst) {
            // Records of paused partitions never arrive; the poll serves the group's events.
            let _ = self.consumer.poll(POLL_INTERVAL);
            let failure = self
                .consumer
                .context()
                .failure
                .lock()
                .expect("failure lock is not poisoned")
                .clone();
            if let Some(failure) = failure {
                tracing::error!(
                    failure,
                    "cannot join the kafka owner group; this node will not write"
                );
                self.settled.send_replace(true);
                break;
            }
            let has_partition = self
                .consumer
                .context()
                .assignment
                .lock()
                .expect("assignment lock is not poisoned")
                .has_partition;

            let becoming_standby = has_partition == Some(false)
                && !matches!(*self.role.borrow(), Role::Standby { .. });
            let lookup = if becoming_standby
                || last_lookup.is_none_or(|at| at.elapsed() >= LOOKUP_INTERVAL)
            {
                last_lookup = Some(Instant::now());
                Some(self.lookup())
            } else {
                None
            };
            if let Some(lookup) = &lookup {
                // A description that leaves this node out counts. A failed one counts only
                // while the broker replies to the log's readers and the consumer does not
                // believe it holds the lease. During an outage every request fails, and a new
                // consumer would only delay the rejoin that follows it.
                let absent = match (lookup, has_partition) {
                    (Lookup::Found { listed, .. }, _) => !listed,
                    (Lookup::Failed, Some(true)) => false,
                    (Lookup::Failed, _) => self
                        .log
                        .end_age()
                        .is_some_and(|age| age < BROKER_REPLIED_WITHIN),
                };
                if absent {
                    let since = *absent_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= rejoin_after {
                        absent_since = None;
                        self.rejoin(rejoin_after);
                        rejoin_after = (rejoin_after * 2).min(REJOIN_AFTER_MAX);
                        continue;
                    }
                } else {
                    absent_since = None;
                    rejoin_after = REJOIN_AFTER;
                }
            }

            match has_partition {
                None => {}
                Some(true) if self.log.is_owner() => {
                    self.role.send_if_modified(|role| set(role, Role::Owner));
                    self.settled.send_replace(true);
                    if topic_check
                        .as_ref()
                        .is_some_and(|check| check.is_finished())
                    {
                        let problem = topic_check
                            .take()
                            .and_then(|check| check.join().ok())
                            .flatten();
                        if let Some(problem) = problem {
                            // The take-over that follows checks the topics again and fails,
                            // naming the setting in `/health`, until the topic is fixed.
                            tracing::error!(
                                problem,
                                "a topic of the log would delete records; this node stops writing until it is fixed"
                            );
                            self.log.release_ownership();
                        }
                    }
                    let due = last_topic_check.is_none_or(|at| at.elapsed() >= TOPIC_CHECK);
                    if due && topic_check.is_none() {
                        last_topic_check = Some(Instant::now());
                        let config = self.joining.config.clone();
                        topic_check = std::thread::Builder::new()
                            .name("chartlog-retention-check".into())
                            .spawn(move || records_at_risk(&config))
                            .ok();
                    }
                }
                Some(true) => {
                    let due =
                        last_attempt.is_none_or(|at| at.elapsed() >= take_over_backoff(failures));
                    if due {
                        last_attempt = Some(Instant::now());
                        self.role
                            .send_if_modified(|role| set(role, Role::Undecided));
                        if self.take_over() {
                            failures = 0;
                        } else {
                            failures = failures.saturating_add(1);
                        }
                        self.settled.send_replace(true);
                    }
                }
                Some(false) => {
                    last_attempt = None;
                    failures = 0;
                    let Some(lookup) = lookup else {
                        continue;
                    };
                    let owner_url = match lookup {
                        Lookup::Failed => None,
                        Lookup::Found { owner_url, .. } => owner_url,
                    };
                    if owner_url.is_some() {
                        ownerless_since = None;
                    } else {
                        let since = *ownerless_since.get_or_insert_with(Instant::now);
                        let due = since.elapsed() >= LEASE_CHECK
                            && last_lease_check.is_none_or(|at| at.elapsed() >= LEASE_CHECK);
                        if due {
                            last_lease_check = Some(Instant::now());
                            self.restore_lease_topic();
                        }
                    }
                    // Just after this node lost the lease, the group's description can still
                    // name it as the holder. Only a lasting one is two nodes sharing a URL.
                    let owner_url = match owner_url {
                        Some(url) if same_url(&url, &self.joining.url) => {
                            let since = *own_url_since.get_or_insert_with(Instant::now);
                            (since.elapsed() >= OWN_URL_GRACE).then_some(url)
                        }
                        other => {
                            own_url_since = None;
                            other
                        }
                    };
                    self.role
                        .send_if_modified(|role| set(role, Role::Standby { owner_url }));
                    self.settled.send_replace(true);
                }
            }
        }
        // Leaving: refuse appends before the consumer closes and the partition moves on.
        self.log.release_ownership();
        self.consumer.unsubscribe();
        tracing::info!("left the kafka owner group");
    }

    /// Replaces the group consumer with a new one, which joins the group again. librdkafka's
    /// consumer can stay outside its group after losing the coordinator, and then no node
    /// would write until a restart (confluentinc/librdkafka issues 2944 and 3082 show logs).
    fn rejoin(&mut self, absent_for: Duration) {
        tracing::warn!(
            after_s = absent_for.as_secs(),
            "this node is missing from the kafka owner group; joining it again with a new consumer"
        );
        // The new consumer may not be assigned the lease, so appends stop first.
        self.log.release_ownership();
        let consumer = match self.joining.consumer() {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::warn!(error = %anyhow::Error::from(error), "joining the kafka owner group again failed");
                return;
            }
        };
        let old = std::mem::replace(&mut self.consumer, consumer);
        old.context().retired.store(true, Ordering::SeqCst);
        // Closing waits for the group's coordinator, which may not reply, so it runs on a
        // thread of its own.
        let closing = std::thread::Builder::new()
            .name("chartlog-ownership-close".into())
            .spawn(move || drop(old));
        if let Err(error) = closing {
            tracing::warn!(error = %error, "closing the replaced group consumer in the background failed");
        }
        self.role
            .send_if_modified(|role| set(role, Role::Undecided));
    }

    /// Has the writer take the log over; the writer rebuilds its state between fencing the
    /// previous owner and its first append. Returns whether it succeeded.
    fn take_over(&self) -> bool {
        let Some(writer) = self.writer.upgrade() else {
            return false;
        };
        let started = Instant::now();
        match writer.take_over_blocking() {
            Ok(()) => {
                tracing::info!(
                    partition = self.joining.partition,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "took the kafka log over"
                );
                self.role.send_if_modified(|role| set(role, Role::Owner));
                self.take_over_error
                    .send_if_modified(|last| last.take().is_some());
                true
            }
            Err(error) => {
                tracing::error!(error = %error, "taking the kafka log over failed; retrying");
                let reason = format!("{error:#}");
                self.take_over_error.send_if_modified(|last| {
                    let changed = last.as_deref() != Some(reason.as_str());
                    *last = Some(reason);
                    changed
                });
                false
            }
        }
    }

    /// Creates the lease topic again when the cluster's metadata no longer lists it. Without
    /// it no member is assigned the lease, so no node would write until one restarted.
    fn restore_lease_topic(&self) {
        if self.joining.topic == self.joining.config.topic {
            // The event topic itself: deleting it lost the log, which a take-over rejects.
            return;
        }
        let metadata = match self
            .consumer
            .fetch_metadata(Some(&self.joining.topic), Duration::from_secs(2))
        {
            Ok(metadata) => metadata,
            Err(error) => {
                tracing::debug!(error = %error, "checking the owner group's topic failed");
                return;
            }
        };
        let exists = metadata
            .topics()
            .iter()
            .any(|topic| topic.name() == self.joining.topic && !topic.partitions().is_empty());
        if exists {
            return;
        }
        let created = block_on(ensure_topic(
            &self.joining.config,
            &self.joining.topic,
            1,
            "delete",
        ))
        .and_then(|result| result.map_err(|error| format!("{error:#}")));
        match created {
            Ok(true) => tracing::error!(
                topic = %self.joining.topic,
                "the owner group's topic was missing and was created again"
            ),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(error, "creating the owner group's topic again failed");
                return;
            }
        }
        // The subscription would find the topic at the consumer's next periodic metadata
        // refresh. Subscribing again makes the group assign it now.
        self.consumer.unsubscribe();
        if let Err(error) = self.consumer.subscribe(&[&self.joining.topic]) {
            tracing::warn!(error = %error, "subscribing to the owner group's topic again failed");
        }
    }

    /// Describes the group: the URL of the member assigned the lease, and whether this node
    /// is a member.
    fn lookup(&self) -> Lookup {
        let groups = match self
            .consumer
            .fetch_group_list(Some(&self.joining.group), Duration::from_secs(2))
        {
            Ok(groups) => groups,
            Err(error) => {
                tracing::warn!(error = %error, "describing the kafka owner group failed");
                return Lookup::Failed;
            }
        };
        let Some(group) = groups
            .groups()
            .iter()
            .find(|group| group.name() == self.joining.group)
        else {
            return Lookup::Found {
                owner_url: None,
                listed: false,
            };
        };
        let members = group.members();
        let listed = members
            .iter()
            .any(|member| same_url(member.client_id(), &self.joining.url));
        let owner_url = members.iter().find_map(|member| {
            let assignment = member.assignment()?;
            assigned_partitions(assignment)?
                .iter()
                .any(|(topic, partition)| {
                    *topic == self.joining.topic && *partition == self.joining.partition
                })
                .then(|| member.client_id().to_owned())
        });
        Lookup::Found { owner_url, listed }
    }
}

/// Result of describing the owner group.
enum Lookup {
    /// The group could not be described.
    Failed,
    /// The group's members as described.
    Found {
        /// URL of the member assigned the lease, when one is.
        owner_url: Option<String>,
        /// Whether a member publishes this node's URL.
        listed: bool,
    },
}

/// Returns why the event, key or head topic would delete records, when its retention or
/// cleanup policy was changed since the take-over. A cluster that cannot be asked returns
/// `None`: appends then fail by themselves.
fn records_at_risk(config: &KafkaConfig) -> Option<String> {
    let topic = &config.topic;
    let topics = [
        (topic.clone(), "delete"),
        (key_topic_name(topic), "compact"),
        (head_topic_name(topic), "compact"),
    ];
    for (name, policy) in topics {
        match block_on(check_topic(config, &name, policy)).ok()? {
            Err(error @ KafkaOpenError::Retention { .. }) => return Some(error.to_string()),
            Err(error) => {
                tracing::debug!(topic = %name, error = %anyhow::Error::from(error), "checking a topic's retention failed");
            }
            Ok(()) => {}
        }
    }
    None
}

/// Runs an admin request from the membership thread, which has no async runtime, on a runtime
/// of its own. Fails only when that runtime cannot be built.
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|runtime| runtime.block_on(future))
        .map_err(|error| format!("async runtime for an admin request not built: {error}"))
}

/// Returns whether two base URLs are the same but for trailing slashes.
fn same_url(first: &str, second: &str) -> bool {
    first.trim_end_matches('/') == second.trim_end_matches('/')
}

fn set(role: &mut Role, new: Role) -> bool {
    if *role == new {
        return false;
    }
    tracing::info!(role = new.name(), "kafka log role changed");
    *role = new;
    true
}

/// Decodes the partitions of a consumer-protocol assignment: a version (int16), an array
/// (int32 count) of topics (int16 length and bytes), each with an array of partitions (int32),
/// and user data, which is ignored.
fn assigned_partitions(bytes: &[u8]) -> Option<Vec<(String, i32)>> {
    let mut reader = Bytes(bytes);
    let _version = reader.i16()?;
    let topics = reader.i32()?;
    let mut assigned = Vec::new();
    for _ in 0..topics.max(0) {
        let length = usize::try_from(reader.i16()?).ok()?;
        let topic = String::from_utf8(reader.take(length)?.to_vec()).ok()?;
        let partitions = reader.i32()?;
        for _ in 0..partitions.max(0) {
            assigned.push((topic.clone(), reader.i32()?));
        }
    }
    Some(assigned)
}

struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        if self.0.len() < length {
            return None;
        }
        let (head, rest) = self.0.split_at(length);
        self.0 = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{assigned_partitions, take_over_backoff};

    #[test]
    fn take_over_retries_back_off() {
        let seconds: Vec<u64> = (1..=6)
            .map(|failures| take_over_backoff(failures).as_secs())
            .collect();
        assert_eq!(seconds, [1, 2, 4, 8, 10, 10]);
        assert_eq!(take_over_backoff(0), Duration::from_secs(1));
        assert_eq!(take_over_backoff(u32::MAX), Duration::from_secs(10));
    }

    fn encode(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut bytes = 1i16.to_be_bytes().to_vec();
        bytes.extend((topics.len() as i32).to_be_bytes());
        for (topic, partitions) in topics {
            bytes.extend((topic.len() as i16).to_be_bytes());
            bytes.extend(topic.as_bytes());
            bytes.extend((partitions.len() as i32).to_be_bytes());
            for partition in *partitions {
                bytes.extend(partition.to_be_bytes());
            }
        }
        // Empty user data.
        bytes.extend((-1i32).to_be_bytes());
        bytes
    }

    #[test]
    fn decodes_an_assignment() {
        let bytes = encode(&[("chartlog.events", &[0]), ("other", &[3, 4])]);
        assert_eq!(
            assigned_partitions(&bytes).unwrap(),
            vec![
                ("chartlog.events".to_owned(), 0),
                ("other".to_owned(), 3),
                ("other".to_owned(), 4)
            ]
        );
    }

    #[test]
    fn refuses_a_truncated_assignment() {
        let bytes = encode(&[("chartlog.events", &[0, 1])]);
        assert_eq!(assigned_partitions(&bytes[..bytes.len() - 9]), None);
        assert_eq!(assigned_partitions(&[]), None);
    }
}
