//! Realm's guest runtime: runs sandboxed WebAssembly components against the `realm:llm` WIT
//! world (`wit/llm.wit`) on wasmtime's component model.
//!
//! - One [`Runtime`] per process: a wasmtime engine with the pooling allocator, epoch
//!   interruption driven by a ticker thread, and an on-disk cache of compiled guests (wasmtime's
//!   cache, keyed by a hash of the wasm, the compiler settings and the wasmtime version).
//! - [`Runtime::load_guest`] validates and compiles a component once and keeps its
//!   `InstancePre`; [`Runtime::invoke`] runs one request in a fresh `Store` (one instance per
//!   call) under the caller's [`GuestLimits`].
//! - Host calls that need a model go to the model's [`Engine`] and are awaited, so many guests'
//!   steps share the engine's batches. Sampling happens here, on the host, over the logits the
//!   engine returns: vocabulary-sized vectors reach guest memory only through `session.logits`.
//!
//! Invocation needs a tokio runtime with the time driver (`enable_time` / `enable_all`).

mod host;
mod limits;

pub mod builtin;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use realm_engine::sched::Engine;
use realm_engine::template::ChatTemplate;
use realm_engine::tokenizer::Tokenizer;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};

pub use limits::{GuestLimits, LimitKind};

/// Settings of a [`Runtime`] (process-wide; per-call limits are [`GuestLimits`]).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled guests are cached across restarts; `None` = no disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Guest instances alive at once, across all tenants (the pooling allocator's size).
    pub max_instances: u32,
    /// The most linear memory any guest may be given (per memory); tenants' `memory_bytes`
    /// limits are capped by it. Reserved as address space per pool slot, not committed.
    pub max_memory_bytes: usize,
    /// Epoch length: the granularity of CPU-time checks and of yields to other tasks.
    pub epoch_tick: Duration,
    /// Largest wasm stack a guest may use (deep recursion traps past it).
    pub max_wasm_stack: usize,
    /// Threads that run expensive host calls (long tokenizations, vocabularies, templates,
    /// sampling over large masks) off the async executor; 0 = one per core. A tenant may use
    /// at most half of them (at least one) at once.
    pub host_work_threads: usize,
    /// The `nice` value of the host-work threads (0-19; 0 = the process's own priority). The
    /// default, 19, lets the engine loop's threads (decoding for every tenant) go first when
    /// the CPU is short; host work then runs on what they leave, charged only the CPU it used.
    pub host_work_nice: i32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            max_instances: 64,
            max_memory_bytes: 1 << 30,
            epoch_tick: Duration::from_millis(1),
            max_wasm_stack: 1 << 20,
            host_work_threads: 0,
            host_work_nice: 19,
        }
    }
}

/// Errors of the runtime itself (loading guests, adding models).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("not a WebAssembly component: {0}")]
    NotComponent(String),
    #[error("the guest does not fit the realm:llm/guest world: {0}")]
    WrongWorld(String),
    #[error("the guest imports {0}, which this host does not grant")]
    UngrantedImport(String),
    #[error("could not compile the guest: {0}")]
    Compile(String),
    #[error("model {0:?} is already loaded")]
    DuplicateModel(String),
    #[error("model {name:?}: {detail}")]
    Model { name: String, detail: String },
    #[error("wasmtime: {0}")]
    Wasmtime(String),
    #[error("cache directory {path}: {detail}")]
    Cache { path: PathBuf, detail: String },
}

/// How a guest call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuestError {
    /// The guest trapped (a panic, `unreachable`, a bad handle, ...).
    #[error("guest trapped: {0}")]
    Trap(String),
    /// A sandbox limit ended the call.
    #[error("guest stopped: {limit} limit reached: {detail}")]
    Limit { limit: LimitKind, detail: String },
    /// The guest returned an error of its own.
    #[error("guest error: {0}")]
    Guest(String),
    /// The guest misused the interface in a way no well-formed program can (a handle it was
    /// never given or already dropped, a handle of the wrong kind): its bug, not the host's.
    #[error("guest fault: {0}")]
    Fault(String),
    /// The runtime could not run the call (instantiation failed, engine gone, ...).
    #[error("runtime error: {0}")]
    Runtime(String),
}

/// What a loaded model looks like to callers and guests.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eog: Vec<u32>,
    pub chat_template: Option<String>,
    /// The most input bytes one token can stand for: `text.len().div_ceil(max_token_bytes)` is
    /// a lower bound on the tokens `text` becomes (to refuse what cannot fit the context
    /// before tokenizing it).
    pub max_token_bytes: usize,
}

/// A model as the host functions see it: the engine plus the text layer, built once.
pub(crate) struct ModelEntry {
    pub info: ModelInfo,
    pub engine: Engine,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Why there is no template, for the error a guest gets when it asks for one.
    pub template_error: Option<String>,
}

/// A validated, compiled guest, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct Guest {
    inner: Arc<GuestInner>,
}

struct GuestInner {
    hash: String,
    pre: host::bindings::GuestPre<host::HostState>,
}

impl Guest {
    /// SHA-256 of the component's bytes, lowercase hex.
    pub fn hash(&self) -> &str {
        &self.inner.hash
    }
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("hash", &self.inner.hash)
            .finish()
    }
}

/// Who is calling and under which limits.
#[derive(Debug, Clone, Default)]
pub struct InvokeContext {
    pub tenant: String,
    pub limits: GuestLimits,
    /// The model that `Model::open("")` opens; `None` = the only loaded model, if just one.
    pub default_model: Option<String>,
    /// Models this call may open; `None` = all.
    pub allowed_models: Option<Vec<String>>,
}

/// The guest runtime. Cheap to clone; all clones share the engine, models and guest cache.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub engine: wasmtime::Engine,
    pub linker: Linker<host::HostState>,
    pub cfg: RuntimeConfig,
    pub models: RwLock<HashMap<String, Arc<ModelEntry>>>,
    guests: Mutex<HashMap<String, Guest>>,
    /// Live (or reserved) instances per tenant and in all.
    pub instances: Mutex<Instances>,
    /// Permits for host work run off the async executor (see [`RuntimeConfig::host_work_threads`]).
    pub host_work: host::HostWork,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let wt = |e: wasmtime::Error| RuntimeError::Wasmtime(format!("{e:#}"));
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(cfg.max_wasm_stack)
            // The fiber stack must hold the wasm stack plus the host functions' frames.
            .async_stack_size(cfg.max_wasm_stack + (2 << 20))
            .cranelift_opt_level(wasmtime::OptLevel::Speed);

        let mut pool = wasmtime::PoolingAllocationConfig::default();
        let n = cfg.max_instances.max(1);
        // A Rust wasip2 component is a handful of core instances (the program, the WASI adapter
        // and small shims), two memories at most and a few tables.
        pool.total_component_instances(n)
            .total_core_instances(n * 8)
            .total_memories(n * 2)
            .total_tables(n * 8)
            .total_stacks(n)
            .max_core_instances_per_component(16)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_memory_size(cfg.max_memory_bytes)
            .table_elements(100_000);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));

        if let Some(dir) = &cfg.cache_dir {
            std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Cache {
                path: dir.clone(),
                detail: e.to_string(),
            })?;
            let mut cc = wasmtime::CacheConfig::new();
            cc.with_directory(dir);
            let cache = wasmtime::Cache::new(cc).map_err(|e| RuntimeError::Cache {
                path: dir.clone(),
                detail: format!("{e:#}"),
            })?;
            config.cache(Some(cache));
        }

        let engine = wasmtime::Engine::new(&config).map_err(wt)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wt)?;
        host::bindings::Guest::add_to_linker::<_, wasmtime::component::HasSelf<host::HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(wt)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = cfg.epoch_tick;
            std::thread::Builder::new()
                .name("realm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| RuntimeError::Wasmtime(format!("epoch thread: {e}")))?;
        }

        let host_work = host::HostWork::new(cfg.host_work_threads, cfg.host_work_nice);
        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                linker,
                cfg,
                models: RwLock::new(HashMap::new()),
                guests: Mutex::new(HashMap::new()),
                instances: Mutex::new(Instances::default()),
                host_work,
                ticker_stop,
            }),
        })
    }

    /// Makes a model available to guests under `name`; builds its tokenizer and chat template.
    pub fn add_model(&self, name: &str, engine: Engine) -> Result<(), RuntimeError> {
        let model = engine.model().clone();
        let err = |detail: String| RuntimeError::Model {
            name: name.to_string(),
            detail,
        };
        let tokenizer = Tokenizer::from_gguf(&model.file).map_err(|e| err(e.to_string()))?;
        let (template, template_error) = match ChatTemplate::for_model(&model.file) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let chat_template = model
            .file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let mut eog = tokenizer.eog_tokens().to_vec();
        eog.sort_unstable();
        eog.dedup();
        let info = ModelInfo {
            name: name.to_string(),
            architecture: model.hparams.arch.clone(),
            n_vocab: model.hparams.n_vocab,
            n_ctx: model.hparams.n_ctx_train,
            bos: tokenizer.bos(),
            eos: tokenizer.eos(),
            eog,
            chat_template,
            max_token_bytes: tokenizer.max_token_bytes().max(1),
        };
        let entry = Arc::new(ModelEntry {
            info,
            engine,
            tokenizer,
            template,
            template_error,
        });
        let mut models = self.inner.models.write().expect("models lock");
        if models.contains_key(name) {
            return Err(RuntimeError::DuplicateModel(name.to_string()));
        }
        models.insert(name.to_string(), entry);
        Ok(())
    }

    /// Stops offering a model to new calls (calls holding it finish normally).
    pub fn remove_model(&self, name: &str) -> bool {
        self.inner
            .models
            .write()
            .expect("models lock")
            .remove(name)
            .is_some()
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        let mut v: Vec<ModelInfo> = self
            .inner
            .models
            .read()
            .expect("models lock")
            .values()
            .map(|m| m.info.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The engine serving a model (for stats and tenant limits).
    pub fn engine(&self, model: &str) -> Option<Engine> {
        self.inner
            .models
            .read()
            .expect("models lock")
            .get(model)
            .map(|m| m.engine.clone())
    }

    /// The description of one loaded model.
    pub fn model_info(&self, model: &str) -> Option<ModelInfo> {
        self.inner
            .models
            .read()
            .expect("models lock")
            .get(model)
            .map(|m| m.info.clone())
    }

    /// Guest instances `tenant` is running (or has reserved) now.
    pub fn live_instances(&self, tenant: &str) -> u32 {
        self.inner
            .instances
            .lock()
            .expect("instances lock")
            .per_tenant
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    /// Reserves `count` instance slots for `tenant` at once, or none: refused (a
    /// `LimitKind::Instances` error) when the tenant would run more than `cap` instances or the
    /// runtime more than its pool holds. Callers that stream take the slots before the first
    /// byte, so that the limit is an answer (HTTP 429) rather than an error inside a stream;
    /// each slot is then given to [`Runtime::invoke_in_slot`] and frees itself when dropped.
    pub fn reserve(
        &self,
        tenant: &str,
        cap: u32,
        count: u32,
    ) -> Result<Vec<InstanceSlot>, GuestError> {
        InstanceSlot::take(&self.inner, tenant, cap, count)
    }

    /// Validates and compiles a guest (or returns the one already loaded with the same bytes).
    pub fn load_guest(&self, wasm: &[u8]) -> Result<Guest, RuntimeError> {
        let hash = hex(&Sha256::digest(wasm));
        if let Some(g) = self.inner.guests.lock().expect("guests lock").get(&hash) {
            return Ok(g.clone());
        }
        if !wasmparser_is_component(wasm) {
            return Err(RuntimeError::NotComponent(
                if wasm.starts_with(b"\0asm") {
                    "this is a core module; build the guest for wasm32-wasip2 (which emits a component)"
                } else {
                    "the bytes do not start with the WebAssembly magic number"
                }
                .into(),
            ));
        }
        let component = Component::from_binary(&self.inner.engine, wasm)
            .map_err(|e| RuntimeError::Compile(format!("{e:#}")))?;
        let component_ty = component.component_type();
        for (name, _) in component_ty.imports(&self.inner.engine) {
            if !is_granted(name) {
                return Err(RuntimeError::UngrantedImport(name.to_string()));
            }
        }
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| classify_link_error(format!("{e:#}")))?;
        let pre = host::bindings::GuestPre::new(pre)
            .map_err(|e| RuntimeError::WrongWorld(format!("{e:#}")))?;
        let guest = Guest {
            inner: Arc::new(GuestInner {
                hash: hash.clone(),
                pre,
            }),
        };
        self.inner
            .guests
            .lock()
            .expect("guests lock")
            .insert(hash, guest.clone());
        Ok(guest)
    }

    /// Runs one request through `guest`: a fresh instance, the guest's `handle` export, then
    /// teardown (which frees every session the call opened). Text the guest streams arrives on
    /// `output` as it is produced; the return value is the guest's JSON response.
    pub async fn invoke(
        &self,
        guest: &Guest,
        ctx: InvokeContext,
        input: String,
        output: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<String, GuestError> {
        self.invoke_metered(guest, ctx, input, output).await.0
    }

    /// [`Runtime::invoke`], also returning the guest's CPU time: time its code ran, excluding
    /// time spent waiting for the engine (what tenants' usage reports as guest CPU time).
    pub async fn invoke_metered(
        &self,
        guest: &Guest,
        ctx: InvokeContext,
        input: String,
        output: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> (Result<String, GuestError>, std::time::Duration) {
        let slot = match InstanceSlot::take(&self.inner, &ctx.tenant, ctx.limits.max_instances, 1) {
            Ok(mut s) => s.pop().expect("one slot"),
            Err(e) => return (Err(e), std::time::Duration::ZERO),
        };
        host::invoke(&self.inner, slot, guest, ctx, input, output).await
    }

    /// [`Runtime::invoke_metered`] in a slot taken earlier with [`Runtime::reserve`] (for
    /// `ctx.tenant`); `ctx.limits.max_instances` is not checked again.
    pub async fn invoke_in_slot(
        &self,
        slot: InstanceSlot,
        guest: &Guest,
        ctx: InvokeContext,
        input: String,
        output: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> (Result<String, GuestError>, std::time::Duration) {
        host::invoke(&self.inner, slot, guest, ctx, input, output).await
    }

    /// Instantiates `guest` and drops the instance without calling it (for benchmarks of
    /// instantiation cost).
    pub async fn instantiate_only(
        &self,
        guest: &Guest,
        ctx: InvokeContext,
    ) -> Result<(), GuestError> {
        host::instantiate_only(&self.inner, guest, ctx).await
    }
}

/// Instance counts, per tenant and in all (reservations included).
#[derive(Default)]
pub(crate) struct Instances {
    per_tenant: HashMap<String, u32>,
    total: u32,
}

/// One guest instance slot of a tenant, held from [`Runtime::reserve`] (or the start of a call)
/// until dropped.
pub struct InstanceSlot {
    rt: Arc<Inner>,
    tenant: String,
}

impl std::fmt::Debug for InstanceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSlot")
            .field("tenant", &self.tenant)
            .finish()
    }
}

impl InstanceSlot {
    pub(crate) fn take(
        rt: &Arc<Inner>,
        tenant: &str,
        cap: u32,
        count: u32,
    ) -> Result<Vec<InstanceSlot>, GuestError> {
        let mut m = rt.instances.lock().expect("instances lock");
        let mine = m.per_tenant.get(tenant).copied().unwrap_or(0);
        if mine.saturating_add(count) > cap {
            return Err(GuestError::Limit {
                limit: LimitKind::Instances,
                detail: if count > 1 {
                    format!(
                        "tenant {tenant:?} runs {mine} guest instances and asked for {count} more; \
                         its limit is {cap}"
                    )
                } else {
                    format!(
                        "tenant {tenant:?} already runs {mine} guest instances; its limit is {cap}"
                    )
                },
            });
        }
        let pool = rt.cfg.max_instances.max(1);
        if m.total.saturating_add(count) > pool {
            return Err(GuestError::Limit {
                limit: LimitKind::Instances,
                detail: format!(
                    "the server runs {} guest instances; its pool holds {pool}",
                    m.total
                ),
            });
        }
        *m.per_tenant.entry(tenant.to_string()).or_insert(0) += count;
        m.total += count;
        Ok((0..count)
            .map(|_| InstanceSlot {
                rt: rt.clone(),
                tenant: tenant.to_string(),
            })
            .collect())
    }
}

impl Drop for InstanceSlot {
    fn drop(&mut self) {
        let mut m = self.rt.instances.lock().expect("instances lock");
        m.total = m.total.saturating_sub(1);
        if let Some(n) = m.per_tenant.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                m.per_tenant.remove(&self.tenant);
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Component binaries carry layer 1 in the version field's upper half (a core module has 0).
fn wasmparser_is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[..4] == *b"\0asm" && wasm[6..8] == [1, 0]
}

/// Imports we grant: the realm:llm interfaces and WASI p2 (whose capabilities the store's
/// `WasiCtx` withholds: no files, sockets, environment or arguments).
fn is_granted(name: &str) -> bool {
    name.starts_with("realm:llm/") || name.starts_with("wasi:")
}

fn classify_link_error(msg: String) -> RuntimeError {
    // wasmtime reports the first import it cannot satisfy ("component imports instance `x`,
    // but a matching implementation was not found in the linker").
    if let Some(start) = msg
        .find("imports instance `")
        .or_else(|| msg.find("imports function `"))
    {
        let rest = &msg[start..];
        if let Some(q) = rest.find('`') {
            let tail = &rest[q + 1..];
            if let Some(end) = tail.find('`') {
                return RuntimeError::UngrantedImport(tail[..end].to_string());
            }
        }
    }
    RuntimeError::WrongWorld(msg)
}
