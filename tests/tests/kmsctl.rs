//! End-to-end tests of `kmsctl` against a real agent: the `aws kms`-shaped subcommands and
//! their JSON and text output, the pipe forms, the aws CLI's error messages and exit codes,
//! and starting a per-user agent on demand when none is running.

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
