//! Throughput and latency of the real `kmsd` over its socket: Encrypt, Decrypt and
//! GenerateDataKey with 1, 4 and 16 concurrent clients, each a thread with its own
//! keep-alive connection. Every request's latency is recorded; the table shows ops/s, p50
//! and p99. Client threads and the agent share the machine's cores, so on a small machine
//! the clients' own work is part of what is measured.
//!
//! Each table is measured twice: with the audit trail (the default: every request's record
//! synced to disk before its reply, in groups) and with `kmsd --audit off`; a last table
//! gives the cost of auditing. The audit files go to the benchmark's temporary directory,
//! so the figures depend on that filesystem's fsync.
//!
//! Run with the release binaries (cargo bench runs from target/release and starts the
//! `kmsd` beside it, so build it first):
//!
//! ```text
//! cargo build --release --bins && cargo bench -p kmsfs-tests --bench agent
//! ```
//!
//! `KMSFS_BENCH_SECS` sets the measured duration per cell (default 3 s).

mod common;

use std::path::Path;

use common::{micros, ratio, Operation, Timing};
use kmsfs_common::client::AgentClient;
use kmsfs_tests::{b64, unb64, TestAgent};
use serde_json::json;

const CONCURRENCY: [usize; 3] = [1, 4, 16];

fn operations(socket: &Path) -> Vec<Operation> {
    let mut client = AgentClient::connect(socket).expect("connect");
    let created = client.call("CreateKey", &json!({ "Description": "bench" })).expect("CreateKey");
    let key_id = created["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string();
    let context = json!({ "file": "bench/0001" });
    let encrypt = json!({ "KeyId": key_id, "Plaintext": b64(&[7u8; 32]), "EncryptionContext": context });
    let sealed = client.call("Encrypt", &encrypt).expect("Encrypt");
    let decrypt = json!({ "CiphertextBlob": b64(&unb64(&sealed["CiphertextBlob"])), "EncryptionContext": context });
    let data_key = json!({ "KeyId": key_id, "KeySpec": "AES_256" });
    vec![
        Operation::new("Encrypt", &encrypt),
        Operation::new("Decrypt", &decrypt),
        Operation::new("GenerateDataKey", &data_key),
    ]
}

fn main() {
    let timing = Timing::from_env();
    timing.print_preamble();

    let mut tables = Vec::new();
    for audit in [true, false] {
        println!("audit trail {}:", if audit { "on" } else { "off (kmsd --audit off)" });
        // As deployed (default log level: nothing per request), in the system's temporary directory.
        let agent = TestAgent::start_quiet_in(&std::env::temp_dir(), &["--audit", if audit { "on" } else { "off" }]);
        let socket = agent.socket();
        let operations = operations(&socket);
        println!("{:<16} {:>7} {:>10} {:>9} {:>9}", "operation", "clients", "ops/s", "p50 µs", "p99 µs");
        let mut table = Vec::new();
        for op in &operations {
            for clients in CONCURRENCY {
                let m = common::run(&socket, op, clients, timing);
                println!(
                    "{:<16} {:>7} {:>10.0} {:>9.1} {:>9.1}",
                    op.action,
                    clients,
                    m.ops_per_sec,
                    micros(m.p50),
                    micros(m.p99)
                );
                table.push((op.action, clients, m));
            }
        }
        println!();
        tables.push(table);
    }
    println!("cost of the audit trail (on / off):");
    println!("{:<16} {:>7} {:>12} {:>12}", "operation", "clients", "ops/s ratio", "p50 ratio");
    for ((action, clients, on), (_, _, off)) in tables[0].iter().zip(&tables[1]) {
        println!(
            "{:<16} {:>7} {:>12.2} {:>12.2}",
            action,
            clients,
            ratio(on.ops_per_sec, off.ops_per_sec),
            ratio(on.p50.as_secs_f64(), off.p50.as_secs_f64())
        );
    }
}
