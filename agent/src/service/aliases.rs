//! Aliases: CreateAlias, UpdateAlias, DeleteAlias and ListAliases.
//!
//! Names begin with `alias/`; `alias/aws/` is reserved for AWS managed keys, which this
//! agent has none of. An alias points at a key by ID or ARN, never at another alias.

use kmsfs_common::ids::KeyRef;
use kmsfs_common::time::{millis_to_wire, now_millis};
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::{paginate, parse, with_page_info};
use crate::agent::{Agent, Change, KeyRecord};
use crate::policy::eval::Caller;
use crate::store::AliasRow;
use std::sync::Arc;

fn check_alias_name(name: &str) -> Result<(), KmsError> {
    if !name.starts_with("alias/") || name.len() == "alias/".len() {
        return Err(KmsError::new(
            ErrorKind::InvalidAliasNameException,
            format!("Alias name '{name}' must begin with 'alias/' followed by a name"),
        ));
    }
    if name.starts_with("alias/aws/") {
        return Err(KmsError::new(
            ErrorKind::InvalidAliasNameException,
            format!("Alias name '{name}' uses the prefix 'alias/aws/', which is reserved for AWS managed keys"),
        ));
    }
    Ok(())
}

/// The alias's target: a key ID or ARN of a key not pending deletion.
fn target(agent: &Agent, target_key_id: &str) -> Result<Arc<KeyRecord>, KmsError> {
    if KeyRef::parse(target_key_id).map(|r| r.is_alias()).unwrap_or(false) {
        return Err(KmsError::validation(format!(
            "TargetKeyId '{target_key_id}' is an alias; an alias must point at a key ID or key ARN"
        )));
    }
    let key = agent.resolve(target_key_id, false)?;
    if key.row.state.is_pending_deletion() {
        return Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&key.row.id))));
    }
    Ok(key)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AliasTargetRequest {
    alias_name: String,
    target_key_id: String,
}

pub fn create_alias(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: AliasTargetRequest = parse(request)?;
    check_alias_name(&req.alias_name)?;
    let key = target(agent, &req.target_key_id)?;
    agent.authorize_key(caller, "CreateAlias", &key, |c| c)?;
    agent.mutate(|store| {
        if agent.alias(&req.alias_name).is_some() {
            return Err(KmsError::new(
                ErrorKind::AlreadyExistsException,
                format!("An alias with the name {} already exists", agent.scope.alias_arn(&req.alias_name)),
            ));
        }
        let now = now_millis();
        let alias = AliasRow { name: req.alias_name.clone(), key_id: key.row.id, created_ms: now, updated_ms: now };
        store.insert_alias(&alias)?;
        Ok(((), vec![Change::Alias(alias)]))
    })?;
    Ok(json!({}))
}

pub fn update_alias(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: AliasTargetRequest = parse(request)?;
    check_alias_name(&req.alias_name)?;
    let key = target(agent, &req.target_key_id)?;
    // As in AWS: permission on both the key the alias leaves and the one it moves to.
    agent.authorize_key(caller, "UpdateAlias", &key, |c| c)?;
    if let Some(old) = agent.alias(&req.alias_name).and_then(|a| agent.key(&a.key_id)) {
        agent.authorize_key(caller, "UpdateAlias", &old, |c| c)?;
    }
    agent.mutate(|store| {
        let mut alias = agent.alias(&req.alias_name).ok_or_else(|| {
            KmsError::not_found(format!("Alias {} is not found.", agent.scope.alias_arn(&req.alias_name)))
        })?;
        alias.key_id = key.row.id;
        alias.updated_ms = now_millis();
        store.update_alias(&alias)?;
        Ok(((), vec![Change::Alias(alias)]))
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DeleteAliasRequest {
    alias_name: String,
}

pub fn delete_alias(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: DeleteAliasRequest = parse(request)?;
    check_alias_name(&req.alias_name)?;
    if let Some(key) = agent.alias(&req.alias_name).and_then(|a| agent.key(&a.key_id)) {
        agent.authorize_key(caller, "DeleteAlias", &key, |c| c)?;
    }
    agent.mutate(|store| {
        if agent.alias(&req.alias_name).is_none() {
            return Err(KmsError::not_found(format!("Alias {} is not found.", agent.scope.alias_arn(&req.alias_name))));
        }
        store.delete_alias(&req.alias_name)?;
        Ok(((), vec![Change::AliasDeleted(req.alias_name.clone())]))
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListAliasesRequest {
    key_id: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn list_aliases(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListAliasesRequest = parse(request)?;
    agent.authorize_account(caller, "ListAliases", |c| c)?;
    let filter = match &req.key_id {
        Some(k) => Some(agent.resolve(k, false)?.row.id),
        None => None,
    };
    let aliases: Vec<AliasRow> =
        agent.aliases().into_iter().filter(|a| filter.is_none_or(|id| a.key_id == id)).collect();
    let (page, next) = paginate(aliases, |a| a.name.clone(), req.limit, 50, 100, req.marker.as_deref())?;
    let entries: Vec<Value> = page
        .iter()
        .map(|a| {
            json!({
                "AliasName": a.name,
                "AliasArn": agent.scope.alias_arn(&a.name),
                "TargetKeyId": a.key_id.to_string(),
                "CreationDate": millis_to_wire(a.created_ms),
                "LastUpdatedDate": millis_to_wire(a.updated_ms),
            })
        })
        .collect();
    Ok(with_page_info(json!({ "Aliases": entries }), next))
}
