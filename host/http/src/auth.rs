//! API keys and the in-memory tenant directory.
//!
//! A tenant key is `rk-` followed by 32 random bytes in hex; only its SHA-256 is stored. A
//! presented key is hashed and looked up in a map keyed by that hash: the lookup's timing can
//! depend only on the hash of the presented key, which reveals nothing about any stored key.
//! The final comparison of the stored hash is constant-time anyway (`subtle`), and so is the
//! admin token check, which compares hashes so that the token's length does not leak either.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::Tenant;

pub const KEY_PREFIX: &str = "rk-";

/// A fresh API key and its hash.
pub fn new_key() -> (String, [u8; 32]) {
    let mut secret = [0u8; 32];
    // ThreadRng is a CSPRNG seeded from the operating system.
    rand::Fill::fill(&mut secret, &mut rand::rng());
    let key = format!("{KEY_PREFIX}{}", hex::encode(secret));
    let hash = hash_key(&key);
    (key, hash)
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A random identifier such as `tn_3f9a...` (not a secret).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::Fill::fill(&mut b, &mut rand::rng());
    format!("{prefix}_{}", hex::encode(b))
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Constant-time check of a presented admin token against the configured one.
pub fn admin_token_matches(presented: &str, configured: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(configured.as_bytes());
    bool::from(a.ct_eq(&b))
}

/// Every tenant, indexed by id and by key hash; the database is the source of truth and this is
/// rebuilt from it at startup and updated on every admin write.
#[derive(Default)]
pub struct Directory {
    inner: RwLock<DirInner>,
}

#[derive(Default)]
struct DirInner {
    by_id: HashMap<String, Tenant>,
    by_hash: HashMap<[u8; 32], String>,
}

impl Directory {
    pub fn new(tenants: Vec<Tenant>) -> Directory {
        let d = Directory::default();
        for t in tenants {
            d.upsert(t);
        }
        d
    }

    pub fn upsert(&self, t: Tenant) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.by_id.get(&t.id) {
            let old_hash = old.key_hash;
            g.by_hash.remove(&old_hash);
        }
        g.by_hash.insert(t.key_hash, t.id.clone());
        g.by_id.insert(t.id.clone(), t);
    }

    pub fn remove(&self, id: &str) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.by_id.remove(id) {
            g.by_hash.remove(&old.key_hash);
        }
    }

    pub fn get(&self, id: &str) -> Option<Tenant> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.by_id.get(id).cloned()
    }

    pub fn all(&self) -> Vec<Tenant> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        g.by_id.values().cloned().collect()
    }

    /// The tenant owning `key`, if any.
    pub fn authenticate(&self, key: &str) -> Option<Tenant> {
        if !key.starts_with(KEY_PREFIX) {
            return None;
        }
        let h = hash_key(key);
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let id = g.by_hash.get(&h)?;
        let t = g.by_id.get(id)?;
        bool::from(t.key_hash.ct_eq(&h)).then(|| t.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Quotas;

    #[test]
    fn keys_authenticate_and_rotate() {
        let (k1, h1) = new_key();
        assert!(k1.starts_with("rk-") && k1.len() == 3 + 64);
        let t = Tenant {
            id: "tn_1".into(),
            name: "a".into(),
            default_guest: "chat".into(),
            quotas: Quotas::default(),
            created_at: 0,
            key_hash: h1,
        };
        let d = Directory::new(vec![t.clone()]);
        assert_eq!(d.authenticate(&k1).unwrap().id, "tn_1");
        assert!(d.authenticate("rk-00").is_none());
        assert!(d.authenticate(&k1[3..]).is_none());
        let (k2, h2) = new_key();
        d.upsert(Tenant { key_hash: h2, ..t });
        assert!(d.authenticate(&k1).is_none(), "old key must stop working");
        assert_eq!(d.authenticate(&k2).unwrap().id, "tn_1");
        d.remove("tn_1");
        assert!(d.authenticate(&k2).is_none());
    }

    #[test]
    fn bearer_and_admin_token() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert!(admin_token_matches("s3cret", "s3cret"));
        assert!(!admin_token_matches("s3cre", "s3cret"));
    }
}
