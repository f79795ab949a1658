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
];

/// A key's state, with AWS's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
        }
    }

    fn parse(s: &str) -> Option<KeyState> {
        match s {
            "Enabled" => Some(KeyState::Enabled),
            "Disabled" => Some(KeyState::Disabled),
            "PendingDeletion" => Some(KeyState::PendingDeletion),
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
    pub current_version: u32,
    /// The key policy document; empty means the default key policy.
    pub policy: String,
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
#[derive(Debug, Clone)]
pub struct MaterialRow {
    pub key_id: KeyId,
    pub version: u32,
    pub material_id: String,
    pub stored: Vec<u8>,
    pub created_ms: i64,
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
                 deletion_ms, pending_days, current_version, policy FROM keys",
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
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut stmt =
                self.conn.prepare("SELECT key_id, version, material_id, stored, created_ms FROM key_material")?;
            let materials = stmt
                .query_map([], |r| {
                    Ok(MaterialRow {
                        key_id: parse_id(r.get(0)?)?,
                        version: r.get(1)?,
                        material_id: r.get(2)?,
                        stored: r.get(3)?,
                        created_ms: r.get(4)?,
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
            Ok(Snapshot { keys, materials, aliases, tags, grants })
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

    /// Stores a new key with its first material version and its tags.
    pub fn create_key(
        &mut self,
        key: &KeyRow,
        material: &MaterialRow,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO keys (key_id, created_ms, description, key_usage, key_spec, origin, state, \
                 deletion_ms, pending_days, current_version, policy) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
                    key.policy
                ],
            )?;
            tx.execute(
                "INSERT INTO key_material (key_id, version, material_id, stored, created_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    material.key_id.to_string(),
                    material.version,
                    material.material_id,
                    material.stored,
                    material.created_ms
                ],
            )?;
            for (k, v) in tags {
                tx.execute(
                    "INSERT INTO tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3)",
                    params![key.id.to_string(), k, v],
                )?;
            }
            Ok(())
        })
    }

    /// Rewrites a key's mutable metadata.
    pub fn update_key(&mut self, key: &KeyRow) -> Result<(), KmsError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE keys SET description = ?2, state = ?3, deletion_ms = ?4, pending_days = ?5, \
                 current_version = ?6, policy = ?7 WHERE key_id = ?1",
                params![
                    key.id.to_string(),
                    key.description,
                    key.state.as_str(),
                    key.deletion_ms,
                    key.pending_days,
                    key.current_version,
                    key.policy
                ],
            )?;
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
        }
    }

    #[test]
    fn mutations_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsd.db");
        let id = KeyId::random();
        {
            let mut store = Store::open(&path).unwrap();
            let material = MaterialRow {
                key_id: id,
                version: 1,
                material_id: "ab".repeat(32),
                stored: vec![1, 2, 3],
                created_ms: 1,
            };
            let tags = BTreeMap::from([("team".to_string(), "db".to_string())]);
            store.create_key(&key(id), &material, &tags).unwrap();
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
        assert_eq!(snap.materials[0].stored, vec![1, 2, 3]);
        assert_eq!(snap.aliases[0].key_id, id);
        assert_eq!(snap.tags, vec![(id, "team".into(), "db".into())]);
        assert_eq!(store.meta("x").unwrap().as_deref(), Some(&b"y"[..]));
        let mode: String = store.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }
}
