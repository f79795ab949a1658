//! The FUSE wire format as a ring entry carries it: parsing a request into an [`Op`] and
//! encoding reply arguments.
//!
//! Where /dev/fuse delivers one stream per request, a ring entry splits it in three:
//! `in_out` holds `fuse_in_header` ([`in_header`]), `op_in` the kernel's first argument
//! and `payload` all further arguments, concatenated exactly as on /dev/fuse. The first
//! argument is the operation's fixed header struct (`fuse_write_in`, `fuse_create_in`, ...),
//! except that
//! - LOOKUP, UNLINK, RMDIR, SYMLINK and REMOVEXATTR have a zero-sized first argument
//!   (`fuse_set_zero_arg0`, since 6.14), so their names come in the payload;
//! - READLINK and STATFS have no arguments at all.
//!
//! The kernel writes `op_in` only when the first argument is not empty, so for those
//! operations it still holds the previous request's header; [`parse`] never looks at it.
//! Nor does the ring say how many bytes of `op_in` are meaningful: each header has a fixed
//! size and is read from the start of the buffer, whatever follows.
//!
//! A reply is its arguments concatenated into the payload (built by the functions below);
//! the transport writes [`out_header`] to `in_out` separately.
//!
//! Layouts are those of include/uapi/linux/fuse.h (protocol 7.45), in the host's byte order
//! as the kernel writes them. Attributes and directory entries are encoded as fuser 0.18
//! encodes them for /dev/fuse, so that both transports answer alike.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, INodeNo, IoctlFlags, LockOwner, OpenFlags,
    RenameFlags, TimeOrNow, WriteFlags,
};

// Opcodes (`enum fuse_opcode`).
pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_READLINK: u32 = 5;
pub const FUSE_SYMLINK: u32 = 6;
pub const FUSE_MKNOD: u32 = 8;
pub const FUSE_MKDIR: u32 = 9;
pub const FUSE_UNLINK: u32 = 10;
pub const FUSE_RMDIR: u32 = 11;
pub const FUSE_RENAME: u32 = 12;
pub const FUSE_LINK: u32 = 13;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_SETXATTR: u32 = 21;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_REMOVEXATTR: u32 = 24;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_OPENDIR: u32 = 27;
pub const FUSE_READDIR: u32 = 28;
pub const FUSE_RELEASEDIR: u32 = 29;
pub const FUSE_FSYNCDIR: u32 = 30;
pub const FUSE_GETLK: u32 = 31;
pub const FUSE_SETLK: u32 = 32;
pub const FUSE_SETLKW: u32 = 33;
pub const FUSE_ACCESS: u32 = 34;
pub const FUSE_CREATE: u32 = 35;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_BMAP: u32 = 37;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_IOCTL: u32 = 39;
pub const FUSE_POLL: u32 = 40;
pub const FUSE_NOTIFY_REPLY: u32 = 41;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_FALLOCATE: u32 = 43;
pub const FUSE_READDIRPLUS: u32 = 44;
pub const FUSE_RENAME2: u32 = 45;
pub const FUSE_LSEEK: u32 = 46;
pub const FUSE_COPY_FILE_RANGE: u32 = 47;

/// Size of `struct fuse_in_header`.
pub const IN_HEADER_SIZE: usize = 40;
/// Size of `struct fuse_out_header`.
pub const OUT_HEADER_SIZE: usize = 16;

const ENTRY_OUT_SIZE: usize = 128;
const DIRENT_SIZE: usize = 24;

// Flag bits of the request headers.
const FUSE_GETATTR_FH: u32 = 1 << 0;
const FUSE_READ_LOCKOWNER: u32 = 1 << 1;
const FUSE_RELEASE_FLUSH: u32 = 1 << 0;
const FUSE_RELEASE_FLOCK_UNLOCK: u32 = 1 << 1;
const FUSE_FSYNC_FDATASYNC: u32 = 1 << 0;
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FATTR_CTIME: u32 = 1 << 10;
const FATTR_KILL_SUIDGID: u32 = 1 << 11;

/// The fields of `struct fuse_in_header` that a request's handler uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    /// The inode the operation is on; for operations on a name, its directory.
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// Reads `fuse_in_header` from the start of `bytes`; `None` if there are fewer than
/// [`IN_HEADER_SIZE`] bytes.
pub fn in_header(bytes: &[u8]) -> Option<InHeader> {
    let mut f = Fields(bytes.get(..IN_HEADER_SIZE)?);
    // Struct fields are evaluated in the order written: the header's own order.
    Some(InHeader {
        len: f.u32().ok()?,
        opcode: f.u32().ok()?,
        unique: f.u64().ok()?,
        nodeid: f.u64().ok()?,
        uid: f.u32().ok()?,
        gid: f.u32().ok()?,
        pid: f.u32().ok()?,
    })
}

/// What a SETATTR changes: each field that `valid` marks, `None` otherwise (the same for
/// both transports: fuser's setattr arguments are turned into one). macOS's crtime,
/// chgtime, bkuptime and flags never come on Linux.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setattr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub ctime: Option<SystemTime>,
    pub fh: Option<FileHandle>,
    /// FATTR_KILL_SUIDGID: the caller lacks CAP_FSETID, so a truncation clears setuid and
    /// setgid (FUSE_HANDLE_KILLPRIV_V2).
    pub kill_suidgid: bool,
}

/// A parsed request: one variant per operation, carrying the arguments of the fuser
/// `Filesystem` method that serves it, in fuser's types, so that both transports can call
/// the same handler. The inode (or, for operations on a name, the directory) is the
/// header's `nodeid` throughout.
#[derive(Debug, Clone, PartialEq)]
pub enum Op<'a> {
    Lookup {
        name: &'a OsStr,
    },
    Getattr {
        fh: Option<FileHandle>,
    },
    Setattr(Setattr),
    Readlink,
    Mknod {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    Mkdir {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    Symlink {
        link_name: &'a OsStr,
        target: &'a Path,
    },
    /// From RENAME (no flags) and RENAME2.
    Rename {
        name: &'a OsStr,
        newparent: INodeNo,
        newname: &'a OsStr,
        flags: RenameFlags,
    },
    /// `ino` is the file to link (`fuse_link_in.oldnodeid`); `newparent` is the header's
    /// `nodeid`, repeated here because `link()`'s argument order invites swapping the two.
    Link {
        ino: INodeNo,
        newparent: INodeNo,
        newname: &'a OsStr,
    },
    Open {
        flags: OpenFlags,
    },
    Read {
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
    },
    Write {
        fh: FileHandle,
        offset: u64,
        data: &'a [u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
    },
    Flush {
        fh: FileHandle,
        lock_owner: LockOwner,
    },
    Release {
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
    },
    Fsync {
        fh: FileHandle,
        datasync: bool,
    },
    Opendir {
        flags: OpenFlags,
    },
    /// `size` bounds the reply: make the [`DirBuf`] with it.
    Readdir {
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    /// `size` bounds the reply: make the [`DirBuf`] with it.
    Readdirplus {
        fh: FileHandle,
        offset: u64,
        size: u32,
    },
    Releasedir {
        fh: FileHandle,
        flags: OpenFlags,
    },
    Fsyncdir {
        fh: FileHandle,
        datasync: bool,
    },
    Statfs,
    /// `position` is macOS's and always 0 here.
    Setxattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
        position: u32,
    },
    Getxattr {
        name: &'a OsStr,
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a OsStr,
    },
    Access {
        mask: AccessFlags,
    },
    Create {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Fallocate {
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// fuser answers ENOSYS itself, without calling `ioctl()`, when `flags` has
    /// `FUSE_IOCTL_UNRESTRICTED`.
    Ioctl {
        fh: FileHandle,
        flags: IoctlFlags,
        cmd: u32,
        in_data: &'a [u8],
        out_size: u32,
    },
    Lseek {
        fh: FileHandle,
        offset: i64,
        whence: i32,
    },
    /// The source is the header's `nodeid`.
    CopyFileRange {
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
    },
    /// Any other operation, to be answered ENOSYS: the locks, BMAP and POLL (which the
    /// filesystem does not implement), and those that never come through the ring
    /// (INIT, FORGET, BATCH_FORGET, INTERRUPT).
    Other(u32),
}

/// Parses a request from its ring buffers: `op_in` as the ring entry holds it (only its
/// start is read, and not at all for operations without a header), `payload` holding at
/// least the request's further arguments.
///
/// Truncated or malformed arguments (a missing header, a name without its NUL, less data
/// than announced) are `EIO`; offsets beyond `off_t` are `EINVAL`, as fuser has them.
pub fn parse<'a>(header: &InHeader, op_in: &'a [u8], payload: &'a [u8]) -> Result<Op<'a>, Errno> {
    let mut more = Fields(payload);
    Ok(match header.opcode {
        FUSE_LOOKUP => Op::Lookup { name: more.name()? },
        FUSE_GETATTR => {
            // fuse_getattr_in: getattr_flags, dummy, fh
            let mut arg = op_header(op_in, 16)?;
            let getattr_flags = arg.u32()?;
            arg.skip(4)?;
            let fh = FileHandle(arg.u64()?);
            Op::Getattr { fh: (getattr_flags & FUSE_GETATTR_FH != 0).then_some(fh) }
        }
        FUSE_SETATTR => setattr(op_header(op_in, 88)?)?,
        FUSE_READLINK => Op::Readlink,
        FUSE_SYMLINK => Op::Symlink { link_name: more.name()?, target: Path::new(more.name()?) },
        FUSE_MKNOD => {
            // fuse_mknod_in: mode, rdev, umask, padding
            let mut arg = op_header(op_in, 16)?;
            let (mode, rdev, umask) = (arg.u32()?, arg.u32()?, arg.u32()?);
            Op::Mknod { name: more.name()?, mode, umask, rdev }
        }
        FUSE_MKDIR => {
            // fuse_mkdir_in: mode, umask
            let mut arg = op_header(op_in, 8)?;
            let (mode, umask) = (arg.u32()?, arg.u32()?);
            Op::Mkdir { name: more.name()?, mode, umask }
        }
        FUSE_UNLINK => Op::Unlink { name: more.name()? },
        FUSE_RMDIR => Op::Rmdir { name: more.name()? },
        FUSE_RENAME => {
            // fuse_rename_in: newdir
            let newparent = INodeNo(op_header(op_in, 8)?.u64()?);
            Op::Rename { name: more.name()?, newparent, newname: more.name()?, flags: RenameFlags::empty() }
        }
        FUSE_RENAME2 => {
            // fuse_rename2_in: newdir, flags, padding
            let mut arg = op_header(op_in, 16)?;
            let newparent = INodeNo(arg.u64()?);
            let flags = RenameFlags::from_bits_retain(arg.u32()?);
            Op::Rename { name: more.name()?, newparent, newname: more.name()?, flags }
        }
        FUSE_LINK => {
            // fuse_link_in: oldnodeid
            let ino = INodeNo(op_header(op_in, 8)?.u64()?);
            Op::Link { ino, newparent: INodeNo(header.nodeid), newname: more.name()? }
        }
        // fuse_open_in: flags, open_flags
        FUSE_OPEN => Op::Open { flags: OpenFlags(op_header(op_in, 8)?.i32()?) },
        FUSE_OPENDIR => Op::Opendir { flags: OpenFlags(op_header(op_in, 8)?.i32()?) },
        FUSE_READ => {
            let read = ReadIn::parse(op_in)?;
            Op::Read {
                fh: read.fh,
                offset: off_t(read.offset)?,
                size: read.size,
                flags: read.flags,
                lock_owner: (read.read_flags & FUSE_READ_LOCKOWNER != 0).then_some(read.lock_owner),
            }
        }
        FUSE_READDIR => {
            let read = ReadIn::parse(op_in)?;
            Op::Readdir { fh: read.fh, offset: read.offset, size: read.size }
        }
        FUSE_READDIRPLUS => {
            let read = ReadIn::parse(op_in)?;
            Op::Readdirplus { fh: read.fh, offset: read.offset, size: read.size }
        }
        FUSE_WRITE => {
            // fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
            let mut arg = op_header(op_in, 40)?;
            let fh = FileHandle(arg.u64()?);
            let offset = off_t(arg.u64()?)?;
            let size = arg.u32()?;
            let write_flags = WriteFlags::from_bits_retain(arg.u32()?);
            let lock_owner = LockOwner(arg.u64()?);
            let flags = OpenFlags(arg.i32()?);
            Op::Write {
                fh,
                offset,
                data: more.bytes(size)?,
                write_flags,
                flags,
                lock_owner: write_flags.contains(WriteFlags::FUSE_WRITE_LOCKOWNER).then_some(lock_owner),
            }
        }
        FUSE_STATFS => Op::Statfs,
        FUSE_FLUSH => {
            // fuse_flush_in: fh, unused, padding, lock_owner
            let mut arg = op_header(op_in, 24)?;
            let fh = FileHandle(arg.u64()?);
            arg.skip(8)?;
            Op::Flush { fh, lock_owner: LockOwner(arg.u64()?) }
        }
        FUSE_RELEASE => {
            let release = ReleaseIn::parse(op_in)?;
            Op::Release {
                fh: release.fh,
                flags: release.flags,
                lock_owner: (release.release_flags & FUSE_RELEASE_FLOCK_UNLOCK != 0).then_some(release.lock_owner),
                flush: release.release_flags & FUSE_RELEASE_FLUSH != 0,
            }
        }
        FUSE_RELEASEDIR => {
            let release = ReleaseIn::parse(op_in)?;
            Op::Releasedir { fh: release.fh, flags: release.flags }
        }
        FUSE_FSYNC => {
            let (fh, datasync) = fsync_in(op_in)?;
            Op::Fsync { fh, datasync }
        }
        FUSE_FSYNCDIR => {
            let (fh, datasync) = fsync_in(op_in)?;
            Op::Fsyncdir { fh, datasync }
        }
        FUSE_SETXATTR => {
            // fuse_setxattr_in: size, flags, then (with FUSE_SETXATTR_EXT) setxattr_flags,
            // padding. Without the extension the kernel sends only the first 8 bytes; the
            // payload is the same either way.
            let mut arg = op_header(op_in, 8)?;
            let (size, flags) = (arg.u32()?, arg.i32()?);
            Op::Setxattr { name: more.name()?, value: more.bytes(size)?, flags, position: 0 }
        }
        FUSE_GETXATTR => {
            // fuse_getxattr_in: size, padding
            let size = op_header(op_in, 8)?.u32()?;
            Op::Getxattr { name: more.name()?, size }
        }
        FUSE_LISTXATTR => Op::Listxattr { size: op_header(op_in, 8)?.u32()? },
        FUSE_REMOVEXATTR => Op::Removexattr { name: more.name()? },
        FUSE_ACCESS => {
            // fuse_access_in: mask, padding
            Op::Access { mask: AccessFlags::from_bits_retain(op_header(op_in, 8)?.i32()?) }
        }
        FUSE_CREATE => {
            // fuse_create_in: flags, mode, umask, open_flags
            let mut arg = op_header(op_in, 16)?;
            let (flags, mode, umask) = (arg.i32()?, arg.u32()?, arg.u32()?);
            Op::Create { name: more.name()?, mode, umask, flags }
        }
        FUSE_FALLOCATE => {
            // fuse_fallocate_in: fh, offset, length, mode, padding
            let mut arg = op_header(op_in, 32)?;
            let fh = FileHandle(arg.u64()?);
            let offset = off_t(arg.u64()?)?;
            let length = off_t(arg.u64()?)?;
            Op::Fallocate { fh, offset, length, mode: arg.i32()? }
        }
        FUSE_IOCTL => {
            // fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size
            let mut arg = op_header(op_in, 32)?;
            let fh = FileHandle(arg.u64()?);
            let flags = IoctlFlags::from_bits_retain(arg.u32()?);
            let cmd = arg.u32()?;
            arg.skip(8)?;
            let (in_size, out_size) = (arg.u32()?, arg.u32()?);
            Op::Ioctl { fh, flags, cmd, in_data: more.bytes(in_size)?, out_size }
        }
        FUSE_LSEEK => {
            // fuse_lseek_in: fh, offset, whence, padding
            let mut arg = op_header(op_in, 24)?;
            Op::Lseek { fh: FileHandle(arg.u64()?), offset: arg.i64()?, whence: arg.i32()? }
        }
        FUSE_COPY_FILE_RANGE => {
            // fuse_copy_file_range_in: fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
            let mut arg = op_header(op_in, 56)?;
            Op::CopyFileRange {
                fh_in: FileHandle(arg.u64()?),
                offset_in: off_t(arg.u64()?)?,
                ino_out: INodeNo(arg.u64()?),
                fh_out: FileHandle(arg.u64()?),
                offset_out: off_t(arg.u64()?)?,
                len: arg.u64()?,
                flags: CopyFileRangeFlags::from_bits_retain(arg.u64()?),
            }
        }
        other => Op::Other(other),
    })
}

/// Reads fields off the front of a buffer the kernel filled, in its byte order; running
/// short is `EIO`.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Errno> {
        let (head, rest) = self.0.split_at_checked(len).ok_or(Errno::EIO)?;
        self.0 = rest;
        Ok(head)
    }

    /// As many bytes as a header announced.
    fn bytes(&mut self, len: u32) -> Result<&'a [u8], Errno> {
        self.take(usize::try_from(len).map_err(|_| Errno::EIO)?)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Errno> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(Errno::EIO)?;
        self.0 = rest;
        Ok(*head)
    }

    fn skip(&mut self, len: usize) -> Result<(), Errno> {
        self.take(len).map(drop)
    }

    fn u32(&mut self) -> Result<u32, Errno> {
        self.array().map(u32::from_ne_bytes)
    }

    fn i32(&mut self) -> Result<i32, Errno> {
        self.array().map(i32::from_ne_bytes)
    }

    fn u64(&mut self) -> Result<u64, Errno> {
        self.array().map(u64::from_ne_bytes)
    }

    fn i64(&mut self) -> Result<i64, Errno> {
        self.array().map(i64::from_ne_bytes)
    }

    /// A NUL-terminated name, without its NUL.
    fn name(&mut self) -> Result<&'a OsStr, Errno> {
        let len = self.0.iter().position(|&b| b == 0).ok_or(Errno::EIO)?;
        let name = self.take(len)?;
        self.skip(1)?;
        Ok(OsStr::from_bytes(name))
    }
}

/// The operation's header struct, `size` bytes at the start of `op_in`.
fn op_header(op_in: &[u8], size: usize) -> Result<Fields<'_>, Errno> {
    op_in.get(..size).map(Fields).ok_or(Errno::EIO)
}

/// An offset the kernel passes as u64 but means as `off_t`.
fn off_t(offset: u64) -> Result<u64, Errno> {
    i64::try_from(offset).map(|_| offset).map_err(|_| Errno::EINVAL)
}

/// `fuse_read_in`, shared by READ, READDIR and READDIRPLUS.
struct ReadIn {
    fh: FileHandle,
    offset: u64,
    size: u32,
    read_flags: u32,
    lock_owner: LockOwner,
    flags: OpenFlags,
}

impl ReadIn {
    fn parse(op_in: &[u8]) -> Result<ReadIn, Errno> {
        // fh, offset, size, read_flags, lock_owner, flags, padding
        let mut arg = op_header(op_in, 40)?;
        Ok(ReadIn {
            fh: FileHandle(arg.u64()?),
            offset: arg.u64()?,
            size: arg.u32()?,
            read_flags: arg.u32()?,
            lock_owner: LockOwner(arg.u64()?),
            flags: OpenFlags(arg.i32()?),
        })
    }
}

/// `fuse_release_in`, shared by RELEASE and RELEASEDIR.
struct ReleaseIn {
    fh: FileHandle,
    flags: OpenFlags,
    release_flags: u32,
    lock_owner: LockOwner,
}

impl ReleaseIn {
    fn parse(op_in: &[u8]) -> Result<ReleaseIn, Errno> {
        // fh, flags, release_flags, lock_owner
        let mut arg = op_header(op_in, 24)?;
        Ok(ReleaseIn {
            fh: FileHandle(arg.u64()?),
            flags: OpenFlags(arg.i32()?),
            release_flags: arg.u32()?,
            lock_owner: LockOwner(arg.u64()?),
        })
    }
}

/// `fuse_fsync_in` (fh, fsync_flags, padding): the handle and whether only data is to be
/// synced.
fn fsync_in(op_in: &[u8]) -> Result<(FileHandle, bool), Errno> {
    let mut arg = op_header(op_in, 16)?;
    Ok((FileHandle(arg.u64()?), arg.u32()? & FUSE_FSYNC_FDATASYNC != 0))
}

fn setattr(mut arg: Fields<'_>) -> Result<Op<'static>, Errno> {
    // fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime,
    // atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5
    let valid = arg.u32()?;
    arg.skip(4)?;
    let fh = FileHandle(arg.u64()?);
    let size = arg.u64()?;
    arg.skip(8)?;
    // Times are `u64` in the header but signed seconds, as in `struct timespec`.
    let (atime, mtime, ctime) = (arg.i64()?, arg.i64()?, arg.i64()?);
    let (atimensec, mtimensec, ctimensec) = (arg.u32()?, arg.u32()?, arg.u32()?);
    let mode = arg.u32()?;
    arg.skip(4)?;
    let (uid, gid) = (arg.u32()?, arg.u32()?);

    let has = |bit: u32| valid & bit != 0;
    let time_or_now = |set: u32, now: u32, secs: i64, nsecs: u32| -> Result<Option<TimeOrNow>, Errno> {
        Ok(match (has(set), has(now)) {
            (false, _) => None,
            (true, true) => Some(TimeOrNow::Now),
            (true, false) => Some(TimeOrNow::SpecificTime(system_time(secs, nsecs)?)),
        })
    };
    Ok(Op::Setattr(Setattr {
        mode: has(FATTR_MODE).then_some(mode),
        uid: has(FATTR_UID).then_some(uid),
        gid: has(FATTR_GID).then_some(gid),
        size: has(FATTR_SIZE).then_some(size),
        atime: time_or_now(FATTR_ATIME, FATTR_ATIME_NOW, atime, atimensec)?,
        mtime: time_or_now(FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtimensec)?,
        ctime: if has(FATTR_CTIME) { Some(system_time(ctime, ctimensec)?) } else { None },
        fh: has(FATTR_FH).then_some(fh),
        kill_suidgid: has(FATTR_KILL_SUIDGID),
    }))
}

/// The time `secs` seconds (negative before the epoch) and then `nsecs` nanoseconds after
/// the epoch, as `struct timespec` counts; `EINVAL` if `SystemTime` cannot hold it.
fn system_time(secs: i64, nsecs: u32) -> Result<SystemTime, Errno> {
    let whole = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    whole.and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsecs)))).ok_or(Errno::EINVAL)
}

/// `time` as `struct timespec` counts it: seconds since the epoch, rounded down (negative
/// before it), and nanoseconds after that; saturated where `i64` ends.
fn timespec(time: SystemTime) -> (i64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => match i64::try_from(after.as_secs()) {
            Ok(secs) => (secs, after.subsec_nanos()),
            Err(_) => (i64::MAX, 999_999_999),
        },
        Err(before) => {
            let before = before.duration();
            let secs = i128::from(before.as_secs());
            let (secs, nanos) = match before.subsec_nanos() {
                0 => (-secs, 0),
                nanos => (-secs - 1, 1_000_000_000 - nanos),
            };
            i64::try_from(secs).map_or((i64::MIN, 0), |secs| (secs, nanos))
        }
    }
}

/// The `S_IF*` bits of a file type, as fuser maps them.
fn type_bits(kind: FileType) -> u32 {
    match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// The `DT_*` value of a file type: its `S_IF*` bits shifted down, as fuser computes it.
fn dirent_type(kind: FileType) -> u32 {
    type_bits(kind) >> 12
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_ne_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_ne_bytes());
}

fn put_i64(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&value.to_ne_bytes());
}

/// `struct fuse_out_header` for a reply of `len` bytes in all (this header included);
/// `error` is 0 or a negated errno.
pub fn out_header(unique: u64, error: i32, len: u32) -> [u8; OUT_HEADER_SIZE] {
    let mut header = [0; OUT_HEADER_SIZE];
    header[0..4].copy_from_slice(&len.to_ne_bytes());
    header[4..8].copy_from_slice(&error.to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    header
}

/// `struct fuse_attr` (88 bytes).
fn put_attr(out: &mut Vec<u8>, attr: &FileAttr) {
    let (atime, atimensec) = timespec(attr.atime);
    let (mtime, mtimensec) = timespec(attr.mtime);
    let (ctime, ctimensec) = timespec(attr.ctime);
    put_u64(out, attr.ino.0);
    put_u64(out, attr.size);
    put_u64(out, attr.blocks);
    put_i64(out, atime);
    put_i64(out, mtime);
    put_i64(out, ctime);
    put_u32(out, atimensec);
    put_u32(out, mtimensec);
    put_u32(out, ctimensec);
    put_u32(out, type_bits(attr.kind) | u32::from(attr.perm));
    put_u32(out, attr.nlink);
    put_u32(out, attr.uid);
    put_u32(out, attr.gid);
    put_u32(out, attr.rdev);
    put_u32(out, attr.blksize);
    // fuse_attr.flags (FUSE_ATTR_*): none apply; `FileAttr::flags` is macOS's chflags.
    put_u32(out, 0);
}

/// `struct fuse_entry_out` (128 bytes), for LOOKUP, MKNOD, MKDIR, SYMLINK and LINK; `ttl`
/// holds for both the name and the attributes.
pub fn entry(out: &mut Vec<u8>, attr: &FileAttr, ttl: Duration, generation: u64) {
    put_u64(out, attr.ino.0);
    put_u64(out, generation);
    put_u64(out, ttl.as_secs());
    put_u64(out, ttl.as_secs());
    put_u32(out, ttl.subsec_nanos());
    put_u32(out, ttl.subsec_nanos());
    put_attr(out, attr);
}

/// `struct fuse_attr_out` (104 bytes), for GETATTR and SETATTR.
pub fn attr(out: &mut Vec<u8>, attr: &FileAttr, ttl: Duration) {
    put_u64(out, ttl.as_secs());
    put_u32(out, ttl.subsec_nanos());
    put_u32(out, 0);
    put_attr(out, attr);
}

/// `struct fuse_open_out` (16 bytes), for OPEN and OPENDIR; `flags` are `FOPEN_*`.
pub fn open(out: &mut Vec<u8>, fh: u64, flags: u32) {
    put_u64(out, fh);
    put_u32(out, flags);
    // backing_id: no passthrough.
    put_u32(out, 0);
}

/// CREATE's reply: `fuse_entry_out` then `fuse_open_out` (144 bytes).
pub fn create(out: &mut Vec<u8>, attr: &FileAttr, ttl: Duration, generation: u64, fh: u64, flags: u32) {
    entry(out, attr, ttl, generation);
    open(out, fh, flags);
}

/// `struct fuse_write_out` (8 bytes): how many bytes were written.
pub fn write(out: &mut Vec<u8>, size: u32) {
    put_u32(out, size);
    put_u32(out, 0);
}

/// A STATFS answer: the fields of `struct fuse_kstatfs`, those of fuser's
/// `ReplyStatfs::statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// `struct fuse_statfs_out` (80 bytes).
pub fn statfs(out: &mut Vec<u8>, s: &Statfs) {
    for count in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
        put_u64(out, count);
    }
    for size in [s.bsize, s.namelen, s.frsize] {
        put_u32(out, size);
    }
    // padding, spare[6]
    out.extend_from_slice(&[0; 28]);
}

/// `struct fuse_getxattr_out` (8 bytes): the size of a value or name list, for GETXATTR and
/// LISTXATTR asked with size 0. (Asked with a size, the reply is the data itself.)
pub fn xattr_size(out: &mut Vec<u8>, size: u32) {
    put_u32(out, size);
    put_u32(out, 0);
}

/// `struct fuse_lseek_out` (8 bytes).
pub fn lseek(out: &mut Vec<u8>, offset: i64) {
    put_i64(out, offset);
}

/// A READDIR or READDIRPLUS reply: records of `fuse_dirent` or `fuse_direntplus`, each
/// padded to 8 bytes, up to the size the kernel asked for.
#[derive(Debug)]
pub struct DirBuf {
    max: usize,
    buf: Vec<u8>,
}

impl DirBuf {
    /// An empty reply that will hold at most `max` bytes (the request's `size`).
    pub fn new(max: usize) -> DirBuf {
        // `max` comes from the kernel: reserve for a typical reply only.
        DirBuf { max, buf: Vec::with_capacity(max.min(64 * 1024)) }
    }

    /// Adds a READDIR entry; `offset` is what the kernel passes back to continue after it.
    /// `true` means the reply is full and the entry was not added.
    #[must_use]
    pub fn add(&mut self, ino: u64, offset: u64, kind: FileType, name: &OsStr) -> bool {
        let Some(record) = self.room(DIRENT_SIZE, name) else { return true };
        let start = self.buf.len();
        self.put_dirent(ino, offset, kind, name);
        self.buf.resize(start + record, 0);
        false
    }

    /// Adds a READDIRPLUS entry: the entry as LOOKUP would answer it, then the name.
    /// `true` means the reply is full and the entry was not added.
    #[must_use]
    pub fn add_plus(&mut self, attr: &FileAttr, offset: u64, name: &OsStr, ttl: Duration, generation: u64) -> bool {
        let Some(record) = self.room(ENTRY_OUT_SIZE + DIRENT_SIZE, name) else { return true };
        let start = self.buf.len();
        entry(&mut self.buf, attr, ttl, generation);
        self.put_dirent(attr.ino.0, offset, attr.kind, name);
        self.buf.resize(start + record, 0);
        false
    }

    /// The reply's bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The padded size of a record of `fixed` bytes and `name`, if it still fits (and the
    /// name's length fits `namelen`).
    fn room(&self, fixed: usize, name: &OsStr) -> Option<usize> {
        u32::try_from(name.len()).ok()?;
        let record = fixed.checked_add(name.len())?.checked_next_multiple_of(8)?;
        (self.buf.len().checked_add(record)? <= self.max).then_some(record)
    }

    fn put_dirent(&mut self, ino: u64, offset: u64, kind: FileType, name: &OsStr) {
        let name = name.as_bytes();
        put_u64(&mut self.buf, ino);
        put_u64(&mut self.buf, offset);
        // `room` has checked that the length fits.
        put_u32(&mut self.buf, u32::try_from(name.len()).unwrap_or(u32::MAX));
        put_u32(&mut self.buf, dirent_type(kind));
        self.buf.extend_from_slice(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a buffer field by field in the kernel's byte order, so that the tests can
    /// write each uapi struct out by hand.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn u32(mut self, v: u32) -> Raw {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
        fn i32(self, v: i32) -> Raw {
            self.u32(u32::from_ne_bytes(v.to_ne_bytes()))
        }
        fn u64(mut self, v: u64) -> Raw {
            self.0.extend_from_slice(&v.to_ne_bytes());
            self
        }
        fn i64(self, v: i64) -> Raw {
            self.u64(u64::from_ne_bytes(v.to_ne_bytes()))
        }
        fn bytes(mut self, b: &[u8]) -> Raw {
            self.0.extend_from_slice(b);
            self
        }
        fn done(self) -> Vec<u8> {
            self.0
        }
    }

    fn raw() -> Raw {
        Raw::default()
    }

    fn header(opcode: u32, nodeid: u64) -> InHeader {
        InHeader { len: 0, opcode, unique: 7, nodeid, uid: 1000, gid: 100, pid: 42 }
    }

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// What the ring's op_in holds after an earlier request: operations without a header
    /// must not read it.
    const STALE: [u8; 128] = [0xa5; 128];

    fn parse_ok<'a>(opcode: u32, op_in: &'a [u8], payload: &'a [u8]) -> Op<'a> {
        match parse(&header(opcode, 5), op_in, payload) {
            Ok(op) => op,
            Err(e) => panic!("opcode {opcode}: {e:?}"),
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn in_header_reads_the_uapi_layout() {
        let bytes = [
            0x38, 0, 0, 0, // len = 56
            1, 0, 0, 0, // opcode = LOOKUP
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // unique
            2, 0, 0, 0, 0, 0, 0, 0, // nodeid
            0xe8, 3, 0, 0, // uid = 1000
            100, 0, 0, 0, // gid
            0x39, 0x30, 0, 0, // pid = 12345
            0, 0, 0, 0, // total_extlen, padding
        ];
        assert_eq!(
            in_header(&bytes),
            Some(InHeader {
                len: 56,
                opcode: FUSE_LOOKUP,
                unique: 0x1122_3344_5566_7788,
                nodeid: 2,
                uid: 1000,
                gid: 100,
                pid: 12345
            })
        );
        assert_eq!(in_header(&bytes[..39]), None);
        assert_eq!(in_header(&[]), None);
    }

    #[test]
    fn lookup_takes_the_name_from_the_payload_and_ignores_op_in() {
        assert_eq!(parse_ok(FUSE_LOOKUP, &STALE, b"hello.txt\0"), Op::Lookup { name: os("hello.txt") });
        assert_eq!(parse_ok(FUSE_LOOKUP, &[], b"..\0"), Op::Lookup { name: os("..") });
    }

    #[test]
    fn a_name_without_its_nul_is_eio() {
        for opcode in [FUSE_LOOKUP, FUSE_UNLINK, FUSE_RMDIR, FUSE_REMOVEXATTR, FUSE_SYMLINK] {
            assert_eq!(parse(&header(opcode, 1), &[], b"name"), Err(Errno::EIO), "opcode {opcode}");
            assert_eq!(parse(&header(opcode, 1), &[], b""), Err(Errno::EIO), "opcode {opcode}");
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn getattr_has_a_handle_only_with_fuse_getattr_fh() {
        // fuse_getattr_in: getattr_flags, dummy, fh
        let with_fh = [1, 0, 0, 0, 0, 0, 0, 0, 0x34, 0x12, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_ok(FUSE_GETATTR, &with_fh, &[]), Op::Getattr { fh: Some(FileHandle(0x1234)) });
        let without = [0, 0, 0, 0, 0, 0, 0, 0, 0x34, 0x12, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_ok(FUSE_GETATTR, &without, &[]), Op::Getattr { fh: None });
    }

    /// fuse_setattr_in with every field set to something recognisable.
    fn setattr_in(valid: u32) -> Vec<u8> {
        raw()
            .u32(valid)
            .u32(0) // padding
            .u64(9) // fh
            .u64(4096) // size
            .u64(0xdead) // lock_owner
            .i64(1_700_000_000) // atime
            .i64(-2) // mtime: before the epoch
            .i64(1_600_000_000) // ctime
            .u32(5) // atimensec
            .u32(800_000_000) // mtimensec
            .u32(7) // ctimensec
            .u32(0o640) // mode
            .u32(0) // unused4
            .u32(1001) // uid
            .u32(1002) // gid
            .u32(0) // unused5
            .done()
    }

    #[test]
    fn setattr_decodes_the_valid_mask() {
        let all = FATTR_MODE
            | FATTR_UID
            | FATTR_GID
            | FATTR_SIZE
            | FATTR_ATIME
            | FATTR_MTIME
            | FATTR_FH
            | FATTR_CTIME
            | FATTR_KILL_SUIDGID;
        let op_in = setattr_in(all);
        assert_eq!(op_in.len(), 88);
        assert_eq!(
            parse_ok(FUSE_SETATTR, &op_in, &[]),
            Op::Setattr(Setattr {
                mode: Some(0o640),
                uid: Some(1001),
                gid: Some(1002),
                size: Some(4096),
                atime: Some(TimeOrNow::SpecificTime(UNIX_EPOCH + Duration::new(1_700_000_000, 5))),
                // -2 s + 0.8 s: 1.2 s before the epoch.
                mtime: Some(TimeOrNow::SpecificTime(UNIX_EPOCH - Duration::from_millis(1200))),
                ctime: Some(UNIX_EPOCH + Duration::new(1_600_000_000, 7)),
                fh: Some(FileHandle(9)),
                kill_suidgid: true,
            })
        );
    }

    #[test]
    fn setattr_now_and_nothing() {
        let op_in = setattr_in(FATTR_ATIME | FATTR_ATIME_NOW | FATTR_MTIME | FATTR_MTIME_NOW);
        let Op::Setattr(Setattr { atime, mtime, mode, size, fh, ctime, kill_suidgid, .. }) =
            parse_ok(FUSE_SETATTR, &op_in, &[])
        else {
            panic!("not a setattr")
        };
        assert_eq!((atime, mtime), (Some(TimeOrNow::Now), Some(TimeOrNow::Now)));
        assert_eq!((mode, size, fh, ctime, kill_suidgid), (None, None, None, None, false));

        // A *_NOW bit without its time bit sets nothing.
        let op_in = setattr_in(FATTR_ATIME_NOW);
        let Op::Setattr(Setattr { atime, .. }) = parse_ok(FUSE_SETATTR, &op_in, &[]) else { panic!("not a setattr") };
        assert_eq!(atime, None);
    }

    #[test]
    fn setattr_with_a_time_systemtime_cannot_hold_is_einval() {
        let mut op_in = setattr_in(FATTR_CTIME);
        op_in[48..56].copy_from_slice(&i64::MAX.to_ne_bytes()); // ctime
        op_in[64..68].copy_from_slice(&2_000_000_000u32.to_ne_bytes()); // ctimensec
        assert_eq!(parse(&header(FUSE_SETATTR, 1), &op_in, &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn operations_without_arguments() {
        assert_eq!(parse_ok(FUSE_READLINK, &STALE, &[]), Op::Readlink);
        assert_eq!(parse_ok(FUSE_STATFS, &STALE, &[]), Op::Statfs);
    }

    #[test]
    fn mknod_mkdir_create() {
        // fuse_mknod_in: mode, rdev, umask, padding
        let mknod_in = raw().u32(0o10644).u32(0x0801).u32(0o022).u32(0).done();
        assert_eq!(
            parse_ok(FUSE_MKNOD, &mknod_in, b"fifo\0"),
            Op::Mknod { name: os("fifo"), mode: 0o10644, umask: 0o022, rdev: 0x0801 }
        );
        // fuse_mkdir_in: mode, umask
        let mkdir_in = raw().u32(0o755).u32(0o027).done();
        assert_eq!(parse_ok(FUSE_MKDIR, &mkdir_in, b"dir\0"), Op::Mkdir { name: os("dir"), mode: 0o755, umask: 0o027 });
        // fuse_create_in: flags, mode, umask, open_flags; an extension (here a fake
        // security context) may follow the name, and is not part of it.
        let create_in = raw().i32(libc::O_WRONLY | libc::O_CREAT).u32(0o100600).u32(0o077).u32(0).done();
        assert_eq!(
            parse_ok(FUSE_CREATE, &create_in, b"new\0\x20\0\0\0\x01\0\0\0ext\0"),
            Op::Create { name: os("new"), mode: 0o100600, umask: 0o077, flags: libc::O_WRONLY | libc::O_CREAT }
        );
    }

    #[test]
    fn unlink_rmdir_symlink_have_everything_in_the_payload() {
        assert_eq!(parse_ok(FUSE_UNLINK, &STALE, b"gone\0"), Op::Unlink { name: os("gone") });
        assert_eq!(parse_ok(FUSE_RMDIR, &STALE, b"dir\0"), Op::Rmdir { name: os("dir") });
        assert_eq!(
            parse_ok(FUSE_SYMLINK, &STALE, b"link\0../target/file\0"),
            Op::Symlink { link_name: os("link"), target: Path::new("../target/file") }
        );
        assert_eq!(parse(&header(FUSE_SYMLINK, 1), &[], b"link\0target"), Err(Errno::EIO));
    }

    #[test]
    fn rename_and_rename2() {
        // fuse_rename_in: newdir
        let rename_in = raw().u64(77).done();
        assert_eq!(
            parse_ok(FUSE_RENAME, &rename_in, b"old\0new\0"),
            Op::Rename { name: os("old"), newparent: INodeNo(77), newname: os("new"), flags: RenameFlags::empty() }
        );
        // fuse_rename2_in: newdir, flags, padding
        let rename2_in = raw().u64(78).u32(libc::RENAME_NOREPLACE).u32(0).done();
        assert_eq!(
            parse_ok(FUSE_RENAME2, &rename2_in, b"a\0b\0"),
            Op::Rename {
                name: os("a"),
                newparent: INodeNo(78),
                newname: os("b"),
                flags: RenameFlags::RENAME_NOREPLACE
            }
        );
        assert_eq!(parse(&header(FUSE_RENAME2, 1), &rename2_in, b"a\0b"), Err(Errno::EIO));
    }

    #[test]
    fn link_takes_the_file_from_link_in_and_the_new_parent_from_the_header() {
        // fuse_link_in: oldnodeid
        let link_in = raw().u64(1234).done();
        assert_eq!(
            parse(&header(FUSE_LINK, 56), &link_in, b"hard\0"),
            Ok(Op::Link { ino: INodeNo(1234), newparent: INodeNo(56), newname: os("hard") })
        );
    }

    #[test]
    fn open_and_opendir() {
        // fuse_open_in: flags, open_flags
        let open_in = raw().i32(libc::O_RDWR | libc::O_APPEND).u32(0).done();
        assert_eq!(parse_ok(FUSE_OPEN, &open_in, &[]), Op::Open { flags: OpenFlags(libc::O_RDWR | libc::O_APPEND) });
        let opendir_in = raw().i32(libc::O_RDONLY | libc::O_DIRECTORY).u32(0).done();
        assert_eq!(
            parse_ok(FUSE_OPENDIR, &opendir_in, &[]),
            Op::Opendir { flags: OpenFlags(libc::O_RDONLY | libc::O_DIRECTORY) }
        );
    }

    /// fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
    fn read_in(offset: u64, read_flags: u32) -> Vec<u8> {
        raw().u64(3).u64(offset).u32(131072).u32(read_flags).u64(0xabc).i32(libc::O_RDONLY).u32(0).done()
    }

    #[test]
    fn read_readdir_readdirplus() {
        assert_eq!(
            parse_ok(FUSE_READ, &read_in(8192, 0), &[]),
            Op::Read {
                fh: FileHandle(3),
                offset: 8192,
                size: 131072,
                flags: OpenFlags(libc::O_RDONLY),
                lock_owner: None
            }
        );
        let Op::Read { lock_owner, .. } = parse_ok(FUSE_READ, &read_in(0, FUSE_READ_LOCKOWNER), &[]) else {
            panic!("not a read")
        };
        assert_eq!(lock_owner, Some(LockOwner(0xabc)));
        assert_eq!(parse(&header(FUSE_READ, 1), &read_in(1 << 63, 0), &[]), Err(Errno::EINVAL));

        // A directory offset is the filesystem's own cookie: any value goes.
        assert_eq!(
            parse_ok(FUSE_READDIR, &read_in(u64::MAX, 0), &[]),
            Op::Readdir { fh: FileHandle(3), offset: u64::MAX, size: 131072 }
        );
        assert_eq!(
            parse_ok(FUSE_READDIRPLUS, &read_in(2, 0), &[]),
            Op::Readdirplus { fh: FileHandle(3), offset: 2, size: 131072 }
        );
    }

    /// fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
    fn write_in(size: u32, write_flags: u32) -> Vec<u8> {
        raw().u64(11).u64(4096).u32(size).u32(write_flags).u64(0x10c).i32(libc::O_WRONLY).u32(0).done()
    }

    #[test]
    fn write_takes_size_bytes_of_payload() {
        assert_eq!(
            parse_ok(FUSE_WRITE, &write_in(5, 0), b"hello"),
            Op::Write {
                fh: FileHandle(11),
                offset: 4096,
                data: b"hello",
                write_flags: WriteFlags::empty(),
                flags: OpenFlags(libc::O_WRONLY),
                lock_owner: None,
            }
        );
        // A payload buffer larger than the request: the rest is not data.
        let op_in = write_in(3, 3);
        let Op::Write { data, write_flags, lock_owner, .. } = parse_ok(FUSE_WRITE, &op_in, b"abcdef") else {
            panic!("not a write")
        };
        assert_eq!(data, b"abc");
        assert_eq!(write_flags, WriteFlags::FUSE_WRITE_CACHE | WriteFlags::FUSE_WRITE_LOCKOWNER);
        assert_eq!(lock_owner, Some(LockOwner(0x10c)));
        // Less data than announced.
        assert_eq!(parse(&header(FUSE_WRITE, 1), &write_in(6, 0), b"hello"), Err(Errno::EIO));
        assert_eq!(parse(&header(FUSE_WRITE, 1), &write_in(u32::MAX, 0), b"hello"), Err(Errno::EIO));
    }

    #[test]
    fn flush_release_releasedir() {
        // fuse_flush_in: fh, unused, padding, lock_owner
        let flush_in = raw().u64(21).u32(0).u32(0).u64(0x77).done();
        assert_eq!(parse_ok(FUSE_FLUSH, &flush_in, &[]), Op::Flush { fh: FileHandle(21), lock_owner: LockOwner(0x77) });

        // fuse_release_in: fh, flags, release_flags, lock_owner
        let release_in = |release_flags| raw().u64(22).i32(libc::O_RDWR).u32(release_flags).u64(0x78).done();
        assert_eq!(
            parse_ok(FUSE_RELEASE, &release_in(0), &[]),
            Op::Release { fh: FileHandle(22), flags: OpenFlags(libc::O_RDWR), lock_owner: None, flush: false }
        );
        assert_eq!(
            parse_ok(FUSE_RELEASE, &release_in(FUSE_RELEASE_FLUSH | FUSE_RELEASE_FLOCK_UNLOCK), &[]),
            Op::Release {
                fh: FileHandle(22),
                flags: OpenFlags(libc::O_RDWR),
                lock_owner: Some(LockOwner(0x78)),
                flush: true
            }
        );
        assert_eq!(
            parse_ok(FUSE_RELEASEDIR, &release_in(0), &[]),
            Op::Releasedir { fh: FileHandle(22), flags: OpenFlags(libc::O_RDWR) }
        );
    }

    #[test]
    fn fsync_and_fsyncdir() {
        // fuse_fsync_in: fh, fsync_flags, padding
        let fsync_in = |fsync_flags| raw().u64(31).u32(fsync_flags).u32(0).done();
        assert_eq!(parse_ok(FUSE_FSYNC, &fsync_in(0), &[]), Op::Fsync { fh: FileHandle(31), datasync: false });
        assert_eq!(parse_ok(FUSE_FSYNC, &fsync_in(1), &[]), Op::Fsync { fh: FileHandle(31), datasync: true });
        assert_eq!(parse_ok(FUSE_FSYNCDIR, &fsync_in(1), &[]), Op::Fsyncdir { fh: FileHandle(31), datasync: true });
    }

    #[test]
    fn xattrs() {
        // fuse_setxattr_in as sent without FUSE_SETXATTR_EXT: size, flags
        let compat = raw().u32(3).i32(libc::XATTR_CREATE).done();
        let expected = Op::Setxattr { name: os("user.k"), value: b"v\0w", flags: libc::XATTR_CREATE, position: 0 };
        assert_eq!(parse_ok(FUSE_SETXATTR, &compat, b"user.k\0v\0w"), expected);
        // ... and with it: size, flags, setxattr_flags, padding.
        let ext = raw().u32(3).i32(libc::XATTR_CREATE).u32(1).u32(0).done();
        assert_eq!(parse_ok(FUSE_SETXATTR, &ext, b"user.k\0v\0w"), expected);
        assert_eq!(parse(&header(FUSE_SETXATTR, 1), &compat, b"user.k\0v\0"), Err(Errno::EIO));

        // fuse_getxattr_in: size, padding
        let getxattr_in = raw().u32(256).u32(0).done();
        assert_eq!(parse_ok(FUSE_GETXATTR, &getxattr_in, b"user.k\0"), Op::Getxattr { name: os("user.k"), size: 256 });
        assert_eq!(parse_ok(FUSE_LISTXATTR, &getxattr_in, &[]), Op::Listxattr { size: 256 });
        assert_eq!(parse_ok(FUSE_REMOVEXATTR, &STALE, b"user.k\0"), Op::Removexattr { name: os("user.k") });
    }

    #[test]
    fn access() {
        // fuse_access_in: mask, padding
        let access_in = raw().i32(libc::R_OK | libc::X_OK).u32(0).done();
        assert_eq!(parse_ok(FUSE_ACCESS, &access_in, &[]), Op::Access { mask: AccessFlags::R_OK | AccessFlags::X_OK });
    }

    #[test]
    fn fallocate() {
        // fuse_fallocate_in: fh, offset, length, mode, padding
        let fallocate_in = |offset: u64| raw().u64(41).u64(offset).u64(1 << 20).i32(libc::FALLOC_FL_KEEP_SIZE).u32(0);
        assert_eq!(
            parse_ok(FUSE_FALLOCATE, &fallocate_in(512).done(), &[]),
            Op::Fallocate { fh: FileHandle(41), offset: 512, length: 1 << 20, mode: libc::FALLOC_FL_KEEP_SIZE }
        );
        assert_eq!(parse(&header(FUSE_FALLOCATE, 1), &fallocate_in(u64::MAX).done(), &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn ioctl_takes_in_size_bytes_of_payload() {
        // fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size
        let ioctl_in = |in_size| raw().u64(51).u32(1 << 4).u32(0x5401).u64(0x7fff_0000).u32(in_size).u32(64).done();
        assert_eq!(
            parse_ok(FUSE_IOCTL, &ioctl_in(2), b"xyz"),
            Op::Ioctl {
                fh: FileHandle(51),
                flags: IoctlFlags::FUSE_IOCTL_DIR,
                cmd: 0x5401,
                in_data: b"xy",
                out_size: 64
            }
        );
        assert_eq!(parse(&header(FUSE_IOCTL, 1), &ioctl_in(4), b"xyz"), Err(Errno::EIO));
    }

    #[test]
    fn lseek_and_copy_file_range() {
        // fuse_lseek_in: fh, offset, whence, padding
        let lseek_in = raw().u64(61).i64(100).i32(libc::SEEK_DATA).u32(0).done();
        assert_eq!(
            parse_ok(FUSE_LSEEK, &lseek_in, &[]),
            Op::Lseek { fh: FileHandle(61), offset: 100, whence: libc::SEEK_DATA }
        );
        // fuse_copy_file_range_in: fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
        let copy_in = raw().u64(62).u64(10).u64(99).u64(63).u64(20).u64(4096).u64(0).done();
        assert_eq!(
            parse_ok(FUSE_COPY_FILE_RANGE, &copy_in, &[]),
            Op::CopyFileRange {
                fh_in: FileHandle(62),
                offset_in: 10,
                ino_out: INodeNo(99),
                fh_out: FileHandle(63),
                offset_out: 20,
                len: 4096,
                flags: CopyFileRangeFlags::empty(),
            }
        );
    }

    #[test]
    fn other_operations_are_other() {
        for opcode in [0, FUSE_FORGET, FUSE_INIT, FUSE_GETLK, FUSE_SETLK, FUSE_SETLKW, FUSE_BMAP, FUSE_POLL, 52, 4096] {
            assert_eq!(parse_ok(opcode, &[], &[]), Op::Other(opcode));
        }
    }

    /// One valid request per parsed operation that has a header or a payload.
    fn valid_requests() -> Vec<(u32, Vec<u8>, Vec<u8>)> {
        let setxattr_in = raw().u32(1).u32(0).done();
        let getxattr_in = raw().u32(0).u32(0).done();
        vec![
            (FUSE_LOOKUP, vec![], b"n\0".to_vec()),
            (FUSE_GETATTR, raw().u32(1).u32(0).u64(1).done(), vec![]),
            (FUSE_SETATTR, setattr_in(0), vec![]),
            (FUSE_SYMLINK, vec![], b"l\0t\0".to_vec()),
            (FUSE_MKNOD, raw().u32(0).u32(0).u32(0).u32(0).done(), b"n\0".to_vec()),
            (FUSE_MKDIR, raw().u32(0).u32(0).done(), b"n\0".to_vec()),
            (FUSE_UNLINK, vec![], b"n\0".to_vec()),
            (FUSE_RMDIR, vec![], b"n\0".to_vec()),
            (FUSE_RENAME, raw().u64(1).done(), b"a\0b\0".to_vec()),
            (FUSE_RENAME2, raw().u64(1).u32(0).u32(0).done(), b"a\0b\0".to_vec()),
            (FUSE_LINK, raw().u64(1).done(), b"n\0".to_vec()),
            (FUSE_OPEN, raw().u32(0).u32(0).done(), vec![]),
            (FUSE_READ, read_in(0, 0), vec![]),
            (FUSE_WRITE, write_in(2, 0), b"ab".to_vec()),
            (FUSE_RELEASE, raw().u64(1).u32(0).u32(0).u64(0).done(), vec![]),
            (FUSE_FSYNC, raw().u64(1).u32(0).u32(0).done(), vec![]),
            (FUSE_SETXATTR, setxattr_in, b"n\0v".to_vec()),
            (FUSE_GETXATTR, getxattr_in.clone(), b"n\0".to_vec()),
            (FUSE_LISTXATTR, getxattr_in, vec![]),
            (FUSE_REMOVEXATTR, vec![], b"n\0".to_vec()),
            (FUSE_FLUSH, raw().u64(1).u32(0).u32(0).u64(0).done(), vec![]),
            (FUSE_OPENDIR, raw().u32(0).u32(0).done(), vec![]),
            (FUSE_READDIR, read_in(0, 0), vec![]),
            (FUSE_RELEASEDIR, raw().u64(1).u32(0).u32(0).u64(0).done(), vec![]),
            (FUSE_FSYNCDIR, raw().u64(1).u32(0).u32(0).done(), vec![]),
            (FUSE_ACCESS, raw().u32(0).u32(0).done(), vec![]),
            (FUSE_CREATE, raw().u32(0).u32(0).u32(0).u32(0).done(), b"n\0".to_vec()),
            (FUSE_FALLOCATE, raw().u64(1).u64(0).u64(1).u32(0).u32(0).done(), vec![]),
            (FUSE_IOCTL, raw().u64(1).u32(0).u32(0).u64(0).u32(1).u32(0).done(), b"i".to_vec()),
            (FUSE_READDIRPLUS, read_in(0, 0), vec![]),
            (FUSE_LSEEK, raw().u64(1).i64(0).u32(0).u32(0).done(), vec![]),
            (FUSE_COPY_FILE_RANGE, raw().u64(1).u64(0).u64(2).u64(3).u64(0).u64(1).u64(0).done(), vec![]),
        ]
    }

    #[test]
    fn every_truncated_argument_is_eio() {
        for (opcode, op_in, payload) in valid_requests() {
            let h = header(opcode, 1);
            assert!(parse(&h, &op_in, &payload).is_ok(), "opcode {opcode}");
            for len in 0..op_in.len() {
                assert_eq!(parse(&h, &op_in[..len], &payload), Err(Errno::EIO), "opcode {opcode}, op_in {len}");
            }
            for len in 0..payload.len() {
                assert_eq!(parse(&h, &op_in, &payload[..len]), Err(Errno::EIO), "opcode {opcode}, payload {len}");
            }
        }
    }

    #[test]
    fn random_input_never_panics() {
        // xorshift64: deterministic, so a failure reproduces.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut op_in = [0u8; 128];
        let mut payload = [0u8; 96];
        let mut parsed = 0;
        for opcode in 0..=60 {
            for _ in 0..500 {
                // Few distinct byte values, so that NULs and small sizes are common.
                for b in op_in.iter_mut().chain(payload.iter_mut()) {
                    *b = [0, 1, 2, b'a', 0xff][(next() % 5) as usize];
                }
                let op_len = (next() % 129) as usize;
                let payload_len = (next() % 97) as usize;
                let op = parse(&header(opcode, next()), &op_in[..op_len], &payload[..payload_len]);
                parsed += usize::from(op.is_ok());
            }
        }
        assert!(parsed > 0);
    }

    fn sample_attr() -> FileAttr {
        FileAttr {
            ino: INodeNo(0x0102_0304_0506_0708),
            size: 10_000,
            blocks: 24,
            atime: UNIX_EPOCH + Duration::new(1_700_000_000, 123),
            mtime: UNIX_EPOCH - Duration::from_millis(1200),
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH + Duration::from_secs(99),
            kind: FileType::RegularFile,
            perm: 0o4755,
            nlink: 2,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 4096,
            flags: 0xffff,
        }
    }

    /// `struct fuse_attr` of `sample_attr()`, written out field by field.
    fn sample_fuse_attr() -> Raw {
        raw()
            .u64(0x0102_0304_0506_0708) // ino
            .u64(10_000) // size
            .u64(24) // blocks
            .i64(1_700_000_000) // atime
            .i64(-2) // mtime: 1.2 s before the epoch is -2 s + 0.8 s
            .i64(0) // ctime
            .u32(123) // atimensec
            .u32(800_000_000) // mtimensec
            .u32(0) // ctimensec
            .u32(0o100000 | 0o4755) // mode
            .u32(2) // nlink
            .u32(1000) // uid
            .u32(100) // gid
            .u32(0) // rdev
            .u32(4096) // blksize
            .u32(0) // flags
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn out_header_layout() {
        assert_eq!(
            out_header(0x1122_3344_5566_7788, -libc::ENOENT, 16),
            [16, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
    }

    #[test]
    fn attr_out() {
        let mut out = Vec::new();
        attr(&mut out, &sample_attr(), Duration::new(1, 500));
        let expected = raw().u64(1).u32(500).u32(0).bytes(&sample_fuse_attr().done()).done();
        assert_eq!(out.len(), 104);
        assert_eq!(out, expected);
    }

    #[test]
    fn entry_out() {
        let mut out = Vec::new();
        entry(&mut out, &sample_attr(), Duration::new(2, 3), 17);
        let expected = raw()
            .u64(0x0102_0304_0506_0708) // nodeid
            .u64(17) // generation
            .u64(2) // entry_valid
            .u64(2) // attr_valid
            .u32(3) // entry_valid_nsec
            .u32(3) // attr_valid_nsec
            .bytes(&sample_fuse_attr().done())
            .done();
        assert_eq!(out.len(), 128);
        assert_eq!(out, expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn open_out_and_create_out() {
        let mut out = Vec::new();
        open(&mut out, 0x0a0b, 1);
        assert_eq!(out, [0x0b, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);

        let mut out = Vec::new();
        create(&mut out, &sample_attr(), Duration::new(2, 3), 17, 0x0a0b, 1);
        let mut expected = Vec::new();
        entry(&mut expected, &sample_attr(), Duration::new(2, 3), 17);
        expected.extend_from_slice(&[0x0b, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out.len(), 144);
        assert_eq!(out, expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn small_replies() {
        let mut out = Vec::new();
        write(&mut out, 0x0102_0304);
        assert_eq!(out, [4, 3, 2, 1, 0, 0, 0, 0]);

        let mut out = Vec::new();
        xattr_size(&mut out, 300);
        assert_eq!(out, [0x2c, 1, 0, 0, 0, 0, 0, 0]);

        let mut out = Vec::new();
        lseek(&mut out, -2);
        assert_eq!(out, [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn statfs_out() {
        let mut out = Vec::new();
        let s = Statfs { blocks: 1, bfree: 2, bavail: 3, files: 4, ffree: 5, bsize: 6, namelen: 7, frsize: 8 };
        statfs(&mut out, &s);
        let expected = raw().u64(1).u64(2).u64(3).u64(4).u64(5).u32(6).u32(7).u32(8).bytes(&[0; 28]).done();
        assert_eq!(out.len(), 80);
        assert_eq!(out, expected);
    }

    #[test]
    fn file_types_map_to_the_kernels_constants() {
        let all = [
            (FileType::NamedPipe, libc::S_IFIFO, libc::DT_FIFO),
            (FileType::CharDevice, libc::S_IFCHR, libc::DT_CHR),
            (FileType::BlockDevice, libc::S_IFBLK, libc::DT_BLK),
            (FileType::Directory, libc::S_IFDIR, libc::DT_DIR),
            (FileType::RegularFile, libc::S_IFREG, libc::DT_REG),
            (FileType::Symlink, libc::S_IFLNK, libc::DT_LNK),
            (FileType::Socket, libc::S_IFSOCK, libc::DT_SOCK),
        ];
        for (kind, mode, dt) in all {
            assert_eq!(type_bits(kind), mode, "{kind:?}");
            assert_eq!(dirent_type(kind), u32::from(dt), "{kind:?}");
        }
    }

    #[test]
    fn times_before_the_epoch_count_down_whole_seconds_then_up_nanoseconds() {
        assert_eq!(timespec(UNIX_EPOCH - Duration::new(1, 200_000_000)), (-2, 800_000_000));
        assert_eq!(timespec(UNIX_EPOCH - Duration::from_secs(3)), (-3, 0));
        assert_eq!(timespec(UNIX_EPOCH + Duration::new(5, 6)), (5, 6));
        // And back: the parser's conversion is the inverse.
        assert_eq!(system_time(-2, 800_000_000), Ok(UNIX_EPOCH - Duration::new(1, 200_000_000)));
    }

    #[test]
    fn dirbuf_pads_records_to_8_bytes() {
        let mut buf = DirBuf::new(4096);
        assert!(!buf.add(0xaabb, 1, FileType::Directory, os("hello")));
        assert!(!buf.add(0xccdd, 2, FileType::RegularFile, os("world.rs")));
        let expected = raw()
            // fuse_dirent: ino, off, namelen, type; name; padding to 32 bytes
            .u64(0xaabb)
            .u64(1)
            .u32(5)
            .u32(u32::from(libc::DT_DIR))
            .bytes(b"hello\0\0\0")
            .u64(0xccdd)
            .u64(2)
            .u32(8)
            .u32(u32::from(libc::DT_REG))
            .bytes(b"world.rs")
            .done();
        assert_eq!(buf.into_bytes(), expected);
    }

    #[test]
    fn dirbuf_refuses_what_does_not_fit_and_keeps_what_did() {
        // One 5-byte name takes exactly 32 bytes.
        let mut buf = DirBuf::new(32);
        assert!(!buf.add(1, 1, FileType::Directory, os("hello")));
        assert!(buf.add(2, 2, FileType::Directory, os("a")));
        assert_eq!(buf.into_bytes().len(), 32);

        let mut buf = DirBuf::new(31);
        assert!(buf.add(1, 1, FileType::Directory, os("hello")));
        assert!(buf.into_bytes().is_empty());

        let mut buf = DirBuf::new(0);
        assert!(buf.add(1, 1, FileType::Directory, os("")));
    }

    #[test]
    fn dirbuf_plus_is_entry_out_then_dirent() {
        let attr = sample_attr();
        let mut buf = DirBuf::new(320);
        assert!(!buf.add_plus(&attr, 9, os("hello"), Duration::new(2, 3), 17));
        // 128 + 24 + 5 = 157, padded to 160: a second one just fits, a third does not.
        assert!(!buf.add_plus(&attr, 10, os("world"), Duration::new(2, 3), 17));
        assert!(buf.add_plus(&attr, 11, os("x"), Duration::new(2, 3), 17));
        let bytes = buf.into_bytes();
        assert_eq!(bytes.len(), 320);

        let mut expected = Vec::new();
        entry(&mut expected, &attr, Duration::new(2, 3), 17);
        let expected = raw()
            .bytes(&expected)
            .u64(0x0102_0304_0506_0708) // ino
            .u64(9) // off
            .u32(5) // namelen
            .u32(u32::from(libc::DT_REG)) // type
            .bytes(b"hello\0\0\0")
            .done();
        assert_eq!(&bytes[..160], &expected[..]);
    }
}
