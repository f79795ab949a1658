//! What each subcommand asks of the agent: the action, its JSON 1.1 request (the API's
//! PascalCase members, blobs as base64, timestamps as epoch seconds) and how the response is
//! handled. Planning is pure; `paginate` follows `NextMarker` through a list action's pages,
//! as the aws CLI does, and `warning` says what a call's success means when it is not
//! obvious and cannot be undone later.

use std::collections::HashSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::time::iso8601;
use serde_json::{Map, Value};

use crate::args::{Blob, Context, GrantConstraints, GrantOperations, TagKeys, TagList, Timestamp};
use crate::cli::{BypassLockoutArg, Command, DryRunArg, GrantTokensArg, PageArgs};
use crate::Failure;

/// One call to the agent.
#[derive(Debug, PartialEq)]
pub struct Call {
    /// The API action, e.g. `Encrypt`.
    pub action: &'static str,
    pub request: Value,
    pub mode: Mode,
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
    let single = |action, request: Request| Call { action, request: request.into(), mode: Mode::Single };
    let list = |action, request: Request, page: &PageArgs, list| {
        let one_page = page.no_paginate || page.limit.is_some() || page.marker.is_some();
        let request = request.opt("Limit", page.limit).opt("Marker", page.marker.clone());
        let mode = if one_page { Mode::Single } else { Mode::Paginate { list } };
        Call { action, request: request.into(), mode }
    };
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
            Call { action: "Encrypt", request: request.into(), mode }
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
            Call { action: "Decrypt", request: request.into(), mode }
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
            Call { action: "ReEncrypt", request: request.into(), mode }
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
        C::GenerateRandom(a) => single("GenerateRandom", Request::new().opt("NumberOfBytes", a.number_of_bytes)),
    }
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

/// What to tell the user on stderr after `action` succeeded with `response`, beside the
/// response on stdout. A scheduled deletion is the one call whose effect becomes permanent
/// on its own, so its warning says what will be lost, when, and how to keep it.
pub fn warning(action: &str, response: &Value) -> Option<String> {
    if action != "ScheduleKeyDeletion" {
        return None;
    }
    let key = response.get("KeyId").and_then(Value::as_str).unwrap_or("KEY_ID");
    let (when, then) = match response.get("DeletionDate").and_then(Value::as_f64) {
        Some(seconds) => (format!("on {}", iso8601(seconds)), "On that date"),
        // A multi-Region primary key with replicas waits for them and has no date yet.
        None => ("when its waiting period ends".to_string(), "Then"),
    };
    Some(format!(
        "kmsctl: WARNING: KMS key {key} is scheduled for deletion {when}.\n\
         {then} its key material is destroyed for good: everything encrypted under this key,\n\
         including every kmsfs volume whose files it wraps, becomes unreadable forever\n\
         (crypto-shredding). To keep the key, cancel the deletion before then:\n\
         \n    kmsctl cancel-key-deletion --key-id {key}\n\n\
         (The key is then left disabled; kmsctl enable-key --key-id {key} makes it usable again.)\n"
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
        let warning = warning("ScheduleKeyDeletion", &response).unwrap();
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
        let undated =
            super::warning("ScheduleKeyDeletion", &json!({"KeyId": "k", "KeyState": "PendingReplicaDeletion"}));
        assert!(undated.unwrap().contains("when its waiting period ends"));
        assert_eq!(super::warning("CancelKeyDeletion", &json!({"KeyId": "k"})), None);
        assert_eq!(super::warning("DisableKey", &json!({})), None);
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
