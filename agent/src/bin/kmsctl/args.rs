//! Parsers for kmsctl's structured arguments, in the aws CLI's conventions: binary blobs
//! (`fileb://`, `file://`, or base64), encryption contexts (`k1=v1,k2=v2` shorthand or a JSON
//! object), tags (`TagKey=k,TagValue=v` shorthand or JSON), tag-key and grant-operation lists,
//! grant constraints (`EncryptionContextSubset={k=v}` shorthand or JSON), timestamps (ISO 8601,
//! a bare date, or seconds since the epoch), and `file://` string parameters. Each is a clap
//! value parser, so a bad value is a usage error that names the flag. A secret given as a
//! value (`--key-store-password`) is parsed only to be refused, without being kept.

use std::collections::BTreeMap;
use std::fs;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use kmsfs_common::audit::parse_date;
use kmsfs_common::context::EncryptionContext;
use serde_json::Value;

/// Standard-alphabet base64 that accepts input with or without `=` padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Parameter files larger than this are refused rather than read whole.
const MAX_PARAM_FILE: u64 = 16 << 20;

/// Raw bytes given on the command line (`--plaintext`, `--ciphertext-blob`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

/// A point in time given on the command line (`--valid-to`), in microseconds since the
/// epoch: the precision of the ISO 8601 dates kmsctl prints, so that a printed date given
/// back names the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The JSON 1.1 wire form: seconds since the epoch, whole when they are.
    pub fn to_wire(self) -> Value {
        if self.0 % 1_000_000 == 0 {
            Value::from(self.0 / 1_000_000)
        } else {
            Value::from(self.0 as f64 / 1_000_000.0)
        }
    }
}

/// One `{"TagKey", "TagValue"}` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

/// The tags one `--tags` value names: a shorthand value is one tag, a JSON list many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagList(pub Vec<Tag>);

/// The tag keys one `--tag-keys` value names: a plain value is one key, a JSON list many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagKeys(pub Vec<String>);

/// A parsed `--encryption-context` (or `--source-`/`--destination-encryption-context`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context(pub EncryptionContext);

/// The grant operations one `--operations` value names: a plain value is one, a JSON list many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOperations(pub Vec<String>);

/// A parsed `--constraints`: the encryption context a grant's operations must include
/// (`EncryptionContextSubset`) or match exactly (`EncryptionContextEquals`). Giving both, or
/// neither, is the service's to judge, as with the aws CLI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrantConstraints {
    pub encryption_context_subset: Option<EncryptionContext>,
    pub encryption_context_equals: Option<EncryptionContext>,
}

/// A secret that was given as a command-line value, where it does not belong: its value is
/// dropped at once, and its presence is refused when the command runs (a refusal by the
/// parser itself would print the value in clap's error message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgvSecret;

/// The value parser of a secret's refused flag: accepts anything, keeps nothing.
pub fn argv_secret(_arg: &str) -> Result<ArgvSecret, String> {
    Ok(ArgvSecret)
}

/// A blob argument: `fileb://PATH` or `file://PATH` is the file's raw bytes; anything else
/// is base64, the aws CLI v2's default binary format.
pub fn blob(arg: &str) -> Result<Blob, String> {
    if let Some(path) = arg.strip_prefix("fileb://").or_else(|| arg.strip_prefix("file://")) {
        return read_file(path).map(Blob);
    }
    let trimmed = arg.trim();
    LENIENT_BASE64.decode(trimmed).map(Blob).map_err(|e| {
        format!("not valid base64 ({e}); give the bytes base64-encoded, or as fileb://PATH to read them from a file")
    })
}

/// What a timestamp argument looks like, for error messages.
const TIMESTAMP_FORMS: &str = "expected ISO 8601 such as 2030-01-01T00:00:00Z or \
     2030-01-01T00:00:00.000000+00:00, a date such as 2030-01-01 (midnight UTC), or seconds since the epoch";

/// A timestamp as the aws CLI reads one: seconds since the epoch (`1893456000`), a date
/// (`2030-01-01`, midnight UTC), or an ISO 8601 date and time (`T` or a space between them),
/// with optional seconds and fraction and a `Z` or `±HH[:MM]` offset; without an offset the
/// time is UTC, as botocore takes it.
pub fn timestamp(arg: &str) -> Result<Timestamp, String> {
    let arg = arg.trim();
    let invalid = || format!("{arg:?} is not a timestamp; {TIMESTAMP_FORMS}");
    // A number is epoch seconds (botocore tries that first); a dash after four digits
    // starts a date instead.
    if arg.bytes().next().is_some_and(|c| c.is_ascii_digit() || c == b'-')
        && arg.bytes().all(|c| c.is_ascii_digit() || c == b'.' || c == b'-')
        && arg.get(4..5) != Some("-")
    {
        let seconds: f64 = arg.parse().map_err(|_| invalid())?;
        return epoch_micros(seconds).map(Timestamp).ok_or_else(invalid);
    }
    let day = arg.get(0..10).and_then(parse_date).ok_or_else(invalid)?;
    let rest = &arg[10..];
    if rest.is_empty() {
        return Ok(Timestamp(day * 86_400_000_000));
    }
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix('t')).or_else(|| rest.strip_prefix(' '));
    let (clock, offset) = split_offset(rest.ok_or_else(invalid)?).ok_or_else(invalid)?;
    let micros_of_day = time_of_day(clock).ok_or_else(invalid)?;
    Ok(Timestamp(day * 86_400_000_000 + micros_of_day - offset * 60_000_000))
}

/// Seconds since the epoch as whole microseconds, if they fit.
fn epoch_micros(seconds: f64) -> Option<i64> {
    let micros = (seconds * 1_000_000.0).round();
    (micros.is_finite() && micros.abs() < 9.0e18).then_some(micros as i64)
}

/// Splits `HH:MM[:SS[.frac]]` from its offset, in minutes east of UTC (`Z`: 0, none: 0).
fn split_offset(rest: &str) -> Option<(&str, i64)> {
    if let Some(clock) = rest.strip_suffix('Z').or_else(|| rest.strip_suffix('z')) {
        return Some((clock, 0));
    }
    let Some(at) = rest.rfind(['+', '-']) else {
        return Some((rest, 0));
    };
    let (clock, offset) = rest.split_at(at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let digits: String = offset[1..].chars().filter(|&c| c != ':').collect();
    let two = |s: &str| s.parse::<i64>().ok().filter(|_| s.len() == 2 && s.bytes().all(|c| c.is_ascii_digit()));
    let (hours, minutes) = match digits.len() {
        2 => (two(&digits)?, 0),
        4 => (two(&digits[0..2])?, two(&digits[2..4])?),
        _ => return None,
    };
    (hours <= 23 && minutes <= 59).then_some((clock, sign * (hours * 60 + minutes)))
}

/// `HH:MM[:SS[.frac]]` in microseconds since midnight.
fn time_of_day(clock: &str) -> Option<i64> {
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, fraction)) => (hms, Some(fraction)),
        None => (clock, None),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    let field = |t: &str, max: i64| {
        t.parse::<i64>().ok().filter(|v| t.len() == 2 && t.bytes().all(|c| c.is_ascii_digit()) && (0..=max).contains(v))
    };
    let (h, m, s) = match parts.as_slice() {
        [h, m] if fraction.is_none() => (field(h, 23)?, field(m, 59)?, 0),
        [h, m, s] => (field(h, 23)?, field(m, 59)?, field(s, 60)?),
        _ => return None,
    };
    let micros = match fraction {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) && f.bytes().all(|c| c.is_ascii_digit()) => {
            format!("{f:0<6}")[..6].parse::<i64>().ok()?
        }
        Some(_) => return None,
    };
    Some((h * 3600 + m * 60 + s) * 1_000_000 + micros)
}

/// A string parameter that may be `file://PATH`, read as UTF-8 text (as the aws CLI does
/// for `--policy` documents).
pub fn text(arg: &str) -> Result<String, String> {
    match arg.strip_prefix("file://") {
        Some(path) => String::from_utf8(read_file(path)?).map_err(|_| format!("{path} is not UTF-8 text")),
        None => Ok(arg.to_string()),
    }
}

/// An encryption context: `k1=v1,k2=v2`, a JSON object of strings, or `file://PATH`
/// holding either.
pub fn context(arg: &str) -> Result<Context, String> {
    let arg = text(arg)?;
    let arg = arg.trim();
    let pairs = if arg.starts_with('{') {
        let value: Value = serde_json::from_str(arg).map_err(|e| format!("not a valid JSON object: {e}"))?;
        json_string_map(value)?
    } else {
        shorthand_map(arg)?
    };
    Ok(Context(EncryptionContext(pairs)))
}

/// One `--constraints` value: shorthand `EncryptionContextSubset={k1=v1,k2=v2}` and/or
/// `EncryptionContextEquals={...}` separated by a comma, a JSON object
/// `{"EncryptionContextSubset": {"k1": "v1"}}`, or `file://PATH` holding either.
pub fn constraints(arg: &str) -> Result<GrantConstraints, String> {
    let arg = text(arg)?;
    let arg = arg.trim();
    let members = if arg.starts_with('{') { json_constraints(arg)? } else { shorthand_constraints(arg)? };
    let mut constraints = GrantConstraints::default();
    for (member, context) in members {
        let slot = match member.as_str() {
            "EncryptionContextSubset" => &mut constraints.encryption_context_subset,
            "EncryptionContextEquals" => &mut constraints.encryption_context_equals,
            _ => return Err(format!("unknown member {member:?}; expected {CONSTRAINTS_SHORTHAND}")),
        };
        if slot.replace(context).is_some() {
            return Err(format!("{member} is given twice"));
        }
    }
    Ok(constraints)
}

/// The members of a JSON `--constraints` object, each an object of strings.
fn json_constraints(arg: &str) -> Result<Vec<(String, EncryptionContext)>, String> {
    let value: Value = serde_json::from_str(arg).map_err(|e| format!("not a valid JSON object: {e}"))?;
    let Value::Object(object) = value else {
        return Err("expected a JSON object".into());
    };
    object
        .into_iter()
        .map(|(member, v)| {
            json_string_map(v)
                .map(|pairs| (member.clone(), EncryptionContext(pairs)))
                .map_err(|e| format!("{member}: {e}"))
        })
        .collect()
}

/// The members of shorthand `--constraints`: `MEMBER={k1=v1,...}` items separated by commas.
fn shorthand_constraints(arg: &str) -> Result<Vec<(String, EncryptionContext)>, String> {
    top_level_items(arg)?
        .into_iter()
        .map(|item| {
            let (member, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not MEMBER={{KEY=VALUE,...}}; expected {CONSTRAINTS_SHORTHAND}"))?;
            let member = member.trim();
            let inner = value
                .trim()
                .strip_prefix('{')
                .and_then(|v| v.strip_suffix('}'))
                .ok_or_else(|| format!("the value of {member} must be {{KEY=VALUE,...}}"))?
                .trim();
            let pairs = if inner.is_empty() { BTreeMap::new() } else { shorthand_map(inner)? };
            Ok((member.to_string(), EncryptionContext(pairs)))
        })
        .collect()
}

/// What a `--constraints` value looks like, for error messages.
const CONSTRAINTS_SHORTHAND: &str =
    "EncryptionContextSubset={KEY=VALUE,...} or EncryptionContextEquals={KEY=VALUE,...}, or JSON";

/// One `--tags` value: `TagKey=k,TagValue=v`, a JSON object `{"TagKey": .., "TagValue": ..}`,
/// a JSON list of them, or `file://PATH` holding any of these.
pub fn tags(arg: &str) -> Result<TagList, String> {
    let arg = text(arg)?;
    let arg = arg.trim();
    if arg.starts_with('[') || arg.starts_with('{') {
        let value: Value = serde_json::from_str(arg).map_err(|e| format!("not valid JSON: {e}"))?;
        return match value {
            Value::Array(items) => items.iter().map(json_tag).collect::<Result<_, _>>().map(TagList),
            other => json_tag(&other).map(|tag| TagList(vec![tag])),
        };
    }
    let mut key = None;
    let mut value = None;
    for (member, v) in shorthand(arg)? {
        let slot = match member.as_str() {
            "TagKey" => &mut key,
            "TagValue" => &mut value,
            _ => return Err(format!("unknown member {member:?}; expected TagKey=KEY,TagValue=VALUE")),
        };
        if slot.replace(v).is_some() {
            return Err(format!("{member} is given twice"));
        }
    }
    match (key, value) {
        (Some(key), Some(value)) => Ok(TagList(vec![Tag { key, value }])),
        _ => Err("expected TagKey=KEY,TagValue=VALUE".into()),
    }
}

/// One `--tag-keys` value: a key, or a JSON list of keys.
pub fn tag_keys(arg: &str) -> Result<TagKeys, String> {
    string_list(arg).map(TagKeys)
}

/// One `--operations` value: an operation name, or a JSON list of them.
pub fn operations(arg: &str) -> Result<GrantOperations, String> {
    string_list(arg).map(GrantOperations)
}

/// A value of a list-of-strings flag: the string itself, or, as the aws CLI reads a value
/// that starts with `[`, a JSON list of strings.
fn string_list(arg: &str) -> Result<Vec<String>, String> {
    if !arg.trim_start().starts_with('[') {
        return Ok(vec![arg.to_string()]);
    }
    serde_json::from_str(arg).map_err(|e| format!("not a JSON list of strings: {e}"))
}

/// A JSON object whose values are all strings, such as an encryption context.
fn json_string_map(value: Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(object) = value else {
        return Err(format!("expected a JSON object of strings, found {value}"));
    };
    object
        .into_iter()
        .map(|(k, v)| match v {
            Value::String(v) => Ok((k, v)),
            other => Err(format!("the value of {k:?} must be a string, found {other}")),
        })
        .collect()
}

fn json_tag(value: &Value) -> Result<Tag, String> {
    let member = |name: &str| match value.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{name} must be a string, found {other}")),
        None => Err(format!("each tag needs {name}; expected {{\"TagKey\": .., \"TagValue\": ..}}")),
    };
    if !value.is_object() {
        return Err(format!("expected a tag object {{\"TagKey\": .., \"TagValue\": ..}}, found {value}"));
    }
    Ok(Tag { key: member("TagKey")?, value: member("TagValue")? })
}

/// Splits aws-style shorthand `k1=v1,k2=v2` into pairs, trimming blanks around keys and
/// values as the aws CLI does. Values may be empty; use JSON for values holding commas.
fn shorthand(arg: &str) -> Result<Vec<(String, String)>, String> {
    if arg.is_empty() {
        return Err("expected KEY=VALUE pairs separated by commas, or a JSON object".into());
    }
    arg.split(',')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("{pair:?} is not KEY=VALUE; expected KEY=VALUE pairs separated by commas, or JSON")),
        })
        .collect()
}

/// Shorthand `k1=v1,k2=v2` as a map; a key given twice is an error.
fn shorthand_map(arg: &str) -> Result<BTreeMap<String, String>, String> {
    let mut pairs = BTreeMap::new();
    for (k, v) in shorthand(arg)? {
        if pairs.insert(k.clone(), v).is_some() {
            return Err(format!("the key {k:?} is given twice"));
        }
    }
    Ok(pairs)
}

/// Splits shorthand at the commas outside braces: `A={k=v,l=w},B={}` is `A={k=v,l=w}` and
/// `B={}`.
fn top_level_items(arg: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in arg.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.checked_sub(1).ok_or_else(|| format!("unbalanced '}}' in {arg:?}"))?,
            ',' if depth == 0 => {
                items.push(arg[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unclosed '{{' in {arg:?}"));
    }
    items.push(arg[start..].trim());
    if items.iter().any(|item| item.is_empty()) {
        return Err(format!("empty item in {arg:?}; expected {CONSTRAINTS_SHORTHAND}"));
    }
    Ok(items)
}

fn read_file(path: &str) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut bytes = Vec::new();
    use std::io::Read;
    file.take(MAX_PARAM_FILE + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {path}: {e}"))?;
    if bytes.len() as u64 > MAX_PARAM_FILE {
        return Err(format!("{path} is larger than {MAX_PARAM_FILE} bytes"));
    }
    Ok(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        Context(EncryptionContext(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()))
    }

    #[test]
    fn blob_reads_base64_and_files() {
        assert_eq!(blob("aGVsbG8=").unwrap(), Blob(b"hello".to_vec()));
        assert_eq!(blob("aGVsbG8").unwrap(), Blob(b"hello".to_vec()), "padding optional");
        assert_eq!(blob("aGVsbG8=\n").unwrap(), Blob(b"hello".to_vec()));

        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&[0, 159, 146, 150, b'\n']).unwrap();
        let path = file.path().display();
        assert_eq!(blob(&format!("fileb://{path}")).unwrap().0, vec![0, 159, 146, 150, b'\n']);
        assert_eq!(blob(&format!("file://{path}")).unwrap().0, vec![0, 159, 146, 150, b'\n']);
    }

    #[test]
    fn blob_rejects_bad_base64_and_missing_files() {
        let err = blob("hello world!").unwrap_err();
        assert!(err.contains("base64") && err.contains("fileb://"), "{err}");
        let err = blob("fileb:///nonexistent/kmsctl-test").unwrap_err();
        assert!(err.contains("cannot read /nonexistent/kmsctl-test"), "{err}");
    }

    #[test]
    fn context_shorthand() {
        assert_eq!(context("a=1,b=2").unwrap(), ctx(&[("a", "1"), ("b", "2")]));
        assert_eq!(context(" a = 1 , b=").unwrap(), ctx(&[("a", "1"), ("b", "")]));
        assert_eq!(context("url=x=y").unwrap(), ctx(&[("url", "x=y")]));
        assert!(context("a=1,a=2").unwrap_err().contains("twice"));
        assert!(context("a").unwrap_err().contains("KEY=VALUE"));
        assert!(context("=1").unwrap_err().contains("KEY=VALUE"));
        assert!(context("").is_err());
    }

    #[test]
    fn context_json_and_file() {
        assert_eq!(
            context(r#"{"purpose": "a,b=c", "Dept": "IT"}"#).unwrap(),
            ctx(&[("purpose", "a,b=c"), ("Dept", "IT")])
        );
        assert!(context(r#"{"n": 1}"#).unwrap_err().contains("must be a string"));
        assert!(context(r#"{"n": "#).unwrap_err().contains("JSON"));

        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(br#"{"k": "v"}"#).unwrap();
        let arg = format!("file://{}", file.path().display());
        assert_eq!(context(&arg).unwrap(), ctx(&[("k", "v")]));
    }

    #[test]
    fn tags_shorthand_and_json() {
        let tag = |k: &str, v: &str| Tag { key: k.into(), value: v.into() };
        assert_eq!(tags("TagKey=env,TagValue=prod").unwrap(), TagList(vec![tag("env", "prod")]));
        assert_eq!(tags("TagValue=,TagKey=empty").unwrap(), TagList(vec![tag("empty", "")]));
        assert_eq!(
            tags(r#"[{"TagKey":"a","TagValue":"1"},{"TagKey":"b","TagValue":"2"}]"#).unwrap(),
            TagList(vec![tag("a", "1"), tag("b", "2")])
        );
        assert_eq!(tags(r#"{"TagKey":"a","TagValue":"1"}"#).unwrap(), TagList(vec![tag("a", "1")]));
        assert!(tags("TagKey=a").unwrap_err().contains("TagValue"));
        assert!(tags("Key=a,Value=b").unwrap_err().contains("unknown member"));
        assert!(tags(r#"[{"TagKey":"a"}]"#).unwrap_err().contains("TagValue"));
        assert!(tags(r#"[1]"#).is_err());
    }

    #[test]
    fn tag_keys_plain_and_json() {
        assert_eq!(tag_keys("env").unwrap(), TagKeys(vec!["env".into()]));
        assert_eq!(tag_keys(r#"["a", "b"]"#).unwrap(), TagKeys(vec!["a".into(), "b".into()]));
        assert!(tag_keys("[1]").is_err());
    }

    #[test]
    fn operations_plain_and_json() {
        assert_eq!(operations("Encrypt").unwrap(), GrantOperations(vec!["Encrypt".into()]));
        assert_eq!(
            operations(r#"["Encrypt", "Decrypt"]"#).unwrap(),
            GrantOperations(vec!["Encrypt".into(), "Decrypt".into()])
        );
        assert!(operations(r#"["Encrypt", 1]"#).unwrap_err().contains("JSON list of strings"));
        assert!(operations("[Encrypt").is_err());
    }

    #[test]
    fn constraints_shorthand() {
        let subset = |pairs: &[(&str, &str)]| GrantConstraints {
            encryption_context_subset: Some(ctx(pairs).0),
            encryption_context_equals: None,
        };
        assert_eq!(constraints("EncryptionContextSubset={a=1,b=2}").unwrap(), subset(&[("a", "1"), ("b", "2")]));
        assert_eq!(constraints(" EncryptionContextSubset = { a = 1 } ").unwrap(), subset(&[("a", "1")]));
        assert_eq!(
            constraints("EncryptionContextEquals={k=v},EncryptionContextSubset={}").unwrap(),
            GrantConstraints {
                encryption_context_subset: Some(EncryptionContext::default()),
                encryption_context_equals: Some(ctx(&[("k", "v")]).0),
            }
        );
        assert!(constraints("EncryptionContextSubset={a=1,a=2}").unwrap_err().contains("twice"));
        assert!(constraints("EncryptionContextSubset={a=1},EncryptionContextSubset={b=2}")
            .unwrap_err()
            .contains("twice"));
        assert!(constraints("EncryptionContextSubset=a=1").unwrap_err().contains("{KEY=VALUE,...}"));
        assert!(constraints("EncryptionContextSubset={a=1").unwrap_err().contains("unclosed"));
        assert!(constraints("EncryptionContextSubset={a=1}}").unwrap_err().contains("unbalanced"));
        assert!(constraints("Subset={a=1}").unwrap_err().contains("unknown member"));
        assert!(constraints("a=1,b=2").unwrap_err().contains("{KEY=VALUE,...}"));
        assert!(constraints("").is_err());
    }

    #[test]
    fn constraints_json_and_file() {
        assert_eq!(
            constraints(r#"{"EncryptionContextEquals": {"purpose": "a,b={c}"}}"#).unwrap(),
            GrantConstraints {
                encryption_context_subset: None,
                encryption_context_equals: Some(ctx(&[("purpose", "a,b={c}")]).0),
            }
        );
        assert!(constraints(r#"{"EncryptionContextSubset": {"n": 1}}"#).unwrap_err().contains("must be a string"));
        assert!(constraints(r#"{"EncryptionContextSubset": ["a"]}"#).unwrap_err().contains("JSON object"));
        assert!(constraints(r#"{"Other": {}}"#).unwrap_err().contains("unknown member"));
        assert!(constraints(r#"{"EncryptionContextSubset": "#).unwrap_err().contains("JSON"));

        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"EncryptionContextSubset={k=v}\n").unwrap();
        let arg = format!("file://{}", file.path().display());
        assert_eq!(constraints(&arg).unwrap().encryption_context_subset, Some(ctx(&[("k", "v")]).0));
    }

    #[test]
    fn timestamps_in_the_forms_the_aws_cli_reads() {
        const Y2030: i64 = 1_893_456_000_000_000;
        for arg in [
            "2030-01-01",
            "2030-01-01T00:00:00Z",
            "2030-01-01t00:00z",
            "2030-01-01 00:00:00",
            "2030-01-01T00:00:00.000000+00:00",
            "2030-01-01T01:30:00+01:30",
            "2030-01-01T01:30:00+0130",
            "2029-12-31T19:00:00-05",
            "1893456000",
            " 1893456000.0 ",
        ] {
            assert_eq!(timestamp(arg), Ok(Timestamp(Y2030)), "{arg}");
        }
        assert_eq!(timestamp("2030-01-01T00:00:00.123456789Z"), Ok(Timestamp(Y2030 + 123_456)));
        assert_eq!(timestamp("1893456000.5"), Ok(Timestamp(Y2030 + 500_000)));
        assert_eq!(timestamp("-1"), Ok(Timestamp(-1_000_000)));
    }

    #[test]
    fn timestamps_are_whole_seconds_on_the_wire_when_they_can_be() {
        assert_eq!(timestamp("2030-01-01").unwrap().to_wire(), serde_json::json!(1_893_456_000));
        assert_eq!(timestamp("2030-01-01T00:00:00.25Z").unwrap().to_wire(), serde_json::json!(1_893_456_000.25));
    }

    #[test]
    fn timestamps_reject_what_is_not_one() {
        for arg in [
            "",
            "tomorrow",
            "2030-02-30",
            "2030-1-01",
            "2030-01-01T",
            "2030-01-01T24:00:00Z",
            "2030-01-01T00:60Z",
            "2030-01-01T00:00:00+1",
            "2030-01-01T00:00:00+24:00",
            "2030-01-01T00:00:00.Z",
            "2030-01-01T00:00:00.1x",
            "2030-01-01T00Z",
            "1e400",
            "12-34",
        ] {
            let err = timestamp(arg).unwrap_err();
            assert!(err.contains("not a timestamp") && err.contains("ISO 8601"), "{arg}: {err}");
        }
    }

    #[test]
    fn text_reads_files() {
        assert_eq!(text("plain").unwrap(), "plain");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"{\"Version\": \"2012-10-17\"}").unwrap();
        let arg = format!("file://{}", file.path().display());
        assert_eq!(text(&arg).unwrap(), "{\"Version\": \"2012-10-17\"}");
    }
}
