//! Durability under SIGKILL: whatever kmsd acknowledged survives the process dying at any
//! instant. A client creates keys and encrypts under them as fast as it can while the
//! agent is SIGKILLed at a random moment; after a restart on the same state directory every
//! acknowledged key must be described as Enabled and every acknowledged ciphertext must
//! decrypt to its plaintext. Three kill/restart cycles accumulate acknowledgements, so keys
//! from earlier cycles must also survive later crashes and recoveries.
//!
//! A request cut off by the kill may or may not have happened; it is never recorded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kmsfs_common::client::{AgentClient, ClientError};
use kmsfs_tests::{b64, unb64, TestAgent};
use serde_json::{json, Value};

/// A ciphertext the agent returned, with what it must decrypt to.
struct Sealed {
    key_id: String,
    ciphertext: Vec<u8>,
    plaintext: Vec<u8>,
    context: Value,
}

/// What the agent acknowledged during one cycle.
#[derive(Default)]
struct Acknowledged {
    keys: Vec<String>,
    sealed: Vec<Sealed>,
}

/// A different pseudo-random value each run, without a random-number dependency.
fn jitter(range: u64) -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    u64::from(nanos) % range
}

/// The service's answer, or `None` when the connection failed (the request may or may not
/// have been carried out). A service error is a bug: the workload is always valid.
fn answered(action: &str, result: Result<Value, ClientError>) -> Option<Value> {
    match result {
        Ok(v) => Some(v),
        Err(ClientError::Service(e)) => panic!("{action} was refused: {e}"),
        Err(_) => None,
    }
}

/// CreateKey + Encrypt in a loop until `stop`, reconnecting whenever the connection dies.
fn workload(socket: std::path::PathBuf, cycle: usize, stop: Arc<AtomicBool>) -> Acknowledged {
    let mut acked = Acknowledged::default();
    let mut client: Option<AgentClient> = None;
    let mut op = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            match AgentClient::connect(&socket) {
                Ok(c) => client = Some(c),
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
            continue;
        };
        op += 1;
        let Some(created) = answered("CreateKey", c.call("CreateKey", &json!({}))) else {
            client = None;
            continue;
        };
        let key_id = created["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string();
        acked.keys.push(key_id.clone());
        let plaintext = format!("cycle {cycle} op {op} {}", jitter(1 << 32)).into_bytes();
        let context = json!({ "cycle": cycle.to_string(), "op": op.to_string() });
        let request = json!({ "KeyId": key_id, "Plaintext": b64(&plaintext), "EncryptionContext": context });
        let Some(sealed) = answered("Encrypt", c.call("Encrypt", &request)) else {
            client = None;
            continue;
        };
        acked.sealed.push(Sealed { key_id, ciphertext: unb64(&sealed["CiphertextBlob"]), plaintext, context });
    }
    acked
}

/// Every acknowledged key and ciphertext, checked against the restarted agent.
fn verify(agent: &TestAgent, acked: &Acknowledged) {
    let mut client = agent.client();
    for key_id in &acked.keys {
        let described = client
            .call("DescribeKey", &json!({ "KeyId": key_id }))
            .unwrap_or_else(|e| panic!("acknowledged key {key_id} lost after SIGKILL: {e}\n{}", agent.log()));
        assert_eq!(described["KeyMetadata"]["KeyState"], "Enabled", "key {key_id} after SIGKILL: {described}");
    }
    for sealed in &acked.sealed {
        let request = json!({ "CiphertextBlob": b64(&sealed.ciphertext), "EncryptionContext": sealed.context });
        let opened = client.call("Decrypt", &request).unwrap_or_else(|e| {
            panic!("acknowledged ciphertext under {} no longer decrypts after SIGKILL: {e}", sealed.key_id)
        });
        assert_eq!(unb64(&opened["Plaintext"]), sealed.plaintext, "plaintext under {}", sealed.key_id);
        let key_arn = opened["KeyId"].as_str().expect("KeyId");
        assert!(key_arn.ends_with(&format!(":key/{}", sealed.key_id)), "{key_arn} is not {}", sealed.key_id);
    }
}

#[test]
fn acknowledged_keys_and_ciphertexts_survive_sigkill() {
    let mut agent = TestAgent::start();
    let mut all = Acknowledged::default();
    for cycle in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let (socket, stop) = (agent.socket(), stop.clone());
            thread::spawn(move || workload(socket, cycle, stop))
        };
        thread::sleep(Duration::from_millis(300 + jitter(500)));
        agent.kill();
        stop.store(true, Ordering::Relaxed);
        let acked = worker.join().expect("workload thread");
        assert!(!acked.keys.is_empty(), "cycle {cycle}: the agent acknowledged nothing before the kill");
        println!("cycle {cycle}: {} keys and {} ciphertexts acknowledged", acked.keys.len(), acked.sealed.len());
        all.keys.extend(acked.keys);
        all.sealed.extend(acked.sealed);

        agent.start_again();
        verify(&agent, &all);
    }
    let mut listed = std::collections::HashSet::new();
    let mut marker: Option<String> = None;
    loop {
        let page = match &marker {
            Some(m) => agent.ok("ListKeys", json!({ "Limit": 1000, "Marker": m })),
            None => agent.ok("ListKeys", json!({ "Limit": 1000 })),
        };
        listed.extend(
            page["Keys"].as_array().expect("Keys").iter().filter_map(|k| k["KeyId"].as_str().map(str::to_string)),
        );
        marker = page["NextMarker"].as_str().map(str::to_string);
        if marker.is_none() {
            break;
        }
    }
    let missing = all.keys.iter().filter(|k| !listed.contains(*k)).count();
    assert_eq!(missing, 0, "ListKeys omits {missing} acknowledged keys after the restarts");
}
