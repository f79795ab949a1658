//! Tampering with a kmsfs backing directory is detected and never read as wrong data.
//!
//! Each test writes files through a real mount, unmounts, damages the backing files the
//! way an attacker with write access to the backing directory could (FORMAT.md §9: bit
//! flips in header slots, nonces, ciphertext and tags; blocks moved within a file or
//! copied from another file; headers swapped; cuts and extensions; names and symlink
//! targets changed or moved between directories), mounts again and checks that reads
//! fail with EIO — never return other bytes — that kmsfs logs the path and block, and
//! that `kmsfs fsck` exits 1 naming the damaged file.
//!
//! Not tested here because the format documents them as undetected (§9.2): a whole file
//! replaced by an older copy of itself, whole files swapped by renaming entries within a
//! directory, and non-final blocks replaced by zeros (holes).

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kmsfs_tests::TestMount;

const HEADER: u64 = 1024;
const SLOT: u64 = 512;
const NONCE: u64 = 12;
const TAG: u64 = 16;
const B: u64 = 4096;
const STORED_BLOCK: u64 = NONCE + B + TAG;
/// 3.5 blocks: three full blocks and a half-full final one.
const LEN: usize = 3 * B as usize + B as usize / 2;

/// Distinctive contents: every 8-byte word names its file and offset.
fn contents(seed: u8) -> Vec<u8> {
    (0..LEN).map(|i| ((i / 8) as u8).wrapping_mul(7) ^ (i % 8) as u8 ^ seed.wrapping_mul(0x5b)).collect()
}

fn block_offset(index: u64) -> u64 {
    HEADER + index * STORED_BLOCK
}

/// The backing regular files (not the format's own `kmsfs.*` files) directly in `dir`.
fn backing_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().starts_with("kmsfs.") && e.file_type().unwrap().is_file())
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// The backing entries (of any type, not `kmsfs.*`) directly in `dir`.
fn backing_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("kmsfs."))
        .collect();
    entries.sort();
    entries
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, offset).unwrap();
}

fn flip(path: &Path, offset: u64) {
    let byte = read_at(path, offset, 1)[0];
    write_at(path, offset, &[byte ^ 0x10]);
}

fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

/// Writes one file per name, with the contents of `contents(i)`, and unmounts; returns
/// the contents by name.
fn write_and_unmount(m: &mut TestMount, names: &[&str]) -> Vec<Vec<u8>> {
    let data: Vec<Vec<u8>> = (0..names.len()).map(|i| contents(i as u8 + 1)).collect();
    for (name, bytes) in names.iter().zip(&data) {
        fs::write(m.path(name), bytes).unwrap();
    }
    m.unmount();
    data
}

/// A volume holding one file `f`, unmounted: the mount, its contents and backing file.
fn one_file() -> (TestMount, Vec<u8>, PathBuf) {
    let mut m = TestMount::new();
    let data = write_and_unmount(&mut m, &["f"]).remove(0);
    let files = backing_files(&m.cipher());
    assert_eq!(files.len(), 1, "{files:?}");
    let backing = files[0].clone();
    assert_eq!(fs::metadata(&backing).unwrap().len(), block_offset(3) + NONCE + B / 2 + TAG);
    (m, data, backing)
}

/// Reading `name` fails with EIO, and no read of any block returns bytes that differ
/// from `expected`: every block reads back right or fails with EIO.
fn assert_unreadable(m: &TestMount, name: &str, expected: &[u8]) {
    let path = m.path(name);
    match fs::read(&path) {
        Err(e) if is_eio(&e) => {}
        Err(e) => panic!("{name}: expected EIO, got {e}\n{}", m.log()),
        Ok(bytes) if bytes == expected => panic!("{name}: damage went unnoticed\n{}", m.log()),
        Ok(bytes) => panic!("{name}: read {} bytes of wrong data instead of EIO\n{}", bytes.len(), m.log()),
    }
    assert_no_wrong_bytes(m, name, expected);
}

/// Every block-sized read of `name` returns the right bytes or fails with EIO.
fn assert_no_wrong_bytes(m: &TestMount, name: &str, expected: &[u8]) {
    let file = match fs::File::open(m.path(name)) {
        Ok(f) => f,
        Err(e) if is_eio(&e) => return,
        Err(e) => panic!("{name}: open: expected EIO, got {e}"),
    };
    for offset in (0..expected.len()).step_by(B as usize) {
        let mut buf = vec![0u8; B as usize];
        match file.read_at(&mut buf, offset as u64) {
            Ok(n) => {
                let end = (offset + B as usize).min(expected.len());
                assert!(buf[..n] == expected[offset..offset + n], "{name}: wrong bytes at {offset}");
                assert_eq!(offset + n, end, "{name}: short read at {offset}");
            }
            Err(e) if is_eio(&e) => {}
            Err(e) => panic!("{name}: read at {offset}: expected EIO, got {e}"),
        }
    }
}

/// kmsfs logged an error naming the backing file and, if given, the block.
fn assert_logged(m: &TestMount, backing: &Path, block: Option<u64>) {
    let log = m.log();
    let name = backing.file_name().unwrap().to_string_lossy().into_owned();
    let line = log.lines().find(|l| l.contains("ERROR") && l.contains(&name));
    let Some(line) = line else { panic!("no error logged for {name}:\n{log}") };
    if let Some(block) = block {
        let wanted = format!("block {block}");
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains(&name) && l.contains(&wanted)),
            "no error naming {name} and {wanted} (first: {line}):\n{log}"
        );
    }
}

/// `kmsfs fsck` exits 1 and its report names every one of `names` (plaintext paths).
fn assert_fsck_finds(m: &TestMount, names: &[&str]) -> String {
    let out = m.kmsfs().arg("fsck").arg(m.cipher()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "fsck should find damage:\n{stdout}{stderr}");
    for name in names {
        assert!(stdout.contains(name), "fsck does not name {name}:\n{stdout}{stderr}");
    }
    stdout
}

fn assert_fsck_clean(m: &TestMount) {
    let out = m.kmsfs().arg("fsck").arg(m.cipher()).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn untouched_volume_reads_back_and_fsck_is_clean() {
    let (mut m, data, _) = one_file();
    assert_fsck_clean(&m);
    // What a rewrap killed while replacing the volume file leaves: not a problem.
    fs::write(m.cipher().join(".kmsfs.volume.tmp4242"), b"{").unwrap();
    assert_fsck_clean(&m);
    m.mount();
    assert_eq!(fs::read(m.path("f")).unwrap(), data);
}

#[test]
fn one_damaged_header_slot_falls_back_to_the_other() {
    for slot in 0..2 {
        let (mut m, data, backing) = one_file();
        // A bit in the wrapped key, and one in the MAC.
        flip(&backing, slot * SLOT + 50);
        flip(&backing, slot * SLOT + 500);
        // The file is still whole; fsck reports the lost redundancy.
        assert_fsck_finds(&m, &["/f"]);
        m.mount();
        assert_eq!(fs::read(m.path("f")).unwrap(), data, "slot {slot} damaged");
    }
}

#[test]
fn both_damaged_header_slots_fail_open() {
    let (mut m, data, backing) = one_file();
    flip(&backing, 30); // file ID in slot 0
    flip(&backing, SLOT + 481); // MAC of slot 1
    assert_fsck_finds(&m, &["/f"]);
    m.mount();
    let e = fs::File::open(m.path("f")).expect_err("open must fail");
    assert!(is_eio(&e), "{e}");
    assert_unreadable(&m, "f", &data);
    assert_logged(&m, &backing, None);
}

#[test]
fn bit_flips_in_nonce_ciphertext_and_tag_fail_their_block() {
    // (what, offset in the stored block) for block 1.
    for (what, at) in [("nonce", 3), ("ciphertext", NONCE + 1000), ("tag", NONCE + B + 5)] {
        let (mut m, data, backing) = one_file();
        flip(&backing, block_offset(1) + at);
        assert!(assert_fsck_finds(&m, &["/f"]).contains("block 1"), "{what}");
        m.mount();
        assert_unreadable(&m, "f", &data);
        assert_logged(&m, &backing, Some(1));
        // The blocks around it are untouched.
        let file = fs::File::open(m.path("f")).unwrap();
        let mut buf = vec![0u8; B as usize];
        file.read_exact_at(&mut buf, 2 * B).unwrap();
        assert!(buf[..] == data[2 * B as usize..3 * B as usize], "{what}: block 2");
    }
}

#[test]
fn the_final_block_is_authenticated_too() {
    let (mut m, data, backing) = one_file();
    flip(&backing, block_offset(3) + NONCE + 7);
    assert!(assert_fsck_finds(&m, &["/f"]).contains("block 3"));
    m.mount();
    assert_unreadable(&m, "f", &data);
    assert_logged(&m, &backing, Some(3));
}

#[test]
fn blocks_swapped_within_a_file_fail() {
    let (mut m, data, backing) = one_file();
    let b0 = read_at(&backing, block_offset(0), STORED_BLOCK as usize);
    let b1 = read_at(&backing, block_offset(1), STORED_BLOCK as usize);
    write_at(&backing, block_offset(0), &b1);
    write_at(&backing, block_offset(1), &b0);
    let report = assert_fsck_finds(&m, &["/f"]);
    assert!(report.contains("block 0") && report.contains("block 1"), "{report}");
    m.mount();
    assert_unreadable(&m, "f", &data);
    assert_logged(&m, &backing, Some(0));
}

#[test]
fn a_block_copied_from_another_file_fails() {
    let mut m = TestMount::new();
    let data = write_and_unmount(&mut m, &["a", "b"]);
    let files = backing_files(&m.cipher());
    assert_eq!(files.len(), 2);
    // Same size, same index: only the file ID and key differ.
    let stolen = read_at(&files[1], block_offset(2), STORED_BLOCK as usize);
    write_at(&files[0], block_offset(2), &stolen);
    let report = assert_fsck_finds(&m, &[]);
    assert_eq!(report.lines().filter(|l| l.contains("block 2")).count(), 1, "{report}");
    m.mount();
    let damaged: Vec<usize> =
        (0..2).filter(|&i| fs::read(m.path(["a", "b"][i])).ok().as_ref() != Some(&data[i])).collect();
    assert_eq!(damaged.len(), 1, "exactly the file that received the block is damaged");
    let name = ["a", "b"][damaged[0]];
    assert!(report.contains(&format!("/{name}: block 2")), "{report}");
    assert_unreadable(&m, name, &data[damaged[0]]);
    assert_logged(&m, &files[0], Some(2));
}

#[test]
fn headers_swapped_between_files_fail() {
    let mut m = TestMount::new();
    let data = write_and_unmount(&mut m, &["a", "b"]);
    let files = backing_files(&m.cipher());
    let h0 = read_at(&files[0], 0, HEADER as usize);
    let h1 = read_at(&files[1], 0, HEADER as usize);
    write_at(&files[0], 0, &h1);
    write_at(&files[1], 0, &h0);
    assert_fsck_finds(&m, &["/a", "/b"]);
    m.mount();
    assert_unreadable(&m, "a", &data[0]);
    assert_unreadable(&m, "b", &data[1]);
    assert_logged(&m, &files[0], Some(0));
    assert_logged(&m, &files[1], Some(0));
}

#[test]
fn a_header_slot_copied_from_another_file_is_reported() {
    // Slot 0 of one file replaced by another file's slot 0: it verifies on its own (under
    // the other file's key, with the other file's ID) but is not this file's. The file's
    // own newer slot 1 still wins, so both files read back right; fsck names the file
    // whose slots disagree.
    let mut m = TestMount::new();
    let data = write_and_unmount(&mut m, &["a", "b"]);
    let files = backing_files(&m.cipher());
    let slot = read_at(&files[1], 0, SLOT as usize);
    write_at(&files[0], 0, &slot);
    let report = assert_fsck_finds(&m, &[]);
    assert_eq!(report.lines().filter(|l| l.contains("header slot 0")).count(), 1, "{report}");
    m.mount();
    assert_eq!(fs::read(m.path("a")).unwrap(), data[0]);
    assert_eq!(fs::read(m.path("b")).unwrap(), data[1]);
}

#[test]
fn cut_at_a_block_boundary_fails() {
    let (mut m, data, backing) = one_file();
    // Drop the final block: block 2, sealed non-final, is now last.
    fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(block_offset(3)).unwrap();
    assert!(assert_fsck_finds(&m, &["/f"]).contains("block 2"));
    m.mount();
    assert_unreadable(&m, "f", &data[..3 * B as usize]);
    assert_logged(&m, &backing, Some(2));
}

#[test]
fn cut_off_a_block_boundary_fails() {
    // A few bytes off the tag (the size is still a possible one), and a cut inside the
    // final block's nonce (an impossible size).
    for cut_to in [block_offset(3) + NONCE + B / 2 + TAG - 3, block_offset(3) + 5] {
        let (mut m, data, backing) = one_file();
        fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(cut_to).unwrap();
        assert_fsck_finds(&m, &["/f"]);
        m.mount();
        assert_unreadable(&m, "f", &data);
        assert_logged(&m, &backing, None);
    }
}

#[test]
fn an_appended_block_fails() {
    for whole_blocks in [false, true] {
        let mut m = TestMount::new();
        let len = if whole_blocks { 3 * B as usize } else { LEN };
        let data = contents(9)[..len].to_vec();
        fs::write(m.path("f"), &data).unwrap();
        m.unmount();
        let backing = backing_files(&m.cipher()).remove(0);
        let end = fs::metadata(&backing).unwrap().len();
        // A copy of the file's own block 0: well formed, but not at its index and not final.
        let extra = read_at(&backing, block_offset(0), STORED_BLOCK as usize);
        write_at(&backing, end, &extra);
        assert_fsck_finds(&m, &["/f"]);
        m.mount();
        match fs::read(m.path("f")) {
            Err(e) if is_eio(&e) => {}
            other => panic!("appended block: expected EIO, got {:?}", other.map(|b| b.len())),
        }
        assert_logged(&m, &backing, None);
    }
}

/// An entry name with one base64url character changed (keeping the encoding canonical).
fn tampered_name(name: &str) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    chars[0] = if chars[0] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[test]
fn a_tampered_name_disappears() {
    let mut m = TestMount::new();
    let data = write_and_unmount(&mut m, &["secret-plans", "other"]);
    let files = backing_files(&m.cipher());
    // Which backing entry is "secret-plans"? Rename the other away and look.
    let victim = files
        .iter()
        .find(|p| {
            let moved = p.with_file_name(format!("kmsfs.hidden.{}", p.file_name().unwrap().to_string_lossy()));
            fs::rename(p, &moved).unwrap();
            m.mount();
            let gone = !m.path("secret-plans").exists();
            m.unmount();
            fs::rename(&moved, p).unwrap();
            gone
        })
        .unwrap()
        .clone();
    let bad = victim.with_file_name(tampered_name(&victim.file_name().unwrap().to_string_lossy()));
    fs::rename(&victim, &bad).unwrap();
    let report = assert_fsck_finds(&m, &[]);
    assert!(report.contains("does not authenticate"), "{report}");
    m.mount();
    let listing: Vec<String> =
        fs::read_dir(m.mnt()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(listing, ["other"], "a tampered name must vanish, not show as another name");
    let e = fs::read(m.path("secret-plans")).expect_err("lookup must fail");
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert_eq!(fs::read(m.path("other")).unwrap(), data[1]);
    assert!(m.log().contains(bad.file_name().unwrap().to_str().unwrap()), "the bad entry is logged:\n{}", m.log());
}

#[test]
fn a_name_moved_to_another_directory_disappears() {
    let mut m = TestMount::new();
    fs::create_dir(m.path("a")).unwrap();
    fs::create_dir(m.path("b")).unwrap();
    fs::write(m.path("a/x"), b"in a").unwrap();
    fs::write(m.path("b/y"), b"in b").unwrap();
    m.unmount();
    let dirs = backing_entries(&m.cipher());
    assert_eq!(dirs.len(), 2);
    // Move every entry of the first backing directory into the second.
    let moved = backing_entries(&dirs[0]);
    assert_eq!(moved.len(), 1);
    let target = dirs[1].join(moved[0].file_name().unwrap());
    fs::rename(&moved[0], &target).unwrap();
    let report = assert_fsck_finds(&m, &[]);
    assert!(report.contains("does not authenticate"), "{report}");
    m.mount();
    let a: Vec<_> = fs::read_dir(m.path("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
    let b: Vec<_> = fs::read_dir(m.path("b")).unwrap().map(|e| e.unwrap().file_name()).collect();
    // One directory lost its file; the other lists only its own.
    let mut all: Vec<_> = a.iter().chain(&b).map(|n| n.to_string_lossy().into_owned()).collect();
    all.sort();
    assert_eq!(all.len(), 1, "a moved entry must not show up: a={a:?} b={b:?}");
    assert!(all == ["x"] && a.len() == 1 || all == ["y"] && b.len() == 1, "a={a:?} b={b:?}");
    for (dir, name) in [("a", "y"), ("b", "x")] {
        assert!(!m.path(&format!("{dir}/{name}")).exists(), "{dir}/{name} must not exist");
    }
}

#[test]
fn a_tampered_symlink_target_fails() {
    let mut m = TestMount::new();
    std::os::unix::fs::symlink("/etc/some/target", m.path("link")).unwrap();
    m.unmount();
    let link = backing_entries(&m.cipher()).remove(0);
    let target = fs::read_link(&link).unwrap().to_string_lossy().into_owned();
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(tampered_name(&target), &link).unwrap();
    let report = assert_fsck_finds(&m, &["/link"]);
    assert!(report.contains("symlink"), "{report}");
    m.mount();
    let e = fs::read_link(m.path("link")).expect_err("readlink must fail");
    assert!(is_eio(&e), "{e}");
    assert_logged(&m, &link, None);
}
