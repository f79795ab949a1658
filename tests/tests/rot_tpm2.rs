//! The `tpm2` root of trust end to end: a real kmsd whose root key is sealed by a software
//! TPM (swtpm), through `kmsd init --root-of-trust tpm2`, restarts of kmsd and of the TPM,
//! the refusals an operator meets (another or wiped TPM, a changed PCR, a wrong
//! authorization value, an unreachable TPM) and `kmsd reseal` with the recovery passphrase,
//! which brings every key back; and the move of a `file` state directory into the TPM.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kmsfs_tests::swtpm::Swtpm;
use kmsfs_tests::{b64, create_key, unb64, TestAgent};
use serde_json::{json, Value};

const PASSPHRASE: &str = "correct horse battery staple";
const RESEAL_HINT: &str = "kmsd reseal --recovery-passphrase-file FILE";

/// Ciphertexts made by an agent and the plaintexts they must decrypt to.
struct Made {
    key_id: String,
    blobs: Vec<(Value, Vec<u8>)>,
}

/// Creates a key, encrypts under it and generates a data key (the data key's blob and its
/// plaintext kept), as a service and a mounted volume would.
fn make_keys(agent: &TestAgent) -> Made {
    ciphertexts_under(agent, create_key(agent))
}

/// Ciphertexts under `key_id`'s current material: two Encrypts and a GenerateDataKey.
fn ciphertexts_under(agent: &TestAgent, key_id: String) -> Made {
    let mut blobs = Vec::new();
    for plaintext in [&b"database password"[..], b"api token"] {
        let out = agent.ok("Encrypt", json!({"KeyId": key_id, "Plaintext": b64(plaintext)}));
        blobs.push((out["CiphertextBlob"].clone(), plaintext.to_vec()));
    }
    let data_key = agent.ok("GenerateDataKey", json!({"KeyId": key_id, "KeySpec": "AES_256"}));
    blobs.push((data_key["CiphertextBlob"].clone(), unb64(&data_key["Plaintext"])));
    Made { key_id, blobs }
}

/// Every ciphertext still decrypts to its plaintext, and the key still encrypts.
fn assert_all_decrypt(agent: &TestAgent, made: &Made) {
    for (blob, plaintext) in &made.blobs {
        let out = agent.ok("Decrypt", json!({"CiphertextBlob": blob}));
        assert_eq!(&unb64(&out["Plaintext"]), plaintext);
        assert!(out["KeyId"].as_str().unwrap().ends_with(&made.key_id));
    }
    agent.ok("Encrypt", json!({"KeyId": made.key_id, "Plaintext": b64(b"still usable")}));
}

/// Writes `text` to a file beside the agent's directories and returns its path.
fn secret_file(agent: &TestAgent, name: &str, text: &str) -> PathBuf {
    let path = agent.dir().join(name);
    std::fs::write(&path, format!("{text}\n")).expect("write secret file");
    path
}

/// Runs a `kmsd` subcommand of `agent` (`init …`, `reseal …`) to completion.
fn kmsd(agent: &TestAgent, args: &[&str]) -> Output {
    agent.kmsd().args(args).stdin(Stdio::null()).output().expect("run kmsd")
}

fn succeeds(agent: &TestAgent, args: &[&str]) -> String {
    let out = kmsd(agent, args);
    assert!(out.status.success(), "kmsd {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn fails(agent: &TestAgent, args: &[&str]) -> String {
    let out = kmsd(agent, args);
    assert!(!out.status.success(), "kmsd {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A state directory sealed to `tpm` (bound to `pcrs` if any), with its recovery passphrase
/// file; nothing running. kmsd is started with `--tpm-tcti` so that a TPM restarted on other
/// ports is still found.
fn sealed_agent(tpm: &Swtpm, pcrs: Option<&str>) -> (TestAgent, PathBuf) {
    let agent = TestAgent::prepared(&["--tpm-tcti", &tpm.tcti()]);
    let recovery = secret_file(&agent, "recovery-passphrase", PASSPHRASE);
    let recovery = recovery.to_str().unwrap();
    let tcti = tpm.tcti();
    let mut args = vec!["init", "--root-of-trust", "tpm2", "--tpm-tcti", &tcti, "--recovery-passphrase-file", recovery];
    if let Some(pcrs) = pcrs {
        args.extend(["--tpm-pcrs", pcrs]);
    }
    succeeds(&agent, &args);
    let path = PathBuf::from(recovery);
    (agent, path)
}

fn tcti_args(tpm: &Swtpm) -> Vec<String> {
    vec!["--tpm-tcti".into(), tpm.tcti()]
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The names of the files in a state directory.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn keys_survive_restarts_of_kmsd_and_reboots_of_the_tpm() {
    let mut tpm = Swtpm::start();
    let (mut agent, _) = sealed_agent(&tpm, Some("7"));
    let files = files_in(&agent.state_dir());
    assert!(files.contains(&"root.tpm".into()) && files.contains(&"root.recovery".into()), "{files:?}");
    assert!(!files.contains(&"root.key".into()), "a sealed state directory has no root key file: {files:?}");
    agent.start_again();
    assert!(agent.log().contains(&format!("tpm2 ({}, PCRs 7)", tpm.tcti())), "{}", agent.log());
    let made = make_keys(&agent);
    assert_all_decrypt(&agent, &made);

    agent.restart();
    assert_all_decrypt(&agent, &made);

    // Without --tpm-tcti, the TCTI recorded at init.
    agent.stop();
    agent.set_args(&[]);
    agent.start_again();
    assert_all_decrypt(&agent, &made);

    // A reboot resets PCR 7 to the value it was sealed to.
    agent.stop();
    tpm.restart();
    agent.set_args(&as_strs(&tcti_args(&tpm)));
    agent.start_again();
    assert_all_decrypt(&agent, &made);
    assert!(!files_in(&agent.state_dir()).contains(&"root.key".into()));
}

#[test]
fn another_tpm_is_refused_until_resealed_with_the_recovery_passphrase() {
    let mut tpm = Swtpm::start();
    let (mut agent, recovery) = sealed_agent(&tpm, None);
    agent.start_again();
    let made = make_keys(&agent);
    agent.stop();

    // The TPM is cleared, or the disk moved to another machine: new seeds.
    tpm.replace();
    let tcti = tcti_args(&tpm);
    let refused = agent.start_refused(&as_strs(&tcti));
    assert!(refused.contains("sealed by another TPM, or this TPM was cleared"), "{refused}");
    assert!(refused.contains(RESEAL_HINT), "{refused}");

    // A wrong recovery passphrase changes nothing.
    let sealed_before = std::fs::read(agent.state_dir().join("root.tpm")).unwrap();
    let wrong = secret_file(&agent, "wrong-passphrase", "incorrect horse battery staple");
    let mut reseal = vec!["reseal", "--recovery-passphrase-file", wrong.to_str().unwrap(), "--tpm-tcti", &tcti[1]];
    let refused = fails(&agent, &reseal);
    assert!(refused.contains("recovery passphrase does not open"), "{refused}");
    assert_eq!(std::fs::read(agent.state_dir().join("root.tpm")).unwrap(), sealed_before, "root.tpm changed");
    assert!(agent.start_refused(&as_strs(&tcti)).contains("another TPM"));

    reseal[2] = recovery.to_str().unwrap();
    succeeds(&agent, &reseal);
    agent.set_args(&as_strs(&tcti));
    agent.start_again();
    assert_all_decrypt(&agent, &made);
    let more = make_keys(&agent);
    agent.restart();
    assert_all_decrypt(&agent, &made);
    assert_all_decrypt(&agent, &more);
}

#[test]
fn a_changed_pcr_is_named_and_reseal_binds_its_new_value() {
    let mut tpm = Swtpm::start();
    let (mut agent, recovery) = sealed_agent(&tpm, Some("0,7"));
    agent.start_again();
    let made = make_keys(&agent);
    agent.stop();

    // The bootloader was updated.
    tpm.extend_pcr(7);
    let tcti = tcti_args(&tpm);
    let refused = agent.start_refused(&as_strs(&tcti));
    assert!(refused.contains("PCR 7 has changed"), "{refused}");
    assert!(!refused.contains("PCR 0"), "PCR 0 did not change: {refused}");
    assert!(refused.contains(RESEAL_HINT) && refused.contains("Secure Boot"), "{refused}");

    succeeds(&agent, &["reseal", "--recovery-passphrase-file", recovery.to_str().unwrap()]);
    agent.start_again();
    assert!(agent.log().contains("PCRs 0,7"), "reseal keeps the PCRs recorded at init: {}", agent.log());
    assert_all_decrypt(&agent, &made);

    // Bound to the new value: after a reboot PCR 7 is back to zero, which no longer unseals.
    agent.stop();
    tpm.restart();
    let tcti = tcti_args(&tpm);
    assert!(agent.start_refused(&as_strs(&tcti)).contains("PCR 7 has changed"));
    // Resealed without PCRs, no boot change matters any more.
    let tcti_value = tpm.tcti();
    succeeds(
        &agent,
        &[
            "reseal",
            "--recovery-passphrase-file",
            recovery.to_str().unwrap(),
            "--tpm-tcti",
            &tcti_value,
            "--tpm-pcrs",
            "none",
        ],
    );
    tpm.extend_pcr(7);
    agent.set_args(&as_strs(&tcti));
    agent.start_again();
    assert!(agent.log().contains("no PCR policy"), "{}", agent.log());
    assert_all_decrypt(&agent, &made);
}

#[test]
fn the_authorization_value_must_be_the_one_sealed_with() {
    let tpm = Swtpm::start();
    let mut agent = TestAgent::prepared(&[]);
    let recovery = secret_file(&agent, "recovery-passphrase", PASSPHRASE);
    let auth = secret_file(&agent, "tpm-auth", "0f1e2d3c4b5a69788796a5b4c3d2e1f0");
    let wrong = secret_file(&agent, "wrong-auth", "ffffffffffffffffffffffffffffffff");
    let tcti = tpm.tcti();
    succeeds(
        &agent,
        &[
            "init",
            "--root-of-trust",
            "tpm2",
            "--tpm-tcti",
            &tcti,
            "--tpm-pcrs",
            "7",
            "--tpm-auth-file",
            auth.to_str().unwrap(),
            "--recovery-passphrase-file",
            recovery.to_str().unwrap(),
        ],
    );
    // The file given at init is used by default.
    agent.start_again();
    let made = make_keys(&agent);
    agent.stop();
    for _ in 0..5 {
        // More tries than a TPM's lockout threshold: the sealed object is exempt from it.
        let refused = agent.start_refused(&["--tpm-auth-file", wrong.to_str().unwrap()]);
        assert!(refused.contains("refused the authorization value"), "{refused}");
    }
    agent.set_args(&["--tpm-auth-file", auth.to_str().unwrap()]);
    agent.start_again();
    assert_all_decrypt(&agent, &made);
}

#[test]
fn an_unreachable_tpm_is_named() {
    let tpm = Swtpm::start();
    let (agent, _) = sealed_agent(&tpm, None);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcti = format!("swtpm:host=127.0.0.1,port={closed}");
    let refused = agent.start_refused(&["--tpm-tcti", &tcti]);
    assert!(refused.contains(&format!("cannot reach the TPM through TCTI '{tcti}'")), "{refused}");
    let refused = agent.start_refused(&["--tpm-tcti", "device:/nonexistent/tpmrm0"]);
    assert!(refused.contains("device:/nonexistent/tpmrm0"), "{refused}");
}

#[test]
fn a_sealed_state_directory_is_useless_without_its_tpm() {
    let tpm = Swtpm::start();
    let (mut agent, _) = sealed_agent(&tpm, None);
    agent.start_again();
    let made = make_keys(&agent);
    agent.stop();
    let files = files_in(&agent.state_dir());
    assert!(!files.iter().any(|f| f == "root.key" || f == "root.kdf"), "{files:?}");

    // The whole state directory, copied to a machine with another TPM.
    let other_tpm = Swtpm::start();
    let copy = TestAgent::prepared(&[]);
    let status = Command::new("cp").arg("-a").arg(agent.state_dir()).arg(copy.dir()).status().expect("cp");
    assert!(status.success());
    let refused = copy.start_refused(&["--tpm-tcti", &other_tpm.tcti()]);
    assert!(refused.contains("sealed by another TPM"), "{refused}");

    // The original still opens on its own TPM.
    agent.start_again();
    assert_all_decrypt(&agent, &made);
}

#[test]
fn a_file_state_directory_moves_into_the_tpm_with_every_key() {
    let tpm = Swtpm::start();
    let mut agent = TestAgent::start();
    assert!(agent.state_dir().join("root.key").exists());
    let made = make_keys(&agent);
    // A second version of the key's material: older ciphertexts keep the first.
    agent.ok("RotateKeyOnDemand", json!({"KeyId": made.key_id}));
    let after_rotation = ciphertexts_under(&agent, made.key_id.clone());
    let other_key = make_keys(&agent);
    agent.stop();

    let recovery = secret_file(&agent, "recovery-passphrase", PASSPHRASE);
    let tcti = tpm.tcti();
    let args = [
        "reseal",
        "--root-of-trust",
        "tpm2",
        "--recovery-passphrase-file",
        recovery.to_str().unwrap(),
        "--tpm-tcti",
        &tcti,
        "--tpm-pcrs",
        "7",
    ];
    succeeds(&agent, &args);
    let files = files_in(&agent.state_dir());
    assert!(!files.contains(&"root.key".into()), "root.key is gone after the move: {files:?}");
    assert!(files.contains(&"root.tpm".into()) && files.contains(&"root.recovery".into()), "{files:?}");

    // The TCTI recorded by the move.
    agent.start_again();
    assert!(agent.log().contains(&format!("tpm2 ({tcti}, PCRs 7)")), "{}", agent.log());
    assert_all_decrypt(&agent, &made);
    assert_all_decrypt(&agent, &after_rotation);
    assert_all_decrypt(&agent, &other_key);
    agent.restart();
    assert_all_decrypt(&agent, &made);

    // Moved once; again it is a tpm2 reseal, which the passphrase given at the move opens.
    agent.stop();
    tpm.extend_pcr(7);
    assert!(agent.start_refused::<&str>(&[]).contains("PCR 7 has changed"));
    succeeds(&agent, &["reseal", "--recovery-passphrase-file", recovery.to_str().unwrap()]);
    agent.start_again();
    assert_all_decrypt(&agent, &made);
    assert_all_decrypt(&agent, &after_rotation);
}
