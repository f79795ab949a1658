//! The audit trail: every request answered, as one CloudTrail-shaped record in a
//! hash-chained, signed log (`common/src/audit/AUDIT.md` has the format and the guarantees).
//!
//! - [`event`] builds a request's record, secrets removed.
//! - [`writer`] owns the files: group commit, digests, fail-closed.
//! - [`journal`] mirrors each line to the systemd journal, when asked to.
//! - [`AuditLog`] is the server's handle: [`AuditLog::append`] returns once the record is
//!   durable, or with the error that must replace the request's result.
//!
//! The signing key is generated once and kept sealed under the root of trust
//! ([`crate::agent::Agent::internal_secret`]); only its public half leaves the agent.

pub mod event;
pub mod journal;
pub mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use ed25519_dalek::{SigningKey, VerifyingKey};
use kmsfs_common::KmsError;
use serde_json::{Map, Value};

use writer::{Command, Pending, Writer};

/// The reserved internal key that seals the audit signing key.
const SIGNING_KEY_ID: [u8; 16] = *b"kmsd audit key\0\x01";
/// Its name in the store's `meta` table.
const SIGNING_KEY_NAME: &str = "audit_signing_key";

/// The signing key of `agent`'s audit log: unsealed from the store, or made and sealed on
/// first use.
pub fn signing_key(agent: &crate::agent::Agent) -> Result<SigningKey, String> {
    let seed = agent.internal_secret(SIGNING_KEY_NAME, SIGNING_KEY_ID)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The audit log as the server uses it.
pub struct AuditLog {
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    healthy: Arc<AtomicBool>,
    directory: PathBuf,
    public_key: VerifyingKey,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AuditLog {
    /// Opens (or starts) the log in `directory` and its writer thread; lines are mirrored
    /// to `mirror` once durable.
    pub fn open(directory: &Path, key: SigningKey, mirror: Option<journal::Journal>) -> Result<AuditLog, String> {
        let healthy = Arc::new(AtomicBool::new(false));
        let public_key = key.verifying_key();
        let writer = Writer::open(directory.to_path_buf(), key, healthy.clone(), mirror)?;
        // Clients read the files themselves (`kmsctl audit verify`): name them absolutely.
        let directory = std::fs::canonicalize(directory).unwrap_or_else(|_| directory.to_path_buf());
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kmsd-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
        Ok(AuditLog {
            commands: Mutex::new(Some(tx)),
            healthy,
            directory,
            public_key,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Whether requests may be served: false while the log cannot be written.
    pub fn accepting(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The error every request gets while the log cannot be written.
    pub fn refusal() -> KmsError {
        KmsError::internal(
            "The request was not executed: the agent's audit trail cannot be written, and no request is served \
             unaudited",
        )
    }

    /// Appends `event` and waits until it is durable (`seal`: with a digest right after it).
    /// `mutation`: the request has already changed state, so its record may use the space
    /// kept in reserve. An error here must replace the request's result.
    pub async fn append(&self, event: Map<String, Value>, seal: bool, mutation: bool) -> Result<(), KmsError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = match &*self.commands.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(Command::Append(Pending { event, seal, mutation, done })).is_ok(),
            None => false,
        };
        let written = if sent {
            wait.await.unwrap_or_else(|_| Err("the writer stopped".into()))
        } else {
            Err("the writer stopped".into())
        };
        written.map_err(|why| {
            tracing::error!("request answered with an error: its audit record cannot be written ({why})");
            KmsError::internal(
                "The request's result was withheld: its audit record cannot be written, and no request is served \
                 unaudited",
            )
        })
    }

    /// Stops the writer after the records queued so far, sealing the log.
    pub fn close(&self) {
        if let Some(tx) = self.commands.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(Command::Close);
        }
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    pub fn public_key(&self) -> &VerifyingKey {
        &self.public_key
    }
}
