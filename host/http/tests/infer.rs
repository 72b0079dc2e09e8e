//! The inference endpoints in-process, on a real tiny model through the real guest runtime and
//! the built-in chat guest: `/v1/models`, chat completions (plain and SSE), guest upload and
//! tenant isolation of guests.

mod common;

use axum::body::Body;
use axum::http::{Request, header};
use common::Harness;
use serde_json::{Value, json};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/models/tiny-llama-mixed.gguf"
);

/// A harness with the tiny model loaded as `tiny` and one tenant; returns (harness, key).
async fn with_model() -> (Harness, String) {
    let h = Harness::with(|c| c.threads = 1);
    realm_http::load_model(&h.state, "tiny", std::path::Path::new(MODEL))
        .await
        .expect("load tiny model");
    let (_, key) = h.tenant("acme", None).await;
    (h, key)
}

fn chat_body(extra: Value) -> Value {
    let mut b = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 4,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed() {
    let (h, key) = with_model().await;
    let r = h.call("GET", "/v1/models", Some(&key), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "{v}");
    assert_eq!(data[0]["id"], "tiny");
    assert_eq!(data[0]["object"], "model");
    let r = h.call("GET", "/v1/models/tiny", Some(&key), None).await;
    assert_eq!(r.json()["id"], "tiny");
    let e = h
        .call("GET", "/v1/models/nope", Some(&key), None)
        .await
        .error(404);
    assert_eq!(e["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_is_openai_shaped() {
    let (h, key) = with_model().await;
    let r = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({}))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl"), "{v}");
    assert_eq!(v["model"], "tiny");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert!(choices[0]["message"]["content"].is_string());
    // A random tiny model does not stop by itself within 4 tokens (temperature 0: the same
    // tokens every run).
    assert_eq!(choices[0]["finish_reason"], "length", "{v}");
    let u = &v["usage"];
    assert_eq!(u["completion_tokens"], 4, "{v}");
    let pt = u["prompt_tokens"].as_u64().unwrap();
    assert!(pt > 0, "{v}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), pt + 4);

    // Greedy decoding is deterministic across requests.
    let again = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({}))),
        )
        .await
        .json();
    assert_eq!(
        again["choices"][0]["message"]["content"],
        choices[0]["message"]["content"]
    );

    // The tenant's usage counts both requests.
    let usage = h.call("GET", "/v1/usage", Some(&key), None).await.json();
    assert_eq!(usage["requests"], 2, "{usage}");
    assert_eq!(usage["tokens_out"], 8, "{usage}");

    // The scrape shows this tenant's tokens and latencies, and the model's engine gauges.
    let m = h
        .call("GET", "/metrics", Some(common::ADMIN), None)
        .await
        .text();
    let t = usage["tenant"].as_str().unwrap();
    for series in [
        format!("realm_tokens_total{{tenant=\"{t}\",model=\"tiny\",direction=\"out\"}} 8"),
        format!("realm_time_to_first_token_seconds_count{{tenant=\"{t}\",model=\"tiny\"}} 2"),
        format!("realm_time_per_output_token_seconds_count{{tenant=\"{t}\",model=\"tiny\"}} 2"),
        "realm_engine_queue_depth{model=\"tiny\"}".to_string(),
        "realm_kv_pages_total{model=\"tiny\"}".to_string(),
    ] {
        assert!(m.contains(&series), "{series} missing from:\n{m}");
    }

    // Validation happens before any guest runs.
    let e = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"model": "nope"}))),
        )
        .await
        .error(404);
    assert_eq!(e["param"], "model");
    let e = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"messages": []}))),
        )
        .await
        .error(400);
    assert_eq!(e["param"], "messages");
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim_start().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_streams_sse() {
    let (h, key) = with_model().await;
    let r = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            )),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_data(&r.text());
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["model"], "tiny");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    // The text is the concatenation of the content deltas; one chunk ends the choice.
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")], "{chunks:?}");
    // The last chunk carries usage and no choices; the others carry `usage: null`.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 4, "{last}");
    assert!(last["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null(), "{c}");
    }

    // Streaming and not streaming produce the same greedy text.
    let plain = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({}))),
        )
        .await
        .json();
    assert_eq!(plain["choices"][0]["message"]["content"], text.as_str());

    // Without include_usage no chunk has a usage field.
    let r = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"stream": true}))),
        )
        .await;
    let events = sse_data(&r.text());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c.get("usage").is_none(), "{c}");
    }
}

async fn upload(h: &Harness, key: &str, name: &str, bytes: Vec<u8>) -> common::Reply {
    h.send(
        Request::post(format!("/v1/guests?name={name}"))
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/wasm")
            .body(Body::from(bytes))
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_upload_validates_and_isolates_tenants() {
    let h = Harness::new();
    let (_, alice) = h.tenant("alice", None).await;
    let (_, bob) = h.tenant("bob", None).await;

    // Garbage bytes are refused with a message that says what is wrong.
    let e = upload(&h, &alice, "junk", b"definitely not wasm".to_vec())
        .await
        .error(400);
    assert_eq!(e["code"], "not_a_component", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("WebAssembly magic number"),
        "{e}"
    );
    // A core module (not a component) is told to build for wasm32-wasip2.
    let e = upload(&h, &alice, "core", b"\0asm\x01\0\0\0".to_vec())
        .await
        .error(400);
    assert!(
        e["message"].as_str().unwrap().contains("wasm32-wasip2"),
        "{e}"
    );
    // A component importing something the sandbox does not grant.
    let e = upload(
        &h,
        &alice,
        "bad",
        realm_runtime::builtin::BAD_IMPORT_WASM.to_vec(),
    )
    .await
    .error(422);
    assert_eq!(e["code"], "forbidden_import", "{e}");

    // A real component is accepted.
    let r = upload(
        &h,
        &alice,
        "mine",
        realm_runtime::builtin::TESTBED_WASM.to_vec(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["name"], "mine");
    assert_eq!(
        h.call("GET", "/v1/guests/mine", Some(&alice), None)
            .await
            .status,
        200
    );

    // Bob cannot see, invoke or delete Alice's guest: the same 404 as a missing one.
    h.call("GET", "/v1/guests/mine", Some(&bob), None)
        .await
        .error(404);
    h.call(
        "POST",
        "/v1/guests/mine/invoke",
        Some(&bob),
        Some(json!({})),
    )
    .await
    .error(404);
    h.call("DELETE", "/v1/guests/mine", Some(&bob), None)
        .await
        .error(404);
    let list = h.call("GET", "/v1/guests", Some(&bob), None).await.json();
    assert!(
        !list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "mine"),
        "{list}"
    );
    // Alice still has it.
    assert_eq!(
        h.call("GET", "/v1/guests/mine", Some(&alice), None)
            .await
            .status,
        200
    );
}

fn tokenizer() -> realm_engine::tokenizer::Tokenizer {
    let f = realm_engine::gguf::GgufFile::open(MODEL).unwrap();
    realm_engine::tokenizer::Tokenizer::from_gguf(&f).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_continue_raw_text() {
    let (h, key) = with_model().await;
    let body = json!({"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 0});
    let r = h
        .call("POST", "/v1/completions", Some(&key), Some(body.clone()))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion", "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    // No chat template: the prompt is exactly the tokenizer's encoding of the text (with BOS).
    let expected = tokenizer().encode("Hello there", true, true).len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"], expected, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");

    // Streamed: text_completion chunks whose texts concatenate to the same completion.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = h
        .call("POST", "/v1/completions", Some(&key), Some(sbody))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_data(&r.text());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion", "{c}");
        streamed += c["choices"][0]["text"].as_str().unwrap_or("");
    }
    assert_eq!(streamed, text);

    // Errors name the parameter.
    for (bad, param) in [
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": 7}), "prompt"),
        (json!({"prompt": "x", "echo": true}), "echo"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({}), "prompt"),
    ] {
        let e = h
            .call("POST", "/v1/completions", Some(&key), Some(bad))
            .await
            .error(400);
        assert_eq!(e["param"], param, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_parameters_take_effect() {
    let (h, key) = with_model().await;
    let chat = |extra: Value| {
        let h = &h;
        let key = key.clone();
        async move {
            let r = h
                .call(
                    "POST",
                    "/v1/chat/completions",
                    Some(&key),
                    Some(chat_body(extra)),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()
        }
    };

    // n: independent choices with their own indices and seeds (seed + i).
    let a = chat(json!({"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 6})).await;
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i, "{v}");
                c["message"]["content"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let choices = texts(&a);
    assert_eq!(choices.len(), 3);
    // Six tokens drawn at temperature 1 from a random model: equal texts would mean equal seeds.
    assert!(
        choices[0] != choices[1] && choices[1] != choices[2],
        "{choices:?}"
    );
    // A seed reproduces a sequence that runs alone. (Sequences batched together can differ in
    // the last bits of their logits, see docs/architecture.md, so a sampled token near a tie
    // may change under concurrent load; OpenAI's seed is best-effort too.)
    let one = json!({"temperature": 1.0, "seed": 7, "max_tokens": 6});
    let x = chat(one.clone()).await;
    let y = chat(one).await;
    assert_eq!(
        x["choices"][0]["message"]["content"],
        y["choices"][0]["message"]["content"]
    );
    assert_eq!(a["usage"]["completion_tokens"], 18, "{a}");
    let e = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"n": 1000}))),
        )
        .await
        .error(400);
    assert_eq!(e["param"], "n");

    // logit_bias +100 on one token makes greedy decoding pick it every time.
    let tok = tokenizer();
    let id = tok.encode("hello", false, false)[0];
    // Streamed pieces keep their leading space (as llama.cpp's server streams them).
    let piece = String::from_utf8(tok.piece(id)).unwrap();
    let v = chat(json!({"logit_bias": {id.to_string(): 100}, "max_tokens": 3})).await;
    assert_eq!(
        v["choices"][0]["message"]["content"],
        piece.repeat(3).as_str(),
        "{v}"
    );

    // stop: the text ends before the stop string and the choice finishes with "stop".
    let v = chat(
        json!({"logit_bias": {id.to_string(): 100}, "max_tokens": 3, "stop": [piece.clone()]}),
    )
    .await;
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    // Bad values are refused before any guest runs.
    for (bad, param) in [
        (json!({"temperature": 3}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"logit_bias": {"1": 500}}), "logit_bias"),
        (json!({"stop": [1]}), "stop"),
        (json!({"seed": "x"}), "seed"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"max_tokens": 1000000}), "max_tokens"),
    ] {
        let e = h
            .call(
                "POST",
                "/v1/chat/completions",
                Some(&key),
                Some(chat_body(bad)),
            )
            .await
            .error(400);
        assert_eq!(e["param"], param, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_are_invoked_listed_and_deleted() {
    let (h, key) = with_model().await;
    let r = upload(
        &h,
        &key,
        "tb",
        realm_runtime::builtin::TESTBED_WASM.to_vec(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // Uploading the same name again is a conflict.
    upload(
        &h,
        &key,
        "tb",
        realm_runtime::builtin::TESTBED_WASM.to_vec(),
    )
    .await
    .error(409);
    let list = h.call("GET", "/v1/guests", Some(&key), None).await.json();
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "tb"),
        "{list}"
    );

    // JSON in, JSON out.
    let r = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "echo", "text": "hi"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"text": "hi"}));

    // SSE: the streamed text, then the result, then [DONE].
    let r = h
        .call(
            "POST",
            "/v1/guests/tb/invoke?stream=true",
            Some(&key),
            Some(json!({"op": "echo", "text": "hi"})),
        )
        .await;
    let events = sse_data(&r.text());
    assert_eq!(
        events,
        [
            json!({"delta": "hi"}).to_string(),
            json!({"result": {"text": "hi"}}).to_string(),
            "[DONE]".to_string()
        ]
    );

    // The guest drives the model through its sessions.
    let r = h
        .call(
            "POST",
            "/v1/guests/tb/invoke?model=tiny",
            Some(&key),
            Some(json!({"op": "generate", "prompt": "Hello", "tokens": 3})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A trap is a 500 with the guest's message; the host keeps serving.
    let e = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "trap-mid-generation", "prompt": "Hello", "tokens": 2})),
        )
        .await
        .error(500);
    assert_eq!(e["code"], "guest_trap", "{e}");
    // A guest error (its handler returned Err) is a 400.
    let e = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "no-such-op"})),
        )
        .await
        .error(400);
    assert_eq!(e["code"], "guest_error", "{e}");

    // A request can pick the guest: the testbed does not speak the chat shape.
    h.call(
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(chat_body(json!({"guest": "tb"}))),
    )
    .await
    .error(400);
    h.call(
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(chat_body(json!({"guest": "nope"}))),
    )
    .await
    .error(404);

    // Usage: requests, the trap, and guest CPU time are charged to the tenant.
    let u = h.call("GET", "/v1/usage", Some(&key), None).await.json();
    assert!(u["guest_traps"].as_u64().unwrap() >= 1, "{u}");
    assert!(u["guest_cpu_us"].as_u64().unwrap() > 0, "{u}");
    let metrics = h
        .call("GET", "/metrics", Some(common::ADMIN), None)
        .await
        .text();
    assert!(
        metrics.contains("realm_guest_cpu_seconds_total{"),
        "{metrics}"
    );
    assert!(metrics.contains("kind=\"trap\""), "{metrics}");

    // Deleted guests are gone.
    let r = h.call("DELETE", "/v1/guests/tb", Some(&key), None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    h.call("GET", "/v1/guests/tb", Some(&key), None)
        .await
        .error(404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_limits_come_from_tenant_quotas() {
    let h = Harness::with(|c| c.threads = 1);
    realm_http::load_model(&h.state, "tiny", std::path::Path::new(MODEL))
        .await
        .unwrap();
    let (_, key) = h
        .tenant(
            "tight",
            Some(json!({"guest_cpu_ms": 100, "guest_memory_bytes": 8 << 20})),
        )
        .await;
    let r = upload(
        &h,
        &key,
        "tb",
        realm_runtime::builtin::TESTBED_WASM.to_vec(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let e = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "loop"})),
        )
        .await
        .error(422);
    assert!(
        e["message"].as_str().unwrap().contains("CPU time limit"),
        "{e}"
    );
    let e = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "alloc", "mb": 1})),
        )
        .await
        .error(422);
    assert!(e["message"].as_str().unwrap().contains("memory"), "{e}");
    // The host still serves this tenant afterwards.
    let r = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "echo", "text": "ok"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_loads_and_unloads_models() {
    let (h, key) = with_model().await;
    let r = h
        .admin(
            "POST",
            "/admin/models",
            Some(json!({"path": MODEL, "name": "second"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["name"], "second", "{}", r.text());
    assert!(
        r.json()["kv_pages_total"].as_u64().unwrap() > 0,
        "{}",
        r.text()
    );
    // The name is taken now.
    h.admin(
        "POST",
        "/admin/models",
        Some(json!({"path": MODEL, "name": "second"})),
    )
    .await
    .error(409);
    let e = h
        .admin(
            "POST",
            "/admin/models",
            Some(json!({"path": "/no/such/model.gguf"})),
        )
        .await
        .error(404);
    assert_eq!(e["param"], "path");
    let list = h.admin("GET", "/admin/models", None).await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let v1 = h.call("GET", "/v1/models", Some(&key), None).await.json();
    assert_eq!(v1["data"].as_array().unwrap().len(), 2, "{v1}");

    // Served at once by its own engine.
    let r = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"model": "second"}))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "second");

    let r = h.admin("DELETE", "/admin/models/second", None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    h.admin("DELETE", "/admin/models/second", None)
        .await
        .error(404);
    h.call(
        "POST",
        "/v1/chat/completions",
        Some(&key),
        Some(chat_body(json!({"model": "second"}))),
    )
    .await
    .error(404);
    // Tenants cannot reach the admin API.
    h.call("GET", "/admin/models", Some(&key), None)
        .await
        .error(401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_is_still_charged() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let (h, key) = with_model().await;
    let body = chat_body(json!({"stream": true, "max_tokens": 200, "logit_bias": {"2": -100}}));
    let req = Request::post("/v1/chat/completions")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = realm_http::router(h.state.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Read until some content arrived, then hang up.
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        if let Some(d) = frame.data_ref() {
            seen += &String::from_utf8_lossy(d);
        }
    }
    drop(body);
    // The request and the tokens streamed so far are on the tenant's bill.
    let t = std::time::Instant::now();
    loop {
        let u = h.call("GET", "/v1/usage", Some(&key), None).await.json();
        if u["requests"] == 1 {
            let out = u["tokens_out"].as_u64().unwrap();
            assert!((1..200).contains(&out), "{u}");
            break;
        }
        assert!(
            t.elapsed().as_secs() < 20,
            "disconnected request never charged: {u}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// More concurrent streaming requests than the tenant's instance limit: the extra ones are
/// answered 429 with Retry-After before any stream starts; none is a 200 with an error inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_limit_is_a_429_before_the_stream() {
    let (h, key) = with_model().await;
    let r = upload(
        &h,
        &key,
        "tb",
        realm_runtime::builtin::TESTBED_WASM.to_vec(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let cap = realm_runtime::GuestLimits::default().max_instances as usize;
    // Each request holds its instance (sleeping, which is not CPU time) while the rest arrive.
    let body = chat_body(json!({"guest": "tb", "op": "sleep", "ms": 2000, "stream": true}));
    let replies = futures_util::future::join_all((0..cap + 6).map(|_| {
        h.call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(body.clone()),
        )
    }))
    .await;
    let mut ok = 0;
    let mut limited = 0;
    for r in &replies {
        match r.status.as_u16() {
            200 => {
                ok += 1;
                let text = r.text();
                assert!(
                    !text.contains("\"error\""),
                    "a 200 stream with an error: {text}"
                );
                assert!(text.contains("[DONE]"), "{text}");
            }
            429 => {
                limited += 1;
                let e = r.error(429);
                assert_eq!(e["code"], "rate_limit_exceeded", "{e}");
                let m = e["message"].as_str().unwrap();
                assert_eq!(m.matches("instances").count(), 2, "{m}");
                assert!(!m.contains("concurrent"), "{m}");
                assert!(
                    r.headers.contains_key(header::RETRY_AFTER),
                    "{:?}",
                    r.headers
                );
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert!(ok >= 1 && ok <= cap, "{ok} streams ran; the limit is {cap}");
    assert!(limited >= 6, "{limited} requests were refused");
    // `n` choices take `n` slots at once: more than the limit is refused whole.
    let e = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(
                json!({"guest": "tb", "op": "echo", "text": "x", "n": cap + 1}),
            )),
        )
        .await;
    if e.status == 400 {
        // The server's `max_n` is below the instance limit: that check came first.
        assert_eq!(e.error(400)["param"], "n");
    } else {
        e.error(429);
    }
}

/// A prompt that cannot fit the context is refused before any tokenization; logit-bias ids
/// outside the vocabulary and absurd `top_logprobs` are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_prompts_and_out_of_range_fields_are_refused() {
    let (h, key) = with_model().await;
    let info = h.state.models.runtime.model_info("tiny").unwrap();
    let len = info.n_ctx * info.max_token_bytes.min(1 << 16) + 1;
    if info.max_token_bytes < 1 << 16 {
        let big = "a".repeat(len);
        let e = h
            .call(
                "POST",
                "/v1/chat/completions",
                Some(&key),
                Some(chat_body(
                    json!({"messages": [{"role": "user", "content": big}]}),
                )),
            )
            .await
            .error(400);
        assert_eq!(e["code"], "context_length_exceeded", "{e}");
        assert_eq!(e["param"], "messages");
        let e = h
            .call(
                "POST",
                "/v1/completions",
                Some(&key),
                Some(json!({"model": "tiny", "prompt": [big]})),
            )
            .await
            .error(400);
        assert_eq!(e["code"], "context_length_exceeded", "{e}");
        assert_eq!(e["param"], "prompt");
    }
    let e = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"logit_bias": {u32::MAX.to_string(): 1}}))),
        )
        .await
        .error(400);
    assert_eq!(e["param"], "logit_bias", "{e}");
    let e = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({"top_logprobs": u32::MAX}))),
        )
        .await
        .error(400);
    assert_eq!(e["param"], "top_logprobs", "{e}");
    // The server is fine: a normal request still works.
    let r = h
        .call(
            "POST",
            "/v1/chat/completions",
            Some(&key),
            Some(chat_body(json!({}))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Handle misuse is the guest's fault (a 422 naming the handle), and a panicking guest's whole
/// message reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_faults_and_panics_are_reported_whole() {
    let (h, key) = with_model().await;
    let r = upload(
        &h,
        &key,
        "tb",
        realm_runtime::builtin::TESTBED_WASM.to_vec(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    for op in [
        json!({"op": "probe", "handle": 77}),
        json!({"op": "use-after-drop"}),
        json!({"op": "model-as-session"}),
    ] {
        let e = h
            .call(
                "POST",
                "/v1/guests/tb/invoke?model=tiny",
                Some(&key),
                Some(op.clone()),
            )
            .await
            .error(422);
        assert_eq!(e["code"], "guest_fault", "{op}: {e}");
        let m = e["message"].as_str().unwrap();
        assert!(m.contains("handle"), "{op}: {m}");
        assert!(!m.contains("backtrace"), "{op}: {m}");
    }
    let e = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "panic", "message": "first line\nsecond line\nthird line"})),
        )
        .await
        .error(500);
    assert_eq!(e["code"], "guest_trap", "{e}");
    let m = e["message"].as_str().unwrap();
    for line in ["first line", "second line", "third line"] {
        assert!(m.contains(line), "{m}");
    }
    // A huge panic message is cut, not passed on whole.
    let e = h
        .call(
            "POST",
            "/v1/guests/tb/invoke",
            Some(&key),
            Some(json!({"op": "panic", "message": "y".repeat(1 << 20)})),
        )
        .await
        .error(500);
    assert!(
        e["message"].as_str().unwrap().len() < 16 << 10,
        "{}",
        e["message"].as_str().unwrap().len()
    );
}
