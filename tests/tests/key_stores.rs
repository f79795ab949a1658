//! Custom key stores against real PKCS#11 tokens (SoftHSM2): AWS's CloudHSM key store API,
//! keys generated in the tokens, several tokens and the embedded store in one kmsd, a
//! wrong PIN, a token that goes away while serving, and a kmsfs volume cut off by
//! DisconnectCustomKeyStore as by DisableKey.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use kmsfs_common::ErrorKind;
use kmsfs_tests::softhsm::SoftHsm;
use kmsfs_tests::{b64, create_key, unb64, TestAgent, TestMount};
use serde_json::{json, Value};

const PIN: &str = "store-pin-1234";
const CLUSTER_ONE: &str = "cluster-kmsfsstoreone";
const CLUSTER_TWO: &str = "cluster-kmsfsstoretwo";

/// A SoftHSM2 with tokens `one` and `two`, declared to a new agent as two clusters.
fn agent_with_tokens() -> (TestAgent, SoftHsm) {
    let hsm = SoftHsm::new();
    hsm.init_token("one", PIN);
    hsm.init_token("two", PIN);
    let mut agent = TestAgent::prepared(&[]);
    let module = hsm.module().display().to_string();
    let clusters = json!({ "clusters": {
        CLUSTER_ONE: { "module": module, "token_label": "one" },
        CLUSTER_TWO: { "module": module, "token_label": "two" },
    }});
    std::fs::write(agent.config_dir().join("hsm-clusters.json"), clusters.to_string()).expect("hsm-clusters.json");
    agent.set_env("SOFTHSM2_CONF", &hsm.conf_path().display().to_string());
    agent.start_again();
    (agent, hsm)
}

fn create_store(agent: &TestAgent, name: &str, cluster: &str, password: &str) -> String {
    let out = agent.ok(
        "CreateCustomKeyStore",
        json!({"CustomKeyStoreName": name, "CloudHsmClusterId": cluster, "KeyStorePassword": password}),
    );
    out["CustomKeyStoreId"].as_str().expect("CustomKeyStoreId").to_string()
}

fn describe_store(agent: &TestAgent, id: &str) -> Value {
    let out = agent.ok("DescribeCustomKeyStores", json!({"CustomKeyStoreId": id}));
    out["CustomKeyStores"][0].clone()
}

fn connect(agent: &TestAgent, id: &str) -> Value {
    agent.ok("ConnectCustomKeyStore", json!({"CustomKeyStoreId": id}));
    describe_store(agent, id)
}

fn create_store_key(agent: &TestAgent, store: &str) -> String {
    let out = agent.ok("CreateKey", json!({"Origin": "AWS_CLOUDHSM", "CustomKeyStoreId": store}));
    out["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

fn error_kind(agent: &TestAgent, action: &str, request: Value) -> ErrorKind {
    agent.call(action, request).expect_err(action).kind
}

/// Encrypt then Decrypt under `key`; the plaintext comes back.
fn round_trip(agent: &TestAgent, key: &str) -> Vec<u8> {
    let ctx = json!({"purpose": "key-stores test"});
    let sealed =
        agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": b64(b"in the token"), "EncryptionContext": ctx}));
    let opened = agent.ok("Decrypt", json!({"CiphertextBlob": sealed["CiphertextBlob"], "EncryptionContext": ctx}));
    assert_eq!(unb64(&opened["Plaintext"]), b"in the token");
    unb64(&sealed["CiphertextBlob"])
}

#[test]
fn a_key_store_is_created_connected_used_and_survives_a_restart() {
    let (mut agent, _hsm) = agent_with_tokens();
    let store = create_store(&agent, "vault one", CLUSTER_ONE, PIN);
    assert!(store.starts_with("cks-"), "{store}");
    let entry = describe_store(&agent, &store);
    assert_eq!(entry["ConnectionState"], "DISCONNECTED");
    assert_eq!(entry["CustomKeyStoreType"], "AWS_CLOUDHSM");
    assert_eq!(entry["CloudHsmClusterId"], CLUSTER_ONE);
    assert!(entry.get("KeyStorePassword").is_none());

    // What AWS refuses at creation.
    let again = json!({"CustomKeyStoreName": "vault one", "CloudHsmClusterId": CLUSTER_TWO, "KeyStorePassword": PIN});
    assert_eq!(error_kind(&agent, "CreateCustomKeyStore", again), ErrorKind::CustomKeyStoreNameInUseException);
    let same_cluster =
        json!({"CustomKeyStoreName": "other", "CloudHsmClusterId": CLUSTER_ONE, "KeyStorePassword": PIN});
    assert_eq!(error_kind(&agent, "CreateCustomKeyStore", same_cluster), ErrorKind::CloudHsmClusterInUseException);
    let undeclared =
        json!({"CustomKeyStoreName": "x", "CloudHsmClusterId": "cluster-notdeclaredzz", "KeyStorePassword": PIN});
    assert_eq!(error_kind(&agent, "CreateCustomKeyStore", undeclared), ErrorKind::CloudHsmClusterNotFoundException);
    let short = json!({"CustomKeyStoreName": "x", "CloudHsmClusterId": CLUSTER_TWO, "KeyStorePassword": "123"});
    assert_eq!(error_kind(&agent, "CreateCustomKeyStore", short), ErrorKind::ValidationException);

    // No key in a store that is not connected.
    let in_store = json!({"Origin": "AWS_CLOUDHSM", "CustomKeyStoreId": store});
    assert_eq!(error_kind(&agent, "CreateKey", in_store.clone()), ErrorKind::CustomKeyStoreInvalidStateException);
    assert_eq!(connect(&agent, &store)["ConnectionState"], "CONNECTED");
    let key = create_store_key(&agent, &store);
    let meta = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"].clone();
    assert_eq!(meta["Origin"], "AWS_CLOUDHSM");
    assert_eq!(meta["CustomKeyStoreId"], store);
    assert_eq!(meta["CloudHsmClusterId"], CLUSTER_ONE);
    assert_eq!(meta["KeyState"], "Enabled");
    assert_eq!(
        error_kind(&agent, "CreateKey", json!({"Origin": "AWS_CLOUDHSM"})),
        ErrorKind::UnsupportedOperationException
    );
    assert_eq!(
        error_kind(&agent, "EnableKeyRotation", json!({"KeyId": key})),
        ErrorKind::UnsupportedOperationException
    );

    // Random bytes from the token; none from a store that does not exist.
    let random = agent.ok("GenerateRandom", json!({"NumberOfBytes": 48, "CustomKeyStoreId": store}));
    assert_eq!(unb64(&random["Plaintext"]).len(), 48);
    assert_eq!(
        error_kind(&agent, "GenerateRandom", json!({"NumberOfBytes": 8, "CustomKeyStoreId": "cks-00000000000000000"})),
        ErrorKind::CustomKeyStoreNotFoundException
    );

    // Cryptography in the token, beside a key of the embedded store.
    let blob = round_trip(&agent, &key);
    assert_eq!(blob[0], 2, "a token key's ciphertext blob is format 2 (AES-GCM computed in the token)");
    let embedded = create_key(&agent);
    round_trip(&agent, &embedded);
    let data_key = agent.ok("GenerateDataKey", json!({"KeyId": key, "KeySpec": "AES_256"}));
    let opened = agent.ok("Decrypt", json!({"CiphertextBlob": data_key["CiphertextBlob"]}));
    assert_eq!(opened["Plaintext"], data_key["Plaintext"]);
    let moved =
        agent.ok("ReEncrypt", json!({"CiphertextBlob": data_key["CiphertextBlob"], "DestinationKeyId": embedded}));
    let back = agent.ok("ReEncrypt", json!({"CiphertextBlob": moved["CiphertextBlob"], "DestinationKeyId": key}));
    assert_eq!(
        agent.ok("Decrypt", json!({"CiphertextBlob": back["CiphertextBlob"]}))["Plaintext"],
        data_key["Plaintext"]
    );

    // Only the name may change while connected; a store with keys cannot be deleted.
    let rename = json!({"CustomKeyStoreId": store, "NewCustomKeyStoreName": "vault 1"});
    agent.ok("UpdateCustomKeyStore", rename);
    let repin = json!({"CustomKeyStoreId": store, "KeyStorePassword": "another-pin"});
    assert_eq!(error_kind(&agent, "UpdateCustomKeyStore", repin), ErrorKind::CustomKeyStoreInvalidStateException);
    let delete = json!({"CustomKeyStoreId": store});
    assert_eq!(
        error_kind(&agent, "DeleteCustomKeyStore", delete.clone()),
        ErrorKind::CustomKeyStoreInvalidStateException
    );

    // A connected store reconnects when kmsd starts.
    agent.restart();
    assert_eq!(describe_store(&agent, &store)["ConnectionState"], "CONNECTED");
    assert_eq!(describe_store(&agent, &store)["CustomKeyStoreName"], "vault 1");
    let opened =
        agent.ok("Decrypt", json!({"CiphertextBlob": b64(&blob), "EncryptionContext": {"purpose": "key-stores test"}}));
    assert_eq!(unb64(&opened["Plaintext"]), b"in the token");

    // Disconnected: the key is Unavailable, cannot be used, can still be managed.
    agent.ok("DisconnectCustomKeyStore", json!({"CustomKeyStoreId": store}));
    assert_eq!(describe_store(&agent, &store)["ConnectionState"], "DISCONNECTED");
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["KeyState"], "Unavailable");
    let encrypt = json!({"KeyId": key, "Plaintext": b64(b"x")});
    assert_eq!(error_kind(&agent, "Encrypt", encrypt), ErrorKind::KMSInvalidStateException);
    assert_eq!(
        error_kind(&agent, "Decrypt", json!({"CiphertextBlob": b64(&blob)})),
        ErrorKind::KMSInvalidStateException
    );
    agent.ok("DisableKey", json!({"KeyId": key}));
    assert_eq!(
        error_kind(&agent, "DisconnectCustomKeyStore", json!({"CustomKeyStoreId": store})),
        ErrorKind::CustomKeyStoreInvalidStateException
    );
    assert_eq!(error_kind(&agent, "DeleteCustomKeyStore", delete.clone()), ErrorKind::CustomKeyStoreHasCMKsException);
    round_trip(&agent, &embedded);

    // Reconnected, the key is back in its stored state (disabled), then usable again.
    connect(&agent, &store);
    assert_eq!(agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["KeyState"], "Disabled");
    agent.ok("EnableKey", json!({"KeyId": key}));
    round_trip(&agent, &key);

    // Its deletion window ends: the key goes, then the store can be deleted.
    agent.ok("ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 7}));
    agent.set_args(&["--clock-offset", "8d"]);
    agent.restart();
    assert_eq!(error_kind(&agent, "DescribeKey", json!({"KeyId": key})), ErrorKind::NotFoundException);
    agent.ok("DisconnectCustomKeyStore", json!({"CustomKeyStoreId": store}));
    agent.ok("DeleteCustomKeyStore", delete.clone());
    assert_eq!(
        error_kind(&agent, "DescribeCustomKeyStores", json!({"CustomKeyStoreId": store})),
        ErrorKind::CustomKeyStoreNotFoundException
    );
    let audit = std::fs::read_dir(agent.audit_dir()).expect("audit dir");
    for entry in audit {
        let text = std::fs::read_to_string(entry.expect("entry").path()).unwrap_or_default();
        assert!(!text.contains(PIN), "the key store password reached the audit trail");
    }
    assert!(!agent.log().contains(PIN), "the key store password reached the log");
}

#[test]
fn two_tokens_serve_their_own_keys_and_a_wrong_pin_fails_the_connection() {
    let (agent, _hsm) = agent_with_tokens();
    let one = create_store(&agent, "one", CLUSTER_ONE, PIN);
    let two = create_store(&agent, "two", CLUSTER_TWO, "wrong-pin-0000");
    connect(&agent, &one);
    let entry = connect(&agent, &two);
    assert_eq!(entry["ConnectionState"], "FAILED");
    assert_eq!(entry["ConnectionErrorCode"], "INVALID_CREDENTIALS");
    assert_eq!(
        error_kind(&agent, "ConnectCustomKeyStore", json!({"CustomKeyStoreId": two})),
        ErrorKind::CustomKeyStoreInvalidStateException,
        "a FAILED store is disconnected before it is connected again"
    );
    agent.ok("DisconnectCustomKeyStore", json!({"CustomKeyStoreId": two}));
    agent.ok("UpdateCustomKeyStore", json!({"CustomKeyStoreId": two, "KeyStorePassword": PIN}));
    assert_eq!(connect(&agent, &two)["ConnectionState"], "CONNECTED");

    let key_one = create_store_key(&agent, &one);
    let key_two = create_store_key(&agent, &two);
    let blob_one = round_trip(&agent, &key_one);
    round_trip(&agent, &key_two);
    // Disconnecting one store leaves the other, and the embedded store, serving.
    agent.ok("DisconnectCustomKeyStore", json!({"CustomKeyStoreId": one}));
    round_trip(&agent, &key_two);
    round_trip(&agent, &create_key(&agent));
    assert_eq!(
        error_kind(
            &agent,
            "Decrypt",
            json!({"CiphertextBlob": b64(&blob_one), "EncryptionContext": {"purpose": "key-stores test"}})
        ),
        ErrorKind::KMSInvalidStateException
    );
    let listed = agent.ok("DescribeCustomKeyStores", json!({}));
    assert_eq!(listed["CustomKeyStores"].as_array().map(Vec::len), Some(2));
    let by_name = agent.ok("DescribeCustomKeyStores", json!({"CustomKeyStoreName": "two"}));
    assert_eq!(by_name["CustomKeyStores"][0]["CustomKeyStoreId"], two);
}

#[test]
fn a_token_that_disappears_fails_its_requests_and_nothing_else() {
    let (agent, hsm) = agent_with_tokens();
    let one = create_store(&agent, "one", CLUSTER_ONE, PIN);
    connect(&agent, &one);
    let key = create_store_key(&agent, &one);
    let embedded = create_key(&agent);
    round_trip(&agent, &key);
    hsm.delete_token("one");
    let encrypt = json!({"KeyId": key, "Plaintext": b64(b"x")});
    let failed = agent.call("Encrypt", encrypt).expect_err("Encrypt under a deleted token");
    assert!(
        matches!(failed.kind, ErrorKind::KMSInternalException | ErrorKind::CustomKeyStoreInvalidStateException),
        "{failed:?}"
    );
    round_trip(&agent, &embedded);
    // kmsd is still up and answering.
    agent.ok("ListKeys", json!({}));
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

#[test]
fn disconnecting_the_key_store_cuts_a_mounted_volume_off() {
    let (agent, _hsm) = agent_with_tokens();
    let store = create_store(&agent, "fs", CLUSTER_ONE, PIN);
    connect(&agent, &store);
    let key = create_store_key(&agent, &store);
    let mount = TestMount::on_agent(agent, &key, &[], &[]);
    let path = mount.path("secret.txt");
    std::fs::File::create(&path).and_then(|mut f| f.write_all(b"kept in an HSM")).expect("write");
    let mut text = String::new();
    let mut open = std::fs::File::open(&path).expect("open");
    open.read_to_string(&mut text).expect("read");
    assert_eq!(text, "kept in an HSM");

    mount.agent.ok("DisconnectCustomKeyStore", json!({"CustomKeyStoreId": store}));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut buf = Vec::new();
        let reread = std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut buf));
        if reread.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "the volume still reads after DisconnectCustomKeyStore:\n{}", mount.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    connect(&mount.agent, &store);
    let mut again = String::new();
    std::fs::File::open(&path).and_then(|mut f| f.read_to_string(&mut again)).expect("read after reconnecting");
    assert_eq!(again, "kept in an HSM");
}
