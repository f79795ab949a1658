//! The audit trail's on-disk format (`AUDIT.md` beside this file): one JSON object per line in
//! one file per UTC day, each line carrying the SHA-256 of the line before it, with signed
//! digest records at intervals and at the end of every file.
//!
//! Pure, so that the agent ([`Chain`], which writes) and `kmsctl` ([`verify`], which checks a
//! copy of the files offline with only the public key) share one definition.
//!
//! Ed25519 comes from `ed25519-dalek` 2.x (RustCrypto/dalek, pure Rust, constant-time,
//! maintained, audited): signing and verifying 32-byte keys is all the trail needs, and it
//! keeps `kmsfs-common`, which `kmsctl` and `kmsfs` build too, free of `aws-lc-rs`'s C and
//! CMake build.

pub mod verify;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::time::{civil_from_days, days_from_civil};

/// `eventVersion` of the records this code writes.
pub const EVENT_VERSION: &str = "1.08";

/// The `previousHash` of the very first line of a log.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// `eventType` of a digest record (events are `AwsApiCall`).
pub const DIGEST_EVENT_TYPE: &str = "Digest";

/// The first line of the string a digest's signature covers.
const DIGEST_LABEL: &str = "kmsfs-audit-digest-v1";

/// The hash that chains lines: hex SHA-256 of a line's exact bytes, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

/// Hex SHA-256 of an Ed25519 public key: how digests name the key that signed them.
pub fn key_fingerprint(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of the file that holds the records of `day` (days since the epoch, UTC):
/// `YYYY-MM-DD.jsonl`.
pub fn file_name(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}.jsonl")
}

/// The day a log file's name stands for, if it is one.
pub fn parse_file_name(name: &str) -> Option<i64> {
    parse_date(name.strip_suffix(".jsonl")?)
}

/// `YYYY-MM-DD` to days since the epoch.
pub fn parse_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        s.get(r).filter(|t| t.bytes().all(|c| c.is_ascii_digit()))?.parse().ok()
    };
    let (y, m, d) = (i64::from(num(0..4)?), num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let day = days_from_civil(y, m, d);
    // Reject 02-31 and the like: the date must survive the round trip.
    (civil_from_days(day) == (y, m, d)).then_some(day)
}

/// Milliseconds since the epoch as CloudTrail's `eventTime` (UTC, here with milliseconds):
/// `2024-05-01T12:00:00.123Z`.
pub fn event_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms.rem_euclid(1000))
}

/// Parses an `eventTime`, or a bare `YYYY-MM-DD` (midnight UTC), or `YYYY-MM-DDTHH:MM:SSZ`,
/// to milliseconds since the epoch.
pub fn parse_time(s: &str) -> Option<i64> {
    let day = parse_date(s.get(0..10)?)?;
    let rest = &s[10..];
    if rest.is_empty() {
        return Some(day * 86_400_000);
    }
    let rest = rest.strip_prefix('T')?.strip_suffix('Z')?;
    let (hms, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let parts: Vec<&str> = hms.split(':').collect();
    let [h, m, sec] = parts.as_slice() else { return None };
    let field = |t: &str, max: i64| t.parse::<i64>().ok().filter(|v| (0..=max).contains(v) && t.len() == 2);
    let (h, m, sec) = (field(h, 23)?, field(m, 59)?, field(sec, 60)?);
    let millis = if frac.is_empty() {
        0
    } else {
        if frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        format!("{frac:0<3}")[..3].parse::<i64>().ok()?
    };
    Some(((day * 86_400 + h * 3600 + m * 60 + sec) * 1000) + millis)
}

/// Where the log stands: the next line's sequence number and `previousHash`, and what the
/// next digest will cover. The writer keeps one; the verifier rebuilds one as it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub next_sequence: u64,
    pub last_hash: String,
    /// The first sequence number not yet covered by a digest, and when that span began.
    pub unsealed: Option<(u64, i64)>,
}

impl Chain {
    /// A log with no lines yet.
    pub fn genesis() -> Chain {
        Chain { next_sequence: 0, last_hash: GENESIS_HASH.to_string(), unsealed: None }
    }

    /// Turns an event (a CloudTrail-shaped object) into the next line (without its newline)
    /// and advances the chain past it; `sequence` and `previousHash` are set in `event`.
    /// `now_ms` is when the span it opens began, if it opens one.
    pub fn append_event(&mut self, event: &mut Map<String, Value>, now_ms: i64) -> Vec<u8> {
        event.insert("sequence".into(), Value::from(self.next_sequence));
        event.insert("previousHash".into(), Value::from(self.last_hash.clone()));
        let line = serde_json::to_vec(&*event).unwrap_or_default();
        self.unsealed.get_or_insert((self.next_sequence, now_ms));
        self.advance(&line);
        line
    }

    /// Whether there are lines no digest covers yet.
    pub fn needs_digest(&self) -> bool {
        self.unsealed.is_some()
    }

    /// The digest record sealing every line since the last digest, signed with `key`, as
    /// the next line; `None` if there is nothing to seal.
    pub fn append_digest(&mut self, key: &SigningKey, now_ms: i64) -> Option<Vec<u8>> {
        let (first, started) = self.unsealed?;
        let digest = DigestFields {
            sequence: self.next_sequence,
            first_sequence: first,
            last_sequence: self.next_sequence.checked_sub(1)?,
            last_hash: self.last_hash.clone(),
            digest_start: event_time(started),
            digest_end: event_time(now_ms),
            public_key_fingerprint: key_fingerprint(&key.verifying_key()),
        };
        let signature = key.sign(digest.signed_string().as_bytes());
        let mut object = digest.to_object();
        object.insert("signature".into(), Value::from(STANDARD.encode(signature.to_bytes())));
        let line = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
        self.unsealed = None;
        self.advance(&line);
        Some(line)
    }

    /// Moves past a line already in the log (the writer does this for the lines it finds
    /// when it opens an existing log).
    pub fn advance(&mut self, line: &[u8]) {
        self.next_sequence += 1;
        self.last_hash = line_hash(line);
    }
}

/// The members of a digest record that its signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestFields {
    pub sequence: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub last_hash: String,
    pub digest_start: String,
    pub digest_end: String,
    pub public_key_fingerprint: String,
}

impl DigestFields {
    /// The exact bytes signed: a label line, then `name=value` lines in this order, each
    /// ending in `\n`.
    pub fn signed_string(&self) -> String {
        format!(
            "{DIGEST_LABEL}\nsequence={}\nfirstSequence={}\nlastSequence={}\nlastHash={}\ndigestStart={}\n\
             digestEnd={}\npublicKeyFingerprint={}\n",
            self.sequence,
            self.first_sequence,
            self.last_sequence,
            self.last_hash,
            self.digest_start,
            self.digest_end,
            self.public_key_fingerprint
        )
    }

    fn to_object(&self) -> Map<String, Value> {
        let mut o = Map::new();
        o.insert("eventVersion".into(), Value::from(EVENT_VERSION));
        o.insert("eventType".into(), Value::from(DIGEST_EVENT_TYPE));
        o.insert("eventTime".into(), Value::from(self.digest_end.clone()));
        o.insert("digestStart".into(), Value::from(self.digest_start.clone()));
        o.insert("digestEnd".into(), Value::from(self.digest_end.clone()));
        o.insert("firstSequence".into(), Value::from(self.first_sequence));
        o.insert("lastSequence".into(), Value::from(self.last_sequence));
        o.insert("lastHash".into(), Value::from(self.last_hash.clone()));
        o.insert("publicKeyFingerprint".into(), Value::from(self.public_key_fingerprint.clone()));
        o.insert("sequence".into(), Value::from(self.sequence));
        o.insert("previousHash".into(), Value::from(self.last_hash.clone()));
        o
    }

    /// Reads the signed members back from a digest record.
    pub fn from_object(o: &Map<String, Value>) -> Option<DigestFields> {
        let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| o.get(k).and_then(Value::as_u64);
        Some(DigestFields {
            sequence: n("sequence")?,
            first_sequence: n("firstSequence")?,
            last_sequence: n("lastSequence")?,
            last_hash: s("lastHash")?,
            digest_start: s("digestStart")?,
            digest_end: s("digestEnd")?,
            public_key_fingerprint: s("publicKeyFingerprint")?,
        })
    }
}

/// A public key from its base64 form (32 bytes), as `kmsctl audit public-key` prints it.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = STANDARD.decode(text.trim()).map_err(|e| format!("the public key is not base64: {e}"))?;
    let bytes: [u8; 32] =
        bytes.try_into().map_err(|_| "an Ed25519 public key is 32 bytes (44 characters of base64)".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not a valid Ed25519 public key: {e}"))
}

/// A public key's base64 form.
pub fn encode_public_key(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(event_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(event_time(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_time("2023-11-14T22:13:20.123Z"), Some(1_700_000_000_123));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14"), Some(1_699_920_000_000));
        for bad in ["2023-02-30", "2023-11-14T25:00:00Z", "2023-11-14T22:13", "x", "2023-11-14T22:13:20.1234567890Z"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn file_names_are_days() {
        assert_eq!(file_name(19_675), "2023-11-14.jsonl");
        assert_eq!(parse_file_name("2023-11-14.jsonl"), Some(19_675));
        assert_eq!(parse_file_name("2023-11-14.json"), None);
        assert_eq!(parse_file_name("notes.jsonl"), None);
    }

    #[test]
    fn chain_links_lines_and_digests_seal_them() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut chain = Chain::genesis();
        assert!(chain.append_digest(&key, 0).is_none(), "nothing to seal");
        let a = chain.append_event(&mut Map::new(), 1000);
        let b = chain.append_event(&mut Map::new(), 2000);
        let a_v: Value = serde_json::from_slice(&a).unwrap();
        let b_v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(a_v["previousHash"], GENESIS_HASH);
        assert_eq!(b_v["previousHash"], line_hash(&a).as_str());
        assert_eq!(b_v["sequence"], 1);
        let d = chain.append_digest(&key, 3000).unwrap();
        let d_v: Value = serde_json::from_slice(&d).unwrap();
        assert_eq!(d_v["firstSequence"], 0);
        assert_eq!(d_v["lastSequence"], 1);
        assert_eq!(d_v["lastHash"], line_hash(&b).as_str());
        assert_eq!(d_v["digestStart"], "1970-01-01T00:00:01.000Z");
        let fields = DigestFields::from_object(d_v.as_object().unwrap()).unwrap();
        let sig = STANDARD.decode(d_v["signature"].as_str().unwrap()).unwrap();
        let sig = ed25519_dalek::Signature::from_slice(&sig).unwrap();
        key.verifying_key().verify_strict(fields.signed_string().as_bytes(), &sig).unwrap();
        assert!(!chain.needs_digest());
        assert_eq!(chain.next_sequence, 3);
    }

    #[test]
    fn public_keys_round_trip() {
        let key = SigningKey::from_bytes(&[9; 32]).verifying_key();
        assert_eq!(parse_public_key(&encode_public_key(&key)).unwrap(), key);
        assert!(parse_public_key("AAAA").is_err());
        assert!(parse_public_key("not base64!").is_err());
    }
}
