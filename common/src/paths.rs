//! Where the agent lives by default. Root runs the system agent (`/run/kmsd/kmsd.sock`,
//! state in `/var/lib/kmsd`); other users get a per-user agent under their XDG runtime and
//! data directories, as gpg-agent does.

use std::path::PathBuf;

/// The system agent's socket.
pub const SYSTEM_SOCKET: &str = "/run/kmsd/kmsd.sock";
/// The system agent's state directory.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/kmsd";

/// The system agent's socket: [`SYSTEM_SOCKET`], unless `KMSD_SYSTEM_SOCKET` relocates it
/// (for packagers, and for tests that must not meet a system agent).
pub fn system_socket() -> PathBuf {
    std::env::var_os("KMSD_SYSTEM_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_SOCKET))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The default socket for an agent run by the current user.
pub fn default_socket() -> PathBuf {
    if is_root() {
        return system_socket();
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("kmsd/kmsd.sock"),
        None => PathBuf::from(format!("/tmp/kmsd-{}/kmsd.sock", nix::unistd::geteuid())),
    }
}

/// The default state directory for an agent run by the current user.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from(SYSTEM_STATE_DIR);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("kmsd");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/kmsd"),
        None => PathBuf::from(format!("/tmp/kmsd-{}/state", nix::unistd::geteuid())),
    }
}
