//! Unmodified AWS SDKs against `kmsd --listen-tcp`: boto3, the aws CLI and the AWS
//! Encryption SDK sign with SigV4 using an access key from the agent's `access-keys.json`
//! (`tests/python/sdk_clients.py`): KMS calls, STS GetCallerIdentity, a full envelope
//! encrypt/decrypt round trip, and refusals of a wrong secret, an unknown access key, an
//! expired signature and an unsigned request with AWS's error codes. Plus the listener's own
//! rules: non-loopback addresses need `--allow-remote-tcp`, an access key file others can
//! read is refused, and SIGHUP reloads the keys.
//!
//! The SDKs are test dependencies (the README's test command installs them): when one is
//! missing the test fails rather than skipping.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use kmsfs_tests::{bin, TestAgent, ROOT_USES_EVERYTHING};

const KEY_ID: &str = "AKIAKMSDTEST00000001";
const SECRET: &str = "kmsd-test-secret/0123456789abcdefghij";
const ACCOUNT: &str = "111122223333";

fn access_keys(id: &str, secret: &str) -> String {
    format!(r#"{{"AccessKeys": [{{"AccessKeyId": "{id}", "SecretAccessKey": "{secret}", "Principal": "user/root"}}]}}"#)
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn require_sdks() {
    let probe = Command::new("python3")
        .args(["-c", "import boto3, aws_encryption_sdk; import shutil, sys; sys.exit(shutil.which('aws') is None)"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "boto3, aws-encryption-sdk or the aws CLI is missing, so kmsd's TCP listener cannot be checked \
             against AWS's SDKs.\nRun the README's test command, `scripts/test` (its scripts/install-test-deps \
             runs `python3 -m pip install boto3 awscli aws-encryption-sdk`).\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => {
            panic!("cannot run python3 ({e}); the SDK check needs python3 with boto3, awscli, aws-encryption-sdk")
        }
    }
}

fn start(port: u16) -> TestAgent {
    let listen = format!("127.0.0.1:{port}");
    TestAgent::start_with_access_keys(
        &["--listen-tcp", &listen, "--account-id", ACCOUNT],
        &[("users/root.json", ROOT_USES_EVERYTHING)],
        &access_keys(KEY_ID, SECRET),
    )
}

fn run_sdk_clients(agent: &TestAgent, port: u16, key_id: &str, secret: &str) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/sdk_clients.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}"))
        .args([key_id, secret, &format!("arn:aws:iam::{ACCOUNT}:user/root")])
        .env_remove("AWS_PROFILE")
        .output()
        .expect("run sdk_clients.py");
    let text = format!(
        "{}\n{}\n--- kmsd log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    (out.status.success(), text)
}

#[test]
fn aws_sdks_work_against_the_tcp_listener() {
    require_sdks();
    let port = free_port();
    let agent = start(port);
    let (ok, text) = run_sdk_clients(&agent, port, KEY_ID, SECRET);
    assert!(ok, "sdk_clients.py failed:\n{text}");
    assert!(text.contains("sdk: 10 passed, 0 failed"), "no complete summary line:\n{text}");
    assert!(!agent.log().contains(SECRET), "the secret access key appears in kmsd's log");
    println!("{text}");
}

#[test]
fn sighup_reloads_access_keys_and_a_bad_file_keeps_the_old_ones() {
    use std::os::unix::fs::PermissionsExt;
    require_sdks();
    let port = free_port();
    let agent = start(port);
    let path = agent.config_dir().join("access-keys.json");
    let hup_and_wait = |needle: &str| {
        let before = agent.log().matches(needle).count();
        let _ = Command::new("kill").arg("-HUP").arg(agent.pid().to_string()).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while agent.log().matches(needle).count() == before {
            assert!(std::time::Instant::now() < deadline, "no '{needle}' after SIGHUP:\n{}", agent.log());
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let sts = |key_id: &str, secret: &str| {
        let code = format!(
            "import boto3,sys\nc=boto3.client('sts',endpoint_url='http://127.0.0.1:{port}',region_name='local',\
             aws_access_key_id='{key_id}',aws_secret_access_key='{secret}')\n\
             try:\n  print(c.get_caller_identity()['Arn'])\nexcept Exception as e:\n  print(e.response['Error']['Code'])"
        );
        let out = Command::new("python3").args(["-c", &code]).output().expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(sts(KEY_ID, SECRET), format!("arn:aws:iam::{ACCOUNT}:user/root"));

    // A world-readable file is refused and the old key keeps working.
    let new_id = "AKIAKMSDTEST00000002";
    std::fs::write(&path, access_keys(new_id, SECRET)).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    hup_and_wait("access keys NOT reloaded");
    assert!(agent.log().contains("chmod 600"), "{}", agent.log());
    assert_eq!(sts(KEY_ID, SECRET), format!("arn:aws:iam::{ACCOUNT}:user/root"));
    assert_eq!(sts(new_id, SECRET), "InvalidClientTokenId");

    // Once private, the new file replaces the old keys.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    hup_and_wait("access keys reloaded");
    assert_eq!(sts(new_id, SECRET), format!("arn:aws:iam::{ACCOUNT}:user/root"));
    assert_eq!(sts(KEY_ID, SECRET), "InvalidClientTokenId");
}

#[test]
fn remote_addresses_and_readable_key_files_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kmsd = |config: &Path, listen: &str, extra: &[&str]| {
        Command::new(bin("kmsd"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--config-dir")
            .arg(config)
            .args(["--listen-tcp", listen])
            .args(extra)
            .output()
            .expect("run kmsd")
    };
    let out = kmsd(&dir.path().join("none"), "0.0.0.0:0", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--allow-remote-tcp") && stderr.contains("no TLS"), "{stderr}");

    let config = dir.path().join("config");
    std::fs::create_dir(&config).expect("config");
    std::fs::write(config.join("access-keys.json"), access_keys(KEY_ID, SECRET)).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(config.join("access-keys.json"), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
    }
    let out = kmsd(&config, "127.0.0.1:0", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("mode 0640") && stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains(SECRET), "{stderr}");
}
