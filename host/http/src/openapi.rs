//! The OpenAPI document, generated from the handlers' annotations and served at
//! `/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A tenant's API key (rk-...)"))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The server's admin token"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Realm", description = "Multi-tenant LLM inference host: OpenAI-compatible tenant API, sandboxed guests, admin API."),
    modifiers(&Security),
    paths(
        crate::app::readyz,
        crate::v1::list_models, crate::v1::get_model, crate::v1::chat_completions,
        crate::v1::completions, crate::v1::usage,
        crate::guests::list, crate::guests::get, crate::guests::delete, crate::guests::upload,
        crate::guests::invoke,
        crate::admin::create_tenant, crate::admin::list_tenants, crate::admin::get_tenant,
        crate::admin::update_tenant, crate::admin::delete_tenant, crate::admin::rotate_key,
        crate::admin::tenant_usage, crate::admin::list_models, crate::admin::load_model,
        crate::admin::unload_model,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail, crate::store::Quotas))
)]
pub struct ApiDoc;

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
