//! Shared state, the router and its middleware (request ids, tracing, auth, rate limits, body
//! limits, timeouts, OpenAI-shaped errors for everything), and graceful serving.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state, map_response};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{self, Directory};
use crate::blobs::BlobStore;
use crate::config::Config;
use crate::error::{ApiError, kind_for_status};
use crate::metrics::{Metrics, RequestLabels};
use crate::ratelimit::RateLimiter;
use crate::store::{Store, Tenant};
use crate::{admin, guests, openapi, v1};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Models(#[from] crate::models::ModelError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

pub struct AppState {
    pub config: Config,
    pub store: Store,
    pub blobs: BlobStore,
    pub tenants: Directory,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    pub models: crate::models::Models,
    /// False until startup has loaded the configured models, and again once shutdown begins.
    pub ready: AtomicBool,
}

pub type Shared = Arc<AppState>;

impl AppState {
    /// Opens the data directory (database, guest blobs) and the guest runtime; loads no model
    /// (see [`crate::models::Models::load_configured`]). Relative paths in `config` are resolved
    /// against the current directory first.
    pub fn open(mut config: Config) -> Result<Shared, AppError> {
        config.make_paths_absolute()?;
        let dd = &config.data_dir;
        let io = |source| AppError::DataDir {
            path: dd.clone(),
            source,
        };
        std::fs::create_dir_all(dd).map_err(io)?;
        let store = Store::open(&dd.join("realm.db"))?;
        let blobs = BlobStore::open(&dd.join("guests")).map_err(io)?;
        let in_use: std::collections::HashSet<String> = store.all_hashes()?.into_iter().collect();
        let swept = blobs.sweep(|h| in_use.contains(h)).map_err(io)?;
        if swept > 0 {
            tracing::info!(files = swept, "removed unreferenced or partial guest files");
        }
        let tenants = Directory::new(store.tenants()?);
        let models =
            crate::models::Models::new(&dd.join("cache"), config.limits.max_guest_instances)?;
        Ok(Arc::new(AppState {
            config,
            store,
            blobs,
            tenants,
            limiter: RateLimiter::default(),
            metrics: Metrics::new(),
            models,
            ready: AtomicBool::new(false),
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
}

/// Marks a response with the model that served it (for the request metrics).
#[derive(Clone)]
pub struct ModelUsed(pub String);

/// Resolves the tenant from its bearer key, applies its rate limit and records the request.
async fn tenant_auth(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let Some(key) = auth::bearer(req.headers()) else {
        return ApiError::unauthorized(
            "missing API key: send it as `Authorization: Bearer rk-...`",
        )
        .into_response();
    };
    let Some(tenant) = s.tenants.authenticate(key) else {
        return ApiError::unauthorized("invalid API key").into_response();
    };
    let q = &tenant.quotas;
    if let Err(wait) = s.limiter.check(&tenant.id, q.requests_per_minute, q.burst) {
        let secs = wait.as_secs_f64().ceil() as u64;
        let resp = ApiError::rate_limited(
            format!(
                "rate limit of {} requests per minute reached; retry after {secs} s",
                q.requests_per_minute
            ),
            secs,
        )
        .into_response();
        record(&s, &tenant, &req, &resp);
        return resp;
    }
    let endpoint = endpoint(&req);
    req.extensions_mut().insert(tenant.clone());
    tracing::Span::current().record("tenant", tenant.id.as_str());
    s.metrics.in_flight.inc();
    let resp = next.run(req).await;
    s.metrics.in_flight.dec();
    let model = resp
        .extensions()
        .get::<ModelUsed>()
        .map(|m| m.0.clone())
        .unwrap_or_default();
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            tenant: tenant.id.clone(),
            model,
            endpoint,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

fn endpoint(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default()
}

fn record(s: &AppState, tenant: &Tenant, req: &Request, resp: &Response) {
    s.metrics
        .requests
        .get_or_create(&RequestLabels {
            tenant: tenant.id.clone(),
            model: String::new(),
            endpoint: endpoint(req),
            status: resp.status().as_u16(),
        })
        .inc();
}

/// `/metrics` names tenants (their ids) and their guests: it takes the metrics token, or the
/// admin token.
async fn metrics_auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let tokens: Vec<&str> = [&s.config.metrics_token, &s.config.admin_token]
        .into_iter()
        .filter_map(|t| t.as_deref())
        .collect();
    if tokens.is_empty() {
        return ApiError::forbidden(
            "/metrics is disabled: set REALM_METRICS_TOKEN (or metrics_token in the config) \
             and scrape with `Authorization: Bearer <token>`",
        )
        .into_response();
    }
    let Some(token) = auth::bearer(req.headers()) else {
        return ApiError::unauthorized(
            "missing metrics token: send it as `Authorization: Bearer <token>`",
        )
        .into_response();
    };
    // Every candidate is compared (in constant time), so the answer's timing does not tell
    // which one was close.
    let ok = tokens
        .iter()
        .fold(false, |ok, t| auth::admin_token_matches(token, t) | ok);
    if !ok {
        return ApiError::unauthorized("invalid metrics token").into_response();
    }
    next.run(req).await
}

async fn admin_auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Some(configured) = s.config.admin_token.as_deref() else {
        return ApiError::forbidden(
            "the admin API is disabled: set REALM_ADMIN_TOKEN or admin_token in the config",
        )
        .into_response();
    };
    let Some(token) = auth::bearer(req.headers()) else {
        return ApiError::unauthorized("missing admin token").into_response();
    };
    if !auth::admin_token_matches(token, configured) {
        return ApiError::unauthorized("invalid admin token").into_response();
    }
    next.run(req).await
}

/// Gives every error response that is not already JSON (body-limit, timeout, method-not-allowed
/// and panic responses of the tower layers) the OpenAI error shape.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request body is larger than this endpoint accepts",
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this path",
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "the request timed out",
        StatusCode::INTERNAL_SERVER_ERROR => "the server had an error while processing the request",
        s => s.canonical_reason().unwrap_or("error"),
    };
    let mut e = ApiError::new(status, kind_for_status(status), message);
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        e = e.code("payload_too_large");
    }
    let retry = resp.headers().get(header::RETRY_AFTER).cloned();
    let mut out = e.into_response();
    if let Some(r) = retry {
        out.headers_mut().insert(header::RETRY_AFTER, r);
    }
    *out.extensions_mut() = resp.extensions().clone();
    out
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Marks the answer to a health probe: orchestrators and `scripts/run.sh` poll these, so they are
/// logged at DEBUG, not once per poll at INFO (or WARN for a 503 while models load).
#[derive(Clone, Copy)]
struct Probe;

async fn healthz() -> Response {
    let mut r = "ok".into_response();
    r.extensions_mut().insert(Probe);
    r
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "models are loaded"), (status = 503, description = "starting or stopping")))]
pub async fn readyz(State(s): State<Shared>) -> Response {
    let mut r = if s.is_ready() {
        "ready".into_response()
    } else {
        ApiError::unavailable("not ready: models are loading or the server is shutting down")
            .into_response()
    };
    r.extensions_mut().insert(Probe);
    r
}

/// Logs a finished request: health probes at DEBUG, 5xx at WARN (most are expected states: 503
/// while models load or during shutdown, 504 timeouts; internal errors are already logged at
/// ERROR with their cause where they happen, in error.rs), everything else at INFO.
fn log_response(resp: &Response, latency: Duration, _span: &tracing::Span) {
    let latency_ms = latency.as_millis() as u64;
    let status = resp.status().as_u16();
    if resp.extensions().get::<Probe>().is_some() {
        tracing::debug!(status, latency_ms, "finished processing request");
    } else if resp.status().is_server_error() {
        tracing::warn!(status, latency_ms, "finished processing request");
    } else {
        tracing::info!(status, latency_ms, "finished processing request");
    }
}

/// A response body that failed mid-stream (a status-code failure is logged by [`log_response`]).
fn log_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: Duration,
    _span: &tracing::Span,
) {
    if let tower_http::classify::ServerErrorsFailureClass::Error(error) = class {
        let latency_ms = latency.as_millis() as u64;
        tracing::warn!(%error, latency_ms, "response failed");
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    s.models.update_metrics(&s.metrics);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        s.metrics.encode(),
    )
        .into_response()
}

pub fn router(state: Shared) -> Router {
    let limits = &state.config.limits;
    let tenant = Router::new()
        .route("/v1/models", get(v1::list_models))
        .route("/v1/models/{model}", get(v1::get_model))
        .route("/v1/chat/completions", post(v1::chat_completions))
        .route("/v1/completions", post(v1::completions))
        .route("/v1/usage", get(v1::usage))
        .route(
            "/v1/guests",
            get(guests::list)
                .post(guests::upload)
                .layer(DefaultBodyLimit::max(limits.max_guest_bytes)),
        )
        .route("/v1/guests/{name}", get(guests::get).delete(guests::delete))
        .route("/v1/guests/{name}/invoke", post(guests::invoke))
        .route_layer(from_fn_with_state(state.clone(), tenant_auth));
    let admin = Router::new()
        .route(
            "/admin/tenants",
            get(admin::list_tenants).post(admin::create_tenant),
        )
        .route(
            "/admin/tenants/{id}",
            get(admin::get_tenant)
                .patch(admin::update_tenant)
                .delete(admin::delete_tenant),
        )
        .route("/admin/tenants/{id}/keys", post(admin::rotate_key))
        .route("/admin/tenants/{id}/usage", get(admin::tenant_usage))
        .route(
            "/admin/models",
            get(admin::list_models).post(admin::load_model),
        )
        .route(
            "/admin/models/{name}",
            axum::routing::delete(admin::unload_model),
        )
        .route_layer(from_fn_with_state(state.clone(), admin_auth));
    let timeout = Duration::from_secs(limits.request_timeout_secs);
    let max_body = limits.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(metrics).route_layer(from_fn_with_state(state.clone(), metrics_auth)),
        )
        .route("/openapi.json", get(openapi::serve))
        .merge(tenant)
        .merge(admin)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(map_response(json_errors))
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            timeout,
        ))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path(), tenant = tracing::field::Empty)
            })
            .on_response(log_response)
            .on_failure(log_failure),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting connections, turns
/// `/readyz` to 503, lets in-flight requests and streams finish for up to the configured grace
/// period, and returns.
pub async fn serve(
    state: Shared,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let grace = Duration::from_secs(state.config.limits.shutdown_grace_secs);
    let started = Arc::new(tokio::sync::Notify::new());
    let started2 = started.clone();
    let st = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        st.set_ready(false);
        started2.notify_one();
    });
    tokio::select! {
        r = server => r,
        _ = async { started.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_secs = grace.as_secs(), "shutdown grace period over; closing remaining connections");
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Loads the configured models, then marks the server ready. A model that fails to load is
/// logged and skipped (the server stays up, serving the others, and `/readyz` turns ready once
/// every load has been tried), so that one bad file does not take the service down.
pub fn load_models_in_background(state: Shared) {
    tokio::spawn(async move {
        let paths = match state.config.model_paths() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "could not list models");
                Vec::new()
            }
        };
        for p in paths {
            let name = crate::config::model_name(&p);
            if let Err(e) = crate::load_model(&state, &name, &p).await {
                tracing::error!(model = %name, path = %p.display(), error = %e.message, "model not loaded");
            }
        }
        state.set_ready(true);
        tracing::info!(models = state.models.list().len(), "ready");
    });
}
