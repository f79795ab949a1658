//! A randomized model test: one random sequence of file system operations is applied to a
//! kmsfs mount and to a plain directory on the backing file system, and both must agree —
//! on every operation's outcome (the same data read, the same errno on failure) and on the
//! whole tree (names, types, contents, sizes, symlink targets, link counts), compared every
//! 1,000 operations, across a remount in the middle, and at the end.
//!
//! The plain directory is the reference: whatever kmsfs adds (encrypted blocks, encrypted
//! names, `kmsfs.dirid` files, long-name side files, final-block resealing) must be
//! invisible to a program using the mount.
//!
//! `KMSFS_MODEL_OPS` sets the number of operations (default 10,000), `KMSFS_MODEL_SEED`
//! the seed (default: from the clock). The seed is printed at the start and in every
//! failure, with the last operations that led there; rerun with it to reproduce.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kmsfs_tests::{Rng, TestMount};

const B: u64 = 4096;
/// Names used at every level: few, so that operations collide with existing entries.
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
/// Symlink targets: some resolve inside the tree, some dangle, one loops.
const TARGETS: [&str; 6] = ["a", "b/c", "../a", "nowhere", "./e", "/nonexistent/kmsfs-model"];

/// The model's choices of paths and offsets, on the suite's generator.
trait ModelRng {
    fn path(&mut self) -> String;
    fn offset(&mut self) -> u64;
    fn len(&mut self) -> usize;
}

impl ModelRng for Rng {
    /// A relative path of 1–3 components.
    fn path(&mut self) -> String {
        let depth = match self.below(100) {
            0..50 => 1,
            50..85 => 2,
            _ => 3,
        };
        (0..depth).map(|_| NAMES[self.below(NAMES.len() as u64) as usize]).collect::<Vec<_>>().join("/")
    }

    /// An offset: mostly within the first three blocks, sometimes far past them.
    fn offset(&mut self) -> u64 {
        if self.chance(10) {
            self.below(64 * B)
        } else {
            self.below(3 * B)
        }
    }

    /// A length of 0 to 3 blocks, often small or block-aligned.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0 => 0,
            1..4 => self.below(100) as usize,
            4 => (1 + self.below(3) * B) as usize,
            _ => self.below(3 * B + 1) as usize,
        }
    }
}

/// One operation's observable outcome.
#[derive(Debug, PartialEq)]
enum Outcome {
    Done,
    Data(Vec<u8>),
    Failed(i32),
}

fn outcome<T>(result: io::Result<T>, f: impl FnOnce(T) -> Outcome) -> Outcome {
    match result {
        Ok(v) => f(v),
        Err(e) => Outcome::Failed(e.raw_os_error().unwrap_or_else(|| panic!("an error without errno: {e}"))),
    }
}

fn done<T>(result: io::Result<T>) -> Outcome {
    outcome(result, |_| Outcome::Done)
}

#[derive(Debug, Clone)]
enum Op {
    Write { path: String, offset: u64, data_len: usize, seed: u64 },
    Append { path: String, data_len: usize, seed: u64 },
    Truncate { path: String, size: u64 },
    Read { path: String, offset: u64, len: usize },
    Rename { from: String, to: String },
    Link { from: String, to: String },
    Symlink { target: &'static str, path: String },
    Unlink { path: String },
    Mkdir { path: String },
    Rmdir { path: String },
    Stat { path: String },
}

/// The entries of the reference tree, sorted, so that operations mostly aim at things
/// that exist (or at free names in directories that exist).
struct Existing {
    files: Vec<String>,
    dirs: Vec<String>,
    all: Vec<String>,
}

impl Existing {
    fn scan(root: &Path) -> Existing {
        fn walk(root: &Path, dir: &Path, e: &mut Existing) {
            let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|d| d.unwrap().path()).collect();
            entries.sort();
            for path in entries {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    e.dirs.push(rel.clone());
                    walk(root, &path, e);
                } else if meta.is_file() {
                    e.files.push(rel.clone());
                }
                e.all.push(rel);
            }
        }
        let mut e = Existing { files: Vec::new(), dirs: Vec::new(), all: Vec::new() };
        walk(root, root, &mut e);
        e
    }

    fn pick(rng: &mut Rng, from: &[String], percent: u64) -> String {
        if from.is_empty() || !rng.chance(percent) {
            rng.path()
        } else {
            from[rng.below(from.len() as u64) as usize].clone()
        }
    }

    fn file(&self, rng: &mut Rng) -> String {
        Existing::pick(rng, &self.files, 80)
    }

    fn any(&self, rng: &mut Rng) -> String {
        Existing::pick(rng, &self.all, 80)
    }

    fn dir(&self, rng: &mut Rng) -> String {
        Existing::pick(rng, &self.dirs, 80)
    }

    /// A name in an existing directory (or the root), free or not.
    fn new_name(&self, rng: &mut Rng) -> String {
        let name = NAMES[rng.below(NAMES.len() as u64) as usize];
        if self.dirs.is_empty() || rng.chance(30) {
            name.to_string()
        } else {
            format!("{}/{name}", self.dirs[rng.below(self.dirs.len() as u64) as usize])
        }
    }

    fn new_or_file(&self, rng: &mut Rng) -> String {
        if rng.chance(60) {
            self.file(rng)
        } else {
            self.new_name(rng)
        }
    }
}

impl Op {
    fn random(rng: &mut Rng, e: &Existing) -> Op {
        match rng.below(100) {
            0..22 => {
                Op::Write { path: e.new_or_file(rng), offset: rng.offset(), data_len: rng.len(), seed: rng.next_u64() }
            }
            22..30 => Op::Append { path: e.new_or_file(rng), data_len: rng.len(), seed: rng.next_u64() },
            30..38 => Op::Truncate {
                path: e.file(rng),
                size: if rng.chance(15) { rng.below(64 * B) } else { rng.below(3 * B + 1) },
            },
            38..50 => Op::Read { path: e.file(rng), offset: rng.offset(), len: rng.len() },
            50..62 => {
                let from = e.any(rng);
                let to = if rng.chance(50) { e.any(rng) } else { e.new_name(rng) };
                Op::Rename { from, to }
            }
            62..68 => Op::Link { from: e.file(rng), to: e.new_name(rng) },
            68..73 => Op::Symlink { target: TARGETS[rng.below(TARGETS.len() as u64) as usize], path: e.new_name(rng) },
            73..82 => Op::Unlink { path: e.any(rng) },
            82..88 => Op::Mkdir { path: e.new_name(rng) },
            88..95 => Op::Rmdir { path: e.dir(rng) },
            _ => Op::Stat { path: e.any(rng) },
        }
    }

    /// Applies the operation under `root`.
    fn apply(&self, root: &Path) -> Outcome {
        let p = |rel: &str| root.join(rel);
        match self {
            Op::Write { path, offset, data_len, seed } => {
                let data = Rng(*seed).bytes(*data_len);
                let file = OpenOptions::new().write(true).create(true).truncate(false).mode(0o644).open(p(path));
                done(file.and_then(|f| f.write_all_at(&data, *offset)))
            }
            Op::Append { path, data_len, seed } => {
                let data = Rng(*seed).bytes(*data_len);
                let file = OpenOptions::new().append(true).create(true).mode(0o644).open(p(path));
                done(file.and_then(|mut f| io::Write::write_all(&mut f, &data)))
            }
            Op::Truncate { path, size } => {
                done(OpenOptions::new().write(true).open(p(path)).and_then(|f| f.set_len(*size)))
            }
            Op::Read { path, offset, len } => outcome(
                File::open(p(path)).and_then(|f| {
                    let mut buf = vec![0u8; *len];
                    let mut got = 0;
                    while got < *len {
                        match f.read_at(&mut buf[got..], offset + got as u64)? {
                            0 => break,
                            n => got += n,
                        }
                    }
                    buf.truncate(got);
                    Ok(buf)
                }),
                Outcome::Data,
            ),
            Op::Rename { from, to } => done(fs::rename(p(from), p(to))),
            Op::Link { from, to } => done(fs::hard_link(p(from), p(to))),
            Op::Symlink { target, path } => done(std::os::unix::fs::symlink(target, p(path))),
            Op::Unlink { path } => done(fs::remove_file(p(path))),
            Op::Mkdir { path } => done(fs::DirBuilder::new().mode(0o755).create(p(path))),
            Op::Rmdir { path } => done(fs::remove_dir(p(path))),
            Op::Stat { path } => outcome(fs::symlink_metadata(p(path)), |m| {
                let size = if m.is_dir() { 0 } else { m.len() };
                Outcome::Data(format!("{:o} {} {size}", m.mode() & libc::S_IFMT, m.nlink()).into_bytes())
            }),
        }
    }
}

/// What a tree holds, as a program sees it.
#[derive(Debug, PartialEq)]
enum Entry {
    Dir { nlink: u64 },
    File { nlink: u64, contents: Vec<u8> },
    Symlink { target: PathBuf, size: u64 },
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
            let item = if meta.is_dir() {
                walk(root, &path, out);
                Entry::Dir { nlink: meta.nlink() }
            } else if meta.file_type().is_symlink() {
                Entry::Symlink { target: fs::read_link(&path).unwrap(), size: meta.len() }
            } else {
                let contents = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                assert_eq!(contents.len() as u64, meta.len(), "{}: size and contents disagree", path.display());
                Entry::File { nlink: meta.nlink(), contents }
            };
            out.insert(rel, item);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

struct Run {
    seed: u64,
    mount: TestMount,
    plain: tempfile::TempDir,
    recent: VecDeque<(usize, Op, Outcome)>,
}

impl Run {
    fn context(&self) -> String {
        let ops: Vec<String> = self.recent.iter().map(|(i, op, out)| format!("  #{i} {op:?} -> {out:?}")).collect();
        format!("seed {} (KMSFS_MODEL_SEED={}); last operations:\n{}", self.seed, self.seed, ops.join("\n"))
    }

    fn compare_trees(&self, when: &str) {
        let (ours, theirs) = (snapshot(&self.mount.mnt()), snapshot(self.plain.path()));
        if ours == theirs {
            return;
        }
        let mut diffs = Vec::new();
        for key in ours.keys().chain(theirs.keys()).collect::<std::collections::BTreeSet<_>>() {
            let (a, b) = (ours.get(key), theirs.get(key));
            if a != b {
                let brief = |e: Option<&Entry>| match e {
                    Some(Entry::File { nlink, contents }) => format!("file nlink={nlink} len={}", contents.len()),
                    other => format!("{other:?}"),
                };
                diffs.push(format!("  {}: kmsfs {} / plain {}", key.display(), brief(a), brief(b)));
            }
        }
        panic!("{when}: trees differ:\n{}\n{}\nkmsfs log:\n{}", diffs.join("\n"), self.context(), self.mount.log());
    }
}

#[test]
fn random_operations_match_a_plain_directory() {
    let ops: usize = std::env::var("KMSFS_MODEL_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let seed: u64 = std::env::var("KMSFS_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("fs_model: seed {seed} (KMSFS_MODEL_SEED={seed}), {ops} operations");
    eprintln!("fs_model: seed {seed} (KMSFS_MODEL_SEED={seed}), {ops} operations");
    let mount = TestMount::new();
    // The reference lives on the same file system as the backing directory.
    let plain = tempfile::Builder::new().prefix("kmsfs-model-").tempdir_in(mount.cipher().parent().unwrap()).unwrap();
    let mut run = Run { seed, mount, plain, recent: VecDeque::new() };
    let mut rng = Rng(seed);
    let mut failed = 0;
    for i in 0..ops {
        let op = Op::random(&mut rng, &Existing::scan(run.plain.path()));
        let ours = op.apply(&run.mount.mnt());
        let theirs = op.apply(run.plain.path());
        if run.recent.len() == 30 {
            run.recent.pop_front();
        }
        let brief = match &ours {
            Outcome::Data(d) => Outcome::Data(d.iter().take(16).copied().collect()),
            other => other.clone_brief(),
        };
        failed += usize::from(matches!(brief, Outcome::Failed(_)));
        run.recent.push_back((i, op.clone(), brief));
        if ours != theirs {
            let show = |o: &Outcome| match o {
                Outcome::Data(d) => format!("{} bytes", d.len()),
                other => format!("{other:?}"),
            };
            let first_diff = match (&ours, &theirs) {
                (Outcome::Data(a), Outcome::Data(b)) => {
                    a.iter().zip(b).position(|(x, y)| x != y).map(|p| format!(", first differing byte at {p}"))
                }
                _ => None,
            };
            panic!(
                "operation #{i} {op:?}: kmsfs {} / plain {}{}\n{}\nkmsfs log:\n{}",
                show(&ours),
                show(&theirs),
                first_diff.unwrap_or_default(),
                run.context(),
                run.mount.log()
            );
        }
        if (i + 1) % 1000 == 0 {
            run.compare_trees(&format!("after {} operations", i + 1));
        }
        if i == ops / 2 {
            run.compare_trees("before the remount");
            run.mount.remount();
            run.compare_trees("after the remount");
        }
    }
    run.compare_trees("at the end");
    let tree = snapshot(&run.mount.mnt());
    println!("fs_model: {failed} of {ops} operations failed (alike on both sides); {} entries at the end", tree.len());
    let fsck = run.mount.kmsfs().arg("fsck").arg(run.mount.cipher()).output().unwrap();
    assert!(
        fsck.status.success(),
        "fsck after the run: {}{}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr),
        run.context()
    );
}

impl Outcome {
    fn clone_brief(&self) -> Outcome {
        match self {
            Outcome::Done => Outcome::Done,
            Outcome::Data(d) => Outcome::Data(d.clone()),
            Outcome::Failed(e) => Outcome::Failed(*e),
        }
    }
}
