//! kmsfs, the transparent encrypting filesystem: the FUSE adapter over the pure format
//! codec in `kmsfs-common`, and the data keys it gets from the agent.

pub mod content;
pub mod fsck;
pub mod fuse;
mod helpers;
pub mod keys;
pub mod pool;
pub mod rewrap;
pub mod ring;
pub mod snapshot;
pub mod volume;
