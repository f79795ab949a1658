//! Key lifecycle against a real kmsd: rotation on demand and automatic (made due with
//! `--clock-offset`, performed at start when missed), deletion that destroys the material
//! when the window ends (checked by scanning the state directory's files), and SIGKILL
//! during destruction.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kmsfs_common::ErrorKind;
use kmsfs_tests::{b64, create_key, unb64, TestAgent, TestMount};
use serde_json::{json, Value};

const DAY_MS: f64 = 86_400_000.0;

fn encrypt(agent: &TestAgent, key: &str, plaintext: &[u8]) -> Value {
    agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(plaintext)}))
}

fn decrypt(agent: &TestAgent, blob: &Value) -> Value {
    agent.ok("Decrypt", json!({"CiphertextBlob": blob}))
}

fn rotations(agent: &TestAgent, key: &str, all: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let mut req = json!({"KeyId": key, "Limit": 1});
        if all {
            req["IncludeKeyMaterial"] = json!("ALL_KEY_MATERIAL");
        }
        if let Some(m) = &marker {
            req["Marker"] = json!(m);
        }
        let page = agent.ok("ListKeyRotations", req);
        out.extend(page["Rotations"].as_array().unwrap().iter().cloned());
        match page["NextMarker"].as_str() {
            Some(m) => {
                assert_eq!(page["Truncated"], true);
                marker = Some(m.to_string());
            }
            None => break,
        }
    }
    out
}

fn error(agent: &TestAgent, action: &str, request: Value) -> kmsfs_common::KmsError {
    agent.call(action, request).expect_err(&format!("{action} should fail"))
}

#[test]
fn on_demand_rotations_keep_old_ciphertexts_and_name_the_new_material() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let first_material = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["CurrentKeyMaterialId"].clone();
    let mut blobs = vec![(encrypt(&agent, &key, b"v0")["CiphertextBlob"].clone(), first_material)];
    for i in 1..=3 {
        let reply = agent.ok("RotateKeyOnDemand", json!({"KeyId": key}));
        assert!(reply["KeyId"].as_str().unwrap().ends_with(&key));
        let current = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["CurrentKeyMaterialId"].clone();
        assert_ne!(current, blobs.last().unwrap().1, "rotation {i} made no new material");
        let data_key = agent.ok("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}));
        assert_eq!(data_key["KeyMaterialId"], current);
        blobs.push((encrypt(&agent, &key, format!("v{i}").as_bytes())["CiphertextBlob"].clone(), current));
    }
    for (i, (blob, material)) in blobs.iter().enumerate() {
        let out = decrypt(&agent, blob);
        assert_eq!(unb64(&out["Plaintext"]), format!("v{i}").as_bytes());
        assert_eq!(&out["KeyMaterialId"], material, "ciphertext {i} names the material that made it");
    }
    // Three rotations, one per page; with ALL_KEY_MATERIAL the first material too.
    let listed = rotations(&agent, &key, false);
    assert_eq!(listed.len(), 3);
    for (entry, (_, material)) in listed.iter().zip(&blobs[1..]) {
        assert_eq!(&entry["KeyMaterialId"], material);
        assert_eq!(entry["RotationType"], "ON_DEMAND");
        assert!(entry["RotationDate"].is_number());
    }
    assert_eq!(listed[2]["KeyMaterialState"], "CURRENT");
    assert_eq!(listed[0]["KeyMaterialState"], "NON_CURRENT");
    let all = rotations(&agent, &key, true);
    assert_eq!(all.len(), 4);
    assert_eq!(all[0]["KeyMaterialId"], blobs[0].1);
    assert!(all[0].get("RotationType").is_none());
    // Survives a restart.
    let mut agent = agent;
    agent.restart();
    assert_eq!(unb64(&decrypt(&agent, &blobs[0].0)["Plaintext"]), b"v0");
    assert_eq!(rotations(&agent, &key, false).len(), 3);
}

#[test]
fn refused_rotation_requests_change_nothing() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let status = || agent.ok("GetKeyRotationStatus", json!({"KeyId": key}));
    assert_eq!(status()["KeyRotationEnabled"], false);
    for days in [89, 2561] {
        let e = error(&agent, "EnableKeyRotation", json!({"KeyId": key, "RotationPeriodInDays": days}));
        assert_eq!(e.kind, ErrorKind::ValidationException, "{days}: {}", e.message);
    }
    assert_eq!(status()["KeyRotationEnabled"], false);
    agent.ok("EnableKeyRotation", json!({"KeyId": key}));
    let s = status();
    assert_eq!((s["KeyRotationEnabled"].clone(), s["RotationPeriodInDays"].clone()), (json!(true), json!(365)));
    let next = s["NextRotationDate"].as_f64().unwrap() * 1000.0;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as f64;
    assert!((next - now - 365.0 * DAY_MS).abs() < 60_000.0, "next rotation a year from now");
    // Changing the period keeps the date it counts from.
    agent.ok("EnableKeyRotation", json!({"KeyId": key, "RotationPeriodInDays": 90}));
    let moved = status()["NextRotationDate"].as_f64().unwrap() * 1000.0;
    assert!((next - moved - 275.0 * DAY_MS).abs() < 1000.0);

    agent.ok("DisableKey", json!({"KeyId": key}));
    for action in ["RotateKeyOnDemand", "EnableKeyRotation", "DisableKeyRotation"] {
        assert_eq!(error(&agent, action, json!({"KeyId": key})).kind, ErrorKind::DisabledException, "{action}");
    }
    agent.ok("EnableKey", json!({"KeyId": key}));
    assert_eq!(rotations(&agent, &key, false).len(), 0);
    agent.ok("DisableKeyRotation", json!({"KeyId": key}));
    let s = status();
    assert_eq!(s["KeyRotationEnabled"], false);
    assert!(s.get("NextRotationDate").is_none() && s.get("RotationPeriodInDays").is_none());

    // Keys of imported material do not rotate automatically.
    let external =
        agent.ok("CreateKey", json!({"Origin": "EXTERNAL"}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let e = error(&agent, "EnableKeyRotation", json!({"KeyId": external}));
    assert_eq!(e.kind, ErrorKind::UnsupportedOperationException, "{}", e.message);
    // Aliases are not key IDs here.
    agent.ok("CreateAlias", json!({"AliasName": "alias/rot", "TargetKeyId": key}));
    assert_eq!(error(&agent, "RotateKeyOnDemand", json!({"KeyId": "alias/rot"})).kind, ErrorKind::NotFoundException);

    // The service model's limit of on-demand rotations per key.
    for _ in 0..25 {
        agent.ok("RotateKeyOnDemand", json!({"KeyId": key}));
    }
    let e = error(&agent, "RotateKeyOnDemand", json!({"KeyId": key}));
    assert_eq!(e.kind, ErrorKind::LimitExceededException, "{}", e.message);
    assert_eq!(rotations(&agent, &key, false).len(), 25);
}

#[test]
fn automatic_rotation_is_performed_at_start_when_missed() {
    let mut agent = TestAgent::start();
    let key = create_key(&agent);
    agent.ok("EnableKeyRotation", json!({"KeyId": key, "RotationPeriodInDays": 90}));
    let old = encrypt(&agent, &key, b"before")["CiphertextBlob"].clone();
    let due = agent.ok("GetKeyRotationStatus", json!({"KeyId": key}))["NextRotationDate"].as_f64().unwrap();
    // kmsd is down when the rotation falls due; it catches up when it starts.
    agent.stop();
    agent.set_args(&["--clock-offset", "91d"]);
    agent.start_again();
    let listed = rotations(&agent, &key, false);
    assert_eq!(listed.len(), 1, "one automatic rotation: {listed:?}");
    assert_eq!(listed[0]["RotationType"], "AUTOMATIC");
    assert_eq!(listed[0]["KeyMaterialState"], "CURRENT");
    assert_eq!(unb64(&decrypt(&agent, &old)["Plaintext"]), b"before");
    let fresh = encrypt(&agent, &key, b"after");
    assert_eq!(decrypt(&agent, &fresh["CiphertextBlob"])["KeyMaterialId"], listed[0]["KeyMaterialId"]);
    let next = agent.ok("GetKeyRotationStatus", json!({"KeyId": key}))["NextRotationDate"].as_f64().unwrap();
    assert!(next > due + 89.0 * 86_400.0, "the next rotation is a period later");
    // The scheduler's own action is in the audit trail, as AWS logs RotateKey.
    let events = agent.audit_events();
    let rotate: Vec<&Value> = events.iter().filter(|e| e["eventName"] == "RotateKey").collect();
    assert_eq!(rotate.len(), 1);
    assert_eq!(rotate[0]["eventType"], "AwsServiceEvent");
    assert_eq!(rotate[0]["userIdentity"]["invokedBy"], "kms.amazonaws.com");
    assert_eq!(rotate[0]["additionalEventData"]["keyMaterialId"], listed[0]["KeyMaterialId"]);
    // Restarting again does not rotate again.
    agent.restart();
    assert_eq!(rotations(&agent, &key, false).len(), 1);
    // The service event is chained and sealed like any line: the log verifies.
    let out = agent.kmsctl().args(["audit", "verify"]).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The stored (wrapped) material of every version of `key_id`, read from kmsd.db with
/// Python's sqlite3 module (an independent reader).
fn stored_material(state_dir: &Path, key_id: &str) -> Vec<Vec<u8>> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             [print(bytes(r[0]).hex()) for r in c.execute('SELECT stored FROM key_material WHERE key_id=?', (sys.argv[2],)) if r[0]]",
        )
        .arg(state_dir.join("kmsd.db"))
        .arg(key_id)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect())
        .collect()
}

/// Every file under `dir` whose bytes contain any 16-byte window of `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if needle.windows(16).any(|w| bytes.windows(16).any(|b| b == w)) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn deletion_destroys_the_material_when_the_window_ends() {
    let mut mount = TestMount::new();
    let key = mount.key_id.clone();
    std::fs::write(mount.path("secret.txt"), b"shred me").unwrap();
    let agent = &mount.agent;
    agent.ok("RotateKeyOnDemand", json!({"KeyId": key}));
    let blob = encrypt(agent, &key, b"gone")["CiphertextBlob"].clone();
    agent.ok("CreateAlias", json!({"AliasName": "alias/doomed", "TargetKeyId": key}));
    agent.ok(
        "CreateGrant",
        json!({"KeyId": key, "GranteePrincipal": "arn:aws:iam::111122223333:user/x", "Operations": ["Decrypt"]}),
    );
    let stored = stored_material(&agent.state_dir(), &key);
    assert_eq!(stored.len(), 2, "two versions of material are stored");
    for s in &stored {
        assert!(!files_containing(&agent.state_dir(), s).is_empty(), "the scan finds stored material before deletion");
    }
    let scheduled = agent.ok("ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 7}));
    assert_eq!(scheduled["KeyState"], "PendingDeletion");

    // Six days later the key is still there (and can be cancelled); eight days later it is gone.
    mount.agent.stop();
    mount.agent.set_args(&["--clock-offset", "6d"]);
    mount.agent.start_again();
    assert_eq!(mount.agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["KeyState"], "PendingDeletion");
    mount.agent.stop();
    mount.agent.set_args(&["--clock-offset", "8d"]);
    mount.agent.start_again();
    let agent = &mount.agent;
    assert_eq!(error(agent, "DescribeKey", json!({"KeyId": key})).kind, ErrorKind::NotFoundException);
    let keys = agent.ok("ListKeys", json!({}));
    assert!(!keys.to_string().contains(&key), "ListKeys still lists the key: {keys}");
    let aliases = agent.ok("ListAliases", json!({}));
    assert!(!aliases.to_string().contains("alias/doomed"), "{aliases}");
    assert_eq!(error(agent, "Decrypt", json!({"CiphertextBlob": blob})).kind, ErrorKind::InvalidCiphertextException);
    assert_eq!(error(agent, "ListGrants", json!({"KeyId": key})).kind, ErrorKind::NotFoundException);
    // No byte of any version survives in the database, its WAL or anywhere in the state dir.
    for s in &stored {
        let found = files_containing(&agent.state_dir(), s);
        assert!(found.is_empty(), "destroyed material still found in {found:?}");
    }
    let deleted: Vec<Value> = agent.audit_events().into_iter().filter(|e| e["eventName"] == "DeleteKey").collect();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["eventType"], "AwsServiceEvent");
    // Crypto-shredding: the volume's files no longer read (the mount reconnected to the
    // agent and dropped its cached keys; Decrypt now fails).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read(mount.path("secret.txt")) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EACCES)) => break,
            other => {
                assert!(std::time::Instant::now() < deadline, "still readable after deletion: {other:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Python's view of the keys table: `key_id state n_material n_aliases` per key, and the
/// material rows of keys that no longer exist.
fn db_consistency(state_dir: &Path) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             [print(k, s, c.execute('SELECT count(*) FROM key_material WHERE key_id=?', (k,)).fetchone()[0], \
                    c.execute('SELECT count(*) FROM aliases WHERE key_id=?', (k,)).fetchone()[0]) \
              for k, s in c.execute('SELECT key_id, state FROM keys')]; \
             print('orphans', c.execute('SELECT count(*) FROM key_material WHERE key_id NOT IN (SELECT key_id FROM keys)').fetchone()[0], \
                   c.execute('SELECT count(*) FROM aliases WHERE key_id NOT IN (SELECT key_id FROM keys)').fetchone()[0])",
        )
        .arg(state_dir.join("kmsd.db"))
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sigkill_during_destruction_never_leaves_half_a_key() {
    let mut agent = TestAgent::start();
    let keep = create_key(&agent);
    let keep_blob = encrypt(&agent, &keep, b"kept")["CiphertextBlob"].clone();
    let mut doomed = Vec::new();
    for i in 0..40 {
        let key = create_key(&agent);
        agent.ok("RotateKeyOnDemand", json!({"KeyId": key}));
        agent.ok("CreateAlias", json!({"AliasName": format!("alias/doomed-{i}"), "TargetKeyId": key}));
        agent.ok("ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 7}));
        doomed.push(key);
    }
    agent.stop();
    agent.set_args(&["--clock-offset", "8d"]);
    let mut seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut gone_counts = Vec::new();
    // kmsd starts in tens of milliseconds and destroys the 40 keys right after: kill it at
    // random moments in that span, ten times.
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        agent.start_again_without_waiting();
        std::thread::sleep(Duration::from_micros(seed % 120_000));
        agent.kill();
        let view = db_consistency(&agent.state_dir());
        let mut gone = 0;
        for key in &doomed {
            match view.lines().find(|l| l.starts_with(key.as_str())) {
                Some(line) => assert_eq!(line, format!("{key} PendingDeletion 2 1"), "a half-destroyed key:\n{view}"),
                None => gone += 1,
            }
        }
        assert!(view.contains("orphans 0 0"), "material or aliases left without their key:\n{view}");
        gone_counts.push(gone);
    }
    agent.start_again();
    for key in &doomed {
        assert_eq!(error(&agent, "DescribeKey", json!({"KeyId": key})).kind, ErrorKind::NotFoundException);
    }
    assert_eq!(unb64(&decrypt(&agent, &keep_blob)["Plaintext"]), b"kept");
    eprintln!("keys destroyed after each kill: {gone_counts:?}");
}

#[test]
fn last_usage_names_the_operation_and_its_audit_record() {
    let mut agent = TestAgent::start();
    let key = create_key(&agent);
    let fresh = agent.ok("GetKeyLastUsage", json!({"KeyId": key}));
    assert_eq!(fresh["KeyLastUsage"], json!({}));
    assert_eq!(fresh["TrackingStartDate"], fresh["KeyCreationDate"], "tracking starts when the key is made");
    let blob = encrypt(&agent, &key, b"x")["CiphertextBlob"].clone();
    let usage = agent.ok("GetKeyLastUsage", json!({"KeyId": key}));
    assert_eq!(usage["KeyLastUsage"]["Operation"], "Encrypt");
    decrypt(&agent, &blob);
    // A refused operation is no use of the key.
    let e = agent.call("Decrypt", json!({"CiphertextBlob": blob, "EncryptionContext": {"a": "b"}})).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidCiphertextException);
    let usage = agent.ok("GetKeyLastUsage", json!({"KeyId": key}))["KeyLastUsage"].clone();
    assert_eq!(usage["Operation"], "Decrypt");
    let record: Vec<Value> =
        agent.audit_events().into_iter().filter(|e| e["eventID"] == usage["CloudTrailEventId"]).collect();
    assert_eq!(record.len(), 1, "the usage names the Decrypt's audit record");
    assert_eq!(record[0]["eventName"], "Decrypt");
    assert_eq!(record[0]["requestID"], usage["KmsRequestId"]);
    // Kept across a clean restart.
    agent.stop();
    agent.start_again();
    assert_eq!(agent.ok("GetKeyLastUsage", json!({"KeyId": key}))["KeyLastUsage"], usage);
    assert_eq!(error(&agent, "GetKeyLastUsage", json!({"KeyId": "alias/none"})).kind, ErrorKind::NotFoundException);
}
