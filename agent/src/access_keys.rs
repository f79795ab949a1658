//! The access keys of the TCP listener: who a SigV4-signed request comes from.
//!
//! `<config-dir>/access-keys.json` maps each access key to a principal:
//!
//! ```json
//! {"AccessKeys": [
//!   {"AccessKeyId": "AKIAEXAMPLE000000001", "SecretAccessKey": "...", "Principal": "user/alice"},
//!   {"AccessKeyId": "AKIAEXAMPLE000000002", "SecretAccessKey": "...", "Principal": "role/nginx.service"}
//! ]}
//! ```
//!
//! A `user/<name>` key acts as that user: when the user exists locally its uid and groups
//! come from the user and group databases (so group identity policies and `kmsadmin` apply as
//! for a local process of that user); otherwise it is the user name alone, with no uid
//! (`kmsd:Uid` is 4294967295) and no groups. A `role/<unit>` key carries the role
//! `arn:aws:iam::<account>:role/<unit>` as a process in that systemd unit would; its user
//! principal is `user/<AccessKeyId>`, which no policy names unless one is written for it.
//!
//! An entry may carry `"TlsClient": "<identity>"`: that key is then accepted only on a
//! mutual-TLS connection whose client certificate has that identity
//! ([`crate::tls::certificate_identity`]); elsewhere the server refuses it as an
//! unrecognized client.
//!
//! The file holds secrets: it must not be readable or writable by group or others, and must
//! belong to the agent's user or root; otherwise it is refused. It is read at start and on
//! SIGHUP; a file that does not load leaves the previous keys in force. A missing file means
//! no access keys. Secrets are kept zeroizing and never logged or printed.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::authz::Authz;
use crate::identity::Identity;
use crate::policy::eval::Caller;
use crate::sigv4::Secret;

/// The file's name in the configuration directory.
pub const FILE_NAME: &str = "access-keys.json";

/// The uid of a caller who has none (a user key for a user not on this host, a role key).
pub const NO_UID: u32 = u32::MAX;

/// One access key and the principal it authenticates.
pub struct AccessKey {
    pub access_key_id: String,
    secret: Zeroizing<String>,
    /// The principal's ARN: `arn:aws:iam::<account>:user/<name>` or `...:role/<unit>`.
    pub arn: String,
    /// The principal as the policy evaluator sees it.
    pub caller: Arc<Caller>,
    /// The client certificate identity this key is bound to (`TlsClient`): the key is
    /// accepted only on a mutual-TLS connection whose client certificate names it.
    pub tls_client: Option<String>,
}

impl Secret for AccessKey {
    fn secret_access_key(&self) -> &[u8] {
        self.secret.as_bytes()
    }
}

impl std::fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKey")
            .field("access_key_id", &self.access_key_id)
            .field("arn", &self.arn)
            .field("tls_client", &self.tls_client)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(rename = "AccessKeys")]
    access_keys: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(rename = "AccessKeyId")]
    access_key_id: String,
    /// Moved into a `Zeroizing` as soon as it is validated.
    #[serde(rename = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(rename = "Principal")]
    principal: String,
    #[serde(rename = "TlsClient", default)]
    tls_client: Option<String>,
}

/// A loaded set of access keys.
#[derive(Default)]
pub struct AccessKeys {
    by_id: HashMap<String, Arc<AccessKey>>,
}

impl AccessKeys {
    /// The key with this ID.
    pub fn get(&self, access_key_id: &str) -> Option<&Arc<AccessKey>> {
        self.by_id.get(access_key_id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// How many keys are bound to a client certificate identity (`TlsClient`).
    pub fn bound_to_tls_clients(&self) -> usize {
        self.by_id.values().filter(|k| k.tls_client.is_some()).count()
    }

    /// Reads `path` (absent: no keys), refusing a file others could read or change.
    pub fn load(path: &Path, account: &str) -> Result<AccessKeys, String> {
        let Some(bytes) = read_private_file(path, "secret access keys")? else { return Ok(AccessKeys::default()) };
        let text = std::str::from_utf8(&bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?;
        AccessKeys::parse(text, account).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and validates the file's text. Errors name the entry and the problem, never
    /// a secret.
    pub fn parse(text: &str, account: &str) -> Result<AccessKeys, String> {
        let doc: FileDoc = serde_json::from_str(text).map_err(|e| {
            format!(
                "expected {{\"AccessKeys\": [{{\"AccessKeyId\", \"SecretAccessKey\", \"Principal\", optional \
                 \"TlsClient\"}}]}}: {e}"
            )
        })?;
        let mut keys = AccessKeys::default();
        for (i, entry) in doc.access_keys.into_iter().enumerate() {
            let id = entry.access_key_id;
            let at = format!("AccessKeys[{i}]");
            if !(16..=128).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("{at}: AccessKeyId must be 16 to 128 letters and digits"));
            }
            if entry.secret_access_key.len() < 16 || !entry.secret_access_key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "{at} ({id}): SecretAccessKey must be at least 16 printable ASCII characters without spaces"
                ));
            }
            let (arn, caller) =
                principal(&entry.principal, &id, account).map_err(|e| format!("{at} ({id}): Principal {e}"))?;
            if let Some(identity) = &entry.tls_client {
                if !crate::tls::is_valid_identity(identity) {
                    return Err(format!("{at} ({id}): TlsClient {}", crate::tls::IDENTITY_RULE));
                }
            }
            let secret = Zeroizing::new(entry.secret_access_key);
            let key = AccessKey { access_key_id: id.clone(), secret, arn, caller, tls_client: entry.tls_client };
            if keys.by_id.insert(id.clone(), Arc::new(key)).is_some() {
                return Err(format!("{at}: AccessKeyId {id} appears more than once"));
            }
        }
        Ok(keys)
    }
}

/// Reads a file that holds secrets (`holding` says which, for the refusal), or `None` if
/// it does not exist. The file is refused if group or others may read or write it, or if it
/// belongs to neither kmsd's user nor root; the checks are made on the open file, so that
/// the file read is the file checked.
pub fn read_private_file(path: &Path, holding: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO in the file's place cannot hang the agent.
    let mut file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let meta = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is accessible to group or others (mode {mode:04o}); it holds {holding}, so kmsd refuses it: \
             chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(format!(
            "{} belongs to uid {}; it holds {holding}, so it must belong to kmsd's user (uid {euid}) or root",
            path.display(),
            meta.uid()
        ));
    }
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(MAX_FILE)));
    (&mut file).take(MAX_FILE as u64 + 1).read_to_end(&mut bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > MAX_FILE {
        return Err(format!("{} is larger than {MAX_FILE} bytes", path.display()));
    }
    Ok(Some(bytes))
}

/// The largest secret file read: far more than any key file or access key list needs.
const MAX_FILE: usize = 4 << 20;

/// The principal `user/<name>` or `role/<unit>`: its ARN and its caller.
fn principal(text: &str, access_key_id: &str, account: &str) -> Result<(String, Arc<Caller>), String> {
    let valid_name = |s: &str, extra: &[u8]| {
        !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
    };
    if let Some(name) = text.strip_prefix("user/") {
        if !valid_name(name, b"-_.@") {
            return Err(format!("'{text}': a user name is letters, digits and -_.@"));
        }
        let caller = match Identity::of_local_user(name) {
            Some(identity) => Authz::caller(&identity, account),
            None => Caller::user(account, name, NO_UID),
        };
        return Ok((caller.user_arn(), Arc::new(caller)));
    }
    if let Some(unit) = text.strip_prefix("role/") {
        if !valid_name(unit, b"-_.@:\\") || !unit.ends_with(".service") {
            return Err(format!("'{text}': a role is a systemd service name such as role/nginx.service"));
        }
        let mut caller = Caller::user(account, access_key_id, NO_UID);
        caller.unit = Some(unit.to_string());
        let arn = caller.role_arn().unwrap_or_default();
        return Ok((arn, Arc::new(caller)));
    }
    Err(format!("'{text}' must be user/<name> or role/<unit>.service"))
}

/// The access keys in force, reloadable.
pub struct AccessKeyStore {
    path: PathBuf,
    account: String,
    current: RwLock<Arc<AccessKeys>>,
}

impl AccessKeyStore {
    /// Loads `<config_dir>/access-keys.json`.
    pub fn load(config_dir: &Path, account: &str) -> Result<AccessKeyStore, String> {
        let path = config_dir.join(FILE_NAME);
        let keys = AccessKeys::load(&path, account)?;
        Ok(AccessKeyStore { path, account: account.to_string(), current: RwLock::new(Arc::new(keys)) })
    }

    /// Reads the file again; on error the previous keys stay in force.
    pub fn reload(&self) -> Result<usize, String> {
        let keys = AccessKeys::load(&self.path, &self.account)?;
        let n = keys.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<AccessKeys> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "111122223333";

    fn entry(id: &str, secret: &str, principal: &str) -> String {
        format!(r#"{{"AccessKeyId": "{id}", "SecretAccessKey": "{secret}", "Principal": "{principal}"}}"#)
    }

    fn parse(entries: &[String]) -> Result<AccessKeys, String> {
        AccessKeys::parse(&format!(r#"{{"AccessKeys": [{}]}}"#, entries.join(",")), ACCOUNT)
    }

    #[test]
    fn users_and_roles_become_callers() {
        let keys = parse(&[
            entry("AKIAKMSDTEST00000001", "secret-secret-secret-1", "user/root"),
            entry("AKIAKMSDTEST00000002", "secret-secret-secret-2", "user/not-a-local-user"),
            entry("AKIAKMSDTEST00000003", "secret-secret-secret-3", "role/nginx.service"),
        ])
        .expect("valid");
        let root = keys.get("AKIAKMSDTEST00000001").expect("root");
        assert_eq!(root.arn, "arn:aws:iam::111122223333:user/root");
        assert_eq!((root.caller.uid, root.caller.groups.contains(&"root".to_string())), (0, true));
        assert_eq!(root.secret_access_key(), b"secret-secret-secret-1");
        let remote = keys.get("AKIAKMSDTEST00000002").expect("remote");
        assert_eq!((remote.caller.user.as_str(), remote.caller.uid), ("not-a-local-user", NO_UID));
        assert!(remote.caller.groups.is_empty());
        let role = keys.get("AKIAKMSDTEST00000003").expect("role");
        assert_eq!(role.arn, "arn:aws:iam::111122223333:role/nginx.service");
        assert_eq!(role.caller.unit.as_deref(), Some("nginx.service"));
        assert!(!format!("{role:?}").contains("secret-secret"));
    }

    #[test]
    fn bad_entries_are_refused_without_showing_secrets() {
        let secret = "a-very-secret-value-123";
        for (bad, want) in [
            (entry("AKIA", secret, "user/root"), "16 to 128"),
            (entry("AKIA-KMSD-TEST-00001", secret, "user/root"), "16 to 128"),
            (entry("AKIAKMSDTEST00000001", "short", "user/root"), "at least 16"),
            (entry("AKIAKMSDTEST00000001", secret, "group/wheel"), "user/<name> or role/"),
            (entry("AKIAKMSDTEST00000001", secret, "role/nginx"), "systemd service"),
            (entry("AKIAKMSDTEST00000001", secret, "user/a b"), "user name"),
        ] {
            let e = parse(&[bad]).err().expect("refused");
            assert!(e.contains(want), "{e}");
            assert!(!e.contains(secret), "{e}");
        }
        let twice = entry("AKIAKMSDTEST00000001", secret, "user/root");
        assert!(parse(&[twice.clone(), twice]).err().expect("refused").contains("more than once"));
        let unknown = r#"{"AccessKeys": [], "Extra": 1}"#;
        assert!(AccessKeys::parse(unknown, ACCOUNT).is_err());
    }

    #[test]
    fn a_key_may_be_bound_to_a_tls_client_identity() {
        let bound = r#"{"AccessKeys": [{"AccessKeyId": "AKIAKMSDTEST00000001", "SecretAccessKey": "secret-secret-1234",
            "Principal": "user/root", "TlsClient": "host-b.example.com"}]}"#;
        let keys = AccessKeys::parse(bound, ACCOUNT).expect("valid");
        let key = keys.get("AKIAKMSDTEST00000001").expect("key");
        assert_eq!(key.tls_client.as_deref(), Some("host-b.example.com"));
        assert_eq!(keys.bound_to_tls_clients(), 1);
        let bad = bound.replace("host-b.example.com", "*.example.com");
        let e = AccessKeys::parse(&bad, ACCOUNT).err().expect("refused");
        assert!(e.contains("TlsClient") && e.contains("letters, digits"), "{e}");
    }

    #[test]
    fn a_file_others_can_read_is_refused_and_a_missing_one_is_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        assert!(AccessKeys::load(&path, ACCOUNT).expect("missing is fine").is_empty());
        let text =
            format!(r#"{{"AccessKeys": [{}]}}"#, entry("AKIAKMSDTEST00000001", "secret-secret-1234", "user/root"));
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = AccessKeys::load(&path, ACCOUNT).err().expect("refused");
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(AccessKeys::load(&path, ACCOUNT).expect("loads").len(), 1);
    }

    #[test]
    fn a_bad_reload_keeps_the_previous_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let text =
            format!(r#"{{"AccessKeys": [{}]}}"#, entry("AKIAKMSDTEST00000001", "secret-secret-1234", "user/root"));
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let store = AccessKeyStore::load(dir.path(), ACCOUNT).expect("loads");
        std::fs::write(&path, "{not json").expect("write");
        assert!(store.reload().is_err());
        assert!(store.current().get("AKIAKMSDTEST00000001").is_some());
    }
}
