//! The systemd integration: the shipped units pass `systemd-analyze verify`, kmsd.service's
//! exposure (`systemd-analyze security`) stays at most 2.0 with each of its drop-ins, and kmsd
//! serves a socket passed by socket activation (LISTEN_FDS) and reports readiness and
//! shutdown through NOTIFY_SOCKET — with systemd's own `systemd-socket-activate`. The units
//! at work in a booted system: tests/tests/booted.rs.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kmsfs_common::client::AgentClient;
use kmsfs_tests::bin;
use serde_json::json;

fn unit(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd").join(name)
}

#[test]
fn shipped_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(unit("kmsd.service")).unwrap();
    for needed in [
        "Type=notify",
        "LimitCORE=0",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=kmsd",
        "RuntimeDirectory=kmsd",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "SystemCallFilter=@system-service @memlock",
        "CapabilityBoundingSet=",
    ] {
        assert!(service.lines().any(|l| l == needed), "kmsd.service lacks {needed}");
    }
    // Point ExecStart at the freshly built binary: verify checks that it is executable.
    let service = service.replace("/usr/local/bin/kmsd", bin("kmsd").to_str().unwrap());
    std::fs::write(dir.path().join("kmsd.service"), service).unwrap();
    std::fs::copy(unit("kmsd.socket"), dir.path().join("kmsd.socket")).unwrap();
    // The mount template, instantiated for /srv/data, with its config file in place.
    let template = std::fs::read_to_string(unit("kmsfs@.service")).unwrap();
    assert!(template.lines().any(|l| l == "Type=notify"), "kmsfs@.service waits for the mount");
    let template = template
        .replace("/usr/local/bin/kmsfs", bin("kmsfs").to_str().unwrap())
        .replace("/etc/kmsfs/%i.conf", dir.path().join("%i.conf").to_str().unwrap());
    std::fs::write(dir.path().join("kmsfs@.service"), template).unwrap();
    std::fs::write(dir.path().join("srv-data.conf"), "CIPHERDIR=/srv/.data.kmsfs\nOPTIONS=allow_other\n").unwrap();
    std::fs::copy(dir.path().join("kmsfs@.service"), dir.path().join("kmsfs@srv-data.service")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(dir.path().join("kmsd.socket"))
        .arg(dir.path().join("kmsd.service"))
        .arg(dir.path().join("kmsfs@srv-data.service"))
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    // verify exits 0 even for directives it ignores, so any complaint about our units fails.
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !complaints.contains(dir.path().to_str().unwrap()),
        "systemd-analyze verify: {complaints}"
    );
}

/// `systemd-analyze security --offline=yes`'s overall exposure of the unit file `unit` (with
/// the drop-ins in `unit.d/` beside it), from its last line:
/// `→ Overall exposure level for kmsd.service: 1.0 OK 🙂`.
fn exposure(unit: &std::path::Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let score = line.split(':').nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_default();
    score.parse().unwrap_or_else(|_| panic!("no score in {line:?}"))
}

#[test]
fn kmsd_service_exposure_is_at_most_2() {
    // The unit alone, then with each drop-in it ships (each opens something: a device, a
    // credential).
    let mut dropins: Vec<Option<String>> = vec![None];
    for entry in std::fs::read_dir(unit("kmsd.service.d")).unwrap() {
        dropins.push(Some(entry.unwrap().file_name().to_string_lossy().into_owned()));
    }
    assert!(dropins.len() >= 4, "the drop-ins: {dropins:?}");
    for dropin in dropins {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(unit("kmsd.service"), dir.path().join("kmsd.service")).unwrap();
        if let Some(name) = &dropin {
            std::fs::create_dir(dir.path().join("kmsd.service.d")).unwrap();
            std::fs::copy(unit("kmsd.service.d").join(name), dir.path().join("kmsd.service.d").join(name)).unwrap();
        }
        let score = exposure(&dir.path().join("kmsd.service"));
        eprintln!("kmsd.service with {dropin:?}: exposure {score}");
        assert!(score <= 2.0, "kmsd.service with drop-in {dropin:?}: exposure {score} > 2.0");
    }
}

#[test]
fn socket_activation_and_readiness_notification() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(&socket)
        // systemd-socket-activate passes only the variables it is told to.
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg(bin("kmsd"))
        .arg("--socket")
        .arg(dir.path().join("unused.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) runs");
    // systemd-socket-activate listens first and starts kmsd on the first connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the activation socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = AgentClient::connect(&socket).unwrap();
    let created = client.call("CreateKey", &json!({"Description": "activated"}));
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("kmsd sends READY=1");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let n = notify.recv(&mut buf).expect("kmsd sends STOPPING=1");
    let stopping = String::from_utf8_lossy(&buf[..n]).to_string();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(created.is_ok(), "CreateKey over the activated socket: {created:?}\n{stderr}");
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert!(status.success(), "kmsd exits cleanly on SIGTERM: {status}\n{stderr}");
    assert!(stderr.contains("using the socket passed by systemd"), "{stderr}");
    assert!(!dir.path().join("unused.sock").exists(), "with a passed socket kmsd binds none of its own");
}
