//! `kmsfs`, the transparent encrypting FUSE filesystem. Its format, mount and tools arrive
//! with the filesystem issue; until then the binary says so instead of pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("kmsfs: the filesystem is not built yet; the agent (kmsd) and its CLI (kmsctl) are");
    ExitCode::from(2)
}
