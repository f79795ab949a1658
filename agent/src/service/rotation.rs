//! Key rotation: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
//! RotateKeyOnDemand and ListKeyRotations, and [`rotate`], which the scheduler also calls
//! for automatic rotations.
//!
//! A rotation adds a material version and makes it current, in one transaction: new
//! ciphertexts name the new version, and every older version still decrypts (the blob
//! names the version that sealed it). Only symmetric keys rotate. Keys of origin
//! `AWS_KMS` get fresh material from the root of trust; `EXTERNAL` keys cannot rotate
//! automatically, and rotate on demand only to material already imported as
//! `NEW_KEY_MATERIAL` (state `PENDING_ROTATION`), as in AWS.
//!
//! Rotation here is synchronous: RotateKeyOnDemand returns once the new version is current,
//! so GetKeyRotationStatus never reports an on-demand rotation in progress.

use kmsfs_common::ids::KeyId;
use kmsfs_common::time::millis_to_wire;
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::keys::{random_material_id, KeyIdRequest};
use super::wire::{paginate, parse, with_page_info};
use crate::agent::{Agent, Change, KeyRecord, Material};
use crate::policy::eval::Caller;
use crate::policy::keys as ck;
use crate::store::{KeyState, MaterialRow};

const DAY_MS: i64 = 86_400_000;
/// AWS's default automatic rotation period.
pub const DEFAULT_ROTATION_PERIOD_DAYS: u32 = 365;
/// On-demand rotations allowed per key over its life (the service model's figure).
pub const MAX_ON_DEMAND_ROTATIONS: usize = 25;

/// How a rotation came about, with AWS's `RotationType` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationType {
    Automatic,
    OnDemand,
}

impl RotationType {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationType::Automatic => "AUTOMATIC",
            RotationType::OnDemand => "ON_DEMAND",
        }
    }
}

fn unsupported(message: String) -> KmsError {
    KmsError::new(ErrorKind::UnsupportedOperationException, message)
}

/// Rotation applies to symmetric encryption keys only.
fn require_symmetric(agent: &Agent, key: &KeyRecord, what: &str) -> Result<(), KmsError> {
    if key.row.key_spec != "SYMMETRIC_DEFAULT" {
        return Err(unsupported(format!(
            "{} is not a symmetric encryption key ({}): {what} applies only to SYMMETRIC_DEFAULT keys",
            agent.key_arn(&key.row.id),
            key.row.key_spec
        )));
    }
    if let Some(store) = &key.row.custom_key_store_id {
        return Err(unsupported(format!(
            "{} is in custom key store {store}: {what} is not supported for keys in a custom key store",
            agent.key_arn(&key.row.id)
        )));
    }
    Ok(())
}

/// A replica's rotations are its primary key's.
fn require_not_replica(agent: &Agent, key: &KeyRecord, what: &str) -> Result<(), KmsError> {
    match &key.row.multi_region {
        Some(config) if super::replicas::is_replica(agent, &key.row) => Err(unsupported(format!(
            "{} is a replica key: {what} is set on its primary key, in region {}",
            agent.key_arn(&key.row.id),
            config.primary
        ))),
        _ => Ok(()),
    }
}

/// Automatic rotation: symmetric keys whose material the root of trust generates.
fn require_automatic_rotation(agent: &Agent, key: &KeyRecord) -> Result<(), KmsError> {
    require_symmetric(agent, key, "automatic key rotation")?;
    require_not_replica(agent, key, "automatic key rotation")?;
    if key.row.origin != "AWS_KMS" {
        return Err(unsupported(format!(
            "{} has imported key material (Origin {}): automatic key rotation is not supported for it; import new \
             key material and use RotateKeyOnDemand",
            agent.key_arn(&key.row.id),
            key.row.origin
        )));
    }
    Ok(())
}

/// The states in which rotation settings and rotations may change, with AWS's exceptions.
fn require_enabled(agent: &Agent, key: &KeyRecord) -> Result<(), KmsError> {
    let arn = agent.key_arn(&key.row.id);
    match key.state() {
        KeyState::Enabled => Ok(()),
        KeyState::Disabled => Err(KmsError::new(ErrorKind::DisabledException, format!("{arn} is disabled."))),
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => {
            Err(KmsError::invalid_state(format!("{arn} is pending deletion.")))
        }
        KeyState::PendingImport => Err(KmsError::invalid_state(format!("{arn} is pending import."))),
        KeyState::Unavailable => Err(KmsError::invalid_state(format!("{arn} is unavailable."))),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnableKeyRotationRequest {
    key_id: String,
    rotation_period_in_days: Option<i64>,
}

pub fn enable_key_rotation(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: EnableKeyRotationRequest = parse(request)?;
    // The model bounds the period to 90..=2560 days.
    let period = req.rotation_period_in_days.map_or(DEFAULT_ROTATION_PERIOD_DAYS, |d| d as u32);
    set_rotation(agent, caller, &req.key_id, "EnableKeyRotation", Some(period))
}

pub fn disable_key_rotation(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    set_rotation(agent, caller, &req.key_id, "DisableKeyRotation", None)
}

/// EnableKeyRotation (`period` set) and DisableKeyRotation. Enabling starts the period from
/// now; changing the period of enabled rotation keeps the date it counts from.
fn set_rotation(
    agent: &Agent,
    caller: &Caller,
    key_id: &str,
    action: &str,
    period: Option<u32>,
) -> Result<Value, KmsError> {
    let key = agent.resolve(key_id, false)?;
    agent.authorize_key(caller, action, &key, |c| match period {
        Some(days) => c.with(ck::ROTATION_PERIOD_IN_DAYS, days.to_string()),
        None => c,
    })?;
    agent
        .mutate(|store| {
            let current = agent.key(&key.row.id).ok_or_else(|| gone(agent, &key.row.id))?;
            require_automatic_rotation(agent, &current)?;
            require_enabled(agent, &current)?;
            let mut record = (*current).clone();
            let row = &mut record.row;
            match period {
                Some(days) => {
                    let since = match (row.rotation_period_days, row.next_rotation_ms) {
                        (Some(old), Some(next)) => next - i64::from(old) * DAY_MS,
                        _ => agent.now_ms(),
                    };
                    row.rotation_period_days = Some(days);
                    row.next_rotation_ms = Some(since + i64::from(days) * DAY_MS);
                }
                None => {
                    row.rotation_period_days = None;
                    row.next_rotation_ms = None;
                }
            }
            if record.row != current.row {
                store.update_key(&record.row)?;
            }
            Ok((record.clone(), vec![Change::Key(record)]))
        })
        .map(|record| super::replicas::propagate(agent, &record, false))?;
    Ok(json!({}))
}

pub fn get_key_rotation_status(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "GetKeyRotationStatus", &key, |c| c)?;
    require_symmetric(agent, &key, "key rotation")?;
    let mut status = json!({
        "KeyId": agent.key_arn(&key.row.id),
        "KeyRotationEnabled": key.row.rotation_period_days.is_some(),
    });
    if let Some(days) = key.row.rotation_period_days {
        status["RotationPeriodInDays"] = json!(days);
    }
    if let Some(next) = key.row.next_rotation_ms {
        status["NextRotationDate"] = json!(millis_to_wire(next));
    }
    Ok(status)
}

pub fn rotate_key_on_demand(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "RotateKeyOnDemand", &key, |c| c)?;
    let record = rotate(agent, &key.row.id, RotationType::OnDemand)?;
    tracing::info!(key_id = %record.row.id, version = record.row.current_version, "rotated key on demand");
    Ok(json!({ "KeyId": agent.key_arn(&record.row.id) }))
}

/// Rotates key `id` now: a new material version becomes current, in one transaction.
/// Checks the key's spec, origin and state (and, on demand, AWS's limit); an automatic
/// rotation also moves `next_rotation_ms` one period on.
pub fn rotate(agent: &Agent, id: &KeyId, kind: RotationType) -> Result<KeyRecord, KmsError> {
    let rotated = agent.mutate(|store| {
        let current = agent.key(id).ok_or_else(|| gone(agent, id))?;
        match kind {
            RotationType::Automatic => require_automatic_rotation(agent, &current)?,
            RotationType::OnDemand => {
                require_symmetric(agent, &current, "on-demand key rotation")?;
                require_not_replica(agent, &current, "on-demand key rotation")?;
            }
        }
        require_enabled(agent, &current)?;
        let now = agent.now_ms();
        let mut record = (*current).clone();
        if kind == RotationType::OnDemand {
            let done =
                record.materials.values().filter(|m| m.row.rotation_type.as_deref() == Some("ON_DEMAND")).count();
            if done >= MAX_ON_DEMAND_ROTATIONS {
                return Err(KmsError::new(
                    ErrorKind::LimitExceededException,
                    format!("{} has been rotated on demand {done} times, the most allowed per key", agent.key_arn(id)),
                ));
            }
        }
        let version = if record.row.origin == "EXTERNAL" {
            // The new material was imported beforehand; it only becomes current.
            let pending = record
                .materials
                .values_mut()
                .find(|m| m.row.version > record.row.current_version && m.key.is_some())
                .ok_or_else(|| {
                    KmsError::invalid_state(format!(
                        "{} has no key material pending rotation: import new key material (ImportType \
                         NEW_KEY_MATERIAL) before RotateKeyOnDemand",
                        agent.key_arn(id)
                    ))
                })?;
            pending.row.rotation_type = Some(kind.as_str().to_string());
            pending.row.rotation_ms = Some(now);
            pending.row.version
        } else {
            let version = record.materials.keys().next_back().copied().unwrap_or(0) + 1;
            let (key, stored) = agent.root().generate(id, version)?;
            let mut row = MaterialRow::generated(*id, version, random_material_id(), stored, now);
            row.rotation_type = Some(kind.as_str().to_string());
            row.rotation_ms = Some(now);
            record.materials.insert(version, Material::symmetric(row, Some(key)));
            version
        };
        record.row.current_version = version;
        if kind == RotationType::Automatic {
            if let (Some(days), Some(due)) = (record.row.rotation_period_days, record.row.next_rotation_ms) {
                let period = i64::from(days) * DAY_MS;
                // Missed while kmsd was down: rotate once, then count from now.
                let next = if due + period > now { due + period } else { now + period };
                record.row.next_rotation_ms = Some(next);
            }
        }
        let material = &record.materials[&version].row;
        store.update_key_and_materials(&record.row, &[material])?;
        Ok((record.clone(), vec![Change::Key(record)]))
    })?;
    // A multi-Region primary's replicas get the new version.
    super::replicas::propagate(agent, &rotated, true);
    Ok(rotated)
}

fn gone(agent: &Agent, id: &KeyId) -> KmsError {
    KmsError::not_found(format!("Key '{}' does not exist", agent.key_arn(id)))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListKeyRotationsRequest {
    key_id: String,
    include_key_material: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
}

/// ListKeyRotations: the key's material versions, oldest first — by default those made by
/// rotations; with `ALL_KEY_MATERIAL`, also the first and any imported ones pending rotation.
pub fn list_key_rotations(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListKeyRotationsRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "ListKeyRotations", &key, |c| c)?;
    require_symmetric(agent, &key, "ListKeyRotations")?;
    let all = req.include_key_material.as_deref() == Some("ALL_KEY_MATERIAL");
    let versions: Vec<&Material> = key.materials.values().filter(|m| all || m.row.rotation_type.is_some()).collect();
    let (page, next) =
        paginate(versions, |m| format!("{:010}", m.row.version), req.limit, 100, 1000, req.marker.as_deref())?;
    let arn = agent.key_arn(&key.row.id);
    let rotations: Vec<Value> = page.iter().map(|m| rotation_entry(&arn, &key, m)).collect();
    Ok(with_page_info(json!({ "Rotations": rotations }), next))
}

/// One RotationsListEntry.
fn rotation_entry(arn: &str, key: &KeyRecord, m: &Material) -> Value {
    let row = &m.row;
    let state = match row.version.cmp(&key.row.current_version) {
        std::cmp::Ordering::Equal => "CURRENT",
        std::cmp::Ordering::Less => "NON_CURRENT",
        std::cmp::Ordering::Greater => "PENDING_ROTATION",
    };
    let mut entry = json!({ "KeyId": arn, "KeyMaterialId": row.material_id, "KeyMaterialState": state });
    if let Some(kind) = &row.rotation_type {
        entry["RotationType"] = json!(kind);
    }
    if let Some(at) = row.rotation_ms {
        entry["RotationDate"] = json!(millis_to_wire(at));
    }
    if row.imported {
        entry["ImportState"] = json!(if m.key.is_some() { "IMPORTED" } else { "PENDING_IMPORT" });
        if let Some(model) = &row.expiration_model {
            entry["ExpirationModel"] = json!(model);
        }
        if let Some(valid_to) = row.valid_to_ms {
            entry["ValidTo"] = json!(millis_to_wire(valid_to));
        }
        if let Some(description) = &row.description {
            entry["KeyMaterialDescription"] = json!(description);
        }
    }
    entry
}
