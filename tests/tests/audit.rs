//! End-to-end tests of the audit trail against a real kmsd: one record per request with the
//! right eventName and outcome, for every action and every kind of failure; no secret in
//! the trail or the agent's log; the identity and kmsfs IDs recorded; fail-closed on a full
//! disk; and `kmsctl audit` verify (with a tamper matrix), query and public-key.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kmsfs_common::client::KeyEventStream;
use kmsfs_common::ErrorKind;
use kmsfs_tests::{b64, is_root, unb64, Rng, TestAgent};
use serde_json::{json, Value};

/// Every action of the API the agent serves.
const ACTIONS: [&str; 29] = [
    "CreateKey",
    "DescribeKey",
    "ListKeys",
    "EnableKey",
    "DisableKey",
    "UpdateKeyDescription",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ListAliases",
    "TagResource",
    "UntagResource",
    "ListResourceTags",
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateRandom",
    "PutKeyPolicy",
    "GetKeyPolicy",
    "ListKeyPolicies",
    "CreateGrant",
    "ListGrants",
    "ListRetirableGrants",
    "RetireGrant",
    "RevokeGrant",
];

/// Calls `action` and checks that exactly one record was added for it, with `error` as its
/// errorCode (or none); returns the response (or `null`) and the record.
fn audited(agent: &TestAgent, action: &str, request: Value, error: Option<&str>) -> (Value, Value) {
    let before = agent.audit_events().len();
    let result = agent.call(action, request);
    match (&result, error) {
        (Ok(_), None) => {}
        (Err(e), Some(code)) => assert_eq!(e.kind.as_str(), code, "{action}: {e}"),
        (other, _) => panic!("{action}: expected {error:?}, got {other:?}"),
    }
    (result.unwrap_or(Value::Null), one_new_record(agent, before, action, error))
}

fn one_new_record(agent: &TestAgent, before: usize, action: &str, error: Option<&str>) -> Value {
    let events = agent.audit_events();
    assert_eq!(events.len(), before + 1, "{action}: exactly one record, got {:#?}", &events[before..]);
    let record = events[before].clone();
    assert_eq!(record["eventName"], action, "{record}");
    assert_eq!(record["errorCode"].as_str(), error, "{record}");
    assert_eq!(record["eventVersion"], "1.08");
    assert!(record["requestID"].as_str().is_some_and(|id| id.len() == 36), "{record}");
    assert!(record["eventID"].as_str().is_some_and(|id| id.len() == 36), "{record}");
    record
}

#[test]
fn every_action_and_every_failure_is_recorded_once() {
    let agent = TestAgent::start();
    let (created, record) = audited(&agent, "CreateKey", json!({"Description": "audited"}), None);
    let key = created["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let arn = created["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    let account = created["KeyMetadata"]["AWSAccountId"].as_str().unwrap().to_string();
    assert_eq!(record["readOnly"], false);
    assert_eq!(record["resources"][0]["ARN"], arn.as_str());
    assert_eq!(record["responseElements"]["keyMetadata"]["KeyId"], key.as_str());
    let key2 = audited(&agent, "CreateKey", json!({}), None).0["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let root = format!("arn:aws:iam::{account}:user/root");

    let (_, record) = audited(&agent, "DescribeKey", json!({"KeyId": key}), None);
    assert_eq!((record["readOnly"].clone(), record["responseElements"].clone()), (json!(true), Value::Null));
    audited(&agent, "ListKeys", json!({}), None);
    audited(&agent, "UpdateKeyDescription", json!({"KeyId": key, "Description": "renamed"}), None);
    audited(&agent, "DisableKey", json!({"KeyId": key}), None);
    audited(&agent, "EnableKey", json!({"KeyId": key}), None);
    let (_, record) = audited(&agent, "CreateAlias", json!({"AliasName": "alias/audit", "TargetKeyId": key}), None);
    assert_eq!(record["requestParameters"], json!({"aliasName": "alias/audit", "targetKeyId": key}));
    audited(&agent, "UpdateAlias", json!({"AliasName": "alias/audit", "TargetKeyId": key2}), None);
    audited(&agent, "ListAliases", json!({}), None);
    audited(&agent, "TagResource", json!({"KeyId": key, "Tags": [{"TagKey": "env", "TagValue": "dev"}]}), None);
    audited(&agent, "UntagResource", json!({"KeyId": key, "TagKeys": ["env"]}), None);
    audited(&agent, "ListResourceTags", json!({"KeyId": key}), None);

    // Through the alias: the record names the key it resolved to.
    let (sealed, record) =
        audited(&agent, "Encrypt", json!({"KeyId": "alias/audit", "Plaintext": b64(b"audited secret")}), None);
    assert_eq!(record["resources"][0]["ARN"], format!("arn:aws:kms:local:{account}:key/{key2}").as_str());
    assert_eq!(record["requestParameters"], json!({"keyId": "alias/audit"}));
    let (_, record) = audited(&agent, "Decrypt", json!({"CiphertextBlob": sealed["CiphertextBlob"]}), None);
    assert_eq!(record["resources"][0]["ARN"], format!("arn:aws:kms:local:{account}:key/{key2}").as_str());
    assert_eq!(record["requestParameters"], json!({}), "the blob appears only as its key");
    audited(&agent, "ReEncrypt", json!({"CiphertextBlob": sealed["CiphertextBlob"], "DestinationKeyId": key}), None);
    audited(&agent, "GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}), None);
    audited(&agent, "GenerateDataKeyWithoutPlaintext", json!({"KeyId": key, "KeySpec": "AES_256"}), None);
    audited(&agent, "GenerateRandom", json!({"NumberOfBytes": 16}), None);
    audited(&agent, "DeleteAlias", json!({"AliasName": "alias/audit"}), None);

    let (policy, _) = audited(&agent, "GetKeyPolicy", json!({"KeyId": key, "PolicyName": "default"}), None);
    audited(&agent, "ListKeyPolicies", json!({"KeyId": key}), None);
    audited(&agent, "PutKeyPolicy", json!({"KeyId": key, "PolicyName": "default", "Policy": policy["Policy"]}), None);
    let grant = json!({"KeyId": key, "GranteePrincipal": root, "RetiringPrincipal": root, "Operations": ["Decrypt"]});
    let (granted, record) = audited(&agent, "CreateGrant", grant.clone(), None);
    assert!(record["responseElements"]["grantId"].is_string(), "{record}");
    assert!(record["responseElements"].get("grantToken").is_none(), "{record}");
    audited(&agent, "ListGrants", json!({"KeyId": key}), None);
    audited(&agent, "ListRetirableGrants", json!({"RetiringPrincipal": root}), None);
    let (_, record) = audited(&agent, "RetireGrant", json!({"GrantToken": granted["GrantToken"]}), None);
    assert!(record["requestParameters"].get("grantToken").is_none(), "{record}");
    let revocable = audited(&agent, "CreateGrant", grant, None).0;
    audited(&agent, "RevokeGrant", json!({"KeyId": key, "GrantId": revocable["GrantId"]}), None);
    audited(&agent, "ScheduleKeyDeletion", json!({"KeyId": key2, "PendingWindowInDays": 7}), None);
    audited(&agent, "CancelKeyDeletion", json!({"KeyId": key2}), None);

    // Failures of every kind, each one record with its errorCode.
    audited(&agent, "Encrypt", json!({"Plaintext": b64(b"x")}), Some("ValidationException"));
    let missing = "11111111-2222-3333-4444-555555555555";
    let (_, record) = audited(&agent, "DescribeKey", json!({"KeyId": missing}), Some("NotFoundException"));
    assert!(record["errorMessage"].as_str().unwrap().contains(missing), "{record}");
    audited(&agent, "Encrypt", json!({"KeyId": key2, "Plaintext": b64(b"x")}), Some("DisabledException"));
    audited(&agent, "Frobnicate", json!({}), Some("UnknownOperationException"));
    let before = agent.audit_events().len();
    let raw = agent.client().call_raw("Decrypt", b"{not json").unwrap();
    assert_eq!(raw.status, 400);
    let record = one_new_record(&agent, before, "Decrypt", Some("SerializationException"));
    assert_eq!(record["requestParameters"], Value::Null);
    let before = agent.audit_events().len();
    // Refused from its Content-Length alone, on one connection that sends no body.
    let mut stream = std::os::unix::net::UnixStream::connect(agent.socket()).unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: kmsd\r\nX-Amz-Target: TrentService.Encrypt\r\nContent-Length: {}\r\n\r\n",
        600 * 1024
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    one_new_record(&agent, before, "Encrypt", Some("ValidationException"));

    // kmsd's extensions are requests too.
    audited(&agent, "Kmsfs.GetAgentStats", json!({}), None);
    let (info, _) = audited(&agent, "Kmsfs.GetAuditInfo", json!({}), None);
    assert_eq!(info["Directory"], std::fs::canonicalize(agent.audit_dir()).unwrap().to_str().unwrap());
    let before = agent.audit_events().len();
    let mut stream = KeyEventStream::subscribe(&agent.socket(), Some(Duration::from_secs(5))).unwrap();
    assert_eq!(stream.next_event().unwrap().unwrap()["Event"], "Subscribed");
    one_new_record(&agent, before, "Kmsfs.WatchKeyEvents", None);

    // Denied: root without its identity policy may no longer use keys.
    agent.set_policy("users/root.json", None);
    let (_, record) =
        audited(&agent, "Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")}), Some("AccessDeniedException"));
    assert_eq!(record["userIdentity"]["arn"], root.as_str());

    let recorded: BTreeSet<String> =
        agent.audit_events().iter().map(|r| r["eventName"].as_str().unwrap().to_string()).collect();
    for action in ACTIONS {
        assert!(recorded.contains(action), "{action} was never exercised");
    }
}

#[test]
fn records_name_the_caller_and_kmsfs_volume_and_file() {
    let agent = TestAgent::start();
    let key = kmsfs_tests::create_key(&agent);
    let context = json!({"kmsfs:volume": "ab".repeat(16), "kmsfs:file": "cd".repeat(16)});
    let (_, record) = audited(
        &agent,
        "GenerateDataKey",
        json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContext": context}),
        None,
    );
    assert_eq!(record["requestParameters"]["encryptionContext"], context);
    assert_eq!(record["additionalEventData"], json!({"kmsfsVolume": "ab".repeat(16), "kmsfsFile": "cd".repeat(16)}));
    assert_eq!(record["responseElements"], Value::Null);
    let who = &record["userIdentity"];
    assert_eq!(who["uid"], own_uid());
    assert_eq!(who["pid"], std::process::id());
    assert!(who["gid"].is_u64(), "{who}");
    let exe = std::env::current_exe().unwrap();
    assert_eq!(who["executable"], exe.to_str().unwrap());
    assert_eq!(record["sourceIPAddress"], "unix");
    assert_eq!(record["eventSource"], "kms.amazonaws.com");
    assert!(record["eventTime"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn a_batch_is_one_record_naming_every_file() {
    let agent = TestAgent::start();
    let key = kmsfs_tests::create_key(&agent);
    let contexts: Vec<Value> =
        (0..3).map(|i| json!({"kmsfs:volume": "ab".repeat(16), "kmsfs:file": format!("{i:032x}")})).collect();
    let (reply, record) = audited(
        &agent,
        "Kmsfs.GenerateDataKeys",
        json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": contexts}),
        None,
    );
    assert_eq!(reply["DataKeys"].as_array().unwrap().len(), 3);
    assert_eq!(record["eventSource"], "kmsd");
    assert_eq!(record["requestParameters"]["encryptionContexts"], json!(contexts));
    let files: Vec<String> = (0..3).map(|i| format!("{i:032x}")).collect();
    assert_eq!(record["additionalEventData"], json!({"kmsfsVolume": "ab".repeat(16), "kmsfsFiles": files}));
    assert_eq!(record["responseElements"], Value::Null, "no data key, wrapped or not, is recorded");
    assert!(record["resources"][0]["ARN"].as_str().unwrap().ends_with(&key));
}

/// The test's own uid, from /proc.
fn own_uid() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Every form a secret could leak in: raw, hex, and base64 at each alignment (a secret inside
/// a longer base64 string shows only its middle).
fn leak_forms(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    use base64::Engine;
    let mut forms = vec![("raw".to_string(), secret.to_vec())];
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    forms.push(("hex".into(), hex.clone().into_bytes()));
    forms.push(("HEX".into(), hex.to_uppercase().into_bytes()));
    for engine in [base64::engine::general_purpose::STANDARD, base64::engine::general_purpose::URL_SAFE] {
        for offset in 0..3 {
            let encoded = engine.encode(&secret[offset..]);
            // Drop the characters that depend on neighbouring bytes.
            let core = &encoded[4..encoded.len() - 4];
            forms.push((format!("base64@{offset}"), core.as_bytes().to_vec()));
        }
    }
    forms
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_secret_reaches_the_trail_or_the_log() {
    let agent = TestAgent::start();
    let key = kmsfs_tests::create_key(&agent);
    let other = kmsfs_tests::create_key(&agent);
    agent.ok("DisableKey", json!({"KeyId": other}));
    let mut rng = Rng(0xa0d17);
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..4 {
        let plaintext = rng.bytes(32);
        let context = json!({"kmsfs:volume": "ab".repeat(16), "kmsfs:file": format!("{i:032x}")});
        let sealed =
            agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(&plaintext), "EncryptionContext": context}));
        let blob = unb64(&sealed["CiphertextBlob"]);
        let opened = agent.ok("Decrypt", json!({"CiphertextBlob": b64(&blob), "EncryptionContext": context}));
        assert_eq!(unb64(&opened["Plaintext"]), plaintext);
        agent.ok(
            "ReEncrypt",
            json!({"CiphertextBlob": b64(&blob), "SourceEncryptionContext": context, "DestinationKeyId": key}),
        );
        // A failing request carries its plaintext too.
        agent.call("Encrypt", json!({"KeyId": other, "Plaintext": b64(&plaintext)})).unwrap_err();
        let data_key =
            agent.ok("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContext": context}));
        let random = agent.ok("GenerateRandom", json!({"NumberOfBytes": 32}));
        let batch = agent.ok(
            "Kmsfs.GenerateDataKeys",
            json!({"KeyId": key, "KeySpec": "AES_256", "EncryptionContexts": [context, context]}),
        );
        for (j, generated) in batch["DataKeys"].as_array().unwrap().iter().enumerate() {
            secrets.push((format!("batch data key {i}.{j}"), unb64(&generated["Plaintext"])));
            secrets.push((format!("batch wrapped data key {i}.{j}"), unb64(&generated["CiphertextBlob"])));
        }
        secrets.push((format!("plaintext {i}"), plaintext));
        secrets.push((format!("ciphertext blob {i}"), blob));
        secrets.push((format!("data key {i}"), unb64(&data_key["Plaintext"])));
        secrets.push((format!("wrapped data key {i}"), unb64(&data_key["CiphertextBlob"])));
        secrets.push((format!("random {i}"), unb64(&random["Plaintext"])));
    }
    let grant = agent.ok(
        "CreateGrant",
        json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::111122223333:user/x", "Operations": ["Decrypt"]}),
    );
    secrets.push(("grant token".into(), grant["GrantToken"].as_str().unwrap().as_bytes().to_vec()));
    let root_key = std::fs::read(agent.state_dir().join("root.key")).unwrap();
    secrets.push(("root key".into(), root_key));

    let mut haystacks: Vec<(String, Vec<u8>)> = std::fs::read_dir(agent.audit_dir())
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (path.display().to_string(), std::fs::read(&path).unwrap())
        })
        .collect();
    haystacks.push(("kmsd log".into(), std::fs::read(agent.log_path()).unwrap()));
    let trail: Vec<u8> = haystacks[..haystacks.len() - 1].iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(contains(&trail, b"\"eventName\":\"GenerateDataKey\""), "the scan must look at real records");
    assert!(contains(&trail, b"kmsfsFile"));
    for (what, secret) in &secrets {
        for (form, needle) in leak_forms(secret) {
            for (place, bytes) in &haystacks {
                assert!(!contains(bytes, &needle), "{what} appears ({form}) in {place}");
            }
        }
    }
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("kmsfs-audit-fs-").tempdir().unwrap();
        let path = dir.path().join("audit");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the filesystem of `dir` with one file, until it is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    path
}

#[test]
fn a_full_audit_disk_refuses_requests_and_executes_nothing() {
    assert!(is_root(), "mounting a small filesystem for the audit trail needs root (CI runs as root)");
    let tmpfs = Tmpfs::mount("4m");
    let dir = tmpfs.path.to_str().unwrap().to_string();
    let agent = TestAgent::start_with(&["--audit-dir", &dir]);
    let key = kmsfs_tests::create_key(&agent);
    agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"before")}));
    let filler = fill(&tmpfs.path);

    // Records go on into space already allocated (up to 256 KiB ahead of the 1 MiB kept in
    // reserve); once that is used up, Encrypt fails without returning a ciphertext.
    let mut refused = None;
    for attempt in 0..4000 {
        match agent.call("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"during")})) {
            Ok(v) => assert!(v["CiphertextBlob"].is_string(), "attempt {attempt}"),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("Encrypt kept succeeding on a full audit disk");
    assert_eq!(e.kind, ErrorKind::KMSInternalException, "{e}");
    assert!(e.message.contains("audit"), "{e}");
    // From now on every request is refused before it is executed — also after the writer's
    // retries (every 500 ms) have found the disk still full.
    std::thread::sleep(Duration::from_millis(1200));
    for (action, request) in [
        ("CreateKey", json!({"Description": "must not exist"})),
        ("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"x")})),
        ("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"})),
        ("DisableKey", json!({"KeyId": key})),
    ] {
        let e = agent.call(action, request).unwrap_err();
        assert_eq!(e.kind, ErrorKind::KMSInternalException, "{action}: {e}");
    }
    assert!(agent.log().contains("the audit log cannot be written"), "{}", agent.log());

    // Space again: the agent recovers by itself, and nothing refused had happened.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let keys = loop {
        match agent.call("ListKeys", json!({})) {
            Ok(keys) => break keys,
            Err(e) => assert!(Instant::now() < deadline, "the agent did not recover: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(keys["Keys"].as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["KeyState"], "Enabled");
    let events = TestAgent::audit_lines_in(&tmpfs.path);
    assert!(events
        .iter()
        .all(|r| r["eventName"] != "CreateKey" || r["requestParameters"]["description"] != "must not exist"));
    assert_eq!(events.iter().filter(|r| r["eventName"] == "DisableKey").count(), 0);
}

fn run(mut cmd: Command, args: &[&str]) -> Output {
    cmd.args(args).stdin(Stdio::null()).output().expect("run kmsctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An agent with a few dozen records over two keys, some denied and some failed, and a
/// digest in the middle; returns it with its two key IDs.
fn busy_agent() -> (TestAgent, String, String) {
    let agent = TestAgent::start();
    let one = kmsfs_tests::create_key(&agent);
    let two = kmsfs_tests::create_key(&agent);
    for i in 0..6 {
        let key = if i % 2 == 0 { &one } else { &two };
        let sealed = agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(format!("secret {i}").as_bytes())}));
        agent.ok("Decrypt", json!({"CiphertextBlob": sealed["CiphertextBlob"]}));
        if i == 2 {
            agent.ok("Kmsfs.GetAuditInfo", json!({"Seal": true}));
        }
    }
    agent.call("DescribeKey", json!({"KeyId": "alias/missing"})).unwrap_err();
    agent.set_policy("users/root.json", None);
    agent.call("Encrypt", json!({"KeyId": one, "Plaintext": b64(b"denied")})).unwrap_err();
    agent.set_policy("users/root.json", Some(kmsfs_tests::ROOT_USES_EVERYTHING));
    (agent, one, two)
}

#[test]
fn verify_proves_a_live_log_and_public_key_exports_the_key() {
    let (mut agent, _, _) = busy_agent();
    // The live log: kmsctl has the agent seal it first, so it verifies to this moment.
    let out = run(agent.kmsctl(), &["audit", "verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("verified: 1 file(s)") && stdout(&out).contains("from the log's first line"),
        "{}",
        stdout(&out)
    );
    let key = run(agent.kmsctl(), &["audit", "public-key"]);
    assert!(key.status.success(), "{}", stderr(&key));
    let key = stdout(&key).trim().to_string();
    assert_eq!(key.len(), 44, "{key}");
    assert!(agent.log().contains(&key), "kmsd logs its public key at start");

    // Restarts continue the chain; a SIGKILL's unsealed tail is sealed at the next start.
    agent.ok("ListKeys", json!({}));
    agent.kill();
    agent.start_again();
    agent.ok("ListKeys", json!({}));
    agent.restart();
    let out = run(agent.kmsctl(), &["audit", "verify", "--public-key", &key]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A key that is not the agent's: the first digest names the mismatch.
    let other =
        kmsfs_common::audit::encode_public_key(&ed25519_dalek::SigningKey::from_bytes(&[5; 32]).verifying_key());
    let out = run(agent.kmsctl(), &["audit", "verify", "--public-key", &other]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));
}

/// The one audit file of `dir`: its name and lines.
fn the_log(dir: &Path) -> (String, Vec<String>) {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let name = names.pop().expect("an audit file");
    assert!(names.is_empty(), "the test expects one day's file: {names:?} and {name}");
    let text = std::fs::read_to_string(dir.join(&name)).unwrap();
    (name, text.lines().map(str::to_string).collect())
}

#[test]
fn verify_names_the_first_tampered_line() {
    let (mut agent, _, _) = busy_agent();
    let key = stdout(&run(agent.kmsctl(), &["audit", "public-key"])).trim().to_string();
    assert_eq!(agent.stop(), Some(0));
    let (name, lines) = the_log(&agent.audit_dir());
    let digests: Vec<usize> = (0..lines.len()).filter(|&i| lines[i].contains("\"eventType\":\"Digest\"")).collect();
    assert!(digests.len() >= 2 && *digests.last().unwrap() == lines.len() - 1, "{digests:?} of {}", lines.len());
    let encrypt = lines.iter().position(|l| l.contains("\"eventName\":\"Encrypt\"")).unwrap();

    // Each case: what is done to the lines, the line (1-based) and the words verify must name.
    type Tamper = Box<dyn Fn(&mut Vec<String>)>;
    let resigned = resign(&lines, &ed25519_dalek::SigningKey::from_bytes(&[6; 32]));
    let first_digest = digests[0];
    let cases: Vec<(&str, Tamper, usize, &str)> = vec![
        ("untouched", Box::new(|_| {}), 0, ""),
        (
            "edit a field",
            Box::new(move |l| l[encrypt] = l[encrypt].replace("\"Encrypt\"", "\"Decrypt\"")),
            encrypt + 1,
            "modified",
        ),
        ("delete a line", Box::new(|l| drop(l.remove(4))), 5, "deleted"),
        (
            "insert a line",
            Box::new(|l| {
                let copy = l[1].clone();
                l.insert(6, copy)
            }),
            7,
            "inserted",
        ),
        ("swap two lines", Box::new(|l| l.swap(3, 4)), 4, "reordered"),
        ("truncate the tail", Box::new(|l| l.truncate(l.len() - 2)), lines.len() - 2, "truncated"),
        (
            "replace a digest",
            Box::new(move |l| {
                let last = l[l.len() - 1].clone();
                let first = first_digest;
                l[first] = forge(&l[first], &last)
            }),
            first_digest + 1,
            "bad digest",
        ),
        ("re-sign with another key", Box::new(move |l| *l = resigned.clone()), first_digest + 1, "wrong key"),
    ];
    for (what, tamper, line, problem) in cases {
        let copy = tempfile::tempdir().unwrap();
        let mut edited = lines.clone();
        tamper(&mut edited);
        std::fs::write(copy.path().join(&name), edited.join("\n") + "\n").unwrap();
        let dir = copy.path().to_str().unwrap();
        // Offline: only the files and the public key (the agent is stopped).
        let out =
            run(Command::new(kmsfs_tests::bin("kmsctl")), &["audit", "verify", "--dir", dir, "--public-key", &key]);
        if line == 0 {
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{what}: {}{}", stdout(&out), stderr(&out));
        let place = format!("{name}:{line}: {problem}");
        assert!(stderr(&out).contains(&place), "{what}: expected {place:?} in {}", stderr(&out));
    }
}

/// The digest line `digest` with the signature of `other` put in: a forged digest.
fn forge(digest: &str, other: &str) -> String {
    let mut d: Value = serde_json::from_str(digest).unwrap();
    let o: Value = serde_json::from_str(other).unwrap();
    d["signature"] = o["signature"].clone();
    serde_json::to_string(&d).unwrap()
}

/// The same events rechained and every digest re-signed with `key`: what someone who
/// rewrote the log with their own key would produce.
fn resign(lines: &[String], key: &ed25519_dalek::SigningKey) -> Vec<String> {
    let mut chain = kmsfs_common::audit::Chain::genesis();
    lines
        .iter()
        .map(|line| {
            let mut record: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            let out = if record["eventType"] == "Digest" {
                chain.append_digest(key, 0).unwrap()
            } else {
                record.insert("eventName".into(), "Rewritten".into());
                chain.append_event(&mut record, 0)
            };
            String::from_utf8(out).unwrap()
        })
        .collect()
}

#[test]
fn query_filters_by_key_principal_action_outcome_and_time() {
    let (agent, one, two) = busy_agent();
    let query = |args: &[&str]| -> Vec<Value> {
        let out = run(agent.kmsctl(), &[&["audit", "query"], args].concat());
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let encrypts = query(&["--action", "Encrypt"]);
    assert_eq!(encrypts.len(), 7, "6 allowed and 1 denied");
    assert!(encrypts.iter().all(|r| r["eventName"] == "Encrypt"));
    let denied = query(&["--outcome", "denied"]);
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["errorCode"], "AccessDeniedException");
    let failed = query(&["--outcome", "failure"]);
    assert_eq!(failed.len(), 2, "the denial and the missing alias");
    // Key one: its CreateKey, three Encrypts and Decrypts, the denied Encrypt.
    let by_key = query(&["--key-id", &one]);
    assert_eq!(by_key.len(), 8, "{by_key:#?}");
    assert_eq!(query(&["--key-id", &two, "--action", "decrypt", "--outcome", "success"]).len(), 3);
    let principal = encrypts[0]["userIdentity"]["arn"].as_str().unwrap().to_string();
    assert_eq!(query(&["--principal", &principal]).len(), agent.audit_events().len());
    assert!(query(&["--principal", "arn:aws:iam::111122223333:user/nobody"]).is_empty());
    let first = encrypts[0]["eventTime"].as_str().unwrap();
    let last = encrypts[6]["eventTime"].as_str().unwrap();
    assert_eq!(query(&["--action", "Encrypt", "--from", first, "--to", last]).len(), 7);
    assert_eq!(query(&["--action", "Encrypt", "--from", "2999-01-01"]).len(), 0);
    assert_eq!(query(&["--action", "Encrypt", "--to", "2000-01-01"]).len(), 0);
    let today = &first[..10];
    assert_eq!(query(&["--action", "Encrypt", "--from", today, "--to", today]).len(), 7);

    let out = run(agent.kmsctl(), &["audit", "query", "--outcome", "denied", "--format", "table"]);
    let table = stdout(&out);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].starts_with("TIME") && rows[0].contains("PRINCIPAL"), "{table}");
    assert!(
        rows[1].contains("Encrypt") && rows[1].contains("AccessDeniedException") && rows[1].contains(&one),
        "{table}"
    );
    let out = run(agent.kmsctl(), &["audit", "query", "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(252), "{}", stderr(&out));
}

#[test]
fn records_are_mirrored_to_the_journal_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("journal.sock");
    let journal = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    journal.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let agent = TestAgent::start_with(&["--audit-journald", "on", "--journal-socket", socket_path.to_str().unwrap()]);
    let key = kmsfs_tests::create_key(&agent);
    agent.call("Decrypt", json!({"CiphertextBlob": b64(&[1u8; 64])})).unwrap_err();
    let mut buf = vec![0u8; 1 << 20];
    let mut entries = Vec::new();
    while entries.len() < 2 {
        let n = journal.recv(&mut buf).expect("a journal entry");
        entries.push(String::from_utf8(buf[..n].to_vec()).unwrap());
    }
    let field = |entry: &str, name: &str| {
        entry.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).map(str::to_string).unwrap_or_default()
    };
    assert_eq!(field(&entries[0], "KMSD_AUDIT_EVENT_NAME"), "CreateKey");
    assert!(field(&entries[0], "KMSD_AUDIT_KEY_ARN").ends_with(&key), "{}", entries[0]);
    assert_eq!(field(&entries[0], "SYSLOG_IDENTIFIER"), "kmsd-audit");
    assert_eq!(field(&entries[1], "KMSD_AUDIT_OUTCOME"), "InvalidCiphertextException");
    // The journal holds each line's hash: an anchor outside the audit files.
    let (_, lines) = the_log(&agent.audit_dir());
    for (entry, line) in entries.iter().zip(&lines) {
        assert_eq!(field(entry, "KMSD_AUDIT_HASH"), kmsfs_common::audit::line_hash(line.as_bytes()));
        assert_eq!(field(entry, "KMSD_AUDIT_RECORD"), *line);
    }
    // Asked for a journal that is not there, kmsd refuses to start.
    let out = Command::new(kmsfs_tests::bin("kmsd"))
        .args([
            "--socket",
            dir.path().join("s").to_str().unwrap(),
            "--state-dir",
            dir.path().join("st").to_str().unwrap(),
        ])
        .args(["--audit-journald", "on", "--journal-socket", dir.path().join("none").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the journal"), "{}", stderr(&out));
}
