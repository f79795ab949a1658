//! File contents on the backing file: reads, writes and truncation in plaintext offsets,
//! turned into whole encrypted blocks after the header. Pure I/O on an open `File`
//! with the format codec: no FUSE, no agent, so it is tested on plain temporary files.
//!
//! Each request costs one `pread` of the blocks it touches (only the partial first and
//! last blocks are read back when writing) and one `pwrite`. The format's final-block
//! flag is maintained here: when a write or truncation moves the end of the file, the
//! old last block is re-sealed as non-final and the new last block as final. Blocks a
//! write skips over stay holes (zeros on disk), which read as zeros.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use kmsfs_common::format::block::{
    open_block_into, seal_block, seal_blocks_in_place, BlockIndex, ContentKey, FileId, Layout,
};
use kmsfs_common::format::FormatError;
use kmsfs_common::wipe::{wipe, PlainBuf};

/// Reads of at least this many bytes start reading the backing file ahead of them, by
/// [`READ_AHEAD`] times their own length.
const READ_AHEAD_FROM: usize = 256 << 10;
const READ_AHEAD: usize = 2;

/// Writes of at least this many blocks are sealed and written by two threads.
const PARALLEL_BLOCKS: u64 = 64;

/// Why a content operation failed.
#[derive(Debug)]
pub enum ContentError {
    Io(io::Error),
    /// The stored size cannot arise from any plaintext: the file was cut off a block
    /// boundary, or its header is damaged.
    BadSize(u64),
    /// A block failed authentication (or is a zeroed final block).
    Corrupt {
        block: u64,
        error: FormatError,
    },
}

impl From<io::Error> for ContentError {
    fn from(e: io::Error) -> ContentError {
        ContentError::Io(e)
    }
}

impl std::fmt::Display for ContentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentError::Io(e) => write!(f, "I/O error: {e}"),
            ContentError::BadSize(size) => write!(f, "stored size {size} is not a valid encrypted file size"),
            ContentError::Corrupt { block, error } => write!(f, "block {block} failed authentication: {error}"),
        }
    }
}

/// One file's contents: its backing file and what encrypts it.
pub struct Content<'a> {
    pub file: &'a File,
    pub key: &'a ContentKey,
    pub file_id: FileId,
}

impl Content<'_> {
    fn layout(&self) -> Layout {
        self.key.layout()
    }

    /// The plaintext length, from the backing file's length.
    #[allow(clippy::len_without_is_empty)] // a length read from disk, not a collection's
    pub fn len(&self) -> Result<u64, ContentError> {
        let stored = self.file.metadata()?.len();
        self.layout().plaintext_size(stored).map_err(|_| ContentError::BadSize(stored))
    }

    /// The plaintext of blocks `first..=last` of a file of plaintext length `size`.
    fn read_blocks(&self, first: u64, last: u64, size: u64) -> Result<PlainBuf, ContentError> {
        let b = self.layout().block_size();
        let start = first * b;
        let mut buf = PlainBuf::zeroed((size.min((last + 1) * b) - start) as usize);
        let n = self.read_range(start, &mut buf, &mut Vec::new(), size)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads up to `len` bytes at `offset`; short at the end of the file.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<PlainBuf, ContentError> {
        let mut buf = PlainBuf::zeroed(len);
        let n = self.read_at_to(offset, &mut buf, &mut Vec::new())?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Reads up to `out.len()` bytes at `offset` into `out`: how many, short at the end of
    /// the file. For a caller that reads often: `ciphertext` is a buffer it keeps between
    /// reads (holding nothing secret, it needs no wiping), and the plaintext is written to
    /// `out` only, where the caller wants it. On error `out` holds nothing of the file.
    pub fn read_at_to(&self, offset: u64, out: &mut [u8], ciphertext: &mut Vec<u8>) -> Result<usize, ContentError> {
        let size = self.len()?;
        self.read_range(offset, out, ciphertext, size)
    }

    /// [`Content::read_at_to`] in a file of plaintext length `size`. The stored blocks
    /// are read with one pread into `ciphertext`, and each block is decrypted straight
    /// into its place in `out`. Only a block `out` takes in part (the first, read from
    /// inside; the last, cut short) is decrypted into a block-sized buffer of its own first.
    fn read_range(
        &self,
        offset: u64,
        out: &mut [u8],
        ciphertext: &mut Vec<u8>,
        size: u64,
    ) -> Result<usize, ContentError> {
        if offset >= size || out.is_empty() {
            return Ok(0);
        }
        let layout = self.layout();
        let end = size.min(offset + out.len() as u64);
        let b = layout.block_size();
        let (first, last) = (offset / b, (end - 1) / b);
        let start = layout.stored_offset(BlockIndex(first));
        let stored_end =
            layout.stored_offset(BlockIndex(last)) + layout.stored_block_len(BlockIndex(last), size) as u64;
        // Grown only: the pread overwrites what is kept, and what it grows by is zero-filled once.
        let stored_len = (stored_end - start) as usize;
        if ciphertext.len() < stored_len {
            ciphertext.resize(stored_len, 0);
        }
        let stored = &mut ciphertext[..stored_len];
        self.file.read_exact_at(stored, start)?;
        if out.len() >= READ_AHEAD_FROM {
            // A read this large is the kernel reading ahead for a sequential reader: have
            // the backing file's next stretch on its way from the disk before it is asked for.
            let next = i64::try_from(start + stored_len as u64).unwrap_or(i64::MAX);
            let _ = nix::fcntl::posix_fadvise(
                self.file.as_raw_fd(),
                next,
                (READ_AHEAD * stored_len) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }

        let wanted = (end - offset) as usize;
        let final_index = layout.final_block(size).0;
        let chunk = layout.stored_block_size() as usize;
        let mut partial = None;
        let opened = (first..=last).try_for_each(|index| {
            let at = ((index - first) as usize) * chunk;
            let block = &stored[at..stored.len().min(at + chunk)];
            let block_start = index * b;
            let block_len = layout.block_len(BlockIndex(index), size);
            // The part of this block's plaintext wanted, in file offsets, and where it goes.
            let (from, to) = (offset.max(block_start), end.min(block_start + block_len as u64));
            let place = &mut out[(from - offset) as usize..(to - offset) as usize];
            let open = |into: &mut [u8]| {
                open_block_into(self.key, &self.file_id, BlockIndex(index), index == final_index, block, into)
                    .map_err(|error| ContentError::Corrupt { block: index, error })
            };
            if place.len() == block_len {
                return open(place);
            }
            let whole: &mut PlainBuf = partial.get_or_insert_with(|| PlainBuf::zeroed(b as usize));
            open(&mut whole[..block_len])?;
            let skip = (from - block_start) as usize;
            place.copy_from_slice(&whole[skip..skip + place.len()]);
            Ok(())
        });
        if let Err(e) = opened {
            wipe(&mut out[..wanted]);
            return Err(e);
        }
        Ok(wanted)
    }

    /// Writes `data` at `offset`, growing the file if needed: the blocks it touches are
    /// laid out in one buffer as they will be stored, with the plaintext in place (the
    /// existing contents of blocks it covers only in part, then `data` over them), sealed
    /// there, and written with one pwrite.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ContentError> {
        if data.is_empty() {
            return Ok(());
        }
        let layout = self.layout();
        let size = self.len()?;
        let b = layout.block_size();
        let end = offset + data.len() as u64;
        let new_size = size.max(end);
        let (first, last) = (offset / b, (end - 1) / b);
        let old_final = layout.final_block(size).0;
        let new_final = layout.final_block(new_size).0;

        // The old last block stops being last and the write does not cover it: re-seal
        // it as a full non-final block (the gap after its end reads as zeros).
        if old_final < first {
            let mut plain = self.read_blocks(old_final, old_final, size)?;
            plain.resize(b as usize, 0);
            let mut sealed = Vec::with_capacity(layout.stored_block_size() as usize);
            seal_block(self.key, &self.file_id, BlockIndex(old_final), false, &plain, &mut sealed)
                .map_err(|error| ContentError::Corrupt { block: old_final, error })?;
            self.file.write_all_at(&sealed, layout.stored_offset(BlockIndex(old_final)))?;
        }

        let chunk = layout.stored_block_size() as usize;
        let nonce_len = layout.cipher.nonce_len();
        let last_len = layout.block_len(BlockIndex(last), new_size) + layout.cipher.overhead();
        // Plaintext until sealed, ciphertext after: wiped only if something fails.
        let mut stored = vec![0u8; ((last - first) as usize) * chunk + last_len];
        let body = |index: u64| ((index - first) as usize) * chunk + nonce_len;
        let partial_first = !offset.is_multiple_of(b) || (first == last && !end.is_multiple_of(b));
        let partial_last = last != first && !end.is_multiple_of(b);
        for (index, partial) in [(first, partial_first), (last, partial_last)] {
            if partial && index * b < size {
                let existing = self.read_blocks(index, index, size)?;
                stored[body(index)..body(index) + existing.len()].copy_from_slice(&existing);
            }
        }
        let (mut at, mut rest) = (offset, data);
        while !rest.is_empty() {
            let (index, within) = (at / b, (at % b) as usize);
            let take = rest.len().min(b as usize - within);
            let to = body(index) + within;
            stored[to..to + take].copy_from_slice(&rest[..take]);
            (at, rest) = (at + take as u64, &rest[take..]);
        }
        let result = self.seal_and_write(first, new_final, &mut stored);
        if result.is_err() {
            wipe(&mut stored);
        }
        result
    }

    /// Seals the laid-out blocks `stored` (block `first` onwards) in place and writes them.
    /// A large write is cut in two at a block boundary and each half sealed and written on
    /// its own core (the second on another CPU, see [`crate::helpers`]): the chain of a
    /// sequential writer (its copy in, our encryption, the copy into the backing file's page
    /// cache) is otherwise one core long.
    fn seal_and_write(&self, first: u64, final_index: u64, stored: &mut [u8]) -> Result<(), ContentError> {
        let layout = self.layout();
        let chunk = layout.stored_block_size() as usize;
        let blocks = stored.len().div_ceil(chunk) as u64;
        let seal_write = |first: u64, part: &mut [u8]| -> Result<(), ContentError> {
            seal_blocks_in_place(self.key, &self.file_id, BlockIndex(first), BlockIndex(final_index), part)
                .map_err(|error| ContentError::Corrupt { block: first, error })?;
            self.file.write_all_at(part, layout.stored_offset(BlockIndex(first)))?;
            Ok(())
        };
        if blocks < PARALLEL_BLOCKS {
            return seal_write(first, stored);
        }
        let half = blocks / 2;
        let (front, back) = stored.split_at_mut(half as usize * chunk);
        let (ours, theirs) = crate::helpers::join(|| seal_write(first, front), || seal_write(first + half, back));
        ours.and(theirs)
    }

    /// Truncates or extends the file to `new_size` bytes of plaintext.
    pub fn set_len(&self, new_size: u64) -> Result<(), ContentError> {
        let size = self.len()?;
        if new_size > size {
            // Growing is writing one zero byte at the new end: the old last block is
            // re-sealed as non-final, the blocks in between stay holes.
            return self.write_at(new_size - 1, &[0]);
        }
        if new_size == size {
            return Ok(());
        }
        let layout = self.layout();
        let last = layout.final_block(new_size).0;
        let mut plain = self.read_blocks(last, last, size)?;
        plain.truncate(layout.block_len(BlockIndex(last), new_size));
        let mut sealed = Vec::new();
        seal_block(self.key, &self.file_id, BlockIndex(last), true, &plain, &mut sealed)
            .map_err(|error| ContentError::Corrupt { block: last, error })?;
        // Cut first, then write the new last block: a crash in between leaves a last block
        // sealed as non-final (or cut short), which reads as an error, never as silently
        // shortened contents.
        self.file.set_len(layout.stored_size(new_size))?;
        self.file.write_all_at(&sealed, layout.stored_offset(BlockIndex(last)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsfs_common::format::block::{ContentKey, Layout};
    use kmsfs_common::format::header::DataKey;
    use kmsfs_common::format::volume::{BlockSize, CipherSuite};

    /// A content file and a plain model of what it should hold.
    struct Fixture {
        file: File,
        key: ContentKey,
        file_id: FileId,
        model: Vec<u8>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(cipher: CipherSuite, block_size: u32) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap();
            let layout = Layout::new(cipher, BlockSize::new(u64::from(block_size)).unwrap());
            let key = ContentKey::derive(&DataKey::random(), layout);
            let f = Fixture { file, key, file_id: FileId::random(), model: Vec::new(), _dir: dir };
            // A new file's contents: its one empty final block (the header before it is
            // not the content engine's business).
            let mut empty = Vec::new();
            seal_block(&f.key, &f.file_id, BlockIndex(0), true, &[], &mut empty).unwrap();
            f.file.write_all_at(&empty, f.layout().stored_offset(BlockIndex(0))).unwrap();
            f
        }

        fn layout(&self) -> Layout {
            self.key.layout()
        }

        fn content(&self) -> Content<'_> {
            Content { file: &self.file, key: &self.key, file_id: self.file_id }
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.content().write_at(offset, data).unwrap();
            let end = offset as usize + data.len();
            if self.model.len() < end {
                self.model.resize(end, 0);
            }
            self.model[offset as usize..end].copy_from_slice(data);
            self.check();
        }

        fn truncate(&mut self, size: u64) {
            self.content().set_len(size).unwrap();
            self.model.resize(size as usize, 0);
            self.check();
        }

        fn check(&self) {
            let c = self.content();
            assert_eq!(c.len().unwrap(), self.model.len() as u64);
            let out = c.read_at(0, self.model.len() + 100).unwrap();
            assert!(*out == self.model, "contents differ from the model");
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn writes_reads_and_truncates_match_a_plain_model() {
        for cipher in [CipherSuite::Aes256Gcm, CipherSuite::XChaCha20Poly1305] {
            let mut f = Fixture::new(cipher, 4096);
            f.write(0, b"hello");
            f.write(5, &pattern(10_000, 1)); // across blocks, growing
            f.write(4090, &pattern(20, 2)); // straddles a boundary in the middle
            f.write(50_000, &pattern(3, 3)); // far past the end: holes
            f.write(8192, &pattern(4096, 4)); // exactly one whole block
            f.truncate(12_345);
            f.truncate(12_288); // on a block boundary
            f.truncate(70_000); // grow through holes
            f.write(69_999, b"!");
            f.truncate(1);
            f.truncate(0);
            f.write(0, &pattern(3, 5));
        }
    }

    #[test]
    fn large_writes_sealed_by_two_threads_match_a_plain_model() {
        for cipher in [CipherSuite::Aes256Gcm, CipherSuite::XChaCha20Poly1305] {
            let mut f = Fixture::new(cipher, 4096);
            f.write(0, &pattern(1 << 20, 1)); // 256 blocks, split in two halves
            f.write(100, &pattern(300_000, 2)); // unaligned, inside the file
            f.write((1 << 20) - 10, &pattern(700_001, 3)); // across the end, growing
            f.write(5 << 20, &pattern(64 * 4096, 4)); // far past the end: holes, then 64 blocks
            f.truncate(3 << 20);
        }
    }

    #[test]
    fn random_operations_match_a_plain_model() {
        let mut f = Fixture::new(CipherSuite::Aes256Gcm, 4096);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            match next(4) {
                0 | 1 => {
                    let offset = next(40_000);
                    let len = 1 + next(9_000) as usize;
                    f.write(offset, &pattern(len, round as u8));
                }
                2 => {
                    let size = next(45_000);
                    f.truncate(size);
                }
                _ => {
                    let offset = next(50_000);
                    let out = f.content().read_at(offset, 5000).unwrap();
                    let start = (offset as usize).min(f.model.len());
                    let end = (offset as usize + 5000).min(f.model.len());
                    assert_eq!(*out, f.model[start..end]);
                }
            }
        }
    }

    #[test]
    fn tampering_and_cutting_are_detected() {
        let mut f = Fixture::new(CipherSuite::Aes256Gcm, 4096);
        f.write(0, &pattern(10_000, 9));
        // A flipped byte in block 1.
        let at = f.layout().stored_offset(BlockIndex(1)) + 40;
        let mut byte = [0u8; 1];
        f.file.read_exact_at(&mut byte, at).unwrap();
        f.file.write_all_at(&[byte[0] ^ 1], at).unwrap();
        match f.content().read_at(4096, 10) {
            Err(ContentError::Corrupt { block: 1, .. }) => {}
            other => panic!("expected block 1 to fail: {other:?}"),
        }
        f.file.write_all_at(&byte, at).unwrap();
        // Cut at a block boundary: block 1 is now last but was sealed non-final.
        f.file.set_len(f.layout().stored_offset(BlockIndex(2))).unwrap();
        assert!(matches!(f.content().read_at(0, 100_000), Err(ContentError::Corrupt { block: 1, .. })));
        // Cut off a boundary: the size itself is impossible.
        f.file.set_len(f.layout().stored_offset(BlockIndex(1)) + 5).unwrap();
        assert!(matches!(f.content().len(), Err(ContentError::BadSize(_))));
    }
}
