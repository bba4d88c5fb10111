//! The embedded log: envelopes in a RocksDB database on one machine, keyed by position.
//!
//! Each entry is stored under its 8-byte big-endian position, so iteration order is log order.
//! An append is one `WriteBatch` written with `sync`, so a batch is durable before it is
//! acknowledged and a crash leaves either the whole batch or none of it. The writer thread
//! gathers concurrent commands into one batch, so many commands share one sync (group commit).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chartlog_schemas::{ChartId, Envelope, EventSeq};
use tokio::sync::watch;

use super::{AppendError, EventLog, Frontier, LogPosition, ReadError, RecordedHead};

/// Error from opening the embedded log.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// RocksDB could not open the database, for example because another process holds it.
    #[error("cannot open the embedded log at {path}: {reason}")]
    Database {
        /// Directory of the log.
        path: PathBuf,
        /// RocksDB's explanation; it names files, never content.
        reason: String,
    },
    /// An entry's key is not an 8-byte position, so this is not a Chartlog log.
    #[error("the embedded log at {0} contains a key that is not a log position")]
    Corrupt(PathBuf),
}

/// The RocksDB-backed log.
pub struct EmbeddedLog {
    db: rocksdb::DB,
    /// Offset of the next entry; the log has one partition.
    next: Mutex<u64>,
    end: watch::Sender<Frontier>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EmbeddedLog(end {})", self.len())
    }
}

/// Column family of the entries, keyed by position.
const DEFAULT_FAMILY: &str = "default";
/// Column family of each chart's head: chart id to sequence number (8 bytes big-endian) and
/// digest (32 bytes) of its last entry. Written in the same batch as the entries, so a verifier
/// can tell a chart whose last entries were removed from one that simply ended there.
const HEADS_FAMILY: &str = "heads";

fn position_key(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

/// Returns the offset one past the last entry.
fn last_position(db: &rocksdb::DB, path: &Path) -> Result<u64, OpenError> {
    let mut iterator = db.raw_iterator();
    iterator.seek_to_last();
    match iterator.key() {
        None => {
            iterator.status().map_err(|error| OpenError::Database {
                path: path.to_path_buf(),
                reason: error.into_string(),
            })?;
            Ok(0)
        }
        Some(key) => {
            let bytes: [u8; 8] = key
                .try_into()
                .map_err(|_| OpenError::Corrupt(path.to_path_buf()))?;
            Ok(u64::from_be_bytes(bytes) + 1)
        }
    }
}

impl EmbeddedLog {
    /// Opens the log for appending, creating it when `create` is set. Only one process can
    /// hold a log open for appending; a second open fails with [`OpenError::Database`].
    ///
    /// # Errors
    ///
    /// [`OpenError`] when the database cannot be opened or is not a Chartlog log.
    pub fn open(path: &Path, create: bool) -> Result<EmbeddedLog, OpenError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(create);
        options.create_missing_column_families(true);
        // Envelopes are ciphertext and do not compress; the default block cache is enough
        // for the tail reads that projections make right after an append.
        options.set_compression_type(rocksdb::DBCompressionType::None);
        // Every acknowledged append was synced, so only an unacknowledged record at the very end
        // of the write-ahead log may be incomplete after a crash. Anything else that does not
        // check is corruption, and opening fails instead of silently dropping what follows.
        options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        options.set_paranoid_checks(true);
        let db = rocksdb::DB::open_cf(&options, path, [DEFAULT_FAMILY, HEADS_FAMILY]).map_err(
            |error| OpenError::Database {
                path: path.to_path_buf(),
                reason: error.into_string(),
            },
        )?;
        Self::from_db(db, path)
    }

    /// Opens the log read-only, for verification while a server may hold it open. The view
    /// is the log as of the moment of opening.
    ///
    /// # Errors
    ///
    /// [`OpenError`] when the database cannot be opened or is not a Chartlog log.
    pub fn open_read_only(path: &Path) -> Result<EmbeddedLog, OpenError> {
        // RocksDB creates the directory of a database it fails to open, even read-only.
        if !path.join("CURRENT").exists() {
            return Err(OpenError::Database {
                path: path.to_path_buf(),
                reason: "no log there".into(),
            });
        }
        let mut options = rocksdb::Options::default();
        options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
        options.set_paranoid_checks(true);
        let db = rocksdb::DB::open_cf_for_read_only(
            &options,
            path,
            [DEFAULT_FAMILY, HEADS_FAMILY],
            false,
        )
        .map_err(|error| OpenError::Database {
            path: path.to_path_buf(),
            reason: error.into_string(),
        })?;
        Self::from_db(db, path)
    }

    fn from_db(db: rocksdb::DB, path: &Path) -> Result<EmbeddedLog, OpenError> {
        let next = last_position(&db, path)?;
        let (end, _) = watch::channel(Frontier::from_offsets(vec![next]));
        Ok(EmbeddedLog {
            db,
            next: Mutex::new(next),
            end,
        })
    }

    /// Returns the position one past the last entry.
    pub fn len(&self) -> u64 {
        self.end.borrow().get(0)
    }

    /// Returns each chart's head as recorded with the appends: sequence number and digest of
    /// the chart's last entry.
    ///
    /// # Errors
    ///
    /// [`ReadError`] when the heads cannot be read or one is malformed.
    pub fn chart_heads(&self) -> Result<Vec<(ChartId, EventSeq, [u8; 32])>, ReadError> {
        let failure = |source: Box<dyn std::error::Error + Send + Sync>| ReadError {
            position: LogPosition::default(),
            source,
        };
        let heads = self
            .db
            .cf_handle(HEADS_FAMILY)
            .ok_or_else(|| failure("heads column family missing".into()))?;
        let mut result = Vec::new();
        for item in self.db.iterator_cf(heads, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|error| failure(error.into()))?;
            let chart: [u8; 16] = key
                .as_ref()
                .try_into()
                .map_err(|_| failure("malformed chart head key".into()))?;
            if value.len() != 40 {
                return Err(failure("malformed chart head".into()));
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&value[..8]);
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&value[8..]);
            result.push((
                ChartId::from_bytes(chart),
                EventSeq(u64::from_be_bytes(seq)),
                digest,
            ));
        }
        Ok(result)
    }

    /// Returns whether the log has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EventLog for EmbeddedLog {
    fn recorded_heads(&self) -> Result<Option<Vec<RecordedHead>>, ReadError> {
        self.chart_heads().map(Some)
    }

    fn append_batch(&self, envelopes: &[Envelope]) -> Result<Vec<LogPosition>, AppendError> {
        let mut next = self.next.lock().expect("log position lock is not poisoned");
        let mut batch = rocksdb::WriteBatch::default();
        let mut positions = Vec::with_capacity(envelopes.len());
        let heads = self
            .db
            .cf_handle(HEADS_FAMILY)
            .expect("heads column family is opened with the log");
        for (index, envelope) in envelopes.iter().enumerate() {
            let position = LogPosition::new(0, *next + index as u64);
            batch.put(position_key(position.offset), &envelope.0);
            positions.push(position);
            // Entries that do not parse are stored as given; the verifier reports them.
            if let Ok(parsed) = chartlog_schemas::envelope::parse(&envelope.0) {
                let mut head = Vec::with_capacity(40);
                head.extend_from_slice(&parsed.header.seq.0.to_be_bytes());
                head.extend_from_slice(&parsed.digest);
                batch.put_cf(heads, parsed.header.chart_id.as_bytes(), head);
            }
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(|error| AppendError::Storage(error.into()))?;
        *next += envelopes.len() as u64;
        self.end.send_replace(Frontier::from_offsets(vec![*next]));
        Ok(positions)
    }

    fn read_from(
        &self,
        from: LogPosition,
        max: usize,
    ) -> Result<Vec<(LogPosition, Envelope)>, ReadError> {
        let mut entries = Vec::new();
        if from.partition != 0 {
            return Err(ReadError {
                position: from,
                source: "the embedded log has one partition".into(),
            });
        }
        let mut iterator = self.db.raw_iterator();
        iterator.seek(position_key(from.offset));
        while entries.len() < max {
            let (Some(key), Some(value)) = (iterator.key(), iterator.value()) else {
                break;
            };
            let bytes: [u8; 8] = key.try_into().map_err(|_| ReadError {
                position: from,
                source: "log key is not an 8-byte position".into(),
            })?;
            entries.push((
                LogPosition::new(0, u64::from_be_bytes(bytes)),
                Envelope(value.to_vec()),
            ));
            iterator.next();
        }
        // A damaged block stops the iterator: name the first position it did not give.
        let reached = entries.last().map_or(from, |(position, _)| position.next());
        iterator.status().map_err(|error| ReadError {
            position: reached,
            source: error.into(),
        })?;
        Ok(entries)
    }

    fn end_position(&self) -> watch::Receiver<Frontier> {
        self.end.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(byte: u8) -> Envelope {
        Envelope(vec![byte; 10])
    }

    #[test]
    fn appended_batch_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), true).unwrap();
        let first = log.append_batch(&[envelope(1), envelope(2)]).unwrap();
        let second = log.append_batch(&[envelope(3)]).unwrap();
        assert_eq!(first, vec![LogPosition::new(0, 0), LogPosition::new(0, 1)]);
        assert_eq!(second, vec![LogPosition::new(0, 2)]);
        let entries = log.read_from(LogPosition::new(0, 1), 10).unwrap();
        let bytes: Vec<u8> = entries.iter().map(|(_, envelope)| envelope.0[0]).collect();
        assert_eq!(bytes, vec![2, 3]);
        assert_eq!(log.end_position().borrow().offsets(), &[3]);
    }

    #[test]
    fn reopen_continues_after_last_entry() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), true).unwrap();
            log.append_batch(&[envelope(1), envelope(2)]).unwrap();
        }
        let log = EmbeddedLog::open(dir.path(), true).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            log.append_batch(&[envelope(3)]).unwrap(),
            vec![LogPosition::new(0, 2)]
        );
    }

    #[test]
    fn second_writer_on_same_directory_fails() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedLog::open(dir.path(), true).unwrap();
        let error = EmbeddedLog::open(dir.path(), true).unwrap_err();
        assert!(matches!(error, OpenError::Database { .. }), "{error}");
    }

    #[test]
    fn read_only_open_beside_writer() {
        let dir = tempfile::tempdir().unwrap();
        let writer = EmbeddedLog::open(dir.path(), true).unwrap();
        writer.append_batch(&[envelope(5)]).unwrap();
        let reader = EmbeddedLog::open_read_only(dir.path()).unwrap();
        assert_eq!(
            reader.read_from(LogPosition::default(), 10).unwrap().len(),
            1
        );
    }
}
