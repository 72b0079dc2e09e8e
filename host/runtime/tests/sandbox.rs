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
    let model = Model::load(MODEL, &LoadOptions { threads: 1 }).expect("load tiny model");
    Engine::start(
        Arc::new(model),
        EngineConfig {
            kv_tokens: 2048,
            // Off, so that freed pages show up as free rather than as cached prefixes.
            prefix_cache: false,
            ..EngineConfig::default()
        },
    )
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
    assert!(matches!(r, Err(GuestError::Trap(_))), "{r:?}");
    let s = wait_freed(&e, "tenant-a").await;
    assert_eq!(s.pages_free, s.pages_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_limit_per_tenant() {
    let rt = runtime();
    let limits = GuestLimits {
        max_instances: 1,
        cpu_time: Duration::from_millis(400),
        ..GuestLimits::default()
    };
    let first = {
        let rt = rt.clone();
        let c = ctx("one", limits.clone());
        tokio::spawn(async move { call(&rt, c, json!({"op": "loop"})).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
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
