//! Asymmetric and HMAC keys' operations: Sign, Verify, GetPublicKey, GenerateMac,
//! VerifyMac and DeriveSharedSecret ([`crate::asymmetric`] holds the keys and the
//! algorithms; RSA encryption and data key pairs are in `crypto`, beside their symmetric
//! counterparts).
//!
//! The order of checks is AWS's: the key exists and the caller may use it, then its state,
//! then whether its usage and spec allow the algorithm asked for. Messages, signatures and
//! MACs never reach the audit trail or a log line.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::keys::{add_algorithms, add_legacy_spec};
use super::wire::{b64, b64_secret, dry_run, parse, with_request_alias, Blob};
use super::Reply;
use crate::agent::{require_usable, Agent, KeyRecord};
use crate::asymmetric::{spec_info, MessageType};
use crate::policy::eval::Caller;
use crate::policy::keys as ck;
use kmsfs_common::{ErrorKind, KmsError};

fn invalid_usage(message: String) -> KmsError {
    KmsError::new(ErrorKind::InvalidKeyUsageException, message)
}

/// The key's usage must be `usage` and its spec must offer `algorithm` for it.
fn require_algorithm(agent: &Agent, key: &KeyRecord, usage: &str, algorithm: &str) -> Result<(), KmsError> {
    let arn = agent.key_arn(&key.row.id);
    if key.row.key_usage != usage {
        return Err(invalid_usage(format!("{arn} has KeyUsage {}, not {usage}", key.row.key_usage)));
    }
    let offered = spec_info(&key.row.key_spec).map(|i| i.algorithms(usage)).map_or(&[][..], |a| match usage {
        "SIGN_VERIFY" => a.signing,
        "KEY_AGREEMENT" => a.key_agreement,
        _ => a.mac,
    });
    if !offered.contains(&algorithm) {
        return Err(invalid_usage(format!(
            "{arn} ({}) does not support {algorithm}; it supports {}",
            key.row.key_spec,
            offered.join(", ")
        )));
    }
    Ok(())
}

/// Sign's and Verify's common part: the key, authorized for `action` with the signing
/// condition keys, usable, of usage SIGN_VERIFY with `algorithm`; and the message type.
fn signing_key(
    agent: &Agent,
    caller: &Caller,
    action: &str,
    key_id: &str,
    algorithm: &str,
    message_type: Option<&str>,
    dry: Option<bool>,
) -> Result<(Arc<KeyRecord>, MessageType), KmsError> {
    let key = agent.resolve(key_id, true)?;
    let kind = message_type.unwrap_or("RAW");
    agent.authorize_key(caller, action, &key, |c| {
        with_request_alias(c, key_id).with(ck::SIGNING_ALGORITHM, algorithm).with(ck::MESSAGE_TYPE, kind)
    })?;
    require_usable(agent, &key)?;
    require_algorithm(agent, &key, "SIGN_VERIFY", algorithm)?;
    let message_type = match kind {
        "RAW" => MessageType::Raw,
        "DIGEST" => MessageType::Digest,
        other => {
            return Err(KmsError::new(
                ErrorKind::UnsupportedOperationException,
                format!("MessageType {other} is for ML-DSA keys, which kmsd does not support"),
            ))
        }
    };
    if dry == Some(true) {
        return Err(dry_run());
    }
    Ok((key, message_type))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SignRequest {
    key_id: String,
    message: Blob,
    message_type: Option<String>,
    signing_algorithm: String,
    dry_run: Option<bool>,
}

pub fn sign(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: SignRequest = parse(request)?;
    let (key, message_type) = signing_key(
        agent,
        caller,
        "Sign",
        &req.key_id,
        &req.signing_algorithm,
        req.message_type.as_deref(),
        req.dry_run,
    )?;
    let signature = key.private_key()?.sign(&req.signing_algorithm, message_type, &req.message.0)?;
    Ok(json!({
        "KeyId": agent.key_arn(&key.row.id),
        "Signature": b64(&signature),
        "SigningAlgorithm": req.signing_algorithm,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VerifyRequest {
    key_id: String,
    message: Blob,
    message_type: Option<String>,
    signature: Blob,
    signing_algorithm: String,
    dry_run: Option<bool>,
}

pub fn verify(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: VerifyRequest = parse(request)?;
    let (key, message_type) = signing_key(
        agent,
        caller,
        "Verify",
        &req.key_id,
        &req.signing_algorithm,
        req.message_type.as_deref(),
        req.dry_run,
    )?;
    let valid = key.private_key()?.verify(&req.signing_algorithm, message_type, &req.message.0, &req.signature.0)?;
    if !valid {
        return Err(KmsError::new(
            ErrorKind::KMSInvalidSignatureException,
            "The signature is not valid for this message, key and signing algorithm",
        ));
    }
    Ok(json!({
        "KeyId": agent.key_arn(&key.row.id),
        "SignatureValid": true,
        "SigningAlgorithm": req.signing_algorithm,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyIdRequest {
    key_id: String,
}

pub fn get_public_key(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: KeyIdRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, true)?;
    agent.authorize_key(caller, "GetPublicKey", &key, |c| with_request_alias(c, &req.key_id))?;
    require_usable(agent, &key)?;
    let der = key.private_key().ok().map(|p| p.public_key_der()).transpose()?.flatten().ok_or_else(|| {
        KmsError::new(
            ErrorKind::UnsupportedOperationException,
            format!("{} ({}) has no public key", agent.key_arn(&key.row.id), key.row.key_spec),
        )
    })?;
    let mut out = json!({
        "KeyId": agent.key_arn(&key.row.id),
        "PublicKey": b64(&der),
        "KeySpec": key.row.key_spec,
        "KeyUsage": key.row.key_usage,
    });
    add_legacy_spec(&mut out, &key.row.key_spec);
    add_algorithms(&mut out, &key.row);
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct MacRequest {
    key_id: String,
    message: Blob,
    mac_algorithm: String,
    mac: Option<Blob>,
    dry_run: Option<bool>,
}

/// GenerateMac (`verify` false) and VerifyMac.
pub fn mac(agent: &Agent, caller: &Caller, request: Value, verify: bool) -> Result<Value, KmsError> {
    let req: MacRequest = parse(request)?;
    let action = if verify { "VerifyMac" } else { "GenerateMac" };
    let key = agent.resolve(&req.key_id, true)?;
    agent.authorize_key(caller, action, &key, |c| {
        with_request_alias(c, &req.key_id).with(ck::MAC_ALGORITHM, req.mac_algorithm.clone())
    })?;
    require_usable(agent, &key)?;
    require_algorithm(agent, &key, "GENERATE_VERIFY_MAC", &req.mac_algorithm)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    let private = key.private_key()?;
    let arn = agent.key_arn(&key.row.id);
    if !verify {
        let mac = private.mac(&req.mac_algorithm, &req.message.0)?;
        return Ok(json!({ "Mac": b64(&mac), "MacAlgorithm": req.mac_algorithm, "KeyId": arn }));
    }
    let given = req.mac.as_ref().map_or(&[][..], |m| &m.0[..]);
    if !private.verify_mac(&req.mac_algorithm, &req.message.0, given)? {
        return Err(KmsError::new(
            ErrorKind::KMSInvalidMacException,
            "The MAC is not valid for this message, key and MAC algorithm",
        ));
    }
    Ok(json!({ "KeyId": arn, "MacValid": true, "MacAlgorithm": req.mac_algorithm }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DeriveSharedSecretRequest {
    key_id: String,
    key_agreement_algorithm: String,
    public_key: Blob,
    recipient: Option<Value>,
    dry_run: Option<bool>,
}

/// DeriveSharedSecret: ECDH between a KEY_AGREEMENT key and the caller's public key.
pub fn derive_shared_secret(agent: &Agent, caller: &Caller, request: Value) -> Result<Reply, KmsError> {
    let req: DeriveSharedSecretRequest = parse(request)?;
    if req.recipient.is_some() {
        return Err(KmsError::new(
            ErrorKind::UnsupportedOperationException,
            "Recipient (Nitro Enclaves attestation) is not supported",
        ));
    }
    let key = agent.resolve(&req.key_id, true)?;
    agent.authorize_key(caller, "DeriveSharedSecret", &key, |c| {
        with_request_alias(c, &req.key_id).with(ck::KEY_AGREEMENT_ALGORITHM, req.key_agreement_algorithm.clone())
    })?;
    require_usable(agent, &key)?;
    require_algorithm(agent, &key, "KEY_AGREEMENT", &req.key_agreement_algorithm)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    let secret = key.private_key()?.derive_shared_secret(&req.public_key.0)?;
    let body = json!({
        "KeyId": agent.key_arn(&key.row.id),
        "KeyAgreementAlgorithm": req.key_agreement_algorithm,
        "KeyOrigin": key.row.origin,
    });
    Ok(Reply::with_secret(body, "SharedSecret", b64_secret(&secret)))
}
