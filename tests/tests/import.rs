//! Imported key material (BYOK) against a real kmsd, with the material wrapped by an
//! independent tool exactly as AWS's documentation tells users to: Python's `cryptography`
//! (`tests/python/wrap_key_material.py`) encrypting to the public key GetParametersForImport
//! returned. Covers every wrapping algorithm, the refusals AWS documents, expiry through the
//! scheduler (`--clock-offset`), deletion and re-import, new material and rotation, and the
//! destruction of imported material leaving no byte of it in the state directory.

use std::path::Path;
use std::process::Command;

use kmsfs_common::ErrorKind;
use kmsfs_tests::{b64, unb64, TestAgent};
use serde_json::{json, Value};

const ALGORITHMS: [&str; 4] =
    ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"];

fn external_key(agent: &TestAgent) -> String {
    let meta = agent.ok("CreateKey", json!({"Origin": "EXTERNAL", "Description": "byok"}))["KeyMetadata"].clone();
    assert_eq!(meta["KeyState"], "PendingImport");
    assert_eq!(meta["Origin"], "EXTERNAL");
    meta["KeyId"].as_str().unwrap().to_string()
}

fn random_material() -> Vec<u8> {
    let mut m = vec![0u8; 32];
    getrandom(&mut m);
    m
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom").unwrap().read_exact(buf).unwrap();
}

/// `material` wrapped with Python's `cryptography` for the public key in `params`.
fn wrap(params: &Value, algorithm: &str, material: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("material");
    std::fs::write(&file, material).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/wrap_key_material.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--public-key-b64", params["PublicKey"].as_str().unwrap(), "--algorithm", algorithm, "--material"])
        .arg(&file)
        .output()
        .expect("python3");
    assert!(out.status.success(), "wrap_key_material.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn params(agent: &TestAgent, key: &str, algorithm: &str, spec: &str) -> Value {
    let p = agent
        .ok("GetParametersForImport", json!({"KeyId": key, "WrappingAlgorithm": algorithm, "WrappingKeySpec": spec}));
    assert!(p["KeyId"].as_str().unwrap().ends_with(key));
    p
}

fn import(agent: &TestAgent, key: &str, material: &[u8], extra: Value) -> Result<Value, kmsfs_common::KmsError> {
    let p = params(agent, key, "RSAES_OAEP_SHA_256", "RSA_2048");
    let mut req = json!({
        "KeyId": key,
        "ImportToken": p["ImportToken"],
        "EncryptedKeyMaterial": wrap(&p, "RSAES_OAEP_SHA_256", material),
        "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE",
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            req.as_object_mut().unwrap().remove(k);
        } else {
            req[k] = v.clone();
        }
    }
    agent.call("ImportKeyMaterial", req)
}

fn state(agent: &TestAgent, key: &str) -> String {
    agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["KeyState"].as_str().unwrap().to_string()
}

fn roundtrip(agent: &TestAgent, key: &str) {
    let blob = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"byok")}))["CiphertextBlob"].clone();
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["Plaintext"]), b"byok");
}

#[test]
fn every_wrapping_algorithm_imports_material_wrapped_by_cryptography() {
    let agent = TestAgent::start();
    let mut cases: Vec<(&str, &str)> = ALGORITHMS.iter().map(|a| (*a, "RSA_2048")).collect();
    cases.push(("RSAES_OAEP_SHA_256", "RSA_3072"));
    cases.push(("RSA_AES_KEY_WRAP_SHA_256", "RSA_4096"));
    for (algorithm, spec) in cases {
        let key = external_key(&agent);
        let e = agent.call("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::KMSInvalidStateException, "a key awaiting import does not encrypt");
        let p = params(&agent, &key, algorithm, spec);
        assert!(p["ParametersValidTo"].as_f64().unwrap() > 0.0);
        let material = random_material();
        let valid_to = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 86_400;
        let out = agent.ok(
            "ImportKeyMaterial",
            json!({
                "KeyId": key,
                "ImportToken": p["ImportToken"],
                "EncryptedKeyMaterial": wrap(&p, algorithm, &material),
                "ValidTo": valid_to,
                "KeyMaterialDescription": format!("{algorithm} {spec}"),
            }),
        );
        let meta = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"].clone();
        assert_eq!(meta["KeyState"], "Enabled", "{algorithm} {spec}");
        assert_eq!(meta["ExpirationModel"], "KEY_MATERIAL_EXPIRES");
        assert_eq!(meta["ValidTo"].as_f64().unwrap() as u64, valid_to);
        assert_eq!(meta["CurrentKeyMaterialId"], out["KeyMaterialId"]);
        roundtrip(&agent, &key);
        let all = agent.ok("ListKeyRotations", json!({"KeyId": key, "IncludeKeyMaterial": "ALL_KEY_MATERIAL"}));
        let entry = &all["Rotations"][0];
        assert_eq!(entry["ImportState"], "IMPORTED");
        assert_eq!(entry["KeyMaterialState"], "CURRENT");
        assert_eq!(entry["KeyMaterialDescription"], format!("{algorithm} {spec}"));
    }
}

#[test]
fn refused_imports_change_nothing() {
    let agent = TestAgent::start();
    let key = external_key(&agent);
    let other = external_key(&agent);
    let material = random_material();
    let p = params(&agent, &key, "RSAES_OAEP_SHA_256", "RSA_2048");
    let wrapped = wrap(&p, "RSAES_OAEP_SHA_256", &material);
    let call = |req: Value| agent.call("ImportKeyMaterial", req).unwrap_err();
    let base = json!({"KeyId": key, "ImportToken": p["ImportToken"], "EncryptedKeyMaterial": wrapped,
                      "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"});
    let with = |k: &str, v: Value| {
        let mut r = base.clone();
        r[k] = v;
        r
    };
    // A token that is not one, and a token issued for another key.
    let mut forged = unb64(&p["ImportToken"]);
    forged[40] ^= 1;
    assert_eq!(call(with("ImportToken", json!(b64(&forged)))).kind, ErrorKind::InvalidImportTokenException);
    let other_params = params(&agent, &other, "RSAES_OAEP_SHA_256", "RSA_2048");
    assert_eq!(
        call(with("ImportToken", other_params["ImportToken"].clone())).kind,
        ErrorKind::InvalidImportTokenException
    );
    // Material wrapped for another key's wrapping key.
    let for_other = wrap(&other_params, "RSAES_OAEP_SHA_256", &material);
    assert_eq!(call(with("EncryptedKeyMaterial", json!(for_other))).kind, ErrorKind::InvalidCiphertextException);
    // Wrapped with another algorithm than the token's.
    let sha1 = wrap(&p, "RSAES_OAEP_SHA_1", &material);
    assert_eq!(call(with("EncryptedKeyMaterial", json!(sha1))).kind, ErrorKind::InvalidCiphertextException);
    // Not 256 bits.
    let short = wrap(&p, "RSAES_OAEP_SHA_256", &material[..16]);
    assert_eq!(call(with("EncryptedKeyMaterial", json!(short))).kind, ErrorKind::IncorrectKeyMaterialException);
    // Expiration: ValidTo is required with KEY_MATERIAL_EXPIRES and refused without it.
    let mut no_valid_to = base.clone();
    no_valid_to.as_object_mut().unwrap().remove("ExpirationModel");
    assert_eq!(call(no_valid_to).kind, ErrorKind::ValidationException);
    assert_eq!(call(with("ValidTo", json!(4_000_000_000u64))).kind, ErrorKind::ValidationException);
    let mut too_far = with("ExpirationModel", json!("KEY_MATERIAL_EXPIRES"));
    too_far["ValidTo"] = json!(4_000_000_000u64);
    assert_eq!(call(too_far).kind, ErrorKind::ValidationException);
    assert_eq!(state(&agent, &key), "PendingImport", "nothing was imported by a refused request");

    // Keys of origin AWS_KMS take no import.
    let native = agent.ok("CreateKey", json!({}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let e = agent
        .call(
            "GetParametersForImport",
            json!({"KeyId": native, "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"}),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnsupportedOperationException);
    let e = call(with("KeyId", json!(native)));
    assert_eq!(e.kind, ErrorKind::UnsupportedOperationException, "{}", e.message);
    assert_eq!(
        agent.call("DeleteImportedKeyMaterial", json!({"KeyId": native})).unwrap_err().kind,
        ErrorKind::UnsupportedOperationException
    );
    let e = agent
        .call(
            "GetParametersForImport",
            json!({"KeyId": key, "WrappingAlgorithm": "RSAES_PKCS1_V1_5", "WrappingKeySpec": "RSA_2048"}),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnsupportedOperationException, "AWS no longer supports PKCS#1 v1.5 wrapping");

    // The import itself, then a re-import of different material.
    agent.ok("ImportKeyMaterial", base.clone());
    assert_eq!(state(&agent, &key), "Enabled");
    let e = import(&agent, &key, &random_material(), json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::IncorrectKeyMaterialException, "{}", e.message);
    roundtrip(&agent, &key);
}

#[test]
fn expired_tokens_and_material_are_refused_and_reimport_restores_the_key() {
    let mut agent = TestAgent::start();
    let key = external_key(&agent);
    let material = random_material();
    let stale = params(&agent, &key, "RSA_AES_KEY_WRAP_SHA_256", "RSA_2048");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    import(&agent, &key, &material, json!({"ExpirationModel": "KEY_MATERIAL_EXPIRES", "ValidTo": now + 2 * 86_400}))
        .unwrap();
    let blob = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"kept")}))["CiphertextBlob"].clone();

    // Three days later: the token is past its 24 hours and the material past its ValidTo.
    agent.stop();
    agent.set_args(&["--clock-offset", "3d"]);
    agent.start_again();
    assert_eq!(state(&agent, &key), "PendingImport", "the scheduler expired the material");
    let e = agent.call("Decrypt", json!({"CiphertextBlob": blob})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::KMSInvalidStateException);
    let expired: Vec<Value> =
        agent.audit_events().into_iter().filter(|e| e["eventName"] == "DeleteExpiredKeyMaterial").collect();
    assert_eq!(expired.len(), 1);
    let e = agent
        .call(
            "ImportKeyMaterial",
            json!({"KeyId": key, "ImportToken": stale["ImportToken"],
                   "EncryptedKeyMaterial": wrap(&stale, "RSA_AES_KEY_WRAP_SHA_256", &material),
                   "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}),
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::ExpiredImportTokenException);
    // Re-importing the same material brings the key and its old ciphertexts back.
    let e = import(&agent, &key, &random_material(), json!({})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::IncorrectKeyMaterialException);
    import(&agent, &key, &material, json!({})).unwrap();
    assert_eq!(state(&agent, &key), "Enabled");
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["Plaintext"]), b"kept");

    // DeleteImportedKeyMaterial: unusable until re-imported.
    let deleted = agent.ok("DeleteImportedKeyMaterial", json!({"KeyId": key}));
    assert_eq!(state(&agent, &key), "PendingImport");
    assert_eq!(
        agent.call("Decrypt", json!({"CiphertextBlob": blob})).unwrap_err().kind,
        ErrorKind::KMSInvalidStateException
    );
    let again = import(&agent, &key, &material, json!({"KeyMaterialId": deleted["KeyMaterialId"]})).unwrap();
    assert_eq!(again["KeyMaterialId"], deleted["KeyMaterialId"]);
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": blob}))["Plaintext"]), b"kept");
}

#[test]
fn new_material_becomes_current_on_demand_and_old_ciphertexts_still_decrypt() {
    let agent = TestAgent::start();
    let key = external_key(&agent);
    let first = import(&agent, &key, &random_material(), json!({})).unwrap()["KeyMaterialId"].clone();
    let old = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"old")}))["CiphertextBlob"].clone();
    // Rotation without new material pending is refused; automatic rotation is not for BYOK.
    assert_eq!(
        agent.call("RotateKeyOnDemand", json!({"KeyId": key})).unwrap_err().kind,
        ErrorKind::KMSInvalidStateException
    );
    let second = import(&agent, &key, &random_material(), json!({"ImportType": "NEW_KEY_MATERIAL"})).unwrap()
        ["KeyMaterialId"]
        .clone();
    assert_ne!(first, second);
    let all = agent.ok("ListKeyRotations", json!({"KeyId": key, "IncludeKeyMaterial": "ALL_KEY_MATERIAL"}))
        ["Rotations"]
        .clone();
    assert_eq!(all[1]["KeyMaterialState"], "PENDING_ROTATION");
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["CurrentKeyMaterialId"], first);
    agent.ok("RotateKeyOnDemand", json!({"KeyId": key}));
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["CurrentKeyMaterialId"], second);
    let fresh = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"new")}))["CiphertextBlob"].clone();
    assert_eq!(agent.ok("Decrypt", json!({"CiphertextBlob": old}))["KeyMaterialId"], first);
    assert_eq!(agent.ok("Decrypt", json!({"CiphertextBlob": fresh}))["KeyMaterialId"], second);
    let rotations = agent.ok("ListKeyRotations", json!({"KeyId": key}))["Rotations"].clone();
    assert_eq!(rotations.as_array().unwrap().len(), 1);
    assert_eq!(rotations[0]["RotationType"], "ON_DEMAND");
}

#[test]
fn deleting_a_key_leaves_no_byte_of_its_imported_material() {
    let mut agent = TestAgent::start();
    let key = external_key(&agent);
    let material = random_material();
    import(&agent, &key, &material, json!({})).unwrap();
    roundtrip(&agent, &key);
    agent.ok("ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 7}));
    agent.stop();
    agent.set_args(&["--clock-offset", "8d"]);
    agent.start_again();
    assert_eq!(agent.call("DescribeKey", json!({"KeyId": key})).unwrap_err().kind, ErrorKind::NotFoundException);
    let mut stack = vec![agent.dir().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !material.windows(8).any(|w| bytes.windows(8).any(|b| b == w)),
                    "{} holds bytes of the destroyed material",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn policies_see_the_import_and_rotation_condition_keys() {
    let policy = r#"{"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "kms:ImportKeyMaterial", "Resource": "*",
         "Condition": {"StringEquals": {"kms:ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}}},
        {"Effect": "Deny", "Action": "kms:GetParametersForImport", "Resource": "*",
         "Condition": {"StringEquals": {"kms:WrappingKeySpec": "RSA_2048"}}},
        {"Effect": "Deny", "Action": "kms:EnableKeyRotation", "Resource": "*",
         "Condition": {"NumericLessThan": {"kms:RotationPeriodInDays": "365"}}}
    ]}"#;
    let agent = TestAgent::start_configured(&[], &[("users/root.json", policy)]);
    let key = external_key(&agent);
    let refused = agent
        .call(
            "GetParametersForImport",
            json!({"KeyId": key, "WrappingAlgorithm": "RSAES_OAEP_SHA_256", "WrappingKeySpec": "RSA_2048"}),
        )
        .unwrap_err();
    assert_eq!(refused.kind, ErrorKind::AccessDeniedException);
    let p = params(&agent, &key, "RSAES_OAEP_SHA_256", "RSA_3072");
    let material = random_material();
    let request = |model: &str, valid_to: Option<u64>| {
        let mut r = json!({"KeyId": key, "ImportToken": p["ImportToken"], "ExpirationModel": model,
                           "EncryptedKeyMaterial": wrap(&p, "RSAES_OAEP_SHA_256", &material)});
        if let Some(v) = valid_to {
            r["ValidTo"] = json!(v);
        }
        r
    };
    let e = agent.call("ImportKeyMaterial", request("KEY_MATERIAL_DOES_NOT_EXPIRE", None)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException);
    let in_a_week = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 7 * 86_400;
    agent.ok("ImportKeyMaterial", request("KEY_MATERIAL_EXPIRES", Some(in_a_week)));
    let native = agent.ok("CreateKey", json!({}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let e = agent.call("EnableKeyRotation", json!({"KeyId": native, "RotationPeriodInDays": 90})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AccessDeniedException);
    agent.ok("EnableKeyRotation", json!({"KeyId": native, "RotationPeriodInDays": 400}));
}
