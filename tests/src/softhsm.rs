//! A SoftHSM2 per test, for the pkcs11 root of trust and custom key stores: a temporary
//! directory with its own `softhsm2.conf` and token directory, tokens made and deleted
//! with `softhsm2-util` as an operator would, and PIN files to give kmsd.
//!
//! SoftHSM2 reads its configuration from `SOFTHSM2_CONF` when a process initializes the
//! module, and lists only the tokens present then: give kmsd [`SoftHsm::env`] before it
//! starts, and make its tokens first. SoftHSM2 must be installed
//! (`scripts/install-test-deps`); without it the harness panics, so that no test passes by
//! skipping.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where Debian's softhsm2 package puts the module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The security officer's PIN of every token made here.
pub const SO_PIN: &str = "5678";
/// The environment variable SoftHSM2 reads its configuration path from.
pub const CONF_VAR: &str = "SOFTHSM2_CONF";

/// A SoftHSM2 configuration and token directory of its own, removed on drop.
pub struct SoftHsm {
    dir: tempfile::TempDir,
}

impl SoftHsm {
    /// A new, empty token directory. Panics if SoftHSM2 is not installed.
    #[allow(clippy::new_without_default)] // a temporary HSM is no default value
    pub fn new() -> SoftHsm {
        assert!(
            Path::new(MODULE).is_file(),
            "SoftHSM2 is not installed ({MODULE} is missing): run scripts/install-test-deps"
        );
        let dir = tempfile::Builder::new().prefix("kmsfs-softhsm-").tempdir().expect("tempdir");
        let hsm = SoftHsm { dir };
        std::fs::create_dir(hsm.token_dir()).expect("token dir");
        let conf = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            hsm.token_dir().display()
        );
        std::fs::write(hsm.conf_path(), conf).expect("softhsm2.conf");
        hsm
    }

    /// The PKCS#11 module to give kmsd (`--pkcs11-module`).
    pub fn module(&self) -> PathBuf {
        PathBuf::from(MODULE)
    }

    /// This HSM's `softhsm2.conf`.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// Where its tokens are stored (one directory per token).
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// The environment variable and value that point SoftHSM2 in a process (kmsd) here.
    pub fn env(&self) -> (&'static str, PathBuf) {
        (CONF_VAR, self.conf_path())
    }

    /// `softhsm2-util` aimed at this HSM.
    pub fn util(&self) -> Command {
        let mut cmd = Command::new("softhsm2-util");
        cmd.env(CONF_VAR, self.conf_path());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self
            .util()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("softhsm2-util cannot run ({e}): run scripts/install-test-deps"));
        assert!(
            out.status.success(),
            "softhsm2-util {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Initializes a token labelled `label` in a free slot, with user PIN `pin` and the SO
    /// PIN [`SO_PIN`].
    pub fn init_token(&self, label: &str, pin: &str) {
        self.run(&["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", SO_PIN]);
    }

    /// Deletes the token labelled `label` and everything in it, as an operator removing it
    /// from a running kmsd would.
    pub fn delete_token(&self, label: &str) {
        self.run(&["--delete-token", "--token", label]);
    }

    /// The labels of the initialized tokens, as `softhsm2-util --show-slots` lists them.
    pub fn token_labels(&self) -> Vec<String> {
        let out = self.run(&["--show-slots"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut labels = Vec::new();
        let mut initialized = false;
        for line in text.lines().map(str::trim) {
            if let Some(value) = line.strip_prefix("Initialized:") {
                initialized = value.trim() == "yes";
            } else if let Some(label) = line.strip_prefix("Label:") {
                if initialized {
                    labels.push(label.trim().to_string());
                }
            }
        }
        labels
    }

    /// Writes `pin` to a new 0600 file named `name` in this HSM's directory, for
    /// `--pkcs11-pin-file` (kmsd takes no PIN as an argument).
    pub fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{pin}\n")).expect("pin file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod pin file");
        path
    }
}
