//! HKDF-SHA256 subkey derivation: every key the format uses is derived from a key the agent
//! generated, under a label naming its one purpose, so that no key serves two algorithms.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// HKDF salt for every derivation of format version 1.
pub(crate) const SALT: &[u8] = b"kmsfs format v1";

/// Labels (HKDF `info`); `FORMAT.md` lists the same strings.
pub(crate) const LABEL_HEADER_MAC: &str = "kmsfs v1 header mac";
pub(crate) const LABEL_CONTENT_AES_GCM: &str = "kmsfs v1 content aes-256-gcm";
pub(crate) const LABEL_CONTENT_XCHACHA: &str = "kmsfs v1 content xchacha20-poly1305";
pub(crate) const LABEL_NAMES: &str = "kmsfs v1 names aes-siv";
pub(crate) const LABEL_XATTR_NAMES: &str = "kmsfs v1 xattr names aes-siv";
pub(crate) const LABEL_METADATA: &str = "kmsfs v1 metadata xaes-256-gcm";

/// `N` bytes of HKDF-SHA256(salt = [`SALT`], ikm, info = `label`).
pub(crate) fn derive<const N: usize>(ikm: &[u8], label: &str) -> Zeroizing<[u8; N]> {
    let hkdf = Hkdf::<Sha256>::new(Some(SALT), ikm);
    let mut out = Zeroizing::new([0u8; N]);
    // HKDF-SHA256 can expand to 8160 bytes; every caller asks for 32 or 64.
    #[allow(clippy::expect_used)]
    hkdf.expand(label.as_bytes(), out.as_mut()).expect("HKDF output length within 255 hash lengths");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_give_independent_keys() {
        let ikm = [7u8; 32];
        let a: Zeroizing<[u8; 32]> = derive(&ikm, LABEL_HEADER_MAC);
        let b: Zeroizing<[u8; 32]> = derive(&ikm, LABEL_CONTENT_AES_GCM);
        let c: Zeroizing<[u8; 32]> = derive(&[8u8; 32], LABEL_HEADER_MAC);
        assert_ne!(*a, *b);
        assert_ne!(*a, *c);
        assert_eq!(*a, *derive::<32>(&ikm, LABEL_HEADER_MAC));
    }

    /// RFC 5869 test case 1, to pin the construction (not just self-consistency).
    #[test]
    fn hkdf_matches_rfc5869() {
        let hkdf = Hkdf::<Sha256>::new(Some(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), &[0x0b; 22]);
        let mut okm = [0u8; 42];
        hkdf.expand(&[0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9], &mut okm).unwrap();
        assert_eq!(
            crate::format::hex(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }
}
