//! Loaded models and the guest runtime that serves them.
//!
//! Each model gets its own engine loop (`realm_engine::sched::Engine`) and is registered with the
//! one [`Runtime`] under its name; guests reach models only through the runtime. Tenant quotas
//! that the engine enforces (KV pages, sessions, tokens per minute, weight) are pushed to every
//! engine when a model loads and whenever a tenant changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use realm_engine::sched::{Engine, EngineConfig, TenantLimits};
use realm_runtime::{Guest, GuestLimits, ModelInfo, Runtime, RuntimeConfig, RuntimeError};

use crate::metrics::{Metrics, ModelLabel, TenantModel};
use crate::store::{Quotas, Tenant};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("guest runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("model {path}: {detail}")]
    Load { path: PathBuf, detail: String },
    #[error("a model named {0:?} is already loaded")]
    Duplicate(String),
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct LoadedModel {
    pub name: String,
    #[schema(value_type = String)]
    pub path: PathBuf,
    pub architecture: String,
    pub n_vocab: usize,
    pub n_ctx: usize,
    /// What runs it and why (`cpu (auto: ...)`, `cuda (asked for): cuda:0 NVIDIA H100 ...`).
    pub backend: String,
    /// Unix seconds.
    pub loaded_at: i64,
}

pub struct Models {
    pub runtime: Runtime,
    loaded: RwLock<BTreeMap<String, LoadedModel>>,
    /// Serializes loads so that two admins loading the same name cannot both load it.
    load_lock: tokio::sync::Mutex<()>,
}

/// The engine's view of a tenant's quotas.
pub fn tenant_limits(q: &Quotas) -> TenantLimits {
    TenantLimits {
        max_kv_pages: q.max_kv_pages,
        max_sessions: q.max_sessions,
        tokens_per_minute: q.tokens_per_minute,
        weight: q.weight.max(1),
    }
}

/// The sandbox's view of a tenant's quotas.
pub fn guest_limits(q: &Quotas) -> GuestLimits {
    let d = GuestLimits::default();
    GuestLimits {
        memory_bytes: usize::try_from(q.guest_memory_bytes).unwrap_or(usize::MAX),
        cpu_time: std::time::Duration::from_millis(q.guest_cpu_ms),
        wall_clock: std::time::Duration::from_millis(q.wall_clock_ms),
        max_sessions: q
            .max_sessions
            .map(|s| u32::try_from(s).unwrap_or(u32::MAX))
            .unwrap_or(d.max_sessions),
        ..d
    }
}

impl Models {
    /// `max_instances`: guest instances alive at once across all tenants.
    pub fn new(cache_dir: &Path, max_instances: u32) -> Result<Models, ModelError> {
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(cache_dir.to_path_buf()),
            max_instances,
            ..RuntimeConfig::default()
        })?;
        Ok(Models {
            runtime,
            loaded: RwLock::new(BTreeMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads a GGUF file and starts its engine (on a blocking thread: loading maps and checks the
    /// whole file).
    pub async fn load(
        &self,
        name: &str,
        path: &Path,
        opts: realm_engine::model::LoadOptions,
        engine_cfg: EngineConfig,
        tenants: &[Tenant],
    ) -> Result<LoadedModel, ModelError> {
        let _guard = self.load_lock.lock().await;
        if self.get(name).is_some() {
            return Err(ModelError::Duplicate(name.to_string()));
        }
        let p = path.to_path_buf();
        let model = tokio::task::spawn_blocking(move || realm_engine::Model::load(&p, &opts))
            .await
            .map_err(|e| ModelError::Load {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?
            .map_err(|e| ModelError::Load {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        let backend = model.backend_note().to_string();
        let engine = Engine::start(Arc::new(model), engine_cfg).map_err(|e| ModelError::Load {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        for t in tenants {
            engine.set_tenant(&t.id, tenant_limits(&t.quotas));
        }
        self.runtime.add_model(name, engine)?;
        let info = self
            .runtime
            .models()
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ModelError::Duplicate(name.to_string()))?;
        let lm = LoadedModel {
            name: name.to_string(),
            path: path.to_path_buf(),
            architecture: info.architecture,
            n_vocab: info.n_vocab,
            n_ctx: info.n_ctx,
            backend,
            loaded_at: crate::store::now(),
        };
        self.loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), lm.clone());
        Ok(lm)
    }

    /// Stops offering a model; requests already using it finish.
    pub fn unload(&self, name: &str) -> bool {
        let removed = self
            .loaded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .is_some();
        self.runtime.remove_model(name) || removed
    }

    pub fn get(&self, name: &str) -> Option<LoadedModel> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<LoadedModel> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn infos(&self) -> Vec<ModelInfo> {
        self.runtime.models()
    }

    /// The model a request that names none is served by.
    pub fn default_model(&self, configured: Option<&str>) -> Option<String> {
        let loaded = self.loaded.read().unwrap_or_else(|p| p.into_inner());
        match configured {
            Some(c) if loaded.contains_key(c) => Some(c.to_string()),
            _ => loaded.keys().next().cloned(),
        }
    }

    /// Pushes a tenant's quotas to every engine.
    pub fn set_tenant(&self, t: &Tenant) {
        let limits = tenant_limits(&t.quotas);
        for m in self.list() {
            if let Some(e) = self.runtime.engine(&m.name) {
                e.set_tenant(&t.id, limits.clone());
            }
        }
    }

    /// A tenant's live KV pages and sessions, per model.
    pub fn tenant_stats(&self, tenant: &str) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
        let mut pages = BTreeMap::new();
        let mut sessions = BTreeMap::new();
        for m in self.list() {
            if let Some(e) = self.runtime.engine(&m.name) {
                let st = e.stats();
                let ts = st.tenants.get(tenant);
                pages.insert(m.name.clone(), ts.map_or(0, |t| t.kv_pages));
                sessions.insert(m.name.clone(), ts.map_or(0, |t| t.sessions));
            }
        }
        (pages, sessions)
    }

    /// Refreshes the engine gauges (queue depth, KV pages) before a scrape.
    pub fn update_metrics(&self, m: &Metrics) {
        for lm in self.list() {
            let Some(e) = self.runtime.engine(&lm.name) else {
                continue;
            };
            let st = e.stats();
            let label = ModelLabel {
                model: lm.name.clone(),
            };
            m.queue_depth
                .get_or_create(&label)
                .set(st.queue_depth as i64);
            m.kv_pages_total
                .get_or_create(&label)
                .set(st.pages_total as i64);
            for (tenant, ts) in &st.tenants {
                m.kv_pages_in_use
                    .get_or_create(&TenantModel {
                        tenant: tenant.clone(),
                        model: lm.name.clone(),
                    })
                    .set(ts.kv_pages as i64);
            }
        }
    }

    /// Validates and compiles a guest.
    pub fn compile(&self, wasm: &[u8]) -> Result<Guest, RuntimeError> {
        self.runtime.load_guest(wasm)
    }
}
