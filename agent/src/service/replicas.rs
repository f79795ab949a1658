//! Multi-Region keys between agents, the analogue of AWS's multi-Region keys: a primary key
//! (`mrk-…`, made by CreateKey with `MultiRegion`) in this agent's region, and replicas of
//! it — same key ID, same material versions — on the agents of other regions (`peers.json`,
//! see `crate::peers`). A ciphertext made under any of them decrypts under every other,
//! since a blob names the key ID and material version and nothing else.
//!
//! AWS's actions, on the primary's agent:
//! - ReplicateKey asks the peer of `ReplicaRegion` for a fresh RSA_3072 wrapping key
//!   (`KmsfsPeer.GetReplicationParameters`), wraps every material version for it
//!   (RSA_AES_KEY_WRAP_SHA_256, as ImportKeyMaterial takes it) and sends them with the key's
//!   spec, the replica's own policy, description and tags (`KmsfsPeer.CreateReplica`), over
//!   TLS. The material is never on the wire in clear, and only that peer's agent can unwrap it.
//! - UpdatePrimaryRegion makes a replica the primary (`KmsfsPeer.SynchronizeReplica` with the
//!   new configuration) and this key a replica.
//! - A rotation of the primary sends the new version to every replica the same way. A replica
//!   that cannot be reached is marked in the store and brought up to date by the scheduler.
//! - ScheduleKeyDeletion of a primary with replicas leaves it PendingReplicaDeletion; when a
//!   replica's deletion window ends, its agent tells the primary's (`KmsfsPeer.RemoveReplica`,
//!   retried until it is heard), and once the last replica is gone the primary's own waiting
//!   period begins (PendingDeletion), as in AWS.
//!
//! The peer actions are served to SigV4-signed requests on the TCP listener, from a caller
//! that is the `Principal` of a peer in `peers.json` — which tells the receiving agent the
//! caller's region — and only as that region may ask: a replica takes its creation, material
//! and configuration from its primary's agent alone, a primary hears of a replica's deletion
//! from that replica's agent alone. Then the receiving agent authorizes the principal as its
//! own policies say: `kms:CreateKey` to create a replica, `kms:SynchronizeMultiRegionKey`
//! (AWS's name for the same internal permission) to update one. Policies, aliases, grants, tags, description and enablement belong to
//! each replica; key spec, usage, material and the rotation schedule belong to the key.

use std::collections::BTreeMap;
use std::sync::Arc;

use kmsfs_common::aead::KeyBytes;
use kmsfs_common::ids::KeyId;
use kmsfs_common::{ErrorKind, KmsError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::import::{open_token, seal_token, token_key};
use super::keys::key_metadata;
use super::policies::parse_key_policy;
use super::tags::{validate_new_tags, Tag};
use super::wire::{b64, parse, Blob};
use crate::agent::{Agent, Change, KeyRecord, Material};
use crate::asymmetric::PrivateKey;
use crate::policy::eval::Caller;
use crate::store::{KeyRow, KeyState, MaterialRow, MultiRegion};
use crate::wrapping::{WrappingAlgorithm, WrappingKey, WrappingKeySpec};

/// The `X-Amz-Target` prefix of the actions agents call on each other.
pub const PEER_PREFIX: &str = "KmsfsPeer.";
const GET_PARAMETERS: &str = "KmsfsPeer.GetReplicationParameters";
const CREATE_REPLICA: &str = "KmsfsPeer.CreateReplica";
const SYNCHRONIZE: &str = "KmsfsPeer.SynchronizeReplica";
const REMOVE_REPLICA: &str = "KmsfsPeer.RemoveReplica";

/// Replication tokens are import tokens under their own AAD: neither passes for the other.
const TOKEN_AAD: &[u8] = b"kmsd replication token v1";
/// A replication wrapping key is good for this long: it is used at once.
const TOKEN_LIFETIME_MS: i64 = 10 * 60_000;
const WRAPPING: WrappingAlgorithm = WrappingAlgorithm::RsaAesKeyWrapSha256;
const WRAPPING_SPEC: WrappingKeySpec = WrappingKeySpec::Rsa3072;

/// A base64 member of a peer's message, decoded as the agent decodes requests' blobs.
fn unb64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    super::model::BASE64.decode(text).ok()
}

fn unsupported(message: String) -> KmsError {
    KmsError::new(ErrorKind::UnsupportedOperationException, message)
}

fn lock(agent: &Agent) -> std::sync::MutexGuard<'_, ()> {
    agent.replication.lock().unwrap_or_else(|p| p.into_inner())
}

/// The configuration of a multi-Region key, or AWS's error for a key that is not one.
fn configuration<'k>(agent: &Agent, key: &'k KeyRecord) -> Result<&'k MultiRegion, KmsError> {
    key.row
        .multi_region
        .as_ref()
        .ok_or_else(|| unsupported(format!("{} is not a multi-Region key", agent.key_arn(&key.row.id))))
}

/// The configuration of a multi-Region primary key in this agent's region.
fn primary_configuration<'k>(agent: &Agent, key: &'k KeyRecord, action: &str) -> Result<&'k MultiRegion, KmsError> {
    let config = configuration(agent, key)?;
    if config.primary != agent.scope.region {
        return Err(unsupported(format!(
            "{} is a replica key: call {action} on its primary key, in region {}",
            agent.key_arn(&key.row.id),
            config.primary
        )));
    }
    Ok(config)
}

/// Whether `key` is a replica of a primary key in another region.
pub fn is_replica(agent: &Agent, row: &KeyRow) -> bool {
    row.multi_region.as_ref().is_some_and(|m| m.primary != agent.scope.region)
}

// ---- AWS's actions, on the primary's agent -------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReplicateKeyRequest {
    key_id: String,
    replica_region: String,
    policy: Option<String>,
    bypass_policy_lockout_safety_check: Option<bool>,
    description: Option<String>,
    tags: Option<Vec<Tag>>,
}

/// ReplicateKey: a replica of a multi-Region primary key on the agent of `ReplicaRegion`.
pub fn replicate_key(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ReplicateKeyRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "ReplicateKey", &key, |c| c.with("kms:ReplicaRegion", req.replica_region.clone()))?;
    if let Some(policy) = &req.policy {
        parse_key_policy(policy)?;
    }
    let tags = validate_new_tags(&BTreeMap::new(), req.tags.unwrap_or_default())?;
    let _serial = lock(agent);
    let key = agent.resolve(&req.key_id, false)?;
    let config = primary_configuration(agent, &key, "ReplicateKey")?;
    let region = req.replica_region.as_str();
    if config.regions().any(|r| r == region) {
        return Err(KmsError::new(
            ErrorKind::AlreadyExistsException,
            format!(
                "{} already has a {} key in region {region}",
                agent.key_arn(&key.row.id),
                if region == config.primary { "primary" } else { "replica" }
            ),
        ));
    }
    if key.state().is_pending_deletion() || matches!(key.state(), KeyState::PendingImport | KeyState::Unavailable) {
        return Err(KmsError::invalid_state(format!(
            "{} is {}: it cannot be replicated",
            agent.key_arn(&key.row.id),
            key.state().as_str()
        )));
    }
    let peer = agent.peers.get(region)?;
    let mut new_config = config.clone();
    new_config.replicas.push(region.to_string());
    let (token, materials) = wrap_for_peer(agent, &peer, &key)?;
    let body = json!({
        "KeyId": key.row.id.to_string(),
        "ImportToken": token,
        "Key": KeyDescription::of(&key.row),
        "MultiRegion": new_config,
        "CurrentVersion": key.row.current_version,
        "EncryptedKeyMaterial": materials,
        "Policy": req.policy,
        "BypassPolicyLockoutSafetyCheck": req.bypass_policy_lockout_safety_check,
        "Description": req.description,
        "Tags": tags.iter().map(|(k, v)| json!({"TagKey": k, "TagValue": v})).collect::<Vec<_>>(),
    });
    let reply = peer.call(CREATE_REPLICA, &body)?;
    set_configuration(agent, &key.row.id, new_config.clone(), None)?;
    tracing::info!(key_id = %key.row.id, region, "replicated key");
    // The other replicas learn of the new one; one that cannot be reached now is retried.
    for other in new_config.replicas.iter().filter(|r| r.as_str() != region) {
        synchronize_or_mark(agent, &key.row.id, other, false);
    }
    Ok(json!({
        "ReplicaKeyMetadata": reply.get("ReplicaKeyMetadata").cloned().unwrap_or(Value::Null),
        "ReplicaPolicy": reply.get("ReplicaPolicy").cloned().unwrap_or(Value::Null),
        "ReplicaTags": reply.get("ReplicaTags").cloned().unwrap_or_else(|| json!([])),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdatePrimaryRegionRequest {
    key_id: String,
    primary_region: String,
}

/// UpdatePrimaryRegion: the replica in `PrimaryRegion` becomes the primary key, and this one
/// a replica. The rotation schedule moves with it.
pub fn update_primary_region(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: UpdatePrimaryRegionRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "UpdatePrimaryRegion", &key, |c| {
        c.with("kms:PrimaryRegion", req.primary_region.clone())
    })?;
    let _serial = lock(agent);
    let key = agent.resolve(&req.key_id, false)?;
    let config = primary_configuration(agent, &key, "UpdatePrimaryRegion")?;
    let target = req.primary_region.as_str();
    if target == config.primary {
        return Err(KmsError::validation(format!("{} is already the primary key", agent.key_arn(&key.row.id))));
    }
    if !config.replicas.iter().any(|r| r == target) {
        return Err(KmsError::not_found(format!(
            "{} has no replica key in region {target}: replicate it there first (ReplicateKey)",
            agent.key_arn(&key.row.id)
        )));
    }
    if key.state().is_pending_deletion() {
        return Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&key.row.id))));
    }
    let new_config = MultiRegion {
        primary: target.to_string(),
        replicas: config.regions().filter(|r| *r != target).map(str::to_string).collect(),
    };
    let peer = agent.peers.get(target)?;
    let body = json!({
        "KeyId": key.row.id.to_string(),
        "MultiRegion": new_config,
        "CurrentVersion": key.row.current_version,
        "Rotation": Rotation::of(&key.row),
    });
    peer.call(SYNCHRONIZE, &body)?;
    // This key is a replica now: the new primary's agent rotates, on the same schedule.
    set_configuration(
        agent,
        &key.row.id,
        new_config.clone(),
        Some(Rotation { period_days: key.row.rotation_period_days, next_ms: None }),
    )?;
    tracing::info!(key_id = %key.row.id, primary = target, "moved the primary key");
    for other in new_config.replicas.iter().filter(|r| r.as_str() != agent.scope.region) {
        if let Err(e) = synchronize(agent, &key.row.id, other, false) {
            tracing::warn!(key_id = %key.row.id, region = %other, "replica not told of its new primary: {}", e.message);
        }
    }
    Ok(json!({}))
}

/// After a rotation (`with_material`) or a change of the rotation schedule of `key`: sends
/// the new material or schedule to every replica of a primary key. A replica that cannot be
/// reached is marked, and the scheduler tries again.
pub fn propagate(agent: &Agent, key: &KeyRecord, with_material: bool) {
    let Some(config) = key.row.multi_region.as_ref().filter(|m| m.primary == agent.scope.region) else { return };
    for region in &config.replicas {
        synchronize_or_mark(agent, &key.row.id, region, with_material);
    }
}

/// Brings marked replicas up to date, and tells primaries of replicas destroyed here (the
/// scheduler's pass). Returns how many of these failed.
pub fn retry_pending(agent: &Agent) -> usize {
    retry_syncs(agent) + retry_removals(agent)
}

fn retry_removals(agent: &Agent) -> usize {
    let removals = match agent.mutate(|store| Ok((store.replica_removals()?, Vec::new()))) {
        Ok(removals) => removals,
        Err(e) => {
            tracing::warn!("cannot read the destroyed replicas to report: {}", e.message);
            return 0;
        }
    };
    let mut failed = 0;
    for (id, primary) in removals {
        let told = agent.peers.get(&primary).and_then(|peer| {
            peer.call(REMOVE_REPLICA, &json!({"KeyId": id.to_string(), "Region": agent.scope.region}))
        });
        match told {
            Ok(_) => {
                let _ = agent.mutate(|store| Ok((store.forget_replica_removal(&id)?, Vec::new())));
                tracing::info!(key_id = %id, primary = %primary, "told the primary's agent that this replica is deleted");
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(key_id = %id, primary = %primary, "the primary's agent does not know yet that this replica is deleted: {}", e.message);
            }
        }
    }
    failed
}

fn retry_syncs(agent: &Agent) -> usize {
    let pending = match agent.mutate(|store| Ok((store.pending_replica_syncs()?, Vec::new()))) {
        Ok(pending) => pending,
        Err(e) => {
            tracing::warn!("cannot read the replicas to synchronize: {}", e.message);
            return 0;
        }
    };
    let mut failed = 0;
    for (id, region) in pending {
        if synchronize(agent, &id, &region, true).is_ok() {
            let _ = agent.mutate(|store| Ok((store.set_replica_sync(&id, &region, false)?, Vec::new())));
            tracing::info!(key_id = %id, region = %region, "replica synchronized");
        } else {
            failed += 1;
        }
    }
    failed
}

fn synchronize_or_mark(agent: &Agent, id: &KeyId, region: &str, with_material: bool) {
    if let Err(e) = synchronize(agent, id, region, with_material) {
        tracing::warn!(key_id = %id, region, "replica not synchronized, retrying later: {}", e.message);
        if let Err(e) = agent.mutate(|store| Ok((store.set_replica_sync(id, region, true)?, Vec::new()))) {
            tracing::error!(key_id = %id, region, "cannot record the replica to synchronize: {}", e.message);
        }
        agent.wake_scheduler.notify_one();
    }
}

/// Sends the replica in `region` the key's configuration, rotation schedule and (if
/// `with_material`) every material version.
fn synchronize(agent: &Agent, id: &KeyId, region: &str, with_material: bool) -> Result<(), KmsError> {
    let key =
        agent.key(id).ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(id))))?;
    let config = configuration(agent, &key)?;
    if config.primary != agent.scope.region {
        return Ok(()); // no longer ours to synchronize
    }
    let peer = agent.peers.get(region)?;
    let mut body = json!({
        "KeyId": id.to_string(),
        "MultiRegion": config,
        "CurrentVersion": key.row.current_version,
        "Rotation": Rotation { period_days: key.row.rotation_period_days, next_ms: None },
    });
    if with_material {
        let (token, materials) = wrap_for_peer(agent, &peer, &key)?;
        body["ImportToken"] = json!(token);
        body["EncryptedKeyMaterial"] = serde_json::to_value(materials).unwrap_or_default();
    }
    peer.call(SYNCHRONIZE, &body).map(|_| ())
}

/// Commits a new configuration (and, for a key becoming a replica, its rotation schedule).
fn set_configuration(
    agent: &Agent,
    id: &KeyId,
    config: MultiRegion,
    rotation: Option<Rotation>,
) -> Result<(), KmsError> {
    agent.mutate(|store| {
        let current =
            agent.key(id).ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(id))))?;
        let mut record = (*current).clone();
        record.row.multi_region = Some(config);
        if let Some(rotation) = rotation {
            record.row.rotation_period_days = rotation.period_days;
            record.row.next_rotation_ms = rotation.next_ms;
        }
        store.update_key(&record.row)?;
        Ok(((), vec![Change::Key(record)]))
    })
}

/// Every usable material version of `key`, wrapped for `peer`'s agent under a wrapping key
/// it just made; returns its token with them.
fn wrap_for_peer(
    agent: &Agent,
    peer: &crate::peers::Peer,
    key: &KeyRecord,
) -> Result<(String, Vec<WireMaterial>), KmsError> {
    let params = peer.call(GET_PARAMETERS, &json!({"KeyId": key.row.id.to_string()}))?;
    let (Some(public), Some(token)) = (params["PublicKey"].as_str(), params["ImportToken"].as_str()) else {
        return Err(KmsError::internal(format!("the peer agent of region {} sent no wrapping key", peer.region)));
    };
    let public = unb64(public).ok_or_else(|| {
        KmsError::internal(format!("the peer agent of region {} sent a malformed wrapping key", peer.region))
    })?;
    let root = agent.root_for(&key.row)?;
    let mut out = Vec::new();
    for material in key.materials.values() {
        let Some(stored) = &material.row.stored else { continue };
        let (id, version) = (&key.row.id, material.row.version);
        let raw = if key.row.key_spec == "SYMMETRIC_DEFAULT" {
            root.export(id, version, stored)?
        } else {
            root.open_secret(id, version, stored)?
        };
        let wrapped = crate::wrapping::wrap(&public, WRAPPING, &raw)
            .map_err(|e| KmsError::internal(format!("cannot wrap key material for region {}: {e}", peer.region)))?;
        out.push(WireMaterial::of(&material.row, b64(&wrapped)));
    }
    Ok((token.to_string(), out))
}

// ---- The peer actions, on a replica's agent --------------------------------------------

/// Serves a `KmsfsPeer.` action.
pub fn peer_action(agent: &Agent, caller: &Caller, action: &str, request: Value) -> Result<Value, KmsError> {
    let Some(sender) = agent.peers.region_of(caller) else {
        return Err(KmsError::new(
            ErrorKind::AccessDeniedException,
            format!(
                "{} is not the agent of a peer region: {action} is for the agents named in {} (Principal)",
                caller.describe(),
                crate::peers::FILE_NAME
            ),
        ));
    };
    match action {
        GET_PARAMETERS => get_replication_parameters(agent, caller, request),
        CREATE_REPLICA => create_replica(agent, caller, &sender, request),
        SYNCHRONIZE => synchronize_replica(agent, caller, &sender, request),
        REMOVE_REPLICA => remove_replica(agent, caller, &sender, request),
        _ => Err(KmsError::new(ErrorKind::UnknownOperationException, format!("Unknown operation {action}"))),
    }
}

/// The key's properties a replica copies.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyDescription {
    key_spec: String,
    key_usage: String,
    origin: String,
    rotation: Rotation,
}

impl KeyDescription {
    fn of(row: &KeyRow) -> KeyDescription {
        KeyDescription {
            key_spec: row.key_spec.clone(),
            key_usage: row.key_usage.clone(),
            origin: row.origin.clone(),
            rotation: Rotation::of(row),
        }
    }
}

/// The key's automatic rotation: its period, and (for a key becoming the primary) when
/// the next one is due.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Rotation {
    period_days: Option<u32>,
    next_ms: Option<i64>,
}

impl Rotation {
    fn of(row: &KeyRow) -> Rotation {
        Rotation { period_days: row.rotation_period_days, next_ms: row.next_rotation_ms }
    }
}

/// One material version on the wire, wrapped for the receiving agent.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireMaterial {
    version: u32,
    key_material_id: String,
    created_ms: i64,
    rotation_type: Option<String>,
    rotation_ms: Option<i64>,
    encrypted_key_material: String,
}

impl WireMaterial {
    fn of(row: &MaterialRow, encrypted_key_material: String) -> WireMaterial {
        WireMaterial {
            version: row.version,
            key_material_id: row.material_id.clone(),
            created_ms: row.created_ms,
            rotation_type: row.rotation_type.clone(),
            rotation_ms: row.rotation_ms,
            encrypted_key_material,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyIdRequest {
    key_id: String,
}

fn multi_region_id(s: &str) -> Result<KeyId, KmsError> {
    KeyId::parse(s)
        .filter(KeyId::is_multi_region)
        .ok_or_else(|| KmsError::validation(format!("'{s}' is not a multi-Region key ID")))
}

fn get_replication_parameters(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let id = multi_region_id(&req.key_id)?;
    match agent.key(&id) {
        Some(key) => agent.authorize_key(caller, "SynchronizeMultiRegionKey", &key, |c| c)?,
        None => agent.authorize_account(caller, "CreateKey", |c| c)?,
    }
    let wrapping = WrappingKey::generate(WRAPPING_SPEC).map_err(KmsError::internal)?;
    let valid_to = agent.now_ms() + TOKEN_LIFETIME_MS;
    let token = seal_token(&token_key(agent)?, TOKEN_AAD, &id, valid_to, WRAPPING, WRAPPING_SPEC, &wrapping.to_pkcs8());
    Ok(json!({"PublicKey": b64(&wrapping.public_key_der()), "ImportToken": b64(&token)}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateReplicaRequest {
    key_id: String,
    import_token: Blob,
    key: KeyDescription,
    multi_region: MultiRegion,
    current_version: u32,
    /// Named as ImportKeyMaterial's member, which the audit trail leaves out.
    #[serde(rename = "EncryptedKeyMaterial")]
    materials: Vec<WireMaterial>,
    policy: Option<String>,
    bypass_policy_lockout_safety_check: Option<bool>,
    description: Option<String>,
    tags: Option<Vec<Tag>>,
}

fn create_replica(agent: &Agent, caller: &Caller, sender: &str, request: Value) -> Result<Value, KmsError> {
    let req: CreateReplicaRequest = parse(request)?;
    let id = multi_region_id(&req.key_id)?;
    agent.authorize_account(caller, "CreateKey", |c| c)?;
    check_configuration(agent, &req.multi_region, false)?;
    if req.multi_region.primary != sender {
        return Err(not_from(sender, "create a replica of a primary key in another region"));
    }
    let _serial = lock(agent);
    if let Some(existing) = agent.key(&id) {
        return Err(KmsError::new(
            ErrorKind::AlreadyExistsException,
            format!("{} already exists in region {}", agent.key_arn(&existing.row.id), agent.scope.region),
        ));
    }
    let policy = match &req.policy {
        Some(text) => Some((text.clone(), Arc::new(parse_key_policy(text)?))),
        None => None,
    };
    let tags = validate_new_tags(&BTreeMap::new(), req.tags.unwrap_or_default())?;
    let now = agent.now_ms();
    let materials = unwrap_materials(agent, &id, &req.key, &req.import_token.0, &req.materials)?;
    if !materials.contains_key(&req.current_version) {
        return Err(KmsError::validation(format!("the current material version {} was not sent", req.current_version)));
    }
    let row = KeyRow {
        id,
        created_ms: now,
        description: req.description.unwrap_or_default(),
        key_usage: req.key.key_usage,
        key_spec: req.key.key_spec,
        origin: req.key.origin,
        state: KeyState::Enabled,
        deletion_ms: None,
        pending_days: None,
        current_version: req.current_version,
        policy: policy.as_ref().map(|(text, _)| text.clone()).unwrap_or_default(),
        // A replica shows the key's rotation period; its primary's agent rotates.
        rotation_period_days: req.key.rotation.period_days,
        next_rotation_ms: None,
        custom_key_store_id: None,
        multi_region: Some(req.multi_region),
    };
    let record = KeyRecord {
        row: row.clone(),
        tags: tags.clone(),
        materials,
        grants: Vec::new(),
        available: true,
        policy: match &policy {
            Some((_, parsed)) => parsed.clone(),
            None => crate::agent::parse_stored_policy(&agent.scope, "").map_err(KmsError::internal)?,
        },
    };
    // The default key policy cannot lock anyone out. A policy of the caller's is checked
    // against the principal asking here, the primary's agent (whose user is not known here).
    if policy.is_some() && req.bypass_policy_lockout_safety_check != Some(true) {
        agent.authz.check_lockout(&record.policy, &agent.key_context(caller, "PutKeyPolicy", &record))?;
    }
    let rows: Vec<MaterialRow> = record.materials.values().map(|m| m.row.clone()).collect();
    let metadata = key_metadata(agent, &record);
    let policy_text = if row.policy.is_empty() {
        crate::policy::default_key_policy(&agent.scope.account)
    } else {
        row.policy.clone()
    };
    agent.mutate(|store| {
        store.create_replica(&row, &rows, &tags)?;
        Ok(((), vec![Change::Key(record)]))
    })?;
    tracing::info!(key_id = %id, primary = %row.multi_region.as_ref().map(|m| m.primary.as_str()).unwrap_or(""), "created replica key");
    Ok(json!({
        "ReplicaKeyMetadata": metadata,
        "ReplicaPolicy": policy_text,
        "ReplicaTags": tags.iter().map(|(k, v)| json!({"TagKey": k, "TagValue": v})).collect::<Vec<_>>(),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SynchronizeRequest {
    key_id: String,
    multi_region: MultiRegion,
    current_version: u32,
    rotation: Option<Rotation>,
    import_token: Option<Blob>,
    #[serde(rename = "EncryptedKeyMaterial")]
    materials: Option<Vec<WireMaterial>>,
}

/// A new configuration (a new replica elsewhere, a new primary, possibly this one) and
/// possibly new material versions, from the primary's agent.
fn synchronize_replica(agent: &Agent, caller: &Caller, sender: &str, request: Value) -> Result<Value, KmsError> {
    let req: SynchronizeRequest = parse(request)?;
    let id = multi_region_id(&req.key_id)?;
    let key =
        agent.key(&id).ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(&id))))?;
    agent.authorize_key(caller, "SynchronizeMultiRegionKey", &key, |c| c)?;
    // Only the primary's agent speaks for the key (so never to the agent holding it).
    if configuration(agent, &key)?.primary != sender {
        return Err(not_from(sender, &format!("synchronize {}, whose primary it does not hold", agent.key_arn(&id))));
    }
    check_configuration(agent, &req.multi_region, true)?;
    let _serial = lock(agent);
    let received = match (&req.import_token, &req.materials) {
        (Some(token), Some(materials)) => {
            unwrap_materials(agent, &id, &KeyDescription::of(&key.row), &token.0, materials)?
        }
        _ => BTreeMap::new(),
    };
    agent.mutate(|store| {
        let current = agent
            .key(&id)
            .ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(&id))))?;
        let mut record = (*current).clone();
        let mut added = Vec::new();
        for (version, material) in received {
            match record.materials.get(&version) {
                Some(have) if have.row.material_id == material.row.material_id => {}
                Some(_) => {
                    return Err(KmsError::internal(format!(
                        "material version {version} of {} differs from the primary's: the replica has diverged",
                        agent.key_arn(&id)
                    )))
                }
                None => {
                    added.push(material.row.clone());
                    record.materials.insert(version, material);
                }
            }
        }
        if !record.materials.contains_key(&req.current_version) {
            return Err(KmsError::validation(format!(
                "material version {} is not here: synchronize with material first",
                req.current_version
            )));
        }
        record.row.current_version = record.row.current_version.max(req.current_version);
        let becomes_primary = req.multi_region.primary == agent.scope.region;
        if let Some(rotation) = req.rotation {
            record.row.rotation_period_days = rotation.period_days;
            record.row.next_rotation_ms = if becomes_primary { rotation.next_ms } else { None };
        }
        record.row.multi_region = Some(req.multi_region.clone());
        let refs: Vec<&MaterialRow> = added.iter().collect();
        store.update_key_and_materials(&record.row, &refs)?;
        Ok(((), vec![Change::Key(record)]))
    })?;
    tracing::info!(key_id = %id, primary = %req.multi_region.primary, "synchronized multi-Region key");
    Ok(json!({"KeyId": agent.key_arn(&id)}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RemoveReplicaRequest {
    key_id: String,
    region: String,
}

/// The replica in `Region` was deleted: the primary forgets it, tells the other replicas, and
/// a primary PendingReplicaDeletion whose last replica this was begins its waiting period.
fn remove_replica(agent: &Agent, caller: &Caller, sender: &str, request: Value) -> Result<Value, KmsError> {
    let req: RemoveReplicaRequest = parse(request)?;
    let id = multi_region_id(&req.key_id)?;
    if req.region != sender {
        return Err(not_from(sender, &format!("report the deletion of the replica in {}", req.region)));
    }
    let Some(key) = agent.key(&id) else {
        // Already gone here too: nothing to forget.
        agent.authorize_account(caller, "SynchronizeMultiRegionKey", |c| c)?;
        return Ok(json!({}));
    };
    agent.authorize_key(caller, "SynchronizeMultiRegionKey", &key, |c| c)?;
    let _serial = lock(agent);
    let remaining = agent.mutate(|store| {
        let current = agent
            .key(&id)
            .ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(&id))))?;
        let mut record = (*current).clone();
        let Some(config) = record.row.multi_region.as_mut() else { return Ok((Vec::new(), Vec::new())) };
        if !config.replicas.contains(&req.region) {
            return Ok((Vec::new(), Vec::new()));
        }
        config.replicas.retain(|r| *r != req.region);
        let remaining = config.replicas.clone();
        if record.row.state == KeyState::PendingReplicaDeletion && remaining.is_empty() {
            let days = i64::from(record.row.pending_days.unwrap_or(30));
            record.row.state = KeyState::PendingDeletion;
            record.row.deletion_ms = Some(agent.now_ms() + days * 86_400_000);
        }
        store.update_key(&record.row)?;
        Ok((remaining, vec![Change::Key(record)]))
    })?;
    tracing::info!(key_id = %id, region = %req.region, "replica deleted");
    for region in remaining.iter().filter(|r| **r != agent.scope.region) {
        synchronize_or_mark(agent, &id, region, false);
    }
    Ok(json!({}))
}

/// The refusal of a peer action the sender's region may not ask for.
fn not_from(sender: &str, what: &str) -> KmsError {
    KmsError::new(ErrorKind::AccessDeniedException, format!("the agent of region {sender} may not {what}"))
}

/// A configuration from a peer must include this agent's region, and not twice.
fn check_configuration(agent: &Agent, config: &MultiRegion, may_be_primary: bool) -> Result<(), KmsError> {
    let own = agent.scope.region.as_str();
    let mut regions: Vec<&str> = config.regions().collect();
    regions.sort_unstable();
    regions.dedup();
    if regions.len() != config.replicas.len() + 1 {
        return Err(KmsError::validation("a multi-Region configuration names a region twice"));
    }
    let here =
        if may_be_primary { config.regions().any(|r| r == own) } else { config.replicas.iter().any(|r| r == own) };
    if !here {
        return Err(KmsError::validation(format!("the multi-Region configuration does not name this region ({own})")));
    }
    Ok(())
}

/// Unwraps material versions sent by a primary's agent and seals them under this agent's
/// root of trust.
fn unwrap_materials(
    agent: &Agent,
    id: &KeyId,
    key: &KeyDescription,
    token: &[u8],
    materials: &[WireMaterial],
) -> Result<BTreeMap<u32, Material>, KmsError> {
    let token = open_token(&token_key(agent)?, TOKEN_AAD, token)?;
    if token.key_id != *id || token.valid_to_ms < agent.now_ms() {
        return Err(KmsError::new(ErrorKind::InvalidImportTokenException, "The replication token is not valid"));
    }
    let wrapping = WrappingKey::from_pkcs8(&token.private_key).map_err(KmsError::internal)?;
    let mut out = BTreeMap::new();
    for wire in materials {
        let wrapped = unb64(&wire.encrypted_key_material)
            .ok_or_else(|| KmsError::validation("EncryptedKeyMaterial is not base64"))?;
        let raw: Zeroizing<Vec<u8>> = wrapping.unwrap(token.algorithm, &wrapped).map_err(|e| {
            KmsError::new(ErrorKind::IncorrectKeyMaterialException, format!("version {}: {e}", wire.version))
        })?;
        let row = |stored: Vec<u8>| MaterialRow {
            key_id: *id,
            version: wire.version,
            material_id: wire.key_material_id.clone(),
            stored: Some(stored),
            created_ms: wire.created_ms,
            rotation_type: wire.rotation_type.clone(),
            rotation_ms: wire.rotation_ms,
            imported: false,
            expiration_model: None,
            valid_to_ms: None,
            description: None,
        };
        let material = if key.key_spec == "SYMMETRIC_DEFAULT" {
            let bytes = KeyBytes::from_slice(&raw).ok_or_else(|| {
                KmsError::new(ErrorKind::IncorrectKeyMaterialException, "symmetric material is 32 bytes")
            })?;
            let (usable, stored) = agent.root().import(id, wire.version, &bytes)?;
            Material::symmetric(row(stored), Some(usable))
        } else {
            let private = PrivateKey::from_stored(&key.key_spec, &key.key_usage, &raw)?;
            let stored = agent.root().seal_secret(id, wire.version, &raw)?;
            Material { row: row(stored), key: None, private: Some(Arc::new(private)) }
        };
        out.insert(wire.version, material);
    }
    Ok(out)
}
