//! The filesystem's on-disk format: a pure codec, no FUSE, no I/O, no agent calls.
//!
//! `FORMAT.md` beside this file is the specification, byte by byte, with its threat model.
//! The modules follow the layout of a volume:
//!
//! - [`volume`]: `kmsfs.volume` at the backing directory's root, and the encryption contexts
//!   that name what each wrapped key belongs to;
//! - [`header`]: the two-slot header at offset 0 of every regular file, and the file's
//!   [`DataKey`];
//! - [`block`]: the encrypted content blocks after the header and the offset arithmetic;
//! - [`names`]: file names, directory IDs, long names, symlink targets and extended attributes;
//! - [`snapshot`]: `kmsfs.snapshot`, the manifest of a snapshot exported for another host.
//!
//! The filesystem layer reads and writes bytes and asks the agent for keys; everything that
//! decides what those bytes mean lives here.

pub mod block;
pub mod header;
pub mod names;
pub mod snapshot;
pub mod volume;

mod error;
mod kdf;

pub use block::{
    open_block, open_block_into, seal_block, seal_blocks_in_place, BlockIndex, BlockRange, ContentKey, FileId, Layout,
};
pub use error::FormatError;
pub use header::{encode_new, parse_slots, DataKey, FileHeader, UnverifiedSlot, HEADER_SIZE, SLOT_SIZE};
pub use names::{
    decrypt_long_name, decrypt_name, decrypt_symlink, decrypt_xattr_name, decrypt_xattr_value, encrypt_name,
    encrypt_symlink, encrypt_xattr_name, encrypt_xattr_value, entry_kind, is_reserved_name, validate_name, DirId,
    EncryptedName, EntryKind, NameKey, XattrOwner, DIR_ID_FILE,
};
pub use volume::{
    file_key_context, name_key_context, BlockSize, CipherSuite, NameMode, VolumeConfig, VolumeId, FORMAT_VERSION,
    VOLUME_FILE,
};

/// Lowercase hex of `bytes`, the spelling of IDs in `kmsfs.volume` and encryption contexts
/// (and of the agent's key material IDs).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Parses exactly `2 * N` lowercase hex digits into `N` bytes; uppercase is refused so that
/// every ID (and digest) has one spelling.
pub(crate) fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// The first steps of parsing one of the format's versioned JSON files (`kmsfs.volume`,
/// `kmsfs.snapshot`): at most `max_len` bytes, a JSON object, and its `version_field` equal
/// to `version` — read before anything else, so that a newer file says so instead of failing
/// on a new field. `invalid` makes the file's own error.
pub(crate) fn versioned_json(
    bytes: &[u8],
    max_len: usize,
    version_field: &str,
    version: u16,
    invalid: fn(String) -> FormatError,
) -> Result<serde_json::Value, FormatError> {
    if bytes.len() > max_len {
        return Err(invalid(format!("{} bytes, at most {max_len}", bytes.len())));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let object = value.as_object().ok_or_else(|| invalid("not a JSON object".into()))?;
    match object.get(version_field).map(|v| v.as_u64()) {
        None => Err(invalid(format!("{version_field} is missing"))),
        Some(None) => Err(invalid(format!("{version_field} is not a non-negative integer"))),
        Some(Some(v)) if v != u64::from(version) => {
            Err(FormatError::UnsupportedVersion(u16::try_from(v).unwrap_or(u16::MAX)))
        }
        Some(Some(_)) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_has_one_spelling() {
        let bytes: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        let s = hex(&bytes);
        assert_eq!(s, "00112233445566778899aabbccddeeff");
        assert_eq!(parse_hex::<16>(&s), Some(bytes));
        assert_eq!(parse_hex::<16>(&s.to_uppercase()), None);
        assert_eq!(parse_hex::<16>(&s[..31]), None);
        assert_eq!(parse_hex::<16>("zz112233445566778899aabbccddeeff"), None);
        assert_eq!(parse_hex::<16>("é0112233445566778899aabbccddeef"), None);
    }

    /// Known answers, checked against an independent implementation of `FORMAT.md` (Python's
    /// `cryptography`: HKDF, AES-SIV, AES-GCM, HMAC). A change to any construction breaks
    /// every existing volume, and breaks these first.
    #[test]
    fn known_answers() {
        let name_key = NameKey::from_bytes(&[0x42; 32]).unwrap();
        let dir = DirId::from_bytes([0x24; 16]);
        assert_eq!(
            encrypt_name(&name_key, &dir, b"hello").unwrap(),
            EncryptedName::Short("9C9hV2yRaEtgLu-7lY7Rt0hH8vjlTDZRZXUG9dMjlSc".into())
        );
        assert_eq!(
            encrypt_xattr_name(&name_key, b"user.hello").unwrap(),
            "user.kmsfs.vcoUmzg1mXshxPBgvvWY5h-wMqR6jo3taEqMoEUi2xA"
        );

        let data_key = DataKey::from_bytes(&[0x11; 32]).unwrap();
        let file = FileId::from_bytes([0x22; 16]);
        let unhex = |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
        for (cipher, stored) in [
            (CipherSuite::Aes256Gcm, "03d96a47e51c2ba73c16ad680cc267b21e24a59bc0e539b006c19df644a7c3d688"),
            (
                CipherSuite::XChaCha20Poly1305,
                "e0b640275280105736cc4ab35fe1830afaf5bb22b7ea1450638b0c9ddfb6f77107b06c8a4184e96080a31bbf14",
            ),
        ] {
            let key = ContentKey::derive(&data_key, Layout::new(cipher, BlockSize::DEFAULT));
            let stored: Vec<u8> = unhex(stored);
            let mut out = Vec::new();
            open_block(&key, &file, BlockIndex(3), true, &stored, &mut out).unwrap();
            assert_eq!(out, b"hello", "{cipher:?}");
        }

        let layout = Layout::new(CipherSuite::Aes256Gcm, BlockSize::DEFAULT);
        let header = FileHeader::new(file, layout, vec![0x33; 5]).unwrap();
        let bytes = encode_new(&header, &data_key);
        assert_eq!(
            hex(&bytes[SLOT_SIZE..SLOT_SIZE + 48]),
            "6b6d73667348445200010100000010000000000000000001222222222222222222222222222222220005333333333300"
        );
        assert_eq!(hex(&bytes[SLOT_SIZE + 480..]), "8b1575aa7707878e9b18bf01e29b430df6a703733e34e5302ad2895ba9af909b");
    }
}
