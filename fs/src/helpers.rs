//! Large requests (a read-ahead READ decrypted, a large WRITE sealed) done on another CPU
//! than the one serving them.
//!
//! Over io_uring, the kernel hands each request to a ring thread pinned to the CPU the
//! caller runs on (see [`crate::ring`]): right for small requests, whose work is smaller
//! than a wake-up on another CPU. A sequential reader's 1 MiB READs are the opposite.
//! Served on its own CPU, a READ's decryption, the kernel's copy of its reply and the
//! reader's copy of the data all ran on that CPU while the other one idled (measured on
//! this 2-vCPU VM: 1.4 GB/s with the backing file cached, half of the machine idle;
//! 1.7 GB/s with the work moved).
//!
//! The work runs on a thread of its own, made for it and told to keep off the calling
//! thread's CPU (it would inherit a ring thread's pinning). A kept pool (rayon was tried)
//! spins between jobs, which doubled kmsfs's CPU time per GiB read; a thread per MiB costs
//! tens of microseconds.

/// Requests moving this many bytes or more are worth another CPU: the kernel's
/// read-ahead READs (up to 1 MiB) and large WRITEs.
pub const LARGE: usize = 256 << 10;

/// Runs `work` on a new thread kept off the calling thread's CPU (when there is another
/// one to use), and returns what it returns. A panic in `work` goes on in the caller.
pub fn elsewhere<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    join(|| (), work).1
}

/// Runs `here` on the calling thread and, at the same time, `there` on a new thread kept
/// off the calling thread's CPU; both results. A panic in `there` goes on in the caller.
pub fn join<A, B: Send>(here: impl FnOnce() -> A, there: impl FnOnce() -> B + Send) -> (A, B) {
    let cpu = nix::sched::sched_getcpu().ok();
    std::thread::scope(|scope| {
        let helper = scope.spawn(move || {
            if let Some(cpu) = cpu {
                avoid(cpu);
            }
            there()
        });
        let ours = here();
        (ours, helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

/// Lets the calling thread run on every CPU but `cpu`: the scheduler moves it at once.
fn avoid(cpu: usize) {
    let mut others = nix::sched::CpuSet::new();
    for other in (0..nix::sched::CpuSet::count()).filter(|&c| c != cpu) {
        // Only fails past the set's size, which `count` bounds.
        let _ = others.set(other);
    }
    // Refused when no other CPU is allowed (a one-CPU machine, a cpuset): stay put.
    if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &others) {
        tracing::trace!("a helper thread stays on CPU {cpu}: {e}");
    }
}
