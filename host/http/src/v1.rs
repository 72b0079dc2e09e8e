//! The OpenAI-compatible tenant API: models, chat completions, completions, and the tenant's
//! own usage.

use axum::extract::State;
use axum::{Extension, Json};

use crate::admin::UsageReport;
use crate::app::Shared;
use crate::error::ApiError;
use crate::store::Tenant;

#[utoipa::path(get, path = "/v1/usage", tag = "tenant", security(("api_key" = [])),
    responses((status = 200, body = UsageReport, description = "the calling tenant's usage only")))]
pub async fn usage(
    State(s): State<Shared>,
    Extension(t): Extension<Tenant>,
) -> Result<Json<UsageReport>, ApiError> {
    Ok(Json(crate::usage_report(&s, &t.id)?))
}
