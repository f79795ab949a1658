//! A software TPM 2.0 per test: `swtpm` on free loopback TCP ports with its state in a
//! temporary directory, for kmsd's `tpm2` root of trust. [`Swtpm::restart`] is a reboot (same
//! TPM, PCRs back to zero); [`Swtpm::replace`] wipes its state, so that it is another TPM
//! (new seeds) at the same address. Stopped cleanly on drop.
//!
//! swtpm is required, never optional: without it the tests panic, naming the package
//! (`scripts/install-test-deps` installs swtpm, swtpm-tools and tpm2-tools).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const INSTALL: &str = "run scripts/install-test-deps (Debian packages swtpm swtpm-tools tpm2-tools)";

/// A running swtpm, stopped on drop.
pub struct Swtpm {
    dir: tempfile::TempDir,
    /// The command port; the control port is the next one, as the swtpm TCTI expects.
    port: u16,
    running: bool,
}

impl Swtpm {
    /// A fresh TPM (new seeds, PCRs zero) on free ports.
    pub fn start() -> Swtpm {
        let dir = tempfile::Builder::new().prefix("kmsfs-swtpm-").tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("state")).expect("swtpm state dir");
        let mut tpm = Swtpm { dir, port: 0, running: false };
        tpm.launch_anywhere();
        tpm
    }

    /// The TCTI for kmsd's `--tpm-tcti` (and tpm2-tools' `TPM2TOOLS_TCTI`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Where swtpm keeps its state (its seeds: copy it to clone the TPM).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Extends PCR `index` of the sha256 bank, as a changed boot component would.
    pub fn extend_pcr(&self, index: u8) {
        let out = Command::new("tpm2_pcrextend")
            .arg(format!("{index}:sha256={}", "5a".repeat(32)))
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap_or_else(|e| panic!("cannot run tpm2_pcrextend ({e}): {INSTALL}"));
        assert!(out.status.success(), "tpm2_pcrextend {index} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A reboot: stops swtpm and starts it again on the same state (so the same TPM), which
    /// resets the PCRs. The address stays the same unless another process took the port
    /// meanwhile; [`Swtpm::tcti`] is the current one.
    pub fn restart(&mut self) {
        self.stop();
        self.launch_again();
    }

    /// Another TPM in this one's place: stops swtpm, wipes its state (new seeds on start) and
    /// starts it again, on the same address if it can.
    pub fn replace(&mut self) {
        self.stop();
        let state = self.state_dir();
        std::fs::remove_dir_all(&state).expect("wipe swtpm state");
        std::fs::create_dir(&state).expect("swtpm state dir");
        self.launch_again();
    }

    /// Stops swtpm cleanly (its state is saved) and waits for it to exit.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let pid = self.pid();
        let _ = Command::new("swtpm_ioctl").arg("--tcp").arg(format!("127.0.0.1:{}", self.port + 1)).arg("-s").output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid.is_some_and(is_alive) {
            if Instant::now() > deadline {
                if let Some(pid) = pid {
                    let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("swtpm.pid")).ok()?.trim().parse().ok()
    }

    /// On the previous port if it is free again soon, else anywhere.
    fn launch_again(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.try_launch(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.launch_anywhere();
    }

    /// On a random free port pair; tests run in parallel, so a pair that looked free may be
    /// taken by the time swtpm binds it: then another.
    fn launch_anywhere(&mut self) {
        for _ in 0..200 {
            let random = RandomState::new().build_hasher().finish();
            let port = 20_000 + (random % 20_000) as u16 * 2;
            if self.try_launch(port) {
                return;
            }
        }
        panic!("swtpm found no free pair of TCP ports in 200 tries");
    }

    /// Starts swtpm on `port` and `port + 1`: false if either is taken. `--daemon` returns
    /// once swtpm listens, or fails if it cannot bind.
    fn try_launch(&mut self, port: u16) -> bool {
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !free(port) || !free(port + 1) {
            return false;
        }
        let out = Command::new("swtpm")
            .args(["socket", "--tpm2", "--daemon", "--flags", "not-need-init,startup-clear"])
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state_dir().display()))
            .arg("--pid")
            .arg(format!("file={}", self.dir.path().join("swtpm.pid").display()))
            .output()
            .unwrap_or_else(|e| panic!("cannot run swtpm ({e}): {INSTALL}"));
        if out.status.success() {
            self.port = port;
            self.running = true;
            return true;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("in use"), "swtpm failed to start: {stderr}");
        false
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process that exists and is not a zombie (swtpm daemonizes: its parent is not us).
fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}
