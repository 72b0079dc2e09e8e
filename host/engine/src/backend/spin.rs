//! A fork-join pool whose workers stay awake between parallel regions.
//!
//! A decode step of a small model is ~75 short parallel regions (a matrix-vector product each, a
//! few to a few hundred microseconds). Handing each to rayon costs a wake-up of the sleeping
//! workers (a futex round trip, tens of microseconds on a VM), a visible fraction of the step.
//! Here the workers spin on a shared ticket for a while after each region and only then park,
//! so back-to-back regions start at the cost of one cache-line transfer.
//!
//! # Protocol
//! One `u64` ticket holds `epoch | task count | next task index`. The caller publishes a region
//! by storing a fresh ticket (new epoch, index 0); every participant (the caller included)
//! claims task indices with `fetch_add` on the whole word, so a claim reads the epoch, the task
//! count and its index in one atomic step and can never run a task of a region it did not see.
//! A claim below the count means the region is still in flight (that task is not done yet), so
//! the caller is still waiting inside [`SpinPool::run`] and the closure it published is alive.
//! The caller returns only once `pending` (tasks not finished) reaches zero.
//!
//! A worker that finds nothing to do spins (yielding now and then, so that other runnable threads
//! still get the core) until the epoch changes or `spin` has passed, then parks. It announces
//! that in its `sleeping` flag before re-checking the ticket, and the caller checks the flags
//! after publishing; both sides use `SeqCst`, so either the worker sees the new epoch or the
//! caller sees the flag and unparks it.
//!
//! A panicking task does not kill its worker: the first panic of a region is kept and re-raised
//! on the caller's thread once every task has finished.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IDX_BITS: u32 = 20;
const N_BITS: u32 = 20;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
const N_MASK: u64 = (1 << N_BITS) - 1;
/// Tasks per published region. Claims past the count still increment the index (once per
/// participant per region), so the count leaves that much headroom below the index's width.
const MAX_TASKS: usize = 1 << (IDX_BITS - 1);

fn pack(epoch: u64, n: usize, idx: usize) -> u64 {
    (epoch << (IDX_BITS + N_BITS)) | ((n as u64) << IDX_BITS) | idx as u64
}

fn epoch_of(t: u64) -> u64 {
    t >> (IDX_BITS + N_BITS)
}

/// The published closure, behind a thin pointer.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    ticket: AtomicU64,
    /// Points to the `Job` of the region in flight (on the caller's stack).
    job: AtomicPtr<Job<'static>>,
    pending: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    sleeping: Vec<AtomicBool>,
    shutdown: AtomicBool,
    /// Set by [`SpinPool::rest`]: idle workers park at once instead of spinning; cleared when
    /// the next region is published.
    resting: AtomicBool,
    spin: Duration,
}

impl Shared {
    /// Claims and runs tasks until the region seen by the claim is exhausted; returns the epoch
    /// of the last claim.
    fn work(&self) -> u64 {
        loop {
            let t = self.ticket.fetch_add(1, AcqRel);
            let n = ((t >> IDX_BITS) & N_MASK) as usize;
            let i = (t & IDX_MASK) as usize;
            if i >= n {
                return epoch_of(t);
            }
            // SAFETY: task i < n of this ticket's region is claimed and not finished (this
            // thread has yet to decrement `pending` for it), so the caller that published the
            // region is still inside `run`, where the `Job` it points to lives. The claim's
            // `fetch_add` read the publishing store (or a later claim of the same region), so
            // the pointer stored before it is visible.
            let job = unsafe { &*self.job.load(Acquire) };
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (job.f)(i))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(p);
            }
            self.pending.fetch_sub(1, Release);
        }
    }

    /// Waits until the epoch differs from `seen`; false on shutdown.
    fn wait(&self, me: usize, seen: u64) -> bool {
        let mut start = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.shutdown.load(Acquire) {
                return false;
            }
            if epoch_of(self.ticket.load(Acquire)) != seen {
                return true;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
            } else if start.elapsed() < self.spin && !self.resting.load(Relaxed) {
                // Lets other runnable threads (another engine's, say) have this core: returns
                // at once when there are none.
                std::thread::yield_now();
            } else {
                self.sleeping[me].store(true, SeqCst);
                if epoch_of(self.ticket.load(SeqCst)) == seen && !self.shutdown.load(SeqCst) {
                    std::thread::park();
                }
                self.sleeping[me].store(false, SeqCst);
                start = Instant::now();
            }
        }
    }
}

/// A fixed set of worker threads plus the calling thread, for short fork-join regions.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held by the caller of the region in flight; a region holds the only ticket.
    dispatch: Mutex<u64>,
}

impl SpinPool {
    /// `threads` participants in all: the caller of [`SpinPool::run`] and `threads - 1`
    /// workers, which spin for `spin` after each region before parking.
    pub fn new(threads: usize, spin: Duration) -> std::io::Result<Self> {
        let n_workers = threads.saturating_sub(1);
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(pack(0, 0, 0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
            resting: AtomicBool::new(false),
            spin,
        });
        let mut pool = SpinPool {
            shared,
            workers: Vec::with_capacity(n_workers),
            dispatch: Mutex::new(0),
        };
        for me in 0..n_workers {
            let shared = Arc::clone(&pool.shared);
            // On error the pool built so far is dropped, which stops its workers.
            let handle = std::thread::Builder::new()
                .name(format!("realm-spin-{}", me + 1))
                .spawn(move || {
                    let mut seen = 0;
                    while shared.wait(me, seen) {
                        seen = shared.work();
                    }
                })?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Participants (workers + the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` for every `i < n`, spread over the pool, and returns when all are done. A
    /// panic in any task is re-raised here after the others finished. A call made while another
    /// region is in flight (from another thread, or from inside a task) runs on its own thread.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let guard = match self.dispatch.try_lock() {
            Ok(g) => Some(g),
            // The guard is released before a task's panic is re-raised, but a poisoned lock
            // would still protect nothing but the epoch counter.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let Some(mut epoch) = guard.filter(|_| !self.workers.is_empty() && n > 1) else {
            (0..n).for_each(f);
            return;
        };
        for base in (0..n).step_by(MAX_TASKS) {
            let count = MAX_TASKS.min(n - base);
            let g = |i: usize| f(base + i);
            let job = Job { f: &g };
            let s = &*self.shared;
            *epoch = (*epoch + 1) & (u64::MAX >> (IDX_BITS + N_BITS));
            s.resting.store(false, Relaxed);
            s.pending.store(count, Relaxed);
            s.job
                .store((&job as *const Job<'_>).cast_mut().cast(), Relaxed);
            s.ticket.store(pack(*epoch, count, 0), SeqCst);
            for (flag, w) in s.sleeping.iter().zip(&self.workers) {
                if flag.load(SeqCst) {
                    w.thread().unpark();
                }
            }
            s.work();
            let mut spins = 0u32;
            while s.pending.load(Acquire) != 0 {
                spins = spins.wrapping_add(1);
                // A worker holding a task may have been descheduled: stop competing with it.
                if spins.is_multiple_of(1024) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            s.job.store(std::ptr::null_mut(), Relaxed);
            let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(p) = panic {
                drop(epoch);
                resume_unwind(p);
            }
        }
    }

    /// Tells idle workers to park now rather than spin until the next region: for the end of a
    /// burst of regions (a forward pass), when the cores are better left to other threads (the
    /// callers sampling, guests, the server). The next region wakes them.
    pub fn rest(&self) {
        self.shared.resting.store(true, Relaxed);
    }

    /// Calls `f` on every item, spread over the pool (each item goes to exactly one task).
    pub fn for_each<T: Send>(&self, items: Vec<T>, f: impl Fn(T) + Sync) {
        let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
        self.run(slots.len(), &|i| {
            let item = slots[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .expect("each index is claimed once");
            f(item);
        });
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            // Tasks' panics are caught inside the workers, so a join error can't carry one.
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicU32;

    fn pool(threads: usize) -> SpinPool {
        SpinPool::new(threads, Duration::from_micros(200)).unwrap()
    }

    #[test]
    fn rest_parks_idle_workers_and_the_next_region_wakes_them() {
        // Workers that would spin for a minute after each region.
        let p = SpinPool::new(3, Duration::from_secs(60)).unwrap();
        let count = AtomicU32::new(0);
        for _ in 0..3 {
            p.run(64, &|_| {
                count.fetch_add(1, Relaxed);
            });
            p.rest();
            let t = Instant::now();
            while !p.shared.sleeping.iter().all(|f| f.load(SeqCst)) {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "workers kept spinning"
                );
                std::thread::yield_now();
            }
        }
        assert_eq!(count.load(Relaxed), 3 * 64);
    }

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in [1, 2, 4] {
            let p = pool(threads);
            for n in [0, 1, 2, 3, 17, 64, 1000] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                p.run(n, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Relaxed) == 1),
                    "threads {threads} n {n}"
                );
            }
        }
    }

    #[test]
    fn many_back_to_back_regions_stay_consistent() {
        // Short regions separated by gaps both shorter and longer than the spin, so workers
        // are caught spinning, parking and waking.
        let p = pool(3);
        let total = AtomicUsize::new(0);
        for r in 0..3000 {
            let n = 1 + r % 9;
            p.run(n, &|i| {
                total.fetch_add(i + 1, Relaxed);
            });
            if r % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let want: usize = (0..3000).map(|r| (1..=1 + r % 9).sum::<usize>()).sum();
        assert_eq!(total.load(Relaxed), want);
    }

    #[test]
    fn work_is_shared_between_threads() {
        let p = pool(2);
        let ids = Mutex::new(HashSet::new());
        // Each task waits long enough that one thread cannot take them all.
        p.run(8, &|_| {
            ids.lock().unwrap().insert(std::thread::current().id());
            std::thread::sleep(Duration::from_millis(5));
        });
        assert_eq!(ids.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_panicking_task_reraises_after_the_region_and_the_pool_still_works() {
        let p = pool(3);
        let done = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            p.run(32, &|i| {
                if i == 5 {
                    panic!("task five failed");
                }
                std::thread::sleep(Duration::from_micros(200));
                done.fetch_add(1, Relaxed);
            })
        }));
        let msg = r.expect_err("the panic reaches the caller");
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"task five failed"));
        // Every other task still ran before `run` returned.
        assert_eq!(done.load(Relaxed), 31);
        let hits = AtomicUsize::new(0);
        p.run(100, &|_| {
            hits.fetch_add(1, Relaxed);
        });
        assert_eq!(hits.load(Relaxed), 100);
    }

    #[test]
    fn nested_and_concurrent_calls_run_inline() {
        let p = pool(2);
        let hits = AtomicUsize::new(0);
        p.run(4, &|_| {
            p.run(3, &|_| {
                hits.fetch_add(1, Relaxed);
            });
        });
        assert_eq!(hits.load(Relaxed), 12);
        let p = &p;
        let hits = &hits;
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(move || {
                    for _ in 0..200 {
                        p.run(5, &|_| {
                            hits.fetch_add(1, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(hits.load(Relaxed), 12 + 3 * 200 * 5);
    }

    #[test]
    fn for_each_hands_out_items_mutably() {
        let p = pool(4);
        let mut data = vec![0u32; 1000];
        let chunks: Vec<(usize, &mut [u32])> = data.chunks_mut(7).enumerate().collect();
        p.for_each(chunks, |(c, xs)| {
            for (j, x) in xs.iter_mut().enumerate() {
                *x = (c * 7 + j) as u32;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &x)| x == i as u32));
    }

    #[test]
    fn drop_stops_spinning_and_parked_workers() {
        for wait in [0, 5] {
            let p = pool(4);
            p.run(16, &|_| {});
            std::thread::sleep(Duration::from_millis(wait));
            // Join must return: a hang here fails the test by timeout.
            drop(p);
        }
    }

    #[test]
    fn more_tasks_than_one_ticket_holds() {
        let p = pool(2);
        let n = MAX_TASKS + 3;
        let sum = AtomicU64::new(0);
        p.run(n, &|i| {
            sum.fetch_add(i as u64, Relaxed);
        });
        assert_eq!(sum.load(Relaxed), (n as u64 - 1) * n as u64 / 2);
    }
}
