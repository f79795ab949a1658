//! Crash safety: kmsfs is SIGKILLed while a writer creates, rewrites and fsyncs files
//! through the mount; after mounting again, every file whose last fsync returned reads
//! back exactly as it was then, and no file's header is lost — every backing regular
//! file's header still verifies. Blocks of files written after their last fsync may be
//! damaged (FORMAT.md §5.5: no data journal; the damage is detected, not hidden), so fsck
//! may report those blocks, but nothing else.
//!
//! Three kill cycles on one volume, each at a random moment (the seed is printed).
//!
//! A crash inside `mkdir`, between creating the directory and syncing its ID file, is
//! recreated on the backing directory: the empty directory gets a new ID on next use.
//!
//! A power cut, where a killed process is not enough: the backing directory on a scratch
//! ext4 that is shut down without flushing its journal, as fstests does. What fsync made
//! durable in new directories is there after the journal's replay.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmsfs_tests::{Rng, TestMount};

/// File name → contents as of its last completed fsync.
type Durable = Arc<Mutex<BTreeMap<String, Vec<u8>>>>;

/// Creates and rewrites files until the mount goes away. A file leaves `durable` before
/// it is touched and comes back only once its fsync returned.
fn writer(m: std::path::PathBuf, cycle: u32, seed: u64, durable: Durable, killed: Arc<AtomicBool>) -> usize {
    let mut rng = Rng(seed);
    let mut done = 0;
    for i in 0.. {
        let result = (|| -> std::io::Result<()> {
            let existing: Vec<(String, Vec<u8>)> =
                durable.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            if !existing.is_empty() && rng.below(3) == 0 {
                // Rewrite part of a durable file.
                let (name, mut contents) = existing[rng.below(existing.len() as u64) as usize].clone();
                durable.lock().unwrap().remove(&name);
                let offset = rng.below(contents.len() as u64 + 5000) as usize;
                let len = rng.below(10_000) as usize;
                let data = rng.bytes(len);
                let file = OpenOptions::new().write(true).open(m.join(&name))?;
                file.write_all_at(&data, offset as u64)?;
                file.sync_all()?;
                if contents.len() < offset + data.len() {
                    contents.resize(offset + data.len(), 0);
                }
                contents[offset..offset + data.len()].copy_from_slice(&data);
                durable.lock().unwrap().insert(name, contents);
            } else {
                let name = format!("c{cycle}-{i}");
                let len = rng.below(3 * 4096 + 2000) as usize;
                let data = rng.bytes(len);
                let mut file = OpenOptions::new().write(true).create_new(true).open(m.join(&name))?;
                file.write_all(&data)?;
                file.sync_all()?;
                durable.lock().unwrap().insert(name, data);
            }
            Ok(())
        })();
        match result {
            Ok(()) => done += 1,
            Err(e) => {
                assert!(killed.load(Ordering::SeqCst), "write failed before kmsfs was killed: {e}");
                return done;
            }
        }
    }
    done
}

#[test]
fn fsynced_files_survive_sigkill() {
    let seed: u64 = std::env::var("KMSFS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("fs_crash: seed {seed} (KMSFS_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let mut m = TestMount::new();
    let durable: Durable = Arc::new(Mutex::new(BTreeMap::new()));
    for cycle in 0..3 {
        let killed = Arc::new(AtomicBool::new(false));
        let thread = {
            let (mnt, durable, killed, seed) = (m.mnt(), durable.clone(), killed.clone(), rng.next_u64());
            std::thread::spawn(move || writer(mnt, cycle, seed, durable, killed))
        };
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        killed.store(true, Ordering::SeqCst);
        m.kill();
        let ops = thread.join().unwrap_or_else(|_| panic!("seed {seed}, cycle {cycle}: writer panicked"));
        assert!(ops > 0, "seed {seed}, cycle {cycle}: the writer did nothing before the kill");
        m.mount();

        let durable_now = durable.lock().unwrap().clone();
        for (name, contents) in &durable_now {
            match fs::read(m.path(name)) {
                Ok(read) => assert!(
                    read == *contents,
                    "seed {seed}, cycle {cycle}: {name} ({} bytes fsynced) reads back {} bytes, different",
                    contents.len(),
                    read.len()
                ),
                Err(e) => panic!("seed {seed}, cycle {cycle}: fsynced {name} unreadable: {e}\n{}", m.log()),
            }
        }
        let out = m.kmsfs().arg("fsck").arg(m.cipher()).output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "seed {seed}: fsck failed to run: {report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in report.lines().filter(|l| l.starts_with('/')) {
            let name = line.split(':').next().unwrap().trim_start_matches('/');
            assert!(!line.contains(": header"), "seed {seed}, cycle {cycle}: a header was lost: {line}\n{report}");
            assert!(
                !durable_now.contains_key(name),
                "seed {seed}, cycle {cycle}: fsck reports a fsynced file: {line}\n{report}"
            );
        }
        println!("fs_crash: cycle {cycle}: {ops} writes, {} files durable, fsck: {}", durable_now.len(), report.trim());
    }
}

/// What a crash inside `mkdir` leaves — an empty backing directory with no ID file, or a
/// short one — gets a new ID and works; a directory with entries but no ID stays an error
/// (EIO), since its names can no longer be read.
#[test]
fn an_interrupted_mkdir_gets_a_directory_id() {
    let mut m = TestMount::new();
    for dir in ["no-id", "short-id", "full"] {
        fs::create_dir(m.path(dir)).unwrap();
    }
    fs::write(m.path("full/f"), b"kept").unwrap();
    m.unmount();
    // Tell the backing directories apart by which one the volume loses when it is gone.
    let backing: Vec<_> = fs::read_dir(m.cipher()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    assert_eq!(backing.len(), 3);
    let id_file = |dir: &std::path::Path| dir.join("kmsfs.dirid");
    let full = backing.iter().find(|d| fs::read_dir(d).unwrap().count() == 2).expect("the directory with a file");
    fs::remove_file(id_file(full)).unwrap();
    let empty: Vec<_> = backing.iter().filter(|d| *d != full).collect();
    fs::remove_file(id_file(empty[0])).unwrap();
    fs::write(id_file(empty[1]), b"short").unwrap();
    m.mount();

    for dir in ["no-id", "short-id"] {
        assert_eq!(fs::read_dir(m.path(dir)).unwrap_or_else(|e| panic!("{dir}: {e}\n{}", m.log())).count(), 0, "{dir}");
        fs::write(m.path(&format!("{dir}/new")), dir).unwrap();
    }
    let e = fs::read_dir(m.path("full")).and_then(|mut d| d.next().transpose()).expect_err("no ID, entries");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(m.log().contains("interrupted mkdir"), "{}", m.log());

    m.unmount();
    m.mount();
    for dir in ["no-id", "short-id"] {
        assert_eq!(fs::read(m.path(&format!("{dir}/new"))).unwrap(), dir.as_bytes(), "the new ID was kept");
    }
}

/// A scratch ext4 in a file, mounted through a loop device over a directory (hiding what
/// was there); unmounted and detached on drop.
struct ScratchExt4 {
    /// Holds the image file; removed after `drop` has unmounted and detached it.
    _image: tempfile::TempDir,
    device: String,
    at: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl ScratchExt4 {
    fn over(at: &Path) -> ScratchExt4 {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("ext4.img");
        File::create(&file).unwrap().set_len(64 << 20).unwrap();
        run(Command::new("mkfs.ext4").arg("-q").arg("-F").arg(&file));
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&file));
        let scratch = ScratchExt4 { _image: image, device, at: at.to_path_buf() };
        scratch.mount();
        scratch
    }

    /// Mounted with a journal commit every second, as ext4 does every five.
    fn mount(&self) {
        run(Command::new("mount").args(["-o", "commit=1"]).arg(&self.device).arg(&self.at));
    }

    /// How many transactions the journal has committed.
    fn commits(&self) -> u64 {
        let name = Path::new(&self.device).file_name().unwrap().to_string_lossy().into_owned();
        let info = fs::read_to_string(format!("/proc/fs/jbd2/{name}-8/info")).unwrap();
        info.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("jbd2 info: {info}"))
    }

    /// Waits for the journal's own (timed) commit of what was done before the call: two
    /// commits on, since one may have been under way already. The root's mtime is touched
    /// meanwhile, so that there is always something to commit.
    fn await_commit(&self) {
        let before = self.commits();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let root = File::open(&self.at).unwrap();
        while self.commits() < before + 2 {
            assert!(std::time::Instant::now() < deadline, "no journal commit in 20 s");
            root.set_modified(std::time::SystemTime::now()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts the power: the filesystem stops at once, its journal not flushed
    /// (`EXT4_GOING_FLAGS_NOLOGFLUSH`), so only what was already durable remains.
    fn cut_power(&self) {
        run(Command::new("xfs_io").args(["-x", "-c", "shutdown"]).arg(&self.at));
    }

    /// Unmounts and mounts again, which replays the journal. (Unmounting may have to wait
    /// for the killed kmsfs's files to be let go.)
    fn remount(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !Command::new("umount").arg(&self.at).status().unwrap().success() {
            if std::time::Instant::now() > deadline {
                let users = Command::new("fuser").arg("-vm").arg(&self.at).output().unwrap();
                panic!("{} stays busy: {}", self.at.display(), String::from_utf8_lossy(&users.stderr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.mount();
    }
}

impl Drop for ScratchExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// New directories' IDs are written without waiting (kmsfs syncs them when something made
/// in them becomes durable): after a power cut, files fsynced in new (and nested new)
/// directories read back, a durable file renamed into a new directory is there after that
/// directory's fsync, and new directories whose entries a journal commit recorded still
/// list: one made before that fsync, and one only the journal's timed commit recorded
/// (ext4's ordered data mode, with the ID handed to writeback at once).
#[test]
fn what_fsync_made_durable_in_new_directories_survives_a_power_cut() {
    let mut m = TestMount::new();
    m.unmount();
    let volume_file = fs::read(m.cipher().join("kmsfs.volume")).unwrap();
    let scratch = ScratchExt4::over(&m.cipher());
    fs::remove_dir(m.cipher().join("lost+found")).unwrap(); // not a kmsfs name
    let mut file = File::create(m.cipher().join("kmsfs.volume")).unwrap();
    file.write_all(&volume_file).unwrap();
    file.sync_all().unwrap();
    drop(file); // an open file would keep the filesystem from unmounting
    File::open(m.cipher()).unwrap().sync_all().unwrap();
    m.mount();

    let write_synced = |rel: &str, data: &[u8]| {
        let mut file = File::create(m.path(rel)).unwrap();
        file.write_all(data).unwrap();
        file.sync_all().unwrap();
    };
    write_synced("old", b"durable before");
    File::open(m.mnt()).unwrap().sync_all().unwrap();

    fs::create_dir(m.path("a")).unwrap();
    write_synced("a/f", b"in a new directory");
    fs::create_dir_all(m.path("b/c")).unwrap();
    write_synced("b/c/g", b"two new directories down");
    fs::create_dir(m.path("e")).unwrap();
    fs::write(m.path("e/h"), b"never synced").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::rename(m.path("old"), m.path("d/old")).unwrap();
    File::open(m.path("d")).unwrap().sync_all().unwrap();
    // Nothing synced after this: only the journal's timed commit records it.
    fs::create_dir(m.path("late")).unwrap();
    fs::write(m.path("late/i"), b"committed, never synced").unwrap();
    scratch.await_commit();

    scratch.cut_power();
    m.kill();
    scratch.remount();
    m.mount();

    for (rel, data) in
        [("a/f", &b"in a new directory"[..]), ("b/c/g", b"two new directories down"), ("d/old", b"durable before")]
    {
        assert_eq!(fs::read(m.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}\n{}", m.log())), data, "{rel}");
    }
    assert!(!m.path("old").exists(), "the rename was made durable by d's fsync");
    // Directories whose entries a journal commit recorded list: their IDs were synced with
    // d's fsync (e) or, on ext4's ordered data mode, written before the commit (late).
    // (Listed, not kept: a DirEntry holds the directory open, which would keep the mount busy.)
    for dir in ["e", "late"] {
        let listed = fs::read_dir(m.path(dir)).and_then(|d| d.map(|e| e.map(|_| ())).collect::<Result<Vec<_>, _>>());
        assert!(listed.is_ok(), "{dir}: {listed:?}\n{}", m.log());
    }
    m.unmount();
}
