//! The agent's only `unsafe`: keeping secrets out of swap and core dumps.
//!
//! `harden_process` marks the process non-dumpable (no core dumps, no ptrace by other
//! users' processes, no `/proc/PID/mem` reads) and sets RLIMIT_CORE to zero.
//! `lock` pins the pages holding a secret in RAM (mlock) and excludes them from core
//! dumps (MADV_DONTDUMP). Pages are never unlocked: a heap page may hold several secrets,
//! and unlocking it for one would unlock the others; the locked set is bounded by the
//! number of keys held.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::mman::{madvise, mlock, MmapAdvise};

static WARNED: AtomicBool = AtomicBool::new(false);

/// Makes the process non-dumpable and disables core files. Failures are logged: they
/// weaken defence in depth but do not make the agent unsafe to run.
pub fn harden_process() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot mark the process non-dumpable: {e}");
    }
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0) {
        tracing::warn!("cannot disable core dumps: {e}");
    }
}

/// Locks the memory of `value` in RAM and excludes it from core dumps, best effort
/// (an unprivileged user's RLIMIT_MEMLOCK may be small; the process is non-dumpable and
/// has no core limit regardless).
pub fn lock<T: ?Sized>(value: &T) {
    let len = std::mem::size_of_val(value);
    if len == 0 {
        return;
    }
    let page = page_size();
    let start = value as *const T as *const u8 as usize;
    let aligned = start & !(page - 1);
    let span = (start + len).div_ceil(page) * page - aligned;
    let Some(addr) = NonNull::new(aligned as *mut c_void) else { return };
    // SAFETY: `addr..addr+span` covers the pages of a live object borrowed for the call.
    // mlock and madvise(MADV_DONTDUMP) change only residency and dump attributes of
    // those pages, never their contents or mapping, so no Rust invariant is affected.
    let locked = unsafe { mlock(addr, span) };
    // SAFETY: as above; MADV_DONTDUMP is advisory and leaves the memory's contents alone.
    let advised = unsafe { madvise(addr, span, MmapAdvise::MADV_DONTDUMP) };
    if (locked.is_err() || advised.is_err()) && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "cannot lock key material in memory (mlock: {:?}, madvise: {:?}); raise RLIMIT_MEMLOCK \
             (LimitMEMLOCK= in systemd) to keep keys out of swap",
            locked.err(),
            advised.err()
        );
    }
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    #[test]
    fn locking_a_heap_value_does_not_disturb_it() {
        let secret = Box::new([42u8; 32]);
        super::lock(&*secret);
        assert_eq!(*secret, [42u8; 32]);
        super::lock(&[0u8; 0]);
    }
}
