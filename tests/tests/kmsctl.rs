//! End-to-end tests of `kmsctl` against a real agent: the `aws kms`-shaped subcommands and
//! their JSON and text output, the pipe forms, the aws CLI's error messages and exit codes,
//! key rotation, imported key material (wrapped with `openssl pkeyutl`, as AWS's
//! documentation shows), last usage, the warning that comes with a scheduled deletion, and
//! starting a per-user agent on demand when none is running.

use std::io::Write;
use std::process::{Command, Output, Stdio};

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
