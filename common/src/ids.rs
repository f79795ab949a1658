//! Key identifiers as AWS KMS spells them: key IDs (UUIDs), key ARNs, alias names and
//! alias ARNs. Parsing is pure; resolving an alias to a key is the agent's job.

use std::fmt;

use crate::error::{ErrorKind, KmsError};

/// A KMS key's ID: a UUID, printed in lowercase hyphenated form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(uuid::Uuid);

impl KeyId {
    pub fn random() -> KeyId {
        KeyId(uuid::Uuid::new_v4())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> KeyId {
        KeyId(uuid::Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Parses the canonical hyphenated form only, as AWS does.
    pub fn parse(s: &str) -> Option<KeyId> {
        if s.len() != 36 {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(KeyId)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
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
