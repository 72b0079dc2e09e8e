//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Labels are tenant *ids* (not names, which tenants choose and could collide with label
//! syntax) and model names. The endpoint is for operators: it is not reachable with a tenant
//! key unless the operator exposes it, and tenants see their own figures through `/v1/usage`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub tenant: String,
    pub model: String,
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModel {
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub tenant: String,
    pub model: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    pub tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuestLabels {
    pub tenant: String,
    pub guest: String,
    pub kind: &'static str,
}

fn ttft_histogram() -> Histogram {
    // 5 ms .. ~40 s
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn per_token_histogram() -> Histogram {
    // 1 ms .. ~4 s
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub ttft: Family<TenantModel, Histogram, fn() -> Histogram>,
    pub per_token: Family<TenantModel, Histogram, fn() -> Histogram>,
    pub queue_depth: Family<ModelLabel, Gauge>,
    pub kv_pages_in_use: Family<TenantModel, Gauge>,
    pub kv_pages_total: Family<ModelLabel, Gauge>,
    pub guest_errors: Family<GuestLabels, Counter>,
    pub guest_cpu: Family<TenantLabel, Counter<f64, AtomicU64>>,
    pub in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("realm");
        let requests = Family::<RequestLabels, Counter>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let ttft = Family::<TenantModel, Histogram, fn() -> Histogram>::new_with_constructor(
            ttft_histogram,
        );
        let per_token = Family::<TenantModel, Histogram, fn() -> Histogram>::new_with_constructor(
            per_token_histogram,
        );
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        let kv_pages_in_use = Family::<TenantModel, Gauge>::default();
        let kv_pages_total = Family::<ModelLabel, Gauge>::default();
        let guest_errors = Family::<GuestLabels, Counter>::default();
        let guest_cpu = Family::<TenantLabel, Counter<f64, AtomicU64>>::default();
        let in_flight = Gauge::default();
        registry.register(
            "http_requests",
            "Tenant API requests by tenant, model, endpoint and status",
            requests.clone(),
        );
        registry.register(
            "tokens",
            "Tokens processed (direction=in: prompt, out: generated)",
            tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to the first generated text",
            ttft.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Mean time per generated token after the first, per request",
            per_token.clone(),
        );
        registry.register(
            "engine_queue_depth",
            "Steps waiting in the model's engine queue",
            queue_depth.clone(),
        );
        registry.register(
            "kv_pages_in_use",
            "KV cache pages held, by tenant and model",
            kv_pages_in_use.clone(),
        );
        registry.register(
            "kv_pages_total",
            "KV cache pages in the model's pool",
            kv_pages_total.clone(),
        );
        registry.register(
            "guest_errors",
            "Guest calls that ended in a trap, a limit or a guest error",
            guest_errors.clone(),
        );
        registry.register(
            "guest_cpu_seconds",
            "CPU time spent running tenants' guest code (not the engine's work for them)",
            guest_cpu.clone(),
        );
        registry.register(
            "http_in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        Metrics {
            registry,
            requests,
            tokens,
            ttft,
            per_token,
            queue_depth,
            kv_pages_in_use,
            kv_pages_total,
            guest_errors,
            guest_cpu,
            in_flight,
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labelled_series() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                tenant: "tn_1".into(),
                model: "m".into(),
                endpoint: "chat".into(),
                status: 200,
            })
            .inc();
        m.ttft
            .get_or_create(&TenantModel {
                tenant: "tn_1".into(),
                model: "m".into(),
            })
            .observe(0.02);
        let s = m.encode();
        assert!(s.contains(
            r#"realm_http_requests_total{tenant="tn_1",model="m",endpoint="chat",status="200"} 1"#
        ));
        assert!(s.contains("realm_time_to_first_token_seconds_bucket"));
        assert!(s.ends_with("# EOF\n"));
    }
}
