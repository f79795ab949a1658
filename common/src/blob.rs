//! The ciphertext blob: what Encrypt, GenerateDataKey and ReEncrypt return and Decrypt
//! takes. AWS keeps its format private; this is kmsfs's own, versioned:
//!
//! ```text
//! offset  size  field
//! 0       1     format version: 1 = XAES-256-GCM under material the agent holds,
//!               2 = AES-256-GCM computed inside a PKCS#11 token that holds the material
//! 1       16    key ID (UUID bytes)
//! 17      4     key material version, big-endian
//! 21      N     nonce (N = 24 for version 1, the 96-bit GCM IV, 12, for version 2)
//! 21+N    n     ciphertext
//! 21+N+n  16    GCM tag
//! ```
//!
//! The blob names the key and the material version that made it, so Decrypt needs no
//! KeyId and rotation never breaks old ciphertexts. The AAD is a domain label, the 21
//! header bytes and the canonical encryption context: changing any header field, the
//! context, the nonce, the ciphertext or the tag makes authentication fail.

use crate::aead::{AeadError, XaesKey, TAG_LEN, XAES_NONCE_LEN};
use crate::context::EncryptionContext;
use crate::ids::KeyId;

/// Format version of blobs sealed with XAES-256-GCM under agent-held key material.
pub const VERSION_XAES: u8 = 1;
/// Format version of blobs sealed with AES-256-GCM inside a PKCS#11 token, under a random
/// 96-bit IV (so at most 2^32 seals per material version, NIST SP 800-38D's bound).
pub const VERSION_TOKEN_GCM: u8 = 2;
/// The IV length of [`VERSION_TOKEN_GCM`] blobs.
pub const GCM_IV_LEN: usize = 12;
/// Bytes before the nonce.
pub const HEADER_LEN: usize = 1 + 16 + 4;
/// Smallest well-formed blob: header, nonce, one byte of ciphertext, tag.
pub const MIN_LEN: usize = HEADER_LEN + XAES_NONCE_LEN + 1 + TAG_LEN;
const AAD_LABEL: &[u8] = b"kmsfs ciphertext blob v1\0";

/// A parsed blob, borrowing the bytes it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CiphertextBlob<'a> {
    pub key_id: KeyId,
    pub material_version: u32,
    header: &'a [u8],
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

/// Why bytes are not a blob this agent could have made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobError {
    TooShort,
    UnknownVersion(u8),
}

impl<'a> CiphertextBlob<'a> {
    /// Splits a blob into its fields. Only structure is checked here; authenticity is
    /// checked by `open`.
    pub fn parse(bytes: &'a [u8]) -> Result<CiphertextBlob<'a>, BlobError> {
        if bytes.is_empty() {
            return Err(BlobError::TooShort);
        }
        let nonce_len = match bytes[0] {
            VERSION_XAES => XAES_NONCE_LEN,
            VERSION_TOKEN_GCM => GCM_IV_LEN,
            other => return Err(BlobError::UnknownVersion(other)),
        };
        if bytes.len() < HEADER_LEN + nonce_len + 1 + TAG_LEN {
            return Err(BlobError::TooShort);
        }
        let (header, rest) = bytes.split_at(HEADER_LEN);
        let (nonce, rest) = rest.split_at(nonce_len);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let key_id = KeyId::from_bytes(header[1..17].try_into().map_err(|_| BlobError::TooShort)?);
        let material_version = u32::from_be_bytes(header[17..21].try_into().map_err(|_| BlobError::TooShort)?);
        Ok(CiphertextBlob {
            key_id,
            material_version,
            header,
            nonce,
            ciphertext,
            tag: tag.try_into().map_err(|_| BlobError::TooShort)?,
        })
    }

    /// The format version (first byte).
    pub fn version(&self) -> u8 {
        self.header[0]
    }

    pub fn nonce(&self) -> &'a [u8] {
        self.nonce
    }

    pub fn ciphertext(&self) -> &'a [u8] {
        self.ciphertext
    }

    pub fn tag(&self) -> &'a [u8; TAG_LEN] {
        self.tag
    }

    /// The AAD this blob was sealed with under `context`.
    pub fn aad(&self, context: &EncryptionContext) -> Vec<u8> {
        aad(self.header, context)
    }

    /// Authenticates and decrypts a version-1 blob with the XAES-256-GCM material it names.
    pub fn open(&self, key: &XaesKey, context: &EncryptionContext) -> Result<zeroize::Zeroizing<Vec<u8>>, AeadError> {
        let nonce: &[u8; XAES_NONCE_LEN] = self.nonce.try_into().map_err(|_| AeadError)?;
        let aad = aad(self.header, context);
        let mut plaintext = zeroize::Zeroizing::new(self.ciphertext.to_vec());
        key.open_in_place(nonce, &aad, &mut plaintext, self.tag)?;
        Ok(plaintext)
    }
}

/// The 21 header bytes of a blob of format `version` by material `material_version` of
/// `key_id`: with [`aad`], what a sealer outside this module (a PKCS#11 token) needs.
pub fn header(version: u8, key_id: &KeyId, material_version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.push(version);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&material_version.to_be_bytes());
    out
}

/// Seals `plaintext` under `key` (material `material_version` of key `key_id`) into a blob.
pub fn seal(
    key: &XaesKey,
    key_id: &KeyId,
    material_version: u32,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut nonce = [0u8; XAES_NONCE_LEN];
    crate::aead::random_bytes(&mut nonce);
    seal_with_nonce(key, key_id, material_version, context, plaintext, &nonce)
}

fn seal_with_nonce(
    key: &XaesKey,
    key_id: &KeyId,
    material_version: u32,
    context: &EncryptionContext,
    plaintext: &[u8],
    nonce: &[u8; XAES_NONCE_LEN],
) -> Vec<u8> {
    let mut out = header(VERSION_XAES, key_id, material_version);
    out.reserve(XAES_NONCE_LEN + plaintext.len() + TAG_LEN);
    let aad = aad(&out, context);
    out.extend_from_slice(nonce);
    let start = out.len();
    out.extend_from_slice(plaintext);
    let tag = key.seal_in_place(nonce, &aad, &mut out[start..]);
    out.extend_from_slice(&tag);
    out
}

/// The AAD of a blob: a domain label, its header and the canonical encryption context.
pub fn aad(header: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let context = context.canonical_bytes();
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + header.len() + context.len());
    aad.extend_from_slice(AAD_LABEL);
    aad.extend_from_slice(header);
    aad.extend_from_slice(&context);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aead::KeyBytes;

    fn setup() -> (XaesKey, KeyId, EncryptionContext, Vec<u8>) {
        let key = XaesKey::new(&KeyBytes::random());
        let id = KeyId::random();
        let ctx = EncryptionContext::from([("volume", "v1"), ("file", "f1")]);
        let blob = seal(&key, &id, 3, &ctx, b"attack at dawn");
        (key, id, ctx, blob)
    }

    #[test]
    fn round_trip_names_key_and_version() {
        let (key, id, ctx, blob) = setup();
        assert_eq!(blob.len(), HEADER_LEN + XAES_NONCE_LEN + 14 + TAG_LEN);
        let parsed = CiphertextBlob::parse(&blob).unwrap();
        assert_eq!(parsed.key_id, id);
        assert_eq!(parsed.material_version, 3);
        assert_eq!(&parsed.open(&key, &ctx).unwrap()[..], b"attack at dawn");
    }

    #[test]
    fn nonces_differ_between_seals() {
        let (key, id, ctx, blob) = setup();
        let again = seal(&key, &id, 3, &ctx, b"attack at dawn");
        assert_ne!(blob, again);
    }

    /// Flipping any single bit of any field must be rejected: by structure where the field
    /// is structural (the version), by authentication everywhere else.
    #[test]
    fn every_bit_flip_is_detected() {
        let (key, _, ctx, blob) = setup();
        for byte in 0..blob.len() {
            for bit in 0..8 {
                let mut tampered = blob.clone();
                tampered[byte] ^= 1 << bit;
                let verdict =
                    CiphertextBlob::parse(&tampered).map_err(|_| ()).and_then(|b| b.open(&key, &ctx).map_err(|_| ()));
                assert!(verdict.is_err(), "flip of bit {bit} in byte {byte} went unnoticed");
            }
        }
    }

    #[test]
    fn field_by_field_tampering() {
        let (key, id, ctx, blob) = setup();
        let open = |b: &[u8], c: &EncryptionContext| {
            CiphertextBlob::parse(b).map_err(|_| ()).and_then(|p| p.open(&key, c).map_err(|_| ()))
        };
        // Version.
        let mut t = blob.clone();
        t[0] = 3;
        assert_eq!(CiphertextBlob::parse(&t), Err(BlobError::UnknownVersion(3)));
        // Relabelled as a token blob, it parses with another IV length and does not open.
        t[0] = VERSION_TOKEN_GCM;
        assert!(open(&t, &ctx).is_err());
        // Key ID: a blob relabelled to another key does not open even with this key.
        let mut t = blob.clone();
        t[1..17].copy_from_slice(KeyId::random().as_bytes());
        assert!(open(&t, &ctx).is_err());
        // Material version.
        let mut t = blob.clone();
        t[17..21].copy_from_slice(&4u32.to_be_bytes());
        assert!(open(&t, &ctx).is_err());
        // Nonce, ciphertext, tag.
        for at in [HEADER_LEN, HEADER_LEN + XAES_NONCE_LEN, blob.len() - 1] {
            let mut t = blob.clone();
            t[at] ^= 0x80;
            assert!(open(&t, &ctx).is_err(), "byte {at}");
        }
        // Truncation and extension.
        assert!(open(&blob[..blob.len() - 1], &ctx).is_err());
        assert_eq!(CiphertextBlob::parse(&blob[..MIN_LEN - 1]), Err(BlobError::TooShort));
        let mut t = blob.clone();
        t.push(0);
        assert!(open(&t, &ctx).is_err());
        // Context: missing, extra, or changed pairs.
        for other in [
            EncryptionContext::default(),
            EncryptionContext::from([("volume", "v1")]),
            EncryptionContext::from([("volume", "v1"), ("file", "f2")]),
            EncryptionContext::from([("volume", "v1"), ("file", "f1"), ("x", "")]),
        ] {
            assert!(open(&blob, &other).is_err(), "{other:?}");
        }
        // Still opens untouched, and the header really names the key.
        assert!(open(&blob, &ctx).is_ok());
        assert_eq!(CiphertextBlob::parse(&blob).unwrap().key_id, id);
    }

    #[test]
    fn token_blobs_parse_with_a_96_bit_iv_and_do_not_open_as_xaes() {
        let id = KeyId::random();
        let mut bytes = header(VERSION_TOKEN_GCM, &id, 7);
        bytes.extend_from_slice(&[1u8; GCM_IV_LEN]);
        bytes.extend_from_slice(b"ciphertext");
        bytes.extend_from_slice(&[2u8; TAG_LEN]);
        let parsed = CiphertextBlob::parse(&bytes).unwrap();
        assert_eq!((parsed.version(), parsed.key_id, parsed.material_version), (VERSION_TOKEN_GCM, id, 7));
        assert_eq!(
            (parsed.nonce(), parsed.ciphertext(), parsed.tag()),
            (&[1u8; GCM_IV_LEN][..], &b"ciphertext"[..], &[2u8; TAG_LEN])
        );
        assert!(parsed.open(&XaesKey::new(&KeyBytes::random()), &EncryptionContext::default()).is_err());
        assert_eq!(CiphertextBlob::parse(&bytes[..HEADER_LEN + GCM_IV_LEN + TAG_LEN]), Err(BlobError::TooShort));
    }

    #[test]
    fn empty_and_garbage_are_rejected_without_panic() {
        assert_eq!(CiphertextBlob::parse(&[]), Err(BlobError::TooShort));
        for len in 0..MIN_LEN {
            let bytes = vec![VERSION_XAES; len];
            assert!(CiphertextBlob::parse(&bytes).is_err());
        }
    }
}
