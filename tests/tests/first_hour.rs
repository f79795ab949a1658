//! A person's first hour: the common mistakes, each made against the real binaries, and
//! what kmsctl and kmsfs say about them — what went wrong and what to run. Where the message
//! names a fix (a policy file, a command), the test applies it and checks that it works.
//! Also `kmsfs mount` by a user other than root, through fusermount3 and that user's own
//! per-user agent.
//!
//! Needs root (to run clients as another user, and to mount) and /dev/fuse, as CI has.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kmsfs_tests::{bin, create_key, is_root, TestAgent, TestMount, ROOT_USES_EVERYTHING};
use serde_json::{json, Value};

/// The uid and gid the unprivileged cases run as (nobody).
const NOBODY: u32 = 65534;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn require_root() {
    assert!(is_root(), "these tests run clients as another user and mount filesystems: run them as root, as CI does");
}

/// A directory the unprivileged user owns, under a 0755 temporary directory, with the XDG
/// directories of a login session (a private runtime directory).
struct UserHome {
    _top: tempfile::TempDir,
    home: PathBuf,
}

impl UserHome {
    fn new() -> UserHome {
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = top.path().join("home");
        for dir in ["", "run", "cipher", "mnt"] {
            std::fs::create_dir_all(home.join(dir)).unwrap();
            std::os::unix::fs::chown(home.join(dir), Some(NOBODY), Some(NOBODY)).unwrap();
        }
        std::fs::set_permissions(home.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        UserHome { _top: top, home }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.home.join(rel)
    }

    /// `program args` as nobody, in this home's session, with no agent configured: kmsctl
    /// and kmsfs find (or start) the user's own per-user agent, and no system agent.
    fn run(&self, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(program)
            .args(args)
            .env_remove("KMSD_SOCKET")
            .env("KMSD_SYSTEM_SOCKET", self.path("no-system-agent.sock"))
            .env("HOME", &self.home)
            .env("XDG_RUNTIME_DIR", self.path("run"))
            .env("XDG_DATA_HOME", self.path("data"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv")
    }

    fn socket(&self) -> PathBuf {
        self.path("run/kmsd/kmsd.sock")
    }
}

impl Drop for UserHome {
    /// Ends the per-user agent a test started in this home, found by its own socket path
    /// (unique to this test), and any mount left behind.
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path("mnt")).stderr(Stdio::null()).status();
        let socket = self.socket();
        let socket = socket.to_string_lossy();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if args.first().is_some_and(|a| a.ends_with("/kmsd")) && args.iter().any(|a| *a == *socket) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
    }
}

fn kmsctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("kmsctl")).arg("--socket").arg(socket).args(args).output().unwrap()
}

// ---- the agent is not running ----

#[test]
fn kmsctl_without_an_agent_says_what_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("kmsd.sock");
    let out = kmsctl(&nowhere, &["list-keys"]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    let said = stderr(&out);
    assert!(said.contains(&format!("cannot reach the agent at {}", nowhere.display())), "{said}");
    assert!(said.contains("no agent is listening there"), "{said}");
    assert!(said.contains(&format!("`kmsd --socket {}`", nowhere.display())), "{said}");

    // What it says to run works.
    let mut kmsd = Command::new(bin("kmsd"))
        .arg("--socket")
        .arg(&nowhere)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--config-dir")
        .arg(dir.path().join("config"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&nowhere).is_err() {
        assert!(Instant::now() < deadline, "kmsd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let listed = kmsctl(&nowhere, &["list-keys"]);
    let _ = kmsd.kill();
    let _ = kmsd.wait();
    assert!(listed.status.success(), "{}", stderr(&listed));

    // The socket of an agent that died is still there, and nobody listens on it.
    let out = kmsctl(&nowhere, &["list-keys"]);
    let said = stderr(&out);
    assert!(said.contains("the socket is there but no agent listens on it"), "{said}");
    assert!(said.contains("stopped or crashed"), "{said}");

    // The system agent's socket: systemd starts that agent.
    let system = dir.path().join("system.sock");
    let out = Command::new(bin("kmsctl"))
        .arg("list-keys")
        .env("KMSD_SOCKET", &system)
        .env("KMSD_SYSTEM_SOCKET", &system)
        .output()
        .unwrap();
    let said = stderr(&out);
    assert!(said.contains("systemctl start kmsd.socket"), "{said}");
}

#[test]
fn kmsctl_that_cannot_start_a_per_user_agent_says_why() {
    require_root();
    let home = UserHome::new();
    let out = home.run(&bin("kmsctl"), &["list-keys"], &[("KMSD_BIN", "/nonexistent/kmsd")]);
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    let said = stderr(&out);
    assert!(said.contains("no agent answered, and a per-user agent could not be started"), "{said}");
    assert!(said.contains("/nonexistent/kmsd not found"), "{said}");
    assert!(said.contains("systemctl start kmsd.socket"), "{said}");
}

#[test]
fn another_users_agent_is_not_open_and_kmsctl_says_so() {
    require_root();
    let agent = TestAgent::start();
    // As a per-user agent's directory under XDG_RUNTIME_DIR is.
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let home = UserHome::new();
    let socket = agent.socket();
    let out = home.run(&bin("kmsctl"), &["--socket", socket.to_str().unwrap(), "list-keys"], &[]);
    let said = stderr(&out);
    assert!(said.contains("permission denied"), "{said}");
    assert!(said.contains("leave out --socket and KMSD_SOCKET"), "{said}");
}

#[test]
fn kmsfs_mount_without_an_agent_says_what_to_start() {
    let m = TestMount::new();
    let dir = tempfile::tempdir().unwrap();
    let (cipher, mnt) = (dir.path().join("cipher"), dir.path().join("mnt"));
    std::fs::create_dir(&cipher).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let init = m.kmsfs().arg("init").arg(&cipher).arg("--key-id").arg(&m.key_id).output().unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    let nowhere = dir.path().join("kmsd.sock");
    let out = Command::new(bin("kmsfs"))
        .arg("mount")
        .arg(&cipher)
        .arg(&mnt)
        .arg("--socket")
        .arg(&nowhere)
        .arg("--log-file")
        .arg(dir.path().join("kmsfs.log"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = stderr(&out);
    // The mount process's own reason, not a tail of the log file.
    assert!(said.starts_with(&format!("kmsfs: cannot reach the agent at {}", nowhere.display())), "{said}");
    assert!(said.contains(&format!("`kmsd --socket {}`", nowhere.display())), "{said}");
    assert!(!std::fs::read_to_string("/proc/self/mounts").unwrap().contains(mnt.to_str().unwrap()));
}

// ---- denied by policy ----

/// The identity policy file a denial names, the one under `config`.
fn named_policy_file(message: &str, config: &Path) -> PathBuf {
    let start = message.find(config.to_str().unwrap()).unwrap_or_else(|| panic!("no policy file in: {message}"));
    let file: String = message[start..].chars().take_while(|c| !c.is_whitespace() && *c != ',').collect();
    PathBuf::from(file.trim_end_matches(['.', ';', ')']))
}

/// A denial as kmsctl prints it: AWS's exception and operation, the caller's principal.
fn assert_denied(out: &Output, operation: &str, principal: &str) -> String {
    assert_eq!(out.status.code(), Some(254), "{out:?}");
    let said = stderr(out);
    let head = format!("An error occurred (AccessDeniedException) when calling the {operation} operation: {principal}");
    assert!(said.trim_start().starts_with(&head), "{said}");
    said
}

#[test]
fn a_denial_names_the_identity_policy_file_to_change_and_its_fix_works() {
    require_root();
    // No policy files: root is a key administrator by default, which uses no key.
    let agent = TestAgent::start_configured(&[], &[]);
    let key = create_key(&agent);
    let account =
        agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["AWSAccountId"].as_str().unwrap().to_string();
    let root = format!("arn:aws:iam::{account}:user/root");
    let config = agent.config_dir();
    let out = agent.kmsctl().args(["encrypt", "--key-id", &key, "--plaintext", "aGk="]).output().unwrap();
    let said = assert_denied(&out, "Encrypt", &root);
    assert!(said.contains("not authorized to perform kms:Encrypt"), "{said}");
    let file = named_policy_file(&said, &config);
    assert_eq!(file, config.join("policies/users/root.json"), "{said}");
    assert!(said.contains("systemctl reload kmsd"), "{said}");
    assert!(said.contains("kmsctl create-grant --key-id arn:aws:kms:"), "{said}");
    assert!(said.contains(&format!("--grantee-principal {root} --operations Encrypt")), "{said}");

    // The file it names is the one that decides: allow it there, reload, and it works.
    let allow = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]});
    agent.set_policy("users/root.json", Some(&allow.to_string()));
    let out = agent.kmsctl().args(["encrypt", "--key-id", &key, "--plaintext", "aGk="]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // An explicit Deny: the message names its file and statement.
    let deny = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
        {"Sid": "NoDecrypt", "Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}]});
    agent.set_policy("users/root.json", Some(&deny.to_string()));
    let blob =
        agent.ok("Encrypt", json!({"KeyId": key, "Plaintext": "aGk="}))["CiphertextBlob"].as_str().unwrap().to_string();
    let out = agent.kmsctl().args(["decrypt", "--ciphertext-blob", &blob]).output().unwrap();
    let said = assert_denied(&out, "Decrypt", &root);
    assert!(said.contains("explicitly denied by identity policy"), "{said}");
    assert!(said.contains("Sid \"NoDecrypt\""), "{said}");
    assert!(
        said.contains(&format!(
            "remove or narrow that statement in {}",
            config.join("policies/users/root.json").display()
        )),
        "{said}"
    );
}

#[test]
fn a_denial_by_a_key_policy_names_the_key_policy_to_change() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    let arn = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    let account = arn.split(':').nth(4).unwrap().to_string();
    let root = format!("arn:aws:iam::{account}:user/root");
    // A key policy that lets root administer the key but delegates nothing to the account.
    let policy = json!({"Version": "2012-10-17", "Statement": [{"Sid": "RootAdministers", "Effect": "Allow",
        "Principal": {"AWS": root}, "Action": ["kms:PutKeyPolicy", "kms:GetKeyPolicy", "kms:DescribeKey"],
        "Resource": "*"}]});
    agent.ok("PutKeyPolicy", json!({"KeyId": key, "PolicyName": "default", "Policy": policy.to_string()}));
    let out = agent.kmsctl().args(["encrypt", "--key-id", &key, "--plaintext", "aGk="]).output().unwrap();
    let said = assert_denied(&out, "Encrypt", &root);
    // root's own identity policy allows kms:*: the key policy is what must change.
    assert!(said.contains("the key policy neither allows the caller nor delegates kms:Encrypt"), "{said}");
    assert!(said.contains(&format!("change the key policy of {arn} to allow {root}")), "{said}");
    assert!(said.contains(&format!("kmsctl get-key-policy --key-id {arn} --policy-name default")), "{said}");
    assert!(!said.contains("policies/users/root.json"), "no identity policy can help here: {said}");
}

#[test]
fn a_user_without_any_policy_is_told_which_file_would_give_one() {
    require_root();
    let agent = TestAgent::start();
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = UserHome::new();
    let socket = agent.socket();
    let out = home.run(&bin("kmsctl"), &["--socket", socket.to_str().unwrap(), "create-key"], &[]);
    let said = stderr(&out);
    assert!(said.contains("when calling the CreateKey operation: arn:aws:iam::"), "{said}");
    assert!(said.contains(":user/nobody is not authorized to perform kms:CreateKey"), "{said}");
    let file = named_policy_file(&said, &agent.config_dir());
    assert_eq!(file, agent.config_dir().join("policies/users/nobody.json"), "{said}");
    assert!(said.contains("groups/nogroup.json beside it"), "{said}");
    // The key's default policy delegates to the account, whose identity policy must then
    // also keep kms:PutKeyPolicy for the creator (AWS's policy lockout safety check): said
    // as a denial is.
    agent.set_policy(
        "users/nobody.json",
        Some(r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:CreateKey", "Resource": "*"}]}"#),
    );
    let out = home.run(&bin("kmsctl"), &["--socket", socket.to_str().unwrap(), "create-key"], &[]);
    let said = stderr(&out);
    assert!(said.contains("(MalformedPolicyDocumentException) when calling the CreateKey operation: The new key policy will not allow you to update the key policy in the future."), "{said}");
    assert!(said.contains("add a statement allowing kms:PutKeyPolicy on arn:aws:kms:"), "{said}");
    assert!(said.contains(&agent.config_dir().join("policies/users/nobody.json").display().to_string()), "{said}");
    assert!(said.contains("--bypass-policy-lockout-safety-check"), "{said}");
    agent.set_policy(
        "users/nobody.json",
        Some(r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["kms:CreateKey", "kms:PutKeyPolicy"], "Resource": "*"}]}"#),
    );
    let out = home.run(&bin("kmsctl"), &["--socket", socket.to_str().unwrap(), "create-key"], &[]);
    assert!(out.status.success(), "the file named was not the one: {}", stderr(&out));
}

#[test]
fn a_mount_denied_its_key_names_the_policy() {
    let mut m = TestMount::new();
    m.unmount();
    let deny = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}]});
    m.agent.set_policy("users/root.json", Some(&deny.to_string()));
    let out = m.kmsfs().arg("mount").arg(m.cipher()).arg(m.mnt()).output().unwrap();
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("AccessDeniedException"), "{said}");
    assert!(said.contains(":user/root is not authorized to perform kms:Decrypt"), "{said}");
    assert!(said.contains(&m.agent.config_dir().join("policies/users/root.json").display().to_string()), "{said}");
    m.agent.set_policy("users/root.json", Some(ROOT_USES_EVERYTHING));
    m.mount();
}

// ---- already mounted ----

#[test]
fn a_volume_or_mount_point_already_mounted_says_where() {
    let m = TestMount::new();
    let other = tempfile::tempdir().unwrap();
    let out = m.kmsfs().arg("mount").arg(m.cipher()).arg(other.path()).output().unwrap();
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("is already mounted at {} (a volume is mounted once at a time)", m.mnt().display())),
        "{said}"
    );
    assert!(said.contains(&format!("`umount {}`", m.mnt().display())), "{said}");

    // Another volume onto the same mount point.
    let second = other.path().join("cipher");
    std::fs::create_dir(&second).unwrap();
    let init = m.kmsfs().arg("init").arg(&second).arg("--key-id").arg(&m.key_id).output().unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    let out = m.kmsfs().arg("mount").arg(&second).arg(m.mnt()).output().unwrap();
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "{} is already a kmsfs mount (of the volume {}",
            m.mnt().display(),
            m.cipher().display()
        )),
        "{said}"
    );

    let out = m.kmsfs().arg("mount").arg(&second).arg(other.path().join("missing")).output().unwrap();
    assert!(stderr(&out).contains("does not exist: create it (`mkdir -p"), "{}", stderr(&out));
}

// ---- the wrong key ----

/// `kmsfs mount` of `m`'s volume (unmounted), expecting a failure: what it said.
fn mount_refused(m: &TestMount, socket: &Path) -> String {
    let out = Command::new(bin("kmsfs"))
        .arg("mount")
        .arg(m.cipher())
        .arg(m.mnt())
        .arg("--socket")
        .arg(socket)
        .arg("--log-file")
        .arg(m.log_path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "mounted: {out:?}");
    stderr(&out)
}

#[test]
fn a_volume_whose_key_is_disabled_or_going_says_how_to_get_it_back() {
    let mut m = TestMount::new();
    std::fs::write(m.path("kept"), b"still here").unwrap();
    m.unmount();
    let arn = m.agent.ok("DescribeKey", json!({"KeyId": m.key_id}))["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    let socket = m.agent.socket();

    m.agent.ok("DisableKey", json!({"KeyId": m.key_id}));
    let said = mount_refused(&m, &socket);
    assert!(said.contains(&format!("the volume's key {arn} is disabled")), "{said}");
    assert!(said.contains(&format!("`kmsctl enable-key --key-id {arn}`")), "{said}");
    let fsck = m.kmsfs().arg("fsck").arg(m.cipher()).output().unwrap();
    assert_eq!(fsck.status.code(), Some(2));
    assert!(stderr(&fsck).contains("is disabled"), "{}", stderr(&fsck));
    let out = m.agent.kmsctl().args(["enable-key", "--key-id", &arn]).output().unwrap();
    assert!(out.status.success());

    m.agent.ok("ScheduleKeyDeletion", json!({"KeyId": m.key_id, "PendingWindowInDays": 7}));
    let said = mount_refused(&m, &socket);
    assert!(said.contains(&format!("the volume's key {arn} is scheduled for deletion on 20")), "{said}");
    assert!(
        said.contains(&format!("`kmsctl cancel-key-deletion --key-id {arn}`, then `kmsctl enable-key --key-id {arn}`")),
        "{said}"
    );
    for fix in [["cancel-key-deletion", "--key-id", &arn], ["enable-key", "--key-id", &arn]] {
        let out = m.agent.kmsctl().args(fix).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    m.mount();
    assert_eq!(std::fs::read(m.path("kept")).unwrap(), b"still here");
}

#[test]
fn a_volume_of_another_agent_or_a_deleted_key_says_so() {
    let mut m = TestMount::new();
    m.unmount();
    let other = TestAgent::start();
    let said = mount_refused(&m, &other.socket());
    assert!(said.contains(&format!("is not a key of the agent at {}", other.socket().display())), "{said}");
    assert!(said.contains("use that agent (--socket or KMSD_SOCKET)"), "{said}");
    assert!(said.contains("kmsfs snapshot export"), "{said}");
    let fsck =
        Command::new(bin("kmsfs")).arg("fsck").arg(m.cipher()).arg("--socket").arg(other.socket()).output().unwrap();
    assert!(stderr(&fsck).contains("is not a key of the agent"), "{}", stderr(&fsck));

    // A key deleted for good: its agent no longer knows it either.
    m.agent.ok("ScheduleKeyDeletion", json!({"KeyId": m.key_id, "PendingWindowInDays": 7}));
    m.agent.stop();
    m.agent.set_args(&["--clock-offset", "8d"]);
    m.agent.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.agent.call("DescribeKey", json!({"KeyId": m.key_id})).is_ok() {
        assert!(Instant::now() < deadline, "the key was not deleted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = mount_refused(&m, &m.agent.socket());
    assert!(said.contains("the key was deleted, and then nobody can decrypt the volume's files"), "{said}");
}

// ---- FUSE missing ----

/// `kmsfs mount` in a mount namespace of its own in which `/dev` is `dev_setup`'s.
fn mount_in_namespace(m: &TestMount, dev_setup: &str) -> Output {
    let script = format!("set -e; d=$(mktemp -d); {dev_setup}; exec \"$0\" mount \"$1\" \"$2\" --log-file \"$3\"",);
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(bin("kmsfs"))
        .arg(m.cipher())
        .arg(m.mnt())
        .arg(m.log_path())
        .env("KMSD_SOCKET", m.agent.socket())
        .output()
        .unwrap()
}

#[test]
fn fuse_missing_says_how_to_get_it() {
    require_root();
    let mut m = TestMount::new();
    m.unmount();
    // A /dev with nothing but /dev/null.
    let out = mount_in_namespace(
        &m,
        "mount -t tmpfs tmpfs $d; touch $d/null; mount --bind /dev/null $d/null; mount --bind $d /dev",
    );
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("FUSE is not available: /dev/fuse does not exist"), "{said}");
    assert!(said.contains("modprobe fuse") && said.contains("--bind=/dev/fuse"), "{said}");
    // Something else where the device should be.
    let out = mount_in_namespace(&m, "touch $d/fuse; mount --bind $d/fuse /dev/fuse");
    let said = stderr(&out);
    assert!(said.contains("/dev/fuse is not the FUSE device (not a character device)"), "{said}");
    m.mount();
}

// ---- a user other than root ----

/// As nobody: a per-user agent started on demand by `kmsfs init`, a volume under a key of
/// its own, and `kmsfs mount` through fusermount3 — a FUSE mount of nobody's that nobody
/// writes and reads through, `kmsfs status` reads, and `fusermount3 -u` ends.
#[test]
fn a_user_mounts_through_fusermount3_with_a_per_user_agent() {
    require_root();
    let home = UserHome::new();
    let created = home.run(&bin("kmsctl"), &["create-key", "--description", "mine"], &[]);
    assert!(created.status.success(), "{}", stderr(&created));
    assert!(home.socket().exists(), "kmsctl started the per-user agent");
    let key: Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let (cipher, mnt) = (home.path("cipher"), home.path("mnt"));
    let (c, mp) = (cipher.to_str().unwrap(), mnt.to_str().unwrap());
    let init = home.run(&bin("kmsfs"), &["init", c, "--key-id", &key], &[]);
    assert!(init.status.success(), "{}", stderr(&init));
    let mounted = home.run(&bin("kmsfs"), &["mount", c, mp], &[]);
    assert!(mounted.status.success(), "{}", stderr(&mounted));

    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts.lines().find(|l| l.split(' ').nth(4) == Some(mp)).unwrap_or_else(|| panic!("{mounts}"));
    assert!(line.contains(" - fuse.kmsfs ") && line.contains(&format!("user_id={NOBODY}")), "{line}");
    let sh = |script: &str| home.run(Path::new("/bin/sh"), &["-c", script], &[]);
    let wrote = sh(&format!("echo 'only mine' > {mp}/secret && cat {mp}/secret"));
    assert_eq!(String::from_utf8_lossy(&wrote.stdout), "only mine\n", "{}", stderr(&wrote));
    let stored: Vec<_> = std::fs::read_dir(&cipher).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!stored.iter().any(|n| n == "secret"), "names are encrypted: {stored:?}");
    let status = home.run(&bin("kmsfs"), &["status", mp], &[]);
    assert!(status.status.success(), "{}", stderr(&status));

    let unmounted = home.run(Path::new("fusermount3"), &["-u", mp], &[]);
    assert!(unmounted.status.success(), "{}", stderr(&unmounted));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(mp) {
        assert!(Instant::now() < deadline, "still mounted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mounted again, the file is there.
    let again = home.run(&bin("kmsfs"), &["mount", c, mp], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(String::from_utf8_lossy(&sh(&format!("cat {mp}/secret")).stdout), "only mine\n");
    assert!(home.run(Path::new("fusermount3"), &["-u", mp], &[]).status.success());
}

#[test]
fn a_user_without_fusermount3_is_told_to_install_it() {
    require_root();
    let home = UserHome::new();
    let (c, mp) = (home.path("cipher"), home.path("mnt"));
    let args = ["mount", c.to_str().unwrap(), mp.to_str().unwrap()];
    let out = home.run(&bin("kmsfs"), &args, &[("FUSERMOUNT_PATH", "/nonexistent/fusermount3")]);
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("a user other than root (nobody) mounts through fusermount3, which is not installed"),
        "{said}"
    );
    assert!(said.contains("apt-get install fuse3") && said.contains("or mount as root"), "{said}");

    // One that is there but not setuid root cannot mount for anyone but root.
    let copy = home.path("fusermount3");
    std::fs::copy("/bin/fusermount3", &copy).or_else(|_| std::fs::copy("/usr/bin/fusermount3", &copy)).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = home.run(&bin("kmsfs"), &args, &[("FUSERMOUNT_PATH", copy.to_str().unwrap())]);
    let said = stderr(&out);
    assert!(said.contains(&format!("{} is not setuid root", copy.display())), "{said}");
    assert!(said.contains("chmod u+s"), "{said}");
}

// ---- tables for people ----

/// Every line of a table is as wide as its first, and the second names the operation.
fn assert_table(out: &Output, operation: &str) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    let table = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines.len() > 3, "{table}");
    let width = lines[0].chars().count();
    assert!(lines[0].chars().all(|c| c == '-'), "{table}");
    assert!(lines.iter().all(|l| l.chars().count() == width), "ragged table:\n{table}");
    assert!(lines[1].starts_with('|') && lines[1].trim_matches(['|', ' ']) == operation, "{table}");
    table
}

/// The value in the `name | value` row of a table.
fn row<'a>(table: &'a str, name: &str) -> Option<&'a str> {
    table.lines().find_map(|line| {
        let cells: Vec<&str> = line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        (cells.len() == 2 && cells[0] == name).then(|| cells[1])
    })
}

#[test]
fn kmsctl_prints_tables_for_people_and_json_by_default() {
    let agent = TestAgent::start();
    let key = create_key(&agent);
    agent.ok("CreateAlias", json!({"AliasName": "alias/first-hour", "TargetKeyId": key}));
    let arn = agent.ok("DescribeKey", json!({"KeyId": key}))["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    let grantee = format!("arn:aws:iam::{}:user/nobody", arn.split(':').nth(4).unwrap());
    agent.ok("CreateGrant", json!({"KeyId": key, "GranteePrincipal": grantee, "Operations": ["Decrypt", "Encrypt"]}));
    let table = |args: &[&str]| agent.kmsctl().arg("--output").arg("table").args(args).output().unwrap();

    let keys = assert_table(&table(&["list-keys"]), "ListKeys");
    let header = keys.lines().find(|l| l.contains("KeyArn")).unwrap_or_else(|| panic!("{keys}"));
    assert!(header.contains("KeyId"), "a list is a header and a row per key:\n{keys}");
    assert!(keys.lines().any(|l| l.contains(&arn) && l.contains(&key)), "{keys}");

    let described = assert_table(&table(&["describe-key", "--key-id", "alias/first-hour"]), "DescribeKey");
    assert_eq!(row(&described, "KeyState"), Some("Enabled"), "{described}");
    assert_eq!(row(&described, "Arn"), Some(arn.as_str()), "{described}");
    assert!(described.contains("EncryptionAlgorithms") && described.contains("SYMMETRIC_DEFAULT"), "{described}");

    let aliases = assert_table(&table(&["list-aliases", "--key-id", &key]), "ListAliases");
    assert_eq!(row(&aliases, "AliasName"), Some("alias/first-hour"), "{aliases}");
    assert_eq!(row(&aliases, "TargetKeyId"), Some(key.as_str()), "{aliases}");

    let grants = assert_table(&table(&["list-grants", "--key-id", &key]), "ListGrants");
    assert_eq!(row(&grants, "GranteePrincipal"), Some(grantee.as_str()), "{grants}");
    let after: Vec<&str> = grants.lines().skip_while(|l| !l.contains("Operations")).collect();
    assert!(after.len() > 3 && after[2].contains("Decrypt") && after[3].contains("Encrypt"), "{grants}");

    // Machine-readable forms stay as they were.
    let json_out = agent.kmsctl().args(["describe-key", "--key-id", &key]).output().unwrap();
    let parsed: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(parsed["KeyMetadata"]["Arn"], arn);
    let text = agent.kmsctl().args(["--output", "text", "list-aliases", "--key-id", &key]).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).starts_with("ALIASES\t"), "{text:?}");
}

/// `command` (a shell command line) on a pseudo-terminal (util-linux `script`): everything
/// it wrote, stdout and stderr together, as a terminal would have shown it.
fn on_a_terminal(command: &str, socket: &Path) -> String {
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &format!("stty cols 120; {command}"), "/dev/null"])
        .env("KMSD_SOCKET", socket)
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    assert!(out.status.success(), "{command}: {}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kmsfs_status_is_a_summary_on_a_terminal_and_json_in_a_pipe() {
    let m = TestMount::new();
    std::fs::write(m.path("a"), b"a file").unwrap();
    let piped = m.kmsfs().arg("status").arg(m.mnt()).output().unwrap();
    let status: Value = serde_json::from_slice(&piped.stdout).expect("JSON in a pipe");
    let key = status["KeyId"].as_str().unwrap().to_string();

    let shown = on_a_terminal(&format!("{} status {}", bin("kmsfs").display(), m.mnt().display()), &m.agent.socket());
    assert!(serde_json::from_str::<Value>(&shown).is_err(), "JSON on a terminal:\n{shown}");
    assert!(shown.starts_with(&format!("kmsfs mount {}", m.mnt().display())), "{shown}");
    let field = |name: &str| {
        shown
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(name).map(str::trim))
            .unwrap_or_else(|| panic!("{shown}"))
    };
    assert_eq!(field("volume"), m.cipher().canonicalize().unwrap().display().to_string());
    assert_eq!(field("KMS key"), key);
    assert!(field("data-key cache").contains("keys;") && field("data-key cache").contains("hits"), "{shown}");
    assert_eq!(field("open files"), "0");

    // --output table forces the same summary into a pipe. Counters move between the two runs
    // (each status is itself FUSE requests, and the key pool refills), so the lines compare
    // by their labels, and the volume and key by value.
    let forced = m.kmsfs().args(["status", "--output", "table"]).arg(m.mnt()).output().unwrap();
    let forced = String::from_utf8_lossy(&forced.stdout).replace("\r\n", "\n");
    let labels = |text: &str| -> Vec<String> {
        text.lines().map(|l| l.trim_start().split("  ").next().unwrap_or("").to_string()).collect()
    };
    assert_eq!(labels(&forced), labels(&shown.replace("\r\n", "\n")), "{forced}\n---\n{shown}");
    for value in [m.cipher().canonicalize().unwrap().display().to_string(), key.clone()] {
        assert!(forced.contains(&value), "{forced}");
    }
    let forced = m.kmsfs().args(["status", "--output", "json"]).arg(m.mnt()).output().unwrap();
    assert!(serde_json::from_slice::<Value>(&forced.stdout).is_ok());
}

// ---- progress ----

/// Noise a progress display would leave in a pipe.
fn assert_quiet(out: &Output, what: &str) {
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(out));
    assert!(
        !all.contains('\r') && !all.contains('\u{1b}') && !all.contains(" ETA "),
        "{what} is noisy in a pipe:\n{all:?}"
    );
}

#[test]
fn long_operations_show_a_bar_on_a_terminal_and_stay_quiet_in_a_pipe() {
    let mut m = TestMount::new();
    for i in 0..200 {
        std::fs::write(m.path(&format!("f{i}")), vec![i as u8; 20_000]).unwrap();
    }
    m.unmount();
    let kmsfs = bin("kmsfs");
    let (cipher, socket) = (m.cipher(), m.agent.socket());

    let out = m.kmsfs().arg("fsck").arg(&cipher).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_quiet(&out, "fsck");
    assert!(String::from_utf8_lossy(&out.stdout).contains("clean (200 files"), "{out:?}");
    let shown = on_a_terminal(&format!("{} fsck {}", kmsfs.display(), cipher.display()), &socket);
    assert!(shown.contains("fsck [") && shown.contains("/200 files, ETA"), "no bar:\n{shown:?}");
    assert!(shown.contains("clean (200 files"), "the summary stays:\n{shown:?}");

    let out = m.kmsfs().arg("rewrap").arg(&cipher).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_quiet(&out, "rewrap");
    let shown = on_a_terminal(&format!("{} rewrap {} --threads 1", kmsfs.display(), cipher.display()), &socket);
    assert!(shown.contains("rewrap [") && shown.contains("/200 files, ETA"), "no bar:\n{shown:?}");
    assert!(shown.contains("200 files under arn:aws:kms:"), "{shown:?}");

    let dir = tempfile::tempdir().unwrap();
    let (piped, shown_dest) = (dir.path().join("piped"), dir.path().join("shown"));
    let out =
        m.kmsfs().args(["snapshot", "export"]).arg(&cipher).arg(&piped).args(["--to-key", &m.key_id]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_quiet(&out, "snapshot export");
    let command = format!(
        "{} snapshot export {} {} --to-key {}",
        kmsfs.display(),
        cipher.display(),
        shown_dest.display(),
        m.key_id
    );
    let shown = on_a_terminal(&command, &socket);
    assert!(shown.contains("export [") && shown.contains("/200 files, ETA"), "no bar:\n{shown:?}");
    assert!(shown.contains("200 files ("), "{shown:?}");

    let out = m.kmsfs().args(["snapshot", "import"]).arg(&piped).args(["--key", &m.key_id]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_quiet(&out, "snapshot import");
    let command =
        format!("{} snapshot import {} --key {} --threads 1", kmsfs.display(), shown_dest.display(), m.key_id);
    let shown = on_a_terminal(&command, &socket);
    assert!(shown.contains("/200 files, ETA"), "no bar:\n{shown:?}");
    assert!(shown.contains("imported: mount it with"), "{shown:?}");
}

#[test]
fn fsck_of_a_snapshot_not_imported_says_to_import_it() {
    let mut m = TestMount::new();
    std::fs::write(m.path("f"), b"for another host").unwrap();
    m.unmount();
    let rsa = m.agent.ok("CreateKey", json!({"KeySpec": "RSA_3072", "KeyUsage": "ENCRYPT_DECRYPT"}));
    let rsa = rsa["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    let public = m.agent.ok("GetPublicKey", json!({"KeyId": rsa}));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("receiver.der"), kmsfs_tests::unb64(&public["PublicKey"])).unwrap();
    let dest = dir.path().join("snapshot");
    let out = m
        .kmsfs()
        .args(["snapshot", "export"])
        .arg(m.cipher())
        .arg(&dest)
        .args(["--to-key", &rsa, "--public-key"])
        .arg(dir.path().join("receiver.der"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let fsck = m.kmsfs().arg("fsck").arg(&dest).output().unwrap();
    assert_eq!(fsck.status.code(), Some(2), "{fsck:?}");
    let said = stderr(&fsck);
    assert!(said.contains("is a snapshot not imported yet"), "{said}");
    assert!(said.contains(&format!("run kmsfs snapshot import {} --key KEY", dest.display())), "{said}");
    let mount = m.kmsfs().arg("mount").arg(&dest).arg(m.mnt()).output().unwrap();
    assert!(stderr(&mount).contains("is a snapshot not imported yet"), "{}", stderr(&mount));
}
