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

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
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
