//! Persistent state in one SQLite database under the data directory: tenants (API keys only as
//! SHA-256 hashes), their quotas, their uploaded guests (by content hash; the bytes live in
//! [`crate::blobs`]) and usage counters.
//!
//! Every call takes the connection's lock for a few statements; SQLite runs in WAL mode with
//! `synchronous = NORMAL`, so a commit is an append to the log without an fsync of its own and the
//! lock is held for microseconds. Keys are authenticated against an in-memory index (see
//! [`crate::auth`]), not against the database, so a request's hot path does not touch it.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored quotas are not valid JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A tenant's limits. `None` means "no limit beyond the server's own".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Requests per minute (token bucket; bursts up to `burst`).
    pub requests_per_minute: u32,
    /// Largest burst of requests admitted at once.
    pub burst: u32,
    /// KV cache pages this tenant may hold at once, per model.
    pub max_kv_pages: Option<usize>,
    /// Concurrent sequences this tenant may hold, per model.
    pub max_sessions: Option<usize>,
    /// Tokens (prompt and generated) per minute, per model; work beyond it waits.
    pub tokens_per_minute: Option<u32>,
    /// Scheduler weight relative to other tenants.
    pub weight: u32,
    /// Most tokens one request may generate.
    pub max_tokens: Option<u32>,
    /// Linear memory a guest instance may grow to.
    pub guest_memory_bytes: u64,
    /// Guest CPU time per call, in milliseconds.
    pub guest_cpu_ms: u64,
    /// Wall-clock time per call, in milliseconds.
    pub wall_clock_ms: u64,
    /// Uploaded guests this tenant may keep.
    pub max_guests: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            requests_per_minute: 600,
            burst: 60,
            max_kv_pages: None,
            max_sessions: None,
            tokens_per_minute: None,
            weight: 1,
            max_tokens: None,
            guest_memory_bytes: 256 << 20,
            guest_cpu_ms: 60_000,
            wall_clock_ms: 300_000,
            max_guests: 32,
        }
    }
}

impl Quotas {
    pub fn validate(&self) -> Result<()> {
        if self.requests_per_minute == 0 || self.burst == 0 {
            return Err(StoreError::Invalid(
                "requests_per_minute and burst must be at least 1".into(),
            ));
        }
        if self.weight == 0 {
            return Err(StoreError::Invalid("weight must be at least 1".into()));
        }
        if self.guest_cpu_ms == 0 || self.wall_clock_ms == 0 || self.guest_memory_bytes == 0 {
            return Err(StoreError::Invalid(
                "guest limits (memory, CPU, wall clock) must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    /// Guest that serves this tenant's completions when a request names none (`chat` = built-in).
    pub default_guest: String,
    pub quotas: Quotas,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(skip)]
    pub key_hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuestRecord {
    pub name: String,
    /// SHA-256 of the component's bytes (hex); also its file name in the blob store.
    pub hash: String,
    pub size: u64,
    pub created_at: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub requests: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Guest CPU time, microseconds.
    pub guest_cpu_us: u64,
    pub guest_traps: u64,
}

/// One request's contribution to a tenant's usage.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageDelta {
    pub requests: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub guest_cpu_us: u64,
    pub guest_traps: u64,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    key_hash      BLOB NOT NULL,
    default_guest TEXT NOT NULL,
    quotas        TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS guests (
    tenant_id  TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name)
);
CREATE TABLE IF NOT EXISTS usage (
    tenant_id    TEXT PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    requests     INTEGER NOT NULL DEFAULT 0,
    tokens_in    INTEGER NOT NULL DEFAULT 0,
    tokens_out   INTEGER NOT NULL DEFAULT 0,
    guest_cpu_us INTEGER NOT NULL DEFAULT 0,
    guest_traps  INTEGER NOT NULL DEFAULT 0
);
";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (each statement is
        // atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn create_tenant(&self, t: &Tenant) -> Result<()> {
        let conn = self.conn();
        let r = conn.execute(
            "INSERT INTO tenants (id, name, key_hash, default_guest, quotas, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                t.id,
                t.name,
                &t.key_hash[..],
                t.default_guest,
                serde_json::to_string(&t.quotas)?,
                t.created_at
            ],
        );
        match r {
            Ok(_) => {
                conn.execute("INSERT INTO usage (tenant_id) VALUES (?1)", params![t.id])?;
                Ok(())
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "a tenant named {:?} already exists",
                    t.name
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn tenants(&self) -> Result<Vec<Tenant>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, name, key_hash, default_guest, quotas, created_at FROM tenants
             ORDER BY created_at, name",
        )?;
        let rows = st.query_map([], row_to_tenant)?;
        let mut out = Vec::new();
        for r in rows {
            let (t, quotas) = r?;
            out.push(Tenant {
                quotas: serde_json::from_str(&quotas)?,
                ..t
            });
        }
        Ok(out)
    }

    pub fn tenant(&self, id: &str) -> Result<Tenant> {
        let conn = self.conn();
        let r = conn
            .query_row(
                "SELECT id, name, key_hash, default_guest, quotas, created_at FROM tenants
                 WHERE id = ?1",
                params![id],
                row_to_tenant,
            )
            .optional()?;
        match r {
            Some((t, quotas)) => Ok(Tenant {
                quotas: serde_json::from_str(&quotas)?,
                ..t
            }),
            None => Err(StoreError::NotFound(format!("tenant {id:?}"))),
        }
    }

    /// Writes every mutable field of `t` (name, key hash, default guest, quotas).
    pub fn update_tenant(&self, t: &Tenant) -> Result<()> {
        let conn = self.conn();
        let r = conn.execute(
            "UPDATE tenants SET name = ?2, key_hash = ?3, default_guest = ?4, quotas = ?5
             WHERE id = ?1",
            params![
                t.id,
                t.name,
                &t.key_hash[..],
                t.default_guest,
                serde_json::to_string(&t.quotas)?
            ],
        );
        match r {
            Ok(0) => Err(StoreError::NotFound(format!("tenant {:?}", t.id))),
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "a tenant named {:?} already exists",
                    t.name
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a tenant with its guests and usage; returns the content hashes its guests used.
    pub fn delete_tenant(&self, id: &str) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let hashes = {
            let mut st = tx.prepare("SELECT hash FROM guests WHERE tenant_id = ?1")?;
            st.query_map(params![id], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let n = tx.execute("DELETE FROM tenants WHERE id = ?1", params![id])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("tenant {id:?}")));
        }
        tx.commit()?;
        Ok(hashes)
    }

    pub fn guests(&self, tenant: &str) -> Result<Vec<GuestRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT name, hash, size, created_at FROM guests WHERE tenant_id = ?1 ORDER BY name",
        )?;
        let rows = st.query_map(params![tenant], row_to_guest)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn guest(&self, tenant: &str, name: &str) -> Result<GuestRecord> {
        self.conn()
            .query_row(
                "SELECT name, hash, size, created_at FROM guests WHERE tenant_id = ?1 AND name = ?2",
                params![tenant, name],
                row_to_guest,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("guest {name:?}")))
    }

    /// Records a guest for a tenant. With `replace`, an existing guest of that name is
    /// overwritten and its previous hash returned; without, an existing name is a conflict.
    /// `max` caps how many guests the tenant may keep.
    pub fn put_guest(
        &self,
        tenant: &str,
        g: &GuestRecord,
        replace: bool,
        max: u32,
    ) -> Result<Option<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old: Option<String> = tx
            .query_row(
                "SELECT hash FROM guests WHERE tenant_id = ?1 AND name = ?2",
                params![tenant, g.name],
                |r| r.get(0),
            )
            .optional()?;
        if old.is_some() && !replace {
            return Err(StoreError::Conflict(format!(
                "a guest named {:?} already exists (upload with ?replace=true to overwrite it)",
                g.name
            )));
        }
        if old.is_none() {
            let count: u32 = tx.query_row(
                "SELECT COUNT(*) FROM guests WHERE tenant_id = ?1",
                params![tenant],
                |r| r.get(0),
            )?;
            if count >= max {
                return Err(StoreError::Conflict(format!(
                    "this tenant already has {count} guests, its quota (delete one first)"
                )));
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO guests (tenant_id, name, hash, size, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![tenant, g.name, g.hash, g.size as i64, g.created_at],
        )?;
        tx.commit()?;
        Ok(old)
    }

    /// Removes a tenant's guest; returns its hash.
    pub fn delete_guest(&self, tenant: &str, name: &str) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let hash: Option<String> = tx
            .query_row(
                "SELECT hash FROM guests WHERE tenant_id = ?1 AND name = ?2",
                params![tenant, name],
                |r| r.get(0),
            )
            .optional()?;
        let Some(hash) = hash else {
            return Err(StoreError::NotFound(format!("guest {name:?}")));
        };
        tx.execute(
            "DELETE FROM guests WHERE tenant_id = ?1 AND name = ?2",
            params![tenant, name],
        )?;
        tx.commit()?;
        Ok(hash)
    }

    /// Whether any tenant's guest still uses the blob `hash`.
    pub fn hash_in_use(&self, hash: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM guests WHERE hash = ?1 LIMIT 1",
                params![hash],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Every blob hash referenced by some guest.
    pub fn all_hashes(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT DISTINCT hash FROM guests")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn add_usage(&self, tenant: &str, d: UsageDelta) -> Result<()> {
        self.conn().execute(
            "UPDATE usage SET requests = requests + ?2, tokens_in = tokens_in + ?3,
               tokens_out = tokens_out + ?4, guest_cpu_us = guest_cpu_us + ?5,
               guest_traps = guest_traps + ?6
             WHERE tenant_id = ?1",
            params![
                tenant,
                d.requests as i64,
                d.tokens_in as i64,
                d.tokens_out as i64,
                d.guest_cpu_us as i64,
                d.guest_traps as i64
            ],
        )?;
        Ok(())
    }

    pub fn usage(&self, tenant: &str) -> Result<Usage> {
        self.conn()
            .query_row(
                "SELECT requests, tokens_in, tokens_out, guest_cpu_us, guest_traps FROM usage
                 WHERE tenant_id = ?1",
                params![tenant],
                |r| {
                    Ok(Usage {
                        requests: r.get::<_, i64>(0)? as u64,
                        tokens_in: r.get::<_, i64>(1)? as u64,
                        tokens_out: r.get::<_, i64>(2)? as u64,
                        guest_cpu_us: r.get::<_, i64>(3)? as u64,
                        guest_traps: r.get::<_, i64>(4)? as u64,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant:?}")))
    }
}

type TenantRow = (Tenant, String);

fn row_to_tenant(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRow> {
    let hash: Vec<u8> = r.get(2)?;
    let mut key_hash = [0u8; 32];
    if hash.len() == 32 {
        key_hash.copy_from_slice(&hash);
    }
    Ok((
        Tenant {
            id: r.get(0)?,
            name: r.get(1)?,
            key_hash,
            default_guest: r.get(3)?,
            quotas: Quotas::default(),
            created_at: r.get(5)?,
        },
        r.get(4)?,
    ))
}

fn row_to_guest(r: &rusqlite::Row<'_>) -> rusqlite::Result<GuestRecord> {
    Ok(GuestRecord {
        name: r.get(0)?,
        hash: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        created_at: r.get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, name: &str) -> Tenant {
        Tenant {
            id: id.into(),
            name: name.into(),
            default_guest: "chat".into(),
            quotas: Quotas::default(),
            created_at: now(),
            key_hash: [7; 32],
        }
    }

    #[test]
    fn tenants_guests_usage_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("realm.db");
        {
            let s = Store::open(&path).unwrap();
            let mut t = tenant("tn_a", "alpha");
            t.quotas.max_kv_pages = Some(64);
            s.create_tenant(&t).unwrap();
            let g = GuestRecord {
                name: "g1".into(),
                hash: "ab".repeat(32),
                size: 10,
                created_at: 1,
            };
            assert_eq!(s.put_guest("tn_a", &g, false, 4).unwrap(), None);
            s.add_usage(
                "tn_a",
                UsageDelta {
                    requests: 2,
                    tokens_in: 5,
                    tokens_out: 7,
                    guest_cpu_us: 9,
                    guest_traps: 1,
                },
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let t = s.tenant("tn_a").unwrap();
        assert_eq!(t.name, "alpha");
        assert_eq!(t.key_hash, [7; 32]);
        assert_eq!(t.quotas.max_kv_pages, Some(64));
        assert_eq!(s.guests("tn_a").unwrap().len(), 1);
        let u = s.usage("tn_a").unwrap();
        assert_eq!((u.requests, u.tokens_in, u.tokens_out), (2, 5, 7));
        assert_eq!((u.guest_cpu_us, u.guest_traps), (9, 1));
    }

    #[test]
    fn conflicts_quotas_and_cascade() {
        let s = Store::open_in_memory().unwrap();
        s.create_tenant(&tenant("tn_a", "alpha")).unwrap();
        assert!(matches!(
            s.create_tenant(&tenant("tn_b", "alpha")),
            Err(StoreError::Conflict(_))
        ));
        s.create_tenant(&tenant("tn_b", "beta")).unwrap();
        let g = |n: &str| GuestRecord {
            name: n.into(),
            hash: "cd".repeat(32),
            size: 1,
            created_at: 1,
        };
        s.put_guest("tn_a", &g("x"), false, 1).unwrap();
        assert!(matches!(
            s.put_guest("tn_a", &g("x"), false, 1),
            Err(StoreError::Conflict(_))
        ));
        // Over the guest quota.
        assert!(matches!(
            s.put_guest("tn_a", &g("y"), false, 1),
            Err(StoreError::Conflict(_))
        ));
        // Replacing an existing name does not count against the quota.
        assert!(s.put_guest("tn_a", &g("x"), true, 1).unwrap().is_some());
        // Another tenant's guests are invisible.
        assert!(matches!(s.guest("tn_b", "x"), Err(StoreError::NotFound(_))));
        assert!(s.hash_in_use(&"cd".repeat(32)).unwrap());
        assert_eq!(s.delete_tenant("tn_a").unwrap(), vec!["cd".repeat(32)]);
        assert!(!s.hash_in_use(&"cd".repeat(32)).unwrap());
        assert!(matches!(s.usage("tn_a"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            s.delete_tenant("tn_a"),
            Err(StoreError::NotFound(_))
        ));
    }
}
