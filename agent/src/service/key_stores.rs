//! Custom key stores: CreateCustomKeyStore, DescribeCustomKeyStores, ConnectCustomKeyStore,
//! DisconnectCustomKeyStore, UpdateCustomKeyStore and DeleteCustomKeyStore, for stores of
//! type `AWS_CLOUDHSM` backed by PKCS#11 tokens (see [`crate::key_stores`] for why that
//! type, and how a cluster ID names a token).
//!
//! The store's password (the token's user PIN) is kept sealed with XAES-256-GCM under an
//! internal secret of the agent's root of trust, bound to the store's ID; it is never
//! returned, logged or audited.

use std::sync::Arc;

use kmsfs_common::aead::{random_bytes, KeyBytes, XaesKey};
use kmsfs_common::time::millis_to_wire;
use kmsfs_common::{ErrorKind, KmsError};
use serde::Deserialize;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::wire::{paginate, parse, with_page_info, SecretText};
use crate::agent::{Agent, Change, KeyRecord};
use crate::key_stores::{Connection, KeyStore};
use crate::policy::eval::Caller;
use crate::rot::pkcs11::{Pkcs11Root, Token, TokenConfig};
use crate::rot::RootOfTrust;
use crate::store::KeyStoreRow;

/// AWS's quota of custom key stores per account and Region.
const MAX_KEY_STORES: usize = 10;
const CLOUDHSM: &str = "AWS_CLOUDHSM";
/// The internal secret that seals key store passwords, and its reserved key ID.
const PASSWORD_SECRET_NAME: &str = "key_store_password_key";
const PASSWORD_SECRET_ID: [u8; 16] = *b"kmsd keystore pw";
const PASSWORD_AAD: &[u8] = b"kmsd custom key store password v1\0";

fn error(kind: ErrorKind, message: impl Into<String>) -> KmsError {
    KmsError::new(kind, message)
}

fn password_key(agent: &Agent) -> Result<XaesKey, KmsError> {
    let secret = agent.internal_secret(PASSWORD_SECRET_NAME, PASSWORD_SECRET_ID).map_err(KmsError::internal)?;
    Ok(XaesKey::new(&KeyBytes::from_array(*secret)))
}

fn password_aad(store_id: &str) -> Vec<u8> {
    [PASSWORD_AAD, store_id.as_bytes()].concat()
}

/// nonce ‖ XAES-256-GCM(password) ‖ tag, bound to the store's ID.
fn seal_password(key: &XaesKey, store_id: &str, password: &str) -> Vec<u8> {
    key.seal(&password_aad(store_id), password.as_bytes())
}

fn open_password(key: &XaesKey, store_id: &str, sealed: &[u8]) -> Result<Zeroizing<String>, KmsError> {
    let damaged = || KmsError::internal(format!("the stored password of custom key store {store_id} does not open"));
    let body = key.open(&password_aad(store_id), sealed).map_err(|_| damaged())?;
    String::from_utf8(body.to_vec()).map(Zeroizing::new).map_err(|_| damaged())
}

/// A new store ID in AWS's shape: `cks-` and 17 hex digits.
fn new_store_id() -> String {
    let mut bytes = [0u8; 9];
    random_bytes(&mut bytes);
    let hex = kmsfs_common::format::hex(&bytes);
    format!("cks-{}", &hex[..17])
}

/// One entry of DescribeCustomKeyStores.
fn entry(store: &KeyStore) -> Value {
    let row = &store.row;
    let mut out = json!({
        "CustomKeyStoreId": row.id,
        "CustomKeyStoreName": row.name,
        "CustomKeyStoreType": row.store_type,
        "CloudHsmClusterId": row.cluster_id,
        "ConnectionState": store.connection.state(),
        "CreationDate": millis_to_wire(row.created_ms),
    });
    if let Some(anchor) = &row.trust_anchor {
        out["TrustAnchorCertificate"] = json!(anchor);
    }
    if let Connection::Failed(code) = &store.connection {
        out["ConnectionErrorCode"] = json!(code);
    }
    out
}

/// The cluster (token) `cluster_id` must be declared in `hsm-clusters.json`.
fn require_cluster(agent: &Agent, cluster_id: &str) -> Result<(), KmsError> {
    if agent.cluster(cluster_id).is_none() {
        return Err(error(
            ErrorKind::CloudHsmClusterNotFoundException,
            format!(
                "CloudHSM cluster '{cluster_id}' is not declared: add it, with its PKCS#11 module and token label, to \
                 {} in kmsd's configuration directory and reload kmsd (SIGHUP)",
                crate::key_stores::CLUSTERS_FILE
            ),
        ));
    }
    Ok(())
}

/// A cluster serves one key store at most, as in AWS.
fn require_cluster_free(agent: &Agent, cluster_id: &str, except: Option<&str>) -> Result<(), KmsError> {
    if let Some(other) =
        agent.key_stores().into_iter().find(|s| s.row.cluster_id == cluster_id && Some(s.row.id.as_str()) != except)
    {
        return Err(error(
            ErrorKind::CloudHsmClusterInUseException,
            format!("CloudHSM cluster '{cluster_id}' is already associated with custom key store {}", other.row.id),
        ));
    }
    Ok(())
}

fn require_name_free(agent: &Agent, name: &str, except: Option<&str>) -> Result<(), KmsError> {
    if agent.key_stores().iter().any(|s| s.row.name == name && Some(s.row.id.as_str()) != except) {
        return Err(error(
            ErrorKind::CustomKeyStoreNameInUseException,
            format!("A custom key store named '{name}' already exists"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateRequest {
    custom_key_store_name: String,
    cloud_hsm_cluster_id: Option<String>,
    trust_anchor_certificate: Option<String>,
    key_store_password: Option<SecretText>,
    custom_key_store_type: Option<String>,
    xks_proxy_uri_endpoint: Option<String>,
}

pub fn create_custom_key_store(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: CreateRequest = parse(request)?;
    agent.authorize_account(caller, "CreateCustomKeyStore", |c| c)?;
    let store_type = req.custom_key_store_type.as_deref().unwrap_or(CLOUDHSM);
    if store_type != CLOUDHSM || req.xks_proxy_uri_endpoint.is_some() {
        return Err(error(
            ErrorKind::UnsupportedOperationException,
            "External key stores (EXTERNAL_KEY_STORE) are not supported: kmsd's custom key stores are PKCS#11 \
             tokens of type AWS_CLOUDHSM",
        ));
    }
    let cluster_id = req
        .cloud_hsm_cluster_id
        .ok_or_else(|| KmsError::validation("An AWS_CLOUDHSM custom key store needs a CloudHsmClusterId"))?;
    let password = req
        .key_store_password
        .ok_or_else(|| KmsError::validation("An AWS_CLOUDHSM custom key store needs a KeyStorePassword"))?;
    require_cluster(agent, &cluster_id)?;
    let key = password_key(agent)?;
    agent.mutate(|store| {
        // Checked under the store's lock, so that two creations cannot both pass.
        require_name_free(agent, &req.custom_key_store_name, None)?;
        require_cluster_free(agent, &cluster_id, None)?;
        if agent.key_stores().len() >= MAX_KEY_STORES {
            return Err(error(
                ErrorKind::LimitExceededException,
                format!("An account can have at most {MAX_KEY_STORES} custom key stores"),
            ));
        }
        let id = new_store_id();
        let row = KeyStoreRow {
            sealed_password: seal_password(&key, &id, &password.0),
            id: id.clone(),
            name: req.custom_key_store_name.clone(),
            store_type: CLOUDHSM.to_string(),
            cluster_id: cluster_id.clone(),
            trust_anchor: req.trust_anchor_certificate.clone(),
            connect: false,
            created_ms: agent.now_ms(),
        };
        store.put_key_store(&row)?;
        tracing::info!(custom_key_store_id = %id, cluster_id = %cluster_id, "custom key store created");
        let change = Change::KeyStore(KeyStore { row, connection: Connection::Disconnected });
        Ok((json!({ "CustomKeyStoreId": id }), vec![change]))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeRequest {
    custom_key_store_id: Option<String>,
    custom_key_store_name: Option<String>,
    limit: Option<i64>,
    marker: Option<String>,
}

pub fn describe_custom_key_stores(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: DescribeRequest = parse(request)?;
    agent.authorize_account(caller, "DescribeCustomKeyStores", |c| c)?;
    let stores = match (&req.custom_key_store_id, &req.custom_key_store_name) {
        (Some(_), Some(_)) => {
            return Err(KmsError::validation("Specify CustomKeyStoreId or CustomKeyStoreName, not both"));
        }
        (Some(id), None) => vec![agent.key_store(id)?],
        (None, Some(name)) => {
            let found: Vec<KeyStore> = agent.key_stores().into_iter().filter(|s| &s.row.name == name).collect();
            if found.is_empty() {
                return Err(error(
                    ErrorKind::CustomKeyStoreNotFoundException,
                    format!("No custom key store is named '{name}'"),
                ));
            }
            found
        }
        (None, None) => agent.key_stores(),
    };
    let (page, next) = paginate(stores, |s| s.row.id.clone(), req.limit, 1000, 1000, req.marker.as_deref())?;
    let entries: Vec<Value> = page.iter().map(entry).collect();
    Ok(with_page_info(json!({ "CustomKeyStores": entries }), next))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IdRequest {
    custom_key_store_id: String,
}

pub fn connect_custom_key_store(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: IdRequest = parse(request)?;
    agent.authorize_account(caller, "ConnectCustomKeyStore", |c| c)?;
    let store = agent.key_store(&req.custom_key_store_id)?;
    match store.connection {
        Connection::Connected(_) => return Ok(json!({})),
        Connection::Failed(_) => {
            return Err(error(
                ErrorKind::CustomKeyStoreInvalidStateException,
                format!(
                    "Custom key store {} is FAILED: disconnect it (DisconnectCustomKeyStore), correct the error, then \
                     connect it again",
                    store.row.id
                ),
            ))
        }
        Connection::Disconnected => {}
    }
    let key = password_key(agent)?;
    connect(agent, &store.row.id, &key)?;
    Ok(json!({}))
}

/// Connects store `id` (and records that it is to stay connected): logs in to its token and
/// loads the material of its keys. A failure is the store's `FAILED` state, not an error.
fn connect(agent: &Agent, id: &str, password_key: &XaesKey) -> Result<(), KmsError> {
    agent.mutate(|db| {
        let store = agent.key_store(id)?;
        if !matches!(store.connection, Connection::Disconnected) {
            return Ok(((), Vec::new()));
        }
        let row = KeyStoreRow { connect: true, ..store.row.clone() };
        db.put_key_store(&row)?;
        let (connection, keys) = match open_token(agent, &row, password_key) {
            Ok(root) => match load_keys(agent, id, &root) {
                Ok(keys) => {
                    tracing::info!(custom_key_store_id = %id, keys = keys.len(), token = %root.describe(), "custom key store connected");
                    (Connection::Connected(root), keys)
                }
                Err(e) => {
                    tracing::error!(custom_key_store_id = %id, "custom key store FAILED: {}", e.message);
                    root.token().close();
                    (Connection::Failed("INTERNAL_ERROR"), Vec::new())
                }
            },
            Err(code) => (Connection::Failed(code), Vec::new()),
        };
        let mut changes: Vec<Change> = keys.into_iter().map(Change::Key).collect();
        changes.push(Change::KeyStore(KeyStore { row, connection }));
        Ok(((), changes))
    })
}

/// Logs in to the token behind `row`; on failure, AWS's `ConnectionErrorCode`.
fn open_token(agent: &Agent, row: &KeyStoreRow, password_key: &XaesKey) -> Result<Arc<Pkcs11Root>, &'static str> {
    let Some(cluster) = agent.cluster(&row.cluster_id) else {
        tracing::error!(custom_key_store_id = %row.id, cluster_id = %row.cluster_id, "custom key store FAILED: its cluster is no longer declared in {}", crate::key_stores::CLUSTERS_FILE);
        return Err("CLUSTER_NOT_FOUND");
    };
    let pin = open_password(password_key, &row.id, &row.sealed_password).map_err(|e| {
        tracing::error!(custom_key_store_id = %row.id, "custom key store FAILED: {}", e.message);
        "INTERNAL_ERROR"
    })?;
    let config = TokenConfig { module: cluster.module, token_label: cluster.token_label, pin };
    let token = Token::connect(&config).map_err(|e| {
        tracing::error!(custom_key_store_id = %row.id, cluster_id = %row.cluster_id, "custom key store FAILED: {e}");
        e.connection_error_code()
    })?;
    Ok(Arc::new(Pkcs11Root::new(token)))
}

/// The keys of store `id`, with their material loaded from `root`.
fn load_keys(agent: &Agent, id: &str, root: &Arc<Pkcs11Root>) -> Result<Vec<KeyRecord>, KmsError> {
    let mut keys = Vec::new();
    for key in agent.keys_in_store(id) {
        let mut record = (*key).clone();
        for m in record.materials.values_mut() {
            if let Some(stored) = &m.row.stored {
                m.key = Some(root.load(&m.row.key_id, m.row.version, stored)?);
            }
        }
        record.available = true;
        keys.push(record);
    }
    Ok(keys)
}

/// Connects, at start, the stores that were connected when kmsd stopped.
pub fn reconnect_all(agent: &Agent) {
    let stores: Vec<KeyStore> = agent.key_stores().into_iter().filter(|s| s.row.connect).collect();
    if stores.is_empty() {
        return;
    }
    let key = match password_key(agent) {
        Ok(key) => key,
        Err(e) => {
            tracing::error!("custom key stores not reconnected: {}", e.message);
            return;
        }
    };
    for store in stores {
        if let Err(e) = connect(agent, &store.row.id, &key) {
            tracing::error!(custom_key_store_id = %store.row.id, "custom key store not reconnected: {}", e.message);
        }
    }
}

pub fn disconnect_custom_key_store(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: IdRequest = parse(request)?;
    agent.authorize_account(caller, "DisconnectCustomKeyStore", |c| c)?;
    let closed = agent.mutate(|db| {
        let store = agent.key_store(&req.custom_key_store_id)?;
        if let Connection::Disconnected = store.connection {
            return Err(error(
                ErrorKind::CustomKeyStoreInvalidStateException,
                format!("Custom key store {} is already DISCONNECTED", store.row.id),
            ));
        }
        let row = KeyStoreRow { connect: false, ..store.row.clone() };
        db.put_key_store(&row)?;
        let mut changes: Vec<Change> = agent
            .keys_in_store(&row.id)
            .into_iter()
            .map(|key| {
                let mut record = (*key).clone();
                for m in record.materials.values_mut() {
                    m.key = None;
                }
                record.available = false;
                Change::Key(record)
            })
            .collect();
        changes.push(Change::KeyStore(KeyStore { row, connection: Connection::Disconnected }));
        tracing::info!(custom_key_store_id = %store.row.id, "custom key store disconnected");
        Ok((store.root().cloned(), changes))
    })?;
    // After the keys are unavailable, so that no new use starts on a closing token.
    if let Some(root) = closed {
        root.token().close();
    }
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateRequest {
    custom_key_store_id: String,
    new_custom_key_store_name: Option<String>,
    key_store_password: Option<SecretText>,
    cloud_hsm_cluster_id: Option<String>,
    xks_proxy_uri_endpoint: Option<String>,
    xks_proxy_uri_path: Option<String>,
    xks_proxy_vpc_endpoint_service_name: Option<String>,
    xks_proxy_authentication_credential: Option<Value>,
    xks_proxy_connectivity: Option<String>,
}

pub fn update_custom_key_store(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: UpdateRequest = parse(request)?;
    agent.authorize_account(caller, "UpdateCustomKeyStore", |c| c)?;
    if req.xks_proxy_uri_endpoint.is_some()
        || req.xks_proxy_uri_path.is_some()
        || req.xks_proxy_vpc_endpoint_service_name.is_some()
        || req.xks_proxy_authentication_credential.is_some()
        || req.xks_proxy_connectivity.is_some()
    {
        return Err(error(
            ErrorKind::UnsupportedOperationException,
            "The XksProxy properties apply to external key stores, which kmsd does not support",
        ));
    }
    if let Some(cluster_id) = &req.cloud_hsm_cluster_id {
        require_cluster(agent, cluster_id)?;
    }
    let key = match req.key_store_password {
        Some(_) => Some(password_key(agent)?),
        None => None,
    };
    agent.mutate(|db| {
        let store = agent.key_store(&req.custom_key_store_id)?;
        let mut row = store.row.clone();
        let changes_connection = req.key_store_password.is_some() || req.cloud_hsm_cluster_id.is_some();
        if changes_connection && !matches!(store.connection, Connection::Disconnected) {
            return Err(error(
                ErrorKind::CustomKeyStoreInvalidStateException,
                format!(
                    "Custom key store {} is {}: only its name can change while it is not DISCONNECTED",
                    row.id,
                    store.connection.state()
                ),
            ));
        }
        if let Some(name) = &req.new_custom_key_store_name {
            require_name_free(agent, name, Some(&row.id))?;
            row.name = name.clone();
        }
        if let Some(cluster_id) = &req.cloud_hsm_cluster_id {
            require_cluster_free(agent, cluster_id, Some(&row.id))?;
            row.cluster_id = cluster_id.clone();
        }
        if let (Some(password), Some(key)) = (&req.key_store_password, &key) {
            row.sealed_password = seal_password(key, &row.id, &password.0);
        }
        db.put_key_store(&row)?;
        Ok((json!({}), vec![Change::KeyStore(KeyStore { row, connection: store.connection.clone() })]))
    })
}

pub fn delete_custom_key_store(agent: &Agent, caller: &Caller, request: Value) -> Result<Value, KmsError> {
    let req: IdRequest = parse(request)?;
    agent.authorize_account(caller, "DeleteCustomKeyStore", |c| c)?;
    agent.mutate(|db| {
        let store = agent.key_store(&req.custom_key_store_id)?;
        if !matches!(store.connection, Connection::Disconnected) {
            return Err(error(
                ErrorKind::CustomKeyStoreInvalidStateException,
                format!("Custom key store {} is {}: disconnect it first", store.row.id, store.connection.state()),
            ));
        }
        let keys = agent.keys_in_store(&store.row.id);
        if !keys.is_empty() {
            return Err(error(
                ErrorKind::CustomKeyStoreHasCMKsException,
                format!(
                    "Custom key store {} still holds {} KMS key(s), {}: schedule their deletion and wait for it",
                    store.row.id,
                    keys.len(),
                    agent.key_arn(&keys[0].row.id)
                ),
            ));
        }
        db.delete_key_store(&store.row.id)?;
        tracing::info!(custom_key_store_id = %store.row.id, "custom key store deleted");
        Ok((json!({}), vec![Change::KeyStoreDeleted(store.row.id)]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_sealed_to_their_store() {
        let key = XaesKey::new(&KeyBytes::random());
        let sealed = seal_password(&key, "cks-1", "correct horse");
        assert_eq!(&open_password(&key, "cks-1", &sealed).unwrap()[..], "correct horse");
        assert!(open_password(&key, "cks-2", &sealed).is_err());
        assert!(open_password(&XaesKey::new(&KeyBytes::random()), "cks-1", &sealed).is_err());
        assert!(open_password(&key, "cks-1", &sealed[..10]).is_err());
        assert!(!sealed.windows(13).any(|w| w == b"correct horse"));
    }

    #[test]
    fn store_ids_look_like_aws_ones() {
        let id = new_store_id();
        assert_eq!(id.len(), 21);
        assert!(id.starts_with("cks-") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(id, new_store_id());
    }
}
