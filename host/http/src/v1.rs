//! The OpenAI-compatible tenant API: models, chat completions, completions, and the tenant's
//! own usage.
//!
//! A completion request is validated here (so that malformed requests get OpenAI's 400s before
//! any guest runs), then handed to the tenant's guest as JSON: the OpenAI request with `model`
//! resolved, `n` split into `n` calls with seeds `seed + i`, and the Realm-only fields removed.
//! The guest answers with an OpenAI chat.completion; this module reshapes it for the endpoint
//! and streams it as server-sent events when asked.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::admin::UsageReport;
use crate::app::{ModelUsed, Shared};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::infer::{self, Call, Event};
use crate::store::Tenant;

/// Header naming the guest for one request (instead of the tenant's default).
pub const GUEST_HEADER: &str = "x-realm-guest";

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

fn model_object(m: &crate::models::LoadedModel) -> ModelObject {
    ModelObject {
        id: m.name.clone(),
        object: "model".into(),
        created: m.loaded_at,
        owned_by: "realm".into(),
    }
}

#[utoipa::path(get, path = "/v1/models", tag = "openai", security(("api_key" = [])),
    responses((status = 200, body = ModelList)))]
pub async fn list_models(State(s): State<Shared>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: s.models.list().iter().map(model_object).collect(),
    })
}

#[utoipa::path(get, path = "/v1/models/{model}", tag = "openai", security(("api_key" = [])),
    params(("model" = String, Path)),
    responses((status = 200, body = ModelObject), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_model(
    State(s): State<Shared>,
    Path(model): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    s.models
        .get(&model)
        .map(|m| Json(model_object(&m)))
        .ok_or_else(|| model_not_found(&model))
}

fn model_not_found(model: &str) -> ApiError {
    ApiError::not_found(format!("the model {model:?} does not exist"))
        .code("model_not_found")
        .param("model")
}

#[utoipa::path(get, path = "/v1/usage", tag = "tenant", security(("api_key" = [])),
    responses((status = 200, body = UsageReport, description = "the calling tenant's usage only")))]
pub async fn usage(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
) -> Result<Json<UsageReport>, ApiError> {
    Ok(Json(crate::usage_report(&s, &t.id)?))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A validated request, ready for the guest.
struct Prepared {
    model: String,
    guest: String,
    stream: bool,
    include_usage: bool,
    /// One guest input per choice.
    inputs: Vec<String>,
}

fn bad(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg).param(param)
}

fn opt_u64(body: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(key, format!("{key} must be a non-negative integer"))),
    }
}

fn opt_f64(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(key, format!("{key} must be a number"))),
    }
}

fn prepare(
    s: &Shared,
    tenant: &Tenant,
    headers: &HeaderMap,
    body: Value,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    let Value::Object(mut body) = body else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let limits = &s.config.limits;

    // Model.
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.is_empty() => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(bad("model", "model must be a string")),
    };
    let model = match model {
        Some(m) => {
            if s.models.get(&m).is_none() {
                return Err(model_not_found(&m));
            }
            m
        }
        None => s
            .models
            .default_model(s.config.default_model.as_deref())
            .ok_or_else(|| ApiError::unavailable("no model is loaded"))?,
    };
    body.insert("model".into(), Value::String(model.clone()));
    let info = s.models.runtime.model_info(&model);

    // Guest: the request's `guest` field, else the header, else the tenant's default.
    let guest = match body.remove("guest") {
        Some(Value::String(g)) => g,
        Some(Value::Null) | None => headers
            .get(GUEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| tenant.default_guest.clone()),
        Some(_) => return Err(bad("guest", "guest must be a string")),
    };

    // Input.
    match kind {
        Kind::Chat => match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => {
                for (i, msg) in m.iter().enumerate() {
                    if !msg.get("role").is_some_and(Value::is_string) {
                        return Err(bad(
                            &format!("messages[{i}].role"),
                            format!("messages[{i}] needs a string role"),
                        ));
                    }
                }
            }
            Some(Value::Array(_)) => return Err(bad("messages", "messages must not be empty")),
            None => return Err(bad("messages", "missing required parameter: messages")),
            Some(_) => return Err(bad("messages", "messages must be an array")),
        },
        Kind::Completion => {
            let prompt = match body.remove("prompt") {
                Some(Value::String(p)) => p,
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                Some(Value::Array(_)) => {
                    return Err(bad(
                        "prompt",
                        "only a single prompt per request is supported (a string)",
                    ));
                }
                None => return Err(bad("prompt", "missing required parameter: prompt")),
                Some(_) => return Err(bad("prompt", "prompt must be a string")),
            };
            for unsupported in ["suffix", "echo", "best_of", "logprobs"] {
                match body.get(unsupported) {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                    Some(_) => {
                        return Err(bad(unsupported, format!("{unsupported} is not supported")));
                    }
                }
            }
            // The guest gets the raw prompt in `prompt`; a guest that only speaks the chat shape
            // (the built-in one today) reads it as one user message.
            body.insert(
                "messages".into(),
                json!([{"role": "user", "content": prompt.clone()}]),
            );
            body.insert("prompt".into(), Value::String(prompt));
            // OpenAI's completions default is 16 tokens.
            if !body.contains_key("max_tokens") {
                body.insert("max_tokens".into(), json!(16));
            }
        }
    }
    if matches!(body.get("logprobs"), Some(Value::Bool(true))) {
        return Err(bad("logprobs", "logprobs are not supported"));
    }
    if let Some(k) = opt_u64(&body, "top_logprobs")?
        && k > 20
    {
        return Err(bad("top_logprobs", "top_logprobs must be between 0 and 20"));
    }

    // A prompt that cannot fit the model's context is refused before any guest tokenizes it:
    // every token covers at most `max_token_bytes` bytes of text, so the text's length bounds
    // its token count from below.
    if let Some(info) = &info {
        let (param, bytes) = match kind {
            Kind::Chat => ("messages", body.get("messages").map_or(0, text_bytes)),
            Kind::Completion => ("prompt", body.get("prompt").map_or(0, text_bytes)),
        };
        let at_least = bytes.div_ceil(info.max_token_bytes.max(1));
        if at_least > info.n_ctx {
            return Err(bad(
                param,
                format!(
                    "This model's maximum context length is {} tokens. However, your prompt \
                     has {bytes} bytes of text, which is at least {at_least} tokens.",
                    info.n_ctx
                ),
            )
            .code("context_length_exceeded"));
        }
    }

    // n.
    let n = opt_u64(&body, "n")?.unwrap_or(1);
    if n == 0 || n > limits.max_n as u64 {
        return Err(bad(
            "n",
            format!("n must be between 1 and {}", limits.max_n),
        ));
    }
    body.remove("n");

    // Token limits: max_completion_tokens wins over max_tokens (OpenAI's rule).
    let cap = tenant.quotas.max_tokens.unwrap_or(limits.max_tokens) as u64;
    let mt = opt_u64(&body, "max_tokens")?;
    let mct = opt_u64(&body, "max_completion_tokens")?;
    if let Some((param, v)) = mct
        .map(|v| ("max_completion_tokens", v))
        .or(mt.map(|v| ("max_tokens", v)))
    {
        if v == 0 {
            return Err(bad(param, format!("{param} must be at least 1")));
        }
        if v > cap {
            return Err(bad(
                param,
                format!("{param} is {v}; the most allowed is {cap}"),
            ));
        }
        body.insert("max_completion_tokens".into(), json!(v));
    } else {
        body.insert("max_completion_tokens".into(), json!(cap.min(512)));
    }

    // Sampling parameters.
    if let Some(t) = opt_f64(&body, "temperature")?
        && !(0.0..=2.0).contains(&t)
    {
        return Err(bad("temperature", "temperature must be between 0 and 2"));
    }
    if let Some(p) = opt_f64(&body, "top_p")?
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(bad("top_p", "top_p must be in (0, 1]"));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(p) = opt_f64(&body, key)?
            && !(-2.0..=2.0).contains(&p)
        {
            return Err(bad(key, format!("{key} must be between -2 and 2")));
        }
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| bad("seed", "seed must be an integer"))?,
        ),
    };
    match body.get("stop") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {}
        Some(_) => return Err(bad("stop", "stop must be a string or up to 4 strings")),
    }
    match body.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Ok(id) = k.parse::<u32>() else {
                    return Err(bad(
                        "logit_bias",
                        format!("logit_bias key {k:?} is not a token id"),
                    ));
                };
                if let Some(info) = &info
                    && id as usize >= info.n_vocab
                {
                    return Err(bad(
                        "logit_bias",
                        format!(
                            "logit_bias names token {id}; the model's vocabulary has {} tokens",
                            info.n_vocab
                        ),
                    ));
                }
                if !v.as_f64().is_some_and(|b| (-100.0..=100.0).contains(&b)) {
                    return Err(bad(
                        "logit_bias",
                        "logit_bias values must be numbers in [-100, 100]",
                    ));
                }
            }
        }
        Some(_) => return Err(bad("logit_bias", "logit_bias must be an object")),
    }
    match body.get("response_format") {
        None | Some(Value::Null) => {}
        Some(rf) => match rf.get("type").and_then(Value::as_str) {
            Some("text") | Some("json_object") => {}
            Some("json_schema") => {
                return Err(bad(
                    "response_format",
                    "response_format json_schema is not supported; use json_object",
                ));
            }
            _ => {
                return Err(bad(
                    "response_format",
                    "response_format.type must be \"text\" or \"json_object\"",
                ));
            }
        },
    }

    // Streaming.
    let stream = match body.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad("stream", "stream must be a boolean")),
    };
    let include_usage = match body.remove("stream_options") {
        None | Some(Value::Null) => false,
        Some(o) if stream => o
            .get("include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        Some(_) => {
            return Err(bad(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
    };
    // The guest streams text through its output channel either way; `stream` tells it to.
    body.insert("stream".into(), Value::Bool(true));

    let inputs = (0..n)
        .map(|i| {
            let mut b = body.clone();
            if let Some(seed) = seed {
                b.insert("seed".into(), json!(seed.wrapping_add(i)));
            }
            Value::Object(b).to_string()
        })
        .collect();
    Ok(Prepared {
        model,
        guest,
        stream,
        include_usage,
        inputs,
    })
}

/// Bytes of text in a prompt or a messages array (strings, and the `text` of content parts).
fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => ["content", "text"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(text_bytes)
            .sum(),
        _ => 0,
    }
}

fn new_id(prefix: &str) -> String {
    crate::auth::new_id(prefix).replace('_', "-")
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", security(("api_key" = [])),
    request_body(content = Object, description = "An OpenAI chat.completions request; also `guest` (Realm: which guest serves it)"),
    responses((status = 200, description = "chat.completion, or SSE chat.completion.chunk events when stream is true"),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 429, body = crate::error::ErrorBody)))]
pub async fn chat_completions(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    run(s, t, headers, body, Kind::Chat).await
}

#[utoipa::path(post, path = "/v1/completions", tag = "openai", security(("api_key" = [])),
    request_body(content = Object, description = "An OpenAI completions request (one string prompt)"),
    responses((status = 200, description = "text_completion, or SSE events when stream is true"),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn completions(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Response {
    run(s, t, headers, body, Kind::Completion).await
}

async fn run(s: Shared, t: Tenant, headers: HeaderMap, body: Value, kind: Kind) -> Response {
    match run_inner(&s, &t, &headers, body, kind).await {
        Ok(r) => r,
        Err((e, model)) => {
            let mut r = e.into_response();
            if let Some(m) = model {
                r.extensions_mut().insert(ModelUsed(m));
            }
            r
        }
    }
}

type Failed = (ApiError, Option<String>);

async fn run_inner(
    s: &Shared,
    t: &Tenant,
    headers: &HeaderMap,
    body: Value,
    kind: Kind,
) -> Result<Response, Failed> {
    let p = prepare(s, t, headers, body, kind).map_err(|e| (e, None))?;
    let model = p.model.clone();
    let guest = infer::resolve_guest(s, t, &p.guest)
        .await
        .map_err(|e| (e, Some(model.clone())))?;
    // The tenant's instance slots for every choice, before the first byte: over its limit is
    // a 429 with Retry-After, never an error inside a 200 stream.
    let slots = infer::reserve(s, t, p.inputs.len()).map_err(|e| (e, Some(model.clone())))?;
    let mut call = Call::new(s, t, &p.guest, &p.model);
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    let created = crate::store::now();
    let n = p.inputs.len();
    let (rx, calls) = infer::spawn_calls(s, t, &guest, &p.model, p.inputs, slots);
    let mut resp = if p.stream {
        let stream = sse_stream(
            rx,
            calls,
            call,
            kind,
            id,
            created,
            p.model.clone(),
            n,
            p.include_usage,
        );
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response()
    } else {
        collect(rx, calls, &mut call, kind, id, created, &p.model, n)
            .await
            .map(|v| Json(v).into_response())
            .map_err(|e| (e, Some(model.clone())))?
    };
    resp.extensions_mut().insert(ModelUsed(model));
    Ok(resp)
}

#[allow(clippy::too_many_arguments)]
async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    calls: infer::Calls,
    call: &mut Call,
    kind: Kind,
    id: String,
    created: i64,
    model: &str,
    n: usize,
) -> Result<Value, ApiError> {
    let mut results: Vec<Option<Value>> = vec![None; n];
    let mut done = 0;
    while done < n {
        match rx.recv().await {
            Some(Event::Text(..)) => call.saw_output(),
            Some(Event::Done(i, r)) => {
                done += 1;
                match r {
                    Ok(v) => results[i] = Some(v),
                    Err(e) => {
                        call.guest_failed(&e);
                        let traps = matches!(e, realm_runtime::GuestError::Trap(_)) as u64;
                        call.finish(0, 0, traps);
                        drop(calls);
                        return Err(infer::guest_error(&e));
                    }
                }
            }
            None => return Err(ApiError::internal("guest calls ended without a result")),
        }
    }
    drop(calls);
    let mut prompt_tokens = 0;
    let mut completion_tokens = 0;
    let mut choices = Vec::new();
    for (i, v) in results.into_iter().enumerate() {
        let v = v.unwrap_or(Value::Null);
        let (pt, ct) = infer::usage_of(&v);
        // The prompt is the same for every choice (and shared in the KV cache): count it once.
        prompt_tokens = prompt_tokens.max(pt);
        completion_tokens += ct;
        let (text, finish) = infer::first_choice(&v);
        choices.push(match kind {
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": i, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        });
    }
    call.finish(prompt_tokens, completion_tokens, 0);
    Ok(json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}

#[allow(clippy::too_many_arguments)]
fn sse_stream(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    calls: infer::Calls,
    mut call: Call,
    kind: Kind,
    id: String,
    created: i64,
    model: String,
    n: usize,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value| {
        let mut c = json!({
            "id": id, "object": object, "created": created, "model": model, "choices": [choice],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    async_stream(move |tx| async move {
        let _calls = calls;
        let send = |v: Value| {
            let _ = tx.send(SseEvent::default().data(v.to_string()));
        };
        if kind == Kind::Chat {
            for i in 0..n {
                send(chunk(json!({
                    "index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null,
                })));
            }
        }
        let mut done = 0;
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        while done < n {
            let Some(ev) = rx.recv().await else { break };
            match ev {
                Event::Text(i, text) => {
                    call.saw_output();
                    send(chunk(match kind {
                        Kind::Chat => json!({"index": i, "delta": {"content": text},
                            "logprobs": null, "finish_reason": null}),
                        Kind::Completion => json!({"index": i, "text": text,
                            "logprobs": null, "finish_reason": null}),
                    }));
                }
                Event::Done(i, Ok(v)) => {
                    done += 1;
                    let (pt, ct) = infer::usage_of(&v);
                    prompt_tokens = prompt_tokens.max(pt);
                    completion_tokens += ct;
                    let (_, finish) = infer::first_choice(&v);
                    send(chunk(match kind {
                        Kind::Chat => json!({"index": i, "delta": {},
                            "logprobs": null, "finish_reason": finish}),
                        Kind::Completion => json!({"index": i, "text": "",
                            "logprobs": null, "finish_reason": finish}),
                    }));
                }
                Event::Done(_, Err(e)) => {
                    call.guest_failed(&e);
                    let traps = matches!(e, realm_runtime::GuestError::Trap(_)) as u64;
                    call.finish(prompt_tokens, completion_tokens, traps);
                    let err = infer::guest_error(&e);
                    send(serde_json::to_value(err.body()).unwrap_or(Value::Null));
                    send_done(&tx);
                    return;
                }
            }
        }
        call.finish(prompt_tokens, completion_tokens, 0);
        if include_usage {
            let mut c = chunk(Value::Null);
            c["choices"] = json!([]);
            c["usage"] = json!({
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            });
            send(c);
        }
        send_done(&tx);
    })
}

fn send_done(tx: &tokio::sync::mpsc::UnboundedSender<SseEvent>) {
    let _ = tx.send(SseEvent::default().data("[DONE]"));
}

/// A stream fed by a task: `f` gets a sender; the stream ends when the task drops it. Dropping
/// the stream (client gone) aborts the task, and with it the guest calls it owns.
pub fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = AbortOnDrop(tokio::spawn(f(tx)));
    futures_util::stream::unfold((rx, task), |(mut rx, task)| async move {
        rx.recv().await.map(|e| (Ok(e), (rx, task)))
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
