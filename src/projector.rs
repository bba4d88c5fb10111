//! The projector: a task that follows the log and applies each envelope to the chart
//! projection, after checking its signature and decrypting its payload.
//!
//! It publishes the position it has reached, so a request can wait until its own write is
//! visible (read-your-writes). An envelope that fails its integrity check stops the projector
//! at that position rather than being skipped; `/health` then reports the node as degraded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chartlog_projections::{ChartProjection, ProjectedEvent};
use chartlog_schemas::{ChartAccessed, Envelope, EventHeader, EventPayload, EventType};
use tokio::sync::watch;

use crate::crypto::{self, KeyStore};
use crate::log::{partition_of, EventLog, Frontier, LogPosition};

/// Number of log entries read and applied in one projection write.
const APPLY_BATCH: usize = 1024;

/// Error from projecting one entry.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// The log could not be read.
    #[error(transparent)]
    Read(#[from] crate::log::ReadError),
    /// An envelope failed its integrity check or did not decrypt.
    #[error("log entry {position} failed its integrity check")]
    Integrity {
        /// Position of the entry.
        position: LogPosition,
        /// The failed check.
        #[source]
        source: crypto::CryptoError,
    },
    /// The data key of an entry is unavailable.
    #[error("log entry {position} has no usable data key")]
    Key {
        /// Position of the entry.
        position: LogPosition,
        /// Cause.
        #[source]
        source: crypto::KeyStoreError,
    },
    /// An entry sits in another partition than its chart's, as a record written to the topic
    /// by something other than Chartlog's writer would.
    #[error(
        "log entry {position} belongs to chart {chart_id}, whose events go to partition {home}"
    )]
    Misplaced {
        /// Position of the entry.
        position: LogPosition,
        /// Its chart.
        chart_id: chartlog_schemas::ChartId,
        /// The chart's partition.
        home: u32,
    },
    /// The projection's storage failed, or an entry does not continue its chart.
    #[error(transparent)]
    Projection(#[from] chartlog_projections::ProjectionError),
}

impl ProjectError {
    /// Returns whether retrying may succeed without anyone acting: the log or the source of
    /// shared data keys could not be read for now.
    pub fn is_transient(&self) -> bool {
        match self {
            ProjectError::Read(error) => !error.is_loss(),
            ProjectError::Key { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

/// State the projector publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProjectorStatus {
    /// Next offset to apply in each partition: every entry before it is in the projection.
    pub applied: Frontier,
    /// Set when the projector stopped on an error it cannot pass.
    pub halted: Option<String>,
    /// Set while the projector retries an entry it could not read or open for now (the log or
    /// the shared data keys unreachable), cleared once a read succeeds.
    pub retrying: Option<Retrying>,
}

/// The projector's retries of one failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retrying {
    /// When the first failed attempt happened.
    pub since: Instant,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last error with its causes; it names positions, ids and checks, never contents.
    pub reason: String,
}

/// Checks and decrypts one envelope.
///
/// # Errors
///
/// [`ProjectError::Integrity`] or [`ProjectError::Key`].
pub fn open_envelope(
    keys: &KeyStore,
    position: LogPosition,
    envelope: &Envelope,
) -> Result<(EventHeader, EventPayload, [u8; 32]), ProjectError> {
    let checked = crypto::check_envelope(&envelope.0, keys.trusted_signers())
        .map_err(|source| ProjectError::Integrity { position, source })?;
    open_checked(keys, position, &checked)
}

/// Decrypts an envelope whose layout and digest, and signature if needed, were checked.
fn open_checked(
    keys: &KeyStore,
    position: LogPosition,
    checked: &crypto::CheckedEnvelope<'_>,
) -> Result<(EventHeader, EventPayload, [u8; 32]), ProjectError> {
    let data_key = keys
        .data_key(checked.parsed.header.key_id)
        .map_err(|source| ProjectError::Key { position, source })?;
    let payload = crypto::open_payload(checked, &data_key)
        .map_err(|source| ProjectError::Integrity { position, source })?;
    Ok((
        checked.parsed.header.clone(),
        payload,
        checked.parsed.digest,
    ))
}

/// Applies the next batch of every partition's entries. Returns the next offset of each
/// partition, when it could be read, and whether any moved.
///
/// # Errors
///
/// Any [`ProjectError`] in the second element; each partition then stays at its last good
/// position.
pub fn apply_round(
    log: &dyn EventLog,
    keys: &KeyStore,
    projection: &ChartProjection,
) -> (Option<Frontier>, Result<bool, ProjectError>) {
    let mut moved = false;
    let mut outcome = Ok(());
    for partition in 0..log.partitions() {
        match apply_next(log, keys, projection, partition) {
            Ok(next) => moved |= next.is_some(),
            Err(error) => {
                outcome = Err(error);
                break;
            }
        }
    }
    let applied = projection
        .positions(log.partitions())
        .ok()
        .map(Frontier::from_offsets);
    (applied, outcome.map(|()| moved))
}

/// Applies the next batch of log entries of `partition`. Returns the new offset, or `None`
/// when the projection is at the end of the partition.
///
/// # Errors
///
/// Any [`ProjectError`]; the projection then stays at its last good position.
pub fn apply_next(
    log: &dyn EventLog,
    keys: &KeyStore,
    projection: &ChartProjection,
    partition: u32,
) -> Result<Option<u64>, ProjectError> {
    let from = LogPosition::new(partition, projection.position(partition)?);
    let entries = log.read_from(from, APPLY_BATCH)?;
    if entries.is_empty() {
        // On Kafka a transaction marker can sit at the end of the log; moving past it lets
        // waiters that know the log's end see the projection reach it.
        let resume = log.resume_position(from)?;
        if resume.offset > from.offset {
            projection.apply_until(partition, &[], log.is_dense(), Some(resume.offset))?;
            return Ok(Some(resume.offset));
        }
        return Ok(None);
    }
    let mut opened = Vec::with_capacity(entries.len());
    for (position, envelope) in &entries {
        // The chart projection takes nothing from access events but their position, so they
        // are parsed, not opened: reads, which each append one, then cost no signature check
        // or decryption here. `chartlog-replay verify` still checks every one of them.
        let parsed = chartlog_schemas::envelope::parse(&envelope.0).map_err(|source| {
            ProjectError::Integrity {
                position: *position,
                source: source.into(),
            }
        })?;
        let home = partition_of(parsed.header.chart_id, log.partitions());
        if home != partition {
            return Err(ProjectError::Misplaced {
                position: *position,
                chart_id: parsed.header.chart_id,
                home,
            });
        }
        if parsed.header.event_type == EventType::ChartAccessed {
            let placeholder = EventPayload::ChartAccessed(ChartAccessed {
                interaction: String::new(),
                resources: Vec::new(),
                client_address: String::new(),
                served_at_micros: None,
            });
            opened.push((*position, parsed.header, placeholder));
            continue;
        }
        // Bytes this node signed itself carry a valid signature, so only other bytes have
        // their signature checked.
        let (header, payload, _) = if keys.recently_sealed().take(&envelope.0) {
            let checked = crypto::check_stored_envelope(&envelope.0).map_err(|source| {
                ProjectError::Integrity {
                    position: *position,
                    source,
                }
            })?;
            open_checked(keys, *position, &checked)?
        } else {
            open_envelope(keys, *position, envelope)?
        };
        opened.push((*position, header, payload));
    }
    let projected: Vec<ProjectedEvent<'_>> = opened
        .iter()
        .zip(&entries)
        .map(
            |((position, header, payload), (_, envelope))| ProjectedEvent {
                position: position.offset,
                header,
                payload,
                envelope: &envelope.0,
            },
        )
        .collect();
    projection.apply_until(partition, &projected, log.is_dense(), None)?;
    Ok(Some(projection.position(partition)?))
}

/// Formats an error with its causes, for a halt reason that names the failed check. Errors
/// here name positions, ids and checks, never contents.
fn error_chain(error: &ProjectError) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Starts the projector task on the current tokio runtime and returns a receiver of its
/// status.
pub fn start(
    log: Arc<dyn EventLog>,
    keys: Arc<KeyStore>,
    projection: Arc<ChartProjection>,
    mut shutdown: watch::Receiver<bool>,
) -> (
    watch::Receiver<ProjectorStatus>,
    tokio::task::JoinHandle<()>,
) {
    let initial = projection
        .positions(log.partitions())
        .map(Frontier::from_offsets)
        .unwrap_or_else(|_| Frontier::start(log.partitions()));
    let (status, receiver) = watch::channel(ProjectorStatus {
        applied: initial.clone(),
        halted: None,
        retrying: None,
    });
    let handle = tokio::spawn(async move {
        let mut end = log.end_position();
        let mut read_failures: u32 = 0;
        tracing::info!(
            projection = "chart",
            position = initial.total(),
            "projector started"
        );
        loop {
            let step = {
                let (log, keys, projection) = (log.clone(), keys.clone(), projection.clone());
                tokio::task::spawn_blocking(move || apply_round(log.as_ref(), &keys, &projection))
                    .await
            };
            let step = step.map(|(applied, outcome)| {
                if let Some(applied) = applied {
                    status.send_if_modified(|current| {
                        let moved = current.applied != applied;
                        current.applied = applied;
                        moved
                    });
                }
                outcome
            });
            match step {
                Ok(Ok(true)) => {
                    read_failures = 0;
                    status.send_if_modified(|current| current.retrying.take().is_some());
                    continue;
                }
                Ok(Ok(false)) => {
                    // The read reached the end it could see, so the next failure starts the
                    // back-off from its shortest delay.
                    read_failures = 0;
                    status.send_if_modified(|current| current.retrying.take().is_some());
                }
                Ok(Err(error)) if error.is_transient() => {
                    // The log is unreachable for now (a Kafka outage): retry with a bounded
                    // back-off instead of halting, and serve what is projected meanwhile.
                    read_failures += 1;
                    let delay = Duration::from_millis(250 * u64::from(read_failures.min(20)));
                    let reason = error_chain(&error);
                    tracing::warn!(projection = "chart", error = %reason, attempt = read_failures, "log read failed; retrying");
                    status.send_modify(|current| {
                        let since = current
                            .retrying
                            .as_ref()
                            .map_or_else(Instant::now, |retrying| retrying.since);
                        current.retrying = Some(Retrying {
                            since,
                            attempts: read_failures,
                            reason,
                        });
                    });
                    // A stuck projector reads the same entries on every retry, so no read finds
                    // the end and refreshes it. Refresh it here, so the reported lag grows.
                    let refreshed = log.clone();
                    let _ = tokio::task::spawn_blocking(move || refreshed.refresh_end()).await;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.changed() => break,
                    }
                }
                Ok(Err(error)) => {
                    let reason = error_chain(&error);
                    tracing::error!(projection = "chart", error = %reason, "projector halted");
                    status.send_modify(|current| current.halted = Some(reason));
                    let _ = shutdown.changed().await;
                    break;
                }
                Err(error) => {
                    tracing::error!(projection = "chart", error = %error, "projector task failed");
                    status.send_modify(|current| {
                        current.halted = Some("projector task failed".into())
                    });
                    break;
                }
            }
            tokio::select! {
                changed = end.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = shutdown.changed() => break,
                // A periodic check covers appends that a backend does not signal.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        tracing::info!(projection = "chart", "projector stopped");
    });
    (receiver, handle)
}
