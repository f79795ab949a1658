//! kmsd's extensions on the socket: `Kmsfs.WatchKeyEvents` pushes key state changes to
//! connected clients at once (kmsfs uses it to drop cached data keys of a disabled key),
//! and `Kmsfs.GetAgentStats` counts requests per action (tests count Decrypt calls).

use std::time::{Duration, Instant};

use kmsfs_common::client::KeyEventStream;
use kmsfs_tests::{create_key, TestAgent};
use serde_json::{json, Value};

fn next_change(events: &mut KeyEventStream) -> Value {
    loop {
        let event = events.next_event().expect("event stream").expect("stream still open");
        if event["Event"] != "Heartbeat" {
            return event;
        }
    }
}

#[test]
fn key_state_changes_are_pushed_to_watchers() {
    let mut agent = TestAgent::start();
    let key = create_key(&agent);
    let mut events = KeyEventStream::subscribe(&agent.socket(), Some(Duration::from_secs(30))).unwrap();
    let mut second = KeyEventStream::subscribe(&agent.socket(), Some(Duration::from_secs(30))).unwrap();
    assert_eq!(next_change(&mut events)["Event"], "Subscribed");
    assert_eq!(next_change(&mut second)["Event"], "Subscribed");

    let expect = |events: &mut KeyEventStream, state: &str| {
        let started = Instant::now();
        let e = next_change(events);
        assert!(started.elapsed() < Duration::from_secs(1), "events arrive within a second");
        assert_eq!(e["Event"], "KeyStateChanged");
        assert_eq!(e["KeyId"], key.as_str());
        assert!(e["KeyArn"].as_str().unwrap().ends_with(&key));
        assert_eq!(e["KeyState"], state);
    };
    agent.ok("DisableKey", json!({"KeyId": key}));
    expect(&mut events, "Disabled");
    expect(&mut second, "Disabled");
    agent.ok("DisableKey", json!({"KeyId": key})); // no change, no event
    agent.ok("EnableKey", json!({"KeyId": key}));
    expect(&mut events, "Enabled");
    agent.ok("UpdateKeyDescription", json!({"KeyId": key, "Description": "no state change"}));
    agent.ok("ScheduleKeyDeletion", json!({"KeyId": key, "PendingWindowInDays": 7}));
    expect(&mut events, "PendingDeletion");
    agent.ok("CancelKeyDeletion", json!({"KeyId": key}));
    expect(&mut events, "Disabled");
    drop(second);

    // Stopping the agent ends the stream instead of hanging the shutdown.
    let started = Instant::now();
    assert_eq!(agent.stop(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10), "a watcher does not hold up shutdown");
    loop {
        match events.next_event() {
            Ok(Some(e)) if e["Event"] == "Heartbeat" => continue,
            Ok(None) | Err(_) => break,
            Ok(Some(e)) => panic!("unexpected event after stop: {e}"),
        }
    }
}

#[test]
fn agent_stats_count_requests_per_action() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let blob =
        agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": kmsfs_tests::b64(b"x")}))["CiphertextBlob"].clone();
    for _ in 0..3 {
        agent.ok("Decrypt", json!({"CiphertextBlob": blob}));
    }
    let _ = agent.call("Decrypt", json!({"CiphertextBlob": kmsfs_tests::b64(b"garbage")}));
    let stats = agent.ok("Kmsfs.GetAgentStats", json!({}));
    assert_eq!(stats["Requests"]["Decrypt"], json!({"Ok": 3, "Errors": 1}));
    assert_eq!(stats["Requests"]["Encrypt"], json!({"Ok": 1, "Errors": 0}));
    assert_eq!(stats["Requests"]["CreateKey"], json!({"Ok": 1, "Errors": 0}));
    assert!(stats["UptimeSeconds"].as_f64().unwrap() > 0.0);
}
