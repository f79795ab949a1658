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

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use kmsfs_common::client::AgentClient;
use kmsfs_tests::{b64, unb64, TestAgent};
use serde_json::{json, Value};

const CONCURRENCY: [usize; 3] = [1, 4, 16];

/// One benchmarked operation: the action and its pre-serialized request body, so that
/// the clients spend no time building JSON.
struct Operation {
    action: &'static str,
    body: Arc<Vec<u8>>,
}

fn operations(socket: &Path) -> Vec<Operation> {
    let mut client = AgentClient::connect(socket).expect("connect");
    let created = client.call("CreateKey", &json!({ "Description": "bench" })).expect("CreateKey");
    let key_id = created["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string();
    let context = json!({ "file": "bench/0001" });
    let encrypt = json!({ "KeyId": key_id, "Plaintext": b64(&[7u8; 32]), "EncryptionContext": context });
    let sealed = client.call("Encrypt", &encrypt).expect("Encrypt");
    let decrypt = json!({ "CiphertextBlob": b64(&unb64(&sealed["CiphertextBlob"])), "EncryptionContext": context });
    let data_key = json!({ "KeyId": key_id, "KeySpec": "AES_256" });
    let body = |v: &Value| Arc::new(serde_json::to_vec(v).expect("JSON"));
    vec![
        Operation { action: "Encrypt", body: body(&encrypt) },
        Operation { action: "Decrypt", body: body(&decrypt) },
        Operation { action: "GenerateDataKey", body: body(&data_key) },
    ]
}

/// What one cell of the table measured.
struct Measured {
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// `clients` threads call `op` back to back: a warm-up, then `measure` during which every
/// latency is recorded.
fn run(socket: &Path, op: &Operation, clients: usize, warm_up: Duration, measure: Duration) -> Measured {
    let barrier = Arc::new(Barrier::new(clients));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, body, barrier, action) = (socket.to_path_buf(), op.body.clone(), barrier.clone(), op.action);
            thread::spawn(move || {
                let mut client = AgentClient::connect(&socket).expect("connect");
                let mut latencies = Vec::with_capacity(1 << 16);
                barrier.wait();
                let start = Instant::now();
                let (measuring, end) = (start + warm_up, start + warm_up + measure);
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let reply = client.call_raw(action, &body).unwrap_or_else(|e| panic!("{action}: {e}"));
                    assert_eq!(reply.status, 200, "{action}: {}", String::from_utf8_lossy(&reply.body));
                    if sent >= measuring {
                        latencies.push(sent.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers.into_iter().flat_map(|w| w.join().expect("client thread")).collect();
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
    Measured {
        ops_per_sec: latencies.len() as f64 / measure.as_secs_f64(),
        p50: at(0.50).copied().unwrap_or_default(),
        p99: at(0.99).copied().unwrap_or_default(),
    }
}

fn main() {
    let secs: f64 = match std::env::var("KMSFS_BENCH_SECS") {
        Ok(v) => v.parse().ok().filter(|s: &f64| *s > 0.0).unwrap_or_else(|| {
            eprintln!("KMSFS_BENCH_SECS must be a positive number of seconds, not {v:?}");
            std::process::exit(2)
        }),
        Err(_) => 3.0,
    };
    let measure = Duration::from_secs_f64(secs);
    let warm_up = Duration::from_secs_f64((secs / 3.0).min(1.0));
    let binary = kmsfs_tests::bin("kmsd");
    let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("kmsd: {}", binary.display());
    println!("nproc: {cores}; the client threads and kmsd share these cores, so clients' own work is in the figures");
    println!("{:.1} s per cell after a {:.1} s warm-up\n", measure.as_secs_f64(), warm_up.as_secs_f64());

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
                let m = run(&socket, op, clients, warm_up, measure);
                println!(
                    "{:<16} {:>7} {:>10.0} {:>9.1} {:>9.1}",
                    op.action,
                    clients,
                    m.ops_per_sec,
                    m.p50.as_secs_f64() * 1e6,
                    m.p99.as_secs_f64() * 1e6
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
            on.ops_per_sec / off.ops_per_sec.max(f64::MIN_POSITIVE),
            on.p50.as_secs_f64() / off.p50.as_secs_f64().max(f64::MIN_POSITIVE)
        );
    }
}
