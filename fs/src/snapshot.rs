//! `kmsfs snapshot`: moves a volume to another host without re-encrypting its data, as AWS
//! copies an encrypted snapshot between accounts.
//!
//! **Export** (`kmsfs snapshot export VOLUME DEST --to-key KEY [--public-key FILE]`) reads the
//! backing directory VOLUME and writes DEST: the same tree — encrypted names, directory IDs,
//! long-name side files, symlinks, encrypted xattrs, special files, hard links, holes, modes,
//! owners and times — with every regular file's blocks copied byte for byte past its header,
//! and every header (both slots) and the name key wrapped anew for a key the receiver holds:
//!
//! - `--to-key KEY` alone: the sender's agent ReEncrypts each wrapped key to KEY under the
//!   same encryption context (KEY: a key both hosts hold, such as a multi-Region key whose
//!   replica on the receiving host has the same ID and material);
//! - with `--public-key FILE` (the receiver's RSA public key, as `kmsctl get-public-key`
//!   gives it, KEY being that key's ARN on the receiver): kmsfs itself encrypts each data key
//!   and the name key with RSAES_OAEP_SHA_256, as the receiver's Decrypt takes them.
//!
//! A header slot's MAC is keyed by the file's data key, so each header is opened (Decrypt,
//! verified) on the sender before its new one is written. The sender never needs the
//! receiver's agent; the receiver never sees the sender's key. The volume keeps its ID, so
//! the encryption contexts stay valid.
//!
//! Crash safety and resuming. The manifest `kmsfs.snapshot` ([`SnapshotManifest`]) is
//! written first, saying `exporting`; each file is written under a temporary name and
//! renamed into place whole; every few seconds the copies made since are synced (syncfs)
//! and only then recorded in the journal `kmsfs.snapshot.journal` (source inode, change
//! time and size per destination path); `kmsfs.volume` and the manifest saying `complete`
//! come last. An interrupted export is therefore never taken for a complete one (mount and
//! import refuse it), and the same command run again finishes it: a file whose journal
//! entry matches its source as it is now is kept, anything else is copied again, entries
//! gone from the source are removed. `--update` does the same to a complete snapshot
//! (incremental export: only what changed since is copied). An export holds an exclusive
//! lock on DEST.
//!
//! A volume written to during the export. Each file is copied from one open, its change
//! time (ctime) taken before the first byte is read; directories' times are taken before
//! they are listed. At the end everything is looked at again: an entry whose ctime changed
//! (any write, truncation, rename, link, chmod, xattr change, or a header rewrap), or a
//! directory whose listing changed, is reported by name, and the snapshot stays
//! `exporting` (exit status 1). Run the export when nothing writes to the volume (unmounted,
//! or mounted and idle), or run it again once it is quiet: only what changed is copied
//! again. Changes closer together than the backing filesystem's timestamp resolution can
//! escape this check.
//!
//! **Import** (`kmsfs snapshot import DEST --key KEY`, on the receiver) re-wraps every header
//! and the name key under the receiver's own KMS key with the crash-safe two-slot machinery
//! of `kmsfs rewrap` (`rewrap::run_with`): ReEncrypt for a snapshot wrapped by a KMS
//! key; for an RSA one, Decrypt with the RSA key (to verify the header and MAC its new slots;
//! the plaintext stays in zeroizing memory) and ReEncrypt from the RSA key to KEY under the
//! file-key context (so the plaintext never goes back over the socket). Each file's times as
//! exported are recorded first (`kmsfs.snapshot.times`), so that a file re-wrapped just
//! before a kill still gets them back. Interrupted, the import is resumed by running it
//! again. Then the journal, the times and the manifest go, and the volume mounts.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use base64::Engine as _;
use kmsfs_common::blob::CiphertextBlob;
use kmsfs_common::client::{AgentClient, SecretBytes};
use kmsfs_common::files::write_atomically;
use kmsfs_common::format::header::{self, DataKey, FileHeader, UnverifiedSlot, HEADER_SIZE, MAX_WRAPPED_KEY_LEN};
use kmsfs_common::format::names;
use kmsfs_common::format::snapshot::{
    SnapshotCounts, SnapshotManifest, SnapshotState, SnapshotWrapping, JOURNAL_FILE, MANIFEST_FILE, MAX_MANIFEST_LEN,
    RSAES_OAEP_SHA_256, TEMPORARY_PREFIX, TIMES_FILE,
};
use kmsfs_common::format::volume::{file_key_context, name_key_context, VolumeConfig, VOLUME_FILE};
use kmsfs_common::format::FormatError;
use kmsfs_common::ErrorKind;
use nix::errno::Errno;
use nix::sys::stat::{SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::Whence;
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use crate::keys::AgentPool;
use crate::rewrap::{self, Failure, Progress, Source, Target};
use crate::volume::{agent_error, b64, context_json, unb64, OpenOptions, VolError, Volume};

/// Files copied at once by default: each costs one or two agent requests and its I/O.
pub const DEFAULT_THREADS: usize = 16;

/// How often by default the copies made so far are synced and recorded in the journal.
pub const DEFAULT_CHECKPOINT: Duration = Duration::from_secs(2);

// ---- the receiver's public key ----

/// The receiver's RSA public key, to which data keys are encrypted with RSAES_OAEP_SHA_256.
pub struct RecipientKey {
    key: OaepPublicEncryptingKey,
    /// SHA-256 of its DER SubjectPublicKeyInfo, recorded in the manifest.
    sha256: [u8; 32],
}

impl RecipientKey {
    /// Reads `path`: a DER SubjectPublicKeyInfo, or its PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_file(path: &Path) -> Result<RecipientKey, String> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|f| f.take(64 * 1024).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read the public key {}: {e}", path.display()))?;
        RecipientKey::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(bytes: &[u8]) -> Result<RecipientKey, String> {
        let der = match bytes.windows(11).position(|w| w == b"-----BEGIN ") {
            Some(_) => pem_public_key(bytes)?,
            None => bytes.to_vec(),
        };
        let not_rsa = "not an RSA public key: expected the DER SubjectPublicKeyInfo or PEM (PUBLIC KEY) of an RSA \
                       key with KeyUsage ENCRYPT_DECRYPT, as kmsctl get-public-key gives it";
        let public = PublicEncryptingKey::from_der(&der).map_err(|_| not_rsa.to_string())?;
        let key = OaepPublicEncryptingKey::new(public).map_err(|_| not_rsa.to_string())?;
        if key.ciphertext_size() > MAX_WRAPPED_KEY_LEN {
            return Err(format!(
                "an RSA key of {} bits (RSA_4096?) makes RSAES_OAEP ciphertexts of {} bytes, more than the {} a file \
                 header holds for a wrapped key: use an RSA_2048 or RSA_3072 key on the receiving host, or a key both \
                 hosts hold (a multi-Region key) with --to-key alone",
                key.key_size_bits(),
                key.ciphertext_size(),
                MAX_WRAPPED_KEY_LEN
            ));
        }
        if key.max_plaintext_size(&OAEP_SHA256_MGF1SHA256) < DataKey::LEN {
            return Err(format!("an RSA key of {} bits is too small for RSAES_OAEP_SHA_256", key.key_size_bits()));
        }
        let sha256 = digest::digest(&digest::SHA256, &der).as_ref().try_into().map_err(|_| "SHA-256".to_string())?;
        Ok(RecipientKey { key, sha256 })
    }

    /// `plaintext` (a 32-byte key) encrypted with RSAES_OAEP_SHA_256.
    fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; self.key.ciphertext_size()];
        let len = self
            .key
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, None)
            .map_err(|_| "RSAES_OAEP_SHA_256 encryption failed".to_string())?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

/// The DER inside a PEM `PUBLIC KEY` block.
fn pem_public_key(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "a PEM file that is not text".to_string())?;
    let begin = "-----BEGIN PUBLIC KEY-----";
    let Some(start) = text.find(begin) else {
        return Err("not a PEM PUBLIC KEY block (an RSA PUBLIC KEY or certificate is not taken: give the \
                    SubjectPublicKeyInfo, as kmsctl get-public-key --output pem prints it)"
            .into());
    };
    let body = &text[start + begin.len()..];
    let end = body.find("-----END PUBLIC KEY-----").ok_or("a PEM PUBLIC KEY block without its END line")?;
    let base64: String = body[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(base64).map_err(|_| "a PEM block that is not base64".to_string())
}

// ---- the manifest ----

/// `root`'s manifest, if it has one.
fn read_manifest(root: &Path) -> Result<Option<SnapshotManifest>, String> {
    let path = root.join(MANIFEST_FILE);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(file) => file.take(MAX_MANIFEST_LEN as u64 + 1).read_to_end(&mut bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => Err(e),
    }
    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    SnapshotManifest::parse(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_manifest(root: &Path, manifest: &SnapshotManifest) -> Result<(), String> {
    let path = root.join(MANIFEST_FILE);
    write_atomically(&path, manifest.to_json().as_bytes(), 0o444)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// How a manifest describes the snapshot's wrapping, for messages.
fn describe(manifest: &SnapshotManifest) -> String {
    match manifest.wrapping {
        SnapshotWrapping::Kms => format!("the KMS key {}", manifest.key_id),
        SnapshotWrapping::RsaesOaepSha256 { .. } => {
            format!("the RSA key {} (RSAES_OAEP_SHA_256)", manifest.key_id)
        }
    }
}

/// Refuses to mount or rewrap a backing directory that is a snapshot not yet imported
/// (or an unfinished export): its keys are not wrapped as a volume's are.
pub fn refuse_unimported(cipherdir: &Path) -> Result<(), String> {
    let manifest = match read_manifest(cipherdir) {
        Ok(None) => return Ok(()),
        Ok(Some(manifest)) => manifest,
        Err(e) => return Err(format!("{e}; {} is a kmsfs snapshot, not a volume", cipherdir.display())),
    };
    Err(match manifest.state {
        SnapshotState::Exporting => format!(
            "{} is an unfinished snapshot export ({MANIFEST_FILE} says \"exporting\"): run the same kmsfs snapshot \
             export again to finish it, then kmsfs snapshot import",
            cipherdir.display()
        ),
        SnapshotState::Complete => format!(
            "{} is a snapshot not imported yet (its keys are wrapped for {}): run kmsfs snapshot import {} --key KEY \
             on this host first",
            cipherdir.display(),
            describe(&manifest),
            cipherdir.display()
        ),
    })
}

// ---- agent calls ----

/// The agent's answer to Decrypt, its plaintext never in a `serde_json::Value`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Decrypted {
    plaintext: SecretBytes,
}

fn decrypt(agent: &AgentPool, request: &serde_json::Value) -> Result<Zeroizing<Vec<u8>>, VolError> {
    let answer: Decrypted = agent.call_secret("Decrypt", request).map_err(agent_error)?;
    Ok(answer.plaintext.0)
}

/// Decrypt of a KMS key's blob under `context`.
fn decrypt_kms(
    agent: &AgentPool,
    blob: &[u8],
    context: &kmsfs_common::context::EncryptionContext,
) -> Result<Zeroizing<Vec<u8>>, VolError> {
    decrypt(agent, &json!({"CiphertextBlob": b64(blob), "EncryptionContext": context_json(context)}))
}

/// Decrypt of an RSAES_OAEP_SHA_256 ciphertext by the RSA KMS key `key_id`.
fn decrypt_rsa(agent: &AgentPool, ciphertext: &[u8], key_id: &str) -> Result<Zeroizing<Vec<u8>>, VolError> {
    decrypt(
        agent,
        &json!({"CiphertextBlob": b64(ciphertext), "KeyId": key_id, "EncryptionAlgorithm": RSAES_OAEP_SHA_256}),
    )
}

/// The header in `bytes`: the newest slot whose key `unwrap` opens and whose MAC verifies
/// under it, that key, and its bytes (zeroizing). An unreachable agent ends the search.
fn open_slots(
    bytes: &[u8; HEADER_SIZE],
    unwrap: impl Fn(&UnverifiedSlot) -> Result<Zeroizing<Vec<u8>>, VolError>,
) -> Result<(FileHeader, DataKey, Zeroizing<Vec<u8>>), VolError> {
    let slots = header::parse_slots(bytes).map_err(|error| VolError::Corrupt { what: "header", error })?;
    let mut last_error = None;
    for slot in &slots {
        let plaintext = match unwrap(slot) {
            Ok(plaintext) => plaintext,
            Err(e @ (VolError::Unreachable(_) | VolError::Io(_))) => return Err(e),
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let key = DataKey::from_bytes(&plaintext).map_err(|error| VolError::Corrupt { what: "data key", error })?;
        match slot.verify(&key) {
            Ok(header) => return Ok((header, key, plaintext)),
            Err(error) => last_error = Some(VolError::Corrupt { what: "header", error }),
        }
    }
    Err(last_error
        .unwrap_or(VolError::Corrupt { what: "header", error: FormatError::Malformed { what: "no valid slot" } }))
}

/// The header of a file of a snapshot being imported that was wrapped with RSAES_OAEP_SHA_256
/// to `rsa_key_id`, and its data key: a slot already re-wrapped (a blob of `target`) is
/// opened as a volume's, any other as an RSA ciphertext.
pub(crate) fn open_imported_header(
    volume: &Volume,
    target: &Target,
    rsa_key_id: &str,
    bytes: &[u8; HEADER_SIZE],
) -> Result<(FileHeader, DataKey), VolError> {
    let volume_id = volume.config().volume_id;
    let (header, key, _) = open_slots(bytes, |slot| {
        if target.made(slot.wrapped_key()) {
            decrypt_kms(volume.agent(), slot.wrapped_key(), &file_key_context(&volume_id, &slot.file_id()))
        } else {
            decrypt_rsa(volume.agent(), slot.wrapped_key(), rsa_key_id)
        }
    })?;
    Ok((header, key))
}

// ---- export ----

/// What `kmsfs snapshot export` is asked to do.
pub struct ExportArgs<'a> {
    pub volume: &'a Path,
    pub dest: &'a Path,
    /// The key the snapshot is wrapped for: a KMS key both hosts hold, or with
    /// `public_key`, the receiver's RSA key (its ARN there).
    pub to_key: &'a str,
    pub public_key: Option<&'a Path>,
    pub socket: Option<&'a Path>,
    pub threads: usize,
    /// Bring a complete snapshot in `dest` up to date instead of refusing it.
    pub update: bool,
    /// How often the copies made so far are synced and recorded in the journal: what a
    /// rerun after a crash need not copy again.
    pub checkpoint: Duration,
}

/// What an export did.
#[derive(Debug)]
pub struct ExportSummary {
    /// The manifest as written: `complete` unless something failed or changed.
    pub manifest: SnapshotManifest,
    /// Files copied by this run, and their bytes.
    pub copied: u64,
    pub copied_bytes: u64,
    /// Files already in DEST from an earlier run, unchanged since.
    pub kept: u64,
    /// One line per entry that could not be copied, with its path.
    pub failed: Vec<String>,
    /// Entries of the source that changed during the export.
    pub changed: Vec<String>,
    pub elapsed: Duration,
}

impl ExportSummary {
    pub fn is_complete(&self) -> bool {
        self.manifest.state == SnapshotState::Complete
    }
}

/// What DEST holds before the export.
enum DestState {
    /// Nothing: a new directory is made.
    Missing,
    Empty,
    /// A snapshot: being exported (to resume) or complete (to update).
    Snapshot(SnapshotManifest),
}

fn inspect_dest(dest: &Path, source_root: &Path, update: bool) -> Result<DestState, String> {
    let shown = dest.display();
    let meta = match fs::metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let parent = fs::canonicalize(parent).map_err(|e| format!("cannot create {shown}: {e}"))?;
            if parent.starts_with(source_root) {
                return Err(format!(
                    "{shown} is inside the volume {}: choose a DEST outside it",
                    source_root.display()
                ));
            }
            return Ok(DestState::Missing);
        }
        Err(e) => return Err(format!("cannot look at {shown}: {e}")),
        Ok(meta) => meta,
    };
    if !meta.is_dir() {
        return Err(format!("{shown} exists and is not a directory: DEST must be a new or empty directory"));
    }
    let canonical = fs::canonicalize(dest).map_err(|e| format!("cannot open {shown}: {e}"))?;
    if canonical.starts_with(source_root) || source_root.starts_with(&canonical) {
        return Err(format!("{shown} and the volume {} overlap: choose a DEST outside it", source_root.display()));
    }
    if let Some(manifest) = read_manifest(&canonical)? {
        if manifest.state == SnapshotState::Complete && !update {
            return Err(format!(
                "{shown} already holds a complete snapshot of volume {} for {} (finished {}): pass --update to bring \
                 it up to date (only what changed is copied), or choose a new DEST",
                manifest.volume_id.to_hex(),
                describe(&manifest),
                manifest.finished.as_deref().unwrap_or("?")
            ));
        }
        return Ok(DestState::Snapshot(manifest));
    }
    let mut entries = fs::read_dir(&canonical).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if entries.next().is_some() {
        return Err(format!(
            "{shown} is not empty: kmsfs snapshot export writes into a new or empty directory (or finishes an \
             unfinished export there)"
        ));
    }
    Ok(DestState::Empty)
}

fn validate_key_arg(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 2048 || key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{key:?} is not a key ID, ARN or alias"));
    }
    Ok(())
}

/// An exclusive lock on DEST (the directory itself, as a mount locks its backing
/// directory), held while exporting into it: two exports into one DEST would undo each
/// other's work.
fn lock_dest(dest_root: &Path) -> Result<nix::fcntl::Flock<File>, String> {
    let dir = File::open(dest_root).map_err(|e| format!("cannot open {}: {e}", dest_root.display()))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        Errno::EWOULDBLOCK => format!("{} is in use (another kmsfs snapshot export into it?)", dest_root.display()),
        e => format!("cannot lock {}: {e}", dest_root.display()),
    })
}

/// How keys are wrapped for the receiver.
enum Wrapper<'a> {
    /// ReEncrypt by the sender's agent to this key (ARN).
    Kms(&'a str),
    /// RSAES_OAEP_SHA_256 by kmsfs to this public key.
    Rsa(&'a RecipientKey),
}

/// Copies the volume `args.volume` into `args.dest`, wrapped for the receiver (see the
/// module's documentation). Bad input, and anything that stops the whole run (the agent
/// gone, DEST unwritable), is an error; files that fail or change are listed in the summary,
/// whose manifest then still says `exporting`.
pub fn export(args: &ExportArgs<'_>) -> Result<ExportSummary, String> {
    let started = Instant::now();
    validate_key_arg(args.to_key)?;
    let source_root =
        fs::canonicalize(args.volume).map_err(|e| format!("cannot open the volume {}: {e}", args.volume.display()))?;
    if read_manifest(&source_root).ok().flatten().is_some() {
        return Err(format!(
            "{} is itself a snapshot not imported yet: import it (kmsfs snapshot import) before exporting it",
            source_root.display()
        ));
    }
    let dest_state = inspect_dest(args.dest, &source_root, args.update)?;
    let recipient = args.public_key.map(RecipientKey::from_file).transpose()?;
    let client = AgentClient::connect_or_start(args.socket).map_err(|e| e.to_string())?;
    let options = OpenOptions { cache_capacity: std::num::NonZeroUsize::MIN, ..OpenOptions::default() };
    let volume = Volume::open(&source_root, AgentPool::new(client.socket_path()), options)?;
    let config = volume.config().clone();

    // The name key first: a key the agent cannot wrap for fails here, before DEST is touched.
    let name_context = name_key_context(&config.volume_id);
    let (wrapped_name_key, key_id, wrapping) = match &recipient {
        None => {
            let (blob, arn) =
                rewrap::reencrypt(volume.agent(), &config.wrapped_name_key, Source::Kms, &name_context, args.to_key)
                    .map_err(|e| format!("cannot re-wrap the volume's name key for {}: {e}", args.to_key))?;
            (blob, arn, SnapshotWrapping::Kms)
        }
        Some(recipient) => {
            let name_key = decrypt_kms(volume.agent(), &config.wrapped_name_key, &name_context)
                .map_err(|e| format!("cannot unwrap the volume's name key: {e}"))?;
            let sealed = recipient.encrypt(&name_key)?;
            let wrapping = SnapshotWrapping::RsaesOaepSha256 { public_key_sha256: recipient.sha256 };
            (sealed, args.to_key.to_string(), wrapping)
        }
    };
    let manifest = SnapshotManifest {
        state: SnapshotState::Exporting,
        volume_id: config.volume_id,
        key_id: key_id.clone(),
        wrapping,
        started: kmsfs_common::time::iso8601(kmsfs_common::time::now_millis() as f64 / 1000.0),
        finished: None,
        counts: SnapshotCounts::default(),
    };
    let resuming = match &dest_state {
        DestState::Snapshot(existing) => {
            let same = existing.volume_id == manifest.volume_id
                && existing.key_id == manifest.key_id
                && existing.wrapping == manifest.wrapping;
            if !same {
                return Err(format!(
                    "{} holds a snapshot of volume {} for {}; this export is of volume {} for {}: choose a new DEST",
                    args.dest.display(),
                    existing.volume_id.to_hex(),
                    describe(existing),
                    manifest.volume_id.to_hex(),
                    describe(&manifest)
                ));
            }
            true
        }
        DestState::Missing | DestState::Empty => false,
    };
    if matches!(dest_state, DestState::Missing) {
        fs::create_dir(args.dest).map_err(|e| format!("cannot create {}: {e}", args.dest.display()))?;
    }
    let dest_root = fs::canonicalize(args.dest).map_err(|e| format!("cannot open {}: {e}", args.dest.display()))?;
    let _only_export = lock_dest(&dest_root)?;
    match &dest_state {
        DestState::Snapshot(existing) if existing.state == SnapshotState::Exporting => {}
        _ => write_manifest(&dest_root, &manifest)?,
    }
    let manifest = match dest_state {
        DestState::Snapshot(existing) if existing.state == SnapshotState::Exporting => existing,
        _ => manifest,
    };

    let wrapper = match &recipient {
        None => Wrapper::Kms(&key_id),
        Some(recipient) => Wrapper::Rsa(recipient),
    };
    let journal = Journal::open(&dest_root, resuming)?;
    let mut plan = Plan::walk(&volume, &dest_root, resuming)?;
    let progress = Progress::new(io::stderr().is_terminal());
    let total_bytes = plan.files.iter().map(|f| f.size).sum();
    let copy = Copy {
        volume: &volume,
        wrapper: &wrapper,
        dest_root: &dest_root,
        journal: &journal,
        files: &plan.files,
        next: AtomicUsize::new(0),
        done: AtomicU64::new(0),
        done_bytes: AtomicU64::new(0),
        copied: AtomicU64::new(0),
        copied_bytes: AtomicU64::new(0),
        kept: AtomicU64::new(0),
        copies: (0..plan.files.len()).map(|_| Mutex::new(None)).collect(),
        failed: Mutex::new(Vec::new()),
        fatal: Mutex::new(None),
        stop: AtomicBool::new(false),
        progress: &progress,
    };
    // The bar from the start, however short the export.
    progress.show("export", 0, plan.files.len() as u64, Some((0, total_bytes)));
    let checkpointed = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.threads.max(1)).map(|_| s.spawn(|| copy.work())).collect();
        let mut last = Instant::now();
        while !workers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            let (done, bytes) = (copy.done.load(Ordering::Relaxed), copy.done_bytes.load(Ordering::Relaxed));
            progress.show("export", done, plan.files.len() as u64, Some((bytes, total_bytes)));
            if last.elapsed() >= args.checkpoint {
                if let Err(e) = journal.checkpoint(&dest_root) {
                    copy.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                last = Instant::now();
            }
        }
        journal.checkpoint(&dest_root)
    });
    progress.clear();
    let fatal = copy.fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(fatal) = fatal.or(checkpointed.err()) {
        return Err(format!(
            "{fatal}; {} is left unfinished: running the same command again finishes it",
            args.dest.display()
        ));
    }
    let copies: Vec<Option<Identity>> =
        copy.copies.iter().map(|c| *c.lock().unwrap_or_else(|p| p.into_inner())).collect();
    let mut failed = std::mem::take(&mut plan.problems);
    failed.extend(copy.failed.into_inner().unwrap_or_else(|p| p.into_inner()));
    let (copied, copied_bytes, kept) =
        (copy.copied.into_inner(), copy.copied_bytes.into_inner(), copy.kept.into_inner());

    plan.link(&copies, &mut failed);
    plan.finish_dirs(&mut failed);
    let changed = plan.changed(&copies);
    failed.sort();
    let mut summary = ExportSummary { manifest, copied, copied_bytes, kept, failed, changed, elapsed: Duration::ZERO };
    if summary.failed.is_empty() && summary.changed.is_empty() {
        nix::unistd::syncfs(File::open(&dest_root).map_err(|e| e.to_string())?.as_raw_fd())
            .map_err(|e| format!("cannot sync {}: {e}", dest_root.display()))?;
        // Every file is in place: the journal is rewritten with one line each, so that
        // updates do not make it grow without bound.
        let entries = plan.files.iter().zip(&copies).filter_map(|(file, copy)| Some((&file.rel[..], (*copy)?)));
        journal.rewrite(&dest_root, entries)?;
        let moved = VolumeConfig { key_id: key_id.clone(), wrapped_name_key, ..config };
        let path = dest_root.join(VOLUME_FILE);
        write_atomically(&path, moved.to_json().as_bytes(), 0o444)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        summary.manifest = SnapshotManifest {
            state: SnapshotState::Complete,
            finished: Some(kmsfs_common::time::iso8601(kmsfs_common::time::now_millis() as f64 / 1000.0)),
            counts: plan.counts,
            ..summary.manifest
        };
        write_manifest(&dest_root, &summary.manifest)?;
    }
    // The root's own times last: writing the files above changed them.
    if let Err(e) = apply_metadata(&dest_root, &plan.root.meta) {
        summary.failed.push(format!("/ (the snapshot's root {}): {e}", dest_root.display()));
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The journal of copies: `<inode> <ctime seconds> <ctime nanoseconds> <size> <hex of the
/// destination's path relative to DEST>` per line, appended only once the copies it names
/// are synced. A torn last line is ignored.
struct Journal {
    file: File,
    /// Entries read from an earlier run, by relative path.
    earlier: HashMap<Vec<u8>, Identity>,
    /// Lines of copies not yet synced.
    pending: Mutex<Vec<u8>>,
}

/// What identifies a source file's state: a copy made of it is current while it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    ino: u64,
    ctime: (i64, i64),
    size: u64,
}

impl Identity {
    fn of(meta: &fs::Metadata) -> Identity {
        Identity { ino: meta.ino(), ctime: (meta.ctime(), meta.ctime_nsec()), size: meta.len() }
    }
}

impl Journal {
    fn open(dest_root: &Path, resuming: bool) -> Result<Journal, String> {
        let path = dest_root.join(JOURNAL_FILE);
        let mut earlier = HashMap::new();
        if resuming {
            match fs::read(&path) {
                Ok(bytes) => {
                    for line in bytes.split(|b| *b == b'\n') {
                        if let Some((rel, identity)) = parse_journal_line(line) {
                            earlier.insert(rel, identity);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        let file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if !resuming {
            file.set_len(0).map_err(|e| format!("cannot empty {}: {e}", path.display()))?;
        }
        Ok(Journal { file, earlier, pending: Mutex::new(Vec::new()) })
    }

    /// Whether a copy of the file with `identity` at `rel` is already in DEST.
    fn has(&self, rel: &[u8], identity: Identity) -> bool {
        self.earlier.get(rel) == Some(&identity)
    }

    fn record(&self, rel: &[u8], identity: Identity) {
        let line = journal_line(rel, identity);
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(line.as_bytes());
    }

    /// Replaces the journal with the lines of `entries`.
    fn rewrite<'a>(&self, dest_root: &Path, entries: impl Iterator<Item = (&'a [u8], Identity)>) -> Result<(), String> {
        let lines: Vec<u8> = entries.flat_map(|(rel, identity)| journal_line(rel, identity).into_bytes()).collect();
        let path = dest_root.join(JOURNAL_FILE);
        write_atomically(&path, &lines, 0o600).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Syncs DEST's filesystem, then appends the lines of the copies made before.
    fn checkpoint(&self, dest_root: &Path) -> Result<(), String> {
        let lines = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if lines.is_empty() {
            return Ok(());
        }
        let sync = |e: Errno| format!("cannot sync {}: {e}", dest_root.display());
        nix::unistd::syncfs(self.file.as_raw_fd()).map_err(sync)?;
        (&self.file).write_all(&lines).map_err(|e| format!("cannot write the journal in {}: {e}", dest_root.display()))
    }
}

fn journal_line(rel: &[u8], identity: Identity) -> String {
    let Identity { ino, ctime: (secs, nanos), size } = identity;
    format!("{ino} {secs} {nanos} {size} {}\n", kmsfs_common::format::hex(rel))
}

fn parse_journal_line(line: &[u8]) -> Option<(Vec<u8>, Identity)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut fields = text.split(' ');
    let ino = fields.next()?.parse().ok()?;
    let ctime = (fields.next()?.parse().ok()?, fields.next()?.parse().ok()?);
    let size = fields.next()?.parse().ok()?;
    let hex = fields.next()?.as_bytes();
    if fields.next().is_some() || hex.is_empty() {
        return None;
    }
    Some((unhex(hex)?, Identity { ino, ctime, size }))
}

/// A regular file to copy.
struct FileItem {
    src: PathBuf,
    dst: PathBuf,
    /// `dst` relative to DEST, the journal's key.
    rel: Vec<u8>,
    /// Its path in the mounted volume, as far as its names decrypt (for messages).
    shown: PathBuf,
    /// A file with a header (not one of the format's own files, copied as they are).
    content: bool,
    size: u64,
}

/// A further hard link to a file copied as `files[first]`.
struct LinkItem {
    dst: PathBuf,
    shown: PathBuf,
    first: usize,
}

/// A directory, symlink or special file made in DEST, whose source is checked for changes
/// at the end (and for a directory, whose metadata is applied once its contents are in).
struct Entry {
    src: PathBuf,
    dst: PathBuf,
    shown: PathBuf,
    meta: fs::Metadata,
}

/// The tree as walked: what to copy, and what to check at the end.
struct Plan {
    files: Vec<FileItem>,
    links: Vec<LinkItem>,
    /// Directories in the order made (parents before children).
    dirs: Vec<Entry>,
    /// Symlinks and special files.
    others: Vec<Entry>,
    root: Entry,
    counts: SnapshotCounts,
    problems: Vec<String>,
}

impl Plan {
    /// Walks the source volume, making DEST's directories, symlinks and special files as it
    /// goes (and, when `resuming`, removing what the source no longer has).
    fn walk(volume: &Volume, dest_root: &Path, resuming: bool) -> Result<Plan, String> {
        let src_root = volume.root().to_path_buf();
        let meta = fs::symlink_metadata(&src_root).map_err(|e| format!("cannot stat {}: {e}", src_root.display()))?;
        let root = Entry { src: src_root.clone(), dst: dest_root.to_path_buf(), shown: "/".into(), meta };
        let mut plan = Plan {
            files: Vec::new(),
            links: Vec::new(),
            dirs: Vec::new(),
            others: Vec::new(),
            root,
            counts: SnapshotCounts::default(),
            problems: Vec::new(),
        };
        let mut inodes: HashMap<(u64, u64), usize> = HashMap::new();
        let mut todo =
            vec![(src_root.clone(), dest_root.to_path_buf(), Some(volume.root_dir_id()), PathBuf::from("/"))];
        while let Some((src_dir, dst_dir, dir_id, shown_dir)) = todo.pop() {
            let is_root = src_dir == src_root;
            if let Err(e) = copy_xattrs(&src_dir, &dst_dir, resuming) {
                plan.problems.push(format!("{}: cannot copy its extended attributes: {e}", shown_dir.display()));
            }
            let entries = match fs::read_dir(&src_dir) {
                Ok(entries) => entries,
                Err(e) => {
                    plan.problems.push(format!("{}: cannot read directory: {e}", shown_dir.display()));
                    continue;
                }
            };
            let mut seen: HashSet<OsString> = HashSet::new();
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        plan.problems.push(format!("{}: cannot read directory: {e}", shown_dir.display()));
                        continue;
                    }
                };
                let name = entry.file_name();
                if skipped(&name, is_root) {
                    continue;
                }
                seen.insert(name.clone());
                let src = entry.path();
                let dst = dst_dir.join(&name);
                let plain = dir_id.and_then(|id| volume.plain_name(&src_dir, &id, &name));
                let shown = shown_dir.join(plain.unwrap_or_else(|| name.clone()));
                let meta = match fs::symlink_metadata(&src) {
                    Ok(meta) => meta,
                    Err(e) => {
                        plan.problems.push(format!(
                            "{} (backing {}): cannot stat it: {e}",
                            shown.display(),
                            src.display()
                        ));
                        continue;
                    }
                };
                let kind = meta.file_type();
                let made = if kind.is_dir() {
                    make_dir(&dst).map(|()| {
                        let id = volume.read_dir_id(&src).ok();
                        todo.push((src.clone(), dst.clone(), id, shown.clone()));
                        plan.counts.directories += 1;
                        plan.dirs.push(Entry {
                            src: src.clone(),
                            dst: dst.clone(),
                            shown: shown.clone(),
                            meta: meta.clone(),
                        });
                    })
                } else if kind.is_file() {
                    let key = (meta.dev(), meta.ino());
                    match inodes.get(&key) {
                        Some(&first) if meta.nlink() > 1 => {
                            plan.counts.hard_links += 1;
                            plan.links.push(LinkItem { dst, shown: shown.clone(), first });
                        }
                        _ => {
                            let content = !names::is_reserved_name(&name.to_string_lossy());
                            if meta.nlink() > 1 {
                                inodes.insert(key, plan.files.len());
                            }
                            if content {
                                plan.counts.files += 1;
                                plan.counts.bytes += meta.len();
                            }
                            let rel = dst.strip_prefix(dest_root).unwrap_or(&dst).as_os_str().as_bytes().to_vec();
                            plan.files.push(FileItem {
                                src: src.clone(),
                                dst,
                                rel,
                                shown: shown.clone(),
                                content,
                                size: meta.len(),
                            });
                        }
                    }
                    Ok(())
                } else {
                    let made = if kind.is_symlink() {
                        plan.counts.symlinks += 1;
                        make_symlink(&src, &dst)
                    } else {
                        plan.counts.special_files += 1;
                        make_special(&meta, &dst)
                    };
                    made.and_then(|()| apply_metadata(&dst, &meta)).map(|()| {
                        plan.others.push(Entry {
                            src: src.clone(),
                            dst: dst.clone(),
                            shown: shown.clone(),
                            meta: meta.clone(),
                        });
                    })
                };
                if let Err(e) = made {
                    plan.problems.push(format!("{} (backing {}): cannot copy it: {e}", shown.display(), src.display()));
                }
            }
            if resuming {
                if let Err(e) = remove_stale(&dst_dir, &seen, is_root) {
                    plan.problems.push(format!("{}: cannot tidy {}: {e}", shown_dir.display(), dst_dir.display()));
                }
            }
        }
        Ok(plan)
    }

    /// Makes the further hard links, once the files they link to are copied.
    fn link(&self, copies: &[Option<Identity>], failed: &mut Vec<String>) {
        for link in &self.links {
            let first = &self.files[link.first];
            if copies[link.first].is_none() {
                continue; // its file failed, and says so
            }
            let linked = (|| {
                let target = fs::symlink_metadata(&first.dst)?;
                match fs::symlink_metadata(&link.dst) {
                    Ok(meta) if meta.ino() == target.ino() && meta.dev() == target.dev() => return Ok(()),
                    Ok(meta) if meta.is_dir() => fs::remove_dir_all(&link.dst)?,
                    Ok(_) => fs::remove_file(&link.dst)?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                fs::hard_link(&first.dst, &link.dst)
            })();
            if let Err(e) = linked {
                failed.push(format!("{}: cannot link it to {}: {e}", link.shown.display(), first.shown.display()));
            }
        }
    }

    /// Gives each directory its owner, mode and times, children before parents.
    fn finish_dirs(&self, failed: &mut Vec<String>) {
        for dir in self.dirs.iter().rev() {
            if let Err(e) = apply_metadata(&dir.dst, &dir.meta) {
                failed.push(format!(
                    "{} (backing {}): cannot set its metadata: {e}",
                    dir.shown.display(),
                    dir.src.display()
                ));
            }
        }
    }

    /// The source entries that changed since they were copied (see the module's
    /// documentation), directories first; `copies` are the files as they were when their
    /// copy began.
    fn changed(&self, copies: &[Option<Identity>]) -> Vec<String> {
        let mut changed = Vec::new();
        let times = |m: &fs::Metadata| (m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
        let ctime_now = |path: &Path| fs::symlink_metadata(path).ok().map(|m| (m.ctime(), m.ctime_nsec()));
        for dir in std::iter::once(&self.root).chain(&self.dirs) {
            if fs::symlink_metadata(&dir.src).ok().map(|m| times(&m)) != Some(times(&dir.meta)) {
                changed.push(format!(
                    "{}: entries were added, removed or renamed, or it was changed",
                    dir.shown.display()
                ));
            }
        }
        // Directories first (a changed listing says most), each group in order.
        changed.sort();
        let directories = changed.len();
        for other in &self.others {
            if ctime_now(&other.src) != Some((other.meta.ctime(), other.meta.ctime_nsec())) {
                changed.push(format!("{}: it changed", other.shown.display()));
            }
        }
        for (file, copy) in self.files.iter().zip(copies) {
            if copy.is_some_and(|copy| ctime_now(&file.src) != Some(copy.ctime)) {
                changed.push(format!("{}: it changed while it was being copied", file.shown.display()));
            }
        }
        changed[directories..].sort();
        changed
    }
}

/// Entries of the source the snapshot does not copy: the volume file (written anew, last),
/// a running rewrap's lock, and temporaries (of atomic writes, and of an export into the
/// volume's own tree that cannot arise, but costs nothing to leave out).
fn skipped(name: &OsStr, is_root: bool) -> bool {
    let text = name.to_string_lossy();
    if is_root && (is_snapshots_own(&text) || [VOLUME_FILE, rewrap::LOCK_FILE].contains(&&*text)) {
        return true;
    }
    rewrap::is_temporary(&text) || text.starts_with(TEMPORARY_PREFIX)
}

/// Whether `name` (at a snapshot's root) is its manifest, journal or times record.
fn is_snapshots_own(name: &str) -> bool {
    [MANIFEST_FILE, JOURNAL_FILE, TIMES_FILE].contains(&name)
}

/// Removes from DEST's directory `dir` what the source's no longer has (a resumed or
/// updated export), and copies left half-made.
fn remove_stale(dir: &Path, seen: &HashSet<OsString>, is_root: bool) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let ours = is_root && (is_snapshots_own(&text) || [VOLUME_FILE, rewrap::LOCK_FILE].contains(&&*text));
        if seen.contains(&name) || ours {
            continue;
        }
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Removes whatever is at `path` unless it is a directory; `Ok(true)` if a directory is there.
fn clear_for(path: &Path, keep_dir: bool) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() && keep_dir => Ok(true),
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map(|()| false),
        Ok(_) => fs::remove_file(path).map(|()| false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn make_dir(dst: &Path) -> io::Result<()> {
    if clear_for(dst, true)? {
        return Ok(());
    }
    // Owner-writable until its own metadata is applied, after its contents.
    fs::DirBuilder::new().mode(0o700).create(dst)
}

fn make_symlink(src: &Path, dst: &Path) -> io::Result<()> {
    let target = fs::read_link(src)?;
    if fs::read_link(dst).is_ok_and(|t| t == target) {
        return Ok(());
    }
    clear_for(dst, false)?;
    std::os::unix::fs::symlink(&target, dst)
}

fn make_special(meta: &fs::Metadata, dst: &Path) -> io::Result<()> {
    let kind = meta.file_type();
    let flag = if kind.is_fifo() {
        SFlag::S_IFIFO
    } else if kind.is_socket() {
        SFlag::S_IFSOCK
    } else if kind.is_char_device() {
        SFlag::S_IFCHR
    } else {
        SFlag::S_IFBLK
    };
    if let Ok(existing) = fs::symlink_metadata(dst) {
        if existing.file_type() == kind && existing.rdev() == meta.rdev() {
            return Ok(());
        }
    }
    clear_for(dst, false)?;
    let mode = nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777);
    nix::sys::stat::mknod(dst, flag, mode, meta.rdev()).map_err(io::Error::from)
}

/// Gives `dst` (not followed if a symlink) the owner, mode and times of `meta`. The owner
/// is set only where it differs, and only as far as this process may (as `cp -a`).
fn apply_metadata(dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let now = fs::symlink_metadata(dst)?;
    if (now.uid(), now.gid()) != (meta.uid(), meta.gid()) {
        match std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid())) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            other => other?,
        }
    }
    if !meta.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    nix::sys::stat::utimensat(None, dst, &atime, &mtime, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Copies the extended attributes of `src` (not followed) to `dst`, removing from `dst`
/// those `src` lacks when `resuming`. The `user.` ones (the volume's, encrypted) must copy;
/// others (`security.`…) are copied where this process may.
fn copy_xattrs(src: &Path, dst: &Path, resuming: bool) -> io::Result<()> {
    let names: Vec<OsString> = xattr::list(src)?.collect();
    if resuming {
        for name in xattr::list(dst)? {
            if !names.contains(&name) {
                xattr::remove(dst, &name)?;
            }
        }
    }
    for name in names {
        let Some(value) = xattr::get(src, &name)? else { continue };
        if let Err(e) = xattr::set(dst, &name, &value) {
            if name.as_bytes().starts_with(b"user.") {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The copying, shared by the worker threads.
struct Copy<'a> {
    volume: &'a Volume,
    wrapper: &'a Wrapper<'a>,
    dest_root: &'a Path,
    journal: &'a Journal,
    files: &'a [FileItem],
    next: AtomicUsize,
    done: AtomicU64,
    done_bytes: AtomicU64,
    copied: AtomicU64,
    copied_bytes: AtomicU64,
    kept: AtomicU64,
    /// Each file's change time when its copy began, once it is in place.
    copies: Vec<Mutex<Option<Identity>>>,
    failed: Mutex<Vec<String>>,
    fatal: Mutex<Option<String>>,
    stop: AtomicBool,
    progress: &'a Progress,
}

impl Copy<'_> {
    fn work(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = self.files.get(index) else { return };
            let outcome = self.copy_file(index, item);
            self.done.fetch_add(1, Ordering::Relaxed);
            self.done_bytes.fetch_add(item.size, Ordering::Relaxed);
            match outcome {
                Ok((kept, identity)) => {
                    *self.copies[index].lock().unwrap_or_else(|p| p.into_inner()) = Some(identity);
                    // Files with a header are counted; the format's own small files are not.
                    let counted = u64::from(item.content);
                    if kept {
                        self.kept.fetch_add(counted, Ordering::Relaxed);
                    } else {
                        self.copied.fetch_add(counted, Ordering::Relaxed);
                        self.copied_bytes.fetch_add(identity.size, Ordering::Relaxed);
                    }
                }
                Err(Failure::AgentGone(e)) => {
                    self.stop.store(true, Ordering::Relaxed);
                    self.fatal.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.to_string());
                }
                Err(Failure::File(e)) => {
                    let message = format!("{} (backing file {}): {e}", item.shown.display(), item.src.display());
                    self.progress.print(&format!("kmsfs snapshot export: {message}"));
                    self.failed.lock().unwrap_or_else(|p| p.into_inner()).push(message);
                }
            }
        }
    }

    /// Copies one file into place unless the journal has it already: whether it was kept,
    /// and the source's identity when the copy began.
    fn copy_file(&self, index: usize, item: &FileItem) -> Result<(bool, Identity), Failure> {
        let io = |doing: &'static str| move |e: io::Error| Failure::File(format!("{doing}: {e}"));
        let src = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&item.src)
            .map_err(io("cannot open it"))?;
        let meta = src.metadata().map_err(io("cannot stat it"))?;
        let identity = Identity::of(&meta);
        if !meta.is_file() {
            return Err(Failure::File("it is no longer a regular file".into()));
        }
        if self.journal.has(&item.rel, identity)
            && fs::symlink_metadata(&item.dst).is_ok_and(|d| d.is_file() && d.len() == meta.len())
        {
            return Ok((true, identity));
        }
        let parent = item.dst.parent().unwrap_or(self.dest_root);
        let tmp = parent.join(format!("{TEMPORARY_PREFIX}{index}"));
        let result = self.copy_to(&src, &meta, item, &tmp).and_then(|()| {
            // A file there is replaced by the rename; a directory (the source's entry was
            // one in an earlier run) has to go first.
            clear_for(&item.dst, true)
                .and_then(|dir| if dir { fs::remove_dir_all(&item.dst) } else { Ok(()) })
                .and_then(|()| fs::rename(&tmp, &item.dst))
                .map_err(io("cannot put it in place"))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        self.journal.record(&item.rel, identity);
        Ok((false, identity))
    }

    fn copy_to(&self, src: &File, meta: &fs::Metadata, item: &FileItem, tmp: &Path) -> Result<(), Failure> {
        let io = |doing: &'static str| move |e: io::Error| Failure::File(format!("{doing}: {e}"));
        let out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io("cannot create its copy"))?;
        let from = if item.content {
            let header = self.new_header(src)?;
            out.write_all_at(&header, 0).map_err(io("cannot write its header"))?;
            HEADER_SIZE as u64
        } else {
            0
        };
        copy_sparse(src, &out, from, meta.len()).map_err(io("cannot copy its blocks"))?;
        out.set_len(meta.len()).map_err(io("cannot size its copy"))?;
        for name in xattr::FileExt::list_xattr(src).map_err(io("cannot list its extended attributes"))? {
            let value = xattr::FileExt::get_xattr(src, &name).map_err(io("cannot read an extended attribute"))?;
            let Some(value) = value else { continue };
            if let Err(e) = xattr::FileExt::set_xattr(&out, &name, &value) {
                if name.as_bytes().starts_with(b"user.") {
                    return Err(io("cannot copy an extended attribute")(e));
                }
            }
        }
        if (meta.uid(), meta.gid()) != (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw()) {
            match std::os::unix::fs::fchown(&out, Some(meta.uid()), Some(meta.gid())) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                other => other.map_err(io("cannot set its owner"))?,
            }
        }
        out.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777)).map_err(io("cannot set its mode"))?;
        let times = fs::FileTimes::new().set_accessed(meta.accessed().map_err(io("atime"))?);
        out.set_times(times.set_modified(meta.modified().map_err(io("mtime"))?)).map_err(io("cannot set its times"))
    }

    /// The file's header (read from `src` and verified) with its data key wrapped for the
    /// receiver, in both slots.
    fn new_header(&self, src: &File) -> Result<[u8; HEADER_SIZE], Failure> {
        let mut bytes = [0u8; HEADER_SIZE];
        src.read_exact_at(&mut bytes, 0).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Failure::File("too short for a kmsfs header".into()),
            _ => Failure::File(format!("cannot read its header: {e}")),
        })?;
        let volume_id = self.volume.config().volume_id;
        let agent = self.volume.agent();
        let (current, key, plaintext) = open_slots(&bytes, |slot| {
            decrypt_kms(agent, slot.wrapped_key(), &file_key_context(&volume_id, &slot.file_id()))
        })
        .map_err(Failure::of("its header does not open"))?;
        let wrapped = match self.wrapper {
            Wrapper::Kms(key_arn) => {
                let context = file_key_context(&volume_id, &current.file_id());
                rewrap::reencrypt(agent, current.wrapped_key(), Source::Kms, &context, key_arn)
                    .map_err(Failure::of("ReEncrypt of its data key"))?
                    .0
            }
            Wrapper::Rsa(recipient) => recipient.encrypt(&plaintext).map_err(Failure::File)?,
        };
        let header = FileHeader::new(current.file_id(), current.layout(), wrapped)
            .map_err(|e| Failure::File(format!("cannot make its new header: {e}")))?;
        Ok(header::encode_new(&header, &key))
    }
}

/// Copies bytes `from..len` of `src` to the same offsets of `dst`, leaving the source's
/// holes as holes (SEEK_DATA / SEEK_HOLE), with copy_file_range where the kernel can.
fn copy_sparse(src: &File, dst: &File, from: u64, len: u64) -> io::Result<()> {
    let fd = src.as_raw_fd();
    let mut pos = from;
    while pos < len {
        let offset = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let data = match nix::unistd::lseek(fd, offset, Whence::SeekData) {
            Ok(data) => data as u64,
            Err(Errno::ENXIO) => break, // only a hole is left
            Err(Errno::EINVAL) => pos,  // no SEEK_DATA here: copy everything
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = match nix::unistd::lseek(fd, data as i64, Whence::SeekHole) {
            Ok(hole) => (hole as u64).min(len),
            Err(Errno::ENXIO | Errno::EINVAL) => len,
            Err(e) => return Err(e.into()),
        };
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let short = || io::Error::new(io::ErrorKind::UnexpectedEof, "the file became shorter while it was copied");
    let (mut off_in, mut off_out) = (offset as i64, offset as i64);
    let end = offset + len;
    while (off_in as u64) < end {
        let left = (end - off_in as u64).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), left) {
            Ok(0) => return Err(short()),
            Ok(_) => {}
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                return copy_range_by_hand(src, dst, off_in as u64, end);
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_by_hand(src: &File, dst: &File, mut pos: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        let want = (end - pos).min(buf.len() as u64) as usize;
        let got = src.read_at(&mut buf[..want], pos)?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file became shorter while it was copied"));
        }
        dst.write_all_at(&buf[..got], pos)?;
        pos += got as u64;
    }
    Ok(())
}

// ---- import ----

/// What an import did.
#[derive(Debug)]
pub struct ImportSummary {
    /// The manifest the snapshot came with (removed when every file was re-wrapped).
    pub manifest: SnapshotManifest,
    pub rewrap: rewrap::Summary,
}

/// Re-wraps the snapshot in `dest` (exported for a key of this host) under the KMS key
/// `key` of this host's agent (see the module's documentation). The manifest goes once
/// every file is re-wrapped; files that fail are listed in the summary, and running the
/// import again retries them.
pub fn import(dest: &Path, key: &str, socket: Option<&Path>, threads: usize) -> Result<ImportSummary, String> {
    validate_key_arg(key)?;
    let root = fs::canonicalize(dest).map_err(|e| format!("cannot open {}: {e}", dest.display()))?;
    let manifest = match read_manifest(&root)? {
        Some(manifest) if manifest.state == SnapshotState::Complete => manifest,
        Some(_) => {
            return Err(format!(
                "the export into {} did not finish ({MANIFEST_FILE} says \"exporting\"): run it again on the sending \
                 host, then copy the snapshot here again",
                dest.display()
            ))
        }
        None if root.join(VOLUME_FILE).exists() => {
            return Err(format!(
                "{} has no snapshot manifest ({MANIFEST_FILE}): it is a volume already (imported before?); mount it, \
                 or move it to another key with kmsfs rewrap --to-key",
                dest.display()
            ))
        }
        None => return Err(format!("{} is not a kmsfs snapshot (no {MANIFEST_FILE})", dest.display())),
    };
    let config = read_volume_file(&root)?;
    if config.volume_id != manifest.volume_id {
        return Err(format!(
            "{}: {VOLUME_FILE} is of volume {}, {MANIFEST_FILE} of volume {}: not one snapshot",
            dest.display(),
            config.volume_id.to_hex(),
            manifest.volume_id.to_hex()
        ));
    }
    let client = AgentClient::connect_or_start(socket).map_err(|e| e.to_string())?;
    let agent = AgentPool::new(client.socket_path());
    let times = import_times(&root)?;
    let source = match manifest.wrapping {
        SnapshotWrapping::Kms => Source::Kms,
        SnapshotWrapping::RsaesOaepSha256 { public_key_sha256 } => {
            check_public_key(&agent, &manifest.key_id, &public_key_sha256)?;
            import_name_key(&root, &agent, &config, &manifest.key_id, key)?;
            Source::Rsa { key_id: &manifest.key_id }
        }
    };
    let job = rewrap::Job { label: "snapshot import", source, times: Some(&times) };
    let summary = rewrap::run_with(&root, Some(client.socket_path()), Some(key), threads, &job)?;
    if summary.failed.is_empty() {
        for name in [JOURNAL_FILE, TIMES_FILE, MANIFEST_FILE] {
            match fs::remove_file(root.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(format!("cannot remove {}: {e}", root.join(name).display()))
                }
                _ => {}
            }
        }
        File::open(&root).and_then(|d| d.sync_all()).map_err(|e| format!("cannot sync {}: {e}", root.display()))?;
    }
    Ok(ImportSummary { manifest, rewrap: summary })
}

/// Every regular file's access and modification times as exported, by backing path: read
/// from [`TIMES_FILE`], or recorded there first by the first run (before any header is
/// touched). Lines: `<atime s> <atime ns> <mtime s> <mtime ns> <hex of the relative path>`.
fn import_times(root: &Path) -> Result<HashMap<PathBuf, fs::FileTimes>, String> {
    let path = root.join(TIMES_FILE);
    let file_times = |a_s: i64, a_ns: i64, m_s: i64, m_ns: i64| {
        Some(fs::FileTimes::new().set_accessed(system_time(a_s, a_ns)?).set_modified(system_time(m_s, m_ns)?))
    };
    let mut times = HashMap::new();
    match fs::read(&path) {
        Ok(bytes) => {
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let parsed = std::str::from_utf8(line).ok().and_then(|line| {
                    let fields: Vec<&str> = line.split(' ').collect();
                    let [a_s, a_ns, m_s, m_ns, hex] = fields[..] else { return None };
                    let found =
                        file_times(a_s.parse().ok()?, a_ns.parse().ok()?, m_s.parse().ok()?, m_ns.parse().ok()?)?;
                    Some((root.join(OsStr::from_bytes(&unhex(hex.as_bytes())?)), found))
                });
                let (file, found) = parsed.ok_or_else(|| format!("{} is damaged", path.display()))?;
                times.insert(file, found);
            }
            return Ok(times);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut lines = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            let file = entry.path();
            let meta = fs::symlink_metadata(&file).map_err(|e| format!("cannot stat {}: {e}", file.display()))?;
            if meta.is_dir() {
                todo.push(file);
                continue;
            }
            if !meta.is_file() || names::is_reserved_name(&entry.file_name().to_string_lossy()) {
                continue;
            }
            let (a_s, a_ns, m_s, m_ns) = (meta.atime(), meta.atime_nsec(), meta.mtime(), meta.mtime_nsec());
            let Some(found) = file_times(a_s, a_ns, m_s, m_ns) else { continue };
            let rel = kmsfs_common::format::hex(file.strip_prefix(root).unwrap_or(&file).as_os_str().as_bytes());
            lines.extend_from_slice(format!("{a_s} {a_ns} {m_s} {m_ns} {rel}\n").as_bytes());
            times.insert(file, found);
        }
    }
    write_atomically(&path, &lines, 0o600).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(times)
}

/// Seconds and nanoseconds since the epoch (as `stat` gives them) as a `SystemTime`.
fn system_time(secs: i64, nanos: i64) -> Option<std::time::SystemTime> {
    let nanos = Duration::from_nanos(u64::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?);
    let base = match u64::try_from(secs) {
        Ok(secs) => std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs))?,
        Err(_) => std::time::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?,
    };
    base.checked_add(nanos)
}

/// Bytes from hex; `None` unless every pair is hex.
fn unhex(hex: &[u8]) -> Option<Vec<u8>> {
    let pairs = hex.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    pairs.map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

fn read_volume_file(root: &Path) -> Result<VolumeConfig, String> {
    let path = root.join(VOLUME_FILE);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|f| f.take(kmsfs_common::format::volume::MAX_VOLUME_FILE_LEN as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{} is not a complete snapshot ({}: {e})", root.display(), path.display()))?;
    VolumeConfig::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Checks that the RSA key `key_id` of this host's agent is the one the snapshot was
/// encrypted to, by its public key's SHA-256.
fn check_public_key(agent: &AgentPool, key_id: &str, expected: &[u8; 32]) -> Result<(), String> {
    let answer = agent
        .call("GetPublicKey", &json!({"KeyId": key_id}))
        .map_err(|e| format!("the snapshot is encrypted to {key_id}, which this host's agent cannot show: {e}"))?;
    let der = unb64(&answer["PublicKey"]).map_err(|e| format!("GetPublicKey of {key_id}: {e}"))?;
    if digest::digest(&digest::SHA256, &der).as_ref() != expected {
        return Err(format!(
            "the snapshot was encrypted to another public key than that of {key_id} (SHA-256 {} expected): was it \
             exported for another host's key?",
            kmsfs_common::format::hex(expected)
        ));
    }
    Ok(())
}

/// The first step of importing an RSA-wrapped snapshot: the name key, ReEncrypted from the
/// RSA key to `key` under the name-key context, and `kmsfs.volume` replaced atomically
/// (a rerun finds a blob there, which opens as a volume's, and leaves it to the rewrap).
fn import_name_key(
    root: &Path,
    agent: &AgentPool,
    config: &VolumeConfig,
    rsa_key_id: &str,
    key: &str,
) -> Result<(), String> {
    let context = name_key_context(&config.volume_id);
    if CiphertextBlob::parse(&config.wrapped_name_key).is_ok() {
        match decrypt_kms(agent, &config.wrapped_name_key, &context) {
            Ok(_) => return Ok(()),
            Err(VolError::Refused(e)) if e.kind == ErrorKind::InvalidCiphertextException => {}
            Err(e) => return Err(format!("cannot open the snapshot's name key: {e}")),
        }
    }
    let (wrapped, key_arn) =
        rewrap::reencrypt(agent, &config.wrapped_name_key, Source::Rsa { key_id: rsa_key_id }, &context, key).map_err(
            |e| format!("cannot open the snapshot's name key with {rsa_key_id} and re-wrap it for {key}: {e}"),
        )?;
    let moved = VolumeConfig { key_id: key_arn, wrapped_name_key: wrapped, ..config.clone() };
    let path = root.join(VOLUME_FILE);
    write_atomically(&path, moved.to_json().as_bytes(), 0o444)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_round_trip_and_torn_ones_are_ignored() {
        let identity = Identity { ino: 42, ctime: (1_700_000_000, 123_456_789), size: 5000 };
        let line = format!("42 1700000000 123456789 5000 {}", kmsfs_common::format::hex(b"a/kmsfs.dirid"));
        assert_eq!(parse_journal_line(line.as_bytes()), Some((b"a/kmsfs.dirid".to_vec(), identity)));
        assert_eq!(journal_line(b"a/kmsfs.dirid", identity), line + "\n");
        for torn in ["42 1700000000 123456789 5000 616", "42 17000", "", "x 1 2 3 61", "1 2 3 4 61 extra"] {
            assert_eq!(parse_journal_line(torn.as_bytes()), None, "{torn}");
        }
    }

    #[test]
    fn public_keys_that_are_not_rsa_or_too_big_are_refused() {
        use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
        use aws_lc_rs::rsa::{KeySize, PrivateDecryptingKey};
        for (size, fits) in [(KeySize::Rsa2048, true), (KeySize::Rsa3072, true), (KeySize::Rsa4096, false)] {
            let der = AsDer::<PublicKeyX509Der>::as_der(&PrivateDecryptingKey::generate(size).unwrap().public_key())
                .unwrap()
                .as_ref()
                .to_vec();
            match RecipientKey::parse(&der) {
                Ok(key) => {
                    assert!(fits);
                    assert!(key.encrypt(&[7u8; 32]).unwrap().len() <= MAX_WRAPPED_KEY_LEN);
                }
                Err(e) => {
                    assert!(!fits);
                    assert!(e.contains("RSA_2048 or RSA_3072"), "{e}");
                }
            }
            let pem = format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(&der)
            );
            assert_eq!(RecipientKey::parse(pem.as_bytes()).is_ok(), fits);
        }
        for junk in [&b""[..], b"not a key", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"] {
            assert!(RecipientKey::parse(junk).is_err());
        }
    }

    #[test]
    fn the_formats_files_and_temporaries_are_not_copied() {
        for name in ["kmsfs.volume", "kmsfs.rewrap.lock", "kmsfs.snapshot", "kmsfs.snapshot.journal"] {
            assert!(skipped(OsStr::new(name), true), "{name}");
            assert!(!skipped(OsStr::new(name), false), "{name} below the root is an ordinary entry");
        }
        assert!(skipped(OsStr::new(".kmsfs.volume.tmp12"), false));
        assert!(skipped(OsStr::new("kmsfs.snapshot.tmp.7"), false));
        assert!(!skipped(OsStr::new("kmsfs.dirid"), false));
        assert!(!skipped(OsStr::new("kmsfs.long.abc.name"), false));
    }
}
