//! The API: AWS KMS's actions, grouped as the service model groups them — key lifecycle
//! (`keys`), cryptographic operations (`crypto`), aliases and tags. `handle` is the one
//! entry point: it parses the JSON body, validates it against the service model and
//! dispatches to the action's handler.

mod aliases;
mod crypto;
mod grants;
mod import;
pub mod key_stores;
mod keys;
pub mod model;
mod policies;
pub mod replicas;
pub mod rotation;
pub mod signing;
mod tags;
mod wire;

use kmsfs_common::{ErrorKind, KmsError};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::agent::Agent;
use crate::policy::eval::Caller;

/// A successful response: a JSON object and, for actions that return plaintexts, the one
/// member holding them kept out of the `Value`, as JSON text in a zeroizing buffer.
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
    /// `body` with the secret string member `member`, whose value is base64.
    pub fn with_secret(body: Value, member: &'static str, base64: Zeroizing<String>) -> Reply {
        let mut quoted = Zeroizing::new(String::with_capacity(base64.len() + 2));
        quoted.push('"');
        quoted.push_str(&base64);
        quoted.push('"');
        Reply::with_secret_json(body, member, quoted)
    }

    /// `body` with the secret member `member`, whose value is the JSON text `json`.
    pub fn with_secret_json(body: Value, member: &'static str, json: Zeroizing<String>) -> Reply {
        Reply { body, secret: Some((member, json)) }
    }

    /// The body without its secret member.
    pub fn public_body(&self) -> &Value {
        &self.body
    }

    /// The JSON body. The secret member is spliced in before the closing brace, inside a
    /// buffer that is zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{}".to_vec()));
        if let Some((member, json)) = &self.secret {
            out.pop(); // the closing brace of the object
            out.reserve(member.len() + json.len() + 5);
            if out.len() > 1 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(member.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(json.as_bytes());
            out.push(b'}');
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
    if action.starts_with(replicas::PEER_PREFIX) {
        return replicas::peer_action(agent, caller, action, request).map(Reply::from);
    }
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
        GENERATE_DATA_KEYS => crypto::generate_data_keys(agent, caller, request),
        "EnableKeyRotation" => rotation::enable_key_rotation(agent, caller, request).map(Reply::from),
        "DisableKeyRotation" => rotation::disable_key_rotation(agent, caller, request).map(Reply::from),
        "GetKeyRotationStatus" => rotation::get_key_rotation_status(agent, caller, request).map(Reply::from),
        "RotateKeyOnDemand" => rotation::rotate_key_on_demand(agent, caller, request).map(Reply::from),
        "ListKeyRotations" => rotation::list_key_rotations(agent, caller, request).map(Reply::from),
        "GetParametersForImport" => import::get_parameters_for_import(agent, caller, request).map(Reply::from),
        "ImportKeyMaterial" => import::import_key_material(agent, caller, request).map(Reply::from),
        "DeleteImportedKeyMaterial" => import::delete_imported_key_material(agent, caller, request).map(Reply::from),
        "GetKeyLastUsage" => keys::get_key_last_usage(agent, caller, request).map(Reply::from),
        "PutKeyPolicy" => policies::put_key_policy(agent, caller, request).map(Reply::from),
        "GetKeyPolicy" => policies::get_key_policy(agent, caller, request).map(Reply::from),
        "ListKeyPolicies" => policies::list_key_policies(agent, caller, request).map(Reply::from),
        "CreateGrant" => grants::create_grant(agent, caller, request).map(Reply::from),
        "ListGrants" => grants::list_grants(agent, caller, request).map(Reply::from),
        "ListRetirableGrants" => grants::list_retirable_grants(agent, caller, request).map(Reply::from),
        "RetireGrant" => grants::retire_grant(agent, caller, request).map(Reply::from),
        "RevokeGrant" => grants::revoke_grant(agent, caller, request).map(Reply::from),
        "GenerateDataKeyPair" => crypto::generate_data_key_pair(agent, caller, request, true),
        "GenerateDataKeyPairWithoutPlaintext" => crypto::generate_data_key_pair(agent, caller, request, false),
        "DeriveSharedSecret" => signing::derive_shared_secret(agent, caller, request),
        "Sign" => signing::sign(agent, caller, request).map(Reply::from),
        "Verify" => signing::verify(agent, caller, request).map(Reply::from),
        "GetPublicKey" => signing::get_public_key(agent, caller, request).map(Reply::from),
        "GenerateMac" => signing::mac(agent, caller, request, false).map(Reply::from),
        "VerifyMac" => signing::mac(agent, caller, request, true).map(Reply::from),
        "CreateCustomKeyStore" => key_stores::create_custom_key_store(agent, caller, request).map(Reply::from),
        "DescribeCustomKeyStores" => key_stores::describe_custom_key_stores(agent, caller, request).map(Reply::from),
        "ConnectCustomKeyStore" => key_stores::connect_custom_key_store(agent, caller, request).map(Reply::from),
        "DisconnectCustomKeyStore" => key_stores::disconnect_custom_key_store(agent, caller, request).map(Reply::from),
        "UpdateCustomKeyStore" => key_stores::update_custom_key_store(agent, caller, request).map(Reply::from),
        "DeleteCustomKeyStore" => key_stores::delete_custom_key_store(agent, caller, request).map(Reply::from),
        "ReplicateKey" => replicas::replicate_key(agent, caller, request).map(Reply::from),
        "UpdatePrimaryRegion" => replicas::update_primary_region(agent, caller, request).map(Reply::from),
        _ => Err(KmsError::new(
            ErrorKind::UnsupportedOperationException,
            format!("{action} is not supported by this version of kmsd"),
        )),
    }
}

/// The keys the successful `action`, answered with `reply`, used for a cryptographic
/// operation that GetKeyLastUsage tracks (ReEncrypt uses two).
pub fn used_keys(action: &str, reply: &Value) -> Vec<kmsfs_common::ids::KeyId> {
    let tracked = matches!(
        action,
        "Encrypt"
            | "Decrypt"
            | "ReEncrypt"
            | "GenerateDataKey"
            | "GenerateDataKeyWithoutPlaintext"
            | GENERATE_DATA_KEYS
            | "GenerateDataKeyPair"
            | "GenerateDataKeyPairWithoutPlaintext"
            | "Sign"
            | "Verify"
            | "GenerateMac"
            | "VerifyMac"
            | "DeriveSharedSecret"
    );
    if !tracked {
        return Vec::new();
    }
    let key_of = |member: &str| match kmsfs_common::ids::KeyRef::parse(reply.get(member)?.as_str()?).ok()? {
        kmsfs_common::ids::KeyRef::KeyArn { id, .. } | kmsfs_common::ids::KeyRef::Id(id) => Some(id),
        _ => None,
    };
    ["KeyId", "SourceKeyId"].into_iter().filter_map(key_of).collect()
}

/// kmsd's batch GenerateDataKey (`crypto::generate_data_keys`), served beside AWS's actions.
pub const GENERATE_DATA_KEYS: &str = "Kmsfs.GenerateDataKeys";

/// Actions the server runs off the async executor: those that block on the store's
/// fsync, and batches, which take a while.
pub fn blocking(action: &str) -> bool {
    // GetParametersForImport generates an RSA key pair: up to seconds for RSA_4096.
    // GenerateDataKeyPair makes an RSA key pair, up to a second for RSA_4096.
    mutates(action)
        || matches!(
            action,
            GENERATE_DATA_KEYS
                | "GetParametersForImport"
                | "GenerateDataKeyPair"
                | "GenerateDataKeyPairWithoutPlaintext"
        )
}

/// Actions that write to the metadata store (and so block on fsync).
pub fn mutates(action: &str) -> bool {
    // The peer actions also wait on RSA key generation; ReplicateKey and UpdatePrimaryRegion
    // on a peer.
    action.starts_with(replicas::PEER_PREFIX)
        || matches!(
            action,
            "CreateKey"
                | "EnableKey"
                | "DisableKey"
                | "UpdateKeyDescription"
                | "ScheduleKeyDeletion"
                | "CancelKeyDeletion"
                | "EnableKeyRotation"
                | "DisableKeyRotation"
                | "RotateKeyOnDemand"
                | "ImportKeyMaterial"
                | "DeleteImportedKeyMaterial"
                | "CreateAlias"
                | "UpdateAlias"
                | "DeleteAlias"
                | "TagResource"
                | "UntagResource"
                | "PutKeyPolicy"
                | "CreateGrant"
                | "RetireGrant"
                | "RevokeGrant"
                | "CreateCustomKeyStore"
                | "ConnectCustomKeyStore"
                | "DisconnectCustomKeyStore"
                | "UpdateCustomKeyStore"
                | "DeleteCustomKeyStore"
                | "ReplicateKey"
                | "UpdatePrimaryRegion"
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
        let list = Zeroizing::new(r#"[{"Plaintext":"AA=="},{"Plaintext":"AQ=="}]"#.to_string());
        let reply = Reply::with_secret_json(json!({"KeyId": "k"}), "DataKeys", list);
        assert_eq!(reply.public_body(), &json!({"KeyId": "k"}));
        let v: Value = serde_json::from_slice(&reply.to_bytes()).unwrap();
        assert_eq!(v, json!({"KeyId": "k", "DataKeys": [{"Plaintext": "AA=="}, {"Plaintext": "AQ=="}]}));
    }
}
