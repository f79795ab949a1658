//! RSA encryption keys, ECDH keys and data key pairs, checked by an independent
//! implementation (Python's `cryptography`, `tests/python/key_pairs.py`): what it encrypts
//! to a kmsd public key decrypts in kmsd, a tampered ciphertext does not, its ECDH agrees
//! with kmsd's DeriveSharedSecret, and every data key pair's private key is of its spec and
//! signs what its public key verifies. AWS's exceptions for the misuses.

use std::path::Path;
use std::process::Command;

use kmsfs_common::ErrorKind;
use kmsfs_tests::{b64, create_key, unb64, TestAgent};
use serde_json::{json, Value};

fn python(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/key_pairs.py");
    let out = Command::new("python3").arg(script).args(args).output().expect("python3");
    assert!(out.status.success(), "key_pairs.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

fn rsa_key(agent: &TestAgent, spec: &str) -> String {
    let out = agent.ok("CreateKey", json!({"KeySpec": spec, "KeyUsage": "ENCRYPT_DECRYPT"}));
    out["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

fn kind(result: Result<Value, kmsfs_common::KmsError>) -> ErrorKind {
    result.expect_err("an error").kind
}

#[test]
fn what_cryptography_encrypts_to_the_public_key_decrypts_in_kmsd() {
    let agent = TestAgent::start();
    let key = rsa_key(&agent, "RSA_2048");
    let meta = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"].clone();
    assert_eq!(meta["EncryptionAlgorithms"], json!(["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]));
    assert!(meta.get("SigningAlgorithms").is_none());
    let public = agent.ok("GetPublicKey", json!({"KeyId": key}));
    assert_eq!(public["KeyUsage"], "ENCRYPT_DECRYPT");
    let der = public["PublicKey"].as_str().expect("PublicKey");
    for algorithm in ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"] {
        let ciphertext = python(&[
            "encrypt",
            "--public-key-b64",
            der,
            "--algorithm",
            algorithm,
            "--plaintext-b64",
            &b64(b"to kmsd"),
        ]);
        let opened =
            agent.ok("Decrypt", json!({"KeyId": key, "CiphertextBlob": ciphertext, "EncryptionAlgorithm": algorithm}));
        assert_eq!(unb64(&opened["Plaintext"]), b"to kmsd");
        assert_eq!(opened["EncryptionAlgorithm"], algorithm);
        // The other hash does not decrypt it.
        let other = if algorithm == "RSAES_OAEP_SHA_1" { "RSAES_OAEP_SHA_256" } else { "RSAES_OAEP_SHA_1" };
        let wrong = json!({"KeyId": key, "CiphertextBlob": ciphertext, "EncryptionAlgorithm": other});
        assert_eq!(kind(agent.call("Decrypt", wrong)), ErrorKind::InvalidCiphertextException);
    }
    // kmsd's own ciphertexts: round trip, tamper, and a move to a symmetric key by ReEncrypt.
    let sealed = agent
        .ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"secret"), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}));
    let mut tampered = unb64(&sealed["CiphertextBlob"]);
    tampered[7] ^= 1;
    let bad = json!({"KeyId": key, "CiphertextBlob": b64(&tampered), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"});
    assert_eq!(kind(agent.call("Decrypt", bad)), ErrorKind::InvalidCiphertextException);
    let symmetric = create_key(&agent);
    let moved = agent.ok(
        "ReEncrypt",
        json!({
            "CiphertextBlob": sealed["CiphertextBlob"], "SourceKeyId": key,
            "SourceEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "DestinationKeyId": symmetric,
        }),
    );
    assert_eq!(moved["SourceEncryptionAlgorithm"], "RSAES_OAEP_SHA_256");
    assert_eq!(unb64(&agent.ok("Decrypt", json!({"CiphertextBlob": moved["CiphertextBlob"]}))["Plaintext"]), b"secret");
    agent.ok("ListKeys", json!({}));
}

#[test]
fn rsa_misuse_gets_aws_exceptions() {
    let agent = TestAgent::start();
    let key = rsa_key(&agent, "RSA_2048");
    let over = json!({"KeyId": key, "Plaintext": b64(&[1u8; 191]), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"});
    assert_eq!(kind(agent.call("Encrypt", over)), ErrorKind::ValidationException);
    let at_limit = json!({"KeyId": key, "Plaintext": b64(&[1u8; 214]), "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"});
    agent.ok("Encrypt", at_limit);
    let symmetric_algorithm = json!({"KeyId": key, "Plaintext": b64(b"x")});
    assert_eq!(kind(agent.call("Encrypt", symmetric_algorithm)), ErrorKind::InvalidKeyUsageException);
    let with_context = json!({"KeyId": key, "Plaintext": b64(b"x"), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256", "EncryptionContext": {"a": "b"}});
    assert_eq!(kind(agent.call("Encrypt", with_context)), ErrorKind::ValidationException);
    let no_key = json!({"CiphertextBlob": b64(&[0u8; 256]), "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"});
    assert_eq!(kind(agent.call("Decrypt", no_key)), ErrorKind::ValidationException);
    assert_eq!(
        kind(agent.call("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}))),
        ErrorKind::InvalidKeyUsageException
    );
    let sign = json!({"KeyId": key, "Message": b64(b"m"), "SigningAlgorithm": "RSASSA_PSS_SHA_256"});
    assert_eq!(kind(agent.call("Sign", sign)), ErrorKind::InvalidKeyUsageException);
    assert_eq!(kind(agent.call("EnableKeyRotation", json!({"KeyId": key}))), ErrorKind::UnsupportedOperationException);
    // The private key survives a restart sealed by the root of trust.
    let sealed = agent
        .ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"kept"), "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"}));
    let mut agent = agent;
    agent.restart();
    let opened = agent.ok(
        "Decrypt",
        json!({"KeyId": key, "CiphertextBlob": sealed["CiphertextBlob"], "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"}),
    );
    assert_eq!(unb64(&opened["Plaintext"]), b"kept");
}

#[test]
fn data_key_pairs_are_of_their_spec_and_their_private_key_decrypts_from_the_blob() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let context = json!({"purpose": "data key pair"});
    for spec in
        ["RSA_2048", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521", "ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519"]
    {
        let pair =
            agent.ok("GenerateDataKeyPair", json!({"KeyId": key, "KeyPairSpec": spec, "EncryptionContext": context}));
        assert_eq!(pair["KeyPairSpec"], spec);
        let private = pair["PrivateKeyPlaintext"].as_str().expect("PrivateKeyPlaintext");
        let public = pair["PublicKey"].as_str().expect("PublicKey");
        assert_eq!(python(&["pair", "--private-b64", private, "--public-b64", public, "--spec", spec]), "ok", "{spec}");
        let opened = agent
            .ok("Decrypt", json!({"CiphertextBlob": pair["PrivateKeyCiphertextBlob"], "EncryptionContext": context}));
        assert_eq!(opened["Plaintext"].as_str(), Some(private), "{spec}: the blob holds the private key");
    }
    let without =
        agent.ok("GenerateDataKeyPairWithoutPlaintext", json!({"KeyId": key, "KeyPairSpec": "ECC_NIST_P256"}));
    assert!(without.get("PrivateKeyPlaintext").is_none());
    let private =
        agent.ok("Decrypt", json!({"CiphertextBlob": without["PrivateKeyCiphertextBlob"]}))["Plaintext"].clone();
    let public = without["PublicKey"].as_str().expect("PublicKey");
    assert_eq!(
        python(&[
            "pair",
            "--private-b64",
            private.as_str().expect("b64"),
            "--public-b64",
            public,
            "--spec",
            "ECC_NIST_P256"
        ]),
        "ok"
    );
    // Under an asymmetric key, or SM2: AWS's exceptions. And nothing secret in the audit trail.
    let rsa = rsa_key(&agent, "RSA_2048");
    let under_rsa = json!({"KeyId": rsa, "KeyPairSpec": "ECC_NIST_P256"});
    assert_eq!(kind(agent.call("GenerateDataKeyPair", under_rsa)), ErrorKind::InvalidKeyUsageException);
    let sm2 = json!({"KeyId": key, "KeyPairSpec": "SM2"});
    assert_eq!(kind(agent.call("GenerateDataKeyPair", sm2)), ErrorKind::UnsupportedOperationException);
    let events = agent.audit_events();
    let text = serde_json::to_string(&events).expect("json");
    assert!(!text.contains(private.as_str().expect("b64")), "a private key reached the audit trail");
    assert!(events.iter().any(|e| e["eventName"] == "GenerateDataKeyPair"));
}

#[test]
fn ecdh_agrees_with_cryptography_on_every_nist_curve() {
    let agent = TestAgent::start();
    for (spec, len) in [("ECC_NIST_P256", 32), ("ECC_NIST_P384", 48), ("ECC_NIST_P521", 66)] {
        let key = agent.ok("CreateKey", json!({"KeySpec": spec, "KeyUsage": "KEY_AGREEMENT"}))["KeyMetadata"].clone();
        assert_eq!(key["KeyAgreementAlgorithms"], json!(["ECDH"]), "{spec}");
        let id = key["KeyId"].as_str().expect("KeyId");
        let public = agent.ok("GetPublicKey", json!({"KeyId": id}));
        let out = python(&["ecdh", "--public-key-b64", public["PublicKey"].as_str().expect("PublicKey")]);
        let (peer, secret) = out.split_once('\n').expect("two lines");
        let derived =
            agent.ok("DeriveSharedSecret", json!({"KeyId": id, "KeyAgreementAlgorithm": "ECDH", "PublicKey": peer}));
        assert_eq!(derived["SharedSecret"].as_str(), Some(secret), "{spec}");
        assert_eq!(unb64(&derived["SharedSecret"]).len(), len);
        assert_eq!(derived["KeyOrigin"], "AWS_KMS");
        // A public key on another curve, or none at all: refused.
        let other = json!({"KeyId": id, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b64(b"not a key")});
        assert_eq!(kind(agent.call("DeriveSharedSecret", other)), ErrorKind::ValidationException);
        let sign = json!({"KeyId": id, "Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_256"});
        assert_eq!(kind(agent.call("Sign", sign)), ErrorKind::InvalidKeyUsageException);
    }
    let signing = agent.ok("CreateKey", json!({"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"}));
    let id = signing["KeyMetadata"]["KeyId"].as_str().expect("KeyId");
    let public = agent.ok("GetPublicKey", json!({"KeyId": id}))["PublicKey"].clone();
    let derive = json!({"KeyId": id, "KeyAgreementAlgorithm": "ECDH", "PublicKey": public});
    assert_eq!(kind(agent.call("DeriveSharedSecret", derive)), ErrorKind::InvalidKeyUsageException);
    let k1 = json!({"KeySpec": "ECC_SECG_P256K1", "KeyUsage": "KEY_AGREEMENT"});
    assert_eq!(kind(agent.call("CreateKey", k1)), ErrorKind::ValidationException);
    let text = serde_json::to_string(&agent.audit_events()).expect("json");
    assert!(!text.contains("SharedSecret\":"), "a shared secret reached the audit trail");
}

/// `material` wrapped for ImportKeyMaterial with Python's `cryptography`
/// (`tests/python/wrap_key_material.py`) under the public key of `params`.
fn wrap_for_import(params: &Value, algorithm: &str, material: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("material");
    std::fs::write(&file, material).expect("material");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/wrap_key_material.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--public-key-b64", params["PublicKey"].as_str().expect("PublicKey"), "--algorithm", algorithm])
        .arg("--material")
        .arg(&file)
        .output()
        .expect("python3");
    assert!(out.status.success(), "wrap_key_material.py: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// Imports `material` into the EXTERNAL key `key`, RSA-AES key wrap (what fits a private key).
fn import_material(agent: &TestAgent, key: &str, material: &[u8]) -> Result<Value, kmsfs_common::KmsError> {
    let params = agent.ok(
        "GetParametersForImport",
        json!({"KeyId": key, "WrappingAlgorithm": "RSA_AES_KEY_WRAP_SHA_256", "WrappingKeySpec": "RSA_3072"}),
    );
    let wrapped = wrap_for_import(&params, "RSA_AES_KEY_WRAP_SHA_256", material);
    agent.call(
        "ImportKeyMaterial",
        json!({"KeyId": key, "ImportToken": params["ImportToken"], "EncryptedKeyMaterial": wrapped,
               "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"}),
    )
}

#[test]
fn imported_signing_and_hmac_keys_are_the_material_given() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // An OpenSSL-made P-256 key: kmsd signs with it, OpenSSL verifies with its own public half.
    let der = dir.path().join("key.der");
    let made = Command::new("openssl")
        .args(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-outform", "DER", "-out"])
        .arg(&der)
        .status()
        .expect("openssl");
    assert!(made.success());
    // OpenSSL writes SEC1 (RFC 5915); AWS imports PKCS#8 only.
    let sec1 = std::fs::read(&der).expect("key");
    let sec1_file = dir.path().join("key.sec1.der");
    std::fs::rename(&der, &sec1_file).expect("rename");
    let to_pkcs8 = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-inform", "DER", "-outform", "DER", "-in"])
        .arg(&sec1_file)
        .arg("-out")
        .arg(&der)
        .status();
    assert!(to_pkcs8.expect("openssl").success());
    let key =
        agent.ok("CreateKey", json!({"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY", "Origin": "EXTERNAL"}));
    let key = key["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string();
    let sign = json!({"KeyId": key, "Message": b64(b"m"), "SigningAlgorithm": "ECDSA_SHA_256"});
    assert_eq!(kind(agent.call("Sign", sign)), ErrorKind::KMSInvalidStateException, "pending import");
    assert_eq!(kind(import_material(&agent, &key, &[7u8; 32])), ErrorKind::IncorrectKeyMaterialException);
    assert_eq!(kind(import_material(&agent, &key, &sec1)), ErrorKind::IncorrectKeyMaterialException);
    import_material(&agent, &key, &std::fs::read(&der).expect("key")).expect("ImportKeyMaterial");
    let public = agent.ok("GetPublicKey", json!({"KeyId": key}));
    let ours = Command::new("openssl")
        .args(["pkey", "-inform", "DER", "-pubout", "-outform", "DER", "-in"])
        .arg(&der)
        .output()
        .expect("openssl");
    assert_eq!(unb64(&public["PublicKey"]), ours.stdout, "GetPublicKey is the imported key's public half");
    let message = dir.path().join("message");
    std::fs::write(&message, b"signed by an imported key").expect("message");
    let signed = agent.ok(
        "Sign",
        json!({"KeyId": key, "Message": b64(b"signed by an imported key"), "SigningAlgorithm": "ECDSA_SHA_256"}),
    );
    let (sig, pem) = (dir.path().join("sig"), dir.path().join("pub.pem"));
    std::fs::write(&sig, unb64(&signed["Signature"])).expect("sig");
    let to_pem = Command::new("openssl")
        .args(["pkey", "-inform", "DER", "-pubout", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&pem)
        .status();
    assert!(to_pem.expect("openssl").success());
    let verified = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&pem)
        .arg("-signature")
        .arg(&sig)
        .arg(&message)
        .output()
        .expect("openssl");
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));

    // An imported HMAC key: its MACs are Python's hmac of the same key.
    let secret: Vec<u8> = (0..40u8).collect();
    let hmac =
        agent.ok("CreateKey", json!({"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC", "Origin": "EXTERNAL"}));
    let hmac = hmac["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string();
    import_material(&agent, &hmac, &secret).expect("ImportKeyMaterial");
    let mac =
        agent.ok("GenerateMac", json!({"KeyId": hmac, "Message": b64(b"mac me"), "MacAlgorithm": "HMAC_SHA_256"}));
    let python = Command::new("python3")
        .args(["-c", "import hmac,hashlib,sys,base64; print(base64.b64encode(hmac.new(bytes(range(40)), b'mac me', hashlib.sha256).digest()).decode())"])
        .output()
        .expect("python3");
    assert_eq!(mac["Mac"].as_str(), Some(String::from_utf8_lossy(&python.stdout).trim()));
    assert_eq!(kind(import_material(&agent, &hmac, &[1u8; 31])), ErrorKind::IncorrectKeyMaterialException);
    // The imported keys survive a restart, sealed by the root of trust.
    let mut agent = agent;
    agent.restart();
    let mac_again =
        agent.ok("GenerateMac", json!({"KeyId": hmac, "Message": b64(b"mac me"), "MacAlgorithm": "HMAC_SHA_256"}));
    assert_eq!(mac_again["Mac"], mac["Mac"]);
    assert_eq!(agent.ok("GetPublicKey", json!({"KeyId": key}))["PublicKey"], public["PublicKey"]);
}
