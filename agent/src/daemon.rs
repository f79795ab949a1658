//! Starting the agent: configuration, the state directory and its lock, the root of
//! trust, the listening socket (our own, or one passed by systemd) and any TCP listeners
//! (with their TLS configuration), the audit trail, readiness and shutdown notifications.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmsfs_common::ids::ArnScope;

use crate::access_keys::AccessKeyStore;
use crate::agent::{Agent, AgentConfig};
use crate::audit::AuditLog;
use crate::authz::Authz;
use crate::rot::setup::{self, Backend, RootOptions};
use crate::server;
use crate::store::Store;
use crate::tls::TlsSettings;

/// How kmsd was asked to run.
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub account_id: Option<String>,
    pub region: String,
    /// The root-of-trust flags (the backend itself is the one the state directory was
    /// initialized with).
    pub root: RootOptions,
    /// Identity policies live under `<config_dir>/policies/`, access keys in
    /// `<config_dir>/access-keys.json`.
    pub config_dir: PathBuf,
    /// TCP addresses to serve SigV4-signed requests on (none by default).
    pub listen_tcp: Vec<std::net::SocketAddr>,
    /// Allow TCP addresses other than loopback ones without TLS (plain HTTP).
    pub allow_remote_tcp: bool,
    /// TLS on every TCP listener: the certificate, key and optional client CA.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Record every request in the audit trail (on unless explicitly turned off).
    pub audit: bool,
    /// Where the audit trail's files go; default `audit/` in the state directory.
    pub audit_dir: Option<PathBuf>,
    /// Mirror audit records to the journal: `Some(true)` always (failing to start if the
    /// journal's socket cannot be reached), `Some(false)` never, `None` when run by systemd.
    pub audit_journald: Option<bool>,
    /// The journal's native socket (for tests; default `/run/systemd/journal/socket`).
    pub journal_socket: PathBuf,
    /// Milliseconds added to the clock for key lifecycle dates (`--clock-offset`, for tests).
    pub clock_offset_ms: i64,
}

/// The account ID when none is configured: twelve digits derived from the machine ID, so
/// that ARNs are stable on a host and differ between hosts.
pub fn default_account_id() -> String {
    let machine_id = fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let hex: String = machine_id.trim().chars().filter(char::is_ascii_hexdigit).take(15).collect();
    match u64::from_str_radix(&hex, 16) {
        Ok(n) if !hex.is_empty() => format!("{:012}", n % 1_000_000_000_000),
        _ => "111122223333".to_string(),
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(config: DaemonConfig) -> Result<(), String> {
    let tls = check_tcp(&config)?;
    crate::sys::harden_process();
    create_state_dir(&config.state_dir)?;
    let _lock = lock_state_dir(&config.state_dir)?;
    check_state_access(&config.state_dir)?;

    let (root, backend) = setup::open(&config.state_dir, &config.root)?;
    let account = config.account_id.clone().unwrap_or_else(default_account_id);
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("account ID '{account}' must be 12 digits"));
    }
    let scope = ArnScope { region: config.region.clone(), account };
    let owner = nix::unistd::geteuid().as_raw();
    let authz = Authz::load(Some(config.config_dir.clone()), owner)
        .map_err(|e| format!("invalid identity policy in {}: {e}", config.config_dir.display()))?;
    let access_keys = Arc::new(AccessKeyStore::load(&config.config_dir, &scope.account)?);
    if !access_keys.current().is_empty() || !config.listen_tcp.is_empty() {
        tracing::info!(keys = access_keys.current().len(), "access keys loaded");
    }
    if !tls.as_ref().is_some_and(|t| t.mutual()) {
        warn_of_unusable_bound_keys(&access_keys);
    }
    if config.clock_offset_ms != 0 {
        tracing::warn!(
            offset_seconds = config.clock_offset_ms / 1000,
            "--clock-offset: key lifecycle dates (rotation, deletion, expiry) use a shifted clock; for tests only"
        );
    }
    let agent = Arc::new(Agent::open(
        AgentConfig {
            state_dir: config.state_dir.clone(),
            scope,
            authz,
            clock_offset_ms: config.clock_offset_ms,
            root_backend: backend,
            config_dir: Some(config.config_dir.clone()),
        },
        root,
    )?);
    let audit = if config.audit {
        let dir = config.audit_dir.clone().unwrap_or_else(|| config.state_dir.join("audit"));
        let log = AuditLog::open(&dir, crate::audit::signing_key(&agent)?, journal_mirror(&config)?)?;
        tracing::info!(directory = %dir.display(), public_key = %kmsfs_common::audit::encode_public_key(log.public_key()), "audit trail open");
        Some(Arc::new(log))
    } else {
        tracing::warn!("THE AUDIT TRAIL IS OFF (--audit off): requests are served without any record of them");
        None
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kmsd")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        // TCP first: once the socket accepts, the agent is ready on every listener.
        let mut tcp = Vec::new();
        for addr in &config.listen_tcp {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on TCP {addr}: {e}"))?;
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            match &tls {
                Some(tls) => tracing::info!(
                    address = %local,
                    certificate = %tls.files().cert.display(),
                    client_ca = tls.files().client_ca.as_ref().map(|p| p.display().to_string()),
                    "listening on TCP with TLS for SigV4-signed requests"
                ),
                None => {
                    tracing::info!(address = %local, "listening on TCP (plain HTTP, no TLS) for SigV4-signed requests")
                }
            }
            tcp.push(listener);
        }
        // Custom key stores left connected are connected again before the first request.
        crate::service::key_stores::reconnect_all(&agent);
        // Whatever fell due while kmsd was down is done before the first request.
        let succeeded = crate::scheduler::pass(&agent, audit.as_ref()).await;
        tokio::spawn(crate::scheduler::run(agent.clone(), audit.clone(), succeeded));
        let (listener, bound) = listen(&config.socket)?;
        tracing::info!(socket = %config.socket.display(), "kmsd ready");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        tokio::spawn(reload_on_sighup(agent.clone(), access_keys.clone(), tls.clone()));
        let listeners = server::Listeners { unix: listener, tcp, access_keys, tls };
        server::serve(agent.clone(), audit.clone(), listeners, shutdown_signal()).await;
        if let Err(e) = agent.save_usage() {
            tracing::warn!("cannot save key usage: {}", e.message);
        }
        if let Some(audit) = &audit {
            audit.close();
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        if bound {
            let _ = fs::remove_file(&config.socket);
        }
        tracing::info!("kmsd stopped");
        Ok(())
    })
}

/// Checks the TCP listeners' settings and loads their TLS configuration, if any. Without
/// TLS a non-loopback address needs `--allow-remote-tcp`, and is loudly warned about.
fn check_tcp(config: &DaemonConfig) -> Result<Option<Arc<TlsSettings>>, String> {
    let remote = config.listen_tcp.iter().find(|a| !a.ip().is_loopback());
    let Some(files) = &config.tls else {
        if let Some(addr) = remote {
            if !config.allow_remote_tcp {
                return Err(format!(
                    "--listen-tcp {addr} is not a loopback address and there is no TLS (--tls-cert, --tls-key): \
                     requests and replies, plaintexts and data keys included, would cross the network \
                     unencrypted; give kmsd a certificate and key, or pass --allow-remote-tcp if that network \
                     is trusted or tunneled"
                ));
            }
            tracing::warn!(
                address = %addr,
                "--allow-remote-tcp WITHOUT TLS: secrets, plaintexts and data keys cross the network IN CLEAR \
                 on {addr}; anyone on the path can read them and replay requests; use --tls-cert and --tls-key"
            );
        }
        return Ok(None);
    };
    if config.listen_tcp.is_empty() {
        return Err("--tls-cert and --tls-key apply to the TCP listeners, and there is no --listen-tcp".into());
    }
    let settings = TlsSettings::load(files.clone())?;
    tracing::info!(
        certificate = %files.cert.display(),
        mutual = settings.mutual(),
        "TLS configuration loaded for the TCP listeners"
    );
    Ok(Some(Arc::new(settings)))
}

/// Warns of access keys bound to a client certificate (`TlsClient`) when there is no mutual
/// TLS: no connection can present one, so these keys are refused.
fn warn_of_unusable_bound_keys(access_keys: &AccessKeyStore) {
    let bound = access_keys.current().bound_to_tls_clients();
    if bound > 0 {
        tracing::warn!(
            keys = bound,
            "access keys bound to a TLS client (TlsClient) are refused: kmsd has no --tls-client-ca, so no \
             connection presents a client certificate"
        );
    }
}

/// `kmsd init`: creates the state directory `state_dir` for `backend`.
pub fn init(state_dir: &Path, backend: Backend, opts: &RootOptions) -> Result<String, String> {
    create_state_dir(state_dir)?;
    let _lock = lock_state_dir(state_dir)?;
    let summary = setup::init(state_dir, backend, opts)?;
    Ok(format!("initialized {}\n{summary}", state_dir.display()))
}

/// `kmsd reseal`: seals the root key of `state_dir` again, or moves it into a TPM.
pub fn reseal(state_dir: &Path, to: Option<Backend>, opts: &RootOptions) -> Result<String, String> {
    let _lock = lock_state_dir(state_dir).map_err(|e| format!("{e}: stop it before resealing"))?;
    let db = state_dir.join("kmsd.db");
    let mut store = if db.exists() { Some(Store::open(&db)?) } else { None };
    let summary = setup::reseal(state_dir, to, opts, |root, from| match store.as_mut() {
        Some(store) => crate::agent::check_root(store, root, from, state_dir),
        None => Ok(()),
    })?;
    if let Some(store) = store.as_mut() {
        store.set_meta(crate::agent::ROOT_BACKEND, Backend::Tpm2.as_str().as_bytes()).map_err(|e| e.message)?;
    }
    Ok(summary)
}

fn create_state_dir(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create state directory {}: {e}", dir.display()))
}

/// The journal mirror `config` asks for: under systemd (`INVOCATION_ID` set by the
/// service manager) unless turned off, or always when turned on.
fn journal_mirror(config: &DaemonConfig) -> Result<Option<crate::audit::journal::Journal>, String> {
    let wanted = config.audit_journald.unwrap_or_else(|| std::env::var_os("INVOCATION_ID").is_some());
    if !wanted {
        return Ok(None);
    }
    match crate::audit::journal::Journal::connect(&config.journal_socket) {
        Ok(journal) => {
            tracing::info!(socket = %config.journal_socket.display(), "mirroring audit records to the journal");
            Ok(Some(journal))
        }
        Err(e) if config.audit_journald.is_none() => {
            tracing::warn!("not mirroring audit records to the journal: {e}");
            Ok(None)
        }
        Err(e) => {
            Err(format!("--audit-journald on: cannot reach the journal at {}: {e}", config.journal_socket.display()))
        }
    }
}

/// Everything in the state directory that kmsd writes must be open to it. Under systemd's
/// hardening kmsd is root without the capability to override file permissions, so a file
/// owned by another user (a restore from backup, a kmsd once run as someone else) is closed
/// to it: say which file, whose it is and what to run, rather than SQLite's "unable to open
/// database file".
fn check_state_access(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // The root of trust's files are only read.
    const READ_ONLY: [&str; 5] = ["root.key", "root.kdf", "root.tpm", "root.recovery", "root-of-trust.json"];
    let mut entries = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < entries.len() {
        let path = entries[i].clone();
        i += 1;
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        let result = if meta.is_dir() {
            fs::read_dir(&path).map(|list| {
                // The state directory and its audit directory, one level each.
                if i == 1 || path.file_name().is_some_and(|n| n == "audit") {
                    entries.extend(list.filter_map(|e| Some(e.ok()?.path())));
                }
            })
        } else if meta.is_file() {
            let read_only = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| READ_ONLY.contains(&n));
            fs::OpenOptions::new().read(true).write(!read_only).open(&path).map(drop)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                continue;
            }
            let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
            return Err(format!(
                "kmsd (uid {uid}) cannot open {} (owner uid {}, gid {}, mode {:o}): give the state directory back to \
                 kmsd with `chown -R {uid}:{gid} {}` (under kmsd.service, root cannot override file permissions)",
                path.display(),
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// One agent per state directory: a second one would race the first on the database.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, String> {
    let path = dir.join("kmsd.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| format!("another kmsd is already using {}", dir.display()))
}

/// The listening socket: the one systemd passed (socket activation), else a new one at
/// `path`. Returns whether we bound it (and so should remove it on exit).
fn listen(path: &Path) -> Result<(tokio::net::UnixListener, bool), String> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Ok(Some(std_listener)) = fds.take_unix_listener(0) {
        std_listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::UnixListener::from_std(std_listener).map_err(|e| e.to_string())?;
        tracing::info!("using the socket passed by systemd");
        return Ok((listener, false));
    }
    if let Some(parent) = path.parent() {
        let mode = if nix::unistd::geteuid().is_root() { 0o755 } else { 0o700 };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("another agent is already listening on {}", path.display()));
        }
        fs::remove_file(path).map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Anyone may connect; what they may do is decided per request from their credentials.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Ok((listener, true))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop kmsd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// SIGHUP reloads the identity policies, the access keys and the TLS certificate, key and
/// client CA; a bad file is reported and the previous set stays in force. (A renewed
/// certificate serves new connections; established ones keep theirs.)
async fn reload_on_sighup(agent: Arc<Agent>, access_keys: Arc<AccessKeyStore>, tls: Option<Arc<TlsSettings>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        match agent.authz.reload() {
            Ok(files) => tracing::info!(files, "identity policies reloaded"),
            Err(e) => tracing::error!("identity policies NOT reloaded, the previous ones stay in force: {e}"),
        }
        match agent.reload_clusters() {
            Ok(clusters) => tracing::info!(clusters, "HSM clusters reloaded"),
            Err(e) => tracing::error!("HSM clusters NOT reloaded, the previous ones stay in force: {e}"),
        }
        match agent.reload_peers() {
            Ok(peers) => tracing::info!(peers, "peer agents reloaded"),
            Err(e) => tracing::error!("peer agents NOT reloaded, the previous ones stay in force: {e}"),
        }
        match access_keys.reload() {
            Ok(keys) => tracing::info!(keys, "access keys reloaded"),
            Err(e) => tracing::error!("access keys NOT reloaded, the previous ones stay in force: {e}"),
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!(certificate = %tls.files().cert.display(), "TLS configuration reloaded"),
                Err(e) => tracing::error!("TLS configuration NOT reloaded, the previous one stays in force: {e}"),
            }
        }
        if !tls.as_ref().is_some_and(|t| t.mutual()) {
            warn_of_unusable_bound_keys(&access_keys);
        }
    }
}

/// The default configuration directory: `/etc/kmsd` as root, else `$XDG_CONFIG_HOME/kmsd`.
pub fn default_config_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/etc/kmsd");
    }
    match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("kmsd"),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config/kmsd"),
            None => PathBuf::from(format!("/tmp/kmsd-{}/config", nix::unistd::geteuid())),
        },
    }
}
