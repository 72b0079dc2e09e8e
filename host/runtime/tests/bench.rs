//! Benchmarks (ignored; run with `cargo test -p realm-runtime --release --test bench --
//! --ignored --nocapture`, model from `REALM_BENCH_MODEL`, default the Gemma 3 270M GGUF).
//! The same measurements as `realm guest bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use realm_engine::sample::{Sampler, SamplingParams};
use realm_engine::sched::{Engine, EngineConfig};
use realm_engine::tokenizer::Tokenizer;
use realm_engine::{LoadOptions, Model};
use realm_runtime::{GuestLimits, InvokeContext, Runtime, RuntimeConfig, builtin};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn guest_decode_and_instantiation() {
    let path = std::env::var("REALM_BENCH_MODEL").unwrap_or_else(|_| {
        format!(
            "{}/../../models/gemma-3-270m-q4_k_m.gguf",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let tokens: u32 = std::env::var("REALM_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let runs = 5;
    let model = Arc::new(
        Model::load(
            &path,
            &LoadOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .expect("model"),
    );
    let engine = Engine::start(model.clone(), EngineConfig::default()).unwrap();
    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
    rt.add_model("m", engine.clone()).unwrap();
    let tok = Tokenizer::from_gguf(&model.file).unwrap();
    let prompt_text = "The history of the printing press";
    let prompt = tok.encode(prompt_text, true, false);
    let testbed = rt.load_guest(builtin::TESTBED_WASM).unwrap();
    let ctx = || InvokeContext {
        tenant: "bench".into(),
        limits: GuestLimits {
            cpu_time: Duration::from_secs(60),
            ..GuestLimits::default()
        },
        ..InvokeContext::default()
    };
    let native = |n: u32| {
        let engine = engine.clone();
        let prompt = prompt.clone();
        async move {
            let seq = engine.open("bench-native").await.unwrap();
            let mut logits = seq.feed(prompt, true).await.unwrap().unwrap();
            let mut sampler = Sampler::new(SamplingParams::greedy());
            let t = Instant::now();
            let mut out = Vec::new();
            for _ in 0..n {
                let next = sampler.sample(&logits, None).unwrap();
                sampler.accept(next);
                logits = seq.feed(vec![next], true).await.unwrap().unwrap();
                out.push(next);
            }
            (t.elapsed().as_secs_f64(), out)
        }
    };
    let input = json!({"op": "decode", "prompt": prompt_text, "tokens": tokens}).to_string();
    let guest = || {
        let (rt, testbed, input) = (rt.clone(), testbed.clone(), input.clone());
        let c = ctx();
        async move {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let v: serde_json::Value =
                serde_json::from_str(&rt.invoke(&testbed, c, input, tx).await.unwrap()).unwrap();
            let toks: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
            (v["decode_seconds"].as_f64().unwrap(), toks)
        }
    };
    native(8).await;
    guest().await;
    let (mut tn, mut tg) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (s, a) = native(tokens).await;
        tn.push(s);
        let (s, b) = guest().await;
        tg.push(s);
        assert_eq!(a, b, "guest-driven and native greedy decoding disagree");
    }
    tn.sort_by(f64::total_cmp);
    tg.sort_by(f64::total_cmp);
    let (n_tps, g_tps) = (tokens as f64 / tn[runs / 2], tokens as f64 / tg[runs / 2]);

    let chat = rt.load_guest(builtin::CHAT_WASM).unwrap();
    for _ in 0..50 {
        rt.instantiate_only(&chat, ctx()).await.unwrap();
    }
    let mut us = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        rt.instantiate_only(&chat, ctx()).await.unwrap();
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    let pct = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    println!(
        "{}",
        json!({
            "model": path, "decode_tokens": tokens, "runs": runs,
            "native_decode_tokens_per_s": n_tps, "guest_decode_tokens_per_s": g_tps,
            "guest_over_native": g_tps / n_tps,
            "native_runs_s": tn, "guest_runs_s": tg,
            "instantiate_us_p50": pct(0.5), "instantiate_us_p99": pct(0.99),
        })
    );
}
