#![allow(unsafe_code)]
//! The io_uring transport's runtime: registers ring entries with the kernel and runs one
//! thread per entry, pinned to its queue's CPU, that answers the requests placed in it.
//!
//! This is the crate's only `unsafe` code. The kernel keeps the addresses of each entry's
//! two buffers and writes requests into them while a command of the entry is in flight,
//! which safe Rust cannot express: the buffers are raw allocations that never move, are
//! read and written only between a command's completion and the next submission, and are
//! leaked rather than freed should a thread ever stop with a command still in flight.
//! The other `unsafe` is the SQE's `len`, which io-uring's builder cannot set
//! ([`set_sqe_len`]).
//!
//! The protocol, as fs/fuse/dev_uring.c implements it:
//! - The kernel has one queue per possible CPU (`num_possible_cpus()`) and puts a request on
//!   the queue of the CPU its caller runs on. It switches the connection to the ring only
//!   once every queue has at least one registered entry, and from the FUSE_INIT reply that
//!   negotiated `FUSE_OVER_IO_URING` until then it holds every request back. So every queue
//!   gets its threads, registration is prompt, and a failure is reported.
//! - An entry is a header buffer — `fuse_uring_req_header`: `in_out` (the request's
//!   `fuse_in_header`, then our `fuse_out_header`), `op_in` (the operation's own header),
//!   `fuse_uring_ent_in_out` (commit id and payload size) — and a payload buffer: the rest
//!   of the request's arguments in, the reply's arguments out. REGISTER hands both over as
//!   an iovec[2] (`sqe->addr`, `sqe->len` = 2) with `fuse_uring_cmd_req { qid }` in the
//!   SQE's 80-byte command area, hence rings of 128-byte SQEs.
//! - REGISTER is refused with EAGAIN until the INIT reply has been written, and completes
//!   (result 0) only once a request has been placed in the entry. The thread answers in the
//!   entry's buffers and submits COMMIT_AND_FETCH, which completes with the next request.
//! - One entry per thread and several threads per queue: a request that waits on the disk
//!   or the agent holds up only its own thread; the queue's next request goes to another
//!   entry.
//! - At unmount (or abort) the kernel completes every waiting command with ENOTCONN, and
//!   the threads end.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fuser::Errno;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use zeroize::Zeroize;

use super::{abi, Incoming, Serve};

/// Where the kernel lists the CPUs it makes queues for.
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

/// `struct fuse_uring_req_header` (include/uapi/linux/fuse.h): the entry's header buffer.
const HEADER_SIZE: usize = 288;
/// Its `in_out`: `fuse_in_header` from the kernel, `fuse_out_header` back.
const IN_OUT: Range<usize> = 0..128;
/// Its `op_in`: the operation's own header (the kernel's first argument), when it has one.
const OP_IN: Range<usize> = 128..256;
/// `fuse_uring_ent_in_out.commit_id` (u64): what COMMIT_AND_FETCH must name.
const COMMIT_ID_AT: usize = 264;
/// `fuse_uring_ent_in_out.payload_sz` (u32): request bytes in the payload, then reply bytes.
const PAYLOAD_SZ_AT: usize = 272;
const OUT_HEADER_SIZE: usize = 16;

/// `enum fuse_uring_cmd`, in the SQE's `cmd_op`.
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// The smallest payload buffer the kernel ever asks for (`FUSE_MIN_READ_BUFFER`).
const MIN_PAYLOAD_SIZE: usize = 8192;
/// A queue id no kernel has (queues are CPUs): see [`Order::Release`].
const NO_QUEUE: u16 = u16::MAX;

/// How long a thread keeps retrying REGISTER while the kernel answers EAGAIN because the
/// INIT reply has not been written yet.
const REGISTER_PATIENCE: Duration = Duration::from_secs(10);
/// The pause before retrying what the kernel refused for the moment (EAGAIN). Short:
/// requests wait for the last queue's registration.
const RETRY_PAUSE: Duration = Duration::from_millis(1);
/// Submission queue size of each thread's ring: one command is in flight at a time.
const RING_DEPTH: u32 = 2;

/// How the transport is laid out.
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// Threads, each with its own ring entry, per queue (per possible CPU): how many
    /// requests from one CPU can be in progress at once.
    pub threads_per_queue: usize,
    /// Bytes in each entry's payload buffer. The kernel refuses an entry smaller than what
    /// FUSE_INIT negotiated ([`RingConfig::payload_size_for`]).
    pub payload_size: usize,
}

impl RingConfig {
    /// The payload buffer the kernel requires for the `max_write` and `max_pages` of the
    /// INIT reply: max(8192, max_write, max_pages × page size), as fs/fuse/dev_uring.c
    /// computes it.
    pub fn payload_size_for(max_write: u32, max_pages: u16) -> usize {
        MIN_PAYLOAD_SIZE.max(max_write as usize).max(usize::from(max_pages) * page_size())
    }
}

/// The CPUs the kernel counts as possible, from /sys/devices/system/cpu/possible
/// ("0-1", "0,2-5"): the kernel makes one queue for each.
pub fn possible_cpus() -> io::Result<Vec<u16>> {
    let text = fs::read_to_string(POSSIBLE_CPUS)?;
    parse_cpu_list(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{POSSIBLE_CPUS}: expected a CPU list such as \"0-3,6\", found {:?}", text.trim()),
        )
    })
}

/// Parses the kernel's CPU list format; `None` if it is not one.
fn parse_cpu_list(text: &str) -> Option<Vec<u16>> {
    let mut cpus = Vec::new();
    for range in text.trim().split(',') {
        let (first, last): (u16, u16) = match range.split_once('-') {
            Some((first, last)) => (first.parse().ok()?, last.parse().ok()?),
            None => {
                let cpu = range.parse().ok()?;
                (cpu, cpu)
            }
        };
        if first > last {
            return None;
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Checks that this process can make the rings [`start`] needs (128-byte SQEs, URING_CMD),
/// so that the filesystem asks the kernel for `FUSE_OVER_IO_URING` only when it can follow
/// through: once negotiated, the kernel holds requests back until every queue has an entry.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(RING_DEPTH)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::UringCmd80::CODE) {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring has no URING_CMD"));
    }
    Ok(())
}

/// The running transport: its threads, and how many requests they have answered.
pub struct Ring {
    threads: Vec<JoinHandle<()>>,
    served: Served,
}

/// How many requests a ring's threads have answered: one counter per thread.
#[derive(Clone)]
pub struct Served(Arc<[Counter]>);

impl Served {
    /// Requests answered over the ring so far, by all threads.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|counter| counter.0.load(Ordering::Relaxed)).sum()
    }
}

impl Ring {
    /// The ring's request counters (they keep counting after this call).
    pub fn served(&self) -> Served {
        self.served.clone()
    }

    /// Waits for every thread to end, which they do when the connection ends (unmount or
    /// abort) or, with a warning, when their entry fails.
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::warn!("a FUSE io_uring thread panicked");
            }
        }
    }
}

/// One thread's count, on its own cache line: the threads run on different CPUs.
#[derive(Default)]
#[repr(align(64))]
struct Counter(AtomicU64);

/// Starts serving the FUSE connection of `fuse_fd` (/dev/fuse, or a clone of it) over
/// io_uring: [`RingConfig::threads_per_queue`] threads for each possible CPU, each with its
/// own ring and entry, answering with `serve`.
///
/// Returns once every thread has submitted its REGISTER — which the kernel accepts only
/// after the INIT reply, so this may be called before it (the threads retry for up to 10 s)
/// — or with the first error. An error while setting up (a ring, a buffer, a thread) comes
/// before anything is registered; should the kernel already hold requests back for the
/// ring, one thread then sends a REGISTER the kernel must refuse, which makes it give up on
/// the ring and let them through /dev/fuse.
///
/// The threads keep `fuse_fd` open until they end.
pub fn start(fuse_fd: OwnedFd, config: &RingConfig, serve: Arc<dyn Serve>) -> io::Result<Ring> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if config.threads_per_queue == 0 {
        return Err(invalid("threads_per_queue must be at least 1".into()));
    }
    if config.payload_size < MIN_PAYLOAD_SIZE || config.payload_size > (u32::MAX as usize) - OUT_HEADER_SIZE {
        return Err(invalid(format!(
            "payload_size must be between {MIN_PAYLOAD_SIZE} and 4 GiB, not {}",
            config.payload_size
        )));
    }
    let cpus = possible_cpus()?;
    // The kernel's queue ids run from 0 to num_possible_cpus() - 1, and a request goes to
    // queue `task_cpu()`: queue q serves CPU q (the possible CPUs are 0..n on any real
    // system; were they not, a queue whose CPU does not exist still needs an entry).
    let queues = u16::try_from(cpus.len()).ok().filter(|&n| n < NO_QUEUE).ok_or_else(|| {
        io::Error::new(io::ErrorKind::Unsupported, format!("{} possible CPUs are too many", cpus.len()))
    })?;
    let total = usize::from(queues) * config.threads_per_queue;
    let fd = Arc::new(fuse_fd);
    let served: Arc<[Counter]> = (0..total).map(|_| Counter::default()).collect();
    let (report_tx, reports) = mpsc::channel();
    let mut threads = Vec::with_capacity(total);
    let mut orders = Vec::with_capacity(total);
    for qid in 0..queues {
        for n in 0..config.threads_per_queue {
            let (order_tx, order_rx) = mpsc::channel();
            let worker = Worker {
                fd: fd.clone(),
                qid,
                n,
                cpu: cpus.binary_search(&qid).ok().map(|_| qid),
                payload_size: config.payload_size,
                serve: serve.clone(),
                served: served.clone(),
                slot: threads.len(),
            };
            let report = report_tx.clone();
            let spawned = thread::Builder::new()
                .name(format!("kmsfs-ring-{qid}-{n}"))
                .spawn(move || worker.run(report, order_rx));
            match spawned {
                Ok(thread) => {
                    threads.push(thread);
                    orders.push(order_tx);
                }
                Err(e) => {
                    let error = io::Error::new(e.kind(), format!("starting a FUSE io_uring thread: {e}"));
                    return Err(abandon(error, &orders, &reports, threads.len()));
                }
            }
        }
    }
    drop(report_tx);

    let mut healthy = None;
    let mut unpinned = 0;
    let mut failure = None;
    for _ in 0..threads.len() {
        match reports.recv() {
            Ok(Report::Ready { slot, pinned }) => {
                healthy.get_or_insert(slot);
                unpinned += usize::from(!pinned);
            }
            Ok(Report::Failed(e)) => {
                failure.get_or_insert(e);
            }
            Ok(Report::Submitted(_)) | Err(_) => {
                failure.get_or_insert(io::Error::other("a FUSE io_uring thread ended while setting up"));
                break;
            }
        }
    }
    if let Some(error) = failure {
        give_orders(&orders, healthy);
        return Err(error);
    }
    for order in &orders {
        let _ = order.send(Order::Register);
    }
    for _ in 0..threads.len() {
        match reports.recv() {
            Ok(Report::Submitted(Ok(()))) => {}
            Ok(Report::Submitted(Err(e)) | Report::Failed(e)) => {
                failure.get_or_insert(e);
            }
            Ok(Report::Ready { .. }) | Err(_) => {
                failure.get_or_insert(io::Error::other("a FUSE io_uring thread ended before registering"));
                break;
            }
        }
    }
    if let Some(error) = failure {
        // The other threads' entries are registered and serve; the queue of the failed one
        // may have none, which keeps the kernel from ever switching to the ring.
        return Err(error);
    }
    tracing::info!(
        queues,
        threads_per_queue = config.threads_per_queue,
        payload_size = config.payload_size,
        unpinned,
        "FUSE over io_uring: ring entries submitted"
    );
    Ok(Ring { threads, served: Served(served) })
}

/// After a failure to spawn: waits for the threads already spawned to set up (or fail),
/// then gives them their orders as after a setup failure, and returns `error`.
fn abandon(
    error: io::Error,
    orders: &[mpsc::Sender<Order>],
    reports: &mpsc::Receiver<Report>,
    spawned: usize,
) -> io::Error {
    let mut healthy = None;
    for _ in 0..spawned {
        match reports.recv() {
            Ok(Report::Ready { slot, .. }) => {
                healthy.get_or_insert(slot);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    give_orders(orders, healthy);
    error
}

/// Orders after a setup failure, when nothing has been registered: one healthy thread
/// releases the kernel's held-back requests, the others stop.
fn give_orders(orders: &[mpsc::Sender<Order>], releaser: Option<usize>) {
    for (slot, order) in orders.iter().enumerate() {
        let _ = order.send(if Some(slot) == releaser { Order::Release } else { Order::Stop });
    }
}

/// What [`start`] tells a thread that has set up.
enum Order {
    /// Register the entry and serve.
    Register,
    /// Another thread failed to set up, so nothing will be registered: send a REGISTER the
    /// kernel must refuse (for a queue it does not have). On a refused REGISTER the kernel
    /// gives up on the ring for this connection (fs/fuse/dev_uring.c clears
    /// `fc->io_uring` and wakes the requests it held back), and requests go through
    /// /dev/fuse — should FUSE_OVER_IO_URING have been negotiated; otherwise it is a no-op.
    Release,
    /// End without registering.
    Stop,
}

/// What a thread tells [`start`].
enum Report {
    /// Pinned (or not: its CPU is offline or outside the process's cpuset), ring and
    /// buffers made; waiting for its [`Order`].
    Ready { slot: usize, pinned: bool },
    /// Could not set up; the thread has ended.
    Failed(io::Error),
    /// Whether REGISTER was submitted.
    Submitted(io::Result<()>),
}

/// One thread: serves one entry of queue `qid`.
struct Worker {
    fd: Arc<OwnedFd>,
    qid: u16,
    /// Index of the thread within its queue, for the logs.
    n: usize,
    /// The CPU to pin to, if it exists.
    cpu: Option<u16>,
    payload_size: usize,
    serve: Arc<dyn Serve>,
    served: Arc<[Counter]>,
    /// This thread's counter in `served`.
    slot: usize,
}

/// The command an entry has in flight.
#[derive(Clone, Copy)]
enum Command {
    Register { since: Instant },
    CommitAndFetch,
}

impl Worker {
    fn run(self, report: mpsc::Sender<Report>, orders: mpsc::Receiver<Order>) {
        let pinned = match self.cpu.map(pin_to_cpu) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::debug!(queue = self.qid, thread = self.n, "not pinned to CPU {}: {e}", self.qid);
                false
            }
            None => false,
        };
        let (mut ring, mut entry) = match self.set_up() {
            Ok(set_up) => set_up,
            Err(e) => {
                let _ = report.send(Report::Failed(e));
                return;
            }
        };
        let _ = report.send(Report::Ready { slot: self.slot, pinned });
        match orders.recv() {
            Ok(Order::Register) => {}
            Ok(Order::Release) => return self.release(&mut ring),
            Ok(Order::Stop) | Err(_) => return,
        }
        let submitted = push(&mut ring, &self.register_sqe(&entry), Some(&mut entry)).and_then(|()| submit(&ring));
        let registered = submitted.is_ok();
        let _ = report.send(Report::Submitted(submitted.map_err(|e| self.error("io_uring_enter (REGISTER)", e))));
        if registered {
            self.serve_entry(&mut ring, &mut entry);
        }
    }

    fn set_up(&self) -> io::Result<(IoUring<squeue::Entry128>, Entry)> {
        let ring = new_ring().map_err(|e| self.error("io_uring_setup", e))?;
        let entry = Entry::new(self.payload_size).map_err(|e| self.error("allocating the ring buffers", e))?;
        Ok((ring, entry))
    }

    /// `e` with what failed and where.
    fn error(&self, what: &str, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("FUSE io_uring queue {} thread {}: {what}: {e}", self.qid, self.n))
    }

    fn register_sqe(&self, entry: &Entry) -> squeue::Entry128 {
        fuse_command(self.fd.as_raw_fd(), FUSE_IO_URING_CMD_REGISTER, self.qid, 0, Some(entry.iov()))
    }

    /// Answers requests until the connection ends or the entry fails.
    fn serve_entry(&self, ring: &mut IoUring<squeue::Entry128>, entry: &mut Entry) {
        let (qid, n) = (self.qid, self.n);
        let mut command = Command::Register { since: Instant::now() };
        let mut out = Vec::new();
        let mut last_reply = 0;
        loop {
            let result = match wait(ring) {
                Ok(result) => result,
                Err(e) => {
                    tracing::warn!(
                        queue = qid,
                        thread = n,
                        "io_uring_enter failed: {e}; this ring entry stops serving"
                    );
                    return;
                }
            };
            entry.in_flight = false;
            if result < 0 {
                let errno = -result;
                if matches!(errno, libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV) {
                    tracing::debug!(queue = qid, thread = n, "FUSE connection ended");
                    return;
                }
                let error = io::Error::from_raw_os_error(errno);
                match command {
                    Command::Register { since } if errno == libc::EAGAIN && since.elapsed() < REGISTER_PATIENCE => {
                        thread::sleep(RETRY_PAUSE);
                    }
                    Command::Register { .. } if errno == libc::EAGAIN => {
                        tracing::warn!(
                            queue = qid,
                            thread = n,
                            "no FUSE INIT reply within {REGISTER_PATIENCE:?}: this io_uring entry is not registered"
                        );
                        return;
                    }
                    Command::Register { .. } => {
                        // On a refused REGISTER the kernel gives up on the ring for this
                        // connection (fs/fuse/dev_uring.c clears fc->io_uring and wakes the
                        // requests it held back), and requests keep going through /dev/fuse.
                        tracing::warn!(
                            queue = qid,
                            thread = n,
                            "the kernel refused this FUSE io_uring entry: {error} (see dmesg); \
                             requests go through /dev/fuse instead"
                        );
                        return;
                    }
                    Command::CommitAndFetch => {
                        // The entry is left with the kernel, unused: without a fresh
                        // registration this thread would serve nothing more.
                        tracing::warn!(
                            queue = qid,
                            thread = n,
                            "the kernel refused a FUSE io_uring reply: {error} (see dmesg); registering the entry again"
                        );
                        command = Command::Register { since: Instant::now() };
                    }
                }
                if let Err(e) = push(ring, &self.register_sqe(entry), Some(entry)) {
                    tracing::warn!(queue = qid, thread = n, "cannot register the FUSE io_uring entry again: {e}");
                    return;
                }
                continue;
            }
            let Some((header, payload)) = entry.buffers() else {
                return;
            };
            let commit_id = answer(&*self.serve, header, payload, &mut out, &mut last_reply);
            self.served[self.slot].0.fetch_add(1, Ordering::Relaxed);
            command = Command::CommitAndFetch;
            let sqe = fuse_command(self.fd.as_raw_fd(), FUSE_IO_URING_CMD_COMMIT_AND_FETCH, qid, commit_id, None);
            // Submitted by the next wait(), together with waiting for its completion.
            if let Err(e) = push(ring, &sqe, Some(entry)) {
                tracing::warn!(queue = qid, thread = n, "cannot commit a FUSE io_uring reply: {e}");
                return;
            }
        }
    }

    /// Sends the REGISTER of [`Order::Release`] and waits for the kernel to refuse it.
    fn release(&self, ring: &mut IoUring<squeue::Entry128>) {
        // No iovec: the kernel checks the queue id first.
        let sqe = fuse_command(self.fd.as_raw_fd(), FUSE_IO_URING_CMD_REGISTER, NO_QUEUE, 0, None);
        let since = Instant::now();
        loop {
            let result = push(ring, &sqe, None).and_then(|()| wait(ring));
            match result {
                Ok(result) if result == -libc::EAGAIN && since.elapsed() < REGISTER_PATIENCE => {
                    thread::sleep(RETRY_PAUSE)
                }
                Ok(result) => {
                    tracing::debug!("FUSE io_uring released (REGISTER for no queue: {result})");
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot release the FUSE io_uring: {e}");
                    return;
                }
            }
        }
    }
}

/// Answers the request the kernel placed in an entry's buffers, writing the reply into
/// them, and returns the commit id COMMIT_AND_FETCH must name.
///
/// `op_in` is the whole 128-byte area: the kernel copies only the operation's own header
/// (its first argument) there, of a size that depends on the opcode, and nothing at all for
/// operations without one, so [`abi`] takes from it what the opcode calls for. The area is
/// zeroed after each request, so that what it does not overwrite reads as zeroes rather
/// than as the previous request.
///
/// The payload buffer holds plaintext (a WRITE's data in, a READ's out), and so does
/// `out`: once the request is answered, what is left of the request and of the previous
/// reply (`last_reply` bytes) is wiped, and `out` after it is copied. A READ is answered
/// in the payload buffer itself ([`Serve::read`]): only what the previous reply left past
/// its end is wiped, or all of the buffer if it failed.
fn answer(serve: &dyn Serve, header: &mut [u8], payload: &mut [u8], out: &mut Vec<u8>, last_reply: &mut usize) -> u64 {
    let commit_id = read_u64(header, COMMIT_ID_AT);
    let request_len = usize::try_from(read_u32(header, PAYLOAD_SZ_AT)).unwrap_or(usize::MAX).min(payload.len());
    out.clear();
    let mut in_place = false;
    let (unique, result) = match abi::in_header(&header[IN_OUT]) {
        Some(request) => {
            let (unique, opcode) = (request.unique, request.opcode);
            let op_in = &header[OP_IN];
            let served = catch_unwind(AssertUnwindSafe(|| {
                if opcode == abi::FUSE_READ {
                    in_place = true;
                    let incoming = Incoming { header: request, op_in, payload: &[] };
                    serve.read(&incoming, payload)
                } else {
                    let incoming = Incoming { header: request, op_in, payload: &payload[..request_len] };
                    serve.serve(&incoming, out).map(|()| out.len())
                }
            }));
            (
                unique,
                served.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .copied()
                        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                        .unwrap_or("?");
                    tracing::error!(opcode, unique, "answering a FUSE request panicked: {what}; replying EIO");
                    Err(Errno::EIO)
                }),
            )
        }
        None => {
            tracing::warn!(commit_id, "unreadable FUSE request header; replying EIO");
            (commit_id, Err(Errno::EIO))
        }
    };
    let (error, reply_len) = match result {
        Ok(len) if len <= payload.len() => (0, len),
        Ok(len) => {
            tracing::error!(
                unique,
                "a reply of {len} bytes exceeds the {}-byte FUSE io_uring payload buffer; replying EIO",
                payload.len()
            );
            (libc::EIO, 0)
        }
        Err(errno) => (errno.code(), 0),
    };
    let used = request_len.max(*last_reply).min(payload.len());
    if !in_place {
        payload[..used].zeroize();
        payload[..reply_len].copy_from_slice(&out[..reply_len]);
    } else if error != 0 {
        payload.zeroize();
    } else if used > reply_len {
        payload[reply_len..used].zeroize();
    }
    out[..].zeroize();
    out.clear();
    *last_reply = reply_len;
    // payload_size ≤ u32::MAX - 16 (checked by `start`).
    let out_header = abi::out_header(unique, 0i32.saturating_sub(error), (OUT_HEADER_SIZE + reply_len) as u32);
    header[..OUT_HEADER_SIZE].copy_from_slice(&out_header);
    write_u32(header, PAYLOAD_SZ_AT, reply_len as u32);
    header[OP_IN].fill(0);
    commit_id
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_ne_bytes)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_ne_bytes)
}

fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    if let Some(field) = bytes.get_mut(at..at + 4) {
        field.copy_from_slice(&value.to_ne_bytes());
    }
}

/// A ring for one thread: 128-byte SQEs; single issuer and deferred task work when the
/// kernel has them (it runs the work that copies a request in only when this thread waits,
/// rather than interrupting it).
fn new_ring() -> io::Result<IoUring<squeue::Entry128>> {
    let tuned = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(RING_DEPTH);
    match tuned {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder().build(RING_DEPTH),
        ring => ring,
    }
}

/// Queues `sqe`; `entry` is the entry whose buffers it hands the kernel, if any.
fn push(ring: &mut IoUring<squeue::Entry128>, sqe: &squeue::Entry128, entry: Option<&mut Entry>) -> io::Result<()> {
    // SAFETY: the memory an SQE of this module points the kernel at is an entry's iovecs
    // and buffers, which outlive the command: the entry is marked in flight below before
    // the SQE can be submitted, stays so until the command's completion has been reaped, and
    // leaks its buffers if dropped while in flight. An SQE without an entry (the release)
    // points at nothing.
    unsafe { ring.submission().push(sqe) }.map_err(|_| io::Error::other("the io_uring submission queue is full"))?;
    if let Some(entry) = entry {
        entry.in_flight = true;
    }
    Ok(())
}

/// Submits what was queued.
fn submit(ring: &IoUring<squeue::Entry128>) -> io::Result<()> {
    loop {
        match ring.submit() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            result => return result.map(drop),
        }
    }
}

/// Submits what was queued and waits for a completion; returns its result.
fn wait(ring: &mut IoUring<squeue::Entry128>) -> io::Result<i32> {
    loop {
        if let Some(completion) = ring.completion().next() {
            return Ok(completion.result());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // Out of kernel memory for the moment, or completions pending delivery.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => thread::sleep(RETRY_PAUSE),
            Err(e) => return Err(e),
        }
    }
}

/// A FUSE io_uring command: `cmd_op` with `struct fuse_uring_cmd_req { flags, commit_id,
/// qid }` in the command area, and for REGISTER the entry's iovec[2].
fn fuse_command(fd: RawFd, cmd_op: u32, qid: u16, commit_id: u64, iov: Option<*const libc::iovec>) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut sqe = opcode::UringCmd80::new(types::Fd(fd), cmd_op).cmd(cmd).addr(iov.map(|iov| iov as u64)).build();
    if iov.is_some() {
        set_sqe_len(&mut sqe, 2);
    }
    sqe
}

/// Byte offset of `len` (u32) in `struct io_uring_sqe` (include/uapi/linux/io_uring.h).
const SQE_LEN_AT: usize = 24;
const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);

/// Sets `sqe->len`, which REGISTER requires to be 2 (the iovecs) and io-uring 0.7's
/// `UringCmd80` has no setter for.
fn set_sqe_len(sqe: &mut squeue::Entry128, len: u32) {
    let base: *mut u8 = (sqe as *mut squeue::Entry128).cast();
    // SAFETY: Entry128 is #[repr(C)], 128 bytes, and begins with the kernel's
    // struct io_uring_sqe, whose `len` is the u32 at byte 24; the write is in bounds, of
    // plain integer bytes, and unaligned-safe.
    unsafe { base.add(SQE_LEN_AT).cast::<u32>().write_unaligned(len) };
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: u16) -> io::Result<()> {
    let mut set = CpuSet::new();
    set.set(usize::from(cpu))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "CPU number beyond cpu_set_t"))?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
}

fn page_size() -> usize {
    // SAFETY: sysconf reads no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|&size| size > 0).unwrap_or(4096)
}

/// One ring entry: the header and payload buffers the kernel writes requests into and
/// reads replies from, and the iovec array REGISTER points it at.
struct Entry {
    buffers: ManuallyDrop<Buffers>,
    /// Whether a command naming the buffers may be in flight. The kernel may then write
    /// into them at any moment, so they are neither handed out nor freed.
    in_flight: bool,
}

struct Buffers {
    header: PageBuf,
    payload: PageBuf,
    /// On the heap so that it does not move with the entry: the kernel reads it when it
    /// runs the REGISTER, which may be after the submission (a retry in io-wq).
    iov: Box<[libc::iovec; 2]>,
}

impl Entry {
    fn new(payload_size: usize) -> io::Result<Entry> {
        let header = PageBuf::new(HEADER_SIZE)?;
        let payload = PageBuf::new(payload_size)?;
        let iov = Box::new([header.iovec(), payload.iovec()]);
        Ok(Entry { buffers: ManuallyDrop::new(Buffers { header, payload, iov }), in_flight: false })
    }

    fn iov(&self) -> *const libc::iovec {
        self.buffers.iov.as_ptr()
    }

    /// The header and payload buffers, unless a command is in flight.
    fn buffers(&mut self) -> Option<(&mut [u8], &mut [u8])> {
        if self.in_flight {
            return None;
        }
        let Buffers { header, payload, .. } = &mut *self.buffers;
        // SAFETY: the kernel writes into an entry's buffers only while one of its commands
        // is in flight (it copies a request in before completing the command, and reads the
        // reply while running the next one), and none is; the slices borrow `self`, so no
        // command can be queued while they live.
        Some(unsafe { (header.as_mut_slice(), payload.as_mut_slice()) })
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.in_flight {
            // Cancelling a command is asynchronous (it completes in the kernel's teardown of
            // the ring, after its fd is closed): rather than free memory the kernel may still
            // write into, leak it. Only happens when io_uring_enter itself failed.
            return;
        }
        // SAFETY: dropped here once and never used again.
        unsafe { ManuallyDrop::drop(&mut self.buffers) }
    }
}

/// A zeroed, page-aligned heap buffer that never moves.
struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        let page = page_size();
        let layout = len
            .max(1)
            .checked_next_multiple_of(page)
            .and_then(|size| Layout::from_size_align(size, page).ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("a buffer of {len} bytes")))?;
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(PageBuf { ptr, len, layout })
    }

    fn iovec(&self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr.as_ptr().cast(), iov_len: self.len }
    }

    /// # Safety
    /// Nothing else — the kernel included — may access the buffer while the slice lives.
    unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes, allocated, initialized (zeroed) and exclusively ours per the
        // caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by alloc_zeroed with this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0,2-5"), Some(vec![0, 2, 3, 4, 5]));
        assert_eq!(parse_cpu_list("4-5,0-1"), Some(vec![0, 1, 4, 5]));
        for bad in ["", "\n", "a", "3-1", "0-", "-1", "0,,1", "0-1-2", "70000"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_machine_has_possible_cpus() {
        let cpus = possible_cpus().expect("possible CPUs");
        assert!(cpus.contains(&0));
    }

    #[test]
    fn payload_size_follows_the_kernel() {
        let page = page_size();
        assert_eq!(RingConfig::payload_size_for(4096, 1), 8192.max(page));
        let pages = ((1 << 20) / page) as u16;
        assert_eq!(RingConfig::payload_size_for(1 << 20, pages), 1 << 20);
        assert_eq!(RingConfig::payload_size_for(1 << 20, pages + 1), (1 << 20) + page);
    }

    fn sqe_bytes(sqe: &squeue::Entry128) -> [u8; 128] {
        // SAFETY: Entry128 is 128 bytes of plain integers (repr(C), no padding).
        unsafe { std::mem::transmute_copy(sqe) }
    }

    #[test]
    fn register_sqe_carries_the_iovecs_and_queue() {
        // What io-uring itself writes into `len` proves the offset.
        let readv: squeue::Entry128 = opcode::Readv::new(types::Fd(0), std::ptr::null(), 7).build().into();
        assert_eq!(sqe_bytes(&readv)[SQE_LEN_AT..SQE_LEN_AT + 4], 7u32.to_ne_bytes());

        let iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2];
        let sqe = fuse_command(5, FUSE_IO_URING_CMD_REGISTER, 3, 0, Some(iov.as_ptr()));
        let bytes = sqe_bytes(&sqe);
        assert_eq!(bytes[0], opcode::UringCmd80::CODE);
        assert_eq!(bytes[4..8], 5i32.to_ne_bytes());
        assert_eq!(bytes[8..12], FUSE_IO_URING_CMD_REGISTER.to_ne_bytes());
        assert_eq!(bytes[16..24], (iov.as_ptr() as u64).to_ne_bytes());
        assert_eq!(bytes[24..28], 2u32.to_ne_bytes());
        // The command area starts at byte 48: fuse_uring_cmd_req { flags, commit_id, qid }.
        assert_eq!(bytes[48 + 16..48 + 18], 3u16.to_ne_bytes());

        let commit = sqe_bytes(&fuse_command(5, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, 1, 99, None));
        assert_eq!(commit[24..28], 0u32.to_ne_bytes());
        assert_eq!(commit[48 + 8..48 + 16], 99u64.to_ne_bytes());
        assert_eq!(commit[48 + 16..48 + 18], 1u16.to_ne_bytes());
    }

    /// Answers by opcode: 1 echoes op_in's first 8 bytes and the payload, 2 fails with
    /// ENOENT, 3 panics, 4 replies more than any buffer holds. A READ writes as many bytes
    /// as op_in's first byte says (255: fails after writing, 254: panics after writing).
    struct Echo;

    impl Serve for Echo {
        fn serve(&self, request: &Incoming<'_>, out: &mut Vec<u8>) -> Result<(), Errno> {
            match request.header.opcode {
                1 => {
                    out.extend_from_slice(&request.op_in[..8]);
                    out.extend_from_slice(request.payload);
                    Ok(())
                }
                2 => Err(Errno::ENOENT),
                3 => panic!("injected"),
                _ => {
                    out.resize(1 << 20, 0);
                    Ok(())
                }
            }
        }

        fn read(&self, request: &Incoming<'_>, reply: &mut [u8]) -> Result<usize, Errno> {
            assert!(request.payload.is_empty());
            let len = usize::from(request.op_in[0]);
            reply[..len].fill(b'r');
            match len {
                255 => Err(Errno::EIO),
                254 => panic!("injected"),
                _ => Ok(len),
            }
        }
    }

    /// An entry's buffers as the kernel leaves them with a request in.
    fn request(opcode: u32, unique: u64, op_in: &[u8], body: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut header = vec![0u8; HEADER_SIZE];
        let len = 40 + op_in.len() + body.len();
        header[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&opcode.to_ne_bytes());
        header[8..16].copy_from_slice(&unique.to_ne_bytes());
        header[16..24].copy_from_slice(&1u64.to_ne_bytes());
        header[OP_IN][..op_in.len()].copy_from_slice(op_in);
        header[COMMIT_ID_AT..COMMIT_ID_AT + 8].copy_from_slice(&unique.to_ne_bytes());
        write_u32(&mut header, PAYLOAD_SZ_AT, body.len() as u32);
        let mut payload = vec![0xAA; MIN_PAYLOAD_SIZE];
        payload[..body.len()].copy_from_slice(body);
        (header, payload)
    }

    /// (len, error, unique) of the out header, and payload_sz.
    fn reply(header: &[u8]) -> (u32, i32, u64, u32) {
        let error = i32::from_ne_bytes(header[4..8].try_into().expect("4 bytes"));
        (read_u32(header, 0), error, read_u64(header, 8), read_u32(header, PAYLOAD_SZ_AT))
    }

    #[test]
    fn a_reply_is_written_in_place_of_its_request() {
        let (mut header, mut payload) = request(1, 7, b"opheader", b"name\0");
        let mut out = Vec::new();
        assert_eq!(answer(&Echo, &mut header, &mut payload, &mut out, &mut 0), 7);
        assert_eq!(reply(&header), (16 + 13, 0, 7, 13));
        assert_eq!(&payload[..13], b"opheadername\0");
        assert!(header[OP_IN].iter().all(|&b| b == 0), "op_in keeps nothing of this request");
    }

    #[test]
    fn errors_panics_and_oversized_replies_become_error_replies() {
        let mut out = Vec::new();
        for (opcode, errno) in [(2, libc::ENOENT), (3, libc::EIO), (4, libc::EIO)] {
            let (mut header, mut payload) = request(opcode, 40 + u64::from(opcode), &[], b"x");
            assert_eq!(answer(&Echo, &mut header, &mut payload, &mut out, &mut 0), 40 + u64::from(opcode));
            assert_eq!(reply(&header), (16, -errno, 40 + u64::from(opcode), 0), "opcode {opcode}");
        }
    }

    #[test]
    fn a_read_is_answered_in_the_payload_buffer_and_what_it_leaves_is_wiped() {
        let mut out = Vec::new();
        let (mut header, mut payload) = request(1, 1, b"opheader", &[b'w'; 100]);
        let mut last_reply = 0;
        answer(&Echo, &mut header, &mut payload, &mut out, &mut last_reply);
        assert_eq!(last_reply, 108);

        // A shorter READ: its bytes in place, the rest of the previous reply wiped.
        let (mut header, _) = request(abi::FUSE_READ, 2, &[50], &[]);
        assert_eq!(answer(&Echo, &mut header, &mut payload, &mut out, &mut last_reply), 2);
        assert_eq!(reply(&header), (16 + 50, 0, 2, 50));
        assert!(payload[..50].iter().all(|&b| b == b'r'));
        assert!(payload[50..108].iter().all(|&b| b == 0), "the previous reply is wiped");
        assert_eq!(last_reply, 50);

        // A READ that fails or panics after writing leaves nothing it wrote.
        for (len, unique) in [(255, 3), (254, 4)] {
            let (mut header, _) = request(abi::FUSE_READ, unique, &[len], &[]);
            assert_eq!(answer(&Echo, &mut header, &mut payload, &mut out, &mut last_reply), unique);
            assert_eq!(reply(&header), (16, -libc::EIO, unique, 0));
            assert!(payload.iter().all(|&b| b == 0), "a failed read leaves nothing");
            assert_eq!(last_reply, 0);
        }
    }
}
