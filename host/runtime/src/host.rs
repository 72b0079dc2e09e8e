//! The store data of one guest call and the host side of the `realm:llm` interfaces.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use realm_engine::sample::{Sampler, SamplingParams, StopMatcher, TokenMask};
use realm_engine::sched::{SchedError, Sequence};
use realm_engine::template::ChatMessage;
use realm_engine::tokenizer::{EncodeBudget, StreamDecoder};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Resource, ResourceTable, ResourceTableError};
use wasmtime::{Store, StoreContextMut, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::limits::{CpuMeter, LimitHit, LimitKind, LimitTrap, Limiter};
use crate::{Guest, GuestError, Inner, InstanceSlot, InvokeContext, ModelEntry};

pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "guest",
        imports: { default: async | trappable },
        exports: { default: async },
        trappable_error_type: { "realm:llm/types.error" => super::HostError },
        with: {
            "realm:llm/llm.model": super::ModelRes,
            "realm:llm/llm.session": super::SessionRes,
        },
    });
}

use bindings::realm::llm::types::{
    self as wit, FinishReason, GenerateParams, Generation, ModelInfo as WitModelInfo,
    SpecialTokens, TokenLogprob,
};

/// Stderr kept per call, for the message of a trap (a Rust panic prints there).
const STDERR_CAPTURE: usize = 64 << 10;

/// The most of a guest's stderr (its panic message) that a trap's message carries.
const STDERR_IN_MESSAGE: usize = 4096;

/// Host calls whose input is at most this many bytes (text, JSON) or tokens run inline on the
/// executor: they take microseconds, and the hot per-token path stays free of thread hops.
/// Larger ones run on the host-work threads, charged to the guest's CPU time.
const INLINE_TEXT_BYTES: usize = 16 << 10;
const INLINE_TOKENS: usize = 4096;
/// `top-logprobs(k)` sorts `k` entries; a mask or bias list of more than this many bytes is
/// built and applied off the executor.
const INLINE_TOP_K: usize = 4096;
const INLINE_SAMPLE_DATA: usize = 64 << 10;

/// Stop strings one `generate` call may pass (after dropping duplicates and ones that cannot
/// match); each costs a search per generated token.
const MAX_STOP_STRINGS: usize = 64;

/// The threads for host work off the executor: at most `total` jobs at once, and at most
/// `per_tenant` of one tenant's, so that one tenant can never hold every thread.
///
/// The threads are the pool's own (not tokio's blocking pool) and run at a lower scheduling
/// priority (`nice`, [`RuntimeConfig::host_work_nice`](crate::RuntimeConfig)): a guest's
/// 15 MiB tokenization then takes the CPU the engine loop leaves, instead of half of a small
/// machine's cores away from every tenant's decoding. Jobs are charged the CPU time their thread
/// actually used (`CLOCK_THREAD_CPUTIME_ID`), not the wall time they took at that priority.
pub(crate) struct HostWork {
    global: Arc<Semaphore>,
    per_tenant: u32,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

type Job = Box<dyn FnOnce() + Send>;

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl HostWork {
    pub(crate) fn new(threads: usize, nice: i32) -> HostWork {
        let total = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        }
        .max(1);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..total {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("realm-host-work-{i}"))
                .spawn(move || {
                    // On Linux a nice value is per thread; `None` = the calling thread. Raising it
                    // needs no privilege. A failure only costs the priority.
                    if nice != 0 {
                        let _ = rustix::process::setpriority_process(None, nice);
                    }
                    loop {
                        // The lock is held only while waiting for the next job; the sender
                        // going away (the runtime dropped) ends the thread.
                        let job = match rx.lock().expect("host work queue").recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        };
                        job();
                    }
                });
            started += spawned.is_ok() as usize;
        }
        HostWork {
            global: Arc::new(Semaphore::new(total)),
            per_tenant: (total / 2).max(1) as u32,
            tenants: Mutex::new(HashMap::new()),
            // With no thread started, `submit` fails every job instead of queueing it forever.
            jobs: Mutex::new((started > 0).then_some(tx)),
        }
    }

    /// Waits for a permit of the tenant's and one of the pool's (waiting is not CPU time).
    async fn acquire(&self, tenant: &str) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        let mine = self
            .tenants
            .lock()
            .expect("host work lock")
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant as usize)))
            .clone();
        // The semaphores are never closed.
        let a = mine.acquire_owned().await.expect("semaphore open");
        let b = self
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        (a, b)
    }

    /// Runs `job` on a pool thread. The permits bound the jobs in flight to the thread count,
    /// so a job never waits behind another for long.
    fn submit(&self, job: Job) -> Result<(), String> {
        match &*self.jobs.lock().expect("host work sender") {
            Some(tx) => tx
                .send(job)
                .map_err(|_| "the host-work threads are gone".to_string()),
            None => Err("no host-work thread could be started".to_string()),
        }
    }
}

/// Sets a flag when dropped: tells host work still running on another thread that its call is
/// gone (its wall-clock deadline passed or its caller went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A guest misusing the interface (see [`GuestError::Fault`]); recorded in the store so that
/// the trap it causes is reported as that.
#[derive(Debug)]
struct FaultTrap(String);

impl std::fmt::Display for FaultTrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FaultTrap {}

/// A host call's failure: an error value for the guest, or a trap that ends the call.
pub enum HostError {
    Guest(wit::Error),
    Trap(wasmtime::Error),
}

impl From<wit::Error> for HostError {
    fn from(e: wit::Error) -> Self {
        HostError::Guest(e)
    }
}

impl From<SchedError> for HostError {
    fn from(e: SchedError) -> Self {
        HostError::Guest(match &e {
            SchedError::TooManySessions { .. }
            | SchedError::KvQuota { .. }
            | SchedError::PoolTooSmall { .. } => wit::Error::Limit(e.to_string()),
            SchedError::BadToken { .. } | SchedError::BadTruncate { .. } => {
                wit::Error::Invalid(e.to_string())
            }
            _ => wit::Error::Engine(e.to_string()),
        })
    }
}

type HResult<T> = Result<T, HostError>;

fn invalid<T>(msg: impl Into<String>) -> HResult<T> {
    Err(HostError::Guest(wit::Error::Invalid(msg.into())))
}

/// An open model handle.
pub struct ModelRes {
    entry: Arc<ModelEntry>,
}

/// One KV-cache sequence and the host-side state that goes with it.
pub struct SessionRes {
    entry: Arc<ModelEntry>,
    seq: Sequence,
    tokens: Vec<u32>,
    /// Logits after the last token, if known (cleared by truncation).
    logits: Option<Vec<f32>>,
    /// The generator of the last sampling parameters used, so that a seed gives a sequence of
    /// draws rather than one draw repeated.
    sampler: Option<Sampler>,
}

/// Everything one call's store holds.
pub struct HostState {
    rt: Arc<Inner>,
    ctx: InvokeContext,
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    output: tokio::sync::mpsc::UnboundedSender<String>,
    output_bytes: usize,
    limiter: Limiter,
    pub(crate) cpu: CpuMeter,
    limit_hit: Option<LimitHit>,
    /// The interface misuse that ended the call, if one did.
    fault: Option<String>,
    sessions: u32,
    handles: u32,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl HostState {
    fn limit(&mut self, kind: LimitKind, detail: String) -> HostError {
        let hit = LimitHit { kind, detail };
        self.limit_hit = Some(hit.clone());
        HostError::Trap(wasmtime::Error::new(LimitTrap(hit)))
    }

    fn cpu_limit(&mut self) -> HostError {
        let used = self.cpu.used();
        let cap = self.ctx.limits.cpu_time;
        self.limit(
            LimitKind::CpuTime,
            format!(
                "the guest ran for {} ms of CPU time (host calls included); the limit is {} ms",
                used.as_millis(),
                cap.as_millis()
            ),
        )
    }

    /// A handle the guest passed that does not name what it should.
    fn bad_handle(&mut self, kind: &str, rep: u32, e: ResourceTableError) -> HostError {
        let what = match e {
            ResourceTableError::NotPresent => "does not exist (never given, or already dropped)",
            ResourceTableError::WrongType => "names something else (a handle of another kind)",
            ResourceTableError::HasChildren => "still has dependents",
            ResourceTableError::Full => "cannot be stored: the handle table is full",
        };
        let msg = format!("{kind} handle (host index {rep}) {what}");
        self.fault = Some(msg.clone());
        HostError::Trap(wasmtime::Error::new(FaultTrap(msg)))
    }

    /// Runs `f` on a host-work thread, charged to this call's CPU time. `f` gets a `should_stop`
    /// check (true once the call's CPU budget is spent or the call is gone) and returns `None`
    /// when it stopped early; either ends the call with the CPU-time limit.
    async fn offload<T, F>(&mut self, f: F) -> HResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&(dyn Fn() -> bool + Sync)) -> Option<T> + Send + 'static,
    {
        let cap = self.ctx.limits.cpu_time;
        let left = cap.saturating_sub(self.cpu.used());
        if left.is_zero() {
            return Err(self.cpu_limit());
        }
        let permits = self.rt.host_work.acquire(&self.ctx.tenant).await;
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel = CancelOnDrop(cancelled.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let submitted = self.rt.host_work.submit(Box::new(move || {
            let _permits = permits;
            let start = thread_cpu_time();
            let should_stop = move || {
                cancelled.load(Ordering::Relaxed) || thread_cpu_time().saturating_sub(start) > left
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&should_stop)));
            let took = thread_cpu_time().saturating_sub(start);
            // The caller may be gone (its deadline passed): then nobody wants the result.
            let _ = tx.send((r, took));
        }));
        let failed =
            |e: String| HostError::Trap(wasmtime::Error::msg(format!("host work failed: {e}")));
        if let Err(e) = submitted {
            return Err(failed(e));
        }
        let (r, took) = match rx.await {
            Ok((Ok(v), took)) => (v, took),
            Ok((Err(p), _)) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
                    .to_string();
                return Err(failed(format!("panicked: {msg}")));
            }
            Err(_) => return Err(failed("the job was dropped".into())),
        };
        self.cpu.charge(took);
        match r {
            Some(v) if self.cpu.used() <= cap => Ok(v),
            _ => Err(self.cpu_limit()),
        }
    }

    fn check_data(&mut self, what: &str, bytes: usize) -> HResult<()> {
        let cap = self.ctx.limits.max_host_data_bytes;
        if bytes > cap {
            return Err(self.limit(
                LimitKind::HostData,
                format!("{what} passed {bytes} bytes into a host call; the limit is {cap}"),
            ));
        }
        Ok(())
    }

    fn take_handle(&mut self) -> HResult<()> {
        let cap = self.ctx.limits.max_handles;
        if self.handles >= cap {
            return Err(self.limit(
                LimitKind::Handles,
                format!("the guest holds {cap} host handles; the limit is {cap}"),
            ));
        }
        self.handles += 1;
        Ok(())
    }

    fn take_session(&mut self) -> HResult<()> {
        let cap = self.ctx.limits.max_sessions;
        if self.sessions >= cap {
            return Err(self.limit(
                LimitKind::Sessions,
                format!("the guest holds {cap} sessions; the limit is {cap}"),
            ));
        }
        self.take_handle()?;
        self.sessions += 1;
        Ok(())
    }

    fn emit(&mut self, text: &str) -> HResult<()> {
        self.output_bytes += text.len();
        let cap = self.ctx.limits.max_output_bytes;
        if self.output_bytes > cap {
            return Err(self.limit(
                LimitKind::Output,
                format!("the guest streamed more than {cap} bytes of output"),
            ));
        }
        // A caller that stopped listening (client gone) does not stop the guest; its
        // wall-clock deadline or the caller dropping the call does.
        let _ = self.output.send(text.to_string());
        Ok(())
    }

    fn model(&mut self, r: &Resource<ModelRes>) -> HResult<Arc<ModelEntry>> {
        match self.table.get(r) {
            Ok(m) => Ok(m.entry.clone()),
            Err(e) => Err(self.bad_handle("model", r.rep(), e)),
        }
    }

    fn session(&mut self, r: &Resource<SessionRes>) -> HResult<&mut SessionRes> {
        if let Err(e) = self.table.get(r) {
            return Err(self.bad_handle("session", r.rep(), e));
        }
        Ok(self.table.get_mut(r).expect("checked above"))
    }

    fn find_model(&self, name: &str) -> HResult<Arc<ModelEntry>> {
        let models = self.rt.models.read().expect("models lock");
        let name = if name.is_empty() {
            match &self.ctx.default_model {
                Some(n) => n.clone(),
                None if models.len() == 1 => models.keys().next().cloned().unwrap_or_default(),
                None => {
                    return Err(HostError::Guest(wit::Error::NotFound(
                        "no default model for this request; open one by name".into(),
                    )));
                }
            }
        } else {
            name.to_string()
        };
        let allowed = self
            .ctx
            .allowed_models
            .as_ref()
            .is_none_or(|a| a.contains(&name));
        match models.get(&name) {
            Some(m) if allowed => Ok(m.clone()),
            _ => Err(HostError::Guest(wit::Error::NotFound(format!(
                "model {name:?} is not available"
            )))),
        }
    }
}

fn trap(e: impl std::error::Error + Send + Sync + 'static) -> HostError {
    HostError::Trap(wasmtime::Error::new(e))
}

/// The guest's sampling parameters, clamped to what the model can use: the penalty window to
/// the context length, top-k to the vocabulary; logit-bias entries for tokens outside the
/// vocabulary are dropped (they could never apply) and a list longer than the vocabulary
/// (necessarily repeating tokens) is refused.
fn sampling_params(p: &wit::SamplingParams, info: &crate::ModelInfo) -> HResult<SamplingParams> {
    let logit_bias: Vec<(u32, f32)> = p
        .logit_bias
        .iter()
        .filter(|b| (b.token as usize) < info.n_vocab)
        .map(|b| (b.token, b.bias))
        .collect();
    if logit_bias.len() > info.n_vocab {
        return invalid(format!(
            "the logit bias lists {} entries; the vocabulary has {} tokens",
            logit_bias.len(),
            info.n_vocab
        ));
    }
    Ok(SamplingParams {
        temperature: p.temperature,
        top_k: (p.top_k as usize).min(info.n_vocab),
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        penalty_last_n: (p.penalty_last_n as usize).min(info.n_ctx),
        seed: p.seed,
        logit_bias,
    })
}

/// Bytes a token mask occupies in a host call.
fn mask_bytes(mask: &Option<wit::TokenMask>) -> usize {
    match mask {
        Some(wit::TokenMask::Allow(v) | wit::TokenMask::Deny(v)) => v.len() * 4,
        Some(wit::TokenMask::Bits(v)) => v.len() * 8,
        None => 0,
    }
}

fn token_mask(m: &wit::TokenMask, n_vocab: usize) -> HResult<TokenMask> {
    let check = |ids: &[u32]| match ids.iter().find(|&&t| t as usize >= n_vocab) {
        Some(t) => invalid(format!(
            "mask names token {t}; the vocabulary has {n_vocab}"
        )),
        None => Ok(()),
    };
    Ok(match m {
        wit::TokenMask::Allow(ids) => {
            check(ids)?;
            TokenMask::from_ids(n_vocab, ids)
        }
        wit::TokenMask::Deny(ids) => {
            check(ids)?;
            let mut mask = TokenMask::new(n_vocab);
            mask.allow_all();
            for &t in ids {
                mask.disallow(t);
            }
            mask
        }
        wit::TokenMask::Bits(words) => {
            let mut mask = TokenMask::new(n_vocab);
            // Words past the vocabulary's end count for nothing.
            for (w, &bits) in words.iter().take(n_vocab.div_ceil(64)).enumerate() {
                let mut b = bits;
                while b != 0 {
                    let i = w * 64 + b.trailing_zeros() as usize;
                    b &= b - 1;
                    if i < n_vocab {
                        mask.allow(i as u32);
                    }
                }
            }
            mask
        }
    })
}

impl SessionRes {
    /// The logits after the last token, recomputing them after a truncation.
    async fn ensure_logits(&mut self) -> HResult<&[f32]> {
        if self.logits.is_none() {
            let Some(&last) = self.tokens.last() else {
                return invalid("the session is empty: feed tokens before sampling");
            };
            let n = self.tokens.len();
            self.seq.truncate(n - 1).await?;
            self.logits = self.seq.feed(vec![last], true).await?;
        }
        Ok(self.logits.as_deref().expect("logits present"))
    }

    /// The session's sampler for `params` (rebuilt, with the penalty history, when they change).
    /// `params` are clamped ([`sampling_params`]): the history is at most the context.
    fn sampler(&mut self, params: SamplingParams) -> &mut Sampler {
        if self.sampler.as_ref().is_none_or(|s| *s.params() != params) {
            let mut s = Sampler::new(params);
            let n = s.params().penalty_last_n;
            for &t in &self.tokens[self.tokens.len().saturating_sub(n)..] {
                s.accept(t);
            }
            self.sampler = Some(s);
        }
        self.sampler.as_mut().expect("sampler present")
    }

    async fn feed(&mut self, tokens: Vec<u32>) -> HResult<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let n_ctx = self.entry.info.n_ctx;
        if self.tokens.len() + tokens.len() > n_ctx {
            return Err(HostError::Guest(wit::Error::Engine(format!(
                "context full: the session has {} tokens, adding {} exceeds the model's {n_ctx}",
                self.tokens.len(),
                tokens.len()
            ))));
        }
        self.logits = None;
        let logits = self.seq.feed(tokens.clone(), true).await?;
        if let Some(s) = &mut self.sampler {
            for &t in &tokens {
                s.accept(t);
            }
        }
        self.tokens.extend_from_slice(&tokens);
        self.logits = logits;
        Ok(())
    }
}

/// Renders a chat template as `apply-chat-template` does.
fn render_template(
    e: &ModelEntry,
    messages: &str,
    tools: Option<&str>,
    add_generation_prompt: bool,
) -> Result<String, wit::Error> {
    let Some(template) = &e.template else {
        return Err(wit::Error::Invalid(format!(
            "model {:?} has no usable chat template: {}",
            e.info.name,
            e.template_error.as_deref().unwrap_or("none found")
        )));
    };
    let messages: Vec<ChatMessage> = serde_json::from_str(messages).map_err(|err| {
        wit::Error::Invalid(format!("messages are not a JSON array of messages: {err}"))
    })?;
    let tools: Option<serde_json::Value> = match tools.map(serde_json::from_str) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(err)) => return Err(wit::Error::Invalid(format!("tools are not JSON: {err}"))),
    };
    let text = template
        .render(&messages, tools.as_ref(), add_generation_prompt)
        .map_err(|err| wit::Error::Invalid(err.to_string()))?;
    // As llama.cpp does: the tokenizer adds BOS itself, so the template's is dropped.
    Ok(if e.tokenizer.bos().is_some() && e.tokenizer.add_bos() {
        template.strip_bos(&text).to_string()
    } else {
        text
    })
}

/// The stop strings of a `generate` call that can take effect: empty and repeated ones dropped,
/// and ones longer than the most text the call can produce (`max_text` bytes), which can never
/// match; more than [`MAX_STOP_STRINGS`] left is refused.
fn stop_strings(stops: &[String], max_text: usize) -> HResult<Vec<String>> {
    let mut v: Vec<&String> = stops
        .iter()
        .filter(|s| !s.is_empty() && s.len() <= max_text)
        .collect();
    v.sort_unstable();
    v.dedup();
    if v.len() > MAX_STOP_STRINGS {
        return invalid(format!(
            "{} distinct stop strings; at most {MAX_STOP_STRINGS} are allowed",
            v.len()
        ));
    }
    Ok(v.into_iter().cloned().collect())
}

impl bindings::realm::llm::types::Host for HostState {
    fn convert_error(&mut self, err: HostError) -> wasmtime::Result<wit::Error> {
        match err {
            HostError::Guest(e) => Ok(e),
            HostError::Trap(t) => Err(t),
        }
    }
}

impl bindings::realm::llm::output::Host for HostState {
    async fn emit(&mut self, text: String) -> wasmtime::Result<()> {
        if let Err(e) = self.check_data("output.emit", text.len()) {
            return Err(into_trap(e));
        }
        self.emit(&text).map_err(into_trap)
    }
}

fn into_trap(e: HostError) -> wasmtime::Error {
    match e {
        HostError::Trap(t) => t,
        HostError::Guest(g) => wasmtime::Error::msg(format!("{g:?}")),
    }
}

impl bindings::realm::llm::llm::Host for HostState {
    async fn list_models(&mut self) -> wasmtime::Result<Vec<String>> {
        let models = self.rt.models.read().expect("models lock");
        let mut names: Vec<String> = models
            .keys()
            .filter(|n| {
                self.ctx
                    .allowed_models
                    .as_ref()
                    .is_none_or(|a| a.contains(n))
            })
            .cloned()
            .collect();
        names.sort();
        Ok(names)
    }
}

impl bindings::realm::llm::llm::HostModel for HostState {
    async fn open(&mut self, name: String) -> HResult<Resource<ModelRes>> {
        self.check_data("model name", name.len())?;
        let entry = self.find_model(&name)?;
        self.take_handle()?;
        self.table.push(ModelRes { entry }).map_err(trap)
    }

    async fn info(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<WitModelInfo> {
        let e = self.model(&m).map_err(into_trap)?;
        let i = &e.info;
        Ok(WitModelInfo {
            name: i.name.clone(),
            architecture: i.architecture.clone(),
            vocab_size: i.n_vocab as u32,
            context_length: i.n_ctx as u32,
            special_tokens: SpecialTokens {
                bos: i.bos,
                eos: i.eos,
                eog: i.eog.clone(),
            },
            chat_template: i.chat_template.clone(),
        })
    }

    async fn tokenize(
        &mut self,
        m: Resource<ModelRes>,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> HResult<Vec<u32>> {
        self.check_data("tokenize text", text.len())?;
        let e = self.model(&m)?;
        if text.len() <= INLINE_TEXT_BYTES {
            return Ok(e.tokenizer.encode(&text, add_special, parse_special));
        }
        // Stops (and the call fails with the CPU-time limit) once the guest's CPU budget is
        // spent; its output is at most a token per byte of input.
        self.offload(move |should_stop| {
            let budget = EncodeBudget {
                max_tokens: None,
                should_stop: Some(should_stop),
            };
            e.tokenizer
                .encode_bounded(&text, add_special, parse_special, &budget)
                .ok()
        })
        .await
    }

    async fn detokenize(&mut self, m: Resource<ModelRes>, tokens: Vec<u32>) -> HResult<String> {
        self.check_data("detokenize tokens", tokens.len() * 4)?;
        let e = self.model(&m)?;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= e.info.n_vocab) {
            return invalid(format!("token {t} is out of range"));
        }
        if tokens.len() <= INLINE_TOKENS {
            return Ok(e.tokenizer.decode(&tokens));
        }
        // The text is at most the sum of the tokens' pieces: refused before decoding when that
        // is past the host-data limit (which applies to what a call returns as well).
        let cap = self.ctx.limits.max_host_data_bytes;
        let r = self
            .offload(move |should_stop| {
                let mut bytes = 0usize;
                for (i, &t) in tokens.iter().enumerate() {
                    bytes += e.tokenizer.piece(t).len();
                    if i % 4096 == 0 && should_stop() {
                        return None;
                    }
                }
                if bytes > cap {
                    return Some(Err(bytes));
                }
                Some(Ok(e.tokenizer.decode(&tokens)))
            })
            .await?;
        r.map_err(|bytes| {
            self.limit(
                LimitKind::HostData,
                format!("detokenize would return up to {bytes} bytes; the limit is {cap}"),
            )
        })
    }

    async fn token_bytes(&mut self, m: Resource<ModelRes>, token: u32) -> HResult<Vec<u8>> {
        let e = self.model(&m)?;
        if token as usize >= e.info.n_vocab {
            return invalid(format!("token {token} is out of range"));
        }
        Ok(e.tokenizer.piece(token))
    }

    async fn vocab(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<Vec<Vec<u8>>> {
        let e = self.model(&m).map_err(into_trap)?;
        // A vocabulary's worth of pieces (262k for Gemma 3): off the executor.
        self.offload(move |_| {
            Some(
                (0..e.info.n_vocab as u32)
                    .map(|t| e.tokenizer.piece(t))
                    .collect(),
            )
        })
        .await
        .map_err(into_trap)
    }

    async fn apply_chat_template(
        &mut self,
        m: Resource<ModelRes>,
        messages: String,
        tools: Option<String>,
        add_generation_prompt: bool,
    ) -> HResult<String> {
        let size = messages.len() + tools.as_ref().map_or(0, |t| t.len());
        self.check_data("chat messages", size)?;
        let e = self.model(&m)?;
        let r = if size <= INLINE_TEXT_BYTES {
            render_template(&e, &messages, tools.as_deref(), add_generation_prompt)
        } else {
            self.offload(move |_| {
                Some(render_template(
                    &e,
                    &messages,
                    tools.as_deref(),
                    add_generation_prompt,
                ))
            })
            .await?
        };
        r.map_err(HostError::Guest)
    }

    async fn new_session(&mut self, m: Resource<ModelRes>) -> HResult<Resource<SessionRes>> {
        let entry = self.model(&m)?;
        self.take_session()?;
        let tenant = self.ctx.tenant.clone();
        let seq = match entry.engine.open(&tenant).await {
            Ok(s) => s,
            Err(e) => {
                self.sessions -= 1;
                self.handles -= 1;
                return Err(e.into());
            }
        };
        self.table
            .push(SessionRes {
                entry,
                seq,
                tokens: Vec::new(),
                logits: None,
                sampler: None,
            })
            .map_err(trap)
    }

    async fn drop(&mut self, m: Resource<ModelRes>) -> wasmtime::Result<()> {
        let rep = m.rep();
        if let Err(e) = self.table.delete(m) {
            return Err(into_trap(self.bad_handle("model", rep, e)));
        }
        self.handles -= 1;
        Ok(())
    }
}

impl bindings::realm::llm::llm::HostSession for HostState {
    async fn feed(&mut self, s: Resource<SessionRes>, tokens: Vec<u32>) -> HResult<()> {
        self.check_data("feed tokens", tokens.len() * 4)?;
        self.session(&s)?.feed(tokens).await
    }

    async fn sample(
        &mut self,
        s: Resource<SessionRes>,
        params: wit::SamplingParams,
        mask: Option<wit::TokenMask>,
    ) -> HResult<u32> {
        let data = params.logit_bias.len() * 8 + mask_bytes(&mask);
        self.check_data("sampling parameters and mask", data)?;
        let sess = self.session(&s)?;
        let entry = sess.entry.clone();
        let n_vocab = entry.info.n_vocab;
        let params = sampling_params(&params, &entry.info)?;
        sess.ensure_logits().await?;
        let bad = |e: realm_engine::sample::SampleError| wit::Error::Invalid(e.to_string());
        if data <= INLINE_SAMPLE_DATA {
            let mask = mask.map(|m| token_mask(&m, n_vocab)).transpose()?;
            // Taken out for the call so that the sampler (also in the session) can be borrowed.
            let logits = sess.logits.take().expect("logits present");
            let r = sess.sampler(params).sample(&logits, mask.as_ref());
            sess.logits = Some(logits);
            return r.map_err(|e| HostError::Guest(bad(e)));
        }
        // A large mask or bias list: built and applied on a host-work thread.
        sess.sampler(params);
        let mut sampler = sess.sampler.take().expect("sampler present");
        let logits = sess.logits.take().expect("logits present");
        let (sampler, logits, r) = self
            .offload(move |_| {
                let r = match mask.map(|m| token_mask(&m, n_vocab)).transpose() {
                    Ok(mask) => sampler
                        .sample(&logits, mask.as_ref())
                        .map_err(|e| HostError::Guest(bad(e))),
                    Err(e) => Err(e),
                };
                Some((sampler, logits, r))
            })
            .await?;
        let sess = self.session(&s)?;
        sess.sampler = Some(sampler);
        sess.logits = Some(logits);
        r
    }

    async fn logprob(&mut self, s: Resource<SessionRes>, token: u32) -> HResult<f32> {
        let sess = self.session(&s)?;
        let logits = sess.ensure_logits().await?;
        let Some(&x) = logits.get(token as usize) else {
            return invalid(format!("token {token} is out of range"));
        };
        Ok(x - log_sum_exp(logits))
    }

    async fn top_logprobs(
        &mut self,
        s: Resource<SessionRes>,
        k: u32,
    ) -> HResult<Vec<TokenLogprob>> {
        let sess = self.session(&s)?;
        let k = (k as usize).min(sess.entry.info.n_vocab);
        let to_wit = |v: Vec<(u32, f32)>| -> Vec<TokenLogprob> {
            v.into_iter()
                .map(|(token, logprob)| TokenLogprob { token, logprob })
                .collect()
        };
        let logits = sess.ensure_logits().await?;
        if k <= INLINE_TOP_K {
            return Ok(to_wit(Sampler::top_logprobs(logits, k)));
        }
        let logits = sess.logits.take().expect("logits present");
        let (logits, top) = self
            .offload(move |_| {
                let top = Sampler::top_logprobs(&logits, k);
                Some((logits, top))
            })
            .await?;
        self.session(&s)?.logits = Some(logits);
        Ok(to_wit(top))
    }

    async fn logits(&mut self, s: Resource<SessionRes>) -> HResult<Vec<f32>> {
        let sess = self.session(&s)?;
        Ok(sess.ensure_logits().await?.to_vec())
    }

    async fn fork(&mut self, s: Resource<SessionRes>) -> HResult<Resource<SessionRes>> {
        self.session(&s)?;
        self.take_session()?;
        let sess = self.session(&s)?;
        let seq = match sess.seq.fork().await {
            Ok(seq) => seq,
            Err(e) => {
                self.sessions -= 1;
                self.handles -= 1;
                return Err(e.into());
            }
        };
        let child = SessionRes {
            entry: sess.entry.clone(),
            seq,
            tokens: sess.tokens.clone(),
            logits: sess.logits.clone(),
            sampler: None,
        };
        self.table.push(child).map_err(trap)
    }

    async fn truncate(&mut self, s: Resource<SessionRes>, len: u32) -> HResult<()> {
        let sess = self.session(&s)?;
        let len = len as usize;
        if len > sess.tokens.len() {
            return invalid(format!(
                "cannot truncate a session of {} tokens to {len}",
                sess.tokens.len()
            ));
        }
        if len == sess.tokens.len() {
            return Ok(());
        }
        sess.seq.truncate(len).await?;
        sess.tokens.truncate(len);
        sess.logits = None;
        sess.sampler = None;
        Ok(())
    }

    async fn len(&mut self, s: Resource<SessionRes>) -> wasmtime::Result<u32> {
        Ok(self.session(&s).map_err(into_trap)?.tokens.len() as u32)
    }

    async fn tokens(&mut self, s: Resource<SessionRes>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.session(&s).map_err(into_trap)?.tokens.clone())
    }

    async fn generate(
        &mut self,
        s: Resource<SessionRes>,
        params: GenerateParams,
    ) -> HResult<Generation> {
        let data = params.sampling.logit_bias.len() * 8
            + params.stop.iter().map(|s| s.len()).sum::<usize>();
        self.check_data("generate parameters", data)?;
        let sess = self.session(&s)?;
        let entry = sess.entry.clone();
        let sampling = sampling_params(&params.sampling, &entry.info)?;
        // What the session can still hold bounds the loop and the text it can produce (a
        // token decodes to at most its longest piece plus a leading space).
        let room = entry.info.n_ctx.saturating_sub(sess.tokens.len());
        let max_tokens = (params.max_tokens as usize).min(room);
        let max_text = max_tokens.saturating_mul(entry.info.max_token_bytes.saturating_add(1));
        let stops = stop_strings(&params.stop, max_text)?;
        let mut stop = StopMatcher::new(&stops);
        let mut decoder = StreamDecoder::new();
        let mut out = Generation {
            text: String::new(),
            tokens: Vec::new(),
            finish_reason: FinishReason::Length,
        };
        loop {
            let sess = self.session(&s)?;
            if out.tokens.len() >= max_tokens || sess.tokens.len() >= sess.entry.info.n_ctx {
                break;
            }
            sess.ensure_logits().await?;
            let logits = sess.logits.take().expect("logits present");
            let tok = sess
                .sampler(sampling.clone())
                .sample(&logits, None)
                .map_err(|e| HostError::Guest(wit::Error::Invalid(e.to_string())));
            sess.logits = Some(logits);
            let tok = tok?;
            if params.stop_at_eog && sess.entry.tokenizer.is_eog(tok) {
                out.finish_reason = FinishReason::Stop;
                break;
            }
            out.tokens.push(tok);
            let piece = decoder.push(&sess.entry.tokenizer, tok);
            let o = stop.push(&piece);
            let stopped = o.stopped;
            if !stopped {
                sess.feed(vec![tok]).await?;
            }
            out.text.push_str(&o.emit);
            if params.stream {
                self.emit(&o.emit)?;
            }
            if stopped {
                out.finish_reason = FinishReason::Stop;
                break;
            }
        }
        if out.finish_reason == FinishReason::Length {
            let rest = decoder.finish();
            let mut tail = stop.push(&rest).emit;
            tail.push_str(&stop.flush());
            out.text.push_str(&tail);
            if params.stream {
                self.emit(&tail)?;
            }
        }
        Ok(out)
    }

    async fn drop(&mut self, s: Resource<SessionRes>) -> wasmtime::Result<()> {
        // Dropping the sequence frees its KV pages in the engine right away.
        let rep = s.rep();
        if let Err(e) = self.table.delete(s) {
            return Err(into_trap(self.bad_handle("session", rep, e)));
        }
        self.sessions -= 1;
        self.handles -= 1;
        Ok(())
    }
}

fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// A store for one call, with limits and the epoch callback in place.
fn new_store(
    rt: &Arc<Inner>,
    ctx: InvokeContext,
    output: tokio::sync::mpsc::UnboundedSender<String>,
) -> Store<HostState> {
    let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
    // No preopened directories, environment, arguments or sockets; stdin is empty.
    let wasi = WasiCtx::builder().stderr(stderr.clone()).build();
    let memory_bytes = ctx.limits.memory_bytes.min(rt.cfg.max_memory_bytes);
    let state = HostState {
        rt: rt.clone(),
        ctx,
        wasi,
        table: ResourceTable::new(),
        stderr,
        output,
        output_bytes: 0,
        limiter: Limiter {
            memory_bytes,
            hit: None,
        },
        cpu: CpuMeter::new(),
        limit_hit: None,
        fault: None,
        sessions: 0,
        handles: 0,
    };
    let mut store = Store::new(&rt.engine, state);
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut cx: StoreContextMut<'_, HostState>| {
        let s = cx.data_mut();
        let used = s.cpu.used();
        let cap = s.ctx.limits.cpu_time;
        if used > cap {
            let hit = LimitHit {
                kind: LimitKind::CpuTime,
                detail: format!(
                    "the guest ran for {} ms of CPU time; the limit is {} ms",
                    used.as_millis(),
                    cap.as_millis()
                ),
            };
            s.limit_hit = Some(hit.clone());
            return Err(wasmtime::Error::new(LimitTrap(hit)));
        }
        // Let other tasks on this thread run; the time spent waiting is not the guest's.
        let cpu = s.cpu.clone();
        cpu.pause();
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                tokio::task::yield_now().await;
                cpu.resume();
            }),
        ))
    });
    store
}

/// Turns a failed call into the error the caller sees.
fn classify(store: &Store<HostState>, err: wasmtime::Error) -> GuestError {
    let s = store.data();
    if let Some(hit) = s.limit_hit.clone().or_else(|| s.limiter.hit.clone()) {
        return GuestError::Limit {
            limit: hit.kind,
            detail: hit.detail,
        };
    }
    if let Some(t) = err.downcast_ref::<LimitTrap>() {
        return GuestError::Limit {
            limit: t.0.kind,
            detail: t.0.detail.clone(),
        };
    }
    if let Some(f) = &s.fault {
        return GuestError::Fault(f.clone());
    }
    // Handles the component model itself refuses while lifting a call's arguments (an index
    // the guest's table does not hold, one of another resource type, ...).
    if let Some(m) = err
        .chain()
        .map(|c| c.to_string())
        .find(|m| HANDLE_ERRORS.iter().any(|h| m.contains(h)))
    {
        return GuestError::Fault(format!("the guest passed a bad handle: {m}"));
    }
    let stderr = String::from_utf8_lossy(&s.stderr.contents())
        .trim()
        .to_string();
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::StackOverflow) => GuestError::Limit {
            limit: LimitKind::Stack,
            detail: "the guest overflowed its wasm stack (runaway recursion?)".into(),
        },
        Some(t) => {
            let mut msg = t.to_string();
            if !stderr.is_empty() {
                msg = format!("{msg}; guest stderr: {}", tail(&stderr, STDERR_IN_MESSAGE));
            }
            GuestError::Trap(msg)
        }
        None => {
            // The root cause, without wasmtime's backtrace context.
            let mut msg = err.root_cause().to_string();
            if !stderr.is_empty() {
                msg = format!("{msg}; guest stderr: {}", tail(&stderr, STDERR_IN_MESSAGE));
            }
            GuestError::Trap(msg)
        }
    }
}

/// What wasmtime says when a guest passes a handle its table does not hold as it should.
const HANDLE_ERRORS: [&str; 9] = [
    "unknown handle index",
    "used with the wrong type",
    "resource type mismatch",
    "host resource already consumed",
    "host-owned resource was already de-allocated",
    "is not a resource",
    "is not an own resource",
    "cannot remove owned resource while borrowed",
    "cannot lift own resource from a borrow",
];

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn wall_clock_error(d: Duration) -> GuestError {
    GuestError::Limit {
        limit: LimitKind::WallClock,
        detail: format!("the call did not finish within {} ms", d.as_millis()),
    }
}

/// A future whose polls are the guest's CPU time: the meter runs while it is being polled and
/// stops whenever it returns (finished, or waiting for the engine, a timer, a yield, a
/// host-work thread).
struct Metered<F> {
    inner: Pin<Box<F>>,
    meter: CpuMeter,
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.meter.resume();
        let r = self.inner.as_mut().poll(cx);
        self.meter.pause();
        r
    }
}

pub(crate) async fn invoke(
    rt: &Arc<Inner>,
    _slot: InstanceSlot,
    guest: &Guest,
    ctx: InvokeContext,
    input: String,
    output: tokio::sync::mpsc::UnboundedSender<String>,
) -> (Result<String, GuestError>, Duration) {
    let wall = ctx.limits.wall_clock;
    let mut store = new_store(rt, ctx, output);
    let meter = store.data().cpu.clone();
    let pre = guest.inner.pre.clone();
    let run = async {
        let instance = match pre.instantiate_async(&mut store).await {
            Ok(i) => i,
            Err(e) => return Err(instantiate_error(&store, e)),
        };
        let r = instance
            .realm_llm_handler()
            .call_handle(&mut store, &input)
            .await;
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(msg)) => Err(GuestError::Guest(msg)),
            Err(e) => Err(classify(&store, e)),
        }
    };
    let run = Metered {
        inner: Box::pin(run),
        meter: meter.clone(),
    };
    // Dropping the future on timeout abandons the guest's fiber; dropping the store then
    // frees its sessions (and so their KV pages).
    let result = match tokio::time::timeout(wall, run).await {
        Ok(r) => r,
        Err(_) => Err(wall_clock_error(wall)),
    };
    (result, meter.used())
}

fn instantiate_error(store: &Store<HostState>, e: wasmtime::Error) -> GuestError {
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return GuestError::Limit {
            limit: LimitKind::Instances,
            detail: format!("the runtime's instance pool is full: {e:#}"),
        };
    }
    match classify(store, e) {
        GuestError::Trap(m) => GuestError::Runtime(format!("instantiation failed: {m}")),
        other => other,
    }
}

pub(crate) async fn instantiate_only(
    rt: &Arc<Inner>,
    guest: &Guest,
    ctx: InvokeContext,
) -> Result<(), GuestError> {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let _slot = InstanceSlot::take(rt, &ctx.tenant, ctx.limits.max_instances, 1)?;
    let mut store = new_store(rt, ctx, tx);
    guest
        .inner
        .pre
        .instantiate_async(&mut store)
        .await
        .map(|_| ())
        .map_err(|e| instantiate_error(&store, e))
}
