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
    ("GenerateRandom", &["Plaintext", "CiphertextForRecipient"]),
];

/// The members of the structure (or of each structure in the list) that a response member
/// holds, by member name; within these actions' outputs a member name always denotes the
/// same shape.
const NESTED: &[(&str, &[&str])] = &[
    (
        "KeyMetadata",
        &[
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
        ],
    ),
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
