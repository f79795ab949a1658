//! kmsfs against a plain directory and gocryptfs, side by side on the same disk, with the
//! release binaries: a real `kmsd` (default settings: audit trail on) and a `kmsfs` mount
//! (default: 8 threads), both at their default log levels, as deployed.
//!
//! Workloads, each run on each target in turn, the whole set repeated (target order rotated
//! each repeat so that none always goes first); the tables show medians:
//! - sequential write (`dd bs=1M conv=fsync`) and, after dropping the page cache, read;
//! - fio random 4 KiB reads (4 jobs, time-based, on files laid out beforehand, cache dropped)
//!   and random 4 KiB overwrites (4 jobs, 64 MiB each, `end_fsync`, timed by wall clock);
//! - 5,000 files of 4 KiB in 50 directories written by this process, then `sync`; after
//!   dropping the cache, `ls -lR` of the tree; then `rm -rf` of it;
//! - extracting a source tarball (`tar -xf`, then `sync`): by default the newest tokio crate
//!   in the cargo registry cache.
//!
//! The CPU time (utime + stime from /proc/PID/stat) of kmsfs and kmsd, and of gocryptfs, is
//! taken around each measurement. Last, on kmsfs alone, enough empty files are created to
//! fill the data-key cache (default capacity 100,000) and kmsfs's peak and current RSS are
//! reported against the 128 MiB target, with the cache's entry count from `kmsfs status`.
//!
//! Then `kmsfs rewrap` of a volume of `KMSFS_BENCH_REWRAP_FILES` (100,000) files of 1 KiB,
//! unmounted, after RotateKeyOnDemand, side by side with `cp -a` (and `sync`) of its backing
//! directory: files/s and the CPU time of kmsfs and kmsd against cp's (group `rewrap`; alone:
//! `KMSFS_BENCH_ONLY=rewrap KMSFS_BENCH_RSS_FILES=1`).
//!
//! Needs root (mounts, dropping the page cache), /dev/fuse, gocryptfs and fio.
//! `scripts/bench` installs what is missing, builds and runs this; by hand:
//!
//! ```text
//! cargo build --release --bins && cargo bench -p kmsfs-tests --bench fs
//! ```
//!
//! Settings (environment): `KMSFS_BENCH_DIR` (where the three targets live; default
//! /var/tmp), `KMSFS_BENCH_REPEATS` (3), `KMSFS_BENCH_SEQ_MIB` (1024),
//! `KMSFS_BENCH_FIO_SECS` (10), `KMSFS_BENCH_RSS_FILES` (100000), `KMSFS_BENCH_ONLY`
//! (a comma-separated list of groups: sequential, random read, random write, small files,
//! tarball; default all), `KMSFS_BENCH_TARBALL`
//! (another tarball, e.g. /usr/src/linux-source-*.tar.xz for a large run),
//! `KMSFS_BENCH_ONE_CPU` (a CPU number: this process, the tools it runs and every thread of
//! the filesystems' processes run on that CPU alone; what each filesystem costs when no FUSE
//! request or answer has to wake another CPU, which on a VM without halt-polling is most of
//! a small request's cost).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kmsfs_tests::{Rng, TestMount};
use serde_json::Value;

/// Files per fio job: random reads over 1 GiB in all, random overwrites of 256 MiB.
const FIO_READ_SIZE: &str = "256M";
const FIO_WRITE_SIZE: &str = "64M";
const FIO_JOBS: &str = "4";
/// The small-files tree: directories × files of `SMALL_FILE_SIZE` bytes.
const SMALL_DIRS: usize = 50;
const SMALL_FILES_PER_DIR: usize = 100;
const SMALL_FILE_SIZE: usize = 4096;
/// Files per directory when filling the data-key cache.
const RSS_FILES_PER_DIR: usize = 1000;
const RSS_TARGET_MIB: f64 = 128.0;
const GIB: f64 = (1u64 << 30) as f64;

struct Settings {
    dir: PathBuf,
    repeats: usize,
    seq_mib: u64,
    fio_secs: u64,
    rss_files: usize,
    tarball: Tarball,
    clock_ticks: f64,
    /// `KMSFS_BENCH_ONE_CPU`: the CPU everything is pinned to.
    one_cpu: Option<u64>,
}

/// Pins every thread of process `pid` (and so the threads and children it makes later) to
/// `cpu`, with util-linux's `taskset`.
fn pin(pid: u32, cpu: u64) {
    run(Command::new("taskset").args(["--all-tasks", "--pid", "--cpu-list"]).arg(cpu.to_string()).arg(pid.to_string()));
}

/// A positive whole number from the environment, or `default`; a clear message and exit
/// when it is not one.
fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
            eprintln!("{name} must be a positive whole number, not {v:?}");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

/// Stops with a clear message (exit 2) when something the benchmark needs is missing.
fn preflight() {
    let fail = |msg: String| -> ! {
        eprintln!("{msg}");
        std::process::exit(2)
    };
    if !kmsfs_tests::is_root() {
        fail("the filesystem benchmark mounts filesystems and drops the page cache: run it as root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        fail("/dev/fuse is missing: the filesystem benchmark needs FUSE".into());
    }
    for tool in ["gocryptfs", "fio"] {
        if Command::new(tool).arg("--version").output().is_err() {
            fail(format!("{tool} not found: install it (`apt-get install -y {tool}`; scripts/bench does)"));
        }
    }
    let bins = kmsfs_tests::bin_dir();
    for name in ["kmsd", "kmsfs"] {
        if !bins.join(name).is_file() {
            fail(format!(
                "{} not found: build the release binaries first with `cargo build --release --bins`, \
                 then run `cargo bench -p kmsfs-tests --bench fs` (scripts/bench does both)",
                bins.join(name).display()
            ));
        }
    }
}

/// Runs a command to completion; panics naming it, with its stderr, if it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// The standard output of a command that must succeed, trimmed.
fn output_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).trim().to_string()
}

/// Writes dirty pages back and empties the page cache, dentries and inodes, so that reads
/// come from the disk through each target.
fn drop_caches() {
    run(&mut Command::new("sync"));
    fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches (needs root)");
}

fn sync() {
    run(&mut Command::new("sync"));
}

/// A process whose CPU time a target's figures include.
struct Process {
    name: &'static str,
    pid: u32,
}

impl Process {
    /// User plus system CPU time so far, in clock ticks (of every thread, live or exited).
    fn cpu_ticks(&self) -> u64 {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{} ({path}): {e}", self.name));
        // The command name (field 2) may hold spaces and parentheses: count from its end.
        let after_name = &stat[stat.rfind(')').unwrap_or_else(|| panic!("{path}: no command name")) + 1..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of proc(5); `fields` starts at field 3.
        let field = |n: usize| -> u64 {
            fields.get(n - 3).and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("{path}: no field {n}: {stat}"))
        };
        field(14) + field(15)
    }

    /// A `Vm*` figure of /proc/PID/status, in KiB.
    fn status_kib(&self, key: &str) -> u64 {
        let path = format!("/proc/{}/status", self.pid);
        let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{} ({path}): {e}", self.name));
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{path}: no {key}"))
    }
}

/// One of the three filesystems measured.
struct Target {
    name: &'static str,
    root: PathBuf,
    /// The processes that serve it (none for the plain directory).
    processes: Vec<Process>,
}

/// What one run of a workload measured on one target.
struct Sample {
    workload: Workload,
    value: f64,
    /// GiB or files, by which the CPU time is divided.
    amount: f64,
    /// CPU seconds per serving process during the measurement.
    cpu: Vec<(&'static str, f64)>,
}

/// Runs `work` on `target`: its wall time and each serving process's CPU seconds meanwhile.
fn measure<T>(settings: &Settings, target: &Target, work: impl FnOnce() -> T) -> (T, f64, Vec<(&'static str, f64)>) {
    let before: Vec<u64> = target.processes.iter().map(Process::cpu_ticks).collect();
    let start = Instant::now();
    let result = work();
    let wall = start.elapsed().as_secs_f64();
    let cpu = target
        .processes
        .iter()
        .zip(before)
        .map(|(p, b)| (p.name, p.cpu_ticks().saturating_sub(b) as f64 / settings.clock_ticks))
        .collect();
    (result, wall, cpu)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Workload {
    SeqWrite,
    SeqRead,
    RandRead,
    RandWrite,
    SmallCreate,
    SmallList,
    SmallRemove,
    Tarball,
}

/// How a workload's figure reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    MbPerSec,
    Iops,
    FilesPerSec,
    Seconds,
}

/// What a workload's CPU time is divided by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CpuPer {
    GiB,
    File,
}

impl Workload {
    const ALL: [Workload; 8] = [
        Workload::SeqWrite,
        Workload::SeqRead,
        Workload::RandRead,
        Workload::RandWrite,
        Workload::SmallCreate,
        Workload::SmallList,
        Workload::SmallRemove,
        Workload::Tarball,
    ];

    fn label(self, settings: &Settings) -> String {
        let files = SMALL_DIRS * SMALL_FILES_PER_DIR;
        match self {
            Workload::SeqWrite => format!("sequential write {} MiB", settings.seq_mib),
            Workload::SeqRead => format!("sequential read {} MiB", settings.seq_mib),
            Workload::RandRead => "fio random read 4 KiB ×4".into(),
            Workload::RandWrite => "fio random write 4 KiB ×4".into(),
            Workload::SmallCreate => format!("create {files} × 4 KiB files"),
            Workload::SmallList => format!("ls -lR {files} files (cold)"),
            Workload::SmallRemove => format!("rm -rf {files} files"),
            Workload::Tarball => format!("extract {}", settings.tarball.name()),
        }
    }

    fn unit(self) -> Unit {
        match self {
            Workload::SeqWrite | Workload::SeqRead => Unit::MbPerSec,
            Workload::RandRead | Workload::RandWrite => Unit::Iops,
            Workload::SmallCreate | Workload::SmallRemove => Unit::FilesPerSec,
            Workload::SmallList | Workload::Tarball => Unit::Seconds,
        }
    }

    fn cpu_per(self) -> Option<CpuPer> {
        match self {
            Workload::SeqWrite | Workload::SeqRead => Some(CpuPer::GiB),
            Workload::SmallCreate | Workload::SmallRemove | Workload::Tarball => Some(CpuPer::File),
            Workload::RandRead | Workload::RandWrite | Workload::SmallList => None,
        }
    }

    /// The issue's target for kmsfs's speed relative to gocryptfs.
    fn target_vs_gocryptfs(self) -> Option<f64> {
        match self {
            Workload::SeqWrite | Workload::SeqRead => Some(1.5),
            Workload::SmallCreate | Workload::Tarball => Some(2.0),
            Workload::RandRead => Some(1.0),
            Workload::RandWrite | Workload::SmallList | Workload::SmallRemove => None,
        }
    }
}

/// `dd` a file of `seq_mib` MiB of zeros with a closing fsync, then (page cache dropped)
/// read it back.
fn sequential(settings: &Settings, target: &Target) -> Vec<Sample> {
    let file = target.root.join("seq");
    let bytes = settings.seq_mib as f64 * (1u64 << 20) as f64;
    let gib = bytes / GIB;
    let ((), write, write_cpu) = measure(settings, target, || {
        run(Command::new("dd").arg("if=/dev/zero").arg(format!("of={}", file.display())).args([
            "bs=1M",
            &format!("count={}", settings.seq_mib),
            "conv=fsync",
        ]));
    });
    drop_caches();
    let ((), read, read_cpu) = measure(settings, target, || {
        run(Command::new("dd").arg(format!("if={}", file.display())).args(["of=/dev/null", "bs=1M"]));
    });
    fs::remove_file(&file).unwrap_or_else(|e| panic!("remove {}: {e}", file.display()));
    vec![
        Sample { workload: Workload::SeqWrite, value: bytes / 1e6 / write, amount: gib, cpu: write_cpu },
        Sample { workload: Workload::SeqRead, value: bytes / 1e6 / read, amount: gib, cpu: read_cpu },
    ]
}

/// A fio command for 4 KiB I/O by `FIO_JOBS` jobs on files in `dir`.
fn fio(dir: &Path, name: &str, rw: &str, size: &str) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--size={size}"))
        .args(["--bs=4k", "--ioengine=psync", &format!("--numjobs={FIO_JOBS}")]);
    cmd
}

/// The one (grouped) job of fio's JSON report.
fn fio_report(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json = &text[text.find('{').unwrap_or_else(|| panic!("fio printed no JSON report:\n{text}"))..];
    let report: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio's JSON report ({e}):\n{text}"));
    report["jobs"][0].clone()
}

/// Random 4 KiB reads for `fio_secs` on files laid out (and evicted from the cache)
/// beforehand: IOPS as fio counts them.
fn random_read(settings: &Settings, target: &Target) -> Vec<Sample> {
    let dir = target.root.join("fio");
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    run(fio(&dir, "randread", "randread", FIO_READ_SIZE).arg("--create_only=1"));
    drop_caches();
    let (out, _, cpu) = measure(settings, target, || {
        run(fio(&dir, "randread", "randread", FIO_READ_SIZE)
            .args(["--time_based", &format!("--runtime={}", settings.fio_secs)])
            .args(["--group_reporting", "--output-format=json"]))
    });
    let iops = fio_report(&out)["read"]["iops"].as_f64().expect("fio report: read.iops");
    fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    vec![Sample { workload: Workload::RandRead, value: iops, amount: 1.0, cpu }]
}

/// Random 4 KiB overwrites of laid-out files with a closing fsync: writes per second of
/// the fio process's wall time.
fn random_write(settings: &Settings, target: &Target) -> Vec<Sample> {
    let dir = target.root.join("fio");
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    run(fio(&dir, "randwrite", "randwrite", FIO_WRITE_SIZE).args(["--overwrite=1", "--create_only=1"]));
    drop_caches();
    let (out, wall, cpu) = measure(settings, target, || {
        run(fio(&dir, "randwrite", "randwrite", FIO_WRITE_SIZE).args([
            "--overwrite=1",
            "--end_fsync=1",
            "--group_reporting",
            "--output-format=json",
        ]))
    });
    let writes = fio_report(&out)["write"]["total_ios"].as_f64().expect("fio report: write.total_ios");
    fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    vec![Sample { workload: Workload::RandWrite, value: writes / wall, amount: 1.0, cpu }]
}

/// Creates the small-files tree and `sync`s; lists it cold; removes it.
fn small_files(settings: &Settings, target: &Target) -> Vec<Sample> {
    let tree = target.root.join("small");
    let files = (SMALL_DIRS * SMALL_FILES_PER_DIR) as f64;
    // Each file a different 4 KiB window of a random pool, drawn before the clock starts.
    let pool = Rng(0x6b6d_7366).bytes(1 << 20);
    let ((), create, create_cpu) = measure(settings, target, || {
        for d in 0..SMALL_DIRS {
            let dir = tree.join(format!("d{d:02}"));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            for f in 0..SMALL_FILES_PER_DIR {
                let at = ((d * SMALL_FILES_PER_DIR + f) * 4099) % (pool.len() - SMALL_FILE_SIZE);
                let path = dir.join(format!("f{f:03}"));
                fs::write(&path, &pool[at..at + SMALL_FILE_SIZE])
                    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            }
        }
        sync();
    });
    drop_caches();
    let ((), list, list_cpu) = measure(settings, target, || {
        run(Command::new("ls").arg("-lR").arg(&tree).stdout(Stdio::null()));
    });
    let ((), remove, remove_cpu) = measure(settings, target, || {
        run(Command::new("rm").arg("-rf").arg(&tree));
    });
    vec![
        Sample { workload: Workload::SmallCreate, value: files / create, amount: files, cpu: create_cpu },
        Sample { workload: Workload::SmallList, value: list, amount: files, cpu: list_cpu },
        Sample { workload: Workload::SmallRemove, value: files / remove, amount: files, cpu: remove_cpu },
    ]
}

/// `tar -xf` then `sync`; the tree is removed afterwards, untimed.
fn tarball(settings: &Settings, target: &Target) -> Vec<Sample> {
    let dir = target.root.join("tar");
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let ((), seconds, cpu) = measure(settings, target, || {
        run(Command::new("tar").arg("-xf").arg(&settings.tarball.path).arg("-C").arg(&dir));
        sync();
    });
    run(Command::new("rm").arg("-rf").arg(&dir));
    vec![Sample { workload: Workload::Tarball, value: seconds, amount: settings.tarball.files as f64, cpu }]
}

/// The source tarball extracted by the benchmark.
struct Tarball {
    path: PathBuf,
    files: usize,
}

impl Tarball {
    /// `KMSFS_BENCH_TARBALL`, or the newest tokio crate in the cargo registry cache, or
    /// failing that any libc crate there.
    fn find() -> Tarball {
        let path = match std::env::var_os("KMSFS_BENCH_TARBALL") {
            Some(path) => PathBuf::from(path),
            None => {
                let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME or CARGO_HOME")).join(".cargo")
                });
                let cache = cargo_home.join("registry/cache");
                let crates: Vec<PathBuf> = fs::read_dir(&cache)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .flat_map(|registry| fs::read_dir(registry.path()).into_iter().flatten().flatten())
                    .map(|entry| entry.path())
                    .collect();
                let newest = |krate: &str| {
                    crates
                        .iter()
                        .filter(|p| {
                            let name = p.file_name().unwrap_or_default().to_string_lossy();
                            // tokio-1.2.3.crate, not tokio-macros-2.0.0.crate
                            name.ends_with(".crate")
                                && name
                                    .strip_prefix(krate)
                                    .and_then(|rest| rest.strip_prefix('-'))
                                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
                        })
                        .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
                        .cloned()
                };
                newest("tokio").or_else(|| newest("libc")).unwrap_or_else(|| {
                    panic!("no tokio or libc crate in {}: set KMSFS_BENCH_TARBALL to a source tarball", cache.display())
                })
            }
        };
        let listing = output_of(Command::new("tar").arg("-tf").arg(&path));
        let files = listing.lines().filter(|l| !l.ends_with('/')).count();
        Tarball { path, files }
    }

    fn name(&self) -> String {
        self.path.file_name().unwrap_or_default().to_string_lossy().into_owned()
    }
}

/// A gocryptfs volume mounted in the foreground by a child process (so that its CPU time
/// can be read), unmounted on drop.
struct Gocryptfs {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
}

impl Gocryptfs {
    fn mount(dir: &Path) -> Gocryptfs {
        let (cipher, mnt, passfile, log) =
            (dir.join("cipher"), dir.join("mnt"), dir.join("passfile"), dir.join("gocryptfs.log"));
        for d in [dir, &cipher, &mnt] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        fs::write(&passfile, "kmsfs benchmark\n").expect("gocryptfs passfile");
        run(Command::new("gocryptfs").args(["-init", "-q", "-passfile"]).arg(&passfile).arg(&cipher));
        let log_file = fs::File::create(&log).expect("gocryptfs log");
        let child = Command::new("gocryptfs")
            .args(["-fg", "-nosyslog", "-q", "-passfile"])
            .arg(&passfile)
            .arg(&cipher)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("gocryptfs log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run gocryptfs: {e}"));
        let mut mount = Gocryptfs { child, mnt, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&mount.mnt) {
            if let Ok(Some(status)) = mount.child.try_wait() {
                panic!("gocryptfs exited with {status}:\n{}", fs::read_to_string(&mount.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "gocryptfs did not mount {} within 30 s", mount.mnt.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        mount
    }
}

impl Drop for Gocryptfs {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount").arg("-u").arg(&self.mnt).status().is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True when `path` is a mount point according to /proc/self/mountinfo.
fn is_mounted(path: &Path) -> bool {
    let Ok(path) = fs::canonicalize(path) else { return false };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    // Field 5 is the mount point, with spaces and the like escaped as \ooo.
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    mountinfo.lines().any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Three significant-ish digits, without a pile of decimals on big numbers.
fn number(v: f64) -> String {
    match v.abs() {
        0.0 => "0".into(),
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

fn cell(settings: &Settings, workload: Workload, v: f64) -> String {
    match workload.unit() {
        Unit::MbPerSec => format!("{} MB/s", number(v)),
        Unit::Iops => format!("{} IOPS", number(v)),
        Unit::FilesPerSec => format!("{} files/s", number(v)),
        Unit::Seconds if workload == Workload::Tarball => {
            format!("{} s ({} files/s)", number(v), number(settings.tarball.files as f64 / v))
        }
        Unit::Seconds => format!("{} s", number(v)),
    }
}

/// How many times faster `a` is than `b`.
fn speed_ratio(workload: Workload, a: f64, b: f64) -> f64 {
    match workload.unit() {
        Unit::Seconds => b / a,
        _ => a / b,
    }
}

const TARGETS: [&str; 3] = ["plain", "gocryptfs", "kmsfs"];

/// What the benchmark ran on, for the record.
fn print_machine(settings: &Settings) {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let memory = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|m| m.trim().to_string()))
        .unwrap_or_default();
    let disk = output_of(Command::new("findmnt").args(["-n", "-o", "SOURCE,FSTYPE,TARGET", "-T"]).arg(&settings.dir));
    let gocryptfs = output_of(Command::new("gocryptfs").arg("-version"));
    let gocryptfs = gocryptfs.split(';').next().unwrap_or_default();
    println!("## kmsfs filesystem benchmark\n");
    println!("- machine: {} CPUs ({}), {memory} RAM", output_of(&mut Command::new("nproc")), model);
    println!("- kernel: Linux {}", output_of(Command::new("uname").arg("-r")));
    println!("- disk: {} (device, filesystem, mounted on)", disk.split_whitespace().collect::<Vec<_>>().join(" "));
    println!("- bench directory: {}", settings.dir.display());
    println!("- {gocryptfs}, {}", output_of(Command::new("fio").arg("--version")));
    println!("- binaries: {}", kmsfs_tests::bin_dir().display());
    println!(
        "- {} repeat(s), target order rotated each time; medians; sequential {} MiB; fio random read {} s",
        settings.repeats, settings.seq_mib, settings.fio_secs
    );
    if let Some(cpu) = settings.one_cpu {
        println!("- KMSFS_BENCH_ONE_CPU: the benchmark, its tools and the filesystems' processes all on CPU {cpu}");
    }
    println!("- tarball: {} ({} files)\n", settings.tarball.path.display(), settings.tarball.files);
}

type Group = fn(&Settings, &Target) -> Vec<Sample>;

fn main() {
    preflight();
    let base = std::env::var_os("KMSFS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new()
        .prefix("kmsfs-bench-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("cannot create a directory in {}: {e}", base.display()));
    let clock_ticks: f64 =
        output_of(Command::new("getconf").arg("CLK_TCK")).parse().expect("getconf CLK_TCK: a number");
    let settings = Settings {
        dir: dir.path().to_path_buf(),
        repeats: env_number("KMSFS_BENCH_REPEATS", 3) as usize,
        seq_mib: env_number("KMSFS_BENCH_SEQ_MIB", 1024),
        fio_secs: env_number("KMSFS_BENCH_FIO_SECS", 10),
        rss_files: env_number("KMSFS_BENCH_RSS_FILES", 100_000) as usize,
        tarball: Tarball::find(),
        clock_ticks,
        one_cpu: std::env::var("KMSFS_BENCH_ONE_CPU").ok().map(|v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("KMSFS_BENCH_ONE_CPU must be a CPU number, not {v:?}");
                std::process::exit(2)
            })
        }),
    };
    print_machine(&settings);

    // Locals drop in reverse order, on a panic too: kmsfs and gocryptfs are unmounted
    // before their directory is removed.
    let plain = dir.path().join("plain");
    fs::create_dir(&plain).expect("plain directory");
    let gocryptfs = Gocryptfs::mount(&dir.path().join("gocryptfs"));
    let kmsfs = TestMount::quiet_in(dir.path(), &[], &[]);
    let targets = [
        Target { name: TARGETS[0], root: plain, processes: vec![] },
        Target {
            name: TARGETS[1],
            root: gocryptfs.mnt.clone(),
            processes: vec![Process { name: "gocryptfs", pid: gocryptfs.child.id() }],
        },
        Target {
            name: TARGETS[2],
            root: kmsfs.mnt(),
            processes: vec![
                Process { name: "kmsfs", pid: kmsfs.pid() },
                Process { name: "kmsd", pid: kmsfs.agent.pid() },
            ],
        },
    ];

    if let Some(cpu) = settings.one_cpu {
        let serving = targets.iter().flat_map(|t| &t.processes).map(|p| p.pid);
        for pid in serving.chain([std::process::id()]) {
            pin(pid, cpu);
        }
    }

    let groups: [(&str, Group); 5] = [
        ("sequential", sequential),
        ("random read", random_read),
        ("random write", random_write),
        ("small files", small_files),
        ("tarball", tarball),
    ];
    // KMSFS_BENCH_ONLY="small files,tarball" runs only those groups, to iterate on one.
    let only: Option<Vec<String>> =
        std::env::var("KMSFS_BENCH_ONLY").ok().map(|v| v.split(',').map(|g| g.trim().to_string()).collect());
    let groups: Vec<(&str, Group)> =
        groups.into_iter().filter(|(name, _)| only.as_ref().is_none_or(|o| o.iter().any(|g| g == name))).collect();
    let mut values: BTreeMap<(Workload, &str), Vec<f64>> = BTreeMap::new();
    let mut cpu: BTreeMap<(Workload, &str), Vec<f64>> = BTreeMap::new();
    for repeat in 0..settings.repeats {
        for &(group, run_group) in &groups {
            for i in 0..targets.len() {
                let target = &targets[(i + repeat) % targets.len()];
                let samples = run_group(&settings, target);
                let summary: Vec<String> = samples
                    .iter()
                    .map(|s| format!("{} {}", s.workload.label(&settings), cell(&settings, s.workload, s.value)))
                    .collect();
                eprintln!("[{}/{}] {group} on {}: {}", repeat + 1, settings.repeats, target.name, summary.join("; "));
                for s in samples {
                    values.entry((s.workload, target.name)).or_default().push(s.value);
                    for (process, seconds) in s.cpu {
                        cpu.entry((s.workload, process)).or_default().push(seconds / s.amount);
                    }
                }
            }
        }
    }
    let memory = fill_key_cache(&settings, &kmsfs);
    let rewrap = only.as_ref().is_none_or(|o| o.iter().any(|g| g == "rewrap")).then(|| rewrap(&settings));

    println!("\n### Throughput (medians; ratios are speed ratios: above 1, kmsfs is faster)\n");
    println!("| workload | plain | gocryptfs | kmsfs | kmsfs/gocryptfs | kmsfs/plain | target kmsfs/gocryptfs |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    // Workloads left out by KMSFS_BENCH_ONLY have no rows.
    let measured = |workload: Workload| values.contains_key(&(workload, "kmsfs"));
    for workload in Workload::ALL.into_iter().filter(|w| measured(*w)) {
        let m = |target: &'static str| median(values.get(&(workload, target)).map(Vec::as_slice).unwrap_or_default());
        let (plain, gocryptfs, kmsfs) = (m("plain"), m("gocryptfs"), m("kmsfs"));
        let vs_gocryptfs = speed_ratio(workload, kmsfs, gocryptfs);
        let target = match workload.target_vs_gocryptfs() {
            Some(t) => format!("≥ {t} {}", if vs_gocryptfs >= t { "met" } else { "MISSED" }),
            None => "—".into(),
        };
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {target} |",
            workload.label(&settings),
            cell(&settings, workload, plain),
            cell(&settings, workload, gocryptfs),
            cell(&settings, workload, kmsfs),
            vs_gocryptfs,
            speed_ratio(workload, kmsfs, plain),
        );
    }

    println!("\n### CPU time of the filesystem processes (medians)\n");
    println!("| workload | kmsfs | kmsd | kmsfs + kmsd | gocryptfs |");
    println!("|---|---:|---:|---:|---:|");
    for workload in Workload::ALL.into_iter().filter(|w| measured(*w)) {
        let Some(per) = workload.cpu_per() else { continue };
        let m = |process: &'static str| median(cpu.get(&(workload, process)).map(Vec::as_slice).unwrap_or_default());
        let show = |seconds: f64| match per {
            CpuPer::GiB => format!("{} s/GiB", number(seconds)),
            CpuPer::File => format!("{} µs/file", number(seconds * 1e6)),
        };
        let (kmsfs, kmsd, gocryptfs) = (m("kmsfs"), m("kmsd"), m("gocryptfs"));
        println!(
            "| {} | {} | {} | {} | {} |",
            workload.label(&settings),
            show(kmsfs),
            show(kmsd),
            show(kmsfs + kmsd),
            show(gocryptfs)
        );
    }

    println!("\n### Memory of kmsfs with a full data-key cache\n");
    let hwm_mib = memory.hwm_kib as f64 / 1024.0;
    println!(
        "{} empty files created through kmsfs ({} files/s); `kmsfs status`: {} (the earlier workloads' files count too)",
        settings.rss_files,
        number(memory.files_per_sec),
        memory.cache_line
    );
    println!();
    println!("| process | VmHWM (peak) | VmRSS (now) | target |");
    println!("|---|---:|---:|---|");
    println!(
        "| kmsfs | {:.1} MiB | {:.1} MiB | peak ≤ {RSS_TARGET_MIB} MiB {} |",
        hwm_mib,
        memory.rss_kib as f64 / 1024.0,
        if hwm_mib <= RSS_TARGET_MIB { "met" } else { "MISSED" }
    );
    println!(
        "| kmsd | {:.1} MiB | {:.1} MiB | — |",
        memory.kmsd_hwm_kib as f64 / 1024.0,
        memory.kmsd_rss_kib as f64 / 1024.0
    );
    if let Some(rewrap) = rewrap {
        print_rewrap(&rewrap);
    }
    drop(kmsfs);
    drop(gocryptfs);
}

/// What [`rewrap`] measured: wall seconds and CPU seconds (user + system) of each step.
struct Rewrap {
    files: usize,
    rewrap: Timed,
    rerun: Timed,
    copy: Timed,
    sync: f64,
    summary: String,
}

/// User plus system CPU seconds of this process's waited-for children so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(usage.user_time()) + secs(usage.system_time())
}

/// A step's wall seconds, and the CPU seconds of each process meanwhile.
type Timed = (f64, Vec<(&'static str, f64)>);

/// Runs `cmd` (a child process) after dropping the page cache: its [`Timed`] figures (the
/// child's and those of `also`, serving processes), and its output.
fn timed(settings: &Settings, name: &'static str, cmd: &mut Command, also: &[&Process]) -> (Timed, String) {
    drop_caches();
    let (children, before): (f64, Vec<u64>) = (children_cpu(), also.iter().map(|p| p.cpu_ticks()).collect());
    let start = Instant::now();
    let out = run(cmd);
    let wall = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("{name}: {wall:.2} s {stdout}");
    let mut cpu = vec![(name, children_cpu() - children)];
    cpu.extend(also.iter().zip(before).map(|(p, b)| (p.name, (p.cpu_ticks() - b) as f64 / settings.clock_ticks)));
    ((wall, cpu), stdout)
}

/// A volume of small files made through a mount, unmounted, its key rotated (or, on an
/// agent without RotateKeyOnDemand, a second key for `--to-key`); then `kmsfs rewrap`, a
/// second run (nothing left to do), and `cp -a` of the backing directory plus `sync`.
fn rewrap(settings: &Settings) -> Rewrap {
    let files = env_number("KMSFS_BENCH_REWRAP_FILES", 100_000) as usize;
    let mut m = TestMount::quiet_in(&settings.dir, &[], &[]);
    eprintln!("rewrap: creating {files} files of 1 KiB through kmsfs");
    let contents = Rng(7).bytes(1024);
    for i in 0..files {
        if i % RSS_FILES_PER_DIR == 0 {
            fs::create_dir(m.path(&format!("d{:03}", i / RSS_FILES_PER_DIR))).expect("mkdir");
        }
        let path = m.path(&format!("d{:03}/f{:04}", i / RSS_FILES_PER_DIR, i % RSS_FILES_PER_DIR));
        fs::write(&path, &contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    m.unmount();
    let mut rewrap = m.kmsfs();
    rewrap.arg("rewrap").arg(m.cipher());
    if m.agent.call("RotateKeyOnDemand", serde_json::json!({"KeyId": m.key_id})).is_err() {
        eprintln!("rewrap: RotateKeyOnDemand failed: measuring --to-key a second key instead");
        rewrap.arg("--to-key").arg(kmsfs_tests::create_key(&m.agent));
    }
    let kmsd = Process { name: "kmsd", pid: m.agent.pid() };
    let (first, summary) = timed(settings, "kmsfs", &mut rewrap, &[&kmsd]);
    let (rerun, _) = timed(settings, "kmsfs", &mut rewrap, &[&kmsd]);
    let copy_to = settings.dir.join("rewrap-copy");
    let (copy, _) = timed(settings, "cp", Command::new("cp").arg("-a").arg(m.cipher()).arg(&copy_to), &[]);
    let start = Instant::now();
    sync();
    let sync = start.elapsed().as_secs_f64();
    fs::remove_dir_all(&copy_to).expect("remove the copy");
    Rewrap { files, rewrap: first, rerun, copy, sync, summary }
}

fn print_rewrap(r: &Rewrap) {
    let files = r.files as f64;
    let cpu = |figures: &[(&'static str, f64)]| figures.iter().map(|(_, s)| s).sum::<f64>();
    let detail = |figures: &[(&'static str, f64)]| {
        figures.iter().map(|(name, s)| format!("{name} {} s", number(*s))).collect::<Vec<_>>().join(" + ")
    };
    println!("\n### kmsfs rewrap of {} files of 1 KiB (unmounted, page cache dropped)\n", r.files);
    println!("| step | wall | files/s | CPU (user + sys) | CPU µs/file |");
    println!("|---|---:|---:|---:|---:|");
    let copy_and_sync = r.copy.0 + r.sync;
    for (step, wall, figures) in [
        ("kmsfs rewrap", r.rewrap.0, &r.rewrap.1),
        ("kmsfs rewrap again (all skipped)", r.rerun.0, &r.rerun.1),
        ("cp -a of the backing dir", r.copy.0, &r.copy.1),
        ("cp -a + sync", copy_and_sync, &r.copy.1),
    ] {
        println!(
            "| {step} | {} s | {} | {} ({}) | {} |",
            number(wall),
            number(files / wall),
            number(cpu(figures)),
            detail(figures),
            number(cpu(figures) / files * 1e6)
        );
    }
    println!(
        "\nrewrap / (cp -a + sync): {:.2}x the time, {:.2}x the CPU; rewrap / cp -a: {:.2}x the time\n\n`{}`",
        r.rewrap.0 / copy_and_sync,
        cpu(&r.rewrap.1) / cpu(&r.copy.1),
        r.rewrap.0 / r.copy.0,
        r.summary
    );
}

/// What [`fill_key_cache`] found.
struct Memory {
    files_per_sec: f64,
    hwm_kib: u64,
    rss_kib: u64,
    kmsd_hwm_kib: u64,
    kmsd_rss_kib: u64,
    /// The `kmsfs status` figures of the data-key cache.
    cache_line: String,
}

/// Creates `rss_files` empty files through kmsfs, one data key each, then reads kmsfs's
/// memory figures and its cache's size.
fn fill_key_cache(settings: &Settings, kmsfs: &TestMount) -> Memory {
    let tree = kmsfs.path("keys");
    eprintln!("creating {} empty files through kmsfs to fill its data-key cache", settings.rss_files);
    let start = Instant::now();
    for i in 0..settings.rss_files {
        if i % RSS_FILES_PER_DIR == 0 {
            let dir = tree.join(format!("d{:03}", i / RSS_FILES_PER_DIR));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        let path = tree.join(format!("d{:03}/f{:04}", i / RSS_FILES_PER_DIR, i % RSS_FILES_PER_DIR));
        fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    }
    let files_per_sec = settings.rss_files as f64 / start.elapsed().as_secs_f64();
    let status = output_of(kmsfs.kmsfs().arg("status").arg(kmsfs.mnt()));
    // The status document is JSON with one field a line: keep the cache's size and the
    // transport the requests came by (FUSE over io_uring where the kernel offers it).
    let cache_line = status
        .lines()
        .map(|l| l.trim().trim_end_matches(','))
        .filter(|l| {
            ["\"Entries\"", "\"Capacity\"", "\"Transport\"", "\"RingRequests\""].iter().any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join(", ");
    assert!(!cache_line.is_empty(), "`kmsfs status` shows no cache entries:\n{status}");
    let (kmsfs_process, kmsd) =
        (Process { name: "kmsfs", pid: kmsfs.pid() }, Process { name: "kmsd", pid: kmsfs.agent.pid() });
    Memory {
        files_per_sec,
        hwm_kib: kmsfs_process.status_kib("VmHWM"),
        rss_kib: kmsfs_process.status_kib("VmRSS"),
        kmsd_hwm_kib: kmsd.status_kib("VmHWM"),
        kmsd_rss_kib: kmsd.status_kib("VmRSS"),
        cache_line,
    }
}
