//! Paged KV cache.
//!
//! Keys and values live in fixed-size pages drawn from one pool per model, sized at load time.
//! A sequence owns a page table ([`SeqCache`]); position `p` of a sequence lives in page
//! `pages[p / page_size]`, slot `p % page_size`. Pages are reference counted so that a fork can
//! share a prefix copy-on-write; the scheduler builds batching, prefix caching and preemption on
//! top of this.
//!
//! This module is the bookkeeping only (page tables, reference counts, the free list), the same
//! for every backend. The pages themselves are a [`KvStorage`] that the model's backend made
//! (host memory for the CPU, device memory for a GPU): the forward pass writes and reads them,
//! and the pool only asks the storage to copy a page when a shared one is about to be written.

use std::any::Any;

/// A backend's KV page storage: `n_pages` pages of `page_size` positions of keys and values for
/// every layer, in whatever memory and element type the backend uses.
pub trait KvStorage: Send + 'static {
    /// Copies every layer's keys and values of page `from` into page `to` (copy-on-write).
    fn copy_page(&mut self, from: u32, to: u32) -> Result<(), KvError>;
    /// Bytes the storage takes.
    fn bytes(&self) -> usize;
    /// For the backend that made it, to reach its own type.
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache is full: {needed} more pages needed, {free} free of {total}")]
    OutOfPages {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("KV page copy failed: {0}")]
    Device(String),
    #[error("sequence would exceed the model context of {max} tokens (has {len}, adding {adding})")]
    ContextFull {
        len: usize,
        adding: usize,
        max: usize,
    },
}

/// Shape of the cache for one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    /// Width of one position's keys (n_head_kv * head_dim); values have the same width.
    pub kv_dim: usize,
    pub page_size: usize,
    pub n_pages: usize,
}

impl KvLayout {
    /// Key and value elements (each) of one layer: `[n_pages * page_size, kv_dim]`.
    pub fn layer_elems(&self) -> usize {
        self.n_pages * self.page_size * self.kv_dim
    }
}

pub struct KvPool {
    layout: KvLayout,
    storage: Box<dyn KvStorage>,
    refcount: Vec<u32>,
    free: Vec<u32>,
}

/// One sequence's view of the cache.
#[derive(Debug, Default)]
pub struct SeqCache {
    pages: Vec<u32>,
    len: usize,
}

impl SeqCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pages(&self) -> &[u32] {
        &self.pages
    }
}

impl KvPool {
    /// A pool over `storage`, which holds `layout.n_pages` pages.
    pub fn new(layout: KvLayout, storage: Box<dyn KvStorage>) -> Self {
        KvPool {
            layout,
            storage,
            refcount: vec![0; layout.n_pages],
            // Pop from the end, so hand out low page numbers first.
            free: (0..layout.n_pages as u32).rev().collect(),
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn storage(&self) -> &dyn KvStorage {
        &*self.storage
    }

    pub fn storage_mut(&mut self) -> &mut dyn KvStorage {
        &mut *self.storage
    }

    /// Bytes of the page storage.
    pub fn bytes(&self) -> usize {
        self.storage.bytes()
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Grows `seq` so that it can hold `extra` more positions, allocating pages all-or-nothing.
    ///
    /// Positions below `seq.len()` are immutable, so the only page a sequence ever writes into
    /// while other holders still read it is its partly filled last page (after a fork or a
    /// truncate). That page is copied first: copy-on-write at page granularity.
    pub fn reserve(&mut self, seq: &mut SeqCache, extra: usize) -> Result<(), KvError> {
        let ps = self.layout.page_size;
        let need_pages = (seq.len + extra)
            .div_ceil(ps)
            .saturating_sub(seq.pages.len());
        let cow = extra > 0 && self.shared_tail(seq).is_some();
        let needed = need_pages + usize::from(cow);
        if needed > self.free.len() {
            return Err(KvError::OutOfPages {
                needed,
                free: self.free.len(),
                total: self.layout.n_pages,
            });
        }
        if let Some(i) = self.shared_tail(seq).filter(|_| cow) {
            let old = seq.pages[i];
            let new = *self.free.last().expect("checked above");
            self.storage.copy_page(old, new)?;
            self.free.pop();
            self.refcount[new as usize] = 1;
            seq.pages[i] = new;
            self.unref(old);
        }
        for _ in 0..need_pages {
            let p = self.free.pop().expect("checked above");
            self.refcount[p as usize] = 1;
            seq.pages.push(p);
        }
        Ok(())
    }

    /// Free pages that `reserve(seq, extra)` would take, counting a copy-on-write of the tail.
    pub fn pages_needed(&self, seq: &SeqCache, extra: usize) -> usize {
        let grow = (seq.len + extra)
            .div_ceil(self.layout.page_size)
            .saturating_sub(seq.pages.len());
        grow + usize::from(extra > 0 && self.shared_tail(seq).is_some())
    }

    /// Index in `seq.pages` of a partly filled last page that another holder shares.
    fn shared_tail(&self, seq: &SeqCache) -> Option<usize> {
        let ps = self.layout.page_size;
        if seq.len.is_multiple_of(ps) {
            return None;
        }
        let i = seq.len / ps;
        (self.refcount[seq.pages[i] as usize] > 1).then_some(i)
    }

    /// A second sequence with the same contents, sharing every page (copy-on-write).
    pub fn fork(&mut self, seq: &SeqCache) -> SeqCache {
        let keep = seq.len.div_ceil(self.layout.page_size);
        let pages = seq.pages[..keep].to_vec();
        for &p in &pages {
            self.refcount[p as usize] += 1;
        }
        SeqCache {
            pages,
            len: seq.len,
        }
    }

    /// Appends full pages already holding the next positions of `seq` (a prefix-cache hit).
    /// `seq` must end on a page boundary; the pages gain a reference.
    pub fn attach(&mut self, seq: &mut SeqCache, pages: &[u32]) {
        let ps = self.layout.page_size;
        assert!(
            seq.len.is_multiple_of(ps) && seq.pages.len() == seq.len / ps,
            "attach needs a sequence ending on a page boundary"
        );
        for &p in pages {
            self.refcount[p as usize] += 1;
            seq.pages.push(p);
        }
        seq.len += pages.len() * ps;
    }

    /// Takes an extra reference on a page (for a cache that outlives the sequence).
    pub fn retain(&mut self, page: u32) {
        self.refcount[page as usize] += 1;
    }

    /// Drops a reference taken with [`KvPool::retain`]; the page is freed with its last one.
    pub fn release_page(&mut self, page: u32) {
        self.unref(page);
    }

    /// How many holders (sequences and caches) a page has.
    pub fn refcount(&self, page: u32) -> u32 {
        self.refcount[page as usize]
    }

    /// Returns every page of `seq` to the pool (pages shared with another sequence stay).
    pub fn release(&mut self, seq: &mut SeqCache) {
        for p in std::mem::take(&mut seq.pages) {
            self.unref(p);
        }
        seq.len = 0;
    }

    /// Forgets positions from `len` on, freeing pages that are no longer needed.
    pub fn truncate(&mut self, seq: &mut SeqCache, len: usize) {
        if len >= seq.len {
            return;
        }
        seq.len = len;
        self.trim(seq);
    }

    /// Frees pages reserved beyond the sequence's current length (undoes a `reserve`).
    pub fn trim(&mut self, seq: &mut SeqCache) {
        let keep = seq.len.div_ceil(self.layout.page_size);
        for p in seq.pages.drain(keep..) {
            self.unref(p);
        }
    }

    fn unref(&mut self, p: u32) {
        let rc = &mut self.refcount[p as usize];
        *rc -= 1;
        if *rc == 0 {
            self.free.push(p);
        }
    }

    /// Slot (page * page_size + offset) of position `pos` of `seq`.
    pub fn slot(&self, seq: &SeqCache, pos: usize) -> usize {
        let ps = self.layout.page_size;
        seq.pages[pos / ps] as usize * ps + pos % ps
    }

    /// Marks `n` positions written after the forward pass completes.
    pub fn advance(&self, seq: &mut SeqCache, n: usize) {
        debug_assert!(seq.len + n <= seq.pages.len() * self.layout.page_size);
        seq.len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuKv;
    use half::f16;

    fn pool(n_pages: usize) -> KvPool {
        let layout = KvLayout {
            n_layers: 2,
            kv_dim: 4,
            page_size: 4,
            n_pages,
        };
        KvPool::new(layout, Box::new(CpuKv::new(layout)))
    }

    fn storage(p: &KvPool) -> &CpuKv {
        p.storage().as_any().downcast_ref().unwrap()
    }

    /// Test shorthands for what a forward pass does through the storage.
    trait Rw {
        fn write(&mut self, layer: usize, seq: &SeqCache, pos: usize, k: &[f32], v: &[f32]);
        fn read(&self, layer: usize, seq: &SeqCache, pos: usize) -> (Vec<f16>, Vec<f16>);
    }

    impl Rw for KvPool {
        fn write(&mut self, layer: usize, seq: &SeqCache, pos: usize, k: &[f32], v: &[f32]) {
            let slot = self.slot(seq, pos);
            let s: &mut CpuKv = self.storage_mut().as_any_mut().downcast_mut().unwrap();
            s.write(layer, slot, k, v);
        }

        fn read(&self, layer: usize, seq: &SeqCache, pos: usize) -> (Vec<f16>, Vec<f16>) {
            let (k, v) = storage(self).read(layer, self.slot(seq, pos));
            (k.to_vec(), v.to_vec())
        }
    }

    #[test]
    fn reserve_write_read_release() {
        let mut p = pool(3);
        let mut s = SeqCache::new();
        p.reserve(&mut s, 6).unwrap();
        assert_eq!(s.pages().len(), 2);
        assert_eq!(p.free_pages(), 1);
        for pos in 0..6 {
            let k = [pos as f32; 4];
            let v = [-(pos as f32); 4];
            p.write(1, &s, pos, &k, &v);
        }
        p.advance(&mut s, 6);
        let (k, v) = p.read(1, &s, 5);
        assert_eq!(k[0].to_f32(), 5.0);
        assert_eq!(v[3].to_f32(), -5.0);
        // Layer 0 untouched.
        assert_eq!(p.read(0, &s, 5).0[0].to_f32(), 0.0);
        p.release(&mut s);
        assert_eq!(p.free_pages(), 3);
        assert!(s.is_empty());
    }

    #[test]
    fn out_of_pages_is_all_or_nothing() {
        let mut p = pool(2);
        let mut a = SeqCache::new();
        let mut b = SeqCache::new();
        p.reserve(&mut a, 5).unwrap();
        let e = p.reserve(&mut b, 8).unwrap_err();
        assert_eq!(
            e,
            KvError::OutOfPages {
                needed: 2,
                free: 0,
                total: 2
            }
        );
        assert!(b.pages().is_empty());
    }

    #[test]
    fn truncate_frees_tail_pages() {
        let mut p = pool(4);
        let mut s = SeqCache::new();
        p.reserve(&mut s, 12).unwrap();
        p.advance(&mut s, 12);
        p.truncate(&mut s, 5);
        assert_eq!(s.len(), 5);
        assert_eq!(s.pages().len(), 2);
        assert_eq!(p.free_pages(), 2);
    }

    #[test]
    fn fork_shares_pages_and_copies_the_tail_on_write() {
        let mut p = pool(4);
        let mut a = SeqCache::new();
        p.reserve(&mut a, 6).unwrap();
        for pos in 0..6 {
            p.write(0, &a, pos, &[pos as f32; 4], &[0.0; 4]);
        }
        p.advance(&mut a, 6);
        let mut b = p.fork(&a);
        assert_eq!(b.pages(), a.pages());
        assert_eq!(p.free_pages(), 2);
        // b appends: its half-full second page is shared, so it gets a private copy.
        p.reserve(&mut b, 1).unwrap();
        assert_eq!(b.pages()[0], a.pages()[0]);
        assert_ne!(b.pages()[1], a.pages()[1]);
        assert_eq!(p.free_pages(), 1);
        p.write(0, &b, 6, &[100.0; 4], &[0.0; 4]);
        p.advance(&mut b, 1);
        // The copy carried the old positions; a's page was not touched.
        assert_eq!(p.read(0, &b, 5).0[0].to_f32(), 5.0);
        assert_eq!(p.read(0, &b, 6).0[0].to_f32(), 100.0);
        assert_eq!(p.read(0, &a, 5).0[0].to_f32(), 5.0);
        p.release(&mut a);
        assert_eq!(p.free_pages(), 2, "page 0 is still b's");
        p.release(&mut b);
        assert_eq!(p.free_pages(), 4);
    }

    #[test]
    fn cow_page_counts_toward_all_or_nothing() {
        let mut p = pool(2);
        let mut a = SeqCache::new();
        p.reserve(&mut a, 3).unwrap();
        p.advance(&mut a, 3);
        let mut b = p.fork(&a);
        // One free page: enough for the copy but not for the copy plus a new page.
        let e = p.reserve(&mut b, 4).unwrap_err();
        assert!(matches!(e, KvError::OutOfPages { needed: 2, .. }));
        assert_eq!(b.pages(), a.pages());
        p.reserve(&mut b, 1).unwrap();
        assert_eq!(p.free_pages(), 0);
    }

    #[test]
    fn attach_and_retain_keep_pages_alive() {
        let mut p = pool(3);
        let mut a = SeqCache::new();
        p.reserve(&mut a, 8).unwrap();
        p.advance(&mut a, 8);
        let cached = a.pages()[0];
        p.retain(cached);
        p.release(&mut a);
        assert_eq!(p.free_pages(), 2);
        let mut b = SeqCache::new();
        p.attach(&mut b, &[cached]);
        assert_eq!(b.len(), 4);
        assert_eq!(p.refcount(cached), 2);
        p.release_page(cached);
        p.release(&mut b);
        assert_eq!(p.free_pages(), 3);
    }
}
