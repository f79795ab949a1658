//! The FUSE adapter: turns kernel requests into operations on the backing directory
//! through the [`Volume`] (names, headers, keys) and [`Content`] (blocks).
//!
//! Inodes are the backing files' own inode numbers (the backing root's is swapped with 1,
//! which FUSE reserves for the root), so hard links share an inode as they should. For
//! each inode the kernel has looked up, a node records where it was last seen — parent
//! inode and stored (encrypted) name — and its full backing path is rebuilt from the
//! parents on demand, so renaming a directory needs no walk of its subtree.
//!
//! Requests run on several threads (fuser's `n_threads`); per-inode content locks
//! serialize writers of one file against each other and against its readers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::content::{Content, ContentError};
use crate::helpers;
use crate::ring::abi::Setattr;
use crate::volume::{start_writeback, DirId, FileHeader, StoredName, VolError, Volume, RELOAD_XATTR, STATUS_XATTR};
use kmsfs_common::wipe::{wipe, PlainBuf};

/// How long the kernel may cache attributes and entries. Short: the backing directory
/// is ours alone, but a second mount or an offline tool could change it.
pub(crate) const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// Open files need no FLUSH on close: writes reach the backing file when they are made,
/// so there is nothing to flush, and a close saves a round trip.
pub(crate) const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;
/// The largest write the kernel sends (its own ceiling is 1 MiB).
pub const MAX_WRITE: u32 = 1 << 20;

/// Lets the kernel read ahead [`MAX_WRITE`] on the mount at `mountpoint`, so that a
/// sequential reader's READs come 1 MiB at a time: one pread and one pass of decryption
/// per MiB, where the kernel's default for a new FUSE mount (128 KiB, which the INIT
/// reply can only lower) costs eight round trips. The knob is the mount's backing device
/// info in sysfs, which only root may change; other users' mounts keep the default.
pub fn widen_readahead(mountpoint: &Path) -> io::Result<()> {
    let dev = fs::metadata(mountpoint)?.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let knob = PathBuf::from(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"));
    let wanted = MAX_WRITE / 1024;
    let current: u32 = fs::read_to_string(&knob)?.trim().parse().unwrap_or(0);
    if current < wanted {
        fs::write(&knob, wanted.to_string())?;
    }
    Ok(())
}

struct Node {
    /// The backing inode number, as the kernel would see it (see [`KmsFs::number`]).
    number: u64,
    parent: u64,
    stored: OsString,
    /// The other places a hard-linked file was seen, so that it stays reachable when
    /// the name above is unlinked or renamed away (its other links' dentries live on
    /// in the kernel and keep asking for this inode).
    links: Vec<(u64, OsString)>,
    /// Its last name known to us was unlinked or replaced: the place above now holds
    /// nothing, or another file, and only open handles still reach this one.
    unlinked: bool,
    lookups: u64,
    dir_id: Option<DirId>,
}

impl Node {
    /// The entry `stored` in `parent` no longer names this node.
    fn forget_location(&mut self, parent: u64, stored: &OsStr) {
        if self.parent == parent && self.stored == stored {
            match self.links.pop() {
                Some((parent, stored)) => {
                    self.parent = parent;
                    self.stored = stored;
                }
                None => self.unlinked = true,
            }
        } else {
            self.links.retain(|(p, s)| !(*p == parent && s == stored));
        }
    }

    /// The entry `from` of this node was renamed to `to`.
    fn move_location(&mut self, from: (u64, &OsStr), to: (u64, &OsStr)) {
        let is_from = |p: u64, s: &OsStr| p == from.0 && s == from.1;
        if let Some(link) = self.links.iter_mut().find(|(p, s)| is_from(*p, s)) {
            *link = (to.0, to.1.to_os_string());
        } else {
            self.parent = to.0;
            self.stored = to.1.to_os_string();
        }
    }
}

/// Whether the entry in a reply is an object the request made, or one found in place.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    New,
    Found,
}

/// Node IDs given to objects whose own number was still taken (see [`Nodes::id_for`]):
/// above every inode number a backing file system hands out.
const SPARE_IDS: u64 = 1 << 63;

/// The objects the kernel knows, by the node ID it knows them by.
///
/// An object's node ID is its backing inode number, the number `stat` shows. But the
/// backing file system gives a deleted inode's number to the next new object, possibly
/// while the kernel still holds the deleted one (open, or not yet forgotten): the kernel
/// would take the new object for the old (a directory removed is dead to it, so nothing
/// could be made in the new one), and we would keep the old one's directory ID for the
/// new. Such a newcomer gets a spare ID instead, until the old node is forgotten.
struct Nodes {
    by_id: HashMap<u64, Node>,
    /// The newest node of each inode number.
    by_number: HashMap<u64, u64>,
    spares_given: u64,
}

impl Nodes {
    fn get(&self, id: &u64) -> Option<&Node> {
        self.by_id.get(id)
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut Node> {
        self.by_id.get_mut(id)
    }

    /// The node that stands for the object with inode `number` now, if the kernel knows it.
    fn id_of(&self, number: u64) -> Option<u64> {
        self.by_number.get(&number).copied()
    }

    /// The ID for the object with inode `number`: its node's if it is the object the
    /// kernel knows under that number, otherwise a new node's (and the old node, if any,
    /// is dead: only open handles still reach it).
    fn id_for(&mut self, number: u64, made: Made) -> u64 {
        if let Some(id) = self.id_of(number) {
            match self.by_id.get_mut(&id) {
                Some(node) if made == Made::Found && !node.unlinked => return id,
                Some(node) => {
                    node.unlinked = true;
                    node.links.clear();
                }
                None => {}
            }
        }
        if self.by_id.contains_key(&number) {
            self.spares_given += 1;
            SPARE_IDS | self.spares_given
        } else {
            number
        }
    }

    /// The kernel dropped `count` of its lookups of node `id`; at none, it forgets it.
    fn drop_lookups(&mut self, id: u64, count: u64) {
        let Some(node) = self.by_id.get_mut(&id) else { return };
        node.lookups = node.lookups.saturating_sub(count);
        // Keep nodes that still have children known to the kernel would be better,
        // but the kernel forgets children before their parents.
        if node.lookups == 0 {
            let number = node.number;
            self.by_id.remove(&id);
            if self.by_number.get(&number) == Some(&id) {
                self.by_number.remove(&number);
            }
        }
    }
}

struct OpenFile {
    ino: u64,
    file: File,
    header: FileHeader,
    path: PathBuf,
    lock: Arc<RwLock<()>>,
    behind: Mutex<WriteBehind>,
}

impl OpenFile {
    fn new(ino: u64, file: File, header: FileHeader, path: PathBuf, lock: Arc<RwLock<()>>) -> OpenFile {
        OpenFile { ino, file, header, path, lock, behind: Mutex::new(WriteBehind::default()) }
    }
}

/// Write-behind for a file written in sequence (a copy, a download, a log): every
/// [`WRITE_BEHIND`] bytes, the backing file is told to start writing the stretch just
/// written out to disk. Otherwise nothing reaches the disk until the kernel's dirty-page
/// thresholds or the writer's fsync, which then waits for all of it at once; this way
/// encryption and disk writes overlap. The stretch before is dropped from the backing
/// file's page cache (the kernel caches the plaintext above us): [`start_writeback`].
#[derive(Default)]
struct WriteBehind {
    /// Where the next write continues the sequence (plaintext offset).
    next: u64,
    /// Where the stretch not yet handed to writeback begins.
    mark: u64,
}

const WRITE_BEHIND: u64 = 8 << 20;

struct OpenDir {
    entries: Vec<(OsString, u64, FileType, Option<OsString>)>,
}

/// The filesystem, shared between the transports' threads and the key-event watcher.
pub struct KmsFs {
    vol: Arc<Volume>,
    backing_root_ino: u64,
    nodes: Mutex<Nodes>,
    files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    dirs: Mutex<HashMap<u64, Arc<OpenDir>>>,
    locks: Mutex<HashMap<u64, Weak<RwLock<()>>>>,
    next_handle: AtomicU64,
    /// Who kmsfs runs as: a new entry belongs to its creator when that is someone else
    /// and we are root.
    me: Caller,
    notifier: Arc<OnceLock<Notifier>>,
    /// Whether FUSE_INIT is to ask for FUSE over io_uring (see [`crate::ring`]).
    ring_wanted: AtomicBool,
    /// Whether the kernel agreed: from then on it sends every request but FORGET and
    /// INTERRUPT through the ring, and waits for the ring to be ready.
    ring_negotiated: AtomicBool,
    /// The ring's request counters, once it runs.
    ring_served: OnceLock<crate::ring::uring::Served>,
}

/// What the key-event watcher holds of a mounted filesystem: enough to drop a revoked
/// key's cached data keys and the kernel's cached pages of the files it protects.
#[derive(Clone)]
pub struct Revoker {
    vol: Arc<Volume>,
    files: Arc<Mutex<HashMap<u64, Arc<OpenFile>>>>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl Revoker {
    /// Lets the filesystem tell the kernel to drop cached pages; set once mounted.
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// The KMS key `arn` was disabled or scheduled for deletion.
    pub fn revoke(&self, arn: &str) {
        self.vol.revoke(arn);
        self.invalidate_open_files();
    }

    /// Events may have been missed: forget every data key.
    pub fn revoke_all(&self) {
        self.vol.revoke_all();
        self.invalidate_open_files();
    }

    /// Drops the kernel's cached pages of every open file, so that the next read comes
    /// to us and meets the revoked key.
    fn invalidate_open_files(&self) {
        let Some(notifier) = self.notifier.get() else { return };
        let inos: Vec<u64> = lock(&self.files).values().map(|f| f.ino).collect();
        for ino in inos {
            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

impl KmsFs {
    pub fn new(vol: Arc<Volume>) -> io::Result<KmsFs> {
        // Requests carry the caller's umask and we apply it ourselves; our own (often 022)
        // must not be applied on top, or `umask 0; mkdir d` would give 0755, not 0777.
        nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let backing_root_ino = fs::metadata(vol.root())?.ino();
        let mut by_id = HashMap::new();
        by_id.insert(
            ROOT,
            Node {
                number: ROOT,
                parent: ROOT,
                stored: OsString::new(),
                links: Vec::new(),
                unlinked: false,
                lookups: 1,
                dir_id: Some(vol.root_dir_id()),
            },
        );
        Ok(KmsFs {
            vol,
            backing_root_ino,
            nodes: Mutex::new(Nodes { by_id, by_number: HashMap::from([(ROOT, ROOT)]), spares_given: 0 }),
            files: Arc::new(Mutex::new(HashMap::new())),
            dirs: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            me: Caller { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() },
            notifier: Arc::new(OnceLock::new()),
            ring_wanted: AtomicBool::new(false),
            ring_negotiated: AtomicBool::new(false),
            ring_served: OnceLock::new(),
        })
    }

    /// The handle the key-event watcher keeps.
    pub fn revoker(&self) -> Revoker {
        Revoker { vol: self.vol.clone(), files: self.files.clone(), notifier: self.notifier.clone() }
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.vol
    }

    /// Has FUSE_INIT ask for FUSE over io_uring, if the kernel offers it.
    pub fn want_ring(&self, wanted: bool) {
        self.ring_wanted.store(wanted, Ordering::Relaxed);
    }

    /// Whether FUSE_INIT settled on FUSE over io_uring: the ring must then be started.
    pub fn ring_negotiated(&self) -> bool {
        self.ring_negotiated.load(Ordering::Relaxed)
    }

    /// Lets `kmsfs status` count the requests of the ring that was started.
    pub fn count_ring(&self, served: crate::ring::uring::Served) {
        let _ = self.ring_served.set(served);
    }

    /// The inode number the kernel sees for a backing inode number: the same, but for
    /// the backing root's and 1, which swap (1 is the root of every FUSE mount).
    fn number(&self, backing: u64) -> u64 {
        if backing == self.backing_root_ino {
            ROOT
        } else if backing == ROOT {
            self.backing_root_ino
        } else {
            backing
        }
    }

    /// The backing path of `ino`, rebuilt from its parents.
    fn path_of(&self, ino: u64) -> Result<PathBuf, Errno> {
        let nodes = lock(&self.nodes);
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT {
            let node = nodes.get(&at).ok_or(Errno::ENOENT)?;
            if node.unlinked {
                return Err(Errno::ENOENT);
            }
            parts.push(node.stored.clone());
            at = node.parent;
            if parts.len() > 4096 {
                return Err(Errno::ELOOP);
            }
        }
        let mut path = self.vol.root().to_path_buf();
        for part in parts.iter().rev() {
            path.push(part);
        }
        Ok(path)
    }

    /// A directory's backing path and ID.
    fn dir(&self, ino: u64) -> Result<(PathBuf, DirId), Errno> {
        let path = self.path_of(ino)?;
        if let Some(id) = lock(&self.nodes).get(&ino).and_then(|n| n.dir_id) {
            return Ok((path, id));
        }
        let id = self.vol.dir_id(&path).map_err(|e| self.fail(&path, &e))?;
        if let Some(node) = lock(&self.nodes).get_mut(&ino) {
            node.dir_id = Some(id);
        }
        Ok((path, id))
    }

    /// Where `name` in directory `parent` lives in the backing directory.
    fn child(&self, parent: u64, name: &OsStr) -> Result<(PathBuf, DirId, StoredName), Errno> {
        let (dir, dir_id) = self.dir(parent)?;
        let stored = self.vol.stored_name(&dir_id, name).map_err(|e| self.fail(&dir, &e))?;
        Ok((dir.clone(), dir_id, stored))
    }

    /// Logs a failure worth an operator's attention and maps it to an errno.
    fn fail(&self, path: &Path, e: &VolError) -> Errno {
        match e {
            VolError::Io(io) => errno(io),
            VolError::Name => Errno::EINVAL,
            VolError::NameTooLong => Errno::ENAMETOOLONG,
            other => {
                tracing::error!(path = %path.display(), "{other}");
                Errno::from_i32(other.errno())
            }
        }
    }

    /// Syncs the IDs of the directories made since the last durability point, before an
    /// operation that makes something in them durable or moves something into them (see
    /// [`Volume::write_new_dir_id`]).
    fn sync_new_dir_ids(&self) -> Result<(), Errno> {
        self.vol.sync_new_dir_ids().map_err(|e| self.fail(self.vol.root(), &e))
    }

    fn attr_of(&self, path: &Path, meta: &fs::Metadata) -> Result<FileAttr, Errno> {
        let kind = file_type(meta.mode());
        let size = match kind {
            FileType::RegularFile => match self.vol.plaintext_size(meta.len()) {
                Some(size) => size,
                None => {
                    tracing::error!(path = %path.display(), size = meta.len(), "stored size is not a valid encrypted size");
                    0
                }
            },
            FileType::Symlink => {
                match fs::read_link(path).map_err(VolError::Io).and_then(|t| self.vol.decrypt_symlink(&t)) {
                    Ok(target) => target.len() as u64,
                    Err(e) => {
                        tracing::error!(path = %path.display(), "{e}");
                        0
                    }
                }
            }
            _ => meta.len(),
        };
        Ok(FileAttr {
            ino: INodeNo(self.number(meta.ino())),
            size,
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: time(meta.ctime(), meta.ctime_nsec()),
            kind,
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: self.vol.layout().block_size() as u32,
            flags: 0,
        })
    }

    fn attr(&self, path: &Path) -> Result<FileAttr, Errno> {
        let meta = fs::symlink_metadata(path).map_err(|e| errno(&e))?;
        self.attr_of(path, &meta)
    }

    /// Records that the kernel looked up the object `attr` describes as `stored` in
    /// `parent`, and gives `attr` the node ID the kernel knows it by (it comes with the
    /// object's inode number, from [`Self::attr_of`]).
    fn remember(&self, attr: &mut FileAttr, parent: u64, stored: &OsStr, made: Made) {
        let mut nodes = lock(&self.nodes);
        let number = attr.ino.0;
        let id = nodes.id_for(number, made);
        nodes.by_number.insert(number, id);
        attr.ino = INodeNo(id);
        let node = nodes.by_id.entry(id).or_insert_with(|| Node {
            number,
            parent,
            stored: stored.to_os_string(),
            links: Vec::new(),
            unlinked: false,
            lookups: 0,
            dir_id: None,
        });
        if node.parent != parent || node.stored != stored {
            let previous = (node.parent, std::mem::replace(&mut node.stored, stored.to_os_string()));
            node.parent = parent;
            node.links.retain(|(p, s)| !(*p == parent && s == stored));
            // Another name of a hard-linked file: keep the old one as a fallback.
            if attr.nlink > 1 && attr.kind != FileType::Directory && !node.links.contains(&previous) {
                node.links.push(previous);
            }
        }
        node.lookups += 1;
    }

    /// The node of the object at `path` now, if the kernel knows it.
    fn node_at(&self, path: &Path) -> Option<u64> {
        let number = self.number(fs::symlink_metadata(path).ok()?.ino());
        lock(&self.nodes).id_of(number)
    }

    /// An open handle of `ino`: what still reaches a file whose last name is gone.
    fn any_handle(&self, ino: u64) -> Option<Arc<OpenFile>> {
        lock(&self.files).values().find(|f| f.ino == ino).cloned()
    }

    /// The attributes of an open file, from its descriptor (it may have no name left).
    fn handle_attr(&self, handle: &OpenFile, ino: INodeNo) -> Result<FileAttr, Errno> {
        let meta = handle.file.metadata().map_err(|e| errno(&e))?;
        let mut attr = self.attr_of(&handle.path, &meta)?;
        attr.ino = ino;
        Ok(attr)
    }

    /// The entry `stored` in `parent` was unlinked or replaced; it named `ino`.
    fn forget_location(&self, ino: Option<u64>, parent: u64, stored: &OsStr) {
        let Some(ino) = ino else { return };
        if let Some(node) = lock(&self.nodes).get_mut(&ino) {
            node.forget_location(parent, stored);
        }
    }

    fn content_lock(&self, ino: u64) -> Arc<RwLock<()>> {
        let mut locks = lock(&self.locks);
        if let Some(existing) = locks.get(&ino).and_then(Weak::upgrade) {
            return existing;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let fresh = Arc::new(RwLock::new(()));
        locks.insert(ino, Arc::downgrade(&fresh));
        fresh
    }

    /// New files and directories belong to the caller when we run as root (allow_other).
    /// `opened` is the new entry, when it is a file already open (possibly not yet linked
    /// at `path`); otherwise the entry at `path` itself is changed. A caller with our own
    /// user and group has nothing to be given: the entry is already theirs, with the group
    /// a setgid directory gives.
    fn give_to_caller(&self, caller: Caller, path: &Path, opened: Option<&File>) {
        let ours = (caller.uid, caller.gid) == (self.me.uid, self.me.gid);
        if self.me.uid == 0 && !ours {
            let (uid, gid) = (Some(caller.uid), self.new_entry_gid(caller, path));
            let given = match opened {
                Some(file) => std::os::unix::fs::fchown(file, uid, gid),
                None => std::os::unix::fs::lchown(path, uid, gid),
            };
            if let Err(e) = given {
                tracing::warn!(path = %path.display(), "cannot give the new entry to its creator: {e}");
            }
        }
    }

    /// The group a new entry at `path` takes from its creator: theirs, except in a setgid
    /// directory, whose group the backing file system already gave it (and, to a new
    /// directory, the setgid bit).
    fn new_entry_gid(&self, caller: Caller, path: &Path) -> Option<u32> {
        let setgid_parent =
            path.parent().and_then(|dir| fs::metadata(dir).ok()).is_some_and(|meta| meta.mode() & libc::S_ISGID != 0);
        (!setgid_parent).then_some(caller.gid)
    }

    /// Creates an empty encrypted regular file at `path`.
    fn create_file(&self, caller: Caller, path: &Path, mode: u32) -> Result<(File, FileHeader), Errno> {
        // The file gets its header, empty block and owner while still anonymous (O_TMPFILE)
        // and is linked into place only then, so a crash (SIGKILL during the agent call) never
        // leaves a named file without a header. Backing file systems without O_TMPFILE get
        // the file created in place, as below.
        let dir = path.parent().unwrap_or(self.vol.root());
        let anonymous =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(mode & 0o7777).open(dir);
        match anonymous {
            Ok(file) => {
                let header = self.vol.init_file(&file).map_err(|e| self.fail(path, &e))?;
                self.give_to_caller(caller, path, Some(&file));
                link_anonymous(&file, path).map_err(|e| Errno::from_i32(e as i32))?;
                return Ok((file, header));
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {}
            Err(e) => return Err(errno(&e)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode & 0o7777)
            .open(path)
            .map_err(|e| errno(&e))?;
        match self.vol.init_file(&file) {
            Ok(header) => {
                self.give_to_caller(caller, path, Some(&file));
                Ok((file, header))
            }
            Err(e) => {
                let _ = fs::remove_file(path);
                Err(self.fail(path, &e))
            }
        }
    }

    /// Opens a regular file's backing file and authenticates its header.
    fn open_backing(&self, path: &Path, write: bool) -> Result<(File, FileHeader), Errno> {
        let file = OpenOptions::new().read(true).write(write).open(path).map_err(|e| errno(&e))?;
        let header = self.vol.open_file(&file).map_err(|e| self.fail(path, &e))?;
        // A file cut to a size no encrypted file has is shown with size 0 by getattr, and
        // the kernel would serve reads of it as an empty file without asking us: refuse
        // to open it instead, so that damage reads as EIO, never as empty contents.
        let stored = file.metadata().map_err(|e| errno(&e))?.len();
        if self.vol.plaintext_size(stored).is_none() {
            tracing::error!(path = %path.display(), size = stored, "stored size is not a valid encrypted size");
            return Err(Errno::EIO);
        }
        Ok((file, header))
    }

    fn with_content<T>(
        &self,
        path: &Path,
        file: &File,
        header: &FileHeader,
        f: impl FnOnce(&Content<'_>) -> Result<T, ContentError>,
    ) -> Result<T, Errno> {
        let keys = self.vol.keys_of_open(file, header).map_err(|e| self.fail(path, &e))?;
        let content = Content { file, key: &keys.content, file_id: header.file_id() };
        f(&content).map_err(|e| match e {
            ContentError::Io(io) => errno(&io),
            other => {
                tracing::error!(path = %path.display(), "{other}");
                Errno::EIO
            }
        })
    }

    /// Hands the stretch of a sequentially written file behind `offset + len` to the
    /// backing file's writeback once it is [`WRITE_BEHIND`] long (see [`WriteBehind`]).
    fn write_behind(&self, h: &OpenFile, offset: u64, len: u64) {
        let mut behind = lock(&h.behind);
        let end = offset + len;
        if offset != behind.next {
            // Not in sequence: start a new sequence here.
            behind.mark = offset;
        }
        behind.next = end;
        if end - behind.mark < WRITE_BEHIND {
            return;
        }
        let layout = self.vol.layout();
        let stored = |at: u64| layout.stored_offset(layout.block_of(at).0) as i64;
        // From the stretch before this one (clean by now, dropped) to the end of this one
        // (whole blocks only: the last may still change).
        let from = stored(behind.mark.saturating_sub(WRITE_BEHIND));
        let to = stored(end);
        behind.mark = end;
        if let Err(e) = start_writeback(&h.file, from, to - from) {
            tracing::debug!(path = %h.path.display(), "write-behind: {e}");
        }
    }

    fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn open_file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn list_dir(&self, ino: u64) -> Result<OpenDir, Errno> {
        let (dir, dir_id) = self.dir(ino)?;
        let parent = if ino == ROOT { ROOT } else { lock(&self.nodes).get(&ino).map(|n| n.parent).unwrap_or(ROOT) };
        let mut entries = vec![
            (OsString::from("."), ino, FileType::Directory, None),
            (OsString::from(".."), parent, FileType::Directory, None),
        ];
        for entry in fs::read_dir(&dir).map_err(|e| errno(&e))? {
            let entry = entry.map_err(|e| errno(&e))?;
            let stored = entry.file_name();
            let Some(name) = self.vol.plain_name(&dir, &dir_id, &stored) else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            let kind = file_type(meta.mode());
            let number = self.number(meta.ino());
            let ino = lock(&self.nodes).id_of(number).unwrap_or(number);
            entries.push((name, ino, kind, Some(stored)));
        }
        Ok(OpenDir { entries })
    }

    /// The attributes of the entry at `path`, now known to the kernel as `stored` in `parent`.
    fn entry_attr(&self, path: &Path, parent: u64, stored: &OsStr, made: Made) -> Result<FileAttr, Errno> {
        let mut attr = self.attr(path)?;
        self.remember(&mut attr, parent, stored, made);
        Ok(attr)
    }

    /// Gives `name` in `parent` to what `make` makes at its backing path: the long-name
    /// side file first (taken back if `make` fails), then the entry's attributes.
    fn make_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        made: Made,
        make: impl FnOnce(&Path) -> Result<(), Errno>,
    ) -> Result<FileAttr, Errno> {
        let (dir, _, stored) = self.child(parent.0, name)?;
        let path = dir.join(&stored.entry);
        self.vol.write_long_name(&dir, &stored).map_err(|e| self.fail(&dir, &e))?;
        if let Err(e) = make(&path) {
            let _ = self.vol.remove_long_name(&dir, &stored);
            return Err(e);
        }
        self.entry_attr(&path, parent.0, &stored.entry, made)
    }

    fn set_times(path: &Path, atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>) -> io::Result<()> {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let spec = |t: Option<TimeOrNow>| match t {
            None => TimeSpec::UTIME_OMIT,
            Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
            Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => TimeSpec::from_duration(d),
                Err(e) => TimeSpec::from_duration(Duration::ZERO) - TimeSpec::from_duration(e.duration()),
            },
        };
        utimensat(None, path, &spec(atime), &spec(mtime), UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
    }

    /// The status document `kmsfs status` reads through the root's `user.kmsfs.status`.
    fn status_json(&self) -> Vec<u8> {
        let stats = self.vol.cache_stats();
        let pool = self.vol.pool_stats();
        serde_json::to_vec_pretty(&serde_json::json!({
            "Backing": self.vol.root(),
            "KeyId": &*self.vol.key_id(),
            "Transport": if self.ring_negotiated() { "io_uring" } else { "/dev/fuse" },
            "RingRequests": self.ring_served.get().map_or(0, |served| served.total()),
            "OpenFiles": lock(&self.files).len(),
            "KnownInodes": lock(&self.nodes).by_id.len(),
            "DataKeyCache": {
                "Entries": stats.entries,
                "Capacity": stats.capacity,
                "Hits": stats.hits,
                "Misses": stats.misses,
                "Evictions": stats.evictions,
                "Revocations": stats.revocations,
            },
            "DataKeyPool": {
                "Ready": pool.ready,
                "Target": pool.target,
                "Hits": pool.hits,
                "Misses": pool.misses,
                "Discarded": pool.discarded,
            },
        }))
        .unwrap_or_default()
    }
}

/// `futimens(2)` times of a setattr request.
fn file_times(atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>) -> fs::FileTimes {
    let at = |t: TimeOrNow| match t {
        TimeOrNow::Now => SystemTime::now(),
        TimeOrNow::SpecificTime(t) => t,
    };
    let mut times = fs::FileTimes::new();
    if let Some(t) = atime {
        times = times.set_accessed(at(t));
    }
    if let Some(t) = mtime {
        times = times.set_modified(at(t));
    }
    times
}

/// Clears a regular file's setuid bit, and its setgid bit where group execution is on
/// (without it, setgid means mandatory locking, which stays), as a write or truncation by
/// someone without CAP_FSETID must. The kernel leaves this to us (FUSE_HANDLE_KILLPRIV_V2):
/// our own write to the backing file, as root, would keep them.
fn drop_suidgid(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    let mode = meta.mode() & 0o7777;
    let group_exec = mode & libc::S_IXGRP != 0;
    let drop = (mode & libc::S_ISUID) | if group_exec { mode & libc::S_ISGID } else { 0 };
    if meta.is_file() && drop != 0 {
        file.set_permissions(fs::Permissions::from_mode(mode & !drop))?;
    }
    Ok(())
}

/// Gives the anonymous (O_TMPFILE) `file` its name `path`. Straight from the descriptor
/// where the kernel allows it (AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, which a root
/// mount has), otherwise through its /proc/self/fd link, which costs a walk of /proc.
fn link_anonymous(file: &File, path: &Path) -> nix::Result<()> {
    use nix::fcntl::AtFlags;
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    match nix::unistd::linkat(Some(fd), Path::new(""), None, path, AtFlags::AT_EMPTY_PATH) {
        Err(nix::errno::Errno::EPERM | nix::errno::Errno::ENOENT) => {
            let fd_path = PathBuf::from(format!("/proc/self/fd/{fd}"));
            nix::unistd::linkat(None, fd_path.as_path(), None, path, AtFlags::AT_SYMLINK_FOLLOW)
        }
        linked => linked,
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    match xattr_answer(size, value) {
        Ok(XattrAnswer::Size(len)) => reply.size(len),
        Ok(XattrAnswer::Value(value)) => reply.data(value),
        Err(e) => reply.error(e),
    }
}

/// Who made a request: the credentials in its FUSE header.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl From<&Request> for Caller {
    fn from(req: &Request) -> Caller {
        Caller { uid: req.uid(), gid: req.gid() }
    }
}

/// An extended attribute's value as a getxattr or listxattr with buffer `size` gets it:
/// its length when asked for the size (0), the value when it fits, ERANGE when not.
pub enum XattrAnswer<'a> {
    Size(u32),
    Value(&'a [u8]),
}

pub fn xattr_answer(size: u32, value: &[u8]) -> Result<XattrAnswer<'_>, Errno> {
    if size == 0 {
        Ok(XattrAnswer::Size(value.len() as u32))
    } else if value.len() > size as usize {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrAnswer::Value(value))
    }
}

/// The file system's operations, one per FUSE request, whichever transport brought it
/// (fuser's /dev/fuse loop below, or the io_uring queues in [`crate::ring`]): each takes
/// the request's arguments and returns what the reply carries.
impl KmsFs {
    pub(crate) fn lookup_op(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let (dir, _, stored) = self.child(parent.0, name)?;
        self.entry_attr(&dir.join(&stored.entry), parent.0, &stored.entry, Made::Found)
    }

    pub(crate) fn forget_op(&self, ino: INodeNo, nlookup: u64) {
        if ino.0 == ROOT {
            return;
        }
        lock(&self.nodes).drop_lookups(ino.0, nlookup);
    }

    pub(crate) fn getattr_op(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        match fh.and_then(|fh| self.open_file(fh).ok()) {
            // Works for open files that were unlinked, too.
            Some(handle) => self.handle_attr(&handle, ino),
            None => match self.path_of(ino.0) {
                Ok(path) => self.attr(&path).map(|attr| FileAttr { ino, ..attr }),
                // fstat(2) of an unlinked open file comes without its handle.
                Err(Errno::ENOENT) => match self.any_handle(ino.0) {
                    Some(handle) => self.handle_attr(&handle, ino),
                    None => Err(Errno::ENOENT),
                },
                Err(e) => Err(e),
            },
        }
    }

    pub(crate) fn setattr_op(&self, ino: INodeNo, changes: &Setattr) -> Result<FileAttr, Errno> {
        let Setattr { mode, uid, gid, size, atime, mtime, fh, kill_suidgid, .. } = *changes;
        let path = match self.path_of(ino.0) {
            Ok(path) => path,
            // Unlinked but still open (ftruncate, fchmod... of a temporary file): work
            // on its descriptor, never on whatever now has its old name.
            Err(Errno::ENOENT) => {
                let h = fh.and_then(|fh| self.open_file(fh).ok()).or_else(|| self.any_handle(ino.0));
                let h = h.ok_or(Errno::ENOENT)?;
                if let Some(size) = size {
                    let _guard = h.lock.write().unwrap_or_else(|p| p.into_inner());
                    self.with_content(&h.path, &h.file, &h.header, |c| c.set_len(size))?;
                    if kill_suidgid {
                        drop_suidgid(&h.file).map_err(|e| errno(&e))?;
                    }
                }
                if let Some(mode) = mode {
                    h.file.set_permissions(fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| errno(&e))?;
                }
                if uid.is_some() || gid.is_some() {
                    std::os::unix::fs::fchown(&h.file, uid, gid).map_err(|e| errno(&e))?;
                }
                if atime.is_some() || mtime.is_some() {
                    h.file.set_times(file_times(atime, mtime)).map_err(|e| errno(&e))?;
                }
                return self.handle_attr(&h, ino);
            }
            Err(e) => return Err(e),
        };
        if let Some(size) = size {
            let handle = fh.and_then(|fh| self.open_file(fh).ok());
            let lock = self.content_lock(ino.0);
            let _guard = lock.write().unwrap_or_else(|p| p.into_inner());
            let opened;
            let (file, header) = match &handle {
                Some(h) => (&h.file, &h.header),
                None => {
                    opened = self.open_backing(&path, true)?;
                    (&opened.0, &opened.1)
                }
            };
            self.with_content(&path, file, header, |c| c.set_len(size))?;
            if kill_suidgid {
                drop_suidgid(file).map_err(|e| errno(&e))?;
            }
        }
        if let Some(mode) = mode {
            let meta = fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
            if !meta.file_type().is_symlink() {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| errno(&e))?;
            }
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid).map_err(|e| errno(&e))?;
        }
        if atime.is_some() || mtime.is_some() {
            Self::set_times(&path, atime, mtime).map_err(|e| errno(&e))?;
        }
        self.attr(&path).map(|attr| FileAttr { ino, ..attr })
    }

    pub(crate) fn readlink_op(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        let path = self.path_of(ino.0)?;
        let stored = fs::read_link(&path).map_err(|e| errno(&e))?;
        self.vol.decrypt_symlink(&stored).map_err(|e| self.fail(&path, &e))
    }

    pub(crate) fn mknod_op(
        &self,
        caller: Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        let perm = mode & !umask & 0o7777;
        self.make_entry(parent, name, Made::New, |path| match mode & libc::S_IFMT {
            libc::S_IFREG => self.create_file(caller, path, perm).map(|_| ()),
            kind @ (libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK) => {
                use nix::sys::stat::{mknod, Mode, SFlag};
                let flag = SFlag::from_bits_truncate(kind);
                mknod(path, flag, Mode::from_bits_truncate(perm), u64::from(rdev))
                    .map_err(|e| Errno::from_i32(e as i32))
                    .map(|()| self.give_to_caller(caller, path, None))
            }
            _ => Err(Errno::EINVAL),
        })
    }

    pub(crate) fn mkdir_op(
        &self,
        caller: Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        self.make_entry(parent, name, Made::New, |path| {
            fs::DirBuilder::new().mode(mode & !umask & 0o7777).create(path).map_err(|e| errno(&e))?;
            if let Err(e) = self.vol.write_new_dir_id(path) {
                let _ = fs::remove_dir(path);
                return Err(self.fail(path, &e));
            }
            self.give_to_caller(caller, path, None);
            Ok(())
        })
    }

    pub(crate) fn unlink_op(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let (dir, _, stored) = self.child(parent.0, name)?;
        let path = dir.join(&stored.entry);
        let ino = self.node_at(&path);
        fs::remove_file(&path).map_err(|e| errno(&e))?;
        self.forget_location(ino, parent.0, &stored.entry);
        self.vol.remove_long_name(&dir, &stored).map_err(|e| self.fail(&dir, &e))
    }

    pub(crate) fn rmdir_op(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let (dir, _, stored) = self.child(parent.0, name)?;
        let path = dir.join(&stored.entry);
        let ino = self.node_at(&path);
        self.vol.remove_dir(&path).map_err(|e| self.fail(&path, &e))?;
        self.forget_location(ino, parent.0, &stored.entry);
        self.vol.remove_long_name(&dir, &stored).map_err(|e| self.fail(&dir, &e))
    }

    pub(crate) fn symlink_op(
        &self,
        caller: Caller,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr, Errno> {
        self.make_entry(parent, link_name, Made::New, |path| {
            let sealed = self.vol.encrypt_symlink(target.as_os_str().as_bytes()).map_err(|e| self.fail(path, &e))?;
            std::os::unix::fs::symlink(&sealed, path).map_err(|e| errno(&e))?;
            self.give_to_caller(caller, path, None);
            Ok(())
        })
    }

    pub(crate) fn rename_op(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        // Something old may move into a new directory (and a new directory's path is
        // what its pending sync goes by).
        self.sync_new_dir_ids()?;
        let (old_dir, _, old) = self.child(parent.0, name)?;
        let (new_dir, _, new) = self.child(newparent.0, newname)?;
        let (old_path, new_path) = (old_dir.join(&old.entry), new_dir.join(&new.entry));
        self.vol.write_long_name(&new_dir, &new).map_err(|e| self.fail(&new_dir, &e))?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let (moved, replaced) = (self.node_at(&old_path), self.node_at(&new_path));
        // A directory replacing one that is empty to its user: the backing target still
        // holds its kmsfs.dirid, so rename(2) there would fail with ENOTEMPTY. Remove the
        // target first (ENOTEMPTY if it really is not empty). Not atomic: a crash in
        // between loses only the empty directory that was being replaced anyway.
        let is_dir = |path: &Path| fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
        if flags.is_empty() && old_path != new_path && is_dir(&old_path) && is_dir(&new_path) {
            self.vol.remove_dir(&new_path).map_err(|e| self.fail(&new_path, &e))?;
        }
        let renamed = if flags.is_empty() {
            fs::rename(&old_path, &new_path).map_err(|e| errno(&e))
        } else {
            let mut nix_flags = nix::fcntl::RenameFlags::empty();
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                nix_flags |= nix::fcntl::RenameFlags::RENAME_NOREPLACE;
            }
            if exchange {
                nix_flags |= nix::fcntl::RenameFlags::RENAME_EXCHANGE;
            }
            nix::fcntl::renameat2(None, &old_path, None, &new_path, nix_flags).map_err(|e| Errno::from_i32(e as i32))
        };
        if let Err(e) = renamed {
            if fs::symlink_metadata(&new_path).is_err() {
                let _ = self.vol.remove_long_name(&new_dir, &new);
            }
            return Err(e);
        }
        if moved == replaced {
            // The same name, or two links of one file: rename(2) did nothing, and
            // both names (with their long-name side files) remain.
            return Ok(());
        }
        if !exchange {
            let _ = self.vol.remove_long_name(&old_dir, &old);
        }
        // The moved objects' nodes now live at their new places; a replaced object
        // (perhaps still reachable through another hard link) lost that name.
        let (from, to) = ((parent.0, old.entry.as_os_str()), (newparent.0, new.entry.as_os_str()));
        let mut nodes = lock(&self.nodes);
        if let Some(node) = moved.and_then(|ino| nodes.get_mut(&ino)) {
            node.move_location(from, to);
        }
        if let Some(node) = replaced.and_then(|ino| nodes.get_mut(&ino)) {
            if exchange {
                node.move_location(to, from);
            } else {
                node.forget_location(to.0, to.1);
            }
        }
        Ok(())
    }

    pub(crate) fn link_op(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Result<FileAttr, Errno> {
        self.sync_new_dir_ids()?; // something old may get a name in a new directory
        let old_path = self.path_of(ino.0)?;
        self.make_entry(newparent, newname, Made::Found, |path| fs::hard_link(&old_path, path).map_err(|e| errno(&e)))
    }

    /// Opens `ino`; the handle's number, which comes back with every request on it.
    pub(crate) fn open_op(&self, ino: INodeNo, flags: OpenFlags) -> Result<u64, Errno> {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        let path = self.path_of(ino.0)?;
        let (file, header) = self.open_backing(&path, write)?;
        let open = OpenFile::new(ino.0, file, header, path, self.content_lock(ino.0));
        let fh = self.new_handle();
        lock(&self.files).insert(fh, Arc::new(open));
        Ok(fh)
    }

    /// Reads up to `size` bytes at `offset` and hands them (or the error) to `answer`,
    /// from a buffer that is wiped afterwards.
    pub(crate) fn read_op(&self, fh: FileHandle, offset: u64, size: u32, answer: impl FnOnce(Result<&[u8], Errno>)) {
        thread_local! {
            /// Each worker thread's read buffer, kept between requests (wiped after each;
            /// its length stays, so that the next request need not zero-fill it again).
            static READ_BUFFER: RefCell<PlainBuf> = RefCell::new(PlainBuf::new());
        }
        READ_BUFFER.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let out = &mut buf[..size as usize];
            let result = self.read_to(fh, offset, out);
            answer(result.map(|n| &out[..n]));
            wipe(out);
        });
    }

    /// Reads up to `out.len()` bytes at `offset` into `out`: how many. A large read is
    /// done on another CPU (see [`crate::helpers`]).
    pub(crate) fn read_to(&self, fh: FileHandle, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
        thread_local! {
            /// Each thread's buffer for the ciphertext its reads read, kept between
            /// requests (it holds nothing secret), so that a read allocates and zero-fills
            /// nothing.
            static CIPHERTEXT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let h = self.open_file(fh)?;
        let large = out.len() >= helpers::LARGE;
        let mut read = || {
            let _guard = h.lock.read().unwrap_or_else(|p| p.into_inner());
            CIPHERTEXT.with_borrow_mut(|ciphertext| {
                self.with_content(&h.path, &h.file, &h.header, |c| c.read_at_to(offset, out, ciphertext))
            })
        };
        if large {
            helpers::elsewhere(read)
        } else {
            read()
        }
    }

    /// Writes `data` at `offset` (a large write is sealed on two CPUs, see
    /// [`Content::write_at`]). With FUSE_WRITE_KILL_SUIDGID (the writer lacks CAP_FSETID),
    /// a setuid or setgid file loses those bits.
    pub(crate) fn write_op(&self, fh: FileHandle, offset: u64, data: &[u8], flags: WriteFlags) -> Result<u32, Errno> {
        let h = self.open_file(fh)?;
        {
            let _guard = h.lock.write().unwrap_or_else(|p| p.into_inner());
            self.with_content(&h.path, &h.file, &h.header, |c| c.write_at(offset, data))?;
        }
        if flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            drop_suidgid(&h.file).map_err(|e| errno(&e))?;
        }
        self.write_behind(&h, offset, data.len() as u64);
        Ok(data.len() as u32)
    }

    pub(crate) fn release_op(&self, fh: FileHandle) {
        lock(&self.files).remove(&fh.0);
    }

    pub(crate) fn fsync_op(&self, fh: FileHandle, datasync: bool) -> Result<(), Errno> {
        self.sync_new_dir_ids()?;
        let h = self.open_file(fh)?;
        if datasync { h.file.sync_data() } else { h.file.sync_all() }.map_err(|e| errno(&e))
    }

    pub(crate) fn opendir_op(&self, ino: INodeNo) -> Result<u64, Errno> {
        let dir = self.list_dir(ino.0)?;
        let fh = self.new_handle();
        lock(&self.dirs).insert(fh, Arc::new(dir));
        Ok(fh)
    }

    /// Lists directory handle `fh` from `offset` into `add`, which says when it is full.
    pub(crate) fn readdir_op(
        &self,
        fh: FileHandle,
        offset: u64,
        mut add: impl FnMut(INodeNo, u64, FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let dir = lock(&self.dirs).get(&fh.0).cloned().ok_or(Errno::EBADF)?;
        for (i, (name, ino, kind, _)) in dir.entries.iter().enumerate().skip(offset as usize) {
            if add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Lists directory handle `fh` from `offset` with each entry's attributes into `add`,
    /// which says when it is full.
    pub(crate) fn readdirplus_op(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut add: impl FnMut(&FileAttr, u64, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let dir = lock(&self.dirs).get(&fh.0).cloned().ok_or(Errno::EBADF)?;
        let dir_path = self.path_of(ino.0)?;
        for (i, (name, entry_ino, _, stored)) in dir.entries.iter().enumerate().skip(offset as usize) {
            let mut attr = match stored {
                Some(stored) => match self.attr(&dir_path.join(stored)) {
                    Ok(attr) => attr,
                    Err(_) => continue, // vanished since opendir
                },
                None => match self.path_of(*entry_ino).and_then(|p| self.attr(&p)) {
                    Ok(mut attr) => {
                        attr.ino = INodeNo(*entry_ino);
                        attr
                    }
                    Err(_) => continue,
                },
            };
            // The kernel counts a lookup for every entry but "." and "..", if it fits.
            if let Some(stored) = stored {
                self.remember(&mut attr, ino.0, stored, Made::Found);
            }
            if add(&attr, i as u64 + 1, name) {
                if stored.is_some() {
                    lock(&self.nodes).drop_lookups(attr.ino.0, 1);
                }
                break;
            }
        }
        Ok(())
    }

    pub(crate) fn releasedir_op(&self, fh: FileHandle) {
        lock(&self.dirs).remove(&fh.0);
    }

    pub(crate) fn fsyncdir_op(&self, ino: INodeNo) -> Result<(), Errno> {
        self.sync_new_dir_ids()?;
        let path = self.path_of(ino.0)?;
        File::open(path).and_then(|d| d.sync_all()).map_err(|e| errno(&e))
    }

    /// The backing file system's figures; names are at most 255 bytes, as the kernel's.
    pub(crate) fn statfs_op(&self) -> Result<crate::ring::abi::Statfs, Errno> {
        let s = nix::sys::statvfs::statvfs(self.vol.root()).map_err(|e| Errno::from_i32(e as i32))?;
        Ok(crate::ring::abi::Statfs {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: s.block_size() as u32,
            namelen: 255,
            frsize: s.fragment_size() as u32,
        })
    }

    pub(crate) fn setxattr_op(&self, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32) -> Result<(), Errno> {
        if name == RELOAD_XATTR && ino.0 == ROOT {
            return self.vol.reload().map(drop).map_err(|e| {
                tracing::error!("cannot follow the rewrapped volume file: {e}");
                Errno::EIO
            });
        }
        let path = self.path_of(ino.0)?;
        let stored = self.vol.xattr_name(name).map_err(|e| self.fail(&path, &e))?;
        let exists = xattr::get(&path, &stored).map_err(|e| errno(&e))?.is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(Errno::NO_XATTR);
        }
        let owner = self.vol.xattr_owner(&path).map_err(|e| self.fail(&path, &e))?;
        let sealed = self.vol.encrypt_xattr(&owner, name, value).map_err(|e| self.fail(&path, &e))?;
        xattr::set(&path, &stored, &sealed).map_err(|e| errno(&e))
    }

    pub(crate) fn getxattr_op(&self, ino: INodeNo, name: &OsStr) -> Result<Vec<u8>, Errno> {
        if name == STATUS_XATTR {
            // Only the root has it; elsewhere it is simply absent, as any unset attribute.
            return if ino.0 == ROOT { Ok(self.status_json()) } else { Err(Errno::NO_XATTR) };
        }
        // Names the volume does not store (the kernel asks for security.capability before
        // every write) are answered before the path is resolved.
        let stored = self.vol.xattr_name(name).map_err(|e| Errno::from_i32(e.errno()))?;
        let path = self.path_of(ino.0)?;
        let sealed = xattr::get(&path, &stored).map_err(|e| errno(&e))?.ok_or(Errno::NO_XATTR)?;
        let owner = self.vol.xattr_owner(&path).map_err(|e| self.fail(&path, &e))?;
        self.vol.decrypt_xattr(&owner, name, &sealed).map_err(|e| self.fail(&path, &e))
    }

    pub(crate) fn listxattr_op(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        let path = self.path_of(ino.0)?;
        let mut out = Vec::new();
        for stored in xattr::list(&path).map_err(|e| errno(&e))? {
            if let Some(name) = self.vol.plain_xattr_name(&stored) {
                out.extend_from_slice(name.as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    pub(crate) fn removexattr_op(&self, ino: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let path = self.path_of(ino.0)?;
        let stored = self.vol.xattr_name(name).map_err(|e| self.fail(&path, &e))?;
        xattr::remove(&path, &stored).map_err(|e| errno(&e))
    }

    pub(crate) fn access_op(&self, ino: INodeNo, mask: AccessFlags) -> Result<(), Errno> {
        // Asked only on mounts without default_permissions, which the mounting user alone
        // enters: the backing entry, with kmsfs's (that user's) rights, has the answer.
        let path = self.path_of(ino.0)?;
        let mode = nix::unistd::AccessFlags::from_bits_truncate(mask.bits());
        nix::unistd::access(&path, mode).map_err(|e| Errno::from_i32(e as i32))
    }

    /// Creates and opens a regular file: its attributes and the handle's number.
    pub(crate) fn create_op(
        &self,
        caller: Caller,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<(FileAttr, u64), Errno> {
        let (dir, _, stored) = self.child(parent.0, name)?;
        let path = dir.join(&stored.entry);
        self.vol.write_long_name(&dir, &stored).map_err(|e| self.fail(&dir, &e))?;
        let (file, header) = match self.create_file(caller, &path, mode & !umask) {
            Ok(created) => created,
            Err(e) => {
                let _ = self.vol.remove_long_name(&dir, &stored);
                return Err(e);
            }
        };
        let mut attr = self.attr_of(&path, &file.metadata().map_err(|e| errno(&e))?)?;
        self.remember(&mut attr, parent.0, &stored.entry, Made::New);
        let open = OpenFile::new(attr.ino.0, file, header, path, self.content_lock(attr.ino.0));
        let fh = self.new_handle();
        lock(&self.files).insert(fh, Arc::new(open));
        Ok((attr, fh))
    }

    pub(crate) fn fallocate_op(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let h = self.open_file(fh)?;
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Ok(());
        }
        let lock = self.content_lock(ino.0);
        let _guard = lock.write().unwrap_or_else(|p| p.into_inner());
        self.with_content(&h.path, &h.file, &h.header, |c| {
            let end = offset.saturating_add(length);
            if end > c.len()? {
                c.set_len(end)?;
            }
            Ok(())
        })
    }
}

/// Answers `reply` with `result`'s value through `ok`, or its error.
macro_rules! answer {
    ($reply:ident, $result:expr, |$v:pat_param| $ok:expr) => {
        match $result {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

/// The filesystem as fuser's session holds it: fuser mounts, negotiates FUSE_INIT and
/// runs the /dev/fuse loop, handing each request to its operation above.
pub struct DevFuse(pub Arc<KmsFs>);

impl std::ops::Deref for DevFuse {
    type Target = KmsFs;

    fn deref(&self) -> &KmsFs {
        &self.0
    }
}

impl Filesystem for DevFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // Lookups and creations in one directory may run in parallel (we lock what needs
        // it); listings come with attributes (one request instead of a lookup per entry);
        // symlink targets, which never change in place, stay in the kernel's cache.
        let mut wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let offered = config.capabilities();
        if self.ring_wanted.load(Ordering::Relaxed) && offered.contains(InitFlags::FUSE_OVER_IO_URING) {
            wanted |= InitFlags::FUSE_OVER_IO_URING;
            self.ring_negotiated.store(true, Ordering::Relaxed);
        }
        let _ = config.add_capabilities(wanted & offered);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        answer!(reply, self.lookup_op(parent, name), |attr| reply.entry(&TTL, &attr, Generation(0)))
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_op(ino, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        answer!(reply, self.getattr_op(ino, fh), |attr| reply.attr(&TTL, &attr))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // fuser does not pass on FATTR_KILL_SUIDGID: as the kernel does when it sets it, a
        // truncation by anyone but root clears setuid and setgid.
        let changes = Setattr { mode, uid, gid, size, atime, mtime, ctime, fh, kill_suidgid: req.uid() != 0 };
        let result = self.setattr_op(ino, &changes);
        answer!(reply, result, |attr| reply.attr(&TTL, &attr))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        answer!(reply, self.readlink_op(ino), |target| reply.data(&target))
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let result = self.mknod_op(req.into(), parent, name, mode, umask, rdev);
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)))
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self.mkdir_op(req.into(), parent, name, mode, umask);
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(reply, self.unlink_op(parent, name), |()| reply.ok())
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(reply, self.rmdir_op(parent, name), |()| reply.ok())
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.symlink_op(req.into(), parent, link_name, target);
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)))
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        answer!(reply, self.rename_op(parent, name, newparent, newname, flags), |()| reply.ok())
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        answer!(reply, self.link_op(ino, newparent, newname), |attr| reply.entry(&TTL, &attr, Generation(0)))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        answer!(reply, self.open_op(ino, flags), |fh| reply.opened(FileHandle(fh), FILE_OPEN_FLAGS))
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_op(fh, offset, size, |result| answer!(reply, result, |data| reply.data(data)));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        answer!(reply, self.write_op(fh, offset, data, write_flags), |n| reply.written(n))
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Writes go straight to the backing file; nothing is buffered here. (Files are
        // opened with FOPEN_NOFLUSH; kernels that ignore it still ask.)
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_op(fh);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        answer!(reply, self.fsync_op(fh, datasync), |()| reply.ok())
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        answer!(reply, self.opendir_op(ino), |fh| reply.opened(FileHandle(fh), FopenFlags::empty()))
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = self.readdir_op(fh, offset, |ino, offset, kind, name| reply.add(ino, offset, kind, name));
        answer!(reply, result, |()| reply.ok())
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let result = self.readdirplus_op(ino, fh, offset, |attr, offset, name| {
            reply.add(attr.ino, offset, name, &TTL, attr, Generation(0))
        });
        answer!(reply, result, |()| reply.ok())
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.releasedir_op(fh);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        answer!(reply, self.fsyncdir_op(ino), |()| reply.ok())
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        answer!(reply, self.statfs_op(), |s| reply
            .statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize))
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        answer!(reply, self.setxattr_op(ino, name, value, flags), |()| reply.ok())
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        answer!(reply, self.getxattr_op(ino, name), |value| reply_xattr(reply, size, &value))
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        answer!(reply, self.listxattr_op(ino), |list| reply_xattr(reply, size, &list))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(reply, self.removexattr_op(ino, name), |()| reply.ok())
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Programs probe every file for a terminal (TCGETS) and the like; no ioctl applies
        // to an encrypted regular file, and saying so quietly keeps the log for real news.
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        answer!(reply, self.access_op(ino, mask), |()| reply.ok())
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        answer!(reply, self.create_op(req.into(), parent, name, mode, umask), |(attr, fh)| reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(fh),
            FILE_OPEN_FLAGS
        ))
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        answer!(reply, self.fallocate_op(ino, fh, offset, length, mode), |()| reply.ok())
    }
}
