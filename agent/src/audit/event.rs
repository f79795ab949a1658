//! Building one request's CloudTrail-shaped record (`common/src/audit/AUDIT.md`): who
//! called, what was asked with every secret removed, what came back, and which keys it named.
//!
//! Secrets are removed by member name as the request is parsed, and their strings zeroized:
//! plaintexts, ciphertext blobs (which appear only as the key they name) and grant tokens
//! never reach a record. The encryption context is kept, as AWS keeps it.

use std::net::SocketAddr;

use base64::Engine;
use kmsfs_common::blob::CiphertextBlob;
use kmsfs_common::format::volume::{CONTEXT_FILE, CONTEXT_VOLUME};
use serde_json::{Map, Value};
use zeroize::Zeroize;

use crate::agent::Agent;
use crate::identity::Identity;
use crate::policy::eval::Caller;

/// Request members that carry secrets (or bearer tokens) and are never recorded.
/// (An import token holds a sealed wrapping key; AWS records neither it nor the wrapped
/// material. A key store's password is a token's PIN. Messages to sign or MAC, signatures
/// and MACs are left out as AWS leaves them out.)
const SECRET_REQUEST_MEMBERS: [&str; 10] = [
    "Plaintext",
    "CiphertextBlob",
    "GrantToken",
    "GrantTokens",
    "ImportToken",
    "EncryptedKeyMaterial",
    "KeyStorePassword",
    "Message",
    "Signature",
    "Mac",
];
/// Reply members never recorded.
const SECRET_RESPONSE_MEMBERS: [&str; 11] = [
    "Plaintext",
    "CiphertextBlob",
    "CiphertextForRecipient",
    "GrantToken",
    "ImportToken",
    "PublicKey",
    "Signature",
    "Mac",
    "PrivateKeyPlaintext",
    "PrivateKeyCiphertextBlob",
    "SharedSecret",
];
/// Request members that name a key.
const KEY_MEMBERS: [&str; 4] = ["KeyId", "TargetKeyId", "SourceKeyId", "DestinationKeyId"];
/// Request members holding an encryption context.
const CONTEXT_MEMBERS: [&str; 2] = ["EncryptionContext", "SourceEncryptionContext"];
/// The request member holding a batch's encryption contexts (`Kmsfs.GenerateDataKeys`).
const BATCH_CONTEXTS_MEMBER: &str = "EncryptionContexts";

/// `userIdentity` of a caller on the Unix socket, from the kernel's account of it.
pub fn unix_identity(identity: &Identity, caller: &Caller) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), "IAMUser".into());
    o.insert("principalId".into(), Value::from(identity.uid.to_string()));
    o.insert("arn".into(), Value::from(caller.user_arn()));
    o.insert("accountId".into(), Value::from(caller.account.clone()));
    o.insert("userName".into(), Value::from(caller.user.clone()));
    o.insert("uid".into(), Value::from(identity.uid));
    o.insert("gid".into(), Value::from(identity.gid));
    if let Some(pid) = identity.pid {
        o.insert("pid".into(), Value::from(pid));
    }
    if let Some(unit) = &identity.unit {
        o.insert("unit".into(), Value::from(unit.clone()));
    }
    if let Some(role) = caller.role_arn() {
        o.insert("roleArn".into(), Value::from(role));
    }
    if let Some(exe) = &identity.executable {
        o.insert("executable".into(), Value::from(exe.to_string_lossy().into_owned()));
    }
    Value::Object(o)
}

/// `userIdentity` of a TCP caller who signed with access key `access_key_id` of `arn`.
pub fn access_key_identity(arn: &str, access_key_id: &str, caller: &Caller) -> Value {
    serde_json::json!({
        "type": "IAMUser",
        "principalId": access_key_id,
        "arn": arn,
        "accountId": caller.account,
        "userName": caller.user,
        "accessKeyId": access_key_id,
    })
}

/// Adds to a TCP caller's `userIdentity` the identity of its connection's verified client
/// certificate (`tlsClient`) and the role it carries (`tlsClientArn`), when it has one.
pub fn add_tls_client(user_identity: &mut Value, tls_client: Option<&str>, account: &str) {
    let (Some(identity), Value::Object(o)) = (tls_client, user_identity) else { return };
    o.insert("tlsClient".into(), Value::from(identity));
    o.insert("tlsClientArn".into(), Value::from(Caller::tls_role_arn_of(account, identity)));
}

/// `userIdentity` of a TCP request whose signature did not authenticate: only the access
/// key it claimed, if its Authorization header names one.
pub fn unauthenticated_identity(authorization: Option<&str>) -> Value {
    let claimed = authorization
        .and_then(|h| h.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric()));
    match claimed {
        Some(id) => serde_json::json!({"type": "Unknown", "accessKeyId": id}),
        None => serde_json::json!({"type": "Unknown"}),
    }
}

/// `sourceIPAddress`: `unix` on the socket, the peer's IP on TCP.
pub fn source_address(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "unix".to_string(), |a| a.ip().to_string())
}

/// What a request's body says, for the record: its parameters without secrets, the keys it
/// names (resolved to ARNs where the agent knows them), and kmsfs's volume and file IDs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Inspected {
    pub parameters: Option<Value>,
    pub resources: Vec<String>,
    pub additional: Option<Value>,
}

/// Reads a request body for the record. Secret members are removed from the parsed object
/// and their text zeroized before anything else looks at it.
pub fn inspect_request(agent: &Agent, body: &[u8]) -> Inspected {
    let mut object = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        _ if body.iter().all(u8::is_ascii_whitespace) => Map::new(),
        _ => return Inspected::default(),
    };
    let mut resources = Vec::new();
    for member in SECRET_REQUEST_MEMBERS {
        if let Some(mut value) = object.remove(member) {
            if member == "CiphertextBlob" {
                if let Some(id) = value.as_str().and_then(blob_key) {
                    resources.push(agent.key_arn(&id));
                }
            }
            zeroize_value(&mut value);
        }
    }
    for member in KEY_MEMBERS {
        if let Some(reference) = object.get(member).and_then(Value::as_str) {
            if let Ok(key) = agent.resolve(reference, true) {
                resources.push(agent.key_arn(&key.row.id));
            }
        }
    }
    let additional = kmsfs_ids(&object);
    Inspected { parameters: Some(camel_case(object)), resources, additional }
}

/// The key a base64 ciphertext blob names, if it is one of ours.
fn blob_key(text: &str) -> Option<kmsfs_common::ids::KeyId> {
    let mut bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    let id = CiphertextBlob::parse(&bytes).ok().map(|b| b.key_id);
    bytes.zeroize();
    id
}

fn zeroize_value(value: &mut Value) {
    match value {
        Value::String(s) => s.zeroize(),
        Value::Array(items) => items.iter_mut().for_each(zeroize_value),
        Value::Object(members) => members.values_mut().for_each(zeroize_value),
        _ => {}
    }
}

/// kmsfs's volume and file IDs from an encryption context, as `additionalEventData`; from
/// a batch's `EncryptionContexts`, the volume they share and every file, in order.
fn kmsfs_ids(request: &Map<String, Value>) -> Option<Value> {
    let mut out = Map::new();
    if let Some(context) = CONTEXT_MEMBERS.iter().find_map(|m| request.get(*m)?.as_object()) {
        if let Some(volume) = context.get(CONTEXT_VOLUME) {
            out.insert("kmsfsVolume".into(), volume.clone());
        }
        if let Some(file) = context.get(CONTEXT_FILE) {
            out.insert("kmsfsFile".into(), file.clone());
        }
    } else if let Some(contexts) = request.get(BATCH_CONTEXTS_MEMBER).and_then(Value::as_array) {
        let contexts: Vec<&Map<String, Value>> = contexts.iter().filter_map(Value::as_object).collect();
        let volume = contexts.first().and_then(|c| c.get(CONTEXT_VOLUME));
        if volume.is_some() && contexts.iter().all(|c| c.get(CONTEXT_VOLUME) == volume) {
            out.insert("kmsfsVolume".into(), volume.cloned().unwrap_or_default());
        }
        let files: Vec<Value> = contexts.iter().filter_map(|c| c.get(CONTEXT_FILE).cloned()).collect();
        if !files.is_empty() {
            out.insert("kmsfsFiles".into(), Value::Array(files));
        }
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

/// `responseElements`: the reply of an action that changes state, without secrets; `null`
/// for reads, as AWS records them.
pub fn response_elements(mutates: bool, reply: &Value) -> Value {
    match reply {
        Value::Object(o) if mutates && !o.is_empty() => {
            let mut o = o.clone();
            for member in SECRET_RESPONSE_MEMBERS {
                o.remove(member);
            }
            camel_case(o)
        }
        _ => Value::Null,
    }
}

/// Keys a reply names (a new key's ARN, the key an Encrypt or Decrypt used).
pub fn reply_resources(reply: &Value) -> Vec<String> {
    let arn = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| s.starts_with("arn:")).map(str::to_string);
    [arn(reply.pointer("/KeyMetadata/Arn")), arn(reply.get("KeyId")), arn(reply.get("SourceKeyId"))]
        .into_iter()
        .flatten()
        .collect()
}

/// Top-level members in CloudTrail's lower camel case (`KeyId` → `keyId`).
fn camel_case(object: Map<String, Value>) -> Value {
    Value::Object(
        object
            .into_iter()
            .map(|(k, v)| {
                let mut chars = k.chars();
                let name = match chars.next() {
                    Some(first) => first.to_lowercase().chain(chars).collect(),
                    None => k,
                };
                (name, v)
            })
            .collect(),
    )
}

/// Everything one record says.
pub struct Record<'a> {
    pub time_ms: i64,
    pub event_source: &'a str,
    pub event_name: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub user_identity: Value,
    pub source_address: String,
    pub user_agent: Option<String>,
    pub request_id: &'a str,
    pub read_only: bool,
    pub inspected: Inspected,
    pub response_elements: Value,
    /// `errorCode` and `errorMessage`.
    pub error: Option<&'a (String, String)>,
}

impl Record<'_> {
    /// The event object (without `sequence` and `previousHash`, which the writer adds).
    pub fn into_event(self) -> Map<String, Value> {
        let mut o = Map::new();
        o.insert("eventVersion".into(), kmsfs_common::audit::EVENT_VERSION.into());
        o.insert("userIdentity".into(), self.user_identity);
        o.insert("eventTime".into(), kmsfs_common::audit::event_time(self.time_ms).into());
        o.insert("eventSource".into(), self.event_source.into());
        o.insert("eventName".into(), self.event_name.into());
        o.insert("awsRegion".into(), self.region.into());
        o.insert("sourceIPAddress".into(), self.source_address.into());
        if let Some(agent) = self.user_agent {
            o.insert("userAgent".into(), agent.into());
        }
        if let Some((code, message)) = self.error {
            o.insert("errorCode".into(), code.as_str().into());
            o.insert("errorMessage".into(), message.as_str().into());
        }
        o.insert("requestParameters".into(), self.inspected.parameters.unwrap_or(Value::Null));
        o.insert("responseElements".into(), self.response_elements);
        if let Some(additional) = self.inspected.additional {
            o.insert("additionalEventData".into(), additional);
        }
        o.insert("requestID".into(), self.request_id.into());
        o.insert("eventID".into(), uuid::Uuid::new_v4().to_string().into());
        o.insert("readOnly".into(), self.read_only.into());
        let mut arns = self.inspected.resources;
        arns.sort();
        arns.dedup();
        let resources: Vec<Value> = arns
            .into_iter()
            .map(|arn| serde_json::json!({"accountId": self.account, "type": "AWS::KMS::Key", "ARN": arn}))
            .collect();
        o.insert("resources".into(), Value::Array(resources));
        o.insert("eventType".into(), "AwsApiCall".into());
        o.insert("eventCategory".into(), "Management".into());
        o.insert("recipientAccountId".into(), self.account.into());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_lose_secrets_and_reads_record_nothing() {
        let reply = json!({"KeyId": "arn:aws:kms:r:1:key/k", "CiphertextBlob": "AAAA", "Plaintext": "BBBB", "GrantToken": "t", "GrantId": "g"});
        assert_eq!(response_elements(true, &reply), json!({"keyId": "arn:aws:kms:r:1:key/k", "grantId": "g"}));
        assert_eq!(response_elements(false, &reply), Value::Null);
        assert_eq!(response_elements(true, &json!({})), Value::Null);
        assert_eq!(reply_resources(&reply), vec!["arn:aws:kms:r:1:key/k".to_string()]);
    }

    #[test]
    fn kmsfs_ids_come_from_the_context() {
        let request = json!({"EncryptionContext": {"kmsfs:volume": "aa", "kmsfs:file": "bb"}});
        let ids = kmsfs_ids(request.as_object().unwrap()).unwrap();
        assert_eq!(ids, json!({"kmsfsVolume": "aa", "kmsfsFile": "bb"}));
        assert_eq!(kmsfs_ids(json!({"EncryptionContext": {"app": "x"}}).as_object().unwrap()), None);
        let batch = json!({"EncryptionContexts": [
            {"kmsfs:volume": "aa", "kmsfs:file": "b1"},
            {"kmsfs:volume": "aa", "kmsfs:file": "b2"},
        ]});
        let ids = kmsfs_ids(batch.as_object().unwrap()).unwrap();
        assert_eq!(ids, json!({"kmsfsVolume": "aa", "kmsfsFiles": ["b1", "b2"]}));
        let mixed = json!({"EncryptionContexts": [{"kmsfs:volume": "aa", "kmsfs:file": "b1"}, {"kmsfs:file": "b2"}]});
        assert_eq!(kmsfs_ids(mixed.as_object().unwrap()).unwrap(), json!({"kmsfsFiles": ["b1", "b2"]}));
    }

    #[test]
    fn claimed_access_keys_are_named_but_not_trusted() {
        let h = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/local/kms/aws4_request, SignedHeaders=host";
        assert_eq!(unauthenticated_identity(Some(h)), json!({"type": "Unknown", "accessKeyId": "AKIDEXAMPLE"}));
        assert_eq!(unauthenticated_identity(Some("Credential=\"x\n")), json!({"type": "Unknown"}));
        assert_eq!(unauthenticated_identity(None), json!({"type": "Unknown"}));
    }
}
