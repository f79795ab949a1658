//! The agent's state: its keys and aliases in memory, backed by the metadata store and
//! the root of trust.
//!
//! Reads (every cryptographic operation) take a read lock on in-memory maps and never
//! touch SQLite. Mutations are serialized by the store's mutex: each commits its
//! transaction first and only then changes memory, so an acknowledged change is durable
//! and a failed commit leaves no trace.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use kmsfs_common::ids::{ArnScope, KeyId, KeyRef};
use kmsfs_common::{ErrorKind, KmsError};

use crate::asymmetric::PrivateKey;
use crate::authz::{condition_keys, Authz};
use crate::key_stores::{load_clusters, Cluster, Connection, KeyStore};
use crate::policy::eval::{Caller, RequestContext};
use crate::policy::Policy;
use crate::rot::setup::Backend;
use crate::rot::{KeyMaterial, RootOfTrust};
use crate::store::{AliasRow, GrantRow, KeyRow, KeyState, MaterialRow, Store, UsageRow};

/// One version of a key's material: what the store says of it, and the usable material.
#[derive(Clone)]
pub struct Material {
    /// `row.material_id` is AWS's `KeyMaterialId`: 64 hex digits naming this version.
    pub row: MaterialRow,
    /// `None` while imported material is deleted or expired, and for asymmetric and HMAC
    /// keys, whose material is `private`.
    pub key: Option<Arc<dyn KeyMaterial>>,
    /// The private key of an asymmetric key, or an HMAC key.
    pub private: Option<Arc<PrivateKey>>,
}

impl Material {
    /// Symmetric material (or none yet: a key awaiting import).
    pub fn symmetric(row: MaterialRow, key: Option<Arc<dyn KeyMaterial>>) -> Material {
        Material { row, key, private: None }
    }

    /// Whether this version can be used: its material is loaded (or imported).
    pub fn usable(&self) -> bool {
        self.key.is_some() || self.private.is_some()
    }

    /// Drops the material (deleted or expired imported material), zeroizing it.
    pub fn clear(&mut self) {
        self.key = None;
        self.private = None;
        self.row.stored = None;
    }
}

impl Material {
    pub fn material_id(&self) -> &str {
        &self.row.material_id
    }
}

/// A key as the handlers see it: metadata, tags and loaded material.
#[derive(Clone)]
pub struct KeyRecord {
    pub row: KeyRow,
    pub tags: BTreeMap<String, String>,
    pub materials: BTreeMap<u32, Material>,
    pub grants: Vec<GrantRow>,
    /// `row.policy`, parsed (the default key policy when empty).
    pub policy: Arc<Policy>,
    /// False while the key's custom key store is not connected (its material unloaded).
    pub available: bool,
}

impl KeyRecord {
    /// The state AWS reports: the stored one, or `Unavailable` for an enabled or disabled key
    /// whose custom key store is not connected.
    pub fn state(&self) -> KeyState {
        match self.row.state {
            KeyState::Enabled | KeyState::Disabled if !self.available => KeyState::Unavailable,
            state => state,
        }
    }

    /// The material version new ciphertexts are made with (it may be an imported one that
    /// is deleted: see [`KeyRecord::current_key`]).
    pub fn current(&self) -> Result<&Material, KmsError> {
        self.materials
            .get(&self.row.current_version)
            .ok_or_else(|| KmsError::invalid_state(format!("key {} has no key material", self.row.id)))
    }

    /// The private key (or HMAC key) of an asymmetric or HMAC key.
    pub fn private_key(&self) -> Result<&Arc<PrivateKey>, KmsError> {
        self.current()?.private.as_ref().ok_or_else(|| {
            KmsError::new(
                ErrorKind::InvalidKeyUsageException,
                format!("key {} ({}) is not an asymmetric or HMAC key", self.row.id, self.row.key_spec),
            )
        })
    }

    /// The usable material new ciphertexts are made with.
    pub fn current_key(&self) -> Result<(&Material, &Arc<dyn KeyMaterial>), KmsError> {
        let current = self.current()?;
        let key = current.key.as_ref().ok_or_else(|| {
            KmsError::invalid_state(format!("the current key material of key {} is not imported", self.row.id))
        })?;
        Ok((current, key))
    }
}

/// Where the agent keeps its state and who it is.
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub scope: ArnScope,
    pub authz: Authz,
    /// Milliseconds added to the system clock for key lifecycle dates (`kmsd --clock-offset`).
    pub clock_offset_ms: i64,
    /// The backend `root` is (the state directory's recorded one).
    pub root_backend: Backend,
    /// Where `hsm-clusters.json` is (the tokens custom key stores may use).
    pub config_dir: Option<PathBuf>,
}

/// A key changed state. Clients holding data keys under it (kmsfs) watch these so that
/// disabling a key cuts off their cached keys at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEvent {
    pub key_id: KeyId,
    /// The new state; `None` once the key is destroyed.
    pub state: Option<KeyState>,
}

/// The agent: configuration, root of trust, store and in-memory maps.
pub struct Agent {
    pub scope: ArnScope,
    pub authz: Authz,
    events: tokio::sync::broadcast::Sender<KeyEvent>,
    root: Arc<dyn RootOfTrust>,
    store: Mutex<Store>,
    config_dir: Option<PathBuf>,
    /// The tokens declared for custom key stores (`hsm-clusters.json`), by cluster ID.
    clusters: RwLock<BTreeMap<String, Cluster>>,
    key_stores: RwLock<BTreeMap<String, KeyStore>>,
    keys: RwLock<HashMap<KeyId, Arc<KeyRecord>>>,
    aliases: RwLock<BTreeMap<String, AliasRow>>,
    clock_offset_ms: i64,
    /// Last successful cryptographic use per key, and which entries the store lacks.
    usage: Mutex<HashMap<KeyId, (UsageRow, bool)>>,
    usage_tracking_start_ms: i64,
    /// The agents of other regions (`peers.json`), which hold replicas of multi-Region keys.
    pub peers: crate::peers::Peers,
    /// Serializes changes to multi-Region configurations (ReplicateKey, UpdatePrimaryRegion,
    /// synchronization), which span a call to a peer.
    pub replication: Mutex<()>,
    /// Wakes the scheduler before its next date: a replica left to synchronize.
    pub wake_scheduler: tokio::sync::Notify,
}

/// Stored under `meta.root_check`: material made for a reserved key ID when the state
/// directory was created. If it does not load, the root of trust is not the one that
/// made this directory (a wrong passphrase, another machine's TPM), and starting would
/// only make every Decrypt fail.
const ROOT_CHECK: &str = "root_check";
const ROOT_CHECK_ID: [u8; 16] = [0; 16];
/// Stored under `meta`: the backend that made the state directory (`file`, `tpm2`,
/// `pkcs11`); a directory is never opened with another.
pub const ROOT_BACKEND: &str = "root_of_trust";
/// Stored under `meta`: when GetKeyLastUsage's tracking began (ms since the epoch, text).
const USAGE_TRACKING_START: &str = "usage_tracking_start_ms";

impl Agent {
    /// Opens the state directory's store with `root`, checks that `root` is the one that
    /// created it, and loads every key's material.
    pub fn open(config: AgentConfig, root: Box<dyn RootOfTrust>) -> Result<Agent, String> {
        let root: Arc<dyn RootOfTrust> = Arc::from(root);
        let clusters = load_clusters(config.config_dir.as_deref())?;
        let peers = crate::peers::Peers::load(config.config_dir.as_deref(), &config.scope)?;
        let mut store = Store::open(&config.state_dir.join("kmsd.db"))?;
        check_root(&mut store, &*root, config.root_backend, &config.state_dir)?;
        // A kill between destroying material and scrubbing the files is finished here.
        store.scrub_if_pending().map_err(|e| e.message)?;
        let now = kmsfs_common::time::now_millis() + config.clock_offset_ms;
        let usage_tracking_start_ms = match store.meta(USAGE_TRACKING_START).map_err(|e| e.message)? {
            Some(v) => String::from_utf8_lossy(&v).parse().unwrap_or(now),
            None => {
                store.set_meta(USAGE_TRACKING_START, now.to_string().as_bytes()).map_err(|e| e.message)?;
                now
            }
        };
        let snapshot = store.snapshot().map_err(|e| e.message)?;
        let mut records: HashMap<KeyId, KeyRecord> = snapshot
            .keys
            .into_iter()
            .map(|row| {
                let policy = parse_stored_policy(&config.scope, &row.policy)
                    .map_err(|e| format!("the stored policy of key {} is invalid: {e}", row.id))?;
                Ok((
                    row.id,
                    KeyRecord {
                        available: row.custom_key_store_id.is_none(),
                        row,
                        tags: BTreeMap::new(),
                        materials: BTreeMap::new(),
                        grants: Vec::new(),
                        policy,
                    },
                ))
            })
            .collect::<Result<_, String>>()?;
        for m in snapshot.materials {
            let Some(record) = records.get_mut(&m.key_id) else { continue };
            // Material in a custom key store's token is loaded when the store connects.
            let material = match &m.stored {
                Some(stored) if record.row.key_spec != "SYMMETRIC_DEFAULT" => {
                    let secret = root.open_secret(&m.key_id, m.version, stored).map_err(|e| e.message)?;
                    let private = PrivateKey::from_stored(&record.row.key_spec, &record.row.key_usage, &secret)
                        .map_err(|e| e.message)?;
                    Material { row: m, key: None, private: Some(Arc::new(private)) }
                }
                Some(stored) if record.available => {
                    let key = root.load(&m.key_id, m.version, stored).map_err(|e| e.message)?;
                    Material::symmetric(m, Some(key))
                }
                _ => Material::symmetric(m, None),
            };
            record.materials.insert(material.row.version, material);
        }
        let key_stores = snapshot
            .key_stores
            .into_iter()
            .map(|row| (row.id.clone(), KeyStore { row, connection: Connection::Disconnected }))
            .collect();
        let usage = snapshot.usage.into_iter().map(|u| (u.key_id, (u, false))).collect();
        for (id, k, v) in snapshot.tags {
            if let Some(record) = records.get_mut(&id) {
                record.tags.insert(k, v);
            }
        }
        for grant in snapshot.grants {
            if let Some(record) = records.get_mut(&grant.key_id) {
                record.grants.push(grant);
            }
        }
        let aliases = snapshot.aliases.into_iter().map(|a| (a.name.clone(), a)).collect();
        tracing::info!(keys = records.len(), root = %root.describe(), "state loaded");
        Ok(Agent {
            scope: config.scope,
            authz: config.authz,
            events: tokio::sync::broadcast::channel(1024).0,
            root,
            store: Mutex::new(store),
            config_dir: config.config_dir,
            clusters: RwLock::new(clusters),
            key_stores: RwLock::new(key_stores),
            keys: RwLock::new(records.into_iter().map(|(id, r)| (id, Arc::new(r))).collect()),
            aliases: RwLock::new(aliases),
            clock_offset_ms: config.clock_offset_ms,
            usage: Mutex::new(usage),
            usage_tracking_start_ms,
            peers,
            replication: Mutex::new(()),
            wake_scheduler: tokio::sync::Notify::new(),
        })
    }

    /// The time key lifecycle dates are reckoned in (creation, deletion, rotation, expiry of
    /// imported material and import tokens): the system clock plus `--clock-offset`.
    pub fn now_ms(&self) -> i64 {
        kmsfs_common::time::now_millis() + self.clock_offset_ms
    }

    /// Notes a successful cryptographic operation with key `key_id` (GetKeyLastUsage).
    /// Kept in memory and written to the store by the scheduler, so that a Decrypt costs no
    /// extra transaction.
    pub fn note_usage(&self, key_id: KeyId, operation: &str, request_id: &str, event_id: &str) {
        let row = UsageRow {
            key_id,
            operation: operation.to_string(),
            time_ms: self.now_ms(),
            request_id: request_id.to_string(),
            event_id: event_id.to_string(),
        };
        lock(&self.usage).insert(key_id, (row, true));
    }

    /// The last recorded use of `key_id`, and the date tracking began.
    pub fn last_usage(&self, key_id: &KeyId) -> (Option<UsageRow>, i64) {
        (lock(&self.usage).get(key_id).map(|(u, _)| u.clone()), self.usage_tracking_start_ms)
    }

    /// Writes the usage noted since the last call to the store.
    pub fn save_usage(&self) -> Result<(), KmsError> {
        let dirty: Vec<UsageRow> = lock(&self.usage).values().filter(|(_, d)| *d).map(|(u, _)| u.clone()).collect();
        if dirty.is_empty() {
            return Ok(());
        }
        lock(&self.store).save_usage(&dirty)?;
        let mut usage = lock(&self.usage);
        for saved in dirty {
            if let Some(entry) = usage.get_mut(&saved.key_id).filter(|(u, _)| *u == saved) {
                entry.1 = false;
            }
        }
        Ok(())
    }

    /// A 32-byte secret the agent keeps for itself, sealed exactly as key material is: the
    /// reserved internal key `id` gets material from the root of trust (stored wrapped), and
    /// that material seals the secret as a ciphertext blob. Both are kept together under
    /// `name` in the store's `meta` table (u32 length of the wrapped material, big-endian ‖
    /// wrapped material ‖ sealed blob), written in one transaction. Made on first use.
    pub fn internal_secret(&self, name: &str, id: [u8; 16]) -> Result<zeroize::Zeroizing<[u8; 32]>, String> {
        let id = KeyId::from_bytes(id);
        let context = kmsfs_common::context::EncryptionContext::from([("kmsd:secret", name)]);
        let mut store = lock(&self.store);
        if let Some(stored) = store.meta(name).map_err(|e| e.message)? {
            let damaged =
                |why: &str| format!("the agent's sealed {name} cannot be opened under the root of trust: {why}");
            let (len, rest) = stored.split_at_checked(4).ok_or_else(|| damaged("it is cut short"))?;
            let len = u32::from_be_bytes(len.try_into().map_err(|_| damaged("it is cut short"))?) as usize;
            let (material, sealed) = rest.split_at_checked(len).ok_or_else(|| damaged("it is cut short"))?;
            let key = self.root.load(&id, 0, material).map_err(|e| damaged(&e.message))?;
            let blob =
                kmsfs_common::blob::CiphertextBlob::parse(sealed).map_err(|_| damaged("not a ciphertext blob"))?;
            let secret = key.open(&blob, &context).map_err(|e| damaged(&e.message))?;
            let out: [u8; 32] = secret[..].try_into().map_err(|_| damaged("it is not 32 bytes"))?;
            return Ok(zeroize::Zeroizing::new(out));
        }
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        kmsfs_common::aead::random_bytes(&mut secret[..]);
        let (key, material) = self.root.generate(&id, 0).map_err(|e| e.message)?;
        let mut stored = (material.len() as u32).to_be_bytes().to_vec();
        stored.extend_from_slice(&material);
        stored.extend_from_slice(&key.seal(&id, 0, &context, &secret[..]).map_err(|e| e.message)?);
        store.set_meta(name, &stored).map_err(|e| e.message)?;
        Ok(secret)
    }

    /// Subscribes to key state changes committed from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<KeyEvent> {
        self.events.subscribe()
    }

    /// The agent's own root of trust (keys outside custom key stores).
    pub fn root(&self) -> &dyn RootOfTrust {
        &*self.root
    }

    /// The root of trust that holds `key`'s material: the agent's own, or its custom key
    /// store's token (`CustomKeyStoreInvalidStateException` if that is not connected).
    pub fn root_for(&self, key: &KeyRow) -> Result<Arc<dyn RootOfTrust>, KmsError> {
        let Some(id) = &key.custom_key_store_id else { return Ok(self.root.clone()) };
        let store = self.key_store(id)?;
        match store.root() {
            Some(root) => Ok(root.clone()),
            None => Err(not_connected(&store)),
        }
    }

    /// The custom key store `id`.
    pub fn key_store(&self, id: &str) -> Result<KeyStore, KmsError> {
        read(&self.key_stores).get(id).cloned().ok_or_else(|| {
            KmsError::new(ErrorKind::CustomKeyStoreNotFoundException, format!("Custom key store '{id}' does not exist"))
        })
    }

    /// Every custom key store, by ID.
    pub fn key_stores(&self) -> Vec<KeyStore> {
        read(&self.key_stores).values().cloned().collect()
    }

    /// The token declared under `cluster_id`, if any.
    pub fn cluster(&self, cluster_id: &str) -> Option<Cluster> {
        read(&self.clusters).get(cluster_id).cloned()
    }

    /// Re-reads `hsm-clusters.json` (SIGHUP). Connected stores keep their sessions.
    pub fn reload_clusters(&self) -> Result<usize, String> {
        let clusters = load_clusters(self.config_dir.as_deref())?;
        let n = clusters.len();
        *write(&self.clusters) = clusters;
        Ok(n)
    }

    /// Re-reads `peers.json` (SIGHUP).
    pub fn reload_peers(&self) -> Result<usize, String> {
        self.peers.reload(self.config_dir.as_deref(), &self.scope)
    }

    /// The keys in custom key store `id`.
    pub fn keys_in_store(&self, id: &str) -> Vec<Arc<KeyRecord>> {
        read(&self.keys).values().filter(|k| k.row.custom_key_store_id.as_deref() == Some(id)).cloned().collect()
    }

    pub fn key_arn(&self, id: &KeyId) -> String {
        self.scope.key_arn(id)
    }

    /// The key with ID `id`, if it exists.
    pub fn key(&self, id: &KeyId) -> Option<Arc<KeyRecord>> {
        read(&self.keys).get(id).cloned()
    }

    /// Resolves a `KeyId` field. Aliases are accepted only where the API accepts them
    /// (cryptographic operations and DescribeKey); elsewhere they are an invalid key ID.
    pub fn resolve(&self, key_id: &str, allow_alias: bool) -> Result<Arc<KeyRecord>, KmsError> {
        let reference = KeyRef::parse(key_id)?;
        if reference.is_alias() && !allow_alias {
            return Err(KmsError::not_found(format!("Invalid keyId '{key_id}': use a key ID or key ARN")));
        }
        let id = match &reference {
            KeyRef::Id(id) => *id,
            KeyRef::KeyArn { scope, id } if *scope == self.scope => *id,
            KeyRef::Alias(name) => self.alias_target(name)?,
            KeyRef::AliasArn { scope, name } if *scope == self.scope => self.alias_target(name)?,
            _ => return Err(KmsError::not_found(format!("Key '{key_id}' does not exist"))),
        };
        self.key(&id).ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", self.key_arn(&id))))
    }

    fn alias_target(&self, name: &str) -> Result<KeyId, KmsError> {
        read(&self.aliases)
            .get(name)
            .map(|a| a.key_id)
            .ok_or_else(|| KmsError::not_found(format!("Alias '{}' is not found.", self.scope.alias_arn(name))))
    }

    /// Every key, ordered by key ID.
    pub fn keys_sorted(&self) -> Vec<Arc<KeyRecord>> {
        let mut keys: Vec<_> = read(&self.keys).values().cloned().collect();
        keys.sort_by_key(|k| k.row.id.to_string());
        keys
    }

    /// Every alias, ordered by name.
    pub fn aliases(&self) -> Vec<AliasRow> {
        read(&self.aliases).values().cloned().collect()
    }

    pub fn alias(&self, name: &str) -> Option<AliasRow> {
        read(&self.aliases).get(name).cloned()
    }

    /// Serializes a mutation: `f` gets the store and must commit before returning; the
    /// returned records then replace the in-memory ones.
    pub fn mutate<T>(&self, f: impl FnOnce(&mut Store) -> Result<(T, Vec<Change>), KmsError>) -> Result<T, KmsError> {
        let mut store = lock(&self.store);
        let (out, changes) = f(&mut store)?;
        for change in changes {
            match change {
                Change::Key(record) => {
                    let (id, state) = (record.row.id, record.state());
                    let previous = write(&self.keys).insert(id, Arc::new(record));
                    if let Some(previous) = previous.filter(|p| p.state() != state) {
                        // No receivers is not an error: nobody is watching.
                        let _ = self.events.send(KeyEvent { key_id: id, state: Some(state) });
                        tracing::debug!(key_id = %id, from = previous.state().as_str(), to = state.as_str(), "key state changed");
                    }
                }
                Change::KeyStore(store) => {
                    write(&self.key_stores).insert(store.row.id.clone(), store);
                }
                Change::KeyStoreDeleted(id) => {
                    write(&self.key_stores).remove(&id);
                }
                Change::KeyDestroyed(id) => {
                    write(&self.keys).remove(&id);
                    write(&self.aliases).retain(|_, a| a.key_id != id);
                    lock(&self.usage).remove(&id);
                    let _ = self.events.send(KeyEvent { key_id: id, state: None });
                }
                Change::Alias(alias) => {
                    write(&self.aliases).insert(alias.name.clone(), alias);
                }
                Change::AliasDeleted(name) => {
                    write(&self.aliases).remove(&name);
                }
            }
        }
        Ok(out)
    }
}

impl Agent {
    /// Authorizes `action` by `caller` on `key`; `build` adds the request's own condition
    /// keys (encryption context, grant parameters, ...) to the context.
    pub fn authorize_key(
        &self,
        caller: &Caller,
        action: &str,
        key: &KeyRecord,
        build: impl FnOnce(RequestContext) -> RequestContext,
    ) -> Result<(), KmsError> {
        let ctx = self.key_context(caller, action, key);
        self.authz.check_key(&key.policy, &key.grants, build(ctx))
    }

    /// Authorizes `action` by `caller` on no particular key.
    pub fn authorize_account(
        &self,
        caller: &Caller,
        action: &str,
        build: impl FnOnce(RequestContext) -> RequestContext,
    ) -> Result<(), KmsError> {
        self.authz.check_account(build(crate::authz::context(action, "*", caller)))
    }

    /// The request context of `action` on `key`, with the key's condition keys.
    pub fn key_context(&self, caller: &Caller, action: &str, key: &KeyRecord) -> RequestContext {
        let aliases: Vec<String> =
            read(&self.aliases).values().filter(|a| a.key_id == key.row.id).map(|a| a.name.clone()).collect();
        crate::authz::context(action, &self.key_arn(&key.row.id), caller)
            .with(condition_keys::KEY_ORIGIN, key.row.origin.clone())
            .with(condition_keys::KEY_SPEC, key.row.key_spec.clone())
            .with(condition_keys::KEY_USAGE, key.row.key_usage.clone())
            .with_values(condition_keys::RESOURCE_ALIASES, aliases)
    }
}

/// Checks that `root`, of backend `backend`, is the root of trust that made the store
/// (recording both on first use): a wrong passphrase or another machine's TPM is refused
/// here rather than by every Decrypt.
pub fn check_root(store: &mut Store, root: &dyn RootOfTrust, backend: Backend, state_dir: &Path) -> Result<(), String> {
    match store.meta(ROOT_BACKEND).map_err(|e| e.message)? {
        Some(recorded) if recorded != backend.as_str().as_bytes() => {
            return Err(format!(
                "{} was made with the {} root of trust, not {} (is {} missing or replaced?)",
                state_dir.display(),
                String::from_utf8_lossy(&recorded),
                backend.as_str(),
                crate::rot::setup::RECORD
            ));
        }
        Some(_) => {}
        None => store.set_meta(ROOT_BACKEND, backend.as_str().as_bytes()).map_err(|e| e.message)?,
    }
    let check_id = KeyId::from_bytes(ROOT_CHECK_ID);
    match store.meta(ROOT_CHECK).map_err(|e| e.message)? {
        Some(stored) => {
            root.load(&check_id, 0, &stored).map_err(|e| {
                format!(
                    "the root of trust ({}) is not the one that created {}: {} (wrong root key or passphrase, or another token?)",
                    root.describe(),
                    state_dir.display(),
                    e.message
                )
            })?;
        }
        None => {
            let (_, stored) = root.generate(&check_id, 0).map_err(|e| e.message)?;
            store.set_meta(ROOT_CHECK, &stored).map_err(|e| e.message)?;
        }
    }
    Ok(())
}

/// Parses a stored key policy; an empty one is the default key policy.
pub fn parse_stored_policy(scope: &ArnScope, text: &str) -> Result<Arc<Policy>, String> {
    let text = if text.is_empty() { crate::policy::default_key_policy(&scope.account) } else { text.to_string() };
    Policy::parse_key_policy(&text).map(Arc::new).map_err(|e| e.to_string())
}

/// An in-memory change that follows a committed transaction. (Short-lived, and `Key` is by
/// far the most common, so it is not boxed.)
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Key(KeyRecord),
    /// The key and its material are gone from the store: drop them (zeroizing the material).
    KeyDestroyed(KeyId),
    Alias(AliasRow),
    AliasDeleted(String),
    KeyStore(KeyStore),
    KeyStoreDeleted(String),
}

/// The error for using a key store that is not connected.
pub fn not_connected(store: &KeyStore) -> KmsError {
    KmsError::new(
        ErrorKind::CustomKeyStoreInvalidStateException,
        format!(
            "Custom key store '{}' ({}) is {}; connect it with ConnectCustomKeyStore",
            store.row.id,
            store.row.name,
            store.connection.state()
        ),
    )
}

/// The checks AWS applies to a key's state before an operation.
pub fn require_usable(agent: &Agent, key: &KeyRecord) -> Result<(), KmsError> {
    match key.state() {
        KeyState::Enabled => Ok(()),
        KeyState::Unavailable => Err(KmsError::invalid_state(format!(
            "{} is unavailable: its custom key store {} is not connected.",
            agent.key_arn(&key.row.id),
            key.row.custom_key_store_id.as_deref().unwrap_or("")
        ))),
        KeyState::Disabled => Err(KmsError::new(
            kmsfs_common::ErrorKind::DisabledException,
            format!("{} is disabled.", agent.key_arn(&key.row.id)),
        )),
        KeyState::PendingDeletion => {
            Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&key.row.id))))
        }
        KeyState::PendingReplicaDeletion => {
            Err(KmsError::invalid_state(format!("{} is pending replica deletion.", agent.key_arn(&key.row.id))))
        }
        KeyState::PendingImport => {
            Err(KmsError::invalid_state(format!("{} is pending import.", agent.key_arn(&key.row.id))))
        }
    }
}

// A poisoned lock means a thread panicked mid-update of plain maps whose every update is
// a single insert or remove; the maps are still consistent, so keep serving.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
