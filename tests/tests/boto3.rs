//! boto3 as an independent judge of kmsd's wire format: AWS's own SDK serializes every
//! request and parses every reply of `tests/python/boto3_client.py`, which covers the key
//! lifecycle, aliases, tags, the cryptographic operations and the error codes, and holds
//! each raw reply to the service model botocore ships. A shape or error name that only
//! kmsfs's own client accepts fails here.
//!
//! boto3 is a test dependency (the README's test command installs it): when it is missing
//! the test fails rather than skipping, so a green run always means boto3 was consulted.

use std::path::Path;
use std::process::Command;

use kmsfs_tests::TestAgent;

#[test]
fn boto3_drives_the_agent() {
    let probe = Command::new("python3").args(["-c", "import boto3"]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "boto3 is not importable by python3, so kmsd cannot be checked against AWS's SDK.\n\
             Run the README's test command (it installs boto3: `python3 -m pip install boto3`).\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run python3 ({e}); the boto3 check needs python3 with boto3 installed"),
    }

    let agent = TestAgent::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/boto3_client.py");
    let out = Command::new("python3").arg(&script).arg(agent.socket()).output().expect("run boto3_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}\n--- kmsd log ---\n{}",
        script.display(),
        out.status,
        agent.log()
    );
    assert!(stdout.contains(" passed, 0 failed"), "no summary line from the boto3 check:\n{stdout}\n{stderr}");
    println!("{stdout}");
}
