//! The engine loop against a real (tiny, random-weight) model: batched work must give what each
//! sequence gives alone, and quotas, preemption, fairness and cancellation must hold.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::Duration;

use super::*;
use crate::model::LoadOptions;
use crate::session::{Session, argmax, top_k};

/// The engine loop publishes its stats after the step that answered a call, so a caller can
/// read them a moment before they include that call: wait (up to 10 s) until `ok` holds.
fn stats_when(engine: &Engine, ok: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = engine.stats();
        if ok(&st) || std::time::Instant::now() > deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn tiny_llama() -> Arc<Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/tiny-llama-mixed.gguf");
    Arc::new(
        Model::load(
            path,
            &LoadOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

struct Unpark(Thread);
impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs futures to completion on this thread, polling all of them so their messages reach the
/// engine together (as concurrent guests' would).
fn join_all<T>(futs: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut futs: Vec<_> = futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    while out.iter().any(Option::is_none) {
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f
                && let Poll::Ready(v) = fut.as_mut().poll(&mut cx)
            {
                *o = Some(v);
                *f = None;
            }
        }
        if out.iter().any(Option::is_none) {
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    join_all(vec![Box::pin(f)]).pop().unwrap()
}

/// See `model/tests.rs`: batch composition changes the f32 summation order of the kernels.
const TOLERANCE: f32 = 0.5;

/// Logits after the prompt and after each generated token but the last, and the greedy tokens.
type Run = (Vec<Vec<f32>>, Vec<u32>);
type Task<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= TOLERANCE, "{what}: logits differ by {d}");
    let top = top_k(want, 2);
    if top[0].1 - top[1].1 > 2.0 * TOLERANCE {
        assert_eq!(argmax(got), top[0].0, "{what}: different winner");
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 7919 + seed * 104_729) % 31_000)
        .collect()
}

/// Greedy continuation of `p` by a single sequence: (logits after the prompt, tokens).
fn alone(m: &Model, p: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let (logits, toks) = forced(m, p, steps, None);
    (logits.into_iter().next().unwrap(), toks)
}

/// `steps` tokens after `p` by a single sequence, each step's logits with them: greedy, or
/// `follow`'s tokens whatever this run's own winner (so that two runs can be compared step by
/// step even past a near-tie that one breaks the other way).
fn forced(m: &Model, p: &[u32], steps: usize, follow: Option<&[u32]>) -> Run {
    let mut s = Session::new(m, p.len() + steps + 1).unwrap();
    let mut logits = vec![s.feed(p).unwrap()];
    let mut toks = Vec::new();
    for i in 0..steps {
        let tok = follow.map_or_else(|| argmax(&logits[i]), |f| f[i]);
        toks.push(tok);
        if i + 1 < steps {
            logits.push(s.feed(&[tok]).unwrap());
        }
    }
    (logits, toks)
}

fn small_batches() -> EngineConfig {
    EngineConfig {
        kv_tokens: 4096,
        max_batch_tokens: 24,
        prefill_chunk: 8,
        prefix_cache: true,
        ..Default::default()
    }
}

#[test]
fn batched_generation_equals_each_sequence_alone() {
    let m = tiny_llama();
    let engine = Engine::start(m.clone(), small_batches()).unwrap();
    let prompts = [prompt(1, 5), prompt(2, 40), prompt(3, 77), prompt(4, 3)];
    let steps = [6, 12, 4, 9];

    // All four run at once: prompts are chunked and interleaved with the others' decodes, and
    // sequences leave at different steps.
    let runs: Vec<Task<'_, Run>> = prompts
        .iter()
        .zip(steps)
        .map(|(p, n)| {
            let engine = engine.clone();
            let p = p.clone();
            Box::pin(async move {
                let seq = engine.open("t").await.unwrap();
                let mut logits = vec![seq.feed(p.clone(), true).await.unwrap().unwrap()];
                let mut toks = vec![argmax(&logits[0])];
                for i in 1..n {
                    logits.push(seq.feed(vec![toks[i - 1]], true).await.unwrap().unwrap());
                    toks.push(argmax(&logits[i]));
                }
                assert_eq!(seq.len(), p.len() + n - 1);
                (logits, toks)
            }) as Pin<Box<dyn Future<Output = _>>>
        })
        .collect();
    let got = join_all(runs);
    for (i, (p, (gl, gt))) in prompts.iter().zip(&got).enumerate() {
        // Batching changes the kernels' summation order (rows go through gemm instead of gemv),
        // so a greedy path may break a near-tie the other way than the sequence alone would:
        // each step is compared with the sequence alone fed the same tokens. Every step's
        // logits agree within TOLERANCE, and its winner too wherever the alone run's is clear,
        // so the two greedy paths are the same up to a genuine near-tie.
        let (wl, _) = forced(&m, p, gt.len(), Some(gt));
        for (step, (g, w)) in gl.iter().zip(&wl).enumerate() {
            assert_close(g, w, &format!("sequence {i} at step {step}"));
        }
        // Where the lone greedy run has no near-tie, it is the path compared above.
        let (lone_logits, lone_toks) = forced(&m, p, gt.len(), None);
        let clear = lone_logits.iter().take_while(|l| {
            let top = top_k(l, 2);
            top[0].1 - top[1].1 > 2.0 * TOLERANCE
        });
        let n = clear.count();
        assert_eq!(gt[..n], lone_toks[..n], "sequence {i}: greedy tokens");
    }
    let st = engine.stats();
    assert!(st.steps > 0 && st.tokens_processed >= 125);
}

#[test]
fn fork_and_prefix_reuse_equal_recomputation() {
    let m = tiny_llama();
    let engine = Engine::start(m.clone(), small_batches()).unwrap();
    let p = prompt(9, 70); // two full pages of 32 and 6 tokens more
    block_on(async {
        let a = engine.open("t").await.unwrap();
        let la = a.feed(p.clone(), true).await.unwrap().unwrap();
        let b = a.fork().await.unwrap();
        assert_eq!(b.len(), 70);
        let lb = b.feed(vec![42], true).await.unwrap().unwrap();
        // a continues differently; its shared tail page must not be disturbed by b's write.
        let la2 = a.feed(vec![7], true).await.unwrap().unwrap();

        let mut q = p.clone();
        q.push(42);
        assert_close(&lb, &alone(&m, &q, 1).0, "fork + 42");
        q.pop();
        q.push(7);
        assert_close(&la2, &alone(&m, &q, 1).0, "original + 7");
        assert_close(&la, &alone(&m, &p, 1).0, "prompt");
        drop((a, b));

        // Same tenant, same first 64 tokens: both pages come from the cache.
        let hits = engine.stats().prefix_hit_tokens;
        let c = engine.open("t").await.unwrap();
        let mut r = p[..66].to_vec();
        r.push(3);
        let lc = c.feed(r.clone(), true).await.unwrap().unwrap();
        let st = stats_when(&engine, |s| s.prefix_hit_tokens - hits >= 64);
        assert_eq!(st.prefix_hit_tokens - hits, 64);
        assert_close(&lc, &alone(&m, &r, 1).0, "prefix hit");

        // Another tenant never hits this tenant's cache.
        let d = engine.open("other").await.unwrap();
        let ld = d.feed(r.clone(), true).await.unwrap().unwrap();
        // d's step has been published once d's pages are counted.
        let st = stats_when(&engine, |s| {
            s.tenants.get("other").is_some_and(|t| t.kv_pages > 0)
        });
        assert_eq!(st.prefix_hit_tokens - hits, 64);
        assert_close(&ld, &lc, "other tenant recomputes");

        // Truncate and refeed inside a cached page: copy-on-write keeps the cache intact.
        c.truncate(40).await.unwrap();
        assert_eq!(c.len(), 40);
        c.feed(vec![5, 6], false).await.unwrap();
        let e = engine.open("t").await.unwrap();
        let le = e.feed(r.clone(), true).await.unwrap().unwrap();
        assert_close(&le, &lc, "cache after a truncated writer");
    });
}

#[test]
fn quotas_are_enforced_with_named_errors() {
    let m = tiny_llama();
    let engine = Engine::start(m, small_batches()).unwrap();
    engine.set_tenant(
        "q",
        TenantLimits {
            max_sessions: Some(2),
            max_kv_pages: Some(2),
            ..Default::default()
        },
    );
    block_on(async {
        let a = engine.open("q").await.unwrap();
        let b = engine.open("q").await.unwrap();
        let e = engine.open("q").await.unwrap_err();
        assert!(
            matches!(e, SchedError::TooManySessions { limit: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("session limit"));
        let e = a.fork().await.unwrap_err();
        assert!(matches!(e, SchedError::TooManySessions { .. }));
        // Other tenants are not affected.
        let _c = engine.open("free").await.unwrap();

        // 2 pages = 64 tokens for the whole tenant.
        a.feed(prompt(1, 40), false).await.unwrap();
        let e = b.feed(prompt(2, 40), false).await.unwrap_err();
        assert!(matches!(e, SchedError::KvQuota { limit: 2, .. }), "{e}");
        assert!(e.to_string().contains("KV-cache quota"), "{e}");
        // Fits once a's pages are released.
        a.truncate(0).await.unwrap();
        b.feed(prompt(2, 40), true).await.unwrap().unwrap();
        let st = stats_when(&engine, |s| s.tenants["q"].kv_pages == 2);
        assert_eq!(st.tenants["q"].kv_pages, 2);
    });
}

#[test]
fn full_pool_preempts_the_youngest_and_recomputes_it() {
    let m = tiny_llama();
    let engine = Engine::start(
        m.clone(),
        EngineConfig {
            kv_tokens: 128, // 4 pages
            prefix_cache: false,
            ..small_batches()
        },
    )
    .unwrap();
    let pa = prompt(5, 90); // 3 pages
    let pb = prompt(6, 60); // 2 pages
    block_on(async {
        let a = engine.open("t").await.unwrap();
        a.feed(pa.clone(), false).await.unwrap();
        let b = engine.open("t").await.unwrap();
        // b needs 2 pages, 1 is free: a (the only other holder) gives its pages up.
        let lb = b.feed(pb.clone(), true).await.unwrap().unwrap();
        assert_close(&lb, &alone(&m, &pb, 1).0, "b");
        assert_eq!(stats_when(&engine, |s| s.preemptions >= 1).preemptions, 1);
        // a continues: it recomputes its 90 tokens, taking b's pages (b is younger).
        let la = a.feed(vec![11], true).await.unwrap().unwrap();
        let mut q = pa.clone();
        q.push(11);
        assert_close(&la, &alone(&m, &q, 1).0, "a after recomputation");
        assert_eq!(a.len(), 91);
        assert_eq!(stats_when(&engine, |s| s.preemptions >= 2).preemptions, 2);
        // And b, preempted, still gives the right answer.
        let lb2 = b.feed(vec![12], true).await.unwrap().unwrap();
        let mut q = pb.clone();
        q.push(12);
        assert_close(&lb2, &alone(&m, &q, 1).0, "b after recomputation");

        // Larger than the whole pool: an error, not a hang.
        let c = engine.open("t").await.unwrap();
        drop((a, b));
        let e = c.feed(prompt(7, 200), true).await.unwrap_err();
        assert!(
            matches!(e, SchedError::PoolTooSmall { total: 4, .. }),
            "{e}"
        );
    });
    // Closing is asynchronous: wait for the engine to get to it.
    let freed = (0..100).any(|_| {
        let st = engine.stats();
        std::thread::sleep(Duration::from_millis(10));
        st.pages_free == st.pages_total
    });
    assert!(freed, "everything freed: {:?}", engine.stats());
}

#[test]
fn a_tenant_above_its_share_of_the_pool_is_preempted_first() {
    let m = tiny_llama();
    let engine = Engine::start(
        m.clone(),
        EngineConfig {
            kv_tokens: 256, // 8 pages: 4 each when two tenants are active
            prefix_cache: false,
            ..small_batches()
        },
    )
    .unwrap();
    block_on(async {
        // The hog, alone, may fill the whole pool: four sequences of 2 pages.
        let mut hog = Vec::new();
        for i in 0..4 {
            let s = engine.open("hog").await.unwrap();
            s.feed(prompt(20 + i, 60), false).await.unwrap();
            hog.push(s);
        }
        let st = stats_when(&engine, |s| s.pages_free == 0);
        assert_eq!((st.pages_free, st.tenants["hog"].kv_pages), (0, 8));

        // Another tenant's long prompt (4 pages, its share) is admitted by preempting the hog.
        let lone = engine.open("lone").await.unwrap();
        let pl = prompt(30, 100);
        let ll = lone.feed(pl.clone(), true).await.unwrap().unwrap();
        assert_close(&ll, &alone(&m, &pl, 1).0, "lone prompt");
        let st = stats_when(&engine, |s| s.tenants["lone"].kv_pages == 4);
        assert_eq!(st.tenants["lone"].kv_pages, 4);
        assert_eq!(st.tenants["hog"].kv_pages, 4);
        assert_eq!(st.tenants["hog"].preemptions, 2, "{st:?}");

        // The hog keeps going in its own share (its sequences now need 3 pages each, so they
        // take turns), and never takes the pages of the other tenant, idle within its share.
        let runs: Vec<Task<'_, Vec<u32>>> = hog
            .iter()
            .map(|s| {
                Box::pin(async move {
                    let mut toks = Vec::new();
                    let mut tok = 5;
                    for _ in 0..10 {
                        let l = s.feed(vec![tok], true).await.unwrap().unwrap();
                        tok = argmax(&l);
                        toks.push(tok);
                    }
                    toks
                }) as Task<'_, Vec<u32>>
            })
            .collect();
        let hog_toks = join_all(runs);
        for s in &hog {
            assert_eq!(s.len(), 70);
        }
        // Preemption and recomputation do not change what the hog computes.
        let mut q = prompt(20, 60);
        q.push(5);
        q.extend_from_slice(&hog_toks[0][..9]);
        let (wl, _) = forced(&m, &q, 1, None);
        let got = hog[0].feed(vec![], true).await.unwrap().unwrap();
        assert_close(&got, &wl[0], "hog after taking turns");

        let st = engine.stats();
        assert_eq!(st.tenants["lone"].preemptions, 0, "{st:?}");
        assert_eq!(st.tenants["lone"].kv_pages, 4);
        assert!(st.tenants["hog"].preemptions > 2, "{st:?}");
        // Its cache intact, the other tenant continues without recomputing anything.
        let before = st.tenants["lone"].tokens_processed;
        let l2 = lone.feed(vec![9], true).await.unwrap().unwrap();
        let mut q = pl.clone();
        q.push(9);
        assert_close(&l2, &alone(&m, &q, 1).0, "lone after the hog's turns");
        let st = stats_when(&engine, |s| s.tenants["lone"].tokens_processed > before);
        assert_eq!(st.tenants["lone"].tokens_processed, before + 1);
    });
}

#[test]
fn explicit_kv_quota_still_caps_a_tenant_alone() {
    let m = tiny_llama();
    let engine = Engine::start(
        m,
        EngineConfig {
            kv_tokens: 256,
            prefix_cache: false,
            ..small_batches()
        },
    )
    .unwrap();
    engine.set_tenant(
        "capped",
        TenantLimits {
            max_kv_pages: Some(3),
            ..Default::default()
        },
    );
    block_on(async {
        // Alone, the fair share would be the whole pool; the operator's quota still holds.
        let a = engine.open("capped").await.unwrap();
        let e = a.feed(prompt(1, 100), false).await.unwrap_err();
        assert!(matches!(e, SchedError::KvQuota { limit: 3, .. }), "{e}");
        let st = stats_when(&engine, |s| s.tenants["capped"].kv_pages == 3);
        assert_eq!(st.tenants["capped"].kv_pages, 3);
        // Within its fair share (4 of 8 with another tenant), it keeps them.
        let b = engine.open("free").await.unwrap();
        b.feed(prompt(2, 160), false).await.unwrap();
        let st = stats_when(&engine, |s| s.pages_free == 0);
        assert_eq!((st.pages_free, st.tenants["free"].kv_pages), (0, 5));
        assert_eq!(st.preemptions, 0);
    });
}

#[test]
fn many_streams_of_one_tenant_do_not_starve_another_tenants_prompt() {
    let m = tiny_llama();
    let engine = Engine::start(m, small_batches()).unwrap();
    block_on(async {
        // 30 streams: more decoding sequences than a pass's 24 tokens.
        let mut seqs = Vec::new();
        for _ in 0..30 {
            seqs.push(engine.open("streams").await.unwrap());
        }
        let firsts = join_all(
            seqs.iter()
                .enumerate()
                .map(|(i, s)| {
                    Box::pin(async move { s.feed(prompt(i as u32, 3), true).await.unwrap() })
                        as Task<'_, Option<Vec<f32>>>
                })
                .collect(),
        );
        let lone = engine.open("lone").await.unwrap();
        let before =
            stats_when(&engine, |s| s.tenants["streams"].tokens_processed == 90).tenants["streams"]
                .tokens_processed;
        assert_eq!(before, 90);
        let mut futs: Vec<Task<'_, Option<u64>>> = seqs
            .iter()
            .zip(firsts)
            .map(|(s, first)| {
                Box::pin(async move {
                    let mut l = first.unwrap();
                    for _ in 0..20 {
                        l = s.feed(vec![argmax(&l)], true).await.unwrap().unwrap();
                    }
                    None
                }) as Task<'_, Option<u64>>
            })
            .collect();
        let engine2 = engine.clone();
        futs.push(Box::pin(async move {
            lone.feed(prompt(99, 64), false).await.unwrap();
            Some(engine2.stats().tenants["streams"].tokens_processed - before)
        }));
        let out = join_all(futs);
        let streams_then = out.into_iter().flatten().next().unwrap();
        // The pass is split between the two tenants: the prompt advances a chunk (8) every
        // step while the streams take the rest (16), so it is done long before their 600.
        assert!(
            streams_then <= 300,
            "streams processed {streams_then} tokens before the prompt's 64 were done"
        );
    });
}

#[test]
fn tenants_share_steps_fairly() {
    let m = tiny_llama();
    let engine = Engine::start(m, small_batches()).unwrap();
    block_on(async {
        let mut seqs = Vec::new();
        for _ in 0..6 {
            seqs.push(engine.open("busy").await.unwrap());
        }
        let lone = engine.open("lone").await.unwrap();
        let mut futs: Vec<Pin<Box<dyn Future<Output = Option<u64>> + '_>>> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Box::pin(async move {
                    s.feed(prompt(i as u32, 120), false).await.unwrap();
                    None
                }) as Pin<Box<dyn Future<Output = _>>>
            })
            .collect();
        let engine2 = engine.clone();
        futs.push(Box::pin(async move {
            lone.feed(prompt(99, 120), false).await.unwrap();
            // How far the busy tenant got while the lone one did all of its 120 tokens.
            Some(engine2.stats().tenants["busy"].tokens_processed)
        }));
        let out = join_all(futs);
        let busy_then = out.into_iter().flatten().next().unwrap();
        // Round-robin by tenant: about as many tokens as the lone tenant (120), not 6x.
        assert!(
            busy_then <= 200,
            "busy tenant processed {busy_then} meanwhile"
        );
    });
}

#[test]
fn closing_and_cancelling_free_pages_at_once() {
    let m = tiny_llama();
    let engine = Engine::start(m, small_batches()).unwrap();
    block_on(async {
        let a = engine.open("t").await.unwrap();
        a.feed(prompt(1, 100), false).await.unwrap();
        // The stats of the step that answered may be published a moment after the answer.
        let busy = stats_when(&engine, |s| s.tenants["t"].kv_pages == 4);
        assert_eq!(busy.tenants["t"].kv_pages, 4);
        drop(a);
        let b = engine.open("t").await.unwrap();
        // Close is a message; stats follow once the engine has handled it.
        let settled = (0..100).any(|_| {
            let st = engine.stats();
            std::thread::sleep(Duration::from_millis(10));
            st.tenants["t"].kv_pages == 0 && st.sequences == 1
        });
        assert!(settled, "{:?}", engine.stats());

        // A feed whose caller went away is skipped.
        let fut = b.feed(prompt(2, 500), true);
        drop(fut);
        let l = b.feed(vec![1], true).await.unwrap().unwrap();
        assert!(!l.is_empty());
        assert!(b.len() < 500);
    });
}

#[test]
fn errors_are_answers_not_crashes() {
    let m = tiny_llama();
    let n_vocab = m.hparams.n_vocab;
    let engine = Engine::start(m, small_batches()).unwrap();
    block_on(async {
        let a = engine.open("t").await.unwrap();
        let e = a.feed(vec![n_vocab as u32], true).await.unwrap_err();
        assert!(matches!(e, SchedError::BadToken { .. }));
        let e = a.truncate(3).await.unwrap_err();
        assert!(matches!(e, SchedError::BadTruncate { len: 0, to: 3 }));
        assert!(a.feed(vec![], true).await.is_err(), "no logits yet");
        let l1 = a.feed(vec![5, 6, 7], true).await.unwrap().unwrap();
        // Empty feed with logits recomputes the last position.
        let l2 = a.feed(vec![], true).await.unwrap().unwrap();
        assert_close(&l2, &l1, "logits of the current end");
        assert_eq!(a.len(), 3);
        let e = a.feed(vec![1; 5000], false).await.unwrap_err();
        assert!(matches!(e, SchedError::ContextFull { .. }), "{e}");
        // Still usable.
        a.feed(vec![8], true).await.unwrap().unwrap();
    });
}

#[test]
fn tokens_per_minute_throttles_instead_of_failing() {
    let m = tiny_llama();
    let engine = Engine::start(m, small_batches()).unwrap();
    engine.set_tenant(
        "slow",
        TenantLimits {
            tokens_per_minute: Some(60),
            ..Default::default()
        },
    );
    let a = Arc::new(block_on(engine.open("slow")).unwrap());
    block_on(a.feed(prompt(1, 50), false)).unwrap();
    // 10 tokens left in the bucket, refilling at one a second: 50 more must wait, not fail.
    let (tx, rx) = std::sync::mpsc::channel();
    let a2 = a.clone();
    let worker = std::thread::spawn(move || {
        tx.send(block_on(a2.feed(prompt(2, 50), false)).is_ok())
            .unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(400)).is_err(),
        "not throttled"
    );
    let done = engine.stats().tenants["slow"].tokens_processed;
    assert!((50..=62).contains(&done), "processed {done}");
    // Lifting the limit lets the queued work through.
    engine.set_tenant("slow", TenantLimits::default());
    assert!(rx.recv_timeout(Duration::from_secs(60)).unwrap());
    worker.join().unwrap();
    assert_eq!(a.len(), 100);
}

#[test]
fn two_models_serve_at_once() {
    let llama = tiny_llama();
    let qwen = Arc::new(
        Model::load(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models/tiny-qwen2-gpt2vocab.gguf"),
            &LoadOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let (e1, e2) = (
        Engine::start(llama.clone(), small_batches()).unwrap(),
        Engine::start(qwen.clone(), small_batches()).unwrap(),
    );
    let (p1, p2) = (prompt(1, 20), prompt(2, 20));
    let runs: Vec<Task<'_, Vec<f32>>> = vec![
        Box::pin(async {
            let s = e1.open("t").await.unwrap();
            s.feed(p1.clone(), true).await.unwrap().unwrap()
        }),
        Box::pin(async {
            let s = e2.open("t").await.unwrap();
            let p: Vec<u32> = p2.iter().map(|t| t % 50_000).collect();
            s.feed(p, true).await.unwrap().unwrap()
        }),
    ];
    let got = join_all(runs);
    assert_close(&got[0], &alone(&llama, &p1, 1).0, "llama engine");
    let p: Vec<u32> = p2.iter().map(|t| t % 50_000).collect();
    assert_close(&got[1], &alone(&qwen, &p, 1).0, "qwen2 engine");
}
