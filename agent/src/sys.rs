//! The agent's only `unsafe`: system calls that std and nix do not wrap.
//!
//! Keeping secrets out of swap and core dumps:
//! `harden_process` marks the process non-dumpable (no core dumps, no ptrace by other
//! users' processes, no `/proc/PID/mem` reads) and sets RLIMIT_CORE to zero.
//! `lock` pins the pages holding a secret in RAM (mlock) and excludes them from core
//! dumps (MADV_DONTDUMP). Pages are never unlocked: a heap page may hold several secrets,
//! and unlocking it for one would unlock the others; the locked set is bounded by the
//! number of keys held.
//!
//! Knowing who is calling: [`peer_pidfd`] asks the kernel for a pidfd of the process at
//! the other end of a Unix socket (SO_PEERPIDFD, Linux 6.5; else pidfd_open on the
//! SO_PEERCRED pid). A pidfd names one process for its whole life, so a pid recycled by
//! another process cannot be mistaken for the caller.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// `SO_PEERPIDFD` from `<asm-generic/socket.h>` (the same on x86-64 and aarch64).
const SO_PEERPIDFD: libc::c_int = 77;
/// `pidfd_open`'s system call number in the generic table (x86-64 and aarch64 alike).
const SYS_PIDFD_OPEN: libc::c_long = 434;

/// A pidfd for the peer of the connected Unix socket `socket` (whose SO_PEERCRED pid is
/// `pid`, used only when the kernel is older than 6.5).
pub fn peer_pidfd(socket: BorrowedFd<'_>, pid: i32) -> std::io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a live c_int whose size
    // `len` states; the socket fd is borrowed for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
    // reads and writes no memory of ours.
    let fd = unsafe { libc::syscall(SYS_PIDFD_OPEN, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, a fresh descriptor owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
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
