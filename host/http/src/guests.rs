//! Tenant guests: `/v1/guests` (list, upload, get, delete, invoke).
//!
//! A guest belongs to exactly one tenant: every lookup is keyed by the caller's tenant id, so a
//! tenant cannot name, list, invoke or delete another tenant's guest (it gets 404, the same
//! answer as for a guest that does not exist). The built-in guests are visible to every tenant
//! and cannot be replaced or deleted.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::app::Shared;
use crate::error::ApiError;
use crate::store::{GuestRecord, Tenant};

/// Guests compiled into the host, available to every tenant.
pub const BUILTIN_GUESTS: &[&str] = &realm_runtime::builtin::NAMES;

/// The bytes of a built-in guest meant for serving.
pub fn builtin_bytes(name: &str) -> Option<&'static [u8]> {
    if is_builtin(name) {
        realm_runtime::builtin::by_name(name)
    } else {
        None
    }
}

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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadParams {
    /// The guest's name (1-64 characters from `A-Z a-z 0-9 . _ -`).
    pub name: String,
    /// Overwrite an existing guest of that name.
    #[serde(default)]
    pub replace: bool,
}

#[utoipa::path(post, path = "/v1/guests", tag = "guests", security(("api_key" = [])),
    params(UploadParams),
    request_body(content = Vec<u8>, content_type = "application/wasm",
        description = "A WebAssembly component for the realm:llm guest world (wasm32-wasip2)"),
    responses((status = 201, body = GuestInfo),
        (status = 400, body = crate::error::ErrorBody, description = "not a component / invalid wasm"),
        (status = 409, body = crate::error::ErrorBody, description = "name taken or guest quota reached"),
        (status = 413, body = crate::error::ErrorBody),
        (status = 422, body = crate::error::ErrorBody, description = "wrong world or an import the sandbox does not grant")))]
pub async fn upload(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    params: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let body = body?;
    crate::admin::validate_name(&params.name)?;
    if is_builtin(&params.name) {
        return Err(ApiError::conflict(format!(
            "{:?} is the name of a built-in guest",
            params.name
        )));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body (the .wasm component) is empty",
        ));
    }
    // Validate and compile before anything is stored: a guest that is accepted can run.
    let st = s.clone();
    let wasm = body.clone();
    tokio::task::spawn_blocking(move || st.models.compile(&wasm))
        .await
        .map_err(ApiError::internal)?
        .map_err(crate::infer::compile_error)?;
    let size = body.len() as u64;
    let st = s.clone();
    let hash = tokio::task::spawn_blocking(move || st.blobs.put(&body))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let current = s.tenants.get(&t.id).unwrap_or(t);
    let rec = GuestRecord {
        name: params.name.clone(),
        hash: hash.clone(),
        size,
        created_at: crate::store::now(),
    };
    match s
        .store
        .put_guest(&current.id, &rec, params.replace, current.quotas.max_guests)
    {
        Ok(Some(old)) if old != hash => release_blob(&s, &old),
        Ok(_) => {}
        Err(e) => {
            release_blob(&s, &hash);
            return Err(e.into());
        }
    }
    tracing::info!(tenant = %current.id, guest = %rec.name, %hash, "guest uploaded");
    Ok((StatusCode::CREATED, Json(GuestInfo::uploaded(rec))).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct InvokeParams {
    /// Stream the guest's output as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// The model `Model::open("")` opens inside the guest (default: the server's default).
    pub model: Option<String>,
}

#[utoipa::path(post, path = "/v1/guests/{name}/invoke", tag = "guests", security(("api_key" = [])),
    params(("name" = String, Path), InvokeParams),
    request_body(content = Object, description = "Any JSON; passed to the guest's handle export"),
    responses((status = 200, description = "the guest's JSON response, or SSE events {\"delta\": text}... {\"result\": response} [DONE] with stream=true or Accept: text/event-stream"),
        (status = 404, body = crate::error::ErrorBody), (status = 500, body = crate::error::ErrorBody)))]
pub async fn invoke(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
    Path(name): Path<String>,
    params: Result<Query<InvokeParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    crate::extract::ApiJson(input): crate::extract::ApiJson<Value>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let stream = params.stream
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
    // The guest first: naming another tenant's guest is a 404 whether or not a model is loaded.
    let guest = crate::infer::resolve_guest(&s, &t, &name).await?;
    let model = match params.model {
        Some(m) => {
            if s.models.get(&m).is_none() {
                return Err(
                    ApiError::not_found(format!("the model {m:?} does not exist"))
                        .code("model_not_found")
                        .param("model"),
                );
            }
            m
        }
        None => s
            .models
            .default_model(s.config.default_model.as_deref())
            .ok_or_else(|| ApiError::unavailable("no model is loaded"))?,
    };
    // The instance slot before the first byte: over the limit is a 429, not an in-stream error.
    let slots = crate::infer::reserve(&s, &t, 1)?;
    let mut call = crate::infer::Call::new(&s, &t, &name, &model);
    let (mut rx, calls) =
        crate::infer::spawn_calls(&s, &t, &guest, &model, vec![input.to_string()], slots);
    let used = crate::app::ModelUsed(model);
    if stream {
        let st = crate::v1::async_stream(move |tx| async move {
            let _calls = calls;
            let send = |v: Value| {
                let _ = tx.send(SseEvent::default().data(v.to_string()));
            };
            while let Some(ev) = rx.recv().await {
                match ev {
                    crate::infer::Event::Text(_, text) => {
                        call.saw_output();
                        send(json!({ "delta": text }));
                    }
                    crate::infer::Event::Done(_, Ok(v)) => {
                        let (pt, ct) = crate::infer::usage_of(&v);
                        call.finish(pt, ct, 0);
                        send(json!({ "result": v }));
                        break;
                    }
                    crate::infer::Event::Done(_, Err(e)) => {
                        call.guest_failed(&e);
                        call.finish(0, 0, matches!(e, realm_runtime::GuestError::Trap(_)) as u64);
                        send(
                            serde_json::to_value(crate::infer::guest_error(&e).body())
                                .unwrap_or(Value::Null),
                        );
                        break;
                    }
                }
            }
            let _ = tx.send(SseEvent::default().data("[DONE]"));
        });
        let mut r = Sse::new(st)
            .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
            .into_response();
        r.extensions_mut().insert(used);
        return Ok(r);
    }
    let _calls = calls;
    loop {
        match rx.recv().await {
            Some(crate::infer::Event::Text(..)) => call.saw_output(),
            Some(crate::infer::Event::Done(_, Ok(v))) => {
                let (pt, ct) = crate::infer::usage_of(&v);
                call.finish(pt, ct, 0);
                let mut r = Json(v).into_response();
                r.extensions_mut().insert(used);
                return Ok(r);
            }
            Some(crate::infer::Event::Done(_, Err(e))) => {
                call.guest_failed(&e);
                call.finish(0, 0, matches!(e, realm_runtime::GuestError::Trap(_)) as u64);
                return Err(crate::infer::guest_error(&e));
            }
            None => return Err(ApiError::internal("guest call ended without a result")),
        }
    }
}
