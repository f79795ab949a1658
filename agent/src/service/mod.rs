//! The API: AWS KMS's actions, grouped as the service model groups them — key lifecycle
//! (`keys`), cryptographic operations (`crypto`), aliases and tags. `handle` is the one
//! entry point: it parses the JSON body, validates it against the service model and
//! dispatches to the action's handler.

mod aliases;
mod crypto;
mod grants;
mod keys;
pub mod model;
mod policies;
mod tags;
mod wire;

use kmsfs_common::{ErrorKind, KmsError};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::agent::Agent;
use crate::policy::eval::Caller;

/// A successful response: a JSON object and, for actions that return a plaintext, that
/// one secret member kept out of the `Value` so that it lives only in zeroizing buffers.
pub struct Reply {
    body: Value,
    secret: Option<(&'static str, Zeroizing<String>)>,
}

impl From<Value> for Reply {
    fn from(body: Value) -> Reply {
        Reply { body, secret: None }
    }
}

impl Reply {
    pub fn with_secret(body: Value, member: &'static str, base64: Zeroizing<String>) -> Reply {
        Reply { body, secret: Some((member, base64)) }
    }

    /// The body without its secret member.
    pub fn public_body(&self) -> &Value {
        &self.body
    }

    /// The JSON body. The secret member (base64, which needs no JSON escaping) is spliced
    /// in before the closing brace, inside a buffer that is zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{}".to_vec()));
        if let Some((member, value)) = &self.secret {
            out.pop(); // the closing brace of the object
            out.reserve(member.len() + value.len() + 8);
            if out.len() > 1 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(member.as_bytes());
            out.extend_from_slice(b"\":\"");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\"}");
        }
        out
    }
}

/// Handles one request for `action` with the raw JSON `body`.
pub fn handle(agent: &Agent, caller: &Caller, action: &str, body: &[u8]) -> Result<Reply, KmsError> {
    let request: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(body).map_err(|e| {
            KmsError::new(ErrorKind::SerializationException, format!("The request body is not valid JSON: {e}"))
        })?
    };
    model::model().validate(action, &request)?;
    match action {
        "CreateKey" => keys::create_key(agent, caller, request).map(Reply::from),
        "DescribeKey" => keys::describe_key(agent, caller, request).map(Reply::from),
        "ListKeys" => keys::list_keys(agent, caller, request).map(Reply::from),
        "EnableKey" => keys::enable_key(agent, caller, request).map(Reply::from),
        "DisableKey" => keys::disable_key(agent, caller, request).map(Reply::from),
        "UpdateKeyDescription" => keys::update_key_description(agent, caller, request).map(Reply::from),
        "ScheduleKeyDeletion" => keys::schedule_key_deletion(agent, caller, request).map(Reply::from),
        "CancelKeyDeletion" => keys::cancel_key_deletion(agent, caller, request).map(Reply::from),
        "CreateAlias" => aliases::create_alias(agent, caller, request).map(Reply::from),
        "UpdateAlias" => aliases::update_alias(agent, caller, request).map(Reply::from),
        "DeleteAlias" => aliases::delete_alias(agent, caller, request).map(Reply::from),
        "ListAliases" => aliases::list_aliases(agent, caller, request).map(Reply::from),
        "TagResource" => tags::tag_resource(agent, caller, request).map(Reply::from),
        "UntagResource" => tags::untag_resource(agent, caller, request).map(Reply::from),
        "ListResourceTags" => tags::list_resource_tags(agent, caller, request).map(Reply::from),
        "Encrypt" => crypto::encrypt(agent, caller, request),
        "Decrypt" => crypto::decrypt(agent, caller, request),
        "ReEncrypt" => crypto::re_encrypt(agent, caller, request),
        "GenerateDataKey" => crypto::generate_data_key(agent, caller, request, true),
        "GenerateDataKeyWithoutPlaintext" => crypto::generate_data_key(agent, caller, request, false),
        "GenerateRandom" => crypto::generate_random(agent, caller, request),
        "PutKeyPolicy" => policies::put_key_policy(agent, caller, request).map(Reply::from),
        "GetKeyPolicy" => policies::get_key_policy(agent, caller, request).map(Reply::from),
        "ListKeyPolicies" => policies::list_key_policies(agent, caller, request).map(Reply::from),
        "CreateGrant" => grants::create_grant(agent, caller, request).map(Reply::from),
        "ListGrants" => grants::list_grants(agent, caller, request).map(Reply::from),
        "ListRetirableGrants" => grants::list_retirable_grants(agent, caller, request).map(Reply::from),
        "RetireGrant" => grants::retire_grant(agent, caller, request).map(Reply::from),
        "RevokeGrant" => grants::revoke_grant(agent, caller, request).map(Reply::from),
        _ => Err(KmsError::new(
            ErrorKind::UnsupportedOperationException,
            format!("{action} is not supported by this version of kmsd"),
        )),
    }
}

/// Actions that write to the metadata store (and so block on fsync); the server runs
/// them off the async executor.
pub fn mutates(action: &str) -> bool {
    matches!(
        action,
        "CreateKey"
            | "EnableKey"
            | "DisableKey"
            | "UpdateKeyDescription"
            | "ScheduleKeyDeletion"
            | "CancelKeyDeletion"
            | "CreateAlias"
            | "UpdateAlias"
            | "DeleteAlias"
            | "TagResource"
            | "UntagResource"
            | "PutKeyPolicy"
            | "CreateGrant"
            | "RetireGrant"
            | "RevokeGrant"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_spliced_into_valid_json() {
        let reply = Reply::with_secret(json!({"KeyId": "k"}), "Plaintext", Zeroizing::new("AAEC".into()));
        let v: Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
        assert_eq!(v, json!({"KeyId": "k", "Plaintext": "AAEC"}));
        let reply = Reply::with_secret(json!({}), "Plaintext", Zeroizing::new("AA==".into()));
        let v: Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
        assert_eq!(v, json!({"Plaintext": "AA=="}));
    }
}
