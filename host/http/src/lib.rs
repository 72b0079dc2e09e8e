//! Realm's HTTP service: the OpenAI-compatible tenant API, guest upload and invocation, the
//! admin API, metrics and health endpoints, over a SQLite store in the data directory.
//!
//! `realm serve` (host/server) builds an [`app::AppState`] from a [`config::Config`], loads the
//! configured models and calls [`app::serve`]. Tests drive [`app::router`] in-process.

pub mod admin;
pub mod app;
pub mod auth;
pub mod blobs;
pub mod config;
pub mod error;
pub mod extract;
pub mod guests;
pub mod infer;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod ratelimit;
pub mod store;
pub mod v1;

pub use app::{AppState, Shared, router, serve, shutdown_signal};
pub use config::Config;

use crate::admin::UsageReport;
use crate::error::ApiError;
use crate::store::Tenant;

/// Applies a tenant's (new) quotas where the engines enforce them.
pub(crate) fn tenant_changed(s: &AppState, t: &Tenant) {
    s.models.set_tenant(t);
}

pub(crate) fn usage_report(s: &AppState, tenant: &str) -> Result<UsageReport, ApiError> {
    let usage = s.store.usage(tenant)?;
    let (kv_pages, sessions) = s.models.tenant_stats(tenant);
    Ok(UsageReport {
        tenant: tenant.to_string(),
        usage,
        kv_pages,
        sessions,
    })
}

/// Loads a model file under `name` with the server's engine settings and every tenant's limits.
pub async fn load_model(
    s: &AppState,
    name: &str,
    path: &std::path::Path,
) -> Result<models::LoadedModel, ApiError> {
    let cfg = realm_engine::sched::EngineConfig {
        kv_tokens: s.config.engine.kv_tokens,
        ..Default::default()
    };
    let tenants = s.tenants.all();
    match s
        .models
        .load(name, path, s.config.load_options(), cfg, &tenants)
        .await
    {
        Ok(m) => {
            tracing::info!(model = %name, path = %path.display(), backend = %m.backend, "model loaded");
            Ok(m)
        }
        Err(models::ModelError::Duplicate(n)) => Err(ApiError::conflict(format!(
            "a model named {n:?} is already loaded"
        ))),
        Err(models::ModelError::Load { path, detail }) => Err(ApiError::unprocessable(format!(
            "could not load {}: {detail}",
            path.display()
        ))
        .param("path")),
        Err(e) => Err(ApiError::internal(e)),
    }
}
