//! The embedded `file` root of trust: a random 256-bit root key in a 0600 file in the
//! state directory, or one derived from a passphrase with Argon2id (parameters and salt
//! in `root.kdf`, nothing secret on disk). Meant for laptops, CI and the quickstart; on a
//! server prefer a TPM or an HSM, which keep the root key off the disk.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use kmsfs_common::aead::{random_bytes, KeyBytes, KEY_LEN};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::WrappingRoot;

/// How the file backend obtains its root key.
pub enum FileRootSource {
    /// `root.key` in the state directory, created on first start.
    KeyFile(PathBuf),
    /// A passphrase, stretched with Argon2id; parameters in `root.kdf`.
    Passphrase { kdf_file: PathBuf, passphrase: Zeroizing<String> },
}

#[derive(Serialize, Deserialize)]
pub(crate) struct KdfParams {
    pub(crate) algorithm: String,
    pub(crate) version: u32,
    pub(crate) m_cost_kib: u32,
    pub(crate) t_cost: u32,
    pub(crate) p_cost: u32,
    pub(crate) salt: String,
}

/// Opens (creating on first use) the file root of trust.
pub fn open(source: FileRootSource) -> Result<WrappingRoot, String> {
    let (key, description) = root_key(source)?;
    Ok(WrappingRoot::new(&key, description))
}

/// The root key itself (creating it on first use), and a description of where it came from:
/// for [`open`], and for moving a state directory to another backend (`kmsd reseal`).
pub fn root_key(source: FileRootSource) -> Result<(KeyBytes, String), String> {
    match source {
        FileRootSource::KeyFile(path) => {
            let key = if path.exists() { read_key_file(&path)? } else { create_key_file(&path)? };
            Ok((key, format!("file ({})", path.display())))
        }
        FileRootSource::Passphrase { kdf_file, passphrase } => {
            if passphrase.is_empty() {
                return Err("the passphrase is empty".into());
            }
            let params = if kdf_file.exists() { read_kdf(&kdf_file)? } else { create_kdf(&kdf_file)? };
            let key = derive(&params, &passphrase)?;
            Ok((key, format!("file, passphrase ({})", kdf_file.display())))
        }
    }
}

fn read_key_file(path: &Path) -> Result<KeyBytes, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open root key {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "root key {} is accessible to group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN + 1));
    Read::by_ref(&mut file)
        .take(KEY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read root key {}: {e}", path.display()))?;
    KeyBytes::from_slice(&bytes).ok_or_else(|| format!("root key {} is not {KEY_LEN} bytes long", path.display()))
}

fn create_key_file(path: &Path) -> Result<KeyBytes, String> {
    let key = KeyBytes::random();
    write_atomically(path, key.expose(), 0o600)?;
    tracing::info!("created a new root key in {}", path.display());
    Ok(key)
}

fn read_kdf(path: &Path) -> Result<KdfParams, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let params: KdfParams = serde_json::from_str(&text).map_err(|e| format!("{} is malformed: {e}", path.display()))?;
    if params.algorithm != "argon2id" || params.version != 0x13 {
        return Err(format!("{}: unsupported KDF {} v{}", path.display(), params.algorithm, params.version));
    }
    Ok(params)
}

/// Argon2id with a fresh salt: OWASP's first recommended setting, about half a second on one
/// core here. (Also the tpm2 backend's recovery passphrase KDF.)
pub(crate) fn new_kdf_params() -> KdfParams {
    let mut salt = [0u8; 16];
    random_bytes(&mut salt);
    KdfParams {
        algorithm: "argon2id".into(),
        version: 0x13,
        m_cost_kib: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
        salt: base64::engine::general_purpose::STANDARD.encode(salt),
    }
}

fn create_kdf(path: &Path) -> Result<KdfParams, String> {
    let params = new_kdf_params();
    let text = serde_json::to_vec_pretty(&params).map_err(|e| e.to_string())?;
    write_atomically(path, &text, 0o600)?;
    Ok(params)
}

pub(crate) fn derive(params: &KdfParams, passphrase: &str) -> Result<KeyBytes, String> {
    let salt = base64::engine::general_purpose::STANDARD
        .decode(&params.salt)
        .map_err(|_| "the KDF salt is not base64".to_string())?;
    let argon_params = argon2::Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(KEY_LEN))
        .map_err(|e| format!("bad Argon2id parameters: {e}"))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon_params);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase.as_bytes(), &salt, &mut out[..])
        .map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(KeyBytes::from_array(*out))
}

/// [`kmsfs_common::files::write_atomically`], with the path in the error.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    kmsfs_common::files::write_atomically(path, bytes, mode)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rot::RootOfTrust;
    use kmsfs_common::ids::KeyId;

    #[test]
    fn key_file_is_created_0600_and_reopens_to_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        let root = open(FileRootSource::KeyFile(path.clone())).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let id = KeyId::random();
        let (_, stored) = root.generate(&id, 1).unwrap();
        let again = open(FileRootSource::KeyFile(path.clone())).unwrap();
        assert!(again.load(&id, 1, &stored).is_ok());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(open(FileRootSource::KeyFile(path)).err().unwrap().contains("chmod 600"));
    }

    #[test]
    fn passphrase_derives_the_same_root_and_a_wrong_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let kdf_file = dir.path().join("root.kdf");
        let src = |p: &str| FileRootSource::Passphrase {
            kdf_file: kdf_file.clone(),
            passphrase: Zeroizing::new(p.to_string()),
        };
        let root = open(src("correct horse")).unwrap();
        let id = KeyId::random();
        let (_, stored) = root.generate(&id, 1).unwrap();
        assert!(open(src("correct horse")).unwrap().load(&id, 1, &stored).is_ok());
        assert!(open(src("battery staple")).unwrap().load(&id, 1, &stored).is_err());
        assert!(open(src("")).is_err());
    }
}
