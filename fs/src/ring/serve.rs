//! The filesystem's side of the ring: a request parsed by [`super::abi`] goes to the same
//! operation fuser's /dev/fuse loop calls ([`KmsFs`]'s `*_op` methods), and the answer is
//! encoded as the reply's arguments.

use fuser::{Errno, INodeNo};

use super::abi::{self, Op};
use super::{Incoming, Serve};
use crate::fuse::{xattr_answer, Caller, KmsFs, XattrAnswer, FILE_OPEN_FLAGS, TTL};

impl Serve for KmsFs {
    fn serve(&self, request: &Incoming<'_>, out: &mut Vec<u8>) -> Result<(), Errno> {
        let header = &request.header;
        let ino = INodeNo(header.nodeid);
        let caller = Caller { uid: header.uid, gid: header.gid };
        match abi::parse(header, request.op_in, request.payload)? {
            Op::Lookup { name } => abi::entry(out, &self.lookup_op(ino, name)?, TTL, 0),
            Op::Getattr { fh } => abi::attr(out, &self.getattr_op(ino, fh)?, TTL),
            Op::Setattr(changes) => abi::attr(out, &self.setattr_op(ino, &changes)?, TTL),
            Op::Readlink => out.extend_from_slice(&self.readlink_op(ino)?),
            Op::Mknod { name, mode, umask, rdev } => {
                abi::entry(out, &self.mknod_op(caller, ino, name, mode, umask, rdev)?, TTL, 0)
            }
            Op::Mkdir { name, mode, umask } => abi::entry(out, &self.mkdir_op(caller, ino, name, mode, umask)?, TTL, 0),
            Op::Unlink { name } => self.unlink_op(ino, name)?,
            Op::Rmdir { name } => self.rmdir_op(ino, name)?,
            Op::Symlink { link_name, target } => {
                abi::entry(out, &self.symlink_op(caller, ino, link_name, target)?, TTL, 0)
            }
            Op::Rename { name, newparent, newname, flags } => self.rename_op(ino, name, newparent, newname, flags)?,
            Op::Link { ino, newparent, newname } => abi::entry(out, &self.link_op(ino, newparent, newname)?, TTL, 0),
            Op::Open { flags } => abi::open(out, self.open_op(ino, flags)?, FILE_OPEN_FLAGS.bits()),
            Op::Read { fh, offset, size, .. } => {
                // The runtime sends READs to `read`; answered the same way here all the same.
                out.resize(size as usize, 0);
                let len = self.read_to(fh, offset, out)?;
                out.truncate(len);
            }
            Op::Write { fh, offset, data, write_flags, .. } => {
                abi::write(out, self.write_op(fh, offset, data, write_flags)?)
            }
            // Writes go straight to the backing file; nothing is buffered here.
            Op::Flush { .. } => {}
            Op::Release { fh, .. } => self.release_op(fh),
            Op::Fsync { fh, datasync } => self.fsync_op(fh, datasync)?,
            Op::Opendir { .. } => abi::open(out, self.opendir_op(ino)?, 0),
            Op::Readdir { fh, offset, size } => {
                let mut buf = abi::DirBuf::new(size as usize);
                self.readdir_op(fh, offset, |ino, offset, kind, name| buf.add(ino.0, offset, kind, name))?;
                out.extend_from_slice(&buf.into_bytes());
            }
            Op::Readdirplus { fh, offset, size } => {
                let mut buf = abi::DirBuf::new(size as usize);
                self.readdirplus_op(ino, fh, offset, |attr, offset, name| buf.add_plus(attr, offset, name, TTL, 0))?;
                out.extend_from_slice(&buf.into_bytes());
            }
            Op::Releasedir { fh, .. } => self.releasedir_op(fh),
            Op::Fsyncdir { .. } => self.fsyncdir_op(ino)?,
            Op::Statfs => abi::statfs(out, &self.statfs_op()?),
            Op::Setxattr { name, value, flags, .. } => self.setxattr_op(ino, name, value, flags)?,
            Op::Getxattr { name, size } => xattr_reply(out, size, &self.getxattr_op(ino, name)?)?,
            Op::Listxattr { size } => xattr_reply(out, size, &self.listxattr_op(ino)?)?,
            Op::Removexattr { name } => self.removexattr_op(ino, name)?,
            Op::Access { mask } => self.access_op(ino, mask)?,
            Op::Create { name, mode, umask, .. } => {
                let (attr, fh) = self.create_op(caller, ino, name, mode, umask)?;
                abi::create(out, &attr, TTL, 0, fh, FILE_OPEN_FLAGS.bits());
            }
            Op::Fallocate { fh, offset, length, mode } => self.fallocate_op(ino, fh, offset, length, mode)?,
            // As over /dev/fuse: no ioctl applies to an encrypted file.
            Op::Ioctl { .. } => return Err(Errno::ENOTTY),
            Op::Lseek { .. } | Op::CopyFileRange { .. } | Op::Other(_) => return Err(Errno::ENOSYS),
        }
        Ok(())
    }

    fn read(&self, request: &Incoming<'_>, reply: &mut [u8]) -> Result<usize, Errno> {
        let Op::Read { fh, offset, size, .. } = abi::parse(&request.header, request.op_in, request.payload)? else {
            return Err(Errno::EIO);
        };
        // The kernel never asks for more than the payload buffer holds (FUSE_INIT's max_pages).
        self.read_to(fh, offset, reply.get_mut(..size as usize).ok_or(Errno::EIO)?)
    }
}

/// A getxattr or listxattr answer: the value's size, the value, or ERANGE.
fn xattr_reply(out: &mut Vec<u8>, size: u32, value: &[u8]) -> Result<(), Errno> {
    match xattr_answer(size, value)? {
        XattrAnswer::Size(len) => abi::xattr_size(out, len),
        XattrAnswer::Value(value) => out.extend_from_slice(value),
    }
    Ok(())
}
