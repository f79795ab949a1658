//! Which root of trust a state directory uses, and changing it.
//!
//! `kmsd init --root-of-trust file|tpm2|pkcs11` chooses the backend when the state directory
//! is created and records it in `root-of-trust.json` (nothing secret: the backend, the TCTI
//! and PCRs, the token's module and label, where the PIN is read from). Every start opens
//! the recorded backend; flags of another backend are refused rather than ignored, and the
//! database remembers the backend too (`meta.root_of_trust`), so a lost record cannot make
//! kmsd start on the wrong one. A directory never initialized is the embedded `file`
//! backend, created on first start as before `init` existed.
//!
//! `kmsd reseal` seals the root key again: after a legitimate change of a bound PCR, onto a
//! replaced TPM, with other PCRs, or to move a `file` directory to `tpm2`. The root key
//! itself does not change, so no KMS key, ciphertext or volume is touched.

use std::fs;
use std::path::{Path, PathBuf};

#[cfg(feature = "tpm2")]
use kmsfs_common::aead::KeyBytes;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::file::{self, FileRootSource};
use super::pkcs11::{Pkcs11Root, Token, TokenConfig};
use super::RootOfTrust;

/// The record's file name in the state directory.
pub const RECORD: &str = "root-of-trust.json";

/// The backends a state directory can be initialized with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A root key in a 0600 file (or derived from a passphrase): laptops, CI, the quickstart.
    File,
    /// A root key sealed by a TPM 2.0, optionally bound to PCRs.
    Tpm2,
    /// Every key's material generated and used inside a PKCS#11 token (an HSM).
    Pkcs11,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Tpm2 => "tpm2",
            Backend::Pkcs11 => "pkcs11",
        }
    }
}

/// What `root-of-trust.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
enum Record {
    File,
    Tpm2 {
        tcti: String,
        pcrs: Vec<u8>,
        /// Whether the sealed object also needs an authorization value (`--tpm-auth-file`).
        auth: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth_file: Option<PathBuf>,
    },
    Pkcs11 {
        module: PathBuf,
        token_label: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_file: Option<PathBuf>,
    },
}

impl Record {
    fn backend(&self) -> Backend {
        match self {
            Record::File => Backend::File,
            Record::Tpm2 { .. } => Backend::Tpm2,
            Record::Pkcs11 { .. } => Backend::Pkcs11,
        }
    }
}

/// The root-of-trust flags kmsd was given (any subcommand).
#[derive(Debug, Default, Clone)]
pub struct RootOptions {
    /// `file`: the root key file (default STATE_DIR/root.key).
    pub root_key_file: Option<PathBuf>,
    /// `file`: derive the root key from the passphrase in this file instead.
    pub passphrase_file: Option<PathBuf>,
    /// `tpm2`: the TCTI (default `device:/dev/tpmrm0`, or the one recorded at init).
    pub tpm_tcti: Option<String>,
    /// `tpm2`: PCRs to bind the root key to (init and reseal only).
    pub tpm_pcrs: Option<Vec<u8>>,
    /// `tpm2`: a file holding the sealed object's authorization value.
    pub tpm_auth_file: Option<PathBuf>,
    /// `tpm2`: the recovery passphrase's file (init and reseal only).
    pub recovery_passphrase_file: Option<PathBuf>,
    /// `pkcs11`: the module (init; at start it overrides the recorded one).
    pub pkcs11_module: Option<PathBuf>,
    /// `pkcs11`: the token's label (init only).
    pub pkcs11_token_label: Option<String>,
    /// `pkcs11`: a file holding the user PIN.
    pub pkcs11_pin_file: Option<PathBuf>,
}

/// The systemd credentials (`LoadCredential=`) a PIN or authorization value may come from.
const PIN_CREDENTIAL: &str = "kmsd-pkcs11-pin";
#[cfg(feature = "tpm2")]
const TPM_AUTH_CREDENTIAL: &str = "kmsd-tpm-auth";
/// The shortest recovery passphrase accepted: it alone opens the root key without the TPM.
#[cfg(feature = "tpm2")]
const MIN_RECOVERY_LEN: usize = 12;

impl RootOptions {
    /// The flags given that belong to `backend`'s rivals, for a clear refusal.
    fn foreign_flags(&self, backend: Backend) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if backend != Backend::File {
            if self.root_key_file.is_some() {
                flags.push("--root-key-file");
            }
            if self.passphrase_file.is_some() {
                flags.push("--passphrase-file");
            }
        }
        if backend != Backend::Tpm2 {
            for (set, flag) in [
                (self.tpm_tcti.is_some(), "--tpm-tcti"),
                (self.tpm_pcrs.is_some(), "--tpm-pcrs"),
                (self.tpm_auth_file.is_some(), "--tpm-auth-file"),
            ] {
                if set {
                    flags.push(flag);
                }
            }
        }
        if backend != Backend::Pkcs11 {
            for (set, flag) in [
                (self.pkcs11_module.is_some(), "--pkcs11-module"),
                (self.pkcs11_token_label.is_some(), "--pkcs11-token-label"),
                (self.pkcs11_pin_file.is_some(), "--pkcs11-pin-file"),
            ] {
                if set {
                    flags.push(flag);
                }
            }
        }
        flags
    }
}

fn read_record(state_dir: &Path) -> Result<Option<Record>, String> {
    let path = state_dir.join(RECORD);
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| format!("{} is malformed: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn write_record(state_dir: &Path, record: &Record) -> Result<(), String> {
    let path = state_dir.join(RECORD);
    let mut text = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    text.push(b'\n');
    kmsfs_common::files::write_atomically(&path, &text, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Chooses `backend` for a new state directory (created 0700 by the caller, and locked).
/// Returns a summary for the operator.
pub fn init(state_dir: &Path, backend: Backend, opts: &RootOptions) -> Result<String, String> {
    if state_dir.join(RECORD).exists() || state_dir.join("kmsd.db").exists() {
        return Err(format!(
            "{} is already initialized (it has a database or {RECORD}); to change how its root key is sealed, \
             use `kmsd reseal`",
            state_dir.display()
        ));
    }
    refuse_foreign_flags(backend, opts, "init")?;
    let (record, summary) = match backend {
        Backend::File => {
            let (_, description) = file::root_key(file_source(state_dir, opts)?)?;
            (Record::File, format!("root of trust: {description}"))
        }
        Backend::Tpm2 => init_tpm2(state_dir, opts)?,
        Backend::Pkcs11 => {
            let module = opts.pkcs11_module.clone().ok_or("--root-of-trust pkcs11 needs --pkcs11-module PATH")?;
            let token_label =
                opts.pkcs11_token_label.clone().ok_or("--root-of-trust pkcs11 needs --pkcs11-token-label LABEL")?;
            let record = Record::Pkcs11 { module, token_label, pin_file: opts.pkcs11_pin_file.clone() };
            // Log in once now, so that a wrong module, label or PIN is found at init.
            let root = open_pkcs11(&record, opts)?;
            (record, format!("root of trust: {}", root.describe()))
        }
    };
    write_record(state_dir, &record)?;
    Ok(summary)
}

#[cfg(feature = "tpm2")]
fn init_tpm2(state_dir: &Path, opts: &RootOptions) -> Result<(Record, String), String> {
    use super::tpm2;
    let recovery = read_recovery(opts, "init")?;
    let tcti = opts.tpm_tcti.clone().unwrap_or_else(|| tpm2::DEFAULT_TCTI.to_string());
    let auth = read_tpm_auth(opts.tpm_auth_file.as_deref())?;
    let pcrs = opts.tpm_pcrs.clone().unwrap_or_default();
    let options = tpm2::TpmOptions { tcti: tcti.clone(), pcrs: pcrs.clone(), auth: auth.clone() };
    tpm2::init(state_dir, &options, &KeyBytes::random(), &recovery)?;
    let record = Record::Tpm2 { tcti: tcti.clone(), pcrs, auth: auth.is_some(), auth_file: opts.tpm_auth_file.clone() };
    Ok((record, format!("root of trust: {}", tpm2::describe(state_dir, &tcti))))
}

#[cfg(not(feature = "tpm2"))]
fn init_tpm2(_: &Path, _: &RootOptions) -> Result<(Record, String), String> {
    Err(NO_TPM2.into())
}

#[cfg(not(feature = "tpm2"))]
const NO_TPM2: &str = "this kmsd was built without the tpm2 backend (cargo feature `tpm2`)";

/// Opens the root of trust `state_dir` was initialized with. Returns it and its backend.
pub fn open(state_dir: &Path, opts: &RootOptions) -> Result<(Box<dyn RootOfTrust>, Backend), String> {
    if opts.tpm_pcrs.is_some() || opts.recovery_passphrase_file.is_some() || opts.pkcs11_token_label.is_some() {
        return Err(
            "--tpm-pcrs, --recovery-passphrase-file and --pkcs11-token-label are for `kmsd init` and `kmsd reseal`"
                .into(),
        );
    }
    let record = read_record(state_dir)?.unwrap_or(Record::File);
    let backend = record.backend();
    refuse_foreign_flags(backend, opts, "start")?;
    let root: Box<dyn RootOfTrust> = match &record {
        Record::File => Box::new(file::open(file_source(state_dir, opts)?)?),
        Record::Tpm2 { tcti, auth, auth_file, .. } => open_tpm2(state_dir, opts, tcti, *auth, auth_file.as_deref())?,
        Record::Pkcs11 { .. } => Box::new(open_pkcs11(&record, opts)?),
    };
    Ok((root, backend))
}

#[cfg(feature = "tpm2")]
fn open_tpm2(
    state_dir: &Path,
    opts: &RootOptions,
    tcti: &str,
    sealed_with_auth: bool,
    recorded_auth_file: Option<&Path>,
) -> Result<Box<dyn RootOfTrust>, String> {
    use super::tpm2;
    let tcti = opts.tpm_tcti.as_deref().unwrap_or(tcti);
    let auth = tpm_auth_for_start(opts, sealed_with_auth, recorded_auth_file)?;
    let key = tpm2::unseal(state_dir, tcti, auth.as_ref().map(|a| &a[..]))?;
    Ok(Box::new(super::WrappingRoot::new(&key, tpm2::describe(state_dir, tcti))))
}

#[cfg(not(feature = "tpm2"))]
fn open_tpm2(_: &Path, _: &RootOptions, _: &str, _: bool, _: Option<&Path>) -> Result<Box<dyn RootOfTrust>, String> {
    Err(NO_TPM2.into())
}

/// The authorization value at start: from `--tpm-auth-file`, the systemd credential, or the
/// file recorded at init, in that order; required if the root key was sealed with one.
#[cfg(feature = "tpm2")]
fn tpm_auth_for_start(
    opts: &RootOptions,
    sealed_with_auth: bool,
    recorded: Option<&Path>,
) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    if !sealed_with_auth {
        if opts.tpm_auth_file.is_some() {
            return Err("--tpm-auth-file: the root key was sealed without an authorization value".into());
        }
        return Ok(None);
    }
    let path = opts
        .tpm_auth_file
        .clone()
        .or_else(|| credential(TPM_AUTH_CREDENTIAL))
        .or_else(|| recorded.map(Path::to_path_buf))
        .ok_or_else(|| {
            format!(
                "the root key was sealed with an authorization value: pass --tpm-auth-file FILE or the systemd \
                 credential {TPM_AUTH_CREDENTIAL}"
            )
        })?;
    read_tpm_auth(Some(&path))
}

fn open_pkcs11(record: &Record, opts: &RootOptions) -> Result<Pkcs11Root, String> {
    let Record::Pkcs11 { module, token_label, pin_file } = record else {
        return Err("not a pkcs11 record".into());
    };
    let module = opts.pkcs11_module.clone().unwrap_or_else(|| module.clone());
    let pin_path =
        opts.pkcs11_pin_file.clone().or_else(|| credential(PIN_CREDENTIAL)).or_else(|| pin_file.clone()).ok_or_else(
            || {
                format!(
                "the PKCS#11 token's PIN is needed: pass --pkcs11-pin-file FILE, or give kmsd the systemd credential \
                 {PIN_CREDENTIAL} (LoadCredential=); a PIN is never taken as an argument"
            )
            },
        )?;
    let pin = read_secret_text(&pin_path, "PIN")?;
    let config = TokenConfig { module: module.clone(), token_label: token_label.clone(), pin };
    let token = Token::connect(&config)
        .map_err(|e| format!("cannot open the PKCS#11 token '{token_label}' ({}): {e}", module.display()))?;
    Ok(Pkcs11Root::new(token))
}

/// Seals the root key again (see the module documentation); `to` moves a `file` directory
/// to `tpm2`. The caller holds the state directory's lock (so kmsd is not running);
/// `verify` is given the root before anything is written, and must check it against the
/// database, so that a wrong recovery passphrase or root key file changes nothing.
/// Returns a summary for the operator.
pub fn reseal(
    state_dir: &Path,
    to: Option<Backend>,
    opts: &RootOptions,
    verify: impl FnOnce(&dyn RootOfTrust, Backend) -> Result<(), String>,
) -> Result<String, String> {
    let record = read_record(state_dir)?;
    if record.is_none() && !state_dir.join("kmsd.db").exists() {
        return Err(format!("{} is not a kmsd state directory (no database, no {RECORD})", state_dir.display()));
    }
    let from = record.as_ref().map_or(Backend::File, Record::backend);
    match (from, to.unwrap_or(from)) {
        (Backend::Tpm2 | Backend::File, Backend::Tpm2) => reseal_tpm2(state_dir, record, opts, verify),
        (Backend::Pkcs11, _) | (_, Backend::Pkcs11) => {
            Err("a pkcs11 root of trust holds every key's material inside the token, so there is nothing to reseal: \
             to move keys into a token, create keys there and move volumes to them with `kmsfs rewrap --to-key`"
                .into())
        }
        (_, Backend::File) => {
            Err("reseal moves a root key into a TPM (--root-of-trust tpm2), never back out to a file: the point of \
             the TPM is that the key is on no disk"
                .into())
        }
    }
}

#[cfg(feature = "tpm2")]
fn reseal_tpm2(
    state_dir: &Path,
    record: Option<Record>,
    opts: &RootOptions,
    verify: impl FnOnce(&dyn RootOfTrust, Backend) -> Result<(), String>,
) -> Result<String, String> {
    use super::tpm2;
    if let Some(flag) = opts.foreign_flags(Backend::Tpm2).into_iter().find(|f| f.starts_with("--pkcs11")) {
        return Err(format!("{flag} does not apply to a tpm2 reseal"));
    }
    let recovery = read_recovery(opts, "reseal")?;
    let auth = read_tpm_auth(opts.tpm_auth_file.as_deref())?;
    let (key, tcti, pcrs, from) = match &record {
        Some(Record::Tpm2 { tcti, pcrs, .. }) => {
            if opts.root_key_file.is_some() || opts.passphrase_file.is_some() {
                return Err("--root-key-file and --passphrase-file apply only when moving a file backend".into());
            }
            let key = tpm2::recover(state_dir, &recovery)?;
            let tcti = opts.tpm_tcti.clone().unwrap_or_else(|| tcti.clone());
            (key, tcti, opts.tpm_pcrs.clone().unwrap_or_else(|| pcrs.clone()), Backend::Tpm2)
        }
        _ => {
            let (key, _) = file::root_key(file_source(state_dir, opts)?)?;
            let tcti = opts.tpm_tcti.clone().unwrap_or_else(|| tpm2::DEFAULT_TCTI.to_string());
            (key, tcti, opts.tpm_pcrs.clone().unwrap_or_default(), Backend::File)
        }
    };
    verify(&super::WrappingRoot::new(&key, format!("the root key of {}", state_dir.display())), from)?;
    let options = tpm2::TpmOptions { tcti: tcti.clone(), pcrs: pcrs.clone(), auth: auth.clone() };
    // With the file backend there is no recovery file yet: reseal writes it.
    tpm2::reseal(state_dir, &options, &key, (from == Backend::File).then_some(&recovery[..]))?;
    let auth_file = opts.tpm_auth_file.clone().or_else(|| match &record {
        Some(Record::Tpm2 { auth_file, .. }) if auth.is_some() => auth_file.clone(),
        _ => None,
    });
    write_record(state_dir, &Record::Tpm2 { tcti: tcti.clone(), pcrs, auth: auth.is_some(), auth_file })?;
    let mut summary = format!("root key resealed: {}", tpm2::describe(state_dir, &tcti));
    for leftover in
        [opts.root_key_file.clone().unwrap_or_else(|| state_dir.join("root.key")), state_dir.join("root.kdf")]
    {
        if leftover.exists() {
            shred(&leftover)?;
            summary.push_str(&format!("\nremoved {}", leftover.display()));
        }
    }
    Ok(summary)
}

#[cfg(not(feature = "tpm2"))]
fn reseal_tpm2(
    _: &Path,
    _: Option<Record>,
    _: &RootOptions,
    _: impl FnOnce(&dyn RootOfTrust, Backend) -> Result<(), String>,
) -> Result<String, String> {
    Err(NO_TPM2.into())
}

/// Overwrites a file that held a root key (or its KDF salt) with zeros, syncs, and removes
/// it. (On a copy-on-write or journaling filesystem old blocks may survive: the README's
/// threat model says so.)
#[cfg(feature = "tpm2")]
fn shred(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let failed = |e: std::io::Error| format!("cannot remove {}: {e}", path.display());
    let len = fs::metadata(path).map_err(failed)?.len();
    let mut file = fs::OpenOptions::new().write(true).open(path).map_err(failed)?;
    file.write_all(&vec![0u8; len as usize]).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    fs::remove_file(path).map_err(failed)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(failed)?;
    }
    Ok(())
}

fn file_source(state_dir: &Path, opts: &RootOptions) -> Result<FileRootSource, String> {
    Ok(match &opts.passphrase_file {
        Some(path) => FileRootSource::Passphrase {
            kdf_file: state_dir.join("root.kdf"),
            passphrase: read_secret_text(path, "passphrase")?,
        },
        None => FileRootSource::KeyFile(opts.root_key_file.clone().unwrap_or_else(|| state_dir.join("root.key"))),
    })
}

fn refuse_foreign_flags(backend: Backend, opts: &RootOptions, what: &str) -> Result<(), String> {
    let foreign = opts.foreign_flags(backend);
    if foreign.is_empty() {
        return Ok(());
    }
    let verb = if foreign.len() == 1 { "does" } else { "do" };
    Err(format!(
        "{} {verb} not apply to the {} root of trust this state directory was initialized with ({what}); to move \
         a file backend into a TPM, see `kmsd reseal --help`",
        foreign.join(", "),
        backend.as_str()
    ))
}

/// `$CREDENTIALS_DIRECTORY/name`, if systemd passed that credential.
fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty())?;
    let path = PathBuf::from(dir).join(name);
    path.is_file().then_some(path)
}

/// A secret kept in a file: its text without the trailing newline.
fn read_secret_text(path: &Path, what: &str) -> Result<Zeroizing<String>, String> {
    let text = Zeroizing::new(
        fs::read_to_string(path).map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?,
    );
    let secret = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    if secret.is_empty() {
        return Err(format!("the {what} file {} is empty", path.display()));
    }
    Ok(secret)
}

#[cfg(feature = "tpm2")]
fn read_recovery(opts: &RootOptions, what: &str) -> Result<Zeroizing<String>, String> {
    let path = opts.recovery_passphrase_file.as_deref().ok_or_else(|| {
        format!(
            "{what} with the tpm2 root of trust needs --recovery-passphrase-file FILE: the recovery passphrase \
             re-seals the root key after a PCR change or onto a new TPM"
        )
    })?;
    let passphrase = read_secret_text(path, "recovery passphrase")?;
    if passphrase.chars().count() < MIN_RECOVERY_LEN {
        return Err(format!("the recovery passphrase must be at least {MIN_RECOVERY_LEN} characters long"));
    }
    Ok(passphrase)
}

/// An authorization value: the file's bytes (text or binary), without one trailing newline.
#[cfg(feature = "tpm2")]
fn read_tpm_auth(path: Option<&Path>) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    let Some(path) = path else { return Ok(None) };
    let mut bytes = Zeroizing::new(
        fs::read(path).map_err(|e| format!("cannot read the TPM authorization value file {}: {e}", path.display()))?,
    );
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(format!("the TPM authorization value file {} is empty", path.display()));
    }
    Ok(Some(bytes))
}
