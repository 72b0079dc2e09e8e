//! The serving engine: one loop per loaded model that batches every tenant's work.
//!
//! Callers (guest host functions, HTTP handlers, benchmarks) never touch the model or the KV pool.
//! They hold an [`Engine`] handle and [`Sequence`]s, and every operation is a message with a
//! one-shot reply channel to the engine thread ([`engine_loop`]). That thread owns the KV pool,
//! the prefix cache and the tenants' accounting, and at every step gathers the pending work of all
//! sequences — decode tokens first, then chunks of pending prefills, shared fairly between tenants
//! — into one batched forward pass.
//!
//! ```text
//!  Sequence::feed ──Msg::Feed──▶ engine thread: queue ─▶ pick batch ─▶ reserve / evict / preempt
//!        ▲                                                                  │
//!        └──────────── oneshot reply (logits) ◀── split rows ◀── Model::forward
//! ```

mod engine_loop;
mod prefix;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::model::Model;

/// Sizes of the engine's pool and batches.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// KV-cache capacity, in token positions, shared by every sequence (rounded up to pages).
    pub kv_tokens: usize,
    /// Most tokens in one forward pass (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Most prompt tokens of one sequence in one pass while other sequences are decoding, so that
    /// a long prompt delays everyone else's next token by one short chunk, not the whole prompt.
    pub prefill_chunk: usize,
    /// Reuse KV pages of earlier prompts of the same tenant.
    pub prefix_cache: bool,
    /// After answering decode steps, how long the engine may wait for those sequences' next
    /// tokens before running a pass without them. Callers sample between steps; without this
    /// the first one back would run a pass alone and batching would fall apart.
    pub batch_wait: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kv_tokens: 16384,
            max_batch_tokens: 512,
            prefill_chunk: 128,
            prefix_cache: true,
            batch_wait: std::time::Duration::from_millis(3),
        }
    }
}

/// Per-tenant limits enforced by the engine. `None` = unlimited.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantLimits {
    /// KV pages the tenant's sequences may hold at once (shared pages count for each holder).
    pub max_kv_pages: Option<usize>,
    /// Sequences open at once.
    pub max_sessions: Option<usize>,
    /// Tokens fed per minute (prompt and generated alike); work beyond it waits.
    pub tokens_per_minute: Option<u32>,
    /// Share of contended steps relative to other tenants (1 = normal, 0 is treated as 1).
    pub weight: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            max_kv_pages: None,
            max_sessions: None,
            tokens_per_minute: None,
            weight: 1,
        }
    }
}

/// A snapshot of the engine's state, refreshed after every step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub pages_total: usize,
    pub pages_free: usize,
    /// Pages held only by the prefix cache (reclaimable on demand).
    pub pages_cached: usize,
    pub page_size: usize,
    pub sequences: usize,
    /// Feed requests waiting or in progress.
    pub queue_depth: usize,
    pub steps: u64,
    pub tokens_processed: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub tenants: BTreeMap<String, TenantStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantStats {
    pub sessions: usize,
    pub kv_pages: usize,
    pub tokens_processed: u64,
    pub preemptions: u64,
}

/// What the engine refuses, with messages fit to show the tenant.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("session limit reached: tenant {tenant:?} may have {limit} sessions open at once")]
    TooManySessions { tenant: String, limit: usize },
    #[error(
        "KV-cache quota reached: tenant {tenant:?} may hold {limit} pages ({tokens} tokens) and this needs {needed} more"
    )]
    KvQuota {
        tenant: String,
        limit: usize,
        tokens: usize,
        needed: usize,
    },
    #[error("the KV cache holds {total} pages in all; this sequence alone would need {needed}")]
    PoolTooSmall { needed: usize, total: usize },
    #[error(
        "context full: the sequence has {len} tokens, adding {adding} exceeds the model's {max}"
    )]
    ContextFull {
        len: usize,
        adding: usize,
        max: usize,
    },
    #[error("token id {token} is out of range (vocabulary has {n_vocab} tokens)")]
    BadToken { token: u32, n_vocab: usize },
    #[error("cannot truncate a sequence of {len} tokens to {to}")]
    BadTruncate { len: usize, to: usize },
    #[error("the sequence was closed")]
    Closed,
    #[error("the engine has shut down")]
    Shutdown,
    #[error("model failure: {0}")]
    Model(String),
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, SchedError>>;

pub(crate) enum Msg {
    Open {
        tenant: Arc<str>,
        reply: Reply<(u64, Arc<AtomicUsize>)>,
    },
    Feed {
        id: u64,
        tokens: Vec<u32>,
        logits: bool,
        reply: Reply<Option<Vec<f32>>>,
    },
    Fork {
        id: u64,
        reply: Reply<(u64, Arc<AtomicUsize>)>,
    },
    Truncate {
        id: u64,
        len: usize,
        reply: Reply<()>,
    },
    Close {
        id: u64,
    },
    SetTenant {
        tenant: Arc<str>,
        limits: TenantLimits,
    },
}

struct Shared {
    tx: mpsc::Sender<Msg>,
    model: Arc<Model>,
    stats: Arc<Mutex<EngineStats>>,
}

/// A handle to one model's engine loop. Cheap to clone; the loop ends when the last handle and
/// the last [`Sequence`] are gone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.shared.model.hparams.name)
            .finish()
    }
}

impl Engine {
    /// Starts the engine thread for `model`, with a KV pool of `cfg.kv_tokens` positions (fails
    /// if the model's backend cannot make that pool).
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Result<Engine, crate::Error> {
        let pool = model.new_kv_pool(cfg.kv_tokens)?;
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        engine_loop::spawn(model.clone(), cfg, pool, rx, stats.clone());
        Ok(Engine {
            shared: Arc::new(Shared { tx, model, stats }),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    /// Sets (or replaces) a tenant's limits; applies to work scheduled from now on.
    pub fn set_tenant(&self, tenant: &str, limits: TenantLimits) {
        let _ = self.shared.tx.send(Msg::SetTenant {
            tenant: tenant.into(),
            limits,
        });
    }

    /// Opens a new, empty sequence charged to `tenant`.
    pub async fn open(&self, tenant: &str) -> Result<Sequence, SchedError> {
        let tenant: Arc<str> = tenant.into();
        let (id, len) = self
            .call(|reply| Msg::Open {
                tenant: tenant.clone(),
                reply,
            })
            .await?;
        Ok(Sequence {
            engine: self.clone(),
            id,
            tenant,
            len,
        })
    }

    /// The loop's counters as of its last step. They are published after each step, so an
    /// answer received from that step can arrive a moment before the stats that include it.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().expect("stats lock").clone()
    }

    async fn call<T>(&self, msg: impl FnOnce(Reply<T>) -> Msg) -> Result<T, SchedError> {
        let (reply, rx) = oneshot::channel();
        self.shared
            .tx
            .send(msg(reply))
            .map_err(|_| SchedError::Shutdown)?;
        rx.await.map_err(|_| SchedError::Shutdown)?
    }
}

/// One KV-cache sequence owned by a caller and charged to its tenant. Dropping it frees its pages
/// at once (pages shared with forks or the prefix cache stay with them).
pub struct Sequence {
    engine: Engine,
    id: u64,
    tenant: Arc<str>,
    len: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("len", &self.len())
            .finish()
    }
}

impl Sequence {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Tokens in the sequence (as of the last completed operation).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Appends `tokens`; with `logits`, returns the logits after the last one (`n_vocab` values).
    /// Long inputs are processed in chunks interleaved with other sequences' work. If the
    /// returned future is dropped before completion, the remaining tokens are not processed.
    pub async fn feed(
        &self,
        tokens: Vec<u32>,
        logits: bool,
    ) -> Result<Option<Vec<f32>>, SchedError> {
        let n_vocab = self.engine.model().hparams.n_vocab;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(SchedError::BadToken { token, n_vocab });
        }
        self.engine
            .call(|reply| Msg::Feed {
                id: self.id,
                tokens,
                logits,
                reply,
            })
            .await
    }

    /// A new sequence with the same contents, sharing its KV pages copy-on-write.
    pub async fn fork(&self) -> Result<Sequence, SchedError> {
        let (id, len) = self
            .engine
            .call(|reply| Msg::Fork { id: self.id, reply })
            .await?;
        Ok(Sequence {
            engine: self.engine.clone(),
            id,
            tenant: self.tenant.clone(),
            len,
        })
    }

    /// Forgets every token from position `len` on.
    pub async fn truncate(&self, len: usize) -> Result<(), SchedError> {
        self.engine
            .call(|reply| Msg::Truncate {
                id: self.id,
                len,
                reply,
            })
            .await
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        let _ = self.engine.shared.tx.send(Msg::Close { id: self.id });
    }
}
