//! Two agents on two "hosts": real kmsd processes in two network namespaces joined by a
//! veth pair (`kmsfs_tests::netns`). boto3 in namespace A reaches B's `--listen-tcp` over
//! the veth with a SigV4-signed request, which B records as coming from A's address; the
//! test process, in the root namespace, cannot reach that address at all; when B's agent
//! stops, A's keeps serving, and B started again is back on its address. And the harness's
//! own promise: the namespaces (and whatever runs in them) are gone when a pair is dropped,
//! also by a panicking test.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use kmsfs_tests::netns::{NetnsPair, Side};
use kmsfs_tests::{b64, create_key, unb64, TestAgent, ROOT_USES_EVERYTHING};

const ACCESS_KEY_ID: &str = "AKIAKMSDNETNS0000001";
const SECRET: &str = "kmsd-netns-secret/0123456789abcdefghij";
const ACCOUNT: &str = "111122223333";
const PORT: u16 = 4566;

/// An agent in `side`'s namespace listening on its veth address; with an access key for
/// root if `access_key`.
fn agent(pair: &NetnsPair, side: Side, access_key: bool) -> TestAgent {
    let listen = SocketAddr::new(pair.ip(side), PORT).to_string();
    let keys = format!(
        r#"{{"AccessKeys": [{{"AccessKeyId": "{ACCESS_KEY_ID}", "SecretAccessKey": "{SECRET}", "Principal": "user/root"}}]}}"#
    );
    TestAgent::start_in_netns(
        pair.name(side),
        &["--listen-tcp", &listen, "--allow-remote-tcp", "--account-id", ACCOUNT],
        &[("users/root.json", ROOT_USES_EVERYTHING)],
        access_key.then_some(keys.as_str()),
    )
}

/// boto3, run inside namespace A: Encrypt under `key_id` at `endpoint` and Decrypt the
/// result there; prints the ciphertext (base64) and the plaintext that came back.
const BOTO3_ROUND_TRIP: &str = r#"
import base64, sys
import boto3
from botocore.config import Config
endpoint, key_id, access_key, secret = sys.argv[1:5]
kms = boto3.client("kms", endpoint_url=endpoint, region_name="local", aws_access_key_id=access_key,
                   aws_secret_access_key=secret, config=Config(retries={"max_attempts": 1}, connect_timeout=5))
blob = kms.encrypt(KeyId=key_id, Plaintext=b"across the veth")["CiphertextBlob"]
print(base64.b64encode(blob).decode())
print(kms.decrypt(CiphertextBlob=blob)["Plaintext"].decode())
"#;

/// The User-Agent of a request sent from the root namespace.
const ROOT_PROBE: &str = "kmsfs-test-from-the-root-namespace";

/// An unsigned ListKeys with `user_agent`: B refuses it, and records it.
fn unsigned_request(addr: SocketAddr, user_agent: &str) -> String {
    format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {user_agent}\r\nX-Amz-Target: TrentService.ListKeys\r\n\
         Content-Type: application/x-amz-json-1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
}

/// Sends [`unsigned_request`] to `addr` from the test process itself and waits up to half a
/// second for an answer. Whether the connection fails proves nothing: some sandboxes'
/// gateways accept every outbound connection; what counts is whether the agent saw it.
fn send_unsigned_from_root(addr: SocketAddr, user_agent: &str) {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.write_all(unsigned_request(addr, user_agent).as_bytes());
    let _ = stream.read(&mut [0; 512]);
}

/// Sends [`unsigned_request`] to `addr` from inside `from`'s namespace (bash's `/dev/tcp`)
/// and returns the answer's status line.
fn send_unsigned_from(pair: &NetnsPair, from: Side, addr: SocketAddr, user_agent: &str) -> String {
    let script = r#"exec 3<>"/dev/tcp/$0/$1" && printf %s "$2" >&3 && head -n1 <&3"#;
    let out = pair
        .command(from, "timeout")
        .args(["5", "bash", "-c", script, &addr.ip().to_string(), &addr.port().to_string()])
        .arg(unsigned_request(addr, user_agent))
        .output()
        .expect("run bash in a namespace");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The namespace `pid` is in, as `ip netns identify` names it.
fn netns_of(pid: u32) -> String {
    let out = Command::new("ip").args(["netns", "identify", &pid.to_string()]).output().expect("ip netns identify");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn boto3_on_host_a_reaches_host_b_over_the_veth_and_a_outlives_b() {
    let pair = NetnsPair::new();
    let a = agent(&pair, Side::A, false);
    let mut b = agent(&pair, Side::B, true);
    // `ip netns exec` execs kmsd, so kill/stop/SIGHUP reach kmsd itself, in its namespace.
    for (side, agent) in [(Side::A, &a), (Side::B, &b)] {
        let exe = std::fs::read_link(format!("/proc/{}/exe", agent.pid())).expect("agent's exe");
        assert_eq!(exe.file_name().and_then(|n| n.to_str()), Some("kmsd"), "{}", exe.display());
        assert_eq!(netns_of(agent.pid()), pair.name(side));
    }
    let b_addr = SocketAddr::new(pair.ip(Side::B), PORT);
    pair.wait_tcp(Side::A, b_addr);

    let key_id = create_key(&b);
    let out = pair
        .command(Side::A, "python3")
        .args(["-c", BOTO3_ROUND_TRIP, &format!("http://{b_addr}"), &key_id, ACCESS_KEY_ID, SECRET])
        .env_remove("AWS_PROFILE")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("run python3 in namespace A");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "boto3 in {} against {b_addr} failed ({}):\n{stdout}\n{}\n--- B's kmsd log ---\n{}",
        pair.name(Side::A),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.get(1), Some(&"across the veth"), "{stdout}");
    // The ciphertext is B's: B decrypts it on its socket too.
    let plain = b.ok("Decrypt", serde_json::json!({"CiphertextBlob": lines[0]}));
    assert_eq!(unb64(&plain["Plaintext"]), b"across the veth");
    // B saw the request come from A's end of the veth.
    let encrypts: Vec<_> = b.audit_events().into_iter().filter(|r| r["eventName"] == "Encrypt").collect();
    assert_eq!(encrypts.len(), 1, "{encrypts:#?}");
    assert_eq!(encrypts[0]["sourceIPAddress"], pair.ip(Side::A).to_string(), "{:#}", encrypts[0]);
    assert_eq!(encrypts[0]["userIdentity"]["accessKeyId"], ACCESS_KEY_ID, "{:#}", encrypts[0]);

    // The test process, in the root namespace, has no way to B's address: what it sends
    // there never reaches B, which records every request on TCP, refused ones too (as the
    // same request from A shows).
    let status = send_unsigned_from(&pair, Side::A, b_addr, "kmsfs-test-from-a");
    assert!(status.starts_with("HTTP/1.1 4"), "B did not refuse an unsigned request: {status:?}");
    send_unsigned_from_root(b_addr, ROOT_PROBE);
    let events = b.audit_events();
    assert!(events.iter().any(|r| r["userAgent"] == "kmsfs-test-from-a"), "{events:#?}");
    assert!(events.iter().all(|r| r["userAgent"] != ROOT_PROBE), "the root namespace reached B: {events:#?}");

    // B's agent stops: its port is gone from A's side, and A serves on as before.
    assert_eq!(b.stop(), Some(0), "B's kmsd did not exit cleanly:\n{}", b.log());
    assert!(!pair.can_connect(Side::A, b_addr), "{b_addr} still accepts connections after B's kmsd stopped");
    assert!(pair.can_connect(Side::B, SocketAddr::new(pair.ip(Side::A), PORT)), "A's listener went away with B");
    let a_key = create_key(&a);
    let sealed = a.ok("Encrypt", serde_json::json!({"KeyId": a_key, "Plaintext": b64(b"still here")}));
    let opened = a.ok("Decrypt", serde_json::json!({"CiphertextBlob": sealed["CiphertextBlob"]}));
    assert_eq!(unb64(&opened["Plaintext"]), b"still here");

    // Started again, B is back in its namespace, on its address.
    b.start_again();
    assert_eq!(netns_of(b.pid()), pair.name(Side::B));
    pair.wait_tcp(Side::A, b_addr);
}

#[test]
fn a_pair_and_what_runs_in_it_are_gone_when_a_panicking_test_drops_it() {
    let namespaces = || {
        let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        listed.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect::<Vec<_>>()
    };
    let (mut names, mut addrs, mut listed_before, mut sleeper) = (Vec::new(), Vec::new(), Vec::new(), None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pairs = [NetnsPair::new(), NetnsPair::new()];
        for pair in &pairs {
            for side in [Side::A, Side::B] {
                names.push(pair.name(side).to_string());
                addrs.push(pair.ip(side));
            }
        }
        sleeper = Some(pairs[0].command(Side::B, "sleep").arg("600").stdin(Stdio::null()).spawn().expect("sleep"));
        listed_before = namespaces();
        panic!("a test fails while its namespaces exist");
    }));
    assert!(result.is_err());
    let mut distinct = addrs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "two pairs of one process share an address: {addrs:?}");
    assert!(names.iter().all(|n| listed_before.contains(n)), "{names:?} were not all there: {listed_before:?}");
    let listed_after = namespaces();
    assert!(names.iter().all(|n| !listed_after.contains(n)), "{names:?} left behind: {listed_after:?}");
    let mut sleeper = sleeper.expect("sleeper started");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sleeper.try_wait().expect("wait for sleep").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
            panic!("the process in the dropped namespace was not ended");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
