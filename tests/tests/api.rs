//! End-to-end tests of kmsd's API over its Unix socket: every action of the foundation
//! with its success shape and each error AWS documents for it, against a real agent.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kmsfs_common::ErrorKind::{self, *};
use kmsfs_tests::{b64, create_key, unb64, TestAgent};
use serde_json::{json, Value};

fn fails(agent: &TestAgent, action: &str, request: Value) -> ErrorKind {
    match agent.call(action, request.clone()) {
        Ok(v) => panic!("{action} {request} succeeded unexpectedly: {v}"),
        Err(e) => {
            assert!(!e.message.is_empty(), "{action}: an error needs a message");
            e.kind
        }
    }
}

fn encrypt(agent: &TestAgent, key: &str, plaintext: &[u8], context: Value) -> String {
    let v = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(plaintext), "EncryptionContext": context}));
    v["CiphertextBlob"].as_str().unwrap().to_string()
}

fn state_of(agent: &TestAgent, key: &str) -> String {
    agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["KeyState"].as_str().unwrap().to_string()
}

#[test]
fn create_describe_and_list_keys() {
    let agent = TestAgent::start();
    let v = agent.ok(
        "CreateKey",
        json!({"Description": "payroll", "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT",
               "Tags": [{"TagKey": "team", "TagValue": "db"}]}),
    );
    let meta = &v["KeyMetadata"];
    let id = meta["KeyId"].as_str().unwrap();
    let arn = meta["Arn"].as_str().unwrap();
    let account = meta["AWSAccountId"].as_str().unwrap();
    assert_eq!(account.len(), 12);
    assert_eq!(arn, format!("arn:aws:kms:local:{account}:key/{id}"));
    assert_eq!(meta["Description"], "payroll");
    assert_eq!(meta["KeyState"], "Enabled");
    assert_eq!(meta["Enabled"], true);
    assert_eq!(meta["Origin"], "AWS_KMS");
    assert_eq!(meta["KeyManager"], "CUSTOMER");
    assert_eq!(meta["KeySpec"], "SYMMETRIC_DEFAULT");
    assert_eq!(meta["EncryptionAlgorithms"], json!(["SYMMETRIC_DEFAULT"]));
    assert_eq!(meta["CurrentKeyMaterialId"].as_str().unwrap().len(), 64);
    let created = meta["CreationDate"].as_f64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - created).abs() < 60.0, "CreationDate is epoch seconds: {created}");

    agent.ok("CreateAlias", json!({"AliasName": "alias/payroll", "TargetKeyId": id}));
    let alias_arn = format!("arn:aws:kms:local:{account}:alias/payroll");
    for reference in [id, arn, "alias/payroll", alias_arn.as_str()] {
        let d = agent.ok("DescribeKey", json!({"KeyId": reference}));
        assert_eq!(d["KeyMetadata"]["KeyId"], id, "{reference}");
    }
    assert_eq!(fails(&agent, "DescribeKey", json!({"KeyId": "alias/none"})), NotFoundException);
    assert_eq!(fails(&agent, "DescribeKey", json!({"KeyId": "not-a-key"})), NotFoundException);
    assert_eq!(
        fails(&agent, "DescribeKey", json!({"KeyId": "00000000-0000-4000-8000-000000000000"})),
        NotFoundException
    );
    assert_eq!(
        fails(&agent, "DescribeKey", json!({"KeyId": format!("arn:aws:kms:local:999999999999:key/{id}")})),
        NotFoundException,
        "an ARN of another account does not name this key"
    );
    assert_eq!(fails(&agent, "DescribeKey", json!({"KeyId": "arn:aws:kms:local:1:key/x"})), InvalidArnException);
    assert_eq!(fails(&agent, "DescribeKey", json!({})), ValidationException);
    assert_eq!(fails(&agent, "DescribeKey", json!({"KeyId": ""})), ValidationException);

    // Paginate over 7 keys, 3 at a time: every key exactly once.
    let mut all: Vec<String> = (0..6).map(|_| create_key(&agent)).collect();
    all.push(id.to_string());
    all.sort();
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut req = json!({"Limit": 3});
        if let Some(m) = &marker {
            req["Marker"] = json!(m);
        }
        let page = agent.ok("ListKeys", req);
        pages += 1;
        for k in page["Keys"].as_array().unwrap() {
            assert_eq!(
                k["KeyArn"].as_str().unwrap(),
                format!("arn:aws:kms:local:{account}:key/{}", k["KeyId"].as_str().unwrap())
            );
            seen.push(k["KeyId"].as_str().unwrap().to_string());
        }
        if page["Truncated"] == true {
            marker = Some(page["NextMarker"].as_str().unwrap().to_string());
        } else {
            assert!(page.get("NextMarker").is_none());
            break;
        }
    }
    assert_eq!(pages, 3);
    seen.sort();
    assert_eq!(seen, all);
    assert_eq!(fails(&agent, "ListKeys", json!({"Marker": "%%%not-ours"})), InvalidMarkerException);
    assert_eq!(fails(&agent, "ListKeys", json!({"Limit": 0})), ValidationException);
    assert_eq!(fails(&agent, "ListKeys", json!({"Limit": 1001})), ValidationException);
}

#[test]
fn create_key_refuses_what_it_does_not_support() {
    let agent = TestAgent::start();
    assert_eq!(fails(&agent, "CreateKey", json!({"KeySpec": "SM2"})), UnsupportedOperationException);
    assert_eq!(fails(&agent, "CreateKey", json!({"KeySpec": "ECC_NIST_P256"})), ValidationException);
    assert_eq!(
        fails(&agent, "CreateKey", json!({"KeySpec": "HMAC_256", "KeyUsage": "SIGN_VERIFY"})),
        ValidationException
    );
    assert_eq!(fails(&agent, "CreateKey", json!({"KeySpec": "NOPE"})), ValidationException);
    assert_eq!(fails(&agent, "CreateKey", json!({"KeyUsage": "SIGN_VERIFY"})), ValidationException);
    assert_eq!(fails(&agent, "CreateKey", json!({"Origin": "AWS_CLOUDHSM"})), UnsupportedOperationException);
    assert_eq!(
        fails(&agent, "CreateKey", json!({"MultiRegion": true, "Origin": "EXTERNAL"})),
        UnsupportedOperationException
    );
    assert_eq!(fails(&agent, "CreateKey", json!({"Description": "x".repeat(8193)})), ValidationException);
    assert_eq!(fails(&agent, "CreateKey", json!({"Tags": [{"TagKey": "aws:x", "TagValue": ""}]})), TagException);
    assert_eq!(
        agent.ok("ListKeys", json!({}))["Keys"].as_array().unwrap().len(),
        0,
        "a refused CreateKey creates nothing"
    );
    let v = agent.ok("CreateKey", json!({"CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "Description": ""}));
    assert_eq!(v["KeyMetadata"]["KeySpec"], "SYMMETRIC_DEFAULT");
}

#[test]
fn disabling_a_key_stops_its_use_until_enabled() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let blob = encrypt(&agent, &key, b"before", json!({}));
    agent.ok("DisableKey", json!({"KeyId": key}));
    agent.ok("DisableKey", json!({"KeyId": key})); // idempotent, as in AWS
    assert_eq!(state_of(&agent, &key), "Disabled");
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["Enabled"], false);
    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")})), DisabledException);
    assert_eq!(fails(&agent, "Decrypt", json!({"CiphertextBlob": blob})), DisabledException);
    assert_eq!(fails(&agent, "GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"})), DisabledException);
    assert_eq!(
        fails(&agent, "GenerateDataKeyWithoutPlaintext", json!({"KeyId": key, "KeySpec": "AES_256"})),
        DisabledException
    );
    agent.ok("EnableKey", json!({"KeyId": key}));
    assert_eq!(state_of(&agent, &key), "Enabled");
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["Plaintext"]), b"before");
    assert_eq!(fails(&agent, "EnableKey", json!({"KeyId": "alias/none"})), NotFoundException);
    assert_eq!(
        fails(&agent, "DisableKey", json!({"KeyId": "00000000-0000-4000-8000-000000000000"})),
        NotFoundException
    );
}

#[test]
fn deletion_window_and_cancellation() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let blob = encrypt(&agent, &key, b"x", json!({}));
    assert_eq!(
        fails(&agent, "ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 6})),
        ValidationException
    );
    assert_eq!(
        fails(&agent, "ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 31})),
        ValidationException
    );
    assert_eq!(
        fails(&agent, "ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 366})),
        ValidationException
    );
    assert_eq!(state_of(&agent, &key), "Enabled", "a refused schedule changes nothing");
    let v = agent.ok("ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 7}));
    assert_eq!(v["KeyState"], "PendingDeletion");
    assert_eq!(v["PendingWindowInDays"], 7);
    assert!(v["KeyId"].as_str().unwrap().ends_with(&key), "KeyId is the key ARN");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let deletion = v["DeletionDate"].as_f64().unwrap();
    assert!((deletion - now - 7.0 * 86400.0).abs() < 120.0, "DeletionDate is 7 days out");
    let meta = &agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"];
    assert_eq!(meta["KeyState"], "PendingDeletion");
    assert_eq!(meta["PendingDeletionWindowInDays"], 7);
    assert_eq!(meta["DeletionDate"].as_f64().unwrap(), deletion);

    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")})), KMSInvalidStateException);
    assert_eq!(fails(&agent, "Decrypt", json!({"CiphertextBlob": blob})), KMSInvalidStateException);
    assert_eq!(fails(&agent, "GenerateDataKey", json!({"KeyId": key, "NumberOfBytes": 8})), KMSInvalidStateException);
    assert_eq!(fails(&agent, "EnableKey", json!({"KeyId": key})), KMSInvalidStateException);
    assert_eq!(fails(&agent, "DisableKey", json!({"KeyId": key})), KMSInvalidStateException);
    assert_eq!(
        fails(&agent, "UpdateKeyDescription", json!({"KeyId": key, "Description": "d"})),
        KMSInvalidStateException
    );
    assert_eq!(fails(&agent, "ScheduleKeyDeletion", json!({"KeyId": key})), KMSInvalidStateException);
    assert_eq!(
        fails(&agent, "CreateAlias", json!({"AliasName": "alias/late", "TargetKeyId": key})),
        KMSInvalidStateException
    );
    assert_eq!(
        fails(&agent, "TagResource", json!({"KeyId": key, "Tags": [{"TagKey": "a", "TagValue": "b"}]})),
        KMSInvalidStateException
    );

    let v = agent.ok("CancelKeyDeletion", json!({"KeyId": key}));
    assert!(v["KeyId"].as_str().unwrap().starts_with("arn:aws:kms:"));
    let meta = &agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"];
    assert_eq!(meta["KeyState"], "Disabled", "a cancelled deletion leaves the key disabled, as in AWS");
    assert!(meta.get("DeletionDate").is_none());
    assert!(meta.get("PendingDeletionWindowInDays").is_none());
    assert_eq!(fails(&agent, "CancelKeyDeletion", json!({"KeyId": key})), KMSInvalidStateException);
    agent.ok("EnableKey", json!({"KeyId": key}));
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["Plaintext"]), b"x");

    // The default window is 30 days.
    let v = agent.ok("ScheduleKeyDeletion", json!({"KeyId": key}));
    assert_eq!(v["PendingWindowInDays"], 30);
}

#[test]
fn update_key_description() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    agent.ok("UpdateKeyDescription", json!({"KeyId": key, "Description": "new words"}));
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["Description"], "new words");
    assert_eq!(fails(&agent, "UpdateKeyDescription", json!({"KeyId": key})), ValidationException);
    assert_eq!(
        fails(&agent, "UpdateKeyDescription", json!({"KeyId": key, "Description": "x".repeat(8193)})),
        ValidationException
    );
}

#[test]
fn aliases() {
    let agent = TestAgent::start();
    let (k1, k2) = (create_key(&agent), create_key(&agent));
    agent.ok("CreateAlias", json!({"AliasName": "alias/app", "TargetKeyId": k1}));
    assert_eq!(
        fails(&agent, "CreateAlias", json!({"AliasName": "alias/app", "TargetKeyId": k2})),
        AlreadyExistsException
    );
    assert_eq!(fails(&agent, "CreateAlias", json!({"AliasName": "app", "TargetKeyId": k1})), InvalidAliasNameException);
    assert_eq!(
        fails(&agent, "CreateAlias", json!({"AliasName": "alias/aws/ebs", "TargetKeyId": k1})),
        InvalidAliasNameException
    );
    assert_eq!(
        fails(&agent, "CreateAlias", json!({"AliasName": "alias/sp ace", "TargetKeyId": k1})),
        ValidationException
    );
    assert_eq!(
        fails(&agent, "CreateAlias", json!({"AliasName": "alias/x", "TargetKeyId": "alias/app"})),
        ValidationException
    );
    assert_eq!(
        fails(
            &agent,
            "CreateAlias",
            json!({"AliasName": "alias/x", "TargetKeyId": "00000000-0000-4000-8000-000000000000"})
        ),
        NotFoundException
    );

    // Through the alias, Encrypt uses k1; after UpdateAlias, k2.
    let blob = encrypt(&agent, "alias/app", b"one", json!({}));
    let d = agent.ok("Decrypt", json!({"CiphertextBlob": blob}));
    assert!(d["KeyId"].as_str().unwrap().ends_with(&k1));
    agent.ok("UpdateAlias", json!({"AliasName": "alias/app", "TargetKeyId": k2}));
    let blob = encrypt(&agent, "alias/app", b"two", json!({}));
    assert!(agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["KeyId"].as_str().unwrap().ends_with(&k2));
    assert_eq!(fails(&agent, "UpdateAlias", json!({"AliasName": "alias/none", "TargetKeyId": k2})), NotFoundException);

    for i in 0..4 {
        agent.ok("CreateAlias", json!({"AliasName": format!("alias/k1-{i}"), "TargetKeyId": k1}));
    }
    let listed = agent.ok("ListAliases", json!({}));
    assert_eq!(listed["Aliases"].as_array().unwrap().len(), 5);
    let entry = &listed["Aliases"][0];
    assert_eq!(entry["AliasName"], "alias/app");
    assert!(entry["AliasArn"].as_str().unwrap().ends_with(":alias/app"));
    assert_eq!(entry["TargetKeyId"], k2.as_str());
    assert!(entry["CreationDate"].is_number() && entry["LastUpdatedDate"].is_number());
    let for_k1 = agent.ok("ListAliases", json!({"KeyId": k1}));
    assert_eq!(for_k1["Aliases"].as_array().unwrap().len(), 4);
    let page = agent.ok("ListAliases", json!({"KeyId": k1, "Limit": 3}));
    assert_eq!(page["Aliases"].as_array().unwrap().len(), 3);
    assert_eq!(page["Truncated"], true);
    let rest = agent.ok("ListAliases", json!({"KeyId": k1, "Marker": page["NextMarker"]}));
    assert_eq!(rest["Aliases"].as_array().unwrap().len(), 1);
    assert_eq!(rest["Truncated"], false);
    assert_eq!(
        fails(&agent, "ListAliases", json!({"KeyId": "00000000-0000-4000-8000-000000000000"})),
        NotFoundException
    );

    agent.ok("DeleteAlias", json!({"AliasName": "alias/app"}));
    assert_eq!(fails(&agent, "DeleteAlias", json!({"AliasName": "alias/app"})), NotFoundException);
    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": "alias/app", "Plaintext": b64(b"x")})), NotFoundException);
}

#[test]
fn tags() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    agent.ok(
        "TagResource",
        json!({"KeyId": key, "Tags": [{"TagKey": "b", "TagValue": "2"}, {"TagKey": "a", "TagValue": ""}]}),
    );
    agent.ok("TagResource", json!({"KeyId": key, "Tags": [{"TagKey": "b", "TagValue": "3"}]}));
    let tags = agent.ok("ListResourceTags", json!({"KeyId": key}));
    assert_eq!(tags["Tags"], json!([{"TagKey": "a", "TagValue": ""}, {"TagKey": "b", "TagValue": "3"}]));
    assert_eq!(tags["Truncated"], false);
    agent.ok("UntagResource", json!({"KeyId": key, "TagKeys": ["a", "missing"]}));
    assert_eq!(agent.ok("ListResourceTags", json!({"KeyId": key}))["Tags"], json!([{"TagKey": "b", "TagValue": "3"}]));

    let tag = |k: &str| json!({"TagKey": k, "TagValue": "v"});
    assert_eq!(fails(&agent, "TagResource", json!({"KeyId": key, "Tags": [tag("aws:reserved")]})), TagException);
    assert_eq!(fails(&agent, "TagResource", json!({"KeyId": key, "Tags": [tag("d"), tag("d")]})), TagException);
    assert_eq!(
        fails(&agent, "TagResource", json!({"KeyId": key, "Tags": [tag(&"k".repeat(129))]})),
        ValidationException
    );
    let many: Vec<Value> = (0..50).map(|i| tag(&format!("t{i:02}"))).collect();
    assert_eq!(fails(&agent, "TagResource", json!({"KeyId": key, "Tags": many})), LimitExceededException);
    let fill: Vec<Value> = (0..49).map(|i| tag(&format!("t{i:02}"))).collect();
    agent.ok("TagResource", json!({"KeyId": key, "Tags": fill}));
    let page = agent.ok("ListResourceTags", json!({"KeyId": key, "Limit": 20}));
    assert_eq!(page["Tags"].as_array().unwrap().len(), 20);
    assert_eq!(page["Truncated"], true);
    assert_eq!(
        fails(&agent, "TagResource", json!({"KeyId": key, "Tags": [tag("one-too-many")]})),
        LimitExceededException
    );
    assert_eq!(fails(&agent, "TagResource", json!({"KeyId": "alias/none", "Tags": [tag("x")]})), NotFoundException);
    assert_eq!(fails(&agent, "ListResourceTags", json!({"KeyId": key, "Marker": "@@"})), InvalidMarkerException);
}

#[test]
fn encrypt_and_decrypt_bind_the_encryption_context() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let other = create_key(&agent);
    let ctx = json!({"tenant": "acme", "purpose": "backup"});
    let blob = encrypt(&agent, &key, b"attack at dawn", ctx.clone());
    let v = agent
        .ok("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": {"purpose": "backup", "tenant": "acme"}}));
    assert_eq!(unb64(&v["Plaintext"]), b"attack at dawn");
    assert!(v["KeyId"].as_str().unwrap().ends_with(&key));
    assert_eq!(v["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
    assert_eq!(v["KeyMaterialId"].as_str().unwrap().len(), 64);

    for wrong in [
        json!({}),
        json!({"tenant": "acme"}),
        json!({"tenant": "acme", "purpose": "Backup"}),
        json!({"tenant": "acme", "purpose": "backup", "extra": ""}),
        json!({"Tenant": "acme", "purpose": "backup"}),
    ] {
        assert_eq!(
            fails(&agent, "Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": wrong})),
            InvalidCiphertextException,
            "context {wrong} must not decrypt"
        );
    }

    // Tampering anywhere in the blob is InvalidCiphertextException.
    let raw = unb64(&json!(blob));
    for at in [0usize, 1, 10, 17, 20, 21, 44, 45, raw.len() - 1] {
        let mut t = raw.clone();
        t[at] ^= 0x01;
        assert_eq!(
            fails(&agent, "Decrypt", json!({"CiphertextBlob": b64(&t), "EncryptionContext": ctx})),
            InvalidCiphertextException,
            "flipped byte {at}"
        );
    }
    assert_eq!(
        fails(&agent, "Decrypt", json!({"CiphertextBlob": b64(&raw[..raw.len() - 1]), "EncryptionContext": ctx})),
        InvalidCiphertextException
    );
    assert_eq!(
        fails(&agent, "Decrypt", json!({"CiphertextBlob": b64(b"not a blob at all")})),
        InvalidCiphertextException
    );
    assert_eq!(fails(&agent, "Decrypt", json!({"CiphertextBlob": "!!!"})), SerializationException);
    assert_eq!(fails(&agent, "Decrypt", json!({"CiphertextBlob": b64(&[0u8; 6145])})), ValidationException);
    assert_eq!(fails(&agent, "Decrypt", json!({})), ValidationException);

    // KeyId on Decrypt: the right key (any form) works; another key is IncorrectKey.
    agent.ok("CreateAlias", json!({"AliasName": "alias/right", "TargetKeyId": key}));
    agent.ok("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": ctx, "KeyId": "alias/right"}));
    assert_eq!(
        fails(&agent, "Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": ctx, "KeyId": other})),
        IncorrectKeyException
    );
    assert_eq!(
        fails(&agent, "Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": ctx, "KeyId": "alias/none"})),
        NotFoundException
    );

    // The 4096-byte plaintext limit, and the empty plaintext.
    agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(&[7u8; 4096])}));
    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(&[7u8; 4097])})), ValidationException);
    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": ""})), ValidationException);
    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": key})), ValidationException);
    assert_eq!(fails(&agent, "Encrypt", json!({"Plaintext": b64(b"x")})), ValidationException);
    assert_eq!(fails(&agent, "Encrypt", json!({"KeyId": "alias/none", "Plaintext": b64(b"x")})), NotFoundException);
    assert_eq!(
        fails(
            &agent,
            "Encrypt",
            json!({"KeyId": key, "Plaintext": b64(b"x"), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"})
        ),
        InvalidKeyUsageException
    );
    assert_eq!(
        fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x"), "EncryptionContext": {"k": 1}})),
        SerializationException
    );
    assert_eq!(
        fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x"), "DryRun": true})),
        DryRunOperationException
    );
    assert_eq!(
        fails(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x"), "GrantTokens": vec!["t"; 11]})),
        ValidationException
    );
}

#[test]
fn re_encrypt_moves_a_ciphertext_to_another_key_and_context() {
    let agent = TestAgent::start();
    let (k1, k2) = (create_key(&agent), create_key(&agent));
    let blob = encrypt(&agent, &k1, b"portable", json!({"v": "1"}));
    let v = agent.ok(
        "ReEncrypt",
        json!({"CiphertextBlob": blob, "SourceEncryptionContext": {"v": "1"}, "DestinationKeyId": k2,
               "DestinationEncryptionContext": {"v": "2"}}),
    );
    assert!(v["SourceKeyId"].as_str().unwrap().ends_with(&k1));
    assert!(v["KeyId"].as_str().unwrap().ends_with(&k2));
    assert_eq!(v["SourceEncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
    assert_eq!(v["DestinationEncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
    assert!(v.get("Plaintext").is_none());
    let moved = v["CiphertextBlob"].clone();
    let d = agent.ok("Decrypt", json!({"CiphertextBlob": moved, "EncryptionContext": {"v": "2"}}));
    assert_eq!(unb64(&d["Plaintext"]), b"portable");
    assert!(d["KeyId"].as_str().unwrap().ends_with(&k2));
    assert_eq!(
        fails(&agent, "ReEncrypt", json!({"CiphertextBlob": blob, "DestinationKeyId": k2})),
        InvalidCiphertextException,
        "the source context is required"
    );
    assert_eq!(
        fails(
            &agent,
            "ReEncrypt",
            json!({"CiphertextBlob": blob, "SourceEncryptionContext": {"v": "1"}, "SourceKeyId": k2, "DestinationKeyId": k2})
        ),
        IncorrectKeyException
    );
    assert_eq!(
        fails(
            &agent,
            "ReEncrypt",
            json!({"CiphertextBlob": blob, "SourceEncryptionContext": {"v": "1"}, "DestinationKeyId": "alias/none"})
        ),
        NotFoundException
    );
    assert_eq!(fails(&agent, "ReEncrypt", json!({"CiphertextBlob": blob})), ValidationException);
    agent.ok("DisableKey", json!({"KeyId": k2}));
    assert_eq!(
        fails(
            &agent,
            "ReEncrypt",
            json!({"CiphertextBlob": blob, "SourceEncryptionContext": {"v": "1"}, "DestinationKeyId": k2})
        ),
        DisabledException
    );
}

#[test]
fn generate_data_keys() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    for (request, len) in [
        (json!({"KeySpec": "AES_256"}), 32),
        (json!({"KeySpec": "AES_128"}), 16),
        (json!({"NumberOfBytes": 1}), 1),
        (json!({"NumberOfBytes": 1024}), 1024),
    ] {
        let mut req = request.clone();
        req["KeyId"] = json!(key);
        req["EncryptionContext"] = json!({"file": "f1"});
        let v = agent.ok("GenerateDataKey", req);
        let plaintext = unb64(&v["Plaintext"]);
        assert_eq!(plaintext.len(), len, "{request}");
        assert!(v["KeyId"].as_str().unwrap().ends_with(&key));
        assert_eq!(v["KeyMaterialId"].as_str().unwrap().len(), 64);
        let d =
            agent.ok("Decrypt", json!({"CiphertextBlob": v["CiphertextBlob"], "EncryptionContext": {"file": "f1"}}));
        assert_eq!(unb64(&d["Plaintext"]), plaintext, "the blob wraps the returned data key");
    }
    let a = unb64(&agent.ok("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}))["Plaintext"]);
    let b = unb64(&agent.ok("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}))["Plaintext"]);
    assert_ne!(a, b);

    let v = agent.ok("GenerateDataKeyWithoutPlaintext", json!({"KeyId": key, "KeySpec": "AES_256"}));
    assert!(v.get("Plaintext").is_none());
    let d = agent.ok("Decrypt", json!({"CiphertextBlob": v["CiphertextBlob"]}));
    assert_eq!(unb64(&d["Plaintext"]).len(), 32);

    for bad in [
        json!({"KeyId": key}),
        json!({"KeyId": key, "KeySpec": "AES_256", "NumberOfBytes": 32}),
        json!({"KeyId": key, "NumberOfBytes": 0}),
        json!({"KeyId": key, "NumberOfBytes": 1025}),
        json!({"KeyId": key, "KeySpec": "AES_512"}),
    ] {
        assert_eq!(fails(&agent, "GenerateDataKey", bad.clone()), ValidationException, "{bad}");
        assert_eq!(fails(&agent, "GenerateDataKeyWithoutPlaintext", bad.clone()), ValidationException, "{bad}");
    }
    assert_eq!(
        fails(&agent, "GenerateDataKey", json!({"KeyId": "alias/none", "KeySpec": "AES_256"})),
        NotFoundException
    );
    assert_eq!(
        fails(&agent, "GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256", "DryRun": true})),
        DryRunOperationException
    );
}

#[test]
fn generate_data_keys_in_a_batch() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let contexts: Vec<Value> = (0..5).map(|i| json!({"kmsfs:volume": "v1", "kmsfs:file": format!("f{i}")})).collect();
    let v =
        agent.ok("Kmsfs.GenerateDataKeys", json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": contexts}));
    assert!(v["KeyId"].as_str().unwrap().ends_with(&key));
    assert_eq!(v["KeyMaterialId"].as_str().unwrap().len(), 64);
    let keys = v["DataKeys"].as_array().unwrap();
    assert_eq!(keys.len(), contexts.len());
    let mut seen = std::collections::HashSet::new();
    for (i, (data_key, context)) in keys.iter().zip(&contexts).enumerate() {
        let plaintext = unb64(&data_key["Plaintext"]);
        assert_eq!(plaintext.len(), 32);
        assert!(seen.insert(plaintext.clone()), "key {i} repeats an earlier one");
        let blob = &data_key["CiphertextBlob"];
        let d = agent.ok("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": context}));
        assert_eq!(unb64(&d["Plaintext"]), plaintext, "key {i} is wrapped under its own context");
        let other = &contexts[(i + 1) % contexts.len()];
        let e = agent.call("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": other})).unwrap_err();
        assert_eq!(e.kind, InvalidCiphertextException, "key {i} opened under another file's context");
    }
    let v = agent.ok("Kmsfs.GenerateDataKeys", json!({"KeyId": key, "NumberOfBytes": 7, "EncryptionContexts": [{}]}));
    assert_eq!(unb64(&v["DataKeys"][0]["Plaintext"]).len(), 7);

    // Validated as GenerateDataKey is, with the batch's own limits.
    let one = json!([{}]);
    for bad in [
        json!({"KeyId": key, "EncryptionContexts": one}),
        json!({"KeyId": key, "KeySpec": "AES_256", "NumberOfBytes": 32, "EncryptionContexts": one}),
        json!({"KeyId": key, "KeySpec": "AES_512", "EncryptionContexts": one}),
        json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": []}),
        json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": vec![json!({}); 257]}),
        json!({"KeyId": key, "KeySpec": "AES_256"}),
    ] {
        assert_eq!(fails(&agent, "Kmsfs.GenerateDataKeys", bad.clone()), ValidationException, "{bad}");
    }
    let wrong_type = json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": [{"a": 1}]});
    assert_eq!(fails(&agent, "Kmsfs.GenerateDataKeys", wrong_type), SerializationException);
    let missing = json!({"KeyId": "alias/none", "KeySpec": "AES_256", "EncryptionContexts": one});
    assert_eq!(fails(&agent, "Kmsfs.GenerateDataKeys", missing), NotFoundException);
    agent.ok("DisableKey", json!({"KeyId": key}));
    let disabled = json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": one});
    assert_eq!(fails(&agent, "Kmsfs.GenerateDataKeys", disabled), DisabledException);
}

#[test]
fn a_batch_is_authorized_for_every_context() {
    let agent = TestAgent::start();
    let account = agent.ok("DescribeKey", json!({"KeyId": create_key(&agent)}))["KeyMetadata"]["AWSAccountId"].clone();
    // Data keys of volume v1 only, whoever asks.
    let policy = json!({"Version": "2012-10-17", "Statement": [
        {"Sid": "Account", "Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{}:root", account.as_str().unwrap())},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "OneVolume", "Effect": "Deny", "Principal": "*", "Action": "kms:GenerateDataKey", "Resource": "*",
         "Condition": {"StringNotEquals": {"kms:EncryptionContext:kmsfs:volume": "v1"}}}
    ]});
    let key = agent.ok("CreateKey", json!({"Policy": policy.to_string()}))["KeyMetadata"]["KeyId"].clone();
    let batch = |volumes: &[&str]| {
        let contexts: Vec<Value> = volumes.iter().map(|v| json!({"kmsfs:volume": v})).collect();
        json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": contexts})
    };
    assert_eq!(agent.ok("Kmsfs.GenerateDataKeys", batch(&["v1", "v1"]))["DataKeys"].as_array().unwrap().len(), 2);
    let before = agent.audit_events().len();
    let e = agent.call("Kmsfs.GenerateDataKeys", batch(&["v1", "v2", "v1"])).unwrap_err();
    assert_eq!(e.kind, AccessDeniedException, "{e}");
    assert!(e.message.starts_with("EncryptionContexts[1]: "), "the refused context is named: {e}");
    let events = agent.audit_events();
    assert_eq!(events.len(), before + 1);
    assert_eq!(events[before]["errorCode"], "AccessDeniedException");
    assert_eq!(events[before]["responseElements"], Value::Null);
    // The same refusal as GenerateDataKey's.
    let single = json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContext": {"kmsfs:volume": "v2"}});
    assert_eq!(fails(&agent, "GenerateDataKey", single), AccessDeniedException);
}

#[test]
fn generate_random() {
    let agent = TestAgent::start();
    for n in [1usize, 32, 1024] {
        assert_eq!(unb64(&agent.ok("GenerateRandom", json!({"NumberOfBytes": n}))["Plaintext"]).len(), n);
    }
    let a = agent.ok("GenerateRandom", json!({"NumberOfBytes": 32}));
    let b = agent.ok("GenerateRandom", json!({"NumberOfBytes": 32}));
    assert_ne!(a["Plaintext"], b["Plaintext"]);
    assert_eq!(fails(&agent, "GenerateRandom", json!({"NumberOfBytes": 0})), ValidationException);
    assert_eq!(fails(&agent, "GenerateRandom", json!({"NumberOfBytes": 1025})), ValidationException);
    assert_eq!(fails(&agent, "GenerateRandom", json!({})), ValidationException);
    assert_eq!(fails(&agent, "GenerateRandom", json!({"NumberOfBytes": "8"})), SerializationException);
}

/// Sends raw bytes on a new connection and returns the status and parsed body.
fn raw(agent: &TestAgent, request: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(agent.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&response);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            Err(e) => panic!("reading the response: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post(target: &str, body: &str) -> Vec<u8> {
    format!(
        "POST / HTTP/1.1\r\nHost: kmsd\r\nX-Amz-Target: {target}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn protocol_errors_are_aws_shaped() {
    let agent = TestAgent::start();
    let (status, body) = raw(&agent, &post("TrentService.CreateKey", "{\"Description\": "));
    assert_eq!((status, body["__type"].as_str()), (400, Some("SerializationException")));
    assert!(body["message"].as_str().unwrap().contains("JSON"));
    let (status, body) = raw(&agent, &post("TrentService.CreateKey", "[1,2]"));
    assert_eq!((status, body["__type"].as_str()), (400, Some("SerializationException")));
    let (status, body) = raw(&agent, &post("TrentService.DoSomething", "{}"));
    assert_eq!((status, body["__type"].as_str()), (400, Some("UnknownOperationException")));
    let (status, body) = raw(&agent, &post("OtherService.ListKeys", "{}"));
    assert_eq!((status, body["__type"].as_str()), (400, Some("UnknownOperationException")));
    let (status, body) = raw(&agent, b"GET / HTTP/1.1\r\nHost: kmsd\r\nConnection: close\r\n\r\n");
    assert_eq!((status, body["__type"].as_str()), (400, Some("UnknownOperationException")));
    // Agents call each other's peer actions on the TCP listener only, never on the socket.
    let (status, body) = raw(&agent, &post("KmsfsPeer.GetReplicationParameters", "{\"KeyId\":\"k\"}"));
    assert_eq!((status, body["__type"].as_str()), (400, Some("UnknownOperationException")));
    // An empty body is an empty request, as botocore sends for no parameters.
    let (status, body) = raw(&agent, &post("TrentService.ListKeys", ""));
    assert_eq!(status, 200);
    assert_eq!(body["Keys"], json!([]));

    // A body over the cap is refused from its Content-Length, without waiting for it.
    let started = Instant::now();
    let head =
        "POST / HTTP/1.1\r\nHost: kmsd\r\nX-Amz-Target: TrentService.Encrypt\r\nContent-Length: 104857600\r\n\r\n{";
    let (status, body) = raw(&agent, head.as_bytes());
    assert_eq!((status, body["__type"].as_str()), (400, Some("ValidationException")));
    assert!(body["message"].as_str().unwrap().contains("limit"));
    assert!(started.elapsed() < Duration::from_secs(5));
    // A chunked body that grows past the cap is cut off too.
    let mut chunked =
        b"POST / HTTP/1.1\r\nHost: kmsd\r\nX-Amz-Target: TrentService.Encrypt\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..10 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    let (status, body) = raw(&agent, &chunked);
    assert_eq!((status, body["__type"].as_str()), (400, Some("ValidationException")));

    // The agent is still healthy after all of that.
    create_key(&agent);
}

#[test]
fn the_api_survives_restarts() {
    let mut agent = TestAgent::start();
    let key = create_key(&agent);
    agent.ok("CreateAlias", json!({"AliasName": "alias/keep", "TargetKeyId": key}));
    agent.ok("TagResource", json!({"KeyId": key, "Tags": [{"TagKey": "t", "TagValue": "v"}]}));
    agent.ok("UpdateKeyDescription", json!({"KeyId": key, "Description": "kept"}));
    let disabled = create_key(&agent);
    agent.ok("DisableKey", json!({"KeyId": disabled}));
    let doomed = create_key(&agent);
    let schedule = agent.ok("ScheduleKeyDeletion", json!({"KeyId": doomed, "PendingWindowInDays": 9}));
    let blob = encrypt(&agent, "alias/keep", b"persist me", json!({"a": "b"}));
    assert_eq!(agent.stop(), Some(0), "SIGTERM is a clean exit");
    assert!(!agent.socket().exists(), "the socket is removed on a clean exit");
    agent.start_again();
    let meta = &agent.ok("DescribeKey", json!({"KeyId": "alias/keep"}))["KeyMetadata"];
    assert_eq!(meta["KeyId"], key.as_str());
    assert_eq!(meta["Description"], "kept");
    assert_eq!(agent.ok("ListResourceTags", json!({"KeyId": key}))["Tags"], json!([{"TagKey": "t", "TagValue": "v"}]));
    assert_eq!(state_of(&agent, &disabled), "Disabled");
    let meta = &agent.ok("DescribeKey", json!({"KeyId": doomed}))["KeyMetadata"];
    assert_eq!(meta["KeyState"], "PendingDeletion");
    assert_eq!(meta["DeletionDate"], schedule["DeletionDate"]);
    let d = agent.ok("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": {"a": "b"}}));
    assert_eq!(unb64(&d["Plaintext"]), b"persist me");
}

#[test]
fn the_state_directory_is_guarded() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let blob = encrypt(&agent, &key, b"x", json!({}));
    // A second agent on the same state directory refuses to start.
    let second = std::process::Command::new(kmsfs_tests::bin("kmsd"))
        .arg("--socket")
        .arg(agent.dir().join("other.sock"))
        .arg("--state-dir")
        .arg(agent.state_dir())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another kmsd"), "{second:?}");
    // A second agent on the same socket refuses to start.
    let third = std::process::Command::new(kmsfs_tests::bin("kmsd"))
        .arg("--socket")
        .arg(agent.socket())
        .arg("--state-dir")
        .arg(agent.dir().join("state3"))
        .output()
        .unwrap();
    assert!(!third.status.success());
    assert!(String::from_utf8_lossy(&third.stderr).contains("already listening"), "{third:?}");
    drop(third);
    // Root key and database: private to the agent. Socket: open to all, policy decides.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(agent.state_dir().join("root.key")), 0o600);
    assert_eq!(mode(agent.state_dir()), 0o700);
    assert_eq!(mode(agent.socket()), 0o666);
    // The root key is used, not just stored: swapping it makes the agent refuse to start.
    let mut agent = agent;
    agent.kill();
    std::fs::write(agent.state_dir().join("root.key"), [9u8; 32]).unwrap();
    let out = std::process::Command::new(kmsfs_tests::bin("kmsd"))
        .arg("--socket")
        .arg(agent.socket())
        .arg("--state-dir")
        .arg(agent.state_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong root key or passphrase"), "{out:?}");
    let _ = blob;
}

#[test]
fn passphrase_root_of_trust() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let mut agent = TestAgent::start_with(&["--passphrase-file", pass.to_str().unwrap()]);
    let key = create_key(&agent);
    let blob = encrypt(&agent, &key, b"sealed by a passphrase", json!({}));
    assert!(!agent.state_dir().join("root.key").exists(), "no key file in passphrase mode");
    agent.restart();
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["Plaintext"]), b"sealed by a passphrase");
    agent.kill();
    std::fs::write(&pass, "wrong horse\n").unwrap();
    let out = std::process::Command::new(kmsfs_tests::bin("kmsd"))
        .arg("--socket")
        .arg(agent.socket())
        .arg("--state-dir")
        .arg(agent.state_dir())
        .arg("--passphrase-file")
        .arg(&pass)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong root key or passphrase"), "{out:?}");
}

/// SIGTERM lets a request already in progress finish: half a request is on the wire when
/// the signal arrives, the rest follows, and its answer still comes back before exit.
#[test]
fn shutdown_finishes_requests_in_flight() {
    let mut agent = TestAgent::start();
    let key = create_key(&agent);
    let body = json!({"KeyId": key, "Plaintext": b64(b"in flight")}).to_string();
    let request = post("TrentService.Encrypt", &body);
    let (first, rest) = request.split_at(request.len() - 10);
    let mut s = UnixStream::connect(agent.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(first).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pid = agent.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(rest).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("CiphertextBlob"), "{response}");
    assert_eq!(agent.stop(), Some(0));
    assert!(UnixStream::connect(agent.socket()).is_err(), "no longer listening");
}

/// Key material is locked in RAM, the process can leave no core dump, and neither
/// plaintexts nor data keys reach the log even at debug level.
#[test]
fn process_is_hardened_and_logs_carry_no_secrets() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let secret = b"do-not-log-this-plaintext-0123456789";
    let blob = encrypt(&agent, &key, secret, json!({"ctx": "value"}));
    let data_key = agent.ok("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}))["Plaintext"].clone();
    agent.ok("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": {"ctx": "value"}}));
    let _ = agent.call("Decrypt", json!({"CiphertextBlob": blob}));

    let pid = agent.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "core dumps are off: {core}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(locked_kb > 0, "key material is mlocked (VmLck: {locked_kb} kB)");

    let log = agent.log();
    assert!(log.contains("Decrypt"), "the debug log records requests: {log}");
    for needle in [
        String::from_utf8_lossy(secret).to_string(),
        b64(secret),
        data_key.as_str().unwrap().to_string(),
        kmsfs_tests::unb64(&data_key).iter().map(|b| format!("{b:02x}")).collect::<String>(),
    ] {
        assert!(!log.contains(&needle), "the log leaks {needle}");
    }
}

/// A caller inside a systemd system service carries `role/<unit>` besides its user: the
/// test puts a real client process in a real cgroup under `system.slice` and runs it as
/// uid 65534, then reads its principals back from the AccessDenied message.
#[test]
fn callers_in_a_system_service_carry_its_role() {
    assert!(kmsfs_tests::is_root(), "this test creates a cgroup and needs root (CI runs as root)");
    let hierarchy = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup", "/sys/fs/cgroup/systemd"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|h| h.join("cgroup.procs").exists())
        .expect("a cgroup hierarchy that systemd units live in");
    let unit = format!("kmsfs-test-{}.service", std::process::id());
    let cgroup = hierarchy.join("system.slice").join(&unit);
    std::fs::create_dir_all(&cgroup).expect("create the service's cgroup");
    let agent = TestAgent::start();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = format!(
        "echo $$ > {procs} && exec setpriv --reuid=65534 --regid=65534 --clear-groups -- {kmsctl} --socket {socket} list-keys",
        procs = cgroup.join("cgroup.procs").display(),
        kmsctl = kmsfs_tests::bin("kmsctl").display(),
        socket = agent.socket().display()
    );
    let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let _ = std::fs::remove_dir(&cgroup);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AccessDeniedException"), "{stderr}");
    assert!(stderr.contains(":user/nobody") || stderr.contains(":user/65534"), "{stderr}");
    assert!(stderr.contains(&format!(":role/{unit})")), "the unit's role is a principal: {stderr}");

    // The same client outside the service carries no role.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(kmsfs_tests::bin("kmsctl"))
        .arg("--socket")
        .arg(agent.socket())
        .arg("list-keys")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AccessDeniedException") && !stderr.contains(":role/"), "{stderr}");
}
