//! `kmsfs`: create (`init`), mount, check (`fsck`), re-wrap (`rewrap`), move to another
//! host (`snapshot export`, `snapshot import`) and inspect (`status`) encrypted directories. See the README for usage; `common/src/format/FORMAT.md` for the format.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};
use kmsfs_common::client::AgentClient;
use kmsfs_common::format::block::Layout;
use kmsfs_common::format::volume::{BlockSize, CipherSuite, NameMode};
use kmsfs_fs::keys::AgentPool;
use kmsfs_fs::volume::{InitOptions, OpenOptions, Volume, STATUS_XATTR};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// FUSE worker threads by default: more than the cores, since a request's round trip is
/// mostly waiting for the next wake-up. On 2 cores, 8 created small files about 15%
/// faster than 4 (and 16 no faster than 8).
const DEFAULT_THREADS: usize = 8;

/// kmsfs: a transparent encrypting filesystem whose file keys come from kmsd.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// `kmsfs CIPHERDIR MOUNTPOINT -o OPTIONS`: the form mount(8) uses for `-t fuse.kmsfs`.
    #[arg(num_args = 2, value_names = ["CIPHERDIR", "MOUNTPOINT"])]
    mount_helper: Vec<PathBuf>,
    #[arg(short = 'o', value_delimiter = ',')]
    options: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a volume in an empty directory.
    Init {
        cipherdir: PathBuf,
        /// The KMS key that wraps the volume's file keys (ID, ARN or alias).
        #[arg(long)]
        key_id: String,
        /// The agent's socket (default: as kmsctl finds it, starting a per-user agent).
        #[arg(long, env = "KMSD_SOCKET")]
        socket: Option<PathBuf>,
        #[arg(long, default_value = "aes-256-gcm", value_parser = ["aes-256-gcm", "xchacha20-poly1305"])]
        cipher: String,
        /// Plaintext bytes per encrypted block: a power of two from 4096 to 1048576.
        #[arg(long, default_value_t = 4096)]
        block_size: u64,
        /// Store file names unencrypted (contents stay encrypted).
        #[arg(long)]
        plaintext_names: bool,
    },
    /// Mount a volume; returns once the mount is ready unless --foreground.
    Mount {
        cipherdir: PathBuf,
        mountpoint: PathBuf,
        #[arg(long, env = "KMSD_SOCKET")]
        socket: Option<PathBuf>,
        /// Mount options: allow_other, ro, and the usual nosuid, nodev, noexec, noatime...
        #[arg(short = 'o', value_delimiter = ',')]
        options: Vec<String>,
        /// Stay in the foreground (for systemd and debugging); logs go to stderr.
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Where a background mount logs (default: /var/log/kmsfs.log as root, else
        /// $XDG_RUNTIME_DIR/kmsfs.log).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = DEFAULT_THREADS)]
        threads: usize,
    },
    /// Check every header, block and name of a volume offline.
    Fsck {
        cipherdir: PathBuf,
        #[arg(long, env = "KMSD_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Move every file key (and the name key) to the newest material of the volume's KMS
    /// key, or to another KMS key; no data block is rewritten. Mounted or not; resumable.
    Rewrap {
        cipherdir: PathBuf,
        /// The KMS key to move the volume to (ID, ARN or alias); default: its own key.
        #[arg(long)]
        to_key: Option<String>,
        #[arg(long, env = "KMSD_SOCKET")]
        socket: Option<PathBuf>,
        /// Files re-wrapped at once.
        #[arg(long, default_value_t = kmsfs_fs::rewrap::DEFAULT_THREADS)]
        threads: usize,
    },
    /// Move a volume to another host: copy it with every key wrapped for the receiver
    /// (export), then re-wrap it there under the receiver's own key (import).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCmd,
    },
    /// Show a mount's volume, key, transport, open files and data-key cache: a summary on a
    /// terminal, JSON otherwise.
    Status {
        mountpoint: PathBuf,
        /// `table`: the summary for people; `json`: the status document (default: table on
        /// a terminal, JSON in a pipe).
        #[arg(long, value_parser = ["json", "table"])]
        output: Option<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Copy the backing directory VOLUME to DEST (new or empty) for another host: the data
    /// blocks byte for byte, every file key and the name key wrapped for a key the receiver
    /// holds. Resumable: run it again after an interruption.
    Export {
        volume: PathBuf,
        dest: PathBuf,
        /// A KMS key both hosts hold (a multi-Region key: `mrk-…`), which the sender's agent
        /// ReEncrypts to; with --public-key, the ARN of the receiver's RSA key.
        #[arg(long)]
        to_key: String,
        /// The receiver's RSA public key (RSA_2048 or RSA_3072, ENCRYPT_DECRYPT): DER or
        /// PEM, as `kmsctl get-public-key` gives it. kmsfs encrypts each key to it with
        /// RSAES_OAEP_SHA_256.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Bring a complete snapshot in DEST up to date: only what changed is copied.
        #[arg(long)]
        update: bool,
        /// Seconds between syncs of the files copied so far, after which a rerun (after a
        /// crash or a kill) need not copy them again.
        #[arg(long, default_value_t = kmsfs_fs::snapshot::DEFAULT_CHECKPOINT.as_secs_f64())]
        checkpoint_secs: f64,
        #[arg(long, env = "KMSD_SOCKET")]
        socket: Option<PathBuf>,
        /// Files copied at once.
        #[arg(long, default_value_t = kmsfs_fs::snapshot::DEFAULT_THREADS)]
        threads: usize,
    },
    /// Re-wrap a snapshot from another host under KEY, a KMS key of this host's agent; then
    /// it mounts. Resumable: run it again after an interruption.
    Import {
        dest: PathBuf,
        /// The symmetric KMS key (ID, ARN or alias) the volume is to be under from now on.
        #[arg(long)]
        key: String,
        #[arg(long, env = "KMSD_SOCKET")]
        socket: Option<PathBuf>,
        /// Files re-wrapped at once.
        #[arg(long, default_value_t = kmsfs_fs::rewrap::DEFAULT_THREADS)]
        threads: usize,
    },
}

fn agent(socket: Option<&Path>) -> Result<AgentPool, String> {
    let client = AgentClient::connect_or_start(socket).map_err(|e| e.to_string())?;
    Ok(AgentPool::new(client.socket_path()))
}

/// The agent, once it has said that it can use the key of the volume in `cipherdir`.
fn usable_agent(cipherdir: &Path, socket: Option<&Path>) -> Result<AgentPool, String> {
    let mut client = AgentClient::connect_or_start(socket).map_err(|e| e.to_string())?;
    preflight::volume_key_usable(cipherdir, &mut client)?;
    Ok(AgentPool::new(client.socket_path()))
}

mod preflight;

fn main() -> ExitCode {
    if let Some(code) = kmsfs_common::generate::run_if_asked("kmsfs", Cli::command, "1") {
        return code;
    }
    let cli = Cli::parse();
    let foreground_logging = !matches!(&cli.command, Some(Cmd::Mount { foreground: false, .. }));
    if foreground_logging {
        init_logging();
    }
    let result = match cli.command {
        Some(Cmd::Init { cipherdir, key_id, socket, cipher, block_size, plaintext_names }) => {
            init(&cipherdir, key_id, socket.as_deref(), &cipher, block_size, plaintext_names)
        }
        Some(Cmd::Mount { cipherdir, mountpoint, socket, options, foreground, log_file, threads }) => {
            let mount = MountArgs { cipherdir, mountpoint, socket, options, threads };
            if foreground {
                mount_foreground(&mount, false)
            } else {
                mount_background(&mount, log_file)
            }
        }
        Some(Cmd::Fsck { cipherdir, socket }) => return fsck(&cipherdir, socket.as_deref()),
        Some(Cmd::Rewrap { cipherdir, to_key, socket, threads }) => {
            return rewrap(&cipherdir, to_key.as_deref(), socket.as_deref(), threads)
        }
        Some(Cmd::Snapshot { command }) => return snapshot(command),
        Some(Cmd::Status { mountpoint, output }) => {
            let table = output.map_or_else(|| std::io::stdout().is_terminal(), |o| o == "table");
            status(&mountpoint, table)
        }
        None if cli.mount_helper.len() == 2 => {
            let mount = MountArgs {
                cipherdir: cli.mount_helper[0].clone(),
                mountpoint: cli.mount_helper[1].clone(),
                socket: std::env::var_os("KMSD_SOCKET").map(PathBuf::from),
                options: cli.options,
                threads: DEFAULT_THREADS,
            };
            mount_background(&mount, None)
        }
        None => Err("missing command; see kmsfs --help".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsfs: {e}");
            if std::env::var_os(READY_PIPE).is_some() {
                // Tell the waiting `kmsfs mount` (mount_background) why, in so many words.
                let mut out = std::io::stdout();
                let _ = write!(out, "{FAILED}{e}");
                let _ = out.flush();
            }
            ExitCode::FAILURE
        }
    }
}

/// Set for a `--foreground` mount started by [`mount_background`]: its stdout is a pipe on
/// which it says [`READY`], or [`FAILED`] and why.
const READY_PIPE: &str = "KMSFS_READY_PIPE";
const READY: &str = "ready\n";
const FAILED: &str = "failed: ";

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KMSFS_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn init(
    cipherdir: &Path,
    key_id: String,
    socket: Option<&Path>,
    cipher: &str,
    block_size: u64,
    plaintext_names: bool,
) -> Result<(), String> {
    let cipher = CipherSuite::from_name(cipher).ok_or_else(|| format!("unknown cipher {cipher}"))?;
    let block_size = BlockSize::new(block_size)
        .map_err(|_| format!("block size {block_size} must be a power of two from 4096 to 1048576"))?;
    std::fs::create_dir_all(cipherdir).map_err(|e| format!("cannot create {}: {e}", cipherdir.display()))?;
    let agent = agent(socket)?;
    let names = if plaintext_names { NameMode::Plaintext } else { NameMode::Encrypted };
    let config =
        Volume::init(cipherdir, &agent, InitOptions { key_id, layout: Layout::new(cipher, block_size), names })?;
    println!(
        "created a kmsfs volume in {}\n  key: {}\n  cipher: {}, block size {}, names {}",
        cipherdir.display(),
        config.key_id,
        config.cipher.name(),
        config.block_size.get(),
        config.names.name()
    );
    Ok(())
}

struct MountArgs {
    cipherdir: PathBuf,
    mountpoint: PathBuf,
    socket: Option<PathBuf>,
    options: Vec<String>,
    threads: usize,
}

/// Forks off a `--foreground` copy of ourselves and returns once it reports the mount
/// ready (or fails), as mount helpers are expected to.
fn mount_background(mount: &MountArgs, log_file: Option<PathBuf>) -> Result<(), String> {
    kmsfs_fs::snapshot::refuse_unimported(&mount.cipherdir).map_err(|e| format!("cannot mount: {e}"))?;
    let log_file = log_file.unwrap_or_else(default_log_file);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_file)
        .map_err(|e| format!("cannot open the log file {}: {e}", log_file.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg(&mount.cipherdir).arg(&mount.mountpoint).arg("--foreground");
    cmd.arg("--threads").arg(mount.threads.to_string());
    if let Some(socket) = &mount.socket {
        cmd.arg("--socket").arg(socket);
    }
    if !mount.options.is_empty() {
        cmd.arg("-o").arg(mount.options.join(","));
    }
    cmd.env(READY_PIPE, "1");
    // Only what this mount writes to a shared log file is its own to quote.
    let logged_before = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the mount process: {e}"))?;
    let mut said = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut stdout = BufReader::new(stdout);
        let _ = stdout.read_line(&mut said);
        if said == READY {
            return Ok(());
        }
        let _ = std::io::Read::read_to_string(&mut stdout, &mut said);
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if let Some(why) = said.strip_prefix(FAILED) {
        return Err(why.to_string());
    }
    let logged = std::fs::read(&log_file).unwrap_or_default();
    let logged = String::from_utf8_lossy(logged.get(logged_before..).unwrap_or_default());
    let last: Vec<&str> = logged.lines().rev().take(5).collect();
    Err(format!(
        "the mount failed ({status}); from {}:\n{}",
        log_file.display(),
        last.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}

fn default_log_file() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/log/kmsfs.log");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("kmsfs.log"),
        None => PathBuf::from(format!("/tmp/kmsfs-{}.log", nix::unistd::geteuid())),
    }
}

/// An exclusive lock on the backing directory, held while mounted: a second mount of the
/// same volume fails. Two mounts would each cache directory IDs and node numbers that the
/// other changes under them, and names sealed under a stale directory ID are lost. A mount
/// just unmounted may take a moment to exit and let go: it is given [`LOCK_PATIENCE`].
fn lock_volume(cipherdir: &Path) -> Result<Flock<File>, String> {
    let since = std::time::Instant::now();
    let mut dir = File::open(cipherdir).map_err(|e| format!("cannot open {}: {e}", cipherdir.display()))?;
    loop {
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, Errno::EWOULDBLOCK)) if since.elapsed() < LOCK_PATIENCE => {
                dir = back;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err((_, Errno::EWOULDBLOCK)) => return Err(preflight::already_mounted(cipherdir)),
            Err((_, e)) => return Err(format!("cannot lock {}: {e}", cipherdir.display())),
        }
    }
}

/// How long a mount waits for another one of the same volume to let go.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

fn mount_foreground(mount: &MountArgs, _daemon: bool) -> Result<(), String> {
    kmsfs_fs::snapshot::refuse_unimported(&mount.cipherdir).map_err(|e| format!("cannot mount: {e}"))?;
    preflight::fuse_available()?;
    preflight::mountpoint_free(&mount.mountpoint)?;
    let _only_mount = lock_volume(&mount.cipherdir)?;
    let agent = usable_agent(&mount.cipherdir, mount.socket.as_deref())?;
    let socket = agent.socket().to_path_buf();
    let volume = Arc::new(Volume::open(&mount.cipherdir, agent, OpenOptions::default())?);
    let fs = Arc::new(kmsfs_fs::fuse::KmsFs::new(volume.clone()).map_err(|e| e.to_string())?);
    let revoker = fs.revoker();
    let mut ring_wanted = true;

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(volume.root().display().to_string()),
        fuser::MountOption::Subtype("kmsfs".into()),
    ];
    if nix::unistd::geteuid().is_root() {
        // fuser gives the subtype to fusermount3 only; root mounts directly, and the kernel
        // takes it as a mount option, so the mount shows as fuse.kmsfs (not plain fuse).
        config.mount_options.push(fuser::MountOption::CUSTOM("subtype=kmsfs".into()));
    }
    for option in &mount.options {
        match option.as_str() {
            "" | "rw" | "defaults" => {}
            "allow_other" => config.acl = fuser::SessionACL::All,
            "allow_root" => config.acl = fuser::SessionACL::RootAndOwner,
            "ro" => config.mount_options.push(fuser::MountOption::RO),
            "nosuid" => config.mount_options.push(fuser::MountOption::NoSuid),
            "suid" => config.mount_options.push(fuser::MountOption::Suid),
            "nodev" => config.mount_options.push(fuser::MountOption::NoDev),
            "dev" => config.mount_options.push(fuser::MountOption::Dev),
            "noexec" => config.mount_options.push(fuser::MountOption::NoExec),
            "exec" => config.mount_options.push(fuser::MountOption::Exec),
            "noatime" => config.mount_options.push(fuser::MountOption::NoAtime),
            "atime" => config.mount_options.push(fuser::MountOption::Atime),
            "sync" => config.mount_options.push(fuser::MountOption::Sync),
            "async" => config.mount_options.push(fuser::MountOption::Async),
            "dirsync" => config.mount_options.push(fuser::MountOption::DirSync),
            // FUSE over io_uring, when the kernel offers it (the default), or /dev/fuse only.
            "uring" => ring_wanted = true,
            "nouring" => ring_wanted = false,
            // The kernel's access-time policies beyond atime/noatime are the backing
            // filesystem's business.
            "relatime" | "norelatime" | "strictatime" | "nostrictatime" | "lazytime" | "nolazytime" => {}
            "default_permissions" => {}
            // Options of mount(8) and fstab that concern no filesystem.
            "auto" | "noauto" | "user" | "nouser" | "nofail" | "_netdev" => {}
            other if other.starts_with("x-") => {}
            other => return Err(format!("unknown mount option {other}")),
        }
    }
    // When others may enter (allow_other), kmsfs acts for them with its own rights, so the
    // kernel must check theirs first (default_permissions). Otherwise only the mounting user
    // (and with allow_root, root) enters, and the backing file system checks every request
    // as kmsfs makes it, with that user's rights; root then gets no more than them. gocryptfs
    // does the same. The kernel then no longer re-reads a directory's attributes after each
    // change to it before the next access: a round trip less per file created.
    if matches!(config.acl, fuser::SessionACL::All) {
        config.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    config.n_threads = Some(mount.threads.max(1));
    config.clone_fd = true;

    // Ask for the ring only if this process can run one: once the kernel agreed, it holds
    // every request until the ring's queues are registered.
    if ring_wanted {
        if let Err(e) = kmsfs_fs::ring::uring::probe() {
            tracing::info!("FUSE over io_uring is not available to this process ({e}); using /dev/fuse");
            ring_wanted = false;
        }
    }
    fs.want_ring(ring_wanted);
    // Session::new mounts and completes FUSE_INIT before it returns.
    let session =
        fuser::Session::new(kmsfs_fs::fuse::DevFuse(fs.clone()), &mount.mountpoint, &config).map_err(|e| {
            let hint = if e.to_string().contains("user_allow_other") {
                "; for a user other than root, -o allow_other needs the line `user_allow_other` in /etc/fuse.conf (or \
             mount without allow_other: then only you enter the mount)"
            } else {
                ""
            };
            format!("cannot mount {}: {}{hint}", mount.mountpoint.display(), e.to_string().trim_end())
        })?;
    let ring = if fs.ring_negotiated() {
        let fd = std::os::fd::AsFd::as_fd(&session).try_clone_to_owned().map_err(|e| e.to_string())?;
        let cpus = kmsfs_fs::ring::uring::possible_cpus().map_err(|e| e.to_string())?.len().max(1);
        // `--threads` shared among the CPUs' queues, at least two each: one request waiting
        // on the disk or the agent does not hold up the next, and read-ahead (READs queued
        // together on the reader's CPU) is served in parallel.
        let ring_config = kmsfs_fs::ring::uring::RingConfig {
            threads_per_queue: (mount.threads / cpus).max(2),
            payload_size: kmsfs_fs::fuse::MAX_WRITE as usize + 4096,
        };
        // On failure the session is dropped, which unmounts.
        let ring = kmsfs_fs::ring::uring::start(fd, &ring_config, fs.clone())
            .map_err(|e| format!("cannot start FUSE over io_uring: {e}"))?;
        tracing::info!(queues = cpus, threads_per_queue = ring_config.threads_per_queue, "serving through io_uring");
        fs.count_ring(ring.served());
        Some(ring)
    } else {
        None
    };
    let session = session.spawn().map_err(|e| format!("cannot start the FUSE session: {e}"))?;
    revoker.set_notifier(session.notifier());
    if let Err(e) = kmsfs_fs::fuse::widen_readahead(&mount.mountpoint) {
        tracing::debug!("read-ahead stays at the kernel's default: {e}");
    }
    let revoke_all = revoker.clone();
    kmsfs_fs::keys::watch_key_events(socket, move |arn| revoker.revoke(arn), move || revoke_all.revoke_all());
    tracing::info!(cipherdir = %volume.root().display(), mountpoint = %mount.mountpoint.display(), "mounted");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    if std::env::var_os(READY_PIPE).is_some() {
        let mut out = std::io::stdout();
        let _ = out.write_all(READY.as_bytes());
        let _ = out.flush();
    }
    stop_on_signals(mount.mountpoint.clone());
    session.join().map_err(|e| format!("the FUSE session failed: {e}"))?;
    if let Some(ring) = ring {
        ring.join();
    }
    tracing::info!("unmounted");
    Ok(())
}

/// SIGTERM or SIGINT unmounts (lazily, so that busy mounts still go away); the session
/// then ends and the process exits.
fn stop_on_signals(mountpoint: PathBuf) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            tracing::info!("signal received: unmounting");
            let unmounted = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH).is_ok();
            if !unmounted {
                let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&mountpoint).status();
            }
        }
    });
}

fn status(mountpoint: &Path, table: bool) -> Result<(), String> {
    let status = xattr::get(mountpoint, STATUS_XATTR)
        .map_err(|e| format!("{} is not a kmsfs mount ({e})", mountpoint.display()))?
        .ok_or_else(|| format!("{} is not a kmsfs mount", mountpoint.display()))?;
    match serde_json::from_slice::<serde_json::Value>(&status) {
        Ok(document) if table => print!("{}", status_summary(mountpoint, &document)),
        _ => println!("{}", String::from_utf8_lossy(&status)),
    }
    Ok(())
}

/// The status document for people: one line per aspect, the counters of the data-key cache
/// and pool with their hit rates. Members it does not know are listed at the end as they are.
fn status_summary(mountpoint: &Path, status: &serde_json::Value) -> String {
    use serde_json::Value;
    let number = |v: &Value, name: &str| v.get(name).and_then(Value::as_u64).unwrap_or(0);
    let text =
        |name: &str| status.get(name).map_or_else(String::new, |v| v.as_str().map_or(v.to_string(), str::to_string));
    let rate = |v: &Value| {
        let (hits, misses) = (number(v, "Hits"), number(v, "Misses"));
        match hits + misses {
            0 => "no lookups yet".to_string(),
            all => format!("{hits} hits, {misses} misses ({:.0}% hits)", hits as f64 * 100.0 / all as f64),
        }
    };
    let transport = match text("Transport").as_str() {
        "io_uring" => format!("FUSE over io_uring ({} requests served)", number(status, "RingRequests")),
        other => other.to_string(),
    };
    let cache = status.get("DataKeyCache").cloned().unwrap_or_default();
    let pool = status.get("DataKeyPool").cloned().unwrap_or_default();
    let mut rows = vec![
        ("volume", text("Backing")),
        ("KMS key", text("KeyId")),
        ("transport", transport),
        ("open files", number(status, "OpenFiles").to_string()),
        ("known inodes", number(status, "KnownInodes").to_string()),
        (
            "data-key cache",
            format!(
                "{} of {} keys; {}; {} evicted, {} revoked",
                number(&cache, "Entries"),
                number(&cache, "Capacity"),
                rate(&cache),
                number(&cache, "Evictions"),
                number(&cache, "Revocations")
            ),
        ),
        (
            "new-file key pool",
            format!(
                "{} ready of {} wanted; {}; {} discarded",
                number(&pool, "Ready"),
                number(&pool, "Target"),
                rate(&pool),
                number(&pool, "Discarded")
            ),
        ),
    ];
    const SHOWN: [&str; 8] =
        ["Backing", "KeyId", "Transport", "RingRequests", "OpenFiles", "KnownInodes", "DataKeyCache", "DataKeyPool"];
    let others: Vec<(String, String)> = status
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| !SHOWN.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.as_str().map_or(value.to_string(), str::to_string)))
        .collect();
    rows.extend(others.iter().map(|(name, value)| (name.as_str(), value.clone())));
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut out = format!("kmsfs mount {}\n", mountpoint.display());
    for (name, value) in rows {
        out.push_str(&format!("  {name:<width$}  {value}\n"));
    }
    out
}

/// Whether `cipherdir` is a volume (not a snapshot still to import) whose key the agent at
/// `socket` can use: said before a long walk would fail on its first file.
fn volume_ready(cipherdir: &Path, socket: Option<&Path>) -> Result<(), String> {
    kmsfs_fs::snapshot::refuse_unimported(cipherdir)?;
    usable_agent(cipherdir, socket).map(drop)
}

fn fsck(cipherdir: &Path, socket: Option<&Path>) -> ExitCode {
    if let Err(e) = volume_ready(cipherdir, socket) {
        eprintln!("kmsfs fsck: {e}");
        return ExitCode::from(2);
    }
    match kmsfs_fs::fsck::run(cipherdir, socket) {
        Ok(report) if report.is_clean() => {
            println!("{}: clean ({} files, {} directories)", cipherdir.display(), report.files, report.dirs);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!(
                "{}: {} problem(s) in {} files, {} directories",
                cipherdir.display(),
                report.problems.len(),
                report.files,
                report.dirs
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("kmsfs fsck: {e}");
            ExitCode::from(2)
        }
    }
}

fn rewrap(cipherdir: &Path, to_key: Option<&str>, socket: Option<&Path>, threads: usize) -> ExitCode {
    if let Err(e) = volume_ready(cipherdir, socket) {
        eprintln!("kmsfs rewrap: {e}");
        return ExitCode::from(2);
    }
    let summary = match kmsfs_fs::rewrap::run(cipherdir, socket, to_key, threads) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("kmsfs rewrap: {e}");
            return ExitCode::from(2);
        }
    };
    let target = &summary.target;
    for (mountpoint, told) in &summary.mounts {
        match told {
            Ok(()) => println!("the mount at {} now makes new files under {}", mountpoint.display(), target.key_arn),
            Err(e) => println!(
                "warning: the mount at {} could not be told to follow the volume file ({e}): it makes new files \
                 under the old key until it is remounted; remount it, then run kmsfs rewrap again",
                mountpoint.display()
            ),
        }
    }
    let secs = summary.elapsed.as_secs_f64();
    println!(
        "{}: {} files under {} (material version {}): {} rewrapped, {} already were, {} failed, in {secs:.1} s \
         ({:.0} files/s){}",
        cipherdir.display(),
        summary.files,
        target.key_arn,
        target.material_version,
        summary.rewrapped,
        summary.skipped,
        summary.failed.len(),
        summary.files as f64 / secs.max(0.001),
        if summary.volume_file_rewritten { "; volume file rewritten" } else { "" }
    );
    if summary.failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    println!("not rewrapped (they keep their old wrapping):");
    for failure in &summary.failed {
        println!("  {failure}");
    }
    ExitCode::from(1)
}

fn snapshot(command: SnapshotCmd) -> ExitCode {
    match command {
        SnapshotCmd::Export { volume, dest, to_key, public_key, update, checkpoint_secs, socket, threads } => {
            let Some(checkpoint) = std::time::Duration::try_from_secs_f64(checkpoint_secs).ok() else {
                eprintln!(
                    "kmsfs snapshot export: --checkpoint-secs must be a number of seconds, not {checkpoint_secs}"
                );
                return ExitCode::from(2);
            };
            let args = kmsfs_fs::snapshot::ExportArgs {
                volume: &volume,
                dest: &dest,
                to_key: &to_key,
                public_key: public_key.as_deref(),
                socket: socket.as_deref(),
                threads,
                update,
                checkpoint,
            };
            snapshot_export(&args)
        }
        SnapshotCmd::Import { dest, key, socket, threads } => snapshot_import(&dest, &key, socket.as_deref(), threads),
    }
}

/// Prints up to 20 of `lines` under `title`.
fn print_list(title: &str, lines: &[String]) {
    println!("{title}:");
    for line in lines.iter().take(20) {
        println!("  {line}");
    }
    if lines.len() > 20 {
        println!("  … and {} more", lines.len() - 20);
    }
}

fn snapshot_export(args: &kmsfs_fs::snapshot::ExportArgs<'_>) -> ExitCode {
    if let Err(e) = volume_ready(args.volume, args.socket) {
        eprintln!("kmsfs snapshot export: {e}");
        return ExitCode::from(2);
    }
    let summary = match kmsfs_fs::snapshot::export(args) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("kmsfs snapshot export: {e}");
            return ExitCode::from(2);
        }
    };
    let secs = summary.elapsed.as_secs_f64().max(0.001);
    let m = &summary.manifest;
    let c = &m.counts;
    if summary.is_complete() {
        println!(
            "{} → {}: snapshot of volume {} for {} ({}): {} files ({:.1} MiB), {} directories, {} symlinks, {} hard \
             links, {} special files, in {secs:.1} s ({:.1} MiB/s, {:.0} files/s); {} copied ({:.1} MiB), {} kept \
             from an earlier run",
            args.volume.display(),
            args.dest.display(),
            m.volume_id.to_hex(),
            m.key_id,
            m.wrapping.algorithm(),
            c.files,
            c.bytes as f64 / 1048576.0,
            c.directories,
            c.symlinks,
            c.hard_links,
            c.special_files,
            c.bytes as f64 / 1048576.0 / secs,
            c.files as f64 / secs,
            summary.copied,
            summary.copied_bytes as f64 / 1048576.0,
            summary.kept
        );
        if summary.failed.is_empty() {
            return ExitCode::SUCCESS;
        }
        print_list("warning", &summary.failed);
        return ExitCode::from(1);
    }
    if !summary.failed.is_empty() {
        print_list("not copied", &summary.failed);
    }
    if !summary.changed.is_empty() {
        print_list("changed in the volume while it was being exported", &summary.changed);
    }
    println!(
        "{}: the snapshot is unfinished ({} copied, {} kept, {} failed, {} changed, in {secs:.1} s); it cannot be \
         imported as it is. Once nothing writes to the volume, run the same command again: it copies only what is \
         missing or changed",
        args.dest.display(),
        summary.copied,
        summary.kept,
        summary.failed.len(),
        summary.changed.len()
    );
    ExitCode::from(1)
}

fn snapshot_import(dest: &Path, key: &str, socket: Option<&Path>, threads: usize) -> ExitCode {
    let summary = match kmsfs_fs::snapshot::import(dest, key, socket, threads) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("kmsfs snapshot import: {e}");
            return ExitCode::from(2);
        }
    };
    let r = &summary.rewrap;
    let secs = r.elapsed.as_secs_f64().max(0.001);
    println!(
        "{}: {} files ({:.1} MiB) of volume {} now under {}: {} re-wrapped, {} already were, {} failed, in {secs:.1} s \
         ({:.0} files/s)",
        dest.display(),
        r.files,
        summary.manifest.counts.bytes as f64 / 1048576.0,
        summary.manifest.volume_id.to_hex(),
        r.target.key_arn,
        r.rewrapped,
        r.skipped,
        r.failed.len(),
        r.files as f64 / secs
    );
    if r.failed.is_empty() {
        println!("imported: mount it with kmsfs mount {} MOUNTPOINT", dest.display());
        return ExitCode::SUCCESS;
    }
    print_list(
        "not re-wrapped (run the import again to retry them; the snapshot does not mount until then)",
        &r.failed,
    );
    ExitCode::from(1)
}
