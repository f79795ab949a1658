//! `kmsd`: the key management agent daemon. See the crate documentation and README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kmsfs_agent::daemon::{self, DaemonConfig};

/// The kmsfs key management agent: AWS KMS's API on a Unix socket (and optionally TCP).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Socket to listen on (default /run/kmsd/kmsd.sock as root, else
    /// $XDG_RUNTIME_DIR/kmsd/kmsd.sock). Ignored when systemd passes a socket.
    #[arg(long, env = "KMSD_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory: database and root key (default /var/lib/kmsd as root, else
    /// $XDG_DATA_HOME/kmsd).
    #[arg(long, env = "KMSD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Configuration directory: identity policies in `policies/{users,groups,roles}/*.json`
    /// (default /etc/kmsd as root, else $XDG_CONFIG_HOME/kmsd). SIGHUP reloads them.
    #[arg(long, env = "KMSD_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// The 12-digit account ID in ARNs (default: derived from /etc/machine-id).
    #[arg(long, env = "KMSD_ACCOUNT_ID")]
    account_id: Option<String>,
    /// The region in ARNs.
    #[arg(long, env = "KMSD_REGION", default_value = "local")]
    region: String,
    /// The `file` root of trust's key file (default STATE_DIR/root.key, created 0600).
    #[arg(long)]
    root_key_file: Option<PathBuf>,
    /// Derive the `file` root key from the passphrase in this file (Argon2id) instead of
    /// keeping it in a key file.
    #[arg(long, conflicts_with = "root_key_file")]
    passphrase_file: Option<PathBuf>,
    /// Also serve AWS SDKs on this TCP address (e.g. 127.0.0.1:4566), accepting only
    /// requests signed (SigV4) with an access key from CONFIG_DIR/access-keys.json.
    /// Repeatable. Plain HTTP: loopback addresses only unless --allow-remote-tcp.
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Vec<std::net::SocketAddr>,
    /// Allow --listen-tcp on non-loopback addresses. There is no TLS: use only on a
    /// trusted or tunneled network.
    #[arg(long)]
    allow_remote_tcp: bool,
    /// The audit trail: `on` records every request (and refuses requests it cannot
    /// record); `off` serves requests without any record, for benchmarks and tests only.
    #[arg(long, value_enum, default_value = "on", value_name = "on|off")]
    audit: Switch,
    /// Where the audit trail's files go (default STATE_DIR/audit).
    #[arg(long, env = "KMSD_AUDIT_DIR")]
    audit_dir: Option<PathBuf>,
    /// Mirror each audit record to the systemd journal as structured fields: `auto` when
    /// run by systemd, `on` always (fails to start without a journal), `off` never.
    #[arg(long, value_enum, default_value = "auto", value_name = "auto|on|off")]
    audit_journald: Mirror,
    /// The journal's native socket.
    #[arg(long, hide = true, default_value = kmsfs_agent::audit::journal::JOURNAL_SOCKET)]
    journal_socket: PathBuf,
    /// For tests: shift the clock that key lifecycle dates are reckoned in (rotation,
    /// deletion windows, expiry of imported material and import tokens) by this much, e.g.
    /// `8d`, `-2h`, `400d`. Audit timestamps and SigV4 keep the real clock.
    #[arg(long, value_parser = parse_offset, default_value = "0", allow_hyphen_values = true, value_name = "DURATION")]
    clock_offset: i64,
}

/// A signed duration: an integer with a unit `s`, `m`, `h` or `d` (seconds if none), in ms.
fn parse_offset(text: &str) -> Result<i64, String> {
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let seconds = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("unknown unit '{unit}': use s, m, h or d (e.g. 8d)")),
    };
    let n: i64 = number.parse().map_err(|_| format!("'{text}' is not a duration such as 30s, 2h or 8d"))?;
    n.checked_mul(seconds * 1000).ok_or_else(|| format!("'{text}' is too large"))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mirror {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KMSD_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = DaemonConfig {
        socket: args.socket.unwrap_or_else(kmsfs_common::paths::default_socket),
        state_dir: args.state_dir.unwrap_or_else(kmsfs_common::paths::default_state_dir),
        account_id: args.account_id,
        region: args.region,
        root_key_file: args.root_key_file,
        passphrase_file: args.passphrase_file,
        config_dir: args.config_dir.unwrap_or_else(daemon::default_config_dir),
        listen_tcp: args.listen_tcp,
        allow_remote_tcp: args.allow_remote_tcp,
        audit: args.audit == Switch::On,
        audit_dir: args.audit_dir,
        audit_journald: match args.audit_journald {
            Mirror::Auto => None,
            Mirror::On => Some(true),
            Mirror::Off => Some(false),
        },
        journal_socket: args.journal_socket,
        clock_offset_ms: args.clock_offset,
    };
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmsd: {e}");
            ExitCode::FAILURE
        }
    }
}
