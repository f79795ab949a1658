//! Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey,
//! GenerateDataKeyWithoutPlaintext and GenerateRandom, and kmsd's batch GenerateDataKey
//! (`Kmsfs.GenerateDataKeys`).
//!
//! Plaintexts and data keys live in zeroizing buffers from the request body to the
//! response body, and never appear in an error or a log line.

use std::collections::BTreeMap;
use std::sync::Arc;

use kmsfs_common::aead::random_bytes;
use kmsfs_common::blob::CiphertextBlob;
use kmsfs_common::context::EncryptionContext;
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::wire::{b64, b64_secret, context, dry_run, parse, require_symmetric_algorithm, with_request_alias, Blob};
use super::Reply;
use crate::agent::{require_usable, Agent, KeyRecord};
use crate::policy::eval::Caller;
use crate::policy::keys as ck;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EncryptRequest {
    key_id: String,
    plaintext: Blob,
    encryption_context: Option<BTreeMap<String, String>>,
    encryption_algorithm: Option<String>,
    dry_run: Option<bool>,
}

/// Encrypt, Decrypt, ReEncrypt and GenerateDataKey take symmetric encryption keys.
fn require_symmetric_key(agent: &Agent, key: &KeyRecord) -> Result<(), KmsError> {
    if key.row.key_spec != "SYMMETRIC_DEFAULT" {
        return Err(KmsError::new(
            ErrorKind::InvalidKeyUsageException,
            format!(
                "{} is a {} key for {}: this operation needs a symmetric encryption key",
                agent.key_arn(&key.row.id),
                key.row.key_spec,
                key.row.key_usage
            ),
        ));
    }
    Ok(())
}

/// Whether `key` is an asymmetric encryption key (RSA, ENCRYPT_DECRYPT), whose ciphertexts
/// are raw RSAES-OAEP, not blobs.
fn is_rsa_encryption(key: &KeyRecord) -> bool {
    key.row.key_spec.starts_with("RSA_") && key.row.key_usage == "ENCRYPT_DECRYPT"
}

/// The RSAES algorithm a request names for an RSA encryption key: required, one the key
/// offers; and no encryption context, which only symmetric keys take.
fn rsa_algorithm<'a>(
    agent: &Agent,
    key: &KeyRecord,
    algorithm: Option<&'a str>,
    context: &EncryptionContext,
) -> Result<&'a str, KmsError> {
    let arn = agent.key_arn(&key.row.id);
    let algorithm = algorithm.unwrap_or("SYMMETRIC_DEFAULT");
    if !matches!(algorithm, "RSAES_OAEP_SHA_1" | "RSAES_OAEP_SHA_256") {
        return Err(KmsError::new(
            ErrorKind::InvalidKeyUsageException,
            format!("{arn} is an RSA key: name RSAES_OAEP_SHA_1 or RSAES_OAEP_SHA_256 as the EncryptionAlgorithm, not {algorithm}"),
        ));
    }
    if !context.0.is_empty() {
        return Err(KmsError::validation(format!(
            "{arn} is an asymmetric key: an encryption context applies only to symmetric encryption keys"
        )));
    }
    Ok(algorithm)
}

/// Opens a raw RSAES-OAEP ciphertext with `key`, which the request named (`named` is how).
#[allow(clippy::too_many_arguments)]
fn open_rsa(
    agent: &Agent,
    caller: &Caller,
    action: &str,
    key: &KeyRecord,
    named: &str,
    ciphertext: &[u8],
    context: &EncryptionContext,
    algorithm: Option<&str>,
) -> Result<(Zeroizing<Vec<u8>>, String), KmsError> {
    let asked = algorithm.unwrap_or("SYMMETRIC_DEFAULT").to_string();
    agent.authorize_key(caller, action, key, |c| with_request_alias(c, named).with(ck::ENCRYPTION_ALGORITHM, asked))?;
    require_usable(agent, key)?;
    let algorithm = rsa_algorithm(agent, key, algorithm, context)?;
    let plaintext = key.private_key()?.decrypt(algorithm, ciphertext)?;
    Ok((plaintext, algorithm.to_string()))
}

/// Seals `plaintext` under the key's current material.
fn seal(key: &KeyRecord, context: &EncryptionContext, plaintext: &[u8]) -> Result<(Vec<u8>, String), KmsError> {
    let (current, material) = key.current_key()?;
    let blob = material.seal(&key.row.id, key.row.current_version, context, plaintext)?;
    Ok((blob, current.material_id().to_string()))
}

pub fn encrypt(agent: &Agent, caller: &Caller, request: Value) -> Result<Reply, KmsError> {
    let req: EncryptRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, true)?;
    let ctx = context(req.encryption_context);
    agent.authorize_key(caller, "Encrypt", &key, |c| {
        with_request_alias(c, &req.key_id).with_encryption_context(&ctx.0).with(
            ck::ENCRYPTION_ALGORITHM,
            req.encryption_algorithm.clone().unwrap_or_else(|| "SYMMETRIC_DEFAULT".into()),
        )
    })?;
    let arn = agent.key_arn(&key.row.id);
    require_usable(agent, &key)?;
    if is_rsa_encryption(&key) {
        let algorithm = rsa_algorithm(agent, &key, req.encryption_algorithm.as_deref(), &ctx)?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        let ciphertext = key.private_key()?.encrypt(algorithm, &req.plaintext.0)?;
        return Ok(json!({ "CiphertextBlob": b64(&ciphertext), "KeyId": arn, "EncryptionAlgorithm": algorithm }).into());
    }
    require_symmetric_key(agent, &key)?;
    require_symmetric_algorithm(req.encryption_algorithm.as_deref(), &arn)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    let (blob, _) = seal(&key, &ctx, &req.plaintext.0)?;
    Ok(json!({
        "CiphertextBlob": b64(&blob),
        "KeyId": arn,
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    })
    .into())
}

/// What opening a blob yields: the key that made it, the material version's ID, and the
/// plaintext.
type Opened = (Arc<KeyRecord>, String, Zeroizing<Vec<u8>>);

/// Opens a ciphertext blob: the key it names must exist and be usable, match
/// `expected_key` when the caller named one, and the blob must authenticate under the
/// material version it names with `context`.
fn open(
    agent: &Agent,
    caller: &Caller,
    action: &str,
    blob: &[u8],
    context: &EncryptionContext,
    expected_key: Option<&str>,
) -> Result<Opened, KmsError> {
    let parsed = CiphertextBlob::parse(blob).map_err(|_| KmsError::invalid_ciphertext())?;
    if let Some(expected) = expected_key {
        let named = agent.resolve(expected, true)?;
        if named.row.id != parsed.key_id {
            return Err(KmsError::new(
                ErrorKind::IncorrectKeyException,
                "The key ID in the request does not identify the KMS key that encrypted the ciphertext",
            ));
        }
    }
    let key = agent.key(&parsed.key_id).ok_or_else(KmsError::invalid_ciphertext)?;
    agent.authorize_key(caller, action, &key, |c| {
        let c = c.with_encryption_context(&context.0).with(ck::ENCRYPTION_ALGORITHM, "SYMMETRIC_DEFAULT");
        match expected_key {
            Some(k) => with_request_alias(c, k),
            None => c,
        }
    })?;
    require_usable(agent, &key)?;
    require_symmetric_key(agent, &key)?;
    let material = key.materials.get(&parsed.material_version).ok_or_else(KmsError::invalid_ciphertext)?;
    let usable = material.key.as_ref().ok_or_else(|| {
        KmsError::invalid_state(format!(
            "The key material ({}) of {} that encrypted the ciphertext is not imported.",
            material.material_id(),
            agent.key_arn(&key.row.id)
        ))
    })?;
    let plaintext = usable.open(&parsed, context)?;
    let material_id = material.material_id().to_string();
    Ok((key, material_id, plaintext))
}

fn no_recipient(recipient: &Option<Value>) -> Result<(), KmsError> {
    if recipient.is_some() {
        return Err(KmsError::new(
            ErrorKind::UnsupportedOperationException,
            "Recipient (attested enclave) requests are not supported",
        ));
    }
    Ok(())
}

fn required_blob(blob: Option<Blob>, member: &str) -> Result<Blob, KmsError> {
    blob.ok_or_else(|| {
        KmsError::validation(format!(
            "1 validation error detected: Value null at '{member}' failed to satisfy constraint: Member must not be null"
        ))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DecryptRequest {
    ciphertext_blob: Option<Blob>,
    encryption_context: Option<BTreeMap<String, String>>,
    key_id: Option<String>,
    encryption_algorithm: Option<String>,
    recipient: Option<Value>,
    dry_run: Option<bool>,
}

pub fn decrypt(agent: &Agent, caller: &Caller, request: Value) -> Result<Reply, KmsError> {
    let req: DecryptRequest = parse(request)?;
    let blob = required_blob(req.ciphertext_blob, "ciphertextBlob")?;
    no_recipient(&req.recipient)?;
    let ctx = context(req.encryption_context);
    if let Some(named) = &req.key_id {
        let key = agent.resolve(named, true)?;
        if is_rsa_encryption(&key) {
            let algorithm = req.encryption_algorithm.as_deref();
            let (plaintext, algorithm) = open_rsa(agent, caller, "Decrypt", &key, named, &blob.0, &ctx, algorithm)?;
            if req.dry_run == Some(true) {
                return Err(dry_run());
            }
            let body = json!({ "KeyId": agent.key_arn(&key.row.id), "EncryptionAlgorithm": algorithm });
            return Ok(Reply::with_secret(body, "Plaintext", b64_secret(&plaintext)));
        }
    } else if req.encryption_algorithm.as_deref().is_some_and(|a| a.starts_with("RSAES_")) {
        return Err(KmsError::validation("Decrypt with an asymmetric key needs its KeyId"));
    }
    let (key, material_id, plaintext) = open(agent, caller, "Decrypt", &blob.0, &ctx, req.key_id.as_deref())?;
    let arn = agent.key_arn(&key.row.id);
    require_symmetric_algorithm(req.encryption_algorithm.as_deref(), &arn)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    Ok(Reply::with_secret(
        json!({ "KeyId": arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT", "KeyMaterialId": material_id }),
        "Plaintext",
        b64_secret(&plaintext),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ReEncryptRequest {
    ciphertext_blob: Option<Blob>,
    source_encryption_context: Option<BTreeMap<String, String>>,
    source_key_id: Option<String>,
    destination_key_id: String,
    destination_encryption_context: Option<BTreeMap<String, String>>,
    source_encryption_algorithm: Option<String>,
    destination_encryption_algorithm: Option<String>,
    dry_run: Option<bool>,
}

pub fn re_encrypt(agent: &Agent, caller: &Caller, request: Value) -> Result<Reply, KmsError> {
    let req: ReEncryptRequest = parse(request)?;
    let blob = required_blob(req.ciphertext_blob, "ciphertextBlob")?;
    let source_context = context(req.source_encryption_context);
    let rsa_source = match &req.source_key_id {
        Some(named) => Some(agent.resolve(named, true)?).filter(|k| is_rsa_encryption(k)).map(|k| (k, named)),
        None => None,
    };
    let (source, source_material_id, plaintext, source_algorithm) = match rsa_source {
        Some((key, named)) => {
            let algorithm = req.source_encryption_algorithm.as_deref();
            let (plaintext, algorithm) =
                open_rsa(agent, caller, "ReEncryptFrom", &key, named, &blob.0, &source_context, algorithm)?;
            (key, None, plaintext, algorithm)
        }
        None => {
            let (key, material_id, plaintext) =
                open(agent, caller, "ReEncryptFrom", &blob.0, &source_context, req.source_key_id.as_deref())?;
            require_symmetric_algorithm(req.source_encryption_algorithm.as_deref(), &agent.key_arn(&key.row.id))?;
            (key, Some(material_id), plaintext, "SYMMETRIC_DEFAULT".to_string())
        }
    };
    let source_arn = agent.key_arn(&source.row.id);
    let destination = agent.resolve(&req.destination_key_id, true)?;
    let destination_context = context(req.destination_encryption_context);
    let asked = req.destination_encryption_algorithm.clone().unwrap_or_else(|| "SYMMETRIC_DEFAULT".into());
    agent.authorize_key(caller, "ReEncryptTo", &destination, |c| {
        with_request_alias(c, &req.destination_key_id)
            .with_encryption_context(&destination_context.0)
            .with(ck::ENCRYPTION_ALGORITHM, asked)
    })?;
    let destination_arn = agent.key_arn(&destination.row.id);
    require_usable(agent, &destination)?;
    let (new_blob, destination_material_id, destination_algorithm) = if is_rsa_encryption(&destination) {
        let algorithm =
            rsa_algorithm(agent, &destination, req.destination_encryption_algorithm.as_deref(), &destination_context)?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        (destination.private_key()?.encrypt(algorithm, &plaintext)?, None, algorithm.to_string())
    } else {
        require_symmetric_key(agent, &destination)?;
        require_symmetric_algorithm(req.destination_encryption_algorithm.as_deref(), &destination_arn)?;
        if req.dry_run == Some(true) {
            return Err(dry_run());
        }
        let (blob, material_id) = seal(&destination, &destination_context, &plaintext)?;
        (blob, Some(material_id), "SYMMETRIC_DEFAULT".to_string())
    };
    let mut out = json!({
        "CiphertextBlob": b64(&new_blob),
        "SourceKeyId": source_arn,
        "KeyId": destination_arn,
        "SourceEncryptionAlgorithm": source_algorithm,
        "DestinationEncryptionAlgorithm": destination_algorithm,
    });
    if let Some(id) = source_material_id {
        out["SourceKeyMaterialId"] = json!(id);
    }
    if let Some(id) = destination_material_id {
        out["DestinationKeyMaterialId"] = json!(id);
    }
    Ok(out.into())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GenerateDataKeyRequest {
    key_id: String,
    encryption_context: Option<BTreeMap<String, String>>,
    number_of_bytes: Option<i64>,
    key_spec: Option<String>,
    recipient: Option<Value>,
    dry_run: Option<bool>,
}

/// The length of the data key a request asks for by `KeySpec` or `NumberOfBytes`.
fn data_key_length(key_spec: Option<&str>, number_of_bytes: Option<i64>) -> Result<usize, KmsError> {
    match (key_spec, number_of_bytes) {
        (Some("AES_128"), None) => Ok(16),
        (Some(_), None) => Ok(32),
        (None, Some(n)) => Ok(n as usize),
        (Some(_), Some(_)) => Err(KmsError::validation("Specify either KeySpec or NumberOfBytes, not both")),
        (None, None) => Err(KmsError::validation("Specify either KeySpec or NumberOfBytes")),
    }
}

/// A fresh data key, its ciphertext blob, and the ID of the key material that sealed it.
struct NewDataKey {
    plaintext: Zeroizing<Vec<u8>>,
    blob: Vec<u8>,
    material_id: String,
}

/// A fresh data key of `length` bytes, sealed under `key` bound to `ctx`.
fn new_data_key(key: &KeyRecord, ctx: &EncryptionContext, length: usize) -> Result<NewDataKey, KmsError> {
    let mut plaintext = Zeroizing::new(vec![0u8; length]);
    random_bytes(&mut plaintext);
    let (blob, material_id) = seal(key, ctx, &plaintext)?;
    Ok(NewDataKey { plaintext, blob, material_id })
}

/// GenerateDataKey (`with_plaintext`) and GenerateDataKeyWithoutPlaintext.
pub fn generate_data_key(
    agent: &Agent,
    caller: &Caller,
    request: Value,
    with_plaintext: bool,
) -> Result<Reply, KmsError> {
    let req: GenerateDataKeyRequest = parse(request)?;
    let length = data_key_length(req.key_spec.as_deref(), req.number_of_bytes)?;
    no_recipient(&req.recipient)?;
    let key = agent.resolve(&req.key_id, true)?;
    let ctx = context(req.encryption_context);
    let action = if with_plaintext { "GenerateDataKey" } else { "GenerateDataKeyWithoutPlaintext" };
    agent
        .authorize_key(caller, action, &key, |c| with_request_alias(c, &req.key_id).with_encryption_context(&ctx.0))?;
    require_usable(agent, &key)?;
    require_symmetric_key(agent, &key)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    let new = new_data_key(&key, &ctx, length)?;
    let body = json!({
        "CiphertextBlob": b64(&new.blob),
        "KeyId": agent.key_arn(&key.row.id),
        "KeyMaterialId": new.material_id,
    });
    Ok(if with_plaintext { Reply::with_secret(body, "Plaintext", b64_secret(&new.plaintext)) } else { body.into() })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GenerateDataKeyPairRequest {
    key_id: String,
    key_pair_spec: String,
    encryption_context: Option<BTreeMap<String, String>>,
    recipient: Option<Value>,
    dry_run: Option<bool>,
}

/// GenerateDataKeyPair (`with_plaintext`) and GenerateDataKeyPairWithoutPlaintext: a new
/// key pair of `KeyPairSpec` made in aws-lc-rs, its private key (PKCS#8 DER) sealed under
/// the symmetric KMS key as a ciphertext blob, and its public key (DER SubjectPublicKeyInfo).
pub fn generate_data_key_pair(
    agent: &Agent,
    caller: &Caller,
    request: Value,
    with_plaintext: bool,
) -> Result<Reply, KmsError> {
    let req: GenerateDataKeyPairRequest = parse(request)?;
    no_recipient(&req.recipient)?;
    let key = agent.resolve(&req.key_id, true)?;
    let ctx = context(req.encryption_context);
    let action = if with_plaintext { "GenerateDataKeyPair" } else { "GenerateDataKeyPairWithoutPlaintext" };
    agent.authorize_key(caller, action, &key, |c| {
        with_request_alias(c, &req.key_id)
            .with_encryption_context(&ctx.0)
            .with(ck::DATA_KEY_PAIR_SPEC, req.key_pair_spec.clone())
    })?;
    require_usable(agent, &key)?;
    require_symmetric_key(agent, &key)?;
    if req.key_pair_spec == "SM2" {
        return Err(KmsError::new(
            ErrorKind::UnsupportedOperationException,
            "SM2 key pairs are offered only in AWS's China Regions",
        ));
    }
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    let (pair, private) = crate::asymmetric::PrivateKey::generate(&req.key_pair_spec, "SIGN_VERIFY")?;
    let public = pair.public_key_der()?.ok_or_else(|| KmsError::internal("a key pair without a public key"))?;
    let (blob, material_id) = seal(&key, &ctx, &private)?;
    let body = json!({
        "PrivateKeyCiphertextBlob": b64(&blob),
        "PublicKey": b64(&public),
        "KeyId": agent.key_arn(&key.row.id),
        "KeyPairSpec": req.key_pair_spec,
        "KeyMaterialId": material_id,
    });
    Ok(if with_plaintext { Reply::with_secret(body, "PrivateKeyPlaintext", b64_secret(&private)) } else { body.into() })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GenerateDataKeysRequest {
    key_id: String,
    encryption_contexts: Vec<BTreeMap<String, String>>,
    number_of_bytes: Option<i64>,
    key_spec: Option<String>,
    dry_run: Option<bool>,
}

/// `Kmsfs.GenerateDataKeys`: GenerateDataKey once for each of `EncryptionContexts` (at
/// most 256), in one request. kmsfs makes its files' data keys ahead of need this way, so
/// that a batch costs the agent one request and one audit record, synced once, instead of
/// one of each per file.
///
/// Each key is exactly what GenerateDataKey with that context would give, and is
/// authorized as such: the policy action is `kms:GenerateDataKey`, and conditions on the
/// encryption context are evaluated for every context. If any is refused, none is made.
/// The answer: `KeyId`, `KeyMaterialId`, and `DataKeys`, one `{CiphertextBlob, Plaintext}`
/// per context, in order.
pub fn generate_data_keys(agent: &Agent, caller: &Caller, request: Value) -> Result<Reply, KmsError> {
    let req: GenerateDataKeysRequest = parse(request)?;
    let length = data_key_length(req.key_spec.as_deref(), req.number_of_bytes)?;
    let key = agent.resolve(&req.key_id, true)?;
    let contexts: Vec<EncryptionContext> = req.encryption_contexts.into_iter().map(|c| context(Some(c))).collect();
    for (i, ctx) in contexts.iter().enumerate() {
        agent
            .authorize_key(caller, "GenerateDataKey", &key, |c| {
                with_request_alias(c, &req.key_id).with_encryption_context(&ctx.0)
            })
            .map_err(|e| KmsError::new(e.kind, format!("EncryptionContexts[{i}]: {}", e.message)))?;
    }
    require_usable(agent, &key)?;
    require_symmetric_key(agent, &key)?;
    if req.dry_run == Some(true) {
        return Err(dry_run());
    }
    // Each entry's JSON text, then all of them joined into a buffer of the exact size (so
    // that no plaintext is left behind by a reallocation). Base64 needs no JSON escaping.
    let mut entries = Vec::with_capacity(contexts.len());
    for ctx in &contexts {
        let new = new_data_key(&key, ctx, length)?;
        let (blob, plaintext) = (b64(&new.blob), b64_secret(&new.plaintext));
        let mut entry = Zeroizing::new(String::with_capacity(blob.len() + plaintext.len() + 40));
        for part in ["{\"CiphertextBlob\":\"", &blob, "\",\"Plaintext\":\"", &plaintext, "\"}"] {
            entry.push_str(part);
        }
        entries.push(entry);
    }
    let mut keys = Zeroizing::new(String::with_capacity(entries.iter().map(|e| e.len() + 1).sum::<usize>() + 1));
    keys.push('[');
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            keys.push(',');
        }
        keys.push_str(entry);
    }
    keys.push(']');
    // Every key of the batch was sealed under the key's current material.
    let body = json!({"KeyId": agent.key_arn(&key.row.id), "KeyMaterialId": key.current()?.material_id()});
    Ok(Reply::with_secret_json(body, "DataKeys", keys))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GenerateRandomRequest {
    number_of_bytes: Option<i64>,
    custom_key_store_id: Option<String>,
    recipient: Option<Value>,
}

pub fn generate_random(agent: &Agent, caller: &Caller, request: Value) -> Result<Reply, KmsError> {
    let req: GenerateRandomRequest = parse(request)?;
    agent.authorize_account(caller, "GenerateRandom", |c| c)?;
    no_recipient(&req.recipient)?;
    let n = req.number_of_bytes.ok_or_else(|| {
        KmsError::validation(
            "1 validation error detected: Value null at 'numberOfBytes' failed to satisfy constraint: Member must not be null",
        )
    })?;
    let mut bytes = Zeroizing::new(vec![0u8; n as usize]);
    match &req.custom_key_store_id {
        // From the store's token, as AWS takes them from the CloudHSM cluster.
        Some(id) => {
            let store = agent.key_store(id)?;
            let root = store.root().ok_or_else(|| crate::agent::not_connected(&store))?;
            root.token().generate_random(&mut bytes)?;
        }
        None => random_bytes(&mut bytes),
    }
    Ok(Reply::with_secret(json!({}), "Plaintext", b64_secret(&bytes)))
}
