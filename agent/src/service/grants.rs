//! Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant and RevokeGrant.
//!
//! A grant lets one principal use a key for some operations, optionally only with a given
//! encryption context (EncryptionContextSubset / EncryptionContextEquals). Grants take
//! effect at once — the grant token is accepted but not needed, as in AWS once a grant
//! has become consistent. CreateGrant is idempotent by Name: the same name with the same
//! parameters returns the existing grant.

use std::collections::BTreeMap;

use kmsfs_common::aead::random_bytes;
use kmsfs_common::time::{millis_to_wire, now_millis};
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::{dry_run, paginate, parse, with_page_info};
use crate::agent::{Agent, Change, KeyRecord};
use crate::policy::decide::OPERATIONS_WITH_ENCRYPTION_CONTEXT;
use crate::policy::eval::Caller;
use crate::policy::keys as ck;
use crate::store::{GrantRow, KeyState};

/// AWS's quota of grants per KMS key.
pub const MAX_GRANTS_PER_KEY: usize = 50_000;

/// Grant operations that make sense for a symmetric encryption key.
const SYMMETRIC_OPERATIONS: &[&str] = &[
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
];

#[derive(Deserialize, Clone, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
struct Constraints {
    encryption_context_subset: Option<BTreeMap<String, String>>,
    encryption_context_equals: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateGrantRequest {
    key_id: String,
    grantee_principal: String,
    retiring_principal: Option<String>,
    operations: Vec<String>,
    constraints: Option<Constraints>,
    name: Option<String>,
    dry_run: Option<bool>,
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    random_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constraints_json(c: &Constraints) -> Value {
    match (&c.encryption_context_subset, &c.encryption_context_equals) {
        (Some(subset), _) => json!({ "EncryptionContextSubset": subset }),
        (_, Some(equals)) => json!({ "EncryptionContextEquals": equals }),
        _ => json!({}),
    }
}

pub fn create_grant(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: CreateGrantRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "CreateGrant", &key, |c| {
        let mut types = Vec::new();
        if let Some(c) = &req.constraints {
            if c.encryption_context_equals.is_some() {
                types.push("EncryptionContextEquals");
            }
            if c.encryption_context_subset.is_some() {
                types.push("EncryptionContextSubset");
            }
        }
        let c = c
            .with_values(ck::GRANT_OPERATIONS, req.operations.clone())
            .with(ck::GRANTEE_PRINCIPAL, req.grantee_principal.clone())
            .with_values(ck::GRANT_CONSTRAINT_TYPE, types)
            .with(ck::GRANT_IS_FOR_AWS_RESOURCE, "false");
        match &req.retiring_principal {
            Some(r) => c.with(ck::RETIRING_PRINCIPAL, r.clone()),
            None => c,
        }
    })?;
    match key.state() {
        // As in AWS, a key awaiting its imported material, or whose custom key store is
        // disconnected, can be granted already.
        KeyState::Enabled | KeyState::PendingImport | KeyState::Unavailable => {}
        KeyState::Disabled => {
            return Err(KmsError::new(
                ErrorKind::DisabledException,
                format!("{} is disabled.", agent.key_arn(&key.row.id)),
            ))
        }
        KeyState::PendingDeletion | KeyState::PendingReplicaDeletion => {
            return Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&key.row.id))))
        }
    }
    let mut operations = req.operations.clone();
    operations.sort();
    operations.dedup();
    if operations.is_empty() {
        return Err(KmsError::validation("Operations must name at least one operation"));
    }
    if let Some(bad) = operations.iter().find(|op| !SYMMETRIC_OPERATIONS.contains(&op.as_str())) {
        return Err(KmsError::validation(format!(
            "Grant operation {bad} is not valid for a symmetric encryption KMS key"
        )));
    }
    let constraints = match &req.constraints {
        None => None,
        Some(c) if c.encryption_context_subset.is_some() && c.encryption_context_equals.is_some() => {
            return Err(KmsError::validation(
                "Specify EncryptionContextSubset or EncryptionContextEquals in grant constraints, not both",
            ))
        }
        Some(c) if c.encryption_context_subset.is_none() && c.encryption_context_equals.is_none() => None,
        Some(c) => {
            // Constraints apply only to operations that carry an encryption context (the
            // evaluator's own list, so that what CreateGrant accepts is what it enforces).
            if let Some(op) = operations.iter().find(|op| !OPERATIONS_WITH_ENCRYPTION_CONTEXT.contains(&op.as_str())) {
                return Err(KmsError::validation(format!(
                    "Grant constraints apply only to operations with an encryption context; {op} has none"
                )));
            }
            Some(constraints_json(c))
        }
    };
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    let id = key.row.id;
    let issuing_account = format!("arn:aws:iam::{}:root", agent.scope.account);
    let grant = agent.mutate(|store| {
        let current = agent.key(&id).ok_or_else(|| KmsError::not_found("Key does not exist"))?;
        if let Some(name) = &req.name {
            let same = current.grants.iter().find(|g| {
                g.name.as_deref() == Some(name)
                    && g.grantee == req.grantee_principal
                    && g.retiring == req.retiring_principal
                    && g.operations == operations
                    && g.constraints == constraints
            });
            if let Some(existing) = same {
                return Ok((existing.clone(), vec![]));
            }
        }
        if current.grants.len() >= MAX_GRANTS_PER_KEY {
            return Err(KmsError::new(
                ErrorKind::LimitExceededException,
                format!("{} already has {MAX_GRANTS_PER_KEY} grants", agent.key_arn(&id)),
            ));
        }
        let grant = GrantRow {
            grant_id: random_hex(32),
            key_id: id,
            token: random_hex(48),
            name: req.name.clone(),
            grantee: req.grantee_principal.clone(),
            retiring: req.retiring_principal.clone(),
            operations: operations.clone(),
            constraints: constraints.clone(),
            issuing_account: issuing_account.clone(),
            created_ms: now_millis(),
        };
        store.insert_grant(&grant)?;
        let mut record = (*current).clone();
        record.grants.push(grant.clone());
        Ok((grant, vec![Change::Key(record)]))
    })?;
    tracing::info!(key_id = %id, grant_id = %grant.grant_id, grantee = %grant.grantee, "created grant");
    Ok(json!({ "GrantToken": grant.token, "GrantId": grant.grant_id }))
}

fn grant_entry(agent: &Agent, g: &GrantRow) -> Value {
    let mut entry = json!({
        "KeyId": agent.key_arn(&g.key_id),
        "GrantId": g.grant_id,
        "CreationDate": millis_to_wire(g.created_ms),
        "GranteePrincipal": g.grantee,
        "IssuingAccount": g.issuing_account,
        "Operations": g.operations,
    });
    if let Some(name) = &g.name {
        entry["Name"] = json!(name);
    }
    if let Some(retiring) = &g.retiring {
        entry["RetiringPrincipal"] = json!(retiring);
    }
    entry["Constraints"] = g.constraints.clone().unwrap_or_else(|| json!({}));
    entry
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListGrantsRequest {
    key_id: String,
    grant_id: Option<String>,
    grantee_principal: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn list_grants(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListGrantsRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "ListGrants", &key, |c| c)?;
    let mut grants: Vec<&GrantRow> = key
        .grants
        .iter()
        .filter(|g| req.grant_id.as_ref().is_none_or(|id| &g.grant_id == id))
        .filter(|g| req.grantee_principal.as_ref().is_none_or(|p| &g.grantee == p))
        .collect();
    grants.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
    let (page, next) = paginate(grants, |g| g.grant_id.clone(), req.limit, 50, 100, req.marker.as_deref())?;
    let entries: Vec<Value> = page.iter().map(|g| grant_entry(agent, g)).collect();
    Ok(with_page_info(json!({ "Grants": entries }), next))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListRetirableGrantsRequest {
    retiring_principal: String,
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn list_retirable_grants(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListRetirableGrantsRequest = parse(request)?;
    agent.authorize_account(caller, "ListRetirableGrants", |c| c)?;
    let keys = agent.keys_sorted();
    let mut grants: Vec<&GrantRow> = keys
        .iter()
        .flat_map(|k| k.grants.iter())
        .filter(|g| g.retiring.as_deref() == Some(req.retiring_principal.as_str()))
        .collect();
    grants.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
    let (page, next) = paginate(grants, |g| g.grant_id.clone(), req.limit, 50, 100, req.marker.as_deref())?;
    let entries: Vec<Value> = page.iter().map(|g| grant_entry(agent, g)).collect();
    Ok(with_page_info(json!({ "Grants": entries }), next))
}

/// Removes grant `grant_id` from `key`.
fn delete_grant(agent: &Agent, key: &KeyRecord, grant_id: &str) -> Result<(), KmsError> {
    let id = key.row.id;
    agent.mutate(|store| {
        let current = agent.key(&id).ok_or_else(|| KmsError::not_found("Key does not exist"))?;
        if !current.grants.iter().any(|g| g.grant_id == grant_id) {
            return Err(KmsError::not_found(format!("Grant {grant_id} does not exist on {}", agent.key_arn(&id))));
        }
        store.delete_grant(grant_id)?;
        let mut record = (*current).clone();
        record.grants.retain(|g| g.grant_id != grant_id);
        Ok(((), vec![Change::Key(record)]))
    })
}

fn check_grant_id(grant_id: &str) -> Result<(), KmsError> {
    if grant_id.len() != 64 || !grant_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KmsError::new(ErrorKind::InvalidGrantIdException, format!("'{grant_id}' is not a grant ID")));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RetireGrantRequest {
    grant_token: Option<String>,
    key_id: Option<String>,
    grant_id: Option<String>,
    dry_run: Option<bool>,
}

/// RetireGrant, by token or by key and grant ID. The retiring principal, or a grantee
/// whose grant includes RetireGrant, may retire it; so may whom the policies allow
/// `kms:RetireGrant` on the key.
pub fn retire_grant(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: RetireGrantRequest = parse(request)?;
    let (key, grant) = match (&req.grant_token, &req.key_id, &req.grant_id) {
        (Some(token), _, _) => {
            let found = agent.keys_sorted().into_iter().find_map(|k| {
                let g = k.grants.iter().find(|g| &g.token == token)?.clone();
                Some((k, g))
            });
            found.ok_or_else(|| KmsError::new(ErrorKind::InvalidGrantTokenException, "The grant token is not valid"))?
        }
        (None, Some(key_id), Some(grant_id)) => {
            check_grant_id(grant_id)?;
            let key = agent.resolve(key_id, false)?;
            let grant = key.grants.iter().find(|g| &g.grant_id == grant_id).cloned().ok_or_else(|| {
                KmsError::not_found(format!("Grant {grant_id} does not exist on {}", agent.key_arn(&key.row.id)))
            })?;
            (key, grant)
        }
        _ => return Err(KmsError::validation("Specify GrantToken, or KeyId and GrantId")),
    };
    let principals = caller.principal_arns();
    let is_retiring = grant.retiring.as_ref().is_some_and(|r| principals.contains(r));
    let is_grantee = principals.contains(&grant.grantee) && grant.operations.iter().any(|o| o == "RetireGrant");
    if !(is_retiring || is_grantee) {
        agent.authorize_key(caller, "RetireGrant", &key, |c| c)?;
    }
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    delete_grant(agent, &key, &grant.grant_id)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RevokeGrantRequest {
    key_id: String,
    grant_id: String,
    dry_run: Option<bool>,
}

pub fn revoke_grant(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: RevokeGrantRequest = parse(request)?;
    check_grant_id(&req.grant_id)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "RevokeGrant", &key, |c| c)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    delete_grant(agent, &key, &req.grant_id)?;
    Ok(json!({}))
}
