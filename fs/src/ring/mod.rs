//! FUSE over io_uring: the transport the kernel (6.14 and later, with the `fuse` module's
//! `enable_uring` parameter set) offers besides /dev/fuse.
//!
//! With /dev/fuse, a request wakes whichever worker thread waits longest, usually on
//! another CPU than the caller's, and the reply wakes the caller back across CPUs: two
//! inter-processor wake-ups per request, which on a virtual machine cost more than the
//! work itself. Over io_uring the kernel keeps one queue per CPU and hands a request to a
//! thread waiting on the caller's own CPU, which answers and fetches the next request in
//! one system call. Measured on a 2-vCPU VM: a small synchronous request costs 4.4 µs
//! instead of 12 µs.
//!
//! fuser still mounts the filesystem, negotiates FUSE_INIT (asking for
//! `FUSE_OVER_IO_URING` when the kernel offers it) and reads /dev/fuse for what never goes
//! through the ring (FORGET, INTERRUPT). Everything else arrives here:
//! - [`abi`] parses a request from its ring buffers and encodes replies (safe code only);
//! - [`uring`] registers the ring entries and runs one thread per entry, pinned to its
//!   queue's CPU (the crate's only `unsafe`: buffers the kernel writes into);
//! - [`Serve`] is what answers: the filesystem (`serve`).

pub mod abi;
mod serve;
pub mod uring;

use fuser::Errno;

/// One request as it arrived in a ring entry: its header, the entry's whole area for the
/// operation's own header (`op_in`: the kernel copies only as much as the operation has,
/// and nothing for operations without one, so [`abi::parse`] reads it by opcode) and the
/// rest of its arguments.
pub struct Incoming<'a> {
    pub header: abi::InHeader,
    pub op_in: &'a [u8],
    pub payload: &'a [u8],
}

/// What answers requests arriving on the ring.
pub trait Serve: Send + Sync + 'static {
    /// Answers one request: `Ok` with the reply's arguments written to `out` (which comes
    /// empty; an operation without reply arguments leaves it so), or the error to return.
    fn serve(&self, request: &Incoming<'_>, out: &mut Vec<u8>) -> Result<(), Errno>;

    /// Answers a READ, whose request has no payload: the bytes read are written straight
    /// into `reply` (the entry's payload buffer, where the kernel takes them from) and
    /// their number returned. Spares a copy of every byte read; `serve` never sees a READ.
    fn read(&self, request: &Incoming<'_>, reply: &mut [u8]) -> Result<usize, Errno>;
}
