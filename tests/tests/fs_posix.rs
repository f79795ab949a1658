//! The POSIX surface of a kmsfs mount, end to end: a real agent, `kmsfs init`, a real
//! FUSE mount, and the calls a user's programs make — read/write at any offset, append,
//! truncate, fallocate, directories, renames (incl. `renameat2`), links, FIFOs, modes,
//! owners, times, permissions under `allow_other`, extended attributes, shared mmap,
//! concurrent I/O — each checked against what a plain directory does, after a remount
//! too, and with nothing of it readable in the backing directory.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kmsfs_tests::TestMount;

/// Bytes that never repeat within a block and contain no zero (so holes stand out).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 7 + u64::from(seed) * 13 + (i as u64 >> 12)) % 251) as u8 + 1).collect()
}

/// A distinctive 64-byte run: if it shows up in the backing directory, contents leaked.
const MARKER: &[u8; 64] = b"<<kmsfs-posix-marker: this must never appear in ciphertext!!!>>\n";

fn os_error(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {e}"))
}

fn nix_errno(e: nix::errno::Errno) -> i32 {
    e as i32
}

fn names(dir: &Path) -> Vec<OsString> {
    let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    names
}

/// Every path under `root` (not following symlinks).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                todo.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Asserts that no name, symlink target, file byte or extended attribute under the
/// backing directory contains any of `needles`.
fn assert_nothing_in_the_clear(cipher: &Path, needles: &[&[u8]]) {
    let contains = |hay: &[u8], what: &str, path: &Path| {
        for needle in needles {
            assert!(
                !hay.windows(needle.len()).any(|w| w == *needle),
                "{what} of {} holds {:?} in the clear",
                path.display(),
                String::from_utf8_lossy(needle)
            );
        }
    };
    for path in walk(cipher) {
        contains(path.file_name().unwrap().as_bytes(), "the name", &path);
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            contains(fs::read_link(&path).unwrap().as_os_str().as_bytes(), "the symlink target", &path);
        } else if meta.is_file() {
            contains(&fs::read(&path).unwrap(), "the contents", &path);
        }
        if !meta.file_type().is_symlink() {
            for name in xattr::list(&path).unwrap() {
                contains(name.as_bytes(), "an xattr name", &path);
                let value = xattr::get(&path, &name).unwrap().unwrap_or_default();
                contains(&value, "an xattr value", &path);
            }
        }
    }
}

// ---- 1. files: create, read, write, truncate, sync, fallocate ----

#[test]
fn writes_across_block_boundaries_and_reads_at_odd_offsets() {
    let m = TestMount::new();
    let path = m.path("blocks.bin");
    let data = pattern(3 * 4096 + 1234, 1);
    fs::write(&path, &data).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), data.len() as u64);
    assert_eq!(fs::read(&path).unwrap(), data);

    let mut model = data.clone();
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // Straddling a block boundary, ending exactly on one, and spanning three blocks.
    for (offset, len, seed) in [(4090usize, 20usize, 2u8), (4096 - 7, 7, 3), (4000, 8300, 4), (0, 1, 5)] {
        let chunk = pattern(len, seed);
        f.write_all_at(&chunk, offset as u64).unwrap();
        model[offset..offset + len].copy_from_slice(&chunk);
    }
    for (offset, len) in [(1usize, 1usize), (4095, 2), (4097, 4095), (8191, 4097), (12_000, 5000), (3, 16_000)] {
        let mut buf = vec![0u8; len];
        let n = read_full_at(&f, &mut buf, offset as u64);
        let end = (offset + len).min(model.len());
        assert_eq!(n, end - offset, "short read at {offset}+{len}");
        assert!(buf[..n] == model[offset..end], "wrong bytes at {offset}+{len}");
    }
    // Reading at and past the end gives nothing.
    let mut buf = [0u8; 10];
    assert_eq!(f.read_at(&mut buf, model.len() as u64).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, model.len() as u64 + 100_000).unwrap(), 0);
    drop(f);
    assert!(fs::read(&path).unwrap() == model);
}

/// Reads until `buf` is full or the file ends.
fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    done
}

#[test]
fn one_mebibyte_in_one_write() {
    let mut m = TestMount::new();
    let path = m.path("big.bin");
    let data = pattern(1 << 20, 7);
    let mut f = File::create(&path).unwrap();
    assert_eq!(f.write(&data).unwrap(), data.len(), "a 1 MiB write is taken whole");
    drop(f);
    assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 20);
    assert!(fs::read(&path).unwrap() == data);
    m.remount();
    assert!(fs::read(&path).unwrap() == data);
}

#[test]
fn sparse_writes_far_past_the_end_leave_holes_of_zeros() {
    let mut m = TestMount::new();
    let path = m.path("sparse.bin");
    let far = 10 * (1 << 20) + 3;
    let f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", far).unwrap();
    assert_eq!(f.metadata().unwrap().len(), far + 4);
    drop(f);
    let check = |path: &Path| {
        let all = fs::read(path).unwrap();
        assert_eq!(all.len() as u64, far + 4);
        assert_eq!(&all[..4], b"head");
        assert_eq!(&all[far as usize..], b"tail");
        assert!(all[4..far as usize].iter().all(|&b| b == 0), "the hole does not read as zeros");
    };
    check(&path);
    m.remount();
    check(&path);
}

#[test]
fn append_from_two_descriptors_interleaves_at_the_end() {
    let m = TestMount::new();
    let path = m.path("log.txt");
    fs::write(&path, b"start\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(&path).unwrap();
    let mut b = OpenOptions::new().append(true).open(&path).unwrap();
    let mut expected = b"start\n".to_vec();
    for i in 0..20 {
        let (fd, who) = if i % 2 == 0 { (&mut a, "a") } else { (&mut b, "b") };
        let line = format!("{who} line {i} {}\n", "x".repeat(i * 301));
        fd.write_all(line.as_bytes()).unwrap();
        expected.extend_from_slice(line.as_bytes());
    }
    drop((a, b));
    assert!(fs::read(&path).unwrap() == expected, "appends overwrote each other");
}

#[test]
fn truncate_down_and_up() {
    let mut m = TestMount::new();
    let path = m.path("trunc.bin");
    let data = pattern(20_000, 9);
    fs::write(&path, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    f.set_len(5000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5000);
    assert!(fs::read(&path).unwrap() == data[..5000]);
    f.set_len(4096).unwrap(); // on a block boundary
    assert!(fs::read(&path).unwrap() == data[..4096]);
    f.set_len(30_000).unwrap();
    let grown = fs::read(&path).unwrap();
    assert_eq!(grown.len(), 30_000);
    assert!(grown[..4096] == data[..4096]);
    assert!(grown[4096..].iter().all(|&b| b == 0), "growing must add zeros, not old contents");
    f.set_len(0).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"");
    f.write_all_at(b"again", 0).unwrap();
    drop(f);
    // truncate(2) by path, without an open descriptor.
    OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    fs::write(&path, b"0123456789").unwrap();
    nix::unistd::truncate(&path, 3).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"012");
    m.remount();
    assert_eq!(fs::read(&path).unwrap(), b"012");
}

#[test]
fn fsync_and_fdatasync_succeed_and_keep_the_data() {
    let mut m = TestMount::new();
    let path = m.path("synced.bin");
    let mut f = File::create(&path).unwrap();
    f.write_all(b"first").unwrap();
    f.sync_all().unwrap();
    f.write_all(b" second").unwrap();
    f.sync_data().unwrap();
    drop(f);
    m.kill(); // no clean unmount: what was synced must be there
    m.mount();
    assert_eq!(fs::read(&path).unwrap(), b"first second");
}

/// A new directory's ID is synced at the next fsync; one removed before that may have
/// given its name to a file by then, and fsync, rename and link must still work.
#[test]
fn fsync_works_after_a_new_directory_gave_its_name_to_a_file() {
    let m = TestMount::new();
    fs::create_dir(m.path("short-lived")).unwrap();
    fs::remove_dir(m.path("short-lived")).unwrap();
    let mut f = File::create(m.path("short-lived")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    fs::hard_link(m.path("short-lived"), m.path("second name")).unwrap();
    fs::rename(m.path("second name"), m.path("third name")).unwrap();
}

/// The backing file system gives a removed directory's inode number to the next new
/// one, here while the kernel still holds the old directory open. Something can be made
/// in the new directory (the kernel must not take it for the removed one), and its names
/// are sealed under the new directory's own ID: they read back after a remount.
#[test]
fn a_new_directory_with_a_removed_ones_inode_number_seals_names_under_its_own_id() {
    let mut m = TestMount::new();
    let rounds = 20;
    let mut reused = 0;
    for round in 0..rounds {
        let old = m.path(&format!("old{round}"));
        fs::create_dir(&old).unwrap();
        fs::write(old.join("x"), b"x").unwrap(); // kmsfs reads the old directory's ID
        let held = File::open(&old).unwrap();
        let old_ino = held.metadata().unwrap().ino();
        fs::remove_file(old.join("x")).unwrap();
        fs::remove_dir(&old).unwrap();
        let new = m.path(&format!("new{round}"));
        fs::create_dir(&new).unwrap();
        let backing_inos = fs::read_dir(m.cipher()).unwrap().map(|e| e.unwrap().metadata().unwrap().ino());
        reused += usize::from(backing_inos.into_iter().any(|ino| ino == old_ino));
        fs::write(new.join("name"), format!("{round}")).unwrap();
        drop(held);
    }
    assert!(reused > 0, "no inode number was reused in {rounds} rounds: this test proves nothing here");
    m.remount();
    for round in 0..rounds {
        let name = m.path(&format!("new{round}/name"));
        assert_eq!(fs::read_to_string(&name).unwrap(), format!("{round}"), "{} ({reused} reused)", name.display());
    }
}

#[test]
fn fallocate_extends_keeps_size_and_refuses_holes() {
    use nix::fcntl::{fallocate, FallocateFlags};
    let m = TestMount::new();
    let path = m.path("alloc.bin");
    fs::write(&path, b"abc").unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, 10_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10_000, "mode 0 extends the size");
    let all = fs::read(&path).unwrap();
    assert_eq!(&all[..3], b"abc");
    assert!(all[3..].iter().all(|&b| b == 0));
    // Within the file, mode 0 changes nothing.
    fallocate(f.as_raw_fd(), FallocateFlags::empty(), 100, 200).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10_000);
    fallocate(f.as_raw_fd(), FallocateFlags::FALLOC_FL_KEEP_SIZE, 0, 50_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10_000, "KEEP_SIZE keeps the size");
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let err = fallocate(f.as_raw_fd(), punch, 0, 4096).unwrap_err();
    assert_eq!(nix_errno(err), libc::EOPNOTSUPP);
    assert_eq!(&fs::read(&path).unwrap()[..3], b"abc", "a refused punch leaves the data");
}

// ---- 2. directories and names ----

#[test]
fn mkdir_rmdir_and_not_empty() {
    let m = TestMount::new();
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir_all(m.path("d/e/f")).unwrap();
    assert!(fs::metadata(m.path("d/e/f")).unwrap().is_dir());
    assert_eq!(os_error(&fs::create_dir(m.path("d")).unwrap_err()), libc::EEXIST);
    assert_eq!(os_error(&fs::remove_dir(m.path("d")).unwrap_err()), libc::ENOTEMPTY);
    fs::write(m.path("d/e/f/file"), b"x").unwrap();
    assert_eq!(os_error(&fs::remove_dir(m.path("d/e/f")).unwrap_err()), libc::ENOTEMPTY);
    assert_eq!(os_error(&fs::remove_dir(m.path("d/e/f/file")).unwrap_err()), libc::ENOTDIR);
    assert_eq!(names(&m.path("d/e/f")), ["file"], "a refused rmdir leaves the directory as it was");
    fs::remove_file(m.path("d/e/f/file")).unwrap();
    fs::remove_dir(m.path("d/e/f")).unwrap();
    fs::remove_dir(m.path("d/e")).unwrap();
    fs::remove_dir(m.path("d")).unwrap();
    assert!(names(&m.mnt()).is_empty());
    assert_eq!(os_error(&fs::remove_dir(m.path("d")).unwrap_err()), libc::ENOENT);
    // Nothing is left behind in the backing directory but the volume file.
    let left: Vec<_> = names(&m.cipher()).into_iter().filter(|n| n != "kmsfs.volume").collect();
    assert!(left.is_empty(), "left in the backing directory: {left:?}");
}

#[test]
fn readdir_lists_exactly_the_names_given() {
    let mut m = TestMount::new();
    let long_ascii = "L".repeat(255);
    let long_unicode = format!("{}a", "é".repeat(127)); // 255 bytes
    assert_eq!(long_unicode.len(), 255);
    let wanted = [
        "plain.txt",
        "with spaces and  two",
        " leading and trailing ",
        "ünïcödé — 日本語 🎉",
        "kmsfs.volume",
        "kmsfs.dirid",
        "kmsfs.long.abc.name",
        ".hidden",
        "-dash",
        long_ascii.as_str(),
        long_unicode.as_str(),
    ];
    fs::create_dir(m.path("sub")).unwrap();
    for dir in ["", "sub"] {
        for (i, name) in wanted.iter().enumerate() {
            fs::write(m.mnt().join(dir).join(name), vec![b'x'; i]).unwrap();
        }
    }
    let check = |m: &TestMount| {
        for dir in ["", "sub"] {
            let mut expected: Vec<OsString> = wanted.iter().map(OsString::from).collect();
            if dir.is_empty() {
                expected.push("sub".into());
            }
            expected.sort();
            assert_eq!(names(&m.mnt().join(dir)), expected, "listing of /{dir}");
            for (i, name) in wanted.iter().enumerate() {
                let path = m.mnt().join(dir).join(name);
                assert_eq!(fs::metadata(&path).unwrap().len(), i as u64, "size of {name}");
                assert_eq!(fs::read(&path).unwrap(), vec![b'x'; i]);
            }
        }
    };
    check(&m);
    let too_long = "x".repeat(256);
    assert_eq!(os_error(&fs::write(m.path(&too_long), b"").unwrap_err()), libc::ENAMETOOLONG);
    m.remount();
    check(&m);
    // Unlinking takes the long names' side files with them.
    for dir in ["sub", ""] {
        for name in wanted {
            fs::remove_file(m.mnt().join(dir).join(name)).unwrap();
        }
    }
    fs::remove_dir(m.path("sub")).unwrap();
    assert!(names(&m.mnt()).is_empty());
    let left: Vec<_> = names(&m.cipher()).into_iter().filter(|n| n != "kmsfs.volume").collect();
    assert!(left.is_empty(), "left in the backing directory: {left:?}");
}

#[test]
fn unlink_removes_the_name_and_an_open_file_stays_readable() {
    let m = TestMount::new();
    fs::write(m.path("gone"), b"still here").unwrap();
    let mut open = File::open(m.path("gone")).unwrap();
    fs::remove_file(m.path("gone")).unwrap();
    assert_eq!(os_error(&fs::metadata(m.path("gone")).unwrap_err()), libc::ENOENT);
    assert!(names(&m.mnt()).is_empty());
    let mut back = String::new();
    open.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here", "an unlinked open file reads on");
    assert_eq!(os_error(&fs::remove_file(m.path("gone")).unwrap_err()), libc::ENOENT);
}

#[test]
fn an_unlinked_open_file_keeps_working_and_never_touches_its_successor() {
    let m = TestMount::new();
    let f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(m.path("tmp")).unwrap();
    f.write_all_at(b"scratch space", 0).unwrap();
    fs::remove_file(m.path("tmp")).unwrap();
    // A new file under the same name: nothing done through the old descriptor may reach it.
    fs::write(m.path("tmp"), b"a new file").unwrap();
    fs::set_permissions(m.path("tmp"), fs::Permissions::from_mode(0o644)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100)); // past the kernel's attribute cache

    f.set_len(7).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o600)).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!((meta.len(), meta.mode() & 0o777, meta.nlink()), (7, 0o600, 0));
    let mut buf = [0u8; 32];
    let n = f.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"scratch");
    f.write_all_at(b"!", 7).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8);

    let new = fs::metadata(m.path("tmp")).unwrap();
    assert_eq!((new.len(), new.mode() & 0o777), (10, 0o644), "the new file was changed");
    assert_eq!(fs::read(m.path("tmp")).unwrap(), b"a new file");
}

// ---- 3. rename ----

#[test]
fn rename_plain_over_existing_and_across_directories() {
    let mut m = TestMount::new();
    fs::write(m.path("a"), b"alpha").unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_eq!(names(&m.mnt()), ["b"]);
    assert_eq!(fs::read(m.path("b")).unwrap(), b"alpha");

    fs::write(m.path("c"), b"charlie").unwrap();
    fs::rename(m.path("c"), m.path("b")).unwrap();
    assert_eq!(names(&m.mnt()), ["b"]);
    assert_eq!(fs::read(m.path("b")).unwrap(), b"charlie");

    fs::create_dir_all(m.path("x/y")).unwrap();
    fs::rename(m.path("b"), m.path("x/y/moved")).unwrap();
    assert_eq!(names(&m.mnt()), ["x"]);
    assert_eq!(fs::read(m.path("x/y/moved")).unwrap(), b"charlie");
    // A long name moves across directories too.
    let long = "n".repeat(250);
    fs::rename(m.path("x/y/moved"), m.path(&format!("x/{long}"))).unwrap();
    fs::rename(m.path(&format!("x/{long}")), m.path("back")).unwrap();
    assert_eq!(fs::read(m.path("back")).unwrap(), b"charlie");
    m.remount();
    assert_eq!(names(&m.mnt()), ["back", "x"]);
    assert_eq!(names(&m.path("x")), ["y"]);
    assert!(names(&m.path("x/y")).is_empty());
    assert_eq!(fs::read(m.path("back")).unwrap(), b"charlie");
}

#[test]
fn rename_a_directory_with_its_contents() {
    let mut m = TestMount::new();
    fs::create_dir_all(m.path("proj/src/deep")).unwrap();
    fs::write(m.path("proj/readme"), b"readme").unwrap();
    fs::write(m.path("proj/src/deep/main.rs"), b"fn main() {}").unwrap();
    // Look them up so the kernel and kmsfs know the old paths.
    assert_eq!(fs::read(m.path("proj/src/deep/main.rs")).unwrap(), b"fn main() {}");
    let open = File::open(m.path("proj/readme")).unwrap();
    fs::create_dir(m.path("archive")).unwrap();
    fs::rename(m.path("proj"), m.path("archive/proj-old")).unwrap();
    assert_eq!(os_error(&fs::metadata(m.path("proj")).unwrap_err()), libc::ENOENT);
    assert_eq!(fs::read(m.path("archive/proj-old/src/deep/main.rs")).unwrap(), b"fn main() {}");
    assert_eq!(fs::read(m.path("archive/proj-old/readme")).unwrap(), b"readme");
    let mut back = Vec::new();
    (&open).read_to_end(&mut back).unwrap();
    assert_eq!(back, b"readme");
    fs::write(m.path("archive/proj-old/src/new"), b"new").unwrap();
    assert_eq!(names(&m.path("archive/proj-old/src")), ["deep", "new"]);
    drop(open);
    m.remount();
    assert_eq!(fs::read(m.path("archive/proj-old/src/deep/main.rs")).unwrap(), b"fn main() {}");
    assert_eq!(fs::read(m.path("archive/proj-old/src/new")).unwrap(), b"new");
}

#[test]
fn renameat2_noreplace_and_exchange() {
    use nix::fcntl::{renameat2, RenameFlags};
    let mut m = TestMount::new();
    fs::write(m.path("one"), b"file one").unwrap();
    fs::write(m.path("two"), b"file two").unwrap();
    let err = renameat2(None, &m.path("one"), None, &m.path("two"), RenameFlags::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(nix_errno(err), libc::EEXIST);
    assert_eq!(fs::read(m.path("two")).unwrap(), b"file two");
    renameat2(None, &m.path("one"), None, &m.path("three"), RenameFlags::RENAME_NOREPLACE).unwrap();
    assert_eq!(names(&m.mnt()), ["three", "two"]);

    // Exchange a file with a directory in another directory, long names included.
    fs::create_dir_all(m.path("d/inner")).unwrap();
    fs::write(m.path("d/inner/f"), b"inside").unwrap();
    let long = "z".repeat(240);
    fs::rename(m.path("three"), m.path(&long)).unwrap();
    renameat2(None, &m.path(&long), None, &m.path("d/inner"), RenameFlags::RENAME_EXCHANGE).unwrap();
    let check = |m: &TestMount| {
        assert_eq!(fs::read(m.path("d/inner")).unwrap(), b"file one");
        assert!(fs::metadata(m.path(&long)).unwrap().is_dir());
        assert_eq!(fs::read(m.path(&format!("{long}/f"))).unwrap(), b"inside");
        assert_eq!(names(&m.path("d")), ["inner"]);
    };
    check(&m);
    m.remount();
    check(&m);
    let err = renameat2(None, &m.path("nope"), None, &m.path("two"), RenameFlags::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(nix_errno(err), libc::ENOENT);
}

// ---- 4. links, symlinks, FIFOs, statfs ----

#[test]
fn hard_links_share_inode_and_contents() {
    let mut m = TestMount::new();
    fs::create_dir(m.path("other")).unwrap();
    fs::write(m.path("orig"), b"shared").unwrap();
    fs::hard_link(m.path("orig"), m.path("other/link")).unwrap();
    let (a, b) = (fs::metadata(m.path("orig")).unwrap(), fs::metadata(m.path("other/link")).unwrap());
    assert_eq!(a.ino(), b.ino());
    assert_eq!((a.nlink(), b.nlink()), (2, 2));
    OpenOptions::new().write(true).open(m.path("other/link")).unwrap().write_all_at(b"SH", 0).unwrap();
    assert_eq!(fs::read(m.path("orig")).unwrap(), b"SHared");
    m.remount();
    assert_eq!(fs::read(m.path("other/link")).unwrap(), b"SHared");
    // Renaming one link over another of the same file does nothing (rename(2)), even
    // with a long name.
    let long = "h".repeat(250);
    fs::hard_link(m.path("orig"), m.path(&long)).unwrap();
    fs::rename(m.path(&long), m.path("orig")).unwrap();
    m.remount();
    assert_eq!(names(&m.mnt()), [long.as_str(), "orig", "other"]);
    fs::remove_file(m.path(&long)).unwrap();
    fs::remove_file(m.path("orig")).unwrap();
    assert_eq!(fs::metadata(m.path("other/link")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("other/link")).unwrap(), b"SHared");
    // A new link, renamed away and then removed, leaves the first one reachable.
    fs::hard_link(m.path("other/link"), m.path("third")).unwrap();
    assert_eq!(fs::metadata(m.path("third")).unwrap().nlink(), 2);
    fs::rename(m.path("third"), m.path("other/renamed")).unwrap();
    assert_eq!(fs::read(m.path("other/renamed")).unwrap(), b"SHared");
    fs::remove_file(m.path("other/renamed")).unwrap();
    assert_eq!(fs::metadata(m.path("other/link")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("other/link")).unwrap(), b"SHared");
    assert_eq!(names(&m.path("other")), ["link"]);
}

#[test]
fn symlinks_read_back_exactly_and_are_encrypted_underneath() {
    let mut m = TestMount::new();
    let long_target = format!("/{}", ["some-long-directory-name"; 60].join("/"));
    let targets = [
        "plain.txt".to_string(),
        "../relative/up/there".to_string(),
        "/absolute/secret-target-path".to_string(),
        "dir with spaces/ünï".to_string(),
        long_target,
    ];
    fs::write(m.path("plain.txt"), b"via link").unwrap();
    for (i, target) in targets.iter().enumerate() {
        std::os::unix::fs::symlink(target, m.path(&format!("link{i}"))).unwrap();
    }
    let check = |m: &TestMount| {
        for (i, target) in targets.iter().enumerate() {
            let link = m.path(&format!("link{i}"));
            assert_eq!(fs::read_link(&link).unwrap(), Path::new(target), "readlink of link{i}");
            let meta = fs::symlink_metadata(&link).unwrap();
            assert!(meta.file_type().is_symlink());
            assert_eq!(meta.len(), target.len() as u64, "a symlink's size is its target's length");
        }
        assert_eq!(fs::read(m.path("link0")).unwrap(), b"via link", "following a link works");
    };
    check(&m);
    // Encryption grows a target: the longest ones a plain directory takes (4095 bytes) do
    // not fit, and say so (ENAMETOOLONG), leaving nothing behind.
    let err = std::os::unix::fs::symlink("t".repeat(4000), m.path("too-long")).unwrap_err();
    assert_eq!(os_error(&err), libc::ENAMETOOLONG);
    assert_eq!(os_error(&fs::symlink_metadata(m.path("too-long")).unwrap_err()), libc::ENOENT);
    m.remount();
    check(&m);
    let needles: Vec<&[u8]> = vec![b"secret-target", b"relative/up", b"some-long-directory"];
    assert_nothing_in_the_clear(&m.cipher(), &needles);
}

#[test]
fn fifo_passes_data_through() {
    let m = TestMount::new();
    let fifo = m.path("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fs::metadata(&fifo).unwrap().file_type()));
    let writer_path = fifo.clone();
    let writer = std::thread::spawn(move || {
        let mut w = OpenOptions::new().write(true).open(writer_path).unwrap();
        w.write_all(b"through the pipe").unwrap();
    });
    let mut got = String::new();
    File::open(&fifo).unwrap().read_to_string(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got, "through the pipe");
}

#[test]
fn statfs_reports_the_backing_filesystem() {
    let m = TestMount::new();
    let s = nix::sys::statvfs::statvfs(&m.mnt()).unwrap();
    assert!(s.blocks() > 0 && s.block_size() > 0 && s.files() > 0, "{s:?}");
    assert!(s.name_max() >= 255);
}

// ---- 5. modes, owners, times, permissions ----

#[test]
fn chmod_chown_and_utimens() {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let mut m = TestMount::new();
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    for (name, mode) in [("f", 0o640), ("d", 0o711), ("f", 0o4755)] {
        fs::set_permissions(m.path(name), fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(fs::metadata(m.path(name)).unwrap().mode() & 0o7777, mode, "mode of {name}");
    }
    std::os::unix::fs::chown(m.path("f"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::chown(m.path("d"), Some(4321), None).unwrap();
    let atime = TimeSpec::new(1_000_000_000, 123_456_789);
    let mtime = TimeSpec::new(1_234_567_890, 987_654_321);
    utimensat(None, &m.path("f"), &atime, &mtime, UtimensatFlags::FollowSymlink).unwrap();
    let check = |m: &TestMount| {
        let f = fs::metadata(m.path("f")).unwrap();
        assert_eq!((f.uid(), f.gid()), (1234, 5678));
        assert_eq!((f.atime(), f.atime_nsec()), (1_000_000_000, 123_456_789));
        assert_eq!((f.mtime(), f.mtime_nsec()), (1_234_567_890, 987_654_321));
        let d = fs::metadata(m.path("d")).unwrap();
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (4321, 0, 0o711));
    };
    check(&m);
    m.remount();
    check(&m);
}

/// Runs `args` as uid/gid 65534 (nobody) with no supplementary groups.
fn as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .expect("run setpriv")
}

/// The options the kernel shows for the mount at `mnt`.
fn mount_options(mnt: &Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts.lines().find(|l| l.split(' ').nth(1) == mnt.to_str()).expect("the mount is listed");
    line.split(' ').nth(3).unwrap().to_string()
}

#[test]
fn a_private_mount_admits_its_owner_alone_and_the_backing_directory_decides() {
    let m = TestMount::new();
    fs::set_permissions(m.mnt().parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!mount_options(&m.mnt()).contains("default_permissions"), "{}", mount_options(&m.mnt()));
    fs::write(m.path("plain"), b"#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(m.path("plain"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = as_nobody(&["cat", m.path("plain").to_str().unwrap()]);
    assert!(!out.status.success(), "another user entered a mount without allow_other: {out:?}");

    // access(2) is answered from the backing file (kmsfs runs as root here, as the caller).
    use nix::unistd::{access, AccessFlags};
    let plain = m.path("plain");
    assert_eq!(access(&plain, AccessFlags::R_OK | AccessFlags::W_OK), Ok(()));
    assert_eq!(access(&plain, AccessFlags::X_OK), Err(nix::errno::Errno::EACCES), "no x bit, even for root");
    assert_eq!(access(&m.path("missing"), AccessFlags::F_OK), Err(nix::errno::Errno::ENOENT));
    let ran = Command::new(&plain).output();
    assert_eq!(ran.map_err(|e| os_error(&e)).err(), Some(libc::EACCES), "executing a file without an x bit");
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(access(&plain, AccessFlags::X_OK), Ok(()));
    assert_eq!(Command::new(&plain).output().unwrap().stdout, b"ran\n");
}

#[test]
fn allow_other_permissions_are_enforced_and_creators_own_their_files() {
    let m = TestMount::with(&[], &["allow_other"]);
    assert!(mount_options(&m.mnt()).contains("default_permissions"), "the kernel checks every caller");
    // nobody must be able to reach the mount point.
    fs::set_permissions(m.mnt().parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.path("private"), b"root only").unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("public"), b"everyone").unwrap();
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();

    let private = as_nobody(&["cat", m.path("private").to_str().unwrap()]);
    assert!(!private.status.success(), "nobody read a 0600 root file: {:?}", private);
    assert!(String::from_utf8_lossy(&private.stderr).contains("Permission denied"), "{private:?}");
    let public = as_nobody(&["cat", m.path("public").to_str().unwrap()]);
    assert!(public.status.success(), "{public:?}");
    assert_eq!(public.stdout, b"everyone");
    let write = as_nobody(&["sh", "-c", &format!("echo no > '{}'", m.path("public").display())]);
    assert!(!write.status.success(), "nobody wrote a 0644 root file");

    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    let made = m.path("shared/by-nobody");
    let out = as_nobody(&["sh", "-c", &format!("echo hi > '{}' && mkdir '{}.d'", made.display(), made.display())]);
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let meta = fs::metadata(&made).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "a new file belongs to its creator");
    let dir_meta = fs::metadata(format!("{}.d", made.display())).unwrap();
    assert_eq!((dir_meta.uid(), dir_meta.gid()), (65534, 65534), "a new directory belongs to its creator");
    assert_eq!(fs::read(&made).unwrap(), b"hi\n");
    let back = as_nobody(&["cat", made.to_str().unwrap()]);
    assert_eq!(back.stdout, b"hi\n", "{back:?}");

    // In a setgid directory, new entries take the directory's group, and new directories
    // the setgid bit too.
    fs::create_dir(m.path("team")).unwrap();
    std::os::unix::fs::chown(m.path("team"), None, Some(4242)).unwrap();
    fs::set_permissions(m.path("team"), fs::Permissions::from_mode(0o2777)).unwrap();
    let made = m.path("team/by-nobody");
    let out = as_nobody(&["sh", "-c", &format!("echo hi > '{}' && mkdir '{}.d'", made.display(), made.display())]);
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    let meta = fs::metadata(&made).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 4242), "a new file in a setgid directory takes its group");
    let dir_meta = fs::metadata(format!("{}.d", made.display())).unwrap();
    assert_eq!((dir_meta.uid(), dir_meta.gid()), (65534, 4242), "so does a new directory");
    assert_ne!(dir_meta.mode() & libc::S_ISGID, 0, "and it is setgid too");
}

/// Writing to or truncating a setuid/setgid file clears those bits unless the writer has
/// CAP_FSETID (root), as on any Linux filesystem. kmsfs does this itself, as the kernel
/// asks (FUSE_HANDLE_KILLPRIV_V2), which spares a security.capability lookup per write.
#[test]
fn writes_and_truncations_by_others_clear_setuid_and_setgid() {
    let mut m = TestMount::with(&[], &["allow_other"]);
    fs::set_permissions(m.mnt().parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    let special = |name: &str, mode: u32| {
        let path = m.path(name);
        fs::write(&path, b"data").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    };
    let mode_of = |path: &Path| fs::metadata(path).unwrap().mode() & 0o7777;

    // Root keeps the bits.
    let by_root = special("by-root", 0o6777);
    fs::OpenOptions::new().append(true).open(&by_root).unwrap().write_all(b" more").unwrap();
    assert_eq!(mode_of(&by_root), 0o6777, "root's write keeps setuid and setgid");

    // Another user's write drops them; setgid without group execution (mandatory locking)
    // stays.
    let written = special("written", 0o6777);
    let out = as_nobody(&["sh", "-c", &format!("echo more >> '{}'", written.display())]);
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    assert_eq!(mode_of(&written), 0o0777, "a write by nobody drops setuid and setgid");
    let locking = special("locking", 0o6766);
    let out = as_nobody(&["sh", "-c", &format!("echo more >> '{}'", locking.display())]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode_of(&locking), 0o2766, "setgid without group execution stays");

    // So does another user's truncation, by truncate(1) or by O_TRUNC.
    let truncated = special("truncated", 0o6777);
    let out = as_nobody(&["truncate", "-s", "1", truncated.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode_of(&truncated), 0o0777, "a truncation by nobody drops setuid and setgid");
    let replaced = special("replaced", 0o4777);
    let out = as_nobody(&["sh", "-c", &format!("echo new > '{}'", replaced.display())]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode_of(&replaced), 0o0777);
    assert_eq!(fs::read(&replaced).unwrap(), b"new\n");

    // What the mount showed is what the backing files keep.
    m.remount();
    assert_eq!(
        ["by-root", "written", "locking", "truncated", "replaced"].map(|n| mode_of(&m.path(n))),
        [0o6777, 0o0777, 0o2766, 0o0777, 0o0777]
    );
}

// ---- 6. extended attributes ----

#[test]
fn user_xattrs_on_files_and_directories() {
    let mut m = TestMount::new();
    fs::write(m.path("f"), b"x").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    for target in ["f", "d"] {
        let p = m.path(target);
        xattr::set(&p, "user.colour", b"secret-xattr-value").unwrap();
        xattr::set(&p, "user.empty", b"").unwrap();
        xattr::set(&p, "user.big", &vec![7u8; 3000]).unwrap();
        assert_eq!(xattr::get(&p, "user.colour").unwrap().unwrap(), b"secret-xattr-value");
        assert_eq!(xattr::get(&p, "user.empty").unwrap().unwrap(), b"");
        assert_eq!(xattr::get(&p, "user.missing").unwrap(), None);
        let mut listed: Vec<_> = xattr::list(&p).unwrap().collect();
        listed.sort();
        assert_eq!(listed, ["user.big", "user.colour", "user.empty"], "xattrs of {target}");
        xattr::remove(&p, "user.empty").unwrap();
        assert_eq!(xattr::get(&p, "user.empty").unwrap(), None);
        assert_eq!(os_error(&xattr::remove(&p, "user.empty").unwrap_err()), libc::ENODATA);
    }
    m.remount();
    for target in ["f", "d"] {
        let p = m.path(target);
        assert_eq!(xattr::get(&p, "user.colour").unwrap().unwrap(), b"secret-xattr-value");
        assert_eq!(xattr::get(&p, "user.big").unwrap().unwrap(), vec![7u8; 3000]);
    }
    assert_nothing_in_the_clear(&m.cipher(), &[b"colour", b"secret-xattr"]);
}

#[test]
fn xattr_create_and_replace_flags() {
    let m = TestMount::new();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    let set = |name: &str, value: &[u8], flags: i32| xattr_with_flags(&p, name, value, flags);
    assert_eq!(set("user.k", b"v1", libc::XATTR_REPLACE).unwrap_err(), nix::errno::Errno::ENODATA);
    set("user.k", b"v1", libc::XATTR_CREATE).unwrap();
    assert_eq!(set("user.k", b"v2", libc::XATTR_CREATE).unwrap_err(), nix::errno::Errno::EEXIST);
    assert_eq!(xattr::get(&p, "user.k").unwrap().unwrap(), b"v1");
    set("user.k", b"v3", libc::XATTR_REPLACE).unwrap();
    assert_eq!(xattr::get(&p, "user.k").unwrap().unwrap(), b"v3");
    // Names longer than the format's limit are refused as too long (ERANGE); other
    // namespaces than user are not stored.
    assert_eq!(os_error(&xattr::set(&p, format!("user.{}", "n".repeat(200)), b"v").unwrap_err()), libc::ERANGE);
    assert_eq!(os_error(&xattr::set(&p, "trusted.k", b"v").unwrap_err()), libc::EOPNOTSUPP);
    // The status attribute is read-only.
    assert!(xattr::set(m.mnt(), "user.kmsfs.status", b"{}").is_err());
}

/// setxattr(2) with flags, via python3 (os.setxattr), so that the test needs no unsafe.
fn xattr_with_flags(path: &Path, name: &str, value: &[u8], flags: i32) -> nix::Result<()> {
    let script = "import os, sys\n\
        try:\n    os.setxattr(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4]))\n\
        except OSError as e:\n    sys.exit(e.errno)\n";
    let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
    let status = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap(), name, &hex, &flags.to_string()])
        .status()
        .expect("python3");
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(nix::errno::Errno::from_raw(code)),
        None => panic!("python3 died"),
    }
}

#[test]
fn status_xattr_and_kmsfs_status() {
    let m = TestMount::new();
    fs::write(m.path("f"), b"x").unwrap();
    let raw = xattr::get(m.mnt(), "user.kmsfs.status").unwrap().expect("status attribute");
    let status: serde_json::Value = serde_json::from_slice(&raw).expect("status is JSON");
    assert!(status["DataKeyCache"]["Entries"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["KeyId"].as_str().unwrap().contains(&m.key_id), "{status}");
    let out = m.kmsfs().arg("status").arg(m.mnt()).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("kmsfs status prints JSON");
    assert_eq!(printed["KeyId"], status["KeyId"]);
    // Not on other entries, and not listed as a user attribute.
    assert_eq!(xattr::get(m.path("f"), "user.kmsfs.status").unwrap(), None);
}

// ---- 7. shared writable mmap ----

/// Maps `file` shared and writable.
#[allow(unsafe_code)]
fn map_shared(file: &File) -> memmap2::MmapMut {
    // SAFETY: the file lives in this test's private mount and nothing else truncates or
    // writes it while the mapping exists.
    unsafe { memmap2::MmapMut::map_mut(file) }.expect("mmap")
}

#[test]
fn shared_writable_mmap_writes_through() {
    let mut m = TestMount::new();
    let path = m.path("mapped.bin");
    let f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    f.set_len(3 * 4096 + 100).unwrap();
    let mut map = map_shared(&f);
    let data = pattern(map.len(), 11);
    map.copy_from_slice(&data);
    map[4090..4100].copy_from_slice(b"ACROSSBLKS");
    map.flush().unwrap();
    drop(map);
    drop(f);
    let mut expected = data.clone();
    expected[4090..4100].copy_from_slice(b"ACROSSBLKS");
    assert!(fs::read(&path).unwrap() == expected, "read() does not see the mapped writes");
    m.remount();
    assert!(fs::read(&path).unwrap() == expected, "mapped writes lost at remount");
}

// ---- 8. concurrency ----

#[test]
fn concurrent_writers_of_disjoint_regions_and_readers() {
    let mut m = TestMount::new();
    let path = m.path("shared.bin");
    const REGION: usize = 100_003; // regions share blocks at their edges
    const CHUNK: usize = 7_777;
    let expected = pattern(4 * REGION, 21);
    File::create(&path).unwrap();
    let expected = Arc::new(expected);
    let mut threads = Vec::new();
    for w in 0..4 {
        let (path, expected) = (path.clone(), expected.clone());
        threads.push(std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let region = w * REGION..(w + 1) * REGION;
            let mut at = region.start;
            while at < region.end {
                let end = (at + CHUNK).min(region.end);
                f.write_all_at(&expected[at..end], at as u64).unwrap();
                at = end;
            }
        }));
    }
    for r in 0..4 {
        let (path, expected) = (path.clone(), expected.clone());
        threads.push(std::thread::spawn(move || {
            let f = File::open(&path).unwrap();
            let mut buf = vec![0u8; 10_000];
            for i in 0..60 {
                let offset = (i * 6_661 + r * 17) % (4 * REGION);
                let n = f.read_at(&mut buf, offset as u64).unwrap();
                for (k, &b) in buf[..n].iter().enumerate() {
                    // Every byte is either not yet written (zero) or its final value.
                    assert!(b == 0 || b == expected[offset + k], "torn byte at {}", offset + k);
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(fs::read(&path).unwrap() == *expected, "final contents differ");
    m.remount();
    assert!(fs::read(&path).unwrap() == *expected, "final contents differ after remount");
}

#[test]
fn many_files_created_in_parallel() {
    let mut m = TestMount::new();
    fs::create_dir(m.path("many")).unwrap();
    let dir = m.path("many");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    fs::write(dir.join(format!("t{t}-file-{i}")), format!("thread {t} file {i}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let check = |m: &TestMount| {
        assert_eq!(names(&m.path("many")).len(), 400);
        for t in 0..8 {
            for i in 0..50 {
                let got = fs::read_to_string(m.path(&format!("many/t{t}-file-{i}"))).unwrap();
                assert_eq!(got, format!("thread {t} file {i}"));
            }
        }
    };
    check(&m);
    m.remount();
    check(&m);
}

// ---- 9. persistence and ciphertext ----

/// What a user sees of a tree: per path, its kind, size, mode and contents or target.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    walk(root)
        .into_iter()
        .map(|path| {
            let meta = fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                format!("dir {:o}", meta.mode())
            } else if meta.is_file() {
                let bytes = fs::read(&path).unwrap();
                let xattrs: Vec<_> = xattr::list(&path).unwrap().collect();
                format!("file {:o} {} {:?} nlink {} {xattrs:?}", meta.mode(), meta.len(), bytes, meta.nlink())
            } else {
                format!("other {:o}", meta.mode())
            };
            (path.strip_prefix(root).unwrap().to_path_buf(), what)
        })
        .collect()
}

#[test]
fn everything_survives_a_remount_and_nothing_is_in_the_clear() {
    let mut m = TestMount::new();
    let long = format!("confidential-long-name-{}", "q".repeat(200));
    fs::create_dir_all(m.path("confidential-dir/nested-secret")).unwrap();
    fs::write(m.path("confidential-dir/report.txt"), MARKER.repeat(100)).unwrap();
    fs::write(m.path(&format!("confidential-dir/nested-secret/{long}")), MARKER).unwrap();
    let f = OpenOptions::new().create(true).truncate(true).write(true).open(m.path("sparse-secret")).unwrap();
    f.write_all_at(MARKER, 1 << 20).unwrap();
    drop(f);
    fs::hard_link(m.path("confidential-dir/report.txt"), m.path("hardlinked-secret")).unwrap();
    std::os::unix::fs::symlink("confidential-dir/report.txt", m.path("symlinked-secret")).unwrap();
    nix::unistd::mkfifo(&m.path("fifo-secret"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    xattr::set(m.path("confidential-dir/report.txt"), "user.confidential-attr", MARKER).unwrap();
    fs::set_permissions(m.path("sparse-secret"), fs::Permissions::from_mode(0o600)).unwrap();

    let before = snapshot(&m.mnt());
    assert_eq!(before.len(), 8, "{before:#?}");
    m.remount();
    assert_eq!(snapshot(&m.mnt()), before, "the tree changed across a remount");
    m.unmount();
    assert_nothing_in_the_clear(
        &m.cipher(),
        &[MARKER, &MARKER[..16], b"confidential", b"secret", b"report", b"nested", b"qqqqqqqq"],
    );
    m.mount();
    assert_eq!(snapshot(&m.mnt()), before);
}
