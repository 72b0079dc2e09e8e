//! Admin API, authentication, rate limits, errors, health, metrics and OpenAPI, in-process.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{ADMIN, Harness};
use serde_json::json;

#[tokio::test]
async fn health_ready_and_request_ids() {
    let h = Harness::new();
    let r = h.call("GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    assert!(r.headers.contains_key("x-request-id"));
    assert_eq!(h.call("GET", "/readyz", None, None).await.status, 200);
    h.state.set_ready(false);
    let r = h.call("GET", "/readyz", None, None).await;
    r.error(503);
    assert!(r.headers.contains_key(header::RETRY_AFTER));
    // A caller-supplied request id is propagated.
    let r = h
        .send(
            Request::get("/healthz")
                .header("x-request-id", "abc-123")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn tenant_lifecycle() {
    let h = Harness::new();
    let r = h
        .admin(
            "POST",
            "/admin/tenants",
            Some(json!({"name": "acme", "quotas": {"max_kv_pages": 128}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_string();
    let key = v["api_key"].as_str().unwrap().to_string();
    assert!(key.starts_with("rk-"));
    assert_eq!(v["quotas"]["max_kv_pages"], 128);
    assert_eq!(v["default_guest"], "chat");
    assert!(v.get("key_hash").is_none());

    // Listing and fetching never shows the key again.
    let r = h.admin("GET", "/admin/tenants", None).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(!r.text().contains(&key[3..]));
    let r = h.admin("GET", &format!("/admin/tenants/{id}"), None).await;
    assert_eq!(r.json()["name"], "acme");

    // Duplicate name: 409.
    h.admin("POST", "/admin/tenants", Some(json!({"name": "acme"})))
        .await
        .error(409);
    // Bad name: 400; unknown field: 422; malformed JSON: 400.
    h.admin("POST", "/admin/tenants", Some(json!({"name": "a b"})))
        .await
        .error(400);
    h.admin(
        "POST",
        "/admin/tenants",
        Some(json!({"name": "x", "color": 1})),
    )
    .await
    .error(422);
    let r = h
        .send(
            Request::post("/admin/tenants")
                .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{\"name\":"))
                .unwrap(),
        )
        .await;
    r.error(400);

    // Update quotas (partial) and reject bad ones.
    let r = h
        .admin(
            "PATCH",
            &format!("/admin/tenants/{id}"),
            Some(json!({"quotas": {"requests_per_minute": 5}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["quotas"]["requests_per_minute"], 5);
    assert_eq!(r.json()["quotas"]["max_kv_pages"], 128);
    h.admin(
        "PATCH",
        &format!("/admin/tenants/{id}"),
        Some(json!({"quotas": {"burst": 0}})),
    )
    .await
    .error(422);
    h.admin(
        "PATCH",
        &format!("/admin/tenants/{id}"),
        Some(json!({"default_guest": "nope"})),
    )
    .await
    .error(422);

    // The key works; rotation replaces it.
    assert_eq!(
        h.call("GET", "/v1/usage", Some(&key), None).await.status,
        200
    );
    let r = h
        .admin("POST", &format!("/admin/tenants/{id}/keys"), None)
        .await;
    assert_eq!(r.status, 200);
    let key2 = r.json()["api_key"].as_str().unwrap().to_string();
    assert_ne!(key, key2);
    h.call("GET", "/v1/usage", Some(&key), None)
        .await
        .error(401);
    assert_eq!(
        h.call("GET", "/v1/usage", Some(&key2), None).await.status,
        200
    );

    let r = h
        .admin("GET", &format!("/admin/tenants/{id}/usage"), None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["tenant"], id.as_str());
    assert!(r.json()["tokens_in"].is_u64());

    // Delete: 204, then 404 everywhere and the key is dead.
    let r = h
        .admin("DELETE", &format!("/admin/tenants/{id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    h.admin("GET", &format!("/admin/tenants/{id}"), None)
        .await
        .error(404);
    h.admin("DELETE", &format!("/admin/tenants/{id}"), None)
        .await
        .error(404);
    h.admin("GET", &format!("/admin/tenants/{id}/usage"), None)
        .await
        .error(404);
    h.call("GET", "/v1/usage", Some(&key2), None)
        .await
        .error(401);
}

#[tokio::test]
async fn admin_auth_errors() {
    let h = Harness::new();
    let e = h.call("GET", "/admin/tenants", None, None).await.error(401);
    assert_eq!(e["type"], "authentication_error");
    h.call(
        "GET",
        "/admin/tenants",
        Some("wrong-token-wrong-token"),
        None,
    )
    .await
    .error(401);
    // A tenant key is not an admin token.
    let (_, key) = h.tenant("t", None).await;
    h.call("GET", "/admin/tenants", Some(&key), None)
        .await
        .error(401);
    // Without a configured token the admin API is closed to everyone.
    let h = Harness::with(|c| c.admin_token = None);
    h.admin("GET", "/admin/tenants", None).await.error(403);
}

#[tokio::test]
async fn tenant_auth_and_rate_limit() {
    let h = Harness::new();
    h.call("GET", "/v1/usage", None, None).await.error(401);
    h.call("GET", "/v1/usage", Some("rk-0000"), None)
        .await
        .error(401);
    let r = h
        .send(
            Request::get("/v1/usage")
                .header(header::AUTHORIZATION, "Basic abc")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    r.error(401);

    let (_, key) = h
        .tenant(
            "limited",
            Some(json!({"requests_per_minute": 1, "burst": 2})),
        )
        .await;
    let (_, other) = h.tenant("other", None).await;
    for _ in 0..2 {
        assert_eq!(
            h.call("GET", "/v1/usage", Some(&key), None).await.status,
            200
        );
    }
    let r = h.call("GET", "/v1/usage", Some(&key), None).await;
    let e = r.error(429);
    assert_eq!(e["type"], "rate_limit_error");
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Other tenants are unaffected.
    assert_eq!(
        h.call("GET", "/v1/usage", Some(&other), None).await.status,
        200
    );
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let h = Harness::with(|c| c.limits.max_body_bytes = 2048);
    h.call("GET", "/no/such/path", None, None).await.error(404);
    h.call("DELETE", "/healthz", None, None).await.error(405);
    let big = json!({"name": "x".repeat(4096)});
    h.admin("POST", "/admin/tenants", Some(big))
        .await
        .error(413);
}

#[tokio::test]
async fn metrics_and_openapi() {
    let h = Harness::new();
    let (id, key) = h.tenant("m", None).await;
    h.call("GET", "/v1/usage", Some(&key), None).await;
    // The scrape names tenants: it takes the admin token (or a metrics token), nothing else.
    let e = h.call("GET", "/metrics", None, None).await.error(401);
    assert!(
        e["message"].as_str().unwrap().contains("metrics token"),
        "{e}"
    );
    h.call("GET", "/metrics", Some(&key), None).await.error(401);
    h.call("GET", "/metrics", Some("not-the-admin-token-000"), None)
        .await
        .error(401);
    let r = h.call("GET", "/metrics", Some(ADMIN), None).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(
        text.contains(&format!(
            "realm_http_requests_total{{tenant=\"{id}\",model=\"\",endpoint=\"/v1/usage\",status=\"200\"}} 1"
        )),
        "{text}"
    );
    // A failed scrape is not a tenant request: it is not counted under any tenant.
    assert!(!text.contains("endpoint=\"/metrics\""), "{text}");
    let r = h.call("GET", "/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/admin/tenants",
        "/admin/tenants/{id}/keys",
        "/v1/guests/{name}",
    ] {
        assert!(doc["paths"].get(p).is_some(), "missing {p}");
    }
    assert!(
        doc["components"]["securitySchemes"]
            .get("api_key")
            .is_some()
    );
}

#[tokio::test]
async fn state_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key;
    let id;
    {
        let s = realm_http::AppState::open(common::config(dir.path())).unwrap();
        let h = Harness {
            state: s,
            dir: tempfile::tempdir().unwrap(),
        };
        (id, key) = h.tenant("persist", Some(json!({"max_sessions": 3}))).await;
    }
    let s = realm_http::AppState::open(common::config(dir.path())).unwrap();
    s.set_ready(true);
    let h = Harness {
        state: s,
        dir: tempfile::tempdir().unwrap(),
    };
    let r = h.call("GET", "/v1/usage", Some(&key), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = h
        .admin("GET", &format!("/admin/tenants/{id}"), None)
        .await
        .json();
    assert_eq!(t["quotas"]["max_sessions"], 3);
}

#[tokio::test]
async fn metrics_token_opens_only_metrics() {
    const SCRAPER: &str = "scraper-token-0123456789abcdef";
    let h = Harness::with(|c| c.metrics_token = Some(SCRAPER.into()));
    let r = h.call("GET", "/metrics", Some(SCRAPER), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().ends_with("# EOF\n"));
    // The admin token still works there; the scraper's token opens nothing else.
    assert_eq!(
        h.call("GET", "/metrics", Some(ADMIN), None).await.status,
        200
    );
    h.call("GET", "/admin/tenants", Some(SCRAPER), None)
        .await
        .error(401);

    // With neither token configured, /metrics is closed to everyone, and says how to open it.
    let h = Harness::with(|c| c.admin_token = None);
    let e = h
        .call("GET", "/metrics", Some(SCRAPER), None)
        .await
        .error(403);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("REALM_METRICS_TOKEN"),
        "{e}"
    );
}

#[tokio::test]
async fn relative_data_dir_is_resolved_against_the_current_directory() {
    // The guest runtime's compilation cache accepts only an absolute directory; a relative
    // data directory (the default, `realm-data`) must work all the same.
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let rel = pathdiff_relative(dir.path(), &cwd);
    assert!(rel.is_relative(), "{}", rel.display());
    let state = realm_http::AppState::open(realm_http::Config {
        data_dir: rel.join("data"),
        admin_token: Some(ADMIN.into()),
        ..realm_http::Config::default()
    })
    .unwrap();
    assert!(state.config.data_dir.is_absolute());
    assert!(dir.path().join("data/realm.db").is_file());
    // The guest runtime's cache was created there (it refused the relative path before).
    assert!(dir.path().join("data/cache").is_dir());
}

/// `target` as a path relative to `base` (both absolute), with `..` components as needed.
fn pathdiff_relative(target: &std::path::Path, base: &std::path::Path) -> std::path::PathBuf {
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = std::path::PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}
