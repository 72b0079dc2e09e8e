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
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod store;
pub mod v1;

pub use app::{AppState, Shared, router, serve, shutdown_signal};
pub use config::Config;

use crate::admin::UsageReport;
use crate::error::ApiError;
use crate::store::Tenant;

/// Applies a tenant's (new) quotas wherever they are enforced outside the request path.
pub(crate) fn tenant_changed(_s: &AppState, _t: &Tenant) {}

pub(crate) fn usage_report(s: &AppState, tenant: &str) -> Result<UsageReport, ApiError> {
    Ok(UsageReport {
        tenant: tenant.to_string(),
        usage: s.store.usage(tenant)?,
        kv_pages: Default::default(),
        sessions: Default::default(),
    })
}
