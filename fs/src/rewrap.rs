//! `kmsfs rewrap`: moves a volume to the newest key material of its KMS key, or to another
//! KMS key (`--to-key`), in O(files): each file's data key is re-wrapped by the agent
//! (ReEncrypt, under the same encryption context) and the header rewritten in place. No
//! data block is read or written; the data keys, and so the blocks, stay the same.
//!
//! Order, chosen so that a crash (SIGKILL, power cut) at any point leaves a volume that
//! mounts and reads, and a second run finishes the job:
//!
//! 1. The volume file first: its wrapped name key is re-wrapped and `kmsfs.volume`, naming
//!    the destination key (its ARN), replaced atomically (a crash leaves the old file or
//!    the new). From then on every new file is made under the destination key, so once the
//!    walk below is over no file is left behind under the old one, even on a mounted
//!    volume (which is told to re-read the volume file right away, see below). Had the
//!    files gone first, a mount would keep creating files under the old key in directories
//!    already walked. A rerun without `--to-key` continues to the key the file names.
//! 2. Then each regular file's header, whose two slots hold the same header with
//!    sequence numbers n and n+1 (the newer one counts). The new wrapping goes into the
//!    slot holding n, as n+2, which is synced (fdatasync); only then is the other slot,
//!    holding the old wrapping, overwritten too (as n+3), and synced,
//!    so that nothing is left under the old wrapping. A torn write leaves one slot that does
//!    not authenticate, and the reader takes the other, intact one: the file reads at every
//!    moment, under the old wrapping or the new. Both slots are authenticated by the data
//!    key, which ReEncrypt does not return: the header is first unwrapped (Decrypt) and
//!    verified, as a mount opens it.
//!
//! Resuming: a file whose two slots both hold a blob of the destination key at the target
//! material version (a blob names both) is skipped without asking the agent; the target
//! version is that of the name key's new blob. A file left half done (the newer slot
//! already re-wrapped) has its other slot written without another ReEncrypt. The file's
//! access and modification times are put back after its header is written (a crash just
//! then leaves the modification time of the rewrap).
//!
//! A mounted volume: rewrap takes no part of the mount's lock on the backing directory and
//! works beside it. The mount never rewrites an existing file's header, and reads a file's
//! header again from disk whenever its data key is not cached, so it follows a rewrap of
//! files it holds open. After step 1, every mount of the volume (found in
//! `/proc/self/mountinfo` by its backing directory) is told to re-read `kmsfs.volume` by
//! setting [`RELOAD_XATTR`] on its root: it then generates new files' data keys under the
//! destination key, and drops the data keys it cached (which are unwrapped again under the
//! destination key as they are next used, and revoked when that key is disabled). The
//! mount answers the reload only once no file is being given a key and header any more, and
//! drops keys generated under the old key that were still in flight
//! ([`crate::volume::Volume::reload`]): every file made after it is under the destination
//! key, and every file made before it is there for the walk to find.
//!
//! Two rewraps of one volume do not run at once: each holds an exclusive lock on
//! [`LOCK_FILE`] in the backing directory (a reserved name: the mount does not show it).
//!
//! `kmsfs snapshot import` runs the same machinery (`run_with`) on a snapshot received
//! from another host, whose headers may hold data keys encrypted to an RSA key rather than
//! blobs of a KMS key (`Source::Rsa`), and with the times each file is to keep recorded
//! beforehand (`Job::times`).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, IsTerminal};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kmsfs_common::blob::CiphertextBlob;
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::files::write_atomically;
use kmsfs_common::format::header::{self, DataKey, FileHeader, HEADER_SIZE};
use kmsfs_common::format::names;
use kmsfs_common::format::snapshot::RSAES_OAEP_SHA_256;
use kmsfs_common::format::volume::{file_key_context, name_key_context, VolumeConfig, VOLUME_FILE};
use kmsfs_common::ids::KeyId;
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

use crate::keys::AgentPool;
use crate::volume::{agent_error, b64, context_json, unb64, OpenOptions, VolError, Volume, RELOAD_XATTR, STATUS_XATTR};

/// The lock a running rewrap holds, in the backing directory's root.
pub const LOCK_FILE: &str = "kmsfs.rewrap.lock";

/// Files re-wrapped at once by default. Each costs two agent requests, each of which the
/// agent answers after syncing its audit record; it commits the records of concurrent
/// requests together, so many in flight cost little more than one.
pub const DEFAULT_THREADS: usize = 16;

/// Where a volume is moved: the KMS key (its ARN) and the material version ReEncrypt
/// wraps under.
#[derive(Debug, Clone)]
pub struct Target {
    pub key_arn: String,
    key_id: KeyId,
    pub material_version: u32,
}

impl Target {
    /// Whether `blob` (a ciphertext blob) was made by this key at this material version.
    pub(crate) fn made(&self, blob: &[u8]) -> bool {
        CiphertextBlob::parse(blob)
            .is_ok_and(|b| b.key_id == self.key_id && b.material_version == self.material_version)
    }
}

/// What a rewrap did.
#[derive(Debug)]
pub struct Summary {
    pub target: Target,
    /// Whether `kmsfs.volume` was rewritten (it already named the target otherwise).
    pub volume_file_rewritten: bool,
    /// The mounts told to re-read the volume file, and whether each did.
    pub mounts: Vec<(PathBuf, Result<(), String>)>,
    pub files: u64,
    pub rewrapped: u64,
    pub skipped: u64,
    /// One line per file (or directory) that could not be re-wrapped, with its path.
    pub failed: Vec<String>,
    pub elapsed: Duration,
}

/// How the wrapped keys in a volume's headers are opened, and so re-wrapped.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// Ciphertext blobs of KMS keys, opened by Decrypt under the file-key context: every
    /// volume, and a snapshot exported for a KMS key both hosts hold.
    Kms,
    /// Data keys encrypted with RSAES_OAEP_SHA_256 to the RSA KMS key `key_id`, without
    /// encryption context: a snapshot exported with `--public-key`, until it is imported.
    /// Headers already re-wrapped (by an interrupted import) hold blobs of the target key.
    Rsa { key_id: &'a str },
}

/// Moves the volume in `cipherdir` to `to_key` (ID, ARN or alias), or to the newest
/// material of its own key, through the agent at `socket`; `threads` files at once.
/// Files that fail are listed in the summary (and printed as found); the run fails as a
/// whole only if the volume file cannot be moved or the agent goes away.
pub fn run(cipherdir: &Path, socket: Option<&Path>, to_key: Option<&str>, threads: usize) -> Result<Summary, String> {
    crate::snapshot::refuse_unimported(cipherdir)?;
    let job = Job { label: "rewrap", source: Source::Kms, times: None };
    run_with(cipherdir, socket, to_key, threads, &job)
}

/// What a run of [`run_with`] re-wraps, and how it talks about it.
pub(crate) struct Job<'a> {
    /// The command, for messages and the progress line.
    pub label: &'static str,
    pub source: Source<'a>,
    /// The access and modification times each file (by backing path) is to be left
    /// with, recorded before any header was touched: a run killed between a header write
    /// and the times' restoring leaves the time of the write, which a rerun would take
    /// for the file's own. Without them, each file's times as found are put back.
    pub times: Option<&'a HashMap<PathBuf, fs::FileTimes>>,
}

/// [`run`] for `job`: also the second half of `kmsfs snapshot import`.
pub(crate) fn run_with(
    cipherdir: &Path,
    socket: Option<&Path>,
    to_key: Option<&str>,
    threads: usize,
    job: &Job<'_>,
) -> Result<Summary, String> {
    let Job { label, source, .. } = *job;
    let started = Instant::now();
    let client = kmsfs_common::client::AgentClient::connect_or_start(socket).map_err(|e| e.to_string())?;
    let options = OpenOptions { cache_capacity: std::num::NonZeroUsize::MIN, ..OpenOptions::default() };
    let volume = Volume::open(cipherdir, AgentPool::new(client.socket_path()), options)?;
    let _only_rewrap = lock(volume.root())?;
    let destination = to_key.unwrap_or(&volume.config().key_id).to_string();
    let (target, volume_file_rewritten) = rewrap_volume_file(&volume, &destination)?;
    let mounts =
        mounts_of(volume.root()).into_iter().map(|mnt| (mnt.clone(), tell_mount(&mnt, &target.key_arn))).collect();

    let progress = Progress::new(std::io::stderr().is_terminal());
    let (files, mut failed) = walk(&volume);
    let run = Run {
        volume: &volume,
        target: &target,
        job,
        files: &files,
        next: AtomicUsize::new(0),
        rewrapped: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        failed: Mutex::new(Vec::new()),
        fatal: Mutex::new(None),
        stop: AtomicBool::new(false),
        progress: &progress,
    };
    // The bar from the start, however short the run.
    progress.show(label, 0, files.len() as u64, None);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(|| run.work())).collect();
        while !workers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            progress.show(label, run.done(), files.len() as u64, None);
        }
    });
    progress.clear();
    if let Some(fatal) = run.fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let again = match source {
            Source::Kms if label == "rewrap" => "the volume is usable as it is, and running kmsfs rewrap again",
            _ => "running the same command again",
        };
        return Err(format!("{fatal}; {again} finishes the job"));
    }
    failed.extend(run.failed.into_inner().unwrap_or_else(|p| p.into_inner()));
    failed.sort();
    let (rewrapped, skipped) = (run.rewrapped.into_inner(), run.skipped.into_inner());
    Ok(Summary {
        target,
        volume_file_rewritten,
        mounts,
        files: files.len() as u64,
        rewrapped,
        skipped,
        failed,
        elapsed: started.elapsed(),
    })
}

pub(crate) fn lock(root: &Path) -> Result<Flock<File>, String> {
    let path = root.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        nix::errno::Errno::EWOULDBLOCK => format!("another kmsfs rewrap of {} is running", root.display()),
        e => format!("cannot lock {}: {e}", path.display()),
    })
}

/// ReEncrypt of `blob`, wrapped as `source` says (under `context` for a KMS key), to
/// `destination` under `context`: the new blob and the ARN of the key that made it. The
/// plaintext never leaves the agent.
pub(crate) fn reencrypt(
    agent: &AgentPool,
    blob: &[u8],
    source: Source<'_>,
    context: &EncryptionContext,
    destination: &str,
) -> Result<(Vec<u8>, String), VolError> {
    let context = context_json(context);
    let mut request = json!({
        "CiphertextBlob": b64(blob),
        "DestinationKeyId": destination,
        "DestinationEncryptionContext": context,
    });
    match source {
        Source::Kms => request["SourceEncryptionContext"] = context,
        Source::Rsa { key_id } => {
            request["SourceKeyId"] = json!(key_id);
            request["SourceEncryptionAlgorithm"] = json!(RSAES_OAEP_SHA_256);
        }
    }
    let answer = agent.call("ReEncrypt", &request).map_err(agent_error)?;
    let new = unb64(&answer["CiphertextBlob"])?.to_vec();
    let arn = answer["KeyId"].as_str().unwrap_or(destination).to_string();
    Ok((new, arn))
}

/// Step 1: the name key re-wrapped for `destination`, and `kmsfs.volume` replaced unless
/// it already names the target. The target is learnt from the name key's new blob.
fn rewrap_volume_file(volume: &Volume, destination: &str) -> Result<(Target, bool), String> {
    let config = volume.config();
    let context = name_key_context(&config.volume_id);
    let (wrapped, key_arn) = reencrypt(volume.agent(), &config.wrapped_name_key, Source::Kms, &context, destination)
        .map_err(|e| format!("cannot re-wrap the volume's name key for {destination}: {e}"))?;
    let blob = CiphertextBlob::parse(&wrapped).map_err(|e| format!("the agent's ReEncrypt answer: {e:?}"))?;
    let target = Target { key_arn, key_id: blob.key_id, material_version: blob.material_version };
    if target.made(&config.wrapped_name_key) && config.key_id == target.key_arn {
        return Ok((target, false));
    }
    let moved = VolumeConfig { key_id: target.key_arn.clone(), wrapped_name_key: wrapped, ..config.clone() };
    let path = volume.root().join(VOLUME_FILE);
    write_atomically(&path, moved.to_json().as_bytes(), 0o444)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok((target, true))
}

/// The mount points of kmsfs mounts of the backing directory `root` (canonical).
fn mounts_of(root: &Path) -> Vec<PathBuf> {
    kmsfs_mounts().into_iter().filter(|(source, _)| source == root).map(|(_, mountpoint)| mountpoint).collect()
}

/// Every kmsfs mount this process can see, as (backing directory, mount point), from
/// `/proc/self/mountinfo`: a kmsfs mount's source is its backing directory, and its type
/// `fuse.kmsfs` (or plain `fuse`, as the kernel shows a mount made without fusermount).
pub fn kmsfs_mounts() -> Vec<(PathBuf, PathBuf)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fs = fs.split(' ');
            let (fstype, source) = (fs.next()?, fs.next()?);
            let mountpoint = mount.split(' ').nth(4)?;
            matches!(fstype, "fuse.kmsfs" | "fuse").then(|| {
                let path = |field: &str| PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(field)));
                (path(source), path(mountpoint))
            })
        })
        .collect()
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// Has the mount at `mountpoint` re-read `kmsfs.volume` ([`Volume::reload`]), once its
/// status attribute shows it is a kmsfs mount, and checks that its status then names
/// `key_arn` (a kmsfs too old to know the reload attribute would keep it as a plain one).
fn tell_mount(mountpoint: &Path, key_arn: &str) -> Result<(), String> {
    match xattr::get(mountpoint, STATUS_XATTR) {
        Ok(Some(_)) => xattr::set(mountpoint, RELOAD_XATTR, b"").map_err(|e| e.to_string())?,
        Ok(None) => return Err("not a kmsfs mount".into()),
        Err(e) => return Err(e.to_string()),
    }
    let status = xattr::get(mountpoint, STATUS_XATTR).map_err(|e| e.to_string())?.unwrap_or_default();
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap_or_default();
    match status["KeyId"].as_str() {
        Some(key) if key == key_arn => Ok(()),
        other => Err(format!(
            "it still makes new files under {} (a kmsfs without rewrap support? remount it)",
            other.unwrap_or("an unknown key")
        )),
    }
}

/// A regular file of the volume.
struct Item {
    backing: PathBuf,
    /// Its path in the mounted volume, as far as its names decrypt (for messages).
    shown: PathBuf,
}

/// Every regular file of the volume, once per inode, and the directories that could not
/// be listed. The format's own files (`kmsfs.volume`, directory IDs, long-name side
/// files, the rewrap lock, and temporaries of atomic writes) are left out.
fn walk(volume: &Volume) -> (Vec<Item>, Vec<String>) {
    let (mut files, mut problems, mut linked) = (Vec::new(), Vec::new(), HashSet::new());
    let mut todo = vec![(volume.root().to_path_buf(), Some(volume.root_dir_id()), PathBuf::from("/"))];
    while let Some((dir, dir_id, shown_dir)) = todo.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                problems.push(format!("{}: cannot read directory: {e}", shown_dir.display()));
                continue;
            }
        };
        for entry in entries.filter_map(Result::ok) {
            let stored = entry.file_name();
            let text = stored.to_string_lossy();
            if names::is_reserved_name(&text) || is_temporary(&text) {
                continue;
            }
            let plain = dir_id.and_then(|id| volume.plain_name(&dir, &id, &stored));
            let shown = shown_dir.join(plain.unwrap_or_else(|| stored.clone()));
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                let id = volume.read_dir_id(&path).ok();
                todo.push((path, id, shown));
            } else if meta.is_file() && (meta.nlink() == 1 || linked.insert(meta.ino())) {
                files.push(Item { backing: path, shown });
            }
        }
    }
    (files, problems)
}

/// A temporary of [`write_atomically`] for one of the format's files:
/// `.kmsfs.<name>.tmp<pid>`.
pub(crate) fn is_temporary(name: &str) -> bool {
    name.strip_prefix(".")
        .filter(|rest| rest.starts_with(names::RESERVED_PREFIX))
        .and_then(|rest| rest.rsplit_once(".tmp"))
        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The work of step 2, shared by the worker threads.
struct Run<'a> {
    volume: &'a Volume,
    target: &'a Target,
    job: &'a Job<'a>,
    files: &'a [Item],
    next: AtomicUsize,
    rewrapped: AtomicU64,
    skipped: AtomicU64,
    failed: Mutex<Vec<String>>,
    /// Why the run stopped early (the agent went away).
    fatal: Mutex<Option<String>>,
    stop: AtomicBool,
    progress: &'a Progress,
}

enum Outcome {
    Rewrapped,
    Skipped,
    /// Removed since the walk.
    Gone,
}

impl Run<'_> {
    fn done(&self) -> u64 {
        self.rewrapped.load(Ordering::Relaxed) + self.skipped.load(Ordering::Relaxed)
    }

    fn work(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let Some(item) = self.files.get(self.next.fetch_add(1, Ordering::Relaxed)) else { return };
            match rewrap_file(self.volume, self.target, self.job, &item.backing) {
                Ok(Outcome::Rewrapped) => _ = self.rewrapped.fetch_add(1, Ordering::Relaxed),
                Ok(Outcome::Skipped | Outcome::Gone) => _ = self.skipped.fetch_add(1, Ordering::Relaxed),
                Err(Failure::AgentGone(e)) => {
                    self.stop.store(true, Ordering::Relaxed);
                    self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.to_string());
                }
                Err(Failure::File(e)) => {
                    let message = format!("{} (backing file {}): {e}", item.shown.display(), item.backing.display());
                    self.progress.print(&format!("kmsfs {}: {message}", self.job.label));
                    self.failed.lock().unwrap_or_else(|p| p.into_inner()).push(message);
                }
            }
        }
    }
}

/// Why a file was not re-wrapped.
pub(crate) enum Failure {
    /// The agent is unreachable: the whole run stops.
    AgentGone(VolError),
    /// This file only: what was being done, and what went wrong.
    File(String),
}

impl Failure {
    /// Makes `error`, met while `doing`, a failure.
    pub(crate) fn of(doing: &'static str) -> impl Fn(VolError) -> Failure {
        move |error| match error {
            VolError::Unreachable(_) => Failure::AgentGone(error),
            other => Failure::File(format!("{doing}: {other}")),
        }
    }
}

/// Step 2 for one file (see the module's documentation).
fn rewrap_file(volume: &Volume, target: &Target, job: &Job<'_>, path: &Path) -> Result<Outcome, Failure> {
    let source = job.source;
    let io = |doing| move |e: io::Error| Failure::File(format!("{doing}: {e}"));
    let file = match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Gone),
        Err(e) => return Err(io("cannot open it")(e)),
    };
    let meta = file.metadata().map_err(io("cannot stat it"))?;
    let mut bytes = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut bytes, 0).map_err(io("cannot read its header"))?;
    let bad_header = Failure::of("its header does not open");
    let slots = header::parse_slots(&bytes).map_err(|error| bad_header(VolError::Corrupt { what: "header", error }))?;
    if slots.len() == 2 && slots.iter().all(|slot| target.made(slot.wrapped_key())) {
        // Done before; but a run killed after its header and before its times (below) left
        // the rewrite's mtime, so times recorded for the file (an import's) go back on.
        if let Some(times) = job.times.and_then(|times| times.get(path)) {
            file.set_times(*times).map_err(io("cannot put its times back"))?;
        }
        return Ok(Outcome::Skipped);
    }
    let (current, data_key) = match source {
        Source::Kms => volume.open_file_keys(&file).map(|(header, keys)| (header, keys.data.clone())),
        Source::Rsa { key_id } => crate::snapshot::open_imported_header(volume, target, key_id, &bytes),
    }
    .map_err(bad_header)?;
    let wrapped = if target.made(current.wrapped_key()) {
        current.wrapped_key().to_vec() // a run killed between the two slots
    } else {
        let context = file_key_context(&volume.config().volume_id, &current.file_id());
        reencrypt(volume.agent(), current.wrapped_key(), source, &context, &target.key_arn)
            .map_err(Failure::of("ReEncrypt of its data key"))?
            .0
    };
    let corrupt = |error| Failure::File(format!("cannot make its new header: {error}"));
    let first = current.rewrapped(wrapped.clone()).map_err(corrupt)?;
    write_slot(&file, &first, &data_key).map_err(io("cannot write its header"))?;
    let second = first.rewrapped(wrapped).map_err(corrupt)?;
    write_slot(&file, &second, &data_key).map_err(io("cannot write its header"))?;
    let times = match job.times.and_then(|times| times.get(path)) {
        Some(times) => *times,
        None => fs::FileTimes::new()
            .set_accessed(meta.accessed().map_err(io("atime"))?)
            .set_modified(meta.modified().map_err(io("mtime"))?),
    };
    file.set_times(times).map_err(io("cannot put its times back"))?;
    Ok(Outcome::Rewrapped)
}

/// Writes `header` into its slot and waits until it is on disk.
fn write_slot(file: &File, header: &FileHeader, data_key: &DataKey) -> io::Result<()> {
    file.write_all_at(&header.encode_slot(data_key), header.slot_offset())?;
    file.sync_data()
}

/// The progress bar of a long run, drawn by indicatif on stderr when it is a terminal (and
/// nothing otherwise, so that pipes and logs get only the summary). The bar appears at the
/// first [`Progress::show`], so that its clock (rate, ETA) starts when the work does.
pub(crate) struct Progress {
    on: bool,
    bar: OnceLock<ProgressBar>,
}

impl Progress {
    pub(crate) fn new(on: bool) -> Progress {
        Progress { on, bar: OnceLock::new() }
    }

    /// `label`: `done` files of `total`; with `bytes` (done, total), the bar, rate and ETA go
    /// by bytes and the files are counted beside them.
    pub(crate) fn show(&self, label: &'static str, done: u64, total: u64, bytes: Option<(u64, u64)>) {
        if !self.on {
            return;
        }
        let bar = self.bar.get_or_init(|| new_bar(label, bytes.is_some()));
        match bytes {
            Some((done_bytes, total_bytes)) => {
                bar.set_length(total_bytes);
                bar.set_position(done_bytes);
                bar.set_message(format!("{done}/{total} files"));
            }
            None => {
                bar.set_length(total);
                bar.set_position(done);
            }
        }
    }

    /// Runs `write` (which prints a line) with the bar out of the way, then draws it again.
    pub(crate) fn suspend<R>(&self, write: impl FnOnce() -> R) -> R {
        match self.bar.get() {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    /// Prints a line to stderr above the bar.
    pub(crate) fn print(&self, line: &str) {
        self.suspend(|| eprintln!("{line}"));
    }

    /// Removes the bar, for the summary that follows.
    pub(crate) fn clear(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}

/// A bar for `label`, counting bytes or files.
fn new_bar(label: &'static str, by_bytes: bool) -> ProgressBar {
    let template = if by_bytes {
        "{prefix} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, {msg}, ETA {eta}"
    } else {
        "{prefix} [{wide_bar}] {pos}/{len} files, ETA {eta}"
    };
    let style = ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(style.progress_chars("=> "));
    bar.set_prefix(label);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_unescape() {
        assert_eq!(unescape_mountinfo(r"/srv/my\040data\134x"), b"/srv/my data\\x");
        assert_eq!(unescape_mountinfo(r"/a\04"), b"/a\\04");
    }

    #[test]
    fn temporaries_of_the_formats_files_are_recognised() {
        assert!(is_temporary(".kmsfs.volume.tmp1234"));
        assert!(is_temporary(".kmsfs.long.abc.name.tmp7"));
        assert!(!is_temporary(".kmsfs.volume.tmp"));
        assert!(!is_temporary(".bashrc.tmp12"));
        assert!(!is_temporary("kmsfs.volume"));
    }
}
