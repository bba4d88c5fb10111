//! The writer: one thread that turns commands into sealed envelopes and appends them.
//!
//! Life of a batch: the thread takes every command waiting in its queue (up to
//! [`MAX_BATCH_COMMANDS`]), plans each against the [`WriterState`], creates data keys for new
//! charts, seals the events in order (each chained to its chart's previous digest), appends them
//! all in one durable write, and only then answers each command. Commands that arrive during the
//! sync wait for the next batch, so under load many commands share one sync (group commit).
//! When the append fails, the batch's state changes are undone and every command in it fails.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use chartlog_schemas::{EventHeader, EventId, EventPayload, EventType};
use tokio::sync::{mpsc, oneshot};

use crate::command::state::UndoJournal;
use crate::command::{Command, CommandError, OperationResult, WriterState};
use crate::crypto::{self, KeyStore};
use crate::log::{AppendError, EventLog, Frontier, LogPosition};

/// Maximum number of commands sealed and synced together. Large enough that a sync of a few
/// milliseconds amortizes over thousands of commands per second, small enough that one batch's
/// encryption and signing stays well under a millisecond per hundred events.
pub const MAX_BATCH_COMMANDS: usize = 512;

/// Bound of the writer's queue. Callers wait for room beyond it, which pushes back on clients.
pub const QUEUE_CAPACITY: usize = 8192;

/// Failure of a submitted command; in every case nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The command's preconditions failed; nothing was written.
    #[error(transparent)]
    Rejected(#[from] CommandError),
    /// The log did not accept the batch; nothing was written.
    #[error("log append failed")]
    Append(#[source] Arc<AppendError>),
    /// A data key could not be created; nothing was written.
    #[error("data key creation failed")]
    KeyStore(#[source] Arc<crypto::KeyStoreError>),
    /// The writer has stopped.
    #[error("writer stopped")]
    Stopped,
}

/// Outcome of a command that took effect.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// Result of each operation.
    pub results: Vec<OperationResult>,
    /// Per partition, the offset one past the command's events there, to wait for in
    /// projections. For a repeated command id, the end of the log when it was handled.
    pub end_position: Frontier,
    /// The stored JSON of each version written, in the order of the `Recorded` results, so a
    /// handler can respond without reading the version back. Empty for a repeated command id.
    pub bodies: Vec<String>,
}

struct CommandRequest {
    command: Command,
    reply: oneshot::Sender<Result<WriteOutcome, WriteError>>,
}

/// A request to the writer thread.
enum Request {
    /// Plan, seal and append a command.
    Command(CommandRequest),
    /// Take the log over from its previous writer, rebuilding the state from the log between
    /// fencing that writer and the first append.
    TakeOver(oneshot::Sender<anyhow::Result<()>>),
}

/// Handle for submitting commands to the writer thread.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Request>,
    state: Arc<RwLock<WriterState>>,
    appends_failing: Arc<AtomicBool>,
    counters: Arc<AppendCounters>,
}

/// A writer handle for background tasks, which must not keep the writer thread running.
#[derive(Clone)]
pub struct WeakWriter {
    queue: mpsc::WeakSender<Request>,
    state: std::sync::Weak<RwLock<WriterState>>,
    appends_failing: Arc<AtomicBool>,
    counters: Arc<AppendCounters>,
}

impl WeakWriter {
    /// Returns a full handle while the writer still runs.
    pub fn upgrade(&self) -> Option<Writer> {
        Some(Writer {
            queue: self.queue.upgrade()?,
            state: self.state.upgrade()?,
            appends_failing: self.appends_failing.clone(),
            counters: self.counters.clone(),
        })
    }
}

/// Successful appends since the writer started, for metrics and the bench.
#[derive(Default)]
pub struct AppendCounters {
    /// Batches appended: on Kafka, one transaction each; on the embedded log, one sync each.
    pub batches: AtomicU64,
    /// Events those batches carried.
    pub events: AtomicU64,
}

impl Writer {
    /// Starts the writer thread.
    pub fn start(
        log: Arc<dyn EventLog>,
        keys: Arc<KeyStore>,
        state: Arc<RwLock<WriterState>>,
        projected: Frontier,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        state
            .write()
            .expect("writer state lock is not poisoned")
            .set_resource_limit(log.max_resource_bytes());
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let thread_state = state.clone();
        let appends_failing = Arc::new(AtomicBool::new(false));
        let thread_failing = appends_failing.clone();
        let counters = Arc::new(AppendCounters::default());
        let thread_counters = counters.clone();
        let handle = std::thread::Builder::new()
            .name("chartlog-writer".into())
            .spawn(move || {
                run(
                    receiver,
                    log,
                    keys,
                    thread_state,
                    thread_failing,
                    thread_counters,
                    projected,
                )
            })
            .expect("the operating system can start the writer thread");
        (
            Writer {
                queue,
                state,
                appends_failing,
                counters,
            },
            handle,
        )
    }

    /// Submits a command and waits until it is durable or rejected.
    ///
    /// # Errors
    ///
    /// [`WriteError`]; in every case nothing of the command was written.
    pub async fn submit(&self, command: Command) -> Result<WriteOutcome, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Request::Command(CommandRequest { command, reply }))
            .await
            .map_err(|_| WriteError::Stopped)?;
        answer.await.map_err(|_| WriteError::Stopped)?
    }

    /// Has the writer thread take the log over ([`EventLog::begin_ownership`]), rebuild its
    /// state from the log and then let appends through, between two batches. Blocks; call it
    /// from a thread of its own, never from the async runtime.
    ///
    /// # Errors
    ///
    /// Fails when the log cannot be taken over or does not replay; appends stay refused.
    pub fn take_over_blocking(&self) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .blocking_send(Request::TakeOver(reply))
            .map_err(|_| anyhow::anyhow!("the writer has stopped"))?;
        answer
            .blocking_recv()
            .map_err(|_| anyhow::anyhow!("the writer has stopped"))?
    }

    /// Returns a handle whose queue is already closed: every submit fails with
    /// [`WriteError::Stopped`]. Used to release a node's own handle so its writer thread can
    /// stop once every other handle is gone.
    pub fn detached(&self) -> Writer {
        let (queue, _) = mpsc::channel(1);
        Writer {
            queue,
            state: self.state.clone(),
            appends_failing: self.appends_failing.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Returns a handle that does not keep the writer thread running: the thread stops once
    /// every full handle is gone, whatever weak handles remain.
    pub fn downgrade(&self) -> WeakWriter {
        WeakWriter {
            queue: self.queue.downgrade(),
            state: Arc::downgrade(&self.state),
            appends_failing: self.appends_failing.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Returns the counts of successful appends.
    pub fn append_counters(&self) -> &AppendCounters {
        &self.counters
    }

    /// Returns whether the writer thread still runs and its last append succeeded.
    pub fn is_healthy(&self) -> bool {
        !self.queue.is_closed() && !self.appends_failing.load(Ordering::Relaxed)
    }

    /// Returns whether no handle other than detached ones can still submit, so the writer
    /// thread will stop once its queue is drained.
    pub fn is_last_handle(&self) -> bool {
        // The writer thread holds one strong reference to the state; each live handle holds
        // another, and this detached handle holds one.
        Arc::strong_count(&self.state) <= 2
    }

    /// Returns the writer's state for existence checks. Reads see planned changes of the
    /// batch in flight; commands re-check their preconditions when planned.
    pub fn state(&self) -> &Arc<RwLock<WriterState>> {
        &self.state
    }
}

/// Returns the wall clock in microseconds since the Unix epoch, or 0 before it.
pub(crate) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as i64)
        .unwrap_or(0)
}

fn run(
    mut receiver: mpsc::Receiver<Request>,
    log: Arc<dyn EventLog>,
    keys: Arc<KeyStore>,
    state: Arc<RwLock<WriterState>>,
    appends_failing: Arc<AtomicBool>,
    counters: Arc<AppendCounters>,
    projected: Frontier,
) {
    tracing::info!("writer started");
    let mut batch = Vec::with_capacity(MAX_BATCH_COMMANDS);
    while let Some(first) = receiver.blocking_recv() {
        let mut take_over = None;
        match first {
            Request::Command(request) => batch.push(request),
            Request::TakeOver(reply) => take_over = Some(reply),
        }
        while take_over.is_none() && batch.len() < MAX_BATCH_COMMANDS {
            match receiver.try_recv() {
                Ok(Request::Command(request)) => batch.push(request),
                Ok(Request::TakeOver(reply)) => take_over = Some(reply),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            match process_batch(&mut batch, log.as_ref(), &keys, &state) {
                BatchOutcome::NothingToAppend => {}
                BatchOutcome::Appended(events) => {
                    appends_failing.store(false, Ordering::Relaxed);
                    counters.batches.fetch_add(1, Ordering::Relaxed);
                    counters.events.fetch_add(events as u64, Ordering::Relaxed);
                }
                BatchOutcome::Failed => appends_failing.store(true, Ordering::Relaxed),
            }
        }
        if let Some(reply) = take_over {
            let outcome = take_log_over(log.as_ref(), &keys, &state, &projected);
            if outcome.is_ok() {
                appends_failing.store(false, Ordering::Relaxed);
            }
            let _ = reply.send(outcome);
        }
    }
    tracing::info!("writer stopped");
}

/// Fences the log's previous writer, rebuilds the state from everything it committed, and
/// only then lets appends through. Runs on the writer thread between batches, so no batch can
/// be planned against the state being replaced.
fn take_log_over(
    log: &dyn EventLog,
    keys: &KeyStore,
    state: &RwLock<WriterState>,
    projected: &Frontier,
) -> anyhow::Result<()> {
    log.begin_ownership()?;
    // The projection had applied this much when the node started. A log that ends before it
    // lost entries, so writing on would start chains again on top of the loss.
    let end = log.end_position().borrow().clone();
    for partition in 0..log.partitions() {
        let (end, projected) = (end.get(partition), projected.get(partition));
        if end < projected {
            log.release_ownership();
            anyhow::bail!(
                "the log ends at position {} but this node's projection has applied up to {}: entries were lost from the log; restore it from a backup and run chartlog-replay verify",
                LogPosition::new(partition, end),
                LogPosition::new(partition, projected)
            );
        }
    }
    // A separate reader, because the projector keeps reading meanwhile, and after an outage
    // the projector's client was seen fetching nothing for over a minute.
    let separate = log.separate_reader()?;
    let mut rebuilt = crate::node::rebuild_writer_state(separate.as_deref().unwrap_or(log), keys)?;
    rebuilt.set_resource_limit(log.max_resource_bytes());
    if let Some(heads) = log.recorded_heads()? {
        crate::node::check_heads(&rebuilt, &heads)?;
        let recorded: std::collections::HashSet<_> =
            heads.iter().map(|(chart_id, _, _)| *chart_id).collect();
        let missing: Vec<_> = rebuilt
            .heads()
            .filter(|(chart_id, _, _)| !recorded.contains(chart_id))
            .collect();
        if !missing.is_empty() {
            log.record_heads(&missing)?;
            tracing::warn!(
                charts = missing.len(),
                "recorded the heads of charts that had none recorded; their ends are checked from now on"
            );
        }
    }
    let charts = rebuilt.chart_count();
    *state.write().expect("writer state lock is not poisoned") = rebuilt;
    log.complete_ownership();
    tracing::info!(charts, "writer state rebuilt from the log");
    Ok(())
}

struct Accepted {
    reply: oneshot::Sender<Result<WriteOutcome, WriteError>>,
    results: Vec<OperationResult>,
    bodies: Vec<String>,
    last_event: Option<usize>,
}

/// The outcome of one batch.
enum BatchOutcome {
    /// Every command was rejected or repeated, so nothing needed appending.
    NothingToAppend,
    /// This many events were appended.
    Appended(usize),
    /// The append failed; every command of the batch failed with it.
    Failed,
}

/// Plans, seals and appends one batch.
fn process_batch(
    batch: &mut Vec<CommandRequest>,
    log: &dyn EventLog,
    keys: &KeyStore,
    state: &RwLock<WriterState>,
) -> BatchOutcome {
    let wall_micros = now_micros();
    let mut journal = UndoJournal::default();
    let mut planned = Vec::new();
    let mut headers_meta = Vec::new();
    let mut accepted = Vec::with_capacity(batch.len());

    // Plan every command against the state; rejected commands are answered at once.
    {
        let mut state = state.write().expect("writer state lock is not poisoned");
        for request in batch.drain(..) {
            let command = &request.command;
            if let Some(repeated) = state.repeated_results(command) {
                // A repeated command id takes effect once: answer with the first results.
                let results = match repeated {
                    Ok(results) => results,
                    Err(error) => {
                        let _ = request.reply.send(Err(WriteError::Rejected(error)));
                        continue;
                    }
                };
                accepted.push(Accepted {
                    reply: request.reply,
                    results,
                    bodies: Vec::new(),
                    last_event: None,
                });
                continue;
            }
            match state.plan(command, wall_micros, &mut journal) {
                Ok((events, results)) => {
                    let last_event = if events.is_empty() {
                        None
                    } else {
                        Some(planned.len() + events.len() - 1)
                    };
                    let mut bodies = Vec::new();
                    for event in events {
                        if let EventPayload::ResourceRecorded(recorded) = &event.payload {
                            bodies.push(recorded.resource_json.clone());
                        }
                        headers_meta.push((
                            command.actor.clone(),
                            command.purpose_of_use.clone(),
                            command.command_id,
                        ));
                        planned.push(event);
                    }
                    accepted.push(Accepted {
                        reply: request.reply,
                        results,
                        bodies,
                        last_event,
                    });
                }
                Err(error) => {
                    let _ = request.reply.send(Err(WriteError::Rejected(error)));
                }
            }
        }
    }
    if planned.is_empty() {
        let end = log.end_position().borrow().clone();
        answer_all(accepted, Ok(end), &[]);
        return BatchOutcome::NothingToAppend;
    }

    // Seal in order, chaining each event to its chart's previous digest.
    let sealed = seal_batch(&planned, &headers_meta, keys, state);
    let envelopes = match sealed {
        Ok(envelopes) => envelopes,
        Err(error) => {
            tracing::error!(error = %error, "data key creation failed; batch rejected");
            state
                .write()
                .expect("writer state lock is not poisoned")
                .undo(journal);
            answer_all(accepted, Err(WriteError::KeyStore(Arc::new(error))), &[]);
            return BatchOutcome::Failed;
        }
    };

    let batch: Vec<_> = envelopes
        .iter()
        .map(|(envelope, _)| envelope.clone())
        .collect();
    // The projector reads these back; it need not check again the signatures just made. Access
    // events are never checked there, so only the others are remembered.
    let checked_there = || {
        planned
            .iter()
            .zip(&batch)
            .filter(|(event, _)| event.event_type() != EventType::ChartAccessed)
            .map(|(_, envelope)| envelope)
    };
    keys.recently_sealed().record(checked_there());
    match log.append_batch(&batch) {
        Ok(positions) => {
            let mut state = state.write().expect("writer state lock is not poisoned");
            for (event, (_, digest)) in planned.iter().zip(&envelopes) {
                state.set_chart_digest(event.chart_id, *digest);
            }
            drop(state);
            let end = reached(&positions);
            answer_all(accepted, Ok(end), &positions);
            BatchOutcome::Appended(positions.len())
        }
        Err(error) => {
            let cause = std::error::Error::source(&error)
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::error!(error = %error, cause, events = planned.len(), "log append failed; batch rejected");
            keys.recently_sealed().forget(checked_there());
            state
                .write()
                .expect("writer state lock is not poisoned")
                .undo(journal);
            answer_all(accepted, Err(WriteError::Append(Arc::new(error))), &[]);
            BatchOutcome::Failed
        }
    }
}

fn seal_batch(
    planned: &[crate::command::PlannedEvent],
    headers_meta: &[(String, String, Option<chartlog_schemas::CommandId>)],
    keys: &KeyStore,
    state: &RwLock<WriterState>,
) -> Result<Vec<(chartlog_schemas::Envelope, [u8; 32])>, crypto::KeyStoreError> {
    use std::collections::HashMap;

    let mut heads: HashMap<chartlog_schemas::ChartId, ([u8; 32], chartlog_schemas::KeyId)> =
        HashMap::new();
    let mut sealed = Vec::with_capacity(planned.len());
    for (event, (actor, purpose, command_id)) in planned.iter().zip(headers_meta) {
        let chart_id = event.chart_id;
        if let std::collections::hash_map::Entry::Vacant(slot) = heads.entry(chart_id) {
            slot.insert(sealing_start(chart_id, event.seq, keys, state)?);
        }
        let (prev_digest, key_id) = heads[&chart_id];
        let header = EventHeader {
            event_id: EventId::random(),
            chart_id,
            seq: event.seq,
            event_type: event.event_type(),
            schema_version: event.event_type().current_schema_version(),
            recorded_at: event.recorded_at,
            actor: actor.clone(),
            purpose_of_use: purpose.clone(),
            key_id,
            signer: keys.signer_id(),
            prev_digest,
            command_id: *command_id,
        };
        let data_key = keys.data_key(key_id)?;
        let envelope = crypto::seal_event(&header, &event.payload, &data_key, keys.signer());
        let digest = digest_of(&envelope);
        heads.insert(chart_id, (digest, key_id));
        sealed.push((envelope, digest));
    }
    Ok(sealed)
}

/// Returns the digest a chart's next event chains to and the chart's data key, creating the
/// key for a chart that has none yet.
fn sealing_start(
    chart_id: chartlog_schemas::ChartId,
    seq: chartlog_schemas::EventSeq,
    keys: &KeyStore,
    state: &RwLock<WriterState>,
) -> Result<([u8; 32], chartlog_schemas::KeyId), crypto::KeyStoreError> {
    let known = {
        let state = state.read().expect("writer state lock is not poisoned");
        state.chart(chart_id).map(|head| (head.digest, head.key_id))
    };
    if let Some((digest, Some(key_id))) = known {
        if seq.0 > 1 {
            return Ok((digest, key_id));
        }
    }
    let key_id = match keys.chart_key_id(chart_id) {
        Some(key_id) => key_id,
        None => keys.create_data_key(chart_id)?,
    };
    state
        .write()
        .expect("writer state lock is not poisoned")
        .set_chart_key(chart_id, key_id);
    let digest = known.map_or([0; 32], |(digest, _)| digest);
    Ok((digest, key_id))
}

fn digest_of(envelope: &chartlog_schemas::Envelope) -> [u8; 32] {
    // The digest sits just before the signature at the end of every envelope.
    use chartlog_schemas::envelope::{DIGEST_LEN, SIGNATURE_LEN};
    let end = envelope.0.len() - SIGNATURE_LEN;
    let mut digest = [0u8; DIGEST_LEN];
    digest.copy_from_slice(&envelope.0[end - DIGEST_LEN..end]);
    digest
}

/// Returns, per partition, the offset one past the last of `positions` there.
fn reached(positions: &[LogPosition]) -> Frontier {
    let mut end = Frontier::default();
    for position in positions {
        end.raise(position.partition, position.offset + 1);
    }
    end
}

fn answer_all(
    accepted: Vec<Accepted>,
    outcome: Result<Frontier, WriteError>,
    positions: &[LogPosition],
) {
    // Events of one batch become visible together, so waiting for the batch's events up to a
    // command's last covers the command's own. Commands come in batch order, so the frontier
    // of the events up to each one's last grows from one reply to the next.
    let mut so_far = Frontier::default();
    let mut counted = 0;
    for command in accepted {
        let reply = match &outcome {
            Ok(end) => {
                let end_position = match command.last_event {
                    Some(index) if index < positions.len() => {
                        for position in positions.iter().take(index + 1).skip(counted) {
                            so_far.raise(position.partition, position.offset + 1);
                        }
                        counted = counted.max(index + 1);
                        so_far.clone()
                    }
                    _ => end.clone(),
                };
                Ok(WriteOutcome {
                    results: command.results,
                    end_position,
                    bodies: command.bodies,
                })
            }
            Err(WriteError::Append(error)) => Err(WriteError::Append(error.clone())),
            Err(WriteError::KeyStore(error)) => Err(WriteError::KeyStore(error.clone())),
            Err(_) => Err(WriteError::Stopped),
        };
        let _ = command.reply.send(reply);
    }
}
