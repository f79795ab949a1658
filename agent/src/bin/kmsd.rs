//! `kmsd`: the key management agent daemon. See the crate documentation and README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use kmsfs_agent::daemon::{self, DaemonConfig};
use kmsfs_agent::rot::setup::{Backend, RootOptions};
use kmsfs_agent::tls::TlsFiles;

/// The kmsfs key management agent: AWS KMS's API on a Unix socket (and optionally TCP,
/// with TLS).
/// Without a subcommand, runs the agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Subcommand>,
    #[command(flatten)]
    root: RootArgs,
    /// Socket to listen on (default /run/kmsd/kmsd.sock as root, else
    /// $XDG_RUNTIME_DIR/kmsd/kmsd.sock). Ignored when systemd passes a socket.
    #[arg(long, env = "KMSD_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory: database and root key (default /var/lib/kmsd as root, else
    /// $XDG_DATA_HOME/kmsd).
    #[arg(long, env = "KMSD_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Configuration directory: identity policies in `policies/{users,groups,roles}/*.json`
    /// (default /etc/kmsd as root, else $XDG_CONFIG_HOME/kmsd). SIGHUP reloads them.
    #[arg(long, env = "KMSD_CONFIG_DIR", global = true)]
    config_dir: Option<PathBuf>,
    /// The 12-digit account ID in ARNs (default: derived from /etc/machine-id).
    #[arg(long, env = "KMSD_ACCOUNT_ID")]
    account_id: Option<String>,
    /// The region in ARNs.
    #[arg(long, env = "KMSD_REGION", default_value = "local")]
    region: String,
    /// Also serve AWS SDKs on this TCP address (e.g. 127.0.0.1:4566), accepting only
    /// requests signed (SigV4) with an access key from CONFIG_DIR/access-keys.json.
    /// Repeatable. With --tls-cert and --tls-key every TCP listener speaks TLS (HTTPS) and
    /// may be on any address; without them it is plain HTTP, on loopback addresses only
    /// unless --allow-remote-tcp.
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Vec<std::net::SocketAddr>,
    /// Allow --listen-tcp on non-loopback addresses without TLS: requests and replies
    /// (plaintexts and data keys included) then cross the network in clear, which kmsd
    /// warns of at start. Use only on a trusted or tunneled network; prefer --tls-cert.
    #[arg(long)]
    allow_remote_tcp: bool,
    /// TLS on the TCP listeners: the server's certificate chain (PEM, end-entity first).
    /// Needs --tls-key. SIGHUP reloads it (a renewal needs no restart).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS on the TCP listeners: the certificate's private key (PEM; the file must not be
    /// accessible to group or others). Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: every TCP client must present a certificate that chains to a CA in this
    /// PEM file; its identity (first DNS subjectAltName, else CN) is then the principal
    /// arn:aws:iam::<account>:role/tls/<identity> of its requests, beside the access key's.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
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

#[derive(clap::Subcommand)]
enum Subcommand {
    /// Creates a state directory for the root of trust chosen: `file` (a root key in a 0600
    /// file, or derived from a passphrase), `tpm2` (the root key sealed by a TPM 2.0,
    /// optionally bound to PCRs; a recovery passphrase reseals it), or `pkcs11` (every key's
    /// material generated and used inside a PKCS#11 token). A directory never initialized is
    /// `file`, created on first start.
    Init {
        #[arg(long, value_enum)]
        root_of_trust: Backend,
    },
    /// Seals the root key again, kmsd stopped: after a legitimate change of a bound PCR
    /// (firmware, bootloader), onto a new TPM, with other --tpm-pcrs; or, with
    /// `--root-of-trust tpm2`, moves a `file` directory into the TPM (and removes root.key).
    /// The root key does not change: no KMS key or ciphertext is touched.
    Reseal {
        /// The backend to move to (only `tpm2`, from `file`).
        #[arg(long, value_enum)]
        root_of_trust: Option<Backend>,
    },
}

/// How the root key is kept (see `kmsd init --help`).
#[derive(clap::Args)]
struct RootArgs {
    /// `file`: the root key file (default STATE_DIR/root.key, created 0600).
    #[arg(long, global = true)]
    root_key_file: Option<PathBuf>,
    /// `file`: derive the root key from the passphrase in this file (Argon2id) instead of
    /// keeping it in a key file.
    #[arg(long, global = true, conflicts_with = "root_key_file")]
    passphrase_file: Option<PathBuf>,
    /// `tpm2`: the TPM's TCTI (init default device:/dev/tpmrm0; at start, overrides the
    /// one recorded at init), e.g. `swtpm:host=127.0.0.1,port=2321`.
    #[arg(long, global = true, value_name = "TCTI")]
    tpm_tcti: Option<String>,
    /// `tpm2` (init, reseal): bind the root key to these sha256 PCRs, e.g. `7` or `0,2,7`
    /// (`none`: no PCR binding).
    #[arg(long, global = true, value_name = "LIST", value_parser = parse_pcrs)]
    tpm_pcrs: Option<PcrList>,
    /// `tpm2`: a file holding an authorization value the root key is sealed with (at
    /// start, default: the systemd credential `kmsd-tpm-auth`, else the file given at init).
    #[arg(long, global = true, value_name = "FILE")]
    tpm_auth_file: Option<PathBuf>,
    /// `tpm2` (init, reseal): the file holding the recovery passphrase, which reseals the
    /// root key when the TPM refuses it (at least 12 characters; keep a copy offline).
    #[arg(long, global = true, value_name = "FILE")]
    recovery_passphrase_file: Option<PathBuf>,
    /// `pkcs11` (init; at start overrides the recorded one): the token's PKCS#11 module.
    #[arg(long, global = true, value_name = "PATH")]
    pkcs11_module: Option<PathBuf>,
    /// `pkcs11` (init): the label of the token that holds the keys.
    #[arg(long, global = true, value_name = "LABEL")]
    pkcs11_token_label: Option<String>,
    /// `pkcs11`: a file holding the token's user PIN (at start, default: the systemd
    /// credential `kmsd-pkcs11-pin`, else the file given at init). Never an argument.
    #[arg(long, global = true, value_name = "FILE")]
    pkcs11_pin_file: Option<PathBuf>,
}

impl RootArgs {
    fn options(self) -> RootOptions {
        RootOptions {
            root_key_file: self.root_key_file,
            passphrase_file: self.passphrase_file,
            tpm_tcti: self.tpm_tcti,
            tpm_pcrs: self.tpm_pcrs,
            tpm_auth_file: self.tpm_auth_file,
            recovery_passphrase_file: self.recovery_passphrase_file,
            pkcs11_module: self.pkcs11_module,
            pkcs11_token_label: self.pkcs11_token_label,
            pkcs11_pin_file: self.pkcs11_pin_file,
        }
    }
}

/// PCR indices, one value of `--tpm-pcrs` (a list: clap would take `Vec<u8>` as repeats).
type PcrList = Vec<u8>;

/// `7` or `0,2,7`: sha256 PCR indices; `none` for no PCR binding.
#[cfg(feature = "tpm2")]
fn parse_pcrs(text: &str) -> Result<PcrList, String> {
    kmsfs_agent::rot::tpm2::parse_pcrs(text)
}

#[cfg(not(feature = "tpm2"))]
fn parse_pcrs(_: &str) -> Result<PcrList, String> {
    Err("this kmsd was built without the tpm2 backend (cargo feature `tpm2`)".into())
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

/// A secret file given in systemd's credentials directory (`--passphrase-file
/// %d/kmsd-passphrase` in a unit) is a credential: when it is not there, systemd did not pass
/// it (no such credential in its credential stores), and that is what the operator has to fix,
/// not a missing file.
fn check_credentials(root: &RootOptions) -> Result<(), String> {
    let flags = [
        ("--passphrase-file", &root.passphrase_file),
        ("--pkcs11-pin-file", &root.pkcs11_pin_file),
        ("--tpm-auth-file", &root.tpm_auth_file),
    ];
    for (flag, path) in flags {
        let Some(path) = path else { continue };
        let Some(name) = credential_name(path) else { continue };
        if !path.exists() {
            return Err(format!(
                "the systemd credential {name} ({flag} {}) was not passed to kmsd: create it with `systemd-creds \
                 encrypt --name={name} FILE /etc/credstore.encrypted/{name}` (LoadCredentialEncrypted={name}), or \
                 put it in /etc/credstore/{name} (LoadCredential={name})",
                path.display()
            ));
        }
    }
    Ok(())
}

/// The credential's name if `path` is in systemd's credentials directory: the service's
/// `$CREDENTIALS_DIRECTORY`, or `/run/credentials/<unit>/` (where `%d` points even when
/// systemd passed no credential at all, and so set no variable).
fn credential_name(path: &std::path::Path) -> Option<String> {
    let dir = path.parent()?;
    let in_credentials = std::env::var_os("CREDENTIALS_DIRECTORY").is_some_and(|d| std::path::Path::new(&d) == dir)
        || dir.parent() == Some(std::path::Path::new("/run/credentials"));
    in_credentials.then(|| path.file_name()?.to_str().map(str::to_string)).flatten()
}

fn main() -> ExitCode {
    if let Some(code) = kmsfs_common::generate::run_if_asked("kmsd", Args::command, "8") {
        return code;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KMSD_LOG").unwrap_or_else(|_| "info,tss_esapi=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let state_dir = args.state_dir.unwrap_or_else(kmsfs_common::paths::default_state_dir);
    let root = args.root.options();
    if let Err(e) = check_credentials(&root) {
        eprintln!("kmsd: {e}");
        return ExitCode::FAILURE;
    }
    let done = match args.command {
        Some(Subcommand::Init { root_of_trust }) => Some(daemon::init(&state_dir, root_of_trust, &root)),
        Some(Subcommand::Reseal { root_of_trust }) => Some(daemon::reseal(&state_dir, root_of_trust, &root)),
        None => None,
    };
    if let Some(done) = done {
        return match done {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kmsd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = DaemonConfig {
        socket: args.socket.unwrap_or_else(kmsfs_common::paths::default_socket),
        state_dir,
        account_id: args.account_id,
        region: args.region,
        root,
        config_dir: args.config_dir.unwrap_or_else(daemon::default_config_dir),
        listen_tcp: args.listen_tcp,
        allow_remote_tcp: args.allow_remote_tcp,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: args.tls_client_ca }),
            _ => None,
        },
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
