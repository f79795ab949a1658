//! Rendering responses as the aws CLI does: JSON pretty-printed with four-space indentation
//! and members in the service model's order, or its tab-separated text format; timestamps
//! (epoch seconds on the wire) as ISO 8601. A public key can also be printed as PEM, which
//! the aws CLI cannot do but openssl needs.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};

use kmsfs_common::time::iso8601;

use crate::cli::OutputFormat;
use crate::model;

/// Members of timestamp type anywhere in the KMS service model.
const TIMESTAMP_MEMBERS: &[&str] = &[
    "CreationDate",
    "DeletionDate",
    "KeyCreationDate",
    "LastUpdatedDate",
    "NextRotationDate",
    "OnDemandRotationStartDate",
    "ParametersValidTo",
    "RotationDate",
    "Timestamp",
    "TrackingStartDate",
    "ValidTo",
];

/// Base64 characters per line of a PEM body (RFC 7468).
const PEM_LINE: usize = 64;

/// A DER SubjectPublicKeyInfo (GetPublicKey's `PublicKey`) as an RFC 7468 `PUBLIC KEY`
/// block, the form `openssl pkey -pubin` and `openssl dgst -verify` read.
pub fn public_key_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    // Base64 is ASCII, so every 64-byte chunk is a whole line of characters.
    for line in body.as_bytes().chunks(PEM_LINE) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

/// The text to print for `action`'s response. Empty responses print nothing, as with the
/// aws CLI. `--output pem` is refused before any call but get-public-key's, whose PEM
/// `main` renders with [`public_key_pem`]; here it falls back to JSON.
pub fn render(action: &str, response: &Value, format: OutputFormat) -> String {
    if response.as_object().is_some_and(Map::is_empty) || response.is_null() {
        return String::new();
    }
    let mut response = response.clone();
    convert_timestamps(&mut response);
    match format {
        OutputFormat::Json | OutputFormat::Pem => json(&response, model::output_members(action)),
        OutputFormat::Text => {
            let mut out = String::new();
            text(&mut out, &response, None, None);
            out
        }
        OutputFormat::Table => crate::table::render(action, &response),
    }
}

/// Replaces numeric timestamp members, at any depth, by their ISO 8601 form.
fn convert_timestamps(value: &mut Value) {
    match value {
        Value::Object(members) => {
            for (name, member) in members.iter_mut() {
                match member.as_f64() {
                    Some(seconds) if TIMESTAMP_MEMBERS.contains(&name.as_str()) => {
                        *member = Value::String(iso8601(seconds));
                    }
                    _ => convert_timestamps(member),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(convert_timestamps),
        _ => {}
    }
}

/// JSON as Python's `json.dumps(indent=4)` writes it, members of known structures in
/// `order` (then any others, sorted).
fn json(value: &Value, order: &[&str]) -> String {
    let mut out = String::new();
    write_json(&mut out, value, order, 0);
    out.push('\n');
    out
}

fn write_json(out: &mut String, value: &Value, order: &[&str], depth: usize) {
    match value {
        Value::Object(members) if !members.is_empty() => {
            out.push('{');
            for (i, (name, member)) in in_order(members, order).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                new_line(out, depth + 1);
                out.push_str(&Value::String(name.clone()).to_string());
                out.push_str(": ");
                write_json(out, member, model::nested_members(name), depth + 1);
            }
            new_line(out, depth);
            out.push('}');
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                new_line(out, depth + 1);
                write_json(out, item, order, depth + 1);
            }
            new_line(out, depth);
            out.push(']');
        }
        // Scalars, `{}` and `[]`; `Value`'s `Display` escapes strings as JSON.
        other => out.push_str(&other.to_string()),
    }
}

fn new_line(out: &mut String, depth: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n("    ", depth));
}

/// An object's members: those named in `order` first, in that order, then the rest sorted.
fn in_order<'a>(members: &'a Map<String, Value>, order: &[&str]) -> Vec<(&'a String, &'a Value)> {
    let mut ordered: Vec<_> = order.iter().filter_map(|name| members.get_key_value(*name)).collect();
    ordered.extend(members.iter().filter(|(name, _)| !order.contains(&name.as_str())));
    ordered
}

/// The aws CLI's text format (awscli `text.py`): a structure's scalar members on one line,
/// tab-separated in key order and prefixed by the upper-cased member name it came from;
/// its nested structures and lists on following lines, each under its own member name.
/// Objects in one list share their columns: the union of their scalar keys.
fn text(out: &mut String, value: &Value, identifier: Option<&str>, columns: Option<&[String]>) {
    match value {
        Value::Object(members) => text_object(out, members, identifier, columns),
        Value::Array(items) => text_list(out, items, identifier),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

fn text_object(out: &mut String, members: &Map<String, Value>, identifier: Option<&str>, columns: Option<&[String]>) {
    let mut scalars = Vec::new();
    let mut nested = Vec::new();
    match columns {
        None => {
            for (name, member) in members {
                if is_scalar(member) {
                    scalars.push(scalar_text(member));
                } else {
                    nested.push((name, member));
                }
            }
        }
        Some(columns) => {
            for name in columns {
                scalars.push(members.get(name).map(scalar_text).unwrap_or_default());
            }
            nested.extend(members.iter().filter(|(name, _)| !columns.contains(name)));
        }
    }
    if !scalars.is_empty() {
        if let Some(identifier) = identifier {
            scalars.insert(0, identifier.to_uppercase());
        }
        out.push_str(&scalars.join("\t"));
        out.push('\n');
    }
    for (name, member) in nested {
        text(out, member, Some(name), None);
    }
}

fn text_list(out: &mut String, items: &[Value], identifier: Option<&str>) {
    if items.iter().any(Value::is_object) {
        let mut columns: Vec<String> = items
            .iter()
            .filter_map(Value::as_object)
            .flat_map(|members| members.iter().filter(|(_, v)| is_scalar(v)).map(|(k, _)| k.clone()))
            .collect();
        columns.sort();
        columns.dedup();
        for item in items {
            text(out, item, identifier, Some(&columns));
        }
    } else {
        let (scalars, nested): (Vec<&Value>, Vec<&Value>) = items.iter().partition(|v| is_scalar(v));
        if !scalars.is_empty() {
            match identifier {
                Some(identifier) => {
                    let identifier = identifier.to_uppercase();
                    for item in scalars {
                        out.push_str(&format!("{identifier}\t{}\n", scalar_text(item)));
                    }
                }
                None => {
                    let line: Vec<String> = scalars.into_iter().map(scalar_text).collect();
                    out.push_str(&line.join("\t"));
                    out.push('\n');
                }
            }
        }
        for item in nested {
            text(out, item, identifier, None);
        }
    }
}

/// Whether `value` is neither an object nor a list.
pub(crate) fn is_scalar(value: &Value) -> bool {
    !(value.is_object() || value.is_array())
}

/// A scalar as Python's `str()` prints it, which is what the aws CLI's text and table
/// outputs show.
pub(crate) fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_converts_timestamps_at_any_depth_and_indents_by_four() {
        let response = json!({
            "KeyMetadata": {
                "KeyId": "k",
                "CreationDate": 1_700_000_000.123,
                "DeletionDate": 0,
                "ValidTo": 951_782_400.5,
                "PendingDeletionWindowInDays": 7,
            },
            "Aliases": [{"AliasName": "alias/a", "LastUpdatedDate": 1_700_000_000}],
        });
        let out = render("UnknownAction", &response, OutputFormat::Json);
        let expected = r#"{
    "Aliases": [
        {
            "AliasName": "alias/a",
            "LastUpdatedDate": "2023-11-14T22:13:20.000000+00:00"
        }
    ],
    "KeyMetadata": {
        "KeyId": "k",
        "CreationDate": "2023-11-14T22:13:20.123000+00:00",
        "DeletionDate": "1970-01-01T00:00:00.000000+00:00",
        "ValidTo": "2000-02-29T00:00:00.500000+00:00",
        "PendingDeletionWindowInDays": 7
    }
}
"#;
        assert_eq!(out, expected);
    }

    #[test]
    fn json_members_follow_the_model_then_sort() {
        let response = json!({
            "KeyId": "arn:k",
            "Zeta": {"b": [], "a": {}},
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "CiphertextBlob": "AQID",
            "Extra": "x\"y",
        });
        let expected = r#"{
    "CiphertextBlob": "AQID",
    "KeyId": "arn:k",
    "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    "Extra": "x\"y",
    "Zeta": {
        "a": {},
        "b": []
    }
}
"#;
        assert_eq!(render("Encrypt", &response, OutputFormat::Json), expected);
    }

    #[test]
    fn grants_follow_the_model_with_iso_dates() {
        let response = json!({
            "Truncated": false,
            "Grants": [{
                "Operations": ["Decrypt", "Encrypt"],
                "IssuingAccount": "arn:aws:iam::111122223333:root",
                "GranteePrincipal": "arn:aws:iam::111122223333:user/a",
                "CreationDate": 1_700_000_000,
                "Constraints": {"EncryptionContextEquals": {"b": "2", "a": "1"}, "EncryptionContextSubset": {}},
                "GrantId": "g",
                "KeyId": "arn:k",
            }],
        });
        let expected = r#"{
    "Grants": [
        {
            "KeyId": "arn:k",
            "GrantId": "g",
            "CreationDate": "2023-11-14T22:13:20.000000+00:00",
            "GranteePrincipal": "arn:aws:iam::111122223333:user/a",
            "IssuingAccount": "arn:aws:iam::111122223333:root",
            "Operations": [
                "Decrypt",
                "Encrypt"
            ],
            "Constraints": {
                "EncryptionContextSubset": {},
                "EncryptionContextEquals": {
                    "a": "1",
                    "b": "2"
                }
            }
        }
    ],
    "Truncated": false
}
"#;
        assert_eq!(render("ListGrants", &response, OutputFormat::Json), expected);
    }

    #[test]
    fn key_policy_text_is_the_document_then_its_name() {
        let policy = "{\n  \"Version\": \"2012-10-17\"\n}";
        let response = json!({"PolicyName": "default", "Policy": policy});
        assert_eq!(render("GetKeyPolicy", &response, OutputFormat::Text), format!("{policy}\tdefault\n"));
        let expected = r#"{
    "Policy": "{\n  \"Version\": \"2012-10-17\"\n}",
    "PolicyName": "default"
}
"#;
        assert_eq!(render("GetKeyPolicy", &response, OutputFormat::Json), expected);
    }

    #[test]
    fn every_timestamp_member_of_the_model_is_converted() {
        let model = model::service_model();
        let shapes = model["shapes"].as_object().unwrap();
        let mut missing = Vec::new();
        for shape in shapes.values() {
            for (name, member) in shape["members"].as_object().into_iter().flatten() {
                let target = &shapes[member["shape"].as_str().unwrap()];
                if target["type"] == "timestamp" && !TIMESTAMP_MEMBERS.contains(&name.as_str()) {
                    missing.push(name.clone());
                }
            }
        }
        assert!(missing.is_empty(), "timestamp members printed as numbers: {missing:?}");
    }

    #[test]
    fn rotation_and_usage_dates_print_as_iso_8601_in_model_order() {
        let response = json!({
            "Truncated": false,
            "Rotations": [{
                "RotationType": "ON_DEMAND",
                "RotationDate": 1_700_000_000,
                "KeyMaterialState": "CURRENT",
                "KeyMaterialId": "m",
                "KeyId": "arn:k",
            }],
        });
        let expected = r#"{
    "Rotations": [
        {
            "KeyId": "arn:k",
            "KeyMaterialId": "m",
            "KeyMaterialState": "CURRENT",
            "RotationDate": "2023-11-14T22:13:20.000000+00:00",
            "RotationType": "ON_DEMAND"
        }
    ],
    "Truncated": false
}
"#;
        assert_eq!(render("ListKeyRotations", &response, OutputFormat::Json), expected);
        let response = json!({
            "KeyCreationDate": 1_700_000_000,
            "TrackingStartDate": 1_700_000_000,
            "KeyLastUsage": {"KmsRequestId": "r", "Timestamp": 1_700_000_001.5, "Operation": "Encrypt"},
            "KeyId": "arn:k",
        });
        let expected = r#"{
    "KeyId": "arn:k",
    "KeyLastUsage": {
        "Operation": "Encrypt",
        "Timestamp": "2023-11-14T22:13:21.500000+00:00",
        "KmsRequestId": "r"
    },
    "TrackingStartDate": "2023-11-14T22:13:20.000000+00:00",
    "KeyCreationDate": "2023-11-14T22:13:20.000000+00:00"
}
"#;
        assert_eq!(render("GetKeyLastUsage", &response, OutputFormat::Json), expected);
    }

    #[test]
    fn import_parameters_text_is_one_line_of_sorted_columns() {
        let response = json!({
            "KeyId": "arn:k",
            "ImportToken": "AQID",
            "PublicKey": "MIIB",
            "ParametersValidTo": 1_700_000_000,
        });
        assert_eq!(
            render("GetParametersForImport", &response, OutputFormat::Text),
            "AQID\tarn:k\t2023-11-14T22:13:20.000000+00:00\tMIIB\n"
        );
        let json = render("GetParametersForImport", &response, OutputFormat::Json);
        let order: Vec<usize> =
            ["KeyId", "ImportToken", "PublicKey", "ParametersValidTo"].iter().map(|m| json.find(m).unwrap()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{json}");
    }

    #[test]
    fn custom_key_stores_follow_the_model() {
        let response = json!({
            "Truncated": false,
            "CustomKeyStores": [{
                "CustomKeyStoreType": "AWS_CLOUDHSM",
                "CreationDate": 1_700_000_000,
                "ConnectionState": "FAILED",
                "ConnectionErrorCode": "INVALID_CREDENTIALS",
                "CloudHsmClusterId": "cluster-abcdefghijk",
                "CustomKeyStoreName": "store",
                "CustomKeyStoreId": "cks-1",
            }],
        });
        let expected = r#"{
    "CustomKeyStores": [
        {
            "CustomKeyStoreId": "cks-1",
            "CustomKeyStoreName": "store",
            "CloudHsmClusterId": "cluster-abcdefghijk",
            "ConnectionState": "FAILED",
            "ConnectionErrorCode": "INVALID_CREDENTIALS",
            "CreationDate": "2023-11-14T22:13:20.000000+00:00",
            "CustomKeyStoreType": "AWS_CLOUDHSM"
        }
    ],
    "Truncated": false
}
"#;
        assert_eq!(render("DescribeCustomKeyStores", &response, OutputFormat::Json), expected);
        assert_eq!(
            render("DescribeCustomKeyStores", &response, OutputFormat::Text),
            "False\nCUSTOMKEYSTORES\tcluster-abcdefghijk\tINVALID_CREDENTIALS\tFAILED\t\
             2023-11-14T22:13:20.000000+00:00\tcks-1\tstore\tAWS_CLOUDHSM\n"
        );
    }

    #[test]
    fn public_keys_print_as_pem_in_64_character_lines() {
        let der: Vec<u8> = (0..91u8).collect();
        let pem = public_key_pem(&der);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.first(), Some(&"-----BEGIN PUBLIC KEY-----"));
        assert_eq!(lines.last(), Some(&"-----END PUBLIC KEY-----"));
        let body = &lines[1..lines.len() - 1];
        assert_eq!(body.iter().map(|l| l.len()).collect::<Vec<_>>(), vec![64, 60], "{pem}");
        assert_eq!(STANDARD.decode(body.concat()).unwrap(), der);
        assert!(pem.ends_with("-----END PUBLIC KEY-----\n"));
        assert_eq!(public_key_pem(&[0; 48]).lines().count(), 3, "exactly one full line, no empty one");
    }

    #[test]
    fn signing_responses_follow_the_model() {
        let response = json!({
            "SigningAlgorithms": ["ECDSA_SHA_256"],
            "KeyUsage": "SIGN_VERIFY",
            "KeySpec": "ECC_NIST_P256",
            "CustomerMasterKeySpec": "ECC_NIST_P256",
            "PublicKey": "MFkw",
            "KeyId": "arn:k",
        });
        let expected = r#"{
    "KeyId": "arn:k",
    "PublicKey": "MFkw",
    "CustomerMasterKeySpec": "ECC_NIST_P256",
    "KeySpec": "ECC_NIST_P256",
    "KeyUsage": "SIGN_VERIFY",
    "SigningAlgorithms": [
        "ECDSA_SHA_256"
    ]
}
"#;
        assert_eq!(render("GetPublicKey", &response, OutputFormat::Json), expected);
        assert_eq!(
            render("GetPublicKey", &response, OutputFormat::Text),
            "ECC_NIST_P256\tarn:k\tECC_NIST_P256\tSIGN_VERIFY\tMFkw\nSIGNINGALGORITHMS\tECDSA_SHA_256\n"
        );
        let mac = json!({"KeyId": "arn:k", "MacAlgorithm": "HMAC_SHA_256", "Mac": "AQID"});
        let expected =
            "{\n    \"Mac\": \"AQID\",\n    \"MacAlgorithm\": \"HMAC_SHA_256\",\n    \"KeyId\": \"arn:k\"\n}\n";
        assert_eq!(render("GenerateMac", &mac, OutputFormat::Json), expected);
        let verified = json!({"SigningAlgorithm": "ECDSA_SHA_256", "SignatureValid": true, "KeyId": "arn:k"});
        assert_eq!(render("Verify", &verified, OutputFormat::Text), "arn:k\tTrue\tECDSA_SHA_256\n");
    }

    #[test]
    fn timestamps_already_strings_are_left_alone() {
        let out = render("ListAliases", &json!({"CreationDate": "yesterday"}), OutputFormat::Json);
        assert!(out.contains("\"yesterday\""), "{out}");
    }

    #[test]
    fn empty_responses_print_nothing() {
        assert_eq!(render("EnableKey", &json!({}), OutputFormat::Json), "");
        assert_eq!(render("EnableKey", &json!({}), OutputFormat::Text), "");
    }

    #[test]
    fn text_lists_of_objects_are_prefixed_rows() {
        let response = json!({
            "Keys": [
                {"KeyId": "1", "KeyArn": "arn:1"},
                {"KeyId": "2", "KeyArn": "arn:2"},
            ],
        });
        assert_eq!(render("ListKeys", &response, OutputFormat::Text), "KEYS\tarn:1\t1\nKEYS\tarn:2\t2\n");
    }

    #[test]
    fn text_rows_share_columns_across_a_list() {
        let response = json!({
            "Aliases": [
                {"AliasName": "alias/a", "TargetKeyId": "k"},
                {"AliasName": "alias/aws/s3"},
            ],
        });
        assert_eq!(render("ListKeys", &response, OutputFormat::Text), "ALIASES\talias/a\tk\nALIASES\talias/aws/s3\t\n");
    }

    #[test]
    fn text_nested_structures_and_scalar_lists() {
        let response = json!({
            "KeyMetadata": {
                "KeyId": "k",
                "Enabled": true,
                "CreationDate": 0,
                "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT", "X"],
            },
            "Truncated": false,
        });
        assert_eq!(
            render("ListKeys", &response, OutputFormat::Text),
            "False\n\
             KEYMETADATA\t1970-01-01T00:00:00.000000+00:00\tTrue\tk\n\
             ENCRYPTIONALGORITHMS\tSYMMETRIC_DEFAULT\n\
             ENCRYPTIONALGORITHMS\tX\n"
        );
    }

    #[test]
    fn text_top_level_scalars_and_blobs() {
        let response = json!({
            "CiphertextBlob": "AQID",
            "KeyId": "arn:k",
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        });
        assert_eq!(render("ListKeys", &response, OutputFormat::Text), "AQID\tSYMMETRIC_DEFAULT\tarn:k\n");
        assert_eq!(render("X", &json!(["a", "b"]), OutputFormat::Text), "a\tb\n");
    }
}
