//! The chart projection: current and past versions of every FHIR resource.
//!
//! Keys, all in the default column family (`\0` separates variable-length parts; FHIR ids and
//! type names cannot contain it):
//!
//! | key | value |
//! | --- | --- |
//! | `!layout` | version of this key layout, 4 bytes big-endian |
//! | `!log` | the log the positions belong to, as text: `embedded`, or `kafka`, topic and partition count |
//! | `!position` | next offset of partition 0 to apply, 8 bytes big-endian |
//! | `!position` partition | next offset of a later partition (4 bytes big-endian) to apply |
//! | `v` type `\0` id `\0` version | [`VersionRecord`] |
//! | `c` type `\0` id | current version number |
//! | `h` chart id, offset | type `\0` id `\0` version: the chart's history in log order |
//! | `t` type `\0` time, partition, offset | id `\0` version: the type's history in the order the events were recorded |
//! | `m` chart id, type `\0` id | empty: resources of a chart that are not deleted |
//! | `p` patient id | chart id |
//! | `a` chart id, offset | envelope of a chart-accessed event: the chart's access log |
//! | `s` chart id | sequence number of the chart's last event applied, 8 bytes big-endian |
//!
//! A chart's events are all in one partition of the log, so the chart-keyed indexes use the
//! offset in it. The type history spans charts and so partitions. It is ordered by the
//! events' timestamps, which one writer issues in increasing order, then by partition and
//! offset. A projection of an earlier layout is cleared when opened and rebuilt from the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chartlog_schemas::{ChartId, ChartKind, EventPayload, HlcTimestamp};
use serde::{Deserialize, Serialize};

use crate::ProjectedEvent;

const POSITION_KEY: &[u8] = b"!position";
const LAYOUT_KEY: &[u8] = b"!layout";
const LOG_KEY: &[u8] = b"!log";

/// Version of the key layout. Projections of another version are cleared and rebuilt.
const LAYOUT: u32 = 3;

/// Returns the key of the next offset to apply in `partition`.
fn position_key(partition: u32) -> Vec<u8> {
    let mut key = POSITION_KEY.to_vec();
    if partition > 0 {
        key.extend_from_slice(&partition.to_be_bytes());
    }
    key
}

/// Encodes a timestamp so that byte order is time order.
fn timestamp_key(timestamp: HlcTimestamp) -> [u8; 12] {
    let mut key = [0; 12];
    // Flipping the sign bit makes two's complement order unsigned order.
    let wall = (timestamp.wall_micros as u64) ^ (1 << 63);
    key[..8].copy_from_slice(&wall.to_be_bytes());
    key[8..].copy_from_slice(&timestamp.logical.to_be_bytes());
    key
}

/// Raw key-value pairs read from the projection.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Stored access-event envelopes, each with its log position.
pub type Accesses = Vec<(u64, Vec<u8>)>;

/// Error from the chart projection.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// RocksDB failed.
    #[error("chart projection storage at {path}")]
    Storage {
        /// Directory of the projection.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rocksdb::Error,
    },
    /// An event arrived out of order: the projection expected another position.
    #[error("expected log position {expected}, received {received}")]
    Gap {
        /// Next position the projection needs.
        expected: u64,
        /// Position it was given.
        received: u64,
    },
    /// An event does not continue its chart: a replayed or reordered record on the log.
    #[error("log entry at offset {offset} of partition {partition} has sequence number {found} in chart {chart_id}, which expected {expected}")]
    OutOfSequence {
        /// Partition of the entry.
        partition: u32,
        /// Offset of the entry.
        offset: u64,
        /// Its chart.
        chart_id: ChartId,
        /// The sequence number the chart continues with.
        expected: u64,
        /// The entry's sequence number.
        found: u64,
    },
    /// A stored record does not decode.
    #[error("chart projection record under key prefix {prefix:?} is corrupt")]
    Corrupt {
        /// First byte of the key, naming the index.
        prefix: char,
    },
}

/// One stored version of a resource, or its deletion.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Chart the resource belongs to.
    pub chart_id: ChartId,
    /// FHIR resource type.
    pub resource_type: String,
    /// Logical id.
    pub resource_id: String,
    /// Version number, from 1.
    pub version: u64,
    /// Whether this version is a deletion.
    pub deleted: bool,
    /// Sequence number of the event in its chart.
    pub seq: u64,
    /// Partition of the log holding the event.
    pub partition: u32,
    /// Offset of the event in its partition.
    pub position: u64,
    /// When the event was recorded.
    pub recorded_at: HlcTimestamp,
    /// The envelope bytes; the resource is inside, encrypted.
    pub envelope: Vec<u8>,
}

impl VersionRecord {
    /// Returns the record's place in the order the log recorded events: timestamp, then
    /// partition and offset.
    pub fn log_order(&self) -> (HlcTimestamp, u32, u64) {
        (self.recorded_at, self.partition, self.position)
    }
}

impl std::fmt::Debug for VersionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VersionRecord({}/{}/_history/{}, deleted {}, position {}:{})",
            self.resource_type,
            self.resource_id,
            self.version,
            self.deleted,
            self.partition,
            self.position
        )
    }
}

/// The chart read model in RocksDB.
pub struct ChartProjection {
    db: rocksdb::DB,
    path: PathBuf,
    /// Whether opening cleared a projection of an earlier layout.
    cleared: bool,
}

impl std::fmt::Debug for ChartProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChartProjection({})", self.path.display())
    }
}

fn resource_key(prefix: u8, resource_type: &str, resource_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + resource_type.len() + resource_id.len());
    key.push(prefix);
    key.extend_from_slice(resource_type.as_bytes());
    key.push(0);
    key.extend_from_slice(resource_id.as_bytes());
    key
}

fn version_key(resource_type: &str, resource_id: &str, version: u64) -> Vec<u8> {
    let mut key = resource_key(b'v', resource_type, resource_id);
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn chart_prefix(prefix: u8, chart_id: ChartId) -> Vec<u8> {
    let mut key = Vec::with_capacity(40);
    key.push(prefix);
    key.extend_from_slice(chart_id.as_bytes());
    key
}

fn type_prefix(resource_type: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(resource_type.len() + 2);
    key.push(b't');
    key.extend_from_slice(resource_type.as_bytes());
    key.push(0);
    key
}

/// Splits `type \0 id \0 version` as stored in the history indexes.
fn split_version_ref(bytes: &[u8]) -> Option<(String, String, u64)> {
    let mut parts = bytes.splitn(3, |byte| *byte == 0);
    let resource_type = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let resource_id = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let version = u64::from_be_bytes(parts.next()?.try_into().ok()?);
    Some((resource_type, resource_id, version))
}

impl ChartProjection {
    /// Opens the projection, creating it when absent.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Storage`] when RocksDB cannot open it (for example because another
    /// process holds it).
    pub fn open(path: &Path) -> Result<ChartProjection, ProjectionError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, path).map_err(|source| ProjectionError::Storage {
            path: path.to_path_buf(),
            source,
        })?;
        let mut projection = ChartProjection {
            db,
            path: path.to_path_buf(),
            cleared: false,
        };
        projection.cleared = projection.settle_layout()?;
        Ok(projection)
    }

    /// Returns whether opening found a projection of an earlier key layout and cleared it, so
    /// that it is rebuilt from the log.
    pub fn cleared_for_rebuild(&self) -> bool {
        self.cleared
    }

    /// Returns whether the projection was written in another key layout than this code's. Such
    /// a projection is cleared, so that it is rebuilt from the log.
    fn settle_layout(&self) -> Result<bool, ProjectionError> {
        let stored = self.db.get(LAYOUT_KEY).map_err(self.storage())?;
        if stored.as_deref() == Some(LAYOUT.to_be_bytes().as_slice()) {
            return Ok(false);
        }
        let empty = !self.has_state()?;
        self.clear(None)?;
        Ok(!empty)
    }

    /// Returns whether the projection contains anything beyond its layout and log keys.
    fn has_state(&self) -> Result<bool, ProjectionError> {
        let mut iterator = self.db.raw_iterator();
        iterator.seek_to_first();
        while let Some(key) = iterator.key() {
            if key != LAYOUT_KEY && key != LOG_KEY {
                return Ok(true);
            }
            iterator.next();
        }
        iterator.status().map_err(self.storage())?;
        Ok(false)
    }

    /// Deletes everything and writes the current layout and, when given, the log.
    fn clear(&self, log: Option<&str>) -> Result<(), ProjectionError> {
        let mut batch = rocksdb::WriteBatch::default();
        // Every key begins with a printable byte, so this range contains them all.
        batch.delete_range(&[0u8][..], &[0xffu8; 8][..]);
        batch.put(LAYOUT_KEY, LAYOUT.to_be_bytes());
        if let Some(log) = log {
            batch.put(LOG_KEY, log.as_bytes());
        }
        self.db.write(batch).map_err(self.storage())
    }

    /// Records which log the projection's positions belong to: `embedded`, or `kafka`, the
    /// topic and its partition count. A projection built from another log is cleared, so that
    /// it is rebuilt from this one, since its positions mean nothing here. Returns whether it
    /// was cleared.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Storage`] when the projection cannot be read or written.
    pub fn bind_log(&self, log: &str) -> Result<bool, ProjectionError> {
        let stored = self.db.get(LOG_KEY).map_err(self.storage())?;
        if stored.as_deref() == Some(log.as_bytes()) {
            return Ok(false);
        }
        let cleared = self.has_state()?;
        self.clear(Some(log))?;
        Ok(cleared)
    }

    /// Reads the name of the log the projection at `path` was built from, as given to
    /// [`ChartProjection::bind_log`], without opening it for writing.
    ///
    /// Returns `None` when there is no projection there or it names no log.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when it cannot be opened or read.
    pub fn read_bound_log(path: &Path) -> Result<Option<String>, ProjectionError> {
        let Some(projection) = Self::open_read_only(path)? else {
            return Ok(None);
        };
        let stored = projection.db.get(LOG_KEY).map_err(projection.storage())?;
        Ok(stored.map(|name| String::from_utf8_lossy(&name).into_owned()))
    }

    /// Opens the projection at `path` for reading only, while a server may use it; `None`
    /// when there is no projection there.
    fn open_read_only(path: &Path) -> Result<Option<ChartProjection>, ProjectionError> {
        // RocksDB creates the directory of a database it fails to open, even read-only.
        if !path.join("CURRENT").exists() {
            return Ok(None);
        }
        let db = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), path, false)
            .map_err(|source| ProjectionError::Storage {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Some(ChartProjection {
            db,
            path: path.to_path_buf(),
            cleared: false,
        }))
    }

    /// Reads the next log position of the projection at `path` without opening it for
    /// writing, while a server may use it; `None` when there is no projection there.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when it cannot be opened or read.
    pub fn read_position(
        path: &Path,
        partitions: u32,
    ) -> Result<Option<Vec<u64>>, ProjectionError> {
        let Some(projection) = Self::open_read_only(path)? else {
            return Ok(None);
        };
        let layout = projection
            .db
            .get(LAYOUT_KEY)
            .map_err(projection.storage())?;
        if layout.as_deref() != Some(LAYOUT.to_be_bytes().as_slice()) {
            // Opening it for writing clears it, to be rebuilt from the log.
            return Ok(Some(vec![0; partitions as usize]));
        }
        projection.positions(partitions).map(Some)
    }

    fn storage(&self) -> impl Fn(rocksdb::Error) -> ProjectionError + '_ {
        |source| ProjectionError::Storage {
            path: self.path.clone(),
            source,
        }
    }

    /// Returns the next offset this projection needs in each of `partitions` partitions.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when a position cannot be read.
    pub fn positions(&self, partitions: u32) -> Result<Vec<u64>, ProjectionError> {
        (0..partitions.max(1))
            .map(|partition| self.position(partition))
            .collect()
    }

    /// Returns the next offset this projection needs in `partition`.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when the position cannot be read.
    pub fn position(&self, partition: u32) -> Result<u64, ProjectionError> {
        let stored = self
            .db
            .get(position_key(partition))
            .map_err(self.storage())?;
        match stored {
            None => Ok(0),
            Some(bytes) => {
                let raw: [u8; 8] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| ProjectionError::Corrupt { prefix: '!' })?;
                Ok(u64::from_be_bytes(raw))
            }
        }
    }

    /// Applies consecutive events and the new position in one atomic write. Events before the
    /// stored position were applied already and are skipped, so redelivery is harmless.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Gap`] when the first new event is not at the stored position, and
    /// [`ProjectionError::Storage`] when the write fails (nothing is applied then).
    pub fn apply(&self, events: &[ProjectedEvent<'_>]) -> Result<(), ProjectionError> {
        self.apply_until(0, events, true, None)
    }

    /// Applies events of one partition and moves its position past them, or to `resume` when
    /// that is further, in one atomic write. With `dense`, offsets must follow each other
    /// without holes, as on the embedded log. Without it they need only increase, as on Kafka,
    /// where transaction markers take offsets of their own.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Gap`] when a dense log skips a position, and
    /// [`ProjectionError::Storage`] when the write fails (nothing is applied then).
    pub fn apply_until(
        &self,
        partition: u32,
        events: &[ProjectedEvent<'_>],
        dense: bool,
        resume: Option<u64>,
    ) -> Result<(), ProjectionError> {
        let stored = self.position(partition)?;
        let mut expected = stored;
        let mut batch = rocksdb::WriteBatch::default();
        // Each chart's last sequence number as this batch leaves it.
        let mut chart_ends: HashMap<ChartId, u64> = HashMap::new();
        for event in events {
            if event.position < expected {
                continue;
            }
            if dense && event.position != expected {
                return Err(ProjectionError::Gap {
                    expected,
                    received: event.position,
                });
            }
            let chart_id = event.header.chart_id;
            let last = match chart_ends.get(&chart_id) {
                Some(last) => *last,
                None => self.chart_end(chart_id)?,
            };
            if event.header.seq.0 != last + 1 {
                return Err(ProjectionError::OutOfSequence {
                    partition,
                    offset: event.position,
                    chart_id,
                    expected: last + 1,
                    found: event.header.seq.0,
                });
            }
            chart_ends.insert(chart_id, event.header.seq.0);
            self.stage(&mut batch, partition, event);
            expected = event.position + 1;
        }
        for (chart_id, seq) in chart_ends {
            batch.put(chart_prefix(b's', chart_id), seq.to_be_bytes());
        }
        let next = resume.map_or(expected, |resume| resume.max(expected));
        if next == stored && batch.is_empty() {
            return Ok(());
        }
        batch.put(position_key(partition), next.to_be_bytes());
        self.db.write(batch).map_err(self.storage())
    }

    fn stage(&self, batch: &mut rocksdb::WriteBatch, partition: u32, event: &ProjectedEvent<'_>) {
        let header = event.header;
        let chart_id = header.chart_id;
        let (resource_type, resource_id, version, deleted) = match event.payload {
            EventPayload::ChartOpened(opened) => {
                if opened.kind == ChartKind::Patient {
                    let mut key = vec![b'p'];
                    key.extend_from_slice(opened.patient_id.as_bytes());
                    batch.put(key, chart_id.as_bytes());
                }
                return;
            }
            EventPayload::ChartAccessed(_) => {
                let mut key = chart_prefix(b'a', chart_id);
                key.extend_from_slice(&event.position.to_be_bytes());
                batch.put(key, event.envelope);
                return;
            }
            EventPayload::ResourceRecorded(recorded) => (
                &recorded.resource_type,
                &recorded.resource_id,
                recorded.version,
                false,
            ),
            EventPayload::ResourceRetracted(retracted) => (
                &retracted.resource_type,
                &retracted.resource_id,
                retracted.version,
                true,
            ),
        };

        let record = VersionRecord {
            chart_id,
            resource_type: resource_type.clone(),
            resource_id: resource_id.clone(),
            version,
            deleted,
            seq: header.seq.0,
            partition,
            position: event.position,
            recorded_at: header.recorded_at,
            envelope: event.envelope.to_vec(),
        };
        let encoded = postcard::to_allocvec(&record).expect("version record serializes");
        batch.put(version_key(resource_type, resource_id, version), encoded);
        batch.put(
            resource_key(b'c', resource_type, resource_id),
            version.to_be_bytes(),
        );

        let mut version_ref = Vec::new();
        version_ref.extend_from_slice(resource_type.as_bytes());
        version_ref.push(0);
        version_ref.extend_from_slice(resource_id.as_bytes());
        version_ref.push(0);
        version_ref.extend_from_slice(&version.to_be_bytes());

        let mut chart_history = chart_prefix(b'h', chart_id);
        chart_history.extend_from_slice(&event.position.to_be_bytes());
        batch.put(chart_history, &version_ref);

        let mut type_history = type_prefix(resource_type);
        type_history.extend_from_slice(&timestamp_key(header.recorded_at));
        type_history.extend_from_slice(&partition.to_be_bytes());
        type_history.extend_from_slice(&event.position.to_be_bytes());
        let mut id_ref = resource_id.as_bytes().to_vec();
        id_ref.push(0);
        id_ref.extend_from_slice(&version.to_be_bytes());
        batch.put(type_history, id_ref);

        let mut member = chart_prefix(b'm', chart_id);
        member.extend_from_slice(resource_type.as_bytes());
        member.push(0);
        member.extend_from_slice(resource_id.as_bytes());
        if deleted {
            batch.delete(member);
        } else {
            batch.put(member, []);
        }
    }

    /// Returns the sequence number of a chart's last applied event; 0 for a chart not seen.
    fn chart_end(&self, chart_id: ChartId) -> Result<u64, ProjectionError> {
        let stored = self
            .db
            .get(chart_prefix(b's', chart_id))
            .map_err(self.storage())?;
        stored.map_or(Ok(0), |bytes| {
            let raw: [u8; 8] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| ProjectionError::Corrupt { prefix: 's' })?;
            Ok(u64::from_be_bytes(raw))
        })
    }

    /// Returns one version of a resource.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails or the record is corrupt.
    pub fn version(
        &self,
        resource_type: &str,
        resource_id: &str,
        version: u64,
    ) -> Result<Option<VersionRecord>, ProjectionError> {
        let stored = self
            .db
            .get(version_key(resource_type, resource_id, version))
            .map_err(self.storage())?;
        stored
            .map(|bytes| {
                postcard::from_bytes(&bytes).map_err(|_| ProjectionError::Corrupt { prefix: 'v' })
            })
            .transpose()
    }

    /// Returns the current version number of a resource, deletions included.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn current_version(
        &self,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<u64>, ProjectionError> {
        let stored = self
            .db
            .get(resource_key(b'c', resource_type, resource_id))
            .map_err(self.storage())?;
        stored
            .map(|bytes| {
                let raw: [u8; 8] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| ProjectionError::Corrupt { prefix: 'c' })?;
                Ok(u64::from_be_bytes(raw))
            })
            .transpose()
    }

    /// Returns the latest version of a resource (which may be a deletion).
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn current(
        &self,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Option<VersionRecord>, ProjectionError> {
        match self.current_version(resource_type, resource_id)? {
            None => Ok(None),
            Some(version) => self.version(resource_type, resource_id, version),
        }
    }

    /// Returns every version of a resource, newest first.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn instance_history(
        &self,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Vec<VersionRecord>, ProjectionError> {
        let Some(current) = self.current_version(resource_type, resource_id)? else {
            return Ok(Vec::new());
        };
        let mut versions = Vec::new();
        for version in (1..=current).rev() {
            if let Some(record) = self.version(resource_type, resource_id, version)? {
                versions.push(record);
            }
        }
        Ok(versions)
    }

    fn scan_prefix_reverse(
        &self,
        prefix: &[u8],
        skip: usize,
        limit: usize,
    ) -> Result<(Entries, bool), ProjectionError> {
        let mut upper = prefix.to_vec();
        upper.extend_from_slice(&[0xff; 32]);
        self.scan_reverse_from(prefix, &upper, prefix, skip, limit)
    }

    /// Scans the keys under `prefix` that sort at or before `upper` and at or after `lower`,
    /// newest first.
    fn scan_reverse_from(
        &self,
        prefix: &[u8],
        upper: &[u8],
        lower: &[u8],
        skip: usize,
        limit: usize,
    ) -> Result<(Entries, bool), ProjectionError> {
        let mut iterator = self.db.raw_iterator();
        iterator.seek_for_prev(upper);
        let mut entries = Vec::new();
        let mut skipped = 0;
        let mut more = false;
        while let (Some(key), Some(value)) = (iterator.key(), iterator.value()) {
            if !key.starts_with(prefix) || key < lower {
                break;
            }
            if skipped < skip {
                skipped += 1;
            } else if entries.len() == limit {
                more = true;
                break;
            } else {
                entries.push((key.to_vec(), value.to_vec()));
            }
            iterator.prev();
        }
        iterator.status().map_err(self.storage())?;
        Ok((entries, more))
    }

    /// Returns a page of a chart's history, newest first, and whether more entries follow.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn chart_history(
        &self,
        chart_id: ChartId,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, bool), ProjectionError> {
        let (entries, more) =
            self.scan_prefix_reverse(&chart_prefix(b'h', chart_id), skip, limit)?;
        let mut records = Vec::with_capacity(entries.len());
        for (_, value) in entries {
            let (resource_type, resource_id, version) =
                split_version_ref(&value).ok_or(ProjectionError::Corrupt { prefix: 'h' })?;
            let record = self
                .version(&resource_type, &resource_id, version)?
                .ok_or(ProjectionError::Corrupt { prefix: 'h' })?;
            records.push(record);
        }
        Ok((records, more))
    }

    /// Returns a page of a chart's access events at log positions before `before` as stored
    /// envelopes with their log positions, newest first, and whether more follow. Pages taken
    /// with one `before` stay aligned while new accesses are appended.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn chart_accesses(
        &self,
        chart_id: ChartId,
        before: u64,
        skip: usize,
        limit: usize,
    ) -> Result<(Accesses, bool), ProjectionError> {
        let prefix = chart_prefix(b'a', chart_id);
        let Some(last) = before.checked_sub(1) else {
            return Ok((Vec::new(), false));
        };
        let mut upper = prefix.clone();
        upper.extend_from_slice(&last.to_be_bytes());
        let (entries, more) = self.scan_reverse_from(&prefix, &upper, &prefix, skip, limit)?;
        let mut accesses = Vec::with_capacity(entries.len());
        for (key, envelope) in entries {
            let raw: [u8; 8] = key[prefix.len()..]
                .try_into()
                .map_err(|_| ProjectionError::Corrupt { prefix: 'a' })?;
            accesses.push((u64::from_be_bytes(raw), envelope));
        }
        Ok((accesses, more))
    }

    /// Returns a page of a resource type's history, newest first, and whether more follow.
    /// With `since_micros`, only versions recorded at or after that instant count.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn type_history(
        &self,
        resource_type: &str,
        since_micros: Option<i64>,
        skip: usize,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, bool), ProjectionError> {
        let prefix = type_prefix(resource_type);
        let mut upper = prefix.clone();
        upper.extend_from_slice(&[0xff; 32]);
        let mut lower = prefix.clone();
        if let Some(since) = since_micros {
            lower.extend_from_slice(&timestamp_key(HlcTimestamp {
                wall_micros: since,
                logical: 0,
            }));
        }
        let (entries, more) = self.scan_reverse_from(&prefix, &upper, &lower, skip, limit)?;
        let mut records = Vec::with_capacity(entries.len());
        for (_, value) in entries {
            let split = value.iter().position(|byte| *byte == 0);
            let parsed = split.and_then(|at| {
                let id = std::str::from_utf8(&value[..at]).ok()?;
                let version = u64::from_be_bytes(value[at + 1..].try_into().ok()?);
                Some((id.to_owned(), version))
            });
            let (resource_id, version) = parsed.ok_or(ProjectionError::Corrupt { prefix: 't' })?;
            let record = self
                .version(resource_type, &resource_id, version)?
                .ok_or(ProjectionError::Corrupt { prefix: 't' })?;
            records.push(record);
        }
        Ok((records, more))
    }

    /// Returns the type and id of every resource of a chart that is not deleted, optionally of
    /// one type only, in key order.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn chart_members(
        &self,
        chart_id: ChartId,
        resource_type: Option<&str>,
    ) -> Result<Vec<(String, String)>, ProjectionError> {
        let mut prefix = chart_prefix(b'm', chart_id);
        if let Some(resource_type) = resource_type {
            prefix.extend_from_slice(resource_type.as_bytes());
            prefix.push(0);
        }
        let mut members = Vec::new();
        let mut iterator = self.db.raw_iterator();
        iterator.seek(&prefix);
        while let Some(key) = iterator.key() {
            if !key.starts_with(&prefix) {
                break;
            }
            let rest = &key[17..];
            let at = rest.iter().position(|byte| *byte == 0);
            let parsed = at.and_then(|at| {
                let resource_type = std::str::from_utf8(&rest[..at]).ok()?;
                let resource_id = std::str::from_utf8(&rest[at + 1..]).ok()?;
                Some((resource_type.to_owned(), resource_id.to_owned()))
            });
            members.push(parsed.ok_or(ProjectionError::Corrupt { prefix: 'm' })?);
            iterator.next();
        }
        iterator.status().map_err(self.storage())?;
        Ok(members)
    }

    /// Returns the current record of every resource of a type that is not deleted.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn current_of_type(
        &self,
        resource_type: &str,
    ) -> Result<Vec<VersionRecord>, ProjectionError> {
        let prefix = resource_key(b'c', resource_type, "");
        let mut records = Vec::new();
        let mut iterator = self.db.raw_iterator();
        iterator.seek(&prefix);
        while let (Some(key), Some(value)) = (iterator.key(), iterator.value()) {
            if !key.starts_with(&prefix) {
                break;
            }
            let resource_id = std::str::from_utf8(&key[prefix.len()..])
                .map_err(|_| ProjectionError::Corrupt { prefix: 'c' })?;
            let raw: [u8; 8] = value
                .try_into()
                .map_err(|_| ProjectionError::Corrupt { prefix: 'c' })?;
            let record = self
                .version(resource_type, resource_id, u64::from_be_bytes(raw))?
                .ok_or(ProjectionError::Corrupt { prefix: 'c' })?;
            if !record.deleted {
                records.push(record);
            }
            iterator.next();
        }
        iterator.status().map_err(self.storage())?;
        Ok(records)
    }

    /// Returns the chart of the patient with the given Patient resource id.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn patient_chart(&self, patient_id: &str) -> Result<Option<ChartId>, ProjectionError> {
        let mut key = vec![b'p'];
        key.extend_from_slice(patient_id.as_bytes());
        let stored = self.db.get(key).map_err(self.storage())?;
        stored
            .map(|bytes| {
                let raw: [u8; 16] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| ProjectionError::Corrupt { prefix: 'p' })?;
                Ok(ChartId::from_bytes(raw))
            })
            .transpose()
    }

    /// Returns every key and value in key order: the projection's entire state, for comparing
    /// a rebuilt projection with the original.
    ///
    /// # Errors
    ///
    /// [`ProjectionError`] when storage fails.
    pub fn dump(&self) -> Result<Entries, ProjectionError> {
        let mut entries = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(self.storage())?;
            entries.push((key.to_vec(), value.to_vec()));
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use chartlog_schemas::{
        ChartOpened, EventHeader, EventId, EventSeq, EventType, KeyId, ResourceRecorded,
        ResourceRetracted, SignerId,
    };

    use super::*;

    fn header(chart_id: ChartId, seq: u64, event_type: EventType) -> EventHeader {
        EventHeader {
            event_id: EventId::random(),
            chart_id,
            seq: EventSeq(seq),
            event_type,
            schema_version: 1,
            recorded_at: HlcTimestamp {
                wall_micros: seq as i64,
                logical: 0,
            },
            actor: "tester".into(),
            purpose_of_use: "TREAT".into(),
            key_id: KeyId::random(),
            signer: SignerId([0; 8]),
            prev_digest: [0; 32],
            command_id: None,
        }
    }

    fn recorded(resource_type: &str, id: &str, version: u64) -> EventPayload {
        EventPayload::ResourceRecorded(ResourceRecorded {
            resource_type: resource_type.into(),
            resource_id: id.into(),
            version,
            resource_json: "{}".into(),
            command_fingerprint: None,
        })
    }

    /// Given a chart with a patient, an observation in two versions and its deletion.
    fn sample_events(chart: ChartId) -> Vec<(EventHeader, EventPayload)> {
        vec![
            (
                header(chart, 1, EventType::ChartOpened),
                EventPayload::ChartOpened(ChartOpened {
                    kind: ChartKind::Patient,
                    patient_id: "pat-1".into(),
                }),
            ),
            (
                header(chart, 2, EventType::ResourceRecorded),
                recorded("Patient", "pat-1", 1),
            ),
            (
                header(chart, 3, EventType::ResourceRecorded),
                recorded("Observation", "obs-1", 1),
            ),
            (
                header(chart, 4, EventType::ResourceRecorded),
                recorded("Observation", "obs-1", 2),
            ),
            (
                header(chart, 5, EventType::ResourceRetracted),
                EventPayload::ResourceRetracted(ResourceRetracted {
                    resource_type: "Observation".into(),
                    resource_id: "obs-1".into(),
                    version: 3,
                    command_fingerprint: None,
                }),
            ),
        ]
    }

    fn apply_all(projection: &ChartProjection, events: &[(EventHeader, EventPayload)], from: u64) {
        let projected: Vec<ProjectedEvent<'_>> = events
            .iter()
            .enumerate()
            .map(|(index, (header, payload))| ProjectedEvent {
                position: from + index as u64,
                header,
                payload,
                envelope: b"sealed",
            })
            .collect();
        projection.apply(&projected).unwrap();
    }

    #[test]
    fn delete_keeps_history_and_clears_membership() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        let chart = ChartId::random();
        apply_all(&projection, &sample_events(chart), 0);

        let current = projection.current("Observation", "obs-1").unwrap().unwrap();
        assert!(current.deleted, "latest version of obs-1 is the deletion");
        let history = projection.instance_history("Observation", "obs-1").unwrap();
        let versions: Vec<u64> = history.iter().map(|record| record.version).collect();
        assert_eq!(versions, vec![3, 2, 1]);
        let members = projection.chart_members(chart, None).unwrap();
        assert_eq!(members, vec![("Patient".to_owned(), "pat-1".to_owned())]);
        assert_eq!(projection.patient_chart("pat-1").unwrap(), Some(chart));
        assert_eq!(projection.position(0).unwrap(), 5);
    }

    #[test]
    fn redelivered_events_apply_once() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        let chart = ChartId::random();
        let events = sample_events(chart);
        apply_all(&projection, &events[..3], 0);
        let before = projection.dump().unwrap();
        apply_all(&projection, &events[..3], 0);
        assert_eq!(
            projection.dump().unwrap(),
            before,
            "redelivery changed the state"
        );
        apply_all(&projection, &events, 0);
        assert_eq!(projection.position(0).unwrap(), 5);
    }

    #[test]
    fn gap_in_positions_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        let events = sample_events(ChartId::random());
        let error = {
            let projected = [ProjectedEvent {
                position: 2,
                header: &events[0].0,
                payload: &events[0].1,
                envelope: b"",
            }];
            projection.apply(&projected).unwrap_err()
        };
        assert!(
            matches!(
                error,
                ProjectionError::Gap {
                    expected: 0,
                    received: 2
                }
            ),
            "{error}"
        );
        assert_eq!(
            projection.position(0).unwrap(),
            0,
            "a rejected batch must not move the position"
        );
    }

    #[test]
    fn rebuild_in_pieces_matches_single_pass() {
        let chart = ChartId::random();
        let events = sample_events(chart);
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let whole = ChartProjection::open(one.path()).unwrap();
        apply_all(&whole, &events, 0);
        let pieces = ChartProjection::open(two.path()).unwrap();
        apply_all(&pieces, &events[..2], 0);
        drop(pieces);
        let reopened = ChartProjection::open(two.path()).unwrap();
        apply_all(&reopened, &events[2..], 2);
        assert_eq!(whole.dump().unwrap(), reopened.dump().unwrap());
    }

    #[test]
    fn partitions_keep_their_own_positions() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        let (first, second) = (ChartId::random(), ChartId::random());
        let early = sample_events(first);
        // The second chart's events were recorded after the first chart's, in another
        // partition, at lower offsets.
        let mut late = sample_events(second);
        for (header, payload) in &mut late {
            header.recorded_at.wall_micros += 100;
            match payload {
                EventPayload::ResourceRecorded(recorded) => recorded.resource_id.push_str("-b"),
                EventPayload::ResourceRetracted(retracted) => retracted.resource_id.push_str("-b"),
                EventPayload::ChartOpened(opened) => opened.patient_id.push_str("-b"),
                EventPayload::ChartAccessed(_) => {}
            }
        }
        fn project(events: &[(EventHeader, EventPayload)]) -> Vec<ProjectedEvent<'_>> {
            events
                .iter()
                .enumerate()
                .map(|(index, (header, payload))| ProjectedEvent {
                    position: index as u64 * 2,
                    header,
                    payload,
                    envelope: b"sealed",
                })
                .collect()
        }
        projection
            .apply_until(1, &project(&late), false, None)
            .unwrap();
        projection
            .apply_until(0, &project(&early), false, None)
            .unwrap();
        assert_eq!(projection.positions(2).unwrap(), vec![9, 9]);
        let (types, _) = projection.type_history("Observation", None, 0, 10).unwrap();
        let charts: Vec<ChartId> = types.iter().map(|record| record.chart_id).collect();
        assert_eq!(
            charts,
            vec![second, second, second, first, first, first],
            "the type history must be newest first across partitions"
        );
        assert_eq!(types[0].partition, 1);
    }

    #[test]
    fn earlier_layout_is_cleared_for_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        {
            let projection = ChartProjection::open(dir.path()).unwrap();
            apply_all(&projection, &sample_events(ChartId::random()), 0);
            // What a projection of the earlier layout looks like: no layout key.
            projection.db.delete(LAYOUT_KEY).unwrap();
        }
        let reopened = ChartProjection::open(dir.path()).unwrap();
        assert_eq!(reopened.position(0).unwrap(), 0);
        assert!(reopened.current("Observation", "obs-1").unwrap().is_none());
        let layout = reopened.db.get(LAYOUT_KEY).unwrap();
        assert_eq!(layout.as_deref(), Some(LAYOUT.to_be_bytes().as_slice()));
        drop(reopened);
        // A projection of this layout is kept as it is.
        let kept = ChartProjection::open(dir.path()).unwrap();
        apply_all(&kept, &sample_events(ChartId::random()), 0);
        drop(kept);
        assert_eq!(
            ChartProjection::open(dir.path())
                .unwrap()
                .position(0)
                .unwrap(),
            5
        );
    }

    #[test]
    fn replayed_event_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        let chart = ChartId::random();
        let events = sample_events(chart);
        apply_all(&projection, &events[..3], 0);
        let before = projection.dump().unwrap();
        // The chart's second event once more, at the next offset: a record copied on the log.
        let replayed = [ProjectedEvent {
            position: 3,
            header: &events[1].0,
            payload: &events[1].1,
            envelope: b"sealed",
        }];
        let error = projection.apply(&replayed).unwrap_err();
        assert!(
            matches!(
                error,
                ProjectionError::OutOfSequence {
                    expected: 4,
                    found: 2,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            projection.dump().unwrap(),
            before,
            "the replayed event was applied"
        );
    }

    #[test]
    fn projection_of_another_log_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        assert!(!projection.bind_log("kafka chartlog.events 3").unwrap());
        apply_all(&projection, &sample_events(ChartId::random()), 0);
        assert!(!projection.bind_log("kafka chartlog.events 3").unwrap());
        assert_eq!(
            projection.position(0).unwrap(),
            5,
            "the same log keeps its projection"
        );
        assert!(projection.bind_log("embedded").unwrap());
        assert_eq!(projection.position(0).unwrap(), 0);
        assert!(projection
            .current("Observation", "obs-1")
            .unwrap()
            .is_none());
    }

    #[test]
    fn bound_log_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ChartProjection::read_bound_log(dir.path()).unwrap(), None);
        let projection = ChartProjection::open(dir.path()).unwrap();
        projection.bind_log("kafka chartlog.events 3").unwrap();
        assert_eq!(
            ChartProjection::read_bound_log(dir.path())
                .unwrap()
                .as_deref(),
            Some("kafka chartlog.events 3")
        );
    }

    #[test]
    fn histories_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        let chart = ChartId::random();
        apply_all(&projection, &sample_events(chart), 0);
        let (page, more) = projection.chart_history(chart, 0, 2).unwrap();
        let versions: Vec<u64> = page.iter().map(|record| record.version).collect();
        assert_eq!(versions, vec![3, 2]);
        assert!(more, "a third history entry exists");
        let (rest, more) = projection.chart_history(chart, 2, 10).unwrap();
        assert_eq!(rest.len(), 2, "obs-1 version 1 and the patient");
        assert!(!more);
        let (types, _) = projection.type_history("Observation", None, 0, 10).unwrap();
        assert_eq!(types.len(), 3);
    }

    #[test]
    fn type_history_since_an_instant() {
        let dir = tempfile::tempdir().unwrap();
        let projection = ChartProjection::open(dir.path()).unwrap();
        apply_all(&projection, &sample_events(ChartId::random()), 0);
        // The sample's Observation versions are recorded at 3, 4 and 5 microseconds.
        let versions = |since: i64, skip: usize| {
            let (page, more) = projection
                .type_history("Observation", Some(since), skip, 10)
                .unwrap();
            (
                page.iter().map(|record| record.version).collect::<Vec<_>>(),
                more,
            )
        };
        assert_eq!(versions(4, 0), (vec![3, 2], false));
        assert_eq!(versions(4, 1), (vec![2], false));
        assert_eq!(versions(3, 0), (vec![3, 2, 1], false));
        assert_eq!(versions(6, 0), (vec![], false));
    }
}
