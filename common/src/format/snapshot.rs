//! `kmsfs.snapshot`: the manifest at the root of a snapshot that `kmsfs snapshot export`
//! made for another host, until `kmsfs snapshot import` re-wraps it there and removes it.
//! It says how the snapshot's keys are wrapped (for a KMS key both hosts hold, or with
//! RSAES_OAEP_SHA_256 to the receiver's RSA public key), which volume it is, and whether the
//! export finished. `FORMAT.md` §13 is the reference.

use serde::{Deserialize, Serialize};

use super::error::FormatError;
use super::hex;
use super::volume::{validate_key_id, VolumeId};

/// Name of the manifest at a snapshot's root (a reserved name: a mount never shows it).
pub const MANIFEST_FILE: &str = "kmsfs.snapshot";
/// Name of the export's journal at a snapshot's root: one line per file copied, so that a
/// rerun knows what it need not copy again.
pub const JOURNAL_FILE: &str = "kmsfs.snapshot.journal";
/// Name of the import's record, at a snapshot's root, of every file's access and
/// modification times as exported, written before the first header is re-wrapped: the times
/// a resumed import puts back.
pub const TIMES_FILE: &str = "kmsfs.snapshot.times";
/// Prefix of the names under which an export writes a file before renaming it into place.
pub const TEMPORARY_PREFIX: &str = "kmsfs.snapshot.tmp.";
/// The manifest format this code writes and reads.
pub const SNAPSHOT_VERSION: u16 = 1;
/// Largest manifest [`SnapshotManifest::parse`] accepts; a real one is under 1 KiB.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;

/// AWS's name of symmetric encryption under a KMS key.
pub const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";
/// AWS's name of RSA-OAEP with SHA-256 (and MGF1 with SHA-256).
pub const RSAES_OAEP_SHA_256: &str = "RSAES_OAEP_SHA_256";

/// Whether the export that wrote the manifest finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Being written, or interrupted: not importable; a rerun of the same export finishes it.
    Exporting,
    /// Every file is in place and `kmsfs.volume` was written last before this manifest.
    Complete,
}

impl SnapshotState {
    pub fn name(self) -> &'static str {
        match self {
            SnapshotState::Exporting => "exporting",
            SnapshotState::Complete => "complete",
        }
    }
}

/// How every wrapped key of the snapshot (each header's, both slots, and the name key) is
/// wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotWrapping {
    /// Ciphertext blobs of the KMS key `key_id` under the volume's usual encryption
    /// contexts, made by the sender's agent (ReEncrypt): a key both hosts hold, such as a
    /// multi-Region key and its replica.
    Kms,
    /// The plaintext key encrypted by kmsfs with RSAES_OAEP_SHA_256 to the RSA public key
    /// whose DER SubjectPublicKeyInfo has this SHA-256; its private half is the receiver's
    /// KMS key `key_id`. RSA ciphertexts carry no encryption context.
    RsaesOaepSha256 { public_key_sha256: [u8; 32] },
}

impl SnapshotWrapping {
    /// The AWS encryption algorithm of the wrapped keys.
    pub fn algorithm(&self) -> &'static str {
        match self {
            SnapshotWrapping::Kms => SYMMETRIC_DEFAULT,
            SnapshotWrapping::RsaesOaepSha256 { .. } => RSAES_OAEP_SHA_256,
        }
    }
}

/// What a snapshot holds, as counted by the export (all zero while it runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotCounts {
    /// Regular files with a header (each hard-linked file once).
    pub files: u64,
    /// Their stored size: headers and blocks (holes counted at their length).
    pub bytes: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Directory entries that are further links to a file already counted.
    pub hard_links: u64,
    /// FIFOs, sockets and device nodes.
    pub special_files: u64,
}

/// The contents of `kmsfs.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotManifest {
    pub state: SnapshotState,
    /// The source volume's ID, kept by the snapshot (so its encryption contexts stay valid).
    pub volume_id: VolumeId,
    /// The key the snapshot is wrapped for, as the export was given it (an ARN or key ID).
    pub key_id: String,
    pub wrapping: SnapshotWrapping,
    /// When the export began, ISO 8601 UTC.
    pub started: String,
    /// When it finished; `None` while [`SnapshotState::Exporting`].
    pub finished: Option<String>,
    pub counts: SnapshotCounts,
}

/// The JSON shape, field for field; validated into `SnapshotManifest`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    snapshot_version: u16,
    state: String,
    volume_id: String,
    key_id: String,
    encryption_algorithm: String,
    public_key_sha256: Option<String>,
    started: String,
    finished: Option<String>,
    files: u64,
    bytes: u64,
    directories: u64,
    symlinks: u64,
    hard_links: u64,
    special_files: u64,
}

fn invalid(message: impl Into<String>) -> FormatError {
    FormatError::InvalidManifest(message.into())
}

/// Longest timestamp accepted (`2024-05-01T12:00:00.123000+00:00` is 32 characters).
const MAX_TIME_LEN: usize = 64;

fn validate_time(field: &str, value: &str) -> Result<(), FormatError> {
    let plain = value.bytes().all(|b| b.is_ascii_digit() || b"-:.+TZ".contains(&b));
    if value.is_empty() || value.len() > MAX_TIME_LEN || !plain {
        return Err(invalid(format!("{field} must be an ISO 8601 time")));
    }
    Ok(())
}

impl SnapshotManifest {
    /// Parses and validates `kmsfs.snapshot`. As with `kmsfs.volume`, the version is read
    /// first and unknown fields are refused.
    pub fn parse(bytes: &[u8]) -> Result<SnapshotManifest, FormatError> {
        let value = super::versioned_json(bytes, MAX_MANIFEST_LEN, "snapshot_version", SNAPSHOT_VERSION, |m| {
            FormatError::InvalidManifest(m)
        })?;
        let raw: RawManifest = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        let state = match raw.state.as_str() {
            "exporting" => SnapshotState::Exporting,
            "complete" => SnapshotState::Complete,
            _ => return Err(invalid("state must be \"exporting\" or \"complete\"")),
        };
        let volume_id =
            VolumeId::parse_hex(&raw.volume_id).ok_or_else(|| invalid("volume_id must be 32 lowercase hex digits"))?;
        validate_key_id(&raw.key_id).map_err(|_| invalid("key_id must be 1 to 2048 characters, no whitespace"))?;
        let wrapping = match (raw.encryption_algorithm.as_str(), raw.public_key_sha256.as_deref()) {
            (SYMMETRIC_DEFAULT, None) => SnapshotWrapping::Kms,
            (RSAES_OAEP_SHA_256, Some(digest)) => SnapshotWrapping::RsaesOaepSha256 {
                public_key_sha256: super::parse_hex::<32>(digest)
                    .ok_or_else(|| invalid("public_key_sha256 must be 64 lowercase hex digits"))?,
            },
            (SYMMETRIC_DEFAULT, Some(_)) => return Err(invalid("public_key_sha256 is only for RSAES_OAEP_SHA_256")),
            (RSAES_OAEP_SHA_256, None) => return Err(invalid("RSAES_OAEP_SHA_256 needs public_key_sha256")),
            _ => return Err(invalid("encryption_algorithm must be \"SYMMETRIC_DEFAULT\" or \"RSAES_OAEP_SHA_256\"")),
        };
        validate_time("started", &raw.started)?;
        match (state, &raw.finished) {
            (SnapshotState::Exporting, Some(_)) => return Err(invalid("an export in progress has no finished time")),
            (SnapshotState::Complete, None) => return Err(invalid("a complete snapshot needs its finished time")),
            (_, Some(finished)) => validate_time("finished", finished)?,
            (_, None) => {}
        }
        Ok(SnapshotManifest {
            state,
            volume_id,
            key_id: raw.key_id,
            wrapping,
            started: raw.started,
            finished: raw.finished,
            counts: SnapshotCounts {
                files: raw.files,
                bytes: raw.bytes,
                directories: raw.directories,
                symlinks: raw.symlinks,
                hard_links: raw.hard_links,
                special_files: raw.special_files,
            },
        })
    }

    /// The manifest's contents: pretty-printed JSON ending in a newline.
    pub fn to_json(&self) -> String {
        let public_key_sha256 = match &self.wrapping {
            SnapshotWrapping::Kms => None,
            SnapshotWrapping::RsaesOaepSha256 { public_key_sha256 } => Some(hex(public_key_sha256)),
        };
        let c = self.counts;
        let raw = RawManifest {
            snapshot_version: SNAPSHOT_VERSION,
            state: self.state.name().to_string(),
            volume_id: self.volume_id.to_hex(),
            key_id: self.key_id.clone(),
            encryption_algorithm: self.wrapping.algorithm().to_string(),
            public_key_sha256,
            started: self.started.clone(),
            finished: self.finished.clone(),
            files: c.files,
            bytes: c.bytes,
            directories: c.directories,
            symlinks: c.symlinks,
            hard_links: c.hard_links,
            special_files: c.special_files,
        };
        // Serializing a struct of strings and integers cannot fail.
        let mut json = serde_json::to_string_pretty(&raw).unwrap_or_default();
        json.push('\n');
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;
    use serde_json::json;

    fn sample() -> SnapshotManifest {
        SnapshotManifest {
            state: SnapshotState::Complete,
            volume_id: VolumeId::from_bytes([0xab; 16]),
            key_id: "arn:aws:kms:local:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
            wrapping: SnapshotWrapping::RsaesOaepSha256 { public_key_sha256: [0x5a; 32] },
            started: "2024-05-01T12:00:00.123000+00:00".into(),
            finished: Some("2024-05-01T12:01:00.000000+00:00".into()),
            counts: SnapshotCounts {
                files: 2000,
                bytes: 1 << 30,
                directories: 20,
                symlinks: 3,
                hard_links: 1,
                special_files: 0,
            },
        }
    }

    fn json_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let mut value: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        edit(value.as_object_mut().unwrap());
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn round_trips_both_wrappings_and_states() {
        let exporting = SnapshotManifest {
            state: SnapshotState::Exporting,
            finished: None,
            wrapping: SnapshotWrapping::Kms,
            counts: SnapshotCounts::default(),
            ..sample()
        };
        for manifest in [sample(), exporting] {
            assert_eq!(SnapshotManifest::parse(manifest.to_json().as_bytes()).unwrap(), manifest);
        }
    }

    #[test]
    fn json_spells_fields_as_documented() {
        let v: serde_json::Value = serde_json::from_str(&sample().to_json()).unwrap();
        assert_eq!(v["snapshot_version"], 1);
        assert_eq!(v["state"], "complete");
        assert_eq!(v["volume_id"], "ab".repeat(16));
        assert_eq!(v["encryption_algorithm"], "RSAES_OAEP_SHA_256");
        assert_eq!(v["public_key_sha256"], "5a".repeat(32));
        assert_eq!(v["files"], 2000);
        assert_eq!(v["hard_links"], 1);
        let kms = SnapshotManifest { wrapping: SnapshotWrapping::Kms, ..sample() };
        let v: serde_json::Value = serde_json::from_str(&kms.to_json()).unwrap();
        assert_eq!(v["encryption_algorithm"], "SYMMETRIC_DEFAULT");
        assert_eq!(v["public_key_sha256"], serde_json::Value::Null);
    }

    #[test]
    fn rejects_other_versions_before_other_fields() {
        let bytes = json_with(|o| {
            o.insert("snapshot_version".into(), json!(2));
            o.insert("new_field".into(), json!(true));
        });
        assert_eq!(SnapshotManifest::parse(&bytes), Err(FormatError::UnsupportedVersion(2)));
        let bytes = json_with(|o| {
            o.remove("snapshot_version");
        });
        assert!(matches!(SnapshotManifest::parse(&bytes), Err(FormatError::InvalidManifest(_))));
    }

    #[test]
    fn rejects_bad_fields() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("state", json!("done")),
            ("volume_id", json!("AB".repeat(16))),
            ("key_id", json!("")),
            ("key_id", json!("alias/with space")),
            ("encryption_algorithm", json!("RSAES_OAEP_SHA_1")),
            ("encryption_algorithm", json!("SYMMETRIC_DEFAULT")), // with a public key digest
            ("public_key_sha256", json!(null)),
            ("public_key_sha256", json!("5a".repeat(31))),
            ("public_key_sha256", json!("5A".repeat(32))),
            ("started", json!("")),
            ("started", json!("yesterday")),
            ("finished", json!(null)), // while complete
            ("files", json!(-1)),
            ("bytes", json!("1")),
            ("unexpected", json!(1)),
        ];
        for (field, value) in cases {
            let bytes = json_with(|o| {
                o.insert(field.into(), value.clone());
            });
            assert!(
                matches!(SnapshotManifest::parse(&bytes), Err(FormatError::InvalidManifest(_))),
                "{field} = {value}"
            );
        }
        let exporting_with_end = json_with(|o| {
            o.insert("state".into(), json!("exporting"));
        });
        assert!(matches!(SnapshotManifest::parse(&exporting_with_end), Err(FormatError::InvalidManifest(_))));
        for bad in [&b""[..], b"null", b"[]", b"{", &[0xff, 0xfe]] {
            assert!(matches!(SnapshotManifest::parse(bad), Err(FormatError::InvalidManifest(_))));
        }
        let huge = vec![b' '; MAX_MANIFEST_LEN + 1];
        assert!(matches!(SnapshotManifest::parse(&huge), Err(FormatError::InvalidManifest(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(7);
        let valid = sample().to_json().into_bytes();
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + rng.index(4) {
                let at = rng.index(bytes.len());
                bytes[at] = rng.next_u64() as u8;
            }
            let _ = SnapshotManifest::parse(&bytes);
            let len = rng.index(200);
            let _ = SnapshotManifest::parse(&rng.bytes(len));
        }
    }
}
