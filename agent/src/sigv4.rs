//! AWS Signature Version 4 verification, as a service does it: who signed a request on the
//! TCP listener, given the agent's access keys. Pure: the request, the expected scope, the
//! current time and a lookup of secrets go in; the signer's key (or the reason it is not
//! accepted, in AWS's error codes) comes out.
//!
//! Checked, in AWS's order: an `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=...,
//! Signature=...` header is present and complete; `X-Amz-Date` is there; `host` is signed; the
//! access key is known; the credential scope is `<date>/<agent's region>/<service>/aws4_request`
//! with the date of `X-Amz-Date`; the request time is within [`MAX_SKEW_SECONDS`] of now; and
//! the signature over the canonical request (method, canonical URI, sorted query, the signed
//! headers, the SHA-256 of the body) matches, compared in constant time (`hmac`'s
//! `verify_slice`). An `X-Amz-Content-Sha256` header must equal the body's hash: the body is
//! always hashed here, never taken on the client's word.
//!
//! # Why not a crate
//!
//! `aws-sigv4` (AWS's own) signs but exposes no verifier, and brings the smithy runtime
//! (`aws-smithy-runtime-api`, `aws-smithy-http`, `aws-credential-types`, `time`, ...) for it.
//! `scratchstack-aws-signature` verifies, but as a tower service over `http` 1 bodies with
//! `chrono`, async traits and its own principal model: larger than the ~200 lines here, which
//! reuse the `hmac` and `sha2` the workspace already has. The result is checked against AWS's
//! published test-suite vectors and against requests botocore signs (`tests/tests/sigv4.rs`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// How far a request's `X-Amz-Date` may be from the agent's clock, either way, as in AWS.
pub const MAX_SKEW_SECONDS: i64 = 15 * 60;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// A request as received: what the signature covers.
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent, percent-encoded (`/`).
    pub path: &'a str,
    /// The query string as sent, without `?` (often empty).
    pub query: &'a str,
    /// Header names (any case) and values, in the order received; repeated names allowed.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

/// What a signature must be scoped to.
pub struct Expect<'a> {
    pub region: &'a str,
    /// `kms` or `sts`.
    pub service: &'a str,
}

/// A credential the verifier can check a signature with.
pub trait Secret {
    /// The secret access key's bytes.
    fn secret_access_key(&self) -> &[u8];
}

impl<T: Secret + ?Sized> Secret for std::sync::Arc<T> {
    fn secret_access_key(&self) -> &[u8] {
        T::secret_access_key(self)
    }
}

/// Why a request's signature is not accepted. [`SigError::json_code`] and
/// [`SigError::query_code`] are AWS's error codes for JSON and query (STS) services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigError {
    /// No `Authorization` header at all.
    Missing,
    /// A header that is there but not a complete SigV4 authorization.
    Incomplete(String),
    /// The access key ID is not one of the agent's.
    UnknownAccessKey,
    /// The signature does not verify, or the scope is not this agent's.
    Invalid(String),
}

/// AWS's message for a signature that does not verify.
pub const MISMATCH_MESSAGE: &str = "The request signature we calculated does not match the signature you provided. \
     Check your AWS Secret Access Key and signing method. Consult the service documentation for details.";

/// AWS's message for an unknown access key.
pub const UNKNOWN_KEY_MESSAGE: &str = "The security token included in the request is invalid.";

impl SigError {
    /// The `__type` a JSON 1.1 service (KMS) answers with.
    pub fn json_code(&self) -> &'static str {
        match self {
            SigError::Missing => "MissingAuthenticationTokenException",
            SigError::Incomplete(_) => "IncompleteSignatureException",
            SigError::UnknownAccessKey => "UnrecognizedClientException",
            SigError::Invalid(_) => "InvalidSignatureException",
        }
    }

    /// The `<Code>` a query service (STS) answers with.
    pub fn query_code(&self) -> &'static str {
        match self {
            SigError::Missing => "MissingAuthenticationToken",
            SigError::Incomplete(_) => "IncompleteSignature",
            SigError::UnknownAccessKey => "InvalidClientTokenId",
            SigError::Invalid(_) => "SignatureDoesNotMatch",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            SigError::Missing => "Missing Authentication Token",
            SigError::Incomplete(m) | SigError::Invalid(m) => m,
            SigError::UnknownAccessKey => UNKNOWN_KEY_MESSAGE,
        }
    }
}

/// The parts of an `Authorization` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(header: &str) -> Result<Authorization<'_>, SigError> {
    let Some(params) = header.strip_prefix(ALGORITHM).filter(|rest| rest.starts_with(' ')) else {
        let algorithm = header.split_whitespace().next().unwrap_or("");
        return Err(SigError::Incomplete(format!(
            "Unsupported AWS 'algorithm': '{algorithm}'; kmsd accepts only {ALGORITHM} in the Authorization header"
        )));
    };
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in params.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let mut missing = Vec::new();
    for (name, value) in [("Credential", credential), ("Signature", signature), ("SignedHeaders", signed)] {
        if value.is_none_or(str::is_empty) {
            missing.push(format!("Authorization header requires '{name}' parameter."));
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(SigError::Incomplete(missing.join(" ")));
    };
    if !missing.is_empty() {
        return Err(SigError::Incomplete(missing.join(" ")));
    }
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts[..] else {
        return Err(SigError::Incomplete(format!(
            "Credential '{credential}' is not of the form <AccessKeyId>/<date>/<region>/<service>/aws4_request"
        )));
    };
    if terminator != "aws4_request" {
        return Err(SigError::Invalid(format!(
            "Credential should be scoped with a valid terminator: 'aws4_request', not '{terminator}'."
        )));
    }
    Ok(Authorization { access_key_id, date, region, service, signed_headers: signed.split(';').collect(), signature })
}

/// Verifies `request`'s signature at `now` (epoch seconds): returns the signer's credential
/// as `lookup` gives it for the access key ID.
pub fn verify<'k, K: Secret + ?Sized>(
    request: &Request<'_>,
    expect: &Expect<'_>,
    now: i64,
    lookup: impl FnOnce(&str) -> Option<&'k K>,
) -> Result<&'k K, SigError> {
    let header = |name: &str| -> Option<String> {
        let values: Vec<&str> =
            request.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect();
        (!values.is_empty()).then(|| values.iter().map(|v| canonical_value(v)).collect::<Vec<_>>().join(","))
    };
    let authorization = header("authorization").ok_or(SigError::Missing)?;
    let auth = parse_authorization(&authorization)?;
    let amz_date = header("x-amz-date").ok_or_else(|| {
        SigError::Incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.".into(),
        )
    })?;
    if !auth.signed_headers.contains(&"host") {
        return Err(SigError::Incomplete("'Host' must be a 'SignedHeader' in the AWS Authorization.".into()));
    }
    let key = lookup(auth.access_key_id).ok_or(SigError::UnknownAccessKey)?;
    if auth.region != expect.region {
        return Err(SigError::Invalid(format!(
            "Credential should be scoped to a valid region, not '{}'. This agent's region is '{}'.",
            auth.region, expect.region
        )));
    }
    if auth.service != expect.service {
        return Err(SigError::Invalid(format!(
            "Credential should be scoped to correct service: '{}'.",
            expect.service
        )));
    }
    let signed_at = parse_amz_date(&amz_date).ok_or_else(|| {
        SigError::Incomplete(format!(
            "X-Amz-Date '{amz_date}' is not an ISO 8601 basic date-time (YYYYMMDD'T'HHMMSS'Z')"
        ))
    })?;
    if amz_date.get(..8) != Some(auth.date) {
        return Err(SigError::Invalid(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{amz_date}'.",
            auth.date,
            amz_date.get(..8).unwrap_or("")
        )));
    }
    check_skew(signed_at, now)?;

    let payload_hash = hex(&Sha256::digest(request.body));
    if let Some(claimed) = header("x-amz-content-sha256") {
        if claimed != payload_hash {
            return Err(SigError::Invalid(
                "The provided 'x-amz-content-sha256' header does not match what was computed.".into(),
            ));
        }
    }
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
        canonical_headers.push_str(&name.to_ascii_lowercase());
        canonical_headers.push(':');
        canonical_headers.push_str(&header(name).unwrap_or_default());
        canonical_headers.push('\n');
    }
    let canonical_request = [
        request.method,
        &canonical_uri(request.path),
        &canonical_query(request.query),
        &canonical_headers,
        &auth.signed_headers.join(";"),
        &payload_hash,
    ]
    .join("\n");
    let scope = format!("{}/{}/{}/aws4_request", auth.date, auth.region, auth.service);
    let string_to_sign =
        format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
    let provided = unhex(auth.signature).ok_or_else(|| SigError::Invalid(MISMATCH_MESSAGE.into()))?;
    let signing_key = signing_key(key.secret_access_key(), auth.date, auth.region, auth.service);
    let mut mac = hmac_sha256(&signing_key);
    mac.update(string_to_sign.as_bytes());
    mac.verify_slice(&provided).map_err(|_| SigError::Invalid(MISMATCH_MESSAGE.into()))?;
    Ok(key)
}

/// AWS's wording for a request time outside the window.
fn check_skew(signed_at: i64, now: i64) -> Result<(), SigError> {
    if signed_at < now - MAX_SKEW_SECONDS {
        return Err(SigError::Invalid(format!(
            "Signature expired: {} is now earlier than {} ({} - 15 min.)",
            amz_date(signed_at),
            amz_date(now - MAX_SKEW_SECONDS),
            amz_date(now)
        )));
    }
    if signed_at > now + MAX_SKEW_SECONDS {
        return Err(SigError::Invalid(format!(
            "Signature not yet current: {} is still later than {} ({} + 15 min.)",
            amz_date(signed_at),
            amz_date(now + MAX_SKEW_SECONDS),
            amz_date(now)
        )));
    }
    Ok(())
}

fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; the error case cannot occur.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

fn hmac_step(key: &[u8], data: &str) -> Zeroizing<Vec<u8>> {
    let mut mac = hmac_sha256(key);
    mac.update(data.as_bytes());
    Zeroizing::new(mac.finalize().into_bytes().to_vec())
}

/// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
fn signing_key(secret: &[u8], date: &str, region: &str, service: &str) -> Zeroizing<Vec<u8>> {
    let mut first = Zeroizing::new(b"AWS4".to_vec());
    first.extend_from_slice(secret);
    let k_date = hmac_step(&first, date);
    let k_region = hmac_step(&k_date, region);
    let k_service = hmac_step(&k_region, service);
    hmac_step(&k_service, "aws4_request")
}

/// A header value as signed: surrounding spaces trimmed, inner runs of spaces collapsed.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The path with `.` and `..` segments resolved, each segment percent-encoded again (the
/// double encoding every service but S3 uses).
fn canonical_uri(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/').skip(1) {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let encoded: Vec<String> = segments.iter().map(|s| uri_encode(s.as_bytes())).collect();
    format!("/{}", encoded.join("/"))
}

/// Query parameters decoded, re-encoded strictly, sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (name, value) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(&percent_decode(name)), uri_encode(&percent_decode(value)))
        })
        .collect();
    pairs.sort();
    pairs.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("&")
}

/// RFC 3986 encoding of everything but the unreserved characters, with upper-case hex.
fn uri_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` sequences to bytes; anything else (a stray `%` included) as is.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// `YYYYMMDDTHHMMSSZ` to epoch seconds.
fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = s.get(range)?;
        digits.bytes().all(|c| c.is_ascii_digit()).then(|| digits.parse().ok()).flatten()
    };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some(kmsfs_common::time::days_from_civil(y, m as u32, d as u32) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Epoch seconds to `YYYYMMDDTHHMMSSZ`.
pub fn amz_date(epoch: i64) -> String {
    let (y, m, d) = kmsfs_common::time::civil_from_days(epoch.div_euclid(86_400));
    let rem = epoch.rem_euclid(86_400);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// A client's credentials and scope, for [`sign`].
pub struct Signer<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a [u8],
    pub region: &'a str,
    pub service: &'a str,
}

/// Signs a request as an AWS SDK does, for kmsd's own calls to peer agents: returns the
/// `X-Amz-Date` and `Authorization` header values. Every header in `headers` (which must
/// include `host`) is signed, and the body's SHA-256 is the payload hash.
pub fn sign(request: &Request<'_>, signer: &Signer<'_>, now: i64) -> (String, String) {
    let amz_date = amz_date(now);
    let date = &amz_date[..8];
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), canonical_value(v)))
        .chain(std::iter::once(("x-amz-date".to_string(), amz_date.clone())))
        .collect();
    headers.sort();
    let signed_headers = headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(";");
    let canonical_headers: String = headers.iter().map(|(n, v)| format!("{n}:{v}\n")).collect();
    let canonical_request = [
        request.method,
        &canonical_uri(request.path),
        &canonical_query(request.query),
        &canonical_headers,
        &signed_headers,
        &hex(&Sha256::digest(request.body)),
    ]
    .join("\n");
    let scope = format!("{date}/{}/{}/aws4_request", signer.region, signer.service);
    let string_to_sign =
        format!("{ALGORITHM}\n{amz_date}\n{scope}\n{}", hex(&Sha256::digest(canonical_request.as_bytes())));
    let mut mac = hmac_sha256(&signing_key(signer.secret_access_key, date, signer.region, signer.service));
    mac.update(string_to_sign.as_bytes());
    let signature = hex(&mac.finalize().into_bytes());
    let authorization = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        signer.access_key_id
    );
    (amz_date, authorization)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_sign_signs_verifies_and_nothing_else_does() {
        let now = 1_800_000_000;
        let headers = vec![
            ("Host".to_string(), "10.0.0.2:4566".to_string()),
            ("Content-Type".to_string(), "application/x-amz-json-1.1".to_string()),
            ("X-Amz-Target".to_string(), "TrentService.ListKeys".to_string()),
        ];
        let body = br#"{"Limit": 1}"#;
        let request = Request { method: "POST", path: "/", query: "", headers: &headers, body };
        let signer = Signer {
            access_key_id: SUITE_KEY_ID,
            secret_access_key: SUITE_SECRET.as_bytes(),
            region: "region-b",
            service: "kms",
        };
        let (date, authorization) = sign(&request, &signer, now);
        let mut signed = headers.clone();
        signed.push(("X-Amz-Date".to_string(), date));
        signed.push(("Authorization".to_string(), authorization));
        let key = Key(SUITE_SECRET);
        let expect = Expect { region: "region-b", service: "kms" };
        let lookup = |id: &str| (id == SUITE_KEY_ID).then_some(&key);
        let received = Request { method: "POST", path: "/", query: "", headers: &signed, body };
        assert!(verify(&received, &expect, now, lookup).is_ok());
        let tampered = Request { body: br#"{"Limit": 2}"#, ..received };
        assert!(verify(&tampered, &expect, now, lookup).is_err(), "the body is signed");
        let elsewhere = Expect { region: "region-a", service: "kms" };
        assert!(verify(&received, &elsewhere, now, lookup).is_err(), "the region is signed");
    }

    /// The AWS SigV4 test suite's credentials and time.
    const SUITE_KEY_ID: &str = "AKIDEXAMPLE";
    const SUITE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const SUITE_DATE: &str = "20150830T123600Z";
    const SUITE_SCOPE: &str = "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";

    struct Key(&'static str);
    impl Secret for Key {
        fn secret_access_key(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    static SUITE: Key = Key(SUITE_SECRET);

    fn suite_now() -> i64 {
        parse_amz_date(SUITE_DATE).expect("date")
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn authz(signed: &str, signature: &str) -> String {
        format!("AWS4-HMAC-SHA256 Credential={SUITE_SCOPE}, SignedHeaders={signed}, Signature={signature}")
    }

    fn check(
        method: &str,
        path: &str,
        query: &str,
        extra: &[(&str, &str)],
        body: &[u8],
        authorization: &str,
        now: i64,
    ) -> Result<(), SigError> {
        let mut h = headers(&[("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE)]);
        h.extend(headers(extra));
        h.push(("Authorization".into(), authorization.into()));
        let request = Request { method, path, query, headers: &h, body };
        let expect = Expect { region: "us-east-1", service: "service" };
        verify(&request, &expect, now, |id| (id == SUITE_KEY_ID).then_some(&SUITE)).map(|_| ())
    }

    /// (name, method, query, extra headers, body, signed headers, signature) from AWS's
    /// Signature Version 4 test suite.
    type Vector = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static [u8],
        &'static str,
        &'static str,
    );
    const VECTORS: &[Vector] = &[
        (
            "get-vanilla",
            "GET",
            "",
            &[],
            b"",
            "host;x-amz-date",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "post-vanilla",
            "POST",
            "",
            &[],
            b"",
            "host;x-amz-date",
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        ),
        (
            "get-vanilla-query-order-key-case",
            "GET",
            "Param2=value2&Param1=value1",
            &[],
            b"",
            "host;x-amz-date",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "post-vanilla-query",
            "POST",
            "Param1=value1",
            &[],
            b"",
            "host;x-amz-date",
            "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
        ),
        (
            "post-header-value-case",
            "POST",
            "",
            &[("My-Header1", "VALUE1")],
            b"",
            "host;my-header1;x-amz-date",
            "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
        ),
        (
            "get-header-value-trim",
            "GET",
            "",
            &[("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")],
            b"",
            "host;my-header1;my-header2;x-amz-date",
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        ),
        (
            "post-x-www-form-urlencoded",
            "POST",
            "",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"Param1=value1",
            "content-type;host;x-amz-date",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        ),
    ];

    #[test]
    fn aws_test_suite_vectors_verify() {
        for (name, method, query, extra, body, signed, signature) in VECTORS {
            let result = check(method, "/", query, extra, body, &authz(signed, signature), suite_now());
            assert_eq!(result, Ok(()), "{name}");
        }
    }

    #[test]
    fn the_suite_canonical_request_hashes_as_published() {
        // get-vanilla's string to sign carries this hash of its canonical request.
        let creq = "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n\
                    e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            hex(&Sha256::digest(creq.as_bytes())),
            "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
        assert_eq!(canonical_query("Param2=value2&Param1=value1"), "Param1=value1&Param2=value2");
        assert_eq!(canonical_uri("/example%20space/"), "/example%2520space/");
        assert_eq!(canonical_uri("/example/../"), "/");
        assert_eq!(canonical_uri(""), "/");
    }

    fn form_case() -> (&'static [(&'static str, &'static str)], &'static [u8], String) {
        let (_, _, _, extra, body, signed, signature) = VECTORS[6];
        (extra, body, authz(signed, signature))
    }

    fn is_mismatch(r: Result<(), SigError>) -> bool {
        r == Err(SigError::Invalid(MISMATCH_MESSAGE.into()))
    }

    #[test]
    fn tampering_with_body_header_method_or_query_fails() {
        let (extra, body, auth) = form_case();
        let now = suite_now();
        assert!(is_mismatch(check("POST", "/", "", extra, b"Param1=value2", &auth, now)));
        assert!(is_mismatch(check("POST", "/", "", &[("Content-Type", "text/plain")], body, &auth, now)));
        assert!(is_mismatch(check("PUT", "/", "", extra, body, &auth, now)));
        assert!(is_mismatch(check("POST", "/x", "", extra, body, &auth, now)));
        assert!(is_mismatch(check("POST", "/", "a=b", extra, body, &auth, now)));
        // An unsigned header may change freely.
        let mut more = extra.to_vec();
        more.push(("User-Agent", "anything"));
        assert_eq!(check("POST", "/", "", &more, body, &auth, now), Ok(()));
    }

    #[test]
    fn a_wrong_secret_or_signature_fails_and_an_unknown_key_is_unrecognized() {
        let (extra, body, auth) = form_case();
        let mut h = headers(&[("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE)]);
        h.extend(headers(extra));
        h.push(("Authorization".into(), auth.clone()));
        let request = Request { method: "POST", path: "/", query: "", headers: &h, body };
        let expect = Expect { region: "us-east-1", service: "service" };
        let wrong = Key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEz");
        assert_eq!(
            verify(&request, &expect, suite_now(), |_| Some(&wrong)).err(),
            Some(SigError::Invalid(MISMATCH_MESSAGE.into()))
        );
        assert_eq!(verify(&request, &expect, suite_now(), |_| None::<&Key>).err(), Some(SigError::UnknownAccessKey));
        let flipped = auth.replace("ff11897932", "ff11897933");
        assert!(is_mismatch(check("POST", "/", "", extra, body, &flipped, suite_now())));
        let short = auth.replace("ff11897932ad3f4e", "ff");
        assert!(is_mismatch(check("POST", "/", "", extra, body, &short, suite_now())));
        let not_hex = auth.replace("ff11897932", "zz11897932");
        assert!(is_mismatch(check("POST", "/", "", extra, body, &not_hex, suite_now())));
    }

    #[test]
    fn a_changed_date_fails_even_within_the_window() {
        let (extra, body, auth) = form_case();
        let mut h = headers(&[("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123601Z")]);
        h.extend(headers(extra));
        h.push(("Authorization".into(), auth));
        let request = Request { method: "POST", path: "/", query: "", headers: &h, body };
        let expect = Expect { region: "us-east-1", service: "service" };
        let r = verify(&request, &expect, suite_now(), |_| Some(&SUITE));
        assert_eq!(r.err(), Some(SigError::Invalid(MISMATCH_MESSAGE.into())));
    }

    #[test]
    fn the_skew_window_is_fifteen_minutes_each_way() {
        let (extra, body, auth) = form_case();
        let t = suite_now();
        assert_eq!(check("POST", "/", "", extra, body, &auth, t + MAX_SKEW_SECONDS), Ok(()));
        assert_eq!(check("POST", "/", "", extra, body, &auth, t - MAX_SKEW_SECONDS), Ok(()));
        let expired = check("POST", "/", "", extra, body, &auth, t + MAX_SKEW_SECONDS + 1);
        assert_eq!(
            expired,
            Err(SigError::Invalid(
                "Signature expired: 20150830T123600Z is now earlier than 20150830T123601Z (20150830T125101Z - 15 min.)"
                    .into()
            ))
        );
        let early = check("POST", "/", "", extra, body, &auth, t - MAX_SKEW_SECONDS - 1);
        assert_eq!(
            early,
            Err(SigError::Invalid(
                "Signature not yet current: 20150830T123600Z is still later than 20150830T123559Z (20150830T122059Z + 15 min.)"
                    .into()
            ))
        );
        assert_eq!(expired.err().map(|e| e.json_code()), Some("InvalidSignatureException"));
    }

    #[test]
    fn the_scope_must_name_this_region_and_service() {
        let (extra, body, _) = form_case();
        let mut h = headers(&[("Host", "example.amazonaws.com"), ("X-Amz-Date", SUITE_DATE)]);
        h.extend(headers(extra));
        h.push(("Authorization".into(), authz("content-type;host;x-amz-date", &"0".repeat(64))));
        let request = Request { method: "POST", path: "/", query: "", headers: &h, body };
        let other_region = Expect { region: "local", service: "service" };
        let r = verify(&request, &other_region, suite_now(), |_| Some(&SUITE)).err();
        assert!(matches!(&r, Some(SigError::Invalid(m)) if m.contains("valid region, not 'us-east-1'")), "{r:?}");
        let other_service = Expect { region: "us-east-1", service: "kms" };
        let r = verify(&request, &other_service, suite_now(), |_| Some(&SUITE)).err();
        assert!(matches!(&r, Some(SigError::Invalid(m)) if m.contains("correct service: 'kms'")), "{r:?}");
    }

    #[test]
    fn a_claimed_payload_hash_must_match_the_body() {
        let (extra, body, auth) = form_case();
        let mut more = extra.to_vec();
        more.push(("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD"));
        let r = check("POST", "/", "", &more, body, &auth, suite_now());
        assert!(matches!(&r, Err(SigError::Invalid(m)) if m.contains("x-amz-content-sha256")), "{r:?}");
    }

    #[test]
    fn missing_and_malformed_authorization() {
        let h = headers(&[("Host", "h"), ("X-Amz-Date", SUITE_DATE)]);
        let request = Request { method: "POST", path: "/", query: "", headers: &h, body: b"" };
        let expect = Expect { region: "us-east-1", service: "service" };
        let r = verify(&request, &expect, suite_now(), |_| Some(&SUITE)).err();
        assert_eq!(r.as_ref().map(SigError::json_code), Some("MissingAuthenticationTokenException"));
        assert_eq!(r.as_ref().map(SigError::query_code), Some("MissingAuthenticationToken"));

        let incomplete = |auth: &str, extra: &[(&str, &str)]| {
            let mut h = headers(extra);
            h.push(("Authorization".into(), auth.into()));
            let request = Request { method: "POST", path: "/", query: "", headers: &h, body: b"" };
            match verify(&request, &expect, suite_now(), |_| Some(&SUITE)) {
                Err(e @ SigError::Incomplete(_)) => e.message().to_string(),
                other => panic!("{auth}: {:?}", other.err()),
            }
        };
        let date = [("Host", "h"), ("X-Amz-Date", SUITE_DATE)];
        assert!(incomplete("Basic dXNlcjpwYXNz", &date).contains("'Basic'"));
        assert!(incomplete("AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00", &date).contains("'Credential'"));
        assert!(incomplete(&format!("AWS4-HMAC-SHA256 Credential={SUITE_SCOPE}"), &date).contains("'Signature'"));
        assert!(incomplete("AWS4-HMAC-SHA256 Credential=AKID/x, SignedHeaders=host, Signature=00", &date)
            .contains("not of the form"));
        let auth = authz("host;x-amz-date", "00");
        assert!(incomplete(&auth, &[("Host", "h")]).contains("X-Amz-Date"));
        assert!(incomplete(&authz("x-amz-date", "00"), &date).contains("'Host'"));
        assert!(incomplete(&auth, &[("Host", "h"), ("X-Amz-Date", "2015-08-30T12:36:00Z")]).contains("ISO 8601"));
    }

    #[test]
    fn a_request_botocore_signed_verifies() {
        // botocore 1.43's SigV4Auth on a KMS Encrypt to http://127.0.0.1:4567/.
        let body = br#"{"KeyId": "alias/test", "Plaintext": "aGVsbG8="}"#;
        let h = headers(&[
            ("host", "127.0.0.1:4567"),
            ("x-amz-target", "TrentService.Encrypt"),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-date", "20261122T231139Z"),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIAKMSDTESTKEY00001/20261122/local/kms/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date;x-amz-target, \
                 Signature=921b40c318c54be742fbe1e2fc416582bd2947cd117eb095a3b0f4bdc0ff458b",
            ),
            ("content-length", "48"),
        ]);
        let key = Key("kmsd-test-secret/abcdefghijklmnopqrstuv");
        let expect = Expect { region: "local", service: "kms" };
        let now = parse_amz_date("20261122T231500Z").expect("date");
        let lookup = |id: &str| (id == "AKIAKMSDTESTKEY00001").then_some(&key);
        let request = Request { method: "POST", path: "/", query: "", headers: &h, body };
        assert!(verify(&request, &expect, now, lookup).is_ok());
        let mut other = h.clone();
        other[1].1 = "TrentService.Decrypt".into();
        let request = Request { method: "POST", path: "/", query: "", headers: &other, body };
        assert_eq!(verify(&request, &expect, now, lookup).err(), Some(SigError::Invalid(MISMATCH_MESSAGE.into())));
    }

    #[test]
    fn dates_round_trip() {
        for s in ["20150830T123600Z", "20000229T000000Z", "19700101T000000Z", "20991231T235959Z"] {
            assert_eq!(amz_date(parse_amz_date(s).expect(s)), s);
        }
        assert_eq!(parse_amz_date("19700101T000001Z"), Some(1));
        for bad in ["20151330T123600Z", "2015083T123600Z", "20150830 123600Z", "2015083ðT12360Z", ""] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }
}
