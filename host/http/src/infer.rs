//! Running requests through guests: resolving which guest and model serve a request, invoking
//! the guest (n times concurrently for `n > 1`), mapping guest failures to HTTP errors, and
//! recording usage and latency.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::app::Shared;
use crate::error::ApiError;
use crate::metrics::{GuestLabels, TenantModel, TokenLabels};
use crate::models::guest_limits;
use crate::store::{Tenant, UsageDelta};
use realm_runtime::{Guest, GuestError, InstanceSlot, InvokeContext, LimitKind, RuntimeError};

/// The most of a guest's trap message (its panic message, with the trap) a client is shown.
const TRAP_MESSAGE_BYTES: usize = 8 << 10;

/// Compiles (or fetches from the runtime's cache) the guest `name` as `tenant` sees it.
pub async fn resolve_guest(s: &Shared, tenant: &Tenant, name: &str) -> Result<Guest, ApiError> {
    let bytes: Vec<u8> = if let Some(b) = crate::guests::builtin_bytes(name) {
        b.to_vec()
    } else {
        let rec = s.store.guest(&tenant.id, name).map_err(|e| match e {
            crate::store::StoreError::NotFound(_) => {
                ApiError::not_found(format!("guest {name:?} not found")).param("guest")
            }
            other => other.into(),
        })?;
        let st = s.clone();
        tokio::task::spawn_blocking(move || st.blobs.get(&rec.hash))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?
    };
    let st = s.clone();
    tokio::task::spawn_blocking(move || st.models.compile(&bytes))
        .await
        .map_err(ApiError::internal)?
        .map_err(compile_error)
}

/// A guest that failed validation, as the client should hear it.
pub fn compile_error(e: RuntimeError) -> ApiError {
    match e {
        RuntimeError::NotComponent(m) => {
            ApiError::bad_request(format!("not a WebAssembly component: {m}"))
                .code("not_a_component")
        }
        RuntimeError::WrongWorld(m) => ApiError::unprocessable(format!(
            "the component does not implement the realm:llm guest world: {m}"
        ))
        .code("wrong_world"),
        RuntimeError::UngrantedImport(m) => ApiError::unprocessable(format!(
            "the component imports {m}, which the sandbox does not grant"
        ))
        .code("forbidden_import"),
        RuntimeError::Compile(m) => {
            ApiError::bad_request(format!("invalid WebAssembly: {m}")).code("invalid_wasm")
        }
        other => ApiError::internal(other),
    }
}

/// A failed guest call, as the client should hear it. The guest is the tenant's own program
/// (or a built-in one it chose), so its trap and error messages are the tenant's to see.
pub fn guest_error(e: &GuestError) -> ApiError {
    match e {
        GuestError::Trap(m) => ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "guest_error",
            format!(
                "the guest trapped: {}",
                truncate(m.trim(), TRAP_MESSAGE_BYTES)
            ),
        )
        .code("guest_trap"),
        GuestError::Fault(m) => {
            ApiError::unprocessable(format!("the guest faulted: {m}")).code("guest_fault")
        }
        GuestError::Limit { limit, detail } => match limit {
            LimitKind::WallClock => {
                ApiError::timeout(format!("the guest ran out of wall-clock time: {detail}"))
            }
            LimitKind::Instances | LimitKind::Sessions => {
                ApiError::rate_limited(format!("guest {limit} limit reached: {detail}"), 1)
            }
            _ => ApiError::unprocessable(format!("the guest exceeded its {limit} limit: {detail}"))
                .code("guest_limit"),
        },
        GuestError::Guest(m) => ApiError::bad_request(m.clone()).code("guest_error"),
        GuestError::Runtime(m) => ApiError::internal(format!("guest runtime: {m}")),
    }
}

/// `s` cut to at most `n` bytes (at a character boundary), marked when cut.
fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut i = n;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    format!("{} [... {} more bytes]", &s[..i], s.len() - i)
}

fn error_kind(e: &GuestError) -> &'static str {
    match e {
        GuestError::Trap(_) => "trap",
        GuestError::Fault(_) => "fault",
        GuestError::Limit { .. } => "limit",
        GuestError::Guest(_) => "error",
        GuestError::Runtime(_) => "runtime",
    }
}

/// One request's accounting: the tenant's usage row, token counters and latency histograms.
pub struct Call {
    pub state: Shared,
    pub tenant: Tenant,
    pub guest_name: String,
    pub model: String,
    pub started: Instant,
    pub first_token: Option<Instant>,
    /// Text chunks streamed so far (what a client that went away is charged for).
    chunks: u64,
    finished: bool,
}

impl Call {
    pub fn new(state: &Shared, tenant: &Tenant, guest: &str, model: &str) -> Call {
        Call {
            state: state.clone(),
            tenant: tenant.clone(),
            guest_name: guest.to_string(),
            model: model.to_string(),
            started: Instant::now(),
            first_token: None,
            chunks: 0,
            finished: false,
        }
    }

    pub fn saw_output(&mut self) {
        self.chunks += 1;
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            self.state
                .metrics
                .ttft
                .get_or_create(&self.labels())
                .observe((now - self.started).as_secs_f64());
        }
    }

    fn labels(&self) -> TenantModel {
        TenantModel {
            tenant: self.tenant.id.clone(),
            model: self.model.clone(),
        }
    }

    pub fn guest_failed(&self, e: &GuestError) {
        self.state
            .metrics
            .guest_errors
            .get_or_create(&GuestLabels {
                tenant: self.tenant.id.clone(),
                guest: self.guest_name.clone(),
                kind: error_kind(e),
            })
            .inc();
        if let GuestError::Runtime(m) = e {
            tracing::error!(tenant = %self.tenant.id, guest = %self.guest_name, error = %m, "guest runtime failure");
        } else {
            tracing::info!(tenant = %self.tenant.id, guest = %self.guest_name, error = %e, "guest call failed");
        }
    }

    /// Records the finished request (once).
    pub fn finish(&mut self, prompt_tokens: u64, completion_tokens: u64, traps: u64) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let m = &self.state.metrics;
        for (dir, n) in [("in", prompt_tokens), ("out", completion_tokens)] {
            m.tokens
                .get_or_create(&TokenLabels {
                    tenant: self.tenant.id.clone(),
                    model: self.model.clone(),
                    direction: dir,
                })
                .inc_by(n);
        }
        if let Some(first) = self.first_token
            && completion_tokens > 1
        {
            let per = first.elapsed().as_secs_f64() / (completion_tokens - 1) as f64;
            m.per_token.get_or_create(&self.labels()).observe(per);
        }
        let delta = UsageDelta {
            requests: 1,
            tokens_in: prompt_tokens,
            tokens_out: completion_tokens,
            guest_cpu_us: 0,
            guest_traps: traps,
        };
        if let Err(e) = self.state.store.add_usage(&self.tenant.id, delta) {
            tracing::warn!(tenant = %self.tenant.id, error = %e, "could not record usage");
        }
    }
}

/// A request that ended without `finish` (its client disconnected mid-stream, dropping the
/// stream and aborting the guest calls) is still charged: one request, and a generated token
/// per text chunk streamed (the guests stream one chunk per token; the prompt's size is not
/// known without the guest's response).
impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(0, self.chunks, 0);
        }
    }
}

/// Reserves `n` of the tenant's guest instance slots (all or none) before a request starts, so
/// that its instance limit is a 429 with `Retry-After` rather than an error inside a stream.
pub fn reserve(s: &Shared, tenant: &Tenant, n: usize) -> Result<Vec<InstanceSlot>, ApiError> {
    let cap = guest_limits(&tenant.quotas).max_instances;
    s.models
        .runtime
        .reserve(&tenant.id, cap, u32::try_from(n).unwrap_or(u32::MAX))
        .map_err(|e| guest_error(&e))
}

/// Runs `guest` once with `input` (in `slot` if one was reserved), streaming its text to
/// `output`; returns its JSON response.
pub async fn invoke(
    s: &Shared,
    tenant: &Tenant,
    guest: &Guest,
    model: Option<String>,
    input: String,
    output: mpsc::UnboundedSender<String>,
    slot: Option<InstanceSlot>,
) -> Result<String, GuestError> {
    let ctx = InvokeContext {
        tenant: tenant.id.clone(),
        limits: guest_limits(&tenant.quotas),
        default_model: model,
        allowed_models: None,
    };
    let rt = &s.models.runtime;
    let (result, cpu) = match slot {
        Some(slot) => rt.invoke_in_slot(slot, guest, ctx, input, output).await,
        None => rt.invoke_metered(guest, ctx, input, output).await,
    };
    // Recorded per call (not per request) so that `n` calls and failed calls are charged too.
    // A call aborted because its client went away is not charged (its task never gets here).
    let cpu_us = cpu.as_micros() as u64;
    s.metrics
        .guest_cpu
        .get_or_create(&crate::metrics::TenantLabel {
            tenant: tenant.id.clone(),
        })
        .inc_by(cpu.as_secs_f64());
    let delta = UsageDelta {
        guest_cpu_us: cpu_us,
        ..UsageDelta::default()
    };
    if let Err(e) = s.store.add_usage(&tenant.id, delta) {
        tracing::warn!(tenant = %tenant.id, error = %e, "could not record guest CPU time");
    }
    result
}

/// What one of `n` concurrent guest calls produced.
pub enum Event {
    Text(usize, String),
    Done(usize, Result<Value, GuestError>),
}

/// Aborts the guest calls of a request whose client went away (dropping the stream).
pub struct Calls(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for Calls {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Starts `inputs.len()` guest calls concurrently, each in one of `slots` (taken with
/// [`reserve`]); their text and results arrive on the returned channel tagged with their index.
pub fn spawn_calls(
    s: &Shared,
    tenant: &Tenant,
    guest: &Guest,
    model: &str,
    inputs: Vec<String>,
    slots: Vec<InstanceSlot>,
) -> (mpsc::UnboundedReceiver<Event>, Calls) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    let mut slots = slots.into_iter();
    for (i, input) in inputs.into_iter().enumerate() {
        let slot = slots.next();
        let (s, tenant, guest, model, tx) = (
            s.clone(),
            tenant.clone(),
            guest.clone(),
            model.to_string(),
            tx.clone(),
        );
        handles.push(tokio::spawn(async move {
            let (otx, mut orx) = mpsc::unbounded_channel::<String>();
            let fwd_tx = tx.clone();
            let forward = async move {
                while let Some(t) = orx.recv().await {
                    let _ = fwd_tx.send(Event::Text(i, t));
                }
            };
            let run = invoke(&s, &tenant, &guest, Some(model), input, otx, slot);
            let (r, ()) = tokio::join!(run, forward);
            let r = r.and_then(|out| {
                serde_json::from_str::<Value>(&out)
                    .map_err(|e| GuestError::Guest(format!("the guest returned invalid JSON: {e}")))
            });
            let _ = tx.send(Event::Done(i, r));
        }));
    }
    (rx, Calls(handles))
}

/// `usage.prompt_tokens` / `completion_tokens` of a guest's OpenAI-shaped response.
pub fn usage_of(v: &Value) -> (u64, u64) {
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap_or(0),
        u["completion_tokens"].as_u64().unwrap_or(0),
    )
}

/// The first choice of a guest's response: (text, finish_reason).
pub fn first_choice(v: &Value) -> (String, String) {
    let c = &v["choices"][0];
    let text = c["message"]["content"]
        .as_str()
        .or_else(|| c["text"].as_str())
        .unwrap_or("")
        .to_string();
    let finish = c["finish_reason"].as_str().unwrap_or("stop").to_string();
    (text, finish)
}

pub type SharedCall = Arc<tokio::sync::Mutex<Call>>;
