//! The admin API (`/admin/*`, behind the admin token): tenants, their keys and quotas, usage,
//! and (with the runtime) model loading.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::Shared;
use crate::auth;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::guests::is_builtin;
use crate::store::{self, Quotas, Tenant, Usage};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Unique name: 1-64 characters from `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// Quotas; fields left out take the server's `tenant_defaults`.
    #[schema(value_type = Option<Object>)]
    pub quotas: Option<serde_json::Map<String, serde_json::Value>>,
    /// Guest serving completions when a request names none (default `chat`).
    pub default_guest: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    pub name: Option<String>,
    /// Quota fields to change (the others keep their values).
    #[schema(value_type = Option<Object>)]
    pub quotas: Option<serde_json::Map<String, serde_json::Value>>,
    pub default_guest: Option<String>,
}

/// A tenant just created or whose key was just rotated: the only time the key is shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantWithKey {
    #[serde(flatten)]
    pub tenant: Tenant,
    pub api_key: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub object: String,
    pub data: Vec<Tenant>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    pub tenant: String,
    #[serde(flatten)]
    pub usage: Usage,
    /// KV cache pages held right now, per model.
    pub kv_pages: std::collections::BTreeMap<String, usize>,
    /// Sequences open right now, per model.
    pub sessions: std::collections::BTreeMap<String, usize>,
}

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(
            ApiError::bad_request("name must be 1-64 characters from A-Z a-z 0-9 . _ -")
                .param("name"),
        )
    }
}

fn merge_quotas(
    base: &Quotas,
    patch: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<Quotas, ApiError> {
    let Some(patch) = patch else {
        return Ok(base.clone());
    };
    let mut v = serde_json::to_value(base).map_err(ApiError::internal)?;
    let obj = v.as_object_mut().expect("Quotas serializes to an object");
    for (k, val) in patch {
        obj.insert(k, val);
    }
    let q: Quotas = serde_json::from_value(v)
        .map_err(|e| ApiError::unprocessable(format!("invalid quotas: {e}")).param("quotas"))?;
    q.validate()
        .map_err(|e| ApiError::unprocessable(e.to_string()).param("quotas"))?;
    Ok(q)
}

fn check_default_guest(s: &Shared, tenant_id: &str, guest: &str) -> Result<(), ApiError> {
    if is_builtin(guest) {
        return Ok(());
    }
    match s.store.guest(tenant_id, guest) {
        Ok(_) => Ok(()),
        Err(store::StoreError::NotFound(_)) => Err(ApiError::unprocessable(format!(
            "default_guest {guest:?} is neither a built-in guest nor one of this tenant's"
        ))
        .param("default_guest")),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/admin/tenants", tag = "admin", request_body = CreateTenant,
    security(("admin_token" = [])),
    responses((status = 201, body = TenantWithKey), (status = 409, body = crate::error::ErrorBody),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn create_tenant(
    State(s): State<Shared>,
    ApiJson(req): ApiJson<CreateTenant>,
) -> Result<Response, ApiError> {
    validate_name(&req.name)?;
    let quotas = merge_quotas(&s.config.tenant_defaults, req.quotas)?;
    let default_guest = req.default_guest.unwrap_or_else(|| "chat".into());
    if !is_builtin(&default_guest) {
        return Err(ApiError::unprocessable(
            "a new tenant has no guests yet: default_guest must be a built-in guest",
        )
        .param("default_guest"));
    }
    let (key, key_hash) = auth::new_key();
    let t = Tenant {
        id: auth::new_id("tn"),
        name: req.name,
        default_guest,
        quotas,
        created_at: store::now(),
        key_hash,
    };
    s.store.create_tenant(&t)?;
    s.tenants.upsert(t.clone());
    crate::tenant_changed(&s, &t);
    tracing::info!(tenant = %t.id, name = %t.name, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(TenantWithKey {
            tenant: t,
            api_key: key,
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/admin/tenants", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, body = TenantList)))]
pub async fn list_tenants(State(s): State<Shared>) -> Result<Json<TenantList>, ApiError> {
    Ok(Json(TenantList {
        object: "list".into(),
        data: s.store.tenants()?,
    }))
}

#[utoipa::path(get, path = "/admin/tenants/{id}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Tenant), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_tenant(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(s.store.tenant(&id)?))
}

#[utoipa::path(patch, path = "/admin/tenants/{id}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path)), request_body = UpdateTenant,
    responses((status = 200, body = Tenant), (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn update_tenant(
    State(s): State<Shared>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateTenant>,
) -> Result<Json<Tenant>, ApiError> {
    let mut t = s.store.tenant(&id)?;
    if let Some(name) = req.name {
        validate_name(&name)?;
        t.name = name;
    }
    t.quotas = merge_quotas(&t.quotas, req.quotas)?;
    if let Some(g) = req.default_guest {
        check_default_guest(&s, &t.id, &g)?;
        t.default_guest = g;
    }
    s.store.update_tenant(&t)?;
    s.tenants.upsert(t.clone());
    crate::tenant_changed(&s, &t);
    Ok(Json(t))
}

#[utoipa::path(delete, path = "/admin/tenants/{id}", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_tenant(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let hashes = s.store.delete_tenant(&id)?;
    s.tenants.remove(&id);
    s.limiter.forget(&id);
    for h in hashes {
        crate::guests::release_blob(&s, &h);
    }
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/admin/tenants/{id}/keys", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = TenantWithKey, description = "the new key; the old one stops working at once"),
        (status = 404, body = crate::error::ErrorBody)))]
pub async fn rotate_key(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<TenantWithKey>, ApiError> {
    let mut t = s.store.tenant(&id)?;
    let (key, hash) = auth::new_key();
    t.key_hash = hash;
    s.store.update_tenant(&t)?;
    s.tenants.upsert(t.clone());
    tracing::info!(tenant = %id, "API key rotated");
    Ok(Json(TenantWithKey {
        tenant: t,
        api_key: key,
    }))
}

#[utoipa::path(get, path = "/admin/tenants/{id}/usage", tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = UsageReport), (status = 404, body = crate::error::ErrorBody)))]
pub async fn tenant_usage(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<UsageReport>, ApiError> {
    Ok(Json(crate::usage_report(&s, &id)?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadModel {
    /// A GGUF file; relative paths are resolved against the configured `models_dir`.
    #[schema(value_type = String)]
    pub path: std::path::PathBuf,
    /// Name to serve it under (default: the file stem).
    pub name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelStatus {
    #[serde(flatten)]
    pub model: crate::models::LoadedModel,
    pub kv_pages_total: usize,
    pub kv_pages_free: usize,
    pub sequences: usize,
    pub queue_depth: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelStatusList {
    pub object: String,
    pub data: Vec<ModelStatus>,
}

fn status(s: &Shared, m: crate::models::LoadedModel) -> ModelStatus {
    let st = s
        .models
        .runtime
        .engine(&m.name)
        .map(|e| e.stats())
        .unwrap_or_default();
    ModelStatus {
        model: m,
        kv_pages_total: st.pages_total,
        kv_pages_free: st.pages_free,
        sequences: st.sequences,
        queue_depth: st.queue_depth,
    }
}

#[utoipa::path(get, path = "/admin/models", tag = "admin", security(("admin_token" = [])),
    responses((status = 200, body = ModelStatusList)))]
pub async fn list_models(State(s): State<Shared>) -> Json<ModelStatusList> {
    let data = s.models.list().into_iter().map(|m| status(&s, m)).collect();
    Json(ModelStatusList {
        object: "list".into(),
        data,
    })
}

#[utoipa::path(post, path = "/admin/models", tag = "admin", security(("admin_token" = [])),
    request_body = LoadModel,
    responses((status = 201, body = ModelStatus), (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
pub async fn load_model(
    State(s): State<Shared>,
    ApiJson(req): ApiJson<LoadModel>,
) -> Result<Response, ApiError> {
    let path = match (&s.config.models_dir, req.path.is_relative()) {
        (Some(dir), true) => dir.join(&req.path),
        _ => req.path.clone(),
    };
    if !path.is_file() {
        return Err(
            ApiError::not_found(format!("no model file at {}", path.display())).param("path"),
        );
    }
    let name = req.name.unwrap_or_else(|| crate::config::model_name(&path));
    validate_name(&name)?;
    let m = crate::load_model(&s, &name, &path).await?;
    Ok((StatusCode::CREATED, Json(status(&s, m))).into_response())
}

#[utoipa::path(delete, path = "/admin/models/{name}", tag = "admin", security(("admin_token" = [])),
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
pub async fn unload_model(
    State(s): State<Shared>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if s.models.unload(&name) {
        tracing::info!(model = %name, "model unloaded");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(
            ApiError::not_found(format!("the model {name:?} is not loaded"))
                .code("model_not_found"),
        )
    }
}
