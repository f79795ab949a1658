//! Multi-Region keys: a primary on one agent, replicas on the agents of other regions.
//!
//! The two-host test runs two real kmsd in two network namespaces joined by a veth pair
//! (`kmsfs_tests::netns`), each serving TLS with mutual authentication on its veth address
//! under certificates the test makes, each naming the other in `peers.json`. The test
//! itself reaches each agent only over its Unix socket, as a local user of that host.

use std::time::{Duration, Instant};

use kmsfs_common::ErrorKind;
use kmsfs_tests::netns::{NetnsPair, Side};
use kmsfs_tests::tls::TestCa;
use kmsfs_tests::{b64, unb64, TestAgent, TestMount};
use serde_json::{json, Value};

const ACCOUNT: &str = "111122223333";
const ROOT_POLICY: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*"}]}"#;
/// What a peer agent's principal may do here: create replicas and keep them up to date.
const PEER_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow",
  "Action":["kms:CreateKey","kms:SynchronizeMultiRegionKey"],"Resource":"*"}]}"#;

fn fails(agent: &TestAgent, action: &str, request: Value) -> ErrorKind {
    match agent.call(action, request.clone()) {
        Ok(v) => panic!("{action} {request} succeeded: {v}"),
        Err(e) => e.kind,
    }
}

#[test]
fn a_multi_region_primary_on_its_own() {
    let agent = TestAgent::start_with(&["--region", "us-east-1", "--account-id", ACCOUNT]);
    let created = agent.ok("CreateKey", json!({"MultiRegion": true, "Description": "mrk"}));
    let meta = &created["KeyMetadata"];
    let id = meta["KeyId"].as_str().unwrap().to_string();
    assert!(id.starts_with("mrk-") && id.len() == 36, "{id}");
    assert_eq!(meta["Arn"], format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{id}"));
    assert_eq!(meta["MultiRegion"], true);
    assert_eq!(
        meta["MultiRegionConfiguration"],
        json!({
            "MultiRegionKeyType": "PRIMARY",
            "PrimaryKey": {"Arn": format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{id}"), "Region": "us-east-1"},
            "ReplicaKeys": [],
        })
    );
    let blob = agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"multi-Region")}))["CiphertextBlob"].clone();

    let single = agent.ok("CreateKey", json!({}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": single}))["KeyMetadata"]["MultiRegion"], false);
    let replicate =
        |key: &str, region: &str| fails(&agent, "ReplicateKey", json!({"KeyId": key, "ReplicaRegion": region}));
    assert_eq!(replicate(&single, "eu-west-1"), ErrorKind::UnsupportedOperationException, "not multi-Region");
    assert_eq!(replicate(&id, "us-east-1"), ErrorKind::AlreadyExistsException, "its own region");
    let err = agent.call("ReplicateKey", json!({"KeyId": id, "ReplicaRegion": "eu-west-1"})).unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnsupportedOperationException);
    assert!(err.message.contains("peers.json"), "{}", err.message);
    assert_eq!(
        fails(&agent, "UpdatePrimaryRegion", json!({"KeyId": id, "PrimaryRegion": "eu-west-1"})),
        ErrorKind::NotFoundException,
        "no replica there"
    );
    assert_eq!(
        fails(&agent, "CreateKey", json!({"MultiRegion": true, "Origin": "EXTERNAL"})),
        ErrorKind::UnsupportedOperationException
    );

    // kmsctl, as `aws kms`: the same key through the CLI, and AWS's error and exit code.
    let out = agent.kmsctl().args(["create-key", "--multi-region", "--description", "cli"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["KeyMetadata"]["MultiRegionConfiguration"]["MultiRegionKeyType"], "PRIMARY", "{cli}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.find("\"MultiRegion\"").unwrap() < text.find("\"MultiRegionConfiguration\"").unwrap(), "model order");
    let out = agent.kmsctl().args(["replicate-key", "-k", &id, "--replica-region", "eu-west-1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(254));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("An error occurred (UnsupportedOperationException) when calling the ReplicateKey operation"),
        "{stderr}"
    );

    let mut agent = agent;
    agent.restart();
    let described = agent.ok("DescribeKey", json!({"KeyId": id}));
    assert_eq!(described["KeyMetadata"]["MultiRegionConfiguration"]["MultiRegionKeyType"], "PRIMARY");
    let plain = agent.ok("Decrypt", json!({"CiphertextBlob": blob}));
    assert_eq!(unb64(&plain["Plaintext"]), b"multi-Region");
    assert_eq!(plain["KeyId"], format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{id}"));
}

/// One host of the two-host test: its agent, in its namespace, serving TLS on its address.
struct Host {
    agent: TestAgent,
    region: &'static str,
    /// kmsd's arguments (TLS, region, listener), for restarts with more.
    args: Vec<String>,
    side: Side,
    /// Its TLS listener, `https://IP:4566`.
    endpoint: String,
    /// What its agent presents when it calls the other's: access key and client certificate,
    /// as the environment of `multi_region_clients.py peer`.
    credentials: Vec<(&'static str, String)>,
}

fn access_keys(id: &str, secret: &str, principal: &str) -> String {
    json!({"AccessKeys": [{"AccessKeyId": id, "SecretAccessKey": secret, "Principal": principal}]}).to_string()
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Waits for `check` to hold (the scheduler's retries), failing after `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rotations(host: &Host, id: &str) -> usize {
    host.agent.ok("ListKeyRotations", json!({"KeyId": id}))["Rotations"].as_array().map_or(0, Vec::len)
}

/// Two hosts, A in us-east-1 and B in eu-west-1: two kmsd in two network namespaces, each
/// serving mutual TLS on its veth address with certificates from the test's CA and naming
/// the other in `peers.json` (with its client certificate and an access key the other maps
/// to `user/<region>-agent`, allowed to create and synchronize replicas). Fields drop in
/// order: the agents before the namespaces they run in.
struct TwoHosts {
    a: Host,
    b: Host,
    _certs: tempfile::TempDir,
    net: NetnsPair,
}

fn log_has(host: &Host, needle: &str) -> bool {
    host.agent.log().contains(needle)
}

fn two_hosts() -> TwoHosts {
    let net = NetnsPair::new();
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path(), "ca");
    let sides = [(Side::A, "us-east-1", "host-a"), (Side::B, "eu-west-1", "host-b")];
    // Each agent's access key at the other, and the principal it maps to there.
    let key_id = |region: &str| format!("AKIAPEER{:0>12}", region.to_uppercase().replace('-', ""));
    let secret = |region: &str| format!("peer-secret-of-{region}-0123456789");
    let mut hosts = Vec::new();
    for (side, region, name) in sides {
        let ip = net.ip(side).to_string();
        let server = ca.server(name, &[&ip]);
        let other = sides.iter().find(|s| s.0 != side).unwrap().1;
        let peer_user = format!("{other}-agent");
        let policy_path = format!("users/{peer_user}.json");
        let args = [
            "--region",
            region,
            "--account-id",
            ACCOUNT,
            "--listen-tcp",
            &format!("{ip}:4566"),
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
            "--tls-client-ca",
            ca.cert.to_str().unwrap(),
        ];
        let agent = TestAgent::start_in_netns(
            net.name(side),
            &args,
            &[("users/root.json", ROOT_POLICY), (&policy_path, PEER_POLICY)],
            Some(&access_keys(&key_id(other), &secret(other), &format!("user/{peer_user}"))),
        );
        let client = ca.client(&format!("{name}-client"));
        let credentials = vec![
            ("AWS_ACCESS_KEY_ID", key_id(region)),
            ("AWS_SECRET_ACCESS_KEY", secret(region)),
            ("TLS_CA", ca.cert.display().to_string()),
            ("TLS_CLIENT_CERT", client.cert.display().to_string()),
            ("TLS_CLIENT_KEY", client.key.display().to_string()),
        ];
        let args = args.iter().map(|a| a.to_string()).collect();
        let endpoint = format!("https://{ip}:4566");
        hosts.push((side, Host { agent, region, args, side, endpoint, credentials }));
    }
    // peers.json on each, naming the other (with this host's client certificate); SIGHUP
    // loads it.
    for (side, region, name) in sides {
        let (other_side, other_region) = sides.iter().find(|s| s.0 != side).map(|s| (s.0, s.1)).unwrap();
        let client = ca.client(&format!("{name}-client"));
        let peers = json!({"Peers": [{
            "Region": other_region,
            "Endpoint": format!("https://{}:4566", net.ip(other_side)),
            "CaFile": ca.cert,
            "AccessKeyId": key_id(region),
            "SecretAccessKey": secret(region),
            "ClientCertificateFile": client.cert,
            "ClientKeyFile": client.key,
            // Who the other agent is when it calls this one: its access key's user here.
            "Principal": format!("user/{other_region}-agent"),
        }]});
        let host = &hosts.iter().find(|h| h.0 == side).unwrap().1;
        write_private(&host.agent.config_dir().join("peers.json"), &peers.to_string());
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(host.agent.pid() as i32), nix::sys::signal::Signal::SIGHUP)
            .unwrap();
    }
    for (side, _, _) in sides {
        net.wait_tcp(side.other(), std::net::SocketAddr::new(net.ip(side), 4566));
    }
    for (_, host) in &hosts {
        eventually(Duration::from_secs(10), "peers.json reloaded", || log_has(host, "peer agents reloaded"));
    }
    let mut it = hosts.into_iter().map(|(_, h)| h);
    let (a, b) = (it.next().unwrap(), it.next().unwrap());
    TwoHosts { a, b, _certs: certs, net }
}

/// Sends peer action `target` to `to`'s agent from `from`'s namespace, signed with the
/// credentials `from`'s agent uses: what that agent could send. Returns the reply's
/// `__type` (`None` for a success).
fn peer_call(net: &NetnsPair, from: &Host, to: &Host, target: &str, body: Value) -> Option<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/multi_region_clients.py");
    let out = net
        .command(from.side, "python3")
        .arg(&script)
        .args(["peer", &to.endpoint, to.region, target, &body.to_string()])
        .envs(from.credentials.iter().map(|(k, v)| (*k, v)))
        .output()
        .expect("run multi_region_clients.py peer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    reply["body"]["__type"].as_str().map(str::to_string)
}

#[test]
fn replicas_on_two_hosts_over_mutual_tls() {
    // Bound in this order so that the agents drop before their namespaces.
    let TwoHosts { net, _certs, mut a, mut b } = two_hosts();
    let arn = |host: &Host, id: &str| format!("arn:aws:kms:{}:{ACCOUNT}:key/{id}", host.region);

    // A primary on A, replicated to B with its own description and tags.
    let id =
        a.agent.ok("CreateKey", json!({"MultiRegion": true}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let from_a = a.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"made on A")}))["CiphertextBlob"].clone();
    let replicated = a.agent.ok(
        "ReplicateKey",
        json!({"KeyId": id, "ReplicaRegion": "eu-west-1", "Description": "replica on B",
               "Tags": [{"TagKey": "site", "TagValue": "b"}]}),
    );
    let replica = &replicated["ReplicaKeyMetadata"];
    assert_eq!(replica["KeyId"], id);
    assert_eq!(replica["Arn"], arn(&b, &id));
    assert_eq!(replica["Description"], "replica on B");
    assert_eq!(replica["MultiRegionConfiguration"]["MultiRegionKeyType"], "REPLICA");
    assert_eq!(replicated["ReplicaTags"], json!([{"TagKey": "site", "TagValue": "b"}]));
    assert!(replicated["ReplicaPolicy"].as_str().unwrap().contains("kms:*"), "{replicated}");
    let expected = json!({
        "PrimaryKey": {"Arn": arn(&a, &id), "Region": "us-east-1"},
        "ReplicaKeys": [{"Arn": arn(&b, &id), "Region": "eu-west-1"}],
    });
    for (host, key_type) in [(&a, "PRIMARY"), (&b, "REPLICA")] {
        let config = &host.agent.ok("DescribeKey", json!({"KeyId": id}))["KeyMetadata"]["MultiRegionConfiguration"];
        assert_eq!(config["MultiRegionKeyType"], key_type, "{config}");
        assert_eq!(
            (&config["PrimaryKey"], &config["ReplicaKeys"]),
            (&expected["PrimaryKey"], &expected["ReplicaKeys"])
        );
    }
    assert_eq!(
        a.agent.call("ReplicateKey", json!({"KeyId": id, "ReplicaRegion": "eu-west-1"})).unwrap_err().kind,
        ErrorKind::AlreadyExistsException
    );
    // Tags and description are the replica's own.
    assert_eq!(a.agent.ok("ListResourceTags", json!({"KeyId": id}))["Tags"], json!([]));

    // A replica's agent may not speak for the key: B cannot make itself primary on A, nor
    // report another region's replica deleted. A client that is no peer gets nothing.
    let claim = json!({"KeyId": id, "MultiRegion": {"Primary": "eu-west-1", "Replicas": ["us-east-1"]},
                       "CurrentVersion": 1});
    let refused = peer_call(&net, &b, &a, "KmsfsPeer.SynchronizeReplica", claim.clone());
    assert_eq!(refused.as_deref(), Some("AccessDeniedException"));
    let removal = json!({"KeyId": id, "Region": "ap-south-1"});
    let refused = peer_call(&net, &b, &a, "KmsfsPeer.RemoveReplica", removal);
    assert_eq!(refused.as_deref(), Some("AccessDeniedException"));
    let audited = a.agent.audit_events();
    let refusal = audited.iter().rev().find(|e| e["eventName"] == "KmsfsPeer.SynchronizeReplica").expect("audited");
    assert_eq!(refusal["errorCode"], "AccessDeniedException", "{refusal}");
    assert!(refusal["errorMessage"].as_str().unwrap_or("").contains("may not synchronize"), "{refusal}");
    let config = &a.agent.ok("DescribeKey", json!({"KeyId": id}))["KeyMetadata"]["MultiRegionConfiguration"];
    assert_eq!((&config["MultiRegionKeyType"], &config["ReplicaKeys"]), (&json!("PRIMARY"), &expected["ReplicaKeys"]));

    // Ciphertexts cross both ways.
    let on_b = b.agent.ok("Decrypt", json!({"CiphertextBlob": from_a}));
    assert_eq!(unb64(&on_b["Plaintext"]), b"made on A");
    assert_eq!(on_b["KeyId"], arn(&b, &id));
    let from_b = b.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"made on B")}))["CiphertextBlob"].clone();
    assert_eq!(unb64(&a.agent.ok("Decrypt", json!({"CiphertextBlob": from_b}))["Plaintext"]), b"made on B");

    // The material crossed wrapped, and the audit trail of neither agent holds it.
    let b_events = b.agent.audit_events();
    let created = b_events.iter().find(|e| e["eventName"] == "KmsfsPeer.CreateReplica").expect("audited on B");
    assert_eq!(created["userIdentity"]["arn"], format!("arn:aws:iam::{ACCOUNT}:user/us-east-1-agent"), "{created}");
    assert!(created["requestParameters"].get("EncryptedKeyMaterial").is_none(), "{created}");
    assert!(created["requestParameters"].get("ImportToken").is_none(), "{created}");

    // Enablement is per replica; rotation belongs to the primary.
    b.agent.ok("DisableKey", json!({"KeyId": id}));
    assert_eq!(fails(&b.agent, "Decrypt", json!({"CiphertextBlob": from_a})), ErrorKind::DisabledException);
    a.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"A is unaffected")}));
    b.agent.ok("EnableKey", json!({"KeyId": id}));
    assert_eq!(fails(&b.agent, "RotateKeyOnDemand", json!({"KeyId": id})), ErrorKind::UnsupportedOperationException);
    assert_eq!(fails(&b.agent, "EnableKeyRotation", json!({"KeyId": id})), ErrorKind::UnsupportedOperationException);

    // A rotation of the primary reaches the replica at once.
    a.agent.ok("RotateKeyOnDemand", json!({"KeyId": id}));
    assert_eq!(rotations(&b, &id), 1, "the new version is on B");
    let rotated = a.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"version 2")}))["CiphertextBlob"].clone();
    assert_eq!(unb64(&b.agent.ok("Decrypt", json!({"CiphertextBlob": rotated}))["Plaintext"]), b"version 2");

    // B's agent stopped: A keeps working, rotates, and B catches up once it is back.
    b.agent.stop();
    let alone = a.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"B is down")}))["CiphertextBlob"].clone();
    assert_eq!(unb64(&a.agent.ok("Decrypt", json!({"CiphertextBlob": alone.clone()}))["Plaintext"]), b"B is down");
    a.agent.ok("RotateKeyOnDemand", json!({"KeyId": id}));
    let while_down = a.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"v3")}))["CiphertextBlob"].clone();
    assert!(log_has(&a, "replica not synchronized, retrying later"), "A noticed B was down");
    b.agent.start_again();
    eventually(Duration::from_secs(30), "the replica caught up", || rotations(&b, &id) == 2);
    assert_eq!(unb64(&b.agent.ok("Decrypt", json!({"CiphertextBlob": while_down}))["Plaintext"]), b"v3");

    // B becomes the primary: now B rotates, and A is the replica.
    a.agent.ok("UpdatePrimaryRegion", json!({"KeyId": id, "PrimaryRegion": "eu-west-1"}));
    for (host, key_type) in [(&a, "REPLICA"), (&b, "PRIMARY")] {
        let config = &host.agent.ok("DescribeKey", json!({"KeyId": id}))["KeyMetadata"]["MultiRegionConfiguration"];
        assert_eq!(config["MultiRegionKeyType"], key_type, "{config}");
        assert_eq!(config["PrimaryKey"]["Region"], "eu-west-1");
        assert_eq!(config["ReplicaKeys"], json!([{"Arn": arn(&a, &id), "Region": "us-east-1"}]));
    }
    assert_eq!(fails(&a.agent, "RotateKeyOnDemand", json!({"KeyId": id})), ErrorKind::UnsupportedOperationException);
    b.agent.ok("RotateKeyOnDemand", json!({"KeyId": id}));
    assert_eq!(rotations(&a, &id), 3, "B's rotation reached A");
    let newest = b.agent.ok("Encrypt", json!({"KeyId": id, "Plaintext": b64(b"v4 from B")}))["CiphertextBlob"].clone();
    assert_eq!(unb64(&a.agent.ok("Decrypt", json!({"CiphertextBlob": newest}))["Plaintext"]), b"v4 from B");

    // Deletion: a primary with replicas waits for them (PendingReplicaDeletion, no date yet).
    let scheduled = b.agent.ok("ScheduleKeyDeletion", json!({"KeyId": id, "PendingWindowInDays": 7}));
    assert_eq!(scheduled["KeyState"], "PendingReplicaDeletion", "{scheduled}");
    assert!(scheduled.get("DeletionDate").is_none(), "{scheduled}");
    assert_eq!(
        fails(&b.agent, "Encrypt", json!({"KeyId": id, "Plaintext": b64(b"x")})),
        ErrorKind::KMSInvalidStateException
    );
    assert_eq!(unb64(&a.agent.ok("Decrypt", json!({"CiphertextBlob": from_a}))["Plaintext"]), b"made on A");
    let on_a = a.agent.ok("ScheduleKeyDeletion", json!({"KeyId": id, "PendingWindowInDays": 7}));
    assert_eq!(on_a["KeyState"], "PendingDeletion");
    // A's window ends (its lifecycle clock eight days on): the replica is destroyed, and B's
    // agent, told so, starts the primary's own seven days.
    a.agent.stop();
    let mut args: Vec<&str> = a.args.iter().map(String::as_str).collect();
    args.extend(["--clock-offset", "8d"]);
    a.agent.set_args(&args);
    a.agent.start_again();
    assert_eq!(fails(&a.agent, "DescribeKey", json!({"KeyId": id})), ErrorKind::NotFoundException);
    eventually(Duration::from_secs(30), "the primary's window began", || {
        b.agent.ok("DescribeKey", json!({"KeyId": id}))["KeyMetadata"]["KeyState"] == "PendingDeletion"
    });
    let meta = b.agent.ok("DescribeKey", json!({"KeyId": id}))["KeyMetadata"].clone();
    assert_eq!(meta["MultiRegionConfiguration"]["ReplicaKeys"], json!([]), "{meta}");
    assert!(meta["DeletionDate"].is_number(), "{meta}");
    assert!(log_has(&a, "told the primary's agent that this replica is deleted"));
}

/// boto3 (every reply held to botocore's service model) and the AWS Encryption SDK, on each
/// agent's socket: ReplicateKey, DescribeKey in both regions, a message encrypted under the
/// primary's ARN decrypting with the MRK-aware provider given only the replica's ARN (and
/// not with the strict one), UpdatePrimaryRegion.
#[test]
fn aws_sdks_see_multi_region_keys_as_aws_ones() {
    let hosts = two_hosts();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/multi_region_clients.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(hosts.a.region)
        .arg(hosts.a.agent.socket())
        .arg(hosts.b.region)
        .arg(hosts.b.agent.socket())
        .output()
        .expect("run multi_region_clients.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("multi-Region: 4 passed, 0 failed"), "{stdout}");
}

/// The multi-Region route of `kmsfs snapshot`: a volume on A exported `--to-key` the
/// multi-Region key (A's agent re-wraps every file key to it), imported on B under B's own
/// key through B's replica, and mounted on B with A's agent stopped: the same files, and the
/// blocks byte for byte.
#[test]
fn a_volume_moves_to_another_host_under_a_replica_key() {
    let TwoHosts { net: _net, _certs, a, b } = two_hosts();
    let mrk =
        a.agent.ok("CreateKey", json!({"MultiRegion": true}))["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    a.agent.ok("ReplicateKey", json!({"KeyId": mrk, "ReplicaRegion": b.region}));
    let volume_key = kmsfs_tests::create_key(&a.agent);
    let b_key = kmsfs_tests::create_key(&b.agent);
    let mut mount = TestMount::on_agent(a.agent, &volume_key, &[], &[]);
    let mut files = std::collections::BTreeMap::new();
    std::fs::create_dir(mount.path("dir")).unwrap();
    for i in 0..40 {
        let rel = if i % 2 == 0 { format!("dir/file-{i}") } else { format!("file-{i}") };
        let data: Vec<u8> = (0..i * 997).map(|j| (j * 31 + i) as u8).collect();
        std::fs::write(mount.path(&rel), &data).unwrap();
        files.insert(rel, data);
    }
    std::os::unix::fs::symlink("dir/file-0", mount.path("link")).unwrap();
    mount.unmount();

    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("snapshot");
    let cipher = mount.cipher();
    kmsfs_on(&mount.agent, &["snapshot", "export"], &[&cipher, &dest], &["--to-key", &mrk]);
    mount.agent.stop();
    kmsfs_on(&b.agent, &["snapshot", "import"], &[&dest], &["--key", &b_key]);

    let mounted =
        kmsfs_tests::MountedDir::new(&b.agent, &dest, &work.path().join("mnt"), &work.path().join("kmsfs.log"));
    for (rel, data) in &files {
        assert_eq!(&std::fs::read(mounted.mnt.join(rel)).unwrap(), data, "{rel} on B");
    }
    assert_eq!(std::fs::read_link(mounted.mnt.join("link")).unwrap(), std::path::Path::new("dir/file-0"));
    // The blocks crossed as they were: every backing file past its header is A's.
    let mut compared = 0;
    for entry in walk(&cipher) {
        let rel = entry.strip_prefix(&cipher).unwrap();
        let (src, copy) = (std::fs::read(&entry).unwrap(), std::fs::read(dest.join(rel)).unwrap());
        if src.len() > 1024 && std::fs::symlink_metadata(&entry).unwrap().is_file() && !rel.starts_with("kmsfs.") {
            assert_eq!(src[1024..], copy[1024..], "{}", rel.display());
            assert_ne!(src[..1024], copy[..1024], "{}: the header is re-wrapped", rel.display());
            compared += 1;
        }
    }
    assert!(compared >= 39, "{compared} files compared");
}

/// Runs `kmsfs WORDS PATHS FLAGS` on `agent`; it must succeed.
fn kmsfs_on(agent: &TestAgent, words: &[&str], paths: &[&std::path::Path], flags: &[&str]) {
    let out = std::process::Command::new(kmsfs_tests::bin("kmsfs"))
        .env("KMSD_SOCKET", agent.socket())
        .args(words)
        .args(paths)
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "kmsfs {words:?} {paths:?} {flags:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every regular file under `root`, recursively.
fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(walk(&path));
        } else if meta.is_file() {
            out.push(path);
        }
    }
    out
}
