//! Key lifecycle: CreateKey, DescribeKey, ListKeys, EnableKey, DisableKey,
//! UpdateKeyDescription, ScheduleKeyDeletion and CancelKeyDeletion.
//!
//! `MultiRegion: true` makes a multi-Region primary key (`mrk-…`); replicas are made by
//! ReplicateKey (`super::replicas`). ScheduleKeyDeletion moves a key to PendingDeletion; destroying its material when the
//! window ends is the scheduler's job.

use std::collections::BTreeMap;

use kmsfs_common::aead::random_bytes;
use kmsfs_common::ids::KeyId;
use kmsfs_common::time::millis_to_wire;
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::policies::parse_key_policy;
use super::tags::{validate_new_tags, Tag};
use super::wire::{paginate, parse, with_page_info, with_request_alias};
use crate::agent::{Agent, Change, KeyRecord, Material};
use crate::asymmetric::{spec_info, PrivateKey};
use crate::policy::eval::Caller;
use crate::policy::keys as ck;
use crate::rot::RootOfTrust;
use crate::store::{KeyRow, KeyState, MaterialRow};

const DAY_MS: i64 = 86_400_000;

/// The KeyMetadata structure of a key.
pub fn key_metadata(agent: &Agent, key: &KeyRecord) -> Value {
    let row = &key.row;
    let mut meta = json!({
        "AWSAccountId": agent.scope.account,
        "KeyId": row.id.to_string(),
        "Arn": agent.key_arn(&row.id),
        "CreationDate": millis_to_wire(row.created_ms),
        "Enabled": row.state == KeyState::Enabled,
        "Description": row.description,
        "KeyUsage": row.key_usage,
        "KeyState": key.state().as_str(),
        "Origin": row.origin,
        "KeyManager": "CUSTOMER",
        "KeySpec": row.key_spec,
        "MultiRegion": row.multi_region.is_some(),
    });
    if let Some(config) = &row.multi_region {
        meta["MultiRegionConfiguration"] = multi_region_configuration(agent, &row.id, config);
    }
    add_legacy_spec(&mut meta, &row.key_spec);
    add_algorithms(&mut meta, row);
    if let Ok(current) = key.current() {
        meta["CurrentKeyMaterialId"] = json!(current.material_id());
        if let Some(model) = &current.row.expiration_model {
            meta["ExpirationModel"] = json!(model);
        }
        if let Some(valid_to) = current.row.valid_to_ms {
            meta["ValidTo"] = json!(millis_to_wire(valid_to));
        }
    }
    if let Some(store_id) = &row.custom_key_store_id {
        meta["CustomKeyStoreId"] = json!(store_id);
        if let Ok(store) = agent.key_store(store_id) {
            meta["CloudHsmClusterId"] = json!(store.row.cluster_id);
        }
    }
    if let Some(deletion) = row.deletion_ms {
        meta["DeletionDate"] = json!(millis_to_wire(deletion));
    }
    if let Some(days) = row.pending_days {
        meta["PendingDeletionWindowInDays"] = json!(days);
    }
    meta
}

/// DescribeKey's `MultiRegionConfiguration` of a multi-Region key, as this agent knows it.
pub fn multi_region_configuration(agent: &Agent, id: &KeyId, config: &crate::store::MultiRegion) -> Value {
    let arn_in = |region: &str| {
        kmsfs_common::ids::ArnScope { region: region.to_string(), account: agent.scope.account.clone() }.key_arn(id)
    };
    let key_type = if config.primary == agent.scope.region { "PRIMARY" } else { "REPLICA" };
    json!({
        "MultiRegionKeyType": key_type,
        "PrimaryKey": {"Arn": arn_in(&config.primary), "Region": config.primary},
        "ReplicaKeys": config.replicas.iter().map(|r| json!({"Arn": arn_in(r), "Region": r})).collect::<Vec<_>>(),
    })
}

/// The deprecated `CustomerMasterKeySpec` beside `KeySpec`, for the specs its enumeration has
/// (it lacks the newer ones: Ed25519 and ML-DSA).
pub fn add_legacy_spec(out: &mut Value, spec: &str) {
    if spec != "ECC_NIST_EDWARDS25519" && !spec.starts_with("ML_DSA_") {
        out["CustomerMasterKeySpec"] = json!(spec);
    }
}

/// The algorithm lists AWS shows for a key of this spec and usage (DescribeKey, GetPublicKey):
/// only those of its usage, and none that are empty.
pub fn add_algorithms(out: &mut Value, row: &KeyRow) {
    let Some(info) = spec_info(&row.key_spec) else { return };
    let algorithms = info.algorithms(&row.key_usage);
    for (member, list) in [
        ("EncryptionAlgorithms", algorithms.encryption),
        ("SigningAlgorithms", algorithms.signing),
        ("MacAlgorithms", algorithms.mac),
        ("KeyAgreementAlgorithms", algorithms.key_agreement),
    ] {
        if !list.is_empty() {
            out[member] = json!(list);
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateKeyRequest {
    policy: Option<String>,
    description: Option<String>,
    key_usage: Option<String>,
    customer_master_key_spec: Option<String>,
    key_spec: Option<String>,
    origin: Option<String>,
    custom_key_store_id: Option<String>,
    tags: Option<Vec<Tag>>,
    multi_region: Option<bool>,
    xks_key_id: Option<String>,
    #[serde(default)]
    bypass_policy_lockout_safety_check: bool,
}

pub fn create_key(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: CreateKeyRequest = parse(request)?;
    let bypass = req.bypass_policy_lockout_safety_check;
    agent.authorize_account(caller, "CreateKey", |c| {
        c.with(ck::BYPASS_POLICY_LOCKOUT_SAFETY_CHECK, bypass.to_string())
            .with(ck::KEY_SPEC, req.key_spec.clone().unwrap_or_else(|| "SYMMETRIC_DEFAULT".into()))
            .with(ck::KEY_USAGE, req.key_usage.clone().unwrap_or_else(|| "ENCRYPT_DECRYPT".into()))
            .with(ck::KEY_ORIGIN, req.origin.clone().unwrap_or_else(|| "AWS_KMS".into()))
    })?;
    let unsupported = |what: &str| KmsError::new(ErrorKind::UnsupportedOperationException, what.to_string());
    if req.key_spec.is_some() && req.customer_master_key_spec.is_some() {
        return Err(KmsError::validation("KeySpec and CustomerMasterKeySpec cannot both be specified; use KeySpec"));
    }
    let key_spec = req.key_spec.or(req.customer_master_key_spec).unwrap_or_else(|| "SYMMETRIC_DEFAULT".into());
    let info = spec_info(&key_spec)
        .ok_or_else(|| unsupported(&format!("KeySpec {key_spec} is not supported by this version of kmsd")))?;
    let key_usage = req.key_usage.unwrap_or_else(|| "ENCRYPT_DECRYPT".into());
    if !info.usages.contains(&key_usage.as_str()) {
        return Err(KmsError::validation(format!("KeyUsage {key_usage} is not compatible with KeySpec {key_spec}")));
    }
    let asymmetric = key_spec != "SYMMETRIC_DEFAULT";
    let origin = req.origin.unwrap_or_else(|| "AWS_KMS".into());
    let key_store = match (origin.as_str(), &req.custom_key_store_id) {
        ("AWS_KMS" | "EXTERNAL", None) => None,
        ("AWS_CLOUDHSM", Some(id)) => {
            let store = agent.key_store(id)?;
            if store.root().is_none() {
                return Err(crate::agent::not_connected(&store));
            }
            Some(store)
        }
        ("AWS_CLOUDHSM", None) => {
            return Err(unsupported("Origin AWS_CLOUDHSM needs the CustomKeyStoreId of a custom key store"))
        }
        ("EXTERNAL_KEY_STORE", _) => {
            return Err(unsupported(
                "External key stores are not supported: kmsd's custom key stores are PKCS#11 tokens (Origin \
                 AWS_CLOUDHSM)",
            ))
        }
        (_, Some(_)) => {
            return Err(unsupported(&format!(
                "CustomKeyStoreId needs Origin AWS_CLOUDHSM (a key generated in the key store), not {origin}"
            )))
        }
        (_, None) => {
            return Err(KmsError::validation(format!(
                "Origin {origin} is not one of AWS_KMS, EXTERNAL, AWS_CLOUDHSM, EXTERNAL_KEY_STORE"
            )))
        }
    };
    if req.xks_key_id.is_some() {
        return Err(unsupported("XksKeyId applies to external key stores, which are not supported"));
    }
    if asymmetric && !matches!(origin.as_str(), "AWS_KMS" | "EXTERNAL") {
        return Err(unsupported(&format!(
            "{key_spec} keys are of Origin AWS_KMS or EXTERNAL: custom key stores hold symmetric keys only"
        )));
    }
    let multi_region = req.multi_region == Some(true);
    if multi_region {
        if key_store.is_some() {
            return Err(unsupported("Multi-Region keys cannot be created in a custom key store"));
        }
        if origin == "EXTERNAL" {
            return Err(unsupported(
                "Multi-Region keys of imported material are not supported by kmsd: create the key with Origin \
                 AWS_KMS",
            ));
        }
        if !agent.root().exports_material() {
            return Err(unsupported(&format!(
                "Multi-Region keys need material that can be replicated; the root of trust {} keeps it in the \
                 token",
                agent.root().describe()
            )));
        }
    }
    let policy = match &req.policy {
        Some(text) => Some((text.clone(), std::sync::Arc::new(parse_key_policy(text)?))),
        None => None,
    };
    let tags = validate_new_tags(&BTreeMap::new(), req.tags.unwrap_or_default())?;

    let id = if multi_region { KeyId::random_multi_region() } else { KeyId::random() };
    let now = agent.now_ms();
    // An EXTERNAL key starts without material, waiting for ImportKeyMaterial.
    let external = origin == "EXTERNAL";
    let first = if external {
        None
    } else {
        Some(if asymmetric {
            let (private, secret) = PrivateKey::generate(&key_spec, &key_usage)?;
            let stored = agent.root().seal_secret(&id, 1, &secret)?;
            let row = MaterialRow::generated(id, 1, random_material_id(), stored, now);
            Material { row, key: None, private: Some(std::sync::Arc::new(private)) }
        } else {
            let (key, stored) = match &key_store {
                Some(store) => store.root().ok_or_else(|| crate::agent::not_connected(store))?.generate(&id, 1)?,
                None => agent.root().generate(&id, 1)?,
            };
            Material::symmetric(MaterialRow::generated(id, 1, random_material_id(), stored, now), Some(key))
        })
    };
    let row = KeyRow {
        id,
        created_ms: now,
        description: req.description.unwrap_or_default(),
        key_usage,
        key_spec,
        origin,
        state: if external { KeyState::PendingImport } else { KeyState::Enabled },
        deletion_ms: None,
        pending_days: None,
        current_version: if external { 0 } else { 1 },
        policy: policy.as_ref().map(|(text, _)| text.clone()).unwrap_or_default(),
        rotation_period_days: None,
        next_rotation_ms: None,
        custom_key_store_id: key_store.as_ref().map(|s| s.row.id.clone()),
        multi_region: multi_region
            .then(|| crate::store::MultiRegion { primary: agent.scope.region.clone(), replicas: Vec::new() }),
    };
    let material_row = first.as_ref().map(|m| m.row.clone());
    let record = KeyRecord {
        row: row.clone(),
        tags: tags.clone(),
        materials: first.into_iter().map(|m| (1, m)).collect(),
        grants: Vec::new(),
        available: true,
        policy: match &policy {
            Some((_, parsed)) => parsed.clone(),
            None => crate::agent::parse_stored_policy(&agent.scope, "").map_err(KmsError::internal)?,
        },
    };
    let lockout = if bypass {
        Ok(())
    } else {
        agent.authz.check_lockout(&record.policy, &agent.key_context(caller, "PutKeyPolicy", &record))
    };
    let metadata = key_metadata(agent, &record);
    let created = lockout.and_then(|()| {
        agent.mutate(|store| {
            store.create_key(&row, material_row.as_ref(), &tags)?;
            Ok(((), vec![Change::Key(record)]))
        })
    });
    if let (Err(_), Some(material)) = (&created, &material_row) {
        // Material generated in a token would otherwise stay there, named by no key.
        if let (Ok(root), Some(stored)) = (agent.root_for(&row), &material.stored) {
            if let Err(e) = root.destroy(&id, 1, stored) {
                tracing::warn!(key_id = %id, "CreateKey failed and its material is left in the token: {}", e.message);
            }
        }
    }
    created?;
    tracing::info!(key_id = %id, "created key");
    Ok(json!({ "KeyMetadata": metadata }))
}

/// A new material version's `KeyMaterialId`: 64 random hex digits.
pub fn random_material_id() -> String {
    let mut id = [0u8; 32];
    random_bytes(&mut id);
    kmsfs_common::format::hex(&id)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyIdRequest {
    pub key_id: String,
}

pub fn describe_key(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, true)?;
    agent.authorize_key(caller, "DescribeKey", &key, |c| with_request_alias(c, &req.key_id))?;
    Ok(json!({ "KeyMetadata": key_metadata(agent, &key) }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListKeysRequest {
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn list_keys(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListKeysRequest = parse(request)?;
    agent.authorize_account(caller, "ListKeys", |c| c)?;
    let (page, next) =
        paginate(agent.keys_sorted(), |k| k.row.id.to_string(), req.limit, 100, 1000, req.marker.as_deref())?;
    let keys: Vec<Value> =
        page.iter().map(|k| json!({ "KeyId": k.row.id.to_string(), "KeyArn": agent.key_arn(&k.row.id) })).collect();
    Ok(with_page_info(json!({ "Keys": keys }), next))
}

/// GetKeyLastUsage: the last successful cryptographic operation with the key, as the
/// agent recorded it once its audit record was durable.
pub fn get_key_last_usage(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "GetKeyLastUsage", &key, |c| c)?;
    let (usage, tracking_start) = agent.last_usage(&key.row.id);
    let last = match usage {
        Some(u) => json!({
            "Operation": u.operation,
            "Timestamp": millis_to_wire(u.time_ms),
            "CloudTrailEventId": u.event_id,
            "KmsRequestId": u.request_id,
        }),
        None => json!({}),
    };
    Ok(json!({
        "KeyId": key.row.id.to_string(),
        "KeyLastUsage": last,
        "TrackingStartDate": millis_to_wire(tracking_start.max(key.row.created_ms)),
        "KeyCreationDate": millis_to_wire(key.row.created_ms),
    }))
}

/// Applies `change` to a key's row under the mutation lock, re-reading the key there so
/// that concurrent mutations of one key serialize.
fn update_row(
    agent: &Agent,
    authorized: impl FnOnce(&KeyRecord) -> Result<(), KmsError>,
    key_id: &str,
    change: impl FnOnce(&Agent, &mut KeyRow) -> Result<(), KmsError>,
) -> Result<KeyRecord, KmsError> {
    let key = agent.resolve(key_id, false)?;
    authorized(&key)?;
    let id = key.row.id;
    agent.mutate(|store| {
        let current = agent
            .key(&id)
            .ok_or_else(|| KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(&id))))?;
        let mut record = (*current).clone();
        change(agent, &mut record.row)?;
        if record.row != current.row {
            store.update_key(&record.row)?;
        }
        Ok((record.clone(), vec![Change::Key(record)]))
    })
}

fn pending_deletion(agent: &Agent, row: &KeyRow) -> KmsError {
    KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&row.id)))
}

pub fn enable_key(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    set_enabled(agent, caller, request, KeyState::Enabled)
}

pub fn disable_key(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    set_enabled(agent, caller, request, KeyState::Disabled)
}

/// EnableKey and DisableKey: idempotent, refused while the key is pending deletion.
fn set_enabled(agent: &Agent, caller: &Caller, request: Value, state: KeyState) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let action = if state == KeyState::Enabled { "EnableKey" } else { "DisableKey" };
    let authorized = |key: &KeyRecord| agent.authorize_key(caller, action, key, |c| c);
    update_row(agent, authorized, &req.key_id, |agent, row| match row.state {
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => Err(pending_deletion(agent, row)),
        KeyState::PendingImport => {
            Err(KmsError::invalid_state(format!("{} is pending import.", agent.key_arn(&row.id))))
        }
        _ => {
            row.state = state;
            Ok(())
        }
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateKeyDescriptionRequest {
    key_id: String,
    description: String,
}

pub fn update_key_description(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: UpdateKeyDescriptionRequest = parse(request)?;
    let authorized = |key: &KeyRecord| agent.authorize_key(caller, "UpdateKeyDescription", key, |c| c);
    update_row(agent, authorized, &req.key_id, |agent, row| match row.state {
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => Err(pending_deletion(agent, row)),
        _ => {
            row.description = req.description;
            Ok(())
        }
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduleKeyDeletionRequest {
    key_id: String,
    pending_window_in_days: Option<i64>,
}

pub fn schedule_key_deletion(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ScheduleKeyDeletionRequest = parse(request)?;
    let days = req.pending_window_in_days.unwrap_or(30);
    let authorized = |key: &KeyRecord| {
        agent.authorize_key(caller, "ScheduleKeyDeletion", key, |c| {
            c.with(ck::SCHEDULE_KEY_DELETION_PENDING_WINDOW_IN_DAYS, days.to_string())
        })
    };
    if !(7..=30).contains(&days) {
        return Err(KmsError::validation(format!(
            "PendingWindowInDays must be between 7 and 30 days; {days} was given"
        )));
    }
    let record = update_row(agent, authorized, &req.key_id, |agent, row| match row.state {
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => Err(pending_deletion(agent, row)),
        _ => {
            // A multi-Region primary waits for its replicas to be deleted before its own
            // waiting period begins, as in AWS.
            let has_replicas =
                row.multi_region.as_ref().is_some_and(|m| m.primary == agent.scope.region && !m.replicas.is_empty());
            row.state = if has_replicas { KeyState::PendingReplicaDeletion } else { KeyState::PendingDeletion };
            row.deletion_ms = (!has_replicas).then(|| agent.now_ms() + days * DAY_MS);
            row.pending_days = Some(days as u32);
            Ok(())
        }
    })?;
    tracing::info!(key_id = %record.row.id, days, "scheduled key deletion");
    let mut reply = json!({
        "KeyId": agent.key_arn(&record.row.id),
        "KeyState": record.row.state.as_str(),
        "PendingWindowInDays": days,
    });
    if let Some(deletion) = record.row.deletion_ms {
        reply["DeletionDate"] = json!(millis_to_wire(deletion));
    }
    Ok(reply)
}

pub fn cancel_key_deletion(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let authorized = |key: &KeyRecord| agent.authorize_key(caller, "CancelKeyDeletion", key, |c| c);
    let record = update_row(agent, authorized, &req.key_id, |agent, row| match row.state {
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => {
            // As in AWS, a key whose deletion is cancelled comes back disabled, or pending
            // import if its current material is not imported.
            let usable = agent.key(&row.id).is_some_and(|k| k.current().is_ok_and(Material::usable));
            row.state = if usable { KeyState::Disabled } else { KeyState::PendingImport };
            row.deletion_ms = None;
            row.pending_days = None;
            Ok(())
        }
        _ => Err(KmsError::invalid_state(format!("{} is not pending deletion.", agent.key_arn(&row.id)))),
    })?;
    Ok(json!({ "KeyId": agent.key_arn(&record.row.id) }))
}
