//! The built-in guests and the host functions behind them, on real tiny models.

use std::sync::Arc;

use realm_engine::sched::{Engine, EngineConfig};
use realm_engine::{LoadOptions, Model};
use realm_runtime::{GuestError, GuestLimits, InvokeContext, Runtime, RuntimeConfig, builtin};
use serde_json::{Value, json};

const MODELS: [&str; 2] = ["tiny-llama-mixed.gguf", "tiny-qwen2-gpt2vocab.gguf"];

fn model_path(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/models/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn setup(model: &str) -> (Runtime, Engine) {
    let m = Model::load(
        model_path(model),
        &LoadOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .expect("load model");
    let e = Engine::start(
        Arc::new(m),
        EngineConfig {
            kv_tokens: 4096,
            ..EngineConfig::default()
        },
    )
    .expect("start the engine");
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 8,
        ..RuntimeConfig::default()
    })
    .unwrap();
    rt.add_model("tiny", e.clone()).unwrap();
    (rt, e)
}

async fn invoke(rt: &Runtime, wasm: &[u8], input: Value) -> (Result<Value, GuestError>, String) {
    let guest = rt.load_guest(wasm).expect("guest loads");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = InvokeContext {
        tenant: "t".into(),
        limits: GuestLimits::default(),
        ..InvokeContext::default()
    };
    let r = rt.invoke(&guest, ctx, input.to_string(), tx).await;
    let mut streamed = String::new();
    while let Ok(s) = rx.try_recv() {
        streamed.push_str(&s);
    }
    (
        r.map(|s| serde_json::from_str(&s).expect("JSON response")),
        streamed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_described_to_callers_and_guests() {
    let (rt, e) = setup(MODELS[0]);
    let infos = rt.models();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].n_vocab, e.model().hparams.n_vocab);
    let (r, _) = invoke(&rt, builtin::TESTBED_WASM, json!({"op": "info"})).await;
    let v = r.unwrap();
    assert_eq!(v["name"], "tiny");
    assert_eq!(v["architecture"], infos[0].architecture);
    assert_eq!(v["vocab_size"], infos[0].n_vocab);
    assert_eq!(v["models"], json!(["tiny"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_guest_answers_in_the_openai_shape() {
    for model in MODELS {
        let (rt, _e) = setup(model);
        let req = json!({
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Say something."}],
            "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "seed": 7
        });
        let (r, streamed) = invoke(&rt, builtin::CHAT_WASM, req.clone()).await;
        let v = r.unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(v["object"], "chat.completion");
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        let content = choice["message"]["content"].as_str().unwrap();
        // Whatever was streamed is exactly the content.
        assert_eq!(streamed, content, "{model}");
        let usage = &v["usage"];
        let (p, c) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        assert!(p > 0);
        assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
        match choice["finish_reason"].as_str().unwrap() {
            "length" => assert_eq!(c, 12),
            "stop" => assert!(c <= 12),
            other => panic!("finish_reason {other}"),
        }
        // A seed reproduces the completion.
        let (r2, _) = invoke(&rt, builtin::CHAT_WASM, req).await;
        assert_eq!(
            r2.unwrap()["choices"][0]["message"]["content"],
            content,
            "{model}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_guest_honours_stop_and_max_tokens() {
    let (rt, _e) = setup(MODELS[0]);
    let base = json!({"messages": [{"role": "user", "content": "Count."}], "temperature": 0, "max_tokens": 16});
    let (r, _) = invoke(&rt, builtin::CHAT_WASM, base.clone()).await;
    let full = r.unwrap()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    if chars.len() >= 4 {
        // Stop at a piece of the greedy text: the answer is the text before it.
        let stop: String = chars[2..4].iter().collect();
        let mut req = base.clone();
        req["stop"] = json!([stop]);
        let (r, streamed) = invoke(&rt, builtin::CHAT_WASM, req).await;
        let v = r.unwrap();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content, &full[..full.find(&stop).unwrap()]);
        assert_eq!(streamed, content);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let mut req = base;
    req["max_tokens"] = json!(3);
    let (r, _) = invoke(&rt, builtin::CHAT_WASM, req).await;
    let v = r.unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_guest_output_always_parses() {
    for model in MODELS {
        let (rt, _e) = setup(model);
        for seed in 0..3 {
            let req = json!({"prompt": "A JSON object describing a cat:", "max_tokens": 48,
                             "temperature": 1.0, "seed": seed});
            let (r, streamed) = invoke(&rt, builtin::JSON_WASM, req).await;
            let v = r.unwrap_or_else(|e| panic!("{model}: {e}"));
            let text = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert_eq!(streamed, text);
            assert!(text.trim_start().starts_with('{'), "{model}: {text:?}");
            if v["choices"][0]["finish_reason"] == "stop" {
                let parsed: Value =
                    serde_json::from_str(text).unwrap_or_else(|e| panic!("{model}: {e}: {text:?}"));
                assert!(parsed.is_object());
                assert_eq!(parsed, v["json"]);
            } else {
                assert_eq!(v["usage"]["completion_tokens"], 48);
            }
        }
        // Through the chat guest's response_format.
        let req = json!({"messages": [{"role": "user", "content": "JSON please"}],
                         "response_format": {"type": "json_object"}, "max_tokens": 32, "seed": 1});
        let (r, _) = invoke(&rt, builtin::CHAT_WASM, req).await;
        let v = r.unwrap();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.trim_start().starts_with('{'), "{text:?}");
        if v["choices"][0]["finish_reason"] == "stop" {
            serde_json::from_str::<Value>(text).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_n_forks_and_picks_the_most_likely() {
    let (rt, e) = setup(MODELS[0]);
    let req = json!({"messages": [{"role": "user", "content": "Hello"}], "n": 3,
                     "max_tokens": 8, "temperature": 1.0, "seed": 3});
    let (r, streamed) = invoke(&rt, builtin::BEST_OF_N_WASM, req).await;
    let v = r.unwrap();
    let cands = v["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 3);
    let best = v["best"].as_u64().unwrap() as usize;
    let score = |c: &Value| c["mean_logprob"].as_f64().unwrap();
    for c in cands {
        assert!(score(c) <= score(&cands[best]));
        assert!(score(c) <= 0.0);
    }
    assert_eq!(v["choices"][0]["message"]["content"], cands[best]["text"]);
    assert_eq!(streamed, cands[best]["text"].as_str().unwrap());
    // Candidates differ in seed, so (on a random model) they do not all agree.
    let texts: std::collections::HashSet<&str> =
        cands.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert!(texts.len() > 1, "{cands:?}");
    let _ = e;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_truncate_logprobs_and_logits() {
    let (rt, e) = setup(MODELS[1]);
    let (r, _) = invoke(
        &rt,
        builtin::TESTBED_WASM,
        json!({"op": "fork-rewind", "prompt": "The quick brown fox", "tokens": 6}),
    )
    .await;
    let v = r.unwrap();
    // A fork continues exactly like its parent (greedy), and a rewound session regenerates
    // the same tokens.
    assert_eq!(v["a"], v["b"]);
    let a = v["a"].as_array().unwrap();
    assert_eq!(v["again"].as_array().unwrap()[..], a[1..]);
    assert_eq!(v["len_a"], v["len_b"]);
    assert_eq!(
        v["logits_len"].as_u64().unwrap() as usize,
        e.model().hparams.n_vocab
    );
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(top[0][0], v["argmax"]);
    assert!(top[0][1].as_f64().unwrap() >= top[1][1].as_f64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_driven_decoding_matches_the_host_loop() {
    for model in MODELS {
        let (rt, _e) = setup(model);
        let prompt = "It was a bright cold day in April";
        let (d, _) = invoke(
            &rt,
            builtin::TESTBED_WASM,
            json!({"op": "decode", "prompt": prompt, "tokens": 10}),
        )
        .await;
        let (g, _) = invoke(
            &rt,
            builtin::TESTBED_WASM,
            json!({"op": "generate", "prompt": prompt, "tokens": 10}),
        )
        .await;
        assert_eq!(d.unwrap()["tokens"], g.unwrap()["tokens"], "{model}");
    }
}
