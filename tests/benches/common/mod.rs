//! What the agent benchmarks share: `clients` threads calling one pre-serialized request on
//! their own keep-alive connections to a real `kmsd`, every latency recorded, and the
//! figures a table shows (ops/s, p50, p99); the measured duration from `KMSFS_BENCH_SECS`.
//! `agent.rs` runs it over operations and audit settings, `roots.rs` over roots of trust.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use kmsfs_common::client::AgentClient;
use serde_json::Value;

/// One benchmarked operation: the action and its pre-serialized request body, so that
/// the clients spend no time building JSON.
pub struct Operation {
    pub action: &'static str,
    pub body: Arc<Vec<u8>>,
}

impl Operation {
    pub fn new(action: &'static str, request: &Value) -> Operation {
        Operation { action, body: Arc::new(serde_json::to_vec(request).expect("JSON")) }
    }
}

/// What one cell of a table measured.
pub struct Measured {
    pub ops_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// How long each cell runs: a warm-up, then the measured part.
#[derive(Clone, Copy)]
pub struct Timing {
    pub warm_up: Duration,
    pub measure: Duration,
}

impl Timing {
    /// `KMSFS_BENCH_SECS` seconds measured per cell (default 3), after a warm-up of a third
    /// of that, at most 1 s. Exits with a message if the variable is no positive number.
    pub fn from_env() -> Timing {
        let secs: f64 = match std::env::var("KMSFS_BENCH_SECS") {
            Ok(v) => v.parse().ok().filter(|s: &f64| *s > 0.0).unwrap_or_else(|| {
                eprintln!("KMSFS_BENCH_SECS must be a positive number of seconds, not {v:?}");
                std::process::exit(2)
            }),
            Err(_) => 3.0,
        };
        Timing { warm_up: Duration::from_secs_f64((secs / 3.0).min(1.0)), measure: Duration::from_secs_f64(secs) }
    }

    /// Prints which kmsd runs, on how many cores, and for how long per cell.
    pub fn print_preamble(&self) {
        let cores = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        println!("kmsd: {}", kmsfs_tests::bin("kmsd").display());
        println!(
            "nproc: {cores}; the client threads and kmsd share these cores, so clients' own work is in the figures"
        );
        println!("{:.1} s per cell after a {:.1} s warm-up\n", self.measure.as_secs_f64(), self.warm_up.as_secs_f64());
    }
}

/// `clients` threads call `op` back to back: the warm-up, then the measured part during
/// which every latency is recorded.
pub fn run(socket: &Path, op: &Operation, clients: usize, timing: Timing) -> Measured {
    let Timing { warm_up, measure } = timing;
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

/// A duration in microseconds, for the tables.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `a / b`, without dividing by zero.
pub fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(f64::MIN_POSITIVE)
}
