//! Key policies: PutKeyPolicy, GetKeyPolicy and ListKeyPolicies, and the policy a new key
//! gets. Each key has one policy, named `default` as in AWS; a key created without one
//! gets AWS's default key policy, which delegates to the account (identity policies).

use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::wire::{paginate, parse, with_page_info};
use crate::agent::{Agent, Change};
use crate::policy::eval::Caller;
use crate::policy::keys as ck;
use crate::policy::{defaults, Policy};

/// The only policy name a key has.
pub const POLICY_NAME: &str = "default";

/// The key's policy document as stored, or the default one for keys that predate policies.
pub fn policy_text(agent: &Agent, stored: &str) -> String {
    if stored.is_empty() {
        defaults::default_key_policy(&agent.scope.account)
    } else {
        stored.to_string()
    }
}

/// Parses a key policy, mapping problems to MalformedPolicyDocumentException.
pub fn parse_key_policy(text: &str) -> Result<Policy, KmsError> {
    Policy::parse_key_policy(text)
        .map_err(|e| KmsError::new(ErrorKind::MalformedPolicyDocumentException, e.to_string()))
}

fn check_name(name: Option<&str>) -> Result<(), KmsError> {
    match name {
        None | Some(POLICY_NAME) => Ok(()),
        Some(other) => {
            Err(KmsError::not_found(format!("Policy '{other}' does not exist; keys have one policy, named default")))
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutKeyPolicyRequest {
    key_id: String,
    policy_name: Option<String>,
    policy: String,
    #[serde(default)]
    bypass_policy_lockout_safety_check: bool,
}

pub fn put_key_policy(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: PutKeyPolicyRequest = parse(request)?;
    check_name(req.policy_name.as_deref())?;
    let key = agent.resolve(&req.key_id, false)?;
    let bypass = req.bypass_policy_lockout_safety_check;
    agent.authorize_key(caller, "PutKeyPolicy", &key, |c| {
        c.with(ck::BYPASS_POLICY_LOCKOUT_SAFETY_CHECK, bypass.to_string())
    })?;
    let policy = std::sync::Arc::new(parse_key_policy(&req.policy)?);
    if !bypass {
        agent.authz.check_lockout(&policy, &agent.key_context(caller, "PutKeyPolicy", &key))?;
    }
    let id = key.row.id;
    agent.mutate(|store| {
        let current = agent.key(&id).ok_or_else(|| KmsError::not_found("Key does not exist"))?;
        if current.row.state.is_pending_deletion() {
            return Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&id))));
        }
        let mut record = (*current).clone();
        record.row.policy = req.policy.clone();
        record.policy = policy.clone();
        store.update_key(&record.row)?;
        Ok(((), vec![Change::Key(record)]))
    })?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetKeyPolicyRequest {
    key_id: String,
    policy_name: Option<String>,
}

pub fn get_key_policy(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: GetKeyPolicyRequest = parse(request)?;
    check_name(req.policy_name.as_deref())?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "GetKeyPolicy", &key, |c| c)?;
    Ok(json!({ "Policy": policy_text(agent, &key.row.policy), "PolicyName": POLICY_NAME }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListKeyPoliciesRequest {
    key_id: String,
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn list_key_policies(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ListKeyPoliciesRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "ListKeyPolicies", &key, |c| c)?;
    let (page, next) =
        paginate(vec![POLICY_NAME.to_string()], |n| n.clone(), req.limit, 100, 1000, req.marker.as_deref())?;
    Ok(with_page_info(json!({ "PolicyNames": page }), next))
}
