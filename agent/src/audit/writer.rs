//! The audit log's writer: one thread that owns the files, appends records in groups (all
//! the records queued while the previous group was being synced share one `fdatasync`),
//! and answers each request only once its record is durable.
//!
//! Fail-closed: a group whose write or sync fails is cut back off the file and every request
//! in it is answered with an error instead of its result; the log is then *unhealthy* and
//! the server refuses every request until a retry (every 500 ms) succeeds.
//!
//! Space is reserved ahead of the end of the file (`fallocate` with `KEEP_SIZE`, [`RESERVE`]
//! bytes), and a group proceeds only if the reserve can be topped up past it — except for
//! the records of mutations that have already committed, which may use the reserve. So a
//! full disk refuses reads before they are executed and never strands an executed mutation
//! without its record. What remains is described in `AUDIT.md` ("Fail-closed").

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use kmsfs_common::audit::{self, Chain, DIGEST_EVENT_TYPE};
use kmsfs_common::time::now_millis;
use serde_json::{Map, Value};

/// How long lines may stay unsealed before a digest covers them.
pub const DIGEST_INTERVAL_MS: i64 = 60_000;
/// Bytes kept allocated past the end of the live file for records of executed mutations.
pub const RESERVE: u64 = 1 << 20;
/// The reserve is topped up in steps of this much, so that most groups need no `fallocate`.
const RESERVE_STEP: u64 = 256 << 10;
/// How often an unhealthy log retries.
const RETRY: Duration = Duration::from_millis(500);
/// At most this many records share one sync.
const MAX_GROUP: usize = 4096;

/// One record waiting to be written.
pub struct Pending {
    pub event: Map<String, Value>,
    /// Append a digest right after this record.
    pub seal: bool,
    /// The request changed state before its record was written: it may use the reserve.
    pub mutation: bool,
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

pub enum Command {
    Append(Pending),
    Close,
}

/// The day's file being appended to.
struct Live {
    day: i64,
    name: String,
    file: File,
    /// The length of the complete lines in it.
    len: u64,
    /// How far space is known to be allocated.
    allocated: u64,
}

pub struct Writer {
    dir: PathBuf,
    key: SigningKey,
    chain: Chain,
    live: Option<Live>,
    healthy: Arc<AtomicBool>,
    /// False once the filesystem turned out not to support `fallocate`.
    can_reserve: bool,
    /// Where durable lines are mirrored, if anywhere.
    mirror: Option<super::journal::Journal>,
}

impl Writer {
    /// Opens the log in `dir`: finds where the chain stands from the newest file, cuts a torn
    /// last line, and seals lines a crash left unsealed.
    pub fn open(
        dir: PathBuf,
        key: SigningKey,
        healthy: Arc<AtomicBool>,
        mirror: Option<super::journal::Journal>,
    ) -> Result<Writer, String> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create the audit directory {}: {e}", dir.display()))?;
        let mut writer = Writer { dir, key, chain: Chain::genesis(), live: None, healthy, can_reserve: true, mirror };
        let mut days: Vec<i64> = fs::read_dir(&writer.dir)
            .map_err(|e| format!("cannot read the audit directory {}: {e}", writer.dir.display()))?
            .filter_map(|entry| audit::parse_file_name(&entry.ok()?.file_name().to_string_lossy()))
            .collect();
        days.sort_unstable();
        while let Some(day) = days.pop() {
            if writer.resume(day)? {
                break;
            }
        }
        if writer.chain.needs_digest() {
            tracing::warn!(
                "the audit log ends with records no digest covers (the agent stopped uncleanly); sealing them"
            );
            writer.seal().map_err(|e| format!("cannot seal the audit log: {e}"))?;
        }
        writer.healthy.store(true, Ordering::Release);
        Ok(writer)
    }

    /// Picks up the chain from the file of `day`; false if the file holds no line (it is
    /// then removed: a crash between creating it and writing its first line).
    fn resume(&mut self, day: i64) -> Result<bool, String> {
        let name = audit::file_name(day);
        let path = self.dir.join(&name);
        let shown = path.display();
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| format!("cannot open {shown}: {e}"))?;
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            tracing::warn!(file = %shown, bytes = bytes.len() - complete, "cutting a torn last line off the audit log (its request was never answered)");
            file.set_len(complete as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot repair {shown}: {e}"))?;
        }
        let lines: Vec<&[u8]> = bytes[..complete].split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        let Some(last) = lines.last() else {
            drop(file);
            fs::remove_file(&path).map_err(|e| format!("cannot remove the empty {shown}: {e}"))?;
            return Ok(false);
        };
        let record = |line: &[u8]| -> Result<Map<String, Value>, String> {
            match serde_json::from_slice(line) {
                Ok(Value::Object(o)) if o.get("sequence").and_then(Value::as_u64).is_some() => Ok(o),
                _ => Err(format!(
                    "the last lines of the audit log {shown} are not records; it was damaged or tampered with: \
                     check it with `kmsctl audit verify --dir`, and move it aside to start a new chain"
                )),
            }
        };
        let last_record = record(last)?;
        let sequence = last_record.get("sequence").and_then(Value::as_u64).unwrap_or(0);
        let is_digest = |o: &Map<String, Value>| o.get("eventType").and_then(Value::as_str) == Some(DIGEST_EVENT_TYPE);
        let unsealed = if is_digest(&last_record) {
            None
        } else {
            // The first line after the file's last digest (or its first line).
            let mut first = sequence;
            for line in lines.iter().rev().skip(1) {
                let o = record(line)?;
                if is_digest(&o) {
                    break;
                }
                first = o.get("sequence").and_then(Value::as_u64).unwrap_or(first);
            }
            Some((first, now_millis()))
        };
        self.chain = Chain { next_sequence: sequence + 1, last_hash: audit::line_hash(last), unsealed };
        self.live = Some(Live { day, name, file, len: complete as u64, allocated: 0 });
        Ok(true)
    }

    /// Serves commands until `Close` or until every sender is gone, then seals the log.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) {
        loop {
            let first = match commands.recv_timeout(self.next_wakeup()) {
                Ok(command) => command,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut group = Vec::new();
            let mut close = false;
            match first {
                Command::Append(p) => group.push(p),
                Command::Close => close = true,
            }
            while !close && group.len() < MAX_GROUP {
                match commands.try_recv() {
                    Ok(Command::Append(p)) => group.push(p),
                    Ok(Command::Close) => close = true,
                    Err(_) => break,
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            if close {
                break;
            }
        }
        if let Err(e) = self.seal() {
            tracing::error!("cannot seal the audit log at shutdown: {e}");
        }
    }

    fn next_wakeup(&self) -> Duration {
        if !self.healthy.load(Ordering::Acquire) {
            return RETRY;
        }
        match self.chain.unsealed {
            Some((_, since)) => Duration::from_millis((since + DIGEST_INTERVAL_MS - now_millis()).max(0) as u64),
            None => Duration::from_secs(3600),
        }
    }

    /// With nothing queued: retry an unhealthy log, and seal lines that are due.
    fn tick(&mut self) {
        if !self.healthy.load(Ordering::Acquire) {
            // Heal only once the disk has room again: the reserve left allocated from
            // before the failure says nothing about free space, so ask for a further step
            // (a full disk refuses it). Healing on the old reserve alone let a mutation run
            // on a still-full disk and spend the reserve on its record.
            match self.cut().and_then(|()| self.reserve(RESERVE_STEP)) {
                Ok(()) => self.heal(),
                Err(e) => tracing::debug!("the audit log still cannot be written: {e}"),
            }
            return;
        }
        if self.digest_due(now_millis()) {
            if let Err(e) = self.seal() {
                self.fail(&format!("cannot write a digest: {e}"));
            }
        }
    }

    fn digest_due(&self, now: i64) -> bool {
        self.chain.unsealed.is_some_and(|(_, since)| now - since >= DIGEST_INTERVAL_MS)
    }

    /// Writes one group: every record, the digests they ask for, one sync; then answers.
    fn commit(&mut self, mut group: Vec<Pending>) {
        let now = now_millis();
        if let Err(e) = self.prepare(now) {
            self.fail(&e);
            answer(group, Err(e));
            return;
        }
        let before = self.chain.clone();
        let mut bytes = self.lines(&mut group, now);
        let mut short = None;
        if let Err(e) = self.reserve(bytes.len() as u64) {
            // Out of space: the requests not yet acted on are refused; the records of
            // mutations already committed go into the reserve.
            self.chain = before.clone();
            let (mutations, others): (Vec<_>, Vec<_>) = group.into_iter().partition(|p| p.mutation);
            answer(others, Err(format!("the audit log is out of space ({e})")));
            group = mutations;
            if group.is_empty() {
                self.fail(&e);
                return;
            }
            bytes = self.lines(&mut group, now);
            short = Some(e);
        }
        match self.write(&bytes) {
            Ok(()) => {
                match short {
                    Some(e) => self.fail(&e),
                    None => self.heal(),
                }
                answer(group, Ok(()));
            }
            Err(e) => {
                self.chain = before;
                self.fail(&e);
                answer(group, Err(e));
            }
        }
    }

    /// The lines of `group` (with the digests it asks for, and one more if due), chained.
    fn lines(&mut self, group: &mut [Pending], now: i64) -> Vec<u8> {
        let mut out = Vec::new();
        for p in group.iter_mut() {
            out.extend_from_slice(&self.chain.append_event(&mut p.event, now));
            out.push(b'\n');
            if p.seal {
                self.push_digest(&mut out, now);
            }
        }
        if self.digest_due(now) {
            self.push_digest(&mut out, now);
        }
        out
    }

    fn push_digest(&mut self, out: &mut Vec<u8>, now: i64) {
        if let Some(line) = self.chain.append_digest(&self.key, now) {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }

    /// Gets the live file ready for a group at `now`: cuts what a failed group left, and
    /// moves to a new day's file (sealing the old one) when the day has changed.
    fn prepare(&mut self, now: i64) -> Result<(), String> {
        if !self.healthy.load(Ordering::Acquire) {
            self.cut()?;
        }
        let day = now.div_euclid(86_400_000);
        if self.live.as_ref().is_some_and(|live| live.day < day) {
            self.seal()?;
            self.live = None;
        }
        if self.live.is_none() {
            let name = audit::file_name(day);
            let path = self.dir.join(&name);
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let len = file.metadata().map_err(|e| e.to_string())?.len();
            sync_dir(&self.dir).map_err(|e| format!("cannot sync {}: {e}", self.dir.display()))?;
            self.live = Some(Live { day, name, file, len, allocated: 0 });
        }
        Ok(())
    }

    /// Cuts what a failed group may have left off the live file.
    fn cut(&self) -> Result<(), String> {
        match &self.live {
            Some(live) => {
                live.file.set_len(live.len).map_err(|e| format!("cannot cut a failed write off {}: {e}", live.name))
            }
            None => Ok(()),
        }
    }

    /// Makes sure `RESERVE` bytes are allocated past `len` more bytes at the end of the file,
    /// allocating a further `RESERVE_STEP` when it takes a call.
    fn reserve(&mut self, len: u64) -> Result<(), String> {
        let Some(live) = &mut self.live else { return Ok(()) };
        if !self.can_reserve || live.len + len + RESERVE <= live.allocated {
            return Ok(());
        }
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let want = len + RESERVE + RESERVE_STEP;
        match nix::fcntl::fallocate(live.file.as_raw_fd(), flags, live.len as i64, want as i64) {
            Ok(()) => {
                live.allocated = live.len + want;
                Ok(())
            }
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                tracing::warn!("the audit directory's filesystem cannot reserve space (no fallocate): a full disk may leave an executed mutation without its record");
                self.can_reserve = false;
                Ok(())
            }
            Err(e) => Err(format!("cannot reserve space in {}: {e}", live.name)),
        }
    }

    /// Appends whole lines to the live file and syncs them.
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let Some(live) = &mut self.live else { return Err("no live audit file".into()) };
        live.file.write_all_at(bytes, live.len).and_then(|()| live.file.sync_data()).map_err(|e| {
            let _ = live.file.set_len(live.len);
            format!("cannot write {}: {e}", live.name)
        })?;
        live.len += bytes.len() as u64;
        if let Some(mirror) = &self.mirror {
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                mirror.send(line);
            }
        }
        Ok(())
    }

    /// Writes a digest of the unsealed lines, if any.
    fn seal(&mut self) -> Result<(), String> {
        let before = self.chain.clone();
        let mut out = Vec::new();
        self.push_digest(&mut out, now_millis());
        if out.is_empty() {
            return Ok(());
        }
        self.write(&out).inspect_err(|_| self.chain = before)
    }

    fn heal(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::warn!("the audit log can be written again: accepting requests");
        }
    }

    fn fail(&self, why: &str) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!("the audit log cannot be written ({why}): refusing every request until it can");
        }
    }
}

fn answer(group: Vec<Pending>, result: Result<(), String>) {
    for p in group {
        let _ = p.done.send(result.clone());
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsfs_common::audit::verify::Verifier;

    fn group(n: usize, seal: bool) -> (Vec<Pending>, Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>) {
        (0..n)
            .map(|i| {
                let (done, wait) = tokio::sync::oneshot::channel();
                let mut event = Map::new();
                event.insert("eventName".into(), Value::from(format!("Test{i}")));
                (Pending { event, seal: seal && i + 1 == n, mutation: false, done }, wait)
            })
            .unzip()
    }

    fn verify(dir: &Path, key: &SigningKey) -> Result<u64, String> {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        let mut v = Verifier::new(key.verifying_key());
        for name in names {
            v.file(&name.to_string_lossy(), &fs::read(dir.join(&name)).unwrap()).map_err(|f| f.to_string())?;
        }
        Ok(v.finish().events)
    }

    #[test]
    fn groups_are_durable_chained_and_survive_restarts_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let healthy = Arc::new(AtomicBool::new(false));
        let mut writer = Writer::open(dir.path().to_path_buf(), key.clone(), healthy.clone(), None).unwrap();
        assert!(healthy.load(Ordering::Acquire));
        let (pending, mut answers) = group(3, true);
        writer.commit(pending);
        assert!(answers.iter_mut().all(|a| a.try_recv() == Ok(Ok(()))));
        assert_eq!(verify(dir.path(), &key), Ok(3));

        // Unsealed lines left by a crash, then a torn line: the next start cuts the torn
        // line and seals the rest.
        let (pending, _answers) = group(2, false);
        writer.commit(pending);
        drop(writer);
        assert!(verify(dir.path(), &key).unwrap_err().contains("truncated"));
        let live = dir.path().join(audit::file_name(now_millis().div_euclid(86_400_000)));
        let mut bytes = fs::read(&live).unwrap();
        bytes.extend_from_slice(b"{\"eventName\":\"torn");
        fs::write(&live, bytes).unwrap();
        let mut writer = Writer::open(dir.path().to_path_buf(), key.clone(), healthy, None).unwrap();
        assert_eq!(verify(dir.path(), &key), Ok(5));
        let (pending, _answers) = group(1, true);
        writer.commit(pending);
        assert_eq!(verify(dir.path(), &key), Ok(6));
    }
}
