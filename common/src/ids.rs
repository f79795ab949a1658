//! Key identifiers as AWS KMS spells them: key IDs (UUIDs), key ARNs, alias names and
//! alias ARNs. Parsing is pure; resolving an alias to a key is the agent's job.

use std::fmt;

use crate::error::{ErrorKind, KmsError};

/// A KMS key's ID: a UUID, printed in lowercase hyphenated form; or, for a multi-Region
/// key, `mrk-` and 32 lowercase hex digits, as AWS spells those.
///
/// Both are 16 bytes (ciphertext blobs carry the bytes). A multi-Region ID is a UUID of
/// version 8 (RFC 9562's custom layout: random bits, the version and variant fixed); the
/// agent's other keys are version 4. The version nibble alone tells them apart, so a blob
/// names a multi-Region key exactly as it names any other.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(uuid::Uuid);

/// The prefix of multi-Region key IDs.
pub const MULTI_REGION_PREFIX: &str = "mrk-";

impl KeyId {
    pub fn random() -> KeyId {
        KeyId(uuid::Uuid::new_v4())
    }

    /// A new multi-Region key ID (`mrk-…`).
    pub fn random_multi_region() -> KeyId {
        KeyId(uuid::Builder::from_custom_bytes(*uuid::Uuid::new_v4().as_bytes()).into_uuid())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> KeyId {
        KeyId(uuid::Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Whether this is a multi-Region key's ID.
    pub fn is_multi_region(&self) -> bool {
        self.0.get_version_num() == 8
    }

    /// Parses the canonical forms only, as AWS does: a hyphenated lowercase UUID, or
    /// `mrk-` and 32 lowercase hex digits of a multi-Region ID.
    pub fn parse(s: &str) -> Option<KeyId> {
        if let Some(hex) = s.strip_prefix(MULTI_REGION_PREFIX) {
            let lower_hex = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let id = uuid::Uuid::try_parse(hex).ok().filter(|_| lower_hex).map(KeyId)?;
            return id.is_multi_region().then_some(id);
        }
        if s.len() != 36 {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(KeyId).filter(|id| !id.is_multi_region())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_multi_region() {
            write!(f, "{MULTI_REGION_PREFIX}{}", self.0.simple())
        } else {
            self.0.hyphenated().fmt(f)
        }
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The partition, region and account a resource lives in; they make up its ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArnScope {
    pub region: String,
    pub account: String,
}

impl ArnScope {
    pub fn key_arn(&self, id: &KeyId) -> String {
        format!("arn:aws:kms:{}:{}:key/{}", self.region, self.account, id)
    }

    pub fn alias_arn(&self, alias_name: &str) -> String {
        format!("arn:aws:kms:{}:{}:{}", self.region, self.account, alias_name)
    }
}

/// What a caller may put in a `KeyId` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    Id(KeyId),
    KeyArn {
        scope: ArnScope,
        id: KeyId,
    },
    /// `alias/name`.
    Alias(String),
    AliasArn {
        scope: ArnScope,
        name: String,
    },
}

impl KeyRef {
    /// Parses a `KeyId` field. Strings that are neither a UUID, an alias nor an ARN are
    /// reported as AWS does (`NotFoundException: Invalid keyId ...`); a string that claims
    /// to be an ARN but is malformed gets `InvalidArnException`.
    pub fn parse(s: &str) -> Result<KeyRef, KmsError> {
        if let Some(rest) = s.strip_prefix("arn:") {
            return parse_arn(s, rest);
        }
        if s.starts_with("alias/") {
            return Ok(KeyRef::Alias(s.to_string()));
        }
        KeyId::parse(s).map(KeyRef::Id).ok_or_else(|| KmsError::not_found(format!("Invalid keyId '{s}'")))
    }

    /// True for alias names and alias ARNs.
    pub fn is_alias(&self) -> bool {
        matches!(self, KeyRef::Alias(_) | KeyRef::AliasArn { .. })
    }
}

fn parse_arn(whole: &str, rest: &str) -> Result<KeyRef, KmsError> {
    let bad = || KmsError::new(ErrorKind::InvalidArnException, format!("'{whole}' is not a valid KMS ARN"));
    let mut parts = rest.splitn(5, ':');
    let (partition, service, region, account, resource) = (
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
    );
    if !partition.starts_with("aws") || service != "kms" || region.is_empty() {
        return Err(bad());
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let scope = ArnScope { region: region.to_string(), account: account.to_string() };
    if let Some(id) = resource.strip_prefix("key/") {
        let id = KeyId::parse(id).ok_or_else(bad)?;
        Ok(KeyRef::KeyArn { scope, id })
    } else if resource.starts_with("alias/") && resource.len() > "alias/".len() {
        Ok(KeyRef::AliasArn { scope, name: resource.to_string() })
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let id = KeyId::random();
        assert_eq!(KeyRef::parse(&id.to_string()).unwrap(), KeyRef::Id(id));
        let scope = ArnScope { region: "local".into(), account: "123456789012".into() };
        assert_eq!(KeyRef::parse(&scope.key_arn(&id)).unwrap(), KeyRef::KeyArn { scope: scope.clone(), id });
        assert_eq!(KeyRef::parse("alias/app").unwrap(), KeyRef::Alias("alias/app".into()));
        assert_eq!(
            KeyRef::parse(&scope.alias_arn("alias/app")).unwrap(),
            KeyRef::AliasArn { scope, name: "alias/app".into() }
        );
    }

    #[test]
    fn multi_region_ids_are_spelled_as_aws_spells_them() {
        let id = KeyId::random_multi_region();
        assert!(id.is_multi_region() && !KeyId::random().is_multi_region());
        let text = id.to_string();
        assert!(text.starts_with("mrk-") && text.len() == 36, "{text}");
        assert!(text[4..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{text}");
        assert_eq!(KeyId::parse(&text), Some(id));
        assert_eq!(KeyRef::parse(&text).unwrap(), KeyRef::Id(id));
        let scope = ArnScope { region: "region-b".into(), account: "123456789012".into() };
        assert_eq!(scope.key_arn(&id), format!("arn:aws:kms:region-b:123456789012:key/{text}"));
        assert_eq!(KeyRef::parse(&scope.key_arn(&id)).unwrap(), KeyRef::KeyArn { scope, id });
        // The same bytes in the other spelling, and other spellings, are not IDs.
        let hyphenated = uuid::Uuid::from_bytes(*id.as_bytes()).hyphenated().to_string();
        assert_eq!(KeyId::parse(&hyphenated), None);
        assert_eq!(KeyId::parse(&text.to_uppercase().replace("MRK-", "mrk-")), None);
        let v4 = KeyId::random();
        assert_eq!(KeyId::parse(&format!("mrk-{}", uuid::Uuid::from_bytes(*v4.as_bytes()).simple())), None);
        assert_eq!(KeyId::parse("mrk-1234"), None);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(KeyRef::parse("nope").unwrap_err().kind, ErrorKind::NotFoundException);
        assert_eq!(
            KeyRef::parse(&KeyId::random().to_string().to_uppercase()[..35]).unwrap_err().kind,
            ErrorKind::NotFoundException
        );
        for arn in [
            "arn:aws:kms:local:123:key/x",
            "arn:aws:s3:local:123456789012:key/00000000-0000-0000-0000-000000000000",
            "arn:aws:kms:local:123456789012:key/not-a-uuid",
            "arn:aws:kms:local:123456789012:alias/",
            "arn:aws:kms",
        ] {
            assert_eq!(KeyRef::parse(arn).unwrap_err().kind, ErrorKind::InvalidArnException, "{arn}");
        }
    }
}
