//! The `pkcs11` root of trust: each key version's material is an AES-256 secret-key object
//! inside a PKCS#11 token (an HSM; tested with SoftHSM2), generated there (or, for
//! ImportKeyMaterial, created there from the given bytes), sensitive and never extractable.
//! The agent stores only a reference to the object and never holds the material: every
//! seal and open is an AES-256-GCM operation in the token (ciphertext blob format 2, see
//! `kmsfs_common::blob`), under a random 96-bit IV drawn by the agent.
//!
//! The stored reference is `0x01 ‖ CKA_ID` (16 random bytes, [`REFERENCE_LEN`] in all).
//! The object's CKA_LABEL is `kmsd <key-id> v<version>`, and `load` checks it (and that the
//! object is a sensitive, non-extractable AES key), so a reference moved to another key or
//! version is refused.
//!
//! Connections. A module is loaded and `C_Initialize`d once per process, in a registry
//! keyed by its canonical path, however many of its tokens are connected (one kmsd may hold
//! its own root of trust and several custom key stores of one module). A [`Token`] finds
//! its slot by label (slot IDs change between runs), logs in, and keeps a pool of
//! read-write sessions: a session serves one thread at a time, and a new one is opened
//! (and logged in; `CKR_USER_ALREADY_LOGGED_IN` is success) when the pool is empty, so
//! concurrent requests run in the token concurrently with no lock around token calls.
//! A session found lost (closed, logged out, token removed) empties the pool, and the
//! operation is retried once on a fresh session after the slot is found by label again.
//! Each material caches its object handle, and finds the object by CKA_ID again after a
//! reconnect or a `CKR_OBJECT_HANDLE_INVALID`.
//!
//! A token that disappears while serving fails the requests on its keys with
//! `KMSInternalException` naming it, and never with a wrong answer: a failed decryption is
//! reported as `InvalidCiphertextException` only after the session and the token are seen
//! to be alive. SoftHSM2 notices `softhsm2-util --delete-token` at once (the object handles
//! become invalid, the token's info fails); it lists only the tokens present at
//! `C_Initialize`, so a token created or re-created later is seen only once the module is
//! initialized again, which [`Token::connect`] does when none of the module's tokens is
//! connected.
//!
//! Limits, decided: an application's sessions with a token share one login, so a second
//! [`Token`] connected to a token this process is already logged in to is not checked
//! against its PIN. A token without CKM_AES_GCM is refused at connect; a fallback (AES-CBC
//! and an HMAC, both in the token) would need a blob format of its own. Session-object
//! copies of the keys would make SoftHSM2 about 5x faster (it checks a token object against
//! its file at each use: ~20 µs per C_Encrypt, ~4 µs on a session object) but keep working
//! after the token is deleted there, so they are not used.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismInfo, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use kmsfs_common::aead::{random_bytes, KeyBytes, KEY_LEN, TAG_LEN};
use kmsfs_common::blob::{self, CiphertextBlob, GCM_IV_LEN, VERSION_TOKEN_GCM};
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::ids::KeyId;
use kmsfs_common::KmsError;
use zeroize::{Zeroize, Zeroizing};

use super::{KeyMaterial, RootOfTrust};

/// The first byte of a stored reference: its format.
const REFERENCE_FORMAT: u8 = 1;
/// Length of the random CKA_ID that names a key version's object.
const OBJECT_ID_LEN: usize = 16;
/// Length of a stored reference: format byte ‖ CKA_ID.
pub const REFERENCE_LEN: usize = 1 + OBJECT_ID_LEN;
const GCM_TAG_BITS: u64 = (TAG_LEN * 8) as u64;

/// Whether a mechanism's info allows the use kmsd makes of it.
type Allows = fn(&MechanismInfo) -> bool;

/// The mechanisms kmsd needs from a token, what for, and the use it must allow.
const REQUIRED_MECHANISMS: [(MechanismType, &str, &str, Allows); 2] = [
    (
        MechanismType::AES_KEY_GEN,
        "CKM_AES_KEY_GEN",
        "generate AES-256 key material in the token",
        MechanismInfo::generate,
    ),
    (MechanismType::AES_GCM, "CKM_AES_GCM", "encrypt and decrypt in the token (ciphertext blob format 2)", |info| {
        info.encrypt() && info.decrypt()
    }),
];

/// Where a token is and how to log in to it.
#[derive(Clone)]
pub struct TokenConfig {
    /// The PKCS#11 module (a shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label, by which its slot is found.
    pub token_label: String,
    /// The user PIN.
    pub pin: Zeroizing<String>,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

/// Why a token could not be connected. `Display` is a message for the operator: the
/// variants with a text name the module and the label; the PIN variants name the token's
/// answer, and the caller names the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The module could not be loaded or initialized.
    ModuleNotLoaded(String),
    /// The module has no initialized token with that label.
    TokenNotFound(String),
    /// The token refused the PIN.
    IncorrectPin,
    /// The token's user PIN is locked.
    PinLocked,
    /// The token's user PIN was never set.
    PinNotInitialized,
    /// The token lacks a mechanism kmsd needs.
    MechanismMissing(String),
    Other(String),
}

impl ConnectError {
    /// AWS's `ConnectionErrorCode` for a custom key store that failed to connect this way.
    pub fn connection_error_code(&self) -> &'static str {
        match self {
            ConnectError::ModuleNotLoaded(_) | ConnectError::Other(_) | ConnectError::MechanismMissing(_) => {
                "INTERNAL_ERROR"
            }
            ConnectError::TokenNotFound(_) => "INSUFFICIENT_CLOUDHSM_HSMS",
            ConnectError::IncorrectPin => "INVALID_CREDENTIALS",
            ConnectError::PinLocked => "USER_LOCKED_OUT",
            ConnectError::PinNotInitialized => "USER_NOT_FOUND",
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::ModuleNotLoaded(message)
            | ConnectError::TokenNotFound(message)
            | ConnectError::MechanismMissing(message)
            | ConnectError::Other(message) => f.write_str(message),
            ConnectError::IncorrectPin => f.write_str("the token refused the user PIN (CKR_PIN_INCORRECT)"),
            ConnectError::PinLocked => {
                f.write_str("the token's user PIN is locked (CKR_PIN_LOCKED): its security officer must reset it")
            }
            ConnectError::PinNotInitialized => f.write_str(
                "the token's user PIN is not initialized (CKR_USER_PIN_NOT_INITIALIZED): its security officer must \
                 set it",
            ),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A loaded and initialized module, and how many connected [`Token`]s use it.
struct Module {
    pkcs11: Pkcs11,
    tokens: usize,
}

/// The process's modules by canonical path: `C_Initialize` may happen once per module.
fn modules() -> MutexGuard<'static, HashMap<PathBuf, Module>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    lock(MODULES.get_or_init(Default::default))
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a plain read or replacement).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn initialize(pkcs11: &Pkcs11) -> Result<(), P11Error> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A PKCS#11 error as an operator reads it: `C_EncryptInit returned CKR_KEY_HANDLE_INVALID`.
fn describe_error(error: &P11Error) -> String {
    match error {
        P11Error::Pkcs11(rv, function) => format!("C_{function:?} returned {}", rv_name(rv)),
        other => other.to_string(),
    }
}

/// `CKR_USER_PIN_NOT_INITIALIZED` for `RvError::UserPinNotInitialized`.
fn rv_name(rv: &RvError) -> String {
    let debug = format!("{rv:?}");
    if !debug.chars().all(|c| c.is_ascii_alphanumeric()) {
        return debug;
    }
    let mut name = String::from("CKR");
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// Why no slot was found for a label.
enum SlotSearch {
    /// No initialized token has the label; these labels were seen.
    NotFound(Vec<String>),
    Ambiguous(usize),
    Failed(P11Error),
}

impl SlotSearch {
    fn message(&self, label: &str, module: &Path) -> String {
        match self {
            SlotSearch::NotFound(seen) if seen.is_empty() => {
                format!(
                    "no initialized token labelled '{label}' in the PKCS#11 module {} (it has none)",
                    module.display()
                )
            }
            SlotSearch::NotFound(seen) => format!(
                "no initialized token labelled '{label}' in the PKCS#11 module {} (it has {})",
                module.display(),
                seen.iter().map(|l| format!("'{l}'")).collect::<Vec<_>>().join(", ")
            ),
            SlotSearch::Ambiguous(n) => {
                format!(
                    "{n} tokens are labelled '{label}' in the PKCS#11 module {}: relabel all but one",
                    module.display()
                )
            }
            SlotSearch::Failed(e) => {
                format!("cannot list the slots of the PKCS#11 module {}: {}", module.display(), describe_error(e))
            }
        }
    }
}

/// The slot whose token is labelled `label`.
fn find_slot(pkcs11: &Pkcs11, label: &str) -> Result<Slot, SlotSearch> {
    let slots = pkcs11.get_slots_with_token().map_err(SlotSearch::Failed)?;
    let mut seen = Vec::new();
    let mut found = Vec::new();
    for slot in slots {
        // A token deleted under the module (SoftHSM2) stays listed, but its info fails.
        let Ok(info) = pkcs11.get_token_info(slot) else { continue };
        if !info.token_initialized() {
            continue;
        }
        if info.label() == label {
            found.push(slot);
        } else {
            seen.push(info.label().to_string());
        }
    }
    match found[..] {
        [slot] => Ok(slot),
        [] => Err(SlotSearch::NotFound(seen)),
        _ => Err(SlotSearch::Ambiguous(found.len())),
    }
}

/// The first of [`REQUIRED_MECHANISMS`] that `offers` (whether the token offers a
/// mechanism for the use kmsd needs) denies, with its purpose. (Asked one by one: cryptoki
/// logs an error for each mechanism of a full list that it does not know.)
fn missing_mechanism(
    offers: impl Fn(MechanismType, Allows) -> Result<bool, P11Error>,
) -> Result<Option<(&'static str, &'static str)>, P11Error> {
    for (mechanism, name, purpose, uses) in REQUIRED_MECHANISMS {
        if !offers(mechanism, uses)? {
            return Ok(Some((name, purpose)));
        }
    }
    Ok(None)
}

/// Why a session could not be opened.
enum OpenError {
    Session(P11Error),
    Login(P11Error),
}

/// A session taken from the pool, with the slot and pool epoch it was opened in.
struct Lease {
    session: Session,
    slot: Slot,
    epoch: u64,
}

/// A token's sessions. `epoch` changes whenever the pool is emptied because a session
/// was lost (and on close), so that sessions and object handles from before are dropped.
struct Pool {
    slot: Option<Slot>,
    idle: Vec<Session>,
    epoch: u64,
    closed: bool,
}

/// How one attempt of an operation in the token failed.
enum Failure {
    /// The session, its login or the token is gone: reconnect and retry once.
    Lost(String),
    /// The object handle is no longer valid: find the object again and retry once.
    Stale(String),
    /// The token refused the operation; trying again would not help.
    Refused(String),
    /// A final answer for the caller (InvalidCiphertextException, missing material).
    Answer(KmsError),
}

fn classify(error: &P11Error) -> Failure {
    let detail = describe_error(error);
    match error {
        P11Error::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _) => Failure::Stale(detail),
        P11Error::Pkcs11(
            RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::UserNotLoggedIn
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized
            | RvError::GeneralError
            | RvError::FunctionFailed,
            _,
        ) => Failure::Lost(detail),
        _ => Failure::Refused(detail),
    }
}

/// A connected PKCS#11 token: its module, its slot (found by label) and a pool of
/// logged-in sessions.
pub struct Token {
    pkcs11: Pkcs11,
    /// The module as configured (for messages) and canonical (the registry's key).
    module: PathBuf,
    canonical: PathBuf,
    label: String,
    pin: Zeroizing<String>,
    pool: Mutex<Pool>,
    /// Whether this token no longer counts as a user of its module (closed or dropped).
    released: AtomicBool,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Token {
    /// Loads the module (once per process), finds the token by label, checks that it has
    /// the mechanisms kmsd needs, and logs in.
    pub fn connect(config: &TokenConfig) -> Result<Arc<Token>, ConnectError> {
        let module = &config.module;
        let label = config.token_label.as_str();
        let not_loaded = |why: String| ConnectError::ModuleNotLoaded(format!("cannot load the PKCS#11 module {why}"));
        let canonical = module.canonicalize().map_err(|e| not_loaded(format!("{}: {e}", module.display())))?;
        let mut registry = modules();
        let (pkcs11, fresh) = match registry.get(&canonical) {
            Some(loaded) => (loaded.pkcs11.clone(), false),
            None => {
                let pkcs11 = Pkcs11::new(&canonical).map_err(|e| not_loaded(format!("{}: {e}", module.display())))?;
                initialize(&pkcs11).map_err(|e| not_loaded(format!("{}: {}", module.display(), describe_error(&e))))?;
                registry.insert(canonical.clone(), Module { pkcs11: pkcs11.clone(), tokens: 0 });
                (pkcs11, true)
            }
        };
        let mut found = find_slot(&pkcs11, label);
        let idle = registry.get(&canonical).is_some_and(|m| m.tokens == 0);
        if matches!(found, Err(SlotSearch::NotFound(_))) && !fresh && idle {
            // Some modules (SoftHSM2) list only the tokens present at C_Initialize; none of
            // this one's tokens is in use, so initialize it again to see tokens added since.
            tracing::debug!("re-initializing {} to look for token '{label}'", module.display());
            pkcs11.clone().finalize().map_err(|e| ConnectError::Other(describe_error(&e)))?;
            initialize(&pkcs11).map_err(|e| not_loaded(format!("{}: {}", module.display(), describe_error(&e))))?;
            found = find_slot(&pkcs11, label);
        }
        let slot = found.map_err(|e| match e {
            SlotSearch::NotFound(_) => ConnectError::TokenNotFound(e.message(label, module)),
            _ => ConnectError::Other(e.message(label, module)),
        })?;
        let other = |what: &str, e: &P11Error| {
            ConnectError::Other(format!(
                "cannot {what} of the PKCS#11 token '{label}' ({}): {}",
                module.display(),
                describe_error(e)
            ))
        };
        let offers = |mechanism, uses: Allows| match pkcs11.get_mechanism_info(slot, mechanism) {
            Ok(info) => Ok(uses(&info)),
            Err(P11Error::Pkcs11(RvError::MechanismInvalid, _)) => Ok(false),
            Err(e) => Err(e),
        };
        if let Some((name, purpose)) = missing_mechanism(offers).map_err(|e| other("read the mechanisms", &e))? {
            return Err(ConnectError::MechanismMissing(format!(
                "the PKCS#11 token '{label}' ({}) does not offer {name}, which kmsd needs to {purpose}",
                module.display()
            )));
        }
        let info = pkcs11.get_token_info(slot).map_err(|e| other("read the token info", &e))?;
        if info.user_pin_locked() {
            return Err(ConnectError::PinLocked);
        }
        if !info.user_pin_initialized() {
            return Err(ConnectError::PinNotInitialized);
        }
        if let Some(entry) = registry.get_mut(&canonical) {
            entry.tokens += 1;
        }
        drop(registry);
        let token = Arc::new(Token {
            pkcs11,
            module: module.clone(),
            canonical,
            label: label.to_string(),
            pin: config.pin.clone(),
            pool: Mutex::new(Pool { slot: Some(slot), idle: Vec::new(), epoch: 0, closed: false }),
            released: AtomicBool::new(false),
        });
        let session = token.open_session(slot).map_err(|e| match e {
            OpenError::Session(e) => other("open a session", &e),
            OpenError::Login(P11Error::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => ConnectError::IncorrectPin,
            OpenError::Login(P11Error::Pkcs11(RvError::PinLocked, _)) => ConnectError::PinLocked,
            OpenError::Login(P11Error::Pkcs11(RvError::UserPinNotInitialized, _)) => ConnectError::PinNotInitialized,
            OpenError::Login(e) => other("log in to", &e),
        })?;
        token.release(Lease { session, slot, epoch: 0 });
        tracing::info!("connected to {}", token.describe());
        Ok(token)
    }

    /// A short description for logs: `pkcs11 (token 'kms', /usr/lib/softhsm/libsofthsm2.so)`.
    pub fn describe(&self) -> String {
        format!("pkcs11 (token '{}', {})", self.label, self.module.display())
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The module, as configured.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Closes every session (closing an application's last session with a token ends its
    /// login, PKCS#11 §5.6; sessions in use are closed when their operation returns, and
    /// another [`Token`] of the same token keeps its own). Any later use of this token or of
    /// its materials fails with `KMSInternalException`; connect again to use the token.
    pub fn close(&self) {
        let idle = {
            let mut pool = lock(&self.pool);
            pool.closed = true;
            pool.epoch += 1;
            pool.slot = None;
            std::mem::take(&mut pool.idle)
        };
        discard(idle);
        self.release_module();
        tracing::info!("disconnected from {}", self.describe());
    }

    /// Stops counting as a user of the module (once).
    fn release_module(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Some(module) = modules().get_mut(&self.canonical) {
                module.tokens = module.tokens.saturating_sub(1);
            }
        }
    }

    /// Opens a read-write session on `slot` and logs it in.
    fn open_session(&self, slot: Slot) -> Result<Session, OpenError> {
        let session = self.pkcs11.open_rw_session(slot).map_err(OpenError::Session)?;
        let pin = AuthPin::from(self.pin.as_str());
        match session.login(UserType::User, Some(&pin)) {
            // Login state is shared by all of the application's sessions with the token.
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => Err(OpenError::Login(e)),
        }
    }

    fn disconnected(&self, what: &str) -> KmsError {
        KmsError::internal(format!(
            "the PKCS#11 token '{}' ({}) is disconnected: cannot {what}",
            self.label,
            self.module.display()
        ))
    }

    fn unreachable(&self, what: &str, detail: &str) -> KmsError {
        KmsError::internal(format!(
            "the PKCS#11 token '{}' ({}) cannot be reached to {what}: {detail}",
            self.label,
            self.module.display()
        ))
    }

    /// A session from the pool, or a new one (finding the slot again after a loss).
    fn acquire(&self, what: &dyn Fn() -> String) -> Result<Lease, KmsError> {
        let (slot, epoch) = {
            let mut pool = lock(&self.pool);
            if pool.closed {
                return Err(self.disconnected(&what()));
            }
            if let Some(session) = pool.idle.pop() {
                if let Some(slot) = pool.slot {
                    return Ok(Lease { session, slot, epoch: pool.epoch });
                }
            }
            (pool.slot, pool.epoch)
        };
        let slot = match slot {
            Some(slot) => slot,
            None => {
                let slot = find_slot(&self.pkcs11, &self.label).map_err(|e| {
                    // Unlike at connect, other tokens are not listed: the message goes to a client.
                    let why = match e {
                        SlotSearch::NotFound(_) => "no slot holds it any more".to_string(),
                        other => other.message(&self.label, &self.module),
                    };
                    self.unreachable(&what(), &why)
                })?;
                let mut pool = lock(&self.pool);
                if pool.epoch == epoch && !pool.closed {
                    pool.slot = Some(slot);
                }
                slot
            }
        };
        let session = self.open_session(slot).map_err(|e| match e {
            OpenError::Session(e) => self.unreachable(&what(), &describe_error(&e)),
            OpenError::Login(e) => KmsError::internal(format!(
                "the PKCS#11 token '{}' ({}) refused the login to {}: {}",
                self.label,
                self.module.display(),
                what(),
                describe_error(&e)
            )),
        })?;
        Ok(Lease { session, slot, epoch })
    }

    /// Returns a session to the pool, unless the pool has moved on (or is closed).
    fn release(&self, lease: Lease) {
        let mut pool = lock(&self.pool);
        if !pool.closed && pool.epoch == lease.epoch {
            pool.idle.push(lease.session);
            return;
        }
        drop(pool);
        discard([lease.session]);
    }

    /// Empties the pool after a session of `epoch` was found lost, so that every session
    /// is opened afresh (and the slot found again by label).
    fn reset(&self, epoch: u64, detail: &str) {
        let idle = {
            let mut pool = lock(&self.pool);
            if pool.epoch != epoch || pool.closed {
                return;
            }
            pool.epoch += 1;
            pool.slot = None;
            std::mem::take(&mut pool.idle)
        };
        tracing::warn!("lost a session with {} ({detail}); reconnecting", self.describe());
        discard(idle);
    }

    /// Whether the lease's session is still logged in and its slot still holds this token.
    fn alive(&self, lease: &Lease) -> Result<(), String> {
        let info = lease.session.get_session_info().map_err(|e| describe_error(&e))?;
        if !matches!(info.session_state(), SessionState::RwUser) {
            return Err("the session is no longer logged in".into());
        }
        let token = self.pkcs11.get_token_info(lease.slot).map_err(|e| describe_error(&e))?;
        if token.label() != self.label {
            return Err(format!("its slot now holds the token '{}'", token.label()));
        }
        Ok(())
    }

    /// Runs `op` on a pooled session; if the session turns out lost or the object handle
    /// stale, once more on a fresh session (the same `op`, so it must be safe to repeat).
    /// `what` completes "cannot … " in messages.
    fn run<T>(
        &self,
        what: &dyn Fn() -> String,
        mut op: impl FnMut(&Lease) -> Result<T, Failure>,
    ) -> Result<T, KmsError> {
        let mut retried = false;
        loop {
            let lease = self.acquire(what)?;
            let failure = match op(&lease) {
                Ok(value) => {
                    self.release(lease);
                    return Ok(value);
                }
                // A handle gone stale because the session lost its login is a lost session.
                Err(Failure::Stale(detail)) => match self.alive(&lease) {
                    Ok(()) => Failure::Stale(detail),
                    Err(why) => Failure::Lost(format!("{detail}; {why}")),
                },
                Err(other) => other,
            };
            match failure {
                Failure::Answer(e) => {
                    self.release(lease);
                    return Err(e);
                }
                Failure::Refused(detail) => {
                    self.release(lease);
                    return Err(KmsError::internal(format!(
                        "the PKCS#11 token '{}' ({}) refused to {}: {detail}",
                        self.label,
                        self.module.display(),
                        what()
                    )));
                }
                Failure::Stale(detail) => {
                    self.release(lease);
                    if retried {
                        return Err(self.unreachable(&what(), &detail));
                    }
                }
                Failure::Lost(detail) => {
                    let epoch = lease.epoch;
                    discard([lease.session]);
                    self.reset(epoch, &detail);
                    if retried {
                        return Err(self.unreachable(&what(), &detail));
                    }
                }
            }
            retried = true;
        }
    }

    /// Fills `out` from the token's random number generator (GenerateRandom with a
    /// `CustomKeyStoreId`).
    pub fn generate_random(&self, out: &mut [u8]) -> Result<(), KmsError> {
        let what = || format!("generate {} random bytes", out.len());
        let mut buf = Zeroizing::new(vec![0u8; out.len()]);
        self.run(&what, |lease| lease.session.generate_random_slice(&mut buf).map_err(|e| classify(&e)))?;
        out.copy_from_slice(&buf);
        Ok(())
    }

    /// The secret-key objects with CKA_ID `object_id`.
    fn find_by_id(&self, lease: &Lease, object_id: &[u8; OBJECT_ID_LEN]) -> Result<Vec<ObjectHandle>, Failure> {
        lease
            .session
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Id(object_id.to_vec())])
            .map_err(|e| classify(&e))
    }

    /// `message` as the answer if the token is alive, else the token is lost (a token that
    /// vanished shows no objects: that is no proof the object is gone).
    fn missing(&self, lease: &Lease, message: impl FnOnce() -> String) -> Failure {
        match self.alive(lease) {
            Ok(()) => Failure::Answer(KmsError::internal(message())),
            Err(why) => Failure::Lost(why),
        }
    }

    /// Finds version `version` of `key_id`'s object and checks that it is that version's
    /// (its label) and that it is a sensitive, non-extractable AES key.
    fn find_material(
        &self,
        lease: &Lease,
        key_id: &KeyId,
        version: u32,
        object_id: &[u8; OBJECT_ID_LEN],
    ) -> Result<ObjectHandle, Failure> {
        let handle = match self.find_by_id(lease, object_id)?[..] {
            [handle] => handle,
            [] => {
                return Err(self.missing(lease, || {
                    format!(
                        "the key material of key {key_id} version {version} (CKA_ID {}) is not in the PKCS#11 token \
                         '{}'",
                        kmsfs_common::format::hex(object_id),
                        self.label
                    )
                }))
            }
            ref several => {
                return Err(Failure::Answer(KmsError::internal(format!(
                    "{} objects in the PKCS#11 token '{}' have the CKA_ID of key {key_id} version {version}",
                    several.len(),
                    self.label
                ))))
            }
        };
        let attributes = lease
            .session
            .get_attributes(
                handle,
                &[AttributeType::Label, AttributeType::KeyType, AttributeType::Sensitive, AttributeType::Extractable],
            )
            .map_err(|e| classify(&e))?;
        let expected = object_label(key_id, version);
        let mut protected = (false, false, false);
        for attribute in &attributes {
            match attribute {
                Attribute::Label(label) if label[..] != *expected.as_bytes() => {
                    return Err(Failure::Answer(KmsError::internal(format!(
                        "the PKCS#11 object stored as key {key_id} version {version} is labelled '{}', not \
                         '{expected}': the stored reference belongs to another key or version",
                        String::from_utf8_lossy(label)
                    ))));
                }
                Attribute::KeyType(key_type) => protected.0 = *key_type == KeyType::AES,
                Attribute::Sensitive(sensitive) => protected.1 = *sensitive,
                Attribute::Extractable(extractable) => protected.2 = !*extractable,
                _ => {}
            }
        }
        if !attributes.iter().any(|a| matches!(a, Attribute::Label(_))) || protected != (true, true, true) {
            return Err(Failure::Answer(KmsError::internal(format!(
                "the PKCS#11 object stored as key {key_id} version {version} is not a labelled, sensitive, \
                 non-extractable AES key: refusing to use it"
            ))));
        }
        Ok(handle)
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.release_module();
    }
}

/// Closes sessions that are no longer wanted. Closing a lost session may fail, as
/// expected: closing explicitly keeps cryptoki from logging that as an error on drop.
fn discard(sessions: impl IntoIterator<Item = Session>) {
    for session in sessions {
        let _ = session.close();
    }
}

/// The CKA_LABEL of version `version` of `key_id`'s object.
fn object_label(key_id: &KeyId, version: u32) -> String {
    format!("kmsd {key_id} v{version}")
}

/// The template of a key version's object: an AES key on the token, private, sensitive,
/// never extractable, for encryption and decryption only, unmodifiable.
fn object_template(object_id: &[u8; OBJECT_ID_LEN], label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(object_id.to_vec()),
    ]
}

/// A template holding key material (`CKA_VALUE`), wiped on drop.
struct SecretTemplate(Vec<Attribute>);

impl Drop for SecretTemplate {
    fn drop(&mut self) {
        for attribute in &mut self.0 {
            if let Attribute::Value(value) = attribute {
                value.zeroize();
            }
        }
    }
}

fn parse_reference(key_id: &KeyId, version: u32, stored: &[u8]) -> Result<[u8; OBJECT_ID_LEN], KmsError> {
    match stored.split_first() {
        Some((&REFERENCE_FORMAT, id)) => id.try_into().ok(),
        _ => None,
    }
    .ok_or_else(|| {
        KmsError::internal(format!(
            "the stored material of key {key_id} version {version} is not a PKCS#11 object reference ({} bytes)",
            stored.len()
        ))
    })
}

fn reference(object_id: &[u8; OBJECT_ID_LEN]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(REFERENCE_LEN);
    stored.push(REFERENCE_FORMAT);
    stored.extend_from_slice(object_id);
    stored
}

/// A key version's material: a reference to its object in the token, and the object's
/// handle once found.
struct TokenKey {
    token: Arc<Token>,
    key_id: KeyId,
    version: u32,
    object_id: [u8; OBJECT_ID_LEN],
    /// The object's handle and the pool epoch it was found in.
    handle: Mutex<Option<(u64, ObjectHandle)>>,
}

impl TokenKey {
    fn new(
        token: &Arc<Token>,
        key_id: &KeyId,
        version: u32,
        object_id: [u8; OBJECT_ID_LEN],
        found: (u64, ObjectHandle),
    ) -> Arc<TokenKey> {
        Arc::new(TokenKey {
            token: token.clone(),
            key_id: *key_id,
            version,
            object_id,
            handle: Mutex::new(Some(found)),
        })
    }

    /// The object's handle in the lease's epoch: cached, or found again by CKA_ID.
    fn handle(&self, lease: &Lease) -> Result<ObjectHandle, Failure> {
        if let Some((epoch, handle)) = *lock(&self.handle) {
            if epoch == lease.epoch {
                return Ok(handle);
            }
        }
        let handle = self.token.find_material(lease, &self.key_id, self.version, &self.object_id)?;
        *lock(&self.handle) = Some((lease.epoch, handle));
        Ok(handle)
    }

    /// `classify`, forgetting the cached handle when it is stale.
    fn failed(&self, error: &P11Error) -> Failure {
        let failure = classify(error);
        if matches!(failure, Failure::Stale(_)) {
            *lock(&self.handle) = None;
        }
        failure
    }
}

impl KeyMaterial for TokenKey {
    fn seal(
        &self,
        key_id: &KeyId,
        version: u32,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KmsError> {
        let mut iv = [0u8; GCM_IV_LEN];
        random_bytes(&mut iv);
        let header = blob::header(VERSION_TOKEN_GCM, key_id, version);
        let aad = blob::aad(&header, context);
        let what = || format!("encrypt under key {key_id} version {version}");
        // A retry repeats the same IV with the same plaintext and AAD: the same ciphertext.
        let (iv, sealed) = self.token.run(&what, |lease| {
            let handle = self.handle(lease)?;
            let mut used = iv;
            let params =
                GcmParams::new(&mut used, &aad, GCM_TAG_BITS.into()).map_err(|e| Failure::Refused(e.to_string()))?;
            let sealed =
                lease.session.encrypt(&Mechanism::AesGcm(params), handle, plaintext).map_err(|e| self.failed(&e))?;
            // A token may write the IV it used back into the parameters.
            Ok((used, sealed))
        })?;
        if sealed.len() != plaintext.len() + TAG_LEN {
            return Err(KmsError::internal(format!(
                "the PKCS#11 token '{}' returned {} bytes of AES-GCM output for {} bytes of plaintext",
                self.token.label,
                sealed.len(),
                plaintext.len()
            )));
        }
        let mut out = header;
        out.reserve(GCM_IV_LEN + sealed.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn open(&self, blob: &CiphertextBlob<'_>, context: &EncryptionContext) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        if blob.version() != VERSION_TOKEN_GCM {
            return Err(KmsError::invalid_ciphertext());
        }
        let iv: [u8; GCM_IV_LEN] = blob.nonce().try_into().map_err(|_| KmsError::invalid_ciphertext())?;
        let aad = blob.aad(context);
        let mut sealed = Vec::with_capacity(blob.ciphertext().len() + TAG_LEN);
        sealed.extend_from_slice(blob.ciphertext());
        sealed.extend_from_slice(blob.tag());
        let what = || format!("decrypt under key {} version {}", blob.key_id, blob.material_version);
        let plaintext = self.token.run(&what, |lease| {
            let handle = self.handle(lease)?;
            let mut iv = iv;
            let params =
                GcmParams::new(&mut iv, &aad, GCM_TAG_BITS.into()).map_err(|e| Failure::Refused(e.to_string()))?;
            match lease.session.decrypt(&Mechanism::AesGcm(params), handle, &sealed) {
                Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
                // A tag that does not verify: CKR_ENCRYPTED_DATA_INVALID, or (SoftHSM2)
                // CKR_GENERAL_ERROR — which is the ciphertext's fault only if the token is fine.
                Err(
                    e @ P11Error::Pkcs11(
                        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::GeneralError,
                        Function::Decrypt,
                    ),
                ) => match self.token.alive(lease) {
                    Ok(()) => Err(Failure::Answer(KmsError::invalid_ciphertext())),
                    Err(why) => Err(Failure::Lost(format!("{}; {why}", describe_error(&e)))),
                },
                Err(e) => Err(self.failed(&e)),
            }
        })?;
        if plaintext.len() != blob.ciphertext().len() {
            return Err(KmsError::internal(format!(
                "the PKCS#11 token '{}' returned {} bytes of AES-GCM plaintext for {} bytes of ciphertext",
                self.token.label,
                plaintext.len(),
                blob.ciphertext().len()
            )));
        }
        Ok(plaintext)
    }
}

/// The `pkcs11` root of trust: key material in objects of one connected [`Token`].
pub struct Pkcs11Root {
    token: Arc<Token>,
}

impl Pkcs11Root {
    pub fn new(token: Arc<Token>) -> Pkcs11Root {
        Pkcs11Root { token }
    }

    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// Creates the object of version `version` of `key_id` with `create` (given the
    /// session and the new object's CKA_ID and label), idempotently across the retry.
    fn create(
        &self,
        key_id: &KeyId,
        version: u32,
        what: &dyn Fn() -> String,
        create: impl Fn(&Session, &[u8; OBJECT_ID_LEN], &str) -> Result<ObjectHandle, P11Error>,
    ) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        let mut object_id = [0u8; OBJECT_ID_LEN];
        random_bytes(&mut object_id);
        let label = object_label(key_id, version);
        let mut attempt = 0;
        let found = self.token.run(what, |lease| {
            attempt += 1;
            // If the first attempt made the object but its answer was lost, use that object.
            if attempt > 1 {
                if let [handle] = self.token.find_by_id(lease, &object_id)?[..] {
                    return Ok((lease.epoch, handle));
                }
            }
            let handle = create(&lease.session, &object_id, &label).map_err(|e| classify(&e))?;
            Ok((lease.epoch, handle))
        })?;
        let material = TokenKey::new(&self.token, key_id, version, object_id, found);
        Ok((material, reference(&object_id)))
    }
}

impl RootOfTrust for Pkcs11Root {
    fn describe(&self) -> String {
        self.token.describe()
    }

    fn generate(&self, key_id: &KeyId, version: u32) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        let what = || format!("generate key material for key {key_id} version {version}");
        self.create(key_id, version, &what, |session, object_id, label| {
            let mut template = object_template(object_id, label);
            template.push(Attribute::ValueLen((KEY_LEN as u64).into()));
            session.generate_key(&Mechanism::AesKeyGen, &template)
        })
    }

    fn import(
        &self,
        key_id: &KeyId,
        version: u32,
        material: &KeyBytes,
    ) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        let what = || format!("import key material for key {key_id} version {version}");
        self.create(key_id, version, &what, |session, object_id, label| {
            let mut template = SecretTemplate(object_template(object_id, label));
            template.0.push(Attribute::Value(material.expose().to_vec()));
            session.create_object(&template.0)
        })
    }

    fn load(&self, key_id: &KeyId, version: u32, stored: &[u8]) -> Result<Arc<dyn KeyMaterial>, KmsError> {
        let object_id = parse_reference(key_id, version, stored)?;
        let what = || format!("find the key material of key {key_id} version {version}");
        let found = self
            .token
            .run(&what, |lease| Ok((lease.epoch, self.token.find_material(lease, key_id, version, &object_id)?)))?;
        Ok(TokenKey::new(&self.token, key_id, version, object_id, found))
    }

    fn destroy(&self, key_id: &KeyId, version: u32, stored: &[u8]) -> Result<(), KmsError> {
        let object_id = parse_reference(key_id, version, stored)?;
        let what = || format!("destroy the key material of key {key_id} version {version}");
        self.token.run(&what, |lease| {
            let handle = match self.token.find_by_id(lease, &object_id)?[..] {
                // Gone already (a destruction interrupted after the token's part), if the
                // token is there to say so.
                [] => return self.token.alive(lease).map_err(Failure::Lost),
                [_] => self.token.find_material(lease, key_id, version, &object_id)?,
                ref several => {
                    return Err(Failure::Answer(KmsError::internal(format!(
                        "{} objects in the PKCS#11 token '{}' have the CKA_ID of key {key_id} version {version}: \
                         destroying none",
                        several.len(),
                        self.token.label
                    ))))
                }
            };
            match lease.session.destroy_object(handle) {
                Ok(()) | Err(P11Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => Ok(()),
                Err(e) => Err(classify(&e)),
            }
        })?;
        tracing::info!("destroyed the key material of key {key_id} version {version} in {}", self.token.describe());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use kmsfs_common::ErrorKind;

    use super::*;

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const PIN: &str = "1234";
    const SO_PIN: &str = "5678";

    /// One SoftHSM2 token directory for the test process: SoftHSM2 reads `SOFTHSM2_CONF`
    /// once, at C_Initialize, and the module is initialized once per process. Each test
    /// makes its own tokens in it.
    fn softhsm() -> &'static Path {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        DIR.get_or_init(|| {
            assert!(
                Path::new(MODULE).is_file(),
                "SoftHSM2 is not installed ({MODULE} is missing): run scripts/install-test-deps"
            );
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("tokens")).unwrap();
            let conf = dir.path().join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                    dir.path().join("tokens").display()
                ),
            )
            .unwrap();
            std::env::set_var("SOFTHSM2_CONF", &conf);
            dir
        })
        .path()
    }

    /// Tests share the module; one that makes it initialize again runs alone.
    static MODULE_USE: RwLock<()> = RwLock::new(());

    fn shared() -> RwLockReadGuard<'static, ()> {
        MODULE_USE.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclusive() -> RwLockWriteGuard<'static, ()> {
        MODULE_USE.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The module's context, loaded through the registry as `Token::connect` would.
    fn registered(registry: &mut HashMap<PathBuf, Module>) -> Pkcs11 {
        let canonical = Path::new(MODULE).canonicalize().unwrap();
        registry
            .entry(canonical.clone())
            .or_insert_with(|| {
                let pkcs11 = Pkcs11::new(&canonical).unwrap();
                initialize(&pkcs11).unwrap();
                Module { pkcs11, tokens: 0 }
            })
            .pkcs11
            .clone()
    }

    /// A new token with the user PIN [`PIN`]. It is made through the module in this process
    /// (SoftHSM2 would not list one made by `softhsm2-util` after C_Initialize), holding
    /// the registry so that no connect re-initializes the module meanwhile.
    fn new_token(name: &str) -> TokenConfig {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        softhsm();
        let label = format!("{name}-{}", MADE.fetch_add(1, Ordering::Relaxed));
        let mut registry = modules();
        let pkcs11 = registered(&mut registry);
        let free = pkcs11
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|slot| pkcs11.get_token_info(*slot).is_ok_and(|info| !info.token_initialized()))
            .expect("SoftHSM2 always offers a free slot");
        pkcs11.init_token(free, &AuthPin::from(SO_PIN), &label).unwrap();
        let slot = find_slot(&pkcs11, &label).ok().unwrap();
        let session = pkcs11.open_rw_session(slot).unwrap();
        session.login(UserType::So, Some(&AuthPin::from(SO_PIN))).unwrap();
        session.init_pin(&AuthPin::from(PIN)).unwrap();
        TokenConfig { module: MODULE.into(), token_label: label, pin: Zeroizing::new(PIN.into()) }
    }

    fn connect(name: &str) -> (TokenConfig, Pkcs11Root) {
        let config = new_token(name);
        let token = Token::connect(&config).unwrap();
        (config, Pkcs11Root::new(token))
    }

    /// `softhsm2-util`, as an operator would run it, on this process's token directory.
    fn softhsm2_util(args: &[&str]) {
        let conf = softhsm().join("softhsm2.conf");
        let out = Command::new("softhsm2-util")
            .args(args)
            .env("SOFTHSM2_CONF", conf)
            .output()
            .expect("softhsm2-util is not installed: run scripts/install-test-deps");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    fn delete_token(label: &str) {
        softhsm2_util(&["--delete-token", "--token", label]);
    }

    fn object_id(stored: &[u8]) -> [u8; OBJECT_ID_LEN] {
        parse_reference(&KeyId::random(), 0, stored).unwrap()
    }

    /// The attributes of the object `stored` refers to, read in the token.
    fn attributes(root: &Pkcs11Root, stored: &[u8], types: &[AttributeType]) -> Vec<Attribute> {
        let id = object_id(stored);
        root.token
            .run(&|| "inspect".into(), |lease| {
                let [handle] = root.token.find_by_id(lease, &id)?[..] else { panic!("one object expected") };
                lease.session.get_attributes(handle, types).map_err(|e| classify(&e))
            })
            .unwrap()
    }

    fn seal_parse_open(material: &dyn KeyMaterial, opener: &dyn KeyMaterial, id: &KeyId, version: u32) {
        let ctx = EncryptionContext::from([("purpose", "test")]);
        let blob = material.seal(id, version, &ctx, b"hello token").unwrap();
        let parsed = CiphertextBlob::parse(&blob).unwrap();
        assert_eq!((parsed.version(), parsed.key_id, parsed.material_version), (VERSION_TOKEN_GCM, *id, version));
        assert_eq!(blob.len(), blob::HEADER_LEN + GCM_IV_LEN + 11 + TAG_LEN);
        assert_eq!(&opener.open(&parsed, &ctx).unwrap()[..], b"hello token");
    }

    #[test]
    fn generated_material_seals_and_opens_in_the_token() {
        let _shared = shared();
        let (_, root) = connect("roundtrip");
        let id = KeyId::random();
        let (material, stored) = root.generate(&id, 1).unwrap();
        assert_eq!((stored.len(), stored[0]), (REFERENCE_LEN, REFERENCE_FORMAT));
        let loaded = root.load(&id, 1, &stored).unwrap();
        seal_parse_open(&*material, &*loaded, &id, 1);
        seal_parse_open(&*loaded, &*material, &id, 1);
        let ctx = EncryptionContext::default();
        assert_ne!(
            material.seal(&id, 1, &ctx, b"x").unwrap(),
            material.seal(&id, 1, &ctx, b"x").unwrap(),
            "IVs repeat"
        );
        assert!(root.describe().starts_with(&format!("pkcs11 (token '{}', {MODULE})", root.token.label)));
    }

    #[test]
    fn tampered_blobs_are_invalid_ciphertext() {
        let _shared = shared();
        let (_, root) = connect("tamper");
        let id = KeyId::random();
        let (material, _) = root.generate(&id, 3).unwrap();
        let ctx = EncryptionContext::from([("volume", "v1")]);
        let blob = material.seal(&id, 3, &ctx, b"secret").unwrap();
        let mut checked = 0;
        for byte in 0..blob.len() {
            for bit in 0..8 {
                let mut tampered = blob.clone();
                tampered[byte] ^= 1 << bit;
                let Ok(parsed) = CiphertextBlob::parse(&tampered) else { continue };
                let e = material
                    .open(&parsed, &ctx)
                    .expect_err(&format!("flip of bit {bit} in byte {byte} went unnoticed"));
                assert_eq!(e.kind, ErrorKind::InvalidCiphertextException, "byte {byte}: {}", e.message);
                checked += 1;
            }
        }
        assert!(checked > blob.len() * 7, "only {checked} tampered blobs parsed");
        let parsed = CiphertextBlob::parse(&blob).unwrap();
        for other in [EncryptionContext::default(), EncryptionContext::from([("volume", "v2")])] {
            assert_eq!(material.open(&parsed, &other).unwrap_err().kind, ErrorKind::InvalidCiphertextException);
        }
        // A format-1 blob (the agent's own XAES material) is not this material's.
        let xaes = blob::seal(&kmsfs_common::aead::XaesKey::new(&KeyBytes::random()), &id, 3, &ctx, b"secret");
        let e = material.open(&CiphertextBlob::parse(&xaes).unwrap(), &ctx).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidCiphertextException);
        // The sessions that saw the failures still serve.
        assert_eq!(&material.open(&parsed, &ctx).unwrap()[..], b"secret");
    }

    #[test]
    fn load_refuses_references_to_other_keys_versions_or_nothing() {
        let _shared = shared();
        let (_, root) = connect("load");
        let id = KeyId::random();
        let (_, first) = root.generate(&id, 1).unwrap();
        let (_, second) = root.generate(&id, 2).unwrap();
        assert!(root.load(&id, 2, &second).is_ok());
        for (key, version) in [(id, 2), (KeyId::random(), 1)] {
            let e = root.load(&key, version, &first).err().unwrap();
            assert_eq!(e.kind, ErrorKind::KMSInternalException);
            assert!(e.message.contains("belongs to another key or version"), "{}", e.message);
        }
        let mut unknown = first.clone();
        unknown[5] ^= 1;
        let e = root.load(&id, 1, &unknown).err().unwrap();
        assert!(e.message.contains("is not in the PKCS#11 token"), "{}", e.message);
        let mut wrong_format = first.clone();
        wrong_format[0] = 2;
        for malformed in [&[][..], &first[..REFERENCE_LEN - 1], &wrong_format[..], &[first.clone(), vec![0]].concat()] {
            let e = root.load(&id, 1, malformed).err().unwrap();
            assert!(e.message.contains("not a PKCS#11 object reference"), "{}", e.message);
        }
    }

    #[test]
    fn material_is_sensitive_and_never_leaves_the_token() {
        let _shared = shared();
        let (_, root) = connect("attrs");
        let id = KeyId::random();
        let (_, generated) = root.generate(&id, 1).unwrap();
        let (_, imported) = root.import(&id, 2, &KeyBytes::random()).unwrap();
        for (stored, version) in [(&generated, 1), (&imported, 2)] {
            let found = attributes(
                &root,
                stored,
                &[
                    AttributeType::Label,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Derive,
                    AttributeType::Modifiable,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Value,
                ],
            );
            let label = object_label(&id, version).into_bytes();
            for expected in [
                Attribute::Label(label),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::Modifiable(false),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
            ] {
                assert!(found.contains(&expected), "version {version}: {expected:?} missing from {found:?}");
            }
            // The token withholds CKA_VALUE of a sensitive key.
            assert!(
                !found.iter().any(|a| matches!(a, Attribute::Value(_))),
                "version {version}: the value was readable"
            );
        }
        // Generated in the token, the material was never anywhere else.
        let found = attributes(
            &root,
            &generated,
            &[AttributeType::NeverExtractable, AttributeType::AlwaysSensitive, AttributeType::Local],
        );
        for expected in [Attribute::NeverExtractable(true), Attribute::AlwaysSensitive(true), Attribute::Local(true)] {
            assert!(found.contains(&expected), "{expected:?} missing from {found:?}");
        }
    }

    #[test]
    fn imported_material_is_that_key_under_standard_aes_gcm() {
        let _shared = shared();
        let (_, root) = connect("import");
        let id = KeyId::random();
        let key = KeyBytes::random();
        let (material, stored) = root.import(&id, 4, &key).unwrap();
        let software = aes_gcm::Aes256Gcm::new_from_slice(key.expose()).unwrap();
        let ctx = EncryptionContext::from([("file", "f1")]);
        // Sealed in the token, opened in software with the documented IV and AAD.
        let blob = material.seal(&id, 4, &ctx, b"interoperable").unwrap();
        let parsed = CiphertextBlob::parse(&blob).unwrap();
        let sealed = [parsed.ciphertext(), &parsed.tag()[..]].concat();
        let opened = software
            .decrypt(parsed.nonce().try_into().unwrap(), Payload { msg: &sealed, aad: &parsed.aad(&ctx) })
            .unwrap();
        assert_eq!(opened, b"interoperable");
        // Sealed in software as format 2, opened in the token.
        let mut made = blob::header(VERSION_TOKEN_GCM, &id, 4);
        let iv = [9u8; GCM_IV_LEN];
        let aad = blob::aad(&made, &ctx);
        made.extend_from_slice(&iv);
        made.extend_from_slice(&software.encrypt((&iv).into(), Payload { msg: b"the other way", aad: &aad }).unwrap());
        let loaded = root.load(&id, 4, &stored).unwrap();
        assert_eq!(&loaded.open(&CiphertextBlob::parse(&made).unwrap(), &ctx).unwrap()[..], b"the other way");
    }

    #[test]
    fn two_tokens_of_one_module_serve_at_once() {
        let _shared = shared();
        let (_, a) = connect("two-a");
        let (_, b) = connect("two-b");
        let id = KeyId::random();
        let (in_a, stored_a) = a.generate(&id, 1).unwrap();
        let (in_b, stored_b) = b.generate(&id, 1).unwrap();
        std::thread::scope(|scope| {
            for (material, opener) in [(&in_a, &in_a), (&in_b, &in_b)] {
                scope.spawn(move || {
                    for _ in 0..100 {
                        seal_parse_open(&**material, &**opener, &id, 1);
                    }
                });
            }
        });
        // Each token has only its own object; blobs of one do not open with the other.
        assert!(a.load(&id, 1, &stored_b).err().unwrap().message.contains("is not in the PKCS#11 token"));
        assert!(b.load(&id, 1, &stored_a).is_err());
        let ctx = EncryptionContext::default();
        let blob = in_a.seal(&id, 1, &ctx, b"a").unwrap();
        assert_eq!(
            in_b.open(&CiphertextBlob::parse(&blob).unwrap(), &ctx).unwrap_err().kind,
            ErrorKind::InvalidCiphertextException
        );
    }

    #[test]
    fn a_wrong_pin_is_incorrect_pin() {
        let _shared = shared();
        let mut config = new_token("pin");
        config.pin = Zeroizing::new("9999".into());
        let e = Token::connect(&config).err().unwrap();
        assert_eq!(e, ConnectError::IncorrectPin);
        assert_eq!(e.connection_error_code(), "INVALID_CREDENTIALS");
        assert!(!e.to_string().contains("9999"));
        config.pin = Zeroizing::new(PIN.into());
        assert!(Token::connect(&config).is_ok());
    }

    #[test]
    fn a_missing_module_is_module_not_loaded() {
        let config = TokenConfig {
            module: "/nonexistent/libpkcs11.so".into(),
            token_label: "kms".into(),
            pin: Zeroizing::new(PIN.into()),
        };
        let e = Token::connect(&config).err().unwrap();
        assert!(matches!(e, ConnectError::ModuleNotLoaded(_)), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
        assert_eq!(e.connection_error_code(), "INTERNAL_ERROR");
        // A file that is no PKCS#11 module.
        let not_a_module = TokenConfig { module: "/etc/hostname".into(), ..config };
        assert!(matches!(Token::connect(&not_a_module), Err(ConnectError::ModuleNotLoaded(_))));
    }

    #[test]
    fn a_missing_label_is_token_not_found() {
        let _shared = shared();
        let (config, _root) = connect("present");
        let missing = TokenConfig { token_label: "no-such-token".into(), ..config.clone() };
        let e = Token::connect(&missing).err().unwrap();
        assert!(matches!(e, ConnectError::TokenNotFound(_)), "{e:?}");
        assert!(e.to_string().contains("no initialized token labelled 'no-such-token'"), "{e}");
        assert!(e.to_string().contains(&format!("'{}'", config.token_label)), "the tokens present are listed: {e}");
        assert_eq!(e.connection_error_code(), "INSUFFICIENT_CLOUDHSM_HSMS");
    }

    #[test]
    fn a_token_without_aes_gcm_is_refused_naming_the_mechanism() {
        let _shared = shared();
        let lacking =
            |missing: MechanismType| missing_mechanism(|m, _| Ok(m != missing)).unwrap().map(|(name, _)| name);
        assert_eq!(lacking(MechanismType::AES_GCM), Some("CKM_AES_GCM"));
        assert_eq!(lacking(MechanismType::AES_KEY_GEN), Some("CKM_AES_KEY_GEN"));
        assert_eq!(lacking(MechanismType::AES_CBC), None);
        // SoftHSM2 offers both, for the uses kmsd needs.
        let (config, _root) = connect("mechanisms");
        let registry = modules();
        let pkcs11 = &registry[&Path::new(MODULE).canonicalize().unwrap()].pkcs11;
        let slot = find_slot(pkcs11, &config.token_label).ok().unwrap();
        let offers = |m, uses: Allows| pkcs11.get_mechanism_info(slot, m).map(|info| uses(&info));
        assert_eq!(missing_mechanism(offers).unwrap(), None);
        assert_eq!(ConnectError::MechanismMissing("x".into()).connection_error_code(), "INTERNAL_ERROR");
    }

    #[test]
    fn a_token_made_later_is_found_once_none_of_the_module_is_in_use() {
        let _alone = exclusive();
        let (config, root) = connect("early");
        // Made by another process after this one initialized the module.
        softhsm2_util(&["--init-token", "--free", "--label", "late", "--pin", PIN, "--so-pin", SO_PIN]);
        let late = TokenConfig { token_label: "late".into(), ..config.clone() };
        // SoftHSM2 does not list it, and a token of the module is in use: no re-initialization.
        assert!(matches!(Token::connect(&late), Err(ConnectError::TokenNotFound(_))));
        drop(root);
        let root = Pkcs11Root::new(Token::connect(&late).unwrap());
        let id = KeyId::random();
        let (material, _) = root.generate(&id, 1).unwrap();
        seal_parse_open(&*material, &*material, &id, 1);
        // The early token is still there for a new connection.
        assert!(Token::connect(&config).is_ok());
    }

    #[test]
    fn a_closed_token_fails_every_use_until_connected_again() {
        let _shared = shared();
        let (config, root) = connect("close");
        let id = KeyId::random();
        let (material, stored) = root.generate(&id, 1).unwrap();
        let ctx = EncryptionContext::default();
        let blob = material.seal(&id, 1, &ctx, b"before").unwrap();
        root.token().close();
        let parsed = CiphertextBlob::parse(&blob).unwrap();
        for e in [
            material.seal(&id, 1, &ctx, b"after").unwrap_err(),
            material.open(&parsed, &ctx).unwrap_err(),
            root.load(&id, 1, &stored).err().unwrap(),
            root.generate(&id, 2).err().unwrap(),
            root.destroy(&id, 1, &stored).unwrap_err(),
        ] {
            assert_eq!(e.kind, ErrorKind::KMSInternalException);
            assert!(e.message.contains(&format!("the PKCS#11 token '{}'", config.token_label)), "{}", e.message);
            assert!(e.message.contains("is disconnected"), "{}", e.message);
        }
        let again = Pkcs11Root::new(Token::connect(&config).unwrap());
        assert_eq!(&again.load(&id, 1, &stored).unwrap().open(&parsed, &ctx).unwrap()[..], b"before");
    }

    #[test]
    fn a_deleted_token_fails_cleanly_and_the_others_keep_serving() {
        let _shared = shared();
        let (gone, doomed) = connect("deleted");
        let (_, other) = connect("survivor");
        let id = KeyId::random();
        let (material, stored) = doomed.generate(&id, 1).unwrap();
        let (survivor, _) = other.generate(&id, 1).unwrap();
        let ctx = EncryptionContext::default();
        let blob = material.seal(&id, 1, &ctx, b"x").unwrap();
        delete_token(&gone.token_label);
        let parsed = CiphertextBlob::parse(&blob).unwrap();
        // Twice each: on the sessions that saw the token go, then on reconnection attempts.
        for _ in 0..2 {
            for e in [
                material.seal(&id, 1, &ctx, b"y").unwrap_err(),
                material.open(&parsed, &ctx).unwrap_err(),
                doomed.load(&id, 1, &stored).err().unwrap(),
                doomed.generate(&id, 2).err().unwrap(),
                doomed.destroy(&id, 1, &stored).unwrap_err(),
            ] {
                assert_eq!(e.kind, ErrorKind::KMSInternalException, "{}", e.message);
                assert!(e.message.contains(&format!("the PKCS#11 token '{}'", gone.token_label)), "{}", e.message);
                assert!(e.message.contains("cannot be reached"), "{}", e.message);
            }
        }
        seal_parse_open(&*survivor, &*survivor, &id, 1);
        assert!(matches!(Token::connect(&gone), Err(ConnectError::TokenNotFound(_))));
    }

    #[test]
    fn a_session_that_lost_its_login_is_replaced() {
        let _shared = shared();
        let (_, root) = connect("relogin");
        let id = KeyId::random();
        let (material, _) = root.generate(&id, 1).unwrap();
        // Log the application out of the token through a pooled session: every session,
        // and the cached handle of the private object, are then of no use.
        let lease = root.token.acquire(&|| "log out".into()).unwrap();
        lease.session.logout().unwrap();
        root.token.release(lease);
        seal_parse_open(&*material, &*material, &id, 1);
    }

    #[test]
    fn destroy_removes_the_object_once_and_only_its_own() {
        let _shared = shared();
        let (_, root) = connect("destroy");
        let id = KeyId::random();
        let (_, first) = root.generate(&id, 1).unwrap();
        let (_, second) = root.generate(&id, 2).unwrap();
        // The reference of version 1 given as version 2's: refused, nothing destroyed.
        assert!(root.destroy(&id, 2, &first).unwrap_err().message.contains("another key or version"));
        assert!(root.load(&id, 1, &first).is_ok());
        root.destroy(&id, 1, &first).unwrap();
        assert!(root.load(&id, 1, &first).err().unwrap().message.contains("is not in the PKCS#11 token"));
        root.destroy(&id, 1, &first).unwrap();
        assert!(root.load(&id, 2, &second).is_ok());
    }

    #[test]
    fn sixteen_threads_share_the_session_pool() {
        let _shared = shared();
        let (_, root) = connect("pool");
        let id = KeyId::random();
        let (material, _) = root.generate(&id, 1).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..16 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        seal_parse_open(&*material, &*material, &id, 1);
                    }
                });
            }
        });
        let idle = lock(&root.token.pool).idle.len();
        assert!((1..=16).contains(&idle), "{idle} sessions pooled");
    }
}
