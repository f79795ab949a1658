//! Asymmetric keys through the real `kmsd` over its socket: Sign and Verify with
//! ECC_NIST_P256 (ECDSA_SHA_256) and RSA_2048 (RSASSA_PSS_SHA_256), and RSAES_OAEP_SHA_256
//! Encrypt and Decrypt with RSA_2048; ops/s, p50 and p99 with 1 and 16 concurrent clients
//! (the client threads and latency recording of `agent.rs`, in `common`). Messages are 32
//! bytes, RAW.
//!
//! kmsd runs as deployed (its default log level) but with `--audit off`, as in `roots.rs`:
//! the audit trail's fsync, which `agent.rs` measures, would otherwise hide what the
//! public-key operations cost. Beside the table is the one outside figure we have: a
//! published Rust KMS server performs RSA-OAEP encryption in about 134 µs single-threaded
//! over HTTP, and the ratio of our single-client RSA-OAEP Encrypt p50 to it. That server,
//! its machine and its transport are not ours, so the ratio says only how far apart we are.
//!
//! Run with the release binaries (cargo bench starts the `kmsd` beside it):
//!
//! ```text
//! cargo build --release --bins && cargo bench -p kmsfs-tests --bench asymmetric
//! ```
//!
//! `KMSFS_BENCH_SECS` sets the measured duration per cell (default 3 s).

mod common;

use common::{micros, ratio, Operation, Timing};
use kmsfs_tests::{b64, TestAgent};
use serde_json::{json, Value};

const CONCURRENCY: [usize; 2] = [1, 16];
/// The published single-threaded RSA-OAEP encryption latency of another Rust KMS server
/// over HTTP, in µs.
const ANCHOR_RSA_OAEP_ENCRYPT_MICROS: f64 = 134.0;
const ENCRYPT_LABEL: &str = "Encrypt RSA_2048 OAEP";

/// A key of `agent` of `spec` and `usage`, by KeyId.
fn key(agent: &TestAgent, spec: &str, usage: &str) -> String {
    let created = agent.ok("CreateKey", json!({ "KeySpec": spec, "KeyUsage": usage }));
    created["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

/// One row group of the table: its label and the request measured.
struct Row {
    label: &'static str,
    operation: Operation,
}

/// `action` with `request`, once before measuring (so that a refusal stops the run here,
/// clearly), and the reply.
fn row(agent: &TestAgent, label: &'static str, action: &'static str, request: Value) -> (Row, Value) {
    let reply = agent.ok(action, request.clone());
    (Row { label, operation: Operation::new(action, &request) }, reply)
}

fn rows(agent: &TestAgent) -> Vec<Row> {
    let message = b64(&[7u8; 32]);
    let mut rows = Vec::new();
    for (spec, algorithm, sign_label, verify_label) in [
        ("ECC_NIST_P256", "ECDSA_SHA_256", "Sign P256 ECDSA", "Verify P256 ECDSA"),
        ("RSA_2048", "RSASSA_PSS_SHA_256", "Sign RSA_2048 PSS", "Verify RSA_2048 PSS"),
    ] {
        let key_id = key(agent, spec, "SIGN_VERIFY");
        let sign = json!({ "KeyId": key_id, "Message": message, "SigningAlgorithm": algorithm });
        let (sign_row, signed) = row(agent, sign_label, "Sign", sign);
        let verify = json!({
            "KeyId": key_id,
            "Message": message,
            "Signature": signed["Signature"],
            "SigningAlgorithm": algorithm,
        });
        let (verify_row, _) = row(agent, verify_label, "Verify", verify);
        rows.extend([sign_row, verify_row]);
    }
    let key_id = key(agent, "RSA_2048", "ENCRYPT_DECRYPT");
    let encrypt = json!({ "KeyId": key_id, "Plaintext": message, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256" });
    let (encrypt_row, sealed) = row(agent, ENCRYPT_LABEL, "Encrypt", encrypt);
    let decrypt = json!({
        "KeyId": key_id,
        "CiphertextBlob": sealed["CiphertextBlob"],
        "EncryptionAlgorithm": "RSAES_OAEP_SHA_256",
    });
    let (decrypt_row, _) = row(agent, "Decrypt RSA_2048 OAEP", "Decrypt", decrypt);
    rows.extend([encrypt_row, decrypt_row]);
    rows
}

fn main() {
    let timing = Timing::from_env();
    timing.print_preamble();
    println!("kmsd --audit off; 32-byte RAW messages and plaintexts\n");

    let agent = TestAgent::start_quiet_in(&std::env::temp_dir(), &["--audit", "off"]);
    let socket = agent.socket();
    let rows = rows(&agent);
    println!("{:<22} {:>7} {:>10} {:>9} {:>9}", "operation", "clients", "ops/s", "p50 µs", "p99 µs");
    let mut encrypt_p50 = None;
    for row in &rows {
        for clients in CONCURRENCY {
            let m = common::run(&socket, &row.operation, clients, timing);
            println!(
                "{:<22} {:>7} {:>10.0} {:>9.1} {:>9.1}",
                row.label,
                clients,
                m.ops_per_sec,
                micros(m.p50),
                micros(m.p99)
            );
            if row.label == ENCRYPT_LABEL && clients == 1 {
                encrypt_p50 = Some(micros(m.p50));
            }
        }
    }
    println!();
    println!(
        "anchor: a published Rust KMS server performs RSA-OAEP encryption in about \
         {ANCHOR_RSA_OAEP_ENCRYPT_MICROS:.0} µs single-threaded over HTTP"
    );
    if let Some(p50) = encrypt_p50 {
        println!(
            "kmsd {ENCRYPT_LABEL}, 1 client, p50 {p50:.1} µs: {:.2} × the anchor's {ANCHOR_RSA_OAEP_ENCRYPT_MICROS:.0} µs",
            ratio(p50, ANCHOR_RSA_OAEP_ENCRYPT_MICROS)
        );
    }
}
