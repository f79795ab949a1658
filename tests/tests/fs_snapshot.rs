//! `kmsfs snapshot`, end to end on real agents and real mounts: a volume moved from host A
//! to host B (two agents, each with its own state and socket) by the receiver's RSA public
//! key, and on one agent through a second KMS key; the copy has the same tree, names,
//! modes, times, xattrs, holes and hard links, every data block byte for byte, and after
//! the import it no longer needs A at all. Interrupted exports and imports finish when run
//! again; bad input is refused with the source untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use kmsfs_common::blob::CiphertextBlob;
use kmsfs_common::format::header::{self, HEADER_SIZE};
use kmsfs_common::format::names;
use kmsfs_common::format::snapshot::{SnapshotManifest, SnapshotState, MANIFEST_FILE};
use kmsfs_common::format::volume::VOLUME_FILE;
use kmsfs_common::ids::KeyId;
use kmsfs_tests::{b64, bin, create_key, MountedDir, Rng, TestAgent, TestMount};
use serde_json::json;

/// Sizes of the files made: empty, within a block, around block boundaries, several blocks.
const SIZES: [usize; 9] = [0, 1, 100, 4095, 4096, 4097, 9000, 3 * 4096 + 17, 40_000];
/// A name long enough to need a long-name side file (over 159 bytes).
fn long_name(i: usize) -> String {
    format!("{i:04}-{}", "long-name-".repeat(20))
}

/// Makes a volume's worth of everything through the mount: `count` files over nested
/// directories (some with long names, xattrs, other modes and old modification times),
/// symlinks (one with a long target), sparse files, a hard link, a FIFO and an empty
/// directory.
fn populate(m: &TestMount, count: usize, seed: u64) {
    let mut rng = Rng(seed);
    let long_dir = format!("a/{}", long_name(9999));
    let dirs = ["", "a", "a/b", "a/b/c", "docs", "docs/old", long_dir.as_str(), "many"];
    for dir in dirs.iter().filter(|d| !d.is_empty()) {
        fs::create_dir_all(m.path(dir)).unwrap();
    }
    fs::create_dir(m.path("empty")).unwrap();
    xattr::set(m.path("docs"), "user.dir-note", b"a directory's attribute").unwrap();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    for i in 0..count {
        let dir = dirs[i % dirs.len()];
        let name = if i % 40 == 3 { long_name(i) } else { format!("f{i}") };
        let path = if dir.is_empty() { m.path(&name) } else { m.path(&format!("{dir}/{name}")) };
        let size = SIZES[rng.index(SIZES.len())];
        fs::write(&path, rng.bytes(size)).unwrap();
        if i % 50 == 7 {
            xattr::set(&path, "user.note", format!("file {i}").as_bytes()).unwrap();
            xattr::set(&path, "user.blob", &rng.bytes(300)).unwrap();
        }
        if i % 13 == 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        } else if i % 17 == 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        if i % 9 == 0 {
            File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        }
    }
    for (i, dir) in ["", "a", "a/b/c", "docs"].iter().enumerate() {
        let link = if dir.is_empty() { format!("link{i}") } else { format!("{dir}/link{i}") };
        std::os::unix::fs::symlink(format!("../f{i}"), m.path(&link)).unwrap();
    }
    std::os::unix::fs::symlink("t/".repeat(600), m.path("docs/long-target")).unwrap();
    for i in 0..3 {
        // 10 bytes, a hole of about 2 MiB, 5000 bytes: the blocks between stay holes.
        let file = File::create(m.path(&format!("a/sparse{i}"))).unwrap();
        file.write_all_at(b"the start.", 0).unwrap();
        file.write_all_at(&rng.bytes(5000), 2 << 20).unwrap();
    }
    fs::hard_link(m.path("a/f1"), m.path("docs/hard-link-to-a-f1")).unwrap();
    nix::unistd::mkfifo(&m.path("a/b/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
}

/// What a user sees of one entry of a mounted volume.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    /// A regular file's length and a hash of its contents; a symlink's target.
    contents: String,
    mode: u32,
    /// Modification time (not for the root, which the import writes into).
    mtime: Option<(i64, i64)>,
    xattrs: BTreeMap<OsString, Vec<u8>>,
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Every entry under the mount point `mnt` by relative path, and the groups of paths that
/// are hard links of one file.
fn tree(mnt: &Path) -> (BTreeMap<PathBuf, Node>, BTreeSet<Vec<PathBuf>>) {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut todo = vec![mnt.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(mnt).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&path).unwrap();
            let (kind, contents) = if meta.is_dir() {
                todo.push(path.clone());
                ("dir", String::new())
            } else if meta.is_symlink() {
                ("symlink", fs::read_link(&path).unwrap().to_string_lossy().into_owned())
            } else if meta.is_file() {
                let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if meta.nlink() > 1 {
                    inodes.entry(meta.ino()).or_default().push(rel.clone());
                }
                ("file", format!("{} bytes, hash {:x}", bytes.len(), hash(&bytes)))
            } else {
                ("other", format!("{:o}", meta.mode() & 0o170000))
            };
            let xattrs = if meta.is_symlink() {
                BTreeMap::new()
            } else {
                xattr::list(&path).unwrap().map(|n| (n.clone(), xattr::get(&path, &n).unwrap().unwrap())).collect()
            };
            let mode = meta.mode() & 0o7777;
            let mtime = Some((meta.mtime(), meta.mtime_nsec()));
            nodes.insert(rel, Node { kind, contents, mode, mtime, xattrs });
        }
    }
    let links = inodes.into_values().map(|mut paths| {
        paths.sort();
        paths
    });
    (nodes, links.collect())
}

fn assert_same_tree(expected: &(BTreeMap<PathBuf, Node>, BTreeSet<Vec<PathBuf>>), mnt: &Path) {
    let (nodes, links) = tree(mnt);
    let wanted: BTreeSet<&PathBuf> = expected.0.keys().collect();
    let got: BTreeSet<&PathBuf> = nodes.keys().collect();
    assert_eq!(
        got.difference(&wanted).count() + wanted.difference(&got).count(),
        0,
        "entries differ: missing \
         {:?}, extra {:?}",
        wanted.difference(&got).take(5).collect::<Vec<_>>(),
        got.difference(&wanted).take(5).collect::<Vec<_>>()
    );
    for (path, node) in &expected.0 {
        assert_eq!(&nodes[path], node, "{}", path.display());
    }
    assert_eq!(&links, &expected.1, "hard links");
}

/// The backing directory's entries by relative path (the format's volume file and the
/// snapshot's own files left out): for a regular file, its bytes past the header (all of
/// them for the format's own files), and its allocated and logical sizes.
fn backing(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, u64, u64)> {
    let mut found = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if dir == root && (name == VOLUME_FILE || name.starts_with("kmsfs.snapshot") || name == "kmsfs.rewrap.lock")
            {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
                found.insert(rel, (Vec::new(), 0, 0));
            } else if meta.is_file() {
                let bytes = fs::read(&path).unwrap();
                let from = if names::is_reserved_name(&name) { 0 } else { HEADER_SIZE };
                found.insert(rel, (bytes[from..].to_vec(), meta.blocks() * 512, meta.len()));
            } else if meta.is_symlink() {
                found.insert(rel, (fs::read_link(&path).unwrap().as_os_str().as_bytes().to_vec(), 0, 0));
            } else {
                found.insert(rel, (Vec::new(), 0, 0));
            }
        }
    }
    found
}

/// The backing trees hold the same entries under the same (encrypted) names, every data
/// block identical, and the source's sparse files still sparse.
fn assert_same_blocks(source: &BTreeMap<PathBuf, (Vec<u8>, u64, u64)>, copy: &Path) {
    let copy = backing(copy);
    assert_eq!(source.keys().collect::<Vec<_>>(), copy.keys().collect::<Vec<_>>(), "backing entries differ");
    let mut sparse = 0;
    for (path, (bytes, allocated, len)) in source {
        let (copied, copy_allocated, _) = &copy[path];
        assert!(bytes == copied, "{}: the bytes past the header differ", path.display());
        if *len > 1 << 20 && *allocated < len / 2 {
            sparse += 1;
            assert!(
                *copy_allocated < len / 2,
                "{}: the copy is not sparse ({copy_allocated} of {len})",
                path.display()
            );
        }
    }
    assert_eq!(sparse, 3, "the three sparse files are sparse in the source");
}

/// The key and material version that `key` of `agent` encrypts under now.
fn current_material(agent: &TestAgent, key: &str) -> (KeyId, u32) {
    let out = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"probe")}));
    let blob = kmsfs_tests::unb64(&out["CiphertextBlob"]);
    let parsed = CiphertextBlob::parse(&blob).unwrap();
    (parsed.key_id, parsed.material_version)
}

/// Each header slot's wrapped key, for every regular file with a header under `root`.
fn wrapped_keys(root: &Path) -> Vec<(PathBuf, Vec<Vec<u8>>)> {
    backing(root)
        .into_keys()
        .filter(|rel| {
            let name = rel.file_name().unwrap().to_string_lossy();
            !names::is_reserved_name(&name) && fs::symlink_metadata(root.join(rel)).unwrap().is_file()
        })
        .map(|rel| {
            let mut bytes = [0u8; HEADER_SIZE];
            File::open(root.join(&rel)).unwrap().read_exact_at(&mut bytes, 0).unwrap();
            let slots = header::parse_slots(&bytes).unwrap();
            assert_eq!(slots.len(), 2, "{}: both slots", rel.display());
            (rel, slots.iter().map(|s| s.wrapped_key().to_vec()).collect())
        })
        .collect()
}

fn assert_all_under(root: &Path, material: (KeyId, u32)) {
    let files = wrapped_keys(root);
    assert!(files.len() > 10);
    for (rel, slots) in files {
        for blob in slots {
            let parsed = CiphertextBlob::parse(&blob).unwrap_or_else(|e| panic!("{}: {e:?}", rel.display()));
            assert_eq!((parsed.key_id, parsed.material_version), material, "{}", rel.display());
        }
    }
}

fn manifest(dest: &Path) -> SnapshotManifest {
    SnapshotManifest::parse(&fs::read(dest.join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn kmsfs(agent: &TestAgent) -> Command {
    let mut cmd = Command::new(bin("kmsfs"));
    cmd.env("KMSD_SOCKET", agent.socket());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    eprintln!(
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// An RSA ENCRYPT_DECRYPT key of `spec` on `agent`: its ARN, and its public key as
/// `kmsctl get-public-key --output pem` prints it, written to `pem`.
fn rsa_key(agent: &TestAgent, spec: &str, pem: &Path) -> String {
    let created = agent.ok("CreateKey", json!({"KeySpec": spec, "KeyUsage": "ENCRYPT_DECRYPT"}));
    let arn = created["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    let out = run(agent.kmsctl().args(["get-public-key", "--key-id", &arn, "--output", "pem"]));
    assert!(out.status.success());
    fs::write(pem, &out.stdout).unwrap();
    arn
}

/// A 2,000-file volume on agent A goes to agent B by B's RSA_3072 public key: exported on A,
/// refused by mount until imported on B under B's symmetric key, then mounted on B with A's
/// agent stopped — the same tree, every block byte for byte; and with A back and its key
/// disabled, B still reads.
#[test]
fn a_volume_moves_to_another_agent_by_its_rsa_public_key() {
    let mut a = TestMount::new();
    populate(&a, 2000, 18);
    let expected = tree(&a.mnt());
    a.unmount();
    let source = backing(&a.cipher());
    let before = fs::read(a.cipher().join(VOLUME_FILE)).unwrap();

    let b = TestAgent::start();
    let work = tempfile::tempdir().unwrap();
    let pem = work.path().join("b-public-key.pem");
    let rsa_arn = rsa_key(&b, "RSA_3072", &pem);
    let b_key = create_key(&b);

    let dest = work.path().join("snapshot");
    let started = Instant::now();
    let mut export = kmsfs(&a.agent);
    export.arg("snapshot").arg("export").arg(a.cipher()).arg(&dest);
    export.arg("--to-key").arg(&rsa_arn).arg("--public-key").arg(&pem);
    let out = run(&mut export);
    eprintln!("export of 2,000 files: {:?}", started.elapsed());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2003 files"), "{}", text(&out));
    let m = manifest(&dest);
    assert_eq!(
        (m.state, m.wrapping.algorithm(), m.key_id.as_str()),
        (SnapshotState::Complete, "RSAES_OAEP_SHA_256", rsa_arn.as_str())
    );
    assert_eq!((m.counts.files, m.counts.hard_links, m.counts.symlinks, m.counts.special_files), (2003, 1, 5, 1));
    assert_eq!(fs::read(a.cipher().join(VOLUME_FILE)).unwrap(), before, "the source is untouched");
    assert_same_blocks(&source, &dest);
    for (rel, slots) in wrapped_keys(&dest) {
        assert!(slots.iter().all(|k| k.len() == 384), "{}: both slots hold an RSA_3072 ciphertext", rel.display());
    }

    // B's agent alone from here on.
    a.agent.kill();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = run(kmsfs(&b).arg("mount").arg(&dest).arg(&mnt));
    assert!(!out.status.success());
    assert!(text(&out).contains("run kmsfs snapshot import"), "{}", text(&out));

    let started = Instant::now();
    let out = run(kmsfs(&b).args(["snapshot", "import"]).arg(&dest).args(["--key", &b_key]));
    eprintln!("import of 2,000 files: {:?}", started.elapsed());
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dest.join(MANIFEST_FILE).exists(), "the manifest goes with the import");
    assert_all_under(&dest, current_material(&b, &b_key));
    assert_same_blocks(&source, &dest);

    let log = work.path().join("kmsfs-b.log");
    let mounted = MountedDir::new(&b, &dest, &mnt, &log);
    assert_same_tree(&expected, &mounted.mnt);
    drop(mounted);

    // A back, its key disabled: B does not depend on it.
    a.agent.start_again();
    a.agent.ok("DisableKey", json!({"KeyId": a.key_id}));
    let mounted = MountedDir::new(&b, &dest, &mnt, &log);
    assert_same_tree(&expected, &mounted.mnt);
}

/// On one agent, by a second KMS key: export `--to-key K2` of a volume mounted but idle,
/// import `--key K3`: every slot under K3, and the copy reads with K1 and K2 disabled.
#[test]
fn a_volume_moves_by_a_kms_key_both_sides_hold() {
    let a = TestMount::new();
    populate(&a, 300, 5);
    let expected = tree(&a.mnt());
    let source = backing(&a.cipher());
    let (k2, k3) = (create_key(&a.agent), create_key(&a.agent));
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("snapshot");
    fs::create_dir(&dest).unwrap(); // an empty DEST is fine

    let out = run(a.kmsfs().args(["snapshot", "export"]).arg(a.cipher()).arg(&dest).args(["--to-key", &k2]));
    assert!(out.status.success(), "{}", text(&out));
    let m = manifest(&dest);
    assert_eq!((m.state, m.wrapping.algorithm()), (SnapshotState::Complete, "SYMMETRIC_DEFAULT"));
    assert_all_under(&dest, current_material(&a.agent, &k2));
    assert_same_blocks(&source, &dest);

    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = run(a.kmsfs().arg("mount").arg(&dest).arg(&mnt));
    assert!(!out.status.success() && text(&out).contains("run kmsfs snapshot import"), "{}", text(&out));
    let out = run(a.kmsfs().arg("rewrap").arg(&dest));
    assert!(!out.status.success() && text(&out).contains("run kmsfs snapshot import"), "{}", text(&out));

    let out = run(a.kmsfs().args(["snapshot", "import"]).arg(&dest).args(["--key", &k3]));
    assert!(out.status.success(), "{}", text(&out));
    assert_all_under(&dest, current_material(&a.agent, &k3));
    for key in [&a.key_id, &k2] {
        a.agent.ok("DisableKey", json!({"KeyId": key}));
    }
    let mounted = MountedDir::new(&a.agent, &dest, &mnt, &work.path().join("kmsfs.log"));
    assert_same_tree(&expected, &mounted.mnt);
}

/// Hashes of every byte and name under `root`: to show a command left it as it was.
fn fingerprint(root: &Path) -> BTreeMap<PathBuf, u64> {
    backing(root).into_iter().map(|(p, (bytes, _, len))| (p, hash(&bytes) ^ len)).collect()
}

/// Refusals with clear messages, nothing written and the source untouched: a DEST that is
/// not empty, an RSA_4096 public key, a public key that is not RSA, a key the agent does not
/// have, importing what is no snapshot, importing with another host's RSA key; and a source
/// with a damaged header and a truncated file is exported without panicking, naming both,
/// the snapshot left unfinished.
#[test]
fn bad_input_is_refused_and_the_source_is_left_untouched() {
    let a = TestMount::new();
    populate(&a, 40, 9);
    let work = tempfile::tempdir().unwrap();
    let source = fingerprint(&a.cipher());
    let volume_file = fs::read(a.cipher().join(VOLUME_FILE)).unwrap();
    let export =
        |dest: &Path, args: &[&str]| run(a.kmsfs().args(["snapshot", "export"]).arg(a.cipher()).arg(dest).args(args));
    let refused = |out: &Output, needle: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", text(out));
        assert!(text(out).contains(needle), "expected {needle:?} in: {}", text(out));
    };

    let full = work.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("something"), b"x").unwrap();
    refused(&export(&full, &["--to-key", &a.key_id]), "is not empty");
    assert_eq!(fs::read_dir(&full).unwrap().count(), 1);

    let dest = work.path().join("dest");
    let pem = work.path().join("4096.pem");
    let arn = rsa_key(&a.agent, "RSA_4096", &pem);
    refused(&export(&dest, &["--to-key", &arn, "--public-key", pem.to_str().unwrap()]), "RSA_2048 or RSA_3072");
    let ec = a.agent.ok("CreateKey", json!({"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"}));
    let ec_arn = ec["KeyMetadata"]["Arn"].as_str().unwrap();
    let ec_pem = work.path().join("ec.pem");
    fs::write(&ec_pem, run(a.agent.kmsctl().args(["get-public-key", "--key-id", ec_arn, "--output", "pem"])).stdout)
        .unwrap();
    refused(&export(&dest, &["--to-key", ec_arn, "--public-key", ec_pem.to_str().unwrap()]), "not an RSA public key");
    refused(&export(&dest, &["--to-key", "alias/no-such-key"]), "NotFoundException");
    assert!(!dest.exists(), "nothing was written");
    refused(&export(&a.cipher().join("inside"), &["--to-key", &a.key_id]), "inside the volume");

    refused(&run(a.kmsfs().args(["snapshot", "import"]).arg(&full).args(["--key", &a.key_id])), "not a kmsfs snapshot");
    refused(
        &run(a.kmsfs().args(["snapshot", "import"]).arg(a.cipher()).args(["--key", &a.key_id])),
        "no snapshot manifest",
    );

    // Exported to one RSA key, imported with another of the same agent: refused by the
    // public key's digest, before anything is re-wrapped.
    let (pem3, other_pem) = (work.path().join("3072.pem"), work.path().join("other.pem"));
    let arn3 = rsa_key(&a.agent, "RSA_3072", &pem3);
    let other = rsa_key(&a.agent, "RSA_2048", &other_pem);
    let out = export(&dest, &["--to-key", &other, "--public-key", pem3.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let snapshot = fingerprint(&dest);
    refused(&run(a.kmsfs().args(["snapshot", "import"]).arg(&dest).args(["--key", &a.key_id])), "another public key");
    assert_eq!(fingerprint(&dest), snapshot, "a refused import writes nothing");
    let again = export(&dest, &["--to-key", &arn3, "--public-key", pem3.to_str().unwrap()]);
    refused(&again, "already holds a complete snapshot");

    assert_eq!(fingerprint(&a.cipher()), source, "the source is untouched");
    assert_eq!(fs::read(a.cipher().join(VOLUME_FILE)).unwrap(), volume_file);

    // Damage: one header overwritten in both slots, one file cut inside its header.
    let files: Vec<PathBuf> = wrapped_keys(&a.cipher()).into_iter().map(|(rel, _)| a.cipher().join(rel)).collect();
    let f = fs::OpenOptions::new().write(true).open(&files[0]).unwrap();
    f.write_all_at(&[0xff; 8], 100).unwrap();
    f.write_all_at(&[0xff; 8], 612).unwrap();
    fs::OpenOptions::new().write(true).open(&files[1]).unwrap().set_len(100).unwrap();
    let broken = work.path().join("broken");
    let out = export(&broken, &["--to-key", &a.key_id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for file in &files[..2] {
        assert!(text(&out).contains(&*file.to_string_lossy()), "{} is named: {}", file.display(), text(&out));
    }
    assert_eq!(manifest(&broken).state, SnapshotState::Exporting, "an incomplete export is never complete");
    refused(&run(a.kmsfs().args(["snapshot", "import"]).arg(&broken).args(["--key", &a.key_id])), "did not finish");
}

/// Waits until `path` holds more than `min` bytes (or `child` exits); whether it does.
fn wait_for_size(child: &mut Child, path: &Path, min: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if fs::metadata(path).is_ok_and(|m| m.len() > min) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// An export SIGKILLed early and again after its first checkpoint, then run to the end:
/// the rerun keeps what the journal recorded and copies the rest; an import SIGKILLed
/// twice midway, then run again, finishes; the result reads as the source did.
#[test]
fn interrupted_exports_and_imports_finish_when_run_again() {
    let mut a = TestMount::new();
    populate(&a, 600, 77);
    let expected = tree(&a.mnt());
    a.unmount();
    let source = backing(&a.cipher());
    let work = tempfile::tempdir().unwrap();
    let pem = work.path().join("public.pem");
    let rsa_arn = rsa_key(&a.agent, "RSA_2048", &pem);
    let dest = work.path().join("snapshot");
    let export = || {
        let mut cmd = a.kmsfs();
        cmd.args(["snapshot", "export"]).arg(a.cipher()).arg(&dest);
        cmd.args(["--to-key", &rsa_arn, "--public-key"]).arg(&pem).args([
            "--threads",
            "1",
            "--checkpoint-secs",
            "0.02",
        ]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };

    let mut child = export().spawn().unwrap();
    let early = wait_for_size(&mut child, &dest.join(MANIFEST_FILE), 0);
    std::thread::sleep(Duration::from_millis(20));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(early, "the export had begun");
    assert_eq!(manifest(&dest).state, SnapshotState::Exporting);

    let mut child = export().spawn().unwrap();
    let checkpointed = wait_for_size(&mut child, &dest.join("kmsfs.snapshot.journal"), 0);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(checkpointed, "the export ran to its first checkpoint");
    assert_eq!(manifest(&dest).state, SnapshotState::Exporting);
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = run(a.kmsfs().arg("mount").arg(&dest).arg(&mnt));
    assert!(!out.status.success() && text(&out).contains("unfinished snapshot export"), "{}", text(&out));

    let out = run(&mut export());
    assert!(out.status.success(), "{}", text(&out));
    let count = |word: &str| -> u64 {
        let before = text(&out).split(word).next().unwrap().to_string();
        before.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(count(" kept") > 0, "the rerun kept the files of a checkpoint: {}", text(&out));
    assert!(count(" copied") > 0, "the kill left files to copy: {}", text(&out));
    assert_eq!(manifest(&dest).state, SnapshotState::Complete);
    assert_same_blocks(&source, &dest);

    let key = create_key(&a.agent);
    let import = || {
        let mut cmd = a.kmsfs();
        cmd.args(["snapshot", "import"]).arg(&dest).args(["--key", &key, "--threads", "1"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    let mut rng = Rng(3);
    for _ in 0..2 {
        let mut child = import().spawn().unwrap();
        std::thread::sleep(Duration::from_millis(150 + rng.below(300)));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(dest.join(MANIFEST_FILE).exists(), "an interrupted import keeps its manifest");
    }
    let out = run(&mut import());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already were"), "{}", text(&out));
    assert_all_under(&dest, current_material(&a.agent, &key));
    assert_same_blocks(&source, &dest);
    let mounted = MountedDir::new(&a.agent, &dest, &mnt, &work.path().join("kmsfs.log"));
    assert_same_tree(&expected, &mounted.mnt);
}

/// `--update` of a complete snapshot after the volume changed: only the changed files are
/// copied, what the volume lost goes, and the import sees the volume as it is now.
#[test]
fn an_update_copies_only_what_changed() {
    let mut a = TestMount::new();
    populate(&a, 200, 11);
    let key = create_key(&a.agent);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("snapshot");
    let export = |a: &TestMount, extra: &[&str]| {
        run(a.kmsfs().args(["snapshot", "export"]).arg(a.cipher()).arg(&dest).args(["--to-key", &key]).args(extra))
    };
    assert!(export(&a, &[]).status.success());
    fs::write(a.path("a/f1"), b"changed after the first export").unwrap();
    fs::remove_file(a.path("docs/f4")).unwrap();
    fs::write(a.path("new-file"), b"new").unwrap();
    xattr::set(a.path("many/f7"), "user.note", b"changed attribute").unwrap();
    let expected = tree(&a.mnt());
    a.unmount();

    let out = export(&a, &["--update"]);
    assert!(out.status.success(), "{}", text(&out));
    // a/f1 and its hard link are one file; many/f7; new-file.
    assert!(text(&out).contains("; 3 copied"), "{}", text(&out));
    assert_same_blocks(&backing(&a.cipher()), &dest);
    let out = run(a.kmsfs().args(["snapshot", "import"]).arg(&dest).args(["--key", &key]));
    assert!(out.status.success(), "{}", text(&out));
    let mnt = work.path().join("mnt");
    let mounted = MountedDir::new(&a.agent, &dest, &mnt, &work.path().join("kmsfs.log"));
    assert_same_tree(&expected, &mounted.mnt);
}

/// An export of a mounted volume that is being written to reports what changed under it
/// and leaves the snapshot unfinished; once the writing stops, the same command finishes it
/// and the snapshot holds the volume as it is then.
#[test]
fn changes_during_an_export_are_reported_and_a_rerun_finishes() {
    let a = TestMount::new();
    populate(&a, 100, 21);
    let key = create_key(&a.agent);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("snapshot");
    let export = || run(a.kmsfs().args(["snapshot", "export"]).arg(a.cipher()).arg(&dest).args(["--to-key", &key]));

    let stop = std::sync::atomic::AtomicBool::new(false);
    let writes = std::sync::atomic::AtomicU64::new(0);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs::write(a.path("a/busy"), i.to_le_bytes().repeat(1000)).unwrap();
                fs::write(a.path(&format!("docs/new{i}")), b"new").unwrap();
                writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                i += 1;
            }
        });
        while writes.load(std::sync::atomic::Ordering::Relaxed) < 5 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let out = export();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("changed in the volume while it was being exported"), "{}", text(&out));
    assert!(text(&out).contains("/docs: entries were added"), "the directory is named: {}", text(&out));
    assert!(text(&out).contains("/a/busy: it changed"), "the file is named: {}", text(&out));
    assert_eq!(manifest(&dest).state, SnapshotState::Exporting);

    let expected = tree(&a.mnt());
    let out = export();
    assert!(out.status.success(), "{}", text(&out));
    let out = run(a.kmsfs().args(["snapshot", "import"]).arg(&dest).args(["--key", &key]));
    assert!(out.status.success(), "{}", text(&out));
    let mounted = MountedDir::new(&a.agent, &dest, &work.path().join("mnt"), &work.path().join("kmsfs.log"));
    assert_same_tree(&expected, &mounted.mnt);
}
