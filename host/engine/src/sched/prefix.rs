//! Prefix cache: full KV pages of earlier prompts, found again by their exact token contents.
//!
//! An entry is keyed by (tenant, parent page, the page's tokens), so a hit means the whole chain
//! of tokens from position 0 matches exactly — no hashing shortcuts that could collide. The tenant
//! is part of the key because a shared cache across tenants would leak one tenant's prompts to
//! another through time-to-first-token.
//!
//! The cache holds one reference on each cached page, so a cached page can't be freed or rewritten
//! (writers copy a shared page first). Only leaves are evicted: a parent outlives its children,
//! which keeps every child's `parent` id pointing at the page it was computed after.

use std::collections::HashMap;
use std::sync::Arc;

use crate::kv::KvPool;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    tenant: Arc<str>,
    /// The cached page holding the previous `page_size` tokens; `None` for the first page.
    parent: Option<u32>,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct Entry {
    page: u32,
    children: u32,
    last_used: u64,
}

#[derive(Debug, Default)]
pub(super) struct PrefixCache {
    page_size: usize,
    entries: HashMap<Key, Entry>,
    by_page: HashMap<u32, Key>,
    tick: u64,
}

impl PrefixCache {
    pub fn new(page_size: usize) -> Self {
        PrefixCache {
            page_size,
            ..Default::default()
        }
    }

    /// Pages holding the longest cached prefix of `tokens`, at most `max_pages` of them.
    pub fn lookup(&mut self, tenant: &Arc<str>, tokens: &[u32], max_pages: usize) -> Vec<u32> {
        self.tick += 1;
        let mut pages = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.page_size).take(max_pages) {
            let key = Key {
                tenant: tenant.clone(),
                parent,
                tokens: chunk.into(),
            };
            let Some(e) = self.entries.get_mut(&key) else {
                break;
            };
            e.last_used = self.tick;
            pages.push(e.page);
            parent = Some(e.page);
        }
        pages
    }

    /// Offers `page` (holding `tokens`, computed after the cached page `parent`) to the cache.
    /// Returns the cached page now standing for these tokens — `page` itself, or an equal page
    /// cached earlier — or `None` if `parent` is not cached (the chain is broken).
    pub fn insert(
        &mut self,
        pool: &mut KvPool,
        tenant: &Arc<str>,
        parent: Option<u32>,
        tokens: &[u32],
        page: u32,
    ) -> Option<u32> {
        debug_assert_eq!(tokens.len(), self.page_size);
        if let Some(p) = parent
            && !self.by_page.contains_key(&p)
        {
            return None;
        }
        let key = Key {
            tenant: tenant.clone(),
            parent,
            tokens: tokens.into(),
        };
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_used = self.tick;
            return Some(e.page);
        }
        if self.by_page.contains_key(&page) {
            // The page is cached under other contents: this sequence rewrote nothing (pages are
            // immutable below its length), so this can only be a caller bug; don't cache twice.
            return None;
        }
        pool.retain(page);
        if let Some(p) = parent {
            let pk = &self.by_page[&p];
            self.entries.get_mut(pk).expect("parent entry").children += 1;
        }
        self.entries.insert(
            key.clone(),
            Entry {
                page,
                children: 0,
                last_used: self.tick,
            },
        );
        self.by_page.insert(page, key);
        Some(page)
    }

    /// Pages only the cache still holds: what eviction could return to the pool.
    pub fn reclaimable(&self, pool: &KvPool) -> usize {
        self.by_page
            .keys()
            .filter(|&&p| pool.refcount(p) == 1)
            .count()
    }

    /// Frees least recently used pages that no sequence holds until `want` pages were freed or
    /// nothing more can be. Returns the number freed.
    pub fn evict(&mut self, pool: &mut KvPool, want: usize) -> usize {
        let mut freed = 0;
        while freed < want {
            let victim = self
                .entries
                .iter()
                .filter(|(_, e)| e.children == 0 && pool.refcount(e.page) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(key) = victim else { break };
            let e = self.entries.remove(&key).expect("victim exists");
            self.by_page.remove(&e.page);
            if let Some(p) = key.parent {
                let pk = &self.by_page[&p];
                self.entries.get_mut(pk).expect("parent entry").children -= 1;
            }
            pool.release_page(e.page);
            freed += 1;
        }
        freed
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvLayout, SeqCache};

    fn pool(n_pages: usize) -> KvPool {
        let layout = KvLayout {
            n_layers: 1,
            kv_dim: 2,
            page_size: 2,
            n_pages,
        };
        KvPool::new(layout, Box::new(crate::backend::cpu::CpuKv::new(layout)))
    }

    #[test]
    fn exact_chains_per_tenant_and_leaf_first_eviction() {
        let mut pool = pool(4);
        let mut c = PrefixCache::new(2);
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let mut s = SeqCache::new();
        pool.reserve(&mut s, 4).unwrap();
        pool.advance(&mut s, 4);
        let (p0, p1) = (s.pages()[0], s.pages()[1]);
        assert_eq!(c.insert(&mut pool, &a, None, &[1, 2], p0), Some(p0));
        assert_eq!(c.insert(&mut pool, &a, Some(p0), &[3, 4], p1), Some(p1));
        pool.release(&mut s);
        assert_eq!(pool.free_pages(), 2, "the cache keeps both pages");

        assert_eq!(c.lookup(&a, &[1, 2, 3, 4, 5], 9), vec![p0, p1]);
        assert_eq!(c.lookup(&a, &[1, 2, 3, 9], 9), vec![p0]);
        assert_eq!(c.lookup(&a, &[1, 2, 3, 4], 1), vec![p0], "max_pages");
        assert!(c.lookup(&b, &[1, 2, 3, 4], 9).is_empty(), "other tenant");
        assert!(c.lookup(&a, &[9, 2, 3, 4], 9).is_empty());

        // The parent can't go before its child.
        assert_eq!(c.evict(&mut pool, 1), 1);
        assert_eq!(c.lookup(&a, &[1, 2, 3, 4], 9), vec![p0]);
        assert_eq!(c.evict(&mut pool, 5), 1);
        assert_eq!(pool.free_pages(), 4);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn pages_in_use_are_not_evicted_and_broken_chains_are_refused() {
        let mut pool = pool(2);
        let mut c = PrefixCache::new(2);
        let a: Arc<str> = "a".into();
        let mut s = SeqCache::new();
        pool.reserve(&mut s, 2).unwrap();
        pool.advance(&mut s, 2);
        let p0 = s.pages()[0];
        c.insert(&mut pool, &a, None, &[1, 2], p0);
        assert_eq!(c.reclaimable(&pool), 0);
        assert_eq!(c.evict(&mut pool, 1), 0, "the sequence still reads it");
        assert_eq!(c.insert(&mut pool, &a, Some(1), &[3, 4], 1), None);
        pool.release(&mut s);
        assert_eq!(c.reclaimable(&pool), 1);
    }
}
