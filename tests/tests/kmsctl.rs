//! End-to-end tests of `kmsctl` against a real agent: the `aws kms`-shaped subcommands and
//! their JSON and text output, the pipe forms, the aws CLI's error messages and exit codes,
//! key rotation, imported key material (wrapped with `openssl pkeyutl`, as AWS's
//! documentation shows), signatures that `openssl dgst` verifies with get-public-key's PEM,
//! MACs, ECDH that agrees with `openssl pkeyutl -derive`, data key pairs, last usage, the warning that comes with a scheduled deletion,
//! custom key stores on a real SoftHSM2 token (their password read from a file, a pipe or a
//! prompt that does not echo, never from an argument), and starting a per-user agent on
//! demand when none is running.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use kmsfs_tests::softhsm::SoftHsm;
use kmsfs_tests::{bin, TestAgent};
use serde_json::Value;

fn run(mut cmd: Command, args: &[&str]) -> Output {
    cmd.args(args).stdin(Stdio::null()).output().expect("run kmsctl")
}

/// Runs kmsctl and parses its JSON output; it must succeed.
fn json(agent: &TestAgent, args: &[&str]) -> Value {
    let out = run(agent.kmsctl(), args);
    assert!(out.status.success(), "kmsctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    if out.stdout.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Runs kmsctl expecting a service error; returns stderr.
fn service_error(agent: &TestAgent, args: &[&str], exception: &str, operation: &str) -> String {
    let out = run(agent.kmsctl(), args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(254), "{args:?}: {stderr}");
    assert!(
        stderr.contains(&format!("An error occurred ({exception}) when calling the {operation} operation: ")),
        "{args:?}: {stderr}"
    );
    assert!(out.stdout.is_empty());
    stderr
}

/// Asserts that `value` is a date as the aws CLI prints one
/// (`2024-05-01T12:00:00.123000+00:00`) and returns it.
fn iso_date(value: &Value) -> &str {
    let date = value.as_str().unwrap_or_else(|| panic!("not a printed date: {value}"));
    let shape: String = date.chars().map(|c| if c.is_ascii_digit() { '9' } else { c }).collect();
    assert_eq!(shape, "9999-99-99T99:99:99.999999+99:99", "{date}");
    date
}

fn key_id_of(created: &Value) -> String {
    created["KeyMetadata"]["KeyId"].as_str().unwrap().to_string()
}

fn pipe(agent: &TestAgent, args: &[&str], input: &[u8]) -> Output {
    let mut child = agent
        .kmsctl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kmsctl");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn every_action_through_the_cli() {
    let agent = TestAgent::start();
    let created = json(&agent, &["create-key", "--description", "cli key", "--tags", "TagKey=env,TagValue=dev"]);
    let meta = &created["KeyMetadata"];
    let key = meta["KeyId"].as_str().unwrap().to_string();
    let created_at = meta["CreationDate"].as_str().unwrap();
    assert!(created_at.ends_with("+00:00") && created_at.contains('T'), "ISO 8601 like the aws CLI: {created_at}");

    let keys = json(&agent, &["list-keys"]);
    assert_eq!(keys["Keys"][0]["KeyId"], key.as_str());
    assert_eq!(json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["Description"], "cli key");
    assert_eq!(json(&agent, &["update-key-description", "--key-id", &key, "--description", "renamed"]), Value::Null);
    assert_eq!(json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["Description"], "renamed");

    json(&agent, &["create-alias", "--alias-name", "alias/cli", "--target-key-id", &key]);
    let aliases = json(&agent, &["list-aliases", "--key-id", &key]);
    assert_eq!(aliases["Aliases"][0]["AliasName"], "alias/cli");

    json(&agent, &["tag-resource", "--key-id", &key, "--tags", "TagKey=owner,TagValue=ops"]);
    let tags = json(&agent, &["list-resource-tags", "--key-id", &key]);
    assert_eq!(tags["Tags"].as_array().unwrap().len(), 2);
    json(&agent, &["untag-resource", "--key-id", &key, "--tag-keys", "env"]);
    assert_eq!(json(&agent, &["list-resource-tags", "--key-id", &key])["Tags"][0]["TagKey"], "owner");

    // aws-style blob arguments: base64 inline, or fileb:// raw bytes.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"\x00binary\xffsecret").unwrap();
    let enc = json(
        &agent,
        &[
            "encrypt",
            "--key-id",
            "alias/cli",
            "--plaintext",
            &format!("fileb://{}", secret.display()),
            "--encryption-context",
            "app=cli,env=test",
        ],
    );
    assert!(enc["KeyId"].as_str().unwrap().ends_with(&key));
    let blob = enc["CiphertextBlob"].as_str().unwrap();
    let dec =
        json(&agent, &["decrypt", "--ciphertext-blob", blob, "--encryption-context", r#"{"env":"test","app":"cli"}"#]);
    assert_eq!(dec["Plaintext"], kmsfs_tests::b64(b"\x00binary\xffsecret"));
    service_error(&agent, &["decrypt", "--ciphertext-blob", blob], "InvalidCiphertextException", "Decrypt");

    let second = json(&agent, &["create-key"])["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let re = json(
        &agent,
        &[
            "re-encrypt",
            "--ciphertext-blob",
            blob,
            "--source-encryption-context",
            "app=cli,env=test",
            "--destination-key-id",
            &second,
        ],
    );
    assert!(re["KeyId"].as_str().unwrap().ends_with(&second));

    let dk = json(&agent, &["generate-data-key", "--key-id", &key, "--key-spec", "AES_256"]);
    assert_eq!(kmsfs_tests::unb64(&dk["Plaintext"]).len(), 32);
    let dk = json(&agent, &["generate-data-key-without-plaintext", "--key-id", &key, "--number-of-bytes", "64"]);
    assert!(dk.get("Plaintext").is_none());
    let rnd = json(&agent, &["generate-random", "--number-of-bytes", "16"]);
    assert_eq!(kmsfs_tests::unb64(&rnd["Plaintext"]).len(), 16);

    json(&agent, &["update-alias", "--alias-name", "alias/cli", "--target-key-id", &second]);
    json(&agent, &["delete-alias", "--alias-name", "alias/cli"]);
    json(&agent, &["disable-key", "--key-id", &key]);
    service_error(&agent, &["encrypt", "--key-id", &key, "--plaintext", "aGk="], "DisabledException", "Encrypt");
    json(&agent, &["enable-key", "--key-id", &key]);
    let sched = json(&agent, &["schedule-key-deletion", "--key-id", &key, "--pending-window-in-days", "7"]);
    assert_eq!(sched["KeyState"], "PendingDeletion");
    assert!(sched["DeletionDate"].as_str().unwrap().ends_with("+00:00"));
    service_error(&agent, &["encrypt", "--key-id", &key, "--plaintext", "aGk="], "KMSInvalidStateException", "Encrypt");
    json(&agent, &["cancel-key-deletion", "--key-id", &key]);
    assert_eq!(json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["KeyState"], "Disabled");
}

#[test]
fn pipe_mode_round_trip() {
    let agent = TestAgent::start();
    let key = json(&agent, &["create-key"])["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    json(&agent, &["create-alias", "--alias-name", "alias/app", "--target-key-id", &key]);
    let secret: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
    let enc = pipe(&agent, &["encrypt", "-k", "alias/app", "--encryption-context", "purpose=test"], &secret);
    assert!(enc.status.success(), "{}", String::from_utf8_lossy(&enc.stderr));
    assert!(!enc.stdout.windows(16).any(|w| secret.windows(16).any(|s| s == w)), "ciphertext carries no plaintext run");
    let dec = pipe(&agent, &["decrypt", "--encryption-context", "purpose=test"], &enc.stdout);
    assert!(dec.status.success(), "{}", String::from_utf8_lossy(&dec.stderr));
    assert_eq!(dec.stdout, secret);
    let wrong = pipe(&agent, &["decrypt"], &enc.stdout);
    assert_eq!(wrong.status.code(), Some(254));
    assert!(wrong.stdout.is_empty(), "nothing is written on failure");

    let other = json(&agent, &["create-key"])["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let moved = pipe(&agent, &["re-encrypt", "-k", &other, "--source-encryption-context", "purpose=test"], &enc.stdout);
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
    let dec = pipe(&agent, &["decrypt"], &moved.stdout);
    assert_eq!(dec.stdout, secret);

    let too_big = pipe(&agent, &["encrypt", "-k", "alias/app"], &vec![0u8; 4097]);
    assert_eq!(too_big.status.code(), Some(254));
    assert!(String::from_utf8_lossy(&too_big.stderr).contains("ValidationException"));
}

#[test]
fn text_output_and_exit_codes() {
    let agent = TestAgent::start();
    let key = json(&agent, &["create-key"])["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let out = run(agent.kmsctl(), &["--output", "text", "list-keys"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap();
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields[0], "KEYS");
    assert!(fields.contains(&key.as_str()), "{line}");

    service_error(&agent, &["describe-key", "--key-id", "alias/missing"], "NotFoundException", "DescribeKey");
    let out = run(agent.kmsctl(), &["describe-key"]);
    assert_eq!(out.status.code(), Some(252), "a missing required flag is a usage error");
    let out = run(agent.kmsctl(), &["no-such-command"]);
    assert_eq!(out.status.code(), Some(252));
    let out = run(agent.kmsctl(), &["encrypt", "--key-id", &key, "--plaintext", "not base64!"]);
    assert_eq!(out.status.code(), Some(252));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    let out = run(agent.kmsctl(), &["encrypt", "--key-id", &key, "--plaintext", "fileb:///nonexistent/file"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/file"));

    let mut cmd = Command::new(bin("kmsctl"));
    cmd.env("KMSD_SOCKET", agent.dir().join("no-agent-here.sock"));
    let out = run(cmd, &["list-keys"]);
    assert_eq!(out.status.code(), Some(255), "an unreachable agent is exit 255");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-agent-here.sock"));
}

#[test]
fn key_rotation_through_the_cli() {
    let agent = TestAgent::start();
    let key = key_id_of(&json(&agent, &["create-key"]));
    assert_eq!(json(&agent, &["get-key-rotation-status", "--key-id", &key])["KeyRotationEnabled"], false);
    let enabled = json(&agent, &["enable-key-rotation", "--key-id", &key, "--rotation-period-in-days", "90"]);
    assert_eq!(enabled, Value::Null, "enable-key-rotation prints nothing");
    let status = json(&agent, &["get-key-rotation-status", "--key-id", &key]);
    assert_eq!(status["KeyRotationEnabled"], true);
    assert_eq!(status["RotationPeriodInDays"], 90);
    iso_date(&status["NextRotationDate"]);
    service_error(
        &agent,
        &["enable-key-rotation", "--key-id", &key, "--rotation-period-in-days", "30"],
        "ValidationException",
        "EnableKeyRotation",
    );

    let out = run(agent.kmsctl(), &["--output", "text", "get-key-rotation-status", "--key-id", &key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.trim_end().split('\t').collect();
    assert!(fields.contains(&"True") && fields.contains(&"90"), "aws-style text: {text:?}");

    let old_blob = json(&agent, &["encrypt", "--key-id", &key, "--plaintext", "b2xk"])["CiphertextBlob"].clone();
    let rotated = json(&agent, &["rotate-key-on-demand", "--key-id", &key]);
    assert!(rotated["KeyId"].as_str().unwrap().ends_with(&key), "{rotated}");
    let listed = json(&agent, &["list-key-rotations", "--key-id", &key]);
    let rotations = listed["Rotations"].as_array().unwrap();
    assert_eq!(rotations.len(), 1, "{listed}");
    assert_eq!(rotations[0]["RotationType"], "ON_DEMAND");
    iso_date(&rotations[0]["RotationDate"]);
    let current = json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["CurrentKeyMaterialId"].clone();
    assert_eq!(rotations[0]["KeyMaterialId"], current, "the rotation made the current material");
    let decrypted = json(&agent, &["decrypt", "--ciphertext-blob", old_blob.as_str().unwrap()]);
    assert_eq!(decrypted["Plaintext"], "b2xk", "ciphertext from before the rotation still decrypts");

    // One page at a time with --limit and --marker; every page merged without them.
    json(&agent, &["rotate-key-on-demand", "--key-id", &key]);
    let first = json(&agent, &["list-key-rotations", "--key-id", &key, "--limit", "1"]);
    assert_eq!(first["Rotations"].as_array().unwrap().len(), 1);
    assert_eq!(first["Truncated"], true);
    let marker = first["NextMarker"].as_str().unwrap();
    let second = json(&agent, &["list-key-rotations", "--key-id", &key, "--limit", "1", "--marker", marker]);
    assert_eq!(second["Rotations"].as_array().unwrap().len(), 1);
    assert_ne!(second["Rotations"][0]["KeyMaterialId"], first["Rotations"][0]["KeyMaterialId"]);
    let all = json(&agent, &["list-key-rotations", "--key-id", &key, "--include-key-material", "ALL_KEY_MATERIAL"]);
    assert_eq!(all["Rotations"].as_array().unwrap().len(), 3, "the original material and two rotations: {all}");
    assert!(all.get("Truncated").is_none() && all.get("NextMarker").is_none());

    json(&agent, &["disable-key-rotation", "--key-id", &key]);
    assert_eq!(json(&agent, &["get-key-rotation-status", "--key-id", &key])["KeyRotationEnabled"], false);
    service_error(
        &agent,
        &["rotate-key-on-demand", "--key-id", "alias/none"],
        "NotFoundException",
        "RotateKeyOnDemand",
    );
}

#[test]
fn key_last_usage_through_the_cli() {
    let agent = TestAgent::start();
    let key = key_id_of(&json(&agent, &["create-key"]));
    let fresh = json(&agent, &["get-key-last-usage", "--key-id", &key]);
    assert!(fresh["KeyId"].as_str().unwrap().ends_with(&key));
    assert!(fresh["KeyLastUsage"].get("Operation").is_none(), "a new key has not been used: {fresh}");
    iso_date(&fresh["TrackingStartDate"]);
    iso_date(&fresh["KeyCreationDate"]);
    json(&agent, &["encrypt", "--key-id", &key, "--plaintext", "aGk="]);
    let usage = json(&agent, &["get-key-last-usage", "--key-id", &key]);
    assert_eq!(usage["KeyLastUsage"]["Operation"], "Encrypt", "{usage}");
    iso_date(&usage["KeyLastUsage"]["Timestamp"]);
    service_error(&agent, &["get-key-last-usage", "--key-id", "alias/none"], "NotFoundException", "GetKeyLastUsage");
}

#[test]
fn scheduling_a_deletion_warns_on_stderr() {
    let agent = TestAgent::start();
    let key = key_id_of(&json(&agent, &["create-key"]));
    let out = run(agent.kmsctl(), &["schedule-key-deletion", "--key-id", &key, "--pending-window-in-days", "7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let response: Value = serde_json::from_slice(&out.stdout).expect("stdout is the response's JSON alone");
    let date = iso_date(&response["DeletionDate"]);
    let arn = response["KeyId"].as_str().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "WARNING",
        date,
        "destroyed for good",
        "kmsfs volume",
        "crypto-shredding",
        &format!("kmsctl cancel-key-deletion --key-id {arn}"),
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in the warning: {stderr}");
    }

    // The command the warning names keeps the key, and says nothing on stderr itself.
    let out = run(agent.kmsctl(), &["cancel-key-deletion", "--key-id", arn]);
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["KeyState"], "Disabled");

    // With --output text too, stdout is the response and the warning goes to stderr.
    let out = run(agent.kmsctl(), &["--output", "text", "schedule-key-deletion", "--key-id", &key]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PendingDeletion") && !text.contains("WARNING"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("crypto-shredding"));
}

/// Imported key material as AWS's documentation walks an `aws kms` user through it: the
/// wrapping public key and import token from get-parameters-for-import, the material
/// wrapped with `openssl pkeyutl` (RSAES_OAEP_SHA_256), imported from files with fileb://.
#[test]
fn imported_key_material_through_the_cli() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let created = json(&agent, &["create-key", "--origin", "EXTERNAL", "--description", "byok"]);
    assert_eq!(created["KeyMetadata"]["Origin"], "EXTERNAL");
    assert_eq!(created["KeyMetadata"]["KeyState"], "PendingImport");
    let key = key_id_of(&created);

    let mut material = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut material).unwrap();
    let import = |extra: &[&str]| {
        let params = json(
            &agent,
            &[
                "get-parameters-for-import",
                "--key-id",
                &key,
                "--wrapping-algorithm",
                "RSAES_OAEP_SHA_256",
                "--wrapping-key-spec",
                "RSA_2048",
            ],
        );
        iso_date(&params["ParametersValidTo"]);
        let public_key = dir.path().join("WrappingPublicKey.bin");
        std::fs::write(&public_key, kmsfs_tests::unb64(&params["PublicKey"])).unwrap();
        let plaintext = dir.path().join("PlaintextKeyMaterial.bin");
        std::fs::write(&plaintext, material).unwrap();
        let wrapped = dir.path().join("EncryptedKeyMaterial.bin");
        let openssl = Command::new("openssl")
            .args(["pkeyutl", "-encrypt", "-keyform", "DER", "-pubin", "-inkey"])
            .arg(&public_key)
            .arg("-in")
            .arg(&plaintext)
            .arg("-out")
            .arg(&wrapped)
            .args(["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"])
            .args(["-pkeyopt", "rsa_mgf1_md:sha256"])
            .output()
            .expect("this test wraps key material with openssl, as AWS's documentation does");
        assert!(openssl.status.success(), "openssl: {}", String::from_utf8_lossy(&openssl.stderr));
        let token = params["ImportToken"].as_str().unwrap().to_string();
        let wrapped = format!("fileb://{}", wrapped.display());
        let mut args = vec!["import-key-material", "--key-id", &key, "--import-token", &token];
        args.extend(["--encrypted-key-material", &wrapped]);
        args.extend(extra);
        json(&agent, &args)
    };

    // A --valid-to in the form kmsctl prints dates is taken back as the same instant.
    let in_30_days = (kmsfs_common::time::now_millis() / 1000 / 86_400 + 30) * 86_400;
    let valid_to = kmsfs_common::time::iso8601(in_30_days as f64);
    let imported = import(&["--expiration-model", "KEY_MATERIAL_EXPIRES", "--valid-to", &valid_to]);
    assert!(imported["KeyId"].as_str().unwrap().ends_with(&key), "{imported}");
    assert!(imported["KeyMaterialId"].is_string(), "{imported}");
    let meta = json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"].clone();
    assert_eq!(meta["KeyState"], "Enabled");
    assert_eq!(meta["ExpirationModel"], "KEY_MATERIAL_EXPIRES");
    assert_eq!(meta["ValidTo"], valid_to.as_str());
    let blob = json(&agent, &["encrypt", "--key-id", &key, "--plaintext", "Ynlvaw=="])["CiphertextBlob"].clone();
    let blob = blob.as_str().unwrap();
    assert_eq!(json(&agent, &["decrypt", "--ciphertext-blob", blob])["Plaintext"], "Ynlvaw==");

    let deleted = json(&agent, &["delete-imported-key-material", "--key-id", &key]);
    assert!(deleted["KeyId"].as_str().unwrap().ends_with(&key), "{deleted}");
    assert_eq!(json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["KeyState"], "PendingImport");
    service_error(&agent, &["decrypt", "--ciphertext-blob", blob], "KMSInvalidStateException", "Decrypt");

    // The same material imported again brings the old ciphertext back.
    import(&["--expiration-model", "KEY_MATERIAL_DOES_NOT_EXPIRE"]);
    assert_eq!(json(&agent, &["decrypt", "--ciphertext-blob", blob])["Plaintext"], "Ynlvaw==");

    let out = run(
        agent.kmsctl(),
        &["import-key-material", "--key-id", &key, "--import-token", "AQID", "--encrypted-key-material", "AQID"],
    );
    assert_eq!(out.status.code(), Some(254), "a token that is no token is the service's to refuse");
    let out = run(
        agent.kmsctl(),
        &[
            "import-key-material",
            "--key-id",
            &key,
            "--import-token",
            "AQID",
            "--encrypted-key-material",
            "AQID",
            "--valid-to",
            "next month",
        ],
    );
    assert_eq!(out.status.code(), Some(252), "a --valid-to that is no date is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ISO 8601"));
}

/// Runs `openssl dgst -sha256 -verify` on a signature file; true when openssl says
/// "Verified OK".
fn openssl_verifies(pem: &std::path::Path, signature: &std::path::Path, message: &std::path::Path) -> bool {
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(pem)
        .arg("-signature")
        .arg(signature)
        .arg(message)
        .output()
        .expect("this test checks signatures with openssl");
    let verified = String::from_utf8_lossy(&out.stdout).contains("Verified OK");
    assert_eq!(out.status.success(), verified, "openssl: {}", String::from_utf8_lossy(&out.stderr));
    verified
}

/// An ECC_NIST_P256 key through kmsctl as an `aws kms` user signs with it: sign a file
/// (fileb://) and a pipe, get-public-key --output pem for openssl, which verifies both
/// signatures; kmsctl verify accepts them (RAW, and DIGEST of the same message) and refuses
/// a tampered signature or message with the aws CLI's error and exit code 254.
#[test]
fn signing_through_the_cli_verifies_with_openssl() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let created = json(&agent, &["create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY"]);
    assert_eq!(created["KeyMetadata"]["KeySpec"], "ECC_NIST_P256");
    assert_eq!(created["KeyMetadata"]["SigningAlgorithms"], serde_json::json!(["ECDSA_SHA_256"]));
    let key = key_id_of(&created);
    json(&agent, &["create-alias", "--alias-name", "alias/signer", "--target-key-id", &key]);

    let message = dir.path().join("msg");
    std::fs::write(&message, b"\x00release 1.2.3\xff\n").unwrap();
    let message_arg = format!("fileb://{}", message.display());
    let sign = ["sign", "--key-id", "alias/signer", "--signing-algorithm", "ECDSA_SHA_256"];
    let signed = json(&agent, &[&sign[..], &["--message", &message_arg]].concat());
    assert!(signed["KeyId"].as_str().unwrap().ends_with(&key), "{signed}");
    assert_eq!(signed["SigningAlgorithm"], "ECDSA_SHA_256");
    let signature = dir.path().join("sig.bin");
    std::fs::write(&signature, kmsfs_tests::unb64(&signed["Signature"])).unwrap();
    let piped = pipe(&agent, &sign, &std::fs::read(&message).unwrap());
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    let piped_signature = dir.path().join("piped.sig");
    std::fs::write(&piped_signature, &piped.stdout).unwrap();

    let out = run(agent.kmsctl(), &["get-public-key", "--key-id", "alias/signer", "--output", "pem"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = pem.lines().collect();
    assert_eq!((lines[0], lines[lines.len() - 1]), ("-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"));
    assert!(lines[1..lines.len() - 1].iter().all(|l| !l.is_empty() && l.len() <= 64), "{pem}");
    let described = json(&agent, &["get-public-key", "--key-id", &key]);
    assert_eq!(described["KeyUsage"], "SIGN_VERIFY");
    assert_eq!(
        kmsfs_tests::unb64(&Value::String(lines[1..lines.len() - 1].concat())),
        kmsfs_tests::unb64(&described["PublicKey"]),
        "the PEM is the JSON output's DER"
    );
    let public_pem = dir.path().join("pub.pem");
    std::fs::write(&public_pem, &pem).unwrap();

    assert!(openssl_verifies(&public_pem, &signature, &message), "openssl verifies kmsctl's signature");
    assert!(openssl_verifies(&public_pem, &piped_signature, &message), "and the one from the pipe form");
    let other = dir.path().join("other-msg");
    std::fs::write(&other, b"\x00release 1.2.4\xff\n").unwrap();
    assert!(!openssl_verifies(&public_pem, &signature, &other), "openssl is not a rubber stamp");

    let signature_arg = format!("fileb://{}", signature.display());
    let verify = ["verify", "--key-id", &key, "--signing-algorithm", "ECDSA_SHA_256", "--signature", &signature_arg];
    let verified = json(&agent, &[&verify[..], &["--message", &message_arg]].concat());
    assert_eq!(verified["SignatureValid"], true, "{verified}");
    assert!(verified["KeyId"].as_str().unwrap().ends_with(&key), "{verified}");
    let digest = Command::new("openssl").args(["dgst", "-sha256", "-binary"]).arg(&message).output().unwrap();
    let digest = kmsfs_tests::b64(&digest.stdout);
    let by_digest = json(&agent, &[&verify[..], &["--message", &digest, "--message-type", "DIGEST"]].concat());
    assert_eq!(by_digest["SignatureValid"], true, "a DIGEST of the message verifies the same signature");
    let out = run(agent.kmsctl(), &["verify", "--key-id", &key, "--message", &message_arg]);
    assert_eq!(out.status.code(), Some(252), "verify needs --signature and --signing-algorithm");

    let other_arg = format!("fileb://{}", other.display());
    let stderr = service_error(
        &agent,
        &[&verify[..], &["--message", &other_arg]].concat(),
        "KMSInvalidSignatureException",
        "Verify",
    );
    assert!(stderr.contains("not valid"), "{stderr}");
    let mut tampered = std::fs::read(&signature).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered = kmsfs_tests::b64(&tampered);
    service_error(
        &agent,
        &[
            "verify",
            "--key-id",
            &key,
            "--message",
            &message_arg,
            "--signature",
            &tampered,
            "--signing-algorithm",
            "ECDSA_SHA_256",
        ],
        "KMSInvalidSignatureException",
        "Verify",
    );

    let out = run(agent.kmsctl(), &["--output", "text", "get-public-key", "--key-id", &key]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l == "SIGNINGALGORITHMS\tECDSA_SHA_256"), "aws-style text: {text}");
    let out = run(agent.kmsctl(), &["--output", "pem", "sign", "--key-id", &key, "--message", &message_arg]);
    assert_eq!(out.status.code(), Some(252));
    let out = run(agent.kmsctl(), &["--output", "pem", "describe-key", "--key-id", &key]);
    assert_eq!(out.status.code(), Some(252), "--output pem is only for get-public-key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("only for get-public-key"));
    service_error(
        &agent,
        &[&sign[..], &["--message", &message_arg, "--dry-run"]].concat(),
        "DryRunOperationException",
        "Sign",
    );
    let symmetric = key_id_of(&json(&agent, &["create-key"]));
    service_error(
        &agent,
        &["get-public-key", "--key-id", &symmetric, "--output", "pem"],
        "UnsupportedOperationException",
        "GetPublicKey",
    );
}

/// An HMAC_256 key through kmsctl: generate-mac of a file and of a pipe give the same MAC
/// (HMAC is deterministic), verify-mac accepts it from base64 and from a file, and refuses a
/// tampered MAC or another message with KMSInvalidMacException and exit code 254.
#[test]
fn macs_through_the_cli() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let created = json(&agent, &["create-key", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC"]);
    assert_eq!(created["KeyMetadata"]["MacAlgorithms"], serde_json::json!(["HMAC_SHA_256"]));
    let key = key_id_of(&created);
    let message = dir.path().join("msg");
    std::fs::write(&message, b"\x00token payload\xff").unwrap();
    let message_arg = format!("fileb://{}", message.display());

    let generated =
        json(&agent, &["generate-mac", "--key-id", &key, "--message", &message_arg, "--mac-algorithm", "HMAC_SHA_256"]);
    assert_eq!(generated["MacAlgorithm"], "HMAC_SHA_256");
    let mac = kmsfs_tests::unb64(&generated["Mac"]);
    assert_eq!(mac.len(), 32);
    let piped = pipe(
        &agent,
        &["generate-mac", "--key-id", &key, "--mac-algorithm", "HMAC_SHA_256"],
        &std::fs::read(&message).unwrap(),
    );
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert_eq!(piped.stdout, mac, "the pipe form writes the raw MAC");
    let mac_file = dir.path().join("mac.bin");
    std::fs::write(&mac_file, &mac).unwrap();

    let verify_mac = ["verify-mac", "--key-id", &key, "--mac-algorithm", "HMAC_SHA_256"];
    let mac_file_arg = format!("fileb://{}", mac_file.display());
    for mac_arg in [generated["Mac"].as_str().unwrap(), &mac_file_arg] {
        let verified = json(&agent, &[&verify_mac[..], &["--message", &message_arg, "--mac", mac_arg]].concat());
        assert_eq!(verified["MacValid"], true, "{verified}");
        assert!(verified["KeyId"].as_str().unwrap().ends_with(&key), "{verified}");
    }

    let mut tampered = mac.clone();
    tampered[0] ^= 0x80;
    let tampered = kmsfs_tests::b64(&tampered);
    let stderr = service_error(
        &agent,
        &[&verify_mac[..], &["--message", &message_arg, "--mac", &tampered]].concat(),
        "KMSInvalidMacException",
        "VerifyMac",
    );
    assert!(stderr.contains("not valid"), "{stderr}");
    let another = kmsfs_tests::b64(b"another message");
    service_error(
        &agent,
        &[&verify_mac[..], &["--message", &another, "--mac", &mac_file_arg]].concat(),
        "KMSInvalidMacException",
        "VerifyMac",
    );
    service_error(
        &agent,
        &["generate-mac", "--key-id", &key, "--message", &message_arg, "--mac-algorithm", "HMAC_SHA_512"],
        "InvalidKeyUsageException",
        "GenerateMac",
    );
}

/// Runs openssl with `args`; it must succeed. Returns its stdout.
fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("this test checks keys with openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A KEY_AGREEMENT key through kmsctl: derive-shared-secret with an OpenSSL-made peer key
/// (DER from fileb://) gives the secret that `openssl pkeyutl -derive` computes from the
/// peer's private key and get-public-key's PEM; a peer key on another curve is refused.
/// Data key pairs: generate-data-key-pair's private key is PKCS#8 whose public half (as
/// openssl derives it) is the PublicKey returned, and its encrypted copy decrypts (with its
/// encryption context) to the same bytes through kmsctl decrypt; the WithoutPlaintext form
/// returns no private key plaintext, and its encrypted private key matches its public key.
#[test]
fn key_agreement_and_data_key_pairs_through_the_cli() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let created = json(&agent, &["create-key", "--key-spec", "ECC_NIST_P256", "--key-usage", "KEY_AGREEMENT"]);
    assert_eq!(created["KeyMetadata"]["KeyAgreementAlgorithms"], serde_json::json!(["ECDH"]));
    let key = key_id_of(&created);
    let out = run(agent.kmsctl(), &["get-public-key", "--key-id", &key, "--output", "pem"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(path("kms.pem"), &out.stdout).unwrap();

    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &path("peer.pem")]);
    openssl(&["pkey", "-in", &path("peer.pem"), "-pubout", "-outform", "DER", "-out", &path("peer.der")]);
    let peer_arg = format!("fileb://{}", path("peer.der"));
    let derive = ["derive-shared-secret", "--key-id", &key, "--key-agreement-algorithm", "ECDH"];
    let derived = json(&agent, &[&derive[..], &["--public-key", &peer_arg]].concat());
    assert_eq!(derived["KeyAgreementAlgorithm"], "ECDH");
    assert_eq!(derived["KeyOrigin"], "AWS_KMS");
    assert!(derived["KeyId"].as_str().unwrap().ends_with(&key), "{derived}");
    let theirs = openssl(&["pkeyutl", "-derive", "-inkey", &path("peer.pem"), "-peerkey", &path("kms.pem")]);
    assert_eq!(theirs.len(), 32);
    assert_eq!(kmsfs_tests::unb64(&derived["SharedSecret"]), theirs, "ECDH agrees with OpenSSL's");

    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", &path("p384.pem")]);
    openssl(&["pkey", "-in", &path("p384.pem"), "-pubout", "-outform", "DER", "-out", &path("p384.der")]);
    let stderr = service_error(
        &agent,
        &[&derive[..], &["--public-key", &format!("fileb://{}", path("p384.der"))]].concat(),
        "ValidationException",
        "DeriveSharedSecret",
    );
    assert!(stderr.contains("curve"), "{stderr}");
    let out = run(agent.kmsctl(), &derive);
    assert_eq!(out.status.code(), Some(252), "derive-shared-secret needs --public-key");

    let wrapping = key_id_of(&json(&agent, &["create-key"]));
    let pair = json(
        &agent,
        &[
            "generate-data-key-pair",
            "--key-id",
            &wrapping,
            "--key-pair-spec",
            "ECC_NIST_P256",
            "--encryption-context",
            "purpose=cli-test",
        ],
    );
    assert_eq!(pair["KeyPairSpec"], "ECC_NIST_P256");
    assert!(pair["KeyId"].as_str().unwrap().ends_with(&wrapping), "{pair}");
    let private = kmsfs_tests::unb64(&pair["PrivateKeyPlaintext"]);
    std::fs::write(path("pair.der"), &private).unwrap();
    let public = openssl(&["pkey", "-inform", "DER", "-in", &path("pair.der"), "-pubout", "-outform", "DER"]);
    assert_eq!(public, kmsfs_tests::unb64(&pair["PublicKey"]), "the private key is the public key's");
    let decrypted = json(
        &agent,
        &[
            "decrypt",
            "--ciphertext-blob",
            pair["PrivateKeyCiphertextBlob"].as_str().unwrap(),
            "--encryption-context",
            "purpose=cli-test",
        ],
    );
    assert_eq!(kmsfs_tests::unb64(&decrypted["Plaintext"]), private, "the encrypted private key is the same key");

    let pair = json(
        &agent,
        &["generate-data-key-pair-without-plaintext", "--key-id", &wrapping, "--key-pair-spec", "RSA_2048"],
    );
    assert_eq!(pair["KeyPairSpec"], "RSA_2048");
    assert!(pair.get("PrivateKeyPlaintext").is_none(), "{pair}");
    let decrypted = json(&agent, &["decrypt", "--ciphertext-blob", pair["PrivateKeyCiphertextBlob"].as_str().unwrap()]);
    std::fs::write(path("rsa.der"), kmsfs_tests::unb64(&decrypted["Plaintext"])).unwrap();
    let public = openssl(&["pkey", "-inform", "DER", "-in", &path("rsa.der"), "-pubout", "-outform", "DER"]);
    assert_eq!(public, kmsfs_tests::unb64(&pair["PublicKey"]));

    service_error(
        &agent,
        &["generate-data-key-pair", "--key-id", &wrapping, "--key-pair-spec", "RSA_1024"],
        "ValidationException",
        "GenerateDataKeyPair",
    );
    service_error(
        &agent,
        &["generate-data-key-pair", "--key-id", &key, "--key-pair-spec", "RSA_2048"],
        "InvalidKeyUsageException",
        "GenerateDataKeyPair",
    );
}

/// An RSA_2048 ENCRYPT_DECRYPT key through kmsctl: what `openssl pkeyutl` encrypts to
/// get-public-key's PEM (OAEP, SHA-256 and MGF1-SHA-256, as AWS's RSAES_OAEP_SHA_256) decrypts
/// in kmsctl's pipe form; kmsctl encrypt's RSAES_OAEP_SHA_1 ciphertext (one 256-byte block)
/// round-trips; decrypt without the key or the algorithm, or a plaintext over the OAEP
/// limit, gets AWS's exception.
#[test]
fn rsa_encryption_through_the_cli_interoperates_with_openssl() {
    let agent = TestAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let created = json(&agent, &["create-key", "--key-spec", "RSA_2048", "--key-usage", "ENCRYPT_DECRYPT"]);
    let key = key_id_of(&created);
    let out = run(agent.kmsctl(), &["get-public-key", "--key-id", &key, "--output", "pem"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(path("pub.pem"), &out.stdout).unwrap();
    let secret = b"\x00a 190-byte limit applies here\xff";
    std::fs::write(path("secret"), secret).unwrap();
    openssl(&[
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        &path("pub.pem"),
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
        "-in",
        &path("secret"),
        "-out",
        &path("secret.enc"),
    ]);
    let decrypt = ["decrypt", "--key-id", &key, "--encryption-algorithm", "RSAES_OAEP_SHA_256"];
    let out = pipe(&agent, &decrypt, &std::fs::read(path("secret.enc")).unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, secret, "kmsd decrypts what OpenSSL encrypted to its public key");

    let encrypt = ["encrypt", "--key-id", &key, "--encryption-algorithm", "RSAES_OAEP_SHA_1"];
    let out = pipe(&agent, &encrypt, secret);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), 256, "one RSA_2048 block");
    let out = pipe(&agent, &["decrypt", "--key-id", &key, "--encryption-algorithm", "RSAES_OAEP_SHA_1"], &out.stdout);
    assert_eq!(out.stdout, secret);

    let blob = kmsfs_tests::b64(&std::fs::read(path("secret.enc")).unwrap());
    service_error(&agent, &["decrypt", "--ciphertext-blob", &blob], "InvalidCiphertextException", "Decrypt");
    service_error(
        &agent,
        &["decrypt", "--key-id", &key, "--ciphertext-blob", &blob],
        "InvalidKeyUsageException",
        "Decrypt",
    );
    let too_long = kmsfs_tests::b64(&[7; 191]);
    service_error(
        &agent,
        &[&encrypt[..3], &["--encryption-algorithm", "RSAES_OAEP_SHA_256", "--plaintext", &too_long]].concat(),
        "ValidationException",
        "Encrypt",
    );
}

/// Without a socket given and no agent running, kmsctl starts a per-user agent (on the
/// embedded file backend) under the user's XDG directories, as gpg-agent does, and later
/// invocations reuse it. Runs as an unprivileged user so that the system socket is not
/// touched.
#[test]
fn starts_a_per_user_agent_on_demand() {
    assert!(
        kmsfs_tests::is_root(),
        "this test runs kmsctl as an unprivileged user and needs root; the README's test command runs as root"
    );
    let home = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let user_dir = home.path().join("user");
    std::fs::create_dir(&user_dir).unwrap();
    let chown = Command::new("chown").args(["65534:65534"]).arg(&user_dir).status().unwrap();
    assert!(chown.success());
    let runtime = user_dir.join("run");
    let data = user_dir.join("data");
    let as_user = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("kmsctl"))
            .args(args)
            .env_remove("KMSD_SOCKET")
            // A system agent left by the quickstart must not answer for this user.
            .env("KMSD_SYSTEM_SOCKET", home.path().join("no-system-agent.sock"))
            .env("HOME", &user_dir)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_DATA_HOME", &data)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    std::fs::create_dir(&runtime).unwrap();
    Command::new("chown").args(["65534:65534"]).arg(&runtime).status().unwrap();
    let out = as_user(&["create-key", "--description", "per-user"]);
    let socket = runtime.join("kmsd/kmsd.sock");
    let cleanup = || {
        let _ = Command::new("pkill").arg("-f").arg(socket.to_str().unwrap()).status();
    };
    if !out.status.success() {
        cleanup();
        panic!("autostart failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(socket.exists(), "the per-user agent listens under XDG_RUNTIME_DIR");
    assert!(data.join("kmsd/kmsd.db").exists(), "its state lives under XDG_DATA_HOME");
    let listed = as_user(&["list-keys"]);
    cleanup();
    let keys: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(keys["Keys"].as_array().unwrap().len(), 1, "the second call reuses the same agent");
}

/// The user PIN of the tokens behind the custom key stores below (AWS's KeyStorePassword is
/// 7 to 32 characters).
const STORE_PIN: &str = "kmsuser-pin-4711";

/// A SoftHSM2 of the test's own with a token (user PIN [`STORE_PIN`]) for each
/// `(cluster ID, label)` of `tokens`, declared under that ID in a new agent's
/// hsm-clusters.json, and the agent started with that SoftHSM2 configuration.
fn agent_with_tokens(tokens: &[(&str, &str)]) -> (TestAgent, SoftHsm) {
    let hsm = SoftHsm::new();
    let module = hsm.module().display().to_string();
    let mut clusters = serde_json::Map::new();
    for (cluster, label) in tokens {
        hsm.init_token(label, STORE_PIN);
        clusters.insert(cluster.to_string(), serde_json::json!({"module": module, "token_label": label}));
    }
    let mut agent = TestAgent::prepared(&[]);
    let declared = serde_json::json!({ "clusters": clusters }).to_string();
    std::fs::write(agent.config_dir().join("hsm-clusters.json"), declared).unwrap();
    let (key, conf) = hsm.env();
    agent.set_env(key, conf.to_str().unwrap());
    agent.start_again();
    (agent, hsm)
}

/// The one entry describe-custom-key-stores prints for store `id`.
fn store_entry(agent: &TestAgent, id: &str) -> Value {
    let described = json(agent, &["describe-custom-key-stores", "--custom-key-store-id", id]);
    assert_eq!(described["CustomKeyStores"].as_array().map(Vec::len), Some(1), "{described}");
    described["CustomKeyStores"][0].clone()
}

/// A 0600 file holding `password` and a newline, as an operator would write one.
fn password_file(dir: &std::path::Path, name: &str, password: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// Whether `needle` occurs anywhere in the agent's log or audit trail.
fn agent_recorded(agent: &TestAgent, needle: &str) -> bool {
    let audit: String = TestAgent::audit_lines_in(&agent.audit_dir()).iter().map(Value::to_string).collect();
    agent.log().contains(needle) || audit.contains(needle)
}

/// The key store commands' usage errors: the password is never taken from the command line
/// (the aws CLI's --key-store-password is refused with the ways that work, and without
/// printing the value), an unreadable or empty source stops the command before the agent
/// changes anything, and the service's own refusals come back as the aws CLI prints them.
#[test]
fn custom_key_store_commands_refuse_passwords_in_argv_and_bad_input() {
    let (agent, _hsm) = agent_with_tokens(&[("cluster-kmsctlstoreab", "usage")]);
    let dir = tempfile::tempdir().unwrap();
    let create = ["create-custom-key-store", "--custom-key-store-name", "s", "--cloud-hsm-cluster-id"];
    let create = [&create[..], &["cluster-kmsctlstoreab"]].concat();
    let with = |extra: &[&str]| run(agent.kmsctl(), &[&create[..], extra].concat());

    for argv in [&["--key-store-password", STORE_PIN][..], &[&format!("--key-store-password={STORE_PIN}")]] {
        let out = with(argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(252), "{argv:?}: {stderr}");
        assert!(stderr.contains("process list") && stderr.contains("--key-store-password-file"), "{stderr}");
        assert!(!stderr.contains(STORE_PIN), "the refusal does not repeat the password: {stderr}");
    }
    let help = run(agent.kmsctl(), &["create-custom-key-store", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--key-store-password-file <FILE>") && !help.contains("--key-store-password <"), "{help}");

    let missing = dir.path().join("no-such-password");
    let out = with(&["--key-store-password-file", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(252));
    assert!(String::from_utf8_lossy(&out.stderr).contains(missing.to_str().unwrap()));
    let empty = password_file(dir.path(), "empty", "");
    let out = with(&["--key-store-password-file", &empty]);
    assert_eq!(out.status.code(), Some(252));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = with(&[]);
    assert_eq!(out.status.code(), Some(252), "no file and nothing on stdin (not a terminal): nothing to send");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stdin is empty"));
    assert_eq!(
        json(&agent, &["describe-custom-key-stores"]),
        serde_json::json!({"CustomKeyStores": []}),
        "no refused command created a store"
    );

    let good = password_file(dir.path(), "pin", STORE_PIN);
    let undeclared = [&create[..4], &["cluster-notdeclaredzz", "--key-store-password-file", &good]].concat();
    let stderr = service_error(&agent, &undeclared, "CloudHsmClusterNotFoundException", "CreateCustomKeyStore");
    assert!(stderr.contains("hsm-clusters.json"), "{stderr}");
    let short = password_file(dir.path(), "short", "123");
    service_error(
        &agent,
        &[&create[..], &["--key-store-password-file", &short]].concat(),
        "ValidationException",
        "CreateCustomKeyStore",
    );
    let none = ["--custom-key-store-id", "cks-00000000000000000"];
    for (command, operation) in [
        ("connect-custom-key-store", "ConnectCustomKeyStore"),
        ("disconnect-custom-key-store", "DisconnectCustomKeyStore"),
        ("delete-custom-key-store", "DeleteCustomKeyStore"),
        ("describe-custom-key-stores", "DescribeCustomKeyStores"),
    ] {
        service_error(&agent, &[&[command][..], &none].concat(), "CustomKeyStoreNotFoundException", operation);
    }
    service_error(
        &agent,
        &["describe-custom-key-stores", "--custom-key-store-name", "nobody"],
        "CustomKeyStoreNotFoundException",
        "DescribeCustomKeyStores",
    );
    let out =
        run(agent.kmsctl(), &["update-custom-key-store", "--custom-key-store-id", "cks-1", "--key-store-password"]);
    assert_eq!(out.status.code(), Some(252));
    assert!(!agent_recorded(&agent, STORE_PIN), "the password is in neither kmsd's log nor its audit trail");
}

/// A custom key store's whole life through kmsctl on a real SoftHSM2 token, as an operator
/// runs it: the password piped on stdin or read from a file, connect, a key generated in the
/// token and used, the warning of a disconnect and its keys' state, a wrong password's
/// FAILED connection reported on stderr and corrected, pagination, the text output, and a
/// delete; the password appears in no output, log or audit record.
#[test]
fn custom_key_store_lifecycle_through_the_cli() {
    let (agent, _hsm) =
        agent_with_tokens(&[("cluster-kmsctlstoreab", "kmsctl-a"), ("cluster-kmsctlstorecd", "kmsctl-b")]);
    let dir = tempfile::tempdir().unwrap();
    let args = ["create-custom-key-store", "--custom-key-store-name", "vault", "--cloud-hsm-cluster-id"];
    let piped = pipe(&agent, &[&args[..], &["cluster-kmsctlstoreab"]].concat(), format!("{STORE_PIN}\n").as_bytes());
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    let created: Value = serde_json::from_slice(&piped.stdout).unwrap();
    let store = created["CustomKeyStoreId"].as_str().unwrap().to_string();
    assert!(store.starts_with("cks-") && created.as_object().unwrap().len() == 1, "{created}");

    let entry = store_entry(&agent, &store);
    assert_eq!(entry["CustomKeyStoreName"], "vault");
    assert_eq!(entry["CloudHsmClusterId"], "cluster-kmsctlstoreab");
    assert_eq!(entry["CustomKeyStoreType"], "AWS_CLOUDHSM");
    assert_eq!(entry["ConnectionState"], "DISCONNECTED");
    iso_date(&entry["CreationDate"]);
    assert!(entry.get("KeyStorePassword").is_none());

    let connect = ["connect-custom-key-store", "--custom-key-store-id", &store];
    let out = run(agent.kmsctl(), &connect);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "a store that connected needs no word: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(store_entry(&agent, &store)["ConnectionState"], "CONNECTED");

    let created = json(&agent, &["create-key", "--origin", "AWS_CLOUDHSM", "--custom-key-store-id", &store]);
    assert_eq!(created["KeyMetadata"]["Origin"], "AWS_CLOUDHSM");
    assert_eq!(created["KeyMetadata"]["CustomKeyStoreId"], store.as_str());
    assert_eq!(created["KeyMetadata"]["CloudHsmClusterId"], "cluster-kmsctlstoreab");
    let key = key_id_of(&created);
    let blob =
        json(&agent, &["encrypt", "--key-id", &key, "--plaintext", "aW4gdGhlIHRva2Vu"])["CiphertextBlob"].clone();
    let blob = blob.as_str().unwrap().to_string();
    assert_eq!(json(&agent, &["decrypt", "--ciphertext-blob", &blob])["Plaintext"], "aW4gdGhlIHRva2Vu");

    // Disconnecting warns that the keys stop at once, and they do.
    let out = run(agent.kmsctl(), &["disconnect-custom-key-store", "--custom-key-store-id", &store]);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "WARNING",
        store.as_str(),
        "unusable",
        &format!("kmsctl connect-custom-key-store --custom-key-store-id {store}"),
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in the warning: {stderr}");
    }
    assert_eq!(json(&agent, &["describe-key", "--key-id", &key])["KeyMetadata"]["KeyState"], "Unavailable");
    service_error(&agent, &["decrypt", "--ciphertext-blob", &blob], "KMSInvalidStateException", "Decrypt");

    // A wrong password: connect answers, the store is FAILED, and kmsctl says so and how to fix it.
    let wrong = password_file(dir.path(), "wrong", "not-the-pin-1");
    json(&agent, &["update-custom-key-store", "--custom-key-store-id", &store, "--key-store-password-file", &wrong]);
    let out = run(agent.kmsctl(), &connect);
    assert!(out.status.success(), "as with the aws CLI, the request itself succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not connect: it is FAILED (INVALID_CREDENTIALS)"), "{stderr}");
    assert!(stderr.contains("--key-store-password-file"), "{stderr}");
    let entry = store_entry(&agent, &store);
    assert_eq!(
        (&entry["ConnectionState"], &entry["ConnectionErrorCode"]),
        (&"FAILED".into(), &"INVALID_CREDENTIALS".into())
    );
    service_error(
        &agent,
        &["update-custom-key-store", "--custom-key-store-id", &store, "--key-store-password-file", &wrong],
        "CustomKeyStoreInvalidStateException",
        "UpdateCustomKeyStore",
    );
    json(&agent, &["disconnect-custom-key-store", "--custom-key-store-id", &store]);
    let right = password_file(dir.path(), "right", STORE_PIN);
    json(
        &agent,
        &[
            "update-custom-key-store",
            "--custom-key-store-id",
            &store,
            "--key-store-password-file",
            &right,
            "--new-custom-key-store-name",
            "vault-a",
        ],
    );
    json(&agent, &connect);
    assert_eq!(store_entry(&agent, &store)["ConnectionState"], "CONNECTED");
    assert_eq!(json(&agent, &["decrypt", "--ciphertext-blob", &blob])["Plaintext"], "aW4gdGhlIHRva2Vu");

    // A second store, from a password file; both listed, merged across pages or one page at a time.
    let from_file = [
        "create-custom-key-store",
        "--custom-key-store-name",
        "vault-b",
        "--cloud-hsm-cluster-id",
        "cluster-kmsctlstorecd",
        "--key-store-password-file",
        &right,
    ];
    let second = json(&agent, &from_file)["CustomKeyStoreId"].as_str().unwrap().to_string();
    let all = json(&agent, &["describe-custom-key-stores"]);
    let names: Vec<&str> =
        all["CustomKeyStores"].as_array().unwrap().iter().map(|s| s["CustomKeyStoreName"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{all}");
    assert!(names.contains(&"vault-a") && names.contains(&"vault-b"), "{names:?}");
    assert!(all.get("Truncated").is_none() && all.get("NextMarker").is_none());
    let first = json(&agent, &["describe-custom-key-stores", "--limit", "1"]);
    assert_eq!((first["CustomKeyStores"].as_array().unwrap().len(), &first["Truncated"]), (1, &Value::Bool(true)));
    let marker = first["NextMarker"].as_str().unwrap();
    let rest = json(&agent, &["describe-custom-key-stores", "--limit", "1", "--marker", marker]);
    assert_ne!(rest["CustomKeyStores"][0]["CustomKeyStoreId"], first["CustomKeyStores"][0]["CustomKeyStoreId"]);
    assert_eq!(
        json(&agent, &["describe-custom-key-stores", "--custom-key-store-name", "vault-b"])["CustomKeyStores"][0]
            ["CustomKeyStoreId"],
        second.as_str()
    );

    let out = run(agent.kmsctl(), &["--output", "text", "describe-custom-key-stores", "--custom-key-store-id", &store]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with("CUSTOMKEYSTORES\t")).unwrap_or_else(|| panic!("{text}"));
    for field in ["cluster-kmsctlstoreab", "CONNECTED", store.as_str(), "vault-a", "AWS_CLOUDHSM"] {
        assert!(row.split('\t').any(|f| f == field), "{field} not a column of {row:?}");
    }

    // Deleting: refused while connected or holding keys, done for an empty disconnected store.
    let delete_store = ["delete-custom-key-store", "--custom-key-store-id", &store];
    service_error(&agent, &delete_store, "CustomKeyStoreInvalidStateException", "DeleteCustomKeyStore");
    json(&agent, &["disconnect-custom-key-store", "--custom-key-store-id", &store]);
    service_error(&agent, &delete_store, "CustomKeyStoreHasCMKsException", "DeleteCustomKeyStore");
    assert_eq!(json(&agent, &["delete-custom-key-store", "--custom-key-store-id", &second]), Value::Null);
    service_error(
        &agent,
        &["describe-custom-key-stores", "--custom-key-store-id", &second],
        "CustomKeyStoreNotFoundException",
        "DescribeCustomKeyStores",
    );
    assert!(!agent_recorded(&agent, STORE_PIN), "the password is in neither kmsd's log nor its audit trail");
}

/// On a terminal, create-custom-key-store asks for the password and does not echo it:
/// `script` gives kmsctl a pseudo-terminal, and the password is typed once the prompt shows.
#[test]
fn the_password_prompt_does_not_echo() {
    let (agent, _hsm) = agent_with_tokens(&[("cluster-kmsctlstoreab", "prompted")]);
    let command = format!(
        "'{}' create-custom-key-store --custom-key-store-name prompted --cloud-hsm-cluster-id cluster-kmsctlstoreab",
        bin("kmsctl").display()
    );
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env("KMSD_SOCKET", agent.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) gives kmsctl a terminal");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("password") {
        let n = std::io::Read::read(&mut stdout, &mut byte).unwrap();
        assert!(n == 1, "kmsctl ended without a prompt: {}", String::from_utf8_lossy(&seen));
        seen.push(byte[0]);
    }
    // Echo is off before the prompt is printed; the terminal keeps what is typed until read.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{STORE_PIN}\r").as_bytes()).unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut stdout, &mut rest).unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    seen.extend(rest);
    let shown = String::from_utf8_lossy(&seen);
    assert!(status.success(), "{shown}");
    assert!(shown.contains("Key store password"), "{shown}");
    assert!(!shown.contains(STORE_PIN), "the terminal showed the password: {shown}");
    let id = shown.split('"').find(|s| s.starts_with("cks-")).unwrap_or_else(|| panic!("no store ID in {shown}"));
    json(&agent, &["connect-custom-key-store", "--custom-key-store-id", id]);
    assert_eq!(store_entry(&agent, id)["ConnectionState"], "CONNECTED", "the typed password was the token's PIN");
}
