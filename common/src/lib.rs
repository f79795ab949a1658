//! Pieces shared by the agent (`kmsd`), its CLI (`kmsctl`) and the filesystem (`kmsfs`):
//! the AWS KMS error vocabulary, key identifiers, the encryption-context encoding, the
//! ciphertext-blob codec, AEAD helpers, and a blocking client for the agent's socket.
//!
//! Everything here is pure or plain I/O on a socket: no policy, no FUSE, no SQLite.

pub mod aead;
pub mod audit;
pub mod blob;
pub mod client;
pub mod context;
pub mod error;
pub mod files;
pub mod format;
#[cfg(feature = "generate")]
pub mod generate;
pub mod ids;
pub mod paths;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod wipe;

pub use error::{ErrorKind, KmsError};
