//! Roots of trust: where key material comes from and what protects it at rest.
//!
//! The handlers see only two traits. A [`RootOfTrust`] creates material for a new key
//! version and turns its stored form back into usable material; a [`KeyMaterial`] seals
//! and opens ciphertext blobs. Backends that keep a root key in the agent's memory (the
//! embedded `file` backend, and a TPM-sealed root) wrap each key's material under it
//! ([`WrappingRoot`]); a PKCS#11 backend will instead return handles to objects in the
//! token, whose `seal`/`open` run inside the token — the handlers do not change.

pub mod file;
pub mod pkcs11;
pub mod setup;
#[cfg(feature = "tpm2")]
pub mod tpm2;

use std::sync::Arc;

use kmsfs_common::aead::{KeyBytes, XaesKey, KEY_LEN, TAG_LEN, XAES_NONCE_LEN};
use kmsfs_common::blob::{self, CiphertextBlob};
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::ids::KeyId;
use kmsfs_common::KmsError;
use zeroize::Zeroizing;

/// A source of key material and its protection at rest.
pub trait RootOfTrust: Send + Sync {
    /// A short description for logs (`file (/var/lib/kmsd/root.key)`).
    fn describe(&self) -> String;

    /// Creates material for version `version` of key `key_id`. Returns the usable material
    /// and the bytes to store; the stored form is useless without this root.
    fn generate(&self, key_id: &KeyId, version: u32) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError>;

    /// Takes material from outside (ImportKeyMaterial) for version `version` of key `key_id`:
    /// returns it usable, and the bytes to store, as `generate` does.
    fn import(
        &self,
        key_id: &KeyId,
        version: u32,
        material: &KeyBytes,
    ) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError>;

    /// Turns stored bytes (from `generate` or `import`) back into usable material. Fails if they were
    /// altered, or stored for another key or version.
    fn load(&self, key_id: &KeyId, version: u32, stored: &[u8]) -> Result<Arc<dyn KeyMaterial>, KmsError>;

    /// Seals a secret of any length (an asymmetric private key in PKCS#8, an HMAC key) for
    /// version `version` of `key_id`, in a form that cannot pass for symmetric material.
    fn seal_secret(&self, _key_id: &KeyId, _version: u32, _secret: &[u8]) -> Result<Vec<u8>, KmsError> {
        Err(no_secrets(&self.describe()))
    }

    /// Opens what `seal_secret` made for the same key and version.
    fn open_secret(&self, _key_id: &KeyId, _version: u32, _stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        Err(no_secrets(&self.describe()))
    }

    /// Whether [`export`](Self::export) works: the material is held by the agent (wrapped),
    /// not inside a token. Multi-Region keys need it, since replicas get copies.
    fn exports_material(&self) -> bool {
        false
    }

    /// The raw material that `stored` (from `generate` or `import`) holds, to be wrapped
    /// for a replica on another agent; in memory wiped on drop.
    fn export(&self, key_id: &KeyId, _version: u32, _stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        Err(KmsError::new(
            kmsfs_common::ErrorKind::UnsupportedOperationException,
            format!("the material of key {key_id} stays in {}: it cannot be replicated", self.describe()),
        ))
    }

    /// Destroys what `stored` refers to outside the agent's database, if anything (a token
    /// object), once the key is deleted. Backends that wrap material have nothing to do:
    /// deleting the stored bytes is enough.
    fn destroy(&self, _key_id: &KeyId, _version: u32, _stored: &[u8]) -> Result<(), KmsError> {
        Ok(())
    }
}

fn no_secrets(root: &str) -> KmsError {
    KmsError::new(
        kmsfs_common::ErrorKind::UnsupportedOperationException,
        format!(
            "the root of trust {root} holds symmetric keys only: asymmetric and HMAC keys need the file or tpm2 root"
        ),
    )
}

/// Usable material of one key version.
pub trait KeyMaterial: Send + Sync {
    /// Seals `plaintext` into a ciphertext blob naming `key_id` and `version`. Fails only
    /// if the material lives outside the agent and cannot be reached (`KMSInternalException`).
    fn seal(
        &self,
        key_id: &KeyId,
        version: u32,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KmsError>;

    /// Opens a blob this material sealed: `InvalidCiphertextException` if it does not
    /// authenticate, `KMSInternalException` if the material cannot be reached.
    fn open(&self, blob: &CiphertextBlob<'_>, context: &EncryptionContext) -> Result<Zeroizing<Vec<u8>>, KmsError>;
}

/// Material held in the agent's memory: an XAES-256-GCM key, locked in RAM, zeroized
/// on drop.
pub struct SoftwareKey {
    xaes: XaesKey,
}

impl SoftwareKey {
    fn new(bytes: &KeyBytes) -> Arc<SoftwareKey> {
        let key = Arc::new(SoftwareKey { xaes: XaesKey::new(bytes) });
        crate::sys::lock(&*key);
        key
    }
}

impl KeyMaterial for SoftwareKey {
    fn seal(
        &self,
        key_id: &KeyId,
        version: u32,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KmsError> {
        Ok(blob::seal(&self.xaes, key_id, version, context, plaintext))
    }

    fn open(&self, blob: &CiphertextBlob<'_>, context: &EncryptionContext) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        if blob.version() != blob::VERSION_XAES {
            return Err(KmsError::invalid_ciphertext());
        }
        blob.open(&self.xaes, context).map_err(|_| KmsError::invalid_ciphertext())
    }
}

/// A root key in the agent's memory that wraps every key's material:
/// stored = nonce(24) ‖ XAES-256-GCM(material) ‖ tag(16), with the key ID and version
/// as AAD so that stored material cannot be moved to another key or version.
pub struct WrappingRoot {
    root: Box<XaesKey>,
    description: String,
}

const WRAP_LABEL: &[u8] = b"kmsfs key material v1\0";
const SECRET_LABEL: &[u8] = b"kmsfs private key material v1\0";
const WRAPPED_LEN: usize = XAES_NONCE_LEN + KEY_LEN + TAG_LEN;

impl WrappingRoot {
    pub fn new(root_key: &KeyBytes, description: String) -> WrappingRoot {
        let root = Box::new(XaesKey::new(root_key));
        crate::sys::lock(&*root);
        WrappingRoot { root, description }
    }

    fn aad(key_id: &KeyId, version: u32) -> Vec<u8> {
        Self::aad_with(WRAP_LABEL, key_id, version)
    }

    fn aad_with(label: &[u8], key_id: &KeyId, version: u32) -> Vec<u8> {
        let mut aad = label.to_vec();
        aad.extend_from_slice(key_id.as_bytes());
        aad.extend_from_slice(&version.to_be_bytes());
        aad
    }
}

impl RootOfTrust for WrappingRoot {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn generate(&self, key_id: &KeyId, version: u32) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        self.import(key_id, version, &KeyBytes::random())
    }

    fn import(
        &self,
        key_id: &KeyId,
        version: u32,
        material: &KeyBytes,
    ) -> Result<(Arc<dyn KeyMaterial>, Vec<u8>), KmsError> {
        let stored = self.root.seal(&Self::aad(key_id, version), material.expose());
        Ok((SoftwareKey::new(material), stored))
    }

    /// nonce(24) ‖ XAES-256-GCM(secret) ‖ tag(16), under its own label.
    fn seal_secret(&self, key_id: &KeyId, version: u32, secret: &[u8]) -> Result<Vec<u8>, KmsError> {
        Ok(self.root.seal(&Self::aad_with(SECRET_LABEL, key_id, version), secret))
    }

    fn open_secret(&self, key_id: &KeyId, version: u32, stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        self.root.open(&Self::aad_with(SECRET_LABEL, key_id, version), stored).map_err(|_| {
            KmsError::internal(format!(
                "stored private key of key {key_id} version {version} does not authenticate under the root of trust"
            ))
        })
    }

    fn exports_material(&self) -> bool {
        true
    }

    fn export(&self, key_id: &KeyId, version: u32, stored: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        if stored.len() != WRAPPED_LEN {
            return Err(KmsError::internal(format!("stored material of key {key_id} version {version} is damaged")));
        }
        self.root.open(&Self::aad(key_id, version), stored).map_err(|_| {
            KmsError::internal(format!(
                "stored material of key {key_id} version {version} does not authenticate under the root of trust"
            ))
        })
    }

    fn load(&self, key_id: &KeyId, version: u32, stored: &[u8]) -> Result<Arc<dyn KeyMaterial>, KmsError> {
        let damaged = || {
            KmsError::internal(format!(
                "stored material of key {key_id} version {version} does not authenticate under the root of trust"
            ))
        };
        if stored.len() != WRAPPED_LEN {
            return Err(damaged());
        }
        let material = self.root.open(&Self::aad(key_id, version), stored).map_err(|_| damaged())?;
        Ok(SoftwareKey::new(&KeyBytes::from_slice(&material).ok_or_else(damaged)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_material_is_bound_to_key_and_version() {
        let root = WrappingRoot::new(&KeyBytes::random(), "test".into());
        let id = KeyId::random();
        let (_, exported_from) = root.import(&id, 3, &KeyBytes::from_slice(&[9; 32]).unwrap()).unwrap();
        assert_eq!(&root.export(&id, 3, &exported_from).unwrap()[..], &[9; 32], "export returns what was imported");
        assert!(root.export(&id, 4, &exported_from).is_err(), "bound to its version");
        let (material, stored) = root.generate(&id, 1).unwrap();
        let loaded = root.load(&id, 1, &stored).unwrap();
        let ctx = EncryptionContext::default();
        let sealed = material.seal(&id, 1, &ctx, b"hello").unwrap();
        let parsed = CiphertextBlob::parse(&sealed).unwrap();
        assert_eq!(&loaded.open(&parsed, &ctx).unwrap()[..], b"hello");
        assert!(root.load(&KeyId::random(), 1, &stored).is_err());
        assert!(root.load(&id, 2, &stored).is_err());
        let other = WrappingRoot::new(&KeyBytes::random(), "other".into());
        assert!(other.load(&id, 1, &stored).is_err());
        let mut flipped = stored.clone();
        flipped[30] ^= 1;
        assert!(root.load(&id, 1, &flipped).is_err());
    }

    #[test]
    fn sealed_secrets_are_bound_to_key_and_version_and_are_not_material() {
        let root = WrappingRoot::new(&KeyBytes::random(), "test".into());
        let id = KeyId::random();
        let sealed = root.seal_secret(&id, 1, &[7u8; 32]).unwrap();
        assert_eq!(&root.open_secret(&id, 1, &sealed).unwrap()[..], &[7u8; 32]);
        assert!(root.open_secret(&id, 2, &sealed).is_err());
        assert!(root.open_secret(&KeyId::random(), 1, &sealed).is_err());
        // A sealed 32-byte secret is as long as wrapped material, yet does not load as such.
        assert!(root.load(&id, 1, &sealed).is_err());
        let (_, material) = root.generate(&id, 1).unwrap();
        assert!(root.open_secret(&id, 1, &material).is_err());
    }
}
