//! Who is calling, in the kernel's words — never the request's.
//!
//! At accept time the agent takes the peer's credentials (SO_PEERCRED: uid, gid, pid,
//! fixed at connect) and a pidfd for the peer process, then reads what `/proc` says of
//! that process: its supplementary groups, its executable and its systemd unit (from its
//! cgroup). The pidfd pins the process: the `/proc` reads are trusted only if, after
//! them, the pidfd still names a live process with that pid — a pid recycled by another
//! process in between cannot lend its identity to the caller.
//!
//! The principals built from it (`policy::eval::Caller`): every caller is
//! `arn:aws:iam::<account>:user/<name>`; a caller running inside a systemd *system* service
//! also carries `arn:aws:iam::<account>:role/<unit>` (e.g. `role/nginx.service`).
//! User-manager units (`user@1000.service/...`) carry no role: any user can name their own
//! units anything.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

/// A caller, identified by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The user's name, or the uid in decimal if it has none.
    pub user: String,
    /// Primary and supplementary group IDs.
    pub groups: Vec<u32>,
    /// Names of `groups` (those that have one).
    pub group_names: Vec<String>,
    /// The systemd system service the caller runs in, e.g. `nginx.service`.
    pub unit: Option<String>,
    /// The caller's executable.
    pub executable: Option<PathBuf>,
}

impl Identity {
    /// An identity from credentials alone (no process details).
    pub fn from_credentials(uid: u32, gid: u32, pid: Option<i32>) -> Identity {
        let user =
            nix::unistd::User::from_uid(uid.into()).ok().flatten().map(|u| u.name).unwrap_or_else(|| uid.to_string());
        let mut identity =
            Identity { uid, gid, pid, user, groups: vec![gid], group_names: Vec::new(), unit: None, executable: None };
        identity.name_groups();
        identity
    }

    /// A local user's identity by name: uid, primary and supplementary groups from the
    /// user and group databases (for a caller who proved to be that user by an access key,
    /// so no process, unit or executable). `None` if there is no such user.
    pub fn of_local_user(name: &str) -> Option<Identity> {
        let user = nix::unistd::User::from_name(name).ok().flatten()?;
        let c_name = std::ffi::CString::new(name).ok()?;
        let groups = nix::unistd::getgrouplist(&c_name, user.gid)
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|_| vec![user.gid.as_raw()]);
        let mut identity = Identity {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            pid: None,
            user: user.name,
            groups,
            group_names: Vec::new(),
            unit: None,
            executable: None,
        };
        identity.name_groups();
        Some(identity)
    }

    fn name_groups(&mut self) {
        self.groups.sort_unstable();
        self.groups.dedup();
        self.group_names = self
            .groups
            .iter()
            .filter_map(|g| nix::unistd::Group::from_gid((*g).into()).ok().flatten().map(|g| g.name))
            .collect();
    }
}

/// Identifies the peer of a connected Unix socket.
pub fn identify(stream: &tokio::net::UnixStream) -> std::io::Result<Identity> {
    let cred = stream.peer_cred()?;
    let mut identity = Identity::from_credentials(cred.uid(), cred.gid(), cred.pid());
    let Some(pid) = cred.pid() else { return Ok(identity) };
    let pidfd = match crate::sys::peer_pidfd(stream.as_fd(), pid) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(pid, "no pidfd for the peer ({e}); identifying by credentials only");
            return Ok(identity);
        }
    };
    if pidfd_pid(pidfd.as_raw_fd()) != Some(pid) {
        return Ok(identity); // exited already: nothing in /proc is about it any more
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
    let cgroup = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap_or_default();
    let executable = std::fs::read_link(proc_dir.join("exe")).ok();
    // Trust what we read only if the pidfd's process is still the one at that pid, and
    // it still runs as the user it connected as.
    if pidfd_pid(pidfd.as_raw_fd()) != Some(pid) || status_uid(&status) != Some(cred.uid()) {
        return Ok(identity);
    }
    identity.groups.extend(status_groups(&status));
    identity.name_groups();
    identity.unit = system_unit(&cgroup);
    identity.executable = executable;
    Ok(identity)
}

/// The pid a pidfd names, from `/proc/self/fdinfo`; `None` once the process has exited.
fn pidfd_pid(fd: i32) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let pid: i32 = info.lines().find_map(|l| l.strip_prefix("Pid:"))?.trim().parse().ok()?;
    (pid > 0).then_some(pid)
}

/// The effective uid in `/proc/PID/status`.
fn status_uid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The supplementary groups in `/proc/PID/status`.
fn status_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}

/// The systemd system unit of a process, from its `/proc/PID/cgroup`: the first `.service`
/// (or `.mount`) below `/system.slice/` in the unified hierarchy (`0::`) or, on hybrid
/// systems, the `name=systemd` one.
pub fn system_unit(cgroup: &str) -> Option<String> {
    let paths = cgroup.lines().filter_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let systemd = (id == "0" && controllers.is_empty()) || controllers == "name=systemd";
        systemd.then_some(path)
    });
    for path in paths {
        let Some(rest) = path.strip_prefix("/system.slice/") else { continue };
        // A service, or a mount unit: an fstab `fuse.kmsfs` mount's kmsfs runs in the cgroup of
        // its `.mount` unit, and is that unit as a service is itself.
        let unit = rest.split('/').find(|c| c.ends_with(".service") || c.ends_with(".mount"))?;
        let valid = unit.len() <= 255
            && unit.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':' | b'\\'));
        if valid {
            return Some(unit.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_units_come_from_the_systemd_hierarchy() {
        assert_eq!(system_unit("0::/system.slice/nginx.service\n"), Some("nginx.service".into()));
        assert_eq!(
            system_unit("0::/system.slice/system-getty.slice/getty@tty1.service\n"),
            Some("getty@tty1.service".into())
        );
        assert_eq!(
            system_unit("9:name=systemd:/system.slice/kmsd-test.service\n4:memory:/x\n0::/\n"),
            Some("kmsd-test.service".into())
        );
        assert_eq!(system_unit("0::/system.slice/app.service/worker\n"), Some("app.service".into()));
        assert_eq!(system_unit("0::/system.slice/srv-web.mount\n"), Some("srv-web.mount".into()));
    }

    #[test]
    fn user_units_sessions_and_other_controllers_carry_no_role() {
        assert_eq!(system_unit("0::/user.slice/user-1000.slice/user@1000.service/app.slice/fake.service\n"), None);
        assert_eq!(system_unit("0::/user.slice/user-1000.slice/session-3.scope\n"), None);
        assert_eq!(system_unit("4:memory:/system.slice/nginx.service\n0::/\n"), None);
        assert_eq!(system_unit("0::/system.slice/cron.scope\n"), None);
        assert_eq!(system_unit(""), None);
    }

    #[test]
    fn proc_status_fields() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t100\t100\t100\t100\nGroups:\t4 27 1000 \n";
        assert_eq!(status_uid(status), Some(1001));
        assert_eq!(status_groups(status), vec![4, 27, 1000]);
        assert_eq!(status_groups("Groups:\t\n"), Vec::<u32>::new());
    }

    #[test]
    fn local_users_are_looked_up_by_name() {
        let root = Identity::of_local_user("root").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0) && root.group_names.iter().any(|g| g == "root"));
        assert_eq!(Identity::of_local_user("no-such-user-kmsd"), None);
    }

    #[test]
    fn credentials_name_the_user() {
        let id = Identity::from_credentials(0, 0, None);
        assert_eq!(id.user, "root");
        assert_eq!(id.groups, vec![0]);
    }
}
