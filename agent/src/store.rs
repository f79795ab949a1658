//! The metadata store: keys, their wrapped material, aliases and tags in one SQLite
//! database (WAL, `synchronous=FULL`, `secure_delete=ON`). Each mutation is one
//! transaction, committed — and so durable — before the agent replies. Key material is
//! stored only in the form the root of trust returned (wrapped, or a token handle).

use std::collections::BTreeMap;
use std::path::Path;

use kmsfs_common::ids::KeyId;
use kmsfs_common::KmsError;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

/// Schema versions, applied in order; `PRAGMA user_version` records the last applied.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE meta (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
    CREATE TABLE keys (
        key_id          TEXT PRIMARY KEY,
        created_ms      INTEGER NOT NULL,
        description     TEXT NOT NULL,
        key_usage       TEXT NOT NULL,
        key_spec        TEXT NOT NULL,
        origin          TEXT NOT NULL,
        state           TEXT NOT NULL,
        deletion_ms     INTEGER,
        pending_days    INTEGER,
        current_version INTEGER NOT NULL
    );
    CREATE TABLE key_material (
        key_id      TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        version     INTEGER NOT NULL,
        material_id TEXT NOT NULL,
        stored      BLOB NOT NULL,
        created_ms  INTEGER NOT NULL,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE aliases (
        alias_name TEXT PRIMARY KEY,
        key_id     TEXT NOT NULL REFERENCES keys(key_id),
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX aliases_by_key ON aliases(key_id);
    CREATE TABLE tags (
        key_id    TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        tag_key   TEXT NOT NULL,
        tag_value TEXT NOT NULL,
        PRIMARY KEY (key_id, tag_key)
    );
"#,
    r#"
    -- Access control: key policies (empty = the default policy, for keys made before this
    -- version) and grants.
    ALTER TABLE keys ADD COLUMN policy TEXT NOT NULL DEFAULT '';
    CREATE TABLE grants (
        grant_id        TEXT PRIMARY KEY,
        key_id          TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        token           TEXT NOT NULL UNIQUE,
        name            TEXT,
        grantee         TEXT NOT NULL,
        retiring        TEXT,
        operations      TEXT NOT NULL,
        constraints     TEXT,
        issuing_account TEXT NOT NULL,
        created_ms      INTEGER NOT NULL
    );
    CREATE INDEX grants_by_key ON grants(key_id);
"#,
    r#"
    -- Key lifecycle: automatic rotation, and the versions' provenance (rotations, imported
    -- material). A version's `stored` is NULL while imported material is deleted or expired.
    ALTER TABLE keys ADD COLUMN rotation_period_days INTEGER;
    ALTER TABLE keys ADD COLUMN next_rotation_ms INTEGER;
    CREATE TABLE key_material_v3 (
        key_id           TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        version          INTEGER NOT NULL,
        material_id      TEXT NOT NULL,
        stored           BLOB,
        created_ms       INTEGER NOT NULL,
        rotation_type    TEXT,
        rotation_ms      INTEGER,
        imported         INTEGER NOT NULL DEFAULT 0,
        expiration_model TEXT,
        valid_to_ms      INTEGER,
        description      TEXT,
        PRIMARY KEY (key_id, version)
    );
    INSERT INTO key_material_v3 (key_id, version, material_id, stored, created_ms)
        SELECT key_id, version, material_id, stored, created_ms FROM key_material;
    DROP TABLE key_material;
    ALTER TABLE key_material_v3 RENAME TO key_material;
    -- GetKeyLastUsage: the last successful cryptographic operation per key.
    CREATE TABLE key_last_usage (
        key_id      TEXT PRIMARY KEY REFERENCES keys(key_id) ON DELETE CASCADE,
        operation   TEXT NOT NULL,
        time_ms     INTEGER NOT NULL,
        request_id  TEXT NOT NULL,
        event_id    TEXT NOT NULL
    );
"#,
    r#"
    -- Custom key stores (AWS_CLOUDHSM type, backed by PKCS#11 tokens) and the keys in them.
    -- `password` is the token's user PIN sealed by the agent (never in clear); `connect`
    -- is whether the store is to be connected (it reconnects at start).
    CREATE TABLE custom_key_stores (
        key_store_id   TEXT PRIMARY KEY,
        name           TEXT NOT NULL UNIQUE,
        store_type     TEXT NOT NULL,
        cluster_id     TEXT NOT NULL,
        trust_anchor   TEXT,
        password       BLOB NOT NULL,
        connect        INTEGER NOT NULL DEFAULT 0,
        created_ms     INTEGER NOT NULL
    );
    ALTER TABLE keys ADD COLUMN custom_key_store_id TEXT REFERENCES custom_key_stores(key_store_id);
"#,
    r#"
    -- Multi-Region keys: the key's configuration as this agent last learnt it (JSON
    -- {"Primary": region, "Replicas": [regions]}), NULL for single-Region keys; and the
    -- replicas a primary still has to bring up to date (new material, configuration).
    ALTER TABLE keys ADD COLUMN multi_region TEXT;
    CREATE TABLE replica_sync (
        key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        region TEXT NOT NULL,
        PRIMARY KEY (key_id, region)
    );
    -- Destroyed replicas whose primary's agent is still to be told (the key row is gone).
    CREATE TABLE replica_removals (
        key_id         TEXT PRIMARY KEY,
        primary_region TEXT NOT NULL
    );
"#,
];

/// Set in `meta` by the transaction that destroys a key, cleared once the files are scrubbed.
const SCRUB_PENDING: &str = "scrub_pending";

/// A key's state, with AWS's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    /// A multi-Region primary key scheduled for deletion, waiting for its replicas to be
    /// deleted; then it is PendingDeletion for its waiting period (`pending_days`).
    PendingReplicaDeletion,
    /// An `EXTERNAL` key without usable current material: never imported, deleted or expired.
    PendingImport,
    /// A key whose custom key store is not connected (never stored: the stored state is
    /// the one it returns to on reconnection).
    Unavailable,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
            KeyState::PendingReplicaDeletion => "PendingReplicaDeletion",
            KeyState::PendingImport => "PendingImport",
            KeyState::Unavailable => "Unavailable",
        }
    }

    /// Scheduled for deletion: PendingDeletion, or PendingReplicaDeletion on the way to it.
    pub fn is_pending_deletion(self) -> bool {
        matches!(self, KeyState::PendingDeletion | KeyState::PendingReplicaDeletion)
    }

    fn parse(s: &str) -> Option<KeyState> {
        match s {
            "Enabled" => Some(KeyState::Enabled),
            "Disabled" => Some(KeyState::Disabled),
            "PendingDeletion" => Some(KeyState::PendingDeletion),
            "PendingReplicaDeletion" => Some(KeyState::PendingReplicaDeletion),
            "PendingImport" => Some(KeyState::PendingImport),
            _ => None,
        }
    }
}

/// A key's metadata as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub id: KeyId,
    pub created_ms: i64,
    pub description: String,
    pub key_usage: String,
    pub key_spec: String,
    pub origin: String,
    pub state: KeyState,
    pub deletion_ms: Option<i64>,
    pub pending_days: Option<u32>,
    /// The version new ciphertexts are made with; 0 for an `EXTERNAL` key never imported.
    pub current_version: u32,
    /// The key policy document; empty means the default key policy.
    pub policy: String,
    /// Automatic rotation: its period when enabled, and when the next one is due.
    pub rotation_period_days: Option<u32>,
    pub next_rotation_ms: Option<i64>,
    /// The custom key store whose token holds the material (`Origin` `AWS_CLOUDHSM`).
    pub custom_key_store_id: Option<String>,
    /// Of a multi-Region key: its primary and replica regions.
    pub multi_region: Option<MultiRegion>,
}

/// A multi-Region key's configuration: which region holds the primary key and which hold
/// replicas. The primary's agent is the authority; replicas learn it from the primary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MultiRegion {
    pub primary: String,
    pub replicas: Vec<String>,
}

impl MultiRegion {
    /// Every region the key is in, primary first.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.primary.as_str()).chain(self.replicas.iter().map(String::as_str))
    }
}

/// A custom key store, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStoreRow {
    pub id: String,
    pub name: String,
    /// `AWS_CLOUDHSM`: a PKCS#11 token declared in the configuration under `cluster_id`.
    pub store_type: String,
    pub cluster_id: String,
    pub trust_anchor: Option<String>,
    /// The token's user PIN (AWS's `KeyStorePassword`), sealed by the agent.
    pub sealed_password: Vec<u8>,
    /// Whether it is to be connected: set by Connect, cleared by Disconnect.
    pub connect: bool,
    pub created_ms: i64,
}

/// A grant, as stored. Operations and constraints are kept as their JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub grant_id: String,
    pub key_id: KeyId,
    pub token: String,
    pub name: Option<String>,
    pub grantee: String,
    pub retiring: Option<String>,
    pub operations: Vec<String>,
    /// `{"EncryptionContextSubset": {...}}` or `{"EncryptionContextEquals": {...}}`.
    pub constraints: Option<serde_json::Value>,
    pub issuing_account: String,
    pub created_ms: i64,
}

/// One version of a key's material, in the root of trust's stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialRow {
    pub key_id: KeyId,
    pub version: u32,
    pub material_id: String,
    /// `None` while imported material is deleted or expired (awaiting re-import).
    pub stored: Option<Vec<u8>>,
    pub created_ms: i64,
    /// `AUTOMATIC` or `ON_DEMAND` for versions made by a rotation; `None` for the first.
    pub rotation_type: Option<String>,
    /// When the version became current (by rotation).
    pub rotation_ms: Option<i64>,
    /// Imported (BYOK) material rather than material the root of trust generated.
    pub imported: bool,
    /// Of imported material: `KEY_MATERIAL_EXPIRES` (with `valid_to_ms`) or `..._DOES_NOT_EXPIRE`.
    pub expiration_model: Option<String>,
    pub valid_to_ms: Option<i64>,
    pub description: Option<String>,
}

impl MaterialRow {
    /// A version generated by the root of trust.
    pub fn generated(
        key_id: KeyId,
        version: u32,
        material_id: String,
        stored: Vec<u8>,
        created_ms: i64,
    ) -> MaterialRow {
        MaterialRow {
            key_id,
            version,
            material_id,
            stored: Some(stored),
            created_ms,
            rotation_type: None,
            rotation_ms: None,
            imported: false,
            expiration_model: None,
            valid_to_ms: None,
            description: None,
        }
    }
}

/// The last successful cryptographic operation with a key (GetKeyLastUsage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub key_id: KeyId,
    pub operation: String,
    pub time_ms: i64,
    pub request_id: String,
    pub event_id: String,
}

/// An alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRow {
    pub name: String,
    pub key_id: KeyId,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Everything the store holds, read at start-up.
pub struct Snapshot {
    pub keys: Vec<KeyRow>,
    pub materials: Vec<MaterialRow>,
    pub aliases: Vec<AliasRow>,
    pub tags: Vec<(KeyId, String, String)>,
    pub grants: Vec<GrantRow>,
    pub usage: Vec<UsageRow>,
    pub key_stores: Vec<KeyStoreRow>,
}

pub struct Store {
    conn: Connection,
}

fn db_error(e: rusqlite::Error) -> KmsError {
    KmsError::internal(format!("metadata store: {e}"))
}

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidParameterName(format!("corrupt {what} in the metadata store"))
}

impl Store {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, String> {
        let conn = Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA secure_delete=ON; \
             PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
        )
        .map_err(|e| format!("cannot configure {}: {e}", path.display()))?;
        let mut store = Store { conn };
        store.migrate().map_err(|e| format!("cannot migrate {}: {e}", path.display()))?;
        Ok(store)
    }

    fn migrate(&mut self) -> rusqlite::Result<()> {
        let current: usize = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current > MIGRATIONS.len() {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "database schema version {current} is newer than this kmsd ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, KmsError> {
        self.conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(db_error)
    }

    pub fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)", params![name, value])?;
            Ok(())
        })
    }

    /// Reads the whole store.
    pub fn snapshot(&self) -> Result<Snapshot, KmsError> {
        let read = || -> rusqlite::Result<Snapshot> {
            let parse_id = |s: String| KeyId::parse(&s).ok_or_else(|| corrupt("key ID"));
            let mut stmt = self.conn.prepare(
                "SELECT key_id, created_ms, description, key_usage, key_spec, origin, state, \
                 deletion_ms, pending_days, current_version, policy, rotation_period_days, next_rotation_ms, \
                 custom_key_store_id, multi_region FROM keys",
            )?;
            let keys = stmt
                .query_map([], |r| {
                    Ok(KeyRow {
                        id: parse_id(r.get(0)?)?,
                        created_ms: r.get(1)?,
                        description: r.get(2)?,
                        key_usage: r.get(3)?,
                        key_spec: r.get(4)?,
                        origin: r.get(5)?,
                        state: KeyState::parse(&r.get::<_, String>(6)?).ok_or_else(|| corrupt("key state"))?,
                        deletion_ms: r.get(7)?,
                        pending_days: r.get(8)?,
                        current_version: r.get(9)?,
                        policy: r.get(10)?,
                        rotation_period_days: r.get(11)?,
                        next_rotation_ms: r.get(12)?,
                        custom_key_store_id: r.get(13)?,
                        multi_region: r
                            .get::<_, Option<String>>(14)?
                            .map(|json| serde_json::from_str(&json))
                            .transpose()
                            .map_err(|_| corrupt("multi-Region configuration"))?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = self.conn.prepare(
                "SELECT key_id, version, material_id, stored, created_ms, rotation_type, rotation_ms, imported, \
                 expiration_model, valid_to_ms, description FROM key_material",
            )?;
            let materials = stmt
                .query_map([], |r| {
                    Ok(MaterialRow {
                        key_id: parse_id(r.get(0)?)?,
                        version: r.get(1)?,
                        material_id: r.get(2)?,
                        stored: r.get(3)?,
                        created_ms: r.get(4)?,
                        rotation_type: r.get(5)?,
                        rotation_ms: r.get(6)?,
                        imported: r.get(7)?,
                        expiration_model: r.get(8)?,
                        valid_to_ms: r.get(9)?,
                        description: r.get(10)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = self.conn.prepare("SELECT alias_name, key_id, created_ms, updated_ms FROM aliases")?;
            let aliases = stmt
                .query_map([], |r| {
                    Ok(AliasRow {
                        name: r.get(0)?,
                        key_id: parse_id(r.get(1)?)?,
                        created_ms: r.get(2)?,
                        updated_ms: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = self.conn.prepare("SELECT key_id, tag_key, tag_value FROM tags")?;
            let tags = stmt
                .query_map([], |r| Ok((parse_id(r.get(0)?)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = self.conn.prepare(
                "SELECT grant_id, key_id, token, name, grantee, retiring, operations, constraints, \
                 issuing_account, created_ms FROM grants",
            )?;
            let grants = stmt
                .query_map([], |r| {
                    let operations: String = r.get(6)?;
                    let constraints: Option<String> = r.get(7)?;
                    Ok(GrantRow {
                        grant_id: r.get(0)?,
                        key_id: parse_id(r.get(1)?)?,
                        token: r.get(2)?,
                        name: r.get(3)?,
                        grantee: r.get(4)?,
                        retiring: r.get(5)?,
                        operations: serde_json::from_str(&operations).map_err(|_| corrupt("grant operations"))?,
                        constraints: constraints
                            .map(|c| serde_json::from_str(&c))
                            .transpose()
                            .map_err(|_| corrupt("grant constraints"))?,
                        issuing_account: r.get(8)?,
                        created_ms: r.get(9)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt =
                self.conn.prepare("SELECT key_id, operation, time_ms, request_id, event_id FROM key_last_usage")?;
            let usage = stmt
                .query_map([], |r| {
                    Ok(UsageRow {
                        key_id: parse_id(r.get(0)?)?,
                        operation: r.get(1)?,
                        time_ms: r.get(2)?,
                        request_id: r.get(3)?,
                        event_id: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt = self.conn.prepare(
                "SELECT key_store_id, name, store_type, cluster_id, trust_anchor, password, connect, created_ms \
                 FROM custom_key_stores",
            )?;
            let key_stores = stmt
                .query_map([], |r| {
                    Ok(KeyStoreRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        store_type: r.get(2)?,
                        cluster_id: r.get(3)?,
                        trust_anchor: r.get(4)?,
                        sealed_password: r.get(5)?,
                        connect: r.get(6)?,
                        created_ms: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Snapshot { keys, materials, aliases, tags, grants, usage, key_stores })
        };
        read().map_err(db_error)
    }

    /// Runs `f` in one transaction and commits it durably.
    fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T, KmsError> {
        let tx = self.conn.transaction().map_err(db_error)?;
        let out = f(&tx).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(out)
    }

    /// Stores a new key with its first material version (none for an `EXTERNAL` key) and
    /// its tags.
    pub fn create_key(
        &mut self,
        key: &KeyRow,
        material: Option<&MaterialRow>,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), KmsError> {
        self.write(|tx| {
            insert_key(tx, key, tags)?;
            if let Some(material) = material {
                put_material(tx, material)?;
            }
            Ok(())
        })
    }

    /// Stores a new replica key with every version of its material and its tags, in one
    /// transaction.
    pub fn create_replica(
        &mut self,
        key: &KeyRow,
        materials: &[MaterialRow],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), KmsError> {
        self.write(|tx| {
            insert_key(tx, key, tags)?;
            for m in materials {
                put_material(tx, m)?;
            }
            Ok(())
        })
    }

    /// Marks whether replica `region` of primary key `key_id` still has to be brought up to date.
    pub fn set_replica_sync(&mut self, key_id: &KeyId, region: &str, pending: bool) -> Result<(), KmsError> {
        self.write(|tx| {
            if pending {
                tx.execute(
                    "INSERT OR IGNORE INTO replica_sync (key_id, region) VALUES (?1, ?2)",
                    params![key_id.to_string(), region],
                )?;
            } else {
                tx.execute(
                    "DELETE FROM replica_sync WHERE key_id = ?1 AND region = ?2",
                    params![key_id.to_string(), region],
                )?;
            }
            Ok(())
        })
    }

    /// Destroyed replica keys whose primary's agent has not yet been told, with its region.
    pub fn replica_removals(&self) -> Result<Vec<(KeyId, String)>, KmsError> {
        self.key_region_pairs("SELECT key_id, primary_region FROM replica_removals ORDER BY key_id")
    }

    /// The primary's agent knows replica `key_id` is gone.
    pub fn forget_replica_removal(&mut self, key_id: &KeyId) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute("DELETE FROM replica_removals WHERE key_id = ?1", [key_id.to_string()])?;
            Ok(())
        })
    }

    /// The replicas still to be brought up to date, by primary key.
    pub fn pending_replica_syncs(&self) -> Result<Vec<(KeyId, String)>, KmsError> {
        self.key_region_pairs("SELECT key_id, region FROM replica_sync ORDER BY key_id, region")
    }

    /// The (key ID, region) rows `query` selects.
    fn key_region_pairs(&self, query: &str) -> Result<Vec<(KeyId, String)>, KmsError> {
        let read = || -> rusqlite::Result<Vec<(KeyId, String)>> {
            let mut stmt = self.conn.prepare(query)?;
            let rows = stmt
                .query_map([], |r| {
                    let id: String = r.get(0)?;
                    Ok((KeyId::parse(&id).ok_or_else(|| corrupt("key ID"))?, r.get(1)?))
                })?
                .collect();
            rows
        };
        read().map_err(db_error)
    }

    /// Rewrites a key's mutable metadata.
    pub fn update_key(&mut self, key: &KeyRow) -> Result<(), KmsError> {
        self.write(|tx| update_key_row(tx, key))
    }

    /// Rewrites a key's metadata and adds or replaces material versions, in one transaction
    /// (a rotation, an import, the deletion or expiry of imported material).
    pub fn update_key_and_materials(&mut self, key: &KeyRow, materials: &[&MaterialRow]) -> Result<(), KmsError> {
        self.write(|tx| {
            update_key_row(tx, key)?;
            for m in materials {
                put_material(tx, m)?;
            }
            Ok(())
        })
    }

    /// Destroys a key: its row, every version of its material, its aliases, grants, tags and
    /// usage, in one transaction. Then the write-ahead log is checkpointed and truncated so
    /// that no page image holding the wrapped material survives in `kmsd.db-wal`
    /// (`secure_delete` has already zeroed the freed content in the database's pages).
    ///
    /// A replica key's primary is to be told it is gone: `primary_region` records that in
    /// the same transaction (see [`Store::replica_removals`]).
    pub fn destroy_key(&mut self, key_id: &KeyId, primary_region: Option<&str>) -> Result<(), KmsError> {
        let id = key_id.to_string();
        self.write(|tx| {
            if let Some(region) = primary_region {
                tx.execute(
                    "INSERT OR REPLACE INTO replica_removals (key_id, primary_region) VALUES (?1, ?2)",
                    params![id, region],
                )?;
            }
            tx.execute("DELETE FROM aliases WHERE key_id = ?1", [&id])?;
            tx.execute("DELETE FROM key_material WHERE key_id = ?1", [&id])?;
            tx.execute("DELETE FROM keys WHERE key_id = ?1", [&id])?;
            tx.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, x'01')", [SCRUB_PENDING])?;
            Ok(())
        })?;
        self.scrub()
    }

    /// Finishes a scrub that a kill interrupted (destroyed material whose freed pages may
    /// still be in the files).
    pub fn scrub_if_pending(&mut self) -> Result<(), KmsError> {
        if self.meta(SCRUB_PENDING)?.is_some() {
            tracing::info!("finishing the scrub of destroyed key material");
            self.scrub()?;
        }
        Ok(())
    }

    /// Leaves no freed page content behind: every WAL frame is copied into the database and
    /// the WAL truncated to zero bytes, then the database is rebuilt (VACUUM) so that free
    /// pages are gone too. Run after destroying material, and at start (a kill between the
    /// commit and this finishes here).
    pub fn scrub(&mut self) -> Result<(), KmsError> {
        let checkpoint = |conn: &Connection| -> rusqlite::Result<()> {
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            if busy != 0 {
                return Err(rusqlite::Error::InvalidParameterName("the WAL checkpoint was blocked".into()));
            }
            Ok(())
        };
        checkpoint(&self.conn).map_err(db_error)?;
        self.conn.execute_batch("VACUUM").map_err(db_error)?;
        checkpoint(&self.conn).map_err(db_error)?;
        self.conn.execute("DELETE FROM meta WHERE name = ?1", [SCRUB_PENDING]).map_err(db_error)?;
        checkpoint(&self.conn).map_err(db_error)
    }

    /// Records the last use of keys (GetKeyLastUsage), as one transaction.
    pub fn save_usage(&mut self, usage: &[UsageRow]) -> Result<(), KmsError> {
        self.write(|tx| {
            for u in usage {
                // A key destroyed since its use has no row to refer to.
                tx.execute(
                    "INSERT OR REPLACE INTO key_last_usage (key_id, operation, time_ms, request_id, event_id) \
                     SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM keys WHERE key_id = ?1)",
                    params![u.key_id.to_string(), u.operation, u.time_ms, u.request_id, u.event_id],
                )?;
            }
            Ok(())
        })
    }

    /// Adds or rewrites a custom key store.
    pub fn put_key_store(&mut self, ks: &KeyStoreRow) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO custom_key_stores (key_store_id, name, store_type, cluster_id, trust_anchor, \
                 password, connect, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    ks.id,
                    ks.name,
                    ks.store_type,
                    ks.cluster_id,
                    ks.trust_anchor,
                    ks.sealed_password,
                    ks.connect,
                    ks.created_ms
                ],
            )?;
            Ok(())
        })
    }

    /// Deletes a custom key store (the caller has checked that no key is in it).
    pub fn delete_key_store(&mut self, id: &str) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute("DELETE FROM custom_key_stores WHERE key_store_id = ?1", [id])?;
            Ok(())
        })
    }

    pub fn insert_grant(&mut self, grant: &GrantRow) -> Result<(), KmsError> {
        let operations = serde_json::to_string(&grant.operations).unwrap_or_default();
        let constraints = grant.constraints.as_ref().map(|c| c.to_string());
        self.write(|tx| {
            tx.execute(
                "INSERT INTO grants (grant_id, key_id, token, name, grantee, retiring, operations, constraints, \
                 issuing_account, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    grant.grant_id,
                    grant.key_id.to_string(),
                    grant.token,
                    grant.name,
                    grant.grantee,
                    grant.retiring,
                    operations,
                    constraints,
                    grant.issuing_account,
                    grant.created_ms
                ],
            )?;
            Ok(())
        })
    }

    pub fn delete_grant(&mut self, grant_id: &str) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute("DELETE FROM grants WHERE grant_id = ?1", [grant_id])?;
            Ok(())
        })
    }

    pub fn insert_alias(&mut self, alias: &AliasRow) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO aliases (alias_name, key_id, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4)",
                params![alias.name, alias.key_id.to_string(), alias.created_ms, alias.updated_ms],
            )?;
            Ok(())
        })
    }

    pub fn update_alias(&mut self, alias: &AliasRow) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE aliases SET key_id = ?2, updated_ms = ?3 WHERE alias_name = ?1",
                params![alias.name, alias.key_id.to_string(), alias.updated_ms],
            )?;
            Ok(())
        })
    }

    pub fn delete_alias(&mut self, name: &str) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute("DELETE FROM aliases WHERE alias_name = ?1", [name])?;
            Ok(())
        })
    }

    /// Adds or replaces tags on a key.
    pub fn put_tags(&mut self, key_id: &KeyId, tags: &BTreeMap<String, String>) -> Result<(), KmsError> {
        self.write(|tx| {
            for (k, v) in tags {
                tx.execute(
                    "INSERT OR REPLACE INTO tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3)",
                    params![key_id.to_string(), k, v],
                )?;
            }
            Ok(())
        })
    }

    pub fn delete_tags(&mut self, key_id: &KeyId, tag_keys: &[String]) -> Result<(), KmsError> {
        self.write(|tx| {
            for k in tag_keys {
                tx.execute("DELETE FROM tags WHERE key_id = ?1 AND tag_key = ?2", params![key_id.to_string(), k])?;
            }
            Ok(())
        })
    }
}

fn update_key_row(tx: &Transaction<'_>, key: &KeyRow) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE keys SET description = ?2, state = ?3, deletion_ms = ?4, pending_days = ?5, \
         current_version = ?6, policy = ?7, rotation_period_days = ?8, next_rotation_ms = ?9, multi_region = ?10 \
         WHERE key_id = ?1",
        params![
            key.id.to_string(),
            key.description,
            key.state.as_str(),
            key.deletion_ms,
            key.pending_days,
            key.current_version,
            key.policy,
            key.rotation_period_days,
            key.next_rotation_ms,
            multi_region_json(key)
        ],
    )?;
    Ok(())
}

fn insert_key(tx: &Transaction<'_>, key: &KeyRow, tags: &BTreeMap<String, String>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO keys (key_id, created_ms, description, key_usage, key_spec, origin, state, \
         deletion_ms, pending_days, current_version, policy, rotation_period_days, next_rotation_ms, \
         custom_key_store_id, multi_region) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, \
         ?14, ?15)",
        params![
            key.id.to_string(),
            key.created_ms,
            key.description,
            key.key_usage,
            key.key_spec,
            key.origin,
            key.state.as_str(),
            key.deletion_ms,
            key.pending_days,
            key.current_version,
            key.policy,
            key.rotation_period_days,
            key.next_rotation_ms,
            key.custom_key_store_id,
            multi_region_json(key)
        ],
    )?;
    for (k, v) in tags {
        tx.execute(
            "INSERT INTO tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3)",
            params![key.id.to_string(), k, v],
        )?;
    }
    Ok(())
}

fn multi_region_json(key: &KeyRow) -> Option<String> {
    key.multi_region.as_ref().map(|m| serde_json::to_string(m).unwrap_or_default())
}

fn put_material(tx: &Transaction<'_>, m: &MaterialRow) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO key_material (key_id, version, material_id, stored, created_ms, rotation_type, \
         rotation_ms, imported, expiration_model, valid_to_ms, description) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            m.key_id.to_string(),
            m.version,
            m.material_id,
            m.stored,
            m.created_ms,
            m.rotation_type,
            m.rotation_ms,
            m.imported,
            m.expiration_model,
            m.valid_to_ms,
            m.description
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: KeyId) -> KeyRow {
        KeyRow {
            id,
            created_ms: 1,
            description: "d".into(),
            key_usage: "ENCRYPT_DECRYPT".into(),
            key_spec: "SYMMETRIC_DEFAULT".into(),
            origin: "AWS_KMS".into(),
            state: KeyState::Enabled,
            deletion_ms: None,
            pending_days: None,
            current_version: 1,
            policy: String::new(),
            rotation_period_days: None,
            next_rotation_ms: None,
            custom_key_store_id: None,
            multi_region: None,
        }
    }

    #[test]
    fn key_stores_are_stored_and_a_key_can_be_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("kmsd.db")).unwrap();
        let ks = KeyStoreRow {
            id: "cks-0123456789abcdef0".into(),
            name: "hsm".into(),
            store_type: "AWS_CLOUDHSM".into(),
            cluster_id: "cluster-abcdefghijk".into(),
            trust_anchor: None,
            sealed_password: vec![1, 2, 3],
            connect: true,
            created_ms: 5,
        };
        store.put_key_store(&ks).unwrap();
        let mut row = key(KeyId::random());
        row.custom_key_store_id = Some(ks.id.clone());
        store.create_key(&row, None, &BTreeMap::new()).unwrap();
        let snapshot = store.snapshot().unwrap();
        assert_eq!(snapshot.key_stores, vec![ks.clone()]);
        assert_eq!(snapshot.keys, vec![row.clone()]);
        // A key store with keys cannot be deleted behind the agent's back either.
        assert!(store.delete_key_store(&ks.id).is_err());
        store.destroy_key(&row.id, None).unwrap();
        store.delete_key_store(&ks.id).unwrap();
        assert!(store.snapshot().unwrap().key_stores.is_empty());
    }

    #[test]
    fn a_version_2_database_is_upgraded_with_its_keys_and_material() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsd.db");
        let id = KeyId::random();
        {
            // The database as kmsd of schema version 2 left it.
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO keys (key_id, created_ms, description, key_usage, key_spec, origin, state, \
                 current_version) VALUES (?1, 1, 'old', 'ENCRYPT_DECRYPT', 'SYMMETRIC_DEFAULT', 'AWS_KMS', 'Enabled', 1)",
                [id.to_string()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO key_material (key_id, version, material_id, stored, created_ms) VALUES (?1, 1, ?2, x'0102', 1)",
                params![id.to_string(), "cd".repeat(32)],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.keys[0].description, "old");
        assert_eq!(snap.keys[0].rotation_period_days, None);
        assert_eq!(snap.materials, vec![MaterialRow::generated(id, 1, "cd".repeat(32), vec![1, 2], 1)]);
        let version: usize = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn mutations_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsd.db");
        let id = KeyId::random();
        {
            let mut store = Store::open(&path).unwrap();
            let material = MaterialRow::generated(id, 1, "ab".repeat(32), vec![1, 2, 3], 1);
            let tags = BTreeMap::from([("team".to_string(), "db".to_string())]);
            store.create_key(&key(id), Some(&material), &tags).unwrap();
            let mut changed = key(id);
            changed.state = KeyState::PendingDeletion;
            changed.deletion_ms = Some(99);
            changed.pending_days = Some(7);
            store.update_key(&changed).unwrap();
            store.insert_alias(&AliasRow { name: "alias/a".into(), key_id: id, created_ms: 2, updated_ms: 2 }).unwrap();
            store.set_meta("x", b"y").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.snapshot().unwrap();
        assert_eq!(snap.keys.len(), 1);
        assert_eq!(snap.keys[0].state, KeyState::PendingDeletion);
        assert_eq!(snap.keys[0].deletion_ms, Some(99));
        assert_eq!(snap.materials[0].stored, Some(vec![1, 2, 3]));
        assert_eq!(snap.aliases[0].key_id, id);
        assert_eq!(snap.tags, vec![(id, "team".into(), "db".into())]);
        assert_eq!(store.meta("x").unwrap().as_deref(), Some(&b"y"[..]));
        let mode: String = store.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
}
