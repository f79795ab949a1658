//! `kmsfs snapshot export` against `cp -a` of the same backing directory, side by side in
//! one run, with the release binaries: a real `kmsd` (default settings: audit trail on) at
//! its default log level, as deployed.
//!
//! A volume of `KMSFS_BENCH_SNAPSHOT_FILES` (10,000) files holding `KMSFS_BENCH_SNAPSHOT_MIB`
//! (1024) MiB in all (sizes spread evenly from 1 byte to twice the mean, 100 files a
//! directory) is made through a kmsfs mount and unmounted. Then, `KMSFS_BENCH_REPEATS` (3)
//! times, the order rotated each time so that none always goes first, each after dropping
//! the page cache:
//! - `kmsfs snapshot export --to-key` a second KMS key (ReEncrypt by the agent: one Decrypt
//!   and one ReEncrypt per file);
//! - `kmsfs snapshot export --public-key` of an RSA_3072 key (one Decrypt per file, the RSA
//!   encryption in kmsfs);
//! - `cp -a` of the backing directory, then `sync` (timed on its own: an export syncs what it
//!   wrote before it calls the snapshot complete, `cp -a` does not).
//!
//! Each copy is removed (and synced away) before the next. The table shows medians of wall
//! time, MiB/s and files/s over the backing directory's bytes and files, with the CPU seconds
//! of the copying process and of kmsd, and the ratios of the exports to `cp -a + sync` and to
//! `cp -a` alone.
//!
//! Needs root (mounts, dropping the page cache) and /dev/fuse. By hand:
//!
//! ```text
//! cargo build --release --bins && cargo bench -p kmsfs-tests --bench snapshot
//! ```
//!
//! `KMSFS_BENCH_DIR` says where the volume and the copies live (default /var/tmp).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use kmsfs_tests::{Rng, TestAgent, TestMount};
use serde_json::json;

const FILES_PER_DIR: usize = 100;
const MIB: f64 = 1048576.0;

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
            eprintln!("{name} must be a positive whole number, not {v:?}");
            std::process::exit(2)
        }),
        Err(_) => default,
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn output_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).trim().to_string()
}

fn drop_caches() {
    run(&mut Command::new("sync"));
    fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches (needs root)");
}

/// User plus system CPU seconds of the children this process waited for so far.
fn children_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(usage.user_time()) + secs(usage.system_time())
}

/// User plus system CPU seconds of process `pid` so far.
fn process_cpu(pid: u32, clock_ticks: f64) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("command name") + 1..].split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); `fields` starts at field 3.
    let field = |n: usize| fields[n - 3].parse::<f64>().expect("a number");
    (field(14) + field(15)) / clock_ticks
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

/// One measured step: wall seconds, the copier's CPU seconds, kmsd's CPU seconds.
#[derive(Clone, Copy, Default)]
struct Step {
    wall: f64,
    cpu: f64,
    kmsd_cpu: f64,
}

struct Bench {
    agent_pid: u32,
    clock_ticks: f64,
}

impl Bench {
    /// Runs `cmd` after dropping the page cache (unless `warm`).
    fn time(&self, name: &str, cmd: &mut Command, warm: bool) -> Step {
        if !warm {
            drop_caches();
        }
        let (cpu, kmsd) = (children_cpu(), process_cpu(self.agent_pid, self.clock_ticks));
        let start = Instant::now();
        let out = run(cmd);
        let step = Step {
            wall: start.elapsed().as_secs_f64(),
            cpu: children_cpu() - cpu,
            kmsd_cpu: process_cpu(self.agent_pid, self.clock_ticks) - kmsd,
        };
        eprintln!("{name}: {:.2} s {}", step.wall, String::from_utf8_lossy(&out.stdout).trim());
        step
    }
}

/// Stored bytes and regular files under `root`.
fn size_of_tree(root: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let meta = fs::symlink_metadata(entry.path()).expect("stat");
            if meta.is_dir() {
                todo.push(entry.path());
            } else if meta.is_file() {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    (bytes, files)
}

fn remove(path: &Path) {
    if path.exists() {
        fs::remove_dir_all(path).expect("remove a copy");
    }
    run(&mut Command::new("sync"));
}

fn main() {
    if !kmsfs_tests::is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!(
            "the snapshot benchmark mounts a filesystem and drops the page cache: run it as root, with /dev/fuse"
        );
        std::process::exit(2);
    }
    let base = std::env::var_os("KMSFS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new().prefix("kmsfs-bench-snapshot-").tempdir_in(&base).expect("bench directory");
    let files = env_number("KMSFS_BENCH_SNAPSHOT_FILES", 10_000) as usize;
    let mib = env_number("KMSFS_BENCH_SNAPSHOT_MIB", 1024);
    let repeats = env_number("KMSFS_BENCH_REPEATS", 3) as usize;
    let clock_ticks: f64 = output_of(Command::new("getconf").arg("CLK_TCK")).parse().expect("CLK_TCK");

    let mut m = TestMount::quiet_in(dir.path(), &[], &[]);
    let mean = (mib << 20) / files as u64;
    eprintln!("snapshot: writing {files} files, {mib} MiB in all, through kmsfs");
    let mut rng = Rng(18);
    let pool = rng.bytes(4 << 20);
    let started = Instant::now();
    for i in 0..files {
        if i % FILES_PER_DIR == 0 {
            fs::create_dir(m.path(&format!("d{:03}", i / FILES_PER_DIR))).expect("mkdir");
        }
        let size = (rng.below(2 * mean) + 1) as usize;
        let start = rng.index(pool.len());
        let contents: Vec<u8> = pool.iter().cycle().skip(start).take(size).copied().collect();
        fs::write(m.path(&format!("d{:03}/f{:04}", i / FILES_PER_DIR, i % FILES_PER_DIR)), contents).expect("write");
    }
    run(&mut Command::new("sync"));
    eprintln!("snapshot: written in {:.1} s", started.elapsed().as_secs_f64());
    m.unmount();
    let (bytes, backing_files) = size_of_tree(&m.cipher());

    let agent: &TestAgent = &m.agent;
    let to_key = kmsfs_tests::create_key(agent);
    let rsa = agent.ok("CreateKey", json!({"KeySpec": "RSA_3072", "KeyUsage": "ENCRYPT_DECRYPT"}));
    let rsa_arn = rsa["KeyMetadata"]["Arn"].as_str().expect("Arn").to_string();
    let public_key = dir.path().join("receiver.der");
    fs::write(&public_key, kmsfs_tests::unb64(&agent.ok("GetPublicKey", json!({"KeyId": rsa_arn}))["PublicKey"]))
        .expect("public key");
    let bench = Bench { agent_pid: agent.pid(), clock_ticks };

    let names = ["export --to-key", "export --public-key", "cp -a"];
    let mut samples: Vec<Vec<Step>> = vec![Vec::new(); 4];
    for repeat in 0..repeats {
        for k in 0..names.len() {
            let which = (k + repeat) % names.len();
            let dest = dir.path().join(format!("copy-{which}"));
            match which {
                0 | 1 => {
                    let mut cmd = m.kmsfs();
                    cmd.args(["snapshot", "export"]).arg(m.cipher()).arg(&dest);
                    if which == 0 {
                        cmd.args(["--to-key", &to_key]);
                    } else {
                        cmd.args(["--to-key", &rsa_arn, "--public-key"]).arg(&public_key);
                    }
                    samples[which].push(bench.time(names[which], &mut cmd, false));
                }
                _ => {
                    samples[2].push(bench.time(
                        "cp -a",
                        Command::new("cp").arg("-a").arg(m.cipher()).arg(&dest),
                        false,
                    ));
                    samples[3].push(bench.time("sync", &mut Command::new("sync"), true));
                }
            }
            remove(&dest);
        }
    }

    let med = |i: usize, f: fn(&Step) -> f64| median(&samples[i].iter().map(f).collect::<Vec<_>>());
    let cp_sync =
        |f: fn(&Step) -> f64| median(&samples[2].iter().zip(&samples[3]).map(|(c, s)| f(c) + f(s)).collect::<Vec<_>>());
    println!("## kmsfs snapshot export against cp -a\n");
    println!(
        "- machine: {} CPUs, kernel {}",
        output_of(&mut Command::new("nproc")),
        output_of(Command::new("uname").arg("-r"))
    );
    let disk = output_of(Command::new("findmnt").args(["-n", "-o", "SOURCE,FSTYPE", "-T"]).arg(dir.path()));
    println!("- disk: {disk}, bench directory {}", dir.path().display());
    println!(
        "- volume: {files} files ({backing_files} backing files with the directory IDs), {:.0} MiB stored; {repeats} \
         repeat(s), order rotated, page cache dropped before each; medians\n",
        bytes as f64 / MIB
    );
    println!("| | seconds | MiB/s | files/s | CPU s (copier) | CPU s (kmsd) |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, wall: f64, cpu: f64, kmsd: f64| {
        println!(
            "| {name} | {wall:.2} | {:.0} | {:.0} | {cpu:.2} | {kmsd:.2} |",
            bytes as f64 / MIB / wall,
            files as f64 / wall
        );
    };
    for (i, name) in names.iter().enumerate().take(2) {
        row(&format!("kmsfs snapshot {name}"), med(i, |s| s.wall), med(i, |s| s.cpu), med(i, |s| s.kmsd_cpu));
    }
    row("cp -a", med(2, |s| s.wall), med(2, |s| s.cpu), 0.0);
    row("cp -a + sync", cp_sync(|s| s.wall), cp_sync(|s| s.cpu), 0.0);
    println!();
    for (i, name) in names.iter().enumerate().take(2) {
        println!(
            "export {}: {:.2}x the time of cp -a + sync ({:.2}x its MiB/s), {:.2}x the time of cp -a alone",
            name.trim_start_matches("export "),
            med(i, |s| s.wall) / cp_sync(|s| s.wall),
            cp_sync(|s| s.wall) / med(i, |s| s.wall),
            med(i, |s| s.wall) / med(2, |s| s.wall)
        );
    }
}
