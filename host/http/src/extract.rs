//! Extractors whose rejections are OpenAI-shaped errors.

use axum::extract::FromRequest;

use crate::error::ApiError;

/// `axum::Json`, but a bad body is answered with 400 (syntax), 422 (wrong fields or types) or
/// 413 (too large) in the OpenAI error shape.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);
