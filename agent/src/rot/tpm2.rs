//! The `tpm2` root of trust: the same kind of random 256-bit root key as the `file` backend
//! (every key's material is wrapped under it by [`super::WrappingRoot`]), but kept sealed by
//! the machine's TPM 2.0, so that kmsd unseals it at start with nobody present while the disk
//! alone never yields it.
//!
//! Two files in the state directory, both JSON, 0600, written atomically:
//!
//! - `root.tpm`: the sealed object (its `TPMT_PUBLIC` and `TPM2B_PRIVATE`, which only the TPM
//!   that sealed it can load), the PCRs it is bound to with their sha256 values at sealing
//!   time (not secret: they let kmsd name the PCRs that changed), whether it needs an
//!   authorization value, and the TCTI it was sealed through.
//! - `root.recovery`: the root key wrapped (XAES-256-GCM) under a key derived from the
//!   recovery passphrase with Argon2id, for when the TPM no longer unseals it: another
//!   machine, a cleared TPM, a legitimate change of a bound PCR. `kmsd reseal` takes the key
//!   from there and seals it again. No TPM is involved.
//!
//! On the TPM side the parent is a storage key in the owner hierarchy made from the TCG's SRK
//! template (ECC NIST P-256, AES-128-CFB): it is re-created at every start from the same
//! template and the TPM's storage seed, so nothing about it is stored, and a cleared TPM or
//! another TPM makes a different one, under which `root.tpm` does not load. The sealed object
//! is a KeyedHash with `fixedTPM`, `fixedParent` and `noDA`; bound to PCRs it can be unsealed
//! only through a policy session satisfying PolicyPCR (then PolicyAuthValue if it has an
//! authorization value). The sessions that carry the root key (Create, Unseal) are salted
//! with the parent and encrypt that parameter, so the key never crosses the bus in clear.
//!
//! `noDA` means a wrong authorization value never locks the TPM out (kmsd restarted by systemd
//! with a wrong `--tpm-auth-file` would otherwise lock every DA-protected key of the machine),
//! and also that guesses are not rate-limited: an authorization value should be random
//! (e.g. the 32 characters of `openssl rand -hex 16`), not a word.
//!
//! Without a resource manager (swtpm, `/dev/tpm0`) the TPM holds only a few transient
//! objects: every handle made here is flushed on every path, and transient objects left
//! behind by a process that died are flushed before each operation.

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::str::FromStr;

use base64::Engine;
use kmsfs_common::aead::{random_bytes, KeyBytes, XaesKey, KEY_LEN, TAG_LEN, XAES_NONCE_LEN};
use kmsfs_common::format::hex;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tss_esapi::abstraction::pcr;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
use tss_esapi::constants::{CapabilityType, SessionType, Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;
use zeroize::Zeroizing;

use super::file::{derive, new_kdf_params, KdfParams};

/// How to seal the root key.
pub struct TpmOptions {
    /// The TPM's TCTI, e.g. `device:/dev/tpmrm0` ([`DEFAULT_TCTI`]) or
    /// `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// PCR indices of the sha256 bank to bind to; empty for no PCR policy.
    pub pcrs: Vec<u8>,
    /// An authorization value the sealed object will require (1 to 32 bytes).
    pub auth: Option<Zeroizing<Vec<u8>>>,
}

/// The kernel's resource manager: several processes may use the TPM at once.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

const SEALED_FILE: &str = "root.tpm";
const RECOVERY_FILE: &str = "root.recovery";
const SEALED_FORMAT: &str = "kmsfs root key sealed by a TPM 2.0";
const RECOVERY_FORMAT: &str = "kmsfs root key recovery";
const FORMAT_VERSION: u32 = 1;
/// The parent `root.tpm` was sealed under, as recorded in it.
const PARENT: &str = "owner hierarchy, TCG SRK template, ECC NIST P-256, AES-128-CFB";
const PCR_BANK: &str = "sha256";
/// PCRs of a PC client TPM.
const HIGHEST_PCR: u8 = 23;
/// An authorization value longer than the sealed object's name digest (sha256) is refused
/// by the TPM.
const MAX_AUTH_LEN: usize = 32;
/// `root.recovery` opens with the passphrase alone, offline: it must resist guessing.
const MIN_PASSPHRASE_CHARS: usize = 12;
/// Both files are small; anything larger is not ours.
const MAX_FILE_LEN: u64 = 64 * 1024;
const RECOVERY_AAD: &[u8] = b"kmsfs root key recovery v1\0";
const KEY_CHECK_LABEL: &[u8] = b"kmsfs root key check v1\0";
const RESEAL: &str = "`kmsd reseal --recovery-passphrase-file FILE`";

/// `root.tpm`.
#[derive(Serialize, Deserialize)]
struct SealedFile {
    format: String,
    version: u32,
    tcti: String,
    parent: String,
    pcr_bank: String,
    pcrs: Vec<PcrValue>,
    auth: bool,
    /// The sealed object's TPMT_PUBLIC, base64.
    public: String,
    /// The sealed object's TPM2B_PRIVATE buffer, base64: encrypted under the parent.
    private: String,
    /// [`key_check`] of the sealed root key.
    key_check: String,
}

/// One bound PCR and its value when the root key was sealed.
#[derive(Serialize, Deserialize)]
struct PcrValue {
    index: u8,
    sha256: String,
}

/// `root.recovery`.
#[derive(Serialize, Deserialize)]
struct RecoveryFile {
    format: String,
    version: u32,
    kdf: KdfParams,
    /// XAES-256-GCM nonce, base64.
    nonce: String,
    /// The root key sealed under the passphrase's key, then the tag, base64.
    wrapped_root_key: String,
    /// [`key_check`] of the root key.
    key_check: String,
}

/// Parses `--tpm-pcrs`: "7" or "0,2,7" (indices 0 to 23 of the sha256 bank, no duplicates),
/// or "none" (or nothing) for no PCR policy. The result is sorted.
pub fn parse_pcrs(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(Vec::new());
    }
    let mut pcrs = Vec::new();
    for part in text.split(',').map(str::trim) {
        let index = part.parse::<u8>().ok().filter(|i| *i <= HIGHEST_PCR).ok_or_else(|| {
            format!("'{part}' is not a PCR index: expected numbers from 0 to {HIGHEST_PCR}, as in \"7\" or \"0,2,7\"")
        })?;
        if pcrs.contains(&index) {
            return Err(format!("PCR {index} is listed twice"));
        }
        pcrs.push(index);
    }
    pcrs.sort_unstable();
    Ok(pcrs)
}

/// Seals `root_key` under the TPM (writes STATE_DIR/root.tpm) and wraps it under the recovery
/// passphrase with Argon2id (writes STATE_DIR/root.recovery). Both 0600, written atomically.
/// Refuses to overwrite an existing root.tpm (or a root.recovery). The TPM is asked first, so
/// that nothing is written if it refuses.
pub fn init(state_dir: &Path, opts: &TpmOptions, root_key: &KeyBytes, recovery_passphrase: &str) -> Result<(), String> {
    check_options(opts)?;
    check_new_passphrase(recovery_passphrase)?;
    let sealed_path = state_dir.join(SEALED_FILE);
    let recovery_path = state_dir.join(RECOVERY_FILE);
    if exists(&sealed_path)? {
        return Err(format!(
            "{} already exists: this state directory is already sealed to a TPM; to seal it again \
             (other PCRs, another TPM) run {RESEAL}",
            sealed_path.display()
        ));
    }
    if exists(&recovery_path)? {
        return Err(format!(
            "{} exists but {SEALED_FILE} does not: an earlier init was interrupted, or {SEALED_FILE} was \
             removed. If this state directory holds keys, restore {SEALED_FILE} or run {RESEAL}; if not, \
             remove {} and run init again",
            recovery_path.display(),
            recovery_path.display()
        ));
    }
    let sealed = Tpm::open(&opts.tcti)?.seal(root_key, opts)?;
    let recovery = wrap_for_recovery(root_key, recovery_passphrase)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| format!("cannot create the state directory {}: {e}", state_dir.display()))?;
    write_json(&recovery_path, &recovery)?;
    write_json(&sealed_path, &sealed)?;
    tracing::info!("sealed the root key to the TPM at {} ({})", opts.tcti, pcr_summary(&opts.pcrs));
    Ok(())
}

/// Unseals the root key from STATE_DIR/root.tpm with the TPM at `tcti`. `auth` must match the
/// one sealed with.
pub fn unseal(state_dir: &Path, tcti: &str, auth: Option<&[u8]>) -> Result<KeyBytes, String> {
    let path = state_dir.join(SEALED_FILE);
    let sealed = read_sealed(&path)?;
    match (sealed.auth, auth) {
        (true, None) => {
            return Err(format!(
                "{} was sealed with an authorization value: give it with --tpm-auth-file",
                path.display()
            ))
        }
        (false, Some(_)) => {
            return Err(format!(
                "{} was sealed without an authorization value, but one was given (--tpm-auth-file): \
                 leave the option out, or reseal with it ({RESEAL} --tpm-auth-file FILE)",
                path.display()
            ))
        }
        _ => {}
    }
    let key = Tpm::open(tcti)?.unseal(&sealed, &path, auth)?;
    if key_check(&key) != sealed.key_check {
        return Err(format!(
            "the TPM unsealed a key that is not the one {} records: the file was altered",
            path.display()
        ));
    }
    let recovery_path = state_dir.join(RECOVERY_FILE);
    if let Ok(recovery) = read_recovery(&recovery_path) {
        if recovery.key_check != sealed.key_check {
            return Err(format!(
                "{} and {} hold different root keys (one was copied from another state directory): \
                 restore the right one",
                path.display(),
                recovery_path.display()
            ));
        }
    }
    Ok(key)
}

/// The root key from STATE_DIR/root.recovery and the recovery passphrase (no TPM involved).
pub fn recover(state_dir: &Path, recovery_passphrase: &str) -> Result<KeyBytes, String> {
    let path = state_dir.join(RECOVERY_FILE);
    let recovery = read_recovery(&path)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&recovery.wrapped_root_key)
        .map_err(|_| format!("{} is damaged: wrapped_root_key is not base64", path.display()))?;
    let nonce: [u8; XAES_NONCE_LEN] = base64::engine::general_purpose::STANDARD
        .decode(&recovery.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| format!("{} is damaged: nonce is not {XAES_NONCE_LEN} bytes of base64", path.display()))?;
    if bytes.len() != KEY_LEN + TAG_LEN {
        return Err(format!("{} is damaged: wrapped_root_key is not {} bytes", path.display(), KEY_LEN + TAG_LEN));
    }
    let (sealed, tag) = bytes.split_at(KEY_LEN);
    let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| format!("{} is damaged", path.display()))?;
    let kek = derive(&recovery.kdf, recovery_passphrase)?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(sealed);
    XaesKey::new(&kek).open_in_place(&nonce, RECOVERY_AAD, &mut key[..], &tag).map_err(|_| {
        format!(
            "the recovery passphrase does not open {}: it is not the one given when the state directory \
             was sealed (or the file is damaged)",
            path.display()
        )
    })?;
    let key = KeyBytes::from_array(*key);
    if key_check(&key) != recovery.key_check {
        return Err(format!("{} is damaged: its key check does not match the key it holds", path.display()));
    }
    Ok(key)
}

/// Seals `root_key` again (after a legitimate PCR change, or onto a replaced TPM, or with new
/// PCRs/auth): replaces STATE_DIR/root.tpm atomically; root.recovery is kept (and `root_key`
/// must be the key it holds; a passphrase given must open it). If root.recovery is missing
/// (migration from the file backend), `recovery_passphrase` must be Some and it is written.
pub fn reseal(
    state_dir: &Path,
    opts: &TpmOptions,
    root_key: &KeyBytes,
    recovery_passphrase: Option<&str>,
) -> Result<(), String> {
    check_options(opts)?;
    let sealed_path = state_dir.join(SEALED_FILE);
    let recovery_path = state_dir.join(RECOVERY_FILE);
    let new_recovery = if exists(&recovery_path)? {
        let recovery = read_recovery(&recovery_path)?;
        if recovery.key_check != key_check(root_key) {
            return Err(format!(
                "the root key to seal is not the one {} holds: nothing was changed",
                recovery_path.display()
            ));
        }
        if let Some(passphrase) = recovery_passphrase {
            recover(state_dir, passphrase)?;
        }
        None
    } else {
        let passphrase = recovery_passphrase.ok_or_else(|| {
            format!(
                "{} is missing: give a recovery passphrase (--recovery-passphrase-file) to write it",
                recovery_path.display()
            )
        })?;
        check_new_passphrase(passphrase)?;
        Some(wrap_for_recovery(root_key, passphrase)?)
    };
    let sealed = Tpm::open(&opts.tcti)?.seal(root_key, opts)?;
    if let Some(recovery) = new_recovery {
        write_json(&recovery_path, &recovery)?;
    }
    write_json(&sealed_path, &sealed)?;
    tracing::info!("resealed the root key to the TPM at {} ({})", opts.tcti, pcr_summary(&opts.pcrs));
    Ok(())
}

/// A description for logs: "tpm2 (device:/dev/tpmrm0, PCRs 7)".
pub fn describe(state_dir: &Path, tcti: &str) -> String {
    match read_sealed(&state_dir.join(SEALED_FILE)) {
        Ok(sealed) => format!(
            "tpm2 ({tcti}, {}{})",
            pcr_summary(&sealed.pcrs.iter().map(|p| p.index).collect::<Vec<_>>()),
            if sealed.auth { ", authorization value" } else { "" }
        ),
        Err(_) => format!("tpm2 ({tcti})"),
    }
}

/// "PCRs 0,7" or "no PCR policy".
fn pcr_summary(pcrs: &[u8]) -> String {
    if pcrs.is_empty() {
        "no PCR policy".into()
    } else {
        format!("PCRs {}", join(pcrs, ","))
    }
}

fn join(pcrs: &[u8], separator: &str) -> String {
    pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(separator)
}

fn check_options(opts: &TpmOptions) -> Result<(), String> {
    let mut seen = Vec::new();
    for &index in &opts.pcrs {
        if index > HIGHEST_PCR {
            return Err(format!("PCR {index} does not exist: PCRs are numbered 0 to {HIGHEST_PCR}"));
        }
        if seen.contains(&index) {
            return Err(format!("PCR {index} is listed twice"));
        }
        seen.push(index);
    }
    if let Some(auth) = &opts.auth {
        if auth.is_empty() || auth.len() > MAX_AUTH_LEN {
            return Err(format!(
                "the TPM authorization value is {} bytes long: it must be 1 to {MAX_AUTH_LEN} bytes \
                 (e.g. the text of `openssl rand -hex 16`)",
                auth.len()
            ));
        }
    }
    Ok(())
}

fn check_new_passphrase(passphrase: &str) -> Result<(), String> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(format!(
            "the recovery passphrase is shorter than {MIN_PASSPHRASE_CHARS} characters: it alone opens \
             {RECOVERY_FILE}, offline, so it must resist guessing (e.g. six random words)"
        ));
    }
    Ok(())
}

/// A fingerprint of a root key, to tell which key a file holds without the key: the first
/// 16 bytes of SHA-256 over a label and the key, hex. Reveals nothing of a random 256-bit key.
fn key_check(key: &KeyBytes) -> String {
    let mut hash = sha2::Sha256::new();
    hash.update(KEY_CHECK_LABEL);
    hash.update(key.expose());
    hex(&hash.finalize()[..16])
}

fn wrap_for_recovery(root_key: &KeyBytes, passphrase: &str) -> Result<RecoveryFile, String> {
    let kdf = new_kdf_params();
    let kek = derive(&kdf, passphrase)?;
    let mut nonce = [0u8; XAES_NONCE_LEN];
    random_bytes(&mut nonce);
    let mut wrapped = root_key.expose().to_vec();
    let tag = XaesKey::new(&kek).seal_in_place(&nonce, RECOVERY_AAD, &mut wrapped);
    wrapped.extend_from_slice(&tag);
    Ok(RecoveryFile {
        format: RECOVERY_FORMAT.into(),
        version: FORMAT_VERSION,
        kdf,
        nonce: base64::engine::general_purpose::STANDARD.encode(nonce),
        wrapped_root_key: base64::engine::general_purpose::STANDARD.encode(&wrapped),
        key_check: key_check(root_key),
    })
}

fn exists(path: &Path) -> Result<bool, String> {
    path.try_exists().map_err(|e| format!("cannot look for {}: {e}", path.display()))
}

fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("{} is missing", path.display())
        } else {
            format!("cannot open {}: {e}", path.display())
        }
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(format!("{} is larger than {MAX_FILE_LEN} bytes: it is not a kmsd file", path.display()));
    }
    Ok(bytes)
}

fn read_sealed(path: &Path) -> Result<SealedFile, String> {
    let sealed: SealedFile =
        serde_json::from_slice(&read_small(path)?).map_err(|e| format!("{} is malformed: {e}", path.display()))?;
    if sealed.format != SEALED_FORMAT || sealed.version != FORMAT_VERSION {
        return Err(format!(
            "{} is not a version {FORMAT_VERSION} sealed root key ('{}' version {})",
            path.display(),
            sealed.format,
            sealed.version
        ));
    }
    if sealed.parent != PARENT || sealed.pcr_bank != PCR_BANK {
        return Err(format!(
            "{} was sealed under '{}' with the {} PCR bank, which this kmsd does not support",
            path.display(),
            sealed.parent,
            sealed.pcr_bank
        ));
    }
    let mut indices: Vec<u8> = sealed.pcrs.iter().map(|p| p.index).collect();
    indices.sort_unstable();
    indices.dedup();
    if indices.len() != sealed.pcrs.len() || indices.iter().any(|i| *i > HIGHEST_PCR) {
        return Err(format!("{} is malformed: its PCR list is not a set of PCRs 0 to {HIGHEST_PCR}", path.display()));
    }
    Ok(sealed)
}

fn read_recovery(path: &Path) -> Result<RecoveryFile, String> {
    let recovery: RecoveryFile =
        serde_json::from_slice(&read_small(path)?).map_err(|e| format!("{} is malformed: {e}", path.display()))?;
    if recovery.format != RECOVERY_FORMAT || recovery.version != FORMAT_VERSION {
        return Err(format!(
            "{} is not a version {FORMAT_VERSION} recovery file ('{}' version {})",
            path.display(),
            recovery.format,
            recovery.version
        ));
    }
    let kdf = &recovery.kdf;
    // The file is not authenticated before the KDF runs: bound what it may ask for.
    if kdf.algorithm != "argon2id"
        || kdf.version != 0x13
        || kdf.m_cost_kib > 4 * 1024 * 1024
        || kdf.t_cost > 64
        || kdf.p_cost > 64
    {
        return Err(format!(
            "{}: unsupported KDF {} v{} (m={} KiB, t={}, p={})",
            path.display(),
            kdf.algorithm,
            kdf.version,
            kdf.m_cost_kib,
            kdf.t_cost,
            kdf.p_cost
        ));
    }
    Ok(recovery)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    text.push(b'\n');
    kmsfs_common::files::write_atomically(path, &text, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A TSS error for a message: "TPM_RC 0x1df (integrity check failed)", or the TSS layer's
/// code when the TPM was not what failed (a TCTI that cannot connect, for one).
fn tss_error(e: &tss_esapi::Error) -> String {
    match e {
        tss_esapi::Error::WrapperError(kind) => kind.to_string(),
        tss_esapi::Error::Tss2Error(rc) => {
            let code = match rc {
                Tss2ResponseCode::Success => return "success".into(),
                Tss2ResponseCode::FormatZero(z) => z.to_string(),
                Tss2ResponseCode::FormatOne(o) => o.to_string(),
            };
            // Both display as "Response code value: 0x…".
            let code = code.rsplit(' ').next().unwrap_or_default().to_string();
            let layer = u32::from_str_radix(code.trim_start_matches("0x"), 16).map(|c| c >> 16).unwrap_or(0);
            match layer {
                0 => format!("TPM_RC {code}: {rc}"),
                0x0a => format!("TSS TCTI error {code}"),
                _ => format!("TSS error {code}"),
            }
        }
    }
}

fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// A connection to a TPM.
struct Tpm {
    ctx: Context,
    tcti: String,
}

impl Tpm {
    fn open(tcti: &str) -> Result<Tpm, String> {
        let conf = TctiNameConf::from_str(tcti).map_err(|_| {
            format!(
                "'{tcti}' is not a TCTI: use device:/dev/tpmrm0 (the kernel's resource manager, the default), \
                 device:PATH, swtpm:host=HOST,port=PORT, mssim:host=HOST,port=PORT or tabrmd:"
            )
        })?;
        let ctx = Context::new(conf).map_err(|e| {
            format!(
                "cannot reach the TPM through TCTI '{tcti}' ({}): check that the TPM is there and that kmsd \
                 may use it (device:/dev/tpmrm0 needs root or the tss group), or name another TCTI with --tpm-tcti",
                tss_error(&e)
            )
        })?;
        let mut tpm = Tpm { ctx, tcti: tcti.to_string() };
        tpm.flush_leftovers();
        Ok(tpm)
    }

    /// Flushes transient objects that a process which died left in a TPM without a resource
    /// manager (which would otherwise fill its few slots); a resource manager shows none.
    fn flush_leftovers(&mut self) {
        let Ok((CapabilityData::Handles(handles), _)) =
            self.ctx.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 64)
        else {
            return;
        };
        for handle in handles.into_inner() {
            if let Ok(object) = self.ctx.tr_from_tpm_public(handle) {
                tracing::debug!("flushing a transient object left in the TPM at {}", self.tcti);
                self.flush(object);
            }
        }
    }

    fn flush(&mut self, handle: ObjectHandle) {
        if let Err(e) = self.ctx.flush_context(handle) {
            tracing::warn!("could not flush a handle from the TPM at {}: {}", self.tcti, tss_error(&e));
        }
    }

    fn flush_session(&mut self, session: AuthSession) {
        self.flush(SessionHandle::from(session).into());
    }

    /// The storage parent, re-created from its template: the same key as long as the TPM's
    /// storage seed is the same.
    fn create_primary(&mut self) -> Result<KeyHandle, String> {
        let template = storage_parent_template().map_err(|e| format!("the storage key template: {}", tss_error(&e)))?;
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.create_primary(Hierarchy::Owner, template, None, None, None, None))
            .map(|created| created.key_handle)
            .map_err(|e| match kind(&e) {
                Some(Tss2ResponseCodeKind::BadAuth | Tss2ResponseCodeKind::AuthFail) => format!(
                    "the TPM at {} refused to create kmsd's storage key in the owner hierarchy ({}): the owner \
                     hierarchy has an authorization value (owner password); kmsd needs it empty",
                    self.tcti,
                    tss_error(&e)
                ),
                Some(Tss2ResponseCodeKind::Lockout) => format!(
                    "the TPM at {} is in dictionary-attack lockout ({}): wait for it to recover or reset it \
                     (tpm2_dictionarylockout --clear-lockout)",
                    self.tcti,
                    tss_error(&e)
                ),
                _ => format!(
                    "the TPM at {} could not create kmsd's storage key in the owner hierarchy ({})",
                    self.tcti,
                    tss_error(&e)
                ),
            })
    }

    /// A session salted with `primary`, so that its session key is secret, which encrypts
    /// the first command parameter (`decrypt`) or the first response parameter (`encrypt`).
    fn salted_session(
        &mut self,
        primary: KeyHandle,
        session_type: SessionType,
        decrypt: bool,
        encrypt: bool,
    ) -> Result<AuthSession, String> {
        let session = self
            .ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                session_type,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| format!("the TPM at {} could not start a session ({})", self.tcti, tss_error(&e)))?
            .ok_or_else(|| format!("the TPM at {} returned no session", self.tcti))?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(decrypt)
            .with_encrypt(encrypt)
            .build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(session, attributes, mask) {
            self.flush_session(session);
            return Err(format!("cannot set session attributes ({})", tss_error(&e)));
        }
        Ok(session)
    }

    /// The current sha256 values of `indices` (sorted).
    fn read_pcrs(&mut self, indices: &[u8]) -> Result<Vec<[u8; 32]>, String> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let selection = pcr_selection(indices)?;
        let data = pcr::read_all(&mut self.ctx, selection)
            .map_err(|e| format!("cannot read PCRs from the TPM at {} ({})", self.tcti, tss_error(&e)))?;
        let bank = data.pcr_bank(HashingAlgorithm::Sha256);
        indices
            .iter()
            .map(|&index| {
                bank.and_then(|bank| bank.get_digest(pcr_slot(index).ok()?))
                    .and_then(|digest| <[u8; 32]>::try_from(digest.value()).ok())
                    .ok_or_else(|| {
                        format!(
                            "the TPM at {} has no sha256 value for PCR {index}: is its sha256 PCR bank allocated?",
                            self.tcti
                        )
                    })
            })
            .collect()
    }

    /// Seals `key` as `opts` say, bound to the PCRs' current values.
    fn seal(mut self, key: &KeyBytes, opts: &TpmOptions) -> Result<SealedFile, String> {
        let mut indices = opts.pcrs.clone();
        indices.sort_unstable();
        let primary = self.create_primary()?;
        let result = self.seal_under(primary, key, &indices, opts.auth.as_deref().map(Vec::as_slice));
        self.flush(primary.into());
        let (public, private, values) = result?;
        Ok(SealedFile {
            format: SEALED_FORMAT.into(),
            version: FORMAT_VERSION,
            tcti: opts.tcti.clone(),
            parent: PARENT.into(),
            pcr_bank: PCR_BANK.into(),
            pcrs: indices.iter().zip(&values).map(|(&index, value)| PcrValue { index, sha256: hex(value) }).collect(),
            auth: opts.auth.is_some(),
            public: base64::engine::general_purpose::STANDARD.encode(public),
            private: base64::engine::general_purpose::STANDARD.encode(private),
            key_check: key_check(key),
        })
    }

    /// The sealed object's public and private parts, and the values of the PCRs it is bound to.
    #[allow(clippy::type_complexity)]
    fn seal_under(
        &mut self,
        primary: KeyHandle,
        key: &KeyBytes,
        indices: &[u8],
        auth: Option<&[u8]>,
    ) -> Result<(Vec<u8>, Vec<u8>, Vec<[u8; 32]>), String> {
        let values = self.read_pcrs(indices)?;
        let policy =
            if indices.is_empty() { None } else { Some(self.trial_policy(indices, &values, auth.is_some())?) };
        let template =
            sealed_object_template(policy).map_err(|e| format!("the sealed object template: {}", tss_error(&e)))?;
        let auth_value = auth
            .map(|a| Auth::try_from(a.to_vec()))
            .transpose()
            .map_err(|e| format!("the authorization value: {}", tss_error(&e)))?;
        let data = SensitiveData::try_from(key.expose().to_vec()).map_err(|e| tss_error(&e))?;
        let session = self.salted_session(primary, SessionType::Hmac, true, false)?;
        let created = self.ctx.execute_with_session(Some(session), |ctx| {
            ctx.create(primary, template, auth_value, Some(data), None, None)
        });
        self.flush_session(session);
        let created =
            created.map_err(|e| format!("the TPM at {} could not seal the root key ({})", self.tcti, tss_error(&e)))?;
        let public = created
            .out_public
            .marshall()
            .map_err(|e| format!("cannot encode the sealed object ({})", tss_error(&e)))?;
        Ok((public, created.out_private.value().to_vec(), values))
    }

    /// The policy digest of PolicyPCR over `values` (then PolicyAuthValue if `with_auth`),
    /// computed by the TPM in a trial session. The digest commits to `values` themselves,
    /// which are what `root.tpm` records.
    fn trial_policy(&mut self, indices: &[u8], values: &[[u8; 32]], with_auth: bool) -> Result<Digest, String> {
        let selection = pcr_selection(indices)?;
        let mut hash = sha2::Sha256::new();
        for value in values {
            hash.update(value);
        }
        let pcr_digest = Digest::try_from(hash.finalize().to_vec()).map_err(|e| tss_error(&e))?;
        let trial = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Trial,
                SymmetricDefinition::Null,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| format!("the TPM at {} could not start a trial session ({})", self.tcti, tss_error(&e)))?
            .ok_or_else(|| format!("the TPM at {} returned no session", self.tcti))?;
        let result = (|| {
            let policy = PolicySession::try_from(trial)?;
            self.ctx.policy_pcr(policy, pcr_digest, selection)?;
            if with_auth {
                self.ctx.policy_auth_value(policy)?;
            }
            self.ctx.policy_get_digest(policy)
        })();
        self.flush_session(trial);
        result.map_err(|e| format!("the TPM at {} could not compute the PCR policy ({})", self.tcti, tss_error(&e)))
    }

    fn unseal(mut self, sealed: &SealedFile, path: &Path, auth: Option<&[u8]>) -> Result<KeyBytes, String> {
        let damaged = |what: &str| format!("{} is damaged: {what}", path.display());
        let public_bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed.public)
            .map_err(|_| damaged("public is not base64"))?;
        let public = Public::unmarshall(&public_bytes).map_err(|_| damaged("public is not a TPMT_PUBLIC"))?;
        let private_bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed.private)
            .map_err(|_| damaged("private is not base64"))?;
        let private = Private::try_from(private_bytes).map_err(|_| damaged("private is too long"))?;
        let primary = self.create_primary()?;
        let result = self.unseal_under(primary, public, private, sealed, path, auth);
        self.flush(primary.into());
        result
    }

    fn unseal_under(
        &mut self,
        primary: KeyHandle,
        public: Public,
        private: Private,
        sealed: &SealedFile,
        path: &Path,
        auth: Option<&[u8]>,
    ) -> Result<KeyBytes, String> {
        let object = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.load(primary, private, public))
            .map_err(|e| self.load_error(&e, path))?;
        let result = self.unseal_object(primary, object.into(), sealed, path, auth);
        self.flush(object.into());
        result
    }

    fn load_error(&self, e: &tss_esapi::Error, path: &Path) -> String {
        match kind(e) {
            Some(
                Tss2ResponseCodeKind::Integrity
                | Tss2ResponseCodeKind::Binding
                | Tss2ResponseCodeKind::Sensitive
                | Tss2ResponseCodeKind::Size,
            ) => format!(
                "{} does not load on the TPM at {} ({}): it was sealed by another TPM, or this TPM was cleared \
                 since (which replaces its storage seed). The root key is still in {RECOVERY_FILE}: run {RESEAL} \
                 to seal it to this TPM with the recovery passphrase",
                path.display(),
                self.tcti,
                tss_error(e)
            ),
            _ => format!("the TPM at {} could not load {} ({})", self.tcti, path.display(), tss_error(e)),
        }
    }

    fn unseal_object(
        &mut self,
        primary: KeyHandle,
        object: ObjectHandle,
        sealed: &SealedFile,
        path: &Path,
        auth: Option<&[u8]>,
    ) -> Result<KeyBytes, String> {
        let indices: Vec<u8> = sealed.pcrs.iter().map(|p| p.index).collect();
        let mut sorted = indices.clone();
        sorted.sort_unstable();
        let current = self.read_pcrs(&sorted)?;
        let changed: Vec<u8> = sorted
            .iter()
            .zip(&current)
            .filter(|(index, value)| {
                let recorded = sealed.pcrs.iter().find(|p| p.index == **index).map(|p| p.sha256.to_ascii_lowercase());
                recorded != Some(hex(&value[..]))
            })
            .map(|(index, _)| *index)
            .collect();
        if !changed.is_empty() {
            let (noun, verb) = if changed.len() == 1 { ("PCR", "has") } else { ("PCRs", "have") };
            return Err(format!(
                "the TPM's {noun} {} {verb} changed since the root key was sealed to PCRs {} (sha256 bank), so the \
                 TPM will not unseal it. If the change is legitimate (firmware, bootloader, Secure Boot settings), \
                 run {RESEAL} to seal the root key to the current values; otherwise find out what changed the \
                 boot chain",
                join(&changed, ", "),
                join(&sorted, ",")
            ));
        }
        if let Some(auth) = auth {
            let auth =
                Auth::try_from(auth.to_vec()).map_err(|e| format!("the authorization value: {}", tss_error(&e)))?;
            self.ctx.tr_set_auth(object, auth).map_err(|e| tss_error(&e))?;
        }
        let session_type = if sorted.is_empty() { SessionType::Hmac } else { SessionType::Policy };
        let session = self.salted_session(primary, session_type, false, true)?;
        let result = (|| {
            if !sorted.is_empty() {
                let policy = PolicySession::try_from(session)?;
                // An empty digest: the TPM takes the PCRs' current values.
                self.ctx.policy_pcr(policy, Digest::default(), pcr_selection_tss(&sorted)?)?;
                if auth.is_some() {
                    self.ctx.policy_auth_value(policy)?;
                }
            }
            self.ctx.execute_with_session(Some(session), |ctx| ctx.unseal(object))
        })();
        self.flush_session(session);
        let data = result.map_err(|e| match kind(&e) {
            Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => format!(
                "the TPM at {} refused the authorization value for {} ({}): --tpm-auth-file must hold the value \
                 it was sealed with (the sealed object is exempt from dictionary-attack lockout, so this attempt \
                 did not count against the TPM)",
                self.tcti,
                path.display(),
                tss_error(&e)
            ),
            Some(Tss2ResponseCodeKind::PolicyFail | Tss2ResponseCodeKind::Value) => format!(
                "the TPM at {} refused the PCR policy of {} ({}) although PCRs {} hold the values it records: \
                 the file was altered; run {RESEAL} to seal the root key again",
                self.tcti,
                path.display(),
                tss_error(&e),
                join(&sorted, ",")
            ),
            Some(Tss2ResponseCodeKind::Lockout) => format!(
                "the TPM at {} is in dictionary-attack lockout ({}): wait for it to recover or reset it",
                self.tcti,
                tss_error(&e)
            ),
            _ => format!("the TPM at {} could not unseal {} ({})", self.tcti, path.display(), tss_error(&e)),
        })?;
        KeyBytes::from_slice(data.value())
            .ok_or_else(|| format!("{} holds a sealed secret that is not a {KEY_LEN}-byte root key", path.display()))
    }
}

fn pcr_slot(index: u8) -> tss_esapi::Result<PcrSlot> {
    PcrSlot::try_from(1u32 << index)
}

fn pcr_selection_tss(indices: &[u8]) -> tss_esapi::Result<PcrSelectionList> {
    let slots = indices.iter().map(|&i| pcr_slot(i)).collect::<tss_esapi::Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new().with_selection(HashingAlgorithm::Sha256, &slots).build()
}

fn pcr_selection(indices: &[u8]) -> Result<PcrSelectionList, String> {
    pcr_selection_tss(indices).map_err(|e| format!("PCRs {}: {}", join(indices, ","), tss_error(&e)))
}

/// The TCG's SRK template (TPM v2.0 Provisioning Guidance), ECC NIST P-256.
fn storage_parent_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A sealed data object: usable with its authorization value alone (`policy` None), or only
/// through a session satisfying `policy`.
fn sealed_object_template(policy: Option<Digest>) -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_user_with_auth(policy.is_none())
        .with_admin_with_policy(policy.is_some())
        .build()?;
    let mut builder = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default());
    if let Some(policy) = policy {
        builder = builder.with_auth_policy(policy);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// A swtpm of the test's own on free TCP ports (command port P, control port P+1, as
    /// the swtpm TCTI expects), stopped on drop. The tests crate has the full harness; this
    /// crate cannot use it.
    struct TestTpm {
        dir: tempfile::TempDir,
        port: u16,
        /// swtpm's log of every command and response, in hex.
        wire_log: bool,
    }

    impl TestTpm {
        fn start() -> TestTpm {
            TestTpm::start_with(false)
        }

        fn start_with(wire_log: bool) -> TestTpm {
            let mut tpm = TestTpm { dir: tempfile::tempdir().unwrap(), port: 0, wire_log };
            std::fs::create_dir(tpm.dir.path().join("state")).unwrap();
            tpm.launch();
            tpm
        }

        fn tcti(&self) -> String {
            format!("swtpm:host=127.0.0.1,port={}", self.port)
        }

        fn launch(&mut self) {
            for _ in 0..100 {
                let seed = std::collections::hash_map::RandomState::new().build_hasher().finish();
                let port = 20_000 + (seed % 20_000) as u16 * 2;
                let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
                if !free(port) || !free(port + 1) {
                    continue;
                }
                let mut swtpm = Command::new("swtpm");
                swtpm.args(["socket", "--tpm2", "--daemon", "--flags", "not-need-init,startup-clear"]);
                if self.wire_log {
                    swtpm.arg("--log").arg(format!("file={},level=20", self.dir.path().join("wire.log").display()));
                }
                let out = swtpm
                    .arg("--server")
                    .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                    .arg("--ctrl")
                    .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                    .arg("--tpmstate")
                    .arg(format!("dir={}", self.dir.path().join("state").display()))
                    .arg("--pid")
                    .arg(format!("file={}", self.dir.path().join("pid").display()))
                    .output()
                    .expect("swtpm is not installed: run scripts/install-test-deps (Debian: swtpm swtpm-tools)");
                if out.status.success() {
                    self.port = port;
                    return;
                }
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains("in use"), "swtpm failed: {stderr}");
            }
            panic!("no free port pair for swtpm after 100 tries");
        }

        fn stop(&mut self) {
            let pid = std::fs::read_to_string(self.dir.path().join("pid")).unwrap_or_default();
            let _ = Command::new("swtpm_ioctl").args(["--tcp", &format!("127.0.0.1:{}", self.port + 1), "-s"]).output();
            let deadline = Instant::now() + Duration::from_secs(10);
            let alive = || {
                std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                    .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
            };
            while !pid.trim().is_empty() && alive() {
                if Instant::now() > deadline {
                    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        fn extend_pcr(&self, index: u8) {
            let out = Command::new("tpm2_pcrextend")
                .arg(format!("{index}:sha256={}", "ab".repeat(32)))
                .env("TPM2TOOLS_TCTI", self.tcti())
                .output()
                .expect("tpm2_pcrextend is not installed: run scripts/install-test-deps (Debian: tpm2-tools)");
            assert!(out.status.success(), "tpm2_pcrextend: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    impl Drop for TestTpm {
        fn drop(&mut self) {
            self.stop();
        }
    }

    const PASSPHRASE: &str = "correct horse battery staple";

    fn opts(tpm: &TestTpm, pcrs: &[u8], auth: Option<&[u8]>) -> TpmOptions {
        TpmOptions { tcti: tpm.tcti(), pcrs: pcrs.to_vec(), auth: auth.map(|a| Zeroizing::new(a.to_vec())) }
    }

    #[test]
    fn parse_pcrs_takes_lists_and_refuses_what_is_no_pcr() {
        assert_eq!(parse_pcrs("7").unwrap(), vec![7]);
        assert_eq!(parse_pcrs("7, 0,2").unwrap(), vec![0, 2, 7]);
        assert_eq!(parse_pcrs("none").unwrap(), Vec::<u8>::new());
        assert!(parse_pcrs("24").unwrap_err().contains("'24' is not a PCR index"));
        assert!(parse_pcrs("7,7").unwrap_err().contains("PCR 7 is listed twice"));
        assert!(parse_pcrs("7,").is_err());
        assert!(parse_pcrs("-1").is_err());
    }

    #[test]
    fn sealed_root_key_unseals_and_is_nowhere_on_disk() {
        let tpm = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("state");
        let key = KeyBytes::random();
        init(&dir, &opts(&tpm, &[], None), &key, PASSPHRASE).unwrap();
        assert_eq!(unseal(&dir, &tpm.tcti(), None).unwrap().expose(), key.expose());
        assert_eq!(describe(&dir, &tpm.tcti()), format!("tpm2 ({}, no PCR policy)", tpm.tcti()));
        let b64 = base64::engine::general_purpose::STANDARD.encode(key.expose());
        for name in [SEALED_FILE, RECOVERY_FILE] {
            let path = dir.join(name);
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "{name}");
            let bytes = fs::read(&path).unwrap();
            assert!(!bytes.windows(KEY_LEN).any(|w| w == key.expose()), "{name} holds the key");
            let text = String::from_utf8(bytes).unwrap();
            assert!(!text.contains(&b64) && !text.contains(&hex(key.expose())), "{name} holds the key");
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2, "only root.tpm and root.recovery");
        let again = init(&dir, &opts(&tpm, &[], None), &KeyBytes::random(), PASSPHRASE).unwrap_err();
        assert!(again.contains("already exists") && again.contains("kmsd reseal"), "{again}");
        assert_eq!(unseal(&dir, &tpm.tcti(), None).unwrap().expose(), key.expose());
        assert!(init(&state.path().join("other"), &opts(&tpm, &[], None), &key, "short").unwrap_err().contains("12"));
    }

    #[test]
    fn the_root_key_never_crosses_the_wire_in_clear() {
        let tpm = TestTpm::start_with(true);
        let state = tempfile::tempdir().unwrap();
        let key = KeyBytes::random();
        for (pcrs, auth) in [(&[][..], None), (&[7][..], Some(&b"auth"[..]))] {
            let dir = state.path().join(format!("{pcrs:?}"));
            init(&dir, &opts(&tpm, pcrs, auth), &key, PASSPHRASE).unwrap();
            assert_eq!(unseal(&dir, &tpm.tcti(), auth).unwrap().expose(), key.expose());
        }
        let log = fs::read_to_string(tpm.dir.path().join("wire.log")).unwrap();
        // "80 01 00 00 ..." lines of commands and responses, as one hex string.
        let wire: String = log
            .lines()
            .filter(|l| l.starts_with(' ') && l.split_whitespace().all(|w| w.len() == 2))
            .flat_map(|l| l.split_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        assert!(wire.len() > 2000, "swtpm logged no traffic: {log}");
        assert!(!wire.contains(&hex(&key.expose()[..8])), "the root key crossed the wire in clear");
    }

    #[test]
    fn a_changed_pcr_is_named_and_reseal_from_recovery_binds_the_new_values() {
        let mut tpm = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let key = KeyBytes::random();
        init(dir, &opts(&tpm, &[7, 0], None), &key, PASSPHRASE).unwrap();
        assert_eq!(describe(dir, &tpm.tcti()), format!("tpm2 ({}, PCRs 0,7)", tpm.tcti()));
        assert_eq!(unseal(dir, &tpm.tcti(), None).unwrap().expose(), key.expose());
        tpm.extend_pcr(7);
        let refused = unseal(dir, &tpm.tcti(), None).unwrap_err();
        assert!(refused.contains("PCR 7 has changed"), "{refused}");
        assert!(refused.contains("kmsd reseal --recovery-passphrase-file FILE"), "{refused}");
        assert!(refused.contains("Secure Boot"), "{refused}");
        let wrong = recover(dir, "not the passphrase at all").unwrap_err();
        assert!(wrong.contains("recovery passphrase does not open"), "{wrong}");
        let recovered = recover(dir, PASSPHRASE).unwrap();
        assert_eq!(recovered.expose(), key.expose());
        let recovery_before = fs::read(dir.join(RECOVERY_FILE)).unwrap();
        reseal(dir, &opts(&tpm, &[0, 7], None), &recovered, Some(PASSPHRASE)).unwrap();
        assert_eq!(fs::read(dir.join(RECOVERY_FILE)).unwrap(), recovery_before, "root.recovery is kept");
        assert_eq!(unseal(dir, &tpm.tcti(), None).unwrap().expose(), key.expose());
        // A restart resets PCR 7 to zero: the values sealed to are gone again.
        tpm.stop();
        tpm.launch();
        tpm.extend_pcr(0);
        let refused = unseal(dir, &tpm.tcti(), None).unwrap_err();
        assert!(refused.contains("PCRs 0, 7 have changed"), "{refused}");
    }

    #[test]
    fn an_altered_pcr_record_is_still_refused_by_the_tpm() {
        let tpm = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        init(dir, &opts(&tpm, &[7], None), &KeyBytes::random(), PASSPHRASE).unwrap();
        tpm.extend_pcr(7);
        // Someone records the new value, as if it were the one sealed to.
        let mut sealed = read_sealed(&dir.join(SEALED_FILE)).unwrap();
        let current = Tpm::open(&tpm.tcti()).unwrap().read_pcrs(&[7]).unwrap();
        sealed.pcrs[0].sha256 = hex(&current[0]);
        write_json(&dir.join(SEALED_FILE), &sealed).unwrap();
        let refused = unseal(dir, &tpm.tcti(), None).unwrap_err();
        assert!(refused.contains("refused the PCR policy") && refused.contains("altered"), "{refused}");
    }

    #[test]
    fn the_authorization_value_must_be_the_one_sealed_with() {
        let tpm = TestTpm::start();
        for pcrs in [&[][..], &[7][..]] {
            let state = tempfile::tempdir().unwrap();
            let dir = state.path();
            let key = KeyBytes::random();
            init(dir, &opts(&tpm, pcrs, Some(b"open sesame")), &key, PASSPHRASE).unwrap();
            assert!(describe(dir, &tpm.tcti()).ends_with(", authorization value)"));
            assert_eq!(unseal(dir, &tpm.tcti(), Some(b"open sesame")).unwrap().expose(), key.expose());
            for _ in 0..5 {
                // More than swtpm's lockout threshold: noDA, so no lockout.
                let wrong = unseal(dir, &tpm.tcti(), Some(b"open barley")).unwrap_err();
                assert!(wrong.contains("refused the authorization value"), "{pcrs:?}: {wrong}");
                assert!(wrong.contains("0x9a2"), "{pcrs:?}: no DA implications: {wrong}");
            }
            let missing = unseal(dir, &tpm.tcti(), None).unwrap_err();
            assert!(missing.contains("--tpm-auth-file"), "{missing}");
            assert_eq!(unseal(dir, &tpm.tcti(), Some(b"open sesame")).unwrap().expose(), key.expose());
        }
        let state = tempfile::tempdir().unwrap();
        init(state.path(), &opts(&tpm, &[], None), &KeyBytes::random(), PASSPHRASE).unwrap();
        let extra = unseal(state.path(), &tpm.tcti(), Some(b"x")).unwrap_err();
        assert!(extra.contains("sealed without an authorization value"), "{extra}");
        let too_long = init(&state.path().join("d"), &opts(&tpm, &[], Some(&[1; 33])), &KeyBytes::random(), PASSPHRASE);
        assert!(too_long.unwrap_err().contains("1 to 32 bytes"));
    }

    #[test]
    fn another_tpm_does_not_unseal_and_reseal_moves_the_key_to_it() {
        let first = TestTpm::start();
        let second = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let key = KeyBytes::random();
        init(dir, &opts(&first, &[], None), &key, PASSPHRASE).unwrap();
        let refused = unseal(dir, &second.tcti(), None).unwrap_err();
        assert!(refused.contains("sealed by another TPM") && refused.contains("0x1df"), "{refused}");
        assert!(refused.contains("kmsd reseal --recovery-passphrase-file FILE"), "{refused}");
        let recovered = recover(dir, PASSPHRASE).unwrap();
        reseal(dir, &opts(&second, &[], None), &recovered, None).unwrap();
        assert_eq!(unseal(dir, &second.tcti(), None).unwrap().expose(), key.expose());
        assert!(unseal(dir, &first.tcti(), None).unwrap_err().contains("another TPM"));
        assert_eq!(read_sealed(&dir.join(SEALED_FILE)).unwrap().tcti, second.tcti());
    }

    #[test]
    fn reseal_refuses_another_key_and_writes_recovery_only_when_missing() {
        let tpm = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let key = KeyBytes::random();
        // Migration from the file backend: no root.recovery yet.
        let no_passphrase = reseal(dir, &opts(&tpm, &[7], None), &key, None).unwrap_err();
        assert!(no_passphrase.contains("root.recovery is missing"), "{no_passphrase}");
        assert_eq!(fs::read_dir(dir).unwrap().count(), 0, "nothing written");
        reseal(dir, &opts(&tpm, &[7], None), &key, Some(PASSPHRASE)).unwrap();
        assert_eq!(unseal(dir, &tpm.tcti(), None).unwrap().expose(), key.expose());
        assert_eq!(recover(dir, PASSPHRASE).unwrap().expose(), key.expose());
        let sealed_before = fs::read(dir.join(SEALED_FILE)).unwrap();
        let other = reseal(dir, &opts(&tpm, &[], None), &KeyBytes::random(), None).unwrap_err();
        assert!(other.contains("not the one"), "{other}");
        let wrong = reseal(dir, &opts(&tpm, &[], None), &key, Some("not the passphrase at all")).unwrap_err();
        assert!(wrong.contains("recovery passphrase does not open"), "{wrong}");
        assert_eq!(fs::read(dir.join(SEALED_FILE)).unwrap(), sealed_before, "nothing changed");
        // New settings: no PCRs, an authorization value.
        reseal(dir, &opts(&tpm, &[], Some(b"secret")), &key, None).unwrap();
        assert!(unseal(dir, &tpm.tcti(), None).is_err());
        assert_eq!(unseal(dir, &tpm.tcti(), Some(b"secret")).unwrap().expose(), key.expose());
    }

    #[test]
    fn an_unreachable_tpm_is_named() {
        let tpm = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        init(state.path(), &opts(&tpm, &[], None), &KeyBytes::random(), PASSPHRASE).unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let tcti = format!("swtpm:host=127.0.0.1,port={closed}");
        let refused = unseal(state.path(), &tcti, None).unwrap_err();
        assert!(refused.contains(&format!("cannot reach the TPM through TCTI '{tcti}'")), "{refused}");
        let bogus = unseal(state.path(), "tpm0", None).unwrap_err();
        assert!(bogus.contains("'tpm0' is not a TCTI"), "{bogus}");
        let missing = unseal(state.path(), "device:/nonexistent/tpmrm0", None).unwrap_err();
        assert!(missing.contains("device:/nonexistent/tpmrm0"), "{missing}");
    }

    #[test]
    fn transient_objects_left_behind_do_not_block_unsealing() {
        let tpm = TestTpm::start();
        let state = tempfile::tempdir().unwrap();
        let key = KeyBytes::random();
        init(state.path(), &opts(&tpm, &[7], None), &key, PASSPHRASE).unwrap();
        // tpm2-tools leaves its primaries loaded in a TPM without a resource manager.
        let ctx = tempfile::tempdir().unwrap();
        for i in 0..3 {
            let out = Command::new("tpm2_createprimary")
                .args(["-C", "o", "-c"])
                .arg(ctx.path().join(format!("{i}.ctx")))
                .env("TPM2TOOLS_TCTI", tpm.tcti())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        for _ in 0..5 {
            assert_eq!(unseal(state.path(), &tpm.tcti(), None).unwrap().expose(), key.expose());
        }
    }
}
