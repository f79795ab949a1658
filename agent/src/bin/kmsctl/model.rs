//! The order of response members in the service model (botocore's
//! `kms-2014-11-01.service.json`). The aws CLI prints JSON members in that order, because
//! botocore builds each response structure member by member; kmsctl does the same so that
//! its output reads like `aws kms` output.

/// Each action's output members, in model order.
const OUTPUTS: &[(&str, &[&str])] = &[
    ("CreateKey", &["KeyMetadata"]),
    ("DescribeKey", &["KeyMetadata"]),
    ("ListKeys", &["Keys", "NextMarker", "Truncated"]),
    ("ScheduleKeyDeletion", &["KeyId", "DeletionDate", "KeyState", "PendingWindowInDays"]),
    ("CancelKeyDeletion", &["KeyId"]),
    ("GetKeyLastUsage", &["KeyId", "KeyLastUsage", "TrackingStartDate", "KeyCreationDate"]),
    (
        "GetKeyRotationStatus",
        &["KeyRotationEnabled", "KeyId", "RotationPeriodInDays", "NextRotationDate", "OnDemandRotationStartDate"],
    ),
    ("RotateKeyOnDemand", &["KeyId"]),
    ("ListKeyRotations", &["Rotations", "NextMarker", "Truncated"]),
    ("GetParametersForImport", &["KeyId", "ImportToken", "PublicKey", "ParametersValidTo"]),
    ("ImportKeyMaterial", &["KeyId", "KeyMaterialId"]),
    ("DeleteImportedKeyMaterial", &["KeyId", "KeyMaterialId"]),
    ("ListAliases", &["Aliases", "NextMarker", "Truncated"]),
    ("ListResourceTags", &["Tags", "NextMarker", "Truncated"]),
    ("GetKeyPolicy", &["Policy", "PolicyName"]),
    ("ListKeyPolicies", &["PolicyNames", "NextMarker", "Truncated"]),
    ("CreateGrant", &["GrantToken", "GrantId"]),
    ("ListGrants", &["Grants", "NextMarker", "Truncated"]),
    ("ListRetirableGrants", &["Grants", "NextMarker", "Truncated"]),
    ("Encrypt", &["CiphertextBlob", "KeyId", "EncryptionAlgorithm"]),
    ("Decrypt", &["KeyId", "Plaintext", "EncryptionAlgorithm", "CiphertextForRecipient", "KeyMaterialId"]),
    (
        "ReEncrypt",
        &[
            "CiphertextBlob",
            "SourceKeyId",
            "KeyId",
            "SourceEncryptionAlgorithm",
            "DestinationEncryptionAlgorithm",
            "SourceKeyMaterialId",
            "DestinationKeyMaterialId",
        ],
    ),
    ("GenerateDataKey", &["CiphertextBlob", "Plaintext", "KeyId", "CiphertextForRecipient", "KeyMaterialId"]),
    ("GenerateDataKeyWithoutPlaintext", &["CiphertextBlob", "KeyId", "KeyMaterialId"]),
    (
        "GenerateDataKeyPair",
        &[
            "PrivateKeyCiphertextBlob",
            "PrivateKeyPlaintext",
            "PublicKey",
            "KeyId",
            "KeyPairSpec",
            "CiphertextForRecipient",
            "KeyMaterialId",
        ],
    ),
    (
        "GenerateDataKeyPairWithoutPlaintext",
        &["PrivateKeyCiphertextBlob", "PublicKey", "KeyId", "KeyPairSpec", "KeyMaterialId"],
    ),
    ("GenerateRandom", &["Plaintext", "CiphertextForRecipient"]),
    ("Sign", &["KeyId", "Signature", "SigningAlgorithm"]),
    ("Verify", &["KeyId", "SignatureValid", "SigningAlgorithm"]),
    (
        "GetPublicKey",
        &[
            "KeyId",
            "PublicKey",
            "CustomerMasterKeySpec",
            "KeySpec",
            "KeyUsage",
            "EncryptionAlgorithms",
            "SigningAlgorithms",
            "KeyAgreementAlgorithms",
        ],
    ),
    ("GenerateMac", &["Mac", "MacAlgorithm", "KeyId"]),
    ("VerifyMac", &["KeyId", "MacValid", "MacAlgorithm"]),
    ("DeriveSharedSecret", &["KeyId", "SharedSecret", "CiphertextForRecipient", "KeyAgreementAlgorithm", "KeyOrigin"]),
    ("ReplicateKey", &["ReplicaKeyMetadata", "ReplicaPolicy", "ReplicaTags"]),
    ("CreateCustomKeyStore", &["CustomKeyStoreId"]),
    ("DescribeCustomKeyStores", &["CustomKeyStores", "NextMarker", "Truncated"]),
];

/// KeyMetadata's members (also ReplicateKey's ReplicaKeyMetadata).
const KEY_METADATA: &[&str] = &[
    "AWSAccountId",
    "KeyId",
    "Arn",
    "CreationDate",
    "Enabled",
    "Description",
    "KeyUsage",
    "KeyState",
    "DeletionDate",
    "ValidTo",
    "Origin",
    "CustomKeyStoreId",
    "CloudHsmClusterId",
    "ExpirationModel",
    "KeyManager",
    "CustomerMasterKeySpec",
    "KeySpec",
    "EncryptionAlgorithms",
    "SigningAlgorithms",
    "KeyAgreementAlgorithms",
    "MultiRegion",
    "MultiRegionConfiguration",
    "PendingDeletionWindowInDays",
    "MacAlgorithms",
    "XksKeyConfiguration",
    "CurrentKeyMaterialId",
];

/// The members of the structure (or of each structure in the list) that a response member
/// holds, by member name; within these actions' outputs a member name always denotes the
/// same shape.
const NESTED: &[(&str, &[&str])] = &[
    ("ReplicaKeyMetadata", KEY_METADATA),
    ("ReplicaTags", &["TagKey", "TagValue"]),
    ("KeyMetadata", KEY_METADATA),
    ("MultiRegionConfiguration", &["MultiRegionKeyType", "PrimaryKey", "ReplicaKeys"]),
    ("PrimaryKey", &["Arn", "Region"]),
    ("ReplicaKeys", &["Arn", "Region"]),
    ("XksKeyConfiguration", &["Id"]),
    ("Keys", &["KeyId", "KeyArn"]),
    ("Aliases", &["AliasName", "AliasArn", "TargetKeyId", "CreationDate", "LastUpdatedDate"]),
    ("Tags", &["TagKey", "TagValue"]),
    (
        "Grants",
        &[
            "KeyId",
            "GrantId",
            "Name",
            "CreationDate",
            "GranteePrincipal",
            "RetiringPrincipal",
            "IssuingAccount",
            "Operations",
            "Constraints",
        ],
    ),
    ("Constraints", &["EncryptionContextSubset", "EncryptionContextEquals"]),
    ("KeyLastUsage", &["Operation", "Timestamp", "CloudTrailEventId", "KmsRequestId"]),
    (
        "CustomKeyStores",
        &[
            "CustomKeyStoreId",
            "CustomKeyStoreName",
            "CloudHsmClusterId",
            "TrustAnchorCertificate",
            "ConnectionState",
            "ConnectionErrorCode",
            "CreationDate",
            "CustomKeyStoreType",
            "XksProxyConfiguration",
        ],
    ),
    (
        "XksProxyConfiguration",
        &["Connectivity", "AccessKeyId", "UriEndpoint", "UriPath", "VpcEndpointServiceName", "VpcEndpointServiceOwner"],
    ),
    (
        "Rotations",
        &[
            "KeyId",
            "KeyMaterialId",
            "KeyMaterialDescription",
            "ImportState",
            "KeyMaterialState",
            "ExpirationModel",
            "ValidTo",
            "RotationDate",
            "RotationType",
        ],
    ),
];

/// The model order of `action`'s output members; empty when unknown.
pub fn output_members(action: &str) -> &'static [&'static str] {
    lookup(OUTPUTS, action)
}

/// The model order of the members of the structures held by the response member `member`;
/// empty when unknown.
pub fn nested_members(member: &str) -> &'static [&'static str] {
    lookup(NESTED, member)
}

fn lookup(table: &'static [(&str, &'static [&'static str])], name: &str) -> &'static [&'static str] {
    table.iter().find(|(n, _)| *n == name).map(|(_, members)| *members).unwrap_or(&[])
}

/// The service model itself, as the agent embeds it (member order is lost: the file's
/// keys are sorted), for tests that check the tables above against it.
#[cfg(test)]
pub fn service_model() -> serde_json::Value {
    #[allow(clippy::expect_used)]
    serde_json::from_str(include_str!("../../../model/kms-2014-11-01.min.json")).expect("the embedded model is JSON")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn members(model: &Value, shape: &str) -> BTreeSet<String> {
        model["shapes"][shape]["members"].as_object().unwrap().keys().cloned().collect()
    }

    /// The structure shape a member of `shape` holds, directly or as a list's items.
    fn structure_of(model: &Value, shape: &str) -> Option<String> {
        let target = &model["shapes"][shape];
        let name = match target["type"].as_str()? {
            "structure" => shape.to_string(),
            "list" => target["member"]["shape"].as_str()?.to_string(),
            _ => return None,
        };
        (model["shapes"][&name]["type"] == "structure").then_some(name)
    }

    #[test]
    fn tables_name_exactly_the_model_members() {
        let model = service_model();
        for (action, order) in OUTPUTS {
            let output = model["operations"][action]["output"]["shape"].as_str().unwrap();
            let listed: BTreeSet<String> = order.iter().map(|m| m.to_string()).collect();
            assert_eq!(listed, members(&model, output), "{action}");
            assert_eq!(listed.len(), order.len(), "{action} lists a member twice");
            for (member, reference) in model["shapes"][output]["members"].as_object().unwrap() {
                let Some(nested) = structure_of(&model, reference["shape"].as_str().unwrap()) else { continue };
                let listed: BTreeSet<String> = nested_members(member).iter().map(|m| m.to_string()).collect();
                assert_eq!(listed, members(&model, &nested), "{action}.{member}");
            }
        }
    }
}
