//! kmsfs and its key agent, end to end: disabling the KMS key cuts off even open files
//! within a second (and enabling it restores them); the data-key cache spares the agent
//! on repeated opens; a stopped agent leaves cached files readable and uncached ones
//! failing with a logged reason until it is back; `kmsfs fsck` names a damaged block.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kmsfs_common::format::block::{BlockIndex, Layout};
use kmsfs_common::format::volume::{BlockSize, CipherSuite};
use kmsfs_tests::TestMount;
use serde_json::json;

fn os_error(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {e}"))
}

/// Reads the whole file from offset 0 through an already open descriptor.
fn read_open(f: &File) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; 1 << 16];
    let n = f.read_at(&mut out, 0)?;
    out.truncate(n);
    Ok(out)
}

/// How many Decrypt calls the agent has answered successfully.
fn decrypts(m: &TestMount) -> u64 {
    m.agent.ok("Kmsfs.GetAgentStats", json!({}))["Requests"]["Decrypt"]["Ok"].as_u64().unwrap_or(0)
}

/// Retries `f` until it returns `Some` or `limit` passes; the value and how long it took.
fn within<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> (Option<T>, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (Some(v), start.elapsed());
        }
        if start.elapsed() > limit {
            return (None, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn disabling_the_key_cuts_off_open_files_within_a_second() {
    let m = TestMount::new();
    fs::write(m.path("secret.txt"), b"top secret").unwrap();
    let open = File::open(m.path("secret.txt")).unwrap();
    assert_eq!(read_open(&open).unwrap(), b"top secret");

    m.agent.ok("DisableKey", json!({"KeyId": m.key_id}));
    let (errno, took) = within(Duration::from_secs(1), || read_open(&open).err().map(|e| os_error(&e)));
    assert_eq!(errno, Some(libc::EACCES), "reads of an open file still work {took:?} after DisableKey");
    eprintln!("an open file was cut off {took:?} after DisableKey");
    assert_eq!(os_error(&File::open(m.path("secret.txt")).unwrap_err()), libc::EACCES, "new opens");
    assert_eq!(os_error(&fs::write(m.path("new.txt"), b"x").unwrap_err()), libc::EACCES, "new files");
    // The names stay readable: they are under the volume's name key, not the file keys.
    assert!(fs::read_dir(m.mnt()).unwrap().any(|e| e.unwrap().file_name() == "secret.txt"));

    m.agent.ok("EnableKey", json!({"KeyId": m.key_id}));
    assert_eq!(read_open(&open).unwrap(), b"top secret", "the open file reads again");
    assert_eq!(fs::read(m.path("secret.txt")).unwrap(), b"top secret");
    fs::write(m.path("new.txt"), b"x").unwrap();
}

#[test]
fn cached_data_keys_spare_the_agent_on_repeated_opens() {
    let mut m = TestMount::new();
    const FILES: usize = 1000;
    fs::create_dir(m.path("many")).unwrap();
    for i in 0..FILES {
        fs::write(m.path(&format!("many/{i}")), format!("file {i}")).unwrap();
    }
    m.remount(); // a cold cache
    let check_all = |m: &TestMount| {
        for i in 0..FILES {
            assert_eq!(fs::read_to_string(m.path(&format!("many/{i}"))).unwrap(), format!("file {i}"));
        }
    };
    let before = decrypts(&m);
    check_all(&m);
    let after_first = decrypts(&m);
    assert!(after_first - before >= FILES as u64, "a cold cache asks the agent once per file");
    check_all(&m);
    assert_eq!(decrypts(&m), after_first, "the second pass asked the agent again");
}

#[test]
fn a_stopped_agent_spares_cached_files_and_is_reached_again() {
    let mut m = TestMount::new();
    fs::write(m.path("cached"), b"A in the cache").unwrap();
    fs::write(m.path("uncached"), b"B not in the cache").unwrap();
    for i in 0..16 {
        fs::write(m.path(&format!("other{i}")), b"x").unwrap();
    }
    m.remount(); // empties the cache
    assert_eq!(fs::read(m.path("cached")).unwrap(), b"A in the cache");
    // Concurrent first reads leave several connections to the agent idle in kmsfs's pool.
    std::thread::scope(|s| {
        for t in 0..4 {
            let m = &m;
            s.spawn(move || {
                for i in (t..16).step_by(4) {
                    assert_eq!(fs::read(m.path(&format!("other{i}"))).unwrap(), b"x");
                }
            });
        }
    });

    m.agent.stop();
    // Give the key-event watcher time to notice the agent went away.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(fs::read(m.path("cached")).unwrap(), b"A in the cache", "a cached key needs no agent");
    let err = fs::read(m.path("uncached")).unwrap_err();
    assert!([libc::EIO, libc::EACCES].contains(&os_error(&err)), "{err}");
    assert!(m.log().contains("unreachable"), "the log does not say why:\n{}", m.log());

    m.agent.start_again();
    // The very first read after the agent is back works: no connection left over from
    // the stopped agent may fail it.
    for name in ["uncached", "cached", "other3"] {
        assert!(fs::read(m.path(name)).is_ok(), "{name} after the agent came back:\n{}", m.log());
    }
}

/// The backing file of the only regular file with at least `min` stored bytes.
fn backing_file_larger_than(root: &Path, min: u64) -> PathBuf {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() && meta.len() >= min {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

#[test]
fn fsck_is_clean_then_names_a_damaged_block() {
    let mut m = TestMount::new();
    fs::create_dir(m.path("docs")).unwrap();
    fs::write(m.path("docs/victim.bin"), vec![0x5a; 3 * 4096 + 10]).unwrap();
    fs::write(m.path("docs/bystander.txt"), b"fine").unwrap();
    std::os::unix::fs::symlink("docs/victim.bin", m.path("link")).unwrap();
    m.unmount();
    let fsck = |m: &TestMount| m.kmsfs().arg("fsck").arg(m.cipher()).output().unwrap();
    let clean = fsck(&m);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");

    let layout = Layout::new(CipherSuite::Aes256Gcm, BlockSize::new(4096).unwrap());
    let victim = backing_file_larger_than(&m.cipher(), layout.stored_size(3 * 4096));
    let at = layout.stored_offset(BlockIndex(1)) + 100;
    let file = OpenOptions::new().read(true).write(true).open(&victim).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    drop(file);

    let damaged = fsck(&m);
    let stdout = String::from_utf8_lossy(&damaged.stdout);
    assert_eq!(damaged.status.code(), Some(1), "{damaged:?}");
    let line = stdout.lines().find(|l| l.contains("victim.bin")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("docs/victim.bin") && line.contains("block 1"), "{line}");
    assert!(!stdout.contains("bystander"), "only the damaged file is named: {stdout}");

    // Mounted, the damaged block reads as an error, its neighbours as data.
    m.mount();
    let f = File::open(m.path("docs/victim.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(os_error(&f.read_exact_at(&mut buf, 4096).unwrap_err()), libc::EIO);
    f.read_exact_at(&mut buf, 8192).unwrap();
    let mut all = Vec::new();
    assert!(File::open(m.path("docs/victim.bin")).unwrap().read_to_end(&mut all).is_err());
}
