//! The key store: the key-encryption key file, the node's signing key and the wrapped data
//! key of every chart.
//!
//! Invariant: a chart's data key is durable in the store, wrapped by the key-encryption key,
//! before any event encrypted with it reaches the log. Unwrapped data keys live only in memory.
//! Key files are created owner-only (mode 0600) and refused when others can read them.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use chartlog_schemas::{ChartId, KeyId, SignerId};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::{decrypt, encrypt, CryptoError, NodeSigner, SymmetricKey, TrustedSigners};

/// Error from the key store. Messages name files and ids, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// A key file could not be read or written.
    #[error("key file {path}: {action} failed")]
    Io {
        /// Path of the file.
        path: PathBuf,
        /// The attempted action.
        action: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The directory of a key-encryption key file named outside the data directory is missing.
    #[error("the directory of key file {0} does not exist; create it, or correct the path given with --key-file")]
    NoKeyDirectory(PathBuf),
    /// A key file that this data directory was initialized with is gone.
    #[error("key file {0} is missing; this data directory was initialized with it, so restore it from the key backup or point --key-file at it")]
    Missing(PathBuf),
    /// A key file has the wrong length or encoding.
    #[error("key file {0} is invalid: expected 64 hexadecimal characters")]
    InvalidKeyFile(PathBuf),
    /// A key file can be read by users other than its owner.
    #[error(
        "key file {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
    )]
    Permissions {
        /// Path of the file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The data key database failed.
    #[error("data key store at {path}")]
    Database {
        /// Directory of the database.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rocksdb::Error,
    },
    /// A data key record is missing.
    #[error("no data key {0} in the key store")]
    MissingDataKey(KeyId),
    /// A data key record does not unwrap under the key-encryption key.
    #[error("data key {0} does not unwrap with the configured key-encryption key")]
    Unwrap(KeyId, #[source] CryptoError),
    /// A stored record does not decode.
    #[error("data key record {0} is corrupt")]
    Corrupt(KeyId),
    /// A data key shared by another node is wrapped by a different key-encryption key.
    #[error("data key {0} is wrapped by another key-encryption key; every node on one log must use the same key-encryption key")]
    ForeignKek(KeyId),
    /// A store opened for reading was asked to store a key.
    #[error("the key store is open for reading only")]
    ReadOnly,
    /// The node's signing key is missing from the trusted signers file it would share.
    #[error("this node's signing key is not in {0}, so other nodes and verify would reject its events; copy node-signing.key from the node whose key the file lists, or add this node's public key to the file on every node")]
    SignerNotTrusted(PathBuf),
    /// The trusted signers file of a node whose signing key exists is gone.
    #[error("{0} is missing although this node's signing key exists; restore it from a backup or from another node on the same log")]
    TrustedSignersMissing(PathBuf),
    /// A reader has neither the node's signing key nor a list of signers to trust.
    #[error("no trusted signers: {0} is missing and so is the node's signing key")]
    NoTrustedSigners(PathBuf),
    /// A data key is neither in the store nor, so far, in the source of shared keys.
    #[error("data key {0} is neither in the key store nor yet in the shared keys")]
    NotShared(KeyId),
    /// The source of shared data keys could not be read; a later attempt may succeed.
    #[error("shared data keys could not be read: {0}")]
    Source(String),
}

impl KeyStoreError {
    /// Returns whether a later attempt may succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        matches!(self, KeyStoreError::Source(_) | KeyStoreError::NotShared(_))
    }
}

/// A source of the data keys of charts created by other nodes, such as the key topic next to
/// the Kafka log.
pub trait KeySource: Send + Sync {
    /// Imports into `store` every data key the source has and the store lacks.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Source`] when the source cannot be read, or the error of an import.
    fn catch_up(&self, store: &KeyStore) -> Result<(), KeyStoreError>;
}

/// A wrapped data key as stored.
#[derive(Serialize, Deserialize)]
struct WrappedKey {
    chart_id: ChartId,
    kek_fingerprint: [u8; 8],
    wrapped: Vec<u8>,
}

/// File locations of a key store.
#[derive(Clone, Debug)]
pub struct KeyPaths {
    /// The key-encryption key file.
    pub kek_file: PathBuf,
    /// Directory of the node signing key, trusted signers and the data key database.
    pub dir: PathBuf,
}

impl KeyPaths {
    /// Returns the default layout under a data directory: `DATA/keys/`.
    pub fn under(data_dir: &Path, kek_file: Option<PathBuf>) -> KeyPaths {
        let dir = data_dir.join("keys");
        KeyPaths {
            kek_file: kek_file.unwrap_or_else(|| dir.join("kek.key")),
            dir,
        }
    }

    /// Returns the path of the node's signing key.
    pub fn signing_key(&self) -> PathBuf {
        self.dir.join("node-signing.key")
    }

    fn trusted_signers(&self) -> PathBuf {
        self.dir.join("trusted-signers")
    }

    fn data_keys(&self) -> PathBuf {
        self.dir.join("data-keys")
    }

    /// Returns whether the key store was created already: then missing key files are an
    /// error, never a reason to make new ones. An empty database directory, as an interrupted
    /// first start leaves, does not count.
    pub fn is_initialized(&self) -> bool {
        fs::read_dir(self.data_keys()).is_ok_and(|mut entries| entries.next().is_some())
    }
}

/// The key store of one node. Cheap to share behind an `Arc`.
pub struct KeyStore {
    kek: SymmetricKey,
    kek_fingerprint: [u8; 8],
    signer: NodeSigner,
    trusted: TrustedSigners,
    /// Database of wrapped data keys. It is `None` only for a read-only open of a data
    /// directory whose key database was never created, as a verifier of a Kafka log has.
    db: Option<rocksdb::DB>,
    db_path: PathBuf,
    cache: RwLock<HashMap<KeyId, Arc<SymmetricKey>>>,
    chart_keys: RwLock<HashMap<ChartId, KeyId>>,
    source: OnceLock<Arc<dyn KeySource>>,
    /// Records imported while the database is open read-only, kept in memory only.
    imported: Option<RwLock<HashMap<KeyId, Vec<u8>>>>,
    /// Envelopes this node sealed and has not yet projected.
    recently_sealed: super::RecentlySealed,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyStore(signer {})", self.signer.id())
    }
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> KeyStoreError {
    let path = path.to_path_buf();
    move |source| KeyStoreError::Io {
        path,
        action,
        source,
    }
}

/// Reads a 32-byte key stored as hex, checking that only the owner can read the file.
fn read_key_file(path: &Path) -> Result<[u8; 32], KeyStoreError> {
    let metadata = fs::metadata(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => KeyStoreError::Missing(path.to_path_buf()),
        _ => io_error(path, "reading metadata")(error),
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyStoreError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = fs::read_to_string(path).map_err(io_error(path, "reading"))?;
    let mut bytes = [0u8; 32];
    let decoded = hex::decode_to_slice(text.trim(), &mut bytes);
    text.zeroize();
    decoded.map_err(|_| KeyStoreError::InvalidKeyFile(path.to_path_buf()))?;
    Ok(bytes)
}

/// Creates a key file with fresh random bytes, owner-only, failing if it already exists.
fn create_key_file(path: &Path) -> Result<[u8; 32], KeyStoreError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error(parent, "creating directory"))?;
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut text = hex::encode(bytes);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path, "creating"))?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all());
    text.zeroize();
    written.map_err(io_error(path, "writing"))?;
    Ok(bytes)
}

/// Loads a key file, or creates it when `create` is set and the file does not exist.
pub(crate) fn load_or_create(path: &Path, create: bool) -> Result<([u8; 32], bool), KeyStoreError> {
    if !path.exists() && create {
        return create_key_file(path).map(|bytes| (bytes, true));
    }
    read_key_file(path).map(|bytes| (bytes, false))
}

impl KeyStore {
    /// Opens the key store, creating the key files and database on first start when `create`
    /// is set. Returns the store and the list of files it created.
    ///
    /// # Errors
    ///
    /// Any [`KeyStoreError`]: unreadable or too widely readable key files, invalid contents,
    /// or a database that cannot be opened (for example because another server holds it).
    pub fn open(paths: &KeyPaths, create: bool) -> Result<(KeyStore, Vec<PathBuf>), KeyStoreError> {
        let mut created = Vec::new();
        // A key-encryption key named outside the data directory is shared or managed there:
        // a mistyped path must not get a new key in a new directory.
        if let Some(parent) = paths
            .kek_file
            .parent()
            .filter(|parent| *parent != paths.dir)
        {
            if !paths.kek_file.exists() && !parent.is_dir() {
                return Err(KeyStoreError::NoKeyDirectory(paths.kek_file.clone()));
            }
        }
        let (kek_bytes, kek_new) = load_or_create(&paths.kek_file, create)?;
        if kek_new {
            created.push(paths.kek_file.clone());
        }
        let (seed, seed_new) = load_or_create(&paths.signing_key(), create)?;
        let seed = Some(seed);
        if seed_new {
            created.push(paths.signing_key());
        }
        let db_path = paths.data_keys();
        let mut options = rocksdb::Options::default();
        options.create_if_missing(create);
        let db =
            rocksdb::DB::open(&options, &db_path).map_err(|source| KeyStoreError::Database {
                path: db_path.clone(),
                source,
            })?;
        let store = Self::assemble(paths, kek_bytes, seed, Some(db), db_path, None, seed_new)?;
        Ok((store, created))
    }

    /// Opens the key store of a data directory for offline reading (verification and replay)
    /// while a server may be running on it. Creates and writes nothing: a missing key database
    /// reads as empty. The store trusts the `pinned` signers when given; otherwise those of the
    /// trusted signers file, and the node's own key when its signing key is there.
    ///
    /// # Errors
    ///
    /// As [`KeyStore::open`], and [`KeyStoreError::NoTrustedSigners`] when nothing names a
    /// signer to trust.
    pub fn open_read_only(
        paths: &KeyPaths,
        pinned: Option<TrustedSigners>,
    ) -> Result<KeyStore, KeyStoreError> {
        let kek_bytes = read_key_file(&paths.kek_file)?;
        let seed = match read_key_file(&paths.signing_key()) {
            Ok(seed) => Some(seed),
            Err(KeyStoreError::Missing(_)) => None,
            Err(error) => return Err(error),
        };
        let db_path = paths.data_keys();
        // RocksDB creates the directory of a database it fails to open, even read-only, so
        // check for the database before opening it.
        let db = if db_path.join("CURRENT").exists() {
            Some(
                rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), &db_path, false)
                    .map_err(|source| KeyStoreError::Database {
                        path: db_path.clone(),
                        source,
                    })?,
            )
        } else {
            None
        };
        Self::assemble(paths, kek_bytes, seed, db, db_path, Some(pinned), false)
    }

    /// Builds the store from the raw key bytes, which it zeroizes, and the open database.
    /// `reader` is set for a read-only store, with the pinned signers to trust, if any;
    /// `new_signer` when the signing key was created by this open.
    fn assemble(
        paths: &KeyPaths,
        mut kek_bytes: [u8; 32],
        seed: Option<[u8; 32]>,
        db: Option<rocksdb::DB>,
        db_path: PathBuf,
        reader: Option<Option<TrustedSigners>>,
        new_signer: bool,
    ) -> Result<KeyStore, KeyStoreError> {
        let read_only = reader.is_some();
        let kek = SymmetricKey::from_bytes(kek_bytes);
        let digest = blake3::hash(&kek_bytes);
        kek_bytes.zeroize();
        let mut kek_fingerprint = [0u8; 8];
        kek_fingerprint.copy_from_slice(&digest.as_bytes()[..8]);
        let own_key = seed.is_some();
        let mut seed = seed.unwrap_or_else(|| {
            // A reader without the node's signing key never signs; a throwaway key fills the
            // place and is not trusted.
            let mut random = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut random);
            random
        });
        let signer = NodeSigner::from_seed(&seed);
        seed.zeroize();
        let trusted = match reader.flatten() {
            Some(pinned) => pinned,
            None => Self::load_trusted(paths, own_key.then_some(&signer), read_only, new_signer)?,
        };
        let store = KeyStore {
            kek,
            kek_fingerprint,
            signer,
            trusted,
            db,
            db_path,
            cache: RwLock::new(HashMap::new()),
            chart_keys: RwLock::new(HashMap::new()),
            source: OnceLock::new(),
            imported: read_only.then(|| RwLock::new(HashMap::new())),
            recently_sealed: super::RecentlySealed::default(),
        };
        store.load_chart_index()?;
        Ok(store)
    }

    /// Loads the trusted signer list, writing it with this node's public key when both are
    /// new. A read-only open writes nothing and, without the signing key, needs the file.
    fn load_trusted(
        paths: &KeyPaths,
        signer: Option<&NodeSigner>,
        read_only: bool,
        new_signer: bool,
    ) -> Result<TrustedSigners, KeyStoreError> {
        let path = paths.trusted_signers();
        let mut trusted = TrustedSigners::default();
        if let Some(signer) = signer {
            trusted.add(&signer.public_key());
        }
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mut listed = TrustedSigners::default();
                for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
                    let mut key = [0u8; 32];
                    hex::decode_to_slice(line, &mut key)
                        .map_err(|_| KeyStoreError::InvalidKeyFile(path.clone()))?;
                    listed
                        .add(&key)
                        .ok_or_else(|| KeyStoreError::InvalidKeyFile(path.clone()))?;
                    trusted.add(&key);
                }
                // A node that signs with a key the list leaves out writes events that every
                // other reader of the log rejects.
                if let Some(signer) = signer.filter(|_| !read_only) {
                    if !listed.contains(&signer.public_key()) {
                        return Err(KeyStoreError::SignerNotTrusted(path));
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => match signer {
                Some(signer) if !read_only && new_signer => {
                    let line = format!("{}\n", hex::encode(signer.public_key()));
                    fs::write(&path, line).map_err(io_error(&path, "writing"))?;
                }
                // The list may have named other nodes' keys too; written again with this
                // node's key alone, it would reject their events without a word.
                Some(_) if !read_only => return Err(KeyStoreError::TrustedSignersMissing(path)),
                Some(_) => {}
                None => return Err(KeyStoreError::NoTrustedSigners(path)),
            },
            Err(error) => return Err(io_error(&path, "reading")(error)),
        }
        Ok(trusted)
    }

    fn load_chart_index(&self) -> Result<(), KeyStoreError> {
        let mut index = HashMap::new();
        let Some(db) = &self.db else {
            return Ok(());
        };
        for item in db.iterator(rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|source| KeyStoreError::Database {
                path: self.db_path.clone(),
                source,
            })?;
            let key_id = KeyId::from_bytes(key.as_ref().try_into().unwrap_or([0u8; 16]));
            let record: WrappedKey =
                postcard::from_bytes(&value).map_err(|_| KeyStoreError::Corrupt(key_id))?;
            index.insert(record.chart_id, key_id);
        }
        *self
            .chart_keys
            .write()
            .expect("chart key index lock is not poisoned") = index;
        Ok(())
    }

    /// Returns the envelopes this node sealed and has not yet projected.
    pub fn recently_sealed(&self) -> &super::RecentlySealed {
        &self.recently_sealed
    }

    /// Returns the node's signing key.
    pub fn signer(&self) -> &NodeSigner {
        &self.signer
    }

    /// Returns the public keys whose signatures this node accepts.
    pub fn trusted_signers(&self) -> &TrustedSigners {
        &self.trusted
    }

    /// Returns the id of the node's signing key.
    pub fn signer_id(&self) -> SignerId {
        self.signer.id()
    }

    /// Returns the data key id of a chart, when the chart has one.
    pub fn chart_key_id(&self, chart_id: ChartId) -> Option<KeyId> {
        self.chart_keys
            .read()
            .expect("chart key index lock is not poisoned")
            .get(&chart_id)
            .copied()
    }

    /// Creates a data key for a new chart, durably stores it wrapped, and returns its id.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Database`] when the wrapped key cannot be written and synced.
    pub fn create_data_key(&self, chart_id: ChartId) -> Result<KeyId, KeyStoreError> {
        let key_id = KeyId::random();
        let data_key = SymmetricKey::generate();
        let wrapped = encrypt(&self.kek, &data_key.0, key_id.as_bytes());
        let record = WrappedKey {
            chart_id,
            kek_fingerprint: self.kek_fingerprint,
            wrapped,
        };
        let bytes = postcard::to_allocvec(&record).expect("wrapped key record serializes");
        self.put_synced(key_id, &bytes)?;
        self.cache
            .write()
            .expect("data key cache lock is not poisoned")
            .insert(key_id, Arc::new(data_key));
        self.chart_keys
            .write()
            .expect("chart key index lock is not poisoned")
            .insert(chart_id, key_id);
        Ok(key_id)
    }

    /// Writes a wrapped key record and syncs it to disk.
    fn put_synced(&self, key_id: KeyId, bytes: &[u8]) -> Result<(), KeyStoreError> {
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        let Some(db) = self.db.as_ref().filter(|_| self.imported.is_none()) else {
            return Err(KeyStoreError::ReadOnly);
        };
        db.put_opt(key_id.as_bytes(), bytes, &options)
            .map_err(|source| KeyStoreError::Database {
                path: self.db_path.clone(),
                source,
            })
    }

    /// Sets the source asked for data keys missing from this store. The first source set stays.
    pub fn set_source(&self, source: Arc<dyn KeySource>) {
        let _ = self.source.set(source);
    }

    /// Returns the stored record of a data key, wrapped by the key-encryption key, as it is
    /// shared with other nodes.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Database`] when the store cannot be read.
    pub fn wrapped_record(&self, key_id: KeyId) -> Result<Option<Vec<u8>>, KeyStoreError> {
        if let Some(imported) = &self.imported {
            let imported = imported.read().expect("imported key lock is not poisoned");
            if let Some(bytes) = imported.get(&key_id) {
                return Ok(Some(bytes.clone()));
            }
        }
        let Some(db) = &self.db else {
            return Ok(None);
        };
        db.get(key_id.as_bytes())
            .map_err(|source| KeyStoreError::Database {
                path: self.db_path.clone(),
                source,
            })
    }

    /// Returns the ids of every data key in the store.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Database`] when the store cannot be read.
    pub fn key_ids(&self) -> Result<Vec<KeyId>, KeyStoreError> {
        let mut ids = Vec::new();
        let Some(db) = &self.db else {
            return Ok(ids);
        };
        for item in db.iterator(rocksdb::IteratorMode::Start) {
            let (key, _) = item.map_err(|source| KeyStoreError::Database {
                path: self.db_path.clone(),
                source,
            })?;
            if let Ok(bytes) = key.as_ref().try_into() {
                ids.push(KeyId::from_bytes(bytes));
            }
        }
        Ok(ids)
    }

    /// Stores a data key record that another node created, after checking that it unwraps
    /// under this store's key-encryption key. Returns whether the key was new.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Corrupt`] for a record that does not decode,
    /// [`KeyStoreError::ForeignKek`] or [`KeyStoreError::Unwrap`] for one wrapped by another
    /// key-encryption key, [`KeyStoreError::Database`] when it cannot be stored.
    pub fn import_wrapped(&self, key_id: KeyId, bytes: &[u8]) -> Result<bool, KeyStoreError> {
        if self.wrapped_record(key_id)?.is_some() {
            return Ok(false);
        }
        let record: WrappedKey =
            postcard::from_bytes(bytes).map_err(|_| KeyStoreError::Corrupt(key_id))?;
        if record.kek_fingerprint != self.kek_fingerprint {
            return Err(KeyStoreError::ForeignKek(key_id));
        }
        let mut raw = decrypt(&self.kek, &record.wrapped, key_id.as_bytes())
            .map_err(|error| KeyStoreError::Unwrap(key_id, error))?;
        raw.zeroize();
        match &self.imported {
            Some(imported) => {
                imported
                    .write()
                    .expect("imported key lock is not poisoned")
                    .insert(key_id, bytes.to_vec());
            }
            None => self.put_synced(key_id, bytes)?,
        }
        self.chart_keys
            .write()
            .expect("chart key index lock is not poisoned")
            .insert(record.chart_id, key_id);
        Ok(true)
    }

    /// Returns the unwrapped data key with the given id.
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::MissingDataKey`] when no such key exists (for example after the chart
    /// was crypto-shredded), [`KeyStoreError::Unwrap`] when the key-encryption key is wrong.
    pub fn data_key(&self, key_id: KeyId) -> Result<Arc<SymmetricKey>, KeyStoreError> {
        if let Some(key) = self
            .cache
            .read()
            .expect("data key cache lock is not poisoned")
            .get(&key_id)
        {
            return Ok(key.clone());
        }
        let bytes = match self.wrapped_record(key_id)? {
            Some(bytes) => bytes,
            None => {
                // A chart created by another node: its key may be waiting at the source.
                let source = self
                    .source
                    .get()
                    .ok_or(KeyStoreError::MissingDataKey(key_id))?;
                source.catch_up(self)?;
                // The source may lack it for now: a key topic that was lost and created again
                // is filled anew by the next owner's take-over.
                self.wrapped_record(key_id)?
                    .ok_or(KeyStoreError::NotShared(key_id))?
            }
        };
        let record: WrappedKey =
            postcard::from_bytes(&bytes).map_err(|_| KeyStoreError::Corrupt(key_id))?;
        let mut raw = decrypt(&self.kek, &record.wrapped, key_id.as_bytes())
            .map_err(|error| KeyStoreError::Unwrap(key_id, error))?;
        let mut key_bytes = [0u8; 32];
        if raw.len() != 32 {
            raw.zeroize();
            return Err(KeyStoreError::Corrupt(key_id));
        }
        key_bytes.copy_from_slice(&raw);
        raw.zeroize();
        let key = Arc::new(SymmetricKey::from_bytes(key_bytes));
        key_bytes.zeroize();
        self.cache
            .write()
            .expect("data key cache lock is not poisoned")
            .insert(key_id, key.clone());
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_open_creates_owner_only_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        let (_store, created) = KeyStore::open(&paths, true).unwrap();
        assert_eq!(
            created.len(),
            2,
            "kek and signing key are created: {created:?}"
        );
        for path in created {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
        }
    }

    #[test]
    fn data_key_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        let chart = ChartId::random();
        let plaintext = b"chart payload";
        let (key_id, sealed) = {
            let (store, _) = KeyStore::open(&paths, true).unwrap();
            let key_id = store.create_data_key(chart).unwrap();
            let sealed = encrypt(&store.data_key(key_id).unwrap(), plaintext, b"");
            (key_id, sealed)
        };
        let (store, created) = KeyStore::open(&paths, true).unwrap();
        assert!(
            created.is_empty(),
            "reopen must not create keys: {created:?}"
        );
        assert_eq!(store.chart_key_id(chart), Some(key_id));
        let opened = decrypt(&store.data_key(key_id).unwrap(), &sealed, b"").unwrap();
        assert_eq!(opened, plaintext);
    }

    #[test]
    fn readable_key_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        drop(KeyStore::open(&paths, true).unwrap());
        fs::set_permissions(&paths.kek_file, fs::Permissions::from_mode(0o644)).unwrap();
        let error = KeyStore::open(&paths, true).unwrap_err();
        assert!(
            matches!(error, KeyStoreError::Permissions { mode: 0o644, .. }),
            "{error}"
        );
    }

    #[test]
    fn wrong_kek_cannot_unwrap_data_key() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        let key_id = {
            let (store, _) = KeyStore::open(&paths, true).unwrap();
            store.create_data_key(ChartId::random()).unwrap()
        };
        fs::remove_file(&paths.kek_file).unwrap();
        let (store, _) = KeyStore::open(&paths, true).unwrap();
        let error = store.data_key(key_id).unwrap_err();
        assert!(matches!(error, KeyStoreError::Unwrap(..)), "{error}");
    }

    #[test]
    fn shared_key_imports_under_same_kek() {
        let first_dir = tempfile::tempdir().unwrap();
        let first_paths = KeyPaths::under(first_dir.path(), None);
        let (first, _) = KeyStore::open(&first_paths, true).unwrap();
        let chart_id = ChartId::random();
        let key_id = first.create_data_key(chart_id).unwrap();
        let record = first.wrapped_record(key_id).unwrap().unwrap();

        // A second node with the same key-encryption key file.
        let second_dir = tempfile::tempdir().unwrap();
        let second_paths = KeyPaths::under(second_dir.path(), None);
        fs::create_dir_all(&second_paths.dir).unwrap();
        fs::copy(&first_paths.kek_file, &second_paths.kek_file).unwrap();
        let (second, _) = KeyStore::open(&second_paths, true).unwrap();
        assert!(matches!(
            second.data_key(key_id),
            Err(KeyStoreError::MissingDataKey(_))
        ));
        assert!(second.import_wrapped(key_id, &record).unwrap());
        assert!(
            !second.import_wrapped(key_id, &record).unwrap(),
            "imported twice"
        );
        assert_eq!(second.chart_key_id(chart_id), Some(key_id));
        assert_eq!(
            second.data_key(key_id).unwrap().0,
            first.data_key(key_id).unwrap().0
        );

        // A third node with a key-encryption key of its own cannot take the record.
        let third_dir = tempfile::tempdir().unwrap();
        let (third, _) = KeyStore::open(&KeyPaths::under(third_dir.path(), None), true).unwrap();
        let error = third.import_wrapped(key_id, &record).unwrap_err();
        assert!(matches!(error, KeyStoreError::ForeignKek(_)), "{error}");
        assert_eq!(third.wrapped_record(key_id).unwrap(), None);
    }

    #[test]
    fn untrusted_own_signer_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        drop(KeyStore::open(&paths, true).unwrap());

        // A second node given the key-encryption key and the list, but not the signing key.
        let other_dir = tempfile::tempdir().unwrap();
        let other_paths = KeyPaths::under(other_dir.path(), None);
        fs::create_dir_all(&other_paths.dir).unwrap();
        fs::copy(&paths.kek_file, &other_paths.kek_file).unwrap();
        fs::copy(paths.trusted_signers(), other_paths.trusted_signers()).unwrap();
        assert!(matches!(
            KeyStore::open(&other_paths, true),
            Err(KeyStoreError::SignerNotTrusted(_))
        ));
        // With the signing key copied as well, it opens.
        fs::copy(paths.signing_key(), other_paths.signing_key()).unwrap();
        assert!(KeyStore::open(&other_paths, true).is_ok());
    }

    #[test]
    fn lost_trusted_signers_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        drop(KeyStore::open(&paths, true).unwrap());
        fs::remove_file(paths.trusted_signers()).unwrap();
        assert!(matches!(
            KeyStore::open(&paths, true),
            Err(KeyStoreError::TrustedSignersMissing(_))
        ));
        assert!(
            !paths.trusted_signers().exists(),
            "a list naming only this node was written"
        );
    }

    #[test]
    fn shared_files_reader_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        let (writer, _) = KeyStore::open(&paths, true).unwrap();
        let key_id = writer.create_data_key(ChartId::random()).unwrap();
        let record = writer.wrapped_record(key_id).unwrap().unwrap();
        let node_key = writer.signer().public_key();
        drop(writer);

        // What a verifier of a Kafka log gets: the key-encryption key and the trusted signers.
        let other_dir = tempfile::tempdir().unwrap();
        let other_paths = KeyPaths::under(other_dir.path(), None);
        fs::create_dir_all(&other_paths.dir).unwrap();
        fs::copy(&paths.kek_file, &other_paths.kek_file).unwrap();
        fs::copy(paths.trusted_signers(), other_paths.trusted_signers()).unwrap();
        let reader = KeyStore::open_read_only(&other_paths, None).unwrap();
        assert!(reader.trusted_signers().contains(&node_key));
        assert_eq!(
            reader.trusted_signers().len(),
            1,
            "a throwaway key was trusted"
        );
        assert!(reader.import_wrapped(key_id, &record).unwrap());
        assert!(reader.data_key(key_id).is_ok());
        assert!(matches!(
            reader.create_data_key(ChartId::random()),
            Err(KeyStoreError::ReadOnly)
        ));
        drop(reader);
        assert!(
            !other_paths.data_keys().exists(),
            "the reader created a key database"
        );
        assert!(!other_paths.signing_key().exists());

        fs::remove_file(other_paths.trusted_signers()).unwrap();
        assert!(matches!(
            KeyStore::open_read_only(&other_paths, None),
            Err(KeyStoreError::NoTrustedSigners(_))
        ));
        assert!(!other_paths.trusted_signers().exists());
    }

    #[test]
    fn read_only_store_imports_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        let (writer, _) = KeyStore::open(&paths, true).unwrap();
        let key_id = writer.create_data_key(ChartId::random()).unwrap();
        let record = writer.wrapped_record(key_id).unwrap().unwrap();
        drop(writer);

        let other_dir = tempfile::tempdir().unwrap();
        let other_paths = KeyPaths::under(other_dir.path(), None);
        fs::create_dir_all(&other_paths.dir).unwrap();
        fs::copy(&paths.kek_file, &other_paths.kek_file).unwrap();
        drop(KeyStore::open(&other_paths, true).unwrap());
        let reader = KeyStore::open_read_only(&other_paths, None).unwrap();
        assert!(reader.import_wrapped(key_id, &record).unwrap());
        assert!(reader.data_key(key_id).is_ok());
        drop(reader);
        let reopened = KeyStore::open_read_only(&other_paths, None).unwrap();
        assert_eq!(
            reopened.wrapped_record(key_id).unwrap(),
            None,
            "a read-only store wrote to disk"
        );
    }

    #[test]
    fn missing_key_file_without_create_fails() {
        let dir = tempfile::tempdir().unwrap();
        let paths = KeyPaths::under(dir.path(), None);
        let error = KeyStore::open(&paths, false).unwrap_err();
        assert!(matches!(error, KeyStoreError::Missing(_)), "{error}");
    }
}
