//! The checks `kmsfs` makes before it mounts or walks a volume, so that the common mistakes
//! of a first hour get a message that says what went wrong and what to do, rather than the
//! error of whichever system call or agent request happened to fail first: FUSE missing,
//! a user other than root without a usable fusermount3, a volume or mount point already
//! mounted, and a volume whose KMS key the agent cannot use (disabled, pending deletion,
//! deleted, or another agent's).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kmsfs_common::client::{AgentClient, ClientError};
use kmsfs_common::format::volume::{VolumeConfig, VOLUME_FILE};
use kmsfs_common::ErrorKind;

/// The FUSE device, as the kernel's module creates it.
const FUSE_DEVICE: &str = "/dev/fuse";

/// Whether this process can mount a FUSE filesystem at all: the device is there, and a
/// user other than root has a setuid-root fusermount3 to mount through (as fuser looks for
/// it: `FUSERMOUNT_PATH`, else `fusermount3` or `fusermount` on PATH, in /sbin or /bin).
pub fn fuse_available() -> Result<(), String> {
    match std::fs::metadata(FUSE_DEVICE) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "FUSE is not available: {FUSE_DEVICE} does not exist. Load the kernel's FUSE module (`modprobe \
                 fuse`); in a container, pass the device in (`systemd-nspawn --bind=/dev/fuse`, `docker run \
                 --device /dev/fuse --cap-add SYS_ADMIN`)"
            ))
        }
        Err(e) => return Err(format!("FUSE is not available: cannot look at {FUSE_DEVICE}: {e}")),
        Ok(meta) if !meta.file_type().is_char_device() => {
            return Err(format!(
                "FUSE is not available: {FUSE_DEVICE} is not the FUSE device (not a character device); it should be \
                 character device 10,229, as the kernel's FUSE module makes it"
            ))
        }
        Ok(_) => {}
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Ok(());
    }
    let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| format!("uid {uid}"), |u| u.name);
    let Some(fusermount) = find_fusermount() else {
        let looked = match std::env::var_os("FUSERMOUNT_PATH") {
            Some(path) => format!("FUSERMOUNT_PATH names {}, which is not there", Path::new(&path).display()),
            None => "looked for fusermount3 and fusermount on PATH, in /sbin and /bin".to_string(),
        };
        return Err(format!(
            "a user other than root ({user}) mounts through fusermount3, which is not installed ({looked}): install \
             it (`apt-get install fuse3`), or mount as root"
        ));
    };
    match std::fs::metadata(&fusermount) {
        Ok(meta) if meta.uid() == 0 && meta.mode() & 0o4000 != 0 => Ok(()),
        Ok(_) => Err(format!(
            "a user other than root ({user}) mounts through fusermount3, but {} is not setuid root and so cannot \
             mount: `chown root {0} && chmod u+s {0}` (as the fuse3 package installs it), or mount as root",
            fusermount.display()
        )),
        Err(e) => Err(format!("cannot use {}: {e}", fusermount.display())),
    }
}

/// The fusermount fuser will run, if there is one.
fn find_fusermount() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FUSERMOUNT_PATH") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    let names = ["fusermount3", "fusermount"];
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|dir| names.map(|name| dir.join(name)));
    let fixed = ["/sbin", "/bin"].into_iter().flat_map(|dir| names.map(|name| Path::new(dir).join(name)));
    on_path.chain(fixed).find(|path| path.is_file())
}

/// The mount point must be a directory, and not already a kmsfs mount (mounting over one
/// would hide it and its volume's files until the new one is unmounted).
pub fn mountpoint_free(mountpoint: &Path) -> Result<(), String> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("the mount point {} does not exist: create it (`mkdir -p {0}`)", mountpoint.display()))
        }
        Err(e) => return Err(format!("cannot use the mount point {}: {e}", mountpoint.display())),
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("the mount point {} is not a directory", mountpoint.display()))
        }
        Ok(_) => {}
    }
    let Ok(canonical) = std::fs::canonicalize(mountpoint) else { return Ok(()) };
    match crate_mounts().into_iter().find(|(_, mnt)| *mnt == canonical) {
        Some((volume, _)) => Err(format!(
            "{} is already a kmsfs mount (of the volume {}): use it as it is, or unmount it first (`umount {0}`, or \
             `fusermount3 -u {0}` as the user who mounted it)",
            mountpoint.display(),
            volume.display()
        )),
        None => Ok(()),
    }
}

/// Why a volume's lock is held: where it is mounted, if it is, and what to do.
pub fn already_mounted(cipherdir: &Path) -> String {
    let canonical = std::fs::canonicalize(cipherdir).unwrap_or_else(|_| cipherdir.to_path_buf());
    let at: Vec<PathBuf> = crate_mounts().into_iter().filter(|(vol, _)| *vol == canonical).map(|(_, m)| m).collect();
    match at.first() {
        Some(mnt) => format!(
            "the volume {} is already mounted at {} (a volume is mounted once at a time): use that mount, or \
             unmount it first (`umount {1}`, or `fusermount3 -u {1}` as the user who mounted it)",
            cipherdir.display(),
            mnt.display()
        ),
        None => format!(
            "the volume {} is already mounted by another kmsfs process (a volume is mounted once at a time; that \
             mount is not visible here, perhaps in another mount namespace): stop that kmsfs first",
            cipherdir.display()
        ),
    }
}

fn crate_mounts() -> Vec<(PathBuf, PathBuf)> {
    kmsfs_fs::rewrap::kmsfs_mounts()
}

/// Whether the agent can use the volume's KMS key; if not, why and what to do. A key it
/// may not describe is left for the unwrapping to report (DescribeKey is a permission of
/// its own, which a mount's principal may lack).
pub fn volume_key_usable(cipherdir: &Path, client: &mut AgentClient) -> Result<(), String> {
    let Ok(bytes) = std::fs::read(cipherdir.join(VOLUME_FILE)) else { return Ok(()) };
    let Ok(config) = VolumeConfig::parse(&bytes) else { return Ok(()) };
    let key = &config.key_id;
    let socket = client.socket_path().display().to_string();
    let metadata = match client.call("DescribeKey", &serde_json::json!({ "KeyId": key })) {
        Ok(described) => described["KeyMetadata"].clone(),
        Err(ClientError::Service(e)) if e.kind == ErrorKind::NotFoundException => {
            return Err(format!(
                "the volume's key {key} is not a key of the agent at {socket}. Either the volume was made with another \
                 agent (another host's, or another user's per-user agent): use that agent (--socket or KMSD_SOCKET), \
                 or bring the volume here with `kmsfs snapshot export` and `kmsfs snapshot import`; or the key was \
                 deleted, and then nobody can decrypt the volume's files any more"
            ))
        }
        Err(_) => return Ok(()),
    };
    let state = metadata["KeyState"].as_str().unwrap_or_default();
    match state {
        "Enabled" => Ok(()),
        "Disabled" => Err(format!(
            "the volume's key {key} is disabled, so no file of the volume can be opened: a key administrator can \
             enable it again (`kmsctl enable-key --key-id {key}`)"
        )),
        "PendingDeletion" | "PendingReplicaDeletion" => {
            let date = metadata["DeletionDate"].as_f64().map(kmsfs_common::time::iso8601);
            Err(format!(
                "the volume's key {key} is scheduled for deletion{}, and is unusable until then; once deleted, the \
                 volume's files can never be decrypted. To keep them, cancel the deletion and enable the key \
                 (`kmsctl cancel-key-deletion --key-id {key}`, then `kmsctl enable-key --key-id {key}`)",
                date.map(|d| format!(" on {d}")).unwrap_or_default()
            ))
        }
        "PendingImport" => Err(format!(
            "the volume's key {key} has no key material (it was imported and has expired or been deleted): import \
             the same material again (`kmsctl get-parameters-for-import`, then `kmsctl import-key-material`)"
        )),
        "Unavailable" => Err(format!(
            "the volume's key {key} is in a custom key store that is not connected: connect it (`kmsctl \
             connect-custom-key-store --custom-key-store-id ...`; `kmsctl describe-custom-key-stores` lists them)"
        )),
        other => Err(format!("the volume's key {key} cannot be used: its state is {other}")),
    }
}
