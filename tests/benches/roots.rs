//! GenerateDataKey (AES_256) through the real `kmsd` under each root of trust, side by side
//! in one run: ops/s, p50 and p99 with 1 and 16 concurrent clients (the client threads and
//! latency recording of `agent.rs`, in `common`), and each root's ops/s as a ratio of the
//! `file` root's at the same concurrency.
//!
//! - `file`: the embedded default, a root key in a 0600 file.
//! - `tpm2`: `kmsd init --root-of-trust tpm2` against a swtpm this benchmark starts. The TPM
//!   is used only at start, to unseal the root key; after that a KMS key's material is
//!   unwrapped in kmsd's memory exactly as under `file`, so the TPM is not on the request
//!   path and this row should match `file` within noise.
//! - `pkcs11`: `kmsd init --root-of-trust pkcs11` on a SoftHSM2 token: every key's material
//!   is a non-extractable object in the token, and every GenerateDataKey wraps the data key
//!   with AES-GCM computed by the token, so the token is on the request path.
//! - `custom key store`: a `file`-root kmsd with a custom key store (CreateCustomKeyStore,
//!   ConnectCustomKeyStore) on another SoftHSM2 token, and a key in it (CreateKey
//!   Origin=AWS_CLOUDHSM): as `pkcs11`, the token computes every wrap.
//!
//! Every kmsd runs as deployed (its default log level) but with `--audit off`, so that the
//! audit trail's fsync, which `agent.rs` measures, does not hide what the roots cost;
//! `KMSFS_BENCH_AUDIT=on` measures with the audit trail instead. SoftHSM2 is a software
//! token: a hardware HSM is slower per operation, and its figures are not these.
//!
//! Run with the release binaries (cargo bench starts the `kmsd` beside it), with swtpm and
//! SoftHSM2 installed (`scripts/install-test-deps`):
//!
//! ```text
//! cargo build --release --bins && cargo bench -p kmsfs-tests --bench roots
//! ```
//!
//! `KMSFS_BENCH_SECS` sets the measured duration per cell (default 3 s).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{micros, ratio, Measured, Operation, Timing};
use kmsfs_tests::softhsm::SoftHsm;
use kmsfs_tests::swtpm::Swtpm;
use kmsfs_tests::TestAgent;
use serde_json::json;

const CONCURRENCY: [usize; 2] = [1, 16];
/// The user PIN of the benchmark's tokens (a key store password is 7 to 32 characters).
const TOKEN_PIN: &str = "bench-pin-1234";
const CLUSTER: &str = "cluster-benchkeystore";

/// A 0600 file holding `secret`, for kmsd's `--…-file` flags.
fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod secret file");
    path
}

/// An agent as deployed ([`TestAgent::start_quiet_in`]) whose state directory is made
/// again by `kmsd init` with `init` flags. The harness starts quiet agents at once, on a
/// new `file` directory; that one is stopped and removed first.
fn initialized(parent: &Path, args: &[&str], hsm: Option<&SoftHsm>, init: &[&str]) -> TestAgent {
    let mut agent = TestAgent::start_quiet_in(parent, args);
    agent.stop();
    std::fs::remove_dir_all(agent.state_dir()).expect("remove the first start's state directory");
    if let Some(hsm) = hsm {
        set_softhsm_env(&mut agent, hsm);
    }
    let out = agent.kmsd().arg("init").args(init).output().expect("run kmsd init");
    assert!(out.status.success(), "kmsd init {init:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    agent.start_again();
    agent
}

/// Points the agent's SoftHSM2 at `hsm` (from its next start on).
fn set_softhsm_env(agent: &mut TestAgent, hsm: &SoftHsm) {
    let (key, conf) = hsm.env();
    agent.set_env(key, conf.to_str().expect("UTF-8 path"));
}

/// A key of `agent` created with `request`, and the GenerateDataKey to measure under it.
fn data_key_under(agent: &TestAgent, request: serde_json::Value) -> Operation {
    let created = agent.ok("CreateKey", request);
    let key_id = created["KeyMetadata"]["KeyId"].as_str().expect("KeyId");
    let operation = Operation::new("GenerateDataKey", &json!({ "KeyId": key_id, "KeySpec": "AES_256" }));
    // Once before measuring, so that a root that does not work stops the run here, clearly.
    agent.ok("GenerateDataKey", json!({ "KeyId": key_id, "KeySpec": "AES_256" }));
    operation
}

/// One root of trust under test: its agent and the request measured there.
struct Root {
    name: &'static str,
    agent: TestAgent,
    operation: Operation,
}

fn main() {
    let timing = Timing::from_env();
    let audit = match std::env::var("KMSFS_BENCH_AUDIT").as_deref() {
        Ok("on") => "on",
        Ok("off") | Err(_) => "off",
        Ok(other) => {
            eprintln!("KMSFS_BENCH_AUDIT must be on or off, not {other:?}");
            std::process::exit(2)
        }
    };
    timing.print_preamble();
    println!("GenerateDataKey (AES_256), kmsd --audit {audit}\n");

    let dir = tempfile::Builder::new().prefix("kmsfs-bench-roots-").tempdir().expect("tempdir");
    let parent = dir.path();
    let args = ["--audit", audit];
    let mut roots = Vec::new();

    let file = TestAgent::start_quiet_in(parent, &args);
    roots.push(Root { name: "file", operation: data_key_under(&file, json!({})), agent: file });

    let tpm = Swtpm::start();
    let recovery = secret_file(parent, "recovery-passphrase", "bench recovery passphrase");
    let tcti = tpm.tcti();
    let init = ["--root-of-trust", "tpm2", "--tpm-tcti", &tcti, "--recovery-passphrase-file"];
    let tpm2 = initialized(parent, &args, None, &[&init[..], &[recovery.to_str().expect("UTF-8 path")]].concat());
    roots.push(Root { name: "tpm2", operation: data_key_under(&tpm2, json!({})), agent: tpm2 });

    let hsm = SoftHsm::new();
    hsm.init_token("bench-root", TOKEN_PIN);
    hsm.init_token("bench-store", TOKEN_PIN);
    let pin = hsm.pin_file("token-pin", TOKEN_PIN);
    let module = hsm.module().to_str().expect("UTF-8 path").to_string();
    let init = ["--root-of-trust", "pkcs11", "--pkcs11-module", &module, "--pkcs11-token-label", "bench-root"];
    let init = [&init[..], &["--pkcs11-pin-file", pin.to_str().expect("UTF-8 path")]].concat();
    let pkcs11 = initialized(parent, &args, Some(&hsm), &init);
    roots.push(Root { name: "pkcs11", operation: data_key_under(&pkcs11, json!({})), agent: pkcs11 });

    let mut store_agent = TestAgent::start_quiet_in(parent, &args);
    let clusters = json!({ "clusters": { CLUSTER: { "module": module, "token_label": "bench-store" } } });
    std::fs::write(store_agent.config_dir().join("hsm-clusters.json"), clusters.to_string()).expect("clusters");
    set_softhsm_env(&mut store_agent, &hsm);
    store_agent.restart();
    let created = store_agent.ok(
        "CreateCustomKeyStore",
        json!({ "CustomKeyStoreName": "bench", "CloudHsmClusterId": CLUSTER, "KeyStorePassword": TOKEN_PIN }),
    );
    let store = created["CustomKeyStoreId"].as_str().expect("CustomKeyStoreId").to_string();
    store_agent.ok("ConnectCustomKeyStore", json!({ "CustomKeyStoreId": store }));
    let state = store_agent.ok("DescribeCustomKeyStores", json!({ "CustomKeyStoreId": store }));
    let entry = &state["CustomKeyStores"][0];
    assert_eq!(entry["ConnectionState"], "CONNECTED", "the benchmark's key store did not connect: {entry}");
    let operation = data_key_under(&store_agent, json!({ "Origin": "AWS_CLOUDHSM", "CustomKeyStoreId": store }));
    roots.push(Root { name: "custom key store", operation, agent: store_agent });

    // What each kmsd says it runs on, so that the rows are what they are named.
    for root in &roots {
        let log = root.agent.log();
        let field = |event: &str, name: &str| {
            let line = log.lines().rev().find(|l| l.contains(event))?;
            Some(line.split_once(&format!("{name}="))?.1.to_string())
        };
        let own = field("state loaded", "root").unwrap_or_else(|| "(not in its log)".into());
        match field("custom key store connected", "token") {
            Some(token) => println!("{:<18} kmsd on {own}; the key in a custom key store on {token}", root.name),
            None => println!("{:<18} kmsd on {own}", root.name),
        }
    }
    println!();
    println!(
        "{:<18} {:>7} {:>10} {:>9} {:>9} {:>14}",
        "root of trust", "clients", "ops/s", "p50 µs", "p99 µs", "ops/s vs file"
    );
    for clients in CONCURRENCY {
        let mut file_ops: Option<f64> = None;
        for root in &roots {
            let m: Measured = common::run(&root.agent.socket(), &root.operation, clients, timing);
            let reference = *file_ops.get_or_insert(m.ops_per_sec);
            println!(
                "{:<18} {:>7} {:>10.0} {:>9.1} {:>9.1} {:>14.2}",
                root.name,
                clients,
                m.ops_per_sec,
                micros(m.p50),
                micros(m.p99),
                ratio(m.ops_per_sec, reference)
            );
        }
    }
    // The agents stop before the swtpm and the tokens they use.
    drop(roots);
    drop((tpm, hsm));
}
