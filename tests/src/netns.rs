//! Two "hosts" for tests of agents that talk over a network: two network namespaces made
//! by the test, joined by a veth pair, torn down on drop.
//!
//! ```text
//!   namespace A                       namespace B
//!   lo (up)  kmsfs0 198.18.x.y+1/30 ── kmsfs0 198.18.x.y+2/30  lo (up)
//! ```
//!
//! Both ends of the veth live inside the new namespaces, so the link is a private wire:
//! nothing in the root namespace (where the test process runs) or in any other test's
//! namespaces can reach it, and the test process itself has no route to either address.
//! That is the point: a test talks to each agent over its Unix socket (a file, which
//! namespaces do not affect) and to the network only from inside a namespace, through
//! [`NetnsPair::command`] (`ip netns exec`), as a process on that host would.
//!
//! Addresses come from 198.18.0.0/15, which RFC 2544 reserves for testing networks: never a
//! real host's, so a check that the root namespace cannot reach an address can neither hit
//! a host on the test machine's LAN (as 10/8 might) nor the cloud metadata service (as
//! 169.254/16 might). Each pair's /30 is derived from the test's pid and a per-process
//! counter, so that parallel tests' addresses differ in practice; a coincidence would be
//! harmless anyway, as the pairs' wires are separate.
//!
//! Needs root and `ip` (iproute2), as the CI has; fails loudly without them.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The prefix of every namespace a pair creates: `kmsfs-test-<pid>-<n>-a` and `…-b`.
const PREFIX: &str = "kmsfs-test-";

/// The veth's name at both ends (names are per namespace, so both can be the same).
pub const VETH: &str = "kmsfs0";

/// 198.18.0.0/15, the RFC 2544 benchmarking range: 2^15 /30 subnets.
const RANGE_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const SUBNETS: u32 = 1 << 15;

/// Pairs made by this process so far: the second half of the namespaces' names.
static PAIRS: AtomicU32 = AtomicU32::new(0);

/// One end of a [`NetnsPair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    /// The other end.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Two network namespaces joined by a veth pair with a /30 between them; both namespaces
/// (and with them the veth, and any process still in them) are gone on drop, also when the
/// test panics.
pub struct NetnsPair {
    names: [String; 2],
    addrs: [Ipv4Addr; 2],
}

impl NetnsPair {
    /// Creates namespaces A and B, the veth between them with A's and B's addresses, and
    /// brings every link up (`lo` too). First removes namespaces left by test processes of
    /// this harness that have died.
    #[allow(clippy::new_without_default)] // creating namespaces is no default value
    pub fn new() -> NetnsPair {
        assert!(
            crate::is_root(),
            "the network namespace tests create namespaces with `ip netns add` and need root (CI runs as root)"
        );
        remove_stale_namespaces();
        let pid = std::process::id();
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let subnet = (pid % (SUBNETS / 8)) * 8 + n % 8;
        let base = RANGE_BASE + subnet * 4;
        // Constructed before anything exists, so that a failure below still cleans up.
        let pair = NetnsPair {
            names: [format!("{PREFIX}{pid}-{n}-a"), format!("{PREFIX}{pid}-{n}-b")],
            addrs: [Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2)],
        };
        let (a, b) = (pair.name(Side::A), pair.name(Side::B));
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        ip(&["-n", a, "link", "add", VETH, "type", "veth", "peer", "name", VETH, "netns", b]);
        for side in [Side::A, Side::B] {
            let ns = pair.name(side);
            ip(&["-n", ns, "addr", "add", &format!("{}/30", pair.ip(side)), "dev", VETH]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", VETH, "up"]);
        }
        pair
    }

    /// The namespace's name, for `ip netns exec` and [`crate::TestAgent::start_in_netns`].
    pub fn name(&self, side: Side) -> &str {
        &self.names[side.index()]
    }

    /// The side's address on the veth.
    pub fn ip(&self, side: Side) -> IpAddr {
        IpAddr::V4(self.addrs[side.index()])
    }

    /// `program` run inside the side's namespace (`ip netns exec NAME program`, which execs
    /// it: the child's pid is the program's). Add its arguments as usual.
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(side)]).arg(program);
        cmd
    }

    /// Whether a TCP connection to `addr` from inside `from`'s namespace is accepted within
    /// a second (bash's `/dev/tcp`, run there).
    pub fn can_connect(&self, from: Side, addr: SocketAddr) -> bool {
        self.command(from, "timeout")
            .args(["1", "bash", "-c", &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run `ip netns exec … timeout bash` ({e})"))
            .success()
    }

    /// Waits (up to 20 s) until a TCP connection to `addr` from inside `from`'s namespace
    /// is accepted, e.g. for an agent's `--listen-tcp` on the other side.
    pub fn wait_tcp(&self, from: Side, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.can_connect(from, addr) {
            assert!(Instant::now() < deadline, "{addr} does not accept TCP connections from {}", self.name(from));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            // A namespace lives on while a process is in it: end what the test left there.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).stderr(Stdio::null()).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "delete", name]).stderr(Stdio::null()).status();
        }
    }
}

/// Runs `ip ARGS`, failing the test with ip's own message if it fails.
fn ip(args: &[&str]) {
    let out = match Command::new("ip").args(args).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`ip` (iproute2) is not installed; the network namespace tests need it: run scripts/install-test-deps"
        ),
        Err(e) => panic!("cannot run `ip {}`: {e}", args.join(" ")),
    };
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Deletes this harness's namespaces whose test process is gone (a test killed before its
/// pairs were dropped). Once per process; a pid since reused only delays the clean-up.
fn remove_stale_namespaces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).stderr(Stdio::null()).output() else { return };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
            if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
                let _ = Command::new("ip").args(["netns", "delete", name]).stderr(Stdio::null()).status();
            }
        }
    });
}
