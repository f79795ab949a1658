//! Helper threads for large requests: a read-ahead READ decrypted, a large WRITE sealed,
//! on other CPUs than the one serving the request.
//!
//! Over io_uring, the kernel hands each request to a ring thread pinned to the CPU the
//! caller runs on (see [`crate::ring`]): right for small requests, whose work is smaller
//! than a wake-up on another CPU. A sequential reader's 1 MiB READs are the opposite.
//! Served on its own CPU, a READ's decryption, the kernel's copy of its reply and the
//! reader's copy of the data all ran on that CPU while the other one idled (measured on
//! this 2-vCPU VM: 1.4 GB/s with the backing file cached, half of the machine idle), so
//! such requests are handed to these threads, which run wherever the scheduler has room.
//! Threads are kept rather than spawned per request (a thread inherits its creator's
//! pinning, and creating one per MiB shows in the profile).

use std::io;

/// Requests moving this many bytes or more are worth a hand-over: the kernel's
/// read-ahead READs (up to 1 MiB) and large WRITEs.
pub const LARGE: usize = 256 << 10;

/// The pool: one thread per CPU this process may use, free to run on any of them.
pub fn pool() -> io::Result<rayon::ThreadPool> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kmsfs-helper-{i}"))
        // Made from a pinned ring thread, a helper would inherit its pinning.
        .start_handler(|_| unpin())
        .build()
        .map_err(io::Error::other)
}

/// Lets the calling thread run on every CPU.
fn unpin() {
    let mut all = nix::sched::CpuSet::new();
    for cpu in 0..nix::sched::CpuSet::count() {
        // Only fails past the set's size, which `count` bounds.
        let _ = all.set(cpu);
    }
    if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all) {
        tracing::debug!("cannot unpin a helper thread: {e}");
    }
}
