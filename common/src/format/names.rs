//! Names and small metadata: file and directory names, directory IDs, long names, symlink
//! targets, and `user.*` extended attributes.
//!
//! - Names are encrypted with AES-SIV (RFC 5297, AES-256-CMAC-SIV) with the parent
//!   directory's ID as associated data: deterministic, so a lookup encrypts the name and
//!   opens the backing entry directly; authenticated, so a tampered name, or one moved into
//!   another directory, fails to decrypt. Plaintext is padded to a multiple of 16 bytes
//!   (PKCS#7) so that only the length class of a name shows, and encoded as unpadded
//!   base64url, which never contains `/`, NUL or `.` (so never `.`, `..` or a reserved name).
//! - An encoded name longer than 255 bytes is stored as `kmsfs.long.<base64url(SHA-256(encoded))>`
//!   with the full encoded name in a side file `<that>.name` in the same directory.
//! - Each directory's ID (16 random bytes) is the content of its `kmsfs.dirid` file; the
//!   root's is in `kmsfs.volume`.
//! - Symlink targets and `user.*` xattr values are sealed with XAES-256-GCM (random 24-byte
//!   nonce) under a subkey of the name key; xattr values are bound to the owning file or
//!   directory and to the attribute's name. Xattr names are encrypted like file names,
//!   under their own subkey, without a directory ID.
//!
//! All keys here derive from the volume's [`NameKey`] with HKDF-SHA256.

use aes_siv::aead::array::Array;
use aes_siv::aead::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::block::FileId;
use super::error::FormatError;
use super::header::DataKey;
use super::kdf;
use super::{hex, parse_hex};
use crate::aead::{KeyBytes, XaesKey, KEY_LEN, TAG_LEN, XAES_NONCE_LEN};

/// Longest name a user may create, in bytes (Linux's NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest backing-directory entry written: the backing filesystem's NAME_MAX. Encoded
/// names up to this length are stored as they are ([`EncryptedName::Short`]); with padding
/// and the 16-byte SIV tag that is every plaintext name of up to 159 bytes.
pub const MAX_SHORT_NAME_LEN: usize = 255;
/// Every name the format itself puts in the backing directory begins with this.
pub const RESERVED_PREFIX: &str = "kmsfs.";
/// The file holding a directory's 16-byte ID.
pub const DIR_ID_FILE: &str = "kmsfs.dirid";
/// Prefix of a long name's directory entry.
pub const LONG_NAME_PREFIX: &str = "kmsfs.long.";
/// Suffix appended to a long name's entry to name its side file.
pub const LONG_NAME_SUFFIX: &str = ".name";
/// Prefix of encrypted xattr names in the backing filesystem.
pub const XATTR_PREFIX: &str = "user.kmsfs.";
/// The namespace whose xattrs are encrypted; others are not this codec's business.
pub const USER_XATTR_NAMESPACE: &str = "user.";
/// Longest plaintext xattr name: `user.` and 159 bytes (so the encrypted name fits Linux's
/// 255-byte XATTR_NAME_MAX).
pub const MAX_XATTR_NAME_LEN: usize = USER_XATTR_NAMESPACE.len() + 159;
/// Longest xattr value: Linux's 64 KiB XATTR_SIZE_MAX less nonce and tag.
pub const MAX_XATTR_VALUE_LEN: usize = 65536 - XAES_NONCE_LEN - TAG_LEN;
/// Longest symlink target: the encoded target must fit a 4095-byte symlink.
pub const MAX_SYMLINK_TARGET_LEN: usize = 4095 * 3 / 4 - XAES_NONCE_LEN - TAG_LEN;

const SIV_TAG_LEN: usize = 16;
const PAD_BLOCK: usize = 16;
/// Longest encoded name: 255 bytes padded to 256, plus the SIV tag, in base64.
const MAX_ENCODED_NAME_LEN: usize = ((NAME_MAX / PAD_BLOCK + 1) * PAD_BLOCK + SIV_TAG_LEN).div_ceil(3) * 4;
/// Length of base64url(SHA-256).
const HASH_B64_LEN: usize = 43;
const AAD_SYMLINK: &[u8] = b"kmsfs v1 symlink target";
const AAD_XATTR_VALUE: &[u8] = b"kmsfs v1 xattr value";

/// A directory's random 128-bit ID, the associated data of its entries' names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirId([u8; 16]);

impl DirId {
    pub const LEN: usize = 16;

    pub fn random() -> DirId {
        let mut bytes = [0u8; 16];
        crate::aead::random_bytes(&mut bytes);
        DirId(bytes)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> DirId {
        DirId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses the contents of a `kmsfs.dirid` file: exactly 16 bytes.
    pub fn parse(file: &[u8]) -> Result<DirId, FormatError> {
        let bytes: [u8; 16] = file.try_into().map_err(|_| FormatError::Malformed { what: "directory ID file" })?;
        Ok(DirId(bytes))
    }

    /// The contents of a `kmsfs.dirid` file.
    pub fn encode(&self) -> [u8; 16] {
        self.0
    }

    /// 32 lowercase hex digits (the spelling in `kmsfs.volume`).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn parse_hex(s: &str) -> Option<DirId> {
        parse_hex(s).map(DirId)
    }
}

impl std::fmt::Debug for DirId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirId({})", self.to_hex())
    }
}

/// The volume's name key: 32 bytes from GenerateDataKey (`KeySpec: AES_256`) under
/// [`name_key_context`](super::volume::name_key_context), wrapped in `kmsfs.volume`. The
/// subkeys derived from it are computed once; all are zeroized on drop, never printed.
pub struct NameKey {
    names: Zeroizing<[u8; 64]>,
    xattr_names: Zeroizing<[u8; 64]>,
    metadata: XaesKey,
}

impl NameKey {
    /// Bytes of key material (what GenerateDataKey returns for `AES_256`).
    pub const LEN: usize = KEY_LEN;

    /// How many bytes to ask GenerateDataKey for.
    pub const fn generate_len() -> usize {
        Self::LEN
    }

    /// From the plaintext of GenerateDataKey or Decrypt: exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<NameKey, FormatError> {
        let key = KeyBytes::from_slice(bytes).ok_or(FormatError::Malformed { what: "name key length" })?;
        Ok(NameKey::from_key_bytes(&key))
    }

    /// From key material already held as a data key.
    pub fn from_data_key(key: &DataKey) -> NameKey {
        NameKey::from_key_bytes(&KeyBytes::from_array(*key.expose()))
    }

    pub fn from_key_bytes(key: &KeyBytes) -> NameKey {
        let ikm = key.expose();
        let metadata = kdf::derive::<32>(ikm, kdf::LABEL_METADATA);
        NameKey {
            names: kdf::derive::<64>(ikm, kdf::LABEL_NAMES),
            xattr_names: kdf::derive::<64>(ikm, kdf::LABEL_XATTR_NAMES),
            metadata: XaesKey::new(&KeyBytes::from_array(*metadata)),
        }
    }

    /// A fresh random key (tests, and tools that do not use the agent).
    pub fn random() -> NameKey {
        NameKey::from_key_bytes(&KeyBytes::random())
    }
}

impl std::fmt::Debug for NameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameKey(<redacted>)")
    }
}

/// An encrypted name, as it goes into the backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptedName {
    /// The entry is the encoded name itself (at most [`MAX_SHORT_NAME_LEN`] bytes).
    Short(String),
    /// The entry is `file_name` (`kmsfs.long.<hash>`); a side file named
    /// `file_name + ".name"` holds `full`, the encoded name.
    Long { file_name: String, full: String },
}

impl EncryptedName {
    /// The name of the backing directory entry (file, directory or symlink).
    pub fn entry_name(&self) -> &str {
        match self {
            EncryptedName::Short(name) => name,
            EncryptedName::Long { file_name, .. } => file_name,
        }
    }

    /// For a long name, the side file's name and contents.
    pub fn side_file(&self) -> Option<(String, &[u8])> {
        match self {
            EncryptedName::Short(_) => None,
            EncryptedName::Long { file_name, full } => {
                Some((format!("{file_name}{LONG_NAME_SUFFIX}"), full.as_bytes()))
            }
        }
    }
}

/// What a backing directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// An encrypted name: [`decrypt_name`] it.
    Short,
    /// `kmsfs.long.<hash>`: read its side file and [`decrypt_long_name`].
    Long,
    /// The format's own files (`kmsfs.volume`, `kmsfs.dirid`, long-name side files, and any
    /// other `kmsfs.` name): hidden from listings, never exposed.
    Reserved,
}

/// Classifies a backing directory entry.
pub fn entry_kind(name: &str) -> EntryKind {
    match name.strip_prefix(LONG_NAME_PREFIX) {
        Some(hash) if hash.len() == HASH_B64_LEN && hash.bytes().all(is_base64url) => EntryKind::Long,
        _ if name.starts_with(RESERVED_PREFIX) => EntryKind::Reserved,
        _ => EntryKind::Short,
    }
}

/// True for backing entries the filesystem hides from listings: every `kmsfs.` name except
/// long-name entries. In plaintext-names mode the filesystem refuses to create such names.
pub fn is_reserved_name(name: &str) -> bool {
    entry_kind(name) == EntryKind::Reserved
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Checks a plaintext name a user wants to create or look up.
pub fn validate_name(name: &[u8]) -> Result<(), FormatError> {
    if name.is_empty() {
        return Err(FormatError::InvalidName("empty"));
    }
    if name == b"." || name == b".." {
        return Err(FormatError::InvalidName("\".\" and \"..\" are not names"));
    }
    if name.len() > NAME_MAX {
        return Err(FormatError::TooLong { what: "name", len: name.len(), max: NAME_MAX });
    }
    if name.contains(&b'/') {
        return Err(FormatError::InvalidName("contains '/'"));
    }
    if name.contains(&0) {
        return Err(FormatError::InvalidName("contains NUL"));
    }
    Ok(())
}

/// Deterministic authenticated encryption of a padded name; returns base64url(tag ‖ ct).
fn siv_encrypt(key: &[u8; 64], associated: &[&[u8]], plaintext: &[u8]) -> String {
    let pad = PAD_BLOCK - plaintext.len() % PAD_BLOCK;
    let mut buf = Zeroizing::new(Vec::with_capacity(SIV_TAG_LEN + plaintext.len() + pad));
    buf.resize(SIV_TAG_LEN, 0);
    buf.extend_from_slice(plaintext);
    buf.resize(SIV_TAG_LEN + plaintext.len() + pad, pad as u8);
    let mut siv = Aes256Siv::new(&Array::from(*key));
    let (tag, body) = buf.split_at_mut(SIV_TAG_LEN);
    // S2V accepts up to 126 associated-data strings; we pass at most one.
    #[allow(clippy::expect_used)]
    let computed = siv.encrypt_inout_detached(associated, body.into()).expect("one associated-data string");
    tag.copy_from_slice(&computed);
    URL_SAFE_NO_PAD.encode(&buf[..])
}

fn siv_decrypt(
    key: &[u8; 64],
    associated: &[&[u8]],
    encoded: &str,
    what: &'static str,
) -> Result<Vec<u8>, FormatError> {
    if encoded.len() > MAX_ENCODED_NAME_LEN {
        return Err(FormatError::Malformed { what });
    }
    let mut buf = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| FormatError::Malformed { what })?;
    // Tag, then whole padding blocks (written without `is_multiple_of`, for Rust 1.85).
    let body = buf.len().saturating_sub(SIV_TAG_LEN);
    if body < PAD_BLOCK || body / PAD_BLOCK * PAD_BLOCK != body {
        return Err(FormatError::Malformed { what });
    }
    let mut siv = Aes256Siv::new(&Array::from(*key));
    let (tag, body) = buf.split_at_mut(SIV_TAG_LEN);
    let tag = Array::try_from(&*tag).map_err(|_| FormatError::Malformed { what })?;
    siv.decrypt_inout_detached(associated, body.into(), &tag).map_err(|_| FormatError::Authentication { what })?;
    buf.drain(..SIV_TAG_LEN);
    // Authentic, so the padding was written by a key holder; checked anyway.
    let pad = usize::from(buf.last().copied().unwrap_or(0));
    if pad == 0 || pad > PAD_BLOCK || !buf[buf.len() - pad..].iter().all(|&b| usize::from(b) == pad) {
        return Err(FormatError::Malformed { what });
    }
    buf.truncate(buf.len() - pad);
    Ok(buf)
}

fn long_file_name(full: &str) -> String {
    format!("{LONG_NAME_PREFIX}{}", URL_SAFE_NO_PAD.encode(Sha256::digest(full.as_bytes())))
}

/// Encrypts a name for directory `dir_id`. Refuses what a Linux filesystem refuses: empty,
/// `.`, `..`, `/` or NUL inside, more than 255 bytes.
pub fn encrypt_name(key: &NameKey, dir_id: &DirId, name: &[u8]) -> Result<EncryptedName, FormatError> {
    validate_name(name)?;
    let encoded = siv_encrypt(&key.names, &[dir_id.as_bytes()], name);
    if encoded.len() <= MAX_SHORT_NAME_LEN {
        Ok(EncryptedName::Short(encoded))
    } else {
        Ok(EncryptedName::Long { file_name: long_file_name(&encoded), full: encoded })
    }
}

fn decrypt_encoded(key: &NameKey, dir_id: &DirId, encoded: &str) -> Result<Vec<u8>, FormatError> {
    let name = siv_decrypt(&key.names, &[dir_id.as_bytes()], encoded, "name")?;
    validate_name(&name).map_err(|_| FormatError::Malformed { what: "name (decrypts to an invalid name)" })?;
    Ok(name)
}

/// Decrypts a short entry name of directory `dir_id`. Fails on tampering, on a name moved
/// from another directory, and on long-name or reserved entries (see [`entry_kind`]).
pub fn decrypt_name(key: &NameKey, dir_id: &DirId, stored: &str) -> Result<Vec<u8>, FormatError> {
    if entry_kind(stored) != EntryKind::Short || stored.len() > MAX_SHORT_NAME_LEN {
        return Err(FormatError::Malformed { what: "name (not a short encrypted name)" });
    }
    decrypt_encoded(key, dir_id, stored)
}

/// Decrypts a long name: `file_name` is the entry (`kmsfs.long.<hash>`), `side_file` the
/// contents of `<file_name>.name`. The hash must match, so side files cannot be swapped.
pub fn decrypt_long_name(
    key: &NameKey,
    dir_id: &DirId,
    file_name: &str,
    side_file: &[u8],
) -> Result<Vec<u8>, FormatError> {
    if entry_kind(file_name) != EntryKind::Long {
        return Err(FormatError::Malformed { what: "long name entry" });
    }
    let full = std::str::from_utf8(side_file).map_err(|_| FormatError::Malformed { what: "long name side file" })?;
    // A name that fits an entry is always stored short: one representation per name.
    if full.len() <= MAX_SHORT_NAME_LEN || full.len() > MAX_ENCODED_NAME_LEN {
        return Err(FormatError::Malformed { what: "long name side file" });
    }
    if long_file_name(full) != file_name {
        return Err(FormatError::Authentication { what: "long name side file" });
    }
    decrypt_encoded(key, dir_id, full)
}

/// Encrypts a symlink's target into the string stored as the backing symlink's target.
/// Not bound to the link's location (see `FORMAT.md`): renaming a symlink needs no rewrite.
pub fn encrypt_symlink(key: &NameKey, target: &[u8]) -> Result<String, FormatError> {
    if target.is_empty() {
        return Err(FormatError::InvalidName("empty symlink target"));
    }
    if target.contains(&0) {
        return Err(FormatError::InvalidName("symlink target contains NUL"));
    }
    if target.len() > MAX_SYMLINK_TARGET_LEN {
        return Err(FormatError::TooLong { what: "symlink target", len: target.len(), max: MAX_SYMLINK_TARGET_LEN });
    }
    let sealed = Zeroizing::new(xaes_seal(&key.metadata, AAD_SYMLINK, target));
    Ok(URL_SAFE_NO_PAD.encode(&sealed[..]))
}

/// Decrypts a backing symlink's target (what readlink returned).
pub fn decrypt_symlink(key: &NameKey, stored: &[u8]) -> Result<Vec<u8>, FormatError> {
    const WHAT: &str = "symlink target";
    if stored.len() > 4095 {
        return Err(FormatError::Malformed { what: WHAT });
    }
    let sealed = URL_SAFE_NO_PAD.decode(stored).map_err(|_| FormatError::Malformed { what: WHAT })?;
    let target = xaes_open(&key.metadata, AAD_SYMLINK, &sealed, WHAT)?;
    if target.is_empty() || target.contains(&0) {
        return Err(FormatError::Malformed { what: WHAT });
    }
    Ok(target)
}

/// What an xattr belongs to: its value is bound to it, so values cannot be moved between
/// files or directories. Regular files use the (verified) header's file ID, directories
/// their directory ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrOwner {
    File(FileId),
    Dir(DirId),
}

impl XattrOwner {
    fn code(&self) -> u8 {
        match self {
            XattrOwner::File(_) => 1,
            XattrOwner::Dir(_) => 2,
        }
    }

    fn id(&self) -> &[u8; 16] {
        match self {
            XattrOwner::File(id) => id.as_bytes(),
            XattrOwner::Dir(id) => id.as_bytes(),
        }
    }
}

fn check_xattr_name(name: &[u8]) -> Result<&[u8], FormatError> {
    let rest = name
        .strip_prefix(USER_XATTR_NAMESPACE.as_bytes())
        .ok_or(FormatError::InvalidName("only user.* xattrs are encrypted"))?;
    if rest.is_empty() || rest.contains(&0) {
        return Err(FormatError::InvalidName("xattr name"));
    }
    if name.len() > MAX_XATTR_NAME_LEN {
        return Err(FormatError::TooLong { what: "xattr name", len: name.len(), max: MAX_XATTR_NAME_LEN });
    }
    Ok(rest)
}

/// `user.foo` → `user.kmsfs.<base64url(AES-SIV(foo))>`: deterministic, so getxattr can
/// look a name up without listing.
pub fn encrypt_xattr_name(key: &NameKey, name: &[u8]) -> Result<String, FormatError> {
    let rest = check_xattr_name(name)?;
    Ok(format!("{XATTR_PREFIX}{}", siv_encrypt(&key.xattr_names, &[], rest)))
}

/// The plaintext name of a backing xattr, or `None` for a name this format did not write
/// (no `user.kmsfs.` prefix), which the filesystem hides.
pub fn decrypt_xattr_name(key: &NameKey, stored: &str) -> Result<Option<Vec<u8>>, FormatError> {
    let Some(encoded) = stored.strip_prefix(XATTR_PREFIX) else {
        return Ok(None);
    };
    let rest = siv_decrypt(&key.xattr_names, &[], encoded, "xattr name")?;
    let mut name = USER_XATTR_NAMESPACE.as_bytes().to_vec();
    name.extend_from_slice(&rest);
    check_xattr_name(&name).map_err(|_| FormatError::Malformed { what: "xattr name" })?;
    Ok(Some(name))
}

fn xattr_aad(owner: &XattrOwner, name: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_XATTR_VALUE.len() + 17 + name.len());
    aad.extend_from_slice(AAD_XATTR_VALUE);
    aad.push(owner.code());
    aad.extend_from_slice(owner.id());
    aad.extend_from_slice(name);
    aad
}

/// Seals the value of xattr `name` (the plaintext name, `user.…`) of `owner`; the result is
/// stored as the backing xattr's value: `nonce(24) ‖ ciphertext ‖ tag(16)`.
pub fn encrypt_xattr_value(
    key: &NameKey,
    owner: &XattrOwner,
    name: &[u8],
    value: &[u8],
) -> Result<Vec<u8>, FormatError> {
    check_xattr_name(name)?;
    if value.len() > MAX_XATTR_VALUE_LEN {
        return Err(FormatError::TooLong { what: "xattr value", len: value.len(), max: MAX_XATTR_VALUE_LEN });
    }
    Ok(xaes_seal(&key.metadata, &xattr_aad(owner, name), value))
}

/// Opens an xattr value; fails if it was tampered with or moved from another owner or name.
pub fn decrypt_xattr_value(
    key: &NameKey,
    owner: &XattrOwner,
    name: &[u8],
    stored: &[u8],
) -> Result<Vec<u8>, FormatError> {
    check_xattr_name(name)?;
    xaes_open(&key.metadata, &xattr_aad(owner, name), stored, "xattr value")
}

fn xaes_seal(key: &XaesKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; XAES_NONCE_LEN];
    crate::aead::random_bytes(&mut nonce);
    let mut out = Vec::with_capacity(XAES_NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key.seal_in_place(&nonce, aad, &mut out[XAES_NONCE_LEN..]);
    out.extend_from_slice(&tag);
    out
}

fn xaes_open(key: &XaesKey, aad: &[u8], sealed: &[u8], what: &'static str) -> Result<Vec<u8>, FormatError> {
    if sealed.len() < XAES_NONCE_LEN + TAG_LEN {
        return Err(FormatError::Truncated { what });
    }
    let (nonce, rest) = sealed.split_at(XAES_NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let nonce: &[u8; XAES_NONCE_LEN] = nonce.try_into().map_err(|_| FormatError::Truncated { what })?;
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| FormatError::Truncated { what })?;
    let mut plaintext = ciphertext.to_vec();
    key.open_in_place(nonce, aad, &mut plaintext, tag).map_err(|_| FormatError::Authentication { what })?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn setup() -> (NameKey, DirId) {
        (NameKey::random(), DirId::random())
    }

    fn round_trip(key: &NameKey, dir: &DirId, name: &[u8]) -> EncryptedName {
        let enc = encrypt_name(key, dir, name).unwrap();
        let back = match &enc {
            EncryptedName::Short(s) => {
                assert!(s.len() <= MAX_SHORT_NAME_LEN);
                assert_eq!(entry_kind(s), EntryKind::Short);
                decrypt_name(key, dir, s).unwrap()
            }
            EncryptedName::Long { file_name, full } => {
                assert_eq!(entry_kind(file_name), EntryKind::Long);
                let (side, contents) = enc.side_file().unwrap();
                assert!(is_reserved_name(&side));
                assert_eq!(contents, full.as_bytes());
                decrypt_long_name(key, dir, file_name, contents).unwrap()
            }
        };
        assert_eq!(back, name);
        let entry = enc.entry_name();
        assert!(entry.len() <= 255 && !entry.contains('/') && !entry.contains('\0'));
        assert!(entry != "." && entry != "..");
        enc
    }

    #[test]
    fn names_round_trip_at_every_length() {
        let (key, dir) = setup();
        for len in 1..=NAME_MAX {
            let name: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let enc = round_trip(&key, &dir, &name);
            // 159 bytes pad to 160, + 16 tag = 176 bytes = 235 base64 characters; 160 bytes
            // pad to 176 → 256 characters, too long for an entry.
            assert_eq!(matches!(enc, EncryptedName::Short(_)), len <= 159, "length {len}");
        }
        for name in [&b"\xff\xfe not utf-8"[..], "日本語のファイル名".as_bytes(), b"...", b".hidden", b" ", b"a\nb"]
        {
            round_trip(&key, &dir, name);
        }
    }

    #[test]
    fn names_are_deterministic_and_differ_per_directory() {
        let (key, dir) = setup();
        let a = encrypt_name(&key, &dir, b"report.pdf").unwrap();
        assert_eq!(a, encrypt_name(&key, &dir, b"report.pdf").unwrap());
        assert_ne!(a, encrypt_name(&key, &DirId::random(), b"report.pdf").unwrap());
        assert_ne!(a, encrypt_name(&key, &dir, b"report.pdf2").unwrap());
        assert_ne!(a, encrypt_name(&NameKey::random(), &dir, b"report.pdf").unwrap());
        // Length classes of 16 bytes: 1 and 15 bytes encode to the same length.
        let short = encrypt_name(&key, &dir, b"a").unwrap();
        let fifteen = encrypt_name(&key, &dir, &[b'b'; 15]).unwrap();
        let sixteen = encrypt_name(&key, &dir, &[b'c'; 16]).unwrap();
        assert_eq!(short.entry_name().len(), fifteen.entry_name().len());
        assert!(sixteen.entry_name().len() > fifteen.entry_name().len());
        let long = encrypt_name(&key, &dir, &[b'x'; 255]).unwrap();
        assert_eq!(long, encrypt_name(&key, &dir, &[b'x'; 255]).unwrap());
    }

    #[test]
    fn tampered_or_moved_names_fail() {
        let (key, dir) = setup();
        let EncryptedName::Short(stored) = encrypt_name(&key, &dir, b"secret plans").unwrap() else { panic!() };
        assert_eq!(decrypt_name(&key, &DirId::random(), &stored), Err(FormatError::Authentication { what: "name" }));
        assert_eq!(decrypt_name(&NameKey::random(), &dir, &stored), Err(FormatError::Authentication { what: "name" }));
        let bytes = stored.as_bytes();
        for at in 0..bytes.len() {
            let mut t = bytes.to_vec();
            t[at] = if t[at] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(t).unwrap();
            assert!(decrypt_name(&key, &dir, &t).is_err(), "change at {at}");
        }
        for bad in ["", "a", "abc$", &stored[..stored.len() - 1], &format!("{stored}AAAA"), "kmsfs.volume", "."] {
            assert!(decrypt_name(&key, &dir, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_names_detect_swapped_or_tampered_side_files() {
        let (key, dir) = setup();
        let a = encrypt_name(&key, &dir, &[b'a'; 200]).unwrap();
        let b = encrypt_name(&key, &dir, &[b'b'; 200]).unwrap();
        let (EncryptedName::Long { file_name: fa, full: ua }, EncryptedName::Long { full: ub, .. }) = (&a, &b) else {
            panic!("200-byte names are long")
        };
        assert!(fa.starts_with(LONG_NAME_PREFIX) && fa.len() == LONG_NAME_PREFIX.len() + 43);
        assert_eq!(
            decrypt_long_name(&key, &dir, fa, ub.as_bytes()),
            Err(FormatError::Authentication { what: "long name side file" })
        );
        let mut t = ua.clone().into_bytes();
        t[10] ^= 1;
        assert!(decrypt_long_name(&key, &dir, fa, &t).is_err());
        assert!(decrypt_long_name(&key, &DirId::random(), fa, ua.as_bytes()).is_err());
        assert!(decrypt_long_name(&key, &dir, "kmsfs.long.x", ua.as_bytes()).is_err());
        assert!(decrypt_name(&key, &dir, fa).is_err(), "long entries need their side file");
        // A short name smuggled through a side file is refused: one spelling per name.
        let EncryptedName::Short(s) = encrypt_name(&key, &dir, b"short").unwrap() else { panic!() };
        assert!(decrypt_long_name(&key, &dir, &long_file_name(&s), s.as_bytes()).is_err());
    }

    #[test]
    fn invalid_names_are_rejected() {
        let (key, dir) = setup();
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b", &[b'x'; 256]] {
            assert!(encrypt_name(&key, &dir, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            encrypt_name(&key, &dir, &[b'x'; 256]),
            Err(FormatError::TooLong { what: "name", len: 256, max: 255 })
        );
    }

    #[test]
    fn reserved_names_are_recognized() {
        for reserved in ["kmsfs.volume", "kmsfs.dirid", "kmsfs.tmp.123", "kmsfs.long.x", "kmsfs."] {
            assert!(is_reserved_name(reserved), "{reserved}");
        }
        let long = format!("kmsfs.long.{}", "A".repeat(43));
        assert!(!is_reserved_name(&long));
        assert_eq!(entry_kind(&long), EntryKind::Long);
        assert!(is_reserved_name(&format!("{long}.name")));
        for visible in ["abc", "kmsfs", "Kmsfs.volume", "x.kmsfs.volume"] {
            assert!(!is_reserved_name(visible), "{visible}");
        }
        assert_eq!(DIR_ID_FILE, "kmsfs.dirid");
        assert!(is_reserved_name(DIR_ID_FILE) && is_reserved_name(crate::format::VOLUME_FILE));
    }

    #[test]
    fn dir_ids_round_trip() {
        let id = DirId::random();
        assert_eq!(DirId::parse(&id.encode()), Ok(id));
        assert_eq!(DirId::parse_hex(&id.to_hex()), Some(id));
        assert!(DirId::parse(&[0; 15]).is_err());
        assert!(DirId::parse(&[0; 17]).is_err());
        assert!(DirId::parse(b"").is_err());
    }

    #[test]
    fn symlinks_round_trip_and_detect_tampering() {
        let key = NameKey::random();
        for target in [&b"../etc/passwd"[..], b"/", b"\xff", &[b'p'; MAX_SYMLINK_TARGET_LEN]] {
            let stored = encrypt_symlink(&key, target).unwrap();
            assert!(stored.len() <= 4095 && !stored.contains('\0'));
            assert_eq!(decrypt_symlink(&key, stored.as_bytes()).unwrap(), target);
            assert_ne!(stored, encrypt_symlink(&key, target).unwrap(), "random nonce");
        }
        let stored = encrypt_symlink(&key, b"target").unwrap();
        let mut t = stored.clone().into_bytes();
        t[40] = if t[40] == b'A' { b'B' } else { b'A' };
        assert!(decrypt_symlink(&key, &t).is_err());
        assert!(decrypt_symlink(&NameKey::random(), stored.as_bytes()).is_err());
        assert!(decrypt_symlink(&key, b"plain/target").is_err());
        assert!(decrypt_symlink(&key, b"").is_err());
        for bad in [&b""[..], b"a\0b", &[b'p'; MAX_SYMLINK_TARGET_LEN + 1]] {
            assert!(encrypt_symlink(&key, bad).is_err());
        }
        // An xattr value is not a symlink target, even under the same key.
        let value = encrypt_xattr_value(&key, &XattrOwner::Dir(DirId::random()), b"user.a", b"target").unwrap();
        assert!(decrypt_symlink(&key, URL_SAFE_NO_PAD.encode(value).as_bytes()).is_err());
    }

    #[test]
    fn xattrs_round_trip_and_are_bound_to_owner_and_name() {
        let key = NameKey::random();
        let file = XattrOwner::File(FileId::random());
        let dir = XattrOwner::Dir(DirId::from_bytes(
            *match file {
                XattrOwner::File(id) => id,
                XattrOwner::Dir(_) => unreachable!(),
            }
            .as_bytes(),
        ));
        let stored_name = encrypt_xattr_name(&key, b"user.mime_type").unwrap();
        assert!(stored_name.starts_with(XATTR_PREFIX) && stored_name.len() <= 255);
        assert_eq!(stored_name, encrypt_xattr_name(&key, b"user.mime_type").unwrap());
        assert_eq!(decrypt_xattr_name(&key, &stored_name).unwrap().unwrap(), b"user.mime_type");
        assert_eq!(decrypt_xattr_name(&key, "security.selinux").unwrap(), None);
        assert!(decrypt_xattr_name(&key, "user.kmsfs.AAAA").is_err());
        let longest = [b"user.".as_slice(), &[b'n'; 159]].concat();
        let enc = encrypt_xattr_name(&key, &longest).unwrap();
        assert!(enc.len() <= 255, "{}", enc.len());
        assert_eq!(decrypt_xattr_name(&key, &enc).unwrap().unwrap(), longest);
        for bad in [&b"trusted.x"[..], b"user.", b"user.a\0", &[b"user.".as_slice(), &[b'n'; 160]].concat()] {
            assert!(encrypt_xattr_name(&key, bad).is_err(), "{bad:?}");
        }

        let value = encrypt_xattr_value(&key, &file, b"user.mime_type", b"text/plain").unwrap();
        assert_eq!(value.len(), 24 + 10 + 16);
        assert_eq!(decrypt_xattr_value(&key, &file, b"user.mime_type", &value).unwrap(), b"text/plain");
        let auth = Err(FormatError::Authentication { what: "xattr value" });
        assert_eq!(decrypt_xattr_value(&key, &file, b"user.other", &value), auth);
        assert_eq!(decrypt_xattr_value(&key, &dir, b"user.mime_type", &value), auth, "same ID, other kind");
        assert_eq!(decrypt_xattr_value(&key, &XattrOwner::File(FileId::random()), b"user.mime_type", &value), auth);
        for at in [0, 23, 24, 33, 34, 49] {
            let mut t = value.clone();
            t[at] ^= 0x10;
            assert_eq!(decrypt_xattr_value(&key, &file, b"user.mime_type", &t), auth, "byte {at}");
        }
        assert!(decrypt_xattr_value(&key, &file, b"user.mime_type", &value[..39]).is_err());
        let empty = encrypt_xattr_value(&key, &file, b"user.e", b"").unwrap();
        assert_eq!(decrypt_xattr_value(&key, &file, b"user.e", &empty).unwrap(), b"");
        let big = vec![7u8; MAX_XATTR_VALUE_LEN];
        let sealed = encrypt_xattr_value(&key, &file, b"user.big", &big).unwrap();
        assert_eq!(sealed.len(), 65536);
        assert!(encrypt_xattr_value(&key, &file, b"user.big", &[0; MAX_XATTR_VALUE_LEN + 1]).is_err());
    }

    #[test]
    fn name_key_lengths_and_redaction() {
        assert_eq!(NameKey::generate_len(), 32);
        assert!(NameKey::from_bytes(&[0; 31]).is_err());
        assert!(NameKey::from_bytes(&[0; 64]).is_err());
        let a = NameKey::from_bytes(&[5; 32]).unwrap();
        let b = NameKey::from_data_key(&DataKey::from_bytes(&[5; 32]).unwrap());
        let dir = DirId::from_bytes([1; 16]);
        assert_eq!(encrypt_name(&a, &dir, b"x").unwrap(), encrypt_name(&b, &dir, b"x").unwrap());
        assert_eq!(format!("{a:?}"), "NameKey(<redacted>)");
    }

    #[test]
    fn random_input_never_panics_name_parsers() {
        let mut rng = Rng(4);
        let (key, dir) = setup();
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=/";
        for _ in 0..2000 {
            let len = rng.index(400);
            let s: String = (0..len).map(|_| ALPHABET[rng.index(ALPHABET.len())] as char).collect();
            assert!(decrypt_name(&key, &dir, &s).is_err());
            let _ = entry_kind(&s);
            assert!(decrypt_long_name(&key, &dir, &s, s.as_bytes()).is_err());
            assert!(decrypt_symlink(&key, s.as_bytes()).is_err());
            let _ = decrypt_xattr_name(&key, &format!("{XATTR_PREFIX}{s}"));
            let raw = rng.bytes(len);
            assert!(decrypt_symlink(&key, &raw).is_err());
            assert!(decrypt_xattr_value(&key, &XattrOwner::Dir(dir), b"user.x", &raw).is_err());
            let _ = DirId::parse(&raw);
            let _ = encrypt_name(&key, &dir, &raw);
        }
    }
}
