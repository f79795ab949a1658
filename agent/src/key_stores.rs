//! Custom key stores: AWS's CloudHSM key stores, backed here by PKCS#11 tokens.
//!
//! AWS's model has two kinds of custom key store. An `AWS_CLOUDHSM` store is a cluster of
//! PKCS#11 HSMs in which KMS generates each key's material, non-extractable, and runs every
//! cryptographic operation, logged in as a crypto user whose password (`KeyStorePassword`)
//! KMS keeps; an `EXTERNAL_KEY_STORE` is a proxy to a key manager outside, whose keys KMS
//! never creates. A PKCS#11 token on this host is the first kind, so that is the type kmsd
//! implements: `CloudHsmClusterId` names a token the operator declared in
//! `CONFIG_DIR/hsm-clusters.json`, `KeyStorePassword` is its user PIN, and `CreateKey` with
//! `Origin=AWS_CLOUDHSM` generates the key in the token.
//!
//! ```json
//! { "clusters": { "cluster-softhsm2store1": {
//!     "module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "store1" } } }
//! ```
//!
//! A store is `CONNECTED` while kmsd is logged in to its token. Connecting happens within
//! ConnectCustomKeyStore (AWS returns at once and connects in the background; here the
//! reply comes once the attempt is over, `CONNECTED` or `FAILED` with a
//! `ConnectionErrorCode`), and again at every start for stores left connected. While a
//! store is not connected its keys are `Unavailable`: they can be managed but not used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::rot::pkcs11::Pkcs11Root;
use crate::store::KeyStoreRow;

/// The file that declares the tokens custom key stores may use.
pub const CLUSTERS_FILE: &str = "hsm-clusters.json";

/// A PKCS#11 token the operator offers to custom key stores, under a CloudHSM cluster ID.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub module: PathBuf,
    pub token_label: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClustersFile {
    clusters: BTreeMap<String, Cluster>,
}

/// Reads `CONFIG_DIR/hsm-clusters.json`; none declared if it does not exist.
pub fn load_clusters(config_dir: Option<&Path>) -> Result<BTreeMap<String, Cluster>, String> {
    let Some(dir) = config_dir else { return Ok(BTreeMap::new()) };
    let path = dir.join(CLUSTERS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let file: ClustersFile =
        serde_json::from_str(&text).map_err(|e| format!("{} is malformed: {e}", path.display()))?;
    for id in file.clusters.keys() {
        if !valid_cluster_id(id) {
            return Err(format!(
                "{}: '{id}' is not a CloudHSM cluster ID (cluster- and 11 to 16 letters or digits 2-7)",
                path.display()
            ));
        }
    }
    Ok(file.clusters)
}

/// AWS's pattern for cluster IDs: `cluster-[2-7a-zA-Z]{11,16}`.
pub fn valid_cluster_id(id: &str) -> bool {
    id.strip_prefix("cluster-").is_some_and(|rest| {
        (11..=16).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphabetic() || (b'2'..=b'7').contains(&b))
    })
}

/// Where a store's connection stands.
#[derive(Clone)]
pub enum Connection {
    Disconnected,
    Connected(Arc<Pkcs11Root>),
    /// The last attempt failed, with AWS's `ConnectionErrorCode`.
    Failed(&'static str),
}

impl Connection {
    /// AWS's `ConnectionState`.
    pub fn state(&self) -> &'static str {
        match self {
            Connection::Disconnected => "DISCONNECTED",
            Connection::Connected(_) => "CONNECTED",
            Connection::Failed(_) => "FAILED",
        }
    }
}

/// A custom key store as the agent holds it.
#[derive(Clone)]
pub struct KeyStore {
    pub row: KeyStoreRow,
    pub connection: Connection,
}

impl KeyStore {
    /// The token, while connected.
    pub fn root(&self) -> Option<&Arc<Pkcs11Root>> {
        match &self.connection {
            Connection::Connected(root) => Some(root),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_follow_aws_pattern() {
        assert!(valid_cluster_id("cluster-2a23b4cdefg"));
        assert!(valid_cluster_id("cluster-softhsmstore"));
        assert!(!valid_cluster_id("cluster-short"));
        assert!(!valid_cluster_id("cluster-has1digit"));
        assert!(!valid_cluster_id("softhsm-abcdefghijk"));
        assert!(!valid_cluster_id("cluster-abcdefghijklmnopq"));
    }

    #[test]
    fn clusters_file_is_optional_and_strict() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_clusters(Some(dir.path())).unwrap().is_empty());
        std::fs::write(
            dir.path().join(CLUSTERS_FILE),
            r#"{"clusters": {"cluster-abcdefghijk": {"module": "/m.so", "token_label": "t"}}}"#,
        )
        .unwrap();
        let clusters = load_clusters(Some(dir.path())).unwrap();
        assert_eq!(clusters["cluster-abcdefghijk"].token_label, "t");
        std::fs::write(
            dir.path().join(CLUSTERS_FILE),
            r#"{"clusters": {"bad": {"module": "/m", "token_label": "t"}}}"#,
        )
        .unwrap();
        assert!(load_clusters(Some(dir.path())).unwrap_err().contains("not a CloudHSM cluster ID"));
        std::fs::write(dir.path().join(CLUSTERS_FILE), r#"{"clusters": {}, "extra": 1}"#).unwrap();
        assert!(load_clusters(Some(dir.path())).is_err());
    }
}
