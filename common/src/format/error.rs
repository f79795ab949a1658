//! The one error type of the format codec. Variants say what failed, for logs and for the
//! filesystem layer's choice of errno; none carries key material or plaintext.

use thiserror::Error;

/// Why bytes are not a valid piece of a kmsfs volume, or why a request cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// A header slot does not start with the kmsfs magic: not a kmsfs file, or corrupted.
    #[error("bad magic: not a kmsfs file header")]
    BadMagic,
    /// A format version this code does not read (header slot or volume file).
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    /// A cipher-suite code or name this code does not know.
    #[error("unknown cipher suite {0}")]
    UnknownCipher(u8),
    /// A block size that is not a power of two from 4096 to 1 MiB.
    #[error("invalid block size {0}: expected a power of two from 4096 to 1048576")]
    InvalidBlockSize(u64),
    /// Input ends before the structure it should hold.
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    /// Input is structurally invalid (bad length field, non-zero padding, bad encoding...).
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    /// Authentication failed: tampered bytes, the wrong key, or bytes moved from elsewhere.
    #[error("{what} failed authentication")]
    Authentication { what: &'static str },
    /// A backing file's size that this format never produces: the file was cut off a block
    /// boundary, lost its final block, or lost (part of) its header.
    #[error("stored file size {0} cannot arise from this format (truncated or corrupted)")]
    InvalidStoredSize(u64),
    /// An all-zero stored block in the final position: holes are never a file's last block.
    #[error("block {0} is all zeros but is the file's final block")]
    HoleAtEnd(u64),
    /// The caller asked to seal a block of a length the layout does not allow (non-final
    /// blocks are exactly one block size; final blocks at most one, and empty only at index 0).
    #[error("a {kind} block cannot hold {len} bytes")]
    BlockLength { kind: &'static str, len: usize },
    /// A name the filesystem must refuse: empty, `.`, `..`, containing `/` or NUL, or a
    /// name the format reserves for itself.
    #[error("invalid name: {0}")]
    InvalidName(&'static str),
    /// Input longer than the format stores (names > 255 bytes, long symlink targets,
    /// xattr values over 64 KiB...).
    #[error("{what} is too long: {len} bytes, at most {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    /// `kmsfs.volume` is not a valid volume configuration.
    #[error("invalid volume configuration: {0}")]
    InvalidConfig(String),
    /// `kmsfs.snapshot` is not a valid snapshot manifest.
    #[error("invalid snapshot manifest: {0}")]
    InvalidManifest(String),
}

impl FormatError {
    /// True for failures that mean "these bytes are not what this volume wrote": the
    /// filesystem layer reports them as EIO and logs them, rather than as a caller error.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            FormatError::BadMagic
                | FormatError::UnsupportedVersion(_)
                | FormatError::UnknownCipher(_)
                | FormatError::InvalidBlockSize(_)
                | FormatError::Truncated { .. }
                | FormatError::Malformed { .. }
                | FormatError::Authentication { .. }
                | FormatError::InvalidStoredSize(_)
                | FormatError::HoleAtEnd(_)
                | FormatError::InvalidConfig(_)
                | FormatError::InvalidManifest(_)
        )
    }
}
