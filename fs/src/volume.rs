//! An open volume: its configuration, the name key, the agent connection and the
//! data-key cache — everything the FUSE adapter needs that involves cryptography, as
//! operations on paths and open files in terms of the format codec.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine;
use kmsfs_common::client::{ClientError, SecretBytes};
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::files::write_atomically;
use kmsfs_common::format::block::{seal_block, BlockIndex, ContentKey, FileId, Layout};
use kmsfs_common::format::header::{self, DataKey, HEADER_SIZE};
use kmsfs_common::format::names::{self, EncryptedName, EntryKind, NameKey, XattrOwner};
use kmsfs_common::format::volume::{file_key_context, name_key_context, NameMode, VolumeConfig, VolumeId, VOLUME_FILE};
use kmsfs_common::format::FormatError;
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::json;

pub use kmsfs_common::format::header::FileHeader;
pub use kmsfs_common::format::names::DirId;

use crate::keys::{AgentPool, CacheStats, KeyCache};
use crate::pool::{self, FreshKey, KeyPool, PoolStats};

/// The root's extended attribute through which `kmsfs status` reads a mount's counters.
pub const STATUS_XATTR: &str = "user.kmsfs.status";
/// The root's extended attribute that `kmsfs rewrap` sets to have a mount re-read
/// `kmsfs.volume` ([`Volume::reload`]): new files' keys then come from the KMS key the
/// volume was moved to.
pub const RELOAD_XATTR: &str = "user.kmsfs.reload";

/// Why a volume operation failed.
#[derive(Debug)]
pub enum VolError {
    Io(io::Error),
    /// The agent cannot be reached.
    Unreachable(ClientError),
    /// The agent refused (a disabled or deleted key, no permission).
    Refused(KmsError),
    /// Stored data failed authentication or is malformed.
    Corrupt {
        what: &'static str,
        error: FormatError,
    },
    /// A name that cannot exist here (reserved, `/`, NUL).
    Name,
    NameTooLong,
}

impl VolError {
    /// The errno a caller of the filesystem sees.
    pub fn errno(&self) -> i32 {
        match self {
            VolError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            VolError::Unreachable(_) => libc::EIO,
            VolError::Refused(e) => match e.kind {
                ErrorKind::DisabledException
                | ErrorKind::KMSInvalidStateException
                | ErrorKind::AccessDeniedException
                | ErrorKind::NotFoundException
                | ErrorKind::IncorrectKeyException
                | ErrorKind::KeyUnavailableException => libc::EACCES,
                _ => libc::EIO,
            },
            VolError::Corrupt { .. } => libc::EIO,
            VolError::Name => libc::EINVAL,
            VolError::NameTooLong => libc::ENAMETOOLONG,
        }
    }
}

impl fmt::Display for VolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolError::Io(e) => write!(f, "I/O error: {e}"),
            VolError::Unreachable(e) => write!(f, "the key agent is unreachable: {e}"),
            VolError::Refused(e) => write!(f, "the key agent refused: {e}"),
            VolError::Corrupt { what, error } => write!(f, "{what} failed authentication: {error}"),
            VolError::Name => f.write_str("invalid name"),
            VolError::NameTooLong => f.write_str("name too long"),
        }
    }
}

impl From<io::Error> for VolError {
    fn from(e: io::Error) -> VolError {
        VolError::Io(e)
    }
}

pub(crate) fn agent_error(e: ClientError) -> VolError {
    match e {
        ClientError::Service(k) => VolError::Refused(k),
        other => VolError::Unreachable(other),
    }
}

/// What one file's data key unlocks, derived once and cached.
pub struct FileKeys {
    pub data: DataKey,
    pub content: ContentKey,
}

/// Options of `kmsfs init`.
pub struct InitOptions {
    pub key_id: String,
    pub layout: Layout,
    pub names: NameMode,
}

/// Tuning of an open volume.
pub struct OpenOptions {
    pub cache_capacity: NonZeroUsize,
    pub cache_max_age: Duration,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            cache_capacity: NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN),
            cache_max_age: Duration::from_secs(3600),
        }
    }
}

pub struct Volume {
    root: PathBuf,
    config: VolumeConfig,
    /// The KMS key new files' data keys are generated under: `kmsfs.volume`'s when opened,
    /// then whichever key a rewrap moved the volume to ([`Volume::reload`]), with the number
    /// of such moves. Shared with the pool's generator.
    key_id: Arc<Mutex<(Arc<str>, u64)>>,
    /// Held (shared) while a new file gets its key and header, and (exclusively) while the
    /// volume moves to another key: once a reload returns, no file is being made under the
    /// old key, so a rewrap that walks the tree after it misses none.
    key_switch: RwLock<()>,
    names: NameKey,
    agent: Arc<AgentPool>,
    cache: KeyCache<FileId, FileKeys>,
    pool: KeyPool,
    /// Held while an interrupted `mkdir` is given its directory ID (`dir_id`).
    dir_id_recovery: Mutex<()>,
    /// Directories made by this mount whose ID file is not yet synced, in the order made.
    unsynced_dir_ids: Mutex<Vec<PathBuf>>,
}

/// How many new directories' IDs may wait for a durability point before they are synced
/// anyway: a bound on the open work, which costs about one journal commit per batch.
pub const UNSYNCED_DIR_IDS: usize = 64;

/// Starts writing the dirty pages of `file` in `len` bytes from `offset` (0: to its end)
/// out to disk without waiting for them, and drops its clean pages there: what
/// `POSIX_FADV_DONTNEED` does on Linux.
pub fn start_writeback(file: &File, offset: i64, len: i64) -> nix::Result<()> {
    let advice = nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED;
    nix::fcntl::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(file), offset, len, advice)
}

/// Syncs each directory's ID file, then the directory (which holds the ID's entry), and
/// empties the list. A directory removed since has nothing left to protect, whatever took
/// its name (rmdir takes it off the list, but one removed behind our back may now be a
/// file: ENOTDIR). On failure the directories not yet synced stay listed, for the next
/// attempt.
fn sync_dir_ids(dirs: &mut Vec<PathBuf>) -> io::Result<()> {
    while let Some(dir) = dirs.last() {
        let synced = File::open(dir.join(names::DIR_ID_FILE))
            .and_then(|id| id.sync_all())
            .and_then(|()| File::open(dir)?.sync_all());
        match synced {
            Err(e) if !matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => return Err(e),
            _ => dirs.pop(),
        };
    }
    Ok(())
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(crate) fn unb64(value: &serde_json::Value) -> Result<zeroize::Zeroizing<Vec<u8>>, VolError> {
    decode_b64(value.as_str().ok_or(VolError::Unreachable(ClientError::Protocol("missing blob".into())))?)
}

fn decode_b64(text: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, VolError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(zeroize::Zeroizing::new)
        .map_err(|_| VolError::Unreachable(ClientError::Protocol("bad base64 from the agent".into())))
}

pub(crate) fn context_json(context: &EncryptionContext) -> serde_json::Value {
    serde_json::to_value(&context.0).unwrap_or_default()
}

impl Volume {
    /// Creates a volume in the empty directory `root`: a name key from the agent, a root
    /// directory ID, and `kmsfs.volume` written atomically.
    pub fn init(root: &Path, agent: &AgentPool, options: InitOptions) -> Result<VolumeConfig, String> {
        if fs::read_dir(root).map_err(|e| format!("cannot read {}: {e}", root.display()))?.next().is_some() {
            return Err(format!("{} is not empty; kmsfs init needs an empty directory", root.display()));
        }
        let volume_id = kmsfs_common::format::volume::VolumeId::random();
        let generated = agent
            .call(
                "GenerateDataKeyWithoutPlaintext",
                &json!({
                    "KeyId": options.key_id,
                    "NumberOfBytes": NameKey::LEN,
                    "EncryptionContext": context_json(&name_key_context(&volume_id)),
                }),
            )
            .map_err(|e| format!("the agent could not make the volume's name key: {e}"))?;
        let wrapped_name_key =
            unb64(&generated["CiphertextBlob"]).map_err(|e| format!("unexpected answer from the agent: {e}"))?;
        // Record the key's ARN, so that the volume keeps naming the same key if an alias moves.
        let key_id = generated["KeyId"].as_str().unwrap_or(&options.key_id).to_string();
        let config = VolumeConfig {
            volume_id,
            key_id,
            cipher: options.layout.cipher,
            block_size: options.layout.block_size,
            names: options.names,
            wrapped_name_key: wrapped_name_key.to_vec(),
            root_dir_id: DirId::random(),
        };
        write_atomically(&root.join(VOLUME_FILE), config.to_json().as_bytes(), 0o444)
            .map_err(|e| format!("cannot write {}: {e}", root.join(VOLUME_FILE).display()))?;
        Ok(config)
    }

    /// Opens the volume in `root`, unwrapping its name key through the agent.
    pub fn open(root: &Path, agent: AgentPool, options: OpenOptions) -> Result<Volume, String> {
        let root = fs::canonicalize(root).map_err(|e| format!("cannot open {}: {e}", root.display()))?;
        let config = read_config(&root)?;
        let names = unwrap_name_key(&agent, &config)?;
        let agent = Arc::new(agent);
        let key_id: Arc<Mutex<(Arc<str>, u64)>> = Arc::new(Mutex::new((Arc::from(config.key_id.as_str()), 0)));
        let pool = {
            let (agent, key_id, volume_id) = (agent.clone(), key_id.clone(), config.volume_id);
            let generate = move |count| {
                let (key_id, generation) = key_id.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let keys = generate_data_keys(&agent, &key_id, &volume_id, count)?;
                Ok(keys.into_iter().map(|k| k.with_generation(generation)).collect())
            };
            KeyPool::new(Box::new(generate), pool::WORKERS)
        };
        let cache = KeyCache::new(options.cache_capacity, options.cache_max_age);
        Ok(Volume {
            root,
            config,
            key_id,
            key_switch: RwLock::new(()),
            names,
            agent,
            cache,
            pool,
            dir_id_recovery: Mutex::new(()),
            unsynced_dir_ids: Mutex::new(Vec::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &VolumeConfig {
        &self.config
    }

    /// The KMS key new files' data keys are generated under (see [`Volume::reload`]).
    pub fn key_id(&self) -> Arc<str> {
        self.key_id.lock().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// Re-reads `kmsfs.volume` after a rewrap moved the volume to another KMS key (or to
    /// its key's newest material): the new file must describe this same volume, and its
    /// wrapped name key must unwrap to the name key in use. New files then get their data
    /// keys under the KMS key it names: the keys generated ahead of need are dropped, and
    /// if the key changed, so are the cached ones, so that each is unwrapped again from
    /// its file's header as it now is, and counts as the new key's for revocation (the
    /// key-event watcher drops a disabled key's data keys by the key that unwrapped them).
    /// Returns the KMS key now in use.
    pub fn reload(&self) -> Result<Arc<str>, String> {
        let config = read_config(&self.root)?;
        let same_volume = config.volume_id == self.config.volume_id
            && config.root_dir_id == self.config.root_dir_id
            && config.layout() == self.config.layout()
            && config.names == self.config.names;
        if !same_volume {
            return Err(format!("{} now describes another volume; remount it", self.root.join(VOLUME_FILE).display()));
        }
        let names = unwrap_name_key(&self.agent, &config)?;
        // The name key is deterministic (AES-SIV): the same key seals a name the same way.
        let probe = |key: &NameKey| names::encrypt_name(key, &config.root_dir_id, b"kmsfs reload").ok();
        let sealed = probe(&names);
        if sealed.is_none() || sealed != probe(&self.names) {
            return Err("the volume file's name key is not the one in use; remount the volume".into());
        }
        let new: Arc<str> = Arc::from(config.key_id.as_str());
        let _switching = self.key_switch.write().unwrap_or_else(PoisonError::into_inner);
        let old = {
            let mut current = self.key_id.lock().unwrap_or_else(PoisonError::into_inner);
            let generation = current.1 + 1;
            std::mem::replace(&mut *current, (new.clone(), generation)).0
        };
        self.pool.clear();
        if old != new {
            self.cache.clear();
            tracing::info!(
                from = &*old,
                to = &*new,
                "the volume moved to another KMS key: new files' keys come from it"
            );
        }
        Ok(new)
    }

    pub fn layout(&self) -> Layout {
        self.config.layout()
    }

    pub fn root_dir_id(&self) -> DirId {
        self.config.root_dir_id
    }

    pub fn agent(&self) -> &AgentPool {
        &self.agent
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Drops the cached data keys of the KMS key `arn` (it was disabled), and the keys
    /// generated ahead of need (all from the volume's KMS key, which `arn` may name).
    pub fn revoke(&self, arn: &str) -> usize {
        self.pool.clear();
        self.cache.revoke(arn)
    }

    pub fn revoke_all(&self) {
        self.pool.clear();
        self.cache.clear()
    }

    /// Plaintext size of a regular file of `stored` bytes; `None` if no file has that size.
    pub fn plaintext_size(&self, stored: u64) -> Option<u64> {
        self.layout().plaintext_size(stored).ok()
    }

    // ---- directories and names ----

    /// The ID of directory `dir`, as stored (`kmsfs fsck` reports what it finds; the
    /// filesystem uses [`Volume::dir_id`]).
    pub fn read_dir_id(&self, dir: &Path) -> Result<DirId, VolError> {
        if dir == self.root {
            return Ok(self.config.root_dir_id);
        }
        let bytes = fs::read(dir.join(names::DIR_ID_FILE))?;
        DirId::parse(&bytes).map_err(|error| VolError::Corrupt { what: "directory ID", error })
    }

    /// The ID of directory `dir`, giving one to an interrupted `mkdir`. A crash between
    /// creating a directory and syncing its ID file can leave the directory with no ID file
    /// or a short one, and nothing else in it: no name was ever encrypted under an ID it
    /// never had, so it gets a new one. A directory with entries and no valid ID is damage,
    /// and stays an error.
    pub fn dir_id(&self, dir: &Path) -> Result<DirId, VolError> {
        let missing = match self.read_dir_id(dir) {
            Err(VolError::Io(e)) if e.kind() == io::ErrorKind::NotFound => VolError::Corrupt {
                what: "directory ID",
                error: FormatError::Malformed { what: "no directory ID file" },
            },
            Err(e @ VolError::Corrupt { .. }) => e,
            other => return other,
        };
        let _recovering = self.dir_id_recovery.lock().unwrap_or_else(PoisonError::into_inner);
        if let Ok(id) = self.read_dir_id(dir) {
            return Ok(id); // another thread got here first
        }
        let mut leftovers = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            match name.to_str() {
                Some(names::DIR_ID_FILE) => {}
                // write_atomically's temporary, from versions that wrote the ID that way.
                Some(n) if n.starts_with(".kmsfs.dirid.tmp") => leftovers.push(dir.join(n)),
                _ => return Err(missing),
            }
        }
        for leftover in leftovers {
            fs::remove_file(leftover)?;
        }
        let id = DirId::random();
        write_atomically(&dir.join(names::DIR_ID_FILE), &id.encode(), 0o444)?;
        tracing::warn!(dir = %dir.display(), "empty directory without a valid ID (an interrupted mkdir): gave it a new one");
        Ok(id)
    }

    /// Gives the new, empty directory `dir` its ID file: written in place (there is no old
    /// ID to keep, so no temporary and rename) and handed to writeback at once, but not
    /// waited for. Nothing made in the directory is durable before something is synced,
    /// and only then is the ID's durability owed: the mount syncs the waiting IDs at its
    /// durability points ([`Volume::sync_new_dir_ids`]: before an fsync, an fsyncdir, a
    /// rename or a link), or once [`UNSYNCED_DIR_IDS`] of them wait. (Waiting for each
    /// made a mkdir cost two syncs, 0.7 ms here, a quarter of a source tree's extraction.)
    /// On ext4's default `data=ordered`, the early writeback also puts the ID on disk
    /// before any journal commit that records entries made in the directory. A crash
    /// before that leaves the directory without a valid ID, which [`Volume::dir_id`]
    /// recovers when it is empty. On failure the ID file is removed, so that the caller
    /// can remove the directory.
    pub fn write_new_dir_id(&self, dir: &Path) -> Result<(), VolError> {
        let path = dir.join(names::DIR_ID_FILE);
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o444).open(&path)?;
        if let Err(e) = file.write_all(&DirId::random().encode()) {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        if let Err(e) = start_writeback(&file, 0, 0) {
            tracing::debug!(dir = %dir.display(), "starting the directory ID's writeback: {e}");
        }
        let mut unsynced = self.unsynced_dir_ids.lock().unwrap_or_else(PoisonError::into_inner);
        unsynced.push(dir.to_path_buf());
        if unsynced.len() >= UNSYNCED_DIR_IDS {
            // This directory exists either way; a failure shows at the next durability point.
            if let Err(e) = sync_dir_ids(&mut unsynced) {
                tracing::warn!("syncing new directories' IDs: {e}");
            }
        }
        Ok(())
    }

    /// Makes the IDs of the directories made since the last call durable (see
    /// [`Volume::write_new_dir_id`]). The list stays locked throughout, so that no caller
    /// returns while another is still syncing an ID its own durability depends on.
    pub fn sync_new_dir_ids(&self) -> Result<(), VolError> {
        let mut unsynced = self.unsynced_dir_ids.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(sync_dir_ids(&mut unsynced)?)
    }

    /// Removes the empty (to its user) directory `dir`: its ID file, then itself.
    pub fn remove_dir(&self, dir: &Path) -> Result<(), VolError> {
        for entry in fs::read_dir(dir)? {
            if entry?.file_name() != names::DIR_ID_FILE {
                return Err(VolError::Io(io::Error::from_raw_os_error(libc::ENOTEMPTY)));
            }
        }
        let id_file = dir.join(names::DIR_ID_FILE);
        let saved = fs::read(&id_file).ok();
        let _ = fs::remove_file(&id_file);
        if let Err(e) = fs::remove_dir(dir) {
            if let Some(saved) = saved {
                let _ = write_atomically(&id_file, &saved, 0o444);
            }
            return Err(e.into());
        }
        // Its ID no longer needs syncing, and its path may soon name something else.
        self.unsynced_dir_ids.lock().unwrap_or_else(PoisonError::into_inner).retain(|d| d != dir);
        Ok(())
    }

    /// Where `name` lives in the directory with ID `dir_id`.
    pub fn stored_name(&self, dir_id: &DirId, name: &OsStr) -> Result<StoredName, VolError> {
        let bytes = name.as_bytes();
        if bytes.len() > 255 {
            return Err(VolError::NameTooLong);
        }
        match self.config.names {
            NameMode::Plaintext => {
                let text = name.to_str().unwrap_or("");
                if names::is_reserved_name(text) {
                    return Err(VolError::Name);
                }
                Ok(StoredName { entry: name.to_os_string(), long: None })
            }
            NameMode::Encrypted => match names::encrypt_name(&self.names, dir_id, bytes) {
                Ok(EncryptedName::Short(entry)) => Ok(StoredName { entry: entry.into(), long: None }),
                Ok(EncryptedName::Long { file_name, full }) => {
                    Ok(StoredName { entry: file_name.into(), long: Some(full) })
                }
                Err(_) => Err(VolError::Name),
            },
        }
    }

    /// The user's name of backing entry `entry` in `dir`; `None` for the volume's own files
    /// and for names that do not decrypt (logged: they were tampered with or moved).
    pub fn plain_name(&self, dir: &Path, dir_id: &DirId, entry: &OsStr) -> Option<OsString> {
        let text = entry.to_str()?;
        if names::is_reserved_name(text) {
            return None;
        }
        match self.config.names {
            NameMode::Plaintext => Some(entry.to_os_string()),
            NameMode::Encrypted => {
                let decrypted = match names::entry_kind(text) {
                    EntryKind::Reserved => return None,
                    EntryKind::Short => names::decrypt_name(&self.names, dir_id, text),
                    EntryKind::Long => match fs::read(dir.join(long_side_file(text))) {
                        Ok(full) => names::decrypt_long_name(&self.names, dir_id, text, &full),
                        Err(e) => {
                            tracing::error!(dir = %dir.display(), entry = text, "long name without its side file: {e}");
                            return None;
                        }
                    },
                };
                match decrypted {
                    Ok(name) => Some(OsString::from_vec(name)),
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), entry = text, "name failed authentication: {e}");
                        None
                    }
                }
            }
        }
    }

    /// Writes the side file of a long name (before the entry itself is created).
    pub fn write_long_name(&self, dir: &Path, stored: &StoredName) -> Result<(), VolError> {
        if let (Some(full), Some(entry)) = (&stored.long, stored.entry.to_str()) {
            write_atomically(&dir.join(long_side_file(entry)), full.as_bytes(), 0o444)?;
        }
        Ok(())
    }

    pub fn remove_long_name(&self, dir: &Path, stored: &StoredName) -> Result<(), VolError> {
        if let (Some(_), Some(entry)) = (&stored.long, stored.entry.to_str()) {
            match fs::remove_file(dir.join(long_side_file(entry))) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn encrypt_symlink(&self, target: &[u8]) -> Result<OsString, VolError> {
        match self.config.names {
            NameMode::Plaintext => Ok(OsString::from_vec(target.to_vec())),
            NameMode::Encrypted => names::encrypt_symlink(&self.names, target).map(OsString::from).map_err(|error| {
                match error {
                    // Encryption grows a target, so the longest ones no longer fit in a
                    // backing symlink: the user's error, not damage.
                    FormatError::TooLong { .. } => VolError::NameTooLong,
                    error => VolError::Corrupt { what: "symlink target", error },
                }
            }),
        }
    }

    pub fn decrypt_symlink(&self, stored: &Path) -> Result<Vec<u8>, VolError> {
        match self.config.names {
            NameMode::Plaintext => Ok(stored.as_os_str().as_bytes().to_vec()),
            NameMode::Encrypted => names::decrypt_symlink(&self.names, stored.as_os_str().as_bytes())
                .map_err(|error| VolError::Corrupt { what: "symlink target", error }),
        }
    }

    /// The backing name of extended attribute `name`: only `user.*` attributes exist.
    pub fn xattr_name(&self, name: &OsStr) -> Result<OsString, VolError> {
        if name == STATUS_XATTR || name == RELOAD_XATTR {
            return Err(VolError::Io(io::Error::from_raw_os_error(libc::EPERM)));
        }
        names::encrypt_xattr_name(&self.names, name.as_bytes()).map(OsString::from).map_err(|e| {
            // ERANGE is what Linux answers for a name too long; other namespaces are not stored.
            let errno = if matches!(e, FormatError::TooLong { .. }) { libc::ERANGE } else { libc::EOPNOTSUPP };
            VolError::Io(io::Error::from_raw_os_error(errno))
        })
    }

    /// The user's name of a backing extended attribute; `None` for attributes that are
    /// not ours (or do not authenticate).
    pub fn plain_xattr_name(&self, stored: &OsStr) -> Option<OsString> {
        let decrypted = names::decrypt_xattr_name(&self.names, stored.to_str()?).ok()??;
        Some(OsString::from_vec(decrypted))
    }

    /// What an extended attribute of the entry at `path` is bound to: a file's ID or a
    /// directory's ID, so that values cannot be moved between entries.
    pub fn xattr_owner(&self, path: &Path) -> Result<XattrOwner, VolError> {
        let meta = fs::symlink_metadata(path)?;
        if meta.is_dir() {
            return Ok(XattrOwner::Dir(self.dir_id(path)?));
        }
        if !meta.is_file() {
            return Err(VolError::Io(io::Error::from_raw_os_error(libc::EPERM)));
        }
        let mut bytes = [0u8; HEADER_SIZE];
        File::open(path)?.read_exact_at(&mut bytes, 0)?;
        let slots = header::parse_slots(&bytes).map_err(|error| VolError::Corrupt { what: "header", error })?;
        let slot = slots
            .first()
            .ok_or(VolError::Corrupt { what: "header", error: FormatError::Malformed { what: "no valid slot" } })?;
        Ok(XattrOwner::File(slot.file_id()))
    }

    pub fn encrypt_xattr(&self, owner: &XattrOwner, name: &OsStr, value: &[u8]) -> Result<Vec<u8>, VolError> {
        names::encrypt_xattr_value(&self.names, owner, name.as_bytes(), value).map_err(|e| match e {
            FormatError::TooLong { .. } => VolError::Io(io::Error::from_raw_os_error(libc::E2BIG)),
            error => VolError::Corrupt { what: "extended attribute", error },
        })
    }

    pub fn decrypt_xattr(&self, owner: &XattrOwner, name: &OsStr, sealed: &[u8]) -> Result<Vec<u8>, VolError> {
        names::decrypt_xattr_value(&self.names, owner, name.as_bytes(), sealed)
            .map_err(|error| VolError::Corrupt { what: "extended attribute", error })
    }

    // ---- file headers and keys ----

    /// Makes `file` (new, empty) an encrypted file: a new data key (generated ahead of need
    /// by the pool, or now), the header, and the empty final block, in one write. The key
    /// is cached.
    pub fn init_file(&self, file: &File) -> Result<FileHeader, VolError> {
        let _creating = self.key_switch.read().unwrap_or_else(PoisonError::into_inner);
        let generation = self.key_id.lock().unwrap_or_else(PoisonError::into_inner).1;
        // A key asked for before the volume last moved to another KMS key (in flight
        // during the move) is dropped: the pool was emptied, so this loops at most a few times.
        let FreshKey { file_id, data, wrapped, kms_key_arn, .. } = loop {
            let fresh = self.pool.take()?;
            if fresh.generation == generation {
                break fresh;
            }
        };
        let layout = self.layout();
        let header = FileHeader::new(file_id, layout, wrapped)
            .map_err(|error| VolError::Corrupt { what: "new header", error })?;
        let keys = Arc::new(FileKeys { content: ContentKey::derive(&data, layout), data });
        let mut contents = header::encode_new(&header, &keys.data).to_vec();
        seal_block(&keys.content, &file_id, BlockIndex(0), true, &[], &mut contents)
            .map_err(|error| VolError::Corrupt { what: "empty block", error })?;
        file.write_all_at(&contents, 0)?;
        self.cache.insert(file_id, &kms_key_arn, keys);
        Ok(header)
    }

    /// Reads and authenticates `file`'s header, unwrapping its data key (cached after the
    /// first time). A damaged slot falls back to the other one.
    pub fn open_file(&self, file: &File) -> Result<FileHeader, VolError> {
        self.open_file_keys(file).map(|(header, _)| header)
    }

    /// [`Volume::open_file`], and the data key that authenticated the header.
    pub fn open_file_keys(&self, file: &File) -> Result<(FileHeader, Arc<FileKeys>), VolError> {
        let mut bytes = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut bytes, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                VolError::Corrupt { what: "header", error: FormatError::Truncated { what: "header" } }
            } else {
                VolError::Io(e)
            }
        })?;
        let slots = header::parse_slots(&bytes).map_err(|error| VolError::Corrupt { what: "header", error })?;
        let mut last_error = None;
        for slot in &slots {
            let keys = match self.keys_for(slot.file_id(), slot.wrapped_key()) {
                Ok(keys) => keys,
                Err(e @ (VolError::Unreachable(_) | VolError::Io(_))) => return Err(e),
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            match slot.verify(&keys.data) {
                Ok(header) if header.layout() == self.layout() => return Ok((header, keys)),
                Ok(_) => {
                    return Err(VolError::Corrupt {
                        what: "header",
                        error: FormatError::Malformed { what: "layout differs from the volume's" },
                    })
                }
                Err(error) => {
                    tracing::warn!(slot = slot.index(), "header slot failed authentication: {error}");
                    last_error = Some(VolError::Corrupt { what: "header", error });
                }
            }
        }
        Err(last_error
            .unwrap_or(VolError::Corrupt { what: "header", error: FormatError::Malformed { what: "no valid slot" } }))
    }

    /// The keys of an opened file: from the cache, or unwrapped by the agent.
    pub fn keys(&self, header: &FileHeader) -> Result<Arc<FileKeys>, VolError> {
        self.keys_for(header.file_id(), header.wrapped_key())
    }

    /// The keys of the file open as `file`, whose header was `header` when it was opened:
    /// from the cache, or else unwrapped from the header as it is on disk now. A rewrap may
    /// have moved the file to another KMS key since (it never changes the data key), and
    /// after that key's data keys were revoked, the wrapping held since the open may no
    /// longer unwrap.
    pub fn keys_of_open(&self, file: &File, header: &FileHeader) -> Result<Arc<FileKeys>, VolError> {
        if let Some(keys) = self.cache.get(&header.file_id()) {
            return Ok(keys);
        }
        let (now, keys) = self.open_file_keys(file)?;
        if now.file_id() != header.file_id() {
            return Err(VolError::Corrupt {
                what: "header",
                error: FormatError::Malformed { what: "file ID changed" },
            });
        }
        Ok(keys)
    }

    fn keys_for(&self, file_id: FileId, wrapped: &[u8]) -> Result<Arc<FileKeys>, VolError> {
        if let Some(keys) = self.cache.get(&file_id) {
            return Ok(keys);
        }
        let (data, arn) = unwrap_data_key(&self.agent, &self.config.volume_id, &file_id, wrapped)?;
        let keys = Arc::new(FileKeys { content: ContentKey::derive(&data, self.layout()), data });
        self.cache.insert(file_id, &arn, keys.clone());
        Ok(keys)
    }
}

/// Reads and parses `root`'s `kmsfs.volume`.
fn read_config(root: &Path) -> Result<VolumeConfig, String> {
    let path = root.join(VOLUME_FILE);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(kmsfs_common::format::volume::MAX_VOLUME_FILE_LEN as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{} is not a kmsfs volume ({}: {e})", root.display(), path.display()))?;
    VolumeConfig::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The volume's name key, unwrapped by the agent.
fn unwrap_name_key(agent: &AgentPool, config: &VolumeConfig) -> Result<NameKey, String> {
    let unwrapped: Decrypted = agent
        .call_secret(
            "Decrypt",
            &json!({
                "CiphertextBlob": b64(&config.wrapped_name_key),
                "EncryptionContext": context_json(&name_key_context(&config.volume_id)),
            }),
        )
        .map_err(|e| format!("the agent could not unwrap the volume's name key: {e}"))?;
    NameKey::from_bytes(&unwrapped.plaintext.0).map_err(|e| format!("the volume's name key is unusable: {e}"))
}

/// File `file_id`'s data key, unwrapped by the agent from `wrapped`, and the ARN of the
/// KMS key that unwrapped it.
fn unwrap_data_key(
    agent: &AgentPool,
    volume_id: &VolumeId,
    file_id: &FileId,
    wrapped: &[u8],
) -> Result<(DataKey, String), VolError> {
    let context = file_key_context(volume_id, file_id);
    let unwrapped: Decrypted = agent
        .call_secret("Decrypt", &json!({"CiphertextBlob": b64(wrapped), "EncryptionContext": context_json(&context)}))
        .map_err(agent_error)?;
    let data =
        DataKey::from_bytes(&unwrapped.plaintext.0).map_err(|error| VolError::Corrupt { what: "data key", error })?;
    Ok((data, unwrapped.key_id))
}

/// The agent's answer to Decrypt, its plaintext never in a `serde_json::Value`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Decrypted {
    key_id: String,
    plaintext: SecretBytes,
}

/// The agent's answer to `Kmsfs.GenerateDataKeys`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GeneratedKeys {
    key_id: String,
    data_keys: Vec<GeneratedKey>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GeneratedKey {
    ciphertext_blob: String,
    plaintext: SecretBytes,
}

/// Asks the agent for `count` data keys, each for a new file of volume `volume_id`, under
/// the volume's KMS key: one `Kmsfs.GenerateDataKeys` request (GenerateDataKey for each
/// file's encryption context), so one audit record and one audit sync for them all.
fn generate_data_keys(
    agent: &AgentPool,
    key_id: &str,
    volume_id: &VolumeId,
    count: usize,
) -> Result<Vec<FreshKey>, VolError> {
    let file_ids: Vec<FileId> = (0..count).map(|_| FileId::random()).collect();
    let contexts: Vec<serde_json::Value> =
        file_ids.iter().map(|file_id| context_json(&file_key_context(volume_id, file_id))).collect();
    let generated: GeneratedKeys = agent
        .call_secret(
            "Kmsfs.GenerateDataKeys",
            &json!({"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContexts": contexts}),
        )
        .map_err(agent_error)?;
    if generated.data_keys.len() != count {
        let got = generated.data_keys.len();
        return Err(VolError::Unreachable(ClientError::Protocol(format!("asked for {count} data keys, got {got}"))));
    }
    file_ids
        .into_iter()
        .zip(generated.data_keys)
        .map(|(file_id, key)| {
            let data =
                DataKey::from_bytes(&key.plaintext.0).map_err(|error| VolError::Corrupt { what: "data key", error })?;
            let wrapped = decode_b64(&key.ciphertext_blob)?.to_vec();
            Ok(FreshKey::new(file_id, data, wrapped, generated.key_id.clone()))
        })
        .collect()
}

/// The side file holding the full encrypted name of long-name entry `entry`.
fn long_side_file(entry: &str) -> String {
    format!("{entry}{}", names::LONG_NAME_SUFFIX)
}

/// A name as stored in a backing directory.
#[derive(Debug, Clone)]
pub struct StoredName {
    /// The directory entry.
    pub entry: OsString,
    /// For a long name, the full encrypted name kept in the entry's side file.
    pub long: Option<String>,
}
