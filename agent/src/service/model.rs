//! The AWS KMS service model (botocore's `kms-2014-11-01`, documentation stripped, in
//! `agent/model/`) and a validator driven by it.
//!
//! Every request is checked against its operation's input shape before a handler sees
//! it: JSON types (a mismatch is a `SerializationException`, as AWS reports it), required
//! members, string and blob lengths, integer ranges, list sizes, enumerations and patterns
//! (violations are one `ValidationException` listing each, in AWS's wording). The limits
//! are thus exactly the model's, for every operation, without copying them by hand.
//!
//! kmsd's own request/response actions (`Kmsfs.*`, in `agent/model/kmsd-extensions.json`)
//! are added to the model at load, built from AWS's shapes, so they are validated the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use base64::Engine;
use kmsfs_common::{ErrorKind, KmsError};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

const MODEL_JSON: &str = include_str!("../../model/kms-2014-11-01.min.json");
const EXTENSIONS_JSON: &str = include_str!("../../model/kmsd-extensions.json");

#[derive(Deserialize)]
struct RawModel {
    operations: HashMap<String, Operation>,
    shapes: HashMap<String, Shape>,
}

#[derive(Deserialize)]
struct Operation {
    input: Option<ShapeRef>,
}

#[derive(Deserialize)]
struct ShapeRef {
    shape: String,
}

#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    members: BTreeMap<String, ShapeRef>,
    #[serde(default)]
    required: Vec<String>,
    min: Option<f64>,
    max: Option<f64>,
    pattern: Option<String>,
    #[serde(rename = "enum")]
    enumeration: Option<Vec<String>>,
    member: Option<ShapeRef>,
    key: Option<ShapeRef>,
    value: Option<ShapeRef>,
    #[serde(default)]
    sensitive: bool,
}

/// The loaded model with its patterns compiled.
pub struct Model {
    raw: RawModel,
    patterns: HashMap<String, Regex>,
}

static MODEL: LazyLock<Model> = LazyLock::new(|| {
    #[allow(clippy::expect_used)] // the model is compiled into the binary and tested
    let mut raw: RawModel = serde_json::from_str(MODEL_JSON).expect("embedded service model parses");
    #[allow(clippy::expect_used)] // as above
    let extensions: RawModel = serde_json::from_str(EXTENSIONS_JSON).expect("embedded extension model parses");
    raw.operations.extend(extensions.operations);
    raw.shapes.extend(extensions.shapes);
    let patterns = raw
        .shapes
        .iter()
        .filter_map(|(name, shape)| {
            let pattern = shape.pattern.as_ref()?;
            // The model's patterns are Java regexes matched against the whole value.
            let anchored = format!("^(?:{})$", pattern.trim_start_matches('^').trim_end_matches('$'));
            Regex::new(&anchored).ok().map(|re| (name.clone(), re))
        })
        .collect();
    Model { raw, patterns }
});

/// The model, loaded on first use.
pub fn model() -> &'static Model {
    &MODEL
}

/// Lenient base64: AWS accepts padded and unpadded standard base64.
pub const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

impl Model {
    /// True if the model defines `action`.
    pub fn has_operation(&self, action: &str) -> bool {
        self.raw.operations.contains_key(action)
    }

    /// The values of the model's string enumeration `shape` (`GrantOperation`, say); empty if
    /// there is no such shape.
    pub fn enumeration(&self, shape: &str) -> &[String] {
        self.raw.shapes.get(shape).and_then(|s| s.enumeration.as_deref()).unwrap_or_default()
    }

    /// Checks `request` against the input shape of `action`.
    pub fn validate(&self, action: &str, request: &Value) -> Result<(), KmsError> {
        let op = self.raw.operations.get(action).ok_or_else(|| {
            KmsError::new(ErrorKind::UnknownOperationException, format!("Unknown operation {action}"))
        })?;
        let Some(input) = &op.input else { return Ok(()) };
        let mut violations = Vec::new();
        self.check(&input.shape, request, &Path::Root, &mut violations)?;
        match violations.len() {
            0 => Ok(()),
            1 => Err(KmsError::validation(format!("1 validation error detected: {}", violations[0]))),
            n => Err(KmsError::validation(format!("{n} validation errors detected: {}", violations.join("; ")))),
        }
    }

    fn check(
        &self,
        shape_name: &str,
        value: &Value,
        path: &Path<'_>,
        violations: &mut Vec<String>,
    ) -> Result<(), KmsError> {
        let Some(shape) = self.raw.shapes.get(shape_name) else {
            return Err(KmsError::internal(format!("service model lacks shape {shape_name}")));
        };
        let wrong_type = |expected: &str| {
            KmsError::new(
                ErrorKind::SerializationException,
                format!(
                    "Expected {expected} at '{}'",
                    if path.is_root() { "request".to_string() } else { path.to_string() }
                ),
            )
        };
        let shown = |v: &str| -> String {
            if shape.sensitive {
                return "(sensitive)".to_string();
            }
            let short: String = v.chars().take(100).collect();
            format!("'{short}'")
        };
        match shape.ty.as_str() {
            "structure" => {
                let Value::Object(map) = value else { return Err(wrong_type("a JSON object")) };
                for name in &shape.required {
                    if map.get(name).is_none_or(Value::is_null) {
                        violations.push(format!(
                            "Value null at '{}' failed to satisfy constraint: Member must not be null",
                            Path::Member(path, name)
                        ));
                    }
                }
                for (name, member) in &shape.members {
                    if let Some(v) = map.get(name).filter(|v| !v.is_null()) {
                        self.check(&member.shape, v, &Path::Member(path, name), violations)?;
                    }
                }
            }
            "string" => {
                let Value::String(s) = value else { return Err(wrong_type("a string")) };
                bounds(
                    shape,
                    s.chars().count() as f64,
                    "length",
                    || format!("Value {} at '{path}'", shown(s)),
                    violations,
                );
                if let Some(allowed) = &shape.enumeration {
                    if !allowed.iter().any(|a| a == s) {
                        violations.push(format!(
                            "Value {} at '{path}' failed to satisfy constraint: Member must satisfy enum value set: [{}]",
                            shown(s),
                            allowed.join(", ")
                        ));
                    }
                }
                if let Some(re) = self.patterns.get(shape_name) {
                    if !re.is_match(s) {
                        violations.push(format!(
                            "Value {} at '{path}' failed to satisfy constraint: Member must satisfy regular expression pattern: {}",
                            shown(s),
                            shape.pattern.as_deref().unwrap_or("")
                        ));
                    }
                }
            }
            "blob" => {
                let Value::String(s) = value else { return Err(wrong_type("a base64 string")) };
                let len = BASE64
                    .decode(s)
                    .map_err(|_| {
                        KmsError::new(
                            ErrorKind::SerializationException,
                            format!("Value at '{path}' is not valid base64"),
                        )
                    })?
                    .len() as f64;
                bounds(shape, len, "length", || format!("Value at '{path}'"), violations);
            }
            "integer" | "long" => {
                let Some(n) = value.as_i64() else { return Err(wrong_type("an integer")) };
                bounds(shape, n as f64, "value", || format!("Value '{n}' at '{path}'"), violations);
            }
            "boolean" => {
                if !value.is_boolean() {
                    return Err(wrong_type("a boolean"));
                }
            }
            "timestamp" => {
                if !value.is_number() && !value.is_string() {
                    return Err(wrong_type("a timestamp"));
                }
            }
            "list" => {
                let Value::Array(items) = value else { return Err(wrong_type("a JSON array")) };
                bounds(shape, items.len() as f64, "length", || format!("Value at '{path}'"), violations);
                if let Some(member) = &shape.member {
                    for (i, item) in items.iter().enumerate() {
                        self.check(&member.shape, item, &Path::Item(path, i + 1), violations)?;
                    }
                }
            }
            "map" => {
                let Value::Object(map) = value else { return Err(wrong_type("a JSON object")) };
                for (k, v) in map {
                    if let Some(key) = &shape.key {
                        self.check(&key.shape, &Value::String(k.clone()), &Path::MapKey(path), violations)?;
                    }
                    if let Some(val) = &shape.value {
                        self.check(&val.shape, v, &Path::MapValue(path, k), violations)?;
                    }
                }
            }
            other => return Err(KmsError::internal(format!("service model shape type {other} unknown"))),
        }
        Ok(())
    }
}

/// Checks `measure` (a length, or an integer's value) against the shape's min and max,
/// in AWS's wording: "<subject> failed to satisfy constraint: Member must have <what> ...".
/// The subject is built only for a violation: valid requests format nothing.
fn bounds(shape: &Shape, measure: f64, what: &str, subject: impl Fn() -> String, violations: &mut Vec<String>) {
    if let Some(min) = shape.min.filter(|m| measure < *m) {
        violations.push(format!(
            "{} failed to satisfy constraint: Member must have {what} greater than or equal to {min}",
            subject()
        ));
    }
    if let Some(max) = shape.max.filter(|m| measure > *m) {
        violations.push(format!(
            "{} failed to satisfy constraint: Member must have {what} less than or equal to {max}",
            subject()
        ));
    }
}

/// Where a value sits in the request, named only when a message needs it. AWS names
/// members in lowerCamelCase: `keyId`, `tags.1.member.tagKey`, `encryptionContext.key`.
enum Path<'a> {
    Root,
    Member(&'a Path<'a>, &'a str),
    Item(&'a Path<'a>, usize),
    MapKey(&'a Path<'a>),
    MapValue(&'a Path<'a>, &'a str),
}

impl Path<'_> {
    fn is_root(&self) -> bool {
        matches!(self, Path::Root)
    }
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parent = |f: &mut std::fmt::Formatter<'_>, p: &Path<'_>| -> std::fmt::Result {
            if p.is_root() {
                Ok(())
            } else {
                write!(f, "{p}.")
            }
        };
        match self {
            Path::Root => Ok(()),
            Path::Member(p, name) => {
                parent(f, p)?;
                let mut chars = name.chars();
                if let Some(first) = chars.next() {
                    write!(f, "{}{}", first.to_lowercase(), chars.as_str())?;
                }
                Ok(())
            }
            Path::Item(p, i) => write!(f, "{p}.{i}.member"),
            Path::MapKey(p) => write!(f, "{p}.key"),
            Path::MapValue(p, k) => write!(f, "{p}.{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(action: &str, v: Value) -> KmsError {
        model().validate(action, &v).unwrap_err()
    }

    #[test]
    fn the_model_has_all_54_operations_and_compiles_every_pattern() {
        let m = model();
        assert_eq!(m.raw.operations.keys().filter(|op| !op.starts_with("Kmsfs.")).count(), 54);
        let with_patterns = m.raw.shapes.values().filter(|s| s.pattern.is_some()).count();
        assert_eq!(m.patterns.len(), with_patterns);
    }

    #[test]
    fn required_members_and_types() {
        let e = err("DescribeKey", json!({}));
        assert_eq!(e.kind, ErrorKind::ValidationException);
        assert!(e.message.contains("'keyId' failed to satisfy constraint: Member must not be null"), "{e}");
        assert_eq!(err("DescribeKey", json!({"KeyId": 5})).kind, ErrorKind::SerializationException);
        assert_eq!(err("DescribeKey", json!([])).kind, ErrorKind::SerializationException);
        assert_eq!(err("Encrypt", json!({"KeyId": "k", "Plaintext": "%%%"})).kind, ErrorKind::SerializationException);
        assert!(model().validate("DescribeKey", &json!({"KeyId": "k", "Extra": 1})).is_ok());
    }

    #[test]
    fn enumerations_are_the_models() {
        let operations = model().enumeration("GrantOperation");
        assert!(operations.iter().any(|o| o == "Decrypt") && operations.iter().any(|o| o == "DeriveSharedSecret"));
        assert!(model().enumeration("NoSuchShape").is_empty());
    }

    #[test]
    fn limits_enums_and_patterns_come_from_the_model() {
        let big = BASE64.encode(vec![0u8; 4097]);
        let e = err("Encrypt", json!({"KeyId": "k", "Plaintext": big}));
        assert!(e.message.contains("less than or equal to 4096"), "{e}");
        assert!(!e.message.contains("AAAA"), "sensitive values are not echoed: {e}");
        assert!(model().validate("Encrypt", &json!({"KeyId": "k", "Plaintext": BASE64.encode([0u8; 4096])})).is_ok());
        let e = err("GenerateDataKey", json!({"KeyId": "k", "NumberOfBytes": 1025, "KeySpec": "AES_512"}));
        assert!(e.message.starts_with("2 validation errors detected"), "{e}");
        assert!(e.message.contains("enum value set: [AES_256, AES_128]"), "{e}");
        let e = err("CreateAlias", json!({"AliasName": "alias/bad name", "TargetKeyId": "k"}));
        assert!(e.message.contains("regular expression pattern"), "{e}");
        let e = err("Encrypt", json!({"KeyId": "k", "Plaintext": "AA==", "GrantTokens": vec!["t"; 11]}));
        assert!(e.message.contains("'grantTokens'"), "{e}");
        let e = err("TagResource", json!({"KeyId": "k", "Tags": [{"TagKey": ""}]}));
        assert!(e.message.contains("tags.1.member.tagKey"), "{e}");
        assert!(e.message.contains("tags.1.member.tagValue"), "{e}");
    }

    #[test]
    fn extensions_are_validated_with_aws_shapes() {
        let contexts = |n: usize| vec![json!({"kmsfs:file": "f"}); n];
        let ok = json!({"KeyId": "k", "KeySpec": "AES_256", "EncryptionContexts": contexts(256)});
        assert!(model().validate("Kmsfs.GenerateDataKeys", &ok).is_ok());
        let e = err("Kmsfs.GenerateDataKeys", json!({"KeyId": "k", "EncryptionContexts": contexts(257)}));
        assert!(e.message.contains("'encryptionContexts' failed to satisfy constraint"), "{e}");
        let e = err("Kmsfs.GenerateDataKeys", json!({"KeyId": "k", "EncryptionContexts": []}));
        assert!(e.message.contains("greater than or equal to 1"), "{e}");
        let e = err("Kmsfs.GenerateDataKeys", json!({"KeyId": "k", "EncryptionContexts": [{}, {"a": 1}]}));
        assert_eq!(e.kind, ErrorKind::SerializationException);
        assert!(e.message.contains("encryptionContexts.2.member.a"), "{e}");
        let e = err("Kmsfs.GenerateDataKeys", json!({"EncryptionContexts": [{}]}));
        assert!(e.message.contains("'keyId' failed to satisfy constraint: Member must not be null"), "{e}");
    }

    #[test]
    fn unknown_operations() {
        assert_eq!(err("Nope", json!({})).kind, ErrorKind::UnknownOperationException);
    }
}
