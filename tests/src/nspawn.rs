//! Booted systemd containers for the tests that need a real init: kmsd socket-activated by
//! systemd, volumes mounted at boot, services with their own identities, reboots.
//!
//! Design:
//! - **Root filesystem.** `scripts/build-rootfs` builds a minimal Debian 12 tree once, with
//!   debootstrap, into a cache outside the repository (`KMSFS_ROOTFS`, default
//!   `/var/cache/kmsfs/rootfs-bookworm`); [`Container::new`] runs it first, which returns at
//!   once when the cache is current. Each container is an overlayfs on the host: the cached
//!   tree as its read-only lower layer, a per-test upper directory for every change. The
//!   upper layer outlives the container's boots, so a reboot keeps what the test and the
//!   container wrote, as a disk would; dropping the container removes it. While a container
//!   exists it holds the cache's lock shared (through `flock(1)`), so that a rebuild waits
//!   for it. The test writes into the tree (units, configuration, fstab) before the first
//!   boot, or between boots, through [`Container::write`].
//! - **What is installed.** The freshly built `kmsd`, `kmsctl` and `kmsfs` (from
//!   [`crate::bin_dir`]) are bound read-only onto `/usr/local/bin`, where the units expect
//!   them; the repository's `systemd/` units are copied into `/etc/systemd/system` (drop-ins
//!   are the test's choice). Each container gets its own random `/etc/machine-id`, kept
//!   across reboots, since kmsd derives the account in its ARNs from it.
//! - **Booting.** `systemd-nspawn -b` with `--register=no --keep-unit` (the host's PID 1 need
//!   not be systemd: nothing is asked of machined or of a host manager), in a cgroup of its
//!   own below the test's (nspawn makes its `supervisor` and `payload` cgroups where it runs,
//!   and containers started side by side must not share them), a private network
//!   (loopback only), `/dev/fuse` bound in, and `CAP_IPC_LOCK` and `CAP_SYS_RESOURCE` added to
//!   nspawn's default set as a real host's PID 1 has them (without `CAP_IPC_LOCK`, nspawn's
//!   seccomp filter refuses mlock, which kmsd uses). Not registering also means no device
//!   cgroup for the container, so `/dev/fuse` needs no `DeviceAllow=`. nspawn gets a
//!   `NOTIFY_SOCKET` of ours and `--notify-ready=yes`: it reports the container's leader pid
//!   (`X_NSPAWN_LEADER_PID`), then `READY=1` once the container's systemd has finished
//!   starting up; `systemctl is-system-running --wait` then gives the state it reached.
//! - **Running commands.** `nsenter` into every namespace of the leader (mount, pid, uts,
//!   ipc, net, cgroup), with a clean environment, runs `sh -c SCRIPT` as root in the
//!   container: `systemctl`, `journalctl`, `kmsctl`, `systemd-run` to run something as a
//!   unit. Such a process is no unit of the container's systemd: to kmsd it is `user/root`
//!   with no `role/`.
//! - **Rebooting.** `systemctl reboot` inside; nspawn exits with status 133 (its "reboot"
//!   code) and is started again on the same tree.
//! - **Teardown**, on drop and so on a panic too: SIGTERM to nspawn (an orderly poweroff of
//!   the container), SIGKILL to the leader and nspawn if that takes over 30 s, then the
//!   overlay is unmounted and its directory removed.
//!
//! With `KMSFS_NSPAWN_KEEP` set, a test that fails leaves its container running and says
//! how to enter it.
//!
//! Where the machine cannot run nspawn at all (not root, or nspawn cannot make a
//! container: no namespaces in an unprivileged container, say), [`Container::new`] says so
//! loudly on stderr and returns `None`; `scripts/build-rootfs`, which the README's test
//! command runs first, prints the same warning where it is seen. Anything else missing —
//! systemd-nspawn, debootstrap, `/dev/fuse`, the Debian mirror — fails the test.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a boot may take before the test fails (a boot here takes seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one command in the container may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an orderly poweroff may take before the container is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);
/// nspawn's exit status when the container rebooted.
const REBOOT_STATUS: i32 = 133;
/// `PATH` of commands run in the container.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The repository's units that every container gets in `/etc/systemd/system`.
const UNITS: [&str; 3] = ["kmsd.socket", "kmsd.service", "kmsfs@.service"];

/// The cached root filesystem's directory.
pub fn rootfs() -> PathBuf {
    std::env::var_os("KMSFS_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kmsfs/rootfs-bookworm"))
}

/// A file of the repository's `systemd/` directory (units and drop-ins).
pub fn unit_source(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(name)
}

/// What a command run in the container did.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// A booted (or bootable) systemd container on its own overlay of the cached root filesystem.
pub struct Container {
    name: String,
    dir: Option<tempfile::TempDir>,
    nspawn: Option<Child>,
    leader: Option<u32>,
    notify: UnixDatagram,
    /// `flock -s` on the cache's lock, held while the overlay uses the cache.
    cache_lock: Option<(Child, ChildStdin)>,
    overlay_mounted: bool,
    /// This container's own cgroups (see [`cgroup_dirs`]), made at each boot.
    cgroups: Vec<PathBuf>,
}

impl Container {
    /// A container ready for its first [`Container::boot`]: the root filesystem built (or
    /// found current), an overlay on it with the workspace's binaries and units installed
    /// and `kmsd.socket` not yet enabled. `None`, after a loud message, where this machine
    /// cannot run systemd-nspawn.
    pub fn new() -> Option<Container> {
        if let Some(reason) = cannot_run_nspawn() {
            eprintln!(
                "\n{}\nSKIPPED: this machine cannot run systemd-nspawn containers: {reason}\n\
                 The booted-systemd tests (tests/tests/booted.rs) did not run.\n{}\n",
                "=".repeat(100),
                "=".repeat(100)
            );
            return None;
        }
        assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: the booted tests mount kmsfs volumes");
        let dir = tempfile::Builder::new().prefix("kmsfs-nspawn-").tempdir().expect("tempdir");
        let name = format!("kmsfs-{}", &hex(&random_bytes(4)));
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(sub)).expect("overlay directory");
        }
        let notify = UnixDatagram::bind(dir.path().join("notify")).expect("bind the notify socket");
        let mut container = Container {
            name,
            dir: Some(dir),
            nspawn: None,
            leader: None,
            notify,
            cache_lock: None,
            overlay_mounted: false,
            cgroups: Vec::new(),
        };
        container.lock_cache();
        container.mount_overlay();
        container.install();
        Some(container)
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("container directory").path()
    }

    /// The container's root directory as the host sees it (the overlay).
    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// The host path of `path` (absolute, in the container).
    pub fn path(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// The container's hostname (and nspawn machine name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes a file into the container's tree (parents created), mode 0644.
    pub fn write(&self, path: &str, contents: &str) {
        self.write_mode(path, contents, 0o644);
    }

    /// Writes a file into the container's tree (parents created) with `mode`.
    pub fn write_mode(&self, path: &str, contents: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let host = self.path(path);
        std::fs::create_dir_all(host.parent().expect("parent")).expect("create parent directories");
        std::fs::write(&host, contents).unwrap_or_else(|e| panic!("write {}: {e}", host.display()));
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Runs `systemctl --root=ROOT ARGS` on the host: enables or masks units offline, as an
    /// image builder does, before a boot.
    pub fn systemctl_offline(&self, args: &[&str]) {
        let out = Command::new("systemctl")
            .arg(format!("--root={}", self.root().display()))
            .args(args)
            .output()
            .expect("run systemctl --root");
        assert!(out.status.success(), "systemctl --root {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Runs a host command with the container's tree as `--root` (e.g. `useradd`).
    pub fn host_with_root(&self, program: &str, args: &[&str]) {
        let out = Command::new(program).arg("--root").arg(self.root()).args(args).output().expect("run host command");
        assert!(
            out.status.success(),
            "{program} --root {} {args:?}: {}",
            self.root().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Boots the container and waits until its systemd has finished starting up; returns
    /// the state it reached (`running`, or `degraded` if a unit failed).
    pub fn boot(&mut self) -> String {
        assert!(self.nspawn.is_none(), "the container is already running");
        // What a previous boot said is no news of this one.
        self.notify.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 4096];
        while self.notify.recv(&mut buf).is_ok() {}
        self.notify.set_nonblocking(false).expect("blocking");

        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("console.log"))
            .expect("console log");
        // nspawn runs in a cgroup of its own, where it makes `supervisor` (for itself) and
        // `payload` (the container's tree): two containers in one cgroup would share those.
        self.cgroups = cgroup_dirs(&self.name);
        let mut cmd = nspawn_in(&self.cgroups);
        cmd.arg("--directory")
            .arg(self.root())
            .arg("--machine")
            .arg(&self.name)
            .args(["--boot", "--register=no", "--keep-unit", "--private-network", "--link-journal=no"])
            .args(["--console=read-only", "--notify-ready=yes", "--resolv-conf=off", "--timezone=off"])
            .arg("--capability=CAP_IPC_LOCK,CAP_SYS_RESOURCE")
            .arg("--bind=/dev/fuse");
        for name in ["kmsd", "kmsctl", "kmsfs"] {
            cmd.arg(format!("--bind-ro={}:/usr/local/bin/{name}", crate::bin(name).display()));
        }
        let child = cmd
            .env("NOTIFY_SOCKET", self.dir().join("notify"))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("console log"))
            .stderr(console)
            .spawn()
            .expect("start systemd-nspawn");
        self.nspawn = Some(child);
        self.leader = None;

        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut ready = false;
        while !ready {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("the container did not boot within {BOOT_TIMEOUT:?}; console:\n{}", self.console_tail());
            }
            if let Some(status) = self.nspawn.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.nspawn = None;
                self.remove_cgroups();
                panic!("systemd-nspawn exited during boot ({status}); console:\n{}", self.console_tail());
            }
            self.notify.set_read_timeout(Some(left.min(Duration::from_millis(500)))).expect("timeout");
            let Ok(n) = self.notify.recv(&mut buf) else { continue };
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if let Some(pid) = line.strip_prefix("X_NSPAWN_LEADER_PID=") {
                    self.leader = pid.trim().parse().ok();
                }
                ready |= line == "READY=1";
            }
        }
        assert!(self.leader.is_some(), "systemd-nspawn did not report the container's leader pid");
        let state = self.sh("systemctl is-system-running --wait");
        state.stdout.trim().to_string()
    }

    /// Reboots the container from inside (`systemctl reboot`) and boots it again on the
    /// same tree; returns the state the new boot reached.
    pub fn reboot(&mut self) -> String {
        let _ = self.sh("systemctl reboot");
        let status = self.wait_for_nspawn(BOOT_TIMEOUT);
        match status {
            Some(status) if status.code() == Some(REBOOT_STATUS) => {}
            other => panic!("the container did not reboot (nspawn: {other:?}); console:\n{}", self.console_tail()),
        }
        self.boot()
    }

    /// Powers the container off (`systemctl poweroff`) and waits for nspawn to exit.
    pub fn poweroff(&mut self) {
        let _ = self.sh("systemctl poweroff");
        match self.wait_for_nspawn(POWEROFF_TIMEOUT) {
            Some(status) if status.success() => {}
            other => panic!("the container did not power off (nspawn: {other:?}); console:\n{}", self.console_tail()),
        }
    }

    /// Waits for nspawn to exit; its status, or `None` if it still runs after `timeout`.
    fn wait_for_nspawn(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.nspawn.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.nspawn = None;
                self.leader = None;
                self.remove_cgroups();
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `sh -c script` as root in the running container.
    pub fn sh(&self, script: &str) -> Output {
        let leader = self.leader.expect("the container is not running");
        let mut child = Command::new("nsenter")
            .arg(format!("--target={leader}"))
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd"])
            .args(["/usr/bin/env", "-i", &format!("PATH={CONTAINER_PATH}"), "LANG=C.UTF-8", "TERM=dumb"])
            .args(["SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "HOME=/root", "/bin/sh", "-c", script])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nsenter");
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let out_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for nsenter") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{script}` did not finish within {COMMAND_TIMEOUT:?} in the container");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
        Output { status, stdout, stderr }
    }

    /// Runs `sh -c script` in the container; it must succeed. Returns its stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.success(),
            "`{script}` failed in the container ({}):\nstdout: {}\nstderr: {}",
            out.status,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// `systemctl is-active UNIT` in the container: `active`, `inactive`, `failed`, ...
    pub fn is_active(&self, unit: &str) -> String {
        self.sh(&format!("systemctl is-active '{unit}'")).stdout.trim().to_string()
    }

    /// What `unit` logged in this boot (messages only, systemd's about it included).
    pub fn journal(&self, unit: &str) -> String {
        self.sh(&format!("journalctl --no-pager -q -b -o cat -u '{unit}'")).stdout
    }

    /// The last lines the container wrote to its console, for failure messages.
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir().join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn lock_cache(&mut self) {
        let lock = format!("{}.lock", rootfs().display());
        let mut child = Command::new("flock")
            .args(["--shared", &lock, "-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run flock");
        let stdin = child.stdin.take().expect("stdin");
        let mut line = [0u8; 7];
        let locked = child.stdout.take().expect("stdout").read_exact(&mut line).is_ok() && &line == b"locked\n";
        assert!(locked, "could not take the shared lock {lock}");
        self.cache_lock = Some((child, stdin));
    }

    fn mount_overlay(&mut self) {
        let dir = self.dir();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs().display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(dir.join("root"))
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount overlay: {}", String::from_utf8_lossy(&out.stderr));
        self.overlay_mounted = true;
    }

    fn install(&self) {
        self.write("/etc/machine-id", &format!("{}\n", hex(&random_bytes(16))));
        for unit in UNITS {
            let text = std::fs::read_to_string(unit_source(unit)).expect("read a unit of systemd/");
            self.write(&format!("/etc/systemd/system/{unit}"), &text);
        }
        // The mount points of the bound binaries.
        for name in ["kmsd", "kmsctl", "kmsfs"] {
            self.write_mode(&format!("/usr/local/bin/{name}"), "", 0o755);
        }
    }

    fn kill(&mut self) {
        if let Some(leader) = self.leader {
            let _ = Command::new("kill").arg("-KILL").arg(leader.to_string()).status();
        }
        if let Some(child) = self.nspawn.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.nspawn = None;
        self.leader = None;
        self.remove_cgroups();
    }

    fn remove_cgroups(&mut self) {
        remove_cgroups(&std::mem::take(&mut self.cgroups));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("KMSFS_NSPAWN_KEEP").is_some() {
            // Debugging a failure: leave the container to be looked into, and say how.
            eprintln!(
                "KMSFS_NSPAWN_KEEP: container {} left running: nsenter --target={} --all --root --wd; \
                 tree {}; stop it with kill {}",
                self.name,
                self.leader.unwrap_or(0),
                self.root().display(),
                self.nspawn.as_ref().map_or(0, Child::id)
            );
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
            return;
        }
        if let Some(child) = &self.nspawn {
            // nspawn turns SIGTERM into an orderly poweroff of the container.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            if self.wait_for_nspawn(POWEROFF_TIMEOUT).is_none() {
                eprintln!("container {}: no poweroff within {POWEROFF_TIMEOUT:?}; killing it", self.name);
                self.kill();
            }
        }
        if self.overlay_mounted {
            let root = self.root();
            let mut unmounted = false;
            for _ in 0..50 {
                if Command::new("umount").arg(&root).status().is_ok_and(|s| s.success()) {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !unmounted {
                let _ = Command::new("umount").arg("-l").arg(&root).status();
            }
        }
        if let Some((mut child, stdin)) = self.cache_lock.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// A new cgroup for the container `name` below the test's own, in each hierarchy systemd
/// uses: the unified one (`0::`, cgroup2) and, on a hybrid host, the named v1 hierarchy
/// `name=systemd`. Found through /proc/self/cgroup and the mount table.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // (mount point, whether it is cgroup2) of the hierarchies systemd uses.
    let mut hierarchies = Vec::new();
    for line in mounts.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mountpoint = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let (fstype, options) = (right.next().unwrap_or_default(), right.nth(1).unwrap_or_default());
        if fstype == "cgroup2" {
            hierarchies.push((PathBuf::from(mountpoint), true));
        } else if fstype == "cgroup" && options.split(',').any(|o| o == "name=systemd") {
            hierarchies.push((PathBuf::from(mountpoint), false));
        }
    }
    let mut dirs = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next().unwrap_or_default(), fields.next().unwrap_or("/"));
        let unified = controllers.is_empty();
        if !unified && controllers != "name=systemd" {
            continue;
        }
        if let Some((mountpoint, _)) = hierarchies.iter().find(|(_, v2)| *v2 == unified) {
            dirs.push(mountpoint.join(path.trim_start_matches('/')).join(format!("kmsfs-nspawn-{name}")));
        }
    }
    dirs
}

/// `systemd-nspawn`, moved into the cgroups `dirs` (made here) before it starts: a shell
/// that joins them and then execs nspawn, so that the child's pid is nspawn's.
fn nspawn_in(dirs: &[PathBuf]) -> Command {
    for dir in dirs {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
    }
    let joined = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(
            "IFS=:; for d in $KMSFS_CGROUPS; do echo $$ > \"$d/cgroup.procs\" || exit 125; done; \
             unset KMSFS_CGROUPS; exec systemd-nspawn \"$@\"",
        )
        .arg("systemd-nspawn")
        .env("KMSFS_CGROUPS", joined);
    cmd
}

/// Removes cgroups made by [`nspawn_in`], deepest first (a cgroup goes only once empty, and
/// a container's last processes may take a moment to be reaped).
fn remove_cgroups(tops: &[PathBuf]) {
    for top in tops {
        let mut dirs = Vec::new();
        let mut todo = vec![top.clone()];
        while let Some(dir) = todo.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                todo.extend(entries.filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Why this machine cannot run nspawn containers at all, if it cannot.
fn cannot_run_nspawn() -> Option<String> {
    if !crate::is_root() {
        return Some("not running as root (systemd-nspawn needs root; CI runs as root)".into());
    }
    let installed = Command::new("systemd-nspawn").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(installed, "systemd-nspawn is missing: install systemd-container (scripts/install-test-deps does)");
    // The probe runs /bin/true in the cached tree, read-only.
    build_rootfs();
    let cgroups = cgroup_dirs(&format!("probe-{}", std::process::id()));
    let out = nspawn_in(&cgroups)
        .arg("--quiet")
        .arg("--directory")
        .arg(rootfs())
        .args(["--read-only", "--register=no", "--keep-unit", "--private-network", "/bin/true"])
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-nspawn");
    remove_cgroups(&cgroups);
    if out.status.success() {
        None
    } else {
        Some(format!(
            "`systemd-nspawn --register=no --keep-unit /bin/true` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `scripts/build-rootfs` (quick when the cache is current); fails the test if it fails.
fn build_rootfs() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-rootfs");
    let out = Command::new("bash").arg(&script).output().expect("run scripts/build-rootfs");
    assert!(
        out.status.success(),
        "scripts/build-rootfs failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("read /dev/urandom");
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
