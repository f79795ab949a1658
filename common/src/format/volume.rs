//! `kmsfs.volume`: the JSON file at the root of a backing directory that says how the volume
//! is encrypted — format version, volume ID, the KMS key that wraps file keys, cipher suite,
//! block size, name mode, the wrapped name key and the root directory's ID — and the
//! encryption contexts under which the agent wraps the volume's keys.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::block::{FileId, Layout};
use super::error::FormatError;
use super::names::DirId;
use super::{hex, parse_hex};
use crate::context::EncryptionContext;

/// The on-disk format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Name of the volume file at the backing directory's root.
pub const VOLUME_FILE: &str = "kmsfs.volume";
/// Largest volume file `VolumeConfig::parse` accepts; a real one is well under 1 KiB.
pub const MAX_VOLUME_FILE_LEN: usize = 64 * 1024;
/// Largest wrapped key a volume file may carry (AWS's CiphertextBlob limit).
pub const MAX_WRAPPED_NAME_KEY_LEN: usize = 6144;
/// Longest `key_id` (AWS's KeyId limit).
pub const MAX_KEY_ID_LEN: usize = 2048;

/// Encryption-context keys of wrapped keys; `FORMAT.md` documents them.
pub const CONTEXT_VOLUME: &str = "kmsfs:volume";
pub const CONTEXT_FILE: &str = "kmsfs:file";
pub const CONTEXT_KEY: &str = "kmsfs:key";

/// The AEAD that seals content blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherSuite {
    /// AES-256-GCM, 12-byte random nonce, 16-byte tag. The default: hardware-accelerated.
    Aes256Gcm,
    /// XChaCha20-Poly1305, 24-byte random nonce, 16-byte tag. For CPUs without AES-NI.
    XChaCha20Poly1305,
}

impl CipherSuite {
    /// The code stored in header slots.
    pub fn code(self) -> u8 {
        match self {
            CipherSuite::Aes256Gcm => 1,
            CipherSuite::XChaCha20Poly1305 => 2,
        }
    }

    pub fn from_code(code: u8) -> Result<CipherSuite, FormatError> {
        match code {
            1 => Ok(CipherSuite::Aes256Gcm),
            2 => Ok(CipherSuite::XChaCha20Poly1305),
            other => Err(FormatError::UnknownCipher(other)),
        }
    }

    /// The name stored in `kmsfs.volume`.
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes256Gcm => "aes-256-gcm",
            CipherSuite::XChaCha20Poly1305 => "xchacha20-poly1305",
        }
    }

    pub fn from_name(name: &str) -> Option<CipherSuite> {
        [CipherSuite::Aes256Gcm, CipherSuite::XChaCha20Poly1305].into_iter().find(|c| c.name() == name)
    }

    /// Bytes of nonce before each stored block.
    pub fn nonce_len(self) -> usize {
        match self {
            CipherSuite::Aes256Gcm => 12,
            CipherSuite::XChaCha20Poly1305 => 24,
        }
    }

    /// Bytes of tag after each stored block.
    pub fn tag_len(self) -> usize {
        16
    }

    /// Bytes a stored block adds to its plaintext.
    pub fn overhead(self) -> usize {
        self.nonce_len() + self.tag_len()
    }
}

/// A plaintext block size: a power of two from 4 KiB to 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    pub const MIN: u32 = 4096;
    pub const MAX: u32 = 1 << 20;
    pub const DEFAULT: BlockSize = BlockSize(4096);

    pub fn new(size: u64) -> Result<BlockSize, FormatError> {
        if size.is_power_of_two() && (u64::from(Self::MIN)..=u64::from(Self::MAX)).contains(&size) {
            Ok(BlockSize(size as u32))
        } else {
            Err(FormatError::InvalidBlockSize(size))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }

    pub fn as_u64(self) -> u64 {
        u64::from(self.0)
    }

    pub fn as_usize(self) -> usize {
        self.0 as usize
    }
}

impl Default for BlockSize {
    fn default() -> BlockSize {
        BlockSize::DEFAULT
    }
}

/// Whether names are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameMode {
    /// Names, symlink targets and `user.*` xattrs encrypted (the default).
    Encrypted,
    /// Names stored as they are; symlink targets and `user.*` xattrs still encrypted.
    Plaintext,
}

impl NameMode {
    pub fn name(self) -> &'static str {
        match self {
            NameMode::Encrypted => "encrypted",
            NameMode::Plaintext => "plaintext",
        }
    }
}

/// A volume's random 128-bit ID. It names the volume in every wrapped key's encryption
/// context, so a key wrapped for one volume cannot be used in another.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeId([u8; 16]);

impl VolumeId {
    pub fn random() -> VolumeId {
        let mut bytes = [0u8; 16];
        crate::aead::random_bytes(&mut bytes);
        VolumeId(bytes)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> VolumeId {
        VolumeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn parse_hex(s: &str) -> Option<VolumeId> {
        parse_hex(s).map(VolumeId)
    }
}

impl std::fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeId({})", self.to_hex())
    }
}

/// The contents of `kmsfs.volume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    pub volume_id: VolumeId,
    /// The KMS key (ID, ARN or alias) under which new file keys are generated.
    pub key_id: String,
    pub cipher: CipherSuite,
    pub block_size: BlockSize,
    pub names: NameMode,
    /// The 32-byte name key as the agent wrapped it (a ciphertext blob), under
    /// [`name_key_context`]. Present in both name modes: it also encrypts symlink targets and
    /// `user.*` xattrs.
    pub wrapped_name_key: Vec<u8>,
    /// The root directory's ID (other directories keep theirs in `kmsfs.dirid`).
    pub root_dir_id: DirId,
}

/// The JSON shape, field for field; validated into `VolumeConfig`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    format_version: u16,
    volume_id: String,
    key_id: String,
    cipher: String,
    block_size: u64,
    names: String,
    wrapped_name_key: String,
    root_dir_id: String,
}

fn invalid(message: impl Into<String>) -> FormatError {
    FormatError::InvalidConfig(message.into())
}

impl VolumeConfig {
    /// Parses and validates `kmsfs.volume`. Unknown fields are refused: a volume written by a
    /// newer version carries a newer `format_version`, and a typo must not be silently ignored.
    pub fn parse(bytes: &[u8]) -> Result<VolumeConfig, FormatError> {
        let value = super::versioned_json(bytes, MAX_VOLUME_FILE_LEN, "format_version", FORMAT_VERSION, |m| {
            FormatError::InvalidConfig(m)
        })?;
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;

        let volume_id =
            VolumeId::parse_hex(&raw.volume_id).ok_or_else(|| invalid("volume_id must be 32 lowercase hex digits"))?;
        let root_dir_id =
            DirId::parse_hex(&raw.root_dir_id).ok_or_else(|| invalid("root_dir_id must be 32 lowercase hex digits"))?;
        validate_key_id(&raw.key_id)?;
        let cipher = CipherSuite::from_name(&raw.cipher)
            .ok_or_else(|| invalid("cipher must be \"aes-256-gcm\" or \"xchacha20-poly1305\""))?;
        let block_size = BlockSize::new(raw.block_size)
            .map_err(|_| invalid("block_size must be a power of two from 4096 to 1048576"))?;
        let names = match raw.names.as_str() {
            "encrypted" => NameMode::Encrypted,
            "plaintext" => NameMode::Plaintext,
            _ => return Err(invalid("names must be \"encrypted\" or \"plaintext\"")),
        };
        let wrapped_name_key =
            STANDARD.decode(&raw.wrapped_name_key).map_err(|_| invalid("wrapped_name_key is not base64"))?;
        if wrapped_name_key.is_empty() || wrapped_name_key.len() > MAX_WRAPPED_NAME_KEY_LEN {
            return Err(invalid(format!("wrapped_name_key must be 1 to {MAX_WRAPPED_NAME_KEY_LEN} bytes")));
        }
        Ok(VolumeConfig { volume_id, key_id: raw.key_id, cipher, block_size, names, wrapped_name_key, root_dir_id })
    }

    /// The volume file's contents: pretty-printed JSON ending in a newline.
    pub fn to_json(&self) -> String {
        let raw = RawConfig {
            format_version: FORMAT_VERSION,
            volume_id: self.volume_id.to_hex(),
            key_id: self.key_id.clone(),
            cipher: self.cipher.name().to_string(),
            block_size: self.block_size.as_u64(),
            names: self.names.name().to_string(),
            wrapped_name_key: STANDARD.encode(&self.wrapped_name_key),
            root_dir_id: self.root_dir_id.to_hex(),
        };
        // Serializing a struct of strings and integers cannot fail.
        let mut json = serde_json::to_string_pretty(&raw).unwrap_or_default();
        json.push('\n');
        json
    }

    /// The layout new files of this volume get (each file's header carries its own).
    pub fn layout(&self) -> Layout {
        Layout::new(self.cipher, self.block_size)
    }
}

pub(super) fn validate_key_id(key_id: &str) -> Result<(), FormatError> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
        return Err(invalid(format!("key_id must be 1 to {MAX_KEY_ID_LEN} characters")));
    }
    if key_id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid("key_id must not contain whitespace or control characters"));
    }
    Ok(())
}

/// The encryption context a file's data key is generated and unwrapped under:
/// `{"kmsfs:volume": <volume hex>, "kmsfs:file": <file hex>}`. A wrapped key copied into
/// another file's header, or another volume, does not unwrap.
pub fn file_key_context(volume_id: &VolumeId, file_id: &FileId) -> EncryptionContext {
    EncryptionContext::from([(CONTEXT_VOLUME, volume_id.to_hex().as_str()), (CONTEXT_FILE, file_id.to_hex().as_str())])
}

/// The encryption context of the volume's name key:
/// `{"kmsfs:volume": <volume hex>, "kmsfs:key": "names"}`.
pub fn name_key_context(volume_id: &VolumeId) -> EncryptionContext {
    EncryptionContext::from([(CONTEXT_VOLUME, volume_id.to_hex().as_str()), (CONTEXT_KEY, "names")])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    fn sample() -> VolumeConfig {
        VolumeConfig {
            volume_id: VolumeId::from_bytes([0xab; 16]),
            key_id: "arn:aws:kms:local:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
            cipher: CipherSuite::Aes256Gcm,
            block_size: BlockSize::DEFAULT,
            names: NameMode::Encrypted,
            wrapped_name_key: vec![1, 2, 3, 4, 5],
            root_dir_id: DirId::from_bytes([0xcd; 16]),
        }
    }

    fn json_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let mut value: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        edit(value.as_object_mut().unwrap());
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn round_trip_every_variant() {
        for cipher in [CipherSuite::Aes256Gcm, CipherSuite::XChaCha20Poly1305] {
            for names in [NameMode::Encrypted, NameMode::Plaintext] {
                for block_size in [4096u64, 65536, 1 << 20] {
                    let config = VolumeConfig {
                        cipher,
                        names,
                        block_size: BlockSize::new(block_size).unwrap(),
                        volume_id: VolumeId::random(),
                        root_dir_id: DirId::random(),
                        ..sample()
                    };
                    assert_eq!(VolumeConfig::parse(config.to_json().as_bytes()).unwrap(), config);
                }
            }
        }
    }

    #[test]
    fn json_spells_fields_as_documented() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["format_version"], 1);
        assert_eq!(v["volume_id"], "abababababababababababababababab");
        assert_eq!(v["cipher"], "aes-256-gcm");
        assert_eq!(v["block_size"], 4096);
        assert_eq!(v["names"], "encrypted");
        assert_eq!(v["wrapped_name_key"], "AQIDBAU=");
        assert_eq!(v["root_dir_id"], "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd");
        let v: serde_json::Value = serde_json::from_str(
            &VolumeConfig { cipher: CipherSuite::XChaCha20Poly1305, names: NameMode::Plaintext, ..sample() }.to_json(),
        )
        .unwrap();
        assert_eq!(v["cipher"], "xchacha20-poly1305");
        assert_eq!(v["names"], "plaintext");
    }

    #[test]
    fn rejects_versions_other_than_1() {
        for (version, expected) in [(0u64, 0u16), (2, 2), (70000, u16::MAX)] {
            let bytes = json_with(|o| {
                o.insert("format_version".into(), version.into());
                o.insert("new_field".into(), "x".into());
            });
            assert_eq!(VolumeConfig::parse(&bytes), Err(FormatError::UnsupportedVersion(expected)));
        }
        for bad in [serde_json::json!("1"), serde_json::json!(-1), serde_json::json!(1.5)] {
            let bytes = json_with(|o| {
                o.insert("format_version".into(), bad.clone());
            });
            assert!(matches!(VolumeConfig::parse(&bytes), Err(FormatError::InvalidConfig(_))), "{bad}");
        }
        let bytes = json_with(|o| {
            o.remove("format_version");
        });
        assert!(matches!(VolumeConfig::parse(&bytes), Err(FormatError::InvalidConfig(_))));
    }

    #[test]
    fn rejects_bad_fields() {
        use serde_json::json;
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("block_size", json!(4095)),
            ("block_size", json!(2048)),
            ("block_size", json!(3 * 4096)),
            ("block_size", json!(2 << 20)),
            ("block_size", json!(0)),
            ("block_size", json!("4096")),
            ("cipher", json!("AES-256-GCM")),
            ("cipher", json!("aes-128-gcm")),
            ("names", json!("hidden")),
            ("volume_id", json!("ABABABABABABABABABABABABABABABAB")),
            ("volume_id", json!("abab")),
            ("root_dir_id", json!("")),
            ("key_id", json!("")),
            ("key_id", json!("alias/with space")),
            ("key_id", json!("a".repeat(MAX_KEY_ID_LEN + 1))),
            ("wrapped_name_key", json!("")),
            ("wrapped_name_key", json!("not base64!")),
            ("wrapped_name_key", json!(STANDARD.encode(vec![0u8; MAX_WRAPPED_NAME_KEY_LEN + 1]))),
            ("unexpected", json!(true)),
        ];
        for (field, value) in cases {
            let bytes = json_with(|o| {
                o.insert(field.into(), value.clone());
            });
            assert!(matches!(VolumeConfig::parse(&bytes), Err(FormatError::InvalidConfig(_))), "{field} = {value}");
        }
        for field in ["volume_id", "key_id", "cipher", "block_size", "names", "wrapped_name_key", "root_dir_id"] {
            let bytes = json_with(|o| {
                o.remove(field);
            });
            assert!(matches!(VolumeConfig::parse(&bytes), Err(FormatError::InvalidConfig(_))), "missing {field}");
        }
        for bad in [&b""[..], b"null", b"[]", b"{", b"\"x\"", &[0xff, 0xfe]] {
            assert!(matches!(VolumeConfig::parse(bad), Err(FormatError::InvalidConfig(_))));
        }
        let huge = vec![b' '; MAX_VOLUME_FILE_LEN + 1];
        assert!(matches!(VolumeConfig::parse(&huge), Err(FormatError::InvalidConfig(_))));
    }

    #[test]
    fn contexts_name_volume_and_file() {
        let volume = VolumeId::from_bytes([1; 16]);
        let file = FileId::from_bytes([2; 16]);
        let ctx = file_key_context(&volume, &file);
        assert_eq!(ctx.0.get("kmsfs:volume").unwrap(), &"01".repeat(16));
        assert_eq!(ctx.0.get("kmsfs:file").unwrap(), &"02".repeat(16));
        assert_eq!(ctx.0.len(), 2);
        assert_ne!(ctx, file_key_context(&volume, &FileId::from_bytes([3; 16])));
        assert_ne!(ctx, file_key_context(&VolumeId::from_bytes([4; 16]), &file));
        let names = name_key_context(&volume);
        assert_eq!(names.0.get("kmsfs:key").unwrap(), "names");
        assert_ne!(names, name_key_context(&VolumeId::from_bytes([4; 16])));
        assert_ne!(names.canonical_bytes(), ctx.canonical_bytes());
    }

    #[test]
    fn block_size_and_cipher_codes() {
        assert_eq!(BlockSize::default().get(), 4096);
        for ok in [4096u64, 8192, 1 << 16, 1 << 20] {
            assert_eq!(BlockSize::new(ok).unwrap().as_u64(), ok);
        }
        for bad in [0u64, 1, 2048, 4097, 6144, 1 << 21, u64::MAX, 1 << 40] {
            assert_eq!(BlockSize::new(bad), Err(FormatError::InvalidBlockSize(bad)));
        }
        for c in [CipherSuite::Aes256Gcm, CipherSuite::XChaCha20Poly1305] {
            assert_eq!(CipherSuite::from_code(c.code()), Ok(c));
            assert_eq!(CipherSuite::from_name(c.name()), Some(c));
        }
        assert_eq!(CipherSuite::from_code(0), Err(FormatError::UnknownCipher(0)));
        assert_eq!(CipherSuite::from_code(3), Err(FormatError::UnknownCipher(3)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(1);
        let valid = sample().to_json().into_bytes();
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + rng.index(4) {
                let at = rng.index(bytes.len());
                bytes[at] = rng.next_u64() as u8;
            }
            let _ = VolumeConfig::parse(&bytes);
            let len = rng.index(200);
            let _ = VolumeConfig::parse(&rng.bytes(len));
        }
    }
}
