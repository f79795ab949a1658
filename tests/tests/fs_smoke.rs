//! The smallest end-to-end check of kmsfs: a real agent, a real FUSE mount, a file
//! written and read back, its ciphertext holding neither its contents nor its name.

use kmsfs_tests::TestMount;

#[test]
fn write_read_and_nothing_in_the_clear() {
    let mut m = TestMount::new();
    let secret = b"the quick brown fox jumps over the lazy dog";
    std::fs::write(m.path("plans.txt"), secret).unwrap();
    assert_eq!(std::fs::read(m.path("plans.txt")).unwrap(), secret);
    let listing: Vec<_> = std::fs::read_dir(m.cipher()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(listing.iter().all(|n| !n.to_string_lossy().contains("plans")), "{listing:?}");
    for entry in std::fs::read_dir(m.cipher()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        assert!(!bytes.windows(9).any(|w| w == b"quick bro"), "plaintext in the backing directory");
    }
    m.remount();
    assert_eq!(std::fs::read(m.path("plans.txt")).unwrap(), secret);
    // It shows as what it is: type fuse.kmsfs, its backing directory as the source.
    let mnt = m.mnt().canonicalize().unwrap().display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(mnt.as_str())).expect("in mountinfo");
    let fs = line.split_once(" - ").unwrap().1;
    assert!(fs.starts_with("fuse.kmsfs "), "{line}");
}

/// A mount made by root reads ahead a whole 1 MiB request (the kernel's default for a
/// FUSE mount is 128 KiB), so sequential reads cost a round trip per MiB.
#[test]
fn a_root_mount_reads_ahead_a_whole_request() {
    use std::os::unix::fs::MetadataExt;
    let m = TestMount::new();
    let dev = std::fs::metadata(m.mnt()).unwrap().dev();
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "1024", "{knob}");
}

/// Requests come through FUSE over io_uring where the kernel offers it (its
/// `fuse.enable_uring`, which the README's test command switches on) and the mount does
/// not say `nouring`; through /dev/fuse otherwise. `kmsfs status` tells which.
#[test]
fn requests_take_the_ring_where_the_kernel_offers_it() {
    let offered = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y");
    let refused = kmsfs_tests::extra_mount_options().iter().any(|o| o == "nouring");
    let m = TestMount::new();
    std::fs::write(m.path("through"), b"which transport?").unwrap();
    assert_eq!(std::fs::read(m.path("through")).unwrap(), b"which transport?");
    let out = m.kmsfs().arg("status").arg(m.mnt()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let served = status["RingRequests"].as_u64().unwrap();
    if offered && !refused {
        assert_eq!(status["Transport"], "io_uring", "{status}");
        assert!(served >= 3, "the create, write and read came through the ring: {status}");
    } else {
        assert_eq!(status["Transport"], "/dev/fuse", "{status}");
        assert_eq!(served, 0, "{status}");
    }
}

/// A volume is mounted once at a time: a second mount of the same backing directory fails
/// at once with a clear message (two would each cache directory IDs the other changes),
/// and the first goes on unharmed.
#[test]
fn a_volume_already_mounted_cannot_be_mounted_again() {
    let m = TestMount::new();
    std::fs::write(m.path("kept"), b"still here").unwrap();
    let second = tempfile::tempdir().unwrap();
    let out = m.kmsfs().arg("mount").arg(m.cipher()).arg(second.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second mount of one volume succeeded: {stderr}");
    assert!(stderr.contains("already mounted"), "{stderr}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(second.path().to_str().unwrap()), "{mounts}");
    assert_eq!(std::fs::read(m.path("kept")).unwrap(), b"still here");
}
