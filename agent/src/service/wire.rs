//! Request parsing and response helpers shared by the handlers: typed requests from the
//! validated JSON, base64 blobs that zeroize, and AWS-style pagination markers.

use std::collections::BTreeMap;

use base64::Engine;
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::{ErrorKind, KmsError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use zeroize::Zeroizing;

use super::model::BASE64;

/// Deserializes a request already validated against the model.
pub fn parse<T: DeserializeOwned>(request: Value) -> Result<T, KmsError> {
    serde_json::from_value(request).map_err(|e| KmsError::new(ErrorKind::SerializationException, e.to_string()))
}

/// A base64 blob from a request, decoded into memory that is zeroized on drop.
pub struct Blob(pub Zeroizing<Vec<u8>>);

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        BASE64
            .decode(text.as_bytes())
            .map(|b| Blob(Zeroizing::new(b)))
            .map_err(|_| serde::de::Error::custom("a blob is not valid base64"))
    }
}

/// A secret string from a request (a key store's password), zeroized on drop.
pub struct SecretText(pub Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SecretText, D::Error> {
        String::deserialize(d).map(|s| SecretText(Zeroizing::new(s)))
    }
}

/// Base64 for responses.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 of a secret, in a string that is zeroized when dropped.
pub fn b64_secret(bytes: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(bytes.len().div_ceil(3) * 4));
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut out);
    out
}

pub fn context(map: Option<BTreeMap<String, String>>) -> EncryptionContext {
    EncryptionContext(map.unwrap_or_default())
}

/// Only `SYMMETRIC_DEFAULT` applies to the symmetric keys this agent has.
pub fn require_symmetric_algorithm(algorithm: Option<&str>, key_arn: &str) -> Result<(), KmsError> {
    match algorithm {
        None | Some("SYMMETRIC_DEFAULT") => Ok(()),
        Some(other) => Err(KmsError::new(
            ErrorKind::InvalidKeyUsageException,
            format!("{key_arn} does not support the {other} encryption algorithm"),
        )),
    }
}

/// The DryRun answer once every check has passed.
pub fn dry_run() -> KmsError {
    KmsError::new(
        ErrorKind::DryRunOperationException,
        "The request would have succeeded, but the DryRun option is set.",
    )
}

/// One page of `items` (sorted by `sort_key`) after `marker`, at most `limit` long, and
/// the marker for the next page. Markers are opaque to callers: base64 of the last
/// returned item's sort key.
pub fn paginate<T>(
    items: Vec<T>,
    sort_key: impl Fn(&T) -> String,
    limit: Option<i64>,
    default_limit: usize,
    max_limit: usize,
    marker: Option<&str>,
) -> Result<(Vec<T>, Option<String>), KmsError> {
    let after = match marker {
        None => None,
        Some(m) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(m)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| KmsError::new(ErrorKind::InvalidMarkerException, "The marker is not valid"))?,
        ),
    };
    let limit = limit.map_or(default_limit, |l| (l.max(1) as usize).min(max_limit));
    let mut page: Vec<T> =
        items.into_iter().filter(|item| after.as_ref().is_none_or(|a| sort_key(item) > *a)).take(limit + 1).collect();
    let next = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|last| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sort_key(last)))
    } else {
        None
    };
    Ok((page, next))
}

/// Adds `NextMarker`/`Truncated` to a list response.
pub fn with_page_info(mut response: Value, next: Option<String>) -> Value {
    if let Value::Object(map) = &mut response {
        map.insert("Truncated".into(), Value::Bool(next.is_some()));
        if let Some(next) = next {
            map.insert("NextMarker".into(), Value::String(next));
        }
    }
    response
}

/// Adds `kms:RequestAlias` when the request named its key by an alias.
pub fn with_request_alias(ctx: crate::policy::RequestContext, key_id: &str) -> crate::policy::RequestContext {
    match key_id.rsplit_once(':').map_or(key_id, |(_, rest)| rest) {
        alias if alias.starts_with("alias/") => ctx.with(crate::policy::keys::REQUEST_ALIAS, alias),
        _ => ctx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let items: Vec<String> = (0..25).map(|i| format!("{i:03}")).collect();
        let mut seen = Vec::new();
        let mut marker = None;
        loop {
            let (page, next) = paginate(items.clone(), |s| s.clone(), Some(10), 100, 1000, marker.as_deref()).unwrap();
            seen.extend(page);
            match next {
                Some(n) => marker = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, items);
        let err = paginate(items, |s| s.clone(), None, 100, 1000, Some("!!")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidMarkerException);
    }
}
