//! Imported key material (BYOK): GetParametersForImport, ImportKeyMaterial and
//! DeleteImportedKeyMaterial, for symmetric keys of origin `EXTERNAL`.
//!
//! GetParametersForImport makes a fresh RSA wrapping key pair ([`crate::wrapping`]) and
//! returns its public half with an import token valid for 24 hours. The token is the
//! private half itself, sealed by the agent (XAES-256-GCM under an internal secret kept
//! under the root of trust) together with the key it is for, its expiry and the chosen
//! algorithm: nothing is stored, and a token is useless outside this agent.
//!
//! ```text
//! token = nonce(24) ‖ XAES-256-GCM(key ID(16) ‖ valid-to ms(8, BE) ‖ len(1) ‖ algorithm ‖
//!                                  len(1) ‖ key spec ‖ PKCS#8 private key) ‖ tag(16)
//! ```
//!
//! ImportKeyMaterial unwraps the material with the token's key and hands it to the root of
//! trust, which stores it wrapped like generated material. As in AWS, the material's
//! `KeyMaterialId` is derived from the key ID and the material (SHA-256 of a label, the key
//! ID and the material), so a re-import is checked to be the same material without keeping
//! any copy of it. A symmetric key can hold several imported materials: `NEW_KEY_MATERIAL`
//! adds one pending rotation (RotateKeyOnDemand makes it current), `EXISTING_KEY_MATERIAL`
//! re-imports one (after deletion or expiry, or to change its expiration).
//! DeleteImportedKeyMaterial and the scheduler's expiry remove the stored material; a key
//! whose current material is gone is `PendingImport`.

use std::sync::Arc;

use kmsfs_common::aead::{KeyBytes, XaesKey};
use kmsfs_common::ids::KeyId;
use kmsfs_common::time::millis_to_wire;
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::wire::{b64, parse, Blob};
use crate::agent::{Agent, Change, KeyRecord, Material};
use crate::asymmetric::PrivateKey;
use crate::policy::eval::Caller;
use crate::policy::keys as ck;
use crate::store::{KeyState, MaterialRow};
use crate::wrapping::{WrappingAlgorithm, WrappingKey, WrappingKeySpec};

/// How long an import token and its public key are valid, as in AWS.
const TOKEN_LIFETIME_MS: i64 = 24 * 3_600_000;
/// The farthest `ValidTo` may be: 365 days from the request.
const MAX_VALID_TO_MS: i64 = 365 * 86_400_000;
/// The internal secret that seals import tokens, and its reserved key ID.
const TOKEN_SECRET_NAME: &str = "import_token_key";
const TOKEN_SECRET_ID: [u8; 16] = *b"kmsd import tok\x01";
const TOKEN_AAD: &[u8] = b"kmsd import token v1";
const MATERIAL_ID_LABEL: &[u8] = b"kmsd imported key material v1\0";

fn unsupported(message: String) -> KmsError {
    KmsError::new(ErrorKind::UnsupportedOperationException, message)
}

/// Import applies to `EXTERNAL` keys (symmetric, asymmetric and HMAC).
fn require_external(agent: &Agent, key: &KeyRecord, action: &str) -> Result<(), KmsError> {
    let arn = agent.key_arn(&key.row.id);
    if key.row.origin != "EXTERNAL" {
        return Err(unsupported(format!(
            "{action} is only for keys of origin EXTERNAL; {arn} has origin {}",
            key.row.origin
        )));
    }
    Ok(())
}

/// Unwrapped key material, checked against the key's spec: 256 bits for a symmetric key; a
/// PKCS#8 private key of the spec for an asymmetric one; for an HMAC key, as many bytes as AWS
/// allows its spec (28-64, 32-64, 48-128, 64-128).
enum Imported {
    Symmetric(KeyBytes),
    Private(Zeroizing<Vec<u8>>, Arc<PrivateKey>),
}

impl Imported {
    fn check(key: &KeyRecord, material: Zeroizing<Vec<u8>>) -> Result<Imported, KmsError> {
        let incorrect = |why: String| KmsError::new(ErrorKind::IncorrectKeyMaterialException, why);
        if key.row.key_spec == "SYMMETRIC_DEFAULT" {
            return KeyBytes::from_slice(&material).map(Imported::Symmetric).ok_or_else(|| {
                incorrect(format!(
                    "The key material must be 256 bits for a SYMMETRIC_DEFAULT key; it is {} bytes",
                    material.len()
                ))
            });
        }
        let private = PrivateKey::from_stored(&key.row.key_spec, &key.row.key_usage, &material).map_err(|_| {
            incorrect(format!(
                "The key material is not a {} key for {} (a PKCS#8 DER private key, or for HMAC the key's bytes)",
                key.row.key_spec, key.row.key_usage
            ))
        })?;
        Ok(Imported::Private(material, Arc::new(private)))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Imported::Symmetric(bytes) => bytes.expose(),
            Imported::Private(bytes, _) => bytes,
        }
    }
}

fn not_pending_deletion(agent: &Agent, key: &KeyRecord) -> Result<(), KmsError> {
    if key.row.state.is_pending_deletion() {
        return Err(KmsError::invalid_state(format!("{} is pending deletion.", agent.key_arn(&key.row.id))));
    }
    Ok(())
}

pub(super) fn token_key(agent: &Agent) -> Result<XaesKey, KmsError> {
    let secret = agent.internal_secret(TOKEN_SECRET_NAME, TOKEN_SECRET_ID).map_err(KmsError::internal)?;
    Ok(XaesKey::new(&KeyBytes::from_array(*secret)))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetParametersForImportRequest {
    key_id: String,
    wrapping_algorithm: String,
    wrapping_key_spec: String,
}

pub fn get_parameters_for_import(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: GetParametersForImportRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "GetParametersForImport", &key, |c| {
        c.with(ck::WRAPPING_ALGORITHM, req.wrapping_algorithm.clone())
            .with(ck::WRAPPING_KEY_SPEC, req.wrapping_key_spec.clone())
    })?;
    require_external(agent, &key, "GetParametersForImport")?;
    not_pending_deletion(agent, &key)?;
    let algorithm = WrappingAlgorithm::parse(&req.wrapping_algorithm).ok_or_else(|| {
        unsupported(format!(
            "WrappingAlgorithm {} is not supported: use RSAES_OAEP_SHA_256, RSAES_OAEP_SHA_1, \
             RSA_AES_KEY_WRAP_SHA_256 or RSA_AES_KEY_WRAP_SHA_1",
            req.wrapping_algorithm
        ))
    })?;
    let spec = WrappingKeySpec::parse(&req.wrapping_key_spec).ok_or_else(|| {
        unsupported(format!(
            "WrappingKeySpec {} is not supported: use RSA_2048, RSA_3072 or RSA_4096",
            req.wrapping_key_spec
        ))
    })?;
    let wrapping = WrappingKey::generate(spec).map_err(KmsError::internal)?;
    let valid_to = agent.now_ms() + TOKEN_LIFETIME_MS;
    let token = seal_token(&token_key(agent)?, TOKEN_AAD, &key.row.id, valid_to, algorithm, spec, &wrapping.to_pkcs8());
    Ok(json!({
        "KeyId": agent.key_arn(&key.row.id),
        "ImportToken": b64(&token),
        "PublicKey": b64(&wrapping.public_key_der()),
        "ParametersValidTo": millis_to_wire(valid_to),
    }))
}

/// What an import token holds.
pub(super) struct Token {
    pub(super) key_id: KeyId,
    pub(super) valid_to_ms: i64,
    pub(super) algorithm: WrappingAlgorithm,
    pub(super) private_key: Zeroizing<Vec<u8>>,
}

/// Seals a token under `aad` (this module's `TOKEN_AAD` for import tokens; replication
/// tokens have their own, so that neither passes for the other).
pub(super) fn seal_token(
    sealer: &XaesKey,
    aad: &[u8],
    key_id: &KeyId,
    valid_to_ms: i64,
    algorithm: WrappingAlgorithm,
    spec: WrappingKeySpec,
    pkcs8: &[u8],
) -> Vec<u8> {
    let mut body = Zeroizing::new(Vec::with_capacity(64 + pkcs8.len()));
    body.extend_from_slice(key_id.as_bytes());
    body.extend_from_slice(&valid_to_ms.to_be_bytes());
    for name in [algorithm.as_str(), spec.as_str()] {
        body.push(name.len() as u8);
        body.extend_from_slice(name.as_bytes());
    }
    body.extend_from_slice(pkcs8);
    sealer.seal(aad, &body)
}

pub(super) fn open_token(sealer: &XaesKey, aad: &[u8], token: &[u8]) -> Result<Token, KmsError> {
    let invalid = || KmsError::new(ErrorKind::InvalidImportTokenException, "The import token is not valid");
    let body = sealer.open(aad, token).map_err(|_| invalid())?;
    if body.len() < 24 {
        return Err(invalid());
    }
    let (id, rest) = body.split_at(16);
    let key_id = KeyId::from_bytes(id.try_into().map_err(|_| invalid())?);
    let (valid_to, mut rest) = rest.split_at(8);
    let valid_to_ms = i64::from_be_bytes(valid_to.try_into().map_err(|_| invalid())?);
    let mut names = Vec::with_capacity(2);
    for _ in 0..2 {
        let (&len, tail) = rest.split_first().ok_or_else(invalid)?;
        let (name, tail) = tail.split_at_checked(usize::from(len)).ok_or_else(invalid)?;
        names.push(String::from_utf8_lossy(name).into_owned());
        rest = tail;
    }
    let algorithm = WrappingAlgorithm::parse(&names[0]).ok_or_else(invalid)?;
    Ok(Token { key_id, valid_to_ms, algorithm, private_key: Zeroizing::new(rest.to_vec()) })
}

/// AWS's derived `KeyMaterialId` of imported material: the same material always gets the
/// same ID under one key, and the ID reveals nothing of it.
fn imported_material_id(key_id: &KeyId, material: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(MATERIAL_ID_LABEL);
    hash.update(key_id.as_bytes());
    hash.update(material);
    kmsfs_common::format::hex(&hash.finalize())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImportKeyMaterialRequest {
    key_id: String,
    import_token: Blob,
    encrypted_key_material: Blob,
    valid_to: Option<f64>,
    expiration_model: Option<String>,
    import_type: Option<String>,
    key_material_description: Option<String>,
    key_material_id: Option<String>,
}

pub fn import_key_material(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: ImportKeyMaterialRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    let model = req.expiration_model.clone().unwrap_or_else(|| "KEY_MATERIAL_EXPIRES".into());
    let valid_to_ms = req.valid_to.map(|s| (s * 1000.0) as i64);
    agent.authorize_key(caller, "ImportKeyMaterial", &key, |c| {
        let c = c.with(ck::EXPIRATION_MODEL, model.clone());
        match valid_to_ms {
            Some(ms) => c.with(ck::VALID_TO, (ms / 1000).to_string()),
            None => c,
        }
    })?;
    require_external(agent, &key, "ImportKeyMaterial")?;
    not_pending_deletion(agent, &key)?;
    let now = agent.now_ms();
    match (model.as_str(), valid_to_ms) {
        ("KEY_MATERIAL_EXPIRES", None) => {
            return Err(KmsError::validation("ValidTo is required when ExpirationModel is KEY_MATERIAL_EXPIRES"))
        }
        ("KEY_MATERIAL_DOES_NOT_EXPIRE", Some(_)) => {
            return Err(KmsError::validation(
                "ValidTo must be omitted when ExpirationModel is KEY_MATERIAL_DOES_NOT_EXPIRE",
            ))
        }
        (_, Some(ms)) if ms <= now => return Err(KmsError::validation("ValidTo must be in the future")),
        (_, Some(ms)) if ms > now + MAX_VALID_TO_MS => {
            return Err(KmsError::validation("ValidTo must be at most 365 days from now"))
        }
        _ => {}
    }
    let token = open_token(&token_key(agent)?, TOKEN_AAD, &req.import_token.0)?;
    if token.key_id != key.row.id {
        return Err(KmsError::new(
            ErrorKind::InvalidImportTokenException,
            format!("The import token was issued for another key, not {}", agent.key_arn(&key.row.id)),
        ));
    }
    if token.valid_to_ms <= now {
        return Err(KmsError::new(
            ErrorKind::ExpiredImportTokenException,
            "The import token has expired: call GetParametersForImport for a new one",
        ));
    }
    let wrapping = WrappingKey::from_pkcs8(&token.private_key).map_err(KmsError::internal)?;
    let material = wrapping.unwrap(token.algorithm, &req.encrypted_key_material.0).map_err(|_| {
        KmsError::new(
            ErrorKind::InvalidCiphertextException,
            format!(
                "The encrypted key material does not decrypt with the import token's wrapping key and {}",
                token.algorithm.as_str()
            ),
        )
    })?;
    let material = Imported::check(&key, material)?;
    let material_id = imported_material_id(&key.row.id, material.bytes());

    let record = agent.mutate(|store| {
        let current = agent.key(&key.row.id).ok_or_else(|| KmsError::not_found("The key no longer exists"))?;
        not_pending_deletion(agent, &current)?;
        let mut record = (*current).clone();
        let new = match req.import_type.as_deref() {
            Some("NEW_KEY_MATERIAL") => true,
            Some(_) => false,
            None => record.materials.is_empty(),
        };
        let version = if new {
            if !matches!(material, Imported::Symmetric(_)) && !record.materials.is_empty() {
                return Err(unsupported(format!(
                    "{} is a {} key: it has one key material, which is re-imported with ImportType \
                     EXISTING_KEY_MATERIAL; only symmetric keys take new material",
                    agent.key_arn(&record.row.id),
                    record.row.key_spec
                )));
            }
            if req.key_material_id.is_some() {
                return Err(KmsError::validation("KeyMaterialId cannot be specified with ImportType NEW_KEY_MATERIAL"));
            }
            if record.materials.values().any(|m| m.row.material_id == material_id) {
                return Err(KmsError::new(
                    ErrorKind::IncorrectKeyMaterialException,
                    "This key material is already associated with the key: re-import it with ImportType \
                     EXISTING_KEY_MATERIAL",
                ));
            }
            if record.materials.keys().any(|v| *v > record.row.current_version) {
                return Err(KmsError::invalid_state(format!(
                    "{} already has key material pending rotation: rotate to it (RotateKeyOnDemand) or delete it first",
                    agent.key_arn(&record.row.id)
                )));
            }
            let version = record.materials.keys().next_back().copied().unwrap_or(0) + 1;
            let row = MaterialRow {
                imported: true,
                ..MaterialRow::generated(record.row.id, version, material_id.clone(), Vec::new(), now)
            };
            record.materials.insert(version, Material::symmetric(row, None));
            if record.row.current_version == 0 {
                record.row.current_version = version;
            }
            version
        } else {
            let target = match &req.key_material_id {
                Some(id) => record.materials.values().find(|m| &m.row.material_id == id),
                None => record.materials.get(&record.row.current_version),
            };
            let target = target.ok_or_else(|| {
                KmsError::new(
                    ErrorKind::IncorrectKeyMaterialException,
                    format!(
                        "{} has no key material {}: import it with ImportType NEW_KEY_MATERIAL",
                        agent.key_arn(&record.row.id),
                        req.key_material_id.as_deref().unwrap_or("yet")
                    ),
                )
            })?;
            if target.row.material_id != material_id {
                return Err(KmsError::new(
                    ErrorKind::IncorrectKeyMaterialException,
                    format!(
                        "The key material is not the key material {} previously imported into {}",
                        target.row.material_id,
                        agent.key_arn(&record.row.id)
                    ),
                ));
            }
            target.row.version
        };
        let m = record.materials.get_mut(&version).ok_or_else(|| KmsError::internal("lost the imported version"))?;
        match &material {
            Imported::Symmetric(bytes) => {
                let (usable, stored) = agent.root().import(&record.row.id, version, bytes)?;
                m.row.stored = Some(stored);
                m.key = Some(usable);
            }
            Imported::Private(bytes, private) => {
                m.row.stored = Some(agent.root().seal_secret(&record.row.id, version, bytes)?);
                m.private = Some(private.clone());
            }
        }
        m.row.expiration_model = Some(model.clone());
        m.row.valid_to_ms = valid_to_ms;
        if req.key_material_description.is_some() {
            m.row.description = req.key_material_description.clone();
        }
        if record.row.state == KeyState::PendingImport && record.current().is_ok_and(Material::usable) {
            record.row.state = KeyState::Enabled;
        }
        let row = record.materials[&version].row.clone();
        store.update_key_and_materials(&record.row, &[&row])?;
        Ok(((record.clone(), row.material_id), vec![Change::Key(record)]))
    })?;
    tracing::info!(key_id = %record.0.row.id, "imported key material");
    Ok(json!({ "KeyId": agent.key_arn(&record.0.row.id), "KeyMaterialId": record.1 }))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DeleteImportedKeyMaterialRequest {
    key_id: String,
    key_material_id: Option<String>,
}

pub fn delete_imported_key_material(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: DeleteImportedKeyMaterialRequest = parse(request)?;
    let key = agent.resolve(&req.key_id, false)?;
    agent.authorize_key(caller, "DeleteImportedKeyMaterial", &key, |c| c)?;
    require_external(agent, &key, "DeleteImportedKeyMaterial")?;
    let deleted = agent.mutate(|store| {
        let current = agent.key(&key.row.id).ok_or_else(|| KmsError::not_found("The key no longer exists"))?;
        let mut record = (*current).clone();
        let arn = agent.key_arn(&record.row.id);
        let version = match &req.key_material_id {
            Some(id) => record
                .materials
                .values()
                .find(|m| &m.row.material_id == id)
                .map(|m| m.row.version)
                .ok_or_else(|| KmsError::not_found(format!("{arn} has no key material {id}")))?,
            None if record.row.current_version == 0 => {
                return Err(KmsError::invalid_state(format!("{arn} has no imported key material")))
            }
            None => record.row.current_version,
        };
        let m = record.materials.get_mut(&version).ok_or_else(|| KmsError::internal("lost the version"))?;
        m.clear();
        let row = m.row.clone();
        if version == record.row.current_version && !record.row.state.is_pending_deletion() {
            record.row.state = KeyState::PendingImport;
        }
        store.update_key_and_materials(&record.row, &[&row])?;
        // The wrapped material's freed pages: leave nothing of them in the files.
        store.scrub()?;
        Ok((row.material_id, vec![Change::Key(record)]))
    })?;
    tracing::info!(key_id = %key.row.id, material = %deleted, "deleted imported key material");
    Ok(json!({ "KeyId": agent.key_arn(&key.row.id), "KeyMaterialId": deleted }))
}
