//! Large plaintext buffers, wiped when dropped at memory speed.
//!
//! `zeroize` wipes with one volatile store per byte so that the compiler cannot drop the
//! stores as dead; for keys that costs nothing, but a filesystem moves plaintext a
//! megabyte at a time, and a byte-wise wipe of each request's buffer cost a fifth of a
//! sequential write. [`PlainBuf`] wipes with `fill(0)` — a vectorised memset — and then
//! hands the buffer to `std::hint::black_box`, an opaque use that the optimizer must assume
//! reads it, so the stores before it cannot be elided either.

use std::ops::{Deref, DerefMut};

/// A byte buffer that may hold plaintext: wiped, spare capacity included, when dropped.
#[derive(Default)]
pub struct PlainBuf(Vec<u8>);

impl PlainBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> PlainBuf {
        PlainBuf(vec![0u8; len])
    }

    pub fn new() -> PlainBuf {
        PlainBuf(Vec::new())
    }
}

/// Overwrites `buf` with zeros in a way the optimizer keeps.
pub fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

impl Drop for PlainBuf {
    fn drop(&mut self) {
        // Bytes past the length (left by a truncate) may hold plaintext too.
        let len = self.0.len();
        self.0.resize(self.0.capacity(), 0);
        wipe(&mut self.0[..len]);
        std::hint::black_box(&mut self.0);
    }
}

impl Deref for PlainBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for PlainBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl std::fmt::Debug for PlainBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlainBuf({} bytes, <redacted>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipes_contents_and_spare_capacity() {
        let mut buf = PlainBuf::zeroed(64);
        buf.copy_from_slice(&[0xa5; 64]);
        buf.truncate(10);
        let len = buf.len();
        let cap = buf.capacity();
        // Run the wipe as the drop does, on the buffer itself, and look at every byte.
        buf.resize(cap, 0);
        wipe(&mut buf[..len]);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(format!("{buf:?}"), format!("PlainBuf({cap} bytes, <redacted>)"));
    }
}
