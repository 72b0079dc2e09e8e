//! The sandbox: limits end calls with the limit named, the host keeps serving, and a call's
//! sessions die with it. Real guests (built from `guests/`), real tiny models, real engine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use realm_engine::sched::{Engine, EngineConfig};
use realm_engine::{LoadOptions, Model};
use realm_runtime::{
    GuestError, GuestLimits, InvokeContext, LimitKind, Runtime, RuntimeConfig, RuntimeError,
    builtin,
};
use serde_json::{Value, json};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/tiny-llama-mixed.gguf"
);

fn engine() -> Engine {
    let model = Model::load(
        MODEL,
        &LoadOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .expect("load tiny model");
    Engine::start(
        Arc::new(model),
        EngineConfig {
            kv_tokens: 2048,
            // Off, so that freed pages show up as free rather than as cached prefixes.
            prefix_cache: false,
            ..EngineConfig::default()
        },
    )
    .expect("start the engine")
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        max_instances: 16,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn runtime_with_model() -> (Runtime, Engine) {
    let rt = runtime();
    let e = engine();
    rt.add_model("tiny", e.clone()).expect("add model");
    (rt, e)
}

fn ctx(tenant: &str, limits: GuestLimits) -> InvokeContext {
    InvokeContext {
        tenant: tenant.into(),
        limits,
        ..InvokeContext::default()
    }
}

async fn call(
    rt: &Runtime,
    ctx: InvokeContext,
    input: Value,
) -> (Result<Value, GuestError>, String) {
    let guest = rt.load_guest(builtin::TESTBED_WASM).expect("testbed loads");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = rt.invoke(&guest, ctx, input.to_string(), tx).await;
    let mut streamed = String::new();
    while let Ok(s) = rx.try_recv() {
        streamed.push_str(&s);
    }
    (
        r.map(|s| serde_json::from_str(&s).expect("response is JSON")),
        streamed,
    )
}

fn limit_of(r: &Result<Value, GuestError>) -> Option<LimitKind> {
    match r {
        Err(GuestError::Limit { limit, .. }) => Some(*limit),
        _ => None,
    }
}

/// The engine publishes stats from its own thread; wait until the tenant holds nothing.
async fn wait_freed(e: &Engine, tenant: &str) -> realm_engine::sched::EngineStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = e.stats();
        let t = s.tenants.get(tenant);
        let held = t.map_or(0, |t| t.sessions + t.kv_pages);
        if (held == 0 && s.pages_free == s.pages_total) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn loading_validates_components() {
    let rt = runtime();
    assert!(matches!(
        rt.load_guest(b"not wasm at all"),
        Err(RuntimeError::NotComponent(_))
    ));
    let core_module = b"\0asm\x01\0\0\0";
    match rt.load_guest(core_module) {
        Err(RuntimeError::NotComponent(m)) => assert!(m.contains("core module"), "{m}"),
        other => panic!("{other:?}"),
    }
    match rt.load_guest(builtin::BAD_IMPORT_WASM) {
        Err(RuntimeError::UngrantedImport(name)) => {
            assert!(name.contains("realm:forbidden/net"), "{name}")
        }
        other => panic!("{other:?}"),
    }
    let a = rt.load_guest(builtin::CHAT_WASM).expect("chat loads");
    let b = rt.load_guest(builtin::CHAT_WASM).expect("chat loads again");
    assert_eq!(a.hash(), b.hash());
    assert_eq!(a.hash().len(), 64);
    for wasm in [
        builtin::JSON_WASM,
        builtin::BEST_OF_N_WASM,
        builtin::TESTBED_WASM,
    ] {
        rt.load_guest(wasm).expect("built-in guest loads");
    }
}

#[test]
fn disk_cache_is_used_across_runtimes() {
    let dir = std::env::temp_dir().join(format!("realm-guest-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = RuntimeConfig {
        cache_dir: Some(dir.clone()),
        max_instances: 4,
        ..RuntimeConfig::default()
    };
    let t0 = Instant::now();
    Runtime::new(cfg.clone())
        .unwrap()
        .load_guest(builtin::CHAT_WASM)
        .unwrap();
    let cold = t0.elapsed();
    let files = walk(&dir);
    assert!(!files.is_empty(), "nothing written to the cache directory");
    let t1 = Instant::now();
    Runtime::new(cfg)
        .unwrap()
        .load_guest(builtin::CHAT_WASM)
        .unwrap();
    let warm = t1.elapsed();
    // Not a timing test: only a sanity check that the second load did not recompile
    // (compilation takes far longer than reading the artifact).
    assert!(warm < cold, "warm {warm:?} vs cold {cold:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_interrupted_and_the_host_keeps_serving() {
    let rt = runtime();
    let limits = GuestLimits {
        cpu_time: Duration::from_millis(300),
        ..GuestLimits::default()
    };
    let start = Instant::now();
    let looping = {
        let rt = rt.clone();
        let c = ctx("a", limits.clone());
        tokio::spawn(async move { call(&rt, c, json!({"op": "loop"})).await })
    };
    // While the loop spins, another tenant's calls complete.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        let (r, streamed) = call(
            &rt,
            ctx("b", GuestLimits::default()),
            json!({"op": "echo", "text": format!("hi {i}")}),
        )
        .await;
        assert_eq!(r.unwrap()["text"], format!("hi {i}"));
        assert_eq!(streamed, format!("hi {i}"));
    }
    let (r, _) = looping.await.unwrap();
    let took = start.elapsed();
    match &r {
        Err(
            e @ GuestError::Limit {
                limit: LimitKind::CpuTime,
                ..
            },
        ) => {
            assert!(e.to_string().contains("CPU time"), "{e}")
        }
        other => panic!("expected the CPU limit, got {other:?}"),
    }
    // Interrupted at the limit (generous slack: the test machine is shared and busy).
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let (r, _) = call(
        &rt,
        ctx("a", limits),
        json!({"op": "echo", "text": "after"}),
    )
    .await;
    assert_eq!(r.unwrap()["text"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_deadline_ends_the_call() {
    let rt = runtime();
    let limits = GuestLimits {
        cpu_time: Duration::from_secs(60),
        wall_clock: Duration::from_millis(200),
        ..GuestLimits::default()
    };
    let (r, _) = call(&rt, ctx("a", limits), json!({"op": "loop"})).await;
    assert_eq!(limit_of(&r), Some(LimitKind::WallClock), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_stops_at_the_cap() {
    let rt = runtime();
    let limits = GuestLimits {
        memory_bytes: 32 << 20,
        ..GuestLimits::default()
    };
    let (r, _) = call(
        &rt,
        ctx("a", limits.clone()),
        json!({"op": "alloc", "mb": 1}),
    )
    .await;
    match &r {
        Err(
            e @ GuestError::Limit {
                limit: LimitKind::Memory,
                detail,
            },
        ) => {
            assert!(detail.contains(&(32usize << 20).to_string()), "{detail}");
            assert!(e.to_string().contains("memory"), "{e}");
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    let (r, _) = call(&rt, ctx("a", limits), json!({"op": "echo", "text": "ok"})).await;
    assert_eq!(r.unwrap()["text"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_traps_cleanly() {
    let rt = runtime();
    // Scalar frames live on the wasm stack: wasmtime's stack limit stops them.
    let (r, _) = call(
        &rt,
        ctx("a", GuestLimits::default()),
        json!({"op": "recurse", "shadow": false}),
    )
    .await;
    match &r {
        Err(
            e @ GuestError::Limit {
                limit: LimitKind::Stack,
                ..
            },
        ) => {
            assert!(e.to_string().contains("stack"), "{e}")
        }
        other => panic!("expected the stack limit, got {other:?}"),
    }
    // Frames with arrays live on Rust's shadow stack in linear memory, which ends at address
    // 0: the overflow is an out-of-bounds access, a trap all the same.
    let (r, _) = call(
        &rt,
        ctx("a", GuestLimits::default()),
        json!({"op": "recurse", "shadow": true}),
    )
    .await;
    match &r {
        Err(GuestError::Trap(m)) => assert!(m.contains("out of bounds"), "{m}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let (r, _) = call(
        &rt,
        ctx("a", GuestLimits::default()),
        json!({"op": "echo", "text": "ok"}),
    )
    .await;
    assert_eq!(r.unwrap()["text"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_string_is_refused_at_the_cap() {
    let (rt, _e) = runtime_with_model();
    for via in ["emit", "open"] {
        let (r, streamed) = call(
            &rt,
            ctx("a", GuestLimits::default()),
            json!({"op": "big-string", "mb": 100, "via": via}),
        )
        .await;
        match &r {
            Err(GuestError::Limit {
                limit: LimitKind::HostData,
                detail,
            }) => {
                assert!(detail.contains("104857600"), "{detail}")
            }
            other => panic!("{via}: expected the host-data limit, got {other:?}"),
        }
        assert!(streamed.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_flood_is_refused_at_the_cap_and_freed() {
    let (rt, e) = runtime_with_model();
    let limits = GuestLimits {
        max_sessions: 8,
        ..GuestLimits::default()
    };
    let (r, _) = call(
        &rt,
        ctx("flood", limits.clone()),
        json!({"op": "sessions", "count": 100000}),
    )
    .await;
    match &r {
        Err(
            err @ GuestError::Limit {
                limit: LimitKind::Sessions,
                ..
            },
        ) => {
            assert!(err.to_string().contains("sessions"), "{err}")
        }
        other => panic!("expected the session limit, got {other:?}"),
    }
    let s = wait_freed(&e, "flood").await;
    assert_eq!(s.tenants.get("flood").map_or(0, |t| t.sessions), 0);
    // Under the cap, the same guest succeeds.
    let (r, _) = call(
        &rt,
        ctx("flood", limits),
        json!({"op": "sessions", "count": 8}),
    )
    .await;
    assert_eq!(r.unwrap()["sessions"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_traps_mid_generation_frees_its_kv_pages() {
    let (rt, e) = runtime_with_model();
    let (r, streamed) = call(
        &rt,
        ctx("trapper", GuestLimits::default()),
        json!({"op": "trap-mid-generation", "prompt": "Once upon a time there was", "tokens": 40}),
    )
    .await;
    match &r {
        Err(GuestError::Trap(m)) => assert!(m.contains("deliberate trap"), "{m}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    // It did generate (and stream) before trapping, so it held pages.
    assert!(!streamed.is_empty());
    let s = wait_freed(&e, "trapper").await;
    assert_eq!(s.pages_free, s.pages_total, "{s:?}");
    let t = s.tenants.get("trapper").expect("tenant seen by the engine");
    assert_eq!((t.sessions, t.kv_pages), (0, 0));
    assert!(t.tokens_processed > 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_see_each_others_sessions() {
    let (rt, e) = runtime_with_model();
    let a = {
        let rt = rt.clone();
        tokio::spawn(async move {
            call(
                &rt,
                ctx("tenant-a", GuestLimits::default()),
                json!({"op": "hold", "prompt": "alpha beta gamma delta epsilon", "spins": 200000}),
            )
            .await
        })
    };
    let (rb, _) = call(
        &rt,
        ctx("tenant-b", GuestLimits::default()),
        json!({"op": "hold", "prompt": "z", "spins": 1}),
    )
    .await;
    let (ra, _) = a.await.unwrap();
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    // Each instance numbers its handles from the same start, and the same number names a
    // different session in each: its own.
    assert_eq!(ra["handle"], rb["handle"]);
    assert_ne!(ra["len"], rb["len"]);
    assert_eq!(
        ra["len"].as_u64().unwrap() as usize,
        ra["tokens"].as_array().unwrap().len()
    );
    assert_eq!(
        rb["len"].as_u64().unwrap() as usize,
        rb["tokens"].as_array().unwrap().len()
    );
    // A handle the instance was never given is refused (a trap), whatever exists elsewhere.
    let handle = ra["handle"].as_u64().unwrap();
    let (r, _) = call(
        &rt,
        ctx("tenant-b", GuestLimits::default()),
        json!({"op": "probe", "handle": handle}),
    )
    .await;
    match &r {
        Err(GuestError::Fault(m)) => assert!(m.contains("handle"), "{m}"),
        other => panic!("expected a guest fault, got {other:?}"),
    }
    let s = wait_freed(&e, "tenant-a").await;
    assert_eq!(s.pages_free, s.pages_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_limit_per_tenant() {
    let rt = runtime();
    let limits = GuestLimits {
        max_instances: 1,
        cpu_time: Duration::from_secs(2),
        ..GuestLimits::default()
    };
    let first = {
        let rt = rt.clone();
        let c = ctx("one", limits.clone());
        tokio::spawn(async move { call(&rt, c, json!({"op": "loop"})).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.live_instances("one") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rt.live_instances("one"), 1);
    let (r, _) = call(
        &rt,
        ctx("one", limits.clone()),
        json!({"op": "echo", "text": "x"}),
    )
    .await;
    assert_eq!(limit_of(&r), Some(LimitKind::Instances), "{r:?}");
    // Another tenant is not affected.
    let (r, _) = call(
        &rt,
        ctx("two", limits.clone()),
        json!({"op": "echo", "text": "x"}),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    let (r, _) = first.await.unwrap();
    assert_eq!(limit_of(&r), Some(LimitKind::CpuTime));
    let (r, _) = call(&rt, ctx("one", limits), json!({"op": "echo", "text": "x"})).await;
    assert!(r.is_ok(), "the slot is released after the call: {r:?}");
    assert_eq!(rt.live_instances("one"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_grants_no_files_environment_or_arguments() {
    let rt = runtime();
    let (r, _) = call(&rt, ctx("a", GuestLimits::default()), json!({"op": "wasi"})).await;
    let v = r.unwrap();
    assert_eq!(v["env"], json!([]));
    assert_eq!(v["args"], json!([]));
    assert!(v["root_dir"].as_str().unwrap().starts_with("Err"), "{v}");
    assert!(v["etc_passwd"].as_str().unwrap().starts_with("Err"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_errors_are_returned_not_trapped() {
    let rt = runtime();
    let (r, _) = call(
        &rt,
        ctx("a", GuestLimits::default()),
        json!({"op": "no-such-op"}),
    )
    .await;
    match r {
        Err(GuestError::Guest(m)) => assert!(m.contains("invalid request JSON"), "{m}"),
        other => panic!("{other:?}"),
    }
    // No model loaded: opening one is an error value the guest reports.
    let (r, _) = call(&rt, ctx("a", GuestLimits::default()), json!({"op": "info"})).await;
    match r {
        Err(GuestError::Guest(m)) => assert!(m.contains("model"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Resident memory of this process, from /proc (bytes).
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb << 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_host_call_arguments_fail_cleanly_or_work() {
    let (rt, e) = runtime_with_model();
    let info = rt.model_info("tiny").unwrap();
    let before = rss();
    // Not a CPU test: the unoptimised test build of the host is slow with 3M-entry masks.
    let limits = GuestLimits {
        cpu_time: Duration::from_secs(120),
        ..GuestLimits::default()
    };
    let (r, _) = call(
        &rt,
        ctx("absurd", limits),
        json!({"op": "absurd", "prompt": "Once upon a time"}),
    )
    .await;
    let v = r.expect("the call survives");
    let grew = rss().saturating_sub(before);
    let get = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} missing: {v}"))
            .to_string()
    };
    let ok = |k: &str| assert!(get(k).starts_with("ok"), "{k}: {}", get(k));
    let err = |k: &str, what: &str| {
        let m = get(k);
        assert!(m.starts_with("err") && m.contains(what), "{k}: {m}");
    };
    // Clamped: the penalty window to the context, top-k to the vocabulary; bias entries for
    // tokens that do not exist are dropped; masks are built from what the vocabulary holds.
    ok("sample_penalty_last_n_max");
    ok("sample_bias_out_of_range");
    ok("sample_mask_allow_3m");
    ok("sample_mask_bits_2m_words");
    assert_eq!(get("top_logprobs_max"), format!("ok {}", info.n_vocab));
    ok("detokenize_1m");
    ok("generate_long_stop");
    // Generation stops at the context, or (this test's pool is smaller than the context) when
    // the KV pool cannot hold the sequence: a limit value, not a crash.
    let g = get("generate_max_tokens_max");
    match g.strip_prefix("ok ").and_then(|n| n.parse::<usize>().ok()) {
        Some(n) => assert!(n > 0 && n <= info.n_ctx, "{g}"),
        None => assert!(g.starts_with("err Error::Limit") && g.contains("KV"), "{g}"),
    }
    // Refused, as error values the guest can handle.
    err("sample_bias_longer_than_vocab", "logit bias");
    err("sample_mask_out_of_range", "mask");
    err("sample_nan_temperature", "NaN");
    err("logprob_max", "out of range");
    err("truncate_max", "truncate");
    err("detokenize_out_of_range", "out of range");
    err("token_bytes_max", "out of range");
    err("feed_out_of_range", "");
    err("feed_past_context", "");
    err("generate_many_stops", "stop strings");
    err("apply_chat_template_bad_json", "");
    // Well short of what the unclamped sizes would ask for (16 GiB for the penalty window).
    assert!(grew < 1 << 30, "RSS grew by {grew} bytes");
    let s = wait_freed(&e, "absurd").await;
    assert_eq!(s.pages_free, s.pages_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizing_mibs_is_stopped_by_the_cpu_limit_while_others_proceed() {
    let (rt, _e) = runtime_with_model();
    let limits = GuestLimits {
        cpu_time: Duration::from_millis(300),
        ..GuestLimits::default()
    };
    let big = {
        let rt = rt.clone();
        let c = ctx("hog", limits.clone());
        tokio::spawn(async move {
            let guest = rt.load_guest(builtin::TESTBED_WASM).unwrap();
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let input = json!({"op": "tokenize", "text": "abcdefghij", "repeat": 1_500_000});
            rt.invoke_metered(&guest, c, input.to_string(), tx).await
        })
    };
    // Meanwhile other calls complete (the tokenization is not on the executor's threads).
    while rt.live_instances("hog") == 0 && !big.is_finished() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..5 {
        let (r, _) = call(
            &rt,
            ctx("other", GuestLimits::default()),
            json!({"op": "tokenize", "text": format!("small {i} "), "repeat": 10}),
        )
        .await;
        assert!(r.unwrap()["tokens"].as_u64().unwrap() > 0);
    }
    let (r, cpu) = big.await.unwrap();
    match &r {
        Err(GuestError::Limit {
            limit: LimitKind::CpuTime,
            detail,
        }) => assert!(detail.contains("300 ms"), "{detail}"),
        other => panic!("expected the CPU limit, got {other:?}"),
    }
    // Charged: the call's CPU time includes the tokenization it asked for.
    assert!(cpu >= Duration::from_millis(300), "{cpu:?}");
    // Under the limit, the same work completes.
    let (r, _) = call(
        &rt,
        ctx("hog", GuestLimits::default()),
        json!({"op": "tokenize", "text": "abcdefghij", "repeat": 10_000}),
    )
    .await;
    assert!(r.unwrap()["tokens"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_is_not_cpu_time() {
    let rt = runtime();
    let limits = GuestLimits {
        cpu_time: Duration::from_millis(200),
        ..GuestLimits::default()
    };
    let guest = rt.load_guest(builtin::TESTBED_WASM).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let input = json!({"op": "sleep", "ms": 600});
    let (r, cpu) = rt
        .invoke_metered(&guest, ctx("sleeper", limits), input.to_string(), tx)
        .await;
    assert_eq!(
        r.expect("sleeping is within the CPU limit"),
        r#"{"slept_ms":600}"#
    );
    assert!(cpu < Duration::from_millis(200), "{cpu:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_misuse_is_a_guest_fault() {
    let (rt, _e) = runtime_with_model();
    for (op, what) in [
        (
            json!({"op": "probe", "handle": 77}),
            "unknown handle index 77",
        ),
        (json!({"op": "use-after-drop"}), "handle"),
        (json!({"op": "model-as-session"}), "handle"),
    ] {
        let (r, _) = call(&rt, ctx("a", GuestLimits::default()), op.clone()).await;
        match &r {
            Err(GuestError::Fault(m)) => {
                assert!(m.contains(what), "{op}: {m}");
                assert!(!m.contains("backtrace"), "{op}: {m}");
            }
            other => panic!("{op}: expected a guest fault, got {other:?}"),
        }
    }
    // A panic stays a trap, its whole message kept.
    let (r, _) = call(
        &rt,
        ctx("a", GuestLimits::default()),
        json!({"op": "panic", "message": "one\ntwo\nthree"}),
    )
    .await;
    match &r {
        Err(GuestError::Trap(m)) => assert!(m.contains("one\ntwo\nthree"), "{m}"),
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_slots_are_reserved_all_or_none() {
    let rt = runtime();
    let limits = GuestLimits {
        max_instances: 3,
        ..GuestLimits::default()
    };
    match rt.reserve("r", 3, 4) {
        Err(
            e @ GuestError::Limit {
                limit: LimitKind::Instances,
                ..
            },
        ) => {
            let m = e.to_string();
            assert!(!m.contains("concurrent"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rt.live_instances("r"),
        0,
        "a refused reservation takes nothing"
    );
    let mut slots = rt.reserve("r", 3, 2).unwrap();
    assert_eq!(rt.live_instances("r"), 2);
    assert!(rt.reserve("r", 3, 2).is_err());
    // A call that takes its own slot sees the reservations; one in a reserved slot does not
    // take another.
    let guest = rt.load_guest(builtin::TESTBED_WASM).unwrap();
    let echo = json!({"op": "echo", "text": "x"}).to_string();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let (r, _) = rt
        .invoke_in_slot(
            slots.pop().unwrap(),
            &guest,
            ctx("r", limits.clone()),
            echo.clone(),
            tx.clone(),
        )
        .await;
    r.unwrap();
    assert_eq!(
        rt.live_instances("r"),
        1,
        "the slot is freed when its call ends"
    );
    let (r, _) = call(
        &rt,
        ctx("r", limits.clone()),
        json!({"op": "echo", "text": "y"}),
    )
    .await;
    r.unwrap();
    let _third = rt.reserve("r", 3, 2).unwrap();
    let (r, _) = call(&rt, ctx("r", limits), json!({"op": "echo", "text": "z"})).await;
    assert_eq!(limit_of(&r), Some(LimitKind::Instances), "{r:?}");
    drop(slots);
    // The runtime's own pool bounds reservations across tenants too.
    assert!(rt.reserve("s", 1000, 17).is_err());
}
