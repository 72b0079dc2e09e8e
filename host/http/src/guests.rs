//! Tenant guests: `/v1/guests` (list, upload, get, delete, invoke).
//!
//! A guest belongs to exactly one tenant: every lookup is keyed by the caller's tenant id, so a
//! tenant cannot name, list, invoke or delete another tenant's guest (it gets 404, the same
//! answer as for a guest that does not exist). The built-in guests are visible to every tenant
//! and cannot be replaced or deleted.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::app::Shared;
use crate::error::ApiError;
use crate::store::{GuestRecord, Tenant};

/// Guests compiled into the host, available to every tenant.
pub const BUILTIN_GUESTS: &[&str] = &["chat", "json", "best-of-n"];

pub fn is_builtin(name: &str) -> bool {
    BUILTIN_GUESTS.contains(&name)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GuestInfo {
    pub object: String,
    pub name: String,
    pub builtin: bool,
    /// SHA-256 of the component (uploaded guests only).
    pub hash: Option<String>,
    pub size: Option<u64>,
    pub created_at: Option<i64>,
}

impl GuestInfo {
    fn builtin(name: &str) -> GuestInfo {
        GuestInfo {
            object: "guest".into(),
            name: name.into(),
            builtin: true,
            hash: None,
            size: None,
            created_at: None,
        }
    }
    fn uploaded(g: GuestRecord) -> GuestInfo {
        GuestInfo {
            object: "guest".into(),
            name: g.name,
            builtin: false,
            hash: Some(g.hash),
            size: Some(g.size),
            created_at: Some(g.created_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GuestList {
    pub object: String,
    pub data: Vec<GuestInfo>,
}

/// Deletes the blob `hash` if no guest refers to it any more.
pub fn release_blob(s: &Shared, hash: &str) {
    match s.store.hash_in_use(hash) {
        Ok(false) => {
            if let Err(e) = s.blobs.remove(hash) {
                tracing::warn!(%hash, error = %e, "could not remove unused guest file");
            }
        }
        Ok(true) => {}
        Err(e) => tracing::warn!(%hash, error = %e, "could not check guest file use"),
    }
}

#[utoipa::path(get, path = "/v1/guests", tag = "guests", security(("api_key" = [])),
    responses((status = 200, body = GuestList), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
) -> Result<Json<GuestList>, ApiError> {
    let mut data: Vec<GuestInfo> = BUILTIN_GUESTS
        .iter()
        .map(|n| GuestInfo::builtin(n))
        .collect();
    data.extend(s.store.guests(&t.id)?.into_iter().map(GuestInfo::uploaded));
    Ok(Json(GuestList {
        object: "list".into(),
        data,
    }))
}

#[utoipa::path(get, path = "/v1/guests/{name}", tag = "guests", security(("api_key" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = GuestInfo), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(name): Path<String>,
) -> Result<Json<GuestInfo>, ApiError> {
    if is_builtin(&name) {
        return Ok(Json(GuestInfo::builtin(&name)));
    }
    Ok(Json(GuestInfo::uploaded(s.store.guest(&t.id, &name)?)))
}

#[utoipa::path(delete, path = "/v1/guests/{name}", tag = "guests", security(("api_key" = [])),
    params(("name" = String, Path)),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn delete(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if is_builtin(&name) {
        return Err(ApiError::forbidden(format!(
            "{name:?} is a built-in guest and cannot be deleted"
        )));
    }
    // The directory holds the tenant's current settings (an admin may have changed them).
    let current = s.tenants.get(&t.id).unwrap_or(t);
    if current.default_guest == name {
        return Err(ApiError::conflict(format!(
            "{name:?} is this tenant's default guest; ask the operator to change it first"
        )));
    }
    let hash = s.store.delete_guest(&current.id, &name)?;
    release_blob(&s, &hash);
    Ok(StatusCode::NO_CONTENT)
}
