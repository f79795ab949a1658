//! What each subcommand asks of the agent: the action, its JSON 1.1 request (the API's
//! PascalCase members, blobs as base64, timestamps as epoch seconds) and how the response is
//! handled. Planning is pure; `paginate` follows `NextMarker` through a list action's pages,
//! as the aws CLI does, and `warning` says what a call's success means when it is not
//! obvious and cannot be undone later, or when the reply hides that it did not work.
//! Secret members (the key store password) are never planned from the command line: the
//! call names where they are to be read from, and `crate::password` reads them.

use std::collections::HashSet;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::time::iso8601;
use serde_json::{Map, Value};

use crate::args::{Blob, Context, GrantConstraints, GrantOperations, TagKeys, TagList, Timestamp};
use crate::cli::{BypassLockoutArg, Command, DryRunArg, GrantTokensArg, KeyStorePasswordArgs, PageArgs};
use crate::Failure;

/// One call to the agent.
#[derive(Debug, PartialEq)]
pub struct Call {
    /// The API action, e.g. `Encrypt`.
    pub action: &'static str,
    pub request: Value,
    pub mode: Mode,
    /// A secret member still to be read into `request` before the call.
    pub secret: Option<Secret>,
}

/// A request member whose value is a secret, read when the call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The request member, e.g. `KeyStorePassword`.
    pub member: &'static str,
    pub source: SecretSource,
}

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file's content, without one trailing newline.
    File(PathBuf),
    /// Stdin: a line typed after a prompt that does not echo when stdin is a terminal, or
    /// else everything piped in, without one trailing newline.
    Stdin,
    /// A command-line value, which process lists show: refused.
    Argv { flag: &'static str, instead: &'static str },
}

/// How a call's input and output are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Send the request once and print the response.
    Single,
    /// Follow `NextMarker` through every page, merging the pages' `list` member.
    Paginate { list: &'static str },
    /// Pipe mode: the raw bytes of stdin become the blob member `input`, and the raw bytes of
    /// the response's blob member `output` are written to stdout.
    Pipe { input: &'static str, output: &'static str },
}

/// The call `command` stands for.
pub fn plan(command: &Command) -> Call {
    use Command as C;
    let single = |action, request: Request| Call { action, request: request.into(), mode: Mode::Single, secret: None };
    let list = |action, request: Request, page: &PageArgs, list| {
        let one_page = page.no_paginate || page.limit.is_some() || page.marker.is_some();
        let request = request.opt("Limit", page.limit).opt("Marker", page.marker.clone());
        let mode = if one_page { Mode::Single } else { Mode::Paginate { list } };
        Call { action, request: request.into(), mode, secret: None }
    };
    let store = |id: &str| Request::new().set("CustomKeyStoreId", id);
    let key = |key_id: &str| Request::new().set("KeyId", key_id);
    match command {
        C::CreateKey(a) => single(
            "CreateKey",
            Request::new()
                .opt("Policy", a.policy.clone())
                .opt("Description", a.description.clone())
                .opt("KeyUsage", a.key_usage.clone())
                .opt("KeySpec", a.key_spec.clone())
                .opt("CustomerMasterKeySpec", a.customer_master_key_spec.clone())
                .opt("Origin", a.origin.clone())
                .opt("CustomKeyStoreId", a.custom_key_store_id.clone())
                .opt("BypassPolicyLockoutSafetyCheck", bypass(&a.bypass))
                .opt("Tags", tags(&a.tags))
                .opt("MultiRegion", flag(a.multi_region, a.no_multi_region)),
        ),
        C::DescribeKey(a) => {
            single("DescribeKey", key(&a.key.key_id).opt("GrantTokens", grant_tokens(&a.grant_tokens)))
        }
        C::ListKeys(a) => list("ListKeys", Request::new(), &a.page, "Keys"),
        C::EnableKey(a) => single("EnableKey", key(&a.key_id)),
        C::DisableKey(a) => single("DisableKey", key(&a.key_id)),
        C::UpdateKeyDescription(a) => {
            single("UpdateKeyDescription", key(&a.key.key_id).set("Description", a.description.as_str()))
        }
        C::ScheduleKeyDeletion(a) => {
            single("ScheduleKeyDeletion", key(&a.key.key_id).opt("PendingWindowInDays", a.pending_window_in_days))
        }
        C::CancelKeyDeletion(a) => single("CancelKeyDeletion", key(&a.key_id)),
        C::GetKeyLastUsage(a) => single("GetKeyLastUsage", key(&a.key_id)),
        C::EnableKeyRotation(a) => {
            single("EnableKeyRotation", key(&a.key.key_id).opt("RotationPeriodInDays", a.rotation_period_in_days))
        }
        C::DisableKeyRotation(a) => single("DisableKeyRotation", key(&a.key_id)),
        C::GetKeyRotationStatus(a) => single("GetKeyRotationStatus", key(&a.key_id)),
        C::RotateKeyOnDemand(a) => single("RotateKeyOnDemand", key(&a.key_id)),
        C::ListKeyRotations(a) => list(
            "ListKeyRotations",
            key(&a.key.key_id).opt("IncludeKeyMaterial", a.include_key_material.clone()),
            &a.page,
            "Rotations",
        ),
        C::GetParametersForImport(a) => single(
            "GetParametersForImport",
            key(&a.key.key_id)
                .set("WrappingAlgorithm", a.wrapping_algorithm.as_str())
                .set("WrappingKeySpec", a.wrapping_key_spec.as_str()),
        ),
        C::ImportKeyMaterial(a) => single(
            "ImportKeyMaterial",
            key(&a.key.key_id)
                .set("ImportToken", blob(&a.import_token))
                .set("EncryptedKeyMaterial", blob(&a.encrypted_key_material))
                .opt("ValidTo", a.valid_to.map(Timestamp::to_wire))
                .opt("ExpirationModel", a.expiration_model.clone())
                .opt("ImportType", a.import_type.clone())
                .opt("KeyMaterialDescription", a.key_material_description.clone())
                .opt("KeyMaterialId", a.key_material_id.clone()),
        ),
        C::DeleteImportedKeyMaterial(a) => {
            single("DeleteImportedKeyMaterial", key(&a.key.key_id).opt("KeyMaterialId", a.key_material_id.clone()))
        }
        C::CreateAlias(a) => single(
            "CreateAlias",
            Request::new().set("AliasName", a.alias_name.as_str()).set("TargetKeyId", a.target_key_id.as_str()),
        ),
        C::UpdateAlias(a) => single(
            "UpdateAlias",
            Request::new().set("AliasName", a.alias_name.as_str()).set("TargetKeyId", a.target_key_id.as_str()),
        ),
        C::DeleteAlias(a) => single("DeleteAlias", Request::new().set("AliasName", a.alias_name.as_str())),
        C::ListAliases(a) => list("ListAliases", Request::new().opt("KeyId", a.key_id.clone()), &a.page, "Aliases"),
        C::TagResource(a) => {
            single("TagResource", key(&a.key.key_id).set("Tags", tags(&a.tags).unwrap_or_else(|| Value::Array(vec![]))))
        }
        C::UntagResource(a) => single("UntagResource", key(&a.key.key_id).set("TagKeys", tag_keys(&a.tag_keys))),
        C::ListResourceTags(a) => list("ListResourceTags", key(&a.key.key_id), &a.page, "Tags"),
        C::PutKeyPolicy(a) => single(
            "PutKeyPolicy",
            key(&a.key.key_id)
                .opt("PolicyName", a.policy_name.policy_name.clone())
                .set("Policy", a.policy.as_str())
                .opt("BypassPolicyLockoutSafetyCheck", bypass(&a.bypass)),
        ),
        C::GetKeyPolicy(a) => {
            single("GetKeyPolicy", key(&a.key.key_id).opt("PolicyName", a.policy_name.policy_name.clone()))
        }
        C::ListKeyPolicies(a) => list("ListKeyPolicies", key(&a.key.key_id), &a.page, "PolicyNames"),
        C::CreateGrant(a) => single(
            "CreateGrant",
            key(&a.key.key_id)
                .set("GranteePrincipal", a.grantee_principal.as_str())
                .opt("RetiringPrincipal", a.retiring_principal.clone())
                .set("Operations", operations(&a.operations))
                .opt("Constraints", a.constraints.as_ref().map(constraints))
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("Name", a.name.clone())
                .opt("DryRun", dry_run(&a.dry_run)),
        ),
        C::ListGrants(a) => list(
            "ListGrants",
            key(&a.key.key_id).opt("GrantId", a.grant_id.clone()).opt("GranteePrincipal", a.grantee_principal.clone()),
            &a.page,
            "Grants",
        ),
        C::ListRetirableGrants(a) => list(
            "ListRetirableGrants",
            Request::new().set("RetiringPrincipal", a.retiring_principal.as_str()),
            &a.page,
            "Grants",
        ),
        C::RetireGrant(a) => single(
            "RetireGrant",
            Request::new()
                .opt("GrantToken", a.grant_token.clone())
                .opt("KeyId", a.key_id.clone())
                .opt("GrantId", a.grant_id.clone())
                .opt("DryRun", dry_run(&a.dry_run)),
        ),
        C::RevokeGrant(a) => single(
            "RevokeGrant",
            key(&a.key.key_id).set("GrantId", a.grant_id.as_str()).opt("DryRun", dry_run(&a.dry_run)),
        ),
        C::Encrypt(a) => {
            let request = key(&a.key.key_id)
                .opt("Plaintext", a.plaintext.as_ref().map(blob))
                .opt("EncryptionContext", a.encryption_context.as_ref().map(context))
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("EncryptionAlgorithm", a.encryption_algorithm.clone())
                .opt("DryRun", dry_run(&a.dry_run));
            let mode = match a.plaintext {
                Some(_) => Mode::Single,
                None => Mode::Pipe { input: "Plaintext", output: "CiphertextBlob" },
            };
            Call { action: "Encrypt", request: request.into(), mode, secret: None }
        }
        C::Decrypt(a) => {
            let request = Request::new()
                .opt("CiphertextBlob", a.ciphertext_blob.as_ref().map(blob))
                .opt("EncryptionContext", a.encryption_context.as_ref().map(context))
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("KeyId", a.key_id.clone())
                .opt("EncryptionAlgorithm", a.encryption_algorithm.clone())
                .opt("DryRun", dry_run(&a.dry_run));
            let mode = match a.ciphertext_blob {
                Some(_) => Mode::Single,
                None => Mode::Pipe { input: "CiphertextBlob", output: "Plaintext" },
            };
            Call { action: "Decrypt", request: request.into(), mode, secret: None }
        }
        C::ReEncrypt(a) => {
            let request = Request::new()
                .opt("CiphertextBlob", a.ciphertext_blob.as_ref().map(blob))
                .opt("SourceEncryptionContext", a.source_encryption_context.as_ref().map(context))
                .opt("SourceKeyId", a.source_key_id.clone())
                .set("DestinationKeyId", a.destination_key_id.as_str())
                .opt("DestinationEncryptionContext", a.destination_encryption_context.as_ref().map(context))
                .opt("SourceEncryptionAlgorithm", a.source_encryption_algorithm.clone())
                .opt("DestinationEncryptionAlgorithm", a.destination_encryption_algorithm.clone())
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("DryRun", dry_run(&a.dry_run));
            let mode = match a.ciphertext_blob {
                Some(_) => Mode::Single,
                None => Mode::Pipe { input: "CiphertextBlob", output: "CiphertextBlob" },
            };
            Call { action: "ReEncrypt", request: request.into(), mode, secret: None }
        }
        C::GenerateDataKey(a) | C::GenerateDataKeyWithoutPlaintext(a) => {
            let action = match command {
                C::GenerateDataKey(_) => "GenerateDataKey",
                _ => "GenerateDataKeyWithoutPlaintext",
            };
            single(
                action,
                key(&a.key.key_id)
                    .opt("EncryptionContext", a.encryption_context.as_ref().map(context))
                    .opt("NumberOfBytes", a.number_of_bytes)
                    .opt("KeySpec", a.key_spec.clone())
                    .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                    .opt("DryRun", dry_run(&a.dry_run)),
            )
        }
        C::GenerateDataKeyPair(a) | C::GenerateDataKeyPairWithoutPlaintext(a) => {
            let action = match command {
                C::GenerateDataKeyPair(_) => "GenerateDataKeyPair",
                _ => "GenerateDataKeyPairWithoutPlaintext",
            };
            single(
                action,
                Request::new()
                    .opt("EncryptionContext", a.encryption_context.as_ref().map(context))
                    .set("KeyId", a.key.key_id.as_str())
                    .set("KeyPairSpec", a.key_pair_spec.as_str())
                    .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                    .opt("DryRun", dry_run(&a.dry_run)),
            )
        }
        C::GenerateRandom(a) => single("GenerateRandom", Request::new().opt("NumberOfBytes", a.number_of_bytes)),
        C::Sign(a) => {
            let request = key(&a.key.key_id)
                .opt("Message", a.message.as_ref().map(blob))
                .opt("MessageType", a.message_type.message_type.clone())
                .set("SigningAlgorithm", a.signing_algorithm.as_str())
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("DryRun", dry_run(&a.dry_run));
            let mode = match a.message {
                Some(_) => Mode::Single,
                None => Mode::Pipe { input: "Message", output: "Signature" },
            };
            Call { action: "Sign", request: request.into(), mode, secret: None }
        }
        C::Verify(a) => single(
            "Verify",
            key(&a.key.key_id)
                .set("Message", blob(&a.message))
                .opt("MessageType", a.message_type.message_type.clone())
                .set("Signature", blob(&a.signature))
                .set("SigningAlgorithm", a.signing_algorithm.as_str())
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("DryRun", dry_run(&a.dry_run)),
        ),
        C::GetPublicKey(a) => {
            single("GetPublicKey", key(&a.key.key_id).opt("GrantTokens", grant_tokens(&a.grant_tokens)))
        }
        C::GenerateMac(a) => {
            let request = key(&a.key.key_id)
                .opt("Message", a.message.as_ref().map(blob))
                .set("MacAlgorithm", a.mac_algorithm.as_str())
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("DryRun", dry_run(&a.dry_run));
            let mode = match a.message {
                Some(_) => Mode::Single,
                None => Mode::Pipe { input: "Message", output: "Mac" },
            };
            Call { action: "GenerateMac", request: request.into(), mode, secret: None }
        }
        C::VerifyMac(a) => single(
            "VerifyMac",
            key(&a.key.key_id)
                .set("Message", blob(&a.message))
                .set("MacAlgorithm", a.mac_algorithm.as_str())
                .set("Mac", blob(&a.mac))
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("DryRun", dry_run(&a.dry_run)),
        ),
        C::DeriveSharedSecret(a) => single(
            "DeriveSharedSecret",
            key(&a.key.key_id)
                .set("KeyAgreementAlgorithm", a.key_agreement_algorithm.as_str())
                .set("PublicKey", blob(&a.public_key))
                .opt("GrantTokens", grant_tokens(&a.grant_tokens))
                .opt("DryRun", dry_run(&a.dry_run)),
        ),
        C::ReplicateKey(a) => single(
            "ReplicateKey",
            key(&a.key.key_id)
                .set("ReplicaRegion", a.replica_region.as_str())
                .opt("Policy", a.policy.clone())
                .opt("BypassPolicyLockoutSafetyCheck", bypass(&a.bypass))
                .opt("Description", a.description.clone())
                .opt("Tags", tags(&a.tags)),
        ),
        C::UpdatePrimaryRegion(a) => {
            single("UpdatePrimaryRegion", key(&a.key.key_id).set("PrimaryRegion", a.primary_region.as_str()))
        }
        C::CreateCustomKeyStore(a) => Call {
            secret: key_store_password(&a.password).or(Some(Secret { member: PASSWORD, source: SecretSource::Stdin })),
            ..single(
                "CreateCustomKeyStore",
                Request::new()
                    .set("CustomKeyStoreName", a.custom_key_store_name.as_str())
                    .set("CloudHsmClusterId", a.cloud_hsm_cluster_id.as_str())
                    .opt("TrustAnchorCertificate", a.trust_anchor_certificate.clone())
                    .opt("CustomKeyStoreType", a.custom_key_store_type.clone()),
            )
        },
        C::DescribeCustomKeyStores(a) => list(
            "DescribeCustomKeyStores",
            Request::new()
                .opt("CustomKeyStoreId", a.custom_key_store_id.clone())
                .opt("CustomKeyStoreName", a.custom_key_store_name.clone()),
            &a.page,
            "CustomKeyStores",
        ),
        C::ConnectCustomKeyStore(a) => single("ConnectCustomKeyStore", store(&a.custom_key_store_id)),
        C::DisconnectCustomKeyStore(a) => single("DisconnectCustomKeyStore", store(&a.custom_key_store_id)),
        C::UpdateCustomKeyStore(a) => Call {
            secret: key_store_password(&a.password),
            ..single(
                "UpdateCustomKeyStore",
                store(&a.store.custom_key_store_id)
                    .opt("NewCustomKeyStoreName", a.new_custom_key_store_name.clone())
                    .opt("CloudHsmClusterId", a.cloud_hsm_cluster_id.clone()),
            )
        },
        C::DeleteCustomKeyStore(a) => single("DeleteCustomKeyStore", store(&a.custom_key_store_id)),
    }
}

/// The request member of a custom key store's password.
const PASSWORD: &str = "KeyStorePassword";

/// Where the key store password is to be read from, if the command line says.
fn key_store_password(arg: &KeyStorePasswordArgs) -> Option<Secret> {
    let source = if arg.key_store_password.is_some() {
        SecretSource::Argv { flag: "--key-store-password", instead: "--key-store-password-file" }
    } else {
        match arg.key_store_password_file.as_deref()? {
            path if path.as_os_str() == "-" => SecretSource::Stdin,
            path => SecretSource::File(path.to_path_buf()),
        }
    };
    Some(Secret { member: PASSWORD, source })
}

/// A second call that tells whether `action` did what it was asked, when its reply cannot
/// say: ConnectCustomKeyStore answers `{}` whether the store connected or FAILED (AWS
/// connects in the background; kmsd answers once its attempt is over).
pub fn follow_up(action: &str, request: &Value) -> Option<(&'static str, Value)> {
    if action != "ConnectCustomKeyStore" {
        return None;
    }
    let id = request.get("CustomKeyStoreId")?.clone();
    Some(("DescribeCustomKeyStores", serde_json::json!({ "CustomKeyStoreId": id })))
}

/// Calls a list action page after page, following `NextMarker` while `Truncated` is true,
/// and returns the first page with every page's `list` appended to its own and the
/// pagination members removed, as the aws CLI prints it.
pub fn paginate(
    mut call: impl FnMut(&Value) -> Result<Value, Failure>,
    mut request: Value,
    list: &str,
) -> Result<Value, Failure> {
    let mut merged = call(&request)?;
    let mut seen = HashSet::new();
    let mut page = merged.clone();
    loop {
        if page.get("Truncated") != Some(&Value::Bool(true)) {
            break;
        }
        let Some(marker) = page.get("NextMarker").and_then(Value::as_str).filter(|m| !m.is_empty()) else {
            return Err(Failure::Other("the agent reported a truncated page without NextMarker".into()));
        };
        if !seen.insert(marker.to_string()) {
            return Err(Failure::Other(format!("the agent returned NextMarker {marker:?} twice")));
        }
        if let Value::Object(members) = &mut request {
            members.insert("Marker".into(), Value::String(marker.to_string()));
        }
        page = call(&request)?;
        if let (Value::Object(all), Some(Value::Array(items))) = (&mut merged, page.get(list)) {
            match all.get_mut(list) {
                Some(Value::Array(merged_items)) => merged_items.extend(items.iter().cloned()),
                _ => {
                    all.insert(list.to_string(), Value::Array(items.clone()));
                }
            }
        }
    }
    if let Value::Object(members) = &mut merged {
        members.remove("NextMarker");
        members.remove("Truncated");
    }
    Ok(merged)
}

/// What to tell the user on stderr after `action` succeeded with `response` (and the
/// `follow_up` call, if any, with `checked`), beside the response on stdout. A scheduled
/// deletion becomes permanent on its own, so its warning says what will be lost, when, and
/// how to keep it; a disconnected key store cuts off its keys at once; a store that FAILED
/// to connect did so behind an empty reply.
pub fn warning(action: &str, request: &Value, response: &Value, checked: Option<&Value>) -> Option<String> {
    match action {
        "ScheduleKeyDeletion" => Some(deletion_warning(response)),
        "DisconnectCustomKeyStore" => Some(disconnect_warning(store_id(request))),
        "ConnectCustomKeyStore" => connect_warning(store_id(request), checked?),
        _ => None,
    }
}

fn store_id(request: &Value) -> &str {
    request.get("CustomKeyStoreId").and_then(Value::as_str).unwrap_or("CUSTOM_KEY_STORE_ID")
}

fn deletion_warning(response: &Value) -> String {
    let key = response.get("KeyId").and_then(Value::as_str).unwrap_or("KEY_ID");
    let (when, then) = match response.get("DeletionDate").and_then(Value::as_f64) {
        Some(seconds) => (format!("on {}", iso8601(seconds)), "On that date"),
        // A multi-Region primary key with replicas waits for them and has no date yet.
        None => ("when its waiting period ends".to_string(), "Then"),
    };
    format!(
        "kmsctl: WARNING: KMS key {key} is scheduled for deletion {when}.\n\
         {then} its key material is destroyed for good: everything encrypted under this key,\n\
         including every kmsfs volume whose files it wraps, becomes unreadable forever\n\
         (crypto-shredding). To keep the key, cancel the deletion before then:\n\
         \n    kmsctl cancel-key-deletion --key-id {key}\n\n\
         (The key is then left disabled; kmsctl enable-key --key-id {key} makes it usable again.)\n"
    )
}

fn disconnect_warning(store: &str) -> String {
    format!(
        "kmsctl: WARNING: custom key store {store} is disconnected. Its KMS keys are unusable\n\
         from now on: every cryptographic operation under them fails, and kmsfs volumes whose\n\
         files they wrap lose access to those files, until the store is connected again:\n\
         \n    kmsctl connect-custom-key-store --custom-key-store-id {store}\n"
    )
}

/// The warning for a store that did not connect, from its DescribeCustomKeyStores entry.
fn connect_warning(store: &str, described: &Value) -> Option<String> {
    let entry = described.get("CustomKeyStores")?.as_array()?.first()?;
    let state = entry.get("ConnectionState").and_then(Value::as_str)?;
    if state == "CONNECTED" {
        return None;
    }
    let code = entry.get("ConnectionErrorCode").and_then(Value::as_str).unwrap_or("no ConnectionErrorCode");
    let hint = match code {
        "INVALID_CREDENTIALS" => format!(
            "The key store password is not the token's user PIN; after the disconnect, give the right one:\n\
             \n    kmsctl update-custom-key-store --custom-key-store-id {store} --key-store-password-file FILE\n"
        ),
        "CLUSTER_NOT_FOUND" => "Its cluster ID is no longer declared in kmsd's hsm-clusters.json.\n".to_string(),
        "INSUFFICIENT_CLOUDHSM_HSMS" => {
            "The PKCS#11 module that hsm-clusters.json names has no initialized token with the declared label.\n"
                .to_string()
        }
        "USER_LOCKED_OUT" => "The token's user PIN is locked: its security officer must reset it.\n".to_string(),
        _ => "kmsd's log says why.\n".to_string(),
    };
    Some(format!(
        "kmsctl: WARNING: custom key store {store} did not connect: it is {state} ({code}), and its KMS keys\n\
         remain unusable. {hint}\
         To try again, disconnect it, correct the error, and connect it:\n\
         \n    kmsctl disconnect-custom-key-store --custom-key-store-id {store}\n\
         \x20   kmsctl connect-custom-key-store --custom-key-store-id {store}\n"
    ))
}

/// A JSON object under construction; absent optional members are left out of the request.
struct Request(Map<String, Value>);

impl Request {
    fn new() -> Request {
        Request(Map::new())
    }

    fn set(mut self, name: &str, value: impl Into<Value>) -> Request {
        self.0.insert(name.to_string(), value.into());
        self
    }

    fn opt(self, name: &str, value: Option<impl Into<Value>>) -> Request {
        match value {
            Some(value) => self.set(name, value),
            None => self,
        }
    }
}

impl From<Request> for Value {
    fn from(request: Request) -> Value {
        Value::Object(request.0)
    }
}

/// A `--flag`/`--no-flag` pair: `Some` only when one of them was given.
fn flag(yes: bool, no: bool) -> Option<bool> {
    match (yes, no) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

fn dry_run(arg: &DryRunArg) -> Option<bool> {
    flag(arg.dry_run, arg.no_dry_run)
}

fn bypass(arg: &BypassLockoutArg) -> Option<bool> {
    flag(arg.bypass_policy_lockout_safety_check, arg.no_bypass_policy_lockout_safety_check)
}

fn grant_tokens(arg: &GrantTokensArg) -> Option<Value> {
    (!arg.grant_tokens.is_empty()).then(|| arg.grant_tokens.clone().into())
}

fn blob(blob: &Blob) -> Value {
    Value::String(STANDARD.encode(&blob.0))
}

fn context(context: &Context) -> Value {
    encryption_context(&context.0)
}

fn encryption_context(context: &EncryptionContext) -> Value {
    Value::Object(context.0.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

fn constraints(constraints: &GrantConstraints) -> Value {
    Request::new()
        .opt("EncryptionContextSubset", constraints.encryption_context_subset.as_ref().map(encryption_context))
        .opt("EncryptionContextEquals", constraints.encryption_context_equals.as_ref().map(encryption_context))
        .into()
}

fn operations(lists: &[GrantOperations]) -> Value {
    lists.iter().flat_map(|list| list.0.iter().cloned()).map(Value::String).collect()
}

fn tags(lists: &[TagList]) -> Option<Value> {
    if lists.is_empty() {
        return None;
    }
    let tags = lists
        .iter()
        .flat_map(|list| &list.0)
        .map(|tag| serde_json::json!({ "TagKey": tag.key, "TagValue": tag.value }))
        .collect();
    Some(Value::Array(tags))
}

fn tag_keys(lists: &[TagKeys]) -> Value {
    lists.iter().flat_map(|list| list.0.iter().cloned()).map(Value::String).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;
    use serde_json::json;

    fn plan_for(argv: &[&str]) -> Call {
        let cli = Cli::try_parse_from(std::iter::once("kmsctl").chain(argv.iter().copied())).unwrap();
        match cli.command {
            crate::cli::TopCommand::Kms(command) => plan(&command),
            crate::cli::TopCommand::Audit(a) => panic!("not a KMS action: {a:?}"),
        }
    }

    #[test]
    fn encrypt_builds_pascal_case_request_with_base64_blob() {
        let call = plan_for(&[
            "encrypt",
            "--key-id",
            "alias/app",
            "--plaintext",
            "aGVsbG8=",
            "--encryption-context",
            "purpose=test,user=me",
            "--grant-tokens",
            "t1",
            "t2",
        ]);
        assert_eq!(call.action, "Encrypt");
        assert_eq!(call.mode, Mode::Single);
        assert_eq!(
            call.request,
            json!({
                "KeyId": "alias/app",
                "Plaintext": "aGVsbG8=",
                "EncryptionContext": {"purpose": "test", "user": "me"},
                "GrantTokens": ["t1", "t2"],
            })
        );
    }

    #[test]
    fn blob_commands_without_blob_use_pipe_mode() {
        let call = plan_for(&["encrypt", "-k", "k1", "--encryption-context", r#"{"a":"b"}"#]);
        assert_eq!(call.mode, Mode::Pipe { input: "Plaintext", output: "CiphertextBlob" });
        assert_eq!(call.request, json!({"KeyId": "k1", "EncryptionContext": {"a": "b"}}));

        let call = plan_for(&["decrypt"]);
        assert_eq!(call.mode, Mode::Pipe { input: "CiphertextBlob", output: "Plaintext" });
        assert_eq!(call.request, json!({}));

        let call = plan_for(&["re-encrypt", "-k", "k2"]);
        assert_eq!(call.mode, Mode::Pipe { input: "CiphertextBlob", output: "CiphertextBlob" });
        assert_eq!(call.request, json!({"DestinationKeyId": "k2"}));
    }

    #[test]
    fn signing_requests() {
        let dir = tempfile::tempdir().unwrap();
        let message = dir.path().join("msg");
        std::fs::write(&message, b"\x00signed\xff").unwrap();
        let message_arg = format!("fileb://{}", message.display());
        let call = plan_for(&[
            "sign",
            "--key-id",
            "alias/signer",
            "--message",
            &message_arg,
            "--message-type",
            "RAW",
            "--signing-algorithm",
            "ECDSA_SHA_256",
            "--grant-tokens",
            "t1",
            "--dry-run",
        ]);
        assert_eq!((call.action, call.mode), ("Sign", Mode::Single));
        assert_eq!(
            call.request,
            json!({
                "KeyId": "alias/signer",
                "Message": "AHNpZ25lZP8=",
                "MessageType": "RAW",
                "SigningAlgorithm": "ECDSA_SHA_256",
                "GrantTokens": ["t1"],
                "DryRun": true,
            })
        );
        let call = plan_for(&["sign", "-k", "k", "--signing-algorithm", "RSASSA_PSS_SHA_256"]);
        assert_eq!(call.mode, Mode::Pipe { input: "Message", output: "Signature" });
        assert_eq!(call.request, json!({"KeyId": "k", "SigningAlgorithm": "RSASSA_PSS_SHA_256"}));

        let call = plan_for(&[
            "verify",
            "-k",
            "k",
            "--message",
            &message_arg,
            "--message-type",
            "DIGEST",
            "--signature",
            "MEUC",
            "--signing-algorithm",
            "ECDSA_SHA_256",
        ]);
        assert_eq!((call.action, call.mode), ("Verify", Mode::Single));
        assert_eq!(
            call.request,
            json!({
                "KeyId": "k",
                "Message": "AHNpZ25lZP8=",
                "MessageType": "DIGEST",
                "Signature": "MEUC",
                "SigningAlgorithm": "ECDSA_SHA_256",
            })
        );

        let call = plan_for(&["get-public-key", "-k", "alias/signer", "--grant-tokens", "t"]);
        assert_eq!((call.action, call.mode), ("GetPublicKey", Mode::Single));
        assert_eq!(call.request, json!({"KeyId": "alias/signer", "GrantTokens": ["t"]}));
        let cli = Cli::try_parse_from(["kmsctl", "get-public-key", "-k", "k", "--output", "pem"]).unwrap();
        assert_eq!(cli.output, crate::cli::OutputFormat::Pem);
    }

    #[test]
    fn mac_requests() {
        let call = plan_for(&["generate-mac", "-k", "k", "--message", "aGk=", "--mac-algorithm", "HMAC_SHA_256"]);
        assert_eq!((call.action, call.mode), ("GenerateMac", Mode::Single));
        assert_eq!(call.request, json!({"KeyId": "k", "Message": "aGk=", "MacAlgorithm": "HMAC_SHA_256"}));
        let call = plan_for(&["generate-mac", "-k", "k", "--mac-algorithm", "HMAC_SHA_512", "--no-dry-run"]);
        assert_eq!(call.mode, Mode::Pipe { input: "Message", output: "Mac" });
        assert_eq!(call.request, json!({"KeyId": "k", "MacAlgorithm": "HMAC_SHA_512", "DryRun": false}));

        let call = plan_for(&[
            "verify-mac",
            "-k",
            "k",
            "--message",
            "aGk",
            "--mac-algorithm",
            "HMAC_SHA_256",
            "--mac",
            "AQID",
            "--grant-tokens",
            "t",
        ]);
        assert_eq!((call.action, call.mode), ("VerifyMac", Mode::Single));
        assert_eq!(
            call.request,
            json!({
                "KeyId": "k",
                "Message": "aGk=",
                "MacAlgorithm": "HMAC_SHA_256",
                "Mac": "AQID",
                "GrantTokens": ["t"],
            })
        );
    }

    #[test]
    fn multi_region_requests() {
        let call = plan_for(&[
            "replicate-key",
            "-k",
            "mrk-0123456789abcdef8123456789abcdef",
            "--replica-region",
            "region-b",
            "--description",
            "replica",
            "--tags",
            "TagKey=site,TagValue=b",
        ]);
        assert_eq!((call.action, call.mode), ("ReplicateKey", Mode::Single));
        assert_eq!(
            call.request,
            json!({
                "KeyId": "mrk-0123456789abcdef8123456789abcdef",
                "ReplicaRegion": "region-b",
                "Description": "replica",
                "Tags": [{"TagKey": "site", "TagValue": "b"}],
            })
        );
        let call = plan_for(&["update-primary-region", "-k", "k", "--primary-region", "region-b"]);
        assert_eq!(call.action, "UpdatePrimaryRegion");
        assert_eq!(call.request, json!({"KeyId": "k", "PrimaryRegion": "region-b"}));
    }

    #[test]
    fn key_agreement_and_data_key_pair_requests() {
        let call = plan_for(&[
            "derive-shared-secret",
            "-k",
            "alias/agree",
            "--key-agreement-algorithm",
            "ECDH",
            "--public-key",
            "MFkw",
            "--dry-run",
        ]);
        assert_eq!((call.action, call.mode), ("DeriveSharedSecret", Mode::Single));
        assert_eq!(
            call.request,
            json!({"KeyId": "alias/agree", "KeyAgreementAlgorithm": "ECDH", "PublicKey": "MFkw", "DryRun": true})
        );
        assert!(Cli::try_parse_from(["kmsctl", "derive-shared-secret", "-k", "k", "--public-key", "MFkw"]).is_err());

        let call = plan_for(&[
            "generate-data-key-pair",
            "-k",
            "k",
            "--key-pair-spec",
            "ECC_NIST_P256",
            "--encryption-context",
            "a=b",
            "--grant-tokens",
            "t",
        ]);
        assert_eq!((call.action, call.mode), ("GenerateDataKeyPair", Mode::Single));
        assert_eq!(
            call.request,
            json!({"KeyId": "k", "KeyPairSpec": "ECC_NIST_P256", "EncryptionContext": {"a": "b"}, "GrantTokens": ["t"]})
        );
        let call = plan_for(&["generate-data-key-pair-without-plaintext", "-k", "k", "--key-pair-spec", "RSA_4096"]);
        assert_eq!(call.action, "GenerateDataKeyPairWithoutPlaintext");
        assert_eq!(call.request, json!({"KeyId": "k", "KeyPairSpec": "RSA_4096"}));
        assert!(Cli::try_parse_from(["kmsctl", "generate-data-key-pair", "-k", "k"]).is_err(), "the spec is required");
    }

    #[test]
    fn create_key_of_a_signing_or_hmac_spec() {
        let call = plan_for(&["create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY"]);
        assert_eq!(call.request, json!({"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"}));
        let call = plan_for(&["create-key", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC"]);
        assert_eq!(call.request, json!({"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"}));
    }

    #[test]
    fn create_key_tags_and_flags() {
        let call = plan_for(&[
            "create-key",
            "--description",
            "d",
            "--tags",
            "TagKey=a,TagValue=1",
            "TagKey=b,TagValue=2",
            "--tags",
            r#"[{"TagKey":"c","TagValue":"3"}]"#,
            "--multi-region",
            "--no-bypass-policy-lockout-safety-check",
        ]);
        assert_eq!(
            call.request,
            json!({
                "Description": "d",
                "Tags": [
                    {"TagKey": "a", "TagValue": "1"},
                    {"TagKey": "b", "TagValue": "2"},
                    {"TagKey": "c", "TagValue": "3"},
                ],
                "MultiRegion": true,
                "BypassPolicyLockoutSafetyCheck": false,
            })
        );
    }

    #[test]
    fn untag_resource_collects_keys() {
        let call = plan_for(&["untag-resource", "-k", "k", "--tag-keys", "a", "b", "--tag-keys", r#"["c"]"#]);
        assert_eq!(call.request, json!({"KeyId": "k", "TagKeys": ["a", "b", "c"]}));
    }

    #[test]
    fn key_policy_requests() {
        let call = plan_for(&["put-key-policy", "-k", "k", "--policy", "{}", "--bypass-policy-lockout-safety-check"]);
        assert_eq!(call.action, "PutKeyPolicy");
        assert_eq!(call.request, json!({"KeyId": "k", "Policy": "{}", "BypassPolicyLockoutSafetyCheck": true}));
        let call = plan_for(&["get-key-policy", "-k", "k", "--policy-name", "default"]);
        assert_eq!(call.request, json!({"KeyId": "k", "PolicyName": "default"}));
        let call = plan_for(&["list-key-policies", "-k", "k"]);
        assert_eq!(call.mode, Mode::Paginate { list: "PolicyNames" });
        assert_eq!(call.request, json!({"KeyId": "k"}));
    }

    #[test]
    fn create_grant_collects_operations_and_constraints() {
        let call = plan_for(&[
            "create-grant",
            "-k",
            "k",
            "--grantee-principal",
            "arn:aws:iam::111122223333:user/a",
            "--operations",
            "Encrypt",
            "Decrypt",
            "--operations",
            r#"["GenerateDataKey"]"#,
            "--constraints",
            "EncryptionContextSubset={purpose=test}",
            "--name",
            "n",
            "--dry-run",
        ]);
        assert_eq!(call.action, "CreateGrant");
        assert_eq!(
            call.request,
            json!({
                "KeyId": "k",
                "GranteePrincipal": "arn:aws:iam::111122223333:user/a",
                "Operations": ["Encrypt", "Decrypt", "GenerateDataKey"],
                "Constraints": {"EncryptionContextSubset": {"purpose": "test"}},
                "Name": "n",
                "DryRun": true,
            })
        );
    }

    #[test]
    fn grant_lists_and_removal() {
        let call = plan_for(&["list-grants", "-k", "k", "--grantee-principal", "p", "--limit", "2"]);
        assert_eq!(call.mode, Mode::Single);
        assert_eq!(call.request, json!({"KeyId": "k", "GranteePrincipal": "p", "Limit": 2}));
        let call = plan_for(&["list-retirable-grants", "--retiring-principal", "p"]);
        assert_eq!(call.mode, Mode::Paginate { list: "Grants" });
        assert_eq!(call.request, json!({"RetiringPrincipal": "p"}));
        assert_eq!(plan_for(&["retire-grant", "--grant-token", "t"]).request, json!({"GrantToken": "t"}));
        let call = plan_for(&["retire-grant", "-k", "k", "--grant-id", "g"]);
        assert_eq!(call.request, json!({"KeyId": "k", "GrantId": "g"}));
        let call = plan_for(&["revoke-grant", "-k", "k", "--grant-id", "g", "--no-dry-run"]);
        assert_eq!(call.request, json!({"KeyId": "k", "GrantId": "g", "DryRun": false}));
    }

    #[test]
    fn list_commands_paginate_unless_asked_for_one_page() {
        assert_eq!(plan_for(&["list-keys"]).mode, Mode::Paginate { list: "Keys" });
        assert_eq!(plan_for(&["list-keys", "--no-paginate"]).mode, Mode::Single);
        let call = plan_for(&["list-aliases", "--limit", "5", "--marker", "m"]);
        assert_eq!(call.mode, Mode::Single);
        assert_eq!(call.request, json!({"Limit": 5, "Marker": "m"}));
        let call = plan_for(&["list-resource-tags", "-k", "k"]);
        assert_eq!(call.mode, Mode::Paginate { list: "Tags" });
    }

    #[test]
    fn rotation_requests() {
        let call = plan_for(&["enable-key-rotation", "--key-id", "k", "--rotation-period-in-days", "90"]);
        assert_eq!((call.action, call.mode), ("EnableKeyRotation", Mode::Single));
        assert_eq!(call.request, json!({"KeyId": "k", "RotationPeriodInDays": 90}));
        assert_eq!(plan_for(&["enable-key-rotation", "-k", "k"]).request, json!({"KeyId": "k"}));
        for (command, action) in [
            ("disable-key-rotation", "DisableKeyRotation"),
            ("get-key-rotation-status", "GetKeyRotationStatus"),
            ("rotate-key-on-demand", "RotateKeyOnDemand"),
            ("get-key-last-usage", "GetKeyLastUsage"),
        ] {
            let call = plan_for(&[command, "--key-id", "alias/a"]);
            assert_eq!((call.action, call.mode), (action, Mode::Single), "{command}");
            assert_eq!(call.request, json!({"KeyId": "alias/a"}), "{command}");
        }
    }

    #[test]
    fn list_key_rotations_paginates_the_rotations() {
        let call = plan_for(&["list-key-rotations", "-k", "k", "--include-key-material", "ALL_KEY_MATERIAL"]);
        assert_eq!(call.action, "ListKeyRotations");
        assert_eq!(call.mode, Mode::Paginate { list: "Rotations" });
        assert_eq!(call.request, json!({"KeyId": "k", "IncludeKeyMaterial": "ALL_KEY_MATERIAL"}));
        let call = plan_for(&["list-key-rotations", "-k", "k", "--limit", "1", "--marker", "m"]);
        assert_eq!(call.mode, Mode::Single);
        assert_eq!(call.request, json!({"KeyId": "k", "Limit": 1, "Marker": "m"}));
        assert_eq!(plan_for(&["list-key-rotations", "-k", "k", "--no-paginate"]).mode, Mode::Single);
    }

    #[test]
    fn import_requests() {
        let call = plan_for(&["create-key", "--origin", "EXTERNAL"]);
        assert_eq!(call.request, json!({"Origin": "EXTERNAL"}));

        let call = plan_for(&[
            "get-parameters-for-import",
            "-k",
            "k",
            "--wrapping-algorithm",
            "RSAES_OAEP_SHA_256",
            "--wrapping-key-spec",
            "RSA_2048",
        ]);
        assert_eq!((call.action, call.mode), ("GetParametersForImport", Mode::Single));
        assert_eq!(
            call.request,
            json!({"KeyId": "k", "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"})
        );

        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token.bin");
        std::fs::write(&token, [0xff, 0, 1]).unwrap();
        let call = plan_for(&[
            "import-key-material",
            "--key-id",
            "k",
            "--import-token",
            &format!("fileb://{}", token.display()),
            "--encrypted-key-material",
            "AQID",
            "--valid-to",
            "2030-01-01T00:00:00Z",
            "--expiration-model",
            "KEY_MATERIAL_EXPIRES",
            "--import-type",
            "NEW_KEY_MATERIAL",
            "--key-material-description",
            "from the HSM",
            "--key-material-id",
            "m",
        ]);
        assert_eq!((call.action, call.mode), ("ImportKeyMaterial", Mode::Single));
        assert_eq!(
            call.request,
            json!({
                "KeyId": "k",
                "ImportToken": "/wAB",
                "EncryptedKeyMaterial": "AQID",
                "ValidTo": 1_893_456_000,
                "ExpirationModel": "KEY_MATERIAL_EXPIRES",
                "ImportType": "NEW_KEY_MATERIAL",
                "KeyMaterialDescription": "from the HSM",
                "KeyMaterialId": "m",
            })
        );
        let call =
            plan_for(&["import-key-material", "-k", "k", "--import-token", "AQ", "--encrypted-key-material", "Ag"]);
        assert_eq!(call.request, json!({"KeyId": "k", "ImportToken": "AQ==", "EncryptedKeyMaterial": "Ag=="}));

        let call = plan_for(&["delete-imported-key-material", "-k", "k"]);
        assert_eq!((call.action, call.request), ("DeleteImportedKeyMaterial", json!({"KeyId": "k"})));
        let call = plan_for(&["delete-imported-key-material", "-k", "k", "--key-material-id", "m"]);
        assert_eq!(call.request, json!({"KeyId": "k", "KeyMaterialId": "m"}));
    }

    #[test]
    fn scheduling_a_deletion_warns_of_crypto_shredding_and_how_to_cancel() {
        let response = json!({
            "KeyId": "arn:aws:kms:us-east-1:111122223333:key/k",
            "DeletionDate": 1_700_000_000,
            "KeyState": "PendingDeletion",
            "PendingWindowInDays": 7,
        });
        let warning = warning("ScheduleKeyDeletion", &json!({"KeyId": "k"}), &response, None).unwrap();
        for needle in [
            "WARNING",
            "destroyed for good",
            "kmsfs volume",
            "crypto-shredding",
            "deletion on 2023-11-14T22:13:20.000000+00:00.",
            "kmsctl cancel-key-deletion --key-id arn:aws:kms:us-east-1:111122223333:key/k\n",
        ] {
            assert!(warning.contains(needle), "{needle:?} not in {warning}");
        }
        let undated = super::warning(
            "ScheduleKeyDeletion",
            &json!({"KeyId": "k"}),
            &json!({"KeyId": "k", "KeyState": "PendingReplicaDeletion"}),
            None,
        );
        assert!(undated.unwrap().contains("when its waiting period ends"));
        assert_eq!(super::warning("CancelKeyDeletion", &json!({"KeyId": "k"}), &json!({"KeyId": "k"}), None), None);
        assert_eq!(super::warning("DisableKey", &json!({"KeyId": "k"}), &json!({}), None), None);
    }

    #[test]
    fn custom_key_store_requests() {
        let dir = tempfile::tempdir().unwrap();
        let anchor = dir.path().join("customerCA.crt");
        std::fs::write(&anchor, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        let call = plan_for(&[
            "create-custom-key-store",
            "--custom-key-store-name",
            "ExampleKeyStore",
            "--cloud-hsm-cluster-id",
            "cluster-1a23b4cdefg",
            "--trust-anchor-certificate",
            &format!("file://{}", anchor.display()),
            "--key-store-password-file",
            "/run/secrets/kmsuser",
        ]);
        assert_eq!((call.action, call.mode), ("CreateCustomKeyStore", Mode::Single));
        assert_eq!(
            call.request,
            json!({
                "CustomKeyStoreName": "ExampleKeyStore",
                "CloudHsmClusterId": "cluster-1a23b4cdefg",
                "TrustAnchorCertificate": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            }),
            "the password is no part of the plan: it is read when the call runs"
        );
        let password = |source| Some(Secret { member: "KeyStorePassword", source });
        assert_eq!(call.secret, password(SecretSource::File("/run/secrets/kmsuser".into())));

        let create = ["create-custom-key-store", "--custom-key-store-name", "n", "--cloud-hsm-cluster-id", "c"];
        assert_eq!(plan_for(&create).secret, password(SecretSource::Stdin), "stdin (or a prompt) without a file");
        let with = |extra: &[&'static str]| plan_for(&[&create[..], extra].concat()).secret;
        assert_eq!(with(&["--key-store-password-file", "-"]), password(SecretSource::Stdin));
        let refused =
            password(SecretSource::Argv { flag: "--key-store-password", instead: "--key-store-password-file" });
        assert_eq!(with(&["--key-store-password", "hunter22"]), refused);
        assert_eq!(with(&["--key-store-password=hunter22", "--key-store-password-file", "f"]), refused);
        assert!(!format!("{:?}", plan_for(&[&create[..], &["--key-store-password", "hunter22"]].concat()))
            .contains("hunter22"));

        let call = plan_for(&["describe-custom-key-stores"]);
        assert_eq!((call.action, call.mode), ("DescribeCustomKeyStores", Mode::Paginate { list: "CustomKeyStores" }));
        assert_eq!(call.request, json!({}));
        let call = plan_for(&["describe-custom-key-stores", "--custom-key-store-name", "n", "--limit", "1"]);
        assert_eq!(call.mode, Mode::Single);
        assert_eq!(call.request, json!({"CustomKeyStoreName": "n", "Limit": 1}));
        let call = plan_for(&["describe-custom-key-stores", "--custom-key-store-id", "cks-1", "--marker", "m"]);
        assert_eq!(call.request, json!({"CustomKeyStoreId": "cks-1", "Marker": "m"}));

        for (command, action) in [
            ("connect-custom-key-store", "ConnectCustomKeyStore"),
            ("disconnect-custom-key-store", "DisconnectCustomKeyStore"),
            ("delete-custom-key-store", "DeleteCustomKeyStore"),
        ] {
            let call = plan_for(&[command, "--custom-key-store-id", "cks-1"]);
            assert_eq!((call.action, call.mode, call.secret), (action, Mode::Single, None), "{command}");
            assert_eq!(call.request, json!({"CustomKeyStoreId": "cks-1"}), "{command}");
        }

        let call = plan_for(&[
            "update-custom-key-store",
            "--custom-key-store-id",
            "cks-1",
            "--new-custom-key-store-name",
            "m",
        ]);
        assert_eq!(call.action, "UpdateCustomKeyStore");
        assert_eq!(call.request, json!({"CustomKeyStoreId": "cks-1", "NewCustomKeyStoreName": "m"}));
        assert_eq!(call.secret, None, "update changes the password only when asked to");
        let call = plan_for(&[
            "update-custom-key-store",
            "--custom-key-store-id",
            "cks-1",
            "--key-store-password-file",
            "pw",
            "--cloud-hsm-cluster-id",
            "cluster-abcdefghijk",
        ]);
        assert_eq!(call.request, json!({"CustomKeyStoreId": "cks-1", "CloudHsmClusterId": "cluster-abcdefghijk"}));
        assert_eq!(call.secret, password(SecretSource::File("pw".into())));

        let call = plan_for(&["create-key", "--origin", "AWS_CLOUDHSM", "--custom-key-store-id", "cks-1"]);
        assert_eq!(call.request, json!({"Origin": "AWS_CLOUDHSM", "CustomKeyStoreId": "cks-1"}));
    }

    #[test]
    fn disconnecting_a_key_store_warns_that_its_keys_stop_at_once() {
        let request = json!({"CustomKeyStoreId": "cks-1234567890abcdef0"});
        let warning = warning("DisconnectCustomKeyStore", &request, &json!({}), None).unwrap();
        for needle in ["WARNING", "cks-1234567890abcdef0", "unusable", "kmsfs volumes"] {
            assert!(warning.contains(needle), "{needle:?} not in {warning}");
        }
        assert!(warning.ends_with("kmsctl connect-custom-key-store --custom-key-store-id cks-1234567890abcdef0\n"));
        assert_eq!(super::warning("DeleteCustomKeyStore", &request, &json!({}), None), None);
    }

    #[test]
    fn a_key_store_that_failed_to_connect_is_reported() {
        let request = json!({"CustomKeyStoreId": "cks-1"});
        assert_eq!(
            follow_up("ConnectCustomKeyStore", &request),
            Some(("DescribeCustomKeyStores", json!({"CustomKeyStoreId": "cks-1"})))
        );
        assert_eq!(follow_up("DisconnectCustomKeyStore", &request), None);
        let described = |entry: Value| json!({"CustomKeyStores": [entry], "Truncated": false});
        let connected = described(json!({"CustomKeyStoreId": "cks-1", "ConnectionState": "CONNECTED"}));
        assert_eq!(warning("ConnectCustomKeyStore", &request, &json!({}), Some(&connected)), None);
        assert_eq!(warning("ConnectCustomKeyStore", &request, &json!({}), None), None, "no follow-up, no guess");
        let failed = described(json!({
            "CustomKeyStoreId": "cks-1",
            "ConnectionState": "FAILED",
            "ConnectionErrorCode": "INVALID_CREDENTIALS",
        }));
        let warning = warning("ConnectCustomKeyStore", &request, &json!({}), Some(&failed)).unwrap();
        for needle in [
            "did not connect: it is FAILED (INVALID_CREDENTIALS)",
            "kmsctl update-custom-key-store --custom-key-store-id cks-1 --key-store-password-file FILE",
            "kmsctl disconnect-custom-key-store --custom-key-store-id cks-1\n",
            "    kmsctl connect-custom-key-store --custom-key-store-id cks-1\n",
        ] {
            assert!(warning.contains(needle), "{needle:?} not in {warning}");
        }
    }

    #[test]
    fn paginate_follows_markers_and_merges() {
        let pages = [
            json!({"Keys": [{"KeyId": "1"}], "NextMarker": "m1", "Truncated": true}),
            json!({"Keys": [{"KeyId": "2"}], "NextMarker": "m2", "Truncated": true}),
            json!({"Keys": [{"KeyId": "3"}], "Truncated": false}),
        ];
        let mut markers = Vec::new();
        let merged = paginate(
            |req| {
                markers.push(req.get("Marker").cloned());
                Ok(pages[markers.len() - 1].clone())
            },
            json!({}),
            "Keys",
        )
        .unwrap();
        assert_eq!(merged, json!({"Keys": [{"KeyId": "1"}, {"KeyId": "2"}, {"KeyId": "3"}]}));
        assert_eq!(markers, vec![None, Some(json!("m1")), Some(json!("m2"))]);
    }

    #[test]
    fn paginate_survives_odd_responses() {
        let pages = [json!({"Truncated": true, "NextMarker": "m"}), json!("not an object")];
        let mut n = 0;
        let merged = paginate(
            |_| {
                n += 1;
                Ok(pages[n - 1].clone())
            },
            json!({}),
            "Keys",
        )
        .unwrap();
        assert_eq!(merged, json!({}));
    }

    #[test]
    fn paginate_stops_on_a_repeated_marker() {
        let page = json!({"Keys": [], "NextMarker": "same", "Truncated": true});
        let err = paginate(|_| Ok(page.clone()), json!({}), "Keys").unwrap_err();
        assert!(matches!(err, Failure::Other(m) if m.contains("twice")));
    }
}
