//! The access journal: where a node keeps the access events of reads it served while the log
//! could not take them, until the log is back.
//!
//! A read appends its access event before any data leaves. When that append fails because the
//! log is unreachable, or earlier accesses are still waiting here, the access goes into this
//! journal instead: a RocksDB database in the data directory, written with a sync before the
//! read's response is sent. So reads keep being served through a Kafka outage and no access goes
//! unrecorded. A drain task submits the waiting accesses to the writer once the log is back and
//! deletes each only after its event is durable on the log.
//!
//! Invariants:
//! - An entry is encrypted under its chart's data key, like the event it becomes.
//! - Each entry carries a command id fixed when it was journaled, so an entry submitted again
//!   after a crash between the append and the delete takes effect once.
//! - The event records when the data left (`served_at_micros`) beside when it was appended.
//! - An entry that can never be recorded (it fails to decrypt, or its chart's data key is gone)
//!   moves to the `quarantine` column family, so it does not block the entries behind it. It is
//!   kept there for an operator to examine, and `/health` and `/metrics` count it.
//!
//! On Kafka only the owner of the log appends. A node that journaled accesses while it knew no
//! owner, and then finds another node owning the log, hands them over through the access topic
//! (`crate::log::access_topic`): each entry goes there encrypted as here and is deleted here once
//! the cluster acknowledged it; the owner records what it reads there and only then moves its
//! read position on.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chartlog_schemas::{ChartAccessed, ChartId, CommandId, KeyId};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::command::{Command, Operation};
use crate::crypto::{self, KeyStore};
use crate::log::access_topic::AccessTopic;
use crate::log::ownership::Role;
use crate::log::EventLog;
use crate::writer::{WeakWriter, WriteError, Writer};

/// Associated data that binds a journal entry's ciphertext to its purpose.
const ENTRY_CONTEXT: &[u8] = b"chartlog access journal v1";

/// Associated data that binds an access handed to the owner to its purpose.
const HANDOFF_CONTEXT: &[u8] = b"chartlog access handoff v1";

/// Maximum number of entries submitted to the writer in one round of draining.
const DRAIN_ROUND: usize = 512;

/// Delay between drain attempts while the log stays unreachable.
const DRAIN_RETRY: Duration = Duration::from_secs(1);

/// Column family of entries that can never be recorded.
const QUARANTINE: &str = "quarantine";

/// Error from the access journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// RocksDB failed.
    #[error("access journal storage failed")]
    Storage(#[from] rocksdb::Error),
    /// The chart has no data key, so its access cannot be encrypted.
    #[error("chart {0} has no data key")]
    NoDataKey(ChartId),
    /// The key store failed.
    #[error("access journal key lookup failed")]
    Keys(#[from] crypto::KeyStoreError),
    /// An entry does not decode or decrypt.
    #[error("access journal entry {0} is unreadable")]
    Unreadable(u64),
}

/// One waiting access of one chart, in the clear.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingAccess {
    /// Id of the command that records it, fixed when it was journaled.
    pub command_id: CommandId,
    /// The user who read.
    pub actor: String,
    /// The purpose of use the read was made for.
    pub purpose_of_use: String,
    /// The chart read.
    pub chart_id: ChartId,
    /// The access itself, with `served_at_micros` set.
    pub access: ChartAccessed,
}

/// A stored entry: the chart and key in the clear, the access encrypted.
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    chart_id: ChartId,
    key_id: KeyId,
    ciphertext: Vec<u8>,
}

/// Waiting entries read for draining. No `Debug`: the accesses are health data.
#[derive(Default)]
pub struct OldestEntries {
    /// Entries that opened, oldest first.
    pub readable: Vec<(u64, PendingAccess)>,
    /// Sequence numbers of entries that can never be opened: undecodable, failing
    /// decryption, or encrypted under a data key that is gone.
    pub unreadable: Vec<u64>,
}

/// The journal of one node.
pub struct AccessJournal {
    db: rocksdb::DB,
    keys: Arc<KeyStore>,
    next_sequence: AtomicU64,
    pending: watch::Sender<u64>,
    quarantined: watch::Sender<u64>,
    added: Notify,
}

impl std::fmt::Debug for AccessJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessJournal({} pending)", *self.pending.borrow())
    }
}

fn handoff_data(chart_id: ChartId) -> Vec<u8> {
    let mut data = HANDOFF_CONTEXT.to_vec();
    data.extend_from_slice(chart_id.as_bytes());
    data
}

fn associated_data(sequence: u64, chart_id: ChartId) -> Vec<u8> {
    let mut data = ENTRY_CONTEXT.to_vec();
    data.extend_from_slice(&sequence.to_be_bytes());
    data.extend_from_slice(chart_id.as_bytes());
    data
}

impl AccessJournal {
    /// Opens or creates the journal at `path`.
    ///
    /// # Errors
    ///
    /// [`JournalError::Storage`] when RocksDB cannot open it.
    pub fn open(path: &Path, keys: Arc<KeyStore>) -> Result<AccessJournal, JournalError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // As for the log: every journaled access was synced before its data left, so only an
        // unfinished record at the very end may be torn. Anything else that does not check is
        // corruption, and opening fails rather than silently dropping the accesses after it.
        options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        options.set_paranoid_checks(true);
        let db = rocksdb::DB::open_cf(&options, path, [QUARANTINE])?;
        let mut count = 0u64;
        let mut last = None;
        for item in db.iterator(rocksdb::IteratorMode::Start) {
            let (key, _) = item?;
            count += 1;
            last = key.as_ref().try_into().ok().map(u64::from_be_bytes);
        }
        let mut quarantined = 0u64;
        let mut last_quarantined = None;
        for item in db.iterator_cf(quarantine(&db), rocksdb::IteratorMode::Start) {
            let (key, _) = item?;
            quarantined += 1;
            last_quarantined = key.as_ref().try_into().ok().map(u64::from_be_bytes);
        }
        // Sequence numbers are part of each entry's associated data, so a quarantined entry's
        // number is never given to a new one.
        let next = last.max(last_quarantined).map_or(0, |last| last + 1);
        let (pending, _) = watch::channel(count);
        let (quarantined, _) = watch::channel(quarantined);
        Ok(AccessJournal {
            db,
            keys,
            next_sequence: AtomicU64::new(next),
            pending,
            quarantined,
            added: Notify::new(),
        })
    }

    /// Returns a receiver of the number of waiting entries.
    pub fn pending(&self) -> watch::Receiver<u64> {
        self.pending.subscribe()
    }

    /// Returns a receiver of the number of quarantined entries.
    pub fn quarantined(&self) -> watch::Receiver<u64> {
        self.quarantined.subscribe()
    }

    /// Returns whether no entry is waiting.
    pub fn is_empty(&self) -> bool {
        *self.pending.borrow() == 0
    }

    /// Stores `accesses` durably (synced) in one write. Blocks; call it off the async runtime.
    ///
    /// # Errors
    ///
    /// [`JournalError`] when a chart has no data key or the write fails; nothing was stored.
    pub fn append(&self, accesses: &[PendingAccess]) -> Result<(), JournalError> {
        let mut batch = rocksdb::WriteBatch::default();
        for access in accesses {
            let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
            let value = self.seal(access, |chart_id| associated_data(sequence, chart_id))?;
            batch.put(sequence.to_be_bytes(), value);
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        self.pending
            .send_modify(|pending| *pending += accesses.len() as u64);
        self.added.notify_one();
        Ok(())
    }

    /// Reads up to `max` waiting entries, oldest first, listing separately those that can
    /// never be opened.
    ///
    /// # Errors
    ///
    /// [`JournalError`] when the journal or the key store cannot be read at the moment.
    pub fn oldest(&self, max: usize) -> Result<OldestEntries, JournalError> {
        let mut oldest = OldestEntries::default();
        for item in self.db.iterator(rocksdb::IteratorMode::Start).take(max) {
            let (key, value) = item?;
            let Ok(sequence) = key.as_ref().try_into().map(u64::from_be_bytes) else {
                // Every key is a big-endian sequence number; anything else was not written
                // by this journal.
                return Err(JournalError::Unreadable(0));
            };
            match self.open_entry(sequence, &value) {
                Ok(access) => oldest.readable.push((sequence, access)),
                Err(JournalError::Unreadable(_))
                | Err(JournalError::Keys(
                    crypto::KeyStoreError::MissingDataKey(_)
                    | crypto::KeyStoreError::Corrupt(_)
                    | crypto::KeyStoreError::Unwrap(..),
                )) => oldest.unreadable.push(sequence),
                Err(error) => return Err(error),
            }
        }
        Ok(oldest)
    }

    /// Encrypts an access for the access topic, under its chart's data key like a journal
    /// entry. Returns the record's key (the command id) and value.
    ///
    /// # Errors
    ///
    /// [`JournalError`] when the chart has no data key.
    pub fn seal_handoff(&self, access: &PendingAccess) -> Result<(Vec<u8>, Vec<u8>), JournalError> {
        let value = self.seal(access, handoff_data)?;
        Ok((access.command_id.as_bytes().to_vec(), value))
    }

    /// Opens an access read from the access topic. The data key authenticates it: only a node
    /// holding the chart's key could have sealed it.
    ///
    /// # Errors
    ///
    /// [`JournalError::Unreadable`] (with `offset`) when it does not decode or decrypt, or
    /// [`JournalError::Keys`] when its data key is unavailable.
    pub fn open_handoff(&self, offset: u64, value: &[u8]) -> Result<PendingAccess, JournalError> {
        self.open_sealed(offset, value, handoff_data)
    }

    fn open_entry(&self, sequence: u64, value: &[u8]) -> Result<PendingAccess, JournalError> {
        self.open_sealed(sequence, value, |chart_id| {
            associated_data(sequence, chart_id)
        })
    }

    /// Encrypts an access under its chart's data key, bound to the associated data `context`
    /// gives for the chart, and encodes it with the chart and key in the clear.
    fn seal(
        &self,
        access: &PendingAccess,
        context: impl FnOnce(ChartId) -> Vec<u8>,
    ) -> Result<Vec<u8>, JournalError> {
        let key_id = self
            .keys
            .chart_key_id(access.chart_id)
            .ok_or(JournalError::NoDataKey(access.chart_id))?;
        let data_key = self.keys.data_key(key_id)?;
        let plaintext = postcard::to_allocvec(access)
            .expect("a pending access serializes with postcard into a Vec");
        let stored = StoredEntry {
            chart_id: access.chart_id,
            key_id,
            ciphertext: crypto::encrypt(&data_key, &plaintext, &context(access.chart_id)),
        };
        Ok(postcard::to_allocvec(&stored)
            .expect("a sealed access serializes with postcard into a Vec"))
    }

    /// Opens what [`AccessJournal::seal`] made; `number` names it in errors.
    fn open_sealed(
        &self,
        number: u64,
        value: &[u8],
        context: impl FnOnce(ChartId) -> Vec<u8>,
    ) -> Result<PendingAccess, JournalError> {
        let unreadable = |_| JournalError::Unreadable(number);
        let stored: StoredEntry = postcard::from_bytes(value).map_err(unreadable)?;
        let data_key = self.keys.data_key(stored.key_id)?;
        let plaintext = crypto::decrypt(&data_key, &stored.ciphertext, &context(stored.chart_id))
            .map_err(|_| JournalError::Unreadable(number))?;
        let access: PendingAccess = postcard::from_bytes(&plaintext).map_err(unreadable)?;
        if access.chart_id != stored.chart_id {
            return Err(JournalError::Unreadable(number));
        }
        Ok(access)
    }

    /// Moves entries that can never be recorded into the quarantine column family, in one
    /// synced write.
    ///
    /// # Errors
    ///
    /// [`JournalError::Storage`] when the write fails; the entries stay where they were.
    pub fn quarantine(&self, sequences: &[u64]) -> Result<(), JournalError> {
        let mut batch = rocksdb::WriteBatch::default();
        let mut moved = 0u64;
        for sequence in sequences {
            let key = sequence.to_be_bytes();
            if let Some(value) = self.db.get(key)? {
                batch.put_cf(quarantine(&self.db), key, value);
                batch.delete(key);
                moved += 1;
            }
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        self.pending
            .send_modify(|pending| *pending = pending.saturating_sub(moved));
        self.quarantined.send_modify(|count| *count += moved);
        Ok(())
    }

    /// Deletes entries whose events are durable on the log.
    ///
    /// # Errors
    ///
    /// [`JournalError::Storage`] when the write fails; the entries stay and are submitted again,
    /// which their command ids make harmless.
    pub fn remove(&self, sequences: &[u64]) -> Result<(), JournalError> {
        let mut batch = rocksdb::WriteBatch::default();
        for sequence in sequences {
            batch.delete(sequence.to_be_bytes());
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        self.pending
            .send_modify(|pending| *pending = pending.saturating_sub(sequences.len() as u64));
        Ok(())
    }
}

fn quarantine(db: &rocksdb::DB) -> &rocksdb::ColumnFamily {
    db.cf_handle(QUARANTINE)
        .expect("the journal is opened with its quarantine column family")
}

impl PendingAccess {
    /// Returns the command that records this access on the log.
    pub fn command(&self) -> Command {
        Command {
            actor: self.actor.clone(),
            purpose_of_use: self.purpose_of_use.clone(),
            command_id: Some(self.command_id),
            fingerprint: None,
            operations: vec![Operation::Access {
                chart_id: self.chart_id,
                access: self.access.clone(),
            }],
        }
    }
}

/// Runs a journal write off the async runtime; a failed write and a failed task both come
/// back as the error's text.
async fn blocking(
    journal: &Arc<AccessJournal>,
    write: impl FnOnce(&AccessJournal) -> Result<(), JournalError> + Send + 'static,
) -> Result<(), String> {
    let journal = journal.clone();
    match tokio::task::spawn_blocking(move || write(&journal)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Reads the oldest waiting entries and moves those that can never be opened to quarantine.
/// Returns `None` when the journal cannot be read now.
async fn oldest_readable(journal: &Arc<AccessJournal>) -> Option<Vec<(u64, PendingAccess)>> {
    let oldest = {
        let journal = journal.clone();
        match tokio::task::spawn_blocking(move || journal.oldest(DRAIN_ROUND)).await {
            Ok(Ok(oldest)) => oldest,
            Ok(Err(error)) => {
                tracing::error!(error = %error, "access journal unreadable; entries stay");
                return None;
            }
            Err(error) => {
                tracing::error!(error = %error, "access journal read task failed; entries stay");
                return None;
            }
        }
    };
    if !oldest.unreadable.is_empty() {
        // An access that can never be recorded must not hold back the ones behind it.
        for sequence in &oldest.unreadable {
            tracing::error!(
                entry = sequence,
                "journaled access cannot be opened (altered, or its chart's data key is gone); moving it to quarantine"
            );
        }
        let unreadable = oldest.unreadable;
        let moved = blocking(journal, move |journal| journal.quarantine(&unreadable)).await;
        if let Err(error) = moved {
            tracing::error!(error, "quarantining journaled accesses failed; they stay");
            return None;
        }
    }
    Some(oldest.readable)
}

/// Submits accesses to the writer together, so they share its batches. Returns the keys of
/// those now on the log and whether any failed.
async fn submit_all<K: Send + 'static>(
    writer: &Writer,
    accesses: Vec<(K, PendingAccess)>,
) -> (Vec<K>, bool) {
    let mut submitted = tokio::task::JoinSet::new();
    for (key, access) in accesses {
        let writer = writer.clone();
        submitted.spawn(async move { (key, writer.submit(access.command()).await) });
    }
    let mut recorded = Vec::new();
    let mut stalled = false;
    while let Some(result) = submitted.join_next().await {
        let (key, outcome) = match result {
            Ok(submission) => submission,
            Err(error) => {
                tracing::error!(error = %error, "access submission task failed; the access stays");
                stalled = true;
                continue;
            }
        };
        match outcome {
            Ok(_) => recorded.push(key),
            Err(WriteError::Rejected(error)) => {
                // The log took nothing; the access stays so that none is dropped.
                tracing::error!(error = %error, "waiting access rejected; it stays");
                stalled = true;
            }
            // The writer has logged why the append failed; the access waits for the next round.
            Err(_) => stalled = true,
        }
    }
    (recorded, stalled)
}

/// Submits one round of waiting entries and deletes those now on the log. Returns how many
/// were recorded and whether any entry stays for a later round.
async fn drain_round(journal: &Arc<AccessJournal>, writer: &Writer) -> (usize, bool) {
    let Some(entries) = oldest_readable(journal).await else {
        return (0, true);
    };
    if entries.is_empty() {
        return (0, false);
    }
    let (recorded, mut stalled) = submit_all(writer, entries).await;
    let count = recorded.len();
    if !recorded.is_empty() {
        let removed = blocking(journal, move |journal| journal.remove(&recorded)).await;
        if let Err(error) = removed {
            tracing::error!(error, "access journal entries recorded on the log but not deleted; they will be submitted again");
            stalled = true;
        }
    }
    (count, stalled)
}

/// Handles a node on Kafka needs to hand accesses to the owner of the log, or, as the owner,
/// to record those that other nodes handed over.
pub struct Handoff {
    /// The access topic.
    pub topic: Arc<AccessTopic>,
    /// This node's role in the owner group.
    pub role: watch::Receiver<Role>,
    /// The log, which reports whether this node owns it.
    pub log: Arc<dyn EventLog>,
    /// This node's own base URL, which the group names as the owner's while this node is about
    /// to take the log over.
    pub own_url: String,
}

/// Sends one round of waiting entries to the access topic, for the owner to record, and deletes
/// them here once the cluster acknowledged them. Returns how many were handed over and whether
/// any entry stays.
async fn hand_over_round(journal: &Arc<AccessJournal>, topic: &AccessTopic) -> (usize, bool) {
    let Some(entries) = oldest_readable(journal).await else {
        return (0, true);
    };
    if entries.is_empty() {
        return (0, false);
    }
    let mut records = Vec::with_capacity(entries.len());
    let mut sequences = Vec::with_capacity(entries.len());
    for (sequence, access) in &entries {
        match journal.seal_handoff(access) {
            Ok(record) => {
                records.push(record);
                sequences.push(*sequence);
            }
            Err(error) => {
                tracing::error!(entry = sequence, error = %error, "journaled access cannot be handed over; it stays");
            }
        }
    }
    if let Err(error) = topic.send(&records).await {
        tracing::warn!(error = %error, "handing journaled accesses to the owner failed; they stay");
        return (0, true);
    }
    let count = sequences.len();
    let stalled = count < entries.len();
    let removed = blocking(journal, move |journal| journal.remove(&sequences)).await;
    if let Err(error) = removed {
        tracing::error!(
            error,
            "journaled accesses handed over but not deleted; they will be handed over again"
        );
        return (count, true);
    }
    (count, stalled)
}

/// Records one round of accesses that other nodes handed over, then commits the read position
/// past them. Returns how many were recorded and whether some must be read again.
async fn take_over_round(
    journal: &Arc<AccessJournal>,
    topic: &Arc<AccessTopic>,
    writer: &Writer,
) -> (usize, bool) {
    let read = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || topic.read(DRAIN_ROUND)).await
    };
    let records = match read {
        Ok(Ok(records)) => records,
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "reading the access topic failed; retrying");
            return (0, true);
        }
        Err(error) => {
            tracing::error!(error = %error, "access topic read task failed; retrying");
            return (0, true);
        }
    };
    let Some(next) = records.last().map(|record| record.offset + 1) else {
        return (0, false);
    };
    let mut accesses = Vec::with_capacity(records.len());
    for record in records {
        match journal.open_handoff(record.offset as u64, &record.bytes) {
            Ok(access) => accesses.push((record.offset, access)),
            // Not sealed with a data key of this log, or its key is gone or was never shared
            // (the owner read the key topic to its end). It can never be recorded, so it is
            // skipped rather than block every access behind it.
            Err(JournalError::Unreadable(_))
            | Err(JournalError::Keys(
                crypto::KeyStoreError::MissingDataKey(_)
                | crypto::KeyStoreError::NotShared(_)
                | crypto::KeyStoreError::Corrupt(_)
                | crypto::KeyStoreError::Unwrap(..),
            )) => {
                tracing::error!(
                    topic = topic.name(),
                    offset = record.offset,
                    "handed access cannot be opened; skipped"
                );
            }
            Err(error) => {
                tracing::warn!(offset = record.offset, error = %error, "handed access cannot be opened now; retrying");
                topic.stop_reading();
                return (0, true);
            }
        }
    }
    let (recorded, stalled) = submit_all(writer, accesses).await;
    if stalled {
        // Read them again from the committed position; the recorded ones take effect once.
        topic.stop_reading();
        return (recorded.len(), true);
    }
    let commit = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || topic.commit(next)).await
    };
    if !matches!(commit, Ok(Ok(()))) {
        tracing::warn!(
            "committing the access topic position failed; its accesses are recorded again, once"
        );
        topic.stop_reading();
    }
    (recorded.len(), false)
}

/// Starts the task that moves waiting accesses onto the log, until `shutdown` turns true. On
/// Kafka (`handoff`), a node that does not own the log hands its waiting accesses to the owner
/// once it finds one, and the owner records the accesses handed to it.
///
/// The task keeps only a weak writer handle and upgrades it for one round at a time, so it
/// never keeps the writer thread, and the log that thread has open, running after the node is
/// dropped.
pub fn start_drain(
    journal: Arc<AccessJournal>,
    writer: WeakWriter,
    handoff: Option<Handoff>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let Some(full) = writer.upgrade() else {
                return;
            };
            let owner = handoff
                .as_ref()
                .is_none_or(|handoff| handoff.log.is_owner());
            let mut stalled = false;
            if let Some(handoff) = &handoff {
                if owner {
                    let (recorded, again) = take_over_round(&journal, &handoff.topic, &full).await;
                    stalled |= again;
                    if recorded > 0 {
                        tracing::info!(
                            recorded,
                            "accesses handed over by other nodes recorded on the log"
                        );
                    }
                } else {
                    handoff.topic.stop_reading();
                }
            }
            if !journal.is_empty() {
                let owner_elsewhere = handoff.as_ref().is_some_and(|handoff| {
                    matches!(
                        &*handoff.role.borrow(),
                        Role::Standby { owner_url: Some(url) } if *url != handoff.own_url
                    )
                });
                if owner {
                    let (recorded, again) = drain_round(&journal, &full).await;
                    stalled |= again;
                    if recorded > 0 {
                        tracing::info!(
                            recorded,
                            pending = *journal.pending.borrow(),
                            "journaled accesses recorded on the log"
                        );
                    }
                } else if let Some(handoff) = handoff.as_ref().filter(|_| owner_elsewhere) {
                    let (handed, again) = hand_over_round(&journal, &handoff.topic).await;
                    stalled |= again;
                    if handed > 0 {
                        tracing::info!(
                            handed,
                            pending = *journal.pending.borrow(),
                            "journaled accesses handed to the owner of the log"
                        );
                    }
                } else {
                    // No owner known: the accesses wait until one is.
                    stalled = true;
                }
            }
            drop(full);
            if !stalled && !journal.is_empty() {
                continue;
            }
            if stalled || handoff.is_some() {
                // New entries arriving meanwhile do not bring the log back, and on Kafka other
                // nodes may hand accesses over at any time: look again after a while.
                tokio::select! {
                    _ = tokio::time::sleep(DRAIN_RETRY) => {}
                    _ = journal.added.notified(), if !stalled => {}
                    _ = shutdown.changed() => {}
                }
            } else {
                tokio::select! {
                    _ = journal.added.notified() => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    })
}
