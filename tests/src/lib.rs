//! The end-to-end harness: runs the real `kmsd` (and `kmsctl`) binaries on temporary
//! sockets and state directories. Tests drive them as a user would — over the socket,
//! through the CLI, or through independent clients such as boto3.
//!
//! The binaries come from the workspace's target directory (`cargo build --bins`, which
//! the README's test command runs first) or from `KMSFS_BIN_DIR`.

pub mod netns;
pub mod nspawn;
pub mod softhsm;
pub mod swtpm;
pub mod tls;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kmsfs_common::client::{AgentClient, ClientError};
use kmsfs_common::KmsError;
use serde_json::Value;

/// Where the workspace's binaries are: `KMSFS_BIN_DIR`, or the target directory of the
/// test or benchmark that is running.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("KMSFS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // target/<profile>/deps/<test binary> → target/<profile>
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent().and_then(Path::parent).expect("target directory").to_path_buf()
        }
    }
}

/// The path of one of the workspace's binaries.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: build the binaries first with `cargo build --bins` (the README's test command does)",
        path.display()
    );
    path
}

/// The tests' log levels: the debug detail that explains a failure. Benchmarks leave the
/// binaries at their defaults instead, as deployed, so that logging is not what they measure.
const AGENT_TEST_LOG: &str = "info,kmsfs_agent=debug";
const FS_TEST_LOG: &str = "info,kmsfs_fs=debug";

/// A new temporary directory, under `parent` if given.
fn tempdir(prefix: &str, parent: Option<&Path>) -> tempfile::TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    match parent {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .expect("tempdir")
}

/// A running `kmsd` with its own socket and state directory, killed on drop.
pub struct TestAgent {
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Extra environment for kmsd (e.g. `SOFTHSM2_CONF`), from [`TestAgent::set_env`].
    env: Vec<(String, String)>,
    /// `KMSD_LOG`; `None` leaves kmsd's default.
    log_filter: Option<&'static str>,
    /// What kmsd runs under, e.g. `ip netns exec NAME`; empty runs it directly. It must
    /// exec kmsd, so that the child's pid is kmsd's (for kill, stop and SIGHUP).
    wrapper: Vec<String>,
}

impl TestAgent {
    /// Starts a fresh agent.
    pub fn start() -> TestAgent {
        TestAgent::start_with(&[])
    }

    /// Starts a fresh agent with extra `kmsd` arguments. Its configuration grants root the
    /// use of every key (`policies/users/root.json`), as an operator of a test machine would.
    pub fn start_with(args: &[&str]) -> TestAgent {
        TestAgent::start_configured(args, &[("users/root.json", ROOT_USES_EVERYTHING)])
    }

    /// Starts a fresh agent whose configuration directory holds exactly `policies`:
    /// `(path under policies/, document)` pairs.
    pub fn start_configured(args: &[&str], policies: &[(&str, &str)]) -> TestAgent {
        TestAgent::start_in(args, policies, None, Some(AGENT_TEST_LOG), None)
    }

    /// Starts a fresh agent as deployed, for benchmarks: kmsd's default log level, its
    /// directory under `parent`, the root policy of [`TestAgent::start`], and otherwise
    /// default settings (audit trail on) but for `args`.
    pub fn start_quiet_in(parent: &Path, args: &[&str]) -> TestAgent {
        TestAgent::start_in(args, &[("users/root.json", ROOT_USES_EVERYTHING)], None, None, Some(parent))
    }

    /// Starts a fresh agent whose configuration directory holds `policies` (as
    /// [`TestAgent::start_configured`]) and `access-keys.json` (mode 0600) with `access_keys`.
    pub fn start_with_access_keys(args: &[&str], policies: &[(&str, &str)], access_keys: &str) -> TestAgent {
        TestAgent::start_in(args, policies, Some(access_keys), Some(AGENT_TEST_LOG), None)
    }

    /// Starts a fresh agent as [`TestAgent::start_with_access_keys`] (no access keys file
    /// with `None`) inside network namespace `netns` (run under `ip netns exec`; see
    /// [`netns::NetnsPair`]): its `--listen-tcp` addresses are that namespace's, while its
    /// Unix socket, a file, still serves the test. Restarts stay in the namespace.
    pub fn start_in_netns(
        netns: &str,
        args: &[&str],
        policies: &[(&str, &str)],
        access_keys: Option<&str>,
    ) -> TestAgent {
        let mut agent = TestAgent::new_in(args, policies, access_keys, Some(AGENT_TEST_LOG), None);
        agent.wrapper = ["ip", "netns", "exec", netns].map(String::from).to_vec();
        agent.launch();
        agent
    }

    /// An agent's directory and configuration (as [`TestAgent::start`]'s) with nothing
    /// running yet: for `kmsd init` (see [`TestAgent::kmsd`]) before the first
    /// [`TestAgent::start_again`], which runs kmsd with `args`.
    pub fn prepared(args: &[&str]) -> TestAgent {
        TestAgent::new_in(args, &[("users/root.json", ROOT_USES_EVERYTHING)], None, Some(AGENT_TEST_LOG), None)
    }

    /// `kmsd` with this agent's state and configuration directories (and in its network
    /// namespace, if it has one), for its subcommands (`kmsd init …`, `kmsd reseal …`).
    pub fn kmsd(&self) -> Command {
        let mut cmd = self.kmsd_command();
        cmd.arg("--state-dir").arg(self.state_dir()).arg("--config-dir").arg(self.config_dir());
        cmd
    }

    /// Starts kmsd (stopped) on this agent's directories with `args` and expects it to
    /// refuse: returns what it printed. Kills it and fails the test if it serves instead.
    pub fn start_refused<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let mut child = self
            .kmsd()
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kmsd");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait for kmsd") {
                let out = child.wait_with_output().expect("kmsd output");
                let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
                assert!(!status.success(), "kmsd exited 0 instead of refusing to start:\n{text}");
                return text;
            }
            if UnixStream::connect(self.socket()).is_ok() || Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("kmsd output");
                panic!("kmsd started instead of refusing:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sets an environment variable for kmsd from the next start on (and for
    /// [`TestAgent::kmsd`]), e.g. `SOFTHSM2_CONF` for a test's own token.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    fn start_in(
        args: &[&str],
        policies: &[(&str, &str)],
        access_keys: Option<&str>,
        log_filter: Option<&'static str>,
        parent: Option<&Path>,
    ) -> TestAgent {
        let mut agent = TestAgent::new_in(args, policies, access_keys, log_filter, parent);
        agent.launch();
        agent
    }

    fn new_in(
        args: &[&str],
        policies: &[(&str, &str)],
        access_keys: Option<&str>,
        log_filter: Option<&'static str>,
        parent: Option<&Path>,
    ) -> TestAgent {
        let dir = tempdir("kmsfs-test-", parent);
        let config = dir.path().join("config");
        std::fs::create_dir_all(&config).expect("config dir");
        for (path, document) in policies {
            let path = config.join("policies").join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("policy dir");
            std::fs::write(path, document).expect("policy file");
        }
        if let Some(access_keys) = access_keys {
            use std::os::unix::fs::PermissionsExt;
            let keys = config.join("access-keys.json");
            std::fs::write(&keys, access_keys).expect("access keys");
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).expect("chmod access keys");
        }
        let extra_args = args.iter().map(|s| s.to_string()).collect();
        TestAgent { dir, child: None, extra_args, env: Vec::new(), log_filter, wrapper: Vec::new() }
    }

    /// The kmsd binary, under the agent's wrapper if it has one, with its environment.
    fn kmsd_command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(bin("kmsd")),
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("kmsd"));
                cmd
            }
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Writes (or with `None` removes) an identity policy file and reloads the agent's
    /// policies with SIGHUP.
    pub fn set_policy(&self, path: &str, document: Option<&str>) {
        let path = self.config_dir().join("policies").join(path);
        match document {
            Some(doc) => {
                std::fs::create_dir_all(path.parent().expect("parent")).expect("policy dir");
                std::fs::write(&path, doc).expect("policy file");
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let before = self.log().matches("identity policies").count();
        let _ = Command::new("kill").arg("-HUP").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("identity policies").count() == before {
            assert!(Instant::now() < deadline, "kmsd did not reload its policies:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn launch(&mut self) {
        self.spawn();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("kmsd exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "kmsd did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("agent log");
        let mut cmd = self.kmsd_command();
        match self.log_filter {
            Some(filter) => cmd.env("KMSD_LOG", filter),
            None => cmd.env_remove("KMSD_LOG"),
        };
        let child = cmd
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config-dir")
            .arg(self.config_dir())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start kmsd");
        self.child = Some(child);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("kmsd.sock")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kmsd.log")
    }

    /// The agent's audit trail directory (unless `--audit-dir` says otherwise).
    pub fn audit_dir(&self) -> PathBuf {
        self.state_dir().join("audit")
    }

    /// Every line of the audit trail in `dir` so far, in order (records are durable before
    /// their request is answered, so a reply's record is already there).
    pub fn audit_lines_in(dir: &Path) -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
        files.sort();
        files
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p).expect("read audit file").lines().map(str::to_string).collect::<Vec<_>>()
            })
            .map(|line| serde_json::from_str(&line).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}")))
            .collect()
    }

    /// The event records (digests left out) of the agent's audit trail so far.
    pub fn audit_events(&self) -> Vec<Value> {
        TestAgent::audit_lines_in(&self.audit_dir()).into_iter().filter(|r| r["eventType"] != "Digest").collect()
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// A new client connection.
    pub fn client(&self) -> AgentClient {
        AgentClient::connect(self.socket()).expect("connect to kmsd")
    }

    /// One call on a fresh connection: the response, or the service's error.
    pub fn call(&self, action: &str, request: Value) -> Result<Value, KmsError> {
        match self.client().call(action, &request) {
            Ok(v) => Ok(v),
            Err(ClientError::Service(e)) => Err(e),
            Err(e) => panic!("{action}: transport error: {e}\n{}", self.log()),
        }
    }

    /// A call that must succeed.
    pub fn ok(&self, action: &str, request: Value) -> Value {
        self.call(action, request).unwrap_or_else(|e| panic!("{action} failed: {e}"))
    }

    /// A `kmsctl` command aimed at this agent.
    pub fn kmsctl(&self) -> Command {
        let mut cmd = Command::new(bin("kmsctl"));
        cmd.env("KMSD_SOCKET", self.socket());
        cmd
    }

    /// SIGKILLs the agent: no chance to flush or clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the agent and waits for it to exit; returns its exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = child.id();
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        child.wait().ok().and_then(|s| s.code())
    }

    /// Starts the agent again on the same state directory and socket.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Replaces the extra `kmsd` arguments used from the next start on (e.g. to restart
    /// with `--clock-offset`).
    pub fn set_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Starts the agent after `kill` or `stop`, without waiting for it to be ready (to kill
    /// it during start-up).
    pub fn start_again_without_waiting(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.spawn();
    }

    /// Starts the agent after `kill` or `stop`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        self.launch();
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An identity policy that lets its holder use and manage every key.
pub const ROOT_USES_EVERYTHING: &str =
    r#"{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}"#;

/// Creates a key and returns its ID.
pub fn create_key(agent: &TestAgent) -> String {
    let v = agent.ok("CreateKey", serde_json::json!({}));
    v["KeyMetadata"]["KeyId"].as_str().expect("KeyId").to_string()
}

/// Base64 of bytes, for request bodies.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bytes of a base64 response field.
pub fn unb64(value: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(value.as_str().expect("a base64 string")).expect("valid base64")
}

/// Mount options every test mount gets besides its own: `KMSFS_TEST_MOUNT_OPTIONS`
/// (comma-separated). The README's test command runs the filesystem suites a second time
/// with `nouring`, so that both of kmsfs's transports (FUSE over io_uring, /dev/fuse)
/// are tested.
pub fn extra_mount_options() -> Vec<String> {
    std::env::var("KMSFS_TEST_MOUNT_OPTIONS")
        .unwrap_or_default()
        .split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_string)
        .collect()
}

/// A mounted kmsfs volume on a real agent: `kmsfs init` then `kmsfs mount --foreground`
/// as a child process; unmounted (and the agent stopped) on drop. Needs root and
/// `/dev/fuse`, and fails loudly without them — a filesystem test must never pass
/// without a filesystem.
pub struct TestMount {
    pub agent: TestAgent,
    pub key_id: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    mount_options: Vec<String>,
    /// `KMSFS_LOG`; `None` leaves kmsfs's default.
    log_filter: Option<&'static str>,
}

impl TestMount {
    /// A fresh volume with default settings, mounted.
    #[allow(clippy::new_without_default)] // mounting a filesystem is no default value
    pub fn new() -> TestMount {
        TestMount::with(&[], &[])
    }

    /// A fresh volume: `init_args` go to `kmsfs init`, `mount_options` to `-o`.
    pub fn with(init_args: &[&str], mount_options: &[&str]) -> TestMount {
        TestMount::create(init_args, mount_options, None)
    }

    /// A fresh volume mounted as deployed, for benchmarks: kmsfs and kmsd at their default
    /// log levels ([`TestAgent::start_quiet_in`]), both their directories under `parent`.
    pub fn quiet_in(parent: &Path, init_args: &[&str], mount_options: &[&str]) -> TestMount {
        TestMount::create(init_args, mount_options, Some(parent))
    }

    /// With `quiet_in`, as [`TestMount::quiet_in`]; without, as the tests run.
    fn create(init_args: &[&str], mount_options: &[&str], quiet_in: Option<&Path>) -> TestMount {
        let (agent, log_filter) = match quiet_in {
            None => (TestAgent::start(), Some(FS_TEST_LOG)),
            Some(parent) => (TestAgent::start_quiet_in(parent, &[]), None),
        };
        let key_id = create_key(&agent);
        TestMount::create_on(agent, key_id, init_args, mount_options, quiet_in, log_filter)
    }

    /// A fresh volume under key `key_id` of a running `agent` (a key in a custom key store,
    /// say), mounted; the mount owns the agent from then on.
    pub fn on_agent(agent: TestAgent, key_id: &str, init_args: &[&str], mount_options: &[&str]) -> TestMount {
        TestMount::create_on(agent, key_id.to_string(), init_args, mount_options, None, Some(FS_TEST_LOG))
    }

    fn create_on(
        agent: TestAgent,
        key_id: String,
        init_args: &[&str],
        mount_options: &[&str],
        quiet_in: Option<&Path>,
        log_filter: Option<&'static str>,
    ) -> TestMount {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the filesystem tests need FUSE (CI runs as root with /dev/fuse)"
        );
        assert!(is_root(), "the filesystem tests mount filesystems and need root (CI runs as root)");
        let dir = tempdir("kmsfs-mount-", quiet_in);
        std::fs::create_dir(dir.path().join("cipher")).expect("cipher dir");
        std::fs::create_dir(dir.path().join("mnt")).expect("mount point");
        let out = Command::new(bin("kmsfs"))
            .arg("init")
            .arg(dir.path().join("cipher"))
            .arg("--key-id")
            .arg(&key_id)
            .args(init_args)
            .env("KMSD_SOCKET", agent.socket())
            .output()
            .expect("run kmsfs init");
        assert!(out.status.success(), "kmsfs init failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut mount = TestMount {
            agent,
            key_id,
            dir,
            child: None,
            mount_options: mount_options.iter().map(|s| s.to_string()).chain(extra_mount_options()).collect(),
            log_filter,
        };
        mount.mount();
        mount
    }

    /// The backing (ciphertext) directory.
    pub fn cipher(&self) -> PathBuf {
        self.dir.path().join("cipher")
    }

    /// The mount point.
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt().join(rel)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kmsfs.log")
    }

    /// What kmsfs has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The kmsfs process's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mounted").id()
    }

    /// A `kmsfs` command aimed at this volume's agent.
    pub fn kmsfs(&self) -> Command {
        let mut cmd = Command::new(bin("kmsfs"));
        cmd.env("KMSD_SOCKET", self.agent.socket());
        cmd
    }

    /// Mounts the volume (after `unmount` or `kill`).
    pub fn mount(&mut self) {
        assert!(self.child.is_none(), "already mounted");
        let child = spawn_mount(
            &self.agent,
            &self.cipher(),
            &self.mnt(),
            &self.mount_options,
            self.log_filter,
            &self.log_path(),
        )
        .unwrap_or_else(|()| panic!("kmsfs mount did not become ready:\n{}", self.log()));
        self.child = Some(child);
    }

    /// Unmounts cleanly and waits for kmsfs to exit.
    pub fn unmount(&mut self) {
        if let Some(child) = self.child.take() {
            unmount_child(child, &self.mnt());
        }
    }

    /// SIGKILLs kmsfs (no chance to flush anything) and detaches the dead mount.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }
}

/// Runs `kmsfs mount CIPHER MNT --foreground` on `agent` (with the test suite's extra mount
/// options and `log_filter` as `KMSFS_LOG`, its log appended to `log`) and waits until it
/// says it is ready; `Err` if it never does (the log says why).
fn spawn_mount(
    agent: &TestAgent,
    cipher: &Path,
    mnt: &Path,
    options: &[String],
    log_filter: Option<&str>,
    log: &Path,
) -> Result<Child, ()> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
    let mut cmd = Command::new(bin("kmsfs"));
    cmd.env("KMSD_SOCKET", agent.socket()).arg("mount").arg(cipher).arg(mnt).arg("--foreground");
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    match log_filter {
        Some(filter) => cmd.env("KMSFS_LOG", filter),
        None => cmd.env_remove("KMSFS_LOG"),
    };
    let mut child = cmd
        .env("KMSFS_READY_PIPE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("run kmsfs mount");
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
    }
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        return Err(());
    }
    Ok(child)
}

/// Unmounts `mnt` (lazily if it is busy) and waits up to 20 s for its kmsfs to exit.
fn unmount_child(mut child: Child, mnt: &Path) {
    if !Command::new("umount").arg(mnt).status().is_ok_and(|s| s.success()) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An existing backing directory (an imported snapshot, say) mounted by `kmsfs mount` on an
/// agent, unmounted on drop.
pub struct MountedDir {
    child: Option<Child>,
    /// The mount point.
    pub mnt: PathBuf,
}

impl MountedDir {
    /// Mounts `cipher` on `mnt` (created if missing) with `agent`'s socket; kmsfs logs to `log`.
    pub fn new(agent: &TestAgent, cipher: &Path, mnt: &Path, log: &Path) -> MountedDir {
        std::fs::create_dir_all(mnt).expect("mount point");
        let child =
            spawn_mount(agent, cipher, mnt, &extra_mount_options(), Some(FS_TEST_LOG), log).unwrap_or_else(|()| {
                panic!("kmsfs mount of {} did not become ready: see {}", cipher.display(), log.display())
            });
        MountedDir { child: Some(child), mnt: mnt.to_path_buf() }
    }
}

impl Drop for MountedDir {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            unmount_child(child, &self.mnt);
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// True when running as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

pub use kmsfs_common::testing::Rng;
